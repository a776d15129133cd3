"""Admission at dequeue, with real ``celery worker`` processes and real brokers.

The worker's consumer holds rate-limited messages and asks for each slot when one of its
processes is free; the rest of a backlog waits in the broker. These tests check what a
user of a long batch sees: no republish, no task failed by throttling, starts within the
buckets, other queues not starved, and what a killed worker leaves behind. Requests are
counted at the endpoint (a counting proxy in front of DynamoDB Local; on the Redis store,
the server's own count of script calls), so the workers' main processes, where admission
runs, are counted too. Synchronisation is on task results, records in redis and log
lines, never on sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_client
from celery import Celery

from benchmarks import max_window_excess
from harness.workers import log_text, worker_fleet
from tests.conftest import Broker
from tests.helpers import Counter
from tests.test_celery_workers import Fleet, _start_fleet, redis_store_url
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded, Slot
from zae_celery.task import HEADER_DEFERRALS, HEADER_LEASE
from zae_celery.testing import CountingProxy, LocalServer, redis_script_calls

pytestmark = pytest.mark.integration

RPS = 10  # tests.celery.app's "limited" task: RPS per second, a bucket of RPS
PACED_AHEAD = Slot(pace=True, start_within=60)  # a start counted up to a minute ahead


@pytest.fixture
def proxy(ddb_local: LocalServer) -> Iterator[CountingProxy]:
    with CountingProxy(ddb_local.url) as counting:
        yield counting


def _fleet(
    broker: Broker,
    ddb: LocalServer,
    tmp_path: Path,
    proxy: CountingProxy,
    env: dict[str, str],
    pool: str = "prefork",
) -> Iterator[Fleet]:
    concurrency = 8 if pool == "threads" else 2
    yield from _start_fleet(
        broker, ddb, tmp_path, env, pool=pool, endpoint=proxy.url, concurrency=concurrency
    )


def _updates(proxy: CountingProxy) -> int:
    ops = proxy.snapshot()["by_operation"]
    return int(ops.get("UpdateItem", 0) + ops.get("TransactWriteItems", 0))


BACKLOG_ENV = {
    "ZAE_TEST_HORIZON": "0.5",
    "ZAE_TEST_BODY_SECONDS": "0.2",
    "ZAE_TEST_MAX_DEFERRALS": "3",
}


def _a_backlog_waits_in_the_broker(
    fleet: Fleet, count: Callable[[], dict[str, int]], body_slack: int = 0
) -> tuple[int, dict[str, int]]:
    """80 tasks at 10/s is 8 s of work against a horizon of 0.5 s (16x): checks that none
    is republished or fails, that the counted starts keep to the bucket and the bodies'
    first lines to it plus ``body_slack`` requests. Returns the batch's size and what
    ``count`` (the store's requests so far) counted during it."""
    # Warm up: the first requests of each process (and of DynamoDB Local's JVM) are
    # slow, and an immediate grant that comes back late counts a fresh start.
    fleet.collect([fleet.send("limited", "limited", i) for i in range(RPS)])
    before = count()
    n = 80
    results = [fleet.send("limited", "limited", i) for i in range(n)]
    infos = fleet.collect(results)
    assert all(r.state == "SUCCESS" for r in results)
    assert sum(i["deferrals"] for i in infos) <= 0.05 * n  # no republish loop
    assert "DeferralsExhausted" not in log_text(fleet.logs)
    starts = sorted(round(i["start"] * 1000) for i in infos)
    assert max_window_excess(starts, RPS, RPS) <= 0
    bodies = sorted(round(i["body"] * 1000) for i in infos)
    assert max_window_excess(bodies, RPS, RPS) <= body_slack  # the actual starts too
    after = count()
    return n, {key: after[key] - before[key] for key in after}


@pytest.mark.parametrize(
    ("pool", "prefetch"),
    [pytest.param("threads", "4", id="threads-c8"), pytest.param("prefork", "1", id="prefork-p1")],
)
def test_a_backlog_far_longer_than_the_horizon_waits_in_the_broker(
    broker: Broker,
    ddb_local: LocalServer,
    tmp_path: Path,
    proxy: CountingProxy,
    pool: str,
    prefetch: str,
) -> None:
    """80 tasks at 10/s is 8 s of work against a horizon of 0.5 s (16x), and 3 workers
    x 8 threads hold 2.4 s of slots in flight: before admission, every task past the
    horizon was republished once per horizon, and with zae_max_deferrals=3 most failed."""
    env = {**BACKLOG_ENV, "ZAE_TEST_PREFETCH": prefetch}
    gen = _fleet(broker, ddb_local, tmp_path, proxy, env, pool=pool)
    fleet = next(gen)
    try:

        def count() -> dict[str, int]:
            failed = int(proxy.snapshot()["condition_failed"])
            # Late starts, each a write of its own: shown when the bound below fails.
            late = log_text(fleet.logs).count("counting a fresh start")
            return {"updates": _updates(proxy), "condition_failed": failed, "fresh_starts": late}

        n, sent = _a_backlog_waits_in_the_broker(fleet, count)
        # About one conditional write per task: the slots were asked for by the
        # consumers, nothing went round the broker (before admission this batch cost
        # 2.9 requests per task). Extra writes: a start that came late on a loaded
        # machine counts a fresh one, and a write whose shape was guessed from a stale
        # view is sent again; the benchmark measures the exact figure (1.02-1.08).
        assert sent["updates"] <= 1.5 * n, sent
        assert sent["condition_failed"] <= 0.25 * n, sent
    finally:
        next(gen, None)


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_backlog_waits_in_the_broker_on_the_redis_store(
    broker: Broker, redis_store: LocalServer, tmp_path: Path
) -> None:
    """The prefork case above with everything on Redis: the redis broker, and the
    buckets on a redis-server (``zae_store_url``). The store has a server of its own so
    that the server's count of script calls is the store's alone (the broker's kombu runs
    scripts too). A script call is one request, reads included (a condition that failed
    is an answer like any other: it cannot be told apart in the count, so that bound of
    the DynamoDB test has no counterpart here).

    The counted starts keep to the bucket exactly, as on DynamoDB. The bodies' first
    lines come a few milliseconds after their counted starts (the consumer's timer, then
    the pool), and on a store this fast the counted starts sit exactly on the bucket's
    edge (measured: 15 starts in 500 ms, the most allowed): 3-7 ms of lag on the first
    ones put 15 bodies in 496 ms, one more than the bucket allows, in 2 runs of 3. On
    DynamoDB Local the requests' own latency leaves the starts a little inside the edge.
    That lag is what the demo's provider holds one request of slack for; this test allows
    the bodies the same one request, and no more."""
    url = redis_store_url(redis_store, db=0)
    env = {**BACKLOG_ENV, "ZAE_TEST_PREFETCH": "1"}
    gen = _start_fleet(broker, None, tmp_path, env, store_url=url)
    fleet = next(gen)
    try:
        n, sent = _a_backlog_waits_in_the_broker(
            fleet, lambda: {"scripts": redis_script_calls(url)}, body_slack=1
        )
        assert sent["scripts"] <= 1.5 * n, sent
    finally:
        next(gen, None)


def test_redis_script_calls_count_one_per_store_operation(redis_store: LocalServer) -> None:
    """What the test above counts with: each operation a limiter sends to a Redis store
    is one script call in the server's count (answered-locally ones are not sent)."""
    url = redis_store_url(redis_store, db=0)
    limiter = RateLimiter.from_url(url)
    sent = Counter(limiter)
    limits = [Limit.per_day("rpd", 5)]
    try:
        before = redis_script_calls(url)
        for _ in range(5):
            limiter.acquire("tenant", "api", {"rpd": 1}, limits).commit()
        with pytest.raises(RateLimitExceeded):
            limiter.acquire("tenant", "api", {"rpd": 1}, limits)
        limiter.set_limits("tenant", limits, resource="api")
        limiter.available("tenant", "api", limits)
        ops = sent.take()
        assert redis_script_calls(url) - before == len(ops), ops
        assert len(ops) >= 8, ops  # six acquires, a write of limits and a read at least
    finally:
        limiter.delete_table()


def test_an_unthrottled_queue_is_not_starved(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path, proxy: CountingProxy
) -> None:
    """A worker with prefetch 1 holds a throttled backlog (held messages do not count
    against prefetch; the queue pauses at zae_admission_hold): tasks on its other queue
    run at once, not at the throttled queue's pace (celery#8119)."""
    env = {"ZAE_TEST_PREFETCH": "1"}
    gen = _fleet(broker, ddb_local, tmp_path, proxy, env)
    fleet = next(gen)
    try:
        throttled = [fleet.send("limited", "limited", i) for i in range(60)]  # 5 s of work
        fleet.collect(throttled[:RPS])  # the bucket's burst has run: the rest is paced
        sent = time.time()
        plain = [fleet.send("plain", "other") for _ in range(20)]
        last_plain = max(i["body"] for i in fleet.collect(plain))
        infos = fleet.collect(throttled)
        meanwhile = [i for i in infos if sent <= i["body"] <= last_plain]
        # Starved, the other queue's messages come in one per throttled release: 20
        # throttled starts pass while they trickle in (measured before the fix: 19-20).
        assert len(meanwhile) <= 5, f"{len(meanwhile)} throttled starts while they waited"
    finally:
        next(gen, None)


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_late_counted_starts_take_fresh_slots_on_rabbitmq(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path, proxy: CountingProxy
) -> None:
    """Deferred messages carrying a counted start that arrive long after it (acks_late,
    prefetch 1, behind a backlog) must not start together: each takes a fresh slot."""
    env = {"ZAE_TEST_PREFETCH": "1"}
    gen = _fleet(broker, ddb_local, tmp_path, proxy, env)
    fleet = next(gen)
    try:
        limiter = RateLimiter(fleet.table, endpoint_url=ddb_local.url)
        limits = [Limit.per_second("rps", RPS)]
        sent_at = time.time()
        results = []
        for _ in range(2 * RPS):
            lease = limiter.acquire(
                "default", "adherence", {"rps": 1}, limits, horizon=60, slot=PACED_AHEAD
            )
            data = lease.ticket()
            data["started_ms"] = round(sent_at * 1000) - 5_000  # counted 5 s ago: it is late
            task_id = str(uuid.uuid4())
            data["claim"] = f"{task_id}:{uuid.uuid4().hex}"
            headers = {HEADER_LEASE: data, HEADER_DEFERRALS: 1}
            results.append(
                fleet.client.send_task(
                    "tests.celery.app.limited",
                    args=[0],
                    queue=fleet.queue("limited"),
                    task_id=task_id,
                    headers=headers,
                )
            )
        infos = fleet.collect(results)
        starts = sorted(round(i["start"] * 1000) for i in infos)
        assert starts[0] >= sent_at * 1000 - 50  # none started on its stale slot
        # 20 late messages against a bucket of 10 (whose 20 tokens the test itself
        # consumed): taken together they would break it by 10 and more.
        assert max_window_excess(starts, RPS, RPS) <= 0
        bodies = sorted(round(i["body"] * 1000) for i in infos)
        assert max_window_excess(bodies, RPS, RPS) <= 0
    finally:
        next(gen, None)


# -- a killed worker --------------------------------------------------------------------------
SLOW = Limit.custom("slow", 1, refill_amount=1, refill_period_seconds=3)  # one per 3 s
TOTAL = Limit.custom("total", 1000, refill_amount=1, refill_period_seconds=31_536_000)
ADMITTED = re.compile(r"zae-celery admitted task (\S+) ")


def test_a_worker_killed_while_holding_admitted_tasks_loses_none(
    redis: LocalServer, tmp_path: Path, proxy: CountingProxy
) -> None:
    """SIGKILL a worker (its whole process group) while its consumer holds an admitted
    task: the broker redelivers every message to the next worker and all complete. The
    slot the dead worker had taken stays charged (never refunded, never started): the
    bucket is charged exactly once per run plus once per such slot."""
    prefix = f"k{uuid.uuid4().hex[:6]}-"
    table = f"zae-kill-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(table, endpoint_url=proxy.url)
    limiter.create_table()
    url = f"redis://127.0.0.1:{redis.port}/0"
    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    env = {
        "ZAE_TEST_BROKER": url,
        "ZAE_TEST_BACKEND": backend,
        "ZAE_TEST_ENDPOINT": proxy.url,
        "ZAE_TEST_TABLE": table,
        "ZAE_TEST_PREFIX": prefix,
        "ZAE_TEST_RECORDS": url,
        "ZAE_TEST_VISIBILITY_TIMEOUT": "3",  # redis redelivers unacked messages after 3 s
    }
    records = redis_client.Redis.from_url(url)
    client = Celery("client", broker=url, backend=backend)
    gate = f"slow-{uuid.uuid4().hex[:6]}"
    repo = Path(__file__).resolve().parent.parent
    try:
        first = tmp_path / "first"
        with worker_fleet(
            "tests.celery.app", count=1, concurrency=2, queues=[f"{prefix}limited"],
            logs=first, env=env, cwd=repo, name="first",
        ) as procs:  # fmt: skip
            results = [
                client.send_task("tests.celery.app.slow", args=[gate], queue=f"{prefix}limited")
                for _ in range(3)
            ]
            ran = [json.loads(records.blpop([f"{gate}:runs"], timeout=60)[1])]  # type: ignore[index]
            # The first ran at once; the second's slot is 3 s later. Wait until the
            # consumer holds it admitted (its slot taken), then kill the whole worker.
            deadline = time.monotonic() + 60
            while len(ADMITTED.findall(log_text(first))) < 2:
                assert time.monotonic() < deadline, log_text(first)[-3000:]
                time.sleep(0.05)  # polling another process's log: there is no event
            os.killpg(procs[0].pid, signal.SIGKILL)
            procs[0].wait(timeout=10)
        admitted_first = set(ADMITTED.findall(log_text(first)))
        with worker_fleet(
            "tests.celery.app", count=1, concurrency=2, queues=[f"{prefix}limited"],
            logs=tmp_path / "second", env=env, cwd=repo, name="second",
        ):  # fmt: skip
            infos = [r.get(timeout=120) for r in results]
        assert all(r.state == "SUCCESS" for r in results)
        ran += [json.loads(x) for x in records.lrange(f"{gate}:runs", 0, -1)]
        started_first = {run["id"] for run in ran if run["hostname"].startswith("first")}
        lost = admitted_first - started_first  # admitted by the dead worker, never started
        assert 1 <= len(lost) <= 2  # at most its pool size
        assert sorted(run["id"] for run in ran) == sorted({run["id"] for run in ran})
        assert len(ran) == len(infos) == 3
        left = limiter.available("default", "kill", [SLOW, TOTAL])["total"]
        assert round(left) == 1000 - len(ran) - len(lost)
    finally:
        records.delete(*(records.keys(f"{gate}*") or [f"{gate}none"]))
        limiter.delete_table()
