"""A prompt as data: instruction components plus demonstrations, rendered into chat messages;
the model's answer parsed back to a label.

A ``PromptSpec`` is an ordered list of instruction components (one sentence or line each,
with a kind: ``task``, ``reasoning``, ``format`` or ``other`` — ``classify_component``) and
the ids of its demonstrations (training examples). A model call sends, in this order:

    system:  the instructions (one component per line), then "### Example k" blocks — each a
             demonstration's input, its choices and "Answer: <expected>"
    user:    the example's input, then its choices ("A) text" per line)

so the prompt (instructions, then any demonstrations) always precedes the example's input
and choices. The same rendering serves every provider.

Parsing (``parse_answer``): the last "Answer: X" / "answer is X" wins; else a reply that is
just a label; else, for lettered choices, "option X" / "(X)" / "X)" when exactly one label
is named that way; else, for word labels (e.g. positive/negative), the one label word the
reply contains, if exactly one. Anything else is unparseable (counted wrong).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

COMPONENT_KINDS = ("task", "reasoning", "format", "other")
_REASONING_RE = re.compile(r"step by step|\bthink\b|\breason|\bexplain\b|each option|every option|eliminat", re.I)
_FORMAT_RE = re.compile(r"answer:|\bonly (?:the|one)\b|\brespond with\b|\breply with\b|\bformat\b|\blast line\b|"
                        r"\bsingle (?:letter|word|label)\b", re.I)
_TASK_RE = re.compile(r"\b(?:question|classify|choose|pick|select|decide|determine|label)\b", re.I)


def classify_component(text: str) -> str:
    """The kind of one instruction line: format (answer-format instruction), reasoning (a reasoning cue),
    task (what to do) or other — the first rule that matches, in that order."""
    if _FORMAT_RE.search(text):
        return "format"
    if _REASONING_RE.search(text):
        return "reasoning"
    if _TASK_RE.search(text):
        return "task"
    return "other"


@dataclass(frozen=True)
class Component:
    text: str
    kind: str

    @classmethod
    def of(cls, text: str) -> "Component":
        text = " ".join(text.split())
        return cls(text, classify_component(text))


@dataclass(frozen=True)
class PromptSpec:
    components: tuple[Component, ...]
    demonstrations: tuple[str, ...] = ()

    @classmethod
    def from_text(cls, text: str, demonstrations: Sequence[str] = ()) -> "PromptSpec":
        """One component per non-empty line of the text."""
        comps = tuple(Component.of(line) for line in text.splitlines() if line.strip())
        return cls(comps, tuple(demonstrations))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PromptSpec":
        """From a PROMPT_TEMPLATE config: {"instructions": [lines], "demonstrations": [example ids]}."""
        lines = config.get("instructions")
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise ValueError("PROMPT_TEMPLATE config needs 'instructions': a list of lines")
        demos = config.get("demonstrations", [])
        if not isinstance(demos, list) or not all(isinstance(x, str) for x in demos):
            raise ValueError("PROMPT_TEMPLATE config 'demonstrations' must be a list of example ids")
        return cls.from_text("\n".join(lines), demos)

    def to_config(self) -> dict[str, Any]:
        return {"instructions": [c.text for c in self.components], "demonstrations": list(self.demonstrations)}

    def to_json(self) -> str:
        return json.dumps(self.to_config(), sort_keys=True, ensure_ascii=False)

    @property
    def instructions(self) -> str:
        return "\n".join(c.text for c in self.components)

    def kinds(self) -> list[str]:
        return [c.kind for c in self.components]

    def has(self, kind: str) -> bool:
        return any(c.kind == kind for c in self.components)

    def with_components(self, components: Sequence[Component]) -> "PromptSpec":
        return PromptSpec(tuple(components), self.demonstrations)

    def with_demonstrations(self, demos: Sequence[str]) -> "PromptSpec":
        return PromptSpec(self.components, tuple(demos))

    def render(self, examples: Mapping[str, "Example"] | None = None) -> str:
        """The prompt as the model sees it before an example (the system message)."""
        parts = [self.instructions]
        for k, demo_id in enumerate(self.demonstrations, 1):
            demo = (examples or {}).get(demo_id)
            if demo is None:
                parts.append(f"### Example {k}\n(example {demo_id} not found)")
                continue
            parts.append(f"### Example {k}\n{render_input(demo)}\nAnswer: {demo.expected}")
        return "\n\n".join(p for p in parts if p)


@dataclass(frozen=True)
class Example:
    example_id: str
    input: str
    expected: str
    choices: tuple[tuple[str, str], ...] = ()  # (label, text)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.choices)


def render_input(example: Example) -> str:
    text = f"Input: {example.input}"
    if example.choices:
        text += "\nChoices:\n" + "\n".join(f"{label}) {choice}" for label, choice in example.choices)
    return text


def messages_for(spec: PromptSpec, example: Example, pool: Mapping[str, Example]) -> list[dict]:
    """The chat messages of one model call: the prompt (system), then the example (user)."""
    return [{"role": "system", "content": spec.render(pool)}, {"role": "user", "content": render_input(example)}]


_ANSWER_RE = re.compile(r"answer\s*(?:is)?\s*[:\-]?\s*\(?\s*\**\s*([A-Za-z][A-Za-z_-]*)\b", re.I)


def parse_answer(text: str, labels: Sequence[str]) -> str | None:
    """The label a reply gives (see the module doc), or None when it gives none."""
    if not text:
        return None
    by_fold = {label.casefold(): label for label in labels}
    found = [m.group(1) for m in _ANSWER_RE.finditer(text) if m.group(1).casefold() in by_fold]
    if found:
        return by_fold[found[-1].casefold()]
    bare = text.strip().strip(".*()[]\"' ").casefold()
    if bare in by_fold:
        return by_fold[bare]
    lettered = all(len(label) == 1 for label in labels)
    if lettered:
        hits = set()
        for m in re.finditer(r"(?:option|choice)\s+\(?([A-Z])\b|\(([A-Z])\)|\b([A-Z])\)", text):
            hits.add(next(g for g in m.groups() if g))
        named = {h for h in hits if h.casefold() in by_fold}
        return by_fold[named.pop().casefold()] if len(named) == 1 else None
    words = {label for label in labels if re.search(rf"\b{re.escape(label)}\b", text, re.I)}
    return words.pop() if len(words) == 1 else None
