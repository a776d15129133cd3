"""``RateLimitedTask``: a Celery task base class whose limits are shared by every worker.

Before the body runs (``before_start``) the task takes a lease from the shared buckets:
its own limits and those of the queue it was consumed from, in one atomic write. A task
that is refused is not failed: it reserves its own future slot (consuming now, into debt).
A slot at most ``zae_start_wait`` ahead is waited for in place (its start counted in the
same write); a later one is republished once with a countdown to that slot, carrying the
reservation in its message headers, and at its slot it only counts its actual start.
After the body, ``self.report_usage(...)`` reconciles the estimate with the truth. Waiting
on a limit never uses the task's ``max_retries``: deferrals have a counter of their own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

from celery import Task, states
from celery.exceptions import Reject, Retry
from celery.signals import task_postrun

from zae_celery.admission import ADMITTED, BLOCKED_COMMAND, LATE_START
from zae_celery.core import (
    BucketRef,
    Lease,
    LeaseClaimed,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Slot,
    TableNotFound,
    ValidationError,
    ZaeError,
)
from zae_celery.core.limits import RATE_SYNTAX, check_tokens, parse_rate
from zae_celery.decisions import log_decision
from zae_celery.events import PROVIDER_LIMITED, THROTTLED, from_task
from zae_celery.handover import hand_over
from zae_celery.metrics import ObservedStore, quietly, recorder
from zae_celery.options import OnError, TaskOptions
from zae_celery.providers.headers import RateLimitHeaders, read_rate_limits
from zae_celery.providers.profiles import COMPLETION, Profile
from zae_celery.queues import QUEUE, QUEUE_ENTITY_PREFIX, QUEUE_RESOURCE, queue_of_run
from zae_celery.renewal import renewer
from zae_celery.runlog import run_log_for  # noqa: F401  (connects the run log to run_settled)
from zae_celery.settings import Settings
from zae_celery.signals import run_settled

__all__ = [
    "HEADER_DEFERRALS",
    "HEADER_LEASE",
    "HEADER_OUTAGES",
    "DeferralsExhausted",
    "RateLimitedTask",
    "limiter_for",
    "parse_celery_rate",
    "run_coroutine",
]

log = logging.getLogger("zae_celery")

HEADER_DEFERRALS = "zae_deferrals"
"""Message header: how many times this task was deferred by a limit (not a retry)."""
HEADER_LEASE = "zae_lease"
"""Message header: the reservation a deferred task holds (its slot is already paid)."""
HEADER_OUTAGES = "zae_outages"
"""Message header: deferrals caused by an unreachable store (capped by max_deferrals)."""


class DeferralsExhausted(ZaeError):
    """A task was deferred ``rate_max_deferrals`` times while the store was unreachable."""


_limiters: weakref.WeakKeyDictionary[Any, dict[int, tuple[Settings, RateLimiter]]] = (
    weakref.WeakKeyDictionary()
)
_limiters_lock = threading.Lock()


def limiter_for(app: Any) -> tuple[Settings, RateLimiter]:
    """The settings and limiter of ``app`` in this process, created on first use.

    Created lazily (not in ``worker_process_init``) and kept per PID, so a forked pool
    child never shares its parent's connections. The cache holds the app weakly: an app
    that is garbage-collected takes its limiters with it, and a later app (which may
    reuse its ``id()``) gets its own.
    """
    pid = os.getpid()
    found = _limiters.get(app, {}).get(pid)
    if found is None:
        with _limiters_lock:
            per_process = _limiters.setdefault(app, {})
            found = per_process.get(pid)
            if found is None:
                settings = Settings.from_app(app)
                options: dict[str, Any] = {
                    "on_unavailable": "open" if settings.on_unavailable == "open" else "closed",
                    "breaker_threshold": settings.breaker_threshold,
                    "breaker_cooldown": settings.breaker_cooldown,
                    "settle_delay": settings.settle_delay,
                }
                if settings.store_url is not None:
                    limiter = RateLimiter.from_url(settings.store_url, **options)
                else:
                    limiter = RateLimiter(
                        settings.table_name,
                        endpoint_url=settings.endpoint_url,
                        region=settings.region,
                        **options,
                    )
                metrics = recorder(settings.metrics_port is not None)
                if metrics is not None:
                    limiter.store = ObservedStore(
                        limiter.store, metrics, lambda: limiter.breaker_open
                    )
                found = per_process[pid] = (settings, limiter)
    return found


@contextmanager
def _installed_limiter(app: Any, settings: Settings, limiter: RateLimiter) -> Iterator[None]:
    """``app``'s settings and limiter in this process for the block (tests: see
    ``zae_celery.testing.use_limiter``); the one before is put back after."""
    pid = os.getpid()
    with _limiters_lock:
        per_process = _limiters.setdefault(app, {})
        before = per_process.get(pid)
        per_process[pid] = (settings, limiter)
    try:
        yield
    finally:
        with _limiters_lock:
            if before is None:
                per_process.pop(pid, None)
            else:
                per_process[pid] = before


def parse_celery_rate(value: Any) -> Limit | None:
    """Celery's ``rate_limit`` as a global :class:`Limit` named ``rate_limit`` that holds
    one request at a time, the same smoothing as Celery's own per-worker bucket.

    The text is a rate in the grammar of :func:`zae_celery.core.limits.parse_rate`
    (``"100/m"``, ``"10/s"``, ``"0.5/s"``, ``"7/10s"``), or, as in Celery, a number
    per second (``10``, ``"10"``). None, ``""`` and ``0`` mean no limit.
    """
    if value is None or value == "" or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        # The shortest decimal that round-trips: 0.1, not 0.1000000000000000055...
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        if not number.is_finite():
            raise ValidationError("rate_limit", f"{value!r} is not a finite number", RATE_SYNTAX)
        text = format(number, "f") + "/s"
    elif isinstance(value, str):
        text = value if "/" in value else f"{value}/s"
    else:
        raise ValidationError(
            "rate_limit", f"must be a string or a number, got {type(value).__name__}", RATE_SYNTAX
        )
    amount, period_ms = parse_rate(text, field="rate_limit")
    return Limit("rate_limit", 1, 1, amount, period_ms)


@dataclass(frozen=True)
class _Run:
    """This run's horizon, outage-deferral limit, on-error policy and pipeline run
    (callables called once, before the run takes or starts a lease)."""

    horizon: float
    max_deferrals: int
    on_error: OnError
    run_id: str | None = None
    """The pipeline run it belongs to (``rate_run``; None: Celery's ``root_id``)."""


@dataclass(frozen=True)
class _Spec:
    """What one run of a task consumes, and from which buckets."""

    entity_id: str
    resource: str
    consume: dict[str, int]
    limits: tuple[Limit, ...]
    extra: tuple[tuple[str, str, Sequence[Limit]], ...]
    run: _Run

    def acquire(self, limiter: RateLimiter, horizon: float, start_within: float) -> Lease:
        """A slot up to ``horizon`` ahead, its start counted with it when it is at most
        ``start_within`` ahead (one conditional write)."""
        return limiter.acquire(
            self.entity_id,
            self.resource,
            self.consume,
            self.limits,
            horizon=horizon,
            slot=Slot(extra=self.extra, pace=True, start_within=start_within, caps_at_start=True),
        )


class RateLimitedTask(Task):  # type: ignore[misc]
    """A task whose start is gated by global token buckets.

    Options (set with ``@app.task(base=RateLimitedTask, rate_limits=[...], ...)``; each
    may be a value or a callable of the task's ``(args, kwargs)``, declared in
    :data:`zae_celery.options.TASK_OPTIONS`). Values are validated once, when the task
    class is bound to its app; a bad one is a ValidationError naming the option, raised by
    every use of the task: ``apply_async``/``delay`` (nothing is published) and each run
    (before anything is acquired). A callable is called when a run needs its value, before
    any lease is taken (by the consumer that admits the task and by the pool process that
    runs it: keep it cheap and deterministic), and its result validated the same way:

    - ``rate_limits``: ``[Limit, ...]`` of the task (default none: only queue limits).
    - ``rate_resource``: what the limits protect (default: the task's name).
    - ``rate_entity``: who is limited, e.g. a tenant (default: ``zae_default_entity``).
    - ``rate_consume``: ``{"rpm": 1, "tpm": estimate}`` (default: 1 of every limit).
    - ``rate_on_error``: when the body raises (or retries): ``"keep"`` what was consumed
      (the default: a failed call may still have reached the provider), ``"refund"`` it,
      or a tuple of limit names to keep (e.g. ``("rpm",)``) with the rest refunded.
    - ``rate_block``: which buckets a provider's 429 (:meth:`provider_limited`) blocks:
      ``"all"`` (the default: its own, its cascade parents', its queue's) or some of
      ``("own", "parents", "queue")``.
    - ``rate_profile``: how the provider charges and which limit stands for which of its
      windows (:mod:`zae_celery.providers.profiles`): a ``Profile`` or ``"openai"``,
      ``"anthropic"``, ``"completion"`` (default: ``"completion"``, or the provider's own
      in :mod:`zae_celery.providers.openai` / ``.anthropic``).
    - ``rate_max_deferrals``: deferrals before the task fails (default ``zae_max_deferrals``).
    - ``rate_horizon``: seconds a slot may be reserved ahead (default ``zae_horizon``).

    A string ``rate_limit`` (Celery's own option, e.g. ``"100/m"``) becomes a global limit
    named ``rate_limit`` and the worker's per-process bucket for the task is disabled.
    """

    Strategy = "zae_celery.admission:admission_strategy"
    """The worker's consumer admits these tasks at the buckets' pace (``zae_admission``)."""

    rate_limits: Any = ()
    rate_resource: Any = None
    rate_entity: Any = None
    rate_consume: Any = None
    rate_on_error: Any = "keep"
    rate_profile: Any = None
    rate_max_deferrals: Any = None
    rate_horizon: Any = None
    _global_rate_limit: Limit | None = None
    _zae_options: TaskOptions | None = None
    _zae_error: ValidationError | None = None
    _zae_rate_limit_error: ValidationError | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """An ``async def`` task function (or ``run`` method) runs to completion in the
        worker: its coroutine is run on an event loop of its own, the lease held across
        it (see :func:`run_coroutine`)."""
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None:
            cls.run = _sync_run(run)

    @classmethod
    def bind(cls, app: Any) -> Any:
        """Bind to the app: resolve and validate the ``rate_*`` options, and move a string
        ``rate_limit`` from Celery's per-worker bucket to a global limit.

        A bad option is kept and raised by every use of the task (:meth:`_options`), not
        here: Celery registers a task before binding it, and adds a shared task to every
        app finalized later, so an error raised while binding would leave a half-bound
        task behind and break the finalization of unrelated apps.
        """
        bound = super().bind(app)  # applies task_annotations, which may set options
        if cls.rate_limit is not None:  # not yet moved (Celery binds a task again later)
            text, cls.rate_limit = cls.rate_limit, None  # no per-worker bucket for the task
            try:
                cls._global_rate_limit = parse_celery_rate(text)
                cls._zae_rate_limit_error = None
            except ValidationError as exc:
                cls._global_rate_limit, cls._zae_rate_limit_error = None, exc
        cls._zae_options, cls._zae_error = None, cls._zae_rate_limit_error
        try:
            cls._zae_options = TaskOptions.of(cls)
        except ValidationError as exc:
            cls._zae_error = exc
        return bound

    @classmethod
    def _options(cls) -> TaskOptions:
        """The options resolved at bind (resolved now for a class never bound); raises
        the ValidationError of a bad option."""
        error = cls.__dict__.get("_zae_error")
        if error is not None:
            raise ValidationError(error.field, error.problem, error.allowed)
        options = cls.__dict__.get("_zae_options")
        if options is None:
            options = cls._zae_options = TaskOptions.of(cls)
        return options

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``apply_async``; a task with a bad option raises its ValidationError
        here, before anything is published."""
        self._options()
        return super().apply_async(*args, **kwargs)

    # -- what to consume --------------------------------------------------------------------
    def _run(self, settings: Settings, args: Any, kwargs: Any) -> _Run:
        """This run's horizon, outage-deferral limit and on-error policy."""
        options = self._options()
        return _Run(
            horizon=options.horizon(settings, args, kwargs),
            max_deferrals=options.max_deferrals(settings, args, kwargs),
            on_error=options.on_error(args, kwargs),
            run_id=options.get("rate_run", args, kwargs),
        )

    def _spec(
        self, settings: Settings, args: Any, kwargs: Any, queue: str, run: _Run | None = None
    ) -> _Spec | None:
        """What this run consumes, and from which buckets (None: no limits apply).

        ``queue`` is the key of its queue limits: the queue the message was consumed
        from, or a fallback when that is unknown (:func:`zae_celery.queues.limit_key`).
        Called by the consumer (admission) and by ``before_start`` alike, on the options
        resolved at bind; ``run`` is this run's :meth:`_run` when already known.
        """
        options = self._options()
        limits = options.limits(args, kwargs)
        if self._global_rate_limit is not None:
            limits += (self._global_rate_limit,)
        queue_limits = settings.queue_limits.get(queue, ())
        if not limits and not queue_limits:
            return None
        entity = options.get("rate_entity", args, kwargs)
        entity = settings.default_entity if entity is None else entity
        resource = options.get("rate_resource", args, kwargs) or self.name
        given = options.get("rate_consume", args, kwargs)
        consume = {lim.name: 1 for lim in limits} if given is None else dict(given)
        if self._global_rate_limit is not None:
            consume.setdefault("rate_limit", 1)
        extra: tuple[tuple[str, str, Sequence[Limit]], ...] = ()
        queue_entity = QUEUE_ENTITY_PREFIX + queue
        if queue_limits:
            extra = ((queue_entity, QUEUE_RESOURCE, queue_limits),)
        if not limits:  # queue limits only: the queue's bucket is the task's own
            entity, resource, limits, extra = queue_entity, QUEUE_RESOURCE, tuple(queue_limits), ()
            consume = {lim.name: consume.get(lim.name, 1) for lim in limits}
        if run is None:
            run = self._run(settings, args, kwargs)
        return _Spec(entity, resource, consume, limits, extra, run)

    # -- the gate ---------------------------------------------------------------------------
    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Acquire (or take up a reserved slot) before the body runs; defer when refused."""
        self._gate(task_id, args, kwargs)
        self.request.zae_started = time.time()  # the body starts now (the run log's start)

    def _gate(self, task_id: str, args: Any, kwargs: Any) -> None:
        """:meth:`before_start`'s work: returns when the body may run."""
        settings, limiter = limiter_for(self.app)
        request = self.request
        # How this run handles a lease (horizon, outage deferrals, rate_on_error) is
        # decided and validated here, before it takes or starts one: a bad value (or a
        # bad option found at bind) fails the task with nothing held.
        run = request.zae_run = self._run(settings, args, kwargs)
        request.zae_waited = 0.0
        eager = bool(request.is_eager)
        headers = request.headers or {}
        deferrals = int(headers.get(HEADER_DEFERRALS) or 0)
        admitted = getattr(request, ADMITTED, None)
        if admitted:
            lease = limiter.resume(admitted)
            self._start(settings, limiter, lease, deferrals)
            self._running(lease)
            return
        carried = headers.get(HEADER_LEASE)
        if carried:
            lease = limiter.resume(carried)
            if lease.claimed_by(task_id):
                try:
                    self._start(settings, limiter, lease, deferrals)
                except LeaseClaimed:
                    # Another delivery of this message already started on the
                    # reservation (a redelivery after a lost worker or a visibility
                    # timeout, a duplicate publish): this run pays for itself.
                    log.warning(
                        "zae-celery task %s (%s) was delivered again after its reservation "
                        "was started; acquiring afresh",
                        task_id,
                        self.name,
                    )
                else:
                    self._running(lease)
                    return
            # A reservation not made for this task id (or before claims existed) is
            # never started: the task acquires like a new one.
        queue = queue_of_run(self.app, request)
        spec = self._spec(settings, args, kwargs, queue, run)
        if spec is None:
            return
        horizon = run.horizon
        # An eager run (apply(), task_always_eager) has no broker to wait in: it waits
        # in place for a slot up to its horizon (or, with zae_eager="admit", runs at
        # once when refused).
        start_wait = horizon if eager else settings.start_wait
        try:
            lease = spec.acquire(limiter, horizon, start_wait)
        except RateLimitExceeded as exc:
            if eager and settings.eager == "admit":
                log.warning(
                    "zae-celery runs eager task %s (%s) without a lease (zae_eager='admit'): %s",
                    task_id,
                    self.name,
                    _describe(exc),
                )
                return
            v = exc.violations[0] if exc.violations else None
            log_decision(
                "refused",
                request.id,
                bucket=f"{v.entity_id}/{v.resource}" if v else None,
                limit=v.limit_name if v else None,
                wait=float(exc.retry_after),
            )
            wait = min(exc.retry_after, horizon) + random.uniform(0, settings.jitter)
            self._defer(settings, deferrals, wait, None, _describe(exc), cause=exc)
        except TableNotFound:
            raise  # a misconfiguration: fail now rather than defer forever
        except RateLimiterUnavailable as exc:
            wait = settings.unavailable_retry + random.uniform(0, settings.jitter)
            self._defer(settings, deferrals, wait, None, "rate limiter unavailable", True, exc)
        log_decision(
            "granted",
            request.id,
            bucket=_bucket_of(lease),
            wait=float(lease.wait),
            path="eager" if eager else "pool",
            unchecked=True if lease.unchecked else None,
        )
        if lease.wait > start_wait:
            self._defer(settings, deferrals, lease.wait, lease, "reserved slot")
        self._start(settings, limiter, lease, deferrals)
        self._running(lease)

    def _start(
        self, settings: Settings, limiter: RateLimiter, lease: Lease, deferrals: int
    ) -> None:
        """Wait in place for a slot at most ``zae_start_wait`` ahead, and count the start.

        An admitted task (its start counted by the consumer at its slot) usually arrives
        at the slot and starts with no request. One more than ``LATE_START`` late counts
        a fresh start, like a deferred task does.

        A new grant whose slot is that close had its start counted at the slot in the
        same write. A deferred task counts its actual start on the start track when it
        arrives: when deferred messages arrive late and together, it takes the next free
        start slot and waits for it here if that is within ``zae_start_wait``; a later
        start slot is reserved (up to the horizon) and the task is republished once more,
        to it, carrying that counted start, so it can never be pushed back again."""
        # Its start slot when that was counted already (by the consumer that admitted
        # it, or before a republish), else its quota slot.
        slot = lease.start_at if lease.started_at is None else lease.started_at
        early = slot - limiter.clock()
        wait_limit = self._wait_limit(settings)
        if early > wait_limit:
            self._defer(settings, deferrals, early, lease, "arrived before its slot")
        if early > 0:
            self._wait(limiter, early)  # a worker's timer may fire a few ms before the slot
        elif lease.start_counted and -early > _late_tolerance(lease):
            # Its counted start has passed (a busy pool, a late message): starting now
            # could bunch with the starts after it. It counts a fresh start instead;
            # the slot it missed stays counted (fewer starts, never more).
            log.info(
                "zae-celery task %s (%s) came %.3f s after its counted start: counting a "
                "fresh start",
                self.request.id,
                self.name,
                -early,
            )
            lease.recount_start()
        horizon = max(self.request.zae_run.horizon, wait_limit)
        polled = 0.0
        while True:
            try:
                wait = limiter.start(lease, horizon=horizon)
                break
            except RateLimitExceeded as exc:
                # An in-flight cap is full: a slot comes back when a holder ends, which
                # no store foresees. The task waits here for one, asking again every
                # zae_slot_poll, up to its horizon; only then round the broker.
                if all(v.inflight for v in exc.violations) and polled < horizon:
                    pause = min(exc.retry_after, settings.slot_poll) * random.uniform(1.0, 1.25)
                    self._wait(limiter, pause)
                    polled += pause
                    continue
                self._defer(settings, deferrals, exc.retry_after, lease, _describe(exc), cause=exc)
            except RateLimiterUnavailable as exc:  # "closed"; "open" starts unchecked
                retry = settings.unavailable_retry + random.uniform(0, settings.jitter)
                self._defer(
                    settings, deferrals, retry, lease, "rate limiter unavailable", True, exc
                )
        if wait > wait_limit:
            self._defer(settings, deferrals, wait, lease, "start slot reserved")
        if wait > 0:
            self._wait(limiter, wait)  # this task's own start slot, on the start track

    def _running(self, lease: Lease) -> None:
        """The run holds ``lease`` while its body runs; its in-flight slots are renewed
        until it ends (not in an eager run: the caller's process, perhaps a test clock)."""
        self.request.zae_active_lease = lease
        if lease.caps and not self.request.is_eager:
            renewer().hold(lease)

    def _wait_limit(self, settings: Settings) -> float:
        """How long this run may wait in place for its slot: ``zae_start_wait`` (with
        admission, plus ``zae_admission_window``: the start track is taken that far
        ahead, and a late start waits behind those slots rather than go round the
        broker); an eager run, up to its horizon."""
        if self.request.is_eager:
            horizon: float = self.request.zae_run.horizon
            return horizon
        return settings.start_wait + (settings.admission_window if settings.admission else 0)

    def _wait(self, limiter: RateLimiter, seconds: float) -> None:
        """Wait in place on the limiter's sleep (a test clock's moves that clock)."""
        limiter.sleep(seconds)
        self.request.zae_waited = getattr(self.request, "zae_waited", 0.0) + seconds

    def _defer(
        self,
        settings: Settings,
        deferrals: int,
        countdown: float,
        lease: Lease | None,
        reason: str,
        outage: bool = False,
        cause: ZaeError | None = None,
    ) -> NoReturn:
        """Republish this task with a countdown (and its reservation); raise Retry.

        An eager run is never republished: it raises ``cause`` (the refusal or outage
        that made it defer; a reservation made by this run is refunded first), and
        without one (a provider's 429) it runs again in place, as Celery's eager retry
        does, at most ``rate_max_deferrals`` times.

        Only deferrals caused by an unreachable store (``outage``) count towards
        ``rate_max_deferrals``: throttling alone never fails a task.

        The reservation travels with a claim (this task id and a nonce, kept when a carried
        reservation is deferred again) so that it can be started once only. When the
        publish fails the message is not lost: with ``acks_late`` it is rejected and
        requeued (a reservation made in this run is refunded first; a carried one stays,
        since the requeued message still holds it); otherwise the task fails with the
        error.
        """
        request = self.request
        kind = "outage" if outage else "provider" if reason.startswith("provider") else "slot"
        self._count_deferral(settings, lease, kind, cause)
        refused = cause.violations[0] if isinstance(cause, RateLimitExceeded) else None
        if kind != "provider":  # provider_limited sends its own
            from_task(
                self,
                THROTTLED,
                wait=float(countdown),
                resource=refused.resource if refused else _resource_of(lease),
                limit=refused.limit_name if refused else None,
                path="pool",
                cause=kind,
            )
        log_decision(
            "deferred",
            request.id,
            bucket=_bucket_of(lease)
            or (f"{refused.entity_id}/{refused.resource}" if refused else None),
            limit=refused.limit_name if refused else None,
            wait=float(countdown),
            cause=kind,
        )
        limit = request.zae_run.max_deferrals
        outages = int((request.headers or {}).get(HEADER_OUTAGES) or 0)
        if outage and outages >= limit:
            if lease is not None:
                lease.rollback()
            raise DeferralsExhausted(
                f"task {request.id} ({self.name}) was deferred {outages} times while the "
                f"rate limiter was unavailable (rate_max_deferrals={limit}); last: {reason}"
            )
        # A reservation carried by this message (claimed for this task) stays with the
        # message if the republish fails; one made by this run is refunded then.
        carried = lease is not None and lease.claimed_by(request.id)
        if request.is_eager and cause is not None:
            if lease is not None and not carried:
                lease.rollback()
            raise cause
        if request.is_eager and deferrals >= limit:
            raise DeferralsExhausted(
                f"eager task {request.id} ({self.name}) was deferred {deferrals} times "
                f"(rate_max_deferrals={limit}); last: {reason}"
            )
        if lease is not None:
            # A new reservation, or one whose start this run counted (and whose claim
            # it used), gets a claim of its own for the next delivery; a carried one
            # not started yet keeps its claim. In-flight slots never wait in a broker:
            # freed here, taken again by the next delivery's start.
            lease.claim_for(request.id)
            try:
                lease.free_slots()
            except ZaeError as exc:  # they expire, and come back then
                log.warning(
                    "zae-celery could not free the in-flight slots of %s: %s", request.id, exc
                )
        headers = dict(request.headers or {})
        headers.pop(ADMITTED, None)  # granted to this run only
        headers.pop(QUEUE, None)  # told by the consumer that takes the next delivery
        headers[HEADER_DEFERRALS] = deferrals + 1
        headers[HEADER_OUTAGES] = outages + 1 if outage else outages
        headers[HEADER_LEASE] = lease.ticket() if lease is not None else None
        countdown = max(0.0, countdown)
        if request.is_eager:  # Celery's apply() runs the signature again, in place
            again = self.signature_from_request(request, countdown=countdown, headers=headers)
            request.zae_retrying = True
            raise Retry(f"rate limited: {reason}", None, when=countdown, is_eager=True, sig=again)
        try:
            self.signature_from_request(request, countdown=countdown, headers=headers).apply_async()
        except Exception as exc:
            if lease is not None and not carried:
                lease.rollback()
            if not self.acks_late:
                raise  # the message was acknowledged before the run: fail visibly
            log.warning(
                "zae-celery could not republish task %s (%s): %s; its message is requeued",
                request.id,
                self.name,
                type(exc).__name__,
            )
            raise Reject(f"republish failed: {type(exc).__name__}", requeue=True) from None
        log.info(
            "zae-celery deferred task %s (%s) by %.3f s: %s (deferral %d)",
            request.id,
            self.name,
            countdown,
            reason,
            deferrals + 1,
        )
        raise Retry(f"rate limited: {reason}", None, when=countdown)

    # -- inside the body ----------------------------------------------------------------------
    @property
    def lease(self) -> Lease:
        """The lease of the running task (ValidationError outside a rate-limited run)."""
        lease: Lease | None = getattr(self.request, "zae_active_lease", None)
        if lease is None:
            raise ValidationError(
                "lease", f"task {self.name} holds no lease (no limits, or called directly)"
            )
        return lease

    def report_usage(self, **actual: int) -> None:
        """Reconcile the estimate with what was really used: ``report_usage(tpm=1234)``.

        The difference from what was consumed is adjusted (one write; none if equal);
        the bucket may go into debt, which delays later tasks exactly. A lease granted
        unchecked (``zae_on_unavailable="open"`` during an outage) consumed nothing: the
        usage is charged now if the store answers again, else dropped with a warning;
        the task never fails for it. A run that holds no lease (a direct call
        ``task(...)``, no limits apply, an eager run admitted with ``zae_eager="admit"``)
        checks the values and logs them at DEBUG: nothing is charged.
        """
        for name, value in actual.items():
            check_tokens(f"report_usage.{name}", value, minimum=0)
        lease: Lease | None = getattr(self.request, "zae_active_lease", None)
        if lease is None:
            log.debug(
                "zae-celery task %s (%s) holds no lease: usage %s not charged",
                self.request.id,
                self.name,
                actual,
            )
            return
        names = [lim.name for lim in lease.buckets[0].limits] if lease.buckets else []
        for name in actual:
            if names and name not in names:
                raise ValidationError(
                    f"report_usage.{name}", "is not a limit of this task", ", ".join(names)
                )
        if lease.caps:  # charged in the write that frees its slots, as the run ends
            pending = getattr(self.request, "zae_pending_usage", None) or {}
            self.request.zae_pending_usage = {**pending, **actual}
            return
        deltas = self._deltas(lease, actual)
        report = getattr(self.request, "zae_provider_report", None)
        if report is None and _refunds_only(lease, deltas) and hand_over(lease, deltas):
            lease.settled_elsewhere(**deltas)  # the worker's main process writes them
            return
        if not self._pull_down(lease, deltas):
            lease.adjust(**deltas)

    @staticmethod
    def _deltas(lease: Lease, actual: dict[str, int]) -> dict[str, int]:
        """What reporting ``actual`` usage adds to (or refunds from) what was consumed."""
        consumed = lease.consumed
        return {name: value - consumed.get(name, 0) for name, value in actual.items()}

    def _pending(self, lease: Lease) -> dict[str, int]:
        """The deltas of usage reported but not charged yet (a run holding in-flight
        slots charges it in the write that frees them); taken once."""
        actual = getattr(self.request, "zae_pending_usage", None) or {}
        self.request.zae_pending_usage = None
        return self._deltas(lease, actual)

    def provider_reported(self, headers: Any, profile: Profile | None = None) -> RateLimitHeaders:
        """What the provider's response ``headers`` (a mapping, e.g. ``httpx.Headers``)
        say is left of its limits: the shared buckets that hold more are pulled down to
        it (never up) in the write that settles the run (the next :meth:`report_usage`,
        else one write when the run ends; none when no bucket holds more).

        ``profile`` (default: the task's ``rate_profile``, else ``"completion"``) says
        which limit is which of the provider's windows; the buckets are those
        ``rate_block`` names (by default all of the run's, as for a 429). Returns the
        parsed headers. In a run without a lease it only parses them.
        """
        if getattr(self.request, "zae_active_lease", None) is None:
            return read_rate_limits(headers)
        now = limiter_for(self.app)[1].clock()
        report = read_rate_limits(headers, now)
        self.request.zae_provider_report = (report, now, profile or self._profile(COMPLETION))
        return report

    def _key_buckets(self, lease: Lease | None) -> list[BucketRef]:
        """The run's buckets that stand for the provider's key: those ``rate_block``
        names (a 429 blocks them, a provider's report pulls them down)."""
        request = self.request
        kinds = self._options().get("rate_block", request.args, request.kwargs)
        return _blocked(lease.buckets if lease is not None else (), kinds)

    def _profile(self, default: Profile) -> Profile:
        """The run's ``rate_profile``, else ``default``."""
        request = self.request
        return self._options().profile(request.args, request.kwargs, default)

    def _pull_down(self, lease: Lease, deltas: dict[str, int], end: bool = False) -> bool:
        """Write a pending provider report (with ``deltas``; ``end``: the lease ends in
        that write); False when none is pending."""
        pending = getattr(self.request, "zae_provider_report", None)
        if pending is None or lease.closed:
            return False
        self.request.zae_provider_report = None
        report, at, profile = pending
        chosen = self._key_buckets(lease)
        names = {lim.name for ref in chosen for lim in ref.limits}
        remaining = profile.remaining(report, names)
        rates = profile.rates(report, names)
        if not remaining and not rates:
            return False
        lease.pull_down(
            remaining,
            at=at,
            buckets=[(ref.entity_id, ref.resource) for ref in chosen],
            deltas=deltas,
            rates=rates,
            end=end,
        )
        return True

    def provider_limited(self, retry_after: float, *, charged: bool = True) -> NoReturn:
        """The provider answered 429: empty the shared buckets for ``retry_after`` seconds
        so every worker backs off, then defer this task past it. Raises Retry.

        The buckets blocked are those ``rate_block`` names among the run's: by default
        all of them, its own, its cascade parents' (a provider key is often a parent of
        its tenants) and its queue's, since any of them may stand for the provider's
        key; one write each.

        ``charged=False`` when the provider did not count the request (an overloaded
        answer, 529 or 503): the run's consumption is refunded before the block.

        An eager run runs again in place after the block (Celery's eager retry); a
        direct call ``task(...)`` blocks nothing and raises Retry at once.
        """
        settings, limiter = limiter_for(self.app)
        if self.request.called_directly:
            log.debug("zae-celery task %s called directly: a 429 blocks nothing", self.name)
            raise Retry(f"provider 429, Retry-After {retry_after}", None, when=retry_after)
        lease: Lease | None = getattr(self.request, "zae_active_lease", None)
        request = self.request
        request.zae_provider_report = None  # the block supersedes what a response said
        request.zae_provider_limited = True  # for the run log
        if lease is not None and not charged and not lease.closed:
            try:
                lease.rollback()
            except RateLimiterUnavailable as exc:
                log.warning("zae-celery could not refund an uncounted request: %s", exc)
        chosen = self._key_buckets(lease)
        for ref in chosen:
            try:
                limiter.block(ref.entity_id, ref.resource, ref.limits, retry_after)
            except RateLimiterUnavailable as exc:  # the deferral below still backs off
                log.warning("zae-celery could not block the buckets of a 429: %s", exc)
        from_task(
            self,
            PROVIDER_LIMITED,
            wait=float(retry_after),
            resource=chosen[0].resource if chosen else None,
            kind="429" if charged else "overloaded",
        )
        log_decision(
            "blocked",
            request.id,
            bucket=",".join(f"{ref.entity_id}/{ref.resource}" for ref in chosen) or None,
            wait=float(retry_after),
            cause="429" if charged else "overloaded",
        )
        if chosen and settings.admission and not request.is_eager:
            self._announce_block(chosen, limiter.clock() + retry_after)
        metrics = recorder(settings.metrics_port is not None)
        if metrics is not None:
            with quietly():
                resource = _resource_of(lease) or self.name
                metrics.provider.labels(resource, "429" if charged else "overloaded").inc()
                for ref in chosen:
                    metrics.blocks.labels(ref.resource).inc()
        if lease is not None and not lease.closed:
            lease.commit(**self._pending(lease))
        deferrals = int((self.request.headers or {}).get(HEADER_DEFERRALS) or 0)
        wait = retry_after + random.uniform(0, settings.jitter)
        said = "provider 429" if charged else "provider overloaded"
        self._defer(settings, deferrals, wait, None, f"{said}, Retry-After {retry_after}")

    def _announce_block(self, buckets: Sequence[BucketRef], until: float) -> None:
        """Tell every worker (a remote-control broadcast, no reply awaited) that
        ``buckets`` are blocked until ``until``: their consumers hold the tasks they
        admitted on them before the block. Best effort: the block in the store holds
        every new slot anyway."""
        try:
            self.app.control.broadcast(
                BLOCKED_COMMAND,
                arguments={
                    "buckets": [[ref.entity_id, ref.resource] for ref in buckets],
                    "until": until,
                },
                reply=False,
            )
        except Exception as exc:  # a broker without fanout, a lost connection
            log.warning("zae-celery could not announce a block to the workers: %s", exc)

    # -- after the body -------------------------------------------------------------------------
    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Keep the consumption on success; apply ``rate_on_error`` otherwise. Never raises."""
        lease: Lease | None = getattr(self.request, "zae_active_lease", None)
        if lease is not None:
            renewer().drop(lease)
        if lease is not None and not lease.closed:
            success = status == states.SUCCESS
            deltas = self._pending(lease)
            try:
                # A success ends in this one write: usage, the provider's report, slots.
                if self._pull_down(lease, deltas, end=success):
                    deltas = {}
            except Exception:
                log.exception("zae-celery could not apply the provider's report of %s", task_id)
            try:
                if success:
                    lease.commit(**deltas)
                else:
                    self._settle_error(lease, deltas)
            except Exception:
                log.exception("zae-celery could not settle the lease of task %s", task_id)
        self._settled(status)

    def _count_deferral(
        self, settings: Settings, lease: Lease | None, kind: str, cause: ZaeError | None
    ) -> None:
        """Metrics of a deferral: its ``kind`` of cause, and the limits that refused."""
        metrics = recorder(settings.metrics_port is not None)
        if metrics is None:
            return
        with quietly():
            resource = _resource_of(lease)
            if isinstance(cause, RateLimitExceeded):
                for v in cause.violations:
                    metrics.throttled.labels(v.resource, v.limit_name).inc()
                    resource = resource or v.resource
            metrics.deferrals.labels(resource or self.name, kind).inc()

    def _settled(self, state: str) -> None:
        """Send :data:`~zae_celery.signals.run_settled` once for this run (one that
        reached ``before_start``), and record its metrics."""
        request = self.request
        if not hasattr(request, "zae_run") or getattr(request, "zae_reported", False):
            return
        request.zae_reported = True
        lease: Lease | None = getattr(request, "zae_active_lease", None)
        if lease is not None:
            log_decision(
                "settled",
                request.id,
                bucket=_bucket_of(lease),
                state=state,
                consumed=",".join(f"{n}:{v}" for n, v in sorted(lease.consumed.items())),
                waited=float(getattr(request, "zae_waited", 0.0)),
            )
        metrics = recorder(limiter_for(self.app)[0].metrics_port is not None)
        resource = _resource_of(lease)
        if metrics is not None and lease is not None and resource is not None:
            with quietly():
                path = "admission" if getattr(request, ADMITTED, None) else "pool"
                path = "eager" if request.is_eager else path
                targets = lease.ticket().get("targets") or [{}]
                estimated = dict(targets[0].get("consume") or {})
                metrics.granted(resource, path, lease.unchecked, estimated)
                metrics.settled(resource, estimated, lease.consumed)
                if path != "admission":
                    metrics.wait.labels(resource, path).observe(getattr(request, "zae_waited", 0.0))
        run_settled.send(
            sender=self,
            task_id=request.id,
            state=state,
            lease=getattr(request, "zae_active_lease", None),
            waited=getattr(request, "zae_waited", 0.0),
            deferrals=int((request.headers or {}).get(HEADER_DEFERRALS) or 0),
        )

    def _settle_error(self, lease: Lease, reported: dict[str, int] | None = None) -> None:
        """Charge the ``reported`` usage not charged yet (:meth:`_pending`), then apply
        this run's ``rate_on_error`` (decided and validated in before_start)."""
        if reported:
            lease.adjust(**reported)
        run: _Run | None = getattr(self.request, "zae_run", None)
        policy = "keep" if run is None else run.on_error
        if policy == "keep":
            lease.commit()
        elif policy == "refund":
            lease.rollback()
        else:
            refund = {n: -v for n, v in lease.consumed.items() if n not in policy and v}
            if refund:
                lease.adjust(**refund)
            lease.commit()


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion and return its result: on a new event loop
    (``asyncio.run``), or, when this thread already runs one (an eager call from async
    code), on a new loop in a thread of its own, waited for here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False  # (run outside the handler: the task's errors chain nothing)
    else:
        running = True
    if not running:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="zae-coroutine") as runner:
        return runner.submit(asyncio.run, coro).result()


def _sync_run(run: Any) -> Any:
    """``run`` itself, or, for a coroutine function, a function that runs it to
    completion (a staticmethod stays one)."""
    fn = run.__func__ if isinstance(run, staticmethod) else run
    if not inspect.iscoroutinefunction(fn):
        return run

    @functools.wraps(fn)
    def runner(*args: Any, **kwargs: Any) -> Any:
        return run_coroutine(fn(*args, **kwargs))

    return staticmethod(runner) if isinstance(run, staticmethod) else runner


def _blocked(buckets: Sequence[BucketRef], kinds: frozenset[str]) -> list[BucketRef]:
    """The buckets of ``kinds`` among a lease's: its own (the first), its queue's (an
    extra bucket of a queue), and the rest: its cascade parents'."""
    chosen = []
    for i, ref in enumerate(buckets):
        queue = (
            i > 0
            and ref.resource == QUEUE_RESOURCE
            and ref.entity_id.startswith(QUEUE_ENTITY_PREFIX)
        )
        kind = "own" if i == 0 else "queue" if queue else "parents"
        if kind in kinds:
            chosen.append(ref)
    return chosen


def _resource_of(lease: Lease | None) -> str | None:
    """The resource of a lease's own bucket (None: no lease, or no buckets)."""
    return lease.buckets[0].resource if lease is not None and lease.buckets else None


def _bucket_of(lease: Lease | None) -> str | None:
    """``entity/resource`` of a lease's own bucket (None: no lease, or no buckets)."""
    if lease is None or not lease.buckets:
        return None
    return f"{lease.buckets[0].entity_id}/{lease.buckets[0].resource}"


def _late_tolerance(lease: Lease) -> float:
    """Seconds a counted start may be late and still start unchecked: half the task's
    own spacing on its tightest limit (cost / rate), so that a late start cannot share a
    slot with the next one; at least ``LATE_START``."""
    return max(LATE_START, lease.spacing / 2)


def _describe(exc: RateLimitExceeded) -> str:
    return ", ".join(
        f"{v.entity_id}/{v.resource}/{v.limit_name} wait {v.retry_after:.3f}s"
        for v in exc.violations
    )


def _refunds_only(lease: Lease, deltas: dict[str, int]) -> bool:
    """Are ``deltas`` refunds alone, on a lease holding no in-flight slot?"""
    return bool(deltas) and all(d <= 0 for d in deltas.values()) and not lease.caps


@task_postrun.connect(weak=False)  # type: ignore[untyped-decorator]
def _settle_after_retry(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    """A task that ends in RETRY/IGNORED/REJECTED gets no ``after_return``: settle here;
    so does an eager run whose error propagates to its caller (``task_eager_propagates``:
    no state, no ``after_return``)."""
    if not isinstance(sender, RateLimitedTask):
        return
    if state is None and sender.request.is_eager:
        state = states.RETRY if getattr(sender.request, "zae_retrying", False) else states.FAILURE
    if state is None or state not in (
        states.RETRY,
        states.IGNORED,
        states.REJECTED,
        states.FAILURE,
    ):
        return  # SUCCESS and FAILURE were settled by after_return, unless propagated
    lease: Lease | None = getattr(sender.request, "zae_active_lease", None)
    if lease is not None:
        renewer().drop(lease)
    if lease is not None and not lease.closed:
        try:
            sender._settle_error(lease, sender._pending(lease))
        except Exception:
            log.exception("zae-celery could not settle the lease of task %s", task_id)
    sender._settled(state)
