"""The decorator form of the limiters: ``@limiter.limit(...)`` over a function.

Everything the decorator decides lives here, once, for :class:`~.limiter.RateLimiter`
and :class:`~.aio.AsyncRateLimiter` alike: the options and their checks, the request a
call makes (its keys and tokens, from its own arguments), the flows that take the lease
and wait for its slot, which kind of function each limiter decorates, and where a
running call finds its lease. A front end only calls or awaits (``Limited`` and
``AsyncLimited``, next to their limiters).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from .engine import Engine, LeaseState
from .errors import ValidationError
from .lease import Slot
from .limits import Limit
from .ops import Flow, Sleep
from .transport import LeaseView
from .validation import check_amounts, check_horizon, check_id, check_limits

__all__ = ["Decorator", "Keyed", "LimitSpec", "Limiting", "check_kind", "current", "holding"]

T = TypeVar("T")
D = TypeVar("D")
L = TypeVar("L")
F = TypeVar("F", bound=Callable[..., Any])
LV = TypeVar("LV", bound=LeaseView)

Keyed: TypeAlias = T | Callable[..., T]
"""A value, or a callable that computes it from a decorated call's arguments."""

Consume: TypeAlias = Mapping[str, int] | None


def _consume(field: str, value: Any) -> Mapping[str, int]:
    return {} if value is None else check_amounts(field, value, negative=False)


def _resolve(
    field: str,
    value: object,
    check: Callable[[str, Any], T],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> T:
    """``value``, or what the callable ``value`` returns for these arguments, checked."""
    if callable(value):
        return check(field, value(*args, **kwargs))
    return check(field, value)


@dataclass(frozen=True)
class LimitSpec:
    """What each call of a decorated function asks for: the arguments of ``limit``.

    Constants are checked when it is made (a bad decorator fails at import); what a
    callable returns is checked on each call, before any request.
    """

    entity: Keyed[str]
    resource: Keyed[str]
    consume: Keyed[Consume]
    limits: Sequence[Limit]
    horizon: float
    rollback_on_error: bool
    slot: Slot | None

    def __post_init__(self) -> None:
        for field, value, check in (
            ("entity", self.entity, check_id),
            ("resource", self.resource, check_id),
            ("consume", self.consume, _consume),
        ):
            if not callable(value):
                check(field, value)
        object.__setattr__(self, "limits", check_limits(self.limits))
        check_horizon(self.horizon)
        if not isinstance(self.rollback_on_error, bool):
            raise ValidationError("rollback_on_error", f"{self.rollback_on_error!r}", "a bool")
        if self.slot is not None and not isinstance(self.slot, Slot):
            raise ValidationError("slot", f"{self.slot!r}", "a Slot or None")

    def acquire(
        self, engine: Engine, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Flow[LeaseState]:
        """The grant of one call with these arguments (its keys and tokens are resolved
        now, before the flow runs: a callable's error reaches the caller as it is)."""
        entity = _resolve("entity", self.entity, check_id, args, kwargs)
        resource = _resolve("resource", self.resource, check_id, args, kwargs)
        consume = _resolve("consume", self.consume, _consume, args, kwargs)
        return engine.acquire(entity, resource, consume, self.limits, self.horizon, self.slot)

    def start(self, engine: Engine, lease: LeaseState) -> Flow[None]:
        """Wait for the lease's slot; with a paced ``slot`` whose start was not counted
        in the grant (a slot further ahead than ``start_within``), count it there and
        wait for the start slot too (up to ``horizon`` more, else RateLimitExceeded)."""
        yield from _pause((lease.start_ms - engine.now_ms()) / 1000)
        if self.slot is not None and self.slot.pace and not lease.paced:
            yield from _pause((yield from engine.start(lease, self.horizon)))

    def wrap(self, fn: Callable[..., Any], call: F, *, coroutine: bool) -> F:
        """``call`` as the decorated ``fn`` (``functools.wraps``), after checking that
        ``fn`` is the kind of function its limiter decorates."""
        check_kind(fn, coroutine=coroutine)
        functools.update_wrapper(call, fn)
        return call


def _pause(seconds: float) -> Flow[None]:
    if seconds > 0:
        yield Sleep(seconds)


def check_kind(fn: object, *, coroutine: bool) -> None:
    """TypeError unless ``fn`` is a coroutine function (``coroutine``) or a plain one,
    naming the limiter that decorates it."""
    mine, other, decorates, wrong = (
        ("AsyncRateLimiter", "RateLimiter", "async functions (async def)", "a plain function")
        if coroutine
        else ("RateLimiter", "AsyncRateLimiter", "plain functions", "an async function")
    )
    name = getattr(fn, "__qualname__", repr(fn))
    if not callable(fn):
        raise TypeError(f"{mine}.limit(...) decorates a function, not {fn!r}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"{mine}.limit(...) cannot decorate the generator function {name}: its body runs "
            "after the call has returned, outside the lease; acquire a lease inside it instead"
        )
    if inspect.iscoroutinefunction(fn) is not coroutine:
        raise TypeError(
            f"{mine}.limit(...) decorates {decorates}, and {name} is {wrong}: "
            f"use {other}.limit(...) for it"
        )


_held: ContextVar[tuple[tuple[object, LeaseView], ...]] = ContextVar("zae_leases", default=())
"""The leases of the decorated calls running in this context (thread, asyncio task),
innermost last, each with its limiter."""


@contextmanager
def holding(limiter: object, lease: LeaseView) -> Iterator[None]:
    """Make ``lease`` the current lease of ``limiter`` in this context for the block."""
    token = _held.set((*_held.get(), (limiter, lease)))
    try:
        yield
    finally:
        _held.reset(token)


def current(limiter: object, kind: type[LV]) -> LV:
    """The lease of the innermost call decorated by ``limiter`` running in this context;
    LookupError outside any."""
    for owner, lease in reversed(_held.get()):
        if owner is limiter and isinstance(lease, kind):
            return lease
    raise LookupError(
        f"no call decorated with this {type(limiter).__name__}'s limit() is running here "
        "(a thread started inside one does not inherit its lease)"
    )


class Decorator(Generic[L]):
    """What ``limit(...)`` returns, applied to the function; the front ends subclass it
    with their ``__call__``."""

    def __init__(self, limiter: L, spec: LimitSpec) -> None:
        self.limiter = limiter
        self.spec = spec


class Limiting(Generic[D]):
    """The ``limit`` method of both limiters (``D``: the decorator each front end makes)."""

    def limit(
        self,
        entity: Keyed[str],
        resource: Keyed[str],
        consume: Keyed[Consume] = None,
        limits: Sequence[Limit] = (),
        *,
        horizon: float = 0.0,
        rollback_on_error: bool = True,
        slot: Slot | None = None,
    ) -> D:
        """A decorator: every call of the function runs under a lease of these limits.

        >>> @limiter.limit(  # doctest: +SKIP
        ...     entity=lambda user, prompt: user.tenant,
        ...     resource="gpt-4o",
        ...     consume=lambda user, prompt: {"rpm": 1, "tpm": estimate(prompt)},
        ...     limits=[Limit.per_minute("rpm", 500), Limit.per_minute("tpm", 90_000)],
        ... )
        ... def ask(user, prompt): ...

        :class:`RateLimiter` decorates plain functions, :class:`AsyncRateLimiter`
        ``async def`` ones (the result is ``async def`` too); the other kind, or a
        generator function (whose body would run after the call returned, outside the
        lease), raises TypeError when decorating, naming the limiter to use. The result
        keeps the function's name, docstring and signature (``functools.wraps``).

        Args:
            entity, resource, consume: as :meth:`~RateLimiter.acquire` takes them
                (``entity`` is its ``entity_id``), each a constant or a callable that is
                called with the call's own arguments (``*args, **kwargs``, ``self`` of a
                method included) before it runs: per-key limits, each key its own
                buckets. Constants are checked here; a callable's result on each call,
                before any request (ValidationError). An exception of a callable
                reaches the caller as it is, with nothing consumed.
            limits, horizon, rollback_on_error, slot: passed to ``acquire`` for every
                call, with its meaning.

        A call:

        - **takes a lease** as ``acquire`` would. Refused, it raises
          RateLimitExceeded (``retry_after``), the function is not run and nothing is
          consumed. With ``horizon`` > 0 a call short of tokens is granted a slot up to
          ``horizon`` seconds ahead and waits for it in place, on the limiter's
          ``sleep`` (a test clock's moves that clock); a ``slot=Slot(pace=True)``
          whose start was not counted in the grant counts it at the slot (``start``,
          up to ``horizon`` more).
        - **runs the function in the lease**, as ``with lease:`` does: a return commits;
          an exception (in the function, or while waiting for the slot) refunds the
          consumption unless ``rollback_on_error=False``, and propagates.
        - **reports usage** through ``limiter.current_lease()``, which returns this
          call's lease anywhere inside it (``adjust``, ``pull_down``, ``consumed``),
          LookupError outside. An accessor rather than a lease argument, because the
          decorated function keeps exactly its own signature (for its callers, type
          checkers and tests that call it undecorated), sync and async alike; it is a
          context variable, so concurrent calls (threads, asyncio tasks) and nested
          decorated calls each see their own.
        """
        spec = LimitSpec(entity, resource, consume, limits, horizon, rollback_on_error, slot)
        return self._decorator(spec)

    def _decorator(self, spec: LimitSpec) -> D:
        raise NotImplementedError
