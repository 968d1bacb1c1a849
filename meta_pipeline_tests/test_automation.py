"""Data sensors and schedules: one run per batch, cursors that survive restarts and never regress."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from meta_pipeline.defs.automation import (
    BatchCursor,
    new_batches,
    new_telemetry_sensor,
    new_trades_sensor,
    nightly_domain_refresh,
    plan_batch_runs,
    priors_refresh,
)
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore

TRADES = "trade_id,closed_at,regime,return_r,patterns\n{id},2026-06-01T10:00:00Z,S0,0.5,A.x\n"


def _ingest(tmp_path: Path, store: MetaStore, domain: str, trade_id: str) -> None:
    path = tmp_path / f"{domain}-{trade_id}.csv"
    path.write_text(TRADES.format(id=trade_id))
    ingest_file(store, "trades", path, domain)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _tick(sensor, instance, store, cursor):
    ctx = dg.build_sensor_context(instance=instance, resources={"store": store}, cursor=cursor)
    return sensor(ctx)


def test_one_run_per_domain_per_batch_and_new_partitions(tmp_path, store, instance) -> None:
    _ingest(tmp_path, store, "alpha", "t1")
    _ingest(tmp_path, store, "alpha", "t2")  # two batches before the tick: one run covers both
    _ingest(tmp_path, store, "beta", "t1")
    result = _tick(new_trades_sensor, instance, store, None)
    assert sorted(r.partition_key for r in result.run_requests) == ["alpha", "beta"]
    assert [sorted(r.partition_keys) for r in result.dynamic_partitions_requests] == [["alpha", "beta"]]
    # nothing new: no runs, and the cursor stays where it is
    again = _tick(new_trades_sensor, instance, store, result.cursor)
    assert again.run_requests == [] and again.cursor == result.cursor
    # one more batch for beta: exactly one more run, for beta only
    _ingest(tmp_path, store, "beta", "t2")
    third = _tick(new_trades_sensor, instance, store, result.cursor)
    assert [r.partition_key for r in third.run_requests] == ["beta"]
    assert third.run_requests[0].run_key not in {r.run_key for r in result.run_requests}


def test_cursor_survives_a_restart(tmp_path, store, instance) -> None:
    _ingest(tmp_path, store, "alpha", "t1")
    first = _tick(new_trades_sensor, instance, store, None)
    persisted = first.cursor  # what the daemon stores
    _ingest(tmp_path, store, "alpha", "t2")  # lands while the daemon is down
    after_restart = _tick(new_trades_sensor, instance, store, persisted)
    assert [r.partition_key for r in after_restart.run_requests] == ["alpha"]


def test_telemetry_sensor_watches_only_telemetry(tmp_path, store, instance) -> None:
    _ingest(tmp_path, store, "alpha", "t1")
    assert _tick(new_telemetry_sensor, instance, store, None).run_requests == []


def test_cursor_never_moves_backwards() -> None:
    batches = pd.DataFrame({"id": [3, 4], "domain": ["a", "a"],
                            "ingested_at": pd.to_datetime(["2026-06-01T00:00:00Z", "2026-06-01T00:01:00Z"])})
    ahead = BatchCursor(last_id=10, last_ingested_at="2026-07-01T00:00:00+00:00")
    _, moved, _ = plan_batch_runs(batches, ahead, "learn")
    assert moved.last_id == 10 and moved.last_ingested_at == ahead.last_ingested_at


def test_reset_store_cannot_collide_with_old_run_keys(tmp_path, instance) -> None:
    """A store rebuilt from scratch reuses batch ids; the sensor must still see and key the new batches."""
    old = MetaStore(db_url=f"sqlite:///{tmp_path / 'old.db'}")
    _ingest(tmp_path, old, "alpha", "t1")
    first = _tick(new_trades_sensor, instance, old, None)
    fresh = MetaStore(db_url=f"sqlite:///{tmp_path / 'fresh.db'}")  # ids restart at 1
    _ingest(tmp_path, fresh, "alpha", "t9")
    second = _tick(new_trades_sensor, instance, fresh, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["alpha"]  # seen by time, not by id
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert BatchCursor.parse(second.cursor).last_id == BatchCursor.parse(first.cursor).last_id  # not regressed


def test_run_keys_dedupe_in_dagster(tmp_path, store, instance) -> None:
    """Two requests with one key in a single tick -> Dagster launches one run."""
    _ingest(tmp_path, store, "alpha", "t1")
    batches = new_batches(store, "trades", BatchCursor())
    requests, _, _ = plan_batch_runs(batches, BatchCursor(), "learn")
    assert len(requests) == 1
    # The same batch planned twice (e.g. two sensor evaluations racing) yields the same key.
    requests_again, _, _ = plan_batch_runs(batches, BatchCursor(), "learn")
    assert requests[0].run_key == requests_again[0].run_key


def test_invalid_domain_batches_are_reported_not_requested() -> None:
    batches = pd.DataFrame({"id": [1, 2], "domain": ["ok", "../bad"],
                            "ingested_at": pd.to_datetime(["2026-06-01T00:00:00Z"] * 2)})
    requests, moved, invalid = plan_batch_runs(batches, BatchCursor(), "learn")
    assert [r.partition_key for r in requests] == ["ok"] and invalid == ["../bad"] and moved.last_id == 2


def test_schedules_request_every_domain(instance) -> None:
    instance.add_dynamic_partitions("domain", ["a", "b", "c"])
    ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=pd.Timestamp("2026-11-22T02:00Z"))
    runs = nightly_domain_refresh(ctx)
    assert sorted(r.partition_key for r in runs) == ["a", "b", "c"]
    assert len({r.run_key for r in runs}) == 3
    assert sorted(r.partition_key for r in priors_refresh(ctx)) == ["a", "b", "c"]
