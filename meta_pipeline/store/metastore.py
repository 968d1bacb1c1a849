"""MetaStore: the one entry point to the data (SQLite by default, PostgreSQL for concurrent writers).

Reads return typed DataFrames (timestamps as UTC, booleans as bool). Writes of a
partition replace exactly that domain's rows in one transaction, so a re-run is
idempotent and a crash leaves the previous rows. SQLite (the embedded default) runs
in WAL mode with a busy timeout and takes its write lock up front (BEGIN IMMEDIATE)
so two writers queue instead of deadlocking; on PostgreSQL writers of one key
serialize on a transaction-scoped advisory lock (``lock``).

Callers never pass SQL: filters are column = value (``equals``) and column > value
(``after``) on columns the schema knows, orders are column names. Everything that
needs more (ingest's key replacement, the sensors' batch queries, the proposal
lifecycle's row updates) is a typed method here or in ``store.configs``.

No Dagster: ``meta_pipeline.defs.resources.StoreResource`` wraps this class for the
assets and gives each run its own read cache.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Column, Engine, MetaData, Table, delete, func, select, text
from sqlalchemy.engine import Connection

from meta_pipeline.contracts import APPEND_ONLY_TABLES, table, validate_domain
from meta_pipeline.knobs import KNOB_NAMES, KnobsInEffect, clip_knobs, knobs_in_effect_rule, parse_knobs
from meta_pipeline.paths import default_db_url
from meta_pipeline.store.cache import _MISSING, CACHEABLE_TABLES, ReadCache
from meta_pipeline.store.engine import _WRITTEN_KEY, _bump, get_engine, mark_written, table_generation
from meta_pipeline.store.frames import _cache_key, _select, _Select, _select_frame, insert_frame

STAGED_KEYS = "meta_pipeline_staged_keys"  # a temporary table: this connection's own, gone with it


def lock(conn: Connection, key: str) -> None:
    """Serialize writers of one key (e.g. ``"trades/dom0"``) until the transaction ends.

    SQLite already serializes writers (BEGIN IMMEDIATE). On PostgreSQL, under READ
    COMMITTED, two concurrent delete-then-insert transactions would both insert (the
    second DELETE cannot see the first's new rows): a transaction-scoped advisory lock
    on ``hashtext(key)`` makes the second wait for the first instead. The one lock of
    the project: partitions, the controller, proposals and configs all take it.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})


def lock_partition(conn: Connection, table_name: str, domain: str) -> None:
    """``lock`` on ``"<table>/<domain>"``: writers of one table partition queue."""
    lock(conn, f"{table_name}/{domain}")


@dataclass
class GlobalPriorVersion:
    """One version of the append-only ``global_prior`` table."""

    version: int
    values: dict[str, float]  # bounded, deployable knob values
    continuous: dict[str, float]  # unrounded values (Reptile state)
    n_domains: int
    epsilon: float | None
    details: dict[str, Any] = field(default_factory=dict)
    created_at: pd.Timestamp | None = None


class MetaStore:
    """The data store of meta_pipeline.

    ``read_cache``: frames of the source tables already read (see ReadCache); the Dagster
    resource gives each run one, so the learning assets of a domain read the trades,
    patterns, scope and metrics once. Outside a run nothing is cached unless asked
    for (``with store.cached_reads(): ...``).
    """

    def __init__(self, db_url: str | None = None, read_cache: ReadCache | None = None) -> None:
        self.db_url: str = db_url or default_db_url()
        self._read_cache = read_cache

    def __repr__(self) -> str:
        return f"MetaStore({self.db_url!r})"

    # -- plumbing -------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        return get_engine(self.db_url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

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
        *,
        equals: Mapping[str, Any] | None = None,
        after: Mapping[str, Any] | None = None,
        order_by: Sequence[str] | str | None = None,
        conn: Connection | None = None,
    ) -> pd.DataFrame:
        """A table (or one domain's slice of it) as a typed DataFrame.

        ``equals``: column = value filters; ``after``: column > value filters (timestamps
        compared as the dialect stores them); ``order_by``: column names ("a, b" or a
        list). Every name is checked against the schema: no SQL reaches this method.
        """
        query = _select(table_name, domain, columns, equals, after, order_by, self.dialect)
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

    def forget(self, table_name: str, domain: str | None = None, columns: Sequence[str] | None = None) -> None:
        """Drop this read from the run's cache (read()'s arguments): what the run will not read again
        leaves room for what it will, so a large domain's frames are not evicted and read twice."""
        cache = self._read_cache
        if cache is not None:
            cache.discard(_cache_key(_select(table_name, domain, columns, None, None, None, self.dialect)))

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
            query = _select(kw["table_name"], kw.get("domain"), kw.get("columns"), kw.get("equals"),
                            kw.get("after"), kw.get("order_by"), self.dialect)
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
        """A value computed once per run (a derived frame, the knobs in effect, ...).

        `key` is (kind, domain, ...) and must hold everything the value depends on; a
        newer key of the same kind and domain replaces the older entry. Outside a run
        (no read cache) this just computes.
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

    def count(self, table_name: str, domain: str | None = None, equals: Mapping[str, Any] | None = None) -> int:
        """Rows of a table (one domain's, and/or those whose columns equal the given values)."""
        tbl = table(table_name)
        stmt = select(func.count()).select_from(tbl)
        if domain is not None:
            stmt = stmt.where(tbl.c.domain == validate_domain(domain))
        for name, value in (equals or {}).items():
            stmt = stmt.where(tbl.c[name] == value)
        with self.read_conn() as conn:
            return int(conn.execute(stmt).scalar_one())

    def trade_integrity(self, domain: str | None = None) -> dict[str, int]:
        """Trades without a pattern row and duplicated trade ids (a domain's, or the whole table's)."""
        where, params = ("t.domain = :d", {"d": validate_domain(domain)}) if domain is not None else ("1 = 1", {})
        with self.read_conn() as conn:
            orphans = conn.execute(text(
                f"SELECT COUNT(*) FROM trades t WHERE {where} AND NOT EXISTS "
                "(SELECT 1 FROM trade_patterns p WHERE p.domain = t.domain AND p.trade_id = t.trade_id)"), params).scalar()
            dupes = conn.execute(text(
                f"SELECT COUNT(*) FROM (SELECT t.trade_id FROM trades t WHERE {where} "
                "GROUP BY t.domain, t.trade_id HAVING COUNT(*) > 1) x"), params).scalar()
        return {"trades_without_patterns": int(orphans or 0), "duplicate_trade_ids": int(dupes or 0)}

    # -- typed reads other layers rely on -------------------------------------
    def knobs_in_effect(self, domain: str) -> KnobsInEffect:
        """The knobs a domain runs with: THE rule (``knobs.knobs_in_effect_rule``), read once per run.

        Inside a run the answer is memoized, so every asset of the run (lessons,
        pm_overrides, ...) sees the same knobs even if the controller moves them mid-run.
        """
        validate_domain(domain)

        def compute() -> KnobsInEffect:
            with self.read_conn() as conn:
                active = self.active_config("META_KNOBS", domain, conn=conn)
                state = self.read("controller_state", domain=domain, columns=["knobs_json", "config_version"],
                                  conn=conn)
            controller = None
            adopted = 0
            if len(state):
                controller = json.loads(state["knobs_json"].iloc[0])
                version = state["config_version"].iloc[0]
                adopted = int(version) if pd.notna(version) else 0
            return knobs_in_effect_rule(active, controller, adopted)

        return self.run_memo(("knobs_in_effect", domain), compute)

    def active_config(self, target_type: str, target_id: str, conn: Connection | None = None
                      ) -> tuple[int, dict] | None:
        """(version, config) of the target's active ``configs`` row, or None."""
        from meta_pipeline.store.configs import active_config_row

        if conn is None:
            with self.read_conn() as c:
                row = active_config_row(c, target_type, target_id)
        else:
            row = active_config_row(conn, target_type, target_id)
        return None if row is None else (row[0], json.loads(row[1]))

    def active_configs(self) -> dict[tuple[str, str], dict]:
        """Every active config: {(target_type, target_id): config}."""
        rows = self.read("configs", columns=["target_type", "target_id", "config_json"], equals={"active": True})
        return {(tt, tid): json.loads(cfg) for tt, tid, cfg in zip(rows["target_type"], rows["target_id"],
                                                                    rows["config_json"])}

    def read_global_prior(self, version: int | None = None, conn: Connection | None = None
                          ) -> GlobalPriorVersion | None:
        """One version of the global prior (default: the newest), or None when there is none.

        Each version's ``details_json`` also keeps the continuous (unrounded) knob values
        the next Reptile step starts from.
        """
        if version is None:
            versions = self.read("global_prior", columns=["version"], conn=conn)
            if versions.empty:
                return None
            version = int(versions["version"].max())
        rows = self.read("global_prior", equals={"version": int(version)}, conn=conn)
        if rows.empty:
            return None
        values = {k: float(v) for k, v in zip(rows["knob"], rows["value"]) if k in KNOB_NAMES}
        details: dict[str, Any] = {}
        raw = rows["details_json"].dropna()
        if len(raw):
            try:
                details = json.loads(raw.iloc[0])
            except (TypeError, ValueError):
                details = {}
        continuous = {k: float(v) for k, v in (details.get("theta_continuous") or {}).items() if k in KNOB_NAMES}
        eps = rows["epsilon"].dropna()
        return GlobalPriorVersion(
            version=int(version), values=clip_knobs(values), continuous={**values, **continuous},
            n_domains=int(rows["n_domains"].iloc[0]), epsilon=float(eps.iloc[0]) if len(eps) else None,
            details=details, created_at=rows["created_at"].iloc[0],
        )

    def batches_after(self, kind: str, last_id: int, last_ingested_at: str | None) -> pd.DataFrame:
        """``ingest_batches`` rows of a kind past a sensor cursor: by id OR by time.

        Why both: a store that was reset restarts ids, not the clock.
        """
        tbl = table("ingest_batches")
        cond = tbl.c.id > int(last_id)
        if last_ingested_at:
            cond = cond | (tbl.c.ingested_at > pd.Timestamp(last_ingested_at).to_pydatetime())
        stmt = select(tbl).where(tbl.c.kind == kind, cond).order_by(tbl.c.id)
        from meta_pipeline.store.frames import _statement_frame

        with self.read_conn() as conn:
            return _statement_frame(conn, stmt, tbl)

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
            return self._replace(conn, tbl, domain, rows)
        with self.write() as c:
            return self._replace(c, tbl, domain, rows)

    @staticmethod
    def _replace(conn: Connection, tbl: Table, domain: str, rows: pd.DataFrame) -> int:
        lock_partition(conn, tbl.name, domain)
        mark_written(conn, tbl.name)
        conn.execute(delete(tbl).where(tbl.c.domain == domain))
        return insert_frame(conn, tbl, rows)

    def set_lesson_factors(self, conn: Connection, domain: str) -> int:
        """Fill ``learning_lessons.latent_factor_id`` of a domain from its ``latent_factors`` rows.

        The column's one owner is the ``latent_factors`` asset (it calls this in the
        transaction that writes its table); every other column of learning_lessons is
        the ``lessons`` asset's. A lesson without a factor row gets NULL.
        """
        validate_domain(domain)
        lock_partition(conn, "learning_lessons", domain)
        mark_written(conn, "learning_lessons")
        result = conn.execute(text(
            "UPDATE learning_lessons SET latent_factor_id = ("
            " SELECT lf.latent_factor_id FROM latent_factors lf"
            " WHERE lf.domain = learning_lessons.domain AND lf.lesson_key = learning_lessons.lesson_key)"
            " WHERE domain = :d"), {"d": domain})
        return int(result.rowcount or 0)

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

    # -- overrides versions (the closed loop) ---------------------------------
    def write_overrides_version(self, domain: str, overrides: pd.DataFrame, *, as_of: pd.Timestamp,
                                knobs: Mapping[str, float], regime_weights: pd.DataFrame,
                                fit_window_start: pd.Timestamp | None = None, drift_event_id: int | None = None,
                                run_id: str | None = None, now: pd.Timestamp | None = None) -> int:
        """Replace the domain's pm_overrides with a new version, and keep that version forever.

        One transaction (under the pm_overrides lock): the next version number (max + 1),
        the pm_overrides partition (rows carry the version), the version's rows appended to
        pm_overrides_history and its pm_overrides_versions row (as_of, knobs, regime weights).
        Returns the version.
        """
        validate_domain(domain)
        now = now if now is not None else pd.Timestamp.now(tz="UTC")
        with self.write() as conn:
            lock_partition(conn, "pm_overrides", domain)
            top = conn.execute(text("SELECT MAX(version) FROM pm_overrides_versions WHERE domain = :d"),
                               {"d": domain}).scalar()
            version = int(top or 0) + 1
            rows = overrides.assign(version=version)
            self._replace(conn, table("pm_overrides"), domain, rows.assign(domain=domain))
            history = overrides.assign(domain=domain, version=version, materialized_at=now, as_of=as_of)
            insert_frame(conn, table("pm_overrides_history"), history)
            weights = regime_weights.drop(columns=["domain"], errors="ignore")
            insert_frame(conn, table("pm_overrides_versions"), pd.DataFrame([{
                "domain": domain, "version": version, "materialized_at": now, "as_of": as_of,
                "n_overrides": len(overrides), "knobs_json": json.dumps(dict(knobs), sort_keys=True),
                "regime_weights_json": weights.to_json(orient="records", date_format="iso"),
                "fit_window_start": fit_window_start, "drift_event_id": drift_event_id, "run_id": run_id}]))
        return version

    def override_versions(self, domain: str) -> pd.DataFrame:
        """The domain's pm_overrides_versions rows, oldest version first."""
        return self.read("pm_overrides_versions", domain=domain, order_by="version")

    def override_version_rows(self, domain: str, version: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
        """(override rows, regime weights, knobs) of one stored version: what re-applies it exactly."""
        meta = self.read("pm_overrides_versions", domain=domain, equals={"version": int(version)})
        if meta.empty:
            raise KeyError(f"domain {domain!r} has no overrides version {version}")
        rows = self.read("pm_overrides_history", domain=domain, equals={"version": int(version)})
        weights = pd.read_json(io.StringIO(meta["regime_weights_json"].iloc[0]), orient="records")
        if weights.empty:
            weights = pd.DataFrame(columns=["regime", "metric", "weight", "center", "scale", "n_trades", "pooled"])
        return rows, weights, parse_knobs(meta["knobs_json"].iloc[0])

    def write_feedback(self, domain: str, cycles: pd.DataFrame, events: pd.DataFrame,
                       monitor_state: pd.DataFrame) -> list[int]:
        """One transaction: the domain's feedback_cycles replaced, new drift_events appended, the
        drift monitor's state replaced. Returns the ids of the events appended."""
        validate_domain(domain)
        with self.write() as conn:
            lock_partition(conn, "feedback_cycles", domain)
            self._replace(conn, table("feedback_cycles"), domain, cycles.assign(domain=domain))
            self._replace(conn, table("drift_monitor_state"), domain, monitor_state.assign(domain=domain))
            ids: list[int] = []
            tbl = table("drift_events")
            for record in events.assign(domain=domain).to_dict(orient="records"):
                clean = {k: (None if (isinstance(v, float) and np.isnan(v)) or v is pd.NaT else v)
                         for k, v in record.items()}
                ids.append(int(conn.execute(tbl.insert().values(**clean)).inserted_primary_key[0]))
            mark_written(conn, "drift_events")
        return ids

    # -- ingest: source rows replaced by key, in one transaction --------------
    def write_trades_batch(self, trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame,
                           metrics: pd.DataFrame, quarantine: pd.DataFrame, *, domain: str, source: str,
                           now: pd.Timestamp) -> tuple[int, int, int]:
        """Land one validated trades file: re-sent trade ids replace their rows, bad rows go to quarantine.

        Every row of a re-sent trade goes first, child rows included (also those left
        behind by a trades partition replaced without its children: keyed by trade id,
        they would collide). One transaction with the batch record the sensors follow.
        Returns (ingested, replaced, quarantined).
        """
        validate_domain(domain)
        with self.write() as conn:
            prior = self.trades_partition_prior(conn, domain)
            ingested, replaced, quarantined = self.land_trades_rows(conn, prior, trades, patterns, scope, metrics,
                                                                    quarantine, domain=domain, now=now)
            self.record_batch(conn, domain, "trades", source, ingested, quarantined, now)
        return ingested, replaced, quarantined

    def trades_partition_prior(self, conn: Connection, domain: str) -> list[str]:
        """Take the trades partition's lock; the trade tables holding rows of ``domain`` before this
        transaction (the only ones a landed trade id can collide with)."""
        validate_domain(domain)
        lock_partition(conn, "trades", domain)
        return [name for name in ("trades", "trade_patterns", "trade_scope", "trade_metrics")
                if self._has_rows(conn, name, domain)]

    def land_trades_rows(self, conn: Connection, prior: list[str], trades: pd.DataFrame, patterns: pd.DataFrame,
                         scope: pd.DataFrame, metrics: pd.DataFrame, quarantine: pd.DataFrame, *, domain: str,
                         now: pd.Timestamp) -> tuple[int, int, int]:
        """Insert validated trade rows (one file, or one span of it) inside the caller's transaction.

        Every row of a re-sent trade goes first, child rows included (also those left behind
        by a trades partition replaced without its children: keyed by trade id, they would
        collide), from the tables in ``prior`` (``trades_partition_prior``): the ids of one
        file are distinct (``validate_trades``), so rows landed earlier in the same
        transaction never collide. ``replaced`` is the DELETE's row count: no read of every
        id of the domain. Returns (ingested, replaced, quarantined).
        """
        deleted = self._delete_keys(conn, prior, domain, "trade_id", trades["trade_id"])
        ingested = insert_frame(conn, table("trades"), trades.assign(ingested_at=now))
        insert_frame(conn, table("trade_patterns"), patterns)
        insert_frame(conn, table("trade_scope"), scope)
        insert_frame(conn, table("trade_metrics"), metrics)
        quarantined = insert_frame(conn, table("quarantine"), quarantine.assign(quarantined_at=now))
        return ingested, deleted.get("trades", 0), quarantined

    def write_telemetry_batch(self, telemetry: pd.DataFrame, quarantine: pd.DataFrame, *, domain: str,
                              source: str, now: pd.Timestamp) -> tuple[int, int, int]:
        """Land one validated telemetry file: a re-sent tick (same ts) replaces its row. Returns (ingested, replaced, quarantined)."""
        validate_domain(domain)
        with self.write() as conn:
            lock_partition(conn, "telemetry", domain)
            existing = self.read("telemetry", domain=domain, columns=["ts"], conn=conn)["ts"]
            overlap = pd.DatetimeIndex(telemetry["ts"]).intersection(pd.DatetimeIndex(existing))
            if len(overlap):
                self._delete_keys(conn, ["telemetry"], domain, "ts", pd.Series(overlap))
            ingested = insert_frame(conn, table("telemetry"), telemetry.assign(ingested_at=now))
            quarantined = insert_frame(conn, table("quarantine"), quarantine.assign(quarantined_at=now))
            self.record_batch(conn, domain, "telemetry", source, ingested, quarantined, now)
        return ingested, len(overlap), quarantined

    def append_runtime_telemetry(self, domain: str, rows: pd.DataFrame, source: str) -> int:
        """Telemetry written by a runtime (already validated rows) plus its batch record."""
        validate_domain(domain)
        now = pd.Timestamp.now(tz="UTC")
        with self.write() as conn:
            n = insert_frame(conn, table("telemetry"), rows.assign(domain=domain, source_file=source, ingested_at=now))
            self.record_batch(conn, domain, "telemetry", source, n, 0, now)
        return n

    @staticmethod
    def record_batch(conn: Connection, domain: str, kind: str, source: str, rows_ingested: int,
                     rows_quarantined: int, ingested_at: pd.Timestamp | None = None) -> None:
        """Log a landed batch (same transaction as its rows): what the sensors watch."""
        if rows_ingested == 0:
            return  # nothing new to learn from
        insert_frame(conn, table("ingest_batches"), pd.DataFrame([{
            "domain": domain, "kind": kind, "source": source, "rows_ingested": rows_ingested,
            "rows_quarantined": rows_quarantined, "ingested_at": ingested_at or pd.Timestamp.now(tz="UTC")}]))

    @staticmethod
    def _has_rows(conn: Connection, table_name: str, domain: str) -> bool:
        tbl = table(table_name)
        return conn.execute(select(tbl.c.domain).where(tbl.c.domain == domain).limit(1)).first() is not None

    @staticmethod
    def _delete_keys(conn: Connection, table_names: list[str], domain: str, column: str,
                     keys: pd.Series) -> dict[str, int]:
        """Delete the rows of ``domain`` whose ``column`` is one of ``keys``, from each table.

        The keys are staged once in a temporary table (bulk insert) and every DELETE joins
        it: one statement per table whatever the number of keys. Why: chunked ``IN (…)``
        lists cost SQLAlchemy a compile per 500 keys — ~20 s of deleting when a 1M-trade
        file was sent again — and a per-key executemany was slower still. The table is
        created and dropped inside the caller's transaction (DDL is transactional on
        SQLite and PostgreSQL): an error rolls the CREATE back too. Returns the rows deleted per table.
        """
        if not table_names or len(keys) == 0:
            return {}
        first = table(table_names[0])
        staged = Table(STAGED_KEYS, MetaData(), Column("key", first.c[column].type, nullable=False),
                       prefixes=["TEMPORARY"])
        staged.create(conn)
        insert_frame(conn, staged, pd.DataFrame({"key": pd.Series(keys).drop_duplicates().to_numpy()}))
        deleted = {}
        for name in table_names:
            tbl = table(name)
            mark_written(conn, name)
            result = conn.execute(delete(tbl).where(tbl.c.domain == domain, tbl.c[column].in_(select(staged.c.key))))
            deleted[name] = int(result.rowcount or 0)
        staged.drop(conn)
        return deleted

    # -- generic feedback (tasks) --
    # A task (any model whose outputs someone rates) partitions its tables by a `task`
    # column instead of `domain`. Its quarantine rows and ingest batches carry the task in
    # their `domain` column with kind "feedback", so the sensors' batch queries
    # (`batches_after`) serve tasks as they serve domains. Names follow the domain rule
    # (contracts.validate_task); the partition lock key is "<table>/<task>" (the tables
    # differ from every domain table, so a task and a domain of one name never share a lock).
    def replace_task_partition(self, table_name: str, task: str, rows: pd.DataFrame,
                               conn: Connection | None = None) -> int:
        """Replace exactly ``task``'s rows of a task-partitioned table, atomically. Returns rows written."""
        from meta_pipeline.contracts import validate_task

        tbl = table(table_name)
        if table_name in APPEND_ONLY_TABLES:
            raise ValueError(f"{table_name} is append-only; use append()")
        if "task" not in tbl.c:
            raise ValueError(f"{table_name} is not partitioned by task")
        validate_task(task)
        rows = rows.copy()
        if "task" in rows.columns and not rows.empty and not (rows["task"] == task).all():
            raise ValueError(f"{table_name}: rows for other tasks passed to replace_task_partition({task!r})")
        rows["task"] = task

        def replace(c: Connection) -> int:
            lock_partition(c, tbl.name, task)
            mark_written(c, tbl.name)
            c.execute(delete(tbl).where(tbl.c.task == task))
            return insert_frame(c, tbl, rows)

        if conn is not None:
            return replace(conn)
        with self.write() as c:
            return replace(c)

    def write_feedback_batch(self, feedback: pd.DataFrame, quarantine: pd.DataFrame, *, task: str, source: str,
                             now: pd.Timestamp) -> tuple[int, int, int]:
        """Land one validated feedback file (``contracts.validate_feedback``), in one transaction.

        A re-sent key (task, ts, input) — its ``feedback_id`` — replaces the stored row; bad
        rows go to quarantine; an ``ingest_batches`` row (kind "feedback", domain = the task)
        tells the feedback sensor. Returns (ingested, replaced, quarantined).
        """
        from meta_pipeline.contracts import validate_task

        validate_task(task)
        with self.write() as conn:
            lock_partition(conn, "feedback", task)
            existing = self.read("feedback", columns=["feedback_id"], equals={"task": task}, conn=conn)["feedback_id"]
            keys = feedback["feedback_id"]
            overlap = set(existing.to_numpy()).intersection(keys.to_numpy())
            if overlap:
                self._delete_task_keys(conn, "feedback", task, "feedback_id", pd.Series(sorted(overlap)))
            ingested = insert_frame(conn, table("feedback"), feedback.assign(task=task, ingested_at=now))
            quarantined = insert_frame(conn, table("quarantine"), quarantine.assign(quarantined_at=now))
            self.record_batch(conn, task, "feedback", source, ingested, quarantined, now)
        return ingested, len(overlap), quarantined

    def read_feedback(self, task: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """A task's feedback rows in stream order (ts, then feedback_id)."""
        from meta_pipeline.contracts import validate_task

        return self.read("feedback", columns=columns, equals={"task": validate_task(task)},
                         order_by=["ts", "feedback_id"])

    def read_feedback_cycles_generic(self, task: str | None = None) -> pd.DataFrame:
        """The cycles of one task (or of every task), in cycle order."""
        from meta_pipeline.contracts import validate_task

        equals = {"task": validate_task(task)} if task is not None else None
        return self.read("feedback_cycles_generic", equals=equals, order_by=["task", "cycle"])

    RETRAIN_COLUMNS = ("retrain_requested", "retrain_requested_at", "retrain_run_key")

    def write_feedback_cycles_generic(self, task: str, cycles: pd.DataFrame) -> int:
        """Replace a task's ``feedback_cycles_generic`` rows; the retrain-request columns survive.

        The figures are the asset's; ``retrain_requested`` / ``_at`` / ``_run_key`` are the
        retrain sensor's (``mark_retrain_requested``). In one transaction under the
        partition lock (which the sensor's mark takes too), a recomputed cycle keeps its
        request when it is the same cycle: same number, cycle_size, model version and first
        ts, and still complete. Returns rows written.
        """
        from meta_pipeline.contracts import validate_task

        validate_task(task)
        with self.write() as conn:
            lock_partition(conn, "feedback_cycles_generic", task)
            old = self.read("feedback_cycles_generic", equals={"task": task, "retrain_requested": True},
                            columns=["cycle", "cycle_size", "model_version", "first_ts", *self.RETRAIN_COLUMNS],
                            conn=conn)
            rows = cycles.drop(columns=[c for c in self.RETRAIN_COLUMNS if c in cycles.columns]).reset_index(drop=True)
            keep = np.zeros(len(rows), dtype=bool)
            found = pd.DataFrame(index=rows.index, columns=list(self.RETRAIN_COLUMNS))
            if len(old) and len(rows):
                def ident(frame: pd.DataFrame) -> pd.DataFrame:
                    version = frame["model_version"].astype(object)
                    return pd.DataFrame({"cycle": frame["cycle"].astype(np.int64).to_numpy(),
                                         "cycle_size": frame["cycle_size"].astype(np.int64).to_numpy(),
                                         "version": version.where(version.notna(), "").astype(str).to_numpy(),
                                         "first_ts": pd.to_datetime(frame["first_ts"], utc=True).to_numpy()})

                found = ident(rows).merge(pd.concat([ident(old), old[list(self.RETRAIN_COLUMNS)].reset_index(drop=True)],
                                                    axis=1), on=["cycle", "cycle_size", "version", "first_ts"], how="left")
                keep = found["retrain_requested"].eq(True).to_numpy() & rows["complete"].astype(bool).to_numpy()
            rows["retrain_requested"] = keep
            rows["retrain_requested_at"] = pd.to_datetime(found["retrain_requested_at"], utc=True).where(keep)
            rows["retrain_run_key"] = found["retrain_run_key"].astype(object).where(keep, None)
            return self.replace_task_partition("feedback_cycles_generic", task, rows, conn=conn)

    def mark_retrain_requested(self, task: str, cycles: Sequence[int], run_key: str, at: pd.Timestamp) -> int:
        """Record that a re-training run was requested for these cycles (complete, due, not yet
        requested ones only). Returns the rows marked."""
        from meta_pipeline.contracts import validate_task

        validate_task(task)
        numbers = sorted({int(c) for c in cycles})
        if not numbers:
            return 0
        tbl = table("feedback_cycles_generic")
        stamp = pd.Timestamp(at)
        stamp = (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")).to_pydatetime()
        with self.write() as conn:
            lock_partition(conn, tbl.name, task)
            mark_written(conn, tbl.name)
            result = conn.execute(
                tbl.update()
                .where(tbl.c.task == task, tbl.c.cycle.in_(numbers), tbl.c.retrain_due.is_(True),
                       tbl.c.retrain_requested.is_(False))
                .values(retrain_requested=True, retrain_requested_at=stamp, retrain_run_key=run_key)
            )
            return int(result.rowcount or 0)

    def pending_retrains(self, task: str | None = None) -> pd.DataFrame:
        """Cycles that broke a threshold, are complete, and have no re-training request yet (task, cycle order)."""
        from meta_pipeline.contracts import validate_task

        equals: dict[str, Any] = {"retrain_due": True, "retrain_requested": False}
        if task is not None:
            equals["task"] = validate_task(task)
        return self.read("feedback_cycles_generic", equals=equals, order_by=["task", "cycle"])

    @staticmethod
    def _delete_task_keys(conn: Connection, table_name: str, task: str, column: str, keys: pd.Series) -> None:
        """``_delete_keys`` for a task-partitioned table: the keys staged once, one DELETE joining them."""
        if len(keys) == 0:
            return
        tbl = table(table_name)
        staged = Table(STAGED_KEYS, MetaData(), Column("key", tbl.c[column].type, nullable=False),
                       prefixes=["TEMPORARY"])
        staged.create(conn)
        insert_frame(conn, staged, pd.DataFrame({"key": pd.Series(keys).drop_duplicates().to_numpy()}))
        mark_written(conn, table_name)
        conn.execute(delete(tbl).where(tbl.c.task == task, tbl.c[column].in_(select(staged.c.key))))
        staged.drop(conn)
