"""Rate-limited tasks run in one process, as users test them: eager runs (``.delay()``
under ``task_always_eager``, ``.apply()``), direct calls, ``async def`` task functions,
``report_usage`` on an unchecked lease (open mode during an outage), and the ledger of
what each run consumed and waited.

Everything runs on :class:`~zae_celery.testing.TaskHarness`: an in-memory store and a
:class:`~zae_celery.testing.ManualClock` that the limiter's waits move (no wall time).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry

from zae_celery import (
    DeferralsExhausted,
    Limit,
    RateLimitedTask,
    RateLimitExceeded,
    ValidationError,
)
from zae_celery.core import RateLimiterUnavailable
from zae_celery.testing import TaskHarness

RPM = Limit.per_minute("rpm", 2)  # a bucket of 2, one more every 30 s
TPM = Limit.per_minute("tpm", 1000)


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Celery:
    """An app whose every publish fails the test: nothing here may reach a broker."""
    app = Celery(f"local-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(zae_table_name="never-used", zae_jitter=0)

    def no_publish(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a local run published a message: {args} {kwargs}")

    monkeypatch.setattr(app.amqp, "send_task_message", no_publish)
    return app


def define(app: Celery, body: Any = None, **options: Any) -> Any:
    """A RateLimitedTask (bound) on rpm and tpm whose body calls ``body(self, *args)``."""

    def run(self: Any, *args: Any) -> Any:
        return body(self, *args) if body is not None else "done"

    task = app.task(
        base=RateLimitedTask,
        bind=True,
        shared=False,
        name=f"local.{uuid.uuid4().hex[:8]}",
        **{
            "rate_limits": [RPM, TPM],
            "rate_entity": "tenant-1",
            "rate_resource": "gpt",
            "rate_consume": {"rpm": 1, "tpm": 300},
            **options,
        },
    )(run)
    return app.tasks[task.name]


def charged(zae: TaskHarness) -> dict[str, float]:
    """Tokens in use per limit of the test's bucket (what the store holds)."""
    available = zae.limiter.available("tenant-1", "gpt", [RPM, TPM])
    return {"rpm": RPM.capacity - available["rpm"], "tpm": TPM.capacity - available["tpm"]}


# -- eager runs --------------------------------------------------------------------------
def test_an_eager_task_waits_in_place_for_its_slot_and_runs_once(
    zae: TaskHarness, app: Celery
) -> None:
    bodies: list[float] = []
    task = define(app, body=lambda self: bodies.append(zae.clock()))
    with zae.use(app):
        ids = [task.delay().id for _ in range(3)]  # the third waits for the rpm refill
    assert len(bodies) == 3  # each body once: no recursion, no republish
    first, second, third = (zae.ledger.last(i) for i in ids)
    assert (first.waited, second.waited) == (0.0, 0.0)
    assert third.waited == pytest.approx(30.0, abs=0.002)  # 60 s / 2 per token
    assert bodies[2] - bodies[0] == pytest.approx(30.0, abs=0.002)
    assert [r.state for r in (first, second, third)] == ["SUCCESS"] * 3
    assert third.consumed == {"rpm": 1, "tpm": 300} and third.deferrals == 0
    assert zae.ledger.consumed("tpm", "tenant-1", "gpt") == 900


def test_apply_without_eager_mode_waits_in_place_too(zae: TaskHarness, app: Celery) -> None:
    task = define(app)
    with zae.use(app, eager=False):
        results = [task.apply() for _ in range(3)]
    assert [r.get() for r in results] == ["done"] * 3
    assert zae.ledger.waited() == pytest.approx(30.0, abs=0.002)
    assert zae.clock.slept == pytest.approx(30.0, abs=0.002)


def test_an_eager_task_beyond_its_horizon_fails_and_consumes_nothing(
    zae: TaskHarness, app: Celery
) -> None:
    task = define(app, rate_horizon=10)  # the next slot is 30 s away
    with zae.use(app):
        task.delay()
        task.delay()
        before = charged(zae)
        with pytest.raises(RateLimitExceeded) as info:
            task.delay()
    assert info.value.retry_after == pytest.approx(30.0, abs=0.002)
    assert charged(zae) == before
    assert zae.clock.slept == 0


def test_an_eager_refusal_is_the_tasks_result_when_errors_do_not_propagate(
    zae: TaskHarness, app: Celery
) -> None:
    task = define(app, rate_horizon=0)
    with zae.use(app, task_eager_propagates=False):
        assert task.delay().state == "SUCCESS"
        assert task.delay().state == "SUCCESS"
        result = task.delay()
    assert result.state == "FAILURE"
    assert isinstance(result.result, RateLimitExceeded)
    assert zae.ledger.last(result.id).state == "FAILURE"


def test_eager_admit_runs_a_refused_task_at_once_without_a_lease(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task = define(app, body=lambda self: self.report_usage(tpm=250), rate_horizon=0)
    with zae.use(app, zae_eager="admit"), caplog.at_level(logging.WARNING, "zae_celery"):
        ids = [task.delay().id for _ in range(3)]
    runs = [zae.ledger.last(i) for i in ids]
    assert [r.leased for r in runs] == [True, True, False]
    assert runs[2].consumed == {} and runs[2].state == "SUCCESS"
    assert charged(zae) == pytest.approx({"rpm": 2, "tpm": 500}, abs=0.01)  # 2 reports
    assert "without a lease (zae_eager='admit')" in caplog.text
    assert zae.clock.slept == 0


def test_a_429_in_an_eager_run_blocks_the_bucket_and_raises_retry_to_the_caller(
    zae: TaskHarness, app: Celery
) -> None:
    task = define(app, body=lambda self: self.provider_limited(20.0))
    with zae.use(app), pytest.raises(Retry):  # Celery's eager retry, errors propagating
        task.delay()
    (run,) = zae.ledger.runs
    assert run.state == "RETRY" and run.consumed == {"rpm": 1, "tpm": 300}  # kept
    # No token before 20 s from now, in every limit of the bucket.
    assert zae.limiter.available("tenant-1", "gpt", [RPM, TPM]) == pytest.approx(
        {"rpm": -(20 / 60) * 2, "tpm": -(20 / 60) * 1000}, abs=0.01
    )


def test_a_429_in_an_eager_run_runs_it_again_after_the_block(zae: TaskHarness, app: Celery) -> None:
    answers = [429, 200]

    def call(self: Any) -> str:
        if answers.pop(0) == 429:
            self.provider_limited(20.0)
        return "answered"

    task = define(app, body=call)
    with zae.use(app, task_eager_propagates=False):
        result = task.delay()
    assert result.get() == "answered"
    first, second = zae.ledger.of(result.id)
    assert (first.state, second.state) == ("RETRY", "SUCCESS")
    assert second.deferrals == 1
    # Waited in place: the block, then one rpm token (60 s / 2).
    assert second.waited == pytest.approx(20.0 + 30.0, abs=0.002)


def test_a_provider_that_keeps_refusing_an_eager_run_ends_it(zae: TaskHarness, app: Celery) -> None:
    task = define(app, body=lambda self: self.provider_limited(1.0), rate_max_deferrals=3)
    with zae.use(app, task_eager_propagates=False):
        result = task.delay()
    assert isinstance(result.result, DeferralsExhausted), repr(result.result)
    assert "rate_max_deferrals=3" in str(result.result)
    assert [r.state for r in zae.ledger.runs] == ["RETRY"] * 3 + ["FAILURE"]


# -- direct calls ------------------------------------------------------------------------
def test_a_direct_call_runs_the_body_without_a_lease(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task = define(app, body=lambda self, n: self.report_usage(tpm=n) or n * 2)
    with zae.use(app), caplog.at_level(logging.DEBUG, "zae_celery"):
        assert task(21) == 42
    assert "holds no lease: usage {'tpm': 21} not charged" in caplog.text
    assert charged(zae) == {"rpm": 0, "tpm": 0}
    assert zae.ledger.runs == []  # no gate, no run reported


def test_a_direct_call_still_checks_the_reported_values(zae: TaskHarness, app: Celery) -> None:
    task = define(app, body=lambda self: self.report_usage(tpm=-1))
    with zae.use(app), pytest.raises(ValidationError, match=r"report_usage\.tpm"):
        task()


def test_a_429_in_a_direct_call_blocks_nothing(zae: TaskHarness, app: Celery) -> None:
    task = define(app, body=lambda self: self.provider_limited(30))
    with zae.use(app), pytest.raises(Retry):
        task()
    assert charged(zae) == {"rpm": 0, "tpm": 0}


# -- async def task functions -----------------------------------------------------------
def test_an_async_task_function_runs_to_completion_with_its_lease(
    zae: TaskHarness, app: Celery
) -> None:
    seen: list[Any] = []

    @app.task(
        base=RateLimitedTask,
        bind=True,
        shared=False,
        name=f"local.{uuid.uuid4().hex[:8]}",
        rate_limits=[RPM, TPM],
        rate_entity="tenant-1",
        rate_resource="gpt",
        rate_consume={"rpm": 1, "tpm": 300},
    )
    async def summarize(self: Any, text: str) -> str:
        lease = self.request.zae_active_lease if not self.request.called_directly else None
        seen.append(lease and dict(lease.consumed))  # held while the coroutine runs
        await asyncio.sleep(0)
        self.report_usage(tpm=len(text))
        return text.upper()

    with zae.use(app):
        result = summarize.delay("abc")
        assert summarize("direct") == "DIRECT"  # a direct call runs it too
    assert result.get() == "ABC"
    assert seen == [{"rpm": 1, "tpm": 300}, None]
    assert zae.ledger.last(result.id).consumed == {"rpm": 1, "tpm": 3}


def test_an_async_task_called_from_a_running_event_loop_completes(
    zae: TaskHarness, app: Celery
) -> None:
    class Fetch(RateLimitedTask):
        name = f"local.{uuid.uuid4().hex[:8]}"
        rate_limits = (RPM,)

        async def run(self, n: int) -> int:
            await asyncio.sleep(0)
            return n + 1

    task = app.register_task(Fetch())

    async def caller() -> int:
        result: int = task.delay(1).get()  # eager: runs on a loop of its own
        return result

    with zae.use(app):
        assert asyncio.run(caller()) == 2


# -- report_usage on an unchecked lease (open mode, the store down) -----------------------
def test_usage_reported_after_an_outage_is_charged(app: Celery) -> None:
    with TaskHarness(on_unavailable="open", retry_attempts=1) as zae:
        task = define(app, body=lambda self: self.report_usage(tpm=120))
        with zae.use(app):
            task.delay()  # before the outage (the entity's stored limits are read)
            zae.store.fail_next("unavailable", times=1)  # the grant only
            result = task.delay()
        run = zae.ledger.last(result.id)
        assert run.unchecked and run.state == "SUCCESS"
        assert run.consumed == {"tpm": 120}  # the report, charged when the store answered
        assert charged(zae) == pytest.approx({"rpm": 1, "tpm": 240}, abs=0.01)


def test_usage_reported_while_the_store_is_still_down_never_fails_the_task(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    with TaskHarness(on_unavailable="open", retry_attempts=1) as zae:
        task = define(app, body=lambda self: self.report_usage(tpm=120, rpm=1))
        with zae.use(app), caplog.at_level(logging.WARNING, "zae_celery"):
            task.delay()  # before the outage
            zae.store.fail_next("unreachable", times=2)  # the grant and the report
            result = task.delay()
        assert result.state == "SUCCESS"
        run = zae.ledger.last(result.id)
        assert run.unchecked and run.consumed == {}
        assert "unchecked lease's usage not charged" in caplog.text
        assert charged(zae) == pytest.approx({"rpm": 1, "tpm": 120}, abs=0.01)  # the first


def test_a_closed_limiter_fails_an_eager_task_during_an_outage(
    zae: TaskHarness, app: Celery
) -> None:
    task = define(app)
    zae.store.fail_next("unavailable", times=4)  # every attempt of the grant
    with zae.use(app), pytest.raises(RateLimiterUnavailable):
        task.delay()
    assert zae.ledger.last(zae.ledger.runs[0].task_id).state == "FAILURE"


# -- a provider's 429 blocks the buckets that stand for its key ---------------------------
@pytest.mark.parametrize(("block", "waited"), [("all", 20.0 + 0.1), ("own", 0.0)])
def test_a_429_of_one_tenant_holds_back_the_tenants_of_the_same_provider_key(
    zae: TaskHarness, app: Celery, block: str, waited: float
) -> None:
    rpm = Limit.per_minute("rpm", 600)  # one request every 0.1 s
    for tenant in ("tenant-a", "tenant-b"):
        zae.limiter.create_entity(tenant, parent_id="provider-key", cascade=True)
    answers = {"tenant-a": 429, "tenant-b": 200}

    def call(self: Any, tenant: str) -> str:
        if answers[tenant] == 429:
            self.provider_limited(20.0)
        return tenant

    task = define(
        app,
        body=call,
        rate_limits=[rpm],
        rate_entity=lambda args, kwargs: args[0],
        rate_consume={"rpm": 1},
        rate_block=block,
    )
    with zae.use(app):
        with pytest.raises(Retry):
            task.delay("tenant-a")
        result = task.delay("tenant-b")
    assert result.get() == "tenant-b"
    # "all": tenant B waits out the block of the provider key (its cascade parent), then
    # one token; "own": only tenant A's bucket was blocked, and B starts at once.
    assert zae.ledger.last(result.id).waited == pytest.approx(waited, abs=0.002)


def test_rate_block_names_the_kinds_of_buckets() -> None:
    from zae_celery.core import BucketRef
    from zae_celery.task import _blocked

    rpm = (Limit.per_minute("rpm", 1),)
    own = BucketRef("tenant-a", "gpt", rpm)
    parent = BucketRef("provider-key", "gpt", rpm)
    queue = BucketRef("queue:llm", "queue", rpm)
    buckets = [own, parent, queue]
    assert _blocked(buckets, frozenset({"own", "parents", "queue"})) == buckets
    assert _blocked(buckets, frozenset({"parents"})) == [parent]
    assert _blocked(buckets, frozenset({"queue", "own"})) == [own, queue]
    # A task with queue limits only: its own bucket is the queue's, and counts as own.
    assert _blocked([queue], frozenset({"queue"})) == []
    assert _blocked([queue], frozenset({"own"})) == [queue]
