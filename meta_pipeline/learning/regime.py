"""Regime weights: how much each standardized metric moves return_r, per market regime.

Model, per regime r: ``return_r = c_r + Σ_m w[r, m]·z_m + noise`` with
``z_m = (metric_m − center_m) / scale_m`` (center/scale: mean/sd over all the
domain's trades, so weights of different regimes are on one scale).

* All-regime weights β_g: least squares with one intercept per regime (a regime's
  mean return is an override's business, not a metric's).
* Per regime: ridge pooled toward β_g, closed form
  ``w_r = (ZᵀZ + αI)⁻¹ (Zᵀy + α β_g)`` on regime-centered Z, y. α = 0 is the regime's
  own least squares, α → ∞ is β_g.
* α by time-ordered CV: forward chaining (train on the first k blocks in time,
  validate on block k+1), one α shared by all regimes (pooled validation error: small
  regimes alone would pick a noisy α). β_g is re-fitted on each fold's training part.
* A regime with fewer than ``min_trades`` trades gets β_g outright
  (``pooled=True``, and ``note`` says so).

Missing metric values are imputed at the center (z = 0): the trade still informs the
other metrics' weights, and a missing metric contributes nothing to the prediction —
exactly what `predict` does with a missing value. A metric with no spread gets
weight 0 (and scale 1) with a note.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from meta_pipeline.learning.lessons import factorize_strings, positions_of

__all__ = ["REGIME_WEIGHT_COLUMNS", "fit_regime_weights", "metric_matrix", "metric_term"]

REGIME_WEIGHT_COLUMNS = ["regime", "metric", "weight", "center", "scale", "n_trades", "pooled", "alpha", "note"]
DEFAULT_ALPHAS = np.concatenate(([0.0], np.geomspace(1.0, 1e5, 21)))


def metric_matrix(trades: pd.DataFrame, metrics: pd.DataFrame, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Long metrics (trade_id, metric, value) -> (n_trades × n_metrics) array aligned with ``trades`` (NaN = missing)."""
    if names is None:
        names = [str(m) for m in factorize_strings(metrics["metric"])[1]] if len(metrics) else []
    out = np.full((len(trades), len(names)), np.nan)
    if not len(metrics) or not names or not len(trades):
        return out, names
    row = positions_of(trades["trade_id"], metrics["trade_id"])
    col = positions_of(np.asarray(names, dtype=object), metrics["metric"])
    ok = (row >= 0) & (col >= 0)
    out[row[ok], col[ok]] = pd.to_numeric(metrics["value"], errors="coerce").to_numpy(float)[ok]
    return out, names


def _global_weights(zc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    k = zc.shape[1]
    gram = zc.T @ zc + 1e-8 * max(len(yc), 1) * np.eye(k)  # tiny ridge: only guards singular Gram
    return np.linalg.solve(gram, zc.T @ yc)


def _regime_stats(z: np.ndarray, y: np.ndarray, reg: np.ndarray, n_reg: int):
    """Per regime: n, mean z, mean y, centered Gram ZᵀZ and Zᵀy."""
    k = z.shape[1]
    n = np.bincount(reg, minlength=n_reg).astype(float)
    safe = np.maximum(n, 1.0)
    zm = np.stack([np.bincount(reg, z[:, j], n_reg) for j in range(k)], axis=1) / safe[:, None]
    ym = np.bincount(reg, y, n_reg) / safe
    zc, yc = z - zm[reg], y - ym[reg]
    gram = np.zeros((n_reg, k, k))
    zty = np.zeros((n_reg, k))
    for r in range(n_reg):  # a handful of regimes
        m = reg == r
        gram[r] = zc[m].T @ zc[m]
        zty[r] = zc[m].T @ yc[m]
    return n, zm, ym, gram, zty, zc, yc


def fit_regime_weights(
    trades: pd.DataFrame,
    metrics: pd.DataFrame,
    *,
    min_trades: int | None = None,
    alphas: np.ndarray | None = None,
    n_folds: int = 4,
) -> pd.DataFrame:
    """Rows of ``learning_regime_weights``: regime, metric, weight, center, scale, n_trades, pooled, alpha, note.

    ``min_trades`` (default max(30, 10 × number of metrics)): below it a regime falls
    back to the all-regime weights. Empty trades or no metrics give an empty frame.
    """
    for col in ("trade_id", "closed_at", "regime", "return_r"):
        if col not in trades.columns:
            raise ValueError(f"trades frame is missing column {col!r}")
    x, names = metric_matrix(trades, metrics)
    if not len(trades) or not names:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in REGIME_WEIGHT_COLUMNS})
    k = len(names)
    min_trades = int(min_trades if min_trades is not None else max(30, 10 * k))
    alphas = DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, dtype=float)

    center = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0) if len(x) else np.zeros(k)
    scale = np.nanstd(x, axis=0, ddof=1) if len(x) > 1 else np.ones(k)
    flat = ~np.isfinite(scale) | (scale <= 0) | ~np.isfinite(center)
    center = np.where(np.isfinite(center), center, 0.0)
    scale = np.where(flat, 1.0, scale)
    z = np.where(np.isfinite(x), (x - center) / scale, 0.0)  # missing -> center (z = 0)
    z[:, flat] = 0.0

    # time order for the forward-chaining folds
    order = np.argsort(pd.DatetimeIndex(pd.to_datetime(trades["closed_at"], utc=True)).asi8, kind="stable")
    z, y = z[order], trades["return_r"].to_numpy(float)[order]
    reg_code, regimes = factorize_strings(trades["regime"])
    reg_code = reg_code[order]
    n_reg = len(regimes)

    alpha = _choose_alpha(z, y, reg_code, n_reg, alphas, n_folds, min_trades)
    n, _, _, gram, zty, zc, yc = _regime_stats(z, y, reg_code, n_reg)
    beta_g = _global_weights(zc, yc)
    eye = np.eye(k)
    rows = []
    for r, regime in enumerate(regimes):  # a handful of regimes
        if n[r] < min_trades:
            w, pooled = beta_g, True
            note = f"fallback to all-regime weights: {int(n[r])} trades < min_trades={min_trades}"
        else:
            w = np.linalg.solve(gram[r] + alpha * eye, zty[r] + alpha * beta_g)
            pooled = False
            note = "ridge pooled toward all-regime weights; alpha by forward-chaining CV"
        for j, metric in enumerate(names):
            rows.append(
                {
                    "regime": str(regime),
                    "metric": metric,
                    "weight": 0.0 if flat[j] else float(w[j]),
                    "center": float(center[j]),
                    "scale": float(scale[j]),
                    "n_trades": int(n[r]),
                    "pooled": pooled,
                    "alpha": float(alpha),
                    "note": note + ("; metric has no spread, weight 0" if flat[j] else ""),
                }
            )
    return pd.DataFrame(rows, columns=REGIME_WEIGHT_COLUMNS)


def _choose_alpha(
    z: np.ndarray, y: np.ndarray, reg: np.ndarray, n_reg: int, alphas: np.ndarray, n_folds: int, min_trades: int
) -> float:
    """Shared α minimizing the pooled forward-chaining validation error (rows in time order)."""
    n_all, k = z.shape
    if n_folds < 1 or n_all < 2 * (n_folds + 1):
        return float(alphas[len(alphas) // 2])
    bounds = np.linspace(0, n_all, n_folds + 2).astype(int)
    sse = np.zeros(len(alphas))
    eye = np.eye(k)
    for f in range(1, n_folds + 1):  # forward chaining: train [0, b_f), validate [b_f, b_{f+1})
        tr, va = slice(0, bounds[f]), slice(bounds[f], bounds[f + 1])
        n, zm, ym, gram, zty, zc, yc = _regime_stats(z[tr], y[tr], reg[tr], n_reg)
        beta_g = _global_weights(zc, yc)
        zv, yv, rv = z[va], y[va], reg[va]
        for r in range(n_reg):
            m = rv == r
            if not m.any() or n[r] < 2:
                continue
            resid_base = yv[m] - ym[r]
            zvc = zv[m] - zm[r]
            if n[r] < min_trades:  # such a regime uses beta_g whatever alpha is
                continue
            for a_i, a in enumerate(alphas):
                w = np.linalg.solve(gram[r] + a * eye + 1e-9 * eye, zty[r] + a * beta_g)
                sse[a_i] += float(np.sum((resid_base - zvc @ w) ** 2))
    return float(alphas[int(np.argmin(sse))])


def metric_term(trades: pd.DataFrame, metrics: pd.DataFrame, regime_weights: pd.DataFrame) -> np.ndarray:
    """Per trade (aligned with ``trades``): Σ_m weight[regime, m]·(metric_m − center)/scale.

    A missing metric, or a regime/metric without a weight row, contributes 0.
    """
    out = np.zeros(len(trades))
    if not len(trades) or not len(metrics) or regime_weights is None or not len(regime_weights):
        return out
    pos = positions_of(trades["trade_id"], metrics["trade_id"])
    ok = pos >= 0
    reg_code, regimes = factorize_strings(trades["regime"], sort=False)
    met_code, met_names = factorize_strings(metrics["metric"], sort=False)
    w_reg = positions_of(regimes, regime_weights["regime"])
    w_met = positions_of(met_names, regime_weights["metric"])
    known = (w_reg >= 0) & (w_met >= 0)
    # dense (regime × metric) lookup tables of weight, center, scale (0 weight = no row)
    table = np.zeros((3, max(len(regimes), 1), max(len(met_names), 1)))
    table[2] = 1.0
    for i, col in enumerate(("weight", "center", "scale")):
        table[i, w_reg[known], w_met[known]] = pd.to_numeric(regime_weights[col], errors="coerce").to_numpy(float)[known]
    r_idx = reg_code[pos[ok]]
    m_idx = met_code[ok]
    value = pd.to_numeric(metrics["value"], errors="coerce").to_numpy(float)[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        contrib = table[0, r_idx, m_idx] * (value - table[1, r_idx, m_idx]) / table[2, r_idx, m_idx]
    contrib = np.where(np.isfinite(contrib), contrib, 0.0)
    return out + np.bincount(pos[ok], contrib, len(trades))
