"""The LLM layer offline: settings from the environment, retries with backoff, the budget, the cache,
call records, clear errors, the key never shown."""

from __future__ import annotations

import pandas as pd
import pytest

from meta_pipeline.llm import (
    BudgetExhausted,
    LLMClient,
    LLMConfigError,
    LLMSettings,
    MemoryCache,
    ProviderError,
    ProviderReply,
    ScriptedProvider,
    StoreCache,
    client_for,
    flush_call_records,
    make_provider,
    register_responder,
    settings_from_env,
)

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def _client(script, sleeps=None, **settings) -> LLMClient:
    return LLMClient(LLMSettings(provider="scripted", model="t", backoff_s=0.5, **settings), ScriptedProvider(script),
                     MemoryCache(), sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_settings_from_env_and_defaults():
    env = {"META_PIPELINE_LLM_PROVIDER": "OpenAI-Compatible", "META_PIPELINE_LLM_MODEL": "llama3.1:8b",
           "META_PIPELINE_LLM_BASE_URL": "http://127.0.0.1:11434/v1", "META_PIPELINE_LLM_API_KEY": "sk-secret",
           "META_PIPELINE_LLM_MAX_CALLS": "50", "META_PIPELINE_LLM_TIMEOUT_S": "7.5"}
    s = settings_from_env(env)
    assert (s.provider, s.model, s.base_url, s.max_calls, s.timeout_s) == (
        "openai-compatible", "llama3.1:8b", "http://127.0.0.1:11434/v1", 50, 7.5)
    assert "sk-secret" not in repr(s) and "sk-secret" not in s.describe()
    assert settings_from_env({}).provider == "none" and not settings_from_env({}).enabled
    assert settings_from_env({"META_PIPELINE_LLM_PROVIDER": "scripted"}).resolved_model == "prompt-sim"
    with pytest.raises(LLMConfigError, match="unknown LLM provider 'gpt'"):
        settings_from_env({"META_PIPELINE_LLM_PROVIDER": "gpt"})
    with pytest.raises(LLMConfigError, match="META_PIPELINE_LLM_MAX_CALLS='many' is not a number"):
        settings_from_env({"META_PIPELINE_LLM_MAX_CALLS": "many"})


def test_provider_configuration_errors_are_clear():
    with pytest.raises(LLMConfigError, match="needs an API key: set META_PIPELINE_LLM_API_KEY"):
        make_provider(LLMSettings(provider="openai", model="gpt-4o-mini"))
    with pytest.raises(LLMConfigError, match="needs an API key"):
        make_provider(LLMSettings(provider="anthropic"))
    with pytest.raises(LLMConfigError, match="set META_PIPELINE_LLM_BASE_URL"):
        make_provider(LLMSettings(provider="openai-compatible", model="m"))
    with pytest.raises(LLMConfigError, match="no scripted model named 'nobody-registered-this'"):
        make_provider(LLMSettings(provider="scripted", model="nobody-registered-this"))
    client = LLMClient(LLMSettings(), cache=MemoryCache())  # provider none
    with pytest.raises(ProviderError, match="no LLM provider configured"):
        client.complete(MSG)


def test_registered_responder_is_the_scripted_model():
    register_responder("echo-test", lambda messages: messages[-1]["content"].upper())
    client = LLMClient(LLMSettings(provider="scripted", model="echo-test"), cache=MemoryCache())
    assert client.complete(MSG).text == "SAY HI"


def test_retries_back_off_exponentially_then_succeed():
    sleeps: list[float] = []
    client = _client([ProviderError("HTTP 500", retryable=True, status=500),
                      ProviderError("HTTP 429", retryable=True, status=429), "hello"], sleeps, max_retries=3)
    reply = client.complete(MSG)
    assert (reply.text, reply.attempts, reply.cached) == ("hello", 3, False)
    assert sleeps == [0.5, 1.0]  # backoff_s · 2^k
    assert client.usage.calls == 1 and client.records[-1].attempts == 3


def test_retries_exhausted_is_one_clear_error_and_recorded():
    sleeps: list[float] = []
    client = _client([ProviderError("HTTP 503: overloaded", retryable=True, status=503)] * 3, sleeps, max_retries=2,
                     backoff_max_s=0.75)
    with pytest.raises(ProviderError) as info:
        client.complete(MSG, purpose="answer")
    text = str(info.value)
    assert "scripted t" in text and "HTTP 503" in text and "3 attempts, retries exhausted" in text
    assert sleeps == [0.5, 0.75]  # capped at backoff_max_s
    frame = client.records_frame()
    assert len(frame) == 1 and frame["attempts"].iloc[0] == 3 and "HTTP 503" in frame["error"].iloc[0]


def test_not_retryable_fails_at_once():
    sleeps: list[float] = []
    client = _client([ProviderError("HTTP 401 (the API key was refused)", retryable=False, status=401), "never"],
                     sleeps)
    with pytest.raises(ProviderError, match="1 attempt, not retryable"):
        client.complete(MSG)
    assert sleeps == []


def test_key_is_scrubbed_from_errors():
    settings = LLMSettings(provider="scripted", model="t", api_key="sk-very-secret", max_retries=0)
    client = LLMClient(settings, ScriptedProvider([ProviderError("bad key sk-very-secret", retryable=False)]),
                       MemoryCache())
    with pytest.raises(ProviderError) as info:
        client.complete(MSG)
    assert "sk-very-secret" not in str(info.value) and "***" in str(info.value)
    assert "sk-very-secret" not in client.records_frame().to_string()


def test_budget_in_calls_stops_and_cache_hits_are_free():
    answers = iter(f"a{i}" for i in range(100))
    client = _client(lambda m: next(answers), max_calls=3)
    batch = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    with pytest.raises(BudgetExhausted, match="3 of max_calls 3"):
        client.complete_many(batch)
    assert client.usage.calls == 3
    # what was answered before the budget ran out is cached: asking again costs nothing
    again = client.complete_many(batch[:3])
    assert [r.text for r in again] == ["a0", "a1", "a2"] and all(r.cached for r in again)
    assert client.usage.calls == 3 and client.usage.cached == 3


def test_budget_in_tokens():
    client = _client(lambda m: ProviderReply("x", 40, 10), max_tokens=100)
    client.complete([{"role": "user", "content": "1"}])
    client.complete([{"role": "user", "content": "2"}])
    with pytest.raises(BudgetExhausted, match="100 of max_tokens 100"):
        client.complete([{"role": "user", "content": "3"}])
    assert client.usage.tokens == 100


def test_cache_key_is_model_and_messages():
    calls: list[str] = []

    def responder(messages):
        calls.append(messages[-1]["content"])
        return "r" + str(len(calls))

    cache = MemoryCache()
    a = LLMClient(LLMSettings(provider="scripted", model="m1"), ScriptedProvider(responder), cache)
    assert a.complete(MSG).text == "r1" and a.complete(MSG).text == "r1"
    b = LLMClient(LLMSettings(provider="scripted", model="m2"), ScriptedProvider(responder), cache)
    assert b.complete(MSG).text == "r2"  # another model: not the same entry
    assert len(calls) == 2


def test_store_cache_makes_a_rerun_free_and_records_land(any_store):
    answers = iter(f"answer {i}" for i in range(100))
    provider = ScriptedProvider(lambda m: next(answers))
    settings = LLMSettings(provider="scripted", model="m")
    batch = [[{"role": "user", "content": f"q{i}"}] for i in range(4)] + [[{"role": "user", "content": "q0"}]]
    first = LLMClient(settings, provider, StoreCache(any_store), run_id="run-a")
    out1 = first.complete_many(batch)
    assert [r.text for r in out1] == ["answer 0", "answer 1", "answer 2", "answer 3", "answer 0"]
    assert first.usage.calls == 4  # the repeated message is asked once
    assert flush_call_records(any_store, first) == 4 and flush_call_records(any_store, first) == 0
    second = LLMClient(settings, provider, StoreCache(any_store), run_id="run-b")
    out2 = second.complete_many(batch)
    assert [r.text for r in out2] == [r.text for r in out1] and second.usage.calls == 0
    flush_call_records(any_store, second)
    calls = any_store.read("llm_calls", order_by="id")
    assert calls.groupby("run_id")["cached"].agg(["sum", "count"]).to_dict("index") == {
        "run-a": {"sum": 0, "count": 4}, "run-b": {"sum": 5, "count": 5}}
    assert (calls.loc[~calls["cached"], "prompt_tokens"] > 0).all()
    assert any_store.count("llm_cache") == 4


def test_client_for_reads_the_environment(monkeypatch, store):
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "scripted")
    monkeypatch.setenv("META_PIPELINE_LLM_MODEL", "echo-env")
    register_responder("echo-env", lambda m: "from env")
    client = client_for(store, run_id="r1", task="t1")
    assert client.complete(MSG).text == "from env"
    flush_call_records(store, client)
    row = store.read("llm_calls").iloc[0]
    assert (row["run_id"], row["task"], row["provider"], row["model"]) == ("r1", "t1", "scripted", "echo-env")
    assert isinstance(row["called_at"], pd.Timestamp)


def test_replies_are_storable_text(any_store):
    client = LLMClient(LLMSettings(provider="scripted", model="m"), ScriptedProvider(["a\x00b \ud800c"]),
                       StoreCache(any_store))
    assert client.complete(MSG).text == "ab \ufffdc"
    assert any_store.read("llm_cache")["response_text"].tolist() == ["ab \ufffdc"]
