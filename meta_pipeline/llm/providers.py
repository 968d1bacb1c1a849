"""The model providers behind ``LLMClient``: one ``complete`` per provider, errors sorted into
retryable (timeout, connection, HTTP 429, HTTP 5xx) and not (bad key, unknown model, bad request).

* ``openai``            — api.openai.com through the official ``openai`` client (key required).
* ``openai-compatible`` — any server speaking the OpenAI chat-completions API (vLLM, Ollama,
  llama.cpp, LM Studio...), selected by ``base_url``; the official ``openai`` client, key optional.
* ``anthropic``         — the Messages API through the official ``anthropic`` client (key required).
* ``scripted``          — offline and deterministic: a responder function (tests, the demo, evaluate).
* ``none``              — no model: every call is refused with a clear error (callers fall back).

The client libraries are optional extras (``pip install 'meta_pipeline[llm]'``); a missing one is
a one-line error naming the extra. The providers never retry themselves (the clients are built
with ``max_retries=0``): ``LLMClient`` owns retries, backoff, budget and the cache, the same for all.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROVIDERS = ("none", "scripted", "openai", "openai-compatible", "anthropic")
NO_KEY_PLACEHOLDER = "not-needed"  # what the openai client is given when a local server needs no key


class LLMError(RuntimeError):
    """Any failure of the LLM layer; the message is one line and never contains the API key."""


class LLMConfigError(LLMError):
    """The provider cannot be used as configured (unknown provider, missing key or package, no model)."""


class ProviderError(LLMError):
    """A call failed. ``retryable``: a timeout, a dropped connection, HTTP 429 or 5xx."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable, self.status = retryable, status


@dataclass(frozen=True)
class ProviderReply:
    text: str
    prompt_tokens: int
    completion_tokens: int


Messages = Sequence[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]


def estimate_tokens(text: str) -> int:
    """A provider that reports no usage is charged ceil(characters / 4) tokens (the usual rule of thumb)."""
    return int(math.ceil(len(text) / 4.0))


class Provider:
    name = "provider"

    def complete(self, messages: Messages, *, model: str, max_output_tokens: int, temperature: float,
                 timeout_s: float) -> ProviderReply:
        raise NotImplementedError


class NoneProvider(Provider):
    name = "none"

    def complete(self, messages: Messages, **_: object) -> ProviderReply:
        raise ProviderError("no LLM provider configured (META_PIPELINE_LLM_PROVIDER is unset or 'none'); set it to "
                            "openai, openai-compatible, anthropic or scripted", retryable=False)


# -- scripted -------------------------------------------------------------------------

Responder = Callable[[Messages], "str | ProviderReply"]
_RESPONDERS: dict[str, Responder] = {}
_RESPONDERS_LOCK = threading.Lock()


def register_responder(name: str, responder: Responder) -> None:
    """Make ``responder`` the scripted model called ``name`` in this process (META_PIPELINE_LLM_MODEL=name).

    The lab's simulated model registers itself this way (``meta_pipeline.lab.prompt_sim``); the
    demo and ``evaluate --section prompts`` import it, so the code location itself never does.
    """
    with _RESPONDERS_LOCK:
        _RESPONDERS[name] = responder


def registered_responders() -> list[str]:
    with _RESPONDERS_LOCK:
        return sorted(_RESPONDERS)


class ScriptedProvider(Provider):
    """Deterministic and offline. ``script`` is a responder function (messages -> text or ProviderReply),
    or a list of replies consumed in order (an exception instance in the list is raised at its turn:
    how tests play a failing provider)."""

    name = "scripted"

    def __init__(self, script: Responder | Sequence[object]) -> None:
        self._lock = threading.Lock()
        if callable(script):
            self._responder: Responder | None = script
            self._queue: list[object] = []
        else:
            self._responder = None
            self._queue = list(script)

    def complete(self, messages: Messages, **_: object) -> ProviderReply:
        if self._responder is not None:
            out = self._responder(messages)
        else:
            with self._lock:
                if not self._queue:
                    raise ProviderError("scripted provider: its script has no reply left", retryable=False)
                out = self._queue.pop(0)
        if isinstance(out, BaseException):
            raise out
        if isinstance(out, ProviderReply):
            return out
        text = str(out)
        prompt = "".join(str(m.get("content", "")) for m in messages)
        return ProviderReply(text, estimate_tokens(prompt), estimate_tokens(text))


def scripted_from_registry(model: str) -> ScriptedProvider:
    with _RESPONDERS_LOCK:
        responder = _RESPONDERS.get(model)
    if responder is None:
        known = ", ".join(registered_responders()) or "none in this process"
        raise LLMConfigError(
            f"scripted provider: no scripted model named {model!r} (registered: {known}); the scripted provider "
            "serves tests, `meta-pipeline demo` and `meta-pipeline evaluate --section prompts`, which register the "
            "simulated model 'prompt-sim'; for a real model set META_PIPELINE_LLM_PROVIDER to openai, "
            "openai-compatible or anthropic")
    return ScriptedProvider(responder)


# -- OpenAI and OpenAI-compatible ------------------------------------------------------


def _missing_package(provider: str, package: str) -> LLMConfigError:
    return LLMConfigError(f"the {provider} provider needs the '{package}' package: "
                          f"pip install 'meta_pipeline[llm]' (or pip install {package})")


class OpenAIProvider(Provider):
    """Chat completions through the official ``openai`` client (also any OpenAI-compatible server)."""

    def __init__(self, *, name: str, api_key: str | None, base_url: str | None, timeout_s: float) -> None:
        try:
            import openai
        except ImportError as exc:
            raise _missing_package(name, "openai") from exc
        self.name = name
        self._openai = openai
        self._client = openai.OpenAI(api_key=api_key or NO_KEY_PLACEHOLDER, base_url=base_url or None,
                                     timeout=timeout_s, max_retries=0)

    def complete(self, messages: Messages, *, model: str, max_output_tokens: int, temperature: float,
                 timeout_s: float) -> ProviderReply:
        openai = self._openai
        try:
            response = self._client.chat.completions.create(
                model=model, messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                max_tokens=max_output_tokens, temperature=temperature, timeout=timeout_s)
        except openai.APITimeoutError as exc:
            raise ProviderError(f"timed out after {timeout_s:g} s", retryable=True) from exc
        except openai.APIConnectionError as exc:
            raise ProviderError(f"cannot connect ({_short(exc)})", retryable=True) from exc
        except openai.APIStatusError as exc:
            raise _status_error(exc.status_code, _short(exc)) from exc
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice is not None and choice.message is not None else None) or ""
        usage = response.usage
        prompt = "".join(str(m.get("content", "")) for m in messages)
        return ProviderReply(text,
                             int(usage.prompt_tokens) if usage and usage.prompt_tokens is not None else estimate_tokens(prompt),
                             int(usage.completion_tokens) if usage and usage.completion_tokens is not None
                             else estimate_tokens(text))


# -- Anthropic -------------------------------------------------------------------------


class AnthropicProvider(Provider):
    """The Messages API through the official ``anthropic`` client (system messages go to ``system``)."""

    name = "anthropic"

    def __init__(self, *, api_key: str | None, base_url: str | None, timeout_s: float) -> None:
        try:
            import anthropic
        except ImportError as exc:
            raise _missing_package("anthropic", "anthropic") from exc
        self._anthropic = anthropic
        self._client = anthropic.Anthropic(api_key=api_key, base_url=base_url or None, timeout=timeout_s,
                                           max_retries=0)

    def complete(self, messages: Messages, *, model: str, max_output_tokens: int, temperature: float,
                 timeout_s: float) -> ProviderReply:
        anthropic = self._anthropic
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        kwargs = {"system": system} if system else {}
        try:
            response = self._client.messages.create(model=model, max_tokens=max_output_tokens,
                                                    temperature=temperature, messages=turns, timeout=timeout_s,
                                                    **kwargs)
        except anthropic.APITimeoutError as exc:
            raise ProviderError(f"timed out after {timeout_s:g} s", retryable=True) from exc
        except anthropic.APIConnectionError as exc:
            raise ProviderError(f"cannot connect ({_short(exc)})", retryable=True) from exc
        except anthropic.APIStatusError as exc:
            raise _status_error(exc.status_code, _short(exc)) from exc
        text = "".join(getattr(block, "text", "") for block in response.content)
        return ProviderReply(text, int(response.usage.input_tokens), int(response.usage.output_tokens))


def _status_error(status: int, detail: str) -> ProviderError:
    retryable = status == 429 or status >= 500 or status == 408
    hint = {401: "the API key was refused (META_PIPELINE_LLM_API_KEY)", 403: "access refused",
            404: "unknown model or endpoint (META_PIPELINE_LLM_MODEL / META_PIPELINE_LLM_BASE_URL)",
            429: "rate limited"}.get(status, "")
    return ProviderError(f"HTTP {status}" + (f" ({hint})" if hint else "") + f": {detail}", retryable=retryable,
                         status=status)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
