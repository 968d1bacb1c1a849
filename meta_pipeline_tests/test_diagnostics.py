"""Diagnostics core against planted truth (synth), plus the `diagnostics` asset wiring."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.lab import synth
from meta_pipeline.contracts import ContractError
from meta_pipeline.governance.diagnostics import (
    strategy_vs_peers,
    DiagnosticsInputs,
    DiagnosticsSettings,
    compute_diagnostics,
    override_firing,
    override_worth,
    permutation_mutual_information,
)
from meta_pipeline.knobs import KNOB_NAMES
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.support.frames import START, domain_frames, engine_telemetry, inputs_for, load_fleet
from meta_pipeline_tests.support.frames import tiny_trades as _tiny_trades


# ---------------------------------------------------------------------------
# knob importance
# ---------------------------------------------------------------------------


def test_knob_importance_finds_tau_and_nothing_else():
    """Sensitivity only on tau, no resource coupling: tau first with p < 0.01, the rest look like noise."""
    tel = engine_telemetry({"tau": 2.0}, n=400, seed=11)
    result = compute_diagnostics(DiagnosticsInputs("d", _tiny_trades(), telemetry=tel))
    imp = result.section("knob_importance").set_index("subject")
    assert set(imp.index) == set(KNOB_NAMES)
    assert imp["value"].idxmax() == "tau"
    assert imp.loc["tau", "p_value"] < 0.01
    others = imp.drop(index="tau")["p_value"]
    # at α = 0.05 a null knob is "significant" 5 % of the time: allow at most one of five
    assert (others <= 0.05).sum() <= 1, others.to_dict()
    details = json.loads(imp.loc["tau", "details_json"])
    assert details["n_permutations"] == DiagnosticsSettings().n_permutations >= 200
    assert imp.loc["tau", "value"] > details["null_q99"]


def test_permutation_p_values_are_uniform_under_the_null():
    """No relation at all: the fraction of p ≤ 0.05 must be near 5 % (the test that noise is not signal)."""
    rng = np.random.default_rng(3)
    reps, n = 300, 150
    x = rng.normal(size=(reps, n, 2))
    y = rng.normal(size=(reps, n))
    p = np.array([permutation_mutual_information(x[i], y[i], n_permutations=199, rng=rng)["p_value"]
                  for i in range(reps)])
    rate = (p <= 0.05).mean()
    assert 0.02 <= rate <= 0.09, rate
    # and a real dependence is found every time
    strong = permutation_mutual_information(x[0], x[0][:, 0] ** 2 + 0.1 * y[0], n_permutations=199, rng=rng)
    assert strong["p_value"][0] == pytest.approx(1 / 200)


def test_best_region_points_towards_the_true_optimum():
    optimum = {**{k: synth.KNOBS[k].default for k in KNOB_NAMES}, "tau": 0.85}
    tel = engine_telemetry({"tau": 2.0}, n=400, seed=5, optimum=optimum)
    current = {k: synth.KNOBS[k].default for k in KNOB_NAMES}  # tau 0.95, far from 0.85
    result = compute_diagnostics(DiagnosticsInputs("d", _tiny_trades(), telemetry=tel, current_knobs=current))
    region = result.section("knob_best_region").set_index("subject")
    det = json.loads(region.loc["tau", "details_json"])
    assert abs(det["proposed"] - 0.85) < abs(det["current"] - 0.85)
    assert region.loc["tau", "value"] > 0 and region.loc["tau", "p_value"] < 0.001
    assert region.loc["tau", "ci_low"] > 0


# ---------------------------------------------------------------------------
# performance and realized vs backtest against the planted strategy effect
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_domain() -> synth.DomainData:
    return synth.generate_fleet(synth.FleetConfig(n_domains=1, seed=7, n_trades=4000)).domains["dom0"]


def test_realized_vs_backtest_recovers_planted_strategy_effects(planted_domain):
    result = compute_diagnostics(inputs_for(planted_domain))
    cmp = result.section("realized_vs_backtest").set_index("subject")
    truth = planted_domain.truth.strategy_effects
    truth = truth.assign(subject=truth["strategy_id"] + "/" + truth["regime"]).set_index("subject")["effect"]
    assert set(cmp.index) == set(truth.index)
    # beta in S1 is the planted underperformer: a clear, significant shortfall
    assert cmp.loc["beta/S1", "ci_high"] < 0
    assert cmp.loc["beta/S1", "p_value"] < 1e-4
    assert cmp["p_value"].idxmin() == "beta/S1"
    # the 95 % intervals cover the planted effects (all but at most one of nine by chance)
    covered = (cmp["ci_low"] <= truth[cmp.index]) & (truth[cmp.index] <= cmp["ci_high"])
    assert covered.sum() >= 8, cmp[["value", "ci_low", "ci_high"]].assign(truth=truth)


def test_performance_tables_match_the_trades(planted_domain):
    f = domain_frames(planted_domain)
    result = compute_diagnostics(inputs_for(planted_domain))
    by_regime = result.section("by_regime").set_index("subject")
    expected = f["trades"].groupby("regime")["return_r"].agg(["mean", "count"])
    np.testing.assert_allclose(by_regime.loc[expected.index, "value"], expected["mean"])
    assert (by_regime.loc[expected.index, "n"].to_numpy() == expected["count"].to_numpy()).all()
    assert (by_regime["ci_low"] < by_regime["value"]).all() and (by_regime["value"] < by_regime["ci_high"]).all()
    cells = result.section("by_strategy_regime")
    assert len(cells) == 9 and cells.set_index("subject")["value"].idxmin() == "beta/S1"
    fam = result.section("by_pattern_family").set_index("subject")
    assert {f"F{i}" for i in range(6)} <= set(fam.index)
    # a trade counts once per family however many of its members fired
    pats = f["trade_patterns"].assign(family=f["trade_patterns"]["pattern"].str.split(".").str[0])
    assert fam.loc["F0", "n"] == pats[pats["family"] == "F0"]["trade_id"].nunique()


def test_pattern_family_counts_a_trade_once():
    trades = pd.DataFrame({"trade_id": ["a", "b", "c"], "regime": "S0", "strategy_id": "s", "return_r": [1.0, 3.0, 5.0]})
    patterns = pd.DataFrame({"trade_id": ["a", "a", "b", "c"], "pattern": ["F1.x", "F1.y", "F1.x", "N0.noise"]})
    fam = compute_diagnostics(DiagnosticsInputs("d", trades, trade_patterns=patterns)).section("by_pattern_family")
    f1 = fam.set_index("subject").loc["F1"]
    assert f1["n"] == 2 and f1["value"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------


def _override_case():
    trades = pd.DataFrame({
        "trade_id": ["t1", "t2", "t3", "t4", "t5"],
        "regime": ["S0", "S1", "S0", "S0", "S1"],
        "strategy_id": "s",
        "return_r": [1.0, 2.0, -1.0, 0.5, 0.0],
    })
    patterns = pd.DataFrame({"trade_id": ["t1", "t2", "t3", "t4", "t5", "t5"],
                             "pattern": ["P.a", "P.a", "P.a", "Q.b", "Q.b", "P.a"]})
    scope = pd.DataFrame({"trade_id": ["t1", "t2", "t3", "t1", "t5"],
                          "key": ["chain", "chain", "chain", "size", "chain"],
                          "value": ["solana", "solana", "base", "micro", "solana"]})
    overrides = pd.DataFrame({
        "lesson_key": ["P.a|chain=solana", "P.a|chain=solana,size=micro", "Q.b|", "P.a|"],
        "pattern": ["P.a", "P.a", "Q.b", "P.a"],
        "scope_json": [json.dumps({"chain": "solana"}), json.dumps({"chain": "solana", "size": "micro"}), "{}", "{}"],
        "regime": [None, None, None, "S1"],
        "edge": [0.3, 0.4, 0.1, 0.2],
        "latent_factor_id": ["f1", "f1", "f2", "f1"],
    })
    return trades, patterns, scope, overrides


def test_override_firing_matches_pattern_scope_and_regime():
    trades, patterns, scope, overrides = _override_case()
    fired = override_firing(trades, patterns, scope, overrides)
    got = {i: sorted(fired.loc[fired["override_idx"] == i, "trade_id"]) for i in range(len(overrides))}
    assert got == {
        0: ["t1", "t2", "t5"],  # P.a fired and chain=solana (t3 is on base)
        1: ["t1"],  # needs both keys
        2: ["t4", "t5"],  # no scope, any regime
        3: ["t2", "t5"],  # regime S1 only
    }
    worth = override_worth(trades, fired, overrides, 0.95)
    # uplift = mean(fired) − mean(not fired): override 0 fired on 1, 2, 0 vs −1, 0.5
    assert worth.loc[0, "uplift"] == pytest.approx(1.0 - (-0.25))
    assert worth.loc[0, "fire_rate"] == pytest.approx(3 / 5)


def test_override_sections_and_churn():
    trades, patterns, scope, overrides = _override_case()
    previous = ["P.a|chain=solana@*", "OLD|@*"]
    result = compute_diagnostics(DiagnosticsInputs("d", trades, trade_patterns=patterns, trade_scope=scope,
                                                   pm_overrides=overrides, previous_override_keys=previous))
    ov = result.section("overrides")
    share = ov[ov["subject"] == "all"]["value"].iloc[0]
    assert share == pytest.approx(5 / 5 - 1 / 5)  # t3 fires nothing
    churn = result.section("override_churn").iloc[0]
    # now: 4 identities; before: 2; common: 1 → |A△B| = 4, |A∪B| = 5
    assert churn["value"] == pytest.approx(4 / 5)
    assert json.loads(churn["details_json"])["removed"] == ["OLD|@*"]


def test_no_overrides_is_said_not_guessed():
    trades, patterns, scope, _ = _override_case()
    result = compute_diagnostics(DiagnosticsInputs("d", trades, trade_patterns=patterns, trade_scope=scope))
    assert result.section("overrides").empty
    assert any("no pm_overrides" in n for n in result.notes)


# ---------------------------------------------------------------------------
# nearest configurations, degradation, bad input
# ---------------------------------------------------------------------------


def test_nearest_configs_come_from_similar_conditions():
    rng = np.random.default_rng(0)
    n = 200
    ts = START + pd.to_timedelta(np.arange(n) * 5, unit="min")
    high = np.arange(n) % 2 == 0  # two regimes of conditions, alternating
    tel = pd.DataFrame({
        "ts": ts,
        "gain_p50": rng.normal(0.03, 0.005, n),
        "stability_mean": np.where(high, 0.9, 0.5) + rng.normal(0, 0.01, n),
        "vram_utilization": np.where(high, 0.3, 0.8) + rng.normal(0, 0.01, n),
        "latency_ms": np.where(high, 80, 300) + rng.normal(0, 5, n),
        **{f"knob_{k}": rng.uniform(synth.KNOBS[k].low, synth.KNOBS[k].high, n) for k in KNOB_NAMES},
    })
    # the last 20 ticks are all "high" conditions
    tel.loc[n - 20:, ["stability_mean", "vram_utilization", "latency_ms"]] = [0.9, 0.3, 80.0]
    result = compute_diagnostics(DiagnosticsInputs("d", _tiny_trades(), telemetry=tel))
    near = result.section("nearest_configs")
    neighbours = near[near["subject"].str.startswith("neighbour")]
    assert len(neighbours) == DiagnosticsSettings().knn_top
    idx = [int(np.flatnonzero(tel["ts"] == pd.Timestamp(json.loads(d)["ts"]))[0]) for d in neighbours["details_json"]]
    assert all(high[i] for i in idx) and max(idx) < n - 20
    assert neighbours["value"].is_monotonic_decreasing
    assert set(json.loads(neighbours["details_json"].iloc[0])["knobs"]) == set(KNOB_NAMES)


def test_trades_only_degrades_gracefully_and_says_so():
    trades = _tiny_trades()
    result = compute_diagnostics(DiagnosticsInputs("d", trades))
    assert set(result.rows["section"]) == {"inputs", "by_regime", "by_strategy", "by_strategy_regime"}
    joined = " ".join(result.notes)
    for word in ("backtest_runs", "pm_overrides", "telemetry", "global-prior", "controller_state", "trade_patterns"):
        assert word in joined
    inputs = result.section("inputs").set_index("subject")
    assert inputs.loc["trades", "value"] == 2 and inputs.loc["telemetry", "value"] == 0


def test_bad_inputs_are_rejected_or_skipped_clearly():
    with pytest.raises(ValueError, match="return_r"):
        compute_diagnostics(DiagnosticsInputs("d", _tiny_trades().drop(columns=["return_r"])))
    runs = pd.DataFrame({"run_id": ["r1", "r2"], "strategy_id": ["a", "a"], "regime": ["S0", "S0"],
                         "metrics_json": ["not json", json.dumps({"mean_return_r": 0.1, "std_return_r": 1.0,
                                                                  "n_trades": 100})]})
    result = compute_diagnostics(DiagnosticsInputs("d", _tiny_trades(), backtest_runs=runs))
    assert any("1 backtest run(s) lack" in n for n in result.notes)
    assert len(result.section("realized_vs_backtest")) == 1  # the good run is still used


# ---------------------------------------------------------------------------
# the asset
# ---------------------------------------------------------------------------


def test_diagnostics_asset_writes_partition_and_reports(tmp_path):
    from meta_pipeline.defs.governance.orchestrator import diagnostics

    store = MetaStore(db_url=f"sqlite:///{tmp_path}/t.db")
    fleet = synth.generate_fleet(synth.FleetConfig(n_domains=2, seed=2, n_trades=2000, telemetry_ticks=200))
    load_fleet(store, fleet)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", ["dom0", "dom1", "Bad Name"])
    for domain in ("dom0", "dom1"):
        result = dg.materialize([diagnostics], instance=instance, resources={"store": store}, partition_key=domain)
        assert result.success
    md = result.asset_materializations_for_node("diagnostics")[0].metadata
    assert md["dagster/row_count"].value == store.count("diagnostics", domain="dom1") > 0
    assert "knob_importance_plot" in md and "realized_vs_backtest_plot" in md
    assert "beta/S1" in md["key_findings"].value
    assert "no pm_overrides" in md["notes"].value
    before = store.read("diagnostics")
    # idempotent: a re-run replaces exactly the partition
    dg.materialize([diagnostics], instance=instance, resources={"store": store}, partition_key="dom0")
    assert store.count("diagnostics", domain="dom0") == (before["domain"] == "dom0").sum()
    # an invalid partition key is rejected clearly and nothing else is lost
    bad = dg.materialize([diagnostics], instance=instance, resources={"store": store}, partition_key="Bad Name",
                         raise_on_error=False)
    assert not bad.success
    failure = [e for e in bad.all_events if e.is_step_failure][0]
    assert "invalid domain name" in failure.step_failure_data.error.cause.message or \
        "invalid domain name" in failure.step_failure_data.error.message
    assert store.count("diagnostics") == len(before)
    with pytest.raises(ContractError):
        store.read("diagnostics", domain="Bad Name")


def test_controller_state_and_drift_from_approved_config():
    knobs = {**{k: synth.KNOBS[k].default for k in KNOB_NAMES}, "tau": 0.8}
    state = pd.DataFrame([{"knobs_json": json.dumps(knobs), "cooldowns_json": "{}", "reward_ema": 0.6,
                           "rollbacks": 2, "decisions": 40}])
    approved = {k: synth.KNOBS[k].default for k in KNOB_NAMES}  # tau 0.95
    result = compute_diagnostics(DiagnosticsInputs("d", _tiny_trades(), controller_state=state, approved_knobs=approved))
    ctl = result.section("controller").set_index("metric")
    assert ctl.loc["rollbacks", "value"] == 2 and ctl.loc["decisions", "value"] == 40
    # only tau differs, by (0.95 − 0.8) / (0.99 − 0.8) in unit space; RMS over 6 knobs
    expected = ((0.95 - 0.8) / 0.19) / np.sqrt(len(KNOB_NAMES))
    assert ctl.loc["drift_from_config", "value"] == pytest.approx(expected)


# ---------------------------------------------------------------------------
# strategies against peers, tails, dispersion, attributes, risk overrides, environment
# ---------------------------------------------------------------------------


def _hand_trades() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two strategies × two regimes, 4 trades per cell, by hand; b/R2 is the weak cell."""
    cells = {("a", "R1"): [1.0, 0.0, 2.0, 1.0], ("a", "R2"): [1.0, 1.0, 0.0, 2.0],
             ("b", "R1"): [1.0, 2.0, 1.0, 0.0], ("b", "R2"): [-3.0, -1.0, -2.0, -2.0]}
    rows = [(s, g, r) for (s, g), rs in cells.items() for r in rs]
    trades = pd.DataFrame({"trade_id": [f"t{i}" for i in range(len(rows))],
                           "closed_at": START + pd.to_timedelta(np.arange(len(rows)), unit="h"),
                           "strategy_id": [r[0] for r in rows], "regime": [r[1] for r in rows],
                           "return_r": [r[2] for r in rows]})
    scope = pd.DataFrame({"trade_id": trades["trade_id"], "key": "sector",
                          "value": np.where(np.arange(len(rows)) % 2 == 0, "tech", "energy")})
    risk = pd.DataFrame({"trade_id": ["t12", "t13", "t0"], "key": "risk_override", "value": ["max_loss"] * 3})
    return trades, pd.concat([scope, risk], ignore_index=True)


def test_strategy_vs_peers_by_hand():
    from scipy import stats

    trades, _ = _hand_trades()
    peers = strategy_vs_peers(trades, 2).set_index(["strategy_id", "regime"])
    row = peers.loc[("b", "R2")]
    cell = np.array([-3.0, -1.0, -2.0, -2.0])
    peer = np.array([1.0, 1.0, 0.0, 2.0])  # a in R2
    own = np.array([1.0, 2.0, 1.0, 0.0])  # b in R1
    p_peer = stats.ttest_ind(cell, peer, equal_var=False, alternative="less").pvalue
    p_own = stats.ttest_ind(cell, own, equal_var=False, alternative="less").pvalue
    assert row["p_value"] == pytest.approx(max(p_peer, p_own), rel=1e-9)
    assert row["shortfall"] == pytest.approx(min(peer.mean() - cell.mean(), own.mean() - cell.mean()))
    assert row["shortfall_sd"] == pytest.approx(row["shortfall"] / cell.std(ddof=1))
    assert peers.loc[("a", "R1"), "p_value"] >= 0.5  # a cell as good as its peers is not short of anything


def test_tails_dispersion_attributes_and_risk_overrides_by_hand():
    trades, scope = _hand_trades()
    result = compute_diagnostics(DiagnosticsInputs("d", trades, trade_scope=scope))
    rows = result.rows.set_index(["section", "subject", "metric"])
    # expected shortfall at 5 % of 4 trades = the worst one; drawdown of b/R2 = all of its cumulative loss
    assert rows.loc[("tail", "b/R2", "expected_shortfall"), "value"] == -3.0
    assert rows.loc[("tail", "b/R2", "max_drawdown"), "value"] == 8.0
    assert rows.loc[("tail", "a/R1", "max_drawdown"), "value"] == 0.0  # cumulative 1, 1, 3, 4 never falls
    # entropy of b's |total R| by regime: |4| and |−8| → shares 1/3, 2/3
    p = np.array([1 / 3, 2 / 3])
    assert rows.loc[("regime_dispersion", "b", "pnl_entropy"), "value"] == pytest.approx(-(p * np.log(p)).sum() / np.log(2))
    assert rows.loc[("regime_dispersion", "b", "between_regime_sd"), "value"] == pytest.approx(1.5)
    # sector attribute: tech = even trades, energy = odd ones
    tech = trades["return_r"].to_numpy()[::2]
    assert rows.loc[("by_attribute", "sector=tech", "mean_return_r"), "value"] == pytest.approx(tech.mean())
    assert ("by_attribute", "sector", "anova_f") in rows.index
    # risk overrides: 3 of 16 trades; impact = mean of them − mean of the others
    r = trades.set_index("trade_id")["return_r"]
    over = r.loc[["t12", "t13", "t0"]]
    assert rows.loc[("risk_overrides", "all", "frequency"), "value"] == pytest.approx(3 / 16)
    assert rows.loc[("risk_overrides", "max_loss", "impact_return_r"), "value"] == pytest.approx(
        over.mean() - r.drop(over.index).mean())
    assert not any(k == "risk_override" for k in rows.loc["by_attribute"].index.get_level_values(0))


def test_the_environment_vector_carries_regime_mix_and_volatility():
    from meta_pipeline.governance.diagnostics import environment_vectors

    n = 100
    trades = pd.DataFrame({"trade_id": [f"t{i}" for i in range(n)],
                           "closed_at": START + pd.to_timedelta(np.arange(n), unit="h"),
                           "regime": np.where(np.arange(n) < 50, "calm", "storm"),
                           "strategy_id": "a", "return_r": np.where(np.arange(n) < 50, 0.1, 3.0) * (-1) ** np.arange(n)})
    tel = pd.DataFrame({"ts": START + pd.to_timedelta([49.5, 99.5], unit="h"), "stability_mean": [0.9, 0.5],
                        "vram_utilization": [0.3, 0.4], "latency_ms": [80.0, 90.0]})
    names, env = environment_vectors(tel, trades, n_trades=50)
    got = dict(zip(names, env[1]))
    assert got["regime_share:storm"] == 1.0 and got["regime_share:calm"] == 0.0
    assert got["return_volatility"] == pytest.approx(np.std(3.0 * (-1) ** np.arange(50, 100), ddof=1))
    assert dict(zip(names, env[0]))["regime_share:calm"] == 1.0
