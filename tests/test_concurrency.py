"""Several processes x threads hammer one bucket on DynamoDB Local; clock skew bound."""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from typing import Any

import pytest

from tests.conftest import Endpoint
from tests.helpers import Clock
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded

pytestmark = pytest.mark.integration

RPS = Limit.per_second("rps", 20)
# Refills one token a day: what it shows as used is exactly what was consumed + adjusted.
TOKENS = Limit.per_day("tokens", 1, burst=10**9)
LIMITS = [RPS, TOKENS]
PROCESSES, THREADS, ATTEMPTS = 3, 4, 40


def _hammer(url: str, table: str, out: Any) -> None:
    """One process: THREADS threads, ATTEMPTS acquires each; grants adjust tokens +2."""
    limiter = RateLimiter(table, endpoint_url=url)
    grants: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(ATTEMPTS):
            try:
                with limiter.acquire("shared", "api", {"rps": 1, "tokens": 1}, LIMITS) as lease:
                    granted_at = lease.start_at
                    lease.adjust(tokens=2)
            except RateLimitExceeded as exc:
                time.sleep(min(exc.retry_after, 0.05))  # back off as a client would
                continue
            with lock:
                grants.append(granted_at)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(grants)


def test_processes_and_threads_never_over_grant_nor_lose_adjusts(ddb_local: Any) -> None:
    table = "zae-concurrency"
    setup = RateLimiter(table, endpoint_url=ddb_local.url)
    setup.create_table()
    try:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_hammer, args=(ddb_local.url, table, out)) for _ in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        grants = sorted(round(g * 1000) for _ in procs for g in out.get(timeout=300))
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert grants, "nothing was granted"
        # Every window [g_i, g_j] (ms of the engine's clock) holds at most
        # burst + rate * width grants, in exact integer arithmetic.
        for i, g in enumerate(grants):
            for j in range(i, len(grants)):
                width_ms = grants[j] - g
                allowed = RPS.burst + (width_ms * RPS.refill_amount) // RPS.refill_period_ms
                assert j - i + 1 <= allowed
        used = TOKENS.burst - setup.available("shared", "api", LIMITS)["tokens"]
        assert round(used) == 3 * len(grants), "an adjust (or a grant) was lost"
    finally:
        setup.delete_table()


def test_clock_skew_over_grants_at_most_skew_times_rate(endpoint: Endpoint) -> None:
    skew = 0.5
    limits = [Limit.per_second("rps", 10)]
    honest_clock = Clock()
    ahead_clock = Clock()
    ahead_clock.advance(skew)
    # Every refusal asks the table, so retry_after reflects the other client's grants.
    honest = RateLimiter(
        endpoint.table_name, endpoint_url=endpoint.url, clock=honest_clock, local_refusals=False
    )
    ahead = RateLimiter(
        endpoint.table_name, endpoint_url=endpoint.url, clock=ahead_clock, local_refusals=False
    )
    honest.create_table()
    try:
        for _ in range(10):
            honest.acquire("e", "r", {"rps": 1}, limits)  # the honest client drains the burst
        extra = 0
        while True:
            try:
                ahead.acquire("e", "r", {"rps": 1}, limits)
                extra += 1
            except RateLimitExceeded:
                break
        assert extra <= skew * limits[0].rate  # the documented bound: skew x rate
        assert extra == math.floor(skew * limits[0].rate)
        # The honest client now waits until its clock has caught up with the debt.
        with pytest.raises(RateLimitExceeded) as refused:
            honest.acquire("e", "r", {"rps": 1}, limits)
        assert refused.value.retry_after == pytest.approx(skew + 0.1, abs=0.002)
    finally:
        honest.delete_table()
