"""Sensors and schedules that keep the fleet's assets current.

* new trades for a domain      -> the learning assets of that partition, then override_feedback
* a drift event                -> a re-learn of its domain (drift_sensor, defs/learning/feedback.py)
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
inbox, runtime writes) appends to in the same transaction as its rows. Their cursor is
(last batch id, last ingested_at) and only ever moves forward; run keys name the batch
id AND its timestamp, so a batch triggers exactly one run, a daemon restart misses
nothing, and even a store that was reset (ids reused) cannot collide with old keys.
"""

import json
from dataclasses import dataclass

import dagster as dg
import pandas as pd

from meta_pipeline.contracts import DOMAIN_RE
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
    """Batches past the cursor by id OR by time (a reset store restarts ids, not the clock)."""
    return store.batches_after(kind, cursor.last_id, cursor.last_ingested_at or None)


def plan_batch_runs(batches: pd.DataFrame, cursor: BatchCursor, prefix: str) -> tuple[list[dg.RunRequest], BatchCursor, list[str]]:
    """One run per domain with new batches; the cursor only moves forward.

    Returns (run requests, new cursor, domains whose names are not valid partition keys).
    """
    if batches.empty:
        return [], cursor, []
    requests, invalid = [], []
    for domain, group in batches.groupby("domain", sort=True):
        if not DOMAIN_RE.fullmatch(str(domain)):
            invalid.append(str(domain))
            continue
        newest = group.iloc[-1]
        stamp = pd.Timestamp(newest["ingested_at"]).strftime("%Y%m%dT%H%M%S%f")
        requests.append(
            dg.RunRequest(
                run_key=f"{prefix}:{domain}:{int(newest['id'])}:{stamp}",
                partition_key=str(domain),
                tags={"meta_pipeline/batches": ",".join(str(i) for i in group["id"].tolist()[-20:])},
            )
        )
    newest_ts = pd.Timestamp(batches["ingested_at"].max()).isoformat()
    moved = BatchCursor(
        last_id=max(cursor.last_id, int(batches["id"].max())),
        last_ingested_at=max(cursor.last_ingested_at, newest_ts) if cursor.last_ingested_at else newest_ts,
    )
    return requests, moved, invalid


def _batch_sensor_result(context: dg.SensorEvaluationContext, store: StoreParam, kind: str, prefix: str) -> dg.SensorResult:
    cursor = BatchCursor.parse(context.cursor)
    requests, moved, invalid = plan_batch_runs(new_batches(store, kind, cursor), cursor, prefix)
    for name in invalid:
        context.log.warning(f"ignored batches for invalid domain name {name!r}")
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
    description="New trades for a domain -> its learning assets (one run per domain per batch).",
)
def new_trades_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    return _batch_sensor_result(context, store, "trades", "learn")


@dg.sensor(
    job=controller_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New telemetry for a domain -> its integrative update (controller_state).",
)
def new_telemetry_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    return _batch_sensor_result(context, store, "telemetry", "control")


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
