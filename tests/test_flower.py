"""The real Flower (the ``flower`` package, ``celery flower``) watching a real worker that
sends zae-celery's own task events (``task-throttled``) next to Celery's: Flower stays
up and answers, lists the tasks as they ended, and shows the throttle where it keeps it
(docs/observability.md, "Flower").

What Flower keeps of a custom task event is what Celery's event state keeps
(``celery.events.state.Task.event``): the event's type, upper-cased, becomes the task's
state (``THROTTLED``), and its fields are merged into the task object in memory. Its API
serves only Celery's own task fields (``Task.as_dict``), so after the task succeeded
the throttle shows in Flower's event counters: per worker (``/workers?json=1``) and in
its Prometheus metrics (``flower_events_total{type="task-throttled"}``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.events.state import Task as TaskState
from prometheus_client.parser import text_string_to_metric_families

from harness.workers import signals_held
from tests.conftest import REPO, Broker
from tests.test_celery_workers import Fleet, _start_fleet
from zae_celery.testing import LocalServer, free_port

pytestmark = pytest.mark.integration

TASK = "tests.celery.app.celery_style"
"""Celery's ``rate_limit="5/s"`` made global: a bucket of one token refilled 5 times a
second, so every task but the first is held for its slot, whatever the broker's pace."""
N = 10


@dataclass
class Flower:
    """A ``celery flower`` process of ``tests.celery.app``, on 127.0.0.1, with basic auth."""

    proc: subprocess.Popen[bytes]
    url: str
    authorization: str
    log: Path

    def read(self, path: str) -> bytes:
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": self.authorization}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            body: bytes = answer.read()
            return body

    def json(self, path: str) -> Any:
        return json.loads(self.read(path))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of Flower's ``/metrics``: (name, sorted labels) -> value."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(self.read("/metrics").decode())
            for s in family.samples
        }

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.proc.poll() is None, (
            f"flower exited ({self.proc.returncode}):\n" + (self.log_text()[-4000:])
        )


def _start_flower(fleet: Fleet, tmp_path: Path) -> Iterator[Flower]:
    """Flower on a free port of 127.0.0.1, loading the app as the workers do (same module,
    same environment), returned once it answers and its event receiver is consuming;
    stopped by its PID at the end (terminate, then kill)."""
    port = free_port()
    password = secrets.token_urlsafe(12)
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.celery.app", "flower",
        f"--port={port}", "--address=127.0.0.1", f"--basic-auth=zae:{password}",
    ]  # fmt: skip
    log = tmp_path / "flower.log"
    env = {**fleet.env, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out, signals_held():
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    token = base64.b64encode(f"zae:{password}".encode()).decode()
    flower = Flower(proc, f"http://127.0.0.1:{port}", f"Basic {token}", log)
    try:
        _wait_until_watching(flower, fleet)
        yield flower
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_until_watching(flower: Flower, fleet: Fleet, timeout: float = 60) -> None:
    """Return once Flower answers HTTP and has seen an event sent after it did.

    Events are not queued for a receiver that is not consuming yet, so a task sent before
    that would never show. The probe is a ``worker-offline`` of a host that never existed:
    it adds no task and no worker to Flower's state, only a 0 to ``flower_worker_online``.
    """
    deadline = time.monotonic() + timeout
    while True:
        flower.check_alive()
        try:
            if flower.read("/healthcheck") == b"OK":
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "flower never answered:\n" + flower.log_text()
        time.sleep(0.1)  # polling interval
    probe = f"zae-probe-{uuid.uuid4().hex[:8]}@flower-test"
    key = ("flower_worker_online", (("worker", probe),))
    with fleet.client.events.default_dispatcher(hostname=probe) as dispatcher:
        while key not in flower.metrics():
            flower.check_alive()
            assert time.monotonic() < deadline, "flower never saw an event:\n" + flower.log_text()
            dispatcher.send("worker-offline")
            time.sleep(0.2)  # a pause between probes, not a synchronisation


@pytest.fixture
def watched(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path
) -> Iterator[tuple[Fleet, Flower]]:
    env = {"ZAE_TEST_EVENTS": "1"}
    for fleet in _start_fleet(broker, ddb_local, tmp_path, extra_env=env, count=1):
        for flower in _start_flower(fleet, tmp_path):
            yield fleet, flower


def _throttled_count(flower: Flower) -> float:
    return sum(
        v
        for (name, labels), v in flower.metrics().items()
        if name == "flower_events_total"
        and ("type", "task-throttled") in labels
        and ("task", TASK) in labels
    )


def test_flower_lists_throttled_tasks_and_counts_the_throttle(
    watched: tuple[Fleet, Flower],
) -> None:
    fleet, flower = watched
    # The worker's consumer holds each task beyond the first for its slot, saying so
    # (task-throttled). A bucket of 10 (tests/test_events.py) is not enough here: the
    # filesystem broker hands messages over slowly enough that only 2 or 3 of 25 wait.
    results = [fleet.send("celery_style", "limited") for _ in range(N)]
    ids = {r.id for r in results}
    # While a task is held (and on until it ends: Celery ranks a custom state above
    # STARTED), Flower lists it as THROTTLED.
    shown_throttled: set[str] = set()
    deadline = time.monotonic() + 60
    while not all(r.ready() for r in results):
        assert time.monotonic() < deadline, "the tasks did not finish"
        shown_throttled |= ids & set(flower.json("/api/tasks?state=THROTTLED"))
        time.sleep(0.05)  # polling interval
    fleet.collect(results, timeout=60)

    # Then Flower lists every one as SUCCESS, once the worker's last events are in.
    deadline = time.monotonic() + 30
    listed = flower.json(f"/api/tasks?taskname={TASK}")
    while not (ids <= set(listed) and all(listed[i]["state"] == "SUCCESS" for i in ids)):
        flower.check_alive()
        states = Counter(listed.get(i, {}).get("state") for i in ids)
        assert time.monotonic() < deadline, f"flower's states of the tasks: {states}"
        time.sleep(0.1)  # polling interval
        listed = flower.json(f"/api/tasks?taskname={TASK}")

    assert shown_throttled, "flower never showed a held task as THROTTLED"
    for task_id in shown_throttled:
        info = flower.json(f"/api/task/info/{task_id}")
        assert info["state"] == "SUCCESS" and info["name"] == TASK
        assert info["received"] and info["started"] and info["succeeded"]
        # The API serves Celery's own fields only: the throttle's (wait, resource, path)
        # stay in Flower's memory. If this changes, docs/observability.md must too.
        assert set(info) == set(TaskState._fields), sorted(set(info) ^ set(TaskState._fields))

    # The throttle is counted: per worker, and in Flower's metrics by task name.
    (row,) = flower.json("/workers?json=1")["data"]
    assert row["task-received"] >= N and row["task-succeeded"] >= N
    throttled = row.get("task-throttled", 0)
    assert throttled >= max(len(shown_throttled), N // 2), row
    assert _throttled_count(flower) == throttled

    # Still answering, control commands included, and it logged no error: a failure to
    # handle an event would be an ERROR line ("[E ...") or a traceback.
    assert row["hostname"] in flower.json("/api/workers")
    assert flower.read("/healthcheck") == b"OK"
    flower.check_alive()
    log = flower.log_text()
    assert "Traceback" not in log and not re.search(r"^\[E ", log, re.MULTILINE), log
