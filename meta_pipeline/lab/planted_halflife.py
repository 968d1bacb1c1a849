"""Planted edge histories and the half-life benchmark (our vectorized fit vs per-lesson curve_fit)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from meta_pipeline.learning.halflife import LN2, _NS_PER_HOUR, fit_half_lives



# ------------------------------------------------------------- planted data
def planted_edge_history(
    n_lessons: int = 1000,
    n_buckets: int = 60,
    seed: int = 0,
    *,
    bucket_hours: float = 24.0,
    kind_probs: tuple[float, float, float, float] = (0.55, 0.15, 0.15, 0.15),
    short_frac: float = 0.05,
    mean_trades: tuple[float, float] = (8.0, 60.0),
    start: pd.Timestamp = pd.Timestamp("2024-01-01", tz="UTC"),
    noise: str = "gaussian",
    t_df: float = 3.0,
    sd_trend: float = 0.0,
    day_sd_range: tuple[float, float] = (1.0, 1.0),
    edge_day_cv: float = 0.0,
    count_dispersion: float = 0.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Planted edge histories with known e0 and lambda (for tests and the bench).

    Kinds (``kind_probs`` in this order): ``decaying`` (e0 ~ U(0.3, 0.8), 20 %
    negative; half-life log-uniform 5-40 days), ``stable`` (lambda = 0),
    ``improving`` (e0 ~ U(0.1, 0.3), doubling time 20-60 days) and ``noise``
    (e0 = 0).  Per lesson: trade noise sd sigma ~ U(0.8, 1.2), mean trades per
    bucket log-uniform in ``mean_trades``, counts ~ Poisson (empty buckets
    emit no row, like a real aggregator), bucket mean = exact bucket average
    of the curve + N(0, sigma^2/n), edge_se = sample sd/sqrt(n) (NaN if n == 1).
    Lessons start on different days; ``short_frac`` of them have only 2..9
    buckets.  Time origin of each lesson's truth is its first bucket_start.
    ``truth.lambda_z`` = |lambda| / (expected s.e. of lambda-hat): how well the
    planted data can pin lambda at all (0 for stable and noise lessons).

    Generator variation (defaults = the data above, byte-identical; variation draws come
    from a separate stream): ``noise`` ``"student_t"`` (t with ``t_df`` dof scaled to
    variance 1: heavy tails, bucket means built from the trades) or ``"gaussian"``;
    ``sd_trend`` multiplies a bucket's trade sd by ``exp(sd_trend·(k/K − ½))`` (< 0:
    noisy early buckets, exactly where a decay's information sits); ``day_sd_range``
    a per-bucket sd multiplier, log-uniform; ``edge_day_cv`` a multiplicative
    day-to-day wobble of the edge (overdispersion the within-bucket se cannot see);
    ``count_dispersion`` makes the counts negative-binomial (Gamma-mixed Poisson with
    that squared coefficient of variation: bursty days). ``lambda_z`` stays the
    homoscedastic figure.
    """
    rng = np.random.default_rng(seed)
    L, K, h = int(n_lessons), int(n_buckets), float(bucket_hours)
    kinds = np.array(["decaying", "stable", "improving", "noise"])
    kind = kinds[rng.choice(4, size=L, p=np.asarray(kind_probs) / np.sum(kind_probs))]
    sign = np.where(rng.random(L) < 0.2, -1.0, 1.0)
    e0 = np.select(
        [kind == "decaying", kind == "stable", kind == "improving"],
        [sign * rng.uniform(0.3, 0.8, L), sign * rng.uniform(0.3, 0.8, L), rng.uniform(0.1, 0.3, L)],
        0.0,
    )
    hl_days = np.exp(rng.uniform(np.log(5.0), np.log(40.0), L))
    dbl_days = rng.uniform(20.0, 60.0, L)
    lam = np.select(
        [kind == "decaying", kind == "improving"],
        [LN2 / (hl_days * 24.0), -LN2 / (dbl_days * 24.0)],
        0.0,
    )
    sigma = rng.uniform(0.8, 1.2, L)
    m = np.exp(rng.uniform(np.log(mean_trades[0]), np.log(mean_trades[1]), L))
    span = np.where(rng.random(L) < short_frac, rng.integers(2, 10, L), K)
    span = np.minimum(span, K)
    offset_days = rng.integers(0, 30, L)

    k = np.arange(K)[None, :]
    varied = (noise != "gaussian" or sd_trend != 0.0 or tuple(day_sd_range) != (1.0, 1.0)
              or edge_day_cv > 0.0 or count_dispersion > 0.0)
    if noise not in ("gaussian", "student_t"):
        raise ValueError(f"noise must be 'gaussian' or 'student_t' (got {noise!r})")
    vrng = np.random.default_rng([int(seed), 0x5EED])
    rate = np.broadcast_to(m[:, None], (L, K))
    if count_dispersion > 0.0:
        rate = rate * vrng.gamma(1.0 / count_dispersion, count_dispersion, (L, K))
    cnt = rng.poisson(rate)
    keep = (k < span[:, None]) & (cnt > 0)
    # Exact bucket average of e0*exp(-lam t) over [k h, (k+1) h].
    lh = lam[:, None] * h
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = np.where(np.abs(lh) > 1e-12, -np.expm1(-lh) / lh, 1.0)
    true_mean = e0[:, None] * np.exp(-lam[:, None] * k * h) * avg
    nn = np.maximum(cnt, 1)
    noise_draw = rng.standard_normal((L, K)) * sigma[:, None] / np.sqrt(nn)
    df_chi = np.maximum(nn - 1, 1)
    sd = sigma[:, None] * np.sqrt(rng.chisquare(df_chi) / df_chi)
    edge_se = np.where(nn >= 2, sd / np.sqrt(nn), np.nan)
    if varied:  # bucket means and sds from the trades themselves
        lo, hi = day_sd_range
        scale = sigma[:, None] * np.exp(sd_trend * (k / K - 0.5)) * np.exp(
            vrng.uniform(np.log(lo), np.log(hi), (L, K)))
        wobble_sd = edge_day_cv * np.abs(true_mean)
        true_mean = true_mean * (1.0 + edge_day_cv * vrng.standard_normal((L, K)))
        noise_draw, edge_se = _bucket_noise(vrng, nn, scale, noise, t_df)

    # Expected identifiability of lambda: |lambda| / se(lambda) from the Fisher
    # information at the truth with expected counts m (lets tests select
    # lessons that carry "enough trades" without peeking at the noise).
    t_mid = (k + 0.5) * h
    f2 = np.where(k < span[:, None], m[:, None] * np.exp(-2.0 * lam[:, None] * t_mid), 0.0)
    b0, b1, b2 = f2.sum(1), (f2 * t_mid).sum(1), (f2 * t_mid**2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        se_lam = sigma * np.sqrt(b0 / (e0**2 * (b0 * b2 - b1**2)))
        if varied:
            # the fit's own (weighted least squares, weights n) sampling s.e. of lambda under
            # the varied noise: sandwich at the truth, bucket variance scale^2/m + wobble^2
            live = k < span[:, None]
            wf2 = np.where(live, m[:, None] * np.exp(-2.0 * lam[:, None] * t_mid), 0.0)
            m1 = (wf2 * t_mid).sum(1) / wf2.sum(1)
            g = wf2 * (t_mid - m1[:, None]) ** 2
            v_bucket = scale**2 / m[:, None] + wobble_sd**2
            se_lam = np.sqrt((g * m[:, None] * v_bucket).sum(1)) / (np.abs(e0) * g.sum(1))
        lambda_z = np.where(e0 != 0, np.abs(lam) / se_lam, 0.0)

    keys = np.char.add("lesson_", np.char.zfill(np.arange(L).astype(str), 6))
    li, kk = np.nonzero(keep)
    start_ns = pd.Timestamp(start).as_unit("ns").value
    day_ns = int(round(h * _NS_PER_HOUR))
    bucket_ns = start_ns + (offset_days[li] * 24 * int(_NS_PER_HOUR)) + kk * day_ns
    edge_history = pd.DataFrame(
        {
            "lesson_key": keys[li],
            "bucket_start": pd.to_datetime(bucket_ns, utc=True),
            "n": cnt[li, kk].astype(np.int64),
            "edge_mean": (true_mean + noise_draw)[li, kk],
            "edge_se": edge_se[li, kk],
        }
    )
    truth = pd.DataFrame(
        {
            "lesson_key": keys,
            "kind": kind,
            "e0": e0,
            "decay_rate_per_hour": lam,
            "half_life_hours": np.where(lam > 0, LN2 / np.where(lam > 0, lam, 1.0), np.nan),
            "sigma": sigma,
            "mean_trades": m,
            "span_buckets": span,
            "lambda_z": lambda_z,
        }
    )
    return edge_history, truth


def _bucket_noise(
    vrng: np.random.Generator, nn: np.ndarray, scale: np.ndarray, noise: str, t_df: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean noise, se) of each bucket from its ``nn`` trades with sd ``scale`` (vectorized, ragged).

    Trades are drawn as one flat vector and reduced per bucket with ``bincount``.
    """
    flat = np.repeat(np.arange(nn.size), nn.ravel())
    if noise == "student_t":
        e = vrng.standard_t(t_df, flat.size) * (math.sqrt((t_df - 2.0) / t_df) if t_df > 2 else 1.0)
    else:
        e = vrng.standard_normal(flat.size)
    e = e * scale.ravel()[flat]
    n = nn.ravel().astype(float)
    s1 = np.bincount(flat, e, nn.size)
    s2 = np.bincount(flat, e * e, nn.size)
    mean = s1 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1.0)
        se = np.where(n >= 2, np.sqrt(var / n), np.nan)
    return mean.reshape(nn.shape), se.reshape(nn.shape)


# --------------------------------------------------------------------- bench
def _rel_hl_error(lam_hat: np.ndarray, lam_true: np.ndarray) -> np.ndarray:
    """|hl_hat - hl| / hl, with a non-positive lambda_hat counted as infinite error."""
    with np.errstate(divide="ignore", invalid="ignore"):
        hl_hat = np.where(lam_hat > 0, LN2 / lam_hat, np.inf)
        return np.abs(hl_hat - LN2 / lam_true) / (LN2 / lam_true)


def bench_halflife(
    n_lessons: int = 10_000,
    n_buckets: int = 60,
    seed: int = 0,
    curve_fit_sample: int = 500,
    ci_level: float = 0.95,
    repeat: int = 3,
) -> dict[str, Any]:
    """Time and score the vectorized fit against a per-lesson ``curve_fit`` loop.

    Both see the same planted data, the same weights (sigma = 1/sqrt(n),
    residual-scaled covariance) and the same bucket-midpoint times.  The
    curve_fit loop is timed on pre-sliced arrays (favouring it) and
    extrapolated linearly to ``n_lessons``.  Timings are best-of-``repeat``
    (curve_fit: best of 2) after a first call, which is reported separately.  Accuracy: median relative
    half-life error on truly decaying lessons (lambda_hat <= 0 counts as an
    infinite error) and coverage of the true lambda by the CI (profile CI for
    the vectorized fit; Wald CI lambda +- z*se for curve_fit, where its
    covariance is finite).
    """
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    eh, truth = planted_edge_history(n_lessons, n_buckets, seed)
    t0 = time.perf_counter()
    fit = fit_half_lives(eh, ci_level=ci_level)
    t_vec_first = time.perf_counter() - t0  # includes first-touch memory faults
    t_vec_runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fit_half_lives(eh, ci_level=ci_level)
        t_vec_runs.append(time.perf_counter() - t0)
    t_vec = min(t_vec_runs)

    m = truth.merge(fit, on="lesson_key", suffixes=("_true", ""))
    dec = (m["kind"] == "decaying") & (m["span_buckets"] >= 5)

    def _score(lam_hat: np.ndarray, lo: np.ndarray, hi: np.ndarray, mask: np.ndarray) -> dict:
        lam_true = m["decay_rate_per_hour_true"].to_numpy()
        err = _rel_hl_error(lam_hat[mask], lam_true[mask])
        has_ci = mask & np.isfinite(lam_hat) & ~(np.isnan(lo) | np.isnan(hi))
        cover = (lo[has_ci] <= lam_true[has_ci]) & (lam_true[has_ci] <= hi[has_ci])
        return {
            "n_decaying": int(mask.sum()),
            "median_rel_hl_error": float(np.median(err)) if err.size else float("nan"),
            "ci_coverage": float(cover.mean()) if cover.size else float("nan"),
            "n_with_ci": int(has_ci.sum()),
        }

    vec_lam = m["decay_rate_per_hour"].to_numpy()
    vec_lo = m["decay_rate_ci_low"].to_numpy()
    vec_hi = m["decay_rate_ci_high"].to_numpy()

    # --- per-lesson curve_fit loop on a random sample (pre-sliced arrays)
    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(len(m), size=min(curve_fit_sample, len(m)), replace=False))
    codes, uniq = pd.factorize(eh["lesson_key"], sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(codes, minlength=len(uniq)))))
    ns = pd.DatetimeIndex(eh["bucket_start"]).as_unit("ns").asi8[order]
    yy = eh["edge_mean"].to_numpy(float)[order]
    nn = eh["n"].to_numpy(float)[order]
    pos = pd.Index(uniq).get_indexer(m["lesson_key"].to_numpy()[sample])
    per = []
    for p in pos:
        s = slice(bounds[p], bounds[p + 1])
        per.append(((ns[s] - ns[s].min()) / _NS_PER_HOUR + 12.0, yy[s], 1.0 / np.sqrt(nn[s])))

    def model(tt: np.ndarray, e0: float, lam: float) -> np.ndarray:
        return e0 * np.exp(-lam * tt)

    z = stats.norm.ppf(0.5 + ci_level / 2.0)
    cf_lam = np.full(len(m), np.nan)
    cf_lo = np.full(len(m), np.nan)
    cf_hi = np.full(len(m), np.nan)
    def _curve_fit_loop() -> int:
        n_fail = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            for j, (tt, yv, sg) in zip(sample, per):  # the baseline *is* a loop
                if tt.size < 3:
                    n_fail += 1
                    continue
                p0 = (float(np.average(yv, weights=1 / sg**2)), 1.0 / max(float(tt.max()), 1.0))
                try:
                    popt, pcov = curve_fit(model, tt, yv, p0=p0, sigma=sg, maxfev=5000)
                except (RuntimeError, ValueError):
                    n_fail += 1
                    continue
                cf_lam[j] = popt[1]
                v = pcov[1, 1]
                sd = math.sqrt(v) if np.isfinite(v) and v >= 0 else np.nan
                cf_lo[j], cf_hi[j] = popt[1] - z * sd, popt[1] + z * sd
        return n_fail

    cf_runs = []
    for _ in range(max(1, min(repeat, 2))):
        t0 = time.perf_counter()
        n_fail = _curve_fit_loop()
        cf_runs.append(time.perf_counter() - t0)
    t_cf = min(cf_runs)
    in_sample = np.zeros(len(m), dtype=bool)
    in_sample[sample] = True
    per_lesson = t_cf / len(sample)
    t_cf_full = per_lesson * n_lessons

    return {
        "n_lessons": int(n_lessons),
        "n_buckets": int(n_buckets),
        "n_rows": int(len(eh)),
        "vectorized_seconds_first_call": t_vec_first,
        "vectorized_seconds": t_vec,
        "vectorized_seconds_runs": t_vec_runs,
        "curve_fit_sample": int(len(sample)),
        "curve_fit_sample_seconds": t_cf,
        "curve_fit_seconds_per_lesson": per_lesson,
        "curve_fit_extrapolated_seconds": t_cf_full,
        "speedup_vs_curve_fit": t_cf_full / t_vec,
        "speedup_vs_curve_fit_first_call": t_cf_full / t_vec_first,
        "curve_fit_failures": int(n_fail),
        "vectorized_all": _score(vec_lam, vec_lo, vec_hi, dec.to_numpy()),
        "vectorized_on_sample": _score(vec_lam, vec_lo, vec_hi, (dec & in_sample).to_numpy()),
        "curve_fit_on_sample": _score(cf_lam, cf_lo, cf_hi, (dec & in_sample).to_numpy()),
        "vectorized_state_counts": fit["state"].value_counts().to_dict(),
    }


if __name__ == "__main__":  # python -m meta_pipeline.learning.halflife
    import json

    print(json.dumps(bench_halflife(), indent=2, default=float))
