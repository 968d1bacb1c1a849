"""meta-pipeline evaluate --section intervals: half-life interval coverage and state accuracy on varied fleets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def evaluate_intervals(args: argparse.Namespace, progress) -> int:
    """--seeds domains per generator variant (lab.interval_eval); prints the table, writes intervals.{json,md}."""
    from meta_pipeline.lab.evaluate import jsonable
    from meta_pipeline.lab.interval_eval import IntervalEvalConfig, format_intervals, interval_section

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = tuple(range(args.seed0, args.seed0 + args.seeds))
    cfg = IntervalEvalConfig(seeds=seeds, break_seeds=seeds[:2])
    results = interval_section(cfg, progress=progress)
    report = format_intervals(results)
    for method in results["methods"].values():  # per-lesson rows go to a CSV, not the JSON
        method.pop("rows", None)
    (out / "intervals.json").write_text(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str))
    (out / "intervals.md").write_text(report + "\n")
    print(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/intervals.json, {out}/intervals.md")
    return 0
