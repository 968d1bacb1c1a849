"""`meta-pipeline simulate`: the controller against simulated engines.

* `--evaluate [--json] [--seeds N]`: the closed-loop evaluation (rollback, convergence,
  regime shift, regret vs Optuna TPE) printed as a table or one JSON object;
* `--domains N --ticks T [--db-url URL] [--shift-at K]`: a live simulated fleet writing
  telemetry into the store with the knobs each domain's `controller_state` publishes,
  so that under `dagster dev` the telemetry sensor drives the controller and closes the loop
  (`--drive` materializes controller_state in process instead, no webserver needed).
"""

from __future__ import annotations

import argparse
import json
import math

from meta_pipeline.commands.errors import UserError, command, open_store
from meta_pipeline.contracts import validate_domain


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="evaluate the controller in closed loop (--evaluate), or run a live simulated fleet writing telemetry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--evaluate", action="store_true", help="run the closed-loop evaluation and print the results")
    p.add_argument("--json", action="store_true", help="with --evaluate: print one JSON object")
    p.add_argument("--seeds", type=int, default=5, help="with --evaluate: seeds 0..N-1 (default 5)")
    p.add_argument("--eval-domains", type=int, default=3, help="with --evaluate: engines per seed (default 3)")
    p.add_argument("--decisions", type=int, default=100, help="with --evaluate: decisions per run (default 100)")
    p.add_argument("--no-tpe", action="store_true", help="with --evaluate: skip the Optuna TPE baseline")
    p.add_argument("--runs", action="store_true", help="with --evaluate --json: include every run's row")
    p.add_argument("--domains", type=int, default=3, help="live: number of simulated domains (default 3)")
    p.add_argument("--domain-names", default=None, help="live: comma-separated domain names (default sim0..simN-1)")
    p.add_argument("--ticks", type=int, default=100, help="live: ticks per domain (default 100)")
    p.add_argument("--shift-at", type=int, default=None, help="live: tick at which every engine's optimum moves")
    p.add_argument("--seed", type=int, default=0, help="live: seed of the engines' optima and noise")
    p.add_argument("--interval", type=float, default=0.0, help="live: seconds to wait between ticks (default 0)")
    p.add_argument("--every-minutes", type=float, default=5.0, help="live: telemetry time step (default 5)")
    p.add_argument("--drive", action="store_true",
                   help="live: after each tick, materialize controller_state in process for every domain")
    p.add_argument("--no-register", action="store_true", help="live: do not add the domains as Dagster partitions")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")
    p.set_defaults(func=cmd_simulate)


@command
def cmd_simulate(args: argparse.Namespace) -> int:
    if args.evaluate:
        return _evaluate(args)
    return _live(args)


# ---------------------------------------------------------------------------
# --evaluate
# ---------------------------------------------------------------------------


def _fmt(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _dist_text(d: dict, digits: int = 3) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"mean {_fmt(d['mean'], digits)}  median {_fmt(d['median'], digits)}  [{_fmt(d['min'], digits)}, {_fmt(d['max'], digits)}]"


def format_evaluation(result: dict) -> str:
    """The evaluation as a plain-text report (tables of the summaries)."""
    lines = [
        f"controller closed-loop evaluation: seeds {result['seeds']}, {result['domains_per_seed']} engines per seed, "
        f"{result['n_decisions']} decisions per run, 1 tick per decision; rewards are EXPECTED (noise-free) "
        "rewards of the knobs in effect",
        "",
        "(a) planted harmful change (injected through the canary path after a warm-up)",
        f"  {'severity':<9} {'n':>3} {'planted drop (mean)':>20} {'back ≤3 decisions':>18} {'snapshot restored':>18}"
        "  decisions-to-return  outcomes",
    ]
    for sev in ("severe", "moderate", "mild"):
        r = result["rollback"].get(sev)
        if not r:
            continue
        lines.append(
            f"  {sev:<9} {r['n']:>3} {_fmt(r['planted_drop'].get('mean')):>20} {r['within_3_rate']:>18.0%} "
            f"{r['snapshot_restored_rate']:>18.0%}  "
            f"{json.dumps(r['decisions_to_return'])}  {json.dumps(r['outcomes'])}"
        )
    lines += ["", "(b) stationary engine: fraction of oracle (raw) and normalized (reward − random mean)/(oracle − random mean)"]
    for start, r in result["stationary"].items():
        lines += [
            f"  start = {start}",
            f"    at start            raw {_dist_text(r['start_fraction'])}",
            f"                        norm {_dist_text(r['start_normalized'])}",
            f"    at decision 100     raw {_dist_text(r['fraction_at_100'])}",
            f"                        norm {_dist_text(r['normalized_at_100'])}",
            f"    incumbent at 100    raw {_dist_text(r['incumbent_fraction_at_100'])}",
            f"    first hit ≥90% raw  {_dist_text(r['first_hit_90pct_oracle'], 1)}  (never: {r['first_hit_90pct_oracle_never']})",
            f"    first hit ≥0.9 norm {_dist_text(r['first_hit_90pct_normalized'], 1)}  (never: {r['first_hit_90pct_normalized_never']})",
            f"    ≥90% of oracle at decision 100: {r['reached_90pct_oracle_at_100_rate']:.0%} of runs",
        ]
    s = result["regime_shift"]
    lines += [
        "",
        "(c) regime shift at decision 50 (optimum mirrored): fractions of the NEW oracle",
        f"  before the shift      raw {_dist_text(s['fraction_before_shift'])}",
        f"  right after           raw {_dist_text(s['fraction_right_after'])}",
        f"  first ≥85% (decisions after shift) {_dist_text(s['first_hit_85pct'], 1)}  (never: {s['first_hit_85pct_never']})",
        f"  +100 decisions        raw {_dist_text(s['fraction_at_100'])}",
        f"                        norm {_dist_text(s['normalized_at_100'])}",
        f"  recovered ≥85% within 100 decisions: {s['recovered_85pct_within_100_rate']:.0%} of runs; "
        f"rollbacks after the shift {_dist_text(s['rollbacks_after_shift'], 1)}",
        "",
        "(d) regret over the first 100 decisions, Σ(oracle − expected reward), mean over the seed's engines",
    ]
    regret = result["regret"]
    seeds = [str(x) for x in result["seeds"]]
    lines.append(f"  {'method':<22}" + "".join(f"{'seed ' + x:>10}" for x in seeds) + f"{'mean':>10}")
    for method, r in regret.items():
        lines.append(f"  {method:<22}" + "".join(f"{r['per_seed'].get(x, float('nan')):>10.2f}" for x in seeds)
                     + f"{r['mean']:>10.2f}")
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    from meta_pipeline.lab.simulate import evaluate_controller

    if args.seeds < 1:
        raise UserError(None, f"--seeds must be at least 1 (got {args.seeds})")
    result = evaluate_controller(seeds=range(args.seeds), n_domains=args.eval_domains, n_decisions=args.decisions,
                                 include_tpe=not args.no_tpe)
    if args.json:
        if not args.runs:
            result.pop("runs", None)
        print(json.dumps(result, default=_json_default, allow_nan=True))
    else:
        print(format_evaluation(result))
    return 0


def _json_default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------
# live fleet
# ---------------------------------------------------------------------------


def _live(args: argparse.Namespace) -> int:
    import pandas as pd

    from meta_pipeline.lab.simulate import run_live_fleet

    if args.domain_names:
        names = [n.strip() for n in args.domain_names.split(",") if n.strip()]
    else:
        names = [f"sim{i}" for i in range(args.domains)]
    for name in names:
        validate_domain(name)  # ContractError: one line, exit 2 (cli.py)
    if not names:
        raise UserError("--domains/--domain-names", "no domain", "give at least one")
    if args.ticks < 1:
        raise UserError(None, f"--ticks must be at least 1 (got {args.ticks})")
    store = open_store(args)
    instance = None
    if not args.no_register or args.drive:
        import dagster as dg

        from meta_pipeline.commands.orchestration import get_instance, register_domains

        instance = get_instance() if not args.no_register else dg.DagsterInstance.ephemeral()
        new = register_domains(instance, names)
        if new and not args.no_register:
            print(f"registered domain partitions: {', '.join(new)}")
    after_round = _driver(store, names, instance) if args.drive else None
    summary = run_live_fleet(store, names, args.ticks, seed=args.seed, shift_at=args.shift_at,
                             every=pd.Timedelta(minutes=args.every_minutes), interval_s=args.interval,
                             after_round=after_round)
    print(f"wrote {int(summary['ticks'].sum())} telemetry ticks to {store.db_url}")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _driver(store, names: list[str], instance):
    """Materialize controller_state for every domain after each tick (in process, no webserver)."""
    import dagster as dg

    from meta_pipeline.defs.governance.controller import controller_state
    from meta_pipeline.defs.resources import StoreResource

    def after_round(tick: int) -> None:
        for name in names:
            result = dg.materialize([controller_state], partition_key=name, instance=instance,
                                    resources={"store": StoreResource(db_url=store.db_url)}, raise_on_error=False)
            if not result.success:
                raise RuntimeError(f"controller_state[{name}] failed at tick {tick}")

    return after_round
