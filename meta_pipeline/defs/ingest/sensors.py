"""The inbox sensor: files dropped in data/inbox/<domain>/<trades|telemetry>/ get ingested.

One run per (domain, kind) batch of files; the run key names the exact files (name,
size, mtime), so a batch triggers exactly one run even if the sensor ticks again
before the run has moved the files away. A new domain registers its partition in
the same tick. Nothing waits silently:

* a folder whose name is not a valid domain is refused: its files are quarantined whole
  and moved to its rejected/ with a reason file;
* anything misplaced (a file directly in the inbox or a domain folder, a file in another
  or deeper folder, a wrong suffix, a hidden file, a symlink — never followed) is moved
  to ``<inbox>/rejected/<its path>`` with ``<name>.reason.txt`` and a quarantine row.
  A symlink goes at once; anything else once it has not changed for
  ``MISPLACED_GRACE_SECONDS`` (an upload in progress is not pulled away), and until then
  every tick names it (a warning, and the skip message of a tick that requests nothing).

A file that cannot be read is refused by the run that ingests it (defs/ingest/assets.py),
without holding back the other files of its batch.
"""

import hashlib
import time
from collections import defaultdict
from pathlib import Path

import dagster as dg

from meta_pipeline.contracts import ContractError, validate_domain
from meta_pipeline.defs.ingest.assets import telemetry, trades
from meta_pipeline.defs.ingest.governance_inputs import GOVERNANCE_INBOX_RUNS
from meta_pipeline.ingest import (
    MISPLACED_GRACE_SECONDS,
    REJECTED_DIR,
    _move,
    _write_reason,
    quarantine_whole_file,
    refuse_misplaced,
    safe_text,
    scan_inbox_entries,
)
from meta_pipeline.paths import inbox_dir
from meta_pipeline.defs.resources import StoreParam, domain_partitions

ingest_trades_job = dg.define_asset_job("ingest_trades_job", selection=[trades])
ingest_telemetry_job = dg.define_asset_job(
    "ingest_telemetry_job", selection=[telemetry]
)
MAX_NAMED = 10  # refused / waiting entries named in a tick's skip message


def inbox_run_requests(
    context: dg.SensorEvaluationContext,
    store: StoreParam,
    inbox,
    misplaced_grace: float = MISPLACED_GRACE_SECONDS,
) -> dg.SensorResult:
    inbox = Path(inbox)
    scan = scan_inbox_entries(inbox)
    notes: list[str] = []  # what this tick refused or is waiting on, for the tick's skip message

    now = time.time()
    for entry in scan.misplaced:
        shown = safe_text(entry.path.relative_to(inbox))
        if not entry.ready(now, misplaced_grace):
            left = misplaced_grace - (now - entry.mtime)
            message = (f"misplaced {shown}: {entry.reason} (moved to <inbox>/{REJECTED_DIR}/ if unchanged "
                       f"for {max(left, 0):.0f} s more)")
            context.log.warning(message)
            notes.append(message)
            continue
        moved = refuse_misplaced(store, inbox, entry)
        if moved is not None:
            message = f"refused {shown}: {entry.reason} (moved to {safe_text(moved.relative_to(inbox))})"
            context.log.warning(message)
            notes.append(message)

    batches: dict[tuple[str, str], list] = defaultdict(list)
    for item in scan.files:
        try:
            validate_domain(item.domain)
        except ContractError as exc:
            quarantine_whole_file(store, item.kind, item.path, item.domain, str(exc))
            moved = _move(item.path, item.path.parent / REJECTED_DIR)
            _write_reason(moved, str(exc))  # (made valid UTF-8 there)
            message = f"refused {safe_text(item.path.relative_to(inbox))}: {safe_text(exc)}"
            context.log.warning(message)
            notes.append(message)
            continue
        batches[(item.domain, item.kind)].append(item)

    known = set(context.instance.get_dynamic_partitions(domain_partitions.name))
    new_domains = sorted({domain for domain, _ in batches} - known)
    run_requests = []
    for (domain, kind), items in sorted(batches.items()):
        keys = "\n".join(sorted(i.run_key for i in items))
        run_key = f"inbox:{domain}:{kind}:" + hashlib.sha256(keys.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        asset_name = "trades" if kind == "trades" else "telemetry"
        job_name = ingest_trades_job.name if kind == "trades" else ingest_telemetry_job.name
        if kind in GOVERNANCE_INBOX_RUNS:  # backtests/, configs/ (defs/ingest/governance_inputs.py)
            job_name, asset_name = GOVERNANCE_INBOX_RUNS[kind][0].name, GOVERNANCE_INBOX_RUNS[kind][1]
        run_requests.append(
            dg.RunRequest(
                run_key=run_key,
                job_name=job_name,
                partition_key=domain,
                run_config={"ops": {asset_name: {"config": {"files": [str(i.path) for i in items]}}}},
                tags={"meta_pipeline/source": "inbox"},
            )
        )
    skip_reason = None
    if not run_requests and notes:
        more = f"; and {len(notes) - MAX_NAMED} more" if len(notes) > MAX_NAMED else ""
        skip_reason = "no inbox files to ingest; " + "; ".join(notes[:MAX_NAMED]) + more
    return dg.SensorResult(
        run_requests=run_requests,
        skip_reason=skip_reason,
        dynamic_partitions_requests=[domain_partitions.build_add_request(new_domains)] if new_domains else [],
    )


@dg.sensor(
    jobs=[ingest_trades_job, ingest_telemetry_job, *(job for job, _ in GOVERNANCE_INBOX_RUNS.values())],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Ingest files dropped into data/inbox/<domain>/<trades|telemetry>/; anything misplaced "
        "(wrong folder or suffix, hidden, a symlink) is moved to data/inbox/rejected/ with a reason file."
    ),
)
def inbox_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    return inbox_run_requests(context, store, inbox_dir())
