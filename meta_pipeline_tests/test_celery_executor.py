"""Past one machine, for real: the learning assets on the dagster-celery executor.

Real pieces: a Celery worker process (`dagster-celery worker start`) on a loopback broker
(Redis, else RabbitMQ), the Dagster instance on PostgreSQL (dagster-postgres), the data
store on another PostgreSQL database. Each domain's learning pass runs with
`execute_job(reconstructable(...))` (in an orchestrating process of its own, stopped on a
deadline), every step shipped to the worker as a Celery task; the run's events must show
each step executed by the worker. The result must equal, row for row (floats allclose),
the same assets run in process on a separate fresh store: distribution changes where the
work runs, never what it computes.

Skipped, with the reason, when the optional `dist` extra is not installed (dagster-celery,
celery, dagster-postgres) or when no broker or no PostgreSQL server can be reached.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

_NEEDS_DIST = "needs the optional 'dist' extra (pip install -e '.[dist]')"
pytest.importorskip("celery", reason=f"celery not installed: {_NEEDS_DIST}")
pytest.importorskip("dagster_celery", reason=f"dagster-celery not installed: {_NEEDS_DIST}")
pytest.importorskip("dagster_postgres", reason=f"dagster-postgres (the instance's storage) not installed: {_NEEDS_DIST}")

from meta_pipeline.ingest import ingest_file  # noqa: E402 - after the extras are known to be there
from meta_pipeline.store import MetaStore, dispose_engines  # noqa: E402
from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_trades_file  # noqa: E402
from meta_pipeline_tests.support import celery_defs  # noqa: E402 - imports dagster_celery
from meta_pipeline_tests.support.code_location import asset_names  # noqa: E402
from meta_pipeline_tests.support.e2e import (  # noqa: E402
    REPO_ROOT,
    VENV_BIN,
    ManagedProcess,
    kill_marked,
    make_environment,
    marked_pids,
    poll,
)

pytestmark = [
    pytest.mark.slow,
    # dagster-celery re-creates its task per submitted step; Celery warns each time (harmless)
    pytest.mark.filterwarnings("ignore:Task name 'execute_plan' is already registered"),
]

DOMAINS = ("cel-a", "cel-b", "cel-c")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
CELERY_RUNS_TIMEOUT = 180.0  # three learning passes of ~15 s each, with room for a loaded machine
# learning asset -> the table it writes (which assets are learning assets: the definitions say)
LEARNING_TABLES = {
    "lessons": "learning_lessons",
    "edge_history": "learning_edge_history",
    "half_life_fits": "half_life_fits",
    "latent_factors": "latent_factors",
    "regime_weights": "learning_regime_weights",
    "pm_overrides": "pm_overrides",
}


# ---------------------------------------------------------------------------
# Services: a broker, fresh PostgreSQL databases
# ---------------------------------------------------------------------------


def _redis_broker() -> tuple[str | None, str]:
    """A Redis URL on an empty database number (highest first), or (None, why not)."""
    try:
        import redis
    except ImportError:
        return None, "redis: python package not installed"
    try:
        for db in range(15, 0, -1):
            if redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2).dbsize() == 0:
                return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", ""
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/15", ""  # all in use: our queue name is unique anyway
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return None, f"redis {REDIS_HOST}:{REDIS_PORT}: {type(exc).__name__}: {exc}"


def _amqp_broker() -> tuple[str | None, str]:
    try:
        from kombu import Connection

        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return AMQP_URL, ""
    except Exception as exc:  # noqa: BLE001
        return None, f"rabbitmq {AMQP_URL}: {type(exc).__name__}: {exc}"


@pytest.fixture
def celery_config() -> Iterator[dict]:
    """The celery executor's config: a reachable broker, its result backend, a queue of our own.

    The queue name is unique per test, so a concurrent test session on the same broker
    can never hand our steps to its worker (which would write to its own store).
    """
    broker, why_not_redis = _redis_broker()
    backend = broker
    if broker is None:
        broker, why_not_amqp = _amqp_broker()
        backend = "rpc://"
        if broker is None:
            pytest.skip(f"no Celery broker reachable: {why_not_redis} | {why_not_amqp}")
    queue = f"meta-pipeline-test-{uuid.uuid4().hex[:10]}"
    yield {"broker": broker, "backend": backend,
           "config_source": {"task_default_queue": queue, "result_expires": 600}}
    if broker.startswith("redis://"):
        _clean_redis(broker, queue)


KOMBU_SHARED_KEYS = {b"_kombu.binding.celery.pidbox", b"_kombu.binding.reply.celery.pidbox", b"_kombu.binding_deadlines"}


def _clean_redis(broker: str, queue: str) -> None:
    """Drop our queue's keys; leave the db as empty as we found it when nobody else uses it.

    Task results are left to expire (result_expires): a concurrent session on the same db
    may still be reading its own.
    """
    import redis

    client = redis.Redis.from_url(broker)
    ours = list(client.scan_iter(match=f"*{queue}*"))
    if ours:
        client.delete(*ours)
    others = {k for k in client.scan_iter(match="*") if not k.startswith(b"celery-task-meta-")}
    if others and others <= KOMBU_SHARED_KEYS:
        client.delete(*others)


@pytest.fixture
def fresh_pg_database(pg_admin_url: str) -> Iterator[Callable[[str], str]]:
    """make(label) -> the URL of a new, empty database; all of them dropped afterwards."""
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make(label: str) -> str:
        name = f"mp_celery_{label}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return f"{pg_admin_url.rsplit('/', 1)[0]}/{name}"

    yield make
    dispose_engines()
    with admin.connect() as conn:
        for name in made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# ---------------------------------------------------------------------------
# Comparing two stores
# ---------------------------------------------------------------------------


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in a deterministic order (by every non-float column, then floats), index reset."""
    keys = [c for c in frame.columns if not pd.api.types.is_float_dtype(frame[c])]
    floats = [c for c in frame.columns if c not in keys]
    ordered = frame.assign(**{c: frame[c].round(9) for c in floats})
    order = ordered.sort_values(keys + floats, kind="stable", na_position="first").index
    return frame.loc[order].reset_index(drop=True)


def assert_same_rows(table_name: str, domain: str, got: pd.DataFrame, expected: pd.DataFrame) -> None:
    where = f"{table_name}[{domain}]"
    assert list(got.columns) == list(expected.columns), where
    assert len(got) == len(expected), f"{where}: {len(got)} rows on Celery, {len(expected)} in process"
    got, expected = _canonical(got), _canonical(expected)
    for col in got.columns:
        a, b = got[col], expected[col]
        if pd.api.types.is_float_dtype(b):
            np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-9, atol=1e-12,
                                       equal_nan=True, err_msg=f"{where}.{col}")
        else:  # missing equals missing, whatever its spelling (None, NaN, pd.NA, NaT)
            left = a.astype(object).where(a.notna(), None).tolist()
            right = b.astype(object).where(b.notna(), None).tolist()
            bad = [(x, y) for x, y in zip(left, right) if x != y]
            assert not bad, f"{where}.{col}: {len(bad)} values differ, e.g. {bad[:3]}"


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------


def _load_trades(stores: list[MetaStore], files: dict[str, Path]) -> None:
    for store in stores:
        for domain, path in files.items():
            report = ingest_file(store, "trades", path, domain)
            assert report.ingested > 0 and report.quarantined == 0, report.summary()


def _dagster_postgres_url(url: str) -> str:
    """The instance's URL, pinned to psycopg2.

    SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, whose server-side binding breaks
    dagster-postgres's `NOTIFY run_events, :id` on every event write.
    """
    return url.replace("postgresql+psycopg://", "postgresql+psycopg2://", 1)


def _step_events(instance: dg.DagsterInstance, run_id: str) -> tuple[set[str], set[str], set[int]]:
    """(steps that succeeded, steps the Celery worker reported executing, pids that ran steps)."""
    succeeded, in_worker, pids = set(), set(), set()
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type_value == "STEP_SUCCESS":
            succeeded.add(event.step_key)
        if event.event_type_value == "STEP_START" and event.pid is not None:
            pids.add(event.pid)
        if event.event_type_value == "ENGINE_EVENT" and "in celery worker" in (event.message or ""):
            in_worker.add(event.step_key)
    return succeeded, in_worker, pids


def _run_in_process_reference(store: MetaStore) -> set[str]:
    """The learning job in this process, on its own store; returns the asset names it selects."""
    with dg.instance_for_test() as ephemeral:
        ephemeral.add_dynamic_partitions("domain", list(DOMAINS))
        job = celery_defs.learning_in_process_job(store)
        for domain in DOMAINS:
            assert job.execute_in_process(partition_key=domain, instance=ephemeral).success, domain
    return {k.to_user_string() for k in job.asset_layer.selected_asset_keys}


def test_learning_assets_on_celery_match_in_process(tmp_path: Path, celery_config: dict, fresh_pg_database) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}
    celery_store_url, reference_store_url = fresh_pg_database("store"), fresh_pg_database("reference")
    instance_url = _dagster_postgres_url(fresh_pg_database("instance"))
    celery_store, reference_store = MetaStore(db_url=celery_store_url), MetaStore(db_url=reference_store_url)

    # seed 11: every domain gets overrides at this size (the comparison then covers every table)
    fleet = generate_fleet(FleetConfig(n_domains=len(DOMAINS), n_trades=1500, telemetry_ticks=10, seed=11,
                                       domain_names=DOMAINS))
    files = {d: write_trades_file(data.train_trades, tmp_path / "files" / d / "trades.csv")
             for d, data in fleet.domains.items()}
    _load_trades([celery_store, reference_store], files)
    timings["setup"] = time.monotonic() - started

    instance_yaml = (f"storage:\n  postgres:\n    postgres_url: \"{instance_url}\"\n"
                     "telemetry:\n  enabled: false\n")
    env = make_environment(tmp_path, db_url=celery_store_url, instance_yaml=instance_yaml,
                           extra_env={"PYTHONPATH": str(REPO_ROOT)})
    worker_yaml = tmp_path / "celery_worker.yaml"
    worker_yaml.write_text(json.dumps({"execution": {"config": celery_config}}))  # JSON is YAML
    queue = celery_config["config_source"]["task_default_queue"]
    worker_name = f"mp-test-{uuid.uuid4().hex[:6]}"
    worker = ManagedProcess(
        name="celery worker",
        argv=[str(VENV_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
              "-y", str(worker_yaml), "-q", queue, "-n", worker_name,
              "-i", celery_defs.MODULE,  # imported before the pool forks
              "--", "--concurrency=2", "--without-gossip", "--without-mingle"],
        env=env.env, cwd=REPO_ROOT, log_path=tmp_path / "logs" / "celery_worker.log",
    )
    run_config_path = tmp_path / "celery_run_config.json"
    run_config_path.write_text(json.dumps({"execution": {"config": celery_config}}))
    # the runs are orchestrated by a process of their own (same env as the worker), so a run
    # that never ends (dead worker, lost broker) is stopped on a deadline, not hung on
    orchestrator = ManagedProcess(
        name="celery runs", argv=[sys.executable, "-m", celery_defs.MODULE, str(run_config_path),
                                  *DOMAINS],
        env=env.env, cwd=REPO_ROOT, log_path=tmp_path / "logs" / "celery_runs.log",
    )
    instance = dg.DagsterInstance.from_config(str(env.dagster_home))
    instance.add_dynamic_partitions("domain", list(DOMAINS))
    try:
        worker.start()
        # while the worker boots: the reference, in process, on the other store
        t = time.monotonic()
        selected = _run_in_process_reference(reference_store)
        timings["in-process reference"] = time.monotonic() - t
        learning = asset_names(celery_defs.LEARNING_SELECTION)
        assert selected == learning, f"the job runs {selected}, the learning group is {learning}"
        assert learning <= set(LEARNING_TABLES), f"learning assets this test cannot compare: {learning - set(LEARNING_TABLES)}"

        def worker_died() -> str | None:
            return None if worker.exited() is None else f"worker exited {worker.exited()}\n{worker.tail()}"

        poll(lambda: worker.log_path.exists() and " ready." in worker.log_path.read_text(errors="replace"),
             timeout=90, interval=0.5, describe=lambda: "the Celery worker to be ready", abort=worker_died)
        timings["worker ready"] = time.monotonic() - started

        t = time.monotonic()
        orchestrator.start()
        try:
            poll(lambda: orchestrator.exited() is not None, timeout=CELERY_RUNS_TIMEOUT, interval=0.5,
                 describe=lambda: f"the Celery runs to finish\n{orchestrator.tail(30)}\n{worker.tail(30)}",
                 abort=worker_died)
        finally:
            orchestrator.stop(signal.SIGINT, grace_seconds=20)  # SIGINT: Dagster revokes its tasks
        timings["celery runs"] = time.monotonic() - t
        log = orchestrator.log_path.read_text(errors="replace")
        runs = [json.loads(line) for line in log.splitlines() if line.startswith('{"domain"')]
        assert orchestrator.exited() == 0 and [r["domain"] for r in runs] == list(DOMAINS), \
            f"Celery runs failed (exit {orchestrator.exited()}): {runs}\n{orchestrator.tail(60)}\n{worker.tail(40)}"
        for run in runs:
            succeeded, in_worker, pids = _step_events(instance, run["run_id"])
            assert succeeded and succeeded == in_worker, f"steps not all run by the worker: {succeeded} vs {in_worker}"
            assert not pids & {os.getpid(), orchestrator.pid}, "a step ran outside the Celery worker"
        assert worker_name in worker.log_path.read_text(errors="replace")
    finally:
        worker.stop(signal.SIGTERM, grace_seconds=20, group=True)  # Celery's warm shutdown
        kill_marked(env.marker)
        instance.dispose()
    assert marked_pids(env.marker) == [], "Celery worker processes left behind"

    compared: dict[str, int] = {}
    for table_name in (LEARNING_TABLES[name] for name in sorted(learning)):
        for domain in DOMAINS:
            got = celery_store.read(table_name, domain=domain)
            expected = reference_store.read(table_name, domain=domain)
            assert_same_rows(table_name, domain, got, expected)
            compared[table_name] = compared.get(table_name, 0) + len(expected)
        assert compared[table_name] > 0, f"{table_name} is empty everywhere: the comparison would prove nothing"
    assert all(reference_store.count("learning_lessons", d) > 0 for d in DOMAINS)
    print(f"\nrows compared: {compared}\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + f"; total {time.monotonic() - started:.1f}s")
