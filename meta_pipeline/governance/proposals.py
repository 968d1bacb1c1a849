"""Config-change proposals from diagnostics: what to change, why, and how sure we are.

Pure pandas/numpy (no Dagster, no store). ``generate_proposals`` reads diagnostics rows
(any number of domains) and the current configs, and returns proposal rows in the
layout of ``meta_controller_config_proposals`` (without id, timestamps and status, which
the lifecycle adds on insert).

Sources of candidates (each candidate is one statistical test with a one-sided p-value):

* ``strategy_vs_peers`` → STRATEGY_CONFIG ``{domain}/{strategy}``: a strategy whose
  return in a regime falls short of the other strategies in that regime AND of its own
  other regimes (trades alone, no backtests needed). p = the intersection–union p of the
  two one-sided Welch tests (diagnostics). Proposed: its weight in that regime becomes
  ``min(current, m)``, ``m = clip(1 − d, 0.25, 0.9)`` rounded to 0.05, d = shortfall /
  the cell's sd — an absolute target (a share of full weight), so once applied the same
  evidence is a no-op and is never proposed (or compounded) again.
* ``realized_vs_backtest`` → the same target: realized return short of the backtests.
  p = one-sided Welch p of "realized < backtest"; d = shortfall / realized sd. When both
  sources speak about one regime the more confident decides the weight and the other is
  kept as supporting evidence (role ``supports``).
* ``knob_best_region`` → META_KNOBS ``{domain}``: move a knob to the region where the
  reward is best. p = max(permutation p of the knob's importance, split-sample p of
  the predicted gain) — an intersection–union test: both the knob must matter and the
  move must help.
* ``global_prior_gap`` → META_KNOBS ``{domain}``: adopt the global prior when it is far
  (unit-space RMS distance ≥ 0.1) and predicted better. p = the one-sided surface p.
* ``override_churn`` → PM_OVERRIDES ``{domain}``: many overrides appear/disappear between
  runs. p = binomial P(X ≥ changed | n, 0.2): is the churn above a 20 % base turnover?
  Proposed: ``min_support`` = max(current, ⌈30·(1 + churn)/5⌉·5, ≤ 120) — read by the
  ``lessons`` asset, so only better supported lessons become overrides.

RISK_CONFIG is gone (nothing consumed it); tail risk enters as evidence of the strategy
proposals (expected shortfall, bootstrap stress of the cut).

Confidence (in [0, 1]; documented so a reviewer can recompute it):

    q_i        = Benjamini–Hochberg adjusted p over ALL candidate tests of the run
                 (every domain, every source — including the ones not proposed)
    evidence_i = clip(log10(1/q_i) / log10(1/q_full), 0, 1),  q_full = 1e-4
                 (q = 1e-4 → 1, q = 1e-3 → 0.75, q = 0.01 → 0.5, q = 0.1 → 0.25)
    effect_i   = min(1, effect / effect_ref)   (strategy: d / 0.2 sd; knobs: gain / 0.02 reward;
                 churn: (churn − 0.2) / 0.3)
    sample_i   = n / (n + n0)                  (n0 = 30 trades or overrides, 50 telemetry ticks)
    confidence = evidence · effect · sample

So confidence ≥ 0.5 needs q ≤ 0.01 at the very least: when nothing is real, BH keeps the
chance that ANY candidate of a run gets there ≤ 1 %, and a small effect or a small sample
pulls it down further (low evidence → low confidence → never auto-applied). A candidate
is proposed when q ≤ 0.1 and the change is not a no-op. Candidates for the same target
merge into one proposal (so two proposals never fight over one config); its confidence
is the smallest of its deciding parts'.

Evidence hash: sha256 over the canonical JSON of target type and id, the current config
snapshot, the proposed config (already on coarse grids: multipliers on 0.05, knob values
on a 0.05 unit grid) and the list of part keys (e.g. ``shortfall:S1``). Noisy statistics
are NOT hashed, so re-running on slightly more data gives the same hash and the store
never holds two PENDING proposals for the same evidence.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from meta_pipeline.knobs import KNOBS, default_knobs
from meta_pipeline.learning.lessons import MAX_SCOPE_DIMS, MIN_SUPPORT

TARGET_TYPES = ("STRATEGY_CONFIG", "META_KNOBS", "PM_OVERRIDES")  # RISK_CONFIG was removed: nothing consumed it
# PROMPT_TEMPLATE (target_id = a task): proposed by prompt_comparison (meta_pipeline.prompts.comparison)
TARGET_TYPES = (*TARGET_TYPES, "PROMPT_TEMPLATE")
PROPOSAL_COLUMNS = [
    "domain", "target_type", "target_id", "current_config_snapshot_json", "proposed_config_json",
    "rationale_text", "evidence_json", "evidence_hash", "confidence",
]
CANDIDATE_COLUMNS = [
    "domain", "target_type", "target_id", "part_key", "p_value", "effect", "effect_factor", "n", "sample_factor",
    "change", "facts",
]


@dataclass(frozen=True)
class ProposalSettings:
    q_full: float = 1e-4  # BH-adjusted p at which the evidence factor reaches 1
    max_q: float = 0.1  # propose only candidates with q ≤ max_q
    strategy_effect_ref: float = 0.2  # shortfall, in realized sd units, that counts as fully material
    knob_gain_ref: float = 0.02  # meta-reward gain that counts as fully material (2 % of its 0..1 scale)
    churn_base: float = 0.2  # turnover of overrides between runs considered normal
    churn_effect_ref: float = 0.3
    n0_trades: float = 30.0
    n0_ticks: float = 50.0
    n0_overrides: float = 30.0
    min_multiplier: float = 0.25
    max_multiplier: float = 0.9
    multiplier_step: float = 0.05
    min_prior_distance: float = 0.1


# ---------------------------------------------------------------------------
# multiple testing, confidence, hashing
# ---------------------------------------------------------------------------


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q-values), monotone, capped at 1; NaN p counts as 1."""
    p = np.where(np.isfinite(p), np.clip(p, 0.0, 1.0), 1.0)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def evidence_factor(q: np.ndarray, q_full: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.clip(np.log10(1.0 / np.maximum(q, 1e-300)) / math.log10(1.0 / q_full), 0.0, 1.0)


def confidence(q: np.ndarray, effect_factor: np.ndarray, sample_factor: np.ndarray, q_full: float) -> np.ndarray:
    return np.round(evidence_factor(q, q_full) * effect_factor * sample_factor, 4)


def canonical(value: Any) -> Any:
    """JSON-stable form: floats to 6 significant digits, dict keys sorted (by json.dumps)."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(f"{float(value):.6g}")
    return value


def canonical_json(value: Any) -> str:
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))


def evidence_hash(target_type: str, target_id: str, snapshot: Mapping, proposed: Mapping, part_keys: list[str]) -> str:
    payload = {"target_type": target_type, "target_id": target_id, "snapshot": snapshot, "proposed": proposed,
               "parts": sorted(part_keys)}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


# ---------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------


def _details(frame: pd.DataFrame) -> list[dict]:
    return [json.loads(t) if isinstance(t, str) and t else {} for t in frame["details_json"]]


def _one_sided_from_two(p_two: np.ndarray, estimate: np.ndarray, want_negative: bool) -> np.ndarray:
    """One-sided p in the wanted direction from a two-sided p of a symmetric test."""
    half = np.asarray(p_two, dtype=float) / 2
    right_side = estimate < 0 if want_negative else estimate > 0
    return np.where(np.isfinite(half), np.where(right_side, half, 1 - half), 1.0)


def _multiplier(d: float, s: ProposalSettings) -> float:
    raw = float(np.clip(1.0 - d, s.min_multiplier, s.max_multiplier))
    return round(round(raw / s.multiplier_step) * s.multiplier_step, 4)


def _weight_target(d: float, s: ProposalSettings) -> float:
    """The weight a cell deserves, as a share of full weight (an absolute target, never relative to the
    current weight: applying it and re-running on the same evidence proposes nothing again)."""
    return _multiplier(d, s)


def strategy_candidates(diag: pd.DataFrame, s: ProposalSettings) -> pd.DataFrame:
    """STRATEGY_CONFIG candidates: a cell short of its peers and its own other regimes (trades alone),
    and a cell short of its backtests (when backtest_runs exist)."""
    out = []
    tail_rows = diag[(diag["section"] == "tail") & (diag["metric"] == "max_drawdown")]
    tails = {(dom, subj): {**det, "max_drawdown": val} for dom, subj, val, det in
             zip(tail_rows["domain"], tail_rows["subject"], tail_rows["value"], _details(tail_rows))}
    es_rows = diag[(diag["section"] == "tail") & (diag["metric"] == "expected_shortfall")]
    shortfalls = {(dom, subj): val for dom, subj, val in zip(es_rows["domain"], es_rows["subject"], es_rows["value"])}

    def tail_facts(domain: str, strategy: str, regime: str) -> dict:
        key = (domain, f"{strategy}/{regime}")
        return {"stress": tails.get(key), "expected_shortfall": shortfalls.get(key)} if key in tails else {}

    peers = diag[diag["section"] == "strategy_vs_peers"].reset_index(drop=True)
    for (_, row), det in zip(peers.iterrows(), _details(peers)):
        shortfall = float(row["value"]) if pd.notna(row["value"]) else 0.0
        sd = det.get("sd") or float("nan")
        d = max(shortfall, 0.0) / sd if sd and sd > 0 else 0.0
        n = int(row["n"]) if pd.notna(row["n"]) else 0
        p = float(row["p_value"]) if pd.notna(row["p_value"]) and shortfall > 0 else 1.0
        out.append({
            "domain": row["domain"], "target_type": "STRATEGY_CONFIG", "target_id": f"{row['domain']}/{det['strategy_id']}",
            "part_key": f"peers:{det['regime']}", "p_value": p, "effect": d,
            "effect_factor": min(1.0, d / s.strategy_effect_ref), "n": n, "sample_factor": n / (n + s.n0_trades),
            "change": {"regime": det["regime"], "weight": _weight_target(d, s)},
            "facts": {**det, "shortfall": shortfall, "p_one_sided": p, "shortfall_sd": d,
                      **tail_facts(row["domain"], det["strategy_id"], det["regime"])},
        })
    rows = diag[(diag["section"] == "realized_vs_backtest")].reset_index(drop=True)
    if len(rows):
        details = _details(rows)
        diff = rows["value"].to_numpy(dtype=float)
        p_one = _one_sided_from_two(rows["p_value"].to_numpy(dtype=float), diff, want_negative=True)
        for (_, row), det, p_i in zip(rows.iterrows(), details, p_one):
            if det.get("regime") in (None, "*"):
                continue  # a strategy-wide backtest has no regime weight to change
            sd = det.get("realized_sd") or float("nan")
            d = max(-row["value"], 0.0) / sd if sd and sd > 0 else 0.0
            n = int(row["n"]) if pd.notna(row["n"]) else 0
            out.append({
                "domain": row["domain"], "target_type": "STRATEGY_CONFIG",
                "target_id": f"{row['domain']}/{det['strategy_id']}",
                "part_key": f"shortfall:{det['regime']}", "p_value": float(p_i), "effect": d,
                "effect_factor": min(1.0, d / s.strategy_effect_ref), "n": n, "sample_factor": n / (n + s.n0_trades),
                "change": {"regime": det["regime"], "weight": _weight_target(d, s)},
                "facts": {**det, "diff": row["value"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                          "p_two_sided": row["p_value"], "shortfall_sd": d,
                          **tail_facts(row["domain"], det["strategy_id"], det["regime"])},
            })
    return pd.DataFrame(out, columns=CANDIDATE_COLUMNS)


def knob_candidates(diag: pd.DataFrame, s: ProposalSettings) -> pd.DataFrame:
    rows = diag[diag["section"] == "knob_best_region"].reset_index(drop=True)
    out = []
    for (_, row), det in zip(rows.iterrows(), _details(rows)):
        gain = float(row["value"]) if pd.notna(row["value"]) else 0.0
        p_gain = float(row["p_value"]) if pd.notna(row["p_value"]) else 1.0
        p_imp = det.get("importance_p")
        p_imp = 1.0 if p_imp is None else float(p_imp)
        n = int(row["n"]) if pd.notna(row["n"]) else 0
        out.append({
            "domain": row["domain"], "target_type": "META_KNOBS", "target_id": str(row["domain"]),
            "part_key": f"knob:{det['knob']}", "p_value": max(p_gain, p_imp) if gain > 0 else 1.0, "effect": gain,
            "effect_factor": float(np.clip(gain / s.knob_gain_ref, 0.0, 1.0)), "n": n,
            "sample_factor": n / (n + s.n0_ticks),
            "change": {"knobs": {det["knob"]: det["proposed"]}},
            "facts": {**det, "gain": gain, "ci_low": row["ci_low"], "ci_high": row["ci_high"], "gain_p": p_gain},
        })
    return pd.DataFrame(out, columns=CANDIDATE_COLUMNS)


def prior_candidates(diag: pd.DataFrame, s: ProposalSettings) -> pd.DataFrame:
    rows = diag[diag["section"] == "global_prior_gap"].reset_index(drop=True)
    out = []
    for (_, row), det in zip(rows.iterrows(), _details(rows)):
        if (det.get("unit_rms_distance") or 0.0) < s.min_prior_distance:
            continue  # close enough already: not a change worth proposing (independent of the reward data)
        gain = float(row["value"]) if pd.notna(row["value"]) else 0.0
        n = int(row["n"]) if pd.notna(row["n"]) else 0
        prior = {k: KNOBS[k].clip(v) for k, v in det["prior_knobs"].items() if k in KNOBS}
        out.append({
            "domain": row["domain"], "target_type": "META_KNOBS", "target_id": str(row["domain"]),
            "part_key": f"global_prior:v{det.get('prior_version')}",
            "p_value": float(row["p_value"]) if gain > 0 and pd.notna(row["p_value"]) else 1.0, "effect": gain,
            "effect_factor": float(np.clip(gain / s.knob_gain_ref, 0.0, 1.0)), "n": n,
            "sample_factor": n / (n + s.n0_ticks), "change": {"knobs": prior},
            "facts": {**det, "gain": gain, "ci_low": row["ci_low"], "ci_high": row["ci_high"]},
        })
    return pd.DataFrame(out, columns=CANDIDATE_COLUMNS)


def churn_candidates(diag: pd.DataFrame, s: ProposalSettings) -> pd.DataFrame:
    rows = diag[diag["section"] == "override_churn"].reset_index(drop=True)
    out = []
    for (_, row), det in zip(rows.iterrows(), _details(rows)):
        n = int(row["n"]) if pd.notna(row["n"]) else 0
        if n == 0:
            continue
        churn = float(row["value"])
        changed = det.get("n_added", 0) + det.get("n_removed", 0)
        p = float(stats.binom.sf(changed - 1, n, s.churn_base))
        min_support = int(min(4 * MIN_SUPPORT, math.ceil(MIN_SUPPORT * (1.0 + churn) / 5) * 5))
        out.append({
            "domain": row["domain"], "target_type": "PM_OVERRIDES", "target_id": str(row["domain"]),
            "part_key": "override_churn", "p_value": p, "effect": churn,
            "effect_factor": float(np.clip((churn - s.churn_base) / s.churn_effect_ref, 0.0, 1.0)), "n": n,
            "sample_factor": n / (n + s.n0_overrides), "change": {"min_support": min_support},
            "facts": {**det, "churn": churn},
        })
    return pd.DataFrame(out, columns=CANDIDATE_COLUMNS)


def score_candidates(diagnostics: pd.DataFrame, settings: ProposalSettings | None = None) -> pd.DataFrame:
    """Every candidate test of the run with its BH q-value and confidence (proposed or not)."""
    s = settings or ProposalSettings()
    parts = [f(diagnostics, s) for f in (strategy_candidates, knob_candidates, prior_candidates, churn_candidates)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=[*CANDIDATE_COLUMNS, "q_value", "confidence"])
    cand = pd.concat(parts, ignore_index=True)
    cand["q_value"] = benjamini_hochberg(cand["p_value"].to_numpy(dtype=float))
    cand["confidence"] = confidence(cand["q_value"].to_numpy(), cand["effect_factor"].to_numpy(dtype=float),
                                    cand["sample_factor"].to_numpy(dtype=float), s.q_full)
    return cand


# ---------------------------------------------------------------------------
# proposals
# ---------------------------------------------------------------------------


def default_snapshot(target_type: str, target_id: str, *, current_knobs: Mapping[str, float] | None = None,
                     regimes: list[str] | None = None) -> dict:
    """The config a target has when no `configs` row exists (documented defaults).

    STRATEGY_CONFIG: weight 1.0 in every regime seen. META_KNOBS: the knobs in effect
    (active config, else controller state, else knob defaults — decided by the caller).
    PM_OVERRIDES: the mining defaults (min_support 30, max_scope_dims 2).
    """
    if target_type == "STRATEGY_CONFIG":
        return {"strategy_id": target_id.split("/", 1)[-1], "regime_weights": {r: 1.0 for r in sorted(regimes or [])}}
    if target_type == "META_KNOBS":
        return {k: float(v) for k, v in {**default_knobs(), **(current_knobs or {})}.items()}
    if target_type == "PM_OVERRIDES":
        return {"min_support": MIN_SUPPORT, "max_scope_dims": MAX_SCOPE_DIMS}
    return {}


def _apply_change(target_type: str, config: dict, change: dict) -> dict:
    new = json.loads(json.dumps(config))
    if target_type == "STRATEGY_CONFIG":
        weights = new.setdefault("regime_weights", {})
        old = float(weights.get(change["regime"], 1.0))
        weights[change["regime"]] = round(min(old, float(change["weight"])), 4)  # an absolute target: never compounds
    elif target_type == "META_KNOBS":
        for k, v in change["knobs"].items():
            new[k] = float(v)
    elif target_type == "PM_OVERRIDES":
        new["min_support"] = max(int(new.get("min_support", MIN_SUPPORT)), int(change["min_support"]))
    return new


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}"


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{float(x):+.{digits}f}"


def _rationale(c: dict, before: dict, after: dict) -> str:
    f, tt = c["facts"], c["target_type"]
    stats_text = (f"one-sided p {_fmt_p(c['p_value'])}, Benjamini–Hochberg q {_fmt_p(c['q_value'])} "
                  f"over all candidate tests; confidence {c['confidence']:.2f}")
    if tt == "STRATEGY_CONFIG":
        regime = c["change"]["regime"]
        old_w = float(before.get("regime_weights", {}).get(regime, 1.0))
        new_w = float(after["regime_weights"][regime])
        change_text = (f"Proposed: lower its weight in {regime} from {old_w:.2f} to {new_w:.2f} (a target share of "
                       f"full weight, 1 − shortfall in sd, bounded to [0.25, 0.9]; never compounded on re-runs).")
        stress = _stress_text(f.get("stress"), new_w)
        if c["part_key"].startswith("peers:"):
            return (
                f"Strategy {f['strategy_id']} in regime {regime} (domain {c['domain']}) returned {_fmt(f.get('mean'))} R "
                f"per trade over {c['n']} trades, while the other strategies in {regime} returned "
                f"{_fmt(f.get('peer_mean'))} R ({f.get('peer_n')} trades) and {f['strategy_id']} itself returned "
                f"{_fmt(f.get('own_mean'))} R in its other regimes ({f.get('own_n')} trades): a shortfall of at least "
                f"{f['shortfall']:.3f} R, {c['effect']:.2f} standard deviations (one-sided Welch tests against both, "
                f"p = the larger; {stats_text}). {change_text}{stress}"
            )
        return (
            f"Strategy {f['strategy_id']} in regime {regime} (domain {c['domain']}) returned {_fmt(f.get('realized_mean'))} R "
            f"per trade over {c['n']} trades, while its {f.get('backtest_runs')} backtest run(s) "
            f"({f.get('backtest_n')} simulated trades) expected {_fmt(f.get('backtest_mean'))} R: a shortfall of "
            f"{-f['diff']:.3f} R (95% CI {-f['ci_high']:.3f} to {-f['ci_low']:.3f}), {c['effect']:.2f} standard "
            f"deviations ({stats_text}). {change_text}{stress}"
        )
    if tt == "META_KNOBS" and c["part_key"].startswith("knob:"):
        knob = f["knob"]
        return (
            f"Knob {knob} (domain {c['domain']}) moves the meta-reward: its mutual information with the reward beats "
            f"the shuffled-reward null (permutation p {_fmt_p(f.get('importance_p'))}). On held-out ticks "
            f"moving it from {before.get(knob, f.get('current')):.4g} to {after[knob]:.4g} is predicted to raise the "
            f"reward by {f['gain']:.4f} (95% CI {f['ci_low']:.4f} to {f['ci_high']:.4f}; {stats_text})."
        )
    if tt == "META_KNOBS":
        changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
        listing = ", ".join(f"{k} {a:.4g}→{b:.4g}" for k, (a, b) in changed.items() if a is not None)
        return (
            f"The global prior (version {f.get('prior_version')}) is {f.get('unit_rms_distance', 0):.2f} away from the "
            f"knobs domain {c['domain']} runs (unit-space RMS) and is predicted to raise its reward by {f['gain']:.4f} "
            f"(95% CI {f['ci_low']:.4f} to {f['ci_high']:.4f}; {stats_text}). Proposed: {listing}."
        )
    if tt == "PM_OVERRIDES":
        return (
            f"{f.get('n_added', 0)} overrides appeared and {f.get('n_removed', 0)} disappeared in domain {c['domain']} "
            f"since the previous run: churn {f['churn']:.0%} of {c['n']} against a {20}% base turnover ({stats_text}). "
            f"Proposed: mine lessons (and so overrides) only with support ≥ {after.get('min_support')} trades "
            f"(was {before.get('min_support', MIN_SUPPORT)})."
        )
    return f"{tt} {c['target_id']}: {stats_text}."


def _stress_text(stress: Mapping | None, weight: float) -> str:
    """The bootstrap stress of a weight cut in words (diagnostics ``tail`` rows)."""
    if not stress or "boot_cell_total_q" not in stress:
        return ""
    q05, q50, q95 = stress["boot_cell_total_q"]
    gain = [(weight - 1.0) * q for q in (q95, q50, q05)]  # ΔR = (w − 1)·cell total: order flips
    dd = stress.get("boot_drawdown", {})
    grid = sorted(float(w) for w in dd)
    nearest = min(grid, key=lambda w: abs(w - weight)) if grid else None
    text = (f" Bootstrap stress ({int(stress.get('n_bootstrap') or 0)} resamples of the strategy's trades): the cut changes its "
            f"total R by {gain[1]:+.1f} (90% interval {gain[0]:+.1f} to {gain[2]:+.1f}); P(cell total < 0) "
            f"{stress['boot_p_cell_total_negative']:.2f}")
    if nearest is not None:
        base, cut = dd[str(1.0)], dd[str(nearest)]
        text += (f"; median max drawdown {base[0]:.1f} R at full weight vs {cut[0]:.1f} R at weight {nearest:g} "
                 f"(95th percentile {base[1]:.1f} vs {cut[1]:.1f})")
    return text + "."


def generate_proposals(
    diagnostics: pd.DataFrame,
    current_configs: Mapping[tuple[str, str], Mapping] | None = None,
    *,
    current_knobs: Mapping[str, Mapping[str, float]] | None = None,
    settings: ProposalSettings | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Proposals from diagnostics of any number of domains; returns (proposals, scored candidates).

    ``current_configs`` maps (target_type, target_id) to the active config (the snapshot);
    targets without one use ``default_snapshot`` (with ``current_knobs[domain]`` for META_KNOBS).
    Proposals are sorted by confidence, highest first.
    """
    s = settings or ProposalSettings()
    current_configs = current_configs or {}
    current_knobs = current_knobs or {}
    cand = score_candidates(diagnostics, s)
    if cand.empty:
        return pd.DataFrame(columns=PROPOSAL_COLUMNS), cand
    regimes = _regimes_by_strategy(diagnostics)
    emitted = cand[(cand["q_value"] <= s.max_q) & (cand["effect_factor"] > 0)]
    proposals = []
    for (tt, tid), group in emitted.groupby(["target_type", "target_id"], sort=True):
        domain = str(group["domain"].iloc[0])
        snapshot = dict(current_configs.get((tt, tid)) or default_snapshot(
            tt, tid, current_knobs=current_knobs.get(domain), regimes=regimes.get(tid)))
        proposed, parts, texts = snapshot, [], []
        # strongest evidence first: a later part never overrides a knob (or a strategy's regime) an
        # earlier part set; a later part on the same strategy regime is recorded as supporting evidence
        taken: set[str] = set()
        deciding: dict[str, dict] = {}
        for c in group.sort_values(["confidence", "part_key"], ascending=[False, True]).to_dict(orient="records"):
            change = c["change"]
            part = {
                "part_key": c["part_key"], "p_value": c["p_value"], "q_value": c["q_value"],
                "effect": c["effect"], "effect_factor": c["effect_factor"], "n": c["n"],
                "sample_factor": c["sample_factor"], "confidence": c["confidence"], "change": change,
                "facts": c["facts"], "role": "decides",
            }
            if tt == "STRATEGY_CONFIG" and change["regime"] in deciding:
                if deciding[change["regime"]]["proposed"]:
                    parts.append({**part, "role": "supports"})
                continue
            if tt == "META_KNOBS":
                change = {"knobs": {k: v for k, v in change["knobs"].items() if k not in taken}}
                taken |= set(change["knobs"])
                part["change"] = change
            after = _apply_change(tt, proposed, change)
            if tt == "STRATEGY_CONFIG":
                deciding[change["regime"]] = {"proposed": canonical(after) != canonical(proposed)}
            if canonical(after) == canonical(proposed):
                continue  # no-op against the current (applied) config: the same evidence does not cut again
            texts.append(_rationale({**c, "change": change}, proposed, after))
            proposed = after
            parts.append(part)
        if not parts:
            continue
        conf = float(min(p["confidence"] for p in parts if p["role"] == "decides"))
        if tt == "STRATEGY_CONFIG" and any(p["role"] == "supports" for p in parts):
            texts.append("Supporting evidence for the same regime: " + "; ".join(
                f"{p['part_key']} (q {_fmt_p(p['q_value'])}, confidence {p['confidence']:.2f})"
                for p in parts if p["role"] == "supports") + ".")
        evidence = {
            "parts": parts,
            "n_candidate_tests": int(len(cand)),
            "method": ("confidence = evidence·effect·sample; evidence = clip(log10(1/q)/log10(1/q_full), 0, 1), "
                       "q = Benjamini–Hochberg over all candidate tests of the run; proposal = min over parts"),
            "settings": {"q_full": s.q_full, "max_q": s.max_q, "strategy_effect_ref": s.strategy_effect_ref,
                         "knob_gain_ref": s.knob_gain_ref},
        }
        if tt == "META_KNOBS":
            evidence["neighbours"] = _neighbour_evidence(diagnostics, domain)
        proposals.append({
            "domain": domain, "target_type": tt, "target_id": tid,
            "current_config_snapshot_json": canonical_json(snapshot),
            "proposed_config_json": canonical_json(proposed),
            "rationale_text": " ".join(texts),
            "evidence_json": json.dumps(canonical(evidence), sort_keys=True),
            "evidence_hash": evidence_hash(tt, tid, snapshot, proposed, [p["part_key"] for p in parts]),
            "confidence": conf,
        })
    out = pd.DataFrame(proposals, columns=PROPOSAL_COLUMNS)
    return out.sort_values(["confidence", "target_id"], ascending=[False, True], ignore_index=True), cand


def _regimes_by_strategy(diag: pd.DataFrame) -> dict[str, list[str]]:
    rows = diag[diag["section"] == "by_strategy_regime"]
    out: dict[str, list[str]] = {}
    for dom, subject in zip(rows["domain"], rows["subject"]):
        strategy, _, regime = str(subject).rpartition("/")
        out.setdefault(f"{dom}/{strategy}", []).append(regime)
    return out


def _neighbour_evidence(diag: pd.DataFrame, domain: str) -> list[dict]:
    """The best past configurations under similar conditions (descriptive support only)."""
    rows = diag[(diag["domain"] == domain) & (diag["section"] == "nearest_configs")]
    return [{"subject": subj, "reward": val, **(json.loads(det) if det else {})}
            for subj, val, det in zip(rows["subject"], rows["value"], rows["details_json"])]
