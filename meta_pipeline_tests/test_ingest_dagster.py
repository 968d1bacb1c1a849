"""The foundation's Dagster wiring: the trades asset, the inbox sensor, the definitions."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from meta_pipeline.defs.ingest.assets import trades, trades_are_well_formed
from meta_pipeline.defs.ingest.sensors import inbox_run_requests, inbox_sensor
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore
from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_telemetry_file

GOOD = "trade_id,closed_at,regime,return_r,patterns\nt1,2026-06-01T10:00:00Z,S0,0.5,A.x\nt2,2026-06-01T11:00:00Z,S1,0.1,A.x|B.y\n"
WITH_BAD = GOOD + "t3,yesterday,S1,0.1,A.x\n"


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_trades_asset_materializes_with_counts(tmp_path: Path, store: MetaStore, instance) -> None:
    path = tmp_path / "t.csv"
    path.write_text(WITH_BAD)
    ingest_file(store, "trades", path, "dom-a")
    instance.add_dynamic_partitions("domain", ["dom-a"])
    result = dg.materialize([trades, trades_are_well_formed], partition_key="dom-a", instance=instance,
                            resources={"store": store})
    assert result.success
    mat = result.asset_materializations_for_node("trades")[0]
    assert mat.metadata["dagster/row_count"].value == 2
    assert mat.metadata["quarantined_total"].value == 1
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)


def test_trades_asset_ingests_configured_files(tmp_path: Path, store: MetaStore, instance) -> None:
    inbox_file = tmp_path / "inbox" / "dom-a" / "trades" / "batch1.csv"
    inbox_file.parent.mkdir(parents=True)
    inbox_file.write_text(WITH_BAD)
    instance.add_dynamic_partitions("domain", ["dom-a"])
    result = dg.materialize(
        [trades], partition_key="dom-a", instance=instance, resources={"store": store},
        run_config={"ops": {"trades": {"config": {"files": [str(inbox_file)]}}}},
    )
    assert result.success
    mat = result.asset_materializations_for_node("trades")[0]
    assert mat.metadata["ingested_this_run"].value == 2 and mat.metadata["quarantined_this_run"].value == 1
    assert not inbox_file.exists() and (inbox_file.parent / "processed" / "batch1.csv").exists()


def test_rejected_file_fails_the_run_and_is_recorded(tmp_path: Path, store: MetaStore, instance) -> None:
    bad = tmp_path / "inbox" / "d" / "trades" / "nocols.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("trade_id\nt1\n")
    instance.add_dynamic_partitions("domain", ["d"])
    result = dg.materialize([trades], partition_key="d", instance=instance, resources={"store": store},
                            run_config={"ops": {"trades": {"config": {"files": [str(bad)]}}}}, raise_on_error=False)
    assert not result.success
    q = store.read("quarantine")
    assert len(q) == 1 and q["line"].iloc[0] == 0 and "missing required column" in q["reason"].iloc[0]
    assert (bad.parent / "rejected" / "nocols.csv").exists()


def _drop(inbox: Path, domain: str, kind: str, name: str, text: str) -> Path:
    path = inbox / domain / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_inbox_sensor_one_run_per_batch_and_registers_domains(tmp_path: Path, store: MetaStore, instance) -> None:
    inbox = tmp_path / "inbox"
    _drop(inbox, "new-dom", "trades", "a.csv", GOOD)
    _drop(inbox, "new-dom", "trades", "b.csv", GOOD)
    fleet = generate_fleet(FleetConfig(n_domains=1, n_trades=50, telemetry_ticks=10))
    write_telemetry_file(fleet.domains["dom0"].telemetry, inbox / "new-dom" / "telemetry" / "t.csv")
    _drop(inbox, "Bad..Name", "trades", "x.csv", GOOD)

    ctx = dg.build_sensor_context(instance=instance, resources={"store": store})
    result = inbox_run_requests(ctx, store, inbox)
    assert len(result.run_requests) == 2  # one per (domain, kind) batch, not per file
    kinds = {r.job_name for r in result.run_requests}
    assert kinds == {"ingest_trades_job", "ingest_telemetry_job"}
    trades_req = next(r for r in result.run_requests if r.job_name == "ingest_trades_job")
    assert len(trades_req.run_config["ops"]["trades"]["config"]["files"]) == 2
    assert trades_req.partition_key == "new-dom"
    assert [list(req.partition_keys) for req in result.dynamic_partitions_requests] == [["new-dom"]]
    # the hostile folder is refused, recorded, and moved out of the way
    assert (inbox / "Bad..Name" / "trades" / "rejected" / "x.csv").exists()
    assert "invalid domain name" in store.read("quarantine")["reason"].iloc[0]

    # same files, next tick: same run keys (so Dagster launches nothing new)
    again = inbox_run_requests(dg.build_sensor_context(instance=instance, resources={"store": store}), store, inbox)
    assert {r.run_key for r in again.run_requests} == {r.run_key for r in result.run_requests}
    # a new file changes the batch's key
    _drop(inbox, "new-dom", "trades", "c.csv", GOOD)
    third = inbox_run_requests(dg.build_sensor_context(instance=instance, resources={"store": store}), store, inbox)
    new_keys = {r.run_key for r in third.run_requests} - {r.run_key for r in result.run_requests}
    assert len(new_keys) == 1


def test_inbox_sensor_definition_evaluates(tmp_path: Path, store: MetaStore, instance, monkeypatch) -> None:
    monkeypatch.setenv("META_PIPELINE_INBOX", str(tmp_path / "inbox"))
    _drop(tmp_path / "inbox", "dom-b", "trades", "a.csv", GOOD)
    ctx = dg.build_sensor_context(instance=instance, resources={"store": store})
    result = inbox_sensor(ctx)
    assert len(result.run_requests) == 1


def test_definitions_load_with_every_asset() -> None:
    """The ingest asset and check tested above are the code location's own, and the refresh
    jobs between them recompute every asset it defines — per domain, fleet-wide, and per task
    the generic feedback job and prompt evolution's job (the full list of assets is in snapshots/code_location.json, see
    test_code_location_snapshot)."""
    from meta_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    assert trades.key in keys and set(trades_are_well_formed.check_keys) <= set(graph.asset_check_keys)
    refreshed = set()
    for job_name in ("domain_refresh_job", "fleet_refresh_job", "feedback_generic_job", "prompts_job"):
        refreshed |= defs.resolve_job_def(job_name).asset_layer.selected_asset_keys
    assert refreshed == keys, f"assets no refresh job recomputes: {sorted(k.to_user_string() for k in keys - refreshed)}"
