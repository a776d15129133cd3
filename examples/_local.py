"""What the small examples share: where DynamoDB is, how a result is printed, and the
configuration of the examples that run real workers (a filesystem broker in a folder).

Every example takes ``--endpoint-url`` (or the ``ZAE_ENDPOINT_URL`` environment variable)
for a DynamoDB endpoint that is already running, such as DynamoDB Local or a moto server.
Without one it starts an embedded moto server on 127.0.0.1 and stops it at the end, so
no AWS account is needed. ``--json`` prints one JSON object instead of text, for
programs (the tests read it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zae_celery.testing import moto_server, use_local_credentials

__all__ = [
    "ENDPOINT_ENV",
    "Endpoint",
    "dynamodb",
    "emit",
    "folder_conf",
    "parse_args",
    "table_name",
]

ENDPOINT_ENV = "ZAE_ENDPOINT_URL"


@dataclass(frozen=True)
class Endpoint:
    """A DynamoDB endpoint: its URL, and whether the example started it itself."""

    url: str
    embedded: bool


def parse_args(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every example takes; ``doc`` (the module docstring) is the help text."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None
    )
    parser.add_argument(
        "--endpoint-url",
        default=os.environ.get(ENDPOINT_ENV) or None,
        help=f"a running DynamoDB endpoint (default: ${ENDPOINT_ENV}, else an embedded "
        "moto server started for this run)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


@contextlib.contextmanager
def dynamodb(endpoint_url: str | None) -> Iterator[Endpoint]:
    """The endpoint given, or a moto server started here and stopped (by PID) on exit.

    boto3 gets placeholder credentials and a region unless real ones are configured:
    local endpoints accept any.
    """
    use_local_credentials()
    if endpoint_url:
        yield Endpoint(endpoint_url, embedded=False)
        return
    with moto_server() as server:
        yield Endpoint(server.url, embedded=True)


def table_name(example: str) -> str:
    """A fresh table name for one run, so no earlier run's buckets are in the way."""
    return f"zae-example-{example}-{uuid.uuid4().hex[:8]}"


def emit(as_json: bool, endpoint: Endpoint, result: dict[str, Any], text: Sequence[str]) -> None:
    """Print ``result`` and the endpoint used as one JSON object, or the ``text`` lines."""
    if as_json:
        where = {"endpoint": endpoint.url, "embedded_endpoint": endpoint.embedded}
        print(json.dumps({**where, **result}, indent=2))
    else:
        print("\n".join(text))


def folder_conf(endpoint_url: str, table: str, folder: Path, queue: str) -> dict[str, Any]:
    """Celery settings of an example that runs real workers: the buckets in ``table`` at
    ``endpoint_url``, the broker (``harness.fsbroker``, registered here) and the results
    in ``folder``, tasks sent to ``queue`` by default."""
    from harness import fsbroker

    (folder / "results").mkdir(parents=True, exist_ok=True)
    fsbroker.register()
    return {
        "broker_url": f"{fsbroker.SCHEME}://",
        "broker_transport_options": fsbroker.transport_options(folder / "broker"),
        "result_backend": (folder / "results").as_uri(),
        "broker_connection_retry_on_startup": True,
        "task_default_queue": queue,
        "zae_table_name": table,
        "zae_endpoint_url": endpoint_url,
    }
