"""Sensors and schedules that keep the fleet's assets current.

* new trades for a domain      -> the learning assets of that partition, then override_feedback
* a drift event                -> a re-learn of its domain (drift_sensor, defs/learning/feedback.py)
* a controller decision that    -> a re-learn of its domain, so the trial is judged on overrides
  moves a learning knob           built with the new knobs (knob_trial_sensor, defs/governance/knob_trials.py)
* new telemetry for a domain   -> the integrative update of that partition (controller_job)
* a new global_prior           -> nothing to launch: every controller reads the newest
                                  prior at its next update (pull, so no run storms)
* new domain_priors            -> global_prior, by its automation condition (the
                                  automation sensor below runs it; Dagster's default one
                                  starts stopped)
* nightly                      -> every domain's full refresh, then the fleet analysis
* every 6 hours                -> priors refresh (domain_priors; global_prior follows by
                                  its automation condition)

The data sensors watch the store's `ingest_batches` log, which every ingest (CLI,
inbox, runtime writes) appends to in the same transaction as its rows (a file refused
whole is logged with 0 rows: nothing to learn from, so the sensors skip it).

**Pending is decided from the data**, not from the cursor: a domain's newest batch is
answered once every asset of ``ANSWERED_BY[kind]`` was materialized for the domain by a
run that started after the batch was ingested (so it read the batch) and that is not a
replay as of a past time — whatever launched it (this sensor, the nightly refresh, the
demo, a click). A fresh or lost cursor therefore neither repeats work already done for
the same batches nor misses any: opening the UI right after `meta-pipeline demo`
launches nothing. The cursor only makes a tick cheaper: (last batch id, last
ingested_at) bounds the batches read (past it by id OR by time: a reset store restarts
ids, not the clock), and the domains still pending ride along with the batch a run was
already requested for. Run keys name the domain's newest batch id AND its timestamp, so
a batch triggers at most one run (also across restarts and a reset store); if that run
fails, the batch stays pending until some run materializes the assets.

**Controller runs are coalesced**: at most one run per domain per
``controller_coalesce_seconds()`` (``META_PIPELINE_CONTROLLER_COALESCE_SECONDS``, default
300; 0 = one run per batch as before). A domain whose run this sensor requested less than
that long ago keeps its newest batch pending (newer batches replace it) and gets one run
when the interval has passed: that run reads every tick landed meanwhile. Nothing pending,
no run. Why: under continuous telemetry (~25 batches a minute) one run per batch was ~10
controller runs a minute for 3 domains, 90% of them with nothing to decide, and ~13 MB a
minute of event log; at 100 domains, hundreds of thousands of runs a day.
"""

import json
import os
import time
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd

from meta_pipeline.contracts import DOMAIN_RE
from meta_pipeline.defs.learning.assets import AS_OF_TAG
from meta_pipeline.defs.resources import StoreParam, domain_partitions
from meta_pipeline.store import MetaStore

learning_sensor_job = dg.define_asset_job(
    "learning_on_new_trades_job",
    selection=dg.AssetSelection.groups("learning", "feedback"),
    description="Learning assets of one domain, launched when new trades land, then the new trades scored (feedback).",
)
controller_job = dg.define_asset_job(
    "controller_job",
    selection=dg.AssetSelection.assets("controller_state"),
    description="The integrative update of one domain, launched when new telemetry lands.",
    tags={"meta_pipeline/area": "governance"},
)
priors_job = dg.define_asset_job(
    "priors_refresh_job",
    selection=dg.AssetSelection.assets("domain_priors"),
    description="Per-domain knob priors (the global prior follows automatically).",
)


@dataclass(frozen=True)
class BatchCursor:
    last_id: int = 0
    last_ingested_at: str = ""  # ISO, UTC

    @classmethod
    def parse(cls, text: str | None) -> "BatchCursor":
        if not text:
            return cls()
        data = json.loads(text)
        return cls(int(data.get("last_id", 0)), str(data.get("last_ingested_at", "")))

    def dump(self) -> str:
        return json.dumps({"last_id": self.last_id, "last_ingested_at": self.last_ingested_at})


def new_batches(store: MetaStore, kind: str, cursor: BatchCursor) -> pd.DataFrame:
    """Batches past the cursor by id OR by time (a reset store restarts ids, not the clock).

    Only batches that landed rows: a file refused whole is logged with ``rows_ingested`` 0.
    """
    return _landed(store.batches_after(kind, cursor.last_id, cursor.last_ingested_at or None))


def _landed(batches: pd.DataFrame) -> pd.DataFrame:
    if batches.empty or "rows_ingested" not in batches.columns:
        return batches
    return batches[batches["rows_ingested"].fillna(0) > 0].reset_index(drop=True)


def _batch_run_key(prefix: str, domain: str, batch_id: int, ingested_at) -> str:
    return f"{prefix}:{domain}:{int(batch_id)}:{_utc(ingested_at).strftime('%Y%m%dT%H%M%S%f')}"


def _utc(value) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _advance(batches: pd.DataFrame, cursor: BatchCursor) -> BatchCursor:
    """The cursor past ``batches``; it only moves forward."""
    if batches.empty:
        return cursor
    newest_ts = _utc(batches["ingested_at"].max()).isoformat()
    return BatchCursor(
        last_id=max(cursor.last_id, int(batches["id"].max())),
        last_ingested_at=max(cursor.last_ingested_at, newest_ts) if cursor.last_ingested_at else newest_ts,
    )


def plan_batch_runs(batches: pd.DataFrame, cursor: BatchCursor, prefix: str) -> tuple[list[dg.RunRequest], BatchCursor, list[str]]:
    """One run per domain with new batches; the cursor only moves forward.

    Returns (run requests, new cursor, domains whose names are not valid partition keys).
    (The generic feedback sensor's plan; the trades and telemetry sensors decide from the
    data what is pending, see ``pending_batch_runs``.)
    """
    if batches.empty:
        return [], cursor, []
    requests, invalid = [], []
    for domain, group in batches.groupby("domain", sort=True):
        if not DOMAIN_RE.fullmatch(str(domain)):
            invalid.append(str(domain))
            continue
        newest = group.iloc[-1]
        requests.append(
            dg.RunRequest(
                run_key=_batch_run_key(prefix, str(domain), newest["id"], newest["ingested_at"]),
                partition_key=str(domain),
                tags={"meta_pipeline/batches": ",".join(str(i) for i in group["id"].tolist()[-20:])},
            )
        )
    return requests, _advance(batches, cursor), invalid


# ---------------------------------------------------------------------------
# Pending from the data (new_trades_sensor, new_telemetry_sensor)
# ---------------------------------------------------------------------------

# What answers a domain's batch of each kind: a materialization of every one of these assets
# for the domain (the last assets of the job the sensor launches), by a run that started after
# the batch was ingested.
ANSWERED_BY: dict[str, tuple[dg.AssetKey, ...]] = {
    "trades": (dg.AssetKey("pm_overrides"), dg.AssetKey("override_feedback")),
    "telemetry": (dg.AssetKey("controller_state"),),
}
ANSWER_LOOKBACK = 20  # newest materializations looked at per asset and domain (replays as of a past time are skipped)
CONTROLLER_COALESCE_SECONDS = 300.0  # default of META_PIPELINE_CONTROLLER_COALESCE_SECONDS


def controller_coalesce_seconds() -> float:
    """At most one controller run per domain per this many seconds (env, default 300; 0 = per batch)."""
    text = os.environ.get("META_PIPELINE_CONTROLLER_COALESCE_SECONDS", "").strip()
    try:
        return max(0.0, float(text)) if text else CONTROLLER_COALESCE_SECONDS
    except ValueError:
        return CONTROLLER_COALESCE_SECONDS


def run_due(now: float, last_requested: float | None, interval: float) -> bool:
    """Coalescing rule: a domain's next run is due when none was requested within ``interval`` seconds."""
    return last_requested is None or interval <= 0 or now - last_requested >= interval


@dataclass(frozen=True)
class PendingBatch:
    """A domain's newest batch not answered yet, and whether a run was requested for it."""

    id: int
    ingested_at: str  # ISO, UTC
    requested: bool = False


@dataclass(frozen=True)
class DataSensorCursor:
    """``BatchCursor`` plus the domains still pending (JSON: last_id, last_ingested_at, pending)."""

    batches: BatchCursor = BatchCursor()
    pending: dict[str, PendingBatch] = field(default_factory=dict)
    requested_at: dict[str, float] = field(default_factory=dict)  # domain -> epoch of its last run request (coalescing)

    @classmethod
    def parse(cls, text: str | None) -> "DataSensorCursor":
        if not text:
            return cls()
        data = json.loads(text)
        pending = {
            str(d): PendingBatch(int(p["id"]), str(p["ingested_at"]), bool(p.get("requested", False)))
            for d, p in (data.get("pending") or {}).items()
        }
        requested_at = {str(d): float(t) for d, t in (data.get("requested_at") or {}).items()}
        return cls(BatchCursor.parse(text), pending, requested_at)

    def dump(self) -> str:
        out = {
            "last_id": self.batches.last_id, "last_ingested_at": self.batches.last_ingested_at,
            "pending": {d: {"id": p.id, "ingested_at": p.ingested_at, "requested": p.requested}
                        for d, p in sorted(self.pending.items())},
        }
        if self.requested_at:
            out["requested_at"] = dict(sorted(self.requested_at.items()))
        return json.dumps(out, sort_keys=True)


def last_answer_time(instance: dg.DagsterInstance, asset_key: dg.AssetKey, domain: str) -> float | None:
    """Start time (epoch seconds) of the run behind the newest materialization of ``asset_key`` for
    ``domain`` — replays as of a past time (tag ``meta_pipeline/as_of``) skipped; a runless report
    counts at its own time. None when there is none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[domain]), limit=ANSWER_LOOKBACK
    ).records
    for record in records:
        if not record.run_id:
            return record.timestamp
        run = instance.get_run_record_by_id(record.run_id)
        if run is None or AS_OF_TAG in run.dagster_run.tags:
            continue
        return run.start_time if run.start_time is not None else run.create_timestamp.timestamp()
    return None


def batch_answered(instance: dg.DagsterInstance, kind: str, domain: str, ingested_at) -> bool:
    """Did every asset of ``ANSWERED_BY[kind]`` get materialized for ``domain`` by a run started after the batch?"""
    landed = _utc(ingested_at).timestamp()
    for key in ANSWERED_BY[kind]:
        answered = last_answer_time(instance, key, domain)
        if answered is None or answered <= landed:
            return False
    return True


def pending_batch_runs(
    instance: dg.DagsterInstance, store: MetaStore, kind: str, prefix: str, cursor: DataSensorCursor,
    *, coalesce_seconds: float = 0.0, now: float | None = None,
) -> tuple[list[dg.RunRequest], DataSensorCursor, list[str]]:
    """One run per domain whose newest batch is not answered yet (``batch_answered``) and not requested
    already; returns (run requests, new cursor, invalid domain names seen).

    The batches read are those past the cursor (all of them for a fresh cursor) plus the
    domains the cursor still holds as pending; a domain leaves the cursor once answered.
    ``coalesce_seconds`` > 0: a domain gets no new run within that long of the last one this
    cursor requested (``run_due``); its newest batch waits in the cursor, not requested.
    """
    now = time.time() if now is None else now
    read = store.batches_after(kind, cursor.batches.last_id, cursor.batches.last_ingested_at or None)
    fresh = _landed(read)
    candidates = dict(cursor.pending)
    batch_ids: dict[str, list[int]] = {}
    invalid: list[str] = []
    if not fresh.empty:
        fresh = fresh.assign(_at=[_utc(v) for v in fresh["ingested_at"]])
        for domain, group in fresh.groupby("domain", sort=True):
            domain = str(domain)
            if not DOMAIN_RE.fullmatch(domain):
                invalid.append(domain)
                continue
            newest = group.sort_values(["_at", "id"]).iloc[-1]
            batch = PendingBatch(int(newest["id"]), newest["_at"].isoformat())
            known = candidates.get(domain)
            if known is not None and (_utc(known.ingested_at), known.id) >= (newest["_at"], batch.id):
                batch = known  # nothing newer than what the cursor holds
            candidates[domain] = batch
            batch_ids[domain] = [int(i) for i in group["id"].tolist()[-20:]]
    requests: list[dg.RunRequest] = []
    pending: dict[str, PendingBatch] = {}
    requested_at = {d: t for d, t in cursor.requested_at.items() if run_due(now, t, coalesce_seconds) is False}
    for domain, batch in sorted(candidates.items()):
        if batch_answered(instance, kind, domain, batch.ingested_at):
            continue
        if not batch.requested and not run_due(now, requested_at.get(domain), coalesce_seconds):
            pending[domain] = PendingBatch(batch.id, batch.ingested_at, False)  # coalesced into the next run
            continue
        pending[domain] = PendingBatch(batch.id, batch.ingested_at, True)
        if batch.requested:
            continue  # its run was requested by an earlier tick (same run key: Dagster would launch nothing)
        if coalesce_seconds > 0:
            requested_at[domain] = now
        requests.append(dg.RunRequest(
            run_key=_batch_run_key(prefix, domain, batch.id, batch.ingested_at),
            partition_key=domain,
            tags={"meta_pipeline/batches": ",".join(str(i) for i in batch_ids.get(domain, [batch.id]))},
        ))
    return requests, DataSensorCursor(_advance(read, cursor.batches), pending, requested_at), invalid


def _batch_sensor_result(context: dg.SensorEvaluationContext, store: StoreParam, kind: str, prefix: str,
                         coalesce_seconds: float = 0.0) -> dg.SensorResult:
    cursor = DataSensorCursor.parse(context.cursor)
    requests, moved, invalid = pending_batch_runs(context.instance, store, kind, prefix, cursor,
                                                  coalesce_seconds=coalesce_seconds)
    for name in invalid:
        context.log.warning(f"ignored batches for invalid domain name {name!r}")
    waiting = sorted(set(moved.pending) - {r.partition_key for r in requests})
    if waiting:
        context.log.info(f"{kind}: run already requested, not materialized yet, for: {', '.join(waiting)}")
    known = set(context.instance.get_dynamic_partitions(domain_partitions.name))
    new_domains = sorted({r.partition_key for r in requests} - known)
    return dg.SensorResult(
        run_requests=requests,
        cursor=moved.dump(),
        dynamic_partitions_requests=[domain_partitions.build_add_request(new_domains)] if new_domains else [],
    )


@dg.sensor(
    job=learning_sensor_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "New trades for a domain -> its learning assets, then override_feedback (one run per domain per batch "
        "not yet learned from: pending is decided from the data, so a fresh cursor repeats nothing)."
    ),
)
def new_trades_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    return _batch_sensor_result(context, store, "trades", "learn")


@dg.sensor(
    job=controller_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "New telemetry for a domain -> its integrative update (controller_state): at most one run per domain "
        "per META_PIPELINE_CONTROLLER_COALESCE_SECONDS (default 300), taking every tick landed meanwhile; "
        "none when nothing is pending (decided from the data)."
    ),
)
def new_telemetry_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    return _batch_sensor_result(context, store, "telemetry", "control", controller_coalesce_seconds())


automation_sensor = dg.AutomationConditionSensorDefinition(
    "fleet_automation_sensor",
    target=dg.AssetSelection.groups("fleet"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Evaluates the fleet assets' automation conditions (global_prior follows domain_priors).",
)


def _every_domain(context: dg.ScheduleEvaluationContext, prefix: str) -> list[dg.RunRequest]:
    domains = context.instance.get_dynamic_partitions(domain_partitions.name)
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M") if context.scheduled_execution_time else "now"
    return [dg.RunRequest(run_key=f"{prefix}:{d}:{stamp}", partition_key=d) for d in domains]


@dg.schedule(cron_schedule="0 2 * * *", job_name="domain_refresh_job", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Nightly: every domain's full refresh (learning, priors, controller, diagnostics).")
def nightly_domain_refresh(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    return _every_domain(context, "nightly")


@dg.schedule(cron_schedule="30 3 * * *", job_name="fleet_refresh_job", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Nightly full meta analysis: global prior and config proposals over the fresh diagnostics.")
def nightly_fleet_analysis(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_key=f"fleet:{context.scheduled_execution_time:%Y%m%dT%H%M}")


@dg.schedule(cron_schedule="15 */6 * * *", job=priors_job, execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING,
             description="Priors refresh every 6 hours: each domain's knob prior; the global prior follows.")
def priors_refresh(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    return _every_domain(context, "priors")
