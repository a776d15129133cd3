"""What a limiter does when its store (DynamoDB, Redis) cannot answer: bounded retries
and a circuit breaker.

Both live around the engine's flows, not inside them: :func:`guard` wraps any flow and
is run by the sync and the async limiter alike, so there is one implementation of every
decision below.

- **Retries** (:class:`RetryPolicy`): a throttled request (``ThrottlingException``,
  ``ProvisionedThroughputExceededException``, ``RequestLimitExceeded``), a 5xx reply and
  a request that got no reply at all (connection refused or reset, timeout) are sent
  again after an exponential pause with full jitter, within a count *and* a time budget.
  The pauses are ``sleep`` calls of the flow, so tests run them on an injected clock.
  botocore's own retries are switched off (see ``transport.client_config``): one layer
  of retries, whose every attempt the breaker sees.
- **Circuit breaker** (:class:`CircuitBreaker`): after ``threshold`` requests in a row
  failed that way, every request is refused at once with :class:`CircuitOpen`, without
  any I/O, for ``cooldown`` seconds; then one probe request goes through, and its
  success closes the breaker again. One breaker per limiter, hence per process.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

from .engine import Clock
from .errors import (
    CircuitOpen,
    EndpointUnreachable,
    RateLimiterUnavailable,
    ValidationError,
    ZaeError,
)
from .ops import Done, Flow, Op, Reply, Sleep, resume

__all__ = ["CircuitBreaker", "RetryPolicy", "guard"]

log = logging.getLogger("zae_celery.core")

T = TypeVar("T")


def _positive(field: str, value: object, *, integer: bool = False) -> None:
    number_type = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, number_type)
        or not math.isfinite(value)
        or value <= 0
    ):
        kind = "an integer >= 1" if integer else "a number of seconds > 0"
        raise ValidationError(field, f"{value!r}", kind)


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and for how long, one request is tried again before it counts as failed.

    Args:
        attempts: requests sent at most, the first included.
        budget: seconds from the first attempt after which no further attempt starts.
        base: the first pause's upper bound; each further pause doubles it.
        cap: no pause is longer than this.

    The pause before retry ``n`` (1, 2, ...) is uniform in ``[0, min(cap, base·2^(n-1))]``
    and never runs past the budget. A request therefore takes at most ``budget`` plus
    one attempt (connect timeout + read timeout) before it is given up.
    """

    attempts: int = 4
    budget: float = 1.0
    base: float = 0.1
    cap: float = 1.0

    def __post_init__(self) -> None:
        _positive("retry_attempts", self.attempts, integer=True)
        _positive("retry_budget", self.budget)
        _positive("retry_base", self.base)
        _positive("retry_cap", self.cap)

    def pause(
        self, failed: int, elapsed: float, rng: Callable[[float, float], float] = random.uniform
    ) -> float | None:
        """Seconds to wait before the next attempt after ``failed`` failed attempts that
        took ``elapsed`` seconds in all; None when the count or the time budget is spent."""
        if failed >= self.attempts or elapsed >= self.budget:
            return None
        return min(rng(0.0, min(self.cap, self.base * 2 ** (failed - 1))), self.budget - elapsed)


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → after ``cooldown`` seconds
    one probe (half-open) → closed on its success, open again on its failure.

    Pure and thread-safe; time comes from ``clock`` (monotonic seconds, injectable). A
    probe that never reports (its caller vanished) is replaced after another cool-down.
    """

    def __init__(
        self, threshold: int = 5, cooldown: float = 5.0, clock: Clock = time.monotonic
    ) -> None:
        _positive("breaker_threshold", threshold, integer=True)
        _positive("breaker_cooldown", cooldown)
        self.threshold = threshold
        self.cooldown = float(cooldown)
        self.clock = clock
        self.failures = 0
        """Consecutive failures seen (reset by a success)."""
        self.opened = 0
        """How many times the breaker opened (for logs and tests)."""
        self.refused = 0
        """Requests refused without I/O while open."""
        self._opened_at: float | None = None
        self._probe_at: float | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``closed``, ``open`` (refusing) or ``half-open`` (a probe may go, or is out)."""
        with self._lock:
            return self._state(self.clock())

    def _state(self, now: float) -> str:
        if self._opened_at is None:
            return "closed"
        return "open" if now - self._opened_at < self.cooldown else "half-open"

    def allow(self) -> bool:
        """May a request be sent now? False while open, and in half-open while the one
        probe is out (unless it has been out for a whole cool-down)."""
        with self._lock:
            now = self.clock()
            state = self._state(now)
            if state == "closed":
                return True
            if state == "half-open" and (
                self._probe_at is None or now - self._probe_at >= self.cooldown
            ):
                self._probe_at = now
                return True
            self.refused += 1
            return False

    def retry_after(self) -> float:
        """Seconds until the next probe may go (0 when closed)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self._opened_at + self.cooldown - self.clock())

    def success(self) -> None:
        """The endpoint answered (any reply but throttling or 5xx)."""
        with self._lock:
            was_open = self._opened_at is not None
            self.failures = 0
            self._opened_at = self._probe_at = None
        if was_open:
            log.warning("zae-celery circuit breaker closed: the store answers again")

    def failure(self, reason: str) -> None:
        """A request failed for good (no reply, throttled or 5xx beyond the retries)."""
        with self._lock:
            now = self.clock()
            self.failures += 1
            probing = self._opened_at is not None
            if not probing and self.failures < self.threshold:
                return
            self._opened_at, self._probe_at = now, None
            if not probing:
                self.opened += 1
        if not probing:
            log.warning(
                "zae-celery circuit breaker open after %d failed requests in a row (%s): "
                "requests fail fast without I/O for %.1f s, then one probe",
                self.failures,
                reason,
                self.cooldown,
            )

    def release(self) -> None:
        """The probe ended without reaching the endpoint (e.g. no credentials)."""
        with self._lock:
            self._probe_at = None

    def refusal(self) -> CircuitOpen:
        """The error a refused request raises."""
        wait = self.retry_after()
        return CircuitOpen(
            f"circuit breaker open after {self.failures} failed store requests in a row; "
            f"next probe in {wait:.1f} s",
            retry_after=wait,
        )


def _attempts(
    call: Op, breaker: CircuitBreaker, policy: RetryPolicy, clock: Clock
) -> Generator[Op, Reply, Reply]:
    """Send ``call`` until it gets a reply worth returning, within the policy; raises
    RateLimiterUnavailable (CircuitOpen without any attempt while the breaker is open)."""
    if not breaker.allow():
        raise breaker.refusal()
    started = clock()
    failed = 0
    while True:
        try:
            reply = yield call
        except EndpointUnreachable as exc:
            problem: str = str(exc)
            last: ZaeError = exc
        except ZaeError:
            breaker.release()  # never reached the endpoint: says nothing about it
            raise
        else:
            if not reply.transient:  # throttling or a server error: retried
                breaker.success()
                return reply
            problem = reply.message or str(reply.code)
            last = RateLimiterUnavailable(problem)
        failed += 1
        pause = policy.pause(failed, clock() - started)
        if pause is None:
            breaker.failure(problem)
            raise RateLimiterUnavailable(
                f"store unavailable after {failed} attempt(s) in "
                f"{clock() - started:.2f} s: {problem}"
            ) from last
        yield Sleep(pause)


def guard(flow: Flow[T], breaker: CircuitBreaker, policy: RetryPolicy, clock: Clock) -> Flow[T]:
    """``flow`` with every store call retried within ``policy`` and gated by ``breaker``.

    A call that fails for good is thrown into ``flow`` as RateLimiterUnavailable, exactly
    where a failing request used to surface, so the flows' own handling (``open`` mode,
    the Celery task's deferral) is unchanged. The flow's own ``sleep`` calls pass through.
    """
    reply: Reply | None = None
    error: ZaeError | None = None
    while not isinstance(call := resume(flow, reply, error), Done):
        reply, error = None, None
        try:
            if isinstance(call, Sleep):
                reply = yield call
            else:
                reply = yield from _attempts(call, breaker, policy, clock)
        except ZaeError as exc:
            error = exc
    return call.value
