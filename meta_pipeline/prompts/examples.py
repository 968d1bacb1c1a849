"""A task's labelled examples: the file contract, ingest, the deterministic train/validation/test split.

File (CSV, JSON Lines or Parquet; read by ``contracts.read_input_file`` like every ingest):

* ``example_id`` — unique within the task (≤ 200 characters); re-ingesting an id replaces it;
* ``input`` — the text the model answers;
* ``expected`` — the right answer: for a multiple-choice example the right label (e.g. ``B``);
  otherwise the answer itself (e.g. ``positive``);
* ``choices`` (optional) — ``|``-separated, each ``LABEL) text`` (e.g. ``A) a fridge|B) an oven``),
  or in JSON Lines a list of such strings; ``expected`` must then be one of the labels;
* ``metadata.<key>`` columns / a ``metadata`` object (optional), stored as ``metadata_json``.

A row with an empty id/input/expected, malformed choices, an ``expected`` that is not one of its
choices' labels, text that is too long or holds a NUL, or an id repeated later in the file (the
later row is kept) is quarantined (kind ``examples``, the task in ``domain``) with its line and
reasons; the other rows land. A file without a required column is rejected whole.

Split: an example's split is decided by sha256("<task>/<example_id>") alone, mapped to [0, 1):
below ``train`` → train, below ``train + val`` → validation, else test — stable when examples
are added, and the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from meta_pipeline.contracts import ContractError, prompt_examples, read_input_file, validate_task
from meta_pipeline.ingest import IngestReport, safe_text
from meta_pipeline.prompts.spec import Example
from meta_pipeline.store import MetaStore
from meta_pipeline.store import prompts as prompt_rows

KIND = "examples"
REQUIRED = ("example_id", "input", "expected")
ID_MAX = prompt_examples.c.example_id.type.length
TEXT_MAX = 100_000
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CHOICE_RE = re.compile(r"^\s*([A-Za-z0-9]{1,10})\s*\)\s*(.+?)\s*$", re.S)
QUARANTINE_COLUMNS = ["domain", "kind", "source_file", "line", "reason", "raw_json"]


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_choices(value: object) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(choices, None) or (None, why not). Empty -> ([], None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return [], None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    parts = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split("|")
    parts = [p for p in parts if p.strip()]
    if not parts:
        return [], None
    out: list[tuple[str, str]] = []
    for part in parts:
        m = _CHOICE_RE.match(part)
        if not m:
            return None, f"choice {part.strip()[:40]!r} is not 'LABEL) text'"
        out.append((m.group(1), " ".join(m.group(2).split())))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        return None, "choice labels repeat"
    if len(out) < 2:
        return None, "fewer than two choices"
    return out, None


class ExamplesReport(IngestReport):
    """An ingest report whose partition is a task."""

    @property
    def partition_kind(self) -> str:
        return "task"


def _raw_json(rec: dict) -> str:
    """The row as JSON text; text that is not valid Unicode is kept as its \\uXXXX escape."""
    values = {str(k): _text(v) for k, v in rec.items()}
    text = json.dumps(values, ensure_ascii=False)
    return json.dumps(values) if _SURROGATE_RE.search(text) else text


@dataclass
class ExamplesBatch:
    examples: pd.DataFrame
    quarantine: pd.DataFrame
    n_rows: int = 0
    ignored_columns: list[str] = field(default_factory=list)
    duplicates_in_file: int = 0


def validate_examples(raw: pd.DataFrame, lines: np.ndarray, *, task: str, source: str) -> ExamplesBatch:
    """Rows of an examples file -> clean ``prompt_examples`` rows + quarantine rows (see the module doc)."""
    validate_task(task)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise ContractError(f"{Path(source).name}: missing required column(s) {', '.join(missing)} "
                            f"(examples need {', '.join(REQUIRED)}; optional choices, metadata.*)")
    known = {*REQUIRED, "choices", "metadata"}
    ignored = sorted(str(c) for c in raw.columns if c not in known and not str(c).startswith("metadata.")
                     and not str(c).startswith("_"))
    notes = raw.attrs.get("read_notes")
    row_problems = dict(getattr(notes, "row_problems", {}) or {})
    index_labels = list(raw.index)
    records = raw.to_dict(orient="records")
    good_rows: list[dict] = []
    bad_rows: list[dict] = []
    last_line_of: dict[str, int] = {}
    for i, rec in enumerate(records):
        eid = _text(rec.get("example_id"))
        if eid:
            last_line_of[eid] = i
    duplicates = 0
    for i, rec in enumerate(records):
        problem = row_problems.get(index_labels[i])
        if problem is not None:  # a row the reader could not read as the header says: that reason alone
            line = int(lines[i]) if i < len(lines) else i + 2
            bad_rows.append({"domain": task, "kind": KIND, "source_file": source, "line": line,
                             "reason": str(problem[0]), "raw_json": json.dumps({"raw": str(problem[1])})})
            continue
        reasons: list[str] = []
        eid, text, expected = _text(rec.get("example_id")), _text(rec.get("input")), _text(rec.get("expected"))
        for name, value in (("example_id", eid), ("input", text), ("expected", expected)):
            if not value:
                reasons.append(f"empty {name}")
            elif "\x00" in value:
                reasons.append(f"{name} contains a NUL character")
        if any(_SURROGATE_RE.search(str(v)) for v in rec.values() if isinstance(v, str)) or \
                _SURROGATE_RE.search(json.dumps(rec.get("choices"), ensure_ascii=False, default=str)) or \
                _SURROGATE_RE.search(json.dumps(rec.get("metadata"), ensure_ascii=False, default=str)):
            reasons.append("text that is not valid Unicode")  # a JSON "\\ud800" escape: no database stores it
        if len(eid) > ID_MAX:
            reasons.append(f"example_id longer than {ID_MAX} characters")
        if len(text) > TEXT_MAX:
            reasons.append(f"input longer than {TEXT_MAX} characters")
        choices, why = parse_choices(rec.get("choices"))
        if why:
            reasons.append(why)
        elif choices and expected and expected not in {label for label, _ in choices}:
            reasons.append(f"expected {expected[:20]!r} is not one of the choice labels")
        meta = {k[len("metadata."):]: v for k, v in rec.items() if isinstance(k, str) and k.startswith("metadata.")
                and _text(v)}
        if isinstance(rec.get("metadata"), dict):
            meta.update(rec["metadata"])
        if eid and last_line_of.get(eid) != i and not reasons:
            reasons.append("example_id repeated later in the same file (later row kept)")
            duplicates += 1
        line = int(lines[i]) if i < len(lines) else i + 2
        if reasons:
            bad_rows.append({"domain": task, "kind": KIND, "source_file": source, "line": line,
                             "reason": "; ".join(reasons),
                             "raw_json": _raw_json(rec)})
            continue
        good_rows.append({"example_id": eid, "input": text, "expected": expected,
                          "choices_json": json.dumps([{"label": lb, "text": t} for lb, t in choices],
                                                     ensure_ascii=False) if choices else None,
                          "metadata_json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
                          if meta else None,
                          "source_file": source})
    examples = pd.DataFrame(good_rows, columns=["example_id", "input", "expected", "choices_json", "metadata_json",
                                                "source_file"])
    for line, reason, text in getattr(notes, "line_errors", []) or []:  # lines that are no row at all
        bad_rows.append({"domain": task, "kind": KIND, "source_file": source, "line": int(line), "reason": str(reason),
                         "raw_json": json.dumps({"raw": str(text)})})
    quarantine = pd.DataFrame(bad_rows, columns=QUARANTINE_COLUMNS)
    return ExamplesBatch(examples, quarantine, n_rows=len(records) + len(getattr(notes, "line_errors", []) or []), ignored_columns=ignored,
                         duplicates_in_file=duplicates)


def ingest_examples_file(store: MetaStore, path: str | Path, task: str) -> IngestReport:
    """Validate and land one examples file (``store.prompts.write_examples_batch``: one transaction)."""
    validate_task(task)
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: no such file")
    raw, lines = read_input_file(path)
    source = safe_text(path)
    batch = validate_examples(raw, lines, task=task, source=source)
    report = ExamplesReport(task, KIND, source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns,
                          duplicates_in_file=batch.duplicates_in_file)
    report.ingested, report.replaced, report.quarantined = prompt_rows.write_examples_batch(
        store, batch.examples, batch.quarantine, task=task, source=source, now=pd.Timestamp.now(tz="UTC"))
    reasons: dict[str, int] = {}
    for reason in batch.quarantine["reason"]:
        for part in str(reason).split("; "):
            reasons[part] = reasons.get(part, 0) + 1
    report.reasons = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    return report


# ---------------------------------------------------------------------------
# the task in memory
# ---------------------------------------------------------------------------


def split_of(task: str, example_id: str, train: float, val: float) -> str:
    u = int(hashlib.sha256(f"{task}/{example_id}".encode("utf-8")).hexdigest()[:15], 16) / float(16 ** 15)
    return "train" if u < train else ("val" if u < train + val else "test")


@dataclass
class TaskData:
    """One task's examples, split (see the module doc), with the task's answer labels."""

    task: str
    train: list[Example]
    val: list[Example]
    test: list[Example]
    labels: tuple[str, ...]

    @property
    def by_id(self) -> dict[str, Example]:
        return {e.example_id: e for e in [*self.train, *self.val, *self.test]}

    def labels_for(self, example: Example) -> tuple[str, ...]:
        return example.labels or self.labels


def example_from_row(row: dict) -> Example:
    choices = tuple((c["label"], c["text"]) for c in json.loads(row["choices_json"])) if row.get("choices_json") else ()
    meta = json.loads(row["metadata_json"]) if row.get("metadata_json") else {}
    return Example(str(row["example_id"]), str(row["input"]), str(row["expected"]), choices, meta)


def task_data(task: str, rows: pd.DataFrame, *, train: float = 0.4, val: float = 0.3) -> TaskData:
    """Split a task's ``prompt_examples`` rows; raises ValueError when a split would be empty."""
    if not (0 < train < 1 and 0 < val < 1 and train + val < 1):
        raise ValueError(f"split fractions train={train}, val={val} must be in (0, 1) with train + val < 1")
    examples = [example_from_row(r) for r in rows.sort_values("example_id").to_dict(orient="records")]
    parts: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for e in examples:
        parts[split_of(task, e.example_id, train, val)].append(e)
    empty = [k for k, v in parts.items() if not v]
    if empty:
        raise ValueError(f"task {task}: {len(examples)} examples leave the {', '.join(empty)} split(s) empty; "
                         "ingest more examples (a few hundred are usual)")
    labels = tuple(sorted({e.expected for e in examples if not e.choices}))
    return TaskData(task, parts["train"], parts["val"], parts["test"], labels)


def load_task(store: MetaStore, task: str, *, train: float = 0.4, val: float = 0.3) -> TaskData:
    rows = prompt_rows.read_examples(store, task)
    if rows.empty:
        raise ValueError(f"task {task} has no examples: meta-pipeline ingest examples FILE --task {task}")
    return task_data(task, rows, train=train, val=val)


def examples_frame(examples: Sequence[Example]) -> pd.DataFrame:
    """Examples as ``prompt_examples``-shaped rows (for tests and the lab)."""
    return pd.DataFrame([{"example_id": e.example_id, "input": e.input, "expected": e.expected,
                          "choices_json": json.dumps([{"label": lb, "text": t} for lb, t in e.choices])
                          if e.choices else None, "metadata_json": None} for e in examples])
