"""Synth data in the store's layout, for the learning, diagnostics and proposals tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from meta_pipeline.contracts import TradesBatch, validate_telemetry, validate_trades
from meta_pipeline.governance.diagnostics import DiagnosticsInputs
from meta_pipeline.knobs import KNOB_NAMES
from meta_pipeline.lab import synth
from meta_pipeline.store import MetaStore

# Start of the simulated engine telemetry (engine_telemetry) and of hand-made tick frames.
START = pd.Timestamp("2026-07-01", tz="UTC")


# ---------------------------------------------------------------------------
# learning: a synth domain's trades through the ingest contract
# ---------------------------------------------------------------------------


def validated_batch(domain: str, trades: pd.DataFrame) -> TradesBatch:
    """Synth trades as the four source-table frames, validated; nothing may be quarantined."""
    raw = synth.trades_contract_frame(trades)
    raw.attrs = {}  # synth keeps arrays in attrs; pandas cannot compare them on concat
    raw = raw.astype(object).where(raw.notna(), "").astype(str)
    batch = validate_trades(raw, np.arange(len(raw)) + 2, domain=domain, source="synth")
    assert batch.quarantine.empty, batch.quarantine.head()
    return batch


def source_frames(data: synth.DomainData, which: str = "train") -> TradesBatch:
    """A synth domain's trades as the four source-table frames, through the ingest contract."""
    trades = {"train": data.train_trades, "holdout": data.holdout_trades, "all": data.trades}[which]
    return validated_batch(data.domain, trades)


# ---------------------------------------------------------------------------
# diagnostics / proposals
# ---------------------------------------------------------------------------


def domain_frames(data: synth.DomainData) -> dict[str, pd.DataFrame]:
    """A synth domain in the store's layout (all trades, so realized and backtest cover one window)."""
    raw = synth.trades_contract_frame(data.trades)
    batch = validate_trades(raw, np.arange(len(raw)) + 2, domain=data.domain, source="synth")
    tel = validate_telemetry(data.telemetry, np.arange(len(data.telemetry)) + 2, domain=data.domain, source="synth")
    return {"trades": batch.trades, "trade_patterns": batch.patterns, "trade_scope": batch.scope,
            "trade_metrics": batch.metrics, "telemetry": tel.telemetry, "backtest_runs": data.backtests}


def inputs_for(data: synth.DomainData, **extra) -> DiagnosticsInputs:
    f = domain_frames(data)
    return DiagnosticsInputs(domain=data.domain, trades=f["trades"], trade_patterns=f["trade_patterns"],
                             trade_scope=f["trade_scope"], backtest_runs=f["backtest_runs"], telemetry=f["telemetry"],
                             **extra)


def load_fleet(store: MetaStore, fleet: synth.Fleet) -> None:
    for data in fleet.domains.values():
        for table, frame in domain_frames(data).items():
            store.append(table, frame)


def engine_telemetry(sensitivity: dict[str, float], *, n: int, seed: int, resource_coupling: float = 0.0,
                     optimum: dict[str, float] | None = None) -> pd.DataFrame:
    """SimEngine telemetry under random exploration, in the store layout (knob_<name>)."""
    rng = np.random.default_rng(seed)
    engine = synth.make_engine("d", rng)
    engine.sensitivity = {k: float(sensitivity.get(k, 0.0)) for k in KNOB_NAMES}
    engine.resource_coupling = resource_coupling
    if optimum:
        engine.optimum = optimum
    tel = synth.simulate_telemetry(engine, synth.exploration_knobs(n, rng), start=START,
                                   every=pd.Timedelta(minutes=5), rng=rng)
    return tel.rename(columns={f"knob.{k}": f"knob_{k}" for k in KNOB_NAMES})


def tiny_trades() -> pd.DataFrame:
    """Two trades of one strategy in one regime: the least a diagnostics run accepts."""
    return pd.DataFrame({"trade_id": ["t1", "t2"], "regime": ["S0", "S0"], "strategy_id": ["a", "a"],
                         "return_r": [0.1, 0.2]})
