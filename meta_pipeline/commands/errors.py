"""The CLI's one error path: what a user can cause ends in one line on stderr and exit 2.

A line reads ``error: <the file or argument>: <what is wrong>; <what to do>``.

* :class:`UserError` is what a command raises for a problem the user can fix (it carries
  those three parts and the exit code).
* :func:`describe` turns any exception that reaches ``cli.main`` into (exit code, the one
  line): a UserError as it is; a library exception a bad argument caused (a missing or
  unreadable file, a bad ``--db-url``, a webserver that does not answer, a refused
  lifecycle action) worded with the argument it came from; anything else is a bug:
  ``error: internal error: <type>: <message> (run with --debug for the traceback)``, exit 1.
* :func:`command` wraps every subcommand handler with that translation, so a handler
  called on its own (tests do) answers exactly as through ``cli.main``; what it does not
  recognise (a bug) passes on to ``cli.main``.
* Helpers the commands share so every one of them checks the same way: :func:`open_store`
  (the URL parsed, its driver loaded, the database reached — before any work),
  :func:`abs_path`, :func:`check_input_file`, :func:`check_output_file`, :func:`check_free_text`.

``meta-pipeline --debug`` (or ``META_PIPELINE_DEBUG=1``) re-raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

EXIT_USER = 2  # the user can fix it: a bad argument, file, URL or state
EXIT_INTERNAL = 1  # a bug (or a refused lifecycle action / failed run, as documented per command)
DEBUG_ENV = "META_PIPELINE_DEBUG"
MAX_LINE = 600  # characters of one error line (a message of a whole file's worth is cut)

DB_URL_HINT = "use e.g. sqlite:////absolute/path/meta.db or postgresql://USER@HOST:5432/DBNAME"


class UserError(Exception):
    """A problem the user can fix: ``error: <subject>: <problem>; <hint>``, exit ``code``."""

    def __init__(self, subject: str | None, problem: str, hint: str | None = None, code: int = EXIT_USER) -> None:
        self.subject, self.problem, self.hint, self.code = subject, problem, hint, code
        super().__init__(self.text())

    def text(self) -> str:
        return (f"{self.subject}: " if self.subject else "") + self.problem + (f"; {self.hint}" if self.hint else "")

    def line(self) -> str:
        return one_line(f"error: {self.text()}")


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """Whitespace (newlines included) collapsed to single spaces, cut at `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------


def abs_path(value: str | os.PathLike | None) -> Path | None:
    """The argument as an absolute path (relative to the cwd now, whatever changes it later)."""
    if value is None:
        return None
    return Path(os.path.expanduser(os.fspath(value))).resolve()


def check_input_file(path: Path, label: str = "FILE") -> Path:
    """UserError unless `path` is an existing, readable regular file."""
    shown = str(path)
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        where = "" if parent is None or parent == path.parent else f" (no folder {path.parent})"
        raise UserError(shown, f"no such file{where}", f"check the {label} path")
    if path.is_dir():
        raise UserError(shown, "is a directory, not a file", f"give the file itself as {label}")
    if not os.access(path, os.R_OK):
        raise UserError(shown, "permission denied (not readable)", "make it readable or copy it somewhere readable")
    return path


def check_output_file(path: Path, label: str) -> Path:
    """UserError unless a file can be written at `path` (its folder exists and is writable; not a directory)."""
    shown = f"{label} {path}"
    if path.is_dir():
        raise UserError(shown, "is a directory", "give a file name")
    folder = path.parent
    if not folder.exists():
        raise UserError(shown, f"the folder {folder} does not exist", "create it first or choose another path")
    if not folder.is_dir():
        raise UserError(shown, f"{folder} is not a folder", "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(shown, "permission denied (not writable)", "choose a writable path")
    return path


def check_free_text(value: str, label: str, max_chars: int = 200) -> str:
    """Free text that is stored (a name in the change log, an id): non-empty, at most `max_chars`
    characters, no control characters (newline, tab, NUL, ...) — the same rule on every backend."""
    shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    text = value.strip()
    if not text:
        raise UserError(f"{label} {shown}", "is empty", "give a non-empty value")
    if len(text) > max_chars:
        raise UserError(f"{label} {shown}", f"is {len(text)} characters long (at most {max_chars})",
                        "shorten it")
    bad = next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise UserError(f"{label} {shown}", f"contains a control character ({bad!r})",
                        "use printable characters on one line")
    return text


# ---------------------------------------------------------------------------
# the store (--db-url)
# ---------------------------------------------------------------------------


def db_url_of(args: argparse.Namespace | None) -> str:
    from meta_pipeline.paths import default_db_url

    return (getattr(args, "db_url", None) if args is not None else None) or default_db_url()


def shown_url(url: str) -> str:
    """The URL with its password hidden (when it parses)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: show it as given (cut), a password-like part hidden
        url = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)
        return url if len(url) <= 120 else url[:117] + "..."


def db_subject(url: str, args: argparse.Namespace | None) -> str:
    shown = shown_url(url)
    if args is not None and getattr(args, "db_url", None):
        return f"--db-url {shown!r}"
    if os.environ.get("META_PIPELINE_DB_URL"):
        return f"META_PIPELINE_DB_URL {shown!r}"
    return f"the store {shown}"


def db_error(exc: BaseException, url: str, args: argparse.Namespace | None) -> UserError:
    """A UserError naming the URL for what SQLAlchemy (or the SQLite folder) raised on it."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    subject = db_subject(url, args)
    sqlite = url.strip().lower().startswith("sqlite")
    if isinstance(exc, NoSuchModuleError):
        dialect = url.split("://", 1)[0] if "://" in url else url
        return UserError(subject, f"unknown database dialect {dialect!r} (SQLAlchemy has no driver for it)",
                         DB_URL_HINT)
    if isinstance(exc, (ArgumentError, ValueError)):
        return UserError(subject, f"not a database URL ({first_line(exc)})", DB_URL_HINT)
    if isinstance(exc, OperationalError):
        detail = first_line(exc.orig) if getattr(exc, "orig", None) is not None else first_line(exc)
        if sqlite:
            return UserError(subject, f"cannot open the SQLite database ({detail})",
                             "check that the file's folder exists and is writable")
        return UserError(subject, f"cannot connect ({detail})",
                         "check that the server is running and the URL's host, port, database and user")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        reason = exc.strerror or first_line(exc)
        return UserError(subject, f"cannot create the folder{where} for the SQLite file ({reason})",
                         "choose a path in a folder you can write")
    return UserError(subject, first_line(exc), DB_URL_HINT)


def _db_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    return (ArgumentError, NoSuchModuleError, OperationalError)


def open_store(args: argparse.Namespace | None, url: str | None = None):
    """The store of --db-url (else META_PIPELINE_DB_URL, else data/meta.db), reached before any work:
    a URL that does not parse, an unknown dialect, a server that does not answer or a SQLite
    folder that cannot be created ends in one UserError naming it."""
    from meta_pipeline.store import MetaStore

    url = url or db_url_of(args)
    store = MetaStore(db_url=url)
    try:
        store.engine
    except (*_db_errors(), ValueError, OSError) as exc:
        raise db_error(exc, url, args) from exc
    return store


# ---------------------------------------------------------------------------
# reading input files
# ---------------------------------------------------------------------------


def read_error_problem(exc: BaseException, path: Path | str | None = None) -> tuple[str, str]:
    """(what is wrong, what to do) for an exception raised while reading an input file."""
    import pandas as pd

    suffix = Path(path).suffix.lower() if path is not None else ""
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start:exc.start + 1] if isinstance(exc.object, (bytes, bytearray)) else b""
        byte = f"byte 0x{bad[0]:02x}" if bad else "a byte"
        return f"not UTF-8 text ({byte} at offset {exc.start})", "save the file as UTF-8"
    if isinstance(exc, pd.errors.EmptyDataError):
        return "empty file (no header, no rows)", "write a header line and the rows"
    if isinstance(exc, pd.errors.ParserError):
        return f"not a readable CSV ({first_line(exc)})", "every row needs as many fields as the header"
    kind = {".parquet": "Parquet", ".csv": "CSV", ".jsonl": "JSON Lines", ".ndjson": "JSON Lines",
            ".json": "JSON Lines"}.get(suffix, "input")
    return f"not a readable {kind} file ({first_line(exc)})", "check that the file is what its extension says"


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a malformed input file raises (besides ContractError)."""
    import pandas as pd
    import pyarrow as pa

    return (UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError, pa.ArrowException)


# ---------------------------------------------------------------------------
# the one translation
# ---------------------------------------------------------------------------

_PATH_ARGS = (("file", "FILE"), ("output", "-o/--output"), ("out", "--out"))


def _path_label(filename: str | None, args: argparse.Namespace | None) -> str | None:
    """Which path argument `filename` is (or lies under), e.g. '-o/--output'."""
    if not filename or args is None:
        return None
    try:
        target = Path(filename).resolve()
    except (OSError, RuntimeError):
        return None
    for attr, label in _PATH_ARGS:
        value = getattr(args, attr, None)
        if isinstance(value, (str, os.PathLike)):
            given = abs_path(value)
            if given == target or given in target.parents or target in given.parents:
                return label
    return None


def _is_db_path(filename: str | None, args: argparse.Namespace | None) -> bool:
    """Whether an OSError's file is the SQLite store (or a folder on its way)."""
    if not filename:
        return False
    url = db_url_of(args)
    if not url.lower().startswith("sqlite"):
        return False
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    except Exception:
        return False
    if not database or database == ":memory:":
        return False
    db_path, target = Path(database).absolute(), Path(filename).absolute()
    return target == db_path or target in db_path.parents


_OS_PROBLEMS = {
    FileNotFoundError: "no such file or directory",
    IsADirectoryError: "is a directory, not a file",
    NotADirectoryError: "a part of the path is not a directory",
    PermissionError: "permission denied",
    FileExistsError: "already exists",
}


def _os_error(exc: OSError, args: argparse.Namespace | None) -> UserError:
    if _is_db_path(exc.filename, args):
        return db_error(exc, db_url_of(args), args)
    label = _path_label(exc.filename, args)
    problem = next((text for cls, text in _OS_PROBLEMS.items() if isinstance(exc, cls)),
                   exc.strerror or first_line(exc))
    if exc.errno == errno.ENOSPC:
        problem = "no space left on the device"
    subject = f"{label} {exc.filename}" if label and label != "FILE" else str(exc.filename)
    if label in ("-o/--output", "--out"):
        hint = "choose a writable path whose folder exists"
    else:
        hint = "check the path and its permissions"
    return UserError(subject, problem, hint)


def _webserver_error(exc: BaseException, args: argparse.Namespace | None) -> UserError:
    url = getattr(args, "webserver", None) if args is not None else None
    return UserError(f"--webserver {url}" if url else "the webserver", f"nothing answers there ({first_line(exc)})",
                     "start it (make ui, i.e. dagster dev) or check the URL")


def _connection_errors() -> tuple[type[BaseException], ...]:
    import urllib.error

    found: list[type[BaseException]] = [ConnectionError, urllib.error.URLError]
    try:
        import requests

        found.append(requests.exceptions.ConnectionError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from gql.transport.exceptions import TransportConnectionFailed

        found.append(TransportConnectionFailed)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def internal_error_line(exc: BaseException) -> str:
    message = one_line(str(exc), 300)
    return (f"error: internal error: {type(exc).__name__}" + (f": {message}" if message else "")
            + " (run with --debug for the traceback)")


def to_user_error(exc: BaseException, args: argparse.Namespace | None) -> UserError | None:
    """The UserError for an exception a user can cause, or None (a bug)."""
    from meta_pipeline.contracts import ContractError
    from meta_pipeline.governance.lifecycle import ProposalError

    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, ProposalError):  # a refused lifecycle action: exit 1 as documented in `proposals`
        return UserError(None, str(exc), "see `meta-pipeline proposals list` and `proposals show ID`",
                         code=EXIT_INTERNAL)
    if isinstance(exc, ContractError):
        return UserError(None, str(exc))
    if isinstance(exc, (*_db_errors(),)):
        return db_error(exc, db_url_of(args), args)
    if isinstance(exc, read_errors()):
        path = getattr(args, "file", None) if args is not None else None
        problem, hint = read_error_problem(exc, path)
        return UserError(str(abs_path(path)) if path else None, problem, hint)
    webserver = getattr(args, "webserver", None) if args is not None else None
    connection = _connection_errors()
    if webserver and any(isinstance(e, connection) for e in _chain(exc)):
        return _webserver_error(next(e for e in _chain(exc) if isinstance(e, connection)), args)
    if isinstance(exc, OSError) and exc.filename:
        return _os_error(exc, args)
    from meta_pipeline.lab.bench import BenchError

    if isinstance(exc, BenchError):  # as `bench` always did: exit 1; the log it names has the details
        return UserError(None, first_line(exc).rstrip(":"), "the log named here has the details", code=EXIT_INTERNAL)
    return None


def describe(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[int, str]:
    """(exit code, the one line on stderr) for an exception that reached cli.main."""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "error: interrupted"
    user = to_user_error(exc, args)
    if user is not None:
        return user.code, user.line()
    return EXIT_INTERNAL, internal_error_line(exc)


def command(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler whose user errors end in their one line on stderr and their exit code."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args) or 0)
        except Exception as exc:
            if debug_requested(args):
                raise
            user = to_user_error(exc, args)
            if user is None:  # a bug: cli.main prints the internal-error line
                raise
            try:
                sys.stdout.flush()
            except (OSError, ValueError):  # pragma: no cover
                pass
            print(user.line(), file=sys.stderr, flush=True)
            return user.code

    return run
