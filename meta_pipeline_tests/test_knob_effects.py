"""Every knob changes what the engines receive, in its documented direction (docs/knobs.md).

Per knob: the overrides are refitted with the knob at its low and at its high bound (the
others at their defaults) on a synth domain where the knob's situation is planted
(``lab.knob_fleets``: noise lessons for g_min and lambda_ci, a stale family for tau, a
family with six real signals at different scopes for tier3_topk), and the held-out
predictions must move by ≥ 0.001 R on average, in the documented direction, with the
held-out MSE moving the way the planted truth says. gamma_diversity is the controller's:
its exploration (trial step) must widen with it. The learning cores run once per domain;
only the overrides are refitted (no Dagster).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.knobs import KNOBS, default_knobs
from meta_pipeline.lab import knob_fleets
from meta_pipeline.learning.overrides import CI_Z, KNOBS_RECORDED, OverrideModel
from meta_pipeline.learning.predict import override_model
from meta_pipeline.learning.regime import metric_term
from meta_pipeline.store import MetaStore

SEED = 0
MIN_EFFECT = 0.001  # R, mean |Δprediction| over held-out trades (the bar)


@pytest.fixture(scope="module")
def noise():
    return knob_fleets.learn(knob_fleets.knob_domain(("noise",), SEED))


@pytest.fixture(scope="module")
def stale():
    return knob_fleets.learn(knob_fleets.knob_domain(("stale",), SEED))


@pytest.fixture(scope="module")
def ladder():
    return knob_fleets.learn(knob_fleets.knob_domain(("ladder",), SEED))


@pytest.fixture(scope="module")
def plain():
    return knob_fleets.learn(knob_fleets.knob_domain((), SEED))


def _ends(learned, name):
    low, high = KNOBS[name].low, KNOBS[name].high
    models = learned.fit(**{name: low}), learned.fit(**{name: high})
    preds = tuple(learned.predict(m) for m in models)
    return models, preds


def _mse(learned, pred) -> float:
    return float(np.mean((learned.held_return - pred) ** 2))


def _source(model: OverrideModel) -> pd.DataFrame:
    src = pd.DataFrame([json.loads(s) for s in model.rows["source_json"]])
    return pd.concat([model.rows[["lesson_key", "regime", "edge", "pattern"]].reset_index(drop=True), src], axis=1)


def test_lambda_ci_shrinks_each_edge_toward_its_lower_confidence_bound(noise):
    (lo, hi), (p_lo, p_hi) = _ends(noise, "lambda_ci")
    assert np.mean(np.abs(p_hi - p_lo)) >= MIN_EFFECT
    # the rule, by hand from what each row records: sign(c)·max(|c| − lambda_ci·1.96·se, 0)·tau^stale
    for model, lam in ((lo, 0.3), (hi, 0.7)):
        s = _source(model)
        assert (s["knobs"].map(lambda k: k["lambda_ci"]) == lam).all()
        want = np.sign(s["coef_at_now"]) * np.maximum(np.abs(s["coef_at_now"]) - lam * CI_Z * s["coef_se"], 0.0)
        np.testing.assert_allclose(s["edge"], want * s["tau_multiplier"], rtol=1e-12, atol=1e-15)
    # direction: every override kept at both ends is smaller in magnitude at the high end
    both = _source(lo).merge(_source(hi), on=["lesson_key", "regime"], how="outer", suffixes=("_lo", "_hi"),
                             indicator=True)
    assert set(both["_merge"]) <= {"both", "left_only"}  # a higher lambda_ci never adds an override
    kept = both[both["_merge"] == "both"]
    assert (np.abs(kept["edge_hi"]) < np.abs(kept["edge_lo"])).all()
    assert np.mean(np.abs(p_hi)) < np.mean(np.abs(p_lo))
    # the noise lessons' edges are gone out of sample: trusting them less predicts better
    assert _mse(noise, p_hi) < _mse(noise, p_lo)


def test_g_min_gates_the_noise_lessons(noise):
    (lo, hi), (p_lo, p_hi) = _ends(noise, "g_min")
    assert np.mean(np.abs(p_hi - p_lo)) >= MIN_EFFECT
    assert (np.abs(hi.rows["edge"]) >= KNOBS["g_min"].high).all()
    assert (np.abs(lo.rows["edge"]) < KNOBS["g_min"].high).any()  # the gate binds inside the bounds
    assert len(hi.rows) < len(lo.rows)
    is_noise = lambda m: int(m.rows["pattern"].str.startswith("W").sum())  # noqa: E731
    assert is_noise(lo) >= 3 and is_noise(hi) < is_noise(lo)
    assert np.mean(np.abs(p_hi)) < np.mean(np.abs(p_lo))
    assert _mse(noise, p_hi) < _mse(noise, p_lo)


def test_tau_fades_a_stale_lesson(stale):
    (lo, hi), (p_lo, p_hi) = _ends(stale, "tau")
    assert np.mean(np.abs(p_hi - p_lo)) >= MIN_EFFECT
    planted = stale.data.trades.attrs["planted"]["stale"]
    for model, tau in ((lo, 0.8), (hi, 0.99)):
        s = _source(model)
        rows = s[s["pattern"].isin(planted["patterns"])]
        assert len(rows) >= 1
        # stale by about the planted quiet spell (the last trade falls shortly before it starts)
        assert (rows["stale_days"] > planted["stale_days"] - 0.5).all()
        np.testing.assert_allclose(rows["tau_multiplier"], tau ** rows["stale_days"], rtol=1e-12)
        fresh = s[~s["pattern"].isin(planted["patterns"])]
        assert (fresh["stale_days"] < 1.0).all()
    # held out: where the stale family fires, a higher tau predicts more of its (positive) old edge
    h = stale.holdout
    fires = h.trades["trade_id"].isin(h.patterns.loc[h.patterns["pattern"].isin(planted["patterns"]), "trade_id"])
    fires = fires.to_numpy()
    assert fires.sum() > 100
    assert np.mean(p_hi[fires] - p_lo[fires]) > 10 * MIN_EFFECT
    assert np.mean(np.abs(p_hi)) > np.mean(np.abs(p_lo))
    # the signal died while nobody traded it: fading it faster wins
    assert _mse(stale, p_lo) < _mse(stale, p_hi)


def test_tier3_topk_binds_on_a_factor_with_six_real_signals(ladder):
    (lo, hi), (p_lo, p_hi) = _ends(ladder, "tier3_topk")
    assert np.mean(np.abs(p_hi - p_lo)) >= MIN_EFFECT

    def per_factor(model):
        return model.rows.drop_duplicates("lesson_key").groupby("latent_factor_id").size()

    assert per_factor(lo).max() == KNOBS["tier3_topk"].low  # binds at the low bound
    ladder_factor = lo.rows.loc[lo.rows["pattern"].str.startswith("L0."), "latent_factor_id"].iloc[0]
    assert per_factor(hi)[ladder_factor] >= 5  # more of the planted scopes are priced at the high bound
    # the ladder factor's winning edge per held-out trade vs its planted edge there: closer at the high bound
    h = ladder.holdout
    truth = ladder.data.holdout_trades.set_index("trade_id")["ladder_r"].reindex(h.trades["trade_id"]).to_numpy()

    def ladder_error(model):
        won = model.winning_overrides(h.trades, h.patterns, h.scope)
        won = won[won["latent_factor_id"] == ladder_factor].set_index("trade_id")["edge"]
        return float(np.mean((won.reindex(h.trades["trade_id"]).fillna(0.0).to_numpy() - truth) ** 2))

    assert ladder_error(hi) < 0.8 * ladder_error(lo)
    assert _mse(ladder, p_hi) < _mse(ladder, p_lo)


def test_tier2_enabled_adds_the_regime_metric_term(plain):
    (off, on), (p_off, p_on) = _ends(plain, "tier2_enabled")
    assert np.mean(np.abs(p_on - p_off)) >= MIN_EFFECT
    h = plain.holdout
    term = metric_term(h.trades, h.metrics, plain.weights)
    assert np.corrcoef(p_on - p_off, term)[0, 1] > 0.9  # what moved is the per-trade metric term
    np.testing.assert_allclose(on.predict(h.trades, h.patterns, h.scope, h.metrics).to_numpy()
                               - on.with_knobs("given", tier2_enabled=0).predict(h.trades, h.patterns, h.scope,
                                                                                  h.metrics).to_numpy(), term)
    assert _mse(plain, p_on) < _mse(plain, p_off)


def test_gamma_diversity_widens_the_controllers_exploration():
    low = knob_fleets.controller_exploration(KNOBS["gamma_diversity"].low, n_states=60)
    high = knob_fleets.controller_exploration(KNOBS["gamma_diversity"].high, n_states=60)
    assert low["n"] >= 15 and high["n"] >= 15
    # trust regions scale by √(gamma/0.3): √5 ≈ 2.2 apart before clipping at the bounds and max_step
    assert high["mean_step"] > 1.5 * low["mean_step"]


def test_a_stored_version_records_its_knobs_and_reapplies_its_edges(noise, tmp_path):
    knobs = {**default_knobs(), "lambda_ci": 0.7, "g_min": 0.05, "tau": 0.85}
    model = noise.fit(**knobs)
    store = MetaStore(db_url=f"sqlite:///{tmp_path}/k.db")
    domain = noise.data.domain
    version = store.write_overrides_version(domain, model.rows, as_of=model.now, knobs=knobs,
                                            regime_weights=noise.weights)
    store.replace_partition("trades", domain, noise.train.trades.head(5))
    stored = override_model(store, domain, version=version)
    assert stored.knobs_source == KNOBS_RECORDED
    assert {k: stored.knobs[k] for k in ("lambda_ci", "g_min", "tau")} == {"lambda_ci": 0.7, "g_min": 0.05, "tau": 0.85}
    # the edges are stored already shrunk (lambda_ci) and faded (tau): re-applying needs no knob
    mine = model.rows.sort_values(["lesson_key", "regime"]).reset_index(drop=True)
    theirs = stored.rows.sort_values(["lesson_key", "regime"]).reset_index(drop=True)
    assert mine["edge"].tolist() == theirs["edge"].tolist()
    h = noise.holdout
    np.testing.assert_allclose(stored.predict(h.trades, h.patterns, h.scope, h.metrics).to_numpy(),
                               model.predict(h.trades, h.patterns, h.scope, h.metrics).to_numpy(),
                               rtol=0, atol=1e-8)  # the version's regime weights are kept as JSON text


def test_knobs_set_by_a_person_reach_the_overrides_the_engines_receive(tmp_path):
    """Through Dagster: `knobs set` → the learning assets → pm_overrides built with the set lambda_ci."""
    import dagster as dg

    from meta_pipeline.governance.knob_settings import set_knobs
    from meta_pipeline.learning.predict import predict_trades
    from meta_pipeline_tests.support.code_location import unbound_definitions_for

    data = knob_fleets.knob_domain(("noise",), SEED, knob_fleets.KnobFleetConfig(n_trades=6000))
    train, holdout = knob_fleets.source_batches(data)
    store = MetaStore(db_url=f"sqlite:///{tmp_path}/w.db")
    domain = data.domain
    for table, frame in (("trades", train.trades), ("trade_patterns", train.patterns), ("trade_scope", train.scope),
                         ("trade_metrics", train.metrics)):
        store.replace_partition(table, domain, frame)
    learning = unbound_definitions_for(dg.AssetSelection.groups("learning"))
    got = {}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", [domain])
        for lam in (0.3, 0.7):
            set_knobs(store, domain, {"lambda_ci": lam}, "tester")
            # the whole learning group once; then only pm_overrides (what lambda_ci acts on) with the new knobs
            selection = None if lam == 0.3 else dg.AssetSelection.assets("pm_overrides")
            assert dg.materialize(learning, partition_key=domain, instance=instance, resources={"store": store},
                                  selection=selection).success
            rows = store.read("pm_overrides", domain=domain)
            assert len(rows) and all(json.loads(s)["knobs"]["lambda_ci"] == lam for s in rows["source_json"])
            got[lam] = (rows.set_index(["lesson_key", "regime"])["edge"],
                        predict_trades(store, domain, holdout)["edge"].to_numpy())
    both = got[0.3][0].index.intersection(got[0.7][0].index)
    assert len(both) and (np.abs(got[0.7][0][both]) < np.abs(got[0.3][0][both])).all()
    assert np.mean(np.abs(got[0.7][1] - got[0.3][1])) >= MIN_EFFECT
    versions = store.override_versions(domain)
    assert [parse["lambda_ci"] for parse in versions["knobs_json"].map(json.loads)] == [0.3, 0.7]
