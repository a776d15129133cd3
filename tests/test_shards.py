"""A hot bucket spread over shards (``Limit.shards``): exact shares, adherence of the
whole, the choice of a shard and the retry on another, reads, blocks and tickets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Backend
from tests.helpers import Clock, Counter, table_contents
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded
from zae_celery.core.errors import RequestExceedsBurst, ValidationError
from zae_celery.core.limits import MAX_SHARDS
from zae_celery.core.shards import count, item_resource, split
from zae_celery.core.stores import MemoryStore

HOT = Limit.per_second("rps", 8).with_shards(4)  # 4 shards of 2 tokens, 2 a second each


@given(
    capacity=st.integers(1, 10**6),
    extra=st.integers(0, 10**6),
    amount=st.integers(1, 10**6),
    period_ms=st.integers(1, 10**6),
    data=st.data(),
)
def test_the_shards_add_up_to_the_whole_exactly(
    capacity: int, extra: int, amount: int, period_ms: int, data: st.DataObject
) -> None:
    shards = data.draw(st.integers(1, min(capacity, MAX_SHARDS)))
    whole = Limit("x", capacity, capacity + extra, amount, period_ms, shards=shards)
    parts = [split(whole, shards, i) for i in range(shards)]
    assert sum(p.capacity for p in parts) == whole.capacity
    assert sum(p.burst for p in parts) == whole.burst
    assert all(p.burst >= p.capacity >= 1 for p in parts)
    # Each shard refills the same amount over shards times the period: rates add up.
    assert all(
        p.refill_amount * whole.refill_period_ms * shards
        == (whole.refill_amount * p.refill_period_ms)
        for p in parts
    )
    assert max(p.burst for p in parts) - min(p.burst for p in parts) <= 1


def test_the_text_and_dict_forms_carry_the_shards() -> None:
    limit = Limit.parse("rps=5k/s:shards=8")
    assert limit == Limit.per_second("rps", 5000).with_shards(8)
    assert limit.format() == "rps=5000/s:shards=8"
    assert Limit.from_dict(limit.to_dict()) == limit
    assert "shards" not in Limit.per_second("rps", 5).to_dict()
    assert count([Limit.per_minute("tpm", 100), limit]) == 8


@pytest.mark.parametrize(
    ("build", "allowed"),
    [
        (lambda: Limit.per_second("rps", 5).with_shards(0), "1..256"),
        (lambda: Limit.per_second("rps", 5).with_shards(MAX_SHARDS + 1), "1..256"),
        (lambda: Limit.per_second("rps", 5).with_shards(6), "at most 5"),
        (lambda: Limit.concurrent("calls", 8).with_shards(2), "in-flight"),
        (lambda: Limit.parse("rps=5/s:shards=0"), "1.."),
    ],
)
def test_bad_shard_counts_say_what_is_allowed(build: object, allowed: str) -> None:
    with pytest.raises(ValidationError) as info:
        build()  # type: ignore[operator]
    assert allowed in info.value.allowed


def test_a_request_larger_than_one_shard_can_never_be_granted(limiter: RateLimiter) -> None:
    with pytest.raises(RequestExceedsBurst) as info:
        limiter.acquire("e", "api", {"rps": 3}, [HOT])
    assert (info.value.burst, info.value.shards) == (2, 4)
    assert "fewer shards" in info.value.allowed


def test_an_inflight_cap_cannot_share_a_spread_resource(limiter: RateLimiter) -> None:
    with pytest.raises(ValidationError, match="in-flight cap"):
        limiter.acquire("e", "api", {}, [HOT, Limit.concurrent("calls", 4)])


@pytest.mark.contract
def test_grants_spread_over_the_shards_and_reads_add_them_up(
    backend: Backend, limiter: RateLimiter
) -> None:
    limiter.engine.random.seed(7)
    leases = [limiter.acquire("e", "api", {"rps": 1}, [HOT]) for _ in range(8)]
    used = {lease._state.targets[0].resource for lease in leases}
    assert used == {item_resource("api", i) for i in range(4)}  # 2 grants each
    with pytest.raises(RateLimitExceeded) as info:
        limiter.acquire("e", "api", {"rps": 1}, [HOT])
    assert info.value.violations[0].resource == "api"  # callers see their resource
    assert limiter.available("e", "api", [HOT]) == {"rps": 0}
    (row,) = limiter.buckets("e", "api", [HOT])
    assert (row.resource, row.burst, row.available, row.charged) == ("api", 8, 0, 8)
    # A whole entity's listing shows a spread resource whose limits are stored, once.
    assert limiter.buckets("e", limits=[HOT]) == []  # code limits name no resource
    limiter.set_limits("e", [HOT], "api")
    assert [(r.resource, r.charged) for r in limiter.buckets("e")] == [("api", 8)]
    assert {ref.resource for lease in leases for ref in lease.buckets} == {"api"}
    if backend.endpoint is not None and not backend.redis:  # each shard: a partition key
        keys = {(i["PK"]["S"], i["SK"]["S"]) for i in table_contents(backend.store())}
        assert {(f"E#e#api#{i}", f"B#api#{i}") for i in range(4)} <= keys
    backend.clock.advance(0.5)  # each shard refills 1 token per 0.5 s
    assert limiter.available("e", "api", [HOT]) == {"rps": 4}


def test_a_refused_shard_sends_the_request_to_another(backend: Backend) -> None:
    first = backend.limiter(stored_config=False)
    first.engine.random.seed(0)
    emptied = first.acquire("e", "api", {"rps": 2}, [HOT])._state.targets[0].resource
    for seed in range(6):  # fresh clients, whichever shard each tries first
        client = backend.limiter(stored_config=False)
        client.engine.random.seed(seed)
        client.warm_up()
        counter = Counter(client)
        lease = client.acquire("e", "api", {"rps": 1}, [HOT])
        assert lease._state.targets[0].resource != emptied
        assert counter.take().count("UpdateItem") <= 2  # at most: the emptied one, then another
        lease.rollback()
    for _ in range(3):  # every other shard emptied too
        first.acquire("e", "api", {"rps": 2}, [HOT])
    fresh = backend.limiter(stored_config=False)
    fresh.warm_up()
    counter = Counter(fresh)
    with pytest.raises(RateLimitExceeded):
        fresh.acquire("e", "api", {"rps": 2}, [HOT])
    assert counter.take().count("UpdateItem") == 2  # SHARD_TRIES, then the refusal stands


def test_a_view_that_rules_every_shard_out_writes_nothing(backend: Backend) -> None:
    limiter = backend.limiter()
    for _ in range(4):
        limiter.acquire("e", "api", {"rps": 2}, [HOT])
    counter = Counter(limiter)
    with pytest.raises(RateLimitExceeded) as info:
        limiter.acquire("e", "api", {"rps": 1}, [HOT])
    assert counter.take() == []
    assert info.value.retry_after == pytest.approx(0.5)


def test_a_block_empties_every_shard(limiter: RateLimiter, clock: Clock) -> None:
    limiter.block("e", "api", [HOT], 2.0)
    assert limiter.available("e", "api", [HOT])["rps"] <= 0
    (row,) = limiter.buckets("e", "api", [HOT])
    assert row.blocks == 4  # one block written on each shard
    with pytest.raises(RateLimitExceeded) as info:
        limiter.acquire("e", "api", {"rps": 1}, [HOT])
    assert info.value.retry_after >= 2.0


def test_a_ticket_settles_on_the_shard_that_granted_it(backend: Backend) -> None:
    granting, settling = backend.limiter(), backend.limiter()
    lease = granting.acquire("e", "api", {"rps": 2}, [HOT])
    ticket = lease.ticket()
    assert ticket["targets"][0]["resource"] == "api"  # the whole, and the shard's index
    resumed = settling.resume(ticket)
    assert resumed._state.targets == lease._state.targets
    resumed.commit(rps=-2)  # nothing used: both tokens back, on that shard
    assert settling.available("e", "api", [HOT]) == {"rps": 8}
    with pytest.raises(ValidationError, match="shard"):
        settling.resume({**ticket, "targets": [{**ticket["targets"][0], "shard": 4}]})


@pytest.mark.parametrize("seed", range(4))
def test_the_shards_together_never_exceed_the_whole_and_fill_it_under_uneven_load(
    seed: int,
) -> None:
    """Six clients (own views) on one bucket of 4 shards, for 60 s of a manual clock,
    each coming back when its refusal says: the tokens granted in any window never pass
    the whole bucket's burst plus its rate times the window, and the saturated bucket
    grants at least 95 % of its rate though the clients ask unevenly (1 or 2 tokens, and
    some three times as often)."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    rng = random.Random(seed)
    whole = Limit.per_second("rps", 40, burst=40).with_shards(4)
    clients = [RateLimiter(store=store, clock=clock, stored_config=False) for _ in range(6)]
    for i, client in enumerate(clients):
        client.engine.random.seed(seed * 10 + i)
    start_ms = clock.ms
    next_ms = [start_ms + rng.randrange(0, 50) for _ in clients]
    grants: list[tuple[int, int]] = []
    while True:
        i = min(range(len(clients)), key=next_ms.__getitem__)
        if next_ms[i] >= start_ms + 60_000:
            break
        clock.ms = next_ms[i]
        tokens = 1 + i % 2
        try:
            clients[i].acquire("e", "api", {"rps": tokens}, [whole])
            grants.append((clock.ms, tokens))
            gap = rng.randrange(0, 5 if i < 2 else 15)  # clients 0, 1 ask three times as often
        except RateLimitExceeded as exc:
            gap = max(1, round(exc.retry_after * 1000))
        next_ms[i] = clock.ms + gap
    # Every window [t_a, t_j]: 1000 * (tokens granted) <= 1000 * burst + 40 * (t_j - t_a),
    # that is (1000 * before_j+1 - 40 t_j) - (1000 * before_a - 40 t_a) <= 1000 * burst.
    before, least = 0, None
    for t, tokens in grants:
        here = 1000 * before - 40 * t
        least = here if least is None else min(least, here)
        before += tokens
        assert 1000 * before - 40 * t - least <= 1000 * whole.burst
    granted = sum(tokens for _, tokens in grants)
    assert granted >= 0.95 * (whole.burst + whole.rate * 60)


def test_a_shard_seen_idle_long_ago_is_guessed_queued_like_its_siblings(
    backend: Backend, clock: Clock
) -> None:
    """Shards share their bucket's load: a client whose view of a shard is old (idle
    then) but that has just seen another shard with a line ahead writes its grant on the
    old one in the queue form too, and the condition holds (a fresh-bucket guess would
    fail there and cost a second write)."""
    two = Limit.per_second("rps", 4).with_shards(2)  # 2 shards of 2 tokens, 2 a second
    client = backend.limiter(stored_config=False)
    seen: set[str] = set()
    for seed in range(20):  # the client sees both shards, idle
        client.engine.random.seed(seed)
        lease = client.acquire("e", "api", {"rps": 1}, [two])
        seen.add(lease._state.targets[0].resource)
        lease.rollback()
        if len(seen) == 2:
            break
    assert len(seen) == 2
    clock.advance(5)  # its view is old: both idle as far as it knows
    filler = backend.limiter(stored_config=False)
    for _ in range(8):  # both shards 4 tokens into their lines
        filler.reserve("e", "api", {"rps": 1}, [two], horizon=10)
    counter = Counter(client)
    first = client.reserve("e", "api", {"rps": 1}, [two], horizon=10)
    assert counter.take().count("UpdateItem") == 2  # its old view: fresh, refused
    second = client.reserve("e", "api", {"rps": 1}, [two], horizon=10)
    assert second._state.targets[0].resource != first._state.targets[0].resource
    assert counter.take() == ["UpdateItem"]  # the other shard: guessed queued, granted


def test_a_refused_reservation_does_not_try_another_shard(backend: Backend) -> None:
    two = Limit.per_second("rps", 4).with_shards(2)
    filler = backend.limiter(stored_config=False)
    for _ in range(8):
        filler.reserve("e", "api", {"rps": 1}, [two], horizon=10)
    client = backend.limiter(stored_config=False)
    client.warm_up()
    counter = Counter(client)
    with pytest.raises(RateLimitExceeded):  # each line is 2 s long: beyond a 1 s horizon
        client.reserve("e", "api", {"rps": 1}, [two], horizon=1)
    assert counter.take() == ["UpdateItem"]
