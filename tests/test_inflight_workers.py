"""In-flight caps on real ``celery worker`` processes: never more than the cap inside
task bodies across a fleet (each broker), a long task keeping its slot by renewal, and a
SIGKILLed task's slot coming back within the documented bound (expires + 5 s)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client

from tests.conftest import Broker
from tests.test_celery_workers import Fleet, _start_fleet
from tests.test_task_faults import fleet as faults_fleet
from zae_celery.core import Limit, RateLimiter
from zae_celery.core.inflight import GRACE_MS, slots
from zae_celery.core.ops import BucketKey, ReadBucket
from zae_celery.testing import LocalServer

pytestmark = pytest.mark.integration

SEATS = [Limit.per_second("rps", 50), Limit.concurrent("seats", 2)]


def seats_held(limiter: RateLimiter, limits: list[Limit]) -> float:
    rows = limiter.buckets("default", "seats", limits)
    return next(r.in_use for r in rows if r.limit_name == "seats")


def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)  # polling a condition, with a deadline


@pytest.fixture
def records(redis: LocalServer) -> Iterator[tuple[str, redis_client.Redis]]:
    url = f"redis://127.0.0.1:{redis.port}/2"
    client = redis_client.Redis.from_url(url, socket_timeout=150)
    yield url, client
    client.flushdb()


@pytest.fixture
def seated_fleet(
    broker: Broker,
    ddb_local: LocalServer,
    tmp_path: Path,
    records: tuple[str, redis_client.Redis],
) -> Iterator[Fleet]:
    env = {"ZAE_TEST_RECORDS": records[0], "ZAE_TEST_SEATS": "2"}
    yield from _start_fleet(broker, ddb_local, tmp_path, extra_env=env, count=2, concurrency=3)


def test_never_more_than_the_cap_inside_bodies_across_the_fleet(
    seated_fleet: Fleet, records: tuple[str, redis_client.Redis]
) -> None:
    f, client = seated_fleet, records[1]
    gate = f"cap-{uuid.uuid4().hex[:6]}"
    queue = f"{f.prefix}limited"
    results = [
        f.client.send_task("tests.celery.app.seated", args=[gate, True], queue=queue)
        for _ in range(6)  # 6 pool processes could run them all at once
    ]
    wait_for(lambda: client.llen(f"{gate}:runs") >= 2, "two tasks inside")
    limiter = f.limiter()
    assert seats_held(limiter, SEATS) == 2  # the store agrees: both slots held
    client.rpush(f"{gate}:go", *["1"] * 6)
    infos = [r.get(timeout=120) for r in results]
    peaks = [int(p) for p in client.lrange(f"{gate}:peaks", 0, -1)]
    assert len(peaks) == 6 and max(peaks) == 2  # at most 2 bodies at once, ever
    assert [i["deferrals"] for i in infos] == [0] * 6  # they waited in place, not round the broker
    assert seats_held(limiter, SEATS) == 0  # every slot freed


def test_a_long_task_keeps_its_slot_and_a_killed_ones_comes_back_in_time(
    redis: LocalServer, moto: LocalServer, tmp_path: Path
) -> None:
    expires = 1.0  # renewed every third of a second while the body runs
    env = {"ZAE_TEST_SEATS": "1", "ZAE_TEST_SEAT_EXPIRES": str(expires)}
    one = [Limit.per_second("rps", 50), Limit.concurrent("seats", 1, expires=expires)]
    gate = f"kill-{uuid.uuid4().hex[:6]}"
    with faults_fleet(redis, moto, tmp_path, env=env) as f:
        f.send("seated", gate, True)  # holds until released (or killed)
        first = f.next_run(gate)
        waiting = f.send("seated", gate, False)
        # Far beyond expires + the grace, the holder still holds it: renewed, not taken.
        assert (
            f.records.blpop([f"{gate}:runs"], timeout=round(expires + GRACE_MS / 1000 + 2)) is None
        )
        assert seats_held(f.limiter, one) == 1
        os.kill(first["pid"], signal.SIGKILL)  # dies holding the slot
        killed_at = time.time()
        reply = f.limiter.store.send(ReadBucket(BucketKey("default", "seats")))
        (expiry,) = slots(reply.value, one[1]).values()  # the dead holder's last renewal's
        assert killed_at - 5 < expiry / 1000 <= killed_at + expires + 0.5
        after = f.next_run(gate)  # the waiting task, or the killed one delivered again
        assert after["pid"] != first["pid"]
        # Taken back once expired for the grace, not before; and soon after: the
        # documented bound is expires + 5 s after the last renewal (then a poll of <= 1 s).
        back_at = (expiry + GRACE_MS) / 1000
        assert back_at <= after["body"] <= back_at + 6
        f.records.rpush(f"{gate}:go", "1", "1")
        assert waiting.get(timeout=90)["deferrals"] == 0
        wait_for(lambda: seats_held(f.limiter, one) == 0, "every slot freed")
