"""Priors core: hand-made cases with known answers, and recovery of planted optima from synth."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meta_pipeline.knobs import KNOB_NAMES, KNOBS, knobs_to_unit, unit_to_knobs
from meta_pipeline.meta.priors import (
    PRIOR_COLUMNS,
    GlobalPriorConfig,
    aggregate_global_prior,
    domain_priors,
    entropy_weights,
    priors_by_domain,
    warm_start_prior,
)
from meta_pipeline.meta.reptile import annealed_epsilon
from meta_pipeline.meta.shift import (
    distance_to_rest,
    distances_to_new,
    frechet_distance,
    mmd_rbf,
    pairwise_shift_distances,
    shift_distance,
)
from meta_pipeline.lab.synth import exploration_knobs, make_engine, simulate_telemetry

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def prior_frame(unit: dict[str, float] | float, n_obs: int = 200, best_reward: float = 0.6) -> pd.DataFrame:
    """A hand-made domain prior whose best_value sits at the given unit-space point."""
    if not isinstance(unit, dict):
        unit = {k: float(unit) for k in KNOB_NAMES}
    unit = {k: unit.get(k, 0.5) for k in KNOB_NAMES}
    values = {k: KNOBS[k].low + u * (KNOBS[k].high - KNOBS[k].low) for k, u in unit.items()}
    return pd.DataFrame(
        {
            "knob": list(KNOB_NAMES),
            "mean": [values[k] for k in KNOB_NAMES],
            "std": 0.0,
            "n_obs": n_obs,
            "best_value": [values[k] for k in KNOB_NAMES],
            "best_reward": best_reward,
            "reward_mean": best_reward - 0.1,
        }
    )


def weights(details: dict) -> dict[str, float]:
    return {d: v["weight"] for d, v in details["domains"].items()}


# ---------------------------------------------------------------------------
# Evidence and entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta, expected_ratio", [(1.0, 4.0), (2.0, 2.0), (4.0, np.sqrt(2.0))])
def test_evidence_weights_have_the_known_ratio(beta, expected_ratio):
    # equal in everything but evidence: w ∝ n^(1/β)
    priors = {"a": prior_frame(0.3, n_obs=400), "b": prior_frame(0.7, n_obs=100)}
    theta, details = aggregate_global_prior(priors, None, None, 1, GlobalPriorConfig(beta=beta))
    w = weights(details)
    assert w["a"] / w["b"] == pytest.approx(expected_ratio, rel=1e-9)
    # the prior is the weighted mean: 0.3·w_a + 0.7·w_b in unit space (float knob)
    expected_tau = 0.3 * w["a"] + 0.7 * w["b"]
    assert details["theta_unit"]["tau"] == pytest.approx(expected_tau, abs=1e-12)


def test_entropy_keeps_one_huge_domain_from_drowning_the_rest():
    # spread so that nobody is an outlier: this is about weights only
    small_values = [0.3, 0.45, 0.6, 0.7]
    priors = {"huge": prior_frame(0.8, n_obs=10_000)}
    priors.update({f"small{i}": prior_frame(v, n_obs=100) for i, v in enumerate(small_values)})
    evidence_share = 10_000 / (10_000 + 4 * 100)  # 0.96 under evidence-proportional weights

    _, d_default = aggregate_global_prior(priors, None, None, 1, GlobalPriorConfig())  # β = 2
    _, d_beta1 = aggregate_global_prior(priors, None, None, 1, GlobalPriorConfig(beta=1.0))
    theta0, d_beta0 = aggregate_global_prior(priors, None, None, 1, GlobalPriorConfig(beta=0.0))

    assert weights(d_beta1)["huge"] == pytest.approx(evidence_share)
    w_huge = weights(d_default)["huge"]
    assert w_huge == pytest.approx(100 / (100 + 4 * 10))  # √n weights: 100 vs 10 each
    assert w_huge < 0.75 < evidence_share
    # β = 0 (no entropy term): the top-scoring domain takes everything
    assert weights(d_beta0)["huge"] == 1.0
    assert d_beta0["theta_unit"]["tau"] == pytest.approx(0.8)
    assert not any(v["outlier_knobs"] for v in d_default["domains"].values())
    # and the default prior is the √n-weighted mean, well away from the huge domain
    expected = (0.8 * 100 + sum(v * 10 for v in small_values)) / 140
    assert d_default["theta_unit"]["tau"] == pytest.approx(expected)
    assert d_default["theta_unit"]["tau"] < 0.8 - 0.05


def test_entropy_weights_closed_form():
    s = np.array([1.0, 2.0, 3.0])
    w = entropy_weights(s, beta=0.5)
    assert w == pytest.approx(np.exp(s / 0.5) / np.exp(s / 0.5).sum())
    assert entropy_weights(s, beta=1e6) == pytest.approx(np.full(3, 1 / 3), abs=1e-5)
    assert entropy_weights(s, beta=0.0).tolist() == [0.0, 0.0, 1.0]


def test_higher_best_reward_gets_more_weight():
    priors = {"good": prior_frame(0.4, best_reward=0.7), "poor": prior_frame(0.6, best_reward=0.5)}
    _, details = aggregate_global_prior(priors, None, None, 1, GlobalPriorConfig(beta=1.0, reward_coef=5.0))
    w = weights(details)
    # score difference κ·Δr = 5·0.2 = 1 → weight ratio e¹ at β = 1
    assert w["good"] / w["poor"] == pytest.approx(np.e)


# ---------------------------------------------------------------------------
# Outliers and shift
# ---------------------------------------------------------------------------


def test_a_wild_knob_value_is_excluded_and_the_prior_is_the_others_mean():
    normal_tau = [0.50, 0.52, 0.48, 0.51, 0.49]
    priors = {f"d{i}": prior_frame({"tau": t}) for i, t in enumerate(normal_tau)}
    priors["wild"] = prior_frame({"tau": 0.97})
    theta, details = aggregate_global_prior(priors, None, None, 1)
    assert details["domains"]["wild"]["outlier_knobs"] == ["tau"]
    assert not details["domains"]["wild"]["outlier"]  # wild on one knob only: kept for the others
    assert all(not details["domains"][f"d{i}"]["outlier_knobs"] for i in range(5))
    assert details["theta_unit"]["tau"] == pytest.approx(np.mean(normal_tau), abs=1e-12)
    # without filtering the wild value would have pulled the prior up
    _, unfiltered = aggregate_global_prior(priors, None, None, 1, GlobalPriorConfig(outlier_z=1e9))
    assert unfiltered["theta_unit"]["tau"] > np.mean(normal_tau) + 0.05


def test_a_domain_wild_on_most_knobs_is_dropped():
    priors = {f"d{i}": prior_frame(0.3 + 0.01 * i) for i in range(5)}
    priors["outlier"] = prior_frame(0.95)
    theta, details = aggregate_global_prior(priors, None, None, 1)
    assert details["domains"]["outlier"]["outlier"]
    assert details["domains"]["outlier"]["weight"] == pytest.approx(0.0, abs=1e-12)
    assert details["n_domains"] == 5
    others = np.mean([0.3 + 0.01 * i for i in range(5)])
    for k in ("tau", "g_min", "lambda_ci", "gamma_diversity"):
        assert details["theta_unit"][k] == pytest.approx(others, abs=1e-12)


def test_outlier_filtering_needs_three_domains():
    priors = {"a": prior_frame(0.1), "b": prior_frame(0.9)}
    _, details = aggregate_global_prior(priors, None, None, 1)
    assert not any(v["outlier_knobs"] for v in details["domains"].values())
    assert details["theta_unit"]["tau"] == pytest.approx(0.5)


def test_shift_distance_is_zero_for_identical_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    same = rng.normal(size=(300, 4))
    assert abs(mmd_rbf(x, same)) < 0.01
    assert frechet_distance(x, same) < 0.05
    mmd, fr = [], []
    for delta in (0.0, 0.25, 0.5, 1.0, 2.0):
        y = same + delta
        mmd.append(shift_distance(x, y, "mmd"))
        fr.append(shift_distance(x, y, "frechet"))
    assert np.all(np.diff(mmd) > 0) and np.all(np.diff(fr) > 0)
    assert mmd[0] < 0.1 < mmd[-1]
    # Fréchet of pure mean shift δ in 4 dims ≈ √(4δ²) = 2δ
    assert fr[-1] == pytest.approx(4.0, rel=0.1)
    with pytest.raises(ValueError, match="method"):
        shift_distance(x, same, "kl")


def test_pairwise_distances_on_telemetry_find_the_shifted_domain():
    rng = np.random.default_rng(1)
    base = {"gain_p50": 0.03, "stability_mean": 0.8, "vram_utilization": 0.6, "latency_ms": 120.0}
    scale = {"gain_p50": 0.005, "stability_mean": 0.03, "vram_utilization": 0.05, "latency_ms": 20.0}

    def tel(shift: float) -> pd.DataFrame:
        return pd.DataFrame({c: base[c] + scale[c] * (rng.normal(size=200) + (shift if c == "gain_p50" else 0.0))
                             for c in base})

    frames = {"a": tel(0), "b": tel(0), "c": tel(0), "far": tel(3.0)}
    pw = pairwise_shift_distances(frames, seed=0)
    assert list(pw.index) == ["a", "b", "c", "far"]
    assert np.allclose(pw.to_numpy(), pw.to_numpy().T) and np.all(np.diag(pw.to_numpy()) == 0)
    rest = distance_to_rest(pw)
    assert rest.idxmax() == "far" and rest["far"] > 3 * rest.drop("far").max()
    to_new = distances_to_new(tel(3.0), {k: v for k, v in frames.items()})
    assert to_new.idxmin() == "far"

    # in the aggregation, the far domain is weighted low
    priors = {d: prior_frame(0.5) for d in frames}
    _, details = aggregate_global_prior(priors, pw, None, 1)
    w = weights(details)
    assert w["far"] < 0.5 * min(w["a"], w["b"], w["c"])


# ---------------------------------------------------------------------------
# Reptile step, anneal, bounds
# ---------------------------------------------------------------------------


def test_reptile_step_moves_the_annealed_fraction_toward_the_weighted_mean():
    priors = {"a": prior_frame(0.6), "b": prior_frame(0.6)}
    cfg = GlobalPriorConfig(eps0=0.5, eps_min=0.1, anneal_versions=4)
    # version 1 starts from the weighted mean itself
    theta1, d1 = aggregate_global_prior(priors, None, None, 1, cfg)
    assert d1["epsilon"] == 1.0 and d1["theta_unit"]["tau"] == pytest.approx(0.6)

    previous_cont = {k: KNOBS[k].low + 0.2 * (KNOBS[k].high - KNOBS[k].low) for k in KNOB_NAMES}
    eps_seen = []
    for version in range(2, 8):
        _, d = aggregate_global_prior(priors, None, previous_cont, version, cfg)
        eps = d["epsilon"]
        eps_seen.append(eps)
        assert eps == pytest.approx(annealed_epsilon(version - 2, 0.5, 0.1, 4))
        # θ ← θ + ε(target − θ): from 0.2 toward 0.6
        assert d["theta_unit"]["tau"] == pytest.approx(0.2 + eps * 0.4)
        assert d["theta_unit"]["g_min"] == pytest.approx(0.2 + eps * 0.4)
    assert eps_seen[0] == 0.5 and eps_seen[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(eps_seen, eps_seen[1:])) and eps_seen[0] > eps_seen[-1]


def test_int_knob_keeps_moving_when_fed_continuous_state():
    # tier3_topk at 5.0, target 5.4 (unit), ε = 0.5 each version: the continuous state
    # keeps accumulating even though every deployed value rounds to an integer
    target_topk = 5.8
    unit = (target_topk - KNOBS["tier3_topk"].low) / (KNOBS["tier3_topk"].high - KNOBS["tier3_topk"].low)
    priors = {"a": prior_frame({"tier3_topk": unit})}
    state = {**{k: KNOBS[k].default for k in KNOB_NAMES}, "tier3_topk": 5.0}
    cfg = GlobalPriorConfig(eps0=0.5, eps_min=0.5)
    for version in range(2, 6):
        theta, d = aggregate_global_prior(priors, None, state, version, cfg)
        state = d["theta_continuous"]
    assert theta["tier3_topk"] == 6.0
    assert state["tier3_topk"] == pytest.approx(5.8 - 0.8 * 0.5**4)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(-2.0, 3.0), min_size=len(KNOB_NAMES), max_size=len(KNOB_NAMES)),
            st.integers(1, 5000),
            st.floats(-1.0, 1.0),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 30),
)
def test_global_prior_respects_bounds(domains, version):
    priors = {}
    for i, (units, n_obs, reward) in enumerate(domains):
        frame = prior_frame(dict(zip(KNOB_NAMES, units)), n_obs=n_obs, best_reward=reward)
        priors[f"d{i}"] = frame  # best_value may lie far outside the bounds
    previous = None if version == 1 else {k: KNOBS[k].high * 2 for k in KNOB_NAMES}
    theta, details = aggregate_global_prior(priors, None, previous, version)
    for k, spec in KNOBS.items():
        assert spec.low <= theta[k] <= spec.high
        assert 0.0 <= details["theta_unit"][k] <= 1.0
    assert theta["tier3_topk"] == int(theta["tier3_topk"])
    assert theta["tier2_enabled"] in (0.0, 1.0)
    assert sum(v["weight"] for v in details["domains"].values()) == pytest.approx(1.0)


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="no domain has a prior"):
        aggregate_global_prior({}, None, None, 1)
    with pytest.raises(ValueError, match="no domain has a prior"):
        aggregate_global_prior({"a": domain_priors(pd.DataFrame())}, None, None, 1)
    with pytest.raises(ValueError, match="version"):
        aggregate_global_prior({"a": prior_frame(0.5)}, None, None, 0)
    with pytest.raises(ValueError, match="beta"):
        GlobalPriorConfig(beta=-1.0)
    with pytest.raises(ValueError, match="lacks column"):
        domain_priors(pd.DataFrame({"ts": [T0], "knob_tau": [0.9]}))
    # an empty domain among good ones is ignored, not an error
    theta, details = aggregate_global_prior({"a": prior_frame(0.5), "empty": domain_priors(pd.DataFrame())}, None, None, 1)
    assert list(details["domains"]) == ["a"]


# ---------------------------------------------------------------------------
# Domain priors on synthetic telemetry (planted optimum)
# ---------------------------------------------------------------------------


def synth_telemetry(engine, n: int, rng: np.random.Generator, spread: float = 0.3) -> pd.DataFrame:
    tel = simulate_telemetry(engine, exploration_knobs(n, rng, spread=spread), start=T0,
                             every=pd.Timedelta(minutes=5), rng=rng)
    return tel.rename(columns={c: c.replace("knob.", "knob_") for c in tel.columns})  # store layout


def test_domain_priors_recover_the_planted_tau_optimum():
    errors, mean_shift_right_way = [], []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        center = rng.uniform(0.15, 0.85, len(KNOB_NAMES))
        engine = make_engine(f"d{seed}", rng, center=center)
        tel = synth_telemetry(engine, 250, rng)
        priors = domain_priors(tel).set_index("knob")
        assert list(priors.reset_index().columns[: len(PRIOR_COLUMNS)]) == PRIOR_COLUMNS
        assert (priors["n_obs"] == 250).all()
        best_tau = engine.oracle()[0]["tau"]
        errors.append(priors.at["tau", "best_value"] - best_tau)
        assert priors.at["tau", "best_method"] == "vertex"
        # the reward-weighted mean leans from the exploration centre toward the optimum
        explored = tel["knob_tau"].mean()
        mean_shift_right_way.append(np.sign(priors.at["tau", "mean"] - explored) == np.sign(best_tau - explored))
    # tau spans 0.19 in knob units; within 0.02 (≈ 0.1 of its range) on every seed
    assert np.max(np.abs(errors)) < 0.02, errors
    assert np.mean(mean_shift_right_way) >= 5 / 6


def test_domain_priors_orders_two_domains_by_their_optimum():
    rng = np.random.default_rng(7)
    low = make_engine("low", rng, center=np.array([0.2, 0.5, 0.3, 0.5, 1.0, 0.4]), spread=0.0)
    high = make_engine("high", rng, center=np.array([0.85, 0.5, 0.3, 0.5, 1.0, 0.4]), spread=0.0)
    p_low = domain_priors(synth_telemetry(low, 200, rng)).set_index("knob")
    p_high = domain_priors(synth_telemetry(high, 200, rng)).set_index("knob")
    assert p_high.at["tau", "best_value"] - p_low.at["tau", "best_value"] > 0.08
    assert p_high.at["tau", "mean"] > p_low.at["tau", "mean"]
    assert p_high.at["tau", "best_reward"] > p_high.at["tau", "reward_mean"]


def test_domain_priors_handles_missing_and_constant_knobs():
    rng = np.random.default_rng(3)
    engine = make_engine("d", rng)
    tel = synth_telemetry(engine, 120, rng)
    tel["knob_tier3_topk"] = 5.0  # held constant by the runtime
    tel["knob_lambda_ci"] = np.nan  # never reported
    tel.loc[:9, "knob_tau"] = np.nan  # missing on some ticks
    priors = domain_priors(tel).set_index("knob")
    assert "lambda_ci" not in priors.index
    assert priors.at["tier3_topk", "best_value"] == 5.0 and priors.at["tier3_topk", "std"] == 0.0
    assert priors.at["tau", "n_obs"] == 110
    assert np.isfinite(priors[["mean", "std", "best_value", "best_reward"]].to_numpy()).all()
    long = pd.concat([priors.reset_index().assign(domain="x"), priors.reset_index().assign(domain="y")])
    assert sorted(priors_by_domain(long)) == ["x", "y"]


# ---------------------------------------------------------------------------
# Few-shot warm start
# ---------------------------------------------------------------------------


def test_warm_start_blends_toward_the_nearest_domains():
    global_theta = unit_to_knobs(np.full(len(KNOB_NAMES), 0.5))
    priors = {"near": prior_frame(0.9), "far1": prior_frame(0.1), "far2": prior_frame(0.1), "far3": prior_frame(0.1)}
    dist = pd.Series({"near": 0.05, "far1": 1.0, "far2": 1.0, "far3": 1.0})
    theta, details = warm_start_prior(global_theta, priors, dist, k=1)
    assert list(details["neighbours"]) == ["near"]
    mean_all = dist.mean()
    lam = 0.7 * (1 - 0.05 / mean_all)
    assert details["lambda"] == pytest.approx(lam)
    assert knobs_to_unit(theta)[KNOB_NAMES.index("tau")] == pytest.approx(0.5 + lam * 0.4)

    # nobody is closer than the fleet at large: λ = 0, the global prior unchanged
    flat = pd.Series({d: 1.0 for d in priors})
    theta_flat, d_flat = warm_start_prior(global_theta, priors, flat, k=3)
    assert d_flat["lambda"] == 0.0 and theta_flat == global_theta
    # no telemetry yet (no distances): the global prior unchanged
    theta_none, d_none = warm_start_prior(global_theta, priors, None)
    assert theta_none == global_theta and d_none["lambda"] == 0.0
