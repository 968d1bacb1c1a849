"""Inbox isolation: a bad file never poisons its batch or later ones; misplaced files and symlinks are
refused visibly, never read; the data sensors downstream decide from the data what is pending."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy.exc import OperationalError

import meta_pipeline.ingest as ingest_module
from meta_pipeline.defs.automation import BatchCursor, new_batches, new_telemetry_sensor, new_trades_sensor
from meta_pipeline.defs.ingest.assets import trades
from meta_pipeline.defs.ingest.sensors import inbox_run_requests
from meta_pipeline.ingest import (
    REASON_SUFFIX,
    InboxFile,
    ingest_file,
    ingest_inbox_file,
    scan_inbox,
    scan_inbox_entries,
)
from meta_pipeline.store import MetaStore

GOOD = "trade_id,closed_at,regime,return_r,patterns\n{p}1,2026-06-01T10:00:00Z,S0,0.5,A.x\n{p}2,2026-06-01T11:00:00Z,S1,0.1,A.x|B.y\n"
T0 = time.time() - 3600  # files dropped an hour ago, oldest first


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _drop(inbox: Path, rel: str, content: str | bytes, age_rank: int = 0) -> Path:
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    os.utime(path, (T0 + age_rank, T0 + age_rank))
    return path


def _tick(instance, store, inbox, **kw) -> dg.SensorResult:
    ctx = dg.build_sensor_context(instance=instance, resources={"store": store})
    return inbox_run_requests(ctx, store, inbox, **kw)


def _run(request: dg.RunRequest, store: MetaStore, instance) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("domain", [request.partition_key])
    return dg.materialize([trades], partition_key=request.partition_key, instance=instance,
                          resources={"store": store}, run_config=request.run_config, raise_on_error=False)


def _meta(result, node: str = "trades") -> dict:
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def _reason(moved: Path) -> str:
    text = moved.with_name(moved.name + REASON_SUFFIX).read_text()
    assert text.endswith("\n") and text.count("\n") == 1, f"reason file must be one line: {text!r}"
    return text.strip()


# ---------------------------------------------------------------------------
# A bad file in a batch
# ---------------------------------------------------------------------------

BAD_FILES = {  # rejected whole, whatever the reader makes of them
    "garbage.parquet": os.urandom(64),
    "empty.csv": b"",
    "nocols.csv": b"trade_id\nt1\n",
}


def test_a_bad_file_is_set_aside_and_the_rest_of_the_batch_lands(tmp_path: Path, any_store: MetaStore,
                                                                   instance) -> None:
    store = any_store  # SQLite and PostgreSQL
    inbox = tmp_path / "inbox"
    _drop(inbox, "dom/trades/good1.csv", GOOD.format(p="a"), 0)
    for rank, (name, content) in enumerate(BAD_FILES.items(), start=1):
        _drop(inbox, f"dom/trades/{name}", content, rank)
    _drop(inbox, "dom/trades/good2.csv", GOOD.format(p="b"), 9)

    (request,) = _tick(instance, store, inbox).run_requests
    assert len(request.run_config["ops"]["trades"]["config"]["files"]) == 5  # one batch, as before
    result = _run(request, store, instance)
    assert result.success, "one bad file must not fail the run"
    meta = _meta(result)
    assert meta["ingested_this_run"] == 4 and store.count("trades", "dom") == 4  # every good row landed
    assert meta["rejected_files_this_run"] == 3
    assert sorted(Path(r["file"]).name for r in meta["rejected_this_run"]) == sorted(BAD_FILES)

    folder = inbox / "dom" / "trades"
    assert sorted(p.name for p in (folder / "processed").iterdir()) == ["good1.csv", "good2.csv"]
    quarantine = store.read("quarantine")
    for name in BAD_FILES:
        moved = folder / "rejected" / name
        assert moved.exists() and not (folder / name).exists()
        reason = _reason(moved)
        row = quarantine[quarantine["source_file"] == str(folder / name)]
        assert len(row) == 1 and row["line"].iloc[0] == 0 and row["reason"].iloc[0] == reason
    assert "missing required column" in _reason(folder / "rejected" / "nocols.csv")

    # each rejection is logged in ingest_batches with 0 rows; the data sensors skip those rows
    batches = store.batches_after("trades", 0, None)
    rejected = batches[batches["rows_ingested"] == 0]
    assert sorted(Path(s).name for s in rejected["source"]) == sorted(BAD_FILES)
    assert (rejected["rows_quarantined"] == 1).all()
    assert sorted(Path(s).name for s in new_batches(store, "trades", BatchCursor())["source"]) == ["good1.csv", "good2.csv"]

    # nothing left behind: the next tick requests nothing, and a later good file is a batch of its own
    assert _tick(instance, store, inbox).run_requests == []
    _drop(inbox, "dom/trades/good3.csv", GOOD.format(p="c"), 20)
    (later,) = _tick(instance, store, inbox).run_requests
    assert [Path(f).name for f in later.run_config["ops"]["trades"]["config"]["files"]] == ["good3.csv"]
    assert _run(later, store, instance).success and store.count("trades", "dom") == 6


def test_a_batch_of_only_refused_files_fails_visibly_and_poisons_nothing(tmp_path: Path, store: MetaStore,
                                                                        instance) -> None:
    inbox = tmp_path / "inbox"
    _drop(inbox, "dom/trades/garbage.parquet", BAD_FILES["garbage.parquet"], 0)
    _drop(inbox, "dom/trades/empty.csv", b"", 1)
    (request,) = _tick(instance, store, inbox).run_requests
    result = _run(request, store, instance)
    assert not result.success  # nothing landed: the run says so, naming every file
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.step_failure_data.user_failure_data.description
    assert "garbage.parquet" in description and "empty.csv" in description
    assert sorted(p.name for p in (inbox / "dom" / "trades" / "rejected").iterdir()) == sorted(
        ["garbage.parquet", "empty.csv", "garbage.parquet" + REASON_SUFFIX, "empty.csv" + REASON_SUFFIX])
    assert len(store.read("quarantine")) == 2
    _drop(inbox, "dom/trades/good.csv", GOOD.format(p="a"), 5)
    (later,) = _tick(instance, store, inbox).run_requests
    assert [Path(f).name for f in later.run_config["ops"]["trades"]["config"]["files"]] == ["good.csv"]
    assert _run(later, store, instance).success and store.count("trades", "dom") == 2


def test_a_store_outage_leaves_the_file_in_place(tmp_path: Path, store: MetaStore, monkeypatch) -> None:
    path = _drop(tmp_path / "inbox", "dom/trades/good.csv", GOOD.format(p="a"))

    def down(*args, **kwargs):
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    monkeypatch.setattr(ingest_module, "ingest_file", down)
    st = path.stat()
    with pytest.raises(OperationalError):
        ingest_inbox_file(store, InboxFile("dom", "trades", path, st.st_size, st.st_mtime_ns))
    assert path.exists() and store.count("quarantine") == 0  # the store's fault, not the file's: retried later


def test_a_file_gone_before_its_run_is_skipped_not_failed(tmp_path: Path, store: MetaStore, instance) -> None:
    inbox = tmp_path / "inbox"
    good = _drop(inbox, "dom/trades/good.csv", GOOD.format(p="a"), 0)
    gone = _drop(inbox, "dom/trades/gone.csv", GOOD.format(p="b"), 1)
    (request,) = _tick(instance, store, inbox).run_requests
    gone.unlink()  # e.g. an earlier attempt of the same run already moved it
    result = _run(request, store, instance)
    assert result.success and _meta(result)["missing_files_this_run"] == [str(gone)]
    assert not good.exists() and store.count("trades", "dom") == 2


# ---------------------------------------------------------------------------
# Misplaced files, hidden files, symlinks
# ---------------------------------------------------------------------------

MISPLACED = {
    "a/b/trades/x.csv": "not a kind folder",  # too deep: b is not trades|telemetry
    "dom/t.csv": "directly in the domain folder",
    "dom/trades/x.txt": "unsupported file type",
    "dom/trades/.hidden.csv": "hidden file",
    "dom/trades/sub/y.csv": "subfolder",
    "top.csv": "directly in the inbox",
}


def test_misplaced_files_are_reported_then_moved_aside_with_a_reason(tmp_path: Path, store: MetaStore,
                                                                     instance) -> None:
    inbox = tmp_path / "inbox"
    for rel in MISPLACED:
        _drop(inbox, rel, GOOD.format(p="m"))
    for keep in (".gitkeep", "dom/trades/.gitkeep"):
        _drop(inbox, keep, "")
    assert scan_inbox(inbox) == []  # none of them is an inbox file
    found = {str(e.path.relative_to(inbox)): e.reason for e in scan_inbox_entries(inbox).misplaced}
    assert set(found) == set(MISPLACED)
    for rel, why in MISPLACED.items():
        assert why in found[rel], (rel, found[rel])

    # just written (an upload may still be in progress): named in the tick, not moved
    fresh = {rel: inbox / rel for rel in MISPLACED}
    for path in fresh.values():
        os.utime(path, None)
    tick = _tick(instance, store, inbox)
    assert tick.run_requests == [] and tick.skip_reason is not None
    for rel in MISPLACED:
        assert rel in tick.skip_reason.skip_message
    assert all(p.exists() for p in fresh.values()) and store.count("quarantine") == 0

    # once past the grace period: moved to <inbox>/rejected/<same path> with a reason file and a quarantine row
    tick = _tick(instance, store, inbox, misplaced_grace=0)
    assert tick.run_requests == [] and "refused" in tick.skip_reason.skip_message
    quarantine = store.read("quarantine")
    for rel, why in MISPLACED.items():
        moved = inbox / "rejected" / rel
        assert moved.exists() and not (inbox / rel).exists(), rel
        assert why in _reason(moved)
        assert (quarantine["source_file"] == str(inbox / rel)).sum() == 1
    assert (quarantine["line"] == 0).all() and store.count("trades") == 0  # never read
    assert (inbox / ".gitkeep").exists() and (inbox / "dom" / "trades" / ".gitkeep").exists()
    # and then quiet: nothing left to say
    again = _tick(instance, store, inbox, misplaced_grace=0)
    assert again.run_requests == [] and again.skip_reason is None


def test_symlinks_are_never_followed(tmp_path: Path, store: MetaStore, instance) -> None:
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside"
    secret = _drop(outside, "secret.csv", GOOD.format(p="s"))
    _drop(outside, "dir/trades/x.csv", GOOD.format(p="d"))
    (inbox / "dom" / "trades").mkdir(parents=True)
    (inbox / "dom" / "trades" / "link.csv").symlink_to(secret)  # a file link
    (inbox / "dom" / "trades" / "dangling.csv").symlink_to(tmp_path / "nowhere.csv")
    (inbox / "linked-dom").symlink_to(outside / "dir")  # a domain folder link
    (inbox / "dom2").mkdir()
    (inbox / "dom2" / "trades").symlink_to(outside / "dir" / "trades")  # a kind folder link

    assert scan_inbox(inbox) == []
    tick = _tick(instance, store, inbox)  # links are refused at once: no grace period
    assert tick.run_requests == []
    for rel in ("dom/trades/link.csv", "dom/trades/dangling.csv", "linked-dom", "dom2/trades"):
        moved = inbox / "rejected" / rel
        assert moved.is_symlink() and not os.path.lexists(inbox / rel), rel
        assert "symbolic link" in _reason(moved)
    assert secret.read_text() == GOOD.format(p="s") and (outside / "dir" / "trades" / "x.csv").exists()
    assert store.count("trades") == 0 and store.count("quarantine") == 4

    # a link named in run config (e.g. launched by hand) is refused by the run, not read through
    link = inbox / "dom" / "trades" / "again.csv"
    link.symlink_to(secret)
    result = _run(dg.RunRequest(partition_key="dom", run_config={
        "ops": {"trades": {"config": {"files": [str(link)]}}}}), store, instance)
    assert not result.success and store.count("trades") == 0
    assert (inbox / "dom" / "trades" / "rejected" / "again.csv").is_symlink() and secret.exists()


def test_file_names_that_are_not_utf8(tmp_path: Path, any_store: MetaStore, instance) -> None:
    """Names are bytes on POSIX: a non-UTF-8 name never crashes the sensor or the run; it is shown as \\xNN
    in quarantine, logs and reason files, and the other files of the batch land."""
    store = any_store
    inbox = tmp_path / "inbox"
    kind_dir = inbox / "dom" / "trades"
    kind_dir.mkdir(parents=True)
    names = {b"good.csv": GOOD.format(p="g").encode(), b"bad\xfe.parquet": os.urandom(64), b"odd\xfd.txt": b"x",
             b"named\xff.csv": GOOD.format(p="n").encode()}
    for name, content in names.items():
        path = Path(os.fsdecode(os.fsencode(kind_dir) + b"/" + name))
        path.write_bytes(content)
        os.utime(path, (T0, T0))
    (request,) = _tick(instance, store, inbox, misplaced_grace=0).run_requests
    result = _run(request, store, instance)
    assert result.success and store.count("trades", "dom") >= 2  # good.csv (and named\xff.csv once readable)
    shown = sorted(Path(s).name for s in store.read("quarantine")["source_file"])
    assert "bad\\xfe.parquet" in shown and "odd\\xfd.txt" in shown
    rejected = {Path(r["file"]).name for r in _meta(result)["rejected_this_run"]}
    assert "bad\\xfe.parquet" in rejected
    # every file went somewhere, with a readable one-line reason when refused
    assert not [p for p in kind_dir.iterdir() if p.is_file()]
    for folder in (kind_dir / "rejected", inbox / "rejected" / "dom" / "trades"):
        for path in folder.iterdir():
            if not path.name.endswith(REASON_SUFFIX):
                assert _reason(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_not_read(tmp_path: Path, store: MetaStore, instance) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "dom" / "trades").mkdir(parents=True)
    os.mkfifo(inbox / "dom" / "trades" / "pipe.csv")  # reading it would block the sensor forever
    os.utime(inbox / "dom" / "trades" / "pipe.csv", (T0, T0))
    tick = _tick(instance, store, inbox, misplaced_grace=0)
    assert tick.run_requests == [] and "not a regular file" in tick.skip_reason.skip_message
    assert "not a regular file" in _reason(inbox / "rejected" / "dom" / "trades" / "pipe.csv")


def test_an_invalid_domain_folder_gets_a_reason_file_too(tmp_path: Path, store: MetaStore, instance) -> None:
    inbox = tmp_path / "inbox"
    _drop(inbox, "Bad..Name/trades/x.csv", GOOD.format(p="x"))
    tick = _tick(instance, store, inbox)
    assert tick.run_requests == [] and "invalid domain name" in tick.skip_reason.skip_message
    assert "invalid domain name" in _reason(inbox / "Bad..Name" / "trades" / "rejected" / "x.csv")


# ---------------------------------------------------------------------------
# The data sensors decide from the data what is pending
# ---------------------------------------------------------------------------


def _sensor_tick(sensor, instance, store, cursor=None):
    return sensor(dg.build_sensor_context(instance=instance, resources={"store": store}, cursor=cursor))


def test_data_sensors_repeat_nothing_the_demo_did_and_miss_nothing_new(tmp_path: Path, store: MetaStore,
                                                                       instance) -> None:
    from meta_pipeline.commands.orchestration import load_defs, with_store
    from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_telemetry_file, write_trades_file

    fleet = generate_fleet(FleetConfig(n_domains=1, n_trades=400, telemetry_ticks=60, seed=5))
    data = fleet.domains["dom0"]
    half = len(data.train_trades) // 2
    first, rest = data.train_trades.iloc[:half], data.train_trades.iloc[half:]
    ingest_file(store, "trades", write_trades_file(first, tmp_path / "t1.csv"), "dom0")
    ingest_file(store, "telemetry", write_telemetry_file(data.telemetry.iloc[:30], tmp_path / "m1.csv"), "dom0")
    instance.add_dynamic_partitions("domain", ["dom0"])

    # before anything is materialized, a fresh cursor finds the batches pending
    assert [r.partition_key for r in _sensor_tick(new_trades_sensor, instance, store).run_requests] == ["dom0"]
    assert [r.partition_key for r in _sensor_tick(new_telemetry_sensor, instance, store).run_requests] == ["dom0"]

    # what `meta-pipeline demo` does: every per-domain asset, in process
    job = with_store(load_defs(), store).resolve_job_def("domain_refresh_job")
    assert job.execute_in_process(partition_key="dom0", instance=instance).success

    # the UI opens: the sensors start with no cursor and launch nothing the demo already did
    trades_tick = _sensor_tick(new_trades_sensor, instance, store)
    telemetry_tick = _sensor_tick(new_telemetry_sensor, instance, store)
    assert trades_tick.run_requests == [] and telemetry_tick.run_requests == []

    # a new batch afterwards: exactly one run, with a fresh cursor or with the previous one
    ingest_file(store, "trades", write_trades_file(rest, tmp_path / "t2.csv"), "dom0")
    with_cursor = _sensor_tick(new_trades_sensor, instance, store, trades_tick.cursor)
    lost_cursor = _sensor_tick(new_trades_sensor, instance, store)
    assert [r.partition_key for r in with_cursor.run_requests] == ["dom0"]
    assert [r.run_key for r in lost_cursor.run_requests] == [r.run_key for r in with_cursor.run_requests]
    assert _sensor_tick(new_trades_sensor, instance, store, with_cursor.cursor).run_requests == []  # requested once
    assert _sensor_tick(new_telemetry_sensor, instance, store, telemetry_tick.cursor).run_requests == []

    # a rejected inbox file (0 rows) is nothing to learn from
    bad = _drop(tmp_path / "inbox", "dom0/trades/garbage.parquet", os.urandom(64))
    st = bad.stat()
    with pytest.raises(ingest_module.InboxFileRejected):
        ingest_inbox_file(store, InboxFile("dom0", "trades", bad, st.st_size, st.st_mtime_ns))
    assert [r.run_key for r in _sensor_tick(new_trades_sensor, instance, store).run_requests] == [
        r.run_key for r in with_cursor.run_requests]

    # once that run (or any other) has learned from the batch, nothing is pending any more
    learn = with_store(load_defs(), store).resolve_job_def("learning_on_new_trades_job")
    assert learn.execute_in_process(partition_key="dom0", instance=instance).success
    assert _sensor_tick(new_trades_sensor, instance, store).run_requests == []
    settled = _sensor_tick(new_trades_sensor, instance, store, with_cursor.cursor)
    assert settled.run_requests == [] and '"pending": {}' in settled.cursor

    # telemetry likewise: one controller run for the new ticks
    ingest_file(store, "telemetry", write_telemetry_file(data.telemetry.iloc[30:], tmp_path / "m2.csv"), "dom0")
    assert [r.partition_key for r in _sensor_tick(new_telemetry_sensor, instance, store).run_requests] == ["dom0"]
