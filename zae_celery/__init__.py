"""zae-celery: global rate limits for Celery tasks, shared by every worker.

The engine lives in :mod:`zae_celery.core`; every one of its public names
(``zae_celery.core.__all__``) is re-exported here.
"""

from zae_celery.core import (
    SCHEMA_VERSION,
    AsyncLease,
    AsyncRateLimiter,
    BucketRef,
    BucketStatus,
    CircuitOpen,
    EndpointUnreachable,
    IncompatibleSchema,
    Lease,
    LeaseClaimed,
    Limit,
    LimitStatus,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestExceedsBurst,
    Slot,
    TableNotFound,
    ValidationError,
    ZaeError,
    check_id,
)
from zae_celery.task import DeferralsExhausted, RateLimitedTask

__version__ = "0.1.0.dev0"

__all__ = [
    "SCHEMA_VERSION",
    "AsyncLease",
    "AsyncRateLimiter",
    "BucketRef",
    "BucketStatus",
    "CircuitOpen",
    "DeferralsExhausted",
    "EndpointUnreachable",
    "IncompatibleSchema",
    "Lease",
    "LeaseClaimed",
    "Limit",
    "LimitStatus",
    "RateLimitExceeded",
    "RateLimitedTask",
    "RateLimiter",
    "RateLimiterUnavailable",
    "RequestExceedsBurst",
    "Slot",
    "TableNotFound",
    "ValidationError",
    "ZaeError",
    "__version__",
    "check_id",
]
