"""SQL text of reads, typed frames from rows (with SQLite fast paths), and bulk inserts (COPY on PostgreSQL)."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
from sqlalchemy import Boolean, DateTime, Float, Integer, String, text
from sqlalchemy.engine import Connection
from sqlalchemy.engine.cursor import CursorFetchStrategy
from sqlalchemy.exc import OperationalError

from meta_pipeline.contracts import Table, table, validate_domain
from meta_pipeline.store.engine import mark_written


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Select(NamedTuple):
    """A read() as SQL: the table, the statement, its parameters and the columns it returns."""

    tbl: Table
    sql: str
    bind: dict[str, Any]
    columns: list[str]
    ordered: bool  # has an ORDER BY: the row order is part of the answer


def _bind_value(column: Any, value: Any, dialect: str) -> Any:
    """A filter value in the form the dialect compares correctly with the stored column.

    SQLite keeps timestamps as SQLAlchemy's text ('%Y-%m-%d %H:%M:%S.%f', UTC), which
    compares correctly as text; PostgreSQL takes an aware datetime.
    """
    if isinstance(column.type, DateTime) and value is not None:
        stamp = pd.Timestamp(value)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return stamp.strftime("%Y-%m-%d %H:%M:%S.%f") if dialect == "sqlite" else stamp.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _order_names(order_by: Sequence[str] | str | None) -> list[str]:
    if not order_by:
        return []
    names = order_by.split(",") if isinstance(order_by, str) else list(order_by)
    return [n.strip() for n in names if n.strip()]


def _select(table_name: str, domain: str | None, columns: Sequence[str] | None,
            equals: Mapping[str, Any] | None, after: Mapping[str, Any] | None,
            order_by: Sequence[str] | str | None, dialect: str) -> _Select:
    """The SQL of a read(): every name checked against the schema, every value bound."""
    tbl = table(table_name)
    cols = list(columns) if columns else [c.name for c in tbl.columns]
    order = _order_names(order_by)
    unknown = (set(cols) | set(equals or {}) | set(after or {}) | set(order)) - set(tbl.columns.keys())
    if unknown:
        raise KeyError(f"{table_name}: unknown column(s) {sorted(unknown)}")
    clauses: list[str] = []
    bind: dict[str, Any] = {}
    if domain is not None:
        clauses.append("domain = :domain")
        bind["domain"] = validate_domain(domain)
    for i, (name, value) in enumerate((equals or {}).items()):
        clauses.append(f"{_q(name)} = :eq{i}")
        bind[f"eq{i}"] = _bind_value(tbl.c[name], value, dialect)
    for i, (name, value) in enumerate((after or {}).items()):
        clauses.append(f"{_q(name)} > :gt{i}")
        bind[f"gt{i}"] = _bind_value(tbl.c[name], value, dialect)
    sql = f'SELECT {", ".join(_q(c) for c in cols)} FROM {_q(tbl.name)}'
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    if order:
        sql += " ORDER BY " + ", ".join(_q(n) for n in order)
    return _Select(tbl, sql, bind, cols, bool(order))


def _statement_frame(conn: Connection, stmt: Any, tbl: Table) -> pd.DataFrame:
    """A SQLAlchemy Core select's rows as a frame typed like read()'s."""
    result = conn.execute(stmt)
    rows = [tuple(r) for r in result.fetchall()]
    return _typed(_rows_to_frame(rows, list(result.keys())), tbl)


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
        direct = type(result.cursor_strategy) is CursorFetchStrategy and result.cursor is not None
        if direct and tbl is not None and conn.dialect.name == "sqlite" and _not_null_kinds(tbl, columns) is not None:
            chunked = _not_null_frame_in_chunks(result.cursor, columns, tbl)
            if chunked is not None:
                return chunked
            result.close()  # a chunk the fast path refused: read again, the general way
            result = conn.execute(text(sql), bind)
        if direct:
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


FETCH_CHUNK_ROWS = 500_000  # rows turned into columns at a time by the NOT NULL fast path


def _not_null_frame_in_chunks(cursor: Any, columns: list[str], tbl: Table) -> pd.DataFrame | None:
    """The NOT NULL fast path, FETCH_CHUNK_ROWS rows at a time (None: a chunk it refuses).

    Why: the driver's tuples cost ~100 bytes a row beside the columns they become; a
    5M-trade domain's 19.6M metric rows fetched at once held ~2 GiB of tuples (while the
    lessons were being mined: the 5M peak). A chunk at a time, they cost one chunk.
    """
    parts: list[pd.DataFrame] = []
    while True:
        rows = cursor.fetchmany(FETCH_CHUNK_ROWS)
        if not rows:
            break
        part = _not_null_rows_to_frame(rows, columns, tbl)
        del rows
        if part is None:
            return None
        parts.append(part)
    if not parts:
        return None  # no rows: the general path types the empty frame
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def _rows_to_frame(rows: list, columns: list[str]) -> pd.DataFrame:
    try:
        from pandas.io.sql import _wrap_result  # what read_sql_query itself calls
    except ImportError:  # pragma: no cover - a pandas that moved it
        return pd.DataFrame.from_records(rows, columns=columns, coerce_float=True)
    return _wrap_result(rows, columns, coerce_float=True)


_TEXT_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)  # what read_sql_query gives text columns


def _not_null_kinds(tbl: Table, columns: Sequence[str]) -> list[str] | None:
    """"text" or "float" per column when every column is NOT NULL text, time (SQLite keeps
    times as text) or float and named once: what _not_null_rows_to_frame converts; else None."""
    if not columns or len(set(columns)) != len(columns):
        return None
    kinds = []
    for name in columns:
        col = tbl.c.get(name)
        if col is None or col.nullable:
            return None
        if isinstance(col.type, Float):
            kinds.append("float")
        elif isinstance(col.type, (DateTime, String)):
            kinds.append("text")
        else:
            return None
    return kinds


def _not_null_rows_to_frame(rows: list, columns: list[str], tbl: Table) -> pd.DataFrame | None:
    """The same frame as _rows_to_frame, built column-wise through pyarrow, for NOT NULL text/float/time columns.

    Why: pandas infers every column's type value by value and then re-encodes text as
    arrow strings; when the schema already says "text, never null" (the source tables)
    one arrow conversion per column is 2-3x faster. Anything else (nullable or other
    column types, empty results, a value that is not what the schema says): None, and
    the caller takes pandas' path.
    """
    kinds = _not_null_kinds(tbl, columns)
    if not rows or kinds is None:
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
        # plain numpy ints only: a nullable Int64 column goes through numpy as floats (5117.0), which
        # SQLite quietly stores as 5117 but PostgreSQL's COPY refuses for an integer column
        if series.dtype.kind in "iu" and isinstance(series.dtype, np.dtype):
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
