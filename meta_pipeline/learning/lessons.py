"""Lessons: what a pattern has earned, overall and at each scope, and how that moved over time.

A lesson is a pattern at a scope: ``pattern|k1=v1,k2=v2`` (see contracts.lesson_key).
Every trade contributes to the lesson of each of its patterns at every subset (size
0..max_scope_dims) of its scope. Mining is integer work: trade ids, patterns, scope
keys and values are encoded once (pyarrow hashing), a lesson is an int64 id per
(subset, pattern, scope-combination), and counts/sums are ``np.bincount``. The only
Python loop is over the handful of scope-key subsets; strings are built once per
distinct lesson, never per trade. (1M trades → 11M lesson-trade pairs in ~4 s CPU.)

Inputs are the source tables as the store returns them:
``trades`` (trade_id, closed_at, regime, strategy_id, return_r), ``patterns``
(trade_id, pattern), ``scope`` (trade_id, key, value). Positions in ``trades``
(0..n-1, as given) are the ``trade_idx`` of the incidence, so callers pass the same
``trades`` frame to every function of a run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

from meta_pipeline.contracts import lesson_key

__all__ = [
    "LESSON_COLUMNS",
    "EDGE_HISTORY_COLUMNS",
    "mine_lessons",
    "match_lessons",
    "edge_history",
    "compute_edge_history",
    "incidence_matrix",
    "check_trades_frame",
]

LESSON_COLUMNS = [
    "lesson_key",
    "pattern",
    "scope_json",
    "n_scope_keys",
    "n",
    "edge_mean",
    "edge_std",
    "edge_se",
    "edge_lcb",
    "first_seen",
    "last_seen",
    "latent_factor_id",
]
EDGE_HISTORY_COLUMNS = ["lesson_key", "bucket_start", "n", "edge_mean", "edge_se"]
INCIDENCE_COLUMNS = ["lesson_idx", "trade_idx"]
TRADE_COLUMNS = ("trade_id", "closed_at", "return_r")


# ---------------------------------------------------------------------------
# input plumbing
# ---------------------------------------------------------------------------


def check_trades_frame(trades: pd.DataFrame, required: tuple[str, ...] = TRADE_COLUMNS) -> None:
    """Raise ValueError naming the missing columns (a programming error, not bad data)."""
    missing = [c for c in required if c not in trades.columns]
    if missing:
        raise ValueError(f"trades frame is missing column(s) {missing}")


def _arrow_strings(values: pd.Series | np.ndarray) -> pa.Array:
    """Values as one pyarrow large_string array (zero-copy for arrow-backed pandas strings)."""
    if isinstance(values, pd.Series) and hasattr(values.array, "__arrow_array__"):
        arr = pa.array(values.array)
    else:
        arr = pa.array(pd.Series(values).astype(str).to_numpy(dtype=object))
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.large_string())


def positions_of(reference: pd.Series | np.ndarray, values: pd.Series | np.ndarray) -> np.ndarray:
    """Position of each of ``values`` in ``reference`` (-1 where absent).

    pyarrow's hash join (``index_in``) rather than a pandas Index: several times faster
    for millions of string ids, which is most of the cost of mining.
    """
    ref = _arrow_strings(reference)
    vals = _arrow_strings(values)
    if len(ref) == 0 or len(vals) == 0:
        return np.full(len(vals), -1, dtype=np.int64)
    # The long source tables come back clustered by trade (their key starts with the trade
    # id), so a trade's rows are consecutive: look each run of equal ids up once (3.3M
    # pattern rows are ~1M lookups), then repeat the answer along the run.
    if len(vals) > 1:
        differs = pc.not_equal(vals.slice(1), vals.slice(0, len(vals) - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.concatenate(([True], differs)))
        if starts.size < 0.8 * len(vals):
            found = pc.index_in(vals.take(pa.array(starts)), value_set=ref)
            found = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            return np.repeat(found, np.diff(np.append(starts, len(vals))))
    found = pc.index_in(vals, value_set=ref)
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def factorize_strings(values: pd.Series | np.ndarray, sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques) of string values, via pyarrow's dictionary encoding."""
    arr = _arrow_strings(values)
    enc = arr.dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniques = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    if sort and len(uniques):
        order = np.argsort(uniques.astype(str), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes, uniques = rank[codes], uniques[order]
    return codes, uniques


def _trade_positions(trades: pd.DataFrame, trade_ids: pd.Series) -> np.ndarray:
    """Position in ``trades`` of each id (-1 when the id is not a known trade)."""
    ids = _arrow_strings(trades["trade_id"])
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError("trades.trade_id must be unique within a domain")
    return positions_of(trades["trade_id"], trade_ids)


def dense_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys sorted, inverse) like ``np.unique(return_inverse=True)``.

    Uses a bincount over the key range when it is small (lesson × bucket, pattern ×
    scope combination usually are): linear time instead of a sort of millions of rows.
    """
    if keys.size == 0:
        return keys.astype(np.int64), keys.astype(np.int64)
    lo, hi = int(keys.min()), int(keys.max())
    span = hi - lo + 1
    if lo >= 0 and span <= 4 * keys.size + 1_000_000:
        present = np.bincount(keys, minlength=hi + 1) > 0
        remap = np.cumsum(present) - 1
        return np.flatnonzero(present).astype(np.int64), remap[keys].astype(np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq.astype(np.int64), inv.astype(np.int64)


def _empty_incidence() -> pd.DataFrame:
    return pd.DataFrame({"lesson_idx": np.array([], np.int64), "trade_idx": np.array([], np.int64)})


@dataclass
class _SubsetCandidates:
    """All candidate lessons of one scope-key subset, with their (lesson, trade) pairs."""

    keys: tuple[str, ...]
    lesson_ids: np.ndarray  # distinct candidate ids (pattern * n_combos + combo)
    pair_lesson: np.ndarray  # per pair: position in lesson_ids
    pair_trade: np.ndarray  # per pair: trade position
    pattern_names: np.ndarray
    combo_values: list[np.ndarray]  # per key in `keys`: value of each combo
    n_combos: int

    def describe(self, positions: np.ndarray) -> pd.DataFrame:
        """pattern, scope dict and lesson_key of the candidates at ``positions``."""
        ids = self.lesson_ids[positions]
        pat = self.pattern_names[ids // max(self.n_combos, 1)]
        combo = ids % max(self.n_combos, 1)
        scopes = [{k: str(vals[c]) for k, vals in zip(self.keys, self.combo_values)} for c in combo]
        return pd.DataFrame(
            {
                "lesson_key": [lesson_key(p, s) for p, s in zip(pat, scopes)],
                "pattern": pat,
                "scope_json": [json.dumps(s, sort_keys=True) for s in scopes],
                "n_scope_keys": len(self.keys),
            }
        )


def _scope_codes(trades: pd.DataFrame, scope: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scope as one value-code column per key over ``trades`` (-1: the trade has no such attribute)."""
    n_trades = len(trades)
    value_codes: dict[str, np.ndarray] = {}
    value_names: dict[str, np.ndarray] = {}
    if len(scope) and n_trades:
        s_trade = _trade_positions(trades, scope["trade_id"])
        ok = s_trade >= 0
        key_code, key_names = factorize_strings(scope["key"])
        val_code, val_names = factorize_strings(scope["value"])
        key_code, val_code, s_trade = key_code[ok], val_code[ok], s_trade[ok]
        for k, key in enumerate(key_names):
            m = key_code == k
            used, codes = dense_groups(val_code[m])  # value codes of this key, renumbered
            col = np.full(n_trades, -1, dtype=np.int64)
            col[s_trade[m]] = codes  # a repeated key for one trade: the last row wins
            value_codes[str(key)] = col
            value_names[str(key)] = val_names[used]
    return value_codes, value_names


def _combo_of_trades(
    keys: tuple[str, ...], value_codes: dict[str, np.ndarray], value_names: dict[str, np.ndarray], n_trades: int
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Per trade, the code of its value combination for scope ``keys`` (-1 if it lacks one).

    Also returns the values of each combination (one array per key) and their count.
    """
    if not keys:
        return np.zeros(n_trades, dtype=np.int64), [], 1
    if any(k not in value_codes for k in keys):
        return np.full(n_trades, -1, dtype=np.int64), [np.array([], dtype=object) for _ in keys], 0
    has = np.ones(n_trades, dtype=bool)
    radix_code = np.zeros(n_trades, dtype=np.int64)
    for k in keys:
        has &= value_codes[k] >= 0
        radix_code = radix_code * len(value_names[k]) + np.maximum(value_codes[k], 0)
    combos, combo_of_trade = dense_groups(radix_code[has])
    trade_combo = np.full(n_trades, -1, dtype=np.int64)
    trade_combo[has] = combo_of_trade
    # decode the radix code of each distinct combination back to its values
    combo_values, rest = [], combos.copy()
    for k in reversed(keys):
        base = len(value_names[k])
        combo_values.append(value_names[k][rest % base])
        rest //= base
    combo_values.reverse()
    return trade_combo, combo_values, len(combos)


def _candidates(
    trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame, max_scope_dims: int
) -> Iterator[_SubsetCandidates]:
    """Yield, per scope-key subset, every (lesson, trade) pair the trades imply."""
    n_trades = len(trades)
    p_trade = _trade_positions(trades, patterns["trade_id"])
    known = p_trade >= 0
    p_trade = p_trade[known]
    p_code, pattern_names = factorize_strings(patterns["pattern"])
    p_code = p_code[known]

    value_codes, value_names = _scope_codes(trades, scope)
    scope_keys = sorted(value_codes)
    for size in range(0, max(0, int(max_scope_dims)) + 1):
        for keys in itertools.combinations(scope_keys, size):  # the handful of subsets
            trade_combo, combo_values, n_combos = _combo_of_trades(keys, value_codes, value_names, n_trades)
            pc = trade_combo[p_trade]
            sel = pc >= 0
            if not sel.any():
                continue
            ids = p_code[sel].astype(np.int64) * n_combos + pc[sel]
            lesson_ids, inverse = dense_groups(ids)
            yield _SubsetCandidates(keys, lesson_ids, inverse, p_trade[sel], pattern_names, combo_values, n_combos)


# ---------------------------------------------------------------------------
# mining
# ---------------------------------------------------------------------------


MIN_SUPPORT = 30  # trades a lesson needs (the default of mine_lessons)
MAX_SCOPE_DIMS = 2  # scope keys a lesson may condition on (the default of mine_lessons)


@dataclass(frozen=True)
class MiningSettings:
    """min_support and max_scope_dims in effect: the active PM_OVERRIDES config's, else the defaults."""

    min_support: int = MIN_SUPPORT
    max_scope_dims: int = MAX_SCOPE_DIMS
    source: str = "defaults"


def mining_settings(active: tuple[int, Mapping[str, object]] | None) -> MiningSettings:
    """The mining settings from ``store.active_config("PM_OVERRIDES", domain)`` ((version, config) or None).
    Values outside min_support ∈ [2, 10000], max_scope_dims ∈ [0, 4] are clipped into range."""
    if active is None:
        return MiningSettings()
    version, config = active
    support = int(np.clip(int(config.get("min_support", MIN_SUPPORT)), 2, 10_000))
    dims = int(np.clip(int(config.get("max_scope_dims", MAX_SCOPE_DIMS)), 0, 4))
    return MiningSettings(support, dims, f"configs v{version}")


def mine_lessons(
    trades: pd.DataFrame,
    patterns: pd.DataFrame,
    scope: pd.DataFrame,
    *,
    max_scope_dims: int = 2,
    min_support: int = MIN_SUPPORT,
    lambda_ci: float = 0.5,
    z: float = 1.96,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mine every lesson with support ≥ ``min_support``.

    Returns ``(lessons, lesson_trades)``: ``lessons`` has :data:`LESSON_COLUMNS`
    (``latent_factor_id`` left null: the latent-factor step fills it), sorted by
    lesson_key; ``lesson_trades`` is the incidence, one row per (lesson_idx, trade_idx)
    with ``lesson_idx`` the row of ``lessons`` and ``trade_idx`` the row of ``trades``.
    Empty trades give empty (typed) frames.
    """
    check_trades_frame(trades)
    y = trades["return_r"].to_numpy(dtype=float)
    closed = pd.to_datetime(trades["closed_at"], utc=True)
    closed_ns = pd.DatetimeIndex(closed).as_unit("ns").asi8

    frames, incid_lesson, incid_trade, offset = [], [], [], 0
    for cand in _candidates(trades, patterns, scope, max_scope_dims):
        support = np.bincount(cand.pair_lesson, minlength=len(cand.lesson_ids))
        keep = support >= min_support
        if not keep.any():
            continue
        new_pos = np.cumsum(keep) - 1  # candidate position -> kept position
        pair_keep = keep[cand.pair_lesson]
        frames.append(cand.describe(np.flatnonzero(keep)))
        incid_lesson.append(new_pos[cand.pair_lesson[pair_keep]] + offset)
        incid_trade.append(cand.pair_trade[pair_keep])
        offset += int(keep.sum())
        del cand, pair_keep  # the subset's pairs, before the next subset's are built

    if not frames:
        return _empty_lessons(), _empty_incidence()

    lessons = pd.concat(frames, ignore_index=True)
    li = np.concatenate(incid_lesson)
    incid_lesson.clear()  # the per-subset pieces: as large as li, not needed again
    ti = np.concatenate(incid_trade)
    incid_trade.clear()
    n_les = len(lessons)
    n = np.bincount(li, minlength=n_les).astype(float)
    mean = np.bincount(li, y[ti], n_les) / n
    # two-pass variance: stable for large means (squared deviations built in place: the
    # pairs are tens of millions at 5M trades, one pair-long temporary instead of four)
    dev = y[ti]
    dev -= mean[li]
    dev *= dev
    ss = np.bincount(li, dev, n_les)
    del dev
    std = np.sqrt(ss / np.maximum(n - 1.0, 1.0))
    se = std / np.sqrt(n)
    first_ns = np.full(n_les, np.iinfo(np.int64).max)
    last_ns = np.full(n_les, np.iinfo(np.int64).min)
    np.minimum.at(first_ns, li, closed_ns[ti])
    np.maximum.at(last_ns, li, closed_ns[ti])
    lessons["n"] = n.astype(np.int64)
    lessons["edge_mean"] = mean
    lessons["edge_std"] = std
    lessons["edge_se"] = se
    lessons["edge_lcb"] = mean - lambda_ci * z * se
    lessons["first_seen"] = pd.to_datetime(first_ns, utc=True)
    lessons["last_seen"] = pd.to_datetime(last_ns, utc=True)
    lessons["latent_factor_id"] = pd.Series([None] * n_les, dtype=object)

    # canonical order: by lesson_key, so ids and outputs are deterministic
    order = np.argsort(lessons["lesson_key"].to_numpy(dtype=str), kind="stable")
    rank = np.empty(n_les, dtype=np.int64)
    rank[order] = np.arange(n_les)
    lessons = lessons.iloc[order].reset_index(drop=True)[LESSON_COLUMNS]
    # incidence rows are in a deterministic (input-derived) order, not sorted: nothing
    # downstream needs an order, and sorting 10M+ rows would cost more than mining
    # one (2, pairs) block filled in place and handed to pandas as is: a frame built from two
    # columns would stack them into a new block, a copy of both while they are alive
    block = np.empty((2, li.size), dtype=np.int64)
    np.take(rank, li, out=block[0])
    del li
    block[1] = ti
    del ti
    incidence = pd.DataFrame(block.T, columns=["lesson_idx", "trade_idx"], copy=False)
    return lessons, incidence


def _empty_lessons() -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series(dtype=object) for c in LESSON_COLUMNS})
    for c in ("n", "n_scope_keys"):
        out[c] = pd.Series(dtype=np.int64)
    for c in ("edge_mean", "edge_std", "edge_se", "edge_lcb"):
        out[c] = pd.Series(dtype=float)
    for c in ("first_seen", "last_seen"):
        out[c] = pd.Series(dtype="datetime64[ns, UTC]")
    return out


def match_lessons(
    lessons: pd.DataFrame, trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame
) -> pd.DataFrame:
    """The incidence of already-mined ``lessons`` on ``trades`` (same layout as mine_lessons).

    Used by downstream steps that read the lessons table back from the store.
    """
    check_trades_frame(trades, ("trade_id",))
    if lessons.empty or trades.empty:
        return _empty_incidence()
    max_dims = int(pd.to_numeric(lessons["n_scope_keys"]).max())
    li_parts, ti_parts = [], []
    for cand in _candidates(trades, patterns, scope, max_dims):
        pos = positions_of(lessons["lesson_key"], cand.describe(np.arange(len(cand.lesson_ids)))["lesson_key"])
        pair_pos = pos[cand.pair_lesson]
        keep = pair_pos >= 0
        li_parts.append(pair_pos[keep])
        ti_parts.append(cand.pair_trade[keep])
    if not li_parts:
        return _empty_incidence()
    return pd.DataFrame(
        {"lesson_idx": np.concatenate(li_parts).astype(np.int64), "trade_idx": np.concatenate(ti_parts).astype(np.int64)}
    )


def incidence_matrix(lesson_trades: pd.DataFrame, n_lessons: int, n_trades: int) -> sparse.csr_matrix:
    """Lesson × trade 0/1 matrix (CSR, float64) of an incidence frame."""
    li = lesson_trades["lesson_idx"].to_numpy(dtype=np.int64)
    ti = lesson_trades["trade_idx"].to_numpy(dtype=np.int64)
    return sparse.csr_matrix((np.ones(li.size), (li, ti)), shape=(n_lessons, n_trades))


# ---------------------------------------------------------------------------
# edge history
# ---------------------------------------------------------------------------


def edge_history(
    lessons: pd.DataFrame,
    lesson_trades: pd.DataFrame,
    trades: pd.DataFrame,
    bucket: str = "1D",
    *,
    scope: pd.DataFrame | None = None,
    baseline: str | None = "auto",
) -> pd.DataFrame:
    """Per lesson and time bucket with trades: n, edge_mean, edge_se.

    A bucket's edge is the mean, over the lesson's trades in it, of ``return_r`` minus a
    same-bucket baseline (``baseline``):

    * ``"scope_bucket_mean"`` (the default when ``scope`` is given): the mean return of
      all the domain's trades in the same bucket AND the lesson's scope (any pattern).
      So the edge is the pattern's lift within its scope. Why: a lesson's raw mean also
      carries the other lessons that co-fire with it by chance and everything else that
      lives at its scope (another family's edge at ``chain=base`` is in every
      ``…|chain=base`` lesson); those move with their own half-lives and would be
      mistaken for this lesson's decay, and a constant background under an exponential
      biases the half-life. Subtracting the same-scope, same-bucket mean removes them;
      what remains is ≈ (1 − the pattern's share of the scope) × the lesson's own edge
      curve, so the fitted half-life is the lesson's.
    * ``"bucket_mean"`` (the default without ``scope``): same-bucket mean of all trades.
    * ``None``: raw means.

    ``edge_se`` is the within-bucket sample sd / sqrt(n) (null when n = 1).
    """
    check_trades_frame(trades, ("closed_at", "return_r"))
    if baseline == "auto":
        baseline = "bucket_mean" if scope is None else "scope_bucket_mean"
    if baseline not in ("scope_bucket_mean", "bucket_mean", None):
        raise ValueError(f"unknown baseline {baseline!r} (use 'scope_bucket_mean', 'bucket_mean' or None)")
    if baseline == "scope_bucket_mean" and scope is None:
        raise ValueError("baseline='scope_bucket_mean' needs the scope frame")
    if lessons.empty or lesson_trades.empty or trades.empty:
        return pd.DataFrame(
            {
                "lesson_key": pd.Series(dtype=object),
                "bucket_start": pd.Series(dtype="datetime64[ns, UTC]"),
                "n": pd.Series(dtype=np.int64),
                "edge_mean": pd.Series(dtype=float),
                "edge_se": pd.Series(dtype=float),
            }
        )
    n_trades = len(trades)
    starts = pd.to_datetime(trades["closed_at"], utc=True).dt.floor(bucket)
    b_code, b_starts = pd.factorize(starts, sort=True)
    n_b = len(b_starts)
    y = trades["return_r"].to_numpy(dtype=float)
    li = lesson_trades["lesson_idx"].to_numpy(dtype=np.int64)
    ti = lesson_trades["trade_idx"].to_numpy(dtype=np.int64)

    if baseline is None:
        y_pair = y[ti]
    elif baseline == "bucket_mean":
        b_mean = np.bincount(b_code, y, n_b) / np.bincount(b_code, minlength=n_b)
        y_pair = (y - b_mean[b_code])[ti]
    else:
        value_codes, value_names = _scope_codes(trades, scope)
        subset_of_lesson = [tuple(sorted(json.loads(js))) for js in lessons["scope_json"]]
        subset_codes, subsets = pd.factorize(pd.Series(subset_of_lesson, dtype=object))
        pair_subset = subset_codes.astype(np.int32)[li]  # per pair (tens of millions): 4 bytes, not 8
        y_pair = np.full(li.size, np.nan)
        for s_idx, keys in enumerate(subsets):  # the handful of scope-key subsets
            combo, _, n_combos = _combo_of_trades(tuple(keys), value_codes, value_names, n_trades)
            has = combo >= 0
            cell = combo[has] * n_b + b_code[has]
            cell_n = np.bincount(cell, minlength=max(n_combos, 1) * n_b)
            cell_sum = np.bincount(cell, y[has], max(n_combos, 1) * n_b)
            base = np.full(n_trades, np.nan)
            base[has] = cell_sum[cell] / cell_n[cell]
            m = pair_subset == s_idx
            t_m = ti[m]
            y_pair[m] = y[t_m] - base[t_m]
            del t_m, m
        del pair_subset

    cell = li * n_b
    cell += b_code.astype(np.int32)[ti]
    cells, inv = dense_groups(cell)
    del cell
    n = np.bincount(inv).astype(float)
    mean = np.bincount(inv, y_pair) / n
    dev = mean[inv]  # (y_pair − mean)², in place
    np.subtract(y_pair, dev, out=dev)
    dev *= dev
    ss = np.bincount(inv, dev)
    del dev
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(n >= 2, np.sqrt(ss / np.maximum(n - 1.0, 1.0) / n), np.nan)
    return pd.DataFrame(
        {
            "lesson_key": lessons["lesson_key"].to_numpy()[cells // n_b],
            "bucket_start": pd.DatetimeIndex(b_starts)[cells % n_b],
            "n": n.astype(np.int64),
            "edge_mean": mean,
            "edge_se": se,
        }
    )


def compute_edge_history(
    lessons: pd.DataFrame,
    trades: pd.DataFrame,
    patterns: pd.DataFrame,
    scope: pd.DataFrame,
    bucket: str = "1D",
    *,
    lesson_trades: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Edge history of stored lessons straight from the source tables (what the asset calls).

    ``lesson_trades``: their incidence on ``trades`` when already known (what
    ``match_lessons(lessons, trades, patterns, scope)`` returns); computed if None.
    """
    if lesson_trades is None:
        lesson_trades = match_lessons(lessons, trades, patterns, scope)
    return edge_history(lessons, lesson_trades, trades, bucket, scope=scope)
