"""The whole code location against a checked-in snapshot (snapshots/code_location.json).

Every asset (deps, group, partitions, kinds, automation condition, config), asset check,
job (its selection resolved to asset keys), sensor, schedule and resource key of
`meta_pipeline.definitions.defs`, sorted. A change to any of them fails this test with a
diff; when the change is intended, rewrite the snapshot and commit it with the change:

    META_PIPELINE_UPDATE_SNAPSHOT=1 pytest meta_pipeline_tests/test_code_location_snapshot.py
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from pathlib import Path

import pytest

from meta_pipeline_tests.support.code_location import describe_code_location, render

SNAPSHOT = Path(__file__).parent / "snapshots" / "code_location.json"
UPDATE_ENV = "META_PIPELINE_UPDATE_SNAPSHOT"
UPDATE_HINT = (f"If the change is intended, rewrite the snapshot and commit it:\n"
               f"    {UPDATE_ENV}=1 pytest {Path(__file__).relative_to(Path(__file__).parents[1])}")


def test_code_location_matches_the_snapshot() -> None:
    current = render(describe_code_location())
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        changed = not SNAPSHOT.exists() or SNAPSHOT.read_text() != current
        SNAPSHOT.write_text(current)
        message = f"{UPDATE_ENV}=1: wrote {SNAPSHOT} ({'changed' if changed else 'unchanged'})"
        print(message)
        warnings.warn(message, stacklevel=1)  # listed in pytest's warnings summary, so a passing run says so
        return
    if not SNAPSHOT.exists():
        pytest.fail(f"no snapshot at {SNAPSHOT}.\n{UPDATE_HINT}", pytrace=False)
    expected = SNAPSHOT.read_text()
    if current != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), current.splitlines(keepends=True),
                                            fromfile="snapshot (checked in)", tofile="code location (now)", n=6))
        pytest.fail(f"the code location differs from {SNAPSHOT.name}:\n{diff}\n{UPDATE_HINT}", pytrace=False)


def test_the_description_is_deterministic() -> None:
    """The snapshot can only be compared byte for byte if two loads describe the same way."""
    first, second = describe_code_location(), describe_code_location()
    assert render(first) == render(second)
    assert json.loads(render(first)) == first  # plain JSON (no tuples, sets, objects): nothing lost when written
