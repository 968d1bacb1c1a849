"""End to end through a real `dagster dev`: sensors launch runs, a GraphQL backfill recomputes the fleet.

What a user does, with real processes: the webserver, the daemon, the code server and one
run worker per run (default run launcher, queued run coordinator capped at two runs by
the repo's dagster.yaml). Only the DAGSTER_HOME, the data store (SQLite) and the inbox
are temporary. The flow:

1. Before `dagster dev` starts, domain `alpha` lands in the store the way a runtime writes it
   (ingest core, no Dagster call): batches that land while the daemon is down must still
   trigger runs when it comes up, and the data sensors must register the new partition.
2. With `dagster dev` running, a NEW domain `beta` arrives: its trades file is dropped into
   the inbox (inbox_sensor -> ingest_trades_job, which registers the partition), its
   telemetry goes through `meta-pipeline ingest` (the CLI path).
3. The data sensors launch the learning assets (new trades) and the controller (new
   telemetry) for both domains; every run must SUCCEED, and each batch triggers exactly one.
4. A backfill over every known domain is launched through GraphQL (`launchPartitionBackfill`
   on domain_refresh_job) and must complete; then every per-domain table holds rows for
   every domain.
5. Teardown stops every process of this test; none may be left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from meta_pipeline.defs.jobs import PER_DOMAIN_GROUPS
from meta_pipeline.commands.graphql import launch_partition_backfill
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore
from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_telemetry_file, write_trades_file
from meta_pipeline_tests.support.e2e import (
    DagsterDev,
    E2EEnvironment,
    job_partitions,
    last_finished_sensor_tick,
    list_runs,
    make_environment,
    marked_pids,
    poll,
    repository_view,
    running_dagster_dev,
)

pytestmark = [
    pytest.mark.slow,
    # dagster-graphql's client calls gql with arguments newer gql deprecates (not ours to fix)
    pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning"),
]

OLD_DOMAIN, NEW_DOMAIN = "alpha", "beta"
DOMAINS = (OLD_DOMAIN, NEW_DOMAIN)

# The per-domain table each partitioned asset writes (asset name -> table).
ASSET_TABLES = {
    "trades": "trades",
    "telemetry": "telemetry",
    "lessons": "learning_lessons",
    "edge_history": "learning_edge_history",
    "half_life_fits": "half_life_fits",
    "latent_factors": "latent_factors",
    "regime_weights": "learning_regime_weights",
    "pm_overrides": "pm_overrides",
    # one version only here: nothing to score yet, but the drift monitor's state row is written every run
    "override_feedback": "drift_monitor_state",
    "domain_priors": "domain_priors",
    "controller_state": "controller_state",
    "diagnostics": "diagnostics",
    # optional inputs: hold only what a user sends (this fleet sends no backtests or configs)
    "backtest_runs": "backtest_runs",
    "engine_configs": "configs",
}
OPTIONAL_INPUTS = {"backtest_runs", "engine_configs"}
# data sensor -> the job it launches per domain, and the table that proves the run did its work
DATA_SENSORS = {
    "new_trades_sensor": ("learning_on_new_trades_job", "learning_lessons"),
    "new_telemetry_sensor": ("controller_job", "controller_state"),
}
SENSOR_RUN_TIMEOUT = 150.0  # sensor intervals are 15-30 s in code, runs queue two at a time
BACKFILL_TIMEOUT = 150.0


def _write_inputs(folder: Path) -> dict[str, dict[str, Path]]:
    fleet = generate_fleet(FleetConfig(n_domains=2, n_trades=1500, telemetry_ticks=30, seed=11,
                                       domain_names=DOMAINS))
    return {
        name: {
            "trades": write_trades_file(data.train_trades, folder / name / "trades.csv"),
            "telemetry": write_telemetry_file(data.telemetry, folder / name / "telemetry.csv"),
        }
        for name, data in fleet.domains.items()
    }


def _cli_ingest(env: E2EEnvironment, kind: str, path: Path, domain: str) -> None:
    done = env.run_cli("ingest", kind, str(path), "--domain", domain)
    assert done.returncode == 0, f"meta-pipeline ingest {kind} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def _drop_into_inbox(env: E2EEnvironment, domain: str, kind: str, source: Path) -> Path:
    """Atomically: a hidden temp name (the scanner skips dot-files), then rename into place."""
    folder = env.inbox / domain / kind
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{source.name}.part"
    staging.write_bytes(source.read_bytes())
    target = folder / source.name
    os.replace(staging, target)
    return target


def _statuses_by_partition(dev: DagsterDev, job_name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for run in list_runs(dev.url, job_name):
        out.setdefault(run.partition or "-", []).append(run.status)
    return out


def test_sensors_and_graphql_backfill_through_dagster_dev(tmp_path: Path) -> None:
    started = time.monotonic()
    env = make_environment(tmp_path)
    files = _write_inputs(tmp_path / "files")
    store = MetaStore(db_url=env.db_url)
    timings: dict[str, float] = {}

    # 1. a domain that landed while nothing was running (a runtime's write: store only)
    for kind in ("trades", "telemetry"):
        assert ingest_file(store, kind, files[OLD_DOMAIN][kind], OLD_DOMAIN).ingested > 0

    with running_dagster_dev(env) as dev:
        timings["dagster dev ready"] = time.monotonic() - started
        repo = repository_view(dev.url)
        for name in ("inbox_sensor", *DATA_SENSORS):
            assert repo.sensors.get(name) == "RUNNING", f"{name} must exist and run by default: {repo.sensors}"
        needed_jobs = {"ingest_trades_job", "domain_refresh_job", *(job for job, _ in DATA_SENSORS.values())}
        assert needed_jobs <= repo.jobs, f"jobs missing from the code location: {needed_jobs - repo.jobs}"

        # 2. a NEW domain: trades through the inbox, telemetry through the CLI
        t = time.monotonic()
        inbox_file = _drop_into_inbox(env, NEW_DOMAIN, "trades", files[NEW_DOMAIN]["trades"])
        _cli_ingest(env, "telemetry", files[NEW_DOMAIN]["telemetry"], NEW_DOMAIN)
        dev.wait_for_run("ingest_trades_job", NEW_DOMAIN, timeout=SENSOR_RUN_TIMEOUT)
        timings["inbox file -> ingest run done"] = time.monotonic() - t
        assert not inbox_file.exists() and (inbox_file.parent / "processed" / inbox_file.name).exists()
        assert store.count("trades", NEW_DOMAIN) > 0

        # 3. backfill every known domain through GraphQL, as the UI's "Materialize all" would;
        # launched now, so the daemon's 30 s backfill loop overlaps the sensor-launched runs
        def all_registered() -> list[str] | None:
            found = job_partitions(dev.url, "domain_refresh_job")
            return found if set(found) >= set(DOMAINS) else None

        domains = poll(all_registered, timeout=60, describe=lambda: f"partitions {DOMAINS} registered by the sensors")
        assert sorted(domains) == sorted(DOMAINS)
        backfill_launched = time.monotonic()
        backfill_id = launch_partition_backfill(dev.url, domains, job_name="domain_refresh_job", title="e2e test")

        # 4. data sensors -> learning / controller runs for both domains, each must succeed
        for job_name, table_name in DATA_SENSORS.values():
            for domain in DOMAINS:
                dev.wait_for_run(job_name, domain, timeout=SENSOR_RUN_TIMEOUT)
                assert store.count(table_name, domain) > 0, f"{job_name} for {domain} succeeded but {table_name} is empty"
        timings["sensor runs done"] = time.monotonic() - t

        backfill_runs = dev.wait_for_backfill(backfill_id, n_runs=len(domains), timeout=BACKFILL_TIMEOUT)
        timings["backfill done (from launch)"] = time.monotonic() - backfill_launched
        assert sorted(r.partition for r in backfill_runs) == sorted(domains)
        assert {r.job_name for r in backfill_runs} == {"domain_refresh_job"}

        # every per-domain table the backfill's assets write holds rows for every domain
        per_domain = sorted(a for a, g in repo.asset_groups.items()
                            if a in repo.partitioned_assets and g in PER_DOMAIN_GROUPS)
        unmapped = set(per_domain) - set(ASSET_TABLES)
        assert not unmapped, f"per-domain assets this test does not know the table of: {unmapped}"
        empty = [(ASSET_TABLES[a], d) for a in per_domain if a not in OPTIONAL_INPUTS for d in domains
                 if store.count(ASSET_TABLES[a], d) == 0]
        assert not empty, f"tables with no rows after the backfill: {empty}"

        # exactly one run per batch, checked once every sensor has evaluated again after its last run
        launches = {"inbox_sensor": "ingest_trades_job", **{s: job for s, (job, _) in DATA_SENSORS.items()}}

        def ticked_since_last_run() -> bool:
            return all((last_finished_sensor_tick(dev.url, sensor) or 0.0)
                       > max(r.creation_time for r in list_runs(dev.url, job)) for sensor, job in launches.items())

        poll(ticked_since_last_run, timeout=60, describe=lambda: "each sensor to tick again after its runs")
        assert _statuses_by_partition(dev, "ingest_trades_job") == {NEW_DOMAIN: ["SUCCESS"]}
        for job_name, _ in DATA_SENSORS.values():
            assert _statuses_by_partition(dev, job_name) == {d: ["SUCCESS"] for d in DOMAINS}, job_name

        print(f"\nper-domain assets checked: {per_domain}\ntimings: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))

    leftovers = marked_pids(env.marker)
    assert leftovers == [], f"processes of this test still alive after teardown: {leftovers}"
    print(f"total {time.monotonic() - started:.1f}s")
