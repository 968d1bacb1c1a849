"""Apply a domain's pm_overrides to trades: the function engines written in Python call.

``meta-pipeline predict --domain NAME FILE`` calls :func:`predict_file`; both rebuild the
domain's :class:`meta_pipeline.learning.overrides.OverrideModel` from the stored rows
(``OverrideModel.from_rows``) and apply it — the rule in DESIGN ("How an engine applies
the overrides") lives there, once, for the fit and the apply.

Which knobs (``tier2_enabled``) apply: the ones the overrides were materialized with,
recorded in the rows' ``source_json`` (overrides fitted with tier2 on are net of the
metric term, so predicting with it off would drop the metric part; fitted with it off
they already carry their trades' average metric contribution, so adding the metric
term would count it twice). Only when no row records them (a domain without
overrides) do the knobs in effect decide: ``store.knobs_in_effect(domain)``, the same
rule the learning assets use (an applied META_KNOBS config the controller has not
adopted yet, else controller_state, else the defaults). ``result.attrs["knobs"]`` and
``result.attrs["knobs_source"]`` say which knobs were used and where they came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import (
    TradesBatch,
    read_input_file,
    validate_domain,
    validate_trades,
)
from meta_pipeline.learning.overrides import OverrideModel

__all__ = ["override_model", "predict_file", "predict_trades"]


def override_model(store_or_frames: Any, domain: str) -> OverrideModel:
    """The domain's stored override model (see :func:`predict_trades` for ``store_or_frames``)."""
    validate_domain(domain)
    if isinstance(store_or_frames, Mapping):
        model = OverrideModel.from_rows(store_or_frames.get("overrides"), store_or_frames.get("regime_weights"), None)
        if "tier2_enabled" in store_or_frames:  # explicit wins
            model = model.with_knobs("given", tier2_enabled=bool(store_or_frames["tier2_enabled"]))
        return model
    store = store_or_frames
    in_effect = store.knobs_in_effect(domain)  # THE rule for the knobs in effect (as the learning assets)
    return OverrideModel.from_rows(
        store.read("pm_overrides", domain=domain),
        store.read("learning_regime_weights", domain=domain),
        in_effect.values,
        fallback_source=in_effect.source,
    )


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
    ``learning_regime_weights`` are read from it; knobs the rows do not record come
    from ``store.knobs_in_effect(domain)``) or a mapping with ``overrides``,
    ``regime_weights`` and optionally ``tier2_enabled`` (explicit: wins over the
    recorded knobs; unrecorded and not given: the defaults). ``trades``: a file path,
    a raw frame in the ingest layout (``return_r`` optional), or a validated
    TradesBatch. Rows that break the contract are left out and returned in
    ``result.attrs["quarantine"]`` (file line and reason), like ingest does.
    ``result.attrs`` also has ``knobs`` and ``knobs_source`` (``"recorded with the
    overrides"``, a ``KnobsInEffect.source`` such as ``"configs v3"``, ``"given"`` or
    ``"defaults"``) and ``tier2_enabled``.
    """
    model = override_model(store_or_frames, domain)
    batch = _as_batch(trades, domain)
    edge = model.predict(batch.trades, batch.patterns, batch.scope, batch.metrics)
    out = pd.DataFrame({"trade_id": edge.index.to_numpy(), "edge": edge.to_numpy()})
    out.attrs["quarantine"] = batch.quarantine
    out.attrs["tier2_enabled"] = model.tier2_enabled
    out.attrs["knobs"] = dict(model.knobs)
    out.attrs["knobs_source"] = model.knobs_source
    return out


def predict_file(store: Any, domain: str, path: str | Path) -> pd.DataFrame:
    """``trade_id, edge`` for a trades file in the ingest contract (what the CLI prints as CSV)."""
    return predict_trades(store, domain, Path(path))
