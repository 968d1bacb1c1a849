"""Real-process test harness: a live `dagster dev` (webserver + daemon), Celery workers.

Everything here starts real operating-system processes, so everything here also makes
sure they end: each process gets its own session (process group) and is stopped with
SIGINT (dagster dev's graceful path), then SIGKILL for the whole group, then SIGKILL
for any straggler that still carries this test's marker environment variable (run
workers the code server spawned, which may have left the group). Output goes to log
files in the test's tmp_path whose tails are printed when a test fails, so CI output
says what the processes did. GraphQL goes through Dagster's own client
(`dagster_graphql.DagsterGraphQLClient`), never a hand-made HTTP request.

Nothing here is a Dagster definition: this module is imported by tests only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from meta_pipeline.commands.graphql import backfill_status

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: meta_pipeline_tests/support/e2e.py
VENV_BIN = Path(sys.executable).parent
LOCATION_NAME = "meta_pipeline"
# Every process a test starts carries this variable (value unique per test), so leftovers
# can be found by what they are, never by a broad name match.
MARKER_ENV = "META_PIPELINE_E2E_MARKER"

TERMINAL_RUN_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, n_lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n_lines:])


# ---------------------------------------------------------------------------
# Processes: start in their own session, find by marker, stop for sure
# ---------------------------------------------------------------------------


def marked_pids(marker: str) -> list[int]:
    """Live processes (ours) whose environment carries MARKER_ENV=marker."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone, or not ours to read
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_marked(marker: str, grace_seconds: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process carrying the marker. Returns the pids found."""
    pids = marked_pids(marker)
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 2.0)):
        alive = [p for p in pids if _pid_alive(p)]
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_pid_alive(p) for p in alive):
            time.sleep(0.1)
    return pids


@dataclass
class ManagedProcess:
    """A child process in its own session whose output goes to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()  # the child holds its own descriptor
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, first_signal: int = signal.SIGINT, grace_seconds: float = 30.0, group: bool = False) -> None:
        """A graceful signal (to the leader, or its whole group), wait, then SIGKILL the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                if group:
                    os.killpg(self.proc.pid, first_signal)
                else:
                    os.kill(self.proc.pid, first_signal)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group outlives its leader when children ignore the signal
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not time out
            pass

    def tail(self, n_lines: int = 60) -> str:
        return f"----- {self.name} ({self.log_path}) -----\n{log_tail(self.log_path, n_lines)}"


# ---------------------------------------------------------------------------
# The environment of one end-to-end test
# ---------------------------------------------------------------------------


@dataclass
class E2EEnvironment:
    """A temporary DAGSTER_HOME, data store and inbox, and the env every process gets."""

    root: Path
    dagster_home: Path
    db_url: str
    inbox: Path
    marker: str
    env: dict[str, str] = field(default_factory=dict)

    def run_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`meta-pipeline ARGS` as a real subprocess with this environment."""
        return subprocess.run(
            [str(VENV_BIN / "meta-pipeline"), *args], cwd=REPO_ROOT, env=self.env,
            capture_output=True, text=True, timeout=timeout, start_new_session=True,
        )


def make_environment(root: Path, *, db_url: str | None = None, instance_yaml: str | None = None,
                     extra_env: Mapping[str, str] | None = None) -> E2EEnvironment:
    """Lay out root/dagster_home with `instance_yaml` as its dagster.yaml (default: the repo's own)."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    text = instance_yaml if instance_yaml is not None else (REPO_ROOT / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(text)
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    db_url = db_url or f"sqlite:///{root / 'meta.db'}"
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "META_PIPELINE_", "PYTEST_"))}
    env.update({
        "DAGSTER_HOME": str(home),
        "META_PIPELINE_DB_URL": db_url,
        "META_PIPELINE_INBOX": str(inbox),
        "META_PIPELINE_DATA_DIR": str(root / "data"),  # nothing lands in the checkout's data/
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DAGSTER_TELEMETRY_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        MARKER_ENV: marker,
    })
    env.update(extra_env or {})
    return E2EEnvironment(root=root, dagster_home=home, db_url=db_url, inbox=inbox, marker=marker, env=env)


# ---------------------------------------------------------------------------
# GraphQL against the live webserver
# ---------------------------------------------------------------------------


class GraphQLError(RuntimeError):
    """The webserver answered, but not with what the query asks for (e.g. a PythonError)."""


def graphql_client(url: str, timeout: float = 30.0) -> DagsterGraphQLClient:
    """Dagster's own GraphQL client for the webserver at `url` (http://127.0.0.1:PORT)."""
    parsed = urlparse(url)
    return DagsterGraphQLClient(parsed.hostname or "127.0.0.1", port_number=parsed.port,
                                use_https=parsed.scheme == "https", timeout=max(1, round(timeout)))


def graphql(url: str, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 30.0) -> dict:
    """One query's `data`. The client has no public call for arbitrary queries, so this is its
    `_execute` (what its own methods and meta_pipeline.commands.graphql use). Transport failures
    and GraphQL `errors` raise DagsterGraphQLClientError."""
    return graphql_client(url, timeout)._execute(query, dict(variables or {}))


READINESS_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace { locationEntries { name locationOrLoadError {
        __typename ... on PythonError { message } } } }
  }
  instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } }
}
"""

RUNS_QUERY = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId jobName status creationTime startTime endTime tags { key value } } }
    ... on PythonError { message }
  }
}
"""

RUN_ERRORS_QUERY = """
query($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events {
        __typename
        ... on MessageEvent { message level stepKey }
        ... on ExecutionStepFailureEvent { stepKey error { message errorChain { error { message stack } } } }
        ... on RunFailureEvent { error { message } }
    } }
  }
}
"""

@dataclass(frozen=True)
class RunInfo:
    run_id: str
    job_name: str
    status: str
    tags: dict[str, str]
    creation_time: float
    start_time: float | None
    end_time: float | None

    @property
    def partition(self) -> str | None:
        return self.tags.get("dagster/partition")


def list_runs(url: str, job_name: str | None = None, tags: Mapping[str, str] | None = None) -> list[RunInfo]:
    run_filter: dict[str, Any] = {}
    if job_name:
        run_filter["pipelineName"] = job_name
    if tags:
        run_filter["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
    result = graphql(url, RUNS_QUERY, {"filter": run_filter})["runsOrError"]
    if result["__typename"] != "Runs":
        raise GraphQLError(str(result))
    return [
        RunInfo(r["runId"], r["jobName"], r["status"], {t["key"]: t["value"] for t in r["tags"]},
                r["creationTime"], r.get("startTime"), r.get("endTime"))
        for r in result["results"]
    ]


def run_failure_summary(url: str, run_id: str, max_chars: int = 4000) -> str:
    """The error messages of a failed run (step failures first), for assertion messages."""
    try:
        conn = graphql(url, RUN_ERRORS_QUERY, {"runId": run_id})["logsForRun"]
    except (GraphQLError, DagsterGraphQLClientError) as exc:
        return f"(could not read logs of run {run_id}: {exc})"
    lines = []
    for event in conn.get("events", []):
        error = event.get("error")
        if error:
            # the user's exception is the innermost cause; Dagster's wrapper says only which op
            causes = [c["error"] for c in error.get("errorChain") or []]
            root = causes[-1] if causes else {}
            lines.append(f"{event['__typename']} [{event.get('stepKey')}]: {error.get('message')}"
                         + (f"\n  caused by: {root.get('message')}{''.join((root.get('stack') or [])[-3:])}" if root else ""))
        elif event.get("level") in ("ERROR", "CRITICAL"):
            lines.append(f"{event['__typename']} [{event.get('stepKey')}]: {event.get('message')}")
    return ("\n".join(lines) or "(no error events)")[:max_chars]


REPOSITORY_QUERY = """
query($sel: RepositorySelector!) {
  repositoryOrError(repositorySelector: $sel) {
    __typename
    ... on Repository {
      jobs { name }
      sensors { name sensorState { status } }
      assetNodes { assetKey { path } groupName isPartitioned }
    }
    ... on PythonError { message }
  }
}
"""

PARTITIONS_QUERY = """
query($sel: RepositorySelector!, $name: String!) {
  partitionSetOrError(repositorySelector: $sel, partitionSetName: $name) {
    __typename
    ... on PartitionSet { partitionsOrError { __typename ... on Partitions { results { name } } } }
  }
}
"""

REPOSITORY_SELECTOR = {"repositoryName": "__repository__", "repositoryLocationName": LOCATION_NAME}


@dataclass(frozen=True)
class RepositoryView:
    """What the live code location exposes: jobs, sensors (with status), assets by group."""

    jobs: frozenset[str]
    sensors: dict[str, str]  # name -> RUNNING / STOPPED
    asset_groups: dict[str, str]  # asset name -> group
    partitioned_assets: frozenset[str]


def repository_view(url: str) -> RepositoryView:
    repo = graphql(url, REPOSITORY_QUERY, {"sel": REPOSITORY_SELECTOR})["repositoryOrError"]
    if repo["__typename"] != "Repository":
        raise GraphQLError(str(repo))
    nodes = repo["assetNodes"]
    return RepositoryView(
        jobs=frozenset(j["name"] for j in repo["jobs"]),
        sensors={s["name"]: s["sensorState"]["status"] for s in repo["sensors"]},
        asset_groups={"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes},
        partitioned_assets=frozenset("/".join(n["assetKey"]["path"]) for n in nodes if n["isPartitioned"]),
    )


def job_partitions(url: str, job_name: str) -> list[str]:
    """The partition keys the webserver lists for a partitioned job (here: the known domains)."""
    result = graphql(url, PARTITIONS_QUERY, {"sel": REPOSITORY_SELECTOR, "name": f"{job_name}_partition_set"})
    pset = result["partitionSetOrError"]
    if pset["__typename"] != "PartitionSet" or pset["partitionsOrError"]["__typename"] != "Partitions":
        raise GraphQLError(str(pset))
    return [p["name"] for p in pset["partitionsOrError"]["results"]]


SENSOR_TICK_QUERY = """
query($sel: SensorSelector!) {
  sensorOrError(sensorSelector: $sel) {
    __typename
    ... on Sensor { sensorState { ticks(limit: 1, statuses: [SUCCESS, SKIPPED]) { timestamp status } } }
    ... on PythonError { message }
  }
}
"""


def last_finished_sensor_tick(url: str, sensor_name: str) -> float | None:
    """When the sensor last finished an evaluation (SUCCESS or SKIPPED), as a Unix timestamp."""
    result = graphql(url, SENSOR_TICK_QUERY, {"sel": {**REPOSITORY_SELECTOR, "sensorName": sensor_name}})
    sensor = result["sensorOrError"]
    if sensor["__typename"] != "Sensor":
        raise GraphQLError(str(sensor))
    ticks = sensor["sensorState"]["ticks"]
    return ticks[0]["timestamp"] if ticks else None


def poll(predicate: Callable[[], Any], timeout: float, interval: float = 1.0, describe: Callable[[], str] | None = None,
         abort: Callable[[], str | None] | None = None) -> Any:
    """predicate() until truthy; `abort()` returning a message stops early (e.g. a process died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if abort is not None:
            reason = abort()
            if reason:
                raise RuntimeError(reason)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {describe() if describe else 'condition not met'}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# dagster dev
# ---------------------------------------------------------------------------


@dataclass
class DagsterDev:
    """A running `dagster dev -w workspace.yaml` (webserver + daemon + code server)."""

    environment: E2EEnvironment
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def died(self) -> str | None:
        code = self.process.exited()
        return None if code is None else f"dagster dev exited with code {code}\n{self.process.tail()}"

    def wait_until_ready(self, timeout: float = 90.0, daemons: Iterable[str] = ("SENSOR", "QUEUED_RUN_COORDINATOR",
                                                                               "BACKFILL")) -> None:
        """The webserver answers, the code location is loaded and the named daemons are healthy."""
        wanted = set(daemons)
        last = {"state": "no answer yet"}

        def ready() -> bool:
            try:
                data = graphql(self.url, READINESS_QUERY, timeout=5)
            except DagsterGraphQLClientError as exc:  # not listening yet, or no answer in time
                last["state"] = f"webserver: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                return False
            entries = {e["name"]: e["locationOrLoadError"] for e in data["workspaceOrError"].get("locationEntries", [])}
            location = entries.get(LOCATION_NAME)
            if location and location["__typename"] == "PythonError":
                raise RuntimeError(f"code location {LOCATION_NAME} failed to load:\n{location['message']}")
            if not location or location["__typename"] != "RepositoryLocation":
                last["state"] = f"location {LOCATION_NAME}: {location and location['__typename']}"
                return False
            healthy = {d["daemonType"] for d in data["instance"]["daemonHealth"]["allDaemonStatuses"] if d["healthy"]}
            if not wanted <= healthy:
                last["state"] = f"daemons not yet healthy: {sorted(wanted - healthy)}"
                return False
            return True

        poll(ready, timeout, interval=1.0, describe=lambda: last["state"], abort=self.died)

    def wait_for_run(self, job_name: str, partition: str | None = None, timeout: float = 120.0,
                     tags: Mapping[str, str] | None = None) -> RunInfo:
        """The first matching run to reach a terminal status; raises with its errors unless SUCCESS."""
        query_tags = dict(tags or {})
        if partition is not None:
            query_tags["dagster/partition"] = partition
        seen: dict[str, str] = {}

        def finished() -> RunInfo | None:
            runs = list_runs(self.url, job_name, query_tags)
            seen.clear()
            seen.update({r.run_id[:8]: r.status for r in runs})
            done = [r for r in runs if r.status in TERMINAL_RUN_STATUSES]
            return done[0] if done else None

        run = poll(finished, timeout, interval=1.0, abort=self.died,
                   describe=lambda: f"a finished {job_name} run for {partition or query_tags} (runs so far: {seen})")
        if run.status != "SUCCESS":
            raise AssertionError(f"{job_name} run {run.run_id} for {partition}: {run.status}\n"
                                 f"{run_failure_summary(self.url, run.run_id)}")
        return run

    def wait_for_backfill(self, backfill_id: str, n_runs: int, timeout: float = 150.0) -> list[RunInfo]:
        """Until all n_runs runs of the backfill succeeded; raises on a failed run or backfill.

        The backfill's own status trails its runs by up to one daemon loop (30 s), so the
        runs are what is waited on; meta_pipeline.commands.graphql.backfill_status is checked too.
        """
        state: dict[str, Any] = {}

        def complete() -> list[RunInfo] | None:
            status = backfill_status(self.url, backfill_id)
            runs = list_runs(self.url, tags={"dagster/backfill": backfill_id})
            state.update(status=status, runs={r.run_id[:8]: (r.partition, r.status) for r in runs})
            failed = [r for r in runs if r.status in ("FAILURE", "CANCELED")]
            if failed:
                raise AssertionError(f"backfill {backfill_id}: run {failed[0].run_id} {failed[0].status}\n"
                                     f"{run_failure_summary(self.url, failed[0].run_id)}")
            if status in ("FAILED", "CANCELED", "COMPLETED_FAILED"):
                raise AssertionError(f"backfill {backfill_id} ended {status}: {state}")
            all_succeeded = len(runs) >= n_runs and all(r.status == "SUCCESS" for r in runs)
            return runs if all_succeeded else None

        return poll(complete, timeout, interval=1.0, abort=self.died,
                    describe=lambda: f"backfill {backfill_id} to complete (state: {state})")


PORT_IN_USE_MARKERS = ("address already in use", "Errno 98")


@contextmanager
def running_dagster_dev(environment: E2EEnvironment, *, ready_timeout: float = 90.0,
                        attempts: int = 3) -> Iterator[DagsterDev]:
    """`dagster dev` from the repo root with this environment; always torn down, logs on failure.

    A free port can be taken by someone else between our probe and the webserver's bind;
    that one failure is retried on a new port.
    """
    dev: DagsterDev | None = None
    failed = True
    try:
        for attempt in range(1, attempts + 1):
            port = free_port()
            process = ManagedProcess(
                name="dagster dev",
                argv=[str(VENV_BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                env=environment.env, cwd=REPO_ROOT, log_path=environment.root / "logs" / f"dagster_dev.{attempt}.log",
            )
            dev = DagsterDev(environment, port, process)
            process.start()
            try:
                dev.wait_until_ready(timeout=ready_timeout)
                break
            except RuntimeError:
                log = process.log_path.read_text(errors="replace") if process.log_path.exists() else ""
                if attempt == attempts or not any(m in log for m in PORT_IN_USE_MARKERS):
                    raise
                process.stop(signal.SIGINT, grace_seconds=15.0)
                kill_marked(environment.marker)
        yield dev
        failed = False
    finally:
        if dev is not None:
            dev.process.stop(signal.SIGINT, grace_seconds=30.0)
            if failed:
                print(dev.process.tail(150))
        kill_marked(environment.marker)
