"""Closed-loop telemetry for the controller asset: the engine runs the knobs the controller publishes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from meta_pipeline.lab.simulate import live_engine, live_tick_rows, published_knobs
from meta_pipeline.store import MetaStore

DOMAIN = "sim0"
T0 = pd.Timestamp("2026-04-01", tz="UTC")
STEP = pd.Timedelta(minutes=5)


def write_ticks(store: MetaStore, n: int, first: int, domain: str = DOMAIN, seed: int = 0) -> None:
    """n ticks of the domain's simulated engine, each running the knobs the controller publishes
    (the engine follows the controller, as in `meta-pipeline simulate`)."""
    engine = {domain: live_engine(domain, seed)}
    rng = np.random.default_rng([seed, first])
    for t in range(first, first + n):
        knobs = published_knobs(store, [domain])
        store.append("telemetry", live_tick_rows(engine, knobs, t, {domain: T0 + STEP * t}, rng))
