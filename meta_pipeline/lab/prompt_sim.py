"""A simulated model with planted truth for prompt evolution, and the `evaluate --section prompts` report.

The simulated model answers a task's examples; how often it is right depends only on what the
prompt contains (the planted truth, ``SimTruth``), read from the system message the way a model
would see it:

    reasoning  a reasoning cue ("step by step", "think", "reason")            +reasoning
    options    a structured cue ("each option", "eliminate")                  +structured (with a reasoning cue)
    demos      k "### Example" demonstrations                                  +demos · min(k, 3)/3
    chatty     a chatty persona line ("friendly", "chat", "emoji")             −distractor
    P(right) = clip(base + the terms above, 0.02, 0.98)

    format     an answer-format instruction ("Answer: <label>", "only the label"): without one,
               a reply is unparseable (no label in it) with probability `unparseable`

Draws are deterministic: u = sha256(seed, example input, the prompt's feature signature) —
prompts with the same features answer alike; different features draw afresh. A wrong answer
is another label, also drawn from the hash. The model knows the answer key of the examples it
was built with (a simulator's oracle); an input it does not know gets an unparseable reply.

As the optimizer model (a request whose system message is strategies.OPTIMIZER_SYSTEM) it is a
plausible, imperfect editor: ``error_analysis`` adds an answer-format instruction when the
errors include replies without a label, else a structured reasoning cue; ``performance_based``
adds one line from a fixed pool chosen by the hash of the current instructions (some lines
help, some are neutral, one is the chatty persona, which hurts). As the rationale writer it
quotes three numbers of the evidence JSON.

Nothing here proves that prompt evolution helps a real model: the figures show that the
machinery finds the planted improvements, at what cost in calls, and how the test behaves.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.llm import LLMClient, LLMSettings, MemoryCache, ScriptedProvider, register_responder
from meta_pipeline.prompts.comparison import compare_on_test
from meta_pipeline.prompts.evolution import EvolutionSettings, evolve
from meta_pipeline.prompts.examples import TaskData, example_from_row, task_data
from meta_pipeline.prompts.spec import Example, PromptSpec, render_input
from meta_pipeline.prompts.strategies import OPTIMIZER_SYSTEM

SIM_MODEL = "prompt-sim"
_REASONING = re.compile(r"step by step|\bthink\b|\breason", re.I)
_STRUCTURED = re.compile(r"each option|every option|eliminat", re.I)
_FORMAT = re.compile(r"answer:\s*<|only the (?:letter|label|word)|single (?:letter|word|label)", re.I)
_CHATTY = re.compile(r"friendly|\bchat|emoji", re.I)
_DEMO = re.compile(r"^### Example \d+", re.M)


@dataclass(frozen=True)
class SimTruth:
    base: float
    reasoning: float
    structured: float
    demos: float
    distractor: float
    unparseable: float

    def p_right(self, f: "Features") -> float:
        p = self.base + self.reasoning * f.reasoning + self.structured * (f.reasoning and f.structured) \
            + self.demos * min(f.demos, 3) / 3.0 - self.distractor * f.chatty
        return float(min(0.98, max(0.02, p)))

    def expected_accuracy(self, f: "Features") -> float:
        return self.p_right(f) * (1.0 if f.format else 1.0 - self.unparseable)

    def ceiling(self) -> float:
        return self.expected_accuracy(Features(True, True, True, 3, False))


@dataclass(frozen=True)
class Features:
    reasoning: bool
    structured: bool
    format: bool
    demos: int
    chatty: bool

    @classmethod
    def of(cls, system: str) -> "Features":
        instructions = _DEMO.split(system)[0]
        return cls(bool(_REASONING.search(instructions)), bool(_STRUCTURED.search(instructions)),
                   bool(_FORMAT.search(instructions)), len(_DEMO.findall(system)), bool(_CHATTY.search(instructions)))

    def signature(self) -> str:
        return f"r{int(self.reasoning)}s{int(self.structured)}f{int(self.format)}d{min(self.demos, 3)}c{int(self.chatty)}"


# the planted truth of the two sample tasks (examples/tasks/)
TRUTHS = {
    "commonsense-mc": SimTruth(base=0.45, reasoning=0.15, structured=0.06, demos=0.10, distractor=0.06,
                               unparseable=0.35),
    "sentiment": SimTruth(base=0.70, reasoning=0.02, structured=0.0, demos=0.12, distractor=0.04, unparseable=0.30),
}
PERFORMANCE_POOL = (
    "Read the input carefully.",
    "Use common sense about everyday situations.",
    "Be a friendly assistant and keep a chatty tone.",
    "Think about what a typical person would do.",
    "Reply with only the label, for example 'Answer: <label>'.",
    "Consider each option in turn and eliminate the ones that do not fit.",
)


def _u(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / float(16 ** 15)


@dataclass
class SimulatedModel:
    """A responder for the scripted provider (module doc). ``examples``: the answer key."""

    truth: SimTruth
    examples: Sequence[Example]
    labels: Sequence[str] = ()
    seed: int = 0
    _key: dict[str, Example] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._key = {render_input(e): e for e in self.examples}

    def __call__(self, messages: Sequence[dict]) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if system.startswith(OPTIMIZER_SYSTEM):
            return self._optimize(user)
        if "evidence_json" in system or "EVIDENCE" in user:
            return self._rationale(user)
        return self._answer(system, user)

    # -- answering ----------------------------------------------------------------
    def _answer(self, system: str, user: str) -> str:
        example = self._key.get(user)
        if example is None:
            return "I am not sure what is being asked."
        f = Features.of(system)
        labels = list(example.labels or self.labels)
        right = _u(self.seed, "right", user, f.signature()) < self.truth.p_right(f)
        if right or len(labels) < 2:
            answer = example.expected
        else:
            wrong = [lb for lb in labels if lb != example.expected]
            answer = wrong[int(_u(self.seed, "wrong", user, f.signature()) * len(wrong)) % len(wrong)]
        lead = "Let me think step by step about this. " if f.reasoning else ""
        if f.format:
            return f"{lead}\nAnswer: {answer}"
        if _u(self.seed, "format", user, f.signature()) < self.truth.unparseable:
            return lead + "Hmm, this one is tricky; more than one reading seems plausible to me."
        return lead + (f"I'd pick option {answer}." if example.choices else f"I'd say it is {answer}.")

    # -- the optimizer -----------------------------------------------------------------
    @staticmethod
    def _current_lines(user: str) -> list[str]:
        found = re.search(r"<prompt>\n?(.*?)\n?</prompt>", user, flags=re.S)
        return [ln for ln in (found.group(1).splitlines() if found else []) if ln.strip()]

    def _optimize(self, user: str) -> str:
        lines = self._current_lines(user)
        text = "\n".join(lines)
        if "got these validation examples wrong" in user:
            unparsed = re.findall(r"Model replied: (.*)", user)
            no_label = any(not re.search(r"Answer:|option [A-Z]|it is \w+", r) for r in unparsed)
            if no_label and not _FORMAT.search(text):
                lines.append("Reply with only the label on the last line, as 'Answer: <label>'.")
            elif not _STRUCTURED.search(text):
                lines.append("Consider each option in turn and eliminate the ones that do not fit.")
            else:
                lines.append("Double-check the answer against the input before replying.")
        else:
            pick = PERFORMANCE_POOL[int(_u(self.seed, "perf", text) * len(PERFORMANCE_POOL)) % len(PERFORMANCE_POOL)]
            if pick not in lines:
                lines.append(pick)
        return "Here is the revised prompt.\n<prompt>\n" + "\n".join(lines) + "\n</prompt>"

    # -- rationales ------------------------------------------------------------------------
    @staticmethod
    def _rationale(user: str) -> str:
        found = re.search(r"EVIDENCE:\s*(\{.*\})", user, flags=re.S)
        try:
            evidence = json.loads(found.group(1)) if found else {}
        except json.JSONDecodeError:
            evidence = {}
        numbers: list[tuple[str, Any]] = []

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k in sorted(obj):
                    walk(f"{prefix}{k}.", obj[k])
            elif isinstance(obj, list):
                for i, v in enumerate(obj[:3]):
                    walk(f"{prefix}{i}.", v)
            elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
                numbers.append((prefix.rstrip("."), obj))

        walk("", evidence)
        quoted = "; ".join(f"{name.replace('_', ' ')} {json.dumps(value)}" for name, value in numbers[:3])
        return (f"The evidence supports this change: {quoted or 'see the evidence'}. "
                "A reviewer should check that the proposed configuration matches the intent.")


def register_sim(task: str, rows: pd.DataFrame, seed: int = 0, name: str = SIM_MODEL) -> SimulatedModel:
    """Register the simulated model of a task (its planted truth, its examples as the answer key)
    as the scripted model ``name`` of this process; returns it."""
    examples = [example_from_row(r) for r in rows.to_dict(orient="records")]
    labels = tuple(sorted({e.expected for e in examples if not e.choices}))
    model = SimulatedModel(TRUTHS.get(task, TRUTHS["commonsense-mc"]), examples, labels, seed)
    register_responder(name, model)
    return model


# ---------------------------------------------------------------------------
# evaluate --section prompts
# ---------------------------------------------------------------------------

SAMPLE_TASKS = {"commonsense-mc": ("commonsense_mc.jsonl", "commonsense_mc.prompt.txt"),
                "sentiment": ("sentiment.csv", "sentiment.prompt.txt")}


def sample_tasks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "tasks"


def load_sample_task(task: str, folder: Path | None = None) -> tuple[pd.DataFrame, str]:
    """(prompt_examples-shaped rows, starting prompt text) of a sample task, validated like an ingest."""
    from meta_pipeline.contracts import read_input_file
    from meta_pipeline.prompts.examples import validate_examples

    folder = folder or sample_tasks_dir()
    data_file, prompt_file = SAMPLE_TASKS[task]
    raw, lines = read_input_file(folder / data_file)
    batch = validate_examples(raw, lines, task=task, source=str(folder / data_file))
    if len(batch.quarantine):
        raise ValueError(f"{data_file}: {len(batch.quarantine)} rows quarantined")
    return batch.examples, (folder / prompt_file).read_text(encoding="utf-8")


@dataclass(frozen=True)
class PromptEvalConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tasks: tuple[str, ...] = ("commonsense-mc", "sentiment")
    settings: EvolutionSettings = EvolutionSettings()


def one_run(task: str, rows: pd.DataFrame, prompt_text: str, seed: int,
            settings: EvolutionSettings) -> dict[str, Any]:
    model = SimulatedModel(TRUTHS[task], [example_from_row(r) for r in rows.to_dict(orient="records")],
                           tuple(sorted({str(e) for e in rows.loc[rows["choices_json"].isna(), "expected"]})), seed)
    client = LLMClient(LLMSettings(provider="scripted", model=SIM_MODEL), ScriptedProvider(model), MemoryCache())
    data: TaskData = task_data(task, rows)
    start = PromptSpec.from_text(prompt_text)
    t0 = time.perf_counter()
    result = evolve(client, data, start, settings)
    evolution_calls = client.usage.calls
    test = compare_on_test(client, data, start, result.best, seed=seed)
    pool = data.by_id
    truth = TRUTHS[task]
    accepted = result.candidates[(result.candidates["iteration"] > 0) & result.candidates["accepted"]]
    return {
        "task": task, "seed": seed, "static_test": test.paired.baseline_accuracy,
        "evolved_test": test.paired.candidate_accuracy, "margin": test.paired.margin,
        "ci_low": test.paired.ci_low, "ci_high": test.paired.ci_high, "p_value": test.paired.p_value,
        "baseline_val": result.baseline_val, "best_val": result.best_val, "iterations": result.iterations,
        "converged": result.converged, "stop_reason": result.stop_reason, "evolution_calls": evolution_calls,
        "total_calls": client.usage.calls, "tokens": client.usage.tokens,
        "accepted_strategies": accepted["strategy"].tolist(),
        "planted_static": truth.expected_accuracy(Features.of(start.render(pool))),
        "planted_evolved": truth.expected_accuracy(Features.of(result.best.render(pool))),
        "planted_ceiling": truth.ceiling(), "n_val": len(data.val), "n_test": len(data.test),
        "best_prompt": result.best.render(pool), "seconds": time.perf_counter() - t0,
    }


def prompts_section(cfg: PromptEvalConfig = PromptEvalConfig(), folder: Path | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    runs = []
    for task in cfg.tasks:
        rows, prompt_text = load_sample_task(task, folder)
        for seed in cfg.seeds:
            if progress:
                progress(f"prompts: {task} seed {seed}")
            runs.append(one_run(task, rows, prompt_text, seed, cfg.settings))
    frame = pd.DataFrame(runs)
    summary = []
    for task, g in frame.groupby("task", sort=False):
        wins: dict[str, int] = {}
        for strategies in g["accepted_strategies"]:
            for s in strategies:
                wins[s] = wins.get(s, 0) + 1
        summary.append({
            "task": task, "runs": len(g), "n_val": int(g["n_val"].iloc[0]), "n_test": int(g["n_test"].iloc[0]),
            "static_test": float(g["static_test"].mean()), "evolved_test": float(g["evolved_test"].mean()),
            "margin": float(g["margin"].mean()), "margin_min": float(g["margin"].min()),
            "p_below_0.05": int((g["p_value"] < 0.05).sum()), "p_median": float(g["p_value"].median()),
            "planted_static": float(g["planted_static"].mean()), "planted_evolved": float(g["planted_evolved"].mean()),
            "planted_ceiling": float(g["planted_ceiling"].iloc[0]),
            "evolution_calls": float(g["evolution_calls"].mean()), "total_calls": float(g["total_calls"].mean()),
            "iterations": float(g["iterations"].mean()), "converged": int(g["converged"].sum()),
            "winning_strategies": dict(sorted(wins.items(), key=lambda kv: -kv[1])),
        })
    return {"summary": summary, "runs": runs, "settings": cfg.settings.__dict__, "seeds": list(cfg.seeds)}


def format_prompts_report(res: dict[str, Any]) -> str:
    out = ["Prompt evolution on the sample tasks with a SIMULATED model (planted truth: lab/prompt_sim.py).",
           "These figures show the machinery (strategies, acceptance/rollback, convergence, the paired test), not",
           "what prompt evolution does for a real model. Mean over seeds " + ", ".join(map(str, res["seeds"])) + ".",
           ""]
    header = ("task", "runs", "static test", "evolved test", "margin (min)", "p<0.05", "planted static→evolved (ceil)",
              "calls evol/total", "iterations", "converged")
    rows = []
    for s in res["summary"]:
        rows.append((s["task"], str(s["runs"]), f"{s['static_test']:.3f}", f"{s['evolved_test']:.3f}",
                     f"{s['margin']:+.3f} ({s['margin_min']:+.3f})", f"{s['p_below_0.05']}/{s['runs']}",
                     f"{s['planted_static']:.3f}→{s['planted_evolved']:.3f} ({s['planted_ceiling']:.3f})",
                     f"{s['evolution_calls']:.0f}/{s['total_calls']:.0f}", f"{s['iterations']:.1f}",
                     f"{s['converged']}/{s['runs']}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    out.append("")
    for s in res["summary"]:
        wins = ", ".join(f"{k} ×{v}" for k, v in s["winning_strategies"].items()) or "none"
        out.append(f"{s['task']}: accepted rewrites by strategy: {wins} (val {s['n_val']}, test {s['n_test']} examples)")
    first = {r["task"]: r for r in reversed(res["runs"])}
    for task, r in first.items():
        out.append(f"\n{task}, seed {r['seed']}: evolved prompt (stop: {r['stop_reason']})\n  "
                   + r["best_prompt"].split("### Example")[0].strip().replace("\n", "\n  ")
                   + (f"\n  + {r['best_prompt'].count('### Example')} demonstrations" if "### Example" in r["best_prompt"]
                      else ""))
    out.append("\nAgainst a real model: META_PIPELINE_LLM_PROVIDER=openai-compatible META_PIPELINE_LLM_BASE_URL=... "
               "META_PIPELINE_LLM_MODEL=... (or openai/anthropic with META_PIPELINE_LLM_API_KEY), then "
               "`meta-pipeline ingest examples FILE --task NAME`, `meta-pipeline prompts init --task NAME --file "
               "PROMPT.txt`, `meta-pipeline prompts evolve --task NAME` (docs/prompts.md).")
    return "\n".join(out)


def jsonable_runs(res: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(res, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
