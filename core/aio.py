"""The asyncio limiter, for asyncio producers and async code inside tasks.

It runs the very same flows as :class:`~.limiter.RateLimiter`; only sending differs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from .decorator import Decorator, Limiting, LimitSpec, current, holding
from .engine import BucketStatus, Flow, LeaseState
from .errors import ZaeError
from .limits import Limit
from .ops import Done, Op, Reply, Sleep, resume
from .transport import LeaseView, LimiterBase, Slot, reported

__all__ = ["AsyncLease", "AsyncLimited", "AsyncRateLimiter"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
log = logging.getLogger(__name__)


async def drive(
    flow: Flow[T],
    send: Callable[[Op], Awaitable[Reply]],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run a flow to its end, awaiting each operation (sleeping for a :class:`Sleep`);
    engine errors are thrown back into it."""
    reply: Reply | None = None
    error: ZaeError | None = None
    while not isinstance(step := resume(flow, reply, error), Done):
        if isinstance(step, Sleep):
            await sleep(step.seconds)
            reply, error = Reply(), None
            continue
        try:
            reply, error = await send(step), None
        except ZaeError as exc:
            reply, error = None, exc
    return step.value


class AsyncLease(LeaseView):
    """A granted request (async). ``async with`` commits on exit and refunds on error."""

    def __init__(
        self, limiter: AsyncRateLimiter, state: LeaseState, rollback_on_error: bool = True
    ) -> None:
        super().__init__(state, rollback_on_error)
        self._limiter = limiter

    async def adjust(self, **deltas: int) -> None:
        """Add or refund tokens per limit (debt allowed); one write, none if all zero."""
        await self._limiter._run(self._limiter.engine.adjust(self._state, deltas))

    async def pull_down(
        self,
        remaining: Mapping[str, int],
        *,
        at: float | None = None,
        buckets: Iterable[tuple[str, str]] | None = None,
        deltas: Mapping[str, int] | None = None,
        rates: Mapping[str, float] | None = None,
        end: bool = False,
    ) -> None:
        """Pull the buckets down to what the provider reports (see
        :meth:`~.limiter.Lease.pull_down`); one write, none when nothing changes."""
        await self._limiter._run(
            self._limiter.engine.adjust(
                self._state,
                deltas or {},
                reported(self._limiter.engine, remaining, at, buckets, rates),
                end=end,
            )
        )

    async def commit(self, **deltas: int) -> None:
        """Keep what was consumed, with ``deltas`` (as :meth:`adjust` takes them) charged
        in the same write. Nothing is written without deltas, but one write that frees
        the lease's in-flight slots when it holds some (``Limit.concurrent``): so a
        lease's last adjustment and its release are one write."""
        await self._limiter._run(self._limiter.engine.adjust(self._state, deltas, end=True))

    async def free_slots(self) -> None:
        """Free the lease's in-flight slots and keep the lease (one write; none without
        slots): its next start takes them again, e.g. before it waits somewhere else."""
        await self._limiter._run(self._limiter.engine.free_slots(self._state))

    async def renew(self) -> bool:
        """Move the expiry of the lease's in-flight slots to a full ``expires`` from now
        (one write; none without slots): a call that may run longer than its caps'
        ``expires`` renews before then. False when a slot had been taken back already
        (this holder was presumed dead): the lease holds no slot any more."""
        return await self._limiter._run(self._limiter.engine.renew(self._state))

    async def rollback(self) -> None:
        """Refund everything consumed and free the lease's in-flight slots (one write)."""
        await self._limiter._run(self._limiter.engine.release(self._state))

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and self.rollback_on_error and not self.closed:
            await self.rollback()
        else:
            await self.commit()


class _Acquiring:
    """``await limiter.acquire(...)`` or ``async with limiter.acquire(...) as lease``."""

    def __init__(self, make: Callable[[], Awaitable[AsyncLease]]) -> None:
        self._make = make
        self._lease: AsyncLease | None = None

    def __await__(self) -> Generator[Any, None, AsyncLease]:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncLease:
        self._lease = await self._make()
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._lease is not None
        await self._lease.__aexit__(exc_type, exc, tb)


class AsyncLimited(Decorator["AsyncRateLimiter"]):
    """What :meth:`AsyncRateLimiter.limit` returns: it decorates an ``async def``
    function (see :meth:`~.decorator.Limiting.limit`)."""

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        limiter, spec = self.limiter, self.spec

        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            state = await limiter._run(spec.acquire(limiter.engine, args, kwargs))
            async with AsyncLease(limiter, state, spec.rollback_on_error) as lease:
                with holding(limiter, lease):
                    await limiter._run(spec.start(limiter.engine, state))
                    return await fn(*args, **kwargs)

        return spec.wrap(fn, call, coroutine=True)


class AsyncRateLimiter(Limiting[AsyncLimited], LimiterBase):
    """Global token buckets in a DynamoDB table, or any store (asyncio; DynamoDB through
    aiobotocore, the ``zae-celery[async]`` extra).

    Same arguments and decisions as :class:`~zae_celery.core.RateLimiter`, and the same
    decorator (``limit``) for ``async def`` functions. Close it with
    ``await limiter.aclose()`` or use ``async with AsyncRateLimiter(...) as limiter``.
    """

    async def aclose(self) -> None:
        """Write the refunds held by ``settle_delay``, then close the store's connections."""
        try:
            await self.flush()
        finally:
            await self.store.aclose()

    async def flush(self) -> int:
        """Write every refund held by ``settle_delay`` now (one write per bucket item);
        returns the number of items written (see :meth:`RateLimiter.flush`)."""
        return await self._run(self.engine.flush())

    def _on_hold(self, due_ms: int) -> None:
        # One task per limiter writes the refunds that fall due, on the running loop;
        # it sleeps on the wall clock: with an injected clock, flush() is the caller's.
        if self.engine.clock is not time.time:
            return
        task = getattr(self, "_flusher", None)
        if task is None or task.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_due())

    async def _flush_due(self) -> None:
        """Sleep until the earliest held refund is due, write the due ones; until none
        is held. A failed flush keeps them and tries again in 1 s."""
        while (wait := self.engine.flush_wait()) is not None:
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                continue
            try:
                await self._run(self.engine.flush(due_only=True))
            except Exception as exc:
                log.warning("held refunds not written, trying again in 1 s: %s", exc)
                await asyncio.sleep(1.0)

    async def __aenter__(self) -> AsyncRateLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        return await drive(self._guarded(flow), self.store.asend, self.sleep)

    def _decorator(self, spec: LimitSpec) -> AsyncLimited:
        return AsyncLimited(self, spec)

    def current_lease(self) -> AsyncLease:
        """The lease of the innermost call decorated by this limiter's ``limit`` running
        in this asyncio task (see :meth:`RateLimiter.current_lease`)."""
        return current(self, AsyncLease)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` the limiter's way (``asyncio.sleep`` unless ``sleep`` was
        injected as a coroutine function, e.g. a test clock's)."""
        await (self._sleep or asyncio.sleep)(seconds)

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
    ) -> _Acquiring:
        """Like :meth:`RateLimiter.acquire` (same arguments, ``slot`` included);
        ``await`` it or use ``async with``."""

        async def make() -> AsyncLease:
            state = await self._run(
                self.engine.acquire(entity_id, resource, consume or {}, limits, horizon, slot)
            )
            return AsyncLease(self, state, rollback_on_error)

        return _Acquiring(make)

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
    ) -> _Acquiring:
        """Like :meth:`RateLimiter.reserve`."""
        return self.acquire(
            entity_id,
            resource,
            consume,
            limits,
            horizon=horizon,
            rollback_on_error=rollback_on_error,
            slot=slot,
        )

    async def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit] = ()
    ) -> dict[str, float]:
        """Tokens available now per limit (negative while in debt). One read."""
        return await self._run(self.engine.available(entity_id, resource, limits))

    async def buckets(
        self, entity_id: str, resource: str | None = None, limits: Sequence[Limit] = ()
    ) -> list[BucketStatus]:
        """Every limit's state in the buckets of ``entity_id`` (or one resource): stored
        limits over ``limits``; see :class:`~zae_celery.core.BucketStatus`."""
        return await self._run(self.engine.buckets(entity_id, resource, limits))

    async def warm_up(self) -> None:
        """Create the client and check the table's schema (one GetItem, once), so that
        the first real request is not slowed by them."""
        await self._run(self.engine.ensure_schema())

    async def start(self, lease: AsyncLease, horizon: float = 0.0) -> float:
        """Count a reserved lease's actual start; returns the seconds to wait first (up to
        ``horizon``), RateLimitExceeded beyond it."""
        return await self._run(self.engine.start(lease._state, horizon))

    async def block(
        self, entity_id: str, resource: str, limits: Sequence[Limit], seconds: float
    ) -> None:
        """Empty the buckets for ``seconds`` (a provider answered 429 with Retry-After)."""
        await self._run(self.engine.block(entity_id, resource, limits, seconds))

    def resume(self, ticket: Mapping[str, Any], rollback_on_error: bool = True) -> AsyncLease:
        """The lease a ticket holds (``lease.ticket()``, e.g. carried by a deferred
        message); ValidationError when the ticket is malformed or of another version."""
        return AsyncLease(self, LeaseState.from_dict(ticket), rollback_on_error)

    async def create_entity(
        self, entity_id: str, parent_id: str | None = None, cascade: bool = False
    ) -> None:
        """Create an entity, optionally under a parent whose buckets it also consumes."""
        await self._run(self.engine.create_entity(entity_id, parent_id, cascade))

    async def set_limits(
        self, entity_id: str, limits: Sequence[Limit], resource: str | None = None
    ) -> None:
        """Store limits for an entity; they override same-named limits passed in code."""
        await self._run(self.engine.set_limits(entity_id, limits, resource))

    async def get_limits(self, entity_id: str, resource: str | None = None) -> list[Limit]:
        """The stored limits of an entity and resource ([] if none)."""
        return await self._run(self.engine.get_limits(entity_id, resource))

    async def stored_limits(self, entity_id: str) -> dict[str | None, list[Limit]]:
        """Every limit stored for an entity, by resource (``None``: every resource, first);
        ``{}`` when none. One read."""
        return await self._run(self.engine.stored_limits(entity_id))

    async def delete_limits(self, entity_id: str, resource: str | None = None) -> None:
        """Delete stored limits of an entity and resource."""
        await self._run(self.engine.delete_limits(entity_id, resource))

    async def schema_version(self) -> int | None:
        """The schema version stamped on the table (None: none yet; the first request
        stamps it). One read; unlike :meth:`warm_up` it stamps and checks nothing."""
        return await self._run(self.engine.schema_version())

    async def create_table(self) -> bool:
        """Create the table directly (local endpoints); False if it already existed."""
        return await self._run(self.engine.create_table())

    async def delete_table(self) -> None:
        """Delete the table (local endpoints, tests)."""
        await self._run(self.engine.delete_table())
