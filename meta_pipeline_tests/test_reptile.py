"""Tests for the numpy Reptile / first-order MAML meta-optimiser."""

from __future__ import annotations

import numpy as np
import pytest

from meta_pipeline.lab.reptile_sinusoid import MLP, sinusoid_check
from meta_pipeline.meta.reptile import (
    annealed_epsilon,
    fomaml_step,
    meta_train,
    reptile_step,
)

# ---------------------------------------------------------------------------
# MLP backprop
# ---------------------------------------------------------------------------


def _fd_grad(net: MLP, theta: np.ndarray, x: np.ndarray, y: np.ndarray, h: float = 1e-6):
    g = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        g[i] = (net.loss(theta + e, x, y) - net.loss(theta - e, x, y)) / (2 * h)
    return g


@pytest.mark.parametrize("sizes", [(1, 40, 40, 1), (3, 7, 5, 2)])
def test_mlp_backprop_matches_finite_differences(sizes):
    net = MLP(sizes)
    rng = np.random.default_rng(1)
    theta = net.init(rng)
    x = rng.uniform(-5, 5, (12, sizes[0]))
    y = rng.normal(size=(12, sizes[-1]))
    loss, grad = net.loss_and_grad(theta, x, y)
    assert np.isclose(loss, net.loss(theta, x, y))
    fd = _fd_grad(net, theta, x, y)
    err = np.abs(grad - fd).max() / max(np.abs(fd).max(), 1e-12)
    assert err < 1e-5, err
    # a wrong gradient (e.g. a dropped ReLU mask) would not pass this
    assert np.abs(grad).max() > 1e-3


def test_mlp_batched_gradient_equals_per_task_gradients():
    net = MLP()
    rng = np.random.default_rng(2)
    thetas = np.stack([net.init(rng) for _ in range(4)])
    x = rng.uniform(-5, 5, (4, 10, 1))
    y = np.sin(x)
    losses, grads = net.loss_and_grad(thetas, x, y)
    assert losses.shape == (4,) and grads.shape == thetas.shape
    for t in range(4):
        lt, gt = net.loss_and_grad(thetas[t], x[t], y[t])
        assert np.isclose(losses[t], lt)
        np.testing.assert_allclose(grads[t], gt, rtol=1e-10, atol=1e-12)


def test_mlp_pack_unpack_roundtrip_and_param_count():
    net = MLP()
    assert net.n_params == 40 + 40 + 40 * 40 + 40 + 40 + 1
    theta = net.init(np.random.default_rng(3))
    layers = net.unpack(theta)
    assert [w.shape for w, _ in layers] == [(1, 40), (40, 40), (40, 1)]
    np.testing.assert_array_equal(net.pack(layers), theta)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mlp_inner_loop_reduces_loss(optimizer):
    net = MLP()
    rng = np.random.default_rng(4)
    theta = net.init(rng)
    x = rng.uniform(-5, 5, (10, 1))
    y = 2.0 * np.sin(x)
    adapted = net.adapt(theta, x, y, 50, 0.01, optimizer)
    assert net.loss(adapted, x, y) < 0.5 * net.loss(theta, x, y)


# ---------------------------------------------------------------------------
# Outer updates and schedule
# ---------------------------------------------------------------------------


def test_reptile_step_exact_values():
    theta = np.array([0.0, 0.0])
    adapted = np.array([[1.0, 2.0], [3.0, 4.0]])
    # mean = [2, 3]; half-way there
    np.testing.assert_allclose(reptile_step(theta, adapted, 0.5), [1.0, 1.5])
    # epsilon = 1 jumps to the mean, epsilon = 0 stays put
    np.testing.assert_allclose(reptile_step(theta, adapted, 1.0), [2.0, 3.0])
    np.testing.assert_allclose(reptile_step(theta, adapted, 0.0), theta)
    # weights 3:1 -> weighted mean [1.5, 2.5]; only ratios matter
    np.testing.assert_allclose(reptile_step(theta, adapted, 0.5, [3, 1]), [0.75, 1.25])
    np.testing.assert_allclose(reptile_step(theta, adapted, 0.5, [0.6, 0.2]), [0.75, 1.25])
    # non-zero start: theta + eps * (mean - theta)
    np.testing.assert_allclose(
        reptile_step([1.0, -1.0], adapted, 0.25), [1.0 + 0.25 * 1.0, -1.0 + 0.25 * 4.0]
    )
    # inputs are not mutated
    assert np.all(theta == 0)


def test_reptile_step_rejects_bad_input():
    theta = np.zeros(2)
    adapted = np.ones((2, 2))
    with pytest.raises(ValueError):
        reptile_step(theta, np.ones((2, 3)), 0.5)
    with pytest.raises(ValueError):
        reptile_step(theta, adapted, 0.5, weights=[1.0, -1.0])
    with pytest.raises(ValueError):
        reptile_step(theta, adapted, 0.5, weights=[0.0, 0.0])
    with pytest.raises(ValueError):
        reptile_step(theta, adapted, 0.5, weights=[1.0])
    with pytest.raises(ValueError):
        reptile_step(theta, adapted, -0.1)


def test_fomaml_step_exact_values():
    theta = np.array([1.0, 1.0])
    grads = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(fomaml_step(theta, grads, 0.1), [0.95, 0.9])
    np.testing.assert_allclose(fomaml_step(theta, grads, 0.1, weights=[1, 3]), [0.975, 0.85])
    np.testing.assert_allclose(fomaml_step(theta, grads[0], 1.0), [0.0, 1.0])


def test_annealed_epsilon_linear_monotone_bounded():
    eps0, eps_min, n = 1.0, 0.1, 100
    vals = np.array([annealed_epsilon(s, eps0, eps_min, n) for s in range(2 * n)])
    assert vals[0] == eps0
    assert np.isclose(annealed_epsilon(n, eps0, eps_min, n), eps_min)
    assert np.isclose(annealed_epsilon(n // 2, eps0, eps_min, n), 0.55)
    assert np.all(np.diff(vals) <= 1e-15)  # non-increasing
    assert np.all((vals >= eps_min - 1e-15) & (vals <= eps0))
    assert np.allclose(vals[n:], eps_min)  # held after n_steps
    for bad in [(-1, 1.0, 0.0, 10), (0, 0.1, 0.2, 10), (0, 1.0, 0.0, 0)]:
        with pytest.raises(ValueError):
            annealed_epsilon(*bad)


# ---------------------------------------------------------------------------
# meta_train on quadratic bowls: the optimal initialisation is the centre
# ---------------------------------------------------------------------------

CENTRE = np.array([1.0, -2.0, 3.0, 0.5, -1.0])
INNER_LR, INNER_STEPS = 0.3, 3


def _sample_bowl(rng: np.random.Generator):
    # task = (optimum, diagonal curvature); optima scatter around CENTRE
    return CENTRE + rng.normal(0.0, 0.5, CENTRE.size), rng.uniform(0.5, 2.0, CENTRE.size)


def _bowl_grad(theta: np.ndarray, task) -> np.ndarray:
    opt, curv = task
    return curv * (theta - opt)


def _adapt_bowl(theta: np.ndarray, task, rng: np.random.Generator) -> np.ndarray:
    th = theta.copy()
    for _ in range(INNER_STEPS):
        th = th - INNER_LR * _bowl_grad(th, task)
    return th


def test_meta_train_reptile_converges_to_task_centre():
    theta0 = np.zeros(CENTRE.size)
    theta = meta_train(
        theta0, _sample_bowl, _adapt_bowl, 1000, meta_batch_size=5, eps0=1.0, eps_min=0.0, seed=0
    )
    assert np.linalg.norm(theta0 - CENTRE) > 3.5
    assert np.linalg.norm(theta - CENTRE) < 0.15
    # deterministic given the seed
    again = meta_train(theta0, _sample_bowl, _adapt_bowl, 1000, meta_batch_size=5, seed=0)
    np.testing.assert_array_equal(theta, again)


def test_meta_train_fomaml_converges_to_task_centre():
    theta0 = np.zeros(CENTRE.size)
    theta = meta_train(
        theta0,
        _sample_bowl,
        _adapt_bowl,
        1000,
        method="fomaml",
        query_grad=_bowl_grad,
        meta_batch_size=5,
        eps0=1.0,
        eps_min=0.0,
        seed=0,
    )
    assert np.linalg.norm(theta - CENTRE) < 0.15


def test_meta_train_vectorized_path_and_divergence_guard():
    def sample_batch(rng, n):
        return [_sample_bowl(rng) for _ in range(n)]

    def adapt_batch(theta, tasks, rng):
        return np.stack([_adapt_bowl(theta, t, rng) for t in tasks])

    theta = meta_train(np.zeros(5), sample_batch, adapt_batch, 1000, meta_batch_size=5, vectorized=True)
    assert np.linalg.norm(theta - CENTRE) < 0.15

    with pytest.raises(FloatingPointError):
        meta_train(np.zeros(5), _sample_bowl, lambda th, t, r: th + np.inf, 3)
    with pytest.raises(ValueError):
        meta_train(np.zeros(5), _sample_bowl, _adapt_bowl, 3, method="fomaml")


# ---------------------------------------------------------------------------
# Sinusoid few-shot regression (MAML paper set-up), reduced meta-training budget
# ---------------------------------------------------------------------------


def test_sinusoid_reptile_beats_pretrained_baseline():
    # Same task family, K=10 shots, 10 SGD fine-tuning steps and 100 held-out
    # tasks as the full check; only the meta-training budget is reduced.
    res = sinusoid_check(n_meta_iterations=2000, seed=0, n_test_tasks=100, k_shot=10, inner_steps=10)
    assert res["mse_reptile"].shape == (100,) and res["mse_pretrained"].shape == (100,)
    assert res["n_nonfinite_reptile"] == 0 and res["n_nonfinite_pretrained"] == 0
    lo, hi = res["diff_ci95"]
    assert lo <= res["diff_mean"] <= hi
    assert hi < 0
    assert res["reptile_better"] is True
    assert res["mean_mse_reptile"] < res["mean_mse_pretrained"]
    # the pretrained net has learnt the mean function (its pre-adaptation MSE is
    # near the ~3.0 floor (the MSE of the true mean function -1.62 cos x)), so the baseline is not starved
    assert res["mean_mse_pretrained_before_adapt"] < 3.5
    assert res["runtime_s"] < 30
