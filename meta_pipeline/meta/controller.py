"""The integrative layer's controller (tier-5 governance): telemetry in, bounded knob moves out.

A pure core (no Dagster): `update(state, telemetry)` makes ONE decision from one batch of
telemetry ticks and returns a new state plus a decision record; the input state is never
mutated, so a caller can persist the state, crash, and continue exactly.

How it searches: one-knob trials in trust regions, judged by paired comparisons
-------------------------------------------------------------------------------
* The *incumbent* knobs have a reward estimate, the **baseline**: an exponentially weighted
  mean of the batch rewards observed under them (forgetting `baseline_forget` per decision,
  so it tracks drift and its weight says how fresh it is).
* A **trial** changes one knob (bool knobs flip, int knobs move at least one notch, all
  clipped to KNOBS bounds), takes a **snapshot** (knobs + baseline reward before the change)
  and puts the knob in **cooldown** for `base_cooldown` decisions: the canary window. A
  cooldown only counts decisions made on telemetry that ran the knobs in effect, so engine
  lag cannot shorten it; a cooling knob never starts a new move (it may only return to its
  snapshot by rollback or revert).
* Every decision of the window compares the trial's mean reward with the snapshot's reward
  EMA. A drop beyond ``max(rollback_threshold, rollback_z·σ·√(1/n_trial + 1/w_baseline))``
  fails the canary: **roll back** to the snapshot, count the rollback, lengthen that knob's
  cooldown to ``base_cooldown·cooldown_multiplier^failures`` (≤ `max_cooldown`), and look at
  the snapshot once before the next trial.
* A clear result ends the window early (gain beyond ±`early_z` SE); otherwise, at the end the
  trial is **accepted** when ``trial − baseline + prior pull > accept_z·SE`` (the new baseline
  is the observed gain shrunk by its noise, positive-part James-Stein), else **reverted**.
  Accepts widen the knob's trust region, failures narrow it: steps decay with evidence near
  an optimum and grow on a slope.
* Which trial: first a probe of every knob the data has never seen moved; then mostly
  model-guided — a separable quadratic surrogate of reward vs knobs
  (weighted ridge regression on recent observations, `fit_surrogate`) predicts the best move
  of each knob within its trust region; the knob with the best predicted gain plus an
  exploration bonus for seldom-moved knobs plus the prior's pull is tried. A share of trials
  is random (a knob weighted by the reward change its trials caused, a direction by momentum).
  `gamma_diversity` (documented as exploration vs exploitation) scales trust regions and the
  random share by √(gamma_diversity/0.3). All randomness comes from a seeded generator whose
  state is persisted.
* Telemetry from knobs the controller did not set (history, a hand-set policy, engine lag) is
  no evidence about the incumbent — the decision holds and no cooldown counts down — but it
  does feed the surrogate model.
* A reward level shift (a baseline observation beyond `level_shift_z` noise SDs) resets the
  baseline and the model's data and re-opens the trust regions; if the shift is downward,
  rollbacks judged since the baseline was last seen are blamed on the shift and their
  cooldown penalties cleared (the snapshot is just as bad, so the changes were not at fault).

Reward: each tick's reward is `meta.reward.meta_reward`; a decision uses the **mean
reward of the batch** (all of its ticks that ran the knobs in effect; see `_attribute`).

Prior: a prior (e.g. the newest `global_prior` version) sets the cold-start point and pulls
the search toward it through the acceptance test, with weight
``w = prior_strength / (prior_strength + n_evidence)`` that fades with the domain's own
evidence. Negative-transfer guard: once ``n_evidence ≥ negative_transfer_window``, if the
reward of the knobs the domain's own exploration has moved to (the incumbent's baseline EMA)
beats the reward measured at the prior's point by more than ``negative_transfer_margin + 2·SE``,
the pull is dropped for good (``prior_disabled`` with the reason). A newer prior arriving later only
replaces the pull target (never moves a knob); it does not re-enable a disabled prior.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import (
    TELEMETRY_REQUIRED,
    TELEMETRY_STORE_COLUMNS,
    check_telemetry_rows,
    knob_column,
)
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, clip_knobs, default_knobs
from meta_pipeline.meta.reward import REALIZED_COLUMN, RewardWeights, meta_reward
from meta_pipeline.meta.surface import quadratic_design, ridge_solve

# Two knob vectors are "the same policy" within this distance per knob, in unit space
# (stored floats round-trip exactly; the slack only absorbs float formatting elsewhere).
KNOB_MATCH_TOL = 1e-7


class TelemetryError(ValueError):
    """A telemetry batch the controller cannot decide on (missing field, non-finite or out-of-range value)."""


# ---------------------------------------------------------------------------
# Configuration and state
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerConfig:
    """The controller's own knobs, each validated against a sane range."""

    ema_alpha: float = 0.2  # weight of the newest decision in reward_ema
    rollback_threshold: float = 0.05  # minimum reward drop (vs the snapshot's EMA) that fails a canary
    rollback_z: float = 3.0  # ... and it must also exceed this many standard errors
    base_cooldown: int = 3  # decisions a changed knob waits (= the canary / trial window)
    cooldown_multiplier: float = 2.0  # cooldown after the f-th failed canary: base·multiplier^f
    max_cooldown: int = 24
    initial_step: float = 0.35  # unit-space trial step at a cold start without a prior (high exploration)
    prior_step: float = 0.12  # ... with a prior (start near a known-good point)
    min_step: float = 0.02
    max_step: float = 0.5
    step_grow: float = 1.4  # step multiplier after an accepted trial
    step_shrink: float = 0.6  # ... after a reverted one
    accept_z: float = 0.25  # at the end of the window: accept when the gain exceeds this many SEs
    early_z: float = 1.5  # within the window: accept (or revert) early beyond this many SEs
    initial_effect: float = 0.1  # optimistic |reward effect| of an untried knob (so every knob gets tried)
    momentum: float = 0.9  # probability of stepping in the direction that last worked
    baseline_forget: float = 0.1  # per decision: old evidence about the incumbent fades
    min_baseline_weight: float = 1.5  # evidence (in observations) the incumbent needs before a trial
    level_shift_z: float = 3.5  # a baseline observation this far off resets the baseline
    initial_noise_sd: float = 0.05  # reward noise per decision before it is estimated
    noise_ema: float = 0.05  # learning rate of the noise variance estimate
    min_noise_sd: float = 0.002
    prior_strength: float = 20.0  # pseudo-observations: prior weight = s / (s + n_evidence)
    prior_pull: float = 0.3  # reward units per unit² of distance to the prior, at full weight
    negative_transfer_window: int = 15  # evidence decisions before the guard may judge the prior
    negative_transfer_margin: float = 0.05  # reward units own exploration must beat the prior point by
    random_trial_rate: float = 0.1  # share of random (not model-guided) trials at the default gamma_diversity
    model_min_obs: int = 4  # observations before the surrogate model guides trials
    model_memory: int = 60  # observations kept for the model
    model_forget: float = 0.97  # per-decision weight decay of old observations
    model_ridge: float = 0.01
    model_curvature_prior: float = 0.3
    model_explore: float = 1.0  # exploration bonus, in noise SDs, for a knob never moved
    ticks_per_decision: int = 1  # telemetry ticks per decision (used by callers that batch a stream)
    # the reward's weights (meta.reward.RewardWeights: telemetry terms + the realized gain of the overrides)
    reward_weights: RewardWeights = RewardWeights()
    # knobs whose trials are judged paired on realized trades (meta.knob_trial), never on telemetry:
    # such a pending trial holds until judge_paired_trial closes it (the controller_state asset: the learning knobs)
    paired_knobs: tuple[str, ...] = ()
    paired_max_trades: int = 1_500  # a paired trial is decided at the latest on this many realized trades

    def __post_init__(self) -> None:
        bounds: dict[str, tuple[float, float]] = {
            "ema_alpha": (1e-3, 1.0),
            "rollback_threshold": (0.0, 10.0),
            "rollback_z": (0.0, 10.0),
            "base_cooldown": (1, 100),
            "cooldown_multiplier": (1.0, 10.0),
            "max_cooldown": (1, 10_000),
            "initial_step": (1e-3, 1.0),
            "prior_step": (1e-3, 1.0),
            "min_step": (1e-4, 1.0),
            "max_step": (1e-3, 1.0),
            "step_grow": (1.0, 5.0),
            "step_shrink": (0.05, 1.0),
            "accept_z": (-5.0, 10.0),
            "early_z": (0.0, 100.0),
            "initial_effect": (1e-6, 100.0),
            "momentum": (0.0, 1.0),
            "baseline_forget": (0.0, 0.9),
            "min_baseline_weight": (0.5, 100.0),
            "level_shift_z": (1.0, 100.0),
            "initial_noise_sd": (1e-6, 10.0),
            "noise_ema": (1e-4, 1.0),
            "min_noise_sd": (0.0, 10.0),
            "prior_strength": (0.0, 1e6),
            "prior_pull": (0.0, 100.0),
            "negative_transfer_window": (1, 100_000),
            "negative_transfer_margin": (0.0, 10.0),
            "ticks_per_decision": (1, 100_000),
            "random_trial_rate": (0.0, 1.0),
            "model_min_obs": (2, 10_000),
            "model_memory": (2, 10_000),
            "model_forget": (0.5, 1.0),
            "model_ridge": (1e-9, 1e3),
            "model_curvature_prior": (0.0, 100.0),
            "model_explore": (0.0, 100.0),
        }
        for name, (lo, hi) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
                raise ValueError(f"ControllerConfig.{name}={value!r} outside [{lo}, {hi}]")
        for name in ("base_cooldown", "max_cooldown", "negative_transfer_window", "ticks_per_decision",
                     "model_min_obs", "model_memory"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"ControllerConfig.{name} must be an integer")
        if self.min_step > self.max_step:
            raise ValueError("ControllerConfig.min_step must not exceed max_step")
        if self.max_cooldown < self.base_cooldown:
            raise ValueError("ControllerConfig.max_cooldown must be at least base_cooldown")


def _zeros() -> dict[str, int]:
    return {name: 0 for name in KNOB_NAMES}


@dataclass
class ControllerState:
    """Everything the controller remembers; `to_json`/`from_json` round-trip it exactly."""

    knobs: dict[str, float]
    cooldowns: dict[str, int] = field(default_factory=_zeros)  # decisions of evidence left per knob
    reward_ema: float | None = None  # EMA of every decision's batch reward
    rollbacks: int = 0  # failed canaries (rolled back)
    reverts: int = 0  # trials that ended not better (returned to the snapshot)
    accepts: int = 0
    decisions: int = 0
    evidence: int = 0  # decisions made on telemetry that ran the knobs in effect
    baseline_mean: float | None = None  # reward estimate of the incumbent (the snapshot during a trial)
    baseline_weight: float = 0.0  # its effective number of observations
    noise_var: float = 0.0025  # per-decision reward noise variance estimate
    snapshot: dict[str, Any] | None = None  # {"knobs", "reward", "weight", "decision"} before the last change
    pending: dict[str, Any] | None = None  # {"knobs", "kind", "started", "n", "mean", "direction"}
    steps: dict[str, float] = field(default_factory=dict)  # unit-space step per knob
    directions: dict[str, int] = field(default_factory=dict)  # preferred direction per knob (+1/-1)
    failed_directions: dict[str, list[int]] = field(default_factory=dict)  # failed since the last success
    effects: dict[str, float] = field(default_factory=dict)  # EMA of |reward change| a trial of the knob caused
    observations: list[list[float]] = field(default_factory=list)  # recent [unit knobs..., reward, evidence no.]
    failures: dict[str, int] = field(default_factory=_zeros)  # failed canaries per knob (sets the cooldown)
    unconfirmed_rollbacks: list[dict[str, Any]] = field(default_factory=list)  # since the baseline was last seen
    best: dict[str, Any] | None = None  # best accepted setting {"reward", "n", "knobs", "decision"}
    prior: dict[str, float] | None = None
    prior_weight: float = 0.0
    prior_disabled: bool = False
    prior_disabled_reason: str | None = None
    prior_point: dict[str, Any] | None = None  # reward measured at the prior's point {"mean", "weight"}
    rng_state: dict[str, Any] = field(default_factory=dict)
    last_ts: str | None = None  # ISO-8601 UTC of the newest tick consumed
    # where the prior came from ("global vN" or "neighbours: a, b"; meta.priors.choose_warm_start):
    # a neighbours' prior stays the pull target when a newer global version arrives
    prior_source: str | None = None
    fallback: dict[str, Any] | None = None  # the sustained-drop monitor's memory (meta.fallback), opaque here

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, s: str) -> ControllerState:
        raw = json.loads(s)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"controller state has unknown field(s) {sorted(unknown)}")
        state = cls(**raw)
        state.cooldowns = {k: int(v) for k, v in state.cooldowns.items()}
        state.failures = {k: int(v) for k, v in state.failures.items()}
        state.directions = {k: int(v) for k, v in state.directions.items()}
        state.failed_directions = {k: [int(d) for d in v] for k, v in state.failed_directions.items()}
        return state

    @property
    def incumbent_knobs(self) -> dict[str, float]:
        """The knobs the controller currently trusts: the snapshot during a trial, else the knobs."""
        return dict(self.snapshot["knobs"]) if self.pending and self.snapshot else dict(self.knobs)


def _new_rng_state(seed: int) -> dict[str, Any]:
    return np.random.Generator(np.random.PCG64(seed)).bit_generator.state


def normalize_prior(prior: Mapping[str, float] | None) -> dict[str, float] | None:
    """Known knobs of a prior, bounded; unknown names are ignored, non-finite values rejected."""
    if prior is None:
        return None
    values: dict[str, float] = {}
    for name, value in prior.items():
        if name not in KNOBS:
            continue
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"prior value for {name!r} is not finite: {value!r}")
        values[name] = KNOBS[name].clip(v)
    return values or None


def cold_start(
    prior: dict[str, float] | None = None, config: ControllerConfig = ControllerConfig(), seed: int = 0
) -> ControllerState:
    """A controller with no history: at the prior when given, else at the conservative defaults.

    Without a prior the trial steps start wide (`initial_step`: high exploration); with one they
    start at `prior_step`, and the prior pulls with full weight until evidence accumulates.
    """
    normalized = normalize_prior(prior)
    knobs = clip_knobs(normalized) if normalized else default_knobs()
    step = config.prior_step if normalized else config.initial_step
    return ControllerState(
        knobs=knobs,
        noise_var=config.initial_noise_sd**2,
        steps={n: step for n in KNOB_NAMES},
        directions={n: 1 for n in KNOB_NAMES},
        failed_directions={n: [] for n in KNOB_NAMES},
        effects={n: config.initial_effect for n in KNOB_NAMES},
        prior=normalized,
        prior_weight=_prior_weight(normalized is not None, False, 0, config),
        rng_state=_new_rng_state(seed),
    )


# ---------------------------------------------------------------------------
# Telemetry validation
# ---------------------------------------------------------------------------


@dataclass
class DecisionBatch:
    """The ticks one decision is made on: per-tick rewards and the knobs each tick reported."""

    ts: pd.Series  # UTC timestamps
    rewards: np.ndarray
    reported_knobs: np.ndarray  # n × len(KNOB_NAMES), NaN where a tick did not report a knob


def _row_label(i: int, ts: pd.Series | None) -> str:
    if ts is not None and i < len(ts) and not pd.isna(ts.iloc[i]):
        return f"row {i} (ts {ts.iloc[i].isoformat()})"
    return f"row {i}"


def validate_telemetry_batch(telemetry: pd.DataFrame, last_ts: str | None = None,
                             weights: RewardWeights | None = None) -> DecisionBatch:
    """Check a telemetry batch and compute its rewards, or raise TelemetryError naming field and row.

    The row checks are the data contract's (``contracts.check_telemetry_rows``, the same
    that quarantine rows at ingest): ts parseable, outcomes finite and within
    TELEMETRY_BOUNDS, knob columns ``knob_<name>`` (or ``knob.<name>``) empty ("not
    reported") or finite. The first failed check is raised. Ticks must also be newer than
    ``last_ts`` (a tick is never consumed twice).
    """
    if not isinstance(telemetry, pd.DataFrame):
        raise TelemetryError(f"telemetry must be a DataFrame, got {type(telemetry).__name__}")
    if telemetry.empty:
        raise TelemetryError("telemetry batch is empty: a decision needs at least one tick")
    missing = [c for c in TELEMETRY_REQUIRED if c not in telemetry.columns]
    if missing:
        raise TelemetryError(f"telemetry is missing required field(s): {', '.join(missing)}")
    frame = telemetry.reset_index(drop=True)
    rows = check_telemetry_rows(frame)
    ts = rows.ts
    problem = rows.first_problem()
    if problem is not None:
        i, col, reason = problem
        raise TelemetryError(
            f"telemetry field {col!r} in {_row_label(i, ts)}: {reason} (value {frame[col].iloc[i]!r})"
        )
    reported = np.full((len(frame), len(KNOB_NAMES)), np.nan)
    for j, name in enumerate(KNOB_NAMES):
        if name in rows.knobs:
            reported[:, j] = rows.knobs[name]
    if last_ts is not None:
        old = np.flatnonzero((ts <= pd.Timestamp(last_ts)).to_numpy())
        if len(old):
            i = int(old[0])
            raise TelemetryError(
                f"telemetry {_row_label(i, ts)} is not newer than the last consumed tick {last_ts}: already decided on"
            )
    w = weights or RewardWeights()
    rewards = np.asarray(meta_reward(**rows.outcomes, w_gain=w.gain, w_stability=w.stability,
                                     w_resource=w.resource), dtype=float).reshape(-1)
    if REALIZED_COLUMN in frame.columns:  # the domain's realized gain term (meta.reward.with_realized_term)
        rewards = rewards + np.nan_to_num(pd.to_numeric(frame[REALIZED_COLUMN], errors='coerce').to_numpy(dtype=float))
    return DecisionBatch(ts=ts, rewards=rewards, reported_knobs=reported)


# ---------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------


def _unit(knobs: Mapping[str, float]) -> np.ndarray:
    return np.array([KNOBS[n].to_unit(knobs[n]) for n in KNOB_NAMES])


def _matches(reported: np.ndarray, knobs: Mapping[str, float]) -> np.ndarray:
    """Per tick: did it run `knobs`? Unreported knobs (NaN) do not count against a match."""
    span = np.array([KNOBS[n].high - KNOBS[n].low for n in KNOB_NAMES])
    target = np.array([knobs[n] for n in KNOB_NAMES])
    close = np.abs(reported - target) <= KNOB_MATCH_TOL * span
    return np.all(close | np.isnan(reported), axis=1)


def _prior_weight(has_prior: bool, disabled: bool, n_evidence: int, config: ControllerConfig) -> float:
    if not has_prior or disabled or config.prior_strength <= 0:
        return 0.0
    return config.prior_strength / (config.prior_strength + n_evidence)


def prior_pull_bonus(
    from_knobs: Mapping[str, float], to_knobs: Mapping[str, float], prior: Mapping[str, float] | None,
    weight: float, pull: float,
) -> float:
    """Reward-unit credit for moving toward the prior: w·pull·(d²(from, prior) − d²(to, prior)), unit space.

    The prior acts as a quadratic penalty on distance whose weight fades with evidence, so
    it decides knobs the reward cannot tell apart and yields wherever the data speak.
    """
    if not prior or weight <= 0 or pull <= 0:
        return 0.0
    names = [n for n in KNOB_NAMES if n in prior]
    p = np.array([KNOBS[n].to_unit(prior[n]) for n in names])
    a = np.array([KNOBS[n].to_unit(from_knobs[n]) for n in names])
    b = np.array([KNOBS[n].to_unit(to_knobs[n]) for n in names])
    return float(weight * pull * (np.sum((a - p) ** 2) - np.sum((b - p) ** 2)))


def knob_bound_problems(knobs: Mapping[str, object]) -> list[str]:
    """Why a published knob set is not valid (unknown/missing knob, non-finite, out of bounds,
    non-integral int/bool); empty when it is."""
    problems = []
    for name, value in knobs.items():
        spec = KNOBS.get(name)
        if spec is None:
            problems.append(f"unknown knob {name!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{name}={value!r} is not a finite number")
        elif not spec.low <= value <= spec.high:
            problems.append(f"{name}={value} outside [{spec.low}, {spec.high}]")
        elif spec.kind in ("int", "bool") and value != round(value):
            problems.append(f"{name}={value} is not integral")
    problems += [f"{n} missing" for n in KNOB_NAMES if n not in knobs]
    return problems


def lengthened_cooldown(failures: int, config: ControllerConfig) -> int:
    """Cooldown after the `failures`-th failed canary of a knob."""
    return int(min(config.max_cooldown, math.ceil(config.base_cooldown * config.cooldown_multiplier**failures)))


def _sigma(state: ControllerState, config: ControllerConfig) -> float:
    return max(math.sqrt(max(state.noise_var, 0.0)), config.min_noise_sd)


def _learn_noise(state: ControllerState, residual: float, factor: float, config: ControllerConfig) -> None:
    """EMA of squared residuals; `factor` = n/(n+1) corrects for the estimated mean."""
    state.noise_var = (1 - config.noise_ema) * state.noise_var + config.noise_ema * residual * residual * factor


# ---------------------------------------------------------------------------
# One decision
# ---------------------------------------------------------------------------


def _attribute(batch: DecisionBatch, state: ControllerState) -> tuple[str, np.ndarray]:
    """Which policy did the batch run? 'current' (the knobs in effect), 'snapshot' (the
    engine has not picked up the pending change yet) or 'foreign' (knobs the controller did
    not set: engine lag after a rollback, historical exploration, a hand-set policy).
    Returns the kind and the rewards of the ticks that count as evidence for it."""
    current = _matches(batch.reported_knobs, state.knobs)
    if current.any():
        return "current", batch.rewards[current]
    if state.pending and state.snapshot:
        snap = _matches(batch.reported_knobs, state.snapshot["knobs"])
        if snap.any():
            return "snapshot", batch.rewards[snap]
    return "foreign", batch.rewards


def _observe_baseline(state: ControllerState, reward: float, config: ControllerConfig, notes: list[str]) -> None:
    """Evidence about the incumbent: level-shift check, then the weighted mean and the noise."""
    w = state.baseline_weight
    if state.baseline_mean is not None and w >= 1.0:
        sigma = _sigma(state, config)
        residual = reward - state.baseline_mean
        if abs(residual) > config.level_shift_z * sigma * math.sqrt(1.0 + 1.0 / w):
            notes.append(
                f"reward level shift: {reward:.4f} vs baseline {state.baseline_mean:.4f} "
                f"(> {config.level_shift_z}σ); baseline reset"
            )
            state.baseline_mean, state.baseline_weight = reward, 1.0
            state.observations = state.observations[-1:]  # the model's data came from the old regime
            # a new regime: the optimum may have moved far, re-open the trust regions
            for name in KNOB_NAMES:
                state.steps[name] = max(state.steps[name], config.initial_step)
                state.effects[name] = max(state.effects[name], config.initial_effect)
                state.failed_directions[name] = []
            if state.best is not None:  # the old best was measured in another regime
                state.best = None
            if residual < 0 and state.unconfirmed_rollbacks:
                # the snapshot is as bad as the changes were: the shift, not the changes, failed
                # the canaries judged against the stale baseline; undo their cooldown penalties
                for rb in reversed(state.unconfirmed_rollbacks):  # earliest last: its pre-penalty count wins
                    for name in rb["knobs"]:
                        state.failures[name] = int(rb["failures"][name])
                        state.cooldowns[name] = min(state.cooldowns[name], config.base_cooldown)
                blamed = sorted({n for rb in state.unconfirmed_rollbacks for n in rb["knobs"]})
                notes.append(f"{len(state.unconfirmed_rollbacks)} rollback(s) ({', '.join(blamed)}) blamed on the "
                             "level shift: cooldown penalties cleared")
            state.unconfirmed_rollbacks = []
            return
        _learn_noise(state, residual, w / (w + 1.0), config)
    state.unconfirmed_rollbacks = []  # the incumbent still delivers: the rollbacks stand
    state.baseline_weight = w + 1.0
    prev = state.baseline_mean if state.baseline_mean is not None else reward
    state.baseline_mean = prev + (reward - prev) / state.baseline_weight


def _restore_snapshot(state: ControllerState) -> list[str]:
    changed = [n for n in KNOB_NAMES if state.knobs[n] != state.snapshot["knobs"][n]]
    state.knobs = dict(state.snapshot["knobs"])
    return changed


def _judge_trial(state: ControllerState, config: ControllerConfig, notes: list[str]) -> str:
    """After adding this decision's evidence: 'rollback', 'accept', 'revert' or 'continue'."""
    pend = state.pending
    n, mean = pend["n"], pend["mean"]
    sigma = _sigma(state, config)
    w = max(state.baseline_weight, 1e-9)
    se = sigma * math.sqrt(1.0 / n + 1.0 / w)
    base = state.baseline_mean
    drop = base - mean
    threshold = max(config.rollback_threshold, config.rollback_z * se)
    if drop > threshold:
        notes.append(
            f"canary failed: reward {mean:.4f} over {n} decision(s) vs snapshot EMA {base:.4f} "
            f"(drop {drop:.4f} > {threshold:.4f})"
        )
        return "rollback"
    bonus = prior_pull_bonus(state.snapshot["knobs"], state.knobs, state.prior, state.prior_weight, config.prior_pull)
    gain = mean - base + bonus
    pend["gain"], pend["base"], pend["se"] = mean - base, base, se
    if n < pend["window"]:
        # sequential test: a clear result need not wait for the whole window
        if gain > config.early_z * se:
            notes.append(f"accepted early: {mean:.4f} vs {base:.4f} (prior pull {bonus:+.4f}, n={n})")
            return "accept"
        if -gain > config.early_z * se:
            notes.append(f"reverted early: {mean:.4f} vs {base:.4f} (prior pull {bonus:+.4f}, n={n})")
            return "revert"
        return "continue"
    if gain > config.accept_z * se:
        notes.append(f"accepted: {mean:.4f} vs {base:.4f} (prior pull {bonus:+.4f}, n={n})")
        return "accept"
    notes.append(f"reverted: {mean:.4f} vs {base:.4f} (prior pull {bonus:+.4f}, n={n}) not better")
    return "revert"


def _finish_trial(state: ControllerState, verdict: str, config: ControllerConfig) -> list[str]:
    """Apply a verdict; returns the knobs that moved."""
    pend = state.pending
    names = list(pend["knobs"])
    moved: list[str] = []
    for n in names:  # how much a trial of this knob can still gain: steers which knob is tried next
        if KNOBS[n].kind == "bool":
            state.effects[n] *= 0.3  # after any verdict a flag sits at its better value
        else:
            state.effects[n] = 0.7 * state.effects[n] + 0.3 * abs(pend.get("gain", 0.0))
    tried = pend.get("direction", {})
    if verdict in ("rollback", "revert"):
        if verdict == "rollback":
            state.unconfirmed_rollbacks.append({
                "evidence": state.evidence,
                "knobs": names,
                "failures": {n: state.failures[n] for n in names},
            })
            state.rollbacks += 1
        else:
            state.reverts += 1
        moved = _restore_snapshot(state)
        for n in names:
            if verdict == "rollback":
                state.failures[n] += 1
                state.cooldowns[n] = lengthened_cooldown(state.failures[n], config)
            else:
                state.cooldowns[n] = max(state.cooldowns[n], config.base_cooldown)  # a change enters cooldown
            d = int(tried.get(n, 0))
            if d:
                state.directions[n] = -d  # next time, try the other side
                failed = state.failed_directions.setdefault(n, [])
                if -d in failed or pend.get("source") == "model":  # the trust region failed: narrow it
                    state.steps[n] = max(config.min_step, state.steps[n] * config.step_shrink)
                    state.effects[n] *= 0.5
                    failed.clear()
                elif d not in failed:
                    failed.append(d)
    elif verdict == "accept":
        state.accepts += 1
        # the new incumbent's estimate: the observed gain, shrunk (positive-part James-Stein)
        # by how noisy it is, so a lucky window does not set an inflated bar for what follows
        gain, se = pend["mean"] - pend["base"], pend["se"]
        shrink = max(0.0, 1.0 - (se * se) / (gain * gain)) if gain else 0.0
        state.baseline_mean, state.baseline_weight = pend["base"] + shrink * gain, float(pend["n"])
        for n in names:
            state.steps[n] = min(config.max_step, state.steps[n] * config.step_grow)
            state.failures[n] = max(0, state.failures[n] - 1)
            state.failed_directions[n] = []
            if tried.get(n):
                state.directions[n] = int(tried[n])
        if state.best is None or pend["mean"] > state.best["reward"]:
            state.best = {"reward": pend["mean"], "n": pend["n"], "knobs": dict(state.knobs), "decision": state.decisions}
    state.pending = None
    state.snapshot = None
    return moved


def _check_negative_transfer(state: ControllerState, config: ControllerConfig, notes: list[str]) -> None:
    """Drop the prior's pull when the domain's own exploration has clearly beaten the prior's point.

    Compared: the reward estimate of the incumbent the domain's own search has moved to (its
    baseline EMA, which keeps accumulating evidence) vs the reward measured at the prior's
    point before the first accepted move. Trips when the excess exceeds
    `negative_transfer_margin` + 2 standard errors, once `negative_transfer_window` decisions
    of evidence exist.
    """
    if (
        state.prior is None
        or state.prior_disabled
        or state.prior_point is None
        or state.accepts == 0
        or state.baseline_mean is None
        or state.evidence < config.negative_transfer_window
    ):
        return
    incumbent = state.incumbent_knobs
    if _matches(_prior_row(state.prior), incumbent).all():
        return  # own exploration has come back to the prior's point
    pp = state.prior_point
    weight = max(state.baseline_weight, 1e-9)
    sigma = _sigma(state, config)
    se = sigma * math.sqrt(1.0 / weight + 1.0 / max(pp["weight"], 1e-9))
    excess = state.baseline_mean - pp["mean"]
    if excess > config.negative_transfer_margin + 2.0 * se:
        state.prior_disabled = True
        state.prior_disabled_reason = (
            f"negative transfer: after {state.evidence} decisions the domain's own exploration holds knobs "
            f"with reward {state.baseline_mean:.4f} (weight {weight:.1f}) vs {pp['mean']:.4f} at the prior's point "
            f"(excess {excess:.4f} > margin {config.negative_transfer_margin} + 2·SE {2 * se:.4f}); prior pull dropped"
        )
        notes.append(state.prior_disabled_reason)
        # the prior's narrow trust region was the prior's too: search as widely as a cold start would
        for name in KNOB_NAMES:
            state.steps[name] = max(state.steps[name], config.initial_step)


def fit_surrogate(
    observations: list[list[float]], incumbent_unit: np.ndarray, now: int, config: ControllerConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Separable quadratic model of the reward around the incumbent, by weighted ridge regression.

    reward ≈ c + Σ_k a_k·δ_k + b_k·δ_k², δ = u − u_incumbent (unit space; no δ² for bool knobs),
    over the recent observations [u..., reward, evidence index], older ones down-weighted by
    `model_forget` per decision. The curvature prior (b ≈ −model_curvature_prior, weak)
    keeps a direction seen once from being extrapolated as a straight line.
    Returns (a, b, varied) — varied_k: how much weighted evidence saw knob k off the incumbent —
    or None with too few observations.
    """
    if len(observations) < config.model_min_obs:
        return None
    k = len(KNOB_NAMES)
    data = np.asarray(observations, dtype=float)
    reward = data[:, k]
    weight = config.model_forget ** np.maximum(now - data[:, k + 1], 0.0)
    design = quadratic_design(data[:, :k], [KNOBS[n].kind for n in KNOB_NAMES], center=incumbent_unit)
    penalty = np.full(design.n_params, config.model_ridge)
    penalty[0] = 1e-9  # the level is free
    target = np.zeros(design.n_params)
    target[design.square[design.squared]] = -config.model_curvature_prior
    beta = ridge_solve(design.matrix, reward, penalty, weights=weight, target=target).beta
    delta = design.matrix[:, design.linear]
    varied = (weight[:, None] * (np.abs(delta) > 1e-9)).sum(axis=0)
    return beta[design.linear], design.curvature(beta), varied


def _candidate(name: str, u0: float, delta: float) -> tuple[float, float]:
    """The bounded knob value a unit move of `delta` lands on (int knobs move ≥ one notch) and its real δ."""
    spec = KNOBS[name]
    old = spec.from_unit(u0)
    value = spec.from_unit(u0 + delta)
    if spec.kind == "int" and value == old and delta != 0:
        value = spec.clip(old + (1 if delta > 0 else -1))
    return value, spec.to_unit(value) - u0


def _start_trial(state: ControllerState, name: str, value: float, direction: int, source: str,
                 config: ControllerConfig, predicted: float | None = None) -> dict[str, float]:
    state.snapshot = {
        "knobs": dict(state.knobs),
        "reward": state.baseline_mean,
        "weight": state.baseline_weight,
        "decision": state.decisions,
    }
    state.knobs[name] = value
    state.cooldowns[name] = config.base_cooldown
    state.pending = {
        "knobs": [name], "kind": "trial", "source": source, "started": state.decisions, "n": 0, "mean": 0.0,
        "window": config.base_cooldown, "direction": {name: int(direction)}, "predicted": predicted,
    }
    return {name: value}


def _propose_trial(state: ControllerState, rng: np.random.Generator, config: ControllerConfig) -> dict[str, float] | None:
    """Start a one-knob trial from the incumbent; returns {knob: new value} or None (nothing movable).

    Knobs the data has never seen moved are probed first (full trust-region width); then
    model-guided: the knob and move with the best predicted gain (surrogate model + an
    exploration bonus for knobs seldom moved + the prior's pull) within each knob's trust
    region. With probability `random_trial_rate`·√(gamma_diversity/0.3) a random knob and
    direction instead (exploration, and the only way before the model has data).
    """
    eligible = [n for n in KNOB_NAMES if state.cooldowns[n] == 0]
    if not eligible:
        return None
    # gamma_diversity ("exploration vs exploitation") widens or narrows the trust regions and
    # the share of random trials; square-rooted so this knob, which the reward cannot see
    # directly, can never collapse the search
    width = math.sqrt(state.knobs["gamma_diversity"] / KNOBS["gamma_diversity"].default)
    explore = rng.random() < config.random_trial_rate * width
    u0 = _unit(state.knobs)
    if not explore:
        # first probe every knob the data has never seen away from the incumbent's value, at
        # full trust-region width: a model cannot rank a knob it has no data on
        seen = np.zeros(len(KNOB_NAMES))
        if state.observations:
            data = np.asarray(state.observations, dtype=float)[:, :len(KNOB_NAMES)]
            seen = (np.abs(data - u0) > 1e-9).sum(axis=0)
        unexplored = [n for n in eligible if seen[KNOB_NAMES.index(n)] == 0]
        if unexplored:
            name = unexplored[int(rng.integers(len(unexplored)))]
            j = KNOB_NAMES.index(name)
            radius = float(np.clip(state.steps[name] * width, config.min_step, config.max_step))
            d = state.directions[name]
            for move in ((1.0 - 2.0 * u0[j],) if KNOBS[name].kind == "bool" else (d * radius, -d * radius)):
                value, _ = _candidate(name, u0[j], move)
                if value != state.knobs[name]:
                    return _start_trial(state, name, value, 1 if value > state.knobs[name] else -1, "probe", config)
    model = None if explore else fit_surrogate(state.observations, u0, state.evidence, config)
    if model is not None:
        a, b, varied = model
        sigma = _sigma(state, config)
        best: tuple[float, str, float, float] | None = None
        for name in eligible:
            j = KNOB_NAMES.index(name)
            radius = float(np.clip(state.steps[name] * width, config.min_step, config.max_step))
            # candidates: the model's vertex (clipped to the trust region) and both edges of it;
            # the exploration bonus scales with how far a move reaches, so a knob the model
            # knows nothing about is probed at full width, not by a step too small to measure
            if KNOBS[name].kind == "bool":
                moves = [1.0 - 2.0 * u0[j]]
            else:
                vertex = -a[j] / (2 * b[j]) if b[j] < -1e-9 else (radius if a[j] >= 0 else -radius)
                moves = [float(np.clip(vertex, -radius, radius)), radius, -radius]
            bonus = config.model_explore * sigma / math.sqrt(1.0 + varied[j])
            for move in moves:
                if abs(move) < config.min_step:
                    move = config.min_step if move >= 0 else -config.min_step
                value, real = _candidate(name, u0[j], move)
                if value == state.knobs[name]:
                    continue
                gain = a[j] * real + b[j] * real * real
                reach = 1.0 if KNOBS[name].kind == "bool" else min(1.0, abs(real) / radius)
                pull = prior_pull_bonus(state.knobs, {**state.knobs, name: value}, state.prior, state.prior_weight,
                                        config.prior_pull)
                score = gain + bonus * reach + pull
                if best is None or score > best[0]:
                    best = (score, name, value, gain)
        if best is not None:
            _, name, value, gain = best
            direction = 1 if value > state.knobs[name] else -1
            return _start_trial(state, name, value, direction, "model", config, predicted=float(gain))
    # random exploration: a knob weighted by the reward change its trials caused, a direction by momentum
    weights = np.array([state.effects[n] for n in eligible], dtype=float) + 0.01
    order = rng.choice(len(eligible), size=len(eligible), replace=False, p=weights / weights.sum())
    for idx in order:
        name = eligible[int(idx)]
        spec = KNOBS[name]
        j = KNOB_NAMES.index(name)
        if spec.kind == "bool":
            moves = [1.0 - 2.0 * u0[j]]
        else:
            step = float(np.clip(state.steps[name] * width, config.min_step, config.max_step))
            preferred = state.directions[name]
            first = preferred if rng.random() < config.momentum else -preferred
            if state.prior and name in state.prior and state.prior_weight > 0 and rng.random() < state.prior_weight:
                gap = spec.to_unit(state.prior[name]) - u0[j]
                if abs(gap) > 0.5 * step:
                    first = 1 if gap > 0 else -1
            moves = [first * step, -first * step]
        for move in moves:
            value, _ = _candidate(name, u0[j], move)
            if value != state.knobs[name]:
                return _start_trial(state, name, value, 1 if value > state.knobs[name] else -1, "random", config)
    return None


def update(
    state: ControllerState,
    telemetry: pd.DataFrame,
    config: ControllerConfig = ControllerConfig(),
    prior: dict[str, float] | None = None,
) -> tuple[ControllerState, dict]:
    """One decision from one telemetry batch (its mean reward); returns (new state, decision).

    telemetry: rows with ts, gain_p50, stability_mean, vram_utilization, latency_ms and
    optionally `knob_<name>` (the knobs the engine ran). `prior`: the newest prior, if any;
    a prior different from the state's replaces the pull target (knobs never jump).
    Raises TelemetryError (state untouched) on a missing field, NaN, inf or out-of-range value.

    The decision: policy_updates {knob: new value} (knobs that changed), reward (mean reward of
    the ticks that ran the knobs in effect), batch_reward, reward_ema, rolled_back, reverted,
    accepted, judged (kind of change judged: trial / injected / external), action, evidence
    (current | snapshot | foreign), cooldowns, knobs (after the decision), baseline,
    prior_weight, prior_disabled, n_ticks, ts_first, ts_last and a human-readable note.
    """
    batch = validate_telemetry_batch(telemetry, state.last_ts, config.reward_weights)
    new_prior = normalize_prior(prior)
    s = copy.deepcopy(state)
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = s.rng_state
    notes: list[str] = []
    before = dict(s.knobs)
    s.decisions += 1
    s.last_ts = batch.ts.max().isoformat()

    if new_prior is not None and new_prior != s.prior:
        had = s.prior is not None
        s.prior = new_prior
        if s.prior_disabled:
            notes.append("new prior recorded; its pull stays off (negative transfer was detected)")
        else:
            notes.append(("new prior picked up" if had else "prior picked up") + " as a fading pull; knobs unchanged")

    kind, evidence_rewards = _attribute(batch, s)
    if kind in ("current", "snapshot"):  # what the surrogate model learns from
        ran = s.knobs if kind == "current" else s.snapshot["knobs"]
        s.observations.append([*map(float, _unit(ran)), float(evidence_rewards.mean()), float(s.evidence + 1)])
    else:  # ticks under other knobs say nothing about the incumbent, but they do map the reward surface
        complete = ~np.isnan(batch.reported_knobs).any(axis=1)
        for knobs_row, r in zip(batch.reported_knobs[complete], batch.rewards[complete]):
            unit = [KNOBS[n].to_unit(KNOBS[n].clip(v)) for n, v in zip(KNOB_NAMES, knobs_row)]
            s.observations.append([*map(float, unit), float(r), float(s.evidence)])
    del s.observations[:-config.model_memory]
    reward = float(evidence_rewards.mean())
    batch_reward = float(batch.rewards.mean())
    s.reward_ema = batch_reward if s.reward_ema is None else (1 - config.ema_alpha) * s.reward_ema + config.ema_alpha * batch_reward
    s.baseline_weight *= 1.0 - config.baseline_forget  # time passes: old evidence fades

    action = "hold"
    verdict = None
    judged = None
    recheck = False
    if kind == "current":
        s.evidence += 1
        s.cooldowns = {n: max(0, c - 1) for n, c in s.cooldowns.items()}
        if s.pending and set(s.pending["knobs"]) & set(config.paired_knobs):
            action = "awaiting-paired"
            notes.append(f"trial of {', '.join(s.pending['knobs'])} awaits its paired verdict on realized trades "
                         "(overrides rebuilt with the new knobs vs the old, as of the same time): telemetry does not judge it")
        elif s.pending:
            pend = s.pending
            if pend["n"] >= 1:
                _learn_noise(s, reward - pend["mean"], pend["n"] / (pend["n"] + 1.0), config)
            pend["n"] += 1
            pend["mean"] += (reward - pend["mean"]) / pend["n"]
            if s.baseline_mean is None:  # forced change before any baseline: judge against this
                s.baseline_mean, s.baseline_weight = reward, 1.0
            judged = pend["kind"]
            verdict = _judge_trial(s, config, notes)
            # after a failed canary or a clearly worse trial, look at the snapshot once before
            # trying anything else: it tells a bad change from a reward level shift
            recheck = verdict == "rollback" or (verdict == "revert" and pend["n"] < pend["window"])
            if verdict != "continue":
                _finish_trial(s, verdict, config)
                action = verdict
            else:
                action = "trial-continue"
        else:
            _observe_baseline(s, reward, config, notes)
    elif kind == "snapshot":
        _observe_baseline(s, reward, config, notes)
        notes.append("telemetry ran the snapshot knobs (the engine has not applied the pending change yet)")
    else:
        notes.append("telemetry ran knobs this controller did not set (engine lag or a foreign policy): no evidence")

    if s.prior is not None and s.accepts == 0 and s.pending is None and s.baseline_mean is not None \
            and _matches(_prior_row(s.prior), s.knobs).all():
        # still at the prior's point: the baseline is the reward the prior delivers
        s.prior_point = {"mean": s.baseline_mean, "weight": s.baseline_weight}
    s.prior_weight = _prior_weight(s.prior is not None, s.prior_disabled, s.evidence, config)
    _check_negative_transfer(s, config, notes)
    s.prior_weight = _prior_weight(s.prior is not None, s.prior_disabled, s.evidence, config)

    if kind == "current" and s.pending is None and not recheck and s.baseline_weight >= config.min_baseline_weight:
        proposal = _propose_trial(s, rng, config)
        if proposal:
            (name, value), = proposal.items()
            notes.append(f"trial: {name} {s.snapshot['knobs'][name]} -> {value}")
            action = "trial" if action == "hold" else f"{action}+trial"

    s.rng_state = rng.bit_generator.state
    after = s.knobs
    updates = {n: after[n] for n in KNOB_NAMES if after[n] != before[n]}
    decision = {
        "decision_no": s.decisions,
        "policy_updates": updates,
        "reward": reward,
        "batch_reward": batch_reward,
        "reward_ema": s.reward_ema,
        "rolled_back": verdict == "rollback",
        "reverted": verdict == "revert",
        "accepted": verdict == "accept",
        "judged": judged if verdict not in (None, "continue") else None,
        "action": action,
        "evidence": kind,
        "cooldowns": dict(s.cooldowns),
        "knobs": dict(after),
        "baseline": s.baseline_mean,
        "prior_weight": s.prior_weight,
        "prior_disabled": s.prior_disabled,
        "n_ticks": int(len(batch.rewards)),
        "ts_first": batch.ts.min().isoformat(),
        "ts_last": s.last_ts,
        "note": "; ".join(notes) if notes else action,
    }
    return s, decision


def _prior_row(prior: Mapping[str, float]) -> np.ndarray:
    """The prior as one 'reported knobs' row (knobs the prior does not name: not reported)."""
    return np.array([[prior.get(n, np.nan) for n in KNOB_NAMES]], dtype=float)


def inject_change(
    state: ControllerState, changes: Mapping[str, float], config: ControllerConfig = ControllerConfig(),
    note: str = "injected",
) -> ControllerState:
    """Force a knob change through the controller's canary path (an operator's or a planted bad policy).

    Any trial in progress is abandoned first (back to its snapshot, the last known-good knobs);
    the change becomes a pending change with a snapshot and cooldowns, judged like a trial:
    rolled back when the reward drops beyond the threshold, kept only if it proves better.
    """
    s = copy.deepcopy(state)
    unknown = set(changes) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}")
    if s.pending and s.snapshot:
        _restore_snapshot(s)
        s.pending = None
        s.snapshot = None
    target = {n: KNOBS[n].clip(v) for n, v in changes.items()}
    names = [n for n in KNOB_NAMES if n in target and target[n] != s.knobs[n]]
    if not names:
        return s
    s.snapshot = {"knobs": dict(s.knobs), "reward": s.baseline_mean, "weight": s.baseline_weight, "decision": s.decisions}
    for n in names:
        s.knobs[n] = target[n]
        s.cooldowns[n] = max(s.cooldowns[n], config.base_cooldown)
    s.pending = {
        "knobs": names, "kind": note, "started": s.decisions, "n": 0, "mean": 0.0,
        "window": config.base_cooldown, "direction": {},
    }
    return s


def split_batches(telemetry: pd.DataFrame, ticks_per_decision: int = 1) -> list[pd.DataFrame]:
    """Consecutive batches of at most `ticks_per_decision` ticks (ordered by ts), cut wherever
    the reported knobs change, so a batch never mixes two policies."""
    if telemetry.empty:
        return []
    frame = telemetry.sort_values("ts", kind="stable").reset_index(drop=True)
    cols = [c for c in (knob_column(frame, n) for n in KNOB_NAMES) if c is not None]
    if cols:
        knobs = frame[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        same = np.all((knobs[1:] == knobs[:-1]) | (np.isnan(knobs[1:]) & np.isnan(knobs[:-1])), axis=1)
        run_id = np.concatenate([[0], np.cumsum(~same)])
    else:
        run_id = np.zeros(len(frame), dtype=int)
    # within a run, chunks of ticks_per_decision
    pos_in_run = frame.groupby(run_id).cumcount().to_numpy()
    batch_id = pd.Series(list(zip(run_id, pos_in_run // ticks_per_decision))).factorize()[0]
    return [frame.iloc[idx] for idx in pd.Series(np.arange(len(frame))).groupby(batch_id).indices.values()]


def telemetry_records(batch: pd.DataFrame) -> list[dict]:
    """A batch as JSON-ready records (ts as ISO-8601 UTC, missing values as null): the audit trail."""
    cols = [c for c in TELEMETRY_STORE_COLUMNS if c in batch.columns]
    frame = batch[cols].copy()
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True).map(lambda t: t.isoformat())
    out = []
    for rec in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()})
    return out


def advance(
    state: ControllerState,
    telemetry: pd.DataFrame,
    config: ControllerConfig = ControllerConfig(),
    prior: dict[str, float] | None = None,
) -> tuple[ControllerState, list[dict]]:
    """All decisions for a stream of new ticks: validate the whole stream first (nothing is
    decided if any tick is bad), then one `update` per batch (see `split_batches`)."""
    if telemetry.empty:
        return state, []
    validate_telemetry_batch(telemetry, state.last_ts)
    decisions: list[dict] = []
    for batch in split_batches(telemetry, config.ticks_per_decision):
        state, decision = update(state, batch, config, prior)
        decision["telemetry"] = telemetry_records(batch)
        decisions.append(decision)
    return state, decisions
