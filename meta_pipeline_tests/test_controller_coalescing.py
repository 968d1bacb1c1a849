"""Controller runs coalesced: at most one per domain per interval, taking every pending tick, none when idle.

Driven through ``pending_batch_runs`` (the telemetry sensor's body) with an explicit clock,
against a real store and a Dagster test instance: 30 telemetry batches for one domain, one
every 10 s (a 5-minute soak at 6 a minute), with a sensor tick after each.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from meta_pipeline.defs.automation import DataSensorCursor, controller_coalesce_seconds, pending_batch_runs, run_due
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore

TELEMETRY = "ts,gain_p50,stability_mean,vram_utilization,latency_ms\n2026-06-01T10:{m:02d}:{s:02d}Z,0.03,0.8,0.5,120\n"


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _soak(tmp_path: Path, store: MetaStore, instance, coalesce: float) -> list[tuple[float, str]]:
    cursor, launched = DataSensorCursor(), []
    for k in range(30):
        path = tmp_path / f"m{coalesce}-{k}.csv"
        path.write_text(TELEMETRY.format(m=k // 6 + int(coalesce) % 7 * 5, s=k % 6 * 10))
        ingest_file(store, "telemetry", path, "dom0")
        now = 1_000_000.0 + 10.0 * k
        requests, cursor, _ = pending_batch_runs(instance, store, "telemetry", "control", cursor,
                                                 coalesce_seconds=coalesce, now=now)
        launched += [(now, r.run_key) for r in requests]
    return launched


def test_one_controller_run_per_domain_per_interval(tmp_path, store, instance) -> None:
    per_batch = _soak(tmp_path, store, instance, 0.0)
    assert len(per_batch) == 30  # no run answers a batch here: without coalescing, every new batch is a run
    coalesced = _soak(tmp_path, store, instance, 120.0)
    times = [t for t, _ in coalesced]
    assert times[0] == 1_000_000.0  # the first batch is answered at once
    assert all(b - a >= 120.0 for a, b in zip(times, times[1:]))  # at most one run per 120 s
    assert len(coalesced) == 3  # t = 0, 120, 240 over 290 s
    # each run names the newest batch landed by its tick: the run reads every tick landed meanwhile
    ids = [int(key.split(":")[2]) for _, key in coalesced]
    assert ids == sorted(ids) and ids[1] - ids[0] == 12


def test_no_run_when_nothing_is_pending(tmp_path, store, instance) -> None:
    requests, cursor, _ = pending_batch_runs(instance, store, "telemetry", "control", DataSensorCursor(),
                                             coalesce_seconds=60.0, now=0.0)
    assert requests == [] and cursor.pending == {}
    later, _, _ = pending_batch_runs(instance, store, "telemetry", "control", cursor, coalesce_seconds=60.0, now=1e6)
    assert later == []


def test_rule_and_setting(monkeypatch) -> None:
    assert run_due(100.0, None, 60.0) and run_due(160.0, 100.0, 60.0) and not run_due(159.0, 100.0, 60.0)
    assert run_due(101.0, 100.0, 0.0)  # 0: one run per batch
    monkeypatch.setenv("META_PIPELINE_CONTROLLER_COALESCE_SECONDS", "45")
    assert controller_coalesce_seconds() == 45.0
    monkeypatch.delenv("META_PIPELINE_CONTROLLER_COALESCE_SECONDS")
    assert controller_coalesce_seconds() == 300.0
    cursor = DataSensorCursor(requested_at={"dom0": 5.0})
    assert DataSensorCursor.parse(cursor.dump()).requested_at == {"dom0": 5.0}


def test_bench_day_simulation_counts_runs_by_hand() -> None:
    """The bench's simulated day (lab/bench.py), checked by hand: batches every 7.2 s, ticks every 15 s.

    One run per batch: every tick from 15 s on finds a batch newer than the last run covered
    (a run covers what landed 5 s after its request) -> 86400/15 - 1 = 5759 runs. Coalesced
    at 300 s: one run per 300 s -> 86400/300 = 288. Nothing landing: no run."""
    from meta_pipeline.lab.bench import simulate_controller_day

    assert simulate_controller_day(100, 25 / 3, 0.0)["runs_per_domain"] == 5759
    assert simulate_controller_day(100, 25 / 3, 300.0) == {"runs_per_domain": 288.0, "runs": 28_800.0,
                                                           "batches_per_domain": 12_000.0}
    assert simulate_controller_day(1, 1 / 60, 300.0)["runs_per_domain"] == 24  # one batch an hour: one run each
