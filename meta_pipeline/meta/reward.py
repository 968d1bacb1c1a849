"""The meta-reward the integrative layer maximises, computed from one telemetry tick.

reward = w_gain·normalized_gain + w_stability·stability − w_resource·resource_penalty

* normalized_gain = clip(gain_p50 / GAIN_REF, −1, 1): the median predictive gain on a
  fixed reference scale, so one lucky tick cannot dominate;
* stability = stability_mean ∈ [0, 1];
* resource_penalty = ½·vram_utilization + ½·min(latency_ms / LATENCY_REF_MS, 1) ∈ [0, 1].
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from meta_pipeline.contracts import TELEMETRY_OUTCOMES

GAIN_REF = 0.05
LATENCY_REF_MS = 500.0
W_GAIN, W_STABILITY, W_RESOURCE = 0.6, 0.3, 0.1


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


def telemetry_reward(telemetry: pd.DataFrame) -> np.ndarray:
    """The meta-reward of each tick of a telemetry frame (NaN where an outcome is missing or not a number)."""
    missing = [c for c in TELEMETRY_OUTCOMES if c not in telemetry.columns]
    if missing:
        raise ValueError(f"telemetry lacks column(s) {missing}")
    cols = {c: pd.to_numeric(telemetry[c], errors="coerce").to_numpy(dtype=float) for c in TELEMETRY_OUTCOMES}
    return np.asarray(meta_reward(**cols), dtype=float).reshape(-1)
