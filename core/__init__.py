"""zae_celery.core: global token buckets in DynamoDB (no Celery imports here).

>>> from zae_celery.core import Limit, RateLimiter
"""

from .aio import AsyncLease, AsyncRateLimiter
from .engine import BucketStatus
from .errors import (
    CircuitOpen,
    EndpointUnreachable,
    IncompatibleSchema,
    LeaseClaimed,
    LimitStatus,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestExceedsBurst,
    TableNotFound,
    ValidationError,
    ZaeError,
)
from .lease import BucketRef, Slot
from .limiter import Lease, RateLimiter
from .limits import Limit
from .schema import SCHEMA_VERSION, check_id

__all__ = [
    "SCHEMA_VERSION",
    "AsyncLease",
    "AsyncRateLimiter",
    "BucketRef",
    "BucketStatus",
    "CircuitOpen",
    "EndpointUnreachable",
    "IncompatibleSchema",
    "Lease",
    "LeaseClaimed",
    "Limit",
    "LimitStatus",
    "RateLimitExceeded",
    "RateLimiter",
    "RateLimiterUnavailable",
    "RequestExceedsBurst",
    "Slot",
    "TableNotFound",
    "ValidationError",
    "ZaeError",
    "check_id",
]
