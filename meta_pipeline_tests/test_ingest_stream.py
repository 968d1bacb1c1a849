"""Streaming ingest (``meta_pipeline.ingest_stream``): span by span, one transaction, bounded memory.

* the hostile corpus read in tiny spans (16 bytes of CSV / JSON Lines, 2 rows of Parquet,
  so nearly every file goes through many spans) gives exactly the answers the corpus
  states, on SQLite and PostgreSQL, and exactly what a whole-file read lands;
* a trade id repeated across spans keeps its last row (the earlier ones quarantined with
  their lines), and a re-sent file replaces its ids (``replaced`` counted);
* an error injected after span k leaves the rows from before the file and nothing of it;
* peak memory of a many-span file grows with the span, not with the file (subprocess RSS);
* limits: an over-long cell, too many patterns, too many scope keys are quarantined.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from meta_pipeline.contracts import IngestLimits
from meta_pipeline.ingest import ingest_file
from meta_pipeline.ingest_stream import ChunkSizes, _Reader, ingest_trades_file
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.test_ingest_hostile import CORPUS, _problems, _run, write_corpus

TINY = {"META_PIPELINE_INGEST_CHUNK_BYTES": "16", "META_PIPELINE_INGEST_CHUNK_ROWS": "2"}
TRADE_CASES = [c for c in CORPUS if c.kind == "trades"]


@pytest.fixture(scope="module")
def trade_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("hostile_trades"), TRADE_CASES)


def test_hostile_trades_in_tiny_spans_give_the_stated_answers(any_store, trade_corpus, monkeypatch) -> None:
    for name, value in TINY.items():
        monkeypatch.setenv(name, value)
    failures, many_spans = {}, 0
    for case in TRADE_CASES:
        problems = _problems(case, _run(any_store, trade_corpus, case), trade_corpus / case.name)
        if problems:
            failures[case.name] = problems
        if case.rejected is None and any_store.dialect == "sqlite":
            reader = _Reader(trade_corpus / case.name, ChunkSizes.from_env())
            many_spans += (not reader.whole) and sum(1 for _ in reader.spans()) > 2
    assert not failures, "\n".join(f"{name}: {'; '.join(p)}" for name, p in failures.items())
    assert many_spans >= 15 or any_store.dialect != "sqlite"  # the corpus really went through many spans


def test_tiny_spans_land_what_a_whole_read_lands(tmp_path, trade_corpus, monkeypatch) -> None:
    whole = MetaStore(db_url=f"sqlite:///{tmp_path / 'whole.db'}")
    spans = MetaStore(db_url=f"sqlite:///{tmp_path / 'spans.db'}")
    for case in TRADE_CASES:
        monkeypatch.delenv("META_PIPELINE_INGEST_CHUNK_BYTES", raising=False)
        monkeypatch.delenv("META_PIPELINE_INGEST_CHUNK_ROWS", raising=False)
        a = _run(whole, trade_corpus, case)
        for name, value in TINY.items():
            monkeypatch.setenv(name, value)
        b = _run(spans, trade_corpus, case)
        assert a["rejected"] == b["rejected"], case.name
        assert a["quarantine"] == b["quarantine"], case.name
        pd.testing.assert_frame_equal(a["rows"].drop(columns=["id"], errors="ignore"),
                                      b["rows"].drop(columns=["id"], errors="ignore"), obj=case.name)
        if a["report"] is not None:
            ra, rb = a["report"], b["report"]
            assert (ra.rows_read, ra.ingested, ra.replaced, ra.quarantined, ra.duplicates_in_file, ra.ignored_columns,
                    ra.reasons) == (rb.rows_read, rb.ingested, rb.replaced, rb.quarantined, rb.duplicates_in_file,
                                    rb.ignored_columns, rb.reasons), case.name


def test_spans_joined_from_small_blocks_land_what_a_whole_read_lands(tmp_path, monkeypatch) -> None:
    """The fast CSV reader joins pyarrow's small blocks into spans: rows, lines and quarantine as a whole read."""
    import meta_pipeline.ingest_stream as stream

    path = _trades_csv(tmp_path / "t.csv", [f"t{i}" for i in range(3000)] + ["t7", "t1500"], bad_return={5, 2999})
    whole = MetaStore(db_url=f"sqlite:///{tmp_path / 'whole.db'}")
    joined = MetaStore(db_url=f"sqlite:///{tmp_path / 'joined.db'}")
    a = ingest_trades_file(whole, path, domain="d", source="f")
    monkeypatch.setattr(stream, "FAST_READ_BYTES", 512)  # blocks of ~9 rows, spans of ~4 KiB: many blocks per span
    reader = _Reader(path, ChunkSizes(chunk_bytes=4096))
    assert reader.csv_fast_candidate(10_000)
    reader.csv_fast = True
    spans = list(reader.spans())
    assert len(spans) > 10 and all(len(raw) > 20 for raw, _ in spans[:-1])  # each span is several blocks
    assert np.concatenate([lines for _, lines in spans]).tolist() == list(range(2, 3004))
    b = ingest_trades_file(joined, path, domain="d", source="f", sizes=ChunkSizes(chunk_bytes=4096))
    assert b.spans == len(spans) and (a.ingested, a.quarantined, a.duplicates_in_file) == (b.ingested, b.quarantined,
                                                                                          b.duplicates_in_file)
    cols = ["trade_id", "closed_at", "regime", "return_r"]
    pd.testing.assert_frame_equal(whole.read("trades", domain="d", columns=cols, order_by="trade_id"),
                                  joined.read("trades", domain="d", columns=cols, order_by="trade_id"))
    qa, qb = (s.read("quarantine", domain="d").sort_values("line")[["line", "reason"]].reset_index(drop=True)
              for s in (whole, joined))
    pd.testing.assert_frame_equal(qa, qb)
    assert sorted(qa["line"]) == [7, 9, 1502, 3001]  # two bad returns, two ids repeated later


def _trades_csv(path: Path, ids: list[str], *, bad_return: set[int] = frozenset()) -> Path:
    rows = ["trade_id,closed_at,regime,return_r,patterns,scope.venue"]
    for i, tid in enumerate(ids):
        ret = "oops" if i in bad_return else f"{(i % 7) / 10:.1f}"
        rows.append(f"{tid},2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z,bull,{ret},p{i % 5}|q,v{i % 3}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_ids_repeated_across_spans_keep_the_last_row(tmp_path, suffix) -> None:
    ids = [f"t{i}" for i in range(300)] + ["t5", "t250", "t7", "t5"]  # t5 three times, across spans
    csv_path = _trades_csv(tmp_path / "dups.csv", ids, bad_return={302})  # the later t7 is bad: t7 keeps no row
    path = csv_path
    if suffix == "jsonl":
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        path = tmp_path / "dups.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict(orient="records")) + "\n")
    answers = []
    for chunk in (1 << 30, 300):
        store = MetaStore(db_url=f"sqlite:///{tmp_path / f'{suffix}{chunk}.db'}")
        landed = ingest_trades_file(store, path, domain="d", source="s", sizes=ChunkSizes(chunk, 2))
        q = store.read("quarantine", domain="d").sort_values("line")
        trades = store.read("trades", domain="d").set_index("trade_id")
        answers.append((landed.ingested, landed.quarantined, landed.duplicates_in_file,
                        list(zip(q["line"], q["reason"])), trades["return_r"].sort_index().to_dict()))
        assert landed.spans == (1 if chunk > 1e6 else landed.spans) and (chunk > 1e6 or landed.spans > 5)
    assert answers[0] == answers[1]
    ingested, quarantined, dups, quarantine, returns = answers[1]
    first = 1 if suffix == "jsonl" else 2  # JSON Lines have no header line
    assert dups == 4 and quarantined == 5 and ingested == 300 - 1  # t7 lost both rows
    assert [line for line, _ in quarantine] == [5 + first, 7 + first, 250 + first, 300 + first, 302 + first]
    assert "t7" not in returns and returns["t5"] == pytest.approx((303 % 7) / 10)


def test_resent_file_replaces_its_ids_span_by_span(tmp_path) -> None:
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'm.db'}")
    first = _trades_csv(tmp_path / "a.csv", [f"t{i}" for i in range(200)])
    again = _trades_csv(tmp_path / "b.csv", [f"t{i}" for i in range(150, 350)])
    ingest_trades_file(store, first, domain="d", source="a", sizes=ChunkSizes(500, 2))
    landed = ingest_trades_file(store, again, domain="d", source="b", sizes=ChunkSizes(500, 2))
    assert (landed.ingested, landed.replaced) == (200, 50) and landed.spans > 5
    assert store.count("trades", domain="d") == 350 and store.count("trade_patterns", domain="d") == 700


@pytest.mark.parametrize("fail_after", [1, 3])
def test_interrupted_ingest_leaves_the_previous_rows_and_nothing_of_the_file(any_store, tmp_path, fail_after) -> None:
    before = _trades_csv(tmp_path / "before.csv", [f"t{i}" for i in range(100)])
    ingest_file(any_store, "trades", before, "d")
    snapshot = {t: any_store.read(t, domain="d").sort_values(list(any_store.read(t, domain="d").columns[:3]))
                .reset_index(drop=True) for t in ("trades", "trade_patterns", "trade_scope")}
    batches = any_store.count("ingest_batches")
    big = _trades_csv(tmp_path / "big.csv", [f"t{i}" for i in range(50, 400)], bad_return={7})

    def boom(span: int) -> None:
        if span == fail_after:
            raise RuntimeError(f"injected after span {span}")

    with pytest.raises(RuntimeError, match="injected"):
        ingest_trades_file(any_store, big, domain="d", source=str(big), sizes=ChunkSizes(1000, 2), after_span=boom)
    for t, rows in snapshot.items():
        now = any_store.read(t, domain="d").sort_values(list(rows.columns[:3])).reset_index(drop=True)
        pd.testing.assert_frame_equal(now, rows, obj=t)
    assert any_store.count("quarantine", domain="d") == 0 and any_store.count("ingest_batches") == batches
    landed = ingest_trades_file(any_store, big, domain="d", source=str(big), sizes=ChunkSizes(1000, 2))
    assert (landed.ingested, landed.replaced, landed.quarantined) == (349, 49, 1)  # t57 (line 9) is bad
    assert any_store.count("trades", domain="d") == 400  # t57 keeps its earlier row


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from meta_pipeline.ingest_stream import ChunkSizes, _Reader, ingest_trades_file
    from meta_pipeline.store import MetaStore
    path, db, warm, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = MetaStore(db_url=f"sqlite:///{db}")
    ingest_trades_file(store, warm, domain="warm", source="warm", sizes=ChunkSizes(chunk, 5000))  # every code path loaded
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    landed = ingest_trades_file(store, path, domain="d", source="big", sizes=ChunkSizes(chunk, 5000))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": peak - base, "spans": landed.spans, "ingested": landed.ingested}))
""")


def _synthetic_csv(path: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "trade_id": [f"trade-{i:09d}" for i in range(n)],
        "closed_at": pd.date_range("2025-01-01", periods=n, freq="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ"),
        "regime": rng.choice(["bull", "bear", "chop"], n),
        "return_r": rng.normal(size=n).round(4),
        "patterns": rng.choice(["a|b|c", "b|d", "c|e|f|g", "h"], n),
        "scope.venue": rng.choice(["x", "y"], n),
        "metric.size": rng.random(n).round(3),
    })
    frame.to_csv(path, index=False)
    return path


def test_peak_memory_follows_the_span_not_the_file(tmp_path) -> None:
    """A 150k-row CSV (~10 MB) in 512 KiB spans: the process's peak RSS grows by well under the file's
    size (a whole-file read costs ~8× the file; the first pass keeps the ids, ~20 bytes a row), measured in a fresh process (ru_maxrss)."""
    big = _synthetic_csv(tmp_path / "big.csv", 150_000)
    warm = _synthetic_csv(tmp_path / "warm.csv", 20_000)
    size_kib = big.stat().st_size / 1024
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(big), str(tmp_path / "m.db"), str(warm), str(1 << 19)],
                         capture_output=True, text=True, timeout=300, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["ingested"] == 150_000 and probe["spans"] >= 15
    assert probe["growth_kib"] < 0.75 * size_kib, (probe, size_kib)  # a whole-file read: ~8× the file


def test_rows_over_the_limits_are_quarantined(tmp_path) -> None:
    limits = IngestLimits(max_cell_chars=500, max_patterns=5, max_scope_keys=3)
    many = "|".join(f"p{i}" for i in range(6))
    csv_path = tmp_path / "limits.csv"
    csv_path.write_text(
        "trade_id,closed_at,regime,return_r,patterns,scope.a,scope.b,scope.c,scope.d,note\n"
        "t1,2026-01-01T00:00:00Z,bull,0.1,a|b,x,,,,ok\n"
        f"t2,2026-01-01T00:00:01Z,bull,0.1,a|b,x,,,,{'z' * 600}\n"
        f"t3,2026-01-01T00:00:02Z,bull,0.1,{many},x,,,,ok\n"
        "t4,2026-01-01T00:00:03Z,bull,0.1,a,x,y,z,w,ok\n")
    for chunk in (1 << 30, 120):
        store = MetaStore(db_url=f"sqlite:///{tmp_path / f'l{chunk}.db'}")
        landed = ingest_trades_file(store, csv_path, domain="d", source="s", sizes=ChunkSizes(chunk, 2), limits=limits)
        q = store.read("quarantine", domain="d").sort_values("line")
        assert landed.ingested == 1 and list(q["line"]) == [3, 4, 5]
        reasons = list(q["reason"])
        assert reasons[0] == "cell 'note' longer than 500 characters (the ingest cell limit)"
        assert "more than 5 patterns" in reasons[1] and "more than 3 scope keys" in reasons[2]
        assert len(json.loads(q["raw_json"].iloc[0])["raw"]) < 700  # the over-long row's text is cut
    jsonl = tmp_path / "limits.jsonl"
    base = {"closed_at": "2026-01-01T00:00:00Z", "regime": "bull", "return_r": 0.1, "patterns": ["a"]}
    jsonl.write_text("\n".join(json.dumps({**base, **r}) for r in [
        {"trade_id": "j1"}, {"trade_id": "j2", "scope": {f"k{i}": "v" for i in range(10_000)}},
        {"trade_id": "j3", "patterns": [f"p{i}" for i in range(20_000)]}]) + "\n")
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'j.db'}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("META_PIPELINE_MAX_SCOPE_KEYS_PER_TRADE", "100")
        mp.setenv("META_PIPELINE_MAX_PATTERNS_PER_TRADE", "1000")
        report = ingest_file(store, "trades", jsonl, "d")
    q = store.read("quarantine", domain="d").sort_values("line")
    assert report.ingested == 1 and list(q["line"]) == [2, 3]
    assert "more than 100 scope keys" in q["reason"].iloc[0] and "more than 1,000 patterns" in q["reason"].iloc[1]
    assert store.read("trade_scope", domain="d").empty  # no column per key was ever made


def test_a_hash_collision_costs_time_never_a_row(tmp_path, monkeypatch) -> None:
    """Every id hashed alike (the worst collision): the exact comparison still finds only real repeats."""
    import meta_pipeline.ingest_stream as stream

    path = _trades_csv(tmp_path / "c.csv", [f"t{i}" for i in range(120)] + ["t3", "t77"])
    monkeypatch.setattr(stream, "id_hashes", lambda ids: np.zeros(len(ids), dtype=np.uint64))
    store = MetaStore(db_url=f"sqlite:///{tmp_path / 'c.db'}")
    landed = ingest_trades_file(store, path, domain="d", source="s", sizes=ChunkSizes(200, 2))
    q = store.read("quarantine", domain="d").sort_values("line")
    assert landed.spans > 3 and (landed.ingested, landed.duplicates_in_file) == (120, 2)
    assert list(q["line"]) == [5, 79]  # the first t3 and t77 (header is line 1)
    monkeypatch.undo()
    assert len(np.unique(stream.id_hashes(pa.array([f"t{i}" for i in range(10_000)])))) == 10_000
