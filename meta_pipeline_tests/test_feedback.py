"""Closed-loop feedback core: the prequential rule and the cycle figures against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.learning.feedback import (
    FEEDBACK_CYCLE_COLUMNS,
    assign_versions,
    cycle_metrics,
    feedback_cycles,
    override_coherence,
    score_trades,
)

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _versions(*pairs: tuple[int, str]) -> pd.DataFrame:
    return pd.DataFrame({"version": [v for v, _ in pairs], "as_of": [T0 + pd.Timedelta(t) for _, t in pairs]})


def test_a_trade_is_scored_by_the_newest_version_that_had_not_seen_it() -> None:
    versions = _versions((1, "1D"), (2, "3D"), (3, "3D"), (4, "5D"))  # 2 and 3 learned up to the same time
    closed = pd.Series([T0 + pd.Timedelta(t) for t in ["12h", "1D", "25h", "3D", "73h", "5D", "6D"]])
    got = assign_versions(closed, versions)
    # before any version: -1; closed exactly at an as_of was seen by it (not scored by it)
    assert got.tolist() == [-1, -1, 1, 1, 3, 3, 4]


def test_versions_materialized_out_of_order_follow_as_of_not_the_version_number() -> None:
    # a replay appended version 3 with an older as_of than version 2
    versions = _versions((2, "10D"), (3, "4D"), (1, "2D"))
    closed = pd.Series([T0 + pd.Timedelta(t) for t in ["3D", "5D", "11D"]])
    assert assign_versions(closed, versions).tolist() == [1, 3, 2]


def test_score_trades_never_uses_a_version_that_saw_the_trade() -> None:
    rng = np.random.default_rng(0)
    closed = T0 + pd.to_timedelta(np.sort(rng.uniform(0, 10, 200)), unit="D")
    trades = pd.DataFrame({"trade_id": [f"t{i}" for i in range(200)], "closed_at": closed, "return_r": rng.normal(size=200)})
    versions = _versions((1, "2D"), (2, "5D"), (3, "8D"))
    seen_by: dict[int, pd.Timestamp] = dict(zip(versions["version"], versions["as_of"]))

    def predict(version: int, group: pd.DataFrame) -> pd.Series:
        assert (group["closed_at"] > seen_by[version]).all()  # the prequential rule, as the caller sees it
        return pd.Series(float(version), index=group["trade_id"].to_numpy())

    scored = score_trades(trades, versions, predict)
    assert len(scored) == int((trades["closed_at"] > seen_by[1]).sum())
    assert (scored["predicted"] == scored["overrides_version"].astype(float)).all()
    assert np.allclose(scored["residual"], scored["realized"] - scored["predicted"])
    assert scored["closed_at"].is_monotonic_increasing


def test_cycle_figures_match_a_hand_computation() -> None:
    p = np.array([0.1, -0.2, 0.3, 0.0, 0.5, -0.1, 0.2, 0.4])
    y = np.array([0.3, -0.1, 0.2, 0.1, 0.9, 0.2, -0.3, 0.5])
    got = cycle_metrics(p, y)
    n = len(p)
    rp, ry = pd.Series(p).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    rho = np.corrcoef(rp, ry)[0, 1]
    assert got["rank_ic"] == pytest.approx(rho)
    assert got["ic_t"] == pytest.approx(rho * np.sqrt((n - 2) / (1 - rho**2)))
    b, a = np.polyfit(p, y, 1)
    resid = y - (a + b * p)
    se_b = np.sqrt(resid @ resid / (n - 2) / ((p - p.mean()) @ (p - p.mean())))
    t975 = 2.4469118511449692  # Student t, 6 degrees of freedom, 97.5 %
    assert got["mz_slope"] == pytest.approx(b) and got["mz_intercept"] == pytest.approx(a)
    assert got["mz_slope_ci_low"] == pytest.approx(b - t975 * se_b)
    assert got["mz_slope_ci_high"] == pytest.approx(b + t975 * se_b)
    # hit rate over the 7 non-zero calls: signs agree on 0.1/0.3, -0.2/-0.1, 0.3/0.2, 0.5/0.9, 0.4/0.5
    assert got["hit_rate"] == pytest.approx(5 / 7)
    assert got["mse"] == pytest.approx(np.mean((y - p) ** 2))
    assert got["mse_zero"] == pytest.approx(np.mean(y**2))
    assert got["alignment"] == pytest.approx(1 - np.mean((y - p) ** 2) / np.mean(y**2))
    assert got["residual_sd"] == pytest.approx(np.std(y - p, ddof=1))


def test_cycles_never_span_two_versions_and_the_last_one_may_be_partial() -> None:
    n1, n2 = 25, 12
    scored = pd.DataFrame({
        "trade_id": [f"t{i:03d}" for i in range(n1 + n2)],
        "closed_at": T0 + pd.to_timedelta(np.arange(n1 + n2), unit="h"),
        "overrides_version": [1] * n1 + [2] * n2,
        "predicted": np.linspace(-1, 1, n1 + n2),
        "realized": np.linspace(-1, 1, n1 + n2) ** 3,
    })
    scored["residual"] = scored["realized"] - scored["predicted"]
    cycles = feedback_cycles(scored, cycle_size=10, coherence={2: (0.5, 0.25)}, alarm_trades={"t027"})
    assert list(cycles.columns) == FEEDBACK_CYCLE_COLUMNS
    assert cycles["cycle"].tolist() == [1, 2, 3, 4, 5]
    assert cycles["overrides_version"].tolist() == [1, 1, 1, 2, 2]
    assert cycles["n"].tolist() == [10, 10, 5, 10, 2]
    assert cycles["complete"].tolist() == [True, True, False, True, False]
    assert cycles["drift_alarm"].tolist() == [False, False, False, True, False]
    assert cycles.loc[3, "coherence"] == 0.5 and np.isnan(cycles.loc[0, "coherence"])
    assert cycles.loc[0, "rank_ic"] == pytest.approx(1.0)  # a monotone transform ranks perfectly


def test_coherence_and_turnover_between_versions() -> None:
    prev = pd.DataFrame({"lesson_key": ["a|", "b|", "c|", "d|"], "regime": [None, None, "S1", None],
                         "edge": [0.1, 0.2, 0.3, 0.4]})
    cur = pd.DataFrame({"lesson_key": ["a|", "b|", "c|", "e|"], "regime": [None, None, "S1", None],
                        "edge": [0.3, 0.2, 0.1, 0.5]})
    rho, turnover = override_coherence(prev, cur)
    assert rho == pytest.approx(-1.0)  # the three shared rows in reversed order
    assert turnover == pytest.approx(1 - 3 / 5)
    assert all(np.isnan(v) for v in override_coherence(None, cur))  # no previous version: nothing to compare
