"""The separable quadratic reward surface: its design matrix and its weighted ridge solve.

Three places fit ``reward ≈ c + Σ_k a_k·x_k + b_k·x_k²`` over knobs in unit space: the
controller's surrogate (``meta.controller.fit_surrogate``: around the incumbent, weighted
by recency, ridge toward a negative curvature), the per-domain priors' optima
(``meta.priors``: around the mean, tiny ridge, t-tests on the curvature) and the
diagnostics' surface (``governance.diagnostics.fit_surface``: raw unit space, tiny ridge,
covariance for contrasts). Their policies differ; the two mechanical parts are here, once:

* ``quadratic_design`` — the columns ``[1, x_1 … x_K, x_k² for every non-bool knob]``
  (x = u − center; for a 0/1 knob x² would repeat x) and where each knob's terms are;
* ``ridge_solve`` — ``β = (XᵀWX + P)⁻¹(XᵀWy + P·target)`` with P diagonal, plus
  ``σ²·(XᵀWX + P)⁻¹`` when the covariance is asked for.

The column order and the solver are fixed: the controller's decisions (and so the
``simulate --evaluate`` figures) are reproduced bit for bit only with this layout and
``lstsq``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuadraticDesign:
    """The design matrix and where each knob's terms are (knobs in the order given)."""

    matrix: np.ndarray  # n × p: intercept, K linear columns, then the squares of the non-bool knobs
    linear: np.ndarray  # column of knob j's linear term
    square: np.ndarray  # column of knob j's square term; -1 for a bool knob (no square)

    @property
    def n_params(self) -> int:
        return self.matrix.shape[1]

    @property
    def squared(self) -> np.ndarray:
        """Which knobs have a square term."""
        return self.square >= 0

    def curvature(self, beta: np.ndarray) -> np.ndarray:
        """Per knob, its square coefficient (0 for a bool knob)."""
        out = np.zeros(len(self.square))
        out[self.squared] = beta[self.square[self.squared]]
        return out


def quadratic_design(u: np.ndarray, kinds: Sequence[str], center: np.ndarray | None = None) -> QuadraticDesign:
    """The separable quadratic design of the rows of ``u`` (n × K, unit space).

    ``kinds``: each column's knob kind (``"bool"`` gets no square term); ``center``: the
    reference point subtracted first (None = none).
    """
    u = np.atleast_2d(np.asarray(u, dtype=float))
    k = u.shape[1]
    x = u - center if center is not None else u
    quad = np.array([kind != "bool" for kind in kinds], dtype=bool)
    if len(quad) != k:
        raise ValueError(f"{len(quad)} knob kinds for {k} columns")
    matrix = np.column_stack([np.ones(len(x)), x, x[:, quad] ** 2])
    square = np.full(k, -1, dtype=int)
    square[quad] = 1 + k + np.arange(int(quad.sum()))
    return QuadraticDesign(matrix, 1 + np.arange(k), square)


@dataclass(frozen=True)
class RidgeFit:
    beta: np.ndarray
    dof: int  # max(n − p, 1)
    sigma2: float | None = None  # weighted residual variance Σw·r²/dof (with the covariance)
    cov: np.ndarray | None = None  # σ²·(XᵀWX + P)⁻¹, when asked for


def ridge_solve(
    X: np.ndarray,
    y: np.ndarray,
    penalty: float | np.ndarray,
    *,
    weights: np.ndarray | None = None,
    target: np.ndarray | None = None,
    with_cov: bool = False,
) -> RidgeFit:
    """β = (XᵀWX + P)⁻¹(XᵀWy + P·target), P = diag(penalty), W = diag(weights) (None = 1).

    ``target``: the values the ridge pulls each coefficient toward (None = 0).
    ``with_cov``: also σ² = Σw·r²/dof (dof = max(n − p, 1)) and cov = σ²·(XᵀWX + P)⁻¹.
    """
    n, p = X.shape
    diag = np.broadcast_to(np.asarray(penalty, dtype=float), (p,))
    if weights is None:
        lhs = X.T @ X + np.diag(diag)
        rhs = X.T @ y
    else:
        lhs = X.T @ (weights[:, None] * X) + np.diag(diag)
        rhs = X.T @ (weights * y)
    if target is not None:
        rhs = rhs + diag * target
    beta = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    dof = max(n - p, 1)
    if not with_cov:
        return RidgeFit(beta, dof)
    resid = y - X @ beta
    sigma2 = float((resid @ resid if weights is None else resid @ (weights * resid)) / dof)
    return RidgeFit(beta, dof, sigma2, sigma2 * np.linalg.inv(lhs))
