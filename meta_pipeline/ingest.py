"""Ingest: validated files into the source tables, bad rows into quarantine.

One path for the CLI (`meta-pipeline ingest`), the inbox sensor's runs and the demo.
Re-ingesting a trade id (or a telemetry tick, or a task's rating: same ts and input) replaces it, in the same transaction as
the insert, so a crash leaves the previous rows and nothing is ever duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

from meta_pipeline.contracts import (
    DOMAIN_KINDS,
    DOMAIN_RE,
    GOVERNANCE_KINDS,
    KINDS,
    TASK_KINDS,
    ContractError,
    read_input_file,
    validate_domain,
    validate_feedback,
    validate_backtests,
    validate_configs,
    validate_task,
    validate_telemetry,
    validate_trades,
)
from meta_pipeline.ingest_stream import ingest_trades_file
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
    ignored_columns: list[str] = field(default_factory=list)  # "name" or "name (why)": ignored, rows kept
    duplicates_in_file: int = 0  # rows superseded by a later row with the same key in the file (in quarantine)

    @property
    def ok(self) -> bool:
        """Exit status rule: only a file from which nothing could be ingested fails."""
        return self.ingested > 0 or self.rows_read == 0

    def summary(self) -> str:
        text = (
            f"{self.kind} {self.source_file} -> {self.partition_kind} {self.domain}: read {self.rows_read}, "
            f"ingested {self.ingested} ({self.replaced} replaced existing), quarantined {self.quarantined}"
        )
        if self.duplicates_in_file:
            text += (f" (of which {self.duplicates_in_file} repeated a key later in the file: "
                     "the later row is kept)")
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
            "duplicates_in_file": self.duplicates_in_file,
            "ignored_columns": len(self.ignored_columns),
        }


def _reason_counts(quarantine: pd.DataFrame) -> dict[str, int]:
    """The most common reasons, without their details ("not UTF-8 at byte 12" counts as "not UTF-8")."""
    counts: Counter[str] = Counter()
    for reason in quarantine.get("reason", pd.Series(dtype=str)):
        for part in str(reason).split("; "):
            counts[part.split(":")[0].split(" at byte ")[0]] += 1
    return dict(counts.most_common(8))


def ingest_trades_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, domain: str, source: str) -> IngestReport:
    """Validate a raw trades frame and land it (``MetaStore.write_trades_batch``: one transaction)."""
    batch = validate_trades(raw, lines, domain=domain, source=source)
    report = IngestReport(domain, "trades", source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns,
                          duplicates_in_file=batch.duplicates_in_file)
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
    report = IngestReport(domain, "telemetry", source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns,
                          duplicates_in_file=batch.duplicates_in_file)
    report.ingested, report.replaced, report.quarantined = store.write_telemetry_batch(
        batch.telemetry, batch.quarantine, domain=domain, source=source, now=pd.Timestamp.now(tz="UTC"))
    report.reasons = _reason_counts(batch.quarantine)
    return report


def ingest_feedback_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, task: str,
                          source: str) -> IngestReport:
    """Validate a raw feedback frame and land it (``MetaStore.write_feedback_batch``: one transaction)."""
    batch = validate_feedback(raw, lines, task=task, source=source)
    report = IngestReport(task, "feedback", source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns,
                          duplicates_in_file=batch.duplicates_in_file)
    report.ingested, report.replaced, report.quarantined = store.write_feedback_batch(
        batch.feedback, batch.quarantine, task=task, source=source, now=pd.Timestamp.now(tz="UTC"))
    report.reasons = _reason_counts(batch.quarantine)
    return report


def ingest_backtests_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, domain: str,
                           source: str) -> IngestReport:
    """Validate a backtest-runs frame and land it: a run_id already stored for this domain is replaced;
    one that belongs to another domain is quarantined (run_id is global). One transaction."""
    from meta_pipeline.store import configs as config_rows

    batch = validate_backtests(raw, lines, domain=domain, source=source)
    report = IngestReport(domain, "backtests", source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns,
                          duplicates_in_file=batch.duplicates_in_file)
    now = pd.Timestamp.now(tz="UTC")
    quarantine = batch.quarantine
    with store.write() as conn:
        rows = batch.rows
        owners = config_rows.backtest_run_owners(conn, rows["run_id"].tolist())
        foreign = rows["run_id"].map(lambda r: owners.get(r, domain) != domain).to_numpy(dtype=bool)
        if foreign.any():
            quarantine = pd.concat([quarantine, pd.DataFrame({
                "domain": domain, "kind": "backtests", "source_file": source, "line": 0,
                "reason": [f"run_id {r!r} already belongs to domain {owners[r]!r}" for r in rows.loc[foreign, "run_id"]],
                "raw_json": [json.dumps({"run_id": r}) for r in rows.loc[foreign, "run_id"]]})], ignore_index=True)
            rows = rows[~foreign]
        report.replaced = config_rows.replace_backtest_runs(conn, rows.to_dict(orient="records"))
        report.ingested = len(rows)
        report.quarantined = len(quarantine)
        if len(quarantine):
            store.append("quarantine", quarantine.assign(quarantined_at=now), conn=conn)
        store.record_batch(conn, domain, "backtests", source, report.ingested, report.quarantined, now)
    report.reasons = _reason_counts(quarantine)
    return report


def ingest_configs_frame(store: MetaStore, raw: pd.DataFrame, lines: np.ndarray, *, domain: str,
                         source: str) -> IngestReport:
    """Validate an engine-configs frame and land each row as its target's next ``configs`` version (in
    valid_from order). A row already there (equal to the active config, or the same config and valid_from
    sent before) writes nothing and counts as ingested and replaced. One transaction."""
    from meta_pipeline.store import configs as config_rows

    batch = validate_configs(raw, lines, domain=domain, source=source)
    report = IngestReport(domain, "configs", source, rows_read=batch.n_rows, ignored_columns=batch.ignored_columns,
                          duplicates_in_file=batch.duplicates_in_file)
    now = pd.Timestamp.now(tz="UTC")
    rows = batch.rows.assign(valid_from=pd.to_datetime(batch.rows["valid_from"], utc=True).fillna(now))
    actor = f"ingest {Path(source).name}"[:200]
    with store.write() as conn:
        for row in rows.sort_values("valid_from", kind="stable").itertuples(index=False):
            version = config_rows.write_ingested_config(conn, row.target_type, row.target_id, row.config_json, actor,
                                                        row.valid_from.to_pydatetime(), now.to_pydatetime())
            report.ingested += 1
            report.replaced += version is None  # already there (the active config, or sent before): unchanged
        report.quarantined = len(batch.quarantine)
        if len(batch.quarantine):
            store.append("quarantine", batch.quarantine.assign(quarantined_at=now), conn=conn)
        store.record_batch(conn, domain, "configs", source, report.ingested, report.quarantined, now)
    report.reasons = _reason_counts(batch.quarantine)
    return report


def ingest_file(store: MetaStore, kind: str, path: str | Path, domain: str) -> IngestReport:
    """Validate and load one file. Raises ContractError if the file is rejected whole.

    ``domain`` is the partition the file lands in: a domain for trades and telemetry, a
    task for feedback (``TASK_KINDS``; validated by the same rule, named as a task).

    Rejected whole (ContractError, the message names the file and says what is wrong): a
    file with no locatable row (empty, binary, not JSON Lines, not Parquet, unreadable) or
    without a required column — nothing of it is written. Anything else wrong with a file
    spoils single rows, which go to quarantine with their physical line; the other rows
    land (``contracts.read_input_file`` and the validators).
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
    # the path as stored text: a file name that is not UTF-8 is kept visible (\xNN), never a database error
    source = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if kind == "trades":  # span by span, in bounded memory (ingest_stream); one transaction all the same
        landed = ingest_trades_file(store, path, domain=domain, source=source)
        return IngestReport(domain, "trades", source, rows_read=landed.rows_read, ingested=landed.ingested,
                            replaced=landed.replaced, quarantined=landed.quarantined,
                            reasons=dict(landed.reasons.most_common(8)), ignored_columns=landed.ignored_columns,
                            duplicates_in_file=landed.duplicates_in_file)
    raw, lines = read_input_file(path)
    if kind == "feedback":
        return ingest_feedback_frame(store, raw, lines, task=domain, source=source)
    if kind == "backtests":
        return ingest_backtests_frame(store, raw, lines, domain=domain, source=source)
    if kind == "configs":
        return ingest_configs_frame(store, raw, lines, domain=domain, source=source)
    return ingest_telemetry_frame(store, raw, lines, domain=domain, source=source)


def quarantine_whole_file(store: MetaStore, kind: str, path: str | Path, domain: str, reason: str,
                          conn: Connection | None = None) -> None:
    """Record a file rejected whole (missing columns, bad domain folder, unreadable) as one quarantine row (line 0)."""
    store.append("quarantine", _whole_file_row(kind, path, domain, reason, pd.Timestamp.now(tz="UTC")), conn=conn)


def _whole_file_row(kind: str, path: str | Path, domain: str, reason: str, now: pd.Timestamp) -> pd.DataFrame:
    return pd.DataFrame(
        [{"domain": safe_text(domain)[:300], "kind": kind if kind in KINDS else "trades",
          "source_file": safe_text(path), "line": 0, "reason": safe_text(reason), "raw_json": None,
          "quarantined_at": now}]
    )


def safe_text(value: object) -> str:
    """A path or message as valid UTF-8 text: bytes of a file name that are not UTF-8 are shown as
    ``\\xNN`` (never a database, log or encoding error)."""
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------------
# The inbox: data/inbox/<domain>/<trades|telemetry|backtests|configs>/<file>
#
# Everything else found under the inbox is refused visibly, never read: a file directly in
# the inbox or in a domain folder, a file in any other or deeper folder, a wrong suffix, a
# hidden file, anything that is not a regular file, and every symbolic link (never
# followed: ``Path.is_file``/``is_dir`` follow links, so links are tested first). A
# refused entry is moved to ``<inbox>/rejected/<its path under the inbox>`` with
# ``<name>.reason.txt`` (one line) beside it and a quarantine row (line 0). A file of a
# kind folder that cannot be ingested (``ContractError`` or any read error) goes to that
# folder's ``rejected/`` the same way, plus an ``ingest_batches`` row with 0 rows
# ingested, and the other files of its batch still land.
# ---------------------------------------------------------------------------

INBOX_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json", ".parquet")
INBOX_KINDS = (*DOMAIN_KINDS, *GOVERNANCE_KINDS)  # the kind folders of a domain folder
DONE_DIR, REJECTED_DIR = "processed", "rejected"  # in a kind folder; REJECTED_DIR also at the inbox's top level
REASON_SUFFIX = ".reason.txt"
# placeholders that keep an empty folder in version control: not data, left alone
PLACEHOLDER_NAMES = frozenset({".gitkeep", ".keep", ".gitignore"})
# A misplaced entry that is not a symlink is moved aside only once it has not changed for
# this long; until then each sensor tick reports it. Why: an upload in progress (a hidden
# `.x.csv.part` renamed into place when complete, a folder being filled) must not be
# pulled away from its writer.
MISPLACED_GRACE_SECONDS = 300.0
LAYOUT_HINT = "inbox files go in <inbox>/<domain>/<trades|telemetry|backtests|configs>/<name>.csv (or " + ", ".join(INBOX_SUFFIXES[1:]) + ")"
# errors of the store itself, not of the file: the file stays in the inbox for the next batch
STORE_UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)


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


@dataclass(frozen=True)
class MisplacedEntry:
    """Something under the inbox that is not an inbox file: refused (``refuse_misplaced``), never read."""

    path: Path
    reason: str
    domain: str  # the first folder under the inbox, raw ("" at the inbox's top level)
    kind: str  # the kind folder it sits under, else "trades" (quarantine.kind needs one)
    mtime: float  # from lstat: a link's own time, never its target's
    symlink: bool

    def ready(self, now: float, grace: float = MISPLACED_GRACE_SECONDS) -> bool:
        """Refuse it now? A symlink at once; anything else once untouched for ``grace`` seconds."""
        return self.symlink or now - self.mtime >= grace


@dataclass
class InboxScan:
    files: list[InboxFile]  # oldest first
    misplaced: list[MisplacedEntry]


class InboxFileRejected(ContractError):
    """An inbox file refused whole: moved to rejected/ (``moved_to``) with its reason file, recorded."""

    def __init__(self, path: Path, reason: str, moved_to: Path | None) -> None:
        super().__init__(f"{path.name}: {reason}")
        self.path, self.reason, self.moved_to = path, reason, moved_to


def scan_inbox(inbox: Path) -> list[InboxFile]:
    """Files waiting in the inbox, oldest first (processed/rejected subfolders excluded)."""
    return scan_inbox_entries(inbox).files


def scan_inbox_entries(inbox: Path) -> InboxScan:
    """The inbox's files to ingest (oldest first) and every misplaced entry, without following any link."""
    inbox = Path(inbox)
    scan = InboxScan([], [])
    if not inbox.is_dir():
        return scan
    for top in _entries(inbox):
        if top.name == REJECTED_DIR and (top.is_dir() or top.is_symlink()):
            continue  # what was refused (never read; it may be a link an administrator set up)
        if top.is_symlink():
            _misplaced(scan, inbox, top, "a symbolic link: the inbox never follows links; " + LAYOUT_HINT)
        elif top.is_dir():
            if top.name.startswith("."):
                continue  # a tool's state (.git, .stfolder)
            _scan_domain(scan, inbox, top)
        elif top.name not in PLACEHOLDER_NAMES:
            _misplaced(scan, inbox, top, "a file directly in the inbox, outside any domain folder: " + LAYOUT_HINT)
    scan.files.sort(key=lambda x: (x.mtime_ns, str(x.path)))
    return scan


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _misplaced(scan: InboxScan, inbox: Path, path: Path, reason: str) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return  # gone meanwhile
    parts = path.relative_to(inbox).parts
    domain = parts[0] if len(parts) > 1 else ""
    kind = next((p for p in parts[1:-1] if p in INBOX_KINDS), "trades")
    scan.misplaced.append(MisplacedEntry(path, safe_text(reason), domain, kind, st.st_mtime, stat.S_ISLNK(st.st_mode)))


def _scan_domain(scan: InboxScan, inbox: Path, domain_dir: Path) -> None:
    domain = domain_dir.name
    for entry in _entries(domain_dir):
        where = f"{domain}/{entry.name}"
        if entry.is_symlink():
            _misplaced(scan, inbox, entry, f"{where} is a symbolic link: never followed; " + LAYOUT_HINT)
        elif entry.is_dir() and entry.name in INBOX_KINDS:
            _scan_kind(scan, inbox, entry)
        elif entry.is_dir():
            _misplaced_tree(scan, inbox, entry,
                            f"in {where}/, which is not a kind folder ({', '.join(INBOX_KINDS)}): " + LAYOUT_HINT)
        elif entry.name not in PLACEHOLDER_NAMES:
            _misplaced(scan, inbox, entry,
                       f"directly in the domain folder {domain}/, not in {domain}/trades/ or {domain}/telemetry/: "
                       + LAYOUT_HINT)


def _scan_kind(scan: InboxScan, inbox: Path, kind_dir: Path) -> None:
    domain, kind = kind_dir.parent.name, kind_dir.name
    for entry in _entries(kind_dir):
        if entry.name in (DONE_DIR, REJECTED_DIR) and (entry.is_dir() or entry.is_symlink()):
            continue  # where files are moved to: never read (it may be a link an administrator set up)
        if entry.is_symlink():
            _misplaced(scan, inbox, entry, "a symbolic link: never followed; put the file itself in the inbox")
        elif entry.is_dir():
            _misplaced_tree(scan, inbox, entry,
                            f"in a subfolder of {domain}/{kind}/: files go directly in {domain}/{kind}/")
        elif entry.name in PLACEHOLDER_NAMES:
            continue
        elif entry.name.startswith("."):
            _misplaced(scan, inbox, entry, "a hidden file (its name starts with '.'): an upload in progress "
                                           "is renamed to a visible name when complete")
        elif entry.suffix.lower() not in INBOX_SUFFIXES:
            _misplaced(scan, inbox, entry, f"unsupported file type {entry.suffix or '(no suffix)'!r}: use "
                                           + ", ".join(INBOX_SUFFIXES))
        else:
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                _misplaced(scan, inbox, entry, "not a regular file (a FIFO, socket or device): never read")
            else:
                scan.files.append(InboxFile(domain, kind, entry, st.st_size, st.st_mtime_ns))


def _misplaced_tree(scan: InboxScan, inbox: Path, folder: Path, reason: str) -> None:
    """Every file (and link) under a folder that is not where inbox files go; links are not descended."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames):
            if (base / name).is_symlink():
                _misplaced(scan, inbox, base / name, reason + " (a symbolic link: never followed)")
        for name in sorted(filenames):
            if name not in PLACEHOLDER_NAMES:
                _misplaced(scan, inbox, base / name, reason)


def refuse_misplaced(store: MetaStore, inbox: Path, entry: MisplacedEntry) -> Path | None:
    """Move a misplaced entry (the link itself, for a link) to ``<inbox>/rejected/<its path under the
    inbox>``, write ``<name>.reason.txt`` beside it and record a quarantine row; returns where it went
    (None if it vanished meanwhile)."""
    inbox = Path(inbox)
    if not os.path.lexists(entry.path):
        return None
    rel = entry.path.relative_to(inbox)
    moved = _move(entry.path, inbox / REJECTED_DIR / rel.parent)
    reason = f"misplaced in the inbox: {entry.reason}"
    _write_reason(moved, reason)
    quarantine_whole_file(store, entry.kind, entry.path, entry.domain, reason)
    return moved


def rejection_reason(exc: BaseException) -> str:
    """One line saying why a file was refused whole."""
    if isinstance(exc, ContractError):
        text = str(exc)
    else:
        text = f"unreadable file ({type(exc).__name__}: {exc})"
    return " ".join(safe_text(text).split())[:1000] or type(exc).__name__


def reject_inbox_file(store: MetaStore, item: InboxFile, reason: str) -> Path | None:
    """Refuse an inbox file whole: move it to its folder's rejected/ with ``<name>.reason.txt`` beside
    it, then record a quarantine row (line 0) and, for a valid domain, an ``ingest_batches`` row with 0
    rows ingested (the data sensors skip such rows: nothing to learn from). Returns where it went.

    Moved first: even if the store cannot record it, the file no longer poisons later batches.
    """
    moved = _move(item.path, item.path.parent / REJECTED_DIR) if os.path.lexists(item.path) else None
    if moved is not None:
        _write_reason(moved, reason)
    now = pd.Timestamp.now(tz="UTC")
    with store.write() as conn:
        store.append("quarantine", _whole_file_row(item.kind, item.path, item.domain, reason, now), conn=conn)
        if item.kind in DOMAIN_KINDS and DOMAIN_RE.fullmatch(item.domain):
            store.append("ingest_batches", pd.DataFrame([{
                "domain": item.domain, "kind": item.kind, "source": safe_text(item.path), "rows_ingested": 0,
                "rows_quarantined": 1, "ingested_at": now}]), conn=conn)
    return moved


def ingest_inbox_file(store: MetaStore, item: InboxFile) -> IngestReport:
    """Ingest one inbox file and move it to processed/.

    A file refused whole — ``ContractError`` from ``ingest_file``, any error reading it (bad
    bytes, a ragged or empty file, garbage under a data suffix), a symlink or anything but a
    regular file — is moved to rejected/ and recorded (``reject_inbox_file``), and
    ``InboxFileRejected`` is raised: the caller goes on with the next file. An error of the
    store itself (``STORE_UNAVAILABLE``: connection, lock timeout) propagates and leaves the
    file in place for the next batch. ``FileNotFoundError``: the file is gone (e.g. an earlier
    attempt of the same run already moved it).
    """
    if not os.path.lexists(item.path):
        raise FileNotFoundError(f"{item.path}: no longer in the inbox")
    try:
        if item.path.is_symlink():
            raise ContractError("a symbolic link: never followed; put the file itself in the inbox")
        if not stat.S_ISREG(item.path.lstat().st_mode):
            raise ContractError("not a regular file (a FIFO, socket or device): never read")
        validate_domain(item.domain)
        report = ingest_file(store, item.kind, item.path, item.domain)
    except STORE_UNAVAILABLE:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the file makes the reader raise, the file is refused
        if not os.path.lexists(item.path):
            raise FileNotFoundError(f"{item.path}: vanished while being ingested") from exc
        reason = rejection_reason(exc)
        moved = reject_inbox_file(store, item, reason)
        raise InboxFileRejected(item.path, reason, moved) from exc
    _move(item.path, item.path.parent / DONE_DIR)
    return report


def _write_reason(moved: Path, reason: str) -> Path:
    """``<name>.reason.txt`` beside a refused file: one line."""
    path = moved.with_name(moved.name + REASON_SUFFIX)
    path.write_text(" ".join(safe_text(reason).split()) + "\n", encoding="utf-8")
    return path


def _move(path: Path, folder: Path) -> Path:
    """Move a file (a link itself, never its target) into ``folder``; a name taken gets a UTC timestamp.

    Returns the new path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if os.path.lexists(target) or os.path.lexists(target.with_name(target.name + REASON_SUFFIX)):
        stamp = pd.Timestamp.now(tz="UTC").strftime("%Y%m%dT%H%M%S%f")
        target = folder / f"{path.stem}.{stamp}{path.suffix}"
    shutil.move(str(path), str(target))
    return target
