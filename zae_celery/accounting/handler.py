"""The aggregator's AWS Lambda entry point: ``zae_celery.accounting.handler.handler``.

Configured by environment variables (the stack sets them):

``ZAE_TABLE_NAME``       the table whose stream feeds the function (required)
``ZAE_SNAPSHOT_WINDOWS`` comma-separated windows (default ``hourly,daily``)
``ZAE_RETENTION_DAYS``   days a snapshot is kept after its window ends (default 90)

An error raises, so Lambda delivers the whole batch again (or, with bisection, its
halves): the snapshots' guards make that exact (see :mod:`.stream`). Only boto3 is
imported, which the Lambda runtime provides.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from .snapshots import DEFAULT_RETENTION_DAYS, Aggregator
from .stream import DEFAULT_WINDOWS

__all__ = ["aggregator_from_environment", "handler"]

log = logging.getLogger(__name__)
_aggregator: Aggregator | None = None


def aggregator_from_environment(
    environ: Mapping[str, str] = os.environ, client: Any = None
) -> Aggregator:
    """An :class:`Aggregator` configured as the function's environment says."""
    table = environ.get("ZAE_TABLE_NAME", "")
    if not table:
        raise RuntimeError("ZAE_TABLE_NAME is not set: the aggregator needs its table's name")
    windows = environ.get("ZAE_SNAPSHOT_WINDOWS", ",".join(DEFAULT_WINDOWS)).split(",")
    days = environ.get("ZAE_RETENTION_DAYS", str(DEFAULT_RETENTION_DAYS))
    try:
        retention = int(days)
    except ValueError:
        raise RuntimeError(f"ZAE_RETENTION_DAYS must be a whole number, got {days!r}") from None
    if client is None:
        import boto3

        client = boto3.client("dynamodb")
    return Aggregator(client, table, windows, retention)


def handler(event: Mapping[str, Any], context: Any = None) -> dict[str, int]:
    """Fold one stream batch into the usage snapshots; returns what it did."""
    global _aggregator
    if _aggregator is None:
        _aggregator = aggregator_from_environment()
    applied = _aggregator.apply(event.get("Records", []))
    result = {"records": applied.records, "written": applied.written, "skipped": applied.skipped}
    log.info(json.dumps(result))
    return result
