"""`controller_state` as a Dagster asset over a real store: decisions, idempotence, restart, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from meta_pipeline.defs.governance.controller import controller_knobs_within_bounds, controller_state
from meta_pipeline.meta.controller_policy import domain_seed as _domain_seed
from meta_pipeline.meta.fallback import advance_with_fallback
from meta_pipeline.meta.controller import (
    ControllerConfig,
    ControllerState,
    cold_start,
    knob_bound_problems,
)
from meta_pipeline.lab.simulate import live_engine, run_live_fleet
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, default_knobs
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.support.controller import DOMAIN, STEP, T0, write_ticks

@pytest.fixture
def tmp_store(tmp_path: Path) -> MetaStore:
    return MetaStore(db_url=f"sqlite:///{tmp_path}/t.db")


@pytest.fixture
def instance() -> dg.DagsterInstance:
    inst = dg.DagsterInstance.ephemeral()
    inst.add_dynamic_partitions("domain", [DOMAIN, "other"])
    return inst


# these tests drive simulated engines whose telemetry answers every knob at once, so learning-knob
# trials are judged on telemetry here (paired_learning_trials off); test_knob_trial.py covers the paired path
TELEMETRY_CANARY = {"ops": {"controller_state": {"config": {"paired_learning_trials": False}}}}
NO_FEEDBACK_NOTE = "no feedback cycles yet: reward from telemetry alone"


def materialize(store: MetaStore, instance: dg.DagsterInstance, domain: str = DOMAIN, **kwargs) -> dg.ExecuteInProcessResult:
    kwargs.setdefault("run_config", TELEMETRY_CANARY)
    return dg.materialize([controller_state, controller_knobs_within_bounds], partition_key=domain,
                          instance=instance, resources={"store": store}, **kwargs)


def metadata(result: dg.ExecuteInProcessResult) -> dict:
    return {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node("controller_state")[0].metadata.items()}


def test_decisions_are_appended_and_the_state_is_written(tmp_store, instance):
    write_ticks(tmp_store, 12, 0)
    result = materialize(tmp_store, instance)
    assert result.success
    meta = metadata(result)
    assert meta["decisions_made"] == 12 and meta["ticks_consumed"] == 12
    assert "trajectory" in meta and meta["knobs"] == json.loads(tmp_store.read("controller_state")["knobs_json"].iloc[0])
    decisions = tmp_store.read("meta_decisions", domain=DOMAIN, order_by="decision_no")
    assert decisions["decision_no"].tolist() == list(range(1, 13))
    first_batch = json.loads(decisions["telemetry_json"].iloc[0])
    assert pd.Timestamp(first_batch[0]["ts"]) == T0 and {"gain_p50", "knob_tau"} <= set(first_batch[0])
    row = tmp_store.read("controller_state", domain=DOMAIN)
    assert len(row) == 1 and int(row["decisions"].iloc[0]) == 12
    assert row["last_ts"].iloc[0] == T0 + STEP * 11
    state = ControllerState.from_json(row["state_json"].iloc[0])
    assert state.knobs == json.loads(row["knobs_json"].iloc[0]) and state.decisions == 12
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 1 and checks[0].passed


def test_rematerializing_without_new_telemetry_changes_nothing(tmp_store, instance):
    write_ticks(tmp_store, 5, 0)
    assert materialize(tmp_store, instance).success
    state_before = tmp_store.read("controller_state")
    decisions_before = tmp_store.read("meta_decisions")
    again = materialize(tmp_store, instance)
    assert again.success
    meta = metadata(again)
    assert meta["decisions_made"] == 0 and "nothing changed" in meta["status"]
    pd.testing.assert_frame_equal(tmp_store.read("controller_state"), state_before)
    pd.testing.assert_frame_equal(tmp_store.read("meta_decisions"), decisions_before)


def test_restart_continues_exactly(tmp_store, instance):
    """Three runs over a growing closed loop decide exactly what one uninterrupted controller would."""
    for first, n in ((0, 7), (7, 9), (16, 11)):
        write_ticks(tmp_store, n, first)
        assert materialize(tmp_store, instance).success
    stored = tmp_store.read("meta_decisions", domain=DOMAIN, order_by="decision_no")
    telemetry = tmp_store.read("telemetry", domain=DOMAIN, order_by="ts")
    config = ControllerConfig()
    # the asset decides through the sustained-drop monitor (meta.fallback), which never tripped here
    uninterrupted, decisions, fallbacks = advance_with_fallback(cold_start(None, config, seed=_domain_seed(DOMAIN, 0)),
                                                                telemetry, config)
    assert fallbacks == [] and uninterrupted.fallback["count"] == 0
    assert len(decisions) == len(stored) == 27
    assert stored["note"].tolist() == [f"{d['note']}; {NO_FEEDBACK_NOTE}" for d in decisions]
    assert stored["knobs_json"].tolist() == [json.dumps(d["knobs"], sort_keys=True) for d in decisions]
    assert np.allclose(stored["reward"], [d["reward"] for d in decisions])
    final = ControllerState.from_json(tmp_store.read("controller_state", domain=DOMAIN)["state_json"].iloc[0])
    assert final.to_json() == uninterrupted.to_json()
    # the engine followed the controller: some ticks ran knobs other than the defaults
    assert (telemetry["knob_tau"] != default_knobs()["tau"]).any() or (telemetry["knob_g_min"] != default_knobs()["g_min"]).any()


@pytest.mark.parametrize(
    "column, value, message",
    [("gain_p50", "9e999", "gain_p50"), ("stability_mean", "1.7", "stability_mean"), ("latency_ms", "'oops'", "latency_ms")],
)
def test_bad_telemetry_fails_the_run_and_loses_nothing(tmp_store, instance, column, value, message):
    write_ticks(tmp_store, 4, 0)
    assert materialize(tmp_store, instance).success
    write_ticks(tmp_store, 3, 4)
    state_before = tmp_store.read("controller_state")
    decisions_before = tmp_store.read("meta_decisions")
    ts = (T0 + STEP * 5).strftime("%Y-%m-%d %H:%M:%S.%f")
    with tmp_store.write() as conn:  # a value the ingest path would have quarantined, written behind its back
        conn.execute(text(f'UPDATE telemetry SET "{column}" = {value} WHERE domain = :d AND ts = :ts'),
                     {"d": DOMAIN, "ts": ts})
    result = materialize(tmp_store, instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.event_specific_data.error.message + str(failure.event_specific_data.user_failure_data)
    assert message in description and "nothing written" in description
    pd.testing.assert_frame_equal(tmp_store.read("controller_state"), state_before)
    pd.testing.assert_frame_equal(tmp_store.read("meta_decisions"), decisions_before)


def test_cold_start_from_the_newest_global_prior(tmp_store, instance):
    now = pd.Timestamp.now(tz="UTC")
    versions = {1: {"tau": 0.85, "g_min": 0.05}, 2: {"tau": 0.9, "g_min": 0.03, "tier3_topk": 7.0}}
    for version, values in versions.items():
        tmp_store.append("global_prior", pd.DataFrame(
            {"version": version, "created_at": now, "knob": list(values), "value": list(values.values()), "n_domains": 3}))
    # no telemetry yet: the cold-start state is published so the engine starts at the prior
    result = materialize(tmp_store, instance)
    assert result.success and metadata(result)["decisions_made"] == 0
    knobs = json.loads(tmp_store.read("controller_state", domain=DOMAIN)["knobs_json"].iloc[0])
    assert knobs["tau"] == 0.9 and knobs["g_min"] == 0.03 and knobs["tier3_topk"] == 7.0
    assert knobs["lambda_ci"] == default_knobs()["lambda_ci"]
    state = ControllerState.from_json(tmp_store.read("controller_state", domain=DOMAIN)["state_json"].iloc[0])
    assert state.prior_weight == 1.0 and state.prior["tau"] == 0.9
    write_ticks(tmp_store, 3, 0)
    assert tmp_store.read("telemetry", domain=DOMAIN)["knob_tau"].eq(0.9).all()  # the engine ran the prior
    assert materialize(tmp_store, instance).success
    assert tmp_store.count("meta_decisions", DOMAIN) == 3
    assert tmp_store.count("controller_state") == 1  # other domains untouched


def test_knob_check_fails_on_out_of_bounds_knobs(tmp_store, instance, monkeypatch):
    import meta_pipeline.defs.governance.controller as module

    write_ticks(tmp_store, 2, 0)
    real_state_row = module.state_row

    def corrupt(domain, state, now, config_version):  # a writer that publishes an out-of-bounds knob
        row = real_state_row(domain, state, now, config_version)
        row["knobs_json"] = json.dumps({**state.knobs, "tau": 1.5})
        return row

    monkeypatch.setattr(module, "state_row", corrupt)
    result = materialize(tmp_store, instance)
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and "tau=1.5 outside" in evaluation.metadata["problems"].value
    assert knob_bound_problems({**default_knobs(), "tier3_topk": 4.5, "bogus": 1.0}) == [
        "tier3_topk=4.5 is not integral", "unknown knob 'bogus'"]
    assert knob_bound_problems({"tau": float("nan")})[0] == "tau=nan is not a finite number"
    assert knob_bound_problems(default_knobs()) == []


def test_knobs_edited_outside_the_controller_are_canaried(tmp_store, instance):
    write_ticks(tmp_store, 6, 0)
    assert materialize(tmp_store, instance).success
    row = tmp_store.read("controller_state", domain=DOMAIN)
    engine = live_engine(DOMAIN, 0)
    far = KNOBS["tau"].low if engine.optimum["tau"] > 0.895 else KNOBS["tau"].high
    edited = {**json.loads(row["knobs_json"].iloc[0]), "tau": far}
    row["knobs_json"] = json.dumps(edited)
    tmp_store.replace_partition("controller_state", DOMAIN, row)
    write_ticks(tmp_store, 3, 6)  # the engine runs the hand-set knobs
    result = materialize(tmp_store, instance)
    assert result.success and "canaried as an external change" in metadata(result)["notes"]
    new = tmp_store.read("meta_decisions", domain=DOMAIN, order_by="decision_no").tail(3)
    assert new["rolled_back"].any()  # the harmful hand-set tau failed its canary
    assert json.loads(tmp_store.read("controller_state")["knobs_json"].iloc[0])["tau"] != far


def test_live_fleet_with_the_controller_in_the_loop(tmp_store, instance):
    """`meta-pipeline simulate --domains 2 --ticks T --drive`, in process: the loop closes."""
    domains = [DOMAIN, "other"]

    def drive(tick: int) -> None:
        if tick % 5 == 4:  # the sensor would batch ticks like this
            for d in domains:
                assert materialize(tmp_store, instance, domain=d).success

    summary = run_live_fleet(tmp_store, domains, 20, seed=3, after_round=drive)
    assert summary["ticks"].tolist() == [20, 20]
    telemetry = tmp_store.read("telemetry")
    assert len(telemetry) == 40 and set(telemetry["domain"]) == set(domains)
    assert telemetry.groupby("domain")["ts"].apply(lambda s: s.is_monotonic_increasing and s.is_unique).all()
    assert tmp_store.count("meta_decisions") == 40
    for col in (f"knob_{n}" for n in KNOB_NAMES):
        assert telemetry[col].notna().all()


def test_on_postgresql(pg_store, instance):
    write_ticks(pg_store, 6, 0)
    assert materialize(pg_store, instance).success
    write_ticks(pg_store, 4, 6)
    assert materialize(pg_store, instance).success
    assert metadata(materialize(pg_store, instance))["decisions_made"] == 0
    assert pg_store.count("meta_decisions", DOMAIN) == 10
