"""Shared Dagster plumbing: the store resource, the domain partitions, metadata helpers.

``StoreResource`` is the thin Dagster face of ``meta_pipeline.store.MetaStore``: it
holds the URL (env ``META_PIPELINE_DB_URL``), and for each run hands the assets one
MetaStore with its own read cache (with the in-process executor all of a run's steps
share it, so the learning assets read a domain's source tables once). Assets take it
as ``store: StoreParam`` (= ``dg.ResourceParam[MetaStore]``): plain store methods, no
Dagster types in the cores. (The autoloader of ``defs/`` collects definitions objects
only; the helpers here are none.)
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pandas as pd

from pydantic import Field

from meta_pipeline.contracts import validate_domain
from meta_pipeline.paths import default_db_url
from meta_pipeline.store import MetaStore, ReadCache

# A domain appears the first time data for it is ingested.
domain_partitions = dg.DynamicPartitionsDefinition(name="domain")

STORE_KEY = "store"
StoreParam = dg.ResourceParam[MetaStore]


class StoreResource(dg.ConfigurableResource):
    """The data store (any SQLAlchemy URL): one MetaStore with a fresh read cache per run."""

    db_url: str = Field(default_factory=default_db_url,
                        description="SQLAlchemy URL; default env META_PIPELINE_DB_URL, else data/meta.db (SQLite)")

    def create_resource(self, context: dg.InitResourceContext) -> MetaStore:  # type: ignore[override]
        """What the assets receive (documented ConfigurableResource pattern: config object ≠ runtime object)."""
        return MetaStore(self.db_url, read_cache=ReadCache())


def release_freed_memory() -> None:
    """Hand memory the previous step freed back to the OS before a large step starts.

    Why: a run's learning steps each build and drop arrays of tens of millions of
    (lesson, trade) pairs; glibc keeps much of what was freed in its heaps (and the
    read-ahead thread's arena), and pyarrow's pool keeps its own. On a 5M-trade domain
    that was ~1 GiB of resident memory between steps, added to every later step's peak.
    gc first (frames in reference cycles), then arrow's pool, then ``malloc_trim``
    (glibc only; elsewhere a no-op).
    """
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def partition_domain(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> str:
    """The run's domain partition key, validated before it reaches SQL or a path."""
    return validate_domain(context.partition_key)


def table_preview(df: pd.DataFrame, max_rows: int = 20) -> dg.MetadataValue:
    """A markdown table of the first rows (floats rounded), for the asset's metadata."""
    if df.empty:
        return dg.MetadataValue.md("_(no rows)_")
    shown = df.head(max_rows).copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].round(4)
    return dg.MetadataValue.md(shown.to_markdown(index=False) if _has_tabulate() else _md_table(shown))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _md_table(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, sep, *body])


def plot_metadata(fig: Any, alt: str = "plot") -> dg.MetadataValue:
    """A matplotlib figure as an inline PNG in markdown metadata (shown in the UI).

    Build figures with `matplotlib.figure.Figure()` (no pyplot): thread-safe, no GUI backend.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def counts_metadata(counts: Mapping[str, int | float]) -> dict[str, dg.MetadataValue]:
    out: dict[str, dg.MetadataValue] = {}
    for key, value in counts.items():
        out[key] = dg.MetadataValue.int(int(value)) if isinstance(value, int) else dg.MetadataValue.float(float(value))
    return out


# A task (any model whose outputs are rated; prompt evolution's unit too) appears the first
# time feedback for it is ingested (`meta-pipeline ingest feedback FILE --task NAME`).
task_partitions = dg.DynamicPartitionsDefinition(name="task")
