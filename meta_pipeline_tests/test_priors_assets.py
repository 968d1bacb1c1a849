"""domain_priors / global_prior as Dagster assets on a temporary store."""

import json
import warnings

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.contracts import ContractError
from meta_pipeline.defs.meta.priors import domain_priors, global_prior
from meta_pipeline.knobs import KNOB_NAMES, KNOBS
from meta_pipeline.store import MetaStore
from meta_pipeline.lab.synth import exploration_knobs, make_engine, simulate_telemetry

DOMAINS = ("alpha", "beta", "gamma")
T0 = pd.Timestamp("2026-03-01", tz="UTC")


def _telemetry(domain: str, rng: np.random.Generator, n: int = 120, outlier: bool = False) -> pd.DataFrame:
    engine = make_engine(domain, rng, outlier=outlier)
    tel = simulate_telemetry(engine, exploration_knobs(n, rng, spread=0.3), start=T0, every=pd.Timedelta(minutes=5),
                             rng=rng)
    return tel.rename(columns={c: c.replace("knob.", "knob_") for c in tel.columns}).assign(domain=domain)


@pytest.fixture
def setup(tmp_path):
    store = MetaStore(db_url=f"sqlite:///{tmp_path}/t.db")
    rng = np.random.default_rng(11)
    for d in DOMAINS:
        store.append("telemetry", _telemetry(d, rng))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", [*DOMAINS, "empty"])
    return store, instance


def _materialize_priors(store, instance, domain, **kw):
    return dg.materialize([domain_priors], instance=instance, resources={"store": store}, partition_key=domain, **kw)


def _materialize_global(store, instance, **kw):
    return dg.materialize([domain_priors, global_prior], selection=[global_prior], instance=instance,
                          resources={"store": store}, **kw)


def _metadata(result, key: str) -> dict:
    (mat,) = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


def test_domain_priors_then_global_prior_appends_versions(setup):
    store, instance = setup
    for d in DOMAINS:
        result = _materialize_priors(store, instance, d)
        assert result.success
        meta = _metadata(result, "domain_priors")
        assert meta["dagster/row_count"] == len(KNOB_NAMES) and meta["status"] == "ok"
        assert "reward_vs_knobs" in meta  # the plot
    priors = store.read("domain_priors")
    assert sorted(priors["domain"].unique()) == list(DOMAINS)
    assert (priors.groupby("domain").size() == len(KNOB_NAMES)).all()
    assert (priors["n_obs"] == 120).all()

    assert store.read_global_prior() is None
    first = _materialize_global(store, instance)
    assert first.success
    v1 = store.read("global_prior")
    assert set(v1["version"]) == {1} and len(v1) == len(KNOB_NAMES)
    assert (v1["n_domains"] == 3).all() and (v1["epsilon"] == 1.0).all()
    details = json.loads(v1["details_json"].iloc[0])
    assert set(details["domains"]) == set(DOMAINS)
    for info in details["domains"].values():
        assert {"weight", "outlier", "outlier_knobs", "shift_distance", "n_obs"} <= set(info)
    assert sum(v["weight"] for v in details["domains"].values()) == pytest.approx(1.0)
    assert set(details["shift_pairwise"]) == set(DOMAINS)
    meta = _metadata(first, "global_prior")
    assert meta["version"] == 1 and meta["n_domains"] == 3

    second = _materialize_global(store, instance)
    assert second.success
    both = store.read("global_prior", order_by="version, knob")
    assert sorted(both["version"].unique()) == [1, 2]
    # version 1 is untouched: appended, never overwritten
    again_v1 = both[both["version"] == 1].sort_values("knob").reset_index(drop=True)
    pd.testing.assert_frame_equal(again_v1, v1.sort_values("knob").reset_index(drop=True))
    v2 = store.read_global_prior()
    assert v2.version == 2 and v2.epsilon == pytest.approx(0.5)
    # the newest version (no number asked) is version 2 as written: its rows in the table
    latest = dict(zip(both.loc[both["version"] == 2, "knob"], both.loc[both["version"] == 2, "value"]))
    assert latest == v2.values
    for k, spec in KNOBS.items():
        assert spec.low <= latest[k] <= spec.high
    # same inputs: the Reptile step from v1 toward the same target stays at the target
    assert v2.continuous["tau"] == pytest.approx(store.read_global_prior(1).continuous["tau"])


def test_rematerializing_a_domain_replaces_its_rows_only(setup):
    store, instance = setup
    for d in DOMAINS:
        _materialize_priors(store, instance, d)
    before = store.read("domain_priors").sort_values(["domain", "knob"]).reset_index(drop=True)
    # new telemetry for alpha only (later ticks), then re-run alpha
    rng = np.random.default_rng(5)
    extra = _telemetry("alpha", rng, n=60)
    extra["ts"] = extra["ts"] + pd.Timedelta(days=1)
    store.append("telemetry", extra)
    _materialize_priors(store, instance, "alpha")
    after = store.read("domain_priors").sort_values(["domain", "knob"]).reset_index(drop=True)
    assert len(after) == len(before)
    assert (after.loc[after["domain"] == "alpha", "n_obs"] == 180).all()
    cols = ["domain", "knob", "mean", "std", "n_obs", "best_value"]
    pd.testing.assert_frame_equal(after.loc[after["domain"] != "alpha", cols].reset_index(drop=True),
                                  before.loc[before["domain"] != "alpha", cols].reset_index(drop=True))


def test_a_domain_without_telemetry_is_reported_and_ignored(setup):
    store, instance = setup
    for d in DOMAINS:
        _materialize_priors(store, instance, d)
    before = store.read("domain_priors")
    result = _materialize_priors(store, instance, "empty")
    assert result.success
    meta = _metadata(result, "domain_priors")
    assert meta["dagster/row_count"] == 0
    assert meta["status"] == "no telemetry: no prior"
    assert store.count("domain_priors", domain="empty") == 0
    assert len(store.read("domain_priors")) == len(before)  # nothing else lost
    assert _materialize_global(store, instance).success
    v1 = store.read_global_prior()
    assert v1.n_domains == 3 and "empty" not in v1.details["domains"]


def test_global_prior_without_any_domain_prior_succeeds_writes_nothing_and_says_why(setup):
    store, instance = setup
    result = _materialize_global(store, instance, raise_on_error=False)
    assert result.success  # a trades-only fleet must not fail what comes after the prior
    (mat,) = result.asset_materializations_for_node("global_prior")
    assert "no global prior version written" in mat.metadata["status"].value
    assert store.count("global_prior") == 0


def test_an_invalid_partition_key_is_rejected_before_sql(setup):
    store, instance = setup
    instance.add_dynamic_partitions("domain", ["Not A Domain"])
    with pytest.raises(ContractError, match="invalid domain name"):
        _materialize_priors(store, instance, "Not A Domain")
    assert store.count("domain_priors") == 0


def test_an_outlier_domain_is_flagged_in_the_global_prior(tmp_path):
    store = MetaStore(db_url=f"sqlite:///{tmp_path}/o.db")
    rng = np.random.default_rng(2)
    names = ["d0", "d1", "d2", "d3", "odd"]
    for d in names:
        store.append("telemetry", _telemetry(d, rng, n=200, outlier=(d == "odd")))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", names)
    for d in names:
        _materialize_priors(store, instance, d)
    assert _materialize_global(store, instance).success
    details = store.read_global_prior().details["domains"]
    assert details["odd"]["outlier"] and details["odd"]["weight"] == 0.0
    assert not any(details[d]["outlier"] for d in names[:4])
    assert details["odd"]["shift_distance"] > max(details[d]["shift_distance"] for d in names[:4])


def test_global_prior_is_requested_when_domain_priors_change(setup):
    store, instance = setup
    defs = dg.Definitions(assets=[domain_priors, global_prior], resources={"store": store})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert tick.get_num_requested(global_prior.key) == 0  # nothing upstream yet
        # one domain updated while the others were never materialized: still requested
        # (plain eager() would wait for every registered partition)
        _materialize_priors(store, instance, "alpha")
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert tick.get_num_requested(global_prior.key) == 1
        # handled: not requested again until domain priors change again
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert tick.get_num_requested(global_prior.key) == 0
