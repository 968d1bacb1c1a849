"""``meta-pipeline evaluate --section knob-tuning``: does the controller tune the learning knobs by what overrides earn?

Fleets whose best knobs differ from the defaults (``SITUATIONS``: many noise lessons →
a higher ``g_min``/``lambda_ci`` should win; fast-dying signals → a lower ``tau``), from
``lab.knob_fleets`` when that module provides the situation, else from ``synth`` with the
parameters below. Per fleet (one domain, one seed):

* **time line.** The last ``tuning_days`` of the training window are cut into
  ``n_cycles`` cycles at as_of times t_0 < … < t_N = train_end. The held-out trades are
  those after train_end (never seen by any tuner).
* **controller.** The controller's own proposer (``meta.controller``: probes, surrogate
  model, trust regions, cooldowns) proposes one learning-knob trial per cycle; the trial
  is judged paired (``meta.knob_trial.counterfactual_trial``: overrides fitted as of t_c
  with the incumbent and the trial knobs, scored on the same trades closed after t_c) at
  the end of each cycle by the asset's sequential rule (``paired_verdict``: a clear result
  decides at once, else the trial runs on for more cycles, up to PAIRED_MAX_TRADES trades)
  and closed by ``judge_paired_trial`` (accept / revert / rollback).
  Its knobs after N cycles are the controller's answer ("controller (live trials only)").
* **controller (screened).** The same controller, but with no trial pending it first
  screens learning-knob candidates counterfactually on the trades realized by t_c
  (``meta.knob_screen``: refits as of walk-forward fold times, paired vs the incumbent,
  max-T family-wise threshold); a qualifying pick is the live trial, judged as above;
  none qualifying → it holds that cycle and screens again on more trades.
* **Optuna TPE** (the peer): one trial per cycle on the same cycles, objective = the
  paired alignment gain of its knobs over the defaults on that cycle's trades; its
  answer is the best trial's knobs.
* **oracle sweep**: each learning knob swept over its range (the others at the
  defaults), fitted at train_end and scored on the held-out trades themselves; the
  oracle's knobs are every knob at its held-out best (or the best single sweep point,
  whichever is better). This is the bar: it peeks at the held-out outcomes.
* **figures.** Held-out MSE of overrides fitted at train_end with the defaults, the
  controller's, TPE's and the oracle's knobs; improvement = MSE(defaults) − MSE(knobs)
  (R²; also as a share of MSE₀ = mean y², i.e. an alignment gain); the controller's share
  of the oracle's improvement (target ≥ 0.5 within 20 cycles, pooled over fleets);
  rollbacks / reverts / accepts; and each knob's effect size (held-out MSE at its high
  bound minus at its low bound).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import validate_trades
from meta_pipeline.knobs import KNOBS, default_knobs
from meta_pipeline.lab import synth
from meta_pipeline.meta.controller import ControllerConfig, cold_start
from meta_pipeline.meta.knob_screen import ScreenConfig, screen_knobs, start_screened_trial
from meta_pipeline.meta.knob_trial import (
    LEARNING_KNOBS,
    SourceFrames,
    counterfactual_trial,
    end_cycle,
    fit_override_model,
    judge_paired_trial,
    live_accept_z,
    paired_verdict,
    paired_score,
    predict_edges,
    propose_next,
)

TARGET_SHARE = 0.5  # the controller must get at least this share of the oracle sweep's improvement

# situation -> synth.FleetConfig overrides (a fleet whose best knobs differ from the defaults). The
# situations must hold over the whole history (train and held-out alike), so walk-forward cycles
# inside training can find what the held-out window rewards.
SITUATIONS: dict[str, dict[str, Any]] = {
    # many noise lessons: patterns whose edge flips sign every few days (their past mean says nothing about
    # their next trades) beside a few real signals: a higher g_min / lambda_ci should win
    "noise-lessons": dict(n_families=4, e0_range=(0.3, 0.6)),
    # signals that die within days (half-lives of 2-5 days): a lower tau should win
    "fast-decay": dict(n_families=6, e0_range=(0.6, 1.0), decaying_half_life_days=(2.0, 5.0),
                       improving_doubling_days=(200.0, 400.0)),
    # a factor that holds several real signals at different scopes (lab.knob_fleets' ladder): a higher
    # tier3_topk should win
    "ladder": {},
}
FLICKER_PATTERNS = 12  # noise-lessons: flickering patterns
FLICKER_FIRE_P = (0.15, 0.3)
FLICKER_EDGE = (0.08, 0.16)  # |edge| of a flickering pattern in one block (R)
FLICKER_BLOCK_DAYS = 4.0  # its sign is redrawn every block


def plant_flicker(data: synth.DomainData, seed: int) -> synth.DomainData:
    """Noise lessons that hold over all of history: each of FLICKER_PATTERNS patterns carries ±|e| R,
    its sign redrawn every FLICKER_BLOCK_DAYS days (so a lesson mined on it has a past edge that
    does not carry to its next trades)."""
    import dataclasses

    rng = np.random.default_rng([seed, 104_729])
    trades = data.trades.copy()
    n = len(trades)
    block = np.floor(trades["t_hours"].to_numpy(float) / (FLICKER_BLOCK_DAYS * synth.HOURS_PER_DAY)).astype(int)
    n_blocks = int(block.max()) + 1
    p = rng.uniform(*FLICKER_FIRE_P, FLICKER_PATTERNS)
    fired = rng.random((FLICKER_PATTERNS, n)) < p[:, None]
    size = rng.uniform(*FLICKER_EDGE, FLICKER_PATTERNS)
    signs = rng.choice([-1.0, 1.0], (FLICKER_PATTERNS, n_blocks))
    part = (fired * size[:, None] * signs[:, block]).sum(axis=0)
    patterns = trades["patterns"].astype(str)
    for j in range(FLICKER_PATTERNS):
        patterns = patterns.where(~fired[j], patterns + f"|F{j}.flicker")
    trades["patterns"] = patterns
    for col in ("return_r", "expected_r", "signal_r"):
        if col in trades:
            trades[col] = trades[col] + part
    return dataclasses.replace(data, trades=trades)


@dataclass
class KnobTuningConfig:
    situations: tuple[str, ...] = tuple(SITUATIONS)
    seeds: tuple[int, ...] = (0, 1)
    n_cycles: int = 20
    n_trades: int = 24_000
    train_days: float = 60.0
    holdout_days: float = 12.0
    tuning_days: float = 30.0
    sweep_points: int = 5  # per float knob
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # a variant beside it (not the target's arm): trust regions as wide as a knob's whole range — paired
    # trials measure a move precisely and roll back a bad one on a few hundred trades
    controller_wide: ControllerConfig = field(default_factory=lambda: ControllerConfig(initial_step=0.5, max_step=1.0))
    # the screened arm: the same controller, plus the counterfactual screen (meta.knob_screen) before each trial
    screen: ScreenConfig = field(default_factory=ScreenConfig)


def _sweep_values(name: str, points: int) -> list[float]:
    spec = KNOBS[name]
    if spec.kind == "bool":
        return [0.0, 1.0]
    if spec.kind == "int":
        return sorted({float(v) for v in np.round(np.linspace(spec.low, spec.high, min(points, int(spec.high - spec.low) + 1)))})
    return [float(v) for v in np.linspace(spec.low, spec.high, points)]


def domain_frames(domain: synth.DomainData) -> SourceFrames:
    """A synthetic domain's trades as the store's source tables (through the ingest contract)."""
    raw = synth.trades_contract_frame(domain.trades).astype(str)
    batch = validate_trades(raw, np.arange(len(raw)) + 1, domain=domain.domain, source="synthetic")
    return SourceFrames(batch.trades[["trade_id", "closed_at", "regime", "return_r"]], batch.patterns, batch.scope,
                        batch.metrics)


def situation_fleet(situation: str, seed: int, cfg: KnobTuningConfig) -> tuple[synth.DomainData, str]:
    """One domain of the situation (SITUATIONS): synth, with flickering noise lessons planted for
    noise-lessons, lab.knob_fleets' ladder family for ladder."""
    if situation == "ladder":
        from meta_pipeline.lab import knob_fleets

        kcfg = knob_fleets.KnobFleetConfig(n_trades=cfg.n_trades, train_days=cfg.train_days,
                                           holdout_days=cfg.holdout_days)
        return knob_fleets.knob_domain(("ladder",), seed, kcfg), "lab.knob_fleets (ladder)"
    fleet = synth.generate_fleet(n_domains=1, n_trades=cfg.n_trades, train_days=cfg.train_days,
                                 holdout_days=cfg.holdout_days, seed=seed, telemetry_ticks=10,
                                 domain_prefix=situation.replace("-", "_") + "_", **SITUATIONS[situation])
    domain = next(iter(fleet.domains.values()))
    if situation == "noise-lessons":
        return plant_flicker(domain, seed), "synth + flickering noise lessons"
    return domain, "synth"


class _Fits:
    """Override fits cached by (as_of, learning knobs)."""

    def __init__(self, frames: SourceFrames) -> None:
        self.frames = frames
        self.cache: dict[tuple, Any] = {}
        self.n_fits = 0

    def get(self, knobs: dict[str, float], as_of: pd.Timestamp):
        key = (pd.Timestamp(as_of).isoformat(), tuple(float(knobs[n]) for n in LEARNING_KNOBS))
        if key not in self.cache:
            self.cache[key] = fit_override_model(self.frames, knobs, as_of)
            self.n_fits += 1
        return self.cache[key]


def heldout_mse(fits: _Fits, knobs: dict[str, float], train_end: pd.Timestamp, holdout: SourceFrames) -> float:
    y = holdout.trades["return_r"].to_numpy(dtype=float)
    p = predict_edges(fits.get(knobs, train_end), holdout)
    return float(np.mean((y - p) ** 2))


def run_controller(fits: _Fits, grid: list[pd.Timestamp], config: ControllerConfig, seed: int,
                   screen: ScreenConfig | None = None) -> dict[str, Any]:
    """N cycles of the controller with paired verdicts (module doc).

    A trial started at cycle c is built as of t_c (both arms) and scored on every trade closed
    after t_c so far; at the end of each cycle ``paired_verdict`` decides or lets it run on
    (the canary window, at most PAIRED_MAX_TRADES trades), as the controller asset does.
    ``screen``: with no trial pending, first screen candidates counterfactually on the trades
    realized by t_c (``meta.knob_screen``); a qualifying pick is the live trial, else the
    arm holds (the next cycle screens again, on more realized trades: the folds' fit times sit on a
    fixed calendar grid, so their fits are reused from cycle to cycle). Knob sets rolled
    back since the last accept are not screened again (a revert was inconclusive: they may be)."""
    state = cold_start(None, config, seed=seed)
    state.baseline_mean, state.baseline_weight = 0.0, 1.0
    log = []
    screens = []
    rejected: list[dict[str, float]] = []
    started: int | None = None  # cycle at which the pending trial's arms were built
    for c in range(len(grid) - 1):
        screened = False
        if state.pending is None and screen is not None:
            before = fits.n_fits
            res = screen_knobs(fits.frames, dict(state.knobs), grid[c], screen, fit=lambda k, a: fits.get(dict(k), a),
                               exclude=rejected)
            screens.append({"cycle": c + 1, **res.to_dict(), "note": res.note(), "new_fits": fits.n_fits - before})
            screened = True
            if res.pick is not None:
                state = start_screened_trial(state, res.pick, config)
                started = c
        if state.pending is None and not screened:
            state, proposal = propose_next(state, config, only=LEARNING_KNOBS)
            started = c if proposal is not None else None
        if started is not None and state.pending is not None:
            old, new = dict(state.snapshot["knobs"]), dict(state.knobs)
            a = grid[started]
            trial = counterfactual_trial(fits.frames, a, old, None, grid[c + 1],
                                         old_model=fits.get(old, a), new_model=fits.get(new, a))
            moved = [n for n in LEARNING_KNOBS if old[n] != new[n]]
            accept_z = live_accept_z(state)  # a screen's pick: accepted unless its fresh trades show no gain
            if (paired_verdict(trial, accept_z=accept_z, max_trades=config.paired_max_trades) is not None
                    or c == len(grid) - 2):
                state, out = judge_paired_trial(state, trial, config, accept_z=accept_z)
                log.append({"cycle": c + 1, "started": started + 1, "knobs": {n: new[n] for n in moved},
                            "verdict": out["verdict"], "gain": trial.gain, "se": trial.se, "n": trial.n})
                rejected = [] if out["verdict"] == "accept" else rejected + [new] * (out["verdict"] == "rollback")
                started = None
        else:
            log.append({"cycle": c + 1, "verdict": "hold"})
        state = end_cycle(state)
    return {"knobs": dict(state.knobs), "log": log, "rollbacks": state.rollbacks, "reverts": state.reverts,
            "accepts": state.accepts, "trials": sum(1 for r in log if r["verdict"] != "hold"), "screens": screens,
            "screen_picks": sum(1 for r in screens if r["pick"] is not None),
            "screen_fits": sum(r["new_fits"] for r in screens)}


def run_tpe(fits: _Fits, grid: list[pd.Timestamp], seed: int) -> dict[str, Any]:
    """Optuna TPE, one trial per cycle, objective = the paired gain over the defaults on that cycle's trades."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for name in LEARNING_KNOBS:
        spec = KNOBS[name]
        if spec.kind == "bool":
            distributions[name] = optuna.distributions.CategoricalDistribution([0, 1])
        elif spec.kind == "int":
            distributions[name] = optuna.distributions.IntDistribution(int(spec.low), int(spec.high))
        else:
            distributions[name] = optuna.distributions.FloatDistribution(spec.low, spec.high)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    defaults = default_knobs()
    gains = []
    for c in range(len(grid) - 1):
        trial = study.ask(distributions)
        knobs = {**defaults, **{k: float(v) for k, v in trial.params.items()}}
        res = counterfactual_trial(fits.frames, grid[c], defaults, None, grid[c + 1],
                                   old_model=fits.get(defaults, grid[c]), new_model=fits.get(knobs, grid[c]))
        study.tell(trial, float(res.gain))
        gains.append(res.gain)
    best = {**defaults, **{k: float(v) for k, v in study.best_params.items()}}
    return {"knobs": best, "gains": gains}


def oracle_sweep(fits: _Fits, train_end: pd.Timestamp, holdout: SourceFrames, points: int) -> dict[str, Any]:
    """Each learning knob over its range (others at the defaults), scored on the held-out trades."""
    defaults = default_knobs()
    base = heldout_mse(fits, defaults, train_end, holdout)
    sweep: dict[str, list[tuple[float, float]]] = {}
    best_each: dict[str, float] = {}
    for name in LEARNING_KNOBS:
        rows = [(v, heldout_mse(fits, {**defaults, name: v}, train_end, holdout)) for v in _sweep_values(name, points)]
        sweep[name] = rows
        best_each[name] = min(rows, key=lambda r: (r[1], abs(r[0] - defaults[name])))[0]
    combined = {**defaults, **best_each}
    combined_mse = heldout_mse(fits, combined, train_end, holdout)
    single_name, (single_value, single_mse) = min(((n, min(r, key=lambda x: x[1])) for n, r in sweep.items()),
                                                  key=lambda t: t[1][1])
    if single_mse < combined_mse:
        knobs, mse, how = {**defaults, single_name: single_value}, single_mse, f"best single sweep point ({single_name})"
    else:
        knobs, mse, how = combined, combined_mse, "every knob at its held-out best"
    effects = {n: rows[-1][1] - rows[0][1] for n, rows in sweep.items()}
    return {"knobs": knobs, "mse": mse, "how": how, "defaults_mse": base, "sweep": sweep, "effects": effects}


def run_fleet(situation: str, seed: int, cfg: KnobTuningConfig) -> dict[str, Any]:
    started = time.perf_counter()
    domain, source = situation_fleet(situation, seed, cfg)
    frames = domain_frames(domain)
    train_end = pd.Timestamp(domain.truth.train_end)
    train_end = train_end.tz_localize("UTC") if train_end.tzinfo is None else train_end
    start = train_end - pd.Timedelta(days=cfg.tuning_days)
    grid = [start + (train_end - start) * (c / cfg.n_cycles) for c in range(cfg.n_cycles + 1)]
    holdout = frames.between(train_end, None)
    fits = _Fits(frames)
    oracle = oracle_sweep(fits, train_end, holdout, cfg.sweep_points)
    controller = run_controller(fits, grid, cfg.controller, seed)
    wide = run_controller(fits, grid, cfg.controller_wide, seed)
    screened = run_controller(fits, grid, cfg.controller, seed, screen=cfg.screen)
    tpe = run_tpe(fits, grid, seed)
    y = holdout.trades["return_r"].to_numpy(dtype=float)
    mse_zero = float(np.mean(y * y))
    out = {"situation": situation, "seed": seed, "fleet_source": source, "domain": domain.domain,
           "n_trades": len(frames.trades), "n_holdout": len(holdout.trades), "mse_zero": mse_zero,
           "defaults_mse": oracle["defaults_mse"], "oracle": oracle,
           "controller": {**controller, "mse": heldout_mse(fits, controller["knobs"], train_end, holdout)},
           "controller_wide": {**wide, "mse": heldout_mse(fits, wide["knobs"], train_end, holdout)},
           "controller_screened": {**screened, "mse": heldout_mse(fits, screened["knobs"], train_end, holdout)},
           "tpe": {**tpe, "mse": heldout_mse(fits, tpe["knobs"], train_end, holdout)}}
    base = out["defaults_mse"]
    for arm in ("controller", "controller_wide", "controller_screened", "tpe"):
        p_def = predict_edges(fits.get(default_knobs(), train_end), holdout)
        p_arm = predict_edges(fits.get(out[arm]["knobs"], train_end), holdout)
        out[arm]["paired_vs_defaults"] = paired_score(y, p_def, p_arm).to_dict()
        out[arm]["improvement"] = base - out[arm]["mse"]
    out["oracle"]["improvement"] = base - oracle["mse"]
    out["n_fits"] = fits.n_fits
    out["seconds"] = time.perf_counter() - started
    return out


def knob_tuning_section(cfg: KnobTuningConfig = KnobTuningConfig(),
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    fleets = []
    for situation in cfg.situations:
        for seed in cfg.seeds:
            res = run_fleet(situation, seed, cfg)
            fleets.append(res)
            if progress:
                progress(f"{situation} seed {seed}: defaults {res['defaults_mse']:.5f}, controller "
                         f"{res['controller']['mse']:.5f} (wide {res['controller_wide']['mse']:.5f}, screened "
                         f"{res['controller_screened']['mse']:.5f}), TPE {res['tpe']['mse']:.5f}, oracle {res['oracle']['mse']:.5f} "
                         f"({res['n_fits']} fits, {res['seconds']:.0f} s)")
    return {"config": {"situations": list(cfg.situations), "seeds": list(cfg.seeds), "n_cycles": cfg.n_cycles,
                       "n_trades": cfg.n_trades, "tuning_days": cfg.tuning_days},
            "fleets": fleets, "summary": summarize(fleets)}


def _share(num: float, den: float) -> float | None:
    return num / den if den > 1e-12 else None


def summarize(fleets: Sequence[dict[str, Any]]) -> dict[str, Any]:
    oracle = float(sum(f["oracle"]["improvement"] for f in fleets))
    ctrl = float(sum(f["controller"]["improvement"] for f in fleets))
    tpe = float(sum(f["tpe"]["improvement"] for f in fleets))
    wide = float(sum(f["controller_wide"]["improvement"] for f in fleets))
    screened = float(sum(f["controller_screened"]["improvement"] for f in fleets))
    share = _share(ctrl, oracle)
    per_situation = {}
    for situation in dict.fromkeys(f["situation"] for f in fleets):
        group = [f for f in fleets if f["situation"] == situation]
        o = sum(f["oracle"]["improvement"] for f in group)
        per_situation[situation] = {
            "oracle_improvement": o,
            "controller_share": _share(sum(f["controller"]["improvement"] for f in group), o),
            "controller_wide_share": _share(sum(f["controller_wide"]["improvement"] for f in group), o),
            "controller_screened_share": _share(sum(f["controller_screened"]["improvement"] for f in group), o),
            "tpe_share": _share(sum(f["tpe"]["improvement"] for f in group), o),
            "effects": {n: float(np.mean([f["oracle"]["effects"][n] for f in group])) for n in LEARNING_KNOBS},
        }
    return {"oracle_improvement": oracle, "controller_improvement": ctrl, "tpe_improvement": tpe,
            "controller_share": share, "tpe_share": _share(tpe, oracle),
            "controller_wide_improvement": wide, "controller_wide_share": _share(wide, oracle),
            "controller_wide_rollbacks": int(sum(f["controller_wide"]["rollbacks"] for f in fleets)),
            "controller_wide_reverts": int(sum(f["controller_wide"]["reverts"] for f in fleets)),
            "controller_wide_accepts": int(sum(f["controller_wide"]["accepts"] for f in fleets)),
            "controller_screened_improvement": screened, "controller_screened_share": _share(screened, oracle),
            **{f"controller_screened_{k}": int(sum(f["controller_screened"][k] for f in fleets))
               for k in ("rollbacks", "reverts", "accepts", "screen_picks", "screen_fits")},
            "screened_target_met": bool(_share(screened, oracle) is not None and _share(screened, oracle) >= TARGET_SHARE),
            "target_met": bool(share is not None and share >= TARGET_SHARE),
            "rollbacks": int(sum(f["controller"]["rollbacks"] for f in fleets)),
            "reverts": int(sum(f["controller"]["reverts"] for f in fleets)),
            "accepts": int(sum(f["controller"]["accepts"] for f in fleets)),
            "per_situation": per_situation}


def _fmt_knobs(knobs: dict[str, float]) -> str:
    d = default_knobs()
    moved = {n: knobs[n] for n in LEARNING_KNOBS if abs(knobs[n] - d[n]) > 1e-9}
    return ", ".join(f"{n}={v:g}" for n, v in moved.items()) or "defaults"


def format_knob_tuning(res: dict[str, Any]) -> str:
    cfg, s = res["config"], res["summary"]
    lines = [f"## Knob tuning: controller (paired knob trials) vs defaults vs oracle sweep vs Optuna TPE, "
             f"{cfg['n_cycles']} cycles over the last {cfg['tuning_days']:g} training days",
             "",
             "held-out MSE (R²) of overrides fitted at train_end; improvement = MSE(defaults) − MSE(knobs)",
             "",
             "| fleet | seed | trades / held-out | defaults | controller (live trials only) | TPE | oracle sweep | controller knobs | TPE knobs | oracle knobs | rollbacks / reverts / accepts |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in res["fleets"]:
        c, t, o = f["controller"], f["tpe"], f["oracle"]
        lines.append(f"| {f['situation']} ({f['fleet_source']}) | {f['seed']} | {f['n_trades']} / {f['n_holdout']} | "
                     f"{f['defaults_mse']:.5f} | {c['mse']:.5f} ({c['improvement']:+.5f}) | {t['mse']:.5f} "
                     f"({t['improvement']:+.5f}) | {o['mse']:.5f} ({o['improvement']:+.5f}) | {_fmt_knobs(c['knobs'])} | "
                     f"{_fmt_knobs(t['knobs'])} | {_fmt_knobs(o['knobs'])} | {c['rollbacks']} / {c['reverts']} / {c['accepts']} |")
    lines += ["", "Variant (not the target's arm): the controller with trust regions as wide as a knob's range "
              "(initial_step 0.5, max_step 1.0)", "",
              "| fleet | seed | held-out MSE | improvement | knobs | rollbacks / reverts / accepts |", "|---|---|---|---|---|---|"]
    for f in res["fleets"]:
        w = f["controller_wide"]
        lines.append(f"| {f['situation']} | {f['seed']} | {w['mse']:.5f} | {w['improvement']:+.5f} | {_fmt_knobs(w['knobs'])} | "
                     f"{w['rollbacks']} / {w['reverts']} / {w['accepts']} |")
    lines += ["", "controller (screened): the same controller whose trials are proposed by the counterfactual knob "
              "screen (meta.knob_screen: candidates refitted as of a past T, scored paired vs the incumbent on the trades "
              "realized since, max-T family-wise threshold), each pick then judged live and paired (accepted on a positive gain)", "",
              "| fleet | seed | held-out MSE | improvement | knobs | screens / picks / fits | rollbacks / reverts / accepts |",
              "|---|---|---|---|---|---|---|"]
    for f in res["fleets"]:
        w = f["controller_screened"]
        lines.append(f"| {f['situation']} | {f['seed']} | {w['mse']:.5f} | {w['improvement']:+.5f} | {_fmt_knobs(w['knobs'])} | "
                     f"{len(w['screens'])} / {w['screen_picks']} / {w['screen_fits']} | "
                     f"{w['rollbacks']} / {w['reverts']} / {w['accepts']} |")
    lines += ["", "Per-knob effect size: held-out MSE at the knob's high bound minus at its low bound (others at defaults), "
              "mean over seeds", "",
              "| fleet | " + " | ".join(LEARNING_KNOBS) + " | oracle improvement | controller share | screened share | TPE share |",
              "|---|" + "---|" * (len(LEARNING_KNOBS) + 4)]
    for situation, p in s["per_situation"].items():
        share = "n/a" if p["controller_share"] is None else f"{p['controller_share']:.2f}"
        tshare = "n/a" if p["tpe_share"] is None else f"{p['tpe_share']:.2f}"
        sshare = "n/a" if p["controller_screened_share"] is None else f"{p['controller_screened_share']:.2f}"
        lines.append(f"| {situation} | " + " | ".join(f"{p['effects'][n]:+.5f}" for n in LEARNING_KNOBS)
                     + f" | {p['oracle_improvement']:+.5f} | {share} | {sshare} | {tshare} |")
    share = "n/a (the oracle sweep improves nothing)" if s["controller_share"] is None else f"{s['controller_share']:.2f}"
    tshare = "n/a" if s["tpe_share"] is None else f"{s['tpe_share']:.2f}"
    lines += ["",
              f"pooled over fleets: oracle improvement {s['oracle_improvement']:+.5f}, controller (live trials only) {s['controller_improvement']:+.5f} "
              f"(share {share}), TPE {s['tpe_improvement']:+.5f} (share {tshare}); controller rollbacks {s['rollbacks']}, "
              f"reverts {s['reverts']}, accepts {s['accepts']}",
              f"variant with wide trust regions: {s['controller_wide_improvement']:+.5f} (share "
              + ("n/a" if s["controller_wide_share"] is None else f"{s['controller_wide_share']:.2f}")
              + f"), rollbacks {s['controller_wide_rollbacks']}, reverts {s['controller_wide_reverts']}, "
              f"accepts {s['controller_wide_accepts']}",
              f"controller (screened): {s['controller_screened_improvement']:+.5f} (share "
              + ("n/a" if s["controller_screened_share"] is None else f"{s['controller_screened_share']:.2f}")
              + f"), screen picks {s['controller_screened_screen_picks']}, screen fits {s['controller_screened_screen_fits']}, "
              f"rollbacks {s['controller_screened_rollbacks']}, reverts {s['controller_screened_reverts']}, "
              f"accepts {s['controller_screened_accepts']}",
              f"target: controller ≥ {TARGET_SHARE:.0%} of the oracle sweep's improvement within {cfg['n_cycles']} cycles — "
              f"controller (live trials only) {'MET' if s['target_met'] else 'NOT MET'}; controller (screened) "
              f"{'MET' if s['screened_target_met'] else 'NOT MET'}"]
    return "\n".join(lines)


__all__ = ["KnobTuningConfig", "SITUATIONS", "format_knob_tuning", "knob_tuning_section", "run_fleet"]
