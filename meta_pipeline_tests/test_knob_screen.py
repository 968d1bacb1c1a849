"""The counterfactual knob screen (meta.knob_screen): planted truth on small fleets, hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from meta_pipeline.knobs import default_knobs
from meta_pipeline.lab import synth
from meta_pipeline.lab.knob_tuning_eval import domain_frames, plant_flicker
from meta_pipeline.meta.controller import ControllerConfig, cold_start
from meta_pipeline.meta.knob_screen import (
    ScreenConfig,
    ScreenedCandidate,
    combined_candidates,
    max_t_threshold,
    per_knob_candidates,
    screen_folds,
    screen_knobs,
    screen_step,
    screen_threshold,
)
from meta_pipeline.meta.knob_trial import PairedTrial, judge_paired_trial

# the knobs whose situation the two fleets plant (g_min, lambda_ci: noise lessons); tau too, as a knob that
# should not win on either; a small budget keeps the tests fast (each candidate: one fit per fold)
SCREEN = ScreenConfig(knobs=("g_min", "lambda_ci", "tau"), points=2, budget=6, min_combined=1, fold_days=5.0,
                      folds=3, min_history_trades=800, min_trades=400)


def _fleet(seed: int, **overrides) -> synth.DomainData:
    fleet = synth.generate_fleet(n_domains=1, n_trades=9_000, train_days=30.0, holdout_days=1.0, seed=seed,
                                 telemetry_ticks=10, **overrides)
    return next(iter(fleet.domains.values()))


def _now(domain: synth.DomainData) -> pd.Timestamp:
    t = pd.Timestamp(domain.truth.train_end)
    return t.tz_localize("UTC") if t.tzinfo is None else t


def test_threshold_is_bonferroni_on_the_candidates_scored():
    assert screen_threshold(1, 0.1) == pytest.approx(norm.ppf(0.9))
    assert screen_threshold(10, 0.1) == pytest.approx(2.3263, abs=1e-4)  # Φ⁻¹(1 − 0.01)
    assert screen_threshold(20, 0.05) > screen_threshold(10, 0.05)


def test_max_t_threshold_is_tighter_for_correlated_candidates_and_holds_its_level():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2_000, 1))
    same = np.repeat(base, 8, axis=1) + 0.01 * rng.normal(size=(2_000, 8))  # 8 near-identical candidates
    indep = rng.normal(size=(2_000, 8))
    assert max_t_threshold(same, 0.1) < max_t_threshold(indep, 0.1) <= screen_threshold(8, 0.1) + 1e-12
    assert max_t_threshold(same, 0.1) == pytest.approx(norm.ppf(0.9), abs=0.15)  # ≈ one candidate
    # level: under the null (mean-zero differences) the max z exceeds z* in about α of the data sets
    hits = 0
    for b in range(60):
        d = np.random.default_rng(100 + b).normal(size=(400, 5))
        z = d.mean(axis=0) / (d.std(axis=0, ddof=1) / math.sqrt(400))
        hits += bool(z.max() >= max_t_threshold(d, 0.1, draws=400, seed=b))
    assert hits <= 14  # α = 0.1 → ≈ 6 of 60; a broken threshold (e.g. unadjusted 1.28) gives ≈ 25


def test_candidates_cover_every_knob_before_a_budget_cut_and_combine_positive_moves():
    inc = default_knobs()
    cands = per_knob_candidates(inc, points=3, knobs=("g_min", "tau", "tier2_enabled"))
    # far bound of every knob first: g_min's far bound is 0.1 (default 0.02), tau's 0.8 (default 0.95)
    assert [next(n for n in ("g_min", "tau", "tier2_enabled") if c[n] != inc[n]) for c in cands[:3]] == \
        ["g_min", "tau", "tier2_enabled"]
    assert cands[0]["g_min"] == 0.1 and cands[1]["tau"] == 0.8 and cands[2]["tier2_enabled"] == 0.0
    assert all(c != inc for c in cands) and len(cands) == 3 + 3 + 1  # g_min, tau: 3 values each (none the default)

    def cand(name, value, z):
        return ScreenedCandidate({**inc, name: value}, {name: value}, "knob", PairedTrial(100, 1, 1, 1, z * 0.01, 0.01))

    scored = [cand("g_min", 0.1, 2.0), cand("g_min", 0.05, 1.0), cand("tau", 0.8, 0.5), cand("lambda_ci", 0.7, -1.0)]
    combos = combined_candidates(inc, scored)
    assert combos == [{**inc, "g_min": 0.1, "tau": 0.8}]  # lambda_ci's best move scored z < 0: left out


def test_folds_sit_on_a_fixed_grid_and_need_history():
    closed = pd.Series(pd.date_range("2026-06-01", periods=3_000, freq="h", tz="UTC"))
    cfg = ScreenConfig(fold_days=4.0, folds=2, min_history_trades=100, min_trades=50)
    now = closed.iloc[-1]
    folds = screen_folds(closed, now, cfg)
    assert len(folds) == 2 and folds[-1][1] == now and folds[0][1] == folds[1][0]
    assert (folds[1][0] - folds[0][0]) == pd.Timedelta(days=4)
    # the grid does not move with `now` inside a grid step: the fits as of the fold starts are reused
    assert screen_folds(closed, now - pd.Timedelta(hours=1), cfg)[0][0] in (folds[0][0], folds[0][0] - pd.Timedelta(days=4))
    assert screen_folds(closed, closed.iloc[50], cfg) == []  # too little history before any fold


def test_noise_lessons_the_screen_picks_a_higher_g_min_or_lambda_ci():
    """Planted truth: flickering noise lessons (their past edge says nothing about their next trades) beside
    barely-there real signals — dropping weak lessons (higher g_min) or shrinking edges to their lower bound
    (higher lambda_ci) wins; a lower lambda_ci (less shrinkage) must not be the pick."""
    domain = plant_flicker(_fleet(0, n_families=2, e0_range=(0.02, 0.05)), 0)
    frames = domain_frames(domain)
    res = screen_knobs(frames, default_knobs(), _now(domain), SCREEN)
    assert res.pick is not None, res.note()
    inc = default_knobs()
    assert any(res.pick.moved.get(n, inc[n]) > inc[n] for n in ("g_min", "lambda_ci")), res.note()
    assert res.pick.moved.get("lambda_ci", inc["lambda_ci"]) >= inc["lambda_ci"], res.note()
    assert res.pick.trial.z >= res.threshold > 0
    assert 0 < res.threshold <= screen_threshold(len(res.candidates), SCREEN.family_alpha) + 1e-12


def test_stationary_fleet_where_the_defaults_are_best_picks_nothing():
    """Planted truth: strong stationary signals, hardly any noise patterns, no decay — no candidate clears
    the multiplicity-aware threshold, so the controller starts no trial."""
    domain = _fleet(0, n_noise_patterns=2, noise_fire_p=(0.02, 0.04), e0_range=(0.5, 0.9),
                    decaying_half_life_days=(5_000.0, 9_000.0), improving_doubling_days=(5_000.0, 9_000.0))
    frames = domain_frames(domain)
    res = screen_knobs(frames, default_knobs(), _now(domain), SCREEN)
    assert res.candidates and res.pick is None, res.note()
    assert all(c.trial.z < res.threshold for c in res.candidates)
    state = cold_start(None, ControllerConfig(), seed=0)
    after, decisions, notes = screen_step(state, lambda s: res, ControllerConfig())
    assert after.pending is None and decisions == [] and "none qualifies" in notes[0]


def test_a_pick_is_a_live_trial_that_a_bad_paired_verdict_rolls_back():
    inc = default_knobs()
    pick = ScreenedCandidate({**inc, "g_min": 0.1, "lambda_ci": 0.7}, {"g_min": 0.1, "lambda_ci": 0.7}, "combined",
                             PairedTrial(3000, 1, 1, 1, 0.01, 0.003))
    from meta_pipeline.meta.knob_screen import ScreenResult

    result = ScreenResult("2026-06-01T00:00:00+00:00", "2026-06-10T00:00:00+00:00", 3000, 2.0, [pick], pick)
    cfg = ControllerConfig(paired_knobs=("g_min", "lambda_ci"))
    state = cold_start(None, cfg, seed=0)
    state.knobs = dict(inc)
    started, decisions, _ = screen_step(state, lambda s: result, cfg)
    assert started.pending["source"] == "screen" and started.knobs["g_min"] == 0.1 and started.knobs["lambda_ci"] == 0.7
    assert decisions[0]["policy_updates"] == {"g_min": 0.1, "lambda_ci": 0.7}
    judged, out = judge_paired_trial(started, PairedTrial(1500, 1.0, 1.01, 1.0, -0.01, 0.002), cfg)
    assert out["verdict"] == "rollback" and judged.knobs["g_min"] == inc["g_min"]
    assert judged.knobs["lambda_ci"] == inc["lambda_ci"] and judged.rollbacks == 1
    assert not math.isnan(out["reward_gain"]) and np.isfinite(judged.baseline_mean or 0.0)


def test_step_domain_starts_the_screen_pick_as_a_paired_trial_the_sensor_sees():
    """The controller policy's hook: a stored state with no trial pending and no new telemetry; the screen's
    pick becomes a pending paired trial (stamped with its change time) and a decision whose policy_updates
    move the learning knobs (what knob_trial_sensor turns into a re-learn run)."""
    from meta_pipeline.defs.governance.knob_trials import learning_knob_decisions
    from meta_pipeline.meta.controller_policy import decision_rows, state_row, step_domain
    from meta_pipeline.meta.knob_screen import ScreenResult
    from meta_pipeline.meta.knob_trial import LEARNING_KNOBS, awaits_paired_verdict

    cfg = ControllerConfig(paired_knobs=LEARNING_KNOBS)
    state = cold_start(None, cfg, seed=0)
    state.knobs = default_knobs()
    now = pd.Timestamp("2026-07-01", tz="UTC")
    row = state_row("dom", state, now, None)
    inc = default_knobs()
    pick = ScreenedCandidate({**inc, "g_min": 0.1}, {"g_min": 0.1}, "knob", PairedTrial(3000, 1, 1, 1, 0.01, 0.003))
    result = ScreenResult("2026-06-20T00:00:00+00:00", now.isoformat(), 3000, 2.0, [pick], pick)
    empty = pd.DataFrame(columns=["ts"])
    step = step_domain("dom", row, None, None, lambda last_ts: empty, cfg, paired_screen=lambda s: result, now=now)
    assert step.state.knobs["g_min"] == 0.1 and awaits_paired_verdict(step.state)
    assert step.state.pending["changed_at"] == now.isoformat()
    rows = decision_rows("dom", step.decisions, now).assign(id=range(1, len(step.decisions) + 1))
    moved = learning_knob_decisions(rows)
    assert list(moved["changed"].iloc[0]) == ["g_min"]
    # a pending trial: the screen is not asked again
    again = step_domain("dom", state_row("dom", step.state, now, None), None, None, lambda last_ts: empty, cfg,
                        paired_screen=lambda s: pytest.fail("screened with a trial pending"), now=now)
    assert again.state.knobs["g_min"] == 0.1


def test_a_screen_pick_is_accepted_live_on_a_positive_gain_a_local_trial_needs_z_1():
    """The screen's pick passed a family-wise test already: at the end of its live window it is accepted when
    its fresh trades show a positive gain (z > 0); a trial of the controller's own proposer needs z ≥ 1."""
    from meta_pipeline.meta.knob_trial import LEARNING_KNOBS, live_accept_z, paired_step, propose_next

    cfg = ControllerConfig(paired_knobs=LEARNING_KNOBS, paired_max_trades=1_500)
    inc = default_knobs()
    pick = ScreenedCandidate({**inc, "g_min": 0.1}, {"g_min": 0.1}, "knob", PairedTrial(3000, 1, 1, 1, 0.01, 0.003))
    from meta_pipeline.meta.knob_screen import start_screened_trial

    state = cold_start(None, cfg, seed=0)
    state.knobs = dict(inc)
    screened = start_screened_trial(state, pick, cfg)
    weak = PairedTrial(1_600, 1.0, 0.9995, 1.0, 0.0005, 0.001)  # z = 0.5 after the whole window
    assert live_accept_z(screened) < 1e-6
    done, decisions, _ = paired_step(screened, lambda s: (weak, ""), cfg)
    assert decisions[0]["accepted"] and done.knobs["g_min"] == 0.1
    local, proposal = propose_next(state, cfg, only=LEARNING_KNOBS)
    assert proposal and live_accept_z(local) == 1.0
    done, decisions, _ = paired_step(local, lambda s: (weak, ""), cfg)
    assert decisions[0]["reverted"] and done.knobs == state.knobs
    # a pick whose fresh trades show a loss is not accepted
    done, decisions, _ = paired_step(screened, lambda s: (PairedTrial(1_600, 1, 1.0005, 1, -0.0005, 0.001), ""), cfg)
    assert decisions[0]["reverted"] and done.knobs["g_min"] == inc["g_min"]
