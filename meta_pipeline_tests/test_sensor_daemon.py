"""Sensors evaluated by Dagster's own daemon code: run keys really dedupe, cursors really persist."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.sensor import execute_sensor_iteration

from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore

REPO = Path(__file__).resolve().parents[1]
TRADES = "trade_id,closed_at,regime,return_r,patterns\n{id},2026-06-01T10:00:00Z,S0,0.5,A.x\n"


_CLOCK = [time.time()]


def _tick(instance: dg.DagsterInstance, module: str, location: str) -> None:
    """One daemon sensor iteration in a fresh daemon context, 10 minutes after the previous one
    (so every sensor's minimum interval has passed)."""
    _CLOCK[0] += 600
    target = ModuleTarget(module_name=module, attribute="defs", working_directory=str(REPO), location_name=location)
    with freeze_time(_CLOCK[0]), create_test_daemon_workspace_context(target, instance) as ctx:
        list(execute_sensor_iteration(ctx, logging.getLogger("test_sensor_daemon"), None, None))


def _runs(instance: dg.DagsterInstance, job_name: str) -> list:
    return [r for r in instance.get_runs() if r.job_name == job_name]


@pytest.fixture
def instance(tmp_path: Path):
    (tmp_path / "dh").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dh")) as inst:
        yield inst


def test_two_requests_with_one_key_in_one_tick_launch_one_run(instance) -> None:
    _tick(instance, "meta_pipeline_tests.support.dup_key_defs", "dup_key_defs")
    _tick(instance, "meta_pipeline_tests.support.dup_key_defs", "dup_key_defs")
    assert len(_runs(instance, "tiny_job")) == 1


@pytest.mark.slow
def test_new_trades_sensor_through_the_daemon(tmp_path: Path, instance, monkeypatch) -> None:
    db_url = f"sqlite:///{tmp_path / 'meta.db'}"
    monkeypatch.setenv("META_PIPELINE_DB_URL", db_url)  # the code location's store
    monkeypatch.setenv("META_PIPELINE_INBOX", str(tmp_path / "inbox"))
    store = MetaStore(db_url=db_url)

    def ingest(domain: str, trade_id: str) -> None:
        path = tmp_path / f"{domain}-{trade_id}.csv"
        path.write_text(TRADES.format(id=trade_id))
        ingest_file(store, "trades", path, domain)

    ingest("alpha", "t1")
    _tick(instance, "meta_pipeline.definitions", "meta_pipeline")
    runs = _runs(instance, "learning_on_new_trades_job")
    assert [r.tags.get("dagster/partition") for r in runs] == ["alpha"]
    assert instance.get_dynamic_partitions("domain") == ["alpha"]  # registered by the sensor

    _tick(instance, "meta_pipeline.definitions", "meta_pipeline")  # nothing new: nothing launched
    assert len(_runs(instance, "learning_on_new_trades_job")) == 1

    ingest("alpha", "t2")  # lands "while the daemon is down"; the next daemon process picks it up
    _tick(instance, "meta_pipeline.definitions", "meta_pipeline")
    runs = _runs(instance, "learning_on_new_trades_job")
    assert len(runs) == 2 and len({r.tags.get("dagster/run_key") for r in runs}) == 2
