"""Test helpers shared by the engine tests: an injected clock and a request counter."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import states
from celery.app.trace import ExceptionInfo, build_tracer

from zae_celery.core import AsyncRateLimiter, RateLimiter
from zae_celery.core.ops import Op, Reply, WriteBuckets
from zae_celery.core.stores.dynamodb import Codec
from zae_celery.testing import T0, ManualClock

Clock = ManualClock
"""A settable clock counting whole milliseconds (no float drift across advances)."""
__all__ = ["T0", "Clock", "Counter", "Front", "WorkerRun", "run_as_worker", "table_contents"]

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
        return self.wait(getattr(self.limiter, method)(*args, **kwargs))

    def wait(self, result: Any) -> Any:
        """``result``, or what it resolves to on the async front (a lease's coroutine)."""
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


@dataclass(frozen=True)
class WorkerRun:
    """How a run traced as a worker runs it ended: ``state`` and ``result`` (the return
    value, or the exception), like an EagerResult's."""

    state: str
    result: Any


def run_as_worker(
    task: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    routing_key: str = "celery",
) -> WorkerRun:
    """Run ``task`` in this process through Celery's tracer as a worker's pool does
    (before_start, the body, after_return, the signals: not eager, so a deferral
    republishes), and return how it ended."""
    task_id = uuid.uuid4().hex
    request = {
        "id": task_id,
        "task": task.name,
        "root_id": task_id,
        "is_eager": False,
        "headers": headers or {},
        "delivery_info": {"exchange": "", "routing_key": routing_key, "priority": None},
        "hostname": "test-worker",
        "retries": 0,
    }
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task.app)
    ret = tracer(task_id, list(args), kwargs or {}, request)
    retval = ret.retval
    if isinstance(retval, ExceptionInfo):
        retval = retval.exception
    return WorkerRun(states.SUCCESS if ret.info is None else ret.info.state, retval)


V = TypeVar("V")


def eventually(read: Callable[[], V], expected: V, timeout: float = 10.0) -> V:
    """``read()`` until it returns ``expected``, for at most ``timeout`` seconds; the last
    value read. For bucket levels that real workers' refunds reach a moment after the
    tasks' results (a worker holds them for up to ``zae_settle_delay``, 1 s)."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)  # polling an outcome, with a deadline: not a synchronisation
    return value


def keys_only_table(client: Any, table: str, **extra: Any) -> None:
    """A table of the engine's key schema made by hand, not by zae-celery: no index, no
    TTL, no schema stamp (a table of the layout before the parents index); ``extra``:
    its BillingMode or ProvisionedThroughput, Tags..."""
    client.create_table(
        TableName=table,
        KeySchema=[
            {"AttributeName": "PK", "KeyType": "HASH"},
            {"AttributeName": "SK", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "PK", "AttributeType": "S"},
            {"AttributeName": "SK", "AttributeType": "S"},
        ],
        **extra,
    )
