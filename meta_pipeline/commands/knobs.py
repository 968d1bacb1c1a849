"""`meta-pipeline knobs show|set|reset DOMAIN`: a person's hand on a domain's knobs.

* ``show DOMAIN`` — the knobs in effect, each with its bounds, default and where its value
  came from (``governance.knob_settings.knobs_report``); ``--json`` prints it as JSON.
* ``set DOMAIN k=v …`` — a new applied META_KNOBS config (the knobs in effect with those
  replaced) through the proposal lifecycle, recorded with ``--by`` (default: the login
  name). An unknown knob, a value that is not a number, not an integer for an int knob or
  outside the knob's bounds: one line, exit 2, nothing written.
* ``reset DOMAIN`` — hands the knobs back to the controller: the active META_KNOBS config
  is deactivated and a ``reset`` row goes to config_change_log (docs/knobs.md).

A bad or unknown DOMAIN exits 2; a lifecycle refusal (someone changed the config at the
same moment) exits 1, like ``proposals apply``.
"""

from __future__ import annotations

import argparse
import json

from meta_pipeline.commands.errors import UserError, check_free_text, command, open_store
from meta_pipeline.commands.proposals import ACTOR_MAX, _login_name
from meta_pipeline.governance import knob_settings


def _actor(args: argparse.Namespace) -> str:
    if args.by is not None:
        return check_free_text(args.by, "--by", ACTOR_MAX)
    return check_free_text(_login_name(), "the login name (give --by NAME)", ACTOR_MAX)


def _fmt(value: float, kind: str) -> str:
    return str(int(value)) if kind in ("int", "bool") else f"{value:g}"


def _print_report(report: knob_settings.KnobsReport) -> None:
    print(f"knobs of {report.domain} (in effect: {report.in_effect.source})")
    header = ("KNOB", "VALUE", "BOUNDS", "DEFAULT", "FROM")
    rows = [header] + [
        (r["knob"], _fmt(r["value"], r["kind"]), f"[{_fmt(r['low'], r['kind'])}, {_fmt(r['high'], r['kind'])}]",
         _fmt(r["default"], r["kind"]), r["source"])
        for r in report.rows
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for note in report.notes:
        print(f"note: {note}")


@command
def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    report = knob_settings.knobs_report(store, args.domain)
    if args.json:
        print(json.dumps({"domain": report.domain, "source": report.in_effect.source, "knobs": report.rows,
                          "notes": report.notes}, indent=1, sort_keys=True))
    else:
        _print_report(report)
    return 0


@command
def cmd_set(args: argparse.Namespace) -> int:
    try:
        values = knob_settings.parse_assignments(args.assignments)
    except knob_settings.KnobValueError as exc:
        raise UserError(exc.subject, exc.problem, exc.hint) from None
    actor = _actor(args)
    store = open_store(args)
    result = knob_settings.set_knobs(store, args.domain, values, actor)
    changed = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in result.changed.items()) or "no value changed"
    print(f"{result.domain}: META_KNOBS config v{result.version} applied by {actor} ({result.proposal_id}): {changed} "
          f"(was {result.before_source})")
    print("note: in effect now; the controller adopts it on its next run and canaries it like any change "
          f"(undo: meta-pipeline proposals revert {result.proposal_id}; hand back: meta-pipeline knobs reset "
          f"{result.domain})")
    return 0


@command
def cmd_reset(args: argparse.Namespace) -> int:
    actor = _actor(args)
    store = open_store(args)
    result = knob_settings.reset_knobs(store, args.domain, actor)
    after = result.in_effect_after.source
    if result.withdrawn_version is None:
        print(f"{result.domain}: no applied META_KNOBS config to withdraw; nothing written (in effect: {after})")
        return 0
    what = ("its knobs are no longer in effect" if result.was_in_effect
            else "the controller had already adopted it; the knobs in effect do not change")
    print(f"{result.domain}: META_KNOBS config v{result.withdrawn_version} withdrawn by {actor} ({what}); "
          f"in effect now: {after}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "knobs", help="show, set or reset a domain's knobs",
        description="A domain's knobs: show them (and where each came from), set some (an applied META_KNOBS "
                    "config through the proposal lifecycle), or reset (hand them back to the controller).")
    sub = parser.add_subparsers(dest="knobs_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("domain", metavar="DOMAIN")
        p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")

    p = sub.add_parser("show", help="the knobs in effect, their bounds and where each came from")
    common(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("set", help="apply KNOB=VALUE ... as a new META_KNOBS config (validated against the bounds)")
    common(p)
    p.add_argument("assignments", nargs="+", metavar="KNOB=VALUE", help="e.g. tau=0.9 g_min=0.05 tier2_enabled=0")
    p.add_argument("--by", default=None, help="who is acting, recorded in the change log (default: your login name)")
    p.set_defaults(func=cmd_set)

    p = sub.add_parser("reset", help="withdraw the applied META_KNOBS config: the controller's knobs are in effect")
    common(p)
    p.add_argument("--by", default=None, help="who is acting, recorded in the change log (default: your login name)")
    p.set_defaults(func=cmd_reset)
