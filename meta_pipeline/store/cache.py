"""The per-run read cache of the source tables (no Dagster: the Dagster resource creates one per run)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pandas as pd



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

    def discard(self, query: tuple) -> None:
        """Drop the frames of ``query`` (every version): a caller that knows the run will not read it again."""
        with self._lock:
            for k in [k for k in self._frames if k[1:] == query]:
                del self._frames[k]

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

