"""Usage accounting: what each entity and resource consumed, per window, from the
table's stream (docs/accounting.md).

The aggregator (:class:`Aggregator`; in AWS Lambda, :mod:`.handler`; locally,
``zae-celery aggregate``) folds the stream's bucket writes into usage snapshots;
:func:`read_usage` (``zae-celery usage``) reads them back. This package imports only
the standard library and boto3, so the Lambda function needs nothing else.
"""

from .local import StreamReader, Totals, stream_arn
from .snapshots import (
    DEFAULT_RETENTION_DAYS,
    Aggregator,
    Applied,
    LimitUsage,
    UsageSnapshot,
    read_usage,
)
from .stream import DEFAULT_WINDOWS, WINDOWS

__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "DEFAULT_WINDOWS",
    "WINDOWS",
    "Aggregator",
    "Applied",
    "LimitUsage",
    "StreamReader",
    "Totals",
    "UsageSnapshot",
    "read_usage",
    "stream_arn",
]
