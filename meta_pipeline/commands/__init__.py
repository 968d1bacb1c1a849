"""Subcommands of `meta-pipeline`. Each module defines `register(subparsers)`.

A handler takes the parsed args and returns the process exit code. Handlers are thin:
they parse, call a core function, print.
"""

COMMAND_MODULES = (
    "meta_pipeline.commands.data",  # synth, ingest, demo, backfill, materialize
    "meta_pipeline.commands.predict",
    "meta_pipeline.commands.replay",
    "meta_pipeline.commands.simulate",
    "meta_pipeline.commands.evaluate",
    "meta_pipeline.commands.proposals",
    "meta_pipeline.commands.knobs",
    "meta_pipeline.commands.bench",
    "meta_pipeline.commands.prompts",  # prompts init|list|show|evolve (ingest examples: its rows)
)
