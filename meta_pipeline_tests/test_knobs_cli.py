"""`meta-pipeline knobs show|set|reset DOMAIN` on SQLite and PostgreSQL (docs/knobs.md)."""

from __future__ import annotations

import json

import pandas as pd

from meta_pipeline.cli import main as cli_main
from meta_pipeline.governance import knob_settings
from meta_pipeline.knobs import KNOB_NAMES, default_knobs
from meta_pipeline.meta.controller import cold_start
from meta_pipeline.meta.controller_policy import state_row
from meta_pipeline.store import MetaStore

DOMAIN = "kn0"
NOW = pd.Timestamp("2026-03-01", tz="UTC")
PRIOR = {**default_knobs(), "lambda_ci": 0.6, "tier3_topk": 7.0}


def _url(store: MetaStore) -> str:
    return str(store.db_url)


def _global_prior(store: MetaStore, values: dict[str, float], version: int = 1) -> None:
    store.append("global_prior", pd.DataFrame([{"version": version, "created_at": NOW, "knob": k, "value": v,
                                                "n_domains": 3, "epsilon": 0.5, "details_json": None}
                                               for k, v in values.items()]))


def _controller(store: MetaStore, knobs: dict[str, float], adopted: int | None = None) -> None:
    """A controller_state row as the controller writes it: cold-started from PRIOR, then at ``knobs``."""
    state = cold_start(PRIOR)
    state.knobs = dict(knobs)
    store.replace_partition("controller_state", DOMAIN, state_row(DOMAIN, state, NOW, adopted))


def _configs(store: MetaStore) -> pd.DataFrame:
    return store.read("configs", equals={"target_type": "META_KNOBS", "target_id": DOMAIN}, order_by="version")


def _log(store: MetaStore) -> pd.DataFrame:
    return store.read("config_change_log", order_by="id")


def _sources(store: MetaStore) -> dict[str, str]:
    return {r["knob"]: r["source"] for r in knob_settings.knobs_report(store, DOMAIN).rows}


def test_show_says_where_each_knob_came_from(any_store, capsys):
    store = any_store
    _global_prior(store, PRIOR)
    # the controller started at the prior and moved tau and g_min; the rest are the prior's or the defaults
    _controller(store, {**PRIOR, "tau": 0.9, "g_min": 0.05})
    got = _sources(store)
    assert got == {"tau": "controller", "g_min": "controller", "lambda_ci": "global prior v1",
                   "tier3_topk": "global prior v1", "gamma_diversity": "global prior v1",
                   "tier2_enabled": "global prior v1"}
    assert cli_main(["knobs", "show", DOMAIN, "--db-url", _url(store)]) == 0
    out = capsys.readouterr().out
    assert "in effect: controller_state" in out
    assert [ln.split()[0] for ln in out.splitlines()[2:8]] == list(KNOB_NAMES)
    tau_line = next(ln for ln in out.splitlines() if ln.startswith("tau "))
    assert tau_line.split() == ["tau", "0.9", "[0.8,", "0.99]", "0.95", "controller"]
    assert cli_main(["knobs", "show", DOMAIN, "--json", "--db-url", _url(store)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {r["knob"]: r["value"] for r in shown["knobs"]}["g_min"] == 0.05 and shown["source"] == "controller_state"


def test_show_before_the_controller_ran_gives_the_defaults(any_store):
    store = any_store
    store.replace_partition("trades", DOMAIN, pd.DataFrame([{
        "trade_id": "t1", "closed_at": NOW, "regime": "S0", "strategy_id": "a", "return_r": 0.1, "source_file": "x"}]))
    report = knob_settings.knobs_report(store, DOMAIN)
    assert report.in_effect.source == "defaults" and report.in_effect.values == default_knobs()
    assert {r["source"] for r in report.rows} == {"default"}


def test_set_applies_a_config_through_the_lifecycle_and_the_controller_adopts_it(any_store, capsys):
    store = any_store
    _controller(store, {**PRIOR, "tau": 0.9})
    argv = ["knobs", "set", DOMAIN, "tau=0.85", "tier2_enabled=off", "tier3_topk=8", "--by", "alice",
            "--db-url", _url(store)]
    assert cli_main(argv) == 0
    assert "META_KNOBS config v1 applied by alice" in capsys.readouterr().out
    cfg = _configs(store)
    assert len(cfg) == 1 and bool(cfg["active"].iloc[0]) and cfg["created_by"].iloc[0] == "alice"
    written = json.loads(cfg["config_json"].iloc[0])
    # the knobs in effect with the three replaced: a complete, explicit knob set
    assert written == {**PRIOR, "tau": 0.85, "tier2_enabled": 0.0, "tier3_topk": 8.0}
    in_effect = store.knobs_in_effect(DOMAIN)
    assert in_effect.source == "configs v1" and in_effect.values == written
    # audited like any reviewed change: the proposal is APPLIED by alice, the change log has approve + apply
    proposal = store.read("meta_controller_config_proposals")
    assert proposal["status"].tolist() == ["APPLIED"] and proposal["applied_by"].iloc[0] == "alice"
    assert int(proposal["applied_config_version"].iloc[0]) == 1
    log = _log(store)
    assert log["action"].tolist() == ["approve", "apply"] and set(log["actor"]) == {"alice"}
    assert json.loads(log["after_json"].iloc[1]) == written
    assert set(_sources(store).values()) == {"configs v1"}
    # the controller adopts v1 (its knobs become the config's, config_version = 1): the set knobs read as adopted
    _controller(store, {**written, "g_min": 0.04}, adopted=1)
    got = _sources(store)
    assert got["tau"] == got["tier3_topk"] == got["tier2_enabled"] == "configs v1 (adopted)"
    assert got["g_min"] == "controller"


BAD_ASSIGNMENTS = [
    ("tau=1.5", "1.5 is outside tau's bounds [0.8, 0.99]"),
    ("g_min=0", "0 is outside g_min's bounds [0.001, 0.1]"),
    ("tier3_topk=11", "outside tier3_topk's bounds [3, 10]"),
    ("tier3_topk=4.5", "tier3_topk is an integer knob"),
    ("tier2_enabled=2", "outside tier2_enabled's bounds"),
    ("tau=abc", "'abc' is not a number"),
    ("tau=nan", "'nan' is not finite"),
    ("learning_rate=0.1", "unknown knob 'learning_rate'"),
    ("tau", "not a KNOB=VALUE assignment"),
    ("tau=0.9 tau=0.85", "tau is given twice"),
]


def test_set_refuses_a_bad_value_in_one_line_and_writes_nothing(any_store, capsys):
    store = any_store
    _controller(store, PRIOR)
    for assignment, problem in BAD_ASSIGNMENTS:
        argv = ["knobs", "set", DOMAIN, "lambda_ci=0.4", *assignment.split(), "--db-url", _url(store)]
        assert cli_main(argv) == 2, assignment
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and problem in err, err
    assert _configs(store).empty and store.read("meta_controller_config_proposals").empty and _log(store).empty
    assert store.knobs_in_effect(DOMAIN).source == "controller_state"


def test_set_and_show_refuse_a_bad_or_unknown_domain(any_store, capsys):
    store = any_store
    _controller(store, PRIOR)
    for argv in (["knobs", "show", "Bad Domain"], ["knobs", "set", "nowhere", "tau=0.9"], ["knobs", "reset", "nowhere"]):
        assert cli_main([*argv, "--db-url", _url(store)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ")
    assert _configs(store).empty


def test_reset_hands_the_knobs_back_to_the_controller(any_store, capsys):
    store = any_store
    controller_knobs = {**PRIOR, "tau": 0.9}
    _controller(store, controller_knobs)
    assert cli_main(["knobs", "set", DOMAIN, "tau=0.8", "--by", "alice", "--db-url", _url(store)]) == 0
    assert store.knobs_in_effect(DOMAIN).values["tau"] == 0.8
    capsys.readouterr()
    # not adopted yet: reset withdraws it, the controller's own knobs are in effect again
    assert cli_main(["knobs", "reset", DOMAIN, "--by", "bob", "--db-url", _url(store)]) == 0
    assert "its knobs are no longer in effect" in capsys.readouterr().out
    cfg = _configs(store)
    assert len(cfg) == 1 and not bool(cfg["active"].iloc[0])  # kept, inactive
    assert store.active_config("META_KNOBS", DOMAIN) is None
    in_effect = store.knobs_in_effect(DOMAIN)
    assert in_effect.source == "controller_state" and in_effect.values == controller_knobs
    reset = _log(store).iloc[-1]
    assert (reset["action"], reset["actor"], int(reset["from_version"])) == ("reset", "bob", 1)
    assert pd.isna(reset["to_version"]) and json.loads(reset["before_json"])["tau"] == 0.8
    # nothing left to reset: nothing written
    n_log = len(_log(store))
    assert cli_main(["knobs", "reset", DOMAIN, "--db-url", _url(store)]) == 0
    assert "nothing written" in capsys.readouterr().out and len(_log(store)) == n_log

    # adopted already: reset changes nothing in effect (the controller tunes from it), but withdraws the config
    assert cli_main(["knobs", "set", DOMAIN, "g_min=0.05", "--by", "alice", "--db-url", _url(store)]) == 0
    version = int(_configs(store)["version"].max())
    assert version == 2  # versions keep counting over inactive rows
    adopted = {**controller_knobs, "g_min": 0.05}
    _controller(store, adopted, adopted=version)
    assert store.knobs_in_effect(DOMAIN).source == "controller_state"
    assert cli_main(["knobs", "reset", DOMAIN, "--db-url", _url(store)]) == 0
    assert "already adopted" in capsys.readouterr().out
    assert store.active_config("META_KNOBS", DOMAIN) is None
    assert store.knobs_in_effect(DOMAIN).values == adopted
