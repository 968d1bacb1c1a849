"""Sustained performance drop: the controller falls back to safe defaults (no Dagster).

The controller's canary rolls back ONE bad change. When changes keep failing, or the
reward stays low for a long time whatever the controller tries, the search itself is
no longer trusted (the seed's "Performance Drop: sustained low reward, multiple
rollbacks triggered, eventually converges to safe defaults, logs warnings for
investigation"). After every decision the monitor looks at two signals:

* **Repeated rollbacks**: ``≥ max_rollbacks`` failed canaries among the last
  ``rollback_window`` decisions (default 4 in 30). A healthy controller from scratch
  had at most 2 in any 30 over 300 decisions on six simulated engines (the planted optima
  of ``lab.synth``), so 4 is a clear excess.
* **Long reward slump**: the reward EMA stays more than ``slump_drop`` (0.10 reward units)
  below its own peak since the last (re)start for ``slump_decisions`` (30) consecutive
  decisions (decisions on foreign ticks — knobs the controller did not set — neither
  count nor reset the run). The peak only counts after ``warmup`` (20) decisions of a (re)start, so the
  climb of a cold start is not a slump. On the same healthy runs the EMA never stayed
  more than 0.08 below its peak for more than 3 decisions in a row (its per-decision
  noise is ≈ 0.017 reward units).

When either trips, ``fallback_state`` replaces the controller by a cold start at the
**safe defaults** (``knobs.default_knobs``: the conservative knob values, wide trust
regions = high exploration), with the prior's pull switched off (``prior_disabled``, the
reason recorded: the knowledge that led here is not trusted either; a person re-enables
it by deleting the domain's controller_state row). The decision counter, the newest tick
consumed and the cumulative rollback count carry over (the audit trail continues); the
monitor restarts. The decision that tripped it says so in its note
(``FALLBACK to safe defaults: …``) and its ``fallback`` field; the asset logs a warning.

The monitor's memory lives in ``ControllerState.fallback`` (a dict: decision of the last
(re)start, rollback decisions in the window, peak EMA, decisions below it, fallbacks so
far), so it survives runs exactly like the rest of the state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pandas as pd

from meta_pipeline.knobs import KNOB_NAMES
from meta_pipeline.meta.controller import (
    ControllerConfig,
    ControllerState,
    advance,
    cold_start,
    split_batches,
    validate_telemetry_batch,
)

FALLBACK_NOTE = "FALLBACK to safe defaults"


@dataclass(frozen=True)
class FallbackConfig:
    """When a sustained drop sends the controller back to the safe defaults (module doc)."""

    rollback_window: int = 30  # decisions
    max_rollbacks: int = 4  # failed canaries within the window that trip the fallback
    slump_drop: float = 0.10  # reward units below the peak EMA
    slump_decisions: int = 30  # consecutive decisions below (peak − slump_drop)
    warmup: int = 20  # decisions after a (re)start before the peak EMA counts

    def __post_init__(self) -> None:
        if self.rollback_window < 1 or self.max_rollbacks < 1 or self.slump_decisions < 1 or self.warmup < 0:
            raise ValueError("FallbackConfig: windows and counts must be positive")
        if not self.slump_drop > 0:
            raise ValueError("FallbackConfig.slump_drop must be > 0")


def new_memory(since: int, count: int = 0, last: dict[str, Any] | None = None) -> dict[str, Any]:
    """The monitor's memory after a (re)start at decision ``since``."""
    return {"since": int(since), "rollbacks": [], "peak": None, "below": 0, "count": int(count), "last": last}


def observe(memory: dict[str, Any] | None, decision: dict, config: FallbackConfig = FallbackConfig()
            ) -> tuple[dict[str, Any], str | None]:
    """Add one decision (its ``decision_no``, ``rolled_back``, ``reward_ema``) to the monitor.

    Returns the new memory and, when the fallback trips, why (else None). Pure: the
    input memory is not modified.
    """
    m = copy.deepcopy(memory) if memory else new_memory(0)
    n = int(decision["decision_no"])
    if decision.get("rolled_back"):
        m["rollbacks"].append(n)
    m["rollbacks"] = [d for d in m["rollbacks"] if d > n - config.rollback_window]
    ema = decision.get("reward_ema")
    own = decision.get("evidence", "current") != "foreign"  # ticks under knobs it did not set do not judge it
    if ema is not None and own and n - m["since"] > config.warmup:
        peak = m["peak"]
        m["peak"] = float(ema) if peak is None else max(float(peak), float(ema))
        m["below"] = m["below"] + 1 if float(ema) < m["peak"] - config.slump_drop else 0
    if len(m["rollbacks"]) >= config.max_rollbacks:
        return m, (f"{len(m['rollbacks'])} rollbacks in the last {config.rollback_window} decisions "
                   f"(decisions {', '.join(map(str, m['rollbacks']))}; limit {config.max_rollbacks})")
    if m["below"] >= config.slump_decisions:
        return m, (f"reward slump: reward EMA {float(ema):.4f} has stayed more than {config.slump_drop} below its "
                   f"peak {m['peak']:.4f} for {m['below']} decisions (limit {config.slump_decisions})")
    return m, None


def fallback_state(state: ControllerState, reason: str, config: ControllerConfig = ControllerConfig()
                   ) -> ControllerState:
    """The controller after a fallback: a cold start at the safe defaults, prior pull off.

    Keeps the decision counter, the newest tick consumed, the cumulative rollback count and
    the (disabled) prior for the record; seeded by the decision number, so it is reproducible.
    """
    memory = state.fallback or new_memory(0)
    fresh = cold_start(None, config, seed=int(state.decisions))
    fresh.decisions = state.decisions
    fresh.last_ts = state.last_ts
    fresh.rollbacks = state.rollbacks
    fresh.prior = state.prior
    fresh.prior_source = state.prior_source
    fresh.prior_disabled = True
    fresh.prior_disabled_reason = f"{FALLBACK_NOTE} at decision {state.decisions}: {reason}"
    fresh.fallback = new_memory(state.decisions, int(memory.get("count", 0)) + 1,
                                {"decision": int(state.decisions), "reason": reason})
    return fresh


def advance_with_fallback(
    state: ControllerState,
    telemetry: pd.DataFrame,
    config: ControllerConfig = ControllerConfig(),
    prior: dict[str, float] | None = None,
    fallback: FallbackConfig = FallbackConfig(),
) -> tuple[ControllerState, list[dict], list[str]]:
    """``controller.advance`` with the sustained-drop monitor after every decision.

    Same contract as ``advance`` (the whole stream is validated first; nothing is decided
    if a tick is bad), one decision per batch; when the monitor trips, the decision's
    knobs, policy_updates, action and note show the fallback (``fallback`` = the reason)
    and the following batches are decided by the fallen-back controller. Returns (state,
    decisions, the reasons of the fallbacks that happened).
    """
    if telemetry.empty:
        return state, [], []
    validate_telemetry_batch(telemetry, state.last_ts)
    decisions: list[dict] = []
    reasons: list[str] = []
    for batch in split_batches(telemetry, config.ticks_per_decision):
        before = dict(state.knobs)
        state, (decision,) = advance(state, batch, config, prior)
        memory, why = observe(state.fallback, decision, fallback)
        state.fallback = memory
        if why is not None:
            state = fallback_state(state, why, config)
            decision["knobs"] = dict(state.knobs)
            decision["policy_updates"] = {n: state.knobs[n] for n in KNOB_NAMES if state.knobs[n] != before[n]}
            decision["action"] = f"{decision['action']}+fallback"
            decision["prior_disabled"] = True
            decision["fallback"] = why
            decision["note"] = f"{decision['note']}; {FALLBACK_NOTE}: {why}"
            reasons.append(why)
        decisions.append(decision)
    return state, decisions, reasons
