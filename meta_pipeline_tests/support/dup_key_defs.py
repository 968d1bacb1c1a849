"""Test-only code location: a sensor that asks for the same run key twice in one tick."""

import dagster as dg


@dg.asset
def tiny_asset() -> int:
    return 1


tiny_job = dg.define_asset_job("tiny_job", selection=[tiny_asset])


@dg.sensor(job=tiny_job, default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=1)
def duplicate_key_sensor(context: dg.SensorEvaluationContext):
    yield dg.RunRequest(run_key="same-batch")
    yield dg.RunRequest(run_key="same-batch")


defs = dg.Definitions(assets=[tiny_asset], jobs=[tiny_job], sensors=[duplicate_key_sensor])
