"""`meta-pipeline demo` end to end on SQLite (META_PIPELINE_DB_URL) and PostgreSQL (--db-url): same counts."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest

from meta_pipeline_tests.support.e2e import REPO_ROOT, VENV_BIN, make_environment

pytestmark = pytest.mark.slow

COUNTED = ("trades", "learning_lessons", "pm_overrides", "pm_overrides_versions", "feedback_cycles", "diagnostics",
           "meta_controller_config_proposals")


def _demo(env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    done = subprocess.run([str(VENV_BIN / "meta-pipeline"), "demo", "--domains", "2", "--trades", "2500", *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    counts = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^\s+(\w+)\s+([\d,]+) rows$", done.stdout, flags=re.M)}
    return done, counts


@pytest.fixture
def pg_database():
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL driver not installed")
    name = f"meta_demo_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect("postgresql://root@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://root@127.0.0.1:5432/{name}"
    finally:
        from meta_pipeline.store import dispose_engines

        dispose_engines()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_demo_gives_the_same_counts_on_sqlite_and_postgresql(tmp_path, pg_database) -> None:
    lite = make_environment(tmp_path / "sqlite")  # store from META_PIPELINE_DB_URL
    done_lite, counts_lite = _demo(lite.env)
    assert done_lite.returncode == 0, done_lite.stdout[-3000:] + done_lite.stderr[-3000:]
    pg = make_environment(tmp_path / "pg")
    done_pg, counts_pg = _demo(pg.env, "--db-url", pg_database)  # every step must use --db-url, not the env's
    assert done_pg.returncode == 0, done_pg.stdout[-3000:] + done_pg.stderr[-3000:]
    for name in COUNTED:
        assert counts_lite.get(name, 0) > 0, (name, counts_lite)
        assert counts_pg.get(name) == counts_lite[name], (name, counts_lite, counts_pg)
    # --db-url took the whole demo to PostgreSQL: the environment's SQLite file holds nothing
    from meta_pipeline.store import MetaStore

    assert MetaStore(pg.db_url).count("learning_lessons") == 0
    assert "Traceback" not in done_lite.stderr + done_pg.stderr
