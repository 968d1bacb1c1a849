"""Test-only: the repo's learning assets as a job on the dagster-celery executor.

The Celery worker imports this module by name (`meta_pipeline_tests.support.celery_defs`,
from the repo root on its PYTHONPATH) to rebuild the job for each step it runs, so it holds
only module-level factories. The Celery job's store URL is META_PIPELINE_DB_URL of the
process that builds the job: the worker (every step) and the orchestrating process; the
in-process reference run gets its store passed in. `python -m
meta_pipeline_tests.support.celery_defs` orchestrates the Celery runs in a process of their
own (see run_domains).
"""

from __future__ import annotations

import os

import dagster as dg
from dagster_celery import celery_executor

# at module level on purpose: the worker imports this module (-i) before its pool forks,
# so every pool process starts with the code location already loaded
from meta_pipeline.definitions import defs as repo_defs
from meta_pipeline.store import MetaStore

MODULE = "meta_pipeline_tests.support.celery_defs"  # what the worker imports (-i) and `python -m` runs
STORE_KEY = "store"  # the resource key the assets ask for
CELERY_JOB_NAME = "learning_celery_job"
IN_PROCESS_JOB_NAME = "learning_in_process_job"
# The assets under test: the same selection as the repo's learning_job.
LEARNING_SELECTION = dg.AssetSelection.groups("learning")


def learning_defs(job_name: str, executor_def: dg.ExecutorDefinition, store: MetaStore) -> dg.Definitions:
    """The repo's assets and checks, one job over the learning group, a given store."""
    job = dg.define_asset_job(job_name, selection=LEARNING_SELECTION, executor_def=executor_def)
    return dg.Definitions(assets=repo_defs.assets, asset_checks=repo_defs.asset_checks, jobs=[job],
                          resources={**(repo_defs.resources or {}), STORE_KEY: store})


def learning_celery_job() -> dg.JobDefinition:
    """Reconstructed by the Celery worker for every step: the store URL comes from its environment."""
    store = MetaStore(db_url=os.environ["META_PIPELINE_DB_URL"])
    return learning_defs(CELERY_JOB_NAME, celery_executor, store).resolve_job_def(CELERY_JOB_NAME)


def learning_in_process_job(store: MetaStore) -> dg.JobDefinition:
    """The same assets, in process, on a given store: the reference the Celery run must match."""
    return learning_defs(IN_PROCESS_JOB_NAME, dg.in_process_executor, store).resolve_job_def(IN_PROCESS_JOB_NAME)


def run_domains(run_config_path: str, domains: list[str]) -> int:
    """One Celery run per domain on the instance at DAGSTER_HOME; prints a JSON line per run.

    The test runs this as its own process, so a run that never finishes (a dead worker, a
    lost broker) can be stopped on a deadline instead of hanging the test session.
    """
    import json
    from pathlib import Path

    # the job must be reconstructed by module name, never as __main__, so the worker can import it
    from meta_pipeline_tests.support.celery_defs import learning_celery_job

    run_config = json.loads(Path(run_config_path).read_text())
    recon = dg.reconstructable(learning_celery_job)
    failures = 0
    with dg.DagsterInstance.get() as instance:
        for domain in domains:
            result = dg.execute_job(recon, instance=instance, run_config=run_config,
                                    tags={"dagster/partition": domain})
            failures += not result.success
            print(json.dumps({"domain": domain, "run_id": result.run_id, "success": result.success}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    sys.exit(run_domains(sys.argv[1], sys.argv[2:]))
