"""The generic feedback loop's sensors.

* ``feedback_sensor``: new feedback for a task (an ``ingest_batches`` row of kind
  "feedback") -> one run of ``feedback_generic_job`` (the ratings summary and the cycles)
  for that task. The cursor and run keys are the data sensors' (defs/automation.py):
  (last batch id, last ingested_at), run key ``feedback:<task>:<batch id>:<ingested_at>``, so a batch triggers exactly one run and
  a restart misses nothing. A task not yet registered gets its partition in the same tick.
* ``retrain_sensor``: each completed cycle that broke a threshold (``retrain_due``) and has
  no re-training request yet -> one request of the task's re-training asset(s): an asset
  named ``prompt_evolution`` partitioned by ``task`` (prompt evolution; another issue builds
  it) and any other ``task``-partitioned asset tagged ``meta_pipeline/retrains=feedback``
  (how any model's re-training joins the loop). When none exists, the sensor skips with a
  reason that names every pending request (task, cycle, why) — visible in the UI — and
  records nothing, so the requests go out once such an asset is deployed.

"Answered" is decided from the data: ``feedback_cycles_generic.retrain_requested``. The
sensor emits a request and keeps its run key in its cursor; Dagster stores the cursor with
the tick's runs, so on the next tick the request is durable and the sensor writes it into
the cycle rows (``MetaStore.mark_retrain_requested``). A cycle is therefore requested once,
even across restarts; a tick lost before its runs were submitted is simply evaluated again
(the same run key). One run per task per tick: its newest pending cycle stands for its
older pending ones (one re-training answers them all), like the drift sensor's newest event.
Run key ``retrain:<task>:<cycle>:<the cycle's last ts>`` — the cycle, plus its data time so a
reset store can never collide with an old key.
"""

import json
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd

from meta_pipeline.defs.automation import BatchCursor, new_batches, plan_batch_runs
from meta_pipeline.defs.feedback_generic.assets import GROUP
from meta_pipeline.defs.resources import StoreParam, task_partitions

RETRAIN_ASSET = "prompt_evolution"
RETRAIN_TAG = "meta_pipeline/retrains"  # = "feedback": a task-partitioned asset that re-trains a model from its feedback
# a string selection resolves to nothing (instead of failing) while no such asset exists
RETRAIN_SELECTION = dg.AssetSelection.from_string(f'key:"{RETRAIN_ASSET}" or tag:"{RETRAIN_TAG}"="feedback"')
MAX_LISTED = 20  # pending requests named in a skip reason

feedback_generic_job = dg.define_asset_job(
    "feedback_generic_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="One task's generic feedback: its ratings summary (feedback) and its cycles "
                "(feedback_cycles_generic), launched when new feedback for the task lands.",
)


@dg.sensor(
    job=feedback_generic_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New feedback for a task -> its feedback_cycles_generic (one run per task per batch).",
)
def feedback_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    cursor = BatchCursor.parse(context.cursor)
    requests, moved, invalid = plan_batch_runs(new_batches(store, "feedback", cursor), cursor, "feedback")
    for name in invalid:
        context.log.warning(f"ignored feedback batches for invalid task name {name!r}")
    known = set(context.instance.get_dynamic_partitions(task_partitions.name))
    new_tasks = sorted({r.partition_key for r in requests} - known)
    return dg.SensorResult(
        run_requests=requests,
        cursor=moved.dump(),
        dynamic_partitions_requests=[task_partitions.build_add_request(new_tasks)] if new_tasks else [],
    )


# ---------------------------------------------------------------------------
# Re-training requests
# ---------------------------------------------------------------------------


@dataclass
class RetrainCursor:
    """Requests emitted by the previous tick, not yet written into the cycle rows: run key -> entry."""

    emitted: dict[str, dict] = field(default_factory=dict)  # {"task", "cycles", "at"}

    @classmethod
    def parse(cls, text: str | None) -> "RetrainCursor":
        if not text:
            return cls()
        return cls(dict(json.loads(text).get("emitted", {})))

    def dump(self) -> str:
        return json.dumps({"emitted": self.emitted}, sort_keys=True)


def retrain_targets(repository_def: dg.RepositoryDefinition | None) -> tuple[list[dg.AssetKey], str]:
    """The re-training assets a request can target (task-partitioned ones), and a note on what is missing."""
    if repository_def is None:
        return [], "the sensor was evaluated without its code location's definitions"
    graph = repository_def.asset_graph
    found = sorted(RETRAIN_SELECTION.resolve(graph), key=lambda k: k.to_user_string())
    usable = []
    wrong = []
    for key in found:
        partitions_def = graph.get(key).partitions_def
        if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name == task_partitions.name:
            usable.append(key)
        else:
            wrong.append(key.to_user_string())
    if usable:
        return usable, ""
    note = (f"no re-training asset in this code location: neither an asset named {RETRAIN_ASSET!r} nor one tagged "
            f"{RETRAIN_TAG}=feedback, partitioned by {task_partitions.name!r}")
    if wrong:
        note += f" ({', '.join(wrong)} exist(s) but not partitioned by {task_partitions.name!r})"
    return [], note


def run_key(task: str, cycle: pd.Series) -> str:
    return f"retrain:{task}:{int(cycle['cycle'])}:{pd.Timestamp(cycle['last_ts']).strftime('%Y%m%dT%H%M%S%f')}"


def describe_pending(pending: pd.DataFrame) -> str:
    """The first MAX_LISTED pending cycles as text: task 'qa' cycle 3 (mean score 0.612 < 0.700); ..."""
    parts = [f"task {row.task!r} cycle {int(row.cycle)} ({row.breaks})" for row in pending.head(MAX_LISTED).itertuples()]
    if len(pending) > MAX_LISTED:
        parts.append(f"and {len(pending) - MAX_LISTED} more")
    return "; ".join(parts)


@dg.sensor(
    asset_selection=RETRAIN_SELECTION,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Each completed feedback cycle that broke a threshold -> one re-training request of its task "
                f"({RETRAIN_ASSET} or an asset tagged {RETRAIN_TAG}=feedback); skips naming the pending requests "
                "while no such asset exists.",
)
def retrain_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    cursor = RetrainCursor.parse(context.cursor)
    # the previous tick's requests are durable now (Dagster kept its cursor with its runs): record them
    for key, entry in cursor.emitted.items():
        store.mark_retrain_requested(entry["task"], entry["cycles"], key, pd.Timestamp(entry["at"]))
    pending = store.pending_retrains()
    if pending.empty:
        return dg.SensorResult(skip_reason="no completed feedback cycle waits for a re-training",
                               cursor=RetrainCursor().dump())
    targets, note = retrain_targets(context.repository_def)
    if not targets:
        message = (f"{len(pending)} re-training request(s) pending, not sent: {note}. Pending: "
                   f"{describe_pending(pending)}")
        context.log.info(message)
        return dg.SensorResult(skip_reason=message, cursor=RetrainCursor().dump())
    now = pd.Timestamp.now(tz="UTC").isoformat()
    emitted: dict[str, dict] = {}
    requests = []
    for task, group in pending.groupby("task", sort=True):
        newest = group.sort_values("cycle").iloc[-1]
        key = run_key(str(task), newest)
        cycles = [int(c) for c in group["cycle"]]
        emitted[key] = {"task": str(task), "cycles": cycles, "at": now}
        requests.append(dg.RunRequest(
            run_key=key,
            partition_key=str(task),
            asset_selection=targets,
            tags={"meta_pipeline/feedback_cycles": ",".join(str(c) for c in cycles[-20:]),
                  "meta_pipeline/retrain_reason": str(newest["breaks"])[:200]},
        ))
    known = set(context.instance.get_dynamic_partitions(task_partitions.name))
    new_tasks = sorted(set(emitted_task["task"] for emitted_task in emitted.values()) - known)
    return dg.SensorResult(
        run_requests=requests,
        cursor=RetrainCursor(emitted).dump(),
        dynamic_partitions_requests=[task_partitions.build_add_request(new_tasks)] if new_tasks else [],
    )
