"""meta-pipeline prompts: a task's starting prompt (init), what is stored (list, show), a run (evolve);
and the rows of `meta-pipeline ingest examples FILE --task NAME` (called from commands/data.py)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd

from meta_pipeline.commands.errors import UserError, abs_path, check_free_text, check_input_file, command, open_store
from meta_pipeline.contracts import ContractError, validate_task
from meta_pipeline.paths import dagster_home
from meta_pipeline.store import MetaStore

PROVIDER_ENV = "META_PIPELINE_LLM_PROVIDER"
DEMO_TASK = "commonsense-mc"


def _task(args: argparse.Namespace) -> str:
    try:
        return validate_task(args.task)
    except ContractError as exc:
        raise UserError("--task", str(exc)) from exc


# ---------------------------------------------------------------------------
# ingest examples (the branch of `meta-pipeline ingest` in commands/data.py)
# ---------------------------------------------------------------------------


def ingest_examples_command(args: argparse.Namespace, store: MetaStore) -> int:
    """`meta-pipeline ingest examples FILE --task NAME`: validate, land, register the task partition."""
    from meta_pipeline.prompts.examples import ingest_examples_file

    if args.domain is not None:
        raise UserError("--domain", "does not apply to examples", "name the task with --task NAME")
    if args.task is None:
        raise UserError(None, "ingest examples needs --task NAME (the task the examples belong to)")
    task = _task(args)
    path = check_input_file(abs_path(args.file))
    try:
        report = ingest_examples_file(store, path, task)
    except ContractError as exc:
        raise UserError(f"rejected {path}", str(exc).removeprefix(f"{path}: "), "fix the file and ingest it again") \
            from exc
    print(report.summary())
    if not args.no_dagster:
        from meta_pipeline.commands.orchestration import get_instance, register_tasks

        if register_tasks(get_instance(), [task]):
            print(f"registered new task partition {task!r} in Dagster ({dagster_home()})")
    if not report.ok:
        raise UserError(str(path), "nothing could be ingested from this file (see the quarantine reasons above)",
                        "fix the rows and ingest it again", code=1)
    return 0


# ---------------------------------------------------------------------------
# prompts init | list | show | evolve
# ---------------------------------------------------------------------------


@command
def cmd_prompts_init(args: argparse.Namespace) -> int:
    from meta_pipeline.prompts.runs import PromptSetupError, init_prompt

    task = _task(args)
    path = check_input_file(abs_path(args.file))
    by = check_free_text(args.by, "--by")
    text = path.read_text(encoding="utf-8")
    store = open_store(args)
    try:
        version, spec = init_prompt(store, task, text, actor=by)
    except PromptSetupError as exc:
        raise UserError(str(path), str(exc), "write one instruction per line") from exc
    print(f"task {task}: PROMPT_TEMPLATE version {version} is active ({len(spec.components)} instruction lines: "
          f"{', '.join(spec.kinds())})")
    if not args.no_dagster:
        from meta_pipeline.commands.orchestration import get_instance, register_tasks

        if register_tasks(get_instance(), [task]):
            print(f"registered new task partition {task!r} in Dagster ({dagster_home()})")
    return 0


@command
def cmd_prompts_list(args: argparse.Namespace) -> int:
    from meta_pipeline.store import prompts as prompt_rows

    store = open_store(args)
    runs = prompt_rows.read_prompt_runs(store, _task(args) if args.task else None)
    if runs.empty:
        print("no prompt evolution runs yet")
        return 0
    shown = runs[["task", "run_id", "started_at", "baseline_val", "best_val", "baseline_test", "best_test",
                  "p_value", "iterations", "converged", "calls", "tokens", "proposal_id"]].copy()
    shown["run_id"] = shown["run_id"].str.slice(0, 8)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


@command
def cmd_prompts_show(args: argparse.Namespace) -> int:
    from meta_pipeline.prompts.runs import active_prompt
    from meta_pipeline.store import prompts as prompt_rows

    task = _task(args)
    store = open_store(args)
    active = active_prompt(store, task)
    if active is None:
        print(f"task {task}: no PROMPT_TEMPLATE yet (meta-pipeline prompts init --task {task} --file PROMPT.txt)")
    else:
        version, spec, _ = active
        print(f"task {task}: active PROMPT_TEMPLATE version {version}\n" + "\n".join(
            f"  [{c.kind}] {c.text}" for c in spec.components)
            + (f"\n  + demonstrations: {', '.join(spec.demonstrations)}" if spec.demonstrations else ""))
    run = prompt_rows.latest_prompt_run(store, task)
    if run is not None:
        cands = prompt_rows.read_prompt_candidates(store, task, run["run_id"])
        print(f"\nlatest run {run['run_id'][:8]} ({run['provider']} {run['model']}): val {run['baseline_val']:.3f} -> "
              f"{run['best_val']:.3f} in {run['iterations']} iterations ({run['stop_reason']}); calls {run['calls']}")
        if pd.notna(run.get("best_test")):
            print(f"test {run['baseline_test']:.3f} -> {run['best_test']:.3f}, margin {run['win_margin']:+.3f} "
                  f"[{run['margin_ci_low']:+.3f}, {run['margin_ci_high']:+.3f}], p {run['p_value']:.3g}, "
                  f"proposal {_proposal(run)}")
        with pd.option_context("display.width", 200, "display.max_colwidth", 70):
            print(cands[["iteration", "candidate_id", "strategy", "val_score", "accepted", "calls", "note"]]
                  .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _proposal(run: dict) -> str:
    value = run.get("proposal_id")
    return value if isinstance(value, str) and value else "-"


def run_prompts_job(instance, store: MetaStore, task: str):
    """prompt_evolution + prompt_comparison for one task, in process, on the shared instance."""
    from meta_pipeline.commands.orchestration import QUIET_RUN_CONFIG, load_defs, register_tasks, with_store

    register_tasks(instance, [task])
    job = with_store(load_defs(), store).resolve_job_def("prompts_job")
    return job.execute_in_process(partition_key=task, instance=instance, raise_on_error=False,
                                  run_config=QUIET_RUN_CONFIG)


def _print_run(store: MetaStore, task: str) -> None:
    from meta_pipeline.store import prompts as prompt_rows

    run = prompt_rows.latest_prompt_run(store, task)
    if run is None:
        return
    print(f"  {task}: validation {run['baseline_val']:.3f} -> {run['best_val']:.3f} in {run['iterations']} iterations "
          f"({run['stop_reason']}); test static {run['baseline_test']:.3f} vs evolved {run['best_test']:.3f}, "
          f"p {run['p_value']:.3g}; {run['calls']} model calls ({run['cached_calls']} cached), "
          f"proposal {_proposal(run)}")


@command
def cmd_prompts_evolve(args: argparse.Namespace) -> int:
    from meta_pipeline.commands.orchestration import get_instance

    from meta_pipeline.llm import LLMConfigError, make_provider, settings_from_env

    task = _task(args)
    try:  # a model that cannot be used is one line before any run
        settings = settings_from_env()
        if not settings.enabled:
            raise LLMConfigError("no LLM provider: set META_PIPELINE_LLM_PROVIDER (openai, openai-compatible, "
                                 "anthropic or scripted) and META_PIPELINE_LLM_MODEL, see docs/prompts.md")
        if settings.provider != "scripted":
            make_provider(settings)
    except LLMConfigError as exc:
        raise UserError(None, str(exc)) from exc
    store = open_store(args)
    instance = get_instance()
    _register_sim_if_scripted(store, task)
    t = time.perf_counter()
    result = run_prompts_job(instance, store, task)
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        data = failure.step_failure_data if failure else None
        if data is not None and data.user_failure_data is not None and data.user_failure_data.description:
            detail = data.user_failure_data.description
        elif data is not None and data.error is not None:
            detail = data.error.message.strip().splitlines()[-1]
        else:
            detail = "see the run in the UI"
        raise UserError(f"--task {task}", f"prompt evolution failed: {detail}", code=1)
    print(f"prompts_job for {task}: ok in {time.perf_counter() - t:.1f}s (run {result.run_id[:8]})")
    _print_run(store, task)
    return 0


def _register_sim_if_scripted(store: MetaStore, task: str) -> None:
    """With the scripted provider and its default model, the simulated model of lab/prompt_sim.py answers
    (the task's planted truth if it is a sample task, else the commonsense one)."""
    from meta_pipeline.llm import settings_from_env

    settings = settings_from_env()
    if settings.provider == "scripted" and settings.resolved_model == "prompt-sim":
        from meta_pipeline.lab.prompt_sim import register_sim
        from meta_pipeline.store import prompts as prompt_rows

        register_sim(task, prompt_rows.read_examples(store, task))


def run_prompt_demo(store: MetaStore, instance) -> bool:
    """The demo's prompt step: the sample commonsense task with the simulated model (scripted provider)
    unless META_PIPELINE_LLM_PROVIDER names another; returns success."""
    from meta_pipeline.lab.prompt_sim import SAMPLE_TASKS, sample_tasks_dir
    from meta_pipeline.prompts.examples import ingest_examples_file
    from meta_pipeline.prompts.runs import active_prompt, init_prompt

    folder = sample_tasks_dir()
    data_file, prompt_file = SAMPLE_TASKS[DEMO_TASK]
    if not (folder / data_file).is_file():
        print(f"  skipped: the sample task files are not here ({folder})")
        return True
    os.environ.setdefault(PROVIDER_ENV, "scripted")  # the demo's default: offline, deterministic
    t = time.perf_counter()
    report = ingest_examples_file(store, folder / data_file, DEMO_TASK)
    if active_prompt(store, DEMO_TASK) is None:
        init_prompt(store, DEMO_TASK, (folder / prompt_file).read_text(encoding="utf-8"), actor="demo")
    _register_sim_if_scripted(store, DEMO_TASK)
    result = run_prompts_job(instance, store, DEMO_TASK)
    print(f"  {DEMO_TASK}: {report.ingested} examples, provider {os.environ[PROVIDER_ENV]}: "
          f"{'ok' if result.success else 'FAILED'} in {time.perf_counter() - t:.1f}s (run {result.run_id[:8]})")
    if result.success:
        _print_run(store, DEMO_TASK)
    return bool(result.success)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="prompt evolution of a task: init the starting prompt, list/show runs, evolve")
    psub = p.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")

    def db(q: argparse.ArgumentParser) -> None:
        q.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")

    q = psub.add_parser("init", help="make a text file (one instruction per line) the task's PROMPT_TEMPLATE")
    q.add_argument("--task", required=True)
    q.add_argument("--file", required=True, help="the prompt: one instruction per line")
    q.add_argument("--by", default="cli", help="who sets it (config change log)")
    q.add_argument("--no-dagster", action="store_true", help="do not register the task partition")
    db(q)
    q.set_defaults(func=cmd_prompts_init)

    q = psub.add_parser("list", help="prompt evolution runs (all tasks, or --task)")
    q.add_argument("--task", default=None)
    db(q)
    q.set_defaults(func=cmd_prompts_list)

    q = psub.add_parser("show", help="a task's active prompt and its latest run's candidates")
    q.add_argument("--task", required=True)
    db(q)
    q.set_defaults(func=cmd_prompts_show)

    q = psub.add_parser("evolve", help="run prompt_evolution + prompt_comparison for a task in process "
                                       "(the model: META_PIPELINE_LLM_*)")
    q.add_argument("--task", required=True)
    db(q)
    q.set_defaults(func=cmd_prompts_evolve)


def evaluate_prompts(args: argparse.Namespace) -> int:
    """`meta-pipeline evaluate --section prompts`: both sample tasks × --seeds seeds of the simulated model."""
    import json
    import sys

    from meta_pipeline.lab.prompt_sim import PromptEvalConfig, format_prompts_report, jsonable_runs, prompts_section

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    seeds = tuple(range(args.seed0, args.seed0 + args.seeds))
    t = time.perf_counter()
    results = jsonable_runs(prompts_section(PromptEvalConfig(seeds=seeds), progress=progress))
    report = format_prompts_report(results) + f"\n\n({time.perf_counter() - t:.0f} s)"
    (out / "prompts.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "prompts.md").write_text(report + "\n")
    print(json.dumps(results, indent=1, sort_keys=True) if args.json else report)
    if not args.json:
        print(f"\nfull results {out}/prompts.json, {out}/prompts.md")
    return 0
