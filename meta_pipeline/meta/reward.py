"""The meta-reward the integrative layer maximises, computed from one telemetry tick.

reward = w_gain·normalized_gain + w_stability·stability − w_resource·resource_penalty

* normalized_gain = clip(gain_p50 / GAIN_REF, −1, 1): the median predictive gain on a
  fixed reference scale, so one lucky tick cannot dominate;
* stability = stability_mean ∈ [0, 1];
* resource_penalty = ½·vram_utilization + ½·min(latency_ms / LATENCY_REF_MS, 1) ∈ [0, 1].

Realized gain (the domain's reward, ``domain_reward``): the seed defines the meta-reward's
gain as "how much predictive gain hypotheses are producing"; this pipeline measures exactly
that for its own overrides in ``feedback_cycles``. With ``RewardWeights`` w:

    reward = w.gain·normalized_gain + w.stability·stability − w.resource·resource_penalty
             + w.realized·clip(realized_gain / REALIZED_REF, −1, 1)

* realized_gain = the pooled alignment of the last ``w.realized_cycles`` feedback cycles,
  1 − Σ n·mse / Σ n·mse_zero (the share of the realized outcomes' second moment the
  overrides explained; > 0: better than no override), on a fixed scale (REALIZED_REF =
  0.05: explaining 5 % of the outcomes' second moment earns the term's full weight);
* a domain without scored feedback yet (fewer than ``w.realized_min_trades`` scored
  trades) gets the telemetry terms alone, and ``realized_gain`` says so in its note.
The weights are configurable (``controller_state``'s run config) and documented in docs/math.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from meta_pipeline.contracts import TELEMETRY_OUTCOMES

GAIN_REF = 0.05
LATENCY_REF_MS = 500.0
W_GAIN, W_STABILITY, W_RESOURCE = 0.6, 0.3, 0.1
REALIZED_REF = 0.05  # alignment (1 − MSE/MSE₀) that earns the realized term's full weight
W_REALIZED = 0.6  # weight of the realized predictive gain of the domain's overrides
REALIZED_CYCLES = 5  # feedback cycles pooled into the realized gain (the most recent)
REALIZED_MIN_TRADES = 200  # scored trades the realized gain needs; fewer: telemetry alone


@dataclass(frozen=True)
class RewardWeights:
    """The reward's weights (module doc); every weight ≥ 0."""

    gain: float = W_GAIN
    stability: float = W_STABILITY
    resource: float = W_RESOURCE
    realized: float = W_REALIZED
    realized_cycles: int = REALIZED_CYCLES
    realized_min_trades: int = REALIZED_MIN_TRADES

    def __post_init__(self) -> None:
        for name in ("gain", "stability", "resource", "realized"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and 0.0 <= value <= 10.0):
                raise ValueError(f"reward weight {name}={value!r} must be a number in [0, 10]")
        if int(self.realized_cycles) < 1 or int(self.realized_min_trades) < 1:
            raise ValueError("realized_cycles and realized_min_trades must be at least 1")


@dataclass(frozen=True)
class RealizedGain:
    """The realized predictive gain of a domain's overrides, pooled over its recent feedback cycles."""

    alignment: float | None  # 1 − Σ n·mse / Σ n·mse_zero (None: not enough feedback)
    rank_ic: float | None  # trade-weighted mean rank IC of the same cycles
    n_trades: int
    n_cycles: int
    versions: tuple[int, ...]
    note: str

    @property
    def available(self) -> bool:
        return self.alignment is not None


def realized_gain(cycles: pd.DataFrame | None, weights: RewardWeights = RewardWeights()) -> RealizedGain:
    """Pool the last ``weights.realized_cycles`` feedback cycles (in cycle order) into one realized gain."""
    if cycles is None or cycles.empty:
        return RealizedGain(None, None, 0, 0, (), "no feedback cycles yet: reward from telemetry alone")
    recent = cycles.sort_values("cycle", kind="stable").tail(int(weights.realized_cycles))
    n = pd.to_numeric(recent["n"], errors="coerce").fillna(0).to_numpy(dtype=float)
    mse = pd.to_numeric(recent["mse"], errors="coerce").to_numpy(dtype=float)
    mse0 = pd.to_numeric(recent["mse_zero"], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(mse) & np.isfinite(mse0) & (n > 0)
    total = int(n[ok].sum())
    versions = tuple(sorted({int(v) for v in recent.loc[ok, "overrides_version"]}))
    if total < int(weights.realized_min_trades) or float((n[ok] * mse0[ok]).sum()) <= 0:
        return RealizedGain(None, None, total, int(ok.sum()), versions,
                            f"only {total} scored trade(s) in feedback_cycles (< {weights.realized_min_trades}): "
                            "reward from telemetry alone")
    alignment = 1.0 - float((n[ok] * mse[ok]).sum() / (n[ok] * mse0[ok]).sum())
    ic = pd.to_numeric(recent["rank_ic"], errors="coerce").to_numpy(dtype=float)
    has_ic = ok & np.isfinite(ic)
    rank_ic = float(np.average(ic[has_ic], weights=n[has_ic])) if has_ic.any() else None
    shown = f"v{versions[0]}" if len(versions) == 1 else f"v{versions[0]}–v{versions[-1]}"
    note = (f"realized gain of the overrides: alignment {alignment:+.4f}"
            + (f", rank IC {rank_ic:+.3f}" if rank_ic is not None else "")
            + f" over the last {int(ok.sum())} feedback cycle(s) ({total} trades, {shown})")
    return RealizedGain(alignment, rank_ic, total, int(ok.sum()), versions, note)


def realized_term(gain: RealizedGain, weights: RewardWeights = RewardWeights()) -> float:
    """w.realized·clip(alignment / REALIZED_REF, −1, 1); 0 without feedback (telemetry alone)."""
    if not gain.available:
        return 0.0
    return float(weights.realized * np.clip(gain.alignment / REALIZED_REF, -1.0, 1.0))


def resource_penalty(vram_utilization, latency_ms):
    return 0.5 * np.asarray(vram_utilization, dtype=float) + 0.5 * np.minimum(
        np.asarray(latency_ms, dtype=float) / LATENCY_REF_MS, 1.0
    )


def meta_reward(gain_p50, stability_mean, vram_utilization, latency_ms,
                w_gain: float = W_GAIN, w_stability: float = W_STABILITY, w_resource: float = W_RESOURCE):
    """Vectorized over arrays of ticks; returns a float for scalars."""
    normalized_gain = np.clip(np.asarray(gain_p50, dtype=float) / GAIN_REF, -1.0, 1.0)
    reward = (
        w_gain * normalized_gain
        + w_stability * np.asarray(stability_mean, dtype=float)
        - w_resource * resource_penalty(vram_utilization, latency_ms)
    )
    return float(reward) if np.ndim(reward) == 0 else reward


def telemetry_reward(telemetry: pd.DataFrame, weights: RewardWeights | None = None) -> np.ndarray:
    """The meta-reward of each tick of a telemetry frame (NaN where an outcome is missing or not a number).

    ``weights``: the telemetry terms' weights (None: the defaults). A ``realized_term``
    column (``domain_reward``'s per-tick realized term, NaN where unknown) is added.
    """
    missing = [c for c in TELEMETRY_OUTCOMES if c not in telemetry.columns]
    if missing:
        raise ValueError(f"telemetry lacks column(s) {missing}")
    cols = {c: pd.to_numeric(telemetry[c], errors="coerce").to_numpy(dtype=float) for c in TELEMETRY_OUTCOMES}
    w = weights or RewardWeights()
    reward = np.asarray(meta_reward(**cols, w_gain=w.gain, w_stability=w.stability, w_resource=w.resource),
                        dtype=float).reshape(-1)
    if REALIZED_COLUMN in telemetry.columns:
        term = pd.to_numeric(telemetry[REALIZED_COLUMN], errors="coerce").to_numpy(dtype=float)
        reward = reward + np.nan_to_num(term, nan=0.0)
    return reward


REALIZED_COLUMN = "realized_term"  # a telemetry frame's per-tick realized-gain term (domain_reward adds it)


def with_realized_term(telemetry: pd.DataFrame, cycles: pd.DataFrame | None,
                       weights: RewardWeights = RewardWeights()) -> tuple[pd.DataFrame, RealizedGain]:
    """THE domain reward's input: the telemetry frame with its realized-gain term per tick.

    Every tick of a batch gets the realized gain known when the controller decides (the
    pooled recent feedback cycles); without feedback the term is 0 and the note says
    "telemetry alone".
    """
    gain = realized_gain(cycles, weights)
    return telemetry.assign(**{REALIZED_COLUMN: realized_term(gain, weights)}), gain


def domain_reward(telemetry: pd.DataFrame, cycles: pd.DataFrame | None,
                  weights: RewardWeights = RewardWeights()) -> tuple[np.ndarray, RealizedGain]:
    """The reward of each tick for a domain: telemetry terms + the realized gain of its overrides (module doc)."""
    frame, gain = with_realized_term(telemetry, cycles, weights)
    return telemetry_reward(frame, weights), gain
