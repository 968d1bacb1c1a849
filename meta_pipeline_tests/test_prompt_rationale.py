"""LLM-written proposal rationales: numbers checked against the evidence, the template as fallback,
never blocking a proposal."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.rationale import numbers_in, rewrite_pending_rationales, unsupported_numbers, \
    write_rationale
from meta_pipeline.llm import LLMClient, LLMSettings, MemoryCache, ProviderError, ScriptedProvider, register_responder

EVIDENCE = {"p_value": 0.00123, "margin": 0.2456, "n_test": 90, "baseline_test_accuracy": 0.4111}
PROPOSAL = {
    "domain": None, "target_type": "PROMPT_TEMPLATE", "target_id": "qa",
    "current_config_snapshot_json": json.dumps({"instructions": ["Answer."], "demonstrations": []}),
    "proposed_config_json": json.dumps({"instructions": ["Answer.", "Think step by step."], "demonstrations": []}),
    "rationale_text": "Template: margin 0.2456 on 90 test examples, p 0.00123.",
    "evidence_json": json.dumps(EVIDENCE), "evidence_hash": "h1", "confidence": 0.61,
}


def _client(reply) -> LLMClient:
    return LLMClient(LLMSettings(provider="scripted", model="writer"), ScriptedProvider(
        reply if callable(reply) else [reply]), MemoryCache())


def test_numbers_and_the_support_rule():
    assert numbers_in("a 12.5% gain, p 0.0012, n=1,200 and -0.3") == ["12.5%", "0.0012", "1,200", "-0.3"]
    evidence = [json.dumps(EVIDENCE)]
    assert unsupported_numbers("margin 0.2456, p 0.00123, 90 examples", evidence) == []
    assert unsupported_numbers("margin 0.25 (rounded), 24.6% better", evidence) == []  # rounded quotes are fine
    assert unsupported_numbers("margin 0.3, 91 examples, 35% better", evidence) == ["0.3", "91", "35%"]
    assert unsupported_numbers("a shortfall of 0.41", [json.dumps({"diff": -0.4111})]) == []  # magnitudes


def test_an_llm_rationale_that_quotes_the_evidence_is_used():
    text = "Adding a reasoning cue raised test accuracy by 0.2456 over 90 examples (McNemar p 0.00123)."
    seen = []
    out = write_rationale(_client(lambda m: seen.append(m) or text), PROPOSAL)
    assert (out.source, out.text) == ("llm", text) and "scripted writer" in out.note
    assert "EVIDENCE: " in seen[0][-1]["content"] and '"p_value": 0.00123' in seen[0][-1]["content"]


def test_a_rationale_with_a_number_not_in_the_evidence_is_rejected():
    out = write_rationale(_client("Accuracy rose by 0.31 with p 0.00123."), PROPOSAL)
    assert out.source == "template" and out.text == PROPOSAL["rationale_text"]
    assert "it states 0.31, not in the evidence" in out.note


def test_provider_failure_or_no_provider_keeps_the_template():
    failing = _client(ProviderError("HTTP 503", retryable=False, status=503))
    out = write_rationale(failing, PROPOSAL)
    assert out.source == "template" and "LLM unavailable" in out.note and "HTTP 503" in out.note
    assert write_rationale(None, PROPOSAL).source == "template"
    assert write_rationale(LLMClient(LLMSettings(), cache=MemoryCache()), PROPOSAL).note == "no LLM provider configured"
    assert write_rationale(_client(""), PROPOSAL).note == "the LLM replied nothing"


def _insert(store, **overrides) -> str:
    row = {**PROPOSAL, **overrides}
    return lifecycle.insert_proposals(store, pd.DataFrame([row])).inserted[0]


def test_new_proposals_get_llm_rationales_from_the_environment(store, monkeypatch):
    good = _insert(store, evidence_hash="h-good", target_id="good")
    bad = _insert(store, evidence_hash="h-bad", target_id="bad")
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "scripted")
    monkeypatch.setenv("META_PIPELINE_LLM_MODEL", "rationale-writer")

    def writer(messages):
        target = json.loads(messages[-1]["content"].split("PROPOSAL: ")[1].split("\nEVIDENCE:")[0])["target_id"]
        return "Margin 0.2456 on 90 examples." if target == "good" else "Margin 0.5 on 1000 examples."

    register_responder("rationale-writer", writer)
    logged: list[str] = []
    outcomes = rewrite_pending_rationales(store, [good, bad], log=logged.append)
    assert [o.source for o in outcomes] == ["llm", "template"]
    texts = store.read("meta_controller_config_proposals").set_index("proposal_id")["rationale_text"]
    assert texts[good] == "Margin 0.2456 on 90 examples." and texts[bad] == PROPOSAL["rationale_text"]
    assert any("rejected the LLM's rationale: it states 0.5, 1000" in line for line in logged)
    calls = store.read("llm_calls")
    assert calls["purpose"].tolist() == ["rationale", "rationale"]


def test_a_misconfigured_provider_never_blocks(store, monkeypatch):
    pid = _insert(store)
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "openai")  # no key: the client cannot be built
    monkeypatch.delenv("META_PIPELINE_LLM_API_KEY", raising=False)
    logged: list[str] = []
    assert rewrite_pending_rationales(store, [pid], log=logged.append) == []
    assert "needs an API key" in logged[0]
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "nonsense")
    assert rewrite_pending_rationales(store, [pid], log=logged.append) == []
    assert store.read("meta_controller_config_proposals")["rationale_text"].tolist() == [PROPOSAL["rationale_text"]]


@pytest.mark.parametrize("status", ["APPROVED"])
def test_only_pending_rationales_change(store, monkeypatch, status):
    pid = _insert(store)
    lifecycle.approve(store, pid, "alice")
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "scripted")
    monkeypatch.setenv("META_PIPELINE_LLM_MODEL", "rationale-ok")
    register_responder("rationale-ok", lambda m: "Margin 0.2456.")
    rewrite_pending_rationales(store, [pid])
    row = store.read("meta_controller_config_proposals").iloc[0]
    assert row["status"] == status and row["rationale_text"] == PROPOSAL["rationale_text"]
