"""Every error the engine raises derives from :class:`ZaeError`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CircuitOpen",
    "EndpointUnreachable",
    "IncompatibleSchema",
    "LeaseClaimed",
    "LimitStatus",
    "RateLimitExceeded",
    "RateLimiterUnavailable",
    "RequestExceedsBurst",
    "TableNotFound",
    "ValidationError",
    "ZaeError",
]


class ZaeError(Exception):
    """Base class of every error raised by zae-celery."""


class ValidationError(ZaeError, ValueError):
    """Bad input. ``field`` names the offending argument, ``allowed`` says what is accepted."""

    def __init__(self, field: str, problem: str, allowed: str = "") -> None:
        self.field = field
        self.problem = problem
        self.allowed = allowed
        # The arguments are kept as ``args`` so that the error survives pickling and
        # Celery's result serialisation as itself, with its field, not as a base class.
        super().__init__(field, problem, allowed)

    def __str__(self) -> str:
        text = f"{self.field}: {self.problem}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return text


class RequestExceedsBurst(ValidationError):
    """A request larger than a bucket's burst: it can never succeed, so no retry_after."""

    def __init__(self, field: str, requested: int, burst: int, shards: int = 1) -> None:
        self.requested = requested
        self.burst = burst
        self.shards = shards
        """How many items the bucket is spread over: ``burst`` is one shard's."""
        where = "the bucket" if shards == 1 else f"each of its {shards} shards"
        super().__init__(
            field,
            f"requests {requested} tokens but {where} holds at most {burst}; "
            "it can never be granted",
            f"at most {burst}, or raise the limit's burst"
            + ("" if shards == 1 else " or use fewer shards"),
        )
        self.args = (field, requested, burst) + ((shards,) if shards != 1 else ())


class RateLimiterUnavailable(ZaeError):
    """The store could not answer (endpoint down, throttled beyond the retry budget, ...)."""


class TableNotFound(RateLimiterUnavailable):
    """The configured table does not exist."""


class LeaseClaimed(ZaeError):
    """A carried reservation was already started: this is another delivery of the same
    message (a redelivery, a duplicate publish). Nothing was consumed by the refused start;
    the caller acquires afresh (or drops the duplicate)."""


class EndpointUnreachable(RateLimiterUnavailable):
    """No reply came back: connection refused or reset, or a connect or read timeout."""


class CircuitOpen(RateLimiterUnavailable):
    """Refused without sending anything: the last requests failed and the circuit breaker
    waits out its cool-down. ``retry_after`` is the number of seconds until its probe."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IncompatibleSchema(ZaeError):
    """The table was written by an incompatible version of the engine."""


@dataclass(frozen=True)
class LimitStatus:
    """The state of one limit at the moment of a decision.

    ``available`` is in tokens (negative while the bucket is in debt); ``retry_after`` is
    the number of seconds until ``requested`` would be granted (0 when it is now).
    """

    entity_id: str
    resource: str
    limit_name: str
    requested: int
    available: float
    burst: int
    retry_after: float
    inflight: bool = False
    """An in-flight cap (``Limit.concurrent``): ``burst`` is its ``n``, ``available`` the
    slots free, and ``retry_after`` a polling interval (a slot comes back when a holder
    ends, which cannot be foreseen)."""

    @property
    def exceeded(self) -> bool:
        """True when this limit refused the request."""
        return self.retry_after > 0


class RateLimitExceeded(ZaeError):
    """The request was refused. ``violations`` are the limits that refused, ``passed``
    the ones that would have granted; each violation's ``retry_after`` is exact: that
    many seconds from now it would be granted, if nothing else consumed in between.

    ``retry_after`` is the longest of those waits plus ``jitter``: a random spread the
    engine adds when other clients share the bucket (their grants beat this process's
    requests, or show in its replies), so that clients refused together do not all come
    back in the same millisecond (see "No herd" in docs/engine.md). It is 0 for a lone
    client.
    """

    def __init__(
        self, violations: list[LimitStatus], passed: list[LimitStatus], jitter: float = 0.0
    ) -> None:
        self.violations = violations
        self.passed = passed
        self.jitter = jitter
        self.retry_after = max((v.retry_after for v in violations), default=0.0) + jitter
        names = ", ".join(f"{v.entity_id}/{v.resource}/{v.limit_name}" for v in violations)
        super().__init__(f"rate limit exceeded on {names}; retry after {self.retry_after:.3f} s")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (a task's result, a process pool) as itself, with its limits, not as
        # the nearest base class Celery could rebuild from the message alone.
        return (type(self), (self.violations, self.passed, self.jitter))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (for logs, task results, HTTP 429 bodies)."""
        return {
            "retry_after": self.retry_after,
            "violations": [asdict(v) for v in self.violations],
            "passed": [asdict(p) for p in self.passed],
        }
