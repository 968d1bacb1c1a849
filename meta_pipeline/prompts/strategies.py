"""The five evolution strategies of the ACLA seed: each turns the current prompt into candidates.

* ``performance_based`` (LLM): the optimizer model sees the current instructions, their
  validation accuracy and the earlier attempts with their scores, and writes new instructions.
* ``error_analysis`` (LLM): the optimizer model sees up to ``max_errors_shown`` validation
  examples the current prompt got wrong (input, choices, expected, the model's reply) and
  revises the instructions to fix them.
* ``ablation`` (no LLM): add a missing answer-format instruction; remove one component at a
  time, starting with component ((iteration − 1) mod n) so every component gets its turn — at
  most ``max_candidates_per_strategy`` candidates.
* ``chain_of_thought`` (no LLM): add a reasoning cue ("Think step by step...") unless a line
  already asks to think; else add the structured one ("Consider each option in turn...").
* ``few_shot_optimization`` (no LLM): choose demonstrations from the train split, label
  round-robin with the labels the current prompt gets wrong most often first; no
  demonstrations -> ``demos`` of them; some -> a fresh set of the same size and one 2 larger
  (≤ ``max_demos``). Which examples within a label: sha256 order salted with the iteration.

The optimizer's reply must hold the new instructions between <prompt> and </prompt>, one
instruction per line; a reply without them yields no candidate (recorded with its cost).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from meta_pipeline.llm import LLMClient
from meta_pipeline.prompts.examples import TaskData
from meta_pipeline.prompts.spec import Component, Example, PromptSpec, render_input

STRATEGIES = ("performance_based", "error_analysis", "ablation", "chain_of_thought", "few_shot_optimization")
LLM_STRATEGIES = ("performance_based", "error_analysis")
OPTIMIZER_SYSTEM = (
    "You improve the instructions of a prompt for a language-model task. Reply with the complete new "
    "instructions between <prompt> and </prompt>, one instruction per line, and nothing else inside the tags. "
    "Do not include worked examples; demonstrations are chosen separately."
)
REASONING_CUE = "Think step by step before answering."
STRUCTURED_CUE = "Consider each option in turn and eliminate the ones that do not fit."
MAX_LINES, MAX_LINE_CHARS = 12, 400
_STEP_RE = re.compile(r"step by step|\bthink\b", re.I)


def format_instruction(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:12]) if labels else "the label"
    return f"End your reply with a last line of the form 'Answer: <label>', where <label> is one of: {shown}."


@dataclass(frozen=True)
class Proposal:
    strategy: str
    spec: PromptSpec | None  # None: the strategy produced nothing usable (note says why)
    note: str


@dataclass
class StrategyContext:
    task: TaskData
    current: PromptSpec
    current_val: float
    errors: list[tuple[Example, str]]  # (example, the model's reply) the current prompt got wrong on validation
    history: list[tuple[float, str]]  # (val score, instructions) of every scored candidate so far
    iteration: int
    client: LLMClient
    max_candidates: int = 2
    demos: int = 3
    max_demos: int = 6
    max_errors_shown: int = 6

    def labels(self) -> list[str]:
        if self.task.labels:
            return list(self.task.labels)
        first = next((e for e in [*self.task.val, *self.task.train] if e.choices), None)
        return list(first.labels) if first else []


def parse_rewrite(reply: str) -> list[str] | None:
    """The instruction lines between the last <prompt> … </prompt> of a reply (None if there are none)."""
    found = re.findall(r"<prompt>(.*?)</prompt>", reply or "", flags=re.S | re.I)
    if not found:
        return None
    lines = []
    for line in found[-1].splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip()
        if line:
            lines.append(line[:MAX_LINE_CHARS])
    return lines[:MAX_LINES] or None


def _rewrite(ctx: StrategyContext, strategy: str, user: str) -> list[Proposal]:
    reply = ctx.client.complete([{"role": "system", "content": OPTIMIZER_SYSTEM}, {"role": "user", "content": user}],
                                purpose=f"rewrite:{strategy}")
    lines = parse_rewrite(reply.text)
    if lines is None:
        return [Proposal(strategy, None, "the optimizer's reply had no <prompt>…</prompt>: "
                         + " ".join(reply.text.split())[:200])]
    spec = ctx.current.with_components([Component.of(line) for line in lines])
    return [Proposal(strategy, spec, "rewritten by the optimizer model")]


def performance_based(ctx: StrategyContext) -> list[Proposal]:
    earlier = sorted(ctx.history, key=lambda h: -h[0])[:5]
    listing = "\n".join(f"- accuracy {score:.3f}: " + " / ".join(text.splitlines())[:300] for score, text in earlier)
    user = (f"Task: {ctx.task.task}\nCurrent instructions (validation accuracy {ctx.current_val:.3f}):\n"
            f"<prompt>\n{ctx.current.instructions}\n</prompt>\n\nEarlier attempts, best first:\n{listing or '- none'}\n\n"
            "Write instructions that will score a higher accuracy.")
    return _rewrite(ctx, "performance_based", user)


def error_analysis(ctx: StrategyContext) -> list[Proposal]:
    if not ctx.errors:
        return [Proposal("error_analysis", None, "no validation errors to analyse")]
    shown = []
    for example, reply in ctx.errors[: ctx.max_errors_shown]:
        shown.append(f"--- example\n{render_input(example)}\nExpected: {example.expected}\n"
                     f"Model replied: {' '.join(reply.split())[:300] or '(empty)'}")
    user = (f"Task: {ctx.task.task}\nCurrent instructions (validation accuracy {ctx.current_val:.3f}):\n"
            f"<prompt>\n{ctx.current.instructions}\n</prompt>\n\nThe model got these validation examples wrong "
            f"({len(ctx.errors)} in all, {len(shown)} shown):\n" + "\n".join(shown)
            + "\n\nFind what the errors have in common and revise the instructions to fix them.")
    return _rewrite(ctx, "error_analysis", user)


def ablation(ctx: StrategyContext) -> list[Proposal]:
    out: list[Proposal] = []
    comps = list(ctx.current.components)
    if not ctx.current.has("format"):
        out.append(Proposal("ablation", ctx.current.with_components([*comps, Component.of(format_instruction(
            ctx.labels()))]), "added an answer-format instruction"))
    if len(comps) > 1:
        # one component removed at a time, starting at a different one each iteration (all get their turn)
        for step in range(len(comps)):
            i = (ctx.iteration - 1 + step) % len(comps)
            out.append(Proposal("ablation", ctx.current.with_components(comps[:i] + comps[i + 1:]),
                                f"removed component {i + 1} ({comps[i].kind}): {comps[i].text[:80]}"))
    return out[: ctx.max_candidates]


def chain_of_thought(ctx: StrategyContext) -> list[Proposal]:
    comps = list(ctx.current.components)
    texts = {c.text for c in comps}
    if not any(_STEP_RE.search(c.text) for c in comps):
        cue, note = REASONING_CUE, "added a reasoning cue"
    elif STRUCTURED_CUE not in texts:
        cue, note = STRUCTURED_CUE, "added a structured reasoning cue"
    else:
        return [Proposal("chain_of_thought", None, "the prompt already has both reasoning cues")]
    # before the format instruction, if any: reason first, then answer
    at = next((i for i, c in enumerate(comps) if c.kind == "format"), len(comps))
    return [Proposal("chain_of_thought", ctx.current.with_components(comps[:at] + [Component.of(cue)] + comps[at:]),
                     note)]


def _salted(example_id: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}/{example_id}".encode("utf-8")).hexdigest()


def choose_demonstrations(task: TaskData, k: int, salt: str, label_priority: Sequence[str] = (),
                          exclude: Sequence[str] = ()) -> list[str]:
    """k train examples, label round-robin (``label_priority`` first, then the rest by name), each
    label's examples in sha256(salt/id) order."""
    by_label: dict[str, list[Example]] = {}
    for e in sorted(task.train, key=lambda e: _salted(e.example_id, salt)):
        if e.example_id not in exclude:
            by_label.setdefault(e.expected, []).append(e)
    order = [lb for lb in label_priority if lb in by_label] + sorted(lb for lb in by_label if lb not in label_priority)
    chosen: list[str] = []
    while len(chosen) < k and any(by_label.values()):
        for label in order:
            if by_label[label] and len(chosen) < k:
                chosen.append(by_label[label].pop(0).example_id)
    return chosen


def few_shot_optimization(ctx: StrategyContext) -> list[Proposal]:
    missed = [lb for lb, _ in Counter(e.expected for e, _ in ctx.errors).most_common()]
    current = list(ctx.current.demonstrations)
    salt = f"{ctx.task.task}/{ctx.iteration}"
    sizes = [ctx.demos] if not current else [len(current), min(len(current) + 2, ctx.max_demos)]
    out: list[Proposal] = []
    seen: set[tuple[str, ...]] = {tuple(current)}
    for size in dict.fromkeys(sizes):
        demos = choose_demonstrations(ctx.task, size, salt, missed, exclude=current if size == len(current) else ())
        if tuple(demos) in seen or not demos:
            continue
        seen.add(tuple(demos))
        out.append(Proposal("few_shot_optimization", ctx.current.with_demonstrations(demos),
                            f"{len(demos)} demonstrations from train (labels missed most first: "
                            f"{', '.join(missed[:3]) or 'none'})"))
    return out[: ctx.max_candidates] or [Proposal("few_shot_optimization", None, "no new demonstration set")]


GENERATORS = {
    "performance_based": performance_based,
    "error_analysis": error_analysis,
    "ablation": ablation,
    "chain_of_thought": chain_of_thought,
    "few_shot_optimization": few_shot_optimization,
}
