"""Ingest: validated files into the source tables, bad rows into quarantine.

One path for the CLI (`meta-pipeline ingest`), the inbox sensor's runs and the demo.
Re-ingesting a trade id (or a telemetry tick, or a task's rating: same ts and input) replaces it, in the same transaction as
the insert, so a crash leaves the previous rows and nothing is ever duplicated.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from meta_pipeline.contracts import (
    DOMAIN_KINDS,
    KINDS,
    TASK_KINDS,
    ContractError,
    read_input_file,
    validate_domain,
    validate_feedback,
    validate_task,
    validate_telemetry,
    validate_trades,
)
from meta_pipeline.store import MetaStore

@dataclass
class IngestReport:
    domain: str  # the domain, or for a task kind (feedback) the task
    kind: str
    source_file: str
    rows_read: int = 0
    ingested: int = 0
    replaced: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exit status rule: only a file from which nothing could be ingested fails."""
        return self.ingested > 0 or self.rows_read == 0

    def summary(self) -> str:
        text = (
            f"{self.kind} {self.source_file} -> {self.partition_kind} {self.domain}: read {self.rows_read}, "
            f"ingested {self.ingested} ({self.replaced} replaced existing), quarantined {self.quarantined}"
        )
        if self.reasons:
            text += "\n  quarantine reasons: " + "; ".join(f"{r} ×{n}" for r, n in self.reasons.items())
        if self.ignored_columns:
            text += "\n  ignored columns: " + ", ".join(self.ignored_columns)
        return text

    @property
    def partition_kind(self) -> str:
        """What ``domain`` names: "domain", or "task" for the task kinds (feedback)."""
        return "task" if self.kind in TASK_KINDS else "domain"

    def as_metadata(self) -> dict[str, int | str]:
        return {
            "rows_read": self.rows_read,
            "ingested": self.ingested,
            "replaced": self.replaced,
            "quarantined": self.quarantined,
        }


def _reason_counts(quarantine: pd.DataFrame) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for reason in quarantine.get("reason", pd.Series(dtype=str)):
        for part in str(reason).split("; "):
            counts[part.split(":")[0]] += 1
    return dict(counts.most_common(8))


def ingest_trades_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> IngestReport:
    """Validate a raw trades frame and land it (``MetaStore.write_trades_batch``: one transaction)."""
    batch = validate_trades(raw, lines, domain=domain, source=source)
    report = IngestReport(domain, "trades", source, rows_read=batch.n_rows)
    report.ingested, report.replaced, report.quarantined = store.write_trades_batch(
        batch.trades, batch.patterns, batch.scope, batch.metrics, batch.quarantine, domain=domain, source=source,
        now=pd.Timestamp.now(tz="UTC"))
    report.reasons = _reason_counts(batch.quarantine)
    return report


def append_telemetry_rows(store: MetaStore, domain: str, rows: pd.DataFrame, source: str) -> int:
    """Telemetry written by a runtime (e.g. `meta-pipeline simulate`): validated rows + a batch record."""
    return store.append_runtime_telemetry(validate_domain(domain), rows, source)


def ingest_telemetry_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> IngestReport:
    """Validate a raw telemetry frame and land it (``MetaStore.write_telemetry_batch``: one transaction)."""
    batch = validate_telemetry(raw, lines, domain=domain, source=source)
    report = IngestReport(domain, "telemetry", source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns)
    report.ingested, report.replaced, report.quarantined = store.write_telemetry_batch(
        batch.telemetry, batch.quarantine, domain=domain, source=source, now=pd.Timestamp.now(tz="UTC"))
    report.reasons = _reason_counts(batch.quarantine)
    return report


def ingest_feedback_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, task: str,
                          source: str) -> IngestReport:
    """Validate a raw feedback frame and land it (``MetaStore.write_feedback_batch``: one transaction)."""
    batch = validate_feedback(raw, lines, task=task, source=source)
    report = IngestReport(task, "feedback", source, rows_read=batch.n_rows)
    report.ingested, report.replaced, report.quarantined = store.write_feedback_batch(
        batch.feedback, batch.quarantine, task=task, source=source, now=pd.Timestamp.now(tz="UTC"))
    report.reasons = _reason_counts(batch.quarantine)
    return report


def ingest_file(store: MetaStore, kind: str, path: str | Path, domain: str) -> IngestReport:
    """Validate and load one file. Raises ContractError if the file is rejected whole.

    ``domain`` is the partition the file lands in: a domain for trades and telemetry, a
    task for feedback (``TASK_KINDS``; validated by the same rule, named as a task).
    """
    if kind not in KINDS:
        raise ContractError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind in TASK_KINDS:
        validate_task(domain)
    else:
        validate_domain(domain)
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: no such file")
    raw, lines = read_input_file(path)
    if kind == "trades":
        return ingest_trades_frame(store, raw, lines, domain=domain, source=str(path))
    if kind == "feedback":
        return ingest_feedback_frame(store, raw, lines, task=domain, source=str(path))
    return ingest_telemetry_frame(store, raw, lines, domain=domain, source=str(path))


def quarantine_whole_file(store: MetaStore, kind: str, path: str | Path, domain: str, reason: str) -> None:
    """Record a file rejected whole (missing columns, bad domain folder) as one quarantine row."""
    store.append(
        "quarantine",
        pd.DataFrame(
            [{"domain": domain[:300], "kind": kind if kind in KINDS else "trades", "source_file": str(path),
              "line": 0, "reason": reason, "raw_json": None, "quarantined_at": pd.Timestamp.now(tz="UTC")}]
        ),
    )


# ---------------------------------------------------------------------------
# The inbox: data/inbox/<domain>/<trades|telemetry>/<file>
# ---------------------------------------------------------------------------

INBOX_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json", ".parquet")
DONE_DIR, REJECTED_DIR = "processed", "rejected"


@dataclass(frozen=True)
class InboxFile:
    domain: str  # raw folder name: validated before use
    kind: str
    path: Path
    size: int
    mtime_ns: int

    @property
    def run_key(self) -> str:
        """Same file, same bytes -> same key; touching or rewriting a file makes a new batch."""
        return f"inbox:{self.domain}:{self.kind}:{self.path.name}:{self.size}:{self.mtime_ns}"


def scan_inbox(inbox: Path) -> list[InboxFile]:
    """Files waiting in the inbox, oldest first (processed/rejected subfolders excluded)."""
    found: list[InboxFile] = []
    if not inbox.is_dir():
        return found
    for domain_dir in sorted(p for p in inbox.iterdir() if p.is_dir()):
        for kind in DOMAIN_KINDS:  # feedback is per task and comes through the CLI, not the domain inbox
            kind_dir = domain_dir / kind
            if not kind_dir.is_dir():
                continue
            for f in kind_dir.iterdir():
                if f.is_file() and f.suffix.lower() in INBOX_SUFFIXES and not f.name.startswith("."):
                    st = f.stat()
                    found.append(InboxFile(domain_dir.name, kind, f, st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda x: (x.mtime_ns, str(x.path)))


def ingest_inbox_file(store: MetaStore, item: InboxFile) -> IngestReport:
    """Ingest one inbox file and move it to processed/ (or rejected/ when refused whole)."""
    try:
        validate_domain(item.domain)
        report = ingest_file(store, item.kind, item.path, item.domain)
    except ContractError as exc:
        quarantine_whole_file(store, item.kind, item.path, item.domain, str(exc))
        _move(item.path, item.path.parent / REJECTED_DIR)
        raise
    _move(item.path, item.path.parent / DONE_DIR)
    return report


def _move(path: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if target.exists():
        target = folder / f"{path.stem}.{pd.Timestamp.now(tz='UTC').strftime('%Y%m%dT%H%M%S%f')}{path.suffix}"
    shutil.move(str(path), str(target))
