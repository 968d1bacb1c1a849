"""synth, ingest, demo, backfill: getting data in and the fleet computed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from meta_pipeline.commands.errors import UserError, abs_path, check_input_file, command, open_store
from meta_pipeline.contracts import GOVERNANCE_KINDS, KINDS, TASK_KINDS, ContractError, validate_domain, validate_task
from meta_pipeline.ingest import ingest_file
from meta_pipeline.paths import dagster_home, data_dir
from meta_pipeline.store import MetaStore


def _store(args: argparse.Namespace) -> MetaStore:
    """The store of --db-url / META_PIPELINE_DB_URL / data/meta.db, reached (or one error line)."""
    return open_store(args)


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")


# ---------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------


@command
def cmd_synth(args: argparse.Namespace) -> int:
    from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_fleet_files

    cfg = FleetConfig(n_domains=args.domains, n_trades=args.trades, seed=args.seed,
                      outlier_domain=args.outlier, domain_prefix=args.prefix, break_at_days=args.break_at_days)
    out = abs_path(args.out)
    store = _store(args) if args.load else None  # a bad --db-url fails before the fleet is generated
    fleet = generate_fleet(cfg)
    if args.inbox:
        # the inbox layout: <inbox>/<domain>/<kind>/<file>, picked up by the inbox sensor
        for name, data in fleet.domains.items():
            from meta_pipeline.lab.synth import write_telemetry_file, write_trades_file

            write_trades_file(data.train_trades, out / name / "trades" / f"trades-seed{args.seed}.{args.format}")
            write_telemetry_file(data.telemetry, out / name / "telemetry" / f"telemetry-seed{args.seed}.{args.format}")
    else:
        write_fleet_files(fleet, out, fmt=args.format)
    print(f"wrote {len(fleet.domains)} domains ({args.trades} trades each, training window only) to {out}")
    if store is not None:
        _load_fleet(store, fleet, out, args.format, register=True)
    return 0


def _load_fleet(store: MetaStore, fleet, folder: Path, fmt: str, register: bool) -> list[str]:
    """Ingest a written fleet through the user path, plus its backtest runs; register partitions."""
    from meta_pipeline.lab.synth import write_fleet_files

    paths = write_fleet_files(fleet, folder, fmt=fmt)
    for name, files in paths.items():
        for kind in ("trades", "telemetry"):
            report = ingest_file(store, kind, files[kind], name)
            print("  " + report.summary().replace("\n", "\n  "))
        store.replace_partition("backtest_runs", name, fleet.domains[name].backtests)
    domains = list(paths)
    if register:
        from meta_pipeline.commands.orchestration import get_instance, register_domains

        register_domains(get_instance(), domains)
    return domains


# ---------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------


def _ingest_target(args: argparse.Namespace) -> str:
    """The partition a file lands in: --domain for trades/telemetry, --task for feedback (ContractError if wrong)."""
    if args.kind in TASK_KINDS:
        if args.domain is not None:
            raise ContractError(f"--domain does not apply to {args.kind}: name the model with --task NAME")
        if args.task is None:
            raise ContractError(f"ingest {args.kind} needs --task NAME (the model whose outputs were rated)")
        return validate_task(args.task)
    if args.task is not None:
        raise ContractError(f"--task applies to feedback only: {args.kind} takes --domain NAME")
    if args.domain is None:
        raise ContractError(f"ingest {args.kind} needs --domain NAME")
    return validate_domain(args.domain)


@command
def cmd_ingest(args: argparse.Namespace) -> int:
    if args.kind == "examples":  # a prompt task's labelled examples (meta_pipeline.commands.prompts)
        from meta_pipeline.commands.prompts import ingest_examples_command

        return ingest_examples_command(args, _store(args))
    target = _ingest_target(args)
    path = check_input_file(abs_path(args.file))
    store = _store(args)
    try:
        report = ingest_file(store, args.kind, path, target)
    except ContractError as exc:
        message = str(exc).removeprefix(f"{path}: ")  # the file is named once, in front
        raise UserError(f"rejected {path}", message, "fix the file and ingest it again") from exc
    print(report.summary())
    if not args.no_dagster:
        from meta_pipeline.commands.orchestration import get_instance, register_domains, register_tasks, report_ingest

        instance = get_instance()
        if args.kind in TASK_KINDS:
            if register_tasks(instance, [target]):
                print(f"registered new task partition {target!r} in Dagster ({dagster_home()})")
        elif register_domains(instance, [target]):
            print(f"registered new domain partition {target!r} in Dagster ({dagster_home()})")
        if args.kind not in GOVERNANCE_KINDS:  # backtests/configs are read by diagnostics, not a source asset
            report_ingest(instance, report)
    if not report.ok:
        raise UserError(str(path), "nothing could be ingested from this file (see the quarantine reasons above)",
                        "fix the rows and ingest it again", code=1)
    return 0


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from meta_pipeline.commands.orchestration import get_instance, run_domain_job, run_fleet_job
    from meta_pipeline.lab.synth import FleetConfig, generate_fleet

    started = time.perf_counter()
    store = _store(args)
    instance = get_instance()
    print(f"store: {store.db_url}\nDagster home: {dagster_home()}")
    fleet = generate_fleet(FleetConfig(n_domains=args.domains, n_trades=args.trades, seed=args.seed))
    print(f"1/4 synthetic fleet: {args.domains} domains × {args.trades} trades, written as CSV and ingested")
    domains = _load_fleet(store, fleet, data_dir() / "demo_files", "csv", register=True)

    print(f"2/4 the closed loop on {domains[0]}: walk-forward replay every 10 days (overrides as of past times, "
          "each scored on the trades after it)")
    failed = []
    from meta_pipeline.commands.orchestration import load_defs, with_store
    from meta_pipeline.defs.learning.replay import replay_domain, replay_grid

    t = time.perf_counter()
    closed = store.read("trades", domain=domains[0], columns=["closed_at"])["closed_at"]
    replay = replay_domain(with_store(load_defs(), store).resolve_job_def("relearn_job"), instance, store, domains[0],
                           replay_grid(closed, pd.Timedelta(days=10)))
    print(f"  {domains[0]}: {'ok' if replay.success else 'FAILED'}: {len(replay.steps)} runs in "
          f"{time.perf_counter() - t:.1f}s, {store.count('pm_overrides_versions', domains[0])} overrides versions")
    if not replay.success:
        failed.append(domains[0])

    print("3/4 materializing every per-domain asset for every domain (domain_refresh_job)")
    for domain in domains:
        t = time.perf_counter()
        result = run_domain_job(instance, domain, store)
        status = "ok" if result.success else "FAILED"
        print(f"  {domain}: {status} in {time.perf_counter() - t:.1f}s (run {result.run_id[:8]})")
        if not result.success:
            failed.append(domain)
    print("4/4 cross-domain assets (fleet_refresh_job)")
    fleet_result = run_fleet_job(instance, store)
    print(f"  fleet: {'ok' if fleet_result.success else 'FAILED'} (run {fleet_result.run_id[:8]})")
    print("prompts: prompt evolution of the sample task commonsense-mc (docs/prompts.md; default model: the "
          "simulated one, META_PIPELINE_LLM_PROVIDER=scripted)")
    from meta_pipeline.commands.prompts import run_prompt_demo

    if not run_prompt_demo(store, instance):
        failed.append("prompts")

    print("\nSummary")
    for table_name in (
        "trades", "quarantine", "learning_lessons", "half_life_fits", "latent_factors",
        "learning_regime_weights", "pm_overrides", "pm_overrides_versions", "feedback_cycles", "drift_events",
        "domain_priors", "global_prior",
        "controller_state", "meta_decisions", "diagnostics", "meta_controller_config_proposals",
    ):
        try:
            print(f"  {table_name:34s} {store.count(table_name):>9,d} rows")
        except Exception as exc:  # pragma: no cover - summary only
            print(f"  {table_name:34s} unavailable ({exc})")
    _print_top_overrides(store, domains[0])
    cycles = store.read("feedback_cycles", domain=domains[0], order_by="cycle")
    if len(cycles):
        print(f"\nFeedback cycles of {domains[0]} (realized outcomes vs the overrides that predicted them):")
        with pd.option_context("display.width", 140):
            print(cycles[["cycle", "overrides_version", "n", "rank_ic", "ic_t", "mz_slope", "alignment",
                          "drift_alarm"]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\ndone in {time.perf_counter() - started:.1f}s.")
    print("Open the UI:  make ui   (dagster dev on http://127.0.0.1:3000, same DAGSTER_HOME)")
    return 1 if failed or not fleet_result.success else 0


def _print_top_overrides(store: MetaStore, domain: str) -> None:
    overrides = store.read("pm_overrides", domain=domain)
    if overrides.empty:
        return
    top = overrides.reindex(overrides["edge"].abs().sort_values(ascending=False).index).head(5)
    print(f"\nTop overrides in {domain}:")
    with pd.option_context("display.width", 140, "display.max_colwidth", 50):
        print(top[["latent_factor_id", "lesson_key", "regime", "edge", "support"]].to_string(index=False))


# ---------------------------------------------------------------------------
# backfill
# ---------------------------------------------------------------------------


@command
def cmd_backfill(args: argparse.Namespace) -> int:
    from meta_pipeline.commands.orchestration import get_instance, run_domain_job, run_fleet_job

    if args.webserver:
        from meta_pipeline.commands.graphql import graphql_client

        graphql_client(args.webserver)  # a malformed URL fails before the instance is loaded
    store = None if args.webserver else _store(args)  # a bad --db-url fails before any run
    instance = get_instance()
    known = instance.get_dynamic_partitions("domain")
    domains = args.domains or known
    unknown = sorted(set(domains) - set(known))
    if unknown:
        raise UserError("--domains", f"unknown domain partition(s): {', '.join(unknown)} "
                        f"(known: {', '.join(known) or 'none'})", "ingest their data first, or check the names")
    if args.webserver:
        from meta_pipeline.commands.graphql import launch_partition_backfill

        if not domains:
            raise UserError(None, f"no domain partitions in Dagster ({dagster_home()}) to backfill",
                            "ingest some data first (meta-pipeline ingest / demo), or name them with --domains")
        backfill_id = launch_partition_backfill(args.webserver, domains)
        print(f"launched backfill {backfill_id} over {len(domains)} domain(s); the daemon runs one run per domain")
        return 0
    failed = 0
    for domain in domains:
        result = run_domain_job(instance, domain, store)
        print(f"{domain}: {'ok' if result.success else 'FAILED'} (run {result.run_id[:8]})")
        failed += not result.success
    result = run_fleet_job(instance, store)
    print(f"fleet: {'ok' if result.success else 'FAILED'}")
    return 1 if failed or not result.success else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic fleet with planted truth (files; --load ingests them)")
    p.add_argument("--out", default=str(data_dir() / "synth"))
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--trades", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="dom")
    p.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    p.add_argument("--outlier", action="store_true", help="plant one domain whose knob optimum is far from the rest")
    p.add_argument("--break-at-days", type=float, default=None,
                   help="plant a break: two signals' edges flip sign this many days into the history")
    p.add_argument("--inbox", action="store_true", help="write in the inbox layout <out>/<domain>/<kind>/")
    p.add_argument("--load", action="store_true", help="also ingest into the store and register partitions")
    _add_db(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="ingest a trades, telemetry, backtests or configs (per domain) or feedback "
                                      "(per task) file (CSV, JSON Lines, Parquet)")
    p.add_argument("kind", choices=[*KINDS, "examples"])  # examples: a prompt task's, per task
    p.add_argument("file")
    p.add_argument("--domain", default=None, help="the domain (trades, telemetry, backtests, configs)")
    p.add_argument("--task", default=None,
                   help="the task (feedback): any model whose outputs are rated; columns ts, input, output, score")
    p.add_argument("--no-dagster", action="store_true", help="do not register the partition / record the event")
    _add_db(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("demo", help="synthetic fleet -> store -> every asset for every domain -> summary")
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--trades", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    _add_db(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("backfill", help="recompute domains: in process, or through a webserver's GraphQL API")
    p.add_argument("--domains", nargs="*", default=None)
    p.add_argument("--webserver", default=None, metavar="URL",
                   help="e.g. http://127.0.0.1:3000: launch a partition backfill there (the daemon runs it)")
    _add_db(p)
    p.set_defaults(func=cmd_backfill)
