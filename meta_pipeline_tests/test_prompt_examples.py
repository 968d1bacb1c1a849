"""`meta-pipeline ingest examples FILE --task NAME`: the file contract, quarantine, replacement, the split,
the starting prompt as a versioned PROMPT_TEMPLATE config — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meta_pipeline.commands.data import cmd_ingest
from meta_pipeline.commands.prompts import cmd_prompts_init
from meta_pipeline.prompts.examples import ingest_examples_file, load_task, split_of
from meta_pipeline.prompts.runs import active_prompt, init_prompt
from meta_pipeline.store import prompts as prompt_rows

CSV = """example_id,input,expected,choices,metadata.source
q1,Where is milk kept?,A,A) a fridge|B) an oven,hand
q2,What cuts paper?,B,A) a spoon|B) scissors,
q3,,A,A) x|B) y,
q4,Where do cars sleep?,C,A) a garage|B) a shed,
q5,What is cold?,A,A ice|B) fire,
q6,Old text,A,A) one|B) two,
q6,New text,B,A) one|B) two,
q7,Is this nice?,positive,,
"""


def test_ingest_quarantines_bad_rows_and_replaces_ids(any_store, tmp_path: Path):
    path = tmp_path / "ex.csv"
    path.write_text(CSV, encoding="utf-8")
    report = ingest_examples_file(any_store, path, "qa")
    assert (report.rows_read, report.ingested, report.quarantined, report.duplicates_in_file) == (8, 4, 4, 1)
    assert "-> task qa" in report.summary()
    rows = prompt_rows.read_examples(any_store, "qa").set_index("example_id")
    assert sorted(rows.index) == ["q1", "q2", "q6", "q7"]
    assert rows.loc["q6", "input"] == "New text" and rows.loc["q6", "expected"] == "B"  # the later row kept
    assert json.loads(rows.loc["q1", "choices_json"]) == [{"label": "A", "text": "a fridge"},
                                                          {"label": "B", "text": "an oven"}]
    assert json.loads(rows.loc["q1", "metadata_json"]) == {"source": "hand"}
    assert rows["choices_json"].isna()["q7"]
    q = any_store.read("quarantine", equals={"kind": "examples"}, order_by="line")
    assert q["line"].tolist() == [4, 5, 6, 7]
    reasons = dict(zip(q["line"], q["reason"]))
    assert reasons[4] == "empty input"
    assert reasons[5] == "expected 'C' is not one of the choice labels"
    assert reasons[6] == "choice 'A ice' is not 'LABEL) text'"
    assert reasons[7] == "example_id repeated later in the same file (later row kept)"
    batches = any_store.read("ingest_batches", equals={"kind": "examples"})
    assert batches[["domain", "rows_ingested", "rows_quarantined"]].values.tolist() == [["qa", 4, 4]]
    # re-ingesting an id replaces it
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps({"example_id": "q1", "input": "Where is butter kept?", "expected": "B",
                                 "choices": ["A) an oven", "B) a fridge"]}) + "\n", encoding="utf-8")
    report = ingest_examples_file(any_store, again, "qa")
    assert (report.ingested, report.replaced) == (1, 1)
    rows = prompt_rows.read_examples(any_store, "qa").set_index("example_id")
    assert len(rows) == 4 and rows.loc["q1", "input"] == "Where is butter kept?"


def test_split_is_deterministic_and_by_id(store, tmp_path: Path):
    lines = ["example_id,input,expected"] + [f"e{i},text {i},{'yes' if i % 2 else 'no'}" for i in range(200)]
    (tmp_path / "e.csv").write_text("\n".join(lines) + "\n")
    ingest_examples_file(store, tmp_path / "e.csv", "yn")
    data = load_task(store, "yn")
    assert data.labels == ("no", "yes")
    for part, examples in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert all(split_of("yn", e.example_id, 0.4, 0.3) == part for e in examples)
    assert len(data.train) + len(data.val) + len(data.test) == 200
    assert 60 <= len(data.train) <= 100 and 40 <= len(data.val) <= 80
    # an added example does not move the others
    (tmp_path / "more.csv").write_text("example_id,input,expected\nnew1,more,yes\n")
    ingest_examples_file(store, tmp_path / "more.csv", "yn")
    after = load_task(store, "yn")
    assert {e.example_id for e in data.val} <= {e.example_id for e in after.val}


def test_cli_ingest_examples_and_prompts_init(store, tmp_path: Path, capsys):
    import argparse

    (tmp_path / "ex.csv").write_text(CSV)
    (tmp_path / "p.txt").write_text("Answer the question.\n\nThink step by step.\n")
    args = argparse.Namespace(kind="examples", file=str(tmp_path / "ex.csv"), domain=None, task="qa", no_dagster=True,
                              db_url=store.db_url, debug=False)
    assert cmd_ingest(args) == 0
    assert "ingested 4" in capsys.readouterr().out
    bad = argparse.Namespace(**{**vars(args), "task": "Bad Name"})
    assert cmd_ingest(bad) == 2
    assert "--task: invalid task name 'Bad Name'" in capsys.readouterr().err
    init = argparse.Namespace(task="qa", file=str(tmp_path / "p.txt"), by="alice", no_dagster=True,
                              db_url=store.db_url, debug=False)
    assert cmd_prompts_init(init) == 0
    assert "PROMPT_TEMPLATE version 1 is active (2 instruction lines: task, reasoning)" in capsys.readouterr().out
    assert cmd_prompts_init(init) == 0  # a second init is a new version
    version, spec, config = active_prompt(store, "qa")
    assert version == 2 and config == {"instructions": ["Answer the question.", "Think step by step."],
                                       "demonstrations": []}
    log = store.read("config_change_log", equals={"target_type": "PROMPT_TEMPLATE"}, order_by="id")
    assert log[["action", "actor"]].values.tolist() == [["set", "alice"], ["set", "alice"]]
    assert log["to_version"].tolist() == [1, 2] and log["from_version"].isna().tolist() == [True, False]
    assert int(log["from_version"].iloc[1]) == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert cmd_prompts_init(argparse.Namespace(**{**vars(init), "file": str(empty)})) == 2
    assert "the prompt file has no instruction line" in capsys.readouterr().err


def test_text_that_is_not_unicode_is_quarantined(any_store, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"example_id": "a", "input": "ok \\ud800", "expected": "x"}\n'
                    '{"example_id": "b", "input": "fine", "expected": "y", "choices": ["x) one \\udfff", "y) two"]}\n'
                    '{"example_id": "c", "input": "fine", "expected": "y"}\n', encoding="utf-8")
    report = ingest_examples_file(any_store, path, "qa")
    assert (report.ingested, report.quarantined) == (1, 2)
    q = any_store.read("quarantine", equals={"kind": "examples"}, order_by="line")
    assert q["line"].tolist() == [1, 2] and set(q["reason"]) == {"text that is not valid Unicode"}


def test_a_missing_column_rejects_the_file(store, tmp_path: Path):
    from meta_pipeline.contracts import ContractError

    (tmp_path / "x.csv").write_text("example_id,input\na,b\n")
    with pytest.raises(ContractError, match="missing required column.s. expected"):
        ingest_examples_file(store, tmp_path / "x.csv", "qa")
    with pytest.raises(ValueError, match="no examples"):
        load_task(store, "qa")
    with pytest.raises(Exception, match="no instruction line"):
        init_prompt(store, "qa", "")
