"""Blocking checks on the learning tables: a broken result must not feed pm_overrides.

Each check reads the partition's rows back from the store (what engines will read)
and is blocking, so in a run that also materializes downstream assets a failure stops
them (e.g. a fit with disordered CIs never reaches the overrides).
"""


import dagster as dg
import numpy as np

from meta_pipeline.defs.learning.assets import half_life_fits, latent_factors, pm_overrides, regime_weights
from meta_pipeline.defs.resources import StoreParam, domain_partitions


def _domain(context: dg.AssetCheckExecutionContext) -> str:
    return context.partition_key


@dg.asset_check(
    asset=half_life_fits,
    blocking=True,
    partitions_def=domain_partitions,
    description="Every CI is ordered (low ≤ estimate ≤ high, null = unbounded) and half-lives exist only when decaying.",
)
def half_life_cis_ordered(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    fits = store.read("half_life_fits", domain=_domain(context))
    bad = np.zeros(len(fits), dtype=bool)
    for est, lo, hi in (
        ("decay_rate_per_hour", "decay_rate_ci_low", "decay_rate_ci_high"),
        ("half_life_hours", "half_life_ci_low", "half_life_ci_high"),
    ):
        e, low, high = (fits[c].to_numpy(dtype=float) for c in (est, lo, hi))
        bad |= np.isfinite(e) & np.isfinite(low) & (low > e * (1 + 1e-9) + 1e-12)
        bad |= np.isfinite(e) & np.isfinite(high) & (high < e * (1 - 1e-9) - 1e-12)
    hl_wrong_state = fits["half_life_hours"].notna().to_numpy() & (fits["state"] != "decaying").to_numpy()
    return dg.AssetCheckResult(
        passed=bool(not bad.any() and not hl_wrong_state.any()),
        metadata={
            "fits": len(fits),
            "disordered_ci": int(bad.sum()),
            "half_life_not_decaying": int(hl_wrong_state.sum()),
            "examples": fits.loc[bad | hl_wrong_state, "lesson_key"].head(5).tolist(),
        },
    )


@dg.asset_check(
    asset=latent_factors,
    blocking=True,
    partitions_def=domain_partitions,
    description="Every lesson of the domain has a latent factor, in latent_factors and in learning_lessons.",
)
def every_lesson_has_a_factor(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    domain = _domain(context)
    lessons = store.read("learning_lessons", domain=domain, columns=["lesson_key", "latent_factor_id"])
    factors = store.read("latent_factors", domain=domain, columns=["lesson_key", "latent_factor_id"])
    missing_rows = set(lessons["lesson_key"]) - set(factors["lesson_key"])
    missing_ids = int(lessons["latent_factor_id"].isna().sum())
    return dg.AssetCheckResult(
        passed=not missing_rows and missing_ids == 0,
        metadata={
            "lessons": len(lessons),
            "factors": int(factors["latent_factor_id"].nunique()),
            "lessons_without_factor_row": len(missing_rows),
            "lessons_with_null_factor_id": missing_ids,
        },
    )


@dg.asset_check(
    asset=pm_overrides,
    blocking=True,
    partitions_def=domain_partitions,
    description=(
        "Override edges are finite, at most one row per (factor, lesson_key, regime), and no lesson has both an "
        "any-regime row and regime rows (the engine rule would be ambiguous)."
    ),
)
def overrides_are_well_formed(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    rows = store.read("pm_overrides", domain=_domain(context))
    non_finite = int((~np.isfinite(rows["edge"].to_numpy(dtype=float))).sum())
    regime = rows["regime"].fillna("\x00any")
    dupes = int(rows.assign(r=regime).duplicated(["latent_factor_id", "lesson_key", "r"]).sum())
    mixed = rows.groupby("lesson_key")["regime"].agg(lambda r: r.isna().any() and r.notna().any()) if len(rows) else []
    n_mixed = int(np.sum(mixed))
    return dg.AssetCheckResult(
        passed=non_finite == 0 and dupes == 0 and n_mixed == 0,
        metadata={"rows": len(rows), "non_finite_edges": non_finite, "duplicate_rows": dupes, "mixed_regime_lessons": n_mixed},
    )


@dg.asset_check(
    asset=regime_weights,
    blocking=True,
    partitions_def=domain_partitions,
    description="Weights, centers and scales are finite and scales positive.",
)
def regime_weights_finite(context: dg.AssetCheckExecutionContext, store: StoreParam) -> dg.AssetCheckResult:
    rows = store.read("learning_regime_weights", domain=_domain(context))
    values = rows[["weight", "center", "scale"]].to_numpy(dtype=float)
    bad = int((~np.isfinite(values)).any(axis=1).sum() + (rows["scale"].to_numpy(dtype=float) <= 0).sum())
    return dg.AssetCheckResult(passed=bad == 0, metadata={"rows": len(rows), "bad_rows": bad})
