"""`controller_state`: the integrative layer's controller for one domain, advanced by new telemetry.

The math is `meta_pipeline.meta.controller` (one decision per telemetry batch); this
asset reads the domain's state and the ticks it has not seen, calls `advance`, and writes
the new state plus one `meta_decisions` row per decision in ONE transaction. A sensor
requests it when telemetry arrives; re-materializing without new telemetry changes nothing.
"""

import json
import zlib

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from meta_pipeline.meta.controller import (
    ControllerConfig,
    ControllerState,
    TelemetryError,
    advance,
    cold_start,
    inject_change,
    knob_bound_problems,
)
from meta_pipeline.governance.lifecycle import active_config
from meta_pipeline.meta.reward import meta_reward
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, clip_knobs, knobs_to_unit
from meta_pipeline.meta.prior_store import read_global_prior
from meta_pipeline.meta.priors import EARLY_PROBE_TICKS, early_negative_transfer
from meta_pipeline.defs.resources import domain_partitions, partition_domain, plot_metadata, table_preview
from meta_pipeline.store import MetaStore

TELEMETRY_COLUMNS = ["ts", "gain_p50", "stability_mean", "vram_utilization", "latency_ms",
                     *[f"knob_{n}" for n in KNOB_NAMES]]
PLOT_DECISIONS = 300  # how many recent decisions the trajectory plot shows


class ControllerRunConfig(dg.Config):
    """Run config of `controller_state`."""

    ticks_per_decision: int = Field(default=1, ge=1, description="telemetry ticks per controller decision")
    seed: int = Field(default=0, description="cold-start seed (mixed with the domain name)")


def _domain_seed(domain: str, seed: int) -> int:
    return (zlib.crc32(domain.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


def _ts_param(store: MetaStore, ts: str) -> object:
    """A timestamp bind parameter in the form the dialect compares correctly."""
    stamp = pd.Timestamp(ts).tz_convert("UTC")
    if store.dialect == "sqlite":  # stored as text in SQLAlchemy's SQLite format
        return stamp.strftime("%Y-%m-%d %H:%M:%S.%f")
    return stamp.to_pydatetime()


def _lock_domain(conn, store: MetaStore, domain: str) -> None:
    """Serialize concurrent runs of one domain (SQLite's BEGIN IMMEDIATE already does)."""
    if store.dialect == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(k)s)", {"k": _domain_seed("controller_state:" + domain, 0)})


def _early_transfer_check(state: ControllerState, telemetry: pd.DataFrame, latest, cfg: ControllerConfig,
                          seed: int) -> tuple[ControllerState, str | None]:
    """A cold-started domain whose first ticks AT the prior's knobs fall below anything the fleet
    saw under it drops the prior at once (priors.early_negative_transfer) and tunes from scratch,
    instead of waiting for the controller's own guard, which needs its window of decisions."""
    if latest is None or state.decisions > 0 or state.prior_disabled or telemetry.empty:
        return state, None
    low = latest.details.get("expected_reward_low")
    knob_cols = [f"knob_{n}" for n in KNOB_NAMES]
    reported = telemetry[knob_cols].to_numpy(dtype=float)
    at_prior = np.all(np.isclose(reported, [state.knobs[n] for n in KNOB_NAMES], atol=1e-9) | np.isnan(reported), axis=1)
    head = telemetry[at_prior].head(EARLY_PROBE_TICKS)
    if len(head) < EARLY_PROBE_TICKS:
        return state, None
    rewards = meta_reward(head["gain_p50"], head["stability_mean"], head["vram_utilization"], head["latency_ms"])
    negative, why = early_negative_transfer(np.asarray(rewards), low, min_ticks=EARLY_PROBE_TICKS)
    if not negative:
        return state, None
    fresh = cold_start(None, cfg, seed=seed)
    fresh.last_ts = state.last_ts
    fresh.prior_disabled = True
    fresh.prior_disabled_reason = why
    return fresh, why


def _state_row(domain: str, state: ControllerState, now: pd.Timestamp, config_version: int | None) -> pd.DataFrame:
    return pd.DataFrame(
        [{
            "domain": domain,
            "knobs_json": json.dumps(state.knobs, sort_keys=True),
            "cooldowns_json": json.dumps(state.cooldowns, sort_keys=True),
            "reward_ema": state.reward_ema,
            "rollbacks": state.rollbacks,
            "decisions": state.decisions,
            "updated_at": now,
            "state_json": state.to_json(),
            "last_ts": pd.Timestamp(state.last_ts) if state.last_ts else pd.NaT,
            "config_version": config_version,
        }]
    )


def _decision_rows(domain: str, decisions: list[dict], now: pd.Timestamp) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "domain": domain,
            "decision_no": [d["decision_no"] for d in decisions],
            "decided_at": now,
            "reward": [d["reward"] for d in decisions],
            "reward_ema": [d["reward_ema"] for d in decisions],
            "rolled_back": [bool(d["rolled_back"]) for d in decisions],
            "policy_updates_json": [json.dumps(d["policy_updates"], sort_keys=True) for d in decisions],
            "knobs_json": [json.dumps(d["knobs"], sort_keys=True) for d in decisions],
            "telemetry_json": [json.dumps(d["telemetry"]) for d in decisions],
            "note": [d["note"] for d in decisions],
        }
    )


def _trajectory_figure(history: pd.DataFrame, domain: str) -> Figure:
    """Reward (per decision and EMA, rollbacks marked) above the knob trajectories in unit space."""
    fig = Figure(figsize=(10, 6))
    ax_reward, ax_knobs = fig.subplots(2, 1, sharex=True)
    x = history["decision_no"].to_numpy()
    ax_reward.plot(x, history["reward"], lw=0.8, alpha=0.6, label="batch reward")
    ax_reward.plot(x, history["reward_ema"], lw=1.6, label="reward EMA")
    rolled = history["rolled_back"].to_numpy(dtype=bool)
    if rolled.any():
        ax_reward.scatter(x[rolled], history["reward"].to_numpy()[rolled], color="tab:red", zorder=3, s=18,
                          label="rollback")
    ax_reward.set_ylabel("meta-reward")
    ax_reward.legend(fontsize=8, loc="lower right")
    units = np.array([knobs_to_unit(json.loads(k)) for k in history["knobs_json"]])
    for j, name in enumerate(KNOB_NAMES):
        ax_knobs.step(x, units[:, j], where="post", lw=1.2, label=name)
    ax_knobs.set_ylim(-0.05, 1.05)
    ax_knobs.set_ylabel("knob (0 = low bound, 1 = high)")
    ax_knobs.set_xlabel("decision")
    ax_knobs.legend(fontsize=7, ncol=3, loc="upper left")
    fig.suptitle(f"{domain}: controller, last {len(history)} decisions")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name="governance",
    tags={"meta_pipeline/area": "governance"},
    deps=["telemetry", "global_prior"],
    kinds={"sql", "numpy"},
    description=(
        "The integrative layer's controller of a domain: one decision per batch of new telemetry "
        "(meta-reward, bounded one-knob trials with cooldowns, canary rollback to the snapshot), "
        "cold-started from the newest global_prior. Every decision is appended to meta_decisions."
    ),
)
def controller_state(
    context: dg.AssetExecutionContext, config: ControllerRunConfig, store: MetaStore
) -> dg.MaterializeResult:
    domain = partition_domain(context)
    cfg = ControllerConfig(ticks_per_decision=config.ticks_per_decision)
    now = pd.Timestamp.now(tz="UTC")
    notes: list[str] = []
    external = False
    with store.write() as conn:
        # read, decide and write in one transaction: a crash or a bad tick leaves the previous state
        _lock_domain(conn, store, domain)
        row = store.read("controller_state", domain=domain, conn=conn)
        latest = read_global_prior(store, conn=conn)
        prior = latest.values if latest is not None else None
        if len(row) and isinstance(row["state_json"].iloc[0], str):
            state = ControllerState.from_json(row["state_json"].iloc[0])
            published = clip_knobs({k: v for k, v in json.loads(row["knobs_json"].iloc[0]).items() if k in KNOBS})
            if published != state.knobs:
                # someone set the domain's knobs by hand: canary them like any change
                state = inject_change(state, published, cfg, note="external")
                external = True
                notes.append(f"knobs_json edited outside the controller: {published} canaried as an external change")
        elif len(row):  # a row without the controller's memory: keep its knobs, start fresh
            knobs = clip_knobs({k: v for k, v in json.loads(row["knobs_json"].iloc[0]).items() if k in KNOBS})
            state = cold_start(prior, cfg, seed=_domain_seed(domain, config.seed))
            state.knobs = knobs
            notes.append("controller_state row had no state_json: started fresh at its knobs")
        else:
            state = cold_start(prior, cfg, seed=_domain_seed(domain, config.seed))
            notes.append(f"cold start from global_prior v{latest.version}" if latest is not None
                         else "cold start from the default knobs (no global_prior yet)")
        # an applied META_KNOBS config (an approved proposal) is adopted once, as a canaried change:
        # if it hurts, the controller rolls it back like any change, and says so in meta_decisions
        adopted = int(row["config_version"].iloc[0]) if len(row) and pd.notna(row["config_version"].iloc[0]) else 0
        active = active_config(store, "META_KNOBS", domain)
        if active is not None and active[0] > adopted:
            approved = clip_knobs({k: v for k, v in active[1].items() if k in KNOBS})
            if approved != state.knobs:
                state = inject_change(state, approved, cfg, note=f"configs v{active[0]}")
                external = True
            notes.append(f"adopted applied META_KNOBS config v{active[0]} (canaried like any change)")
            adopted = active[0]
        where, params = (None, None) if state.last_ts is None else ("ts > :last_ts", {"last_ts": _ts_param(store, state.last_ts)})
        telemetry = store.read("telemetry", domain=domain, columns=TELEMETRY_COLUMNS, where=where, params=params,
                               order_by="ts", conn=conn)
        state, dropped_prior = _early_transfer_check(state, telemetry, latest, cfg, _domain_seed(domain, config.seed))
        if dropped_prior:
            prior = None
            notes.append(dropped_prior)
            external = True
        try:
            new_state, decisions = advance(state, telemetry, cfg, prior)
        except TelemetryError as exc:
            raise dg.Failure(
                description=f"controller_state[{domain}]: telemetry rejected, nothing written: {exc}",
                metadata={"domain": domain, "new_ticks": len(telemetry), "last_ts": str(state.last_ts)},
            ) from exc
        if decisions or not len(row) or external:
            store.replace_partition("controller_state", domain, _state_row(domain, new_state, now, adopted or None),
                                    conn=conn)
        if decisions:
            store.append("meta_decisions", _decision_rows(domain, decisions, now), conn=conn)

    metadata: dict[str, dg.MetadataValue] = {
        "decisions_made": dg.MetadataValue.int(len(decisions)),
        "ticks_consumed": dg.MetadataValue.int(len(telemetry)),
        "decisions_total": dg.MetadataValue.int(new_state.decisions),
        "rollbacks_this_run": dg.MetadataValue.int(sum(bool(d["rolled_back"]) for d in decisions)),
        "rollbacks_total": dg.MetadataValue.int(new_state.rollbacks),
        "reward_ema": dg.MetadataValue.float(float(new_state.reward_ema)) if new_state.reward_ema is not None
        else dg.MetadataValue.text("n/a"),
        "knobs": dg.MetadataValue.json(new_state.knobs),
        "cooldowns": dg.MetadataValue.json(new_state.cooldowns),
        "prior_weight": dg.MetadataValue.float(float(new_state.prior_weight)),
        "prior_disabled": dg.MetadataValue.bool(bool(new_state.prior_disabled)),
        "last_ts": dg.MetadataValue.text(str(new_state.last_ts)),
    }
    if new_state.prior_disabled_reason:
        metadata["prior_disabled_reason"] = dg.MetadataValue.text(new_state.prior_disabled_reason)
    if not decisions:
        status = f"no new telemetry since {state.last_ts}: no decision made, nothing changed"
        if not len(row):
            status = "no telemetry yet: cold-start state written, no decision made"
        elif external:
            status = "no new telemetry: the hand-set knobs are now a pending change awaiting their canary"
        context.log.info(f"{domain}: {status}")
        metadata["status"] = dg.MetadataValue.text(status)
    else:
        metadata["status"] = dg.MetadataValue.text(
            f"{len(decisions)} decision(s) on {len(telemetry)} new tick(s); "
            f"{sum(bool(d['rolled_back']) for d in decisions)} rollback(s)"
        )
        shown = pd.DataFrame(
            [{"decision": d["decision_no"], "action": d["action"], "reward": d["reward"], "reward_ema": d["reward_ema"],
              "updates": json.dumps(d["policy_updates"]), "note": d["note"][:120]} for d in decisions[-20:]]
        )
        metadata["recent_decisions"] = table_preview(shown)
        history = store.read("meta_decisions", domain=domain,
                             columns=["decision_no", "reward", "reward_ema", "rolled_back", "knobs_json"],
                             where="decision_no > :since", params={"since": new_state.decisions - PLOT_DECISIONS},
                             order_by="decision_no")
        if len(history):
            metadata["trajectory"] = plot_metadata(_trajectory_figure(history, domain), "controller trajectory")
    if notes:
        metadata["notes"] = dg.MetadataValue.text("; ".join(notes))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=controller_state,
    partitions_def=domain_partitions,
    description="Every knob in the domain's controller_state is a known knob within its bounds (int/bool knobs integral).",
)
def controller_knobs_within_bounds(context: dg.AssetCheckExecutionContext, store: MetaStore) -> dg.AssetCheckResult:
    domain = partition_domain(context)
    row = store.read("controller_state", domain=domain, columns=["knobs_json", "decisions"])
    if row.empty:
        return dg.AssetCheckResult(passed=True, metadata={"status": "no controller_state row yet"})
    knobs = json.loads(row["knobs_json"].iloc[0])
    problems = knob_bound_problems(knobs)
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"knobs": dg.MetadataValue.json(knobs), "problems": dg.MetadataValue.text("; ".join(problems) or "none")},
    )
