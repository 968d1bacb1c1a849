"""The source assets of a domain: its validated trades and telemetry.

Files arrive through `meta-pipeline ingest` or the inbox sensor; either way the same
ingest core validates them, quarantines bad rows and upserts the good ones. Each file of
a run stands alone: one refused whole (unreadable, wrong columns, a symlink) is moved to
rejected/ with a reason file and recorded, and the others still land. The
assets summarise what a domain holds now (and ingest any files named in run config).
"""


from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from meta_pipeline.contracts import ContractError, validate_domain
from meta_pipeline.ingest import (
    STORE_UNAVAILABLE,
    InboxFile,
    InboxFileRejected,
    IngestReport,
    ingest_file,
    ingest_inbox_file,
    quarantine_whole_file,
    rejection_reason,
    safe_text,
)
from meta_pipeline.defs.resources import StoreParam, domain_partitions, partition_domain, table_preview


class IngestFilesConfig(dg.Config):
    """Files to ingest before summarising (the inbox sensor fills this in)."""

    files: list[str] = []
    move_processed: bool = True


@dataclass
class IngestedFiles:
    """What the configured files of one run came to."""

    reports: list[IngestReport] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # file, reason, moved_to
    missing: list[str] = field(default_factory=list)  # named in config, gone (e.g. an earlier attempt moved it)


def _ingest_configured_files(
    context: dg.AssetExecutionContext, store: StoreParam, kind: str, domain: str, config: IngestFilesConfig
) -> IngestedFiles:
    """Ingest each configured file on its own: a file refused whole is moved aside and recorded
    (``ingest_inbox_file``) and the others still land. The run fails only when files were named
    and none landed because every one was refused; an error of the store itself (connection,
    lock timeout) fails it at once, leaving the remaining files in the inbox for the next batch."""
    done = IngestedFiles()
    for name in config.files:
        path = Path(name)
        try:
            if config.move_processed:
                st = path.lstat()
                report = ingest_inbox_file(store, InboxFile(domain, kind, path, st.st_size, st.st_mtime_ns))
            else:
                report = _ingest_in_place(store, kind, path, domain)
        except FileNotFoundError:
            context.log.warning(f"{safe_text(path)}: no longer there (already ingested or moved by an earlier "
                                "attempt?): skipped")
            done.missing.append(safe_text(path))
            continue
        except InboxFileRejected as exc:
            where = safe_text(exc.moved_to) if exc.moved_to is not None else "(left in place)"
            context.log.warning(f"rejected {safe_text(path.name)}: {exc.reason} (moved to {where}; quarantine line 0)")
            done.rejected.append({"file": safe_text(path), "reason": exc.reason, "moved_to": where})
            continue
        context.log.info(report.summary())
        done.reports.append(report)
    if done.rejected and not done.reports:
        names = "; ".join(f"{Path(r['file']).name}: {r['reason']}" for r in done.rejected)
        raise dg.Failure(
            description=f"nothing ingested: every file was refused whole ({names}); each is recorded in "
                        "quarantine (line 0) and an inbox file was moved to rejected/ with a .reason.txt beside it",
            metadata={"rejected_this_run": dg.MetadataValue.json(done.rejected)},
        )
    return done


def _ingest_in_place(store: StoreParam, kind: str, path: Path, domain: str) -> IngestReport:
    """A file outside the inbox (``move_processed: false``): ingested where it is; refused whole, it is
    recorded in quarantine and left in place."""
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(str(path))
    try:
        if path.is_symlink():
            raise ContractError("a symbolic link: never followed")
        return ingest_file(store, kind, path, domain)
    except STORE_UNAVAILABLE:
        raise
    except Exception as exc:  # noqa: BLE001 - any error reading the file refuses the file, not the run
        reason = rejection_reason(exc)
        quarantine_whole_file(store, kind, path, domain, reason)
        raise InboxFileRejected(path, reason, None) from exc


def _run_metadata(done: IngestedFiles) -> dict[str, dg.MetadataValue]:
    return {
        "ingested_this_run": dg.MetadataValue.int(sum(r.ingested for r in done.reports)),
        "quarantined_this_run": dg.MetadataValue.int(sum(r.quarantined for r in done.reports)),
        "files_this_run": dg.MetadataValue.json([r.source_file for r in done.reports]),
        "rejected_files_this_run": dg.MetadataValue.int(len(done.rejected)),
        "rejected_this_run": dg.MetadataValue.json(done.rejected),
        "missing_files_this_run": dg.MetadataValue.json(done.missing),
    }


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
    done = _ingest_configured_files(context, store, "trades", domain, config)
    frame = store.read("trades", domain=domain, columns=["trade_id", "closed_at", "regime", "strategy_id", "return_r"])
    n_patterns = store.count("trade_patterns", domain)
    by_regime = frame.groupby("regime")["return_r"].agg(["count", "mean"]).reset_index() if len(frame) else frame
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(frame)),
            "pattern_rows": dg.MetadataValue.int(n_patterns),
            "quarantined_total": dg.MetadataValue.int(_quarantine_count(store, domain, "trades")),
            **_run_metadata(done),
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
    done = _ingest_configured_files(context, store, "telemetry", domain, config)
    frame = store.read("telemetry", domain=domain, columns=["ts", "gain_p50", "stability_mean"])
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(frame)),
            "quarantined_total": dg.MetadataValue.int(_quarantine_count(store, domain, "telemetry")),
            **_run_metadata(done),
            "last_ts": dg.MetadataValue.text(str(frame["ts"].max()) if len(frame) else "-"),
        }
    )


@dg.asset_check(asset=trades, blocking=True, description="Every trade has at least one pattern and ids are unique.")
def trades_are_well_formed(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    domain = context.op_execution_context.partition_key if context.op_execution_context.has_partition_key else None
    found = store.trade_integrity(validate_domain(domain) if domain else None)
    return dg.AssetCheckResult(passed=not any(found.values()), metadata=found)
