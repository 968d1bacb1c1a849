"""Generic feedback: the closed loop for any model whose outputs someone rates.

A *task* is any model (a prompt, a classifier, a ranker...) whose outputs are rated: one
row of ``feedback`` is (ts, input, output, score in [0, 1], optional model_version). This
module turns a task's ratings into cycles and the figures that say whether the model is
still aligned with its raters, whether it drifted, and whether it answers consistently.
The same style as ``meta_pipeline.learning.feedback`` (the overrides' closed loop); plain
pandas/numpy/scipy, no Dagster.

Cycles
------
The ratings, in stream order (ts, then feedback_id), are grouped by ``model_version``
(a missing version is a version of its own) and each version's ratings are cut into
cycles of ``cycle_size`` consecutive rows; the last cycle of a version may be partial
(``complete`` = false). A cycle never spans two model versions — exactly as an override
cycle never spans two overrides versions — so the figures of a cycle describe one model.
Cycles are numbered 1, 2, ... over the task by their first ts (ties: the version).

Figures of a cycle (scores s₁..sₙ, outputs, inputs)
---------------------------------------------------
* ``mean_score`` = s̄, ``score_sd`` = the sample standard deviation (ddof 1), and the 95 %
  t-interval ``score_ci_low/high`` = s̄ ∓ t₀.₉₇₅,ₙ₋₁·sd/√n, clipped to [0, 1] (scores live
  there); null when n < 2. ``below_threshold`` = s̄ < ``alignment_threshold`` (default
  0.7): the point estimate decides, the interval says how sure it is. Good: s̄ at or above
  the threshold, with an interval that stays above it.
* Drift is measured against a **reference cycle**: the first complete cycle of the same
  model version (``reference_cycle``). Why per version, not the task's very first cycle:
  a re-trained model is a new version and starts a new baseline, so the change a
  re-training was asked to make is not itself reported as drift (which would request
  re-training forever). The reference cycle itself has no drift figures.

  - ``score_shift`` = s̄ − s̄_ref; ``score_drift`` = the standardized mean difference
    (s̄ − s̄_ref)/s_pooled, s_pooled² = ((n−1)·sd² + (n_ref−1)·sd_ref²)/(n + n_ref − 2)
    (null when both cycles are constant); ``score_drift_p`` = the two-sided p-value of
    Welch's t-test of the two cycles' scores (scipy ``ttest_ind(equal_var=False)``; 1 when
    both are constant and equal, 0 when constant and different).
  - ``output_drift`` = the Jensen–Shannon divergence (base 2, in [0, 1] bits) between the
    cycle's output distribution and the reference cycle's; ``output_tv`` = their total
    variation distance ½·Σ|p − q| (in [0, 1]). The distribution (``output_basis``) is
    over *labels* — the normalized outputs themselves — when the task's outputs are
    categorical (at most ``LABEL_MAX_DISTINCT`` = 50 distinct normalized outputs over
    the whole task), else over *tokens*: the whitespace-separated words of the
    normalized outputs, kept as the reference cycle's ``TOKEN_VOCAB`` = 100 most frequent
    words plus one bucket for every other word. The cap keeps the estimate's small-
    sample bias (≈ (K − 1)/(4·N·ln 2) for K categories and N observations) far below the
    threshold, so identical models do not look drifted just because free text is sparse.
  - ``drifted`` = (``score_drift_p`` < ``score_p_threshold`` (default 0.01) and the mean
    score *fell*) or ``output_drift`` > ``drift_threshold`` (default 0.1 bits). A score
    that rose significantly is reported (shift, d, p) but is good news, not a reason to
    re-train. Good: JSD well below 0.1 (0 = the same distribution) and p above 0.01.
* ``coherence``: do near-identical inputs get the same output? Two texts are
  *near-identical* when their normalized forms are equal (``normalize_text``: Unicode
  NFKC, casefold, every character that is not a letter, a digit or whitespace removed
  (punctuation, symbols, underscores), whitespace runs collapsed to one space, ends
  stripped; so "Hello,  World!" ≡ "hello world"). Among the cycle's
  pairs of rows with near-identical inputs, coherence is the share whose outputs are
  near-identical too: Σ_g Σ_o C(n_go, 2) / Σ_g C(n_g, 2) over input groups g (n_g rows)
  and their output values o (n_go rows). ``coherence_pairs`` = the denominator; null
  coherence when the cycle has no repeated input. Good: close to 1 (a deterministic
  model gives 1); informative only, it requests nothing.
* ``retrain_due`` = complete and (below_threshold or drifted); ``breaks`` says which
  threshold broke and by how much. A partial cycle gets every figure but requests
  nothing until it is complete.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
from scipy import stats

CYCLE_SIZE = 200  # ratings per cycle (default; configurable)
ALIGNMENT_THRESHOLD = 0.7  # mean score below this breaks alignment
DRIFT_THRESHOLD = 0.1  # output Jensen–Shannon divergence (bits) above this is drift
SCORE_P_THRESHOLD = 0.01  # Welch p-value below this (with a falling mean) is score drift
LABEL_MAX_DISTINCT = 50  # at most this many distinct normalized outputs: outputs are labels
TOKEN_VOCAB = 100  # token basis: the reference cycle's most frequent words kept, the rest pooled
OTHER = "\x00other"  # the pooled bucket (no normalized text can hold a NUL)
BASES = ("auto", "label", "token")

FEEDBACK_CYCLE_GENERIC_COLUMNS = [
    "cycle", "model_version", "first_ts", "last_ts", "n", "complete", "cycle_size", "mean_score", "score_sd",
    "score_ci_low", "score_ci_high", "alignment_threshold", "below_threshold", "reference_cycle", "score_shift",
    "score_drift", "score_drift_p", "score_p_threshold", "output_basis", "output_drift", "output_tv",
    "drift_threshold", "drifted", "coherence", "coherence_pairs", "breaks", "retrain_due",
]


# ---------------------------------------------------------------------------
# Near-identical text
# ---------------------------------------------------------------------------


def normalize_texts(texts: pd.Series) -> pd.Series:
    """``normalize_text`` over a column (vectorized)."""
    out = texts.astype(str).str.normalize("NFKC").str.casefold()
    out = out.str.replace(r"[^\w\s]|_", "", regex=True)
    return out.str.replace(r"\s+", " ", regex=True).str.strip()


def normalize_text(text: str) -> str:
    """The form in which two texts are near-identical (module doc): NFKC, casefold, punctuation and
    symbols removed, whitespace collapsed, ends stripped. ``"Hello,  World!"`` -> ``"hello world"``."""
    return str(normalize_texts(pd.Series([text])).iloc[0])


# ---------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------


def mean_ci(scores: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high): the t-interval of the mean, clipped to [0, 1]; NaN sd/CI when n < 2."""
    s = np.asarray(scores, dtype=float)
    n = len(s)
    if n == 0:
        return (np.nan,) * 4
    mean = float(s.mean())
    if n < 2:
        return mean, np.nan, np.nan, np.nan
    sd = float(s.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, max(0.0, mean - half), min(1.0, mean + half)


def score_drift(current: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(shift, standardized mean difference, two-sided Welch p) of ``current`` vs ``reference`` (module doc)."""
    a = np.asarray(current, dtype=float)
    b = np.asarray(reference, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return np.nan, np.nan, np.nan
    shift = float(a.mean() - b.mean())
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    if pooled > 0:
        d = shift / pooled
    else:
        d = 0.0 if shift == 0 else np.nan
    if va == 0 and vb == 0:
        p = 1.0 if shift == 0 else 0.0
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return shift, d, p


def jensen_shannon(p: pd.Series, q: pd.Series) -> float:
    """Jensen–Shannon divergence in bits of two distributions given as counts (or weights) by category."""
    keys = p.index.union(q.index)
    pv = p.reindex(keys, fill_value=0).to_numpy(dtype=float)
    qv = q.reindex(keys, fill_value=0).to_numpy(dtype=float)
    if pv.sum() <= 0 or qv.sum() <= 0:
        return np.nan
    pv, qv = pv / pv.sum(), qv / qv.sum()
    m = (pv + qv) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, 0.5 * kl(pv) + 0.5 * kl(qv))


def total_variation(p: pd.Series, q: pd.Series) -> float:
    """Total variation distance ½·Σ|p − q| of two distributions given as counts by category."""
    keys = p.index.union(q.index)
    pv = p.reindex(keys, fill_value=0).to_numpy(dtype=float)
    qv = q.reindex(keys, fill_value=0).to_numpy(dtype=float)
    if pv.sum() <= 0 or qv.sum() <= 0:
        return np.nan
    return float(0.5 * np.abs(pv / pv.sum() - qv / qv.sum()).sum())


def choose_basis(normalized_outputs: pd.Series, basis: str = "auto") -> str:
    """``label`` or ``token`` (module doc): ``auto`` = label when ≤ LABEL_MAX_DISTINCT distinct outputs."""
    if basis not in BASES:
        raise ValueError(f"unknown output basis {basis!r}; use one of {', '.join(BASES)}")
    if basis != "auto":
        return basis
    return "label" if normalized_outputs.nunique() <= LABEL_MAX_DISTINCT else "token"


def output_distribution(normalized_outputs: pd.Series, basis: str, vocab: set[str] | None = None) -> pd.Series:
    """Counts by category: the outputs themselves (label) or their words (token; words outside
    ``vocab`` pooled into one bucket when a vocabulary is given)."""
    if basis == "label":
        return normalized_outputs.value_counts()
    words = Counter(w for text in normalized_outputs for w in text.split())
    if vocab is not None:
        pooled: Counter[str] = Counter()
        for w, c in words.items():
            pooled[w if w in vocab else OTHER] += c
        words = pooled
    return pd.Series(words, dtype=float)


def token_vocabulary(normalized_outputs: pd.Series, size: int = TOKEN_VOCAB) -> set[str]:
    """The ``size`` most frequent words (ties: alphabetical) of a cycle's normalized outputs."""
    counts = Counter(w for text in normalized_outputs for w in text.split())
    return {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]}


def output_drift(current: pd.Series, reference: pd.Series, basis: str) -> tuple[float, float]:
    """(JSD bits, total variation) of normalized outputs vs the reference cycle's, on ``basis``."""
    vocab = token_vocabulary(reference) if basis == "token" else None
    p = output_distribution(current, basis, vocab)
    q = output_distribution(reference, basis, vocab)
    return jensen_shannon(p, q), total_variation(p, q)


def coherence(normalized_inputs: pd.Series, normalized_outputs: pd.Series) -> tuple[float, int]:
    """(agreement, pairs): the share of pairs of rows with near-identical inputs whose outputs are
    near-identical too, and the number of such pairs (module doc). NaN agreement without a pair."""
    frame = pd.DataFrame({"i": normalized_inputs.to_numpy(), "o": normalized_outputs.to_numpy()})
    per_input = frame.groupby("i").size().to_numpy(dtype=np.int64)
    pairs = int((per_input * (per_input - 1) // 2).sum())
    if pairs == 0:
        return np.nan, 0
    per_output = frame.groupby(["i", "o"]).size().to_numpy(dtype=np.int64)
    agree = int((per_output * (per_output - 1) // 2).sum())
    return agree / pairs, pairs


# ---------------------------------------------------------------------------
# Cycles
# ---------------------------------------------------------------------------


def _breaks(row: dict) -> str | None:
    parts = []
    if row["below_threshold"]:
        parts.append(f"mean score {row['mean_score']:.3f} < {row['alignment_threshold']:.3f}")
    p = row["score_drift_p"]
    if pd.notna(p) and p < row["score_p_threshold"] and row["score_shift"] < 0:
        parts.append(f"score fell {row['score_shift']:+.3f} vs cycle {row['reference_cycle']} (Welch p={p:.2g})")
    jsd = row["output_drift"]
    if pd.notna(jsd) and jsd > row["drift_threshold"]:
        parts.append(f"output {row['output_basis']} JSD {jsd:.3f} > {row['drift_threshold']:.3f} "
                     f"vs cycle {row['reference_cycle']}")
    return "; ".join(parts) or None


def feedback_cycles_generic(feedback: pd.DataFrame, cycle_size: int = CYCLE_SIZE, *,
                            alignment_threshold: float = ALIGNMENT_THRESHOLD,
                            drift_threshold: float = DRIFT_THRESHOLD,
                            score_p_threshold: float = SCORE_P_THRESHOLD,
                            basis: str = "auto") -> pd.DataFrame:
    """A task's cycles and their figures (module doc), one row per cycle in cycle order.

    ``feedback``: the task's rows with ts, input, output, score, model_version (and
    feedback_id for a stable order). Returns FEEDBACK_CYCLE_GENERIC_COLUMNS.
    """
    if cycle_size < 1:
        raise ValueError(f"cycle_size must be at least 1, got {cycle_size}")
    if feedback.empty:
        return pd.DataFrame(columns=FEEDBACK_CYCLE_GENERIC_COLUMNS)
    order = ["ts", "feedback_id"] if "feedback_id" in feedback.columns else ["ts"]
    frame = feedback.sort_values(order, kind="stable").reset_index(drop=True)
    version = frame["model_version"].astype(object) if "model_version" in frame else pd.Series([None] * len(frame))
    frame["_version"] = version.where(version.notna(), "").astype(str)
    frame["_in"] = normalize_texts(frame["input"])
    frame["_out"] = normalize_texts(frame["output"])
    frame["_cycle_in_version"] = frame.groupby("_version", sort=False).cumcount().to_numpy() // cycle_size
    used_basis = choose_basis(frame["_out"], basis)

    groups = []
    for (ver, _), group in frame.groupby(["_version", "_cycle_in_version"], sort=False):
        groups.append((group["ts"].iloc[0], ver, group))
    groups.sort(key=lambda g: (g[0], g[1]))

    rows: list[dict] = []
    reference: dict[str, tuple[int, pd.DataFrame]] = {}  # version -> (cycle, its rows)
    for number, (_, ver, group) in enumerate(groups, start=1):
        scores = group["score"].to_numpy(dtype=float)
        complete = len(group) == cycle_size
        mean, sd, lo, hi = mean_ci(scores)
        row: dict = {
            "cycle": number,
            "model_version": None if ver == "" else ver,
            "first_ts": group["ts"].iloc[0],
            "last_ts": group["ts"].iloc[-1],
            "n": len(group),
            "complete": complete,
            "cycle_size": cycle_size,
            "mean_score": mean, "score_sd": sd, "score_ci_low": lo, "score_ci_high": hi,
            "alignment_threshold": float(alignment_threshold),
            "below_threshold": bool(mean < alignment_threshold),
            "reference_cycle": None,
            "score_shift": np.nan, "score_drift": np.nan, "score_drift_p": np.nan,
            "score_p_threshold": float(score_p_threshold),
            "output_basis": used_basis, "output_drift": np.nan, "output_tv": np.nan,
            "drift_threshold": float(drift_threshold),
        }
        ref = reference.get(ver)
        if ref is None and complete:
            reference[ver] = (number, group)
            row["reference_cycle"] = number
        elif ref is not None:
            ref_number, ref_rows = ref
            row["reference_cycle"] = ref_number
            row["score_shift"], row["score_drift"], row["score_drift_p"] = score_drift(
                scores, ref_rows["score"].to_numpy(dtype=float))
            row["output_drift"], row["output_tv"] = output_drift(group["_out"], ref_rows["_out"], used_basis)
        score_fell = (pd.notna(row["score_drift_p"]) and row["score_drift_p"] < score_p_threshold
                      and row["score_shift"] < 0)
        outputs_moved = pd.notna(row["output_drift"]) and row["output_drift"] > drift_threshold
        row["drifted"] = bool(score_fell or outputs_moved)
        row["coherence"], row["coherence_pairs"] = coherence(group["_in"], group["_out"])
        row["breaks"] = _breaks(row)
        row["retrain_due"] = bool(complete and (row["below_threshold"] or row["drifted"]))
        rows.append(row)
    out = pd.DataFrame(rows, columns=FEEDBACK_CYCLE_GENERIC_COLUMNS)
    out["reference_cycle"] = out["reference_cycle"].astype("Int64")
    return out


def newest_complete(cycles: pd.DataFrame) -> pd.Series | None:
    """The newest complete cycle (highest cycle number), or None."""
    done = cycles[cycles["complete"].astype(bool)] if len(cycles) else cycles
    return None if done.empty else done.sort_values("cycle").iloc[-1]
