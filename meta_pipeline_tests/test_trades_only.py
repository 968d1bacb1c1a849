"""A fleet that sends trades only (no telemetry): every asset materializes, the ones that need
telemetry say why they have nothing, and diagnostics and strategy proposals still come out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.defs.jobs import PER_DOMAIN_GROUPS
from meta_pipeline.defs.meta.priors import NO_PRIOR_STATUS, domain_priors, global_prior
from meta_pipeline.defs.resources import STORE_KEY, StoreResource
from meta_pipeline.ingest import ingest_file
from meta_pipeline.lab.synth import generate_fleet, write_trades_file
from meta_pipeline.store import MetaStore

DOMAINS = ("dom0", "dom1")
UNDERPERFORMER = ("beta", "S1")  # strategy beta falls short of its backtests in regime S1


@pytest.fixture(scope="module")
def fleet():
    return generate_fleet(n_domains=len(DOMAINS), n_trades=2400, underperform=UNDERPERFORMER, seed=3,
                          domain_names=DOMAINS)


@pytest.fixture
def trades_only(tmp_path: Path, fleet):
    """The fleet's trades files, ingested; no telemetry, no backtests."""
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'meta.db'}")
    for name, data in fleet.domains.items():
        report = ingest_file(store, "trades", write_trades_file(data.train_trades, tmp_path / name / "trades.csv"), name)
        assert report.ingested > 0
    assert store.count("telemetry") == 0
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", list(DOMAINS))
        yield store, instance


def _defs():
    from meta_pipeline.definitions import defs

    return defs


def _materialize(store: MetaStore, instance, selection, partition_key: str | None = None):
    defs = _defs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dg.materialize(
            [*defs.assets, *(defs.asset_checks or [])], selection=selection, partition_key=partition_key,
            instance=instance, resources={**(defs.resources or {}), STORE_KEY: StoreResource(db_url=store.db_url)},
            raise_on_error=False,
        )


def _failures(result) -> list[str]:
    return [f"{e.step_key}: {e.step_failure_data.error.message if e.step_failure_data.error else ''}"
            for e in result.all_events if e.event_type_value == "STEP_FAILURE"]


def _metadata(result, node: str) -> dict:
    mats = result.asset_materializations_for_node(node)
    assert mats, f"{node} was not materialized"
    return {k: v.value for k, v in mats[-1].metadata.items()}


# every per-domain asset, plus the global prior that diagnostics reads, in one run per domain
DOMAIN_AND_PRIOR = dg.AssetSelection.groups(*PER_DOMAIN_GROUPS) | dg.AssetSelection.assets("global_prior")
FLEET = dg.AssetSelection.groups("fleet")


def test_a_trades_only_fleet_gets_diagnostics_and_says_what_it_lacks(trades_only, fleet) -> None:
    store, instance = trades_only
    for domain in DOMAINS:
        result = _materialize(store, instance, DOMAIN_AND_PRIOR, partition_key=domain)
        assert result.success, _failures(result)
        # the assets that need telemetry skip with a clear note, and fail nothing downstream
        assert _metadata(result, "domain_priors")["status"] == "no telemetry: no prior"
        assert _metadata(result, "global_prior")["status"] == NO_PRIOR_STATUS
        assert _metadata(result, "controller_state")["status"].startswith("no telemetry yet")
        notes = _metadata(result, "diagnostics")["notes"]
        assert "no telemetry" in notes and "global-prior gap" in notes
    assert store.count("global_prior") == 0  # no version written

    diagnostics = store.read("diagnostics")
    assert set(diagnostics["domain"]) == set(DOMAINS)
    for domain in DOMAINS:
        sections = set(diagnostics.loc[diagnostics["domain"] == domain, "section"])
        assert {"by_regime", "by_strategy", "by_strategy_regime", "by_pattern_family"} <= sections

    result = _materialize(store, instance, FLEET)
    assert result.success, _failures(result)
    assert _metadata(result, "global_prior")["status"] == NO_PRIOR_STATUS
    meta = _metadata(result, "config_proposals")
    assert meta["domains"] == len(DOMAINS)
    # Strategy proposals come from the trades alone: strategy beta falls short of its peers in
    # S1 and of its own other regimes (governance.diagnostics.strategy_vs_peers). Knob proposals
    # need telemetry; churn proposals need a second diagnostics run with overrides.
    assert "no STRATEGY_CONFIG candidates" not in meta["missing_evidence"]
    assert "no META_KNOBS candidates" in meta["missing_evidence"] and "telemetry" in meta["missing_evidence"]
    proposals = store.read("meta_controller_config_proposals")
    strategy_id, regime = UNDERPERFORMER
    top = proposals.sort_values("confidence", ascending=False).iloc[0]
    assert top["target_type"] == "STRATEGY_CONFIG" and top["target_id"].split("/")[1] == strategy_id, \
        proposals[["target_type", "target_id", "confidence"]]
    assert top["confidence"] >= 0.7
    assert json.loads(top["proposed_config_json"])["regime_weights"][regime] < 1.0
    trades_only_ids = set(proposals["proposal_id"])
    diagnostics = store.read("diagnostics")
    assert {"strategy_vs_peers", "tail", "regime_dispersion"} <= set(diagnostics["section"])

    # with the fleet's backtest runs (not telemetry: still no engine data), the realized-vs-backtest
    # shortfall of beta in S1 adds its evidence to the same targets
    for name, data in fleet.domains.items():
        store.replace_partition("backtest_runs", name, data.backtests)
    for domain in DOMAINS:
        result = _materialize(store, instance, dg.AssetSelection.assets("diagnostics"), partition_key=domain)
        assert result.success, _failures(result)
    result = _materialize(store, instance, FLEET)
    assert result.success, _failures(result)
    proposals = store.read("meta_controller_config_proposals")
    strategy = proposals[proposals["target_type"] == "STRATEGY_CONFIG"]
    assert len(strategy) >= 1, proposals[["target_type", "target_id", "confidence"]]
    assert all(t.endswith(f"/{strategy_id}") for t in strategy["target_id"])
    for proposed in strategy["proposed_config_json"]:
        assert json.loads(proposed)["regime_weights"][regime] < 1.0  # its weight in S1 goes down
    assert any("shortfall:" in e for e in strategy["evidence_json"])  # the backtests' part
    # a target never holds two PENDING proposals: the one with the backtest evidence superseded the first
    pending = strategy[strategy["status"] == "PENDING"]
    assert pending["target_id"].is_unique
    assert set(strategy.loc[strategy["status"] == "SUPERSEDED", "proposal_id"]) <= trades_only_ids
    assert store.count("global_prior") == 0


def test_global_prior_without_any_domain_prior_writes_nothing_and_says_why(tmp_path: Path) -> None:
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 't.db'}")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", ["alpha"])
    result = dg.materialize([domain_priors, global_prior], selection=[global_prior], instance=instance,
                            resources={"store": store})
    assert result.success
    meta = _metadata(result, "global_prior")
    assert meta["status"] == NO_PRIOR_STATUS and meta["dagster/row_count"] == 0
    assert store.count("global_prior") == 0

    # telemetry present but no domain prior materialized yet: the status says what to do
    rng = np.random.default_rng(0)
    store.append("telemetry", pd.DataFrame({
        "domain": "alpha", "ts": pd.date_range("2026-06-01", periods=5, freq="5min", tz="UTC"),
        **{c: rng.random(5) for c in ("gain_p50", "stability_mean", "vram_utilization", "latency_ms")}}))
    result = dg.materialize([domain_priors, global_prior], selection=[global_prior], instance=instance,
                            resources={"store": store})
    status = _metadata(result, "global_prior")["status"]
    assert result.success and "alpha" in status and "materialize their domain_priors" in status
