"""Celery events that say why a task waits (zae_celery.events), from a real worker with
task events on (``-E``), read by Celery's own event receiver as ``celery events`` and
Flower read them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker
from tests.test_celery_workers import Fleet, _start_fleet
from zae_celery.testing import LocalServer

pytestmark = pytest.mark.integration

SECRET = "sk-live-PROMPT-e7d0"


@pytest.fixture
def watched(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[Fleet]:
    env = {"ZAE_TEST_EVENTS": "1"}
    yield from _start_fleet(broker, ddb_local, tmp_path, extra_env=env, count=1)


class Watcher:
    """Every event on the broker, captured on a thread until stopped."""

    def __init__(self, fleet: Fleet) -> None:
        self.app = fleet.client
        self.events: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            while not self.stopped.is_set():
                try:
                    receiver.capture(limit=None, timeout=0.2, wakeup=False)
                except TimeoutError:
                    continue

    def start(self) -> None:
        """Start capturing, and return once a probe event sent now has been seen."""
        self.thread.start()
        deadline = time.monotonic() + 30
        with self.app.events.default_dispatcher() as dispatcher:
            while not any(e.get("type") == "zae-probe" for e in list(self.events)):
                assert time.monotonic() < deadline, "the event receiver never got ready"
                dispatcher.send("zae-probe")
                self.stopped.wait(0.2)  # a pause between probes, not a synchronisation

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == type_]


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_held_task_says_it_is_throttled_and_how_long_it_waits(watched: Fleet) -> None:
    watcher = Watcher(watched)
    watcher.start()
    try:
        results = [watched.send("limited", "limited", i) for i in range(25)]
        results += [
            watched.client.send_task(
                "tests.celery.app.secret",
                kwargs={"prompt": SECRET, "mode": "ok"},
                queue=watched.queue("limited"),
            )
            for _ in range(3)
        ]
        for result in results:
            result.get(timeout=60)
        ids = {r.id for r in results[:25]}
        deadline = time.monotonic() + 30
        while len({e["uuid"] for e in watcher.of("task-succeeded")} & ids) < 25:
            assert time.monotonic() < deadline, "the workers' own events did not all arrive"
            watcher.stopped.wait(0.1)
    finally:
        watcher.stop()
    throttled = [e for e in watcher.of("task-throttled") if e["uuid"] in ids]
    # 25 tasks against a bucket of 10 refilling 10 a second: beyond the burst, the
    # consumer takes slots ahead (two per pool process) and holds each task for its slot.
    assert throttled, "no held task said it was throttled"
    for event in throttled:
        assert event["resource"] == "adherence" and event["path"] == "admission"
        assert 0 < event["wait"] <= 3.0
    # Ours never carry an argument (Celery's own task-received does, as argsrepr).
    ours = watcher.of("task-throttled") + watcher.of("task-provider-limited")
    assert any(e["resource"] == "secrets" for e in ours)
    assert not any(SECRET in json.dumps(e, default=str) for e in ours)
