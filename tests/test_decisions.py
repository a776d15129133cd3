"""One structured DEBUG line per decision (zae_celery.decisions), on the in-memory
harness: what a run was granted, how long it waited, what it was charged, a provider's
block; and never a task's argument."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Retry

from zae_celery import Limit, RateLimitedTask
from zae_celery.testing import TaskHarness

RPM = Limit.per_minute("rpm", 2)
SECRET = "sk-live-PROMPT-9c1e"


@pytest.fixture
def app(eager_app: Celery) -> Celery:
    return eager_app


def define(app: Celery, body: Any) -> Any:
    def run(self: Any, prompt: str) -> Any:
        return body(self, prompt)

    task = app.task(
        base=RateLimitedTask,
        bind=True,
        shared=False,
        name=f"decisions.{uuid.uuid4().hex[:8]}",
        rate_limits=[RPM],
        rate_entity="tenant-1",
        rate_resource="gpt",
    )(run)
    return app.tasks[task.name]


def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [r.zae for r in caplog.records if hasattr(r, "zae")]


def test_each_run_logs_its_grant_wait_and_charge(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task = define(app, lambda self, prompt: len(prompt))
    with zae.use(app), caplog.at_level(logging.DEBUG, "zae_celery"):
        ids = [task.delay(SECRET).id for _ in range(3)]
    seen = decisions(caplog)
    granted = [d for d in seen if d["decision"] == "granted"]
    assert [(d["task"], d["bucket"], d["path"]) for d in granted] == [
        (i, "tenant-1/gpt", "eager") for i in ids
    ]
    assert [float(d["wait"]) for d in granted] == pytest.approx([0, 0, 30], abs=0.01)
    settled = [d for d in seen if d["decision"] == "settled"]
    assert [(d["task"], d["state"], d["consumed"]) for d in settled] == [
        (i, "SUCCESS", "rpm:1") for i in ids
    ]
    line = next(r.getMessage() for r in caplog.records if hasattr(r, "zae"))
    assert line.startswith(f"zae-celery decision=granted task={ids[0]} bucket=tenant-1/gpt")
    assert SECRET not in caplog.text


def test_a_provider_block_is_logged_with_its_wait(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task = define(app, lambda self, prompt: self.provider_limited(20.0))
    with zae.use(app), caplog.at_level(logging.DEBUG, "zae_celery"), pytest.raises(Retry):
        task.delay(SECRET)
    (blocked,) = [d for d in decisions(caplog) if d["decision"] == "blocked"]
    assert (blocked["bucket"], blocked["wait"], blocked["cause"]) == (
        "tenant-1/gpt",
        "20.000",
        "429",
    )
    assert SECRET not in caplog.text


def test_nothing_is_formatted_unless_debug_is_on(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    task = define(app, lambda self, prompt: None)
    with zae.use(app), caplog.at_level(logging.INFO, "zae_celery"):
        task.delay("x")
    assert decisions(caplog) == []
