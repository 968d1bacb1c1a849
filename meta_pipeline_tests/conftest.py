"""Shared fixtures: temporary stores (SQLite, real PostgreSQL) and Dagster instances."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from meta_pipeline.store import MetaStore, dispose_engines

os.environ.setdefault("DAGSTER_TELEMETRY_ENABLED", "false")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'meta.db'}"


@pytest.fixture
def store(sqlite_url: str) -> MetaStore:
    return MetaStore(db_url=sqlite_url)


# ---------------------------------------------------------------------------
# PostgreSQL: META_PIPELINE_TEST_PG_URL, else the server on 127.0.0.1:5432, else one
# started from initdb/pg_ctl on a free loopback port. Each test session gets a fresh
# database, dropped at the end.
# ---------------------------------------------------------------------------

_PG_CANDIDATES = ("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                  "postgresql+psycopg://root@127.0.0.1:5432/postgres")


def _reachable(admin_url: str) -> str | None:
    try:
        engine = create_engine(admin_url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not this one"
        return f"{admin_url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_local_postgres() -> tuple[str | None, str, object]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        return None, "no initdb/pg_ctl on PATH", None
    if os.geteuid() == 0:
        return None, "initdb refuses to run as root", None
    folder = tempfile.mkdtemp(prefix="mp_pg_")
    port = _free_port()
    subprocess.run([initdb, "-D", folder, "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([pg_ctl, "-D", folder, "-o", f"-p {port} -k {folder} -h 127.0.0.1", "-w", "start"],
                   check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([pg_ctl, "-D", folder, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)

    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", "", stop


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    reasons = []
    explicit = os.environ.get("META_PIPELINE_TEST_PG_URL")
    candidates = [explicit] if explicit else list(_PG_CANDIDATES)
    stop = None
    chosen = None
    for url in candidates:
        url = url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
        problem = _reachable(url)
        if problem is None:
            chosen = url
            break
        reasons.append(problem)
    if chosen is None and not explicit:
        started, why, stop = _start_local_postgres()
        if started and _reachable(started) is None:
            chosen = started
        else:
            reasons.append(f"local server: {why or 'did not start'}")
    if chosen is None:
        pytest.skip("no PostgreSQL reachable: " + " | ".join(reasons))
    yield chosen
    if stop:
        stop()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty database on the PostgreSQL server, dropped after the test."""
    name = f"mp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = pg_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_store(pg_url: str) -> MetaStore:
    return MetaStore(db_url=pg_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path: Path) -> MetaStore:
    """The same test on the embedded store and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return MetaStore(db_url=f"sqlite:///{tmp_path / 'meta.db'}")
    return MetaStore(db_url=request.getfixturevalue("pg_url"))


def wait_for(predicate, timeout: float, interval: float = 0.5):
    """Poll until predicate() is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")
