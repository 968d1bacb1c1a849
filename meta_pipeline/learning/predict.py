"""Apply a domain's pm_overrides to trades: the function engines written in Python call.

``meta-pipeline predict --domain NAME FILE`` calls :func:`predict_file`; both apply the
rule in DESIGN ("How an engine applies the overrides") through
:func:`meta_pipeline.learning.overrides.predict`.

Which ``tier2_enabled`` applies: the one the overrides were materialized with
(recorded in each row's ``source_json``). Overrides fitted with tier2 on are net of
the metric term, so predicting with it off would drop the metric part, and overrides
fitted with it off already carry their trades' average metric contribution, so adding
the metric term would count it twice. Only when a domain has no overrides do the
knobs currently in effect decide (controller_state, else the defaults).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import TradesBatch, read_input_file, validate_domain, validate_trades
from meta_pipeline.knobs import clip_knobs, default_knobs
from meta_pipeline.learning.overrides import predict

__all__ = ["predict_trades", "predict_file", "tier2_of_overrides"]


def tier2_of_overrides(overrides: pd.DataFrame, fallback: bool) -> bool:
    """The tier2 flag the overrides were materialized with (``fallback`` if unrecorded)."""
    if overrides is None or overrides.empty or "source_json" not in overrides.columns:
        return fallback
    for text in overrides["source_json"].dropna().head(1):
        try:
            return bool(json.loads(text)["knobs"]["tier2_enabled"])
        except (ValueError, KeyError, TypeError):
            break
    return fallback


def _store_knobs(store: Any, domain: str) -> dict[str, float]:
    state = store.read("controller_state", domain=domain, columns=["knobs_json"])
    return clip_knobs(json.loads(state["knobs_json"].iloc[0])) if len(state) else default_knobs()


def _as_batch(trades: pd.DataFrame | TradesBatch | str | Path, domain: str) -> TradesBatch:
    if isinstance(trades, TradesBatch):
        return trades
    if isinstance(trades, (str, Path)):
        raw, lines = read_input_file(trades)
        source = Path(trades).name
    else:
        raw, lines, source = trades.copy(), np.arange(len(trades), dtype=np.int64) + 1, "<frame>"
    if "return_r" not in raw.columns:  # not known yet at prediction time; the contract wants a number
        raw["return_r"] = "0"
    return validate_trades(raw, lines, domain=domain, source=source)


def predict_trades(
    store_or_frames: Any,
    domain: str,
    trades: pd.DataFrame | TradesBatch | str | Path,
) -> pd.DataFrame:
    """``trade_id, edge`` for each valid trade, in input order.

    ``store_or_frames``: a MetaStore (the domain's ``pm_overrides`` and
    ``learning_regime_weights`` are read from it) or a mapping with ``overrides``,
    ``regime_weights`` and optionally ``tier2_enabled``. ``trades``: a file path, a
    raw frame in the ingest layout (``return_r`` optional), or a validated TradesBatch.
    Rows that break the contract are left out and returned in
    ``result.attrs["quarantine"]`` (file line and reason), like ingest does.
    """
    validate_domain(domain)
    if isinstance(store_or_frames, Mapping):
        overrides = store_or_frames.get("overrides")
        regime_weights = store_or_frames.get("regime_weights")
        knob_tier2 = bool(store_or_frames.get("tier2_enabled", default_knobs()["tier2_enabled"]))
    else:
        overrides = store_or_frames.read("pm_overrides", domain=domain)
        regime_weights = store_or_frames.read("learning_regime_weights", domain=domain)
        knob_tier2 = bool(_store_knobs(store_or_frames, domain)["tier2_enabled"])
    tier2 = tier2_of_overrides(overrides, knob_tier2)
    if isinstance(store_or_frames, Mapping) and "tier2_enabled" in store_or_frames:
        tier2 = bool(store_or_frames["tier2_enabled"])  # explicit wins
    batch = _as_batch(trades, domain)
    edge = predict(
        overrides if overrides is not None else pd.DataFrame(),
        regime_weights,
        batch.trades,
        batch.patterns,
        batch.scope,
        batch.metrics,
        tier2_enabled=tier2,
    )
    out = pd.DataFrame({"trade_id": edge.index.to_numpy(), "edge": edge.to_numpy()})
    out.attrs["quarantine"] = batch.quarantine
    out.attrs["tier2_enabled"] = tier2
    return out


def predict_file(store: Any, domain: str, path: str | Path) -> pd.DataFrame:
    """``trade_id, edge`` for a trades file in the ingest contract (what the CLI prints as CSV)."""
    return predict_trades(store, domain, Path(path))
