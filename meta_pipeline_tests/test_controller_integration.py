"""Where the controller meets the rest: applied proposals, the global prior's early transfer check."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd

from meta_pipeline.defs.governance.controller import controller_state
from meta_pipeline.governance import lifecycle
from meta_pipeline.knobs import KNOB_NAMES, default_knobs
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.support.controller import DOMAIN, STEP, T0, write_ticks
from meta_pipeline_tests.support.proposals import proposal_frame


def _materialize(store: MetaStore) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", [DOMAIN])
    return dg.materialize([controller_state], partition_key=DOMAIN, instance=instance, resources={"store": store})


def _meta(result: dg.ExecuteInProcessResult) -> dict:
    mat = result.asset_materializations_for_node("controller_state")[0]
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def test_an_applied_knob_proposal_reaches_the_learning_jobs_and_the_controller(store) -> None:
    write_ticks(store, 6, 0)
    assert _materialize(store).success
    before, source = store.knobs_in_effect(DOMAIN).values, store.knobs_in_effect(DOMAIN).source
    assert source == "controller_state"
    approved = {**before, "tau": 0.85 if before["tau"] > 0.9 else 0.97}
    frame = proposal_frame(target_id=DOMAIN, snapshot=before, proposed=approved, target_type="META_KNOBS",
                           part="knob:tau")
    pid = lifecycle.insert_proposals(store, frame).inserted[0]
    lifecycle.approve(store, pid, "ann")
    lifecycle.apply(store, pid, "ann")

    # applied, not yet seen by the controller: every reader (learning jobs too) runs the approved knobs
    knobs, source = store.knobs_in_effect(DOMAIN).values, store.knobs_in_effect(DOMAIN).source
    assert source.startswith("configs v") and knobs["tau"] == approved["tau"]

    result = _materialize(store)  # no new telemetry: the controller adopts the config as a pending change
    assert result.success
    row = store.read("controller_state", domain=DOMAIN)
    assert json.loads(row["knobs_json"].iloc[0])["tau"] == approved["tau"]
    assert int(row["config_version"].iloc[0]) == lifecycle.active_config(store, "META_KNOBS", DOMAIN)[0]
    knobs, source = store.knobs_in_effect(DOMAIN).values, store.knobs_in_effect(DOMAIN).source
    assert source == "controller_state" and knobs["tau"] == approved["tau"]

    # adopted once: the next run does not re-inject it
    write_ticks(store, 3, 6)
    assert _materialize(store).success
    decisions = store.read("meta_decisions", domain=DOMAIN)
    assert decisions["decision_no"].is_unique


def _write_prior(store: MetaStore, knobs: dict[str, float], expected_reward_low: float) -> None:
    store.append("global_prior", pd.DataFrame({
        "version": 1, "created_at": pd.Timestamp("2026-01-01", tz="UTC"), "knob": list(KNOB_NAMES),
        "value": [knobs[k] for k in KNOB_NAMES], "n_domains": 5, "epsilon": 1.0,
        "details_json": json.dumps({"expected_reward_low": expected_reward_low}),
    }))


def _ticks_at(store: MetaStore, knobs: dict[str, float], gain: float, n: int) -> None:
    store.append("telemetry", pd.DataFrame({
        "domain": DOMAIN, "ts": [T0 + STEP * i for i in range(n)], "gain_p50": gain, "stability_mean": 0.6,
        "vram_utilization": 0.5, "latency_ms": 100.0, **{f"knob_{k}": knobs[k] for k in KNOB_NAMES},
    }))


def test_a_domain_far_below_the_fleet_drops_the_prior_at_once(store) -> None:
    prior = {**default_knobs(), "tau": 0.82, "g_min": 0.09}
    _write_prior(store, prior, expected_reward_low=0.9)
    assert _materialize(store).success  # cold start at the prior, no telemetry yet
    assert json.loads(store.read("controller_state", domain=DOMAIN)["knobs_json"].iloc[0])["tau"] == prior["tau"]
    _ticks_at(store, prior, gain=-0.02, n=4)  # reward ≈ 0.1: nothing like the fleet under this prior
    meta = _meta(_materialize(store))
    assert meta["prior_disabled"] is True and "negative transfer" in meta["prior_disabled_reason"]


def test_a_domain_like_the_fleet_keeps_the_prior(store) -> None:
    prior = {**default_knobs(), "tau": 0.82}
    _write_prior(store, prior, expected_reward_low=0.5)
    assert _materialize(store).success
    _ticks_at(store, prior, gain=0.05, n=4)  # reward ≈ 0.73 ≥ the fleet's floor
    meta = _meta(_materialize(store))
    assert meta["prior_disabled"] is False and meta["prior_weight"] > 0
