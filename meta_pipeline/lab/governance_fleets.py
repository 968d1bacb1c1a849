"""Planted fleets for governance: trades only (no telemetry), one strategy × regime cell that loses.

``governance_fleet`` builds domains whose trades have a known truth: every strategy ×
regime cell earns ``base_r`` R per trade, except (optionally) one planted cell in one
domain that earns ``planted_r``. Noise is unit-variance (Gaussian or Student-t), each
trade has one noise pattern (no edge), a sector and a profile attribute (``scope.sector``,
``scope.profile``) and, for ``risk_override_p`` of the trades, a risk override
(``scope.risk_override`` = its reason) that costs ``risk_override_r`` R.

``governance_section`` (``meta-pipeline evaluate --section governance``) measures the
proposals on such fleets: on planted fleets whether the top proposal targets the planted
cell and with what confidence; on null fleets (nothing planted) the largest confidence of
any proposal; and whether, once the planted proposal is applied, the same evidence
proposes it again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from meta_pipeline.governance.diagnostics import DiagnosticsInputs, compute_diagnostics
from meta_pipeline.governance.proposals import generate_proposals

STRATEGIES = ("alpha", "beta", "gamma", "delta")
REGIMES = ("trend", "range", "volatile")
REGIME_P = (0.45, 0.35, 0.20)
SECTORS = ("tech", "energy", "health", "finance")
PROFILES = ("aggressive", "balanced", "conservative")
RISK_REASONS = ("max_loss", "news")


@dataclass(frozen=True)
class GovernanceFleetConfig:
    n_domains: int = 4
    n_trades: int = 6000  # per domain (the synthetic fleets' default size)
    days: float = 60.0
    base_r: float = 0.06  # every cell's mean R per trade
    planted: tuple[str, str, str] | None = ("dom0", "gamma", "range")  # (domain, strategy, regime) or None
    planted_r: float = -0.40
    noise: str = "gaussian"  # or "student_t" (df 4, unit variance)
    risk_override_p: float = 0.05
    risk_override_r: float = -0.15
    start: pd.Timestamp = pd.Timestamp("2026-06-01", tz="UTC")
    seed: int = 0

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(f"dom{i}" for i in range(self.n_domains))


@dataclass
class GovernanceDomain:
    domain: str
    trades: pd.DataFrame  # trade_id, closed_at, regime, strategy_id, return_r
    patterns: pd.DataFrame  # trade_id, pattern
    scope: pd.DataFrame  # trade_id, key, value

    def contract_frame(self) -> pd.DataFrame:
        """The trades in the ingest contract (patterns as a|b, scope.* columns; empty = absent)."""
        frame = self.trades.copy()
        frame["closed_at"] = pd.to_datetime(frame["closed_at"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        frame["patterns"] = frame["trade_id"].map(self.patterns.groupby("trade_id")["pattern"].agg("|".join))
        wide = self.scope.pivot(index="trade_id", columns="key", values="value")
        for key in wide.columns:
            frame[f"scope.{key}"] = frame["trade_id"].map(wide[key]).fillna("")
        return frame

    def write_trades_file(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.contract_frame().to_csv(path, index=False)
        return path


def governance_fleet(config: GovernanceFleetConfig | None = None) -> dict[str, GovernanceDomain]:
    """The fleet's domains (see module doc); deterministic in ``config.seed``."""
    cfg = config or GovernanceFleetConfig()
    out = {}
    for i, domain in enumerate(cfg.domains):
        rng = np.random.default_rng([cfg.seed, i, 0x60FE])
        n = cfg.n_trades
        regime = rng.choice(len(REGIMES), size=n, p=REGIME_P)
        strategy = rng.integers(0, len(STRATEGIES), size=n)
        mean = np.full(n, cfg.base_r)
        if cfg.planted is not None and cfg.planted[0] == domain:
            cell = (strategy == STRATEGIES.index(cfg.planted[1])) & (regime == REGIMES.index(cfg.planted[2]))
            mean[cell] = cfg.planted_r
        if cfg.noise == "student_t":
            noise = rng.standard_t(4, size=n) / np.sqrt(2.0)  # unit variance
        else:
            noise = rng.standard_normal(n)
        overridden = rng.random(n) < cfg.risk_override_p
        r = mean + noise + np.where(overridden, cfg.risk_override_r, 0.0)
        hours = np.sort(rng.uniform(0, cfg.days * 24, n))
        ids = np.array([f"{domain}-t{k:06d}" for k in range(n)])
        trades = pd.DataFrame({
            "trade_id": ids, "closed_at": cfg.start + pd.to_timedelta(hours, unit="h"),
            "regime": np.array(REGIMES)[regime], "strategy_id": np.array(STRATEGIES)[strategy], "return_r": r,
        })
        patterns = pd.DataFrame({"trade_id": ids, "pattern": [f"N{k}.noise" for k in rng.integers(0, 6, n)]})
        scope = pd.concat([
            pd.DataFrame({"trade_id": ids, "key": "sector", "value": np.array(SECTORS)[rng.integers(0, len(SECTORS), n)]}),
            pd.DataFrame({"trade_id": ids, "key": "profile",
                          "value": np.array(PROFILES)[rng.integers(0, len(PROFILES), n)]}),
            pd.DataFrame({"trade_id": ids[overridden], "key": "risk_override",
                          "value": np.array(RISK_REASONS)[rng.integers(0, len(RISK_REASONS), int(overridden.sum()))]}),
        ], ignore_index=True)
        out[domain] = GovernanceDomain(domain, trades, patterns, scope)
    return out


def fleet_diagnostics(fleet: dict[str, GovernanceDomain]) -> pd.DataFrame:
    """Every domain's diagnostics rows (trades, patterns and scope only: no telemetry, no backtests)."""
    rows = [compute_diagnostics(DiagnosticsInputs(domain=d.domain, trades=d.trades, trade_patterns=d.patterns,
                                                  trade_scope=d.scope)).rows for d in fleet.values()]
    return pd.concat(rows, ignore_index=True)


@dataclass
class GovernanceSectionConfig:
    seeds: tuple[int, ...] = tuple(range(10))
    fleet: GovernanceFleetConfig = field(default_factory=GovernanceFleetConfig)
    target_confidence: float = 0.7
    null_ceiling: float = 0.5


def _planted_case(seed: int, cfg: GovernanceSectionConfig) -> dict:
    fleet_cfg = GovernanceFleetConfig(**{**cfg.fleet.__dict__, "seed": seed})
    diag = fleet_diagnostics(governance_fleet(fleet_cfg))
    proposals, candidates = generate_proposals(diag)
    domain, strategy, regime = fleet_cfg.planted
    target = f"{domain}/{strategy}"
    top = proposals.iloc[0] if len(proposals) else None
    hit = top is not None and top["target_type"] == "STRATEGY_CONFIG" and top["target_id"] == target \
        and json.loads(top["proposed_config_json"])["regime_weights"].get(regime, 1.0) < 1.0
    others = proposals[proposals["target_id"] != target]
    # apply the planted proposal (its proposed config becomes the active one) and re-run on the same evidence
    again = None
    if top is not None:
        applied = {(top["target_type"], top["target_id"]): json.loads(top["proposed_config_json"])}
        rerun, _ = generate_proposals(diag, applied)
        again = bool(((rerun["target_type"] == top["target_type"]) & (rerun["target_id"] == top["target_id"])).any())
    peer = diag[(diag["section"] == "strategy_vs_peers") & (diag["domain"] == domain)
                & (diag["subject"] == f"{strategy}/{regime}")]
    return {
        "seed": seed, "top_target": None if top is None else f"{top['target_type']} {top['target_id']}",
        "top_is_planted": bool(hit), "top_confidence": None if top is None else float(top["confidence"]),
        "proposed_weight": None if top is None else json.loads(top["proposed_config_json"]).get("regime_weights", {}).get(regime),
        "planted_p_value": float(peer["p_value"].iloc[0]) if len(peer) else None,
        "max_other_confidence": float(others["confidence"].max()) if len(others) else 0.0,
        "n_proposals": int(len(proposals)), "n_candidate_tests": int(len(candidates)),
        "repeated_after_apply": again,
    }


def _null_case(seed: int, cfg: GovernanceSectionConfig) -> dict:
    fleet_cfg = GovernanceFleetConfig(**{**cfg.fleet.__dict__, "seed": 10_000 + seed, "planted": None})
    diag = fleet_diagnostics(governance_fleet(fleet_cfg))
    proposals, candidates = generate_proposals(diag)
    return {"seed": seed, "n_proposals": int(len(proposals)),
            "max_confidence": float(proposals["confidence"].max()) if len(proposals) else 0.0,
            "min_q": float(candidates["q_value"].min()) if len(candidates) else 1.0,
            "n_candidate_tests": int(len(candidates))}


def governance_section(config: GovernanceSectionConfig | None = None,
                       progress: Callable[[str], None] | None = None) -> dict:
    """Planted and null fleets over ``config.seeds`` (see module doc); figures and whether each target is met."""
    cfg = config or GovernanceSectionConfig()
    started = time.perf_counter()
    planted, null = [], []
    for seed in cfg.seeds:
        if progress:
            progress(f"governance: {cfg.fleet.n_trades} trades, {cfg.fleet.noise} noise, seed {seed}")
        planted.append(_planted_case(seed, cfg))
        null.append(_null_case(seed, cfg))
    conf = np.array([p["top_confidence"] or 0.0 for p in planted])
    hits = np.array([p["top_is_planted"] for p in planted])
    null_max = np.array([n["max_confidence"] for n in null])
    other_max = np.array([p["max_other_confidence"] for p in planted])
    repeated = [p["repeated_after_apply"] for p in planted]
    summary = {
        "seeds": len(cfg.seeds),
        "top_is_planted": int(hits.sum()),
        "top_confidence_min": float(conf.min()), "top_confidence_mean": float(conf.mean()),
        "confidence_target": cfg.target_confidence,
        "planted_met": bool(hits.all() and (conf >= cfg.target_confidence).all()),
        "null_max_confidence": float(null_max.max()),
        "planted_fleets_max_spurious_confidence": float(other_max.max()),
        "null_ceiling": cfg.null_ceiling,
        "null_met": bool(null_max.max() < cfg.null_ceiling and other_max.max() < cfg.null_ceiling),
        "null_fleets_with_any_proposal": int(sum(n["n_proposals"] > 0 for n in null)),
        "null_min_q": float(min(n["min_q"] for n in null)),
        "repeated_after_apply": int(sum(bool(r) for r in repeated)),
        "no_repeat_met": not any(bool(r) for r in repeated),
        "seconds": time.perf_counter() - started,
    }
    return {"summary": summary, "planted": planted, "null": null,
            "fleet": {k: (str(v) if isinstance(v, pd.Timestamp) else v) for k, v in cfg.fleet.__dict__.items()}}


def format_governance(result: dict) -> str:
    s, f = result["summary"], result["fleet"]
    lines = [
        "Governance on trades-only fleets (no telemetry, no backtests)",
        f"  fleets: {f['n_domains']} domains × {f['n_trades']} trades, {len(STRATEGIES)} strategies × {len(REGIMES)} "
        f"regimes, every cell {f['base_r']:+.2f} R/trade, unit-variance {f['noise']} noise; planted: "
        f"{'/'.join(f['planted'] or ())} at {f['planted_r']:+.2f} R/trade; {s['seeds']} seeds each",
        "",
        "| measure | result | target | met |",
        "|---|---|---|---|",
        f"| top proposal targets the planted cell | {s['top_is_planted']}/{s['seeds']} seeds | all | "
        f"{'yes' if s['top_is_planted'] == s['seeds'] else 'NO'} |",
        f"| its confidence (min / mean over seeds) | {s['top_confidence_min']:.3f} / {s['top_confidence_mean']:.3f} | "
        f"≥ {s['confidence_target']} | {'yes' if s['planted_met'] else 'NO'} |",
        f"| largest confidence of any proposal on null fleets | {s['null_max_confidence']:.3f} "
        f"({s['null_fleets_with_any_proposal']}/{s['seeds']} null fleets with any proposal; smallest BH q of any "
        f"null test {s['null_min_q']:.3f}) | < {s['null_ceiling']} | "
        f"{'yes' if s['null_max_confidence'] < s['null_ceiling'] else 'NO'} |",
        f"| largest confidence of a spurious proposal on planted fleets | "
        f"{s['planted_fleets_max_spurious_confidence']:.3f} | < {s['null_ceiling']} | "
        f"{'yes' if s['planted_fleets_max_spurious_confidence'] < s['null_ceiling'] else 'NO'} |",
        f"| planted proposal proposed again after it is applied (same evidence) | {s['repeated_after_apply']}/"
        f"{s['seeds']} | 0 | {'yes' if s['no_repeat_met'] else 'NO'} |",
        "",
        "per seed (planted): " + ", ".join(
            f"{p['seed']}: {p['top_confidence']:.2f} w={p['proposed_weight']}" if p["top_confidence"] is not None
            else f"{p['seed']}: none" for p in result["planted"]),
        f"{s['seconds']:.1f} s",
    ]
    return "\n".join(lines)


# (trades per domain, noise): the synthetic fleets' default size, a quarter of it, and heavy tails
VARIANTS = ((6000, "gaussian"), (1500, "gaussian"), (6000, "student_t"))


def governance_report(seeds: tuple[int, ...], progress: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """The section for every fleet variant in ``VARIANTS``: (results, text)."""
    results, text = {}, []
    for n, noise in VARIANTS:
        cfg = GovernanceSectionConfig(seeds=seeds, fleet=GovernanceFleetConfig(n_trades=n, noise=noise))
        key = f"n_trades_{n}_{noise}"
        results[key] = governance_section(cfg, progress=progress)
        text.append(format_governance(results[key]))
    return results, "\n\n".join(text)
