"""The governance inputs of a domain as source assets: its backtest runs and the engine configs
a user brings (``meta-pipeline ingest backtests|configs``, or the inbox folders
``<inbox>/<domain>/backtests/`` and ``<inbox>/<domain>/configs/``).

Same path as trades: each configured file is validated, bad rows are quarantined, a file
refused whole is moved to rejected/ with a reason file (``_ingest_configured_files``).
Diagnostics read ``backtest_runs``; proposals and every consumer read ``configs``.
"""

import dagster as dg

from meta_pipeline.defs.ingest.assets import IngestFilesConfig, _ingest_configured_files, _quarantine_count, _run_metadata
from meta_pipeline.defs.resources import StoreParam, domain_partitions, partition_domain, table_preview


@dg.asset(
    partitions_def=domain_partitions,
    group_name="ingest",
    kinds={"sql", "pandas"},
    description="A domain's backtest runs (table backtest_runs): per strategy (× regime) mean, sd and n of return_r.",
)
def backtest_runs(context: dg.AssetExecutionContext, config: IngestFilesConfig, store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    done = _ingest_configured_files(context, store, "backtests", domain, config)
    frame = store.read("backtest_runs", domain=domain, columns=["run_id", "strategy_id", "regime", "started_at"])
    return dg.MaterializeResult(metadata={
        "dagster/row_count": dg.MetadataValue.int(len(frame)),
        "strategies": dg.MetadataValue.int(int(frame["strategy_id"].nunique()) if len(frame) else 0),
        "quarantined_total": dg.MetadataValue.int(_quarantine_count(store, domain, "backtests")),
        **_run_metadata(done),
    })


@dg.asset(
    partitions_def=domain_partitions,
    group_name="ingest",
    kinds={"sql", "pandas"},
    description=("Engine configs a user brings for a domain (STRATEGY_CONFIG <domain>/<strategy>, META_KNOBS, "
                 "PM_OVERRIDES): each file row becomes a configs version, the latest valid_from active."),
)
def engine_configs(context: dg.AssetExecutionContext, config: IngestFilesConfig, store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    done = _ingest_configured_files(context, store, "configs", domain, config)
    active = store.read("configs", columns=["target_type", "target_id", "version", "created_by"], equals={"active": True})
    mine = active[(active["target_id"] == domain) | active["target_id"].str.startswith(f"{domain}/")]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": dg.MetadataValue.int(len(mine)),
        "quarantined_total": dg.MetadataValue.int(_quarantine_count(store, domain, "configs")),
        **_run_metadata(done),
        "active_configs": table_preview(mine),
    })


ingest_backtests_job = dg.define_asset_job("ingest_backtests_job", selection=[backtest_runs])
ingest_configs_job = dg.define_asset_job("ingest_configs_job", selection=[engine_configs])
# inbox kind folder -> (job, asset) of the run that ingests its files (defs/ingest/sensors.py)
GOVERNANCE_INBOX_RUNS = {"backtests": (ingest_backtests_job, "backtest_runs"),
                         "configs": (ingest_configs_job, "engine_configs")}
