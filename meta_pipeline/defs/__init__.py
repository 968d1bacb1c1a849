"""Dagster definitions, autoloaded by `dg.load_from_defs_folder` (one folder per area)."""
