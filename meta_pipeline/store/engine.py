"""Engines per URL (SQLite: WAL, busy timeout, BEGIN IMMEDIATE for writers), the additive schema
upgrade, and write generations (which tables this process changed, for the read cache)."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url

from meta_pipeline.contracts import metadata


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()
SQLITE_BUSY_TIMEOUT_MS = 60_000


def get_engine(url: str) -> Engine:
    """One engine per URL per process, with the schema created on first use."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            engine = _make_engine(url)
            metadata.create_all(engine)
            add_missing_columns(engine)
            from meta_pipeline.store.upgrade import version_unversioned_overrides  # uses frames, which imports us

            version_unversioned_overrides(engine)
            _ENGINES[url] = engine
        return engine


def add_missing_columns(engine: Engine) -> list[str]:
    """Additive schema upgrade: a store created by an older version gains the new nullable
    columns (create_all only creates missing tables). Returns what it added."""
    from sqlalchemy import inspect

    added = []
    inspector = inspect(engine)
    with engine.connect() as conn:
        conn.execution_options(meta_write=True)
        with conn.begin():
            for tbl in metadata.sorted_tables:
                existing = {c["name"] for c in inspector.get_columns(tbl.name)}
                for column in tbl.columns:
                    if column.name in existing:
                        continue
                    if not column.nullable:
                        raise RuntimeError(
                            f"{tbl.name}.{column.name}: the store predates a required column; migrate it by hand"
                        )
                    col_type = column.type.compile(dialect=engine.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE "{tbl.name}" ADD COLUMN "{column.name}" {col_type}')
                    added.append(f"{tbl.name}.{column.name}")
    return added


def dispose_engines() -> None:
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - exercised via engine
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA cache_size=-262144")  # 256 MiB: bulk loads keep index pages in memory
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_on_begin(conn: Connection) -> None:  # pragma: no cover - exercised via engine
            # writers take the lock up front so concurrent writers wait (busy timeout)
            # instead of failing on lock upgrade; readers stay deferred.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("meta_write") else "BEGIN")

        _track_writes(engine, url)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    engine = create_engine(url, pool_pre_ping=True)
    _track_writes(engine, url)
    return engine


# ---------------------------------------------------------------------------
# Write generations: which tables this process has changed (for the read cache)
# ---------------------------------------------------------------------------

_WRITTEN_KEY = "meta_pipeline_written_tables"
_GENERATIONS: dict[tuple[str, str], int] = {}
_GENERATIONS_LOCK = threading.Lock()


def mark_written(conn: Connection, table_name: str) -> None:
    """Note that this transaction changes `table_name` (bumped when it commits)."""
    conn.info.setdefault(_WRITTEN_KEY, set()).add(table_name)


def _bump(url: str, tables: set[str]) -> None:
    with _GENERATIONS_LOCK:
        for name in tables:
            _GENERATIONS[(url, name)] = _GENERATIONS.get((url, name), 0) + 1


def table_generation(url: str, table_name: str) -> int:
    """How many committed transactions of this process have changed the table."""
    with _GENERATIONS_LOCK:
        return _GENERATIONS.get((url, table_name), 0)


def _track_writes(engine: Engine, url: str) -> None:
    # Any transaction on the engine, whoever runs it: its marked tables get a new
    # generation at commit. (MetaStore.write bumps again once the commit is done, so
    # a reader racing the commit cannot keep pre-commit rows under the new number.)
    @event.listens_for(engine, "commit")
    def _on_commit(conn: Connection) -> None:  # pragma: no cover - exercised via engine
        tables = conn.info.pop(_WRITTEN_KEY, None)
        if tables:
            _bump(url, tables)
            conn.info["meta_pipeline_committed_tables"] = tables

    @event.listens_for(engine, "rollback")
    def _on_rollback(conn: Connection) -> None:  # pragma: no cover - exercised via engine
        conn.info.pop(_WRITTEN_KEY, None)


