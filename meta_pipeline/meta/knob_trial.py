"""Knob trials judged paired: the same realized trades scored by overrides built with the old and the new knobs.

A learning knob (``LEARNING_KNOBS``: what the learning jobs read when they build
``pm_overrides``) has no effect until overrides are rebuilt with it, and its effect on
one cycle of realized trades is far below that cycle's noise (the MSE of a 1,000-trade
cycle has a sampling SD of ≈ 0.36·√(2/n) R² at unit-variance returns; a knob moves it by
a few thousandths). So a trial of a learning knob is never judged by comparing two noisy
cycles (before vs after). It is judged **paired and counterfactual**:

* the *new* arm: the overrides version built with the new knobs as of time ``a`` (the
  version the knob-trial sensor's re-materialization stored; in the lab, a fit at ``a``);
* the *old* arm: overrides fitted with the previous knobs **as of the same ``a``** on
  the same trades (``fit_override_model``: the learning jobs' core functions end to end,
  the walk-forward machinery of the closed loop);
* both score the same realized trades, those closed after ``a`` (``(a, until]``). Per
  trade i, ``d_i = (y_i − p_old,i)² − (y_i − p_new,i)²``: the new knobs' MSE reduction.
  The two arms share y_i, so the outcome noise — which dominates each MSE — cancels in
  d_i and only the predictions' disagreement is left.

The verdict (``PairedTrial``): ``gain = mean(d)/mean(y²)`` (the change of alignment
``1 − MSE/MSE₀``), its standard error ``se = sd(d)/(√n·mean(y²))``, ``z = gain/se``,
over every realized trade after the post-change version so far. ``paired_verdict`` is a
sequential rule (the canary window, counted in realized trades): roll back as soon as
``z ≤ −2`` (the new knobs are worse beyond noise), accept / revert early beyond ±1.5,
otherwise keep scoring until ``PAIRED_MAX_TRADES``, then accept when ``z ≥ 1``, else
revert (not shown better: keep the old knobs, no penalty). ``judge_paired_trial`` updates
the controller's state exactly as a telemetry-judged trial would (cooldowns, trust
regions, the surrogate's observations, the rollback count).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from meta_pipeline.knobs import KNOB_NAMES, KNOBS, clip_knobs
from meta_pipeline.learning import factors as factors_core
from meta_pipeline.learning import feedback as feedback_core
from meta_pipeline.learning import halflife as halflife_core
from meta_pipeline.learning import lessons as lessons_core
from meta_pipeline.learning import regime as regime_core
from meta_pipeline.learning.overrides import OverrideModel
from meta_pipeline.meta import controller as controller_core
from meta_pipeline.meta.reward import REALIZED_REF

# the knobs the learning jobs read when they build pm_overrides (a change needs a re-materialization);
# gamma_diversity is the controller's own (exploration) and takes effect at once
LEARNING_KNOBS: tuple[str, ...] = tuple(n for n in ("lambda_ci", "tier3_topk", "tau", "g_min", "tier2_enabled")
                                        if n in KNOBS)

MIN_PAIRED_TRADES = 200  # realized trades after the new version's as_of before a trial is judged
PAIRED_ACCEPT_Z = 1.0  # accept when the paired gain is at least this many SEs above 0
PAIRED_ROLLBACK_Z = 2.0  # roll back when it is at least this many SEs below 0
PAIRED_EARLY_Z = 1.5  # before PAIRED_MAX_TRADES: accept early beyond this many SEs (revert early below −it)
PAIRED_MAX_TRADES = 1_500  # a trial is decided at the latest once this many realized trades scored it
# a trial proposed by the counterfactual screen (meta.knob_screen; pending source "screen") already passed a
# family-wise test on realized trades: live, it is accepted when its fresh trades show a positive gain (z > 0;
# the tiny positive threshold keeps a trial that priced every trade alike, z = 0, from being accepted)
SCREENED_ACCEPT_Z = 1e-9


def live_accept_z(state: controller_core.ControllerState) -> float:
    """The live accept threshold of the pending trial: SCREENED_ACCEPT_Z for a screen's pick, else PAIRED_ACCEPT_Z."""
    return SCREENED_ACCEPT_Z if (state.pending or {}).get("source") == "screen" else PAIRED_ACCEPT_Z


def paired_verdict(trial: PairedTrial, *, accept_z: float = PAIRED_ACCEPT_Z, rollback_z: float = PAIRED_ROLLBACK_Z,
                   early_z: float = PAIRED_EARLY_Z, max_trades: int = PAIRED_MAX_TRADES) -> str | None:
    """The sequential rule over the growing set of realized trades after the post-change version:
    rollback as soon as z ≤ −rollback_z; accept early when z ≥ early_z, revert early when z ≤ −early_z;
    no effect at all (se = 0: both arms priced every trade alike) is final at once; at ``max_trades``
    accept when z ≥ accept_z, else revert; otherwise None (keep scoring: the canary window)."""
    z = trial.z
    if z <= -rollback_z:
        return "rollback"
    if trial.se == 0.0 or z >= early_z:
        return "accept" if z >= accept_z else "revert"
    if z <= -early_z:
        return "revert"
    if trial.n >= max_trades:
        return "accept" if z >= accept_z else "revert"
    return None


def learning_knobs_changed(updates: Mapping[str, object]) -> list[str]:
    """The learning knobs among a decision's policy updates."""
    return [n for n in LEARNING_KNOBS if n in updates]


# ---------------------------------------------------------------------------
# The source frames and the fit as of a time
# ---------------------------------------------------------------------------


@dataclass
class SourceFrames:
    """A domain's source tables in the store layout (trades: trade_id, closed_at, regime, return_r)."""

    trades: pd.DataFrame
    patterns: pd.DataFrame
    scope: pd.DataFrame
    metrics: pd.DataFrame

    def __post_init__(self) -> None:
        self.trades = self.trades.sort_values(["closed_at", "trade_id"], kind="stable").reset_index(drop=True)
        self.trades["closed_at"] = pd.to_datetime(self.trades["closed_at"], utc=True)

    def between(self, start: pd.Timestamp | None, end: pd.Timestamp | None) -> SourceFrames:
        """The trades closed in (start, end] (None: unbounded) with their source rows."""
        t = self.trades["closed_at"]
        keep = np.ones(len(t), dtype=bool)
        if start is not None:
            keep &= (t > pd.Timestamp(start)).to_numpy()
        if end is not None:
            keep &= (t <= pd.Timestamp(end)).to_numpy()
        trades = self.trades[keep].reset_index(drop=True)
        ids = set(trades["trade_id"])
        return SourceFrames(trades, *(f[f["trade_id"].isin(ids)].reset_index(drop=True)
                                      for f in (self.patterns, self.scope, self.metrics)))


def fit_override_model(frames: SourceFrames, knobs: Mapping[str, float], as_of: pd.Timestamp | None = None,
                       drift_events: pd.DataFrame | None = None) -> OverrideModel:
    """The overrides the learning jobs would build with ``knobs`` from the trades closed at or before ``as_of``.

    The same core functions, in the same order, as the learning assets (lessons with
    ``lambda_ci`` → edge history → half-life fits → latent factors → regime weights →
    ``OverrideModel.fit`` with the knobs), honouring the drift breaks detected by ``as_of``
    (``drift_events``: the drift_events rows; patterns a break affected learn only after it).
    """
    window = frames.between(None, as_of)
    trades, patterns, scope, metrics = window.trades, window.patterns, window.scope, window.metrics
    if drift_events is not None and len(drift_events):
        events = drift_events
        if as_of is not None:
            events = events[feedback_core.break_times(events) <= pd.Timestamp(as_of)]
        if len(events):
            breaks = feedback_core.break_windows(trades, patterns, events)
            patterns = feedback_core.apply_break_windows(patterns, trades, breaks)
    knobs = clip_knobs({k: v for k, v in knobs.items() if k in KNOBS})
    lessons, incidence = lessons_core.mine_lessons(trades, patterns, scope, lambda_ci=float(knobs["lambda_ci"]))
    history = lessons_core.compute_edge_history(lessons, trades, patterns, scope, lesson_trades=incidence)
    fits = halflife_core.fit_half_lives(history)
    factors = factors_core.compute_latent_factors(lessons, trades, patterns, scope, lesson_trades=incidence)
    weights = regime_core.fit_regime_weights(trades, metrics)
    return OverrideModel.fit(lessons, fits, factors, weights, trades, patterns, scope, metrics, knobs=knobs,
                             lesson_trades=incidence)


def predict_edges(model: OverrideModel, frames: SourceFrames) -> np.ndarray:
    """The model's edge for each trade of ``frames`` (in its trade order)."""
    if frames.trades.empty:
        return np.zeros(0)
    edge = model.predict(frames.trades, frames.patterns, frames.scope, frames.metrics)
    return edge.reindex(frames.trades["trade_id"].astype(str).to_numpy()).to_numpy(dtype=float)


# ---------------------------------------------------------------------------
# Paired scoring
# ---------------------------------------------------------------------------


@dataclass
class PairedTrial:
    """The paired comparison of two knob sets on the same realized trades (module doc)."""

    n: int
    mse_old: float
    mse_new: float
    mse_zero: float
    gain: float  # (mse_old − mse_new) / mse_zero: the new knobs' alignment gain
    se: float
    as_of: str | None = None  # when both arms were built (ISO-8601)
    scored_until: str | None = None
    version: int | None = None  # the stored overrides version of the new arm (None: a fit)

    @property
    def z(self) -> float:
        return self.gain / self.se if self.se > 0 else (math.inf if self.gain > 0 else -math.inf if self.gain < 0 else 0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "z": self.z}


def paired_score(realized: np.ndarray, p_old: np.ndarray, p_new: np.ndarray) -> PairedTrial:
    """gain = mean(d)/mean(y²) with d = (y − p_old)² − (y − p_new)², se = sd(d)/(√n·mean(y²))."""
    y = np.asarray(realized, dtype=float)
    a = np.asarray(p_old, dtype=float)
    b = np.asarray(p_new, dtype=float)
    n = len(y)
    if n < 2:
        return PairedTrial(n, math.nan, math.nan, math.nan, 0.0, math.inf)
    d = (y - a) ** 2 - (y - b) ** 2
    mse_zero = float(np.mean(y * y)) or 1e-12
    se = float(np.std(d, ddof=1) / math.sqrt(n) / mse_zero)
    return PairedTrial(n, float(np.mean((y - a) ** 2)), float(np.mean((y - b) ** 2)), mse_zero,
                       float(np.mean(d) / mse_zero), se)


def counterfactual_trial(frames: SourceFrames, as_of: pd.Timestamp, old_knobs: Mapping[str, float],
                         new_knobs: Mapping[str, float] | None = None, until: pd.Timestamp | None = None, *,
                         new_model: OverrideModel | None = None, drift_events: pd.DataFrame | None = None,
                         old_model: OverrideModel | None = None) -> PairedTrial:
    """Score the trades closed in (as_of, until] with overrides built as of ``as_of`` with the old and the new knobs.

    ``new_model``: the stored post-change version (its ``version`` is recorded); else a fit
    with ``new_knobs``. ``old_model``: a fit already made with the old knobs at ``as_of``.
    """
    stamp = pd.Timestamp(as_of)
    scored = frames.between(stamp, until)
    old = old_model if old_model is not None else fit_override_model(frames, old_knobs, stamp, drift_events)
    if new_model is None:
        if new_knobs is None:
            raise ValueError("counterfactual_trial needs new_knobs or new_model")
        new_model = fit_override_model(frames, new_knobs, stamp, drift_events)
    trial = paired_score(scored.trades["return_r"].to_numpy(dtype=float), predict_edges(old, scored),
                         predict_edges(new_model, scored))
    trial.as_of = stamp.isoformat()
    trial.scored_until = None if scored.trades.empty else scored.trades["closed_at"].max().isoformat()
    trial.version = new_model.version
    return trial


# ---------------------------------------------------------------------------
# The controller's side: a learning-knob trial waits for its paired verdict
# ---------------------------------------------------------------------------


def awaits_paired_verdict(state: controller_core.ControllerState) -> bool:
    """Whether the state's pending change touches a learning knob (it is judged paired, not on telemetry)."""
    return bool(state.pending and state.snapshot and learning_knobs_changed(
        {n: 1 for n in state.pending.get("knobs", [])}))


def paired_reward_gain(trial: PairedTrial, w_realized: float) -> float:
    """The trial's gain in meta-reward units: the realized-gain term's slope (w_realized / REALIZED_REF) × gain."""
    return float(w_realized) * trial.gain / REALIZED_REF


def judge_paired_trial(state: controller_core.ControllerState, trial: PairedTrial,
                       config: controller_core.ControllerConfig = controller_core.ControllerConfig(), *,
                       w_realized: float = 1.0, accept_z: float = PAIRED_ACCEPT_Z,
                       rollback_z: float = PAIRED_ROLLBACK_Z) -> tuple[controller_core.ControllerState, dict]:
    """Close the pending learning-knob trial on its paired verdict; returns (new state, decision fields).

    accept (z ≥ accept_z), rollback (z ≤ −rollback_z: counted, the knob's cooldown
    lengthened) or revert (neither). The incumbent's baseline moves by the gain in reward
    units on accept; the surrogate model learns the trial point at baseline + gain. A trial
    whose two arms priced every scored trade identically measured no effect: it is reverted
    without blaming the direction, and the knob's trust region widens (×step_grow).
    """
    if not awaits_paired_verdict(state):
        raise ValueError("no pending learning-knob trial to judge")
    s = copy.deepcopy(state)
    pend = s.pending
    z = trial.z
    verdict = paired_verdict(trial, accept_z=accept_z, rollback_z=rollback_z, max_trades=0)
    gain_r = paired_reward_gain(trial, w_realized)
    se_r = paired_reward_gain(PairedTrial(0, 0, 0, 0, trial.se, 0), w_realized)
    base = s.baseline_mean if s.baseline_mean is not None else 0.0
    pend.update(n=max(int(pend.get("window", 1)), 1), mean=base + gain_r, base=base, gain=gain_r, se=abs(se_r))
    names = list(pend["knobs"])
    trial_knobs = dict(s.knobs)
    tried = dict(pend.get("direction", {}))
    steps_before = dict(s.steps)
    moved = controller_core._finish_trial(s, verdict, config)
    no_effect = trial.n > 0 and trial.gain == 0.0 and trial.se == 0.0
    if no_effect:  # both arms priced every trade alike: the move was too small to change what engines
        for n in names:  # receive, not a failed direction — keep the direction and widen the trust region
            if tried.get(n):
                s.directions[n] = int(tried[n])
                s.failed_directions[n] = []
            s.steps[n] = min(config.max_step, steps_before[n] * config.step_grow)
    s.observations.append([*map(float, controller_core._unit(trial_knobs)), float(base + gain_r), float(s.evidence)])
    del s.observations[:-config.model_memory]
    if verdict == "accept":  # the paired gain is measured on many trades: it is the new baseline, unshrunk
        s.baseline_mean = base + gain_r
    on = f"overrides v{trial.version}" if trial.version is not None else "a fit"
    note = (f"paired knob trial ({', '.join(names)}) {verdict}: alignment gain {trial.gain:+.5f} ± {trial.se:.5f} "
            f"(z {z:+.2f}) on {trial.n} trades closed after {trial.as_of}, new knobs = {on}, old knobs refit as of "
            f"the same time")
    if no_effect:
        note += "; no trade priced differently: the knob's trust region widens, same direction next time"
    if verdict == "rollback":
        note += f"; rolled back to {', '.join(f'{n}={s.knobs[n]:g}' for n in names)} (overrides re-materialized)"
    return s, {"verdict": verdict, "moved": moved, "trial": trial.to_dict(), "note": note,
               "reward_gain": gain_r, "knobs": dict(s.knobs), "trial_knobs": trial_knobs}


def paired_decision(before: controller_core.ControllerState, after: controller_core.ControllerState,
                    outcome: dict) -> tuple[controller_core.ControllerState, dict]:
    """The meta_decisions record of a paired verdict (``judge_paired_trial``'s outcome): one decision of its own,
    whose ``judged_on`` names the overrides version and the trades it was judged on."""
    s = copy.deepcopy(after)
    s.decisions += 1
    updates = {n: s.knobs[n] for n in KNOB_NAMES if s.knobs[n] != before.knobs[n]}
    verdict = outcome["verdict"]
    trial = outcome["trial"]
    return s, {
        "decision_no": s.decisions,
        "policy_updates": updates,
        "reward": None if s.baseline_mean is None else float(s.baseline_mean),
        "batch_reward": None,
        "reward_ema": s.reward_ema,
        "rolled_back": verdict == "rollback",
        "reverted": verdict == "revert",
        "accepted": verdict == "accept",
        "judged": "paired",
        "action": f"paired-{verdict}",
        "evidence": "paired",
        "cooldowns": dict(s.cooldowns),
        "knobs": dict(s.knobs),
        "telemetry": [],
        "judged_on": {"overrides_version": trial["version"], "as_of": trial["as_of"],
                      "scored_until": trial["scored_until"], "n_trades": trial["n"], "gain": trial["gain"],
                      "se": trial["se"], "z": trial["z"], "old_knobs": {n: before.snapshot["knobs"][n] for n in LEARNING_KNOBS},
                      "new_knobs": {n: outcome["trial_knobs"][n] for n in LEARNING_KNOBS}},
        "note": outcome["note"],
    }


# ---------------------------------------------------------------------------
# When is a trial ready: a post-change overrides version, and realized trades after it
# ---------------------------------------------------------------------------


def same_learning_knobs(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return all(abs(float(a[n]) - float(b[n])) <= 1e-9 * max(1.0, abs(float(b[n]))) for n in LEARNING_KNOBS)


def post_change_version(versions: pd.DataFrame, new_knobs: Mapping[str, float],
                        changed_at: pd.Timestamp | None) -> pd.Series | None:
    """The first overrides version materialized at or after the change whose learning knobs are the new knobs.

    ``versions``: pm_overrides_versions rows (version, materialized_at, as_of, knobs_json).
    A version built before the change — or with other knobs — is never the trial's evidence.
    """
    from meta_pipeline.knobs import parse_knobs

    if versions is None or versions.empty:
        return None
    rows = versions.sort_values("version", kind="stable")
    if changed_at is not None:
        rows = rows[pd.to_datetime(rows["materialized_at"], utc=True) >= pd.Timestamp(changed_at)]
    for _, row in rows.iterrows():
        if same_learning_knobs(parse_knobs(row["knobs_json"]), new_knobs):
            return row
    return None


def trial_readiness(state: controller_core.ControllerState, versions: pd.DataFrame, closed_at: pd.Series,
                    min_trades: int = MIN_PAIRED_TRADES) -> tuple[pd.Series | None, str]:
    """(the post-change version to judge on, "") when the pending learning-knob trial can be judged, else (None, why).

    Ready: an overrides version built with the new knobs after the change exists, and at least
    ``min_trades`` realized trades closed after its as_of.
    """
    if not awaits_paired_verdict(state):
        return None, "no pending learning-knob trial"
    changed_at = state.pending.get("changed_at")
    version = post_change_version(versions, state.knobs, None if changed_at is None else pd.Timestamp(changed_at))
    names = ", ".join(state.pending["knobs"])
    if version is None:
        return None, (f"trial of {names} not judged yet: no overrides version built with the new knobs since the "
                      f"change ({changed_at}); the knob-trial sensor re-materializes the learning assets")
    as_of = pd.Timestamp(version["as_of"])
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")
    n_after = int((pd.to_datetime(closed_at, utc=True) > as_of).sum())
    if n_after < min_trades:
        return None, (f"trial of {names} not judged yet: overrides v{int(version['version'])} (new knobs, as of "
                      f"{as_of}) has {n_after} realized trade(s) after it, {min_trades} needed")
    return version, ""


def propose_next(state: controller_core.ControllerState, config: controller_core.ControllerConfig,
                 only: Sequence[str] | None = None) -> tuple[controller_core.ControllerState, dict | None]:
    """Ask the controller's proposer for its next one-knob trial (None: nothing movable or a trial pending).

    ``only``: the knobs it may move (others are held as if cooling down), e.g. LEARNING_KNOBS.
    """
    s = copy.deepcopy(state)
    if s.pending is not None:
        return s, None
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = s.rng_state
    held = {n: s.cooldowns[n] for n in KNOB_NAMES if only is not None and n not in only}
    for n in held:
        s.cooldowns[n] = max(1, held[n])
    proposal = controller_core._propose_trial(s, rng, config)
    for n, c in held.items():
        s.cooldowns[n] = c
    s.rng_state = rng.bit_generator.state
    return s, proposal


def end_cycle(state: controller_core.ControllerState) -> controller_core.ControllerState:
    """One decision of evidence has passed (a feedback cycle): cooldowns count down by one."""
    s = copy.deepcopy(state)
    s.decisions += 1
    s.evidence += 1
    s.cooldowns = {n: max(0, c - 1) for n, c in s.cooldowns.items()}
    return s


def paired_step(state: controller_core.ControllerState, paired_judge, config: controller_core.ControllerConfig
                ) -> tuple[controller_core.ControllerState, list[dict], list[str]]:
    """Close the pending learning-knob trial when its paired verdict is ready (the controller policy's hook).

    ``paired_judge(state)`` returns ``(PairedTrial, "")`` when the trial can be judged (a
    post-change overrides version and enough realized trades after it: ``trial_readiness``),
    else ``(None, why)``; ``paired_verdict`` decides whether the evidence so far is enough.
    Returns (state, [the verdict's decision] or [], notes).
    """
    if paired_judge is None or not awaits_paired_verdict(state):
        return state, [], []
    trial, why = paired_judge(state)
    if trial is None:
        return state, [], [why] if why else []
    accept_z = live_accept_z(state)
    if paired_verdict(trial, accept_z=accept_z, max_trades=config.paired_max_trades) is None:
        return state, [], [f"trial of {', '.join(state.pending['knobs'])} not decided yet: alignment gain "
                           f"{trial.gain:+.5f} ± {trial.se:.5f} (z {trial.z:+.2f}) on {trial.n} trades after "
                           f"overrides v{trial.version}; scoring continues up to {config.paired_max_trades} trades"]
    judged, outcome = judge_paired_trial(state, trial, config, w_realized=config.reward_weights.realized,
                                         accept_z=accept_z)
    state, decision = paired_decision(state, judged, outcome)
    return state, [decision], []


def stamp_change(state: controller_core.ControllerState, config: controller_core.ControllerConfig,
                 now: pd.Timestamp) -> controller_core.ControllerState:
    """Record when a pending paired trial's knobs changed (its evidence must be built after it)."""
    pend = state.pending
    if pend and set(pend["knobs"]) & set(config.paired_knobs) and not pend.get("changed_at"):
        pend["changed_at"] = pd.Timestamp(now).isoformat()
    return state


__all__ = ["LEARNING_KNOBS", "PairedTrial", "SourceFrames", "awaits_paired_verdict", "counterfactual_trial",
           "fit_override_model", "judge_paired_trial", "paired_decision", "post_change_version",
           "trial_readiness", "learning_knobs_changed", "paired_score", "predict_edges",
           "propose_next", "end_cycle", "paired_step", "stamp_change",
           "paired_verdict"]
