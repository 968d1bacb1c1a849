"""The controller's pure core: bounds, cooldowns, rollback, bad telemetry, restart, priors, convergence.

Property tests drive `update` with random telemetry streams (hypothesis); the deterministic
tests run it in closed loop against `synth.SimEngine`, whose optimum is planted.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta_pipeline.meta.controller import (
    ControllerConfig,
    ControllerState,
    TelemetryError,
    advance,
    cold_start,
    inject_change,
    lengthened_cooldown,
    prior_pull_bonus,
    split_batches,
    update,
)
from meta_pipeline.lab.simulate import (
    poor_start_knobs,
    random_policy_mean,
    run_closed_loop,
    start_state,
)
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, default_knobs, knobs_to_unit, unit_to_knobs
from meta_pipeline.lab.synth import make_engine

T0 = pd.Timestamp("2026-03-01", tz="UTC")
STEP = pd.Timedelta(minutes=5)
FLEET_CENTRE = unit_to_knobs(np.array([0.7, 0.35, 0.3, 0.55, 1.0, 0.4]))
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tick_frame(ticks: list[dict], start: int, knobs: dict[str, float] | None) -> pd.DataFrame:
    rows = []
    for i, t in enumerate(ticks):
        row = {"ts": T0 + STEP * (start + i), **t}
        if knobs is not None:
            row.update({f"knob_{n}": float(knobs[n]) for n in KNOB_NAMES})
        rows.append(row)
    return pd.DataFrame(rows)


def good_batch(state: ControllerState, start: int, n: int = 1, gain: float = 0.03) -> pd.DataFrame:
    tick = {"gain_p50": gain, "stability_mean": 0.8, "vram_utilization": 0.5, "latency_ms": 120.0}
    return tick_frame([tick] * n, start, state.knobs)


# ---------------------------------------------------------------------------
# random telemetry streams
# ---------------------------------------------------------------------------

tick_values = st.fixed_dictionaries(
    {
        "gain_p50": st.floats(-0.1, 0.1, allow_nan=False),
        "stability_mean": st.floats(0.0, 1.0),
        "vram_utilization": st.floats(0.0, 1.0),
        "latency_ms": st.floats(0.0, 2000.0),
    }
)
# how a batch reports its knobs: the controller's (the engine follows), none, or foreign random ones
report_mode = st.sampled_from(["controller", "controller", "controller", "none", "foreign"])
stream = st.lists(st.tuples(st.lists(tick_values, min_size=1, max_size=3), report_mode,
                            st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6)),
                  min_size=5, max_size=40)


def run_stream(state: ControllerState, batches, config: ControllerConfig, start_tick: int = 0):
    """Feed a generated stream; yields (state before, decision, state after) per batch."""
    tick = start_tick
    for ticks, mode, unit in batches:
        knobs = {"controller": state.knobs, "none": None, "foreign": unit_to_knobs(np.array(unit))}[mode]
        frame = tick_frame(ticks, tick, knobs)
        tick += len(ticks)
        new, decision = update(state, frame, config)
        yield state, decision, new
        state = new


@PROPERTY
@given(batches=stream, seed=st.integers(0, 2**16), use_prior=st.booleans())
def test_knobs_never_leave_bounds_and_keep_their_kind(batches, seed, use_prior):
    config = ControllerConfig(base_cooldown=2, early_z=1.0, initial_noise_sd=0.02)
    state = cold_start(FLEET_CENTRE if use_prior else None, config, seed)
    for _, decision, new in run_stream(state, batches, config):
        for name, spec in KNOBS.items():
            value = new.knobs[name]
            assert spec.low <= value <= spec.high, (name, value)
            if spec.kind in ("int", "bool"):
                assert value == round(value), (name, value)
            if spec.kind == "bool":
                assert value in (0.0, 1.0)
        assert decision["knobs"] == new.knobs
        assert set(decision["policy_updates"]) <= set(KNOB_NAMES)


@PROPERTY
@given(batches=stream, seed=st.integers(0, 2**16))
def test_no_knob_moves_during_its_cooldown(batches, seed):
    """A knob whose cooldown has not run out may only go back to its snapshot (rollback/revert);
    every knob that changes enters a cooldown."""
    config = ControllerConfig(base_cooldown=3, early_z=1.0, initial_noise_sd=0.02)
    state = cold_start(None, config, seed)
    for before, decision, after in run_stream(state, batches, config):
        counted = 1 if decision["evidence"] == "current" else 0
        moved = {name: after.knobs[name] for name in KNOB_NAMES if after.knobs[name] != before.knobs[name]}
        # every move is reported as a policy update, and nothing else is (streams without any move are valid too)
        assert decision["policy_updates"] == moved, (moved, decision["note"])
        for name in moved:
            assert after.cooldowns[name] >= 1, f"{name} changed without entering a cooldown"
            if before.cooldowns[name] - counted > 0:
                assert decision["rolled_back"] or decision["reverted"], (name, decision["note"])
                assert after.knobs[name] == before.snapshot["knobs"][name]


bad_value = st.sampled_from([math.nan, math.inf, -math.inf, "oops", None])


@PROPERTY
@given(
    batches=stream,
    n=st.integers(1, 4),
    row=st.integers(0, 3),
    field=st.sampled_from(["gain_p50", "stability_mean", "vram_utilization", "latency_ms"]),
    value=bad_value,
    seed=st.integers(0, 1000),
)
def test_bad_telemetry_is_rejected_and_the_state_is_untouched(batches, n, row, field, value, seed):
    config = ControllerConfig()
    state = cold_start(None, config, seed)
    for _, _, state in run_stream(state, batches[:5], config):
        pass
    frozen = state.to_json()
    frame = good_batch(state, 1000, n)
    frame[field] = frame[field].astype(object)
    frame.loc[min(row, n - 1), field] = value
    with pytest.raises(TelemetryError) as err:
        update(state, frame, config)
    assert field in str(err.value) and "row" in str(err.value)
    assert state.to_json() == frozen
    # the same stream through `advance` (the asset's path) is rejected whole
    with pytest.raises(TelemetryError):
        advance(state, pd.concat([good_batch(state, 990, 2), frame], ignore_index=True), config)
    assert state.to_json() == frozen


@pytest.mark.parametrize("missing", ["ts", "gain_p50", "stability_mean", "vram_utilization", "latency_ms"])
def test_missing_field_is_named(missing):
    state = cold_start()
    frozen = state.to_json()
    with pytest.raises(TelemetryError, match=f"missing required field.*{missing}"):
        update(state, good_batch(state, 0).drop(columns=[missing]))
    assert state.to_json() == frozen


def test_other_bad_batches_are_rejected():
    state = cold_start()
    assert issubclass(TelemetryError, ValueError)
    with pytest.raises(TelemetryError, match="empty"):
        update(state, good_batch(state, 0).iloc[:0])
    frame = good_batch(state, 0)
    frame["stability_mean"] = 1.5
    with pytest.raises(TelemetryError, match="stability_mean.*outside"):
        update(state, frame)
    frame = good_batch(state, 0)
    frame["knob_tau"] = math.inf
    with pytest.raises(TelemetryError, match="knob_tau"):
        update(state, frame)
    frame = good_batch(state, 0)
    frame["ts"] = "not a time"
    with pytest.raises(TelemetryError, match="'ts'"):
        update(state, frame)
    # a tick is never decided on twice
    state, _ = update(state, good_batch(state, 5))
    with pytest.raises(TelemetryError, match="not newer"):
        update(state, good_batch(state, 5))


@PROPERTY
@given(batches=stream, cut=st.integers(1, 39), seed=st.integers(0, 2**16), use_prior=st.booleans())
def test_restart_from_persisted_state_gives_the_same_decisions(batches, cut, seed, use_prior):
    config = ControllerConfig(base_cooldown=2, early_z=1.0)
    prior = FLEET_CENTRE if use_prior else None
    state = cold_start(prior, config, seed)
    straight = [d for _, d, _ in run_stream(state, batches, config)]
    cut = min(cut, len(batches))
    first = list(run_stream(state, batches[:cut], config))
    restored = ControllerState.from_json(first[-1][2].to_json())
    start = sum(len(b[0]) for b in batches[:cut])
    resumed = [d for _, d, _ in run_stream(restored, batches[cut:], config, start_tick=start)]
    assert [d for _, d, _ in first] + resumed == straight


# ---------------------------------------------------------------------------
# deterministic behaviour against planted truth
# ---------------------------------------------------------------------------


def engine(seed: int = 0, outlier: bool = False):
    return make_engine(f"t{seed}", np.random.default_rng(seed), outlier=outlier)


def far_tau(e) -> float:
    spec = KNOBS["tau"]
    return spec.low if e.optimum["tau"] - spec.low > spec.high - e.optimum["tau"] else spec.high


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_harmful_change_is_rolled_back_within_3_decisions(seed):
    e = engine(seed)
    config = ControllerConfig()
    warm = run_closed_loop(e, 30, 1, seed, config, state=start_state(default_knobs(), config, seed))
    state = warm.attrs["final_state"]
    good = state.incumbent_knobs
    bad = {"tau": far_tau(e)}
    assert e.expected_reward(good) - e.expected_reward({**good, **bad}) > 0.3  # the planted harm
    after = run_closed_loop(e, 6, 1, seed + 100, config, state=state, inject={0: bad}, start=T0 + STEP * 30)
    verdicts = after[after["judged"] == "injected"]
    assert len(verdicts) and int(verdicts.iloc[0]["decision"]) <= 3
    assert bool(verdicts.iloc[0]["rolled_back"])
    back = int(verdicts.iloc[0]["decision"])
    assert after.iloc[back]["knob_tau"] == good["tau"]  # the next batch runs the snapshot again
    assert after.attrs["final_state"].rollbacks == state.rollbacks + 1


def test_cooldown_is_lengthened_after_each_rollback():
    config = ControllerConfig()
    state = cold_start(None, config, 0)
    tick = 0
    for _ in range(4):  # an incumbent with a steady reward
        state, _ = update(state, good_batch(state, tick), config)
        tick += 1
    lengths = []
    for _ in range(3):
        state = inject_change(state, {"tau": 0.8}, config)
        assert state.cooldowns["tau"] == config.base_cooldown
        state, decision = update(state, good_batch(state, tick, gain=-0.05), config)  # reward collapses
        tick += 1
        assert decision["rolled_back"] and state.knobs["tau"] == default_knobs()["tau"]
        lengths.append(state.cooldowns["tau"])
        while state.cooldowns["tau"] > 0:  # let it cool down, at the old reward
            state, _ = update(state, good_batch(state, tick), config)
            tick += 1
            if state.pending:  # keep other trials out of the way of this test
                state = inject_change(state, {}, config)
    assert lengths == [lengthened_cooldown(f, config) for f in (1, 2, 3)]
    assert lengths[0] > config.base_cooldown and lengths[0] < lengths[1] < lengths[2] <= config.max_cooldown
    assert state.rollbacks == 3


def test_cold_start_from_prior_vs_defaults():
    config = ControllerConfig()
    plain = cold_start(None, config, 0)
    assert plain.knobs == default_knobs()
    assert plain.prior is None and plain.prior_weight == 0.0
    prior = {"tau": 0.9, "g_min": 0.05, "tier3_topk": 7.4, "tier2_enabled": 0.2, "unknown_knob": 3.0}
    warm = cold_start(prior, config, 0)
    assert warm.knobs["tau"] == 0.9 and warm.knobs["g_min"] == 0.05
    assert warm.knobs["tier3_topk"] == 7.0 and warm.knobs["tier2_enabled"] == 0.0  # kinds kept
    assert warm.knobs["lambda_ci"] == default_knobs()["lambda_ci"]  # not in the prior
    assert "unknown_knob" not in warm.prior and warm.prior_weight == 1.0
    # no prior: explore wide; a prior: start near it with smaller steps
    assert all(plain.steps[n] > warm.steps[n] for n in KNOB_NAMES)


def test_prior_pull_fades_with_evidence():
    config = ControllerConfig(prior_strength=10.0)
    e = engine(3)
    run = run_closed_loop(e, 60, 1, 3, config, prior=FLEET_CENTRE)
    weights = run["prior_weight"].to_numpy()
    assert weights[0] == pytest.approx(10.0 / 11.0)
    assert np.all(np.diff(weights) < 0) and weights[-1] == pytest.approx(10.0 / 70.0)
    # the pull credits a move toward the prior, debits one away, in proportion to the weight
    here = dict(FLEET_CENTRE, tau=0.85)
    toward = dict(here, tau=0.9)
    assert prior_pull_bonus(here, toward, FLEET_CENTRE, 1.0, 0.3) > 0
    assert prior_pull_bonus(toward, here, FLEET_CENTRE, 1.0, 0.3) < 0
    assert prior_pull_bonus(here, toward, FLEET_CENTRE, weights[-1], 0.3) == pytest.approx(
        weights[-1] * prior_pull_bonus(here, toward, FLEET_CENTRE, 1.0, 0.3))


def test_newer_prior_is_only_a_pull_never_a_jump():
    config = ControllerConfig()
    state = cold_start(FLEET_CENTRE, config, 1)
    tick = 0
    while not (state.pending and max(state.cooldowns.values()) > 1):  # until a fresh trial is cooling
        state, _ = update(state, good_batch(state, tick), config, prior=FLEET_CENTRE)
        tick += 1
        assert tick < 30
    newer = {n: KNOBS[n].high for n in KNOB_NAMES}  # far from everything
    before = dict(state.knobs)
    state2, decision = update(state, good_batch(state, tick), config, prior=newer)
    assert state2.prior == newer and "new prior picked up" in decision["note"]
    assert state2.prior_weight < 1.0  # the domain's evidence still counts
    new_moves = []
    for name in KNOB_NAMES:
        if state2.knobs[name] == before[name]:
            continue
        if state2.knobs[name] == state.snapshot["knobs"][name]:
            continue  # back to the snapshot (rollback / revert)
        assert state.cooldowns[name] <= 1, f"{name} moved during its cooldown"
        new_moves.append(name)
    assert len(new_moves) <= 1  # at most the next one-knob trial, never a jump to the prior
    for name in new_moves:
        step = abs(KNOBS[name].to_unit(state2.knobs[name]) - KNOBS[name].to_unit(before[name]))
        assert step <= config.max_step * math.sqrt(0.5 / 0.3) + 1e-9 or KNOBS[name].kind == "bool"


@pytest.mark.parametrize("seed", [0, 1])
def test_negative_transfer_guard_trips_on_an_outlier_engine(seed):
    config = ControllerConfig()
    outlier = engine(seed, outlier=True)
    run = run_closed_loop(outlier, 80, 1, seed, config, prior=FLEET_CENTRE)
    state = run.attrs["final_state"]
    assert state.prior_disabled
    assert state.prior_disabled_reason.startswith("negative transfer")
    assert "prior's point" in state.prior_disabled_reason
    first = int(run["prior_disabled"].to_numpy().argmax())
    assert first + 1 >= config.negative_transfer_window
    assert (run["prior_weight"].iloc[first:] == 0).all()
    # the same prior on an ordinary engine (near the fleet centre) is kept
    normal = run_closed_loop(engine(seed), 80, 1, seed, config, prior=FLEET_CENTRE)
    assert not normal.attrs["final_state"].prior_disabled


def test_converges_from_a_poor_start_on_stationary_engines():
    """Short version of `simulate --evaluate` (b): a start far from the planted optimum."""
    config = ControllerConfig()
    fractions, normalized = [], []
    for seed in (0, 1, 2):
        e = engine(seed)
        oracle = e.oracle()[1]
        start = poor_start_knobs()
        assert e.expected_reward(start) < 0.3 * oracle  # not trivially near the optimum
        run = run_closed_loop(e, 100, 1, seed, config, state=start_state(start, config, seed))
        expected = run["incumbent_expected"].iloc[-1]
        fractions.append(expected / oracle)
        rnd = random_policy_mean(e, n=300, seed=seed)
        normalized.append((expected - rnd) / (oracle - rnd))
    assert min(fractions) >= 0.8 and np.mean(fractions) >= 0.9, fractions
    assert np.mean(normalized) >= 0.6, normalized


def test_foreign_and_stale_telemetry_is_not_evidence():
    config = ControllerConfig()
    state = cold_start(None, config, 0)
    foreign = dict(default_knobs(), tau=0.81)
    frame = good_batch(state, 0)
    frame["knob_tau"] = foreign["tau"]
    new, decision = update(state, frame, config)
    assert decision["evidence"] == "foreign" and new.evidence == 0 and new.knobs == state.knobs
    assert decision["policy_updates"] == {}
    # a trial the engine has not applied yet: its telemetry still runs the snapshot
    for i in range(1, 4):
        new, decision = update(new, good_batch(new, i), config)
    assert new.pending is not None
    cooling, seen = dict(new.cooldowns), new.pending["n"]
    stale = tick_frame([{"gain_p50": 0.03, "stability_mean": 0.8, "vram_utilization": 0.5, "latency_ms": 120.0}],
                       10, new.snapshot["knobs"])
    after, decision = update(new, stale, config)
    assert decision["evidence"] == "snapshot" and after.cooldowns == cooling and after.pending["n"] == seen


def test_split_batches_never_mix_policies():
    state = cold_start()
    a = good_batch(state, 0, 5)
    b = good_batch(state, 5, 3)
    b["knob_tau"] = 0.9
    frame = pd.concat([a, b], ignore_index=True).sample(frac=1.0, random_state=1)  # order by ts is restored
    batches = split_batches(frame, 2)
    assert [len(x) for x in batches] == [2, 2, 1, 2, 1]
    assert all(x["knob_tau"].nunique() == 1 for x in batches)
    assert pd.concat(batches)["ts"].is_monotonic_increasing


def test_config_is_bounded():
    with pytest.raises(ValueError, match="ema_alpha"):
        ControllerConfig(ema_alpha=0.0)
    with pytest.raises(ValueError, match="base_cooldown"):
        ControllerConfig(base_cooldown=2.5)
    with pytest.raises(ValueError, match="max_cooldown"):
        ControllerConfig(base_cooldown=10, max_cooldown=5)


def test_state_json_round_trip_is_exact():
    e = engine(4)
    run = run_closed_loop(e, 25, 1, 4, prior=FLEET_CENTRE)
    state = run.attrs["final_state"]
    text = state.to_json()
    assert ControllerState.from_json(text).to_json() == text
    assert json.loads(text)["decisions"] == 25
    with pytest.raises(ValueError, match="unknown field"):
        ControllerState.from_json(json.dumps({**json.loads(text), "bogus": 1}))
    assert np.allclose(knobs_to_unit(state.knobs), knobs_to_unit(ControllerState.from_json(text).knobs))
