"""Admission's set-up decisions, without a worker: which strategy a task gets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from zae_celery import Limit, RateLimitedTask
from zae_celery.admission import admission_strategy


def _app(**conf: object) -> Celery:
    app = Celery("admission-setup", broker="memory://", set_as_current=False)
    app.conf.update(zae_table_name="zae-admission-setup", **conf)
    return app


def test_a_green_pool_refuses_to_start_with_admission_on() -> None:
    app = _app()

    @app.task(base=RateLimitedTask, rate_limits=[Limit.per_second("rps", 1)])
    def task() -> None: ...

    consumer = SimpleNamespace(pool=SimpleNamespace(is_green=True))
    with pytest.raises(ImproperlyConfigured, match="zae_admission = False"):
        admission_strategy(task, app, consumer)
