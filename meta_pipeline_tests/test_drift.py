"""Tests of the residual drift monitor (meta_pipeline.learning.drift) and its bench.

The false-alarm rate itself (>= 50,000 trades per alarm) is a property of millions of
trades: ``meta_pipeline.lab.drift_bench`` measures it.  Here: behaviour that must hold on
every stream -- state continuity, detection of an obvious shift, the warm-up estimates,
River's own figures reproduced through the wrapper, and the state's safety.
"""

from __future__ import annotations

import base64
import json
import math
import os
import pickle

import numpy as np
import pytest

from meta_pipeline.lab import drift_bench
from meta_pipeline.learning.drift import (
    DEFAULT_DETECTORS,
    DetectorSpec,
    DriftAlarm,
    DriftConfig,
    ResidualDriftMonitor,
)

WARMUP = DriftConfig().warmup


def _planted_stream(seed: int) -> np.ndarray:
    """Residuals in raw units (location 0.2, scale 1.5) with several steps and a ramp."""
    rng = np.random.default_rng(seed)
    x = 0.2 + 1.5 * rng.standard_normal(30_000)
    x[3_000:] += 1.5 * 2.0           # 2 SD up: caught by ph_large
    x[9_000:] -= 1.5 * 2.6           # back down and further
    x[16_000:] += 1.5 * np.minimum(1.0, np.arange(14_000) / 800.0) * 0.6  # slow ramp
    x[24_000:] += 1.5 * 0.4          # small step: ADWIN territory
    return x


def _global(alarms: list[DriftAlarm], offset: int) -> list[tuple]:
    """Alarms in stream coordinates (every field, exactly)."""
    return [
        (a.n_seen, a.index + offset, a.detector, a.statistic,
         None if a.change_index is None else a.change_index + offset, a.direction, a.shift)
        for a in alarms
    ]


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("seed", [0, 1])
def test_batches_with_save_restore_give_identical_alarms(seed: int) -> None:
    x = _planted_stream(seed)
    one = ResidualDriftMonitor()
    whole = _global(one.update(x), 0)
    assert len(whole) >= 4, whole  # the stream really exercises alarms and re-warm-ups
    assert {a[2] for a in whole} == {"adwin", "ph_large"}

    # batch boundaries: random sizes plus the awkward places (inside / at the end of the
    # first warm-up, on an alarm, right after one)
    rng = np.random.default_rng(100 + seed)
    cuts = set(np.cumsum(rng.integers(1, 2_500, size=40)).tolist())
    first_alarm = whole[0][1]
    cuts |= {1, WARMUP - 1, WARMUP, WARMUP + 1, first_alarm, first_alarm + 1, first_alarm + WARMUP}
    cuts = sorted(c for c in cuts if 0 < c < x.size) + [x.size]

    state = ResidualDriftMonitor().to_state()
    pieces: list[tuple] = []
    start = 0
    for end in cuts:
        json.loads(state)  # plain JSON text every time
        mon = ResidualDriftMonitor.from_state(state)
        assert mon.n_seen == start
        pieces += _global(mon.update(x[start:end]), start)
        state = mon.to_state()
        start = end
    assert pieces == whole
    final = ResidualDriftMonitor.from_state(state)
    assert final.n_seen == one.n_seen == x.size
    assert final.n_alarms == one.n_alarms
    assert (final.location, final.scale) == (one.location, one.scale)


def test_state_round_trip_of_river_objects_continues_identically() -> None:
    rng = np.random.default_rng(7)
    mon = ResidualDriftMonitor()
    mon.update(rng.standard_normal(5_000))
    twin = ResidualDriftMonitor.from_state(mon.to_state())
    # the River detectors came back as River detectors with the same internal state
    for spec, a, b in zip(DEFAULT_DETECTORS, mon._detectors, twin._detectors):
        assert type(a) is type(b)
    assert mon._detectors[0].width == twin._detectors[0].width
    assert mon._detectors[0].total == twin._detectors[0].total
    assert mon._detectors[1]._x_mean.get() == twin._detectors[1]._x_mean.get()
    tail = rng.standard_normal(3_000) + 1.0
    assert mon.update(tail) == twin.update(tail) != []


def test_state_while_warming_and_fresh() -> None:
    mon = ResidualDriftMonitor()
    mon.update(np.arange(10.0))
    back = ResidualDriftMonitor.from_state(mon.to_state())
    assert back.warming and back.n_seen == 10 and back._buffer == list(np.arange(10.0))
    assert ResidualDriftMonitor.from_state(ResidualDriftMonitor().to_state()).n_seen == 0


def test_tampered_state_cannot_unpickle_arbitrary_objects() -> None:
    mon = ResidualDriftMonitor(DriftConfig(warmup=2))
    mon.update(np.array([0.0, 1.0, 0.5]))
    state = json.loads(mon.to_state())
    state["detectors"] = base64.b64encode(pickle.dumps([os.getcwd])).decode()
    with pytest.raises(pickle.UnpicklingError):
        ResidualDriftMonitor.from_state(json.dumps(state))
    with pytest.raises(ValueError):
        ResidualDriftMonitor.from_state(json.dumps({**state, "version": 999}))


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_obvious_two_sigma_shift_is_caught_fast_and_dated(sign: float) -> None:
    change = WARMUP + 2_000
    delays, errors, shifts = [], [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x = 5.0 + 0.3 * rng.standard_normal(change + 500)  # arbitrary units: the monitor standardizes
        x[change:] += sign * 2.0 * 0.3
        mon = ResidualDriftMonitor()
        alarms = mon.update(x)
        assert alarms, f"seed {seed}: no alarm"
        a = alarms[0]
        assert a.index >= change, f"seed {seed}: false alarm at {a.index}"
        delays.append(a.index - change)
        assert a.direction == ("up" if sign > 0 else "down")
        assert a.change_index is not None
        errors.append(a.change_index - change)
        shifts.append(sign * a.shift)
        assert a.n_seen == a.index + 1
        assert mon.warming and mon.location is None  # re-warming after the alarm
    # a 2 SD step: CUSUM with k = 0.5, h = 12 needs ~(12 + 1.17) / 1.5 ~ 9 trades on average
    assert max(delays) <= 30 and np.mean(delays) <= 15, delays
    # the change point is dated to within a few trades (median), never grossly
    assert np.median(np.abs(errors)) <= 2 and max(np.abs(errors)) <= 25, errors
    # the estimated shift (in SDs) is about right: CUSUM estimates are biased up at alarm time
    assert min(shifts) > 0.5 and 1.5 <= np.mean(shifts) <= 2.6, shifts


def test_no_alarm_on_a_modest_stationary_stream() -> None:
    # seed 20240601, 20,000 values (19,000 monitored): a sanity check, not a proof of the
    # expected run length (>= 50,000) -- the bench measures that over millions of trades
    for noise in ("gaussian", "t5"):
        rng = np.random.default_rng(20240601)
        x = drift_bench._noise(rng, 20_000, noise) * 0.02 - 0.01
        mon = ResidualDriftMonitor()
        assert mon.update(x) == [], noise
        assert mon.n_seen == 20_000 and mon.n_alarms == 0


def test_no_alarm_during_warm_up_and_index_bookkeeping() -> None:
    mon = ResidualDriftMonitor(DriftConfig(warmup=50))
    assert mon.update(np.r_[np.zeros(25), np.full(24, 1e3)]) == []  # wild, but still warming
    assert mon.warming and mon.n_seen == 49
    mon2 = ResidualDriftMonitor(DriftConfig(warmup=50))
    rng = np.random.default_rng(3)
    mon2.update(rng.standard_normal(480))
    alarms = mon2.update(np.r_[rng.standard_normal(20), rng.standard_normal(200) + 3.0])
    assert alarms and 20 <= alarms[0].index < 60 and alarms[0].n_seen == 480 + alarms[0].index + 1
    assert -15 <= alarms[0].change_index - 20 <= 5


def test_non_finite_residuals_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        ResidualDriftMonitor().update(np.array([0.1, np.nan]))


# ----------------------------------------------------------------------------- warm-up
def test_warm_up_estimates_are_the_winsorized_mean_and_sd() -> None:
    rng = np.random.default_rng(11)
    w = 3.0 + 2.0 * rng.standard_normal(WARMUP)
    mon = ResidualDriftMonitor()
    mon.update(w[:-1])
    assert mon.warming and mon.location is None and mon.scale is None
    mon.update(w[-1:])
    assert not mon.warming
    med = np.median(w)
    fence = 5.0 * 1.4826 * np.median(np.abs(w - med))
    assert np.all(np.abs(w - med) < fence)  # nothing to winsorize: plain mean and SD
    assert mon.location == pytest.approx(w.mean(), rel=0, abs=1e-12)
    assert mon.scale == pytest.approx(w.std(ddof=1), rel=1e-12)
    assert abs(mon.location - 3.0) < 0.2 and abs(mon.scale - 2.0) < 0.15

    # one wild trade in the warm-up: clipped at the fence, the scale stays honest
    w2 = w.copy()
    w2[17] = 1e6
    loc, scale = ResidualDriftMonitor().warmup_estimates(w2)
    assert abs(scale - w.std(ddof=1)) < 0.1 * w.std(ddof=1)
    assert abs(loc - w.mean()) < 0.05
    assert np.std(w2, ddof=1) > 1e4  # what a plain SD would have said

    # constant warm-up: scale floor, then any different value is a (clipped) 4-sigma residual
    mon3 = ResidualDriftMonitor(DriftConfig(warmup=20))
    mon3.update(np.full(20, 0.5))
    assert mon3.scale == DriftConfig().min_scale
    assert mon3.update(np.full(40, 0.6))  # caught


def test_re_warm_after_alarm_estimates_the_new_regime() -> None:
    rng = np.random.default_rng(5)
    x = np.r_[rng.standard_normal(WARMUP + 500), 4.0 + 3.0 * rng.standard_normal(WARMUP + 10)]
    mon = ResidualDriftMonitor()
    alarms = mon.update(x)
    assert len(alarms) >= 1
    k = alarms[-1].index + 1 + WARMUP
    assert k <= x.size, "the second warm-up must have finished inside the stream"
    assert mon.location == pytest.approx(ResidualDriftMonitor().warmup_estimates(x[k - WARMUP : k])[0])
    assert abs(mon.location - 4.0) < 0.4 and abs(mon.scale - 3.0) < 0.4


# ----------------------------------------------------------------------------- River
def test_river_side_by_side_reproduces_rivers_documented_indices() -> None:
    rows = drift_bench.river_side_by_side()
    documented = [r for r in rows if r["documented"] is not None]
    assert all(r["match"] for r in documented), documented
    adwin = next(r for r in documented if r["stream"] == "data_stream_1" and r["detector"] == "ADWIN()")
    assert adwin["river"] == adwin["ours"] == [1023]


def test_passthrough_alarm_fields_on_rivers_adwin_stream() -> None:
    np.random.seed(12345)
    stream = np.concatenate((np.random.randint(2, size=1000), np.random.randint(8, size=1000)))
    mon = ResidualDriftMonitor(DriftConfig.passthrough(DetectorSpec("adwin", "adwin")))
    alarms = mon.update(stream[:600]) + mon.update(stream[600:])
    assert [(a.index, a.n_seen) for a in alarms] == [(1023 - 600, 1024)]
    a = alarms[0]
    # raw values: no standardized CUSUM to date it, so the window ADWIN kept and its split
    assert a.direction == "up" and a.shift == a.statistic > 0.5
    assert 900 <= a.change_index + 600 <= 1023


def test_config_validation_and_json_round_trip() -> None:
    cfg = DriftConfig()
    assert DriftConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError):
        DriftConfig(warmup=1)
    with pytest.raises(ValueError):
        DriftConfig(detectors=(DEFAULT_DETECTORS[0], DEFAULT_DETECTORS[0]))
    with pytest.raises(ValueError):
        DetectorSpec("x", "kswin")


# ----------------------------------------------------------------------------- bench plumbing
def test_bench_report_runs_end_to_end_on_tiny_sizes() -> None:
    d = drift_bench.drift_report(quick=True, workers=1, sizes=(60_000, 30_000, 12, 6))
    text = drift_bench.format_drift_report(d)
    assert "| figure | measured | target | status |" in text
    assert "ERT, stationary gaussian" in text and "ERT, stationary t5" in text
    assert text.count("| match |") == 6
    e = d["ert"]["gaussian"]
    assert e["runs"] == 2 and e["monitored_trades"] <= 60_000
    lo, hi = e["alarms_per_100k_ci95"]
    assert lo <= e["alarms_per_100k"] <= hi
    assert {r["shift_sigma"] for r in d["delay"]} == {0.3, 1.0}
    assert all(r["runs"] == 12 for r in d["delay"])
    assert not math.isnan(d["delay"][-1]["mean"])
