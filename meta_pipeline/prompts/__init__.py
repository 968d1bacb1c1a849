"""Self-optimizing prompts (the ACLA seed): tasks and examples, prompt rendering, evolution
strategies, acceptance/rollback, convergence, the paired comparison. No Dagster; the model is
reached through ``meta_pipeline.llm``. docs/prompts.md explains the whole loop."""
