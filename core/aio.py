"""The asyncio limiter (aioboto3), for asyncio producers and async code inside tasks.

It runs the very same flows as :class:`~.limiter.RateLimiter`; only sending differs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .engine import Flow, LeaseState
from .errors import ZaeError
from .limits import Limit
from .requests import Call, Done, Reply, resume
from .transport import LeaseView, LimiterBase, reply_from

__all__ = ["AsyncLease", "AsyncRateLimiter"]

T = TypeVar("T")


async def drive(flow: Flow[T], send: Callable[[Call], Awaitable[Reply]]) -> T:
    """Run a flow to its end, awaiting each call; engine errors are thrown back into it."""
    reply: Reply | None = None
    error: ZaeError | None = None
    while not isinstance(step := resume(flow, reply, error), Done):
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

    async def commit(self) -> None:
        """Keep what was consumed. Nothing is written."""
        self._state.closed = True

    async def rollback(self) -> None:
        """Refund everything consumed (one write)."""
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


class AsyncRateLimiter(LimiterBase):
    """Global token buckets in a DynamoDB table (asyncio, aioboto3).

    Same arguments and decisions as :class:`~zae_celery.core.RateLimiter`. Close it with
    ``await limiter.aclose()`` or use ``async with AsyncRateLimiter(...) as limiter``.
    """

    def _setup(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        """The aiobotocore DynamoDB client (created on first use)."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    import aioboto3

                    session = self._session or aioboto3.Session()
                    try:
                        self._client = await self._stack.enter_async_context(
                            session.client("dynamodb", **self._client_kwargs)
                        )
                    except Exception as exc:
                        reply_from(exc)
                        raise
        return self._client

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._stack.aclose()
        self._client = None

    async def __aenter__(self) -> AsyncRateLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> Reply:
        if call.op == "sleep":
            await asyncio.sleep(call.kwargs["seconds"])
            return Reply({})
        client = await self.client()
        try:
            return Reply(await getattr(client, call.op)(**call.kwargs))
        except ZaeError:
            raise
        except Exception as exc:
            return reply_from(exc)

    async def _run(self, flow: Flow[T]) -> T:
        return await drive(self._guarded(flow), self._send)

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
        extra: Sequence[tuple[str, str, Sequence[Limit]]] = (),
        pace: bool = False,
        start_within: float = 0.0,
    ) -> _Acquiring:
        """Like :meth:`RateLimiter.acquire` (same arguments, including ``extra``,
        ``pace`` and ``start_within``); ``await`` it or use ``async with``."""

        async def make() -> AsyncLease:
            state = await self._run(
                self.engine.acquire(
                    entity_id, resource, consume or {}, limits, horizon, extra, pace, start_within
                )
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
        extra: Sequence[tuple[str, str, Sequence[Limit]]] = (),
        pace: bool = False,
        start_within: float = 0.0,
    ) -> _Acquiring:
        """Like :meth:`RateLimiter.reserve`."""
        return self.acquire(
            entity_id,
            resource,
            consume,
            limits,
            horizon=horizon,
            rollback_on_error=rollback_on_error,
            extra=extra,
            pace=pace,
            start_within=start_within,
        )

    async def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit] = ()
    ) -> dict[str, float]:
        """Tokens available now per limit (negative while in debt). One read."""
        return await self._run(self.engine.available(entity_id, resource, limits))

    async def warm_up(self) -> None:
        """Create the client and check the table's schema (one GetItem, once), so that
        the first real request is not slowed by them."""
        await self._run(self.engine.ensure_schema())

    async def start(self, lease: AsyncLease, horizon: float = 0.0) -> float:
        """Count a reserved lease's actual start; returns the seconds to wait first (up to
        ``horizon``), RateLimitExceeded beyond it."""
        return await self._run(self.engine.start(lease.state, horizon))

    async def block(
        self, entity_id: str, resource: str, limits: Sequence[Limit], seconds: float
    ) -> None:
        """Empty the buckets for ``seconds`` (a provider answered 429 with Retry-After)."""
        await self._run(self.engine.block(entity_id, resource, limits, seconds))

    def restore(self, data: Mapping[str, Any], rollback_on_error: bool = True) -> AsyncLease:
        """A lease from :meth:`LeaseState.to_dict` (e.g. carried by a deferred message)."""
        return AsyncLease(self, LeaseState.from_dict(data), rollback_on_error)

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

    async def delete_limits(self, entity_id: str, resource: str | None = None) -> None:
        """Delete stored limits of an entity and resource."""
        await self._run(self.engine.delete_limits(entity_id, resource))

    async def create_table(self) -> bool:
        """Create the table directly (local endpoints); False if it already existed."""
        return await self._run(self.engine.create_table())

    async def delete_table(self) -> None:
        """Delete the table (local endpoints, tests)."""
        await self._run(self.engine.delete_table())
