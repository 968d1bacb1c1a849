"""Reading priors back from the store (no Dagster): for the controller, the CLI and the assets.

The ``global_prior`` table is append-only and versioned; "the global prior" is the
newest version. Each version's ``details_json`` also keeps the continuous (unrounded)
knob values the next Reptile step starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from meta_pipeline.knobs import KNOB_NAMES, clip_knobs
from meta_pipeline.store import MetaStore


@dataclass
class GlobalPriorVersion:
    version: int
    values: dict[str, float]  # bounded, deployable knob values
    continuous: dict[str, float]  # unrounded values (Reptile state)
    n_domains: int
    epsilon: float | None
    details: dict[str, Any] = field(default_factory=dict)
    created_at: pd.Timestamp | None = None


def latest_version_number(store: MetaStore, conn=None) -> int:
    """The newest global_prior version, 0 when there is none."""
    frame = store.read("global_prior", columns=["version"], conn=conn)
    return int(frame["version"].max()) if len(frame) else 0


def read_global_prior(store: MetaStore, version: int | None = None, conn=None) -> GlobalPriorVersion | None:
    """One version of the global prior (default: the latest), or None when there is none."""
    if version is None:
        version = latest_version_number(store, conn=conn)
        if version == 0:
            return None
    rows = store.read("global_prior", where="version = :v", params={"v": int(version)}, conn=conn)
    if rows.empty:
        return None
    values = {k: float(v) for k, v in zip(rows["knob"], rows["value"]) if k in KNOB_NAMES}
    details: dict[str, Any] = {}
    raw = rows["details_json"].dropna()
    if len(raw):
        try:
            details = json.loads(raw.iloc[0])
        except (TypeError, ValueError):
            details = {}
    continuous = {k: float(v) for k, v in (details.get("theta_continuous") or {}).items() if k in KNOB_NAMES}
    eps = rows["epsilon"].dropna()
    return GlobalPriorVersion(
        version=int(version),
        values=clip_knobs(values),
        continuous={**values, **continuous},
        n_domains=int(rows["n_domains"].iloc[0]),
        epsilon=float(eps.iloc[0]) if len(eps) else None,
        details=details,
        created_at=rows["created_at"].iloc[0],
    )


def latest_global_prior(store: MetaStore) -> dict[str, float] | None:
    """The knob values of the newest global prior (bounded), or None before the first version."""
    latest = read_global_prior(store)
    return None if latest is None else latest.values


def read_domain_priors(store: MetaStore, domain: str | None = None) -> pd.DataFrame:
    """The ``domain_priors`` table, or one domain's rows."""
    return store.read("domain_priors", domain=domain)
