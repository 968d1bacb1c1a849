"""The life of a config proposal: insert, approve, reject, apply, revert, auto-apply.

    PENDING ──approve──▶ APPROVED ──apply──▶ APPLIED ──revert──▶ REVERTED
       │  └──reject───▶ REJECTED                ▲
       ├──────────── auto-apply (policy) ───────┘
       └──a newer proposal for the same target──▶ SUPERSEDED

Every transition is one store transaction:

1. read the proposal; if the action is not allowed from its status, raise ProposalError
   (naming the status and the action) — nothing is written;
2. ``UPDATE … SET status = :new WHERE proposal_id = :id AND status = :expected`` and check
   that exactly one row changed. Two people acting at once both pass step 1, but only
   one UPDATE matches: on SQLite the writers queue on the database lock (BEGIN
   IMMEDIATE); on PostgreSQL the second UPDATE waits on the row lock and then finds the
   status changed. The loser gets ProposalError and its transaction rolls back;
3. apply/revert then write a new ``configs`` version (previous active row deactivated)
   under a per-target lock (PostgreSQL advisory lock; SQLite holds the database lock);
4. append a ``config_change_log`` row (every transition, incl. approve/reject).

Apply refuses a stale proposal (the target's active config is no longer the snapshot
the proposal was made against); revert refuses when the active config is no longer what
the proposal applied (a later change would be clobbered). Both say what to do instead.

Superseding: when a run inserts a proposal for a target (target_type, target_id) that
already has a PENDING proposal with other evidence, the older one becomes SUPERSEDED in
the same transaction (a ``supersede`` row in config_change_log names the newer id), so a
target never has two PENDING proposals and a reviewer always sees the latest evidence.
SUPERSEDED is final.

One proposal run (``run_proposal_cycle``): proposals from the fleet's diagnostics are
generated, inserted (deduplicated) and, when a policy allows it, auto-applied.

No Dagster here: the asset, the review job and the CLI all call these functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from sqlalchemy.engine import Connection

from meta_pipeline.contracts import meta_controller_config_proposals
from meta_pipeline.governance.proposals import (
    PROPOSAL_COLUMNS,
    TARGET_TYPES,
    canonical,
    generate_proposals,
)
from meta_pipeline.store import MetaStore, insert_frame, lock
from meta_pipeline.store import configs as config_rows

PROPOSALS_TABLE = "meta_controller_config_proposals"
STATUSES = ("PENDING", "APPROVED", "REJECTED", "APPLIED", "REVERTED", "SUPERSEDED")
SUPERSEDE_ACTOR = "proposal run"  # who supersedes a PENDING proposal (config_change_log.actor)
# action -> (statuses it may start from, status it leads to)
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "approve": (frozenset({"PENDING"}), "APPROVED"),
    "reject": (frozenset({"PENDING"}), "REJECTED"),
    "apply": (frozenset({"APPROVED"}), "APPLIED"),
    "revert": (frozenset({"APPLIED"}), "REVERTED"),
    "auto_apply": (frozenset({"PENDING"}), "APPLIED"),
}
HUMAN_ACTIONS = ("approve", "reject", "apply", "revert")
AUTO_ACTOR = "AUTO"
MIN_AUTO_CONFIDENCE = 0.5  # the policy may not auto-apply anything below this
_P = meta_controller_config_proposals


class ProposalError(ValueError):
    """An action a proposal's status does not allow (or a proposal that does not exist)."""

    def __init__(self, proposal_id: str, action: str, status: str | None, reason: str | None = None):
        self.proposal_id, self.action, self.status = proposal_id, action, status
        if status is None:
            message = f"proposal {proposal_id!r} does not exist"
        else:
            allowed, _ = TRANSITIONS.get(action, (frozenset(), ""))
            message = (f"cannot {action} proposal {proposal_id}: it is {status}"
                       + (f" ({action} needs {'/'.join(sorted(allowed))})" if allowed and status not in allowed else ""))
        if reason:
            message += f"; {reason}"
        super().__init__(message)


@dataclass(frozen=True)
class AutoApplySettings:
    """Which PENDING proposals may be applied without a person (off by default)."""

    enabled: bool = False
    min_confidence: float = 0.9
    target_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not MIN_AUTO_CONFIDENCE <= self.min_confidence <= 1.0:
            raise ValueError(f"auto-apply min_confidence must be in [{MIN_AUTO_CONFIDENCE}, 1], got {self.min_confidence}")
        unknown = set(self.target_types) - set(TARGET_TYPES)
        if unknown:
            raise ValueError(f"auto-apply target_types {sorted(unknown)} unknown; known: {list(TARGET_TYPES)}")


@dataclass
class TransitionResult:
    proposal_id: str
    action: str
    actor: str
    from_status: str
    to_status: str
    from_version: int | None = None
    to_version: int | None = None

    def summary(self) -> str:
        text_ = f"{self.proposal_id}: {self.from_status} -> {self.to_status} by {self.actor}"
        if self.to_version is not None:
            text_ += f" (config version {self.from_version or '-'} -> {self.to_version})"
        return text_


@dataclass
class InsertReport:
    inserted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # evidence hashes already PENDING
    superseded: list[str] = field(default_factory=list)  # PENDING proposals a newer one for their target replaced


def _race_window(proposal_id: str) -> None:
    """Between the status check and the conditional UPDATE. A no-op; tests replace it to
    hold two transactions here at once and prove the UPDATE, not the check, decides."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------
# reads
# ---------------------------------------------------------------------------


def list_proposals(store: MetaStore, status: str | None = None) -> pd.DataFrame:
    if status is not None and status.upper() not in STATUSES:
        raise ValueError(f"unknown status {status!r}; known: {', '.join(STATUSES)}")
    equals = {"status": status.upper()} if status else None
    return store.read(PROPOSALS_TABLE, equals=equals, order_by=["created_at", "proposal_id"])


def get_proposal(store: MetaStore, proposal_id: str) -> dict[str, Any]:
    rows = store.read(PROPOSALS_TABLE, equals={"proposal_id": proposal_id})
    if rows.empty:
        raise ProposalError(proposal_id, "show", None)
    return rows.iloc[0].to_dict()


def change_log(store: MetaStore, proposal_id: str | None = None) -> pd.DataFrame:
    equals = {"proposal_id": proposal_id} if proposal_id else None
    return store.read("config_change_log", equals=equals, order_by="id")


def active_config(store: MetaStore, target_type: str, target_id: str) -> tuple[int, dict] | None:
    """(version, config) of the target's active configs row, or None."""
    return store.active_config(target_type, target_id)


def active_configs(store: MetaStore) -> dict[tuple[str, str], dict]:
    return store.active_configs()


# ---------------------------------------------------------------------------
# insert (dedupe by evidence hash among PENDING)
# ---------------------------------------------------------------------------

_ID_RE = re.compile(r"^P(\d+)$")


def insert_proposals(store: MetaStore, proposals: pd.DataFrame, now: datetime | None = None) -> InsertReport:
    """Insert new PENDING proposals; one whose evidence_hash is already PENDING is skipped, and a target's
    older PENDING proposal (other evidence) becomes SUPERSEDED."""
    report = InsertReport()
    if proposals is None or proposals.empty:
        return report
    missing = set(PROPOSAL_COLUMNS) - set(proposals.columns)
    if missing:
        raise ValueError(f"proposals lack column(s) {sorted(missing)}")
    bad_conf = ~proposals["confidence"].between(0.0, 1.0)
    if bad_conf.any():
        raise ValueError(f"confidence outside [0, 1] for {int(bad_conf.sum())} proposal(s)")
    now = now or _now()
    with store.write() as conn:
        lock(conn, "meta_controller_config_proposals:insert")  # two proposal runs never interleave
        pending = config_rows.pending_evidence_hashes(conn)
        fresh = proposals[~proposals["evidence_hash"].isin(pending)].drop_duplicates("evidence_hash")
        report.duplicates = sorted(set(proposals["evidence_hash"]) - set(fresh["evidence_hash"]))
        if fresh.empty:
            return report
        ids = [m.group(1) for m in map(_ID_RE.match, config_rows.proposal_ids(conn)) if m]
        start = max((int(i) for i in ids), default=0) + 1
        frame = fresh[PROPOSAL_COLUMNS].copy()
        frame.insert(0, "proposal_id", [f"P{start + i:06d}" for i in range(len(frame))])
        frame["created_at"] = now
        frame["status"] = "PENDING"
        frame["status_changed_at"] = now
        for row in frame.itertuples(index=False):
            for old_id in config_rows.pending_for_target(conn, row.target_type, row.target_id):
                if config_rows.update_proposal_if(conn, old_id, "PENDING", {"status": "SUPERSEDED",
                                                                             "status_changed_at": now}) == 1:
                    config_rows.append_change_log(
                        conn, changed_at=now, proposal_id=old_id, action="supersede", actor=SUPERSEDE_ACTOR,
                        target_type=row.target_type, target_id=row.target_id, from_version=None, to_version=None,
                        before_json=None, after_json=json.dumps({"superseded_by": row.proposal_id}))
                    report.superseded.append(old_id)
        insert_frame(conn, _P, frame)
        report.inserted = frame["proposal_id"].tolist()
    return report


# ---------------------------------------------------------------------------
# transitions
# ---------------------------------------------------------------------------


def transition(store: MetaStore, proposal_id: str, action: str, actor: str) -> TransitionResult:
    """Run one lifecycle action in one transaction (see module doc). Raises ProposalError if illegal."""
    if action not in TRANSITIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(TRANSITIONS)}")
    actor = (actor or "").strip()
    if not actor:
        raise ValueError("an actor (--by NAME) is required")
    if (action == "auto_apply") != (actor.upper() == AUTO_ACTOR):
        raise ValueError(f"actor {AUTO_ACTOR!r} is reserved for the auto-apply policy, and auto_apply is done only by it")
    allowed, new_status = TRANSITIONS[action]
    with store.write() as conn:
        row = config_rows.proposal_row(conn, proposal_id)
        if row is None:
            raise ProposalError(proposal_id, action, None)
        if row["status"] not in allowed:
            raise ProposalError(proposal_id, action, row["status"])
        _race_window(proposal_id)
        now = _now()
        values: dict[str, Any] = {"status": new_status, "status_changed_at": now}
        if action in ("approve", "reject", "auto_apply"):
            values["reviewed_by"] = actor
        changed = config_rows.update_proposal_if(conn, proposal_id, row["status"], values)
        if changed != 1:  # someone else moved it between our read and our update
            current = config_rows.proposal_status(conn, proposal_id)
            raise ProposalError(proposal_id, action, current, "changed concurrently by someone else")
        result = TransitionResult(proposal_id, action, actor, row["status"], new_status)
        before = after = None
        if action in ("apply", "auto_apply"):
            result.from_version, result.to_version, before, after = _apply_config(conn, row, actor, now)
            config_rows.update_proposal(conn, proposal_id, {
                "applied_at": now, "applied_by": actor, "applied_config_version": result.to_version})
        elif action == "revert":
            result.from_version, result.to_version, before, after = _revert_config(conn, row, actor, now)
        config_rows.append_change_log(
            conn, changed_at=now, proposal_id=proposal_id, action=action, actor=actor, target_type=row["target_type"],
            target_id=row["target_id"], from_version=result.from_version, to_version=result.to_version,
            before_json=before, after_json=after)
    return result


def _write_version(conn: Connection, row: Mapping, config_json: str, actor: str, now: datetime) -> int:
    return config_rows.write_config_version(conn, row["target_type"], row["target_id"], config_json, actor, now,
                                            row["proposal_id"])


def _apply_config(conn: Connection, row: Mapping, actor: str, now: datetime) -> tuple[int | None, int, str, str]:
    tt, tid = row["target_type"], row["target_id"]
    lock(conn, f"configs:{tt}:{tid}")
    active = config_rows.active_config_row(conn, tt, tid)
    snapshot = json.loads(row["current_config_snapshot_json"])
    if active is not None and canonical(json.loads(active[1])) != canonical(snapshot):
        raise ProposalError(row["proposal_id"], "apply", row["status"],
                            f"stale: {tt} {tid} is now at config version {active[0]}, which differs from the "
                            "snapshot this proposal was made against; reject it and let the next run re-propose")
    before = active[1] if active is not None else row["current_config_snapshot_json"]
    version = _write_version(conn, row, row["proposed_config_json"], actor, now)
    return (active[0] if active else None), version, before, row["proposed_config_json"]


def _revert_config(conn: Connection, row: Mapping, actor: str, now: datetime) -> tuple[int, int, str, str]:
    tt, tid = row["target_type"], row["target_id"]
    lock(conn, f"configs:{tt}:{tid}")
    active = config_rows.active_config_row(conn, tt, tid)
    applied = row["applied_config_version"]
    # safe when what is active is what this proposal applied (that version, or a later one equal to it)
    unchanged = active is not None and (
        active[0] == applied or canonical(json.loads(active[1])) == canonical(json.loads(row["proposed_config_json"])))
    if not unchanged:
        now_at = "no active version" if active is None else f"version {active[0]} is active"
        raise ProposalError(row["proposal_id"], "revert", row["status"],
                            f"{tt} {tid}: {now_at} and differs from version {applied} that this proposal applied; "
                            "revert the later change first")
    # the snapshot text itself, byte for byte: revert restores exactly what was there
    version = _write_version(conn, row, row["current_config_snapshot_json"], actor, now)
    return active[0], version, active[1], row["current_config_snapshot_json"]


def approve(store: MetaStore, proposal_id: str, by: str) -> TransitionResult:
    return transition(store, proposal_id, "approve", by)


def reject(store: MetaStore, proposal_id: str, by: str) -> TransitionResult:
    return transition(store, proposal_id, "reject", by)


def apply(store: MetaStore, proposal_id: str, by: str) -> TransitionResult:
    return transition(store, proposal_id, "apply", by)


def revert(store: MetaStore, proposal_id: str, by: str) -> TransitionResult:
    return transition(store, proposal_id, "revert", by)


def auto_apply(store: MetaStore, policy: AutoApplySettings, proposal_ids: Iterable[str] | None = None
               ) -> tuple[list[TransitionResult], list[str]]:
    """Apply PENDING proposals the policy allows (applied_by = AUTO); returns (applied, skipped messages)."""
    if not policy.enabled or not policy.target_types:
        return [], []
    pending = list_proposals(store, "PENDING")
    if proposal_ids is not None:
        pending = pending[pending["proposal_id"].isin(list(proposal_ids))]
    eligible = pending[(pending["confidence"] >= policy.min_confidence) & pending["target_type"].isin(policy.target_types)]
    applied, skipped = [], []
    for pid in eligible.sort_values("confidence", ascending=False)["proposal_id"]:
        try:
            applied.append(transition(store, pid, "auto_apply", AUTO_ACTOR))
        except ProposalError as exc:  # e.g. stale after a stronger proposal for the same target was applied
            skipped.append(str(exc))
    return applied, skipped


# ---------------------------------------------------------------------------
# one proposal run
# ---------------------------------------------------------------------------


@dataclass
class ProposalCycleReport:
    """What one proposal run did (``run_proposal_cycle``)."""

    domains: list[str]  # domains with diagnostics rows
    candidates: pd.DataFrame  # every scored test (generate_proposals)
    proposals: pd.DataFrame  # proposals generated from them
    inserted: list[str]  # proposal ids inserted as PENDING
    duplicates: list[str]  # evidence hashes already PENDING: skipped
    superseded: list[str]  # older PENDING proposals of the same targets, now SUPERSEDED
    applied: list[TransitionResult]  # auto-applied by the policy
    skipped: list[str]  # why an allowed proposal was not auto-applied
    new_proposals: pd.DataFrame  # the rows inserted by this run, with their status after auto-apply
    pending: pd.DataFrame  # every PENDING proposal after the run

    def top_candidates(self, n: int = 15) -> pd.DataFrame:
        return self.candidates.sort_values("confidence", ascending=False).head(n) if len(self.candidates) \
            else self.candidates


def run_proposal_cycle(store: MetaStore, diagnostics: pd.DataFrame, policy: AutoApplySettings) -> ProposalCycleReport:
    """Generate proposals from every domain's diagnostics, insert them as PENDING
    (``insert_proposals``), then auto-apply what ``policy`` allows (``auto_apply``).

    Snapshots are each target's active config, or for a domain's META_KNOBS without one
    the knobs in effect (``MetaStore.knobs_in_effect``).
    """
    domains = sorted(diagnostics["domain"].unique()) if len(diagnostics) else []
    current_knobs = {d: store.knobs_in_effect(d).values for d in domains}
    proposals, candidates = generate_proposals(diagnostics, store.active_configs(), current_knobs=current_knobs)
    report = insert_proposals(store, proposals)
    applied, skipped = auto_apply(store, policy)
    every = list_proposals(store)
    return ProposalCycleReport(
        domains=domains, candidates=candidates, proposals=proposals, inserted=report.inserted,
        duplicates=report.duplicates, superseded=report.superseded, applied=applied, skipped=skipped,
        new_proposals=every[every["proposal_id"].isin(report.inserted)],
        pending=every[every["status"] == "PENDING"].reset_index(drop=True),
    )
