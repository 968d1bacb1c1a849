"""Are the half-life intervals honest on fleets shaped unlike the default one? (``evaluate --section intervals``)

The whole learning path runs on synthetic domains (``lab.synth``) whose generator is
varied on purpose -- family sizes 2-5, co-firing 0.5-1.0, heavy-tailed and
heteroscedastic trade noise, day-to-day edge wobble, scope depth 0-2 -- and the
fitted half-lives (``learning.halflife.fit_half_lives`` on ``learning.lessons.edge_history``
of ``mine_lessons``) are scored against the planted curves:

* **coverage**: the share of planted decaying lessons (the family's lessons at exactly
  the signal's scope, fitted with >= 5 daily buckets) whose 95 % interval of lambda
  contains the planted lambda. That interval is the half-life interval mapped by
  ``ln2/lambda`` (for a lesson called decaying they are the same statement; the
  half-life interval of a lesson not called decaying is "not bounded", so scoring the
  lambda interval never flatters a lesson by dropping it);
* **states**: the share of planted lessons whose state is the planted one, over lessons
  whose planted curve is identifiable from their trades: expected ``|lambda|/se(lambda)``
  >= 3 for decaying and improving, expected ``|e0|/se(e0)`` >= 3 for all (computed from
  the planted curve, the lesson's trade count and its trade noise -- not from the fit);
* **noise**: the share of lessons of planted noise patterns called decaying or improving;
* **break**: fleets whose first families' edges flip sign mid-window (``break_at_days``):
  the share of those lessons that get a confident state from an "explosive growth from
  e0 ~ 0" fit.

Standard errors are cluster-robust by planted signal: a family's lessons share trades
(with co-firing 1.0 they are the same trades), so they succeed or fail together and a
binomial s.e. over lessons would be too small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from meta_pipeline.learning.halflife import fit_half_lives
from meta_pipeline.learning.lessons import edge_history, mine_lessons
from meta_pipeline.lab.synth import DomainData, generate_fleet

__all__ = [
    "VARIANTS",
    "IntervalEvalConfig",
    "domain_frames",
    "format_intervals",
    "interval_section",
    "planted_lesson_rows",
    "domain_history",
]

IDENTIFIABLE_Z = 3.0

# Generator variants: FleetConfig overrides. "default" is the fleet every other test uses.
_VARIED = {"members_per_family_range": (2, 5), "member_fire_p_range": (0.5, 1.0)}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "families_2to5_cofire_0.5to1": dict(_VARIED),
    "heavy_tails_t3": {**_VARIED, "noise_kind": "student_t", "noise_t_df": 3.0},
    "hetero_noisy_early": {**_VARIED, "noise_kind": "heteroscedastic", "noise_day_sd_range": (0.4, 2.5),
                           "noise_sd_trend": -3.0, "noise_scope_sd": (0.6, 1.6)},
    "hetero_noisy_late": {**_VARIED, "noise_kind": "heteroscedastic", "noise_day_sd_range": (0.4, 2.5),
                          "noise_sd_trend": 2.0, "noise_scope_sd": (0.6, 1.6)},
    "t3_hetero_ar_wobble": {**_VARIED, "noise_kind": "student_t_heteroscedastic", "noise_t_df": 3.0,
                            "noise_day_sd_range": (0.5, 2.0), "edge_day_cv": 0.3, "edge_day_ar": 0.6},
    "scope_depth_0to2_sparse": {**_VARIED, "scope_depths": (0, 1, 1, 2), "n_trades": 60_000,
                                "edge_day_cv": 0.15, "noise_kind": "heteroscedastic",
                                "noise_day_sd_range": (0.6, 1.6)},
}
# Planted breaks (sign flips): the degenerate "explosive growth from ~0" fit.
BREAK_VARIANT: dict[str, Any] = {"break_at_days": 40.0, "break_families": 4}


# Planted edge histories (lab.planted_halflife): independent lessons, exact truth; the
# noise shapes that break a pooled-variance interval, at full strength.
PLANTED_VARIANTS: dict[str, dict[str, Any]] = {
    "gaussian": {},
    "noisy_early": {"sd_trend": -2.5},
    "noisy_late": {"sd_trend": 2.5},
    "t3_bursty_noisy_early": {"noise": "student_t", "t_df": 3.0, "sd_trend": -2.0, "count_dispersion": 1.0},
    "t3_heteroscedastic_days": {"noise": "student_t", "t_df": 3.0, "day_sd_range": (0.4, 2.5)},
    "edge_wobble": {"edge_day_cv": 0.3},
}


@dataclass(frozen=True)
class IntervalEvalConfig:
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    n_trades: int = 100_000  # per domain (train + holdout); the fit sees the 60 training days
    n_families: int = 8  # more families than the default 6: more planted lessons per domain
    break_seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = ("robust", "model")  # the first is the pipeline's; the rest for comparison
    planted_lessons: int = 3000  # per planted-history variant and seed (0: skip that block)
    fit_kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- path
def domain_frames(data: DomainData) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(trades, patterns, scope) of a synth domain's training window, in the learning layout."""
    tr = data.train_trades
    ids = tr["trade_id"].astype(str).to_numpy(dtype=object)
    trades = pd.DataFrame({
        "domain": data.domain, "trade_id": ids, "closed_at": pd.to_datetime(tr["closed_at"], utc=True),
        "regime": tr["regime"].astype(str), "strategy_id": tr["strategy_id"].astype(str),
        "return_r": tr["return_r"].astype(float),
    })
    split = tr["patterns"].astype(str).str.split("|")
    pos = np.repeat(np.arange(len(tr)), split.str.len().to_numpy())
    patterns = pd.DataFrame({"domain": data.domain, "trade_id": ids[pos],
                             "pattern": np.concatenate(split.to_list())})
    parts = []
    for c in ("scope.chain", "scope.size"):
        keep = (tr[c] != "").to_numpy()
        parts.append(pd.DataFrame({"domain": data.domain, "trade_id": ids[keep], "key": c[len("scope."):],
                                   "value": tr.loc[keep, c].astype(str).to_numpy()}))
    return trades, patterns, pd.concat(parts, ignore_index=True)


def _scope_mask(tr: pd.DataFrame, scope: dict[str, str]) -> np.ndarray:
    mask = np.ones(len(tr), dtype=bool)
    for key, value in scope.items():
        mask &= tr[f"scope.{key}"].to_numpy() == value
    return mask


def _expected_z(e0_lift: float, lam: float, day: np.ndarray, noise: np.ndarray,
                wobble_cv: float = 0.0) -> tuple[float, float]:
    """(|e0|/se(e0), |lambda|/se(lambda)) of the fit (least squares, weights n) at the planted curve.

    ``day``/``noise``: the lesson's trades' day index (from its first day) and planted
    noise (return minus the planted signal). The sampling variance is the sandwich at the
    truth with each day's own noise variance (plus the planted day-to-day wobble of the
    lift, ``wobble_cv``), so heteroscedastic days count as much as they blur the fit.
    """
    if e0_lift == 0 or day.size < 3:
        return 0.0, 0.0
    days = int(day.max()) + 1
    n = np.bincount(day, minlength=days).astype(float)
    s1 = np.bincount(day, noise, days)
    s2 = np.bincount(day, noise * noise, days)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(n >= 2, (s2 - s1 * s1 / n) / (n - 1.0), np.nan)
    var = np.where(np.isfinite(var), var, float(np.var(noise)))
    t = (np.arange(days) + 0.5) * 24.0
    f = np.exp(-lam * t)
    X = np.column_stack([f, -e0_lift * t * f])
    live = n > 0
    X, n, var, f = X[live], n[live], var[live], f[live]
    influence = np.linalg.solve(X.T @ (X * n[:, None]), (X * n[:, None]).T)  # 2 x days
    v_bucket = var / n + (wobble_cv * e0_lift * f) ** 2
    se = np.sqrt((influence**2 * v_bucket).sum(axis=1))
    return abs(e0_lift) / se[0], (abs(lam) / se[1] if lam != 0 else 0.0)


def planted_lesson_rows(data: DomainData, fits: pd.DataFrame, lessons: pd.DataFrame,
                        edge_day_cv: float = 0.0) -> pd.DataFrame:
    """One row per planted signal lesson that was mined: truth, identifiability, the fit's verdict."""
    tr = data.train_trades
    truth = data.truth
    fit = fits.set_index("lesson_key")
    support = lessons.set_index("lesson_key")["n"]
    pats = tr["patterns"].astype(str).str.split("|")
    resid = (tr["return_r"] - tr["signal_r"]).to_numpy()
    day_all = (tr["t_hours"].to_numpy() // 24.0).astype(np.int64)
    rows = []
    for k, sig in enumerate(truth.signals):
        in_scope = _scope_mask(tr, sig.scope)
        fam = set(sig.patterns)
        fam_on = pats.map(lambda ps: not fam.isdisjoint(ps)).to_numpy()
        share = fam_on[in_scope].mean() if in_scope.any() else 0.0
        lift = sig.e0 * (1.0 - share)  # the lift is net of the family's share of its scope
        broken = sig.family in truth.broken_families
        for p, key in zip(sig.patterns, sig.lesson_keys):
            if key not in fit.index:
                continue
            n = int(support[key])
            mine = in_scope & pats.map(lambda ps, p=p: p in ps).to_numpy()
            d0 = day_all[mine].min() if mine.any() else 0
            z_e0, z_lam = _expected_z(lift, sig.decay_rate_per_hour, day_all[mine] - d0, resid[mine], edge_day_cv)
            f = fit.loc[key]
            rows.append({
                "domain": data.domain, "signal": f"{data.domain}/{sig.family}", "lesson_key": key,
                "scope_depth": len(sig.scope), "true_state": sig.state, "broken": broken,
                "true_rate": sig.decay_rate_per_hour, "e0_lift": lift, "n": n,
                "e0_z": z_e0, "lambda_z": z_lam,
                "state": f["state"], "rate": f["decay_rate_per_hour"],
                "rate_lo": f["decay_rate_ci_low"], "rate_hi": f["decay_rate_ci_high"],
                "e0": f["e0"], "n_buckets": int(f["n_buckets"]),
            })
    return pd.DataFrame(rows)


def noise_lesson_states(data: DomainData, fits: pd.DataFrame) -> pd.Series:
    noise = set(data.truth.noise_patterns)
    return fits.loc[fits["lesson_key"].str.split("|").str[0].isin(noise), "state"]


def domain_history(data: DomainData) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lessons and edge history of one domain's training window (the learning assets' cores)."""
    trades, patterns, scope = domain_frames(data)
    lessons, incidence = mine_lessons(trades, patterns, scope)
    return lessons, edge_history(lessons, incidence, trades, scope=scope)


# ------------------------------------------------------------------------ scoring
def cluster_share(hit: np.ndarray, cluster: np.ndarray) -> tuple[float, float, int]:
    """(share, cluster-robust s.e., n): a ratio estimator over clusters (planted signals)."""
    hit = np.asarray(hit, dtype=float)
    n = hit.size
    if n == 0:
        return float("nan"), float("nan"), 0
    p = float(hit.mean())
    codes, _ = pd.factorize(pd.Series(cluster))
    g = codes.max() + 1
    if g < 2:
        return p, float("nan"), n
    resid = np.bincount(codes, hit - p, g)  # per-cluster sum of (hit - p)
    se = math.sqrt(g / (g - 1) * float((resid**2).sum())) / n
    return p, se, n


def score(rows: pd.DataFrame, noise: pd.Series | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ok = rows["n_buckets"] >= 5
    dec = rows[ok & (rows["true_state"] == "decaying") & ~rows["broken"]]
    cover = (dec["rate_lo"] <= dec["true_rate"]) & (dec["true_rate"] <= dec["rate_hi"])
    out["coverage"], out["coverage_se"], out["n_decaying"] = cluster_share(cover.to_numpy(), dec["signal"].to_numpy())
    out["n_decaying_signals"] = int(dec["signal"].nunique())
    called = dec["state"] == "decaying"
    out["coverage_called_decaying"] = float(cover[called].mean()) if called.any() else float("nan")
    allp = rows[ok & ~rows["broken"]]
    cov_all = (allp["rate_lo"] <= allp["true_rate"]) & (allp["true_rate"] <= allp["rate_hi"])
    out["coverage_all_states"], out["coverage_all_states_se"], out["n_all_states"] = cluster_share(
        cov_all.to_numpy(), allp["signal"].to_numpy())
    ident = (allp["e0_z"] >= IDENTIFIABLE_Z) & (
        (allp["true_state"] == "stable") | (allp["lambda_z"] >= IDENTIFIABLE_Z))
    judged = allp[ident]
    right = (judged["state"] == judged["true_state"]).to_numpy()
    out["states"], out["states_se"], out["n_states"] = cluster_share(right, judged["signal"].to_numpy())
    band = np.where(judged["true_state"] == "stable", "stable",
                    np.where(judged["lambda_z"] >= 4.0, "trend z>=4", "trend 3<=z<4"))
    out["states_by_z"] = {b: (float(right[band == b].mean()), int((band == b).sum())) for b in np.unique(band)}
    out["states_by_truth"] = {
        s: float((g["state"] == s).mean()) for s, g in judged.groupby("true_state")
    }
    if noise is not None:
        out["n_noise"] = int(len(noise))
        out["noise_confident"] = float(noise.isin(("decaying", "improving")).mean()) if len(noise) else float("nan")
    return out


def score_breaks(fits: pd.DataFrame) -> dict[str, Any]:
    """Fleets with planted sign flips: fits that explain a run of late buckets as explosive growth.

    ``n_explosive``: lessons whose fitted λ < −0.004/h (doubling in under a week, far
    beyond any planted improvement); ``n_explosive_confident``: those called improving.
    """
    fitted = fits[fits["n_buckets"] >= 5]
    explosive = fitted["decay_rate_per_hour"] < -0.004  # doubling in under a week
    return {
        "n_lessons": int(len(fitted)),
        "n_explosive": int(explosive.sum()),
        "n_explosive_confident": int((explosive & (fitted["state"] == "improving")).sum()),
        "states_of_explosive": fitted.loc[explosive, "state"].value_counts().to_dict(),
    }


# ------------------------------------------------------------------------ section
def planted_block(cfg: IntervalEvalConfig) -> dict[str, Any]:
    """Coverage of planted decaying lessons' λ on planted edge histories, per variant and method.

    Lessons are independent here, so the s.e. is binomial.
    """
    from meta_pipeline.lab.planted_halflife import planted_edge_history

    out: dict[str, Any] = {}
    for i, (name, kw) in enumerate(PLANTED_VARIANTS.items()):
        covers: dict[str, list[np.ndarray]] = {m: [] for m in cfg.methods}
        for seed in cfg.seeds:
            eh, truth = planted_edge_history(cfg.planted_lessons, 60, seed=1000 * (i + 1) + seed, **kw)
            for method in cfg.methods:
                fit = fit_half_lives(eh, ci_method=method, **cfg.fit_kwargs)
                m = truth.merge(fit, on="lesson_key", suffixes=("_true", ""), validate="1:1")
                d = m[(m["kind"] == "decaying") & (m["n_buckets"] >= 5)]
                lam = d["decay_rate_per_hour_true"]
                covers[method].append(((d["decay_rate_ci_low"] <= lam) & (lam <= d["decay_rate_ci_high"])).to_numpy())
        out[name] = {}
        for method, c in covers.items():
            hit = np.concatenate(c)
            p = float(hit.mean())
            out[name][method] = {"coverage": p, "coverage_se": math.sqrt(p * (1 - p) / hit.size), "n": int(hit.size)}
    return out


def _domain(name: str, seed: int, cfg: IntervalEvalConfig, overrides: dict[str, Any]) -> DomainData:
    kwargs = {"n_trades": cfg.n_trades, "n_families": cfg.n_families, **overrides}
    fleet = generate_fleet(n_domains=1, seed=seed, domain_names=(f"{name}-{seed}",), **kwargs)
    return next(iter(fleet.domains.values()))


def interval_section(cfg: IntervalEvalConfig = IntervalEvalConfig(),
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every generator variant x seed with each interval method (same lessons, same history)."""
    t_start = time.perf_counter()
    rows: dict[str, list[pd.DataFrame]] = {m: [] for m in cfg.methods}
    noise: dict[str, list[pd.Series]] = {m: [] for m in cfg.methods}
    for name in cfg.variants:
        for seed in cfg.seeds:
            if progress:
                progress(f"intervals: {name} seed {seed}")
            data = _domain(name, seed, cfg, VARIANTS[name])
            lessons, history = domain_history(data)
            for method in cfg.methods:
                fits = fit_half_lives(history, ci_method=method, **cfg.fit_kwargs)
                cv = float(VARIANTS[name].get("edge_day_cv", 0.0))
                rows[method].append(planted_lesson_rows(data, fits, lessons, cv).assign(variant=name, seed=seed))
                noise[method].append(noise_lesson_states(data, fits).rename(name))
    results: dict[str, Any] = {}
    for method in cfg.methods:
        r = pd.concat(rows[method], ignore_index=True)
        nz = pd.concat(noise[method])
        results[method] = {
            "per_variant": {v: score(r[r["variant"] == v], pd.concat([x for x in noise[method] if x.name == v]))
                            for v in cfg.variants},
            "pooled": score(r, nz),
            "rows": r,
        }
    breaks: dict[str, Any] = {}
    if cfg.break_seeds:
        bfits: dict[str, list[pd.DataFrame]] = {m: [] for m in cfg.methods}
        for seed in cfg.break_seeds:
            if progress:
                progress(f"intervals: planted break seed {seed}")
            data = _domain("break", seed, cfg, BREAK_VARIANT)
            lessons, history = domain_history(data)
            for method in cfg.methods:
                bfits[method].append(fit_half_lives(history, ci_method=method, **cfg.fit_kwargs))
            # the same fits without the growth-support rule: what the rule prevents
            bfits.setdefault(f"{cfg.methods[0]}, growth rule off", []).append(fit_half_lives(
                history, ci_method=cfg.methods[0], **{**cfg.fit_kwargs, "growth_support_share": None}))
        breaks = {m: score_breaks(pd.concat(f, ignore_index=True)) for m, f in bfits.items()}
    planted = {}
    if cfg.planted_lessons > 0:
        if progress:
            progress("intervals: planted edge histories")
        planted = planted_block(cfg)
    return {
        "planted": planted,
        "config": {"variants": {v: VARIANTS[v] for v in cfg.variants}, "seeds": list(cfg.seeds),
                   "n_trades": cfg.n_trades, "n_families": cfg.n_families, "break": BREAK_VARIANT,
                   "break_seeds": list(cfg.break_seeds), "methods": list(cfg.methods)},
        "methods": results,
        "breaks": breaks,
        "targets": {"coverage": 0.93, "states": 0.97, "n_decaying": 300},
        "seconds": time.perf_counter() - t_start,
    }


def _pct(x: float, se: float | None = None) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:.3f}" + (f" ± {se:.3f}" if se is not None and np.isfinite(se) else "")


def format_intervals(res: dict[str, Any]) -> str:
    methods = res["config"]["methods"]
    main = methods[0]
    lines = ["## Half-life intervals on varied synthetic fleets", "",
             f"95 % intervals of λ (= the half-life interval ln2/λ); ± = cluster-robust s.e. (clusters: planted "
             f"signals). Method `{main}` is what the pipeline uses"
             + (f"; `{'`, `'.join(methods[1:])}` for comparison." if len(methods) > 1 else "."), "",
             "| generator | decaying lessons (signals) | " + " | ".join(
                 f"coverage `{m}`" for m in methods) + " | " + " | ".join(f"states `{m}` (n)" for m in methods)
             + f" | noise lessons confident `{main}` |",
             "|---|---|" + "---|" * (2 * len(methods) + 1)]
    names = [*res["config"]["variants"], "**pooled**"]
    for name in names:
        sc = {m: (res["methods"][m]["pooled"] if name == "**pooled**" else res["methods"][m]["per_variant"][name])
              for m in methods}
        s0 = sc[main]
        lines.append(
            f"| {name} | {s0['n_decaying']} ({s0['n_decaying_signals']}) | "
            + " | ".join(_pct(sc[m]["coverage"], sc[m]["coverage_se"]) for m in methods) + " | "
            + " | ".join(f"{_pct(sc[m]['states'], sc[m]['states_se'])} ({sc[m]['n_states']})" for m in methods)
            + f" | {_pct(s0.get('noise_confident', float('nan')))} |")
    p, t = res["methods"][main]["pooled"], res["targets"]
    cov_met = p["coverage"] >= t["coverage"] and p["n_decaying"] >= t["n_decaying"]
    worst = min(res["methods"][main]["per_variant"].items(), key=lambda kv: kv[1]["coverage"])
    lines += ["",
              f"`{main}` pooled: coverage {p['coverage']:.3f} ± {p['coverage_se']:.3f} over {p['n_decaying']} planted "
              f"decaying lessons (target ≥ {t['coverage']} over ≥ {t['n_decaying']}: {'met' if cov_met else 'NOT met'}; "
              f"lowest generator {worst[0]} {worst[1]['coverage']:.3f} ± {worst[1]['coverage_se']:.3f}); "
              f"states {p['states']:.3f} ± {p['states_se']:.3f} over {p['n_states']} identifiable planted lessons "
              f"(target ≥ {t['states']}: {'met' if p['states'] >= t['states'] else 'NOT met'}); by planted state "
              + ", ".join(f"{k} {v:.3f}" for k, v in p["states_by_truth"].items())
              + "; by identifiability " + ", ".join(f"{k} {v:.3f} (n {n})" for k, (v, n) in p["states_by_z"].items()),
              f"`{main}`: coverage of every planted lesson's λ interval (decaying, stable, improving) "
              f"{p['coverage_all_states']:.3f} ± {p['coverage_all_states_se']:.3f} (n {p['n_all_states']}); "
              f"half-life interval coverage among lessons called decaying {p['coverage_called_decaying']:.3f}; "
              f"width of the λ interval relative to `{methods[-1]}` (median, decaying lessons with bounded intervals) "
              f"{_width_ratio(res, main, methods[-1]):.3f}"]
    for m, b in res["breaks"].items():
        if b.get("n_lessons"):
            lines.append(
                f"planted sign flips (`{m}`): {b['n_lessons']} lessons; explosive-growth fits (λ < −0.004/h) "
                f"{b['n_explosive']}, of them called improving (confident) {b['n_explosive_confident']}")
    if res.get("planted"):
        lines += ["", "Planted edge histories (independent lessons, `lab.planted_halflife`; ± binomial s.e.): "
                  "coverage of planted decaying λ", "",
                  "| noise shape | decaying lessons | " + " | ".join(f"coverage `{m}`" for m in methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for name, by_m in res["planted"].items():
            lines.append(f"| {name} | {by_m[main]['n']} | "
                         + " | ".join(_pct(by_m[m]["coverage"], by_m[m]["coverage_se"]) for m in methods) + " |")
    lines.append(f"({res['seconds']:.0f} s)")
    return "\n".join(lines)


def _width_ratio(res: dict[str, Any], a: str, b: str) -> float:
    if a == b:
        return 1.0
    ra, rb = res["methods"][a]["rows"], res["methods"][b]["rows"]
    m = ra.merge(rb, on=["variant", "seed", "lesson_key"], suffixes=("_a", "_b"))
    m = m[(m["true_state_a"] == "decaying") & np.isfinite(m["rate_hi_a"] - m["rate_lo_a"])
          & np.isfinite(m["rate_hi_b"] - m["rate_lo_b"])]
    if m.empty:
        return float("nan")
    return float(np.median((m["rate_hi_a"] - m["rate_lo_a"]) / (m["rate_hi_b"] - m["rate_lo_b"])))
