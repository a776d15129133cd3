"""One engine, every store, the same decisions: Hypothesis-generated programs of grants,
reservations, adjustments, refunds, blocks and clock steps run on the in-memory store
(writing as for DynamoDB, and as for Redis: CLAMP steps), a redis-server, a Redis Cluster
and DynamoDB Local, each with its own limiter and its own injected clock. Every store
must grant and refuse alike, with the same ``retry_after`` to the millisecond, the same
waits and the same debt.

Some programs use limits whose scaled TATs exceed 2**63 (a refill of up to 10**18 tokens
a minute): the Redis scripts must compare and add them exactly, as DynamoDB does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Clock
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded
from zae_celery.core.stores import DynamoDBStore, MemoryStore, RedisStore, Store
from zae_celery.testing import LocalServer

pytestmark = pytest.mark.contract

# -- programs -----------------------------------------------------------------------------
ENTITIES = ("solo", "child")  # "child" cascades to "parent": a write of two items


@st.composite
def limit_sets(draw: st.DrawFn) -> tuple[Limit, ...]:
    rpm = Limit.per_minute("rpm", draw(st.integers(1, 30)), burst=draw(st.integers(30, 40)))
    per_minute = draw(st.sampled_from([600, 90_000, 10**12, 10**18]))
    tpm = Limit.per_minute("tpm", per_minute)
    return (rpm, tpm)


def steps(tpm: int) -> st.SearchStrategy[tuple[Any, ...]]:
    tokens = st.integers(0, max(1, tpm // 3))
    return st.one_of(
        st.tuples(
            st.just("acquire"),
            st.sampled_from(ENTITIES),
            st.integers(0, 3),
            tokens,
            st.sampled_from([0, 0, 30]),
        ),
        st.tuples(st.just("adjust"), st.integers(-2, 2), st.integers(-tpm // 2, tpm // 2)),
        st.tuples(st.sampled_from(["commit", "rollback"])),
        st.tuples(st.just("block"), st.sampled_from(ENTITIES), st.integers(1, 90)),
        st.tuples(st.just("advance"), st.integers(0, 120_000)),
    )


@st.composite
def programs(draw: st.DrawFn) -> tuple[tuple[Limit, ...], list[tuple[Any, ...]]]:
    limits = draw(limit_sets())
    return limits, draw(st.lists(steps(limits[1].refill_amount), min_size=1, max_size=25))


# -- running one program on one store -----------------------------------------------------
def run(
    make: Callable[[Clock], Store], limits: tuple[Limit, ...], program: list[tuple[Any, ...]]
) -> list[Any]:
    """What every decision of ``program`` was, on a store ``make`` gives (with the
    limiter's clock), as plain data."""
    clock = Clock()
    limiter = RateLimiter(store=make(clock), clock=clock)
    ns = uuid.uuid4().hex[:8]  # the examples share a table: entities of their own
    limiter.create_entity(f"{ns}-child", parent_id=f"{ns}-parent", cascade=True)
    seen: list[Any] = []
    leases: list[Any] = []
    for step in program:
        kind = step[0]
        if kind == "acquire":
            _, entity, rpm, tpm, horizon = step
            try:
                lease = limiter.acquire(
                    f"{ns}-{entity}", "model", {"rpm": rpm, "tpm": tpm}, limits, horizon=horizon
                )
            except RateLimitExceeded as exc:
                seen.append(("refused", round(exc.retry_after * 1000), _names(exc)))
            else:
                leases.append(lease)
                seen.append(("granted", round(lease.wait * 1000)))
        elif kind == "adjust" and leases:
            _, rpm, tpm = step
            consumed = leases[-1].consumed
            # A refund of at most what was consumed (more is a ValidationError, no decision).
            rpm, tpm = max(rpm, -consumed["rpm"]), max(tpm, -consumed["tpm"])
            leases[-1].adjust(rpm=rpm, tpm=tpm)
            seen.append(("adjusted", dict(leases[-1].consumed)))
        elif kind in ("commit", "rollback") and leases:
            getattr(leases.pop(), kind)()
            seen.append((kind,))
        elif kind == "block":
            limiter.block(f"{ns}-{step[1]}", "model", limits, step[2])
            seen.append(("blocked",))
        elif kind == "advance":
            clock.advance(step[1] / 1000)
        for entity in (*ENTITIES, "parent"):
            seen.append(_state(limiter, f"{ns}-{entity}", limits, ns))
    return seen


def _names(exc: RateLimitExceeded) -> list[str]:
    return sorted(f"{v.entity_id.split('-', 1)[1]}/{v.limit_name}" for v in exc.violations)


def _state(limiter: RateLimiter, entity: str, limits: tuple[Limit, ...], ns: str) -> Any:
    return [
        (s.entity_id.removeprefix(ns), s.limit_name, s.available, s.in_use, s.full_in)
        for s in limiter.buckets(entity, "model", limits)
    ]


# -- the stores ---------------------------------------------------------------------------
@dataclass
class Stores:
    """One store of each kind (memory first: the reference)."""

    make: dict[str, Callable[[Clock], Store]]


@pytest.fixture(scope="module")
def stores(request: pytest.FixtureRequest) -> Iterator[Stores]:
    redis: LocalServer = request.getfixturevalue("redis")
    cluster: Any = request.getfixturevalue("redis_cluster")
    ddb: LocalServer = request.getfixturevalue("ddb_local")
    prefix = f"zae-diff-{uuid.uuid4().hex[:8]}"
    table = DynamoDBStore(prefix, endpoint_url=ddb.url)
    RateLimiter(store=table).create_table()
    made: dict[str, Callable[[Clock], Store]] = {
        "memory": lambda clock: MemoryStore(clock=clock),
        "memory-clamps": lambda clock: MemoryStore(clock=clock, clamps=True),
        "redis": lambda clock: RedisStore(redis.url, prefix=prefix, clock=clock),
        "redis-cluster": lambda clock: RedisStore(
            cluster.url, prefix=prefix, cluster=True, clock=clock
        ),
        "dynamodb-local": lambda clock: DynamoDBStore(prefix, endpoint_url=ddb.url),
    }
    yield Stores(made)
    RateLimiter(store=table).delete_table()
    for kind in ("redis", "redis-cluster"):
        RateLimiter(store=made[kind](Clock())).delete_table()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(programs())
def test_every_store_decides_alike(
    stores: Stores, program: tuple[tuple[Limit, ...], list[tuple[Any, ...]]]
) -> None:
    limits, steps_ = program
    results = {kind: run(make, limits, steps_) for kind, make in stores.make.items()}
    reference = results.pop("memory")
    for kind, seen in results.items():
        assert seen == reference, kind


def test_the_programs_reach_refusals_debt_and_big_numbers(stores: Stores) -> None:
    """The generated programs are not all trivial: a fixed one refuses, runs into debt
    and uses TATs beyond 2**63, and every store still agrees."""
    limits = (Limit.per_minute("rpm", 2, burst=2), Limit.per_minute("tpm", 10**18))
    program: list[tuple[Any, ...]] = [
        ("acquire", "child", 1, 10**17, 0),
        ("adjust", 0, 10**18),  # far beyond the burst: debt
        ("commit",),
        ("acquire", "child", 1, 1, 0),  # refused: in debt
        ("advance", 30_000),
        ("acquire", "solo", 2, 5, 30),
        ("rollback",),
    ]
    results = {kind: run(make, limits, program) for kind, make in stores.make.items()}
    reference = results["memory"]
    assert any(r[0] == "refused" for r in reference if isinstance(r, tuple))
    assert any(
        available is not None and available < 0
        for r in reference
        if isinstance(r, list)
        for _, _, available, _, _ in r
    )
    assert 10**18 * Clock().ms > 2**63  # the scaled TAT of tpm really is that large
    for kind, seen in results.items():
        assert seen == reference, kind
