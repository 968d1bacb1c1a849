"""SQL of prompt evolution and the LLM: examples, runs, candidates, model calls, the response cache.

Module functions over a ``MetaStore`` (no Dagster). The tables are declared in
``meta_pipeline.contracts`` (the "Prompt evolution and the LLM" block) and created by the
store's one schema path (``store.engine.get_engine``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import select, update

from meta_pipeline.contracts import (
    llm_cache,
    llm_calls,
    meta_controller_config_proposals,
    prompt_candidates,
    prompt_examples,
    prompt_runs,
    table,
    validate_task,
)
from meta_pipeline.store.frames import insert_frame
from meta_pipeline.store.metastore import MetaStore, lock_partition

IN_CHUNK = 500  # keys per IN (...) list


# -- the response cache --------------------------------------------------------


def cache_get_many(store: MetaStore, keys: Sequence[str]) -> dict[str, tuple[str, int, int]]:
    """cache_key -> (response_text, prompt_tokens, completion_tokens) for the keys stored."""
    found: dict[str, tuple[str, int, int]] = {}
    unique = sorted(set(keys))
    with store.read_conn() as conn:
        for start in range(0, len(unique), IN_CHUNK):
            chunk = unique[start:start + IN_CHUNK]
            rows = conn.execute(select(llm_cache.c.cache_key, llm_cache.c.response_text, llm_cache.c.prompt_tokens,
                                       llm_cache.c.completion_tokens).where(llm_cache.c.cache_key.in_(chunk)))
            for row in rows:
                found[row.cache_key] = (row.response_text, int(row.prompt_tokens), int(row.completion_tokens))
    return found


def cache_put_many(store: MetaStore, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert new cache entries (a key already stored — another run got there first — is left as it is)."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return 0
    frame = frame.drop_duplicates("cache_key")
    with store.write() as conn:
        lock_partition(conn, "llm_cache", "all")
        present = set()
        keys = frame["cache_key"].tolist()
        for start in range(0, len(keys), IN_CHUNK):
            present |= set(conn.execute(select(llm_cache.c.cache_key).where(
                llm_cache.c.cache_key.in_(keys[start:start + IN_CHUNK]))).scalars())
        fresh = frame[~frame["cache_key"].isin(present)]
        return insert_frame(conn, llm_cache, fresh)


def append_llm_calls(store: MetaStore, rows: pd.DataFrame) -> int:
    return store.append("llm_calls", rows) if len(rows) else 0


def run_usage(store: MetaStore, run_ids: Sequence[str]) -> dict[str, int]:
    """Model calls recorded for the given Dagster run ids: calls (made), cached (free), tokens (of calls made)."""
    frame = pd.DataFrame(columns=["cached", "prompt_tokens", "completion_tokens"])
    with store.read_conn() as conn:
        rows = conn.execute(select(llm_calls.c.cached, llm_calls.c.prompt_tokens, llm_calls.c.completion_tokens,
                                   llm_calls.c.error).where(llm_calls.c.run_id.in_(list(run_ids)))).all()
    if rows:
        frame = pd.DataFrame(rows, columns=["cached", "prompt_tokens", "completion_tokens", "error"])
    made = frame[~frame["cached"].astype(bool)] if len(frame) else frame
    return {"calls": int(len(made)), "cached": int(len(frame) - len(made)),
            "tokens": int((made["prompt_tokens"] + made["completion_tokens"]).sum()) if len(made) else 0}


# -- examples ------------------------------------------------------------------


def write_examples_batch(store: MetaStore, examples: pd.DataFrame, quarantine: pd.DataFrame, *, task: str,
                         source: str, now: pd.Timestamp) -> tuple[int, int, int]:
    """Land one validated examples file in one transaction: a re-sent (task, example_id) replaces the stored
    row, bad rows go to quarantine (kind "examples", the task in ``domain``), one ``ingest_batches`` row.
    Returns (ingested, replaced, quarantined)."""
    validate_task(task)
    with store.write() as conn:
        lock_partition(conn, "prompt_examples", task)
        existing = set(conn.execute(select(prompt_examples.c.example_id).where(
            prompt_examples.c.task == task)).scalars())
        overlap = sorted(existing & set(examples["example_id"]))
        for start in range(0, len(overlap), IN_CHUNK):
            conn.execute(prompt_examples.delete().where(prompt_examples.c.task == task,
                                                        prompt_examples.c.example_id.in_(overlap[start:start + IN_CHUNK])))
        ingested = insert_frame(conn, prompt_examples, examples.assign(task=task, ingested_at=now))
        quarantined = insert_frame(conn, table("quarantine"), quarantine.assign(quarantined_at=now))
        MetaStore.record_batch(conn, task, "examples", source, ingested, quarantined, now)
    return ingested, len(overlap), quarantined


def read_examples(store: MetaStore, task: str) -> pd.DataFrame:
    """A task's examples ordered by example_id."""
    return store.read("prompt_examples", equals={"task": validate_task(task)}, order_by="example_id")


# -- runs and candidates ----------------------------------------------------------


def insert_prompt_run(store: MetaStore, run: Mapping[str, Any], candidates: pd.DataFrame) -> None:
    """One run of prompt evolution and its candidates, in one transaction (a re-executed run id replaces its rows)."""
    task = validate_task(run["task"])
    with store.write() as conn:
        lock_partition(conn, "prompt_runs", task)
        for tbl in (prompt_candidates, prompt_runs):
            conn.execute(tbl.delete().where(tbl.c.task == task, tbl.c.run_id == run["run_id"]))
        insert_frame(conn, prompt_runs, pd.DataFrame([dict(run)]))
        insert_frame(conn, prompt_candidates, candidates.assign(task=task, run_id=run["run_id"]))


def update_prompt_run(store: MetaStore, task: str, run_id: str, values: Mapping[str, Any]) -> int:
    with store.write() as conn:
        return conn.execute(update(prompt_runs).where(prompt_runs.c.task == validate_task(task),
                                                      prompt_runs.c.run_id == run_id).values(**values)).rowcount


def read_prompt_runs(store: MetaStore, task: str | None = None) -> pd.DataFrame:
    equals = {"task": validate_task(task)} if task is not None else None
    return store.read("prompt_runs", equals=equals, order_by=["started_at", "run_id"])


def latest_prompt_run(store: MetaStore, task: str) -> dict[str, Any] | None:
    runs = read_prompt_runs(store, task)
    return None if runs.empty else runs.iloc[-1].to_dict()


def read_prompt_candidates(store: MetaStore, task: str, run_id: str | None = None) -> pd.DataFrame:
    equals: dict[str, Any] = {"task": validate_task(task)}
    if run_id is not None:
        equals["run_id"] = run_id
    return store.read("prompt_candidates", equals=equals, order_by=["run_id", "iteration", "candidate_id"])


# -- proposals ----------------------------------------------------------------------


def set_pending_rationale(store: MetaStore, proposal_id: str, text: str) -> int:
    """Replace the rationale of a proposal that is still PENDING (1 row changed, or 0)."""
    p = meta_controller_config_proposals
    with store.write() as conn:
        return conn.execute(update(p).where(p.c.proposal_id == proposal_id, p.c.status == "PENDING")
                            .values(rationale_text=text)).rowcount


# -- the PROMPT_TEMPLATE config ------------------------------------------------------


def set_prompt_template(store: MetaStore, task: str, config_json: str, actor: str, now: pd.Timestamp) -> int:
    """A new active PROMPT_TEMPLATE version of the task (``configs``), logged in ``config_change_log``."""
    from meta_pipeline.store import configs as config_rows
    from meta_pipeline.store.metastore import lock

    validate_task(task)
    with store.write() as conn:
        lock(conn, f"configs:PROMPT_TEMPLATE:{task}")
        before = config_rows.active_config_row(conn, "PROMPT_TEMPLATE", task)
        version = config_rows.write_config_version(conn, "PROMPT_TEMPLATE", task, config_json, actor, now, None)
        config_rows.append_change_log(conn, changed_at=now, proposal_id=None, action="set", actor=actor,
                                      target_type="PROMPT_TEMPLATE", target_id=task,
                                      from_version=before[0] if before else None, to_version=version,
                                      before_json=before[1] if before else None, after_json=config_json)
    return version
