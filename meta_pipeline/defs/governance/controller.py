"""`controller_state`: the integrative layer's controller for one domain, advanced by new telemetry.

The policy (resume / cold start, hand-edited knobs, adopting an applied config, early
negative transfer) is ``meta_pipeline.meta.controller_policy.step_domain`` and the
decision math ``meta_pipeline.meta.controller``; this asset reads the domain's inputs,
calls ``step_domain`` and writes the new state plus one `meta_decisions` row per
decision in ONE transaction (under the domain's lock). A sensor requests it when
telemetry arrives; re-materializing without new telemetry changes nothing.
"""

import json

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from meta_pipeline.defs.resources import StoreParam, domain_partitions, partition_domain, plot_metadata, table_preview
from meta_pipeline.knobs import KNOB_NAMES, knobs_to_unit
from meta_pipeline.meta.controller import ControllerConfig, TelemetryError, knob_bound_problems
from meta_pipeline.meta.controller_policy import TELEMETRY_COLUMNS, decision_rows, state_row, step_domain
from meta_pipeline.defs.learning.assets import SOURCE_COLUMNS, TRADE_COLUMNS
from meta_pipeline.learning.predict import override_model
from meta_pipeline.meta.knob_screen import (
    FAMILY_ALPHA,
    SCREEN_BUDGET,
    SCREEN_FOLD_DAYS,
    SCREEN_FOLDS,
    ScreenConfig,
    screen_knobs,
)
from meta_pipeline.meta.knob_trial import (
    LEARNING_KNOBS,
    MIN_PAIRED_TRADES,
    PAIRED_MAX_TRADES,
    SourceFrames,
    counterfactual_trial,
    trial_readiness,
)
from meta_pipeline.meta.reward import (
    REALIZED_CYCLES,
    REALIZED_MIN_TRADES,
    W_GAIN,
    W_REALIZED,
    W_RESOURCE,
    W_STABILITY,
    RewardWeights,
)
from meta_pipeline.meta.shift import SHIFT_FEATURES
from meta_pipeline.store import lock

PLOT_DECISIONS = 300  # how many recent decisions the trajectory plot shows


class ControllerRunConfig(dg.Config):
    """Run config of `controller_state`."""

    ticks_per_decision: int = Field(default=1, ge=1, description="telemetry ticks per controller decision")
    seed: int = Field(default=0, description="cold-start seed (mixed with the domain name)")
    # the reward's weights (meta.reward.RewardWeights; docs/math.md "Realized gain in the reward")
    w_gain: float = Field(default=W_GAIN, ge=0.0, le=10.0, description="weight of the engines' gain_p50 term")
    w_stability: float = Field(default=W_STABILITY, ge=0.0, le=10.0, description="weight of stability_mean")
    w_resource: float = Field(default=W_RESOURCE, ge=0.0, le=10.0, description="weight of the resource penalty")
    w_realized: float = Field(default=W_REALIZED, ge=0.0, le=10.0,
                              description="weight of the realized predictive gain of the overrides (feedback_cycles)")
    realized_cycles: int = Field(default=REALIZED_CYCLES, ge=1, description="recent feedback cycles pooled")
    realized_min_trades: int = Field(default=REALIZED_MIN_TRADES, ge=1,
                                     description="scored trades needed before the realized gain counts")
    paired_learning_trials: bool = Field(
        default=True, description="judge a learning-knob trial paired on realized trades (meta.knob_trial), "
                                  "never on telemetry")
    min_paired_trades: int = Field(default=MIN_PAIRED_TRADES, ge=2,
                                   description="realized trades after the post-change overrides version before judging")
    max_paired_trades: int = Field(default=PAIRED_MAX_TRADES, ge=2,
                                   description="a paired trial is decided at the latest on this many realized trades")
    screen_learning_knobs: bool = Field(
        default=False, description="with no trial pending, screen learning-knob candidates counterfactually on "
                                   "realized trades (meta.knob_screen) and start the qualifying pick as the live "
                                   "trial; costs ≤ (screen_budget + 1) × screen_folds override refits per run")
    screen_budget: int = Field(default=SCREEN_BUDGET, ge=1, le=100, description="candidates fitted per screen")
    screen_folds: int = Field(default=SCREEN_FOLDS, ge=1, le=10, description="walk-forward folds the screen scores")
    screen_fold_days: float = Field(default=SCREEN_FOLD_DAYS, gt=0.0, description="days between the folds' fit times")
    screen_family_alpha: float = Field(default=FAMILY_ALPHA, gt=0.0, lt=1.0,
                                       description="the screen's family-wise false-pick rate (Bonferroni)")

    def controller_config(self) -> ControllerConfig:
        weights = RewardWeights(self.w_gain, self.w_stability, self.w_resource, self.w_realized,
                                self.realized_cycles, self.realized_min_trades)
        return ControllerConfig(ticks_per_decision=self.ticks_per_decision, reward_weights=weights,
                                paired_knobs=LEARNING_KNOBS if self.paired_learning_trials else (),
                                paired_max_trades=self.max_paired_trades)


def _paired_judge(store, domain: str, min_trades: int):
    """The controller's paired judge for one domain (``knob_trial.paired_step``): ready when an overrides
    version built with the new knobs after the change has ``min_trades`` realized trades after its as_of;
    then the stored version (new arm) and a refit with the old knobs as of the same as_of (old arm)
    score those trades."""

    def judge(state):
        versions = store.override_versions(domain)
        trades = store.read("trades", domain=domain, columns=TRADE_COLUMNS, order_by=["closed_at", "trade_id"])
        version, why = trial_readiness(state, versions, trades["closed_at"], min_trades)
        if version is None:
            return None, why
        frames = SourceFrames(trades, *(store.read(t, domain=domain, columns=SOURCE_COLUMNS[t])
                                        for t in ("trade_patterns", "trade_scope", "trade_metrics")))
        new_model = override_model(store, domain, version=int(version["version"]))
        trial = counterfactual_trial(frames, pd.Timestamp(version["as_of"]), state.snapshot["knobs"],
                                     new_model=new_model, drift_events=store.read("drift_events", domain=domain))
        trial.version = int(version["version"])
        return trial, ""

    return judge


def _paired_screen(store, domain: str, config: "ControllerRunConfig"):
    """The controller's counterfactual knob screen for one domain (``knob_screen.screen_step``): the domain's
    source tables and drift breaks, candidates refitted as of the folds' times, scored paired vs the incumbent."""
    screen_cfg = ScreenConfig(budget=config.screen_budget, folds=config.screen_folds,
                              fold_days=config.screen_fold_days, family_alpha=config.screen_family_alpha)

    def screen(state):
        trades = store.read("trades", domain=domain, columns=TRADE_COLUMNS, order_by=["closed_at", "trade_id"])
        if trades.empty:
            return None
        frames = SourceFrames(trades, *(store.read(t, domain=domain, columns=SOURCE_COLUMNS[t])
                                        for t in ("trade_patterns", "trade_scope", "trade_metrics")))
        return screen_knobs(frames, state.knobs, pd.Timestamp.now(tz="UTC"), screen_cfg,
                            drift_events=store.read("drift_events", domain=domain))

    return screen


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
    context: dg.AssetExecutionContext, config: ControllerRunConfig, store: StoreParam
) -> dg.MaterializeResult:
    domain = partition_domain(context)
    cfg = config.controller_config()
    now = pd.Timestamp.now(tz="UTC")
    with store.write() as conn:
        # read, decide and write in one transaction: a crash or a bad tick leaves the previous state
        lock(conn, f"controller_state/{domain}")
        row = store.read("controller_state", domain=domain, conn=conn)

        def new_ticks(last_ts: str | None) -> pd.DataFrame:
            return store.read("telemetry", domain=domain, columns=TELEMETRY_COLUMNS, order_by="ts", conn=conn,
                              after=None if last_ts is None else {"ts": last_ts})

        try:
            step = step_domain(domain, row, store.read_global_prior(conn=conn),
                               store.active_config("META_KNOBS", domain, conn=conn), new_ticks, cfg, config.seed,
                               feedback_cycles=store.read("feedback_cycles", domain=domain, conn=conn),
                               paired_judge=(_paired_judge(store, domain, config.min_paired_trades)
                                             if cfg.paired_knobs else None), now=now,
                               paired_screen=(_paired_screen(store, domain, config)
                                              if cfg.paired_knobs and config.screen_learning_knobs else None),
                               # read only at a cold start: the fleet's priors and telemetry for the warm start
                               warm_start_inputs=lambda: (store.read("domain_priors", conn=conn),
                                                          store.read("telemetry", columns=["domain", *SHIFT_FEATURES],
                                                                     conn=conn)))
        except TelemetryError as exc:
            raise dg.Failure(
                description=f"controller_state[{domain}]: telemetry rejected, nothing written: {exc}",
                metadata={"domain": domain},
            ) from exc
        if step.changed:
            store.replace_partition("controller_state", domain, state_row(domain, step.state, now, step.adopted_version),
                                    conn=conn)
        if step.decisions:
            store.append("meta_decisions", decision_rows(domain, step.decisions, now), conn=conn)
    state, new_state, decisions, notes = step.before, step.state, step.decisions, step.notes
    for why in step.fallbacks:  # a sustained drop (meta.fallback): the controller is back at the safe defaults
        context.log.warning(f"{domain}: controller fell back to the safe defaults: {why}")
    external = step.external

    metadata: dict[str, dg.MetadataValue] = {
        "decisions_made": dg.MetadataValue.int(len(decisions)),
        "ticks_consumed": dg.MetadataValue.int(step.n_ticks),
        "decisions_total": dg.MetadataValue.int(new_state.decisions),
        "rollbacks_this_run": dg.MetadataValue.int(sum(bool(d["rolled_back"]) for d in decisions)),
        "rollbacks_total": dg.MetadataValue.int(new_state.rollbacks),
        "reward_ema": dg.MetadataValue.float(float(new_state.reward_ema)) if new_state.reward_ema is not None
        else dg.MetadataValue.text("n/a"),
        "knobs": dg.MetadataValue.json(new_state.knobs),
        "cooldowns": dg.MetadataValue.json(new_state.cooldowns),
        "prior_weight": dg.MetadataValue.float(float(new_state.prior_weight)),
        "prior_disabled": dg.MetadataValue.bool(bool(new_state.prior_disabled)),
        "prior_source": dg.MetadataValue.text(str(new_state.prior_source)),
        "fallbacks_this_run": dg.MetadataValue.int(len(step.fallbacks)),
        "last_ts": dg.MetadataValue.text(str(new_state.last_ts)),
    }
    if new_state.prior_disabled_reason:
        metadata["prior_disabled_reason"] = dg.MetadataValue.text(new_state.prior_disabled_reason)
    if not decisions:
        status = f"no new telemetry since {state.last_ts}: no decision made, nothing changed"
        if not step.had_row:
            status = "no telemetry yet: cold-start state written, no decision made"
        elif external:
            status = "no new telemetry: the hand-set knobs are now a pending change awaiting their canary"
        context.log.info(f"{domain}: {status}")
        metadata["status"] = dg.MetadataValue.text(status)
    else:
        metadata["status"] = dg.MetadataValue.text(
            f"{len(decisions)} decision(s) on {step.n_ticks} new tick(s); "
            f"{sum(bool(d['rolled_back']) for d in decisions)} rollback(s)"
        )
        shown = pd.DataFrame(
            [{"decision": d["decision_no"], "action": d["action"], "reward": d["reward"], "reward_ema": d["reward_ema"],
              "updates": json.dumps(d["policy_updates"]), "note": d["note"][:120]} for d in decisions[-20:]]
        )
        metadata["recent_decisions"] = table_preview(shown)
        history = store.read("meta_decisions", domain=domain,
                             columns=["decision_no", "reward", "reward_ema", "rolled_back", "knobs_json"],
                             after={"decision_no": new_state.decisions - PLOT_DECISIONS}, order_by="decision_no")
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
def controller_knobs_within_bounds(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
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
