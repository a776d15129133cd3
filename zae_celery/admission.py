"""Admission at dequeue: a throttled task waits in the broker, not in a republish loop.

The worker's consumer (its main process) decides when a rate-limited task may go to the
pool, the way Celery's own ``rate_limit`` does with its per-worker bucket, but against
the shared buckets:

* A message of a :class:`~zae_celery.RateLimitedTask` is not handed to the pool when it
  arrives. It joins the *line* of its buckets (entity, resource and queue limits).
* A line asks the store for a slot only when one of this worker's pool processes is free
  for it and its last slot is at most ``zae_admission_window`` seconds ahead. The request
  (one conditional write, made on a background thread so the consumer's event loop never
  waits for the store) counts the task's quota and its start at the slot together.
* At the slot a timer hands the task to the pool, carrying its lease; the pool process
  runs the body without another request. A task that reaches a pool process more than
  :data:`LATE_START` after its slot (a busy pool) counts a fresh start instead.
* Held messages are not counted against the prefetch window, so the worker's other queues
  keep flowing; a queue with ``zae_admission_hold`` messages held is paused
  (``basic.cancel``) until half of them are gone. Everything else stays in the broker,
  acknowledged by nobody and charged to nobody.

A task that cannot be admitted (bad options, no limits, the store unreachable, a
reservation it already carries) goes to the pool as before, where ``before_start``
decides: the pool path is the fallback, so nothing is lost when admission cannot decide.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery.exceptions import ImproperlyConfigured
from celery.signals import worker_shutting_down
from celery.worker import state as worker_state
from celery.worker.control import control_command
from celery.worker.strategy import default as default_strategy

from zae_celery.core import RateLimitExceeded, ZaeError
from zae_celery.decisions import log_decision
from zae_celery.events import THROTTLED, from_consumer
from zae_celery.metrics import quietly, recorder
from zae_celery.queues import ConsumedQueues, limit_key
from zae_celery.settings import MAX_HORIZON

if TYPE_CHECKING:
    from zae_celery.core import Lease, RateLimiter
    from zae_celery.settings import Settings
    from zae_celery.task import RateLimitedTask, _Spec

__all__ = ["ADMITTED", "BLOCKED_COMMAND", "LATE_START", "Admission", "admission_strategy"]

log = logging.getLogger("zae_celery.admission")

ADMITTED = "zae_admitted"
"""Request field (not a message header): the lease the consumer took for the task."""
ADMISSION_WAIT = "zae_admission_wait"
"""Request field: seconds the consumer held the task for its slot (the run log's wait)."""
LATE_START = 0.05
"""Seconds after its counted slot beyond which an admitted task counts a fresh start
(or half its own spacing on its tightest limit, when that is longer)."""
DISPATCH_LEAD = 0.02
"""Seconds before its slot an admitted task is handed to the pool (it waits there for the
slot), so that the pool's own dispatch does not make it late."""
LOOKAHEAD = 2
"""Slots a worker may hold per pool process (running or waiting for its slot) while the
buckets set the pace."""
TICK = 0.02
"""Seconds between two looks at the lines that wait for a free process or their time."""
BLOCKED_COMMAND = "zae_blocked"
"""The remote-control command a provider's 429 broadcasts to every worker: hold the tasks
admitted on the blocked buckets until the block ends (see :meth:`Admission.blocked`)."""


@control_command(  # type: ignore[untyped-decorator]
    name=BLOCKED_COMMAND,
    args=[("buckets", list), ("until", float)],
    signature="<[[entity, resource], ...]> <until (epoch seconds)>",
)
def zae_blocked(state: Any, buckets: list[Any], until: float, **kwargs: Any) -> dict[str, str]:
    """A provider's 429 blocked ``buckets`` until ``until``: this worker holds the tasks
    it admitted on them (slots taken before the block) until then."""
    admission: Admission | None = getattr(state.consumer, "_zae_admission", None)
    if admission is not None:
        admission.blocked(buckets, until)
    return {"ok": "held"}


def admission_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """The consumer strategy of :class:`~zae_celery.RateLimitedTask` (its ``Strategy``).

    Celery's default strategy does everything (revocation, events, ETA); its rate-limit
    hooks are pointed at this worker's :class:`Admission`, which tells each request the
    queue it came from (:data:`zae_celery.queues.QUEUE`). With ``zae_admission=False`` it
    is Celery's default strategy with only that annotation; with settings that cannot be
    read, Celery's default strategy unchanged (the pool then reports the settings error
    on every task).
    """
    from zae_celery.task import limiter_for

    try:
        settings, limiter = limiter_for(app)
    except ZaeError as exc:
        log.error("zae-celery admission is off for %s: %s", task.name, exc)
        return default_strategy(task, app, consumer, **kwargs)
    if not settings.admission:
        return default_strategy(task, app, _Annotating(consumer), **kwargs)
    if getattr(consumer.pool, "is_green", False):
        raise ImproperlyConfigured(
            f"zae_admission is not supported on the {type(consumer.pool).__name__} pool "
            "(green threads): set app.conf.zae_admission = False to gate rate-limited "
            "tasks in the pool instead, or use the prefork, threads or solo pool"
        )
    admission = Admission.of(consumer, settings, limiter)
    return default_strategy(task, app, _ConsumerView(consumer, admission), **kwargs)


class _Buckets:
    """``consumer.task_buckets`` as the strategy sees it: every task is "rate limited"."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def __getitem__(self, name: str) -> Admission:
        return self._admission


def _arrived(queues: ConsumedQueues, request: Any) -> str | None:
    """A message has reached the consumer: its request forgets any lease it carries
    (custom fields travel as headers when a task is republished, by a retry or a
    deferral: a lease from the broker was granted to an earlier run, not this one) and
    is told the queue it came from, which is returned (None: not known here)."""
    request.request_dict.pop(ADMITTED, None)
    request.request_dict.pop(ADMISSION_WAIT, None)
    return queues.annotate(request)


class _Annotating:
    """The consumer, telling each request the queue it came from before it goes on
    (``zae_admission=False``: every request reaches the pool through these two)."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self._queues = ConsumedQueues.of(consumer)

    def on_task_request(self, request: Any) -> None:
        _arrived(self._queues, request)
        self._consumer.on_task_request(request)

    def apply_eta_task(self, request: Any) -> None:
        _arrived(self._queues, request)
        self._consumer.apply_eta_task(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _ConsumerView:
    """The consumer, with Celery's rate-limit hooks leading to the admission."""

    def __init__(self, consumer: Any, admission: Admission) -> None:
        self._consumer = consumer
        self.disable_rate_limits = False
        self.task_buckets = _Buckets(admission)
        self._limit_task = admission.admit
        self._limit_post_eta = admission.admit_after_eta

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


@dataclass
class _Held:
    request: Any
    spec: _Spec
    queue: str | None
    since: float


@dataclass
class _Line:
    """The held messages of one set of buckets, in arrival order."""

    pending: deque[_Held] = field(default_factory=deque)
    busy: bool = False
    """A request for the head's slot is with the store."""
    not_before: float = 0.0
    """Monotonic time before which the head does not ask (its slot would be too far)."""
    saturated: bool = False
    """Its last slot lay ahead when granted: the buckets, not the pool, set the pace."""


class Admission:
    """One worker's admission of rate-limited tasks (see the module's docstring).

    State is touched by the consumer's thread, by the timer's (pools without an event
    loop) and by results coming back from the store's thread: one lock guards it.
    """

    def __init__(self, consumer: Any, settings: Settings, limiter: RateLimiter) -> None:
        self.consumer = consumer
        self.settings = settings
        self.limiter = limiter
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zae-admission")
        self._loop_thread = threading.get_ident()
        self._task_consumer: Any = None
        self._queues = ConsumedQueues.of(consumer)
        self._generation = 0
        self._lines: dict[tuple[Any, ...], _Line] = {}
        self._held: dict[str, int] = {}
        self._paused: dict[str, Any] = {}
        self._waiting = 0  # granted, not yet handed to the pool
        self._leases: dict[int, Lease] = {}  # id(request) -> lease, until handed over
        self._blocks: dict[tuple[str, str], float] = {}  # (entity, resource) -> until
        self._ticking = False
        self._closed = False
        worker_shutting_down.connect(self._on_shutdown, weak=False)
        self._executor.submit(self._warm_up)

    def _warm_up(self) -> None:
        """The first slot should not wait for the client and the schema check."""
        try:
            self.limiter.warm_up()
        except Exception as exc:  # the first admission reports it, or the pool does
            log.warning("zae-celery could not reach the rate limiter's table yet: %s", exc)

    @classmethod
    def of(cls, consumer: Any, settings: Settings, limiter: RateLimiter) -> Admission:
        """The consumer's admission, created on first use; reset when the consumer has
        reconnected (held messages belong to the old channel: the broker redelivers
        them)."""
        admission: Admission | None = getattr(consumer, "_zae_admission", None)
        if admission is None:
            admission = cls(consumer, settings, limiter)
            consumer._zae_admission = admission
        else:
            admission._bind(None)  # strategies are made anew when the consumer restarts
        return admission

    def __bool__(self) -> bool:
        return True

    # -- arrival -----------------------------------------------------------------------------
    def admit(self, request: Any, bucket: Any = None, tokens: int = 1) -> None:
        """A message arrived (Celery's ``_limit_task`` hook): hold it in its line."""
        from zae_celery.task import HEADER_LEASE

        queue = _arrived(self._queues, request)  # None: not known here (see limit_key)
        task: RateLimitedTask = request.task
        queue_key = limit_key(task.app, queue, request.delivery_info)
        if request.request_dict.get(HEADER_LEASE) or not getattr(task, "_spec", None):
            self._to_pool(request)  # it carries a reservation: the pool starts it
            return
        try:
            spec = task._spec(self.settings, request.args, request.kwargs, queue_key)
        except (ZaeError, TypeError, ValueError):
            spec = None  # the pool runs the same code and fails the task with the error
        if spec is None:  # bad options, or no limits apply
            self._to_pool(request)
            return
        with self._lock:
            # The task consumer is created after the strategies: bind to it on first use.
            self._bind(self.consumer.task_consumer)
            self._hold(queue)
            key = (spec.entity_id, spec.resource, tuple(e[0] for e in spec.extra))
            line = self._lines.setdefault(key, _Line())
            line.pending.append(_Held(request, spec, queue, time.monotonic()))
            self._pump(line)
            self._ensure_ticking()

    def admit_after_eta(self, request: Any, bucket: Any = None, tokens: int = 1) -> None:
        """An ETA/countdown message is due (Celery's ``_limit_post_eta`` hook)."""
        self.consumer.qos.decrement_eventually()
        self.admit(request, bucket, tokens)

    # -- asking for slots -------------------------------------------------------------------
    def _free_processes(self, line: _Line) -> int:
        """Slots this worker may still ask for the line: one per pool process (tasks
        running or waiting for their slot count), and twice that while the line's slots
        lie ahead (the buckets bind, not the pool), so that a process that ends a task
        finds the next one's slot already taken. A task whose slot comes while every
        process is busy starts late, and counts a fresh start."""
        pool = self.consumer.pool
        size = getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1
        allowed = int(size) * (LOOKAHEAD if line.saturated else 1)
        return allowed - len(worker_state.reserved_requests) - self._waiting

    def _pump(self, line: _Line) -> None:
        """Ask for the head's slot when a process is free and the line's time has come."""
        if line.busy or not line.pending or self._closed:
            return
        if time.monotonic() < line.not_before or self._free_processes(line) <= 0:
            return
        head = line.pending[0]
        line.busy = True
        self._waiting += 1
        generation = self._generation
        self._executor.submit(self._ask, line, head, generation)

    def _ask(self, line: _Line, head: _Held, generation: int) -> None:
        """On the store's thread: one acquire, its result posted back to the consumer."""
        spec = head.spec
        horizon = self._horizon(head)
        outcome: Any
        try:
            outcome = spec.acquire(self.limiter, horizon, horizon)
        except ZaeError as exc:  # refused, unavailable, bad input: decided in _answered
            outcome = exc
        except Exception as exc:  # never lose the message: the pool path decides
            log.exception("zae-celery admission request failed")
            outcome = exc
        self._post(self._answered, line, head, generation, outcome)

    def _horizon(self, head: _Held) -> float:
        """How far ahead an admission may reserve: the task's horizon, or as long as a
        message may be held (the consumer, not a countdown message, waits for the slot).

        A line asks only when its last slot is ``zae_admission_window`` ahead, so slots
        land far ahead only when the buckets really are that far in debt; a short write
        horizon would instead refuse every request of a worker whose view is a few
        grants old (other workers' grants), at one wasted request each.
        """
        task_horizon = head.spec.run.horizon  # rate_horizon, else zae_horizon
        return min(MAX_HORIZON, max(task_horizon, self.settings.admission_max_hold))

    def _answered(self, line: _Line, head: _Held, generation: int, outcome: Any) -> None:
        with self._lock:
            if generation != self._generation:  # the consumer reconnected meanwhile
                if not isinstance(outcome, BaseException):
                    self._executor.submit(self._refund, outcome)  # not on the event loop
                return
            line.busy = False
            self._waiting -= 1
            now = time.monotonic()
            if isinstance(outcome, RateLimitExceeded):
                v = outcome.violations[0] if outcome.violations else None
                log_decision(
                    "refused",
                    head.request.id,
                    bucket=f"{v.entity_id}/{v.resource}" if v else None,
                    limit=v.limit_name if v else None,
                    wait=float(outcome.retry_after),
                    path="admission",
                )
                from_consumer(
                    self.consumer,
                    THROTTLED,
                    head.request.id,
                    wait=float(outcome.retry_after),
                    resource=v.resource if v else head.spec.resource,
                    limit=v.limit_name if v else None,
                    path="admission",
                    cause="slot",
                )
                metrics = recorder(self.settings.metrics_port is not None)
                if metrics is not None:
                    with quietly():
                        for v in outcome.violations:
                            metrics.throttled.labels(v.resource, v.limit_name).inc()
                # Its slot lies beyond the horizon (a long provider block, a deep debt):
                # ask again when it comes within the window; past zae_admission_max_hold
                # the pool defers it instead (the broker's redelivery timers).
                if now - head.since > self.settings.admission_max_hold:
                    line.pending.popleft()
                    self._unhold(head.queue)
                    self._to_pool(head.request)
                else:
                    wait = outcome.retry_after - self._horizon(head)
                    line.not_before = now + max(TICK, wait)
                self._pump(line)
                return
            line.pending.popleft()
            if isinstance(outcome, BaseException):
                # Unavailable store, bad input: the pool path decides (defers with the
                # outage counter, or fails the task with the error).
                self._unhold(head.queue)
                self._to_pool(head.request)
                self._pump(line)
                return
            lease = outcome
            slot = lease.started_at if lease.started_at is not None else lease.start_at
            ahead = slot - time.time()
            line.not_before = now + ahead - self.settings.admission_window
            line.saturated = ahead > DISPATCH_LEAD
            head.request.request_dict[ADMITTED] = lease.ticket()
            log.info(
                "zae-celery admitted task %s (%s): slot in %.3f s",
                head.request.id,
                head.request.name,
                max(0.0, ahead),
            )
            if ahead > DISPATCH_LEAD:  # it waits for its slot, held here
                from_consumer(
                    self.consumer,
                    THROTTLED,
                    head.request.id,
                    wait=float(ahead),
                    resource=head.spec.resource,
                    path="admission",
                    cause="slot",
                )
            log_decision(
                "admitted",
                head.request.id,
                bucket=f"{head.spec.entity_id}/{head.spec.resource}",
                wait=float(max(0.0, ahead)),
                path="admission",
            )
            self._waiting += 1
            self._leases[id(head.request)] = lease
            self.consumer.timer.call_after(
                max(0.0, ahead - DISPATCH_LEAD), self._release, (head, generation)
            )
            self._pump(line)

    def blocked(self, buckets: Any, until: float) -> None:
        """A provider's 429 blocked ``buckets`` (``[[entity, resource], ...]``) until
        ``until`` (epoch seconds; broadcast by the task that met it). Tasks admitted on
        them before the block, whose slots fall inside it, are handed to the pool only
        when it ends; their counted start has passed by then, so the pool counts a
        fresh one on the blocked start track (see the module's docstring). New slots
        need no hint: the buckets themselves are blocked."""
        now = time.time()
        with self._lock:
            for old in [k for k, end in self._blocks.items() if end <= now]:
                del self._blocks[old]
            try:
                pairs = [(str(e), str(r)) for e, r in buckets]
                end = float(until)
            except (TypeError, ValueError):
                log.warning("zae-celery ignored a malformed %s command", BLOCKED_COMMAND)
                return
            for pair in pairs:
                self._blocks[pair] = max(self._blocks.get(pair, 0.0), end)

    def _held_back(self, head: _Held) -> float:
        """Seconds until the latest block over the admitted task's buckets ends (0: none)."""
        lease = self._leases.get(id(head.request))
        if lease is None or not self._blocks:
            return 0.0
        ends = [self._blocks.get((b.entity_id, b.resource), 0.0) for b in lease.buckets]
        return max(0.0, max(ends, default=0.0) - time.time())

    def _release(self, head: _Held, generation: int) -> None:
        """The slot has come: hand the task to the pool (after a block over its buckets
        that a provider's 429 announced, if one lasts longer)."""
        with self._lock:
            if generation != self._generation:
                return
            if self.consumer.task_consumer is not self._task_consumer:
                self._bind(self.consumer.task_consumer)  # its channel is gone: drop it
                return
            hold = self._held_back(head)
            if hold > 0:
                self.consumer.timer.call_after(hold, self._release, (head, generation))
                return
            self._waiting -= 1
            self._leases.pop(id(head.request), None)
            self._unhold(head.queue)
        waited = time.monotonic() - head.since
        head.request.request_dict[ADMISSION_WAIT] = round(waited, 3)  # for the run log
        metrics = recorder(self.settings.metrics_port is not None)
        if metrics is not None:
            with quietly():
                metrics.wait.labels(head.spec.resource, "admission").observe(waited)
        self._to_pool(head.request)
        self._tick()

    def _tick(self) -> None:
        """Lines waiting for a free process or for their time: ask when they may."""
        with self._lock:
            for line in self._lines.values():
                self._pump(line)
            for key in [k for k, line in self._lines.items() if not line.pending and not line.busy]:
                del self._lines[key]

    def _ensure_ticking(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.consumer.timer.call_repeatedly(TICK, self._tick)

    # -- the prefetch window and pausing ----------------------------------------------------
    def _hold(self, queue: str | None) -> None:
        """A message is held: the prefetch window grows by one for it (other queues keep
        flowing), and its queue pauses when it holds ``zae_admission_hold``."""
        if queue is None:
            return  # unknown queue: the held message counts against prefetch instead
        self.consumer.qos.increment_eventually()
        held = self._held[queue] = self._held.get(queue, 0) + 1
        if held >= self.settings.admission_hold and queue not in self._paused:
            self._on_loop(self._pause, queue, self._generation)

    def _unhold(self, queue: str | None) -> None:
        if queue is None:
            return
        self.consumer.qos.decrement_eventually()
        held = self._held[queue] = self._held.get(queue, 1) - 1
        if queue in self._paused and held <= self.settings.admission_hold // 2:
            self._on_loop(self._resume, queue, self._generation)

    def _pause(self, queue: str, generation: int) -> None:
        with self._lock:
            tc = self._task_consumer
            if generation != self._generation or tc is None or queue in self._paused:
                return
            found = next((q for q in tc.queues if q.name == queue), None)
            if found is None:
                return
            self._paused[queue] = found
        log.debug("zae-celery pauses queue %s (%d held)", queue, self._held.get(queue, 0))
        tc.cancel_by_queue(queue)

    def _resume(self, queue: str, generation: int) -> None:
        with self._lock:
            tc = self._task_consumer
            if generation != self._generation or tc is None:
                return
            found = self._paused.pop(queue, None)
            if found is None:
                return
        log.debug("zae-celery resumes queue %s", queue)
        tc.add_queue(found)
        tc.consume()

    # -- plumbing ------------------------------------------------------------------------------
    def _to_pool(self, request: Any) -> None:
        self.consumer._limit_move_to_pool(request)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the consumer's side (from the store's thread)."""
        hub = getattr(self.consumer, "hub", None)
        if hub is not None:
            hub.call_soon(fn, *args)
        else:
            self.consumer.timer.call_after(0, fn, args)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the thread that owns the broker connection."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self.consumer.call_soon(fn, *args)

    def _bind(self, task_consumer: Any) -> None:
        """Held messages belong to the task consumer's channel: when that changes (a
        reconnection), they are forgotten (the broker redelivers them) and their slots
        refunded."""
        with self._lock:
            if task_consumer is self._task_consumer:
                return
            if self._task_consumer is not None:
                for lease in self._reset():
                    self._executor.submit(self._refund, lease)
            self._task_consumer = task_consumer

    def _reset(self) -> list[Lease]:
        """Forget held messages (their channel is gone); return their reservations."""
        self._generation += 1
        leases = list(self._leases.values())
        self._leases.clear()
        self._lines.clear()
        self._held.clear()
        self._paused.clear()
        self._waiting = 0
        return leases

    def _refund(self, lease: Lease) -> None:
        try:
            lease.rollback()
        except Exception as exc:  # best effort: the quota is charged, never over-granted
            log.warning("zae-celery could not refund a held reservation: %s", exc)

    def _on_shutdown(self, **_: Any) -> None:
        """Warm shutdown: held messages go back to the broker; refund their slots."""
        with self._lock:
            self._closed = True
            leases = self._reset()
        for lease in leases:
            self._refund(lease)
