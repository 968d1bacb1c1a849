"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, and they bite.

Layers point down only: contracts (+ knobs, paths) -> store -> cores -> defs ->
definitions -> lab -> entry points; only defs, definitions, lab and the entry points
import Dagster. A wrong import anywhere fails this test, so it fails CI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is part of the test extra: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # a fresh interpreter with only `cwd` on the path: the contracts judge the tree in cwd
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd), "HOME": str(cwd)})


def test_the_layer_contracts_are_kept() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Layers point down KEPT" in done.stdout
    assert "Only defs, definitions, lab and the entry points import Dagster KEPT" in done.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "broken"),
    [
        ("meta_pipeline/store/__init__.py", "import dagster  # noqa\n", "import Dagster BROKEN"),
        ("meta_pipeline/learning/__init__.py", "import meta_pipeline.lab.synth  # noqa\n", "Layers point down BROKEN"),
        ("meta_pipeline/governance/__init__.py", "import meta_pipeline.defs.resources  # noqa\n",
         "Layers point down BROKEN"),
    ],
)
def test_a_wrong_import_breaks_a_contract(tmp_path: Path, module: str, bad_import: str, broken: str) -> None:
    tree = tmp_path / "repo"
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    shutil.copytree(ROOT / "meta_pipeline", tree / "meta_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    target = tree / module
    target.write_text(target.read_text() + bad_import)
    done = _lint(tree)
    assert done.returncode != 0
    assert broken in done.stdout, done.stdout + done.stderr
