"""The synchronous limiter: the hot path of Celery's prefork workers."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from .decorator import Decorator, Limiting, LimitSpec, current, holding
from .engine import BucketStatus, Flow, LeaseState
from .errors import ZaeError
from .limits import Limit
from .ops import Done, Op, Reply, Sleep, resume
from .transport import LeaseView, LimiterBase, Slot, reported

__all__ = ["Lease", "Limited", "RateLimiter"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
log = logging.getLogger(__name__)
_HOLDING: weakref.WeakSet[RateLimiter] = weakref.WeakSet()
"""Limiters of this process that have held refunds: flushed at interpreter exit."""


@atexit.register
def _flush_at_exit() -> None:
    for limiter in list(_HOLDING):
        try:
            limiter.flush()
        except Exception as exc:  # the refunds are lost: under-use, never early grants
            log.warning("held refunds not written at exit: %s", exc)


def drive(
    flow: Flow[T], send: Callable[[Op], Reply], sleep: Callable[[float], None] = time.sleep
) -> T:
    """Run a flow to its end, sending each operation (sleeping for a :class:`Sleep`);
    engine errors are thrown back into it."""
    reply: Reply | None = None
    error: ZaeError | None = None
    while not isinstance(step := resume(flow, reply, error), Done):
        if isinstance(step, Sleep):
            sleep(step.seconds)
            reply, error = Reply(), None
            continue
        try:
            reply, error = send(step), None
        except ZaeError as exc:
            reply, error = None, exc
    return step.value


class Lease(LeaseView):
    """A granted request. Use it as a context manager: leaving the block commits;
    an exception inside it refunds the consumption (unless ``rollback_on_error=False``)."""

    def __init__(
        self, limiter: RateLimiter, state: LeaseState, rollback_on_error: bool = True
    ) -> None:
        super().__init__(state, rollback_on_error)
        self._limiter = limiter

    def adjust(self, **deltas: int) -> None:
        """Add (positive) or refund (negative) tokens per limit; may go into debt.

        One write per call that changes something; none when every delta is zero.
        """
        self._limiter._run(self._limiter.engine.adjust(self._state, deltas))

    def pull_down(
        self,
        remaining: Mapping[str, int],
        *,
        at: float | None = None,
        buckets: Iterable[tuple[str, str]] | None = None,
        deltas: Mapping[str, int] | None = None,
        rates: Mapping[str, float] | None = None,
        end: bool = False,
    ) -> None:
        """Pull the buckets down to what the provider reports left (``remaining`` tokens
        per limit name at ``at``, the limiter's clock; default now), never up, with
        ``deltas`` as :meth:`adjust` takes them, in one write (none when every bucket
        already holds no more than that and nothing changes).

        ``buckets``: the ``(entity_id, resource)`` pairs that stand for the provider's
        key (default: all the lease's buckets). ``rates``: per limit name, how fast the
        provider refills (tokens a second), where known: where the lease's buckets refill
        faster, the run is charged more in proportion (with ``deltas``), so the fleet
        goes at the provider's pace (see docs/engine.md). ``end``: the lease also ends
        (committed) in that write, its in-flight slots freed.
        """
        self._limiter._run(
            self._limiter.engine.adjust(
                self._state,
                deltas or {},
                reported(self._limiter.engine, remaining, at, buckets, rates),
                end=end,
            )
        )

    def commit(self, **deltas: int) -> None:
        """Keep what was consumed, with ``deltas`` (as :meth:`adjust` takes them) charged
        in the same write. Nothing is written without deltas, but one write that frees
        the lease's in-flight slots when it holds some (``Limit.concurrent``): so a
        lease's last adjustment and its release are one write."""
        self._limiter._run(self._limiter.engine.adjust(self._state, deltas, end=True))

    def free_slots(self) -> None:
        """Free the lease's in-flight slots and keep the lease (one write; none without
        slots): its next start takes them again, e.g. before it waits somewhere else."""
        self._limiter._run(self._limiter.engine.free_slots(self._state))

    def renew(self) -> bool:
        """Move the expiry of the lease's in-flight slots to a full ``expires`` from now
        (one write; none without slots): a call that may run longer than its caps'
        ``expires`` renews before then. False when a slot had been taken back already
        (this holder was presumed dead): the lease holds no slot any more."""
        return self._limiter._run(self._limiter.engine.renew(self._state))

    def rollback(self) -> None:
        """Refund everything consumed and free the lease's in-flight slots (one write)."""
        self._limiter._run(self._limiter.engine.release(self._state))

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self.rollback_on_error and not self.closed:
            self.rollback()
        else:
            self.commit()


class Limited(Decorator["RateLimiter"]):
    """What :meth:`RateLimiter.limit` returns: it decorates a plain function (see
    :meth:`~.decorator.Limiting.limit`)."""

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        limiter, spec = self.limiter, self.spec

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            state = limiter._run(spec.acquire(limiter.engine, args, kwargs))
            with Lease(limiter, state, spec.rollback_on_error) as lease, holding(limiter, lease):
                limiter._run(spec.start(limiter.engine, state))
                return fn(*args, **kwargs)

        return spec.wrap(fn, call, coroutine=False)


def _flush_loop(ref: weakref.ref[RateLimiter], wake: threading.Event) -> None:
    """The flusher: sleep until the earliest held refund is due, write the due ones;
    ends when its limiter is gone. A failed flush keeps them and tries again in 1 s."""
    while (limiter := ref()) is not None:
        wait = limiter.engine.flush_wait()
        if wait is not None and wait <= 0:
            try:
                limiter._run(limiter.engine.flush(due_only=True))
                continue
            except Exception as exc:
                log.warning("held refunds not written, trying again in 1 s: %s", exc)
                wait = 1.0
        del limiter  # no strong reference while asleep
        wake.wait(1.0 if wait is None else min(wait, 1.0))
        wake.clear()


class RateLimiter(Limiting[Limited], LimiterBase):
    """Global token buckets in a DynamoDB table, or any store (sync).

    >>> limiter = RateLimiter("rate_limits", endpoint_url="http://127.0.0.1:8000")  # doctest: +SKIP
    >>> with limiter.acquire("tenant-1", "gpt-4o", consume={"rpm": 1, "tpm": 500},
    ...                      limits=[Limit.per_minute("rpm", 500),
    ...                              Limit.per_minute("tpm", 90_000)]) as lease:
    ...     reply = call_llm()
    ...     lease.adjust(tpm=reply.usage.total_tokens - 500)

    The same as a decorator: ``@limiter.limit("tenant-1", "gpt-4o", ...)`` over a function
    (:meth:`limit`; the lease inside it is :meth:`current_lease`).

    A DynamoDB store's boto3 client is created lazily, once per process (safe across
    ``fork``). ``RateLimiter.from_url("memory://")`` keeps the buckets in memory.
    """

    def _run(self, flow: Flow[T]) -> T:
        return drive(self._guarded(flow), self.store.send, self.sleep)

    def flush(self) -> int:
        """Write every refund held by ``settle_delay`` now (one write per bucket item);
        returns the number of items written. Call it before a process ends on its own
        terms (interpreter exit does it too)."""
        return self._run(self.engine.flush())

    def _on_hold(self, due_ms: int) -> None:
        # One daemon thread per limiter and process writes the refunds that fall due;
        # it sleeps on the wall clock: with an injected clock, flush() is the caller's.
        if self.engine.clock is not time.time:
            return
        flusher = getattr(self, "_flusher", None)
        if flusher is None or flusher[0] != os.getpid() or not flusher[1].is_alive():
            wake = threading.Event()
            thread = threading.Thread(
                target=_flush_loop, args=(weakref.ref(self), wake), daemon=True,
                name="zae-settle-flusher",
            )  # fmt: skip
            self._flusher = (os.getpid(), thread, wake)
            _HOLDING.add(self)
            thread.start()
        self._flusher[2].set()

    def _decorator(self, spec: LimitSpec) -> Limited:
        return Limited(self, spec)

    def current_lease(self) -> Lease:
        """The lease of the innermost call decorated by this limiter's :meth:`limit`
        running here (this thread), to report usage from inside it; LookupError outside
        any."""
        return current(self, Lease)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` the limiter's way (``time.sleep`` unless ``sleep`` was
        injected, e.g. a test clock's, which moves the clock instead)."""
        (self._sleep or time.sleep)(seconds)

    # -- requests -------------------------------------------------------------------------
    def acquire(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int] | None = None,
        limits: Sequence[Limit] = (),
        *,
        horizon: float = 0.0,
        rollback_on_error: bool = True,
        slot: Slot | None = None,
    ) -> Lease:
        """Consume ``consume`` tokens from every limit now, or raise RateLimitExceeded.

        With ``horizon`` > 0 a request short of tokens is granted at a future slot up to
        ``horizon`` seconds ahead (see :meth:`reserve`). ``slot``: a scheduler's options
        (further buckets in the same write, counting the start; see :class:`Slot`).
        """
        state = self._run(
            self.engine.acquire(entity_id, resource, consume or {}, limits, horizon, slot)
        )
        return Lease(self, state, rollback_on_error)

    def reserve(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int] | None = None,
        limits: Sequence[Limit] = (),
        *,
        horizon: float = 60.0,
        rollback_on_error: bool = True,
        slot: Slot | None = None,
    ) -> Lease:
        """Take a place in line: consume now (into debt if need be) and return a lease whose
        ``start_at``/``wait`` says when the caller may start. Beyond ``horizon`` seconds:
        RateLimitExceeded, with nothing consumed."""
        return self.acquire(
            entity_id,
            resource,
            consume,
            limits,
            horizon=horizon,
            rollback_on_error=rollback_on_error,
            slot=slot,
        )

    def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit] = ()
    ) -> dict[str, float]:
        """Tokens available now per limit (negative while in debt). One read."""
        return self._run(self.engine.available(entity_id, resource, limits))

    def buckets(
        self, entity_id: str, resource: str | None = None, limits: Sequence[Limit] = ()
    ) -> list[BucketStatus]:
        """Every limit's state in the buckets of ``entity_id`` (or one resource): stored
        limits over ``limits``; see :class:`~zae_celery.core.BucketStatus`."""
        return self._run(self.engine.buckets(entity_id, resource, limits))

    def warm_up(self) -> None:
        """Create the client and check the table's schema (one GetItem, once), so that
        the first real request is not slowed by them (e.g. in a worker at start-up)."""
        self._run(self.engine.ensure_schema())

    def start(self, lease: Lease, horizon: float = 0.0) -> float:
        """Count a reserved lease's actual start; returns the seconds to wait first (up to
        ``horizon``), RateLimitExceeded beyond it."""
        return self._run(self.engine.start(lease._state, horizon))

    def block(self, entity_id: str, resource: str, limits: Sequence[Limit], seconds: float) -> None:
        """Empty the buckets for ``seconds`` (a provider answered 429 with Retry-After)."""
        self._run(self.engine.block(entity_id, resource, limits, seconds))

    def resume(self, ticket: Mapping[str, Any], rollback_on_error: bool = True) -> Lease:
        """The lease a ticket holds (``lease.ticket()``, e.g. carried by a deferred
        message); ValidationError when the ticket is malformed or of another version."""
        return Lease(self, LeaseState.from_dict(ticket), rollback_on_error)

    # -- entities and stored limits ---------------------------------------------------------
    def create_entity(
        self, entity_id: str, parent_id: str | None = None, cascade: bool = False
    ) -> None:
        """Create an entity, optionally under a parent whose buckets it also consumes."""
        self._run(self.engine.create_entity(entity_id, parent_id, cascade))

    def set_limits(
        self, entity_id: str, limits: Sequence[Limit], resource: str | None = None
    ) -> None:
        """Store limits for an entity; they override same-named limits passed in code."""
        self._run(self.engine.set_limits(entity_id, limits, resource))

    def get_limits(self, entity_id: str, resource: str | None = None) -> list[Limit]:
        """The stored limits of an entity and resource ([] if none)."""
        return self._run(self.engine.get_limits(entity_id, resource))

    def stored_limits(self, entity_id: str) -> dict[str | None, list[Limit]]:
        """Every limit stored for an entity, by resource (``None``: every resource, first);
        ``{}`` when none. One read."""
        return self._run(self.engine.stored_limits(entity_id))

    def delete_limits(self, entity_id: str, resource: str | None = None) -> None:
        """Delete stored limits of an entity and resource."""
        self._run(self.engine.delete_limits(entity_id, resource))

    # -- table ----------------------------------------------------------------------------
    def schema_version(self) -> int | None:
        """The schema version stamped on the table (None: none yet; the first request
        stamps it). One read; unlike :meth:`warm_up` it stamps and checks nothing."""
        return self._run(self.engine.schema_version())

    def create_table(self) -> bool:
        """Create the table directly (local endpoints); False if it already existed."""
        return self._run(self.engine.create_table())

    def delete_table(self) -> None:
        """Delete the table (local endpoints, tests)."""
        self._run(self.engine.delete_table())
