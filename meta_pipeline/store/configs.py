"""Row-level SQL of configs and proposals: what the proposal lifecycle's transactions are made of.

Every function takes the caller's open transaction (``MetaStore.write()``), so a
lifecycle step — check, conditional status update, new config version, change-log row —
commits together or not at all. The state machine itself is
``meta_pipeline.governance.lifecycle``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from meta_pipeline.contracts import config_change_log, configs, meta_controller_config_proposals

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
