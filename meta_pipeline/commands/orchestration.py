"""The CLI's bridge to Dagster: the instance, domain and task partitions, and running jobs in process.

The CLI and `dagster dev` share one DAGSTER_HOME (see paths.dagster_home), so a domain
registered here shows up in the UI and in `dagster asset materialize --partition`.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from meta_pipeline.commands.errors import UserError
from meta_pipeline.contracts import validate_domain, validate_task
from meta_pipeline.defs.resources import STORE_KEY, StoreResource, domain_partitions, task_partitions
from meta_pipeline.ingest import IngestReport
from meta_pipeline.paths import ensure_dagster_home
from meta_pipeline.store import MetaStore

DOMAIN_JOB = "domain_refresh_job"
# CLI runs log warnings and errors only; the full event log is in the UI either way.
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
FLEET_JOB = "fleet_refresh_job"


def absolute_dagster_home() -> None:
    """A relative DAGSTER_HOME made absolute (against the cwd now): DagsterInstance refuses a relative one,
    and every process the CLI starts must find the same folder."""
    env = os.environ.get("DAGSTER_HOME")
    if env and not Path(env).is_absolute():
        os.environ["DAGSTER_HOME"] = str(Path(os.path.expanduser(env)).resolve())


def get_instance() -> dg.DagsterInstance:
    absolute_dagster_home()
    try:
        home = ensure_dagster_home()
    except OSError as exc:
        raise UserError(f"DAGSTER_HOME {os.environ.get('DAGSTER_HOME') or exc.filename}",
                        f"cannot create it ({exc.strerror or exc})", "point DAGSTER_HOME at a writable folder") from exc
    os.environ["DAGSTER_HOME"] = str(Path(home).resolve())
    return dg.DagsterInstance.get()


def register_domains(instance: dg.DagsterInstance, domains: list[str]) -> list[str]:
    """Add domain partitions that do not exist yet; returns the new ones."""
    for d in domains:
        validate_domain(d)
    known = set(instance.get_dynamic_partitions(domain_partitions.name))
    new = sorted(set(domains) - known)
    if new:
        instance.add_dynamic_partitions(domain_partitions.name, new)
    return new


def report_ingest(instance: dg.DagsterInstance, report: IngestReport) -> None:
    """Record a CLI ingest as a materialization of the domain's source asset, visible in the UI."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=report.kind,
            partition=report.domain,
            description=f"ingested by meta-pipeline ingest from {report.source_file}",
            metadata={**report.as_metadata(), "source_file": report.source_file},
        )
    )


def load_defs() -> dg.Definitions:
    from meta_pipeline.definitions import defs

    return defs


def with_store(defs: dg.Definitions, store: MetaStore) -> dg.Definitions:
    """The same definitions bound to a specific store (e.g. --db-url).

    Definitions.merge refuses two different resources under one key, so rebuild with the
    store swapped.
    """
    return dg.Definitions(
        assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, schedules=defs.schedules,
        sensors=defs.sensors, executor=defs.executor, loggers=defs.loggers, metadata=defs.metadata,
        component_tree=defs.component_tree, resources={**(defs.resources or {}), STORE_KEY: StoreResource(db_url=store.db_url)},
    )


def run_domain_job(
    instance: dg.DagsterInstance, domain: str, store: MetaStore | None = None, job_name: str = DOMAIN_JOB
) -> dg.ExecuteInProcessResult:
    """Materialize every per-domain asset for one domain, in this process, on the shared instance."""
    defs = load_defs() if store is None else with_store(load_defs(), store)
    job = defs.resolve_job_def(job_name)
    return job.execute_in_process(
        partition_key=validate_domain(domain), instance=instance, raise_on_error=False, run_config=QUIET_RUN_CONFIG
    )


def run_fleet_job(instance: dg.DagsterInstance, store: MetaStore | None = None) -> dg.ExecuteInProcessResult:
    defs = load_defs() if store is None else with_store(load_defs(), store)
    return defs.resolve_job_def(FLEET_JOB).execute_in_process(
        instance=instance, raise_on_error=False, run_config=QUIET_RUN_CONFIG
    )


def register_tasks(instance: dg.DagsterInstance, tasks: list[str]) -> list[str]:
    """Add task partitions (generic feedback, prompt evolution) that do not exist yet; returns the new ones."""
    for t in tasks:
        validate_task(t)
    known = set(instance.get_dynamic_partitions(task_partitions.name))
    new = sorted(set(tasks) - known)
    if new:
        instance.add_dynamic_partitions(task_partitions.name, new)
    return new
