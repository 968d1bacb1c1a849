"""A one-row config proposal frame, as `lifecycle.insert_proposals` takes it."""

from __future__ import annotations

import json

import pandas as pd

from meta_pipeline.governance.proposals import canonical_json, evidence_hash

SNAPSHOT = {"strategy_id": "beta", "regime_weights": {"S0": 1.0, "S1": 1.0, "S2": 1.0}}
PROPOSED = {"strategy_id": "beta", "regime_weights": {"S0": 1.0, "S1": 0.6, "S2": 1.0}}


def proposal_frame(target_id: str = "d1/beta", snapshot: dict = SNAPSHOT, proposed: dict = PROPOSED,
                   confidence: float = 0.8, target_type: str = "STRATEGY_CONFIG", part: str = "shortfall:S1") -> pd.DataFrame:
    return pd.DataFrame([{
        "domain": target_id.split("/")[0], "target_type": target_type, "target_id": target_id,
        "current_config_snapshot_json": canonical_json(snapshot), "proposed_config_json": canonical_json(proposed),
        "rationale_text": "beta falls short of its backtests in S1", "evidence_json": json.dumps({"parts": []}),
        "evidence_hash": evidence_hash(target_type, target_id, snapshot, proposed, [part]), "confidence": confidence,
    }])
