"""Prompt evolution with a scripted model whose answers are planted: exact strategy trajectories,
acceptance and rollback, convergence, the budget stop, a free re-run, and the paired test vs a hand
computation."""

from __future__ import annotations

import re
from math import comb

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.llm import LLMClient, LLMSettings, MemoryCache, ScriptedProvider
from meta_pipeline.prompts.comparison import compare_on_test, proposal_confidence, should_propose
from meta_pipeline.prompts.evolution import EvolutionSettings, evolve
from meta_pipeline.prompts.examples import task_data
from meta_pipeline.prompts.spec import Example, PromptSpec, classify_component, parse_answer
from meta_pipeline.prompts.stats import compare_paired, mcnemar_exact, paired_bootstrap_ci
from meta_pipeline.prompts.strategies import OPTIMIZER_SYSTEM, parse_rewrite

# Planted model: an example "sN [tier T]" is answered right only when the prompt has what tier T needs.
#   tier 0: nothing; tier 1: an answer-format instruction; tier 2: + a step-by-step cue;
#   tier 3: + at least 3 demonstrations; tier 4: never. Without a format instruction a reply is
#   the bare label for tier 0 and "hmm" (unparseable) otherwise.
# The optimizer (performance_based, error_analysis) returns the instructions plus "Be concise." —
# a rewrite that never helps.


def _tier_met(system: str) -> int:
    instructions = system.split("### Example")[0]
    fmt = "Answer: <label>" in instructions
    reason = "step by step" in instructions
    demos = system.count("### Example")
    return 0 if not fmt else (1 if not reason else (2 if demos < 3 else 3))


def planted(messages):
    system, user = messages[0]["content"], messages[-1]["content"]
    if system.startswith(OPTIMIZER_SYSTEM):
        lines = re.search(r"<prompt>\n(.*?)\n</prompt>", user, re.S).group(1).splitlines()
        return "<prompt>\n" + "\n".join([*lines, "Be concise."] if "Be concise." not in lines else lines) + "\n</prompt>"
    tier = int(re.search(r"\[tier (\d)\]", user).group(1))
    expected = "yes" if int(re.search(r"s(\d+)", user).group(1)) % 2 else "no"
    met = _tier_met(system)
    if "Answer: <label>" not in system.split("### Example")[0]:
        return expected if tier == 0 else "hmm"
    return f"Answer: {expected if tier <= met else ('no' if expected == 'yes' else 'yes')}"


def _rows(n: int = 120) -> pd.DataFrame:
    return pd.DataFrame([{"example_id": f"s{i:03d}", "input": f"s{i} [tier {i % 5}]",
                          "expected": "yes" if i % 2 else "no", "choices_json": None, "metadata_json": None}
                         for i in range(n)])


def _client(**budget) -> LLMClient:
    return LLMClient(LLMSettings(provider="scripted", model="planted", **budget), ScriptedProvider(planted),
                     MemoryCache())


START = PromptSpec.from_text("Decide whether the statement holds.")


def _acc(examples, tier: int) -> float:
    return float(np.mean([int(re.search(r"\[tier (\d)\]", e.input).group(1)) <= tier for e in examples]))


def test_exact_trajectory_acceptance_rollback_convergence():
    data = task_data("planted", _rows())
    client = _client()
    result = evolve(client, data, START, EvolutionSettings(max_iterations=10, patience=2))
    c = result.candidates
    # iteration by iteration: which strategy was kept
    accepted = c[c["accepted"]].sort_values("iteration")
    assert accepted["candidate_id"].tolist() == [
        "i0-start", "i1-ablation-1", "i2-chain_of_thought-1", "i3-few_shot_optimization-1"]
    assert [t["accepted"] for t in result.trajectory] == [
        "start", "ablation", "chain_of_thought", "few_shot_optimization", None, None]
    # validation accuracy follows the planted tiers exactly
    assert accepted["val_score"].tolist() == pytest.approx([_acc(data.val, t) for t in (0, 1, 2, 3)])
    # rollback: iterations 4 and 5 bring nothing, the prompt of iteration 3 stays; patience 2 -> converged
    assert [t["current_val"] for t in result.trajectory[3:]] == pytest.approx([_acc(data.val, 3)] * 3)
    assert result.iterations == 5 and result.converged and result.stop_reason.startswith("converged: 2 iteration")
    assert result.best_id == "i3-few_shot_optimization-1" and result.best_val == pytest.approx(_acc(data.val, 3))
    assert not c[c["iteration"] >= 4]["accepted"].any()
    # the winning prompt has the format instruction, the reasoning cue and three demonstrations
    assert [classify_component(x.text) for x in result.best.components] == ["task", "reasoning", "format"]
    assert len(result.best.demonstrations) == 3
    assert {d for d in result.best.demonstrations} <= {e.example_id for e in data.train}
    # every candidate's parent is the prompt current when it was proposed
    parents = dict(zip(accepted["iteration"], accepted["candidate_id"]))
    for row in c[c["iteration"] > 0].itertuples():
        current = parents[max(i for i in parents if i < row.iteration)]
        assert row.parent_id == current
    # calls: the scored candidates' answers plus one optimizer call per LLM candidate, all counted
    assert int(c["calls"].sum()) == client.usage.calls
    # error_analysis's rewrite equals performance_based's (both add "Be concise."), and from iteration 4 on
    # performance_based repeats an earlier rewrite: each prompt is scored once only, a repeat's optimizer call
    # is recorded on an unscored row
    scored = c[c["val_score"].notna()]
    assert scored["prompt_text"].duplicated().sum() == 0
    repeats = c[c["val_score"].isna()]
    assert "error_analysis" in set(repeats["strategy"])
    # (an optimizer call costs 1, or 0 when the same request was answered before and the cache serves it)
    assert set(repeats["calls"]) <= {0, 1}
    assert (repeats.loc[~repeats["strategy"].isin(["error_analysis", "performance_based"]), "calls"] == 0).all()
    assert repeats["note"].str.contains("scored before").all()
    table = result.strategy_table().set_index("strategy")
    assert table.loc[["ablation", "chain_of_thought", "few_shot_optimization"], "accepted"].tolist() == [1, 1, 1]
    assert table.loc["performance_based", "accepted"] == 0


def test_min_delta_rolls_back_small_gains():
    data = task_data("planted", _rows())
    gain = _acc(data.val, 1) - _acc(data.val, 0)
    result = evolve(_client(), data, START, EvolutionSettings(min_delta=gain + 0.01, patience=1))
    # the format instruction alone gains less than min_delta: rolled back, and with patience 1 that is the end
    assert result.best == START and result.iterations == 1 and result.converged
    assert result.candidates["accepted"].tolist().count(True) == 1  # the start only


def test_budget_stops_the_run_and_keeps_the_best_so_far():
    data = task_data("planted", _rows())
    n_val = len(data.val)
    client = _client(max_calls=n_val + 5)
    result = evolve(client, data, START, EvolutionSettings())
    assert result.stop_reason.startswith("budget: LLM budget spent") and not result.converged
    assert result.iterations == 1 and result.best == START and client.usage.calls == n_val + 5
    last = result.candidates.iloc[-1]
    assert last["strategy"] == "performance_based" and pd.isna(last["val_score"])
    assert "not scored: the budget ran out" in last["note"]


def test_a_rerun_is_free_and_identical():
    data = task_data("planted", _rows())
    cache = MemoryCache()
    first = LLMClient(LLMSettings(provider="scripted", model="planted"), ScriptedProvider(planted), cache)
    r1 = evolve(first, data, START)
    second = LLMClient(LLMSettings(provider="scripted", model="planted"),
                       ScriptedProvider(lambda m: pytest.fail("the cache should answer")), cache)
    r2 = evolve(second, data, START)
    assert second.usage.calls == 0 and second.usage.cached > 0
    pd.testing.assert_frame_equal(r1.candidates.drop(columns=["calls", "tokens"]),
                                  r2.candidates.drop(columns=["calls", "tokens"]))


def test_mcnemar_against_a_hand_computation():
    # 2 examples only the static prompt got right, 9 only the evolved one: n = 11
    # p = 2 · P(X ≤ 2), X ~ Bin(11, 1/2) = 2 · (C(11,0) + C(11,1) + C(11,2)) / 2^11 = 2 · 67 / 2048
    assert mcnemar_exact(2, 9) == pytest.approx(2 * (1 + 11 + 55) / 2048)
    assert mcnemar_exact(9, 2) == pytest.approx(134 / 2048)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    # 0 vs 7: 2 / 2^7
    assert mcnemar_exact(0, 7) == pytest.approx(2 * comb(7, 0) / 2 ** 7)
    a = np.array([1] * 20 + [1, 1] + [0] * 9 + [0] * 9, dtype=bool)  # static
    b = np.array([1] * 20 + [0, 0] + [1] * 9 + [0] * 9, dtype=bool)  # evolved
    paired = compare_paired(a, b, seed=3)
    assert (paired.n10, paired.n01, paired.n) == (2, 9, 40)
    assert paired.margin == pytest.approx(7 / 40) and paired.p_value == pytest.approx(134 / 2048)
    assert paired.ci_low < 7 / 40 < paired.ci_high
    # the bootstrap resamples pairs: a margin that is the same on every example has a zero-width CI
    same = np.ones(30, dtype=bool)
    assert paired_bootstrap_ci(~same, same) == (1.0, 1.0)


def test_comparison_on_test_and_the_proposal_rule():
    data = task_data("planted", _rows())
    client = _client()
    result = evolve(client, data, START)
    cmp = compare_on_test(client, data, START, result.best)
    p = cmp.paired
    assert p.baseline_accuracy == pytest.approx(_acc(data.test, 0))
    assert p.candidate_accuracy == pytest.approx(_acc(data.test, 3))
    assert p.n10 == 0 and p.n01 == round((_acc(data.test, 3) - _acc(data.test, 0)) * len(data.test))
    assert p.p_value == pytest.approx(mcnemar_exact(0, p.n01)) and p.p_value < 0.05
    assert should_propose(p, START, result.best) and not should_propose(p, START, START)
    # confidence = evidence · effect · sample (prompts/comparison.py)
    assert proposal_confidence(1e-4, 0.05, 30) == pytest.approx(0.5)
    assert proposal_confidence(0.01, 0.025, 90) == pytest.approx(0.5 * 0.5 * 0.75)


def test_parse_answer_rules():
    mc = ["A", "B", "C", "D", "E"]
    assert parse_answer("Let me think. Answer: C", mc) == "C"
    assert parse_answer("answer is b... no wait, the answer is D", mc) == "D"
    assert parse_answer(" B. ", mc) == "B"
    assert parse_answer("I'd pick option E.", mc) == "E"
    assert parse_answer("A good question; several seem plausible.", mc) is None
    assert parse_answer("either (A) or (B)", mc) is None
    words = ["negative", "positive"]
    assert parse_answer("The review is clearly positive.", words) == "positive"
    assert parse_answer("Answer: Negative", words) == "negative"
    assert parse_answer("not positive, rather negative", words) is None


def test_rewrite_parsing_and_prompt_rendering_order():
    assert parse_rewrite("Sure!\n<prompt>\n1. Read it.\n- Answer: <label>\n</prompt>") == ["Read it.", "Answer: <label>"]
    assert parse_rewrite("no tags here") is None
    spec = PromptSpec.from_text("Pick the best option.\nThink step by step.", ["e1"])
    pool = {"e1": Example("e1", "Where is milk kept?", "A", (("A", "a fridge"), ("B", "an oven")))}
    text = spec.render(pool)
    assert text.index("Pick the best option.") < text.index("### Example 1") < text.index("Answer: A")
    assert "A) a fridge\nB) an oven" in text
