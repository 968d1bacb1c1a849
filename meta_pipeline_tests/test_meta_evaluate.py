"""The learn-to-learn benchmark, reduced: it runs fast and the directional results hold."""

import json

import numpy as np
import pytest

from meta_pipeline.cli import main
from meta_pipeline.lab.evaluate import (
    EvaluationConfig,
    format_table,
    gem_metrics,
    mean_ci,
    run_controller,
    run_evaluation,
)
from meta_pipeline.meta.priors import EARLY_PROBE_TICKS, early_negative_transfer
from meta_pipeline.meta.controller import ControllerConfig
from meta_pipeline.lab.synth import make_engine

SMALL = EvaluationConfig(
    n_train_domains=5,
    train_ticks=120,
    decisions=(10, 30),
    outlier_decisions=(30,),
    n_tasks=4,
    task_ticks=100,
    adaptation_ticks=15,
    optuna=True,
    dagster_timing=False,
    reptile_check=True,
    reptile_kwargs={"n_meta_iterations": 40, "n_test_tasks": 10},
)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    return run_evaluation([0, 1, 2], SMALL, out_dir=out), out


def test_reduced_evaluation_directional_results(reduced):
    res, out = reduced
    ws = res["warm_start"]
    r30 = ws["regret_30_per_seed"]
    # starting from the fleet's prior beats starting from scratch, on average and per seed
    assert np.mean(r30["prior"]) < 0.7 * np.mean(r30["scratch"])
    assert sum(p < s for p, s in zip(r30["prior"], r30["scratch"])) >= 2
    assert ws["early_check_false_alarms"] == "0/3"

    nt = res["negative_transfer"]
    reg = {arm: nt["regret_30"][arm][0] for arm in nt["arms"]}
    # the planted outlier: the prior hurts without protection; the guard stack protects
    assert reg["prior_no_guard"] > reg["scratch"]
    assert reg["prior_guard_early"] < reg["prior_no_guard"]
    assert reg["prior_guard_early"] <= 1.25 * reg["scratch"]
    assert nt["early_check_fired"] != "0/3"

    rt = res["retention"]
    assert rt["system"]["BWT"][0] >= -0.05
    # the per-domain memory is what retains: overwriting one policy per task forgets
    assert rt["sequential_finetune"]["forgetting"][0] > rt["system"]["forgetting"][0] + 0.05
    assert rt["system"]["ACC"][0] > rt["shared_policy"]["ACC"][0]
    assert np.asarray(rt["R_mean"]).shape == (4, 4)

    assert res["adaptation"]["core_seconds_max"] < 10
    assert "diff_ci95" in res["reptile"] and res["reptile"]["n_test_tasks"] == 10

    table = format_table(res["table"])
    for section in ("warm start", "negative transfer", "retention", "adaptation", "reptile check"):
        assert section in table
    assert (out / "evaluate.png").stat().st_size > 10_000
    saved = json.loads((out / "evaluate.json").read_text())
    assert saved["seeds"] == [0, 1, 2] and "table" in saved


def test_gem_metrics_on_a_hand_made_matrix():
    # 3 tasks; task 0 learned to 0.9 then decays to 0.6; task 1 stays 0.8; task 2 ends 0.7
    R = np.array([
        [0.9, 0.1, 0.2],
        [0.7, 0.8, 0.3],
        [0.6, 0.8, 0.7],
    ])
    m = gem_metrics(R, baseline=np.array([0.0, 0.0, 0.1]))
    assert m["ACC"] == pytest.approx((0.6 + 0.8 + 0.7) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.8 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)
    assert m["FWT"] == pytest.approx(((0.1 - 0.0) + (0.3 - 0.1)) / 2)


def test_mean_ci_covers_the_mean():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and lo < 2.5 < hi
    assert np.isnan(mean_ci([1.0])[1])


def test_early_check_judges_against_the_fleet():
    fired, why = early_negative_transfer(np.array([0.2, 0.25]), 0.75)
    assert fired and "negative transfer" in why
    fired, why = early_negative_transfer(np.array([0.74, 0.70]), 0.75)
    assert not fired
    assert early_negative_transfer(np.array([0.1]), 0.75)[0]  # one tick far below the fleet is enough
    assert not early_negative_transfer(np.array([0.62]), 0.75)[0]  # one tick within 2σ of the floor is not
    assert not early_negative_transfer(np.array([]), 0.75)[0]  # nothing to judge
    assert not early_negative_transfer(np.array([0.1, 0.1]), None)[0]


def test_early_check_restarts_from_scratch_on_an_outlier():
    rng = np.random.default_rng(4)
    center = np.array([0.8, 0.35, 0.8, 0.8, 1.0, 0.2])
    outlier = make_engine("odd", rng, outlier=True, center=center)
    prior = make_engine("fleet", rng, center=center, spread=0.0).optimum
    cfg = ControllerConfig()
    expected, frame, dropped = run_controller(outlier, 12, prior=prior, config=cfg, seed=1, early_check_low=0.75)
    assert dropped == EARLY_PROBE_TICKS
    assert len(frame) == 12 and list(frame["decision"]) == list(range(1, 13))
    # after the restart the knobs are the scratch defaults, not the prior
    assert frame["knob_tau"].iloc[dropped] != pytest.approx(prior["tau"])
    _, plain, none = run_controller(outlier, 12, prior=prior, config=cfg, seed=1)
    assert none is None and plain["knob_tau"].iloc[0] == pytest.approx(prior["tau"])


def test_cli_evaluate_prints_one_table_and_saves_the_plot(tmp_path, capsys, monkeypatch):
    import meta_pipeline.lab.evaluate as ev

    small = EvaluationConfig(**{**SMALL.__dict__, "optuna": False, "reptile_check": False})
    real = ev.run_evaluation
    monkeypatch.setattr(ev, "run_evaluation", lambda seeds, config, **kw: real(seeds, small, **kw))
    code = main(["evaluate", "--seeds", "1", "--out", str(tmp_path), "--quiet", "--no-reptile", "--no-dagster"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.count("section") == 1 and "value [95% CI]" in text
    assert (tmp_path / "evaluate.png").exists()
    assert main(["evaluate", "--seeds", "0", "--out", str(tmp_path)]) == 2


def test_cli_evaluate_seed_targets_prints_every_target_with_its_definition(tmp_path, capsys, monkeypatch):
    import functools

    import meta_pipeline.lab.seed_targets as st

    small = functools.partial(st.SeedTargetsConfig, n_probe=2, efficiency_horizon=10, task_ticks=80)
    monkeypatch.setattr(st, "SeedTargetsConfig", small)
    code = main(["evaluate", "--section", "seed-targets", "--seeds", "1", "--tasks", "12", "--no-dagster",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    for target in ("meta-learning convergence", "few-shot adaptation", "transfer", "knowledge retention",
                   "learning efficiency"):
        assert target in text
    assert "≥ 0.95" in text and "≥ 10×" in text and "over 12 sequential tasks" in text
    saved = json.loads((tmp_path / "seed-targets.json").read_text())
    assert saved["runs"][0]["seed"] == 0 and len(saved["runs"][0]["warm_regret_curve"]) == 12
    assert main(["evaluate", "--section", "seed-targets", "--tasks", "1", "--out", str(tmp_path)]) == 2
