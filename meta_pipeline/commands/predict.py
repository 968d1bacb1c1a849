"""meta-pipeline predict --domain NAME FILE: apply a domain's overrides to trades (CSV trade_id,edge).

With --strategy-weights a third column, strategy_weight, carries each trade's weight from
the active STRATEGY_CONFIG configs. Overrides past their valid_until at a trade's
closed_at are not applied to it (the count goes to stderr).

The CSV (header ``trade_id,edge``) goes to stdout, or to ``-o FILE``, and nothing else
goes there: every note and warning is on stderr. A domain the store does not know, a file
that cannot be read or a bad ``-o`` end in one ``error:`` line and exit 2 (cli.py).
"""

from __future__ import annotations

import argparse
import io
import sys

import pandas as pd

from meta_pipeline.commands.errors import (
    UserError,
    abs_path,
    check_input_file,
    check_output_file,
    command,
    open_store,
    shown_url,
)
from meta_pipeline.contracts import validate_domain


def _as_of(text: str | None) -> pd.Timestamp | None:
    if text is None:
        return None
    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError) as exc:
        raise UserError(f"--as-of {text!r}", "not an ISO-8601 time", "e.g. 2026-06-01T00:00:00Z") from exc
    if pd.isna(stamp):
        raise UserError(f"--as-of {text!r}", "not a time", "e.g. 2026-06-01T00:00:00Z")
    return stamp


@command
def cmd_predict(args: argparse.Namespace) -> int:
    from meta_pipeline.learning.overrides import KNOBS_RECORDED
    from meta_pipeline.learning.predict import UnknownDomainError, predict_file

    domain = validate_domain(args.domain)
    path = check_input_file(abs_path(args.file))
    output = check_output_file(abs_path(args.output), "-o") if args.output else None
    as_of = _as_of(args.as_of)
    store = open_store(args)
    try:
        result = predict_file(store, domain, path, version=args.version, as_of=as_of,
                              with_weights=args.strategy_weights)
    except UnknownDomainError as exc:
        raise UserError(None, str(exc), "check --domain (and --db-url), or ingest its trades first") from exc

    notes: list[str] = []  # on stderr once the CSV is written (an -o that fails leaves one error line)
    _note = notes.append
    where = shown_url(store.db_url)
    if args.version is not None or args.as_of is not None:
        _note(f"note: overrides version {result.attrs.get('version')} of {domain}")
    elif not result.attrs.get("n_overrides"):
        edges = (f"the edges are the regime term alone (tier2_enabled=1 from {result.attrs.get('knobs_source')})"
                 if result.attrs.get("regime_term") else "every edge is 0 (no regime term either)")
        _note(f"note: domain {domain!r} has no overrides in {where} (pm_overrides not materialized yet): "
              f"{edges}; materialize its learning assets (meta-pipeline backfill --domains {domain}) "
              "for learned overrides")
    elif result.attrs.get("knobs_source") != KNOBS_RECORDED:
        _note(f"note: no knobs recorded with {domain}'s overrides; tier2_enabled="
              f"{int(bool(result.attrs.get('tier2_enabled')))} from {result.attrs.get('knobs_source')}")

    if result.attrs.get("n_expired"):
        _note(f"note: {result.attrs['n_expired']} trade(s) closed after the valid_until of the override that "
              "would apply: that override was skipped for them (expired edges are not applied)")

    skipped = result.attrs.get("quarantine")
    n_skipped = 0 if skipped is None else len(skipped)
    if n_skipped:
        first = skipped.iloc[0]
        line = first["line"]
        at = f"line {int(line)}" if pd.notna(line) else "a row"
        if result.empty:
            raise UserError(str(path), f"none of its {n_skipped} row(s) can be used (first: {at}: {first['reason']})",
                            "fix the rows (the trades contract: docs/contract.md)")
        _note(f"warning: {n_skipped} row(s) of {path.name} skipped for breaking the contract, first: "
              f"{at}: {first['reason']}")
    elif result.empty:
        _note(f"note: {path.name} has no trades: the CSV is the header alone")

    text = io.StringIO()
    columns = ["trade_id", "edge", *(["strategy_weight"] if args.strategy_weights else [])]
    result[columns].to_csv(text, index=False, float_format="%.6g")
    if output is None:
        sys.stdout.write(text.getvalue())
        sys.stdout.flush()
    else:
        try:
            with open(output, "w", newline="", encoding="utf-8") as fh:
                fh.write(text.getvalue())
        except OSError as exc:
            raise UserError(f"-o {output}", f"cannot write it ({exc.strerror or exc})",
                            "choose a writable path whose folder exists") from exc
        _note(f"wrote {len(result)} prediction(s) to {output}")
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="apply a domain's pm_overrides to a trades file; prints CSV trade_id,edge",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("file", help="trades in the ingest contract (return_r optional)")
    p.add_argument("--domain", required=True)
    p.add_argument("--output", "-o", default=None, help="write the CSV here instead of stdout")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")
    p.add_argument("--strategy-weights", action="store_true",
                   help="add a strategy_weight column: the trade's strategy × regime weight from the active "
                        "STRATEGY_CONFIG configs (1 where none)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--version", type=int, default=None, help="re-apply this past overrides version exactly")
    when.add_argument("--as-of", default=None, help="re-apply the overrides version in effect at this ISO-8601 time")
    p.set_defaults(func=cmd_predict)
