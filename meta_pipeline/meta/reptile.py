"""Reptile and first-order MAML over flat parameter vectors, in plain numpy.

The meta-optimisers here only see flat ``theta`` vectors and two callables
(a task sampler and an inner adaptation), so the same code meta-learns an
initialisation for a knob-prior vector or for a neural network.

Also included: a tiny numpy MLP (flat parameters, analytic backprop) and
``sinusoid_check``, the sinusoid few-shot regression set-up of the MAML paper
(Finn et al. 2017) used by Reptile (Nichol et al. 2018), as a self-test that the
meta-learner beats the "pretrained on all tasks" baseline.

Update rules
------------
Reptile:  theta <- theta + eps * (sum_d w_d * theta_d - theta),  w normalised.
FOMAML:   theta <- theta - beta * sum_d w_d * g_d,  g_d = query-set gradient of
          task d evaluated at the adapted parameters theta_d.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy import stats

ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]

__all__ = [
    "reptile_step",
    "fomaml_step",
    "annealed_epsilon",
    "meta_train",
    "MLP",
    "sinusoid_check",
]


# ---------------------------------------------------------------------------
# Generic meta-updates
# ---------------------------------------------------------------------------


def _normalised_weights(weights: ArrayLike | None, n: int) -> np.ndarray:
    """Uniform weights if None, else validated and rescaled to sum to one."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=float).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"got {w.shape[0]} weights for {n} tasks")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("task weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError("task weights must not all be zero")
    return w / total


def _task_matrix(theta: np.ndarray, per_task: ArrayLike, what: str) -> np.ndarray:
    """Stack per-task vectors into (n_tasks, P), checking they match theta."""
    m = np.asarray(per_task, dtype=float)
    if m.ndim == 1:  # a single task given as one vector
        m = m[None, :]
    if m.ndim != 2 or m.shape[1] != theta.shape[0] or m.shape[0] == 0:
        raise ValueError(
            f"{what} must have shape (n_tasks, {theta.shape[0]}), got {m.shape}"
        )
    return m


def reptile_step(
    theta: ArrayLike,
    adapted_thetas: ArrayLike,
    epsilon: float,
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """One Reptile outer update: ``theta + epsilon * (weighted mean(adapted) - theta)``.

    ``adapted_thetas`` is (n_tasks, P): the parameters after inner adaptation on
    each task, all started from ``theta``. ``weights`` (optional, >= 0) are
    normalised to sum to one, so only their ratios matter. ``epsilon`` = 1 jumps
    to the (weighted) mean of the adapted parameters; epsilon = 0 is a no-op.
    Returns a new array; the inputs are not modified.
    """
    th = np.asarray(theta, dtype=float).reshape(-1)
    m = _task_matrix(th, adapted_thetas, "adapted_thetas")
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    w = _normalised_weights(weights, m.shape[0])
    # (w @ m) is the weighted average of the task solutions; Reptile moves the
    # initialisation part-way toward it (a finite-difference meta-gradient).
    return th + float(epsilon) * (w @ m - th)


def fomaml_step(
    theta: ArrayLike,
    query_grads: ArrayLike,
    meta_lr: float,
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """One first-order MAML outer update: ``theta - meta_lr * weighted mean(query_grads)``.

    ``query_grads`` is (n_tasks, P): for each task, the gradient of its
    query-set loss evaluated at that task's *adapted* parameters. First-order
    MAML drops the second-derivative (Jacobian of the inner loop) term, so the
    gradient at the adapted point is applied directly to the initialisation.
    """
    th = np.asarray(theta, dtype=float).reshape(-1)
    g = _task_matrix(th, query_grads, "query_grads")
    if not np.isfinite(meta_lr) or meta_lr < 0:
        raise ValueError(f"meta_lr must be finite and >= 0, got {meta_lr}")
    w = _normalised_weights(weights, g.shape[0])
    return th - float(meta_lr) * (w @ g)


def annealed_epsilon(step: int, eps0: float, eps_min: float, n_steps: int) -> float:
    """Linearly decayed outer step size.

    ``eps0`` at ``step == 0``, falling linearly to ``eps_min`` at
    ``step == n_steps`` and held there afterwards:
    ``eps = eps0 + (eps_min - eps0) * min(step / n_steps, 1)``.
    Large early steps move the initialisation fast; small late steps average out
    task-sampling noise (the Reptile paper anneals to 0). The result is
    non-increasing in ``step`` and always within ``[eps_min, eps0]``.
    """
    if n_steps <= 0:
        raise ValueError("n_steps must be positive")
    if step < 0:
        raise ValueError("step must be >= 0")
    if not (0 <= eps_min <= eps0):
        raise ValueError("need 0 <= eps_min <= eps0")
    frac = min(step / n_steps, 1.0)
    return float(eps0 + (eps_min - eps0) * frac)


def meta_train(
    theta0: ArrayLike,
    sample_task: Callable[..., Any],
    inner_adapt: Callable[[np.ndarray, Any, np.random.Generator], np.ndarray],
    n_iterations: int,
    *,
    method: str = "reptile",
    query_grad: Callable[[np.ndarray, Any], np.ndarray] | None = None,
    meta_batch_size: int = 1,
    eps0: float = 1.0,
    eps_min: float = 0.0,
    seed: int = 0,
    vectorized: bool = False,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Meta-train an initialisation with Reptile or first-order MAML.

    Works with any parameter vector and any inner optimiser:

    * ``sample_task(rng)`` returns one task (any object);
    * ``inner_adapt(theta, task, rng)`` returns the adapted flat vector;
    * ``query_grad(adapted_theta, task)`` (FOMAML only) returns the query-set
      gradient at the adapted parameters.

    With ``vectorized=True`` the callables handle a whole meta-batch at once
    (``sample_task(rng, meta_batch_size)`` -> task batch, ``inner_adapt`` ->
    (B, P), ``query_grad`` -> (B, P)), which lets numpy batch the inner loops.

    The outer step size (epsilon for Reptile, beta for FOMAML) is annealed
    linearly from ``eps0`` to ``eps_min`` over ``n_iterations``
    (see :func:`annealed_epsilon`). ``callback(iteration, theta)`` is called
    after each outer update. All randomness comes from ``seed``. Raises
    ``FloatingPointError`` if theta becomes non-finite.
    """
    if method not in ("reptile", "fomaml"):
        raise ValueError("method must be 'reptile' or 'fomaml'")
    if method == "fomaml" and query_grad is None:
        raise ValueError("FOMAML needs query_grad(adapted_theta, task)")
    if n_iterations < 0 or meta_batch_size < 1:
        raise ValueError("n_iterations must be >= 0 and meta_batch_size >= 1")
    rng = np.random.default_rng(seed)
    theta = np.asarray(theta0, dtype=float).reshape(-1).copy()
    for it in range(n_iterations):
        eps = annealed_epsilon(it, eps0, eps_min, n_iterations)
        if vectorized:
            tasks = sample_task(rng, meta_batch_size)
            adapted = np.asarray(inner_adapt(theta, tasks, rng), dtype=float)
            grads = query_grad(adapted, tasks) if method == "fomaml" else None
        else:
            tasks = [sample_task(rng) for _ in range(meta_batch_size)]
            adapted = np.stack([np.asarray(inner_adapt(theta, t, rng), float) for t in tasks])
            grads = (
                np.stack([np.asarray(query_grad(a, t), float) for a, t in zip(adapted, tasks)])
                if method == "fomaml"
                else None
            )
        if method == "reptile":
            theta = reptile_step(theta, adapted, eps)
        else:
            theta = fomaml_step(theta, grads, eps)
        if not np.all(np.isfinite(theta)):
            # a diverging inner loop would otherwise silently poison theta with
            # inf/NaN; fail loudly so the caller lowers the inner step size
            raise FloatingPointError(
                f"meta-parameters became non-finite at iteration {it}; "
                "the inner adaptation is probably diverging (lower its step size)"
            )
        if callback is not None:
            callback(it, theta)
    return theta


# ---------------------------------------------------------------------------
# Tiny numpy MLP with flat parameters (batched over tasks)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MLP:
    """Fully connected ReLU network whose parameters live in one flat vector.

    Layout: for each layer, the weight matrix (fan_in x fan_out, row-major)
    then the bias. Every method accepts either one vector ``theta`` of shape
    (P,) with inputs (N, d_in), or a batch of T vectors (T, P) with inputs
    (T, N, d_in) -- one network per task, so inner loops of many tasks run as
    a handful of batched matmuls instead of a Python loop.
    """

    sizes: tuple[int, ...] = (1, 40, 40, 1)

    @property
    def n_params(self) -> int:
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    @cached_property
    def _slices(self) -> list[tuple[slice, slice, int, int]]:
        # computed once per network: (weight slice, bias slice, fan_in, fan_out)
        out, off = [], 0
        for a, b in zip(self.sizes[:-1], self.sizes[1:]):
            out.append((slice(off, off + a * b), slice(off + a * b, off + a * b + b), a, b))
            off += a * b + b
        return out

    def init(self, rng: np.random.Generator) -> np.ndarray:
        """PyTorch-default init: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        theta = np.empty(self.n_params)
        for sw, sb, a, b in self._slices:
            bound = 1.0 / np.sqrt(a)
            theta[sw] = rng.uniform(-bound, bound, a * b)
            theta[sb] = rng.uniform(-bound, bound, b)
        return theta

    def unpack(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Views (W, b) per layer; shapes (..., fan_in, fan_out) and (..., 1, fan_out)."""
        theta = np.asarray(theta, dtype=float)
        if theta.shape[-1] != self.n_params:
            raise ValueError(f"expected {self.n_params} parameters, got {theta.shape[-1]}")
        lead = theta.shape[:-1]
        return [
            (theta[..., sw].reshape(*lead, a, b), theta[..., sb].reshape(*lead, 1, b))
            for sw, sb, a, b in self._slices
        ]

    def pack(self, params: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Inverse of :meth:`unpack` (accepts biases of shape (fan_out,) too)."""
        lead = np.asarray(params[0][0]).shape[:-2]
        theta = np.empty((*lead, self.n_params))
        for (w, b), (sw, sb, a, n_out) in zip(params, self._slices):
            theta[..., sw] = np.asarray(w).reshape(*lead, a * n_out)
            theta[..., sb] = np.asarray(b).reshape(*lead, n_out)
        return theta

    def _forward_cache(self, theta: np.ndarray, x: np.ndarray):
        layers = self.unpack(theta)
        acts, pres = [x], []
        h = x
        for i, (w, b) in enumerate(layers):
            # a 1-wide input makes the first matmul an outer product; broadcasting
            # is cheaper than a batched matmul with inner dimension 1
            z = (h * w if h.shape[-1] == 1 else h @ w) + b
            pres.append(z)
            h = np.maximum(z, 0.0) if i < len(layers) - 1 else z
            acts.append(h)
        return layers, acts, pres

    def forward(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Network output, shape (N, d_out) or (T, N, d_out)."""
        return self._forward_cache(theta, np.asarray(x, dtype=float))[1][-1]

    def loss(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray | float:
        """Mean squared error per network: float, or (T,) for a batch."""
        r = self.forward(theta, x) - y
        return (r**2).mean(axis=(-2, -1))

    def loss_and_grad(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray | float, np.ndarray]:
        """MSE and its analytic gradient w.r.t. the flat parameters (backprop)."""
        theta = np.asarray(theta, dtype=float)
        x = np.asarray(x, dtype=float)
        layers, acts, pres = self._forward_cache(theta, x)
        r = acts[-1] - y
        n_elem = r.shape[-2] * r.shape[-1]
        loss = (r**2).sum(axis=(-2, -1)) / n_elem
        grad = np.empty(theta.shape)
        delta = (2.0 / n_elem) * r  # dL/d(output pre-activation)
        for i in range(len(layers) - 1, -1, -1):
            sw, sb, a, b = self._slices[i]
            h_prev = acts[i]
            if a == 1:
                gw = (h_prev * delta).sum(axis=-2)
            else:
                gw = np.swapaxes(h_prev, -1, -2) @ delta
            grad[..., sw] = gw.reshape(*theta.shape[:-1], a * b)
            grad[..., sb] = delta.sum(axis=-2)
            if i > 0:
                # back through W, then through the ReLU of the previous layer
                delta = (delta @ np.swapaxes(layers[i][0], -1, -2)) * (pres[i - 1] > 0)
        return loss, grad

    def adapt(
        self,
        theta: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        n_steps: int,
        lr: float,
        optimizer: str = "sgd",
        adam_betas: tuple[float, float] = (0.9, 0.999),
    ) -> np.ndarray:
        """Inner loop: ``n_steps`` full-batch steps of SGD or Adam from ``theta``.

        If ``x`` is batched (T, N, d) and ``theta`` is a single vector, it is
        broadcast so every task starts from the same initialisation. Adam state
        is fresh per call (the inner loop must not leak state between tasks).
        """
        x = np.asarray(x, dtype=float)
        th = np.array(theta, dtype=float)
        if x.ndim == 3 and th.ndim == 1:
            th = np.broadcast_to(th, (x.shape[0], th.shape[0])).copy()
        if optimizer == "sgd":
            for _ in range(n_steps):
                th -= lr * self.loss_and_grad(th, x, y)[1]
        elif optimizer == "adam":
            b1, b2 = adam_betas
            m = np.zeros_like(th)
            v = np.zeros_like(th)
            for t in range(1, n_steps + 1):
                g = self.loss_and_grad(th, x, y)[1]
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                th -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
        else:
            raise ValueError("optimizer must be 'sgd' or 'adam'")
        return th


# ---------------------------------------------------------------------------
# Sinusoid few-shot regression (MAML paper set-up)
# ---------------------------------------------------------------------------

AMP_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


def _sample_sinusoids(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(*AMP_RANGE, n), rng.uniform(*PHASE_RANGE, n)


def _sinusoid_points(
    rng: np.random.Generator, amp: np.ndarray, phase: np.ndarray, n_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """x ~ U[-5, 5], y = A sin(x - phase); shapes (T, n_points, 1)."""
    x = rng.uniform(*X_RANGE, (amp.shape[0], n_points, 1))
    return x, amp[:, None, None] * np.sin(x - phase[:, None, None])


def _paired_ci(diff: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t-interval of paired differences."""
    n = diff.shape[0]
    mean = float(diff.mean())
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * diff.std(ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


def sinusoid_check(
    n_meta_iterations: int = 8000,
    seed: int = 0,
    n_test_tasks: int = 100,
    k_shot: int = 10,
    inner_steps: int = 10,
    *,
    meta_batch_size: int = 10,
    inner_lr: float = 0.01,
    train_inner_steps: int | None = None,
    inner_optimizer: str = "sgd",
    eps0: float = 1.0,
    eps_min: float = 0.0,
    finetune_lr: float | None = None,
    n_query: int = 100,
    pretrain_steps: int | None = None,
    pretrain_tasks_per_step: int = 10,
    pretrain_lr: float = 1e-3,
    hidden: tuple[int, ...] = (40, 40),
) -> dict[str, Any]:
    """Reptile vs. "pretrained on all tasks" on few-shot sinusoid regression.

    Tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].
    (a) Reptile meta-trains a 1-40-40-1 ReLU MLP: each outer iteration adapts
        ``meta_batch_size`` fresh tasks in parallel with ``train_inner_steps``
        SGD/Adam steps on K fresh shots each, then :func:`reptile_step`.
    (b) The baseline trains the same network with Adam on data pooled from
        fresh tasks (plain multi-task regression; it learns the mean function).
    Both are then fine-tuned identically -- ``inner_steps`` plain SGD steps at
    ``finetune_lr`` on the same K shots of each of ``n_test_tasks`` held-out
    tasks -- and scored by MSE on ``n_query`` fresh points of that task.

    Returns per-task MSEs, their means, the paired difference (reptile -
    pretrained) with its 95% t-interval, ``reptile_better`` (upper CI bound
    < 0), pre-adaptation MSEs and the wall-clock runtime in seconds.

    Step size: ``inner_lr`` = 0.01 is the MAML paper's alpha. Reptile drifts
    toward sharp initialisations (they adapt fastest), and with plain SGD at
    0.02 meta-training was seen to diverge after a few thousand iterations;
    the learnt initialisation also diverges on some tasks if fine-tuned at a
    much larger rate (0.03) than it was meta-trained for.
    """
    t_start = time.perf_counter()
    net = MLP((1, *hidden, 1))
    train_inner_steps = inner_steps if train_inner_steps is None else train_inner_steps
    finetune_lr = inner_lr if finetune_lr is None else finetune_lr
    # By default the baseline sees the same number of tasks and data points as
    # Reptile (one Adam step per outer iteration on an equally sized pooled
    # batch); it reaches the mean-function floor (MSE ~3.0) long before that.
    pretrain_steps = n_meta_iterations if pretrain_steps is None else pretrain_steps

    # Independent streams so changing one phase's budget doesn't change the
    # held-out tasks or the other model's data.
    ss = np.random.SeedSequence(seed)
    rng_init, rng_meta, rng_pre, rng_test = (np.random.default_rng(s) for s in ss.spawn(4))
    theta_init = net.init(rng_init)  # same starting point for both models

    # (a) Reptile, using the generic meta_train with a batched inner loop.
    def sample_tasks(rng: np.random.Generator, n: int):
        return _sample_sinusoids(rng, n)

    def inner_adapt(theta: np.ndarray, tasks, rng: np.random.Generator) -> np.ndarray:
        x, y = _sinusoid_points(rng, *tasks, k_shot)
        return net.adapt(theta, x, y, train_inner_steps, inner_lr, inner_optimizer)

    t0 = time.perf_counter()
    theta_reptile = meta_train(
        theta_init,
        sample_tasks,
        inner_adapt,
        n_meta_iterations,
        meta_batch_size=meta_batch_size,
        eps0=eps0,
        eps_min=eps_min,
        seed=int(rng_meta.integers(2**63)),
        vectorized=True,
    )
    t_reptile = time.perf_counter() - t0

    # (b) Pretrained baseline: Adam on pooled points from fresh tasks.
    t0 = time.perf_counter()
    theta_pre = theta_init.copy()
    m = np.zeros_like(theta_pre)
    v = np.zeros_like(theta_pre)
    b1, b2 = 0.9, 0.999
    for t in range(1, pretrain_steps + 1):
        amp, ph = _sample_sinusoids(rng_pre, pretrain_tasks_per_step)
        x, y = _sinusoid_points(rng_pre, amp, ph, k_shot)
        # pooled: one network, all tasks' points in one regression batch
        _, g = net.loss_and_grad(theta_pre, x.reshape(-1, 1), y.reshape(-1, 1))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta_pre -= pretrain_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
    t_pretrain = time.perf_counter() - t0

    # Held-out evaluation: identical tasks, shots, query points and fine-tuning.
    amp, ph = _sample_sinusoids(rng_test, n_test_tasks)
    xs, ys = _sinusoid_points(rng_test, amp, ph, k_shot)
    xq, yq = _sinusoid_points(rng_test, amp, ph, n_query)

    def evaluate(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        before = net.loss(np.broadcast_to(theta, (n_test_tasks, theta.size)), xq, yq)
        adapted = net.adapt(theta, xs, ys, inner_steps, finetune_lr, "sgd")
        return net.loss(adapted, xq, yq), before

    mse_reptile, mse_reptile_0 = evaluate(theta_reptile)
    mse_pre, mse_pre_0 = evaluate(theta_pre)
    diff = mse_reptile - mse_pre
    d_mean, lo, hi = _paired_ci(diff)
    return {
        "mse_reptile": mse_reptile,
        "mse_pretrained": mse_pre,
        "mean_mse_reptile": float(mse_reptile.mean()),
        "mean_mse_pretrained": float(mse_pre.mean()),
        "mean_mse_reptile_before_adapt": float(mse_reptile_0.mean()),
        "mean_mse_pretrained_before_adapt": float(mse_pre_0.mean()),
        "diff_mean": d_mean,
        "diff_ci95": (lo, hi),
        # NaN anywhere (a diverging fine-tune) makes the CI NaN and this False
        "reptile_better": bool(hi < 0),
        "n_nonfinite_reptile": int((~np.isfinite(mse_reptile)).sum()),
        "n_nonfinite_pretrained": int((~np.isfinite(mse_pre)).sum()),
        "n_test_tasks": n_test_tasks,
        "config": {
            "n_meta_iterations": n_meta_iterations,
            "meta_batch_size": meta_batch_size,
            "k_shot": k_shot,
            "inner_steps": inner_steps,
            "train_inner_steps": train_inner_steps,
            "inner_lr": inner_lr,
            "inner_optimizer": inner_optimizer,
            "finetune_lr": finetune_lr,
            "eps0": eps0,
            "eps_min": eps_min,
            "pretrain_steps": pretrain_steps,
            "pretrain_tasks_per_step": pretrain_tasks_per_step,
            "n_query": n_query,
            "seed": seed,
        },
        "runtime_s": time.perf_counter() - t_start,
        "runtime_reptile_s": t_reptile,
        "runtime_pretrain_s": t_pretrain,
    }
