"""``LLMClient``: one run's access to a model — settings from the environment, retries with
exponential backoff, a budget in calls and tokens, a record of every call, a response cache.

Settings (``settings_from_env``; the Dagster resource, the CLI and the demo read the same):

    META_PIPELINE_LLM_PROVIDER   none | scripted | openai | openai-compatible | anthropic  (default none)
    META_PIPELINE_LLM_MODEL      e.g. gpt-4o-mini, claude-3-5-haiku-latest, llama3.1:8b  (scripted: prompt-sim)
    META_PIPELINE_LLM_BASE_URL   openai-compatible: the server, e.g. http://127.0.0.1:11434/v1 (Ollama)
    META_PIPELINE_LLM_API_KEY    openai, anthropic: required; openai-compatible: if the server wants one
    META_PIPELINE_LLM_TIMEOUT_S, META_PIPELINE_LLM_MAX_RETRIES, META_PIPELINE_LLM_MAX_CALLS,
    META_PIPELINE_LLM_MAX_TOKENS, META_PIPELINE_LLM_CONCURRENCY                            (optional)

Retries: a retryable failure (timeout, connection, HTTP 429/5xx) is retried ``max_retries``
times, waiting ``backoff_s · 2^k`` (k = 0, 1, ...; capped at ``backoff_max_s``) before retry
k+1; then ``ProviderError`` says which provider, model, what failed and how many attempts.
A non-retryable failure (bad key, unknown model) fails at once. Every attempt is bounded by
``timeout_s``, so a call never hangs: worst case (max_retries+1)·timeout_s + the waits.

Budget (per client = per run): a call is refused (``BudgetExhausted``) when ``max_calls``
provider calls were made or ``max_tokens`` tokens (prompt + completion) were spent; checked
before each call, so the token budget can be overshot by one call's tokens at most.

Cache: keyed by sha256 of canonical JSON of (model, messages, temperature, max_output_tokens).
A hit costs no call, no token and no budget, and is recorded with ``cached = True``: a re-run
of the same prompts is free and gives the same answers. Entries are written to the store
(``llm_cache``) in one transaction per batch.

The API key is held by the settings only (hidden from ``repr``), never logged, stored or put
in metadata; error messages are scrubbed of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import pandas as pd

from meta_pipeline.llm.providers import (
    PROVIDERS,
    AnthropicProvider,
    LLMConfigError,
    LLMError,
    Messages,
    NoneProvider,
    OpenAIProvider,
    Provider,
    ProviderError,
    ProviderReply,
    scripted_from_registry,
)

ENV_PREFIX = "META_PIPELINE_LLM_"
DEFAULT_MODELS = {"scripted": "prompt-sim", "openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}


class BudgetExhausted(LLMError):
    """The run's budget (calls or tokens) is spent: the caller stops and keeps what it has."""


@dataclass(frozen=True)
class LLMSettings:
    provider: str = "none"
    model: str = ""
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 20.0
    max_calls: int | None = None
    max_tokens: int | None = None
    max_output_tokens: int = 512
    temperature: float = 0.0
    concurrency: int = 4

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise LLMConfigError(f"unknown LLM provider {self.provider!r} (META_PIPELINE_LLM_PROVIDER): use one of "
                                 + ", ".join(PROVIDERS))
        if self.timeout_s <= 0 or self.max_retries < 0 or self.concurrency < 1:
            raise LLMConfigError("LLM settings: timeout_s must be > 0, max_retries ≥ 0, concurrency ≥ 1")

    @property
    def resolved_model(self) -> str:
        return self.model or DEFAULT_MODELS.get(self.provider, "")

    @property
    def enabled(self) -> bool:
        return self.provider != "none"

    def describe(self) -> str:
        """Provider, model and server, for logs and metadata (never the key)."""
        where = f" at {self.base_url}" if self.base_url else ""
        return f"{self.provider} {self.resolved_model}{where}".strip()


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> LLMSettings:
    """LLMSettings from META_PIPELINE_LLM_* (see the module doc); keyword overrides win."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(ENV_PREFIX + name)
        return value.strip() if value and value.strip() else None

    def number(name: str, cast: Callable[[str], Any]) -> Any:
        value = get(name)
        if value is None:
            return None
        try:
            return cast(value)
        except ValueError:
            raise LLMConfigError(f"{ENV_PREFIX}{name}={value!r} is not a number") from None

    values: dict[str, Any] = {
        "provider": (get("PROVIDER") or "none").lower(), "model": get("MODEL") or "", "base_url": get("BASE_URL"),
        "api_key": get("API_KEY"), "timeout_s": number("TIMEOUT_S", float), "max_retries": number("MAX_RETRIES", int),
        "max_calls": number("MAX_CALLS", int), "max_tokens": number("MAX_TOKENS", int),
        "concurrency": number("CONCURRENCY", int),
    }
    values.update(overrides)
    return LLMSettings(**{k: v for k, v in values.items() if v is not None or k in ("base_url", "api_key")})


def make_provider(settings: LLMSettings) -> Provider:
    """The provider object of the settings (clear LLMConfigError when it cannot be built)."""
    p = settings.provider
    if p == "none":
        return NoneProvider()
    if p == "scripted":
        return scripted_from_registry(settings.resolved_model)
    if not settings.resolved_model:
        raise LLMConfigError(f"the {p} provider needs a model: set META_PIPELINE_LLM_MODEL")
    if p == "openai-compatible":
        if not settings.base_url:
            raise LLMConfigError("the openai-compatible provider needs the server's URL: set META_PIPELINE_LLM_BASE_URL "
                                 "(e.g. http://127.0.0.1:11434/v1 for Ollama, http://127.0.0.1:8000/v1 for vLLM)")
        return OpenAIProvider(name=p, api_key=settings.api_key, base_url=settings.base_url,
                              timeout_s=settings.timeout_s)
    if not settings.api_key:
        raise LLMConfigError(f"the {p} provider needs an API key: set META_PIPELINE_LLM_API_KEY")
    if p == "openai":
        return OpenAIProvider(name=p, api_key=settings.api_key, base_url=settings.base_url,
                              timeout_s=settings.timeout_s)
    return AnthropicProvider(api_key=settings.api_key, base_url=settings.base_url, timeout_s=settings.timeout_s)


class ResponseCache(Protocol):
    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, int, int]]: ...

    def put_many(self, rows: Sequence[Mapping[str, Any]]) -> int: ...


class MemoryCache:
    """A response cache in a dict (tests; a client without a store)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, int, int]] = {}

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, int, int]]:
        return {k: self.entries[k] for k in keys if k in self.entries}

    def put_many(self, rows: Sequence[Mapping[str, Any]]) -> int:
        new = 0
        for row in rows:
            if row["cache_key"] not in self.entries:
                self.entries[row["cache_key"]] = (row["response_text"], int(row["prompt_tokens"]),
                                                  int(row["completion_tokens"]))
                new += 1
        return new


_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str | None) -> str:
    """A reply as text every database stores: NUL dropped, a lone surrogate replaced by U+FFFD."""
    text = text or ""
    return _UNSTORABLE_RE.sub(lambda m: "" if m.group(0) == "\x00" else "\ufffd", text)


def cache_key(model: str, messages: Messages, temperature: float, max_output_tokens: int) -> str:
    payload = {"model": model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
               "temperature": temperature, "max_output_tokens": max_output_tokens}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LLMReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    latency_ms: float
    attempts: int


@dataclass
class CallRecord:
    called_at: pd.Timestamp
    purpose: str
    cache_key: str
    cached: bool
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    error: str | None = None


@dataclass
class Usage:
    calls: int = 0  # provider calls made (retries of one call count once; failed calls count)
    cached: int = 0
    tokens: int = 0
    failures: int = 0


class LLMClient:
    """One run's model access. ``complete`` / ``complete_many``; ``records`` and ``usage`` say what it cost."""

    def __init__(self, settings: LLMSettings, provider: Provider | None = None, cache: ResponseCache | None = None,
                 *, sleep: Callable[[float], None] = time.sleep, run_id: str | None = None,
                 task: str | None = None) -> None:
        self.settings = settings
        self.provider = provider if provider is not None else make_provider(settings)
        self.cache = cache if cache is not None else MemoryCache()
        self.sleep = sleep
        self.run_id, self.task = run_id, task
        self.records: list[CallRecord] = []
        self.usage = Usage()
        self._lock = threading.Lock()
        self._flushed = 0

    @property
    def model(self) -> str:
        return self.settings.resolved_model

    def describe(self) -> str:
        return self.settings.describe()

    # -- calls -------------------------------------------------------------------------

    def complete(self, messages: Messages, purpose: str = "answer") -> LLMReply:
        return self.complete_many([messages], purpose)[0]

    def complete_many(self, batch: Sequence[Messages], purpose: str = "answer") -> list[LLMReply]:
        """Replies in the order of ``batch``: cache hits first, the misses through the provider
        (``concurrency`` at a time for network providers). New replies are cached at the end of the
        batch — also when a call fails or the budget runs out midway (then the error is raised)."""
        s = self.settings
        keys = [cache_key(self.model, m, s.temperature, s.max_output_tokens) for m in batch]
        hits = self.cache.get_many(keys)
        replies: list[LLMReply | None] = [None] * len(batch)
        misses: dict[str, list[int]] = {}
        now = pd.Timestamp.now(tz="UTC")
        for i, key in enumerate(keys):
            if key in hits:
                text, pt, ct = hits[key]
                replies[i] = LLMReply(text, pt, ct, True, 0.0, 0)
                self._record(CallRecord(now, purpose, key, True, 0, pt, ct, 0.0))
            else:
                misses.setdefault(key, []).append(i)
        new_rows: list[dict] = []
        error: BaseException | None = None
        order = list(misses)
        results: list[tuple[str, LLMReply]] = []

        def one(key: str) -> tuple[str, LLMReply]:
            return key, self._call(batch[misses[key][0]], key, purpose)

        try:
            if self.settings.concurrency > 1 and len(order) > 1 and self.provider.name != "scripted":
                with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
                    for fut in [pool.submit(one, k) for k in order]:
                        try:
                            results.append(fut.result())
                        except BaseException as exc:  # noqa: BLE001 - the first error wins, the rest still finish
                            error = error or exc
            else:
                for k in order:
                    results.append(one(k))
        except BaseException as exc:  # noqa: BLE001 - cache what succeeded, then re-raise
            error = exc
        for key, reply in results:
            for i in misses[key]:
                replies[i] = reply
            new_rows.append({"cache_key": key, "model": self.model,
                             "messages_json": json.dumps(list(batch[misses[key][0]]), ensure_ascii=False),
                             "response_text": reply.text, "prompt_tokens": reply.prompt_tokens,
                             "completion_tokens": reply.completion_tokens, "created_at": now})
        if new_rows:
            self.cache.put_many(new_rows)
        if error is not None:
            raise error
        return [r for r in replies if r is not None]

    def _reserve(self) -> None:
        s = self.settings
        with self._lock:
            if s.max_calls is not None and self.usage.calls >= s.max_calls:
                raise BudgetExhausted(f"LLM budget spent: {self.usage.calls} of max_calls {s.max_calls} calls made")
            if s.max_tokens is not None and self.usage.tokens >= s.max_tokens:
                raise BudgetExhausted(f"LLM budget spent: {self.usage.tokens} of max_tokens {s.max_tokens} tokens used")
            self.usage.calls += 1

    def _call(self, messages: Messages, key: str, purpose: str) -> LLMReply:
        s = self.settings
        self._reserve()
        started = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            try:
                reply: ProviderReply = self.provider.complete(
                    messages, model=self.model, max_output_tokens=s.max_output_tokens, temperature=s.temperature,
                    timeout_s=s.timeout_s)
                break
            except ProviderError as exc:
                if exc.retryable and attempts <= s.max_retries:
                    self.sleep(min(s.backoff_s * 2 ** (attempts - 1), s.backoff_max_s))
                    continue
                latency = (time.perf_counter() - started) * 1000.0
                message = self._scrub(f"LLM call failed: {self.describe()}: {exc} "
                                      f"({attempts} attempt{'s' if attempts > 1 else ''}"
                                      f"{', retries exhausted' if exc.retryable else ', not retryable'})")
                with self._lock:
                    self.usage.failures += 1
                self._record(CallRecord(pd.Timestamp.now(tz="UTC"), purpose, key, False, attempts, 0, 0, latency,
                                        message))
                raise ProviderError(message, retryable=exc.retryable, status=exc.status) from exc
        latency = (time.perf_counter() - started) * 1000.0
        reply = ProviderReply(storable_text(reply.text), reply.prompt_tokens, reply.completion_tokens)
        with self._lock:
            self.usage.tokens += reply.prompt_tokens + reply.completion_tokens
        self._record(CallRecord(pd.Timestamp.now(tz="UTC"), purpose, key, False, attempts, reply.prompt_tokens,
                                reply.completion_tokens, latency))
        return LLMReply(reply.text, reply.prompt_tokens, reply.completion_tokens, False, latency, attempts)

    def _record(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)
            if record.cached:
                self.usage.cached += 1

    def _scrub(self, text: str) -> str:
        key = self.settings.api_key
        text = " ".join(text.split())
        return text.replace(key, "***") if key else text

    # -- what it cost ------------------------------------------------------------------

    def records_frame(self, since: int = 0) -> pd.DataFrame:
        """The call records from index ``since`` as ``llm_calls`` rows."""
        with self._lock:
            records = list(self.records[since:])
        return self._frame(records)

    def unflushed_records(self) -> pd.DataFrame:
        """Records not handed out before (each record is returned once: for appending to ``llm_calls``)."""
        with self._lock:
            records = list(self.records[self._flushed:])
            self._flushed = len(self.records)
        return self._frame(records)

    def _frame(self, records: list[CallRecord]) -> pd.DataFrame:
        return pd.DataFrame([{
            "called_at": r.called_at, "run_id": self.run_id, "task": self.task, "purpose": r.purpose,
            "provider": self.settings.provider, "model": self.model, "cache_key": r.cache_key, "cached": r.cached,
            "attempts": r.attempts, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "latency_ms": r.latency_ms, "error": r.error} for r in records],
            columns=["called_at", "run_id", "task", "purpose", "provider", "model", "cache_key", "cached", "attempts",
                     "prompt_tokens", "completion_tokens", "latency_ms", "error"])

    def with_budget(self, **limits: int | None) -> "LLMClient":
        """A client with other budget limits sharing nothing but the provider and cache."""
        return LLMClient(replace(self.settings, **limits), self.provider, self.cache, sleep=self.sleep,
                         run_id=self.run_id, task=self.task)
