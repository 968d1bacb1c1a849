"""The SQL store: one ConfigurableResource over any SQLAlchemy URL.

Reads return typed DataFrames (timestamps as UTC, booleans as bool). Writes of a
partition replace exactly that domain's rows in one transaction, so a re-run is
idempotent and a crash leaves the previous rows. SQLite (the embedded default) runs
in WAL mode with a busy timeout and takes its write lock up front (BEGIN IMMEDIATE)
so two writers queue instead of deadlocking; PostgreSQL needs nothing special.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from dagster import ConfigurableResource
from pydantic import Field
from sqlalchemy import Boolean, DateTime, Engine, Float, Integer, create_engine, delete, event, func, select, text
from sqlalchemy.engine import Connection, make_url

from meta_pipeline.contracts import APPEND_ONLY_TABLES, Table, metadata, table, validate_domain
from meta_pipeline.paths import default_db_url

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

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
    return create_engine(url, pool_pre_ping=True)


class MetaStore(ConfigurableResource):
    """The data store of meta_pipeline (SQLite by default, PostgreSQL for concurrent writers)."""

    db_url: str = Field(default_factory=default_db_url, description="SQLAlchemy URL; env META_PIPELINE_DB_URL")

    # -- plumbing -------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        return get_engine(self.db_url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: everything inside commits together or not at all."""
        with self.engine.connect() as conn:
            conn.execution_options(meta_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read_conn(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    # -- reads ----------------------------------------------------------------
    def read(
        self,
        table_name: str,
        domain: str | None = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        params: dict[str, Any] | None = None,
        order_by: str | None = None,
        conn: Connection | None = None,
    ) -> pd.DataFrame:
        """A table (or one domain's slice of it) as a typed DataFrame."""
        tbl = table(table_name)
        cols = list(columns) if columns else [c.name for c in tbl.columns]
        unknown = set(cols) - set(tbl.columns.keys())
        if unknown:
            raise KeyError(f"{table_name}: unknown column(s) {sorted(unknown)}")
        clauses, bind = [], dict(params or {})
        if domain is not None:
            clauses.append("domain = :domain")
            bind["domain"] = validate_domain(domain)
        if where:
            clauses.append(f"({where})")
        sql = f'SELECT {", ".join(_q(c) for c in cols)} FROM {_q(tbl.name)}'
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        if order_by:
            sql += f" ORDER BY {order_by}"
        if conn is None:
            with self.read_conn() as c:
                df = pd.read_sql_query(text(sql), c, params=bind)
        else:
            df = pd.read_sql_query(text(sql), conn, params=bind)
        return _typed(df, tbl)

    def domains(self, table_name: str = "trades") -> list[str]:
        tbl = table(table_name)
        with self.read_conn() as conn:
            rows = conn.execute(select(tbl.c.domain).distinct().order_by(tbl.c.domain)).scalars().all()
        return [r for r in rows if r is not None]

    def count(self, table_name: str, domain: str | None = None) -> int:
        tbl = table(table_name)
        stmt = select(func.count()).select_from(tbl)
        if domain is not None:
            stmt = stmt.where(tbl.c.domain == validate_domain(domain))
        with self.read_conn() as conn:
            return int(conn.execute(stmt).scalar_one())

    def scalar(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        with self.read_conn() as conn:
            return conn.execute(text(sql), params or {}).scalar()

    # -- writes ---------------------------------------------------------------
    def replace_partition(self, table_name: str, domain: str, rows: pd.DataFrame, conn: Connection | None = None) -> int:
        """Replace exactly `domain`'s rows of a table, atomically. Returns rows written."""
        tbl = table(table_name)
        if table_name in APPEND_ONLY_TABLES:
            raise ValueError(f"{table_name} is append-only; use append()")
        validate_domain(domain)
        rows = rows.copy()
        if "domain" in rows.columns and not rows.empty and not (rows["domain"] == domain).all():
            raise ValueError(f"{table_name}: rows for other domains passed to replace_partition({domain!r})")
        rows["domain"] = domain
        if conn is not None:
            lock_partition(conn, table_name, domain)
            conn.execute(delete(tbl).where(tbl.c.domain == domain))
            return insert_frame(conn, tbl, rows)
        with self.write() as c:
            lock_partition(c, table_name, domain)
            c.execute(delete(tbl).where(tbl.c.domain == domain))
            return insert_frame(c, tbl, rows)

    def replace_all(self, table_name: str, rows: pd.DataFrame) -> int:
        """Replace a whole unpartitioned table atomically."""
        tbl = table(table_name)
        if table_name in APPEND_ONLY_TABLES:
            raise ValueError(f"{table_name} is append-only; use append()")
        with self.write() as conn:
            conn.execute(delete(tbl))
            return insert_frame(conn, tbl, rows)

    def append(self, table_name: str, rows: pd.DataFrame, conn: Connection | None = None) -> int:
        tbl = table(table_name)
        if conn is not None:
            return insert_frame(conn, tbl, rows)
        with self.write() as c:
            return insert_frame(c, tbl, rows)


def lock_partition(conn: Connection, table_name: str, domain: str) -> None:
    """Serialize writers of one (table, domain) until the transaction ends.

    SQLite already serializes writers (BEGIN IMMEDIATE). On PostgreSQL, under READ
    COMMITTED, two concurrent delete-then-insert transactions would both insert (the
    second DELETE cannot see the first's new rows): a transaction-scoped advisory
    lock makes the second wait for the first instead.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"{table_name}/{domain}"})


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _typed(df: pd.DataFrame, tbl: Table) -> pd.DataFrame:
    """Give columns the types the schema says (SQLite hands back strings and 0/1)."""
    for col in df.columns:
        ctype = tbl.c[col].type
        if isinstance(ctype, DateTime):
            df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601") if len(df) else pd.Series(
                [], dtype="datetime64[us, UTC]"
            )
        elif isinstance(ctype, Boolean):
            df[col] = df[col].astype("boolean") if df[col].isna().any() else df[col].astype(bool)
        elif isinstance(ctype, Float):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
        elif isinstance(ctype, Integer) and not df[col].isna().any():
            df[col] = df[col].astype(np.int64)
    return df


def _column_values(series: pd.Series, ctype: Any, dialect: str) -> list:
    """Python values for the DB driver: None for missing, UTC timestamps, native ints/bools."""
    if isinstance(ctype, DateTime):
        ts = pd.to_datetime(series, utc=True)
        if dialect == "sqlite":
            # SQLAlchemy's own SQLite DateTime storage format, so ORM readers agree
            text_values = ts.dt.strftime("%Y-%m-%d %H:%M:%S.%f")
            return text_values.where(ts.notna(), None).tolist()
        return [None if pd.isna(v) else v.to_pydatetime() for v in ts]
    if isinstance(ctype, Boolean):
        return [None if pd.isna(v) else bool(v) for v in series]
    if isinstance(ctype, Integer):
        return [None if pd.isna(v) else int(v) for v in series]
    if isinstance(ctype, Float):
        values = pd.to_numeric(series, errors="coerce").astype(float)
        arr = values.to_numpy()
        if np.isinf(arr).any():
            raise ValueError(f"non-finite value in float column {series.name!r}")
        return values.astype(object).where(values.notna(), None).tolist()
    return series.astype(object).where(series.notna(), None).tolist()


def insert_frame(conn: Connection, tbl: Table, rows: pd.DataFrame) -> int:
    """Bulk insert a frame; columns must be a subset of the table's. Uses COPY on PostgreSQL."""
    if rows is None or len(rows) == 0:
        return 0
    extra = set(rows.columns) - set(tbl.columns.keys())
    if extra:
        raise ValueError(f"{tbl.name}: columns not in the schema: {sorted(extra)}")
    cols = [c.name for c in tbl.columns if c.name in rows.columns]
    missing = [
        c.name
        for c in tbl.columns
        if not c.nullable and c.name not in rows.columns and not c.primary_key and c.default is None
    ]
    if missing:
        raise ValueError(f"{tbl.name}: missing non-null column(s): {missing}")
    dialect = conn.dialect.name
    values = [_column_values(rows[c], tbl.c[c].type, dialect) for c in cols]
    records = list(zip(*values))
    for c, vals in zip(cols, values):
        if not tbl.c[c].nullable and any(v is None for v in vals):
            raise ValueError(f"{tbl.name}.{c}: null in a non-null column")
    col_sql = ", ".join(_q(c) for c in cols)
    if dialect == "postgresql" and conn.dialect.driver == "psycopg":
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            with cur.copy(f"COPY {_q(tbl.name)} ({col_sql}) FROM STDIN") as copy:
                for record in records:
                    copy.write_row(record)
        return len(records)
    if dialect == "sqlite":
        conn.exec_driver_sql(
            f"INSERT INTO {_q(tbl.name)} ({col_sql}) VALUES ({', '.join('?' for _ in cols)})", records
        )
        return len(records)
    conn.execute(tbl.insert(), [dict(zip(cols, r)) for r in records])
    return len(records)
