"""A learning-knob trial waits for its effect and is judged paired on the post-change overrides.

Through Dagster over a real store: a controller decision moves ``g_min``; ``knob_trial_sensor``
requests one re-learn run keyed by the decision; until an overrides version built with the new
knob exists — and realized trades closed after it — the controller does not judge the trial
(telemetry never does); then it judges it on exactly that version, refitting the old knobs as of
the same as_of, and the decision row says so.
"""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.definitions import defs
from meta_pipeline.defs.governance.controller import controller_knobs_within_bounds, controller_state
from meta_pipeline.defs.governance.knob_trials import knob_trial_sensor
from meta_pipeline.defs.resources import StoreResource
from meta_pipeline.ingest import ingest_file
from meta_pipeline.knobs import default_knobs
from meta_pipeline.lab.synth import generate_fleet, write_trades_file
from meta_pipeline.learning.predict import override_model
from meta_pipeline.meta import controller as controller_core
from meta_pipeline.meta.controller_policy import decision_rows, state_row
from meta_pipeline.meta.knob_trial import (
    SourceFrames,
    counterfactual_trial,
    paired_score,
    post_change_version,
)
from meta_pipeline.meta.reward import RewardWeights, domain_reward, realized_gain
from meta_pipeline.store import MetaStore

DOMAIN = "kt0"
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
NEW_G_MIN = 0.06


def _tick(ts: pd.Timestamp, knobs: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"domain": DOMAIN, "ts": ts, "gain_p50": 0.02, "stability_mean": 0.8,
                          "vram_utilization": 0.5, "latency_ms": 100.0,
                          **{f"knob_{k}": v for k, v in knobs.items()}}])


def _controller(store: MetaStore, instance: dg.DagsterInstance, **config) -> dg.ExecuteInProcessResult:
    run_config = {"ops": {"controller_state": {"config": {"min_paired_trades": 150, "max_paired_trades": 300, **config}}}, **QUIET}
    return dg.materialize([controller_state, controller_knobs_within_bounds], partition_key=DOMAIN,
                          instance=instance, resources={"store": store}, run_config=run_config)


def _pending(store: MetaStore) -> dict | None:
    return controller_core.ControllerState.from_json(store.read("controller_state", domain=DOMAIN)["state_json"].iloc[0]).pending


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knobtrial")
    fleet = generate_fleet(n_domains=1, n_trades=4000, train_days=40, holdout_days=5, seed=3, underperform=None,
                           domain_names=(DOMAIN,), telemetry_ticks=10)
    data = fleet.domains[DOMAIN]
    cut = data.truth.t0 + pd.Timedelta(days=30)
    db_url = f"sqlite:///{tmp / 'kt.db'}"
    store = MetaStore(db_url)
    ingest_file(store, "trades", write_trades_file(data.trades[data.trades["closed_at"] <= cut], tmp / "a.csv"), DOMAIN)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", [DOMAIN])
    bound = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, sensors=defs.sensors,
                           resources={**(defs.resources or {}), "store": StoreResource(db_url=db_url)})
    job = bound.resolve_job_def("relearn_job")
    assert job.execute_in_process(partition_key=DOMAIN, instance=instance, run_config=QUIET).success  # v1, defaults
    # the controller moves g_min: a one-knob trial from the incumbent (the defaults), recorded as a decision
    cfg = controller_core.ControllerConfig(paired_knobs=("g_min",))
    state = controller_core.cold_start(None, cfg, seed=0)
    state.baseline_mean, state.baseline_weight, state.decisions = 0.3, 3.0, 1
    state.last_ts = (cut - pd.Timedelta(days=1)).isoformat()
    controller_core._start_trial(state, "g_min", NEW_G_MIN, 1, "model", cfg)
    now = pd.Timestamp.now(tz="UTC")
    state.pending["changed_at"] = now.isoformat()
    decision = {"decision_no": 1, "reward": 0.3, "reward_ema": 0.3, "rolled_back": False,
                "policy_updates": {"g_min": NEW_G_MIN}, "knobs": dict(state.knobs), "telemetry": [], "note": "trial: g_min"}
    store.replace_partition("controller_state", DOMAIN, state_row(DOMAIN, state, now, None))
    store.append("meta_decisions", decision_rows(DOMAIN, [decision], now))
    return {"store": store, "instance": instance, "bound": bound, "job": job, "data": data, "cut": cut, "tmp": tmp}


def test_the_sensor_requests_one_relearn_keyed_by_the_decision(trial):
    store, instance, bound = trial["store"], trial["instance"], trial["bound"]
    ctx = dg.build_sensor_context(instance=instance, resources={"store": store}, definitions=bound)
    result = knob_trial_sensor(ctx)
    assert [(r.run_key, r.partition_key) for r in result.run_requests] == [(f"knob-trial:{DOMAIN}:1", DOMAIN)]
    assert json.loads(result.run_requests[0].tags["meta_pipeline/knob_updates"]) == {"g_min": NEW_G_MIN}
    # the cursor moved past the decision: nothing more to request
    again = knob_trial_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}, cursor=result.cursor))
    assert again.run_requests == []


def test_no_post_change_overrides_means_not_judged_not_even_by_telemetry(trial):
    store, instance = trial["store"], trial["instance"]
    store.append("telemetry", _tick(trial["cut"], default_knobs() | {"g_min": NEW_G_MIN}))
    result = _controller(store, instance)
    assert result.success
    decisions = store.read("meta_decisions", domain=DOMAIN, order_by="decision_no")
    assert decisions["judged_on_json"].isna().all()  # nothing judged
    assert not decisions["rolled_back"].any()
    assert "awaits its paired verdict" in decisions["note"].iloc[-1]
    pending = _pending(store)
    assert pending is not None and pending["knobs"] == ["g_min"]
    notes = result.asset_materializations_for_node("controller_state")[0].metadata["notes"].value
    assert "no overrides version built with the new knobs" in notes
    # the only version was built with the old knobs before the change: never the trial's evidence
    assert post_change_version(store.override_versions(DOMAIN), {**default_knobs(), "g_min": NEW_G_MIN},
                               pd.Timestamp(pending["changed_at"])) is None


def test_the_trial_is_judged_on_the_post_change_version_paired(trial):
    store, instance, job, data, cut = trial["store"], trial["instance"], trial["job"], trial["data"], trial["cut"]
    # the sensor's run: the learning assets build with the knobs in effect (the controller's new g_min)
    run = job.execute_in_process(partition_key=DOMAIN, instance=instance, run_config=QUIET,
                                 tags={"meta_pipeline/knob_decision": f"{DOMAIN}:1"})
    assert run.success
    versions = store.override_versions(DOMAIN)
    v2 = versions.iloc[-1]
    assert int(v2["version"]) == 2 and json.loads(v2["knobs_json"])["g_min"] == NEW_G_MIN
    # a version with the new knobs, but no realized trade after it yet: still not judged
    assert _controller(store, instance).success
    assert store.read("meta_decisions", domain=DOMAIN)["judged_on_json"].isna().all()
    assert _pending(store) is not None
    # trades close after it; the next controller run judges the trial on version 2
    later = data.trades[(data.trades["closed_at"] > cut) & (data.trades["closed_at"] <= cut + pd.Timedelta(days=8))]
    ingest_file(store, "trades", write_trades_file(later, trial["tmp"] / "b.csv"), DOMAIN)
    assert _controller(store, instance).success
    decisions = store.read("meta_decisions", domain=DOMAIN, order_by="decision_no")
    judged = decisions[decisions["judged_on_json"].notna()]
    assert len(judged) == 1
    on = json.loads(judged["judged_on_json"].iloc[0])
    assert on["overrides_version"] == 2
    assert pd.Timestamp(on["as_of"]) == pd.Timestamp(v2["as_of"])
    assert on["new_knobs"]["g_min"] == NEW_G_MIN and on["old_knobs"]["g_min"] == default_knobs()["g_min"]
    trades = store.read("trades", domain=DOMAIN)
    after = trades[trades["closed_at"] > pd.Timestamp(v2["as_of"])]
    assert on["n_trades"] == len(after) >= 150
    # the figures are the paired score of version 2 vs a refit with the old knobs as of the same time
    frames = SourceFrames(trades[["trade_id", "closed_at", "regime", "return_r"]],
                          *(store.read(t, domain=DOMAIN) for t in ("trade_patterns", "trade_scope", "trade_metrics")))
    check = counterfactual_trial(frames, pd.Timestamp(v2["as_of"]), default_knobs(),
                                 new_model=override_model(store, DOMAIN, version=2))
    assert check.n == on["n_trades"] and check.gain == pytest.approx(on["gain"], abs=1e-12)
    assert _pending(store) is None
    verdict = judged["note"].iloc[0]
    assert "paired knob trial (g_min)" in verdict and "overrides v2" in verdict
    # a rollback or a revert restores the old g_min and asks for one more re-materialization; an accept keeps it
    row = judged.iloc[0]
    updates = json.loads(row["policy_updates_json"])
    knobs_now = json.loads(store.read("controller_state", domain=DOMAIN)["knobs_json"].iloc[0])
    z = on["z"]
    if z >= 1.0:
        assert updates == {} and knobs_now["g_min"] == NEW_G_MIN
    else:
        assert updates == {"g_min": default_knobs()["g_min"]} and knobs_now["g_min"] == default_knobs()["g_min"]
        assert bool(row["rolled_back"]) == (z <= -2.0)
        req = knob_trial_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}, cursor="1"))
        assert [r.run_key for r in req.run_requests] == [f"knob-trial:{DOMAIN}:{int(row['decision_no'])}"]


def test_paired_score_cancels_the_shared_outcome_noise():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 1, 4000)
    p_old = np.zeros(4000)
    p_new = np.where(rng.random(4000) < 0.3, 0.05, 0.0)  # a small change on 30 % of trades
    res = paired_score(y, p_old, p_new)
    d = (y - p_old) ** 2 - (y - p_new) ** 2
    assert res.gain == pytest.approx(d.mean() / np.mean(y * y))
    # the paired SE is far below the SE of comparing two independent cycles' MSE (≈ 0.36·√(2/n)·… in R²)
    unpaired_se = np.sqrt(2 * np.var((y - p_old) ** 2) / len(y)) / np.mean(y * y)
    assert res.se < unpaired_se / 10


def test_the_reward_adds_the_realized_gain_and_falls_back_to_telemetry():
    ticks = pd.concat([_tick(pd.Timestamp("2026-01-01", tz="UTC"), default_knobs())], ignore_index=True)
    weights = RewardWeights()
    alone, gain = domain_reward(ticks, None, weights)
    assert not gain.available and "telemetry alone" in gain.note
    cycles = pd.DataFrame({"cycle": [1, 2], "overrides_version": [1, 2], "n": [500, 500], "mse": [0.9, 0.98],
                           "mse_zero": [1.0, 1.0], "rank_ic": [0.1, 0.05]})
    with_gain, gain = domain_reward(ticks, cycles, weights)
    assert gain.alignment == pytest.approx(1 - (500 * 0.9 + 500 * 0.98) / 1000.0)  # pooled 0.06
    assert with_gain[0] - alone[0] == pytest.approx(weights.realized * min(gain.alignment / 0.05, 1.0))
    assert realized_gain(cycles.head(0)).available is False
    few = realized_gain(cycles.assign(n=[50, 50]))
    assert not few.available and "telemetry alone" in few.note


def test_the_sensor_and_the_verdict_rows_behave_alike_on_both_backends(any_store):
    """One relearn per domain for its newest learning-knob decision (a gamma_diversity move needs none);
    judged_on_json round-trips."""
    now = pd.Timestamp("2026-07-01", tz="UTC")
    knobs = default_knobs()

    def row(domain: str, no: int, updates: dict, judged_on: dict | None = None) -> dict:
        return {"decision_no": no, "reward": 0.1, "reward_ema": 0.1, "rolled_back": False, "policy_updates": updates,
                "knobs": {**knobs, **updates}, "telemetry": [], "note": "n", "judged_on": judged_on}

    any_store.append("meta_decisions", decision_rows("d1", [row("d1", 1, {"tau": 0.9}), row("d1", 2, {"g_min": 0.05})], now))
    any_store.append("meta_decisions", decision_rows("d2", [row("d2", 1, {"gamma_diversity": 0.4})], now))
    on = {"overrides_version": 7, "as_of": "2026-06-30T00:00:00+00:00", "n_trades": 321, "z": -2.5}
    any_store.append("meta_decisions", decision_rows("d3", [row("d3", 4, {"tier2_enabled": 0.0}, on)], now))
    instance = dg.DagsterInstance.ephemeral()
    result = knob_trial_sensor(dg.build_sensor_context(instance=instance, resources={"store": any_store}))
    assert sorted(r.run_key for r in result.run_requests) == ["knob-trial:d1:2", "knob-trial:d3:4"]
    stored = any_store.read("meta_decisions", domain="d3")
    assert json.loads(stored["judged_on_json"].iloc[0]) == on
    assert any_store.read("meta_decisions", domain="d1")["judged_on_json"].isna().all()


def test_the_sequential_paired_rule():
    from meta_pipeline.meta.knob_trial import PairedTrial, paired_verdict

    def t(n: int, gain: float, se: float) -> PairedTrial:
        return PairedTrial(n, 1.0, 1.0 - gain, 1.0, gain, se)

    assert paired_verdict(t(300, 0.001, 0.001), max_trades=1500) is None  # z = 1: keep scoring
    assert paired_verdict(t(1500, 0.001, 0.001), max_trades=1500) == "accept"  # at the end, z ≥ 1 accepts
    assert paired_verdict(t(1500, 0.0005, 0.001), max_trades=1500) == "revert"
    assert paired_verdict(t(300, 0.002, 0.001), max_trades=1500) == "accept"  # early, z ≥ 1.5
    assert paired_verdict(t(300, -0.0017, 0.001), max_trades=1500) == "revert"  # early, z ≤ −1.5
    assert paired_verdict(t(300, -0.0025, 0.001), max_trades=1500) == "rollback"  # z ≤ −2 at any look
    assert paired_verdict(t(300, 0.0, 0.0), max_trades=1500) == "revert"  # no trade priced differently: final
