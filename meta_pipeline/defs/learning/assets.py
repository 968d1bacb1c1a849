"""The learning jobs as assets, one per table, partitioned by domain.

Each asset reads its inputs from the store, calls one core function from
``meta_pipeline.learning``, replaces its table's rows for the domain (one transaction)
and describes the result. Assets talk through the store (``deps``, no IO managers):

    trades ─┬─ lessons ─┬─ edge_history ── half_life_fits ─┐
            │           └─ latent_factors ─────────────────┼─ pm_overrides
            └─ regime_weights ─────────────────────────────┘

One writer per table. The one shared table is by column: ``learning_lessons.latent_factor_id``
is owned by ``latent_factors`` (``MetaStore.set_lesson_factors`` fills it from the
``latent_factors`` rows in the same transaction that writes them, so the two never
disagree); every other column is owned by ``lessons``, which writes the column empty
(factors need the lessons first).

``now`` for the overrides is the domain's newest trade (the time the data describes),
not the wall clock: re-materializing the same data gives the same rows.
"""


import hashlib
import json
from typing import NamedTuple

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from meta_pipeline.knobs import KnobsInEffect
from meta_pipeline.learning import factors as factors_core
from meta_pipeline.learning import feedback as feedback_core
from meta_pipeline.learning import halflife as halflife_core
from meta_pipeline.learning import lessons as lessons_core
from meta_pipeline.learning import overrides as overrides_core
from meta_pipeline.learning import regime as regime_core
from meta_pipeline.defs.resources import (
    StoreParam,
    domain_partitions,
    partition_domain,
    plot_metadata,
    release_freed_memory,
    table_preview,
)

GROUP = "learning"
# what the learning cores use of a trade (strategy_id is the diagnostics' business: not read here)
TRADE_COLUMNS = ["trade_id", "closed_at", "regime", "return_r"]


# ---------------------------------------------------------------------------
# store reads shared by the assets
# ---------------------------------------------------------------------------


AS_OF_TAG = "meta_pipeline/as_of"  # a run tag: learn only from trades closed at or before it (replay)


class _Window(NamedTuple):
    """What a learning run may learn from: trades up to ``as_of`` (None = all), patterns within their break windows."""

    as_of: pd.Timestamp | None
    breaks: pd.DataFrame  # feedback.break_windows: per affected pattern, where its fit window starts

    @property
    def key(self) -> tuple:
        digest = hashlib.sha1(self.breaks.to_json(date_format="iso").encode()).hexdigest() if len(self.breaks) else ""
        return (None if self.as_of is None else self.as_of.isoformat(), digest)


def _run_as_of(context: dg.AssetExecutionContext) -> pd.Timestamp | None:
    """The run's as_of tag (replay), or None: learn from every trade."""
    try:
        raw = context.run.tags.get(AS_OF_TAG)
    except dg.DagsterError:  # invoked directly (the bench): no run, no tag
        return None
    if not raw:
        return None
    try:
        stamp = pd.Timestamp(raw)
    except ValueError as exc:
        raise dg.Failure(f"run tag {AS_OF_TAG}={raw!r} is not an ISO-8601 time") from exc
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _window(store: StoreParam, domain: str, as_of: pd.Timestamp | None) -> _Window:
    """The run's learning window, computed once per run: the as_of cutoff and the drift breaks it honours.

    Every learning asset reads ``drift_events`` through this, so any re-materialization
    (the drift sensor's, a schedule's, a click) favours post-break evidence for the
    patterns a break affected (feedback.break_windows).
    """
    def compute() -> _Window:
        events = store.read("drift_events", domain=domain, order_by="id")
        if as_of is not None and len(events):
            events = events[feedback_core.break_times(events) <= as_of]
        if events.empty:
            return _Window(as_of, pd.DataFrame(columns=feedback_core.BREAK_WINDOW_COLUMNS))
        trades = _all_trades(store, domain, as_of)
        (patterns,) = _all_source(store, domain, as_of, trades, "trade_patterns")
        return _Window(as_of, feedback_core.break_windows(trades, patterns, events))

    return store.run_memo(("learning_window", domain, store.source_version(domain),
                           None if as_of is None else as_of.isoformat()), compute)


def _all_trades(store: StoreParam, domain: str, as_of: pd.Timestamp | None) -> pd.DataFrame:
    # a fixed order: trade positions are the incidence's trade_idx, runs must agree
    trades = store.read("trades", domain=domain, columns=TRADE_COLUMNS, order_by=["closed_at", "trade_id"])
    if as_of is not None:
        trades = trades[trades["closed_at"] <= as_of]
    return trades.reset_index(drop=True)


def _all_source(store: StoreParam, domain: str, as_of: pd.Timestamp | None, trades: pd.DataFrame,
                *tables: str) -> list[pd.DataFrame]:
    frames = [store.read(t, domain=domain, columns=SOURCE_COLUMNS[t]) for t in tables]
    if as_of is None:
        return frames
    ids = set(trades["trade_id"])
    return [f[f["trade_id"].isin(ids)].reset_index(drop=True) for f in frames]


def _read_trades(store: StoreParam, domain: str, window: _Window) -> pd.DataFrame:
    return _all_trades(store, domain, window.as_of)


SOURCE_COLUMNS = {
    "trade_patterns": ["trade_id", "pattern"],
    "trade_scope": ["trade_id", "key", "value"],
    "trade_metrics": ["trade_id", "metric", "value"],
}


def _read_source(store: StoreParam, domain: str, window: _Window, *tables: str) -> list[pd.DataFrame]:
    """Source rows of the window's trades; pattern rows outside their pattern's break window left out."""
    if window.as_of is None and window.breaks.empty:
        return [store.read(t, domain=domain, columns=SOURCE_COLUMNS[t]) for t in tables]
    trades = _read_trades(store, domain, window)
    frames = _all_source(store, domain, window.as_of, trades, *tables)
    return [feedback_core.apply_break_windows(f, trades, window.breaks) if t == "trade_patterns" else f
            for t, f in zip(tables, frames)]


def _prefetch_source(store: StoreParam, domain: str, *tables: str) -> None:
    """Let the run's cache load source tables a later asset reads, on the second core, while this one computes."""
    store.prefetch([{"table_name": t, "domain": domain, "columns": SOURCE_COLUMNS[t]} for t in tables])


def _incidence_key(store: StoreParam, domain: str, lessons: pd.DataFrame, source: tuple) -> tuple:
    """What a lesson×trade incidence depends on: the source rows (their version) and the lessons, in order."""
    digest = hashlib.sha1("\x1f".join(lessons["lesson_key"].astype(str)).encode()).hexdigest()
    return ("lesson_incidence", domain, source, len(lessons), digest)


class _LessonInputs(NamedTuple):
    """What the assets downstream of ``lessons`` start from: the stored lessons, the trades, the source
    tables the asset asked for (None: not read), and the lessons' incidence on the trades."""

    lessons: pd.DataFrame
    trades: pd.DataFrame
    patterns: pd.DataFrame | None
    scope: pd.DataFrame | None
    incidence: pd.DataFrame


def _read_lesson_inputs(store: StoreParam, domain: str, window: _Window, *tables: str) -> _LessonInputs:
    """The stored lessons, the trades, the source ``tables`` the caller itself needs, and the incidence.

    The incidence comes once per run: ``lessons`` mines it and offers it to the run
    (store.remember); edge_history, latent_factors and pm_overrides, which each used to
    re-match the lessons on millions of pattern/scope rows, take it from there. Only
    outside a run, or when the lessons or the source rows differ from what was mined,
    are patterns and scope read to match them here. Why not always read them: at 5M
    trades they are ~1 GiB that the run's cache may have let go, read again for nothing.
    """
    source_rows = (store.source_version(domain), *window.key)  # before the reads it describes
    stored_lessons = store.read("learning_lessons", domain=domain)
    trades = _read_trades(store, domain, window)
    frames = dict(zip(tables, _read_source(store, domain, window, *tables)))

    def match() -> pd.DataFrame:
        missing = [t for t in ("trade_patterns", "trade_scope") if t not in frames]
        frames.update(zip(missing, _read_source(store, domain, window, *missing)))
        return lessons_core.match_lessons(stored_lessons, trades, frames["trade_patterns"], frames["trade_scope"])

    incidence = store.run_memo(_incidence_key(store, domain, stored_lessons, source_rows), match)
    return _LessonInputs(stored_lessons, trades, frames.get("trade_patterns"), frames.get("trade_scope"), incidence)


def _stored(df: pd.DataFrame, table_columns: list[str]) -> pd.DataFrame:
    """Only the table's columns; ±inf (unbounded CI ends) stored as null: SQL floats are finite."""
    out = df[[c for c in table_columns if c in df.columns]].copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].where(np.isfinite(out[col].to_numpy(dtype=float)), np.nan)
    return out


def _knob_metadata(knobs: KnobsInEffect) -> dict[str, dg.MetadataValue]:
    return {"knobs_source": dg.MetadataValue.text(knobs.source), "knobs": dg.MetadataValue.json(knobs.values)}


# ---------------------------------------------------------------------------
# lessons
# ---------------------------------------------------------------------------

LESSON_TABLE_COLUMNS = [c for c in lessons_core.LESSON_COLUMNS]


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=["trades"],
    kinds={"pandas", "sql"},
    description=(
        "Lessons mined from a domain's closed trades: every pattern at every subset (up to 2 keys) of the "
        "trade's scope, with support ≥ 30; n, mean edge, sd, s.e. and lower confidence bound "
        "(mean − lambda_ci·1.96·se, lambda_ci from the knobs). Table learning_lessons."
    ),
)
def lessons(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    release_freed_memory()  # what the run's previous step dropped: not part of this one's peak
    domain = partition_domain(context)
    knobs = store.knobs_in_effect(domain)  # read once per run: pm_overrides of this run sees the same
    window = _window(store, domain, _run_as_of(context))
    source_rows = (store.source_version(domain), *window.key)  # before the reads it describes
    _prefetch_source(store, domain, "trade_scope")  # two readers overlap a little (SQLite's C work frees the GIL)
    trades = _read_trades(store, domain, window)
    patterns, scope = _read_source(store, domain, window, "trade_patterns", "trade_scope")
    # after this step the incidence stands for the pattern rows (a drift window re-reads them): out of the
    # run's cache before the metrics land in it, so at 5M trades trades and scope are not evicted and read twice
    store.forget("trade_patterns", domain, SOURCE_COLUMNS["trade_patterns"])
    _prefetch_source(store, domain, "trade_metrics")  # regime_weights' and pm_overrides' input, during the mining
    mining = lessons_core.mining_settings(store.active_config("PM_OVERRIDES", domain))  # an applied PM_OVERRIDES config
    mined, incidence = lessons_core.mine_lessons(trades, patterns, scope, lambda_ci=float(knobs.values["lambda_ci"]),
                                                 min_support=mining.min_support, max_scope_dims=mining.max_scope_dims)
    store.remember(_incidence_key(store, domain, mined, source_rows), incidence)  # the stored lessons, in this order
    written = store.replace_partition("learning_lessons", domain, _stored(mined, LESSON_TABLE_COLUMNS))
    top = mined.reindex(mined["edge_lcb"].abs().sort_values(ascending=False).index) if len(mined) else mined
    if mined.empty:
        most = int(patterns["pattern"].value_counts().max()) if len(patterns) else 0
        context.log.warning(f"domain {domain!r} learns nothing: {len(trades)} trades, the most frequent pattern fired "
                            f"on {most} < min_support {mining.min_support}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(written),
            "trades": dg.MetadataValue.int(len(trades)),
            "patterns": dg.MetadataValue.int(int(mined["pattern"].nunique()) if len(mined) else 0),
            "incidence_pairs": dg.MetadataValue.int(len(incidence)),
            "mining_settings": dg.MetadataValue.text(
                f"min_support {mining.min_support}, max_scope_dims {mining.max_scope_dims} ({mining.source})"),
            "by_scope_keys": dg.MetadataValue.json(
                {str(k): int(v) for k, v in mined["n_scope_keys"].value_counts().sort_index().items()}
            ),
            "top_lessons_by_lcb": table_preview(
                top[["lesson_key", "n", "edge_mean", "edge_se", "edge_lcb", "first_seen", "last_seen"]]
            ),
            **_knob_metadata(knobs),
        }
    )


# ---------------------------------------------------------------------------
# edge history and half-lives
# ---------------------------------------------------------------------------


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=["trades", lessons],
    kinds={"pandas", "sql"},
    description=(
        "Per lesson and day with trades: n, edge and its s.e. The edge of a bucket is the lesson's mean return "
        "minus the same-day mean of all trades at the lesson's scope (its lift), so co-firing lessons and "
        "domain-wide drift are not mistaken for decay. Table learning_edge_history."
    ),
)
def edge_history(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    release_freed_memory()  # what the run's previous step dropped: not part of this one's peak
    domain = partition_domain(context)
    given = _read_lesson_inputs(store, domain, _window(store, domain, _run_as_of(context)), "trade_scope")
    history = lessons_core.compute_edge_history(given.lessons, given.trades, given.patterns, given.scope,
                                                lesson_trades=given.incidence)
    written = store.replace_partition("learning_edge_history", domain, _stored(history, lessons_core.EDGE_HISTORY_COLUMNS))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": dg.MetadataValue.int(written),
            "lessons": dg.MetadataValue.int(int(history["lesson_key"].nunique()) if len(history) else 0),
            "buckets": dg.MetadataValue.int(int(history["bucket_start"].nunique()) if len(history) else 0),
            "first_bucket": dg.MetadataValue.text(str(history["bucket_start"].min()) if len(history) else "-"),
            "last_bucket": dg.MetadataValue.text(str(history["bucket_start"].max()) if len(history) else "-"),
            "preview": table_preview(history),
        }
    )


def _decay_figure(history: pd.DataFrame, fits: pd.DataFrame, domain: str, n_top: int = 6) -> Figure | None:
    """Edge history of the best-evidenced lessons with their fitted curve e0·exp(−λ(t − t_ref))."""
    usable = fits[fits["state"] != "insufficient_data"]
    if usable.empty or history.empty:
        return None
    # most trades first, one lesson per pattern so the panels show different things
    pick = usable.assign(pattern=usable["lesson_key"].str.split("|").str[0]).sort_values(
        ["n_trades", "lesson_key"], ascending=[False, True]
    ).drop_duplicates("pattern").head(n_top)
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for ax, fit in zip(axes, pick.itertuples(index=False)):
        h = history[history["lesson_key"] == fit.lesson_key].sort_values("bucket_start")
        mid = h["bucket_start"] + pd.Timedelta(hours=12)
        ax.errorbar(mid, h["edge_mean"], yerr=h["edge_se"].fillna(0.0), fmt=".", ms=3, alpha=0.5, color="tab:blue")
        grid = pd.date_range(h["bucket_start"].min(), h["bucket_start"].max() + pd.Timedelta(days=1), periods=100)
        hours = (grid - pd.Timestamp(fit.t_ref)) / pd.Timedelta(hours=1)
        ax.plot(grid, fit.e0 * np.exp(-fit.decay_rate_per_hour * hours), color="tab:red", lw=1.8)
        hl = f", t½ = {fit.half_life_hours / 24:.1f} d" if np.isfinite(fit.half_life_hours or np.nan) else ""
        ax.set_title(f"{fit.lesson_key}\n{fit.state}{hl}", fontsize=8)
        ax.axhline(0.0, color="gray", lw=0.6)
        ax.tick_params(labelsize=7)
    for ax in axes[len(pick):]:
        ax.set_axis_off()
    fig.autofmt_xdate()
    fig.suptitle(f"{domain}: edge (lift over its scope's same-day mean) by day, fitted decay in red")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=[edge_history],
    kinds={"numpy", "sql"},
    description=(
        "Per lesson: fitted edge(t) = e0·exp(−λt) over its edge history (all lessons at once, profile-likelihood "
        "CI of λ on the HC3 sandwich noise with Satterthwaite dof), half-life ln2/λ with CI, and the state "
        "decaying / stable / improving / insufficient_data. "
        "Table half_life_fits (an unbounded CI end is stored as null)."
    ),
)
def half_life_fits(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    release_freed_memory()  # what the run's previous step dropped: not part of this one's peak
    domain = partition_domain(context)
    history = store.read("learning_edge_history", domain=domain)
    fits = halflife_core.fit_half_lives(history)
    written = store.replace_partition("half_life_fits", domain, _stored(fits, halflife_core.OUTPUT_COLUMNS))
    states = {str(k): int(v) for k, v in fits["state"].value_counts().items()} if len(fits) else {}
    metadata = {
        "dagster/row_count": dg.MetadataValue.int(written),
        "states": dg.MetadataValue.json(states),
        "ci_method": dg.MetadataValue.text("robust: HC3 sandwich noise, Satterthwaite dof, growth-support rule"),
        "median_half_life_days": dg.MetadataValue.float(
            float(np.nanmedian(fits["half_life_hours"]) / 24.0) if (fits["state"] == "decaying").any() else float("nan")
        ),
        "decaying": table_preview(
            fits[fits["state"] == "decaying"].sort_values("n_trades", ascending=False)[
                ["lesson_key", "e0", "half_life_hours", "half_life_ci_low", "half_life_ci_high", "n_buckets", "n_trades"]
            ]
        ),
    }
    fig = _decay_figure(history, fits, domain)
    if fig is not None:
        metadata["edge_history_with_fits"] = plot_metadata(fig, "edge history with fitted decay")
    return dg.MaterializeResult(metadata=metadata)


# ---------------------------------------------------------------------------
# latent factors
# ---------------------------------------------------------------------------


def _factor_figure(factors: pd.DataFrame, domain: str, n_top: int = 25) -> Figure:
    sizes = factors.drop_duplicates("latent_factor_id").sort_values(["factor_size", "latent_factor_id"], ascending=[False, True])
    sizes = sizes.head(n_top).iloc[::-1]
    fig = Figure(figsize=(8, 0.3 * len(sizes) + 1.5))
    ax = fig.subplots()
    ax.barh(sizes["latent_factor_id"], sizes["factor_size"], color="tab:purple")
    ax.set_xlabel("lessons in the factor")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"{domain}: latent factors ({factors['latent_factor_id'].nunique()} in all, largest {len(sizes)})")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=["trades", lessons],
    kinds={"scipy", "sql"},
    description=(
        "Lessons that are one bet under different names or scopes, linked by Jaccard (co-firing patterns) or "
        "containment (nested scopes) of their trade sets, from the sparse co-occurrence product; a factor is a "
        "connected component. Writes latent_factors and fills learning_lessons.latent_factor_id in one transaction."
    ),
)
def latent_factors(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    release_freed_memory()  # what the run's previous step dropped: not part of this one's peak
    domain = partition_domain(context)
    given = _read_lesson_inputs(store, domain, _window(store, domain, _run_as_of(context)))
    factors = factors_core.compute_latent_factors(given.lessons, given.trades, given.patterns, given.scope,
                                                  lesson_trades=given.incidence)
    with store.write() as conn:  # both or neither: the table and the column of learning_lessons it owns
        written = store.replace_partition("latent_factors", domain, factors, conn=conn)
        store.set_lesson_factors(conn, domain)
    sizes = factors.drop_duplicates("latent_factor_id")["factor_size"] if len(factors) else pd.Series(dtype=int)
    metadata = {
        "dagster/row_count": dg.MetadataValue.int(written),
        "factors": dg.MetadataValue.int(int(factors["latent_factor_id"].nunique()) if len(factors) else 0),
        "singletons": dg.MetadataValue.int(int((sizes == 1).sum())),
        "largest_factor": dg.MetadataValue.int(int(sizes.max()) if len(sizes) else 0),
        "factors_preview": table_preview(
            factors.drop_duplicates("latent_factor_id").sort_values("factor_size", ascending=False)
        ),
    }
    if len(factors):
        metadata["factor_sizes"] = plot_metadata(_factor_figure(factors, domain), "factor sizes")
    return dg.MaterializeResult(metadata=metadata)


# ---------------------------------------------------------------------------
# regime weights
# ---------------------------------------------------------------------------


def _weights_figure(weights: pd.DataFrame, domain: str) -> Figure:
    grid = weights.pivot(index="regime", columns="metric", values="weight")
    fig = Figure(figsize=(1.4 * grid.shape[1] + 2.5, 0.6 * grid.shape[0] + 2))
    ax = fig.subplots()
    bound = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=25, ha="right", fontsize=8)
    pooled = weights.drop_duplicates("regime").set_index("regime")["pooled"]
    ax.set_yticks(range(grid.shape[0]), [f"{r}{' (pooled)' if pooled.get(r, False) else ''}" for r in grid.index])
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="weight per 1 sd of the metric")
    ax.set_title(f"{domain}: regime × metric weights (alpha={weights['alpha'].iloc[0]:g})")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=["trades"],
    kinds={"numpy", "sql"},
    description=(
        "Per regime: ridge regression of return_r on the standardized metrics, pooled toward the all-regime "
        "weights, alpha by forward-chaining (time-ordered) CV; regimes with too few trades use the all-regime "
        "weights (pooled = true). Table learning_regime_weights; weight applies to (metric − center)/scale."
    ),
)
def regime_weights(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    release_freed_memory()  # what the run's previous step dropped: not part of this one's peak
    domain = partition_domain(context)
    window = _window(store, domain, _run_as_of(context))
    trades = _read_trades(store, domain, window)
    (metrics,) = _read_source(store, domain, window, "trade_metrics")
    _prefetch_source(store, domain, "trade_scope")  # edge_history's input (if not in the cache)
    weights = regime_core.fit_regime_weights(trades, metrics)
    written = store.replace_partition("learning_regime_weights", domain, weights)
    metadata = {
        "dagster/row_count": dg.MetadataValue.int(written),
        "regimes": dg.MetadataValue.int(int(weights["regime"].nunique()) if len(weights) else 0),
        "pooled_regimes": dg.MetadataValue.json(
            sorted(weights.loc[weights["pooled"].astype(bool), "regime"].unique().tolist()) if len(weights) else []
        ),
        "alpha": dg.MetadataValue.float(float(weights["alpha"].iloc[0]) if len(weights) else float("nan")),
        "weights": table_preview(weights.drop(columns=["note"]), max_rows=40),
    }
    if len(weights):
        metadata["weights_heatmap"] = plot_metadata(_weights_figure(weights, domain), "regime weights")
    return dg.MaterializeResult(metadata=metadata)


# ---------------------------------------------------------------------------
# pm_overrides
# ---------------------------------------------------------------------------


def _overrides_figure(overrides: pd.DataFrame, domain: str, n_top: int = 30) -> Figure:
    rows = overrides.assign(label=overrides["lesson_key"] + overrides["regime"].map(lambda r: f" [{r}]" if pd.notna(r) else ""))
    rows = rows.reindex(rows["edge"].abs().sort_values(ascending=False).index).head(n_top).iloc[::-1]
    codes, names = pd.factorize(rows["latent_factor_id"])
    colors = np.array([f"C{i % 10}" for i in range(len(names))])[codes] if len(rows) else []
    fig = Figure(figsize=(9, 0.3 * len(rows) + 1.6))
    ax = fig.subplots()
    ax.barh(rows["label"], rows["edge"], color=colors)
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("override edge at now (R), colour = latent factor")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"{domain}: pm_overrides ({len(overrides)} rows, {overrides['latent_factor_id'].nunique()} factors)")
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    deps=["trades", lessons, half_life_fits, latent_factors, regime_weights],
    kinds={"numpy", "sql"},
    description=(
        "The overrides engines apply: per latent factor the lessons whose edge really lives at their scope "
        "(joint least squares under the engine's one-override-per-factor rule), decayed by the fitted half-life "
        "to now, shrunk toward its lower confidence bound by lambda_ci and faded by tau when stale, net of the "
        "regime metric term when tier2 is on, |edge| ≥ g_min, ≤ tier3_topk lessons per factor (docs/knobs.md). "
        "Each row's source_json names its lessons, fits and knobs. Table pm_overrides."
    ),
)
def pm_overrides(context: dg.AssetExecutionContext, store: StoreParam) -> dg.MaterializeResult:
    release_freed_memory()  # what the run's previous step dropped: not part of this one's peak
    domain = partition_domain(context)
    knobs = store.knobs_in_effect(domain)
    window = _window(store, domain, _run_as_of(context))
    given = _read_lesson_inputs(store, domain, window)
    fits = store.read("half_life_fits", domain=domain)
    factors = store.read("latent_factors", domain=domain)
    weights = store.read("learning_regime_weights", domain=domain)
    (metrics,) = _read_source(store, domain, window, "trade_metrics")
    trades = given.trades
    now = overrides_core.OverrideModel.now_of(trades)
    overrides = overrides_core.materialize_overrides(
        given.lessons, fits, factors, weights, trades, given.patterns, given.scope, metrics, knobs=knobs.values, now=now,
        lesson_trades=given.incidence,
    )
    breaks = window.breaks
    version = store.write_overrides_version(
        domain, overrides, as_of=now, knobs=knobs.values, regime_weights=weights,
        fit_window_start=breaks["window_start"].max() if len(breaks) else None,
        drift_event_id=int(breaks["drift_event_id"].max()) if len(breaks) else None, run_id=context.run_id)
    metadata = {
        "dagster/row_count": dg.MetadataValue.int(len(overrides)),
        "version": dg.MetadataValue.int(version),
        "as_of": dg.MetadataValue.text(str(now)),
        "break_windows": table_preview(breaks) if len(breaks) else dg.MetadataValue.text("none: no drift break affects a pattern"),
        "factors_with_overrides": dg.MetadataValue.int(int(overrides["latent_factor_id"].nunique()) if len(overrides) else 0),
        "lessons_considered": dg.MetadataValue.int(len(given.lessons)),
        "regime_specific_rows": dg.MetadataValue.int(int(overrides["regime"].notna().sum()) if len(overrides) else 0),
        "now": dg.MetadataValue.text(str(now)),
        "overrides": table_preview(overrides.drop(columns=["source_json", "scope_json"]), max_rows=30),
        **_knob_metadata(knobs),
    }
    if len(overrides):
        metadata["override_edges"] = plot_metadata(_overrides_figure(overrides, domain), "override edges")
        first = json.loads(overrides["source_json"].iloc[0])
        metadata["example_source_json"] = dg.MetadataValue.json(first)
    return dg.MaterializeResult(metadata=metadata)
