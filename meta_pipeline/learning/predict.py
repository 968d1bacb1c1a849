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

Honest answers: a domain the store knows nothing about (no trades, overrides, overrides
versions, regime weights, telemetry or controller state) raises :class:`UnknownDomainError`
instead of predicting 0 for every trade; a known domain without overrides still predicts
(the regime term, or 0) and says so in ``result.attrs["n_overrides"]`` /
``result.attrs["regime_term"]``. A file that cannot be read at all (not UTF-8, empty, not
the format its extension says) raises ContractError naming it.

Edges expire: an override row applies to a trade only while the trade's ``closed_at`` is
not past the row's ``valid_until`` (the learning step sets it from the edge's decay; a
domain that stopped trading therefore stops getting its old edges once they run out).
A trade whose winning override had expired is predicted without it (the next override
of that factor may win); ``result.attrs["n_expired"]`` counts those trades and the CLI
says so on stderr.

Strategy weights: the active STRATEGY_CONFIG configs of a domain (target
``<domain>/<strategy_id>``, ``{"strategy_id", "regime_weights": {regime: weight}}``) are
what an engine sizes by; :func:`strategy_weights` reads them and ``predict_trades(...,
with_weights=True)`` adds each trade's ``strategy_weight`` (1.0 when no config says
otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.contracts import (
    ContractError,
    TradesBatch,
    read_input_file,
    validate_domain,
    validate_trades,
)
from meta_pipeline.learning.overrides import OverrideModel

STRATEGY_TARGET = "STRATEGY_CONFIG"

__all__ = ["UnknownDomainError", "override_model", "predict_file", "predict_trades", "strategy_weights"]

# Tables whose rows make a domain known to the store (any one is enough).
DOMAIN_EVIDENCE = ("trades", "pm_overrides", "pm_overrides_versions", "learning_regime_weights", "telemetry",
                   "controller_state")


class UnknownDomainError(ContractError):
    """The store has no row of the domain at all: predicting for it would be 0 for every trade."""

    def __init__(self, domain: str, where: str, known: list[str]) -> None:
        self.domain, self.where, self.known = domain, where, known
        shown = ", ".join(known[:10]) + (f", … ({len(known)} in all)" if len(known) > 10 else "")
        super().__init__(f"domain {domain!r} is unknown in {where}: no trades, overrides or overrides versions "
                         f"(known: {shown or 'none'})")


def _shown_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def check_known_domain(store: Any, domain: str) -> None:
    """UnknownDomainError unless some table of the store has a row of `domain`."""
    for table_name in DOMAIN_EVIDENCE:
        if store.count(table_name, domain):
            return
    known = sorted(set(store.domains("trades")) | set(store.domains("pm_overrides")))
    raise UnknownDomainError(domain, _shown_url(str(getattr(store, "db_url", store))), known)


def version_in_effect(store: Any, domain: str, as_of: pd.Timestamp) -> int:
    """The overrides version an engine applied at ``as_of``: the prequential rule of the closed loop
    (the newest ``as_of`` strictly before the time; ``feedback.assign_versions``). ContractError if none."""
    from meta_pipeline.learning.feedback import assign_versions

    versions = store.override_versions(domain)
    stamp = pd.Timestamp(as_of)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    found = int(assign_versions(pd.Series([stamp]), versions)[0])
    if found < 0:
        first = "no overrides version yet" if versions.empty else f"the first one learned up to {versions['as_of'].min()}"
        raise ContractError(f"domain {domain!r} had no overrides version in effect at {stamp} ({first})")
    return found


def override_model(store_or_frames: Any, domain: str, *, version: int | None = None,
                   as_of: pd.Timestamp | str | None = None) -> OverrideModel:
    """The domain's stored override model (see :func:`predict_trades` for ``store_or_frames``).

    ``version`` (or ``as_of``: the version in effect at that time) re-applies a past version
    exactly: its rows, the regime weights and the knobs it was built with (store only).
    """
    validate_domain(domain)
    if not isinstance(store_or_frames, Mapping):
        check_known_domain(store_or_frames, domain)
    if version is not None or as_of is not None:
        if isinstance(store_or_frames, Mapping):
            raise ValueError("a past version needs a store, not frames")
        store = store_or_frames
        if version is None:
            version = version_in_effect(store, domain, pd.Timestamp(as_of))
        try:
            rows, weights, knobs = store.override_version_rows(domain, int(version))
        except KeyError as exc:
            known = store.override_versions(domain)["version"].tolist()
            raise ContractError(f"domain {domain!r} has no overrides version {version} "
                                f"(versions: {known[:1] + ['…'] + known[-1:] if len(known) > 3 else known})") from exc
        return OverrideModel.from_rows(rows, weights, knobs, fallback_source=f"recorded with version {version}")
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


def _read(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """contracts.read_input_file, with a file it cannot read at all as a ContractError naming it
    (OSErrors — missing, a directory, no permission — pass as they are: they name the path)."""
    import pyarrow as pa

    try:
        return read_input_file(path)
    except UnicodeDecodeError as exc:
        raise ContractError(f"{path.name}: not UTF-8 text (a bad byte at offset {exc.start}); "
                            "save the file as UTF-8") from exc
    except pd.errors.EmptyDataError as exc:
        raise ContractError(f"{path.name}: empty file (no header, no rows); write the header line and the rows") from exc
    except pd.errors.ParserError as exc:
        raise ContractError(f"{path.name}: not a readable CSV ({_first_line(exc)}); "
                            "every row needs as many fields as the header") from exc
    except pa.ArrowException as exc:
        raise ContractError(f"{path.name}: not a readable {path.suffix.lstrip('.') or 'input'} file "
                            f"({_first_line(exc)}); check that the file is what its extension says") from exc


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _int_lines(quarantine: pd.DataFrame | None) -> pd.DataFrame | None:
    """The quarantine with its file lines as integers (a line is never 12.0)."""
    if quarantine is None or "line" not in quarantine or not len(quarantine):
        return quarantine
    out = quarantine.copy()
    lines = pd.to_numeric(out["line"], errors="coerce")
    out["line"] = lines.round().astype("Int64")
    return out


def _as_batch(trades: pd.DataFrame | TradesBatch | str | Path, domain: str) -> TradesBatch:
    if isinstance(trades, TradesBatch):
        return trades
    if isinstance(trades, (str, Path)):
        raw, lines = _read(Path(trades))
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
    *,
    version: int | None = None,
    as_of: pd.Timestamp | str | None = None,
    with_weights: bool = False,
) -> pd.DataFrame:
    """``trade_id, edge`` for each valid trade, in input order (plus ``strategy_weight`` with ``with_weights``).

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
    ``"defaults"``) and ``tier2_enabled``. ``version`` / ``as_of``: re-apply a past
    overrides version exactly (``override_model``); ``attrs["version"]`` says which.
    ``attrs["n_overrides"]``: the override rows applied (0: the edges are the regime term
    alone, or 0); ``attrs["regime_term"]``: whether the tier-2 metric term was added.
    A store that knows nothing of ``domain`` raises :class:`UnknownDomainError`.
    """
    model = override_model(store_or_frames, domain, version=version, as_of=as_of)
    batch = _as_batch(trades, domain)
    edge, n_expired = _predict_unexpired(model, batch)
    out = pd.DataFrame({"trade_id": edge.index.to_numpy(), "edge": edge.to_numpy()})
    out.attrs["n_expired"] = n_expired
    if with_weights:
        weights = strategy_weights(store_or_frames, domain) if not isinstance(store_or_frames, Mapping) else \
            store_or_frames.get("strategy_weights", _empty_weights())
        out["strategy_weight"] = weight_of_trades(batch.trades, weights)
    out.attrs["quarantine"] = _int_lines(batch.quarantine)
    out.attrs["n_overrides"] = len(model.rows) if model.rows is not None else 0
    weights = model.regime_weights
    out.attrs["regime_term"] = bool(model.tier2_enabled and weights is not None and len(weights))
    out.attrs["tier2_enabled"] = model.tier2_enabled
    out.attrs["knobs"] = dict(model.knobs)
    out.attrs["knobs_source"] = model.knobs_source
    out.attrs["version"] = model.version
    return out


def predict_file(store: Any, domain: str, path: str | Path, *, version: int | None = None,
                 as_of: pd.Timestamp | str | None = None, with_weights: bool = False) -> pd.DataFrame:
    """``trade_id, edge`` for a trades file in the ingest contract (what the CLI prints as CSV)."""
    return predict_trades(store, domain, Path(path), version=version, as_of=as_of, with_weights=with_weights)


def _predict_unexpired(model: OverrideModel, batch: TradesBatch) -> tuple[pd.Series, int]:
    """Edges with every override row dropped for the trades closed after its ``valid_until``.

    Trades are grouped by how many rows have expired at their closed_at (rows sorted by
    valid_until): one prediction per group with the rows still valid. Returns the edges (in
    trade order) and the number of trades whose winning override had expired.
    """
    trades = batch.trades
    rows = model.rows
    if rows is None or not len(rows) or "valid_until" not in rows.columns or not len(trades):
        return model.predict(trades, batch.patterns, batch.scope, batch.metrics), 0
    until = pd.to_datetime(rows["valid_until"], utc=True)
    until_ns = np.where(until.isna(), np.iinfo(np.int64).max, until.to_numpy(dtype="datetime64[ns]").astype(np.int64))
    closed_ns = pd.to_datetime(trades["closed_at"], utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    cuts = np.sort(np.unique(until_ns))
    n_cut = np.searchsorted(cuts, closed_ns, side="left")  # distinct valid_until values before closed_at
    if not (n_cut > 0).any():
        return model.predict(trades, batch.patterns, batch.scope, batch.metrics), 0
    winners = model.winning_overrides(trades, batch.patterns, batch.scope)
    row_key = (rows["lesson_key"].astype(str) + "\x00" + rows["regime"].astype(str)).to_numpy()
    until_of = pd.Series(until_ns, index=row_key)
    until_of = until_of[~until_of.index.duplicated(keep="first")]
    won_until = until_of.reindex((winners["lesson_key"].astype(str) + "\x00" + winners["regime"].astype(str))
                                 .to_numpy()).to_numpy()
    closed_of = pd.Series(closed_ns, index=trades["trade_id"].astype(str).to_numpy())
    expired = won_until < closed_of.reindex(winners["trade_id"].astype(str)).to_numpy()
    n_expired = int(pd.Series(winners["trade_id"].to_numpy()[expired]).nunique())
    edge = pd.Series(0.0, index=pd.Index(trades["trade_id"].astype(str), name="trade_id"), name="edge")
    pos = np.arange(len(trades))
    for k in np.unique(n_cut):
        in_group = n_cut == k
        live = model if k == 0 else dataclasses.replace(model, rows=rows[until_ns > cuts[k - 1]].reset_index(drop=True))
        sub = trades.iloc[pos[in_group]]
        ids = set(sub["trade_id"].astype(str))
        part = live.predict(sub, _of(batch.patterns, ids), _of(batch.scope, ids), _of(batch.metrics, ids))
        edge.iloc[pos[in_group]] = part.to_numpy()
    return edge, n_expired


def _of(frame: pd.DataFrame | None, ids: set[str]) -> pd.DataFrame | None:
    if frame is None or not len(frame):
        return frame
    return frame[frame["trade_id"].astype(str).isin(ids)]


def _empty_weights() -> pd.DataFrame:
    return pd.DataFrame({"strategy_id": pd.Series(dtype=str), "regime": pd.Series(dtype=str),
                         "weight": pd.Series(dtype=float), "config_version": pd.Series(dtype="Int64")})


def strategy_weights(store: Any, domain: str) -> pd.DataFrame:
    """The domain's strategy × regime weights from its active STRATEGY_CONFIG configs (one row per
    regime a config names: strategy_id, regime, weight, config_version). Absent = weight 1."""
    validate_domain(domain)
    prefix = f"{domain}/"
    rows = []
    for (target_type, target_id), config in store.active_configs().items():
        if target_type != STRATEGY_TARGET or not target_id.startswith(prefix):
            continue
        version = store.active_config(target_type, target_id)
        for regime, weight in (config.get("regime_weights") or {}).items():
            rows.append({"strategy_id": target_id[len(prefix):], "regime": str(regime), "weight": float(weight),
                         "config_version": version[0] if version else None})
    return pd.DataFrame(rows) if rows else _empty_weights()


def weight_of_trades(trades: pd.DataFrame, weights: pd.DataFrame) -> np.ndarray:
    """Each trade's strategy weight in its regime (1.0 where no config names the cell)."""
    if weights is None or not len(weights):
        return np.ones(len(trades))
    key = weights["strategy_id"].astype(str) + "\x00" + weights["regime"].astype(str)
    lookup = pd.Series(weights["weight"].to_numpy(float), index=key)
    want = trades["strategy_id"].astype(str) + "\x00" + trades["regime"].astype(str)
    return lookup.reindex(want.to_numpy()).fillna(1.0).to_numpy(float)
