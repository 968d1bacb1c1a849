"""The CLI's one error path: every bad input a user can give ends in ONE line on stderr.

``error: <the file or argument>: <what is wrong>; <what to do>`` and exit 2 for what a user
can cause (a missing or unreadable file, a bad ``--db-url``, a bad ``-o``, an unknown
domain, free text that cannot be stored, a webserver that does not answer); a bug is
``error: internal error: ...`` and exit 1; never a traceback unless ``--debug`` (or
META_PIPELINE_DEBUG=1). Plus the honest ``predict`` (CSV alone on stdout, every note on
stderr), help texts without ``%%``, and relative paths (``bench --out``, ``DAGSTER_HOME``).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from meta_pipeline import cli
from meta_pipeline.cli import main as cli_main
from meta_pipeline.ingest import ingest_file
from meta_pipeline.store import MetaStore

REPO = Path(__file__).resolve().parents[1]
CLI_BIN = Path(sys.executable).parent / "meta-pipeline"

HEADER = "trade_id,closed_at,regime,strategy_id,return_r,patterns,scope.chain,metric.slippage\n"
ROWS = "".join(f"t{i},2026-06-0{1 + i % 9}T10:00:00Z,S{i % 2},alpha,0.{i},A.x|B.y,eth,1.{i}\n" for i in range(6))

BAD_DB_URLS = ["not-a-url", "nosuchdialect://x", "postgresql://127.0.0.1:1/test", "sqlite:////proc/forbidden/x.db"]


# ---------------------------------------------------------------------------
# fixtures and the one assertion
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DAGSTER_HOME (with its dagster.yaml: Dagster prints nothing about it) and no ambient settings."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name in ("META_PIPELINE_DB_URL", "META_PIPELINE_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def known(tmp_path: Path, sqlite_url: str) -> dict:
    """A store where domain dom0 has trades (but no overrides yet), and a good trades file."""
    good = tmp_path / "good.csv"
    good.write_text(HEADER + ROWS)
    report = ingest_file(MetaStore(db_url=sqlite_url), "trades", good, "dom0")
    assert report.ok
    return {"db": ["--db-url", sqlite_url], "good": good, "url": sqlite_url}


def one_error(capsys: pytest.CaptureFixture, *names: str) -> str:
    """The one stderr line of a refused command: starts with 'error:', names what it is about, no traceback."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once we return: connecting is refused at once


# ---------------------------------------------------------------------------
# --db-url: four bad forms, every command that opens the store
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", BAD_DB_URLS)
@pytest.mark.parametrize("command", ["predict", "ingest", "proposals", "replay"])
def test_a_bad_db_url_is_one_line_naming_it(url: str, command: str, known: dict, capsys) -> None:
    good = str(known["good"])
    argv = {
        "predict": ["predict", good, "--domain", "dom0"],
        "ingest": ["ingest", "trades", good, "--domain", "dom0", "--no-dagster"],
        "proposals": ["proposals", "list"],
        "replay": ["replay", "--domain", "dom0"],
    }[command]
    assert cli_main([*argv, "--db-url", url]) == 2
    line = one_error(capsys, "--db-url", url)
    assert "; " in line  # what to do


def test_the_bad_db_url_messages_say_what_is_wrong(capsys) -> None:
    expected = {
        "not-a-url": "not a database URL",
        "nosuchdialect://x": "unknown database dialect 'nosuchdialect'",
        "postgresql://127.0.0.1:1/test": "cannot connect",
        "sqlite:////proc/forbidden/x.db": "cannot create the folder /proc/forbidden",
    }
    for url, text in expected.items():
        assert cli_main(["proposals", "list", "--db-url", url]) == 2
        one_error(capsys, f"--db-url {url!r}", text)


def test_a_password_in_a_bad_url_is_not_printed(capsys) -> None:
    assert cli_main(["proposals", "list", "--db-url", "postgresql://ann:s3cret@127.0.0.1:notaport/db"]) == 2
    line = one_error(capsys, "--db-url")
    assert "s3cret" not in line


def test_the_environment_url_is_named_when_it_is_the_bad_one(monkeypatch, capsys) -> None:
    monkeypatch.setenv("META_PIPELINE_DB_URL", "nosuchdialect://x")
    assert cli_main(["proposals", "list"]) == 2
    one_error(capsys, "META_PIPELINE_DB_URL", "unknown database dialect")


# ---------------------------------------------------------------------------
# predict: unreadable files, bad -o, unknown domain, honest notes
# ---------------------------------------------------------------------------


def _hostile_files(folder: Path) -> dict[str, Path]:
    rnd = random.Random(12)
    noise = bytes(rnd.randrange(256) for _ in range(600))
    files = {
        "empty.csv": b"",
        "latin1.csv": HEADER.encode() + "t1,2026-06-01T10:00:00Z,S\xe9,alpha,0.5,A.x,eth,1.0\n".encode("latin-1"),
        "ragged.csv": HEADER.encode() + b"t1,2026-06-01T10:00:00Z,S0,alpha,0.5,A.x,eth,1.0,x,y,z,w\n",
        "garbage.csv": noise,
        "garbage.jsonl": noise,
        "garbage.parquet": noise,
    }
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


@pytest.mark.parametrize("name", ["empty.csv", "latin1.csv", "ragged.csv", "garbage.csv", "garbage.jsonl",
                                  "garbage.parquet", "missing.csv", "a_folder.csv"])
def test_predict_on_an_unreadable_file_is_one_line_naming_it(name: str, known: dict, tmp_path, capsys) -> None:
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    _hostile_files(hostile)
    (hostile / "a_folder.csv").mkdir()
    assert cli_main(["predict", str(hostile / name), "--domain", "dom0", *known["db"]]) == 2
    one_error(capsys, name)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every file")
def test_predict_on_a_file_without_read_permission(known: dict, tmp_path, capsys) -> None:
    locked = tmp_path / "locked.csv"
    locked.write_text(HEADER + ROWS)
    locked.chmod(0)
    assert cli_main(["predict", str(locked), "--domain", "dom0", *known["db"]]) == 2
    one_error(capsys, "locked.csv", "permission")


@pytest.mark.parametrize("where", ["no_such_folder/out.csv", "a_folder"])
def test_predict_with_a_bad_output_path(where: str, known: dict, tmp_path, capsys) -> None:
    (tmp_path / "a_folder").mkdir()
    target = tmp_path / where
    assert cli_main(["predict", str(known["good"]), "--domain", "dom0", "-o", str(target), *known["db"]]) == 2
    one_error(capsys, "-o", str(target))
    assert not (tmp_path / "no_such_folder").exists()


def test_predict_on_an_unknown_domain_is_an_error_not_zeros(known: dict, capsys) -> None:
    assert cli_main(["predict", str(known["good"]), "--domain", "nosuch", *known["db"]]) == 2
    line = one_error(capsys, "domain 'nosuch' is unknown in", "sqlite:")
    assert "dom0" in line  # the known domains are listed


def test_predict_without_overrides_prints_the_csv_and_says_so_on_stderr(known: dict, tmp_path, capsys) -> None:
    assert cli_main(["predict", str(known["good"]), "--domain", "dom0", *known["db"]]) == 0
    captured = capsys.readouterr()
    frame = pd.read_csv(pd.io.common.StringIO(captured.out))
    assert list(frame.columns) == ["trade_id", "edge"] and len(frame) == 6
    assert captured.out.splitlines()[0] == "trade_id,edge"  # nothing but the CSV on stdout
    assert "has no overrides" in captured.err and "dom0" in captured.err
    # -o: the same CSV in the file, nothing on stdout
    target = tmp_path / "out.csv"
    assert cli_main(["predict", str(known["good"]), "--domain", "dom0", "-o", str(target), *known["db"]]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert pd.read_csv(target).equals(frame)


def test_predict_names_a_skipped_row_by_its_integer_line(known: dict, tmp_path, capsys) -> None:
    path = tmp_path / "one_bad.csv"
    path.write_text(HEADER + ROWS[: ROWS.index("\n") + 1] + "tbad,never,S0,alpha,0.1,A.x,eth,1.0\n")
    assert cli_main(["predict", str(path), "--domain", "dom0", *known["db"]]) == 0
    captured = capsys.readouterr()
    assert "line 3" in captured.err and "line 3.0" not in captured.err
    assert captured.out.splitlines() == ["trade_id,edge", "t0,0"]


def test_predict_on_a_file_whose_rows_are_all_bad_is_an_error(known: dict, tmp_path, capsys) -> None:
    path = tmp_path / "all_bad.csv"
    path.write_text(HEADER + "tbad,never,S0,alpha,0.1,A.x,eth,1.0\n")
    assert cli_main(["predict", str(path), "--domain", "dom0", *known["db"]]) == 2
    one_error(capsys, "all_bad.csv", "line 2")


def test_predict_with_a_bad_as_of(known: dict, capsys) -> None:
    assert cli_main(["predict", str(known["good"]), "--domain", "dom0", "--as-of", "yesterday-ish",
                     *known["db"]]) == 2
    one_error(capsys, "--as-of")


# ---------------------------------------------------------------------------
# ingest: the same file checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.csv", "a_folder.csv"])
def test_ingest_on_a_missing_file_or_a_folder(name: str, known: dict, tmp_path, capsys) -> None:
    (tmp_path / "a_folder.csv").mkdir()
    assert cli_main(["ingest", "trades", str(tmp_path / name), "--domain", "dom0", "--no-dagster", *known["db"]]) == 2
    one_error(capsys, name)


# ---------------------------------------------------------------------------
# proposals: --by is validated (the same rule on SQLite and PostgreSQL)
# ---------------------------------------------------------------------------


def _proposal(url: str) -> str:
    from meta_pipeline.governance import lifecycle
    from meta_pipeline_tests.support.proposals import proposal_frame

    report = lifecycle.insert_proposals(MetaStore(db_url=url), proposal_frame())
    assert len(report.inserted) == 1
    return report.inserted[0]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_proposals_by_is_validated(backend: str, request, capsys) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    pid = _proposal(url)
    db = ["--db-url", url]
    for bad, why in (("x" * 300, "300 characters"), ("ann\nmallory", "control character"), ("  ", "empty"),
                     ("ann\x00", "control character"), ("tab\there", "control character")):
        assert cli_main(["proposals", "approve", pid, "--by", bad, *db]) == 2
        one_error(capsys, "--by", why)
    from meta_pipeline.governance import lifecycle

    store = MetaStore(db_url=url)
    assert lifecycle.change_log(store, pid).empty  # nothing was written
    assert cli_main(["proposals", "approve", pid, "--by", "x" * 200, *db]) == 0  # the limit itself is fine
    assert list(lifecycle.change_log(store, pid)["actor"]) == ["x" * 200]


def test_proposals_refusals_are_one_line(sqlite_url: str, capsys) -> None:
    db = ["--db-url", sqlite_url]
    pid = _proposal(sqlite_url)
    assert cli_main(["proposals", "apply", pid, "--by", "ann", *db]) == 1  # illegal transition: exit 1 as documented
    one_error(capsys, pid, "cannot apply")
    assert cli_main(["proposals", "show", "P404", *db]) == 1
    one_error(capsys, "P404", "does not exist")
    assert cli_main(["proposals", "list", "--status", "nope", *db]) == 2
    one_error(capsys, "--status", "nope")
    assert cli_main(["proposals", "show", "x" * 101, *db]) == 2
    one_error(capsys, "PROPOSAL_ID", "101 characters")


# ---------------------------------------------------------------------------
# backfill --webserver with nothing listening
# ---------------------------------------------------------------------------


def test_backfill_against_a_webserver_that_does_not_answer(known: dict, capsys) -> None:
    from meta_pipeline.commands.orchestration import get_instance, register_domains

    register_domains(get_instance(), ["dom0"])
    url = f"http://127.0.0.1:{_closed_port()}"
    assert cli_main(["backfill", "--webserver", url]) == 2
    one_error(capsys, f"--webserver {url}", "nothing answers")
    assert cli_main(["backfill", "--webserver", "http://[::1"]) == 2
    one_error(capsys, "--webserver", "not a URL")


# ---------------------------------------------------------------------------
# bugs: one line and exit 1; --debug / META_PIPELINE_DEBUG show the traceback
# ---------------------------------------------------------------------------


def _boom(*_args, **_kwargs):
    raise RuntimeError("boom\nsecond line")


def test_an_unexpected_exception_is_one_internal_error_line(known: dict, monkeypatch, capsys) -> None:
    import meta_pipeline.learning.predict as predict_module

    monkeypatch.setattr(predict_module, "predict_file", _boom)
    argv = ["predict", str(known["good"]), "--domain", "dom0", *known["db"]]
    assert cli_main(argv) == 1
    line = one_error(capsys, "internal error: RuntimeError: boom second line", "--debug")
    assert line.endswith("(run with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="boom"):
        cli_main(["--debug", *argv])
    with pytest.raises(RuntimeError, match="boom"):
        cli_main([*argv, "--debug"])  # after the subcommand too
    monkeypatch.setenv("META_PIPELINE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli_main(argv)


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("META_PIPELINE_DEBUG", "1")
    with pytest.raises(Exception, match="missing.csv"):
        cli_main(["predict", str(tmp_path / "missing.csv"), "--domain", "dom0"])


def test_usage_errors_stay_argparse_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict"])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# help texts: every (sub)command, no '%%'
# ---------------------------------------------------------------------------


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths += _command_paths(child, (*prefix, name))
    return paths


def test_every_help_text_shows_no_double_percent(capsys) -> None:
    paths = _command_paths(cli.build_parser())
    assert ("evaluate",) in paths and ("proposals", "approve") in paths and ("bench",) in paths
    for path in paths:
        with pytest.raises(SystemExit) as exc:
            cli_main([*path, "--help"])
        assert exc.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage:"), path
        assert "%%" not in out, (path, out)
        if path == ("evaluate",):
            assert "95% CI" in out


# ---------------------------------------------------------------------------
# relative paths: bench --out, DAGSTER_HOME
# ---------------------------------------------------------------------------


def test_a_relative_dagster_home_is_made_absolute(tmp_path, monkeypatch) -> None:
    from meta_pipeline.commands.orchestration import get_instance, register_domains

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", "relative_home")
    instance = get_instance()
    assert os.environ["DAGSTER_HOME"] == str(tmp_path / "relative_home")
    assert register_domains(instance, ["dom0"]) == ["dom0"]
    assert (tmp_path / "relative_home").is_dir()


def test_bench_with_a_relative_out(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli_main(["bench", "--tier", "small", "--trades", "2000", "--no-dagster", "--no-fleet",
                     "--out", "relative_dir"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "Traceback" not in captured.out + captured.err
    assert (tmp_path / "relative_dir" / "report.json").exists()
    assert f"report: {tmp_path / 'relative_dir'}/report.md" in captured.out


# ---------------------------------------------------------------------------
# the real executable: no traceback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["proposals", "list", "--db-url", "not-a-url"],
    ["predict", "{tmp}/missing.csv", "--domain", "dom0", "--db-url", "postgresql://127.0.0.1:1/test"],
    ["ingest", "trades", "{tmp}/missing.csv", "--domain", "dom0", "--no-dagster", "--db-url", "nosuchdialect://x"],
])
def test_the_installed_command_prints_no_traceback(argv: list[str], tmp_path, cli_env) -> None:
    if not CLI_BIN.exists():
        pytest.skip(f"{CLI_BIN} not installed (pip install -e .)")
    env = {**os.environ, "DAGSTER_HOME": str(cli_env)}
    env.pop("META_PIPELINE_DEBUG", None)
    done = subprocess.run([str(CLI_BIN), *(a.format(tmp=tmp_path) for a in argv)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
