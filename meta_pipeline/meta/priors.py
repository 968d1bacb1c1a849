"""Knob priors: per-domain priors from telemetry, the cross-domain global prior, and the
few-shot warm start of a new domain. Pure numpy/pandas, no Dagster.

Everything cross-domain happens in the knobs' unit space (``knobs_to_unit``: each knob
mapped to [0, 1] by its bounds), so a knob with a wide range does not dominate one with
a narrow range; results are mapped back with ``unit_to_knobs`` (clipped to bounds, int
knobs rounded, bool knobs thresholded at ½).

Per domain (``domain_priors``), for each knob seen in the telemetry:

* ``mean`` / ``std`` — the reward-weighted distribution of the knob's values. Weights are
  ``softmax(z / temperature)`` with ``z`` the tick's reward standardized within the
  domain: scale-free (a domain whose rewards are all shifted or scaled gets the same
  weights) and smooth (no hard cut-off). Temperature ½ gives a tick one reward-σ above
  average e² ≈ 7.4× the weight of an average tick.
* ``best_value`` — where the knob's reward is highest. Estimated from a separable
  quadratic response surface ``reward ≈ a + Σ_k b_k·u_k + c_k·u_k²`` (``meta.surface``,
  centred on the mean) fitted jointly over all varying knobs (so a knob correlated with another one is not credited with its
  effect). When a knob's curvature is significantly negative (t < −2) its optimum is the
  vertex ``−b/(2c)``, clipped to the range actually observed (no extrapolation). Else —
  a flat or monotone response, too few ticks, bool knobs without a significant effect —
  the robust fallback is the mean knob value over the top-decile reward ticks (at least
  ``min_top`` ticks). A bool knob with a significant linear effect takes 1 or 0.
  Column ``best_method`` says which estimate was used (``vertex``, ``sign``, ``top``).
* ``best_reward`` — mean reward of the top-decile ticks (observed, not extrapolated);
  ``reward_mean`` — mean reward of all the knob's ticks; ``n_obs`` — ticks that report
  the knob.

Global prior (``aggregate_global_prior``), per domain d a vector θ_d (its ``best_value``s
in unit space) and a weight

    w_d ∝ m_d · exp(s_d / β),   s_d = log n_d + κ·(r_d − median r),   m_d = exp(−D_d / σ)

which is the maximiser of ``Σ_d w_d·s_d + β·H(w | m)`` over the simplex (entropy
relative to the shift-based measure m). ``n_d`` is the domain's evidence (ticks), ``r_d``
its best reward, ``D_d`` its median domain-shift distance to the other domains and σ the
fleet's median of those. β = 1 makes weights evidence-proportional; the default β = 2
gives ``w ∝ √n``, so one domain with 100× the ticks of each other domain counts 10×, not
100×; β → 0 gives all weight to the top-scoring domain; β → ∞ gives equal weights.
Then robust outlier filtering per knob: a domain whose θ_{d,k} has robust z
``|θ − median| / max(1.4826·MAD, floor) > outlier_z`` is excluded from that knob's
mean; a domain excluded on at least half the knobs is dropped altogether. The weighted
mean per knob is the Reptile target; the first version IS that mean, later versions
move ``θ ← θ + ε·(target − θ)`` (``reptile.reptile_step``) with ε annealed linearly over
versions (``reptile.annealed_epsilon``), so the prior settles instead of chasing every
new batch. ``build_global_prior`` is the whole step the ``global_prior`` asset runs: the
tables in (domain priors, telemetry for the shift distances, the previous version), the
new version's rows out.

Few-shot warm start (``warm_start_prior``): once a new domain has a little telemetry,
its shift distance to each known domain tells which domains it resembles. The prior
it starts from blends the global prior with the distance-weighted mean of its k nearest
domains' priors: ``θ = (1−λ)·θ_global + λ·θ_knn``, ``λ = λ_max·(1 − d̄_knn / d̄_all)``,
so λ is 0 when the nearest domains are no closer than the fleet at large (nothing to
gain over the global prior) and approaches λ_max when they are near-identical.

The wired warm start (``choose_warm_start`` / ``warm_start_new_domain``, used by the
controller's cold start through ``meta.warm_start``): the k nearest known domains count
only when "close" (within 2 × max(the fleet's median nearest-neighbour distance, the noise
floor of a few ticks)); no close domain means the global prior. ``warm_start_unit`` is the
same rule on arrays (the 1,000-task evaluation).

The global prior's own canary (``next_global_prior``): the fleet's decision rewards are
attributed to the version in effect when they were decided (``fleet_reward_by_version``);
when the fleet did significantly worse under the newest version than under the one before
(``prior_rollback_verdict``, paired by domain), the next version restores the previous one,
and the build after a rollback takes a halved Reptile step.

Early negative-transfer check (``early_negative_transfer``): the global prior records
the lowest best reward among the domains it was built from (``expected_reward_low``). A
new domain whose first rewards at the prior fall clearly below it (beyond a margin and
two noise standard errors) is not like any of them: drop the prior, tune from scratch.
It needs 2 ticks, where the controller's own guard needs its exploration window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import knob_column
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, knobs_to_unit, unit_to_knobs
from meta_pipeline.meta.reptile import annealed_epsilon, reptile_step
from meta_pipeline.meta.reward import telemetry_reward
from meta_pipeline.meta.shift import pairwise_shift_distances
from meta_pipeline.meta.surface import quadratic_design, ridge_solve

if TYPE_CHECKING:
    from meta_pipeline.store import GlobalPriorVersion

PRIOR_COLUMNS = ["knob", "mean", "std", "n_obs", "best_value", "best_reward", "reward_mean"]
CENTERS = ("best_value", "mean")


# ---------------------------------------------------------------------------
# Per-domain priors
# ---------------------------------------------------------------------------


def reward_weights(reward: np.ndarray, temperature: float = 0.5) -> np.ndarray:
    """softmax(z / temperature) of the within-sample standardized reward; sums to 1."""
    r = np.asarray(reward, dtype=float)
    if r.size == 0:
        return r
    sd = r.std()
    if not np.isfinite(sd) or sd < 1e-12:
        return np.full(r.size, 1.0 / r.size)  # no reward signal: every tick counts the same
    z = (r - r.mean()) / sd
    logits = z / max(float(temperature), 1e-9)
    w = np.exp(logits - logits.max())
    return w / w.sum()


def _top_rows(reward: np.ndarray, top_fraction: float, min_top: int) -> np.ndarray:
    n = reward.size
    k = min(n, max(int(min_top), int(math.ceil(top_fraction * n))))
    return np.argsort(-reward, kind="stable")[:k]


def _quadratic_optima(u: np.ndarray, reward: np.ndarray, kinds: list[str], min_ticks_per_param: int = 4):
    """Joint separable quadratic fit of reward on unit-space knobs (rows complete).

    Returns (value, method) per column: the vertex where curvature is significantly
    negative, 1/0 for a bool with a significant linear effect, else NaN ("top" fallback).
    """
    n, k = u.shape
    values = np.full(k, np.nan)
    methods = ["top"] * k
    varying = np.flatnonzero(u.std(axis=0) > 1e-6)
    n_params = 1 + sum(1 if kinds[j] == "bool" else 2 for j in varying)
    if varying.size == 0 or n < max(12, min_ticks_per_param * n_params):
        return values, methods
    center = u.mean(axis=0)
    # around the mean (so the linear terms are the slopes there); no square for a 0/1 knob
    design = quadratic_design(u[:, varying], [kinds[j] for j in varying], center=center[varying])
    fit = ridge_solve(design.matrix, reward, 1e-8 * n, with_cov=True)  # tiny ridge: near-collinear knobs stay solvable
    beta = fit.beta
    t = beta / np.sqrt(np.maximum(np.diag(fit.cov), 1e-300))
    for i, j in enumerate(varying):
        lin, sq = design.linear[i], design.square[i]
        b, t_b = beta[lin], t[lin]
        if kinds[j] == "bool":
            if abs(t_b) > 2.0:
                values[j], methods[j] = (1.0 if b > 0 else 0.0), "sign"
            continue
        c, t_c = beta[sq], t[sq]
        if c < 0 and t_c < -2.0:
            vertex = center[j] - b / (2.0 * c)
            values[j] = float(np.clip(vertex, u[:, j].min(), u[:, j].max()))
            methods[j] = "vertex"
    return values, methods


def domain_priors(
    telemetry_df: pd.DataFrame,
    *,
    temperature: float = 0.5,
    top_fraction: float = 0.1,
    min_top: int = 5,
) -> pd.DataFrame:
    """Per knob, the reward-weighted distribution of its values in one domain's telemetry.

    Columns: PRIOR_COLUMNS + ``best_method``; one row per knob that at least one tick
    reports (knobs never reported have no row). Values are in knob units. An empty
    telemetry frame gives an empty frame with these columns.
    """
    out_cols = [*PRIOR_COLUMNS, "best_method"]
    if telemetry_df is None or len(telemetry_df) == 0:
        return pd.DataFrame(columns=out_cols)
    reward = telemetry_reward(telemetry_df)
    names = [n for n in KNOB_NAMES if knob_column(telemetry_df, n) is not None]
    values = np.column_stack(
        [pd.to_numeric(telemetry_df[knob_column(telemetry_df, n)], errors="coerce").to_numpy(float) for n in names]
    ) if names else np.empty((len(telemetry_df), 0))
    unit = np.column_stack([(values[:, j] - KNOBS[n].low) / (KNOBS[n].high - KNOBS[n].low)
                            for j, n in enumerate(names)]) if names else values
    ok_reward = np.isfinite(reward)

    # the response surface uses ticks where the reward and every reported knob are known
    reported = [j for j in range(len(names)) if np.isfinite(values[ok_reward, j]).any()]
    complete = ok_reward & np.isfinite(values[:, reported]).all(axis=1) if reported else ok_reward
    vertex = np.full(len(names), np.nan)
    methods = ["top"] * len(names)
    if reported and complete.sum() > 0:
        v, m = _quadratic_optima(unit[np.ix_(complete, reported)], reward[complete],
                                 [KNOBS[names[j]].kind for j in reported])
        for i, j in enumerate(reported):
            vertex[j], methods[j] = v[i], m[i]

    rows = []
    for j, name in enumerate(names):
        ok = ok_reward & np.isfinite(values[:, j])
        if not ok.any():
            continue
        x, r = values[ok, j], reward[ok]
        w = reward_weights(r, temperature)
        if np.ptp(x) == 0:  # a constant knob: exactly its value, no spread (no rounding of Σw ≈ 1)
            mean, std = float(x[0]), 0.0
        else:
            mean = float(w @ x)
            std = float(np.sqrt(max(w @ (x - mean) ** 2, 0.0)))
        top = _top_rows(r, top_fraction, min_top)
        spec = KNOBS[name]
        if np.isfinite(vertex[j]):
            best, method = spec.low + vertex[j] * (spec.high - spec.low), methods[j]
        else:
            best, method = float(x[top].mean()), "top"
        rows.append(
            {
                "knob": name,
                "mean": mean,
                "std": std,
                "n_obs": int(ok.sum()),
                "best_value": float(best),
                "best_reward": float(r[top].mean()),
                "reward_mean": float(r.mean()),
                "best_method": method,
            }
        )
    return pd.DataFrame(rows, columns=out_cols)


def priors_by_domain(priors_long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Split the ``domain_priors`` table (a ``domain`` column) into one frame per domain."""
    if priors_long is None or priors_long.empty:
        return {}
    return {str(d): g.drop(columns="domain").reset_index(drop=True) for d, g in priors_long.groupby("domain", sort=True)}


def prior_vector(prior_df: pd.DataFrame, center: str = "best_value") -> np.ndarray:
    """A domain prior as a unit-space vector in KNOB_NAMES order (NaN for knobs it lacks)."""
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}")
    out = np.full(len(KNOB_NAMES), np.nan)
    if prior_df is None or prior_df.empty:
        return out
    by_knob = prior_df.set_index("knob")[center]
    for j, name in enumerate(KNOB_NAMES):
        if name in by_knob.index and np.isfinite(by_knob[name]):
            out[j] = float(np.clip(KNOBS[name].to_unit(by_knob[name]), 0.0, 1.0))
    return out


def _evidence(prior_df: pd.DataFrame) -> float:
    return float(prior_df["n_obs"].max()) if prior_df is not None and len(prior_df) else 0.0


def _best_reward(prior_df: pd.DataFrame) -> float:
    if prior_df is None or prior_df.empty or "best_reward" not in prior_df:
        return float("nan")
    r = pd.to_numeric(prior_df["best_reward"], errors="coerce").to_numpy(float)
    r = r[np.isfinite(r)]
    return float(r.mean()) if r.size else float("nan")


# ---------------------------------------------------------------------------
# Global prior
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalPriorConfig:
    """Knobs of the aggregation (see the module docstring for the formula)."""

    beta: float = 2.0  # entropy temperature: 1 = evidence-proportional, larger = flatter, 0 = argmax
    reward_coef: float = 5.0  # κ: a domain whose best reward is 0.1 higher scores +0.5
    outlier_z: float = 3.5  # robust z above which a domain's knob value is excluded
    mad_floor: float = 0.05  # unit-space floor on 1.4826·MAD, so near-identical domains do not make
    #                          every small difference an "outlier"
    outlier_domain_fraction: float = 0.5  # excluded on ≥ this share of knobs → domain dropped
    min_domains_for_outliers: int = 3  # with fewer domains nobody can be told apart as the odd one
    shift_sigma: float | None = None  # scale of exp(−D/σ); None = the fleet's median distance
    eps0: float = 0.5  # Reptile step of version 2
    eps_min: float = 0.1  # floor the step anneals to
    anneal_versions: int = 20  # versions over which ε goes from eps0 to eps_min
    center: str = "best_value"  # which per-domain estimate is θ_d

    def __post_init__(self) -> None:
        if self.beta < 0 or not np.isfinite(self.beta):
            raise ValueError("beta must be finite and >= 0")
        if self.center not in CENTERS:
            raise ValueError(f"center must be one of {CENTERS}")
        if not (0 <= self.eps_min <= self.eps0 <= 1):
            raise ValueError("need 0 <= eps_min <= eps0 <= 1")


def entropy_weights(scores: np.ndarray, beta: float, base_measure: np.ndarray | None = None) -> np.ndarray:
    """argmax_w Σ w·s + β·H(w | m) over the simplex = m·exp(s/β), normalized.

    β = 0 puts all weight on the best score (ties share it).
    """
    s = np.asarray(scores, dtype=float)
    m = np.ones_like(s) if base_measure is None else np.asarray(base_measure, dtype=float)
    if s.size == 0:
        return s
    if beta == 0:
        allowed = m > 0
        if not allowed.any():
            raise ValueError("every domain has zero base weight")
        best = allowed & (s == s[allowed].max())
        return best / best.sum()
    allowed = m > 0
    if not allowed.any():
        raise ValueError("every domain has zero base weight")
    logits = np.where(allowed, s / beta + np.log(np.where(allowed, m, 1.0)), -np.inf)
    w = np.exp(logits - logits[allowed].max())  # exactly 0 where m = 0 (a dropped domain)
    return w / w.sum()


def robust_z(values: np.ndarray, mad_floor: float) -> np.ndarray:
    """|x − median| / max(1.4826·MAD, floor) per column, ignoring NaN (NaN stays NaN)."""
    med = np.nanmedian(values, axis=0)
    mad = 1.4826 * np.nanmedian(np.abs(values - med), axis=0)
    return np.abs(values - med) / np.maximum(mad, mad_floor)


def _shift_per_domain(shift_distances: Any, domains: list[str]) -> np.ndarray:
    """Accept a square pairwise frame, a Series/Mapping domain→distance, or None."""
    if shift_distances is None:
        return np.full(len(domains), np.nan)
    if isinstance(shift_distances, pd.DataFrame):
        names = [d for d in domains if d in shift_distances.index]
        sub = shift_distances.loc[names, names].to_numpy(float).copy()
        if len(names) > 1:
            np.fill_diagonal(sub, np.nan)
            rest = dict(zip(names, np.nanmedian(sub, axis=1)))
        else:
            rest = {n: 0.0 for n in names}
        return np.array([rest.get(d, np.nan) for d in domains], dtype=float)
    mapping = dict(shift_distances.items()) if hasattr(shift_distances, "items") else dict(shift_distances)
    return np.array([float(mapping.get(d, np.nan)) for d in domains], dtype=float)


@dataclass
class Aggregation:
    """The arrays of one aggregation step (``aggregate_arrays``), domains in the order given."""

    theta_unit: np.ndarray  # the new prior, unit space (K)
    target: np.ndarray  # the Reptile target: the weighted mean of the domains (K)
    epsilon: float
    weights: np.ndarray  # per domain (D), 0 for a dropped outlier
    scores: np.ndarray
    shift_weight: np.ndarray
    sigma: float
    excluded: np.ndarray  # D × K: the domain's value was left out of that knob's mean
    dropped: np.ndarray  # D: the domain was dropped altogether
    z: np.ndarray  # D × K robust z


def aggregate_arrays(
    theta_d: np.ndarray,
    n_obs: np.ndarray,
    best_r: np.ndarray,
    dist: np.ndarray,
    previous_unit: np.ndarray | None,
    version: int,
    config: GlobalPriorConfig | None = None,
    epsilon_scale: float = 1.0,
) -> Aggregation:
    """``aggregate_global_prior``'s math on arrays (D domains × K knobs, unit space).

    ``dist``: each domain's median shift distance to the others (NaN = unknown);
    ``previous_unit``: the previous version in unit space (None = version 1);
    ``epsilon_scale``: multiplies the annealed Reptile step (the back-off after a
    rollback of the prior, see ``next_global_prior``). No pandas: the 1,000-task
    evaluation calls it once per task.
    """
    cfg = config or GlobalPriorConfig()
    theta_d = np.asarray(theta_d, dtype=float)
    r_centered = np.where(np.isfinite(best_r), best_r - np.nanmedian(best_r) if np.isfinite(best_r).any() else 0.0, 0.0)
    scores = np.log(np.maximum(n_obs, 1.0)) + cfg.reward_coef * r_centered

    # shift: far-from-the-rest domains weigh less; unknown distance = neutral (the median)
    known = np.isfinite(dist)
    med_d = float(np.median(dist[known])) if known.any() else 0.0
    dist_filled = np.where(known, dist, med_d)
    sigma = cfg.shift_sigma if cfg.shift_sigma is not None else (med_d if med_d > 1e-12 else 1.0)
    # relative to the closest domain: only ratios matter, and this cannot underflow to all-zero
    shift_w = np.exp(-(dist_filled - dist_filled.min()) / sigma)

    # robust outlier filtering per knob, in unit space
    if len(theta_d) >= cfg.min_domains_for_outliers:
        z = robust_z(theta_d, cfg.mad_floor)
        excluded = np.nan_to_num(z, nan=0.0) > cfg.outlier_z
    else:
        z = np.zeros_like(theta_d)
        excluded = np.zeros_like(theta_d, dtype=bool)
    n_reported = np.isfinite(theta_d).sum(axis=1)
    dropped = excluded.sum(axis=1) >= cfg.outlier_domain_fraction * np.maximum(n_reported, 1)
    dropped &= excluded.any(axis=1)
    if dropped.all():  # cannot drop everyone: then nobody is an outlier
        dropped[:] = False

    weights = entropy_weights(scores, cfg.beta, shift_w * (~dropped))
    per_knob = weights[:, None] * (~excluded) * np.isfinite(theta_d)
    col_sum = per_knob.sum(axis=0)
    # a knob nobody reports keeps the previous value (or its default on version 1)
    fallback = previous_unit if previous_unit is not None else knobs_to_unit({})
    target = np.where(
        col_sum > 0,
        np.nansum(per_knob * np.nan_to_num(theta_d), axis=0) / np.where(col_sum > 0, col_sum, 1.0),
        fallback,
    )
    if version == 1 or previous_unit is None:
        epsilon = 1.0  # first version: the weighted mean itself
        theta_unit = target.copy()
    else:
        epsilon = annealed_epsilon(version - 2, cfg.eps0, cfg.eps_min, cfg.anneal_versions) * float(epsilon_scale)
        theta_unit = reptile_step(previous_unit, target[None, :], epsilon)
    theta_unit = np.clip(theta_unit, 0.0, 1.0)
    return Aggregation(theta_unit, target, float(epsilon), weights, scores, shift_w, float(sigma), excluded,
                       dropped, z)


def aggregate_global_prior(
    domain_priors_by_domain: Mapping[str, pd.DataFrame],
    shift_distances: pd.DataFrame | pd.Series | Mapping[str, float] | None,
    previous_theta: Mapping[str, float] | None,
    version: int,
    config: GlobalPriorConfig | None = None,
    epsilon_scale: float = 1.0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Aggregate domain priors into global prior ``version`` (1 = first).

    ``previous_theta``: the previous version's knob values (preferably the continuous
    ``details["theta_continuous"]`` of that version, so int/bool rounding does not stall
    the Reptile step); ignored for version 1. ``epsilon_scale`` multiplies the Reptile
    step (1 = as annealed). Returns (knob → bounded value, details).
    Raises ValueError when no domain has a usable prior.
    """
    cfg = config or GlobalPriorConfig()
    if version < 1:
        raise ValueError("version must be >= 1")
    domains = sorted(d for d, p in domain_priors_by_domain.items() if p is not None and len(p))
    if not domains:
        raise ValueError("no domain has a prior: materialize domain_priors for at least one domain with telemetry")
    theta_d = np.vstack([prior_vector(domain_priors_by_domain[d], cfg.center) for d in domains])  # D × K
    n_obs = np.array([_evidence(domain_priors_by_domain[d]) for d in domains])
    best_r = np.array([_best_reward(domain_priors_by_domain[d]) for d in domains])
    dist = _shift_per_domain(shift_distances, domains)
    known = np.isfinite(dist)
    previous_unit = (np.array([KNOBS[n].to_unit(previous_theta.get(n, KNOBS[n].default)) for n in KNOB_NAMES])
                     if previous_theta else None)
    agg = aggregate_arrays(theta_d, n_obs, best_r, dist, previous_unit, version, cfg, epsilon_scale)
    weights, theta_unit, target, dropped, excluded, z = (agg.weights, agg.theta_unit, agg.target, agg.dropped,
                                                          agg.excluded, agg.z)
    theta = unit_to_knobs(theta_unit)
    continuous = {n: KNOBS[n].low + u * (KNOBS[n].high - KNOBS[n].low) for n, u in zip(KNOB_NAMES, theta_unit)}

    # what the prior should deliver: the included domains' best observed reward (for the
    # early negative-transfer check of a domain that starts from this prior)
    included = (weights > 0) & np.isfinite(best_r)
    expected = float(np.sum(weights[included] * best_r[included]) / weights[included].sum()) if included.any() else None
    expected_low = float(best_r[included].min()) if included.any() else None

    details = {
        "version": int(version),
        "expected_reward": expected,
        "expected_reward_low": expected_low,
        "epsilon": float(agg.epsilon),
        "n_domains": int((weights > 0).sum()),
        "config": asdict(cfg),
        "shift_sigma": float(agg.sigma),
        "target_unit": dict(zip(KNOB_NAMES, map(float, target))),
        "theta_unit": dict(zip(KNOB_NAMES, map(float, theta_unit))),
        "theta_continuous": {k: float(v) for k, v in continuous.items()},
        "domains": {
            d: {
                "weight": float(weights[i]),
                "n_obs": int(n_obs[i]),
                "best_reward": None if not np.isfinite(best_r[i]) else float(best_r[i]),
                "score": float(agg.scores[i]),
                "shift_distance": None if not known[i] else float(dist[i]),
                "shift_weight": float(agg.shift_weight[i]),
                "outlier": bool(dropped[i]),
                "outlier_knobs": [KNOB_NAMES[k] for k in np.flatnonzero(excluded[i])],
                "max_robust_z": float(np.nanmax(z[i])) if np.isfinite(z[i]).any() else None,
            }
            for i, d in enumerate(domains)
        },
    }
    if epsilon_scale != 1.0:
        details["epsilon_scale"] = float(epsilon_scale)
    return theta, details


class NoDomainPriors(ValueError):
    """No domain has a prior yet: there is nothing to aggregate."""


@dataclass(frozen=True)
class ShiftSettings:
    """How the domains' shift distances are measured for the global prior (``meta.shift``)."""

    method: str = "mmd"
    max_ticks: int = 300
    seed: int = 0


@dataclass
class GlobalPriorBuild:
    """A new version of the global prior: the ``global_prior`` rows to append and what they came from."""

    version: int
    theta: dict[str, float]  # bounded, deployable knob values
    details: dict[str, Any]  # see aggregate_global_prior, plus the shift method and pairwise distances
    rows: pd.DataFrame  # the version's rows, in the layout of the ``global_prior`` table
    by_domain: dict[str, pd.DataFrame]  # the domain priors it was built from
    previous_values: dict[str, float] | None  # the previous version's knob values

    @property
    def rollback(self) -> dict[str, Any] | None:
        """When this version restores an earlier one (the fleet did worse under the newest): what and why."""
        return self.details.get("rollback")

    def knob_table(self) -> pd.DataFrame:
        """Per knob: the new value, the previous one, the Reptile target and θ in unit space."""
        return pd.DataFrame(
            {
                "knob": list(KNOB_NAMES),
                "value": [self.theta[k] for k in KNOB_NAMES],
                "previous": [None if self.previous_values is None else self.previous_values.get(k) for k in KNOB_NAMES],
                "target_unit": [self.details["target_unit"][k] for k in KNOB_NAMES],
                "theta_unit": [self.details["theta_unit"][k] for k in KNOB_NAMES],
            }
        )

    def domain_table(self) -> pd.DataFrame:
        """Per domain: its weight, evidence, best reward, shift distance and outlier flags."""
        if "domains" not in self.details:
            return pd.DataFrame(columns=["domain", "weight", "n_obs", "best_reward", "shift_distance", "outlier",
                                         "outlier_knobs"])
        return pd.DataFrame(
            [
                {"domain": d, "weight": v["weight"], "n_obs": v["n_obs"], "best_reward": v["best_reward"],
                 "shift_distance": v["shift_distance"], "outlier": v["outlier"],
                 "outlier_knobs": ",".join(v["outlier_knobs"])}
                for d, v in self.details["domains"].items()
            ]
        )


def build_global_prior(
    priors_long: pd.DataFrame,
    telemetry: pd.DataFrame,
    previous: GlobalPriorVersion | None,
    config: GlobalPriorConfig | None = None,
    shift: ShiftSettings = ShiftSettings(),
    now: pd.Timestamp | None = None,
    epsilon_scale: float = 1.0,
) -> GlobalPriorBuild:
    """The next version of the global prior from the fleet's tables (no canary: see ``next_global_prior``).

    ``priors_long``: the ``domain_priors`` table; ``telemetry``: the ``telemetry`` table's
    ``domain`` and SHIFT_FEATURES columns (the shift distances between the domains with a
    prior); ``previous``: the newest stored version (None = this is version 1), whose
    continuous values the Reptile step starts from. Raises NoDomainPriors when no domain
    has a prior.
    """
    by_domain = priors_by_domain(priors_long)
    if not by_domain:
        raise NoDomainPriors("no domain priors yet: materialize domain_priors for at least one domain with telemetry")
    tel_by_domain = {d: g for d, g in telemetry.groupby("domain") if d in by_domain}
    pairwise = pairwise_shift_distances(tel_by_domain, method=shift.method, max_n=shift.max_ticks, seed=shift.seed)
    version = 1 if previous is None else previous.version + 1
    theta, details = aggregate_global_prior(
        by_domain, pairwise, None if previous is None else previous.continuous, version, config, epsilon_scale
    )
    details["shift_method"] = shift.method
    details["shift_pairwise"] = {d: {e: float(v) for e, v in row.items()} for d, row in pairwise.iterrows()}
    rows = pd.DataFrame(
        {
            "version": version,
            "created_at": now if now is not None else pd.Timestamp.now(tz="UTC"),
            "knob": list(KNOB_NAMES),
            "value": [theta[k] for k in KNOB_NAMES],
            "n_domains": details["n_domains"],
            "epsilon": details["epsilon"],
            "details_json": json.dumps(details, sort_keys=True),
        }
    )
    return GlobalPriorBuild(version, theta, details, rows, by_domain,
                            None if previous is None else dict(previous.values))


# ---------------------------------------------------------------------------
# Few-shot warm start
# ---------------------------------------------------------------------------


def warm_start_prior(
    global_theta: Mapping[str, float] | None,
    domain_priors_by_domain: Mapping[str, pd.DataFrame],
    shift_distances_to_new: pd.Series | Mapping[str, float] | None,
    k: int = 3,
    *,
    lambda_max: float = 0.7,
    center: str = "best_value",
) -> tuple[dict[str, float], dict[str, Any]]:
    """The prior a new domain starts from: the global prior blended toward its k nearest domains.

    ``shift_distances_to_new``: distance from the new domain's first telemetry to each
    known domain (``shift.distances_to_new``). With no distances (no telemetry yet) or no
    known domain priors, returns the global prior unchanged (λ = 0). With no global prior,
    the nearest domains' mean is blended with the knob defaults instead.
    """
    base_unit = knobs_to_unit(global_theta or {})
    dist = pd.Series(dict(shift_distances_to_new.items()) if shift_distances_to_new is not None else {}, dtype=float)
    usable = [d for d in dist.index if d in domain_priors_by_domain and len(domain_priors_by_domain[d])
              and np.isfinite(dist[d])]
    details: dict[str, Any] = {"lambda": 0.0, "neighbours": {}, "k": int(k)}
    if not usable or k < 1:
        return unit_to_knobs(base_unit), details
    dist = dist[usable].sort_values(kind="stable")
    near = dist.iloc[: int(k)]
    mean_all = float(dist.mean())
    sigma = mean_all if mean_all > 1e-12 else 1.0
    a = np.exp(-near.to_numpy() / sigma)
    vectors = np.vstack([prior_vector(domain_priors_by_domain[d], center) for d in near.index])
    have = np.isfinite(vectors) * a[:, None]
    knn = np.where(have.sum(0) > 0, np.nansum(np.nan_to_num(vectors) * have, axis=0) / np.maximum(have.sum(0), 1e-300),
                   base_unit)
    contrast = 0.0 if mean_all <= 1e-12 else float(np.clip(1.0 - near.mean() / mean_all, 0.0, 1.0))
    lam = float(lambda_max * contrast)
    blended = (1.0 - lam) * base_unit + lam * knn
    details.update(
        {
            "lambda": lam,
            "contrast": contrast,
            "neighbours": {d: {"distance": float(near[d]), "weight": float(w / a.sum())} for d, w in zip(near.index, a)},
            "knn_unit": dict(zip(KNOB_NAMES, map(float, knn))),
        }
    )
    return unit_to_knobs(blended), details


# ---------------------------------------------------------------------------
# Early negative-transfer check
# ---------------------------------------------------------------------------


# Ticks at the prior's point the early check judges: one is enough against a planted outlier
# (the threshold widens by 2σ/√n) and gave no false alarm on in-distribution domains in
# `meta-pipeline evaluate`; every extra probe tick at a harmful prior is paid in regret.
EARLY_PROBE_TICKS = 1


def early_negative_transfer(
    observed_rewards: np.ndarray,
    expected_reward_low: float | None,
    *,
    noise_sd: float = 0.05,
    margin: float = 0.05,
    min_ticks: int = EARLY_PROBE_TICKS,
) -> tuple[bool, str]:
    """Is the prior hurting a new domain, judged from its first rewards at the prior's point?

    The global prior records the lowest best-reward among the domains it was built from
    (``details["expected_reward_low"]``): what running at the prior delivered at worst in
    the fleet. A new domain whose first ``n ≥ min_ticks`` rewards at the prior average
    below ``expected_low − margin − 2·noise_sd/√n`` does not behave like any domain the
    prior came from: drop the prior and start from scratch. Complements the controller's
    guard, which needs ``negative_transfer_window`` decisions of own exploration first.
    A domain that merely has a lower reward level also trips it; the cost is only the
    warm-start benefit (it then tunes from scratch), never a worse policy.
    """
    r = np.asarray(observed_rewards, dtype=float)
    r = r[np.isfinite(r)]
    if expected_reward_low is None or r.size < min_ticks:
        return False, f"not judged: {r.size} tick(s) at the prior (need {min_ticks}) or no expectation"
    threshold = float(expected_reward_low) - margin - 2.0 * noise_sd / math.sqrt(r.size)
    mean = float(r.mean())
    if mean < threshold:
        return True, (f"negative transfer: mean reward {mean:.4f} over the first {r.size} ticks at the prior is below "
                      f"{threshold:.4f} (fleet's lowest best reward {expected_reward_low:.4f} − margin {margin} − 2σ/√n)")
    return False, f"prior holds: mean reward {mean:.4f} ≥ {threshold:.4f}"


# ---------------------------------------------------------------------------
# The wired warm start: nearest domains when close, the global prior otherwise
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmStartSettings:
    """How a new domain's controller picks its cold-start prior (``choose_warm_start``)."""

    k: int = 10  # at most this many nearest domains (10 beat 3 and tied 30 on the seed-targets stream, seeds 0-1)
    close_ratio: float = 2.0  # "close": distance ≤ close_ratio × the known domains' median nearest-neighbour distance
    lambda_max: float = 1.0  # blend toward the close neighbours' mean at most this far (1.0 beat 0.7 there)
    min_ticks: int = 2  # the new domain's ticks the shift distance needs
    shift_method: str = "mmd"
    shift_max_ticks: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.close_ratio <= 0 or not 0 <= self.lambda_max <= 1 or self.min_ticks < 2:
            raise ValueError("WarmStartSettings: need k ≥ 1, close_ratio > 0, 0 ≤ lambda_max ≤ 1, min_ticks ≥ 2")


@dataclass
class WarmStart:
    """The prior a new domain's controller cold-starts from, and why."""

    theta: dict[str, float] | None  # None: no prior at all (the default knobs)
    source: str  # "neighbours: a, b" | "global vN" | "defaults"
    details: dict[str, Any]


def typical_neighbour_distance(pairwise: np.ndarray) -> float:
    """Median over domains of the distance to their nearest other domain (NaN with fewer than 2)."""
    d = np.array(pairwise, dtype=float)
    if len(d) < 2:
        return float("nan")
    np.fill_diagonal(d, np.inf)
    nearest = np.min(np.where(np.isfinite(d), d, np.inf), axis=1)
    nearest = nearest[np.isfinite(nearest)]
    return float(np.median(nearest)) if nearest.size else float("nan")


def warm_start_unit(
    global_unit: np.ndarray | None,
    neighbour_units: np.ndarray,
    distances: np.ndarray,
    typical_distance: float,
    settings: WarmStartSettings = WarmStartSettings(),
) -> tuple[np.ndarray | None, float, np.ndarray]:
    """``choose_warm_start``'s rule on arrays: (start in unit space or None, λ, indices of the close domains).

    ``neighbour_units``: D × K priors of the known domains (NaN: knob not reported);
    ``distances``: D distances to the new domain; ``typical_distance``: d_typ. Returns the
    global prior (λ = 0, no close domain) when none of the k nearest is within
    ``close_ratio · d_typ``; the arithmetic is ``warm_start_prior``'s.
    """
    d = np.asarray(distances, dtype=float)
    ok = np.flatnonzero(np.isfinite(d))
    if ok.size == 0 or not np.isfinite(typical_distance):
        return (None if global_unit is None else np.asarray(global_unit, float)), 0.0, np.array([], dtype=int)
    order = ok[np.argsort(d[ok], kind="stable")][: settings.k]
    close = order[d[order] <= settings.close_ratio * typical_distance]
    if close.size == 0:
        return (None if global_unit is None else np.asarray(global_unit, float)), 0.0, close
    base = knobs_to_unit({}) if global_unit is None else np.asarray(global_unit, float)
    mean_all = float(d[ok].mean())
    sigma = mean_all if mean_all > 1e-12 else 1.0
    a = np.exp(-d[close] / sigma)
    vectors = np.asarray(neighbour_units, dtype=float)[close]
    have = np.isfinite(vectors) * a[:, None]
    knn = np.where(have.sum(0) > 0, np.nansum(np.nan_to_num(vectors) * have, axis=0) / np.maximum(have.sum(0), 1e-300),
                   base)
    if global_unit is None:  # no global prior: the neighbours' mean itself
        return knn, 1.0, close
    contrast = 0.0 if mean_all <= 1e-12 else float(np.clip(1.0 - d[close].mean() / mean_all, 0.0, 1.0))
    lam = float(settings.lambda_max * contrast)
    return (1.0 - lam) * base + lam * knn, lam, close


def choose_warm_start(
    global_theta: Mapping[str, float] | None,
    global_version: int | None,
    domain_priors_by_domain: Mapping[str, pd.DataFrame],
    distances_to_new: pd.Series | Mapping[str, float] | None,
    known_pairwise: pd.DataFrame | None,
    settings: WarmStartSettings = WarmStartSettings(),
    noise_floor: float = 0.0,
) -> WarmStart:
    """The few-shot warm start of a new domain, as the controller uses it.

    ``d_typ`` = the median over the known domains of each one's distance to its nearest
    other known domain (``typical_neighbour_distance`` of ``known_pairwise``): how close a
    domain's nearest neighbour typically is in this fleet. A known domain with a prior is
    **close** when its distance to the new domain is ≤ ``close_ratio · max(d_typ,
    noise_floor)`` (default ratio 2). ``noise_floor``: how far a domain's OWN few ticks
    appear from the rest of its telemetry (``warm_start_new_domain`` measures it at the new
    domain's sample size); without it, a fleet whose domains have many ticks each (their
    distances estimate to ≈ 0) would call nothing close.
    Of the ``k`` nearest, the close ones C decide:

    * C empty (or fewer than 2 known domains, or no distances): the global prior
      (``global vN``), or the defaults when there is none;
    * else ``warm_start_prior`` restricted to C: ``θ = (1−λ)·θ_global + λ·θ_C`` with θ_C
      the exp(−d/d̄)-weighted mean of their priors and ``λ = λ_max·(1 − d̄_C / d̄_all)``
      (d̄_all: mean distance to all known domains), so the start moves toward the
      neighbours as far as they are closer than the fleet at large; with no global
      prior, θ_C itself (λ = 1).
    """
    base = WarmStart(None if global_theta is None else dict(global_theta),
                     "defaults" if global_theta is None else f"global v{global_version}", {"lambda": 0.0})
    dist = pd.Series(dict(distances_to_new.items()) if distances_to_new is not None else {}, dtype=float)
    usable = [d for d in dist.index if d in domain_priors_by_domain and domain_priors_by_domain[d] is not None
              and len(domain_priors_by_domain[d]) and np.isfinite(dist[d])]
    if known_pairwise is None or len(known_pairwise) < 2 or len(usable) < 1:
        base.details["why"] = "fewer than 2 known domains or no distances to the new domain"
        return base
    d_typ = max(typical_neighbour_distance(known_pairwise.to_numpy(dtype=float)), float(noise_floor))
    dist = dist[usable].sort_values(kind="stable")
    near = dist.iloc[: settings.k]
    close = near[near <= settings.close_ratio * d_typ] if np.isfinite(d_typ) else near.iloc[:0]
    base.details.update({"typical_distance": d_typ, "noise_floor": float(noise_floor),
                         "close_threshold": settings.close_ratio * d_typ,
                         "nearest": {d: float(v) for d, v in near.items()}})
    if close.empty:
        base.details["why"] = (f"nearest domain {near.index[0]} at distance {near.iloc[0]:.4f} > "
                               f"{settings.close_ratio} × typical {d_typ:.4f}: not close")
        return base
    units = np.vstack([prior_vector(domain_priors_by_domain[d]) for d in dist.index])
    start, lam, idx = warm_start_unit(None if global_theta is None else knobs_to_unit(global_theta), units,
                                      dist.to_numpy(float), d_typ, settings)
    if lam <= 1e-12 and global_theta is not None:  # the close domains are no closer than the fleet at large
        base.details["why"] = (f"{len(close)} close domain(s) but no closer than the known domains at large "
                               "(λ = 0): the global prior")
        return base
    theta = unit_to_knobs(start)
    details = {**base.details, "lambda": lam,
               "neighbours": {dist.index[i]: float(dist.iloc[i]) for i in idx}}
    details["why"] = f"{len(close)} close domain(s) (≤ {settings.close_ratio} × typical distance {d_typ:.4f})"
    return WarmStart(theta, "neighbours: " + ", ".join(close.index), details)


# ---------------------------------------------------------------------------
# The global prior's own canary: fleet reward per published version, rollback
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorRollbackConfig:
    """When the fleet did worse under the newest global prior than under the one before."""

    min_domains: int = 3  # domains with decisions under both versions
    min_decisions: int = 5  # decisions per domain under each version
    margin: float = 0.01  # reward units the fleet must lose (mean paired difference)
    z: float = 2.0  # ... and significantly: mean + z·SE < 0
    backoff: float = 0.5  # the Reptile step after k consecutive rollbacks is scaled by backoff^k


def fleet_reward_by_version(decisions: pd.DataFrame, versions: pd.DataFrame) -> pd.DataFrame:
    """Per (version, domain): decisions and mean decision reward while that version was the newest.

    ``decisions``: meta_decisions' ``domain``, ``decided_at``, ``reward``; ``versions``:
    ``version``, ``created_at`` (one row per version). A decision belongs to the newest
    version created at or before it was decided (the one its controller run read); decisions
    before the first version belong to none.
    """
    cols = ["version", "domain", "n", "reward_mean"]
    if decisions is None or decisions.empty or versions is None or versions.empty:
        return pd.DataFrame(columns=cols)
    v = versions[["version", "created_at"]].drop_duplicates("version").copy()
    v["created_at"] = pd.to_datetime(v["created_at"], utc=True)
    d = decisions[["domain", "decided_at", "reward"]].copy()
    d["decided_at"] = pd.to_datetime(d["decided_at"], utc=True)
    d["reward"] = pd.to_numeric(d["reward"], errors="coerce")
    d = d[np.isfinite(d["reward"].to_numpy(dtype=float))]
    if d.empty:
        return pd.DataFrame(columns=cols)
    merged = pd.merge_asof(d.sort_values("decided_at"), v.sort_values("created_at"),
                           left_on="decided_at", right_on="created_at", direction="backward")
    merged = merged.dropna(subset=["version"])
    out = merged.groupby(["version", "domain"], sort=True)["reward"].agg(["size", "mean"]).reset_index()
    out.columns = cols
    out["version"] = out["version"].astype(int)
    return out


def prior_rollback_verdict(per_version: pd.DataFrame, new_version: int, previous_version: int,
                           config: PriorRollbackConfig = PriorRollbackConfig()) -> tuple[bool, str, dict[str, Any]]:
    """Did the fleet do worse under ``new_version`` than under ``previous_version``?

    Paired over the domains with ≥ ``min_decisions`` decisions under both (so a change of
    which domains report cannot fake a drop): Δ_d = mean reward under new − under previous.
    Rollback when at least ``min_domains`` are paired and ``mean Δ < −margin`` and
    ``mean Δ + z·SE < 0`` (SE = sd(Δ)/√n). Returns (rollback?, why, statistics).
    """
    pv = per_version[per_version["n"] >= config.min_decisions] if len(per_version) else per_version
    new = pv[pv["version"] == new_version].set_index("domain")["reward_mean"] if len(pv) else pd.Series(dtype=float)
    old = pv[pv["version"] == previous_version].set_index("domain")["reward_mean"] if len(pv) else pd.Series(dtype=float)
    paired = sorted(set(new.index) & set(old.index))
    stats: dict[str, Any] = {"new_version": int(new_version), "previous_version": int(previous_version),
                             "n_domains": len(paired)}
    if len(paired) < config.min_domains:
        return False, (f"not judged: {len(paired)} domain(s) with ≥ {config.min_decisions} decisions under both "
                       f"v{previous_version} and v{new_version} (need {config.min_domains})"), stats
    delta = new[paired].to_numpy(float) - old[paired].to_numpy(float)
    mean = float(delta.mean())
    se = float(delta.std(ddof=1) / np.sqrt(len(delta)))
    stats.update({"mean_new": float(new[paired].mean()), "mean_previous": float(old[paired].mean()),
                  "mean_delta": mean, "se": se, "per_domain_delta": dict(zip(paired, map(float, delta)))})
    worse = mean < -config.margin and mean + config.z * se < 0
    why = (f"fleet reward under v{new_version} {stats['mean_new']:.4f} vs {stats['mean_previous']:.4f} under "
           f"v{previous_version} over {len(paired)} domains: Δ = {mean:+.4f} (SE {se:.4f}); "
           + (f"worse beyond the margin {config.margin} and {config.z}·SE: roll back to v{previous_version}"
              if worse else "not worse: kept"))
    return worse, why, stats


def next_global_prior(
    priors_long: pd.DataFrame,
    telemetry: pd.DataFrame,
    previous: GlobalPriorVersion | None,
    before_previous: GlobalPriorVersion | None,
    fleet_decisions: pd.DataFrame | None,
    versions: pd.DataFrame | None,
    config: GlobalPriorConfig | None = None,
    shift: ShiftSettings = ShiftSettings(),
    rollback: PriorRollbackConfig = PriorRollbackConfig(),
    now: pd.Timestamp | None = None,
) -> GlobalPriorBuild:
    """The next version of the global prior, with the prior's own canary first.

    ``previous`` is the newest version, ``before_previous`` the version before it.
    When the newest version is not itself a rollback and the fleet did worse under it
    (``prior_rollback_verdict`` on ``fleet_reward_by_version`` of ``fleet_decisions`` /
    ``versions``), the next version RESTORES ``before_previous`` (its values and its
    continuous Reptile state; details ``rollback``: of which version, to which, the
    statistics, and the count of consecutive rollbacks). Otherwise ``build_global_prior``
    with the Reptile step scaled by ``backoff^k`` after k consecutive rollbacks, so the
    same evidence does not push the prior straight back where it failed. Every build's
    ``details["fleet_reward"]`` lists the per-version fleet reward it saw.
    """
    per_version = fleet_reward_by_version(fleet_decisions, versions)
    fleet = {int(v): {"domains": int(len(g)), "decisions": int(g["n"].sum()),
                      "reward_mean": float(np.average(g["reward_mean"], weights=g["n"]))}
             for v, g in per_version.groupby("version")} if len(per_version) else {}
    prev_rollback = (previous.details.get("rollback") if previous is not None else None) or None
    if previous is not None and before_previous is not None and prev_rollback is None:
        worse, why, stats = prior_rollback_verdict(per_version, previous.version, before_previous.version, rollback)
        if worse:
            version = previous.version + 1
            consecutive = 1 + int(((before_previous.details.get("rollback") or {}).get("consecutive", 0)))
            details = {k: v for k, v in before_previous.details.items() if k not in ("rollback", "fleet_reward")}
            details.update({"version": version, "epsilon": 0.0, "fleet_reward": fleet,
                            "theta_continuous": dict(before_previous.continuous),
                            "rollback": {"of": previous.version, "restored": before_previous.version, "why": why,
                                         "statistics": stats, "consecutive": consecutive}})
            rows = pd.DataFrame({
                "version": version,
                "created_at": now if now is not None else pd.Timestamp.now(tz="UTC"),
                "knob": list(KNOB_NAMES),
                "value": [before_previous.values[k] for k in KNOB_NAMES],
                "n_domains": before_previous.n_domains,
                "epsilon": 0.0,
                "details_json": json.dumps(details, sort_keys=True, default=float),
            })
            return GlobalPriorBuild(version, dict(before_previous.values), details, rows, priors_by_domain(priors_long),
                                    dict(previous.values))
    consecutive = int(prev_rollback.get("consecutive", 0)) if prev_rollback else 0
    built = build_global_prior(priors_long, telemetry, previous, config, shift, now,
                               epsilon_scale=rollback.backoff ** consecutive)
    built.details["fleet_reward"] = fleet
    if previous is not None and before_previous is not None and prev_rollback is None:
        built.details["prior_check"] = why
    built.rows["details_json"] = json.dumps(built.details, sort_keys=True, default=float)
    return built


def warm_start_new_domain(
    domain: str,
    new_telemetry: pd.DataFrame,
    global_theta: Mapping[str, float] | None,
    global_version: int | None,
    priors_long: pd.DataFrame,
    fleet_telemetry: pd.DataFrame,
    settings: WarmStartSettings = WarmStartSettings(),
) -> WarmStart:
    """``choose_warm_start`` from the store's tables: what a new domain's controller cold-starts from.

    ``new_telemetry``: the new domain's ticks so far (SHIFT_FEATURES columns); ``priors_long``:
    the ``domain_priors`` table; ``fleet_telemetry``: the ``telemetry`` table's ``domain`` and
    SHIFT_FEATURES columns. All distances — between known domains and to the new one — come
    from ONE ``pairwise_shift_distances`` call (one standardization, one bandwidth), so "close"
    is judged with the same ruler on both sides. The new domain's own rows are left out of
    the known set. The same call measures the noise floor: for up to 5 known domains, twice,
    n_new of their own ticks (n_new = the new domain's tick count) held out against the rest;
    the 90th percentile of those distances is how far a domain's own few ticks can appear
    from itself (the median is useless: the unbiased MMD² is ≤ 0, distance 0, half the time).
    Fewer than ``settings.min_ticks`` new ticks: the global prior.
    """
    glob = WarmStart(None if global_theta is None else dict(global_theta),
                     "defaults" if global_theta is None else f"global v{global_version}", {"lambda": 0.0})
    n_new = 0 if new_telemetry is None else len(new_telemetry)
    if n_new < settings.min_ticks:
        glob.details["why"] = f"{n_new} tick(s) of the new domain (the shift distance needs {settings.min_ticks})"
        return glob
    by_domain = {d: p for d, p in priors_by_domain(priors_long).items() if d != domain}
    known = {d: g for d, g in fleet_telemetry.groupby("domain") if d in by_domain} if len(fleet_telemetry) else {}
    if len(known) < 2:
        glob.details["why"] = f"{len(known)} known domain(s) with a prior and telemetry (need 2)"
        return glob
    key = "\x00new"  # cannot clash with a valid domain name
    # the noise floor: up to 5 known domains' own n_new ticks held out vs the rest of their telemetry
    rng = np.random.default_rng(settings.seed)
    m = min(n_new, settings.shift_max_ticks)
    probes: dict[str, pd.DataFrame] = {}
    for d in sorted(known)[:: max(1, len(known) // 5)][:5]:
        g = known[d]
        for r in range(2) if len(g) >= m + 2 else ():
            idx = rng.permutation(len(g))
            probes[f"\x00held{r}:{d}"], probes[f"\x00rest{r}:{d}"] = g.iloc[idx[:m]], g.iloc[idx[m:]]
    pairwise = pairwise_shift_distances({**known, key: new_telemetry, **probes}, method=settings.shift_method,
                                        max_n=settings.shift_max_ticks, seed=settings.seed)
    if key not in pairwise.index:
        glob.details["why"] = "the new domain's ticks have no complete outcome row"
        return glob
    held = [float(pairwise.loc[h, h.replace("held", "rest")]) for h in probes
            if h.startswith("\x00held") and h in pairwise.index and h.replace("held", "rest") in pairwise.index]
    noise = float(np.quantile(held, 0.9)) if held else 0.0  # the unbiased MMD² is ≤ 0 half the time: a high quantile
    real = [c for c in pairwise.index if not c.startswith("\x00")]
    return choose_warm_start(global_theta, global_version, by_domain, pairwise.loc[key, real],
                             pairwise.loc[real, real], settings, noise_floor=noise)
