"""A person's hand on a domain's knobs: show where each comes from, set some, hand them back.

What is in effect is decided by ONE rule, ``knobs.knobs_in_effect_rule`` (read by
``MetaStore.knobs_in_effect``): an applied META_KNOBS config the controller has not
adopted yet wins; else the controller's knobs (``controller_state``); else the defaults.

* :func:`knobs_report` — the knobs in effect and, per knob, where its value came from:
  ``configs vN`` (an applied config not adopted yet: every knob is the config's), or,
  under the controller, ``configs vN (adopted)`` when the value is still the one the
  adopted config vN set, ``global prior`` when it is still the prior the controller
  cold-started from (``vK`` when that is the newest global_prior), ``default`` when it is
  still the default, else ``controller`` (the controller's search moved it). The first
  rule that matches wins, in that order; values are compared exactly (stored floats
  round-trip), so a knob the controller moved and later moved back reads as its origin.
* :func:`set_knobs` — ``knobs set``: the knobs in effect with the given ones replaced
  (each validated against its bounds first: nothing is written on a bad value) become a
  new applied META_KNOBS config through the proposal lifecycle: a proposal (source
  ``knobs set``, confidence 1, the person as reviewer) is inserted, approved and applied
  by that person (``lifecycle.insert_proposals`` → ``approve`` → ``apply``), so configs
  gets a new version and config_change_log gets the approve and apply rows, like any
  reviewed change; ``proposals revert <id>`` undoes it. The controller adopts it on its
  next run and canaries it like any change (``meta.controller_policy`` rule 3): a set
  that hurts the reward is rolled back by the controller.
* :func:`reset_knobs` — ``knobs reset``: hands the domain back to the controller. In the
  store: the domain's active META_KNOBS configs row is deactivated (``active = false``;
  the row and its history stay), and a ``reset`` row is appended to config_change_log
  (the person, from_version = that version, to_version NULL, before_json = the config).
  With no active config the rule falls through to ``controller_state``'s knobs (or the
  defaults before the controller's first run, whose cold start then takes the newest
  global prior). So: a set the controller had not adopted yet is withdrawn (its knobs stop
  being in effect); one it had adopted changes nothing in effect (the controller already
  tunes from it), but it is no longer the approved reference diagnostics compare the
  running knobs against, and the controller's next run finds no config to adopt. Nothing
  to reset (no active config) writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from meta_pipeline.contracts import validate_domain
from meta_pipeline.governance import lifecycle
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, KnobsInEffect, knobs_in_effect_rule, parse_knobs
from meta_pipeline.learning.predict import check_known_domain
from meta_pipeline.store import MetaStore, lock
from meta_pipeline.store import configs as config_rows

TARGET_TYPE = "META_KNOBS"
SET_SOURCE = "knobs set"
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


class KnobValueError(ValueError):
    """A knob assignment that cannot be applied: ``subject`` (the argument) and ``problem``."""

    def __init__(self, subject: str, problem: str, hint: str) -> None:
        self.subject, self.problem, self.hint = subject, problem, hint
        super().__init__(f"{subject}: {problem}; {hint}")


def _bounds_text(name: str) -> str:
    spec = KNOBS[name]
    if spec.kind == "bool":
        return "0 or 1"
    if spec.kind == "int":
        return f"an integer in [{int(spec.low)}, {int(spec.high)}]"
    return f"a number in [{spec.low:g}, {spec.high:g}]"


def parse_assignments(items: Sequence[str]) -> dict[str, float]:
    """``["tau=0.9", "tier2_enabled=off"]`` → ``{"tau": 0.9, "tier2_enabled": 0.0}``, every value checked.

    Unknown knob, a missing ``=``, a knob given twice, a value that is not a number (bool
    knobs also take true/false/on/off), not finite, not an integer for an int knob, or
    outside the knob's bounds: :class:`KnobValueError` (nothing is clipped silently).
    """
    out: dict[str, float] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name:
            raise KnobValueError(repr(item), "not a KNOB=VALUE assignment", "write e.g. tau=0.9")
        if name not in KNOBS:
            raise KnobValueError(repr(item), f"unknown knob {name!r}", f"known knobs: {', '.join(KNOB_NAMES)}")
        if name in out:
            raise KnobValueError(repr(item), f"{name} is given twice", "give each knob once")
        spec = KNOBS[name]
        if spec.kind == "bool" and raw.lower() in _TRUE | _FALSE:
            out[name] = 1.0 if raw.lower() in _TRUE else 0.0
            continue
        try:
            value = float(raw)
        except ValueError:
            raise KnobValueError(repr(item), f"{raw!r} is not a number", f"{name} takes {_bounds_text(name)}") from None
        if not math.isfinite(value):
            raise KnobValueError(repr(item), f"{raw!r} is not finite", f"{name} takes {_bounds_text(name)}")
        if spec.kind in ("int", "bool") and value != round(value):
            raise KnobValueError(repr(item), f"{name} is {'an integer' if spec.kind == 'int' else 'a 0/1'} knob",
                                 f"{name} takes {_bounds_text(name)}")
        if not spec.low <= value <= spec.high:
            raise KnobValueError(repr(item), f"{value:g} is outside {name}'s bounds [{spec.low:g}, {spec.high:g}]",
                                 f"{name} takes {_bounds_text(name)}")
        out[name] = float(value)
    return out


def check_domain(store: MetaStore, domain: str) -> None:
    """``validate_domain``, then UnknownDomainError unless the store knows the domain (data, a
    controller_state row, overrides) or it has an active META_KNOBS config."""
    validate_domain(domain)
    if store.active_config(TARGET_TYPE, domain) is not None:
        return
    check_known_domain(store, domain)


# ---------------------------------------------------------------------------
# show
# ---------------------------------------------------------------------------


@dataclass
class KnobsReport:
    domain: str
    in_effect: KnobsInEffect
    rows: list[dict[str, Any]]  # knob, value, low, high, default, kind, source
    notes: list[str] = field(default_factory=list)
    active_config: tuple[int, dict] | None = None
    adopted_version: int = 0

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _controller_row(store: MetaStore, domain: str) -> pd.DataFrame:
    return store.read("controller_state", domain=domain)


def _config_version(store: MetaStore, domain: str, version: int) -> pd.DataFrame:
    return store.read("configs", equals={"target_type": TARGET_TYPE, "target_id": domain, "version": int(version)})


def knobs_report(store: MetaStore, domain: str) -> KnobsReport:
    """The knobs in effect for ``domain`` and where each came from (module doc)."""
    check_domain(store, domain)
    active = store.active_config(TARGET_TYPE, domain)
    row = _controller_row(store, domain)
    controller_knobs, adopted, state_prior, decisions = None, 0, None, 0
    if len(row):
        controller_knobs = json.loads(row["knobs_json"].iloc[0])
        adopted = int(row["config_version"].iloc[0]) if pd.notna(row["config_version"].iloc[0]) else 0
        decisions = int(row["decisions"].iloc[0]) if pd.notna(row["decisions"].iloc[0]) else 0
        state_json = row["state_json"].iloc[0]
        if isinstance(state_json, str):
            state_prior = json.loads(state_json).get("prior")
    in_effect = knobs_in_effect_rule(active, controller_knobs, adopted)
    latest_prior = store.read_global_prior()
    notes: list[str] = []
    adopted_values: dict[str, float] | None = None
    if adopted:
        cfg = _config_version(store, domain, adopted)
        if len(cfg):
            adopted_values = parse_knobs(str(cfg["config_json"].iloc[0]))
    prior_values = parse_knobs(state_prior) if isinstance(state_prior, Mapping) and state_prior else None

    def origin(name: str, value: float) -> str:
        if in_effect.source.startswith("configs"):
            return in_effect.source
        if in_effect.source == "defaults":
            return "default"
        if adopted_values is not None and adopted_values[name] == value:
            return f"configs v{adopted} (adopted)"
        if prior_values is not None and prior_values.get(name) == value:
            newest = latest_prior is not None and latest_prior.values.get(name) == value
            return f"global prior v{latest_prior.version}" if newest else "global prior"
        if KNOBS[name].default == value:
            return "default"
        return "controller"

    rows = [{"knob": n, "value": in_effect.values[n], "low": KNOBS[n].low, "high": KNOBS[n].high,
             "default": KNOBS[n].default, "kind": KNOBS[n].kind, "source": origin(n, in_effect.values[n])}
            for n in KNOB_NAMES]
    if in_effect.source.startswith("configs"):
        notes.append(f"an applied META_KNOBS config ({in_effect.source}) is in effect; the controller has not adopted "
                     "it yet (it will on its next run, and canary it like any change)")
    elif in_effect.source == "controller_state":
        notes.append(f"the controller is in control ({decisions} decisions"
                     + (f"; it adopted configs v{adopted}" if adopted else "") + ")")
    else:
        notes.append("no controller_state yet: the defaults are in effect until the controller's first run"
                     + (f" (its cold start takes global_prior v{latest_prior.version})" if latest_prior else ""))
    if active is not None and not in_effect.source.startswith("configs"):
        notes.append(f"configs v{active[0]} is the active META_KNOBS config (adopted); "
                     "`meta-pipeline knobs reset` withdraws it")
    return KnobsReport(domain, in_effect, rows, notes, active, adopted)


# ---------------------------------------------------------------------------
# set
# ---------------------------------------------------------------------------


@dataclass
class KnobsSetResult:
    domain: str
    proposal_id: str
    version: int
    before: dict[str, float]
    after: dict[str, float]
    before_source: str
    changed: dict[str, tuple[float, float]]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def set_knobs(store: MetaStore, domain: str, values: Mapping[str, float], actor: str,
              now: datetime | None = None) -> KnobsSetResult:
    """Apply ``values`` (already checked by :func:`parse_assignments`) as a new META_KNOBS config
    version for ``domain``, through the proposal lifecycle (module doc). Raises
    ``lifecycle.ProposalError`` if someone changed the config between the read and the apply."""
    check_domain(store, domain)
    checked = parse_assignments([f"{k}={v!r}" for k, v in values.items()])  # a caller that skipped the CLI
    now = now or _now()
    in_effect = knobs_report(store, domain).in_effect  # read now (MetaStore.knobs_in_effect memoizes per run)
    before = dict(in_effect.values)
    after = {**before, **checked}
    active = store.active_config(TARGET_TYPE, domain)
    snapshot = active[1] if active is not None else before
    changed = {k: (before[k], after[k]) for k in KNOB_NAMES if before[k] != after[k]}
    evidence = {"source": SET_SOURCE, "by": actor, "at": now.isoformat(), "set": checked,
                "knobs_before": before, "knobs_before_source": in_effect.source}
    what = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changed.items()) or "no change in value"
    proposal = pd.DataFrame([{
        "domain": domain, "target_type": TARGET_TYPE, "target_id": domain,
        "current_config_snapshot_json": json.dumps(snapshot, sort_keys=True),
        "proposed_config_json": json.dumps(after, sort_keys=True),
        "rationale_text": f"set by {actor} with `meta-pipeline knobs set`: {what} (was {in_effect.source})",
        "evidence_json": json.dumps(evidence, sort_keys=True),
        "evidence_hash": hashlib.sha256(json.dumps(evidence, sort_keys=True).encode()).hexdigest(),
        "confidence": 1.0,
    }])
    report = lifecycle.insert_proposals(store, proposal, now=now)
    proposal_id = report.inserted[0]
    lifecycle.transition(store, proposal_id, "approve", actor)
    result = lifecycle.transition(store, proposal_id, "apply", actor)
    return KnobsSetResult(domain, proposal_id, int(result.to_version), before, after, in_effect.source, changed)


# ---------------------------------------------------------------------------
# reset
# ---------------------------------------------------------------------------


@dataclass
class KnobsResetResult:
    domain: str
    withdrawn_version: int | None  # None: there was no active config (nothing written)
    in_effect_after: KnobsInEffect
    was_in_effect: bool  # the withdrawn config's knobs were the ones in effect (not adopted yet)


def reset_knobs(store: MetaStore, domain: str, actor: str, now: datetime | None = None) -> KnobsResetResult:
    """Withdraw the domain's active META_KNOBS config (module doc); one transaction."""
    check_domain(store, domain)
    now = now or _now()
    before_rule = knobs_report(store, domain).in_effect.source
    with store.write() as conn:
        lock(conn, f"configs:{TARGET_TYPE}:{domain}")
        active = config_rows.active_config_row(conn, TARGET_TYPE, domain)
        if active is not None:
            proposal_id = config_rows.deactivate_config(conn, TARGET_TYPE, domain)
            config_rows.append_change_log(
                conn, changed_at=now, proposal_id=proposal_id, action="reset", actor=actor, target_type=TARGET_TYPE,
                target_id=domain, from_version=active[0], to_version=None, before_json=active[1], after_json=None)
    after = knobs_report(store, domain).in_effect
    return KnobsResetResult(domain, None if active is None else active[0], after,
                            active is not None and before_rule == f"configs v{active[0]}")
