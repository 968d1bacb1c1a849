"""Diagnostics of one domain: where the returns come from, where they fall short of the
backtests, what the overrides are worth, and which knobs actually move the meta-reward.

Pure pandas/numpy/scipy (no Dagster). ``compute_diagnostics`` takes the domain's tables
as DataFrames (every input except trades may be missing or empty) and returns rows in
the layout of the ``diagnostics`` table plus plain-language notes about what could not
be computed and why.

Sections (``section`` column) and their statistics:

* ``inputs`` — rows seen per input table (0 = absent; the note says what was skipped).
* ``by_regime``, ``by_strategy``, ``by_strategy_regime``, ``by_pattern_family`` — mean
  ``return_r`` with a two-sided t confidence interval and the t-test p-value against 0.
  A pattern family is the pattern name before the first ``.``; a trade counts once per
  family however many of the family's patterns fired.
* ``realized_vs_backtest`` — per strategy×regime, realized mean minus backtest mean.
  Backtest runs of a cell are pooled (n-weighted mean; pooled variance including the
  between-run spread), the backtest standard error is ``sd/√N``; the difference gets a
  Welch t interval (Welch–Satterthwaite df) and a two-sided p-value. A backtest run with
  no regime is compared against all of the strategy's trades (subject ``strategy/*``).
* ``overrides`` — per ``pm_overrides`` row, the trades it fires on (its pattern fired,
  every scope key of the override equals the trade's, regime matches or is any):
  fire rate, and what it was worth = mean return of the trades it fired on minus the
  mean of the others (Welch interval, p-value), next to the edge the override claimed.
  Plus the share of trades on which at least one override fires.
* ``override_churn`` — when the previous diagnostics run recorded the override set, the
  share of overrides added or removed since (|A △ B| / |A ∪ B|).
* ``knob_importance`` — mutual information between each knob in telemetry and the
  meta-reward (equal-frequency bins, plug-in estimator) against a permutation null: the
  reward is shuffled ``n_permutations`` times (one shared permutation matrix, joint
  histograms by one ``bincount`` per knob) and ``p = (1 + #{MI_null ≥ MI_obs}) / (1 + B)``.
  The plug-in bias is the same under the null, so the p-value is exact for the estimator.
* ``knob_best_region`` — where a knob's reward is best and what moving there from the
  current value would gain, by sample splitting (so choosing the target does not inflate
  its own test): a separable quadratic surface ``reward ≈ a + Σ_k b_k u_k + c_k u_k²``
  (u = knob in unit space) is fitted on the even ticks to choose the target (the
  argmax of the knob's fitted curve over the explored range, on a 0.05 unit grid); it is
  refitted on the odd ticks to estimate the gain ``f(target) − f(current)``, its
  standard error (OLS covariance, delta method) and a one-sided p-value.
* ``global_prior_gap`` — the same surface (all ticks) predicts the reward at the newest
  global prior and at the current knobs: gain, interval, one-sided p, and the unit-space
  distance between them.
* ``nearest_configs`` — the current environment (mean of the last ``recent_window`` ticks
  of: stability, vram utilization and latency; the regime mix and the return volatility
  of the 50 trades before each tick) against the earlier ticks, each feature standardized
  by its past sd: distance = RMS standardized difference, similarity = exp(−d²/2). The
  ``knn_k`` nearest, of which the best ``knn_top`` by reward are listed with their knobs,
  environment, distance and similarity (descriptive only: no p-value, because picking the
  best neighbours by reward is a selection).
* ``strategy_vs_peers`` — per strategy × regime: shortfall against the other strategies in
  the regime AND against the strategy's own other regimes (one-sided Welch each; p = the
  larger, an intersection–union test). What strategy proposals are made of without backtests.
* ``tail`` — per strategy × regime: expected shortfall (mean of the worst 5 %) and max
  drawdown of cumulative R; for the suspect cells (peer p ≤ 0.05) a bootstrap stress of
  cutting the cell's weight (the strategy's total R and drawdown at weights 1, .75, .5, .25).
* ``regime_dispersion`` — per strategy: n-weighted sd of its regime means, normalized
  entropy of its |total R| across regimes, mutual information between regime and win/loss.
* ``by_attribute`` — mean return per value of each scope key with 2..20 values (sector,
  profile, …) with t intervals, and a one-way ANOVA per key.
* ``risk_overrides`` — ``scope.risk_override`` (the reason; absent = none): frequency and
  impact (mean of overridden trades minus the others, Welch interval), per reason and all.
* ``controller`` — the controller's rollbacks, decisions, reward EMA, and the unit-space
  distance between the knobs it runs and the approved META_KNOBS config (drift).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from meta_pipeline.contracts import TELEMETRY_REQUIRED, knob_column
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, knobs_to_unit
from meta_pipeline.meta.reward import telemetry_reward
from meta_pipeline.meta.surface import quadratic_design, ridge_solve

DIAGNOSTICS_COLUMNS = [
    "domain", "section", "subject", "metric", "value", "ci_low", "ci_high", "n", "p_value", "details_json",
]
ENV_FEATURES = ("stability_mean", "vram_utilization", "latency_ms")
PERFORMANCE_SECTIONS = ("by_regime", "by_strategy", "by_strategy_regime", "by_pattern_family")


@dataclass(frozen=True)
class DiagnosticsSettings:
    """Tunables of the diagnostics; the defaults are what the asset uses."""

    confidence_level: float = 0.95
    min_group_n: int = 2  # smallest group that gets a mean and an interval
    n_permutations: int = 1999  # permutation null of knob importance (p ≥ 1/(B+1) = 0.0005)
    max_bins: int = 10
    min_ticks: int = 30  # fewer telemetry ticks: no knob analysis (said in the notes)
    region_grid_step: float = 0.05  # unit-space grid of proposed knob values
    recent_window: int = 20
    knn_k: int = 20
    knn_top: int = 5
    tail_alpha: float = 0.05  # expected shortfall: mean of the worst 5 % of a cell's returns
    tail_min_n: int = 4  # smallest cell that gets tail figures
    n_bootstrap: int = 400  # bootstrap resamples of the stress of a cell's weight cut
    seed: int = 20260601


@dataclass
class DiagnosticsInputs:
    """One domain's inputs. Only ``trades`` is required; anything else may be None or empty."""

    domain: str
    trades: pd.DataFrame
    trade_patterns: pd.DataFrame | None = None
    trade_scope: pd.DataFrame | None = None
    backtest_runs: pd.DataFrame | None = None
    telemetry: pd.DataFrame | None = None
    pm_overrides: pd.DataFrame | None = None
    previous_override_keys: Sequence[str] | None = None
    current_knobs: Mapping[str, float] | None = None
    current_knobs_source: str = "defaults"
    global_prior: pd.DataFrame | None = None  # version, knob, value (newest version used)
    controller_state: pd.DataFrame | None = None
    approved_knobs: Mapping[str, float] | None = None  # the active META_KNOBS config, if any


@dataclass
class DiagnosticsResult:
    rows: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def section(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["section"] == name].reset_index(drop=True)


# ---------------------------------------------------------------------------
# small statistics helpers (vectorized over groups)
# ---------------------------------------------------------------------------


def _t_interval(mean: np.ndarray, se: np.ndarray, df: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore"):
        half = stats.t.ppf(0.5 + level / 2, np.maximum(df, 1)) * se
    ok = np.isfinite(half) & (df >= 1)
    return np.where(ok, mean - half, np.nan), np.where(ok, mean + half, np.nan)


def _two_sided_p(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        p = 2 * stats.t.sf(np.abs(t), np.maximum(df, 1))
    return np.where(np.isfinite(t) & (df >= 1), p, np.nan)


def _welch_df(se1: np.ndarray, n1: np.ndarray, se2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    v1, v2 = se1**2, se2**2
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (v1 + v2) ** 2 / (v1**2 / np.maximum(n1 - 1, 1) + v2**2 / np.maximum(n2 - 1, 1))
    return np.where(np.isfinite(df), df, np.maximum(np.minimum(n1, n2) - 1, 1))


def _rows(domain: str, section: str, subject, metric, value, ci_low=None, ci_high=None, n=None,
          p_value=None, details: Sequence[dict] | None = None) -> pd.DataFrame:
    """A block of diagnostics rows; array arguments are per row, scalars are broadcast."""
    frame = pd.DataFrame({"subject": subject, "metric": metric, "value": value, "ci_low": ci_low,
                          "ci_high": ci_high, "n": n, "p_value": p_value})
    frame.insert(0, "section", section)
    frame.insert(0, "domain", domain)
    frame["details_json"] = [json.dumps(d, sort_keys=True, default=_json_default) for d in details] if details else None
    for col in ("value", "ci_low", "ci_high", "p_value"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    return frame[DIAGNOSTICS_COLUMNS]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _clean(value: float) -> float | None:
    """JSON-friendly float: None for NaN/inf, else rounded to 6 significant digits."""
    if value is None or not np.isfinite(value):
        return None
    return float(f"{float(value):.6g}")


# ---------------------------------------------------------------------------
# performance
# ---------------------------------------------------------------------------


def group_performance(frame: pd.DataFrame, keys: list[str], level: float, min_n: int) -> pd.DataFrame:
    """Mean return_r per group with a t interval and the p-value of 'mean = 0'."""
    g = frame.groupby(keys, observed=True, sort=True)["return_r"].agg(["mean", "std", "count"]).reset_index()
    g = g[g["count"] >= min_n].reset_index(drop=True)
    n = g["count"].to_numpy(dtype=float)
    se = g["std"].to_numpy(dtype=float) / np.sqrt(n)
    lo, hi = _t_interval(g["mean"].to_numpy(), se, n - 1, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = _two_sided_p(g["mean"].to_numpy() / se, n - 1)
    g["se"], g["ci_low"], g["ci_high"], g["p_value"] = se, lo, hi, p
    return g


def _performance_rows(domain: str, trades: pd.DataFrame, patterns: pd.DataFrame | None,
                      s: DiagnosticsSettings) -> list[pd.DataFrame]:
    out = []
    specs = [("by_regime", ["regime"]), ("by_strategy", ["strategy_id"]), ("by_strategy_regime", ["strategy_id", "regime"])]
    frames = {"by_regime": trades, "by_strategy": trades, "by_strategy_regime": trades}
    if patterns is not None and len(patterns):
        fam = patterns[["trade_id", "pattern"]].copy()
        fam["family"] = fam["pattern"].astype(str).str.split(".", n=1).str[0]
        fam = fam.drop_duplicates(["trade_id", "family"]).merge(trades[["trade_id", "return_r"]], on="trade_id")
        frames["by_pattern_family"] = fam
        specs.append(("by_pattern_family", ["family"]))
    for section, keys in specs:
        g = group_performance(frames[section], keys, s.confidence_level, s.min_group_n)
        if g.empty:
            continue
        subject = g[keys].astype(str).agg("/".join, axis=1)
        details = [{**{k: row[k] for k in keys}, "std": _clean(row["std"]), "se": _clean(row["se"])}
                   for row in g.to_dict(orient="records")]
        out.append(_rows(domain, section, subject.to_numpy(), "mean_return_r", g["mean"], g["ci_low"], g["ci_high"],
                         g["count"], g["p_value"], details))
    return out


# ---------------------------------------------------------------------------
# realized vs backtest
# ---------------------------------------------------------------------------


def pool_backtests(backtest_runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Pool backtest runs per (strategy, regime); returns the cells and the number of unusable runs.

    Pooled variance of the combined sample: (Σ(n_i−1)s_i² + Σ n_i(m_i − m̄)²) / (N − 1).
    """
    parsed = backtest_runs["metrics_json"].map(_parse_json)
    runs = pd.DataFrame({
        "strategy_id": backtest_runs["strategy_id"].astype(str).to_numpy(),
        "regime": backtest_runs["regime"].astype(object).where(backtest_runs["regime"].notna(), "*").to_numpy(),
        "m": pd.to_numeric(parsed.map(lambda d: d.get("mean_return_r")), errors="coerce").to_numpy(dtype=float),
        "s": pd.to_numeric(parsed.map(lambda d: d.get("std_return_r")), errors="coerce").to_numpy(dtype=float),
        "n": pd.to_numeric(parsed.map(lambda d: d.get("n_trades")), errors="coerce").to_numpy(dtype=float),
    })
    ok = np.isfinite(runs["m"]) & np.isfinite(runs["s"]) & np.isfinite(runs["n"]) & (runs["n"] >= 2) & (runs["s"] >= 0)
    bad = int((~ok).sum())
    runs = runs[ok].copy()
    if runs.empty:
        return pd.DataFrame(columns=["strategy_id", "regime", "bt_mean", "bt_sd", "bt_n", "bt_runs", "bt_se"]), bad
    runs["nm"] = runs["n"] * runs["m"]
    cells = runs.groupby(["strategy_id", "regime"], sort=True).agg(
        bt_n=("n", "sum"), nm=("nm", "sum"), bt_runs=("m", "size")).reset_index()
    cells["bt_mean"] = cells["nm"] / cells["bt_n"]
    runs = runs.merge(cells[["strategy_id", "regime", "bt_mean"]], on=["strategy_id", "regime"])
    runs["ss"] = (runs["n"] - 1) * runs["s"] ** 2 + runs["n"] * (runs["m"] - runs["bt_mean"]) ** 2
    ss = runs.groupby(["strategy_id", "regime"], sort=True)["ss"].sum().reset_index()
    cells = cells.merge(ss, on=["strategy_id", "regime"])
    cells["bt_sd"] = np.sqrt(cells["ss"] / np.maximum(cells["bt_n"] - 1, 1))
    cells["bt_se"] = cells["bt_sd"] / np.sqrt(cells["bt_n"])
    return cells[["strategy_id", "regime", "bt_mean", "bt_sd", "bt_n", "bt_runs", "bt_se"]], bad


def _parse_json(text: Any) -> dict:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def realized_vs_backtest(trades: pd.DataFrame, backtest_runs: pd.DataFrame, level: float,
                         min_n: int) -> tuple[pd.DataFrame, int]:
    """Per backtested cell: realized − backtest mean, Welch interval and two-sided p."""
    cells, bad = pool_backtests(backtest_runs)
    if cells.empty:
        return cells, bad
    by_cell = trades.groupby(["strategy_id", "regime"])["return_r"].agg(["mean", "std", "count"]).reset_index()
    by_strategy = trades.groupby("strategy_id")["return_r"].agg(["mean", "std", "count"]).reset_index()
    by_strategy["regime"] = "*"
    realized = pd.concat([by_cell, by_strategy], ignore_index=True)
    out = cells.merge(realized, on=["strategy_id", "regime"], how="inner")
    out = out[out["count"] >= min_n].reset_index(drop=True)
    if out.empty:
        return out, bad
    n_r = out["count"].to_numpy(dtype=float)
    se_r = out["std"].to_numpy(dtype=float) / np.sqrt(n_r)
    se_b = out["bt_se"].to_numpy(dtype=float)
    diff = out["mean"].to_numpy() - out["bt_mean"].to_numpy()
    se = np.sqrt(se_r**2 + se_b**2)
    df = _welch_df(se_r, n_r, se_b, out["bt_n"].to_numpy(dtype=float))
    lo, hi = _t_interval(diff, se, df, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = diff / se
    out = out.rename(columns={"mean": "realized_mean", "std": "realized_sd", "count": "realized_n"})
    out["realized_se"], out["diff"], out["diff_se"], out["df"], out["t"] = se_r, diff, se, df, t
    out["ci_low"], out["ci_high"], out["p_value"] = lo, hi, _two_sided_p(t, df)
    return out, bad


# ---------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------


def override_firing(trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame | None,
                    overrides: pd.DataFrame) -> pd.DataFrame:
    """(trade_id, override_idx) pairs where an override fires: pattern fired, scope and regime match."""
    ov = overrides.reset_index(drop=True)
    ov_pat = pd.DataFrame({"override_idx": np.arange(len(ov)), "pattern": ov["pattern"].astype(str).to_numpy()})
    pairs = patterns[["trade_id", "pattern"]].merge(ov_pat, on="pattern")[["trade_id", "override_idx"]]
    scope_dicts = ov["scope_json"].map(_parse_json)
    need = [(i, str(k), str(v)) for i, d in enumerate(scope_dicts) for k, v in d.items()]
    n_keys = np.array([len(d) for d in scope_dicts], dtype=int)
    if need:
        req = pd.DataFrame(need, columns=["override_idx", "key", "value"])
        trade_scope = scope[["trade_id", "key", "value"]].astype(str) if scope is not None and len(scope) else \
            pd.DataFrame(columns=["trade_id", "key", "value"])
        matched = pairs.merge(req, on="override_idx").merge(trade_scope, on=["trade_id", "key", "value"])
        hits = matched.groupby(["trade_id", "override_idx"]).size().rename("hits").reset_index()
        pairs = pairs.merge(hits, on=["trade_id", "override_idx"], how="left")
        pairs = pairs[pairs["hits"].fillna(0).to_numpy() == n_keys[pairs["override_idx"].to_numpy()]]
    regime = ov["regime"].to_numpy(dtype=object) if "regime" in ov.columns else np.full(len(ov), None, dtype=object)
    pairs = pairs.merge(trades[["trade_id", "regime"]], on="trade_id")
    want = regime[pairs["override_idx"].to_numpy()]
    any_regime = pd.isna(pd.Series(want, dtype=object)).to_numpy()
    keep = any_regime | (pairs["regime"].astype(str).to_numpy() == want.astype(str))
    return pairs.loc[keep, ["trade_id", "override_idx"]].drop_duplicates().reset_index(drop=True)


def override_worth(trades: pd.DataFrame, fired: pd.DataFrame, overrides: pd.DataFrame, level: float) -> pd.DataFrame:
    """Per override: trades fired on, fire rate, and uplift = mean(fired) − mean(others)."""
    ov = overrides.reset_index(drop=True)
    r = trades.set_index("trade_id")["return_r"]
    total_n, total_sum, total_sq = len(r), float(r.sum()), float((r**2).sum())
    f = fired.merge(r.rename("return_r"), left_on="trade_id", right_index=True)
    agg = f.groupby("override_idx")["return_r"].agg(n="size", s="sum", sq=lambda x: float((x**2).sum()))
    agg = agg.reindex(np.arange(len(ov)), fill_value=0.0)
    n1 = agg["n"].to_numpy(dtype=float)
    n0 = total_n - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = agg["s"].to_numpy() / n1
        m0 = (total_sum - agg["s"].to_numpy()) / n0
        v1 = (agg["sq"].to_numpy() - n1 * m1**2) / (n1 - 1)
        v0 = (total_sq - agg["sq"].to_numpy() - n0 * m0**2) / (n0 - 1)
        se1, se0 = np.sqrt(np.maximum(v1, 0) / n1), np.sqrt(np.maximum(v0, 0) / n0)
        uplift = m1 - m0
        se = np.sqrt(se1**2 + se0**2)
        df = _welch_df(se1, n1, se0, n0)
        t = uplift / se
    lo, hi = _t_interval(uplift, se, df, level)
    return pd.DataFrame({
        "lesson_key": ov["lesson_key"].astype(str).to_numpy(),
        "regime": ov["regime"].to_numpy(dtype=object) if "regime" in ov.columns else None,
        "claimed_edge": pd.to_numeric(ov["edge"], errors="coerce").to_numpy(dtype=float),
        "n_fired": n1.astype(int), "fire_rate": n1 / max(total_n, 1), "fired_mean": m1,
        "uplift": uplift, "ci_low": lo, "ci_high": hi, "p_value": _two_sided_p(t, df),
    })


def override_identity(overrides: pd.DataFrame) -> list[str]:
    """Stable identities of override rows (lesson_key @ regime), used for churn."""
    regime = overrides["regime"] if "regime" in overrides.columns else pd.Series(None, index=overrides.index)
    return sorted(set(overrides["lesson_key"].astype(str) + "@" + regime.astype(object).where(regime.notna(), "*").astype(str)))


# ---------------------------------------------------------------------------
# knobs: importance (MI vs permutation null), best region, global prior gap
# ---------------------------------------------------------------------------


def knob_matrix(telemetry: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """The knobs telemetry reports at least once (``contracts.knob_column``), as values."""
    names, cols = [], []
    for name in KNOB_NAMES:
        col = knob_column(telemetry, name)
        if col is None:
            continue
        values = pd.to_numeric(telemetry[col], errors="coerce").to_numpy(dtype=float)
        if np.isfinite(values).sum() == 0:
            continue
        names.append(name)
        cols.append(values)
    return names, (np.column_stack(cols) if cols else np.empty((len(telemetry), 0)))


def discretize(x: np.ndarray, max_bins: int) -> np.ndarray:
    """Bin index per value: the distinct values when there are few, else equal-frequency bins."""
    uniq, inverse = np.unique(x, return_inverse=True)
    if uniq.size <= max_bins:
        return inverse.astype(np.int64)
    edges = np.quantile(x, np.linspace(0, 1, max_bins + 1)[1:-1])
    return np.searchsorted(np.unique(edges), x, side="right").astype(np.int64)


def _mi_from_counts(counts: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) of joint count tables shaped (..., kx, ky)."""
    n = counts.sum(axis=(-2, -1), keepdims=True)
    pxy = counts / n
    px = pxy.sum(axis=-1, keepdims=True)
    py = pxy.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pxy > 0, pxy * np.log(pxy / (px * py)), 0.0)
    return terms.sum(axis=(-2, -1))


def permutation_mutual_information(x: np.ndarray, y: np.ndarray, *, n_permutations: int, rng: np.random.Generator,
                                   max_bins: int = 10, chunk: int = 256) -> dict[str, Any]:
    """MI between each column of x and y, with a permutation-null p-value per column.

    One permutation matrix of y's bins is shared by all columns; each column's null joint
    histograms come from one bincount per chunk of permutations (no Python loop over
    permutations or ticks).
    """
    n, k = x.shape
    n_bins = int(np.clip(round(n ** (1 / 3)), 3, max_bins))
    yb = discretize(y, n_bins)
    ky = int(yb.max()) + 1
    xbins = [discretize(x[:, j], n_bins) for j in range(k)]
    observed = np.array([_mi_from_counts(np.bincount(xb * ky + yb, minlength=(int(xb.max()) + 1) * ky)
                                         .reshape(int(xb.max()) + 1, ky)) for xb in xbins])
    null = np.empty((n_permutations, k))
    base = np.tile(np.arange(n), (min(chunk, n_permutations), 1))
    for start in range(0, n_permutations, chunk):
        b = min(chunk, n_permutations - start)
        perm_y = yb[rng.permuted(base[:b], axis=1)]  # b × n shuffled reward bins
        for j, xb in enumerate(xbins):
            kx = int(xb.max()) + 1
            cells = kx * ky
            idx = (np.arange(b)[:, None] * cells + xb[None, :] * ky + perm_y).ravel()
            counts = np.bincount(idx, minlength=b * cells).reshape(b, kx, ky)
            null[start:start + b, j] = _mi_from_counts(counts)
    exceed = (null >= observed[None, :] - 1e-12).sum(axis=0)
    p = (1 + exceed) / (1 + n_permutations)
    return {"mi": observed, "p_value": p, "null_mean": null.mean(axis=0),
            "null_q95": np.quantile(null, 0.95, axis=0), "null_q99": np.quantile(null, 0.99, axis=0),
            "n_bins": n_bins, "null": null}


@dataclass
class QuadraticSurface:
    """OLS fit of reward ≈ a + Σ_k b_k u_k + c_k u_k² (no square term for bool knobs; ``meta.surface``)."""

    names: list[str]
    kinds: list[str]
    beta: np.ndarray
    cov: np.ndarray
    dof: int
    n: int
    resid_sd: float

    def design(self, u: np.ndarray) -> np.ndarray:
        return quadratic_design(u, self.kinds).matrix

    def predict(self, u: np.ndarray) -> np.ndarray:
        return self.design(u) @ self.beta

    def contrast(self, u_new: np.ndarray, u_old: np.ndarray) -> tuple[float, float]:
        """f(u_new) − f(u_old) and its standard error."""
        d = (self.design(u_new) - self.design(u_old))[0]
        return float(d @ self.beta), float(math.sqrt(max(d @ self.cov @ d, 0.0)))


def fit_surface(u: np.ndarray, reward: np.ndarray, names: list[str]) -> QuadraticSurface | None:
    """The surface over raw unit space (no centering), or None with fewer than p + 3 ticks."""
    kinds = [KNOBS[nm].kind for nm in names]
    X = quadratic_design(u, kinds).matrix
    if len(reward) <= X.shape[1] + 2:
        return None
    fit = ridge_solve(X, reward, 1e-9 * len(reward), with_cov=True)  # tiny ridge: a constant knob stays solvable
    return QuadraticSurface(names, kinds, fit.beta, fit.cov, fit.dof, len(reward), math.sqrt(fit.sigma2))


def _unit(names: list[str], values: np.ndarray) -> np.ndarray:
    return np.column_stack([(values[:, j] - KNOBS[nm].low) / (KNOBS[nm].high - KNOBS[nm].low)
                            for j, nm in enumerate(names)]) if names else values


def best_region(u: np.ndarray, reward: np.ndarray, names: list[str], current_u: np.ndarray,
                grid_step: float) -> pd.DataFrame:
    """Split-sample target and gain per knob (see module doc): even ticks choose, odd ticks test."""
    fit_rows, test_rows = np.arange(0, len(reward), 2), np.arange(1, len(reward), 2)
    fit = fit_surface(u[fit_rows], reward[fit_rows], names)
    test = fit_surface(u[test_rows], reward[test_rows], names)
    if fit is None or test is None:
        return pd.DataFrame()
    records = []
    for j, name in enumerate(names):
        spec = KNOBS[name]
        lo, hi = np.quantile(u[fit_rows, j], [0.05, 0.95])
        if spec.kind == "bool":
            grid = np.array([0.0, 1.0])
        else:
            grid = np.unique(np.clip(np.round(np.arange(math.floor(lo / grid_step), math.ceil(hi / grid_step) + 1)
                                              * grid_step, 10), lo, hi))
            grid = np.unique([spec.to_unit(spec.from_unit(g)) for g in grid])  # int knobs land on integers
        points = np.repeat(current_u[None, :], len(grid), axis=0)
        points[:, j] = grid
        target = float(grid[int(np.argmax(fit.predict(points)))])
        new = current_u.copy()
        new[j] = target
        gain, se = test.contrast(new, current_u)
        t = gain / se if se > 0 else (math.inf if gain > 0 else 0.0)
        explored = (u[:, j].min() - 1e-9 <= current_u[j] <= u[:, j].max() + 1e-9)
        records.append({
            "knob": name, "current": spec.from_unit(current_u[j]), "proposed": spec.from_unit(target),
            "gain": gain, "se": se, "df": test.dof, "t": t, "p_value": float(stats.t.sf(t, test.dof)),
            "n_fit": len(fit_rows), "n_test": len(test_rows), "reward_sd": float(np.std(reward[test_rows], ddof=1)),
            "current_explored": bool(explored),
        })
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------
# nearest past configurations under similar conditions
# ---------------------------------------------------------------------------


ENV_TRADES = 50  # trades before a tick that describe its market: regime mix and volatility of returns


def environment_vectors(telemetry: pd.DataFrame, trades: pd.DataFrame | None,
                        n_trades: int = ENV_TRADES) -> tuple[list[str], np.ndarray]:
    """Per tick (in ``telemetry`` row order) the environment it ran in: the telemetry levels
    (ENV_FEATURES), and from the last ``n_trades`` trades closed before the tick the share of each
    regime (``regime_share:<r>``) and the sd of return_r (``return_volatility``). Ticks with fewer
    than ``n_trades // 2`` trades before them get NaN trade features (cumulative sums: no loop)."""
    names = list(ENV_FEATURES)
    cols = [pd.to_numeric(telemetry[c], errors="coerce").to_numpy(dtype=float) for c in ENV_FEATURES]
    if trades is not None and len(trades) >= n_trades // 2 and "closed_at" in trades.columns:
        t = trades.sort_values("closed_at", kind="stable")
        closed = pd.to_datetime(t["closed_at"], utc=True).to_numpy(dtype="datetime64[ns]")
        ts = pd.to_datetime(telemetry["ts"], utc=True).to_numpy(dtype="datetime64[ns]")
        hi = np.searchsorted(closed, ts, side="right")
        lo = np.maximum(hi - n_trades, 0)
        cnt = (hi - lo).astype(float)
        ok = cnt >= n_trades // 2
        r = t["return_r"].to_numpy(dtype=float)
        c1, c2 = np.concatenate([[0.0], np.cumsum(r)]), np.concatenate([[0.0], np.cumsum(r * r)])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (c1[hi] - c1[lo]) / cnt
            var = ((c2[hi] - c2[lo]) - cnt * mean**2) / (cnt - 1)
        names.append("return_volatility")
        cols.append(np.where(ok, np.sqrt(np.maximum(var, 0)), np.nan))
        reg = t["regime"].astype(str).to_numpy()
        for regime in sorted(set(reg)):
            cr = np.concatenate([[0.0], np.cumsum(reg == regime)])
            with np.errstate(invalid="ignore", divide="ignore"):
                cols.append(np.where(ok, (cr[hi] - cr[lo]) / cnt, np.nan))
            names.append(f"regime_share:{regime}")
    return names, np.column_stack(cols)


def nearest_configs(telemetry: pd.DataFrame, reward: np.ndarray, names: list[str], values: np.ndarray,
                    recent_window: int, k: int, top: int, trades: pd.DataFrame | None = None
                    ) -> tuple[dict, pd.DataFrame]:
    """The past ticks whose environment was nearest the recent one, best rewards first.

    Environment vector (``environment_vectors``): telemetry levels, the regime mix and the
    return volatility of the trades around the tick. Each feature is standardized by its sd
    over the past ticks; distance = RMS of the standardized differences (so it does not grow
    with the number of features); similarity = exp(−distance²/2) ∈ (0, 1] (1: identical
    conditions; 0.61 at one sd on every feature). The current environment is the mean of the
    last ``recent_window`` ticks; of the ``k`` nearest past ticks the best ``top`` by reward
    are listed with their knobs (the config they ran) and outcome (reward).
    """
    order = np.argsort(pd.to_datetime(telemetry["ts"], utc=True).to_numpy(), kind="stable")
    features, env = environment_vectors(telemetry.iloc[order].reset_index(drop=True), trades)
    r, v = reward[order], values[order]
    ts = pd.to_datetime(telemetry["ts"], utc=True).to_numpy()[order]
    recent, past = slice(len(r) - recent_window, None), slice(0, len(r) - recent_window)
    with np.errstate(invalid="ignore"):
        current = np.nanmean(env[recent], axis=0) if np.isfinite(env[recent]).any() else env[recent][0]
    use = np.isfinite(current) & (np.isfinite(env[past]).mean(axis=0) >= 0.5)  # features known now and mostly before
    features = [f for f, u in zip(features, use) if u]
    env, current = env[:, use], current[use]
    sd = np.nanstd(env[past], axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    with np.errstate(invalid="ignore"):
        z = (env[past] - current) / sd
    dist = np.sqrt(np.nanmean(z**2, axis=1)) if len(features) else np.zeros(len(z))
    dist = np.where(np.isfinite(dist), dist, np.inf)
    similarity = np.exp(-dist**2 / 2)
    nearest = np.argsort(dist, kind="stable")[: min(k, len(dist))]
    best = nearest[np.argsort(-r[past][nearest], kind="stable")[:top]]
    summary = {"recent_reward": float(r[recent].mean()), "recent_env": dict(zip(features, current.tolist())),
               "features": features, "neighbour_mean_reward": float(r[past][nearest].mean()), "k": len(nearest),
               "neighbour_mean_similarity": float(similarity[nearest].mean()),
               "similarity": "exp(-d^2/2), d = RMS of the features standardized by their past sd"}
    frame = pd.DataFrame({
        "ts": pd.to_datetime(ts[past][best], utc=True),
        "distance": dist[best],
        "similarity": similarity[best],
        "reward": r[past][best],
        "knobs": [dict(zip(names, map(float, row))) for row in v[past][best]],
        "env": [dict(zip(features, map(float, row))) for row in env[past][best]],
    })
    return summary, frame


# ---------------------------------------------------------------------------
# strategies against their peers, tails, dispersion, attributes, risk overrides
# ---------------------------------------------------------------------------


def _welch_one_sided_less(m1: np.ndarray, v1: np.ndarray, n1: np.ndarray, m2: np.ndarray, v2: np.ndarray,
                          n2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Welch test of "mean 1 < mean 2": (difference m1 − m2, its standard error, one-sided p)."""
    se1, se2 = np.sqrt(np.maximum(v1, 0) / n1), np.sqrt(np.maximum(v2, 0) / n2)
    se = np.sqrt(se1**2 + se2**2)
    df = _welch_df(se1, n1, se2, n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (m1 - m2) / se
        p = stats.t.cdf(t, np.maximum(df, 1))
    ok = np.isfinite(t) & (n1 >= 2) & (n2 >= 2)
    return m1 - m2, se, np.where(ok, p, np.nan)


def strategy_vs_peers(trades: pd.DataFrame, min_n: int) -> pd.DataFrame:
    """Per strategy × regime cell: is it worse than its peers in the regime AND than itself elsewhere?

    Peers = the other strategies' trades in the same regime; own = the strategy's trades
    in its other regimes. Each comparison is a one-sided Welch test of "cell mean <
    comparison mean"; the cell's p-value is the larger of the two (an intersection–union
    test: it is small only when the cell falls short of both). ``shortfall`` = the smaller
    of the two differences (R per trade), ``shortfall_sd`` = shortfall / the cell's sd.
    Sums and sums of squares per cell make it one pass (no loop over cells).
    """
    r = trades["return_r"].to_numpy(dtype=float)
    frame = pd.DataFrame({"strategy_id": trades["strategy_id"].astype(str).to_numpy(),
                          "regime": trades["regime"].astype(str).to_numpy(), "r": r, "r2": r * r})
    cell = frame.groupby(["strategy_id", "regime"], sort=True).agg(n=("r", "size"), s=("r", "sum"), q=("r2", "sum"))
    cell = cell.reset_index()
    by_regime = cell.groupby("regime")[["n", "s", "q"]].sum().add_prefix("g_")
    by_strategy = cell.groupby("strategy_id")[["n", "s", "q"]].sum().add_prefix("o_")
    cell = cell.join(by_regime, on="regime").join(by_strategy, on="strategy_id")
    n, s_, q = (cell[c].to_numpy(dtype=float) for c in ("n", "s", "q"))
    pn, ps, pq = cell["g_n"].to_numpy(float) - n, cell["g_s"].to_numpy(float) - s_, cell["g_q"].to_numpy(float) - q
    on, os_, oq = cell["o_n"].to_numpy(float) - n, cell["o_s"].to_numpy(float) - s_, cell["o_q"].to_numpy(float) - q

    def mean_var(cnt: np.ndarray, tot: np.ndarray, sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            m = tot / cnt
            v = (sq - cnt * m * m) / (cnt - 1)
        return m, v

    m, v = mean_var(n, s_, q)
    pm, pv = mean_var(pn, ps, pq)
    om, ov = mean_var(on, os_, oq)
    d_peer, _, p_peer = _welch_one_sided_less(m, v, n, pm, pv, pn)
    d_own, _, p_own = _welch_one_sided_less(m, v, n, om, ov, on)
    out = pd.DataFrame({
        "strategy_id": cell["strategy_id"], "regime": cell["regime"], "n": n.astype(int), "mean": m,
        "sd": np.sqrt(np.maximum(v, 0)), "peer_mean": pm, "peer_n": pn.astype(int), "own_mean": om,
        "own_n": on.astype(int), "p_peer": p_peer, "p_own": p_own,
    })
    out["shortfall"] = np.minimum(-d_peer, -d_own)  # the smaller of the two shortfalls (R per trade)
    out["p_value"] = np.where(np.isfinite(p_peer) & np.isfinite(p_own), np.fmax(p_peer, p_own), np.nan)  # both needed
    with np.errstate(divide="ignore", invalid="ignore"):
        out["shortfall_sd"] = np.where(out["sd"] > 0, out["shortfall"] / out["sd"], 0.0)
    return out[(out["n"] >= min_n) & out["p_value"].notna()].reset_index(drop=True)


def expected_shortfall(x: np.ndarray, alpha: float) -> float:
    """Mean of the worst ⌈alpha·n⌉ returns (the empirical expected shortfall at level alpha)."""
    if len(x) == 0:
        return float("nan")
    k = max(1, int(math.ceil(alpha * len(x))))
    return float(np.sort(x)[:k].mean())


def max_drawdown(path: np.ndarray) -> np.ndarray:
    """Largest peak-to-trough fall of cumulative R along the last axis (≥ 0; the peak includes the start at 0)."""
    cum = np.cumsum(path, axis=-1)
    peak = np.maximum.accumulate(np.maximum(cum, 0.0), axis=-1)
    return (peak - cum).max(axis=-1)


STRESS_WEIGHTS = (1.0, 0.75, 0.5, 0.25)  # the cell weights the bootstrap stress evaluates


def tail_and_stress(trades: pd.DataFrame, min_n: int, alpha: float, n_boot: int,
                    rng: np.random.Generator, stress_cells: set[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Per strategy × regime: expected shortfall and max drawdown (cell trades in closed_at order), and a
    bootstrap stress of cutting the cell's weight.

    Stress: the strategy's trades are resampled with replacement ``n_boot`` times (same n, iid);
    in each resample the cell's trades are scaled by w ∈ STRESS_WEIGHTS and the strategy's total R
    and max drawdown are recomputed. Reported: quantiles (5 %, 50 %, 95 %) of the cell's total R
    (the change in total R of weight w is exactly (w − 1)·that total) and the median and 95 %
    quantile of the strategy's drawdown at each w. Only the cells in ``stress_cells`` (None: all)
    are stressed — the diagnostics stress the cells a proposal may cut (one-sided peer p ≤ 0.05).
    """
    order = np.argsort(pd.to_datetime(trades["closed_at"], utc=True).to_numpy(), kind="stable") \
        if "closed_at" in trades.columns else np.arange(len(trades))
    t = trades.iloc[order]
    rows = []
    for strategy, st in t.groupby(t["strategy_id"].astype(str), sort=True):
        r_all = st["return_r"].to_numpy(dtype=float)
        reg = st["regime"].astype(str).to_numpy()
        for regime in sorted(set(reg)):
            in_cell = reg == regime
            x = r_all[in_cell]
            if len(x) < min_n:
                continue
            row = {"strategy_id": strategy, "regime": regime, "n": len(x),
                   "expected_shortfall": expected_shortfall(x, alpha), "max_drawdown": float(max_drawdown(x)),
                   "cell_total": float(x.sum())}
            if stress_cells is None or (strategy, regime) in stress_cells:
                # bounded work and memory on big domains: ≤ 2e8 resampled trades in all, ≤ 4e6 at once
                b = int(min(n_boot, max(50, 2e8 // len(r_all))))
                chunk = int(max(1, 4e6 // len(r_all)))
                cell_total, dd_parts = np.empty(b), {w: np.empty(b) for w in STRESS_WEIGHTS}
                for start in range(0, b, chunk):
                    stop = min(b, start + chunk)
                    idx = rng.integers(0, len(r_all), size=(stop - start, len(r_all)))
                    sample, mask = r_all[idx], in_cell[idx]
                    cell_total[start:stop] = np.where(mask, sample, 0.0).sum(axis=1)
                    for w in STRESS_WEIGHTS:
                        dd_parts[w][start:stop] = max_drawdown(np.where(mask, sample * w, sample))
                dd = dd_parts
                row |= {
                    "n_bootstrap": b,
                    "boot_cell_total_q": [float(v) for v in np.quantile(cell_total, [0.05, 0.5, 0.95])],
                    "boot_p_cell_total_negative": float((cell_total < 0).mean()),
                    "boot_drawdown": {str(w): [float(np.median(dd[w])), float(np.quantile(dd[w], 0.95))]
                                      for w in STRESS_WEIGHTS},
                }
            rows.append(row)
    return pd.DataFrame(rows)


def regime_dispersion(trades: pd.DataFrame, min_n: int) -> pd.DataFrame:
    """Per strategy: how its performance spreads across regimes.

    * ``between_regime_sd`` — the n-weighted sd of its regime means (R per trade);
    * ``pnl_entropy`` — normalized Shannon entropy of the shares |S_g| / Σ|S_g| of its total R
      by regime (S_g = total R in regime g): 1 = spread evenly, 0 = all in one regime;
    * ``regime_information`` — mutual information (nats, plug-in) between the regime and the
      sign of the return: how much knowing the regime tells about winning.
    """
    rows = []
    for strategy, st in trades.groupby(trades["strategy_id"].astype(str), sort=True):
        g = st.groupby(st["regime"].astype(str))["return_r"].agg(["mean", "sum", "size"])
        g = g[g["size"] >= min_n]
        if len(g) < 2:
            continue
        w = g["size"].to_numpy(float) / g["size"].sum()
        means = g["mean"].to_numpy(float)
        between = float(np.sqrt(np.sum(w * (means - np.sum(w * means)) ** 2)))
        a = np.abs(g["sum"].to_numpy(float))
        p = a / a.sum() if a.sum() > 0 else np.full(len(a), 1 / len(a))
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = float(-np.sum(np.where(p > 0, p * np.log(p), 0.0)) / math.log(len(p)))
        sub = st[st["regime"].astype(str).isin(g.index)]
        counts = pd.crosstab(sub["regime"].astype(str), sub["return_r"] > 0).to_numpy(float)
        mi = float(_mi_from_counts(counts)) if counts.shape[1] == 2 else 0.0
        rows.append({"strategy_id": strategy, "between_regime_sd": between, "pnl_entropy": entropy,
                     "regime_information": mi, "n_regimes": len(g), "n": int(g["size"].sum()),
                     "regime_means": {k: _clean(v) for k, v in zip(g.index, means)}})
    return pd.DataFrame(rows)


RISK_OVERRIDE_KEY = "risk_override"  # scope.risk_override = the reason a risk manager overrode the trade
ATTRIBUTE_MAX_VALUES = 20  # a scope key with at most this many values is an attribute (sector, profile, ...)
ATTRIBUTE_MAX_KEYS = 10


def attribute_performance(trades: pd.DataFrame, scope: pd.DataFrame, level: float, min_n: int
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean return per value of each attribute-like scope key (few distinct values, e.g. sector,
    profile) with t intervals, and per key a one-way ANOVA F test of "every value has the same mean"."""
    sc = scope[scope["key"].astype(str) != RISK_OVERRIDE_KEY]
    if sc.empty:
        return pd.DataFrame(), pd.DataFrame()
    n_values = sc.groupby("key")["value"].nunique()
    keys = sorted(n_values[(n_values >= 2) & (n_values <= ATTRIBUTE_MAX_VALUES)].index.astype(str))[:ATTRIBUTE_MAX_KEYS]
    merged = sc[sc["key"].isin(keys)].merge(trades[["trade_id", "return_r"]], on="trade_id")
    if merged.empty:
        return pd.DataFrame(), pd.DataFrame()
    perf = group_performance(merged, ["key", "value"], level, min_n)
    anova = []
    for key, part in merged.groupby("key"):
        groups = [x.to_numpy(float) for _, x in part.groupby("value")["return_r"] if len(x) >= min_n]
        if len(groups) >= 2:
            f, p = stats.f_oneway(*groups)
            anova.append({"key": key, "f": float(f), "p_value": float(p), "n": int(sum(map(len, groups))),
                          "k": len(groups)})
    return perf, pd.DataFrame(anova)


def risk_override_effects(trades: pd.DataFrame, scope: pd.DataFrame, level: float) -> pd.DataFrame:
    """Frequency and impact of risk overrides (``scope.risk_override`` = reason; absent = none):
    per reason and for all reasons together, the share of trades overridden and the mean return of
    overridden trades minus the others' (Welch interval, two-sided p)."""
    ro = scope[scope["key"].astype(str) == RISK_OVERRIDE_KEY][["trade_id", "value"]].drop_duplicates("trade_id")
    if ro.empty:
        return pd.DataFrame()
    reason = trades[["trade_id", "return_r"]].merge(ro, on="trade_id", how="left")
    r = reason["return_r"].to_numpy(float)
    out = []
    groups = [("all", reason["value"].notna().to_numpy())]
    groups += [(str(v), (reason["value"] == v).to_numpy()) for v in sorted(ro["value"].astype(str).unique())]
    none = ~reason["value"].notna().to_numpy()
    y = r[none]
    for name, mask in groups:
        x = r[mask]
        n1, n0 = float(len(x)), float(len(y))
        v1 = x.var(ddof=1) if n1 > 1 else np.nan
        v0 = y.var(ddof=1) if n0 > 1 else np.nan
        m1 = x.mean() if n1 else np.nan
        m0 = y.mean() if n0 else np.nan
        diff, se, _ = _welch_one_sided_less(np.array([m1]), np.array([v1]), np.array([n1]), np.array([m0]),
                                            np.array([v0]), np.array([n0]))
        df = _welch_df(np.sqrt(np.array([v1 / max(n1, 1)])), np.array([n1]), np.sqrt(np.array([v0 / max(n0, 1)])),
                       np.array([n0]))
        lo, hi = _t_interval(diff, se, df, level)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = _two_sided_p(diff / se, df)
        out.append({"reason": name, "n": int(n1), "frequency": n1 / max(len(r), 1), "impact": float(diff[0]),
                    "ci_low": float(lo[0]), "ci_high": float(hi[0]), "p_value": float(p[0]),
                    "overridden_mean": float(m1), "others_mean": float(m0)})
    return pd.DataFrame(out)


def _governance_rows(d: str, trades: pd.DataFrame, scope: pd.DataFrame | None, s: DiagnosticsSettings,
                     notes: list[str]) -> list[pd.DataFrame]:
    """The sections of the seed's diagnostics that need trades alone (and scope, when sent)."""
    blocks = []
    peers = strategy_vs_peers(trades, s.min_group_n)
    if len(peers):
        details = [{k: (_clean(v) if isinstance(v, float) else v) for k, v in row.items()
                    if k not in ("shortfall", "p_value")} | {"test": "one-sided Welch vs peers and vs own other "
                                                            "regimes; p = the larger (intersection-union)"}
                   for row in peers.to_dict(orient="records")]
        blocks.append(_rows(d, "strategy_vs_peers", (peers["strategy_id"] + "/" + peers["regime"]).to_numpy(),
                            "shortfall_return_r", peers["shortfall"], n=peers["n"], p_value=peers["p_value"],
                            details=details))
    else:
        notes.append("no strategy × regime cell has both peers and other regimes: strategy-vs-peers skipped")
    suspects = {(a, b) for a, b, p in zip(peers.get("strategy_id", []), peers.get("regime", []), peers.get("p_value", []))
                if p <= 0.05}
    tail = tail_and_stress(trades, s.tail_min_n, s.tail_alpha, s.n_bootstrap, _domain_rng(s, d + "/tail"),
                           suspects)
    if len(tail):
        subject = (tail["strategy_id"] + "/" + tail["regime"]).to_numpy()
        details = [{k: v for k, v in row.items() if k not in ("expected_shortfall", "max_drawdown")
                    and not (isinstance(v, float) and math.isnan(v))}
                   | {"alpha": s.tail_alpha} for row in tail.to_dict(orient="records")]
        blocks.append(_rows(d, "tail", subject, "expected_shortfall", tail["expected_shortfall"], n=tail["n"],
                            details=details))
        blocks.append(_rows(d, "tail", subject, "max_drawdown", tail["max_drawdown"], n=tail["n"], details=details))
    disp = regime_dispersion(trades, s.min_group_n)
    for metric in ("between_regime_sd", "pnl_entropy", "regime_information"):
        if len(disp):
            blocks.append(_rows(d, "regime_dispersion", disp["strategy_id"].to_numpy(), metric, disp[metric],
                                n=disp["n"], details=[{"n_regimes": r["n_regimes"], "regime_means": r["regime_means"]}
                                                      for r in disp.to_dict(orient="records")]))
    if scope is None or scope.empty:
        notes.append("no trade_scope: attribute (sector/profile) and risk-override diagnostics skipped")
        return blocks
    perf, anova = attribute_performance(trades, scope, s.confidence_level, s.min_group_n)
    if len(perf):
        blocks.append(_rows(d, "by_attribute", (perf["key"] + "=" + perf["value"].astype(str)).to_numpy(),
                            "mean_return_r", perf["mean"], perf["ci_low"], perf["ci_high"], perf["count"],
                            perf["p_value"], [{"key": k, "value": v, "std": _clean(sd)} for k, v, sd in
                                              zip(perf["key"], perf["value"], perf["std"])]))
    if len(anova):
        blocks.append(_rows(d, "by_attribute", anova["key"].to_numpy(), "anova_f", anova["f"], n=anova["n"],
                            p_value=anova["p_value"], details=[{"k": int(k)} for k in anova["k"]]))
    risk = risk_override_effects(trades, scope, s.confidence_level)
    if len(risk):
        det = [{"overridden_mean": _clean(r["overridden_mean"]), "others_mean": _clean(r["others_mean"])}
               for r in risk.to_dict(orient="records")]
        blocks.append(_rows(d, "risk_overrides", risk["reason"].to_numpy(), "frequency", risk["frequency"],
                            n=risk["n"], details=det))
        blocks.append(_rows(d, "risk_overrides", risk["reason"].to_numpy(), "impact_return_r", risk["impact"],
                            risk["ci_low"], risk["ci_high"], risk["n"], risk["p_value"], det))
    else:
        notes.append(f"no scope.{RISK_OVERRIDE_KEY} on any trade: risk-override frequency and impact skipped")
    return blocks


# ---------------------------------------------------------------------------
# the whole domain
# ---------------------------------------------------------------------------


def _domain_rng(settings: DiagnosticsSettings, domain: str) -> np.random.Generator:
    return np.random.default_rng([settings.seed, zlib.crc32(domain.encode())])


def _present(frame: pd.DataFrame | None) -> bool:
    return frame is not None and len(frame) > 0


def compute_diagnostics(inputs: DiagnosticsInputs, settings: DiagnosticsSettings | None = None) -> DiagnosticsResult:
    """All diagnostics of one domain (see module doc); inputs other than trades may be absent."""
    s = settings or DiagnosticsSettings()
    d = inputs.domain
    notes: list[str] = []
    blocks: list[pd.DataFrame] = []
    trades = inputs.trades
    required = {"trade_id", "regime", "strategy_id", "return_r"}
    missing = required - set(trades.columns)
    if missing:
        raise ValueError(f"diagnostics({d}): trades lack column(s) {sorted(missing)}")
    trades = trades.assign(return_r=pd.to_numeric(trades["return_r"], errors="coerce"))
    trades = trades[np.isfinite(trades["return_r"].to_numpy(dtype=float))].reset_index(drop=True)

    tables = {"trades": trades, "trade_patterns": inputs.trade_patterns, "trade_scope": inputs.trade_scope,
              "backtest_runs": inputs.backtest_runs, "telemetry": inputs.telemetry, "pm_overrides": inputs.pm_overrides,
              "global_prior": inputs.global_prior, "controller_state": inputs.controller_state}
    counts = {name: (len(t) if t is not None else 0) for name, t in tables.items()}
    blocks.append(_rows(d, "inputs", list(counts), "n_rows", list(counts.values()), n=list(counts.values()),
                        details=[{"present": bool(c)} for c in counts.values()]))
    if trades.empty:
        notes.append("no trades: performance, backtest and override diagnostics skipped")
    else:
        blocks.extend(_performance_rows(d, trades, inputs.trade_patterns, s))
        blocks.extend(_governance_rows(d, trades, inputs.trade_scope, s, notes))
        if not _present(inputs.trade_patterns):
            notes.append("no trade_patterns: performance by pattern family skipped")

    # realized vs backtest
    if not _present(inputs.backtest_runs):
        notes.append("no backtest_runs: realized-vs-backtest skipped")
    elif not trades.empty:
        cmp, bad_runs = realized_vs_backtest(trades, inputs.backtest_runs, s.confidence_level, s.min_group_n)
        if bad_runs:
            notes.append(f"{bad_runs} backtest run(s) lack mean_return_r/std_return_r/n_trades in metrics_json: ignored")
        if cmp.empty:
            notes.append("backtest_runs match no strategy×regime with trades")
        else:
            details = [{
                "strategy_id": row["strategy_id"], "regime": row["regime"],
                "realized_mean": _clean(row["realized_mean"]), "realized_sd": _clean(row["realized_sd"]),
                "realized_se": _clean(row["realized_se"]), "backtest_mean": _clean(row["bt_mean"]),
                "backtest_sd": _clean(row["bt_sd"]), "backtest_se": _clean(row["bt_se"]),
                "backtest_n": int(row["bt_n"]), "backtest_runs": int(row["bt_runs"]),
                "diff_se": _clean(row["diff_se"]), "df": _clean(row["df"]), "t": _clean(row["t"]),
            } for row in cmp.to_dict(orient="records")]
            blocks.append(_rows(d, "realized_vs_backtest", (cmp["strategy_id"] + "/" + cmp["regime"]).to_numpy(),
                                "diff_return_r", cmp["diff"], cmp["ci_low"], cmp["ci_high"], cmp["realized_n"],
                                cmp["p_value"], details))

    # overrides
    if not _present(inputs.pm_overrides):
        notes.append("no pm_overrides: override firing and worth skipped")
    elif not trades.empty and _present(inputs.trade_patterns):
        fired = override_firing(trades, inputs.trade_patterns, inputs.trade_scope, inputs.pm_overrides)
        worth = override_worth(trades, fired, inputs.pm_overrides, s.confidence_level)
        subject = worth["lesson_key"] + "@" + worth["regime"].astype(object).where(worth["regime"].notna(), "*").astype(str)
        details = [{"lesson_key": w["lesson_key"], "regime": w["regime"] if isinstance(w["regime"], str) else None,
                    "claimed_edge": _clean(w["claimed_edge"]), "fired_mean": _clean(w["fired_mean"]),
                    "fire_rate": _clean(w["fire_rate"])} for w in worth.to_dict(orient="records")]
        blocks.append(_rows(d, "overrides", subject.to_numpy(), "fire_rate", worth["fire_rate"], n=worth["n_fired"],
                            details=details))
        blocks.append(_rows(d, "overrides", subject.to_numpy(), "realized_uplift", worth["uplift"], worth["ci_low"],
                            worth["ci_high"], worth["n_fired"], worth["p_value"], details))
        share = fired["trade_id"].nunique() / max(len(trades), 1)
        blocks.append(_rows(d, "overrides", ["all"], "share_of_trades_with_override", [share], n=[len(trades)],
                            details=[{"n_overrides": len(inputs.pm_overrides),
                                      "identities": override_identity(inputs.pm_overrides)}]))
        if inputs.previous_override_keys is not None:
            now, before = set(override_identity(inputs.pm_overrides)), set(inputs.previous_override_keys)
            union = now | before
            churn = len(now ^ before) / len(union) if union else 0.0
            blocks.append(_rows(d, "override_churn", ["all"], "churn", [churn], n=[len(union)], details=[{
                "added": sorted(now - before)[:50], "removed": sorted(before - now)[:50],
                "n_added": len(now - before), "n_removed": len(before - now), "n_now": len(now), "n_before": len(before)}]))
        else:
            notes.append("no earlier override set recorded: override churn skipped")
    else:
        notes.append("no trade_patterns: override firing skipped")

    # knobs
    blocks.extend(_knob_rows(inputs, s, notes))
    blocks.extend(_controller_rows(inputs, notes))
    rows = pd.concat([b for b in blocks if len(b)], ignore_index=True)
    return DiagnosticsResult(rows[DIAGNOSTICS_COLUMNS], notes)


def _bin_means(bins: np.ndarray, y: np.ndarray) -> np.ndarray:
    counts = np.bincount(bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.bincount(bins, weights=y) / counts, np.nan)


def _current_unit(inputs: DiagnosticsInputs, names: list[str]) -> tuple[dict[str, float], np.ndarray]:
    current = {nm: float((inputs.current_knobs or {}).get(nm, KNOBS[nm].default)) for nm in KNOB_NAMES}
    return current, np.array([KNOBS[nm].to_unit(current[nm]) for nm in names])


def _knob_rows(inputs: DiagnosticsInputs, s: DiagnosticsSettings, notes: list[str]) -> list[pd.DataFrame]:
    d = inputs.domain
    tel = inputs.telemetry
    if not _present(tel):
        notes.append("no telemetry: knob importance, best region, global-prior gap and nearest configurations skipped")
        return []
    missing = [c for c in TELEMETRY_REQUIRED if c not in tel.columns]
    if missing:
        notes.append(f"telemetry lacks {missing}: knob diagnostics skipped")
        return []
    names, values = knob_matrix(tel)
    reward = telemetry_reward(tel)
    complete = np.isfinite(reward) & np.isfinite(values).all(axis=1)
    tel, values, reward = tel[complete].reset_index(drop=True), values[complete], reward[complete]
    if len(reward) < s.min_ticks:
        notes.append(f"only {len(reward)} complete telemetry ticks (< {s.min_ticks}): knob diagnostics skipped")
        return []
    if not names:
        notes.append("telemetry carries no knob values: knob diagnostics skipped")
        return []
    order = np.argsort(pd.to_datetime(tel["ts"], utc=True).to_numpy(), kind="stable")
    tel, values, reward = tel.iloc[order].reset_index(drop=True), values[order], reward[order]
    varying = [j for j in range(len(names)) if np.ptp(values[:, j]) > 1e-12]
    constant = [names[j] for j in range(len(names)) if j not in varying]
    if constant:
        notes.append(f"knob(s) {constant} never varied in telemetry: their effect cannot be measured")
    names, values = [names[j] for j in varying], values[:, varying]
    blocks = []
    if not names:
        return blocks
    current, current_u = _current_unit(inputs, names)
    u = _unit(names, values)

    mi = permutation_mutual_information(values, reward, n_permutations=s.n_permutations, rng=_domain_rng(s, d),
                                        max_bins=s.max_bins)
    bins = [discretize(values[:, j], mi["n_bins"]) for j in range(len(names))]
    details = [{
        "null_mean": _clean(mi["null_mean"][j]), "null_q95": _clean(mi["null_q95"][j]),
        "null_q99": _clean(mi["null_q99"][j]), "n_bins": mi["n_bins"], "n_permutations": s.n_permutations,
        "spearman_rho": _clean(stats.spearmanr(values[:, j], reward).statistic),
        "bin_reward_means": [_clean(m) for m in _bin_means(bins[j], reward)],
    } for j in range(len(names))]
    blocks.append(_rows(d, "knob_importance", names, "mutual_information", mi["mi"], n=len(reward),
                        p_value=mi["p_value"], details=details))

    region = best_region(u, reward, names, current_u, s.region_grid_step)
    if len(region):
        level = s.confidence_level
        half = stats.t.ppf(0.5 + level / 2, region["df"].to_numpy()) * region["se"].to_numpy()
        imp = dict(zip(names, mi["p_value"]))
        details = [{
            "knob": r["knob"], "current": r["current"], "proposed": r["proposed"], "current_source": inputs.current_knobs_source,
            "se": _clean(r["se"]), "t": _clean(r["t"]), "df": int(r["df"]), "n_fit": int(r["n_fit"]),
            "reward_sd": _clean(r["reward_sd"]), "importance_p": _clean(imp[r["knob"]]),
            "current_explored": r["current_explored"], "test": "one-sided, split sample (even ticks choose, odd ticks test)",
        } for r in region.to_dict(orient="records")]
        blocks.append(_rows(d, "knob_best_region", region["knob"].to_numpy(), "predicted_reward_gain", region["gain"],
                            region["gain"] - half, region["gain"] + half, region["n_test"], region["p_value"], details))

    surface = fit_surface(u, reward, names)
    if not _present(inputs.global_prior):
        notes.append("no global_prior: global-prior gap skipped")
    elif surface is not None:
        gp = inputs.global_prior
        newest = gp[gp["version"] == gp["version"].max()]
        prior = dict(zip(newest["knob"].astype(str), pd.to_numeric(newest["value"], errors="coerce")))
        prior_knobs = {nm: float(prior.get(nm, current[nm])) for nm in KNOB_NAMES}
        prior_u = np.array([KNOBS[nm].to_unit(prior_knobs[nm]) for nm in names])
        gain, se = surface.contrast(prior_u, current_u)
        t = gain / se if se > 0 else 0.0
        half = stats.t.ppf(0.5 + s.confidence_level / 2, surface.dof) * se
        all_u = lambda k: knobs_to_unit(k)  # noqa: E731 - distance over every knob, not only the varying ones
        distance = float(np.sqrt(np.mean((all_u(prior_knobs) - all_u(current)) ** 2)))
        outside = [nm for j, nm in enumerate(names) if not (u[:, j].min() - 1e-9 <= prior_u[j] <= u[:, j].max() + 1e-9)]
        blocks.append(_rows(d, "global_prior_gap", ["global_prior"], "predicted_reward_gain", [gain], [gain - half],
                            [gain + half], [len(reward)], [float(stats.t.sf(t, surface.dof))], [{
                                "prior_version": int(newest["version"].iloc[0]), "prior_knobs": prior_knobs,
                                "current_knobs": current, "current_source": inputs.current_knobs_source,
                                "unit_rms_distance": distance, "se": _clean(se), "df": surface.dof,
                                "reward_sd": _clean(np.std(reward, ddof=1)), "prior_outside_explored": outside,
                                "test": "one-sided, quadratic surface on all ticks"}]))

    if len(reward) >= s.recent_window + s.knn_k:
        summary, near = nearest_configs(tel, reward, names, values, s.recent_window, s.knn_k, s.knn_top,
                                        inputs.trades)
        blocks.append(_rows(d, "nearest_configs", ["current"], "recent_reward", [summary["recent_reward"]],
                            n=[s.recent_window], details=[summary]))
        blocks.append(_rows(d, "nearest_configs", [f"neighbour {i + 1}" for i in range(len(near))], "reward",
                            near["reward"], n=1, details=[{
                                "ts": r["ts"].isoformat(), "distance": _clean(r["distance"]),
                                "similarity": _clean(r["similarity"]), "env": {k: _clean(v) for k, v in r["env"].items()},
                                "knobs": {k: _clean(v) for k, v in r["knobs"].items()}} for r in near.to_dict(orient="records")]))
    else:
        notes.append(f"fewer than {s.recent_window + s.knn_k} ticks: nearest configurations skipped")
    return blocks


def _controller_rows(inputs: DiagnosticsInputs, notes: list[str]) -> list[pd.DataFrame]:
    state = inputs.controller_state
    if not _present(state):
        notes.append("no controller_state: controller diagnostics skipped")
        return []
    row = state.iloc[0]
    knobs = {k: float(v) for k, v in _parse_json(row.get("knobs_json")).items() if k in KNOBS}
    metrics = {"rollbacks": row.get("rollbacks"), "decisions": row.get("decisions"), "reward_ema": row.get("reward_ema")}
    details = [{"knobs": knobs}] * len(metrics)
    out = [_rows(inputs.domain, "controller", ["state"] * len(metrics), list(metrics), list(metrics.values()),
                 details=details)]
    if inputs.approved_knobs:
        full = lambda k: knobs_to_unit({**{n: KNOBS[n].default for n in KNOB_NAMES}, **k})  # noqa: E731
        drift = float(np.sqrt(np.mean((full(knobs) - full(dict(inputs.approved_knobs))) ** 2)))
        out.append(_rows(inputs.domain, "controller", ["state"], "drift_from_config", [drift], details=[{
            "controller_knobs": knobs, "approved_knobs": dict(inputs.approved_knobs)}]))
    return out
