"""Row-level SQL of configs and proposals: what the proposal lifecycle's transactions are made of.

Every function takes the caller's open transaction (``MetaStore.write()``), so a
lifecycle step — check, conditional status update, new config version, change-log row —
commits together or not at all. The state machine itself is
``meta_pipeline.governance.lifecycle``. Also the writes of the governance inputs a user
brings (``meta-pipeline ingest backtests|configs``): backtest runs and config versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from meta_pipeline.contracts import backtest_runs, config_change_log, configs, meta_controller_config_proposals

_P = meta_controller_config_proposals


def active_config_row(conn: Connection, target_type: str, target_id: str) -> tuple[int, str] | None:
    """(version, config_json text) of the target's active configs row, or None."""
    row = conn.execute(
        select(configs.c.version, configs.c.config_json)
        .where(configs.c.target_type == target_type, configs.c.target_id == target_id, configs.c.active.is_(True))
        .order_by(configs.c.version.desc()).limit(1)
    ).first()
    return None if row is None else (int(row.version), str(row.config_json))


def write_config_version(conn: Connection, target_type: str, target_id: str, config_json: str, actor: str,
                         now: datetime, proposal_id: str | None) -> int:
    """Append the target's next configs version as the active one (the previous active row is deactivated)."""
    top = conn.execute(select(func.max(configs.c.version)).where(
        configs.c.target_type == target_type, configs.c.target_id == target_id)).scalar()
    version = int(top or 0) + 1
    conn.execute(update(configs).where(configs.c.target_type == target_type, configs.c.target_id == target_id,
                                       configs.c.active.is_(True)).values(active=False))
    conn.execute(configs.insert().values(target_type=target_type, target_id=target_id, version=version,
                                         config_json=config_json, active=True, created_at=now, created_by=actor,
                                         proposal_id=proposal_id))
    return version


def pending_evidence_hashes(conn: Connection) -> set[str]:
    return set(conn.execute(select(_P.c.evidence_hash).where(_P.c.status == "PENDING")).scalars())


def pending_for_target(conn: Connection, target_type: str, target_id: str) -> list[str]:
    """Ids of the target's PENDING proposals."""
    return list(conn.execute(select(_P.c.proposal_id).where(
        _P.c.status == "PENDING", _P.c.target_type == target_type, _P.c.target_id == target_id)).scalars())


def proposal_ids(conn: Connection) -> list[str]:
    return list(conn.execute(select(_P.c.proposal_id)).scalars())


def proposal_row(conn: Connection, proposal_id: str) -> Mapping[str, Any] | None:
    return conn.execute(select(_P).where(_P.c.proposal_id == proposal_id)).mappings().first()


def proposal_status(conn: Connection, proposal_id: str) -> str | None:
    return conn.execute(select(_P.c.status).where(_P.c.proposal_id == proposal_id)).scalar()


def update_proposal_if(conn: Connection, proposal_id: str, expected_status: str, values: Mapping[str, Any]) -> int:
    """``UPDATE … WHERE proposal_id = :id AND status = :expected``: the rows it changed (1, or 0 if someone moved it first)."""
    return conn.execute(
        update(_P).where(_P.c.proposal_id == proposal_id, _P.c.status == expected_status).values(**values)
    ).rowcount


def update_proposal(conn: Connection, proposal_id: str, values: Mapping[str, Any]) -> None:
    conn.execute(update(_P).where(_P.c.proposal_id == proposal_id).values(**values))


def append_change_log(conn: Connection, **values: Any) -> None:
    conn.execute(config_change_log.insert().values(**values))


def deactivate_config(conn: Connection, target_type: str, target_id: str) -> str | None:
    """Set the target's active configs row inactive (the row stays); the proposal_id that wrote it (None: none)."""
    row = conn.execute(
        select(configs.c.version, configs.c.proposal_id)
        .where(configs.c.target_type == target_type, configs.c.target_id == target_id, configs.c.active.is_(True))
    ).first()
    conn.execute(update(configs).where(configs.c.target_type == target_type, configs.c.target_id == target_id,
                                       configs.c.active.is_(True)).values(active=False))
    return None if row is None else row.proposal_id


def backtest_run_owners(conn: Connection, run_ids: list[str]) -> dict[str, str]:
    """run_id -> domain of the runs already stored (run_id is global: one domain owns it)."""
    if not run_ids:
        return {}
    out: dict[str, str] = {}
    for start in range(0, len(run_ids), 500):
        chunk = run_ids[start:start + 500]
        out.update({str(r.run_id): str(r.domain) for r in conn.execute(
            select(backtest_runs.c.run_id, backtest_runs.c.domain).where(backtest_runs.c.run_id.in_(chunk)))})
    return out


def replace_backtest_runs(conn: Connection, rows: list[dict]) -> int:
    """Upsert backtest runs of one domain by run_id (the caller checked ownership); returns how many existed."""
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]  # NaN -> NULL
    ids = [r["run_id"] for r in rows]
    replaced = 0
    for start in range(0, len(ids), 500):
        replaced += conn.execute(delete(backtest_runs).where(backtest_runs.c.run_id.in_(ids[start:start + 500]))).rowcount
    if rows:
        conn.execute(backtest_runs.insert(), rows)
    return replaced


def write_ingested_config(conn: Connection, target_type: str, target_id: str, config_json: str, actor: str,
                          valid_from: datetime, now: datetime) -> int | None:
    """A config brought by a user becomes the target's next active version (like an applied proposal),
    with a config_change_log row (action ``ingest``). Returns the version, or None when it equals the
    active config or was ingested before (same config, same valid_from): nothing to write."""
    active = active_config_row(conn, target_type, target_id)
    if active is not None and json.loads(active[1]) == json.loads(config_json):
        return None
    same_time = conn.execute(select(configs.c.config_json, configs.c.created_at).where(
        configs.c.target_type == target_type, configs.c.target_id == target_id)).all()
    stamp = valid_from.replace(tzinfo=None) if valid_from.tzinfo else valid_from
    for text_, created in same_time:  # already ingested (same config, same valid_from): a re-sent file
        if created is not None and (created.replace(tzinfo=None) if created.tzinfo else created) == stamp \
                and json.loads(text_) == json.loads(config_json):
            return None
    version = write_config_version(conn, target_type, target_id, config_json, actor, valid_from, None)
    append_change_log(conn, changed_at=now, proposal_id=None, action="ingest", actor=actor, target_type=target_type,
                      target_id=target_id, from_version=active[0] if active else None, to_version=version,
                      before_json=active[1] if active else None, after_json=config_json)
    return version
