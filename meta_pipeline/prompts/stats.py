"""Paired comparison of two prompts on the same test examples.

For each test example i, a_i = 1 if the static prompt answered right, b_i = 1 if the evolved one
did. Margin = mean(b) − mean(a).

Exact McNemar test (two-sided): only discordant examples carry information. With
n10 = #{a=1, b=0} and n01 = #{a=0, b=1}, n = n10 + n01, under H0 (both prompts equally good)
n01 ~ Binomial(n, 1/2), and

    p = min(1, 2 · P(X ≤ min(n10, n01))),  X ~ Binomial(n, 1/2)     (p = 1 when n = 0).

Paired bootstrap CI of the margin: resample the test examples with replacement B times
(the pairs stay together), the 2.5th and 97.5th percentiles of the resampled margins; a fixed
seed makes it reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedComparison:
    n: int
    baseline_accuracy: float
    candidate_accuracy: float
    margin: float
    ci_low: float
    ci_high: float
    n10: int  # baseline right, candidate wrong
    n01: int  # baseline wrong, candidate right
    p_value: float
    method: str = "exact McNemar (two-sided) + paired bootstrap 95% CI"


def mcnemar_exact(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (module doc)."""
    n = int(n10) + int(n01)
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(int(n10), int(n01)), n, 0.5)))


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of mean(b) − mean(a) over paired resamples of the examples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    diffs = (b[idx] - a[idx]).mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1.0 - tail))


def compare_paired(baseline_correct: np.ndarray, candidate_correct: np.ndarray, *, n_boot: int = 2000,
                   seed: int = 0) -> PairedComparison:
    a = np.asarray(baseline_correct, dtype=bool)
    b = np.asarray(candidate_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("paired comparison needs the same examples for both prompts")
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    low, high = paired_bootstrap_ci(a, b, n_boot=n_boot, seed=seed)
    acc_a = float(a.mean()) if a.size else float("nan")
    acc_b = float(b.mean()) if b.size else float("nan")
    return PairedComparison(int(a.size), acc_a, acc_b, acc_b - acc_a, low, high, n10, n01, mcnemar_exact(n10, n01))
