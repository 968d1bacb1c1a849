"""Proposals core against planted truth (and against fleets with nothing planted), plus
the `config_proposals` asset with dedupe and the auto-apply policy."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.lab import synth
from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.diagnostics import DiagnosticsInputs, compute_diagnostics
from meta_pipeline.governance.proposals import (
    benjamini_hochberg,
    evidence_factor,
    generate_proposals,
    score_candidates,
)
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, default_knobs
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.support.frames import engine_telemetry, inputs_for, load_fleet
from meta_pipeline_tests.support.frames import tiny_trades as _tiny_trades


def _diagnostics(fleet: synth.Fleet, telemetry: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    rows = []
    for name, data in fleet.domains.items():
        inputs = inputs_for(data)
        if telemetry is not None:
            inputs.telemetry = telemetry[name]
        rows.append(compute_diagnostics(inputs).rows)
    return pd.concat(rows, ignore_index=True)


# ---------------------------------------------------------------------------
# acceptance: planted underperformer on top, nothing planted → nothing confident
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted() -> tuple[synth.Fleet, pd.DataFrame]:
    fleet = synth.generate_fleet(synth.FleetConfig(n_domains=3, seed=1, underperform=("beta", "S1")))
    return fleet, _diagnostics(fleet)


def test_top_proposal_is_the_planted_underperformer(planted):
    fleet, diag = planted
    proposals, candidates = generate_proposals(diag)
    top = proposals.iloc[0]
    assert top["target_type"] == "STRATEGY_CONFIG" and top["target_id"].endswith("/beta")
    evidence = json.loads(top["evidence_json"])
    # found from the trades alone (peers and its own other regimes), the backtests add their evidence
    roles = {p["part_key"]: p["role"] for p in evidence["parts"]}
    assert set(roles) == {"peers:S1", "shortfall:S1"} and sorted(roles.values()) == ["decides", "supports"]
    assert top["confidence"] >= 0.7
    before, after = json.loads(top["current_config_snapshot_json"]), json.loads(top["proposed_config_json"])
    assert before["regime_weights"] == {"S0": 1.0, "S1": 1.0, "S2": 1.0}
    assert 0.25 <= after["regime_weights"]["S1"] <= 0.9  # lowered, bounded
    assert after["regime_weights"]["S0"] == after["regime_weights"]["S2"] == 1.0
    # every domain's planted cell is proposed, and nothing else about strategies is
    strategy = proposals[proposals["target_type"] == "STRATEGY_CONFIG"]
    assert sorted(strategy["target_id"]) == [f"{d}/beta" for d in sorted(fleet.domains)]
    assert "shortfall of" in top["rationale_text"] and "beta" in top["rationale_text"]
    assert len(candidates) >= 27  # every strategy × regime cell of every domain is a tested candidate


def test_knob_proposals_on_the_real_engine_improve_its_true_reward(planted):
    """The planted fleet's engines have real knob effects: every META_KNOBS proposal must help per the truth."""
    fleet, diag = planted
    proposals, _ = generate_proposals(diag)
    knob_props = proposals[proposals["target_type"] == "META_KNOBS"]
    for row in knob_props.itertuples(index=False):
        engine = fleet.domains[row.domain].truth.engine
        before, after = json.loads(row.current_config_snapshot_json), json.loads(row.proposed_config_json)
        assert engine.expected_reward(after) > engine.expected_reward(before), row.rationale_text


def test_null_fleets_produce_at_most_one_confident_proposal():
    """20 fleets with nothing planted. Strategy side: underperform=None. Knob side: the telemetry
    comes from an engine whose sensitivities are all zero (and no resource coupling), because
    the default engine's tau effect is real and proposing to tune it is a correct discovery."""
    confident, total = [], 0
    for seed in range(20):
        fleet = synth.generate_fleet(synth.FleetConfig(n_domains=1, seed=1000 + seed, underperform=None,
                                                       n_trades=1500, telemetry_ticks=10))
        tel = {"dom0": engine_telemetry({}, n=300, seed=seed)}
        proposals, candidates = generate_proposals(_diagnostics(fleet, tel))
        total += len(candidates)
        confident += proposals[proposals["confidence"] >= 0.5][["target_id", "confidence"]].values.tolist()
    assert total >= 20 * 15  # 9 strategy cells + 6 knobs per fleet were all tested
    assert len(confident) <= 1, confident


def test_low_evidence_gives_low_confidence():
    """The same planted effect on a handful of trades: proposed at most weakly, never auto-appliable."""
    fleet = synth.generate_fleet(synth.FleetConfig(n_domains=1, seed=4, n_trades=300, underperform=("beta", "S1")))
    proposals, candidates = generate_proposals(_diagnostics(fleet))
    cell = candidates[candidates["part_key"] == "shortfall:S1"]
    cell = cell[cell["target_id"].str.endswith("/beta")].iloc[0]
    assert cell["n"] < 60
    assert cell["confidence"] < 0.5
    assert (proposals["confidence"] < lifecycle.AutoApplySettings().min_confidence).all()


# ---------------------------------------------------------------------------
# pieces: BH, confidence scale, hashing, merging, global prior
# ---------------------------------------------------------------------------


def test_benjamini_hochberg_by_hand():
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2, np.nan]))
    np.testing.assert_allclose(q, [0.05, 0.0666667, 0.0666667, 0.25, 1.0], rtol=1e-5)
    assert (benjamini_hochberg(np.array([0.5])) == 0.5).all()


def test_evidence_scale_is_documented():
    np.testing.assert_allclose(evidence_factor(np.array([1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]), 1e-4),
                               [1, 1, 0.75, 0.5, 0.25, 0])


def _cell_row(domain="d1", strategy="beta", regime="S1", diff=-0.4, p=1e-8, n=500, sd=1.0):
    det = {"strategy_id": strategy, "regime": regime, "realized_sd": sd, "realized_mean": diff, "backtest_mean": 0.0,
           "backtest_runs": 3, "backtest_n": 1200}
    return {"domain": domain, "section": "realized_vs_backtest", "subject": f"{strategy}/{regime}",
            "metric": "diff_return_r", "value": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1, "n": n,
            "p_value": p, "details_json": json.dumps(det)}


def test_evidence_hash_ignores_noise_and_dedupes():
    a, _ = generate_proposals(pd.DataFrame([_cell_row()]))
    b, _ = generate_proposals(pd.DataFrame([_cell_row(diff=-0.4000001, p=1.1e-8, n=503)]))
    assert len(a) == 1 and a["evidence_hash"].iloc[0] == b["evidence_hash"].iloc[0]
    other_target, _ = generate_proposals(pd.DataFrame([_cell_row(strategy="gamma")]))
    assert other_target["evidence_hash"].iloc[0] != a["evidence_hash"].iloc[0]
    other_snapshot, _ = generate_proposals(
        pd.DataFrame([_cell_row()]),
        {("STRATEGY_CONFIG", "d1/beta"): {"strategy_id": "beta", "regime_weights": {"S1": 0.8}}})
    assert other_snapshot["evidence_hash"].iloc[0] != a["evidence_hash"].iloc[0]
    # the proposal is an absolute target (1 − 0.4 sd = 0.6), computed against the ACTIVE weight: it never
    # compounds — an active weight at or below the target proposes nothing
    assert json.loads(other_snapshot["proposed_config_json"].iloc[0])["regime_weights"]["S1"] == pytest.approx(0.6)
    applied, _ = generate_proposals(
        pd.DataFrame([_cell_row()]), {("STRATEGY_CONFIG", "d1/beta"): {"strategy_id": "beta", "regime_weights": {"S1": 0.6}}})
    assert applied.empty


def test_overperformance_is_not_proposed():
    proposals, cand = generate_proposals(pd.DataFrame([_cell_row(diff=+0.4)]))
    assert proposals.empty and cand["p_value"].iloc[0] > 0.5


def test_two_knobs_merge_into_one_proposal_per_domain():
    optimum = {**default_knobs(), "tau": 0.85, "g_min": 0.08}
    tel = engine_telemetry({"tau": 2.0, "g_min": 2.0}, n=400, seed=9, optimum=optimum)
    diag = compute_diagnostics(DiagnosticsInputs("d", _tiny_trades(), telemetry=tel, current_knobs=default_knobs())).rows
    proposals, cand = generate_proposals(diag)
    assert len(proposals) == 1 and proposals["target_id"].iloc[0] == "d"
    evidence = json.loads(proposals["evidence_json"].iloc[0])
    keys = sorted(p["part_key"] for p in evidence["parts"])
    assert keys == ["knob:g_min", "knob:tau"]
    assert proposals["confidence"].iloc[0] == pytest.approx(min(p["confidence"] for p in evidence["parts"]))
    after = json.loads(proposals["proposed_config_json"].iloc[0])
    assert abs(after["tau"] - 0.85) < abs(0.95 - 0.85) and abs(after["g_min"] - 0.08) < abs(0.02 - 0.08)


def test_global_prior_far_and_better_is_proposed_close_is_not():
    optimum = {**default_knobs(), "tau": 0.86, "lambda_ci": 0.4}
    tel = engine_telemetry({"tau": 2.0, "lambda_ci": 1.0}, n=400, seed=21, optimum=optimum)

    def run(prior_knobs):
        prior = pd.DataFrame({"version": 3, "knob": list(prior_knobs), "value": list(prior_knobs.values())})
        inputs = DiagnosticsInputs("d", _tiny_trades(), telemetry=tel, current_knobs=default_knobs(), global_prior=prior)
        diag = compute_diagnostics(inputs).rows
        return diag, score_candidates(diag)

    diag, cand = run(optimum)
    gap = diag[diag["section"] == "global_prior_gap"].iloc[0]
    assert gap["value"] > 0 and gap["p_value"] < 0.001
    prior_part = cand[cand["part_key"] == "global_prior:v3"]
    assert len(prior_part) == 1 and prior_part["confidence"].iloc[0] > 0
    _, cand_close = run({**default_knobs(), "tau": 0.949})
    assert not (cand_close["part_key"] == "global_prior:v3").any()


# ---------------------------------------------------------------------------
# the asset: insert PENDING, dedupe on re-run, auto-apply through config
# ---------------------------------------------------------------------------


def test_config_proposals_asset_dedupes_and_auto_applies(tmp_path):
    from meta_pipeline.defs.governance.orchestrator import config_proposals, diagnostics

    store = MetaStore(db_url=f"sqlite:///{tmp_path}/t.db")
    fleet = synth.generate_fleet(synth.FleetConfig(n_domains=2, seed=3, n_trades=3000, telemetry_ticks=200))
    load_fleet(store, fleet)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", list(fleet.domains))
    for domain in fleet.domains:
        assert dg.materialize([diagnostics], instance=instance, resources={"store": store}, partition_key=domain).success

    first = dg.materialize([config_proposals], instance=instance, resources={"store": store})
    md = first.asset_materializations_for_node("config_proposals")[0].metadata
    pending = lifecycle.list_proposals(store, "PENDING").sort_values("confidence", ascending=False)
    assert md["inserted"].value == len(pending) > 0 and md["auto_apply"].value == "off"
    top = pending.iloc[0]
    assert top["target_type"] == "STRATEGY_CONFIG" and top["target_id"].endswith("/beta")
    assert top["confidence"] >= 0.7 and "shortfall:S1" in top["evidence_json"]
    assert top["proposal_id"] in md["pending_proposals"].value

    # same evidence again: no duplicate PENDING
    second = dg.materialize([config_proposals], instance=instance, resources={"store": store})
    md2 = second.asset_materializations_for_node("config_proposals")[0].metadata
    assert md2["inserted"].value == 0 and md2["duplicates_skipped"].value == len(pending)
    assert len(lifecycle.list_proposals(store, "PENDING")) == len(pending)

    # auto-apply: only allow-listed types above the threshold, applied_by AUTO
    policy = {"ops": {"config_proposals": {"config": {
        "enabled": True, "min_confidence": 0.7, "target_types": ["STRATEGY_CONFIG"]}}}}
    third = dg.materialize([config_proposals], instance=instance, resources={"store": store}, run_config=policy)
    assert third.success
    all_rows = lifecycle.list_proposals(store).set_index("proposal_id")
    auto = all_rows[all_rows["applied_by"] == "AUTO"]
    expected = pending[(pending["target_type"] == "STRATEGY_CONFIG") & (pending["confidence"] >= 0.7)]
    assert sorted(auto.index) == sorted(expected["proposal_id"]) and len(auto) >= 1
    assert (auto["status"] == "APPLIED").all()
    untouched = all_rows.drop(index=auto.index)
    assert (untouched["status"] == "PENDING").all()
    configs = store.read("configs")
    assert set(configs["target_id"]) == set(auto["target_id"]) and configs["active"].all()
    log = lifecycle.change_log(store)
    assert list(log["action"]) == ["auto_apply"] * len(auto) and set(log["actor"]) == {"AUTO"}


def test_auto_apply_policy_refuses_low_thresholds():
    with pytest.raises(ValueError, match="min_confidence"):
        lifecycle.AutoApplySettings(enabled=True, min_confidence=0.3, target_types=("META_KNOBS",))
    with pytest.raises(ValueError, match="unknown"):
        lifecycle.AutoApplySettings(enabled=True, target_types=("NOPE",))


def test_knob_defaults_cover_every_knob():
    # the META_KNOBS snapshot default is a complete, in-bounds knob set
    snap = json.loads(generate_proposals(pd.DataFrame([{
        "domain": "d", "section": "knob_best_region", "subject": "tau", "metric": "predicted_reward_gain",
        "value": 0.05, "ci_low": 0.04, "ci_high": 0.06, "n": 500, "p_value": 1e-9,
        "details_json": json.dumps({"knob": "tau", "current": 0.95, "proposed": 0.9, "importance_p": 1e-4})}]),
        current_knobs={"d": default_knobs()})[0]["current_config_snapshot_json"].iloc[0])
    assert set(snap) == set(KNOB_NAMES)
    assert all(KNOBS[k].low <= v <= KNOBS[k].high for k, v in snap.items())



def test_override_churn_becomes_a_pm_overrides_proposal():
    churn_row = {"domain": "d", "section": "override_churn", "subject": "all", "metric": "churn", "value": 30 / 40,
                 "ci_low": None, "ci_high": None, "n": 40, "p_value": None,
                 "details_json": json.dumps({"n_added": 15, "n_removed": 15, "n_now": 30, "n_before": 30})}
    proposals, cand = generate_proposals(pd.DataFrame([churn_row]))
    assert list(proposals["target_type"]) == ["PM_OVERRIDES"] and proposals["target_id"].iloc[0] == "d"
    assert json.loads(proposals["current_config_snapshot_json"].iloc[0]) == {"min_support": 30, "max_scope_dims": 2}
    # min_support = ⌈30 · (1 + 0.75) / 5⌉ · 5 = 55
    assert json.loads(proposals["proposed_config_json"].iloc[0]) == {"min_support": 55, "max_scope_dims": 2}
    # applied (min_support already 55): the same churn proposes nothing again
    assert generate_proposals(pd.DataFrame([churn_row]),
                              {("PM_OVERRIDES", "d"): {"min_support": 55, "max_scope_dims": 2}})[0].empty
    assert cand["p_value"].iloc[0] < 1e-6 and 0.5 < proposals["confidence"].iloc[0] <= 1
    # normal turnover (20 %) is not proposed
    calm = {**churn_row, "value": 8 / 40, "details_json": json.dumps({"n_added": 4, "n_removed": 4})}
    assert generate_proposals(pd.DataFrame([calm]))[0].empty
