"""The data contract: table schemas (SQLAlchemy Core) and input validation.

Every table another program relies on is declared here, once. Input files are
validated here too, as pure functions from a raw DataFrame to clean frames plus a
quarantine frame, so the CLI and the inbox sensor share one path.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from meta_pipeline.knobs import KNOB_NAMES

# ---------------------------------------------------------------------------
# Domain names
# ---------------------------------------------------------------------------

DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ContractError(ValueError):
    """Input that breaks the data contract as a whole (not a single bad row)."""


def validate_domain(name: object) -> str:
    """Return the domain name unchanged, or raise ContractError saying why not.

    Called before a name reaches SQL, a path or a partition key.
    """
    if not isinstance(name, str) or not DOMAIN_RE.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 70 else repr(name[:67] + "...")
        raise ContractError(
            f"invalid domain name {shown}: must match {DOMAIN_RE.pattern} "
            "(lowercase letters, digits, '_' and '-', 1-63 characters, starting with a letter or digit)"
        )
    return name


# ---------------------------------------------------------------------------
# The telemetry schema
# ---------------------------------------------------------------------------

# The telemetry schema, once: every reader (ingest, the controller, priors, diagnostics,
# the reward) takes its column names from here.
TELEMETRY_OUTCOMES = ("gain_p50", "stability_mean", "vram_utilization", "latency_ms")
TELEMETRY_REQUIRED = ("ts", *TELEMETRY_OUTCOMES)
TELEMETRY_KNOB_COLUMNS = tuple(f"knob_{name}" for name in KNOB_NAMES)  # store layout of `knob.<name>`
TELEMETRY_STORE_COLUMNS = (*TELEMETRY_REQUIRED, *TELEMETRY_KNOB_COLUMNS)
TELEMETRY_BOUNDS = {
    "stability_mean": (0.0, 1.0),
    "vram_utilization": (0.0, 1.0),
    "latency_ms": (0.0, math.inf),
}


def knob_column(telemetry: pd.DataFrame, name: str) -> str | None:
    """The telemetry column holding a knob: store layout ``knob_<name>`` or file layout ``knob.<name>``."""
    for col in (f"knob_{name}", f"knob.{name}"):
        if col in telemetry.columns:
            return col
    return None


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------

metadata = MetaData()
D = lambda: Column("domain", String(63), nullable=False)  # noqa: E731 - one column factory

# -- source tables ----------------------------------------------------------
trades = Table(
    "trades",
    metadata,
    D(),
    Column("trade_id", String(200), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=False),
    Column("regime", String(100), nullable=False),
    Column("strategy_id", String(200), nullable=False),
    Column("return_r", Float, nullable=False),
    Column("source_file", Text),
    Column("ingested_at", DateTime(timezone=True)),
    Index("ix_trades_domain_trade", "domain", "trade_id", unique=True),
    Index("ix_trades_domain_closed", "domain", "closed_at"),
)
trade_patterns = Table(
    "trade_patterns",
    metadata,
    D(),
    Column("trade_id", String(200), nullable=False),
    Column("pattern", String(200), nullable=False),
    # the natural key as a clustered primary key (SQLite: WITHOUT ROWID): one B-tree per
    # table instead of rows + a (domain, trade_id) index; a domain's rows are read as one
    # range and bulk loads write ~40% less (see README, benchmark)
    PrimaryKeyConstraint("domain", "trade_id", "pattern", name="pk_trade_patterns"),
    sqlite_with_rowid=False,
)
trade_scope = Table(
    "trade_scope",
    metadata,
    D(),
    Column("trade_id", String(200), nullable=False),
    Column("key", String(100), nullable=False),
    Column("value", String(200), nullable=False),
    PrimaryKeyConstraint("domain", "trade_id", "key", name="pk_trade_scope"),
    sqlite_with_rowid=False,
)
trade_metrics = Table(
    "trade_metrics",
    metadata,
    D(),
    Column("trade_id", String(200), nullable=False),
    Column("metric", String(100), nullable=False),
    Column("value", Float, nullable=False),
    PrimaryKeyConstraint("domain", "trade_id", "metric", name="pk_trade_metrics"),
    sqlite_with_rowid=False,
)
telemetry = Table(
    "telemetry",
    metadata,
    D(),
    Column("ts", DateTime(timezone=True), nullable=False),
    *[Column(name, Float, nullable=False) for name in TELEMETRY_OUTCOMES],
    *[Column(f"knob_{name}", Float) for name in KNOB_NAMES],
    Column("source_file", Text),
    Column("ingested_at", DateTime(timezone=True)),
    Index("ix_telemetry_domain_ts", "domain", "ts", unique=True),
)
backtest_runs = Table(
    "backtest_runs",
    metadata,
    Column("run_id", String(200), primary_key=True),
    D(),
    Column("strategy_id", String(200), nullable=False),
    Column("regime", String(100)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("metrics_json", Text, nullable=False),
    Index("ix_backtest_domain", "domain"),
)
configs = Table(
    "configs",
    metadata,
    Column("target_type", String(50), nullable=False),
    Column("target_id", String(300), nullable=False),
    Column("version", Integer, nullable=False),
    Column("config_json", Text, nullable=False),
    Column("active", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True)),
    Column("created_by", String(200)),
    Column("proposal_id", String(100)),
    Index("ix_configs_target_version", "target_type", "target_id", "version", unique=True),
)
quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("domain", String(300)),  # raw, may be the invalid name that caused the row
    Column("kind", String(20), nullable=False),  # trades | telemetry | feedback (domain = the task)
    Column("source_file", Text, nullable=False),
    Column("line", Integer, nullable=False),  # 1-based line in the file; 0 = whole file
    Column("reason", Text, nullable=False),
    Column("raw_json", Text),
    Column("quarantined_at", DateTime(timezone=True), nullable=False),
    Index("ix_quarantine_domain", "domain"),
)

ingest_batches = Table(
    "ingest_batches",
    metadata,
    # one row per landed batch of source rows (an ingested file, a runtime write):
    # the sensors' cursors follow `id`, and run keys name id + ingested_at, so a batch
    # triggers exactly one run even across restarts or a store that was reset.
    Column("id", Integer, primary_key=True, autoincrement=True),
    D(),
    Column("kind", String(20), nullable=False),  # trades | telemetry | feedback (domain = the task)
    Column("source", Text, nullable=False),
    Column("rows_ingested", Integer, nullable=False),
    Column("rows_quarantined", Integer, nullable=False),
    Column("ingested_at", DateTime(timezone=True), nullable=False),
    Index("ix_ingest_batches_domain_kind", "domain", "kind"),
)

# -- derived tables (one per asset) ------------------------------------------
learning_lessons = Table(
    "learning_lessons",
    metadata,
    D(),
    Column("lesson_key", String(600), nullable=False),
    Column("pattern", String(200), nullable=False),
    Column("scope_json", Text, nullable=False),
    Column("n_scope_keys", Integer, nullable=False),
    Column("n", Integer, nullable=False),
    Column("edge_mean", Float, nullable=False),
    Column("edge_std", Float),
    Column("edge_se", Float),
    Column("edge_lcb", Float),
    Column("first_seen", DateTime(timezone=True)),
    Column("last_seen", DateTime(timezone=True)),
    Column("latent_factor_id", String(100)),
    Index("ix_learning_lessons_domain_key", "domain", "lesson_key", unique=True),
)
learning_edge_history = Table(
    "learning_edge_history",
    metadata,
    D(),
    Column("lesson_key", String(600), nullable=False),
    Column("bucket_start", DateTime(timezone=True), nullable=False),
    Column("n", Integer, nullable=False),
    Column("edge_mean", Float, nullable=False),
    Column("edge_se", Float),
    Index("ix_edge_history_domain_key", "domain", "lesson_key"),
)
half_life_fits = Table(
    "half_life_fits",
    metadata,
    D(),
    Column("lesson_key", String(600), nullable=False),
    Column("e0", Float),
    Column("e0_se", Float),
    Column("decay_rate_per_hour", Float),
    Column("decay_rate_ci_low", Float),
    Column("decay_rate_ci_high", Float),
    Column("half_life_hours", Float),
    Column("half_life_ci_low", Float),
    Column("half_life_ci_high", Float),
    Column("state", String(30), nullable=False),
    Column("n_buckets", Integer, nullable=False),
    Column("n_trades", Integer),
    Column("t_ref", DateTime(timezone=True)),
    Index("ix_half_life_domain_key", "domain", "lesson_key", unique=True),
)
latent_factors = Table(
    "latent_factors",
    metadata,
    D(),
    Column("lesson_key", String(600), nullable=False),
    Column("latent_factor_id", String(100), nullable=False),
    Column("factor_size", Integer),
    Index("ix_latent_factors_domain_key", "domain", "lesson_key", unique=True),
)
learning_regime_weights = Table(
    "learning_regime_weights",
    metadata,
    D(),
    Column("regime", String(100), nullable=False),
    Column("metric", String(100), nullable=False),
    Column("weight", Float, nullable=False),
    Column("center", Float, nullable=False),
    Column("scale", Float, nullable=False),
    Column("n_trades", Integer, nullable=False),
    Column("pooled", Boolean, nullable=False),
    Column("alpha", Float),
    Column("note", Text),
    Index("ix_regime_weights_domain", "domain"),
)
def _override_columns() -> list[Column]:
    """The columns of an override row (pm_overrides and every version of it in pm_overrides_history)."""
    return [
        Column("latent_factor_id", String(100), nullable=False),
        Column("lesson_key", String(600), nullable=False),
        Column("pattern", String(200), nullable=False),
        Column("scope_json", Text, nullable=False),
        Column("n_scope_keys", Integer, nullable=False),
        Column("regime", String(100)),  # null = any regime
        Column("edge", Float, nullable=False),
        Column("support", Integer, nullable=False),
        Column("valid_until", DateTime(timezone=True)),
        Column("source_json", Text),  # the lessons, fits and knobs the row came from
    ]


pm_overrides = Table(
    "pm_overrides",
    metadata,
    D(),
    *_override_columns(),
    Column("version", Integer),  # the domain's overrides version these rows are (pm_overrides_versions)
    Index("ix_pm_overrides_domain", "domain"),
)
# Every materialization of pm_overrides is a new version of the domain (1, 2, ...), kept
# forever: what it learned from (as_of = the newest closed_at of its trades), the knobs and
# the regime weights it was built with, so any past version re-applies exactly.
pm_overrides_versions = Table(
    "pm_overrides_versions",
    metadata,
    D(),
    Column("version", Integer, nullable=False),
    Column("materialized_at", DateTime(timezone=True), nullable=False),
    Column("as_of", DateTime(timezone=True), nullable=False),
    Column("n_overrides", Integer, nullable=False),
    Column("knobs_json", Text, nullable=False),
    Column("regime_weights_json", Text, nullable=False),
    Column("fit_window_start", DateTime(timezone=True)),  # trades before it were left out (a drift break)
    Column("drift_event_id", Integer),  # the drift event that bounded the window, if any
    Column("run_id", String(100)),
    Index("ix_pm_overrides_versions_domain_version", "domain", "version", unique=True),
)
pm_overrides_history = Table(
    "pm_overrides_history",
    metadata,
    D(),
    Column("version", Integer, nullable=False),
    Column("materialized_at", DateTime(timezone=True), nullable=False),
    Column("as_of", DateTime(timezone=True), nullable=False),
    *_override_columns(),
    Index("ix_pm_overrides_history_domain_version", "domain", "version"),
)
feedback_cycles = Table(
    "feedback_cycles",
    metadata,
    D(),
    Column("cycle", Integer, nullable=False),
    Column("overrides_version", Integer, nullable=False),
    Column("first_closed_at", DateTime(timezone=True), nullable=False),
    Column("last_closed_at", DateTime(timezone=True), nullable=False),
    Column("first_trade_id", String(200), nullable=False),
    Column("last_trade_id", String(200), nullable=False),
    Column("n", Integer, nullable=False),
    Column("complete", Boolean, nullable=False),  # false: the version's last, partial cycle
    Column("cycle_size", Integer, nullable=False),
    *[Column(name, Float) for name in ("rank_ic", "ic_t", "mz_intercept", "mz_slope", "mz_slope_ci_low",
                                        "mz_slope_ci_high", "hit_rate", "mse", "mse_zero", "alignment",
                                        "residual_mean", "residual_sd", "coherence", "turnover")],
    Column("drift_alarm", Boolean, nullable=False),
    Index("ix_feedback_cycles_domain_cycle", "domain", "cycle", unique=True),
)
drift_events = Table(
    "drift_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    D(),
    Column("detected_at", DateTime(timezone=True), nullable=False),  # wall clock of the detection
    Column("trade_id", String(200), nullable=False),  # the trade at which the detector alarmed
    Column("closed_at", DateTime(timezone=True), nullable=False),
    Column("change_trade_id", String(200)),  # the estimated change point, when the detector gives one
    Column("change_closed_at", DateTime(timezone=True)),
    Column("detector", String(50), nullable=False),  # the whole stream's detector, or "ph_factor"
    Column("stream", String(200), default="all"),  # "all" trades, or "factor:<latent_factor_id>"
    Column("statistic", Float),
    Column("overrides_version", Integer, nullable=False),  # the version whose residuals drifted
    Index("ix_drift_events_domain", "domain"),
)
drift_monitor_state = Table(
    "drift_monitor_state",
    metadata,
    D(),
    Column("state_json", Text, nullable=False),  # the detector's state: a new batch continues the stream
    Column("n_seen", Integer, nullable=False),
    Column("last_closed_at", DateTime(timezone=True)),  # the stream position: the last residual consumed
    Column("last_trade_id", String(200)),
    Column("stream_digest", String(64)),  # of the consumed prefix's (trade, version) pairs: a rewrite restarts
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_drift_monitor_state_domain", "domain", unique=True),
)
domain_priors = Table(
    "domain_priors",
    metadata,
    D(),
    Column("knob", String(50), nullable=False),
    Column("mean", Float, nullable=False),
    Column("std", Float, nullable=False),
    Column("n_obs", Integer, nullable=False),
    Column("best_value", Float),
    Column("best_reward", Float),
    Column("reward_mean", Float),
    Column("updated_at", DateTime(timezone=True)),
    Index("ix_domain_priors_domain_knob", "domain", "knob", unique=True),
)
global_prior = Table(
    "global_prior",
    metadata,
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("knob", String(50), nullable=False),
    Column("value", Float, nullable=False),
    Column("n_domains", Integer, nullable=False),
    Column("epsilon", Float),
    Column("details_json", Text),
    Index("ix_global_prior_version_knob", "version", "knob", unique=True),
)
controller_state = Table(
    "controller_state",
    metadata,
    D(),
    Column("knobs_json", Text, nullable=False),
    Column("cooldowns_json", Text, nullable=False),
    Column("reward_ema", Float),
    Column("rollbacks", Integer, nullable=False),
    Column("decisions", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("state_json", Text),  # the rest of the controller's memory (snapshot, rng, ...)
    Column("last_ts", DateTime(timezone=True)),  # newest telemetry tick consumed
    Column("config_version", Integer),  # the applied META_KNOBS config version the controller adopted
    Index("ix_controller_state_domain", "domain", unique=True),
)
meta_decisions = Table(
    "meta_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    D(),
    Column("decision_no", Integer, nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    Column("reward", Float),
    Column("reward_ema", Float),
    Column("rolled_back", Boolean, nullable=False),
    Column("policy_updates_json", Text, nullable=False),
    Column("knobs_json", Text, nullable=False),
    Column("telemetry_json", Text, nullable=False),
    Column("note", Text),
    Index("ix_meta_decisions_domain", "domain", "decision_no"),
)
diagnostics = Table(
    "diagnostics",
    metadata,
    D(),
    Column("section", String(50), nullable=False),
    Column("subject", String(300), nullable=False),
    Column("metric", String(100), nullable=False),
    Column("value", Float),
    Column("ci_low", Float),
    Column("ci_high", Float),
    Column("n", Integer),
    Column("p_value", Float),
    Column("details_json", Text),
    Index("ix_diagnostics_domain", "domain"),
)
meta_controller_config_proposals = Table(
    "meta_controller_config_proposals",
    metadata,
    Column("proposal_id", String(100), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("domain", String(63)),
    Column("target_type", String(50), nullable=False),
    Column("target_id", String(300), nullable=False),
    Column("current_config_snapshot_json", Text, nullable=False),
    Column("proposed_config_json", Text, nullable=False),
    Column("rationale_text", Text, nullable=False),
    Column("evidence_json", Text, nullable=False),
    Column("evidence_hash", String(64), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("status", String(20), nullable=False),
    Column("status_changed_at", DateTime(timezone=True)),
    Column("reviewed_by", String(200)),
    Column("applied_at", DateTime(timezone=True)),
    Column("applied_by", String(200)),
    Column("applied_config_version", Integer),
    Index("ix_proposals_status", "status"),
    Index("ix_proposals_evidence", "evidence_hash"),
)
config_change_log = Table(
    "config_change_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("changed_at", DateTime(timezone=True), nullable=False),
    Column("proposal_id", String(100)),
    Column("action", String(20), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("target_type", String(50), nullable=False),
    Column("target_id", String(300), nullable=False),
    Column("from_version", Integer),
    Column("to_version", Integer),
    Column("before_json", Text),
    Column("after_json", Text),
)

APPEND_ONLY_TABLES = frozenset({"meta_decisions", "config_change_log", "global_prior", "quarantine", "ingest_batches",
                                "pm_overrides_versions", "pm_overrides_history", "drift_events"})


def table(name: str) -> Table:
    try:
        return metadata.tables[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {sorted(metadata.tables)}") from None


# ---------------------------------------------------------------------------
# Lesson identity
# ---------------------------------------------------------------------------


def lesson_key(pattern: str, scope: dict[str, str]) -> str:
    """`pattern|k1=v1,k2=v2` with keys sorted; `pattern|` for no scope."""
    return pattern + "|" + ",".join(f"{k}={scope[k]}" for k in sorted(scope))


def parse_lesson_key(key: str) -> tuple[str, dict[str, str]]:
    pattern, _, scope_text = key.partition("|")
    scope = dict(part.split("=", 1) for part in scope_text.split(",")) if scope_text else {}
    return pattern, scope


# ---------------------------------------------------------------------------
# Input files
# ---------------------------------------------------------------------------

TRADE_REQUIRED = ("trade_id", "closed_at", "regime", "return_r", "patterns")
DOMAIN_KINDS = ("trades", "telemetry")  # per domain: the inbox's folders, the domain source assets
TASK_KINDS = ("feedback",)  # per task (see "Generic feedback" below)
KINDS = (*DOMAIN_KINDS, *TASK_KINDS)  # every ingest kind: quarantine.kind and ingest_batches.kind


@dataclass
class TradesBatch:
    """Validated trades of one file, in the shape of the source tables."""

    trades: pd.DataFrame
    patterns: pd.DataFrame
    scope: pd.DataFrame
    metrics: pd.DataFrame
    quarantine: pd.DataFrame
    n_rows: int = 0


@dataclass
class TelemetryBatch:
    telemetry: pd.DataFrame
    quarantine: pd.DataFrame
    n_rows: int = 0
    ignored_columns: list[str] = field(default_factory=list)


def read_input_file(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read CSV / JSON Lines / Parquet into a raw frame of objects plus the 1-based file line of each row.

    JSON Lines objects `scope` and `metrics` are flattened to `scope.<k>` / `metric.<k>`
    columns, so both formats validate through one path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw = _read_csv_fast(path)
        if raw is None:  # anything unusual: pandas' parser, whose behaviour is the reference
            raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], skip_blank_lines=True)
        lines = np.arange(len(raw), dtype=np.int64) + 2  # header is line 1
        return raw, lines
    if suffix in (".jsonl", ".ndjson", ".json"):
        records: list[dict] = []
        lines_list: list[int] = []
        bad: list[tuple[int, str]] = []
        with path.open("r", encoding="utf-8") as fh:
            for lineno, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                    if not isinstance(obj, dict):
                        raise ValueError("line is not a JSON object")
                except ValueError as exc:
                    bad.append((lineno, f"unparsable JSON: {exc}"))
                    continue
                records.append(_flatten_json_record(obj))
                lines_list.append(lineno)
        raw = pd.DataFrame.from_records(records) if records else pd.DataFrame()
        raw.attrs["json_errors"] = bad
        return raw, np.asarray(lines_list, dtype=np.int64)
    if suffix == ".parquet":
        try:
            raw = pd.read_parquet(path)
        except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
            raise ContractError(f"{path.name}: reading Parquet needs pyarrow ({exc})") from exc
        flat = [_flatten_json_record(r) for r in raw.to_dict(orient="records")]
        return pd.DataFrame.from_records(flat), np.arange(len(raw), dtype=np.int64) + 1
    raise ContractError(f"{path.name}: unsupported file type {suffix!r} (use .csv, .jsonl or .parquet)")


def _read_csv_fast(path: Path) -> pd.DataFrame | None:
    """A well-formed CSV through pyarrow's multi-threaded reader, every cell as text.

    Why: about 3x faster than pandas' parser on large files. It gives the same frame
    as ``pd.read_csv(dtype=str, keep_default_na=False)`` for a regular file; for
    anything it would treat differently (ragged rows, bad UTF-8, an empty file,
    duplicate or empty header names) it fails or we return None, and the caller
    falls back to pandas.
    """
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            return None
        table = pa_csv.read_csv(
            path,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False,
                quoted_strings_can_be_null=False, null_values=[], auto_dict_encode=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, csv.Error, OSError):
        return None
    names = table.column_names
    if names != header or len(set(names)) != len(names) or any(n.strip() == "" for n in names):
        return None
    if any(not pa.types.is_string(t) for t in table.schema.types):
        return None
    text_dtype = pd.StringDtype("pyarrow", na_value=np.nan)  # what pandas gives for dtype=str
    return table.to_pandas(types_mapper=lambda t: text_dtype if pa.types.is_string(t) else None)


def _flatten_json_record(obj: dict) -> dict:
    out: dict = {}
    for key, value in obj.items():
        if key in ("scope", "metrics") and isinstance(value, dict):
            prefix = "scope." if key == "scope" else "metric."
            for k, v in value.items():
                out[prefix + str(k)] = v
        elif key == "knobs" and isinstance(value, dict):
            for k, v in value.items():
                out["knob." + str(k)] = v
        else:
            out[key] = value
    return out


def _require_columns(raw: pd.DataFrame, required: tuple[str, ...], source: str) -> None:
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise ContractError(f"{source}: missing required column(s): {', '.join(missing)}")


def _to_float(series: pd.Series) -> pd.Series:
    """Numbers as float64; empty or unparsable -> NaN (the caller decides whether that is a bad row)."""
    if isinstance(series.dtype, pd.StringDtype) or series.dtype == object:
        try:  # a clean text column: arrow's (correctly rounded) parser, ~10x pandas' per-value path
            values = pc.utf8_trim_whitespace(_arrow_text(series))
            parsed = pc.cast(pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values), pa.float64())
            return pd.Series(parsed.to_numpy(zero_copy_only=False), index=series.index, dtype=float)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass  # some value is not a number: pandas coerces it to NaN, value by value
    return pd.to_numeric(series.replace("", np.nan), errors="coerce").astype(float)


def _to_utc(series: pd.Series) -> pd.Series:
    """ISO-8601 -> UTC; naive times are UTC; offsets are converted. Unparsable -> NaT."""
    text = series.astype("string").str.strip()
    return pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")


def _quarantine_frame(
    kind: str, domain: str, source: str, lines: np.ndarray, reasons: pd.Series, raw: pd.DataFrame, mask: np.ndarray
) -> pd.DataFrame:
    if not mask.any():
        return pd.DataFrame(columns=["domain", "kind", "source_file", "line", "reason", "raw_json"])
    bad_raw = raw.loc[mask]
    return pd.DataFrame(
        {
            "domain": domain,
            "kind": kind,
            "source_file": source,
            "line": lines[mask].astype(int),
            "reason": reasons[mask].to_numpy(),
            "raw_json": [json.dumps(r, default=str) for r in bad_raw.to_dict(orient="records")],
        }
    )


def _json_error_rows(raw: pd.DataFrame, kind: str, domain: str, source: str) -> pd.DataFrame:
    errors = raw.attrs.get("json_errors", [])
    return pd.DataFrame(
        {
            "domain": domain,
            "kind": kind,
            "source_file": source,
            "line": [e[0] for e in errors],
            "reason": [e[1] for e in errors],
            "raw_json": None,
        }
    )


def _add_reason(reasons: pd.Series, mask: pd.Series | np.ndarray, text: str) -> None:
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():  # the common case: nothing to write
        return
    current = reasons[mask]
    reasons[mask] = np.where(current == "", text, current + "; " + text)


def _arrow_text(series: pd.Series) -> pa.Array:
    """``series.astype("string")`` as one pyarrow string array (nulls kept).

    Zero-copy for the text columns a CSV gives; JSON Lines values (numbers, None) go
    through ``astype("string")`` exactly as before.
    """
    values = series.array
    if not (isinstance(series.dtype, pd.StringDtype) and series.dtype.storage == "pyarrow"):
        values = series.astype("string").array
    arr = pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr


def _stripped(series: pd.Series) -> pa.Array:
    """``series.astype("string").str.strip().fillna("")`` (pandas strips with this same arrow kernel)."""
    return pc.fill_null(pc.utf8_trim_whitespace(_arrow_text(series)), "")


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def _interned(arr: pa.Array) -> np.ndarray:
    """Text as an object array of Python str, one shared object per distinct value.

    Why: patterns, scope keys/values, regimes repeat a handful of values over millions
    of rows; building one str per distinct value and indexing is far cheaper than one
    per row, and the database driver takes the same objects.
    """
    if len(arr) == 0:
        return np.array([], dtype=object)
    enc = arr.dictionary_encode()
    uniques = np.array(enc.dictionary.to_pylist(), dtype=object)
    return uniques[enc.indices.to_numpy(zero_copy_only=False)]


def _duplicated_keep_last(arr: pa.Array) -> np.ndarray:
    """Like ``Series.duplicated(keep="last")`` over text, via integer codes."""
    codes = arr.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    return pd.Series(codes).duplicated(keep="last").to_numpy()


def _constant_text(value: str, n: int) -> pd.Series:
    """n references to one str (np.full would build n separate copies of it)."""
    values = np.empty(n, dtype=object)
    values.fill(value)
    return pd.Series(values, dtype=object)


def _in_trade_order(frame: pd.DataFrame, trade_rank: np.ndarray) -> pd.DataFrame:
    """The rows sorted by their trade's rank (stable: a trade's rows keep their order)."""
    return frame.take(np.argsort(trade_rank, kind="stable")).reset_index(drop=True)


def _text_column(values: np.ndarray) -> pd.Series:
    # object dtype on purpose: the values are already Python str (what the driver
    # binds); letting pandas re-encode them as arrow strings costs a copy both ways
    return pd.Series(values, dtype=object)


def _explode_patterns(series: pd.Series) -> pd.DataFrame:
    """'a|b' strings (CSV) or lists (JSON Lines) -> long frame (row position, pattern), vectorized.

    Names are stripped, empty names dropped, and a pattern repeated on one trade kept
    once: a pattern either fired on a trade or it did not.
    """
    values = series.reset_index(drop=True)
    is_list = values.map(lambda v: isinstance(v, (list, tuple, np.ndarray))) if values.dtype == object else None
    if is_list is not None and is_list.any():
        split = values.where(is_list, values[~is_list].astype("string").str.split("|"))
        exploded = split.explode()
        pattern = exploded.astype("string").str.strip()
        keep = (pattern.notna() & (pattern != "")).to_numpy()
        out = pd.DataFrame({"row": exploded.index.to_numpy()[keep], "pattern": pattern.to_numpy()[keep]})
        return out.drop_duplicates(ignore_index=True)
    # text: split, flatten and strip in arrow (a Python str.split per row was most of validation)
    lists = pc.split_pattern(_arrow_text(values), "|")
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    names = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = _mask(pc.not_equal(names, ""))
    rows, names = rows[keep], names.filter(pa.array(keep))
    enc = names.dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniques = np.array(enc.dictionary.to_pylist(), dtype=object)
    first = ~pd.Series(rows * max(len(uniques), 1) + codes).duplicated().to_numpy()
    return pd.DataFrame({"row": rows[first], "pattern": _text_column(uniques[codes[first]])})


def validate_trades(raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> TradesBatch:
    """Validate a raw trades frame against the contract.

    Bad rows go to the quarantine frame with their line and every reason; good rows
    become the four source-table frames. A missing required column raises ContractError.
    Text columns of the frames are object arrays of Python str.
    """
    validate_domain(domain)
    json_bad = _json_error_rows(raw, "trades", domain, source)
    if raw.empty and not json_bad.empty:
        return TradesBatch(*(_empty_trades_frames()), quarantine=json_bad, n_rows=len(json_bad))
    _require_columns(raw, TRADE_REQUIRED, source)
    n = len(raw)
    reasons = pd.Series([""] * n, index=raw.index, dtype=object)

    trade_id = _stripped(raw["trade_id"])
    id_empty = _mask(pc.equal(trade_id, ""))
    _add_reason(reasons, id_empty, "empty trade_id")
    _add_reason(reasons, _mask(pc.greater(pc.utf8_length(trade_id), 200)), "trade_id longer than 200 characters")
    closed_at = _to_utc(raw["closed_at"])
    _add_reason(reasons, closed_at.isna(), f"unparsable closed_at")
    regime = _stripped(raw["regime"])
    _add_reason(reasons, _mask(pc.equal(regime, "")), "empty regime")
    return_r = _to_float(raw["return_r"])
    _add_reason(reasons, ~np.isfinite(return_r.to_numpy()), "return_r is not a finite number")
    patterns = _explode_patterns(raw["patterns"])
    patterns_per_row = np.bincount(patterns["row"].to_numpy(dtype=np.int64), minlength=n)
    _add_reason(reasons, patterns_per_row == 0, "empty patterns")
    if "strategy_id" in raw.columns:
        strategy = _stripped(raw["strategy_id"])
        strategy = pc.if_else(pc.equal(strategy, ""), "default", strategy)
    else:
        strategy = pa.repeat("default", n)

    metric_cols = [c for c in raw.columns if c.startswith("metric.") and len(c) > len("metric.")]
    metric_values = {}
    for col in metric_cols:
        values = _to_float(raw[col])
        given = _mask(pc.not_equal(_stripped(raw[col]), ""))
        _add_reason(reasons, given & ~np.isfinite(values.to_numpy()), f"{col} is not a finite number")
        metric_values[col[len("metric.") :]] = values

    # a trade id appearing twice in one file: the last one wins, like a re-ingest
    dup = _duplicated_keep_last(trade_id) & ~id_empty
    _add_reason(reasons, dup, "trade_id repeated later in the same file (later row kept)")

    bad = (reasons != "").to_numpy()
    good = ~bad
    good_rows = np.flatnonzero(good)
    quarantine_rows = pd.concat(
        [json_bad, _quarantine_frame("trades", domain, source, lines, reasons, raw, bad)], ignore_index=True
    )

    take_good = pa.array(good_rows)
    ids = np.array(trade_id.take(take_good).to_pylist(), dtype=object)  # distinct per trade: one str each
    trades_df = pd.DataFrame(
        {
            "domain": _constant_text(domain, len(good_rows)),
            "trade_id": _text_column(ids),
            "closed_at": closed_at.array[good],
            "regime": _text_column(_interned(regime.take(take_good))),
            "strategy_id": _text_column(_interned(strategy.take(take_good))),
            "return_r": return_r.to_numpy()[good],
            "source_file": _constant_text(source, len(good_rows)),
        }
    )
    # the long tables go out in trade-id order: their clustered key then grows in
    # order, which makes the bulk insert ~30% cheaper than file order
    trade_rank = np.empty(len(ids), dtype=np.int64)
    trade_rank[pc.sort_indices(trade_id.take(take_good)).to_numpy()] = np.arange(len(ids))
    good_patterns = patterns[good[patterns["row"].to_numpy()]]
    pattern_rows = good_patterns["row"].to_numpy()
    # map each kept row position to its trade id and rank (good rows keep their order)
    id_by_row = np.full(n, None, dtype=object)
    id_by_row[good] = ids
    rank_by_row = np.full(n, -1, dtype=np.int64)
    rank_by_row[good] = trade_rank
    pattern_df = _in_trade_order(
        pd.DataFrame({"domain": _constant_text(domain, len(good_patterns)),
                      "trade_id": _text_column(id_by_row[pattern_rows]),
                      "pattern": _text_column(good_patterns["pattern"].to_numpy(dtype=object))}),
        rank_by_row[pattern_rows],
    )
    scope_parts, scope_ranks = [], []
    for col in (c for c in raw.columns if c.startswith("scope.") and len(c) > len("scope.")):
        values = _stripped(raw[col]).take(take_good)
        keep = _mask(pc.not_equal(values, ""))
        if keep.any():
            kept = int(keep.sum())
            scope_parts.append(
                pd.DataFrame({"domain": _constant_text(domain, kept),
                              "trade_id": _text_column(ids[keep]),
                              "key": _constant_text(col[len("scope.") :], kept),
                              "value": _text_column(_interned(values.filter(pa.array(keep))))})
            )
            scope_ranks.append(trade_rank[keep])
    scope_df = (
        _in_trade_order(pd.concat(scope_parts, ignore_index=True), np.concatenate(scope_ranks))
        if scope_parts
        else pd.DataFrame(columns=["domain", "trade_id", "key", "value"])
    )
    metric_parts, metric_ranks = [], []
    for name, values in metric_values.items():
        v = values.to_numpy()[good]
        keep = np.isfinite(v)
        if keep.any():
            kept = int(keep.sum())
            metric_parts.append(pd.DataFrame({"domain": _constant_text(domain, kept),
                                              "trade_id": _text_column(ids[keep]),
                                              "metric": _constant_text(name, kept),
                                              "value": v[keep]}))
            metric_ranks.append(trade_rank[keep])
    metrics_df = (
        _in_trade_order(pd.concat(metric_parts, ignore_index=True), np.concatenate(metric_ranks))
        if metric_parts
        else pd.DataFrame(columns=["domain", "trade_id", "metric", "value"])
    )
    return TradesBatch(trades_df, pattern_df, scope_df, metrics_df, quarantine_rows, n_rows=n + len(json_bad))


def _empty_trades_frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return (
        pd.DataFrame(columns=["domain", "trade_id", "closed_at", "regime", "strategy_id", "return_r", "source_file"]),
        pd.DataFrame(columns=["domain", "trade_id", "pattern"]),
        pd.DataFrame(columns=["domain", "trade_id", "key", "value"]),
        pd.DataFrame(columns=["domain", "trade_id", "metric", "value"]),
    )


# ---------------------------------------------------------------------------
# Telemetry rows: one checker for ingest and the controller
# ---------------------------------------------------------------------------


def _telemetry_float(series: pd.Series) -> np.ndarray:
    """A telemetry column as floats; empty or unparsable -> NaN (a numeric column is taken as it is)."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=float, na_value=np.nan)
    return _to_float(series).to_numpy()


def _telemetry_ts(series: pd.Series) -> pd.Series:
    """``ts`` as UTC timestamps (naive = UTC); unparsable -> NaT."""
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
    return _to_utc(series)


def _reported(series: pd.Series) -> np.ndarray:
    """Which cells hold a value (an empty or missing knob cell means "not reported")."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.notna().to_numpy()
    return (series.astype("string").fillna("").str.strip() != "").to_numpy()


@dataclass
class TelemetryRows:
    """Telemetry rows parsed and checked once (``check_telemetry_rows``).

    ``problems`` are the failed checks in a fixed order (ts, then each outcome: finite,
    bounds, then each knob column), each with its quarantine reason and the rows it
    failed on: ingest quarantines those rows, the controller refuses the batch naming
    the first one.
    """

    ts: pd.Series  # UTC, NaT where unparsable
    outcomes: dict[str, np.ndarray]  # TELEMETRY_OUTCOMES as floats
    knobs: dict[str, np.ndarray]  # knob name -> values (NaN = not reported), for knobs that have a column
    knob_columns: dict[str, str]  # knob name -> the column it was read from
    problems: list[tuple[str, str, np.ndarray]]  # (column, reason, bad-row mask)

    def reasons(self, index: pd.Index | None = None) -> pd.Series:
        """Per row, every reason joined by "; " ("" = the row is fine)."""
        reasons = pd.Series([""] * len(self.ts), index=index if index is not None else self.ts.index, dtype=object)
        for _, reason, mask in self.problems:
            _add_reason(reasons, mask, reason)
        return reasons

    def first_problem(self) -> tuple[int, str, str] | None:
        """(row position, column, reason) of the first failed check's first row, or None."""
        if not self.problems:
            return None
        column, reason, mask = self.problems[0]
        return int(np.flatnonzero(mask)[0]), column, reason


def check_telemetry_rows(frame: pd.DataFrame, *, file_layout: bool = False) -> TelemetryRows:
    """Parse and check telemetry rows (TELEMETRY_REQUIRED columns must be present).

    Checks: ``ts`` parseable; each outcome a finite number within TELEMETRY_BOUNDS; each
    knob cell empty (not reported) or a finite number. Knob columns: the store layout
    ``knob_<name>`` or the file layout ``knob.<name>`` (``knob_column``); with
    ``file_layout`` only ``knob.<name>`` (an input file's contract: other columns are ignored).
    """
    problems: list[tuple[str, str, np.ndarray]] = []

    def check(column: str, reason: str, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            problems.append((column, reason, mask))

    ts = _telemetry_ts(frame["ts"])
    check("ts", "unparsable ts", ts.isna().to_numpy())
    outcomes: dict[str, np.ndarray] = {}
    for col in TELEMETRY_OUTCOMES:
        values = _telemetry_float(frame[col])
        finite = np.isfinite(values)
        check(col, f"{col} is not a finite number", ~finite)
        lo, hi = TELEMETRY_BOUNDS.get(col, (-math.inf, math.inf))
        with np.errstate(invalid="ignore"):
            check(col, f"{col} outside [{lo}, {hi}]", finite & ((values < lo) | (values > hi)))
        outcomes[col] = values
    knobs: dict[str, np.ndarray] = {}
    knob_columns: dict[str, str] = {}
    for name in KNOB_NAMES:
        col = f"knob.{name}" if file_layout else knob_column(frame, name)
        if col is None or col not in frame.columns:
            continue
        values = _telemetry_float(frame[col])
        check(col, f"{col} is not a finite number", _reported(frame[col]) & ~np.isfinite(values))
        knobs[name], knob_columns[name] = values, col
    return TelemetryRows(ts, outcomes, knobs, knob_columns, problems)


def telemetry_row_problems(frame: pd.DataFrame, *, file_layout: bool = False) -> pd.Series:
    """Per row, why it breaks the telemetry contract ("" = ok); see ``check_telemetry_rows``."""
    return check_telemetry_rows(frame, file_layout=file_layout).reasons(frame.index)


def validate_telemetry(raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> TelemetryBatch:
    """Validate a raw telemetry frame; same quarantine rules as trades (the row checks:
    ``check_telemetry_rows``, plus a ts repeated later in the file)."""
    validate_domain(domain)
    json_bad = _json_error_rows(raw, "telemetry", domain, source)
    cols = ["domain", *TELEMETRY_STORE_COLUMNS, "source_file"]
    if raw.empty and not json_bad.empty:
        return TelemetryBatch(pd.DataFrame(columns=cols), json_bad, n_rows=len(json_bad))
    _require_columns(raw, TELEMETRY_REQUIRED, source)
    n = len(raw)
    checked = check_telemetry_rows(raw, file_layout=True)
    reasons = checked.reasons(raw.index)
    ts = checked.ts
    dup = ts.duplicated(keep="last") & ts.notna()
    _add_reason(reasons, dup, "ts repeated later in the same file (later row kept)")
    bad = (reasons != "").to_numpy()
    good = ~bad
    frame = pd.DataFrame({"domain": domain, "ts": ts[good].to_numpy()})
    for col in TELEMETRY_OUTCOMES:
        frame[col] = checked.outcomes[col][good]
    for name, col in zip(KNOB_NAMES, TELEMETRY_KNOB_COLUMNS):
        frame[col] = checked.knobs[name][good] if name in checked.knobs else np.full(int(good.sum()), np.nan)
    frame["source_file"] = source
    ignored = [c for c in raw.columns if c.startswith("knob.") and c[5:] not in KNOB_NAMES]
    quarantine_rows = pd.concat(
        [json_bad, _quarantine_frame("telemetry", domain, source, lines, reasons, raw, bad)], ignore_index=True
    )
    return TelemetryBatch(frame, quarantine_rows, n_rows=n + len(json_bad), ignored_columns=ignored)


# ---------------------------------------------------------------------------
# Generic feedback (tasks): any model whose outputs someone rates
# ---------------------------------------------------------------------------
#
# A *task* is any model whose outputs someone rates (an LLM prompt, a classifier, a
# ranker...). Tasks are the second partition set of the project (Dagster partitions
# `task`, shared with prompt evolution); their names follow the domain rule. One rating
# is one row of `feedback`: when (ts), what went in (input), what came out (output) and
# how good it was (score in [0, 1]).

TASK_RE = DOMAIN_RE  # same rule as domains: a task name reaches SQL, paths and partition keys too
FEEDBACK_REQUIRED = ("ts", "input", "output", "score")
FEEDBACK_STORE_COLUMNS = ("task", "feedback_id", "ts", "input", "output", "score", "model_version",
                          "metadata_json", "source_file")
MODEL_VERSION_MAX = 200


def validate_task(name: object) -> str:
    """Return the task name unchanged, or raise ContractError naming it (the domain rule, ``TASK_RE``)."""
    if not isinstance(name, str) or not TASK_RE.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 70 else repr(name[:67] + "...")
        raise ContractError(
            f"invalid task name {shown}: must match {TASK_RE.pattern} "
            "(lowercase letters, digits, '_' and '-', 1-63 characters, starting with a letter or digit)"
        )
    return name


T = lambda: Column("task", String(63), nullable=False)  # noqa: E731 - one column factory

feedback = Table(
    "feedback",
    metadata,
    T(),
    # The natural key is (task, ts, input): re-ingesting the same rating time for the same
    # input replaces the row. Inputs are unbounded text, so the key is stored as
    # feedback_id = sha256 hex of "<ts as UTC ISO-8601 with microseconds>\n<input>"
    # (``feedback_ids``): fixed width, indexable on every database.
    Column("feedback_id", String(64), nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("input", Text, nullable=False),
    Column("output", Text, nullable=False),
    Column("score", Float, nullable=False),  # in [0, 1]
    Column("model_version", String(MODEL_VERSION_MAX)),  # null: not given
    Column("metadata_json", Text),  # the row's metadata.* as a JSON object; null: none
    Column("source_file", Text),
    Column("ingested_at", DateTime(timezone=True)),
    Index("ix_feedback_task_id", "task", "feedback_id", unique=True),
    Index("ix_feedback_task_ts", "task", "ts"),
)
feedback_cycles_generic = Table(
    "feedback_cycles_generic",
    metadata,
    T(),
    # one row per cycle of `cycle_size` consecutive ratings of one model version
    # (meta_pipeline.learning.feedback_generic explains every figure)
    Column("cycle", Integer, nullable=False),
    Column("model_version", String(MODEL_VERSION_MAX)),
    Column("first_ts", DateTime(timezone=True), nullable=False),
    Column("last_ts", DateTime(timezone=True), nullable=False),
    Column("n", Integer, nullable=False),
    Column("complete", Boolean, nullable=False),  # n == cycle_size (else the version's last, partial cycle)
    Column("cycle_size", Integer, nullable=False),
    Column("mean_score", Float, nullable=False),
    Column("score_sd", Float),
    Column("score_ci_low", Float),
    Column("score_ci_high", Float),
    Column("alignment_threshold", Float, nullable=False),
    Column("below_threshold", Boolean, nullable=False),
    Column("reference_cycle", Integer),  # the cycle drift is measured against (null: none yet)
    Column("score_shift", Float),  # mean score − the reference cycle's
    Column("score_drift", Float),  # standardized mean difference vs the reference cycle
    Column("score_drift_p", Float),  # two-sided Welch t-test p-value
    Column("score_p_threshold", Float, nullable=False),
    Column("output_basis", String(10), nullable=False),  # label | token
    Column("output_drift", Float),  # Jensen–Shannon divergence (bits) of outputs vs the reference cycle
    Column("output_tv", Float),  # total variation distance of the same two distributions
    Column("drift_threshold", Float, nullable=False),
    Column("drifted", Boolean, nullable=False),
    Column("coherence", Float),  # agreement of outputs over pairs of near-identical inputs (null: no pair)
    Column("coherence_pairs", Integer, nullable=False),
    Column("breaks", Text),  # why the cycle broke a threshold, readable; null: it did not
    Column("retrain_due", Boolean, nullable=False),  # complete and (below_threshold or drifted)
    # written by the retrain sensor once its request is durable; the asset carries them over
    Column("retrain_requested", Boolean, nullable=False),
    Column("retrain_requested_at", DateTime(timezone=True)),
    Column("retrain_run_key", String(300)),
    Column("computed_at", DateTime(timezone=True), nullable=False),
    Index("ix_feedback_cycles_generic_task_cycle", "task", "cycle", unique=True),
)


@dataclass
class FeedbackBatch:
    """Validated feedback of one file, in the shape of the ``feedback`` table (FEEDBACK_STORE_COLUMNS)."""

    feedback: pd.DataFrame
    quarantine: pd.DataFrame
    n_rows: int = 0


def feedback_ids(ts: pd.Series, inputs: pd.Series) -> np.ndarray:
    """The stored key of (ts, input): sha256 hex of "<ts UTC, ISO-8601 with microseconds>\\n<input>".

    Microseconds because that is what SQL keeps of a timestamp; the task is a column of
    its own, so the same (ts, input) in two tasks are two rows.
    """
    stamps = pd.to_datetime(ts, utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return np.array([hashlib.sha256(f"{s}\n{i}".encode("utf-8")).hexdigest()
                     for s, i in zip(stamps.tolist(), inputs.tolist())], dtype=object)


def _feedback_text(series: pd.Series) -> pd.Series:
    """A text column of a feedback file, stripped; JSON objects/arrays as canonical JSON, missing -> ""."""
    if series.dtype == object:
        def one(v: object) -> str:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return ""
            if isinstance(v, str):
                return v
            if isinstance(v, (dict, list, tuple)):
                return json.dumps(v, sort_keys=True, ensure_ascii=False, default=str)
            if isinstance(v, np.ndarray):
                return json.dumps(v.tolist(), sort_keys=True, ensure_ascii=False, default=str)
            if isinstance(v, bool):
                return "true" if v else "false"
            return str(v)

        values = series.map(one)
    else:
        values = series.astype("string").fillna("")
    return values.astype(str).str.strip().astype(object)


def _metadata_objects(raw: pd.DataFrame, reasons: pd.Series) -> list[str | None]:
    """Per row, ``metadata.<key>`` columns (CSV) and/or a JSON object ``metadata`` as one JSON text (None: empty).

    An empty ``metadata.<key>`` cell means "no such key"; a ``metadata`` value that is not
    an object is a bad row.
    """
    cols = [c for c in raw.columns if c.startswith("metadata.") and len(c) > len("metadata.")]
    whole = raw["metadata"] if "metadata" in raw.columns else None
    if not cols and whole is None:
        return [None] * len(raw)
    out: list[str | None] = []
    not_object = np.zeros(len(raw), dtype=bool)
    col_values = {c[len("metadata."):]: raw[c].tolist() for c in cols}
    whole_values = whole.tolist() if whole is not None else [None] * len(raw)
    for i in range(len(raw)):
        meta: dict = {}
        w = whole_values[i]
        if isinstance(w, dict):
            meta.update(w)
        elif not (w is None or (isinstance(w, float) and math.isnan(w)) or (isinstance(w, str) and not w.strip())):
            not_object[i] = True
        for key, values in col_values.items():
            v = values[i]
            if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
                continue
            meta[key] = v.strip() if isinstance(v, str) else v
        out.append(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str) if meta else None)
    _add_reason(reasons, not_object, "metadata is not a JSON object")
    return out


def validate_feedback(raw: pd.DataFrame, lines: np.ndarray, *, task: str, source: str) -> FeedbackBatch:
    """Validate a raw feedback frame against the contract (quarantine rules as trades).

    Columns: ``ts`` (ISO-8601, no offset = UTC), ``input``, ``output`` (text; JSON values
    that are objects or arrays are kept as canonical JSON text; surrounding whitespace is
    stripped), ``score`` (a finite number in [0, 1]), optional ``model_version`` (text,
    ≤ 200 characters; empty = not given) and ``metadata.<key>`` columns (CSV) / a
    ``metadata`` object (JSON Lines), stored together as ``metadata_json``. Other columns
    are ignored. Row reasons: unparsable ts, empty input, empty output, score not a finite
    number, score outside [0, 1], model_version too long, a NUL character in input or
    output (SQL text cannot hold it), metadata that is not an object, and the same
    (ts, input) repeated later in the file (the later row is kept, like a re-ingest). A
    missing required column raises ContractError. The quarantine rows have kind
    ``feedback`` and the task in their ``domain`` column.
    """
    validate_task(task)
    json_bad = _json_error_rows(raw, "feedback", task, source)
    cols = list(FEEDBACK_STORE_COLUMNS)
    if raw.empty and not json_bad.empty:
        return FeedbackBatch(pd.DataFrame(columns=cols), json_bad, n_rows=len(json_bad))
    _require_columns(raw, FEEDBACK_REQUIRED, source)
    n = len(raw)
    reasons = pd.Series([""] * n, index=raw.index, dtype=object)

    ts = _telemetry_ts(raw["ts"])
    _add_reason(reasons, ts.isna().to_numpy(), "unparsable ts")
    inputs = _feedback_text(raw["input"])
    outputs = _feedback_text(raw["output"])
    _add_reason(reasons, (inputs == "").to_numpy(), "empty input")
    _add_reason(reasons, (outputs == "").to_numpy(), "empty output")
    _add_reason(reasons, inputs.str.contains("\x00", regex=False).to_numpy(dtype=bool), "input contains a NUL character")
    _add_reason(reasons, outputs.str.contains("\x00", regex=False).to_numpy(dtype=bool),
                "output contains a NUL character")
    score = _telemetry_float(raw["score"])
    finite = np.isfinite(score)
    _add_reason(reasons, ~finite, "score is not a finite number")
    with np.errstate(invalid="ignore"):
        _add_reason(reasons, finite & ((score < 0.0) | (score > 1.0)), "score outside [0, 1]")
    if "model_version" in raw.columns:
        version = _feedback_text(raw["model_version"])
        _add_reason(reasons, (version.str.len() > MODEL_VERSION_MAX).to_numpy(),
                    f"model_version longer than {MODEL_VERSION_MAX} characters")
        version = version.where(version != "", None)
    else:
        version = pd.Series([None] * n, index=raw.index, dtype=object)
    meta = _metadata_objects(raw, reasons)

    # the same (ts, input) twice in one file: the last one wins, like a re-ingest
    keys = ts.astype(str) + "\n" + inputs
    dup = keys.duplicated(keep="last").to_numpy() & ts.notna().to_numpy()
    _add_reason(reasons, dup, "(ts, input) repeated later in the same file (later row kept)")

    bad = (reasons != "").to_numpy()
    good = ~bad
    quarantine_rows = pd.concat(
        [json_bad, _quarantine_frame("feedback", task, source, lines, reasons, raw, bad)], ignore_index=True
    )
    good_ts = ts[good].reset_index(drop=True)
    good_inputs = inputs[good].reset_index(drop=True)
    frame = pd.DataFrame({
        "task": _constant_text(task, int(good.sum())),
        "feedback_id": _text_column(feedback_ids(good_ts, good_inputs)) if good.any() else pd.Series([], dtype=object),
        "ts": good_ts,
        "input": good_inputs,
        "output": outputs[good].reset_index(drop=True),
        "score": score[good],
        "model_version": version[good].reset_index(drop=True),
        "metadata_json": pd.Series(np.array(meta, dtype=object)[good], dtype=object),
        "source_file": _constant_text(source, int(good.sum())),
    })
    return FeedbackBatch(frame[cols], quarantine_rows, n_rows=n + len(json_bad))
