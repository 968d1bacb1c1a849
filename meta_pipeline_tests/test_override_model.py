"""OverrideModel: the fit and the apply share one precedence rule, one metric term, one set of knobs."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.contracts import TradesBatch
from meta_pipeline.knobs import default_knobs
from meta_pipeline.learning import overrides as overrides_core
from meta_pipeline.learning.factors import find_latent_factors
from meta_pipeline.learning.lessons import mine_lessons
from meta_pipeline.learning.overrides import KNOBS_RECORDED, OverrideModel
from meta_pipeline.learning.predict import predict_trades
from meta_pipeline.learning.regime import fit_regime_weights, metric_term
from meta_pipeline.store import MetaStore
from meta_pipeline.store.configs import write_config_version
from meta_pipeline_tests.test_learning_core import _toy_batch

DOMAIN = "ovm"
T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _batch(seed: int, n: int) -> TradesBatch:
    """p's edge: +0.3 everywhere, +0.5 more at chain=sol (parent and child lessons of one factor);
    q's edge: +0.6 in S0, −0.6 in S1 (a regime split); metric m moves return_r in S1."""
    rng = np.random.default_rng(seed)
    chain = rng.choice(["sol", "eth", "bsc"], n)
    regime = rng.choice(["S0", "S1"], n)
    has_p, has_q = rng.random(n) < 0.5, rng.random(n) < 0.4
    m = rng.normal(0.0, 1.0, n)
    expected = (np.where(has_p, 0.3, 0.0) + np.where(has_p & (chain == "sol"), 0.5, 0.0)
                + np.where(has_q, np.where(regime == "S0", 0.6, -0.6), 0.0) + np.where(regime == "S1", 0.4 * m, 0.0))
    ret = expected + rng.normal(0.0, 1.0, n)
    pats = np.where(has_p & has_q, "p|q", np.where(has_p, "p", np.where(has_q, "q", "z")))
    return _toy_batch([{"trade_id": f"t{seed}-{i}", "closed_at": (T0 + pd.Timedelta(minutes=10 * i)).isoformat(),
                        "regime": regime[i], "return_r": str(ret[i]), "patterns": pats[i], "scope.chain": chain[i],
                        "metric.m": str(m[i])} for i in range(n)], domain=DOMAIN)


@pytest.fixture(scope="module")
def train() -> TradesBatch:
    return _batch(5, 6000)


@pytest.fixture(scope="module")
def holdout() -> TradesBatch:
    return _batch(2, 2000)


@pytest.fixture(scope="module")
def learned(train):
    lessons, incidence = mine_lessons(train.trades, train.patterns, train.scope)
    factors = find_latent_factors(lessons, incidence, len(train.trades))
    weights = fit_regime_weights(train.trades, train.metrics)
    return lessons, factors, weights


def _fit(learned, train, **knobs) -> OverrideModel:
    lessons, factors, weights = learned
    return OverrideModel.fit(lessons, None, factors, weights, train.trades, train.patterns, train.scope,
                             train.metrics, knobs={**default_knobs(), **knobs})


def _credited(model: OverrideModel) -> dict[tuple[str, str | None], int]:
    """Trades the fit credited to each row (its source_json)."""
    return {(r.lesson_key, None if pd.isna(r.regime) else r.regime): json.loads(r.source_json)["n_credited_trades"]
            for r in model.rows.itertuples()}


def _assigned(model: OverrideModel, batch: TradesBatch) -> dict[tuple[str, str | None], int]:
    """Trades the apply gives each row."""
    won = model.winning_overrides(batch.trades, batch.patterns, batch.scope)
    return dict(Counter((k, None if pd.isna(r) else r) for k, r in zip(won["lesson_key"], won["regime"])))


def _fewest_scope_keys_first(original):
    def rank(n_scope_keys, support, lesson_key, regime_any=None):
        return original(-np.asarray(n_scope_keys, dtype=np.int64), support, lesson_key, regime_any)
    return rank


# ---------------------------------------------------------------------------
# (a) one precedence rule for the fit and the apply
# ---------------------------------------------------------------------------


def test_the_apply_gives_each_trade_the_override_the_fit_credited(learned, train):
    model = _fit(learned, train)
    keys = set(model.rows["lesson_key"])
    assert {"p|", "p|chain=sol"} <= keys  # parent and child of one factor, both kept
    assert set(model.rows.loc[model.rows["pattern"] == "q", "regime"]) == {"S0", "S1"}
    # every override gets, from the apply, exactly the training trades the fit credited to it
    assert _assigned(model, train) == _credited(model)

    # a p trade at chain=sol matches both p| and p|chain=sol (one factor): the child wins, alone
    won = model.winning_overrides(train.trades, train.patterns, train.scope).set_index("trade_id")
    t = train.trades
    sol_p = t.loc[(t["trade_id"].isin(train.patterns.loc[train.patterns["pattern"] == "p", "trade_id"]))
                  & t["trade_id"].isin(train.scope.loc[train.scope["value"] == "sol", "trade_id"]), "trade_id"]
    assert len(sol_p) > 100
    factor_p = model.rows.set_index("lesson_key").loc["p|", "latent_factor_id"]
    of_p = won[won["latent_factor_id"] == factor_p]
    assert (of_p.loc[sol_p, "lesson_key"] == "p|chain=sol").all()
    # the edge is the sum of the winners plus the metric term, nothing else
    edge = model.predict(t, train.patterns, train.scope, train.metrics)
    expected = won.groupby(level=0)["edge"].sum().reindex(edge.index, fill_value=0.0).to_numpy()
    np.testing.assert_allclose(edge.to_numpy(), expected + metric_term(t, train.metrics, model.regime_weights))


def test_fit_and_apply_both_follow_the_one_precedence_function(learned, train, monkeypatch):
    model = _fit(learned, train)
    child_edge = model.rows.set_index("lesson_key").loc["p|chain=sol", "edge"]
    parent_edge = model.rows.set_index("lesson_key").loc["p|", "edge"]
    assert child_edge != pytest.approx(parent_edge)

    monkeypatch.setattr(overrides_core, "precedence_rank", _fewest_scope_keys_first(overrides_core.precedence_rank))
    # the apply follows it: the same rows, now the parent outranks its child everywhere
    assigned = _assigned(model, train)
    assert ("p|chain=sol", None) not in assigned
    assert assigned[("p|", None)] == model.rows.set_index("lesson_key").loc["p|", "support"]
    # the fit follows it too: under this rule the child can never take a trade from its parent, so
    # it is not fitted, and the credit it gives still matches what the apply assigns
    patched = _fit(learned, train)
    assert "p|chain=sol" not in set(patched.rows["lesson_key"])
    assert "p|" in set(patched.rows["lesson_key"])
    assert _assigned(patched, train) == _credited(patched)


# ---------------------------------------------------------------------------
# (b) a stored model is the fitted model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tier2", [1.0, 0.0])
def test_a_model_rebuilt_from_stored_rows_predicts_what_the_fit_predicts(learned, train, holdout, any_store, tier2):
    model = _fit(learned, train, tier2_enabled=tier2)
    assert len(model.rows) and model.now == train.trades["closed_at"].max()
    store = any_store
    store.replace_partition("pm_overrides", DOMAIN, model.rows)
    store.replace_partition("learning_regime_weights", DOMAIN, model.regime_weights)
    # fallback knobs that disagree: the rows record the knobs they were fitted with, and those win
    rebuilt = OverrideModel.from_rows(store.read("pm_overrides", domain=DOMAIN),
                                      store.read("learning_regime_weights", domain=DOMAIN),
                                      {**default_knobs(), "tier2_enabled": 1.0 - tier2})
    assert rebuilt.knobs == model.knobs and rebuilt.knobs_source == KNOBS_RECORDED
    assert rebuilt.now == model.now
    h = holdout
    fresh = model.predict(h.trades, h.patterns, h.scope, h.metrics)
    again = rebuilt.predict(h.trades, h.patterns, h.scope, h.metrics)
    assert np.array_equal(fresh.to_numpy(), again.to_numpy()) and fresh.index.equals(again.index)
    assert (fresh != 0).any()
    # the public path (store → model → prediction) gives the same numbers
    out = predict_trades(store, DOMAIN, h)
    assert np.array_equal(out["edge"].to_numpy(), fresh.to_numpy())
    assert out.attrs["knobs_source"] == KNOBS_RECORDED and out.attrs["knobs"] == model.knobs
    assert out.attrs["tier2_enabled"] is bool(tier2)


# ---------------------------------------------------------------------------
# (c, d) which knobs a stored model uses
# ---------------------------------------------------------------------------


def _apply_knobs_config(store: MetaStore, knobs: dict[str, float]) -> None:
    """An applied META_KNOBS config (configs row, active) the controller has not adopted."""
    with store.write() as conn:
        write_config_version(conn, "META_KNOBS", DOMAIN, json.dumps(knobs), "test",
                             datetime(2026, 2, 1, tzinfo=UTC), None)


def _controller_state(store: MetaStore, knobs: dict[str, float]) -> None:
    store.replace_partition("controller_state", DOMAIN, pd.DataFrame([{
        "knobs_json": json.dumps(knobs), "cooldowns_json": "{}", "reward_ema": None, "rollbacks": 0,
        "decisions": 3, "updated_at": pd.Timestamp("2026-01-15", tz="UTC"), "state_json": None, "last_ts": None,
        "config_version": 0,
    }]))


def test_without_overrides_the_applied_knobs_config_decides_tier2(learned, train, holdout, tmp_path):
    store = MetaStore(db_url=f"sqlite:///{tmp_path}/m.db")
    weights = learned[2]
    store.replace_partition("learning_regime_weights", DOMAIN, weights)
    # the controller runs tier2 on; no overrides: the knobs in effect decide
    _controller_state(store, {**default_knobs(), "tier2_enabled": 1.0})
    h = holdout
    term = metric_term(h.trades, h.metrics, weights)
    assert np.abs(term).max() > 0.1
    on = predict_trades(store, DOMAIN, h)
    np.testing.assert_array_equal(on["edge"].to_numpy(), term)
    assert on.attrs["knobs_source"] == "controller_state" and on.attrs["tier2_enabled"] is True

    # a person applies tier2_enabled = 0; the controller has not adopted it yet: it is in effect
    _apply_knobs_config(store, {**default_knobs(), "tier2_enabled": 0.0})
    assert store.knobs_in_effect(DOMAIN).source == "configs v1"
    off = predict_trades(store, DOMAIN, h)
    assert (off["edge"] == 0.0).all()  # no overrides and no regime term
    assert off.attrs["knobs_source"] == "configs v1"
    assert off.attrs["knobs"]["tier2_enabled"] == 0.0 and off.attrs["tier2_enabled"] is False


def test_knobs_recorded_with_the_overrides_win_over_an_applied_config(learned, train, holdout, tmp_path):
    store = MetaStore(db_url=f"sqlite:///{tmp_path}/m.db")
    model = _fit(learned, train, tier2_enabled=1.0)
    assert all(json.loads(s)["knobs"]["tier2_enabled"] for s in model.rows["source_json"])
    store.replace_partition("pm_overrides", DOMAIN, model.rows)
    store.replace_partition("learning_regime_weights", DOMAIN, model.regime_weights)
    h = holdout
    before = predict_trades(store, DOMAIN, h)

    _apply_knobs_config(store, {**default_knobs(), "tier2_enabled": 0.0})
    assert store.knobs_in_effect(DOMAIN).values["tier2_enabled"] == 0.0
    after = predict_trades(store, DOMAIN, h)
    assert np.array_equal(after["edge"].to_numpy(), before["edge"].to_numpy())
    assert after.attrs["knobs_source"] == KNOBS_RECORDED and after.attrs["tier2_enabled"] is True
    # and the metric term really is part of those predictions (tier2 on)
    term = metric_term(h.trades, h.metrics, model.regime_weights)
    no_term = model.with_knobs("given", tier2_enabled=0).predict(h.trades, h.patterns, h.scope, h.metrics)
    np.testing.assert_allclose(after["edge"].to_numpy(), no_term.to_numpy() + term)
    assert np.abs(term).max() > 0.1


def test_the_now_rule_and_an_empty_model(train):
    assert OverrideModel.now_of(train.trades) == train.trades["closed_at"].max()
    empty = OverrideModel.from_rows(None, None, None)
    assert empty.knobs_source == "defaults" and empty.knobs == default_knobs() and empty.now is None
    edge = empty.predict(train.trades.head(5), train.patterns, train.scope, None)
    assert list(edge) == [0.0] * 5
