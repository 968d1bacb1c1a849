"""Reptile and first-order MAML over flat parameter vectors, in plain numpy.

The meta-optimisers here only see flat ``theta`` vectors and two callables
(a task sampler and an inner adaptation), so the same code meta-learns an
initialisation for a knob-prior vector or for a neural network.

The sinusoid few-shot regression check of the MAML/Reptile papers (a benchmark of
this meta-learner) lives in ``meta_pipeline.lab.reptile_sinusoid``.

Update rules
------------
Reptile:  theta <- theta + eps * (sum_d w_d * theta_d - theta),  w normalised.
FOMAML:   theta <- theta - beta * sum_d w_d * g_d,  g_d = query-set gradient of
          task d evaluated at the adapted parameters theta_d.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]

__all__ = [
    "reptile_step",
    "fomaml_step",
    "annealed_epsilon",
    "meta_train",
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
