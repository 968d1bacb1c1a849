"""Counterfactual screening of learning-knob candidates on already-realized trades.

A live knob trial (``meta.knob_trial``) must wait for realized trades *after* the change
(up to ``PAIRED_MAX_TRADES``, several feedback cycles), so a controller that tries one
local step per trial reaches few settings in 20 cycles. But the paired scoring that judges
a live trial can evaluate **any** learning-knob setting on trades that are already realized:

* walk-forward folds (``screen_folds``): fit times T_1 < … < T_F on a fixed calendar grid
  (``fold_days`` apart, the last ``folds`` grid times at or before now), fold k scoring the
  trades closed in ``(T_k, T_{k+1}]`` (the last one up to now);
* refit the overrides as of each T_k with the incumbent knobs and with each candidate
  knob set ``k`` (``fit_override_model``, the learning jobs' core functions end to end;
  nothing after T_k enters a fit);
* score every candidate on all the folds' realized trades, paired against the incumbent's
  refits on the same trades: ``d_i = (y_i − p_inc,i)² − (y_i − p_k,i)²``,
  ``gain_k = mean(d)/mean(y²)``, ``se_k = sd(d)/(√n·mean(y²))``, ``z_k = gain_k/se_k``
  (``knob_trial.paired_score``).

**Candidates** (``per_knob_candidates``, then ``combined_candidates``): stage 1 moves one
learning knob at a time to each of ``points`` values spread over its whole range (bounds
and interior points; a flag flips), the others held at the incumbent; stage 2 combines,
coordinate-wise, the best stage-1 move of every knob whose best move scored z > 0 (all of
them together, then greedily the top two, top three, … by z). At most ``budget``
candidates are fitted per screen (stage 1 first, in the order of the knobs' range
coverage; stage 2 gets what is left, at least ``min_combined``).

**Multiplicity.** m candidates are scored, so the best of m noisy z's is biased upward.
A candidate **qualifies** only when ``z_k ≥ z*``, where z* is the (1 − α) quantile of the
*largest* of the m z's under "no candidate beats the incumbent" (α = ``family_alpha``,
default 0.1): the family-wise rate of a false pick is ≤ α. z* comes from a sign-flip
(Westfall–Young max-T) null: per draw b, every scored trade's paired differences are
multiplied by one common random sign s_i = ±1 (the same for all candidates, so their
correlation is kept), ``z_k^(b) = mean(s·d_k)/(sd(s·d_k)/√n)`` and ``max_k z_k^(b)`` is
recorded; z* is its (1 − α) quantile over ``null_draws`` draws (fixed seed: reproducible).
Candidates moving the same knob are strongly correlated, so this is tighter than the
Bonferroni bound ``Φ⁻¹(1 − α/m)``, which caps it (``screen_threshold``).
Among qualifying candidates the one with the largest lower bound ``gain − z*·se`` is the
screen's pick; none qualifying → no pick (the incumbent stays, nothing is tried).

**The pick is not accepted on the screen's word.** It becomes the controller's live
trial (``start_screened_trial``: a pending multi-knob trial with a snapshot, source
"screen"), judged by the existing paired live rule on trades closed *after* the change —
fresh trades disjoint from the screen's — so the winner's curse of a max over m
candidates cannot be accepted by itself: ``paired_verdict`` accepts, reverts or rolls back.

**Cost.** One learning pass (a refit) per candidate and fold plus one per fold for the
incumbent: ``≤ (budget + 1) × folds`` fits per screen. The fold times sit on a fixed grid,
so a caller that caches fits by (as_of, knobs) — the lab does — pays only for the newest
fold once the grid moves on: ``≤ budget + 1`` fits per ``fold_days``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import norm

from meta_pipeline.knobs import KNOBS
from meta_pipeline.learning.overrides import OverrideModel
from meta_pipeline.meta import controller as controller_core
from meta_pipeline.meta.knob_trial import (
    LEARNING_KNOBS,
    PairedTrial,
    SourceFrames,
    fit_override_model,
    paired_score,
    predict_edges,
)

SCREEN_FOLD_DAYS = 4.5  # the fits' as_of times T_k sit on a fixed calendar grid this many days apart
SCREEN_FOLDS = 4  # walk-forward folds scored: the trades closed after the last `folds` grid times
SCREEN_MIN_TRADES = 500  # fewer realized trades after the earliest usable T: no screen
SCREEN_BUDGET = 14  # candidate fits per screen (plus one incumbent refit)
SCREEN_POINTS = 3  # values per float / int knob spread over its range (bounds included)
SCREEN_MIN_COMBINED = 2  # stage-2 (combined) candidates kept out of the budget
FAMILY_ALPHA = 0.1  # family-wise false-pick rate of the screen (max-T over the candidates scored)
NULL_DRAWS = 1_000  # sign-flip draws of the max-T null


@dataclass(frozen=True)
class ScreenConfig:
    """The screen's budget and threshold (module doc)."""

    fold_days: float = SCREEN_FOLD_DAYS
    folds: int = SCREEN_FOLDS
    min_trades: int = SCREEN_MIN_TRADES
    budget: int = SCREEN_BUDGET
    points: int = SCREEN_POINTS
    min_combined: int = SCREEN_MIN_COMBINED
    family_alpha: float = FAMILY_ALPHA
    min_history_trades: int = 1_000  # trades at or before T the fits learn from, at least
    knobs: tuple[str, ...] = LEARNING_KNOBS  # the knobs screened
    null_draws: int = NULL_DRAWS

    def __post_init__(self) -> None:
        if (self.budget < 1 or self.points < 2 or self.folds < 1 or self.fold_days <= 0
                or not 0.0 < self.family_alpha < 1.0 or not set(self.knobs) <= set(LEARNING_KNOBS)):
            raise ValueError(f"bad ScreenConfig: {self}")


@dataclass
class ScreenedCandidate:
    knobs: dict[str, float]
    moved: dict[str, float]  # the learning knobs it moves away from the incumbent
    stage: str  # "knob" | "combined"
    trial: PairedTrial

    def to_dict(self) -> dict:
        return {"moved": self.moved, "stage": self.stage, "gain": self.trial.gain, "se": self.trial.se,
                "z": self.trial.z, "n": self.trial.n}


@dataclass
class ScreenResult:
    as_of: str | None
    until: str | None
    n_trades: int
    threshold: float
    candidates: list[ScreenedCandidate] = field(default_factory=list)
    pick: ScreenedCandidate | None = None
    why: str = ""

    def note(self) -> str:
        if not self.candidates:
            return f"knob screen: {self.why}"
        best = max(self.candidates, key=lambda c: c.trial.z)
        head = (f"knob screen of {len(self.candidates)} candidate(s) on {self.n_trades} realized trades closed after "
                f"{self.as_of} (threshold z ≥ {self.threshold:.2f})")
        if self.pick is None:
            return (f"{head}: none qualifies (best {_fmt(best.moved)}: gain {best.trial.gain:+.5f} ± "
                    f"{best.trial.se:.5f}, z {best.trial.z:+.2f}); no trial")
        p = self.pick
        return (f"{head}: picked {_fmt(p.moved)} (gain {p.trial.gain:+.5f} ± {p.trial.se:.5f}, z {p.trial.z:+.2f}) "
                f"as the live trial")

    def to_dict(self) -> dict:
        return {"as_of": self.as_of, "until": self.until, "n_trades": self.n_trades, "threshold": self.threshold,
                "candidates": [c.to_dict() for c in self.candidates],
                "pick": None if self.pick is None else self.pick.to_dict(), "why": self.why}


def _fmt(moved: Mapping[str, float]) -> str:
    return ", ".join(f"{n}={v:g}" for n, v in moved.items())


def screen_threshold(m: int, family_alpha: float = FAMILY_ALPHA) -> float:
    """z* = Φ⁻¹(1 − α/m): the best of m null one-sided z's exceeds it with probability ≤ α."""
    return float(norm.ppf(1.0 - family_alpha / max(int(m), 1)))


def max_t_threshold(d: np.ndarray, family_alpha: float = FAMILY_ALPHA, draws: int = NULL_DRAWS,
                    seed: int = 0) -> float:
    """z*: the (1 − α) quantile of max_k z_k under a common sign flip of every trade's paired differences
    (``d``: n trades × m candidates), capped by the Bonferroni bound (module doc)."""
    d = np.asarray(d, dtype=float)
    n, m = d.shape
    bonferroni = screen_threshold(m, family_alpha)
    if n < 3 or m == 0:
        return bonferroni
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(draws, n))
    sums = signs @ d  # draws × m: Σ s_i d_ik
    sq = (d * d).sum(axis=0)  # Σ (s_i d_ik)² does not depend on the signs
    mean = sums / n
    var = np.maximum((sq[None, :] - n * mean * mean) / (n - 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, mean / np.sqrt(var / n), 0.0)
    return float(min(bonferroni, np.quantile(z.max(axis=1), 1.0 - family_alpha)))


def knob_values(name: str, points: int = SCREEN_POINTS) -> list[float]:
    """``points`` values of a knob spread over its range, bounds included (a flag: both values)."""
    spec = KNOBS[name]
    if spec.kind == "bool":
        return [0.0, 1.0]
    values = np.linspace(spec.low, spec.high, points)
    return sorted({spec.clip(v) for v in values})


def per_knob_candidates(incumbent: Mapping[str, float], points: int = SCREEN_POINTS,
                        knobs: Sequence[str] = LEARNING_KNOBS) -> list[dict[str, float]]:
    """Stage 1: each learning knob moved alone to each of its ``knob_values`` (the incumbent's value skipped),
    interleaved across knobs (the far bound of every knob first) so a budget cut keeps every knob covered."""
    per: list[list[dict[str, float]]] = []
    for name in knobs:
        cur = float(incumbent[name])
        values = [v for v in knob_values(name, points) if abs(v - cur) > 1e-12]
        values.sort(key=lambda v: -abs(KNOBS[name].to_unit(v) - KNOBS[name].to_unit(cur)))  # farthest first
        per.append([{**incumbent, name: v} for v in values])
    out: list[dict[str, float]] = []
    for i in range(max((len(p) for p in per), default=0)):
        out += [p[i] for p in per if i < len(p)]
    return out


def combined_candidates(incumbent: Mapping[str, float], scored: Sequence[ScreenedCandidate]) -> list[dict[str, float]]:
    """Stage 2: the best single move of every knob whose best move scored z > 0, combined coordinate-wise:
    the top two, top three, … of them by z (the last one is all of them)."""
    best: dict[str, ScreenedCandidate] = {}
    for c in scored:
        if c.stage != "knob" or len(c.moved) != 1:
            continue
        (name,) = c.moved
        if c.trial.z > 0 and (name not in best or c.trial.z > best[name].trial.z):
            best[name] = c
    ranked = sorted(best.values(), key=lambda c: -c.trial.z)
    out = []
    for k in range(2, len(ranked) + 1):
        knobs = dict(incumbent)
        for c in ranked[:k]:
            knobs.update(c.moved)
        out.append(knobs)
    return out


def screen_folds(closed_at: pd.Series, now: pd.Timestamp, cfg: ScreenConfig = ScreenConfig()
                 ) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """The walk-forward folds (T_k, T_{k+1}] (the last one ends at ``now``) the screen scores.

    T_k are the grid times k·fold_days (UTC epoch) at or before ``now``; the last ``cfg.folds`` of them
    start the folds, so a fit as of T_k is reused by every screen until the grid moves on (fits stay
    ≤ (folds)·fold_days old when scored), and the scored trades are those closed after the first fold's
    T. A fold whose T has fewer than ``cfg.min_history_trades`` trades at or before it is dropped; [] when
    fewer than ``cfg.min_trades`` trades would be scored (no screen)."""
    t = pd.to_datetime(pd.Series(closed_at), utc=True)
    now = pd.Timestamp(now)
    now = now.tz_localize("UTC") if now.tzinfo is None else now
    step = pd.Timedelta(days=cfg.fold_days)
    epoch = pd.Timestamp(0, tz="UTC")
    last = epoch + step * math.floor((now - epoch) / step)
    starts = [last - step * k for k in range(cfg.folds - 1, -1, -1)]
    starts = [a for a in starts if int((t <= a).sum()) >= cfg.min_history_trades]
    if not starts:
        return []
    folds = [(a, b) for a, b in zip(starts, [*starts[1:], now])]
    if int(((t > starts[0]) & (t <= now)).sum()) < cfg.min_trades:
        return []
    return folds


def _moved(incumbent: Mapping[str, float], knobs: Mapping[str, float]) -> dict[str, float]:
    return {n: float(knobs[n]) for n in LEARNING_KNOBS if abs(float(knobs[n]) - float(incumbent[n])) > 1e-12}


def screen_knobs(frames: SourceFrames, incumbent: Mapping[str, float], now: pd.Timestamp,
                 cfg: ScreenConfig = ScreenConfig(), *,
                 fit: Callable[[Mapping[str, float], pd.Timestamp], OverrideModel] | None = None,
                 drift_events: pd.DataFrame | None = None,
                 exclude: Sequence[Mapping[str, float]] = ()) -> ScreenResult:
    """Screen learning-knob candidates against the incumbent on the trades realized in the folds (module doc).

    ``fit(knobs, as_of)``: the override fit (default ``fit_override_model`` on ``frames``; the lab passes
    a cache). ``exclude``: knob sets not to try again (e.g. trials just rolled back)."""
    if fit is None:
        def fit(knobs, as_of):  # the learning jobs' fit as of a time
            return fit_override_model(frames, knobs, as_of, drift_events)
    folds = screen_folds(frames.trades["closed_at"], now, cfg)
    if not folds:
        return ScreenResult(None, None, 0, math.inf, why=f"too few realized trades before {pd.Timestamp(now)} to screen")
    parts = [frames.between(a, b) for a, b in folds]
    y = np.concatenate([p.trades["return_r"].to_numpy(dtype=float) for p in parts])

    def predictions(knobs: Mapping[str, float]) -> np.ndarray:
        """Each fold's trades priced by the fit as of its start (walk-forward)."""
        return np.concatenate([predict_edges(fit(dict(knobs), a), p) for (a, _), p in zip(folds, parts)])

    p_inc = predictions(incumbent)
    excluded = {tuple(round(float(k[n]), 12) for n in LEARNING_KNOBS) for k in exclude}

    def key(k: Mapping[str, float]) -> tuple:
        return tuple(round(float(k[n]), 12) for n in LEARNING_KNOBS)

    result = ScreenResult(folds[0][0].isoformat(), pd.Timestamp(folds[-1][1]).isoformat(), len(y), math.inf)
    seen: set[tuple] = {key(incumbent)}

    diffs: list[np.ndarray] = []

    def score(knobs: dict[str, float], stage: str) -> None:
        k = key(knobs)
        if k in seen or k in excluded:
            return
        seen.add(k)
        p = predictions(knobs)
        trial = paired_score(y, p_inc, p)
        diffs.append((y - p_inc) ** 2 - (y - p) ** 2)
        result.candidates.append(ScreenedCandidate(knobs, _moved(incumbent, knobs), stage, trial))

    stage1 = per_knob_candidates(incumbent, cfg.points, cfg.knobs)
    room1 = max(1, cfg.budget - cfg.min_combined)
    for knobs in stage1[:room1]:
        score(knobs, "knob")
    for knobs in combined_candidates(incumbent, result.candidates)[:max(0, cfg.budget - len(result.candidates))]:
        score(knobs, "combined")
    m = len(result.candidates)
    if not m:
        result.why = "no candidate left to screen"
        return result
    result.threshold = max_t_threshold(np.column_stack(diffs), cfg.family_alpha, cfg.null_draws)
    qualified = [c for c in result.candidates if c.trial.z >= result.threshold]
    if qualified:
        result.pick = max(qualified, key=lambda c: c.trial.gain - result.threshold * c.trial.se)
    return result


def start_screened_trial(state: controller_core.ControllerState, pick: ScreenedCandidate,
                         config: controller_core.ControllerConfig) -> controller_core.ControllerState:
    """The screen's pick as the controller's pending live trial (every knob it moves at once; snapshot =
    the incumbent; source "screen"), judged later by ``knob_trial.judge_paired_trial``."""
    if state.pending is not None:
        raise ValueError("a trial is already pending")
    s = copy.deepcopy(state)
    s.snapshot = {"knobs": dict(s.knobs), "reward": s.baseline_mean, "weight": s.baseline_weight,
                  "decision": s.decisions}
    names = list(pick.moved)
    for n in names:
        s.knobs[n] = KNOBS[n].clip(pick.moved[n])
        s.cooldowns[n] = max(s.cooldowns[n], config.base_cooldown)
    s.pending = {"knobs": names, "kind": "trial", "source": "screen", "started": s.decisions, "n": 0, "mean": 0.0,
                 "window": config.base_cooldown,
                 "direction": {n: 1 if s.knobs[n] > s.snapshot["knobs"][n] else -1 for n in names},
                 "predicted": float(pick.trial.gain)}
    return s


def screened_decision(before: controller_core.ControllerState, after: controller_core.ControllerState,
                      result: ScreenResult) -> tuple[controller_core.ControllerState, dict]:
    """The meta_decisions record of a screen that started a live trial (its policy_updates move the learning
    knobs, so the knob-trial sensor re-materializes the overrides with them)."""
    s = copy.deepcopy(after)
    s.decisions += 1
    updates = {n: s.knobs[n] for n in LEARNING_KNOBS if s.knobs[n] != before.knobs[n]}
    return s, {
        "decision_no": s.decisions, "policy_updates": updates,
        "reward": None if s.baseline_mean is None else float(s.baseline_mean), "batch_reward": None,
        "reward_ema": s.reward_ema, "rolled_back": False, "reverted": False, "accepted": False,
        "judged": "screen", "action": "screen-trial", "evidence": "screen", "cooldowns": dict(s.cooldowns),
        "knobs": dict(s.knobs), "telemetry": [], "judged_on": {"screen": result.to_dict()}, "note": result.note(),
    }


def screen_step(state: controller_core.ControllerState, screen, config: controller_core.ControllerConfig
                ) -> tuple[controller_core.ControllerState, list[dict], list[str]]:
    """The controller policy's hook: with no trial pending, ``screen(state)`` (a ``ScreenResult`` or None)
    and, when it picks, start the pick as the live trial. Returns (state, [decision] or [], notes)."""
    if screen is None or state.pending is not None:
        return state, [], []
    result = screen(state)
    if result is None:
        return state, [], []
    if result.pick is None:
        return state, [], [result.note()]
    started = start_screened_trial(state, result.pick, config)
    started, decision = screened_decision(state, started, result)
    return started, [decision], []


__all__ = ["ScreenConfig", "ScreenResult", "ScreenedCandidate", "combined_candidates", "knob_values",
           "max_t_threshold", "per_knob_candidates", "screen_folds", "screen_knobs", "screen_step", "screen_threshold",
           "screened_decision", "start_screened_trial"]
