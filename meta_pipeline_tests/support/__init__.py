"""Helpers shared by the tests: data builders, the code-location description, process harnesses.

Nothing here is a test module (pytest collects only ``test_*.py``), so any test may import
from here; tests never import other test modules.

* ``frames``          synth domains as store frames, diagnostics inputs, SimEngine telemetry
* ``controller``      closed-loop telemetry ticks for the controller asset
* ``proposals``       a one-row config proposal frame
* ``code_location``   a deterministic description of the code location (snapshot, selections)
* ``e2e``             real processes: `dagster dev`, Celery workers, GraphQL through dagster_graphql
* ``celery_defs``     the learning job on the dagster-celery executor (imported by the worker)
* ``dup_key_defs``    a tiny code location whose sensor asks for one run key twice
"""
