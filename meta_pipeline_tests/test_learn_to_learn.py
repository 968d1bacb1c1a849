"""Sustained-drop fallback, the global prior's rollback, the wired warm start, and the seed-targets stream."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from meta_pipeline.knobs import KNOB_NAMES, KNOBS, default_knobs, knobs_to_unit, unit_to_knobs
from meta_pipeline.lab.simulate import LOOP_START, TICK_EVERY
from meta_pipeline.lab.synth import SimEngine, make_engine
from meta_pipeline.meta.controller import ControllerConfig, cold_start
from meta_pipeline.meta.controller_policy import step_domain
from meta_pipeline.meta.fallback import FALLBACK_NOTE, FallbackConfig, advance_with_fallback, observe
from meta_pipeline.meta.priors import (
    WarmStartSettings,
    choose_warm_start,
    fleet_reward_by_version,
    next_global_prior,
    prior_rollback_verdict,
    warm_start_new_domain,
)
from meta_pipeline.store import GlobalPriorVersion

T0 = pd.Timestamp("2026-05-01", tz="UTC")


# ---------------------------------------------------------------------------
# Sustained performance drop → safe defaults
# ---------------------------------------------------------------------------


def _decisions(rolled: set[int], ema: list[float]) -> list[dict]:
    return [{"decision_no": i + 1, "rolled_back": (i + 1) in rolled, "reward_ema": e, "evidence": "current"}
            for i, e in enumerate(ema)]


def _first_trip(decisions: list[dict], cfg: FallbackConfig = FallbackConfig()) -> tuple[int | None, str | None]:
    memory = None
    for d in decisions:
        memory, why = observe(memory, d, cfg)
        if why:
            return d["decision_no"], why
    return None, None


def test_four_rollbacks_within_thirty_decisions_trip_and_spread_ones_do_not():
    flat = [0.8] * 80
    at, why = _first_trip(_decisions({5, 12, 20, 28}, flat))
    assert at == 28 and "4 rollbacks in the last 30 decisions" in why and "5, 12, 20, 28" in why
    # the same four rollbacks spread over more than 30 decisions: never 4 in one window
    assert _first_trip(_decisions({5, 20, 35, 50}, flat)) == (None, None)
    # a stricter limit trips on the third
    assert _first_trip(_decisions({5, 12, 20}, flat), FallbackConfig(max_rollbacks=3))[0] == 20


def test_reward_slump_trips_after_thirty_decisions_below_the_peak_and_a_dip_does_not():
    climb = list(np.linspace(0.5, 0.8, 25))
    slump = climb + [0.8] * 10 + [0.68] * 40
    at, why = _first_trip(_decisions(set(), slump))
    assert at == 35 + 30 and "reward slump" in why and "0.8000" in why
    dip = climb + [0.8] * 10 + [0.68] * 29 + [0.75] * 20  # 29 below (peak − 0.1), then back within 0.1
    assert _first_trip(_decisions(set(), dip)) == (None, None)
    # the climb of a cold start is not a slump: the peak only counts after the warm-up
    cold = list(np.linspace(0.2, 0.8, 60))
    assert _first_trip(_decisions(set(), cold)) == (None, None)


class _DroppingEngine(SimEngine):
    """A lab engine whose gain collapses at ``drop_at`` whatever the knobs (a sustained drop)."""

    drop_at: int = 10**9

    def tick(self, knobs, tick, rng):
        row = super().tick(knobs, tick, rng)
        if tick >= self.drop_at:
            row["gain_p50"] -= 0.02  # −0.24 reward units
        return row


def _closed_loop_with_fallback(engine: SimEngine, n: int, state=None, prior=None, config=ControllerConfig(),
                               fallback: FallbackConfig = FallbackConfig()):
    state = state or cold_start(prior, config, seed=3)
    rng = np.random.default_rng(5)
    decisions = []
    for t in range(n):
        knobs = dict(state.knobs)
        row = {"ts": LOOP_START + TICK_EVERY * t, **engine.tick(knobs, t, rng),
               **{f"knob_{k}": float(v) for k, v in knobs.items()}}
        state, new, _ = advance_with_fallback(state, pd.DataFrame([row]), config, prior, fallback)
        decisions += new
    return state, decisions


def test_a_sustained_drop_sends_the_controller_to_the_safe_defaults_and_the_note_says_so():
    rng = np.random.default_rng(1)
    base = make_engine("drop", rng, center=np.array([0.2, 0.8, 0.7, 0.3, 1.0, 0.6]))
    engine = _DroppingEngine(domain="drop", optimum=base.optimum)
    engine.drop_at = 30
    prior = unit_to_knobs(knobs_to_unit(base.optimum) + 0.05)  # a good prior: far from the defaults
    fast = FallbackConfig(slump_decisions=12, warmup=10)  # shorter windows than the defaults: a fast test
    state, decisions = _closed_loop_with_fallback(engine, 60, prior=prior, fallback=fast)
    tripped = [d for d in decisions if d.get("fallback")]
    assert len(tripped) == 1  # once: the monitor restarts after the fallback
    d = tripped[0]
    assert 30 + 12 <= d["decision_no"] <= 30 + 20  # 12 decisions below the peak after the drop (+ EMA lag)
    assert f"{FALLBACK_NOTE}: reward slump" in d["note"] and d["action"].endswith("+fallback")
    assert d["knobs"] == default_knobs() and d["prior_disabled"] is True
    assert d["policy_updates"]  # the move to the defaults is recorded as this decision's update
    after = [x for x in decisions if x["decision_no"] > d["decision_no"]]
    assert after and after[0]["knobs"] == default_knobs() or after[0]["action"].startswith("trial")
    assert state.prior_disabled and FALLBACK_NOTE in state.prior_disabled_reason
    assert state.fallback["count"] == 1 and state.fallback["last"]["decision"] == d["decision_no"]
    assert state.decisions == 60  # the decision counter continues
    # without the drop: no fallback over the same 60 decisions, even with the short windows
    calm = _DroppingEngine(domain="calm", optimum=base.optimum)
    _, calm_decisions = _closed_loop_with_fallback(calm, 60, prior=prior, fallback=fast)
    assert not any(x.get("fallback") for x in calm_decisions)


def test_step_domain_reports_the_fallback_and_the_state_round_trips():
    cfg = ControllerConfig()
    rng = np.random.default_rng(2)
    engine = make_engine("sim", rng)
    # planted: the stored state already counts 3 rollbacks in its window; one more trips it
    state = cold_start(None, cfg, seed=1)
    state.fallback = {"since": 0, "rollbacks": [], "peak": None, "below": 0, "count": 0, "last": None}
    state, _ = _closed_loop_with_fallback(engine, 5, state=state)
    n = state.decisions
    state.fallback["rollbacks"] = [n - 2, n - 1, n]
    from meta_pipeline.meta.controller_policy import state_row

    row = state_row("sim", state, T0, None)
    ticks = pd.DataFrame([{"ts": LOOP_START + TICK_EVERY * t, **engine.tick(state.knobs, t, rng),
                           **{f"knob_{k}": float(v) for k, v in state.knobs.items()}} for t in range(5, 9)])
    # force a rollback: the state's knobs get a harmful external edit, canaried and rolled back
    bad = dict(state.knobs, tau=0.8 if state.knobs["tau"] > 0.9 else 0.99, g_min=0.1)
    row["knobs_json"] = json.dumps(bad, sort_keys=True)
    ticks = pd.DataFrame([{"ts": LOOP_START + TICK_EVERY * t, **engine.tick(bad, t, rng),
                           **{f"knob_{k}": float(v) for k, v in bad.items()}} for t in range(5, 9)])
    step = step_domain("sim", row, None, None, lambda last_ts: ticks, cfg)
    assert step.fallbacks and "4 rollbacks in the last 30 decisions" in step.fallbacks[0]
    note = next(d["note"] for d in step.decisions if d.get("fallback"))
    assert FALLBACK_NOTE in note
    assert step.state.knobs == default_knobs() and step.state.prior_disabled
    assert type(step.state).from_json(step.state.to_json()).fallback == step.state.fallback


# ---------------------------------------------------------------------------
# The global prior tracks the fleet reward of each version and rolls back
# ---------------------------------------------------------------------------


def _version(v: int, tau: float, created: pd.Timestamp, details: dict | None = None) -> GlobalPriorVersion:
    values = {**default_knobs(), "tau": tau}
    return GlobalPriorVersion(version=v, values=values, continuous=dict(values), n_domains=4, epsilon=0.5,
                              details={"theta_continuous": dict(values), **(details or {})}, created_at=created)


def _fleet_decisions(levels: dict[int, float], created: dict[int, pd.Timestamp], domains=("a", "b", "c", "d"),
                     per=8, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for v, level in levels.items():
        for j, d in enumerate(domains):
            for k in range(per):
                rows.append({"domain": d, "decided_at": created[v] + pd.Timedelta(minutes=1 + k),
                             "reward": level + 0.02 * j + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


CREATED = {1: T0, 2: T0 + pd.Timedelta(hours=1)}
VERSIONS = pd.DataFrame({"version": [1, 2], "created_at": [CREATED[1], CREATED[2]]})


def test_fleet_reward_is_attributed_to_the_version_in_effect():
    dec = _fleet_decisions({1: 0.8, 2: 0.7}, CREATED)
    early = pd.DataFrame([{"domain": "a", "decided_at": T0 - pd.Timedelta(minutes=5), "reward": 0.1}])
    per = fleet_reward_by_version(pd.concat([dec, early]), VERSIONS)
    assert set(per["version"]) == {1, 2} and (per["n"] == 8).all()  # the decision before v1 belongs to none
    a1 = per[(per.version == 1) & (per.domain == "a")]["reward_mean"].iloc[0]
    assert a1 == pytest.approx(dec[(dec.domain == "a") & (dec.decided_at < CREATED[2])]["reward"].mean())


def test_the_prior_rolls_back_when_the_fleet_does_worse_under_the_new_version():
    per = fleet_reward_by_version(_fleet_decisions({1: 0.8, 2: 0.7}, CREATED), VERSIONS)
    worse, why, stats = prior_rollback_verdict(per, 2, 1)
    assert worse and "roll back to v1" in why and stats["n_domains"] == 4
    assert stats["mean_delta"] == pytest.approx(-0.1, abs=0.02)
    # the fleet did better: kept
    better = fleet_reward_by_version(_fleet_decisions({1: 0.7, 2: 0.8}, CREATED), VERSIONS)
    assert not prior_rollback_verdict(better, 2, 1)[0]
    # a drop smaller than the margin, or too few domains: not rolled back
    tiny = fleet_reward_by_version(_fleet_decisions({1: 0.8, 2: 0.795}, CREATED), VERSIONS)
    assert not prior_rollback_verdict(tiny, 2, 1)[0]
    two = fleet_reward_by_version(_fleet_decisions({1: 0.8, 2: 0.6}, CREATED, domains=("a", "b")), VERSIONS)
    ok, why, _ = prior_rollback_verdict(two, 2, 1)
    assert not ok and why.startswith("not judged: 2 domain(s)")


def _priors_long() -> pd.DataFrame:
    rows = []
    for d, tau in (("a", 0.86), ("b", 0.87), ("c", 0.85), ("d", 0.86)):
        for name in KNOB_NAMES:
            v = tau if name == "tau" else KNOBS[name].default
            rows.append({"domain": d, "knob": name, "mean": v, "std": 0.01, "n_obs": 100, "best_value": v,
                         "best_reward": 0.8, "reward_mean": 0.7})
    return pd.DataFrame(rows)


def test_next_global_prior_restores_the_previous_version_then_backs_off():
    v1, v2 = _version(1, 0.95, CREATED[1]), _version(2, 0.9, CREATED[2])
    dec = _fleet_decisions({1: 0.8, 2: 0.7}, CREATED)
    now = CREATED[2] + pd.Timedelta(hours=1)
    built = next_global_prior(_priors_long(), pd.DataFrame(columns=["domain"]), v2, v1, dec, VERSIONS, now=now)
    assert built.version == 3 and built.rollback["of"] == 2 and built.rollback["restored"] == 1
    assert built.theta == v1.values and built.rows.set_index("knob")["value"].to_dict() == v1.values
    assert built.details["fleet_reward"][2]["reward_mean"] < built.details["fleet_reward"][1]["reward_mean"]
    # version 4 after the rollback: a normal build whose Reptile step is halved (backoff 0.5)
    v3 = GlobalPriorVersion(3, built.theta, dict(v1.continuous), 4, 0.0, json.loads(built.rows["details_json"][0]),
                            now)
    nxt = next_global_prior(_priors_long(), pd.DataFrame(columns=["domain"]), v3, v2, dec, VERSIONS, now=now)
    assert nxt.rollback is None and nxt.details["epsilon_scale"] == 0.5
    from meta_pipeline.meta.reptile import annealed_epsilon

    assert nxt.details["epsilon"] == pytest.approx(0.5 * annealed_epsilon(2, 0.5, 0.1, 20))
    # the fleet did not do worse: a normal build, the check recorded
    fine = next_global_prior(_priors_long(), pd.DataFrame(columns=["domain"]), v2, v1,
                             _fleet_decisions({1: 0.8, 2: 0.81}, CREATED), VERSIONS, now=now)
    assert fine.rollback is None and "not worse: kept" in fine.details["prior_check"]


# ---------------------------------------------------------------------------
# The wired few-shot warm start
# ---------------------------------------------------------------------------


def _prior_frame(tau: float) -> pd.DataFrame:
    return pd.DataFrame([{"knob": n, "mean": tau if n == "tau" else KNOBS[n].default, "std": 0.0, "n_obs": 100,
                          "best_value": tau if n == "tau" else KNOBS[n].default, "best_reward": 0.8,
                          "reward_mean": 0.7} for n in KNOB_NAMES])


def test_choose_warm_start_takes_close_neighbours_and_the_global_prior_otherwise():
    priors = {"a1": _prior_frame(0.82), "a2": _prior_frame(0.83), "b1": _prior_frame(0.97), "b2": _prior_frame(0.98)}
    names = list(priors)
    # two clusters: 0.1 apart within, 1.0 between
    pair = pd.DataFrame([[0.0 if i == j else (0.1 if i[0] == j[0] else 1.0) for j in names] for i in names],
                        index=names, columns=names)
    glob = {**default_knobs(), "tau": 0.9}
    close = choose_warm_start(glob, 7, priors, {"a1": 0.05, "a2": 0.08, "b1": 1.0, "b2": 1.0}, pair)
    assert close.source == "neighbours: a1, a2"
    knn = (0.82 * np.exp(-0.05 / 0.5325) + 0.83 * np.exp(-0.08 / 0.5325)) / (np.exp(-0.05 / 0.5325) + np.exp(-0.08 / 0.5325))
    lam = WarmStartSettings().lambda_max * (1 - 0.065 / 0.5325)  # λ_max · (1 − mean near / mean all)
    assert close.details["lambda"] == pytest.approx(lam)
    assert close.theta["tau"] == pytest.approx((1 - lam) * 0.9 + lam * knn, abs=1e-9)
    # the new domain is as far from every known domain as the clusters are from each other: global
    far = choose_warm_start(glob, 7, priors, {d: 1.0 for d in names}, pair)
    assert far.source == "global v7" and far.theta == glob and "not close" in far.details["why"]
    # no global prior yet: the close neighbours' mean itself
    alone = choose_warm_start(None, None, priors, {"a1": 0.05, "a2": 0.08, "b1": 1.0, "b2": 1.0}, pair)
    assert alone.theta["tau"] == pytest.approx(knn, abs=1e-9)


def _cluster_telemetry(level: float, n: int, rng: np.random.Generator, domain: str) -> pd.DataFrame:
    return pd.DataFrame({
        "domain": domain, "ts": T0 + pd.Timedelta(minutes=5) * np.arange(n),
        "gain_p50": level + rng.normal(0, 0.002, n), "stability_mean": 0.55 + 5 * level + rng.normal(0, 0.01, n),
        "vram_utilization": 0.5 + rng.normal(0, 0.01, n), "latency_ms": 100 + rng.normal(0, 2, n),
        **{f"knob_{k}": KNOBS[k].default for k in KNOB_NAMES},
    })


def test_a_new_domains_first_decision_starts_from_its_nearest_neighbours_prior_when_close():
    rng = np.random.default_rng(4)
    fleet = pd.concat([_cluster_telemetry(0.04, 60, rng, "a1"), _cluster_telemetry(0.04, 60, rng, "a2"),
                       _cluster_telemetry(0.01, 60, rng, "b1"), _cluster_telemetry(0.01, 60, rng, "b2")])
    priors_long = pd.concat([_prior_frame(t).assign(domain=d) for d, t in
                             (("a1", 0.82), ("a2", 0.83), ("b1", 0.97), ("b2", 0.98))])
    latest = _version(3, 0.9, T0)
    cfg = ControllerConfig()

    def first_decision(new_ticks: pd.DataFrame):
        step = step_domain("new", pd.DataFrame(), latest, None, lambda last_ts: new_ticks, cfg,
                           warm_start_inputs=lambda: (priors_long, fleet))
        return step

    like_a = _cluster_telemetry(0.04, 5, rng, "new").drop(columns="domain")
    step = first_decision(like_a)
    assert step.before.prior_source.startswith("neighbours: a")  # the cluster it resembles
    assert "warm start from neighbours" in step.notes[0]
    assert abs(step.before.knobs["tau"] - 0.825) < abs(0.9 - 0.825)  # moved from the global prior toward them
    # the first ticks ran the engine's own knobs (foreign): the first decision holds at the warm-start knobs,
    # which is what the engine runs next
    assert step.decisions[0]["evidence"] == "foreign" and step.decisions[0]["knobs"] == step.before.knobs
    # a newer global version does not replace a neighbours' pull target
    assert step.state.prior["tau"] == step.before.knobs["tau"]
    # a domain unlike every cluster: the global prior
    unlike = _cluster_telemetry(0.025, 5, rng, "new").drop(columns="domain")
    unlike["latency_ms"] = 400.0 + rng.normal(0, 2, 5)
    far = first_decision(unlike)
    assert far.before.prior_source == "global v3" and far.before.knobs == latest.values
    # the "close" threshold has a floor: how far a known domain's own 5 ticks appear from the rest of its telemetry
    ws = warm_start_new_domain("new", like_a, latest.values, 3, priors_long, fleet)
    assert ws.details["noise_floor"] > 0 and ws.details["close_threshold"] >= 2 * ws.details["noise_floor"]
    assert set(ws.details["neighbours"]) == {"a1", "a2"}
    # no inputs (the old path) or too few ticks: the global prior
    assert warm_start_new_domain("new", like_a.head(1), latest.values, 3, priors_long, fleet).source == "global v3"


# ---------------------------------------------------------------------------
# The seed-targets stream (small) against planted truth
# ---------------------------------------------------------------------------


def test_vectorized_engine_matches_the_lab_engine():
    from meta_pipeline.lab.seed_targets import deployable_units, engine_of, expected_reward, oracle_reward

    rng = np.random.default_rng(7)
    opt = np.clip(rng.uniform(0.1, 0.9, (4, len(KNOB_NAMES))), 0.05, 0.95)
    opt[:, KNOB_NAMES.index("tier2_enabled")] = 1.0
    opt = deployable_units(opt) * 0 + opt
    opt[:, KNOB_NAMES.index("tier3_topk")] = deployable_units(opt)[:, KNOB_NAMES.index("tier3_topk")]
    units = deployable_units(rng.random((4, len(KNOB_NAMES))))
    for i in range(4):
        engine = engine_of("x", opt[i])
        assert expected_reward(units[i], opt[i]) == pytest.approx(engine.expected_reward(unit_to_knobs(units[i])))
        lab_oracle = engine.oracle()[1]
        assert lab_oracle - 1e-12 <= oracle_reward(opt[i:i + 1])[0] <= lab_oracle + 1e-3  # exact ≥ grid search


def test_seed_targets_stream_on_two_clusters():
    from meta_pipeline.lab.seed_targets import SeedTargetsConfig, run_stream

    cfg = SeedTargetsConfig(seeds=(0,), n_tasks=40, n_probe=2, efficiency_horizon=30, dagster=False)
    r = run_stream(cfg, 0)
    # planted: two clusters, so the close neighbours' priors transfer better than the global prior alone
    assert r["transfer"] > r["transfer_global_only"]
    assert 0.0 < r["start_warm_mean"] <= 1.0 and r["source_level_mean"] > 0.5
    # per-domain memory: what is deployed for an old task barely changes as tasks arrive
    assert r["retention"] == pytest.approx(1.0, abs=0.05)
    assert len(r["warm_regret_curve"]) == 40 and r["warm_regret_curve"][-1] < r["warm_regret_curve"][0]
    assert 1 <= r["t_prior"] <= 40 and len(r["few_shot"]) == 2 and all(1 <= x <= 31 for x in r["reach_scratch"])


# ---------------------------------------------------------------------------
# Through Dagster: the controller_state and global_prior assets
# ---------------------------------------------------------------------------

TELEMETRY_CANARY = {"ops": {"controller_state": {"config": {"paired_learning_trials": False}}}}


@pytest.fixture
def dagster_store(tmp_path):
    import dagster as dg

    from meta_pipeline.store import MetaStore

    store = MetaStore(db_url=f"sqlite:///{tmp_path}/l2l.db")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", ["a1", "a2", "b1", "b2", "new", "sim"])
    return store, instance


def _warnings(instance, result) -> list[str]:
    import logging

    return [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]


def _materialize_controller(store, instance, domain):
    import dagster as dg

    from meta_pipeline.defs.governance.controller import controller_state

    return dg.materialize([controller_state], partition_key=domain, instance=instance, resources={"store": store},
                          run_config=TELEMETRY_CANARY)


def test_controller_asset_warm_starts_a_new_domain_from_its_cluster(dagster_store):
    store, instance = dagster_store
    rng = np.random.default_rng(9)
    for d, level in (("a1", 0.04), ("a2", 0.04), ("b1", 0.01), ("b2", 0.01)):
        store.append("telemetry", _cluster_telemetry(level, 60, rng, d))
    for d, tau in (("a1", 0.82), ("a2", 0.83), ("b1", 0.97), ("b2", 0.98)):
        store.replace_partition("domain_priors", d, _prior_frame(tau).assign(updated_at=T0))
    store.append("telemetry", _cluster_telemetry(0.01, 5, rng, "new"))  # like the b cluster
    result = _materialize_controller(store, instance, "new")
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node("controller_state")[0].metadata.items()}
    assert meta["prior_source"].startswith("neighbours: b")
    assert "warm start from neighbours: b" in meta["notes"]
    state = json.loads(store.read("controller_state", domain="new")["state_json"].iloc[0])
    assert state["knobs"]["tau"] == pytest.approx(0.975, abs=0.01)  # the b cluster's prior (no global prior yet)


def test_controller_asset_logs_a_warning_when_it_falls_back(dagster_store):
    from meta_pipeline.meta.controller_policy import state_row

    store, instance = dagster_store
    cfg = ControllerConfig()
    engine = make_engine("sim", np.random.default_rng(2))
    state, _ = _closed_loop_with_fallback(engine, 5, state=cold_start(None, cfg, seed=1))
    n = state.decisions
    state.fallback["rollbacks"] = [n - 2, n - 1, n]  # planted: three rollbacks already in the window
    row = state_row("sim", state, T0, None)
    bad = dict(state.knobs, tau=0.8 if state.knobs["tau"] > 0.9 else 0.99, g_min=0.1)
    row["knobs_json"] = json.dumps(bad, sort_keys=True)  # a harmful hand edit: canaried, rolled back = the 4th
    store.replace_partition("controller_state", "sim", row)
    rng = np.random.default_rng(3)
    store.append("telemetry", pd.DataFrame([{"domain": "sim", "ts": LOOP_START + TICK_EVERY * t,
                                             **engine.tick(bad, t, rng), **{f"knob_{k}": float(v) for k, v in bad.items()}}
                                            for t in range(5, 9)]))
    result = _materialize_controller(store, instance, "sim")
    assert result.success
    assert any("fell back to the safe defaults: 4 rollbacks in the last 30 decisions" in w
               for w in _warnings(instance, result))
    meta = {k: v.value for k, v in result.asset_materializations_for_node("controller_state")[0].metadata.items()}
    assert meta["fallbacks_this_run"] == 1 and meta["prior_disabled"] is True
    notes = store.read("meta_decisions", domain="sim", order_by="decision_no")["note"].tolist()
    assert sum(FALLBACK_NOTE in x for x in notes) == 1
    assert json.loads(store.read("controller_state", domain="sim")["knobs_json"].iloc[0]) == default_knobs()


def _decision_rows(domain: str, level: float, n: int, rng) -> pd.DataFrame:
    now = pd.Timestamp.now(tz="UTC")
    return pd.DataFrame({
        "domain": domain, "decision_no": np.arange(1, n + 1), "decided_at": now,
        "reward": level + rng.normal(0, 0.005, n), "reward_ema": level, "rolled_back": False,
        "policy_updates_json": "{}", "knobs_json": "{}", "telemetry_json": "[]", "note": "planted",
    })


def test_global_prior_asset_rolls_back_when_the_fleet_did_worse(dagster_store):
    import time

    import dagster as dg

    from meta_pipeline.defs.meta.priors import domain_priors, global_prior

    store, instance = dagster_store
    rng = np.random.default_rng(12)
    domains = ("a1", "a2", "b1")
    for d in domains:
        store.append("telemetry", _cluster_telemetry(0.03, 60, rng, d).assign(
            **{"knob_tau": rng.uniform(0.8, 0.99, 60)}))
        assert dg.materialize([domain_priors], partition_key=d, instance=instance, resources={"store": store}).success

    def publish():
        return dg.materialize([domain_priors, global_prior], selection=[global_prior], instance=instance,
                              resources={"store": store})

    assert publish().success  # v1
    time.sleep(0.05)
    for d in domains:
        store.append("meta_decisions", _decision_rows(d, 0.8, 8, rng))  # under v1
    for d in domains:  # the domains' evidence changes, so v2 moves
        store.append("telemetry", _cluster_telemetry(0.03, 30, rng, d).assign(
            ts=lambda f: f["ts"] + pd.Timedelta(days=1), knob_tau=0.97))
        assert dg.materialize([domain_priors], partition_key=d, instance=instance, resources={"store": store}).success
    time.sleep(0.05)
    assert publish().success  # v2
    time.sleep(0.05)
    for d in domains:
        store.append("meta_decisions", _decision_rows(d, 0.7, 8, rng))  # the fleet does worse under v2
    result = publish()
    assert result.success
    v1, v3 = store.read_global_prior(1), store.read_global_prior(3)
    assert v3.values == v1.values and v3.details["rollback"]["of"] == 2 and v3.details["rollback"]["restored"] == 1
    assert v3.details["fleet_reward"]["2"]["reward_mean"] < v3.details["fleet_reward"]["1"]["reward_mean"]
    assert any("v3 restores v1 (rollback of v2)" in w for w in _warnings(instance, result))
    meta = {k: v.value for k, v in result.asset_materializations_for_node("global_prior")[0].metadata.items()}
    assert "ROLLBACK of v2" in meta["status"]
    # the next version is a normal build again, its Reptile step halved
    time.sleep(0.05)
    assert publish().success
    v4 = store.read_global_prior(4)
    assert "rollback" not in v4.details and v4.details["epsilon_scale"] == 0.5
