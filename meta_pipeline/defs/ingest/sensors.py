"""The inbox sensor: files dropped in data/inbox/<domain>/<trades|telemetry>/ get ingested.

One run per (domain, kind) batch of files; the run key names the exact files (name,
size, mtime), so a batch triggers exactly one run even if the sensor ticks again
before the run has moved the files away. A new domain registers its partition in
the same tick. A folder whose name is not a valid domain is refused: its files are
quarantined whole and moved to rejected/, so nothing waits silently.
"""

import hashlib
from collections import defaultdict

import dagster as dg

from meta_pipeline.contracts import ContractError, validate_domain
from meta_pipeline.defs.ingest.assets import telemetry, trades
from meta_pipeline.ingest import REJECTED_DIR, _move, quarantine_whole_file, scan_inbox
from meta_pipeline.paths import inbox_dir
from meta_pipeline.defs.resources import StoreParam, domain_partitions

ingest_trades_job = dg.define_asset_job("ingest_trades_job", selection=[trades])
ingest_telemetry_job = dg.define_asset_job(
    "ingest_telemetry_job", selection=[telemetry]
)


def inbox_run_requests(context: dg.SensorEvaluationContext, store: StoreParam, inbox) -> dg.SensorResult:
    batches: dict[tuple[str, str], list] = defaultdict(list)
    for item in scan_inbox(inbox):
        try:
            validate_domain(item.domain)
        except ContractError as exc:
            quarantine_whole_file(store, item.kind, item.path, item.domain, str(exc))
            _move(item.path, item.path.parent / REJECTED_DIR)
            context.log.warning(f"refused {item.path}: {exc}")
            continue
        batches[(item.domain, item.kind)].append(item)

    known = set(context.instance.get_dynamic_partitions(domain_partitions.name))
    new_domains = sorted({domain for domain, _ in batches} - known)
    run_requests = []
    for (domain, kind), items in sorted(batches.items()):
        keys = "\n".join(sorted(i.run_key for i in items))
        run_key = f"inbox:{domain}:{kind}:" + hashlib.sha256(keys.encode()).hexdigest()[:16]
        asset_name = "trades" if kind == "trades" else "telemetry"
        run_requests.append(
            dg.RunRequest(
                run_key=run_key,
                job_name=ingest_trades_job.name if kind == "trades" else ingest_telemetry_job.name,
                partition_key=domain,
                run_config={"ops": {asset_name: {"config": {"files": [str(i.path) for i in items]}}}},
                tags={"meta_pipeline/source": "inbox"},
            )
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[domain_partitions.build_add_request(new_domains)] if new_domains else [],
    )


@dg.sensor(
    jobs=[ingest_trades_job, ingest_telemetry_job],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Ingest files dropped into data/inbox/<domain>/<trades|telemetry>/.",
)
def inbox_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    return inbox_run_requests(context, store, inbox_dir())
