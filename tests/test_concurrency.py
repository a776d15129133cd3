"""Several processes x threads hammer one bucket (DynamoDB Local, Redis); clock skew bound."""

from __future__ import annotations

import math
import multiprocessing
import random
import threading
import time
import uuid
from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import Clock
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded

pytestmark = pytest.mark.integration

RPS = Limit.per_second("rps", 20)
# Refills one token a day: what it shows as used is exactly what was consumed + adjusted.
TOKENS = Limit.per_day("tokens", 1, burst=10**9)
LIMITS = [RPS, TOKENS]
PROCESSES, THREADS, ATTEMPTS = 3, 4, 40


def _hammer(url: str, out: Any) -> None:
    """One process: THREADS threads, ATTEMPTS acquires each; grants adjust tokens +2."""
    limiter = RateLimiter.from_url(url)
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


@pytest.mark.parametrize("kind", ["dynamodb-local", "redis"])
def test_processes_and_threads_never_over_grant_nor_lose_adjusts(
    kind: str, request: pytest.FixtureRequest
) -> None:
    name = f"zae-concurrency-{uuid.uuid4().hex[:8]}"
    if kind == "redis":
        url = f"{request.getfixturevalue('redis').url}/0?prefix={name}"
    else:
        url = f"dynamodb://{name}?endpoint_url={request.getfixturevalue('ddb_local').url}"
    setup = RateLimiter.from_url(url)
    setup.create_table()
    try:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_hammer, args=(url, out)) for _ in range(PROCESSES)]
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


@pytest.mark.parametrize("skew", [0.05, 0.5, 1.5, -0.5])
def test_clock_skew_over_grants_at_most_skew_times_rate(backend: Backend, skew: float) -> None:
    limits = [Limit.per_second("rps", 10)]
    rate, burst = limits[0].rate, limits[0].burst
    honest_clock = Clock()
    skewed_clock = Clock()
    skewed_clock.advance(skew)
    # Every refusal asks the table, so retry_after reflects the other client's grants.
    honest = RateLimiter(store=backend.store(), clock=honest_clock, local_refusals=False)
    skewed = RateLimiter(store=backend.store(), clock=skewed_clock, local_refusals=False)
    honest.create_table()
    try:
        for _ in range(10):
            honest.acquire("e", "r", {"rps": 1}, limits)  # the honest client drains the burst
        extra = 0
        while True:
            try:
                skewed.acquire("e", "r", {"rps": 1}, limits)
                extra += 1
            except RateLimitExceeded as exc:
                own_wait = exc.retry_after - exc.jitter  # exact (the jitter: a lost race)
                break
        assert extra <= max(0.0, skew) * rate  # the documented bound: skew x rate
        # Exactly that, but never more than a full bucket; a clock behind gets nothing.
        assert extra == min(burst, math.floor(max(0.0, skew) * rate))
        if skew < 0:
            assert own_wait == pytest.approx(-skew + 0.1, abs=0.002)  # it under-grants
        # The honest client now waits until its clock has caught up with the debt.
        with pytest.raises(RateLimitExceeded) as refused:
            honest.acquire("e", "r", {"rps": 1}, limits)
        # (A clock ahead by more than a full bucket's refill first finds the bucket full.)
        debt = max(0.0, skew - burst / rate) + extra / rate
        assert refused.value.retry_after == pytest.approx(debt + 0.1, abs=0.002)
    finally:
        honest.delete_table()


@pytest.mark.contract
def test_clock_skew_bound_holds_for_a_fleet_of_skewed_clients(backend: Backend) -> None:
    """Four clients whose clocks disagree by up to 0.5 s hammer one bucket in rounds of
    1 s, with 2 s idle between rounds (so a round starts on a full bucket).

    In any window of true time W the fleet is granted at most burst + rate * (W + spread),
    the spread between the fastest and the slowest clock playing the part of one client's
    skew. The first round is the worst case, and reaches the bound: the slowest clock
    writes first (a fresh bucket, from its late "now"), the fastest then fills it up to
    its own early "now".
    """
    limit = Limit.per_second("rps", 10)
    skews = [-0.2, 0.0, 0.15, 0.3]
    bound = round((max(skews) - min(skews)) * limit.rate)  # 5 tokens: no rounding
    clocks = [Clock() for _ in skews]
    for clock, skew in zip(clocks, skews, strict=True):
        clock.advance(skew)
    clients = [RateLimiter(store=backend.store(), clock=c) for c in clocks]
    clients[0].create_table()
    rng = random.Random(7)
    grants: list[int] = []  # true time (ms) of each grant
    now_ms = 0

    def advance(ms: int) -> None:
        nonlocal now_ms
        now_ms += ms
        for clock in clocks:
            clock.advance(ms / 1000)

    try:
        for round_ in range(4):
            for step in range(20):
                order = list(range(len(clients)))  # by skew: the slowest first
                if round_ or step:
                    rng.shuffle(order)
                for i in order:
                    while True:
                        try:
                            clients[i].acquire("e", "r", {"rps": 1}, [limit])
                        except RateLimitExceeded:
                            break
                        grants.append(now_ms)
                advance(50)
            advance(2000)
    finally:
        clients[0].delete_table()
    worst = max(
        j - i + 1 - limit.burst - (grants[j] - g) * limit.rate // 1000
        for i, g in enumerate(grants)
        for j in range(i, len(grants))
    )
    print(f"\n{len(grants)} grants; most over burst + rate*W in a window: {worst} (bound {bound})")
    assert worst <= bound  # never more than the spread allows
    assert worst == bound  # and the adversarial first round does reach it
