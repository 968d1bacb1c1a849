"""The controller's policy for one domain: what a controller_state update decides, as one function.

``step_domain`` takes what the store holds for a domain — its controller_state row, the
newest global prior, the active META_KNOBS config, the telemetry ticks not seen yet —
and returns the new state, the decisions, and why (notes). The rules, in order:

1. **Resume or cold start.** A stored state resumes exactly; a row without the
   controller's memory keeps its knobs and starts fresh; no row cold-starts from the
   newest global prior (else the conservative defaults, high exploration).
2. **Hand-edited knobs.** ``knobs_json`` that differs from the state's knobs was set
   outside the controller: the edit is canaried like any change (``inject_change``).
3. **An applied META_KNOBS config** (an approved proposal, or ``knobs set``) newer than
   the version the controller adopted is adopted once, as a canaried change: if it
   hurts, it is rolled back like any change, and the decision note says so.
4. **Early negative transfer.** A cold-started domain whose first ticks at the prior's
   knobs fall below anything the fleet saw under it drops the prior at once
   (``priors.early_negative_transfer``) and tunes from scratch.
5. **Decide** (``controller.advance``): one decision per batch of new ticks.

No Dagster, no SQL: ``defs/governance/controller.py`` reads the inputs in one
transaction, calls ``step_domain``, writes ``controller_state`` + ``meta_decisions``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from meta_pipeline.contracts import TELEMETRY_STORE_COLUMNS
from meta_pipeline.knobs import KNOB_NAMES, parse_knobs
from meta_pipeline.meta.controller import ControllerConfig, ControllerState, cold_start, inject_change
from meta_pipeline.meta.fallback import advance_with_fallback
from meta_pipeline.meta.priors import EARLY_PROBE_TICKS, early_negative_transfer
from meta_pipeline.meta.knob_screen import screen_step
from meta_pipeline.meta.knob_trial import paired_step, stamp_change
from meta_pipeline.meta.reward import telemetry_reward, with_realized_term
from meta_pipeline.meta.warm_start import WarmStartInputs, cold_start_new_domain, never_decided, pull_target
from meta_pipeline.store import GlobalPriorVersion

# what the controller reads of a telemetry tick: the one telemetry schema's store columns
TELEMETRY_COLUMNS = list(TELEMETRY_STORE_COLUMNS)


def domain_seed(domain: str, seed: int) -> int:
    """A per-domain cold-start seed (the run's seed mixed with the domain name)."""
    return (zlib.crc32(domain.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


@dataclass
class DomainStep:
    """What one controller_state update decided for a domain."""

    before: ControllerState  # the state the decisions started from (after adoption / hand edits)
    state: ControllerState
    decisions: list[dict]
    notes: list[str] = field(default_factory=list)
    external: bool = False  # knobs changed by someone other than the controller's search
    adopted_version: int | None = None  # the applied META_KNOBS config version now adopted
    had_row: bool = True
    n_ticks: int = 0  # telemetry ticks consumed
    fallbacks: list[str] = field(default_factory=list)  # sustained drops that sent it to the safe defaults (meta.fallback)

    @property
    def changed(self) -> bool:
        """Whether controller_state must be written (a decision, a first row, or an external change)."""
        return bool(self.decisions) or not self.had_row or self.external


def early_transfer_check(state: ControllerState, telemetry: pd.DataFrame, latest: GlobalPriorVersion | None,
                         cfg: ControllerConfig, seed: int) -> tuple[ControllerState, str | None]:
    """Rule 4: a cold-started domain whose first ticks AT the prior's knobs fall below anything the
    fleet saw under it drops the prior at once, instead of waiting for the controller's own guard,
    which needs its window of decisions."""
    if latest is None or state.decisions > 0 or state.prior_disabled or telemetry.empty:
        return state, None
    low = latest.details.get("expected_reward_low")
    knob_cols = [f"knob_{n}" for n in KNOB_NAMES]
    reported = telemetry[knob_cols].to_numpy(dtype=float)
    at_prior = np.all(np.isclose(reported, [state.knobs[n] for n in KNOB_NAMES], atol=1e-9) | np.isnan(reported), axis=1)
    head = telemetry[at_prior].head(EARLY_PROBE_TICKS)
    if len(head) < EARLY_PROBE_TICKS:
        return state, None
    negative, why = early_negative_transfer(telemetry_reward(head), low, min_ticks=EARLY_PROBE_TICKS)
    if not negative:
        return state, None
    fresh = cold_start(None, cfg, seed=seed)
    fresh.last_ts = state.last_ts
    fresh.prior_disabled = True
    fresh.prior_disabled_reason = why
    return fresh, why


def step_domain(domain: str, row: pd.DataFrame, latest: GlobalPriorVersion | None,
                active: tuple[int, Mapping[str, object]] | None, read_telemetry, cfg: ControllerConfig,
                seed: int = 0, warm_start_inputs: WarmStartInputs | None = None, *,
                feedback_cycles: pd.DataFrame | None = None, paired_judge=None,
                now: pd.Timestamp | None = None, paired_screen=None) -> DomainStep:
    """Rules 1–5 for one domain (module doc). ``read_telemetry(last_ts)`` returns the ticks after
    ``last_ts`` (all of them for None) in the store layout, oldest first: the state decides from
    when, so the caller reads only what is new. Raises ``controller.TelemetryError`` on a bad tick
    (nothing decided).

    ``feedback_cycles`` (the domain's feedback_cycles rows; None: not read) adds the realized
    gain of its overrides to the reward (``reward.with_realized_term``; no feedback yet:
    telemetry alone, said in each decision's note). ``paired_judge`` (see
    ``knob_trial.paired_step``) closes a pending learning-knob trial on its paired verdict;
    ``paired_screen`` (see ``knob_screen.screen_step``), with no trial pending, screens learning-knob
    candidates counterfactually on realized trades and starts the qualifying pick as the live trial."""
    notes: list[str] = []
    external = False
    prior = latest.values if latest is not None else None
    run_seed = domain_seed(domain, seed)
    unseen = None  # a stored state that never saw a tick: its cold start may still become a warm start
    if len(row) and isinstance(row["state_json"].iloc[0], str):
        state = ControllerState.from_json(row["state_json"].iloc[0])
        unseen = state if never_decided(state) and warm_start_inputs is not None else None
        published = parse_knobs(row["knobs_json"].iloc[0])
        if published != state.knobs:
            state = inject_change(state, published, cfg, note="external")
            external = True
            notes.append(f"knobs_json edited outside the controller: {published} canaried as an external change")
    elif len(row):
        state = cold_start(prior, cfg, seed=run_seed)
        state.knobs = parse_knobs(row["knobs_json"].iloc[0])
        notes.append("controller_state row had no state_json: started fresh at its knobs")
    if not len(row) or (unseen is not None and not external):  # a cold start, at a warm start when it can
        state, how = cold_start_new_domain(domain, latest, read_telemetry(None), warm_start_inputs, cfg, run_seed,
                                           keep=unseen)
        notes += [how] if how else []
    adopted = int(row["config_version"].iloc[0]) if len(row) and pd.notna(row["config_version"].iloc[0]) else 0
    if active is not None and active[0] > adopted:
        approved = parse_knobs(active[1])
        if approved != state.knobs:
            state = inject_change(state, approved, cfg, note=f"configs v{active[0]}")
            external = True
        notes.append(f"adopted applied META_KNOBS config v{active[0]} (canaried like any change)")
        adopted = active[0]
    state, paired, paired_notes = paired_step(state, paired_judge, cfg)
    notes += paired_notes
    state, screened, screen_notes = screen_step(state, paired_screen, cfg)
    paired, notes = paired + screened, notes + screen_notes
    telemetry = read_telemetry(state.last_ts)
    realized = None
    if feedback_cycles is not None and len(telemetry):
        telemetry, realized = with_realized_term(telemetry, feedback_cycles, cfg.reward_weights)
    state, dropped_prior = early_transfer_check(state, telemetry, latest, cfg, run_seed)
    if dropped_prior:
        prior = None
        notes.append(dropped_prior)
        external = True
    new_state, decisions, fallbacks = advance_with_fallback(state, telemetry, cfg, pull_target(state, prior))
    new_state = stamp_change(new_state, cfg, now if now is not None else pd.Timestamp.now(tz="UTC"))
    for d in decisions if realized is not None else []:
        d["note"] = f"{d['note']}; {realized.note}"
    decisions = paired + decisions
    return DomainStep(state, new_state, decisions, notes, external, adopted or None, had_row=bool(len(row)),
                      n_ticks=len(telemetry), fallbacks=fallbacks)


def state_row(domain: str, state: ControllerState, now: pd.Timestamp, config_version: int | None) -> pd.DataFrame:
    """The controller_state row of a state."""
    return pd.DataFrame([{
        "domain": domain,
        "knobs_json": json.dumps(state.knobs, sort_keys=True),
        "cooldowns_json": json.dumps(state.cooldowns, sort_keys=True),
        "reward_ema": state.reward_ema,
        "rollbacks": state.rollbacks,
        "decisions": state.decisions,
        "updated_at": now,
        "state_json": state.to_json(),
        "last_ts": pd.Timestamp(state.last_ts) if state.last_ts else pd.NaT,
        "config_version": config_version,
    }])


def decision_rows(domain: str, decisions: list[dict], now: pd.Timestamp) -> pd.DataFrame:
    """The meta_decisions rows of a step's decisions (the audit trail, with the telemetry that caused each)."""
    return pd.DataFrame({
        "domain": domain,
        "decision_no": [d["decision_no"] for d in decisions],
        "decided_at": now,
        "reward": [d["reward"] for d in decisions],
        "reward_ema": [d["reward_ema"] for d in decisions],
        "rolled_back": [bool(d["rolled_back"]) for d in decisions],
        "policy_updates_json": [json.dumps(d["policy_updates"], sort_keys=True) for d in decisions],
        "knobs_json": [json.dumps(d["knobs"], sort_keys=True) for d in decisions],
        "telemetry_json": [json.dumps(d["telemetry"]) for d in decisions],
        "note": [d["note"] for d in decisions],
        "judged_on_json": [json.dumps(d["judged_on"], sort_keys=True) if d.get("judged_on") else None
                           for d in decisions],
    })
