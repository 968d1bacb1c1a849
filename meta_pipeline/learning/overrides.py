"""pm_overrides: the lessons an engine should act on, and the edge it should expect from each.

One owner: :class:`OverrideModel`
---------------------------------
The fit (:meth:`OverrideModel.fit`, what the pm_overrides asset materializes) and the
apply (:meth:`OverrideModel.predict`, what ``meta-pipeline predict`` and Python engines
call) are the two halves of one model, and everything they must agree on is written
once, here:

* **the precedence rule** (DESIGN, "How an engine applies the overrides"): for each
  latent factor, the most specific override (most scope keys) whose pattern fired on
  the trade and whose scope and regime match it; ties: larger support, then
  lesson_key. :func:`precedence_rank` is the order, :func:`_row_of_pair` the regime
  match (a lesson's row for the trade's regime, else its any-regime row — so a
  regime-specific row comes before an any-regime row of the same lesson; the fit never
  emits both), and :class:`_Cells` picks each (factor, trade) cell's winner. The fit
  credits trades through exactly these functions, the apply reads edges through them.
* **the tier-2 metric term** (:meth:`OverrideModel.metric_term`): when
  ``tier2_enabled``, Σ_m weight[regime, m]·(metric_m − center)/scale from
  ``learning_regime_weights`` (:func:`meta_pipeline.learning.regime.metric_term`) —
  subtracted from the target by the fit, added to the prediction by the apply.
* **the knobs**: a fitted model records the knobs it used in every row's
  ``source_json``; a model rebuilt from stored rows (:meth:`OverrideModel.from_rows`)
  takes them from there, so tier2 is applied exactly as the overrides were fitted
  (overrides fitted with tier2 on are net of the metric term; fitted with it off they
  already carry their trades' average metric contribution). Only rows that record no
  knobs fall back to the caller's knobs (for a store: the knobs in effect).
* **"now"**: ``now`` is the newest ``closed_at`` the model learned from
  (:meth:`OverrideModel.now_of`). Every edge is already decayed (fitted half-life and
  tau staleness) to ``now``, so applying the model needs no clock: a trade's edge does
  not depend on when it is predicted (``valid_until`` tells an engine when to stop
  trusting a row).

The trade's edge is the sum of its factors' winning edges, plus the metric term.

How the overrides are fitted (:meth:`OverrideModel.fit`) — credit assignment
------------------------------------------------------------------------------
That rule makes the prediction an additive model: each trade gets one value per factor,
from the one override that wins it. So the overrides are fitted *as that model*, jointly
over all factors, by least squares on the training trades:

* **target** ``y = return_r − metric term`` when tier2 is on (predict adds the metric
  term per trade, so subtracting it per trade is the exact "no double counting" — the
  lesson's mean metric contribution is removed, regime by regime), else ``return_r``.
* **design**: trade i, override o: ``x_io = s_o(t_i)`` if o is the override that wins i
  in o's factor, else 0, with ``s_o(t) = exp(−λ_o (t − now))`` the lesson's fitted
  decay shape (λ from half_life_fits; 0 unless the fit says decaying/improving). The
  coefficient is then the edge *at now*: the fitted half-life decays it from the
  data to now, while the amplitude is re-estimated jointly. For a lesson alone in its
  factor with no overlaps this is the fit's ``e0·exp(−λ (now − t_ref))``.
* Because a trade's value in a factor comes from exactly one override, a parent
  lesson's coefficient is the edge of the trades *not* covered by its more specific
  overrides; and because all factors are fitted together, a pattern that merely
  co-fires with another factor's edge gets nothing (its raw mean would).

Which lessons become overrides is forward-backward stepwise selection, vectorized
across factors (each round adds at most one lesson per factor):

* forward: a candidate lesson would take the trades where it outranks the factor's
  current winner; its evidence is the score test of the current residual on exactly
  those trades (``z = Σ r s / (σ √Σ s²)``) — i.e. "does its edge differ significantly
  from what those trades get now" (for a child scope: from its parent's). Enter if
  |z| ≥ ``z_enter`` (default: Bonferroni over the lessons at level ``alpha``), at most
  ``tier3_topk`` lessons per factor. The same test per regime (domain-wide regime
  offsets removed) lets a lesson whose edge differs by regime — even one that averages
  to nothing — enter as one row per regime;
* backward: after each joint refit drop overrides whose |coef/se| < ``z_keep`` (a
  lesson's regime rows jointly, by their Wald χ²) — e.g. a parent that only carried its
  child's edge — and never re-add them; regime rows whose edges no longer differ are
  merged back into one any-regime row;
* regime split (when ``regime_split``): a selected override whose residuals differ
  across regimes beyond the domain-wide regime offsets (χ² test, Bonferroni) is replaced
  by one row per regime (all its regimes, never together with an any-regime row);
* ``g_min``: rows with |edge| < g_min (the final edge below: after the lambda_ci
  shrinkage and tau) are dropped, and the rest refitted (≤ 3 times).

lambda_ci — shrinkage toward the lower confidence bound
--------------------------------------------------------
The joint fit gives each row a coefficient ``coef`` (its edge at now) and its standard
error ``se``. The edge an engine receives is pulled toward zero by ``lambda_ci`` times
the 95 % half-width, sign-aware and never past zero:
``shrunk = sign(coef)·max(|coef| − lambda_ci·1.96·se, 0)`` — the same bound as
``learning_lessons.edge_lcb`` (``mean − lambda_ci·1.96·se``). lambda_ci ∈ [0.3, 0.7]: a
higher value trusts a noisy coefficient less (|edge| smaller, more rows fall under
g_min); a precisely estimated edge (small se) barely moves. It counters the
winner's curse of stepwise selection: a lesson enters because its in-sample edge is
large, so its coefficient is biased away from zero by about the noise it was chosen on.

tau — staleness shrink
----------------------
``edge = shrunk × tau^(days from the lesson's last trade to now)``. The fitted half-life
already carries the decay the data shows; tau (∈ [0.8, 0.99]) is the extra per-day
retention for a lesson that has stopped receiving trades while the domain kept trading
(nothing observed ⇒ trust fades). It is 1 for a lesson seen at ``now`` and never
amplifies. Improving lessons (λ < 0) are not extrapolated beyond
``max_growth`` × their value at their last trade.

valid_until: when ``|edge|·exp(−max(λ,0)·h)·tau^(h/24)`` would fall below g_min
(h = hours after now), capped at ``horizon_hours``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse, stats

from meta_pipeline.knobs import default_knobs
from meta_pipeline.learning import regime as regime_core
from meta_pipeline.learning.lessons import (
    check_trades_frame,
    dense_groups,
    match_lessons,
)

__all__ = [
    "KNOBS_RECORDED",
    "OVERRIDE_COLUMNS",
    "OverrideModel",
    "materialize_overrides",
    "precedence_rank",
    "predict",
    "predict_sum_all_lessons",
]

OVERRIDE_COLUMNS = [
    "latent_factor_id",
    "lesson_key",
    "pattern",
    "scope_json",
    "n_scope_keys",
    "regime",
    "edge",
    "support",
    "valid_until",
    "source_json",
]
_HOUR = pd.Timedelta(hours=1)
_MAX_EXP = 50.0  # clip of decay exponents: keeps shapes finite for absurd fits


def _empty_overrides() -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series(dtype=object) for c in OVERRIDE_COLUMNS})
    out["n_scope_keys"] = pd.Series(dtype=np.int64)
    out["support"] = pd.Series(dtype=np.int64)
    out["edge"] = pd.Series(dtype=float)
    out["valid_until"] = pd.Series(dtype="datetime64[ns, UTC]")
    return out


def _utc(ts: object) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _hours_since(values: pd.Series | np.ndarray, now: pd.Timestamp) -> np.ndarray:
    return ((pd.to_datetime(pd.Series(values), utc=True) - now) / _HOUR).to_numpy(dtype=float)


# ---------------------------------------------------------------------------
# the precedence rule: used by the fit (credit) and the apply (prediction) alike
# ---------------------------------------------------------------------------


def precedence_rank(
    n_scope_keys: np.ndarray | pd.Series,
    support: np.ndarray | pd.Series,
    lesson_key: np.ndarray | pd.Series,
    regime_any: np.ndarray | None = None,
) -> np.ndarray:
    """THE order in which overrides of one factor claim a trade: rank per row, 0 = first.

    Most scope keys first, then the larger support, then the smaller lesson_key; with
    ``regime_any`` (True = an any-regime row), a regime-specific row before an
    any-regime row of the same lesson. Rows equal on every key keep their input order.
    """
    keys = [
        pd.factorize(pd.Series(lesson_key).astype(str), sort=True)[0],
        -np.asarray(support, dtype=np.int64),
        -np.asarray(n_scope_keys, dtype=np.int64),
    ]
    if regime_any is not None:
        keys.insert(0, np.asarray(regime_any).astype(np.int8))  # last tie-break
    order = np.lexsort(keys)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank


def _row_of_pair(any_row: np.ndarray, reg_row: np.ndarray, lesson_idx: np.ndarray, lesson_regime: np.ndarray) -> np.ndarray:
    """Which override row of a lesson matches a trade the lesson fired on (-1: none).

    The lesson's row for the trade's regime, else its any-regime row. ``any_row``:
    lesson → row; ``reg_row``: lesson × regime → row; ``lesson_regime``: flat
    ``lesson_idx * n_regimes + trade's regime`` per pair.
    """
    row = any_row[lesson_idx]
    if (reg_row >= 0).any():
        reg = reg_row.ravel()[lesson_regime]
        row = np.where(reg >= 0, reg, row)
    return row


def _compact(index: np.ndarray) -> np.ndarray:
    """Non-negative indices as int32 when they fit (they index millions of pairs), else as given."""
    if index.size and index.dtype != np.int32 and int(index.max(initial=0)) < np.iinfo(np.int32).max \
            and int(index.min(initial=0)) >= np.iinfo(np.int32).min:
        return index.astype(np.int32)
    return index


class _Cells:
    """(factor, trade) cells of (lesson, trade) pairs, each cell's pairs in precedence order.

    At most one override per cell wins. Sorted once, so the winners of any subset of
    the pairs (the fit's changing selections, or the rows that match a trade's regime)
    are a masked first-of-group.
    """

    def __init__(self, factor: np.ndarray, trade: np.ndarray, rank: np.ndarray, n_trades: int, n_ranks: int) -> None:
        cell = factor.astype(np.int64)  # factor·n_trades + trade, in place (pair-long arrays)
        cell *= n_trades
        cell += trade
        width = max(n_ranks, 1)
        if cell.size and int(cell.max()) < np.iinfo(np.int64).max // width:
            # one sort gives both: the (cell, rank) order and dense cell ids along it
            key = cell
            del cell
            key *= width
            key += rank
            order = np.argsort(key)  # keys are unique: a lesson meets a trade once
            self.order = _compact(order)
            del order
            sorted_cell = key[self.order]
            del key
            sorted_cell //= width  # the cell of each key (rank < width)
            starts = np.ones(sorted_cell.size, dtype=bool)
            starts[1:] = sorted_cell[1:] != sorted_cell[:-1]
            del sorted_cell
            cell_inv = np.empty(starts.size, dtype=self.order.dtype)
            cell_inv[self.order] = np.cumsum(starts, dtype=self.order.dtype) - 1
            self.cell_inv = cell_inv
        else:  # a (cell, rank) key that would overflow int64: dense cell ids first
            self.cell_inv = _compact(dense_groups(cell)[1])
            self.order = _compact(np.argsort(self.cell_inv.astype(np.int64) * width + rank))
        self.n_cells = int(self.cell_inv.max()) + 1 if self.cell_inv.size else 0

    def winners(self, active: np.ndarray) -> np.ndarray:
        """Indices of the active pairs that win their cell (in cell order: factor, then trade)."""
        ordered = self.order[active[self.order]]
        if ordered.size == 0:
            return ordered
        cells = self.cell_inv[ordered]
        first = np.ones(ordered.size, dtype=bool)
        first[1:] = cells[1:] != cells[:-1]
        return ordered[first]


class _Problem:
    """The fitting problem: lesson × trade pairs with factor, priority and decay shape."""

    def __init__(
        self,
        lessons: pd.DataFrame,
        lesson_trades: pd.DataFrame,
        y: np.ndarray,
        regime_code: np.ndarray,
        n_regimes: int,
        lam: np.ndarray,
        anchor: np.ndarray,
        t_hours: np.ndarray,
    ) -> None:
        self.n_les = len(lessons)
        self.n_trades = len(y)
        self.n_regimes = n_regimes
        self.y = y
        self.regime = regime_code
        self.factor_code, self.factor_names = pd.factorize(lessons["latent_factor_id"].astype(str), sort=True)
        # priority = the apply's order within a factor (lower rank wins)
        self.prio_of_lesson = precedence_rank(lessons["n_scope_keys"], lessons["n"], lessons["lesson_key"])

        # one entry per (lesson, trade) pair: tens of millions at 5M trades, so the per-pair
        # index arrays are int32 where their range allows (half the memory and bandwidth)
        self.li = lesson_trades["lesson_idx"].to_numpy(np.int64)
        self.ti = lesson_trades["trade_idx"].to_numpy(np.int64)
        self.pf = _compact(self.factor_code.astype(np.int64))[self.li]
        self.prio = _compact(self.prio_of_lesson)[self.li]
        # s = exp(clip(−λ·(t − anchor))), built in place (one pair-sized temporary, not four)
        self.s = t_hours[self.ti]
        self.s -= anchor[self.li]
        self.s *= lam[self.li]
        np.negative(self.s, out=self.s)
        np.clip(self.s, -_MAX_EXP, _MAX_EXP, out=self.s)
        np.exp(self.s, out=self.s)
        self.cells = _Cells(self.pf, self.ti, self.prio, self.n_trades, self.n_les)
        self.cell_inv, self.n_cells = self.cells.cell_inv, self.cells.n_cells
        lesson_regime = self.li * n_regimes  # flat (lesson, regime) per pair
        lesson_regime += regime_code[self.ti]
        self.lesson_regime = _compact(lesson_regime)
        del lesson_regime

    # -- rows: (lesson, regime or -1 = any) -----------------------------------
    def pair_rows(self, any_row: np.ndarray, reg_row: np.ndarray) -> np.ndarray:
        """Row that each pair would use (-1: the lesson has no row for the trade's regime)."""
        return _row_of_pair(any_row, reg_row, self.li, self.lesson_regime)

    def winners(self, pair_row: np.ndarray) -> np.ndarray:
        """Indices of the pairs that win their (factor, trade) cell under the apply's rule."""
        return self.cells.winners(pair_row >= 0)

    def fit(self, win: np.ndarray, pair_row: np.ndarray, n_rows: int, ridge: float) -> dict:
        """Joint least squares of the target on the winning overrides' decay shapes."""
        rows = pair_row[win]
        x = sparse.csr_matrix((self.s[win], (self.ti[win], rows)), shape=(self.n_trades, n_rows))
        gram = (x.T @ x).toarray() + ridge * np.eye(n_rows)
        rhs = x.T @ self.y
        cov_unscaled = np.linalg.pinv(gram) if n_rows else np.zeros((0, 0))
        coef = cov_unscaled @ rhs if n_rows else np.zeros(0)
        resid = self.y - x @ coef
        dof = max(self.n_trades - n_rows, 1)
        sigma2 = float(resid @ resid) / dof
        se = np.sqrt(np.maximum(np.diag(cov_unscaled), 0.0) * sigma2)
        return {
            "coef": coef,
            "se": se,
            "resid": resid,
            "sigma": math.sqrt(max(sigma2, 1e-300)),
            "n_credited": np.bincount(rows, minlength=n_rows),
        }


def _chi2_logsf(x: np.ndarray, df: np.ndarray | int) -> np.ndarray:
    """log P(χ²_df > x), finite far in the tail (scipy's logsf underflows to −inf there).

    1 df exactly through the normal tail; more df through Wilson–Hilferty where scipy
    underflows. Ranking candidates by it keeps a z of 90 ahead of a z of 50.
    """
    x = np.asarray(x, dtype=float)
    df = np.broadcast_to(np.asarray(df, dtype=float), x.shape)
    out = np.asarray(stats.chi2.logsf(x, df), dtype=float)
    one = df == 1
    out = np.where(one, math.log(2.0) + stats.norm.logsf(np.sqrt(np.maximum(x, 0.0))), out)
    bad = ~np.isfinite(out)
    if bad.any():
        k = df[bad]
        z = ((np.maximum(x[bad], 0.0) / k) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / np.sqrt(2.0 / (9.0 * k))
        out[bad] = stats.norm.logsf(z)
    return out


PAIR_CHUNK = 1 << 22  # (lesson, trade) pairs summed at once by the forward step


def _pair_chunks(n_pairs: int) -> Iterator[slice]:
    for lo in range(0, n_pairs, PAIR_CHUNK):
        yield slice(lo, min(lo + PAIR_CHUNK, n_pairs))


def _forward_candidates(
    prob: _Problem, result: dict, cand: np.ndarray, log_p_enter: float, by_regime: bool
) -> list[tuple[int, np.ndarray | None]]:
    """The best entering lesson per factor: (lesson, None) for an any-regime row, or
    (lesson, regimes) for one row per regime.

    A candidate takes the pairs ``cand`` (where it would outrank the current winner).
    Its evidence is the score test of the current residual on those trades: one common
    edge (χ², 1 df), or — when ``by_regime`` — one edge per regime (χ², R df, after
    removing the domain-wide regime offsets of the residual, which no lesson owns); the
    per-regime form is used only when the regimes differ significantly (χ², R−1 df) and
    it is the stronger evidence. Ranking by log p-value keeps huge effects comparable.
    """
    n_les, n_reg = prob.n_les, prob.n_regimes
    resid = result["resid"]
    sigma2 = result["sigma"] ** 2
    per_regime = by_regime and n_reg > 1
    if per_regime:
        counts = np.maximum(np.bincount(prob.regime, minlength=n_reg), 1)
        regime_mean = np.bincount(prob.regime, resid, n_reg) / counts
    # sums over the candidate pairs, a chunk of pairs at a time: the temporaries stay a
    # chunk long whatever the domain's size
    g, d = np.zeros(n_les), np.zeros(n_les)
    gr, dr = (np.zeros(n_les * n_reg), np.zeros(n_les * n_reg)) if per_regime else (None, None)
    has_pairs = np.zeros(n_les, dtype=bool)
    for part in _pair_chunks(cand.size):
        take = cand[part]
        if not take.any():
            continue
        li_c, ti_c, s_c = prob.li[part][take], prob.ti[part][take], prob.s[part][take]
        r_c = resid[ti_c]
        s2_c = s_c**2
        g += np.bincount(li_c, r_c * s_c, n_les)
        d += np.bincount(li_c, s2_c, n_les)
        has_pairs |= np.bincount(li_c, minlength=n_les) > 0
        if per_regime:
            reg_c = prob.regime[ti_c]
            key = li_c * n_reg + reg_c
            gr += np.bincount(key, (r_c - regime_mean[reg_c]) * s_c, n_les * n_reg)
            dr += np.bincount(key, s2_c, n_les * n_reg)
        del li_c, ti_c, s_c, r_c, s2_c
    with np.errstate(divide="ignore", invalid="ignore"):
        chi_any = np.where(d > 0, g * g / d, 0.0) / sigma2
    log_p = _chi2_logsf(chi_any, 1)
    regimes_of: dict[int, np.ndarray] = {}
    if per_regime:
        gr, dr = gr.reshape(n_les, n_reg), dr.reshape(n_les, n_reg)
        with np.errstate(divide="ignore", invalid="ignore"):
            chi_reg = np.where(dr > 0, gr * gr / dr, 0.0).sum(axis=1) / sigma2
            chi_common = np.where(dr.sum(axis=1) > 0, gr.sum(axis=1) ** 2 / dr.sum(axis=1), 0.0) / sigma2
        k_reg = (dr > 0).sum(axis=1)
        log_p_reg = _chi2_logsf(chi_reg, np.maximum(k_reg, 1))
        log_p_het = _chi2_logsf(np.maximum(chi_reg - chi_common, 0.0), np.maximum(k_reg - 1, 1))
        use_reg = (k_reg > 1) & (log_p_het < log_p_enter) & (log_p_reg < log_p)
        log_p = np.where(use_reg, log_p_reg, log_p)
        regimes_of = {int(les): np.flatnonzero(dr[les] > 0) for les in np.flatnonzero(use_reg)}
    ok = np.flatnonzero(has_pairs & (log_p < log_p_enter))
    if ok.size == 0:
        return []
    best = (
        pd.DataFrame({"lesson": ok, "factor": prob.factor_code[ok], "log_p": log_p[ok], "prio": prob.prio_of_lesson[ok]})
        .sort_values(["factor", "log_p", "prio"])
        .drop_duplicates("factor")["lesson"]
        .to_numpy()
    )
    return [(int(les), regimes_of.get(int(les))) for les in best]


def _fit_knobs(knobs: Mapping[str, float]) -> dict[str, float]:
    """The knobs a fit uses (and records), as floats; missing ones take the defaults."""
    return {
        "tau": float(knobs.get("tau", 0.95)),
        "g_min": float(knobs.get("g_min", 0.02)),
        "lambda_ci": float(knobs.get("lambda_ci", 0.5)),
        "tier2_enabled": float(bool(knobs.get("tier2_enabled", 1.0))),
        "tier3_topk": float(max(1, round(float(knobs.get("tier3_topk", 5))))),
    }


CI_Z = 1.96  # lambda_ci's bound is lambda_ci·CI_Z·se, as learning_lessons.edge_lcb


def ci_shrunk(coef: np.ndarray, se: np.ndarray, lambda_ci: float) -> np.ndarray:
    """``sign(coef)·max(|coef| − lambda_ci·CI_Z·se, 0)``: the edge pulled toward its lower confidence bound."""
    coef = np.asarray(coef, dtype=float)
    return np.sign(coef) * np.maximum(np.abs(coef) - lambda_ci * CI_Z * np.asarray(se, dtype=float), 0.0)


def _fit_rows(
    model: OverrideModel,
    lessons: pd.DataFrame,
    fits: pd.DataFrame | None,
    factors: pd.DataFrame | None,
    trades: pd.DataFrame,
    patterns: pd.DataFrame | None,
    scope: pd.DataFrame | None,
    metrics: pd.DataFrame | None,
    *,
    lesson_trades: pd.DataFrame | None = None,
    use_decay: bool = True,
    regime_split: bool = True,
    alpha: float = 0.05,
    z_enter: float | None = None,
    z_keep: float = 2.5,
    horizon_hours: float = 24.0 * 30,
    max_growth: float = 2.0,
    ridge: float = 1e-3,
    max_rounds: int | None = None,
) -> pd.DataFrame:
    """The rows of ``model`` (its knobs, now and metric term given); see the module docstring."""
    now = model.now
    tau = model.knobs["tau"]
    g_min = model.knobs["g_min"]
    lambda_ci = model.knobs["lambda_ci"]
    tier2 = model.tier2_enabled
    topk = int(model.knobs["tier3_topk"])
    if lessons.empty or trades.empty:
        return _empty_overrides()

    lessons = lessons.reset_index(drop=True).copy()
    if factors is not None and len(factors):
        fmap = factors.drop_duplicates("lesson_key").set_index("lesson_key")["latent_factor_id"]
        lessons["latent_factor_id"] = lessons["lesson_key"].map(fmap)
    missing = lessons["latent_factor_id"].isna()
    # a lesson without a factor stands alone (every lesson feeds exactly one factor)
    lessons.loc[missing, "latent_factor_id"] = "lf-" + lessons.loc[missing, "pattern"].astype(str)
    if lesson_trades is None:
        if patterns is None or scope is None:
            raise ValueError("patterns and scope are needed when lesson_trades is not given")
        lesson_trades = match_lessons(lessons, trades, patterns, scope)
    if lesson_trades.empty:
        return _empty_overrides()

    # -- per lesson: decay rate and anchor ------------------------------------
    fit_cols = ["lesson_key", "state", "decay_rate_per_hour", "half_life_hours", "e0", "t_ref"]
    if fits is not None and len(fits):
        fit_rows = lessons[["lesson_key"]].merge(
            fits[[c for c in fit_cols if c in fits.columns]], on="lesson_key", how="left"
        )
    else:
        fit_rows = pd.DataFrame({"lesson_key": lessons["lesson_key"], "state": None, "decay_rate_per_hour": np.nan})
    lam = pd.to_numeric(fit_rows["decay_rate_per_hour"], errors="coerce").to_numpy(float)
    shaped = fit_rows["state"].isin(["decaying", "improving"]).to_numpy() & np.isfinite(lam) & use_decay
    lam = np.where(shaped, lam, 0.0)
    last_seen_h = _hours_since(lessons["last_seen"], now)
    anchor = np.zeros(len(lessons))
    grow = lam < 0  # value at now, but no more than max_growth × the value at the last trade
    anchor[grow] = np.minimum(0.0, last_seen_h[grow] + math.log(max_growth) / (-lam[grow]))
    stale_days = np.maximum(0.0, -last_seen_h) / 24.0
    shrink = tau**stale_days

    # -- target: net of the metric term the apply adds --------------------------
    y = trades["return_r"].to_numpy(float)
    m_term = model.metric_term(trades, metrics)
    y = y - m_term
    regime_code, regimes = pd.factorize(trades["regime"].astype(str), sort=True)
    t_hours = _hours_since(trades["closed_at"], now)
    prob = _Problem(lessons, lesson_trades, y, regime_code, len(regimes), lam, anchor, t_hours)

    n_les, n_reg = prob.n_les, prob.n_regimes
    if z_enter is None:  # Bonferroni over the lessons
        z_enter = float(stats.norm.isf(alpha / (2.0 * max(n_les, 1))))
    log_p_enter = float(stats.norm.logsf(z_enter) + math.log(2.0))
    log_p_keep = float(stats.norm.logsf(z_keep) + math.log(2.0))
    max_rounds = max_rounds or 4 * topk + 4

    any_row = np.full(n_les, -1, dtype=np.int64)
    reg_row = np.full((n_les, n_reg), -1, dtype=np.int64)
    banned = np.zeros(n_les, dtype=bool)

    def rows_state() -> tuple[np.ndarray, int]:
        """Renumber rows 0..n-1 (any-rows first, then regime rows); pair rows and row count."""
        nonlocal any_row, reg_row
        sel_any = np.flatnonzero(any_row >= 0)
        # int32: pair_rows() gives every (lesson, trade) pair its row, tens of millions at 5M trades
        new_any = np.full(n_les, -1, dtype=np.int32)
        new_any[sel_any] = np.arange(sel_any.size)
        lr, rr = np.nonzero(reg_row >= 0)
        new_reg = np.full((n_les, n_reg), -1, dtype=np.int32)
        new_reg[lr, rr] = sel_any.size + np.arange(lr.size)
        any_row, reg_row = new_any, new_reg
        return prob.pair_rows(any_row, reg_row), sel_any.size + lr.size

    def row_lesson_regime() -> tuple[np.ndarray, np.ndarray]:
        n_rows = int((any_row >= 0).sum() + (reg_row >= 0).sum())
        les = np.empty(n_rows, dtype=np.int64)
        reg = np.full(n_rows, -1, dtype=np.int64)
        a = np.flatnonzero(any_row >= 0)
        les[any_row[a]] = a
        lr, rr = np.nonzero(reg_row >= 0)
        les[reg_row[lr, rr]] = lr
        reg[reg_row[lr, rr]] = rr
        return les, reg

    def refit() -> tuple[dict, np.ndarray, np.ndarray]:
        pair_row, n_rows = rows_state()
        win = prob.winners(pair_row)
        return prob.fit(win, pair_row, n_rows, ridge), pair_row, win

    def selected_per_factor() -> np.ndarray:
        has = (any_row >= 0) | (reg_row >= 0).any(axis=1)
        return np.bincount(prob.factor_code[has], minlength=len(prob.factor_names))

    # -- forward / backward stepwise ------------------------------------------
    result, pair_row, win = refit()
    # two phases: common edges first; per-regime entries only once they are fitted, as
    # before that the residual's regime means still carry unfitted lessons' effects
    regime_phase = False
    for _ in range(max_rounds):
        changed = False
        # forward: best candidate per factor on the current residual
        cur_prio = np.full(prob.n_cells, np.iinfo(prob.prio.dtype).max, dtype=prob.prio.dtype)
        cur_prio[prob.cell_inv[win]] = prob.prio[win]
        has_row = (any_row >= 0) | (reg_row >= 0).any(axis=1)
        open_factor = selected_per_factor() < topk
        cand = (~has_row[prob.li]) & (~banned[prob.li]) & open_factor[prob.pf] & (prob.prio < cur_prio[prob.cell_inv])
        if cand.any():
            added = _forward_candidates(prob, result, cand, log_p_enter, regime_split and regime_phase)
            if added:
                for lesson, regimes_of_lesson in added:
                    if regimes_of_lesson is None:
                        any_row[lesson] = 10**9  # placeholder, renumbered by rows_state()
                    else:
                        reg_row[lesson, regimes_of_lesson] = 10**9
                changed = True
                result, pair_row, win = refit()
        # backward: drop overrides the joint fit no longer supports (a lesson's regime
        # rows go together, by their joint Wald test); merge regime rows that no longer
        # differ back into one any-regime row
        les_of_row, reg_of_row = row_lesson_regime()
        with np.errstate(divide="ignore", invalid="ignore"):
            zrow = np.where(result["se"] > 0, result["coef"] / result["se"], 0.0)
        wald = np.bincount(les_of_row, zrow**2, n_les)
        k = np.bincount(les_of_row, minlength=n_les)
        weak_lesson = (k > 0) & (_chi2_logsf(wald, np.maximum(k, 1)) > log_p_keep)
        weak_lesson |= (k > 0) & (np.bincount(les_of_row, result["n_credited"], n_les) == 0)
        w = np.where(result["se"] > 0, 1.0 / np.maximum(result["se"], 1e-12) ** 2, 0.0)
        mean_c = np.bincount(les_of_row, w * result["coef"], n_les) / np.maximum(np.bincount(les_of_row, w, n_les), 1e-300)
        het = np.bincount(les_of_row, w * (result["coef"] - mean_c[les_of_row]) ** 2, n_les)
        split_les = np.bincount(les_of_row[reg_of_row >= 0], minlength=n_les) > 0
        merge = split_les & ~weak_lesson & (_chi2_logsf(het, np.maximum(k - 1, 1)) > log_p_keep)
        if weak_lesson.any() or merge.any():
            drop = np.flatnonzero(weak_lesson)
            any_row[drop] = -1
            reg_row[drop] = -1
            banned[drop] = True
            merged = np.flatnonzero(merge)
            reg_row[merged] = -1
            any_row[merged] = 10**9
            changed = True
            result, pair_row, win = refit()
        if not changed:
            if regime_split and not regime_phase:
                regime_phase = True
                continue
            break

    # -- regime split ---------------------------------------------------------
    if regime_split and n_reg > 1:
        les_of_row, reg_of_row = row_lesson_regime()
        rows_w = pair_row[win]
        reg_w = prob.regime[prob.ti[win]]
        key = rows_w * n_reg + reg_w
        n_rows = les_of_row.size
        # a regime's domain-wide offset (e.g. a strategy that underperforms in it) is
        # in every lesson's residual; only a lesson's *own* regime pattern earns a split
        resid = result["resid"]
        regime_mean = np.bincount(prob.regime, resid, n_reg) / np.maximum(np.bincount(prob.regime, minlength=n_reg), 1)
        resid_w = resid[prob.ti[win]] - regime_mean[reg_w]
        g = np.bincount(key, resid_w * prob.s[win], n_rows * n_reg).reshape(n_rows, n_reg)
        d = np.bincount(key, prob.s[win] ** 2, n_rows * n_reg).reshape(n_rows, n_reg)
        cnt = np.bincount(key, minlength=n_rows * n_reg).reshape(n_rows, n_reg)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d > 0, g * g / d, 0.0).sum(axis=1) / result["sigma"] ** 2
        df_q = (cnt >= 2).sum(axis=1) - 1
        pval = np.where(df_q > 0, stats.chi2.sf(q, np.maximum(df_q, 1)), 1.0)
        split = (reg_of_row < 0) & (df_q > 0) & (pval < alpha / max(n_rows, 1))
        if split.any():
            split_rows = np.flatnonzero(split)
            any_row[les_of_row[split_rows]] = -1
            rr, cc = np.nonzero(cnt[split_rows] > 0)  # one row per regime the lesson was credited in
            reg_row[les_of_row[split_rows][rr], cc] = 10**9
            result, pair_row, win = refit()

    # -- g_min: drop small edges, refit the rest --------------------------------
    for _ in range(3):
        les_of_row, reg_of_row = row_lesson_regime()
        edge = ci_shrunk(result["coef"], result["se"], lambda_ci) * shrink[les_of_row]
        small = (np.abs(edge) < g_min) | ~np.isfinite(edge)
        if not small.any():
            break
        any_row[les_of_row[small & (reg_of_row < 0)]] = -1
        reg_row[les_of_row[small & (reg_of_row >= 0)], reg_of_row[small & (reg_of_row >= 0)]] = -1
        result, pair_row, win = refit()
    les_of_row, reg_of_row = row_lesson_regime()
    edge = ci_shrunk(result["coef"], result["se"], lambda_ci) * shrink[les_of_row]
    keep = (np.abs(edge) >= g_min) & np.isfinite(edge)
    if not keep.any():
        return _empty_overrides()

    # -- rows -----------------------------------------------------------------
    rows_w = pair_row[win]
    credited_metric = np.bincount(rows_w, m_term[prob.ti[win]], les_of_row.size)
    n_credited = result["n_credited"]
    rate = np.maximum(lam[les_of_row], 0.0) + math.log(1.0 / tau) / 24.0
    with np.errstate(divide="ignore", invalid="ignore"):
        hours_valid = np.where(
            rate > 0, np.log(np.maximum(np.abs(edge), g_min) / g_min) / rate, horizon_hours
        )
    hours_valid = np.clip(np.nan_to_num(hours_valid, nan=horizon_hours), 0.0, horizon_hours)
    knob_view = {"tau": tau, "g_min": g_min, "lambda_ci": lambda_ci, "tier2_enabled": tier2, "tier3_topk": topk}
    out_rows = []
    for r in np.flatnonzero(keep):  # one dict per emitted override (output-sized loop)
        les = int(les_of_row[r])
        lrow = lessons.iloc[les]
        frow = fit_rows.iloc[les]
        t_ref = frow.get("t_ref") if "t_ref" in fit_rows.columns else None
        source = {
            "lessons": [lrow["lesson_key"]],
            "fits": [
                {
                    "lesson_key": lrow["lesson_key"],
                    "state": None if pd.isna(frow.get("state")) else str(frow.get("state")),
                    "decay_rate_per_hour": _num(frow.get("decay_rate_per_hour")),
                    "half_life_hours": _num(frow.get("half_life_hours")),
                    "e0": _num(frow.get("e0")),
                    "t_ref": None if t_ref is None or pd.isna(t_ref) else pd.Timestamp(t_ref).isoformat(),
                    "used_decay_rate_per_hour": float(lam[les]),
                }
            ],
            "latent_factor_id": str(lrow["latent_factor_id"]),
            "lesson_edge_mean": float(lrow["edge_mean"]),
            "coef_at_now": float(result["coef"][r]),
            "coef_se": float(result["se"][r]),
            "ci_shrink": float(min(abs(result["coef"][r]), lambda_ci * CI_Z * result["se"][r])),
            "n_credited_trades": int(n_credited[r]),
            "metric_adjustment": float(credited_metric[r] / n_credited[r]) if tier2 and n_credited[r] else 0.0,
            "stale_days": float(stale_days[les]),
            "tau_multiplier": float(shrink[les]),
            "now": now.isoformat(),
            "knobs": knob_view,
            "method": "joint least squares over factors, winner-per-factor design, decay shape from half_life_fits",
        }
        out_rows.append(
            {
                "latent_factor_id": str(lrow["latent_factor_id"]),
                "lesson_key": str(lrow["lesson_key"]),
                "pattern": str(lrow["pattern"]),
                "scope_json": str(lrow["scope_json"]),
                "n_scope_keys": int(lrow["n_scope_keys"]),
                "regime": None if reg_of_row[r] < 0 else str(regimes[reg_of_row[r]]),
                "edge": float(edge[r]),
                "support": int(lrow["n"]),
                "valid_until": now + pd.Timedelta(hours=float(hours_valid[r])),
                "source_json": json.dumps(source, sort_keys=True),
            }
        )
    out = pd.DataFrame(out_rows, columns=OVERRIDE_COLUMNS)
    out["valid_until"] = pd.to_datetime(out["valid_until"], utc=True)
    return out.sort_values(["latent_factor_id", "lesson_key", "regime"], na_position="first").reset_index(drop=True)


def _num(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------
# the model: fit and apply
# ---------------------------------------------------------------------------

KNOBS_RECORDED = "recorded with the overrides"


def _recorded_knobs(rows: pd.DataFrame) -> tuple[dict[str, float] | None, pd.Timestamp | None]:
    """(knobs, now) recorded in the rows' source_json: the first row that records them."""
    if rows is None or rows.empty or "source_json" not in rows.columns:
        return None, None
    for text in rows["source_json"].dropna():
        try:
            source = json.loads(text)
            knobs = source["knobs"]
            if not isinstance(knobs, Mapping) or "tier2_enabled" not in knobs:
                continue
            values = {str(k): float(v) for k, v in knobs.items()}
        except (ValueError, KeyError, TypeError):
            continue
        now = source.get("now")
        try:
            now = None if now is None else _utc(now)
        except (ValueError, TypeError):
            now = None
        return values, now
    return None, None


@dataclass
class OverrideModel:
    """A domain's overrides as one model: the rows, the regime weights, the knobs, now.

    ``rows``: pm_overrides rows (without ``domain``); ``regime_weights``:
    learning_regime_weights rows (the tier-2 metric term; may be None); ``knobs``: the
    knobs the rows were fitted with (tau, g_min, lambda_ci, tier2_enabled, tier3_topk; only
    ``tier2_enabled`` matters to the apply); ``now``: the newest closed_at the model
    learned from — every edge is already decayed to it (None: not recorded);
    ``knobs_source``: where ``knobs`` came from ("fit", :data:`KNOBS_RECORDED`, or the
    fallback's source, e.g. a ``KnobsInEffect.source``).
    """

    rows: pd.DataFrame
    regime_weights: pd.DataFrame | None
    knobs: dict[str, float]
    now: pd.Timestamp | None
    knobs_source: str = "fit"
    version: int | None = None  # the stored overrides version the rows are (None: the current table / a fresh fit)

    # -- the rules written once ----------------------------------------------
    @staticmethod
    def now_of(trades: pd.DataFrame) -> pd.Timestamp:
        """THE "now" rule: the newest closed_at of the trades learned from (no trades: the clock)."""
        return _utc(trades["closed_at"].max()) if len(trades) else pd.Timestamp.now(tz="UTC")

    @property
    def tier2_enabled(self) -> bool:
        return bool(self.knobs.get("tier2_enabled", 1.0))

    def metric_term(self, trades: pd.DataFrame, metrics: pd.DataFrame | None) -> np.ndarray:
        """The tier-2 term per trade (aligned with ``trades``): 0 when tier2 is off or nothing is weighted."""
        if self.tier2_enabled and self.regime_weights is not None and len(self.regime_weights) and metrics is not None:
            return regime_core.metric_term(trades, metrics, self.regime_weights)
        return np.zeros(len(trades))

    # -- building -------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        lessons: pd.DataFrame,
        fits: pd.DataFrame | None,
        factors: pd.DataFrame | None,
        regime_weights: pd.DataFrame | None,
        trades: pd.DataFrame,
        patterns: pd.DataFrame | None,
        scope: pd.DataFrame | None,
        metrics: pd.DataFrame | None,
        *,
        knobs: Mapping[str, float],
        now: object | None = None,
        **options,
    ) -> OverrideModel:
        """Fit the overrides on the training trades; see the module docstring for the method.

        ``lessons``: the learning_lessons rows (``latent_factor_id`` may be null when
        ``factors`` is given); ``fits``: half_life_fits rows (None: no decay);
        ``factors``: latent_factors rows (lesson_key, latent_factor_id), overriding the
        lessons' column; ``regime_weights``: learning_regime_weights rows (used when
        ``knobs['tier2_enabled']``). ``trades``/``patterns``/``scope``/``metrics``: the
        training trades' source tables (``patterns``/``scope`` may be None when the
        ``lesson_trades`` option gives the lessons' incidence). ``knobs``: tau, g_min, lambda_ci, tier2_enabled,
        tier3_topk. ``now``: None applies :meth:`now_of` to ``trades``. ``options``:
        ``lesson_trades`` (the incidence, computed if None), ``use_decay=False``
        (ignore the fitted half-lives: the comparison baseline), ``regime_split``,
        ``alpha``, ``z_enter``, ``z_keep``, ``horizon_hours``, ``max_growth``,
        ``ridge``, ``max_rounds``.
        """
        check_trades_frame(trades, ("trade_id", "closed_at", "regime", "return_r"))
        model = cls(
            rows=_empty_overrides(),
            regime_weights=regime_weights,
            knobs=_fit_knobs(knobs),
            now=cls.now_of(trades) if now is None else _utc(now),
        )
        model.rows = _fit_rows(model, lessons, fits, factors, trades, patterns, scope, metrics, **options)
        return model

    @classmethod
    def from_rows(
        cls,
        overrides: pd.DataFrame | None,
        regime_weights: pd.DataFrame | None,
        fallback_knobs: Mapping[str, float] | None = None,
        *,
        fallback_source: str = "fallback",
    ) -> OverrideModel:
        """A stored model: its knobs (and now) as recorded in the rows' source_json.

        ``fallback_knobs`` (None: the defaults) apply only when no row records its
        knobs — e.g. a domain without overrides, where the knobs in effect decide
        whether the metric term is added.
        """
        rows = overrides.reset_index(drop=True) if overrides is not None else _empty_overrides()
        knobs, now = _recorded_knobs(rows)
        version = int(rows["version"].iloc[0]) if "version" in rows and len(rows) and pd.notna(rows["version"].iloc[0]) else None
        if knobs is not None:
            return cls(rows, regime_weights, knobs, now, KNOBS_RECORDED, version)
        if fallback_knobs is None:
            fallback_knobs, fallback_source = default_knobs(), "defaults"
        return cls(rows, regime_weights, {str(k): float(v) for k, v in fallback_knobs.items()}, None, fallback_source,
                   version)

    def with_knobs(self, source: str, **knobs: float) -> OverrideModel:
        """A copy with some knobs set explicitly (e.g. a caller's tier2_enabled)."""
        return dataclasses.replace(self, knobs={**self.knobs, **{k: float(v) for k, v in knobs.items()}},
                                   knobs_source=source)

    # -- applying -------------------------------------------------------------
    def _winners(
        self, trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray]:
        """(trade index, override row) of each (factor, trade) cell's winning override, in cell order."""
        none = np.zeros(0, dtype=np.int64)
        ov = self.rows
        if not len(trades) or ov is None or not len(ov):
            return none, none
        # lessons of the rows (rows of one lesson share its factor, scope keys and support)
        first_row = ~ov["lesson_key"].duplicated().to_numpy()
        uniq = ov.loc[first_row, ["lesson_key", "n_scope_keys", "support"]].reset_index(drop=True)
        pairs = match_lessons(uniq[["lesson_key", "n_scope_keys"]], trades, patterns, scope)
        if not len(pairs):
            return none, none
        row_factor = pd.factorize(ov["latent_factor_id"].astype(str))[0]
        les_factor = row_factor[first_row]
        les_of_row = pd.Index(uniq["lesson_key"]).get_indexer(ov["lesson_key"])
        # each lesson's any-regime row and per-regime rows (several rows in one slot: the first in precedence)
        trade_regime, regimes = pd.factorize(trades["regime"].astype(str))
        regime_any = pd.isna(ov["regime"]).to_numpy()
        reg_of_row = np.where(regime_any, -1, pd.Index(regimes).get_indexer(ov["regime"].astype(str)))
        usable = np.flatnonzero(regime_any | (reg_of_row >= 0))  # a regime no trade is in matches nothing
        n_reg = len(regimes)
        rank = precedence_rank(ov["n_scope_keys"], ov["support"], ov["lesson_key"], regime_any)
        by_rank = usable[np.argsort(rank[usable])]
        slot = les_of_row[by_rank] * (n_reg + 1) + reg_of_row[by_rank] + 1
        chosen = by_rank[np.unique(slot, return_index=True)[1]]
        any_row = np.full(len(uniq), -1, dtype=np.int64)
        reg_row = np.full((len(uniq), n_reg), -1, dtype=np.int64)
        is_any = reg_of_row[chosen] < 0
        any_row[les_of_row[chosen[is_any]]] = chosen[is_any]
        reg_row[les_of_row[chosen[~is_any]], reg_of_row[chosen[~is_any]]] = chosen[~is_any]

        li = pairs["lesson_idx"].to_numpy(np.int64)
        ti = pairs["trade_idx"].to_numpy(np.int64)
        pair_row = _row_of_pair(any_row, reg_row, li, li * n_reg + trade_regime[ti])
        les_rank = precedence_rank(uniq["n_scope_keys"], uniq["support"], uniq["lesson_key"])
        cells = _Cells(les_factor[li], ti, les_rank[li], len(trades), len(uniq))
        win = cells.winners(pair_row >= 0)
        return ti[win], pair_row[win]

    def winning_overrides(self, trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame) -> pd.DataFrame:
        """Per trade and factor, the override that applies: trade_id, latent_factor_id, lesson_key, regime, edge."""
        check_trades_frame(trades, ("trade_id", "regime"))
        ti, row = self._winners(trades, patterns, scope)
        chosen = self.rows.iloc[row] if len(row) else _empty_overrides()
        return pd.DataFrame({
            "trade_id": trades["trade_id"].astype(str).to_numpy()[ti],
            "latent_factor_id": chosen["latent_factor_id"].to_numpy(),
            "lesson_key": chosen["lesson_key"].to_numpy(),
            "regime": chosen["regime"].to_numpy(),
            "edge": chosen["edge"].to_numpy(float),
        })

    def predict(
        self, trades: pd.DataFrame, patterns: pd.DataFrame, scope: pd.DataFrame, metrics: pd.DataFrame | None
    ) -> pd.Series:
        """Each trade's edge, exactly as DESIGN specifies; Series trade_id → edge."""
        check_trades_frame(trades, ("trade_id", "regime"))
        edge = np.zeros(len(trades))
        ti, row = self._winners(trades, patterns, scope)
        if len(row):
            edge += np.bincount(ti, self.rows["edge"].to_numpy(float)[row], len(trades))
        edge += self.metric_term(trades, metrics)
        return pd.Series(edge, index=pd.Index(trades["trade_id"].astype(str), name="trade_id"), name="edge")


def materialize_overrides(
    lessons: pd.DataFrame,
    fits: pd.DataFrame | None,
    factors: pd.DataFrame | None,
    regime_weights: pd.DataFrame | None,
    trades: pd.DataFrame,
    patterns: pd.DataFrame | None,
    scope: pd.DataFrame | None,
    metrics: pd.DataFrame | None,
    *,
    knobs: Mapping[str, float],
    now: object,
    **options,
) -> pd.DataFrame:
    """Rows of ``pm_overrides`` (without ``domain``): ``OverrideModel.fit(...).rows``."""
    return OverrideModel.fit(
        lessons, fits, factors, regime_weights, trades, patterns, scope, metrics, knobs=knobs, now=now, **options
    ).rows


def predict(
    overrides: pd.DataFrame,
    regime_weights: pd.DataFrame | None,
    trades: pd.DataFrame,
    patterns: pd.DataFrame | None,
    scope: pd.DataFrame | None,
    metrics: pd.DataFrame | None,
    *,
    tier2_enabled: bool = True,
) -> pd.Series:
    """Each trade's edge under ``overrides`` with an explicit tier2 flag: ``OverrideModel.predict``."""
    model = OverrideModel(overrides, regime_weights, {"tier2_enabled": float(bool(tier2_enabled))}, None, "given")
    return model.predict(trades, patterns, scope, metrics)


def predict_sum_all_lessons(
    lessons: pd.DataFrame,
    trades: pd.DataFrame,
    patterns: pd.DataFrame,
    scope: pd.DataFrame,
    *,
    g_min: float = 0.0,
    regime_weights: pd.DataFrame | None = None,
    metrics: pd.DataFrame | None = None,
) -> pd.Series:
    """The old materializer's prediction: the sum of every matching lesson's raw edge_mean.

    (|edge_mean| < g_min skipped; metric term added when regime weights are given.)
    """
    edge = np.zeros(len(trades))
    if len(lessons) and len(trades):
        pairs = match_lessons(lessons, trades, patterns, scope)
        e = lessons["edge_mean"].to_numpy(float)
        e = np.where(np.abs(e) >= g_min, e, 0.0)
        edge += np.bincount(pairs["trade_idx"].to_numpy(np.int64), e[pairs["lesson_idx"].to_numpy(np.int64)], len(trades))
    if regime_weights is not None and metrics is not None:
        edge += regime_core.metric_term(trades, metrics, regime_weights)
    return pd.Series(edge, index=pd.Index(trades["trade_id"].astype(str), name="trade_id"), name="edge")
