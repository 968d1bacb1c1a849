"""prompt_evolution and prompt_comparison through Dagster on a sample task with the simulated model:
the tables filled, the PROMPT_TEMPLATE proposal with an LLM rationale, approve/apply/revert, the next
run starting from the applied prompt, the retrain sensor's targets."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from meta_pipeline.commands.orchestration import load_defs, with_store
from meta_pipeline.defs.prompts.resources import LLMParam, llm_resource
from meta_pipeline.governance import lifecycle
from meta_pipeline.governance.rationale import unsupported_numbers
from meta_pipeline.lab.prompt_sim import SAMPLE_TASKS, register_sim, sample_tasks_dir
from meta_pipeline.prompts.examples import ingest_examples_file
from meta_pipeline.prompts.runs import active_prompt, init_prompt
from meta_pipeline.store import prompts as prompt_rows

TASK = "sentiment"
RUN_CONFIG = {"ops": {"prompt_evolution": {"config": {"max_iterations": 2}}}}


@pytest.fixture
def ready(store, monkeypatch):
    data_file, prompt_file = SAMPLE_TASKS[TASK]
    ingest_examples_file(store, sample_tasks_dir() / data_file, TASK)
    init_prompt(store, TASK, (sample_tasks_dir() / prompt_file).read_text())
    register_sim(TASK, prompt_rows.read_examples(store, TASK))
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "scripted")
    monkeypatch.delenv("META_PIPELINE_LLM_MODEL", raising=False)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("task", [TASK])
    defs = with_store(load_defs(), store)
    yield store, instance, defs
    instance.dispose()


def test_evolution_comparison_proposal_and_lifecycle(ready):
    store, instance, defs = ready
    result = defs.resolve_job_def("prompts_job").execute_in_process(partition_key=TASK, instance=instance,
                                                                    run_config=RUN_CONFIG)
    assert result.success
    run = prompt_rows.latest_prompt_run(store, TASK)
    for column in ("baseline_test", "best_test", "win_margin", "margin_ci_low", "margin_ci_high", "p_value",
                   "compared_at", "proposal_id"):
        assert run[column] is not None and run[column] == run[column], column  # filled, not NaN
    assert run["best_val"] > run["baseline_val"] and run["best_test"] > run["baseline_test"]
    assert run["p_value"] < 0.05 and run["margin_ci_low"] > 0
    assert run["win_margin"] == pytest.approx(run["best_test"] - run["baseline_test"])
    # calls: every model call of the run, by both assets, the rationale included
    calls = store.read("llm_calls", equals={"run_id": result.run_id})
    made = calls[~calls["cached"]]
    assert run["calls"] == len(made) and run["tokens"] == int((made["prompt_tokens"] + made["completion_tokens"]).sum())
    assert (made["purpose"] == "rationale").sum() == 1 and (made["purpose"] == "test").sum() > 0
    cands = prompt_rows.read_prompt_candidates(store, TASK, result.run_id)
    assert cands["calls"].sum() == (~calls["cached"] & ~calls["purpose"].isin(["test", "rationale"])).sum()
    assert set(cands["strategy"]) >= {"start", "performance_based", "error_analysis", "ablation", "chain_of_thought",
                                      "few_shot_optimization"}
    # the proposal: PROMPT_TEMPLATE for the task, evidence with the test figures, a checked LLM rationale
    proposal = lifecycle.get_proposal(store, run["proposal_id"])
    assert (proposal["target_type"], proposal["target_id"], proposal["status"]) == ("PROMPT_TEMPLATE", TASK, "PENDING")
    evidence = json.loads(proposal["evidence_json"])
    assert evidence["p_value"] == float(f"{run['p_value']:.3g}") and evidence["n_test"] == run["n_test"]
    assert proposal["rationale_text"].startswith("The evidence supports this change")  # the simulated writer's
    assert unsupported_numbers(proposal["rationale_text"], [proposal["evidence_json"]]) == []
    assert json.loads(proposal["proposed_config_json"]) == json.loads(run["best_spec_json"])
    # materialization metadata: the plots and the comparison
    mat = instance.get_latest_materialization_event(dg.AssetKey("prompt_comparison")).asset_materialization
    assert mat.metadata["p_value"].value == pytest.approx(run["p_value"])
    evo = instance.get_latest_materialization_event(dg.AssetKey("prompt_evolution")).asset_materialization
    for metadata in (evo.metadata, mat.metadata):
        assert "validation_per_iteration" in metadata and "strategy_effectiveness" in metadata
    # approve + apply: the evolved prompt becomes the active PROMPT_TEMPLATE, and evolution starts from it
    lifecycle.approve(store, run["proposal_id"], "alice")
    applied = lifecycle.apply(store, run["proposal_id"], "alice")
    version, spec, config = active_prompt(store, TASK)
    assert (applied.to_version, version) == (2, 2) and config == json.loads(run["best_spec_json"])
    again = defs.resolve_job_def("prompts_job").execute_in_process(partition_key=TASK, instance=instance,
                                                                   run_config=RUN_CONFIG)
    assert again.success
    second = prompt_rows.latest_prompt_run(store, TASK)
    assert second["run_id"] == again.run_id and second["start_config_version"] == 2
    assert second["baseline_val"] == pytest.approx(run["best_val"])  # the same prompt, the same (cached) answers
    assert second["baseline_test"] == pytest.approx(run["best_test"])
    # revert restores the static prompt as a new version
    lifecycle.revert(store, run["proposal_id"], "alice")
    version, spec, config = active_prompt(store, TASK)
    assert version == 3 and config == {"instructions": ["Classify the sentiment of the text as positive or negative."],
                                       "demonstrations": []}


def test_evolve_without_a_provider_is_one_line(store, monkeypatch, capsys):
    import argparse

    from meta_pipeline.commands.prompts import cmd_prompts_evolve

    monkeypatch.delenv("META_PIPELINE_LLM_PROVIDER", raising=False)
    args = argparse.Namespace(task="sentiment", db_url=store.db_url, debug=False)
    assert cmd_prompts_evolve(args) == 2
    assert "error: no LLM provider: set META_PIPELINE_LLM_PROVIDER" in capsys.readouterr().err
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "anthropic")
    monkeypatch.delenv("META_PIPELINE_LLM_API_KEY", raising=False)
    assert cmd_prompts_evolve(args) == 2
    assert "the anthropic provider needs an API key" in capsys.readouterr().err


def test_missing_prompt_fails_with_the_command_to_run(store, monkeypatch):
    data_file, _ = SAMPLE_TASKS[TASK]
    ingest_examples_file(store, sample_tasks_dir() / data_file, TASK)
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "scripted")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("task", [TASK])
    defs = with_store(load_defs(), store)
    result = defs.resolve_job_def("prompts_job").execute_in_process(partition_key=TASK, instance=instance,
                                                                    raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "meta-pipeline prompts init --task sentiment --file PROMPT.txt" in str(failure.step_failure_data)


def test_the_retrain_sensor_targets_prompt_evolution():
    from meta_pipeline.defs.feedback_generic.sensors import retrain_targets

    targets, note = retrain_targets(load_defs().get_repository_def())
    assert {k.to_user_string() for k in targets} == {"prompt_evolution", "prompt_comparison"} and note == ""


def test_the_api_key_comes_through_envvar_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "openai-compatible")
    monkeypatch.setenv("META_PIPELINE_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("META_PIPELINE_LLM_API_KEY", raising=False)
    assert llm_resource().api_key is None  # unset: no EnvVar (Dagster would refuse an unset one)
    monkeypatch.setenv("META_PIPELINE_LLM_API_KEY", "sk-from-env-123")
    resource = llm_resource()
    assert isinstance(resource.api_key, dg.EnvVar) and resource.api_key == "META_PIPELINE_LLM_API_KEY"
    seen = {}

    @dg.asset
    def uses_llm(llm: LLMParam) -> dg.MaterializeResult:
        seen["settings"] = llm
        return dg.MaterializeResult(metadata={"llm": llm.describe(), "settings": repr(llm)})

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([uses_llm], resources={"llm": resource}, instance=instance)
        assert result.success
        assert seen["settings"].api_key == "sk-from-env-123" and seen["settings"].provider == "openai-compatible"
        logs = "".join(str(e) for e in instance.all_logs(result.run_id))
        assert "sk-from-env-123" not in logs
        assert "openai-compatible" in str(result.asset_materializations_for_node("uses_llm")[0].metadata)


def test_the_same_run_through_an_openai_compatible_server(ready, monkeypatch):
    """Only the environment changes: the simulated model behind a local OpenAI-compatible HTTP server
    (127.0.0.1) answers the same as the scripted provider, through the official openai client."""
    pytest.importorskip("openai")
    from meta_pipeline.lab.prompt_sim import SIM_MODEL
    from meta_pipeline.llm.providers import _RESPONDERS
    from meta_pipeline_tests.support.openai_server import LocalOpenAIServer

    store, instance, defs = ready
    config = {"ops": {"prompt_evolution": {"config": {"max_iterations": 1}}}}
    scripted = defs.resolve_job_def("prompts_job").execute_in_process(partition_key=TASK, instance=instance,
                                                                      run_config=config)
    first = prompt_rows.latest_prompt_run(store, TASK)
    server = LocalOpenAIServer()
    server.plan = [("responder", _RESPONDERS[SIM_MODEL])]
    try:
        monkeypatch.setenv("META_PIPELINE_LLM_PROVIDER", "openai-compatible")
        monkeypatch.setenv("META_PIPELINE_LLM_BASE_URL", server.url)
        monkeypatch.setenv("META_PIPELINE_LLM_MODEL", "sim-over-http")  # another model: no cache hit
        http = defs.resolve_job_def("prompts_job").execute_in_process(partition_key=TASK, instance=instance,
                                                                      run_config=config)
    finally:
        server.close()
    assert scripted.success and http.success
    second = prompt_rows.latest_prompt_run(store, TASK)
    assert (second["provider"], second["model"]) == ("openai-compatible", "sim-over-http")
    for column in ("baseline_val", "best_val", "baseline_test", "best_test", "p_value", "iterations"):
        assert second[column] == pytest.approx(first[column]), column
    assert second["calls"] == len(server.requests) and second["cached_calls"] == first["cached_calls"]
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
