"""A pluggable LLM for the cores (no Dagster): providers, retries, budget, call records, cache.

``settings_from_env()`` reads META_PIPELINE_LLM_*; ``client_for(store, settings)`` gives one
run's ``LLMClient`` with the store's response cache. See ``client.py`` for the rules.
"""

from __future__ import annotations

from meta_pipeline.llm.cache import StoreCache, flush_call_records
from meta_pipeline.llm.client import (
    BudgetExhausted,
    LLMClient,
    LLMReply,
    LLMSettings,
    MemoryCache,
    cache_key,
    make_provider,
    settings_from_env,
)
from meta_pipeline.llm.providers import (
    PROVIDERS,
    LLMConfigError,
    LLMError,
    ProviderError,
    ProviderReply,
    ScriptedProvider,
    register_responder,
)
from meta_pipeline.store import MetaStore


def client_for(store: MetaStore | None, settings: LLMSettings | None = None, *, run_id: str | None = None,
               task: str | None = None) -> LLMClient:
    """One run's client: the settings (default: the environment), the store's response cache."""
    settings = settings or settings_from_env()
    cache = StoreCache(store) if store is not None else MemoryCache()
    return LLMClient(settings, cache=cache, run_id=run_id, task=task)


__all__ = [
    "PROVIDERS", "BudgetExhausted", "LLMClient", "LLMConfigError", "LLMError", "LLMReply", "LLMSettings",
    "MemoryCache", "ProviderError", "ProviderReply", "ScriptedProvider", "StoreCache", "cache_key", "client_for",
    "flush_call_records", "make_provider", "register_responder", "settings_from_env",
]
