"""What the two assets do, as plain functions: one run of prompt evolution for a task, and its
comparison with the static prompt on the test split (the proposal itself is made in defs, which
may use governance). The starting prompt is the task's active PROMPT_TEMPLATE config."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from meta_pipeline.contracts import validate_task
from meta_pipeline.llm import LLMClient, flush_call_records
from meta_pipeline.prompts.comparison import TARGET_TYPE, TestComparison, compare_on_test
from meta_pipeline.prompts.evolution import EvolutionResult, EvolutionSettings, evolve
from meta_pipeline.prompts.examples import TaskData, load_task
from meta_pipeline.prompts.spec import PromptSpec
from meta_pipeline.store import MetaStore
from meta_pipeline.store import prompts as prompt_rows


class PromptSetupError(ValueError):
    """The task is not ready for prompt evolution (no examples, no starting prompt); says what to run."""


def init_prompt(store: MetaStore, task: str, text: str, actor: str = "cli") -> tuple[int, PromptSpec]:
    """Make ``text`` (one instruction per line) the task's active PROMPT_TEMPLATE; returns (version, spec)."""
    validate_task(task)
    spec = PromptSpec.from_text(text)
    if not spec.components:
        raise PromptSetupError("the prompt file has no instruction line")
    version = prompt_rows.set_prompt_template(store, task, spec.to_json(), actor, pd.Timestamp.now(tz="UTC"))
    return version, spec


def active_prompt(store: MetaStore, task: str) -> tuple[int, PromptSpec, dict] | None:
    """(version, spec, config) of the task's active PROMPT_TEMPLATE, or None."""
    found = store.active_config(TARGET_TYPE, validate_task(task))
    if found is None:
        return None
    version, config = found
    return version, PromptSpec.from_config(config), config


def ready_task(store: MetaStore, task: str, train: float, val: float) -> tuple[TaskData, int, PromptSpec]:
    try:
        data = load_task(store, task, train=train, val=val)
    except ValueError as exc:
        raise PromptSetupError(str(exc)) from exc
    start = active_prompt(store, task)
    if start is None:
        raise PromptSetupError(f"task {task} has no starting prompt: meta-pipeline prompts init --task {task} "
                               "--file PROMPT.txt")
    return data, start[0], start[1]


@dataclass
class EvolutionRun:
    row: dict
    result: EvolutionResult
    data: TaskData


def run_prompt_evolution(store: MetaStore, client: LLMClient, task: str, run_id: str,
                         settings: EvolutionSettings | None = None, *, train: float = 0.4, val: float = 0.3,
                         progress: Callable[[str], None] | None = None) -> EvolutionRun:
    """Evolve the task's active prompt; writes prompt_runs (test columns empty), prompt_candidates, llm_calls."""
    data, version, start = ready_task(store, task, train, val)
    started = pd.Timestamp.now(tz="UTC")
    try:
        result = evolve(client, data, start, settings, progress=progress)
    finally:
        flush_call_records(store, client)
    pool = data.by_id
    row = {
        "task": task, "run_id": run_id, "started_at": started, "provider": client.settings.provider,
        "model": client.model, "start_config_version": version, "baseline_prompt": start.render(pool),
        "best_prompt": result.best.render(pool), "best_candidate_id": result.best_id,
        "best_spec_json": result.best.to_json(), "n_train": len(data.train), "n_val": len(data.val),
        "n_test": len(data.test), "baseline_val": result.baseline_val, "best_val": result.best_val,
        "iterations": result.iterations, "converged": result.converged, "stop_reason": result.stop_reason,
        "calls": client.usage.calls, "cached_calls": client.usage.cached, "tokens": client.usage.tokens,
    }
    prompt_rows.insert_prompt_run(store, row, result.candidates)
    return EvolutionRun(row, result, data)


@dataclass
class ComparisonRun:
    run: dict  # the prompt_runs row compared
    data: TaskData
    baseline: PromptSpec
    best: PromptSpec
    comparison: TestComparison
    accepted_strategies: list[str]


def compare_latest_run(store: MetaStore, client: LLMClient, task: str, *, train: float = 0.4, val: float = 0.3,
                       seed: int = 0) -> ComparisonRun:
    """Score the latest run's static and evolved prompts on the test split (paired)."""
    run = prompt_rows.latest_prompt_run(store, task)
    if run is None:
        raise PromptSetupError(f"task {task} has no prompt_evolution run yet: materialize prompt_evolution first")
    data = load_task(store, task, train=train, val=val)
    candidates = prompt_rows.read_prompt_candidates(store, task, run["run_id"])
    start_row = candidates[candidates["iteration"] == 0]
    baseline = PromptSpec.from_config(json.loads(start_row["spec_json"].iloc[0]))
    best = PromptSpec.from_config(json.loads(run["best_spec_json"]))
    try:
        comparison = compare_on_test(client, data, baseline, best, seed=seed)
    finally:
        flush_call_records(store, client)
    accepted = candidates[(candidates["iteration"] > 0) & candidates["accepted"].astype(bool)]
    return ComparisonRun(run, data, baseline, best, comparison, accepted["strategy"].tolist())


def finish_run(store: MetaStore, task: str, cmp: ComparisonRun, comparison_run_ids: list[str],
               proposal_id: str | None) -> dict:
    """Fill the run's test columns and its totals over both assets' calls (the rationale included)."""
    usage = prompt_rows.run_usage(store, [cmp.run["run_id"], *comparison_run_ids])
    p = cmp.comparison.paired
    values = {"baseline_test": p.baseline_accuracy, "best_test": p.candidate_accuracy, "win_margin": p.margin,
              "margin_ci_low": p.ci_low, "margin_ci_high": p.ci_high, "p_value": p.p_value, "test_method": p.method,
              "proposal_id": proposal_id, "compared_at": pd.Timestamp.now(tz="UTC"), "calls": usage["calls"],
              "cached_calls": usage["cached"], "tokens": usage["tokens"]}
    prompt_rows.update_prompt_run(store, task, cmp.run["run_id"], values)
    return {**cmp.run, **values}
