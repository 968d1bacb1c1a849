"""The SQL store: one ConfigurableResource over any SQLAlchemy URL.

Reads return typed DataFrames (timestamps as UTC, booleans as bool). Writes of a
partition replace exactly that domain's rows in one transaction, so a re-run is
idempotent and a crash leaves the previous rows. SQLite (the embedded default) runs
in WAL mode with a busy timeout and takes its write lock up front (BEGIN IMMEDIATE)
so two writers queue instead of deadlocking; PostgreSQL needs nothing special.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr
from sqlalchemy import Boolean, DateTime, Engine, Float, Integer, String, create_engine, delete, event, func, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.cursor import CursorFetchStrategy
from sqlalchemy.exc import OperationalError

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


# ---------------------------------------------------------------------------
# The per-run read cache
# ---------------------------------------------------------------------------

# Source tables the learning assets of one run read again and again (a 1M-trade domain
# is ~10M rows across them). Only ingest writes them in normal operation, and it logs
# a batch in ingest_batches in the same transaction.
CACHEABLE_TABLES = frozenset({"trades", "trade_patterns", "trade_scope", "trade_metrics"})
READ_CACHE_MAX_BYTES = 3 * 1024**3 // 2


class ReadCache:
    """Frames already read in this run, keyed by the query and by what could change them.

    A hit needs the same query, the same newest ingest batch of the domain (another
    process ingesting mid-run is noticed) and the same write generation of the table
    in this process (a write through any MetaStore here is noticed). The key is read
    before the rows, so a racing commit can only make a cached frame newer than its
    key, never older. Frames are handed out as shallow copies: under pandas'
    copy-on-write a caller that modifies one gets its own copy.
    """

    def __init__(self, max_bytes: int = READ_CACHE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[tuple, tuple[pd.DataFrame, int]] = OrderedDict()
        self._memo: dict[tuple, Any] = {}  # derived values (see MetaStore.run_memo)
        self._inflight: dict[tuple, threading.Event] = {}  # query -> set once a prefetch has read it (or failed)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.memo_hits = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._frames.values())

    def get(self, key: tuple) -> pd.DataFrame | None:
        with self._lock:
            found = self._frames.get(key)
            if found is None:
                self.misses += 1
                return None
            self._frames.move_to_end(key)
            self.hits += 1
            return found[0].copy(deep=False)

    def put(self, key: tuple, frame: pd.DataFrame) -> None:
        size = int(frame.memory_usage(index=True, deep=False).sum())
        if size > self.max_bytes:
            return
        with self._lock:
            # entries of the same query under an older key can never hit again
            stale = [k for k in self._frames if k[1:] == key[1:] and k != key]
            for k in stale:
                del self._frames[k]
            self._frames[key] = (frame.copy(deep=False), size)
            total = sum(sz for _, sz in self._frames.values())
            while total > self.max_bytes and self._frames:
                _, (_, sz) = self._frames.popitem(last=False)
                total -= sz

    def launch(self, queries: list[tuple], work: Callable[[Callable[[tuple], None]], None]) -> None:
        """Run `work(done)` on a background thread: it reads `queries` into this cache in order, calling done(query) after each.

        Queries already in flight are left to the thread reading them.
        """
        with self._lock:
            queries = [q for q in queries if q not in self._inflight]
            if not queries:
                return
            for q in queries:
                self._inflight[q] = threading.Event()
        thread = threading.Thread(target=self._run, args=(queries, work), name="meta-pipeline-prefetch", daemon=True)
        thread.start()

    def _done(self, query: tuple) -> None:
        with self._lock:
            event = self._inflight.pop(query, None)
        if event is not None:
            event.set()

    def _run(self, queries: list[tuple], work: Callable[[Callable[[tuple], None]], None]) -> None:
        try:
            work(self._done)
        except Exception:  # noqa: BLE001 - the foreground read() retries and reports
            pass
        finally:
            for q in queries:
                self._done(q)

    def wait_for(self, query: tuple) -> None:
        with self._lock:
            event = self._inflight.get(query)
        if event is not None:
            event.wait()

    def memo_get(self, key: tuple) -> Any:
        with self._lock:
            found = self._memo.get(key, _MISSING)
            if found is not _MISSING:
                self.memo_hits += 1
            return found

    def memo_put(self, key: tuple, value: Any) -> None:
        with self._lock:
            # a newer version of the same (kind, domain) replaces the old one
            for k in [k for k in self._memo if k[:2] == key[:2] and k != key]:
                del self._memo[k]
            self._memo[key] = value

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._memo.clear()


_MISSING = object()


class MetaStore(ConfigurableResource):
    """The data store of meta_pipeline (SQLite by default, PostgreSQL for concurrent writers).

    Inside a Dagster run the resource keeps a read cache of the source tables for the
    run's lifetime (see ReadCache): the learning assets of a domain read the same
    trades, patterns, scope and metrics several times, and with the in-process
    executor all of a run's steps share this one initialized resource. Outside a run
    nothing is cached unless asked for (``with store.cached_reads(): ...``).
    """

    db_url: str = Field(default_factory=default_db_url, description="SQLAlchemy URL; env META_PIPELINE_DB_URL")
    _read_cache: ReadCache | None = PrivateAttr(default=None)

    # -- plumbing -------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        return get_engine(self.db_url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Dagster initializes the resource once per run (per step with multiprocess): one read cache each.

        The cache lives on this initialized copy and goes when the run drops it. (No
        teardown hook on purpose: overriding it would make the store a context-manager
        resource, which every ``build_*_context(resources=...)`` caller would then
        have to enter with ``with``.)
        """
        self._read_cache = ReadCache()

    @property
    def read_cache(self) -> ReadCache | None:
        """The active read cache (in a run, or inside ``cached_reads``), else None."""
        return self._read_cache

    @contextmanager
    def cached_reads(self, cache: ReadCache | None = None) -> Iterator[ReadCache]:
        """Serve repeated reads of the source tables from memory until the block ends."""
        previous = self._read_cache
        self._read_cache = cache if cache is not None else ReadCache()
        try:
            yield self._read_cache
        finally:
            self._read_cache.clear()
            self._read_cache = previous

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: everything inside commits together or not at all."""
        with self.engine.connect() as conn:
            conn.execution_options(meta_write=True)
            conn.info.pop(_WRITTEN_KEY, None)
            conn.info.pop("meta_pipeline_committed_tables", None)
            with conn.begin():
                yield conn
            committed = conn.info.pop("meta_pipeline_committed_tables", None)
            if committed:
                _bump(self.db_url, committed)  # again, now that the commit is done

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
        query = _select(table_name, domain, columns, where, params, order_by)
        cache = self._read_cache if conn is None and query.tbl.name in CACHEABLE_TABLES else None
        if cache is None:
            if conn is None:
                with self.read_conn() as c:
                    return _select_frame(c, query)
            return _select_frame(conn, query)
        cache_key = _cache_key(query)
        cache.wait_for(cache_key)  # a prefetch of this very query: let it land first
        return self._cached_read(cache, domain, query)

    def _cached_read(self, cache: ReadCache, domain: str | None, query: _Select) -> pd.DataFrame:
        with self.read_conn() as c, c.begin():  # one snapshot for the key and the rows (SQLite)
            key = (self._source_version(c, query.tbl.name, domain), *_cache_key(query))
            found = cache.get(key)
            if found is not None:
                return found
            frame = _select_frame(c, query)
        cache.put(key, frame)
        return frame.copy(deep=False)

    def prefetch(self, reads: Sequence[dict[str, Any]]) -> None:
        """Start reading source-table slices into the run's cache on a background thread, one after the other.

        Each item holds read()'s keyword arguments. Why: SQLite's row fetching and the
        numpy/arrow work of the learning cores both release the GIL for much of their
        time, so a read started before a long computation lands almost for free on the
        second core (on a 1M-trade domain the next asset's 4M metric rows load while
        lessons are mined). A later read() of the same query waits for it instead of
        reading twice; a failed prefetch is forgotten and the later read() reports.
        Outside a run (no cache) this does nothing.
        """
        cache = self._read_cache
        if cache is None:
            return
        planned = []
        for kw in reads:
            query = _select(kw["table_name"], kw.get("domain"), kw.get("columns"), kw.get("where"),
                            kw.get("params"), kw.get("order_by"))
            if query.tbl.name in CACHEABLE_TABLES:
                planned.append((kw.get("domain"), query))

        def work(done: Callable[[tuple], None]) -> None:
            for domain, query in planned:
                self._cached_read(cache, domain, query)
                done(_cache_key(query))

        cache.launch([_cache_key(q) for _, q in planned], work)

    def source_version(self, domain: str) -> tuple:
        """A token that changes whenever `domain`'s source rows may have changed.

        The domain's newest ingest batch (any process) and this process's write
        generations of the source tables. Take it *before* reading the rows it
        describes (see ReadCache).
        """
        validate_domain(domain)
        with self.read_conn() as c:
            newest = c.execute(text("SELECT MAX(id) FROM ingest_batches WHERE domain = :d"), {"d": domain}).scalar()
        return (self.db_url, domain, newest, tuple(table_generation(self.db_url, t) for t in sorted(CACHEABLE_TABLES)))

    def run_memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """A value derived from the source tables, computed once per run.

        `key` is (kind, domain, ...) and must hold everything the value depends on,
        the domain's source_version included; a newer key of the same kind and domain
        replaces the older entry. Outside a run (no read cache) this just computes.
        """
        cache = self._read_cache
        if cache is None:
            return compute()
        found = cache.memo_get(key)
        if found is not _MISSING:
            return found
        value = compute()
        cache.memo_put(key, value)
        return value

    def remember(self, key: tuple, value: Any) -> None:
        """Offer a value already computed (e.g. as a by-product) to later run_memo calls of this run."""
        if self._read_cache is not None:
            self._read_cache.memo_put(key, value)

    def _source_version(self, conn: Connection, table_name: str, domain: str | None) -> tuple:
        """What must be unchanged for a cached read of a source table to still be right."""
        if domain is None:
            newest = conn.execute(text("SELECT MAX(id) FROM ingest_batches")).scalar()
        else:
            newest = conn.execute(
                text("SELECT MAX(id) FROM ingest_batches WHERE domain = :d"), {"d": domain}
            ).scalar()
        return (self.db_url, table_name, newest, table_generation(self.db_url, table_name))

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
            mark_written(conn, tbl.name)
            conn.execute(delete(tbl).where(tbl.c.domain == domain))
            return insert_frame(conn, tbl, rows)
        with self.write() as c:
            lock_partition(c, table_name, domain)
            mark_written(c, tbl.name)
            c.execute(delete(tbl).where(tbl.c.domain == domain))
            return insert_frame(c, tbl, rows)

    def replace_all(self, table_name: str, rows: pd.DataFrame) -> int:
        """Replace a whole unpartitioned table atomically."""
        tbl = table(table_name)
        if table_name in APPEND_ONLY_TABLES:
            raise ValueError(f"{table_name} is append-only; use append()")
        with self.write() as conn:
            mark_written(conn, tbl.name)
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


class _Select(NamedTuple):
    """A read() as SQL: the table, the statement, its parameters and the columns it returns."""

    tbl: Table
    sql: str
    bind: dict[str, Any]
    columns: list[str]
    ordered: bool  # has an ORDER BY: the row order is part of the answer


def _select(table_name: str, domain: str | None, columns: Sequence[str] | None, where: str | None,
            params: dict[str, Any] | None, order_by: str | None) -> _Select:
    """The SQL of a read()."""
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
    return _Select(tbl, sql, bind, cols, bool(order_by))


def _cache_key(query: _Select) -> tuple:
    return (query.sql, tuple(sorted((k, repr(v)) for k, v in query.bind.items())))


def _select_frame(conn: Connection, query: _Select) -> pd.DataFrame:
    """A read()'s rows as a typed frame: SQLite's all-text fast path when it applies, else row by row."""
    if conn.dialect.name == "sqlite" and not query.ordered and _all_text_not_null(query.tbl, query.columns):
        with _gc_paused():
            fast = _sqlite_text_frame(conn, query.sql, query.bind, query.columns)
        if fast is not None:
            return fast
    with _gc_paused():
        return _typed(_query_frame(conn, query.sql, query.bind, query.tbl), query.tbl)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while millions of fresh row tuples are built and dropped.

    Why: every few hundred new tuples trigger a collection that walks them all again;
    on a 4M-row read that is ~20% of the time, and none of them is part of a cycle.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _all_text_not_null(tbl: Table, columns: Sequence[str]) -> bool:
    cols = [tbl.c.get(name) for name in columns]
    return bool(cols) and len(set(columns)) == len(columns) and all(
        c is not None and not c.nullable and isinstance(c.type, String) for c in cols)


_FIELD_SEP = "\x1f"  # ASCII unit separator between fields (char(31)); rows end at newlines (char(10))


def _sqlite_text_frame(conn: Connection, sql: str, bind: dict[str, Any], columns: Sequence[str]) -> pd.DataFrame | None:
    """An unordered, all-text, NOT NULL query as one blob from SQLite, parsed by pyarrow's CSV reader.

    Why: the driver builds a tuple and a str per row and cell (3.3M pattern rows: ~4.5 s
    with the frame conversion); SQLite joining the rows into one blob in C and arrow
    splitting it takes ~2 s. The row order is SQLite's, as for the row-by-row read (the
    query has no ORDER BY). A value holding a separator, or a result longer than SQLite
    allows in one value, is detected (field/row counts, the error) and gives None: the
    caller reads row by row instead, so nothing is ever lost or split wrongly.
    """
    fields = " || char(31) || ".join(f"q.{_q(c)}" for c in columns)
    wrapped = f"SELECT CAST(group_concat({fields}, char(10)) AS BLOB), count(*) FROM ({sql}) AS q"
    try:
        blob, n_rows = conn.execute(text(wrapped), bind).one()
    except OperationalError:  # "string or blob too big": more text than one SQLite value holds
        return None
    if n_rows == 0:
        return pd.DataFrame({c: pd.array([], dtype=_TEXT_DTYPE) for c in columns})
    # An embedded separator cannot go unnoticed: u unit separators and e newlines inside
    # values give n + e lines, each of which must hold exactly k - 1 separators, so
    # u = e(k - 1); e = 0 forces u = 0, and e > 0 changes the row count.
    try:
        parsed = pa_csv.read_csv(
            pa.py_buffer(blob),
            read_options=pa_csv.ReadOptions(column_names=list(columns), block_size=1 << 24),
            parse_options=pa_csv.ParseOptions(delimiter=_FIELD_SEP, quote_char=False, double_quote=False,
                                              escape_char=False, newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.large_string() for c in columns},
                                                  strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid:
        return None
    if parsed.num_rows != n_rows:
        return None
    return pd.DataFrame({c: pd.array(parsed.column(c).combine_chunks(), dtype=_TEXT_DTYPE) for c in columns})


def _query_frame(conn: Connection, sql: str, bind: dict[str, Any], tbl: Table | None = None) -> pd.DataFrame:
    """A query's rows as a frame, exactly as ``pd.read_sql_query`` builds it, minus its overhead.

    SQLAlchemy still binds the parameters; the rows come straight from the driver's
    cursor, because wrapping millions of tuples in Row objects cost 2-3x the fetch
    itself (a text() query has no result processing to lose). pandas' own
    tuples-to-frame conversion follows, so dtypes are what read_sql_query gives.
    """
    result = conn.execute(text(sql), bind)
    try:
        columns = list(result.keys())
        if type(result.cursor_strategy) is CursorFetchStrategy and result.cursor is not None:
            rows = result.cursor.fetchall()
        else:  # buffered/streamed results: let SQLAlchemy drain its buffer
            rows = [tuple(r) for r in result.fetchall()]
    finally:
        result.close()
    if tbl is not None and conn.dialect.name == "sqlite":
        fast = _not_null_rows_to_frame(rows, columns, tbl)
        if fast is not None:
            return fast
    return _rows_to_frame(rows, columns)


def _rows_to_frame(rows: list, columns: list[str]) -> pd.DataFrame:
    try:
        from pandas.io.sql import _wrap_result  # what read_sql_query itself calls
    except ImportError:  # pragma: no cover - a pandas that moved it
        return pd.DataFrame.from_records(rows, columns=columns, coerce_float=True)
    return _wrap_result(rows, columns, coerce_float=True)


_TEXT_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)  # what read_sql_query gives text columns


def _not_null_rows_to_frame(rows: list, columns: list[str], tbl: Table) -> pd.DataFrame | None:
    """The same frame as _rows_to_frame, built column-wise through pyarrow, for NOT NULL text/float/time columns.

    Why: pandas infers every column's type value by value and then re-encodes text as
    arrow strings; when the schema already says "text, never null" (the source tables)
    one arrow conversion per column is 2-3x faster. Anything else (nullable or other
    column types, empty results, a value that is not what the schema says): None, and
    the caller takes pandas' path.
    """
    if not rows or len(set(columns)) != len(columns):
        return None
    kinds = []
    for name in columns:
        col = tbl.c.get(name)
        if col is None or col.nullable:
            return None
        if isinstance(col.type, Float):
            kinds.append("float")
        elif isinstance(col.type, (DateTime, String)):  # SQLite keeps times as text
            kinds.append("text")
        else:
            return None
    try:
        from pandas._libs import lib

        content = lib.to_object_array_tuples(rows)
        data = {}
        for j, (name, kind) in enumerate(zip(columns, kinds)):
            values = content[:, j]
            if kind == "text":
                data[name] = pd.array(pa.array(values, type=pa.large_string()), dtype=_TEXT_DTYPE)
            else:
                floats = pa.array(values, type=pa.float64())  # refuses text, unlike astype
                if floats.null_count:
                    return None
                data[name] = floats.to_numpy(zero_copy_only=False)
    except (ImportError, pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return None
    return pd.DataFrame(data, columns=columns)


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


INSERT_CHUNK_ROWS = 100_000  # rows converted and sent per driver call: bounds memory, not speed

_MIN_TEXT_US = int(np.datetime64("0001-01-01T00:00:00", "us").astype(np.int64))  # 4-digit years only
_MAX_TEXT_US = int(np.datetime64("9999-12-31T23:59:59.999999", "us").astype(np.int64))


def _prepared_column(series: pd.Series, ctype: Any) -> pd.Series:
    """The column coerced to its schema type (NaN/NaT = missing); ±inf in a float column is refused."""
    if isinstance(ctype, DateTime):
        return pd.to_datetime(series, utc=True)
    if isinstance(ctype, Float):
        values = pd.to_numeric(series, errors="coerce").astype(float)
        if np.isinf(values.to_numpy()).any():
            raise ValueError(f"non-finite value in float column {series.name!r}")
        return values
    return series


def _sqlite_datetime_text(ts: pd.Series) -> list:
    """UTC timestamps as SQLAlchemy's SQLite DateTime text ('%Y-%m-%d %H:%M:%S.%f'), None for NaT.

    numpy's ISO formatting with the 'T' swapped for a space, instead of pandas'
    per-value strftime (the same text; microseconds floored like Timestamp.microsecond).
    """
    naive = ts.dt.tz_convert(None).to_numpy()
    missing = np.isnat(naive)
    ticks = naive.view(np.int64)
    unit = np.datetime_data(naive.dtype)[0]
    per_us = {"s": 1_000_000, "ms": 1_000, "us": 1}
    if unit == "ns":
        us = ticks // 1000
    elif unit in per_us:
        us = ticks * per_us[unit]
    else:  # pragma: no cover - units pandas does not produce
        return ts.dt.strftime("%Y-%m-%d %H:%M:%S.%f").where(ts.notna(), None).tolist()
    present = us[~missing]
    if present.size and (present.min() < _MIN_TEXT_US or present.max() > _MAX_TEXT_US):
        return ts.dt.strftime("%Y-%m-%d %H:%M:%S.%f").where(ts.notna(), None).tolist()
    text_values = np.datetime_as_string(np.where(missing, 0, us).view("datetime64[us]"), unit="us")
    # 'YYYY-MM-DDTHH:MM:SS.ffffff' for 4-digit years: the 'T' is character 10
    text_values.view(np.uint32).reshape(len(text_values), -1)[:, 10] = ord(" ")
    out = text_values.tolist()
    if missing.any():
        for i in np.flatnonzero(missing):
            out[i] = None
    return out


def _column_values(series: pd.Series, ctype: Any, dialect: str, may_be_missing: bool = True) -> list:
    """Python values for the DB driver from a prepared column: None for missing, native ints/bools."""
    if isinstance(ctype, DateTime):
        if dialect == "sqlite":
            # SQLAlchemy's own SQLite DateTime storage format, so ORM readers agree
            return _sqlite_datetime_text(series)
        return [None if pd.isna(v) else v.to_pydatetime(warn=False) for v in series]  # µs: what SQL keeps
    if isinstance(ctype, Boolean):
        if series.dtype == bool:
            return series.to_numpy().tolist()
        return [None if pd.isna(v) else bool(v) for v in series]
    if isinstance(ctype, Integer):
        if series.dtype.kind in "iu":
            return series.to_numpy().tolist()
        return [None if pd.isna(v) else int(v) for v in series]
    if isinstance(ctype, Float):
        arr = series.to_numpy(dtype=float)
        missing = np.isnan(arr)
        if not missing.any():
            return arr.tolist()
        out = arr.astype(object)
        out[missing] = None
        return out.tolist()
    arr = series.to_numpy(dtype=object)
    if not may_be_missing:
        return arr.tolist()
    missing = pd.isna(arr)
    if missing.any():
        arr = arr.copy()
        arr[missing] = None
    return arr.tolist()


SQLITE_MAX_PARAMS = 999  # bound parameters per statement any SQLite build accepts (newer ones: 32766)


def _sqlite_insert_rows(cursor: Any, table_name: str, cols: list[str], values: list[list]) -> None:
    """Insert column-wise values with multi-row INSERTs: many rows per statement execution.

    Why: the driver's per-execution cost (reset, step, a Python tuple per row) dominates a
    one-row INSERT; ~250 rows per statement halved a 4M-row load. The values are laid out
    row-major in one flat list by slice assignment (C speed), then cut into statements.
    """
    n_cols, n_rows = len(cols), len(values[0]) if values else 0
    per_stmt = max(1, SQLITE_MAX_PARAMS // n_cols)
    flat: list = [None] * (n_rows * n_cols)
    for j, column in enumerate(values):
        flat[j::n_cols] = column
    row_sql = f"({', '.join('?' for _ in cols)})"
    head = f"INSERT INTO {_q(table_name)} ({', '.join(_q(c) for c in cols)}) VALUES "
    n_full = n_rows // per_stmt * per_stmt
    if n_full:
        params = iter(flat[: n_full * n_cols])
        cursor.executemany(head + ", ".join([row_sql] * per_stmt), zip(*[params] * (per_stmt * n_cols)))
    if n_full < n_rows:
        cursor.execute(head + ", ".join([row_sql] * (n_rows - n_full)), flat[n_full * n_cols:])


def insert_frame(conn: Connection, tbl: Table, rows: pd.DataFrame) -> int:
    """Bulk insert a frame; columns must be a subset of the table's. Uses COPY on PostgreSQL.

    The whole frame is checked first (unknown or missing columns, ±inf, nulls in
    non-null columns), then converted and sent in chunks of INSERT_CHUNK_ROWS.
    """
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
    prepared = {c: _prepared_column(rows[c], tbl.c[c].type) for c in cols}
    has_missing = {c: bool(prepared[c].isna().any()) for c in cols}
    for c in cols:
        if not tbl.c[c].nullable and has_missing[c]:
            raise ValueError(f"{tbl.name}.{c}: null in a non-null column")
    mark_written(conn, tbl.name)
    n_rows = len(rows)
    col_sql = ", ".join(_q(c) for c in cols)

    def chunks() -> Iterator[list[list]]:
        for start in range(0, n_rows, INSERT_CHUNK_ROWS):
            stop = min(start + INSERT_CHUNK_ROWS, n_rows)
            yield [_column_values(prepared[c].iloc[start:stop], tbl.c[c].type, dialect, has_missing[c]) for c in cols]

    if dialect == "postgresql" and conn.dialect.driver == "psycopg":
        raw = conn.connection.dbapi_connection
        with raw.cursor() as cur:
            with cur.copy(f"COPY {_q(tbl.name)} ({col_sql}) FROM STDIN") as copy:
                for values in chunks():
                    for record in zip(*values):
                        copy.write_row(record)
        return n_rows
    if dialect == "sqlite":
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            with _gc_paused():
                for values in chunks():
                    _sqlite_insert_rows(cursor, tbl.name, cols, values)
        finally:
            cursor.close()
        return n_rows
    for values in chunks():
        conn.execute(tbl.insert(), [dict(zip(cols, r)) for r in zip(*values)])
    return n_rows
