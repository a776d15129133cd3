"""Unit-testing rate-limited Celery tasks in one process: a clock the test moves, an
in-memory store wired into an app, and a ledger of what each run consumed and waited.

>>> from zae_celery.testing import TaskHarness                   # doctest: +SKIP
>>> with TaskHarness() as zae, zae.use(app):
...     result = summarize.delay("a long text")   # eager: runs here, waits on zae.clock
...     run = zae.ledger.last(result.id)
...     assert run.consumed == {"rpm": 1, "tpm": 812} and run.waited == 0.0

The pytest plugin (:mod:`zae_celery.testing.plugin`) hands one out as the ``zae``
fixture. Nothing here starts a server or touches a broker.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from zae_celery.core import Lease, RateLimiter
from zae_celery.core.stores import MemoryStore
from zae_celery.settings import Settings
from zae_celery.signals import run_settled

__all__ = ["T0", "ManualClock", "TaskHarness", "TaskLedger", "TaskRun", "use_limiter"]

T0 = 1_800_000_000.0
"""Where a :class:`ManualClock` starts unless told otherwise (2027-01-15, UTC)."""


class ManualClock:
    """A clock that moves only when told: ``advance(seconds)``, or ``sleep(seconds)``
    (what a limiter built with ``sleep=clock.sleep`` does when it waits, so a wait for a
    slot takes no wall time). Counts whole milliseconds, so advances never drift.

    Call it for the time (seconds since the epoch), like ``time.time``.
    """

    def __init__(self, start: float = T0) -> None:
        self.ms = round(start * 1000)
        self.slept = 0.0
        """Seconds passed to :meth:`sleep` so far."""

    def __call__(self) -> float:
        # Mid-millisecond, so that the engine's floor to whole milliseconds is exact.
        return (self.ms + 0.5) / 1000

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead (rounded to the millisecond); a negative
        value moves it back, as a host's clock may be set back (clock-skew tests)."""
        self.ms += round(seconds * 1000)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without waiting: move the clock instead."""
        self.slept += max(0.0, seconds)
        self.advance(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        """:meth:`sleep` for an :class:`~zae_celery.AsyncRateLimiter`."""
        self.sleep(seconds)


@dataclass(frozen=True)
class TaskRun:
    """One run of a rate-limited task, as :data:`~zae_celery.signals.run_settled`
    reported it."""

    task_id: str
    task: str
    """The task's name."""
    state: str
    """``SUCCESS``, ``FAILURE``, ``RETRY`` (deferred, or retried), ``IGNORED``..."""
    entity_id: str | None
    resource: str | None
    consumed: Mapping[str, int]
    """What the run kept, per limit (after ``report_usage`` and ``rate_on_error``);
    empty when it held no lease."""
    waited: float
    """Seconds it waited in place for its slot (on the limiter's clock)."""
    deferrals: int
    """Deferrals of the task before this run."""
    leased: bool
    """False when it ran without a lease (no limits, or ``zae_eager="admit"``)."""
    unchecked: bool
    """True when its lease was granted without the store (``zae_on_unavailable="open"``)."""


class TaskLedger:
    """Records every :class:`TaskRun` of this process while it is open (a context
    manager, or :meth:`open`/:meth:`close`)."""

    def __init__(self) -> None:
        self.runs: list[TaskRun] = []

    def _record(
        self,
        sender: Any = None,
        task_id: str = "",
        state: str = "",
        lease: Lease | None = None,
        waited: float = 0.0,
        deferrals: int = 0,
        **_: Any,
    ) -> None:
        own = lease.buckets[0] if lease is not None and lease.buckets else None
        self.runs.append(
            TaskRun(
                task_id=task_id,
                task=str(getattr(sender, "name", "")),
                state=state,
                entity_id=own.entity_id if own else None,
                resource=own.resource if own else None,
                consumed={n: v for n, v in (lease.consumed if lease else {}).items() if v},
                waited=waited,
                deferrals=deferrals,
                leased=lease is not None,
                unchecked=lease is not None and lease.unchecked,
            )
        )

    def open(self) -> TaskLedger:
        """Start recording."""
        run_settled.connect(self._record, weak=False)
        return self

    def close(self) -> None:
        """Stop recording (what was recorded stays)."""
        run_settled.disconnect(self._record)

    def __enter__(self) -> TaskLedger:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def of(self, task_id: str) -> list[TaskRun]:
        """Every run of one task id, in order (a task deferred and run again has more)."""
        return [run for run in self.runs if run.task_id == task_id]

    def last(self, task_id: str) -> TaskRun:
        """The last run of a task id; LookupError when it never ran."""
        runs = self.of(task_id)
        if not runs:
            known = ", ".join(sorted({r.task_id for r in self.runs})) or "none"
            raise LookupError(f"no run of task {task_id} was recorded (recorded: {known})")
        return runs[-1]

    def consumed(
        self, limit: str, entity_id: str | None = None, resource: str | None = None
    ) -> int:
        """Tokens of ``limit`` kept by all recorded runs (of one entity and resource)."""
        return sum(
            run.consumed.get(limit, 0)
            for run in self.runs
            if (entity_id is None or run.entity_id == entity_id)
            and (resource is None or run.resource == resource)
        )

    def waited(self, task_id: str | None = None) -> float:
        """Seconds waited in place by every recorded run (of one task id)."""
        return sum(run.waited for run in self.runs if task_id in (None, run.task_id))


_STORE_SETTINGS = ("zae_store_url", "zae_table_name", "zae_endpoint_url", "zae_region")


@contextmanager
def use_limiter(app: Any, limiter: RateLimiter, **conf: Any) -> Iterator[Settings]:
    """Run ``app``'s rate-limited tasks in this process on ``limiter`` (e.g. one on a
    :class:`MemoryStore` with a :class:`ManualClock`), with ``conf`` (Celery and ``zae_``
    settings such as ``task_always_eager=True``) set for the block; everything is put
    back when it ends. Yields the app's settings as the tasks see them.

    The app's own store settings are set aside for the block (its store URL becomes a
    ``memory://`` name of its own, so the settings validate); worker processes are not
    affected: this is for eager runs, direct calls and ``apply()``.
    """
    from zae_celery.task import _installed_limiter

    overrides: dict[str, Any] = {
        "zae_store_url": f"memory://zae-test-{uuid.uuid4().hex[:8]}",
        "zae_table_name": None,
        "zae_endpoint_url": None,
        "zae_region": None,
        **conf,
    }
    saved = {key: app.conf.get(key) for key in overrides}
    app.conf.update(overrides)
    try:
        settings = Settings.from_app(app)
        with _installed_limiter(app, settings, limiter):
            yield settings
    finally:
        app.conf.update(saved)


class TaskHarness:
    """A clock, an in-memory store, a limiter on both and a ledger, for tests of
    rate-limited tasks (the ``zae`` fixture of the pytest plugin).

    Args:
        start: where :attr:`clock` starts (seconds since the epoch).
        limiter_options: keyword arguments of :class:`~zae_celery.RateLimiter`
            (``on_unavailable="open"``, ``stored_config``...).
    """

    def __init__(self, start: float = T0, **limiter_options: Any) -> None:
        self.clock = ManualClock(start)
        self.store = MemoryStore(clock=self.clock)
        self.limiter = RateLimiter(
            store=self.store, clock=self.clock, sleep=self.clock.sleep, **limiter_options
        )
        self.ledger = TaskLedger()

    @contextmanager
    def use(self, app: Any, eager: bool = True, **conf: Any) -> Iterator[Any]:
        """Run ``app``'s rate-limited tasks on this harness for the block, in this
        process; with ``eager`` (the default) ``delay()`` runs them here and raises their
        errors (``task_always_eager``, ``task_eager_propagates``). ``conf``: further
        settings for the block, e.g. ``zae_eager="admit"``. Yields the app."""
        if eager:
            conf = {"task_always_eager": True, "task_eager_propagates": True, **conf}
        with use_limiter(app, self.limiter, **conf):
            yield app

    def __enter__(self) -> TaskHarness:
        self.ledger.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.ledger.close()
