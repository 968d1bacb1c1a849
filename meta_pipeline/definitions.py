"""The one Definitions object: everything under defs/ autoloaded, plus resources and executor.

Executor: in-process. Each step of a domain's learning pass is short and they mostly
run in sequence, so the multiprocess executor's process-per-step start-up (seconds
each) would dominate; parallelism comes from running domains as separate runs,
which the run queue (dagster.yaml) caps at the number of cores.
"""

from pathlib import Path

import dagster as dg

import meta_pipeline.defs

from meta_pipeline.defs.prompts.resources import LLM_KEY, llm_resource
from meta_pipeline.defs.resources import STORE_KEY, StoreResource

# The defs folder as a component tree built from the module itself, not from pyproject's
# [tool.dg.project]: the same definitions as ``dg.load_from_defs_folder``, but without a
# configured code-location name to compare, so Dagster no longer warns (seven times per
# `dagster` CLI call) that 'meta_pipeline' (pyproject) differs from the name `-m
# meta_pipeline.definitions` registers the location under. The name the loader reports
# (workspace.yaml's `meta_pipeline`, or the module for `-m`) is used as it is.
defs = dg.Definitions.merge(
    dg.ComponentTree.from_module(defs_module=meta_pipeline.defs, project_root=Path(__file__).resolve().parents[1]).build_defs(),
    dg.Definitions(resources={STORE_KEY: StoreResource(), LLM_KEY: llm_resource()}, executor=dg.in_process_executor),
)
