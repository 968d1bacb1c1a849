"""Streaming ingest of a trades file: read, validated and written span by span, in one transaction.

Why: a whole file in memory costs about 8× its size (a 2M-row CSV of 389 MB peaked at
3.2 GB), so a fleet's history export would need tens of GB. Here a file larger than one
span (``chunk_bytes`` of CSV / JSON Lines, ``chunk_rows`` of Parquet) is read in spans of
whole records; each span is validated (``contracts.validate_trades``) and inserted before
the next is read, so peak memory follows the span, not the file.

What stays exactly as for a whole file (the same rows land, the same rows are quarantined
with the same physical lines and reasons, on SQLite and PostgreSQL):

* **One transaction.** Every span is written inside one ``MetaStore.write()`` under the
  partition lock, with the batch record at the end: a file lands whole or not at all
  (an error after span k rolls spans 1..k back; the rows before the file stay).
* **Exact lines.** A span ends on a record boundary: a CSV record is parsed from its own
  lines and at most ``_CSV_MAX_RECORD_LINES`` after them, so each span is read with that
  many lines of look-ahead and the next span starts after the last record that began in
  it (``contracts._csv_records``). JSON Lines spans end at a line feed. Byte offsets
  ("not UTF-8 at byte N") are the file's.
* **A trade id repeated in the file keeps its last row, across spans.** A first pass reads
  the file span by span and keeps only the candidate ids (rows with a non-empty id the
  reader could read: the rows ``validate_trades`` dedups); their last occurrences are
  found once (arrow's hash of the ids) and only the positions of the superseded rows are
  kept. The second pass quarantines exactly those ("repeated later"). So no id reaches
  the database twice, and a re-sent id is replaced span by span (``replaced`` from the
  DELETE's row count, never a read of every id of the domain).
* **Rejected whole** (a missing column, no JSON object, an unreadable header or Parquet
  file): found by the first pass, before anything is written.

Memory: one span's frames plus, during the first pass, the candidate ids as arrow text
(~15 bytes a row); the second pass keeps a sorted array of superseded row positions.

A file no larger than one span is read whole (``contracts.read_input_file``) and goes
through the same writer: identical by construction.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from meta_pipeline import contracts as C
from meta_pipeline.contracts import ContractError, IngestLimits, ReadNotes, validate_domain, validate_trades
from meta_pipeline.store import MetaStore

CHUNK_BYTES = 32 * 1024 * 1024  # CSV / JSON Lines span; META_PIPELINE_INGEST_CHUNK_BYTES
CHUNK_ROWS = 200_000  # Parquet span; META_PIPELINE_INGEST_CHUNK_ROWS
FAST_BLOCK_BYTES = 16 * 1024 * 1024  # a span of a well-formed CSV (pyarrow's streaming reader) ...
FAST_READ_BYTES = 4 * 1024 * 1024  # ... made of blocks this large (the reader reads ~20 blocks ahead)
LOOKAHEAD_LINES = C._CSV_MAX_RECORD_LINES + 1  # a CSV record is decided by its lines and this many after


@dataclass(frozen=True)
class ChunkSizes:
    """How large a span is: bytes of a CSV or JSON Lines file, rows of a Parquet file."""

    chunk_bytes: int = CHUNK_BYTES
    chunk_rows: int = CHUNK_ROWS

    @classmethod
    def from_env(cls) -> ChunkSizes:
        def env(name: str, default: int) -> int:
            text = os.environ.get(name, "").strip()
            try:
                return max(1, int(text)) if text else default
            except ValueError as exc:
                raise ContractError(f"{name}={text!r}: not a whole number") from exc
        return cls(env("META_PIPELINE_INGEST_CHUNK_BYTES", CHUNK_BYTES),
                   env("META_PIPELINE_INGEST_CHUNK_ROWS", CHUNK_ROWS))


@dataclass
class StreamedTrades:
    """What landing one trades file did (``ingest.IngestReport`` is built from it)."""

    rows_read: int = 0
    ingested: int = 0
    replaced: int = 0
    quarantined: int = 0
    spans: int = 0
    reasons: Counter = field(default_factory=Counter)
    ignored_columns: list[str] = field(default_factory=list)
    duplicates_in_file: int = 0


# ---------------------------------------------------------------------------
# Spans of a file: (raw frame, physical line of each row), like read_input_file
# ---------------------------------------------------------------------------


class _Reader:
    """The spans of one file, read the same way on every pass."""

    def __init__(self, path: Path, sizes: ChunkSizes) -> None:
        self.path, self.sizes = path, sizes
        self.suffix = path.suffix.lower()
        self.whole = path.stat().st_size <= sizes.chunk_bytes if self.suffix != ".parquet" else False
        self.csv_fast = False
        self.json_columns: list[str] | None = None
        self.json_column_problems: dict[str, str] = {}
        self.parquet_float: set[str] = set()
        if self.suffix == ".parquet":
            try:
                meta = pq.ParquetFile(path).metadata
                self.whole = meta.num_rows <= sizes.chunk_rows
            except Exception:  # noqa: BLE001 - unreadable: the whole-file reader says why
                self.whole = True

    def spans(self, trade_ids_only: bool = False) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        if self.whole:
            yield C.read_input_file(self.path)
        elif self.suffix == ".csv":
            yield from (self._csv_fast_spans(trade_ids_only) if self.csv_fast else self._csv_robust_spans())
        elif self.suffix == ".parquet":
            yield from self._parquet_spans()
        else:
            yield from self._json_spans()

    # -- CSV -------------------------------------------------------------------
    def csv_fast_candidate(self, max_cell_chars: int) -> bool:
        """The file could be read by pyarrow's streaming reader (as ``contracts._read_csv_fast``);
        the first pass confirms it (one record per line)."""
        import csv

        try:
            with open(self.path, "r", encoding="utf-8-sig", newline="") as fh:
                header = next(csv.reader(fh), None)
        except (UnicodeDecodeError, csv.Error, OSError):
            return False
        if not header or any("\x00" in n for n in header) or header[0].lstrip().startswith(("{", "[")):
            return False
        if len(set(header)) != len(header) or any(n.strip() == "" for n in header):
            return False
        self.csv_header = header
        self.max_cell_chars = max_cell_chars
        self.physical_lines, lone_cr, self.maybe_long_cells = _csv_line_stats(self.path, self.max_cell_chars)
        return not lone_cr

    def _csv_fast_spans(self, trade_ids_only: bool) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        header = self.csv_header
        include = ["trade_id"] if trade_ids_only and "trade_id" in header else header
        source = pa.OSFile(str(self.path))  # a plain file: with a path pyarrow holds far more of it in memory
        span_bytes = min(self.sizes.chunk_bytes, FAST_BLOCK_BYTES)
        reader = pa_csv.open_csv(
            source,
            # small blocks, joined into spans below: pyarrow's streaming reader keeps many blocks
            # in flight (16 MiB blocks held ~500 MiB of a 5M-row file; 4 MiB blocks ~150 MiB)
            read_options=pa_csv.ReadOptions(block_size=min(span_bytes, FAST_READ_BYTES),
                                            use_threads=not trade_ids_only),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False,
                quoted_strings_can_be_null=False, null_values=[], auto_dict_encode=False, include_columns=include),
        )
        done = 0

        def span(batches: list[pa.RecordBatch]) -> tuple[pd.DataFrame, np.ndarray]:
            raw = pa.Table.from_batches(batches).to_pandas(
                types_mapper=lambda t: C._TEXT_DTYPE if pa.types.is_string(t) else None)
            raw.attrs["read_notes"] = ReadNotes("csv")
            return raw, np.arange(done, done + len(raw), dtype=np.int64) + 2

        pending: list[pa.RecordBatch] = []
        pending_bytes = 0
        for batch in _closing(reader, source):
            if batch.num_rows == 0:
                continue
            if batch.schema.names != include or any(not pa.types.is_string(t) for t in batch.schema.types):
                raise _NotFast()
            pending.append(batch)
            pending_bytes += batch.nbytes
            if pending_bytes >= span_bytes:
                raw, lines = span(pending)
                pending, pending_bytes = [], 0
                yield raw, lines
                done += len(raw)
                del raw, lines  # not alive while the next span is read
        if pending:
            raw, lines = span(pending)
            yield raw, lines
            done += len(raw)
        if done + 1 != self.physical_lines:  # a blank line, or a record over several lines
            raise _NotFast()

    def _csv_robust_spans(self) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        blocks = _LineBlocks(self.path, self.sizes.chunk_bytes, LOOKAHEAD_LINES)
        try:
            if blocks.no_line_feed:
                yield C._read_csv_robust(self.path)
                return
            header = None
            line_base = 0
            while (block := blocks.next()) is not None:
                data, pos, _eof, main_end = block
                lines = C._CsvLines(data, pos)
                start = 0
                if header is None:
                    header = C._csv_header(self.path, data, lines)
                    start = header.after_header
                stop = min(max(int(np.searchsorted(lines.starts, main_end)), start + 1), lines.n)
                table, all_lines, problems, nxt = C._csv_records(lines, header, start, stop)
                yield C._csv_frame(table, problems, header), all_lines + line_base
                blocks.consume(int(lines.starts[nxt]) if nxt < lines.n else len(data))
                line_base += nxt
        finally:
            blocks.close()

    # -- JSON Lines ------------------------------------------------------------
    def _json_spans(self) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        blocks = _LineBlocks(self.path, self.sizes.chunk_bytes, 0)
        try:
            if blocks.no_line_feed:
                yield C._read_json_lines(self.path)
                return
            line_base = 0
            while (block := blocks.next()) is not None:
                data, pos, _eof, _ = block
                records, lines_list, errors = C._json_lines_records(data, pos, line_base + 1)
                line_base += data.count(b"\n")
                blocks.consume(len(data))
                yield (C._json_lines_frame(records, errors, self.json_columns, self.json_column_problems),
                       np.asarray(lines_list, dtype=np.int64))
        finally:
            blocks.close()

    # -- Parquet ---------------------------------------------------------------
    def _parquet_spans(self) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        try:
            file = pq.ParquetFile(self.path)
            done = 0
            for batch in file.iter_batches(batch_size=self.sizes.chunk_rows):
                table = pa.Table.from_batches([batch])
                for name in self.parquet_float:  # as a whole read gives it: ints with a null anywhere are floats
                    i = table.schema.get_field_index(name)
                    table = table.set_column(i, name, pc.cast(table.column(i), pa.float64()))
                frame = table.to_pandas()
                flat = [C._flatten_json_record(r) for r in frame.to_dict(orient="records")]
                raw = (pd.DataFrame(flat, dtype=object) if flat
                       else pd.DataFrame(columns=list(frame.columns), dtype=object))
                raw.attrs["read_notes"] = ReadNotes("parquet")
                yield raw, np.arange(done, done + len(raw), dtype=np.int64) + 1
                done += len(raw)
        except (ContractError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the Parquet reader raises: not (readable) Parquet
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ContractError(f"{self.path}: not a readable Parquet file ({first[:300]})") from exc

    def parquet_prepare(self) -> None:
        """Integer columns with a null anywhere in the file: read as float64 in every span (pandas
        makes such a column float when the whole file is read)."""
        try:
            file = pq.ParquetFile(self.path)
            names = [f.name for f in file.schema_arrow if pa.types.is_integer(f.type)]
            for batch in file.iter_batches(batch_size=self.sizes.chunk_rows, columns=names or None):
                if names:
                    self.parquet_float |= {n for n in names if batch.column(n).null_count}
        except Exception as exc:  # noqa: BLE001
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ContractError(f"{self.path}: not a readable Parquet file ({first[:300]})") from exc


def _closing(reader: pa_csv.CSVStreamingReader, source: pa.NativeFile) -> Iterator[pa.RecordBatch]:
    try:
        yield from reader
    finally:
        source.close()


class _NotFast(Exception):
    """The CSV is not one record per line: read it with the robust reader."""


def _csv_line_stats(path: Path, long_line: int) -> tuple[int, int, bool]:
    """(physical lines, lone carriage returns, whether a line may be longer than ``long_line``
    bytes), in one pass over the file in blocks (``contracts._csv_line_count``'s counts).

    A line longer than ``long_line`` holds a whole aligned window of ``long_line // 2``
    bytes without a line feed; no such window means no such line (the answer errs only
    towards checking cells).
    """
    window = max(long_line // 2, 1)
    block_size = window * max(1, (8 << 20) // window)
    n_lf = n_cr = n_crlf = 0
    prev_cr = False
    last = b""
    maybe_long = False
    with open(path, "rb") as fh:
        while block := fh.read(block_size):
            n_lf += block.count(b"\n")
            if b"\r" in block:
                n_cr += block.count(b"\r")
                n_crlf += block.count(b"\r\n")
            if prev_cr and block[:1] == b"\n":
                n_crlf += 1
            prev_cr = block[-1:] == b"\r"
            last = block[-1:]
            if not maybe_long:
                full = len(block) // window * window
                if full == 0 or len(block) < window:
                    maybe_long = maybe_long or (len(block) >= window and b"\n" not in block)
                else:
                    arr = np.frombuffer(block, dtype=np.uint8, count=full).reshape(-1, window)
                    maybe_long = bool(~(arr == 10).any(axis=1).all())
    return n_lf + (1 if last and last != b"\n" else 0), n_cr - n_crlf, maybe_long


class _LineBlocks:
    """Blocks of whole lines of a file, each the span proper (``chunk_bytes``, extended to a line
    end) plus ``lookahead`` more lines; the reader says how much of a block it used
    (``consume``) and the next block starts there."""

    def __init__(self, path: Path, chunk_bytes: int, lookahead: int) -> None:
        import codecs

        self.fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.chunk, self.lookahead = chunk_bytes, lookahead
        self.buf = self.fh.read(chunk_bytes)
        self.pos = 0
        if self.buf.startswith(codecs.BOM_UTF8):
            self.buf, self.pos = self.buf[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
        self.eof = False
        while b"\n" not in self.buf and self._more(chunk_bytes):
            pass
        self.no_line_feed = b"\n" not in self.buf  # no line feed in the whole file: read it whole (classic Mac)

    def _more(self, n: int) -> bool:
        more = self.fh.read(n)
        if not more:
            self.eof = True
            return False
        self.buf += more
        return True

    def next(self) -> tuple[bytes, int, bool, int] | None:
        """(block, its byte offset in the file, at end of file, end of the span proper in the block)."""
        while not self.eof and len(self.buf) < self.chunk:
            self._more(self.chunk)
        if not self.buf and self.eof:
            return None
        start = min(self.chunk, len(self.buf)) - 1
        while (k := self.buf.find(b"\n", start)) < 0 and self._more(self.chunk):
            pass
        main_end = len(self.buf) if k < 0 else k + 1
        while self.lookahead and not self.eof and self.buf.count(b"\n", main_end) < self.lookahead:
            self._more(max(self.chunk // 4, 1 << 16))
        if self.eof and self.lookahead:  # the rest of the file: the reader takes the span proper
            return self.buf, self.pos, True, min(main_end, len(self.buf))
        if self.eof:
            return self.buf[:main_end], self.pos, main_end >= len(self.buf), main_end
        cut = self.buf.rfind(b"\n") + 1 if self.lookahead else main_end
        return self.buf[:cut], self.pos, False, main_end

    def consume(self, n: int) -> None:
        self.buf = self.buf[n:]
        self.pos += n

    def close(self) -> None:
        self.fh.close()


# ---------------------------------------------------------------------------
# The first pass: which rows are repeated later in the file
# ---------------------------------------------------------------------------


def _candidate_ids(raw: pd.DataFrame, limits: IngestLimits, check_cells: bool) -> tuple[pa.Array, np.ndarray]:
    """(stripped trade ids, candidate mask) exactly as ``validate_trades`` dedups: a non-empty id on a
    row the reader could read (and with no cell over the limit)."""
    notes = C._read_notes(raw)
    cells, _, _ = C._text_cells(raw["trade_id"])
    ids = C._stripped(cells)
    candidates = C._mask(pc.not_equal(ids, ""))
    problem_labels = set(notes.row_problems)
    if check_cells:
        problem_labels |= set(limits.cell_problems(raw))
    if problem_labels:
        positions = raw.index.get_indexer([label for label in problem_labels if label in raw.index])
        candidates[positions[positions >= 0]] = False
    return ids, candidates


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def id_hashes(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash of each text value (FNV-1a over its UTF-8 bytes, then the splitmix64
    finalizer), vectorized over arrow's buffers: one numpy step per byte position.

    Only a pre-filter: rows whose hash is unique have a unique id; rows sharing a hash are
    compared by their exact text (``superseded_rows``), so a collision costs time, never a row.
    """
    arr = ids.cast(pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.empty(0, dtype=np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        live = np.arange(n)
        for j in range(int(lengths.max(initial=0))):
            live = live[lengths[live] > j]
            h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
        h ^= lengths.astype(np.uint64)
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h


def _candidate_spans(reader: _Reader, limits: IngestLimits, source: str, check_cells: bool
                     ) -> Iterator[tuple[int, pa.Array, np.ndarray]]:
    """(global position of the span's first row, stripped ids, candidate mask) of every span with ids."""
    done = 0
    for raw, _lines in reader.spans(trade_ids_only=not check_cells):
        notes = C._read_notes(raw)
        if raw.empty and notes.line_errors:
            continue
        if "trade_id" not in raw.columns or len(raw) == 0:
            if reader.suffix == ".csv" or reader.whole or reader.suffix == ".parquet":
                C._require_columns(raw, C.TRADE_REQUIRED, source, notes)
            done += len(raw)
            continue
        trade_ids, candidates = _candidate_ids(raw, limits, check_cells)
        yield done, trade_ids, candidates
        done += len(raw)


def superseded_rows(reader: _Reader, limits: IngestLimits, source: str) -> np.ndarray:
    """Global row positions (over the spans, in order) of candidate rows whose id comes again later.

    First pass: a 64-bit hash (``id_hashes``) and the position of every candidate row, 16
    bytes a row. Rows whose hash occurs once are unique. Only when some hash repeats (a
    file with repeated ids, or a collision) are the ids of those rows read again and
    compared exactly (``contracts._duplicated_keep_last``): exact, whatever the hash does.
    Raises ContractError for a file rejected whole (checked on every span, before any write).
    """
    check_cells = not reader.csv_fast or reader.maybe_long_cells
    positions: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    json_lines = reader.suffix in (".jsonl", ".ndjson", ".json") and not reader.whole
    columns: list[str] = []
    column_problems: dict[str, str] = {}
    first_error: tuple | None = None
    any_rows = False
    spans = reader.spans(trade_ids_only=not check_cells)
    if json_lines:  # the file's columns, in the order a whole read gives them, and its first line error
        def noting(frames):
            nonlocal first_error, any_rows
            for raw, lines in frames:
                notes = C._read_notes(raw)
                for col in raw.columns:
                    if col not in column_problems and col in notes.column_problems:
                        column_problems[col] = notes.column_problems[col]
                seen = set(columns)
                columns.extend(c for c in raw.columns if c not in seen)
                if first_error is None and notes.line_errors:
                    first_error = notes.line_errors[0]
                any_rows = any_rows or len(raw) > 0
                yield raw, lines
        reader_spans = reader.spans
        reader.spans = lambda trade_ids_only=False: noting(reader_spans(trade_ids_only))  # type: ignore[method-assign]
        try:
            for start, trade_ids, candidates in _candidate_spans(reader, limits, source, check_cells):
                idx = np.flatnonzero(candidates)
                positions.append(idx + start)
                hashes.append(id_hashes(trade_ids.take(pa.array(idx))))
        finally:
            reader.spans = reader_spans  # type: ignore[method-assign]
        if not any_rows:
            if first_error is None:
                raise ContractError(f"{reader.path}: empty file (no JSON object, only blank lines)")
            line, reason, _ = first_error
            raise ContractError(f"{reader.path}: not JSON Lines: no line is a JSON object (line {line}: {reason})")
        reader.json_columns, reader.json_column_problems = columns, column_problems
        C._require_columns(pd.DataFrame(columns=columns), C.TRADE_REQUIRED, source, ReadNotes("jsonl"))
    else:
        del spans
        for start, trade_ids, candidates in _candidate_spans(reader, limits, source, check_cells):
            idx = np.flatnonzero(candidates)
            positions.append(idx + start)
            hashes.append(id_hashes(trade_ids.take(pa.array(idx)) if len(idx) < len(trade_ids) else trade_ids))
    if not positions:
        return np.empty(0, dtype=np.int64)
    h = np.concatenate(hashes)
    pos = np.concatenate(positions)
    del hashes, positions
    order = np.argsort(h, kind="stable")
    sorted_h = h[order]
    same = sorted_h[1:] == sorted_h[:-1]
    if not same.any():
        return np.empty(0, dtype=np.int64)
    shared = np.zeros(len(h), dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    members = np.sort(pos[order[shared]])
    del h, pos, order, sorted_h
    # exact: the ids of the rows sharing a hash, read again, compared as text (file order)
    ids: list[pa.Array] = []
    for start, trade_ids, _candidates in _candidate_spans(reader, limits, source, check_cells):
        lo, hi = np.searchsorted(members, [start, start + len(trade_ids)])
        if hi > lo:
            ids.append(trade_ids.take(pa.array(members[lo:hi] - start)).cast(pa.large_string()))
    later = C._duplicated_keep_last(pa.chunked_array(ids, type=pa.large_string()).combine_chunks())
    return members[later]


# ---------------------------------------------------------------------------
# The second pass: validate and write span by span, in one transaction
# ---------------------------------------------------------------------------


def ingest_trades_file(store: MetaStore, path: str | Path, *, domain: str, source: str,
                       sizes: ChunkSizes | None = None, limits: IngestLimits | None = None,
                       after_span: Callable[[int], None] | None = None) -> StreamedTrades:
    """Land one trades file span by span in one transaction (see the module docstring).

    ``after_span(k)`` is called after span k (1-based) is written, inside the transaction
    (tests inject a failure there: nothing of the file must remain).
    """
    validate_domain(domain)
    path = Path(path)
    sizes = sizes or ChunkSizes.from_env()
    limits = limits or IngestLimits.from_env()
    if path.suffix.lower() not in C.INPUT_SUFFIXES:
        raise ContractError(f"{path.name}: unsupported file type {path.suffix.lower()!r} (use .csv, .jsonl or .parquet)")
    try:
        if path.stat().st_size == 0:
            raise ContractError(f"{path}: empty file (no header line, no rows)")
        reader = _Reader(path, sizes)
        superseded: np.ndarray | None = None
        if not reader.whole:
            if reader.suffix == ".parquet":
                reader.parquet_prepare()
            if reader.suffix == ".csv" and reader.csv_fast_candidate(limits.max_cell_chars):
                reader.csv_fast = True
                try:
                    superseded = superseded_rows(reader, limits, source)
                except (_NotFast, pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
                    reader.csv_fast = False
            if superseded is None:
                superseded = superseded_rows(reader, limits, source)
            pa.default_memory_pool().release_unused()  # the first pass's buffers, before the writes
        return _write_spans(store, reader, superseded, domain=domain, source=source, limits=limits,
                            after_span=after_span)
    except OSError as exc:
        raise ContractError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


def _write_spans(store: MetaStore, reader: _Reader, superseded: np.ndarray | None, *, domain: str, source: str,
                 limits: IngestLimits, after_span: Callable[[int], None] | None) -> StreamedTrades:
    out = StreamedTrades()
    now = pd.Timestamp.now(tz="UTC")
    done = 0
    with store.write() as conn:
        prior = store.trades_partition_prior(conn, domain)  # takes the partition lock
        for raw, lines in reader.spans():
            repeated_later = None
            if superseded is not None:
                repeated_later = _repeated_later(superseded, done)
            batch = validate_trades(raw, lines, domain=domain, source=source, limits=limits,
                                    repeated_later=repeated_later)
            done += len(raw)
            ingested, replaced, quarantined = store.land_trades_rows(
                conn, prior, batch.trades, batch.patterns, batch.scope, batch.metrics, batch.quarantine,
                domain=domain, now=now)
            out.spans += 1
            out.rows_read += batch.n_rows
            out.ingested += ingested
            out.replaced += replaced
            out.quarantined += quarantined
            out.duplicates_in_file += batch.duplicates_in_file
            out.ignored_columns += [c for c in batch.ignored_columns if c not in out.ignored_columns]
            for reason in batch.quarantine.get("reason", pd.Series(dtype=str)):
                for part in str(reason).split("; "):
                    out.reasons[part.split(":")[0].split(" at byte ")[0]] += 1
            del batch, raw
            if after_span is not None:
                after_span(out.spans)
        store.record_batch(conn, domain, "trades", source, out.ingested, out.quarantined, now)
    return out


def _repeated_later(superseded: np.ndarray, offset: int) -> Callable[[pa.Array, np.ndarray], np.ndarray]:
    def repeated(_trade_ids: pa.Array, candidates: np.ndarray) -> np.ndarray:
        lo, hi = np.searchsorted(superseded, [offset, offset + len(candidates)])
        dup = np.zeros(len(candidates), dtype=bool)
        dup[superseded[lo:hi] - offset] = True
        return dup & candidates
    return repeated
