"""The naive ways, kept for the benchmark (``meta-pipeline bench``) and as cross-checks.

* :func:`naive_latent_factors` — pairwise Jaccard/containment over Python sets, then
  union-find: O(lessons²) set intersections. Same thresholds and ids as
  :func:`meta_pipeline.learning.factors.find_latent_factors`, so results must agree.
* :func:`naive_overrides` — the old materializer: one loop iteration per lesson that
  filters the trades, takes the raw mean, decays it by the lesson's own fit, keeps it if
  ≥ g_min. No factors, no credit assignment (every matching lesson counts).

(The per-lesson ``curve_fit`` baseline lives in ``lab.planted_halflife.bench_halflife``.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from meta_pipeline.learning.factors import FACTOR_COLUMNS, _factor_id

__all__ = ["naive_latent_factors", "naive_overrides"]


def naive_latent_factors(
    lessons: pd.DataFrame,
    lesson_trades: pd.DataFrame,
    n_trades: int,
    *,
    jaccard_min: float = 0.5,
    containment_min: float = 0.8,
    min_lift: float = 1.5,
) -> pd.DataFrame:
    """Factors by comparing every pair of lessons' trade sets in Python."""
    n_les = len(lessons)
    sets: list[set[int]] = [set() for _ in range(n_les)]
    for li, ti in zip(lesson_trades["lesson_idx"].to_numpy(), lesson_trades["trade_idx"].to_numpy()):
        sets[int(li)].add(int(ti))
    parent = list(range(n_les))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n_les):
        for j in range(i + 1, n_les):
            inter = len(sets[i] & sets[j])
            if not inter:
                continue
            small, large = sorted((len(sets[i]), len(sets[j])))
            jaccard = inter / (len(sets[i]) + len(sets[j]) - inter)
            containment = inter / small
            lift = containment / (large / max(n_trades, 1))
            if jaccard >= jaccard_min or (containment >= containment_min and lift >= min_lift):
                parent[find(i)] = find(j)
    roots = [find(i) for i in range(n_les)]
    frame = pd.DataFrame({"lesson_key": lessons["lesson_key"].to_numpy(), "pattern": lessons["pattern"].to_numpy(), "c": roots})
    names = frame.groupby("c")["pattern"].min().map(_factor_id)
    frame["latent_factor_id"] = frame["c"].map(names)
    frame["factor_size"] = frame.groupby("c")["c"].transform("size").astype(np.int64)
    return frame[FACTOR_COLUMNS]


def naive_overrides(
    lessons: pd.DataFrame,
    fits: pd.DataFrame | None,
    trades: pd.DataFrame,
    patterns: pd.DataFrame,
    scope: pd.DataFrame,
    *,
    knobs: Mapping[str, float],
    now: object,
) -> pd.DataFrame:
    """One override per lesson, computed in a per-lesson loop (the pre-integration materializer)."""
    now_ts = pd.Timestamp(now)
    now_ts = now_ts.tz_localize("UTC") if now_ts.tzinfo is None else now_ts.tz_convert("UTC")
    g_min = float(knobs.get("g_min", 0.02))
    fit_by_key = fits.set_index("lesson_key") if fits is not None and len(fits) else pd.DataFrame()
    returns = trades.set_index(trades["trade_id"].astype(str))["return_r"]
    pats = patterns.assign(trade_id=patterns["trade_id"].astype(str))
    scp = scope.assign(trade_id=scope["trade_id"].astype(str))
    rows = []
    for lesson in lessons.itertuples(index=False):  # the naive way: one lesson at a time
        ids = set(pats.loc[pats["pattern"] == lesson.pattern, "trade_id"])
        for key, value in json.loads(lesson.scope_json).items():
            ids &= set(scp.loc[(scp["key"] == key) & (scp["value"] == value), "trade_id"])
        if not ids:
            continue
        edge = float(returns.loc[sorted(ids)].mean())
        if lesson.lesson_key in fit_by_key.index:
            fit = fit_by_key.loc[lesson.lesson_key]
            lam = float(fit["decay_rate_per_hour"]) if fit["state"] == "decaying" else 0.0
            t_ref = pd.Timestamp(fit["t_ref"]) if pd.notna(fit.get("t_ref")) else now_ts
            if math.isfinite(lam):
                edge = float(fit["e0"]) * math.exp(-lam * (now_ts - t_ref) / pd.Timedelta(hours=1)) if lam else edge
        if abs(edge) >= g_min:
            rows.append(
                {
                    "latent_factor_id": lesson.latent_factor_id,
                    "lesson_key": lesson.lesson_key,
                    "pattern": lesson.pattern,
                    "scope_json": lesson.scope_json,
                    "n_scope_keys": lesson.n_scope_keys,
                    "regime": None,
                    "edge": edge,
                    "support": len(ids),
                }
            )
    return pd.DataFrame(rows)
