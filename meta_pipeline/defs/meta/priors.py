"""Knob priors as assets: ``domain_priors`` per domain, ``global_prior`` across the fleet.

The math lives in ``meta_pipeline.meta.priors`` (and ``meta.shift``); these assets read
the store, call it, write the table and describe the result.
"""

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from meta_pipeline.contracts import knob_column
from meta_pipeline.defs.resources import (
    StoreParam,
    domain_partitions,
    partition_domain,
    plot_metadata,
    table_preview,
)
from meta_pipeline.knobs import KNOB_NAMES, KNOBS
from meta_pipeline.meta import priors as priors_core
from meta_pipeline.meta.reward import telemetry_reward
from meta_pipeline.meta.shift import SHIFT_FEATURES

GLOBAL_PRIOR_GROUP = "fleet"  # cross-domain, unpartitioned assets live in group "fleet" (defs/jobs.py)


def _reward_vs_knobs_figure(telemetry: pd.DataFrame, priors: pd.DataFrame, domain: str) -> Figure:
    reward = telemetry_reward(telemetry)
    fig = Figure(figsize=(11, 6))
    axes = fig.subplots(2, 3).ravel()
    by_knob = priors.set_index("knob") if len(priors) else pd.DataFrame()
    for ax, name in zip(axes, KNOB_NAMES):
        col = knob_column(telemetry, name)
        if col is None:
            ax.set_axis_off()
            continue
        ax.scatter(telemetry[col], reward, s=6, alpha=0.35, color="tab:blue")
        if name in by_knob.index:
            ax.axvline(by_knob.at[name, "mean"], color="tab:orange", lw=1.2, label="reward-weighted mean")
            ax.axvline(by_knob.at[name, "best_value"], color="tab:red", lw=1.5, ls="--", label="best value")
        ax.set_xlim(KNOBS[name].low, KNOBS[name].high)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("meta-reward", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{domain}: reward vs knob value ({len(telemetry)} ticks)")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name="meta",
    deps=["telemetry"],
    kinds={"sql", "pandas"},
    description=(
        "Per domain and knob: the reward-weighted distribution of the knob values seen in telemetry "
        "(mean, std, n_obs), the best value (quadratic response-surface vertex, else top-decile mean) "
        "and its reward. A domain without telemetry has no prior (zero rows; the global prior ignores it)."
    ),
)
def domain_priors(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    domain = partition_domain(context)
    telemetry = store.read("telemetry", domain=domain)
    priors = priors_core.domain_priors(telemetry)
    rows = priors[priors_core.PRIOR_COLUMNS].copy()
    rows["updated_at"] = pd.Timestamp.now(tz="UTC")
    # replace the domain's rows in one transaction: also clears a stale prior when the
    # telemetry no longer reports a knob
    written = store.replace_partition("domain_priors", domain, rows)
    metadata: dict[str, dg.MetadataValue] = {
        "dagster/row_count": dg.MetadataValue.int(written),
        "telemetry_ticks": dg.MetadataValue.int(len(telemetry)),
        "priors": table_preview(priors),
    }
    if priors.empty:
        reason = "no telemetry" if telemetry.empty else "telemetry reports no knob values"
        context.log.warning(f"domain {domain!r}: {reason}; no prior written (the global prior ignores this domain)")
        metadata["status"] = dg.MetadataValue.text(f"{reason}: no prior")
    else:
        metadata["status"] = dg.MetadataValue.text("ok")
        metadata["reward_vs_knobs"] = plot_metadata(_reward_vs_knobs_figure(telemetry, priors, domain), "reward vs knobs")
    return dg.MaterializeResult(metadata=metadata)


class GlobalPriorSettings(dg.Config):
    """Run config of ``global_prior`` (defaults = GlobalPriorConfig's)."""

    beta: float = 2.0
    reward_coef: float = 5.0
    outlier_z: float = 3.5
    eps0: float = 0.5
    eps_min: float = 0.1
    anneal_versions: int = 20
    shift_method: str = "mmd"
    shift_max_ticks: int = 300
    seed: int = 0


def _global_prior_figure(details: dict, theta: dict[str, float], by_domain: dict[str, pd.DataFrame]) -> Figure:
    fig = Figure(figsize=(12, 4.5))
    ax_w, ax_k = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    names = list(details["domains"])
    weights = [details["domains"][d]["weight"] for d in names]
    colors = ["tab:red" if details["domains"][d]["outlier"] else "tab:blue" for d in names]
    ax_w.barh(names, weights, color=colors)
    ax_w.set_xlabel("weight (red = dropped as outlier)")
    ax_w.set_title("domain weights")
    x = np.arange(len(KNOB_NAMES))
    for d in names:
        vec = priors_core.prior_vector(by_domain[d], details["config"]["center"])
        ax_k.scatter(x, vec, s=18, alpha=0.6, color="tab:red" if details["domains"][d]["outlier"] else "tab:gray")
    ax_k.scatter(x, [details["target_unit"][k] for k in KNOB_NAMES], marker="_", s=400, color="tab:orange",
                 label="weighted mean (Reptile target)")
    ax_k.scatter(x, [details["theta_unit"][k] for k in KNOB_NAMES], marker="*", s=140, color="tab:green",
                 label=f"global prior v{details['version']} (ε={details['epsilon']:.2f})")
    ax_k.set_xticks(x, KNOB_NAMES, rotation=20, fontsize=8)
    ax_k.set_ylim(-0.05, 1.05)
    ax_k.set_ylabel("unit space (knob bounds → [0,1])")
    ax_k.legend(fontsize=8)
    ax_k.set_title("domain priors (dots) and the global prior")
    fig.tight_layout()
    return fig


@dg.asset(
    group_name=GLOBAL_PRIOR_GROUP,
    deps=[dg.AssetDep("domain_priors", partition_mapping=dg.AllPartitionMapping())],
    kinds={"sql", "numpy"},
    # "eager" = materialize whenever any domain_priors partition updates (once the
    # runs in progress finish), minus eager's "no dependency partition missing" clause:
    # a registered domain whose priors were never materialized (e.g. trades only)
    # must not hold back the fleet's prior forever. Needs the automation sensor
    # (Dagster creates `default_automation_condition_sensor` for it).
    automation_condition=dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()),
    description=(
        "Versioned, append-only cross-domain knob prior: domains weighted by evidence and reward with an "
        "entropy term, robust per-knob outlier filtering, shift-distance down-weighting, then an annealed "
        "Reptile step from the previous version. Materialized automatically when domain priors change. "
        "While no domain has a prior (a fleet without telemetry) no version is written and the metadata "
        "says why; everything downstream works without one."
    ),
)
def global_prior(
    context: dg.AssetExecutionContext, config: GlobalPriorSettings, store: StoreParam
) -> dg.MaterializeResult:
    """Append version max+1 of the global prior; never overwrites an earlier version.

    Automation: ``AutomationCondition.eager()`` without its missing-dependency clause, i.e.
    requested on the tick after any ``domain_priors`` partition is newly materialized,
    not while one is in progress, at most once per update.
    """
    priors_long = store.read("domain_priors")
    telemetry = store.read("telemetry", columns=["domain", *SHIFT_FEATURES])
    cfg = priors_core.GlobalPriorConfig(
        beta=config.beta, reward_coef=config.reward_coef, outlier_z=config.outlier_z,
        eps0=config.eps0, eps_min=config.eps_min, anneal_versions=config.anneal_versions,
    )
    shift = priors_core.ShiftSettings(config.shift_method, config.shift_max_ticks, config.seed)
    with store.write() as conn:
        # read the previous version inside the write transaction: version = max + 1 atomically
        previous = store.read_global_prior(conn=conn)
        before_previous = None if previous is None else store.read_global_prior(previous.version - 1, conn=conn)
        versions = fleet = None
        if before_previous is not None:  # the prior's canary: the fleet's decisions under the last two versions
            versions = store.read("global_prior", columns=["version", "created_at"], conn=conn)
            fleet = store.read("meta_decisions", columns=["domain", "decided_at", "reward"], conn=conn,
                               after={"decided_at": versions.loc[versions["version"] == before_previous.version,
                                                                 "created_at"].min()})
        try:
            built = priors_core.next_global_prior(priors_long, telemetry, previous, before_previous, fleet, versions,
                                                  cfg, shift)
        except priors_core.NoDomainPriors as exc:
            built = None
            why = str(exc)
        else:
            store.append("global_prior", built.rows, conn=conn)
    if built is None:
        # a fleet that sends trades only: nothing to aggregate, and nothing downstream needs it
        # (controllers cold-start from the knob defaults, diagnostics skip the global-prior gap)
        return _no_global_prior(context, previous, telemetry, why)
    if built.rollback is not None:
        rb = built.rollback
        context.log.warning(f"global_prior: v{built.version} restores v{rb['restored']} (rollback of v{rb['of']}): "
                            f"{rb['why']}")
        return dg.MaterializeResult(metadata={
            "status": dg.MetadataValue.text(f"version {built.version} written: ROLLBACK of v{rb['of']} to "
                                            f"v{rb['restored']}'s values"),
            "version": dg.MetadataValue.int(built.version),
            "rollback": dg.MetadataValue.text(rb["why"]),
            "fleet_reward_by_version": dg.MetadataValue.json(built.details["fleet_reward"]),
            "dagster/row_count": dg.MetadataValue.int(len(built.rows)),
            "prior": table_preview(built.knob_table()),
        })

    details, domain_table = built.details, built.domain_table()
    return dg.MaterializeResult(
        metadata={
            "status": dg.MetadataValue.text(f"version {built.version} written"),
            "version": dg.MetadataValue.int(built.version),
            "epsilon": dg.MetadataValue.float(float(details["epsilon"])),
            "n_domains": dg.MetadataValue.int(details["n_domains"]),
            "n_outlier_domains": dg.MetadataValue.int(int(domain_table["outlier"].sum())),
            "prior_check": dg.MetadataValue.text(details.get("prior_check", "no earlier version to compare")),
            "fleet_reward_by_version": dg.MetadataValue.json(details.get("fleet_reward", {})),
            "dagster/row_count": dg.MetadataValue.int(len(built.rows)),
            "prior": table_preview(built.knob_table()),
            "domains": table_preview(domain_table, max_rows=50),
            "weights_and_priors": plot_metadata(_global_prior_figure(details, built.theta, built.by_domain),
                                                "global prior"),
        }
    )


NO_PRIOR_STATUS = "no domain has telemetry: no global prior version written"


def _no_global_prior(context: dg.AssetExecutionContext, previous, telemetry: pd.DataFrame, why: str
                     ) -> dg.MaterializeResult:
    """No domain has a prior (e.g. a trades-only fleet): no version written, and the metadata says why."""
    if telemetry.empty:
        status = NO_PRIOR_STATUS
    else:
        with_ticks = sorted(telemetry["domain"].dropna().unique())
        status = (f"no domain prior yet although {len(with_ticks)} domain(s) have telemetry "
                  f"({', '.join(with_ticks[:5])}{', …' if len(with_ticks) > 5 else ''}): materialize their "
                  "domain_priors (telemetry without knob values gives none); no global prior version written")
    if previous is not None:
        status += f" (version {previous.version} stays the newest)"
    context.log.warning(f"global_prior: {status}")
    return dg.MaterializeResult(metadata={
        "status": dg.MetadataValue.text(status),
        "detail": dg.MetadataValue.text(why),
        "n_domains": dg.MetadataValue.int(0),
        "dagster/row_count": dg.MetadataValue.int(0),
    })
