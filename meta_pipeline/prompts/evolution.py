"""Prompt evolution: rewrite a task's prompt across iterations, keep a rewrite only when the
validation accuracy improves, stop on convergence or budget.

    score(start) on validation                                   -> iteration 0, accepted
    for t = 1 .. max_iterations:
        candidates = every strategy's proposals from the current prompt (strategies.py),
                     minus prompts scored before (same instructions and demonstrations)
        score each candidate on the validation split (accuracy = parsed answer == expected)
        best = the highest-scoring candidate (ties: strategy order, then proposal order)
        accept  if best.val − current.val ≥ min_delta   -> current = best, patience reset
        else    roll back (current stays)               -> one more iteration without improvement
        converged when `patience` consecutive iterations brought no accepted improvement,
        or the current prompt scores 1.0
    budget: the client refuses a call (BudgetExhausted) -> stop at once; the candidate being
            scored is recorded unscored (val_score null) and the best so far stands

A candidate's ``calls``/``tokens`` are the provider calls it caused (its optimizer call, its
validation answers); answers served from the cache cost nothing. The test split is never
touched here (``comparison.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from meta_pipeline.llm import BudgetExhausted, LLMClient
from meta_pipeline.prompts.examples import TaskData
from meta_pipeline.prompts.spec import Example, PromptSpec, messages_for, parse_answer
from meta_pipeline.prompts.strategies import GENERATORS, STRATEGIES, Proposal, StrategyContext

CANDIDATE_COLUMNS = ["iteration", "candidate_id", "parent_id", "strategy", "prompt_text", "spec_json", "val_score",
                     "val_errors", "accepted", "calls", "tokens", "note"]


@dataclass(frozen=True)
class EvolutionSettings:
    max_iterations: int = 8
    patience: int = 2  # iterations without an accepted improvement before stopping
    min_delta: float = 0.01  # a rewrite is kept only if it raises validation accuracy by at least this
    strategies: tuple[str, ...] = STRATEGIES
    max_candidates_per_strategy: int = 2
    demos: int = 3
    max_demos: int = 6
    max_errors_shown: int = 6

    def __post_init__(self) -> None:
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown:
            raise ValueError(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
        if self.max_iterations < 0 or self.patience < 1 or self.min_delta < 0:
            raise ValueError("max_iterations ≥ 0, patience ≥ 1 and min_delta ≥ 0 are required")


@dataclass
class Score:
    accuracy: float
    correct: np.ndarray
    replies: list[str]
    parsed: list[str | None]
    calls: int
    tokens: int

    def errors(self, examples: Sequence[Example]) -> list[tuple[Example, str]]:
        return [(e, r) for e, r, ok in zip(examples, self.replies, self.correct) if not ok]


def score_prompt(client: LLMClient, spec: PromptSpec, examples: Sequence[Example], data: TaskData,
                 purpose: str = "answer") -> Score:
    """Accuracy of a prompt on examples (one call per example; cached replies are free)."""
    pool = data.by_id
    calls0, tokens0 = client.usage.calls, client.usage.tokens
    replies = client.complete_many([messages_for(spec, e, pool) for e in examples], purpose=purpose)
    texts = [r.text for r in replies]
    parsed = [parse_answer(t, data.labels_for(e)) for t, e in zip(texts, examples)]
    correct = np.array([p is not None and p == e.expected for p, e in zip(parsed, examples)], dtype=bool)
    return Score(float(correct.mean()) if len(correct) else float("nan"), correct, texts, parsed,
                 client.usage.calls - calls0, client.usage.tokens - tokens0)


@dataclass
class EvolutionResult:
    start: PromptSpec
    best: PromptSpec
    best_id: str
    baseline_val: float
    best_val: float
    iterations: int
    converged: bool
    stop_reason: str
    candidates: pd.DataFrame
    trajectory: list[dict] = field(default_factory=list)  # per iteration: current val, best candidate, accepted

    def strategy_table(self) -> pd.DataFrame:
        """Per strategy: candidates scored, accepted, mean and best improvement over their parent."""
        c = self.candidates[(self.candidates["iteration"] > 0) & self.candidates["val_score"].notna()]
        if c.empty:
            return pd.DataFrame(columns=["strategy", "candidates", "accepted", "mean_gain", "best_gain"])
        parent_val = dict(zip(self.candidates["candidate_id"], self.candidates["val_score"]))
        gain = c["val_score"] - c["parent_id"].map(parent_val)
        out = (c.assign(gain=gain).groupby("strategy")
               .agg(candidates=("candidate_id", "count"), accepted=("accepted", "sum"), mean_gain=("gain", "mean"),
                    best_gain=("gain", "max")).reset_index())
        out["accepted"] = out["accepted"].astype(int)
        return out.sort_values(["accepted", "best_gain"], ascending=False, ignore_index=True)


def evolve(client: LLMClient, data: TaskData, start: PromptSpec, settings: EvolutionSettings | None = None,
           progress: Callable[[str], None] | None = None) -> EvolutionResult:
    """Run prompt evolution (module doc); never raises BudgetExhausted (it stops the run instead)."""
    s = settings or EvolutionSettings()
    rows: list[dict] = []
    seen: set[str] = set()

    def row(iteration: int, cid: str, parent: str | None, strategy: str, spec: PromptSpec, score: Score | None,
            accepted: bool, calls: int, tokens: int, note: str, text: str | None = None) -> dict:
        r = {"iteration": iteration, "candidate_id": cid, "parent_id": parent, "strategy": strategy,
             "prompt_text": text if text is not None else spec.render(data.by_id), "spec_json": spec.to_json(),
             "val_score": score.accuracy if score else None,
             "val_errors": int((~score.correct).sum()) if score else None, "accepted": accepted, "calls": calls,
             "tokens": tokens, "note": note}
        rows.append(r)
        return r

    def result(best_id: str, current: PromptSpec, current_score: Score, baseline: float, iterations: int,
               converged: bool, reason: str, trajectory: list[dict]) -> EvolutionResult:
        return EvolutionResult(start, current, best_id, baseline, current_score.accuracy, iterations, converged,
                               reason, pd.DataFrame(rows, columns=CANDIDATE_COLUMNS), trajectory)

    try:
        current_score = score_prompt(client, start, data.val, data)
    except BudgetExhausted as exc:
        raise BudgetExhausted(f"{exc}: not even the starting prompt could be scored") from exc
    row(0, "i0-start", None, "start", start, current_score, True, current_score.calls, current_score.tokens,
        "the starting prompt")
    seen.add(start.to_json())
    current, current_id = start, "i0-start"
    baseline = current_score.accuracy
    history = [(current_score.accuracy, start.instructions)]
    trajectory = [{"iteration": 0, "current_val": baseline, "best_candidate_val": baseline, "accepted": "start"}]
    without_gain = 0
    iteration = 0
    if current_score.accuracy >= 1.0:
        return result(current_id, current, current_score, baseline, 0, True, "the starting prompt scores 1.0",
                      trajectory)
    for iteration in range(1, s.max_iterations + 1):
        ctx = StrategyContext(data, current, current_score.accuracy, current_score.errors(data.val), history,
                              iteration, client, s.max_candidates_per_strategy, s.demos, s.max_demos,
                              s.max_errors_shown)
        scored: list[tuple[float, int, dict, PromptSpec, Score]] = []
        try:
            for strategy in s.strategies:
                calls0, tokens0 = client.usage.calls, client.usage.tokens
                proposals: list[Proposal] = GENERATORS[strategy](ctx)
                gen_calls, gen_tokens = client.usage.calls - calls0, client.usage.tokens - tokens0
                for k, proposal in enumerate(proposals, 1):
                    cid = f"i{iteration}-{strategy}-{k}"
                    if proposal.spec is None:
                        row(iteration, cid, current_id, strategy, current, None, False, gen_calls, gen_tokens,
                            proposal.note)
                        gen_calls = gen_tokens = 0
                        continue
                    key = proposal.spec.to_json()
                    if key in seen:  # scored before: nothing new to learn (its optimizer call, if any, counted)
                        row(iteration, cid, current_id, strategy, proposal.spec, None, False, gen_calls, gen_tokens,
                            proposal.note + "; the same prompt was scored before: not scored again")
                        gen_calls = gen_tokens = 0
                        continue
                    seen.add(key)
                    try:
                        sc = score_prompt(client, proposal.spec, data.val, data)
                    except BudgetExhausted:
                        row(iteration, cid, current_id, strategy, proposal.spec, None, False, gen_calls, gen_tokens,
                            proposal.note + "; not scored: the budget ran out")
                        raise
                    r = row(iteration, cid, current_id, strategy, proposal.spec, sc, False, gen_calls + sc.calls,
                            gen_tokens + sc.tokens, proposal.note)
                    gen_calls = gen_tokens = 0
                    history.append((sc.accuracy, proposal.spec.instructions))
                    scored.append((sc.accuracy, len(scored), r, proposal.spec, sc))
        except BudgetExhausted as exc:
            if progress:
                progress(f"iteration {iteration}: {exc}")
            trajectory.append({"iteration": iteration, "current_val": current_score.accuracy,
                               "best_candidate_val": max((x[0] for x in scored), default=None), "accepted": None})
            return result(current_id, current, current_score, baseline, iteration, False, f"budget: {exc}",
                          trajectory)
        best = max(scored, key=lambda x: (x[0], -x[1])) if scored else None
        accepted = best is not None and best[0] - current_score.accuracy >= s.min_delta - 1e-12
        if accepted:
            best[2]["accepted"] = True
            current, current_id, current_score = best[3], best[2]["candidate_id"], best[4]
            without_gain = 0
        else:
            without_gain += 1
        trajectory.append({"iteration": iteration, "current_val": current_score.accuracy,
                           "best_candidate_val": best[0] if best else None,
                           "accepted": best[2]["strategy"] if accepted else None})
        if progress:
            progress(f"iteration {iteration}: {len(scored)} candidates, best {best[0] if best else float('nan'):.3f}, "
                     f"current {current_score.accuracy:.3f}" + (f" (accepted {best[2]['strategy']})" if accepted
                                                                 else " (rolled back)"))
        if current_score.accuracy >= 1.0:
            return result(current_id, current, current_score, baseline, iteration, True, "validation accuracy 1.0",
                          trajectory)
        if without_gain >= s.patience:
            return result(current_id, current, current_score, baseline, iteration, True,
                          f"converged: {s.patience} iteration(s) without a gain ≥ {s.min_delta:g}", trajectory)
        if not scored and not any(r["iteration"] == iteration for r in rows):
            return result(current_id, current, current_score, baseline, iteration, True,
                          "converged: no strategy proposed anything new", trajectory)
    return result(current_id, current, current_score, baseline, iteration, False,
                  f"max_iterations {s.max_iterations} reached", trajectory)
