"""The benchmark (meta-pipeline bench) and the fast paths it measures.

* a tiny real run: report files, JSON structure, every ratio computed from the timings
  it reports, the floor cheaper than the learning pass, naive factors agreeing with ours;
* the pure parts: exponents recover a planted power law, targets are judged right;
* the ingest/store fast paths give exactly what the reference code paths give;
* the run's read cache and incidence memo never serve rows that changed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from meta_pipeline.lab import bench
from meta_pipeline.cli import main as cli_main
from meta_pipeline.contracts import _read_csv_fast, read_input_file, validate_trades
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore
from meta_pipeline.store.frames import _not_null_rows_to_frame, _rows_to_frame, _sqlite_datetime_text
from meta_pipeline.contracts import table
from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_trades_file
from meta_pipeline_tests.support.code_location import asset_names

TINY = 1500
CPUS = os.cpu_count() or 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_out")
    opts = bench.BenchOptions(dagster=False, fleet=False, workers_in_process=True, naive_budget_s=20.0)
    result = bench.run_bench("small", out, opts, sizes=[TINY])
    return result, out


# ---------------------------------------------------------------------------
# a real (tiny) run
# ---------------------------------------------------------------------------


def test_report_files_and_json_structure(tiny_run) -> None:
    result, out = tiny_run
    for name in ("report.md", "report.json", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["sizes"][0]["n_trades"] == TINY
    assert on_disk == json.loads(json.dumps(result))  # the file holds exactly what was returned
    size = result["sizes"][0]
    assert list(size["assets"]) == [d.key.to_user_string() for d in bench.learning_asset_defs()]
    assert set(size["assets"]) == asset_names(dg.AssetSelection.groups("learning"))  # the code location's learning group
    for stage in (size["ingest"], size["learning_pass"], size["floor"], *size["assets"].values()):
        # CPU time: some was spent, and no more than every core busy for the whole wall time
        assert stage["wall_s"] > 0 and 0 < stage["cpu_s"] <= stage["wall_s"] * CPUS + 0.01, stage
        assert stage["peak_rss_mib"] > 50
    assert size["assets"]["lessons"]["rows"] > 0 and size["rows"]["trades"] == TINY
    md = (out / "report.md").read_text()
    assert "| lessons |" in md and "Naive baselines" in md and "scaling.png" in md


def test_ratios_come_from_the_reported_timings(tiny_run) -> None:
    result, _ = tiny_run
    size = result["sizes"][0]
    passed, floor = size["learning_pass"]["wall_s"], size["floor"]["wall_s"]
    assert size["floor_ratio"] == pytest.approx(passed / floor)
    # the floor (read + one groupby) really is cheaper than learning everything
    assert 0 < floor < passed
    assert size["floor"]["incidence_rows"] > size["rows"]["trades"]  # lesson×trade rows, several per trade
    # the pass is its assets, one after the other
    assert sum(a["wall_s"] for a in size["assets"].values()) <= passed * 1.05
    for name, nb in size["naive"].items():
        assert nb["naive_s"] > 0 and nb["ours_s"] > 0, name
        assert nb["speedup"] == pytest.approx(nb["naive_s"] / nb["ours_s"]), name
    assert size["naive"]["latent_factors"]["agreement"] == "yes"  # same factors, the slow way
    # once per run: the 3 downstream assets reused the incidence, pm_overrides the knobs lessons read, and the 4
    # assets after lessons its learning window (as_of + drift breaks)
    assert size["cache"]["hits"] > 0 and size["cache"]["memo_hits"] == 3 + 1 + 4


def test_console_table_lists_every_stage(tiny_run) -> None:
    result, _ = tiny_run
    text = bench.render_console(result)
    for name in ("ingest", "lessons", "pm_overrides", "learning pass", "floor", "curve_fit"):
        assert name in text


# ---------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------


def test_scaling_exponent_recovers_a_planted_power_law() -> None:
    n = np.array([1e4, 1e5, 1e6])
    assert bench.scaling_exponent(n, 0.002 * n**1.5) == pytest.approx(1.5)
    assert bench.scaling_exponent(n, 3.0 * n**0.9 * np.array([1.02, 0.98, 1.01])) == pytest.approx(0.9, abs=0.02)
    assert bench.scaling_exponent([1e4], [1.0]) is None  # one size: no slope
    assert bench.scaling_exponent([1e4, 1e4], [1.0, 2.0]) is None


def _fake_size(n: int, t: float) -> dict:
    stage = {"wall_s": t, "cpu_s": t, "peak_rss_mib": 100.0}
    return {"n_trades": n, "ingest": dict(stage), "learning_pass": dict(stage), "floor": {**stage, "wall_s": t / 3},
            "assets": {"lessons": dict(stage)}, "floor_ratio": 3.0}


def test_targets_are_judged_against_the_issue() -> None:
    sizes = [_fake_size(10_000, 0.5), _fake_size(1_000_000, 25.0)]
    result = {"sizes": sizes}
    result["exponents"] = bench.exponents_of(sizes)
    targets = bench.evaluate_targets(result)
    assert targets["large_wall_s"] == {"value": 50.0, "limit": 60.0, "met": True}
    assert targets["large_floor_ratio"]["met"] is True
    assert targets["max_exponent"]["value"] == pytest.approx(np.log(50) / np.log(100))  # 50x time for 100x trades
    assert targets["max_exponent"]["met"] is True
    sizes[1]["ingest"]["wall_s"] = 500.0  # 1000x time for 100x trades: k = 1.5
    result = {"sizes": sizes, "exponents": bench.exponents_of(sizes)}
    targets = bench.evaluate_targets(result)
    assert targets["max_exponent"] == {"value": pytest.approx(1.5), "which": "ingest", "limit": 1.2, "met": False}
    assert targets["large_wall_s"]["met"] is False
    assert bench.evaluate_targets({"sizes": sizes[:1], "exponents": {}})["large_wall_s"]["met"] is None


def test_bad_arguments_are_refused_clearly(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--tier", "huge", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert cli_main(["bench", "--repeat", "0", "--out", str(tmp_path)]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown tier"):
        bench.tiers_for("huge")
    assert not (tmp_path / "report.json").exists()  # nothing half-written
    assert [t.n_trades for t in bench.tiers_for("all")] == [10_000, 100_000, 1_000_000]


# ---------------------------------------------------------------------------
# fast paths = reference paths
# ---------------------------------------------------------------------------

HEADER = "trade_id,closed_at,regime,return_r,patterns\n"


@pytest.mark.parametrize(
    "text",
    [
        HEADER + "t1,2026-01-01,S0,0.5,a|b\nt2,2026-01-02,S1,-1,c\n",
        "\ufeff" + HEADER + 't1,"2026-01-01",S0,"0.5","a|b, c"\n"t,2","x ""y""",S1,1,z\n',
        HEADER + 't1,2026-01-01,S0,0.5,"a|\nb"\n\n\nt2,2026-01-01,S0,0.5,a\n',
        HEADER + "NA,null,NaN,nan,None\n#N/A,N/A,,-nan,NULL\n",
        HEADER + "t1,2026-01-01,S0\n",  # ragged: pandas' parser decides
        "trade_id,trade_id,closed_at,regime,return_r,patterns\n1,2,3,4,5,6\n",  # duplicate names: pandas decides
        "trade_id,,closed_at,regime,return_r,patterns\n1,2,3,4,5,6\n",
        HEADER,
    ],
)
def test_csv_reader_matches_pandas(tmp_path, text) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8", newline="")
    reference = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], skip_blank_lines=True)
    raw, lines = read_input_file(path)
    pd.testing.assert_frame_equal(raw, reference)
    # the physical line of each row: a quoted newline and blank lines push the next row down
    expected = [2, 6] if '"a|\nb"\n\n\n' in text else list(range(2, len(reference) + 2))
    assert list(lines) == expected
    fast = _read_csv_fast(path)
    if fast is not None:
        pd.testing.assert_frame_equal(fast, reference)


def test_validated_frames_match_the_row_by_row_meaning(tmp_path) -> None:
    text = (
        "trade_id,closed_at,regime,strategy_id,return_r,patterns,scope.chain,metric.m\n"
        " t1 ,2026-06-01T12:00:00+02:00, S0 ,,0.5, A.x | |B.y|A.x , solana ,1.5\n"
        "t2,2026-06-01T10:00:00Z,S1,beta,-1,C.z,,\n"
        "t1,2026-06-01T11:00:00Z,S2,beta,2.0,D.q,base,abc\n"  # repeats t1, bad metric
        ",2026-06-01T11:00:00Z,S2,beta,2.0,D.q,,\n"
    )
    path = tmp_path / "v.csv"
    path.write_text(text)
    raw, lines = read_input_file(path)
    batch = validate_trades(raw, lines, domain="d", source="v.csv")
    assert list(batch.trades["trade_id"]) == ["t2"]  # t1 twice (first superseded, last bad), empty id
    assert set(batch.quarantine["line"]) == {2, 4, 5}
    reasons = dict(zip(batch.quarantine["line"], batch.quarantine["reason"]))
    assert "repeated later" in reasons[2] and "metric.m" in reasons[4] and "empty trade_id" in reasons[5]
    good = validate_trades(raw.iloc[[0]], lines[:1], domain="d", source="v.csv")
    assert list(good.patterns["pattern"]) == ["A.x", "B.y"]  # stripped, empty dropped, repeat kept once
    assert good.trades["closed_at"].iloc[0] == pd.Timestamp("2026-06-01T10:00:00Z")
    assert good.trades["strategy_id"].iloc[0] == "default" and good.trades["regime"].iloc[0] == "S0"
    assert list(good.scope["value"]) == ["solana"] and list(good.metrics["value"]) == [1.5]


def test_sqlite_time_text_is_sqlalchemys_format() -> None:
    ns = pd.Series(pd.to_datetime(["2026-06-01T10:00:00.123456789Z", "1969-12-31T23:59:59.9999999Z", None],
                                  utc=True, format="ISO8601"))
    old = pd.Series(pd.to_datetime(["0999-01-01T00:00:00Z", "2026-01-01T00:00:00.5+02:00"], utc=True,
                                   format="ISO8601"))  # microsecond unit (year 999 is out of ns range)
    for ts in (ns, old, ns.astype("datetime64[s, UTC]")):
        text = ts.dt.strftime("%Y-%m-%d %H:%M:%S.%f").astype(object)
        expected = [None if pd.isna(t) else v for t, v in zip(ts, text)]
        assert _sqlite_datetime_text(ts) == expected
    assert _sqlite_datetime_text(ns)[:2] == ["2026-06-01 10:00:00.123456", "1969-12-31 23:59:59.999999"]  # floored


def test_columnar_row_conversion_matches_pandas() -> None:
    rows = [("t1", "A.x", 1.5), ("t2", "ü|日本", -2.0), ("t3", "", 0.0)]
    cols = ["trade_id", "metric", "value"]
    fast = _not_null_rows_to_frame(rows, cols, table("trade_metrics"))
    pd.testing.assert_frame_equal(fast, _rows_to_frame(rows, cols))
    assert _not_null_rows_to_frame(rows, cols[:2] + ["source_file"], table("trades")) is None  # nullable: pandas' path
    assert _not_null_rows_to_frame([("t1", "m", "not a number")], cols, table("trade_metrics")) is None


# ---------------------------------------------------------------------------
# the run cache never serves changed rows
# ---------------------------------------------------------------------------


@pytest.fixture
def loaded_store(tmp_path) -> tuple[MetaStore, Path]:
    fleet = generate_fleet(FleetConfig(n_domains=1, n_trades=600, telemetry_ticks=5, seed=3))
    path = write_trades_file(fleet.domains["dom0"].train_trades, tmp_path / "t.csv")
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'c.db'}")
    ingest_file(store, "trades", path, "dom0")
    return store, tmp_path


def test_read_cache_serves_repeats_and_sees_every_write(loaded_store) -> None:
    store, tmp_path = loaded_store
    with store.cached_reads() as cache:
        first = store.read("trades", domain="dom0")
        again = store.read("trades", domain="dom0")
        assert cache.hits == 1 and again.equals(first)
        again.loc[0, "return_r"] = 99.0  # a caller changing its copy changes nobody else's
        assert store.read("trades", domain="dom0")["return_r"].iloc[0] == first["return_r"].iloc[0] != 99.0
        # a write through the store in this process
        store.replace_partition("trades", "dom0", first.iloc[:10].drop(columns=["domain"]))
        assert len(store.read("trades", domain="dom0")) == 10
        # another process ingesting (a new batch id), behind this process's back
        ingest_file(MetaStore(db_url=store.db_url), "trades", tmp_path / "t.csv", "dom0")
        before = store.read("trades", domain="dom0")
        with sqlite3.connect(str(tmp_path / "c.db")) as raw:
            raw.execute("DELETE FROM trades WHERE domain = 'dom0' AND trade_id IN "
                        "(SELECT trade_id FROM trades WHERE domain = 'dom0' LIMIT 5)")
            raw.execute("INSERT INTO ingest_batches (domain, kind, source, rows_ingested, rows_quarantined, ingested_at) "
                        "VALUES ('dom0', 'trades', 'elsewhere', 1, 0, '2026-01-01 00:00:00.000000')")
        assert len(store.read("trades", domain="dom0")) == len(before) - 5
    assert store.read_cache is None  # the block ended: reads go to the database again


def test_run_memo_of_the_incidence_equals_recomputing_it(loaded_store) -> None:
    from meta_pipeline.learning import lessons as lessons_core

    store, _ = loaded_store
    trades = store.read("trades", domain="dom0", order_by="closed_at, trade_id").reset_index(drop=True)
    patterns = store.read("trade_patterns", domain="dom0")
    scope = store.read("trade_scope", domain="dom0")
    mined, incidence = lessons_core.mine_lessons(trades, patterns, scope)
    store.replace_partition("learning_lessons", "dom0", mined)
    stored = store.read("learning_lessons", domain="dom0")
    assert list(stored["lesson_key"]) == list(mined["lesson_key"])
    matched = lessons_core.match_lessons(stored, trades, patterns, scope)
    # identical arrays, row for row: downstream sums come out bit-for-bit the same
    assert np.array_equal(matched.to_numpy(), incidence.to_numpy())
    with store.cached_reads() as cache:
        key = ("lesson_incidence", "dom0", store.source_version("dom0"))
        store.remember(key, incidence)
        assert store.run_memo(key, lambda: pytest.fail("recomputed")) is incidence and cache.memo_hits == 1
        store.replace_partition("trade_scope", "dom0", scope.iloc[:-1])  # source rows change: new version
        assert store.source_version("dom0") != key[2]
    assert store.run_memo(key, lambda: "computed") == "computed"  # outside a run nothing is kept


def test_decay_rate_agreement_counts_same_rates_and_judges_the_others_by_fit() -> None:
    starts = pd.date_range("2026-01-01", periods=30, freq="D", tz="UTC")
    t = (starts - starts[0]) / pd.Timedelta(hours=1) + 12.0
    rows = []
    for key, rate in (("a", 0.01), ("b", 0.002), ("c", 0.0)):
        rows.append(pd.DataFrame({"lesson_key": key, "bucket_start": starts, "n": 50,
                                  "edge_mean": 0.4 * np.exp(-rate * t)}))
    history = pd.concat(rows, ignore_index=True)
    ours = pd.DataFrame({"lesson_key": ["a", "b", "c"], "decay_rate_per_hour": [0.01, 0.002, 0.0]})
    naive = {"a": (0.4, 0.01 * 1.005), "b": (0.4, 0.02), "c": (0.4, 1e-7)}  # b: curve_fit went astray
    assert bench.decay_rate_agreement(naive, ours, history) == "rate same on 2/3; ours fits better on 1/1 others"
    assert bench.decay_rate_agreement({}, ours, history) == "none compared"


def test_the_cli_path_is_timed_from_process_start_and_lands_the_learning(tmp_path) -> None:
    """bench_cli: `meta-pipeline ingest` then `dagster asset materialize` in fresh processes, both succeed,
    each with its own wall time and peak RSS; the learning tables were written by the Dagster run."""
    fleet = generate_fleet(FleetConfig(n_domains=1, n_trades=TINY, telemetry_ticks=5, seed=1,
                                       domain_names=(bench.DOMAIN,)))
    file = write_trades_file(fleet.domains[bench.DOMAIN].trades, tmp_path / "t.csv")
    out = bench.bench_cli(str(file), tmp_path / "cli")
    assert out["ok"], (tmp_path / "cli" / "materialize.log").read_text()[-2000:]
    for step in ("ingest", "materialize"):
        assert out[step]["wall_s"] > 0.5 and out[step]["peak_rss_mib"] > 50, step  # a real process: python + imports
    assert out["wall_s"] == pytest.approx(out["ingest"]["wall_s"] + out["materialize"]["wall_s"])
    log = (tmp_path / "cli" / "materialize.log").read_text()
    assert "pm_overrides" in log and "RUN_SUCCESS" in log
    judged = bench.scale_targets({"sizes": [{"n_trades": 1_000_000, "cli": out,
                                             "ingest": {"wall_s": 1.0, "peak_rss_mib": 1.0},
                                             "learning_pass": {"wall_s": 1.0, "peak_rss_mib": 1.0}}]})
    assert judged["1M_cli_wall_s"] == {"value": out["wall_s"], "limit": 40.0, "met": out["wall_s"] < 40.0}
