"""The data contract: table schemas (SQLAlchemy Core) and input validation.

Every table another program relies on is declared here, once. Input files are
validated here too, as pure functions from a raw DataFrame to clean frames plus a
quarantine frame, so the CLI and the inbox sensor share one path.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable
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

from meta_pipeline.knobs import KNOB_NAMES, KNOBS

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
    # a paired knob trial's verdict: the overrides version (new knobs) and the trades it was judged on
    Column("judged_on_json", Text),
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
#
# Reading and validation are one rule for every file, on every backend:
#
# * a file is rejected whole (ContractError, the message names the file and says what is
#   wrong) only when no row of it can be located: an empty file, a CSV whose header line
#   is binary, JSON Lines without a single JSON object, a file that is not Parquet, a
#   missing required column;
# * anything else wrong spoils one row, never the file: a row with more or fewer fields
#   than the header, bytes that are not UTF-8, an unclosed quote, a value of the wrong type,
#   too long for its column or holding a NUL character. The row is quarantined with its
#   physical line (1-based, the CSV header is line 1), every reason, and its raw text as
#   JSON; the other rows land;
# * what SQL would refuse (a value longer than its column, a NUL character, text that is not
#   valid Unicode, a timestamp outside TIMESTAMP_MIN..TIMESTAMP_END) is refused here, so
#   SQLite and PostgreSQL store and quarantine exactly the same rows.

TRADE_REQUIRED = ("trade_id", "closed_at", "regime", "return_r", "patterns")
DOMAIN_KINDS = ("trades", "telemetry")  # per domain: the inbox's folders, the domain source assets
TASK_KINDS = ("feedback",)  # per task (see "Generic feedback" below)
KINDS = (*DOMAIN_KINDS, *TASK_KINDS, "backtests", "configs")  # every ingest kind: quarantine.kind, ingest_batches.kind
INPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json", ".parquet")

# The lengths of the text a trade lands in, read from the tables above (never retyped):
# validation quarantines a longer value on every backend (PostgreSQL would refuse it and
# roll the whole file back; SQLite would store it).
TRADE_ID_MAX = trades.c.trade_id.type.length  # 200
REGIME_MAX = trades.c.regime.type.length  # 100
STRATEGY_ID_MAX = trades.c.strategy_id.type.length  # 200
PATTERN_MAX = trade_patterns.c.pattern.type.length  # 200
SCOPE_KEY_MAX = trade_scope.c.key.type.length  # 100, a column header: see validate_trades
SCOPE_VALUE_MAX = trade_scope.c.value.type.length  # 200
METRIC_NAME_MAX = trade_metrics.c.metric.type.length  # 100, a column header: see validate_trades


@dataclass(frozen=True)
class IngestLimits:
    """Sane limits on one row of a trades file; a row over one is quarantined with the limit in its reason.

    * ``max_cell_chars``: any cell (any column, used or not) longer than this: the row is
      quarantined with that reason alone, its raw text cut to ``SHOWN_CHARS``;
    * ``max_patterns``: distinct patterns on one trade;
    * ``max_scope_keys``: scope keys with a value on one trade (metric names likewise).

    Why: a 60 MB cell or a trade with 300k patterns is an export bug, not data, and would
    cost memory out of proportion to the file. Configurable through the environment
    (``META_PIPELINE_MAX_CELL_CHARS``, ``META_PIPELINE_MAX_PATTERNS_PER_TRADE``,
    ``META_PIPELINE_MAX_SCOPE_KEYS_PER_TRADE``) or passed to ``validate_trades`` /
    ``ingest_stream.ingest_trades_file``.
    """

    max_cell_chars: int = 100_000
    max_patterns: int = 1_000
    max_scope_keys: int = 200

    SHOWN_CHARS = 2_000  # of an over-limit row's text in its quarantine row

    @classmethod
    def from_env(cls) -> IngestLimits:
        def env(name: str, default: int) -> int:
            text = os.environ.get(name, "").strip()
            try:
                return max(1, int(text)) if text else default
            except ValueError as exc:
                raise ContractError(f"{name}={text!r}: not a whole number") from exc
        return cls(env("META_PIPELINE_MAX_CELL_CHARS", cls.max_cell_chars),
                   env("META_PIPELINE_MAX_PATTERNS_PER_TRADE", cls.max_patterns),
                   env("META_PIPELINE_MAX_SCOPE_KEYS_PER_TRADE", cls.max_scope_keys))

    def shown(self, text: str) -> str:
        if len(text) <= self.SHOWN_CHARS:
            return text
        return text[:self.SHOWN_CHARS] + f"… ({len(text):,} characters in all)"

    def cell_reason(self, column: object) -> str:
        return f"cell {_shown_name(column)!r} longer than {self.max_cell_chars:,} characters (the ingest cell limit)"

    def record_problem(self, obj: dict) -> str:
        """Why a JSON record is over a limit ("" = it is not); checked before flattening, so a
        record with 300k scope keys never becomes 300k columns."""
        for key, value in obj.items():
            if isinstance(value, str) and len(value) > self.max_cell_chars:
                return self.cell_reason(key)
            if isinstance(value, dict):
                what = {"scope": "scope keys", "metrics": "metric names", "knobs": "knobs"}.get(key)
                if what and len(value) > self.max_scope_keys:
                    return f"more than {self.max_scope_keys:,} {what} (the ingest limit per trade)"
                if any(isinstance(v, str) and len(v) > self.max_cell_chars for v in value.values()):
                    return self.cell_reason(key)
            if isinstance(value, list):
                if key == "patterns" and len(value) > self.max_patterns:
                    return f"more than {self.max_patterns:,} patterns (the ingest limit per trade)"
                if sum(len(v) for v in value if isinstance(v, str)) > self.max_cell_chars:
                    return self.cell_reason(key)
        return ""

    def cell_problems(self, raw: pd.DataFrame) -> dict:
        """Row label -> (reason, the row's text, cut) of the rows holding a cell over ``max_cell_chars``."""
        over = np.zeros(len(raw), dtype=bool)
        first_col: dict[int, object] = {}
        for col in raw.columns:
            series = raw[col]
            if isinstance(series.dtype, pd.StringDtype) and series.dtype.storage == "pyarrow":
                lengths = pc.utf8_length(_arrow_text(series)).to_numpy(zero_copy_only=False)
                hit = np.nan_to_num(np.asarray(lengths, dtype=float), nan=0.0) > self.max_cell_chars
            elif series.dtype == object:
                hit = np.fromiter((isinstance(v, str) and len(v) > self.max_cell_chars for v in series.tolist()),
                                  dtype=bool, count=len(series))
            else:
                continue
            for pos in np.flatnonzero(hit & ~over).tolist():
                first_col[pos] = col
            over |= hit
        out = {}
        for pos in np.flatnonzero(over).tolist():
            text = ",".join("" if _missing(v) else str(v) for v in raw.iloc[pos].tolist())
            out[raw.index[pos]] = (self.cell_reason(first_col[pos]), self.shown(text))
        return out


# One timestamp range rule for every row of every input file (closed_at, ts): a timestamp
# is accepted when, converted to UTC, it falls in the years 1970 through 2200,
# TIMESTAMP_MIN <= t < TIMESTAMP_END; outside, the row is quarantined as "<column> out of
# range (years 1970-2200)", whatever the other rows of the file hold (``_parse_timestamps``).
# Why these bounds: every backend stores them, they hold any real trade or engine tick, and
# a year outside them is a typo or a unit mistake (seconds read as years), not data.
TIMESTAMP_MIN_YEAR, TIMESTAMP_MAX_YEAR = 1970, 2200
TIMESTAMP_MIN = pd.Timestamp(f"{TIMESTAMP_MIN_YEAR}-01-01", tz="UTC")
TIMESTAMP_END = pd.Timestamp(f"{TIMESTAMP_MAX_YEAR + 1}-01-01", tz="UTC")  # exclusive
TIMESTAMP_RANGE = f"years {TIMESTAMP_MIN_YEAR}-{TIMESTAMP_MAX_YEAR}"

_TEXT_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)  # what pandas gives a CSV read with dtype=str
_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # not Unicode text (a JSON "\ud800" escape): no database stores it
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")
_YEAR_RE = re.compile(r"\s*([+-]?)(\d{4,})-")


@dataclass
class TradesBatch:
    """Validated trades of one file, in the shape of the source tables."""

    trades: pd.DataFrame
    patterns: pd.DataFrame
    scope: pd.DataFrame
    metrics: pd.DataFrame
    quarantine: pd.DataFrame
    n_rows: int = 0
    ignored_columns: list[str] = field(default_factory=list)  # each "name" or "name (why)"
    duplicates_in_file: int = 0  # rows superseded by a later row with the same trade_id


@dataclass
class TelemetryBatch:
    telemetry: pd.DataFrame
    quarantine: pd.DataFrame
    n_rows: int = 0
    ignored_columns: list[str] = field(default_factory=list)
    duplicates_in_file: int = 0  # rows superseded by a later row with the same ts


@dataclass(eq=False)
class ReadNotes:
    """What reading a file found besides its cells; travels with the raw frame as ``raw.attrs["read_notes"]``.

    * ``row_problems``: row label -> (reason, the row's text as in the file): a row that was
      located (it has a line) but cannot be read as the header says — more or fewer fields
      than the header, bytes that are not UTF-8, an unclosed quote. Its cells are a best
      effort; validation quarantines the row with this reason alone, raw_json
      ``{"raw": <text>}``.
    * ``line_errors``: (line, reason, text) of lines that are no row at all (JSON Lines: a
      line that is not a JSON object).
    * ``column_problems``: frame column -> why it cannot be used (a duplicate or empty
      header name, a name that is not UTF-8): ignored, and reported as ignored.
    * ``header_note``: said with a missing-column error (e.g. the header line is not UTF-8).
    """

    format: str = "frame"  # csv | jsonl | parquet | frame (built in code)
    row_problems: dict = field(default_factory=dict)
    line_errors: list = field(default_factory=list)
    column_problems: dict = field(default_factory=dict)
    header_note: str = ""

    def __deepcopy__(self, memo: dict) -> ReadNotes:
        return self  # pandas deep-copies attrs on every operation: share the notes, never copy them


def _read_notes(raw: pd.DataFrame) -> ReadNotes:
    notes = raw.attrs.get("read_notes")
    return notes if isinstance(notes, ReadNotes) else ReadNotes()


def read_input_file(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read CSV / JSON Lines / Parquet into a raw frame plus the 1-based physical file line of each row.

    CSV cells are text (a well-formed file through pyarrow's reader, anything else through
    ``_read_csv_robust``, which locates every record); JSON Lines and Parquet values keep
    their JSON / Parquet type (object columns), with the objects ``scope``, ``metrics`` and
    ``knobs`` flattened to ``scope.<k>`` / ``metric.<k>`` / ``knob.<k>`` columns, so every
    format validates through one path. What the reader found besides the cells (rows it
    could not read, lines that are no row, unusable column names) is in
    ``raw.attrs["read_notes"]`` (``ReadNotes``). A file with no locatable row raises
    ContractError naming the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise ContractError(f"{path.name}: unsupported file type {suffix!r} (use .csv, .jsonl or .parquet)")
    try:
        if path.stat().st_size == 0:
            raise ContractError(f"{path}: empty file (no header line, no rows)")
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        return _read_json_lines(path)
    except OSError as exc:
        raise ContractError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


def _read_csv(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    raw = _read_csv_fast(path)
    if raw is not None:
        raw.attrs["read_notes"] = ReadNotes("csv")
        return raw, np.arange(len(raw), dtype=np.int64) + 2  # one record per line, no blank line: header is line 1
    return _read_csv_robust(path)


def _read_csv_fast(path: Path) -> pd.DataFrame | None:
    """A well-formed CSV through pyarrow's multi-threaded reader, every cell as text.

    Why: about 3x faster than a parser in Python on large files. It gives the same frame
    as ``pd.read_csv(dtype=str, keep_default_na=False)`` for a regular file. It is used only
    when the file has exactly one physical line per record (so row i is line i + 2): for
    anything else (ragged rows, bad UTF-8, an empty file, duplicate or empty header names,
    blank lines, a quoted field over several lines, a lone carriage return) it fails or
    we return None, and ``_read_csv_robust`` reads the file.
    """
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header or any("\x00" in name for name in header) or header[0].lstrip().startswith(("{", "[")):
            return None  # nothing to read, binary, or JSON: the robust reader says so
        physical_lines, lone_cr = _csv_line_count(path)
        if lone_cr:
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
    if table.num_rows + 1 != physical_lines:  # a blank line, or a record over several lines
        return None
    names = table.column_names
    if names != header or len(set(names)) != len(names) or any(n.strip() == "" for n in names):
        return None
    if any(not pa.types.is_string(t) for t in table.schema.types):
        return None
    return table.to_pandas(types_mapper=lambda t: _TEXT_DTYPE if pa.types.is_string(t) else None)


def _csv_line_count(path: Path) -> tuple[int, int]:
    """(physical lines, lone carriage returns) of a file, read in chunks (no copy of the file in memory)."""
    n_lf = n_cr = n_crlf = 0
    prev_cr = False
    last = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            n_lf += chunk.count(b"\n")
            if b"\r" in chunk:
                n_cr += chunk.count(b"\r")
                n_crlf += chunk.count(b"\r\n")
            if prev_cr and chunk[:1] == b"\n":
                n_crlf += 1
            prev_cr = chunk[-1:] == b"\r"
            last = chunk[-1:]
    return n_lf + (1 if last and last != b"\n" else 0), n_cr - n_crlf


# Bad UTF-8: decoding with this handler records the byte offset of every invalid sequence.
_BAD_UTF8 = threading.local()


def _record_bad_utf8(exc: UnicodeDecodeError) -> tuple[str, int]:
    _BAD_UTF8.offsets.append(exc.start)
    return "\ufffd", exc.end


codecs.register_error("meta_pipeline.record_bad_utf8", _record_bad_utf8)


def _bad_utf8_offsets(data: bytes) -> np.ndarray:
    """Byte offsets of the invalid UTF-8 sequences of ``data`` (empty when it is all UTF-8)."""
    try:
        data.decode("utf-8")
        return np.empty(0, dtype=np.int64)
    except UnicodeDecodeError:
        pass
    _BAD_UTF8.offsets = []
    try:
        data.decode("utf-8", "meta_pipeline.record_bad_utf8")
        return np.asarray(_BAD_UTF8.offsets, dtype=np.int64)
    finally:
        _BAD_UTF8.offsets = None


class _CsvLines:
    """The physical lines of a CSV (split at LF; a CR before the LF is not content), measured once, vectorized."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset  # offset: bytes before ``data`` in the file (a BOM)
        arr = np.frombuffer(data, dtype=np.uint8)
        lf = np.flatnonzero(arr == 10)
        starts = np.concatenate(([0], lf + 1)).astype(np.int64)
        line_ends = np.concatenate((lf, [len(data)])).astype(np.int64)
        if len(data) == 0 or data.endswith(b"\n"):  # nothing after the last LF: no line there
            starts, line_ends = starts[:-1], line_ends[:-1]
        trailing_cr = np.zeros(len(starts), dtype=bool)
        nonempty = line_ends > starts
        trailing_cr[nonempty] = arr[line_ends[nonempty] - 1] == 13
        self.starts, self.line_ends, self.ends = starts, line_ends, line_ends - trailing_cr
        self.n = len(starts)

        def per_line(byte: int) -> np.ndarray:
            pos = np.flatnonzero(arr == byte)
            return np.searchsorted(pos, self.ends) - np.searchsorted(pos, starts)

        self.commas, self.quotes, self.inner_cr = per_line(44), per_line(34), per_line(13)
        self.blank = self.ends == starts
        self.odd_quotes = np.flatnonzero(self.quotes % 2 == 1)
        self.bad = np.zeros(self.n, dtype=bool)
        self.first_bad: dict[int, int] = {}  # line index -> byte offset (in data) of its first invalid byte
        bad = _bad_utf8_offsets(data)
        if bad.size:
            line_of = np.searchsorted(starts, bad, side="right") - 1
            lines_hit, first = np.unique(line_of, return_index=True)
            self.bad[lines_hit] = True
            self.first_bad = dict(zip(lines_hit.tolist(), bad[first].tolist()))

    def text(self, i: int, keep_cr: bool = False) -> str:
        end = self.line_ends[i] if keep_cr else self.ends[i]
        return self.data[self.starts[i]:end].decode("utf-8", "replace")

    def raw_text(self, i: int, j: int) -> str:
        """Lines i..j as in the file (bytes that are not UTF-8 shown as \\xNN)."""
        return self.data[self.starts[i]:self.ends[j]].decode("utf-8", "backslashreplace")

    def problem(self, i: int, j: int, fields: list[str], width: int | None) -> tuple[str, str] | None:
        """Why the record on lines i..j cannot be read as the header says (None: it can)."""
        if self.bad[i:j + 1].any():
            line = i + int(np.argmax(self.bad[i:j + 1]))
            return f"not UTF-8 at byte {self.offset + self.first_bad[line]}", self.raw_text(i, j)
        if width is not None and len(fields) != width:
            return (f"row has {len(fields)} field{'' if len(fields) == 1 else 's'}, header has {width}",
                    self.raw_text(i, j))
        return None


_CSV_MAX_RECORD_LINES = 1000  # a quoted field may span this many lines; beyond, the quote is unclosed


def _csv_fields(text: str, *, strict: bool) -> list[str]:
    return next(csv.reader([text], strict=strict), [])


def _csv_error(exc: csv.Error) -> str:
    text = str(exc)
    if "new-line character" in text:
        return "unparsable CSV row: a carriage return inside an unquoted field"
    return f"unparsable CSV row: {text}"


def _parse_csv_record(lines: _CsvLines, i: int, width: int | None
                      ) -> tuple[int, list[str] | None, tuple[str, str] | None]:
    """The record starting on line i: (the line after it, its fields or None for a blank line, problem).

    A quoted field may go on over the next lines (a newline inside a field is data), but
    only when the joined lines parse as strict CSV with the header's number of fields:
    a stray quote never swallows the rows after it — the line is then a bad row of its
    own ("unclosed quote") and reading goes on with the next line.
    """
    text = lines.text(i)
    if not text.strip():
        return i + 1, None, None
    if '"' not in text:
        fields = text.split(",")
        return i + 1, fields, lines.problem(i, i, fields, width)
    try:
        fields = _csv_fields(text, strict=True)
        return i + 1, fields, lines.problem(i, i, fields, width)
    except csv.Error as exc:
        if "unexpected end of data" not in str(exc):  # e.g. text after a closing quote: read as pandas reads it
            try:
                fields = _csv_fields(text, strict=False)
            except csv.Error as exc2:
                return i + 1, [text], (_csv_error(exc2), lines.raw_text(i, i))
            return i + 1, fields, lines.problem(i, i, fields, width)
    j = i
    while True:  # the field closes on a later line with an odd number of quotes
        k = int(np.searchsorted(lines.odd_quotes, j, side="right"))
        if k >= len(lines.odd_quotes) or int(lines.odd_quotes[k]) - i >= _CSV_MAX_RECORD_LINES:
            break
        j = int(lines.odd_quotes[k])
        joined = "\n".join([lines.text(m, keep_cr=True) for m in range(i, j)] + [lines.text(j)])
        try:
            fields = _csv_fields(joined, strict=True)
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                continue
            break
        if width is None or len(fields) == width:
            return j + 1, fields, lines.problem(i, j, fields, width)
        break
    try:
        fields = _csv_fields(text, strict=False)
    except csv.Error:
        fields = [text]
    problem = lines.problem(i, i, fields, None)
    return i + 1, fields, problem or ("unclosed quote: a quoted field does not end on this line",
                                      lines.raw_text(i, i))


def _dedup_names(names: list[str]) -> list[str]:
    """pandas' names for a header with repeated names: ``a, a`` -> ``a, a.1``."""
    out = list(names)
    counts: dict[str, int] = {}
    for i, col in enumerate(out):
        cur = counts.get(col, 0)
        while cur > 0:
            counts[col] = cur + 1
            col = f"{col}.{cur}"
            cur = counts.get(col, 0)
        out[i] = col
        counts[col] = cur + 1
    return out


def _read_csv_robust(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Any CSV, one record at a time where needed: every record located, with its physical line.

    The lines of the file are measured at once (numpy over the bytes); a line that is UTF-8,
    has no quote and the header's number of fields (the bulk of any file) is parsed by
    pyarrow, the others here (``_parse_csv_record``). A record that cannot be read as the
    header says is kept as a row with its problem (``ReadNotes.row_problems``): a missing
    field is "" as in pandas, an extra one dropped. Rejected whole: no header line, a
    binary (NUL) or unparsable header line, a first line that is JSON.
    (``ingest_stream`` reads a large file span by span through the same two steps.)
    """
    data, offset = _csv_bytes(path.read_bytes())
    lines = _CsvLines(data, offset)
    header = _csv_header(path, data, lines)
    table, all_lines, row_problems, _ = _csv_records(lines, header, header.after_header, lines.n)
    return _csv_frame(table, row_problems, header), all_lines


def _csv_bytes(data: bytes) -> tuple[bytes, int]:
    """(the bytes after a UTF-8 BOM, the BOM's length); classic Mac line ends (CR alone) made LF."""
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    data = data[offset:]
    if b"\n" not in data and b"\r" in data:  # classic Mac line ends: CR alone ends a line
        data = data.replace(b"\r", b"\n")
    return data, offset


@dataclass
class _CsvHeader:
    after_header: int  # index of the line after the header record (records start there)
    width: int
    names: list[str]  # frame column names (deduplicated like pandas)
    column_problems: dict[str, str]
    bad_utf8: bool


def _csv_header(path: Path, data: bytes, lines: _CsvLines) -> _CsvHeader:
    """The header record (the first line that is not blank), its names and their problems."""
    h = 0
    while h < lines.n and (lines.blank[h] or not lines.text(h).strip()):
        h += 1
    if h == lines.n:
        raise ContractError(f"{path}: empty file (no header line, no rows)")
    header_text = lines.text(h)
    if "\x00" in header_text:
        raise ContractError(f"{path}: not a CSV text file (binary data on line {h + 1}, the header line)")
    if header_text.lstrip().startswith(("{", "[")):
        raise ContractError(f"{path}: not CSV: line {h + 1} is JSON (JSON Lines files need a .jsonl suffix)")
    after_header, header, problem = _parse_csv_record(lines, h, None)
    header_bad_utf8 = bool(lines.bad[h:after_header].any())
    if problem is not None and not header_bad_utf8:
        raise ContractError(f"{path}: unreadable header line {h + 1}: {problem[0]}")
    width = len(header)
    column_problems: dict[str, str] = {}
    not_utf8 = [False] * width
    if header_bad_utf8:  # which names hold the bad bytes: the same fields, decoded keeping them visible
        span = data[lines.starts[h]:lines.ends[after_header - 1]].decode("utf-8", "surrogateescape")
        try:
            escaped = _csv_fields(span, strict=False) if '"' in span else span.split(",")
        except csv.Error:
            escaped = []
        if len(escaped) == width:
            not_utf8 = [bool(_SURROGATE_RE.search(name)) for name in escaped]
        else:
            not_utf8 = ["\ufffd" in name for name in header]
    named = [name if name != "" else f"Unnamed: {k}" for k, name in enumerate(header)]
    names = _dedup_names(named)
    for k, name in enumerate(names):
        if header[k] == "":
            column_problems[name] = "empty column name"
        elif name != named[k]:
            column_problems[name] = f"duplicate column name {named[k]!r}"
        elif not_utf8[k]:
            column_problems[name] = "name is not UTF-8"
    return _CsvHeader(after_header, width, names, column_problems, header_bad_utf8)


def _csv_records(lines: _CsvLines, header: _CsvHeader, start: int, stop: int
                 ) -> tuple[pa.Table, np.ndarray, dict[int, tuple[str, str]], int]:
    """The records that start on lines ``start``..``stop - 1`` (0-based indices into ``lines``).

    Returns (a table of text with columns c0.., the 1-based line of each row within
    ``lines``, row position -> problem, the index of the line after the last record). A
    record starting before ``stop`` may go on past it (a quoted field over several lines):
    the next span then starts after it. Each record depends only on its own lines and at
    most ``_CSV_MAX_RECORD_LINES`` after them, so spans read this way give the rows of the
    whole file exactly.
    """
    width = header.width
    simple = ~lines.blank & ~lines.bad & (lines.quotes == 0) & (lines.inner_cr == 0) & (lines.commas == width - 1)
    simple[:start] = False
    simple[stop:] = False
    others = np.flatnonzero(~simple & ~lines.blank)
    others = others[(others >= start) & (others < stop)]
    rec_lines: list[int] = []
    rec_fields: list[list[str]] = []
    rec_problems: dict[int, tuple[str, str]] = {}
    last = start - 1
    for i in others.tolist():
        if i <= last:
            continue
        nxt, fields, problem = _parse_csv_record(lines, i, width)
        last = nxt - 1
        if fields is None:
            continue
        if last > i:
            simple[i + 1:last + 1] = False  # lines inside a quoted field are part of this record
        if problem is not None:
            rec_problems[len(rec_fields)] = problem
        rec_lines.append(i + 1)
        rec_fields.append(fields)
    simple_idx = np.flatnonzero(simple)

    columns = [f"c{k}" for k in range(width)]
    empty = pa.table({c: pa.array([], pa.string()) for c in columns})
    plain = _simple_csv_lines(lines, simple_idx, columns) if len(simple_idx) else empty
    others_table = (pa.table({c: pa.array([f[k] if k < len(f) else "" for f in rec_fields], pa.string())
                              for k, c in enumerate(columns)}) if rec_fields else empty)
    # file order: each record read here goes between the plain lines around it
    rec_line_arr = np.asarray(rec_lines, dtype=np.int64)
    cut = np.searchsorted(simple_idx + 1, rec_line_arr)  # plain rows before each such record
    if len(rec_fields) <= 2000:
        pieces, prev = [], 0
        for k, c in enumerate(cut.tolist()):
            pieces += [plain.slice(prev, c - prev), others_table.slice(k, 1)]
            prev = c
        pieces.append(plain.slice(prev))
        table = pa.concat_tables(pieces)
    else:
        order = np.argsort(np.concatenate([simple_idx + 1, rec_line_arr]), kind="stable")
        table = pa.concat_tables([plain, others_table]).take(pa.array(order))
    final_position = cut + np.arange(len(rec_fields))  # record k lands after `cut[k]` plain rows and k records
    all_lines = np.empty(len(simple_idx) + len(rec_fields), dtype=np.int64)
    is_record = np.zeros(len(all_lines), dtype=bool)
    is_record[final_position] = True
    all_lines[final_position] = rec_line_arr
    all_lines[~is_record] = simple_idx + 1
    row_problems = {int(final_position[k]): p for k, p in rec_problems.items()}
    return table, all_lines, row_problems, max(stop, last + 1)


def _csv_frame(table: pa.Table, row_problems: dict, header: _CsvHeader) -> pd.DataFrame:
    """The raw frame of ``_csv_records``' table, with its ``ReadNotes``."""
    raw = table.rename_columns(header.names).to_pandas(
        types_mapper=lambda t: _TEXT_DTYPE if pa.types.is_string(t) else None)
    raw.attrs["read_notes"] = ReadNotes("csv", row_problems=row_problems, column_problems=header.column_problems,
                                        header_note="the header line is not UTF-8 text" if header.bad_utf8 else "")
    return raw


def _simple_csv_lines(lines: _CsvLines, idx: np.ndarray, columns: list[str]) -> pa.Table:
    """Lines known to be plain (UTF-8, no quote, the header's number of fields) as a table of text.

    Consecutive plain lines go to pyarrow as one span of the file's bytes (the others are few
    in any file worth the speed), so a bad row costs its own line, not a slow path for all.
    """
    data = lines.data
    if len(idx) >= 2000:
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        spans = [data[lines.starts[run[0]]:lines.line_ends[run[-1]]] for run in np.split(idx, breaks)]
        try:
            table = pa_csv.read_csv(
                pa.BufferReader(b"\n".join(spans) + b"\n"),
                read_options=pa_csv.ReadOptions(column_names=columns),
                parse_options=pa_csv.ParseOptions(quote_char=False, ignore_empty_lines=False),
                convert_options=pa_csv.ConvertOptions(
                    column_types={c: pa.string() for c in columns}, strings_can_be_null=False,
                    quoted_strings_can_be_null=False, null_values=[], auto_dict_encode=False),
            )
            if table.num_rows == len(idx):
                return table
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    rows = [data[s:e].decode("utf-8").split(",") for s, e in zip(lines.starts[idx].tolist(), lines.ends[idx].tolist())]
    return pa.table({c: pa.array([r[k] for r in rows], pa.string()) for k, c in enumerate(columns)})


def _read_json_lines(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """JSON Lines: one JSON object per physical line (LF); blank lines skipped; a UTF-8 BOM ignored.

    A line that is not UTF-8, not JSON or not an object is no row: it is quarantined
    (``ReadNotes.line_errors``). A file without a single JSON object is rejected whole.
    """
    data = path.read_bytes()
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    records, lines_list, errors = _json_lines_records(data[offset:], offset, 1)
    if not records:
        if not errors:
            raise ContractError(f"{path}: empty file (no JSON object, only blank lines)")
        line, reason, _ = errors[0]
        raise ContractError(f"{path}: not JSON Lines: no line is a JSON object (line {line}: {reason})")
    return _json_lines_frame(records, errors), np.asarray(lines_list, dtype=np.int64)


def _json_lines_records(data: bytes, start: int, first_line: int
                        ) -> tuple[list[dict], list[int], list[tuple[int, str, str]]]:
    """The JSON objects of ``data`` (whole lines of a file, the first one numbered ``first_line``,
    starting at byte ``start`` of the file): (flattened records, their lines, line errors)."""
    records: list[dict] = []
    lines_list: list[int] = []
    errors: list[tuple[int, str, str]] = []
    limits = IngestLimits.from_env()
    for lineno, chunk in enumerate(data.split(b"\n"), start=first_line):
        line_start, start = start, start + len(chunk) + 1
        if not chunk.strip():
            continue
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append((lineno, f"not UTF-8 at byte {line_start + exc.start}",
                           chunk.rstrip(b"\r").decode("utf-8", "backslashreplace")))
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            errors.append((lineno, f"unparsable JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                           text.rstrip("\r")))
            continue
        if not isinstance(obj, dict):
            errors.append((lineno, f"unparsable JSON: line is not a JSON object (a JSON {_json_type(obj)})",
                           text.rstrip("\r")))
            continue
        over = limits.record_problem(obj)
        if over:
            errors.append((lineno, over, limits.shown(text.rstrip("\r"))))
            continue
        records.append(_flatten_json_record(obj))
        lines_list.append(lineno)
    return records, lines_list, errors


def _json_lines_frame(records: list[dict], errors: list[tuple[int, str, str]], columns: list[str] | None = None,
                      column_problems: dict[str, str] | None = None) -> pd.DataFrame:
    """The raw frame of JSON records. Read in spans, ``columns`` and ``column_problems`` are the
    whole file's (every span's frame has the same columns, in the order a whole read gives)."""
    # a key that is not Unicode text (a "\ud800" escape) cannot even name a column: shown escaped, ignored
    problems: dict[str, str] = {}
    bad_keys = {k for k in set().union(*records) if _SURROGATE_RE.search(k)} if records else set()
    if bad_keys:
        renamed = {k: k.encode("utf-8", "backslashreplace").decode("utf-8") for k in bad_keys}
        records = [{renamed.get(k, k): v for k, v in r.items()} for r in records]
        problems = {name: "name is not valid Unicode text" for name in renamed.values()}
    if columns is None:
        raw = pd.DataFrame(records, dtype=object)
    else:
        raw = pd.DataFrame(records, dtype=object).reindex(columns=columns)
        raw = raw.astype(object) if len(raw.columns) else raw
        problems = dict(column_problems or {})
    raw.attrs["read_notes"] = ReadNotes("jsonl", line_errors=errors, column_problems=problems)
    return raw


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _read_parquet(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Parquet: one row per record, row numbers from 1; nested scope/metrics/knobs flattened like JSON."""
    try:
        frame = pd.read_parquet(path)
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise ContractError(f"{path.name}: reading Parquet needs pyarrow ({exc})") from exc
    except OSError:
        raise
    except Exception as exc:  # whatever the Parquet reader raises, the file is not (readable) Parquet
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ContractError(f"{path}: not a readable Parquet file ({first[:300]})") from exc
    flat = [_flatten_json_record(r) for r in frame.to_dict(orient="records")]
    raw = pd.DataFrame(flat, dtype=object) if flat else pd.DataFrame(columns=list(frame.columns), dtype=object)
    raw.attrs["read_notes"] = ReadNotes("parquet")
    return raw, np.arange(len(raw), dtype=np.int64) + 1


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


def _require_columns(raw: pd.DataFrame, required: tuple[str, ...], source: str,
                     notes: ReadNotes | None = None) -> None:
    missing = [c for c in required if c not in raw.columns]
    if missing:
        notes_said = [notes.header_note] if notes is not None and notes.header_note else []
        near = {str(c).strip().lower(): c for c in raw.columns if isinstance(c, str)}
        close = [f"found {_shown_name(near[m])!r}" for m in missing if m in near]  # " Regime" for regime
        if close:
            notes_said.append("; ".join(close) + ": names are exact, lowercase, without spaces")
        note = f" ({'; '.join(notes_said)})" if notes_said else ""
        raise ContractError(f"{source}: missing required column(s): {', '.join(missing)}{note}")


# -- columns: which are used, which are ignored (and reported) -------------------------


def _shown_name(name: object) -> str:
    """A column name as it can be printed (control characters and bad bytes escaped), at most ~60 characters."""
    text = name if isinstance(name, str) else repr(name)
    shown = "".join(c if c.isprintable() and not _SURROGATE_RE.match(c) else c.encode("unicode_escape").decode("ascii")
                    for c in text[:60])
    return shown + (f"… ({len(text)} characters)" if len(text) > 60 else "")


def _ignored(name: object, why: str = "") -> str:
    return f"{_shown_name(name)} ({why})" if why else _shown_name(name)


def _name_problem(name: str, what: str, limit: int | None) -> str:
    """Why a name taken from a column header cannot be stored ("" = it can)."""
    if name == "":
        return f"empty {what}"
    if _SURROGATE_RE.search(name):
        return f"{what} is not valid Unicode text"
    if _CONTROL_RE.search(name):
        return f"{what} contains a control character" if "\x00" not in name else f"{what} contains a NUL character"
    if limit is not None and len(name) > limit:
        return f"{what} longer than {limit} characters"
    return ""


def _prefixed_columns(raw: pd.DataFrame, notes: ReadNotes, known: set[str], prefixes: dict[str, tuple[str, int | None]],
                      json_objects: tuple[str, ...], unknown_why: Callable[[str], str] | None = None
                      ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The usable ``<prefix><name>`` columns per prefix ({prefix: {column: name}}) and the ignored columns.

    A column is ignored (listed as "name" or "name (why)", never a reason to lose rows) when
    the contract does not name it, its header name is unusable (``ReadNotes``), or the name
    it gives (a scope key, a metric name...) could not be stored (``_name_problem``).
    ``json_objects``: contract fields that are JSON objects (e.g. ``scope``); in a JSON or
    Parquet file a value that is not an object is a bad row (the caller checks), in a CSV
    such a column is just unknown.
    """
    usable: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    ignored: list[str] = []
    for col in raw.columns:
        if col in notes.column_problems:
            ignored.append(_ignored(col, notes.column_problems[col]))
            continue
        if not isinstance(col, str):
            ignored.append(_ignored(col, "not a text name"))
            continue
        if col in known or (col in json_objects and notes.format not in ("csv", "frame")):
            continue
        prefix = next((p for p in prefixes if col.startswith(p)), None)
        if prefix is None:
            why = _name_problem(col, "name", None)
            why = why if why and why != "empty name" else (unknown_why(col) if unknown_why else "")
            ignored.append(_ignored(col, why))
            continue
        what, limit = prefixes[prefix]
        name = col[len(prefix):]
        why = _name_problem(name, what, limit)
        if why:
            ignored.append(_ignored(col, why))
        else:
            usable[prefix][col] = name
    return usable, ignored


def _not_object_rows(raw: pd.DataFrame, notes: ReadNotes, column: str) -> np.ndarray:
    """JSON / Parquet rows whose ``column`` (a contract object: scope, metrics, knobs...) holds something else."""
    if column not in raw.columns or notes.format in ("csv", "frame"):
        return np.zeros(len(raw), dtype=bool)
    return np.array([not _missing(v) and not isinstance(v, dict) for v in raw[column].tolist()], dtype=bool)


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


# -- cells: text, numbers, timestamps ----------------------------------------------------


def _text_cells(series: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """A column as text (missing -> NA), plus the rows whose value is not text and those that are not Unicode text.

    CSV cells are text already. JSON / Parquet values: strings as they are; numbers as
    their text (``123`` -> ``"123"``); timestamps (Parquet) as ISO-8601; objects, arrays
    and booleans are *not text* (the caller quarantines "<column> must be text"); a string
    holding a lone surrogate (a JSON ``"\\ud800"`` escape) is not Unicode text.
    """
    n = len(series)
    none = np.zeros(n, dtype=bool)
    if isinstance(series.dtype, pd.StringDtype):
        return series, none, none
    if series.dtype != object:
        return series.astype("string"), none, none  # numbers, times of a frame built in code: their text
    if pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
        try:
            return series.astype(_TEXT_DTYPE), none, none
        except UnicodeEncodeError:
            pass
    out: list[str | None] = []
    not_text = np.zeros(n, dtype=bool)
    not_unicode = np.zeros(n, dtype=bool)
    for i, v in enumerate(series.tolist()):
        if _missing(v):
            out.append(None)
        elif isinstance(v, str):
            if _SURROGATE_RE.search(v):
                not_unicode[i] = True
                out.append(None)
            else:
                out.append(v)
        elif isinstance(v, (bool, np.bool_)):
            not_text[i] = True
            out.append(None)
        elif isinstance(v, (int, np.integer)):
            out.append(str(int(v)))
        elif isinstance(v, (float, np.floating)):
            out.append(repr(float(v)))
        elif isinstance(v, (pd.Timestamp, datetime.datetime, datetime.date)):
            out.append(v.isoformat())
        else:  # dict, list, array, bytes...
            not_text[i] = True
            out.append(None)
    return pd.Series(out, index=series.index, dtype=_TEXT_DTYPE), not_text, not_unicode


def _checked_text(raw: pd.DataFrame, col: str, reasons: pd.Series, *, limit: int | None,
                  empty_reason: str | None = None) -> pa.Array:
    """A text column stripped ("" for missing), with its row reasons: not text, not Unicode,
    empty (when ``empty_reason``), a NUL character, longer than ``limit`` characters."""
    cells, not_text, not_unicode = _text_cells(raw[col])
    _add_reason(reasons, not_text, f"{col} must be text")
    _add_reason(reasons, not_unicode, f"{col} is not valid Unicode text")
    values = _stripped(cells)
    if empty_reason:
        _add_reason(reasons, _mask(pc.equal(values, "")) & ~not_text & ~not_unicode, empty_reason)
    _add_reason(reasons, _mask(pc.match_substring(values, "\x00")), f"{col} contains a NUL character")
    if limit is not None:
        _add_reason(reasons, _mask(pc.greater(pc.utf8_length(values), limit)), f"{col} longer than {limit} characters")
    return values


def _to_float(series: pd.Series) -> pd.Series:
    """Text as float64; empty or unparsable -> NaN (the caller decides whether that is a bad row)."""
    if isinstance(series.dtype, pd.StringDtype) or series.dtype == object:
        try:  # a clean text column: arrow's (correctly rounded) parser, ~10x pandas' per-value path
            values = pc.utf8_trim_whitespace(_arrow_text(series))
            parsed = pc.cast(pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values), pa.float64())
            return pd.Series(parsed.to_numpy(zero_copy_only=False), index=series.index, dtype=float)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass  # some value is not a number: pandas coerces it to NaN, value by value
    return pd.to_numeric(series.replace("", np.nan), errors="coerce").astype(float)


def _number_cells(series: pd.Series, *, allow_bool: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A column as float64 (NaN: missing or not a number) and which cells hold a value at all.

    Text is parsed as a number (``" 0.5 "``, ``"1e-3"``; empty = missing). A JSON / Parquet
    boolean is *not* a number (``true`` is quarantined, never stored as 1.0) unless
    ``allow_bool`` (a knob of kind bool); an object, an array, a string that is not a number
    are not numbers either.
    """
    n = len(series)
    if isinstance(series.dtype, pd.StringDtype):
        return _to_float(series).to_numpy(), _mask(pc.not_equal(_stripped(series), ""))
    if pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan) if allow_bool else np.full(n, np.nan)
        return values, series.notna().to_numpy()
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
        return values, ~np.isnan(values)
    if series.dtype != object:  # times, categories...: not numbers
        return np.full(n, np.nan), series.notna().to_numpy()
    kind = pd.api.types.infer_dtype(series, skipna=True)
    if kind in ("string", "empty"):
        try:
            return _number_cells(series.astype(_TEXT_DTYPE))
        except UnicodeEncodeError:
            pass
    elif kind in ("floating", "integer", "mixed-integer-float"):  # JSON numbers (and null): no per-value work
        try:
            values = series.to_numpy(dtype=float, na_value=np.nan)
            return values, ~np.isnan(values)
        except (OverflowError, TypeError, ValueError):
            pass
    values = np.full(n, np.nan)
    given = np.zeros(n, dtype=bool)
    text_pos: list[int] = []
    texts: list[str] = []
    for i, v in enumerate(series.tolist()):
        if _missing(v):
            continue
        given[i] = True
        if isinstance(v, (bool, np.bool_)):
            if allow_bool:
                values[i] = float(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            try:
                values[i] = float(v)
            except OverflowError:
                pass
        elif isinstance(v, str) and not _SURROGATE_RE.search(v):
            text_pos.append(i)
            texts.append(v)
    if texts:
        parsed, present = _number_cells(pd.Series(texts, dtype=_TEXT_DTYPE))
        values[text_pos] = parsed
        given[text_pos] = present
    return values, given


def _to_utc(series: pd.Series) -> pd.Series:
    """ISO-8601 -> UTC; naive times are UTC; offsets are converted. Unparsable -> NaT."""
    text = series.astype("string").str.strip()
    return pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")


def _parse_timestamps(series: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """(UTC timestamps, NaT where unusable; rows unparsable; rows out of range).

    The range rule (``TIMESTAMP_MIN`` <= t < ``TIMESTAMP_END``: the years 1970-2200, UTC)
    is judged on each value alone. pandas parses a column at nanosecond precision, whose
    range ends in 2262, only when some value of it has nanoseconds; then a year-2300 value
    comes back NaT, as if unparsable. So a value is judged on its parsed time and, when
    pandas could not represent it, on its text's year: a year-2300 (or 1900) timestamp is
    "out of range" with or without such a neighbour, never accepted, never "unparsable".
    """
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        ts = series.dt.tz_localize("UTC") if series.dt.tz is None else series.dt.tz_convert("UTC")
        text = None
    else:
        text, _, _ = _text_cells(series)
        ts = _to_utc(text)
    nat = ts.isna().to_numpy()
    out_of_range = np.zeros(len(ts), dtype=bool)
    if (~nat).any():
        out_of_range[~nat] = ((ts[~nat] < TIMESTAMP_MIN) | (ts[~nat] >= TIMESTAMP_END)).to_numpy()
    if text is not None and nat.any():
        values = text.to_numpy(dtype=object, na_value=None)
        for pos in np.flatnonzero(nat).tolist():
            m = _YEAR_RE.match(values[pos]) if isinstance(values[pos], str) else None
            if m:
                sign, digits = m.groups()
                out_of_range[pos] = (sign == "-" or len(digits) > 4
                                     or not TIMESTAMP_MIN_YEAR <= int(digits) <= TIMESTAMP_MAX_YEAR)
    if out_of_range.any():
        ts = ts.mask(pd.Series(out_of_range, index=ts.index))
    return ts, nat & ~out_of_range, out_of_range


def _timestamp_reasons(reasons: pd.Series, col: str, unparsable: np.ndarray, out_of_range: np.ndarray) -> None:
    _add_reason(reasons, unparsable, f"unparsable {col}")
    _add_reason(reasons, out_of_range, f"{col} out of range ({TIMESTAMP_RANGE})")


# -- quarantine rows -----------------------------------------------------------------------


def _jsonable(value: object) -> object:
    """A raw value as JSON can hold it: missing and non-finite numbers -> null, arrays -> lists, times -> text."""
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (pd.Timestamp, datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value)


def _raw_json(record: dict) -> str:
    """The raw row as a JSON object (ASCII: every backend stores it as it is)."""
    try:
        return json.dumps({str(k): _jsonable(v) for k, v in record.items()}, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return json.dumps({"raw": str(record)})


_QUARANTINE_COLUMNS = ["domain", "kind", "source_file", "line", "reason", "raw_json"]


def _quarantine_frame(kind: str, domain: str, source: str, lines: np.ndarray, reasons: pd.Series, raw: pd.DataFrame,
                      mask: np.ndarray, notes: ReadNotes | None = None) -> pd.DataFrame:
    if not mask.any():
        return pd.DataFrame(columns=_QUARANTINE_COLUMNS)
    positions = np.flatnonzero(mask)
    problems = notes.row_problems if notes is not None else {}
    raw_json = []
    for label, record in zip(raw.index[positions].tolist(), raw.iloc[positions].to_dict(orient="records")):
        problem = problems.get(label)
        raw_json.append(json.dumps({"raw": problem[1]}) if problem else _raw_json(record))
    return pd.DataFrame(
        {
            "domain": domain,
            "kind": kind,
            "source_file": source,
            "line": np.asarray(lines)[mask].astype(int),
            "reason": reasons[mask].to_numpy(),
            "raw_json": raw_json,
        }
    )


def _line_error_rows(notes: ReadNotes, kind: str, domain: str, source: str) -> pd.DataFrame:
    """Quarantine rows of the lines that are no row at all (JSON Lines: not a JSON object)."""
    errors = notes.line_errors
    return pd.DataFrame(
        {
            "domain": domain,
            "kind": kind,
            "source_file": source,
            "line": [e[0] for e in errors],
            "reason": [e[1] for e in errors],
            "raw_json": [json.dumps({"raw": e[2]}) for e in errors],
        },
        columns=_QUARANTINE_COLUMNS,
    )


def _read_problem_rows(reasons: pd.Series, raw: pd.DataFrame, notes: ReadNotes) -> np.ndarray:
    """The rows the reader could not read (``ReadNotes.row_problems``): their reason becomes that problem alone."""
    problem = np.zeros(len(raw), dtype=bool)
    if not notes.row_problems:
        return problem
    labels = [label for label in notes.row_problems if label in raw.index]
    if not labels:
        return problem
    positions = raw.index.get_indexer(labels)
    problem[positions] = True
    reasons.iloc[positions] = [notes.row_problems[label][0] for label in labels]
    return problem


def _duplicated_last_among(keys: pa.Array | pd.Series, candidates: np.ndarray) -> np.ndarray:
    """Rows (among ``candidates``) whose key appears again in a later candidate row: the later one wins."""
    dup = np.zeros(len(candidates), dtype=bool)
    idx = np.flatnonzero(candidates)
    if len(idx) == 0:
        return dup
    if isinstance(keys, pd.Series):
        dup[idx] = keys.iloc[idx].duplicated(keep="last").to_numpy()
    else:
        dup[idx] = _duplicated_keep_last(keys.take(pa.array(idx)) if len(idx) < len(keys) else keys)
    return dup


def _add_reason(reasons: pd.Series, mask: pd.Series | np.ndarray, text: str) -> None:
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():  # the common case: nothing to write
        return
    current = reasons[mask]
    reasons[mask] = np.where(current == "", text, current + "; " + text)


def _arrow_text(series: pd.Series) -> pa.Array:
    """``series.astype("string")`` as one pyarrow string array (nulls kept).

    Zero-copy for the text columns a CSV gives; other columns go through
    ``astype("string")`` exactly as before.
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


@dataclass
class _Patterns:
    """The patterns of a file's rows: one (row, pattern) per distinct stripped name, and the rows' problems."""

    frame: pd.DataFrame  # row position, pattern
    not_text: np.ndarray  # rows whose patterns are neither text nor a list of text
    not_unicode: np.ndarray
    too_long: np.ndarray  # rows with a name longer than PATTERN_MAX
    nul: np.ndarray  # rows with a NUL character in a name


def _explode_patterns(series: pd.Series) -> _Patterns:
    """'a|b' strings (CSV) or lists (JSON Lines) -> long frame (row position, pattern), vectorized.

    Names are stripped, empty names dropped, and a pattern repeated on one trade kept
    once: a pattern either fired on a trade or it did not.
    """
    values = series.reset_index(drop=True)
    n = len(values)
    if values.dtype == object:
        kind = pd.api.types.infer_dtype(values, skipna=True)
        try:
            if kind in ("string", "empty"):
                values = values.astype(_TEXT_DTYPE)
            else:  # JSON / Parquet: lists of text, the common case, go to arrow as they are
                cells = values.tolist()
                if any(isinstance(v, (str, bytes)) for v in cells):  # arrow would read "a|b" as letters
                    return _explode_pattern_objects(values)
                return _patterns_from_lists(pa.array(cells, type=pa.list_(pa.string()), from_pandas=True), n)
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError, TypeError, ValueError):
            return _explode_pattern_objects(values)  # anything else, one row at a time
    # text: split, flatten and strip in arrow (a Python str.split per row was most of validation)
    return _patterns_from_lists(pc.split_pattern(_arrow_text(values), "|"), n)


def _patterns_from_lists(lists: pa.Array, n: int) -> _Patterns:
    """Arrow lists of names (one list per row) -> ``_Patterns``: stripped, empty dropped, kept once per row."""
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    names = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    keep = _mask(pc.not_equal(names, ""))
    rows, names = rows[keep], names.filter(pa.array(keep))
    enc = names.dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniques = np.array(enc.dictionary.to_pylist(), dtype=object)
    first = ~pd.Series(rows * max(len(uniques), 1) + codes).duplicated().to_numpy()
    frame = pd.DataFrame({"row": rows[first], "pattern": _text_column(uniques[codes[first]])})
    long_u = np.fromiter((len(u) > PATTERN_MAX for u in uniques), dtype=bool, count=len(uniques))
    nul_u = np.fromiter(("\x00" in u for u in uniques), dtype=bool, count=len(uniques))
    none = np.zeros(n, dtype=bool)
    too_long, nul = none.copy(), none.copy()
    too_long[rows[long_u[codes]]] = True
    nul[rows[nul_u[codes]]] = True
    return _Patterns(frame, none, none.copy(), too_long, nul)


def _explode_pattern_objects(values: pd.Series) -> _Patterns:
    """JSON / Parquet patterns, one row at a time: a "a|b" string or a list of names (not split on "|")."""
    n = len(values)
    not_text, not_unicode = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    too_long, nul = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    rows: list[int] = []
    names: list[str] = []
    for i, v in enumerate(values.tolist()):
        if _missing(v):
            continue
        if isinstance(v, str):
            items: list = v.split("|")
        elif isinstance(v, (list, tuple, np.ndarray)):
            items = [x for x in list(v) if not _missing(x)]
            if any(isinstance(x, (bool, np.bool_)) or not isinstance(x, (str, int, float, np.integer, np.floating))
                   for x in items):
                not_text[i] = True
                continue
            items = [x if isinstance(x, str) else str(x) for x in items]
        else:
            not_text[i] = True
            continue
        if any(_SURROGATE_RE.search(x) for x in items):
            not_unicode[i] = True
            continue
        seen: set[str] = set()
        for x in items:
            x = x.strip()
            if x and x not in seen:
                seen.add(x)
                rows.append(i)
                names.append(x)
                too_long[i] |= len(x) > PATTERN_MAX
                nul[i] |= "\x00" in x
    frame = pd.DataFrame({"row": np.asarray(rows, dtype=np.int64), "pattern": _text_column(np.array(names, dtype=object))})
    return _Patterns(frame, not_text, not_unicode, too_long, nul)


def validate_trades(raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str,
                    limits: IngestLimits | None = None,
                    repeated_later: Callable[[pa.Array, np.ndarray], np.ndarray] | None = None) -> TradesBatch:
    """Validate a raw trades frame against the contract.

    Bad rows go to the quarantine frame with their line and every reason; good rows
    become the four source-table frames. A missing required column raises ContractError.
    Text columns of the frames are object arrays of Python str.

    Row reasons, besides the contract's (empty trade_id, unparsable closed_at, ...): a row
    the reader could not read (``ReadNotes.row_problems``: its reason alone), a value
    that is not text (``regime must be text``: a JSON object, array or boolean), not a
    number (a JSON ``true`` in ``return_r`` or a metric), a NUL character, a value longer
    than its column (``TRADE_ID_MAX``, ``REGIME_MAX``, ``STRATEGY_ID_MAX``, ``PATTERN_MAX``,
    ``SCOPE_VALUE_MAX``: the lengths of the tables), a timestamp out of
    ``TIMESTAMP_MIN``..``TIMESTAMP_END``, and in JSON / Parquet a ``scope`` or ``metrics``
    that is not an object.

    Columns: a scope key or metric name comes from a column header, so a bad one (longer
    than ``SCOPE_KEY_MAX`` / ``METRIC_NAME_MAX``, empty, with a NUL or control character,
    not Unicode) would spoil every row: that *column* is ignored and reported
    (``ignored_columns``, e.g. ``"scope.xxx… (scope key longer than 100 characters)"``), the
    rows keep their other values. Columns the contract does not name, duplicate and empty
    header names are ignored and reported the same way.

    A trade id repeated in the file keeps its last row (like a re-ingest); the earlier rows
    are quarantined ("repeated later") and counted in ``duplicates_in_file``. A row the
    reader could not read takes no part in this (its id is not trustworthy).
    ``repeated_later(trade_ids, candidates)``: which candidate rows are repeated later in the
    *file* when ``raw`` is one span of it (``ingest_stream``); by default, later in ``raw``.

    Limits (``IngestLimits``): a row with a cell over ``max_cell_chars`` is quarantined like a
    row the reader could not read (that reason alone, its text cut); more than
    ``max_patterns`` patterns or ``max_scope_keys`` scope keys (or metric names) is a reason.
    """
    validate_domain(domain)
    limits = limits or IngestLimits.from_env()
    notes = _read_notes(raw)
    over_limit = limits.cell_problems(raw)
    if over_limit:  # as a row the reader could not read: a problem the reader found keeps precedence
        notes = ReadNotes(notes.format, {**over_limit, **notes.row_problems}, notes.line_errors,
                          notes.column_problems, notes.header_note)
    line_bad = _line_error_rows(notes, "trades", domain, source)
    if raw.empty and not line_bad.empty:
        return TradesBatch(*(_empty_trades_frames()), quarantine=line_bad, n_rows=len(line_bad))
    _require_columns(raw, TRADE_REQUIRED, source, notes)
    n = len(raw)
    lines = np.asarray(lines)
    reasons = pd.Series([""] * n, index=raw.index, dtype=object)
    usable, ignored = _prefixed_columns(
        raw, notes, {*TRADE_REQUIRED, "strategy_id"},
        {"scope.": ("scope key", SCOPE_KEY_MAX), "metric.": ("metric name", METRIC_NAME_MAX)},
        json_objects=("scope", "metrics"))

    trade_id = _checked_text(raw, "trade_id", reasons, limit=TRADE_ID_MAX, empty_reason="empty trade_id")
    id_empty = _mask(pc.equal(trade_id, ""))
    closed_at, unparsable, out_of_range = _parse_timestamps(raw["closed_at"])
    _timestamp_reasons(reasons, "closed_at", unparsable, out_of_range)
    regime = _checked_text(raw, "regime", reasons, limit=REGIME_MAX, empty_reason="empty regime")
    return_r, _ = _number_cells(raw["return_r"])
    _add_reason(reasons, ~np.isfinite(return_r), "return_r is not a finite number")
    exploded = _explode_patterns(raw["patterns"])
    patterns = exploded.frame
    _add_reason(reasons, exploded.not_text, "patterns must be text or a list of text")
    _add_reason(reasons, exploded.not_unicode, "patterns is not valid Unicode text")
    patterns_per_row = np.bincount(patterns["row"].to_numpy(dtype=np.int64), minlength=n)
    _add_reason(reasons, (patterns_per_row == 0) & ~exploded.not_text & ~exploded.not_unicode, "empty patterns")
    _add_reason(reasons, exploded.nul, "patterns contains a NUL character")
    _add_reason(reasons, exploded.too_long, f"pattern longer than {PATTERN_MAX} characters")
    _add_reason(reasons, patterns_per_row > limits.max_patterns,
                f"more than {limits.max_patterns:,} patterns (the ingest limit per trade)")
    if "strategy_id" in raw.columns:
        strategy = _checked_text(raw, "strategy_id", reasons, limit=STRATEGY_ID_MAX)
        strategy = pc.if_else(pc.equal(strategy, ""), "default", strategy)
    else:
        strategy = pa.repeat("default", n)
    for obj in ("scope", "metrics"):
        _add_reason(reasons, _not_object_rows(raw, notes, obj), f"{obj} must be a JSON object")

    scope_values = {col: _checked_text(raw, col, reasons, limit=SCOPE_VALUE_MAX) for col in usable["scope."]}
    metric_values = {}
    for col, name in usable["metric."].items():
        values, given = _number_cells(raw[col])
        _add_reason(reasons, given & ~np.isfinite(values), f"{col} is not a finite number")
        metric_values[name] = values
    if len(scope_values) > limits.max_scope_keys:
        keys_per_row = sum(_mask(pc.not_equal(v, "")).astype(np.int64) for v in scope_values.values())
        _add_reason(reasons, keys_per_row > limits.max_scope_keys,
                    f"more than {limits.max_scope_keys:,} scope keys (the ingest limit per trade)")
    if len(metric_values) > limits.max_scope_keys:
        names_per_row = sum(np.isfinite(v).astype(np.int64) for v in metric_values.values())
        _add_reason(reasons, names_per_row > limits.max_scope_keys,
                    f"more than {limits.max_scope_keys:,} metric names (the ingest limit per trade)")

    # a trade id appearing twice in one file: the last one wins, like a re-ingest
    problem = _read_problem_rows(reasons, raw, notes)
    dup = (repeated_later or _duplicated_last_among)(trade_id, ~id_empty & ~problem)
    _add_reason(reasons, dup, "trade_id repeated later in the same file (later row kept)")

    bad = (reasons != "").to_numpy()
    good = ~bad
    good_rows = np.flatnonzero(good)
    quarantine_rows = pd.concat(
        [line_bad, _quarantine_frame("trades", domain, source, lines, reasons, raw, bad, notes)], ignore_index=True
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
            "return_r": return_r[good],
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
    for col, key in usable["scope."].items():
        values = scope_values[col].take(take_good)
        keep = _mask(pc.not_equal(values, ""))
        if keep.any():
            kept = int(keep.sum())
            scope_parts.append(
                pd.DataFrame({"domain": _constant_text(domain, kept),
                              "trade_id": _text_column(ids[keep]),
                              "key": _constant_text(key, kept),
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
        v = values[good]
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
    return TradesBatch(trades_df, pattern_df, scope_df, metrics_df, quarantine_rows, n_rows=n + len(line_bad),
                       ignored_columns=ignored, duplicates_in_file=int(dup.sum()))


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


@dataclass
class TelemetryRows:
    """Telemetry rows parsed and checked once (``check_telemetry_rows``).

    ``problems`` are the failed checks in a fixed order (ts, then each outcome: finite,
    bounds, then each knob column), each with its quarantine reason and the rows it
    failed on: ingest quarantines those rows, the controller refuses the batch naming
    the first one.
    """

    ts: pd.Series  # UTC, NaT where unparsable or out of range
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

    Checks: ``ts`` parseable and within the timestamp range (``_parse_timestamps``);
    each outcome a finite number within TELEMETRY_BOUNDS; each knob cell empty (not
    reported) or a finite number (a JSON boolean is a number only for a knob of kind
    bool: ``true`` = 1). Knob columns: the store layout ``knob_<name>`` or the file layout
    ``knob.<name>`` (``knob_column``); with ``file_layout`` only ``knob.<name>`` (an input
    file's contract: other columns are ignored).
    """
    problems: list[tuple[str, str, np.ndarray]] = []

    def check(column: str, reason: str, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            problems.append((column, reason, mask))

    ts, unparsable, out_of_range = _parse_timestamps(frame["ts"])
    check("ts", "unparsable ts", unparsable)
    check("ts", f"ts out of range ({TIMESTAMP_RANGE})", out_of_range)
    outcomes: dict[str, np.ndarray] = {}
    for col in TELEMETRY_OUTCOMES:
        values, _ = _number_cells(frame[col])
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
        values, given = _number_cells(frame[col], allow_bool=KNOBS[name].kind == "bool")
        check(col, f"{col} is not a finite number", given & ~np.isfinite(values))
        knobs[name], knob_columns[name] = values, col
    return TelemetryRows(ts, outcomes, knobs, knob_columns, problems)


def telemetry_row_problems(frame: pd.DataFrame, *, file_layout: bool = False) -> pd.Series:
    """Per row, why it breaks the telemetry contract ("" = ok); see ``check_telemetry_rows``."""
    return check_telemetry_rows(frame, file_layout=file_layout).reasons(frame.index)


def validate_telemetry(raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> TelemetryBatch:
    """Validate a raw telemetry frame; same quarantine rules as trades (the row checks:
    ``check_telemetry_rows``, plus a row the reader could not read, a JSON ``knobs`` that is
    not an object, and a ts repeated later in the file: the later row is kept, the earlier
    ones quarantined and counted in ``duplicates_in_file``). Columns other than
    TELEMETRY_REQUIRED and ``knob.<name>`` of a knob are ignored and reported."""
    validate_domain(domain)
    notes = _read_notes(raw)
    line_bad = _line_error_rows(notes, "telemetry", domain, source)
    cols = ["domain", *TELEMETRY_STORE_COLUMNS, "source_file"]
    if raw.empty and not line_bad.empty:
        return TelemetryBatch(pd.DataFrame(columns=cols), line_bad, n_rows=len(line_bad))
    _require_columns(raw, TELEMETRY_REQUIRED, source, notes)
    n = len(raw)
    lines = np.asarray(lines)
    _, ignored = _prefixed_columns(raw, notes, {*TELEMETRY_REQUIRED, *(f"knob.{k}" for k in KNOB_NAMES)}, {},
                                   json_objects=("knobs",),
                                   unknown_why=lambda c: "not a knob" if c.startswith("knob.") else "")
    checked = check_telemetry_rows(raw, file_layout=True)
    reasons = checked.reasons(raw.index)
    _add_reason(reasons, _not_object_rows(raw, notes, "knobs"), "knobs must be a JSON object")
    ts = checked.ts
    problem = _read_problem_rows(reasons, raw, notes)
    dup = _duplicated_last_among(ts, ts.notna().to_numpy() & ~problem)
    _add_reason(reasons, dup, "ts repeated later in the same file (later row kept)")
    bad = (reasons != "").to_numpy()
    good = ~bad
    frame = pd.DataFrame({"domain": domain, "ts": ts[good].to_numpy()})
    for col in TELEMETRY_OUTCOMES:
        frame[col] = checked.outcomes[col][good]
    for name, col in zip(KNOB_NAMES, TELEMETRY_KNOB_COLUMNS):
        frame[col] = checked.knobs[name][good] if name in checked.knobs else np.full(int(good.sum()), np.nan)
    frame["source_file"] = source
    quarantine_rows = pd.concat(
        [line_bad, _quarantine_frame("telemetry", domain, source, lines, reasons, raw, bad, notes)], ignore_index=True
    )
    return TelemetryBatch(frame, quarantine_rows, n_rows=n + len(line_bad), ignored_columns=ignored,
                          duplicates_in_file=int(dup.sum()))


# ---------------------------------------------------------------------------
# Governance inputs: backtest runs and engine configs (per domain)
# ---------------------------------------------------------------------------
#
# ``meta-pipeline ingest backtests FILE --domain D``: one row per backtest run of a strategy
# (in a regime, or the whole strategy when regime is empty) with its summary statistics;
# ``meta-pipeline ingest configs FILE --domain D``: configs the engines ran (or run), which
# become ``configs`` versions exactly as an applied proposal does. Same rules as trades:
# a file without a required column is rejected whole; a bad row goes to quarantine with
# its line and reason; a key repeated later in the file keeps the later row.

GOVERNANCE_KINDS = ("backtests", "configs")
BACKTEST_REQUIRED = ("run_id", "strategy_id", "started_at", "mean_return_r", "std_return_r", "n_trades")
CONFIG_REQUIRED = ("target_type", "target_id", "config_json")
CONFIG_TARGET_TYPES = ("STRATEGY_CONFIG", "META_KNOBS", "PM_OVERRIDES")  # the ingestible ones (docs/contract.md)
RUN_ID_MAX = backtest_runs.c.run_id.type.length  # 200
CONFIG_TARGET_ID_MAX = configs.c.target_id.type.length  # 300
STRATEGY_WEIGHT_MAX = 10.0


@dataclass
class GovernanceBatch:
    rows: pd.DataFrame  # backtest_runs rows, or configs rows (target_type, target_id, config_json, valid_from)
    quarantine: pd.DataFrame
    n_rows: int
    ignored_columns: list[str] = field(default_factory=list)
    duplicates_in_file: int = 0


def _governance_start(raw: pd.DataFrame, kind: str, domain: str, source: str, required: tuple[str, ...]):
    validate_domain(domain)
    notes = _read_notes(raw)
    line_bad = _line_error_rows(notes, kind, domain, source)
    if raw.empty:
        return notes, line_bad, True
    _require_columns(raw, required, source, notes)
    return notes, line_bad, False


def validate_backtests(raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> GovernanceBatch:
    """Validate a backtest-runs file (columns BACKTEST_REQUIRED, optional ``regime`` and ``metric.<name>``).

    Row checks: run_id, strategy_id non-empty text within the schema lengths (regime: empty =
    the whole strategy); started_at a timestamp in range; mean_return_r finite; std_return_r
    finite and ≥ 0; n_trades a whole number ≥ 2; every ``metric.<name>`` empty or finite.
    The row lands in ``backtest_runs`` with ``metrics_json`` = {mean_return_r, std_return_r,
    n_trades, and each metric.<name>}.
    """
    notes, line_bad, empty = _governance_start(raw, "backtests", domain, source, BACKTEST_REQUIRED)
    cols = ["run_id", "domain", "strategy_id", "regime", "started_at", "metrics_json"]
    if empty:
        return GovernanceBatch(pd.DataFrame(columns=cols), line_bad, n_rows=len(line_bad))
    lines = np.asarray(lines)
    extra = [c for c in raw.columns if isinstance(c, str) and c.startswith("metric.") and len(c) > 7]
    known = {*BACKTEST_REQUIRED, "regime", *extra}
    ignored = [_ignored(c) for c in raw.columns if c not in known]
    reasons = pd.Series([""] * len(raw), index=raw.index, dtype=object)
    run_id = _checked_text(raw, "run_id", reasons, limit=RUN_ID_MAX, empty_reason="empty run_id")
    strategy = _checked_text(raw, "strategy_id", reasons, limit=STRATEGY_ID_MAX, empty_reason="empty strategy_id")
    regime = _checked_text(raw, "regime", reasons, limit=REGIME_MAX) if "regime" in raw.columns else None
    started, unparsable, out_of_range = _parse_timestamps(raw["started_at"])
    _timestamp_reasons(reasons, "started_at", unparsable, out_of_range)
    mean, _ = _number_cells(raw["mean_return_r"])
    _add_reason(reasons, ~np.isfinite(mean), "mean_return_r is not a finite number")
    sd, _ = _number_cells(raw["std_return_r"])
    _add_reason(reasons, ~np.isfinite(sd), "std_return_r is not a finite number")
    with np.errstate(invalid="ignore"):
        _add_reason(reasons, np.isfinite(sd) & (sd < 0), "std_return_r is negative")
    n_trades, _ = _number_cells(raw["n_trades"])
    with np.errstate(invalid="ignore"):
        _add_reason(reasons, ~(np.isfinite(n_trades) & (n_trades == np.round(n_trades)) & (n_trades >= 2)),
                    "n_trades is not a whole number ≥ 2")
    metrics = {}
    for col in extra:
        values, given = _number_cells(raw[col])
        _add_reason(reasons, given & ~np.isfinite(values), f"{col} is not a finite number")
        metrics[col[7:]] = values
    problem = _read_problem_rows(reasons, raw, notes)
    ids = pd.Series(run_id.to_pylist(), index=raw.index)
    dup = _duplicated_last_among(ids, (ids != "").to_numpy() & ~problem)
    _add_reason(reasons, dup, "run_id repeated later in the same file (later row kept)")
    good = (reasons == "").to_numpy()
    regimes = regime.to_pylist() if regime is not None else [""] * len(raw)
    rows = []
    for i in np.flatnonzero(good):
        m = {"mean_return_r": float(mean[i]), "std_return_r": float(sd[i]), "n_trades": int(n_trades[i]),
             **{k: float(v[i]) for k, v in metrics.items() if np.isfinite(v[i])}}
        rows.append({"run_id": ids.iloc[i], "domain": domain, "strategy_id": strategy[i].as_py(),
                     "regime": regimes[i] or None, "started_at": started.iloc[i],
                     "metrics_json": json.dumps(m, sort_keys=True)})
    frame = pd.DataFrame(rows, columns=cols)
    quarantine_rows = pd.concat([line_bad, _quarantine_frame("backtests", domain, source, lines, reasons, raw, ~good,
                                                             notes)], ignore_index=True)
    return GovernanceBatch(frame, quarantine_rows, n_rows=len(raw) + len(line_bad), ignored_columns=ignored,
                           duplicates_in_file=int(dup.sum()))


def config_problem(target_type: str, target_id: str, config: object, domain: str) -> str:
    """Why a config cannot be a ``configs`` version of ``domain`` ("" = it can); see docs/contract.md."""
    if target_type not in CONFIG_TARGET_TYPES:
        return f"target_type {target_type!r} unknown (use {', '.join(CONFIG_TARGET_TYPES)})"
    if not isinstance(config, dict):
        return "config_json must be a JSON object"
    if target_type == "STRATEGY_CONFIG":
        owner, _, strategy = target_id.partition("/")
        if owner != domain or not strategy:
            return f"target_id of a STRATEGY_CONFIG must be {domain}/<strategy_id>"
        if "strategy_id" in config and config["strategy_id"] != strategy:
            return f"config_json strategy_id {config['strategy_id']!r} is not {strategy!r}"
        weights = config.get("regime_weights")
        if not isinstance(weights, dict) or not weights:
            return "config_json needs regime_weights: an object {regime: weight}"
        for regime, w in weights.items():
            if len(str(regime)) > REGIME_MAX or isinstance(w, bool) or not isinstance(w, (int, float)) \
                    or not 0 <= w <= STRATEGY_WEIGHT_MAX:
                return f"regime_weights[{str(regime)[:40]!r}] must be a number in [0, {STRATEGY_WEIGHT_MAX:g}]"
        return ""
    if target_id != domain:
        return f"target_id of a {target_type} must be the domain ({domain})"
    if target_type == "META_KNOBS":
        for name, value in config.items():
            if name not in KNOBS:
                return f"unknown knob {str(name)[:40]!r} in config_json"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not KNOBS[name].low <= value <= KNOBS[name].high:
                return f"knob {name} in config_json must be a number in [{KNOBS[name].low}, {KNOBS[name].high}]"
        return ""
    allowed = {"min_support": (2, 10_000), "max_scope_dims": (0, 4)}
    for name, value in config.items():
        if name not in allowed:
            return f"unknown PM_OVERRIDES setting {str(name)[:40]!r} in config_json (use min_support, max_scope_dims)"
        lo, hi = allowed[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"{name} in config_json must be a whole number in [{lo}, {hi}]"
    return ""


def validate_configs(raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> GovernanceBatch:
    """Validate an engine-configs file (columns CONFIG_REQUIRED, optional ``valid_from``).

    Each row is one config a target had: ``target_type`` (CONFIG_TARGET_TYPES), ``target_id``
    (``<domain>/<strategy_id>`` for STRATEGY_CONFIG, the domain otherwise), ``config_json``
    (a JSON object checked by ``config_problem``) and ``valid_from`` (when the engine started
    running it; empty = now). Rows of one target land in valid_from order, the latest as the
    active version; the same target and valid_from repeated later keeps the later row.
    """
    notes, line_bad, empty = _governance_start(raw, "configs", domain, source, CONFIG_REQUIRED)
    cols = ["target_type", "target_id", "config_json", "valid_from"]
    if empty:
        return GovernanceBatch(pd.DataFrame(columns=cols), line_bad, n_rows=len(line_bad))
    lines = np.asarray(lines)
    ignored = [_ignored(c) for c in raw.columns if c not in {*CONFIG_REQUIRED, "valid_from"}]
    reasons = pd.Series([""] * len(raw), index=raw.index, dtype=object)
    ttype = _checked_text(raw, "target_type", reasons, limit=configs.c.target_type.type.length,
                          empty_reason="empty target_type").to_pylist()
    tid = _checked_text(raw, "target_id", reasons, limit=CONFIG_TARGET_ID_MAX, empty_reason="empty target_id").to_pylist()
    if "valid_from" in raw.columns:
        valid_from, unparsable, out_of_range = _parse_timestamps(raw["valid_from"])
        given = _mask(pc.not_equal(_stripped(_text_cells(raw["valid_from"])[0]), ""))
        _timestamp_reasons(reasons, "valid_from", unparsable & given, out_of_range)
    else:
        valid_from = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    parsed: list[object] = []
    for pos, value in enumerate(raw["config_json"].tolist()):
        if isinstance(value, dict):
            config = value
        else:
            try:
                config = json.loads(value) if isinstance(value, str) else None
            except ValueError:
                config = None
        parsed.append(config)
        if reasons.iloc[pos] == "":
            problem = config_problem(str(ttype[pos]), str(tid[pos]), config, domain)
            if problem:
                reasons.iloc[pos] = problem
    problem_rows = _read_problem_rows(reasons, raw, notes)
    key = pd.Series([f"{a}\x00{b}\x00{c}" for a, b, c in zip(ttype, tid, valid_from.astype(str))], index=raw.index)
    dup = _duplicated_last_among(key, ~problem_rows & (reasons == "").to_numpy())
    _add_reason(reasons, dup, "target and valid_from repeated later in the same file (later row kept)")
    good = (reasons == "").to_numpy()
    frame = pd.DataFrame({
        "target_type": [ttype[i] for i in np.flatnonzero(good)],
        "target_id": [tid[i] for i in np.flatnonzero(good)],
        "config_json": [json.dumps(parsed[i], sort_keys=True, separators=(",", ":")) for i in np.flatnonzero(good)],
        "valid_from": valid_from[good].to_numpy(),
    }, columns=cols)
    quarantine_rows = pd.concat([line_bad, _quarantine_frame("configs", domain, source, lines, reasons, raw, ~good,
                                                             notes)], ignore_index=True)
    return GovernanceBatch(frame, quarantine_rows, n_rows=len(raw) + len(line_bad), ignored_columns=ignored,
                           duplicates_in_file=int(dup.sum()))


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
    ignored_columns: list[str] = field(default_factory=list)
    duplicates_in_file: int = 0  # rows superseded by a later row with the same (ts, input)


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
            if isinstance(v, (bool, np.bool_)):
                return "true" if v else "false"
            return str(v)

        # Python str throughout: a lone surrogate (a JSON "\ud800" escape) must reach the
        # caller's check, not break an arrow conversion
        return pd.Series([one(v).strip() for v in series.tolist()], index=series.index, dtype=object)
    return series.astype("string").fillna("").str.strip().astype(object)


def _metadata_objects(raw: pd.DataFrame, reasons: pd.Series, notes: ReadNotes | None = None) -> list[str | None]:
    """Per row, ``metadata.<key>`` columns (CSV) and/or a JSON object ``metadata`` as one JSON text (None: empty).

    An empty ``metadata.<key>`` cell means "no such key"; a ``metadata`` value that is not
    an object, or whose text is not valid Unicode (a JSON "\ud800" escape), is a bad row.
    Columns with an unusable header name (``ReadNotes.column_problems``) are left out.
    """
    unusable = notes.column_problems if notes is not None else {}
    cols = [c for c in raw.columns if isinstance(c, str) and c.startswith("metadata.") and len(c) > len("metadata.")
            and c not in unusable and not _name_problem(c, "name", None)]
    whole = raw["metadata"] if "metadata" in raw.columns else None
    if not cols and whole is None:
        return [None] * len(raw)
    out: list[str | None] = []
    not_object = np.zeros(len(raw), dtype=bool)
    not_unicode = np.zeros(len(raw), dtype=bool)
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
        text = json.dumps(_jsonable(meta), sort_keys=True, ensure_ascii=False) if meta else None
        if text is not None and _SURROGATE_RE.search(text):
            not_unicode[i] = True
            text = None
        out.append(text)
    _add_reason(reasons, not_object, "metadata is not a JSON object")
    _add_reason(reasons, not_unicode, "metadata is not valid Unicode text")
    return out


def validate_feedback(raw: pd.DataFrame, lines: np.ndarray, *, task: str, source: str) -> FeedbackBatch:
    """Validate a raw feedback frame against the contract (quarantine rules as trades).

    Columns: ``ts`` (ISO-8601, no offset = UTC), ``input``, ``output`` (text; JSON values
    that are objects or arrays are kept as canonical JSON text; surrounding whitespace is
    stripped), ``score`` (a finite number in [0, 1]), optional ``model_version`` (text,
    ≤ 200 characters — the column's length; empty = not given) and ``metadata.<key>``
    columns (CSV) / a ``metadata`` object (JSON Lines), stored together as
    ``metadata_json``. Other columns are ignored and reported (``ignored_columns``). Row
    reasons: unparsable ts, ts out of range (``_parse_timestamps``), empty input, empty
    output, score not a finite number (a JSON boolean is not a number), score outside
    [0, 1], model_version too long, a NUL character in input, output or model_version (SQL
    text cannot hold it), text that is not valid Unicode, metadata that is not an object, a
    row the reader could not read (``ReadNotes``), and the same (ts, input) repeated later
    in the file (the later row is kept, like a re-ingest; counted in
    ``duplicates_in_file``). A missing required column raises ContractError. The
    quarantine rows have kind ``feedback`` and the task in their ``domain`` column.
    """
    validate_task(task)
    notes = _read_notes(raw)
    line_bad = _line_error_rows(notes, "feedback", task, source)
    cols = list(FEEDBACK_STORE_COLUMNS)
    if raw.empty and not line_bad.empty:
        return FeedbackBatch(pd.DataFrame(columns=cols), line_bad, n_rows=len(line_bad))
    _require_columns(raw, FEEDBACK_REQUIRED, source, notes)
    n = len(raw)
    lines = np.asarray(lines)
    reasons = pd.Series([""] * n, index=raw.index, dtype=object)
    _, ignored = _prefixed_columns(raw, notes, {*FEEDBACK_REQUIRED, "model_version", "metadata"},
                                   {"metadata.": ("metadata key", None)}, json_objects=())
    version_max = feedback.c.model_version.type.length

    ts, unparsable, out_of_range = _parse_timestamps(raw["ts"])
    _timestamp_reasons(reasons, "ts", unparsable, out_of_range)
    inputs = _feedback_text(raw["input"])
    outputs = _feedback_text(raw["output"])
    for col, values in (("input", inputs), ("output", outputs)):
        not_unicode = values.str.contains(_SURROGATE_RE.pattern, regex=True).to_numpy(dtype=bool)
        _add_reason(reasons, (values == "").to_numpy(), f"empty {col}")
        _add_reason(reasons, values.str.contains("\x00", regex=False).to_numpy(dtype=bool),
                    f"{col} contains a NUL character")
        _add_reason(reasons, not_unicode, f"{col} is not valid Unicode text")
        values[not_unicode] = ""  # never handed to the database
    score, _ = _number_cells(raw["score"])
    finite = np.isfinite(score)
    _add_reason(reasons, ~finite, "score is not a finite number")
    with np.errstate(invalid="ignore"):
        _add_reason(reasons, finite & ((score < 0.0) | (score > 1.0)), "score outside [0, 1]")
    if "model_version" in raw.columns:
        version = _feedback_text(raw["model_version"])
        not_unicode = version.str.contains(_SURROGATE_RE.pattern, regex=True).to_numpy(dtype=bool)
        _add_reason(reasons, (version.str.len() > version_max).to_numpy(),
                    f"model_version longer than {version_max} characters")
        _add_reason(reasons, version.str.contains("\x00", regex=False).to_numpy(dtype=bool),
                    "model_version contains a NUL character")
        _add_reason(reasons, not_unicode, "model_version is not valid Unicode text")
        version[not_unicode] = ""
        version = version.where(version != "", None)
    else:
        version = pd.Series([None] * n, index=raw.index, dtype=object)
    meta = _metadata_objects(raw, reasons, notes)

    # the same (ts, input) twice in one file: the last one wins, like a re-ingest
    problem = _read_problem_rows(reasons, raw, notes)
    keys = ts.astype(str) + "\n" + inputs
    dup = _duplicated_last_among(keys, ts.notna().to_numpy() & ~problem)
    _add_reason(reasons, dup, "(ts, input) repeated later in the same file (later row kept)")

    bad = (reasons != "").to_numpy()
    good = ~bad
    quarantine_rows = pd.concat(
        [line_bad, _quarantine_frame("feedback", task, source, lines, reasons, raw, bad, notes)], ignore_index=True
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
    return FeedbackBatch(frame[cols], quarantine_rows, n_rows=n + len(line_bad), ignored_columns=ignored,
                         duplicates_in_file=int(dup.sum()))


# ---------------------------------------------------------------------------
# Prompt evolution and the LLM (meta_pipeline.prompts, meta_pipeline.llm; docs/prompts.md)
# ---------------------------------------------------------------------------
#
# A task (the `task` partitions, shared with generic feedback) has labelled examples
# (`prompt_examples`, landed by `meta-pipeline ingest examples FILE --task NAME`, validated
# by meta_pipeline.prompts.examples), a starting prompt (a PROMPT_TEMPLATE row of `configs`,
# target_id = the task) and the runs of prompt evolution. Every model call is a row of
# `llm_calls`; `llm_cache` keeps responses by (model, messages) so a re-run is free.

prompt_examples = Table(
    "prompt_examples",
    metadata,
    T(),
    Column("example_id", String(200), nullable=False),
    Column("input", Text, nullable=False),
    Column("expected", Text, nullable=False),  # the right answer (a label such as "B", or e.g. "positive")
    Column("choices_json", Text),  # JSON list of {"label", "text"}; null: no choices
    Column("metadata_json", Text),
    Column("source_file", Text),
    Column("ingested_at", DateTime(timezone=True)),
    Index("ix_prompt_examples_task_id", "task", "example_id", unique=True),
)
prompt_runs = Table(
    "prompt_runs",
    metadata,
    T(),
    Column("run_id", String(100), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("provider", String(50), nullable=False),
    Column("model", String(200), nullable=False),
    Column("start_config_version", Integer),  # the PROMPT_TEMPLATE version evolution started from
    Column("baseline_prompt", Text, nullable=False),
    Column("best_prompt", Text, nullable=False),
    Column("best_candidate_id", String(100), nullable=False),
    Column("best_spec_json", Text, nullable=False),
    Column("n_train", Integer, nullable=False),
    Column("n_val", Integer, nullable=False),
    Column("n_test", Integer, nullable=False),
    Column("baseline_val", Float, nullable=False),
    Column("best_val", Float, nullable=False),
    Column("iterations", Integer, nullable=False),
    Column("converged", Boolean, nullable=False),
    Column("stop_reason", Text, nullable=False),
    Column("calls", Integer, nullable=False),  # model calls of the run (both assets, the rationale included)
    Column("cached_calls", Integer, nullable=False),  # answered from llm_cache (free)
    Column("tokens", Integer, nullable=False),
    # filled by prompt_comparison (null until it ran)
    Column("baseline_test", Float),
    Column("best_test", Float),
    Column("win_margin", Float),  # best_test − baseline_test
    Column("margin_ci_low", Float),
    Column("margin_ci_high", Float),
    Column("p_value", Float),  # exact McNemar, two-sided
    Column("test_method", String(100)),
    Column("proposal_id", String(100)),
    Column("compared_at", DateTime(timezone=True)),
    Index("ix_prompt_runs_task_run", "task", "run_id", unique=True),
)
prompt_candidates = Table(
    "prompt_candidates",
    metadata,
    T(),
    Column("run_id", String(100), nullable=False),
    Column("iteration", Integer, nullable=False),  # 0: the starting prompt
    Column("candidate_id", String(100), nullable=False),
    Column("parent_id", String(100)),
    Column("strategy", String(50), nullable=False),
    Column("prompt_text", Text, nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("val_score", Float),  # null: not scored (the budget ran out)
    Column("val_errors", Integer),
    Column("accepted", Boolean, nullable=False),
    Column("calls", Integer, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("note", Text),
    Index("ix_prompt_candidates_task_run", "task", "run_id", "candidate_id", unique=True),
)
llm_calls = Table(
    "llm_calls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("called_at", DateTime(timezone=True), nullable=False),
    Column("run_id", String(100)),
    Column("task", String(63)),
    Column("purpose", String(50), nullable=False),  # answer | rewrite | rationale | ...
    Column("provider", String(50), nullable=False),
    Column("model", String(200), nullable=False),
    Column("cache_key", String(64), nullable=False),
    Column("cached", Boolean, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("error", Text),
    Index("ix_llm_calls_run", "run_id"),
)
llm_cache = Table(
    "llm_cache",
    metadata,
    Column("cache_key", String(64), primary_key=True),  # sha256 of canonical JSON (model, messages, params)
    Column("model", String(200), nullable=False),
    Column("messages_json", Text, nullable=False),
    Column("response_text", Text, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
