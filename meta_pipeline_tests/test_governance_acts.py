"""Every proposal type has a consumer: approve → apply changes what the consumer does → revert
restores it; an applied proposal is not proposed again on the same evidence; expired edges."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.contracts import lesson_key
from meta_pipeline.defs.governance.orchestrator import _read_inputs
from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.diagnostics import compute_diagnostics
from meta_pipeline.ingest import ingest_file
from meta_pipeline.knobs import default_knobs
from meta_pipeline.lab import synth
from meta_pipeline.lab.governance_fleets import GovernanceFleetConfig, governance_fleet
from meta_pipeline.learning.predict import predict_trades
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.support.frames import load_fleet

OFF = lifecycle.AutoApplySettings()


def _pipeline(store: MetaStore, domains: list[str]) -> lifecycle.ProposalCycleReport:
    """diagnostics for every domain (what the asset computes) and one proposal run."""
    for domain in domains:
        store.replace_partition("diagnostics", domain, compute_diagnostics(_read_inputs(store, domain)).rows)
    return lifecycle.run_proposal_cycle(store, store.read("diagnostics"), OFF)


def _round_trip(store: MetaStore, proposal_id: str) -> None:
    lifecycle.approve(store, proposal_id, "ann")
    lifecycle.apply(store, proposal_id, "bob")


# ---------------------------------------------------------------------------
# STRATEGY_CONFIG: consumed as the strategy weights engines size by (predict --strategy-weights)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_fleet():
    return governance_fleet(GovernanceFleetConfig(n_domains=2, n_trades=3000, seed=5))


def test_strategy_config_round_trip_and_no_repeat_on_the_same_evidence(tmp_path: Path, planted_fleet) -> None:
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'meta.db'}")
    for name, data in planted_fleet.items():
        assert ingest_file(store, "trades", data.write_trades_file(tmp_path / name / "trades.csv"), name).ingested == 3000
    run = _pipeline(store, list(planted_fleet))
    top = run.new_proposals.sort_values("confidence", ascending=False).iloc[0]
    assert (top["target_type"], top["target_id"]) == ("STRATEGY_CONFIG", "dom0/gamma") and top["confidence"] >= 0.7
    proposed_weight = json.loads(top["proposed_config_json"])["regime_weights"]["range"]
    assert 0.25 <= proposed_weight <= 0.9

    trades = planted_fleet["dom0"].contract_frame()
    cell = ((trades["strategy_id"] == "gamma") & (trades["regime"] == "range")).to_numpy()
    before = predict_trades(store, "dom0", trades, with_weights=True)
    assert (before["strategy_weight"] == 1.0).all()

    _round_trip(store, top["proposal_id"])
    applied = predict_trades(store, "dom0", trades, with_weights=True)
    np.testing.assert_allclose(applied["strategy_weight"].to_numpy()[cell], proposed_weight)
    np.testing.assert_allclose(applied["strategy_weight"].to_numpy()[~cell], 1.0)

    # the pipeline re-runs on the same evidence: the applied cut is not proposed again (nor compounded)
    rerun = _pipeline(store, list(planted_fleet))
    assert not (rerun.proposals["target_id"] == "dom0/gamma").any(), rerun.proposals[["target_id", "confidence"]]
    assert rerun.inserted == []

    lifecycle.revert(store, top["proposal_id"], "cy")
    reverted = predict_trades(store, "dom0", trades, with_weights=True)
    assert (reverted["strategy_weight"] == 1.0).all()


# ---------------------------------------------------------------------------
# META_KNOBS: consumed through the knobs in effect (learning assets, predict, controller)
# ---------------------------------------------------------------------------


def test_meta_knobs_round_trip_changes_the_knobs_in_effect(store: MetaStore) -> None:
    row = {"domain": "d", "section": "knob_best_region", "subject": "tau", "metric": "predicted_reward_gain",
           "value": 0.05, "ci_low": 0.04, "ci_high": 0.06, "n": 500, "p_value": 1e-9,
           "details_json": json.dumps({"knob": "tau", "current": 0.95, "proposed": 0.9, "importance_p": 1e-4})}
    run = lifecycle.run_proposal_cycle(store, pd.DataFrame([row]), OFF)
    (pid,) = run.inserted
    assert store.knobs_in_effect("d").values["tau"] == default_knobs()["tau"]
    _round_trip(store, pid)
    in_effect = store.knobs_in_effect("d")
    assert in_effect.values["tau"] == pytest.approx(0.9) and in_effect.source == "configs v1"
    # re-run on the same evidence: tau is already 0.9, nothing to propose
    assert lifecycle.run_proposal_cycle(store, pd.DataFrame([row]), OFF).inserted == []
    lifecycle.revert(store, pid, "cy")
    assert store.knobs_in_effect("d").values["tau"] == pytest.approx(default_knobs()["tau"])


# ---------------------------------------------------------------------------
# PM_OVERRIDES: consumed by the lessons asset (min_support, max_scope_dims)
# ---------------------------------------------------------------------------


def _lessons_run(store: MetaStore, instance) -> tuple[int, str, int]:
    from meta_pipeline.defs.learning.assets import lessons

    result = dg.materialize([lessons], partition_key="dom0", instance=instance, resources={"store": store})
    assert result.success
    meta = result.asset_materializations_for_node("lessons")[0].metadata
    mined = store.read("learning_lessons", domain="dom0")
    return len(mined), meta["mining_settings"].value, int(mined["n"].min())


def test_pm_overrides_round_trip_changes_what_the_lessons_asset_mines(store: MetaStore) -> None:
    fleet = synth.generate_fleet(synth.FleetConfig(n_domains=1, seed=2, n_trades=1500, telemetry_ticks=10))
    load_fleet(store, fleet)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", ["dom0"])
    n_default, settings, smallest = _lessons_run(store, instance)
    assert settings == "min_support 30, max_scope_dims 2 (defaults)" and smallest >= 30

    churn = {"domain": "dom0", "section": "override_churn", "subject": "all", "metric": "churn", "value": 0.75,
             "ci_low": None, "ci_high": None, "n": 40, "p_value": None,
             "details_json": json.dumps({"n_added": 15, "n_removed": 15})}
    (pid,) = lifecycle.run_proposal_cycle(store, pd.DataFrame([churn]), OFF).inserted
    _round_trip(store, pid)
    n_applied, settings, smallest = _lessons_run(store, instance)
    assert settings == "min_support 55, max_scope_dims 2 (configs v1)"
    assert smallest >= 55 and n_applied < n_default  # fewer, better supported lessons
    assert lifecycle.run_proposal_cycle(store, pd.DataFrame([churn]), OFF).inserted == []  # not again

    lifecycle.revert(store, pid, "cy")
    n_reverted, settings, _ = _lessons_run(store, instance)
    assert n_reverted == n_default and settings.startswith("min_support 30, max_scope_dims 2")


# ---------------------------------------------------------------------------
# edges expire: predict honours valid_until against each trade's closed_at
# ---------------------------------------------------------------------------


def test_predict_skips_an_override_past_its_valid_until(tmp_path: Path) -> None:
    until = pd.Timestamp("2026-06-10", tz="UTC")
    overrides = pd.DataFrame([{
        "latent_factor_id": "F1", "lesson_key": lesson_key("A.x", {}), "pattern": "A.x", "scope_json": "{}",
        "n_scope_keys": 0, "regime": None, "edge": 0.3, "support": 50, "valid_until": until, "source_json": None}])
    trades = pd.DataFrame({
        "trade_id": ["early", "late", "other"], "closed_at": ["2026-06-09T00:00:00Z", "2026-06-11T00:00:00Z",
                                                             "2026-06-11T00:00:00Z"],
        "regime": "R", "strategy_id": "s", "return_r": "0", "patterns": ["A.x", "A.x", "B.y"]})
    out = predict_trades({"overrides": overrides, "regime_weights": None, "tier2_enabled": False}, "d", trades)
    assert dict(zip(out["trade_id"], out["edge"])) == {"early": 0.3, "late": 0.0, "other": 0.0}
    assert out.attrs["n_expired"] == 1

    # through the CLI: the count goes to stderr, the CSV to stdout
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'm.db'}")
    store.append("pm_overrides", overrides.assign(domain="d", version=1))
    path = tmp_path / "t.csv"
    trades.to_csv(path, index=False)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "meta_pipeline.cli", "predict", str(path), "--domain", "d",
                           "--db-url", store.db_url], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "trade_id,edge" and "late,0" in done.stdout
    assert "1 trade(s) closed after the valid_until" in done.stderr


# ---------------------------------------------------------------------------
# inputs a user brings: backtests and configs, validated and quarantined like trades
# ---------------------------------------------------------------------------

BACKTESTS = """run_id,strategy_id,regime,started_at,mean_return_r,std_return_r,n_trades,metric.sharpe,extra
r1,alpha,trend,2026-05-01T00:00:00Z,0.10,1.0,400,0.1,x
r2,alpha,,2026-05-01T00:00:00Z,0.08,1.0,900,,y
r3,beta,range,not-a-time,0.1,1.0,400,,
r4,beta,range,2026-05-01,0.1,-1,1.5,,
r1,alpha,trend,2026-05-02T00:00:00Z,0.12,1.0,500,0.2,z
"""
CONFIGS = """target_type,target_id,config_json,valid_from
STRATEGY_CONFIG,d1/alpha,"{""regime_weights"": {""trend"": 0.8}}",2026-05-01T00:00:00Z
STRATEGY_CONFIG,d1/alpha,"{""regime_weights"": {""trend"": 0.7}}",2026-05-10T00:00:00Z
PM_OVERRIDES,d1,"{""min_support"": 40}",
PM_OVERRIDES,d2,"{""min_support"": 40}",
RISK_CONFIG,d1,"{}",
META_KNOBS,d1,"{""nope"": 1}",
STRATEGY_CONFIG,d1/beta,not json,
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_backtests_and_configs_ingest_with_quarantine(tmp_path: Path, backend: str, request) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = MetaStore(db_url=url)
    (tmp_path / "bt.csv").write_text(BACKTESTS)
    (tmp_path / "cf.csv").write_text(CONFIGS)
    report = ingest_file(store, "backtests", tmp_path / "bt.csv", "d1")
    assert (report.rows_read, report.ingested, report.quarantined, report.duplicates_in_file) == (5, 2, 3, 1)
    assert report.ignored_columns == ["extra"]
    runs = store.read("backtest_runs", order_by="run_id")
    assert list(runs["run_id"]) == ["r1", "r2"] and runs["regime"].isna().tolist() == [False, True]
    assert json.loads(runs["metrics_json"].iloc[0]) == {"mean_return_r": 0.12, "std_return_r": 1.0, "n_trades": 500,
                                                        "sharpe": 0.2}  # the later r1 row
    q = store.read("quarantine", equals={"kind": "backtests"}, order_by="line")
    assert list(q["line"]) == [2, 4, 5]
    assert q["reason"].iloc[2] == "std_return_r is negative; n_trades is not a whole number ≥ 2"
    # a run_id of another domain is not stolen
    foreign = ingest_file(store, "backtests", tmp_path / "bt.csv", "d2")
    assert foreign.ingested == 0 and "already belongs to domain 'd1'" in "".join(foreign.reasons)

    report = ingest_file(store, "configs", tmp_path / "cf.csv", "d1")
    assert (report.ingested, report.quarantined) == (3, 4)
    reasons = store.read("quarantine", equals={"kind": "configs"}, order_by="line")["reason"].tolist()
    assert reasons == ["target_id of a PM_OVERRIDES must be the domain (d1)",
                       "target_type 'RISK_CONFIG' unknown (use STRATEGY_CONFIG, META_KNOBS, PM_OVERRIDES)",
                       "unknown knob 'nope' in config_json", "config_json must be a JSON object"]
    # history in valid_from order, the latest active: what the consumers read
    assert lifecycle.active_config(store, "STRATEGY_CONFIG", "d1/alpha") == (2, {"regime_weights": {"trend": 0.7}})
    assert lifecycle.active_config(store, "PM_OVERRIDES", "d1")[1] == {"min_support": 40}
    assert list(lifecycle.change_log(store)["action"]) == ["ingest"] * 3
    again = ingest_file(store, "configs", tmp_path / "cf.csv", "d1")  # re-sent: nothing new
    assert (again.ingested, again.replaced) == (3, 3) and len(store.read("configs")) == 3
    # a proposal is made against the ingested config (strategy weight 0.7 in trend is the snapshot)
    from meta_pipeline.governance.proposals import generate_proposals

    row = {"domain": "d1", "section": "strategy_vs_peers", "subject": "alpha/trend", "metric": "shortfall_return_r",
           "value": 0.5, "ci_low": None, "ci_high": None, "n": 500, "p_value": 1e-12,
           "details_json": json.dumps({"strategy_id": "alpha", "regime": "trend", "sd": 1.0})}
    proposals, _ = generate_proposals(pd.DataFrame([row]), store.active_configs())
    assert json.loads(proposals["current_config_snapshot_json"].iloc[0]) == {"regime_weights": {"trend": 0.7}}
    assert json.loads(proposals["proposed_config_json"].iloc[0])["regime_weights"]["trend"] == 0.5


def test_the_inbox_ingests_backtests_and_configs_folders(tmp_path: Path, store: MetaStore) -> None:
    from meta_pipeline.defs.ingest.governance_inputs import backtest_runs, engine_configs
    from meta_pipeline.defs.ingest.sensors import inbox_run_requests

    inbox = tmp_path / "inbox"
    for kind, text in (("backtests", BACKTESTS), ("configs", CONFIGS)):
        (inbox / "d1" / kind).mkdir(parents=True)
        (inbox / "d1" / kind / f"{kind}.csv").write_text(text)
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"store": store})
        result = inbox_run_requests(ctx, store, inbox)
        by_job = {r.job_name: r for r in result.run_requests}
        assert set(by_job) == {"ingest_backtests_job", "ingest_configs_job"}
        instance.add_dynamic_partitions("domain", ["d1"])
        for job, asset in (("ingest_backtests_job", backtest_runs), ("ingest_configs_job", engine_configs)):
            req = by_job[job]
            run = dg.materialize([asset], partition_key="d1", instance=instance, resources={"store": store},
                                 run_config=req.run_config)
            assert run.success
    assert len(store.read("backtest_runs")) == 2 and len(store.read("configs")) == 3
    assert (inbox / "d1" / "backtests" / "processed" / "backtests.csv").exists()
    assert (inbox / "d1" / "configs" / "processed" / "configs.csv").exists()
    assert set(store.read("quarantine")["kind"]) == {"backtests", "configs"}


def test_proposals_show_names_the_proposal_that_superseded_it(store: MetaStore, capsys) -> None:
    import argparse

    from meta_pipeline.commands import proposals as proposals_cmd
    from meta_pipeline_tests.support.proposals import proposal_frame

    old = lifecycle.insert_proposals(store, proposal_frame()).inserted[0]
    newer = lifecycle.insert_proposals(store, proposal_frame(part="peers:S1")).inserted[0]
    args = argparse.Namespace(proposal_id=old, json=False, db_url=store.db_url, debug=False)
    assert proposals_cmd.cmd_show(args) == 0
    out = capsys.readouterr().out
    assert "SUPERSEDED" in out and f"superseded  by {newer}" in out
