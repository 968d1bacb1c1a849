"""Latent factors: lessons that are the same bet seen through different names or scopes.

Two lessons are linked when their trade sets overlap strongly:

* **Jaccard** |A∩B| / |A∪B| ≥ ``jaccard_min`` — patterns that fire together
  (members of one pattern family);
* **containment** |A∩B| / min(|A|, |B|) ≥ ``containment_min`` — one lesson nested in
  another (``p|chain=solana,size=micro`` inside ``p|chain=solana``: low Jaccard, but
  containment 1). Containment alone would also tie every lesson to a pattern that
  fires on almost every trade, so it must be above chance as well: the *lift*
  P(B | A) / P(B) of the larger lesson B given the smaller A must be ≥ ``min_lift``.

All intersections come from one sparse product ``M·Mᵀ`` of the lesson × trade
incidence; linked lessons form a graph whose connected components are the factors.
Every lesson gets a factor (an unlinked lesson is a factor of one).

Factor ids are ``lf-`` + the alphabetically first pattern among the factor's members,
e.g. ``lf-F0.breakout``: readable, deterministic, and stable when supports fluctuate
between runs (a "most supported member" id would flip between near-equal members).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse import csgraph

from meta_pipeline.learning.lessons import match_lessons

__all__ = ["FACTOR_COLUMNS", "find_latent_factors", "compute_latent_factors", "similar_lesson_pairs"]

FACTOR_COLUMNS = ["lesson_key", "latent_factor_id", "factor_size"]
MAX_ID_CHARS = 100  # latent_factors.latent_factor_id is String(100)


def similar_lesson_pairs(
    lesson_trades: pd.DataFrame,
    n_lessons: int,
    n_trades: int,
    *,
    jaccard_min: float = 0.5,
    containment_min: float = 0.8,
    min_lift: float = 1.5,
) -> pd.DataFrame:
    """Linked lesson pairs (i < j) with their intersection, Jaccard and containment."""
    if n_lessons == 0 or lesson_trades.empty:
        return pd.DataFrame(columns=["i", "j", "intersection", "jaccard", "containment", "lift"])
    m, weight = _collapsed_incidence(lesson_trades, n_lessons, n_trades)
    size = np.asarray((m @ weight)).ravel()
    # |A∩B| = Σ over trade groups in both of the group's size, for every co-occurring pair once
    co = sparse.triu(m @ sparse.diags(weight) @ m.T, k=1).tocoo()
    i, j, inter = co.row, co.col, co.data
    small = np.minimum(size[i], size[j])
    large = np.maximum(size[i], size[j])
    jaccard = inter / (size[i] + size[j] - inter)
    containment = inter / small
    lift = containment / (large / max(n_trades, 1))  # P(large | small) / P(large)
    linked = (jaccard >= jaccard_min) | ((containment >= containment_min) & (lift >= min_lift))
    return pd.DataFrame(
        {
            "i": i[linked],
            "j": j[linked],
            "intersection": inter[linked].astype(np.int64),
            "jaccard": jaccard[linked],
            "containment": containment[linked],
            "lift": lift[linked],
        }
    )


def _collapsed_incidence(lesson_trades: pd.DataFrame, n_lessons: int, n_trades: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Lesson × trade-group incidence and group sizes: trades with identical lesson sets merged.

    Why: the co-occurrence product costs Σ_trades (lessons per trade)², ~10⁸ for a
    million trades, but trades repeat a few thousand distinct lesson sets (a set is fixed
    by the trade's patterns and scope). Each trade's set gets a 64-bit signature (two
    exact float sums of random 40-bit lesson tags, mixed; a collision needs ~2⁻⁶⁴ luck),
    identical sets collapse into one weighted column, and ``M·W·Mᵀ`` gives exactly the
    same intersections for a fraction of the work.
    """
    li = lesson_trades["lesson_idx"].to_numpy(np.int64)
    ti = lesson_trades["trade_idx"].to_numpy(np.int64)
    rng = np.random.default_rng(20240611)  # fixed: signatures only need to be distinct
    tags = rng.integers(0, 2**40, size=(2, n_lessons)).astype(np.float64)
    h1 = np.bincount(ti, tags[0][li], n_trades).astype(np.uint64)
    h2 = np.bincount(ti, tags[1][li], n_trades).astype(np.uint64)
    signature = h1 * np.uint64(0x9E3779B97F4A7C15) + h2
    group, _ = pd.factorize(signature)
    n_groups = int(group.max()) + 1 if group.size else 0
    weight = np.bincount(group, minlength=n_groups).astype(np.float64)
    representative = np.full(n_groups, -1, dtype=np.int64)
    representative[group[::-1]] = np.arange(n_trades)[::-1]  # first trade of each group
    keep = representative[group[ti]] == ti
    m = sparse.csr_matrix(
        (np.ones(int(keep.sum())), (li[keep], group[ti[keep]])), shape=(n_lessons, n_groups)
    )
    return m, weight


def find_latent_factors(
    lessons: pd.DataFrame,
    lesson_trades: pd.DataFrame,
    n_trades: int,
    *,
    jaccard_min: float = 0.5,
    containment_min: float = 0.8,
    min_lift: float = 1.5,
) -> pd.DataFrame:
    """One row per lesson (same order as ``lessons``): lesson_key, latent_factor_id, factor_size."""
    n_les = len(lessons)
    if n_les == 0:
        return pd.DataFrame({c: pd.Series(dtype=object if c != "factor_size" else np.int64) for c in FACTOR_COLUMNS})
    pairs = similar_lesson_pairs(
        lesson_trades, n_les, n_trades, jaccard_min=jaccard_min, containment_min=containment_min, min_lift=min_lift
    )
    graph = sparse.coo_matrix(
        (np.ones(len(pairs)), (pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64))), shape=(n_les, n_les)
    )
    _, component = csgraph.connected_components(graph, directed=False)
    frame = pd.DataFrame(
        {"lesson_key": lessons["lesson_key"].to_numpy(), "pattern": lessons["pattern"].to_numpy(), "c": component}
    )
    first_pattern = frame.groupby("c")["pattern"].min()
    first_key = frame.groupby("c")["lesson_key"].min()
    names = first_pattern.map(_factor_id)
    # a pattern's lessons are normally one factor (each is nested in the pattern's
    # root lesson); if input lacked the roots, two factors could share a name
    dup = names.duplicated(keep=False)
    names[dup] = [_factor_id(p, key) for p, key in zip(first_pattern[dup], first_key[dup])]
    frame["latent_factor_id"] = frame["c"].map(names)
    frame["factor_size"] = frame.groupby("c")["c"].transform("size").astype(np.int64)
    return frame[FACTOR_COLUMNS].reset_index(drop=True)


def _factor_id(pattern: str, disambiguate: str | None = None) -> str:
    text = f"lf-{pattern}"
    if disambiguate is None and len(text) <= MAX_ID_CHARS:
        return text
    digest = hashlib.sha1((disambiguate or pattern).encode()).hexdigest()[:8]
    return f"{text[: MAX_ID_CHARS - 9]}~{digest}"


def compute_latent_factors(
    lessons: pd.DataFrame,
    trades: pd.DataFrame,
    patterns: pd.DataFrame | None,
    scope: pd.DataFrame | None,
    *,
    lesson_trades: pd.DataFrame | None = None,
    **thresholds: float,
) -> pd.DataFrame:
    """Factors of stored lessons straight from the source tables (what the asset calls).

    ``lesson_trades``: their incidence on ``trades`` when already known (what
    ``match_lessons(lessons, trades, patterns, scope)`` returns); computed if None
    (then ``patterns`` and ``scope`` are needed; with it they may be None).
    """
    if lesson_trades is None:
        if patterns is None or scope is None:
            raise ValueError("patterns and scope are needed when lesson_trades is not given")
        lesson_trades = match_lessons(lessons, trades, patterns, scope)
    return find_latent_factors(lessons, lesson_trades, len(trades), **thresholds)
