"""What the sync and async limiters share around the flows: client settings, how an
exception becomes a reply or an error, and the lease's read-only view."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
)
from botocore.exceptions import ConnectionError as BotoCoreConnectionError

from .engine import Clock, Engine, Flow, LeaseState, OnUnavailable
from .errors import EndpointUnreachable, RateLimiterUnavailable, ValidationError
from .requests import Reply
from .resilience import CircuitBreaker, RetryPolicy, guard

__all__ = [
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "LeaseView",
    "LimiterBase",
    "client_config",
    "client_kwargs",
    "reply_from",
]

DEFAULT_LOCAL_REGION = "us-east-1"

T = TypeVar("T")


CONNECT_TIMEOUT = 1.0
"""Seconds to open a connection (DynamoDB answers a connect in milliseconds)."""
READ_TIMEOUT = 5.0
"""Seconds to wait for a reply once the request is sent."""


def client_config() -> Config:
    """Short timeouts and no botocore retries: a limiter must fail fast, not hang a task.

    Retries happen one layer up, in :func:`~.resilience.guard` (bounded in count and
    time, pauses on the flow's clock, seen by the circuit breaker); botocore retrying as
    well would multiply the attempts and hide them from the breaker.
    """
    return Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"mode": "standard", "total_max_attempts": 1},
        tcp_keepalive=True,
    )


def client_kwargs(endpoint_url: str | None, region: str | None) -> dict[str, Any]:
    """Arguments of ``session.client("dynamodb", ...)``. A local endpoint without any
    configured region gets ``us-east-1`` (local endpoints ignore it)."""
    if endpoint_url is not None and not (
        isinstance(endpoint_url, str) and endpoint_url.startswith(("http://", "https://"))
    ):
        raise ValidationError("endpoint_url", f"{endpoint_url!r}", "an http(s):// URL")
    if region is not None and (not isinstance(region, str) or not region):
        raise ValidationError("region", f"{region!r}", "an AWS region name like eu-west-1")
    if (
        region is None
        and endpoint_url is not None
        and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    ):
        region = DEFAULT_LOCAL_REGION
    kwargs: dict[str, Any] = {"config": client_config()}
    if endpoint_url is not None:
        kwargs["endpoint_url"] = endpoint_url
    if region is not None:
        kwargs["region_name"] = region
    return kwargs


def reply_from(exc: BaseException) -> Reply:
    """An error reply for a DynamoDB error; raises RateLimiterUnavailable for the rest."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return Reply(exc.response, str(error.get("Code", "Unknown")), str(error.get("Message", "")))
    if isinstance(exc, NoRegionError):
        raise ValidationError("region", "no AWS region configured", "region=... or AWS_REGION")
    if isinstance(exc, NoCredentialsError):
        raise RateLimiterUnavailable(
            "no AWS credentials found: configure them the usual boto3 way (environment, "
            "profile, instance role); a local endpoint accepts any values"
        ) from exc
    if isinstance(exc, (BotoCoreConnectionError, HTTPClientError, OSError, TimeoutError)):
        raise EndpointUnreachable(f"DynamoDB endpoint unavailable: {exc}") from exc
    if isinstance(exc, BotoCoreError):
        raise RateLimiterUnavailable(f"DynamoDB client error: {exc}") from exc
    raise exc


class LeaseView:
    """Read-only view of a granted lease, shared by :class:`Lease` and :class:`AsyncLease`."""

    def __init__(self, state: LeaseState, rollback_on_error: bool) -> None:
        self._state = state
        self.rollback_on_error = rollback_on_error

    @property
    def consumed(self) -> Mapping[str, int]:
        """Running totals consumed per limit name (acquire plus every adjust)."""
        return dict(self._state.consumed)

    @property
    def start_at(self) -> float:
        """Clock time (seconds) at which the caller may start; now unless reserved ahead."""
        return self._state.start_at

    @property
    def wait(self) -> float:
        """Seconds to wait before starting (0 for an immediate grant)."""
        return self._state.wait

    @property
    def started_at(self) -> float | None:
        """Clock time (seconds) at which the start was counted (None before)."""
        ms = self._state.started_ms
        return None if ms is None else ms / 1000

    @property
    def unchecked(self) -> bool:
        """True when granted without the store (``on_unavailable="open"`` during an outage)."""
        return self._state.unchecked

    @property
    def closed(self) -> bool:
        """True after commit or rollback."""
        return self._state.closed

    @property
    def state(self) -> LeaseState:
        """The engine's state of this lease."""
        return self._state

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} consumed={self.consumed} wait={self.wait:.3f}s"
            f"{' unchecked' if self.unchecked else ''}{' closed' if self.closed else ''}>"
        )


class LimiterBase:
    """Configuration shared by :class:`RateLimiter` and :class:`AsyncRateLimiter`.

    Args:
        table_name: the DynamoDB table.
        endpoint_url: a local endpoint (moto server, DynamoDB Local); None for AWS.
        region: AWS region; None for the boto3 chain (``us-east-1`` for a local endpoint).
        on_unavailable: ``"closed"`` raises RateLimiterUnavailable when DynamoDB cannot
            answer; ``"open"`` grants an unchecked lease and logs a warning.
        clock: seconds since the epoch (injectable for tests).
        stored_config: look up entities and stored limits (one Query per entity, cached).
        config_ttl: seconds stored limits and entity records are cached per process.
        local_refusals: refuse without a request when the last state this process saw
            already proves the refusal.
        session: a boto3 (or aioboto3) session to create the client from.
        retry_attempts: requests sent at most for one call when DynamoDB throttles,
            answers 5xx or does not answer (the first included).
        retry_budget: seconds after which no further attempt of one call starts.
        breaker_threshold: calls failed in a row (after their retries) that open the
            circuit breaker: calls then fail at once, without I/O.
        breaker_cooldown: seconds the breaker stays open before one probe call is let
            through; its success closes it. Measured on ``clock`` when one is given,
            else on ``time.monotonic``.
    """

    def __init__(
        self,
        table_name: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        on_unavailable: OnUnavailable = "closed",
        clock: Clock = time.time,
        stored_config: bool = True,
        config_ttl: float = 60.0,
        local_refusals: bool = True,
        session: Any = None,
        retry_attempts: int = 4,
        retry_budget: float = 1.0,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 5.0,
    ) -> None:
        self.engine = Engine(
            table_name,
            clock=clock,
            on_unavailable=on_unavailable,
            stored_config=stored_config,
            config_ttl=config_ttl,
            local_refusals=local_refusals,
        )
        self._client_kwargs = client_kwargs(endpoint_url, region)
        # Cool-downs and retry budgets are durations: a monotonic clock unless injected.
        self._monotonic: Clock = time.monotonic if clock is time.time else clock
        self.retry = RetryPolicy(attempts=retry_attempts, budget=retry_budget)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown, self._monotonic)
        self._session = session
        self._client: Any = None
        self._setup()

    def _setup(self) -> None:
        """Per-front-end state (locks, client lifetime)."""

    @property
    def table_name(self) -> str:
        """The DynamoDB table."""
        return self.engine.table_name

    def _guarded(self, flow: Flow[T]) -> Flow[T]:
        """``flow`` with this limiter's retries and circuit breaker around every call."""
        return guard(flow, self.breaker, self.retry, self._monotonic)
