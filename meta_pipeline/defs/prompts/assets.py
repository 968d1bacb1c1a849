"""Prompt evolution in Dagster, one ``task`` partition each (docs/prompts.md).

* ``prompt_evolution`` — the task's examples split train/validation/test (by example id);
  from the task's active PROMPT_TEMPLATE, each iteration's candidates (five strategies) are
  scored on validation, a rewrite kept only if it improves, until convergence or budget.
  Tables prompt_runs (test columns empty until the comparison), prompt_candidates, llm_calls.
  Tagged ``meta_pipeline/retrains=feedback``: the retrain sensor re-runs it when the task's
  rated outputs break a threshold.
* ``prompt_comparison`` — the latest run's evolved prompt vs the static one on the held-out
  test split (exact McNemar p, paired bootstrap CI of the margin); p < 0.05 in favour of the
  evolved prompt inserts a PENDING PROPOSAL of type PROMPT_TEMPLATE (target = the task), with
  a rationale from the LLM when one is configured (checked; else the template), through the
  usual approve / apply / revert lifecycle. Applying it makes the evolved prompt the task's
  active PROMPT_TEMPLATE: the next prompt_evolution starts from there.
"""

import dataclasses

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from meta_pipeline.defs.feedback_generic.assets import partition_task
from meta_pipeline.defs.feedback_generic.sensors import RETRAIN_TAG
from meta_pipeline.defs.prompts.resources import LLMParam
from meta_pipeline.defs.resources import StoreParam, plot_metadata, table_preview, task_partitions
from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.rationale import write_rationale
from meta_pipeline.llm import LLMError, client_for, flush_call_records
from meta_pipeline.prompts import comparison as cmp_core
from meta_pipeline.prompts.evolution import EvolutionSettings
from meta_pipeline.prompts.runs import PromptSetupError, compare_latest_run, finish_run, run_prompt_evolution
from meta_pipeline.prompts.strategies import STRATEGIES
from meta_pipeline.store import prompts as prompt_rows

GROUP = "prompts"
TAGS = {RETRAIN_TAG: "feedback"}


class PromptEvolutionConfig(dg.Config):
    """Run config of prompt_evolution (defaults: meta_pipeline.prompts.evolution.EvolutionSettings)."""

    max_iterations: int = Field(default=8, ge=0, le=100)
    patience: int = Field(default=2, ge=1, le=20, description="iterations without an accepted gain before stopping")
    min_delta: float = Field(default=0.01, ge=0.0, le=1.0, description="the validation gain a rewrite must bring")
    strategies: list[str] = Field(default=list(STRATEGIES), description=f"any of {list(STRATEGIES)}")
    max_candidates_per_strategy: int = Field(default=2, ge=1, le=10)
    demos: int = Field(default=3, ge=1, le=20, description="demonstrations chosen when the prompt has none")
    max_demos: int = Field(default=6, ge=1, le=50)
    train_fraction: float = Field(default=0.4, gt=0.0, lt=1.0)
    val_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)
    max_calls: int = Field(default=0, ge=0, description="budget of provider calls for this run (0: the resource's)")
    max_tokens: int = Field(default=0, ge=0, description="budget of tokens for this run (0: the resource's)")


class PromptComparisonConfig(dg.Config):
    alpha: float = Field(default=cmp_core.ALPHA, gt=0.0, lt=1.0, description="propose when the McNemar p is below")
    train_fraction: float = Field(default=0.4, gt=0.0, lt=1.0)
    val_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)
    bootstrap_seed: int = 0


def _client(store: StoreParam, llm: LLMParam, context: dg.AssetExecutionContext, task: str, **budget: int):
    limits = {k: v for k, v in budget.items() if v}
    settings = dataclasses.replace(llm, **limits) if limits else llm
    try:
        return client_for(store, settings, run_id=context.run.run_id, task=task)
    except LLMError as exc:
        raise dg.Failure(description=str(exc)) from exc


def _trajectory_figure(candidates: pd.DataFrame, task: str) -> Figure:
    """Validation accuracy per iteration: every candidate (grey), the accepted ones (green), the current prompt."""
    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    scored = candidates[candidates["val_score"].notna()]
    ax.scatter(scored["iteration"], scored["val_score"], color="lightgray", s=18, label="candidate")
    acc = scored[scored["accepted"].astype(bool)]
    ax.scatter(acc["iteration"], acc["val_score"], color="tab:green", s=40, label="accepted")
    current = acc.set_index("iteration")["val_score"].reindex(range(int(candidates["iteration"].max()) + 1)).ffill()
    ax.step(current.index, current.to_numpy(), where="post", color="tab:green", lw=1.2, label="current prompt")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"task {task}: prompt evolution")
    ax.legend(fontsize=8)
    return fig


def _strategy_figure(candidates: pd.DataFrame) -> Figure | None:
    c = candidates[(candidates["iteration"] > 0) & candidates["val_score"].notna()]
    if c.empty:
        return None
    parent = dict(zip(candidates["candidate_id"], candidates["val_score"]))
    c = c.assign(gain=c["val_score"] - c["parent_id"].map(parent))
    g = c.groupby("strategy").agg(mean_gain=("gain", "mean"), accepted=("accepted", "sum"), n=("gain", "size"))
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    x = np.arange(len(g))
    ax.bar(x, g["mean_gain"], color=["tab:green" if a else "tab:gray" for a in g["accepted"]])
    for xi, (a, n) in enumerate(zip(g["accepted"], g["n"])):
        ax.annotate(f"{int(a)}/{int(n)} accepted", (xi, g["mean_gain"].iloc[xi]), ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, g.index, rotation=15)
    ax.set_ylabel("mean validation gain over parent")
    ax.set_title("strategy effectiveness")
    return fig


@dg.asset(
    partitions_def=task_partitions,
    group_name=GROUP,
    kinds={"python", "sql"},
    tags=TAGS,
    description="Self-optimizing prompt of a task: five strategies rewrite the active PROMPT_TEMPLATE, a rewrite is "
                "kept only if validation accuracy improves, until convergence or budget. Tables prompt_runs, "
                "prompt_candidates, llm_calls.",
)
def prompt_evolution(context: dg.AssetExecutionContext, config: PromptEvolutionConfig, store: StoreParam,
                     llm: LLMParam) -> dg.MaterializeResult:
    task = partition_task(context)
    client = _client(store, llm, context, task, max_calls=config.max_calls, max_tokens=config.max_tokens)
    try:
        settings = EvolutionSettings(config.max_iterations, config.patience, config.min_delta,
                                     tuple(config.strategies), config.max_candidates_per_strategy, config.demos,
                                     config.max_demos)
        run = run_prompt_evolution(store, client, task, context.run.run_id, settings, train=config.train_fraction,
                                   val=config.val_fraction, progress=context.log.info)
    except (PromptSetupError, LLMError, ValueError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    r, result = run.row, run.result
    shown = result.candidates[["iteration", "candidate_id", "strategy", "val_score", "accepted", "calls", "note"]]
    return dg.MaterializeResult(metadata={
        "llm": dg.MetadataValue.text(client.describe()),
        "examples_train_val_test": dg.MetadataValue.text(f"{r['n_train']} / {r['n_val']} / {r['n_test']}"),
        "baseline_val": dg.MetadataValue.float(float(r["baseline_val"])),
        "best_val": dg.MetadataValue.float(float(r["best_val"])),
        "iterations": dg.MetadataValue.int(int(r["iterations"])),
        "converged": dg.MetadataValue.bool(bool(r["converged"])),
        "stop_reason": dg.MetadataValue.text(str(r["stop_reason"])),
        "calls": dg.MetadataValue.int(int(r["calls"])),
        "cached_calls": dg.MetadataValue.int(int(r["cached_calls"])),
        "tokens": dg.MetadataValue.int(int(r["tokens"])),
        "best_prompt": dg.MetadataValue.md("```\n" + str(r["best_prompt"]) + "\n```"),
        "candidates": table_preview(shown, max_rows=60),
        "strategies": table_preview(result.strategy_table()),
        "validation_per_iteration": plot_metadata(_trajectory_figure(result.candidates, task), "validation"),
        **({"strategy_effectiveness": plot_metadata(fig, "strategies")}
           if (fig := _strategy_figure(result.candidates)) is not None else {}),
    })


@dg.asset(
    partitions_def=task_partitions,
    group_name=GROUP,
    kinds={"python", "sql"},
    tags=TAGS,
    deps=[prompt_evolution],
    description="The latest evolved prompt vs the static one on the held-out test split (exact McNemar p, paired "
                "bootstrap CI of the margin); p < alpha for the evolved prompt inserts a PROMPT_TEMPLATE proposal "
                "(approve / apply / revert). Fills the test columns of prompt_runs.",
)
def prompt_comparison(context: dg.AssetExecutionContext, config: PromptComparisonConfig, store: StoreParam,
                      llm: LLMParam) -> dg.MaterializeResult:
    task = partition_task(context)
    client = _client(store, llm, context, task)
    try:
        cmp = compare_latest_run(store, client, task, train=config.train_fraction, val=config.val_fraction,
                                 seed=config.bootstrap_seed)
    except (PromptSetupError, LLMError, ValueError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    paired = cmp.comparison.paired
    proposal_id, rationale_note = None, "no proposal"
    if cmp_core.should_propose(paired, cmp.baseline, cmp.best, config.alpha):
        active = store.active_config(cmp_core.TARGET_TYPE, task)
        snapshot = active[1] if active else cmp.baseline.to_config()
        evidence = cmp_core.evidence_of(task, cmp.run, paired, cmp.accepted_strategies)
        proposal = cmp_core.prompt_template_proposal(task, snapshot, cmp.best, evidence,
                                                     cmp_core.template_rationale(evidence))
        outcome = write_rationale(client, proposal)
        flush_call_records(store, client)
        proposal["rationale_text"], rationale_note = outcome.text, f"{outcome.source}: {outcome.note}"
        report = lifecycle.insert_proposals(store, pd.DataFrame([proposal]))
        proposal_id = report.inserted[0] if report.inserted else None
        if proposal_id is None:
            rationale_note += " (an identical proposal is already PENDING)"
    row = finish_run(store, task, cmp, [context.run.run_id], proposal_id)
    context.log.info(f"{task}: static {paired.baseline_accuracy:.3f} vs evolved {paired.candidate_accuracy:.3f} on "
                     f"{paired.n} test examples, p {paired.p_value:.3g}; proposal {proposal_id or '-'}")
    runs = prompt_rows.read_prompt_runs(store, task)
    history = runs[["run_id", "started_at", "baseline_val", "best_val", "baseline_test", "best_test", "win_margin",
                    "p_value", "iterations", "converged", "calls", "tokens", "proposal_id"]].tail(10)
    history = history.assign(run_id=history["run_id"].str.slice(0, 8))
    candidates = prompt_rows.read_prompt_candidates(store, task, cmp.run["run_id"])
    plots = {"validation_per_iteration": plot_metadata(_trajectory_figure(candidates, task), "validation")}
    if (fig := _strategy_figure(candidates)) is not None:
        plots["strategy_effectiveness"] = plot_metadata(fig, "strategies")
    return dg.MaterializeResult(metadata={
        **plots,
        "run_id": dg.MetadataValue.text(str(cmp.run["run_id"])),
        "n_test": dg.MetadataValue.int(paired.n),
        "static_test_accuracy": dg.MetadataValue.float(paired.baseline_accuracy),
        "evolved_test_accuracy": dg.MetadataValue.float(paired.candidate_accuracy),
        "margin": dg.MetadataValue.float(paired.margin),
        "margin_ci_95": dg.MetadataValue.text(f"{paired.ci_low:+.3f} to {paired.ci_high:+.3f}"),
        "discordant_only_evolved_right": dg.MetadataValue.int(paired.n01),
        "discordant_only_static_right": dg.MetadataValue.int(paired.n10),
        "p_value": dg.MetadataValue.float(paired.p_value),
        "test": dg.MetadataValue.text(paired.method),
        "proposal_id": dg.MetadataValue.text(proposal_id or "-"),
        "rationale": dg.MetadataValue.text(rationale_note),
        "calls_for_run": dg.MetadataValue.int(int(row["calls"])),
        "tokens_for_run": dg.MetadataValue.int(int(row["tokens"])),
        "runs": table_preview(history),
        "best_prompt": dg.MetadataValue.md("```\n" + str(cmp.run["best_prompt"]) + "\n```"),
        "static_prompt": dg.MetadataValue.md("```\n" + str(cmp.run["baseline_prompt"]) + "\n```"),
    })


prompts_job = dg.define_asset_job(
    "prompts_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="One task's prompt evolution and its comparison with the static prompt.",
)
