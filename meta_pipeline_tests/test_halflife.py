"""Tests of the vectorized half-life fit on planted edge histories.

"Enough trades" below means the planted data can pin lambda at all:
``truth.lambda_z >= 3`` (|lambda| at least 3 expected standard errors, from the
Fisher information at the truth with expected bucket counts).  It is computed
from the planted parameters, never from the noise, so it does not favour the
fitter.
"""

from __future__ import annotations

import ast
import inspect
import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from meta_pipeline.lab.planted_halflife import planted_edge_history
from meta_pipeline.learning import halflife
from meta_pipeline.learning.halflife import (
    OUTPUT_COLUMNS,
    STATES,
    fit_half_lives,
)

SEEDS = (0, 1, 2)
N_LESSONS = 2000
N_BUCKETS = 60
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def planted_fits() -> dict[int, pd.DataFrame]:
    out = {}
    for seed in SEEDS:
        eh, truth = planted_edge_history(N_LESSONS, N_BUCKETS, seed)
        fit = fit_half_lives(eh)
        out[seed] = truth.merge(fit, on="lesson_key", suffixes=("_true", ""), validate="1:1")
    return out


def _covers(df: pd.DataFrame) -> np.ndarray:
    lam = df["decay_rate_per_hour_true"]
    return ((df["decay_rate_ci_low"] <= lam) & (lam <= df["decay_rate_ci_high"])).to_numpy()


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("seed", SEEDS)
def test_decaying_half_life_accuracy_and_coverage(planted_fits, seed):
    m = planted_fits[seed]
    d = m[(m["kind"] == "decaying") & (m["lambda_z"] >= 3)]
    assert len(d) > 300
    lam_hat = d["decay_rate_per_hour"].to_numpy()
    hl_true = d["half_life_hours_true"].to_numpy()
    with np.errstate(divide="ignore"):
        hl_hat = np.where(lam_hat > 0, LN2 / lam_hat, np.inf)  # wrong sign = infinite error
    rel_err = np.abs(hl_hat - hl_true) / hl_true
    assert np.median(rel_err) <= 0.25, np.median(rel_err)
    # Truth inside the CI (lambda CI; identical to the half-life CI for decaying).
    assert _covers(d).mean() >= 0.80, _covers(d).mean()
    dec = d[d["state"] == "decaying"]
    assert len(dec) >= 0.9 * len(d)
    hl_cover = (dec["half_life_ci_low"] <= dec["half_life_hours_true"]) & (
        dec["half_life_hours_true"] <= dec["half_life_ci_high"]
    )
    assert hl_cover.mean() >= 0.80
    # Calibration must not rely on the subset: all fitted decaying lessons.
    all_dec = m[(m["kind"] == "decaying") & (m["n_buckets"] >= 5)]
    assert _covers(all_dec).mean() >= 0.80


@pytest.mark.parametrize("seed", SEEDS)
def test_stable_and_improving_classification(planted_fits, seed):
    m = planted_fits[seed]
    stable = m[(m["kind"] == "stable") & (m["span_buckets"] >= 10)]
    improving = m[(m["kind"] == "improving") & (m["lambda_z"] >= 3)]
    assert len(stable) > 100 and len(improving) > 100
    assert (stable["state"] == "stable").mean() >= 0.85
    assert (improving["state"] == "improving").mean() >= 0.85


@pytest.mark.parametrize("seed", SEEDS)
def test_pure_noise_rarely_decaying(planted_fits, seed):
    noise = planted_fits[seed].query("kind == 'noise'")
    assert len(noise) > 150
    assert (noise["state"] == "decaying").mean() <= 0.10
    # The signal gate should catch most of them outright.
    assert (noise["state"] == "insufficient_data").mean() >= 0.80


# ------------------------------------------------------------------ contract
@pytest.mark.parametrize("seed", SEEDS)
def test_ci_ordering_and_half_life_columns(planted_fits, seed):
    m = planted_fits[seed]
    f = m[np.isfinite(m["decay_rate_per_hour"])]
    assert (f["decay_rate_ci_low"] <= f["decay_rate_per_hour"]).all()
    assert (f["decay_rate_per_hour"] <= f["decay_rate_ci_high"]).all()
    dec = m[m["state"] == "decaying"]
    assert (dec["decay_rate_ci_low"] > 0).all()
    assert (dec["half_life_ci_low"] >= 0).all()
    assert (dec["half_life_ci_low"] <= dec["half_life_hours"]).all()
    assert (dec["half_life_hours"] <= dec["half_life_ci_high"]).all()
    assert np.isfinite(dec["half_life_ci_high"]).all()
    np.testing.assert_allclose(dec["half_life_hours"], LN2 / dec["decay_rate_per_hour"])
    rest = m[m["state"] != "decaying"]
    assert rest[["half_life_hours", "half_life_ci_low", "half_life_ci_high"]].isna().all().all()
    imp = m[m["state"] == "improving"]
    assert (imp["decay_rate_ci_high"] < 0).all()
    st = m[m["state"] == "stable"]
    assert ((st["decay_rate_ci_low"] <= 0) & (st["decay_rate_ci_high"] >= 0)).all()
    assert set(m["state"]) <= set(STATES)


@pytest.mark.parametrize("seed", SEEDS)
def test_short_lessons_are_insufficient(planted_fits, seed):
    m = planted_fits[seed]
    short = m[m["span_buckets"] < 5]
    assert len(short) > 10
    assert (short["state"] == "insufficient_data").all()
    assert (m.loc[m["n_buckets"] < 5, "state"] == "insufficient_data").all()


def test_min_buckets_option_is_respected():
    eh, _ = planted_edge_history(400, 60, 7)
    fit = fit_half_lives(eh, min_buckets=30)
    assert (fit.loc[fit["n_buckets"] < 30, "state"] == "insufficient_data").all()
    assert (fit.loc[fit["n_buckets"] >= 30, "state"] != "insufficient_data").any()


def test_exactly_one_row_per_input_lesson():
    eh, truth = planted_edge_history(300, 30, 3)
    # Lessons whose rows are all unusable must still get exactly one row.
    junk = pd.DataFrame(
        {
            "lesson_key": ["zz_no_trades", "zz_no_trades", "zz_nan_edge", "zz_single"],
            "bucket_start": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-01", "2024-01-05"], utc=True),
            "n": [0, 0, 10, 1],
            "edge_mean": [0.1, 0.2, np.nan, 0.4],
            "edge_se": [np.nan, np.nan, 0.1, np.nan],
        }
    )
    eh = pd.concat([eh.sample(frac=1.0, random_state=0), junk], ignore_index=True)  # unsorted input
    fit = fit_half_lives(eh)
    assert list(fit.columns) == OUTPUT_COLUMNS
    assert fit["lesson_key"].is_unique
    assert set(fit["lesson_key"]) == set(eh["lesson_key"])
    assert len(fit) == eh["lesson_key"].nunique()
    j = fit.set_index("lesson_key").loc[["zz_no_trades", "zz_nan_edge", "zz_single"]]
    assert (j["state"] == "insufficient_data").all()
    assert j.loc["zz_no_trades", "n_buckets"] == 0 and pd.isna(j.loc["zz_no_trades", "t_ref"])
    assert j.loc["zz_single", "n_buckets"] == 1 and j.loc["zz_single", "n_trades"] == 1
    # n_trades / n_buckets count the usable buckets (those that enter the fit).
    ok = eh[(eh["n"] > 0) & eh["edge_mean"].notna()]
    exp = ok.groupby("lesson_key").agg(n_trades=("n", "sum"), n_buckets=("n", "size"))
    got = fit.set_index("lesson_key").loc[exp.index]
    np.testing.assert_array_equal(got["n_trades"], exp["n_trades"])
    np.testing.assert_array_equal(got["n_buckets"], exp["n_buckets"])


# ------------------------------------------------------------------ exactness
def _noiseless(kinds: dict[str, tuple[float, float]], n_buckets: int = 40) -> pd.DataFrame:
    """Bucket means exactly on the curve at bucket midpoints (24 h buckets)."""
    k = np.arange(n_buckets)
    frames = []
    for i, (key, (e0, lam)) in enumerate(kinds.items()):
        t_mid = (k + 0.5) * 24.0
        frames.append(
            pd.DataFrame(
                {
                    "lesson_key": key,
                    "bucket_start": pd.Timestamp("2024-03-01", tz="UTC") + pd.to_timedelta(k + 3 * i, unit="D"),
                    "n": 25,
                    "edge_mean": e0 * np.exp(-lam * t_mid),
                    "edge_se": 0.2,  # sigma^2 = 0.2^2 * 25 = 1 from the within-bucket spread
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_noiseless_exact_recovery():
    truth = {
        "dec": (0.6, LN2 / (10 * 24.0)),
        "imp": (0.2, -LN2 / (30 * 24.0)),
        "flat": (0.5, 0.0),
        "neg": (-0.7, LN2 / (4 * 24.0)),
        "slow": (0.5, LN2 / (400 * 24.0)),
    }
    fit = fit_half_lives(_noiseless(truth)).set_index("lesson_key")
    for key, (e0, lam) in truth.items():
        assert fit.loc[key, "e0"] == pytest.approx(e0, rel=1e-6)
        assert fit.loc[key, "decay_rate_per_hour"] == pytest.approx(lam, rel=1e-6, abs=1e-10)
    assert fit.loc["dec", "state"] == "decaying"
    assert fit.loc["neg", "state"] == "decaying"
    assert fit.loc["imp", "state"] == "improving"
    assert fit.loc["flat", "state"] == "stable"
    assert fit.loc["dec", "half_life_hours"] == pytest.approx(240.0, rel=1e-6)
    # Default t_ref = each lesson's first bucket_start.
    assert fit.loc["dec", "t_ref"] == pd.Timestamp("2024-03-01", tz="UTC")
    assert fit.loc["imp", "t_ref"] == pd.Timestamp("2024-03-04", tz="UTC")
    assert (fit["e0_se"] > 0).all()


def test_global_t_ref_moves_e0_not_lambda():
    truth = {"dec": (0.6, LN2 / (10 * 24.0)), "imp": (0.2, -LN2 / (30 * 24.0))}
    eh = _noiseless(truth)
    eh["edge_mean"] += np.random.default_rng(0).normal(0, 0.2, len(eh))  # se matches
    own = fit_half_lives(eh).set_index("lesson_key")
    t_ref = pd.Timestamp("2024-02-20", tz="UTC")
    glob = fit_half_lives(eh, t_ref=t_ref).set_index("lesson_key")
    for col in ["decay_rate_per_hour", "decay_rate_ci_low", "decay_rate_ci_high", "state"]:
        assert (own[col] == glob[col]).all()
    tau0 = (own["t_ref"] - t_ref) / pd.Timedelta(hours=1)
    np.testing.assert_allclose(glob["e0"], own["e0"] * np.exp(own["decay_rate_per_hour"] * tau0), rtol=1e-10)
    assert (glob["t_ref"] == t_ref).all()
    # Extrapolating back to an earlier origin can only make e0 less certain
    # (relative to e0): more lever arm through lambda's uncertainty.
    assert ((glob["e0_se"] / glob["e0"].abs()) > (own["e0_se"] / own["e0"].abs())).all()


@pytest.mark.parametrize("jitter", [False, True])
def test_matches_per_lesson_profile_minimum(jitter):
    """Grid + Newton must land on each lesson's own profile minimum (regular
    lattice -> dense path; jittered times -> sparse/bincount path)."""
    eh, truth = planted_edge_history(60, 40, 11, short_frac=0.0)
    if jitter:
        rng = np.random.default_rng(1)
        eh["bucket_start"] += pd.to_timedelta(rng.uniform(0, 6, len(eh)), unit="h")
    fit = fit_half_lives(eh).set_index("lesson_key")
    checked = 0
    for key, g in eh.groupby("lesson_key"):  # reference only: a loop is fine here
        t = (g["bucket_start"] - g["bucket_start"].min()) / pd.Timedelta(hours=1) + 12.0
        t, y, w = t.to_numpy(), g["edge_mean"].to_numpy(), g["n"].to_numpy(float)

        def sse(lam: float) -> float:
            f = np.exp(-lam * t)
            return float(np.sum(w * y * y) - np.sum(w * f * y) ** 2 / np.sum(w * f * f))

        lam_hat = fit.loc[key, "decay_rate_per_hour"]
        lo, hi = fit.loc[key, "decay_rate_ci_low"], fit.loc[key, "decay_rate_ci_high"]
        if not (np.isfinite(lo) and np.isfinite(hi)):
            continue
        ref = minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
        assert sse(lam_hat) <= ref.fun + 1e-9 * max(1.0, abs(ref.fun))
        # And the CI ends sit where the profile rises by the same amount on both sides.
        assert sse(lo) == pytest.approx(sse(hi), rel=1e-5)
        checked += 1
    assert checked >= 30


# ------------------------------------------------------------------ scale
def test_10k_lessons_fast_no_python_loop():
    eh, truth = planted_edge_history(10_000, 60, 0)
    fit_half_lives(eh.head(2000))  # warm imports/BLAS
    t0 = time.perf_counter()
    fit = fit_half_lives(eh)
    elapsed = time.perf_counter() - t0
    assert len(fit) == 10_000
    assert elapsed < 5.0, f"10k x 60 fit took {elapsed:.2f}s"


def test_core_has_no_dagster_import():
    tree = ast.parse(inspect.getsource(halflife))
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in mods if m.split(".")[0] == "dagster"]
