"""The Redis store beyond the contract suite: an outage and the circuit breaker, a server
killed and restarted empty, flushed scripts, key expiry, the scripts' exact decimal
arithmetic, and single-slot atomic writes on a cluster.

Servers: the session's redis-server, 3-node cluster and valkey-server (tests/conftest.py),
and private redis-servers of a test's own where a test kills one or counts its commands.
Time that the engine or the breaker reads comes from an injected clock; nothing sleeps
but the retry policy's own pauses (a few tens of milliseconds).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import Backend, unavailable
from tests.faults import TcpProxy
from tests.helpers import T0, Clock, Counter, Front
from zae_celery.core import (
    CircuitOpen,
    EndpointUnreachable,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RateLimitExceeded,
    Slot,
    ValidationError,
)
from zae_celery.core.ops import CONDITION, BucketKey, Reply
from zae_celery.core.schema import ENTITY_SK, LIMITS_PREFIX, SCHEMA_VERSION
from zae_celery.core.stores import RedisStore
from zae_celery.core.stores.redis import _DECIMAL, SCRIPTS
from zae_celery.testing import LocalServer, ServerUnavailable, redis_server
from zae_celery.testing.servers import LocalCluster

RPH = Limit.per_hour("rph", 100)
"""Slow enough that a few seconds of the injected clock refill almost nothing."""
RPM = Limit.per_minute("rpm", 5)
TPM = Limit.per_minute("tpm", 6000)
QPS = Limit.per_second("qps", 50)


def _prefix() -> str:
    return f"zae-test-{uuid.uuid4().hex[:12]}"


def _private(stack: contextlib.ExitStack, log_dir: Path, port: int | None = None) -> LocalServer:
    """A redis-server of the test's own (stopped by its PID when ``stack`` closes)."""
    try:
        return stack.enter_context(redis_server(log_dir=log_dir, port=port))
    except ServerUnavailable as exc:
        unavailable(f"redis: {exc}")
        raise  # unreachable: unavailable() fails or skips


@contextlib.contextmanager
def front(kind: str, store: RedisStore, **options: Any) -> Iterator[Front]:
    made = Front(kind, store=store, **options)
    try:
        yield made
    finally:
        made.close()


# -- 1. the server goes away ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["closed", "open"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_outage_trips_the_breaker_and_a_probe_closes_it(
    redis: LocalServer, clock: Clock, kind: str, mode: str
) -> None:
    """A redis-server behind a proxy that stops (new connections refused, open ones
    reset) and starts again on the same port. The breaker's states, call after call:
    closed, closed, open (3 calls given up after 2 attempts each), open while refusing
    without I/O, half-open after the cool-down, open again when the probe fails, half-open,
    closed when the probe succeeds."""
    prefix = _prefix()
    with TcpProxy(redis.url) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, clock=clock)
        options = {"retry_attempts": 2, "breaker_threshold": 3, "breaker_cooldown": 5.0}
        with front(kind, store, clock=clock, on_unavailable=mode, **options) as call:
            limiter = call.limiter
            sent = Counter(limiter)

            def acquire() -> Any:
                return call("acquire", "e", "r", {"rph": 1}, [RPH])

            def refused_or_unchecked(error: type[RateLimiterUnavailable]) -> Any:
                """Closed mode raises ``error`` (returned); open mode grants unchecked."""
                if mode == "open":
                    assert acquire().unchecked
                    return None
                with pytest.raises(error) as failed:
                    acquire()
                if error is RateLimiterUnavailable:
                    assert not isinstance(failed.value, CircuitOpen)
                    assert isinstance(failed.value.__cause__, EndpointUnreachable)
                    assert "redis unavailable" in str(failed.value)
                return failed.value

            assert not acquire().unchecked
            sent.take()
            proxy.stop()  # the outage
            states = []
            for _ in range(3):
                refused_or_unchecked(RateLimiterUnavailable)
                assert sent.take() == ["UpdateItem"] * 2  # the retry policy's 2 attempts
                states.append(limiter.breaker.state)
            assert states == ["closed", "closed", "open"]

            # Open: every call fails fast (or goes unchecked) without connecting.
            accepted = proxy.accepted
            proxy.start()  # back, but the breaker waits out its cool-down
            refusals = [refused_or_unchecked(CircuitOpen) for _ in range(10)]
            assert sent.take() == [] and proxy.accepted == accepted
            assert limiter.breaker.refused == 10
            if mode == "closed":
                assert {r.retry_after for r in refusals} == {5.0}  # the clock stood still

            # Half-open: one probe; while the server is still away it opens the breaker again.
            proxy.stop()
            clock.advance(4.999)
            assert limiter.breaker.state == "open"
            clock.advance(0.001)
            states = [limiter.breaker.state]
            refused_or_unchecked(RateLimiterUnavailable)
            assert sent.take() == ["UpdateItem"] * 2
            states.append(limiter.breaker.state)

            # The server is back on its port: the next probe closes the breaker.
            proxy.start()
            clock.advance(5)
            states.append(limiter.breaker.state)
            assert not acquire().unchecked  # checked again
            states.append(limiter.breaker.state)
            assert states == ["half-open", "open", "half-open", "closed"]
            assert sent.take() == ["UpdateItem"] and proxy.accepted > accepted
            assert limiter.breaker.opened == 1  # a failed probe is not a new opening
            assert limiter.unavailable_grants == (3 + 10 + 1 if mode == "open" else 0)
            # The store counted the two checked grants, and none of the unchecked ones.
            after = 10.0 * RPH.rate  # the injected clock moved 10 s in all
            available = call("available", "e", "r", [RPH])
            assert available["rph"] == pytest.approx(RPH.burst - 2 + after)
            assert limiter.breaker.state == "closed"
        RateLimiter(store=RedisStore(redis.url, prefix=prefix)).delete_table()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_server_killed_and_restarted_empty(tmp_path: Path, clock: Clock, kind: str) -> None:
    """SIGKILL, then a new redis-server on the same port, without persistence: what a
    running worker and a new one see. Nobody takes a manual step.

    - While the server is away: RateLimiterUnavailable (closed mode), as for any outage.
    - Restarted empty: the same limiter goes on by itself (its next write finds its
      bucket gone, reads it and writes it anew); every bucket is full again, so a bucket
      drained before the kill grants up to one burst more than it should have.
    - The schema stamp is gone too; the running limiter checked it once and does not look
      again; the next limiter that starts (a new worker) stamps it again.
    - Entity records and stored limits are gone (they are configuration, as in DynamoDB,
      and the server kept nothing): a running limiter keeps its cached copy for
      ``config_ttl``, then code limits apply again and the cascade to the parent stops.
      Run Redis with AOF when limits are stored there.
    """
    prefix = _prefix()
    with contextlib.ExitStack() as stack:
        server = _private(stack, tmp_path)
        store = RedisStore(f"{server.url}/0", prefix=prefix, clock=clock)
        with front(kind, store, clock=clock, retry_attempts=2, config_ttl=60) as call:
            call("create_entity", "parent")
            call("create_entity", "child", "parent", cascade=True)
            call("set_limits", "child", [TPM], "model")
            for _ in range(RPM.burst):
                call("acquire", "child", "model", {"rpm": 1, "tpm": 100}, [RPM])
            with pytest.raises(RateLimitExceeded):  # drained: 5 of 5 a minute
                call("acquire", "child", "model", {"rpm": 1}, [RPM])
            keys = set(store.dump())
            assert store.scripts.bucket(BucketKey("parent", "model")) in keys  # the cascade

            os.kill(server.pid, signal.SIGKILL)  # mid-run, no shutdown, nothing saved
            server.process.wait()
            clock.advance(12)  # one token refilled: the limiter must ask the store
            with pytest.raises(RateLimiterUnavailable) as failed:
                call("acquire", "child", "model", {"rpm": 1}, [RPM])
            assert isinstance(failed.value.__cause__, EndpointUnreachable)

            restarted = _private(stack, tmp_path, port=server.port)
            assert restarted.port == server.port and restarted.pid != server.pid
            assert store.dump() == {}  # restarted empty

            # The same limiter, no manual step: granted, checked (cached config: cascade).
            lease = call("acquire", "child", "model", {"rpm": 1, "tpm": 100}, [RPM])
            assert not lease.unchecked
            assert store.scripts.bucket(BucketKey("parent", "model")) in store.dump()
            assert store.scripts.schema not in store.dump()  # not stamped by this limiter
            # Buckets gone = full: one taken since the restart, four left at once.
            assert call("available", "child", "model", [RPM])["rpm"] == RPM.burst - 1

            # A new worker: it stamps the schema again, and finds no stored config.
            again = RedisStore(f"{server.url}/0", prefix=prefix, clock=clock)
            with front(kind, again, clock=clock) as new:
                assert new("get_limits", "child", "model") == []
                assert store.dump()[store.scripts.schema] == str(SCHEMA_VERSION)
                for _ in range(RPM.burst - 1):  # granted: more than the minute allowed
                    new("acquire", "child", "model", {"rpm": 1}, [RPM])
                with pytest.raises(RateLimitExceeded):
                    new("acquire", "child", "model", {"rpm": 1}, [RPM])

            # The running limiter's cached config expires: code limits only, no cascade.
            clock.advance(60)
            with pytest.raises(ValidationError) as gone:  # tpm was a stored limit
                call("acquire", "child", "model", {"rpm": 1, "tpm": 100}, [RPM])
            assert gone.value.field == "consume.tpm"
            before = store.dump()
            call("acquire", "child", "model", {"rpm": 1}, [RPM])
            after = store.dump()
            parent, child = (
                store.scripts.bucket(BucketKey(e, "model")) for e in ("parent", "child")
            )
            assert after[parent] == before[parent]  # the parent's bucket is no longer consumed
            assert after[child][RPM.key] != before[child][RPM.key]


# -- 2. scripts flushed from the server -----------------------------------------------------
_IN_SCRIPTS = {
    name.lower()
    for body in SCRIPTS.values()
    for name in re.findall(r"redis\.call\('([A-Za-z]+)'", body)
}
"""Commands the store's scripts run on the server (not round trips of the client)."""


_HANDSHAKE = ("hello", "client", "auth", "select")
"""What a new connection sends before its first command (redis-py: HELLO 3, CLIENT SETINFO)."""


def _calls(clients: list[redis_py.Redis]) -> dict[str, tuple[int, int]]:
    """Every node's commands so far, summed: name -> (calls, failed calls). Redis 7 names
    a subcommand ``script|load``; Redis 6.2 counts it under ``script``."""
    total: dict[str, tuple[int, int]] = {}
    for client in clients:
        for key, stat in client.info("commandstats").items():
            name = key.removeprefix("cmdstat_").split("|")[0]
            calls, failed = total.get(name, (0, 0))
            total[name] = (calls + int(stat["calls"]), failed + int(stat.get("failed_calls", 0)))
    return total


def _round_trips(clients: list[redis_py.Redis], run: Callable[[], object]) -> dict[str, Any]:
    """The commands ``run`` sent (not those its scripts ran; not the INFO that counts)."""
    before = _calls(clients)
    run()
    after = _calls(clients)
    sent: dict[str, Any] = {}
    for name, (calls, failed) in after.items():
        was, was_failed = before.get(name, (0, 0))
        if name in _IN_SCRIPTS or name == "info" or calls == was:
            continue
        sent[name] = calls - was
        if failed > was_failed:
            sent[f"{name} failed"] = failed - was_failed
    return sent


@pytest.fixture(scope="module")
def quiet_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A redis-server that only this module's tests talk to (its command counts are theirs)."""
    with contextlib.ExitStack() as stack:
        yield _private(stack, tmp_path_factory.mktemp("quiet-redis"))


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("where", ["redis", "redis-cluster", "valkey"])
def test_flushed_scripts_are_loaded_again_and_a_decision_stays_one_evalsha(
    request: pytest.FixtureRequest, clock: Clock, where: str, kind: str
) -> None:
    if where == "redis-cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        nodes, url = cluster.nodes, cluster.url
    else:
        server: LocalServer = request.getfixturevalue(
            "quiet_redis" if where == "redis" else "valkey"
        )
        nodes, url = [server], server.url
    clients = [redis_py.Redis(host=n.host, port=n.port, decode_responses=True) for n in nodes]
    store = RedisStore(url, prefix=_prefix(), cluster=where == "redis-cluster", clock=clock)
    try:
        with front(kind, store, clock=clock) as call:

            def decide() -> None:
                lease = call("acquire", "e", "r", {"rpm": 1}, [Limit.per_minute("rpm", 100)])
                assert not lease.unchecked

            decide()  # schema and config read, scripts loaded
            assert _round_trips(clients, decide) == {"evalsha": 1}
            for client in clients:
                assert client.script_flush() is True  # as after a restart or SCRIPT FLUSH
            reload = _round_trips(clients, decide)  # NOSCRIPT, SCRIPT LOAD, EVALSHA again
            # redis-py loads a script on every primary of a cluster: a node the store had
            # not talked to yet gets a new connection first (its handshake is no decision).
            for name in _HANDSHAKE:
                reload.pop(name, None)
            assert reload["evalsha"] == 2 and reload["script"] >= 1
            assert set(reload) <= {"evalsha", "evalsha failed", "script"}
            if any("failed_calls" in s for s in clients[0].info("commandstats").values()):
                assert reload["evalsha failed"] == 1  # Redis >= 7 counts the NOSCRIPT
            assert _round_trips(clients, decide) == {"evalsha": 1}
            assert call.limiter.breaker.failures == 0
    finally:
        RateLimiter(store=store).delete_table()
        for client in clients:
            client.close()


# -- 3. every key but the configuration expires -----------------------------------------------
def _mix(limiter: RateLimiter) -> None:
    """A realistic run: entities, stored limits, a cascade grant with a queue's bucket,
    an adjustment, a reservation started once under a claim, and a block."""
    limiter.create_entity("parent")
    limiter.create_entity("child", "parent", cascade=True)
    limiter.set_limits("parent", [RPM])  # every resource
    limiter.set_limits("child", [RPM, TPM], "model")
    queue = Slot(extra=[("queue", "celery", [QPS])])
    with limiter.acquire("child", "model", {"rpm": 1, "tpm": 100}, slot=queue) as lease:
        lease.adjust(tpm=250)
    reserved = limiter.reserve("child", "model", {"rpm": 1, "tpm": 100}, horizon=60)
    reserved.claim_for("task-1")
    assert limiter.start(limiter.resume(reserved.ticket())) == 0.0
    limiter.block("other", "model", [RPM], 30)


@pytest.mark.stores("redis", "redis-cluster", "valkey")
def test_every_key_but_the_configuration_expires(backend: Backend, limiter: RateLimiter) -> None:
    _mix(limiter)
    store = limiter.store
    assert isinstance(store, RedisStore)
    s = store.scripts
    ttls = {key: store.client.pttl(key) for key in store.dump()}
    config = {
        s.schema,
        *(s.key(e, sk) for e in ("parent", "child") for sk in (ENTITY_SK, LIMITS_PREFIX)),
    }
    buckets = {("child", "model"), ("parent", "model"), ("queue", "celery"), ("other", "model")}
    expiring = {s.bucket(BucketKey(*b)) for b in buckets} | {s.listing(e) for e, _ in buckets}
    claims = {key for key in ttls if "#C#" in key}
    assert len(claims) == 1 and next(iter(claims)).startswith(s.key("child", "C#"))
    assert set(ttls) == config | expiring | claims
    assert {key for key, ttl in ttls.items() if ttl == -1} == config  # never expire
    assert all(ttls[key] > 0 for key in expiring | claims)


@pytest.mark.parametrize("years", [-30, 50])
def test_keys_live_the_engines_ttl_on_the_limiters_clock(redis: LocalServer, years: int) -> None:
    """A limiter whose clock is decades off the server's (a test clock, a frozen clock):
    the keys it writes live a day plus a bucket's refill from its "now", neither expired at
    once (1 s, the floor) nor the century of the cap. ``from_url`` hands the limiter's
    clock to the store."""
    clock = Clock(T0 + years * 365 * 86_400)
    prefix = _prefix()
    limiter = RateLimiter.from_url(f"{redis.url}/0?prefix={prefix}", clock=clock)
    try:
        limiter.acquire("e", "r", {"rpm": 1}, [RPM])
        store = limiter.store
        assert isinstance(store, RedisStore)
        refill_ms = RPM.burst * RPM.refill_period_ms // RPM.refill_amount  # a full bucket
        for key in (store.scripts.bucket(BucketKey("e", "r")), store.scripts.listing("e")):
            ttl = store.client.pttl(key)
            # A day and the refill, less the instants since the write (well under a minute).
            assert 86_400_000 + refill_ms - 60_000 < ttl <= 86_400_000 + refill_ms, key
    finally:
        limiter.delete_table()


# -- 4. the scripts' decimal arithmetic -------------------------------------------------------
_ARITHMETIC = _DECIMAL + "return {cmp(ARGV[1], ARGV[2]), add(ARGV[1], ARGV[2])}"
"""The store's own decimal functions, on two arguments (a test-only script)."""

BIG = 10**40
_numbers = st.one_of(
    st.integers(-BIG, BIG),
    st.integers(-(2**64), 2**64),
    st.builds(lambda k, sign: sign * 10**k, st.integers(0, 40), st.sampled_from([1, -1])),
    st.builds(lambda k, sign: sign * (10**k - 1), st.integers(0, 40), st.sampled_from([1, -1])),
)
"""Any size up to 10**40, with powers of ten and runs of nines (long carries, borrows)."""


@pytest.fixture(scope="module", params=["redis", "valkey"])
def arithmetic(request: pytest.FixtureRequest) -> Iterator[Callable[[int, int], list[Any]]]:
    """The test script on the session's redis-server, then on its valkey-server."""
    server: LocalServer = request.getfixturevalue(request.param)
    client = redis_py.Redis(host=server.host, port=server.port, decode_responses=True)
    script = client.register_script(_ARITHMETIC)
    yield lambda a, b: list(script(keys=[], args=[str(a), str(b)]))
    client.close()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_numbers, b=_numbers)
@example(a=0, b=0)
@example(a=-1, b=1)
@example(a=BIG, b=-BIG)
@example(a=BIG, b=BIG)
@example(a=-BIG, b=-1)
@example(a=10**20, b=-1)
@example(a=-(10**20), b=1)
def test_decimal_compare_and_add_match_python_ints(
    arithmetic: Callable[[int, int], list[Any]], a: int, b: int
) -> None:
    assert arithmetic(a, b) == [(a > b) - (a < b), str(a + b)]


# -- 5. a cluster: one store, one slot --------------------------------------------------------
def _cluster_store(cluster: LocalCluster, clock: Clock, prefix: str) -> RedisStore:
    return RedisStore(cluster.url, prefix=prefix, cluster=True, clock=clock)


def test_every_key_of_a_store_shares_one_slot(redis_cluster: LocalCluster, clock: Clock) -> None:
    """Cascade writes (child and parent), a queue's extra bucket, claims, listings and
    configuration all hash to the prefix's slot (the server's CLUSTER KEYSLOT says so),
    so every multi-key script is one atomic call on one node."""
    store = _cluster_store(redis_cluster, clock, _prefix())
    limiter = RateLimiter(store=store, clock=clock)
    try:
        _mix(limiter)
        keys = list(store.dump())
        assert any("E#queue#B#" in k for k in keys) and any("E#parent#B#" in k for k in keys)
        slots = {store.client.cluster_keyslot(key) for key in keys}
        assert slots == {store.client.cluster_keyslot(store.scripts.tag)}
        owner = store.client.get_node_from_key(store.scripts.schema)
        for node in redis_cluster.nodes:
            direct = redis_py.Redis(host=node.host, port=node.port, decode_responses=True)
            found = set(direct.scan_iter(match=store.scripts.tag + "*"))
            direct.close()
            assert found == (set(keys) if node.port == owner.port else set())
    finally:
        limiter.delete_table()


def test_stores_of_different_prefixes_can_live_on_different_nodes(
    redis_cluster: LocalCluster, clock: Clock
) -> None:
    base = _prefix()
    probe = _cluster_store(redis_cluster, clock, base)
    by_node: dict[int, str] = {}
    for index in range(1000):
        prefix = f"{base}-{index}"
        slot = probe.client.cluster_keyslot("{" + prefix + "}")
        by_node.setdefault(probe.client.nodes_manager.get_node_from_slot(slot).port, prefix)
        if len(by_node) == 2:
            break
    assert len(by_node) == 2, "1000 prefixes all hashed to one node"
    stores = {port: _cluster_store(redis_cluster, clock, p) for port, p in by_node.items()}
    try:
        for store in stores.values():
            RateLimiter(store=store, clock=clock).acquire("e", "r", {"rpm": 1}, [RPM])
        for node in redis_cluster.nodes:
            direct = redis_py.Redis(host=node.host, port=node.port, decode_responses=True)
            for port, store in stores.items():
                found = list(direct.scan_iter(match=store.scripts.tag + "*"))
                assert bool(found) is (node.port == port), (node.port, port)
            direct.close()
    finally:
        for store in stores.values():
            RateLimiter(store=store).delete_table()


def test_a_cascade_write_refused_on_the_parent_leaves_the_child_untouched(
    redis_cluster: LocalCluster, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's condition holds, the parent's fails: the script writes neither."""
    prefix = _prefix()
    store = _cluster_store(redis_cluster, clock, prefix)
    limiter = RateLimiter(store=store, clock=clock)
    other = RateLimiter(store=_cluster_store(redis_cluster, clock, prefix), clock=clock)
    try:
        limiter.create_entity("parent")
        limiter.create_entity("child", "parent", cascade=True)
        limiter.create_entity("sibling", "parent", cascade=True)
        limiter.set_limits("parent", [Limit.per_minute("rpm", 3)])  # the family's share
        code = [Limit.per_minute("rpm", 10)]
        limiter.acquire("child", "model", {"rpm": 1}, code)  # child 1/10, parent 1/3
        other.acquire("sibling", "model", {"rpm": 2}, code)  # parent 3/3: full
        before = store.dump()
        # ``limiter`` saw the parent at 1/3: it sends the write (no local refusal), with
        # conditions that hold on the child (as it last saw it) and not on the parent.
        replies: list[Reply] = []
        send = store.send

        def recorded(op: Any) -> Reply:
            replies.append(reply := send(op))
            return reply

        monkeypatch.setattr(store, "send", recorded)
        with pytest.raises(RateLimitExceeded) as refused:
            limiter.acquire("child", "model", {"rpm": 1}, code)
        assert [v.entity_id for v in refused.value.violations] == ["parent"]
        assert len(replies) == 1 and replies[0].code == CONDITION
        child, parent = replies[0].current  # the failed items only: the parent's
        assert child is None and parent == _bucket_of(before, store, "parent")
        assert store.dump() == before  # the child's token was not taken either
    finally:
        limiter.delete_table()


def _bucket_of(dump: dict[str, Any], store: RedisStore, entity: str) -> dict[str, int]:
    raw = dump[store.scripts.bucket(BucketKey(entity, "model"))]
    return {k: int(v) for k, v in raw.items() if k != "#"}


# -- 7. Valkey ---------------------------------------------------------------------------------
def test_the_valkey_fixture_is_a_valkey_server(valkey: LocalServer) -> None:
    client = redis_py.Redis(host=valkey.host, port=valkey.port, decode_responses=True)
    try:
        info = client.info("server")
    finally:
        client.close()
    assert info.get("server_name") == "valkey", info
    print(f"\nvalkey-server {info['valkey_version']} (redis_version {info['redis_version']})")
