"""Count the DynamoDB requests a boto3 client sends, per operation, for reports.

>>> counter = RequestCounter()                       # doctest: +SKIP
>>> counter.install(limiter.client)
>>> counter.sent, counter.by_operation, counter.condition_failed

In a Celery app run by prefork workers, ``counter = count_worker_requests(app)`` hooks
the app's limiter client in each pool process before its first task.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["RequestCounter", "count_worker_requests"]

_REFUSED = ("ConditionalCheckFailedException", "TransactionCanceledException")


class RequestCounter:
    """Every HTTP request a client sends to DynamoDB (retries too), per operation, and the
    replies that were a refused condition (a write that lost its guess or its race).

    Counts are per process: :meth:`install` in a forked child starts from zero.
    """

    def __init__(self) -> None:
        self.by_operation: dict[str, int] = {}
        self.condition_failed = 0
        self.pid = 0
        self._lock = threading.Lock()

    @property
    def sent(self) -> int:
        """Requests sent so far by this process."""
        with self._lock:
            return sum(self.by_operation.values())

    def snapshot(self) -> dict[str, Any]:
        """The counts and this process's id, JSON-friendly."""
        with self._lock:
            return {
                "pid": os.getpid(),
                "by_operation": dict(self.by_operation),
                "condition_failed": self.condition_failed,
            }

    def install(self, client: Any) -> None:
        """Hook ``client`` (a boto3 DynamoDB client), once per process, before it sends."""
        if self.pid == os.getpid():
            return
        with self._lock:
            self.pid, self.by_operation, self.condition_failed = os.getpid(), {}, 0
        client.meta.events.register("before-send.dynamodb.*", self._sent_one)
        client.meta.events.register("after-call.dynamodb.*", self._replied)

    def _sent_one(self, event_name: str = "", **_: Any) -> None:
        operation = event_name.rpartition(".")[2]  # before-send.dynamodb.UpdateItem
        with self._lock:
            self.by_operation[operation] = self.by_operation.get(operation, 0) + 1

    def _replied(self, parsed: Any = None, **_: Any) -> None:
        error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
        if isinstance(error, dict) and error.get("Code") in _REFUSED:
            with self._lock:
                self.condition_failed += 1


def count_worker_requests(app: Any) -> RequestCounter:
    """A counter of the DynamoDB requests of ``app``'s zae-celery limiter, installed in
    each worker pool process (``worker_process_init``) before it runs a task. Read it
    from a task (``counter.snapshot()``) to report the process's requests so far."""
    from celery.signals import worker_process_init

    from zae_celery.task import limiter_for

    counter = RequestCounter()

    def install(**_: Any) -> None:
        counter.install(limiter_for(app)[1].client)

    worker_process_init.connect(install, weak=False)
    return counter
