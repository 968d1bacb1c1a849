"""A synthetic fleet with planted ground truth, for the demo, the tests and the benchmarks.

Each domain gets closed trades whose `return_r` is built from known parts:

* **signals** — each pattern family carries one planted edge that lives at one scope
  (e.g. `chain=solana`), with a known initial edge `e0` and decay rate λ
  (decaying, stable or improving): `edge(t) = e0·exp(−λ·t_hours)`;
* **pattern families** — the members of a family fire together (the latent factors);
* **regime metric weights** — `Σ_m w[regime, m]·z_m` with `z_m = (metric_m − center_m)/scale_m`;
* **strategy effects** — optionally one strategy underperforms in one regime
  (its backtests do not know it);
* **noise patterns** with no edge, and Gaussian noise.

Telemetry comes from a simulated engine (`SimEngine`) whose meta-reward responds to the
knobs with a domain-specific optimum. Everything returns the truth as plain objects,
and `write_fleet_files` writes files in the ingest contract so the user path is tested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from meta_pipeline.contracts import lesson_key
from meta_pipeline.meta.reward import meta_reward
from meta_pipeline.knobs import KNOB_NAMES, KNOBS, knobs_to_unit, unit_to_knobs

REGIMES = ("S0", "S1", "S2")
REGIME_P = (0.45, 0.35, 0.20)
STRATEGIES = ("alpha", "beta", "gamma")
CHAINS = ("solana", "base", "eth")
CHAIN_P = (0.5, 0.3, 0.2)
SIZES = ("micro", "small", "large")
SIZE_P = (0.4, 0.4, 0.2)
METRICS = ("time_efficiency", "slippage", "fill_quality", "momentum")
METRIC_CENTER = {"time_efficiency": 0.6, "slippage": 12.0, "fill_quality": 0.85, "momentum": 0.0}
METRIC_SCALE = {"time_efficiency": 0.15, "slippage": 4.0, "fill_quality": 0.05, "momentum": 1.5}
MEMBER_NAMES = ("buy_flag", "breakout", "volume_spike", "trend_ok", "pullback", "range_break")
NOISE_KINDS = ("gaussian", "student_t", "heteroscedastic", "student_t_heteroscedastic")
HOURS_PER_DAY = 24.0


@dataclass(frozen=True)
class SignalTruth:
    """One planted edge: a family's patterns at one scope."""

    family: str
    patterns: tuple[str, ...]
    scope: dict[str, str]
    e0: float
    decay_rate_per_hour: float
    state: str  # decaying | stable | improving

    @property
    def half_life_hours(self) -> float | None:
        return math.log(2) / self.decay_rate_per_hour if self.decay_rate_per_hour > 0 else None

    @property
    def lesson_keys(self) -> tuple[str, ...]:
        """The lessons (one per pattern) at exactly the scope where the edge lives."""
        return tuple(lesson_key(p, self.scope) for p in self.patterns)

    def edge_at(self, t_hours: np.ndarray | float) -> np.ndarray:
        return self.e0 * np.exp(-self.decay_rate_per_hour * np.asarray(t_hours, dtype=float))


@dataclass
class DomainTruth:
    domain: str
    t0: pd.Timestamp  # start of the trades window (t_hours = 0)
    train_end: pd.Timestamp  # trades before this are the training file; after it, held out
    end: pd.Timestamp
    signals: list[SignalTruth]
    families: dict[str, tuple[str, ...]]
    noise_patterns: tuple[str, ...]
    regime_weights: pd.DataFrame  # regime, metric, weight (on z = (metric-center)/scale)
    metric_center: dict[str, float]
    metric_scale: dict[str, float]
    strategy_effects: pd.DataFrame  # strategy_id, regime, effect (centered over the trade mix)
    underperformer: tuple[str, str] | None
    engine: "SimEngine"
    break_at: pd.Timestamp | None = None  # when the planted break flipped the first signals (None: no break)
    broken_families: tuple[str, ...] = ()

    def family_of_pattern(self) -> dict[str, str]:
        """pattern -> family id; noise patterns map to themselves (each its own group)."""
        out = {p: f for f, ps in self.families.items() for p in ps}
        out.update({p: p for p in self.noise_patterns})
        return out

    def expected_return(self, trades: pd.DataFrame) -> np.ndarray:
        """True E[return_r | trade] (without noise) for trades in the internal frame layout."""
        return trades["expected_r"].to_numpy()


@dataclass
class DomainData:
    domain: str
    trades: pd.DataFrame  # internal layout (see _generate_trades), all trades incl. holdout
    telemetry: pd.DataFrame  # ingest layout (ts, gain_p50, ..., knob.<name>)
    backtests: pd.DataFrame  # backtest_runs layout
    truth: DomainTruth

    @property
    def train_trades(self) -> pd.DataFrame:
        return self.trades[self.trades["closed_at"] < self.truth.train_end].reset_index(drop=True)

    @property
    def holdout_trades(self) -> pd.DataFrame:
        return self.trades[self.trades["closed_at"] >= self.truth.train_end].reset_index(drop=True)


@dataclass
class FleetConfig:
    n_domains: int = 3
    n_trades: int = 6000  # per domain, including the held-out tail
    train_days: float = 60.0
    holdout_days: float = 10.0
    n_families: int = 6
    members_per_family: int = 3
    family_fire_p: tuple[float, float] = (0.12, 0.22)
    member_fire_p: float = 0.9
    n_noise_patterns: int = 6
    noise_fire_p: tuple[float, float] = (0.06, 0.14)
    noise_sd: float = 1.0
    e0_range: tuple[float, float] = (0.35, 0.8)
    decaying_half_life_days: tuple[float, float] = (10.0, 40.0)
    improving_doubling_days: tuple[float, float] = (60.0, 120.0)
    metric_weight_sd: float = 0.25
    regime_weight_sd: float = 0.2
    metric_missing_p: float = 0.02
    size_missing_p: float = 0.03
    underperform: tuple[str, str] | None = ("beta", "S1")
    underperform_effect: float = -0.5
    telemetry_ticks: int = 400
    telemetry_every: pd.Timedelta = pd.Timedelta(minutes=5)
    n_backtests_per_cell: int = 3
    outlier_domain: bool = False  # last domain's knob optimum far from the others
    start: pd.Timestamp = pd.Timestamp("2026-06-01", tz="UTC")
    seed: int = 0
    domain_prefix: str = "dom"
    domain_names: tuple[str, ...] | None = None
    # a planted break: the first `break_families` signals' edges flip sign at this day (None: no break)
    break_at_days: float | None = None
    break_families: int = 2
    # --- generator variation (so tests cannot pass on one generator's shape). The defaults
    # below leave the fleet above byte-identical: variation draws come from their own stream
    # (seeded by seed and domain index), never from the main one.
    members_per_family_range: tuple[int, int] | None = None  # family size per family, inclusive (2..6)
    member_fire_p_range: tuple[float, float] | None = None  # co-firing: P(member fires | family on), per family
    noise_kind: str = "gaussian"  # one of NOISE_KINDS
    noise_t_df: float = 3.0  # student_t*: degrees of freedom (unit variance after scaling)
    noise_day_sd_range: tuple[float, float] = (0.5, 2.0)  # heteroscedastic*: per-day sd multiplier, log-uniform
    noise_sd_trend: float = 0.0  # heteroscedastic*: sd multiplier exp(trend·(t/T − ½)); > 0 noisier late, < 0 early
    noise_scope_sd: tuple[float, float] = (1.0, 1.0)  # heteroscedastic*: per-chain sd multiplier, log-uniform
    edge_day_cv: float = 0.0  # day-to-day multiplicative wobble of each planted edge (overdispersion)
    edge_day_ar: float = 0.0  # AR(1) coefficient of that wobble across days (0: independent days)
    scope_depths: tuple[int, ...] | None = None  # each signal's scope depth drawn from these (0 global, 1, 2)


@dataclass
class Fleet:
    config: FleetConfig
    domains: dict[str, DomainData] = field(default_factory=dict)

    @property
    def truth(self) -> dict[str, DomainTruth]:
        return {d: data.truth for d, data in self.domains.items()}


# ---------------------------------------------------------------------------
# The simulated engine (telemetry)
# ---------------------------------------------------------------------------

DEFAULT_SENSITIVITY = {
    "tau": 2.0,  # the influential knob
    "g_min": 0.6,
    "lambda_ci": 0.3,
    "gamma_diversity": 0.0,
    "tier2_enabled": 0.1,
    "tier3_topk": 0.2,
}


@dataclass
class SimEngine:
    """An engine whose telemetry responds to the knobs in effect.

    quality(u) = 1 − Σ_k s_k (u_k − o_k)² over knobs mapped to [0,1] (u), with a
    domain optimum o and sensitivities s. gain and stability rise with quality; a
    larger `tier3_topk` costs memory and latency (weighted by `resource_coupling`).
    An optional regime shift moves the optimum at tick `shift_at`.
    """

    domain: str
    optimum: dict[str, float]
    sensitivity: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SENSITIVITY))
    noise_sd: float = 0.004  # on gain_p50 (reward units ≈ noise_sd/0.05·0.6)
    resource_coupling: float = 1.0
    shift_at: int | None = None
    shifted_optimum: dict[str, float] | None = None

    def optimum_at(self, tick: int) -> dict[str, float]:
        if self.shift_at is not None and self.shifted_optimum is not None and tick >= self.shift_at:
            return self.shifted_optimum
        return self.optimum

    def expected_telemetry(self, knobs: dict[str, float], tick: int = 0) -> dict[str, float]:
        u = knobs_to_unit(knobs)
        o = knobs_to_unit(self.optimum_at(tick))
        s = np.array([self.sensitivity.get(n, 0.0) for n in KNOB_NAMES])
        quality = 1.0 - float(np.sum(s * (u - o) ** 2))
        topk_u = KNOBS["tier3_topk"].to_unit(knobs.get("tier3_topk", KNOBS["tier3_topk"].default))
        return {
            "gain_p50": 0.05 * quality,
            "stability_mean": float(np.clip(0.55 + 0.35 * quality, 0.0, 1.0)),
            "vram_utilization": float(np.clip(0.45 + 0.35 * self.resource_coupling * topk_u, 0.0, 1.0)),
            "latency_ms": 60.0 + 160.0 * self.resource_coupling * topk_u,
        }

    def expected_reward(self, knobs: dict[str, float], tick: int = 0) -> float:
        return float(meta_reward(**self.expected_telemetry(knobs, tick)))

    def tick(self, knobs: dict[str, float], tick: int, rng: np.random.Generator) -> dict[str, float]:
        """One noisy telemetry row for the knobs in effect."""
        e = self.expected_telemetry(knobs, tick)
        return {
            "gain_p50": e["gain_p50"] + rng.normal(0, self.noise_sd),
            "stability_mean": float(np.clip(e["stability_mean"] + rng.normal(0, 0.02), 0.0, 1.0)),
            "vram_utilization": float(np.clip(e["vram_utilization"] + rng.normal(0, 0.01), 0.0, 1.0)),
            "latency_ms": max(0.0, e["latency_ms"] + rng.normal(0, 5.0)),
        }

    def oracle(self, tick: int = 0, grid: int = 41) -> tuple[dict[str, float], float]:
        """The best knobs and their expected reward, by coordinate search over a fine grid.

        The objective is separable in the knobs except through the shared resource term,
        which depends on tier3_topk only, so coordinate-wise search is exact here.
        """
        best = dict(self.optimum_at(tick))
        for _ in range(2):
            for name in KNOB_NAMES:
                spec = KNOBS[name]
                if spec.kind == "bool":
                    candidates = [0.0, 1.0]
                elif spec.kind == "int":
                    candidates = [float(v) for v in range(int(spec.low), int(spec.high) + 1)]
                else:
                    candidates = list(np.linspace(spec.low, spec.high, grid))
                rewards = [self.expected_reward({**best, name: c}, tick) for c in candidates]
                best[name] = candidates[int(np.argmax(rewards))]
        return best, self.expected_reward(best, tick)


def make_engine(domain: str, rng: np.random.Generator, *, outlier: bool = False,
                center: np.ndarray | None = None, spread: float = 0.08) -> SimEngine:
    """A domain's engine: optimum near the fleet centre (or far from it for an outlier)."""
    if center is None:
        center = np.array([0.7, 0.35, 0.3, 0.55, 1.0, 0.4])
    if outlier:
        unit = np.clip(1.0 - center + rng.normal(0, 0.03, len(center)), 0.02, 0.98)
    else:
        unit = np.clip(center + rng.normal(0, spread, len(center)), 0.05, 0.95)
    optimum = unit_to_knobs(unit)
    optimum["tier2_enabled"] = 1.0 if not outlier else 0.0
    return SimEngine(domain=domain, optimum=optimum)


def simulate_telemetry(
    engine: SimEngine,
    knob_sequence: list[dict[str, float]],
    *,
    start: pd.Timestamp,
    every: pd.Timedelta,
    rng: np.random.Generator,
    first_tick: int = 0,
) -> pd.DataFrame:
    """Telemetry rows (ingest layout) for a given sequence of knobs in effect."""
    rows = []
    for i, knobs in enumerate(knob_sequence):
        tick = first_tick + i
        row = {"ts": start + every * tick, **engine.tick(knobs, tick, rng)}
        row.update({f"knob.{k}": float(v) for k, v in knobs.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def exploration_knobs(n: int, rng: np.random.Generator, center: dict[str, float] | None = None,
                      spread: float = 0.25) -> list[dict[str, float]]:
    """Random knob settings around a centre, as a runtime exploring would produce."""
    base = knobs_to_unit(center or {n_: KNOBS[n_].default for n_ in KNOB_NAMES})
    units = np.clip(base + rng.normal(0, spread, (n, len(KNOB_NAMES))), 0, 1)
    return [unit_to_knobs(u) for u in units]


# ---------------------------------------------------------------------------
# Trades
# ---------------------------------------------------------------------------


def _vrng(vrng: np.random.Generator | None) -> np.random.Generator:
    if vrng is None:
        raise ValueError("generator variation needs its own random stream")
    return vrng


def _family_patterns(f: int, members: int) -> tuple[str, ...]:
    return tuple(f"F{f}.{MEMBER_NAMES[m % len(MEMBER_NAMES)]}" for m in range(members))


def _random_scope(depth: int, vrng: np.random.Generator) -> dict[str, str]:
    """A scope of ``depth`` attributes (0: global, 1: chain or size, 2: chain and size), values by their mix."""
    chain = str(CHAINS[vrng.choice(len(CHAINS), p=CHAIN_P)])
    size = str(SIZES[vrng.choice(len(SIZES), p=SIZE_P)])
    if depth <= 0:
        return {}
    if depth == 1:
        return {"chain": chain} if vrng.random() < 0.5 else {"size": size}
    return {"chain": chain, "size": size}


def _plant_signals(
    cfg: FleetConfig, rng: np.random.Generator, vrng: np.random.Generator | None = None
) -> tuple[list[SignalTruth], dict[str, tuple[str, ...]]]:
    states = ("decaying", "stable", "improving", "decaying")
    scopes_pool = [
        {"chain": "solana"},
        {},
        {"chain": "solana", "size": "micro"},
        {"size": "small"},
        {"chain": "base"},
        {"chain": "solana", "size": "small"},
    ]
    signals, families = [], {}
    for f in range(cfg.n_families):
        fam = f"F{f}"
        members = cfg.members_per_family
        if cfg.members_per_family_range is not None:
            lo, hi = cfg.members_per_family_range
            members = int(_vrng(vrng).integers(lo, hi + 1))
        patterns = _family_patterns(f, members)
        families[fam] = patterns
        state = states[f % len(states)]
        e0 = float(rng.uniform(*cfg.e0_range))
        if state == "decaying":
            days = float(rng.uniform(*cfg.decaying_half_life_days))
            rate = math.log(2) / (days * HOURS_PER_DAY)
        elif state == "improving":
            days = float(rng.uniform(*cfg.improving_doubling_days))
            rate = -math.log(2) / (days * HOURS_PER_DAY)
            e0 *= 0.6  # grows over the window; keep it in the same range
        else:
            rate = 0.0
        scope = dict(scopes_pool[(f + int(rng.integers(0, 2))) % len(scopes_pool)])
        if cfg.scope_depths is not None:
            v = _vrng(vrng)
            scope = _random_scope(int(v.choice(np.asarray(cfg.scope_depths))), v)
        signals.append(SignalTruth(fam, patterns, scope, e0, rate, state))
    return signals, families


def _generate_domain(cfg: FleetConfig, domain: str, index: int, rng: np.random.Generator) -> DomainData:
    n = cfg.n_trades
    total_hours = (cfg.train_days + cfg.holdout_days) * HOURS_PER_DAY
    t_hours = np.sort(rng.uniform(0, total_hours, n))
    t0 = cfg.start
    closed_at = t0 + pd.to_timedelta(t_hours, unit="h")
    regime_idx = rng.choice(len(REGIMES), size=n, p=REGIME_P)
    strategy_idx = rng.integers(0, len(STRATEGIES), size=n)
    chain_idx = rng.choice(len(CHAINS), size=n, p=CHAIN_P)
    size_idx = rng.choice(len(SIZES), size=n, p=SIZE_P)
    size_idx = np.where(rng.random(n) < cfg.size_missing_p, -1, size_idx)

    # variation draws only (see FleetConfig): a separate stream keeps the default fleet unchanged
    vrng = np.random.default_rng([int(cfg.seed), int(index), 0x5EED])
    if cfg.noise_kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS} (got {cfg.noise_kind!r})")
    signals, families = _plant_signals(cfg, rng, vrng)
    noise_patterns = tuple(f"N{j}.noise" for j in range(cfg.n_noise_patterns))

    # which patterns fired: members of an active family fire together
    pattern_names: list[str] = []
    fired_cols: list[np.ndarray] = []
    family_active: dict[str, np.ndarray] = {}
    for fam, patterns in families.items():
        p_fire = rng.uniform(*cfg.family_fire_p)
        on = rng.random(n) < p_fire
        member_p = cfg.member_fire_p if cfg.member_fire_p_range is None else float(vrng.uniform(*cfg.member_fire_p_range))
        members = (rng.random((len(patterns), n)) < member_p) & on
        family_active[fam] = members.any(axis=0)
        pattern_names.extend(patterns)
        fired_cols.extend(members)
    for name in noise_patterns:
        pattern_names.append(name)
        fired_cols.append(rng.random(n) < rng.uniform(*cfg.noise_fire_p))
    fired = np.column_stack(fired_cols)  # n × patterns
    none = ~fired.any(axis=1)
    if none.any():  # the contract wants ≥ 1 pattern per trade: give those a noise pattern
        first_noise = len(pattern_names) - len(noise_patterns)
        fired[np.flatnonzero(none), first_noise + rng.integers(0, len(noise_patterns), none.sum())] = True

    # planted edges
    signal_part = np.zeros(n)
    chain_names = np.array(CHAINS)[chain_idx]
    size_names = np.where(size_idx >= 0, np.array(SIZES)[np.maximum(size_idx, 0)], "")
    for k, sig in enumerate(signals):
        match = family_active[sig.family].copy()
        if "chain" in sig.scope:
            match &= chain_names == sig.scope["chain"]
        if "size" in sig.scope:
            match &= size_names == sig.scope["size"]
        edge = sig.edge_at(t_hours)
        if cfg.edge_day_cv > 0:  # the edge wobbles from day to day around its curve (mean unchanged)
            day = (t_hours // HOURS_PER_DAY).astype(np.int64)
            edge = edge * (1.0 + cfg.edge_day_cv * _ar1(vrng, int(day.max()) + 1, cfg.edge_day_ar)[day])
        if cfg.break_at_days is not None and k < cfg.break_families:  # the planted break: the edge flips sign
            edge = np.where(t_hours > cfg.break_at_days * HOURS_PER_DAY, -edge, edge)
        signal_part += np.where(match, edge, 0.0)

    # regime metric weights
    global_w = rng.normal(0, cfg.metric_weight_sd, len(METRICS))
    weights = global_w[None, :] + rng.normal(0, cfg.regime_weight_sd, (len(REGIMES), len(METRICS)))
    z = rng.normal(0, 1, (n, len(METRICS)))
    metric_part = np.einsum("nm,nm->n", weights[regime_idx], z)
    metric_values = {m: METRIC_CENTER[m] + METRIC_SCALE[m] * z[:, j] for j, m in enumerate(METRICS)}
    missing = rng.random((n, len(METRICS))) < cfg.metric_missing_p

    # strategy effects, centred so the fleet-wide mean of return_r is not shifted
    effects = np.zeros((len(STRATEGIES), len(REGIMES)))
    if cfg.underperform is not None:
        s, r = cfg.underperform
        effects[STRATEGIES.index(s), REGIMES.index(r)] = cfg.underperform_effect
    cell_p = np.outer(np.full(len(STRATEGIES), 1 / len(STRATEGIES)), REGIME_P)
    effects -= float((effects * cell_p).sum())
    strategy_part = effects[strategy_idx, regime_idx]

    expected = signal_part + metric_part + strategy_part
    if cfg.noise_kind == "gaussian":
        return_r = expected + rng.normal(0, cfg.noise_sd, n)
    else:
        return_r = expected + cfg.noise_sd * _noise_shape(cfg, vrng, t_hours, chain_idx, total_hours)

    trade_ids = np.char.add(f"{domain}-", np.arange(n).astype(str))
    trades = pd.DataFrame(
        {
            "trade_id": trade_ids,
            "closed_at": closed_at,
            "t_hours": t_hours,
            "regime": np.array(REGIMES)[regime_idx],
            "strategy_id": np.array(STRATEGIES)[strategy_idx],
            "return_r": return_r,
            "expected_r": expected,
            "signal_r": signal_part,
            "metric_r": metric_part,
            "strategy_r": strategy_part,
            "scope.chain": chain_names,
            "scope.size": size_names,
        }
    )
    for j, m in enumerate(METRICS):
        trades[f"metric.{m}"] = np.where(missing[:, j], np.nan, metric_values[m])
    trades["patterns"] = _join_patterns(fired, pattern_names)

    regime_weights = pd.DataFrame(
        [(REGIMES[i], m, float(weights[i, j])) for i in range(len(REGIMES)) for j, m in enumerate(METRICS)],
        columns=["regime", "metric", "weight"],
    )
    strategy_effects = pd.DataFrame(
        [(STRATEGIES[i], REGIMES[j], float(effects[i, j])) for i in range(len(STRATEGIES)) for j in range(len(REGIMES))],
        columns=["strategy_id", "regime", "effect"],
    )
    outlier = cfg.outlier_domain and index == cfg.n_domains - 1
    engine = make_engine(domain, rng, outlier=outlier)
    train_end = t0 + pd.Timedelta(days=cfg.train_days)
    truth = DomainTruth(
        domain=domain,
        t0=t0,
        train_end=train_end,
        end=t0 + pd.Timedelta(days=cfg.train_days + cfg.holdout_days),
        signals=signals,
        families=families,
        noise_patterns=noise_patterns,
        regime_weights=regime_weights,
        metric_center=dict(METRIC_CENTER),
        metric_scale=dict(METRIC_SCALE),
        strategy_effects=strategy_effects,
        underperformer=cfg.underperform,
        engine=engine,
        break_at=None if cfg.break_at_days is None else t0 + pd.Timedelta(days=cfg.break_at_days),
        broken_families=() if cfg.break_at_days is None else tuple(s.family for s in signals[: cfg.break_families]),
    )
    telemetry = simulate_telemetry(
        engine,
        exploration_knobs(cfg.telemetry_ticks, rng),
        start=train_end - cfg.telemetry_every * cfg.telemetry_ticks,
        every=cfg.telemetry_every,
        rng=rng,
    )
    backtests = _backtests(domain, cfg, t0, signal_part, metric_part, strategy_idx, regime_idx, rng)
    return DomainData(domain, trades, telemetry, backtests, truth)


def _ar1(vrng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """A stationary unit-variance AR(1) series of length n (phi = 0: independent normals)."""
    z = vrng.standard_normal(n)
    if phi == 0.0:
        return z
    out = np.empty(n)
    out[0] = z[0]
    scale = math.sqrt(1.0 - phi * phi)
    for i in range(1, n):  # a few dozen days
        out[i] = phi * out[i - 1] + scale * z[i]
    return out


def _noise_shape(
    cfg: FleetConfig, vrng: np.random.Generator, t_hours: np.ndarray, chain_idx: np.ndarray, total_hours: float
) -> np.ndarray:
    """Unit-scale trade noise of a non-Gaussian / heteroscedastic kind (see ``FleetConfig.noise_kind``).

    ``student_t``: t(df) scaled to variance 1 (heavy tails). ``heteroscedastic``: Gaussian
    with sd multiplied per day (log-uniform in ``noise_day_sd_range``), per chain
    (log-uniform in ``noise_scope_sd``) and by a trend ``exp(noise_sd_trend·(t/T − ½))``.
    ``student_t_heteroscedastic``: both.
    """
    n = t_hours.size
    if cfg.noise_kind.startswith("student_t"):
        df = float(cfg.noise_t_df)
        base = vrng.standard_t(df, n) * (math.sqrt((df - 2.0) / df) if df > 2 else 1.0)
    else:
        base = vrng.standard_normal(n)
    if not cfg.noise_kind.endswith("heteroscedastic"):
        return base
    day = (t_hours // HOURS_PER_DAY).astype(np.int64)
    lo, hi = cfg.noise_day_sd_range
    day_sd = np.exp(vrng.uniform(math.log(lo), math.log(hi), int(day.max()) + 1))
    slo, shi = cfg.noise_scope_sd
    chain_sd = np.exp(vrng.uniform(math.log(slo), math.log(shi), len(CHAINS)))
    trend = np.exp(cfg.noise_sd_trend * (t_hours / total_hours - 0.5))
    return base * day_sd[day] * chain_sd[chain_idx] * trend


def _join_patterns(fired: np.ndarray, names: list[str]) -> np.ndarray:
    """Fired-matrix -> 'a|b|c' strings, one vectorized concatenation per pattern column."""
    joined = pd.Series([""] * fired.shape[0], dtype=object)
    for j, name in enumerate(names):
        joined = joined + np.where(fired[:, j], name + "|", "")
    return joined.str.rstrip("|").to_numpy()


def _backtests(domain, cfg, t0, signal_part, metric_part, strategy_idx, regime_idx, rng) -> pd.DataFrame:
    """Backtests see the planted edges but not the strategy effect: realized vs backtest is the tell."""
    rows = []
    for s, strategy in enumerate(STRATEGIES):
        for r, regime in enumerate(REGIMES):
            cell = (strategy_idx == s) & (regime_idx == r)
            base = float((signal_part[cell] + metric_part[cell]).mean()) if cell.any() else 0.0
            for k in range(cfg.n_backtests_per_cell):
                n_bt = 400
                mean = base + rng.normal(0, cfg.noise_sd / math.sqrt(n_bt))
                rows.append(
                    {
                        "run_id": f"bt-{domain}-{strategy}-{regime}-{k}",
                        "domain": domain,
                        "strategy_id": strategy,
                        "regime": regime,
                        "started_at": t0 - pd.Timedelta(days=30 - k),
                        "metrics_json": json.dumps(
                            {"mean_return_r": mean, "std_return_r": cfg.noise_sd, "n_trades": n_bt}
                        ),
                    }
                )
    return pd.DataFrame(rows)


def generate_fleet(config: FleetConfig | None = None, **overrides) -> Fleet:
    """Generate a fleet; keyword overrides patch the config (e.g. n_domains=5, seed=3)."""
    cfg = config or FleetConfig()
    if overrides:
        cfg = FleetConfig(**{**cfg.__dict__, **overrides})
    names = cfg.domain_names or tuple(f"{cfg.domain_prefix}{i}" for i in range(cfg.n_domains))
    if len(names) != cfg.n_domains:
        raise ValueError("domain_names must have n_domains entries")
    root = np.random.SeedSequence(cfg.seed)
    fleet = Fleet(cfg)
    for i, (name, child) in enumerate(zip(names, root.spawn(cfg.n_domains))):
        fleet.domains[name] = _generate_domain(cfg, name, i, np.random.default_rng(child))
    return fleet


# ---------------------------------------------------------------------------
# Files in the ingest contract
# ---------------------------------------------------------------------------

TRADE_FILE_COLUMNS = ["trade_id", "closed_at", "regime", "strategy_id", "return_r", "patterns"]


def trades_contract_frame(trades: pd.DataFrame) -> pd.DataFrame:
    """Internal trades -> the CSV layout of the ingest contract (truth columns dropped)."""
    cols = TRADE_FILE_COLUMNS + [c for c in trades.columns if c.startswith(("scope.", "metric."))]
    out = trades[cols].copy()
    out["closed_at"] = out["closed_at"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return out


def write_trades_file(trades: pd.DataFrame, path: str | Path) -> Path:
    """Write trades as CSV or JSON Lines (by suffix), in the ingest contract."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = trades_contract_frame(trades)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        with path.open("w", encoding="utf-8") as fh:
            for rec in frame.to_dict(orient="records"):
                out = {k: v for k, v in rec.items() if not k.startswith(("scope.", "metric."))}
                out["patterns"] = rec["patterns"].split("|")
                out["scope"] = {k[6:]: v for k, v in rec.items() if k.startswith("scope.") and v}
                out["metrics"] = {
                    k[7:]: v for k, v in rec.items() if k.startswith("metric.") and not pd.isna(v)
                }
                fh.write(json.dumps(out) + "\n")
    return path


def write_telemetry_file(telemetry: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = telemetry.copy()
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def write_fleet_files(fleet: Fleet, folder: str | Path, *, fmt: str = "csv", train_only: bool = True) -> dict[str, dict[str, Path]]:
    """Write each domain's trades and telemetry in the ingest contract; returns the paths."""
    folder = Path(folder)
    out: dict[str, dict[str, Path]] = {}
    for name, data in fleet.domains.items():
        trades = data.train_trades if train_only else data.trades
        out[name] = {
            "trades": write_trades_file(trades, folder / name / f"trades.{fmt}"),
            "telemetry": write_telemetry_file(data.telemetry, folder / name / f"telemetry.{fmt}"),
        }
    return out
