"""Test helpers shared by the engine tests: an injected clock and a request counter."""

from __future__ import annotations

import asyncio
from typing import Any

from zae_celery.core import AsyncRateLimiter, RateLimiter
from zae_celery.core.ops import Op, Reply, WriteBuckets
from zae_celery.core.stores.dynamodb import Codec

T0 = 1_800_000_000.0


class Clock:
    """A settable clock counting whole milliseconds (no float drift across advances)."""

    def __init__(self, t: float = T0) -> None:
        self.ms = round(t * 1000)

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000  # mid-millisecond: the engine floors to self.ms

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


_NAMES = Codec("counted-table")


class Counter:
    """Counts the requests a limiter sends, named as DynamoDB would name them
    (``UpdateItem``, ``TransactWriteItems``, ``GetItem``, ``Query``...) whatever its store:
    a decision costs the same round trips on every store."""

    def __init__(self, limiter: Any) -> None:
        self.ops: list[str] = []
        limiter.store = _Counting(limiter.store, self.ops)

    def take(self) -> list[str]:
        ops, self.ops[:] = list(self.ops), []
        return ops


class _Counting:
    """A store that records each operation's request name, then hands it on."""

    def __init__(self, store: Any, ops: list[str]) -> None:
        self._store = store
        self._ops = ops
        self.name = store.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _seen(self, op: Op) -> None:
        if isinstance(op, WriteBuckets):  # named by its form (its steps may be Redis-only)
            self._ops.append("UpdateItem" if op.single else "TransactWriteItems")
            return
        request = _NAMES.encode(op)[0]
        self._ops.append("".join(part.capitalize() for part in request.split("_")))

    def send(self, op: Op) -> Reply:
        self._seen(op)
        reply: Reply = self._store.send(op)
        return reply

    async def asend(self, op: Op) -> Reply:
        self._seen(op)
        reply: Reply = await self._store.asend(op)
        return reply

    async def aclose(self) -> None:
        await self._store.aclose()


def table_contents(store: Any) -> list[Any]:
    """Everything a store holds, in a stable order (to show that nothing changed)."""
    store = getattr(store, "_store", store)  # under a Counter
    if hasattr(store, "dump"):
        return sorted((kind, repr(value)) for kind, value in store.dump().items())
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": store.table_name, "ConsistentRead": True}
    while True:
        page = store.client.scan(**kwargs)
        items.extend(page.get("Items", []))
        if "LastEvaluatedKey" not in page:
            break
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return sorted(items, key=lambda item: (item["PK"]["S"], item["SK"]["S"]))


class Front:
    """The sync or the async limiter behind one call interface (one event loop)."""

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        cls = AsyncRateLimiter if kind == "async" else RateLimiter
        self.limiter: RateLimiter | AsyncRateLimiter = cls(*args, **kwargs)

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.limiter, method)(*args, **kwargs)
        if self.loop is None:
            return result

        async def wait() -> Any:
            return await result

        return self.loop.run_until_complete(wait())

    def close(self) -> None:
        if self.loop is not None:
            assert isinstance(self.limiter, AsyncRateLimiter)
            self.loop.run_until_complete(self.limiter.aclose())
            self.loop.close()
