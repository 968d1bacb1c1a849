"""The few-shot warm start, wired into the controller's cold start (no Dagster, no SQL).

A domain's controller cold-starts once: when it has no controller_state row, or when its
row was written before it sent any tick (nothing decided yet). Then
``meta.priors.warm_start_new_domain`` measures the new domain's first ticks against the
known domains' telemetry (shift distance) and starts the controller from the nearest
domains' priors when they are close, from the newest global prior otherwise, from the
default knobs when there is neither. ``ControllerState.prior_source`` records which; a
start from neighbours keeps them as its pull target when newer global versions arrive
(``pull_target``), a start from the global prior follows the newest version as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd

from meta_pipeline.meta.controller import ControllerConfig, ControllerState, cold_start
from meta_pipeline.meta.priors import WarmStartSettings, warm_start_new_domain
from meta_pipeline.store import GlobalPriorVersion

# () -> (the domain_priors table, the telemetry table's domain + shift-feature columns); called only at a cold start
WarmStartInputs = Callable[[], tuple[pd.DataFrame, pd.DataFrame]]


def never_decided(state: ControllerState) -> bool:
    """A state that has consumed no tick and has nothing pending: a cold start can still be redone."""
    return state.decisions == 0 and state.last_ts is None and state.pending is None and not state.prior_disabled


def cold_start_new_domain(
    domain: str,
    latest: GlobalPriorVersion | None,
    new_ticks: pd.DataFrame,
    inputs: WarmStartInputs | None,
    config: ControllerConfig,
    seed: int,
    settings: WarmStartSettings = WarmStartSettings(),
    keep: ControllerState | None = None,
) -> tuple[ControllerState, str | None]:
    """The cold-start state of a new domain and the note saying where it started from.

    ``new_ticks``: the domain's telemetry so far (may be empty); ``inputs``: the fleet's
    tables, read only when the domain has enough ticks to be compared (None: no warm
    start, the global prior as before). ``keep``: a stored state that never saw a tick;
    returned unchanged (note None) unless a warm start can be measured now.
    """
    values = None if latest is None else latest.values
    version = None if latest is None else latest.version
    if keep is not None and (inputs is None or len(new_ticks) < settings.min_ticks):
        return keep, None
    if inputs is None or len(new_ticks) < settings.min_ticks:
        state = cold_start(values, config, seed=seed)
        state.prior_source = None if latest is None else f"global v{version}"
        why = ("no global_prior yet: cold start from the default knobs" if latest is None
               else f"cold start from global_prior v{version}")
        if inputs is not None:
            why += f" ({len(new_ticks)} tick(s) of its own: too few to compare with the fleet)"
        return state, why
    priors_long, fleet_telemetry = inputs()
    start = warm_start_new_domain(domain, new_ticks, values, version, priors_long, fleet_telemetry, settings)
    state = cold_start(start.theta, config, seed=seed)
    state.prior_source = None if start.theta is None else start.source
    lam = float(start.details.get("lambda", 0.0))
    if start.source.startswith("neighbours"):
        note = f"warm start from {start.source} (λ = {lam:.2f} toward them from the global prior): {start.details['why']}"
    else:
        note = f"cold start from {start.source}: {start.details.get('why', '')}"
    return state, note


def pull_target(state: ControllerState, newest: Mapping[str, float] | None) -> Mapping[str, float] | None:
    """The prior to hand each decision: None keeps a neighbours' warm start as the pull target."""
    if state.prior_source is not None and state.prior_source.startswith("neighbours"):
        return None
    return newest
