"""The proposal state machine: every legal and illegal transition, configs versions and the
change log, revert to the exact snapshot, concurrency on SQLite and PostgreSQL, the CLI."""

from __future__ import annotations

import argparse
import json
import threading

import pandas as pd
import pytest

from meta_pipeline.commands import proposals as proposals_cmd
from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.lifecycle import ProposalError
from meta_pipeline.governance.proposals import canonical_json
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.support.proposals import PROPOSED, SNAPSHOT, proposal_frame


def new_proposal(store: MetaStore, **kw) -> str:
    report = lifecycle.insert_proposals(store, proposal_frame(**kw))
    assert len(report.inserted) == 1
    return report.inserted[0]


def state(store: MetaStore) -> tuple:
    """Everything a transition may touch, for 'nothing changed' checks."""
    return (lifecycle.list_proposals(store).to_json(date_format="iso"), store.read("configs").to_json(date_format="iso"),
            store.read("config_change_log").to_json(date_format="iso"))


def to_status(store: MetaStore, pid: str, status: str) -> None:
    if status == "SUPERSEDED":  # a newer proposal for the same target (other evidence) supersedes it
        target = lifecycle.get_proposal(store, pid)
        lifecycle.insert_proposals(store, proposal_frame(target_id=target["target_id"], part=f"newer:{pid}"))
    path = {"PENDING": [], "APPROVED": ["approve"], "REJECTED": ["reject"], "APPLIED": ["approve", "apply"],
            "REVERTED": ["approve", "apply", "revert"], "SUPERSEDED": []}[status]
    for action in path:
        lifecycle.transition(store, pid, action, "ann")
    assert lifecycle.get_proposal(store, pid)["status"] == status


# ---------------------------------------------------------------------------
# legal paths
# ---------------------------------------------------------------------------


def test_approve_apply_revert_writes_versions_and_restores_the_exact_snapshot(store):
    pid = new_proposal(store)
    r = lifecycle.approve(store, pid, "ann")
    assert (r.from_status, r.to_status) == ("PENDING", "APPROVED")
    r = lifecycle.apply(store, pid, "bob")
    assert (r.from_status, r.to_status, r.from_version, r.to_version) == ("APPROVED", "APPLIED", None, 1)
    assert lifecycle.active_config(store, "STRATEGY_CONFIG", "d1/beta") == (1, PROPOSED)
    p = lifecycle.get_proposal(store, pid)
    assert p["applied_by"] == "bob" and p["applied_config_version"] == 1 and p["reviewed_by"] == "ann"

    r = lifecycle.revert(store, pid, "cy")
    assert (r.to_status, r.from_version, r.to_version) == ("REVERTED", 1, 2)
    configs = store.read("configs", order_by="version")
    assert list(configs["version"]) == [1, 2] and list(configs["active"]) == [False, True]
    # revert restores the snapshot byte for byte, as a NEW version
    assert configs["config_json"].iloc[1] == p["current_config_snapshot_json"]
    assert json.loads(configs["config_json"].iloc[1]) == SNAPSHOT
    assert list(configs["created_by"]) == ["bob", "cy"] and set(configs["proposal_id"]) == {pid}

    log = lifecycle.change_log(store, pid)
    assert list(log["action"]) == ["approve", "apply", "revert"]
    assert list(log["actor"]) == ["ann", "bob", "cy"]
    assert log["from_version"].isna().tolist() == [True, True, False]
    assert log["to_version"].tolist()[1:] == [1, 2]
    assert json.loads(log["before_json"].iloc[1]) == SNAPSHOT and json.loads(log["after_json"].iloc[1]) == PROPOSED
    assert json.loads(log["before_json"].iloc[2]) == PROPOSED and json.loads(log["after_json"].iloc[2]) == SNAPSHOT
    assert (log["target_type"] == "STRATEGY_CONFIG").all() and (log["target_id"] == "d1/beta").all()


def test_apply_on_top_of_an_existing_config_deactivates_it(store):
    first = new_proposal(store)
    to_status(store, first, "APPLIED")
    # a later proposal made against the now-active config
    later = {"strategy_id": "beta", "regime_weights": {"S0": 1.0, "S1": 0.3, "S2": 1.0}}
    second = new_proposal(store, snapshot=PROPOSED, proposed=later, part="shortfall:S1b")
    to_status(store, second, "APPLIED")
    configs = store.read("configs", order_by="version")
    assert list(configs["version"]) == [1, 2] and list(configs["active"]) == [False, True]
    assert lifecycle.change_log(store, second).iloc[-1]["from_version"] == 1
    # reverting the first now would clobber the second: refused, nothing changes
    before = state(store)
    with pytest.raises(ProposalError, match="version 2 is active"):
        lifecycle.revert(store, first, "ann")
    assert state(store) == before
    # revert in order works
    lifecycle.revert(store, second, "ann")
    lifecycle.revert(store, first, "ann")
    assert lifecycle.active_config(store, "STRATEGY_CONFIG", "d1/beta") == (4, SNAPSHOT)


def test_reject_and_reinsert_same_evidence(store):
    pid = new_proposal(store)
    dup = lifecycle.insert_proposals(store, proposal_frame())
    assert dup.inserted == [] and len(dup.duplicates) == 1
    lifecycle.reject(store, pid, "ann")
    assert lifecycle.get_proposal(store, pid)["status"] == "REJECTED"
    assert store.count("configs") == 0
    # once no longer PENDING the same evidence may be proposed again (a new id)
    again = lifecycle.insert_proposals(store, proposal_frame())
    assert again.inserted and again.inserted[0] != pid


def test_stale_apply_is_refused_and_changes_nothing(store):
    a = new_proposal(store)
    to_status(store, a, "APPLIED")
    # made against the snapshot a replaced (e.g. inserted by a run that read the configs before a was applied)
    b = new_proposal(store, proposed={"strategy_id": "beta", "regime_weights": {"S0": 0.5, "S1": 1.0, "S2": 1.0}},
                     part="shortfall:S0")
    lifecycle.approve(store, b, "ann")
    before = state(store)
    with pytest.raises(ProposalError, match="stale"):
        lifecycle.apply(store, b, "ann")
    assert state(store) == before
    assert lifecycle.get_proposal(store, b)["status"] == "APPROVED"


def test_a_newer_proposal_for_a_target_supersedes_its_pending_one(store):
    old = new_proposal(store)
    other_target = new_proposal(store, target_id="d1/gamma", part="shortfall:S1g")
    newer = lifecycle.insert_proposals(store, proposal_frame(part="peers:S1"))
    assert newer.superseded == [old] and len(newer.inserted) == 1
    rows = lifecycle.list_proposals(store).set_index("proposal_id")
    assert rows.loc[old, "status"] == "SUPERSEDED" and rows.loc[newer.inserted[0], "status"] == "PENDING"
    assert rows.loc[other_target, "status"] == "PENDING"  # another target is left alone
    log = lifecycle.change_log(store, old)
    assert list(log["action"]) == ["supersede"] and log["actor"].iloc[0] == lifecycle.SUPERSEDE_ACTOR
    assert json.loads(log["after_json"].iloc[0]) == {"superseded_by": newer.inserted[0]}
    # the same evidence again is a duplicate, not a supersede
    again = lifecycle.insert_proposals(store, proposal_frame(part="peers:S1"))
    assert again.inserted == [] and again.superseded == [] and len(again.duplicates) == 1
    assert len(lifecycle.list_proposals(store, "SUPERSEDED")) == 1


# ---------------------------------------------------------------------------
# illegal transitions: every (status, action) pair not in the table
# ---------------------------------------------------------------------------

ILLEGAL = [(status, action) for status in lifecycle.STATUSES for action in lifecycle.TRANSITIONS
           if status not in lifecycle.TRANSITIONS[action][0]]


@pytest.mark.parametrize(("status", "action"), ILLEGAL)
def test_illegal_transition_raises_and_changes_nothing(store, status, action):
    pid = new_proposal(store)
    to_status(store, pid, status)
    before = state(store)
    actor = lifecycle.AUTO_ACTOR if action == "auto_apply" else "mallory"
    with pytest.raises(ProposalError) as err:
        lifecycle.transition(store, pid, action, actor)
    assert isinstance(err.value, ValueError)
    assert status in str(err.value) and action in str(err.value)
    assert err.value.status == status and err.value.action == action
    assert state(store) == before


def test_legal_table_is_exactly_the_design():
    legal = {(s, a) for s in lifecycle.STATUSES for a in lifecycle.TRANSITIONS if (s, a) not in ILLEGAL}
    assert legal == {("PENDING", "approve"), ("PENDING", "reject"), ("APPROVED", "apply"), ("APPLIED", "revert"),
                     ("PENDING", "auto_apply")}


def test_unknown_proposal_action_and_actor_are_rejected(store):
    with pytest.raises(ProposalError, match="does not exist"):
        lifecycle.approve(store, "P999999", "ann")
    pid = new_proposal(store)
    before = state(store)
    with pytest.raises(ValueError, match="unknown action"):
        lifecycle.transition(store, pid, "delete", "ann")
    with pytest.raises(ValueError, match="actor"):
        lifecycle.approve(store, pid, "  ")
    with pytest.raises(ValueError, match="reserved"):
        lifecycle.approve(store, pid, "AUTO")
    with pytest.raises(ValueError, match="reserved"):
        lifecycle.transition(store, pid, "auto_apply", "mallory")
    assert state(store) == before


def test_bad_proposal_rows_are_rejected_whole(store):
    good = proposal_frame()
    bad = proposal_frame(target_id="d2/beta", confidence=1.5)
    with pytest.raises(ValueError, match="confidence"):
        lifecycle.insert_proposals(store, pd.concat([good, bad], ignore_index=True))
    with pytest.raises(ValueError, match="lack"):
        lifecycle.insert_proposals(store, good.drop(columns=["evidence_hash"]))
    assert store.count("meta_controller_config_proposals") == 0


# ---------------------------------------------------------------------------
# auto-apply
# ---------------------------------------------------------------------------


def test_auto_apply_policy(store):
    strong = new_proposal(store, confidence=0.95)
    weak = new_proposal(store, target_id="d2/beta", confidence=0.6)
    knobs = new_proposal(store, target_id="d3", target_type="META_KNOBS", confidence=0.99, snapshot={"tau": 0.95},
                         proposed={"tau": 0.9}, part="knob:tau")
    assert lifecycle.auto_apply(store, lifecycle.AutoApplySettings()) == ([], [])  # off by default
    assert lifecycle.auto_apply(store, lifecycle.AutoApplySettings(enabled=True)) == ([], [])  # empty allow-list
    applied, skipped = lifecycle.auto_apply(
        store, lifecycle.AutoApplySettings(enabled=True, min_confidence=0.9, target_types=("STRATEGY_CONFIG",)))
    assert [r.proposal_id for r in applied] == [strong] and skipped == []
    rows = lifecycle.list_proposals(store).set_index("proposal_id")
    assert rows.loc[strong, "status"] == "APPLIED" and rows.loc[strong, "applied_by"] == "AUTO"
    assert rows.loc[weak, "status"] == "PENDING" and rows.loc[knobs, "status"] == "PENDING"
    log = lifecycle.change_log(store)
    assert list(log["action"]) == ["auto_apply"] and list(log["actor"]) == ["AUTO"]
    # an auto-applied proposal is reverted like any other
    lifecycle.revert(store, strong, "ann")
    assert lifecycle.active_config(store, "STRATEGY_CONFIG", "d1/beta")[1] == SNAPSHOT


# ---------------------------------------------------------------------------
# concurrency: two people act on one proposal at once
# ---------------------------------------------------------------------------


def _race(store: MetaStore, pid: str, action: str, n: int = 2) -> tuple[list, list]:
    barrier = threading.Barrier(n)
    wins, errors = [], []

    def act(name: str) -> None:
        barrier.wait()
        try:
            wins.append(lifecycle.transition(store, pid, action, name))
        except ProposalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=act, args=(f"user{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return wins, errors


def test_concurrent_approval_sqlite_threads(store):
    for _ in range(5):
        pid = new_proposal(store, target_id=f"d{_}/beta")
        wins, errors = _race(store, pid, "approve")
        assert len(wins) == 1 and len(errors) == 1
        assert errors[0].status == "APPROVED"
        assert len(lifecycle.change_log(store, pid)) == 1
    # two appliers of one APPROVED proposal: one config version, one log row
    pid = new_proposal(store, target_id="dx/beta")
    lifecycle.approve(store, pid, "ann")
    wins, errors = _race(store, pid, "apply")
    assert len(wins) == 1 and len(errors) == 1
    assert store.read("configs", equals={"target_id": "dx/beta"})["version"].tolist() == [1]
    assert list(lifecycle.change_log(store, pid)["action"]) == ["approve", "apply"]


def _hold_both_in_race_window(monkeypatch, n: int = 2) -> None:
    """Make both transactions pass the status check before either UPDATE runs."""
    barrier = threading.Barrier(n, timeout=30)
    monkeypatch.setattr(lifecycle, "_race_window", lambda pid: barrier.wait())


def test_concurrent_approval_postgresql(pg_store, monkeypatch):
    _hold_both_in_race_window(monkeypatch)
    pid = new_proposal(pg_store)
    wins, errors = _race(pg_store, pid, "approve")
    assert len(wins) == 1 and len(errors) == 1
    # both saw PENDING; the conditional UPDATE decided
    assert "changed concurrently" in str(errors[0]) and errors[0].status == "APPROVED"
    assert lifecycle.get_proposal(pg_store, pid)["reviewed_by"] == wins[0].actor
    assert len(lifecycle.change_log(pg_store, pid)) == 1


def test_concurrent_apply_postgresql(pg_store, monkeypatch):
    pid = new_proposal(pg_store)
    lifecycle.approve(pg_store, pid, "ann")
    _hold_both_in_race_window(monkeypatch)
    wins, errors = _race(pg_store, pid, "apply")
    assert len(wins) == 1 and len(errors) == 1 and "changed concurrently" in str(errors[0])
    configs = pg_store.read("configs")
    assert configs["version"].tolist() == [1] and configs["active"].tolist() == [True]
    assert list(lifecycle.change_log(pg_store, pid)["action"]) == ["approve", "apply"]
    monkeypatch.undo()  # back to one actor at a time
    lifecycle.revert(pg_store, pid, "ann")
    assert pg_store.read("configs", equals={"active": True})["config_json"].iloc[0] == canonical_json(SNAPSHOT)


# ---------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meta-pipeline")
    proposals_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_review_flow(sqlite_url, store, capsys):
    pid = new_proposal(store)
    db = ["--db-url", sqlite_url]
    assert _cli(["proposals", "list", *db]) == 0
    out = capsys.readouterr().out
    assert "ID" in out and pid in out and "STRATEGY_CONFIG d1/beta" in out and "0.80" in out and "PENDING" in out
    assert _cli(["proposals", "show", pid, *db]) == 0
    out = capsys.readouterr().out
    assert "beta falls short" in out and "regime_weights" in out and "0.6" in out
    assert _cli(["proposals", "apply", pid, "--by", "ann", *db]) == 1
    err = capsys.readouterr().err
    assert "cannot apply" in err and "PENDING" in err
    assert _cli(["proposals", "approve", pid, "--by", "ann", *db]) == 0
    assert _cli(["proposals", "apply", pid, "--by", "ann", *db]) == 0
    assert "config version - -> 1" in capsys.readouterr().out
    assert _cli(["proposals", "apply", pid, "--by", "ann", *db]) == 1
    assert _cli(["proposals", "revert", pid, "--by", "bob", *db]) == 0
    assert _cli(["proposals", "list", "--status", "reverted", *db]) == 0
    assert pid in capsys.readouterr().out
    assert _cli(["proposals", "list", "--status", "nope", *db]) == 2
    assert _cli(["proposals", "show", "P404", *db]) == 1
    assert list(lifecycle.change_log(store, pid)["action"]) == ["approve", "apply", "revert"]


def test_review_job_fails_clearly_on_illegal_action(store):
    import dagster as dg

    from meta_pipeline.defs.governance.orchestrator import review_proposal

    pid = new_proposal(store)

    def run(action: str):
        return review_proposal.execute_in_process(
            run_config={"ops": {"review_proposal_op": {"config": {"proposal_id": pid, "action": action, "by": "ann"}}}},
            resources={"store": store}, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)

    assert run("approve").success
    bad = run("revert")
    assert not bad.success
    failure = [e for e in bad.all_events if e.is_step_failure][0]
    assert "cannot revert" in failure.step_failure_data.error.message
    assert run("apply").success
    assert lifecycle.get_proposal(store, pid)["status"] == "APPLIED"
    assert list(lifecycle.change_log(store, pid)["action"]) == ["approve", "apply"]
