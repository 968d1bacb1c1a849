"""The response cache in the store (table ``llm_cache``) and the call log (table ``llm_calls``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meta_pipeline.store import MetaStore
from meta_pipeline.store import prompts as prompt_rows


class StoreCache:
    """``ResponseCache`` over ``llm_cache``: shared by every run and process using the store."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, int, int]]:
        return prompt_rows.cache_get_many(self.store, keys)

    def put_many(self, rows: Sequence[Mapping[str, Any]]) -> int:
        return prompt_rows.cache_put_many(self.store, rows)


def flush_call_records(store: MetaStore, client: Any) -> int:
    """Append the client's call records not written yet to ``llm_calls``; returns how many."""
    return prompt_rows.append_llm_calls(store, client.unflushed_records())
