"""Vectorized half-life fitting of lesson edges (pure numpy/scipy, no Dagster).

Model, per lesson ``i``::

    edge_i(t) = e0_i * exp(-lambda_i * t),     Var(bucket mean) = sigma_i^2 / n

fitted by weighted least squares (weights = bucket trade counts ``n``) for *all*
lessons at once.  ``lambda`` may be negative (an improving edge);
``half_life_hours = ln 2 / lambda``.

Method (why it is done this way):

* **Profile over a lambda grid.**  For fixed lambda the model is linear in e0,
  so ``e0(lambda) = A/B`` and ``SSE(lambda) = Syy - A^2/B`` with
  ``A = sum n f y``, ``B = sum n f^2``, ``f = exp(-lambda t)``.  Bucket times are
  measured from each lesson's own first bucket, so for regular buckets all
  lessons share a handful of distinct times ``t_u``; the sums for every
  (lesson, lambda) pair are then two matrix products ``M @ exp(-lambda t_u)^T``
  (BLAS; sparse when the times are irregular).  A global grid search cannot be
  trapped in a local minimum the way a per-lesson ``curve_fit`` started at one
  p0 can, and it directly gives the whole profile needed for the CI.
* **Refine** the grid minimum with a parabolic step plus a few safeguarded,
  vectorized Newton steps using analytic derivatives of the profile SSE.
* **CI by profile likelihood**: lambda values with
  ``SSE(lambda) - SSE_min <= q * sigma2_ci`` (q = F(1, dof) quantile),
  bracketed on the grid and solved with vectorized Illinois (regula falsi)
  steps.  Profile intervals are asymmetric where they should be (slow decays,
  near-unidentified fast decays) unlike Wald intervals from a covariance.
* **sigma2_ci** (``ci_method="robust"``, the default): the per-trade noise
  variance as lambda-hat sees it -- the HC3 sandwich variance of lambda-hat in
  units of the model variance, i.e. a leverage-weighted mean of the buckets'
  squared residuals (see :func:`_robust_lambda_noise`), with Satterthwaite dof.
  Honest under heteroscedastic buckets (noisy early days, bursty days, heavy
  tails), overdispersed days and co-firing; a fit carried by one or two
  buckets gets few dof and a wide interval.  ``ci_method="model"`` keeps the
  model-based sigma^2 = max(pooled within-bucket variance, residual variance),
  which undercovers when the noise is largest where lambda is decided.
* **State**: ``insufficient_data`` if too few buckets, the fitted curve is not
  distinguishable from a zero edge (likelihood-ratio gate, see
  :func:`fit_half_lives`), or it is a growth curve resting on too few buckets
  (curve support, :func:`curve_support_buckets`: "explosive growth from e0 ~ 0"
  fitted to a late sign flip); otherwise the sign of lambda's CI decides
  decaying / improving / stable.

The only Python loops are over grid chunks, lesson chunks (memory bound) and a
fixed number of Newton / root-finding iterations -- never over lessons.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse, stats

__all__ = [
    "CI_METHODS",
    "OUTPUT_COLUMNS",
    "STATES",
    "fit_half_lives",
]

LN2 = math.log(2.0)
_NS_PER_HOUR = 3.6e12
# Exponent clip: keeps f = e^x and f^2 = e^{2x} finite in float64 (e^680 < 1.8e308).
# With the grid limits below the clip is never active on real data; it only
# guards pathological inputs.
_XCLIP = 340.0

STATES = ("decaying", "improving", "stable", "insufficient_data")
# "robust": profile interval with the HC3 sandwich noise and Satterthwaite dof (default);
# "model": the model-based profile interval (sigma^2 = max(within-bucket, residual)).
CI_METHODS = ("robust", "model")
OUTPUT_COLUMNS = [
    "lesson_key",
    "e0",
    "e0_se",
    "decay_rate_per_hour",
    "decay_rate_ci_low",
    "decay_rate_ci_high",
    "half_life_hours",
    "half_life_ci_low",
    "half_life_ci_high",
    "state",
    "n_buckets",
    "n_trades",
    "t_ref",
]
_REQUIRED = ("lesson_key", "bucket_start", "n", "edge_mean", "edge_se")


# --------------------------------------------------------------------------- grid
def lambda_grid(
    t_max_hours: float,
    bucket_hours: float,
    *,
    step: float = 0.08,
    slow_windows: float = 200.0,
    fast_buckets: float = 0.125,
    max_log_growth: float = 300.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decay-rate grid ``lambda = c*sinh(u)``, ``u = k*step`` (contains 0 exactly).

    sinh spacing is linear around 0 (resolves "stable" vs slow decay, where
    |lambda| is below ``c = ln2 / (slow_windows * window)``, i.e. half-lives of
    more than ``slow_windows`` windows) and geometric (ratio ~e^step, 4 %) for
    larger |lambda|, on both signs.  Fast end: half-life of ``fast_buckets``
    buckets -- beyond that only the first bucket carries the fit, so faster
    decays are not identifiable from bucketed data.  Negative end: the same
    magnitude, but no more than ``max_log_growth`` e-folds of growth over the
    longest window so exp() stays finite.
    """
    window = max(float(t_max_hours), float(bucket_hours))
    c = LN2 / (slow_windows * window)
    lam_hi = LN2 / (fast_buckets * bucket_hours)
    lam_lo = -min(lam_hi, max_log_growth / window)
    k_lo = math.floor(math.asinh(lam_lo / c) / step)
    k_hi = math.ceil(math.asinh(lam_hi / c) / step)
    u = np.arange(k_lo, k_hi + 1, dtype=float) * step
    return c * np.sinh(u), u, c


# ----------------------------------------------------------------- sums helpers
def _profile_sse(Syy: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    # A*(A/B) rather than A**2/B: A and B can reach e^300 / e^600 at the
    # negative end of the grid, their ratio cannot overflow.
    with np.errstate(divide="ignore", invalid="ignore"):
        S = Syy - A * (A / B)
    return np.where(B > 0, S, np.nan)


class _Design:
    """Weighted sums of one lesson chunk, in the cheapest available layout.

    Regular buckets => every lesson's own-origin times lie on one small set of
    distinct times ``t_u``, so the chunk is a dense (lessons x t_u) matrix
    (missing buckets are zero weight = padding + mask in one).  Sums over a
    lambda grid are then BLAS products and per-lesson sums are row-wise
    ``einsum`` dot products.  Irregular times fall back to sparse matrices for
    the grid and long-format ``bincount`` for per-lesson sums.
    """

    def __init__(
        self,
        li: np.ndarray,
        t: np.ndarray,
        w: np.ndarray,
        wy: np.ndarray,
        n_les: int,
        max_cells: int,
        t_u: np.ndarray,
        ui: np.ndarray,
    ) -> None:
        # t_u / ui: distinct times of the whole input and each row's index in it
        # (one global sort instead of one per chunk).
        self.n_les = n_les
        self.li, self.t, self.w, self.wy = li, t, w, wy
        U = t_u.size
        cells = n_les * U
        # Dense only if it does not blow up memory nor waste work on padding.
        self.dense = cells <= max_cells and cells <= 4 * max(li.size, 1)
        if not self.dense:  # compact to this chunk's own distinct times
            used, ui = np.unique(ui, return_inverse=True)
            t_u = t_u[used]
            U = t_u.size
        self.t_u = t_u
        if self.dense:
            flat = li * U + ui
            self.Mwy = np.bincount(flat, wy, cells).reshape(n_les, U)
            self.Mw = np.bincount(flat, w, cells).reshape(n_les, U)
            self.Mwy_t, self.Mwy_t2 = self.Mwy * t_u, self.Mwy * t_u**2
            self.Mw_t, self.Mw_t2 = self.Mw * t_u, self.Mw * t_u**2
            self.Gwy: Any = self.Mwy
            self.Gw: Any = self.Mw
        else:
            self.Gwy = sparse.csr_matrix((wy, (li, ui)), shape=(n_les, U))
            self.Gw = sparse.csr_matrix((w, (li, ui)), shape=(n_les, U))

    def grid(self, lam: np.ndarray, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """A, B for every lesson x grid point (L x G) via matrix products."""
        G, U = lam.size, self.t_u.size
        A = np.empty((self.n_les, G))
        B = np.empty((self.n_les, G))
        g_chunk = max(1, max_cells // max(U, 1))
        for g0 in range(0, G, g_chunk):  # loop over grid chunks, not lessons
            x = np.clip(np.multiply.outer(-lam[g0 : g0 + g_chunk], self.t_u), -_XCLIP, _XCLIP)
            f = np.exp(x)
            A[:, g0 : g0 + g_chunk] = self.Gwy @ f.T
            B[:, g0 : g0 + g_chunk] = self.Gw @ (f * f).T
        return A, B

    def sums(self, lam_les: np.ndarray, derivs: bool = False) -> tuple[np.ndarray, ...]:
        """Per-lesson A=sum w f y, B=sum w f^2 at a per-lesson lambda.

        With ``derivs`` also A1=sum w y t f, A2=sum w y t^2 f, B1=sum w t f^2,
        B2=sum w t^2 f^2 for the analytic profile derivatives.
        """
        if self.dense:
            f = np.exp(np.clip(np.multiply.outer(-lam_les, self.t_u), -_XCLIP, _XCLIP))
            f2 = f * f
            dot = lambda M, F: np.einsum("ij,ij->i", M, F)  # noqa: E731 - row-wise dot
            if not derivs:
                return dot(self.Mwy, f), dot(self.Mw, f2)
            return (
                dot(self.Mwy, f), dot(self.Mw, f2),
                dot(self.Mwy_t, f), dot(self.Mwy_t2, f),
                dot(self.Mw_t, f2), dot(self.Mw_t2, f2),
            )
        li, t, n_les = self.li, self.t, self.n_les
        f = np.exp(np.clip(-lam_les[li] * t, -_XCLIP, _XCLIP))
        wyf = self.wy * f
        wff = self.w * f * f
        A = np.bincount(li, wyf, n_les)
        B = np.bincount(li, wff, n_les)
        if not derivs:
            return A, B
        wyft, wfft = wyf * t, wff * t
        return (
            A, B,
            np.bincount(li, wyft, n_les), np.bincount(li, wyft * t, n_les),
            np.bincount(li, wfft, n_les), np.bincount(li, wfft * t, n_les),
        )


# ------------------------------------------------------------------ chunk fit
def _fit_chunk(
    li: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    y: np.ndarray,
    n_les: int,
    n_buckets: np.ndarray,
    sigma2_within: np.ndarray,
    lam: np.ndarray,
    u: np.ndarray,
    c: float,
    step: float,
    ci_level: float,
    max_cells: int,
    newton_iters: int,
    root_iters: int,
    t_u: np.ndarray,
    ui: np.ndarray,
    ci_method: str = "robust",
) -> dict[str, np.ndarray]:
    wy = w * y
    Syy = np.bincount(li, wy * y, n_les)
    G = lam.size
    design = _Design(li, t, w, wy, n_les, max_cells, t_u, ui)
    S_grid = _profile_sse(Syy[:, None], *design.grid(lam, max_cells))
    # Non-finite only where B == 0, i.e. a lesson without usable rows: give it a
    # flat profile (it is masked out later) so no inf - inf arithmetic follows.
    has_data = np.bincount(li, minlength=n_les) > 0
    S_grid = np.where(np.isfinite(S_grid), S_grid, np.where(has_data, np.inf, 0.0)[:, None])
    rows = np.arange(n_les)

    # ---- 1. global minimum on the grid, then parabolic + Newton refinement
    g = np.argmin(S_grid, axis=1)
    g_m, g_p = np.maximum(g - 1, 0), np.minimum(g + 1, G - 1)
    S0, Sm, Sp = S_grid[rows, g], S_grid[rows, g_m], S_grid[rows, g_p]
    interior = (g > 0) & (g < G - 1)
    curv = Sm - 2.0 * S0 + Sp
    with np.errstate(divide="ignore", invalid="ignore"):
        du = np.where(interior & (curv > 0), 0.5 * step * (Sm - Sp) / curv, 0.0)
    du = np.clip(np.nan_to_num(du), -step, step)
    lo, hi = lam[g_m], lam[g_p]  # the true minimum is bracketed by the neighbours
    best_lam, best_S = lam[g].copy(), S0.copy()
    cur = np.clip(c * np.sinh(u[g] + du), lo, hi)
    for _ in range(newton_iters):  # fixed small number of vectorized steps
        A, B, A1, A2, B1, B2 = design.sums(cur, derivs=True)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r = A / B
            S = Syy - A * r
            d1 = 2.0 * r * A1 - 2.0 * r * r * B1
            g2 = (
                2.0 * A1 * (A1 / B)
                + 2.0 * r * A2
                - 8.0 * r * A1 * (B1 / B)
                - 4.0 * r * r * B2
                + 8.0 * r * r * B1 * (B1 / B)
            )
            d2 = -g2
            better = np.isfinite(S) & (S < best_S)
            best_lam = np.where(better, cur, best_lam)
            best_S = np.where(better, S, best_S)
            newton = np.where(d2 > 0, -d1 / d2, 0.0)
        cur = np.clip(cur + np.nan_to_num(newton), lo, hi)
    A, B = design.sums(cur)
    S = _profile_sse(Syy, A, B)
    better = np.isfinite(S) & (S < best_S)
    lam_hat = np.where(better, cur, best_lam)
    S_min = np.maximum(np.where(better, S, best_S), 0.0)

    # ---- 2. noise variance sigma^2 (variance of one trade), per lesson
    dof = n_buckets - 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2_res = np.where(dof > 0, S_min / dof, np.nan)
    has_within = np.isfinite(sigma2_within) & (sigma2_within > 0)
    # Within-bucket trade variance is a floor for the bucket noise (precise: it
    # has sum(n-1) dof); residuals additionally catch overdispersion (day-to-day
    # edge wobble) and misspecification.  Take the larger -- conservative, costs
    # ~4 % CI width when the model is exactly right.  When residuals decide,
    # their small dof is honoured with F quantiles instead of chi2.
    use_res = ~has_within | (np.nan_to_num(sigma2_res, nan=-1.0) > sigma2_within)
    sigma2 = np.where(use_res, sigma2_res, sigma2_within)
    dof_safe = np.maximum(dof, 1.0)
    # F quantiles per distinct dof only (scipy's ppf is slow per element).
    udof, dof_inv = np.unique(dof_safe, return_inverse=True)
    q = np.where(
        use_res,
        stats.f.ppf(ci_level, 1, udof)[dof_inv],
        stats.chi2.ppf(ci_level, 1),
    )
    if ci_method == "robust":
        sigma2_ci, dof_ci = _robust_lambda_noise(li, t, w, y, n_les, lam_hat, S_min, Syy, design)
        # F(1, nu) = t_nu^2; quantiles per distinct (rounded) effective dof only.
        nu = np.round(np.clip(np.nan_to_num(dof_ci, nan=1.0), 1.0, 1e4), 1)
        unu, nu_inv = np.unique(nu, return_inverse=True)
        q = stats.f.ppf(ci_level, 1, unu)[nu_inv]
        thr = S_min + q * sigma2_ci
    else:
        thr = S_min + q * sigma2
    thr = np.where(np.isfinite(thr), thr, np.inf)

    # ---- 3. profile-likelihood CI: first threshold crossing walking outward
    # from lam_hat on each side, i.e. the connected region around the minimum
    # (a far-away second dip cannot glue itself onto the interval).
    above = S_grid > thr[:, None]
    left_mask = above & (lam[None, :] < lam_hat[:, None])
    right_mask = above & (lam[None, :] > lam_hat[:, None])
    has_left = left_mask.any(axis=1)
    has_right = right_mask.any(axis=1)
    gL = np.where(has_left, G - 1 - np.argmax(left_mask[:, ::-1], axis=1), 0)
    gR = np.where(has_right, np.argmax(right_mask, axis=1), G - 1)
    # Inner bracket end: the neighbouring grid point (S <= thr by construction)
    # unless that lies beyond lam_hat, then lam_hat itself (CI narrower than a
    # grid step).
    gL1, gR1 = np.minimum(gL + 1, G - 1), np.maximum(gR - 1, 0)
    inL = lam[gL1] < lam_hat
    inR = lam[gR1] > lam_hat
    ci_lo = _illinois(
        a=np.where(has_left, lam[gL], lam_hat),
        ha=np.where(has_left, S_grid[rows, gL] - thr, 1.0),
        b=np.where(has_left & inL, lam[gL1], lam_hat),
        hb=np.where(has_left & inL, S_grid[rows, gL1], S_min) - thr,
        S_of=lambda x: _profile_sse(Syy, *design.sums(x)),
        thr=thr,
        iters=root_iters,
    )
    ci_hi = _illinois(
        a=np.where(has_right, lam[gR], lam_hat),
        ha=np.where(has_right, S_grid[rows, gR] - thr, 1.0),
        b=np.where(has_right & inR, lam[gR1], lam_hat),
        hb=np.where(has_right & inR, S_grid[rows, gR1], S_min) - thr,
        S_of=lambda x: _profile_sse(Syy, *design.sums(x)),
        thr=thr,
        iters=root_iters,
    )
    # No crossing inside the grid => the data cannot bound lambda on that side.
    ci_lo = np.where(has_left, np.minimum(ci_lo, lam_hat), -np.inf)
    ci_hi = np.where(has_right, np.maximum(ci_hi, lam_hat), np.inf)

    # ---- 4. e0 and its Wald s.e. from the 2x2 information at lam_hat
    A, B, A1, A2, B1, B2 = design.sums(lam_hat, derivs=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e0 = A / B
        m1, m2 = B1 / B, B2 / B  # normalised moments: no overflow in det
        spread = m2 - m1 * m1  # weighted variance of t under weights n f^2
    return {
        "lam": lam_hat,
        "support": curve_support_buckets(li, t, w, lam_hat, n_les),
        "ci_lo": ci_lo,
        "ci_hi": ci_hi,
        "S_min": S_min,
        "Syy": Syy,
        "sigma2": sigma2,
        "use_res": use_res,
        "dof": dof,
        "e0": e0,
        "B": B,
        "m1": m1,
        "m2": m2,
        "spread": spread,
    }


def _normalised_wf2(li: np.ndarray, x: np.ndarray, w: np.ndarray, n_les: int) -> np.ndarray:
    """Per row ``w f^2`` with ``f = exp(x)`` divided by its lesson's largest ``f`` (no overflow)."""
    x_max = np.full(n_les, -np.inf)
    np.maximum.at(x_max, li, x)
    return w * np.exp(2.0 * (x - x_max[li]))


def curve_support_buckets(li: np.ndarray, t: np.ndarray, w: np.ndarray, lam: np.ndarray, n_les: int) -> np.ndarray:
    """Effective number of buckets carrying the fitted curve (Kish): ``(sum w f^2)^2 / sum (w f^2)^2``.

    ``w f^2`` is a bucket's share of the information about the curve's level. A curve
    resting on fewer than ``min_buckets`` effective buckets is an extrapolation of one
    or two buckets, e.g. "explosive growth from e0 ~ 0" fitted to a run of late buckets.
    """
    x = np.clip(-lam[li] * t, -_XCLIP, _XCLIP)
    wf2 = _normalised_wf2(li, x, w, n_les)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.bincount(li, wf2, n_les) ** 2 / np.bincount(li, wf2 * wf2, n_les)


def _robust_lambda_noise(
    li: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    y: np.ndarray,
    n_les: int,
    lam_hat: np.ndarray,
    S_min: np.ndarray,
    Syy: np.ndarray,
    design: "_Design",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-trade noise variance *as lambda-hat sees it* (HC3 sandwich), and its effective dof.

    At lambda-hat the Gauss-Newton design of bucket k is ``f_k (1, -e0 t_k)``
    (``f = exp(-lambda t)``, weight ``w = n``). Its sandwich variance of lambda-hat
    divided by the model variance's unit ``[(J'WJ)^-1]_ll`` is a weighted mean of the
    buckets' per-trade squared residuals::

        sigma2_rob = sum_k omega_k * w_k r_k^2 / (1 - h_k)^2
        omega_k    = w_k f_k^2 (t_k - m1)^2 / sum_j w_j f_j^2 (t_j - m1)^2       (sum to 1)
        h_k        = w_k f_k^2 (1/B + (t_k - m1)^2 / (B * spread))               (leverage)

    with ``m1``, ``spread`` the mean and variance of t under weights ``w f^2``. So each
    bucket's noise counts as much as it moves lambda-hat: heteroscedastic buckets,
    overdispersed days and co-firing that inflates some days are all in ``r_k``, not
    assumed away. HC3's ``1/(1-h)^2`` is the leave-one-bucket-out prediction error: a
    fit carried by one or two buckets (e.g. "explosive growth from e0 ~ 0" explaining a
    late sign flip) has h -> 1 there and gets a wide interval. Effective dof
    (Satterthwaite): ``1 / sum omega_k^2`` -- the interval uses F(1, dof) quantiles, so a
    fit resting on few buckets is wide, one resting on many buckets is not.
    Independent of e0 (no division by it), scale-free in f.
    """
    lam_r = lam_hat[li]
    x = np.clip(-lam_r * t, -_XCLIP, _XCLIP)
    # Normalise f per lesson (divide by its largest value): omega and h are ratios, so
    # they are unchanged, and w f^2 t^2 cannot overflow for strongly improving fits.
    wf2 = _normalised_wf2(li, x, w, n_les)
    Bn = np.bincount(li, wf2, n_les)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m1 = np.bincount(li, wf2 * t, n_les) / Bn
        dt2 = (t - m1[li]) ** 2
        u = wf2 * dt2
        Bs = np.bincount(li, u, n_les)  # = Bn * spread
        omega = u / Bs[li]
        h = wf2 * (1.0 / Bn[li] + dt2 / Bs[li])
        A, B = design.sums(lam_hat)
        e0 = A / B
        resid = y - e0[li] * np.exp(x)
        inflate = 1.0 / np.maximum(1.0 - h, 1e-4) ** 2
        sigma2_rob = np.bincount(li, omega * w * resid * resid * inflate, n_les)
        dof = 1.0 / np.bincount(li, omega * omega, n_les)
    bad = ~np.isfinite(sigma2_rob) | ~np.isfinite(dof)
    return np.where(bad, np.nan, sigma2_rob), np.where(bad, 1.0, dof)


def _illinois(
    a: np.ndarray,
    ha: np.ndarray,
    b: np.ndarray,
    hb: np.ndarray,
    S_of: Any,
    thr: np.ndarray,
    iters: int,
) -> np.ndarray:
    """Vectorized Illinois root finding of S(lambda) = thr on [a, b].

    ``a`` is outside the CI (h > 0), ``b`` inside (h <= 0); lessons with a == b
    are inert.  The root always stays between a and b, so the CI ordering
    low <= lambda_hat <= high is guaranteed.
    """
    side = np.zeros(a.shape, dtype=np.int8)
    for _ in range(iters):
        denom = hb - ha
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(denom != 0, (a * hb - b * ha) / denom, 0.5 * (a + b))
        x = np.clip(np.nan_to_num(x), np.minimum(a, b), np.maximum(a, b))
        hx = S_of(x) - thr
        hx = np.where(np.isfinite(hx), hx, 1.0)
        inner = hx <= 0
        # Illinois: halve the stale end's value when the same end is kept twice.
        ha = np.where(inner & (side == 1), 0.5 * ha, ha)
        hb = np.where(~inner & (side == -1), 0.5 * hb, hb)
        a, ha = np.where(inner, a, x), np.where(inner, ha, hx)
        b, hb = np.where(inner, x, b), np.where(inner, hx, hb)
        side = np.where(inner, 1, -1).astype(np.int8)
    denom = hb - ha
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(denom != 0, (a * hb - b * ha) / denom, b)
    return np.clip(np.nan_to_num(x), np.minimum(a, b), np.maximum(a, b))


# --------------------------------------------------------------------- public
def fit_half_lives(
    edge_history: pd.DataFrame,
    *,
    min_buckets: int = 5,
    ci_level: float = 0.95,
    e0_z_min: float = 2.0,
    t_ref: pd.Timestamp | None = None,
    bucket_hours: float = 24.0,
    grid_step: float = 0.08,
    max_cells: int = 500_000,
    newton_iters: int = 5,
    root_iters: int = 6,
    ci_method: str = "robust",
    growth_support_share: float | None = 0.25,
) -> pd.DataFrame:
    """Fit ``edge(t) = e0*exp(-lambda*t)`` for every lesson in ``edge_history``.

    Parameters
    ----------
    edge_history
        Columns ``lesson_key, bucket_start (UTC), n, edge_mean, edge_se``.
        Rows with ``n <= 0``, non-finite ``edge_mean``, missing key or time are
        ignored for the fit (the lesson still gets an output row).
    min_buckets
        Fewer distinct buckets => ``insufficient_data`` (at least 3 are always
        required: 2 parameters + 1 degree of freedom).
    ci_level
        Level of the profile-likelihood CI of lambda (and hence half-life).
    e0_z_min
        Signal gate, in z units.  A lesson is ``insufficient_data`` unless the
        *fitted curve* is distinguishable from a zero edge: the likelihood ratio
        statistic ``(Syy - SSE_min)/sigma^2`` (chi2_2, or 2*F(2,dof) when
        sigma^2 comes from residuals) must have a p-value below the two-sided
        normal p-value of ``e0_z_min`` (z=2 -> 0.0455).  Gating on
        ``|e0|/se(e0)`` instead would wrongly reject improving lessons that start
        near zero, and gating on the window mean would reject fast decays whose
        edge is concentrated in the first buckets; the curve test handles both.
    t_ref
        Origin of ``e0`` and of the output ``t_ref`` column.  Default (None):
        each lesson's own first ``bucket_start`` -- e0 is then "the edge when
        the lesson was born", comparable across lessons of different ages and
        never an extrapolation far outside the data.  A global timestamp maps
        e0 (and its s.e., by the delta method) to that instant; lambda and its
        CI do not depend on t_ref.
    ci_method
        ``"robust"`` (default): profile interval on the HC3 sandwich noise variance
        with Satterthwaite dof; ``"model"``: on the model-based noise variance
        ``max(within-bucket, residual)`` (for comparison; undercovers under
        heteroscedastic buckets).
    growth_support_share
        A growth fit (lambda < 0) whose curve rests on fewer than
        ``max(min_buckets, growth_support_share * buckets)`` effective buckets is a
        change point, not a trend: both CI ends become infinite and the state
        ``insufficient_data``. ``None`` turns the rule off (for comparison only).
    bucket_hours
        Bucket width.  A bucket's mean edge is placed at its midpoint
        ``bucket_start + bucket_hours/2`` (the bucket average of an exponential
        equals its midpoint value to second order); also sets the fast end of
        the lambda grid.

    Returns
    -------
    DataFrame with :data:`OUTPUT_COLUMNS`, one row per distinct ``lesson_key``
    (sorted).  ``half_life_*`` are NaN unless ``state == 'decaying'``;
    ``half_life_ci_low`` is 0 when lambda's CI is unbounded above.
    ``decay_rate_ci_*`` are +-inf when the profile never crosses the threshold
    inside the grid (the data cannot bound lambda on that side).
    """
    missing = [c for c in _REQUIRED if c not in edge_history.columns]
    if missing:
        raise ValueError(f"edge_history is missing columns {missing}")
    if not 0.0 < ci_level < 1.0:
        raise ValueError("ci_level must be in (0, 1)")
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {CI_METHODS} (got {ci_method!r})")

    codes, uniques = pd.factorize(edge_history["lesson_key"], sort=True)
    n_les = len(uniques)
    ts = pd.DatetimeIndex(pd.to_datetime(edge_history["bucket_start"], utc=True))
    ns_all = ts.as_unit("ns").asi8
    n_all = pd.to_numeric(edge_history["n"], errors="coerce").to_numpy(dtype=float)
    y_all = pd.to_numeric(edge_history["edge_mean"], errors="coerce").to_numpy(dtype=float)
    se_all = pd.to_numeric(edge_history["edge_se"], errors="coerce").to_numpy(dtype=float)
    ok = (codes >= 0) & ~ts.isna() & np.isfinite(n_all) & (n_all > 0) & np.isfinite(y_all)

    # Sort once by (lesson, time): lessons become contiguous row ranges, so the
    # chunk loop below is a slice, and first-bucket / distinct-bucket counts
    # are single vector ops.
    sel = np.flatnonzero(ok)
    sel = sel[np.lexsort((ns_all[sel], codes[sel]))]
    code, ns = codes[sel].astype(np.int64), ns_all[sel]
    n, y, se = n_all[sel], y_all[sel], se_all[sel]
    rows_per = np.bincount(code, minlength=n_les)
    starts = np.concatenate(([0], np.cumsum(rows_per)))
    has_rows = rows_per > 0

    first_ns = np.zeros(n_les, dtype=np.int64)
    first_ns[has_rows] = ns[starts[:-1][has_rows]]
    new_bucket = np.ones(code.size, dtype=bool)
    new_bucket[1:] = (code[1:] != code[:-1]) | (ns[1:] != ns[:-1])
    n_buckets = np.bincount(code, new_bucket.astype(float), n_les)
    n_trades = np.bincount(code, n, n_les)
    # Pooled within-bucket trade variance: se^2*n is a bucket's sample variance
    # with n-1 dof (NaN se for n == 1 buckets carries no information).
    okv = (n >= 2) & np.isfinite(se) & (se >= 0)
    nm1 = np.where(okv, n - 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2_within = np.bincount(code, np.where(okv, nm1 * se * se * n, 0.0), n_les) / (
            np.bincount(code, nm1, n_les)
        )

    # Own-origin times (hours, bucket midpoints): well conditioned, and all
    # regular-bucket lessons share the same time lattice (see _Design).
    t = (ns - first_ns[code]) / _NS_PER_HOUR + 0.5 * bucket_hours
    t_max = float(t.max()) if t.size else bucket_hours
    lam, u, c = lambda_grid(t_max, bucket_hours, step=grid_step)
    # Distinct times (rounded to ~4 ms so float noise cannot split a lattice point).
    t_u, ui = np.unique(np.round(t, 6), return_inverse=True)

    fields = ("lam", "support", "ci_lo", "ci_hi", "S_min", "Syy", "sigma2", "use_res", "dof",
              "e0", "B", "m1", "m2", "spread")
    res = {k: np.full(n_les, np.nan) for k in fields}
    chunk = max(1, max_cells // lam.size)
    for c0 in range(0, n_les, chunk):  # memory chunks of many lessons each
        c1 = min(c0 + chunk, n_les)
        r0, r1 = starts[c0], starts[c1]
        out = _fit_chunk(
            li=code[r0:r1] - c0,
            t=t[r0:r1],
            w=n[r0:r1],
            y=y[r0:r1],
            n_les=c1 - c0,
            n_buckets=n_buckets[c0:c1],
            sigma2_within=sigma2_within[c0:c1],
            lam=lam,
            u=u,
            c=c,
            step=grid_step,
            ci_level=ci_level,
            max_cells=max_cells,
            newton_iters=newton_iters,
            root_iters=root_iters,
            t_u=t_u,
            ui=ui[r0:r1],
            ci_method=ci_method,
        )
        for k in fields:
            res[k][c0:c1] = out[k]

    fitted = has_rows & (n_buckets >= 3) & np.isfinite(res["lam"]) & np.isfinite(res["e0"])
    fitted &= np.isfinite(res["sigma2"]) & (res["sigma2"] > 0)
    lam_hat = np.where(fitted, res["lam"], np.nan)
    ci_lo = np.where(fitted, res["ci_lo"], np.nan)
    ci_hi = np.where(fitted, res["ci_hi"], np.nan)

    # e0 at the requested origin: edge = e0_own*exp(-lam*(tau - tau0)), tau0 =
    # hours from t_ref to the lesson's first bucket start.
    if t_ref is None:
        tau0 = np.zeros(n_les)
        tref_ns = first_ns
    else:
        tr = pd.Timestamp(t_ref)
        tr = tr.tz_localize("UTC") if tr.tzinfo is None else tr.tz_convert("UTC")
        tref_ns = np.full(n_les, tr.as_unit("ns").value, dtype=np.int64)
        tau0 = (first_ns - tref_ns) / _NS_PER_HOUR
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        growth = np.exp(lam_hat * tau0)
        e0 = res["e0"] * growth
        # Delta method on (e0_own, lam) with the 2x2 Gauss-Newton covariance;
        # (m2 + 2 tau0 m1 + tau0^2) is the weighted 2nd moment of time since t_ref.
        var_e0 = (
            growth**2
            * res["sigma2"]
            * (res["m2"] + 2.0 * tau0 * res["m1"] + tau0 * tau0)
            / (res["B"] * res["spread"])
        )
        e0_se = np.sqrt(var_e0)
    e0 = np.where(fitted, e0, np.nan)
    e0_se = np.where(fitted & (var_e0 >= 0), e0_se, np.nan)

    # Signal gate: LR test of the fitted curve against edge == 0 (see docstring).
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.maximum(res["Syy"] - res["S_min"], 0.0) / res["sigma2"]
    use_res = res["use_res"] == 1.0
    pval = np.where(
        use_res,
        stats.f.sf(lr / 2.0, 2, np.maximum(res["dof"], 1.0)),
        stats.chi2.sf(lr, 2),
    )
    p_gate = 2.0 * stats.norm.sf(e0_z_min)
    usable = fitted & (n_buckets >= max(int(min_buckets), 3)) & (pval <= p_gate)

    # A growth fit must rest on enough of its buckets: growth extrapolates forward
    # without bound (an override shaped by it grows after `now`), so "explosive growth
    # from e0 ~ 0" explaining a late run of buckets (a sign flip, a late burst) is a
    # change point, not a trend -- its interval is unbounded on both sides and its
    # state insufficient_data. Required: curve support (effective buckets, see
    # curve_support_buckets) >= max(min_buckets, growth_support_share * buckets).
    # Decaying fits extrapolate toward zero and are not held to this (a fast decay
    # legitimately rests on its first buckets).
    if growth_support_share is None:  # rule off (for comparison only)
        unsupported_growth = np.zeros(n_les, dtype=bool)
    else:
        need = np.maximum(max(int(min_buckets), 3), growth_support_share * n_buckets)
        unsupported_growth = fitted & (lam_hat < 0) & (res["support"] < need)
    ci_lo = np.where(unsupported_growth, -np.inf, ci_lo)
    ci_hi = np.where(unsupported_growth, np.inf, ci_hi)
    usable &= ~unsupported_growth
    decaying = usable & (ci_lo > 0)
    improving = usable & (ci_hi < 0)
    state = np.full(n_les, "insufficient_data", dtype=object)
    state[usable] = "stable"
    state[decaying] = "decaying"
    state[improving] = "improving"

    with np.errstate(divide="ignore"):
        hl = np.where(decaying, LN2 / lam_hat, np.nan)
        hl_lo = np.where(decaying, LN2 / ci_hi, np.nan)  # ci_hi = inf -> 0
        hl_hi = np.where(decaying, LN2 / ci_lo, np.nan)

    t_ref_col = pd.to_datetime(np.where(has_rows, tref_ns, np.iinfo(np.int64).min), utc=True)
    return pd.DataFrame(
        {
            "lesson_key": np.asarray(uniques),
            "e0": e0,
            "e0_se": e0_se,
            "decay_rate_per_hour": lam_hat,
            "decay_rate_ci_low": ci_lo,
            "decay_rate_ci_high": ci_hi,
            "half_life_hours": hl,
            "half_life_ci_low": hl_lo,
            "half_life_ci_high": hl_hi,
            "state": state,
            "n_buckets": n_buckets.astype(np.int64),
            "n_trades": np.rint(n_trades).astype(np.int64),
            "t_ref": t_ref_col,
        },
        columns=OUTPUT_COLUMNS,
    )
