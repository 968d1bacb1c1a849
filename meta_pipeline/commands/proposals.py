"""`meta-pipeline proposals list|show|approve|reject|apply|revert`: review config proposals.

The same lifecycle functions as the `review_proposal` job in the UI; an illegal
transition (or a proposal that does not exist) prints why and exits 1; a bad argument
(`--by` empty, over 200 characters or with a control character; an unknown `--status`)
exits 2. Errors go through the CLI's one error path (commands/errors.py). A SUPERSEDED
proposal (a newer one for the same target replaced it) says which one in ``show``.
"""

from __future__ import annotations

import argparse
import getpass
import json

import pandas as pd

from meta_pipeline.commands.errors import UserError, check_free_text, command, open_store
from meta_pipeline.governance import lifecycle
from meta_pipeline.store import MetaStore

ACTOR_MAX = 200  # reviewed_by / applied_by / config_change_log.actor: String(200) on every backend
PROPOSAL_ID_MAX = 100  # proposal_id: String(100)


def _store(args: argparse.Namespace) -> MetaStore:
    return open_store(args)


def _proposal_id(args: argparse.Namespace) -> str:
    return check_free_text(args.proposal_id, "PROPOSAL_ID", PROPOSAL_ID_MAX)


def _when(value: object) -> str:
    return "-" if value is None or pd.isna(value) else pd.Timestamp(value).strftime("%Y-%m-%d %H:%M UTC")


@command
def cmd_list(args: argparse.Namespace) -> int:
    if args.status is not None and args.status.strip().upper() not in lifecycle.STATUSES:
        raise UserError(f"--status {args.status!r}", "unknown status",
                        f"use one of {', '.join(s.lower() for s in lifecycle.STATUSES)}")
    status = args.status.strip() if args.status is not None else None
    frame = lifecycle.list_proposals(_store(args), status)
    if frame.empty:
        print("no proposals" + (f" with status {args.status.upper()}" if args.status else ""))
        return 0
    rows = [("ID", "TARGET", "CONFIDENCE", "STATUS", "CREATED")]
    rows += [(r.proposal_id, f"{r.target_type} {r.target_id}", f"{r.confidence:.2f}", r.status, _when(r.created_at))
             for r in frame.itertuples(index=False)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True)
    except (TypeError, ValueError):
        return str(text)


@command
def cmd_show(args: argparse.Namespace) -> int:
    p = lifecycle.get_proposal(_store(args), _proposal_id(args))  # ProposalError: exit 1 (cli.py)
    evidence = json.loads(p["evidence_json"])
    print(f"Proposal {p['proposal_id']} — {p['target_type']} {p['target_id']}")
    print(f"  status      {p['status']} (since {_when(p['status_changed_at'])})"
          + (f", reviewed by {p['reviewed_by']}" if isinstance(p.get("reviewed_by"), str) else ""))
    if isinstance(p.get("applied_by"), str):
        print(f"  applied     {_when(p['applied_at'])} by {p['applied_by']} as config version {int(p['applied_config_version'])}")
    if p["status"] == "SUPERSEDED":
        log = lifecycle.change_log(_store(args), p["proposal_id"])
        newer = [json.loads(a).get("superseded_by") for a in log.loc[log["action"] == "supersede", "after_json"] if a]
        if newer:
            print(f"  superseded  by {newer[-1]} (newer evidence for the same target)")
    print(f"  confidence  {p['confidence']:.2f}")
    print(f"  created     {_when(p['created_at'])}")
    print()
    print("Why:")
    print("  " + p["rationale_text"])
    print()
    print("Change:")
    before, after = json.loads(p["current_config_snapshot_json"]), json.loads(p["proposed_config_json"])
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            print(f"  {key}: {json.dumps(before.get(key), sort_keys=True)} -> {json.dumps(after.get(key), sort_keys=True)}")
    print()
    print("Evidence:")
    for part in evidence.get("parts", []):
        print(f"  - {part['part_key']}: p {part['p_value']:.3g}, q {part['q_value']:.3g}, effect {part['effect']:.3g} "
              f"(factor {part['effect_factor']:.2f}), n {part['n']} (factor {part['sample_factor']:.2f}) "
              f"-> confidence {part['confidence']:.2f}")
    if evidence.get("method"):
        print(f"  method: {evidence['method']}")
    if args.json:
        print()
        print("Snapshot (restored by revert):")
        print(_pretty_json(p["current_config_snapshot_json"]))
        print("Proposed:")
        print(_pretty_json(p["proposed_config_json"]))
        print("Evidence JSON:")
        print(_pretty_json(p["evidence_json"]))
    return 0


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers: the change log still needs an actor
        return "unknown"


@command
def cmd_transition(args: argparse.Namespace) -> int:
    if args.by is not None:
        actor = check_free_text(args.by, "--by", ACTOR_MAX)
    else:
        actor = check_free_text(_login_name(), "the login name (give --by NAME)", ACTOR_MAX)
    proposal_id = _proposal_id(args)
    store = _store(args)
    try:
        result = lifecycle.transition(store, proposal_id, args.action, actor)
    except lifecycle.ProposalError:
        raise  # an illegal transition: exit 1 (cli.py)
    except ValueError as exc:  # the lifecycle's argument checks (e.g. the reserved actor)
        raise UserError(f"--by {actor!r}" if "actor" in str(exc) else None, str(exc)) from exc
    print(result.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("proposals", help="list, show and review config proposals",
                                   description="Review config proposals: list, show, approve, reject, apply, revert.")
    sub = parser.add_subparsers(dest="proposals_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")

    p = sub.add_parser("list", help="proposals as a table (id, target, confidence, status, created)")
    p.add_argument("--status", default=None, help=f"only this status ({', '.join(lifecycle.STATUSES)})")
    common(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one proposal: rationale, change and evidence")
    p.add_argument("proposal_id")
    p.add_argument("--json", action="store_true", help="also print the snapshot, proposed config and evidence JSON")
    common(p)
    p.set_defaults(func=cmd_show)

    for action, text in (("approve", "PENDING -> APPROVED"), ("reject", "PENDING -> REJECTED"),
                         ("apply", "APPROVED -> APPLIED: writes a new configs version"),
                         ("revert", "APPLIED -> REVERTED: restores the snapshot as a new configs version")):
        p = sub.add_parser(action, help=text)
        p.add_argument("proposal_id")
        p.add_argument("--by", default=None, help="who is acting, recorded in the change log: at most 200 characters on one line "
                            "(default: your login name)")
        common(p)
        p.set_defaults(func=cmd_transition, action=action)
