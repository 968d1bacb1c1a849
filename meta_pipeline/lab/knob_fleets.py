"""Fleets where each knob's situation arises, and the per-knob effect measurement.

A synth domain (``lab.synth.generate_fleet``) has, on its own, almost nothing a knob can
act on: every lesson trades every day (``tau`` has no stale lesson to fade), at most two
lessons per factor carry an edge (``tier3_topk`` never binds in [3, 10]) and the
selection's Bonferroni test lets through no lesson whose edge is small or fleeting
(``g_min``, ``lambda_ci``). So on top of a synth domain this module plants, with a known
truth:

* **noise lessons** (``g_min``, ``lambda_ci``): ``n_noise`` patterns ``W<j>.noise`` that
  fire on 8–18 % of trades and carry an edge of ±U(0.06, 0.12) R *during training only* —
  strong enough to enter the overrides, gone in the held-out window (a regime that ended,
  a data-snooped pattern). An override built on one is pure loss out of sample: a higher
  ``g_min`` drops it, a higher ``lambda_ci`` shrinks it;
* **stale lessons** (``tau``): a family ``S0`` (two patterns firing together) with edge
  ``stale_edge`` that stops trading ``stale_days`` before the end of training and comes
  back in the held-out window with its edge gone (a fast-dying signal nobody observed
  dying). ``tau^stale_days`` is how much of the old edge survives: a lower ``tau`` wins;
* **several real signals at different scopes in one factor** (``tier3_topk``): a family
  ``L0`` (two patterns) whose planted edge differs by scope — a domain-wide part, a part
  per chain and three (chain, size) cells — so its factor needs 6 overrides to price it;
  ``tier3_topk = 3`` keeps the 3 strongest, 10 keeps them all: a higher ``tier3_topk`` wins.

``tier2_enabled`` needs no planting: every synth domain has regime metric weights.
``gamma_diversity`` is the controller's, not the overrides' (see
``meta_pipeline_tests/test_knob_effects.py`` and :func:`controller_exploration`).

:func:`learn` runs the learning cores (lessons, factors, half-lives, regime weights) once
per domain; :func:`knob_effects` refits only the overrides at each end of a knob's bounds
(the other knobs at their defaults) and compares the held-out predictions:
``mean |Δprediction|`` and the held-out MSE at each end. ``meta-pipeline evaluate
--section knobs`` prints them (:func:`knobs_section`, :func:`format_knobs_section`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import TradesBatch
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, default_knobs
from meta_pipeline.lab.synth import HOURS_PER_DAY, DomainData, generate_fleet
from meta_pipeline.learning.factors import find_latent_factors
from meta_pipeline.learning.halflife import fit_half_lives
from meta_pipeline.learning.lessons import edge_history, mine_lessons
from meta_pipeline.learning.overrides import OverrideModel
from meta_pipeline.learning.regime import fit_regime_weights

# the knobs that act on the overrides, and the planted situation each needs
OVERRIDE_KNOBS: tuple[str, ...] = ("tau", "g_min", "lambda_ci", "tier2_enabled", "tier3_topk")
SITUATION_OF_KNOB: dict[str, tuple[str, ...]] = {
    "g_min": ("noise",),
    "lambda_ci": ("noise",),
    "tau": ("stale",),
    "tier3_topk": ("ladder",),
    "tier2_enabled": (),
}
# the documented direction: the sign of (a measure of what engines receive at the high
# bound − the same at the low bound); see docs/knobs.md
DIRECTION_OF_KNOB: dict[str, str] = {
    "g_min": "higher g_min → fewer overrides, smaller |prediction| (noise lessons dropped)",
    "lambda_ci": "higher lambda_ci → every |edge| shrunk further toward its lower confidence bound, smaller |prediction|",
    "tau": "higher tau → a stale lesson keeps more of its edge, larger |prediction| where it fires",
    "tier3_topk": "higher tier3_topk → more overrides per factor, predictions closer to the factor's scope detail",
    "tier2_enabled": "on → the regime metric term is added per trade (predictions move with the trade's metrics)",
}

# ladder family: (scope, planted edge part); a trade's edge is the sum of the parts whose scope it is in
LADDER_PARTS: tuple[tuple[dict[str, str], float], ...] = (
    ({}, 0.15),
    ({"chain": "solana"}, 0.35),
    ({"chain": "base"}, -0.55),
    ({"chain": "solana", "size": "micro"}, 0.5),
    ({"chain": "base", "size": "small"}, 0.7),
    ({"chain": "eth", "size": "large"}, -0.8),
)


@dataclass(frozen=True)
class KnobFleetConfig:
    n_trades: int = 20_000  # per domain, including the held-out tail
    train_days: float = 60.0
    holdout_days: float = 10.0
    n_noise: int = 12
    noise_fire_p: tuple[float, float] = (0.25, 0.4)
    noise_edge: tuple[float, float] = (0.05, 0.09)
    stale_fire_p: float = 0.2
    stale_edge: float = 0.5
    stale_days: float = 12.0
    ladder_fire_p: float = 0.35
    member_fire_p: float = 0.9


def _fire_family(n: int, p: float, members: int, member_p: float, rng: np.random.Generator) -> np.ndarray:
    on = rng.random(n) < p
    return (rng.random((members, n)) < member_p) & on  # members × n


def _add_patterns(trades: pd.DataFrame, fired: np.ndarray, names: Sequence[str]) -> pd.Series:
    out = trades["patterns"].astype(str).copy()
    for row, name in zip(fired, names):
        out = out.where(~row, out + "|" + name)
    return out


def plant_situations(data: DomainData, situations: Sequence[str], cfg: KnobFleetConfig, seed: int) -> DomainData:
    """The domain with the situations planted on top.

    ``return_r``, ``expected_r``, ``signal_r`` and ``patterns`` change; each situation's
    planted part of the expected return is a column (``noise_r``, ``stale_r``,
    ``ladder_r``) and its description is in ``trades.attrs["planted"]``.
    """
    rng = np.random.default_rng([seed, 7919])
    trades = data.trades.copy()
    n = len(trades)
    t = trades["t_hours"].to_numpy(float)
    train_h = (data.truth.train_end - data.truth.t0) / pd.Timedelta(hours=1)
    held = t >= train_h
    added = np.zeros(n)
    planted: dict[str, Any] = {}
    if "noise" in situations:
        names = [f"W{j}.noise" for j in range(cfg.n_noise)]
        p = rng.uniform(*cfg.noise_fire_p, cfg.n_noise)
        fired = rng.random((cfg.n_noise, n)) < p[:, None]
        edges = rng.uniform(*cfg.noise_edge, cfg.n_noise) * rng.choice([-1.0, 1.0], cfg.n_noise)
        part = np.where(held[None, :], 0.0, fired * edges[:, None]).sum(axis=0)
        trades["noise_r"] = part
        added += part
        trades["patterns"] = _add_patterns(trades, fired, names)
        planted["noise"] = dict(zip(names, edges.tolist()))
    if "stale" in situations:
        names = ["S0.stale_a", "S0.stale_b"]
        fired = _fire_family(n, cfg.stale_fire_p, 2, cfg.member_fire_p, rng)
        quiet = (t >= train_h - cfg.stale_days * HOURS_PER_DAY) & ~held
        fired &= ~quiet[None, :]
        part = np.where(fired.any(axis=0) & ~held, cfg.stale_edge, 0.0)  # edge gone in the held-out window
        trades["stale_r"] = part
        added += part
        trades["patterns"] = _add_patterns(trades, fired, names)
        planted["stale"] = {"patterns": names, "edge": cfg.stale_edge, "stale_days": cfg.stale_days}
    if "ladder" in situations:
        names = ["L0.ladder_a", "L0.ladder_b"]
        fired = _fire_family(n, cfg.ladder_fire_p, 2, cfg.member_fire_p, rng)
        active = fired.any(axis=0)
        chain = trades["scope.chain"].to_numpy(str)
        size = trades["scope.size"].to_numpy(str)
        part = np.zeros(n)
        for scope, edge in LADDER_PARTS:
            inside = active.copy()
            if "chain" in scope:
                inside &= chain == scope["chain"]
            if "size" in scope:
                inside &= size == scope["size"]
            part += np.where(inside, edge, 0.0)
        trades["ladder_r"] = part
        added += part
        trades["patterns"] = _add_patterns(trades, fired, names)
        planted["ladder"] = {"patterns": names, "parts": [(dict(s), e) for s, e in LADDER_PARTS]}
    trades["return_r"] = trades["return_r"] + added
    trades["expected_r"] = trades["expected_r"] + added
    trades["signal_r"] = trades["signal_r"] + added
    trades.attrs = {"planted": planted}
    return dataclasses.replace(data, trades=trades)


def knob_domain(situations: Sequence[str], seed: int, cfg: KnobFleetConfig = KnobFleetConfig()) -> DomainData:
    """One synth domain (seed) with the given situations planted ("noise", "stale", "ladder")."""
    fleet = generate_fleet(n_domains=1, seed=seed, n_trades=cfg.n_trades, train_days=cfg.train_days,
                           holdout_days=cfg.holdout_days, domain_prefix="knobs")
    data = next(iter(fleet.domains.values()))
    return plant_situations(data, situations, cfg, seed)


def source_batches(data: DomainData) -> tuple[TradesBatch, TradesBatch]:
    """(train, holdout) source-table frames straight from synth's internal layout (no string validation)."""
    trades = data.trades.reset_index(drop=True)
    domain = data.domain
    ids = trades["trade_id"].astype(str).to_numpy(dtype=object)
    pos = np.arange(len(trades))
    base = pd.DataFrame({
        "domain": domain, "trade_id": ids, "closed_at": pd.to_datetime(trades["closed_at"], utc=True),
        "regime": trades["regime"].astype(str), "strategy_id": trades["strategy_id"].astype(str),
        "return_r": trades["return_r"].astype(float), "source_file": "synth",
    })
    split = trades["patterns"].astype(str).str.split("|")
    p_pos = np.repeat(pos, split.str.len().to_numpy())
    patterns = pd.DataFrame({"domain": domain, "trade_id": ids[p_pos], "pattern": np.concatenate(split.to_list())})
    scope_parts, metric_parts, scope_pos, metric_pos = [], [], [], []
    for c in trades.columns:
        if c.startswith("scope."):
            keep = (trades[c] != "").to_numpy()
            scope_parts.append(pd.DataFrame({"domain": domain, "trade_id": ids[keep], "key": c[len("scope."):],
                                             "value": trades.loc[keep, c].astype(str).to_numpy()}))
            scope_pos.append(pos[keep])
        elif c.startswith("metric."):
            keep = trades[c].notna().to_numpy()
            metric_parts.append(pd.DataFrame({"domain": domain, "trade_id": ids[keep], "metric": c[len("metric."):],
                                              "value": trades.loc[keep, c].astype(float).to_numpy()}))
            metric_pos.append(pos[keep])
    scope, metrics = pd.concat(scope_parts, ignore_index=True), pd.concat(metric_parts, ignore_index=True)
    is_train = (trades["closed_at"] < data.truth.train_end).to_numpy()
    row_pos = (pos, p_pos, np.concatenate(scope_pos), np.concatenate(metric_pos))

    def part(keep: bool) -> TradesBatch:
        frames = [f[is_train[rp] == keep].reset_index(drop=True) for f, rp in zip((base, patterns, scope, metrics), row_pos)]
        return TradesBatch(*frames, quarantine=pd.DataFrame())

    return part(True), part(False)


@dataclass
class LearnedDomain:
    """A domain's learning outputs (everything the overrides read), computed once."""

    data: DomainData
    train: TradesBatch
    holdout: TradesBatch
    lessons: pd.DataFrame
    incidence: pd.DataFrame
    factors: pd.DataFrame
    fits: pd.DataFrame | None
    weights: pd.DataFrame

    def fit(self, **knobs: float) -> OverrideModel:
        """The overrides with these knobs (the rest at their defaults)."""
        b = self.train
        return OverrideModel.fit(self.lessons, self.fits, self.factors, self.weights, b.trades, b.patterns, b.scope,
                                 b.metrics, knobs={**default_knobs(), **knobs}, lesson_trades=self.incidence)

    def predict(self, model: OverrideModel) -> np.ndarray:
        h = self.holdout
        return model.predict(h.trades, h.patterns, h.scope, h.metrics).to_numpy(float)

    @property
    def held_return(self) -> np.ndarray:
        return self.holdout.trades["return_r"].to_numpy(float)


def learn(data: DomainData, *, half_lives: bool = True) -> LearnedDomain:
    """Lessons, factors, half-life fits (unless ``half_lives=False``: no decay) and regime weights of the train window."""
    train, holdout = source_batches(data)
    lessons, incidence = mine_lessons(train.trades, train.patterns, train.scope)
    factors = find_latent_factors(lessons, incidence, len(train.trades))
    fits = None
    if half_lives:
        fits = fit_half_lives(edge_history(lessons, incidence, train.trades, scope=train.scope))
    weights = fit_regime_weights(train.trades, train.metrics)
    return LearnedDomain(data, train, holdout, lessons, incidence, factors, fits, weights)


def knob_bounds(name: str) -> tuple[float, float]:
    spec = KNOBS[name]
    return spec.low, spec.high


def knob_effect(learned: LearnedDomain, name: str) -> dict[str, float]:
    """One knob moved from its low to its high bound (others at their defaults), on held-out trades.

    ``mean_abs_delta``: mean |pred_high − pred_low|; ``mean_abs_pred_low/high``: mean
    |prediction|; ``mse_low/high``: held-out MSE of return_r; ``mse_change`` = high − low
    (negative: the high bound predicts better); ``overrides_low/high``: override rows;
    ``max_per_factor_low/high``: most lessons any factor got.
    """
    low, high = knob_bounds(name)
    models = {"low": learned.fit(**{name: low}), "high": learned.fit(**{name: high})}
    preds = {k: learned.predict(m) for k, m in models.items()}
    y = learned.held_return
    out: dict[str, float] = {"low": low, "high": high, "mean_abs_delta": float(np.mean(np.abs(preds["high"] - preds["low"])))}
    for k, m in models.items():
        out[f"mean_abs_pred_{k}"] = float(np.mean(np.abs(preds[k])))
        out[f"mse_{k}"] = float(np.mean((y - preds[k]) ** 2))
        out[f"overrides_{k}"] = float(len(m.rows))
        per_factor = m.rows.drop_duplicates("lesson_key").groupby("latent_factor_id").size() if len(m.rows) else pd.Series([0])
        out[f"max_per_factor_{k}"] = float(per_factor.max())
    out["mse_change"] = out["mse_high"] - out["mse_low"]
    return out


# ---------------------------------------------------------------------------
# gamma_diversity: the controller's exploration
# ---------------------------------------------------------------------------


def controller_exploration(gamma: float, n_states: int = 200, seed: int = 0) -> dict[str, float]:
    """How far the controller's first trial moves a knob (unit space), at a fixed gamma_diversity.

    ``n_states`` cold-started controllers (no prior; seeds ``seed..seed+n_states-1``) at the
    default knobs except ``gamma_diversity`` are fed one noise-free telemetry tick per
    decision (of the knobs they run) until their first trial moves a knob; ``mean_step``:
    the mean unit-space distance of that move, over the controllers whose first trial moved
    a continuous knob other than gamma_diversity itself (``n`` of them). A higher
    gamma_diversity widens every trust region by √(gamma/0.3): larger steps.
    """
    from meta_pipeline.meta.controller import ControllerConfig, cold_start, update

    cfg = ControllerConfig()
    knobs = {**default_knobs(), "gamma_diversity": float(gamma)}
    u0 = np.array([KNOBS[k].to_unit(knobs[k]) for k in KNOB_NAMES])
    floats = np.array([KNOBS[k].kind == "float" and k != "gamma_diversity" for k in KNOB_NAMES])
    steps = []
    for s in range(seed, seed + n_states):
        state = cold_start(None, cfg, seed=s)
        state.knobs = dict(knobs)
        for i in range(12):  # ticks at the incumbent until the first trial moves a knob
            tick = pd.DataFrame([{"ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=5 * i),
                                  "gain_p50": 0.04, "stability_mean": 0.8, "vram_utilization": 0.5,
                                  "latency_ms": 100.0, **{f"knob_{k}": v for k, v in state.knobs.items()}}])
            state, _decision = update(state, tick, cfg)
            if state.knobs != knobs:
                break
        u1 = np.array([KNOBS[k].to_unit(state.knobs[k]) for k in KNOB_NAMES])
        if (u1 != u0)[floats].any():  # a float knob's trial (bool/int moves are whole notches, whatever gamma)
            steps.append(float(np.abs(u1 - u0)[floats].sum()))
    return {"gamma_diversity": float(gamma), "mean_step": float(np.mean(steps)) if steps else float("nan"),
            "n": float(len(steps))}


# ---------------------------------------------------------------------------
# the report: meta-pipeline evaluate --section knobs
# ---------------------------------------------------------------------------


def knobs_section(seeds: Sequence[int] = (0, 1, 2), cfg: KnobFleetConfig = KnobFleetConfig(),
                  progress: Callable[[str], None] | None = None, plain: bool = True) -> dict[str, Any]:
    """Per knob and seed: :func:`knob_effect` on a domain holding that knob's situation (and, with
    ``plain``, on the same seed's synth domain without it); gamma_diversity's exploration."""
    say = progress or (lambda _m: None)
    rows = []
    t0 = time.perf_counter()
    for seed in seeds:
        cache: dict[tuple[str, ...], LearnedDomain] = {}
        for name in OVERRIDE_KNOBS:
            situations = SITUATION_OF_KNOB[name]
            if situations not in cache:
                say(f"seed {seed}: learning a domain with {', '.join(situations) or 'no planted situation'}")
                cache[situations] = learn(knob_domain(situations, seed, cfg))
            rows.append({"knob": name, "seed": seed, "situation": "+".join(situations) or "synth",
                         **knob_effect(cache[situations], name)})
            if situations and plain:  # the same knob on the plain synth domain: what it does without its situation
                if () not in cache:
                    cache[()] = learn(knob_domain((), seed, cfg))
                rows.append({"knob": name, "seed": seed, "situation": "synth", **knob_effect(cache[()], name)})
    n_states = 200
    say("gamma_diversity: controllers' first trials")
    explore = [controller_exploration(g, n_states=n_states, seed=1000 * s) for s in seeds
               for g in knob_bounds("gamma_diversity")]
    return {"rows": rows, "exploration": explore, "seeds": list(seeds), "config": dataclasses.asdict(cfg),
            "n_states": n_states, "seconds": time.perf_counter() - t0}


def _mean_sd(x: Sequence[float]) -> str:
    a = np.asarray(x, dtype=float)
    sd = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    return f"{a.mean():+.4f} ± {sd / math.sqrt(a.size):.4f}" if a.size > 1 else f"{a.mean():+.4f}"


def format_knobs_section(res: dict[str, Any]) -> str:
    frame = pd.DataFrame(res["rows"])
    lines = [
        "Per-knob effect on held-out overrides predictions: each knob moved from its low to its high bound, "
        "the others at their defaults",
        f"(mean ± s.e. over seeds {res['seeds']}; a synth domain of {res['config']['n_trades']} trades with the "
        "knob's situation planted, and the same domain without it ('synth'); MSE change = MSE(high) − MSE(low), "
        "negative: the high bound predicts better)",
        "",
        f"{'knob':<14} {'range':<13} {'situation':<10} {'mean |Δpred| (R)':<20} {'held-out MSE change':<22} "
        f"{'mean |pred| low → high':<24} overrides low → high (max per factor)",
    ]
    for name in OVERRIDE_KNOBS:
        for situation, g in frame[frame["knob"] == name].groupby("situation", sort=False):
            lo, hi = knob_bounds(name)
            lines.append(
                f"{name:<14} {f'[{lo:g}, {hi:g}]':<13} {situation:<10} "
                f"{_mean_sd(g['mean_abs_delta']):<20} {_mean_sd(g['mse_change']):<22} "
                f"{g['mean_abs_pred_low'].mean():.4f} → {g['mean_abs_pred_high'].mean():.4f}    "
                f"{g['overrides_low'].mean():.1f} → {g['overrides_high'].mean():.1f} "
                f"({g['max_per_factor_low'].mean():.1f} → {g['max_per_factor_high'].mean():.1f})"
            )
    ex = pd.DataFrame(res["exploration"])
    if len(ex):
        lo, hi = knob_bounds("gamma_diversity")
        a = ex[ex["gamma_diversity"] == lo]["mean_step"]
        b = ex[ex["gamma_diversity"] == hi]["mean_step"]
        lines += ["", f"gamma_diversity [{lo:g}, {hi:g}] (the controller's exploration): mean unit-space step of a "
                      f"cold-started controller's first trial {a.mean():.4f} → {b.mean():.4f} "
                      f"(mean over the {int(ex['n'].sum())} of {2 * len(res['seeds']) * int(res['n_states'])} "
                      "cold-started controllers whose first trial moved a continuous knob)"]
    lines.append("")
    for name in OVERRIDE_KNOBS:
        lines.append(f"  {name}: {DIRECTION_OF_KNOB[name]}")
    lines.append(f"\n{res['seconds']:.0f} s")
    return "\n".join(lines)
