"""The learn-to-learn benchmark behind ``meta-pipeline evaluate`` (no Dagster in the core).

Every number is measured on simulated engines with planted optima (``synth.make_engine``),
so regret is exact: ``regret_t = oracle reward − expected reward of the knobs in effect at
decision t`` (``engine.expected_reward`` vs ``engine.oracle()``; noise-free, so the
comparison is not blurred by the reward noise the controllers see). Per seed, a new fleet.

Sections
--------
1. **Few-shot warm start.** A fleet of ``n_train_domains`` domains around a shared centre
   (drawn per seed, uniform in [0.15, 0.85] per knob in unit space) explores with random
   knobs; ``domain_priors`` → shift distances → ``aggregate_global_prior`` gives the prior.
   A NEW domain from the same centre is then tuned for ``max(decisions)`` decisions (one
   telemetry tick each; ``governance.simulate.run_closed_loop`` / ``run_tpe``) by: the
   controller from scratch (``cold_start(None)``), the controller from the global prior
   (``cold_start(prior)``, prior passed to every ``update``), the same plus the early
   negative-transfer check (``prior_early``; identical unless the check fires, so any
   difference is a false alarm), Optuna TPE warm-started with the same prior
   (``study.enqueue_trial``; ask/tell, same bounds) and plain TPE. Cumulative regret over
   the first 20 / 50 decisions.
2. **Negative transfer.** The same fleet; the new domain is a planted outlier
   (``make_engine(outlier=True)``: optimum mirrored through the fleet centre). Scratch vs
   prior with the controller's guard (default config) vs controller guard + the early
   check (restart from scratch when it fires) vs prior without any guard (guard window
   set beyond the horizon).
3. **Retention.** ``n_tasks`` domains arrive one after another, alternating between two
   clusters (two centres per seed). Learning task i = storing its ``domain_priors`` and
   appending global prior version i+1 (Reptile step). ``R[i][j]`` = scaled expected reward
   on task j of the policy the system would deploy for task j after learning task i:
   for a learned task (j ≤ i) its own stored best knobs, pulled toward the current global
   prior with the controller's fading weight ``s/(s+n_j)`` (s = prior_strength, n_j the
   task's ticks); for a task not yet seen (j > i) the current global prior (zero-shot).
   Reward is scaled per task ``(r − r_min)/(r_oracle − r_min)`` with r_min the mean reward
   of uniformly random knobs. ACC, BWT and forgetting as in GEM (Lopez-Paz & Ranzato 2017);
   FWT against the default knobs. Two baselines show what the per-domain memory buys: one
   shared policy (the global prior for every task) and sequential fine-tuning (deploy the
   last learned task's knobs everywhere).
4. **Adaptation time.** Wall time (``time.perf_counter``) from a new domain's first
   ``adaptation_ticks`` telemetry ticks to its first prior-based decision: domain_priors +
   shift distances + global prior + warm start + controller cold start + first update.
   Optionally also through Dagster (materialize domain_priors and global_prior in a temp
   SQLite store, then the controller core).
5. **Reptile check.** ``lab.reptile_sinusoid.sinusoid_check`` (Reptile vs joint pretraining on few-shot
   sinusoid regression, paired 95% interval).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from meta_pipeline.meta.controller import ControllerConfig, cold_start, update
from meta_pipeline.lab.simulate import LOOP_START, TICK_EVERY, random_policy_mean, run_closed_loop, run_tpe
from meta_pipeline.knobs import KNOB_NAMES, default_knobs, knobs_to_unit, unit_to_knobs
from meta_pipeline.lab.reptile_sinusoid import sinusoid_check
from meta_pipeline.meta.priors import (
    GlobalPriorConfig,
    aggregate_global_prior,
    domain_priors,
    EARLY_PROBE_TICKS,
    early_negative_transfer,
    prior_vector,
    warm_start_prior,
)
from meta_pipeline.meta.shift import distances_to_new, pairwise_shift_distances
from meta_pipeline.lab.synth import SimEngine, exploration_knobs, make_engine, simulate_telemetry

T0 = pd.Timestamp("2026-01-01", tz="UTC")
TICK = pd.Timedelta(minutes=5)
ARMS = ("scratch", "prior", "prior_early", "optuna_warm", "optuna_cold")
OUTLIER_ARMS = ("scratch", "prior_guard", "prior_guard_early", "prior_no_guard")


@dataclass(frozen=True)
class EvaluationConfig:
    seeds: int = 10
    seed0: int = 0
    n_train_domains: int = 8
    train_ticks: int = 200  # exploration telemetry per fleet domain
    exploration_spread: float = 0.3  # unit-space sd of the fleet's random exploration
    decisions: tuple[int, ...] = (20, 50)  # regret horizons of the warm start
    outlier_decisions: tuple[int, ...] = (50, 100)
    n_tasks: int = 10  # retention
    task_ticks: int = 150
    adaptation_ticks: int = 20
    optuna: bool = True
    dagster_timing: bool = True  # also time the adaptation through Dagster (one run, seed 0)
    reptile_check: bool = True
    reptile_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to sinusoid_check
    controller: ControllerConfig = ControllerConfig()
    prior_config: GlobalPriorConfig = GlobalPriorConfig()


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def mean_ci(x: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval (NaN half-width with one value)."""
    a = np.asarray(x, dtype=float)
    m = float(a.mean())
    if a.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - half, m + half


def ratio_ci(num: Sequence[float], den: Sequence[float], seed: int = 0, n_boot: int = 4000) -> tuple[float, float, float]:
    """mean(num)/mean(den) with a paired percentile-bootstrap 95% interval over seeds."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    point = float(a.mean() / b.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    boots = a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-300)
    return point, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def _fmt(m: float, lo: float, hi: float, digits: int = 3) -> str:
    if not np.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ---------------------------------------------------------------------------
# Simulation plumbing
# ---------------------------------------------------------------------------


def _store_layout(telemetry: pd.DataFrame) -> pd.DataFrame:
    return telemetry.rename(columns={c: c.replace("knob.", "knob_") for c in telemetry.columns})


def explore(engine: SimEngine, n: int, rng: np.random.Generator, spread: float, first_tick: int = 0) -> pd.DataFrame:
    """Telemetry of random exploration around the default knobs (store layout)."""
    return _store_layout(
        simulate_telemetry(engine, exploration_knobs(n, rng, spread=spread), start=T0, every=TICK, rng=rng,
                           first_tick=first_tick)
    )


def learn_fleet_prior(
    engines: Sequence[SimEngine], ticks: int, rng: np.random.Generator, spread: float, cfg: GlobalPriorConfig
) -> tuple[dict[str, float], dict[str, pd.DataFrame], dict[str, pd.DataFrame], dict]:
    """Exploration telemetry per engine → domain priors → global prior version 1."""
    telemetry = {e.domain: explore(e, ticks, rng, spread) for e in engines}
    priors = {d: domain_priors(t) for d, t in telemetry.items()}
    pairwise = pairwise_shift_distances(telemetry, seed=int(rng.integers(2**31)))
    theta, details = aggregate_global_prior(priors, pairwise, None, 1, cfg)
    return theta, priors, telemetry, details


def run_controller(
    engine: SimEngine,
    n_decisions: int,
    *,
    prior: dict[str, float] | None,
    config: ControllerConfig,
    seed: int,
    early_check_low: float | None = None,
    probe_ticks: int = EARLY_PROBE_TICKS,
) -> tuple[np.ndarray, pd.DataFrame, int | None]:
    """The controller in closed loop (``governance.simulate.run_closed_loop``, one tick per
    decision): expected reward of the knobs in effect per decision, the decision frame, and
    the decision after which the early negative-transfer check dropped the prior (or None).

    With ``early_check_low`` (the prior's ``expected_reward_low``) the observed rewards of
    the first ``probe_ticks`` decisions (at the prior's point, or one trial step from it)
    are judged by ``priors.early_negative_transfer``; when it fires the controller restarts
    from scratch (``cold_start(None)``) for the remaining decisions. When it does not fire
    the run is exactly the plain prior run (same seed, same noise).
    """
    full = run_closed_loop(engine, n_decisions, 1, seed, config, prior)
    if early_check_low is None or prior is None or n_decisions <= probe_ticks:
        return full["expected_reward"].to_numpy(), full, None
    head = full.iloc[:probe_ticks]
    negative, _why = early_negative_transfer(head["reward"].to_numpy(), early_check_low, min_ticks=probe_ticks)
    if not negative:
        return full["expected_reward"].to_numpy(), full, None
    restart = cold_start(None, config, seed=seed)
    tail = run_closed_loop(engine, n_decisions - probe_ticks, 1, seed + 7919, config, None, state=restart,
                           start=LOOP_START + TICK_EVERY * probe_ticks)
    tail = tail.assign(decision=tail["decision"] + probe_ticks, tick=tail["tick"] + probe_ticks)
    frame = pd.concat([head, tail], ignore_index=True)
    return frame["expected_reward"].to_numpy(), frame, probe_ticks


def run_optuna(engine: SimEngine, n_decisions: int, *, prior: dict[str, float] | None, seed: int) -> np.ndarray:
    """Optuna TPE (``governance.simulate.run_tpe``: ask/tell, same bounds, seeded), one tick
    per trial; the prior, when given, is the enqueued first trial."""
    return run_tpe(engine, n_decisions, 1, seed, enqueue=prior)["expected_reward"].to_numpy()


def _cumulative_regret(expected: np.ndarray, oracle: float) -> np.ndarray:
    return np.cumsum(oracle - expected)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def _seed_rng(cfg: EvaluationConfig, seed: int, section: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed0, seed, section]))


def _fleet(cfg: EvaluationConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[SimEngine]]:
    center = rng.uniform(0.15, 0.85, len(KNOB_NAMES))
    return center, [make_engine(f"d{i}", rng, center=center) for i in range(cfg.n_train_domains)]


def warm_start_section(cfg: EvaluationConfig, seeds: Sequence[int]) -> dict[str, Any]:
    horizon = max(cfg.decisions)
    arms = [a for a in ARMS if cfg.optuna or not a.startswith("optuna")]
    curves = {a: [] for a in arms}
    prior_errors, false_alarms = [], 0
    for seed in seeds:
        rng = _seed_rng(cfg, seed, 1)
        center, engines = _fleet(cfg, rng)
        prior, _, _, details = learn_fleet_prior(engines, cfg.train_ticks, rng, cfg.exploration_spread, cfg.prior_config)
        new = make_engine("new", rng, center=center)
        oracle_knobs, oracle = new.oracle()
        prior_errors.append(float(np.abs(knobs_to_unit(prior) - knobs_to_unit(oracle_knobs))[0]))
        run_seed = 1000 + seed  # common random numbers: every arm sees the same noise stream
        for arm in arms:
            if arm == "scratch":
                expected = run_controller(new, horizon, prior=None, config=cfg.controller, seed=run_seed)[0]
            elif arm == "prior":
                expected = run_controller(new, horizon, prior=prior, config=cfg.controller, seed=run_seed)[0]
            elif arm == "prior_early":
                expected, _, dropped = run_controller(new, horizon, prior=prior, config=cfg.controller, seed=run_seed,
                                                      early_check_low=details["expected_reward_low"])
                false_alarms += dropped is not None  # an in-distribution domain: any drop is a false alarm
            else:
                expected = run_optuna(new, horizon, prior=prior if arm == "optuna_warm" else None, seed=run_seed)
            curves[arm].append(_cumulative_regret(expected, oracle))
    curves_arr = {a: np.vstack(c) for a, c in curves.items()}
    out: dict[str, Any] = {"arms": arms, "horizons": list(cfg.decisions), "n_seeds": len(seeds),
                           "prior_tau_abs_error_unit": mean_ci(prior_errors),
                           "early_check_false_alarms": f"{false_alarms}/{len(seeds)}"}
    for h in cfg.decisions:
        regret = {a: curves_arr[a][:, h - 1] for a in arms}
        out[f"regret_{h}"] = {a: mean_ci(regret[a]) for a in arms}
        out[f"regret_{h}_per_seed"] = {a: regret[a].tolist() for a in arms}
        for arm in ("prior", "prior_early"):
            rel = ratio_ci(regret[arm], regret["scratch"], seed=h)
            out[f"{arm}_reduction_vs_scratch_{h}"] = (1 - rel[0], 1 - rel[2], 1 - rel[1])
            if "optuna_warm" in arms:
                out[f"{arm}_minus_optuna_warm_{h}"] = mean_ci(regret[arm] - regret["optuna_warm"])
    out["curves_mean"] = {a: curves_arr[a].mean(0).tolist() for a in arms}
    out["curves_ci"] = {a: _curve_ci(curves_arr[a]) for a in arms}
    return out


def _curve_ci(curves: np.ndarray) -> list[list[float]]:
    n = curves.shape[0]
    if n < 2:
        return [curves[0].tolist(), curves[0].tolist()]
    half = stats.t.ppf(0.975, n - 1) * curves.std(0, ddof=1) / math.sqrt(n)
    m = curves.mean(0)
    return [(m - half).tolist(), (m + half).tolist()]


def negative_transfer_section(cfg: EvaluationConfig, seeds: Sequence[int]) -> dict[str, Any]:
    horizon = max(cfg.outlier_decisions)
    # replace, not asdict: asdict would turn the nested RewardWeights into a plain dict
    no_guard = replace(cfg.controller, negative_transfer_window=100_000)
    curves = {a: [] for a in OUTLIER_ARMS}
    disabled_at, early_at = [], []
    for seed in seeds:
        rng = _seed_rng(cfg, seed, 2)
        center, engines = _fleet(cfg, rng)
        prior, _, _, details = learn_fleet_prior(engines, cfg.train_ticks, rng, cfg.exploration_spread, cfg.prior_config)
        outlier = make_engine("outlier", rng, outlier=True, center=center)
        _, oracle = outlier.oracle()
        run_seed = 2000 + seed
        exp_s, _, _ = run_controller(outlier, horizon, prior=None, config=cfg.controller, seed=run_seed)
        exp_g, dec_g, _ = run_controller(outlier, horizon, prior=prior, config=cfg.controller, seed=run_seed)
        exp_e, _, dropped = run_controller(outlier, horizon, prior=prior, config=cfg.controller, seed=run_seed,
                                           early_check_low=details["expected_reward_low"])
        exp_n, _, _ = run_controller(outlier, horizon, prior=prior, config=no_guard, seed=run_seed)
        for arm, e in zip(OUTLIER_ARMS, (exp_s, exp_g, exp_e, exp_n)):
            curves[arm].append(_cumulative_regret(e, oracle))
        hit = dec_g.loc[dec_g["prior_disabled"].astype(bool), "decision"]
        disabled_at.append(int(hit.iloc[0]) if len(hit) else None)
        early_at.append(dropped)
    curves_arr = {a: np.vstack(c) for a, c in curves.items()}
    out: dict[str, Any] = {"arms": list(OUTLIER_ARMS), "horizons": list(cfg.outlier_decisions), "n_seeds": len(seeds)}
    for h in cfg.outlier_decisions:
        regret = {a: curves_arr[a][:, h - 1] for a in OUTLIER_ARMS}
        out[f"regret_{h}"] = {a: mean_ci(regret[a]) for a in OUTLIER_ARMS}
        out[f"guard_over_scratch_{h}"] = ratio_ci(regret["prior_guard"], regret["scratch"], seed=h)
        out[f"guard_early_over_scratch_{h}"] = ratio_ci(regret["prior_guard_early"], regret["scratch"], seed=h + 1)
        out[f"no_guard_over_scratch_{h}"] = ratio_ci(regret["prior_no_guard"], regret["scratch"], seed=h + 2)
    for key, hits in (("guard", disabled_at), ("early_check", early_at)):
        fired = [d for d in hits if d is not None]
        out[f"{key}_fired"] = f"{len(fired)}/{len(hits)}"
        out[f"{key}_fired_at_decision"] = mean_ci(fired) if fired else (float("nan"),) * 3
    out["curves_mean"] = {a: curves_arr[a].mean(0).tolist() for a in OUTLIER_ARMS}
    out["curves_ci"] = {a: _curve_ci(curves_arr[a]) for a in OUTLIER_ARMS}
    return out


def gem_metrics(R: np.ndarray, baseline: np.ndarray | None = None) -> dict[str, float]:
    """ACC, BWT, forgetting (GEM, Lopez-Paz & Ranzato 2017) of an accuracy matrix R[i][j]
    (performance on task j after learning task i, i, j = 0..T−1); FWT needs per-task
    baselines (performance before any training on it)."""
    T = R.shape[0]
    last = R[T - 1]
    out = {
        "ACC": float(last.mean()),
        "BWT": float(np.mean([last[j] - R[j, j] for j in range(T - 1)])) if T > 1 else 0.0,
        # forgetting of task j: best earlier performance on it minus the final one
        "forgetting": float(np.mean([max(R[l, j] for l in range(j, T - 1)) - last[j] for j in range(T - 1)]))
        if T > 1 else 0.0,
    }
    if baseline is not None and T > 1:
        out["FWT"] = float(np.mean([R[j - 1, j] - baseline[j] for j in range(1, T)]))
    return out


def retention_section(cfg: EvaluationConfig, seeds: Sequence[int]) -> dict[str, Any]:
    T = cfg.n_tasks
    metrics = {"system": [], "shared_policy": [], "sequential_finetune": []}
    R_sum = np.zeros((T, T))
    s = cfg.controller.prior_strength
    for seed in seeds:
        rng = _seed_rng(cfg, seed, 3)
        centers = rng.uniform(0.15, 0.85, (2, len(KNOB_NAMES)))
        engines = [make_engine(f"t{i}", rng, center=centers[i % 2]) for i in range(T)]
        oracle = np.array([e.oracle()[1] for e in engines])
        r_min = np.array([random_policy_mean(e, 0, n=256, seed=seed * 100 + i) for i, e in enumerate(engines)])

        def scaled(j: int, knobs: dict[str, float]) -> float:
            return (engines[j].expected_reward(knobs) - r_min[j]) / (oracle[j] - r_min[j])

        telemetry: dict[str, pd.DataFrame] = {}
        priors: dict[str, pd.DataFrame] = {}
        theta_cont = None
        R = {k: np.zeros((T, T)) for k in metrics}
        for i, eng in enumerate(engines):
            telemetry[eng.domain] = explore(eng, cfg.task_ticks, rng, cfg.exploration_spread)
            priors[eng.domain] = domain_priors(telemetry[eng.domain])
            pairwise = pairwise_shift_distances(telemetry, seed=seed)
            theta, details = aggregate_global_prior(priors, pairwise, theta_cont, i + 1, cfg.prior_config)
            theta_cont = details["theta_continuous"]
            g_unit = knobs_to_unit(theta)
            last_own = prior_vector(priors[eng.domain])
            for j in range(T):
                if j <= i:
                    own = prior_vector(priors[engines[j].domain])
                    own = np.where(np.isfinite(own), own, g_unit)
                    w = s / (s + cfg.task_ticks)  # the controller's fading prior weight
                    deployed = unit_to_knobs((1 - w) * own + w * g_unit)
                else:
                    deployed = theta  # zero-shot: the global prior
                R["system"][i, j] = scaled(j, deployed)
                R["shared_policy"][i, j] = scaled(j, theta)
                R["sequential_finetune"][i, j] = scaled(j, unit_to_knobs(np.where(np.isfinite(last_own), last_own, g_unit)))
        defaults = np.array([scaled(j, default_knobs()) for j in range(T)])
        for k in metrics:
            metrics[k].append(gem_metrics(R[k], defaults))
        R_sum += R["system"]
    out: dict[str, Any] = {"n_tasks": T, "n_seeds": len(seeds), "R_mean": (R_sum / len(seeds)).tolist()}
    for k, per_seed in metrics.items():
        out[k] = {m: mean_ci([p[m] for p in per_seed]) for m in per_seed[0]}
    return out


def adaptation_section(cfg: EvaluationConfig, seeds: Sequence[int]) -> dict[str, Any]:
    times = []
    for seed in seeds:
        rng = _seed_rng(cfg, seed, 4)
        center, engines = _fleet(cfg, rng)
        _, priors, telemetry, details = learn_fleet_prior(
            engines, cfg.train_ticks, rng, cfg.exploration_spread, cfg.prior_config)
        new = make_engine("new", rng, center=center)
        first = explore(new, cfg.adaptation_ticks, rng, cfg.exploration_spread)
        tick_rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        new_prior = domain_priors(first)
        pairwise = pairwise_shift_distances({**telemetry, "new": first}, seed=seed)
        theta, _ = aggregate_global_prior({**priors, "new": new_prior}, pairwise, details["theta_continuous"], 2,
                                          cfg.prior_config)
        dist = distances_to_new(first, telemetry, seed=seed)
        start, _ = warm_start_prior(theta, priors, dist)
        state = cold_start(start, cfg.controller, seed=seed)
        # the engine runs the cold-start knobs for one tick (microseconds), then the first decision
        row = _store_layout(simulate_telemetry(new, [dict(state.knobs)], start=T0, every=TICK, rng=tick_rng,
                                               first_tick=cfg.adaptation_ticks))
        update(state, row, cfg.controller, start)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"core_seconds": mean_ci(times), "core_seconds_max": float(max(times)), "n_seeds": len(seeds)}
    if cfg.dagster_timing:
        out["dagster_seconds"] = _dagster_adaptation_seconds(cfg)
    return out


def _dagster_adaptation_seconds(cfg: EvaluationConfig) -> float:
    """The same path through Dagster: ephemeral instance, temp SQLite store, seed 0."""
    import tempfile

    import dagster as dg

    from meta_pipeline.defs.meta.priors import domain_priors as domain_priors_asset
    from meta_pipeline.defs.meta.priors import global_prior as global_prior_asset
    from meta_pipeline.defs.resources import StoreResource
    from meta_pipeline.store import MetaStore, dispose_engines

    rng = _seed_rng(cfg, 0, 5)
    center, engines = _fleet(cfg, rng)
    with tempfile.TemporaryDirectory() as tmp:
        store = MetaStore(db_url=f"sqlite:///{tmp}/evaluate.db")
        instance = dg.DagsterInstance.ephemeral()
        for e in engines:
            store.append("telemetry", explore(e, cfg.train_ticks, rng, cfg.exploration_spread).assign(domain=e.domain))
        instance.add_dynamic_partitions("domain", [e.domain for e in engines] + ["new"])
        resources = {"store": StoreResource(db_url=store.db_url)}
        quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
        for e in engines:
            dg.materialize([domain_priors_asset], instance=instance, resources=resources, partition_key=e.domain,
                           run_config=quiet)
        dg.materialize([domain_priors_asset, global_prior_asset], selection=[global_prior_asset],
                       instance=instance, resources=resources, run_config=quiet)
        new = make_engine("new", rng, center=center)
        first = explore(new, cfg.adaptation_ticks, rng, cfg.exploration_spread)
        store.append("telemetry", first.assign(domain="new"))
        t0 = time.perf_counter()
        dg.materialize([domain_priors_asset], instance=instance, resources=resources, partition_key="new",
                       run_config=quiet)
        dg.materialize([domain_priors_asset, global_prior_asset], selection=[global_prior_asset],
                       instance=instance, resources=resources, run_config=quiet)
        latest = store.read_global_prior()
        prior = None if latest is None else latest.values
        state = cold_start(prior, cfg.controller, seed=0)
        row = _store_layout(simulate_telemetry(new, [dict(state.knobs)], start=T0, every=TICK, rng=rng,
                                               first_tick=cfg.adaptation_ticks))
        update(state, row, cfg.controller, prior)
        elapsed = time.perf_counter() - t0
        dispose_engines()
    return float(elapsed)


def reptile_section(cfg: EvaluationConfig) -> dict[str, Any]:
    res = sinusoid_check(**{"seed": cfg.seed0, **cfg.reptile_kwargs})
    keep = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    keep["mse_reptile_ci"] = mean_ci(res["mse_reptile"])
    keep["mse_pretrained_ci"] = mean_ci(res["mse_pretrained"])
    return keep


# ---------------------------------------------------------------------------
# The whole evaluation, its table and its figure
# ---------------------------------------------------------------------------


def run_evaluation(
    seeds: int | Sequence[int] = 10,
    config: EvaluationConfig | None = None,
    out_dir: str | Path | None = "evaluate_out",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every section; returns the results, the table rows, and (with out_dir) writes
    ``evaluate.png`` and ``evaluate.json`` there."""
    cfg = config or EvaluationConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("need at least one seed")
    say = progress or (lambda _msg: None)
    t_all = time.perf_counter()
    results: dict[str, Any] = {"seeds": seed_list, "config": jsonable(asdict(cfg))}
    for name, fn in (
        ("warm_start", lambda: warm_start_section(cfg, seed_list)),
        ("negative_transfer", lambda: negative_transfer_section(cfg, seed_list)),
        ("retention", lambda: retention_section(cfg, seed_list)),
        ("adaptation", lambda: adaptation_section(cfg, seed_list)),
        ("reptile", lambda: reptile_section(cfg) if cfg.reptile_check else None),
    ):
        t0 = time.perf_counter()
        say(f"{name} ...")
        results[name] = fn()
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    results["total_seconds"] = time.perf_counter() - t_all
    results["table"] = summary_rows(results)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig = evaluation_figure(results)
        fig.savefig(out / "evaluate.png", dpi=110, bbox_inches="tight")
        (out / "evaluate.json").write_text(json.dumps(jsonable(results), indent=1, sort_keys=True))
        results["figure_path"] = str(out / "evaluate.png")
    return results


def summary_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """One table: measurement, value [95% CI], target, met."""
    rows: list[dict[str, str]] = []

    def add(section: str, metric: str, value: str, target: str = "", met: bool | None = None,
            seeds: str | None = None) -> None:
        rows.append({"section": section, "metric": metric, "value": value, "target": target,
                     "met": "" if met is None else ("yes" if met else "NO"), "seeds": seeds or str(n)})

    n = len(res["seeds"])
    ws = res["warm_start"]
    for h in ws["horizons"]:
        for arm in ws["arms"]:
            add("warm start", f"cum. regret, first {h}: {arm}", _fmt(*ws[f"regret_{h}"][arm]))
        is_main = h == max(ws["horizons"])
        for arm in ("prior", "prior_early"):
            red = ws[f"{arm}_reduction_vs_scratch_{h}"]
            add("warm start", f"regret reduction {arm} vs scratch ({h})", _fmt(*red, digits=2),
                "≥ 0.30" if is_main else "", bool(red[0] >= 0.30) if is_main else None)
            if f"{arm}_minus_optuna_warm_{h}" in ws:
                d = ws[f"{arm}_minus_optuna_warm_{h}"]
                add("warm start", f"{arm} − Optuna-warm regret ({h})", _fmt(*d), "≤ 0" if is_main else "",
                    bool(d[0] <= 0) if is_main else None)
    add("warm start", "early check false alarms (in-distribution domain)", ws["early_check_false_alarms"])
    add("warm start", "|prior − oracle| tau, unit space", _fmt(*ws["prior_tau_abs_error_unit"]))
    nt = res["negative_transfer"]
    for h in nt["horizons"]:
        for arm in nt["arms"]:
            add("negative transfer", f"outlier cum. regret, first {h}: {arm}", _fmt(*nt[f"regret_{h}"][arm]))
        for key, label in (("guard", "controller guard"), ("guard_early", "controller guard + early check")):
            g = nt[f"{key}_over_scratch_{h}"]
            add("negative transfer", f"{label} / scratch regret ({h})", _fmt(*g, digits=2), "≤ 1.05",
                bool(g[0] <= 1.05))
        ng = nt[f"no_guard_over_scratch_{h}"]
        add("negative transfer", f"no guard / scratch regret ({h})", _fmt(*ng, digits=2))
    for key, label in (("guard", "controller guard"), ("early_check", "early check")):
        add("negative transfer", f"{label} fired (seeds)", nt[f"{key}_fired"])
        add("negative transfer", f"{label} fired at decision", _fmt(*nt[f"{key}_fired_at_decision"], digits=1))
    rt = res["retention"]
    for policy in ("system", "shared_policy", "sequential_finetune"):
        for m in ("ACC", "BWT", "forgetting", "FWT"):
            if m in rt[policy]:
                is_target = policy == "system" and m == "BWT"
                add("retention", f"{policy}: {m} ({rt['n_tasks']} tasks)", _fmt(*rt[policy][m]),
                    "≥ −0.05" if is_target else "", bool(rt[policy][m][0] >= -0.05) if is_target else None)
    ad = res["adaptation"]
    add("adaptation", "first telemetry → first prior-based decision, core (s)", _fmt(*ad["core_seconds"], digits=3)
        + f"; max {ad['core_seconds_max']:.3f}", "< 10", bool(ad["core_seconds_max"] < 10))
    if "dagster_seconds" in ad:
        add("adaptation", "same via Dagster materialize, 1 run (s)", f"{ad['dagster_seconds']:.2f}", "< 10",
            bool(ad["dagster_seconds"] < 10), seeds="1")
    rp = res.get("reptile")
    if rp:
        steps = rp["config"].get("inner_steps", "?")
        add("reptile check", f"sinusoid MSE after {steps} SGD steps: Reptile", _fmt(*rp["mse_reptile_ci"]), seeds="1")
        add("reptile check", f"sinusoid MSE after {steps} SGD steps: joint pretraining",
            _fmt(*rp["mse_pretrained_ci"]), seeds="1")
        lo, hi = rp["diff_ci95"]
        add("reptile check", f"Reptile − pretrained (paired, {rp['n_test_tasks']} tasks)",
            _fmt(rp["diff_mean"], lo, hi), "CI < 0", bool(rp["reptile_better"]), seeds="1")
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    cols = ["section", "metric", "value", "target", "met", "seeds"]
    heads = {"value": "value [95% CI]"}
    widths = {c: max(len(heads.get(c, c)), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(heads.get(c, c).ljust(widths[c]) for c in cols)
    sep = "  ".join("-" * widths[c] for c in cols)
    body = ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])


def evaluation_figure(res: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(13, 9))
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)
    for ax, key, title in ((ax1, "warm_start", "new domain from the fleet centre"),
                           (ax2, "negative_transfer", "planted outlier domain")):
        sec = res[key]
        for arm in sec["arms"]:
            m = np.asarray(sec["curves_mean"][arm])
            lo, hi = (np.asarray(v) for v in sec["curves_ci"][arm])
            x = np.arange(1, len(m) + 1)
            # dashed: arms that coincide with another unless their check fires
            ax.plot(x, m, label=arm, ls="--" if "early" in arm else "-")
            ax.fill_between(x, lo, hi, alpha=0.2)
        ax.set_xlabel("decision")
        ax.set_ylabel("cumulative regret (oracle − expected reward)")
        ax.set_title(f"{title} ({sec['n_seeds']} seeds, 95% CI)")
        ax.legend(fontsize=8)
    R = np.asarray(res["retention"]["R_mean"])
    im = ax3.imshow(R, vmin=min(0.0, float(R.min())), vmax=1.0, cmap="viridis")
    ax3.set_xlabel("task j")
    ax3.set_ylabel("after learning task i")
    ax3.set_title("retention: scaled reward R[i][j] (mean over seeds)")
    fig.colorbar(im, ax=ax3, fraction=0.046)
    rp = res.get("reptile")
    if rp:
        names = ["Reptile", "joint pretraining"]
        means = [rp["mse_reptile_ci"][0], rp["mse_pretrained_ci"][0]]
        errs = [[m - ci[1] for m, ci in zip(means, (rp["mse_reptile_ci"], rp["mse_pretrained_ci"]))],
                [ci[2] - m for m, ci in zip(means, (rp["mse_reptile_ci"], rp["mse_pretrained_ci"]))]]
        ax4.bar(names, means, yerr=errs, color=["tab:green", "tab:gray"], capsize=6)
        ax4.set_ylabel("query MSE after fine-tuning")
        ax4.set_title(f"sinusoid check ({rp['n_test_tasks']} held-out tasks, 95% CI)")
    else:
        ax4.set_axis_off()
    fig.tight_layout()
    return fig


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


