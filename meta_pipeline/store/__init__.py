"""The store: every piece of SQL and dialect code, behind typed methods. No Dagster.

``MetaStore`` (metastore.py) is the one entry point: typed reads, atomic per-domain
partition replacement, appends, the one advisory lock, ingest's key replacement, the
sensors' batch queries. ``configs.py`` holds the proposal lifecycle's row-level SQL,
``frames.py`` the SQL text and the fast row/frame conversions, ``engine.py`` engines and
the schema upgrade, ``cache.py`` the per-run read cache.
``meta_pipeline.defs.resources.StoreResource`` wraps MetaStore for Dagster.
"""

from meta_pipeline.store.cache import CACHEABLE_TABLES, ReadCache
from meta_pipeline.store.engine import add_missing_columns, dispose_engines, get_engine, mark_written
from meta_pipeline.store.frames import insert_frame
from meta_pipeline.store.metastore import GlobalPriorVersion, MetaStore, lock, lock_partition

__all__ = [
    "CACHEABLE_TABLES",
    "GlobalPriorVersion",
    "MetaStore",
    "ReadCache",
    "add_missing_columns",
    "dispose_engines",
    "get_engine",
    "insert_frame",
    "lock",
    "lock_partition",
    "mark_written",
]
