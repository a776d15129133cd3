"""The engine's decisions, on the in-memory store; the ``contract`` ones also against real
DynamoDB APIs over HTTP (moto server and DynamoDB Local).

Request counts are the store operations a limiter sends, named as DynamoDB requests;
time comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import pickle
import random
from typing import Any

import pytest

from tests.conftest import Backend
from tests.helpers import Clock, Counter
from zae_celery.core import (
    AsyncRateLimiter,
    IncompatibleSchema,
    Lease,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    Slot,
    ValidationError,
    bucket,
)
from zae_celery.core.engine import CONTENDED_MS, HERD_HALF_LIFE_MS, HERD_MAX_MS
from zae_celery.core.lease import LeaseState
from zae_celery.core.ops import Op, Reply, WriteBuckets
from zae_celery.core.schema import SCHEMA_VERSION
from zae_celery.core.stores import MemoryStore

PACE = Slot(pace=True)
CLOSE = Slot(pace=True, start_within=0.35)
WITHIN_2S = Slot(pace=True, start_within=2.0)


def limits_of(n: int, per_second: int = 10) -> list[Limit]:
    names = ["rpm", "tpm", "l3", "l4", "l5"][:n]
    return [Limit.per_second(name, per_second * (100 if name == "tpm" else 1)) for name in names]


def consume_of(limits: list[Limit]) -> dict[str, int]:
    return {lim.name: (100 if lim.name == "tpm" else 1) for lim in limits}


@pytest.mark.contract
@pytest.mark.parametrize("n_limits", [1, 2, 5])
def test_idle_grant_costs_one_write_and_no_read(
    limiter: RateLimiter, clock: Clock, n_limits: int
) -> None:
    limits = limits_of(n_limits)
    counter = Counter(limiter)
    limiter.acquire("tenant", "model", consume_of(limits), limits).commit()  # warms the config
    assert counter.take() == ["Query", "UpdateItem"]
    for _ in range(20):
        clock.advance(1.0)  # the bucket refills completely between requests
        with limiter.acquire("tenant", "model", consume_of(limits), limits) as lease:
            lease.adjust(**{limits[0].name: 0})  # an exact estimate writes nothing
        assert counter.take() == ["UpdateItem"]


@pytest.mark.parametrize("local_refusals", [True, False])
@pytest.mark.parametrize("n_limits", [1, 2, 5])
def test_saturated_bucket_grant_and_refusal_cost_at_most_one_request(
    backend: Backend, clock: Clock, n_limits: int, local_refusals: bool
) -> None:
    limiter = backend.limiter(local_refusals=local_refusals)
    limiter.create_table()
    limits = limits_of(n_limits)
    consume = consume_of(limits)
    counter = Counter(limiter)
    for _ in range(10):  # drain the burst of 10
        limiter.acquire("tenant", "model", consume, limits)
    counter.take()
    grants = refusals = 0
    for _ in range(60):
        try:
            limiter.acquire("tenant", "model", consume, limits)
            grants += 1
            assert counter.take() == ["UpdateItem"], "a saturated grant is one write"
        except RateLimitExceeded as exc:
            refusals += 1
            assert exc.retry_after > 0
            assert {v.limit_name for v in exc.violations} <= {lim.name for lim in limits}
            # Predicted from the last state this process saw: no request at all.
            assert counter.take() == ([] if local_refusals else ["UpdateItem"])
        clock.advance(0.05)  # half the refill of one request: most requests are refused
    # One token every 100 ms, requests every 50 ms from t=0 to t=2950 ms: a grant at each
    # whole 100 ms after the first, 29 of them.
    assert (grants, refusals) == (29, 31)
    limiter.delete_table()


def test_retry_after_is_exact(limiter: RateLimiter, clock: Clock) -> None:
    limits = [Limit.per_minute("rpm", 6)]  # one token every 10 s
    for _ in range(6):
        limiter.acquire("e", "r", {"rpm": 1}, limits)
    clock.advance(1.234)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rpm": 1}, limits)
    wait = refused.value.retry_after
    assert wait == pytest.approx(10 - 1.234, abs=0.0011)
    clock.advance(wait - 0.001)
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("e", "r", {"rpm": 1}, limits)
    clock.advance(0.001)
    limiter.acquire("e", "r", {"rpm": 1}, limits)


@pytest.mark.contract
def test_a_refusal_that_lost_a_race_spreads_its_retry_after(
    limiter: RateLimiter, backend: Backend, clock: Clock
) -> None:
    # Each time another client's grant beats this process's request, the item's spread
    # doubles and grows by the exact wait (at most HERD_MAX_MS), and it halves every
    # HERD_HALF_LIFE_MS after; every refusal adds a uniform draw below it to retry_after.
    # The violations stay exact; a refusal this process's own view foresaw costs no
    # request and grows nothing.
    limits = [Limit.custom("rps", 1, 1, 0.1)]  # a bucket of 1, a token every 100 ms
    draws = random.Random(7)
    limiter.engine.random = random.Random(7)
    other = backend.limiter()
    counter = Counter(limiter)
    limiter.acquire("e", "r", {"rps": 1}, limits)
    spread, spreads = 0.0, []
    for _ in range(6):
        clock.advance(0.1)
        spread *= 0.5 ** (100 / HERD_HALF_LIFE_MS)
        other.acquire("e", "r", {"rps": 1}, limits)  # takes the token this view expects
        for lost in (True, False):  # a request that lost, then a refusal from the view
            counter.take()
            with pytest.raises(RateLimitExceeded) as refused:
                limiter.acquire("e", "r", {"rps": 1}, limits)
            assert counter.take() == (["UpdateItem"] if lost else [])
            spread = min(HERD_MAX_MS, 2 * spread + 100) if lost else spread
            exc = refused.value
            assert [v.retry_after for v in exc.violations] == [0.1]
            assert exc.jitter == draws.uniform(0, spread) / 1000
            assert exc.retry_after == 0.1 + exc.jitter
        spreads.append(spread)
    assert spreads[0] == 100 and spreads[-2:] == [HERD_MAX_MS] * 2
    again = pickle.loads(pickle.dumps(exc))  # a task's result, a process pool
    assert (again.retry_after, again.jitter, again.violations) == (
        exc.retry_after,
        exc.jitter,
        exc.violations,
    )
    assert spreads == sorted(spreads)
    clock.advance(HERD_HALF_LIFE_MS / 1000)  # a grant shrinks nothing; time halves it
    limiter.acquire("e", "r", {"rps": 1}, limits)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rps": 1}, limits)
    assert refused.value.jitter == draws.uniform(0, HERD_MAX_MS / 2) / 1000
    # Another item of the same process, never raced: exact.
    limiter.acquire("e2", "r", {"rps": 1}, limits)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e2", "r", {"rps": 1}, limits)
    assert (refused.value.jitter, refused.value.retry_after) == (0.0, 0.1)


def _four_grants_behind(
    limiter: RateLimiter, backend: Backend, burst: int, seed: int
) -> tuple[list[Limit], random.Random]:
    """``limiter`` grants once on a bucket of ``burst`` (a token every 100 ms), then
    another client grants four times: 400 ms of refill past ``limiter``'s view. Returns
    the limits and a twin of ``limiter``'s seeded random draws."""
    limits = [Limit.custom("rps", burst, 1, 0.1)]
    limiter.engine.random = random.Random(seed)
    other = backend.limiter()
    limiter.acquire("e", "r", {"rps": 1}, limits)
    for _ in range(4):
        other.acquire("e", "r", {"rps": 1}, limits)
    return limits, random.Random(seed)


@pytest.mark.contract
def test_a_race_lost_to_many_grants_spreads_by_how_far_they_pushed_the_bucket(
    limiter: RateLimiter, backend: Backend, clock: Clock
) -> None:
    # The spread of a lost race is at least how far other clients pushed the bucket past
    # this process's view (400 ms of refill here), not only twice the last spread plus
    # the wait (100 ms): a client that finds many grants ahead of it backs off that far
    # at its first loss.
    limits, draws = _four_grants_behind(limiter, backend, burst=5, seed=3)  # empty now
    counter = Counter(limiter)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rps": 1}, limits)  # its view says 4 tokens: it tries
    assert counter.take() == ["UpdateItem"]
    assert [v.retry_after for v in refused.value.violations] == [0.1]
    assert refused.value.jitter == draws.uniform(0, 400) / 1000


@pytest.mark.contract
def test_a_grant_that_shows_other_clients_grants_spreads_the_next_refusal(
    limiter: RateLimiter, backend: Backend, clock: Clock
) -> None:
    # A grant's reply that shows other clients' grants since this process's view sets
    # the item's spread to at least how far they pushed it: the first refusal after it,
    # foreseen by the view (no request), is spread already. Clients that drain one bucket
    # together then do not all come back at the instant its next token appears.
    limits, draws = _four_grants_behind(limiter, backend, burst=10, seed=5)
    for _ in range(5):  # the rest of the bucket, each reply showing only its own grant
        limiter.acquire("e", "r", {"rps": 1}, limits)
    counter = Counter(limiter)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rps": 1}, limits)
    assert counter.take() == []  # foreseen: no request, no race lost
    assert [v.retry_after for v in refused.value.violations] == [0.1]
    assert refused.value.jitter == draws.uniform(0, 400) / 1000
    # The spread decays with time as before: a half-life later, half of it.
    clock.advance(HERD_HALF_LIFE_MS / 1000)
    for _ in range(limits[0].burst):
        limiter.acquire("e", "r", {"rps": 1}, limits)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rps": 1}, limits)
    assert refused.value.jitter == draws.uniform(0, 200) / 1000
    # A client alone on its bucket sees nobody else's grants: its refusals stay exact.
    alone = backend.limiter()
    for _ in range(limits[0].burst):
        alone.acquire("e3", "r", {"rps": 1}, limits)
    with pytest.raises(RateLimitExceeded) as refused:
        alone.acquire("e3", "r", {"rps": 1}, limits)
    assert (refused.value.jitter, refused.value.retry_after) == (0.0, 0.1)


def test_reservations_are_one_write_each_and_spaced_by_their_cost(
    limiter: RateLimiter, clock: Clock
) -> None:
    limits = [Limit.per_second("rps", 10)]
    for _ in range(10):
        limiter.acquire("e", "r", {"rps": 1}, limits)
    counter = Counter(limiter)
    waits = []
    for _ in range(20):
        lease = limiter.reserve("e", "r", {"rps": 1}, limits, horizon=2.0)
        waits.append(lease.wait)
        assert counter.take() == ["UpdateItem"]
    assert waits == [pytest.approx(0.1 * (i + 1)) for i in range(20)]
    with pytest.raises(RateLimitExceeded) as beyond:
        limiter.reserve("e", "r", {"rps": 1}, limits, horizon=2.0)
    assert beyond.value.retry_after == pytest.approx(2.1)


def test_adjust_goes_into_debt_and_debt_delays_later_requests(
    limiter: RateLimiter, clock: Clock
) -> None:
    limits = [Limit.per_second("rpm", 100), Limit.per_second("tpm", 1000)]
    counter = Counter(limiter)
    with limiter.acquire("e", "r", {"rpm": 1, "tpm": 500}, limits) as lease:
        counter.take()
        lease.adjust(tpm=1500)  # the call used 2000 tokens: 1000 more than the bucket holds
        assert counter.take() == ["UpdateItem"]
        lease.adjust(tpm=0, rpm=0)
        assert counter.take() == []
    assert lease.consumed == {"rpm": 1, "tpm": 2000}
    tokens = limiter.available("e", "r", limits)
    assert tokens["tpm"] == pytest.approx(-1000)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rpm": 1, "tpm": 1}, limits)
    assert refused.value.retry_after == pytest.approx(1.001)  # repay 1000 + 1 at 1000/s
    assert [v.limit_name for v in refused.value.violations] == ["tpm"]


def test_exception_inside_the_lease_rolls_back(limiter: RateLimiter) -> None:
    limits = [Limit.per_second("rps", 10)]
    before = limiter.available("e", "r", limits)
    with pytest.raises(RuntimeError), limiter.acquire("e", "r", {"rps": 4}, limits) as lease:
        lease.adjust(rps=3)
        raise RuntimeError("the provider call failed")
    assert limiter.available("e", "r", limits) == before
    assert lease.consumed == {"rps": 0}


@pytest.mark.contract
def test_cascade_consumes_the_parent_atomically(limiter: RateLimiter) -> None:
    limiter.create_entity("project")
    limiter.create_entity("key-1", parent_id="project", cascade=True)
    limiter.create_entity("key-2", parent_id="project", cascade=True)
    limiter.set_limits("project", [Limit.per_second("rps", 3)])
    code_limits = [Limit.per_second("rps", 10)]
    counter = Counter(limiter)
    for key in ("key-1", "key-2", "key-1"):
        limiter.acquire(key, "api", {"rps": 1}, code_limits)
    assert counter.take().count("TransactWriteItems") == 3
    child_before = limiter.available("key-2", "api", code_limits)
    counter.take()
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("key-2", "api", {"rps": 1}, code_limits)
    # A refusal is one request; none on a clamping store (Redis), whose transactions
    # return the parent's new state, so this process already knew it was full.
    clamps = getattr(limiter.store, "clamps", False)
    assert counter.take() == ([] if clamps else ["TransactWriteItems"])
    assert [(v.entity_id, v.limit_name) for v in refused.value.violations] == [("project", "rps")]
    # The child's own bucket had room: it is reported as passed, though the store
    # returned only the parent's item (its condition failed, the child's held).
    assert [(p.entity_id, p.limit_name, p.retry_after) for p in refused.value.passed] == [
        ("key-2", "rps", 0.0)
    ]
    assert refused.value.passed[0].available >= 1
    assert limiter.available("key-2", "api", code_limits) == child_before
    # What a request of key-2 can take now: the least of its bucket and its parent's.
    assert child_before == {"rps": 0.0}
    assert limiter.available("key-2", "api", code_limits) != limiter.available(
        "other", "api", code_limits
    )


@pytest.mark.contract
def test_buckets_reads_every_limit_of_an_entity(limiter: RateLimiter, clock: Clock) -> None:
    limiter.set_limits("tenant", [Limit.per_minute("tpm", 6000)], resource="gpt")
    code = [Limit.per_second("rps", 10)]
    limiter.acquire("tenant", "gpt", {"rps": 4, "tpm": 600}, code)
    limiter.acquire("tenant", "mini", {"rps": 1}, code)
    limiter.acquire("tenant", "old", {"gone": 5}, [Limit.per_second("gone", 10)])
    rows = {(r.resource, r.limit_name): r for r in limiter.buckets("tenant", limits=code)}
    # The code limits apply to every resource; "gone" is known to no one.
    expected = {("gpt", "rps"), ("gpt", "tpm"), ("mini", "rps"), ("old", "rps"), ("old", "gone")}
    assert set(rows) == expected
    assert rows[("gpt", "rps")].available == 6 and rows[("gpt", "rps")].burst == 10
    assert rows[("gpt", "tpm")].available == 5400 and rows[("gpt", "tpm")].in_use == 600
    assert rows[("gpt", "tpm")].full_in == pytest.approx(6.0)
    unknown = rows[("old", "gone")]  # no limit passed nor stored: its use only
    assert (unknown.burst, unknown.available, unknown.in_use) == (None, None, 5)
    assert unknown.full_in == pytest.approx(0.5)
    assert [r.resource for r in limiter.buckets("tenant", "mini", code)] == ["mini"]
    assert limiter.buckets("nobody") == []
    sources = {key: (r.source, r.used) for key, r in rows.items()}
    assert sources == {
        ("gpt", "rps"): ("code", True),
        ("gpt", "tpm"): ("resource", True),
        ("mini", "rps"): ("code", True),
        ("old", "rps"): ("code", False),  # a bucket, but nothing consumed under rps
        ("old", "gone"): (None, True),
    }


@pytest.mark.contract
def test_stored_limits_of_every_resource_and_their_unused_buckets(
    limiter: RateLimiter, backend: Backend, clock: Clock
) -> None:
    assert limiter.stored_limits("tenant") == {}
    wide, gpt, mini = Limit.per_day("rpd", 1000), Limit.per_minute("rpm", 5), Limit.per_hour("x", 7)
    limiter.set_limits("tenant", [mini], resource="mini")  # stored out of order
    limiter.set_limits("tenant", [wide])
    limiter.set_limits("tenant", [gpt, Limit.per_minute("rpd", 50)], resource="gpt")
    limiter.set_limits("tenant-2", [Limit.per_second("other", 1)], resource="gpt")
    limiter.create_entity("tenant", parent_id="tenant-2")  # a record is not a limit
    counter = Counter(limiter)
    stored = limiter.stored_limits("tenant")
    assert counter.take() == ["Query"]  # one read, whatever the number of resources
    assert list(stored) == [None, "gpt", "mini"]
    assert stored == {
        None: [wide],
        "gpt": [gpt, Limit.per_minute("rpd", 50)],
        "mini": [mini],
    }

    # No bucket yet: every resource with limits of its own shows them, full and unused.
    def rows(*args: Any) -> list[tuple[Any, ...]]:
        found = limiter.buckets("tenant", *args)
        return [(r.resource, r.limit_name, r.source, r.used, r.available) for r in found]

    assert rows() == [
        ("gpt", "rpd", "resource", False, 50.0),
        ("gpt", "rpm", "resource", False, 5.0),
        ("mini", "rpd", "entity", False, 1000.0),
        ("mini", "x", "resource", False, 7.0),
    ]
    # A request uses its buckets; a resource with none of its own limits joins the list.
    limiter.acquire("tenant", "gpt", {"rpm": 2}).commit()
    limiter.acquire("tenant", "plain", {"rpd": 1}).commit()
    assert rows() == [
        ("gpt", "rpd", "resource", False, 50.0),  # consumed nothing: still unused
        ("gpt", "rpm", "resource", True, 3.0),
        ("mini", "rpd", "entity", False, 1000.0),
        ("mini", "x", "resource", False, 7.0),
        ("plain", "rpd", "entity", True, 999.0),
    ]
    limiter.delete_limits("tenant", "mini")
    assert [r[0] for r in rows()] == ["gpt", "gpt", "plain"]
    assert rows("mini") == [("mini", "rpd", "entity", False, 1000.0)]

    async def read() -> dict[str | None, list[Limit]]:
        async with backend.async_limiter() as alimiter:
            return await alimiter.stored_limits("tenant")

    assert asyncio.run(read()) == {None: [wide], "gpt": [gpt, Limit.per_minute("rpd", 50)]}


def test_caches_of_a_process_stay_bounded(limiter: RateLimiter) -> None:
    limiter.engine.cache_size = 40
    limits = [Limit.per_second("rps", 10)]
    for i in range(200):
        limiter.acquire(f"tenant-{i}", "model", {"rps": 1}, limits)
    assert len(limiter.engine._tats) <= 40 and len(limiter.engine._configs) <= 40
    assert ("tenant-199", "model", limits[0].key) in limiter.engine._tats  # the newest stay


def test_stored_limits_override_code_limits(limiter: RateLimiter) -> None:
    limiter.set_limits("tenant", [Limit.per_minute("rpm", 2)], resource="gpt")
    assert limiter.get_limits("tenant", "gpt") == [Limit.per_minute("rpm", 2)]
    code = [Limit.per_minute("rpm", 1000)]
    limiter.acquire("tenant", "gpt", {"rpm": 2}, code)
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("tenant", "gpt", {"rpm": 1}, code)
    limiter.acquire("tenant", "other", {"rpm": 5}, code)  # another resource: code limits
    limiter.delete_limits("tenant", "gpt")
    assert limiter.get_limits("tenant", "gpt") == []


@pytest.mark.contract
def test_incompatible_schema_is_refused(limiter: RateLimiter, backend: Backend) -> None:
    backend.stamp_version(999)
    other = backend.limiter()
    with pytest.raises(IncompatibleSchema, match="schema version 999"):
        other.acquire("e", "r", {"rps": 1}, [Limit.per_second("rps", 1)])


@pytest.mark.contract
def test_schema_version_reads_the_stamp_as_it_is(limiter: RateLimiter, backend: Backend) -> None:
    assert limiter.schema_version() == SCHEMA_VERSION  # create_table stamped it
    backend.stamp_version(999)
    other = backend.limiter()
    assert other.schema_version() == 999  # read, not refused: status shows it

    async def read() -> int | None:
        async with backend.async_limiter() as alimiter:
            return await alimiter.schema_version()

    assert asyncio.run(read()) == 999


def test_schema_version_stamps_nothing() -> None:
    store = MemoryStore()
    limiter = RateLimiter(store=store)
    assert limiter.schema_version() is None
    assert limiter.schema_version() is None and store.dump()["version"] is None
    limiter.warm_up()  # a request's first step stamps it
    assert limiter.schema_version() == SCHEMA_VERSION


def _script(clock: Clock) -> list[tuple[str, Any]]:
    """The operations run by both limiters in the parity test: (op, args)."""
    limits = [Limit.per_second("rps", 5), Limit.per_minute("tpm", 3000)]
    steps: list[tuple[str, Any]] = []
    for i in range(40):
        steps.append(("acquire", ({"rps": 1, "tpm": 40 + i}, limits, 0.0)))
        if i % 3 == 0:
            steps.append(("reserve", ({"rps": 1, "tpm": 10}, limits, 1.5)))
        steps.append(("advance", 0.07 * (i % 4)))
    return steps


@pytest.mark.contract
def test_async_and_sync_decide_identically(backend: Backend) -> None:
    sync_clock = Clock()
    sync = RateLimiter(store=backend.store("-s"), clock=sync_clock)
    sync.create_table()
    sync_out = []
    for op, arg in _script(sync_clock):
        if op == "advance":
            sync_clock.advance(arg)
            continue
        consume, limits, horizon = arg
        try:
            lease = sync.acquire("e", "r", consume, limits, horizon=horizon)
            sync_out.append(("granted", round(lease.wait, 3)))
        except RateLimitExceeded as exc:
            sync_out.append(("refused", round(exc.retry_after, 3)))

    async def run_async() -> list[tuple[str, float]]:
        clock = Clock()
        out = []
        async with AsyncRateLimiter(store=backend.store("-a"), clock=clock) as lim:
            await lim.create_table()
            for op, arg in _script(clock):
                if op == "advance":
                    clock.advance(arg)
                    continue
                consume, limits, horizon = arg
                try:
                    lease = await lim.acquire("e", "r", consume, limits, horizon=horizon)
                    out.append(("granted", round(lease.wait, 3)))
                except RateLimitExceeded as exc:
                    out.append(("refused", round(exc.retry_after, 3)))
            await lim.delete_table()
        return out

    async_out = asyncio.run(run_async())
    sync.delete_table()
    assert sync_out == async_out
    assert {d for d, _ in sync_out} == {"granted", "refused"}  # the script exercises both


@pytest.mark.contract
def test_extra_targets_share_one_bucket_atomically(limiter: RateLimiter) -> None:
    queue = [("queue:llm", "queue", [Limit.per_second("tasks", 3)])]
    own = [Limit.per_second("rps", 10)]
    counter = Counter(limiter)
    for entity in ("summarize", "translate", "summarize"):
        lease = limiter.acquire(entity, "model", {"rps": 1}, own, slot=Slot(extra=queue))
        assert lease.consumed == {"rps": 1}
    assert counter.take() == [
        "Query",
        "TransactWriteItems",
        "Query",
        "TransactWriteItems",
        "TransactWriteItems",
    ]
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("translate", "model", {"rps": 1}, own, slot=Slot(extra=queue))
    assert [(v.entity_id, v.limit_name) for v in refused.value.violations] == [
        ("queue:llm", "tasks")
    ]
    assert limiter.available("translate", "model", own)["rps"] == 9  # refusal charged nothing


def test_start_track_keeps_late_starts_within_the_burst(limiter: RateLimiter, clock: Clock) -> None:
    limits = [Limit.per_second("rps", 10)]

    def acquire(horizon: float = 0.0) -> Lease:
        return limiter.acquire("e", "r", {"rps": 1}, limits, horizon=horizon, slot=PACE)

    for _ in range(10):
        assert acquire().start_counted  # immediate grants count their start in the same write
    reserved = [acquire(horizon=5.0) for _ in range(5)]
    assert [not lease.start_counted for lease in reserved] == [True] * 5
    assert [lease.wait for lease in reserved] == [pytest.approx(0.1 * (i + 1)) for i in range(5)]
    clock.advance(2.0)  # the deferred messages arrive late, all at once
    for lease in reserved:
        limiter.start(lease)
    fresh = 0
    with pytest.raises(RateLimitExceeded) as refused:
        for _ in range(10):
            acquire()
            fresh += 1
    # The quota bucket is full again (10), but 5 starts already happened this instant.
    assert fresh == 5
    assert [v.limit_name for v in refused.value.violations] == ["rps~start"]


def test_block_empties_the_buckets_until_retry_after(limiter: RateLimiter, clock: Clock) -> None:
    limits = [Limit.per_second("rps", 10), Limit.per_minute("tpm", 6000)]
    limiter.acquire("e", "r", {"rps": 1, "tpm": 10}, limits)
    limiter.block("e", "r", limits, 2.0)
    limiter.block("e", "r", limits, 0.5)  # never shortens a block
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rps": 1, "tpm": 10}, limits)
    assert refused.value.retry_after == pytest.approx(2.1)  # 2 s, then one token of rps
    clock.advance(2.1)
    limiter.acquire("e", "r", {"rps": 1}, limits)


@pytest.mark.contract
def test_bucket_counters_tell_what_was_charged_and_how_often_it_was_blocked(
    limiter: RateLimiter, clock: Clock
) -> None:
    limits = [Limit.per_second("rps", 10), Limit.per_minute("tpm", 6000)]

    def counts() -> dict[str, tuple[int | None, int]]:
        return {r.limit_name: (r.charged, r.blocks) for r in limiter.buckets("e", "r", limits)}

    assert counts() == {"rps": (None, 0), "tpm": (None, 0)}
    with limiter.acquire("e", "r", {"rps": 1, "tpm": 500}, limits) as lease:
        lease.adjust(tpm=-380)  # the truth: 120 of the 500 estimated
    with limiter.acquire("e", "r", {"rps": 1, "tpm": 100}, limits) as lease:
        lease.adjust(tpm=300)  # the truth: 400, into debt
    assert counts() == {"rps": (2, 0), "tpm": (520, 0)}
    with pytest.raises(RateLimitExceeded):  # refused: nothing charged, nothing counted
        limiter.acquire("e", "r", {"rps": 1, "tpm": 5900}, limits)
    limiter.block("e", "r", limits, 2.0)
    limiter.block("e", "r", limits, 0.5)  # inside the first block: writes nothing
    assert counts() == {"rps": (2, 1), "tpm": (520, 1)}
    clock.advance(2.5)
    reserved = limiter.reserve("e", "r", {"rps": 1, "tpm": 10}, limits, horizon=5)
    limiter.start(reserved)  # the start track counts starts, not charges
    reserved.rollback()  # a refund of all it consumed
    assert counts() == {"rps": (2, 1), "tpm": (520, 1)}


def test_a_lease_round_trips_through_its_ticket(limiter: RateLimiter) -> None:
    lease = limiter.reserve("e", "r", {"rps": 1}, [Limit.per_second("rps", 10)], horizon=1)
    lease.claim_for("task-1")
    ticket = lease.ticket()
    assert ticket["v"] == 1
    copy = limiter.resume(ticket)
    assert copy.ticket() == ticket and copy.claimed_by("task-1")
    assert (copy.consumed, copy.start_at, copy.buckets) == (
        lease.consumed,
        lease.start_at,
        lease.buckets,
    )
    with pytest.raises(ValidationError, match=r"ticket\.v"):
        limiter.resume({**ticket, "v": 2})
    del ticket["v"]  # as releases before tickets had a version wrote them
    assert limiter.resume(ticket).ticket() == copy.ticket()


def test_a_reservation_holds_every_limit_until_its_common_start(
    limiter: RateLimiter, clock: Clock
) -> None:
    # rps binds (its burst is spent), tokens does not: without alignment the tokens
    # bucket would be charged "now" and let the next requests start too soon after this.
    limits = [Limit.per_second("rps", 10), Limit.per_second("tokens", 1000)]
    for _ in range(10):
        limiter.acquire("e", "r", {"rps": 1, "tokens": 0}, limits)
    counter = Counter(limiter)
    lease = limiter.reserve("e", "r", {"rps": 1, "tokens": 1}, limits, horizon=1.0)
    assert lease.wait == pytest.approx(0.1)
    # One write: this client's view predicted the common start (0.1 s), and the grant
    # counted tokens a margin after it (1 token = 1 ms of tokens' clock).
    assert counter.take() == ["UpdateItem"]
    margin = bucket.fold_margin_ms(limits[1], 1)
    assert 0 < margin <= bucket.FOLD_MAX_MS
    assert limiter.available("e", "r", limits) == {"rps": -1.0, "tokens": 899.0 - margin}
    clock.advance(0.1)
    assert limiter.available("e", "r", limits) == {"rps": 0.0, "tokens": 999.0 - margin}


@pytest.mark.contract
def test_a_busy_limit_short_of_the_common_start_is_padded_in_the_grant(
    limiter: RateLimiter, clock: Clock
) -> None:
    # rps binds (its burst is spent); tokens is busy (this client's grants left it 20 ms
    # ahead of now) but its own slot is now: a plain queue add would count it 80 ms
    # before the start and cost an alignment. The grant adds what is missing up to the
    # start and the margin instead: one write, counted there.
    limits = [Limit.per_second("rps", 10), Limit.per_second("tokens", 1000)]
    for _ in range(10):
        limiter.acquire("e", "r", {"rps": 1, "tokens": 2}, limits)
    counter = Counter(limiter)
    lease = limiter.reserve("e", "r", {"rps": 1, "tokens": 1}, limits, horizon=1.0)
    assert lease.wait == pytest.approx(0.1)
    assert counter.take() == ["UpdateItem"]
    margin = bucket.fold_margin_ms(limits[1], 1)
    assert limiter.available("e", "r", limits)["tokens"] == 899.0 - margin
    clock.advance(0.1)
    assert limiter.available("e", "r", limits)["tokens"] == 999.0 - margin  # never early


@pytest.mark.parametrize(("others", "writes"), [(2, 1), (5, 2)])
def test_a_reservation_later_than_predicted_is_aligned_beyond_the_margin_only(
    limiter: RateLimiter, backend: Backend, clock: Clock, others: int, writes: int
) -> None:
    # This client's view of rps is stale: another client reserved `others` slots since.
    # tokens was counted a margin (249 ms) after the predicted start (0.1 s): a real
    # start up to the margin later (0.3 s) needs no more; a later one (0.6 s) costs one
    # more write, which moves tokens to the margin after the real start.
    limits = [Limit.per_second("rps", 10), Limit.per_second("tokens", 1000)]
    for _ in range(10):
        limiter.acquire("e", "r", {"rps": 1, "tokens": 0}, limits)
    other = backend.limiter()
    for _ in range(others):
        other.reserve("e", "r", {"rps": 1}, limits[:1], horizon=1.0)
    counter = Counter(limiter)
    lease = limiter.reserve("e", "r", {"rps": 1, "tokens": 1}, limits, horizon=1.0)
    start = 0.1 * (others + 1)
    assert lease.wait == pytest.approx(start)
    assert counter.take() == ["UpdateItem"] * writes
    margin = bucket.fold_margin_ms(limits[1], 1)
    counted_at = max(100 + margin, round(start * 1000) + (margin if writes == 2 else 0))
    assert limiter.available("e", "r", limits)["tokens"] == 999.0 - counted_at
    clock.advance(start)
    tokens = limiter.available("e", "r", limits)["tokens"]
    assert tokens <= 999.0  # counted at the start or later: never early
    assert tokens == 999.0 - (counted_at - round(start * 1000))


def test_a_bucket_whose_idle_write_lost_to_another_client_is_counted_a_margin_later(
    limiter: RateLimiter, backend: Backend, clock: Clock
) -> None:
    # This client last saw the bucket idle; another client's grant moved it beyond its
    # clock: the idle-shape (FRESH) write fails, the retry is exact, and the bucket is
    # contended for CONTENDED_MS. Its idle grants are then written a margin after now,
    # so that the bucket stays busy (queue adds, which no race can fail) while clients
    # keep coming; charged sooner by the margin, never later. Then exact again.
    limits = [Limit.per_second("rps", 100)]
    margin = bucket.fold_margin_ms(limits[0], 1)
    assert margin > 0
    limiter.acquire("e", "r", {"rps": 1}, limits)  # seen idle: 99 left
    clock.advance(1.0)
    backend.limiter().acquire("e", "r", {"rps": 5}, limits)  # another client: TAT > now
    counter = Counter(limiter)
    limiter.acquire("e", "r", {"rps": 1}, limits)
    assert counter.take() == ["UpdateItem", "UpdateItem"]  # the lost FRESH, the exact retry
    clock.advance(2.0)  # idle again, for longer than the burst
    limiter.acquire("e", "r", {"rps": 1}, limits)
    assert counter.take() == ["UpdateItem"]
    # 1 token = 10 ms of rps's clock: counted margin ms later, margin / 10 tokens sooner.
    assert limiter.available("e", "r", limits)["rps"] == 99.0 - margin / 10
    clock.advance(CONTENDED_MS / 1000 + 1.0)
    limiter.acquire("e", "r", {"rps": 1}, limits)
    assert limiter.available("e", "r", limits)["rps"] == 99.0


def test_a_close_slot_is_granted_with_its_start_counted_in_one_write(
    limiter: RateLimiter, clock: Clock
) -> None:
    limits = [Limit.per_second("rps", 10)]
    for _ in range(10):
        limiter.acquire("e", "r", {"rps": 1}, limits, slot=PACE)
    counter = Counter(limiter)
    close = [
        limiter.acquire("e", "r", {"rps": 1}, limits, horizon=5.0, slot=CLOSE) for _ in range(3)
    ]
    # Slots 0.1, 0.2, 0.3 s ahead: each started at its slot, in one write.
    assert [lease.wait for lease in close] == [pytest.approx(0.1 * (i + 1)) for i in range(3)]
    assert all(lease.start_counted and lease.started_at == lease.start_at for lease in close)
    assert counter.take() == ["UpdateItem"] * 3
    # The next slot (0.4 s) is beyond start_within: a reservation, its start not counted.
    far = limiter.acquire("e", "r", {"rps": 1}, limits, horizon=5.0, slot=CLOSE)
    assert far.wait == pytest.approx(0.4) and not far.start_counted
    assert counter.take() == ["UpdateItem"]  # the refusal within 0.35 s was predicted locally
    # The start track holds the three close starts: a late start of `far` at 0.4 s fits,
    # but nothing may start before the close ones' slots have passed.
    assert limiter.available("e", "r", [limits[0].start_track()])["rps"] == pytest.approx(-3)
    clock.advance(0.4)
    assert limiter.start(far) == 0


@pytest.mark.contract
def test_a_start_slot_reserved_ahead_travels_with_the_lease(
    limiter: RateLimiter, clock: Clock
) -> None:
    from zae_celery.core import LeaseClaimed

    limits = [Limit.per_second("rps", 10)]
    for _ in range(10):
        limiter.acquire("e", "r", {"rps": 1}, limits, slot=PACE)
    late = limiter.reserve("e", "r", {"rps": 1}, limits, horizon=5.0, slot=PACE)
    assert late.wait == pytest.approx(0.1) and not late.start_counted
    # Ten tasks waiting in place start at 0.2 s .. 1.1 s (counted on the start track).
    for _ in range(10):
        limiter.acquire(
            "e", "r", {"rps": 1}, limits, horizon=5.0, slot=Slot(pace=True, start_within=2.0)
        )
    clock.advance(0.1)  # the reserved task arrives at its slot: 20 starts by 1.1 s already
    late.claim_for("task-1")
    # The next start slot: 21 starts in [0, 1.1 s] is exactly burst + rate * 1.1 s.
    assert limiter.start(late, horizon=5.0) == pytest.approx(1.0)
    # Deferred again with its counted start and a fresh claim: its next arrival counts
    # nothing more, it only creates the claim, once.
    late.claim_for("task-1")  # its start was counted: a fresh claim
    carried = late.ticket()
    assert carried["started_ms"] == round((late.started_at or 0) * 1000)
    counter = Counter(limiter)
    again = limiter.resume(carried)
    assert again.start_counted and again.started_at == pytest.approx(late.started_at or 0)
    clock.advance(1.0)
    assert limiter.start(again) == 0
    assert counter.take() == ["UpdateItem"]  # the claim item alone
    with pytest.raises(LeaseClaimed):  # another delivery of the same message
        limiter.start(limiter.resume(carried))
    assert limiter.resume(carried).start_counted


def test_a_client_that_saw_a_queued_bucket_guesses_it_queued_after_a_pause(
    limiter: RateLimiter, backend: Backend, clock: Clock
) -> None:
    """Two clients share a saturated bucket. One pauses (a worker waiting for a free
    process) while the other keeps it queued: its next write must not guess the bucket
    fresh from its own, now past, view (a refused condition and a second request)."""
    limits = [Limit.per_second("rps", 10)]
    other = backend.limiter()
    for _ in range(12):  # past the burst: the last grants were queued (TAT now + 1.2 s)
        limiter.reserve("e", "r", {"rps": 1}, limits, horizon=5.0)
    clock.advance(1.3)  # its own view of the TAT is now in the past...
    for _ in range(5):
        other.reserve("e", "r", {"rps": 1}, limits, horizon=5.0)  # ...the truth is not
    counter = Counter(limiter)
    lease = limiter.reserve("e", "r", {"rps": 1}, limits, horizon=5.0)
    assert counter.take() == ["UpdateItem"]  # one write: queued, as guessed
    assert lease.wait == 0.0  # the other five left it within its burst
    # Long after (beyond the burst), an idle bucket is guessed fresh again: one write.
    clock.advance(30)
    limiter.reserve("e", "r", {"rps": 1}, limits, horizon=5.0)
    assert counter.take() == ["UpdateItem"]


def test_an_unchecked_lease_travels_as_unchecked() -> None:
    state = LeaseState((), {}, 5, 5, unchecked=True, started_ms=5)
    restored = LeaseState.from_dict(state.to_dict())
    assert restored.unchecked and restored.paced
    assert not LeaseState.from_dict(LeaseState((), {}, 5, 5).to_dict()).unchecked


def test_items_expire_a_day_after_a_full_refill(clock: Clock) -> None:
    """An item's ttl: when its buckets would be full again (burst at the refill rate, plus
    any debt), plus a day; not the burst times the period (days for a tpm limit)."""
    memory = MemoryStore(clock=clock)
    limiter = RateLimiter(store=memory, clock=clock)
    written: list[WriteBuckets] = []
    send = memory.send

    def recording(op: Op) -> Reply:
        if isinstance(op, WriteBuckets):
            written.append(op)
        return send(op)

    memory.send = recording  # type: ignore[method-assign]
    tpm = Limit.per_minute("tpm", 90_000)  # full again 60 s after empty
    rph = Limit.per_hour("rph", 10, burst=20)  # 20 tokens at 10/h: 2 h
    with limiter.acquire("tenant", "model", {"tpm": 1, "rph": 1}, [tpm, rph]) as lease:
        lease.adjust(tpm=18_000_000)  # 200 minutes of debt beyond the burst
    now_s = clock.ms // 1000
    assert written[0].ttl == now_s + 2 * 3600 + 86_400  # the longest refill: rph's
    assert written[1].ttl == now_s + 201 * 60 + 86_400  # tpm's burst and debt: 201 min


# -- a provider's report pulls the buckets down -------------------------------------------------
@pytest.mark.contract
def test_pull_down_lowers_a_bucket_to_what_the_provider_reports_never_up(
    limiter: RateLimiter,
) -> None:
    limits = [Limit.per_second("rps", 10), Limit.per_second("tps", 1000)]
    counter = Counter(limiter)
    lease = limiter.acquire("e", "r", {"rps": 1, "tps": 100}, limits)
    counter.take()
    lease.pull_down({"rps": 3})  # another client of the key used what we did not see
    assert counter.take() == ["UpdateItem"]
    assert limiter.available("e", "r", limits)["rps"] == pytest.approx(3)
    counter.take()
    lease.pull_down({"rps": 5, "tps": 1000})  # more than the bucket holds: never up
    assert counter.take() == []  # known from the last write: nothing to lower
    assert limiter.available("e", "r", limits) == {
        "rps": pytest.approx(3),
        "tps": pytest.approx(900),
    }


@pytest.mark.contract
def test_pull_down_shares_the_write_of_the_usage_it_settles(limiter: RateLimiter) -> None:
    limits = [Limit.per_second("rps", 10), Limit.per_second("tps", 1000)]
    counter = Counter(limiter)
    lease = limiter.acquire("e", "r", {"rps": 1, "tps": 500}, limits)
    counter.take()
    # The provider billed 400 (a refund of 100) and says 200 tokens and 2 requests are left.
    lease.pull_down({"tps": 200, "rps": 2}, deltas={"tps": -100})
    assert counter.take() == ["UpdateItem"]
    assert lease.consumed == {"rps": 1, "tps": 400}
    assert limiter.available("e", "r", limits) == {
        "rps": pytest.approx(2),
        "tps": pytest.approx(200),
    }
    # Usage that leaves the bucket below the report already: the report changes nothing.
    counter.take()
    lease.pull_down({"tps": 150}, deltas={"tps": 600})
    assert counter.take() == ["UpdateItem"]
    assert limiter.available("e", "r", limits)["tps"] == pytest.approx(-400)


def test_a_report_from_the_past_counts_the_refill_since(limiter: RateLimiter, clock: Clock) -> None:
    limits = [Limit.per_second("rps", 10)]
    lease = limiter.acquire("e", "r", {"rps": 1}, limits)
    lease.pull_down({"rps": 0}, at=clock() - 0.5)  # the response left 0.5 s ago
    assert limiter.available("e", "r", limits)["rps"] == pytest.approx(5)


@pytest.mark.contract
def test_a_stale_view_of_the_bucket_costs_one_refused_condition_not_a_wrong_level(
    backend: Backend, limiter: RateLimiter
) -> None:
    limits = [Limit.per_second("tps", 1000)]
    lease = limiter.acquire("e", "r", {"tps": 100}, limits)  # this process saw 900 left
    other = backend.limiter()
    other.acquire("e", "r", {"tps": 850}, limits).commit()  # another worker: 50 left
    counter = Counter(limiter)
    # The provider's report (300 left) is older than the other worker's grant: it must not
    # lift the bucket from 50 back to 300; only the refund of 50 applies.
    lease.pull_down({"tps": 300}, deltas={"tps": -50})
    assert counter.take() == ["UpdateItem", "UpdateItem"]  # the refused raise, the refund
    assert limiter.available("e", "r", limits)["tps"] == pytest.approx(100)


@pytest.mark.contract
def test_a_refused_floor_with_nothing_else_to_write_ends_without_a_write(
    backend: Backend, limiter: RateLimiter
) -> None:
    limits = [Limit.per_second("tps", 1000)]
    limiter.create_entity("key")
    limiter.create_entity("tenant", parent_id="key", cascade=True)
    lease = limiter.acquire("tenant", "r", {"tps": 100}, limits)  # saw 900 left in both
    other = backend.limiter()
    other.acquire("tenant", "r", {"tps": 850}, limits).commit()  # 50 left in both
    counter = Counter(limiter)
    # Both buckets (a transaction): the guarded floors are refused, nothing is left to do.
    lease.pull_down({"tps": 300})
    assert counter.take() == ["TransactWriteItems"]
    assert limiter.available("tenant", "r", limits)["tps"] == pytest.approx(50)


def test_pull_down_reaches_only_the_named_buckets(limiter: RateLimiter) -> None:
    limiter.create_entity("key")
    limiter.create_entity("tenant", parent_id="key", cascade=True)
    limits = [Limit.per_second("rps", 10)]
    limiter.set_limits("key", limits)
    lease = limiter.acquire("tenant", "api", {"rps": 1}, limits)
    lease.pull_down({"rps": 0}, buckets=[("key", "api")])
    assert limiter.available("key", "api", limits)["rps"] == pytest.approx(0)
    assert limiter.available("other", "api", limits)["rps"] == pytest.approx(10)
    (own,) = limiter.buckets("tenant", "api", limits)  # its own bucket is untouched
    assert own.available == pytest.approx(9)


def test_pull_down_checks_the_report(limiter: RateLimiter) -> None:
    lease = limiter.acquire("e", "r", {"rps": 1}, [Limit.per_second("rps", 10)])
    with pytest.raises(ValidationError, match=r"remaining\.tpm"):
        lease.pull_down({"tpm": 5})
    with pytest.raises(ValidationError, match=r"remaining\.rps"):
        lease.pull_down({"rps": -1})
    with pytest.raises(ValidationError, match="remaining"):
        lease.pull_down([("rps", 1)])  # type: ignore[arg-type]


def test_async_pull_down_decides_as_the_sync_one(backend: Backend, clock: Clock) -> None:
    limits = [Limit.per_second("rps", 10)]

    async def run() -> float:
        async with backend.async_limiter() as lim:
            lease = await lim.acquire("e", "r", {"rps": 1}, limits)
            await lease.pull_down({"rps": 4})
            return (await lim.available("e", "r", limits))["rps"]

    assert asyncio.run(run()) == pytest.approx(4)


def test_a_provider_that_refills_slower_charges_each_run_in_proportion(
    limiter: RateLimiter,
) -> None:
    limits = [Limit.per_second("rps", 10)]  # the configured key: 10 a second
    counter = Counter(limiter)
    for _ in range(8):
        lease = limiter.acquire("e", "r", {"rps": 1}, limits)
        # The provider refills 8 a second: each request costs 10/8 of one, the quarter
        # carried over to this process's next run (a whole token every fourth run).
        lease.pull_down({"rps": 10}, rates={"rps": 8.0})
        lease.commit()
    assert counter.take().count("UpdateItem") == 8 + 2  # 8 grants, 2 surcharges
    assert limiter.available("e", "r", limits)["rps"] == pytest.approx(10 - 8 - 2)
    # A provider refilling as fast or faster charges nothing more.
    other = limiter.acquire("f", "r", {"rps": 1}, limits)
    other.pull_down({"rps": 10}, rates={"rps": 12.0})
    assert other.consumed == {"rps": 1}
    with pytest.raises(ValidationError, match=r"rates\.rps"):
        other.pull_down({"rps": 1}, rates={"rps": 0.0})


def test_a_lease_that_counted_its_start_pulls_the_start_track_down_too(
    limiter: RateLimiter,
) -> None:
    limits = [Limit.per_second("rps", 10)]
    lease = limiter.acquire("e", "r", {"rps": 1}, limits, slot=PACE)
    assert lease.start_counted
    lease.pull_down({"rps": 2})
    for _ in range(2):
        limiter.acquire("e", "r", {"rps": 1}, limits, slot=PACE)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire("e", "r", {"rps": 1}, limits, slot=PACE)
    assert {v.limit_name for v in refused.value.violations} == {"rps", "rps~start"}
