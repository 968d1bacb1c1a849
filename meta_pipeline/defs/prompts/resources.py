"""The LLM as a Dagster resource: ``LLMResource`` (config: META_PIPELINE_LLM_*; the key via ``dg.EnvVar``).

Assets take it as ``llm: LLMParam`` (= ``dg.ResourceParam[LLMSettings]``) and build one run's
client with ``meta_pipeline.llm.client_for(store, settings, run_id=...)``. Fields left empty
are read from the environment when a run starts (``settings_from_env``), so the CLI, the demo
and the UI agree; the API key is given as ``dg.EnvVar("META_PIPELINE_LLM_API_KEY")`` when that
variable is set (``llm_resource``), so the UI shows the variable's name, never its value.
"""

import os
from typing import Optional

import dagster as dg
from pydantic import Field

from meta_pipeline.llm import LLMSettings, settings_from_env

LLM_KEY = "llm"
API_KEY_ENV = "META_PIPELINE_LLM_API_KEY"
LLMParam = dg.ResourceParam[LLMSettings]


class LLMResource(dg.ConfigurableResource):
    """The model prompt evolution and proposal rationales use (provider none | scripted | openai |
    openai-compatible | anthropic)."""

    provider: Optional[str] = Field(default=None, description="default env META_PIPELINE_LLM_PROVIDER, else none")
    model: Optional[str] = Field(default=None, description="default env META_PIPELINE_LLM_MODEL")
    base_url: Optional[str] = Field(default=None, description="openai-compatible server; env META_PIPELINE_LLM_BASE_URL")
    api_key: Optional[str] = Field(default=None, description=f"set as EnvVar({API_KEY_ENV}); never shown or stored")
    timeout_s: Optional[float] = Field(default=None, description="per attempt (default 60)")
    max_retries: Optional[int] = Field(default=None, description="retries of a timeout / 429 / 5xx (default 3)")
    max_calls: Optional[int] = Field(default=None, description="budget: provider calls per run (default unlimited)")
    max_tokens: Optional[int] = Field(default=None, description="budget: tokens per run (default unlimited)")
    concurrency: Optional[int] = Field(default=None, description="parallel calls of a network provider (default 4)")

    def create_resource(self, context: dg.InitResourceContext) -> LLMSettings:  # type: ignore[override]
        overrides = {k: v for k, v in {
            "provider": self.provider.lower() if self.provider else None, "model": self.model,
            "base_url": self.base_url, "api_key": self.api_key, "timeout_s": self.timeout_s,
            "max_retries": self.max_retries, "max_calls": self.max_calls, "max_tokens": self.max_tokens,
            "concurrency": self.concurrency}.items() if v is not None}
        return settings_from_env(**overrides)


def llm_resource() -> LLMResource:
    """The code location's resource: the key through dg.EnvVar when the variable is set (Dagster
    refuses an EnvVar that is unset, and most deployments need no key)."""
    return LLMResource(api_key=dg.EnvVar(API_KEY_ENV)) if os.environ.get(API_KEY_ENV) else LLMResource()
