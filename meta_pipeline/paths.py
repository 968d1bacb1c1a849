"""Where things live: the project root, the embedded store, the inbox and DAGSTER_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout holding pyproject.toml and dagster.yaml (editable install), else the cwd."""
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").exists() and (here / "dagster.yaml").exists():
        return here
    return Path.cwd()


def data_dir() -> Path:
    return Path(os.environ.get("META_PIPELINE_DATA_DIR", project_root() / "data"))


def inbox_dir() -> Path:
    return Path(os.environ.get("META_PIPELINE_INBOX", data_dir() / "inbox"))


def default_db_url() -> str:
    """`META_PIPELINE_DB_URL`, else the embedded SQLite file data/meta.db under the project root."""
    url = os.environ.get("META_PIPELINE_DB_URL")
    if url:
        return url
    return f"sqlite:///{data_dir() / 'meta.db'}"


def dagster_home() -> Path:
    """DAGSTER_HOME when set; else the project root, which holds dagster.yaml.

    The CLI, the demo and `make ui` all resolve the same folder, so a partition added
    by `meta-pipeline ingest` is the one `dagster dev` shows.
    """
    env = os.environ.get("DAGSTER_HOME")
    return Path(env) if env else project_root()


def ensure_dagster_home() -> Path:
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
