"""The hostile corpus through every door a file can come in by, on SQLite and PostgreSQL.

``test_ingest_hostile.py`` holds the corpus (70 files, one class of defect each) and checks
the ingest core against each file's whole expected answer. This module sends the same files
through the other surfaces a user meets:

* ``meta-pipeline ingest KIND FILE`` (the CLI, in process): exit 0 with the counts the core
  reports, or exit 2 with ONE ``error:`` line naming the file — never a traceback; and every
  file under every *other* kind too (a telemetry file given as trades, ...), which must also
  end in 0 or one line;
* ``meta-pipeline predict``: every trades file of the corpus; what ingest lands is never lost
  (every trade id that ingest stored gets an edge), a file ingest rejects whole is one line;
* the inbox sensor (``build_sensor_context``) and the ``trades``/``telemetry`` assets (every 6th
  file through ``materialize``, the rest through ``ingest_inbox_file``, the asset's per-file call):
  each file in its own domain folder; a file rejected whole goes to
  ``rejected/`` with its one-line reason, every other file to ``processed/`` with exactly
  the quarantine rows (line, reason) and the good rows the core promises;
* a real ``meta-pipeline`` process running every command above on every corpus file, whose
  whole output is searched for ``Traceback`` (the issue's ``grep Traceback``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from meta_pipeline.cli import main as cli_main
from meta_pipeline.defs.ingest.assets import telemetry as telemetry_asset
from meta_pipeline.defs.ingest.assets import trades as trades_asset
from meta_pipeline.defs.ingest.sensors import inbox_run_requests
from meta_pipeline.ingest import REASON_SUFFIX, InboxFile, InboxFileRejected, ingest_file, ingest_inbox_file
from meta_pipeline.store import MetaStore
from meta_pipeline_tests.test_ingest_hostile import CORPUS, Case, _domain, write_corpus

KINDS = ("trades", "telemetry", "feedback")
KNOWN_TRADES = "trade_id,closed_at,regime,return_r,patterns\nk1,2026-06-01T10:00:00Z,S0,0.5,A.x\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("hostile_everywhere"))


@pytest.fixture(autouse=True)
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name in ("META_PIPELINE_DB_URL", "META_PIPELINE_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def _url(request: pytest.FixtureRequest, backend: str) -> str:
    return request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")


def _answer(capsys: pytest.CaptureFixture, code: int, path: Path) -> tuple[str, str] | str:
    """(stdout, stderr) of a run that ended 0, or the one error line of a run that ended 2; anything
    else (a traceback, exit 1, several error lines, a line not naming the file) is a failure text."""
    out = capsys.readouterr()
    if "Traceback" in out.out + out.err:
        return f"FAIL traceback (exit {code})"
    if code == 0:
        return out.out, out.err
    lines = out.err.strip().splitlines()
    if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or path.name not in lines[0]:
        return f"FAIL exit {code}: {out.err.strip()[:300]!r}"
    return lines[0]


# ---------------------------------------------------------------------------
# the CLI: ingest under its own kind (both backends) and under every other kind (SQLite)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_cli_ingest_answers_every_corpus_file(backend: str, request, corpus_dir: Path, capsys) -> None:
    url = _url(request, backend)
    failures = {}
    for case in CORPUS:
        path = corpus_dir / case.name
        target = ["--task" if case.kind == "feedback" else "--domain", _domain(case)]
        code = cli_main(["ingest", case.kind, str(path), *target, "--db-url", url, "--no-dagster"])
        got = _answer(capsys, code, path)
        if isinstance(got, str) and got.startswith("FAIL"):
            failures[case.name] = got
        elif case.rejected is not None:
            if not isinstance(got, str) or case.rejected not in got:
                failures[case.name] = f"expected one error line containing {case.rejected!r}, got {got!r}"
        elif isinstance(got, str):
            failures[case.name] = f"unexpected refusal: {got}"
        else:  # the summary line states the core's counts
            summary = got[0] + got[1]
            if f"{case.landed} ingested" not in summary and f"ingested {case.landed}" not in summary:
                failures[case.name] = f"the summary does not say {case.landed} ingested: {summary.strip()[:300]!r}"
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


def test_cli_ingest_under_every_other_kind(sqlite_url: str, corpus_dir: Path, capsys) -> None:
    """A file given as the wrong kind is a column mismatch, not a crash: 0 (nothing usable is then
    quarantined row by row) or one line naming the file."""
    failures = {}
    for case in CORPUS:
        path = corpus_dir / case.name
        for kind in KINDS:
            if kind == case.kind:
                continue
            target = ["--task" if kind == "feedback" else "--domain", "x-" + _domain(case)[:50]]
            code = cli_main(["ingest", kind, str(path), *target, "--db-url", sqlite_url, "--no-dagster"])
            got = _answer(capsys, code, path)
            if isinstance(got, str) and got.startswith("FAIL"):
                failures[f"{case.name} as {kind}"] = got
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


# ---------------------------------------------------------------------------
# predict: what ingest keeps, predict prices; nothing good is lost
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_predict_answers_every_corpus_file(backend: str, request, corpus_dir: Path, tmp_path: Path,
                                           capsys) -> None:
    url = _url(request, backend)
    store = MetaStore(db_url=url)
    known = tmp_path / "known.csv"
    known.write_text(KNOWN_TRADES)
    assert ingest_file(store, "trades", known, "known").ok
    failures = {}
    for case in (c for c in CORPUS if c.kind == "trades"):
        path = corpus_dir / case.name
        code = cli_main(["predict", str(path), "--domain", "known", "--db-url", url])
        got = _answer(capsys, code, path)
        if isinstance(got, str):
            if got.startswith("FAIL"):
                failures[case.name] = got
            elif case.rejected is None and case.landed:
                failures[case.name] = f"predict refused a file whose {case.landed} good row(s) ingest keeps: {got}"
            continue
        out, err = got
        lines = out.splitlines()
        if not lines or lines[0] != "trade_id,edge":
            failures[case.name] = f"stdout is not the CSV: {out[:200]!r}"
            continue
        if case.rejected is not None:
            failures[case.name] = f"ingest rejects it whole ({case.rejected!r}) but predict printed {len(lines) - 1} rows"
            continue
        predicted = set(pd.read_csv(pd.io.common.StringIO(out), dtype={"trade_id": str})["trade_id"])
        landed = set(MetaStore(db_url=url).read("trades", domain=_ingested_domain(store, case, corpus_dir))
                     ["trade_id"].astype(str))
        if not landed <= predicted:
            failures[case.name] = f"rows ingest keeps but predict drops: {sorted(landed - predicted)[:5]}"
        if case.quarantine and not any(w in err for w in ("skipped", "warning")) and len(predicted) == len(landed):
            # predict checks fewer things (return_r is optional), so it may keep more rows; when it keeps
            # exactly ingest's rows it must say that it skipped the others
            failures[case.name] = f"rows were dropped silently: stderr {err[:200]!r}"
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


def _ingested_domain(store: MetaStore, case: Case, corpus_dir: Path) -> str:
    """The case's rows as the ingest core keeps them (ingested once per store, in its own domain)."""
    domain = "p-" + _domain(case)[:55]
    if not store.count("ingest_batches", domain):
        ingest_file(store, case.kind, corpus_dir / case.name, domain)
    return domain


# ---------------------------------------------------------------------------
# the inbox: sensor tick + the ingest assets, one domain folder per file
# ---------------------------------------------------------------------------


# Every 6th corpus file also goes through a Dagster run of the ingest asset (about 0.5 s a run);
# the others through ``ingest_inbox_file``, the function that asset calls for each of its files.
THROUGH_DAGSTER_EVERY = 6


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_inbox_answers_every_corpus_file(backend: str, request, corpus_dir: Path, tmp_path: Path) -> None:
    store = MetaStore(db_url=_url(request, backend))
    inbox = tmp_path / "inbox"
    cases = {_domain(c): c for c in CORPUS if c.kind in ("trades", "telemetry")}  # feedback is CLI-only
    old = time.time() - 3600
    for domain, case in cases.items():
        folder = inbox / domain / case.kind
        folder.mkdir(parents=True)
        path = folder / case.name
        path.write_bytes((corpus_dir / case.name).read_bytes())
        os.utime(path, (old, old))
    assets = {"trades": trades_asset, "telemetry": telemetry_asset}
    failures: dict[str, str] = {}
    through_dagster = 0
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"store": store})
        result = inbox_run_requests(ctx, store, inbox)
        requested = {r.partition_key for r in result.run_requests}
        assert requested == set(cases), f"not requested: {sorted(set(cases) - requested)}"
        instance.add_dynamic_partitions("domain", sorted(requested))
        for i, run_request in enumerate(result.run_requests):
            domain = run_request.partition_key
            case = cases[domain]
            if i % THROUGH_DAGSTER_EVERY == 0:
                run = dg.materialize([assets[case.kind]], partition_key=domain, instance=instance,
                                     resources={"store": store}, run_config=run_request.run_config,
                                     raise_on_error=False)
                succeeded = run.success
                through_dagster += 1
            else:
                succeeded = _ingest_like_the_asset(store, domain, case.kind, run_request)
            problem = _inbox_problem(case, succeeded, store, inbox / domain / case.kind)
            if problem:
                failures[case.name] = problem
        # nothing is left for a later tick to trip over
        assert inbox_run_requests(dg.build_sensor_context(instance=instance, resources={"store": store}),
                                  store, inbox).run_requests == []
    assert through_dagster >= 10
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())


def _ingest_like_the_asset(store: MetaStore, domain: str, kind: str, run_request: dg.RunRequest) -> bool:
    """What the asset does with each configured file; False where its run would fail (every file refused)."""
    files = run_request.run_config["ops"][kind]["config"]["files"]
    landed = 0
    for name in files:
        st = Path(name).lstat()
        try:
            ingest_inbox_file(store, InboxFile(domain, kind, Path(name), st.st_size, st.st_mtime_ns))
            landed += 1
        except InboxFileRejected:
            pass
    return landed > 0


def _inbox_problem(case: Case, succeeded: bool, store: MetaStore, folder: Path) -> str | None:
    domain = folder.parent.name
    rejected = folder / "rejected" / case.name
    processed = folder / "processed" / case.name
    if case.rejected is not None:
        if not rejected.exists():
            return "a file rejected whole was not moved to rejected/"
        reason = rejected.with_name(rejected.name + REASON_SUFFIX).read_text()
        if reason.count("\n") != 1 or case.rejected not in reason:
            return f"reason file {reason!r} is not one line containing {case.rejected!r}"
        q = store.read("quarantine", domain=domain)
        if len(q) != 1 or int(q["line"].iloc[0]) != 0:
            return f"expected one whole-file quarantine row (line 0), got {len(q)}"
        return None
    if not succeeded:
        return "the run failed on a file with no whole-file defect"
    if not processed.exists() or rejected.exists():
        return "the file was not moved to processed/"
    q = store.read("quarantine", domain=domain).sort_values(["line", "reason"])
    got = list(zip(q["line"].astype(int), q["reason"]))
    if len(got) != len(case.quarantine) or any(line != want_line or want not in reason
                                               for (line, reason), (want_line, want) in zip(got, case.quarantine)):
        return f"quarantine {got} != {case.quarantine}"
    landed = store.count(case.kind, domain)
    if landed != case.landed:
        return f"landed {landed}, expected {case.landed}"
    return None


# ---------------------------------------------------------------------------
# grep Traceback: a real process, every command, every corpus file, both backends
# ---------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from meta_pipeline.cli import main
    folder, url = Path(sys.argv[1]), sys.argv[2]
    main(["ingest", "trades", str(folder / "known.csv"), "--domain", "known", "--db-url", url, "--no-dagster"])
    codes = []
    for path in sorted(p for p in folder.iterdir() if p.name != "known.csv"):
        for argv in (["ingest", "trades", str(path), "--domain", "g-trades", "--no-dagster"],
                     ["ingest", "telemetry", str(path), "--domain", "g-telemetry", "--no-dagster"],
                     ["ingest", "feedback", str(path), "--task", "g-feedback", "--no-dagster"],
                     ["predict", str(path), "--domain", "known"]):
            sys.stdout.flush(); sys.stderr.flush()
            code = main([*argv, "--db-url", url])
            codes.append(code)
    print("codes", sorted(set(codes)), len(codes), file=sys.stderr)
""")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_no_command_prints_a_traceback_on_any_corpus_file(backend: str, request, corpus_dir: Path,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    for path in corpus_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "known.csv").write_text(KNOWN_TRADES)
    env = {k: v for k, v in os.environ.items() if k not in ("META_PIPELINE_DEBUG", "META_PIPELINE_DB_URL")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), _url(request, backend)],
                          capture_output=True, text=True, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-2000:]
    assert "Traceback" not in output, output[output.index("Traceback") - 500:][:3000]
    summary = next(line for line in proc.stderr.splitlines() if line.startswith("codes"))
    assert summary == f"codes [0, 2] {4 * len(CORPUS)}", summary  # every run ended 0 or 2, never 1
