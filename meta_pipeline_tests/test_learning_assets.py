"""Dagster wiring of the learning assets: a synth domain in a SQLite store, materialized twice.

Only the learning assets (and their checks) are materialized; their upstream `trades`
asset belongs to ingest and is an unselected dependency here — the source tables are
written straight into the store.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.learning.predict import predict_file, predict_trades
from meta_pipeline.store import MetaStore
from meta_pipeline.lab.synth import generate_fleet, write_trades_file
from meta_pipeline_tests.support.code_location import asset_check_keys, asset_names, unbound_definitions_for
from meta_pipeline_tests.support.frames import source_frames

# Which assets and checks are "the learning assets": the code location's definitions say.
LEARNING = dg.AssetSelection.groups("learning")
# The table each of them writes, one per asset.
TABLES = [
    "learning_lessons",
    "learning_edge_history",
    "half_life_fits",
    "latent_factors",
    "learning_regime_weights",
    "pm_overrides",
]
PLOTS = {
    "half_life_fits": "edge_history_with_fits",
    "latent_factors": "factor_sizes",
    "regime_weights": "weights_heatmap",
    "pm_overrides": "override_edges",
}


@pytest.fixture(scope="module")
def domain_data():
    fleet = generate_fleet(n_domains=1, seed=7, n_trades=8000, domain_names=("wiring",))
    return fleet.domains["wiring"]


def _load_store(store: MetaStore, data) -> None:
    batch = source_frames(data, "train")
    store.replace_partition("trades", data.domain, batch.trades)
    store.replace_partition("trade_patterns", data.domain, batch.patterns)
    store.replace_partition("trade_scope", data.domain, batch.scope)
    store.replace_partition("trade_metrics", data.domain, batch.metrics)


def _run(store: MetaStore, instance: dg.DagsterInstance, domain: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(unbound_definitions_for(LEARNING), partition_key=domain, instance=instance,
                          resources={"store": store})


def _snapshot(store: MetaStore, domain: str) -> dict[str, pd.DataFrame]:
    out = {}
    for name in TABLES:
        df = store.read(name, domain=domain).drop(columns=["domain"])
        out[name] = df.sort_values(list(df.columns[:3])).reset_index(drop=True)
    return out


@pytest.fixture(scope="module")
def materialized(tmp_path_factory, domain_data):
    """A store with the synth domain's training trades, its learning assets materialized twice."""
    folder = tmp_path_factory.mktemp("learning_assets")
    store = MetaStore(db_url=f"sqlite:///{folder}/t.db")
    _load_store(store, domain_data)
    domain = domain_data.domain
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", [domain, "empty"])
        first = _run(store, instance, domain)
        before = _snapshot(store, domain)
        second = _run(store, instance, domain)
        after = _snapshot(store, domain)
        empty = _run(store, instance, "empty")  # a registered domain without trades
    return {"store": store, "first": first, "second": second, "before": before, "after": after,
            "empty": empty, "folder": folder}


def test_learning_assets_populate_tables_with_checks_and_plots(materialized, domain_data):
    store, first = materialized["store"], materialized["first"]
    domain = domain_data.domain
    assert first.success

    # every table populated, lessons carry their factor ids
    counts = {t: store.count(t, domain) for t in TABLES}
    assert all(n > 0 for n in counts.values()), counts
    lessons = store.read("learning_lessons", domain=domain)
    assert lessons["latent_factor_id"].notna().all()

    # every check ran and passed
    evaluations = first.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} == {k.name for k in asset_check_keys(LEARNING)}
    assert all(e.passed for e in evaluations), [(e.check_name, e.metadata) for e in evaluations if not e.passed]

    # metadata: counts everywhere, plots where a person looks
    materializations = {}
    for event in first.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        materializations[mat.asset_key.to_user_string()] = mat.metadata
    assert set(materializations) == asset_names(LEARNING)
    assert len(materializations) == len(TABLES), "a learning asset whose table this test does not check"
    for key, meta in materializations.items():
        assert "dagster/row_count" in meta, key
    for key, plot in PLOTS.items():
        assert plot in materializations[key], (key, sorted(materializations[key]))
        assert "data:image/png;base64," in materializations[key][plot].value
    assert materializations["pm_overrides"]["knobs_source"].value == "defaults"


def test_rematerializing_is_idempotent(materialized):
    assert materialized["second"].success
    before, after = materialized["before"], materialized["after"]
    for name in TABLES:
        assert len(before[name]) == len(after[name]), name
        # pm_overrides: the same rows as a new version (every materialization is kept as one)
        drop = ["version"] if name == "pm_overrides" else []
        pd.testing.assert_frame_equal(before[name].drop(columns=drop), after[name].drop(columns=drop),
                                      check_exact=False, rtol=1e-9, obj=name)
    assert set(before["pm_overrides"]["version"]) == {1} and set(after["pm_overrides"]["version"]) == {2}


def test_a_domain_without_trades_materializes_empty(materialized):
    assert materialized["empty"].success
    assert all(materialized["store"].count(t, "empty") == 0 for t in TABLES)
    assert all(e.passed for e in materialized["empty"].get_asset_check_evaluations())


def test_predict_file_reads_the_store(materialized, domain_data):
    """The public predict path: a holdout trades file without return_r, overrides from the store."""
    store, folder = materialized["store"], materialized["folder"]
    domain = domain_data.domain
    holdout = domain_data.holdout_trades
    path = write_trades_file(holdout, folder / "holdout.csv")
    pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=["return_r"]).to_csv(path, index=False)
    result = predict_file(store, domain, path)
    assert list(result.columns) == ["trade_id", "edge"]
    assert len(result) == len(holdout) and result.attrs["quarantine"].empty
    assert np.isfinite(result["edge"]).all()
    # same numbers through the frame path (tables read once, frames passed in)
    frames = {
        "overrides": store.read("pm_overrides", domain=domain),
        "regime_weights": store.read("learning_regime_weights", domain=domain),
    }
    again = predict_trades(frames, domain, path)
    np.testing.assert_allclose(again["edge"].to_numpy(), result["edge"].to_numpy())
    # predictions track the planted truth better than predicting nothing
    truth = (holdout["expected_r"] - holdout["strategy_r"]).to_numpy()
    pred = result.set_index("trade_id")["edge"].reindex(holdout["trade_id"]).to_numpy()
    assert np.mean((pred - truth) ** 2) < 0.5 * np.mean(truth**2)
