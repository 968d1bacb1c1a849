"""Evolved vs static prompt on the held-out test split, and the PROMPT_TEMPLATE proposal it may make.

The static prompt is the one evolution started from; both answer the same test examples and
are compared pairwise (``stats.compare_paired``: exact McNemar p, paired bootstrap CI of the
margin). A proposal is made when the evolved prompt is better on test with p < ``alpha``
(0.05) and differs from the static one. Its confidence (documented, recomputable):

    evidence   = clip(log10(1/p) / 4, 0, 1)        (p = 1e-4 -> 1, p = 0.01 -> 0.5)
    effect     = clip(margin / 0.05, 0, 1)         (a 5-point accuracy gain is fully material)
    sample     = n_test / (n_test + 30)
    confidence = evidence · effect · sample, rounded to 4 places

The evidence hash covers the target, the snapshot and the proposed config (not the noisy
statistics), so the same evolved prompt is never PENDING twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meta_pipeline.llm import LLMClient
from meta_pipeline.prompts.evolution import Score, score_prompt
from meta_pipeline.prompts.examples import TaskData
from meta_pipeline.prompts.spec import PromptSpec
from meta_pipeline.prompts.stats import PairedComparison, compare_paired

TARGET_TYPE = "PROMPT_TEMPLATE"
ALPHA = 0.05


@dataclass
class TestComparison:
    baseline: Score
    best: Score
    paired: PairedComparison


def compare_on_test(client: LLMClient, data: TaskData, baseline: PromptSpec, best: PromptSpec,
                    seed: int = 0) -> TestComparison:
    base_score = score_prompt(client, baseline, data.test, data, purpose="test")
    best_score = base_score if best == baseline else score_prompt(client, best, data.test, data, purpose="test")
    return TestComparison(base_score, best_score, compare_paired(base_score.correct, best_score.correct, seed=seed))


def proposal_confidence(p_value: float, margin: float, n: int) -> float:
    evidence = min(1.0, max(0.0, math.log10(1.0 / max(p_value, 1e-300)) / 4.0))
    effect = min(1.0, max(0.0, margin / 0.05))
    return round(evidence * effect * (n / (n + 30.0)), 4)


def should_propose(paired: PairedComparison, baseline: PromptSpec, best: PromptSpec, alpha: float = ALPHA) -> bool:
    return best != baseline and paired.margin > 0 and paired.p_value < alpha


def evidence_of(task: str, run: Mapping[str, Any], paired: PairedComparison, strategies: list[str]) -> dict:
    return {
        "task": task, "run_id": run["run_id"], "n_test": paired.n,
        "baseline_test_accuracy": round(paired.baseline_accuracy, 4),
        "evolved_test_accuracy": round(paired.candidate_accuracy, 4),
        "margin": round(paired.margin, 4), "margin_ci_low": round(paired.ci_low, 4),
        "margin_ci_high": round(paired.ci_high, 4), "only_evolved_right": paired.n01, "only_static_right": paired.n10,
        "p_value": float(f"{paired.p_value:.3g}"), "test": paired.method,
        "baseline_val_accuracy": round(float(run["baseline_val"]), 4),
        "evolved_val_accuracy": round(float(run["best_val"]), 4), "iterations": int(run["iterations"]),
        "accepted_strategies": strategies, "provider": run["provider"], "model": run["model"],
    }


def template_rationale(e: Mapping[str, Any]) -> str:
    return (f"On the held-out test split of task {e['task']} ({e['n_test']} examples), the evolved prompt answered "
            f"{e['evolved_test_accuracy']:.4g} correctly against {e['baseline_test_accuracy']:.4g} for the current "
            f"prompt: a margin of {e['margin']:+.4g} (95% paired bootstrap CI {e['margin_ci_low']:+.4g} to "
            f"{e['margin_ci_high']:+.4g}); exact McNemar p {e['p_value']:.3g} ({e['only_evolved_right']} examples only "
            f"the evolved prompt got right, {e['only_static_right']} only the current one). It was found in "
            f"{e['iterations']} iterations of prompt evolution (accepted strategies: "
            f"{', '.join(e['accepted_strategies']) or 'none'}). Proposed: make it the task's PROMPT_TEMPLATE.")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def prompt_template_proposal(task: str, snapshot: Mapping[str, Any], best: PromptSpec, evidence: Mapping[str, Any],
                             rationale_text: str) -> dict[str, Any]:
    """A proposal row in the layout of ``meta_controller_config_proposals`` (lifecycle adds id/status)."""
    proposed = best.to_config()
    digest = hashlib.sha256(_canonical_json({"target_type": TARGET_TYPE, "target_id": task, "snapshot": snapshot,
                                             "proposed": proposed}).encode("utf-8")).hexdigest()
    return {
        "domain": None, "target_type": TARGET_TYPE, "target_id": task,
        "current_config_snapshot_json": _canonical_json(dict(snapshot)),
        "proposed_config_json": _canonical_json(proposed),
        "rationale_text": rationale_text,
        "evidence_json": json.dumps(evidence, sort_keys=True, ensure_ascii=False),
        "evidence_hash": digest,
        "confidence": proposal_confidence(float(evidence["p_value"]), float(evidence["margin"]),
                                          int(evidence["n_test"])),
    }
