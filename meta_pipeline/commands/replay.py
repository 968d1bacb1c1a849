"""meta-pipeline replay --domain NAME --every 7d: walk-forward overrides and their feedback over history."""

from __future__ import annotations

import argparse
import sys
import warnings

import pandas as pd

from meta_pipeline.commands.errors import UserError, command, open_store
from meta_pipeline.contracts import ContractError, validate_domain


def _duration(text: str) -> pd.Timedelta:
    try:
        with warnings.catch_warnings():  # pandas deprecates the unit "d" for "D"; both mean days here
            warnings.simplefilter("ignore")
            value = pd.Timedelta(text)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ContractError(f"--every {text!r}: not a duration (e.g. 7d, 12h, 1w)") from exc
    if value <= pd.Timedelta(0):
        raise ContractError(f"--every {text!r}: must be positive")
    return value


@command
def cmd_replay(args: argparse.Namespace) -> int:
    from meta_pipeline.commands.orchestration import get_instance, load_defs, register_domains, with_store
    from meta_pipeline.defs.learning.replay import replay_domain, replay_grid

    domain = validate_domain(args.domain)
    every = _duration(args.every)
    warmup = _duration(args.warmup)
    start = None
    if args.start:
        try:
            start = pd.Timestamp(args.start)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ContractError(f"--start {args.start!r}: not an ISO-8601 time (e.g. 2026-06-01T00:00:00Z)") from exc
        if pd.isna(start):
            raise ContractError(f"--start {args.start!r}: not a time (e.g. 2026-06-01T00:00:00Z)")
        start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    store = open_store(args)
    trades = store.read("trades", domain=domain, columns=["closed_at"])
    if trades.empty:
        raise UserError(f"--domain {domain}", f"no trades in {store.db_url}", "ingest them first (meta-pipeline ingest)")
    grid = replay_grid(trades["closed_at"], every, start, warmup)
    print(f"{domain}: {len(trades)} trades from {trades['closed_at'].min()} to {trades['closed_at'].max()}; "
          f"{len(grid)} walk-forward step(s) every {every}, then one on all the data", file=sys.stderr)
    instance = get_instance()
    register_domains(instance, [domain])
    job = with_store(load_defs(), store).resolve_job_def("relearn_job")
    result = replay_domain(job, instance, store, domain, grid,
                           progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    cycles = store.read("feedback_cycles", domain=domain, order_by="cycle")
    shown = cycles[["cycle", "overrides_version", "first_closed_at", "n", "rank_ic", "ic_t", "mz_slope", "hit_rate",
                    "alignment", "drift_alarm"]]
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}") if len(shown) else "no cycles scored")
    events = store.count("drift_events", domain)
    print(f"{len(result.steps)} run(s), {sum(not s.success for s in result.steps)} failed; "
          f"{store.count('pm_overrides_versions', domain)} overrides version(s); {events} drift event(s)")
    return 0 if result.success else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="walk-forward replay: overrides as of past times, scored on the trades after",
                       description="Materialize a domain's overrides as of successive past times (each learning only "
                                   "from trades closed before it) and score the trades in between: the same "
                                   "feedback_cycles rows live operation produces.")
    p.add_argument("--domain", required=True)
    p.add_argument("--every", default="7d", help="time between as_of points (default 7d)")
    p.add_argument("--start", default=None, help="first as_of (ISO-8601; default: first trade + --warmup)")
    p.add_argument("--warmup", default="14d", help="history before the first as_of (default 14d)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: META_PIPELINE_DB_URL or data/meta.db)")
    p.set_defaults(func=cmd_replay)
