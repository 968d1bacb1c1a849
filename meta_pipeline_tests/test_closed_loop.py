"""The closed loop through Dagster: versions, prequential feedback, drift events, drift_sensor, replay, predict --version."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.cli import main as cli_main
from meta_pipeline.definitions import defs
from meta_pipeline.defs.learning.feedback import drift_sensor, pending_drift_events
from meta_pipeline.defs.resources import StoreResource
from meta_pipeline.ingest import ingest_file
from meta_pipeline.lab.synth import generate_fleet, write_trades_file
from meta_pipeline.learning.feedback import assign_versions
from meta_pipeline.learning.predict import predict_trades
from meta_pipeline.store import MetaStore

pytestmark = pytest.mark.slow  # several in-process runs of the learning assets

AS_OF = "meta_pipeline/as_of"


@pytest.fixture(scope="module")
def broken_domain(tmp_path_factory):
    """One domain whose first two signals flip sign at day 45; the stale overrides learned up to day 30."""
    tmp = tmp_path_factory.mktemp("loop")
    fleet = generate_fleet(n_domains=1, n_trades=9000, train_days=80, holdout_days=10, break_at_days=45,
                           e0_range=(0.5, 0.9), seed=0, underperform=None)
    data = fleet.domains["dom0"]
    db_url = f"sqlite:///{tmp / 'loop.db'}"
    store = MetaStore(db_url)
    trades = data.trades
    t_b = data.truth.break_at
    first = trades[trades["closed_at"] <= t_b + pd.Timedelta(days=5)]
    ingest_file(store, "trades", write_trades_file(first, tmp / "first.csv"), "dom0")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", ["dom0"])
    bound = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, sensors=defs.sensors,
                           resources={**(defs.resources or {}), "store": StoreResource(db_url=db_url)})
    job = bound.resolve_job_def("relearn_job")
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    # the stale version: learned as of day 30; the second run scores everything up to day 50 with it
    job.execute_in_process(partition_key="dom0", instance=instance, run_config=quiet,
                           tags={AS_OF: (data.truth.t0 + pd.Timedelta(days=30)).isoformat()})
    scored = job.execute_in_process(partition_key="dom0", instance=instance, run_config=quiet)
    return {"store": store, "instance": instance, "job": job, "bound": bound, "data": data, "t_b": t_b,
            "tmp": tmp, "quiet": quiet, "scored_run": scored, "db_url": db_url}


def test_every_materialization_is_a_kept_version_with_its_as_of(broken_domain):
    store, data = broken_domain["store"], broken_domain["data"]
    versions = store.override_versions("dom0")
    assert versions["version"].tolist()[:2] == [1, 2]
    trades = store.read("trades", domain="dom0")
    learned_up_to = trades[trades["closed_at"] <= data.truth.t0 + pd.Timedelta(days=30)]["closed_at"].max()
    assert versions["as_of"].iloc[0] == learned_up_to  # as_of = the newest closed_at it learned from
    assert versions["as_of"].iloc[1] == trades["closed_at"].max()
    history = store.read("pm_overrides_history", domain="dom0")
    assert set(history["version"]) >= {1, 2}
    current = store.read("pm_overrides", domain="dom0")
    newest = int(versions["version"].max())
    assert set(current["version"]) == {newest}
    assert len(history[history["version"] == newest]) == len(current)


def test_no_trade_is_scored_with_a_version_that_had_seen_it(broken_domain):
    store = broken_domain["store"]
    cycles = store.read("feedback_cycles", domain="dom0", order_by="cycle")
    versions = store.override_versions("dom0").set_index("version")
    assert len(cycles) > 0
    for row in cycles.itertuples():
        assert row.first_closed_at > versions.at[row.overrides_version, "as_of"]
        # and nothing a newer version had not seen yet was given to an older one
        later = versions[versions["as_of"] > versions.at[row.overrides_version, "as_of"]]
        if len(later):
            assert row.last_closed_at <= later["as_of"].min()
    assert cycles["cycle_size"].eq(1000).all()
    assert cycles.groupby("overrides_version")["complete"].apply(lambda c: (~c).sum() <= 1).all()


def test_the_planted_break_raises_one_drift_event_after_the_break(broken_domain):
    store, t_b = broken_domain["store"], broken_domain["t_b"]
    events = store.read("drift_events", domain="dom0")
    assert len(events) >= 1
    assert (events["closed_at"] > t_b).all()  # no false alarm on the stationary stretch
    assert events["overrides_version"].iloc[0] == 1  # the stale version's residuals drifted
    checks = {e.check_name: e for e in broken_domain["scored_run"].get_asset_check_evaluations()}
    assert not checks["no_unanswered_drift"].passed
    assert checks["no_unanswered_drift"].severity == dg.AssetCheckSeverity.ERROR


def test_drift_sensor_requests_exactly_one_run_per_event_then_none(broken_domain):
    store, instance, bound = broken_domain["store"], broken_domain["instance"], broken_domain["bound"]
    events = pending_drift_events(store, "dom0")
    assert len(events) >= 1
    ctx = dg.build_sensor_context(instance=instance, resources={"store": store}, definitions=bound)
    first = drift_sensor(ctx)
    assert [r.run_key for r in first.run_requests] == [f"drift:dom0:{int(events['id'].max())}"]
    assert first.run_requests[0].partition_key == "dom0"
    # a fresh cursor (a lost one) asks for the same run again: the run key makes it one run
    again = drift_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}))
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    # the re-learn answers it: the learning assets honour the break, and nothing is pending after
    result = broken_domain["job"].execute_in_process(partition_key="dom0", instance=instance,
                                                     run_config=broken_domain["quiet"])
    assert result.success
    newest = store.override_versions("dom0").iloc[-1]
    assert pd.notna(newest["fit_window_start"]) and int(newest["drift_event_id"]) in set(events["id"])
    assert pending_drift_events(store, "dom0").empty
    assert drift_sensor(dg.build_sensor_context(instance=instance, resources={"store": store})).run_requests == []
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["no_unanswered_drift"].passed


def test_after_the_relearn_the_next_cycles_alignment_recovers(broken_domain):
    """The trades scored with the drift re-learn's version, scored again (paired: the same realized trades)
    with the stale version learned before the break and with the plain re-fit that learned across it:
    the re-learn is far better aligned than the stale overrides and better than the plain re-fit. Paired,
    because two cycles of different trades differ by more than their noise (about 0.36·√(2/n) in MSE)."""
    store, tmp, data = broken_domain["store"], broken_domain["tmp"], broken_domain["data"]
    run = dict(partition_key="dom0", instance=broken_domain["instance"], run_config=broken_domain["quiet"])
    if store.override_versions("dom0")["drift_event_id"].isna().all():  # run alone: the drift sensor's re-learn
        broken_domain["job"].execute_in_process(**run)
    trades = data.trades
    later = trades[(trades["closed_at"] > broken_domain["t_b"] + pd.Timedelta(days=5))
                   & (trades["closed_at"] <= broken_domain["t_b"] + pd.Timedelta(days=25))]
    ingest_file(store, "trades", write_trades_file(later, tmp / "later.csv"), "dom0")
    broken_domain["job"].execute_in_process(**run)
    cycles = store.read("feedback_cycles", domain="dom0", order_by="cycle")
    alarmed = cycles[cycles["drift_alarm"]].iloc[0]
    after = cycles[(cycles["overrides_version"] > alarmed["overrides_version"]) & (cycles["n"] >= 200)]
    assert len(after)
    relearned = int(after["overrides_version"].iloc[0])
    versions = store.override_versions("dom0").set_index("version")
    assert pd.notna(versions.loc[relearned, "drift_event_id"])  # the version the drift re-learn built
    plain = relearned - 1  # learned across the break before its alarm: a plain re-fit on all history
    assert pd.isna(versions.loc[plain, "drift_event_id"]) and plain > 1
    stale = 1  # learned as of day 30, before the break
    scored_trades = later[later["closed_at"] > versions.loc[relearned, "as_of"]]
    realized = scored_trades.set_index("trade_id")["return_r"]

    def alignment(version: int) -> float:
        edge = predict_trades(store, "dom0", scored_trades, version=version).set_index("trade_id")["edge"]
        return 1.0 - float(((realized - edge.reindex(realized.index)) ** 2).mean() / (realized**2).mean())

    got = {v: alignment(v) for v in (stale, plain, relearned)}
    assert got[relearned] > got[stale] + 0.1 and got[relearned] > got[plain], got
    assert after["rank_ic"].iloc[0] > 0.2


def test_the_monitor_continues_its_stream_across_batches(broken_domain):
    store = broken_domain["store"]
    state = store.read("drift_monitor_state", domain="dom0")
    scored = int(store.read("feedback_cycles", domain="dom0")["n"].sum())
    assert int(state["n_seen"].iloc[0]) == scored  # every scored trade fed once, across the runs so far
    # the stored text restores the monitors a new batch continues: the whole stream's and one per factor
    from meta_pipeline.defs.learning.feedback import STATE_FORMAT, _load_monitors

    assert json.loads(state["state_json"].iloc[0])["format"] == STATE_FORMAT
    whole, by_factor = _load_monitors(state["state_json"].iloc[0])
    assert whole.n_seen == scored
    assert by_factor and sum(m.n_seen for m in by_factor.values()) > 0


def test_predict_reapplies_a_past_version_exactly(broken_domain, capsys):
    store, data, tmp = broken_domain["store"], broken_domain["data"], broken_domain["tmp"]
    sample = data.trades.tail(50)
    path = write_trades_file(sample, tmp / "sample.csv")
    v1 = predict_trades(store, "dom0", path, version=1)
    as_of_v1 = store.override_versions("dom0")["as_of"].iloc[0]
    same = predict_trades(store, "dom0", path, as_of=as_of_v1 + pd.Timedelta(seconds=1))
    assert v1.attrs["version"] == 1 and same.attrs["version"] == 1
    np.testing.assert_allclose(v1["edge"], same["edge"])
    current = predict_trades(store, "dom0", path)
    assert not np.allclose(current["edge"], v1["edge"])  # the break was re-learned since
    code = cli_main(["predict", str(path), "--domain", "dom0", "--version", "1", "--db-url", broken_domain["db_url"]])
    out = capsys.readouterr()
    assert code == 0
    printed = pd.read_csv(pd.io.common.StringIO(out.out))
    np.testing.assert_allclose(printed["edge"], v1["edge"], rtol=1e-5, atol=1e-6)
    assert cli_main(["predict", str(path), "--domain", "dom0", "--version", "999",
                     "--db-url", broken_domain["db_url"]]) == 2
    assert "no overrides version 999" in capsys.readouterr().err


def test_version_in_effect_follows_the_prequential_rule(broken_domain):
    store = broken_domain["store"]
    versions = store.override_versions("dom0")
    from meta_pipeline.learning.predict import version_in_effect

    for t in [versions["as_of"].iloc[0] - pd.Timedelta(seconds=1), *versions["as_of"], versions["as_of"].max()
              + pd.Timedelta(days=1)]:
        before = versions[versions["as_of"] < t]
        expected = -1 if before.empty else int(before[before["as_of"] == before["as_of"].max()]["version"].max())
        assert assign_versions(pd.Series([t]), versions)[0] == expected
        if expected > 0:
            assert version_in_effect(store, "dom0", t) == expected


def test_replay_walks_forward_and_scores_like_live(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    db_url = f"sqlite:///{tmp_path / 'replay.db'}"
    monkeypatch.setenv("META_PIPELINE_DB_URL", db_url)
    fleet = generate_fleet(n_domains=1, n_trades=3000, train_days=40, holdout_days=5, seed=3)
    path = write_trades_file(fleet.domains["dom0"].train_trades, tmp_path / "t.csv")
    assert cli_main(["ingest", "trades", str(path), "--domain", "dom0"]) == 0
    assert cli_main(["replay", "--domain", "dom0", "--every", "10d", "--quiet"]) == 0
    store = MetaStore(db_url)
    versions = store.override_versions("dom0")
    # 14 days warm-up, then 10-day steps before the last trade (days 14, 24, 34), then all the data
    assert len(versions) == 4
    assert versions["as_of"].is_monotonic_increasing
    cycles = store.read("feedback_cycles", domain="dom0", order_by="cycle")
    assert sorted(cycles["overrides_version"].unique()) == [1, 2, 3]
    assert (cycles["rank_ic"] > 0).all()
    assert cli_main(["replay", "--domain", "dom0", "--every=-3d"]) == 2
    assert "--every" in capsys.readouterr().err


def test_an_old_store_upgrades_in_place_to_version_1(tmp_path):
    from sqlalchemy import create_engine, text

    from meta_pipeline.contracts import metadata
    from meta_pipeline.store import dispose_engines

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    keep = [t for name, t in metadata.tables.items() if name not in ("pm_overrides_versions", "pm_overrides_history")]
    metadata.create_all(old, tables=keep)
    with old.begin() as conn:
        conn.execute(text("ALTER TABLE pm_overrides DROP COLUMN version"))
        conn.execute(text("INSERT INTO trades (domain, trade_id, closed_at, regime, strategy_id, return_r) "
                          "VALUES ('d', 't1', '2026-01-02 00:00:00.000000', 'S0', 'a', 0.1)"))
        conn.execute(text("INSERT INTO pm_overrides (domain, latent_factor_id, lesson_key, pattern, scope_json, "
                          "n_scope_keys, edge, support, source_json) VALUES ('d', 'f1', 'p|', 'p', '{}', 0, 0.3, 40, "
                          "'{\"knobs\": {\"tier2_enabled\": 0}}')"))
    old.dispose()
    dispose_engines()
    store = MetaStore(url)
    versions = store.override_versions("d")
    assert versions["version"].tolist() == [1]
    assert versions["as_of"].iloc[0] == pd.Timestamp("2026-01-02", tz="UTC")
    assert json.loads(versions["knobs_json"].iloc[0])["tier2_enabled"] == 0
    assert store.read("pm_overrides", domain="d")["version"].tolist() == [1]
    assert len(store.read("pm_overrides_history", domain="d")) == 1


def test_a_break_ingested_through_the_cli_reaches_dagster_sensor_preview_once(tmp_path):
    """The issue's path: trades through `meta-pipeline ingest`, assets through `dagster asset materialize`,
    the drift event through `dagster sensor preview drift_sensor` — exactly one run requested for it."""
    import subprocess

    from meta_pipeline_tests.support.e2e import REPO_ROOT, VENV_BIN, make_environment

    env = make_environment(tmp_path)
    fleet = generate_fleet(n_domains=1, n_trades=9000, train_days=80, holdout_days=10, break_at_days=45,
                           e0_range=(0.5, 0.9), seed=0, underperform=None)
    data = fleet.domains["dom0"]
    trades, t_b = data.trades, data.truth.break_at
    before = write_trades_file(trades[trades["closed_at"] <= t_b - pd.Timedelta(days=15)], tmp_path / "before.csv")
    after = write_trades_file(trades[(trades["closed_at"] > t_b - pd.Timedelta(days=15))
                                     & (trades["closed_at"] <= t_b + pd.Timedelta(days=5))], tmp_path / "after.csv")

    def dagster(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(VENV_BIN / "dagster"), *args, "-m", "meta_pipeline.definitions"], cwd=REPO_ROOT,
                              env=env.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # no code-location-name warning (definitions.py builds the component tree from the module)
        assert "does not match the name" not in done.stdout + done.stderr
        return done

    assert env.run_cli("ingest", "trades", str(before), "--domain", "dom0").returncode == 0
    dagster("asset", "materialize", "--select", "group:learning", "--partition", "dom0")
    assert env.run_cli("ingest", "trades", str(after), "--domain", "dom0").returncode == 0
    dagster("asset", "materialize", "--select", "group:learning or group:feedback", "--partition", "dom0")
    store = MetaStore(env.db_url)
    events = store.read("drift_events", domain="dom0")
    # the whole stream and the broken factors' streams each alarm once, all after the break
    assert len(events) >= 1 and (events["closed_at"] > t_b).all()
    assert events["trade_id"].is_unique
    preview = dagster("sensor", "preview", "drift_sensor")  # fresh cursor: pending decided from the data; one per domain
    assert "Sensor returning run requests for 1 run(s)" in preview.stdout, preview.stdout
