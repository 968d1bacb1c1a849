"""Generic feedback in Dagster: any model whose outputs someone rates, one `task` partition each.

* ``feedback`` — the task's ratings (table ``feedback``), landed by
  `meta-pipeline ingest feedback FILE --task NAME` (or files named in run config).
* ``feedback_cycles_generic`` — the ratings in cycles of ``cycle_size``: mean score vs the
  alignment threshold, score and output drift against the model version's first complete
  cycle, coherence on near-identical inputs (table ``feedback_cycles_generic``). The math
  is ``meta_pipeline.learning.feedback_generic``.
* ``feedback_cycle_within_thresholds`` — WARN when the newest complete cycle broke a threshold.

The sensors (``sensors.py``) recompute the cycles when new feedback lands and turn each
completed cycle that broke a threshold into one re-training request of the task's model.
Everything here is in group ``feedback_generic``; no existing job selects it.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from meta_pipeline.contracts import ContractError, validate_task
from meta_pipeline.defs.resources import StoreParam, plot_metadata, table_preview, task_partitions
from meta_pipeline.ingest import IngestReport, ingest_file
from meta_pipeline.learning import feedback_generic as core

GROUP = "feedback_generic"
PREVIEW_COLUMNS = ["cycle", "model_version", "n", "complete", "mean_score", "score_ci_low", "score_ci_high",
                   "below_threshold", "score_shift", "score_drift_p", "output_drift", "drifted", "coherence",
                   "retrain_due", "retrain_requested"]


def partition_task(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> str:
    """The run's task partition key, validated before it reaches SQL."""
    return validate_task(context.partition_key)


class FeedbackFilesConfig(dg.Config):
    """Feedback files to ingest into the task before summarising (CSV / JSON Lines / Parquet)."""

    files: list[str] = []


class GenericFeedbackConfig(dg.Config):
    """Run config of `feedback_cycles_generic` (defaults: meta_pipeline.learning.feedback_generic)."""

    cycle_size: int = Field(default=core.CYCLE_SIZE, ge=2, le=1_000_000,
                            description="ratings per cycle (a cycle never spans two model versions)")
    alignment_threshold: float = Field(default=core.ALIGNMENT_THRESHOLD, ge=0.0, le=1.0,
                                       description="a cycle whose mean score is below this breaks alignment")
    drift_threshold: float = Field(default=core.DRIFT_THRESHOLD, gt=0.0, le=1.0,
                                   description="output drift: Jensen–Shannon divergence (bits) vs the reference "
                                               "cycle above this is drift")
    score_p_threshold: float = Field(default=core.SCORE_P_THRESHOLD, gt=0.0, lt=1.0,
                                     description="score drift: a Welch p-value below this, with a falling mean, "
                                                 "is drift")
    output_basis: str = Field(default="auto", description="output distribution over: auto | label | token")


def _quarantined(store: StoreParam, task: str) -> int:
    return store.count("quarantine", equals={"domain": task, "kind": "feedback"})


@dg.asset(
    partitions_def=task_partitions,
    group_name=GROUP,
    kinds={"sql", "pandas"},
    description="The rated outputs of a task (any model): ts, input, output, score in [0, 1], model version "
                "(table feedback), landed by `meta-pipeline ingest feedback FILE --task NAME`.",
)
def feedback(context: dg.AssetExecutionContext, config: FeedbackFilesConfig, store: StoreParam) -> dg.MaterializeResult:
    task = partition_task(context)
    reports: list[IngestReport] = []
    for name in config.files:
        try:
            report = ingest_file(store, "feedback", Path(name), task)
        except ContractError as exc:
            raise dg.Failure(description=f"{Path(name).name}: {exc}") from exc
        context.log.info(report.summary())
        reports.append(report)
    frame = store.read_feedback(task, columns=["ts", "score", "model_version"])
    versions = (frame.assign(model_version=frame["model_version"].fillna("(none)"))
                .groupby("model_version")["score"].agg(["count", "mean"]).reset_index() if len(frame) else frame)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": dg.MetadataValue.int(len(frame)),
        "quarantined_total": dg.MetadataValue.int(_quarantined(store, task)),
        "ingested_this_run": dg.MetadataValue.int(sum(r.ingested for r in reports)),
        "quarantined_this_run": dg.MetadataValue.int(sum(r.quarantined for r in reports)),
        "mean_score": dg.MetadataValue.float(float(frame["score"].mean()) if len(frame) else float("nan")),
        "first_ts": dg.MetadataValue.text(str(frame["ts"].min()) if len(frame) else "-"),
        "last_ts": dg.MetadataValue.text(str(frame["ts"].max()) if len(frame) else "-"),
        "by_model_version": table_preview(versions),
    })


def _cycles_figure(cycles: pd.DataFrame, task: str) -> Figure:
    """Mean score per cycle with its 95 % CI and the alignment threshold, above the output drift
    (JSD vs the reference cycle) with the drift threshold and the coherence. Red: the cycle broke one."""
    fig = Figure(figsize=(10, 6))
    ax_score, ax_drift = fig.subplots(2, 1, sharex=True)
    x = cycles["cycle"].to_numpy()
    mean = cycles["mean_score"].to_numpy(dtype=float)
    low = np.nan_to_num(mean - cycles["score_ci_low"].to_numpy(dtype=float), nan=0.0)
    high = np.nan_to_num(cycles["score_ci_high"].to_numpy(dtype=float) - mean, nan=0.0)
    broke = (cycles["below_threshold"].astype(bool) | cycles["drifted"].astype(bool)).to_numpy()
    colors = np.where(broke, "tab:red", "tab:blue")
    for xi, mi, lo, hi, c, done in zip(x, mean, low, high, colors, cycles["complete"].astype(bool)):
        ax_score.errorbar([xi], [mi], yerr=[[lo], [hi]], fmt="o", mfc=c if done else "white",
                          color=c, capsize=3)
    threshold = float(cycles["alignment_threshold"].iloc[-1])
    ax_score.axhline(threshold, color="gray", ls="--", lw=0.8, label=f"alignment threshold {threshold:g}")
    ax_score.set_ylim(-0.02, 1.02)
    ax_score.set_ylabel("mean score (95% CI)")
    ax_score.legend(fontsize=8, loc="lower left")
    jsd = cycles["output_drift"].to_numpy(dtype=float)
    ax_drift.bar(x, np.nan_to_num(jsd, nan=0.0), color=colors, alpha=0.8)
    drift_threshold = float(cycles["drift_threshold"].iloc[-1])
    ax_drift.axhline(drift_threshold, color="gray", ls="--", lw=0.8, label=f"drift threshold {drift_threshold:g}")
    ax_drift.set_ylabel(f"output JSD vs reference ({cycles['output_basis'].iloc[-1]}s)")
    ax_drift.set_xlabel("cycle (open marker: partial; red: broke a threshold)")
    coh = cycles["coherence"].to_numpy(dtype=float)
    if np.isfinite(coh).any():
        ax_coh = ax_drift.twinx()
        ax_coh.plot(x, coh, "s", color="tab:green", ms=4, label="coherence")
        ax_coh.set_ylim(-0.02, 1.02)
        ax_coh.set_ylabel("coherence", color="tab:green")
    ax_drift.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"task {task}: rated outputs per cycle")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=task_partitions,
    group_name=GROUP,
    deps=[feedback],
    kinds={"pandas", "sql"},
    description=(
        "A task's ratings in cycles of cycle_size (never spanning two model versions): mean score with a 95% CI vs "
        "alignment_threshold, score drift (Welch test, standardized difference) and output drift (Jensen–Shannon "
        "divergence of labels or tokens) vs the version's first complete cycle, coherence of outputs on "
        "near-identical inputs. A complete cycle that breaks a threshold is due for re-training (retrain_sensor). "
        "Table feedback_cycles_generic."
    ),
)
def feedback_cycles_generic(context: dg.AssetExecutionContext, config: GenericFeedbackConfig,
                            store: StoreParam) -> dg.MaterializeResult:
    task = partition_task(context)
    rows = store.read_feedback(task, columns=["feedback_id", "ts", "input", "output", "score", "model_version"])
    try:
        cycles = core.feedback_cycles_generic(
            rows, config.cycle_size, alignment_threshold=config.alignment_threshold,
            drift_threshold=config.drift_threshold, score_p_threshold=config.score_p_threshold,
            basis=config.output_basis)
    except ValueError as exc:
        raise dg.Failure(description=str(exc)) from exc
    store.write_feedback_cycles_generic(task, cycles.assign(computed_at=pd.Timestamp.now(tz="UTC")))
    stored = store.read_feedback_cycles_generic(task)  # with the re-training requests carried over
    metadata: dict[str, dg.MetadataValue] = {
        "dagster/row_count": dg.MetadataValue.int(len(stored)),
        "ratings": dg.MetadataValue.int(len(rows)),
        "complete_cycles": dg.MetadataValue.int(int(stored["complete"].sum()) if len(stored) else 0),
        "cycles_due_for_retraining": dg.MetadataValue.int(int(stored["retrain_due"].sum()) if len(stored) else 0),
        "retraining_not_requested_yet": dg.MetadataValue.int(
            int((stored["retrain_due"] & ~stored["retrain_requested"]).sum()) if len(stored) else 0),
    }
    newest = core.newest_complete(stored)
    if newest is not None:
        metadata.update({
            "newest_complete_cycle": dg.MetadataValue.int(int(newest["cycle"])),
            "newest_mean_score": dg.MetadataValue.float(float(newest["mean_score"])),
            "newest_output_drift": dg.MetadataValue.float(
                float(newest["output_drift"]) if pd.notna(newest["output_drift"]) else float("nan")),
            "newest_coherence": dg.MetadataValue.float(
                float(newest["coherence"]) if pd.notna(newest["coherence"]) else float("nan")),
            "newest_breaks": dg.MetadataValue.text(str(newest["breaks"]) if pd.notna(newest["breaks"]) else "none"),
        })
    if len(stored):
        metadata["output_basis"] = dg.MetadataValue.text(str(stored["output_basis"].iloc[-1]))
        metadata["cycles"] = table_preview(stored[PREVIEW_COLUMNS].tail(20), max_rows=20)
        metadata["score_and_drift"] = plot_metadata(_cycles_figure(stored, task), "feedback cycles")
    else:
        metadata["status"] = dg.MetadataValue.text("no feedback for this task yet")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(asset=feedback_cycles_generic, partitions_def=task_partitions,
                description="The newest complete cycle is at or above the alignment threshold and not drifted "
                            "(WARN otherwise: a re-training is due).")
def feedback_cycle_within_thresholds(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    task = partition_task(context)
    newest = core.newest_complete(store.read_feedback_cycles_generic(task))
    if newest is None:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"status": "no complete feedback cycle yet"})

    def num(name: str) -> float:
        return float(newest[name]) if pd.notna(newest[name]) else float("nan")

    return dg.AssetCheckResult(
        passed=not (bool(newest["below_threshold"]) or bool(newest["drifted"])),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"cycle": int(newest["cycle"]), "mean_score": num("mean_score"),
                  "score_ci_low": num("score_ci_low"), "score_ci_high": num("score_ci_high"),
                  "alignment_threshold": num("alignment_threshold"), "score_drift_p": num("score_drift_p"),
                  "output_drift": num("output_drift"), "drift_threshold": num("drift_threshold"),
                  "breaks": str(newest["breaks"]) if pd.notna(newest["breaks"]) else "none",
                  "retrain_requested": bool(newest["retrain_requested"])})
