"""The controller in a closed loop with a simulated engine, and its evaluation against planted truth.

`run_closed_loop` lets a `SimEngine` run the controller's knobs, feeds the telemetry back,
and records for every decision the *expected* (noise-free) reward of the knobs that were
in effect next to the oracle's. `evaluate_controller` measures, over seeds × domains:

(a) rollback: a planted harmful change (a bad policy injected through the controller's
    canary path) and how many decisions until the knobs are back at the snapshot;
(b) stationary convergence: expected reward vs the oracle from the defaults and from a poor
    start. Because the defaults already sit near every engine's optimum (≈ 97% of the
    oracle), raw "% of oracle" is also reported as a normalized score
    (reward − random-policy mean) / (oracle − random-policy mean);
(c) regime shift: the optimum moves far away mid-run; recovery to ≥ 85% of the new oracle;
(d) regret over the first 100 decisions, Σ (oracle − expected reward of the knobs in
    effect), against Optuna's TPE sampler (ask/tell, same bounds, seeded) on the same engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import pandas as pd

from meta_pipeline.meta.controller import (
    ControllerConfig,
    ControllerState,
    cold_start,
    inject_change,
    update,
)
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, clip_knobs, default_knobs, knobs_to_unit, unit_to_knobs
from meta_pipeline.lab.synth import SimEngine, make_engine

TICK_EVERY = pd.Timedelta(minutes=5)
LOOP_START = pd.Timestamp("2026-01-01", tz="UTC")
# A start far from every engine's optimum (the fleet centre mirrored), for a non-trivial climb.
POOR_START_UNIT = np.array([0.05, 0.9, 0.95, 0.05, 0.0, 0.95])


def poor_start_knobs() -> dict[str, float]:
    return unit_to_knobs(POOR_START_UNIT)


def start_state(knobs: Mapping[str, float], config: ControllerConfig = ControllerConfig(), seed: int = 0) -> ControllerState:
    """A cold start (no prior, wide exploration) placed at given knobs."""
    state = cold_start(None, config, seed)
    state.knobs = clip_knobs(knobs)
    return state


def _telemetry_frame(engine: SimEngine, knobs: Mapping[str, float], first_tick: int, n: int,
                     rng: np.random.Generator, start: pd.Timestamp, every: pd.Timedelta) -> pd.DataFrame:
    rows = []
    for t in range(first_tick, first_tick + n):
        row = {"ts": start + every * t, **engine.tick(dict(knobs), t, rng)}
        row.update({f"knob_{k}": float(knobs[k]) for k in KNOB_NAMES})
        rows.append(row)
    return pd.DataFrame(rows)


def with_history(state: ControllerState, engine: SimEngine, n_ticks: int, seed: int,
                 config: ControllerConfig = ControllerConfig()) -> ControllerState:
    """The state after deciding on `n_ticks` of past telemetry the controller did not steer
    (random exploration around the defaults, as `synth` writes): no evidence about its own
    knobs, but observations of the reward surface for its model."""
    from meta_pipeline.lab.synth import exploration_knobs, simulate_telemetry

    rng = np.random.default_rng([seed, 7])
    history = simulate_telemetry(engine, exploration_knobs(n_ticks, rng), start=LOOP_START - TICK_EVERY * (n_ticks + 1),
                                 every=TICK_EVERY, rng=rng)
    history = history.rename(columns={f"knob.{k}": f"knob_{k}" for k in KNOB_NAMES})
    from meta_pipeline.meta.controller import advance

    state, _ = advance(state, history, config)
    return state


class _Oracle:
    """Oracle reward per regime, computed once."""

    def __init__(self, engine: SimEngine):
        self.engine = engine
        self.cache: dict[bool, float] = {}

    def __call__(self, tick: int) -> float:
        shifted = engine_shifted(self.engine, tick)
        if shifted not in self.cache:
            self.cache[shifted] = self.engine.oracle(tick)[1]
        return self.cache[shifted]


def engine_shifted(engine: SimEngine, tick: int) -> bool:
    return engine.shift_at is not None and engine.shifted_optimum is not None and tick >= engine.shift_at


def run_closed_loop(
    engine: SimEngine,
    n_decisions: int,
    ticks_per_decision: int = 1,
    seed: int = 0,
    config: ControllerConfig = ControllerConfig(),
    prior: dict[str, float] | None = None,
    *,
    state: ControllerState | None = None,
    inject: Mapping[int, Mapping[str, float]] | None = None,
    start: pd.Timestamp = LOOP_START,
    every: pd.Timedelta = TICK_EVERY,
) -> pd.DataFrame:
    """Run the controller against an engine for `n_decisions` decisions; one row per decision.

    The engine runs the controller's knobs for `ticks_per_decision` ticks, the controller
    decides on that batch. `state` starts from a given state (default: `cold_start(prior)`);
    `inject` = {decision index: knob changes} forces a change through the controller's canary
    path just before that decision's ticks run (a planted policy). Columns: decision, tick,
    reward (observed batch mean), reward_ema, expected_reward (of the knobs in effect for the
    batch), incumbent_expected (of the knobs the controller trusts after deciding), oracle_reward,
    fraction_of_oracle, action, rolled_back, reverted, judged, injected, prior_weight,
    prior_disabled, knob_<name> (in effect for the batch).
    """
    config = replace(config, ticks_per_decision=ticks_per_decision)
    rng = np.random.default_rng(seed)
    state = state if state is not None else cold_start(prior, config, seed)
    oracle = _Oracle(engine)
    inject = dict(inject or {})
    rows = []
    for i in range(n_decisions):
        injected = i in inject
        if injected:
            state = inject_change(state, inject[i], config, note="injected")
        tick = i * ticks_per_decision
        knobs = dict(state.knobs)
        batch = _telemetry_frame(engine, knobs, tick, ticks_per_decision, rng, start, every)
        state, decision = update(state, batch, config, prior)
        expected = float(np.mean([engine.expected_reward(knobs, t) for t in range(tick, tick + ticks_per_decision)]))
        best = oracle(tick)
        incumbent = state.incumbent_knobs
        rows.append(
            {
                "decision": i + 1,
                "tick": tick,
                "reward": decision["reward"],
                "reward_ema": decision["reward_ema"],
                "expected_reward": expected,
                "incumbent_expected": engine.expected_reward(incumbent, tick + ticks_per_decision),
                "oracle_reward": best,
                "fraction_of_oracle": expected / best if best else math.nan,
                "action": decision["action"],
                "rolled_back": decision["rolled_back"],
                "reverted": decision["reverted"],
                "judged": decision["judged"],
                "injected": injected,
                "prior_weight": decision["prior_weight"],
                "prior_disabled": decision["prior_disabled"],
                **{f"knob_{k}": knobs[k] for k in KNOB_NAMES},
            }
        )
    frame = pd.DataFrame(rows)
    frame.attrs["final_state"] = state
    return frame


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------


def random_policy_mean(engine: SimEngine, tick: int = 0, n: int = 2000, seed: int = 0) -> float:
    """Mean expected reward of knobs drawn uniformly within bounds (ints/bools uniform too)."""
    rng = np.random.default_rng(seed)
    units = rng.random((n, len(KNOB_NAMES)))
    return float(np.mean([engine.expected_reward(unit_to_knobs(u), tick) for u in units]))


def run_tpe(
    engine: SimEngine,
    n_trials: int,
    ticks_per_decision: int = 1,
    seed: int = 0,
    enqueue: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Optuna TPE (ask/tell, seeded) on the same engine: one trial = one decision's ticks.

    Float knobs are suggest_float over their bounds, int knobs suggest_int, bool knobs
    categorical {0, 1}. `enqueue` makes the first trial a given point (e.g. the defaults).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, spec in KNOBS.items():
        if spec.kind == "bool":
            distributions[name] = optuna.distributions.CategoricalDistribution([0, 1])
        elif spec.kind == "int":
            distributions[name] = optuna.distributions.IntDistribution(int(spec.low), int(spec.high))
        else:
            distributions[name] = optuna.distributions.FloatDistribution(spec.low, spec.high)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    if enqueue is not None:
        study.enqueue_trial({k: (int(v) if KNOBS[k].kind != "float" else float(v)) for k, v in enqueue.items()})
    rng = np.random.default_rng(seed)
    oracle = _Oracle(engine)
    rows = []
    for i in range(n_trials):
        trial = study.ask(distributions)
        knobs = clip_knobs({k: float(trial.params[k]) for k in KNOB_NAMES})
        tick = i * ticks_per_decision
        rewards = []
        for t in range(tick, tick + ticks_per_decision):
            rewards.append(float(_reward_of(engine.tick(knobs, t, rng))))
        study.tell(trial, float(np.mean(rewards)))
        expected = float(np.mean([engine.expected_reward(knobs, t) for t in range(tick, tick + ticks_per_decision)]))
        rows.append({"decision": i + 1, "tick": tick, "reward": float(np.mean(rewards)), "expected_reward": expected,
                     "oracle_reward": oracle(tick)})
    return pd.DataFrame(rows)


def _reward_of(tick_row: Mapping[str, float]) -> float:
    from meta_pipeline.meta.reward import meta_reward

    return meta_reward(**tick_row)


def regret(frame: pd.DataFrame, n: int = 100) -> float:
    """Σ over the first n decisions of (oracle − expected reward of the knobs in effect)."""
    head = frame.head(n)
    return float((head["oracle_reward"] - head["expected_reward"]).sum())


def first_index(values: np.ndarray, threshold: float) -> int | None:
    """1-based index of the first value ≥ threshold, None if never."""
    hit = np.flatnonzero(np.asarray(values) >= threshold)
    return int(hit[0]) + 1 if len(hit) else None


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _harmful_changes(engine: SimEngine, knobs: Mapping[str, float], target_drop: float | None) -> tuple[dict[str, float], float]:
    """A planted bad policy from `knobs`: `tau` (the influential knob) moved away from the optimum.

    target_drop None: tau to the bound farthest from the optimum (severe);
    else the tau value whose expected reward drop is closest to target_drop.
    """
    base = engine.expected_reward(dict(knobs))
    opt = engine.optimum_at(0)
    if target_drop is None:
        spec = KNOBS["tau"]
        change = {"tau": spec.low if opt["tau"] - spec.low > spec.high - opt["tau"] else spec.high}
    else:
        spec = KNOBS["tau"]
        candidates = np.linspace(spec.low, spec.high, 381)
        drops = np.array([base - engine.expected_reward({**knobs, "tau": float(c)}) for c in candidates])
        change = {"tau": float(candidates[int(np.argmin(np.abs(drops - target_drop)))])}
    return change, base - engine.expected_reward({**knobs, **change})


def _fleet(seed: int, n_domains: int) -> list[SimEngine]:
    rng = np.random.default_rng(seed)
    return [make_engine(f"sim{j}", rng) for j in range(n_domains)]


def _mirror_optimum(engine: SimEngine) -> dict[str, float]:
    """A far-away optimum for a regime shift: the optimum mirrored in the unit cube, tier2 flipped."""
    unit = np.clip(1.0 - knobs_to_unit(engine.optimum), 0.05, 0.95)
    shifted = unit_to_knobs(unit)
    shifted["tier2_enabled"] = 1.0 - engine.optimum["tier2_enabled"]
    return shifted


def _normalized(expected: np.ndarray, oracle: float, random_mean: float) -> np.ndarray:
    return (np.asarray(expected) - random_mean) / (oracle - random_mean)


def evaluate_controller(
    seeds: Iterable[int] = range(5),
    n_domains: int = 3,
    n_decisions: int = 100,
    config: ControllerConfig = ControllerConfig(),
    include_tpe: bool = True,
) -> dict:
    """The four measurements (a)-(d) over seeds × domains; returns per-run rows and summaries."""
    seeds = list(seeds)
    rollback_rows, stationary_rows, shift_rows, regret_rows = [], [], [], []
    for seed in seeds:
        for j, engine in enumerate(_fleet(seed, n_domains)):
            run_seed = seed * 1000 + j
            oracle = engine.oracle(0)[1]
            rnd = random_policy_mean(engine, 0, seed=run_seed)

            # (b) stationary, from the defaults, from a poor start and from a random point
            random_start = unit_to_knobs(np.random.default_rng([seed, j, 99]).random(len(KNOB_NAMES)))
            for start_name, start_knobs in (("defaults", default_knobs()), ("poor", poor_start_knobs()),
                                            ("random", random_start), ("poor+history", poor_start_knobs())):
                state = start_state(start_knobs, config, run_seed)
                if start_name.endswith("+history"):
                    # the domain's telemetry already holds 60 ticks of someone else's exploration
                    state = with_history(state, engine, 60, run_seed, config)
                run = run_closed_loop(engine, n_decisions, 1, run_seed, config, state=state)
                exp = run["expected_reward"].to_numpy()
                norm = _normalized(exp, oracle, rnd)
                inc = run["incumbent_expected"].to_numpy()
                stationary_rows.append({
                    "seed": seed, "domain": engine.domain, "start": start_name,
                    "oracle": oracle, "random_mean": rnd,
                    "start_fraction": engine.expected_reward(start_knobs) / oracle,
                    "start_normalized": float(_normalized([engine.expected_reward(start_knobs)], oracle, rnd)[0]),
                    "first_hit_90pct_oracle": first_index(exp / oracle, 0.9),
                    "first_hit_90pct_normalized": first_index(norm, 0.9),
                    "fraction_at_100": float(exp[-1] / oracle),
                    "normalized_at_100": float(norm[-1]),
                    "mean_fraction_91_100": float(np.mean(exp[-10:]) / oracle),
                    "incumbent_fraction_at_100": float(inc[-1] / oracle),
                    "incumbent_normalized_at_100": float(_normalized([inc[-1]], oracle, rnd)[0]),
                    "rollbacks": int(run["rolled_back"].sum()),
                    "regret": regret(run, n_decisions),
                })
                regret_rows.append({"seed": seed, "domain": engine.domain, "method": f"controller/{start_name}",
                                    "regret": regret(run, n_decisions)})

            # (a) planted harmful changes after a warm-up from the defaults
            warm, inject_at = 30, (30, 60, 90)
            state = start_state(default_knobs(), config, run_seed)
            run_pre = run_closed_loop(engine, warm, 1, run_seed, config, state=state)
            state = run_pre.attrs["final_state"]
            plan = {}
            for at, drop in zip(inject_at, (None, 0.10, 0.05)):
                plan[at] = drop  # severe (tau to its far bound), moderate (≈ 2 noise SD), mild (≈ 1 noise SD)
            decision = warm
            rng_seed = run_seed + 17
            for at, drop_target in plan.items():
                # run up to the injection point
                if at > decision:
                    seg = run_closed_loop(engine, at - decision, 1, rng_seed + at, config, state=state,
                                          start=LOOP_START + TICK_EVERY * decision)
                    state = seg.attrs["final_state"]
                    decision = at
                change, planted_drop = _harmful_changes(engine, state.incumbent_knobs, drop_target)
                snapshot_knobs = state.incumbent_knobs
                seg = run_closed_loop(engine, 12, 1, rng_seed + at + 1, config, state=state, inject={0: change},
                                      start=LOOP_START + TICK_EVERY * decision)
                state = seg.attrs["final_state"]
                decision += 12
                verdicts = seg[seg["judged"] == "injected"]
                if len(verdicts):
                    first = verdicts.iloc[0]
                    back_after = int(first["decision"])
                    outcome = "rollback" if first["rolled_back"] else ("revert" if first["reverted"] else "accepted")
                else:
                    back_after, outcome = None, "none"
                # after the verdict the injected knobs must be back at their snapshot values
                restored = None
                if back_after is not None and back_after < len(seg):
                    in_effect = seg.iloc[back_after]
                    restored = all(in_effect[f"knob_{k}"] == snapshot_knobs[k] for k in change)
                rollback_rows.append({
                    "seed": seed, "domain": engine.domain, "severity": {None: "severe", 0.10: "moderate"}.get(drop_target, "mild"),
                    "planted_drop": planted_drop, "change": change, "decisions_to_return": back_after,
                    "outcome": outcome,
                    "within_3": back_after is not None and back_after <= 3 and outcome in ("rollback", "revert"),
                    "restored_snapshot": restored,
                })

            # (c) regime shift: converge 50 decisions from the defaults, then the optimum moves far away
            pre = 50
            shifted = replace(engine, shift_at=pre, shifted_optimum=_mirror_optimum(engine))
            run = run_closed_loop(shifted, pre + n_decisions, 1, run_seed + 7, config,
                                  state=start_state(default_knobs(), config, run_seed + 7))
            new_oracle = shifted.oracle(pre)[1]
            new_rnd = random_policy_mean(shifted, pre, seed=run_seed)
            post = run[run["tick"] >= pre]
            exp = post["expected_reward"].to_numpy()
            norm = _normalized(exp, new_oracle, new_rnd)
            shift_rows.append({
                "seed": seed, "domain": engine.domain,
                "fraction_before_shift": float(run[run["tick"] < pre]["expected_reward"].iloc[-1] / oracle),
                "fraction_right_after": float(exp[0] / new_oracle),
                "normalized_right_after": float(norm[0]),
                "first_hit_85pct": first_index(exp / new_oracle, 0.85),
                "first_hit_85pct_normalized": first_index(norm, 0.85),
                "fraction_at_100": float(exp[-1] / new_oracle),
                "normalized_at_100": float(norm[-1]),
                "incumbent_fraction_at_100": float(post["incumbent_expected"].iloc[-1] / new_oracle),
                "rollbacks_after_shift": int(post["rolled_back"].sum()),
            })

            # (d) TPE on the same engine
            if include_tpe:
                for name, enqueue in (("tpe", None), ("tpe+defaults", default_knobs())):
                    tpe = run_tpe(engine, n_decisions, 1, run_seed, enqueue=enqueue)
                    regret_rows.append({"seed": seed, "domain": engine.domain, "method": name,
                                        "regret": regret(tpe, n_decisions)})

    return _summarize(seeds, n_domains, n_decisions, rollback_rows, stationary_rows, shift_rows, regret_rows)


def _dist(values: list) -> dict:
    arr = np.array([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    if not len(arr):
        return {"n": 0}
    return {"n": int(len(arr)), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "min": float(arr.min()), "max": float(arr.max())}


def _summarize(seeds, n_domains, n_decisions, rollback_rows, stationary_rows, shift_rows, regret_rows) -> dict:
    rb = pd.DataFrame(rollback_rows)
    st = pd.DataFrame(stationary_rows)
    sh = pd.DataFrame(shift_rows)
    rg = pd.DataFrame(regret_rows)
    summary: dict = {"seeds": list(seeds), "domains_per_seed": n_domains, "n_decisions": n_decisions}
    summary["rollback"] = {
        sev: {
            "n": int(len(g)),
            "within_3_rate": float(g["within_3"].mean()),
            "snapshot_restored_rate": float(g["restored_snapshot"].fillna(False).astype(bool).mean()),
            "planted_drop": _dist(g["planted_drop"].tolist()),
            "decisions_to_return": {str(k): int(v) for k, v in
                                    g["decisions_to_return"].fillna(-1).astype(int).value_counts().sort_index().items()},
            "outcomes": {str(k): int(v) for k, v in g["outcome"].value_counts().items()},
        }
        for sev, g in rb.groupby("severity")
    }
    summary["stationary"] = {
        start: {
            "start_fraction": _dist(g["start_fraction"].tolist()),
            "start_normalized": _dist(g["start_normalized"].tolist()),
            "fraction_at_100": _dist(g["fraction_at_100"].tolist()),
            "normalized_at_100": _dist(g["normalized_at_100"].tolist()),
            "incumbent_fraction_at_100": _dist(g["incumbent_fraction_at_100"].tolist()),
            "incumbent_normalized_at_100": _dist(g["incumbent_normalized_at_100"].tolist()),
            "mean_fraction_91_100": _dist(g["mean_fraction_91_100"].tolist()),
            "first_hit_90pct_oracle": _dist(g["first_hit_90pct_oracle"].tolist()),
            "first_hit_90pct_oracle_never": int(g["first_hit_90pct_oracle"].isna().sum()),
            "first_hit_90pct_normalized": _dist(g["first_hit_90pct_normalized"].tolist()),
            "first_hit_90pct_normalized_never": int(g["first_hit_90pct_normalized"].isna().sum()),
            "reached_90pct_oracle_at_100_rate": float((g["fraction_at_100"] >= 0.9).mean()),
        }
        for start, g in st.groupby("start")
    }
    summary["regime_shift"] = {
        "fraction_before_shift": _dist(sh["fraction_before_shift"].tolist()),
        "fraction_right_after": _dist(sh["fraction_right_after"].tolist()),
        "normalized_right_after": _dist(sh["normalized_right_after"].tolist()),
        "first_hit_85pct": _dist(sh["first_hit_85pct"].tolist()),
        "first_hit_85pct_never": int(sh["first_hit_85pct"].isna().sum()),
        "fraction_at_100": _dist(sh["fraction_at_100"].tolist()),
        "normalized_at_100": _dist(sh["normalized_at_100"].tolist()),
        "incumbent_fraction_at_100": _dist(sh["incumbent_fraction_at_100"].tolist()),
        "recovered_85pct_within_100_rate": float(sh["first_hit_85pct"].notna().mean()),
        "rollbacks_after_shift": _dist(sh["rollbacks_after_shift"].tolist()),
    }
    per_seed = rg.groupby(["method", "seed"])["regret"].mean().unstack("seed")
    summary["regret"] = {
        method: {"per_seed": {str(k): float(v) for k, v in row.items()}, "mean": float(row.mean())}
        for method, row in per_seed.iterrows()
    }
    summary["runs"] = {
        "rollback": rb.assign(change=rb["change"].map(str)).to_dict(orient="records"),
        "stationary": st.to_dict(orient="records"),
        "regime_shift": sh.to_dict(orient="records"),
        "regret": rg.to_dict(orient="records"),
    }
    return summary


# ---------------------------------------------------------------------------
# A live simulated fleet writing telemetry into the store (for `dagster dev` + the sensor)
# ---------------------------------------------------------------------------


def live_engine(domain: str, seed: int = 0, shift_at: int | None = None) -> SimEngine:
    """The simulated engine of a named domain: the same optimum for the same (seed, name)."""
    import zlib

    engine = make_engine(domain, np.random.default_rng([seed, zlib.crc32(domain.encode())]))
    if shift_at is not None:
        engine = replace(engine, shift_at=int(shift_at), shifted_optimum=_mirror_optimum(engine))
    return engine


def published_knobs(store, domains: list[str]) -> dict[str, dict[str, float]]:
    """The knobs each simulated engine runs: ``MetaStore.knobs_in_effect`` (an applied config the
    controller has not adopted yet, else the controller's knobs, else the defaults)."""
    return {d: store.knobs_in_effect(d).values for d in domains}  # the one rule every reader uses


def live_tick_rows(engines: Mapping[str, SimEngine], knobs: Mapping[str, Mapping[str, float]], tick: int,
                   ts: Mapping[str, pd.Timestamp], rng: np.random.Generator) -> pd.DataFrame:
    """One telemetry row per domain in the store's layout (knob_<name> columns)."""
    rows = []
    for domain, engine in engines.items():
        k = knobs[domain]
        rows.append({"domain": domain, "ts": ts[domain], **engine.tick(dict(k), tick, rng),
                     **{f"knob_{n}": float(k[n]) for n in KNOB_NAMES}, "source_file": "meta-pipeline simulate"})
    frame = pd.DataFrame(rows)
    frame["ingested_at"] = pd.Timestamp.now(tz="UTC")
    return frame


def run_live_fleet(
    store,
    domains: list[str],
    n_ticks: int,
    *,
    seed: int = 0,
    shift_at: int | None = None,
    every: pd.Timedelta = TICK_EVERY,
    interval_s: float = 0.0,
    after_round=None,
) -> pd.DataFrame:
    """Write `n_ticks` telemetry ticks per domain into `store.telemetry`, each with the knobs the
    domain's controller currently publishes (re-read every tick, so a controller driven by the
    sensor closes the loop). Timestamps continue from each domain's newest tick (or now).
    `shift_at`: tick of this run at which every engine's optimum moves far away.
    `after_round(tick)`: called after each round (e.g. to drive the controller in process).
    Returns one row per domain: ticks written, mean observed reward, expected reward of the
    last knobs vs the oracle."""
    import time

    from meta_pipeline.ingest import append_telemetry_rows

    engines = {d: live_engine(d, seed, shift_at) for d in domains}
    rng = np.random.default_rng(seed)
    newest = store.read("telemetry", columns=["domain", "ts"])
    newest = newest[newest["domain"].isin(domains)].groupby("domain")["ts"].max()
    start = pd.Timestamp.now(tz="UTC").floor("s")
    next_ts = {d: (newest[d] + every) if d in newest.index else start for d in domains}
    written = {d: 0 for d in domains}
    rewards: dict[str, list[float]] = {d: [] for d in domains}
    last_knobs: dict[str, dict[str, float]] = {}
    for tick in range(n_ticks):
        knobs = published_knobs(store, domains)
        frame = live_tick_rows(engines, knobs, tick, next_ts, rng)
        # through the ingest log, so the telemetry sensor sees each tick as a batch
        for domain, rows in frame.groupby("domain", sort=False):
            append_telemetry_rows(store, str(domain), rows.drop(columns="domain"), source="meta-pipeline simulate")
        for row in frame.itertuples(index=False):
            written[row.domain] += 1
            rewards[row.domain].append(float(_reward_of({c: getattr(row, c) for c in
                                                          ("gain_p50", "stability_mean", "vram_utilization", "latency_ms")})))
        for d in domains:
            next_ts[d] = next_ts[d] + every
        last_knobs = knobs
        if after_round is not None:
            after_round(tick)
        if interval_s > 0 and tick + 1 < n_ticks:
            time.sleep(interval_s)
    out = []
    for d, engine in engines.items():
        tick = max(n_ticks - 1, 0)
        best = engine.oracle(tick)[1]
        expected = engine.expected_reward(last_knobs.get(d, default_knobs()), tick)
        out.append({"domain": d, "ticks": written[d], "mean_reward": float(np.mean(rewards[d])) if rewards[d] else math.nan,
                    "expected_reward_last_knobs": expected, "oracle_reward": best,
                    "fraction_of_oracle": expected / best if best else math.nan})
    return pd.DataFrame(out)
