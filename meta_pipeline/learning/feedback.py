"""Closed-loop feedback: every override version scored on the trades that closed after it.

Prequential rule (data time)
----------------------------
A version ``v`` of a domain's overrides learned from the trades closed at or before its
``as_of``. A trade closed at ``t`` is scored with the version whose ``as_of`` is the
greatest one strictly before ``t`` (ties: the highest version number, the one
materialized last). So a trade is never scored by a version that had already seen it,
and a replay of history (versions with past ``as_of``) scores exactly what live
operation would have scored. Trades older than every version are not scored.

Cycles
------
The scored trades of one version, in trade order (closed_at, trade_id), are cut into
cycles of ``cycle_size`` consecutive trades; a cycle never spans two versions, and the
last cycle of a version may be partial (``complete`` = false). Per cycle, with
prediction p (the engine rule's edge) and outcome y (realized ``return_r``):

* ``rank_ic`` = Spearman ρ(p, y); ``ic_t`` = ρ·√((n − 2)/(1 − ρ²)) (its t statistic).
  Good: ρ > 0 and |t| ≥ 2 (the alphalens convention for a signal that ranks outcomes).
* Mincer–Zarnowitz: OLS y = a + b·p; ``mz_intercept`` a, ``mz_slope`` b with a 95 % CI
  (b ± t₀.₉₇₅,ₙ₋₂·se(b)). A well-scaled forecast has b ≈ 1 and a ≈ 0; b < 1 means
  overconfident predictions (too large in magnitude), b > 1 underconfident.
* ``hit_rate`` = share of trades with p ≠ 0 whose sign(p) = sign(y).
* ``mse`` = mean (y − p)², ``mse_zero`` = mean y² (the MSE of predicting 0), and
  ``alignment`` = 1 − mse / mse_zero: the share of the outcome's second moment the
  predictions explain (> 0: better than no override; the realized predictive gain).
* ``residual_mean``, ``residual_sd`` of r = y − p.
* ``coherence``: how stable the overrides stayed from the previous version to this one —
  Spearman ρ of the edges of the override rows (lesson_key @ regime) present in both;
  ``turnover`` = 1 − |both| / |either| (0: the same rows, 1: all new).

All of it is vectorized over trades and versions; ``score_trades`` calls the engine
rule once per version (a few calls per domain).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats

CYCLE_SIZE = 1_000  # scored trades per cycle (default; configurable)

FEEDBACK_CYCLE_COLUMNS = [
    "cycle", "overrides_version", "first_closed_at", "last_closed_at", "first_trade_id", "last_trade_id", "n",
    "complete", "rank_ic", "ic_t", "mz_intercept", "mz_slope", "mz_slope_ci_low", "mz_slope_ci_high", "hit_rate",
    "mse", "mse_zero", "alignment", "residual_mean", "residual_sd", "coherence", "turnover", "drift_alarm",
]


def assign_versions(closed_at: pd.Series, versions: pd.DataFrame) -> np.ndarray:
    """The overrides version that scores each trade (-1: none — older than every version).

    ``versions``: one row per version with ``version`` and ``as_of``. The rule (module
    doc): the greatest ``as_of`` strictly before the trade's ``closed_at``; ties in
    ``as_of`` go to the highest version number.
    """
    if versions is None or versions.empty or len(closed_at) == 0:
        return np.full(len(closed_at), -1, dtype=np.int64)
    order = versions.sort_values(["as_of", "version"], kind="stable")
    # among equal as_of keep the highest version: it sorts last, so keep the last of each as_of
    order = order.drop_duplicates("as_of", keep="last")
    as_of = pd.to_datetime(order["as_of"], utc=True).to_numpy(dtype="datetime64[ns]")
    ts = pd.to_datetime(closed_at, utc=True).to_numpy(dtype="datetime64[ns]")
    pos = np.searchsorted(as_of, ts, side="left") - 1  # last as_of < ts
    out = np.full(len(ts), -1, dtype=np.int64)
    ok = pos >= 0
    out[ok] = order["version"].to_numpy(dtype=np.int64)[pos[ok]]
    return out


def score_trades(trades: pd.DataFrame, versions: pd.DataFrame,
                 predict_version: Callable[[int, pd.DataFrame], pd.Series]) -> pd.DataFrame:
    """Each scorable trade with its version, prediction and residual, in trade order.

    ``trades``: trade_id, closed_at, return_r (and whatever the predictor reads). ``predict_version(v, trades_of_v)``
    returns the engine rule's edge per trade_id for version v (the caller rebuilds the
    stored model of that version). Output columns: trade_id, closed_at, overrides_version,
    predicted, realized, residual.
    """
    cols = ["trade_id", "closed_at", "overrides_version", "predicted", "realized", "residual"]
    if trades.empty:
        return pd.DataFrame(columns=cols)
    frame = trades.copy()  # the predictor may need more of the trade (its regime, for the tier-2 term)
    frame["overrides_version"] = assign_versions(frame["closed_at"], versions)
    frame = frame[frame["overrides_version"] >= 0]
    parts = []
    for version, group in frame.groupby("overrides_version", sort=True):
        edge = predict_version(int(version), group)
        pred = edge.reindex(group["trade_id"].to_numpy()).to_numpy(dtype=float)
        parts.append(group.assign(predicted=np.nan_to_num(pred, nan=0.0)))
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True).rename(columns={"return_r": "realized"})
    out["residual"] = out["realized"] - out["predicted"]
    return out.sort_values(["closed_at", "trade_id"], kind="stable").reset_index(drop=True)[cols]


def _mz(p: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Mincer–Zarnowitz OLS y = a + b·p: (a, b, b_ci_low, b_ci_high); NaN when p is constant or n < 3."""
    n = len(p)
    if n < 3:
        return (np.nan,) * 4
    pc = p - p.mean()
    sxx = float(pc @ pc)
    if sxx <= 1e-18:
        return float(y.mean()), np.nan, np.nan, np.nan
    b = float(pc @ (y - y.mean())) / sxx
    a = float(y.mean() - b * p.mean())
    resid = y - a - b * p
    s2 = float(resid @ resid) / (n - 2)
    se = np.sqrt(s2 / sxx)
    q = stats.t.ppf(0.975, n - 2)
    return a, b, b - q * se, b + q * se


def cycle_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The alignment figures of one cycle (module doc) from predictions p and outcomes y."""
    p = np.asarray(p, dtype=float)
    y = np.asarray(y, dtype=float)
    n = len(p)
    out: dict[str, float] = {"n": n}
    if n >= 3 and np.ptp(p) > 0 and np.ptp(y) > 0:
        rho = float(stats.spearmanr(p, y).statistic)
        out["rank_ic"] = rho
        out["ic_t"] = rho * np.sqrt((n - 2) / max(1.0 - rho * rho, 1e-12))
    else:
        out["rank_ic"] = np.nan
        out["ic_t"] = np.nan
    a, b, lo, hi = _mz(p, y)
    out.update(mz_intercept=a, mz_slope=b, mz_slope_ci_low=lo, mz_slope_ci_high=hi)
    called = p != 0
    out["hit_rate"] = float(np.mean(np.sign(p[called]) == np.sign(y[called]))) if called.any() else np.nan
    resid = y - p
    out["mse"] = float(np.mean(resid**2)) if n else np.nan
    out["mse_zero"] = float(np.mean(y**2)) if n else np.nan
    out["alignment"] = 1.0 - out["mse"] / out["mse_zero"] if n and out["mse_zero"] > 0 else np.nan
    out["residual_mean"] = float(resid.mean()) if n else np.nan
    out["residual_sd"] = float(resid.std(ddof=1)) if n > 1 else np.nan
    return out


def override_coherence(previous: pd.DataFrame | None, current: pd.DataFrame) -> tuple[float, float]:
    """(Spearman ρ of the edges of rows present in both versions, turnover 1 − |both|/|either|).

    Rows are identified by lesson_key @ regime (regime null = any). NaN ρ when fewer
    than 3 rows are shared; (NaN, NaN) without a previous version.
    """
    if previous is None:
        return np.nan, np.nan

    def keyed(frame: pd.DataFrame) -> pd.Series:
        if frame is None or frame.empty:
            return pd.Series(dtype=float)
        regime = frame["regime"].astype(object).where(frame["regime"].notna(), "*").astype(str)
        return pd.Series(frame["edge"].to_numpy(dtype=float), index=frame["lesson_key"].astype(str) + "@" + regime)

    a, b = keyed(previous), keyed(current)
    a = a[~a.index.duplicated()]
    b = b[~b.index.duplicated()]
    both = a.index.intersection(b.index)
    either = a.index.union(b.index)
    turnover = 1.0 - len(both) / len(either) if len(either) else np.nan
    if len(both) < 3 or np.ptp(a[both].to_numpy()) == 0 or np.ptp(b[both].to_numpy()) == 0:
        return np.nan, turnover
    return float(stats.spearmanr(a[both].to_numpy(), b[both].to_numpy()).statistic), turnover


def feedback_cycles(scored: pd.DataFrame, cycle_size: int = CYCLE_SIZE,
                    coherence: dict[int, tuple[float, float]] | None = None,
                    alarm_trades: set[str] | None = None) -> pd.DataFrame:
    """Cycles of ``cycle_size`` consecutive scored trades per version (module doc), numbered in trade order.

    ``coherence``: version -> (ρ, turnover) from ``override_coherence``; ``alarm_trades``:
    trade ids at which the drift monitor alarmed (a cycle holding one has drift_alarm).
    """
    if cycle_size < 1:
        raise ValueError(f"cycle_size must be at least 1, got {cycle_size}")
    if scored.empty:
        return pd.DataFrame(columns=FEEDBACK_CYCLE_COLUMNS)
    coherence = coherence or {}
    alarm_trades = alarm_trades or set()
    frame = scored.reset_index(drop=True)
    # position within its version (trade order), then the cycle of that version
    within = frame.groupby("overrides_version", sort=False).cumcount().to_numpy()
    frame["_cycle_in_version"] = within // cycle_size
    rows = []
    for (version, _), group in frame.groupby(["overrides_version", "_cycle_in_version"], sort=False):
        metrics = cycle_metrics(group["predicted"].to_numpy(), group["realized"].to_numpy())
        rho, turnover = coherence.get(int(version), (np.nan, np.nan))
        rows.append({
            "overrides_version": int(version),
            "first_closed_at": group["closed_at"].iloc[0],
            "last_closed_at": group["closed_at"].iloc[-1],
            "first_trade_id": str(group["trade_id"].iloc[0]),
            "last_trade_id": str(group["trade_id"].iloc[-1]),
            "complete": len(group) == cycle_size,
            **metrics,
            "coherence": rho,
            "turnover": turnover,
            "drift_alarm": bool(alarm_trades.intersection(group["trade_id"].astype(str))),
        })
    out = pd.DataFrame(rows).sort_values(["first_closed_at", "first_trade_id"], kind="stable").reset_index(drop=True)
    out.insert(0, "cycle", np.arange(1, len(out) + 1))
    out["n"] = out["n"].astype(int)
    return out[FEEDBACK_CYCLE_COLUMNS]


# ---------------------------------------------------------------------------
# Re-learning after a break: the fit window of the lessons a drift break affected
# ---------------------------------------------------------------------------

BREAK_Z = 3.0  # |z| of a pattern's mean-return change across a break that marks it affected
BREAK_MIN_TRADES = 10  # trades a pattern needs on each side of a break to be judged

BREAK_WINDOW_COLUMNS = ["pattern", "window_start", "z", "n_pre", "n_post", "drift_event_id"]


def break_times(events: pd.DataFrame) -> pd.Series:
    """The time each drift event dates its break at: the estimated change point, else the alarm's trade."""
    change = pd.to_datetime(events["change_closed_at"], utc=True) if "change_closed_at" in events else None
    alarm = pd.to_datetime(events["closed_at"], utc=True)
    return alarm if change is None else change.fillna(alarm)


def break_windows(trades: pd.DataFrame, patterns: pd.DataFrame, events: pd.DataFrame, *,
                  z_threshold: float = BREAK_Z, min_trades: int = BREAK_MIN_TRADES) -> pd.DataFrame:
    """Per pattern whose edge broke at a drift event: the start of its fit window.

    For each break b (in time order) at time t_b, with the previous break t_{b−1} (or the
    start of history): a pattern's trades in (t_{b−1}, t_b] and after t_b give its mean
    return before and after (after: everything since, so two alarms close together — the
    whole stream's and a factor's at one break — do not starve each other of trades), and
    z = (mean_after − mean_before) / √(s²_before/n_before + s²_after/n_after) (Welch).
    A pattern with |z| ≥ ``z_threshold`` (and ``min_trades`` on each side) is affected:
    its lessons learn only from trades closed after t_b (its newest such break wins).
    Other patterns keep their whole history, so one broken signal does not throw away
    the evidence of every other. Returns BREAK_WINDOW_COLUMNS, one row per affected pattern.
    """
    if events is None or events.empty or trades.empty or patterns.empty:
        return pd.DataFrame(columns=BREAK_WINDOW_COLUMNS)
    ev = events.assign(_t=break_times(events)).sort_values("_t", kind="stable")
    rows = patterns[["trade_id", "pattern"]].merge(trades[["trade_id", "closed_at", "return_r"]], on="trade_id")
    t = pd.to_datetime(rows["closed_at"], utc=True)
    found: dict[str, dict] = {}
    prev = None
    for event_id, tb in zip(ev["id"] if "id" in ev else range(len(ev)), ev["_t"]):
        before = (t <= tb) if prev is None else ((t > prev) & (t <= tb))
        after = t > tb
        stats_b = rows.loc[before].groupby("pattern")["return_r"].agg(["count", "mean", "var"])
        stats_a = rows.loc[after].groupby("pattern")["return_r"].agg(["count", "mean", "var"])
        both = stats_b.join(stats_a, lsuffix="_b", rsuffix="_a", how="inner")
        both = both[(both["count_b"] >= min_trades) & (both["count_a"] >= min_trades)]
        se = np.sqrt(both["var_b"] / both["count_b"] + both["var_a"] / both["count_a"])
        z = (both["mean_a"] - both["mean_b"]) / se.where(se > 0)
        for pattern, zv in z[z.abs() >= z_threshold].items():
            found[str(pattern)] = {"pattern": str(pattern), "window_start": tb, "z": float(zv),
                                   "n_pre": int(both.at[pattern, "count_b"]), "n_post": int(both.at[pattern, "count_a"]),
                                   "drift_event_id": int(event_id)}
        prev = tb
    return pd.DataFrame(list(found.values()), columns=BREAK_WINDOW_COLUMNS)


def apply_break_windows(patterns: pd.DataFrame, trades: pd.DataFrame, windows: pd.DataFrame) -> pd.DataFrame:
    """The pattern rows the learning jobs may use: an affected pattern's rows before its window start are dropped."""
    if windows is None or windows.empty or patterns.empty:
        return patterns
    closed = trades.set_index("trade_id")["closed_at"]
    t = pd.to_datetime(patterns["trade_id"].map(closed), utc=True)
    start = patterns["pattern"].map(windows.set_index("pattern")["window_start"])
    start = pd.to_datetime(start, utc=True)
    keep = start.isna().to_numpy() | (t > start).fillna(False).to_numpy()
    return patterns[keep].reset_index(drop=True)
