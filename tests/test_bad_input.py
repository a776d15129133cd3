"""Bad input: every case raises its typed error and writes nothing (in memory; the
matrix of entry points, which includes Celery tasks and the CLI, on moto server).

Each test seeds the bucket with one good acquire, snapshots the raw bucket item (and the
whole table), makes the bad call, and checks that the stored state is byte-for-byte the
same. Time comes from an injected clock; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from tests.conftest import Backend, Endpoint
from tests.helpers import T0, Clock, table_contents
from zae_celery.core import (
    AsyncRateLimiter,
    Lease,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    RequestExceedsBurst,
    TableNotFound,
    ValidationError,
)
from zae_celery.core.limits import MAX_TOKENS
from zae_celery.core.ops import BucketKey, ReadBucket
from zae_celery.core.stores import StoreUrl, from_url
from zae_celery.testing import free_port

ENTITY = "tenant-1"
RESOURCE = "gpt-4o"
LIMITS = [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 1000)]
SEED = {"rpm": 1, "tpm": 100}


@pytest.fixture
def lease(limiter: RateLimiter) -> Lease:
    """The seed: one good acquire, so the bucket item exists with known contents."""
    granted = limiter.acquire(ENTITY, RESOURCE, consume=SEED, limits=LIMITS)
    assert granted.consumed == SEED
    assert not granted.unchecked
    return granted


# -- snapshots ----------------------------------------------------------------------------


def raw_bucket(
    limiter: RateLimiter, entity: str = ENTITY, resource: str = RESOURCE
) -> Mapping[str, int]:
    """The stored bucket item, exactly as the store returns it ({}: none)."""
    reply = limiter.store.send(ReadBucket(BucketKey(entity, resource)))
    assert reply.ok, reply
    item: Mapping[str, int] = reply.value
    return item


def whole_table(limiter: RateLimiter) -> list[Any]:
    """Every item of the table, in key order."""
    return table_contents(limiter.store)


@contextlib.contextmanager
def unchanged(limiter: RateLimiter, resource: str = RESOURCE) -> Iterator[None]:
    """Assert that the block leaves the seeded bucket item and the whole table untouched."""
    item, table = raw_bucket(limiter, ENTITY, resource), whole_table(limiter)
    assert item is not None, "the seed acquire should have stored the bucket item"
    yield
    assert raw_bucket(limiter, ENTITY, resource) == item
    assert whole_table(limiter) == table


def check_error(exc: BaseException, error: type[Exception], field: str | None) -> None:
    """The exact error type, and the field it names."""
    assert type(exc) is error, f"{type(exc).__name__}: {exc}"
    if field is not None:
        assert isinstance(exc, ValidationError)
        assert exc.field == field
        assert str(exc).startswith(f"{field}: ")


# -- acquire ------------------------------------------------------------------------------

LimitAny: Any = Limit  # for deliberately ill-typed calls


def _id_cases(field: str) -> list[Any]:
    cases: list[Any] = [
        pytest.param("", id=f"{field}-empty"),
        pytest.param("a" * 257, id=f"{field}-257-chars"),
        pytest.param("a#b", id=f"{field}-hash"),
        pytest.param("a*", id=f"{field}-star"),
        pytest.param("*", id=f"{field}-only-star"),
        pytest.param("a#B#x", id=f"{field}-hostile-bucket-key"),
        pytest.param("e/../#META", id=f"{field}-hostile-meta"),
        pytest.param("#META", id=f"{field}-meta"),
        pytest.param("x#LIMITS#*", id=f"{field}-hostile-limits"),
        pytest.param("../etc", id=f"{field}-leading-dot"),
        pytest.param("-x", id=f"{field}-leading-dash"),
        pytest.param("a b", id=f"{field}-space"),
        pytest.param("a\x00b", id=f"{field}-nul"),
        pytest.param("t\u00e9nant", id=f"{field}-non-ascii"),
        pytest.param(5, id=f"{field}-int"),
        pytest.param(None, id=f"{field}-none"),
        pytest.param(b"tenant", id=f"{field}-bytes"),
        pytest.param(["tenant"], id=f"{field}-list"),
        pytest.param(
            "tenant-1\n",
            id=f"{field}-trailing-newline",
        ),
    ]
    return cases


BAD_ACQUIRES: list[Any] = [
    # consume: unknown or malformed limit names
    pytest.param({"consume": {"rph": 1}}, ValidationError, "consume.rph", id="unknown-name"),
    pytest.param(
        {"consume": {"rpm": 1, "bogus": 1}}, ValidationError, "consume.bogus", id="unknown-extra"
    ),
    pytest.param(
        {"consume": {"bad name": 1}}, ValidationError, "consume['bad name']", id="invalid-name"
    ),
    pytest.param({"consume": {5: 1}}, ValidationError, "consume[5]", id="int-name"),
    # consume: amounts
    pytest.param({"consume": {"rpm": -1}}, ValidationError, "consume.rpm", id="negative"),
    pytest.param(
        {"consume": {"rpm": 1, "tpm": -5}}, ValidationError, "consume.tpm", id="negative-mixed"
    ),
    pytest.param({"consume": {"rpm": True}}, ValidationError, "consume.rpm", id="bool-true"),
    pytest.param({"consume": {"rpm": False}}, ValidationError, "consume.rpm", id="bool-false"),
    pytest.param({"consume": {"rpm": 1.0}}, ValidationError, "consume.rpm", id="float"),
    pytest.param({"consume": {"rpm": 0.5}}, ValidationError, "consume.rpm", id="float-half"),
    pytest.param({"consume": {"rpm": math.nan}}, ValidationError, "consume.rpm", id="nan"),
    pytest.param({"consume": {"rpm": "1"}}, ValidationError, "consume.rpm", id="str"),
    pytest.param({"consume": {"rpm": None}}, ValidationError, "consume.rpm", id="none"),
    pytest.param({"consume": [("rpm", 1)]}, ValidationError, "consume", id="not-a-mapping"),
    pytest.param(
        {"consume": {"tpm": MAX_TOKENS + 1}}, ValidationError, "consume.tpm", id="beyond-1e18"
    ),
    pytest.param({"consume": {"tpm": 10**40}}, ValidationError, "consume.tpm", id="1e40"),
    pytest.param({"consume": {"tpm": -(10**40)}}, ValidationError, "consume.tpm", id="minus-1e40"),
    # consume beyond burst: can never succeed
    pytest.param({"consume": {"rpm": 11}}, RequestExceedsBurst, "consume.rpm", id="over-burst"),
    pytest.param(
        {"consume": {"rpm": 1, "tpm": 1001}},
        RequestExceedsBurst,
        "consume.tpm",
        id="over-burst-mixed",
    ),
    pytest.param(
        {"consume": {"tpm": MAX_TOKENS}}, RequestExceedsBurst, "consume.tpm", id="max-over-burst"
    ),
    # limits
    pytest.param(
        {"limits": [Limit.per_minute("rpm", 10), Limit.per_second("rpm", 1)]},
        ValidationError,
        "limits",
        id="duplicate-names",
    ),
    pytest.param(
        {"limits": [*LIMITS, Limit.per_minute("rpm", 10)]},
        ValidationError,
        "limits",
        id="duplicate-identical",
    ),
    pytest.param({"limits": LIMITS[0]}, ValidationError, "limits", id="single-limit"),
    pytest.param({"limits": None}, ValidationError, "limits", id="limits-none"),
    pytest.param({"limits": "rpm"}, ValidationError, "limits", id="limits-str"),
    pytest.param({"limits": [LIMITS[0], "tpm"]}, ValidationError, "limits", id="not-a-limit"),
    pytest.param({"limits": [LIMITS[0].to_dict()]}, ValidationError, "limits", id="dict-limit"),
    pytest.param({"limits": [], "consume": {}}, ValidationError, "limits", id="no-limits-anywhere"),
    # horizon
    pytest.param({"horizon": -1}, ValidationError, "horizon", id="horizon-negative"),
    pytest.param({"horizon": -0.001}, ValidationError, "horizon", id="horizon-minus-1ms"),
    pytest.param({"horizon": math.nan}, ValidationError, "horizon", id="horizon-nan"),
    pytest.param({"horizon": math.inf}, ValidationError, "horizon", id="horizon-inf"),
    pytest.param({"horizon": -math.inf}, ValidationError, "horizon", id="horizon-minus-inf"),
    pytest.param({"horizon": 86_401}, ValidationError, "horizon", id="horizon-over-a-day"),
    pytest.param({"horizon": True}, ValidationError, "horizon", id="horizon-bool"),
    pytest.param({"horizon": "1"}, ValidationError, "horizon", id="horizon-str"),
    pytest.param({"horizon": None}, ValidationError, "horizon", id="horizon-none"),
    # ids
    *(
        pytest.param(
            {"entity_id": p.values[0]}, ValidationError, "entity_id", id=p.id, marks=p.marks
        )
        for p in _id_cases("entity_id")
    ),
    *(
        pytest.param({"resource": p.values[0]}, ValidationError, "resource", id=p.id, marks=p.marks)
        for p in _id_cases("resource")
    ),
]


def acquire(limiter: RateLimiter, **overrides: Any) -> Lease:
    args: dict[str, Any] = {
        "entity_id": ENTITY,
        "resource": RESOURCE,
        "consume": {"rpm": 1},
        "limits": LIMITS,
        "horizon": 0.0,
    }
    args.update(overrides)
    return limiter.acquire(
        args["entity_id"],
        args["resource"],
        args["consume"],
        args["limits"],
        horizon=args["horizon"],
    )


@pytest.mark.parametrize(("overrides", "error", "field"), BAD_ACQUIRES)
def test_bad_acquire_raises_and_writes_nothing(
    limiter: RateLimiter,
    lease: Lease,
    overrides: dict[str, Any],
    error: type[Exception],
    field: str,
) -> None:
    before = limiter.available(ENTITY, RESOURCE, LIMITS)
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        acquire(limiter, **overrides)
    check_error(info.value, error, field)
    if error is RequestExceedsBurst:
        assert not hasattr(info.value, "retry_after")
        assert isinstance(info.value, ValidationError)
    # The limiter still works, and still sees the seeded state.
    assert limiter.available(ENTITY, RESOURCE, LIMITS) == before == {"rpm": 9.0, "tpm": 900.0}


@pytest.mark.parametrize("horizon", [-1.0, math.nan, math.inf])
def test_bad_horizon_in_reserve_writes_nothing(
    limiter: RateLimiter, lease: Lease, horizon: float
) -> None:
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        limiter.reserve(ENTITY, RESOURCE, {"rpm": 1}, LIMITS, horizon=horizon)
    check_error(info.value, ValidationError, "horizon")


def test_request_exceeding_burst_is_not_a_rate_limit(limiter: RateLimiter, lease: Lease) -> None:
    """Over burst is refused as bad input even with a horizon that could hold it."""
    with unchanged(limiter), pytest.raises(RequestExceedsBurst) as info:
        limiter.reserve(ENTITY, RESOURCE, {"rpm": 11}, LIMITS, horizon=3600)
    check_error(info.value, RequestExceedsBurst, "consume.rpm")
    assert (info.value.requested, info.value.burst) == (11, 10)
    assert not hasattr(info.value, "retry_after")


def test_max_tokens_is_accepted_exactly(limiter: RateLimiter, clock: Clock) -> None:
    """The boundary: 10**18 tokens on a 10**18 bucket is stored exactly (31+ digits)."""
    big = Limit.per_second("big", MAX_TOKENS)
    granted = limiter.acquire(ENTITY, "big", {"big": MAX_TOKENS}, [big])
    item = raw_bucket(limiter, ENTITY, "big")
    now_ms = clock.ms
    assert item[big.key] == now_ms * MAX_TOKENS + MAX_TOKENS * 1000
    granted.adjust(big=MAX_TOKENS)  # into debt by a full bucket
    item = raw_bucket(limiter, ENTITY, "big")
    assert item[big.key] == now_ms * MAX_TOKENS + 2 * MAX_TOKENS * 1000
    assert limiter.available(ENTITY, "big", [big]) == {"big": -float(MAX_TOKENS)}
    with unchanged(limiter, "big"), pytest.raises(ValidationError) as info:
        granted.adjust(big=MAX_TOKENS + 1)
    check_error(info.value, ValidationError, "adjust.big")


# -- other entry points with hostile ids ---------------------------------------------------

HOSTILE_IDS = ["", "a" * 257, "a#B#x", "e/../#META", "*", "a*b", 7, None]
NONE_IS_VALID = {"create-entity-parent", "set-limits-resource", "delete-limits-resource"}


def _operations() -> list[Any]:
    # (name, call, field); None is a valid parent_id / resource where it means "none" / "all".
    ops: list[tuple[str, Callable[[RateLimiter, Any], object], str]] = [
        ("available-entity", lambda lim, bad: lim.available(bad, RESOURCE, LIMITS), "entity_id"),
        ("available-resource", lambda lim, bad: lim.available(ENTITY, bad, LIMITS), "resource"),
        (
            "reserve-entity",
            lambda lim, bad: lim.reserve(bad, RESOURCE, {"rpm": 1}, LIMITS),
            "entity_id",
        ),
        ("create-entity", lambda lim, bad: lim.create_entity(bad), "entity_id"),
        ("create-entity-parent", lambda lim, bad: lim.create_entity(ENTITY, bad), "parent_id"),
        ("set-limits-entity", lambda lim, bad: lim.set_limits(bad, LIMITS), "entity_id"),
        ("set-limits-resource", lambda lim, bad: lim.set_limits(ENTITY, LIMITS, bad), "resource"),
        ("get-limits-entity", lambda lim, bad: lim.get_limits(bad), "entity_id"),
        ("stored-limits-entity", lambda lim, bad: lim.stored_limits(bad), "entity_id"),
        ("delete-limits-entity", lambda lim, bad: lim.delete_limits(bad), "entity_id"),
        ("delete-limits-resource", lambda lim, bad: lim.delete_limits(ENTITY, bad), "resource"),
    ]
    return [
        pytest.param(op, bad, field, id=f"{name}-{i}")
        for name, op, field in ops
        for i, bad in enumerate(HOSTILE_IDS)
        if not (bad is None and name in NONE_IS_VALID)
    ]


@pytest.mark.parametrize(("operation", "bad", "field"), _operations())
def test_hostile_ids_are_refused_everywhere(
    limiter: RateLimiter,
    lease: Lease,
    operation: Callable[[RateLimiter, Any], object],
    bad: Any,
    field: str,
) -> None:
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        operation(limiter, bad)
    check_error(info.value, ValidationError, field)


# -- adjust ---------------------------------------------------------------------------------

BAD_ADJUSTS: list[Any] = [
    pytest.param({"bogus": 1}, "adjust.bogus", id="unknown-name"),
    pytest.param({"tpm": 5, "bogus": 1}, "adjust.bogus", id="unknown-after-valid"),
    pytest.param({"tpm": -101}, "adjust.tpm", id="refund-beyond-consumed"),
    pytest.param({"rpm": -2}, "adjust.rpm", id="refund-beyond-consumed-rpm"),
    pytest.param({"tpm": 5, "rpm": -2}, "adjust.rpm", id="refund-beyond-after-valid"),
    pytest.param({"tpm": True}, "adjust.tpm", id="bool"),
    pytest.param({"tpm": 1.5}, "adjust.tpm", id="float"),
    pytest.param({"tpm": -1.0}, "adjust.tpm", id="negative-float"),
    pytest.param({"tpm": "5"}, "adjust.tpm", id="str"),
    pytest.param({"tpm": None}, "adjust.tpm", id="none"),
    pytest.param({"tpm": math.nan}, "adjust.tpm", id="nan"),
    pytest.param({"tpm": MAX_TOKENS + 1}, "adjust.tpm", id="beyond-1e18"),
    pytest.param({"tpm": -(MAX_TOKENS + 1)}, "adjust.tpm", id="minus-beyond-1e18"),
    pytest.param({"tpm": 10**40}, "adjust.tpm", id="1e40"),
]


@pytest.mark.parametrize(("deltas", "field"), BAD_ADJUSTS)
def test_bad_adjust_raises_and_writes_nothing(
    limiter: RateLimiter, lease: Lease, deltas: dict[str, Any], field: str
) -> None:
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        lease.adjust(**deltas)
    check_error(info.value, ValidationError, field)
    assert lease.consumed == SEED
    assert not lease.closed
    # The lease is still usable: a good adjust after the bad one writes.
    lease.adjust(tpm=-100)
    assert lease.consumed == {"rpm": 1, "tpm": 0}
    assert limiter.available(ENTITY, RESOURCE, LIMITS) == {"rpm": 9.0, "tpm": 1000.0}


def test_refund_beyond_running_total(limiter: RateLimiter, lease: Lease) -> None:
    lease.adjust(tpm=50)
    assert lease.consumed == {"rpm": 1, "tpm": 150}
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        lease.adjust(tpm=-151)
    check_error(info.value, ValidationError, "adjust.tpm")
    assert lease.consumed == {"rpm": 1, "tpm": 150}
    lease.adjust(tpm=-150)
    assert lease.consumed == {"rpm": 1, "tpm": 0}


@pytest.mark.parametrize("close", ["commit", "rollback", "context"])
def test_adjust_on_a_closed_lease(limiter: RateLimiter, lease: Lease, close: str) -> None:
    if close == "commit":
        lease.commit()
    elif close == "rollback":
        lease.rollback()
    else:
        with lease:
            pass
    assert lease.closed
    consumed = lease.consumed
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        lease.adjust(tpm=1)
    check_error(info.value, ValidationError, "lease")
    with unchanged(limiter), pytest.raises(ValidationError) as info:
        lease.adjust(tpm=-1)
    check_error(info.value, ValidationError, "lease")
    assert lease.consumed == consumed


# -- store URLs ---------------------------------------------------------------------------

BAD_REDIS_URLS = [
    # (url, what the problem says, what the allowed text says)
    pytest.param("redis://h:6379/0?prefix={t}", "prefix '{t}'", "no braces or #", id="braces"),
    pytest.param("redis://h:6379/0?prefix=a%23b", "prefix 'a#b'", "no braces or #", id="hash"),
    pytest.param("redis://h:6379/0?prefix=a#b", "a '#' in", "no '#'", id="raw-hash"),
    pytest.param(f"redis://h:6379/0?prefix={'p' * 65}", "prefix 'ppp", "1..64", id="65-chars"),
    pytest.param("redis://h:6379/0?prefix=", "prefix ''", "1..64", id="empty-prefix"),
    pytest.param(
        "redis://h:6379/0?colour=red",
        "unknown option 'colour'",
        "prefix, socket_connect_timeout",
        id="unknown-option",
    ),
    pytest.param("redis://h:6379/0?prefix=a&prefix=b", "given twice", "each once", id="twice"),
    pytest.param(
        "redis+cluster://h:7000/1", "only database 0", "redis+cluster://HOST:PORT", id="cluster-db"
    ),
    pytest.param("redis://h:6379/zero", "must be a number", "HOST:PORT/0", id="db-not-a-number"),
    pytest.param("redis://h:6379/0/1", "must be a number", "HOST:PORT/0", id="db-path"),
    pytest.param("redis://:6379/0", "no host", "redis://HOST:PORT/DB", id="no-host"),
    pytest.param("redis://", "no host", "redis://HOST:PORT/DB", id="nothing"),
    pytest.param("redis://h:port/0", "malformed port", "1..65535", id="port-not-a-number"),
    pytest.param("redis://h:70000/0", "malformed port", "1..65535", id="port-too-big"),
    pytest.param("redis://h:0/0", "malformed port", "1..65535", id="port-0"),
    pytest.param("redis://h:6379/0?prefix", "malformed query", "redis://HOST", id="bare-key"),
]


@pytest.mark.parametrize(("url", "problem", "allowed"), BAD_REDIS_URLS)
def test_bad_redis_urls_say_what_is_wrong_and_what_is_allowed(
    url: str, problem: str, allowed: str
) -> None:
    """Every entry point of a URL refuses it before any connection, alike."""
    for parse in (StoreUrl.parse, from_url, RateLimiter.from_url, AsyncRateLimiter.from_url):
        with pytest.raises(ValidationError) as bad:
            parse(url)
        check_error(bad.value, ValidationError, "store_url")
        assert problem in bad.value.problem, parse
        assert allowed in bad.value.allowed, parse
    with pytest.raises(ValidationError) as named:  # as the Celery setting reads it
        StoreUrl.parse(url, "zae_store_url")
    assert named.value.field == "zae_store_url"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@h:0/0",
        "rediss://me:s3cret@h:6380/x",
        "redis+cluster://:s3cret@h:7000/2",
        "redis://:s3cret@h:6379/0?colour=red",
        "redis://:s3c#ret@h:6379/0",  # an unencoded '#' in the password
    ],
)
def test_a_bad_redis_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ValidationError) as bad:
        StoreUrl.parse(url)
    assert "s3c" not in str(bad.value) and "***@h" in bad.value.problem


def test_good_redis_urls_reach_redis_py_unchanged_but_for_the_prefix() -> None:
    parsed = StoreUrl.parse("rediss://:pa%23ss@h:6380/2?prefix=llm&socket_timeout=2")
    assert (parsed.kind, parsed.name, parsed.cluster) == ("redis", "llm", False)
    assert parsed.endpoint_url == "rediss://:pa%23ss@h:6380/2?socket_timeout=2"
    cluster = StoreUrl.parse("redis+cluster://h:7000")
    assert (cluster.name, cluster.cluster, cluster.endpoint_url) == ("zae", True, "redis://h:7000")


# -- the store itself missing or unreachable ------------------------------------------------


def test_missing_table(endpoint: Endpoint, clock: Clock) -> None:
    name = f"zae-missing-{uuid.uuid4().hex[:12]}"
    missing = RateLimiter(name, endpoint_url=endpoint.url, clock=clock)
    with pytest.raises(TableNotFound) as info:
        missing.acquire(ENTITY, RESOURCE, {"rpm": 1}, LIMITS)
    assert isinstance(info.value, RateLimiterUnavailable)
    assert name in str(info.value)
    with pytest.raises(TableNotFound):
        missing.available(ENTITY, RESOURCE, LIMITS)
    # Bad input is still reported as bad input: it is checked before any request.
    with pytest.raises(ValidationError) as bad:
        missing.acquire("a#b", RESOURCE, {"rpm": 1}, LIMITS)
    check_error(bad.value, ValidationError, "entity_id")
    # Nothing created the table on the way.
    assert name not in missing.client.list_tables()["TableNames"]


def test_missing_table_in_open_mode_grants_unchecked(
    endpoint: Endpoint, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"zae-missing-{uuid.uuid4().hex[:12]}"
    missing = RateLimiter(name, endpoint_url=endpoint.url, clock=clock, on_unavailable="open")
    with caplog.at_level(logging.WARNING, logger="zae_celery.core"):
        granted = missing.acquire(ENTITY, RESOURCE, {"rpm": 1}, LIMITS)
    assert granted.unchecked
    assert [r.name for r in caplog.records if r.levelno == logging.WARNING] == ["zae_celery.core"]
    assert name not in missing.client.list_tables()["TableNames"]


def _unreachable(clock: Clock, mode: Any) -> RateLimiter:
    return RateLimiter(
        "zae-unreachable",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        clock=clock,
        on_unavailable=mode,
    )


def test_unreachable_endpoint_closed(clock: Clock) -> None:
    limiter = _unreachable(clock, "closed")
    with pytest.raises(RateLimiterUnavailable) as info:
        limiter.acquire(ENTITY, RESOURCE, {"rpm": 1}, LIMITS)
    assert type(info.value) is RateLimiterUnavailable  # not TableNotFound
    assert limiter.engine.unavailable_grants == 0


def test_unreachable_endpoint_open(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    limiter = _unreachable(clock, "open")
    with caplog.at_level(logging.WARNING, logger="zae_celery.core"):
        granted = limiter.acquire(ENTITY, RESOURCE, {"rpm": 1}, LIMITS)
    assert granted.unchecked
    assert granted.start_at == T0
    assert granted.wait == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "zae_celery.core"
    assert "unavailable" in warnings[0].getMessage()
    assert limiter.engine.unavailable_grants == 1
    # An unchecked lease needs no store: adjust and commit are no-ops.
    granted.adjust(rpm=5)
    granted.commit()
    assert granted.closed


@pytest.mark.parametrize(
    ("call", "field"),
    [
        pytest.param(lambda lim: acquire(lim, consume={"rpm": -1}), "consume.rpm", id="negative"),
        pytest.param(lambda lim: acquire(lim, consume={"rpm": True}), "consume.rpm", id="bool"),
        pytest.param(lambda lim: acquire(lim, entity_id="a#b"), "entity_id", id="entity"),
        pytest.param(lambda lim: acquire(lim, resource="*"), "resource", id="resource"),
        pytest.param(lambda lim: acquire(lim, horizon=math.nan), "horizon", id="horizon"),
        pytest.param(
            lambda lim: acquire(lim, limits=[LIMITS[0], LIMITS[0]]), "limits", id="duplicates"
        ),
    ],
)
def test_open_mode_never_turns_bad_input_into_a_grant(
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    call: Callable[[RateLimiter], object],
    field: str,
) -> None:
    limiter = _unreachable(clock, "open")
    with (
        caplog.at_level(logging.WARNING, logger="zae_celery.core"),
        pytest.raises(ValidationError) as info,
    ):
        call(limiter)
    check_error(info.value, ValidationError, field)
    assert limiter.engine.unavailable_grants == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- the matrix across entry points: Limit, engine calls, task options, report_usage,
# settings and CLI arguments. Every case must end in a typed error that names the field
# and says what is allowed, store nothing, and (for tasks) end the task in FAILURE with
# that error as its result: no task is silently dropped.

YEARLY = Limit.custom("total", 1000, refill_amount=1, refill_period_seconds=31_536_000)


def _task_app(endpoint: Endpoint, **conf: Any) -> Any:
    from celery import Celery

    app = Celery(f"matrix-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update({"zae_table_name": endpoint.table_name, "zae_endpoint_url": endpoint.url})
    app.conf.update(conf)
    return app


def _run_task(endpoint: Endpoint, options: dict[str, Any], body: Any = None, **conf: Any) -> Any:
    """Run one RateLimitedTask through Celery's tracer (``apply``: before_start, body,
    after_return, task_postrun) and return its failure."""
    from zae_celery import RateLimitedTask

    app = _task_app(endpoint, **conf)

    def run(self: Any, prompt: str) -> None:
        if body is not None:
            body(self)

    task = app.task(
        base=RateLimitedTask,
        bind=True,
        max_retries=0,
        shared=False,  # a shared task would be added to every app created later
        name=f"matrix.{uuid.uuid4().hex[:6]}",
        **{"rate_limits": [YEARLY], "rate_resource": "matrix", **options},
    )(run)
    result = task.apply(kwargs={"prompt": "hello"})
    assert result.state == "FAILURE", result.state  # not dropped, not retried
    return result.result


def _task(**options: Any) -> Callable[[Endpoint], Any]:
    return lambda ep: _run_task(ep, options)


def _setting(**conf: Any) -> Callable[[Endpoint], Any]:
    return lambda ep: _run_task(ep, {}, **conf)


def _report(**usage: Any) -> Callable[[Endpoint], Any]:
    return lambda ep: _run_report(ep, **usage)


def _consume(consume: dict[str, Any]) -> Callable[[Endpoint], Any]:
    return lambda ep: _lim(ep).acquire("t", "m", consume, [YEARLY])


IDS = "letters, digits"
HALF: Any = 1.5  # deliberately not an int
MATRIX: list[Any] = [
    # Limit
    ("limit", lambda ep: Limit.per_minute("1rpm", 10), "name", "a letter"),
    ("limit", lambda ep: Limit.per_minute("rpm", 0), "capacity", "1.."),
    ("limit", lambda ep: LimitAny.per_minute("rpm", 2.5), "capacity", "integer"),
    ("limit", lambda ep: Limit.per_minute("rpm", 10, burst=5), "burst", ">= capacity"),
    ("limit", lambda ep: Limit.custom("rpm", 1, 1, 0), "refill_period_seconds", "> 0, at most"),
    ("limit", lambda ep: Limit.custom("rpm", 1, 1, 1e10), "refill_period_seconds", "<="),
    ("limit", lambda ep: Limit.custom("rpm", 1, 1, 0.0005), "refill_period_seconds", "1 ms"),
    # engine calls
    ("acquire", lambda ep: _lim(ep).acquire("a#b", "m", {}, [YEARLY]), "entity_id", "no #"),
    ("acquire", _consume({"rpm": 1}), "consume.rpm", "total"),
    ("acquire", _consume({"total": -1}), "consume.total", "0.."),
    ("reserve", lambda ep: _lim(ep).reserve("t", "m", {}, [YEARLY], horizon=-1), "horizon", "0.."),
    ("reserve", lambda ep: _lim(ep).reserve("t", "*", {}, [YEARLY]), "resource", "no #"),
    ("adjust", lambda ep: _granted(ep).adjust(bogus=1), "adjust.bogus", "total"),
    ("adjust", lambda ep: _granted(ep).adjust(total=-5), "adjust.total", "at most"),
    ("adjust", lambda ep: _granted(ep).adjust(total=HALF), "adjust.total", "integer"),
    # task options (through Celery's tracer)
    ("task", _task(rate_limits=YEARLY), "rate_limits", "Limit"),
    ("task", _task(rate_consume=lambda a, k: k["x"]), "rate_consume", "a callable of (args"),
    ("task", _task(rate_consume=lambda a, k: 3), "rate_consume", "{'"),
    ("task", _task(rate_consume={"total": 1001}), "consume.total", "at most 1000"),
    ("task", _task(rate_entity=lambda a, k: "t#" + k["prompt"]), "rate_entity", IDS),
    ("task", _task(rate_resource="a*"), "rate_resource", IDS),
    ("task", _task(rate_horizon=-5), "rate_horizon", "0.0..900.0"),
    ("task", _task(rate_limits=5), "rate_limits", "Limit"),
    ("task", _task(rate_on_error="refnud"), "rate_on_error", "'refund'"),
    ("task", _task(rate_on_error=lambda a, k: "refnud"), "rate_on_error", "'refund'"),
    ("task", _task(rate_max_deferrals=lambda a, k: 0), "rate_max_deferrals", ">= 1"),
    # report_usage (inside the body; the estimate is refunded by rate_on_error)
    ("report_usage", _report(tokens=5), "report_usage.tokens", "total"),
    ("report_usage", _report(total=-1), "report_usage.total", "0.."),
    ("report_usage", _report(total=True), "report_usage.total", "integer"),
    # settings (read by the first task of a worker process)
    ("settings", _setting(zae_on_unavailable="maybe"), "zae_on_unavailable", "'open'"),
    ("settings", _setting(zae_horizon=1000), "zae_horizon", "900"),
    ("settings", _setting(zae_jitter=math.nan), "zae_jitter", "seconds"),
    ("settings", _setting(zae_max_deferrals=0), "zae_max_deferrals", ">= 1"),
    ("settings", _setting(zae_default_entity="a#b"), "zae_default_entity", "no #"),
    ("settings", _setting(zae_queue_limits=["q"]), "zae_queue_limits", "{'"),
    ("settings", _setting(zae_queue_limits={"q": 5}), "zae_queue_limits['q']", "[Limit"),
    ("settings", _setting(zae_breaker_threshold=True), "zae_breaker_threshold", ">= 1"),
    ("settings", _setting(zae_table_name=""), "zae_table_name", "zae_table_name ="),
    ("settings", _setting(zae_admission="yes"), "zae_admission", "True or False"),
    ("settings", _setting(zae_admission_window=-1), "zae_admission_window", "seconds"),
    ("settings", _setting(zae_admission_hold=0), "zae_admission_hold", ">= 1"),
    ("settings", _setting(zae_admission_max_hold=0.5), "zae_admission_max_hold", "1.0.."),
]

CLI_MATRIX: list[Any] = [
    (["limits", "set", "t", "--limit", "rpm=0/m"], "'--limit'", "1.."),
    (["limits", "set", "t", "--limit", "rpm"], "'--limit'", "NAME=AMOUNT/PERIOD"),
    (["limits", "set", "t", "--limit", "rpm=5/fortnight"], "'--limit'", "ms, s, m, h, d"),
    (["limits", "get", "a#b"], "ENTITY", "no # or *"),
    (["entity", "create", "child", "--parent", "p*"], "'--parent'", "no # or *"),
    (["buckets", "t", "--limit", "tpm"], "'--limit'", "NAME=AMOUNT/PERIOD"),
]


def _lim(endpoint: Endpoint) -> RateLimiter:
    return RateLimiter(endpoint.table_name, endpoint_url=endpoint.url)


def _granted(endpoint: Endpoint) -> Lease:
    lease = _lim(endpoint).acquire("matrix", "adjusted", {"total": 1}, [YEARLY])
    lease.commit()  # closed leases refuse adjust: keep one open instead
    lease._state.closed = False
    return lease


def _run_report(endpoint: Endpoint, **usage: Any) -> Any:
    return _run_task(
        endpoint, {"rate_on_error": "refund"}, body=lambda task: task.report_usage(**usage)
    )


def _stored(limiter: RateLimiter) -> list[dict[str, Any]]:
    """The table without the items the cases themselves grant (checked on their own)."""
    return [i for i in whole_table(limiter) if i["SK"]["S"] not in ("B#matrix", "B#adjusted")]


@pytest.mark.stores("moto")  # Celery apps name a DynamoDB table
@pytest.mark.parametrize(
    ("kind", "case", "field", "allowed"),
    [pytest.param(*c, id=f"{c[0]}-{c[2]}-{i}") for i, c in enumerate(MATRIX)],
)
def test_bad_input_matrix(
    limiter: RateLimiter,
    lease: Lease,
    backend: Backend,
    kind: str,
    case: Callable[[Endpoint], Any],
    field: str,
    allowed: str,
) -> None:
    before = _stored(limiter)
    assert backend.endpoint is not None
    try:
        error = case(backend.endpoint)  # a task case returns its failure
    except ValidationError as exc:
        error = exc
    assert isinstance(error, ValidationError), repr(error)
    assert error.field == field, error
    assert error.allowed and allowed in error.allowed, error  # says what is allowed
    assert str(error).startswith(f"{field}: ") and "(allowed: " in str(error)
    assert _stored(limiter) == before  # nothing else stored or changed
    # What the case's own grant left: a refused or refunded request, nothing more.
    if kind in ("task", "report_usage", "settings"):
        assert limiter.available("default", "matrix", [YEARLY]) == {"total": 1000.0}
    if kind == "adjust":
        assert round(limiter.available("matrix", "adjusted", [YEARLY])["total"]) == 999


def test_the_matrix_covers_every_entry_point() -> None:
    kinds = {c[0] for c in MATRIX}
    assert kinds == {"limit", "acquire", "reserve", "adjust", "task", "report_usage", "settings"}
    assert len(MATRIX) + len(CLI_MATRIX) >= 30


@pytest.mark.stores("moto")  # the CLI talks to DynamoDB
@pytest.mark.parametrize(("args", "option", "allowed"), CLI_MATRIX)
def test_bad_cli_arguments_exit_2_and_store_nothing(
    limiter: RateLimiter,
    lease: Lease,
    backend: Backend,
    args: list[str],
    option: str,
    allowed: str,
) -> None:
    from click.testing import CliRunner

    from zae_celery.cli import main

    before = whole_table(limiter)
    endpoint = backend.endpoint
    assert endpoint is not None
    base = ["--endpoint-url", endpoint.url, "--region", "us-east-1", "--table", endpoint.table_name]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    assert option in result.stderr and allowed in result.stderr, result.stderr
    assert whole_table(limiter) == before
