"""In-place upgrades of a store created by an older version (run once per engine, after create_all).

* ``add_missing_columns`` (engine.py): new nullable columns.
* ``version_unversioned_overrides``: a store from before override versions has
  pm_overrides rows without a version; they become version 1 of their domain, with
  as_of = the domain's newest trade, the knobs their source_json records and the
  domain's current regime weights — so the closed loop can score trades after them.
"""

from __future__ import annotations

import json

import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from meta_pipeline.contracts import table
from meta_pipeline.knobs import default_knobs, parse_knobs
from meta_pipeline.store.engine import mark_written
from meta_pipeline.store.frames import _q, _statement_frame, insert_frame


def _knobs_of(rows: pd.DataFrame) -> dict[str, float]:
    for raw in rows["source_json"].dropna().head(1):
        try:
            return parse_knobs(json.loads(raw)["knobs"])
        except (ValueError, KeyError, TypeError):
            break
    return default_knobs()


def version_unversioned_overrides(engine: Engine) -> list[str]:
    """Give every domain's version-less pm_overrides rows version 1 (module doc). Returns the domains upgraded."""
    upgraded: list[str] = []
    tbl = table("pm_overrides")
    with engine.connect() as conn:
        conn.execution_options(meta_write=True)
        with conn.begin():
            domains = [r[0] for r in conn.execute(text(
                "SELECT DISTINCT domain FROM pm_overrides WHERE version IS NULL"))]
            for domain in domains:
                _upgrade_domain(conn, tbl, domain)
                upgraded.append(domain)
    return upgraded


def _upgrade_domain(conn: Connection, tbl, domain: str) -> None:
    rows = _statement_frame(conn, tbl.select().where(tbl.c.domain == domain), tbl)
    if conn.execute(text("SELECT COUNT(*) FROM pm_overrides_versions WHERE domain = :d"), {"d": domain}).scalar():
        return  # a version exists: not an old store's leftovers
    newest = conn.execute(text("SELECT MAX(closed_at) FROM trades WHERE domain = :d"), {"d": domain}).scalar()
    now = pd.Timestamp.now(tz="UTC")
    as_of = pd.to_datetime(newest, utc=True) if newest is not None else now
    weights_tbl = table("learning_regime_weights")
    weights = _statement_frame(conn, weights_tbl.select().where(weights_tbl.c.domain == domain), weights_tbl)
    weights = weights.drop(columns=["domain"], errors="ignore")
    conn.execute(text(f"UPDATE {_q('pm_overrides')} SET version = 1 WHERE domain = :d"), {"d": domain})
    mark_written(conn, "pm_overrides")
    history = rows.drop(columns=["version"]).assign(version=1, materialized_at=now, as_of=as_of)
    insert_frame(conn, table("pm_overrides_history"), history)
    insert_frame(conn, table("pm_overrides_versions"), pd.DataFrame([{
        "domain": domain, "version": 1, "materialized_at": now, "as_of": as_of, "n_overrides": len(rows),
        "knobs_json": json.dumps(_knobs_of(rows), sort_keys=True),
        "regime_weights_json": weights.to_json(orient="records", date_format="iso"), "run_id": "upgrade"}]))
