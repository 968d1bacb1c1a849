"""The store: every piece of SQL and dialect code, behind typed methods. No Dagster.

``MetaStore`` is the one entry point (reads, atomic partition replacement, appends, locks,
ingest's key replacement, sensor cursors' queries); ``defs/resources.py`` wraps it as a
Dagster resource that holds the per-run read cache.
"""

from meta_pipeline.store.core import *  # noqa: F401,F403
from meta_pipeline.store.core import (  # noqa: F401 - the names callers use
    CACHEABLE_TABLES,
    MetaStore,
    ReadCache,
    dispose_engines,
    get_engine,
    insert_frame,
    lock_partition,
)
