"""The source assets of a domain: its validated trades and telemetry.

Files arrive through `meta-pipeline ingest` or the inbox sensor; either way the same
ingest core validates them, quarantines bad rows and upserts the good ones. The
assets summarise what a domain holds now (and ingest any files named in run config).
"""


from pathlib import Path

import dagster as dg

from meta_pipeline.contracts import ContractError, validate_domain
from meta_pipeline.ingest import InboxFile, IngestReport, ingest_file, ingest_inbox_file
from meta_pipeline.defs.resources import StoreParam, domain_partitions, partition_domain, table_preview


class IngestFilesConfig(dg.Config):
    """Files to ingest before summarising (the inbox sensor fills this in)."""

    files: list[str] = []
    move_processed: bool = True


def _ingest_configured_files(
    context: dg.AssetExecutionContext, store: StoreParam, kind: str, domain: str, config: IngestFilesConfig
) -> list[IngestReport]:
    reports = []
    for name in config.files:
        path = Path(name)
        try:
            if config.move_processed:
                st = path.stat()
                report = ingest_inbox_file(store, InboxFile(domain, kind, path, st.st_size, st.st_mtime_ns))
            else:
                report = ingest_file(store, kind, path, domain)
        except (ContractError, FileNotFoundError) as exc:
            # the file is rejected whole and recorded in quarantine; the run says so and fails
            raise dg.Failure(description=f"{path.name}: {exc}") from exc
        context.log.info(report.summary())
        reports.append(report)
    return reports


def _quarantine_count(store: StoreParam, domain: str, kind: str) -> int:
    return store.count("quarantine", domain, equals={"kind": kind})


@dg.asset(
    partitions_def=domain_partitions,
    group_name="ingest",
    kinds={"sql", "pandas"},
    description="The validated closed trades of a domain (source tables trades, trade_patterns, trade_scope, trade_metrics).",
)
def trades(context: dg.AssetExecutionContext, config: IngestFilesConfig, store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    reports = _ingest_configured_files(context, store, "trades", domain, config)
    frame = store.read("trades", domain=domain, columns=["trade_id", "closed_at", "regime", "strategy_id", "return_r"])
    n_patterns = store.count("trade_patterns", domain)
    by_regime = frame.groupby("regime")["return_r"].agg(["count", "mean"]).reset_index() if len(frame) else frame
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(frame)),
            "pattern_rows": dg.MetadataValue.int(n_patterns),
            "quarantined_total": dg.MetadataValue.int(_quarantine_count(store, domain, "trades")),
            "ingested_this_run": dg.MetadataValue.int(sum(r.ingested for r in reports)),
            "quarantined_this_run": dg.MetadataValue.int(sum(r.quarantined for r in reports)),
            "files_this_run": dg.MetadataValue.json([r.source_file for r in reports]),
            "first_closed_at": dg.MetadataValue.text(str(frame["closed_at"].min()) if len(frame) else "-"),
            "last_closed_at": dg.MetadataValue.text(str(frame["closed_at"].max()) if len(frame) else "-"),
            "by_regime": table_preview(by_regime),
        }
    )


@dg.asset(
    partitions_def=domain_partitions,
    group_name="ingest",
    kinds={"sql", "pandas"},
    description="The engine telemetry of a domain (one row per decision tick, with the knobs in effect).",
)
def telemetry(context: dg.AssetExecutionContext, config: IngestFilesConfig, store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    reports = _ingest_configured_files(context, store, "telemetry", domain, config)
    frame = store.read("telemetry", domain=domain, columns=["ts", "gain_p50", "stability_mean"])
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(frame)),
            "quarantined_total": dg.MetadataValue.int(_quarantine_count(store, domain, "telemetry")),
            "ingested_this_run": dg.MetadataValue.int(sum(r.ingested for r in reports)),
            "quarantined_this_run": dg.MetadataValue.int(sum(r.quarantined for r in reports)),
            "last_ts": dg.MetadataValue.text(str(frame["ts"].max()) if len(frame) else "-"),
        }
    )


@dg.asset_check(asset=trades, blocking=True, description="Every trade has at least one pattern and ids are unique.")
def trades_are_well_formed(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    domain = context.op_execution_context.partition_key if context.op_execution_context.has_partition_key else None
    found = store.trade_integrity(validate_domain(domain) if domain else None)
    return dg.AssetCheckResult(passed=not any(found.values()), metadata=found)
