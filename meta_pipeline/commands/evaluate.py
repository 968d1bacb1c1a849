"""meta-pipeline evaluate: the learn-to-learn benchmark (warm start, negative transfer,
retention, adaptation time, Reptile check); prints one table and saves a plot."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_evaluate(args: argparse.Namespace) -> int:
    from meta_pipeline.lab.evaluate import EvaluationConfig, jsonable, format_table, run_evaluation

    if args.seeds < 1:
        print("error: --seeds must be at least 1", file=sys.stderr)
        return 2
    reptile_kwargs = {} if args.reptile_iterations is None else {"n_meta_iterations": args.reptile_iterations}
    config = EvaluationConfig(
        seeds=args.seeds,
        seed0=args.seed0,
        optuna=not args.no_optuna,
        dagster_timing=not args.no_dagster,
        reptile_check=not args.no_reptile,
        reptile_kwargs=reptile_kwargs,
    )
    progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    results = run_evaluation(args.seeds, config, out_dir=args.out, progress=progress)
    if args.json:
        print(json.dumps(jsonable(results), indent=1, sort_keys=True))
        return 0
    print(format_table(results["table"]))
    print(
        f"\nseeds {results['seeds'][0]}..{results['seeds'][-1]} (seed0={args.seed0}); "
        f"plot {results.get('figure_path', '-')}; full results {args.out}/evaluate.json; "
        f"{results['total_seconds']:.0f} s"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="learn-to-learn benchmark: warm start, negative transfer, retention, adaptation time, Reptile check",
        description=(
            "Simulated fleets with planted optima. Prints one table (mean [95%% CI] over seeds, target, met) "
            "and saves evaluate.png / evaluate.json in --out."
        ),
    )
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (fleets) per section (default 10)")
    p.add_argument("--seed0", type=int, default=0, help="root seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON instead of the table")
    p.add_argument("--out", default="evaluate_out", help="folder for evaluate.png and evaluate.json")
    p.add_argument("--no-optuna", action="store_true", help="skip the Optuna TPE baselines")
    p.add_argument("--no-dagster", action="store_true", help="skip timing the adaptation through Dagster")
    p.add_argument("--no-reptile", action="store_true", help="skip the sinusoid Reptile check")
    p.add_argument("--reptile-iterations", type=int, default=None,
                   help="meta-iterations of the sinusoid check (default: sinusoid_check's own)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_evaluate)
