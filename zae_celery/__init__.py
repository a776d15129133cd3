"""zae-celery: global rate limits for Celery tasks, shared by every worker.

The engine lives in :mod:`zae_celery.core`; its public names are re-exported here.
"""

from zae_celery.core import (
    AsyncLease,
    AsyncRateLimiter,
    IncompatibleSchema,
    Lease,
    Limit,
    LimitStatus,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestExceedsBurst,
    TableNotFound,
    ValidationError,
    ZaeError,
)
from zae_celery.task import DeferralsExhausted, RateLimitedTask

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncLease",
    "AsyncRateLimiter",
    "DeferralsExhausted",
    "IncompatibleSchema",
    "Lease",
    "Limit",
    "LimitStatus",
    "RateLimitExceeded",
    "RateLimitedTask",
    "RateLimiter",
    "RateLimiterUnavailable",
    "RequestExceedsBurst",
    "TableNotFound",
    "ValidationError",
    "ZaeError",
    "__version__",
]
