"""`meta-pipeline`: the command line. Subcommands live in meta_pipeline/commands/.

One error path for every command (meta_pipeline/commands/errors.py): what a user can
cause — a bad file, argument, --db-url or webserver — prints one line
``error: <the file or argument>: <what is wrong>; <what to do>`` on stderr and exits 2;
a bug prints ``error: internal error: ...`` and exits 1. Never a traceback, unless
``--debug`` (or META_PIPELINE_DEBUG=1) asks for it. argparse's usage errors exit 2 as usual.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from meta_pipeline.commands import COMMAND_MODULES
from meta_pipeline.commands.errors import DEBUG_ENV, debug_requested, describe, internal_error_line

DEBUG_HELP = f"show the traceback of an error instead of one line (also: {DEBUG_ENV}=1)"


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--debug` is accepted after the subcommand too (SUPPRESS: absent there, the top-level value stands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--debug" in a.option_strings for a in child._actions):
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
                _add_debug_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meta-pipeline",
        description="Learn how a fleet of strategy engines should learn (Dagster code location + CLI).",
    )
    parser.add_argument("--debug", action="store_true", default=False, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command not built yet
                continue
            raise
        module.register(sub)
    _add_debug_everywhere(parser)
    return parser


def _stdout_gone() -> int:
    """stdout was closed under us (e.g. `| head`): stop quietly, as Unix tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no real stdout (e.g. captured)
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        return int(args.func(args) or 0)
    except SystemExit:
        raise
    except BrokenPipeError:
        return _stdout_gone()
    except BaseException as exc:
        if debug_requested(args):
            raise
        try:
            code, line = describe(exc, args)
        except Exception:
            code, line = 1, internal_error_line(exc)
        try:
            sys.stdout.flush()
        except (OSError, ValueError):  # pragma: no cover
            pass
        print(line, file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
