"""Knob trials wait for their effect: a controller decision that moves a learning knob re-materializes the learning assets.

A learning knob (``meta.knob_trial.LEARNING_KNOBS``: lambda_ci, tier3_topk, tau, g_min,
tier2_enabled) acts only through ``pm_overrides``; until overrides are rebuilt with it,
nothing an engine receives has changed. ``knob_trial_sensor`` reads the new
``meta_decisions`` rows (cursor: the last row id seen) and, for each domain whose newest
new decision moved a learning knob — a trial, an accepted move, a rollback restoring the
previous knobs — requests one ``relearn_job`` run of that domain (run key = the decision:
``knob-trial:<domain>:<decision_no>``). The run's learning assets read the knobs in effect
(``store.knobs_in_effect``: the controller's new knobs) and store a new overrides version
with them; ``override_feedback`` scores it as trades close after it; and the controller,
on its next run, judges the trial paired on that version (``knob_trial.paired_step``) and
records the version in the decision row (``judged_on_json``).

The loop runs through the store and this sensor, never through asset dependencies: the
asset graph stays acyclic (controller_state does not depend on pm_overrides, nor the other way).
"""

import json

import dagster as dg
import pandas as pd

from meta_pipeline.defs.resources import StoreParam
from meta_pipeline.meta.knob_trial import learning_knobs_changed

KNOB_DECISION_TAG = "meta_pipeline/knob_decision"  # run tag: the decision whose knobs the run materializes
DECISION_COLUMNS = ["id", "domain", "decision_no", "policy_updates_json", "rolled_back"]


def learning_knob_decisions(decisions: pd.DataFrame) -> pd.DataFrame:
    """The decisions (meta_decisions rows) that moved a learning knob, with ``changed`` (the knobs it moved)."""
    if decisions.empty:
        return decisions.assign(changed=pd.Series(dtype=object))
    changed = decisions["policy_updates_json"].map(lambda raw: learning_knobs_changed(json.loads(raw or "{}")))
    out = decisions.assign(changed=changed)
    return out[out["changed"].map(bool)].reset_index(drop=True)


def knob_trial_requests(decisions: pd.DataFrame) -> list[dg.RunRequest]:
    """One relearn run per domain for its newest decision that moved a learning knob (older ones it supersedes:
    the run builds with the knobs in effect when it runs)."""
    moved = learning_knob_decisions(decisions)
    requests = []
    for domain, group in moved.sort_values("id").groupby("domain", sort=True):
        newest = group.iloc[-1]
        updates = json.loads(newest["policy_updates_json"])
        requests.append(dg.RunRequest(
            run_key=f"knob-trial:{domain}:{int(newest['decision_no'])}",
            partition_key=str(domain),
            tags={KNOB_DECISION_TAG: f"{domain}:{int(newest['decision_no'])}",
                  "meta_pipeline/knob_updates": json.dumps({k: updates[k] for k in newest["changed"]},
                                                          sort_keys=True)[:200]},
        ))
    return requests


@dg.sensor(job_name="relearn_job", minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="A controller decision that moved a learning knob -> one re-learn run of its domain "
                       "(run key = the decision), so the trial is judged on overrides built with the new knobs.")
def knob_trial_sensor(context: dg.SensorEvaluationContext, store: StoreParam) -> dg.SensorResult:
    """Cursor: the last meta_decisions id read (a lost cursor re-reads history; the run keys keep each
    decision to one run)."""
    last = int(context.cursor) if context.cursor and context.cursor.isdigit() else 0
    new = store.read("meta_decisions", columns=DECISION_COLUMNS, after={"id": last}, order_by="id")
    if new.empty:
        return dg.SensorResult(skip_reason=f"no new controller decision after id {last}")
    requests = knob_trial_requests(new)
    cursor = str(int(new["id"].max()))
    if not requests:
        return dg.SensorResult(skip_reason=f"{len(new)} new decision(s), none moved a learning knob", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


__all__ = ["KNOB_DECISION_TAG", "knob_trial_requests", "knob_trial_sensor", "learning_knob_decisions"]
