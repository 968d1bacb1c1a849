"""The meta orchestrator in Dagster: per-domain diagnostics, cross-domain config proposals,
and the review job a person runs from the UI to approve / reject / apply / revert one.

The math is in meta_pipeline.governance.{diagnostics,proposals}; the state machine, its
transactions and one proposal run (``lifecycle.run_proposal_cycle``) in
meta_pipeline.governance.lifecycle. This module only reads inputs, calls them, writes and
reports.
"""

import json
from enum import Enum

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from meta_pipeline.defs.resources import (
    StoreParam,
    domain_partitions,
    partition_domain,
    plot_metadata,
    table_preview,
)
from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.diagnostics import (
    DiagnosticsInputs,
    DiagnosticsResult,
    compute_diagnostics,
)
from meta_pipeline.governance.proposals import TARGET_TYPES
from meta_pipeline.governance.rationale import rewrite_pending_rationales

# ---------------------------------------------------------------------------
# diagnostics (per domain)
# ---------------------------------------------------------------------------


def _previous_override_keys(store: StoreParam, domain: str) -> list[str] | None:
    """The override set the previous diagnostics run saw (for churn), if it recorded one."""
    prev = store.read("diagnostics", domain=domain, columns=["details_json"],
                      equals={"section": "overrides", "subject": "all"})
    if prev.empty or not prev["details_json"].iloc[0]:
        return None
    return json.loads(prev["details_json"].iloc[0]).get("identities")


def _read_inputs(store: StoreParam, domain: str) -> DiagnosticsInputs:
    knobs = store.knobs_in_effect(domain)
    approved = store.active_config("META_KNOBS", domain)
    latest = store.read_global_prior()
    newest_prior = store.read("global_prior", equals={"version": latest.version}) if latest else store.read(
        "global_prior", columns=None).head(0)
    return DiagnosticsInputs(
        domain=domain,
        trades=store.read("trades", domain=domain, columns=["trade_id", "closed_at", "regime", "strategy_id", "return_r"]),
        trade_patterns=store.read("trade_patterns", domain=domain, columns=["trade_id", "pattern"]),
        trade_scope=store.read("trade_scope", domain=domain, columns=["trade_id", "key", "value"]),
        backtest_runs=store.read("backtest_runs", domain=domain),
        telemetry=store.read("telemetry", domain=domain),
        pm_overrides=store.read("pm_overrides", domain=domain),
        previous_override_keys=_previous_override_keys(store, domain),
        current_knobs=knobs.values,
        current_knobs_source=knobs.source,
        global_prior=newest_prior,
        controller_state=store.read("controller_state", domain=domain),
        approved_knobs=approved[1] if approved else None,
    )


def _key_findings(result: DiagnosticsResult) -> pd.DataFrame:
    rows = result.rows
    picks = [
        rows[rows["section"] == "strategy_vs_peers"].sort_values("p_value").head(3),
        rows[rows["section"] == "realized_vs_backtest"].sort_values("p_value").head(6),
        rows[rows["section"] == "risk_overrides"],
        rows[rows["section"] == "knob_importance"].sort_values("p_value"),
        rows[(rows["section"] == "knob_best_region") & (rows["p_value"] < 0.05)].sort_values("p_value"),
        rows[rows["section"].isin(["global_prior_gap", "override_churn", "controller"])],
        rows[(rows["section"] == "overrides") & (rows["subject"] == "all")],
        rows[rows["section"] == "by_strategy_regime"].sort_values("value").head(3),
    ]
    out = pd.concat([p for p in picks if len(p)], ignore_index=True) if any(len(p) for p in picks) else rows.head(0)
    return out[["section", "subject", "metric", "value", "ci_low", "ci_high", "n", "p_value"]]


def _importance_figure(result: DiagnosticsResult) -> Figure | None:
    imp = result.section("knob_importance")
    if imp.empty:
        return None
    details = [json.loads(d) for d in imp["details_json"]]
    x = np.arange(len(imp))
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    ax.bar(x, imp["value"], color=["tab:red" if p < 0.05 else "tab:gray" for p in imp["p_value"]], label="observed MI")
    ax.scatter(x, [d["null_q95"] for d in details], marker="_", s=400, color="black", label="null 95th percentile")
    ax.scatter(x, [d["null_mean"] for d in details], marker="_", s=400, color="tab:blue", label="null mean")
    for xi, (v, p) in enumerate(zip(imp["value"], imp["p_value"])):
        ax.annotate(f"p={p:.3g}", (xi, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, imp["subject"], rotation=20)
    ax.set_ylabel("mutual information (nats)")
    ax.set_title("Knob importance vs permutation null (red: p < 0.05)")
    ax.legend(fontsize=7)
    return fig


def _backtest_figure(result: DiagnosticsResult) -> Figure | None:
    cmp = result.section("realized_vs_backtest")
    if cmp.empty:
        return None
    details = [json.loads(d) for d in cmp["details_json"]]
    realized = np.array([d["realized_mean"] for d in details], dtype=float)
    realized_se = np.array([d["realized_se"] for d in details], dtype=float)
    backtest = np.array([d["backtest_mean"] for d in details], dtype=float)
    backtest_se = np.array([d["backtest_se"] for d in details], dtype=float)
    x = np.arange(len(cmp))
    fig = Figure(figsize=(max(6, 0.7 * len(cmp)), 3.4))
    ax = fig.add_subplot()
    ax.errorbar(x - 0.12, backtest, yerr=1.96 * backtest_se, fmt="s", color="tab:blue", label="backtest (95% CI)")
    ax.errorbar(x + 0.12, realized, yerr=1.96 * realized_se, fmt="o", color="tab:orange", label="realized (95% CI)")
    for xi, p in zip(x, cmp["p_value"]):
        if p < 0.05:
            ax.annotate(f"p={p:.2g}", (xi, max(realized[xi], backtest[xi])), ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xticks(x, cmp["subject"], rotation=30)
    ax.set_ylabel("mean return_r (R)")
    ax.set_title("Realized vs backtest by strategy × regime")
    ax.legend(fontsize=7)
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name="governance",
    kinds={"pandas", "sql"},
    deps=["trades", "telemetry", "pm_overrides", "controller_state", "global_prior"],
    description=(
        "Per-domain diagnostics: performance by regime / strategy / pattern family / scope attribute, each "
        "strategy × regime against its peers and its other regimes, tails (expected shortfall, drawdown, "
        "bootstrap stress), dispersion across regimes, risk overrides, realized vs backtest, "
        "override firing and worth, knob importance vs a permutation null, best knob region, "
        "global-prior gap, nearest past configurations. Table `diagnostics`."
    ),
)
def diagnostics(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    inputs = _read_inputs(store, domain)
    result = compute_diagnostics(inputs)
    written = store.replace_partition("diagnostics", domain, result.rows)
    for note in result.notes:
        context.log.info(f"{domain}: {note}")
    metadata: dict[str, dg.MetadataValue] = {
        "dagster/row_count": dg.MetadataValue.int(written),
        "n_trades": dg.MetadataValue.int(len(inputs.trades)),
        "n_telemetry_ticks": dg.MetadataValue.int(len(inputs.telemetry)),
        "current_knobs_source": dg.MetadataValue.text(inputs.current_knobs_source),
        "sections": dg.MetadataValue.json(result.rows["section"].value_counts().to_dict()),
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in result.notes) or "_(all inputs present)_"),
        "key_findings": table_preview(_key_findings(result), max_rows=30),
    }
    for key, fig in (("knob_importance_plot", _importance_figure(result)),
                     ("realized_vs_backtest_plot", _backtest_figure(result))):
        if fig is not None:
            metadata[key] = plot_metadata(fig, alt=key)
    return dg.MaterializeResult(metadata=metadata)


# ---------------------------------------------------------------------------
# config proposals (cross-domain)
# ---------------------------------------------------------------------------


class AutoApplyPolicy(dg.Config):
    """Auto-apply PENDING proposals without review. Off by default."""

    enabled: bool = Field(default=False, description="apply matching PENDING proposals with applied_by = AUTO")
    min_confidence: float = Field(default=0.9, description=f"at least this confidence (≥ {lifecycle.MIN_AUTO_CONFIDENCE})")
    target_types: list[str] = Field(default=[], description=f"allow-list of target types, from {list(TARGET_TYPES)}")


# the diagnostics sections each kind of proposal is drawn from (governance.proposals), and what they need
_EVIDENCE = (
    ("STRATEGY_CONFIG", ("strategy_vs_peers", "realized_vs_backtest"),
     "strategy × regime cell with peers and other regimes (needs trades of ≥ 2 strategies in ≥ 2 regimes)"),
    ("META_KNOBS", ("knob_best_region", "global_prior_gap"), "knob diagnostics (needs telemetry with knob values)"),
    ("PM_OVERRIDES", ("override_churn",), "override churn (needs an earlier diagnostics run with overrides)"),
)


def _missing_evidence(diagnostics_rows: pd.DataFrame) -> list[str]:
    """Per proposal kind, the domains whose diagnostics hold none of its evidence, and why (e.g. a
    fleet that sends trades only has no knob evidence; without backtests no strategy evidence)."""
    if diagnostics_rows.empty:
        return []
    domains = sorted(diagnostics_rows["domain"].unique())
    notes = []
    for target_type, sections, needs in _EVIDENCE:
        having = set(diagnostics_rows.loc[diagnostics_rows["section"].isin(sections), "domain"])
        lacking = [d for d in domains if d not in having]
        if lacking:
            shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
            notes.append(f"no {target_type} candidates from {shown}: no {needs}")
    return notes


def _proposals_table(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    shown = frame[["proposal_id", "target_type", "target_id", "confidence", "status", "rationale_text"]].copy()
    shown["rationale_text"] = shown["rationale_text"].str.slice(0, 160) + "…"
    return shown.sort_values("confidence", ascending=False)


@dg.asset(
    group_name="fleet",
    kinds={"pandas", "sql"},
    deps=[dg.AssetDep("diagnostics"), dg.AssetDep("global_prior")],  # all domain partitions; the fresh prior first
    description=(
        "Evidence-backed config proposals from every domain's diagnostics (PENDING, deduplicated by evidence "
        "hash); optional auto-apply policy. Table `meta_controller_config_proposals`."
    ),
)
def config_proposals(context: dg.AssetExecutionContext, config: AutoApplyPolicy, store: StoreParam) -> dg.MaterializeResult:
    policy = lifecycle.AutoApplySettings(config.enabled, config.min_confidence, tuple(config.target_types))
    diagnostics_rows = store.read("diagnostics")
    run = lifecycle.run_proposal_cycle(store, diagnostics_rows, policy)
    rewrite_pending_rationales(store, run.inserted, log=context.log.info)  # by the LLM when one is configured
    if not run.domains:
        context.log.warning("no diagnostics rows yet: materialize `diagnostics` for some domains first")
    missing = _missing_evidence(diagnostics_rows)
    for note in missing:
        context.log.info(note)
    for message in run.skipped:
        context.log.warning(f"auto-apply skipped: {message}")
    top_tests = run.top_candidates(15)
    return dg.MaterializeResult(metadata={
        "domains": dg.MetadataValue.int(len(run.domains)),
        "candidate_tests": dg.MetadataValue.int(len(run.candidates)),
        "proposals_generated": dg.MetadataValue.int(len(run.proposals)),
        "inserted": dg.MetadataValue.int(len(run.inserted)),
        "duplicates_skipped": dg.MetadataValue.int(len(run.duplicates)),
        "superseded": dg.MetadataValue.json(run.superseded),
        "missing_evidence": dg.MetadataValue.md("\n".join(f"- {n}" for n in missing) or "_(every source has evidence)_"),
        "auto_apply": dg.MetadataValue.text(
            f"enabled, ≥ {policy.min_confidence}, {list(policy.target_types)}" if policy.enabled else "off"),
        "auto_applied": dg.MetadataValue.json([r.summary() for r in run.applied]),
        "new_proposals": table_preview(_proposals_table(run.new_proposals)),
        "pending_proposals": table_preview(_proposals_table(run.pending)),
        "candidate_tests_top": table_preview(
            top_tests[["domain", "target_type", "part_key", "p_value", "q_value", "effect_factor", "sample_factor",
                       "confidence"]] if len(top_tests) else top_tests),
    })


# ---------------------------------------------------------------------------
# review job (run from the UI's launchpad)
# ---------------------------------------------------------------------------


class ReviewAction(Enum):
    approve = "approve"
    reject = "reject"
    apply = "apply"
    revert = "revert"


class ReviewProposalConfig(dg.Config):
    proposal_id: str = Field(description="e.g. P000012 (see `meta-pipeline proposals list`)")
    action: ReviewAction = Field(description="approve | reject | apply | revert")
    by: str = Field(description="who is acting (recorded in the change log)")


@dg.op(
    description="Approve, reject, apply or revert one config proposal; an illegal transition fails the run.",
    out=dg.Out(dg.Nothing),
)
def review_proposal_op(context: dg.OpExecutionContext, config: ReviewProposalConfig, store: StoreParam):
    action = config.action.value if isinstance(config.action, ReviewAction) else str(config.action)
    try:
        result = lifecycle.transition(store, config.proposal_id, action, config.by)
    except ValueError as exc:  # ProposalError included: wrong status, missing proposal, stale, no actor
        raise dg.Failure(description=str(exc)) from exc
    context.log.info(result.summary())
    yield dg.Output(None, metadata={
        "proposal_id": result.proposal_id, "transition": f"{result.from_status} -> {result.to_status}",
        "actor": result.actor, "config_version": result.to_version if result.to_version is not None else "-",
    })


@dg.job(name="review_proposal", description="Review one config proposal: approve | reject | apply | revert.")
def review_proposal() -> None:
    review_proposal_op()
