"""Walk-forward replay: overrides learned as of successive past times, each scored on the trades after it.

A user who loads a year of trades at once has no later trades to score. ``replay_domain``
runs the re-learn job (the learning assets + ``override_feedback``) once per point of a
time grid with the run tag ``meta_pipeline/as_of``: each run learns only from trades
closed at or before its ``as_of`` (and honours the drift breaks detected by then), keeps
its overrides as a new version with that ``as_of``, and scores the trades up to it —
exactly what live operation would have done had the trades arrived one step at a time.
When a step's feedback raises drift events, the step is re-learned at the same ``as_of``
(what the ``drift_sensor`` does live). A last run without the tag brings the overrides to
all the data.

Runs go through Dagster (``job.execute_in_process`` on the given instance), so they are
visible in the UI like any other run.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
import pandas as pd

from meta_pipeline.defs.learning.assets import AS_OF_TAG
from meta_pipeline.store import MetaStore

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class ReplayStep:
    as_of: pd.Timestamp | None
    run_id: str
    success: bool
    version: int | None
    new_events: int
    relearned_for_drift: bool = False


@dataclass
class ReplayResult:
    domain: str
    steps: list[ReplayStep] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(s.success for s in self.steps)


def replay_grid(closed_at: pd.Series, every: pd.Timedelta, start: pd.Timestamp | None = None,
                warmup: pd.Timedelta = pd.Timedelta(days=14)) -> list[pd.Timestamp]:
    """The as_of times: from ``start`` (default: the first trade + ``warmup``) every ``every``, before the newest trade."""
    if every <= pd.Timedelta(0):
        raise ValueError(f"--every must be positive, got {every}")
    if closed_at.empty:
        return []
    first, last = pd.Timestamp(closed_at.min()), pd.Timestamp(closed_at.max())
    t = start if start is not None else first + warmup
    grid = []
    while t < last:
        grid.append(t)
        t = t + every
    return grid


def replay_domain(job: dg.JobDefinition, instance: dg.DagsterInstance, store: MetaStore, domain: str,
                  grid: list[pd.Timestamp], progress: Callable[[str], None] | None = None) -> ReplayResult:
    """One re-learn run per grid point (tag ``meta_pipeline/as_of``), a drift re-learn where a step found
    drift, then one run on all the data (module doc)."""
    result = ReplayResult(domain)

    def run(as_of: pd.Timestamp | None, drift: bool = False) -> ReplayStep:
        before = store.count("drift_events", domain)
        tags = {"meta_pipeline/replay": "1"} | ({} if as_of is None else {AS_OF_TAG: as_of.isoformat()})
        outcome = job.execute_in_process(partition_key=domain, instance=instance, tags=tags, raise_on_error=False,
                                         run_config=QUIET)
        versions = store.override_versions(domain)
        step = ReplayStep(as_of, outcome.run_id, outcome.success,
                          int(versions["version"].max()) if len(versions) else None,
                          store.count("drift_events", domain) - before, drift)
        result.steps.append(step)
        if progress:
            progress(f"{domain} as of {as_of or 'now'}: {'ok' if step.success else 'FAILED'}, version {step.version}, "
                     f"{step.new_events} new drift event(s){' (drift re-learn)' if drift else ''}")
        return step

    for as_of in grid:
        step = run(as_of)
        if not step.success:
            return result
        if step.new_events:
            run(as_of, drift=True)
    run(None)
    return result
