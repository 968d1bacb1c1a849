"""Generic feedback (any model): the cycle figures by hand, ingest with quarantine through the CLI,
and the whole loop — CLI ingest -> feedback_cycles_generic -> retrain_sensor — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from meta_pipeline.cli import main as cli_main
from meta_pipeline.contracts import ContractError, feedback_ids, validate_task
from meta_pipeline.defs.feedback_generic.assets import feedback_cycle_within_thresholds, feedback_cycles_generic
from meta_pipeline.defs.feedback_generic.sensors import feedback_sensor, retrain_sensor
from meta_pipeline.defs.resources import task_partitions
from meta_pipeline.ingest import ingest_file
from meta_pipeline.learning import feedback_generic as fg
from meta_pipeline.store import MetaStore

T0 = pd.Timestamp("2026-03-01T00:00:00Z")


def _frame(rows: list[tuple[str, str, float]], version: str | None = None, start: int = 0) -> pd.DataFrame:
    """(input, output, score) rows, one minute apart from T0 + start minutes."""
    return pd.DataFrame({
        "feedback_id": [f"{start + i:06d}" for i in range(len(rows))],
        "ts": [T0 + pd.Timedelta(minutes=start + i) for i in range(len(rows))],
        "input": [r[0] for r in rows], "output": [r[1] for r in rows], "score": [r[2] for r in rows],
        "model_version": version,
    })


# ---------------------------------------------------------------------------
# The figures, by hand
# ---------------------------------------------------------------------------

CYCLE_1 = [("Hello, world!", "Hi", 1.0), ("hello   world", "hi!", 0.8), ("Bye.", "Bye", 0.6), ("bye", "ciao", 0.6)]
CYCLE_2 = [("a", "hi", 0.2), ("b", "HI", 0.4), ("c", "hi", 0.3), ("a", "hi.", 0.5)]
CYCLE_3 = [("x", "bye", 0.9), ("y", "hi", 0.7)]  # partial


def test_near_identical_text() -> None:
    assert fg.normalize_text("Hello,  World!\n") == "hello world" == fg.normalize_text("hello world")
    assert fg.normalize_text("ＡＢＣ_d") == "abcd"  # NFKC folds full-width letters; underscores go
    assert fg.normalize_text("2 + 2") != fg.normalize_text("2+2")  # symbols are removed, not spaced


def test_cycle_figures_against_hand_computations() -> None:
    cycles = fg.feedback_cycles_generic(_frame(CYCLE_1 + CYCLE_2 + CYCLE_3), cycle_size=4)
    assert list(cycles["cycle"]) == [1, 2, 3] and list(cycles["n"]) == [4, 4, 2]
    assert list(cycles["complete"]) == [True, True, False]
    assert (cycles["output_basis"] == "label").all()
    c1, c2, c3 = (cycles.iloc[i] for i in range(3))

    # mean score and its 95% t-interval: cycle 1 = (1.0, 0.8, 0.6, 0.6)
    mean = 0.75
    sd = math.sqrt(((0.25) ** 2 + 0.05 ** 2 + 2 * 0.15 ** 2) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) * sd / sqrt(4)
    assert c1["mean_score"] == pytest.approx(mean)
    assert c1["score_sd"] == pytest.approx(sd)
    assert (c1["score_ci_low"], c1["score_ci_high"]) == pytest.approx((mean - half, min(1.0, mean + half)))
    assert not c1["below_threshold"] and c1["reference_cycle"] == 1 and pd.isna(c1["output_drift"])
    # cycle 2 = (0.2, 0.4, 0.3, 0.5): mean 0.35 < 0.7; the interval is clipped at 0
    assert c2["mean_score"] == pytest.approx(0.35) and c2["below_threshold"]
    assert c2["score_ci_low"] == pytest.approx(max(0.0, 0.35 - 3.182446305284263 * np.std([.2, .4, .3, .5], ddof=1) / 2))

    # score drift of cycle 2 vs cycle 1: shift, pooled d, Welch's t and df by hand
    a, b = np.array([.2, .4, .3, .5]), np.array([1.0, .8, .6, .6])
    va, vb = a.var(ddof=1), b.var(ddof=1)
    se = math.sqrt(va / 4 + vb / 4)
    t = (a.mean() - b.mean()) / se
    df = (va / 4 + vb / 4) ** 2 / ((va / 4) ** 2 / 3 + (vb / 4) ** 2 / 3)
    assert c2["score_shift"] == pytest.approx(-0.4)
    assert c2["score_drift"] == pytest.approx(-0.4 / math.sqrt((va + vb) / 2))
    assert c2["score_drift_p"] == pytest.approx(2 * stats.t.sf(abs(t), df))

    # output drift: normalized outputs cycle 1 = {hi: 2, bye: 1, ciao: 1}, cycle 2 = {hi: 4}
    # M = {hi: .75, bye: .125, ciao: .125}; KL(P||M) = .5·log2(.5/.75) + 2·.25·log2(2); KL(Q||M) = log2(4/3)
    jsd = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5) + 0.5 * math.log2(4 / 3)
    assert c2["output_drift"] == pytest.approx(jsd) == pytest.approx(0.311278, abs=1e-6)
    assert c2["output_tv"] == pytest.approx(0.5)
    assert c2["drifted"]  # JSD 0.31 > 0.1
    assert c2["retrain_due"] and "mean score 0.350 < 0.700" in c2["breaks"] and "JSD 0.311" in c2["breaks"]

    # coherence: cycle 1 has two near-identical input pairs (hello world: hi/hi agree; bye: bye/ciao differ)
    assert (c1["coherence"], c1["coherence_pairs"]) == (0.5, 2)
    assert (c2["coherence"], c2["coherence_pairs"]) == (1.0, 1)  # "a" twice: "hi" and "hi." agree
    assert pd.isna(c3["coherence"]) and c3["coherence_pairs"] == 0
    # a partial cycle gets its figures but is never due
    assert c3["reference_cycle"] == 1 and not c3["retrain_due"]


def test_coherence_on_a_hand_made_set() -> None:
    inputs = pd.Series(["Q1", "q1!", "Q1 ", "q2", "Q2", "q3"])
    outputs = pd.Series(["A", "a", "b", "c", "c", "z"])
    # q1: 3 rows -> 3 pairs, outputs a,a,b -> 1 agreeing pair; q2: 1 pair, agreeing; q3: no pair
    agreement, pairs = fg.coherence(fg.normalize_texts(inputs), fg.normalize_texts(outputs))
    assert (agreement, pairs) == (pytest.approx(2 / 4), 4)


def test_token_distribution_and_vocabulary_cap() -> None:
    ref = fg.normalize_texts(pd.Series(["the cat sat", "the cat ran", "a dog"]))
    cur = fg.normalize_texts(pd.Series(["the dog sat", "a bird"]))
    vocab = fg.token_vocabulary(ref, size=2)
    assert vocab == {"cat", "the"}  # counts 2, 2; the rest (a, dog, ran, sat) pooled
    p = fg.output_distribution(cur, "token", vocab)
    q = fg.output_distribution(ref, "token", vocab)
    assert p.to_dict() == {"the": 1, fg.OTHER: 4} and q.to_dict() == {"the": 2, "cat": 2, fg.OTHER: 4}
    # by hand: P = (the .2, cat 0, other .8), Q = (.25, .25, .5)
    pv, qv = np.array([.2, 0, .8]), np.array([.25, .25, .5])
    m = (pv + qv) / 2
    kl = lambda x: sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m) if xi > 0)  # noqa: E731
    assert fg.jensen_shannon(p, q) == pytest.approx(0.5 * kl(pv) + 0.5 * kl(qv))
    assert fg.total_variation(p, q) == pytest.approx(0.5 * (0.05 + 0.25 + 0.3))
    assert fg.jensen_shannon(q, q) == 0.0


def test_score_drift_counts_only_a_fall() -> None:
    rng = np.random.default_rng(3)
    base = [("q", "ok", float(s)) for s in rng.uniform(0.75, 0.85, 50)]
    up = [("q", "ok", float(s)) for s in rng.uniform(0.90, 1.00, 50)]
    down = [("q", "ok", float(s)) for s in rng.uniform(0.70, 0.78, 50)]
    cycles = fg.feedback_cycles_generic(_frame(base + up + down), cycle_size=50)
    rise, fall = cycles.iloc[1], cycles.iloc[2]
    assert rise["score_drift_p"] < 0.01 and rise["score_shift"] > 0 and not rise["drifted"]
    assert fall["score_drift_p"] < 0.01 and fall["score_shift"] < 0 and fall["drifted"]
    assert not fall["below_threshold"] and fall["retrain_due"] and "score fell" in fall["breaks"]
    assert (cycles["output_drift"].iloc[1:] == 0).all()  # the same single label throughout


def test_cycles_never_span_model_versions_and_drift_is_per_version() -> None:
    v1 = _frame([("q", "yes", 0.9)] * 4, version="v1")
    v2 = _frame([("q", "no", 0.9)] * 6, version="v2", start=2)  # interleaves with v1 in time
    cycles = fg.feedback_cycles_generic(pd.concat([v1, v2], ignore_index=True), cycle_size=4)
    assert list(zip(cycles["model_version"], cycles["n"], cycles["reference_cycle"])) == [
        ("v1", 4, 1), ("v2", 4, 2), ("v2", 2, 2)]
    # v2's outputs differ from v1's, but a new version is a new baseline: no drift
    assert cycles["output_drift"].iloc[2] == 0 and not cycles["drifted"].any()


def test_constant_scores_and_basis_choice() -> None:
    assert fg.score_drift(np.ones(5), np.ones(5)) == (0.0, 0.0, 1.0)
    shift, d, p = fg.score_drift(np.zeros(5), np.ones(5))
    assert shift == -1.0 and pd.isna(d) and p == 0.0
    assert fg.choose_basis(pd.Series([f"w{i}" for i in range(51)])) == "token"
    assert fg.choose_basis(pd.Series(["a", "b"] * 100)) == "label"
    with pytest.raises(ValueError, match="output basis"):
        fg.choose_basis(pd.Series(["a"]), "words")


def test_task_names_follow_the_domain_rule() -> None:
    assert validate_task("qa-bot_2") == "qa-bot_2"
    for bad in ("", "QA", "../x", "a;drop", "x" * 64, None):
        with pytest.raises(ContractError, match="invalid task name"):
            validate_task(bad)


# ---------------------------------------------------------------------------
# Ingest: quarantine, keys, CLI exit codes
# ---------------------------------------------------------------------------

HEADER = "ts,input,output,score,model_version,metadata.user,extra\n"
BAD_FILE = HEADER + "\n".join([
    "2026-03-01T10:00:00Z,What is 2+2?,4,1.0,v1,alice,zzz",  # 2 good
    "not-a-time,What is 2+2?,4,1.0,v1,,",  # 3 unparsable ts
    "2026-03-01T10:01:00Z,Capital of France?,Paris,1.5,v1,,",  # 4 score outside [0, 1]
    "2026-03-01T10:02:00Z,Capital of France?,,0.5,v1,,",  # 5 empty output
    "2026-03-01T10:03:00Z,,Paris,0.5,v1,,",  # 6 empty input
    "2026-03-01T10:04:00Z,Capital of Spain?,Madrid,nan,v1,,",  # 7 score not finite
    "2026-03-01T12:05:00+02:00,Capital of Italy?,Rome,0.25,,bob,",  # 8 good (10:05 UTC), no version
    "2026-03-01T10:05:00Z,Capital of Italy?,Roma,0.75,v2,,",  # 9 good: same (ts, input) as line 8 -> kept
]) + "\n"


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cli_quarantines_bad_rows_with_lines_and_reasons(tmp_path: Path, any_store: MetaStore, cli_env: Path,
                                                         capsys) -> None:
    path = _write(tmp_path, "fb.csv", BAD_FILE)
    assert cli_main(["ingest", "feedback", str(path), "--task", "qa", "--db-url", any_store.db_url]) == 0
    out = capsys.readouterr().out
    assert "-> task qa: read 8, ingested 2 (0 replaced existing), quarantined 6" in out
    assert "registered new task partition 'qa'" in out
    q = any_store.read("quarantine", order_by="line")
    assert set(q["kind"]) == {"feedback"} and set(q["domain"]) == {"qa"}
    reasons = dict(zip(q["line"], q["reason"]))
    assert list(reasons) == [3, 4, 5, 6, 7, 8]
    assert reasons[3] == "unparsable ts"
    assert reasons[4] == "score outside [0, 1]"
    assert reasons[5] == "empty output"
    assert reasons[6] == "empty input"
    assert reasons[7] == "score is not a finite number"
    assert reasons[8] == "(ts, input) repeated later in the same file (later row kept)"
    assert json.loads(q.set_index("line").loc[4, "raw_json"])["score"] == "1.5"
    rows = any_store.read_feedback("qa").set_index("input")
    assert list(rows.index) == ["What is 2+2?", "Capital of Italy?"]
    assert rows.loc["Capital of Italy?", "output"] == "Roma" and rows.loc["Capital of Italy?", "model_version"] == "v2"
    assert json.loads(rows.loc["What is 2+2?", "metadata_json"]) == {"user": "alice"}
    assert rows.loc["Capital of Italy?", "ts"] == pd.Timestamp("2026-03-01T10:05:00Z")
    assert rows.loc["Capital of Italy?", "feedback_id"] == feedback_ids(
        pd.Series([pd.Timestamp("2026-03-01T10:05:00Z")]), pd.Series(["Capital of Italy?"]))[0]
    batches = any_store.read("ingest_batches")
    assert list(zip(batches["domain"], batches["kind"], batches["rows_ingested"])) == [("qa", "feedback", 2)]
    # the task's partition and the source asset's materialization are in the CLI's Dagster instance
    with dg.DagsterInstance.from_config(str(cli_env)) as instance:
        assert instance.get_dynamic_partitions("task") == ["qa"]
        assert instance.get_dynamic_partitions("domain") == []
        event = instance.get_latest_materialization_event(dg.AssetKey("feedback"))
        assert event is not None and event.asset_materialization.partition == "qa"


def test_reingest_replaces_by_ts_and_input(tmp_path: Path, any_store: MetaStore) -> None:
    first = _write(tmp_path, "a.csv", "ts,input,output,score\n2026-03-01T10:00:00Z,q1,a,0.5\n"
                                      "2026-03-01T10:01:00Z,q2,b,0.5\n")
    second = _write(tmp_path, "b.jsonl", "\n".join([
        json.dumps({"ts": "2026-03-01T11:00:00+01:00", "input": "q1", "output": {"label": "A"}, "score": 1,
                    "metadata": {"user": "carol", "n": 3}}),  # same (ts, input) as q1 above
        "{broken",
        json.dumps({"ts": "2026-03-01T10:02:00Z", "input": "q3", "output": 7, "score": 0.25, "metadata": "x"}),
    ]) + "\n")
    ingest_file(any_store, "feedback", first, "qa")
    report = ingest_file(any_store, "feedback", second, "qa")
    assert (report.rows_read, report.ingested, report.replaced, report.quarantined) == (3, 1, 1, 2)
    rows = any_store.read_feedback("qa").set_index("input")
    assert sorted(rows.index) == ["q1", "q2"] and rows.loc["q1", "score"] == 1.0
    assert rows.loc["q1", "output"] == '{"label": "A"}'
    assert json.loads(rows.loc["q1", "metadata_json"]) == {"n": 3, "user": "carol"}
    q = any_store.read("quarantine", order_by="line")
    assert list(zip(q["line"], q["reason"])) == [(2, q["reason"].iloc[0]), (3, "metadata is not a JSON object")]
    assert q["reason"].iloc[0].startswith("unparsable JSON")
    # another task with the same rows is another partition
    ingest_file(any_store, "feedback", first, "other")
    assert any_store.count("feedback", equals={"task": "qa"}) == 2
    assert any_store.count("feedback", equals={"task": "other"}) == 2


def test_cli_exit_codes_and_argument_rules(tmp_path: Path, sqlite_url: str, cli_env: Path, capsys) -> None:
    good = _write(tmp_path, "good.csv", "ts,input,output,score\n2026-03-01T10:00:00Z,q,a,0.5\n")
    all_bad = _write(tmp_path, "bad.csv", "ts,input,output,score\nnever,q,a,0.5\n")
    missing = _write(tmp_path, "missing.csv", "ts,input,score\n2026-03-01T10:00:00Z,q,0.5\n")
    trades = _write(tmp_path, "t.csv", "trade_id,closed_at,regime,return_r,patterns\nt1,2026-06-01T10:00:00Z,S0,0.5,A.x\n")
    db = ["--db-url", sqlite_url]
    assert cli_main(["ingest", "feedback", str(good), "--task", "qa", *db]) == 0
    assert cli_main(["ingest", "feedback", str(all_bad), "--task", "qa", *db]) == 1
    capsys.readouterr()
    assert cli_main(["ingest", "feedback", str(missing), "--task", "qa", *db]) == 2
    assert "missing required column(s): output" in capsys.readouterr().err
    assert cli_main(["ingest", "feedback", str(good), *db]) == 2  # no --task
    assert capsys.readouterr().err.strip() == "error: ingest feedback needs --task NAME (the model whose outputs were rated)"
    assert cli_main(["ingest", "feedback", str(good), "--domain", "d1", *db]) == 2
    assert "--domain does not apply to feedback" in capsys.readouterr().err
    assert cli_main(["ingest", "trades", str(trades), "--domain", "d1", "--task", "qa", *db]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--task applies to feedback only" in err
    assert cli_main(["ingest", "trades", str(trades), *db]) == 2
    assert "needs --domain" in capsys.readouterr().err
    for hostile in ("../x", "a;drop", "", "X" * 64):
        assert cli_main(["ingest", "feedback", str(good), "--task", hostile, *db]) == 2
        assert "invalid task name" in capsys.readouterr().err
    assert cli_main(["ingest", "trades", str(trades), "--domain", "d1", *db]) == 0  # trades are unchanged
    store = MetaStore(db_url=sqlite_url)
    assert store.count("feedback") == 1 and store.count("trades") == 1
    with dg.DagsterInstance.from_config(str(cli_env)) as instance:
        assert instance.get_dynamic_partitions("task") == ["qa"]
        assert instance.get_dynamic_partitions("domain") == ["d1"]


def test_store_rules_for_task_partitions(any_store: MetaStore) -> None:
    with pytest.raises(ValueError, match="not partitioned by task"):
        any_store.replace_task_partition("trades", "qa", pd.DataFrame())
    with pytest.raises(ValueError, match="append-only"):
        any_store.replace_task_partition("quarantine", "qa", pd.DataFrame())
    with pytest.raises(ContractError):
        any_store.read_feedback("Bad Name")
    cycles = fg.feedback_cycles_generic(_frame(CYCLE_1 + CYCLE_2 + CYCLE_3), cycle_size=4)
    now = pd.Timestamp("2026-03-02T00:00:00Z")
    any_store.write_feedback_cycles_generic("qa", cycles.assign(computed_at=now))
    assert list(any_store.pending_retrains()["cycle"]) == [2]
    assert any_store.mark_retrain_requested("qa", [2, 3], "k1", now) == 1  # 3 is partial: never marked
    assert any_store.mark_retrain_requested("qa", [2], "k2", now) == 0  # already requested
    assert any_store.pending_retrains().empty
    # recomputed with the same cycles: the request survives; with another cycle size it is another cycle
    any_store.write_feedback_cycles_generic("qa", cycles.assign(computed_at=now))
    stored = any_store.read_feedback_cycles_generic("qa").set_index("cycle")
    assert stored.loc[2, "retrain_requested"] and stored.loc[2, "retrain_run_key"] == "k1"
    assert stored.loc[2, "retrain_requested_at"] == now and not stored.loc[1, "retrain_requested"]
    other = fg.feedback_cycles_generic(_frame(CYCLE_1 + CYCLE_2 + CYCLE_3), cycle_size=5)
    any_store.write_feedback_cycles_generic("qa", other.assign(computed_at=now))
    assert not any_store.read_feedback_cycles_generic("qa")["retrain_requested"].any()


# ---------------------------------------------------------------------------
# End to end: CLI -> asset -> sensors
# ---------------------------------------------------------------------------


def _stream_file(tmp_path: Path) -> Path:
    """Three complete cycles of 20 ratings and a partial one; cycle 3 degrades (scores and outputs)."""
    rng = np.random.default_rng(11)
    lines = ["ts,input,output,score,model_version"]
    for i in range(65):
        bad = 40 <= i < 60
        label = rng.choice(["refund", "escalate", "ignore"], p=[0.1, 0.2, 0.7] if bad else [0.7, 0.2, 0.1])
        score = rng.uniform(0.1, 0.5) if bad else rng.uniform(0.7, 1.0)
        ts = (T0 + pd.Timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"{ts},ticket {i % 7}: my order is late,{label},{score:.3f},v1")
    return _write(tmp_path, "stream.csv", "\n".join(lines) + "\n")


@dg.asset(partitions_def=task_partitions)
def prompt_evolution() -> None:
    """A stand-in for prompt evolution's asset (another issue builds the real one)."""


def test_end_to_end_cli_asset_and_sensors(tmp_path: Path, any_store: MetaStore, cli_env: Path,
                                          monkeypatch) -> None:
    monkeypatch.setenv("META_PIPELINE_DB_URL", any_store.db_url)
    assert cli_main(["ingest", "feedback", str(_stream_file(tmp_path)), "--task", "support-bot"]) == 0
    store = MetaStore()  # the URL from the environment, as the CLI used it
    assert store.count("feedback", equals={"task": "support-bot"}) == 65

    with dg.DagsterInstance.from_config(str(cli_env)) as instance:
        assert instance.get_dynamic_partitions("task") == ["support-bot"]
        # new feedback -> one run of the task's cycles, once
        tick = feedback_sensor(dg.build_sensor_context(instance=instance, resources={"store": store}))
        assert [r.partition_key for r in tick.run_requests] == ["support-bot"]
        assert tick.run_requests[0].run_key.startswith("feedback:support-bot:")
        again = feedback_sensor(dg.build_sensor_context(instance=instance, resources={"store": store},
                                                        cursor=tick.cursor))
        assert again.run_requests == []

        result = dg.materialize(
            [feedback_cycles_generic, feedback_cycle_within_thresholds], partition_key="support-bot",
            instance=instance, resources={"store": store},
            run_config={"ops": {"feedback_cycles_generic": {"config": {"cycle_size": 20}}}},
        )
        assert result.success
        meta = result.asset_materializations_for_node("feedback_cycles_generic")[0].metadata
        assert meta["dagster/row_count"].value == 4 and meta["complete_cycles"].value == 3
        assert meta["newest_complete_cycle"].value == 3 and "score_and_drift" in meta and "cycles" in meta
        check = result.get_asset_check_evaluations()[0]
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        cycles = store.read_feedback_cycles_generic("support-bot").set_index("cycle")
        assert list(cycles["retrain_due"]) == [False, False, True, False]
        assert cycles.loc[3, "below_threshold"] and cycles.loc[3, "drifted"]
        assert cycles.loc[3, "output_drift"] > 0.1 and cycles.loc[2, "output_drift"] < 0.1
        assert cycles.loc[1, "coherence_pairs"] > 0  # 7 distinct tickets repeat within a cycle

        # no re-training asset in the code location: a skip that names the request, nothing recorded
        # (the real code location has prompt_evolution: test_prompt_assets.py checks it is targeted)
        without_retraining = dg.Definitions(sensors=[retrain_sensor], resources={"store": store})
        ctx = dg.build_sensor_context(instance=instance, resources={"store": store}, definitions=without_retraining)
        skipped = retrain_sensor(ctx)
        assert not skipped.run_requests
        message = skipped.skip_reason.skip_message
        assert "1 re-training request(s) pending" in message and "'prompt_evolution'" in message
        assert "task 'support-bot' cycle 3 (mean score" in message and "JSD" in message
        assert len(store.pending_retrains()) == 1

        # a code location with prompt_evolution partitioned by task: one request, exactly once
        with_retraining = dg.Definitions(assets=[prompt_evolution], sensors=[retrain_sensor],
                                         resources={"store": store})
        last_ts = cycles.loc[3, "last_ts"].strftime("%Y%m%dT%H%M%S%f")
        evaluations = []
        cursor = None
        for _ in range(3):
            ctx = dg.build_sensor_context(instance=instance, definitions=with_retraining, cursor=cursor,
                                          resources={"store": store})
            with dg.partition_loading_context(dynamic_partitions_store=instance):
                data = retrain_sensor.evaluate_tick(ctx)
            evaluations.append(data)
            cursor = data.cursor
        first, second, third = evaluations
        assert [r.run_key for r in first.run_requests] == [f"retrain:support-bot:3:{last_ts}"]
        request = first.run_requests[0]
        assert request.partition_key == "support-bot" and request.asset_selection == [dg.AssetKey("prompt_evolution")]
        assert request.tags["meta_pipeline/feedback_cycles"] == "3"
        assert second.run_requests == [] and third.run_requests == []
        stored = store.read_feedback_cycles_generic("support-bot").set_index("cycle")
        assert stored.loc[3, "retrain_requested"] and stored.loc[3, "retrain_run_key"] == request.run_key
        assert store.pending_retrains().empty

        # recomputing the cycles keeps the answered request: still nothing new to send
        assert dg.materialize([feedback_cycles_generic], partition_key="support-bot", instance=instance,
                              resources={"store": store},
                              run_config={"ops": {"feedback_cycles_generic": {"config": {"cycle_size": 20}}}}).success
        assert store.read_feedback_cycles_generic("support-bot").set_index("cycle").loc[3, "retrain_requested"]
        ctx = dg.build_sensor_context(instance=instance, definitions=with_retraining, cursor=cursor,
                                      resources={"store": store})
        assert retrain_sensor(ctx).run_requests == []


def test_feedback_asset_ingests_configured_files_and_the_job_runs(tmp_path: Path, store: MetaStore) -> None:
    from meta_pipeline.commands.orchestration import with_store
    from meta_pipeline.definitions import defs

    path = _write(tmp_path, "fb.csv", BAD_FILE)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("task", ["qa"])
        job = with_store(defs, store).resolve_job_def("feedback_generic_job")
        assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"feedback",
                                                                                     "feedback_cycles_generic"}
        result = job.execute_in_process(
            partition_key="qa", instance=instance,
            run_config={"ops": {"feedback": {"config": {"files": [str(path)]}},
                                "feedback_cycles_generic": {"config": {"cycle_size": 2}}}})
        assert result.success
        meta = result.asset_materializations_for_node("feedback")[0].metadata
        assert (meta["dagster/row_count"].value, meta["ingested_this_run"].value,
                meta["quarantined_this_run"].value, meta["quarantined_total"].value) == (2, 2, 6, 6)
        assert [e.check_name for e in result.get_asset_check_evaluations()] == ["feedback_cycle_within_thresholds"]
        # a file rejected whole fails the run and says why
        missing = _write(tmp_path, "missing.csv", "ts,input\n2026-03-01T10:00:00Z,q\n")
        failed = job.execute_in_process(partition_key="qa", instance=instance, raise_on_error=False,
                                        run_config={"ops": {"feedback": {"config": {"files": [str(missing)]}}}})
        assert not failed.success
    cycles = store.read_feedback_cycles_generic("qa")
    # the two ratings are of two model versions (v1; v2): one partial cycle each, nothing due
    assert list(cycles["model_version"]) == ["v1", "v2"] and not cycles["retrain_due"].any()
