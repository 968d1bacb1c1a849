"""Launch a per-domain backfill through a running webserver's GraphQL API.

The Python GraphQL client has no backfill method, so this sends the
`launchPartitionBackfill` mutation itself (through the client's transport); the
daemon then launches one run per domain.
"""

from __future__ import annotations

from urllib.parse import urlparse

from dagster_graphql import DagsterGraphQLClient
from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION

from meta_pipeline.contracts import validate_domain

LOCATION_NAME = "meta_pipeline"
REPOSITORY_NAME = "__repository__"


class BackfillError(RuntimeError):
    pass


def graphql_client(url: str) -> DagsterGraphQLClient:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return DagsterGraphQLClient(parsed.hostname or "127.0.0.1", port_number=parsed.port, use_https=parsed.scheme == "https")


def launch_partition_backfill(url: str, domains: list[str], job_name: str = "domain_refresh_job",
                              title: str = "meta-pipeline backfill") -> str:
    """Backfill `job_name` over the given domain partitions; returns the backfill id."""
    for d in domains:
        validate_domain(d)
    client = graphql_client(url)
    params = {
        "selector": {
            "partitionSetName": f"{job_name}_partition_set",
            "repositorySelector": {"repositoryName": REPOSITORY_NAME, "repositoryLocationName": LOCATION_NAME},
        },
        "partitionNames": list(domains),
        "title": title,
    }
    result = client._execute(LAUNCH_PARTITION_BACKFILL_MUTATION, {"backfillParams": params})
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
    payload = graphql_client(url)._execute(BACKFILL_STATUS_QUERY, {"backfillId": backfill_id})
    result = payload["partitionBackfillOrError"]
    if result["__typename"] != "PartitionBackfill":
        raise BackfillError(str(result))
    return result["status"]
