"""The meta-learning seed's performance targets, measured as the seed states them (``evaluate --section seed-targets``).

Seed ``bot3-meta-learning-grooming.md``: "Meta-learning convergence < 100 tasks; few-shot
accuracy > 85 % with 5 examples; transfer effectiveness > 70 % performance retention;
adaptation speed < 10 seconds for new domain; knowledge retention > 95 % after 1000
tasks; learning efficiency 10x faster than baseline." Each target below has one
definition, printed beside its result; none is redefined when it is missed.

Every reward is **normalized** per domain: ``(reward − random) / (oracle − random)``, with
``random`` the mean expected reward of uniformly random knobs (the same 256 unit-cube
draws for every domain, rounded to deployable knobs) and ``oracle`` the best deployable
knobs (exact: the simulated engine's quality is separable, so float knobs sit at the
planted optimum and the int/bool knobs are searched over all their values). 0 = a random
policy, 1 = the oracle, on every engine alike.

The task stream (per seed): ``n_tasks`` domains arrive one after another, alternately from
two clusters (two centres drawn per seed, uniform in [0.15, 0.85]⁶ in unit space; each
domain's optimum = its centre + N(0, 0.08)), the ``lab.synth`` engines. Learning task i
= its exploration telemetry (``task_ticks`` ticks, knobs around the defaults, sd 0.3 in
unit space) → ``meta.priors.domain_priors`` → shift distances → global prior version
i+1 (``meta.priors.aggregate_arrays``: the production aggregation — evidence/reward
weights, entropy, outliers, annealed Reptile step). Simulation shortcuts, needed for
1,000 tasks: engine ticks and expected rewards are vectorized (same formulas as
``SimEngine``, checked equal in the tests); shift distances are the production unbiased
RBF-MMD but on ``shift_ticks`` ticks per domain, standardized and with the bandwidth fixed
from the first tasks, computed once per pair as tasks arrive.

A **new domain** (a task before it is learned, or one of ``n_probe`` held-out probe domains
drawn the same way) sends ``first_ticks`` exploration ticks; the wired warm start
(``meta.priors.warm_start_unit``, the rule ``choose_warm_start`` applies in the
controller's cold start) picks its start: the close nearest domains' priors blended with
the global prior, or the global prior.

Targets
-------
* **Meta-learning convergence** (< 100 tasks): ``t_prior`` = the first task after which the
  global prior never again moves by more than 1 % of any knob's range (max_k |Δθ_k| ≤ 0.01,
  unit space); ``t_regret`` = the first task after which the probes' mean warm-start regret
  (1 − normalized reward of the start) never improves by more than 0.01 (1 % of the
  oracle − random range) again. Met when both ≤ 100.
* **Few-shot adaptation** (≥ 85 % within 5 decisions): the probes' controller (``controller``
  from the warm start, one tick per decision) — normalized expected reward of the knobs it
  keeps (its incumbent) after decision 5. Met when the mean over probes ≥ 0.85.
* **Transfer** (≥ 70 % retained): normalized reward of a new domain's warm-start knobs before
  any decision (zero-shot), over the mean normalized reward the source domains reach with
  their own learned priors (the diagonal below), averaged over the stream's tasks 10 … n.
  Met when ≥ 0.70.
* **Knowledge retention** (≥ 95 % after 1,000 tasks): for each task j, the normalized reward
  of what the system deploys for j after ALL tasks (its stored prior pulled toward the final
  global prior with the controller's fading weight s/(s+n_j)) over the same right after
  task j was learned; Σ_j final / Σ_j right-after. Met when ≥ 0.95. The same ratio of a
  single shared policy (the global prior for every task) is shown beside it.
* **Adaptation time** (< 10 s): wall time of the real asset path for a new domain — Dagster
  ``materialize`` of ``domain_priors[new]``, ``global_prior`` and ``controller_state[new]``
  (which warm-starts and makes its first decisions) in a temp SQLite store holding a fleet.
* **Learning efficiency** (≥ 10× fewer decisions): decisions until the incumbent first
  reaches 90 % (normalized) — controller from scratch (defaults, no prior) vs from the warm
  start; ratio of the means (a run that never reaches it counts as horizon + 1, so the ratio
  is then a lower bound). Met when ≥ 10.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.knobs import KNOB_NAMES, KNOBS, knobs_to_unit, unit_to_knobs
from meta_pipeline.lab.simulate import run_closed_loop
from meta_pipeline.lab.synth import DEFAULT_SENSITIVITY, SimEngine
from meta_pipeline.meta.controller import ControllerConfig, cold_start
from meta_pipeline.meta.priors import (
    GlobalPriorConfig,
    WarmStartSettings,
    aggregate_arrays,
    domain_priors,
    prior_vector,
    warm_start_unit,
)
from meta_pipeline.meta.reward import meta_reward
from meta_pipeline.meta.shift import SHIFT_FEATURES

K = len(KNOB_NAMES)
SENS = np.array([DEFAULT_SENSITIVITY.get(n, 0.0) for n in KNOB_NAMES])
LOW = np.array([KNOBS[n].low for n in KNOB_NAMES])
HIGH = np.array([KNOBS[n].high for n in KNOB_NAMES])
KIND = [KNOBS[n].kind for n in KNOB_NAMES]
TOPK = KNOB_NAMES.index("tier3_topk")


@dataclass(frozen=True)
class SeedTargetsConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    n_tasks: int = 1000
    task_ticks: int = 150  # exploration telemetry per learned task
    first_ticks: int = 5  # a new domain's ticks before its warm start (the seed's "5 examples")
    first_ticks_alt: int = 20  # shown beside: the warm start from 20 first ticks
    exploration_spread: float = 0.3
    cluster_spread: float = 0.08
    shift_ticks: int = 40  # per domain, for the stream's shift distances
    n_probe: int = 20  # held-out new domains per seed
    few_shot_decisions: int = 5
    efficiency_horizon: int = 200
    efficiency_level: float = 0.90
    few_shot_level: float = 0.85
    transfer_from_task: int = 10
    convergence_tasks: int = 100
    dagster: bool = True
    controller: ControllerConfig = ControllerConfig()
    prior_config: GlobalPriorConfig = GlobalPriorConfig()
    warm: WarmStartSettings = WarmStartSettings()
    random_draws: int = 256


# ---------------------------------------------------------------------------
# Vectorized engines (the formulas of lab.synth.SimEngine)
# ---------------------------------------------------------------------------


def deployable_units(u: np.ndarray) -> np.ndarray:
    """Unit vectors → the unit vectors of the knobs actually deployed (clipped, int rounded, bool at ½)."""
    u = np.clip(np.asarray(u, dtype=float), 0.0, 1.0)
    v = LOW + u * (HIGH - LOW)
    for j, kind in enumerate(KIND):
        if kind == "int":
            v[..., j] = np.round(v[..., j])
        elif kind == "bool":
            v[..., j] = (v[..., j] >= 0.5).astype(float)
    return (v - LOW) / (HIGH - LOW)


def expected_telemetry(units: np.ndarray, optimum: np.ndarray) -> dict[str, np.ndarray]:
    """``SimEngine.expected_telemetry`` on deployable unit vectors (broadcast over leading axes)."""
    quality = 1.0 - np.sum(SENS * (units - optimum) ** 2, axis=-1)
    topk = units[..., TOPK]
    return {
        "gain_p50": 0.05 * quality,
        "stability_mean": np.clip(0.55 + 0.35 * quality, 0.0, 1.0),
        "vram_utilization": np.clip(0.45 + 0.35 * topk, 0.0, 1.0),
        "latency_ms": 60.0 + 160.0 * topk,
    }


def expected_reward(units: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    """Noise-free meta-reward of deployable unit vectors on engines with the given optima."""
    return np.asarray(meta_reward(**expected_telemetry(units, optimum)), dtype=float)


def oracle_reward(optimum: np.ndarray) -> np.ndarray:
    """The best deployable reward per engine (rows of ``optimum``): floats at the optimum, ints/bools searched."""
    optimum = np.atleast_2d(optimum)
    grids = [np.array([optimum[:, j]]).T if kind == "float" else
             (np.arange(LOW[j], HIGH[j] + 1) - LOW[j])[None, :] / (HIGH[j] - LOW[j]) * np.ones((len(optimum), 1))
             for j, kind in enumerate(KIND)]
    best = np.full(len(optimum), -np.inf)
    mesh = np.stack(np.meshgrid(*[np.arange(g.shape[1]) for g in grids], indexing="ij"), -1).reshape(-1, K)
    for combo in mesh:
        u = np.column_stack([grids[j][:, combo[j]] for j in range(K)])
        best = np.maximum(best, expected_reward(u, optimum))
    return best


def engine_of(domain: str, optimum_unit: np.ndarray) -> SimEngine:
    """The ``SimEngine`` with this optimum (for the controller's closed loop)."""
    optimum = unit_to_knobs(optimum_unit)
    return SimEngine(domain=domain, optimum=optimum)


def draw_optima(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float, first: int = 0) -> np.ndarray:
    """``lab.synth.make_engine``'s optima: centre (alternating clusters) + N(0, spread), clipped; tier2 on."""
    c = centers[(np.arange(n) + first) % len(centers)]
    units = np.clip(c + rng.normal(0, spread, (n, K)), 0.05, 0.95)
    units[:, KNOB_NAMES.index("tier2_enabled")] = 1.0
    units[:, TOPK] = deployable_units(units)[:, TOPK]  # unit_to_knobs rounds the planted int knob
    return units


def exploration_telemetry(optimum: np.ndarray, n: int, rng: np.random.Generator, spread: float) -> pd.DataFrame:
    """Telemetry (store layout) of random exploration around the default knobs: ``SimEngine.tick``'s noise."""
    base = knobs_to_unit({})
    units = deployable_units(np.clip(base + rng.normal(0, spread, (n, K)), 0, 1))
    e = expected_telemetry(units, optimum)
    frame = pd.DataFrame({
        "gain_p50": e["gain_p50"] + rng.normal(0, 0.004, n),
        "stability_mean": np.clip(e["stability_mean"] + rng.normal(0, 0.02, n), 0.0, 1.0),
        "vram_utilization": np.clip(e["vram_utilization"] + rng.normal(0, 0.01, n), 0.0, 1.0),
        "latency_ms": np.maximum(0.0, e["latency_ms"] + rng.normal(0, 5.0, n)),
    })
    knobs = LOW + units * (HIGH - LOW)
    for j, name in enumerate(KNOB_NAMES):
        frame[f"knob_{name}"] = knobs[:, j]
    return frame


# ---------------------------------------------------------------------------
# Incremental shift distances (unbiased RBF-MMD, fixed ruler)
# ---------------------------------------------------------------------------


def _sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2.0 * a @ np.swapaxes(b, -1, -2),
                      0.0)


class ShiftRuler:
    """√MMD² between domains' outcome samples with one standardization and one bandwidth."""

    def __init__(self, reference: np.ndarray):
        self.mean = reference.mean(0)
        self.std = np.where(reference.std(0) > 1e-12, reference.std(0), 1.0)
        z = (reference - self.mean) / self.std
        d = np.sqrt(_sq(z, z)[np.triu_indices(len(z), 1)])
        h = float(np.median(d[d > 0])) if (d > 0).any() else 1.0
        self.gamma = 1.0 / (2.0 * h * h)

    def standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, float) - self.mean) / self.std

    def self_term(self, z: np.ndarray) -> float:
        k = np.exp(-self.gamma * _sq(z, z))
        m = len(z)
        return float((k.sum() - np.trace(k)) / (m * (m - 1)))

    def distances(self, z: np.ndarray, z_self: float, bank: np.ndarray, bank_self: np.ndarray) -> np.ndarray:
        """Distances from one sample (m × p) to each sample of ``bank`` (D × n × p)."""
        if len(bank) == 0:
            return np.empty(0)
        cross = np.exp(-self.gamma * _sq(z[None, :, :], bank)).mean(axis=(1, 2))
        return np.sqrt(np.maximum(z_self + bank_self - 2.0 * cross, 0.0))


def _outcomes(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(SHIFT_FEATURES)].to_numpy(dtype=float)


def _median_excluding_diagonal(D: np.ndarray) -> np.ndarray:
    """Per row, the median of the other entries (each domain's median distance to the rest)."""
    n = len(D)
    if n == 1:
        return np.zeros(1)
    a = D.copy()
    np.fill_diagonal(a, np.inf)
    m = n - 1
    lo, hi = (m - 1) // 2, m // 2
    part = np.partition(a, [lo, hi], axis=1)
    return 0.5 * (part[:, lo] + part[:, hi])


# ---------------------------------------------------------------------------
# One stream
# ---------------------------------------------------------------------------


def _fallback_trips(frame: pd.DataFrame) -> int:
    """How often ``meta.fallback.observe`` (default config) trips on a closed-loop run's decisions."""
    from meta_pipeline.meta.fallback import observe

    memory, trips = None, 0
    for no, rolled, ema in zip(frame["decision"], frame["rolled_back"], frame["reward_ema"]):
        memory, why = observe(memory, {"decision_no": int(no), "rolled_back": bool(rolled), "reward_ema": float(ema)})
        if why:
            trips += 1
            memory = {**memory, "since": int(no), "rollbacks": [], "peak": None, "below": 0}
    return trips


def _first_reach(values: np.ndarray, level: float, horizon: int) -> int:
    hit = np.flatnonzero(values >= level)
    return int(hit[0]) + 1 if hit.size else horizon + 1


def run_stream(cfg: SeedTargetsConfig, seed: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One seed: the 1,000-task stream, the probes' warm starts after every task, the controller runs."""
    say = progress or (lambda _m: None)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 16]))
    T, P = cfg.n_tasks, cfg.n_probe
    centers = rng.uniform(0.15, 0.85, (2, K))
    optima = draw_optima(rng, centers, T, cfg.cluster_spread)
    probe_optima = draw_optima(rng, centers, P, cfg.cluster_spread)
    draws = deployable_units(np.random.default_rng(seed).random((cfg.random_draws, K)))

    def baselines(opt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rand = expected_reward(draws[None, :, :], opt[:, None, :]).mean(axis=1)
        return rand, oracle_reward(opt)

    rand_t, orac_t = baselines(optima)
    rand_p, orac_p = baselines(probe_optima)

    def norm_t(units: np.ndarray, idx: np.ndarray | slice) -> np.ndarray:
        return (expected_reward(deployable_units(units), optima[idx]) - rand_t[idx]) / (orac_t[idx] - rand_t[idx])

    def norm_p(units: np.ndarray) -> np.ndarray:
        return (expected_reward(deployable_units(units), probe_optima) - rand_p) / (orac_p - rand_p)

    # telemetry of every task and the probes' first ticks, drawn up front (seeded)
    t0 = time.perf_counter()
    telemetry = [exploration_telemetry(optima[i], cfg.task_ticks, rng, cfg.exploration_spread) for i in range(T)]
    n_first = max(cfg.first_ticks, cfg.first_ticks_alt)
    probe_first = [exploration_telemetry(probe_optima[p], n_first, rng, cfg.exploration_spread) for p in range(P)]
    ruler = ShiftRuler(np.vstack([_outcomes(t) for t in telemetry[: min(T, 8)]]))
    bank = np.stack([ruler.standardize(_outcomes(t)[: cfg.shift_ticks]) for t in telemetry])  # T × m × p
    bank_self = np.array([ruler.self_term(z) for z in bank])
    # a task as a NEW domain: its first ticks only
    first_z = [ruler.standardize(_outcomes(t)[: cfg.first_ticks]) for t in telemetry]
    first_self = np.array([ruler.self_term(z) for z in first_z])
    alt_z = [ruler.standardize(_outcomes(t)[: cfg.first_ticks_alt]) for t in telemetry]
    alt_self = np.array([ruler.self_term(z) for z in alt_z])
    probe_z = [ruler.standardize(_outcomes(t)[: cfg.first_ticks]) for t in probe_first]
    probe_self = np.array([ruler.self_term(z) for z in probe_z])
    probe_alt_z = [ruler.standardize(_outcomes(t)[: cfg.first_ticks_alt]) for t in probe_first]
    probe_alt_self = np.array([ruler.self_term(z) for z in probe_alt_z])
    probe_D_alt = np.zeros((P, T))
    start_alt = np.full(T, np.nan)
    # the noise floor of the "close" rule (choose_warm_start): m of a task's own ticks held out (rows after its
    # shift sample) against its shift sample, twice for each of the first 8 tasks; the 90th percentile
    def noise_floor(m: int) -> float:
        held = [(i, ruler.standardize(_outcomes(t)[cfg.shift_ticks + r * m:cfg.shift_ticks + (r + 1) * m]))
                for i, t in enumerate(telemetry[:8]) for r in range(2)]
        return float(np.quantile([ruler.distances(h, ruler.self_term(h), bank[i:i + 1], bank_self[i:i + 1])[0]
                                  for i, h in held], 0.9))

    floor, floor_alt = noise_floor(cfg.first_ticks), noise_floor(cfg.first_ticks_alt)

    theta_d = np.full((T, K), np.nan)
    n_obs = np.zeros(T)
    best_r = np.full(T, np.nan)
    D = np.zeros((T, T))
    probe_D = np.zeros((P, T))
    s = cfg.controller.prior_strength
    glob = np.full((T + 1, K), np.nan)  # glob[i] = the global prior after i tasks (glob[0]: none)
    diag = np.zeros(T)  # normalized reward of the deployed policy for task j right after learning it
    diag_shared = np.zeros(T)
    start_warm = np.full(T, np.nan)  # task i as a new domain: normalized reward of its warm start
    start_global = np.full(T, np.nan)
    warm_regret = np.full(T, np.nan)  # probes' mean warm-start regret after task i
    source_level = np.full(T, np.nan)  # mean diag of the tasks known when task i arrives
    prev_unit = None
    d_typ_after = np.full(T, np.nan)  # the known tasks' median nearest-neighbour distance after task i
    nearest = np.full(T, np.inf)  # each task's distance to its nearest other known task
    say(f"seed {seed}: {T} tasks")
    for i in range(T):
        # --- task i arrives as a new domain: warm start from what is known (tasks < i)
        if i >= 1:
            d_new = ruler.distances(first_z[i], first_self[i], bank[:i], bank_self[:i])
            start, _, _ = warm_start_unit(glob[i], theta_d[:i], d_new, max(d_typ_after[i - 1], floor), cfg.warm)
            start_warm[i] = norm_t(start[None, :], [i])[0]
            start_global[i] = norm_t(glob[i][None, :], [i])[0]
            d_alt = ruler.distances(alt_z[i], alt_self[i], bank[:i], bank_self[:i])
            start_a, _, _ = warm_start_unit(glob[i], theta_d[:i], d_alt, max(d_typ_after[i - 1], floor_alt), cfg.warm)
            start_alt[i] = norm_t(start_a[None, :], [i])[0]
            source_level[i] = diag[:i].mean()
        # --- learn task i
        prior = domain_priors(telemetry[i])
        theta_d[i] = prior_vector(prior)
        n_obs[i] = float(prior["n_obs"].max()) if len(prior) else 0.0
        r = pd.to_numeric(prior["best_reward"], errors="coerce").to_numpy(float) if len(prior) else np.array([])
        best_r[i] = float(np.nanmean(r)) if np.isfinite(r).any() else np.nan
        if i >= 1:
            d_i = ruler.distances(bank[i], bank_self[i], bank[:i], bank_self[:i])
            D[i, :i] = D[:i, i] = d_i
            nearest[:i] = np.minimum(nearest[:i], d_i)
            nearest[i] = d_i.min()
        agg = aggregate_arrays(theta_d[: i + 1], n_obs[: i + 1], best_r[: i + 1],
                               _median_excluding_diagonal(D[: i + 1, : i + 1]), prev_unit, i + 1, cfg.prior_config)
        prev_unit = agg.theta_unit
        glob[i + 1] = agg.theta_unit
        own = np.where(np.isfinite(theta_d[i]), theta_d[i], agg.theta_unit)
        w = s / (s + n_obs[i])
        diag[i] = norm_t(((1 - w) * own + w * agg.theta_unit)[None, :], [i])[0]
        diag_shared[i] = norm_t(agg.theta_unit[None, :], [i])[0]
        # --- the probes' warm starts with what is known after task i
        for p in range(P):
            probe_D[p, i] = ruler.distances(probe_z[p], probe_self[p], bank[i:i + 1], bank_self[i:i + 1])[0]
            probe_D_alt[p, i] = ruler.distances(probe_alt_z[p], probe_alt_self[p], bank[i:i + 1],
                                                bank_self[i:i + 1])[0]
        d_typ_after[i] = float(np.median(nearest[: i + 1])) if i >= 1 else float("nan")
        if i >= 1:
            d_typ = d_typ_after[i]
            starts = np.vstack([warm_start_unit(agg.theta_unit, theta_d[: i + 1], probe_D[p, : i + 1], max(d_typ, floor),
                                                cfg.warm)[0] for p in range(P)])
        else:
            starts = np.repeat(agg.theta_unit[None, :], P, axis=0)
        warm_regret[i] = float(np.mean(1.0 - norm_p(starts)))
        if (i + 1) % 250 == 0:
            say(f"seed {seed}: {i + 1}/{T} tasks ({time.perf_counter() - t0:.0f} s)")
    stream_seconds = time.perf_counter() - t0

    # --- retention: what is deployed for every task after the last one
    final = glob[T]
    own_all = np.where(np.isfinite(theta_d), theta_d, final)
    w_all = (s / (s + n_obs))[:, None]
    final_sys = norm_t((1 - w_all) * own_all + w_all * final, slice(None))
    final_shared = norm_t(np.repeat(final[None, :], T, axis=0), slice(None))
    checkpoints = {}
    for c in sorted({min(T, x) for x in (10, 100, 250, 500, T)}):
        own_c = np.where(np.isfinite(theta_d[:c]), theta_d[:c], glob[c])
        dep = (1 - w_all[:c]) * own_c + w_all[:c] * glob[c]
        checkpoints[c] = float(norm_t(dep, slice(0, c)).sum() / diag[:c].sum())
    retention = float(final_sys[: T - 1].sum() / diag[: T - 1].sum()) if T > 1 else 1.0
    retention_shared = float(final_shared[: T - 1].sum() / diag_shared[: T - 1].sum()) if T > 1 else 1.0

    # --- convergence
    move = np.r_[np.nan, np.max(np.abs(np.diff(glob[1:], axis=0)), axis=1)]  # move[i]: version i+1 vs i
    big = np.flatnonzero(move > 0.01)
    t_prior = int(big[-1]) + 1 if big.size else 1  # after task t_prior the prior never moves > 1 % again
    future_min = np.minimum.accumulate(warm_regret[::-1])[::-1]
    improving = np.flatnonzero(warm_regret - future_min > 0.01)
    t_regret = int(improving[-1]) + 2 if improving.size else 1

    # --- transfer
    idx = np.arange(cfg.transfer_from_task, T)
    transfer = float(np.mean(start_warm[idx]) / np.mean(source_level[idx])) if idx.size else float("nan")
    transfer_alt = float(np.mean(start_alt[idx]) / np.mean(source_level[idx])) if idx.size else float("nan")
    probe_start_alt = norm_p(np.vstack([warm_start_unit(glob[T], theta_d, probe_D_alt[p], max(d_typ_after[T - 1], floor_alt),
                                                        cfg.warm)[0] for p in range(P)])).tolist()
    transfer_global = float(np.mean(start_global[idx]) / np.mean(source_level[idx])) if idx.size else float("nan")

    # --- few-shot and efficiency: the controller on the probes, with the final system
    say(f"seed {seed}: controller runs on {P} probes")
    t1 = time.perf_counter()
    d_typ = d_typ_after[T - 1]
    few, few_any, reach_warm, reach_scratch, start_probe = [], [], [], [], []
    few_alt, reach_alt = [], []
    trips = 0  # the sustained-drop monitor (meta.fallback) replayed on these healthy runs: false alarms
    H = cfg.efficiency_horizon
    for p in range(P):
        start, lam, close = warm_start_unit(final, theta_d, probe_D[p], max(d_typ, floor), cfg.warm)
        start_knobs = unit_to_knobs(start)
        engine = engine_of(f"probe{p}", probe_optima[p])
        run_seed = 10_000 * seed + p
        warm_state = cold_start(start_knobs, cfg.controller, seed=run_seed)
        warm_state.prior_source = "neighbours" if close.size else "global"
        # the wired path: a neighbours' start keeps its own pull target (prior None), a global start the global prior
        warm = run_closed_loop(engine, H, 1, run_seed, cfg.controller,
                               None if close.size else start_knobs, state=warm_state)
        scratch = run_closed_loop(engine, H, 1, run_seed, cfg.controller, None)

        def normed(col: pd.Series) -> np.ndarray:
            return (col.to_numpy(float) - rand_p[p]) / (orac_p[p] - rand_p[p])

        inc_w, inc_s = normed(warm["incumbent_expected"]), normed(scratch["incumbent_expected"])
        trips += sum(_fallback_trips(frame) for frame in (warm, scratch))
        few.append(float(inc_w[cfg.few_shot_decisions - 1]))
        few_any.append(float(normed(warm["expected_reward"])[: cfg.few_shot_decisions].max()))
        reach_warm.append(_first_reach(inc_w, cfg.efficiency_level, H))
        reach_scratch.append(_first_reach(inc_s, cfg.efficiency_level, H))
        start_probe.append(float(norm_p(np.repeat(start[None, :], P, 0))[p]))
        # the same from the warm start of 20 first ticks
        start_a, _, close_a = warm_start_unit(final, theta_d, probe_D_alt[p], max(d_typ, floor_alt), cfg.warm)
        alt_state = cold_start(unit_to_knobs(start_a), cfg.controller, seed=run_seed)
        alt = run_closed_loop(engine, H, 1, run_seed, cfg.controller,
                              None if close_a.size else unit_to_knobs(start_a), state=alt_state)
        inc_a = normed(alt["incumbent_expected"])
        few_alt.append(float(inc_a[cfg.few_shot_decisions - 1]))
        reach_alt.append(_first_reach(inc_a, cfg.efficiency_level, H))
    controller_seconds = time.perf_counter() - t1
    return {
        "seed": seed,
        "stream_seconds": stream_seconds,
        "controller_seconds": controller_seconds,
        "t_prior": t_prior,
        "t_regret": t_regret,
        "prior_move_at_100": float(np.nanmax(move[99:]) if T > 100 else np.nan),
        "warm_regret_curve": warm_regret.tolist(),
        "prior_move_curve": move.tolist(),
        "warm_regret_at": {c: float(warm_regret[c - 1]) for c in (1, 10, 100, T) if c <= T},
        "transfer": transfer,
        "transfer_global_only": transfer_global,
        "transfer_alt": transfer_alt,
        "probe_start_alt": probe_start_alt,
        "start_warm_mean": float(np.mean(start_warm[idx])) if idx.size else float("nan"),
        "start_global_mean": float(np.mean(start_global[idx])) if idx.size else float("nan"),
        "source_level_mean": float(np.mean(source_level[idx])) if idx.size else float("nan"),
        "retention": retention,
        "retention_shared": retention_shared,
        "retention_checkpoints": checkpoints,
        "diag_mean": float(diag.mean()),
        "final_mean": float(final_sys.mean()),
        "few_shot": few,
        "few_shot_best_in_effect": few_any,
        "probe_start": start_probe,
        "reach_warm": reach_warm,
        "reach_scratch": reach_scratch,
        "few_shot_alt": few_alt,
        "fallback_false_alarms": trips,
        "noise_floor": floor,
        "noise_floor_alt": floor_alt,
        "typical_distance": float(d_typ),
        "fallback_runs": 2 * P,
        "reach_alt": reach_alt,
    }


# ---------------------------------------------------------------------------
# Adaptation time through the real asset path
# ---------------------------------------------------------------------------


def dagster_adaptation(cfg: SeedTargetsConfig, n_fleet: int = 8, fleet_ticks: int = 150) -> dict[str, Any]:
    """Wall time of materializing ``domain_priors[new]``, ``global_prior`` and ``controller_state[new]``.

    A temp SQLite store holds a two-cluster fleet of ``n_fleet`` domains with telemetry, their
    domain priors and a global prior (materialized before the clock starts). The new domain's
    ``first_ticks`` ticks are appended, then the clock runs over the three materializations.
    Returns the seconds, the controller's notes and its first decision's note.
    """
    import tempfile

    import dagster as dg

    from meta_pipeline.defs.governance.controller import controller_state as controller_asset
    from meta_pipeline.defs.meta.priors import domain_priors as domain_priors_asset
    from meta_pipeline.defs.meta.priors import global_prior as global_prior_asset
    from meta_pipeline.defs.resources import StoreResource
    from meta_pipeline.store import MetaStore, dispose_engines

    rng = np.random.default_rng(np.random.SeedSequence([cfg.seeds[0] if cfg.seeds else 0, 5]))
    centers = rng.uniform(0.15, 0.85, (2, K))
    optima = draw_optima(rng, centers, n_fleet + 1, cfg.cluster_spread)
    t_start = pd.Timestamp("2026-01-01", tz="UTC")

    def with_ts(frame: pd.DataFrame, domain: str, first: int) -> pd.DataFrame:
        ts = t_start + pd.Timedelta(minutes=5) * (first + np.arange(len(frame)))
        return frame.assign(domain=domain, ts=ts)

    with tempfile.TemporaryDirectory() as tmp:
        store = MetaStore(db_url=f"sqlite:///{tmp}/seed_targets.db")
        instance = dg.DagsterInstance.ephemeral()
        fleet = [f"d{i}" for i in range(n_fleet)]
        for i, d in enumerate(fleet):
            store.append("telemetry", with_ts(exploration_telemetry(optima[i], fleet_ticks, rng,
                                                                    cfg.exploration_spread), d, 0))
        instance.add_dynamic_partitions("domain", [*fleet, "new"])
        resources = {"store": StoreResource(db_url=store.db_url)}
        quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
        for d in fleet:
            dg.materialize([domain_priors_asset], instance=instance, resources=resources, partition_key=d,
                           run_config=quiet)
        dg.materialize([domain_priors_asset, global_prior_asset], selection=[global_prior_asset],
                       instance=instance, resources=resources, run_config=quiet)
        store.append("telemetry", with_ts(exploration_telemetry(optima[n_fleet], cfg.first_ticks, rng,
                                                                cfg.exploration_spread), "new", 0))
        t0 = time.perf_counter()
        dg.materialize([domain_priors_asset], instance=instance, resources=resources, partition_key="new",
                       run_config=quiet)
        dg.materialize([domain_priors_asset, global_prior_asset], selection=[global_prior_asset],
                       instance=instance, resources=resources, run_config=quiet)
        result = dg.materialize([controller_asset], instance=instance, resources=resources, partition_key="new",
                                run_config=quiet)
        elapsed = time.perf_counter() - t0
        meta = result.asset_materializations_for_node("controller_state")[0].metadata
        decisions = store.read("meta_decisions", domain="new", order_by="decision_no")
        dispose_engines()
    return {
        "seconds": float(elapsed),
        "success": bool(result.success),
        "prior_source": str(meta["prior_source"].value) if "prior_source" in meta else None,
        "notes": str(meta["notes"].value) if "notes" in meta else "",
        "decisions": int(len(decisions)),
    }


# ---------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------


def _ci(values: Sequence[float]) -> tuple[float, float, float]:
    from meta_pipeline.lab.evaluate import mean_ci

    return mean_ci(values)


def seed_targets_section(cfg: SeedTargetsConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every seed's stream, the Dagster timing, and one row per target (definition, figure, met)."""
    t0 = time.perf_counter()
    dagster_result = None
    if cfg.dagster:  # first: the asset path is timed on a quiet start, and its imports happen before the long part
        if progress:
            progress("adaptation time through Dagster")
        dagster_result = dagster_adaptation(cfg)
    runs = [run_stream(cfg, seed, progress) for seed in cfg.seeds]
    out: dict[str, Any] = {"config": {"seeds": list(cfg.seeds), "n_tasks": cfg.n_tasks, "task_ticks": cfg.task_ticks,
                                      "first_ticks": cfg.first_ticks, "n_probe": cfg.n_probe,
                                      "efficiency_horizon": cfg.efficiency_horizon, "warm": vars(cfg.warm)},
                           "runs": runs}
    if dagster_result is not None:
        out["dagster"] = dagster_result
    out["rows"] = target_rows(out, cfg)
    out["seconds"] = time.perf_counter() - t0
    return out


def target_rows(res: dict[str, Any], cfg: SeedTargetsConfig) -> list[dict[str, str]]:
    runs = res["runs"]
    rows: list[dict[str, str]] = []

    def add(target: str, definition: str, value: str, goal: str, met: bool | None) -> None:
        rows.append({"target": target, "definition": definition, "value": value, "goal": goal,
                     "met": "" if met is None else ("yes" if met else "NO")})

    def f(ci: tuple[float, float, float], d: int = 3) -> str:
        m, lo, hi = ci
        return f"{m:.{d}f}" if not np.isfinite(lo) else f"{m:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"

    n = cfg.n_tasks
    tp = [r["t_prior"] for r in runs]
    tr = [r["t_regret"] for r in runs]
    add("meta-learning convergence", "last task after which the global prior moved > 1 % of a knob's range",
        ", ".join(map(str, tp)) + " (per seed)", f"≤ {cfg.convergence_tasks}", max(tp) <= cfg.convergence_tasks)
    add("", "last task after which the probes' warm-start regret improved > 0.01 (normalized)",
        ", ".join(map(str, tr)) + " (per seed)", f"≤ {cfg.convergence_tasks}", max(tr) <= cfg.convergence_tasks)
    add("", f"probes' warm-start regret after {' / '.join(map(str, sorted(runs[0]['warm_regret_at'])))} tasks",
        " / ".join(f"{np.mean([r['warm_regret_at'][c] for r in runs]):.3f}"
                   for c in sorted(runs[0]["warm_regret_at"])), "", None)
    few = [v for r in runs for v in r["few_shot"]]
    few_ci = _ci(few)
    add("few-shot adaptation", f"incumbent after {cfg.few_shot_decisions} decisions from the warm start, normalized "
        f"({len(few)} probe domains)", f(few_ci), f"≥ {cfg.few_shot_level}", few_ci[0] >= cfg.few_shot_level)
    add("", f"share of probe domains ≥ {cfg.few_shot_level} after {cfg.few_shot_decisions} decisions",
        f"{np.mean(np.array(few) >= cfg.few_shot_level):.2f}", "", None)
    add("", "warm start itself (before any decision), normalized", f(_ci([v for r in runs for v in r["probe_start"]])),
        "", None)
    tf = [r["transfer"] for r in runs]
    add("transfer", f"new domain's warm start / source domains' own level (tasks {cfg.transfer_from_task}..{n}), "
        "normalized", f(_ci(tf)), "≥ 0.70", float(np.mean(tf)) >= 0.70)
    add("", "same with the global prior only (no neighbours)", f(_ci([r["transfer_global_only"] for r in runs])),
        "", None)
    add("", f"same with {cfg.first_ticks_alt} first ticks (not {cfg.first_ticks}); probes' warm start then",
        f"{f(_ci([r['transfer_alt'] for r in runs]))}; {f(_ci([v for r in runs for v in r['probe_start_alt']]))}",
        "", None)
    rt = [r["retention"] for r in runs]
    add("knowledge retention", f"Σ final / Σ right-after-learning over {n} sequential tasks (system)",
        f(_ci(rt), 4), "≥ 0.95", float(np.mean(rt)) >= 0.95)
    add("", "same for one shared policy (the global prior alone)", f(_ci([r["retention_shared"] for r in runs]), 4),
        "", None)
    if "dagster" in res:
        dg_res = res["dagster"]
        add("adaptation time", "materialize domain_priors[new] + global_prior + controller_state[new] (s); "
            f"start: {dg_res['prior_source']}", f"{dg_res['seconds']:.2f}", "< 10",
            bool(dg_res["success"] and dg_res["seconds"] < 10))
    rw = [v for r in runs for v in r["reach_warm"]]
    rs = [v for r in runs for v in r["reach_scratch"]]
    H = cfg.efficiency_horizon
    censored = sum(v > H for v in rs)
    ratio = float(np.mean(rs) / np.mean(rw))
    add("learning efficiency", f"decisions to {cfg.efficiency_level:.0%} (incumbent): scratch / warm start "
        f"(means; scratch never reached it in {censored}/{len(rs)} runs of {H})",
        f"{ratio:.1f}× ({np.mean(rs):.1f} vs {np.mean(rw):.1f})" + (" lower bound" if censored else ""),
        "≥ 10×", ratio >= 10)
    ra = [v for r in runs for v in r["reach_alt"]]
    fa = [v for r in runs for v in r["few_shot_alt"]]
    add("", f"with {cfg.first_ticks_alt} first ticks: scratch / warm start; few-shot incumbent after "
        f"{cfg.few_shot_decisions} decisions", f"{np.mean(rs) / np.mean(ra):.1f}× ({np.mean(ra):.1f}); {f(_ci(fa))}",
        "", None)
    fa_runs = sum(r["fallback_runs"] for r in runs)
    add("(sustained drop)", f"fallback trips on the healthy controller runs above ({fa_runs} runs of {H} decisions)",
        str(sum(r["fallback_false_alarms"] for r in runs)), "0 (no false alarm)",
        sum(r["fallback_false_alarms"] for r in runs) == 0)
    return rows


def format_seed_targets(res: dict[str, Any]) -> str:
    rows = res["rows"]
    cols = ["target", "definition", "value", "goal", "met"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    runs = res["runs"]
    lines.append("")
    lines.append(f"seeds {', '.join(str(r['seed']) for r in runs)}; {res['config']['n_tasks']} tasks per seed; "
                 + "; ".join(f"seed {r['seed']}: stream {r['stream_seconds']:.0f} s, controller {r['controller_seconds']:.0f} s"
                             for r in runs) + f"; total {res['seconds']:.0f} s")
    if "dagster" in res:
        lines.append(f"Dagster path: {res['dagster']['notes']}")
    return "\n".join(lines)


def seed_targets_report(seeds: Sequence[int], n_tasks: int = 1000, dagster: bool = True,
                        progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """``evaluate --section seed-targets``: the results (JSON-ready) and the printed table."""
    from meta_pipeline.lab.evaluate import jsonable

    cfg = SeedTargetsConfig(seeds=tuple(seeds), n_tasks=n_tasks, dagster=dagster)
    res = seed_targets_section(cfg, progress)
    return jsonable(res), format_seed_targets(res)
