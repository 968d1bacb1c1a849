"""The one Definitions object: everything under defs/ autoloaded, plus resources and executor.

Executor: in-process. Each step of a domain's learning pass is short and they mostly
run in sequence, so the multiprocess executor's process-per-step start-up (seconds
each) would dominate; parallelism comes from running domains as separate runs,
which the run queue (dagster.yaml) caps at the number of cores.
"""

from pathlib import Path

import dagster as dg

from meta_pipeline.defs.prompts.resources import LLM_KEY, llm_resource
from meta_pipeline.defs.resources import STORE_KEY, StoreResource

defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    dg.Definitions(resources={STORE_KEY: StoreResource(), LLM_KEY: llm_resource()}, executor=dg.in_process_executor),
)
