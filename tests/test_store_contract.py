"""The store contract: every operation and failure shape, answered alike by the in-memory
store and by real DynamoDB APIs over HTTP (moto server and DynamoDB Local).

The engine's own tests run in memory; this suite is what makes that honest. Each case
sends the engine's operations to a store directly and checks the reply exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Backend
from tests.faults import FaultyHttpProxy, FaultyRedisProxy
from tests.helpers import Clock
from zae_celery.core import EndpointUnreachable, Limit
from zae_celery.core.bucket import Shape, Step, cost, counted, now_units
from zae_celery.core.ops import (
    CLAIMED,
    CONDITION,
    EXISTS,
    NO_TABLE,
    THROTTLED,
    UNAVAILABLE,
    BucketKey,
    CreateClaim,
    CreateTable,
    DeleteLimits,
    DeleteTable,
    EnableExpiry,
    EntityRecord,
    ItemWrite,
    ListBuckets,
    PutEntity,
    PutLimits,
    ReadBucket,
    ReadEntity,
    ReadSchema,
    Reply,
    StampSchema,
    TableStatus,
    WriteBuckets,
)
from zae_celery.core.stores import DynamoDBStore, MemoryStore, RedisStore, Store
from zae_celery.testing import free_port

pytestmark = pytest.mark.contract

RPS = Limit.per_second("rps", 10)
TPM = Limit.per_minute("tpm", 6000)
NOW = 1_800_000_000_000
TTL = NOW // 1000 + 86_400
A, B = BucketKey("tenant", "model"), BucketKey("parent", "model")


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """A created, empty table on the test's store."""
    store = backend.store()
    reply = store.send(CreateTable())
    if backend.memory is None:
        assert reply == Reply(True)
        while not store.send(TableStatus()).value:
            pass  # DynamoDB Local and moto create tables at once; AWS would need a pause
        assert store.send(EnableExpiry()).ok
    else:
        assert reply.code == EXISTS  # a memory store starts created
    yield store
    store.send(DeleteTable())


def fresh(limit: Limit, tokens: int, now_ms: int = NOW) -> Step:
    """A grant on an idle bucket: TAT <= now, set to now + cost."""
    now = now_units(limit, now_ms)
    return Step(limit, tokens, Shape.FRESH, now, now + cost(limit, tokens))


def queue(limit: Limit, tokens: int, bound: int | None, now_ms: int = NOW) -> Step:
    """A grant on a busy bucket: now < TAT (<= bound), add the cost."""
    return Step(limit, tokens, Shape.QUEUE, now_units(limit, now_ms), cost(limit, tokens), bound)


def write(*items: tuple[BucketKey, tuple[Step, ...]], claim: Any = None) -> WriteBuckets:
    return WriteBuckets(tuple(ItemWrite(k, s) for k, s in items), TTL, claim)


def bucket(store: Store, key: BucketKey) -> Any:
    reply = store.send(ReadBucket(key))
    assert reply.ok, reply
    return reply.value


# -- bucket writes ------------------------------------------------------------------------
def test_one_item_write_returns_the_new_values(store: Store) -> None:
    reply = store.send(write((A, (fresh(RPS, 1), fresh(TPM, 100)))))
    expected = {RPS.key: fresh(RPS, 1).amount, TPM.key: fresh(TPM, 100).amount}
    assert reply == Reply((expected,))
    assert bucket(store, A) == expected
    again = store.send(write((A, (queue(RPS, 1, None), queue(TPM, 50, None)))))
    assert again.value[0] == {
        RPS.key: expected[RPS.key] + cost(RPS, 1),
        TPM.key: expected[TPM.key] + cost(TPM, 50),
    }


def test_a_failed_condition_returns_the_current_item_and_writes_nothing(store: Store) -> None:
    first = store.send(write((A, (fresh(RPS, 1),)))).value[0]
    refused = store.send(write((A, (fresh(RPS, 1, NOW - 1),))))  # guessed idle: it is not
    assert refused.code == CONDITION
    assert refused.current == (first,)
    assert bucket(store, A) == first


def test_a_failed_condition_on_a_missing_item_returns_no_item(store: Store) -> None:
    # DynamoDB returns no item for an item that does not exist: the engine reads it.
    refused = store.send(write((A, (queue(RPS, 1, None),))))
    assert refused.code == CONDITION and refused.current == (None,)
    assert bucket(store, A) == {}


def test_every_shape_checks_and_writes_as_the_engine_plans(store: Store) -> None:
    now = now_units(RPS, NOW)
    base = store.send(write((A, (fresh(RPS, 5),)))).value[0][RPS.key]
    check_ok = Step(RPS, 0, Shape.CHECK, now, 0, bound=base)
    check_no = Step(RPS, 0, Shape.CHECK, now, 0, bound=base - 1)
    assert store.send(write((A, (check_ok,)))).value[0] == {RPS.key: base}
    assert store.send(write((A, (check_no,)))).code == CONDITION
    exact_no = Step(RPS, 1, Shape.EXACT, now, base + 7, expected=base - 1)
    exact_ok = Step(RPS, 1, Shape.EXACT, now, base + 7, expected=base)
    assert store.send(write((A, (exact_no,)))).code == CONDITION
    assert store.send(write((A, (exact_ok,)))).value[0] == {RPS.key: base + 7}
    raise_to = Step(RPS, 0, Shape.RAISE, now, base + 100)
    assert store.send(write((A, (raise_to,)))).value[0] == {RPS.key: base + 100}
    assert store.send(write((A, (raise_to,)))).code == CONDITION  # never lowers or repeats
    refund = Step(RPS, -1, Shape.REFUND, now, -cost(RPS, 1))
    assert store.send(write((A, (refund,)))).value[0] == {RPS.key: base + 100 - cost(RPS, 1)}
    bounded = queue(RPS, 1, bound=now)  # TAT beyond the bound: refused
    assert store.send(write((A, (bounded,)))).code == CONDITION
    # An unwritten attribute: EXACT expecting none, REFUND adding to none.
    new = Step(TPM, 1, Shape.EXACT, now_units(TPM, NOW), 42, expected=None)
    assert store.send(write((A, (new,)))).value[0][TPM.key] == 42
    assert store.send(write((B, (refund,)))).value[0] == {RPS.key: -cost(RPS, 1)}


def test_counters_ride_in_the_write_and_count_only_what_lands(store: Store) -> None:
    used_rps, used_tpm = RPS.counter().key, TPM.counter().key
    first = store.send(write((A, counted((fresh(RPS, 1), fresh(TPM, 100)))))).value[0]
    assert (first[used_rps], first[used_tpm]) == (1, 100)
    refused = store.send(write((A, counted((fresh(RPS, 1, NOW - 1), fresh(TPM, 100))))))
    assert refused.code == CONDITION and refused.current == (first,)  # counted nothing
    refund = Step(TPM, -40, Shape.REFUND, 0, -cost(TPM, 40))
    after = store.send(write((A, counted((refund,))))).value[0]
    assert (after[used_rps], after[used_tpm]) == (1, 60)
    assert after[TPM.key] == first[TPM.key] - cost(TPM, 40)
    page, _ = store.send(ListBuckets("tenant", None, None)).value
    assert page == {"model": after}


def test_a_write_of_several_items_is_all_or_nothing(store: Store) -> None:
    parent = store.send(write((B, (fresh(RPS, 1),)))).value[0]
    # A's condition holds, B's does not (it is busy): nothing is written.
    refused = store.send(write((A, (fresh(RPS, 1),)), (B, (fresh(RPS, 1, NOW - 1),))))
    assert refused.code == CONDITION
    assert refused.current == (None, parent)  # the held item is not returned
    assert bucket(store, A) == {} and bucket(store, B) == parent
    granted = store.send(write((A, (fresh(RPS, 1),)), (B, (queue(RPS, 1, None),))))
    new_a, new_b = {RPS.key: fresh(RPS, 1).amount}, {RPS.key: parent[RPS.key] + cost(RPS, 1)}
    if getattr(store, "clamps", False):
        assert granted == Reply((new_a, new_b))  # a clamping store returns every item
    else:
        assert granted == Reply((None, None))  # a DynamoDB transaction returns no values
    assert bucket(store, A) == new_a
    assert bucket(store, B) == new_b


@pytest.mark.stores("memory", "redis", "redis-cluster")
def test_a_clamp_step_grants_on_an_idle_or_busy_bucket_in_one_write(store: Store) -> None:
    """CLAMP (stores that compute the refill clamp): ``TAT <= bound``, set
    ``max(TAT, now) + cost``; no shape to guess. DynamoDB cannot express it."""

    def clamp(tokens: int, bound: int | None, now_ms: int = NOW) -> Step:
        return Step(RPS, tokens, Shape.CLAMP, now_units(RPS, now_ms), cost(RPS, tokens), bound)

    now = now_units(RPS, NOW)
    absent = store.send(write((A, (clamp(1, now),))))
    assert absent.value[0] == {RPS.key: now + cost(RPS, 1)}  # absent: from now
    busy = store.send(write((A, (clamp(2, now + cost(RPS, 1)),))))
    assert busy.value[0] == {RPS.key: now + cost(RPS, 3)}  # busy: from the TAT
    refused = store.send(write((A, (clamp(1, now + cost(RPS, 3) - 1),))))
    assert refused.code == CONDITION and refused.current == (busy.value[0],)
    later = NOW + 10_000  # idle again: from now, not from the old TAT
    idle = store.send(write((A, (clamp(1, None, later),))))
    assert idle.value[0] == {RPS.key: now_units(RPS, later) + cost(RPS, 1)}
    assert bucket(store, A) == idle.value[0]


# -- claims -------------------------------------------------------------------------------
def test_a_claim_is_created_once_alone_or_with_a_write(store: Store) -> None:
    assert store.send(CreateClaim("tenant", "task-1:n", TTL)) == Reply()
    assert store.send(CreateClaim("tenant", "task-1:n", TTL)).code == CLAIMED
    assert store.send(write((A, (fresh(RPS, 1),)), claim=("tenant", "task-2:n"))).ok
    taken = store.send(write((A, (queue(RPS, 1, None),)), claim=("tenant", "task-2:n")))
    assert taken.code == CLAIMED
    assert bucket(store, A) == {RPS.key: fresh(RPS, 1).amount}  # nothing counted twice


# -- records ------------------------------------------------------------------------------
def test_entity_records_and_stored_limits(store: Store) -> None:
    assert store.send(ReadEntity("child")).value == EntityRecord()
    assert store.send(PutEntity("child", "parent", True)).ok
    assert store.send(PutLimits("child", None, (RPS,))).ok
    assert store.send(PutLimits("child", "model", (TPM, RPS))).ok
    record = store.send(ReadEntity("child")).value
    assert record == EntityRecord(True, "parent", True, {"*": (RPS,), "model": (TPM, RPS)})
    assert store.send(DeleteLimits("child", "model")).ok
    assert store.send(ReadEntity("child")).value.limits == {"*": (RPS,)}
    assert store.send(PutEntity("child", None, False)).ok  # replaced
    assert store.send(ReadEntity("child")).value == EntityRecord(True, None, False, {"*": (RPS,)})


def test_listing_buckets_of_an_entity(store: Store) -> None:
    for resource in ("a", "b", "c"):
        store.send(write((BucketKey("tenant", resource), (fresh(RPS, 1),))))
    store.send(write((BucketKey("other", "a"), (fresh(RPS, 2),))))
    store.send(CreateClaim("tenant", "x", TTL))  # not a bucket
    store.send(PutEntity("tenant", None, False))  # nor this
    page, after = store.send(ListBuckets("tenant")).value
    assert after is None
    assert page == {r: {RPS.key: fresh(RPS, 1).amount} for r in ("a", "b", "c")}
    assert store.send(ListBuckets("tenant", "b")).value == ({"b": page["b"]}, None)
    assert store.send(ListBuckets("tenant", "zzz")).value == ({}, None)


def test_schema_stamp(store: Store) -> None:
    assert store.send(ReadSchema()) == Reply(None)
    assert store.send(StampSchema(1)) == Reply()
    assert store.send(StampSchema(2)).code == EXISTS
    assert store.send(ReadSchema()) == Reply(1)


@pytest.mark.stores("memory", "moto", "dynamodb-local")
def test_a_missing_table(store: Store) -> None:
    assert store.send(CreateTable()).code == EXISTS
    store.send(DeleteTable())
    for op in (ReadSchema(), write((A, (fresh(RPS, 1),))), ReadEntity("e"), ReadBucket(A)):
        assert store.send(op).code == NO_TABLE
    assert store.send(CreateTable()) == Reply(True)


@pytest.mark.stores("redis", "redis-cluster", "valkey")
def test_a_redis_store_has_no_table_to_create(store: Store) -> None:
    # A prefix needs no creating: a deleted store is an empty one, stamped on first use.
    assert store.send(CreateTable()) == Reply(True)  # nothing stamped yet
    assert store.send(StampSchema(1)) == Reply()
    assert store.send(CreateTable()).code == EXISTS
    store.send(write((A, (fresh(RPS, 1),))))
    store.send(DeleteTable())
    assert store.send(ReadSchema()) == Reply(None)
    assert bucket(store, A) == {}
    assert store.send(CreateTable()) == Reply(True)
    assert store.send(write((A, (fresh(RPS, 1),)))).ok


# -- failures -----------------------------------------------------------------------------
@pytest.fixture
def faulty(backend: Backend, clock: Clock) -> Iterator[tuple[Store, Any]]:
    """A store whose next request can be made to fail: (store, inject(fault))."""
    if backend.memory is not None:
        memory = MemoryStore(clock=clock)
        yield memory, memory.fail_next
        return
    assert backend.endpoint is not None
    if backend.kind in ("redis", "valkey"):
        with FaultyRedisProxy(backend.endpoint.url) as redis_proxy:
            errors = {"throttled": "OOM command not allowed", "unavailable": "LOADING loading"}

            def inject_redis(fault: str) -> None:
                if fault in errors:
                    redis_proxy.inject(1, errors[fault])
                else:
                    redis_proxy.stop()

            prefix = backend.endpoint.table_name
            yield RedisStore(redis_proxy.url, prefix=prefix, clock=clock), inject_redis
        return
    real = DynamoDBStore(backend.endpoint.table_name, endpoint_url=backend.endpoint.url)
    real.send(CreateTable())
    proxy = FaultyHttpProxy(backend.endpoint.url)
    try:
        store = DynamoDBStore(backend.endpoint.table_name, endpoint_url=proxy.url)

        def inject(fault: str) -> None:
            if fault == "throttled":
                proxy.inject(1, "ThrottlingException", 400)
            elif fault == "unavailable":
                proxy.inject(1, "InternalServerError", 500)
            else:
                proxy.close()

        yield store, inject
    finally:
        proxy.close()
        real.send(DeleteTable())


NO_PROXY = pytest.mark.stores("memory", "moto", "dynamodb-local", "redis", "valkey")
"""A proxy cannot stand in front of a cluster (its replies name the nodes themselves)."""


@NO_PROXY
@pytest.mark.parametrize(
    ("fault", "code"), [("throttled", THROTTLED), ("unavailable", UNAVAILABLE)]
)
def test_throttled_and_server_errors_are_transient_replies(
    faulty: tuple[Store, Any], fault: str, code: str
) -> None:
    store, inject = faulty
    inject(fault)
    reply = store.send(write((A, (fresh(RPS, 1),))))
    assert reply.code == code and reply.transient
    assert store.send(write((A, (fresh(RPS, 1),)))).ok  # only the one request failed


@NO_PROXY
def test_no_reply_raises_endpoint_unreachable(faulty: tuple[Store, Any]) -> None:
    store, inject = faulty
    inject("unreachable")
    with pytest.raises(EndpointUnreachable):
        store.send(write((A, (fresh(RPS, 1),))))


@pytest.mark.parametrize("kind", ["dynamodb", "redis"])
def test_an_endpoint_nobody_listens_on_is_unreachable(kind: str) -> None:
    port = free_port()
    store: Store = (
        DynamoDBStore("zae-nowhere", endpoint_url=f"http://127.0.0.1:{port}")
        if kind == "dynamodb"
        else RedisStore(f"redis://127.0.0.1:{port}/0")
    )
    with pytest.raises(EndpointUnreachable):
        store.send(ReadSchema())
