"""The fixtures of zae-celery's pytest plugin (see :mod:`zae_celery.testing.plugin` for
how to enable them).

- ``zae``: a :class:`~zae_celery.testing.TaskHarness` (clock, in-memory store, limiter,
  ledger), recording runs for the test; ``with zae.use(app):`` runs the app's tasks on it.
- ``zae_clock``: its :class:`~zae_celery.testing.ManualClock`.
- ``zae_limiter``: its :class:`~zae_celery.RateLimiter` (the clock's sleep included).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from zae_celery.core import RateLimiter
from zae_celery.testing.tasks import ManualClock, TaskHarness

__all__ = ["zae", "zae_clock", "zae_limiter"]


@pytest.fixture
def zae() -> Iterator[TaskHarness]:
    """A fresh harness per test, its ledger recording for the test's duration."""
    with TaskHarness() as harness:
        yield harness


@pytest.fixture
def zae_clock(zae: TaskHarness) -> ManualClock:
    """The harness's clock: ``zae_clock.advance(60)`` refills a minute of tokens."""
    return zae.clock


@pytest.fixture
def zae_limiter(zae: TaskHarness) -> RateLimiter:
    """The harness's limiter, on its in-memory store and clock."""
    return zae.limiter
