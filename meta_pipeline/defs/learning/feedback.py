"""The closed loop in Dagster: `override_feedback` scores every overrides version on the trades
that closed after it, watches the residual stream for drift, and the `drift_sensor` turns each
drift event into one re-learn of the domain.

The math is ``meta_pipeline.learning.feedback`` (prequential rule, cycle figures, break windows)
and ``meta_pipeline.learning.drift`` (the streaming detector); the store keeps every version
(``pm_overrides_versions`` / ``pm_overrides_history``), the cycles, the events and the
detector's state. The loop runs through the store and sensors, never through asset
dependencies, so the asset graph stays acyclic.
"""


import hashlib
import json
import os
import urllib.request

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from meta_pipeline.defs.learning.assets import AS_OF_TAG, TRADE_COLUMNS, _run_as_of, pm_overrides
from meta_pipeline.defs.resources import StoreParam, domain_partitions, partition_domain, plot_metadata, table_preview
from meta_pipeline.learning import feedback as feedback_core
from meta_pipeline.learning.drift import FACTOR_DRIFT_CONFIG, DriftConfig, ResidualDriftMonitor
from meta_pipeline.learning.overrides import OverrideModel
from meta_pipeline.store import MetaStore

GROUP = "feedback"
WEBHOOK_ENV = "META_PIPELINE_ALERT_WEBHOOK"  # off by default: set to an http(s) URL to be told of drift alarms
WEAK_IC_T = 2.0  # an alignment below this IC t over the last cycles is weak (WARN)
LAST_CYCLES = 3  # how many recent complete cycles the alignment check pools


class FeedbackConfig(dg.Config):
    """Run config of `override_feedback`."""

    cycle_size: int = Field(default=feedback_core.CYCLE_SIZE, ge=10, le=1_000_000,
                            description="scored trades per feedback cycle (a cycle never spans two versions)")


def _source(store: MetaStore, domain: str, trade_ids: set[str], table_name: str, columns: list[str]) -> pd.DataFrame:
    frame = store.read(table_name, domain=domain, columns=columns)
    return frame[frame["trade_id"].isin(trade_ids)].reset_index(drop=True)


def _stream_digest(scored: pd.DataFrame) -> str:
    text = "\x1f".join(scored["trade_id"].astype(str) + "@" + scored["overrides_version"].astype(str))
    return hashlib.sha256(text.encode()).hexdigest()


def _score(store: MetaStore, domain: str, as_of: pd.Timestamp | None
           ) -> tuple[pd.DataFrame, pd.DataFrame, dict, pd.DataFrame]:
    """(scored trades, versions, coherence per version, factors): every scorable trade with the version that
    predicted it, and (trade_id, latent_factor_id) for each factor whose override priced it."""
    versions = store.override_versions(domain)
    trades = store.read("trades", domain=domain, columns=TRADE_COLUMNS, order_by=["closed_at", "trade_id"])
    if as_of is not None:
        trades = trades[trades["closed_at"] <= as_of]
        versions = versions[versions["as_of"] <= as_of]
    no_factors = pd.DataFrame({"trade_id": pd.Series(dtype=object), "latent_factor_id": pd.Series(dtype=object)})
    if versions.empty or trades.empty:
        empty = feedback_core.score_trades(trades.head(0), versions, lambda v, g: pd.Series(dtype=float))
        return empty, versions, {}, no_factors
    scorable = trades[feedback_core.assign_versions(trades["closed_at"], versions) >= 0]
    ids = set(scorable["trade_id"])
    patterns = _source(store, domain, ids, "trade_patterns", ["trade_id", "pattern"])
    scope = _source(store, domain, ids, "trade_scope", ["trade_id", "key", "value"])
    metrics = _source(store, domain, ids, "trade_metrics", ["trade_id", "metric", "value"])
    stored: dict[int, tuple[pd.DataFrame, pd.DataFrame, dict]] = {}

    def version_rows(v: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
        if v not in stored:
            stored[v] = store.override_version_rows(domain, v)
        return stored[v]

    factor_parts: list[pd.DataFrame] = []

    def predict_version(v: int, group: pd.DataFrame) -> pd.Series:
        rows, weights, knobs = version_rows(v)
        model = OverrideModel.from_rows(rows, weights, knobs)  # the knobs recorded with version v
        keep = set(group["trade_id"])
        pats, scp = patterns[patterns["trade_id"].isin(keep)], scope[scope["trade_id"].isin(keep)]
        factor_parts.append(model.winning_overrides(group, pats, scp)[["trade_id", "latent_factor_id"]])
        return model.predict(group, pats, scp, metrics[metrics["trade_id"].isin(keep)])

    scored = feedback_core.score_trades(scorable, versions, predict_version)
    factors = pd.concat(factor_parts, ignore_index=True) if factor_parts else no_factors
    coherence = {}
    numbers = versions["version"].astype(int).tolist()
    for prev, cur in zip([None, *numbers[:-1]], numbers):
        if cur in set(scored["overrides_version"].astype(int)):
            coherence[cur] = feedback_core.override_coherence(
                None if prev is None else version_rows(prev)[0], version_rows(cur)[0])
    return scored, versions, coherence, factors


STATE_FORMAT = "streams-v1"  # drift_monitor_state.state_json: {"format", "whole": <monitor>, "factors": {id: <monitor>}}


def _load_monitors(text: str) -> tuple[ResidualDriftMonitor, dict[str, ResidualDriftMonitor]]:
    """The stored monitors; ValueError for a state this version cannot continue."""
    raw = json.loads(text)
    if isinstance(raw, dict) and raw.get("format") == STATE_FORMAT:
        return (ResidualDriftMonitor.from_state(raw["whole"]),
                {fid: ResidualDriftMonitor.from_state(t) for fid, t in raw.get("factors", {}).items()})
    return ResidualDriftMonitor.from_state(text), {}  # an older single-stream state: its factors start now


def _event(at: pd.Series, change: pd.Series | None, alarm, stream: str, now: pd.Timestamp) -> dict:
    return {
        "detected_at": now, "trade_id": str(at["trade_id"]), "closed_at": at["closed_at"],
        "change_trade_id": None if change is None else str(change["trade_id"]),
        "change_closed_at": None if change is None else change["closed_at"],
        "detector": alarm.detector, "stream": stream, "statistic": float(alarm.statistic),
        "overrides_version": int(at["overrides_version"]),
    }


def _monitor_stream(store: MetaStore, domain: str, scored: pd.DataFrame, factors: pd.DataFrame,
                    known: set[str]) -> tuple[list[dict], pd.DataFrame, str]:
    """Feed the residuals the monitors have not seen yet; returns (alarms as event rows, the new state row, note).

    Two kinds of stream, in trade order: the domain's whole residual stream
    (``DriftConfig()``: small and large shifts) and one stream per latent factor — the
    residuals of the trades that factor's override priced (``FACTOR_DRIFT_CONFIG``: large
    shifts), which catches a break of a lesson too rare to move the whole stream. The
    consumed prefix is checked (same trades, same versions); if history changed (a replay
    added past versions) the monitors rescan from the start, and an alarm already on record
    is not recorded twice.
    """
    state = store.read("drift_monitor_state", domain=domain)
    order = scored.reset_index(drop=True)
    consumed = 0
    whole, by_factor = ResidualDriftMonitor(DriftConfig()), {}
    note = "drift monitor started on this domain's residual stream"
    if len(state):
        last = (pd.Timestamp(state["last_closed_at"].iloc[0]), str(state["last_trade_id"].iloc[0]))
        seen = (order["closed_at"] < last[0]) | ((order["closed_at"] == last[0]) & (order["trade_id"].astype(str) <= last[1]))
        position = int(seen.sum())
        restored = None
        # the consumed trades must still be the stream's prefix, with the same versions
        if seen.to_numpy()[:position].all() and _stream_digest(order.iloc[:position]) == state["stream_digest"].iloc[0]:
            try:
                restored = _load_monitors(state["state_json"].iloc[0])
            except ValueError:  # a state an older version wrote: start over on the whole stream
                note = "the stored monitor state is from another version: the monitors rescanned the stream"
        if restored is not None:
            (whole, by_factor), consumed = restored, position
            note = f"continued the residual streams after {position} trades"
        elif note.startswith("drift monitor started"):
            note = "the scored history changed (e.g. a replay added past versions): the monitors rescanned the stream"
    tail = order.iloc[consumed:]
    events: list[dict] = []
    known = set(known)  # trades with an event on record (added to as alarms are recorded)
    now = pd.Timestamp.now(tz="UTC")

    def record(stream_rows: pd.DataFrame, alarm, stream: str, offset: int | None) -> None:
        at = stream_rows.iloc[alarm.index]
        if str(at["trade_id"]) in known:  # a rescan found an alarm already on record: not a new event
            return
        change = None
        if alarm.change_index is not None and 0 <= alarm.change_index < len(stream_rows):
            change = stream_rows.iloc[alarm.change_index]
        elif alarm.change_index is not None and offset is not None and 0 <= offset + alarm.change_index < len(order):
            change = order.iloc[offset + alarm.change_index]
        known.add(str(at["trade_id"]))
        events.append(_event(at, change, alarm, stream, now))

    if len(tail):
        for alarm in whole.update(tail["residual"].to_numpy(dtype=float)):
            record(tail, alarm, "all", consumed)
        priced = tail[["trade_id", "closed_at", "overrides_version", "residual"]].reset_index().merge(
            factors.drop_duplicates(), on="trade_id").sort_values("index", kind="stable")
        for fid, rows in priced.groupby("latent_factor_id", sort=True):
            monitor = by_factor.get(str(fid)) or ResidualDriftMonitor(FACTOR_DRIFT_CONFIG)
            by_factor[str(fid)] = monitor
            rows = rows.reset_index(drop=True)
            for alarm in monitor.update(rows["residual"].to_numpy(dtype=float)):
                record(rows, alarm, f"factor:{fid}", None)
    last_row = order.iloc[-1] if len(order) else None
    state_text = json.dumps({"format": STATE_FORMAT, "whole": whole.to_state(),
                             "factors": {fid: m.to_state() for fid, m in sorted(by_factor.items())}})
    state_row = pd.DataFrame([{
        "state_json": state_text, "n_seen": int(whole.n_seen),
        "last_closed_at": None if last_row is None else last_row["closed_at"],
        "last_trade_id": None if last_row is None else str(last_row["trade_id"]),
        "stream_digest": _stream_digest(order), "updated_at": now,
    }])
    events.sort(key=lambda e: (pd.Timestamp(e["closed_at"]), e["trade_id"]))
    return events, state_row, note


def _notify(context: dg.AssetExecutionContext, domain: str, events: list[dict]) -> None:
    """POST new drift alarms to the webhook in META_PIPELINE_ALERT_WEBHOOK (off by default); never fails the run."""
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if not url or not events:
        return
    body = json.dumps({"domain": domain, "drift_events": events}, default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - a URL the operator configured
            context.log.info(f"drift alarm sent to the webhook ({response.status})")
    except Exception as exc:  # noqa: BLE001 - a notification must never break the loop
        context.log.warning(f"drift webhook {url!r} failed: {exc}")


def _feedback_figure(cycles: pd.DataFrame, scored: pd.DataFrame, domain: str) -> Figure:
    """Rank IC per cycle (with ±2/√n) above the CUSUM of standardized residuals, alarms marked."""
    fig = Figure(figsize=(10, 6))
    ax_ic, ax_cusum = fig.subplots(2, 1)
    x = cycles["cycle"].to_numpy()
    ax_ic.bar(x, cycles["rank_ic"].fillna(0.0), color=np.where(cycles["drift_alarm"], "tab:red", "tab:blue"))
    band = 2.0 / np.sqrt(cycles["n"].clip(lower=1))
    ax_ic.plot(x, band, color="gray", lw=0.8, ls="--", label="±2/√n")
    ax_ic.plot(x, -band, color="gray", lw=0.8, ls="--")
    ax_ic.axhline(0, color="black", lw=0.5)
    ax_ic.set_ylabel("rank IC")
    ax_ic.set_xlabel("cycle (red: a drift alarm in it)")
    ax_ic.legend(fontsize=8)
    resid = scored["residual"].to_numpy(dtype=float)
    z = (resid - resid.mean()) / (resid.std() or 1.0)
    ax_cusum.plot(np.cumsum(z), lw=1.0, color="tab:purple")
    ax_cusum.set_ylabel("CUSUM of standardized residuals")
    ax_cusum.set_xlabel("scored trade (trade order)")
    fig.suptitle(f"{domain}: realized outcomes vs the overrides that predicted them")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=["trades", pm_overrides],
    kinds={"pandas", "sql"},
    description=(
        "Every overrides version scored on the trades that closed after it (prequential, in data time), in "
        "cycles of cycle_size trades: rank IC and its t, Mincer–Zarnowitz slope with CI, hit rate, MSE vs "
        "predicting 0 (alignment), coherence between versions; the residual stream feeds a persisted drift "
        "detector whose alarms go to drift_events. Table feedback_cycles."
    ),
)
def override_feedback(context: dg.AssetExecutionContext, config: FeedbackConfig,
                      store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    as_of = _run_as_of(context)
    scored, versions, coherence, factors = _score(store, domain, as_of)
    on_record = set(store.read("drift_events", domain=domain, columns=["trade_id"])["trade_id"].astype(str))
    events, state_row, note = _monitor_stream(store, domain, scored, factors, on_record)
    alarm_trades = on_record | {e["trade_id"] for e in events}
    cycles = feedback_core.feedback_cycles(scored, config.cycle_size, coherence, alarm_trades)
    ids = store.write_feedback(domain, cycles.assign(cycle_size=config.cycle_size), pd.DataFrame(events),
                               state_row)
    for event_id, event in zip(ids, events):
        context.log.warning(f"{domain}: drift alarm #{event_id} on stream {event['stream']} at trade {event['trade_id']} ({event['closed_at']}), "
                            f"{event['detector']} statistic {event['statistic']:.3g}: a re-learn is due")
    _notify(context, domain, [{**e, "id": i} for i, e in zip(ids, events)])
    metadata: dict[str, dg.MetadataValue] = {
        "dagster/row_count": dg.MetadataValue.int(len(cycles)),
        "scored_trades": dg.MetadataValue.int(len(scored)),
        "versions": dg.MetadataValue.int(len(versions)),
        "new_drift_events": dg.MetadataValue.int(len(events)),
        "monitor": dg.MetadataValue.text(note),
        "as_of": dg.MetadataValue.text("all trades" if as_of is None else str(as_of)),
    }
    if len(cycles):
        last = cycles.iloc[-1]
        metadata.update({
            "last_rank_ic": dg.MetadataValue.float(float(last["rank_ic"]) if pd.notna(last["rank_ic"]) else float("nan")),
            "last_alignment": dg.MetadataValue.float(float(last["alignment"]) if pd.notna(last["alignment"]) else float("nan")),
            "cycles": table_preview(cycles.drop(columns=["first_trade_id", "last_trade_id"]).tail(20), max_rows=20),
            "ic_and_cusum": plot_metadata(_feedback_figure(cycles, scored, domain), "feedback cycles"),
        })
    else:
        metadata["status"] = dg.MetadataValue.text(
            "nothing to score yet: no trade closed after the first overrides version"
            + ("" if len(versions) else " (no overrides version exists: materialize pm_overrides)"))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(asset=override_feedback, partitions_def=domain_partitions,
                description=f"Alignment: the pooled rank-IC t of the last {LAST_CYCLES} complete cycles is ≥ "
                            f"{WEAK_IC_T} (WARN otherwise).")
def override_alignment_is_strong(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    domain = partition_domain(context)
    cycles = store.read("feedback_cycles", domain=domain, order_by="cycle")
    recent = cycles[cycles["complete"]].tail(LAST_CYCLES)
    if recent.empty:
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"status": "no complete feedback cycle yet"})
    # pooled: the IC of the cycles, weighted by their sizes, and its t over all their trades
    n = int(recent["n"].sum())
    ic = float(np.average(recent["rank_ic"].fillna(0.0), weights=recent["n"]))
    t = ic * np.sqrt((n - 2) / max(1 - ic * ic, 1e-12)) if n > 2 else float("nan")
    return dg.AssetCheckResult(
        passed=bool(t >= WEAK_IC_T), severity=dg.AssetCheckSeverity.WARN,
        metadata={"pooled_rank_ic": float(ic), "ic_t": float(t), "trades": n, "cycles": len(recent)})


def pending_drift_events(store: MetaStore, domain: str | None = None) -> pd.DataFrame:
    """Drift events not acted on yet, decided from the data: an event is acted on once an overrides
    version exists that was materialized after its detection (it learned knowing the break)."""
    events = store.read("drift_events", domain=domain, order_by="id")
    if events.empty:
        return events
    versions = store.read("pm_overrides_versions", domain=domain, columns=["domain", "materialized_at"])
    newest = versions.groupby("domain")["materialized_at"].max() if len(versions) else pd.Series(dtype="datetime64[ns, UTC]")
    relearned = events["domain"].map(newest)
    acted = relearned.notna() & (pd.to_datetime(relearned, utc=True) > events["detected_at"])
    return events[~acted.to_numpy()].reset_index(drop=True)


@dg.asset_check(asset=override_feedback, partitions_def=domain_partitions,
                description="No drift alarm waits for a re-learn (ERROR while one does).")
def no_unanswered_drift(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    domain = partition_domain(context)
    pending = pending_drift_events(store, domain)
    return dg.AssetCheckResult(
        passed=pending.empty, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"pending_events": len(pending),
                  "events": table_preview(pending[["id", "trade_id", "closed_at", "detector", "statistic",
                                                   "overrides_version"]]) if len(pending) else "none"})


# the jobs that re-learn a domain (a queued one of these answers a drift event when it runs)
LEARNING_JOBS = frozenset({"relearn_job", "learning_on_new_trades_job", "domain_refresh_job", "learning_job"})

relearn_job = dg.define_asset_job(
    "relearn_job",
    selection=dg.AssetSelection.groups("learning", GROUP),
    description="Re-learn one domain (learning assets honouring the drift breaks) and score it again.",
)


@dg.sensor(job=relearn_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Each drift event not acted on yet -> one re-learn run of its domain (run key = the event).")
def drift_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    """Pending is decided from the data (``pending_drift_events``), so a fresh or lost cursor neither
    repeats an event already answered nor misses one; the run key makes each event one run, and
    the domain's newest pending event stands for its older ones (one pending re-learn per domain)."""
    pending = pending_drift_events(store)
    requests = []
    waiting = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING}
    for domain, group in pending.groupby("domain", sort=True):
        newest = group.iloc[-1]
        # one pending re-learn per domain: a learning run of this domain that has not started yet will
        # learn after the detection (it reads drift_events when it runs) and so answers the event
        queued = [r for r in context.instance.get_run_records(
            dg.RunsFilter(statuses=list(waiting), tags={"dagster/partition": str(domain)}), limit=20)
            if r.dagster_run.job_name in LEARNING_JOBS]
        if queued:
            context.log.info(f"{domain}: drift event(s) {group['id'].tolist()} wait for the queued run "
                             f"{queued[0].dagster_run.run_id[:8]} ({queued[0].dagster_run.job_name})")
            continue
        requests.append(dg.RunRequest(
            run_key=f"drift:{domain}:{int(newest['id'])}", partition_key=str(domain),
            tags={"meta_pipeline/drift_events": ",".join(str(i) for i in group["id"].tolist()[-20:])}))
    return dg.SensorResult(run_requests=requests, cursor=str(int(pending["id"].max())) if len(pending) else context.cursor)


__all__ = ["AS_OF_TAG", "drift_sensor", "no_unanswered_drift", "override_alignment_is_strong", "override_feedback",
           "pending_drift_events", "relearn_job"]
