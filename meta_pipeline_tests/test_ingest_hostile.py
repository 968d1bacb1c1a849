"""Hostile input files: every bad input gets a clear answer, nothing good is lost, both backends alike.

The corpus (``build_corpus``: 55+ files written by the test, one class of defect each) goes
through ``ingest_file`` on SQLite and on PostgreSQL (``any_store``). For each file the
test states the whole answer: rejected whole (a ContractError naming the file, nothing
written) or not; the exact quarantine rows (physical line, a reason substring) and the
number of good rows landed; ``raw_json`` parses as a JSON object for every quarantined
row. ``test_both_backends_store_the_same`` compares what the two backends hold, row for row.

A property test (hypothesis) mutates valid trades CSVs (delete a character, insert a
byte, duplicate a line, drop a delimiter, insert a quote) and checks that no exception but
ContractError escapes and that every row the mutations did not touch lands unchanged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meta_pipeline.contracts import ContractError
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore

# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------

H = "trade_id,closed_at,regime,strategy_id,return_r,patterns,scope.chain,metric.m"  # 8 fields
TH = "ts,gain_p50,stability_mean,vram_utilization,latency_ms,knob.tau"  # 6 fields
FH = "ts,input,output,score,model_version,metadata.rater"  # feedback: 6 fields


def good(i: int, **over: str) -> str:
    """A valid trades row (8 fields); keyword arguments replace fields."""
    row = {"trade_id": f"t{i}", "closed_at": f"2026-06-01T10:00:{i:02d}Z", "regime": "S0", "strategy_id": "alpha",
           "return_r": "0.5", "patterns": "A.x|B.y", "scope.chain": "solana", "metric.m": "1.5"}
    row.update(over)
    return ",".join(row.values())


def tgood(i: int, **over: str) -> str:
    """A valid telemetry row (6 fields)."""
    row = {"ts": f"2026-06-01T10:{i:02d}:00Z", "gain_p50": "0.03", "stability_mean": "0.8",
           "vram_utilization": "0.5", "latency_ms": "120", "knob.tau": "0.95"}
    row.update(over)
    return ",".join(row.values())


def fgood(i: int, **over: str) -> str:
    """A valid feedback row (6 fields)."""
    row = {"ts": f"2026-06-01T10:{i:02d}:00Z", "input": f"question {i}", "output": "answer", "score": "0.8",
           "model_version": "v1", "metadata.rater": "alice"}
    row.update(over)
    return ",".join(row.values())


def fjrow(i: int, **over: object) -> str:
    obj = {"ts": f"2026-06-01T10:{i:02d}:00Z", "input": f"question {i}", "output": "answer", "score": 0.8,
           "metadata": {"rater": "alice"}}
    obj.update(over)
    return json.dumps(obj)


def jrow(i: int, **over: object) -> str:
    obj = {"trade_id": f"t{i}", "closed_at": f"2026-06-01T10:00:{i:02d}Z", "regime": "S0", "return_r": 0.5,
           "patterns": ["A.x", "B.y"], "scope": {"chain": "solana"}, "metrics": {"m": 1.5}}
    obj.update(over)
    return json.dumps(obj)


def tjrow(i: int, **over: object) -> str:
    obj = {"ts": f"2026-06-01T10:{i:02d}:00Z", "gain_p50": 0.03, "stability_mean": 0.8, "vram_utilization": 0.5,
           "latency_ms": 120, "knobs": {"tau": 0.95}}
    obj.update(over)
    return json.dumps(obj)


def text(*lines: str, end: str = "\n") -> bytes:
    return (end.join(lines) + end).encode("utf-8")


@dataclass
class Case:
    name: str  # the file name (its suffix picks the reader)
    data: bytes
    kind: str = "trades"
    rejected: str | None = None  # a substring of the ContractError message
    quarantine: list[tuple[int, str]] = field(default_factory=list)  # (line, reason substring), by line
    landed: int = 0
    ignored: list[str] = field(default_factory=list)  # substrings, one per ignored column
    duplicates: int = 0
    check: Callable[[MetaStore, str], None] | None = None  # anything else worth asserting


def _regime_of(trade_id: str, expected: str) -> Callable[[MetaStore, str], None]:
    def check(store: MetaStore, domain: str) -> None:
        trades = store.read("trades", domain=domain).set_index("trade_id")
        assert trades.loc[trade_id, "regime"] == expected

    return check


def _patterns_of(trade_id: str, expected: set[str]) -> Callable[[MetaStore, str], None]:
    def check(store: MetaStore, domain: str) -> None:
        pats = store.read("trade_patterns", domain=domain)
        assert set(pats[pats.trade_id == trade_id]["pattern"]) == expected

    return check


def _knob(column: str, expected: float) -> Callable[[MetaStore, str], None]:
    def check(store: MetaStore, domain: str) -> None:
        assert store.read("telemetry", domain=domain)[column].tolist() == [expected]

    return check


def _no_bare_nan(store: MetaStore, domain: str) -> None:
    q = store.read("quarantine", domain=domain)
    assert all("NaN" not in r and "Infinity" not in r for r in q["raw_json"])


def build_corpus() -> list[Case]:
    rnd = random.Random(12)
    latin1 = "t2,2026-06-01T10:00:02Z,R\xe9gime,alpha,0.5,A.x,solana,1".encode("latin-1")
    latin1_at = len(text(H, good(1))) + latin1.index(b"\xe9")  # the byte offset in the file (0-based)
    ns = "2026-06-01T10:00:09.123456789Z"  # nanosecond precision: pandas' ns unit ends in 2262
    k100, k101 = "k" * 100, "k" * 101
    cases = [
        # -- unreadable bytes, ragged rows -----------------------------------------------
        Case("latin1_byte.csv", text(H, good(1)) + latin1 + b"\n" + text(good(3)),
             quarantine=[(3, f"not UTF-8 at byte {latin1_at}")], landed=2),
        Case("latin1_header_extra.csv",
             (H + ",scope.r").encode() + b"\xe9gion\n" + text(good(1) + ",eu", good(2) + ",us"),
             landed=2, ignored=["scope.r\ufffdgion (name is not UTF-8)"]),
        Case("ragged_fewer.csv", text(H, good(1), "t2,2026-06-01T10:00:02Z,S0,alpha,0.5,A.x", good(3)),
             quarantine=[(3, "row has 6 fields, header has 8")], landed=2),
        Case("ragged_more.csv", text(H, good(1), good(2) + ",extra,more", good(3)),
             quarantine=[(3, "row has 10 fields, header has 8")], landed=2),
        Case("ragged_one_field.csv", text(H, good(1), "garbage", good(3)),
             quarantine=[(3, "row has 1 field, header has 8")], landed=2),
        Case("ragged_dup_id.csv", text(H, good(1), "t1,2026-06-01T10:00:05Z,S1", good(3)),
             quarantine=[(3, "row has 3 fields")], landed=2, check=_regime_of("t1", "S0")),
        # -- files with no locatable row ----------------------------------------------------
        Case("empty.csv", b"", rejected="empty file"),
        Case("blank_only.csv", b"\n  \n\r\n", rejected="empty file"),
        Case("header_only.csv", text(H), landed=0),
        Case("random.csv", rnd.randbytes(4096), rejected=""),
        Case("random_text_header.csv", b"\x01\x02garbage header\n" + rnd.randbytes(2048), rejected="missing required"),
        Case("random.jsonl", rnd.randbytes(4096), rejected="not JSON Lines"),
        Case("random.parquet", rnd.randbytes(4096), rejected="not a readable Parquet file"),
        Case("empty.parquet", b"", rejected="empty file"),
        Case("json_in.csv", text(jrow(1), jrow(2)), rejected="is JSON"),
        Case("csv_in.jsonl", text(H, good(1)), rejected="not JSON Lines"),
        Case("utf16.csv", ("\ufeff" + H + "\n" + good(1) + "\n").encode("utf-16-le"), rejected="not a CSV text file"),
        Case("missing_column.csv", text("trade_id,closed_at,regime,return_r", "t1,2026-06-01T10:00:00Z,S0,1"),
             rejected="missing required column(s): patterns"),
        Case("empty.jsonl", b"\n\n", rejected="empty file"),
        # -- BOM, line ends, quoting ----------------------------------------------------------
        Case("bom.csv", b"\xef\xbb\xbf" + text(H, good(1), good(2)), landed=2),
        Case("bom_bad_row.csv", b"\xef\xbb\xbf" + text(H, good(1), "t2,2026-06-01T10:00:02Z,S0"),
             quarantine=[(3, "row has 3 fields")], landed=1),
        Case("bom.jsonl", b"\xef\xbb\xbf" + text(jrow(1), jrow(2)), landed=2),
        Case("quoted_newline_then_bad.csv",
             text(H, good(1, patterns='"A.x|\nB.y"'), "", good(2, closed_at="not-a-time"), good(3)),
             quarantine=[(5, "unparsable closed_at")], landed=2, check=_patterns_of("t1", {"A.x", "B.y"})),
        Case("quoted_commas_quotes.csv", text(H, good(1, regime='"S,0 ""quoted"""'), good(2, strategy_id='"a,b"'),
                                              good(3, return_r="x")),
             quarantine=[(4, "return_r is not a finite number")], landed=2, check=_regime_of("t1", 'S,0 "quoted"')),
        Case("blank_lines.csv", text("", H, "", good(1), "", "", good(2, regime=""), "   ", good(3)),
             quarantine=[(7, "empty regime")], landed=2),
        Case("crlf.csv", text(H, good(1), good(2, return_r="nan"), good(3), end="\r\n"),
             quarantine=[(3, "return_r is not a finite number")], landed=2),
        Case("crlf_ragged.csv", text(H, good(1), "t2,x", good(3, patterns='"A.x|\r\nB.y"'), good(4), end="\r\n"),
             quarantine=[(3, "row has 2 fields")], landed=3),
        Case("cr_only.csv", text(H, good(1), good(2), end="\r"), landed=2),
        Case("unclosed_quote.csv", text(H, good(1), good(2, regime='"S0'), good(3), good(4)),
             quarantine=[(3, "unclosed quote")], landed=3),
        Case("quote_then_quoted_newline.csv",
             text(H, good(1, regime='"S0'), good(2, patterns='"A.x|\nB.y"'), good(3)),
             quarantine=[(2, "unclosed quote")], landed=2),
        # -- values too long for their column, NUL characters ---------------------------------
        Case("long_trade_id.csv", text(H, good(1), good(2, trade_id="t" * 201), good(3, trade_id="u" * 200)),
             quarantine=[(3, "trade_id longer than 200 characters")], landed=2),
        Case("long_regime.csv", text(H, good(1, regime="R" * 100), good(2, regime="R" * 101)),
             quarantine=[(3, "regime longer than 100 characters")], landed=1),
        Case("long_strategy.csv", text(H, good(1, strategy_id="s" * 200), good(2, strategy_id="s" * 201)),
             quarantine=[(3, "strategy_id longer than 200 characters")], landed=1),
        Case("long_pattern.csv", text(H, good(1, patterns="A|" + "p" * 200), good(2, patterns="A|" + "p" * 201)),
             quarantine=[(3, "pattern longer than 200 characters")], landed=1),
        Case("long_scope_value.csv", text(H, good(1, **{"scope.chain": "v" * 200}), good(2, **{"scope.chain": "v" * 201})),
             quarantine=[(3, "scope.chain longer than 200 characters")], landed=1),
        Case("long_scope_key.csv", text(H + f",scope.{k101},scope.{k100}", good(1) + ",a,b", good(2) + ",c,d"),
             landed=2, ignored=["scope key longer than 100 characters"]),
        Case("long_metric_name.csv", text(H + f",metric.{k101},metric.{k100}", good(1) + ",1,2", good(2) + ",3,4"),
             landed=2, ignored=["metric name longer than 100 characters"]),
        Case("nul_regime.csv", text(H, good(1), good(2, regime="S\x000")), quarantine=[(3, "regime contains a NUL")],
             landed=1),
        Case("nul_values.csv", text(H, good(1, trade_id="t\x001"), good(2, patterns="A.x|B\x00y"),
                                    good(3, **{"scope.chain": "so\x00l"}), good(4, strategy_id="\x00"), good(5)),
             quarantine=[(2, "trade_id contains a NUL"), (3, "patterns contains a NUL"),
                         (4, "scope.chain contains a NUL"), (5, "strategy_id contains a NUL")], landed=1),
        Case("nul_ignored_column.csv", text(H + ",extra", good(1) + ",a\x00b"), landed=1, ignored=["extra"]),
        # -- timestamps: one range rule, row by row ------------------------------------------
        Case("year2300_alone.csv", text(H, good(1), good(2, closed_at="2300-01-01T00:00:00Z")),
             quarantine=[(3, "closed_at out of range (years 1970-2200)")], landed=1),
        Case("year2300_ns_neighbour.csv", text(H, good(1, closed_at=ns), good(2, closed_at="2300-01-01T00:00:00Z")),
             quarantine=[(3, "closed_at out of range (years 1970-2200)")], landed=1),
        Case("year1900_alone.csv", text(H, good(1), good(2, closed_at="1900-01-01T00:00:00Z")),
             quarantine=[(3, "closed_at out of range")], landed=1),
        Case("year1900_ns_neighbour.csv", text(H, good(1, closed_at=ns), good(2, closed_at="1900-01-01")),
             quarantine=[(3, "closed_at out of range")], landed=1),
        Case("years_at_the_bounds.csv", text(H, good(1, closed_at="1970-01-01T00:00:00Z"),
                                             good(2, closed_at="2200-12-31T23:59:59Z"),
                                             good(3, closed_at="1970-01-01T00:30:00+01:00"),
                                             good(4, closed_at="2201-01-01T00:00:00Z")),
             quarantine=[(4, "closed_at out of range"), (5, "closed_at out of range")], landed=2),
        # -- JSON types -----------------------------------------------------------------------
        Case("json_types.jsonl", text(jrow(1, regime={"a": 1}), jrow(2, regime=["S0"]), jrow(3, return_r=True),
                                      jrow(4, metrics={"m": False}), jrow(5, patterns=[{"a": 1}]),
                                      jrow(6, scope="solana"), jrow(7, trade_id=123), jrow(8, regime=True),
                                      jrow(9, strategy_id={"x": 1}), jrow(10, scope={"chain": ["a"]}), jrow(11)),
             quarantine=[(1, "regime must be text"), (2, "regime must be text"),
                         (3, "return_r is not a finite number"), (4, "metric.m is not a finite number"),
                         (5, "patterns must be text or a list of text"), (6, "scope must be a JSON object"),
                         (8, "regime must be text"), (9, "strategy_id must be text"),
                         (10, "scope.chain must be text")], landed=2),
        Case("json_unparsable_lines.jsonl", text(jrow(1), "{not json", "[1, 2]", "null", '"text"', "", jrow(7)),
             quarantine=[(2, "unparsable JSON"), (3, "not a JSON object (a JSON array)"),
                         (4, "not a JSON object (a JSON null)"), (5, "not a JSON object (a JSON string)")], landed=2),
        Case("json_latin1.jsonl", text(jrow(1)) + jrow(2).replace('"S0"', '"R\xe9"').encode("latin-1") + b"\n" + text(jrow(3)),
             quarantine=[(2, "not UTF-8 at byte")], landed=2),
        Case("json_nan.jsonl", text(jrow(1), jrow(2).replace('"return_r": 0.5', '"return_r": NaN'),
                                    jrow(3).replace('"m": 1.5', '"m": Infinity')),
             quarantine=[(2, "return_r is not a finite number"), (3, "metric.m is not a finite number")], landed=1,
             check=_no_bare_nan),
        Case("json_surrogate.jsonl", text(jrow(1), jrow(2).replace('"S0"', '"S\\ud800"'),
                                          jrow(3).replace('"solana"', '"\\udfff"'), jrow(4)[:-1] + ', "x\\ud800": 1}'),
             quarantine=[(2, "regime is not valid Unicode"), (3, "scope.chain is not valid Unicode")], landed=2,
             ignored=["x\\ud800 (name is not valid Unicode text)"]),
        Case("json_deep.jsonl", text(jrow(1), "[" * 100_000 + "]" * 100_000, jrow(3)),
             quarantine=[(2, "unparsable JSON")], landed=2),
        Case("json_long_scope_key.jsonl", text(jrow(1, scope={k101: "a", "chain": "b"}), jrow(2)),
             landed=2, ignored=["scope key longer than 100 characters"]),
        # -- duplicates, odd columns -----------------------------------------------------------
        Case("duplicate_ids.csv", text(H, good(1, regime="S0"), good(2), good(1, regime="S9"), good(3), good(2)),
             quarantine=[(2, "trade_id repeated later in the same file (later row kept)"), (3, "repeated later")],
             landed=3, duplicates=2, check=_regime_of("t1", "S9")),
        Case("odd_columns.csv", text("trade_id,closed_at,,regime,return_r,patterns,regime,scope.,metric.,"
                                     "weird\x01name,scope.ok,metric.ok,whatever",
                                     "t1,2026-06-01T10:00:00Z,x,S0,1,A.x,S1,y,z,w,eu,2.5,v"),
             landed=1, ignored=["empty column name", "duplicate column name", "empty scope key",
                                "empty metric name", "control character", "whatever"],
             check=_regime_of("t1", "S0")),
        Case("parquet_rows.parquet", b"", landed=1,
             quarantine=[(2, "regime longer than 100 characters"), (3, "return_r is not a finite number")]),
        # -- telemetry ---------------------------------------------------------------------------
        Case("tel_latin1.csv", text(TH, tgood(1)) + tgood(2, gain_p50="0.0\xe9").encode("latin-1") + b"\n"
             + text(tgood(3)), kind="telemetry", quarantine=[(3, "not UTF-8 at byte")], landed=2),
        Case("tel_ragged.csv", text(TH, tgood(1), tgood(2) + ",extra", "2026-06-01T10:03:00Z,0.1", tgood(4)),
             kind="telemetry", quarantine=[(3, "row has 7 fields, header has 6"), (4, "row has 2 fields")], landed=2),
        Case("tel_year2300.csv", text(TH, tgood(1, ts="2026-06-01T10:01:00.123456789Z"),
                                      tgood(2, ts="2300-01-01T00:00:00Z"), tgood(3, ts="1900-06-01T00:00:00Z")),
             kind="telemetry", quarantine=[(3, "ts out of range"), (4, "ts out of range")], landed=1),
        Case("tel_year2300_alone.csv", text(TH, tgood(1), tgood(2, ts="2300-01-01T00:00:00Z")),
             kind="telemetry", quarantine=[(3, "ts out of range")], landed=1),
        Case("tel_json_types.jsonl", text(tjrow(1, gain_p50=True), tjrow(2, knobs={"tier2_enabled": True}),
                                          tjrow(3, knobs={"tau": True}), tjrow(4, knobs="x"),
                                          tjrow(5, latency_ms={"a": 1})),
             kind="telemetry", quarantine=[(1, "gain_p50 is not a finite number"), (3, "knob.tau is not a finite"),
                                           (4, "knobs must be a JSON object"), (5, "latency_ms is not a finite")],
             landed=1, check=_knob("knob_tier2_enabled", 1.0)),
        Case("tel_duplicates.csv", text(TH, tgood(1, gain_p50="0.1"), tgood(1, gain_p50="0.2"), tgood(2)),
             kind="telemetry", quarantine=[(2, "ts repeated later")], landed=2, duplicates=1),
        Case("tel_odd_columns.csv", text(TH + ",knob.nosuch,,extra,ts", tgood(1) + ",1,2,3,x"), kind="telemetry",
             landed=1, ignored=["knob.nosuch (not a knob)", "empty column name", "extra", "duplicate column name"]),
        Case("tel_quoted_newline.csv", text(TH, tgood(1), "", '"2026-06-01T10:02:00Z",0.03,0.8,0.5,"1\n20",0.95',
                                            tgood(3, stability_mean="1.5")),
             kind="telemetry", quarantine=[(4, "latency_ms is not a finite number"), (6, "stability_mean outside")],
             landed=1),
        Case("tel_empty.csv", b"", kind="telemetry", rejected="empty file"),
        Case("tel_random.csv", rnd.randbytes(3000), kind="telemetry", rejected=""),
        Case("tel_bom.jsonl", b"\xef\xbb\xbf" + text(tjrow(1), tjrow(2)), kind="telemetry", landed=2),
        Case("tel_nul.csv", text(TH, tgood(1, gain_p50="0.1\x00"), tgood(2)), kind="telemetry",
             quarantine=[(2, "gain_p50 is not a finite number")], landed=1),
        # -- feedback (a task's ratings): the same reader and rules -------------------------------
        Case("fb_hostile.csv", text(FH, fgood(1), fgood(2, model_version="v\x001"), fgood(3, score="2"),
                                    fgood(4, ts="2300-01-01T00:00:00Z"), "2026-06-01T10:05:00Z,q,a",
                                    fgood(6, model_version="m" * 201), fgood(7, model_version="m" * 200)),
             kind="feedback", quarantine=[(3, "model_version contains a NUL"), (4, "score outside [0, 1]"),
                                          (5, "ts out of range"), (6, "row has 3 fields"),
                                          (7, "model_version longer than 200 characters")], landed=2),
        Case("fb_json.jsonl", b"\xef\xbb\xbf" + text(fjrow(1, score=True), fjrow(2).replace('"question 2"', '"q\\ud800"'),
                                                    fjrow(3, metadata="x"), fjrow(4, input={"b": 1, "a": [1]}),
                                                    fjrow(5)),
             kind="feedback", quarantine=[(1, "score is not a finite number"), (2, "input is not valid Unicode"),
                                          (3, "metadata is not a JSON object")], landed=2),
        Case("fb_empty.csv", b"", kind="feedback", rejected="empty file"),
    ]
    return cases


def _write_parquet(path: Path) -> None:
    pd.DataFrame({
        "trade_id": ["t1", "t2", "t3"],
        "closed_at": ["2026-06-01T10:00:00Z", "2026-06-01T10:00:01Z", "2026-06-01T10:00:02Z"],
        "regime": ["S0", "R" * 101, "S0"],
        "return_r": [0.5, 0.1, float("nan")],
        "patterns": [["A.x"], ["B.y"], ["C.z"]],
        "scope": [{"chain": "sol"}, {"chain": "eth"}, {"chain": "sol"}],
    }).to_parquet(path, index=False)


CORPUS = build_corpus()


def write_corpus(folder: Path, cases: list[Case] = CORPUS) -> Path:
    """The corpus files in ``folder`` (the one Parquet case written by pandas); returns the folder."""
    for case in cases:
        path = folder / case.name
        if case.name == "parquet_rows.parquet":
            _write_parquet(path)
        else:
            path.write_bytes(case.data)
    return folder


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("hostile"))


def _domain(case: Case) -> str:
    return "c-" + case.name.replace(".", "-").replace("_", "-").lower()[:60]


def _run(store: MetaStore, folder: Path, case: Case) -> dict:
    """Ingest one corpus file; what the store then holds for its domain (comparable across backends)."""
    path = folder / case.name
    domain = _domain(case)
    out: dict = {"rejected": None}
    try:
        report = ingest_file(store, case.kind, path, domain)
    except ContractError as exc:
        out["rejected"] = str(exc)
        report = None
    q = store.read("quarantine", domain=domain).sort_values(["line", "reason"])
    out["quarantine"] = list(zip(q["line"].astype(int), q["reason"], q["raw_json"]))
    rows = (store.read("feedback", equals={"task": domain}) if case.kind == "feedback"
            else store.read(case.kind, domain=domain)).drop(columns=["ingested_at"], errors="ignore")
    out["rows"] = rows.sort_values(rows.columns[1]).reset_index(drop=True)
    out["report"] = report
    return out


def _problems(case: Case, got: dict, path: Path) -> list[str]:
    """Everything about one file that differs from what the case expects ([] = as expected)."""
    bad: list[str] = []
    if case.rejected is not None:
        if got["rejected"] is None:
            return [f"expected a rejection, got ingested={got['report'].ingested}"]
        if path.name not in got["rejected"] or case.rejected not in got["rejected"]:
            bad.append(f"rejection message {got['rejected']!r} lacks the file name or {case.rejected!r}")
        if got["quarantine"] or len(got["rows"]):
            bad.append("a rejected file wrote rows")
        if "\n" in got["rejected"]:
            bad.append("a rejection message of more than one line")
        return bad
    if got["rejected"] is not None:
        return [f"unexpected rejection: {got['rejected']}"]
    lines = [(line, reason) for line, reason, _ in got["quarantine"]]
    if len(lines) != len(case.quarantine) or any(
            line != want_line or want not in reason
            for (line, reason), (want_line, want) in zip(lines, case.quarantine)):
        bad.append(f"quarantine {lines} != expected {case.quarantine}")
    for line, _, raw in got["quarantine"]:
        try:
            if not isinstance(json.loads(raw), dict):
                bad.append(f"line {line}: raw_json is not a JSON object")
        except (TypeError, ValueError) as exc:
            bad.append(f"line {line}: raw_json {raw!r} does not parse ({exc})")
    if len(got["rows"]) != case.landed:
        bad.append(f"landed {len(got['rows'])} rows, expected {case.landed}")
    report = got["report"]
    if (report.ingested, report.quarantined) != (case.landed, len(case.quarantine)):
        bad.append(f"report says ingested {report.ingested}, quarantined {report.quarantined}")
    if report.duplicates_in_file != case.duplicates:
        bad.append(f"duplicates_in_file {report.duplicates_in_file} != {case.duplicates}")
    if len(report.ignored_columns) != len(case.ignored) or not all(
            any(want in got_col for got_col in report.ignored_columns) for want in case.ignored):
        bad.append(f"ignored columns {report.ignored_columns} != expected {case.ignored}")
    return bad


def test_the_corpus_covers_every_class() -> None:
    assert len(CORPUS) >= 50
    assert len({c.name for c in CORPUS}) == len(CORPUS)
    assert sum(c.rejected is not None for c in CORPUS) >= 10 and sum(c.kind == "telemetry" for c in CORPUS) >= 10


def test_hostile_corpus(any_store, corpus_dir) -> None:
    """Every file of the corpus, with its whole expected answer, on this backend."""
    failures = {}
    for case in CORPUS:
        got = _run(any_store, corpus_dir, case)
        problems = _problems(case, got, corpus_dir / case.name)
        if not problems and case.check is not None and got["rejected"] is None:
            try:
                case.check(any_store, _domain(case))
            except AssertionError as exc:
                problems = [f"check failed: {exc}"]
        if problems:
            failures[case.name] = problems
    assert not failures, "\n".join(f"{name}: {'; '.join(p)}" for name, p in failures.items())


def test_both_backends_store_the_same(store, pg_store, corpus_dir) -> None:
    """Row for row: the same quarantine (line, reason, raw_json) and the same stored rows on SQLite and PostgreSQL."""
    differ = []
    for case in CORPUS:
        a, b = _run(store, corpus_dir, case), _run(pg_store, corpus_dir, case)
        if a["rejected"] != b["rejected"] or a["quarantine"] != b["quarantine"]:
            differ.append(f"{case.name}: quarantine/rejection differ")
            continue
        try:
            pd.testing.assert_frame_equal(a["rows"], b["rows"], check_dtype=False, check_exact=False)
        except AssertionError as exc:
            differ.append(f"{case.name}: rows differ: {str(exc).splitlines()[0]}")
    assert not differ, "\n".join(differ)


def test_ignored_columns_and_duplicates_are_reported(store, corpus_dir) -> None:
    case = next(c for c in CORPUS if c.name == "duplicate_ids.csv")
    report = ingest_file(store, "trades", corpus_dir / case.name, "dups")
    assert report.duplicates_in_file == 2 and "repeated a key later in the file" in report.summary()
    assert report.as_metadata()["duplicates_in_file"] == 2
    case = next(c for c in CORPUS if c.name == "odd_columns.csv")
    report = ingest_file(store, "trades", corpus_dir / case.name, "odd")
    assert "ignored columns: " in report.summary() and "weird\\x01name" in report.summary()
    assert store.read("trade_scope", domain="odd")[["key", "value"]].values.tolist() == [["ok", "eu"]]
    assert store.read("trade_metrics", domain="odd")[["metric", "value"]].values.tolist() == [["ok", 2.5]]


# ---------------------------------------------------------------------------
# property: a mutated valid file never loses a row the mutations did not touch
# ---------------------------------------------------------------------------

P_HEADER = "trade_id,closed_at,regime,strategy_id,return_r,patterns,scope.chain,metric.m\n"


@st.composite
def valid_trades(draw) -> tuple[list[str], list[dict]]:
    """5-30 valid rows; fixed-width ids (one deleted or inserted character never makes another row's id)."""
    n = draw(st.integers(5, 30))
    rows, blocks = [], []
    for i in range(n):
        row = {"trade_id": f"t{i:04d}", "closed_at": f"2026-06-01T10:{i // 60:02d}:{i % 60:02d}Z",
               "regime": draw(st.sampled_from(["S0", "S1", "S2"])),
               "strategy_id": draw(st.sampled_from(["alpha", "beta", "al,pha"])),
               "return_r": repr(draw(st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 6)))),
               "patterns": draw(st.sampled_from(["A.x", "A.x|B.y", "C.z|D.w"])),
               "scope.chain": draw(st.sampled_from(["solana", "eth", ""])),
               "metric.m": draw(st.sampled_from(["1.5", "", "-0.25"]))}
        cells = [f'"{v}"' if "," in v else v for v in row.values()]
        rows.append(row)
        blocks.append(",".join(cells) + "\n")
    return blocks, rows


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["delete", "insert_byte", "duplicate_line", "drop_delimiter", "insert_quote"]),
              st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    min_size=1, max_size=3)


def mutate(blocks: list[str], mutations: list[tuple[str, float, int]]) -> tuple[bytes, set[int], dict[int, int]]:
    """Apply the mutations; returns the bytes, the touched blocks (-1 = the header) and block -> original row.

    Each byte remembers the block it belongs to. A deleted line end touches the next block
    too (the two lines merge). With two or more quote events (a quote inserted or deleted),
    every block between the first and the last is touched: two stray quotes can make a
    legitimate quoted field over several lines, which no parser could tell apart.
    """
    data = bytearray(P_HEADER.encode())
    owner = [-1] * len(data)
    row_of: dict[int, int] = {}
    for b, block in enumerate(blocks):
        raw = block.encode()
        data += raw
        owner += [b] * len(raw)
        row_of[b] = b
    touched: set[int] = set()
    quote_blocks: list[int] = []
    next_block = len(blocks)
    for kind, where, byte in mutations:
        if kind == "duplicate_line" and blocks:
            b = int(where * len(blocks))
            positions = [i for i, o in enumerate(owner) if o == b]
            if not positions:
                continue
            end = positions[-1] + 1
            copy = bytes(data[positions[0]:end])
            data[end:end] = copy
            owner[end:end] = [next_block] * len(copy)
            row_of[next_block] = row_of[b]
            next_block += 1
        elif kind in ("delete", "drop_delimiter"):
            candidates = (range(len(data)) if kind == "delete"
                          else [i for i, c in enumerate(data) if c == ord(",")])
            if not candidates:
                continue
            pos = candidates[int(where * len(candidates))]
            touched.add(owner[pos])
            if data[pos] == ord("\n") and pos + 1 < len(owner):
                touched.add(owner[pos + 1])
            if data[pos] == ord('"'):
                quote_blocks.append(owner[pos])
            del data[pos]
            del owner[pos]
        else:  # insert a byte or a quote before position pos
            pos = int(where * (len(data) + 1))
            value = ord('"') if kind == "insert_quote" else byte
            o = owner[pos] if pos < len(owner) else owner[-1]
            data[pos:pos] = bytes([value])
            owner[pos:pos] = [o]
            touched.add(o)
            if value == ord('"'):
                quote_blocks.append(o)
    if len(quote_blocks) >= 2:
        order = list(dict.fromkeys(owner))  # blocks in file order
        at = [order.index(b) for b in quote_blocks if b in order]
        if at:
            touched.update(order[min(at):max(at) + 1])
    return bytes(data), touched, row_of


@pytest.fixture(scope="module")
def property_store(tmp_path_factory) -> tuple[MetaStore, Path]:
    folder = tmp_path_factory.mktemp("mutated")
    return MetaStore(db_url=f"sqlite:///{folder / 'p.db'}"), folder


_example = iter(range(10**9))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(valid=valid_trades(), mutations=MUTATIONS)
def test_mutated_files_never_lose_an_untouched_row(property_store, valid, mutations) -> None:
    store, folder = property_store
    blocks, rows = valid
    data, touched, row_of = mutate(blocks, mutations)
    domain = f"p{next(_example)}"
    path = folder / f"{domain}.csv"
    path.write_bytes(data)
    try:
        report = ingest_file(store, "trades", path, domain)
    except ContractError as exc:
        assert -1 in touched, f"rejected although the header is intact: {exc}"
        return
    assert report.rows_read >= report.ingested
    if -1 in touched:
        return  # a damaged header: the columns themselves moved, nothing is promised
    stored = store.read("trades", domain=domain).set_index("trade_id")
    copies: dict[int, list[int]] = {}
    for block, row in row_of.items():
        copies.setdefault(row, []).append(block)
    for row, blocks_of_row in copies.items():
        if any(b in touched for b in blocks_of_row):
            continue
        want = rows[row]
        assert want["trade_id"] in stored.index, f"untouched row {want['trade_id']} lost; file:\n{data!r}"
        got = stored.loc[want["trade_id"]]
        assert (got["regime"], got["strategy_id"]) == (want["regime"], want["strategy_id"])
        assert got["return_r"] == float(want["return_r"])
        assert got["closed_at"] == pd.Timestamp(want["closed_at"])
    q = store.read("quarantine", domain=domain)
    assert all(isinstance(json.loads(r), dict) for r in q["raw_json"])
    assert (q["line"] >= 1).all()
