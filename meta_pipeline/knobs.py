"""The knobs the integrative layer tunes: bounds, defaults, and the unit-cube mapping.

One registry used by the controller, the priors, the overrides and the simulated
engine, so a knob's bounds are written down exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KnobSpec:
    name: str
    low: float
    high: float
    default: float
    kind: str = "float"  # "float" | "int" | "bool"
    doc: str = ""

    def clip(self, value: float) -> float:
        v = float(np.clip(float(value), self.low, self.high))
        if self.kind == "int":
            return float(int(round(v)))
        if self.kind == "bool":
            return 1.0 if v >= 0.5 else 0.0
        return v

    def to_unit(self, value: float) -> float:
        return (float(value) - self.low) / (self.high - self.low)

    def from_unit(self, unit: float) -> float:
        return self.clip(self.low + float(np.clip(unit, 0.0, 1.0)) * (self.high - self.low))


KNOBS: dict[str, KnobSpec] = {
    spec.name: spec
    for spec in (
        KnobSpec("tau", 0.8, 0.99, 0.95, doc="decay scaling of edges in pm_overrides"),
        KnobSpec("gamma_diversity", 0.1, 0.5, 0.3, doc="exploration vs exploitation of the controller"),
        KnobSpec("g_min", 0.001, 0.1, 0.02, doc="minimum edge for an override"),
        KnobSpec("lambda_ci", 0.3, 0.7, 0.5, doc="confidence width of the lesson lower bound"),
        KnobSpec("tier2_enabled", 0.0, 1.0, 1.0, kind="bool", doc="use regime weights in overrides"),
        KnobSpec("tier3_topk", 3.0, 10.0, 5.0, kind="int", doc="lessons per latent factor"),
    )
}
KNOB_NAMES: tuple[str, ...] = tuple(KNOBS)


def default_knobs() -> dict[str, float]:
    return {name: spec.default for name, spec in KNOBS.items()}


def clip_knobs(knobs: Mapping[str, float]) -> dict[str, float]:
    """Bound every known knob; unknown names are an error, missing ones take the default."""
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown knob(s): {sorted(unknown)}; known: {list(KNOB_NAMES)}")
    out = default_knobs()
    for name, value in knobs.items():
        out[name] = KNOBS[name].clip(value)
    return out


def knobs_to_unit(knobs: Mapping[str, float]) -> np.ndarray:
    """Knob dict -> vector in [0, 1]^K in KNOB_NAMES order (the space priors live in)."""
    return np.array([KNOBS[n].to_unit(knobs.get(n, KNOBS[n].default)) for n in KNOB_NAMES])


def unit_to_knobs(unit: np.ndarray) -> dict[str, float]:
    return {n: KNOBS[n].from_unit(u) for n, u in zip(KNOB_NAMES, np.asarray(unit, dtype=float))}


def parse_knobs(raw: Mapping[str, object] | str | None) -> dict[str, float]:
    """Known knobs of a stored knob set (dict or its JSON), bounded; unknown names are ignored.

    Stored sets (controller_state, configs, telemetry) may carry knobs an older or newer
    version knew; reading them never fails on a name, and never lets a value out of bounds.
    """
    import json

    values = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    return clip_knobs({k: float(v) for k, v in values.items() if k in KNOBS})


@dataclass(frozen=True)
class KnobsInEffect:
    """The knobs a domain runs with, and where they came from (``configs vN``, ``controller_state``, ``defaults``)."""

    values: dict[str, float]
    source: str


def knobs_in_effect_rule(active_config: tuple[int, Mapping[str, object]] | None,
                         controller_knobs: Mapping[str, object] | None,
                         adopted_version: int) -> KnobsInEffect:
    """THE rule for the knobs in effect (``MetaStore.knobs_in_effect`` reads its inputs).

    An applied META_KNOBS config the controller has not adopted yet wins (a person just
    applied it); once the controller has adopted that version (controller_state.
    config_version ≥ it), the controller's knobs are newer and win; with neither, defaults.
    """
    if active_config is not None and active_config[0] > adopted_version:
        return KnobsInEffect(parse_knobs(active_config[1]), f"configs v{active_config[0]}")
    if controller_knobs is not None:
        return KnobsInEffect(parse_knobs(controller_knobs), "controller_state")
    return KnobsInEffect(default_knobs(), "defaults")
