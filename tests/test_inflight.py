"""In-flight caps (``Limit.concurrent``) in the engine: on the in-memory store with an
injected clock, and the ``contract`` ones on every real store as well."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

from tests.helpers import Clock, Counter
from tests.test_cli import Store, run, store  # noqa: F401  (the store fixture)
from zae_celery.core import (
    AsyncRateLimiter,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    Slot,
    ValidationError,
)
from zae_celery.core.inflight import GRACE_MS, POLL_SECONDS
from zae_celery.core.stores import MemoryStore

RPM = Limit.per_minute("rpm", 600)
CALLS = Limit.concurrent("calls", 2, expires=10)


def held(limiter: RateLimiter, entity: str = "e", limits: list[Limit] | None = None) -> float:
    rows = limiter.buckets(entity, "r", limits or [RPM, CALLS])
    (row,) = [r for r in rows if r.limit_name == "calls"]
    assert row.inflight
    return row.in_use


@pytest.mark.contract
def test_a_cap_lets_n_in_and_a_release_lets_the_next_one_in(limiter: RateLimiter) -> None:
    first = limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS])
    second = limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS])
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS])
    (violation,) = refused.value.violations
    assert (violation.limit_name, violation.available, violation.burst) == ("calls", 0, 2)
    assert 0 < refused.value.retry_after <= POLL_SECONDS  # a polling interval, not a promise
    assert held(limiter) == 2
    first.commit()
    assert held(limiter) == 1
    with limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS]):
        assert held(limiter) == 2
    second.rollback()  # refunds its rpm and frees its slot
    assert held(limiter) == 0
    rpm = next(r for r in limiter.buckets("e", "r", [RPM, CALLS]) if r.limit_name == "rpm")
    assert rpm.charged == 2  # the rolled back request's rpm was refunded


@pytest.mark.contract
def test_the_cap_rides_in_the_grant_and_the_release_in_one_write(limiter: RateLimiter) -> None:
    counter = Counter(limiter)
    limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS]).commit()  # warms the config
    counter.take()
    lease = limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS])
    assert counter.take() == ["UpdateItem"]
    lease.commit()
    assert counter.take() == ["UpdateItem"]
    with limiter.acquire("e", "r", {"rpm": 1}, [RPM]) as plain:  # no cap: nothing to free
        pass
    assert plain.closed and counter.take() == ["UpdateItem"]


def test_a_dead_holders_slot_comes_back_after_its_expiry_and_the_grace(
    limiter: RateLimiter, clock: Clock
) -> None:
    one = Limit.concurrent("calls", 1, expires=10)
    dead = limiter.acquire("e", "r", {}, [one])  # its holder dies: never ended
    clock.advance(10 + GRACE_MS / 1000)  # expired, within the grace still
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("e", "r", {}, [one])
    clock.advance(0.002)
    counter = Counter(limiter)
    alive = limiter.acquire("e", "r", {}, [one])  # takes the dead slot back
    assert counter.take() == ["UpdateItem", "UpdateItem"]  # refused, then taken back
    dead.commit()  # the late holder: its slot is gone, nothing is given back twice
    (row,) = limiter.buckets("e", "r", [one])
    assert row.in_use == 1
    alive.commit()
    (row,) = limiter.buckets("e", "r", [one])
    assert row.in_use == 0


def test_renewing_keeps_a_long_calls_slot(limiter: RateLimiter, clock: Clock) -> None:
    one = Limit.concurrent("calls", 1, expires=10)
    long = limiter.acquire("e", "r", {}, [one])
    for _ in range(3):  # 24 s in all, renewed every 8 s
        clock.advance(8)
        assert long.renew()
    clock.advance(8 + GRACE_MS / 1000)
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("e", "r", {}, [one])
    clock.advance(2.1)  # silent past its expiry and the grace: presumed dead
    other = limiter.acquire("e", "r", {}, [one])
    assert not long.renew()  # it learns it holds nothing any more
    long.commit()
    other.commit()
    (row,) = limiter.buckets("e", "r", [one])
    assert row.in_use == 0


def test_a_ticket_carries_the_slot_to_the_process_that_frees_it(
    limiter: RateLimiter, clock: Clock
) -> None:
    lease = limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS])
    ticket = lease.ticket()
    assert ticket["slot"] and ticket["targets"][0]["caps"] == [CALLS.to_dict()]
    other = RateLimiter(store=limiter.store, clock=clock)
    resumed = other.resume(ticket)
    clock.advance(5)
    assert resumed.renew()
    resumed.commit()
    assert held(limiter) == 0


def test_a_parents_cap_is_shared_by_its_children(limiter: RateLimiter) -> None:
    limiter.set_limits("org", [Limit.concurrent("calls", 1)], resource="r")
    limiter.create_entity("team-a", parent_id="org", cascade=True)
    limiter.create_entity("team-b", parent_id="org", cascade=True)
    own = [Limit.concurrent("calls", 5)]
    a = limiter.acquire("team-a", "r", {}, own)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("team-b", "r", {}, own)
    assert [v.entity_id for v in refused.value.violations] == ["org"]
    a.commit()
    limiter.acquire("team-b", "r", {}, own).commit()


def test_a_request_takes_one_slot_or_none(limiter: RateLimiter) -> None:
    for _ in range(3):  # naming the cap with 0 takes no slot
        limiter.acquire("e", "r", {"rpm": 1, "calls": 0}, [RPM, CALLS])
    assert held(limiter) == 0
    with pytest.raises(ValidationError, match=r"consume\.calls"):
        limiter.acquire("e", "r", {"calls": 2}, [RPM, CALLS])


def test_a_block_leaves_the_cap_alone(limiter: RateLimiter) -> None:
    lease = limiter.acquire("e", "r", {"rpm": 1}, [RPM, CALLS])
    limiter.block("e", "r", [RPM, CALLS], 5.0)
    assert held(limiter) == 1
    lease.commit()
    assert held(limiter) == 0


@pytest.mark.contract
def test_threads_never_hold_more_than_the_cap(limiter: RateLimiter) -> None:
    cap = Limit.concurrent("calls", 3)
    inside, peak, lock = [0], [0], threading.Lock()
    refusals = [0]

    def worker() -> None:
        done = 0
        while done < 6:
            try:
                lease = limiter.acquire("e", "r", {}, [cap])
            except RateLimitExceeded:
                with lock:
                    refusals[0] += 1
                continue
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            with lock:
                inside[0] -= 1
            lease.commit()
            done += 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 3
    (row,) = limiter.buckets("e", "r", [cap])
    assert row.in_use == 0


def test_the_async_limiter_takes_and_frees_slots_alike(clock: Clock) -> None:
    async def scenario() -> None:
        limiter = AsyncRateLimiter(store=MemoryStore(clock=clock), clock=clock)
        one = Limit.concurrent("calls", 1)
        async with limiter.acquire("e", "r", {}, [one]) as lease:
            with pytest.raises(RateLimitExceeded):
                await limiter.acquire("e", "r", {}, [one])
            assert await lease.renew()
        again = await limiter.acquire("e", "r", {}, [one])  # freed when the block ended
        (row,) = await limiter.buckets("e", "r", [one])
        assert row.in_use == 1
        await again.rollback()
        (row,) = await limiter.buckets("e", "r", [one])
        assert row.in_use == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("calls=8/inflight", Limit.concurrent("calls", 8)),
        ("calls=8/inflight:expires=10m", Limit.concurrent("calls", 8, expires=600)),
        ("gpu=1/inflight:expires=90s", Limit.concurrent("gpu", 1, expires=90)),
    ],
)
def test_the_text_form_of_a_cap(text: str, limit: Limit) -> None:
    assert Limit.parse(text) == limit and limit.inflight
    assert Limit.parse(limit.format()) == limit
    assert Limit.from_dict(limit.to_dict()) == limit


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("calls=0/inflight", "out of range"),
        ("calls=1.5/inflight", "not a whole number"),
        ("calls=8/inflight:burst=9", "unknown option"),
        ("calls=8/inflight:expires=0s", "zero"),
        ("calls=8/inflight:expires=1m:expires=2m", "appears twice"),
    ],
)
def test_bad_caps_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Limit.parse(text)


def test_stored_caps_govern_the_engine(limiter: RateLimiter) -> None:
    limiter.set_limits("e", [Limit.parse("calls=1/inflight")], resource="r")
    assert limiter.get_limits("e", "r") == [Limit.concurrent("calls", 1)]
    lease = limiter.acquire("e", "r", {"rpm": 1}, [RPM])  # the code passes rpm only
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("e", "r", {"rpm": 1}, [RPM])
    lease.commit()


@pytest.mark.integration
def test_the_cli_stores_and_shows_a_cap(store: Store) -> None:  # noqa: F811
    spec = "calls=2/inflight:expires=90s"
    args = ["--resource", "vllm", "--limit", spec]
    assert run(store.cli("limits", "set", "tenant", *args)).exit_code == 0
    result = run(store.cli("limits", "get", "tenant", "--resource", "vllm"))
    assert result.exit_code == 0 and spec in result.output
    limiter = store.limiter()
    lease = limiter.acquire("tenant", "vllm", {}, [])  # the stored cap alone
    result = run(store.cli("buckets", "tenant", "--resource", "vllm", "--json"))
    (row,) = json.loads(result.stdout)
    assert (row["rate"], row["burst"], row["in_use"], row["available"]) == ("2/inflight", 2, 1, 1)
    lease.commit()
    (row,) = json.loads(run(store.cli("buckets", "tenant", "--json")).stdout)
    assert row["in_use"] == 0


def test_a_scheduler_takes_the_slot_when_the_start_is_counted(limiter: RateLimiter) -> None:
    deferred = Slot(pace=True, caps_at_start=True)
    one = [RPM, Limit.concurrent("calls", 1)]
    first = limiter.acquire("e", "r", {"rpm": 1}, one, horizon=5, slot=deferred)
    second = limiter.acquire("e", "r", {"rpm": 1}, one, horizon=5, slot=deferred)
    assert held(limiter, limits=one) == 0  # granted their rate slots, no cap slot yet
    assert limiter.start(first) == 0
    assert held(limiter, limits=one) == 1
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.start(second)
    assert [v.inflight for v in refused.value.violations] == [True]
    ticket = second.ticket()
    assert ticket["caps_pending"] and "slot" not in ticket
    first.free_slots()  # e.g. before it waits in a broker: it takes one again at its start
    assert held(limiter, limits=one) == 0 and first.ticket()["caps_pending"]
    resumed = limiter.resume(ticket)
    limiter.start(resumed)
    with pytest.raises(RateLimitExceeded):
        limiter.start(first)
    resumed.commit()
    limiter.start(first)
    first.commit()
    second.rollback()
    assert held(limiter, limits=one) == 0


def test_the_engine_docs_example_prints_what_the_page_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "engine.md").read_text()
    section = page[page.index("## In-flight caps") :]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    exec(compile(code, "docs/engine.md", "exec"), {})
    assert capsys.readouterr().out == printed


def test_a_queue_cap_is_shared_by_every_tenant_on_the_queue(limiter: RateLimiter) -> None:
    queue = Slot(extra=(("queue:gpu", "queue", [Limit.concurrent("calls", 1)]),))
    first = limiter.acquire("tenant-1", "r", {"rpm": 1}, [RPM], slot=queue)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("tenant-2", "r", {"rpm": 1}, [RPM], slot=queue)
    assert [(v.entity_id, v.inflight) for v in refused.value.violations] == [("queue:gpu", True)]
    first.commit()
    limiter.acquire("tenant-2", "r", {"rpm": 1}, [RPM], slot=queue).commit()
