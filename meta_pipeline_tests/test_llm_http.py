"""The openai-compatible provider over real HTTP: a tiny OpenAI chat-completions server on 127.0.0.1
(started here, nothing else is reached) and the official `openai` client talking to it — replies,
usage, HTTP 500/429 retried then a clear error, a timeout that never hangs."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("openai")

from meta_pipeline.llm import LLMClient, LLMSettings, MemoryCache, ProviderError, make_provider  # noqa: E402
from meta_pipeline_tests.support.openai_server import LocalOpenAIServer as _Server  # noqa: E402


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _client(server: _Server, **kw) -> LLMClient:
    settings = LLMSettings(provider="openai-compatible", model="local-model", base_url=server.url,
                           api_key=kw.pop("api_key", None), backoff_s=0.01, **kw)
    return LLMClient(settings, make_provider(settings), MemoryCache())


MSG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is water wet?"}]


def test_a_reply_with_usage_through_the_official_client(server):
    server.plan = [("ok", "Answer: yes")]
    client = _client(server, api_key="sk-local")
    reply = client.complete(MSG)
    assert reply.text == "Answer: yes" and (reply.prompt_tokens, reply.completion_tokens) == (5, 2)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "local-model" and req["body"]["messages"] == MSG
    assert req["auth"] == "Bearer sk-local"
    assert client.complete(MSG).cached and len(server.requests) == 1  # the cache answers the second time


def test_no_key_is_fine_for_a_local_server(server):
    server.plan = [("ok", "fine")]
    assert _client(server).complete(MSG).text == "fine"


def test_http_500_and_429_are_retried_then_succeed(server):
    server.plan = [("status", 500), ("status", 429), ("ok", "third time")]
    client = _client(server, max_retries=3)
    reply = client.complete(MSG)
    assert reply.text == "third time" and reply.attempts == 3 and len(server.requests) == 3


def test_retries_exhausted_give_one_clear_error(server):
    server.plan = [("status", 500)]
    client = _client(server, max_retries=2, api_key="sk-hidden-key")
    with pytest.raises(ProviderError) as info:
        client.complete(MSG)
    text = str(info.value)
    assert "openai-compatible local-model at http://127.0.0.1" in text and "HTTP 500" in text
    assert "3 attempts, retries exhausted" in text and "sk-hidden-key" not in text
    assert len(server.requests) == 3


def test_http_404_is_not_retried(server):
    server.plan = [("status", 404)]
    client = _client(server, max_retries=3)
    with pytest.raises(ProviderError, match="HTTP 404 .unknown model or endpoint.*1 attempt, not retryable"):
        client.complete(MSG)
    assert len(server.requests) == 1


def test_a_timeout_never_hangs(server):
    server.plan = [("sleep", 3.0)]
    client = _client(server, timeout_s=0.3, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(ProviderError, match=r"timed out after 0.3 s \(2 attempts, retries exhausted\)"):
        client.complete(MSG)
    assert time.perf_counter() - started < 2.5  # two attempts of 0.3 s and a short backoff, not the server's 3 s
    assert len(server.requests) == 2


def test_concurrent_batch_keeps_the_order(server):
    server.plan = [("ok", "same")]
    client = _client(server, concurrency=4)
    batch = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    replies = client.complete_many(batch)
    assert len(replies) == 8 and client.usage.calls == 8 and len(server.requests) == 8
    asked = sorted(r["body"]["messages"][0]["content"] for r in server.requests)
    assert asked == sorted(f"q{i}" for i in range(8))
