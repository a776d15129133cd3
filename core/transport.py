"""What the sync and async limiters share around the flows: the store, retries and the
circuit breaker, and the lease's read-only view."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .engine import Clock, Engine, OnUnavailable
from .errors import ValidationError
from .lease import BucketRef, LeaseState, Reported, Slot
from .ops import Flow
from .resilience import CircuitBreaker, RetryPolicy, guard
from .stores import DynamoDBStore, Store, from_url
from .validation import check_amounts

__all__ = ["BucketRef", "LeaseView", "LimiterBase", "Slot"]

T = TypeVar("T")
L = TypeVar("L", bound="LimiterBase")


def reported(
    engine: Engine,
    remaining: Mapping[str, int],
    at: float | None,
    buckets: Iterable[tuple[str, str]] | None,
    rates: Mapping[str, float] | None = None,
) -> Reported:
    """A lease's ``pull_down`` arguments as the engine takes them."""
    for name, value in (("remaining", remaining), ("rates", rates or {})):
        if not isinstance(value, Mapping):
            raise ValidationError(name, f"{type(value).__name__}", "a mapping")
    at_ms = engine.now_ms() if at is None else math.floor(at * 1000)
    pairs = None if buckets is None else frozenset((str(e), str(r)) for e, r in buckets)
    return Reported(dict(remaining), at_ms, pairs, dict(rates or {}))


class LeaseView:
    """Read-only view of a granted lease, shared by :class:`Lease` and :class:`AsyncLease`."""

    def __init__(self, state: LeaseState, rollback_on_error: bool) -> None:
        self._state = state
        self.rollback_on_error = rollback_on_error

    @property
    def consumed(self) -> Mapping[str, int]:
        """Running totals consumed per limit name (acquire plus every adjust)."""
        return dict(self._state.consumed)

    def settled_elsewhere(self, **deltas: int) -> None:
        """Count ``deltas`` that another process charges for this lease (it resumed the
        lease's ticket and adjusted it there): ``consumed`` includes them, nothing is
        written here. Used by Celery's pool processes, which hand refunds to their
        worker's main process."""
        for name, delta in check_amounts("settled_elsewhere", deltas, negative=True).items():
            total = self._state.consumed.get(name, 0) + delta
            if total < 0:
                raise ValidationError(f"settled_elsewhere.{name}", f"{delta}", "within consumed")
            self._state.consumed[name] = total

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
    def start_counted(self) -> bool:
        """True when the lease's start was counted on the start track (at ``started_at``)."""
        return self._state.start_tracked

    def recount_start(self) -> None:
        """Forget a counted start whose moment has passed (the caller came late): the
        next ``start()`` counts a fresh one. The missed slot stays counted."""
        self._state.start_tracked = False
        self._state.started_ms = None

    @property
    def spacing(self) -> float:
        """Seconds between two requests like this one on its tightest limit."""
        return self._state.spacing()

    @property
    def buckets(self) -> tuple[BucketRef, ...]:
        """The buckets the lease consumed from: its own first, then a cascade parent's
        and any ``extra`` buckets (empty for an unchecked lease)."""
        return tuple(
            BucketRef(t.entity_id, t.whole_resource, t.whole_limits) for t in self._state.targets
        )

    @property
    def caps(self) -> tuple[BucketRef, ...]:
        """The in-flight caps whose slots the lease holds now, by bucket (empty: none;
        ``Limit.concurrent``)."""
        if not self._state.holds_slots:
            return ()
        return tuple(
            BucketRef(t.entity_id, t.resource, t.caps) for t in self._state.targets if t.caps
        )

    def claim_for(self, owner: str) -> None:
        """Let the lease's ticket be started once only, by a holder that names ``owner``
        (e.g. a task id): the first :meth:`~.RateLimiter.start` of a resumed ticket
        creates the claim; another raises :class:`~.errors.LeaseClaimed`. A lease resumed
        from a claimed ticket keeps its claim until its start is counted."""
        self._state.claim_for(owner)

    def claimed_by(self, owner: str) -> bool:
        """True when the lease carries a claim made by ``claim_for(owner)``."""
        return self._state.claimed_by(owner)

    def ticket(self) -> dict[str, Any]:
        """The lease as a JSON-friendly, versioned dict, to resume it elsewhere (another
        process, a deferred message) with ``limiter.resume(ticket)``."""
        return self._state.to_dict()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} consumed={self.consumed} wait={self.wait:.3f}s"
            f"{' unchecked' if self.unchecked else ''}{' closed' if self.closed else ''}>"
        )


class LimiterBase:
    """Configuration shared by :class:`RateLimiter` and :class:`AsyncRateLimiter`.

    Args:
        table_name: the DynamoDB table (or pass ``store``).
        store: where the buckets live instead: a :class:`~.stores.MemoryStore`, a
            :class:`~.stores.DynamoDBStore`, or anything with the store protocol; see also
            :meth:`from_url`.
        endpoint_url: a local endpoint (moto server, DynamoDB Local); None for AWS.
        region: AWS region; None for the boto3 chain (``us-east-1`` for a local endpoint).
        on_unavailable: ``"closed"`` raises RateLimiterUnavailable when DynamoDB cannot
            answer; ``"open"`` grants an unchecked lease and logs a warning.
        clock: seconds since the epoch (injectable for tests).
        stored_config: look up entities and stored limits (one Query per entity, cached).
        config_ttl: seconds stored limits and entity records are cached per process.
        local_refusals: refuse without a request when the last state this process saw
            already proves the refusal.
        session: a boto3 (sync) or aiobotocore (async) session to create the client from.
        retry_attempts: requests sent at most for one call when DynamoDB throttles,
            answers 5xx or does not answer (the first included).
        retry_budget: seconds after which no further attempt of one call starts.
        breaker_threshold: calls failed in a row (after their retries) that open the
            circuit breaker: calls then fail at once, without I/O.
        breaker_cooldown: seconds the breaker stays open before one probe call is let
            through; its success closes it. Measured on ``clock`` when one is given,
            else on ``time.monotonic``.
        sleep: how the limiter waits (retry backoffs, and callers that wait for a slot
            through :meth:`~.RateLimiter.sleep`): a function of seconds for
            :class:`RateLimiter`, a coroutine function for :class:`AsyncRateLimiter`;
            None for ``time.sleep`` / ``asyncio.sleep``. Injected with ``clock`` so that
            a test's waits move its clock instead of passing (see ``zae_celery.testing``).
        settle_delay: seconds a refund (usage under the estimate) may wait to ride in a
            later write of this process to the same bucket item (its next grant, or a
            settle that adds debt), instead of a write of its own; a background flusher
            writes it when due, and :meth:`~.RateLimiter.flush` at once. Debt is never
            held. 0 (the default): every settle writes at once. What a process killed
            with refunds held loses: those refunds (the fleet under-uses them once);
            never anything granted early. With an injected ``clock`` nothing is
            flushed in the background (call ``flush()``). See docs/engine.md, "Settle
            coalescing".
    """

    def __init__(
        self,
        table_name: str | None = None,
        *,
        store: Store | None = None,
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
        sleep: Callable[[float], Any] | None = None,
        settle_delay: float = 0.0,
    ) -> None:
        if not (isinstance(settle_delay, (int, float)) and 0 <= settle_delay <= 3600):
            raise ValidationError("settle_delay", f"{settle_delay!r}", "seconds, 0 to 3600")
        if store is None:
            if table_name is None:
                raise ValidationError(
                    "table_name", "is missing", "a table name, store=..., or from_url(URL)"
                )
            store = DynamoDBStore(
                table_name, endpoint_url=endpoint_url, region=region, session=session
            )
        elif table_name is not None or endpoint_url is not None or region is not None or session:
            raise ValidationError(
                "store", "given with table_name/endpoint_url/region/session", "one or the other"
            )
        elif not isinstance(store, Store):
            raise ValidationError("store", f"{store!r}", "a store (MemoryStore, DynamoDBStore)")
        self.store: Store = store
        self.engine = Engine(
            clock=clock,
            on_unavailable=on_unavailable,
            stored_config=stored_config,
            config_ttl=config_ttl,
            local_refusals=local_refusals,
            clamp=bool(getattr(store, "clamps", False)),
        )
        # Cool-downs and retry budgets are durations: a monotonic clock unless injected.
        self._monotonic: Clock = time.monotonic if clock is time.time else clock
        self.retry = RetryPolicy(attempts=retry_attempts, budget=retry_budget)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown, self._monotonic)
        self._sleep = sleep
        self.engine.settle_delay_ms = round(settle_delay * 1000)
        self.engine.on_hold = self._on_hold

    def _on_hold(self, due_ms: int) -> None:
        """A refund is held until ``due_ms``: make sure it gets flushed (per front end)."""

    @property
    def breaker_open(self) -> bool:
        """True while the circuit breaker refuses calls (its ``state`` is ``"open"``)."""
        return self.breaker.state == "open"

    @property
    def clock(self) -> Clock:
        """The limiter's clock (seconds since the epoch): ``time.time`` unless injected."""
        return self.engine.clock

    @classmethod
    def from_url(cls: type[L], url: str, **options: Any) -> L:
        """A limiter on the store a URL names: ``dynamodb://TABLE?region=...&endpoint_url=...``
        or ``memory://`` (see :func:`~.stores.from_url`); ``options`` are the keyword
        arguments of the constructor (``clock``, ``on_unavailable``...)."""
        store = from_url(url, clock=options.get("clock", time.time))
        return cls(store=store, **options)

    @property
    def table_name(self) -> str:
        """The DynamoDB table (``memory`` for an in-memory store)."""
        name: str = getattr(self.store, "table_name", self.store.name)
        return name

    @property
    def client(self) -> Any:
        """The boto3 client of a DynamoDB store (this process's; created on first use)."""
        client = getattr(self.store, "client", None)
        if client is None:
            raise AttributeError(f"{self.store!r} has no DynamoDB client")
        return client

    @property
    def unavailable_grants(self) -> int:
        """Leases granted (or started) unchecked in ``open`` mode while the store was
        unavailable, in this process."""
        return self.engine.unavailable_grants

    def _guarded(self, flow: Flow[T]) -> Flow[T]:
        """``flow`` with this limiter's retries and circuit breaker around every call."""
        return guard(flow, self.breaker, self.retry, self._monotonic)
