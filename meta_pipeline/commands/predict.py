"""meta-pipeline predict --domain NAME FILE: apply a domain's overrides to trades (CSV trade_id,edge)."""

from __future__ import annotations

import argparse
import sys

from meta_pipeline.contracts import ContractError, validate_domain
from meta_pipeline.paths import default_db_url
from meta_pipeline.store import MetaStore


def cmd_predict(args: argparse.Namespace) -> int:
    from meta_pipeline.learning.overrides import KNOBS_RECORDED
    from meta_pipeline.learning.predict import predict_file

    try:
        domain = validate_domain(args.domain)
        result = predict_file(MetaStore(db_url=args.db_url or default_db_url()), domain, args.file,
                              version=args.version, as_of=args.as_of)
    except ContractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.version is not None or args.as_of is not None:
        print(f"note: overrides version {result.attrs.get('version')} of {domain}", file=sys.stderr)
    elif result.attrs.get("knobs_source") != KNOBS_RECORDED:  # e.g. no overrides: the knobs in effect decide tier2
        print(f"note: no knobs recorded with {domain}'s overrides (none stored?); tier2_enabled="
              f"{int(bool(result.attrs.get('tier2_enabled')))} from {result.attrs.get('knobs_source')}", file=sys.stderr)
    skipped = result.attrs.get("quarantine")
    if skipped is not None and len(skipped):
        print(f"warning: {len(skipped)} row(s) skipped for breaking the contract, first: line "
              f"{skipped['line'].iloc[0]}: {skipped['reason'].iloc[0]}", file=sys.stderr)
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        result[["trade_id", "edge"]].to_csv(out, index=False, float_format="%.6g")
    finally:
        if args.output:
            out.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="apply a domain's pm_overrides to a trades file; prints CSV trade_id,edge")
    p.add_argument("file", help="trades in the ingest contract (return_r optional)")
    p.add_argument("--domain", required=True)
    p.add_argument("--output", "-o", default=None, help="write the CSV here instead of stdout")
    p.add_argument("--db-url", default=None)
    when = p.add_mutually_exclusive_group()
    when.add_argument("--version", type=int, default=None, help="re-apply this past overrides version exactly")
    when.add_argument("--as-of", default=None, help="re-apply the overrides version in effect at this ISO-8601 time")
    p.set_defaults(func=cmd_predict)
