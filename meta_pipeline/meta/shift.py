"""Domain-shift distances between domains' telemetry distributions (no Dagster here).

Two domains whose engines respond alike to the knobs produce alike telemetry, so the
distance between their telemetry distributions is a cheap, model-free proxy for "how
much should one domain's prior be trusted in the other".

* ``mmd_rbf`` — the unbiased squared Maximum Mean Discrepancy (Gretton et al. 2012)
  with a Gaussian (RBF) kernel; bandwidth by the median heuristic on the pooled sample.
  Sensitive to any difference in distribution, not only in mean and covariance.
* ``frechet_distance`` — the Fréchet (2-Wasserstein between Gaussians) distance
  ``‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)`` used by FID; fast, only first two moments.

Features are standardized with the POOLED mean and std over all domains compared, so
every feature counts on the same scale and the distances are comparable across pairs.
Large domains are subsampled (seeded) because MMD costs O(n²).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import linalg

from meta_pipeline.contracts import TELEMETRY_OUTCOMES

# The outcome columns of a telemetry tick (the knobs are inputs, not outcomes).
SHIFT_FEATURES: tuple[str, ...] = TELEMETRY_OUTCOMES  # a domain's environment: its telemetry outcomes
METHODS = ("mmd", "frechet")


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median heuristic: the median pairwise distance of the pooled sample (>0)."""
    z = np.vstack([x, y])
    d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), k=1)])
    positive = d[d > 0]
    return float(np.median(positive)) if positive.size else 1.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD² between samples x (n×p) and y (m×p) with k(a,b)=exp(−‖a−b‖²/(2h²)).

    Can be slightly negative for identical distributions (it is unbiased); callers that
    want a distance use ``max(0, ·)``. Needs at least 2 rows in each sample.
    """
    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.atleast_2d(np.asarray(y, dtype=float))
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd_rbf needs at least 2 samples on each side")
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    gamma = 1.0 / (2.0 * h * h)
    kxx = np.exp(-gamma * _sq_dists(x, x))
    kyy = np.exp(-gamma * _sq_dists(y, y))
    kxy = np.exp(-gamma * _sq_dists(x, y))
    n, m = len(x), len(y)
    # drop the diagonals: the unbiased U-statistic
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to x and y (rows = samples)."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    y = np.atleast_2d(np.asarray(y, dtype=float))
    if len(x) < 2 or len(y) < 2:
        raise ValueError("frechet_distance needs at least 2 samples on each side")
    mu1, mu2 = x.mean(0), y.mean(0)
    s1 = np.atleast_2d(np.cov(x, rowvar=False))
    s2 = np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularize (as in FID code)
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def _feature_matrix(telemetry: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    missing = [f for f in features if f not in telemetry.columns]
    if missing:
        raise ValueError(f"telemetry lacks shift feature column(s): {missing}")
    x = telemetry[list(features)].to_numpy(dtype=float)
    return x[np.isfinite(x).all(axis=1)]


def _standardized_samples(
    telemetry_by_domain: Mapping[str, pd.DataFrame],
    features: Sequence[str],
    max_n: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    raw = {d: _feature_matrix(t, features) for d, t in telemetry_by_domain.items()}
    raw = {d: x for d, x in raw.items() if len(x) >= 2}
    if not raw:
        return {}
    pooled = np.vstack(list(raw.values()))
    mean, std = pooled.mean(0), pooled.std(0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature carries no shift signal
    out = {}
    for d, x in raw.items():
        if len(x) > max_n:
            x = x[np.sort(rng.choice(len(x), size=max_n, replace=False))]
        out[d] = (x - mean) / std
    return out


def shift_distance(x: np.ndarray, y: np.ndarray, method: str = "mmd") -> float:
    """A non-negative distance between two standardized samples."""
    if method == "mmd":
        return float(np.sqrt(max(mmd_rbf(x, y), 0.0)))
    if method == "frechet":
        return float(np.sqrt(frechet_distance(x, y)))
    raise ValueError(f"unknown shift method {method!r}; use one of {METHODS}")


def pairwise_shift_distances(
    telemetry_by_domain: Mapping[str, pd.DataFrame],
    *,
    method: str = "mmd",
    features: Sequence[str] = SHIFT_FEATURES,
    max_n: int = 300,
    seed: int = 0,
    bandwidth_sample: int = 600,
) -> pd.DataFrame:
    """Square DataFrame (domain × domain) of shift distances; 0 on the diagonal.

    Both methods are reported on the distance scale (square root of MMD² / of the
    Fréchet value), so they grow roughly linearly with a mean shift. For MMD one RBF
    bandwidth serves every pair (median heuristic on a pooled, seeded subsample of at
    most ``bandwidth_sample`` rows), so all pairs are measured with the same ruler, and
    each domain's within-sample kernel term is computed once. Domains with fewer than
    2 usable ticks are left out.
    """
    if method not in METHODS:
        raise ValueError(f"unknown shift method {method!r}; use one of {METHODS}")
    rng = np.random.default_rng(seed)
    samples = _standardized_samples(telemetry_by_domain, features, max_n, rng)
    names = sorted(samples)
    dist = np.zeros((len(names), len(names)))
    if len(names) < 2:
        return pd.DataFrame(dist, index=names, columns=names)
    if method == "frechet":
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                dist[i, j] = dist[j, i] = shift_distance(samples[names[i]], samples[names[j]], "frechet")
        return pd.DataFrame(dist, index=names, columns=names)
    pooled = np.vstack([samples[n] for n in names])
    if len(pooled) > bandwidth_sample:
        pooled = pooled[rng.choice(len(pooled), size=bandwidth_sample, replace=False)]
    d_pool = np.sqrt(_sq_dists(pooled, pooled)[np.triu_indices(len(pooled), k=1)])
    h = float(np.median(d_pool[d_pool > 0])) if (d_pool > 0).any() else 1.0
    gamma = 1.0 / (2.0 * h * h)
    self_term = {}
    for n in names:
        k = np.exp(-gamma * _sq_dists(samples[n], samples[n]))
        m = len(k)
        self_term[n] = (k.sum() - np.trace(k)) / (m * (m - 1))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            cross = np.exp(-gamma * _sq_dists(samples[names[i]], samples[names[j]])).mean()
            mmd2 = self_term[names[i]] + self_term[names[j]] - 2.0 * cross
            dist[i, j] = dist[j, i] = float(np.sqrt(max(mmd2, 0.0)))
    return pd.DataFrame(dist, index=names, columns=names)


def distance_to_rest(pairwise: pd.DataFrame) -> pd.Series:
    """Each domain's median distance to the other domains (0 when it is alone)."""
    d = pairwise.to_numpy(dtype=float).copy()
    n = len(d)
    if n <= 1:
        return pd.Series(np.zeros(n), index=pairwise.index, name="distance_to_rest")
    np.fill_diagonal(d, np.nan)
    return pd.Series(np.nanmedian(d, axis=1), index=pairwise.index, name="distance_to_rest")


def distances_to_new(
    new_telemetry: pd.DataFrame,
    telemetry_by_domain: Mapping[str, pd.DataFrame],
    *,
    method: str = "mmd",
    features: Sequence[str] = SHIFT_FEATURES,
    max_n: int = 300,
    seed: int = 0,
) -> pd.Series:
    """Distance from a (new) domain's telemetry to each known domain's telemetry."""
    key = "\x00new"  # cannot clash with a valid domain name
    pairwise = pairwise_shift_distances(
        {**telemetry_by_domain, key: new_telemetry}, method=method, features=features, max_n=max_n, seed=seed
    )
    if key not in pairwise.index:
        return pd.Series(dtype=float, name="distance_to_new")
    return pairwise.loc[key].drop(key).rename("distance_to_new")
