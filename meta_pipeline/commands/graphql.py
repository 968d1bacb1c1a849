"""Launch a per-domain backfill through a running webserver's GraphQL API.

The Python GraphQL client has no backfill method, so this sends the
`launchPartitionBackfill` mutation itself (through the client's transport); the
daemon then launches one run per domain.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION

from meta_pipeline.commands.errors import UserError, first_line
from meta_pipeline.contracts import validate_domain

LOCATION_NAME = "meta_pipeline"
REPOSITORY_NAME = "__repository__"


class BackfillError(RuntimeError):
    pass


def graphql_client(url: str) -> DagsterGraphQLClient:
    try:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        port = parsed.port
    except ValueError as exc:  # e.g. "http://[bad" or a port out of range
        raise UserError(f"--webserver {url!r}", f"not a URL ({exc})", "e.g. http://127.0.0.1:3000") from exc
    if parsed.scheme not in ("http", "https"):
        raise UserError(f"--webserver {url!r}", f"unsupported scheme {parsed.scheme!r}", "e.g. http://127.0.0.1:3000")
    return DagsterGraphQLClient(parsed.hostname or "127.0.0.1", port_number=port, use_https=parsed.scheme == "https")


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The connection error behind a GraphQL client error (nothing listening, DNS, ...), if that is what it is."""
    import urllib.error

    import requests

    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        name = type(current).__name__
        if isinstance(current, (ConnectionError, urllib.error.URLError, requests.exceptions.ConnectionError,
                                requests.exceptions.Timeout)) or name in ("TransportConnectionFailed",):
            return current
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    """The short reason of a connection failure, e.g. 'Connection refused' (else its first line)."""
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return found[-1].strip() if found else first_line(exc)


def _execute(url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    """One GraphQL request; a webserver that does not answer (or fails the request) is a UserError naming --webserver."""
    client = graphql_client(url)
    try:
        return client._execute(query, variables)
    except DagsterGraphQLClientError as exc:
        cause = _connection_failure(exc)
        if cause is not None:
            raise UserError(f"--webserver {url}", f"nothing answers there ({_reason(cause)})",
                            "start it (make ui, i.e. dagster dev) or check the URL") from exc
        raise UserError(f"--webserver {url}", f"the GraphQL request failed ({first_line(exc.__cause__ or exc)})",
                        "check that the URL is a Dagster webserver serving this code location", code=1) from exc


def launch_partition_backfill(url: str, domains: list[str], job_name: str = "domain_refresh_job",
                              title: str = "meta-pipeline backfill") -> str:
    """Backfill `job_name` over the given domain partitions; returns the backfill id."""
    for d in domains:
        validate_domain(d)
    params = {
        "selector": {
            "partitionSetName": f"{job_name}_partition_set",
            "repositorySelector": {"repositoryName": REPOSITORY_NAME, "repositoryLocationName": LOCATION_NAME},
        },
        "partitionNames": list(domains),
        "title": title,
    }
    result = _execute(url, LAUNCH_PARTITION_BACKFILL_MUTATION, {"backfillParams": params})
    payload = result["launchPartitionBackfill"]
    if payload["__typename"] != "LaunchBackfillSuccess":
        raise BackfillError(f"{payload['__typename']}: {payload.get('message')}")
    return payload["backfillId"]


BACKFILL_STATUS_QUERY = """
query($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill { id status numPartitions }
    ... on PythonError { message }
  }
}
"""


def backfill_status(url: str, backfill_id: str) -> str:
    payload = _execute(url, BACKFILL_STATUS_QUERY, {"backfillId": backfill_id})
    result = payload["partitionBackfillOrError"]
    if result["__typename"] != "PartitionBackfill":
        raise BackfillError(str(result))
    return result["status"]
