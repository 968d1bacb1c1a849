"""meta-pipeline evaluate: the learn-to-learn benchmark (warm start, negative transfer,
retention, adaptation time, Reptile check); prints one table and saves a plot."""

from __future__ import annotations

import argparse
import json
import sys

from meta_pipeline.commands.errors import UserError, abs_path, command


def _closed_loop(args: argparse.Namespace, progress) -> int:
    """The closed loop's figures: the drift monitor's bench and the planted-break fleets (lab)."""
    from pathlib import Path

    from meta_pipeline.lab.closed_loop_eval import ClosedLoopConfig, closed_loop_section, format_closed_loop
    from meta_pipeline.lab.drift_bench import drift_report, format_drift_report
    from meta_pipeline.lab.evaluate import jsonable

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # an OSError names --out (cli.py)
    results: dict = {}
    text: list[str] = []
    if args.section in ("drift", "closed-loop"):
        if progress:
            progress(f"drift monitor bench ({'quick' if args.quick else 'full'})")
        results["drift"] = drift_report(quick=args.quick, seed=args.seed0)
        text.append(format_drift_report(results["drift"]))
    if args.section == "closed-loop":
        seeds = tuple(range(args.seed0, args.seed0 + args.seeds))
        results["closed_loop"] = closed_loop_section(ClosedLoopConfig(seeds=seeds), progress=progress)
        text.append(format_closed_loop(results["closed_loop"]))
    (out / f"{args.section}.json").write_text(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str))
    report = "\n\n".join(text)
    (out / f"{args.section}.md").write_text(report + "\n")
    print(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/{args.section}.json, {out}/{args.section}.md")
    return 0


def _governance(args: argparse.Namespace, progress) -> int:
    """Proposals on planted and null trades-only fleets (lab.governance_fleets)."""
    from pathlib import Path

    from meta_pipeline.lab.evaluate import jsonable
    from meta_pipeline.lab.governance_fleets import governance_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, report = governance_report(tuple(range(args.seed0, args.seed0 + args.seeds)), progress=progress)
    (out / "governance.json").write_text(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str))
    (out / "governance.md").write_text(report + "\n")
    print(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/governance.json, {out}/governance.md")
    return 0


def _seed_targets(args: argparse.Namespace, progress) -> int:
    """The meta-learning seed's targets on a 1,000-task stream (lab.seed_targets)."""
    from pathlib import Path

    from meta_pipeline.lab.seed_targets import seed_targets_report

    if args.tasks < 2:
        raise UserError(None, f"--tasks must be at least 2 (got {args.tasks})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, report = seed_targets_report(range(args.seed0, args.seed0 + args.seeds), n_tasks=args.tasks,
                                          dagster=not args.no_dagster, progress=progress)
    (out / "seed-targets.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    (out / "seed-targets.md").write_text(report + "\n")
    print(json.dumps(results, indent=1, sort_keys=True, default=str) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/seed-targets.json, {out}/seed-targets.md")
    return 0


def _knob_tuning(args: argparse.Namespace, progress) -> int:
    """The controller tuning the learning knobs by paired knob trials vs defaults, oracle sweep, TPE (lab.knob_tuning_eval)."""
    from pathlib import Path

    from meta_pipeline.lab.evaluate import jsonable
    from meta_pipeline.lab.knob_tuning_eval import KnobTuningConfig, format_knob_tuning, knob_tuning_section

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = KnobTuningConfig(seeds=tuple(range(args.seed0, args.seed0 + args.seeds)))
    results = knob_tuning_section(cfg, progress=progress)
    report = format_knob_tuning(results)
    (out / "knob-tuning.json").write_text(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str))
    (out / "knob-tuning.md").write_text(report + "\n")
    print(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/knob-tuning.json, {out}/knob-tuning.md")
    return 0


def _knobs(args: argparse.Namespace, progress) -> int:
    """Each knob's effect on held-out override predictions, on fleets where it binds (lab.knob_fleets)."""
    from pathlib import Path

    from meta_pipeline.lab.evaluate import jsonable
    from meta_pipeline.lab.knob_fleets import format_knobs_section, knobs_section

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = knobs_section(range(args.seed0, args.seed0 + args.seeds), progress=progress)
    report = format_knobs_section(results)
    (out / "knobs.json").write_text(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str))
    (out / "knobs.md").write_text(report + "\n")
    print(json.dumps(jsonable(results), indent=1, sort_keys=True, default=str) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/knobs.json, {out}/knobs.md")
    return 0


@command
def cmd_evaluate(args: argparse.Namespace) -> int:
    from meta_pipeline.lab.evaluate import EvaluationConfig, format_table, jsonable, run_evaluation

    if args.seeds < 1:
        raise UserError(None, f"--seeds must be at least 1 (got {args.seeds})")
    args.out = str(abs_path(args.out))
    if args.section == "knobs":
        progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
        return _knobs(args, progress)
    if args.section == "knob-tuning":
        progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
        return _knob_tuning(args, progress)
    if args.section == "seed-targets":
        progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
        return _seed_targets(args, progress)
    if args.section == "intervals":  # half-life intervals on varied synthetic fleets (commands/evaluate_intervals.py)
        from meta_pipeline.commands.evaluate_intervals import evaluate_intervals

        return evaluate_intervals(args, None if args.quiet else
                                  (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)))
    if args.section == "prompts":  # prompt evolution on the sample tasks, simulated model (commands/prompts.py)
        from meta_pipeline.commands.prompts import evaluate_prompts

        return evaluate_prompts(args)
    if args.section == "governance":
        progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
        return _governance(args, progress)
    if args.section != "learn-to-learn":
        progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
        return _closed_loop(args, progress)
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
            "Simulated fleets with planted truth. --section learn-to-learn (default): planted knob optima; "
            "prints one table (mean [95% CI] over seeds, target, met) and saves evaluate.png / evaluate.json in "
            "--out. --section drift: the drift monitor's false-alarm rate and delays by simulation, River side by "
            "side. --section closed-loop: drift plus fleets with a planted break (detection delay, false alarms, "
            "re-learned vs stale vs plain re-fit vs oracle overrides); --seeds fleets. --section seed-targets: the "
            "meta-learning seed's six targets (convergence, few-shot, transfer, retention over --tasks sequential "
            "tasks, adaptation time through Dagster, learning efficiency), each with its definition and met or not."
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
    p.add_argument("--section", choices=["learn-to-learn", "drift", "closed-loop", "governance", "knobs", "knob-tuning", "seed-targets", "prompts", "intervals"], default="learn-to-learn",
                   help="which benchmark (default learn-to-learn)")
    p.add_argument("--tasks", type=int, default=1000,
                   help="seed-targets: sequential domain tasks per seed (default 1000; use --seeds 3)")
    p.add_argument("--quick", action="store_true", help="drift/closed-loop: a quick drift bench (wider CIs)")
    # --section intervals: half-life interval coverage / state accuracy, --seeds domains per generator
    # variant (7 variants; --seeds 4 gives > 300 planted decaying lessons, ~3-6 min); see lab/interval_eval.py
    # --section knobs: each knob from bound to bound on its fleet, ~30 s per seed (use --seeds 5); see lab/knob_fleets.py
    # --section knob-tuning: 3 situations x --seeds fleets, ~1 min each (use --seeds 2); see lab/knob_tuning_eval.py
    p.set_defaults(func=cmd_evaluate)
