"""Ingest through the contract: good rows land, bad rows are quarantined with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.cli import main as cli_main
from meta_pipeline.contracts import ContractError
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore
from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_telemetry_file, write_trades_file

HEADER = "trade_id,closed_at,regime,strategy_id,return_r,patterns,scope.chain,scope.size,metric.slippage,extra_col\n"


@pytest.fixture(scope="module")
def small_fleet():
    return generate_fleet(FleetConfig(n_domains=1, n_trades=400, telemetry_ticks=50, seed=7))


def _write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_and_jsonl_ingest_the_same_trades(tmp_path, small_fleet) -> None:
    data = small_fleet.domains["dom0"]
    csv_store = MetaStore(db_url=f"sqlite:///{tmp_path / 'a.db'}")
    json_store = MetaStore(db_url=f"sqlite:///{tmp_path / 'b.db'}")
    parquet_store = MetaStore(db_url=f"sqlite:///{tmp_path / 'c.db'}")
    r1 = ingest_file(csv_store, "trades", write_trades_file(data.train_trades, tmp_path / "t.csv"), "dom0")
    r2 = ingest_file(json_store, "trades", write_trades_file(data.train_trades, tmp_path / "t.jsonl"), "dom0")
    r3 = ingest_file(parquet_store, "trades", write_trades_file(data.train_trades, tmp_path / "t.parquet"), "dom0")
    n = len(data.train_trades)
    assert r1.ingested == r2.ingested == r3.ingested == n and r1.quarantined == 0
    for table_name in ("trades", "trade_patterns", "trade_scope", "trade_metrics"):
        counts = {s.count(table_name) for s in (csv_store, json_store, parquet_store)}
        assert len(counts) == 1, table_name
    a = csv_store.read("trades").sort_values("trade_id").reset_index(drop=True)
    b = json_store.read("trades").sort_values("trade_id").reset_index(drop=True)
    assert np.allclose(a["return_r"], b["return_r"])
    assert (a["closed_at"] == b["closed_at"]).all()
    # the planted patterns arrive intact
    expected_pairs = int(sum(len(p.split("|")) for p in data.train_trades["patterns"]))
    assert csv_store.count("trade_patterns") == expected_pairs


def test_bad_rows_are_quarantined_and_the_rest_kept(tmp_path, store) -> None:
    text = HEADER + "\n".join(
        [
            "t1,2026-06-01T10:00:00Z,S0,alpha,0.5,A.x|B.y,solana,micro,3.5,zzz",  # good
            "t2,not-a-time,S0,alpha,0.5,A.x,solana,micro,3.5,",  # bad time
            "t3,2026-06-01T11:00:00+02:00,S1,,nan,A.x,base,,,",  # non-finite return
            "t4,2026-06-01T12:00:00,S1,beta,-0.25,,eth,small,,",  # empty patterns
            "t5,2026-06-01T13:00:00Z,S2,beta,1.0,C.z,,,,",  # good, no scope, no metric
            "t6,2026-06-01T14:00:00Z,S2,beta,1.0,C.z,,,inf,",  # metric not finite
            ",2026-06-01T15:00:00Z,S2,beta,1.0,C.z,,,,",  # empty id
        ]
    ) + "\n"
    report = ingest_file(store, "trades", _write(tmp_path, text), "dom-a")
    assert (report.rows_read, report.ingested, report.quarantined) == (7, 2, 5)
    q = store.read("quarantine", domain="dom-a").sort_values("line")
    assert list(q["line"]) == [3, 4, 5, 7, 8]  # file lines (header is line 1)
    reasons = dict(zip(q["line"], q["reason"]))
    assert "closed_at" in reasons[3]
    assert "return_r" in reasons[4]
    assert "empty patterns" in reasons[5]
    assert "metric.slippage" in reasons[7]
    assert "trade_id" in reasons[8]
    assert json.loads(q["raw_json"].iloc[0])["trade_id"] == "t2"  # the raw row is kept for repair
    trades = store.read("trades", domain="dom-a").set_index("trade_id")
    assert set(trades.index) == {"t1", "t5"}
    assert trades.loc["t5", "strategy_id"] == "beta"
    scope = store.read("trade_scope", domain="dom-a")
    assert set(zip(scope["trade_id"], scope["key"], scope["value"])) == {("t1", "chain", "solana"), ("t1", "size", "micro")}
    assert len(store.read("trade_metrics", domain="dom-a")) == 1  # t5's empty metric is "not measured"


def test_timestamps_with_offsets_become_utc(tmp_path, store) -> None:
    text = HEADER + "t1,2026-06-01T12:00:00+02:00,S0,alpha,0.5,A.x,,,,\nt2,2026-06-01T10:00:00,S0,,0.1,A.x,,,,\n"
    ingest_file(store, "trades", _write(tmp_path, text), "d")
    got = store.read("trades", domain="d").set_index("trade_id")["closed_at"]
    assert got["t1"] == pd.Timestamp("2026-06-01T10:00:00Z") == got["t2"]
    assert store.read("trades", domain="d").set_index("trade_id").loc["t2", "strategy_id"] == "default"


def test_reingest_replaces_never_duplicates(tmp_path, store) -> None:
    first = HEADER + "t1,2026-06-01T10:00:00Z,S0,alpha,0.5,A.x|B.y,solana,,,\nt2,2026-06-01T11:00:00Z,S0,alpha,0.1,A.x,,,,\n"
    second = HEADER + "t1,2026-06-01T10:00:00Z,S1,alpha,-2.0,C.z,base,,,\n"
    ingest_file(store, "trades", _write(tmp_path, first, "a.csv"), "d")
    ingest_file(store, "trades", _write(tmp_path, first, "a.csv"), "d")
    assert store.count("trades", "d") == 2 and store.count("trade_patterns", "d") == 3
    report = ingest_file(store, "trades", _write(tmp_path, second, "b.csv"), "d")
    assert report.replaced == 1
    trades = store.read("trades", domain="d").set_index("trade_id")
    assert len(trades) == 2 and trades.loc["t1", "return_r"] == -2.0 and trades.loc["t1", "regime"] == "S1"
    pats = store.read("trade_patterns", domain="d")
    assert sorted(pats[pats.trade_id == "t1"]["pattern"]) == ["C.z"]  # old patterns of t1 gone
    scope = store.read("trade_scope", domain="d")
    assert list(scope["value"]) == ["base"]


def test_reingest_after_trades_replaced_without_their_children(tmp_path, store) -> None:
    """A trades partition replaced on its own leaves pattern/scope/metric rows behind; a
    re-ingest of those trades replaces them instead of colliding with (or duplicating) them."""
    text = HEADER + "t1,2026-06-01T10:00:00Z,S0,alpha,0.5,A.x|B.y,solana,,,\nt2,2026-06-01T11:00:00Z,S0,alpha,0.1,A.x,,,,\n"
    path = _write(tmp_path, text, "a.csv")
    ingest_file(store, "trades", path, "d")
    store.replace_partition("trades", "d", store.read("trades", domain="d").iloc[:1].drop(columns=["domain"]))
    report = ingest_file(store, "trades", path, "d")
    assert report.ingested == 2 and report.replaced == 1
    assert store.count("trades", "d") == 2 and store.count("trade_patterns", "d") == 3
    assert store.count("trade_scope", "d") == 1


def test_resending_a_fleet_file_replaces_every_row_on_both_databases(tmp_path, any_store, small_fleet, monkeypatch) -> None:
    """A whole domain sent again (trades and telemetry, some values changed): same row
    counts, the new values, the other domain untouched — on SQLite and PostgreSQL."""
    data = small_fleet.domains["dom0"]
    trades_path = write_trades_file(data.trades, tmp_path / "t.csv")
    tel_path = write_telemetry_file(data.telemetry, tmp_path / "tel.csv")
    for domain in ("a", "b"):
        ingest_file(any_store, "trades", trades_path, domain)
        ingest_file(any_store, "telemetry", tel_path, domain)
    counts = {t: any_store.count(t, "a") for t in ("trades", "trade_patterns", "trade_scope", "trade_metrics", "telemetry")}
    changed = data.trades.copy()
    changed["return_r"] = changed["return_r"] + 1.0
    report = ingest_file(any_store, "trades", write_trades_file(changed, tmp_path / "t2.csv"), "a")
    tel_report = ingest_file(any_store, "telemetry", tel_path, "a")
    assert report.replaced == len(data.trades) and tel_report.replaced == counts["telemetry"]
    assert {t: any_store.count(t, "a") for t in counts} == counts
    assert {t: any_store.count(t, "b") for t in counts} == counts
    got = any_store.read("trades", domain="a").set_index("trade_id")["return_r"].sort_index()
    want = changed.set_index("trade_id")["return_r"].sort_index()
    assert np.allclose(got.to_numpy(), want.loc[got.index].to_numpy())
    # a re-send failing after its deletes leaves every row, and no staging table behind
    from meta_pipeline.store import MetaStore

    def fail(*args, **kwargs):
        raise RuntimeError("crash after the deletes")

    monkeypatch.setattr(MetaStore, "record_batch", staticmethod(fail))
    with pytest.raises(RuntimeError, match="crash after the deletes"):
        ingest_file(any_store, "trades", trades_path, "a")
    assert {t: any_store.count(t, "a") for t in counts} == counts
    monkeypatch.undo()
    ingest_file(any_store, "trades", trades_path, "a")
    assert {t: any_store.count(t, "a") for t in counts} == counts
    assert np.allclose(any_store.read("trades", domain="a").set_index("trade_id")["return_r"].sort_index().to_numpy(),
                       data.trades.set_index("trade_id")["return_r"].sort_index().to_numpy())


def test_missing_columns_reject_the_whole_file(tmp_path, store) -> None:
    text = "trade_id,closed_at,return_r\nt1,2026-06-01T10:00:00Z,0.5\n"
    with pytest.raises(ContractError, match=r"missing required column\(s\): regime, patterns"):
        ingest_file(store, "trades", _write(tmp_path, text), "d")
    assert store.count("trades") == 0 and store.count("quarantine") == 0


def test_telemetry_ingest_and_quarantine(tmp_path, store, small_fleet) -> None:
    tel = small_fleet.domains["dom0"].telemetry.copy()
    tel.loc[3, "stability_mean"] = 1.7  # out of [0, 1]
    tel.loc[5, "latency_ms"] = np.nan
    path = write_telemetry_file(tel, tmp_path / "tel.csv")
    report = ingest_file(store, "telemetry", path, "dom0")
    assert (report.ingested, report.quarantined) == (len(tel) - 2, 2)
    stored = store.read("telemetry", domain="dom0")
    assert stored["knob_tau"].notna().all() and stored["ts"].is_monotonic_increasing
    # idempotent
    again = ingest_file(store, "telemetry", path, "dom0")
    assert again.replaced == len(tel) - 2 and store.count("telemetry", "dom0") == len(tel) - 2


def test_jsonl_with_broken_lines(tmp_path, store) -> None:
    lines = [
        json.dumps({"trade_id": "t1", "closed_at": "2026-06-01T10:00:00Z", "regime": "S0", "return_r": 0.3,
                    "patterns": ["A.x", "B.y"], "scope": {"chain": "solana"}, "metrics": {"slippage": 2.0}}),
        "{not json",
        json.dumps({"trade_id": "t2", "closed_at": "2026-06-01T11:00:00Z", "regime": "S0", "return_r": 0.1,
                    "patterns": []}),
    ]
    report = ingest_file(store, "trades", _write(tmp_path, "\n".join(lines) + "\n", "x.jsonl"), "d")
    assert (report.ingested, report.quarantined) == (1, 2)
    q = store.read("quarantine", domain="d").sort_values("line")
    assert list(q["line"]) == [2, 3] and "JSON" in q["reason"].iloc[0]


def test_cli_ingest_exit_codes(tmp_path, sqlite_url, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    good = _write(tmp_path, HEADER + "t1,2026-06-01T10:00:00Z,S0,alpha,0.5,A.x,,,,\n", "good.csv")
    all_bad = _write(tmp_path, HEADER + "t1,never,S0,alpha,0.5,A.x,,,,\n", "bad.csv")
    missing = _write(tmp_path, "trade_id,regime\nt1,S0\n", "missing.csv")
    assert cli_main(["ingest", "trades", str(good), "--domain", "d1", "--db-url", sqlite_url]) == 0
    assert cli_main(["ingest", "trades", str(all_bad), "--domain", "d1", "--db-url", sqlite_url]) == 1
    assert cli_main(["ingest", "trades", str(missing), "--domain", "d1", "--db-url", sqlite_url]) == 2
    for hostile in ("../x", "a;drop", "", "x" * 200):
        assert cli_main(["ingest", "trades", str(good), "--domain", hostile, "--db-url", sqlite_url]) == 2
    store = MetaStore(db_url=sqlite_url)
    assert store.domains() == ["d1"] and store.count("trades") == 1
    # the partition was registered in the Dagster instance the CLI uses
    import dagster as dg

    with dg.DagsterInstance.from_config(str(tmp_path / "dh")) as instance:
        assert instance.get_dynamic_partitions("domain") == ["d1"]
