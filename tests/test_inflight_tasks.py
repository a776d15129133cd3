"""In-flight caps on Celery tasks, in one process (eager runs on the harness's in-memory
store and manual clock): the slot is held while the body runs, freed whatever the
outcome, usage reported by the body is charged in the write that frees it, and a task
that finds the cap full waits in place for a slot. Real workers: tests/test_inflight_workers.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery

from tests.helpers import Counter
from zae_celery import Limit, RateLimitedTask, RateLimitExceeded
from zae_celery.testing import TaskHarness

RPM = Limit.per_minute("rpm", 600)
TPM = Limit.per_minute("tpm", 60_000)
CALLS = Limit.concurrent("calls", 1)


def define(app: Celery, body: Any, **options: Any) -> Any:
    def run(self: Any, *args: Any) -> Any:
        return body(self, *args)

    task = app.task(
        base=RateLimitedTask,
        bind=True,
        shared=False,
        name=f"inflight.{uuid.uuid4().hex[:8]}",
        rate_limits=[RPM, TPM, CALLS],
        rate_entity="tenant",
        rate_resource="vllm",
        rate_consume={"rpm": 1, "tpm": 500},
        **options,
    )(run)
    return app.tasks[task.name]


def held(zae: TaskHarness) -> float:
    rows = zae.limiter.buckets("tenant", "vllm", [RPM, TPM, CALLS])
    return next(r.in_use for r in rows if r.limit_name == "calls")


def test_the_slot_is_held_while_the_body_runs_and_freed_after(
    zae: TaskHarness, eager_app: Celery
) -> None:
    seen: list[float] = []

    def body(self: Any) -> str:
        seen.append(held(zae))
        return "ok"

    task = define(eager_app, body)
    failing = define(eager_app, lambda self: 1 / 0)
    with zae.use(eager_app):
        assert task.delay().get() == "ok"
        with pytest.raises(ZeroDivisionError):
            failing.delay()
    assert seen == [1] and held(zae) == 0


def test_usage_is_charged_in_the_write_that_frees_the_slot(
    zae: TaskHarness, eager_app: Celery
) -> None:
    task = define(eager_app, lambda self: self.report_usage(tpm=120))
    counter = Counter(zae.limiter)
    with zae.use(eager_app):
        task.delay()  # the first also stamps the schema and reads the entity
        counter.take()
        task.delay()
    # The grant (rates), the start (the slot), the end (usage and the slot freed).
    assert counter.take() == ["UpdateItem", "UpdateItem", "UpdateItem"]
    tpm = next(
        r for r in zae.limiter.buckets("tenant", "vllm", [RPM, TPM, CALLS]) if r.limit_name == "tpm"
    )
    assert tpm.charged == 240 and held(zae) == 0


def test_a_task_that_finds_the_cap_full_waits_for_a_slot_then_gives_up(
    zae: TaskHarness, eager_app: Celery
) -> None:
    outer = zae.limiter.acquire("tenant", "vllm", {"rpm": 1}, [RPM, TPM, CALLS])
    task = define(eager_app, lambda self: "ran", rate_horizon=5)
    with zae.use(eager_app), pytest.raises(RateLimitExceeded) as refused:
        task.delay()
    assert [v.inflight for v in refused.value.violations] == [True]
    assert 5 <= zae.clock.slept <= 7.5  # asked about every second for its horizon
    outer.commit()
    with zae.use(eager_app):
        assert task.delay().get() == "ran"
    assert held(zae) == 0
