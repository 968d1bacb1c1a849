"""`meta-pipeline bench`: time and memory of ingest and every learning asset, by size."""

from __future__ import annotations

import argparse
import json
import sys

from meta_pipeline.commands.errors import UserError, abs_path, command
from meta_pipeline.lab.bench import TIER_CHOICES, BenchOptions, render_console, run_bench


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark ingest and the learning assets against naive baselines and the floor",
        description=(
            "Generate synthetic trades (small ≈ 10k, medium ≈ 100k, large ≈ 1M in one domain plus a 20-domain "
            "fleet), then time ingest and every learning asset through the code the assets run, with peak memory; "
            "compare with naive baselines, the floor and Dagster runs. Writes report.md, report.json and "
            "scaling.png to --out and prints the table."
        ),
    )
    p.add_argument("--tier", choices=TIER_CHOICES, default="small",
                   help="small | medium | large | xlarge (5M) | all (small+medium+large) | scale "
                        "(medium+large+xlarge: the exponents across 100k/1M/5M)")
    p.add_argument("--out", default="bench_out", help="folder for report.md, report.json, scaling.png (default bench_out)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of the table")
    p.add_argument("--repeat", type=int, default=1, help="repeat each timing N times and report medians (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--naive-budget", type=float, default=60.0,
                   help="seconds a naive baseline may take before it is timed on a sample and extrapolated (default 60)")
    p.add_argument("--no-dagster", action="store_true", help="skip the `dagster asset materialize` measurements")
    p.add_argument("--no-cli", action="store_true",
                   help="skip the CLI path (`meta-pipeline ingest` + `dagster asset materialize`, up to 1M trades)")
    p.add_argument("--no-fleet", action="store_true", help="skip the 20-domain fleet of the large tier")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baselines (minutes at 5M trades)")
    p.add_argument("--no-controller-day", action="store_true",
                   help="skip the controller runs and Dagster storage per simulated day at 100 domains")
    p.add_argument("--trades", type=int, nargs="+", default=None, help=argparse.SUPPRESS)  # explicit sizes (tests)
    p.add_argument("--keep-data", action="store_true", help="keep the generated files and databases under OUT/work")
    p.set_defaults(func=cmd_bench)


@command
def cmd_bench(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise UserError(None, f"--repeat must be at least 1 (got {args.repeat})")
    if args.trades is not None and any(n < 1 for n in args.trades):
        raise UserError(None, f"--trades: every size must be at least 1 (got {' '.join(map(str, args.trades))})")
    # absolute before use: the bench starts worker processes and a DAGSTER_HOME under --out in other folders
    out = abs_path(args.out)
    opts = BenchOptions(repeat=args.repeat, seed=args.seed, naive_budget_s=args.naive_budget,
                        dagster=not args.no_dagster, fleet=not args.no_fleet, naive=not args.no_naive,
                        controller_day=not args.no_controller_day, cli=not args.no_cli,
                        keep_data=args.keep_data)
    command = "meta-pipeline " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("meta-pipeline") else None
    progress = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = run_bench(args.tier, out, opts, sizes=args.trades, command=command, progress=progress)  # BenchError: exit 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_console(result))
        print(f"\nreport: {out}/report.md, {out}/report.json, plot {out}/scaling.png")
    return 0
