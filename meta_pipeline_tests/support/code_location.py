"""The code location as data: what `meta_pipeline.definitions.defs` defines, deterministically.

`describe_code_location` is what the snapshot test compares with
snapshots/code_location.json. The selection helpers let wiring tests ask the definitions
which assets a group holds instead of listing asset names by hand.

Only what is known statically is recorded (no run, no instance): asset check severity, for
one, is decided by each evaluation (AssetCheckResult), so a check records `blocking` only.
Resources are recorded by key, never by class, so the description does not change when a
resource's implementation does.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

IMPLICIT_JOB_PREFIX = "__ASSET_JOB"  # Dagster's own asset job(s), not defined by this project


def repo_defs() -> dg.Definitions:
    """The code location's Definitions (imported on first use)."""
    from meta_pipeline.definitions import defs

    return defs


def asset_graph(defs: dg.Definitions | None = None):
    return (defs or repo_defs()).resolve_asset_graph()


def asset_keys(selection: dg.AssetSelection, defs: dg.Definitions | None = None) -> set[dg.AssetKey]:
    """The asset keys a selection resolves to in the code location."""
    return set(selection.resolve(asset_graph(defs)))


def asset_names(selection: dg.AssetSelection, defs: dg.Definitions | None = None) -> set[str]:
    return {key.to_user_string() for key in asset_keys(selection, defs)}


def asset_check_keys(selection: dg.AssetSelection, defs: dg.Definitions | None = None) -> set[dg.AssetCheckKey]:
    """The asset checks that come with a selection (checks on the selected assets)."""
    return set(selection.resolve_checks(asset_graph(defs)))


def unbound_definitions_for(selection: dg.AssetSelection, defs: dg.Definitions | None = None) -> list:
    """The code location's own AssetsDefinitions / AssetChecksDefinitions that hold the selected
    assets or their checks, as defined (no resources bound), to pass to `dg.materialize` with
    the test's own resources."""
    defs = defs or repo_defs()
    keys, checks = asset_keys(selection, defs), asset_check_keys(selection, defs)
    out = []
    for definition in [*(defs.assets or []), *(defs.asset_checks or [])]:
        if not isinstance(definition, dg.AssetsDefinition):
            continue  # plain AssetSpecs (external assets) are not materializable
        if set(definition.keys) & keys or set(definition.check_keys) & checks:
            if definition not in out:
                out.append(definition)
    return out


# ---------------------------------------------------------------------------
# The description
# ---------------------------------------------------------------------------


def _key(key: dg.AssetKey) -> str:
    return key.to_user_string()


def _partitions(partitions_def: Any) -> dict | None:
    if partitions_def is None:
        return None
    out: dict[str, Any] = {"type": type(partitions_def).__name__}
    if isinstance(partitions_def, dg.DynamicPartitionsDefinition):
        out["name"] = partitions_def.name
    elif isinstance(partitions_def, dg.StaticPartitionsDefinition):
        out["keys"] = list(partitions_def.get_partition_keys())
    elif isinstance(partitions_def, dg.TimeWindowPartitionsDefinition):
        out["cron_schedule"] = partitions_def.cron_schedule
        out["timezone"] = partitions_def.timezone
    elif isinstance(partitions_def, dg.MultiPartitionsDefinition):
        out["dimensions"] = {d.name: _partitions(d.partitions_def) for d in partitions_def.partitions_defs}
    return out


def _condition(condition: Any) -> str | None:
    """An automation condition by its label (e.g. 'eager'), else its class name; None if absent."""
    if condition is None:
        return None
    return getattr(condition, "label", None) or type(condition).__name__


def _config_fields(node_def: Any) -> list[str] | None:
    """The top-level config field names of an op, or None when it takes no config."""
    schema = getattr(node_def, "config_schema", None)
    if schema is None:
        return None
    config_type = schema.as_field().config_type
    fields = getattr(config_type, "fields", None)
    if fields is None:  # Dagster's "no schema" is an untyped Any field
        return None if type(config_type).__name__ == "Any" else [f"<{config_type.given_name or config_type.key}>"]
    return sorted(fields)


def _assets(defs: dg.Definitions) -> list[dict]:
    out = []
    for spec in sorted(defs.resolve_all_asset_specs(), key=lambda s: _key(s.key)):
        assets_def = defs.resolve_assets_def(spec.key)
        fields = _config_fields(assets_def.node_def) if assets_def.is_executable else None
        out.append({
            "key": _key(spec.key),
            "deps": sorted(_key(dep.asset_key) for dep in spec.deps),
            "group": spec.group_name,
            "partitions": _partitions(spec.partitions_def),
            "kinds": sorted(spec.kinds or ()),
            "automation_condition": _condition(spec.automation_condition),
            "has_config_schema": fields is not None,
            "config_fields": fields,
            "required_resource_keys": sorted(assets_def.required_resource_keys),
            "executable": assets_def.is_executable,
        })
    return out


def _asset_checks(defs: dg.Definitions) -> list[dict]:
    graph = defs.resolve_asset_graph()
    out = []
    for check_key in sorted(graph.asset_check_keys, key=lambda k: (_key(k.asset_key), k.name)):
        spec = graph.get_check_spec(check_key)
        out.append({
            "asset": _key(check_key.asset_key),
            "name": check_key.name,
            "blocking": bool(spec.blocking),
            "additional_deps": sorted(_key(dep.asset_key) for dep in spec.additional_deps or ()),
            "automation_condition": _condition(spec.automation_condition),
        })
    return out


def _jobs(defs: dg.Definitions) -> list[dict]:
    graph = defs.resolve_asset_graph()
    # asset jobs as defined (dg.define_asset_job): their selection, to resolve against the graph
    selections = {job.name: job.selection for job in defs.jobs or []
                  if isinstance(getattr(job, "selection", None), dg.AssetSelection)}
    out = []
    for job in sorted(defs.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith(IMPLICIT_JOB_PREFIX):
            continue
        entry: dict[str, Any] = {"name": job.name, "partitions": _partitions(job.partitions_def)}
        if job.name in selections:
            selection = selections[job.name]
            entry["assets"] = sorted(_key(k) for k in selection.resolve(graph))
            entry["asset_checks"] = sorted(f"{_key(k.asset_key)}:{k.name}" for k in selection.resolve_checks(graph))
        elif job.asset_layer.selected_asset_keys:  # a job built with assets already resolved
            entry["assets"] = sorted(_key(k) for k in job.asset_layer.selected_asset_keys)
        else:  # an op job
            entry["ops"] = sorted(job.graph.node_names())
        out.append(entry)
    return out


def _target_job_names(sensor: dg.SensorDefinition) -> list[str]:
    names = set()
    for target in getattr(sensor, "targets", None) or []:
        name = getattr(target, "job_name", None)
        if name:
            names.add(name)
    return sorted(names)


def _sensors(defs: dg.Definitions) -> list[dict]:
    graph = defs.resolve_asset_graph()
    out = []
    for sensor in sorted(defs.sensors or [], key=lambda s: s.name):
        selection = getattr(sensor, "asset_selection", None)
        out.append({
            "name": sensor.name,
            "type": sensor.sensor_type.value,
            "jobs": _target_job_names(sensor),
            "assets": sorted(_key(k) for k in selection.resolve(graph)) if selection is not None else None,
            "minimum_interval_seconds": sensor.minimum_interval_seconds,
            "default_status": sensor.default_status.value,
        })
    return out


def _schedules(defs: dg.Definitions) -> list[dict]:
    out = []
    for schedule in sorted(defs.schedules or [], key=lambda s: s.name):
        cron = schedule.cron_schedule
        out.append({
            "name": schedule.name,
            "cron": cron if isinstance(cron, str) else list(cron),
            "timezone": schedule.execution_timezone,
            "job": schedule.job_name,
            "default_status": schedule.default_status.value,
        })
    return out


def describe_code_location(defs: dg.Definitions | None = None) -> dict:
    """Everything the code location wires together, each list sorted by name."""
    defs = defs or repo_defs()
    executor = defs.executor
    return {
        "assets": _assets(defs),
        "asset_checks": _asset_checks(defs),
        "jobs": _jobs(defs),
        "sensors": _sensors(defs),
        "schedules": _schedules(defs),
        "resources": sorted(defs.resources or {}),
        "executor": getattr(executor, "name", None) if executor is not None else None,
    }


def render(description: dict) -> str:
    """The snapshot file's text: stable key order, one item per line, trailing newline."""
    return json.dumps(description, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
