"""The closed loop measured on fleets with a planted break (``meta-pipeline evaluate --section closed-loop``).

Per seed, one synthetic domain (``synth.generate_fleet(break_at_days=...)``): the first
``break_families`` signals' edges flip sign at a known time t_b. Everything runs through
the real assets (``relearn_job``: learning + ``override_feedback``) on a temp SQLite
store, in process:

1. **Stale overrides** W: learned as of t_b − ``lead_days`` (run tag ``meta_pipeline/as_of``).
2. **Detection**: ``override_feedback`` scores the trades after W with W — stationary until
   t_b, shifted after — and its drift monitor (the default ``DriftConfig``) watches the
   residual stream. Delay = scored trades from the first post-break trade to the alarm; an
   alarm before t_b is a false alarm (counted per 100,000 stationary scored trades).
3. **Re-learns** at t_d + ``relearn_after_days`` (t_d = the alarm's trade; when the monitor
   misses, t_b + ``relearn_after_days``):
   * *re-learn*: the learning assets honouring the drift event (``feedback.break_windows``:
     the patterns the break affected learn only from trades after it);
   * *plain re-fit*: the same as_of on a copy of the store without drift events;
   * *oracle*: a copy whose only drift event sits exactly at t_b (it knows the break time).
4. **Error** of each version on the post-break trades after its as_of (the next
   ``eval_days``), against the planted expected return (``expected_r``: signal + metric +
   strategy parts, no noise): MSE. The share of the stale error removed is
   (MSE_stale − MSE_x) / (MSE_stale − MSE_oracle_floor) where the floor is the oracle's
   MSE — i.e. how much of the gap between the stale overrides and an oracle that knows the
   break a method closes — and also the plain share (MSE_stale − MSE_x) / MSE_stale.

No figure here is typed in: each is measured when the section runs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DRIFT_TAG = "meta_pipeline/as_of"


@dataclass(frozen=True)
class ClosedLoopConfig:
    seeds: tuple[int, ...] = tuple(range(6))
    n_trades: int = 9000  # per domain over train_days + holdout_days
    train_days: float = 80.0
    holdout_days: float = 10.0
    break_at_days: float = 45.0
    break_families: int = 2
    e0_range: tuple[float, float] = (0.5, 0.9)
    lead_days: float = 15.0  # W learns up to t_b − lead_days: the monitor sees a stationary stretch first
    relearn_after_days: float = 3.0  # re-learn this long after the alarm (more post-break evidence)
    eval_days: float = 10.0


def _job(db_url: str) -> Any:
    import dagster as dg

    from meta_pipeline.definitions import defs
    from meta_pipeline.defs.resources import StoreResource

    bound = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs,
                           resources={**(defs.resources or {}), "store": StoreResource(db_url=db_url)})
    return bound.resolve_job_def("relearn_job")


def _run(db_path: Path, instance: Any, as_of: pd.Timestamp | None) -> str:
    tags = {} if as_of is None else {DRIFT_TAG: as_of.isoformat()}
    result = _job(f"sqlite:///{db_path}").execute_in_process(
        partition_key="dom0", instance=instance, tags=tags, raise_on_error=True,
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    return result.run_id


def _predict(store: Any, version: int, trades: pd.DataFrame) -> np.ndarray:
    from meta_pipeline.lab.synth import trades_contract_frame
    from meta_pipeline.learning.predict import predict_trades

    raw = trades_contract_frame(trades)
    out = predict_trades(store, "dom0", raw, version=version)
    return out.set_index("trade_id")["edge"].reindex(trades["trade_id"]).to_numpy(dtype=float)


def run_seed(cfg: ClosedLoopConfig, seed: int, workdir: Path) -> dict[str, Any]:
    import dagster as dg

    from meta_pipeline.ingest import ingest_file
    from meta_pipeline.lab.synth import generate_fleet, write_trades_file
    from meta_pipeline.store import MetaStore, dispose_engines

    fleet = generate_fleet(n_domains=1, n_trades=cfg.n_trades, train_days=cfg.train_days,
                           holdout_days=cfg.holdout_days, break_at_days=cfg.break_at_days,
                           break_families=cfg.break_families, e0_range=cfg.e0_range, seed=seed,
                           underperform=None)
    data = fleet.domains["dom0"]
    t_b = data.truth.break_at
    trades = data.trades
    db = workdir / f"seed{seed}.db"
    path = write_trades_file(trades, workdir / f"seed{seed}.csv")
    store = MetaStore(f"sqlite:///{db}")
    ingest_file(store, "trades", path, "dom0")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", ["dom0"])

    # 1-2: stale W, then the feedback on everything after it (the monitor's stream)
    _run(db, instance, t_b - pd.Timedelta(days=cfg.lead_days))
    _run(db, instance, trades["closed_at"].max())  # learns again as of the end, but W scores (lead, end]
    events = store.read("drift_events", domain="dom0", order_by="id")
    scored_after = trades[trades["closed_at"] > t_b - pd.Timedelta(days=cfg.lead_days)]
    before_break = scored_after[scored_after["closed_at"] <= t_b]
    after_break = scored_after[scored_after["closed_at"] > t_b]
    false_alarms = events[pd.to_datetime(events["closed_at"], utc=True) <= t_b]
    true = events[pd.to_datetime(events["closed_at"], utc=True) > t_b]
    if len(true):
        first = true.iloc[0]
        t_d = pd.Timestamp(first["closed_at"])
        delay = int((after_break["closed_at"] <= t_d).sum())
    else:
        t_d, delay = None, None

    # 3: re-learns at the same as_of in three stores (with the events / none / the oracle's)
    relearn_at = (t_d if t_d is not None else t_b) + pd.Timedelta(days=cfg.relearn_after_days)
    variants = {}
    for name in ("relearn", "plain", "oracle"):
        copy = workdir / f"seed{seed}-{name}.db"
        dispose_engines()
        shutil.copy(db, copy)
        st = MetaStore(f"sqlite:///{copy}")
        if name != "relearn":  # the re-learn keeps every event the detector raised, false alarms included
            with st.write() as conn:
                conn.exec_driver_sql("DELETE FROM drift_events")
        if name == "oracle":
            st.append("drift_events", pd.DataFrame([{
                "domain": "dom0", "detected_at": pd.Timestamp.now(tz="UTC"), "trade_id": "oracle",
                "closed_at": t_b, "change_trade_id": None, "change_closed_at": t_b, "detector": "oracle",
                "statistic": None, "overrides_version": 1}]))
        _run(copy, instance, relearn_at)
        versions = st.override_versions("dom0")
        variants[name] = (st, int(versions["version"].max()))
    stale_version = 1

    # 4: error on the post-break trades after the re-learn point, vs the planted expected return
    window = trades[(trades["closed_at"] > relearn_at)
                    & (trades["closed_at"] <= relearn_at + pd.Timedelta(days=cfg.eval_days))]
    truth = window["expected_r"].to_numpy()
    mse = {"stale": float(np.mean((_predict(variants["plain"][0], stale_version, window) - truth) ** 2))}
    for name, (st, version) in variants.items():
        mse[name] = float(np.mean((_predict(st, version, window) - truth) ** 2))
    breaks = variants["relearn"][0].read("pm_overrides_versions", domain="dom0")
    dispose_engines()
    return {
        "seed": seed, "break_at": str(t_b), "detected_at_trade": None if t_d is None else str(t_d),
        "delay_trades": delay, "missed": delay is None,
        "false_alarms": int(len(false_alarms)), "stationary_trades": int(len(before_break)),
        "relearn_at": str(relearn_at), "eval_trades": int(len(window)), "mse": mse,
        "post_break_trades_at_relearn": int(((trades["closed_at"] > t_b) & (trades["closed_at"] <= relearn_at)).sum()),
        "relearn_window_start": str(breaks["fit_window_start"].dropna().iloc[-1]) if breaks["fit_window_start"].notna().any() else None,
    }


def closed_loop_section(cfg: ClosedLoopConfig = ClosedLoopConfig(),
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every seed of the section (module doc) and the summary figures."""
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="meta-loop-") as tmp:
        for seed in cfg.seeds:
            rows.append(run_seed(cfg, seed, Path(tmp)))
            if progress:
                r = rows[-1]
                progress(f"closed loop seed {seed}: delay {r['delay_trades']} trades, false alarms {r['false_alarms']}, "
                         f"MSE stale {r['mse']['stale']:.4f} relearn {r['mse']['relearn']:.4f} plain "
                         f"{r['mse']['plain']:.4f} oracle {r['mse']['oracle']:.4f}")
    return {"config": cfg.__dict__, "seeds": rows, "summary": summarize(rows), "seconds": time.perf_counter() - t0}


def _share(stale: np.ndarray, x: np.ndarray, floor: np.ndarray | None = None) -> float:
    gap = stale - (floor if floor is not None else 0.0)
    return float(np.sum(stale - x) / np.sum(gap)) if np.sum(gap) > 0 else float("nan")


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    delays = np.array([r["delay_trades"] for r in rows if r["delay_trades"] is not None], dtype=float)
    mse = {k: np.array([r["mse"][k] for r in rows]) for k in ("stale", "relearn", "plain", "oracle")}
    hit = np.array([r["delay_trades"] is not None for r in rows], dtype=bool)
    stationary = sum(r["stationary_trades"] for r in rows)
    false_alarms = sum(r["false_alarms"] for r in rows)
    return {
        "seeds": len(rows),
        "detected": int(len(delays)),
        "delay_mean": float(delays.mean()) if len(delays) else float("nan"),
        "delay_p90": float(np.percentile(delays, 90)) if len(delays) else float("nan"),
        "false_alarms": false_alarms,
        "stationary_trades": stationary,
        "false_alarms_per_100k": 1e5 * false_alarms / stationary if stationary else float("nan"),
        "mse_mean": {k: float(v.mean()) for k, v in mse.items()},
        # pooled over seeds: share of the stale error (MSE vs the planted expected return) removed
        "removed_share": {k: _share(mse["stale"], mse[k]) for k in ("relearn", "plain", "oracle")},
        "removed_share_of_gap_to_oracle": {k: _share(mse["stale"], mse[k], mse["oracle"]) for k in ("relearn", "plain")},
        # the same on the fleets whose break the monitor caught (elsewhere the re-learn IS a plain re-fit)
        "removed_share_detected": {k: _share(mse["stale"][hit], mse[k][hit]) for k in ("relearn", "plain", "oracle")},
    }


def format_closed_loop(res: dict[str, Any]) -> str:
    s = res["summary"]
    share = s["removed_share"]
    gap = s["removed_share_of_gap_to_oracle"]
    det = s["removed_share_detected"]
    lines = [
        "| closed loop (planted sign-flip break) | value | target | met |",
        "|---|---|---|---|",
        f"| seeds / detected | {s['seeds']} / {s['detected']} | all | {'yes' if s['detected'] == s['seeds'] else 'no'} |",
        f"| detection delay, mean (trades) | {s['delay_mean']:.0f} | — | |",
        f"| detection delay, 90th pct (trades) | {s['delay_p90']:.0f} | — | |",
        f"| false alarms per 100,000 stationary trades | {s['false_alarms_per_100k']:.1f} "
        f"({s['false_alarms']} in {s['stationary_trades']}) | ≤ 2 | {'yes' if s['false_alarms_per_100k'] <= 2 else 'no'} |",
        f"| MSE vs planted E[r]: stale / re-learn / plain re-fit / oracle | {s['mse_mean']['stale']:.4f} / "
        f"{s['mse_mean']['relearn']:.4f} / {s['mse_mean']['plain']:.4f} / {s['mse_mean']['oracle']:.4f} | — | |",
        f"| stale error removed by the re-learn | {share['relearn']:.0%} | ≥ 80% | {'yes' if share['relearn'] >= 0.8 else 'no'} |",
        f"| stale error removed by a plain re-fit | {share['plain']:.0%} | (reference) | |",
        f"| stale error removed by the oracle | {share['oracle']:.0%} | (reference) | |",
        f"| gap to the oracle closed: re-learn / plain | {gap['relearn']:.0%} / {gap['plain']:.0%} | — | |",
        f"| on the {s['detected']} detected fleets: stale error removed by re-learn / plain re-fit / oracle | "
        f"{det['relearn']:.0%} / {det['plain']:.0%} / {det['oracle']:.0%} | ≥ 80% (re-learn) | "
        f"{'yes' if det['relearn'] >= 0.8 else 'no'} |",
    ]
    return "\n".join(lines)
