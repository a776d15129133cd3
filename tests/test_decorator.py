"""``limiter.limit(...)``, the decorator form of both limiters, on the in-memory store.

Every behaviour is checked on the sync and the async limiter (``side``); waits go to the
injected clock. The example of docs/engine.md ("Decorator") is run as a user runs it.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import REPO
from tests.helpers import T0, Clock
from zae_celery.core import AsyncLease, AsyncRateLimiter, Lease, Limit, RateLimiter, Slot
from zae_celery.core.errors import RateLimitExceeded, ValidationError
from zae_celery.core.stores import MemoryStore

LIMITS = [Limit.per_minute("rpm", 2), Limit.per_minute("tpm", 1_000)]


class Side:
    """The sync or the async limiter, with the same call interface for the tests."""

    def __init__(self, kind: str, clock: Clock) -> None:
        store = MemoryStore(clock=clock)
        self.clock = clock
        self.limiter: RateLimiter | AsyncRateLimiter
        if kind == "sync":
            self.limiter = RateLimiter(store=store, clock=clock, sleep=clock.sleep)
        else:
            self.limiter = AsyncRateLimiter(store=store, clock=clock, sleep=clock.asleep)
        self.reader = RateLimiter(store=store, clock=clock)
        """Another limiter on the same buckets, to look at them."""

    def limit(self, body: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``body`` decorated with ``limit(**options)``, called as a plain function on
        either side: on the async one, ``body`` runs inside an ``async def`` that awaits
        what it returns when that is awaitable (an AsyncLease's ``adjust``), and each
        call runs to its end on an event loop of its own."""
        if isinstance(self.limiter, RateLimiter):
            return self.limiter.limit(**options)(body)

        async def run(*args: Any, **kwargs: Any) -> Any:
            out = body(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        decorated = self.limiter.limit(**options)(run)
        return lambda *args, **kwargs: asyncio.run(decorated(*args, **kwargs))

    def lease(self) -> Lease | AsyncLease:
        """The running call's lease."""
        return self.limiter.current_lease()

    def left(self, entity: str, resource: str = "model") -> dict[str, float]:
        """Tokens left per limit in an entity's bucket."""
        return self.reader.available(entity, resource, LIMITS)


@pytest.fixture(params=["sync", "async"])
def side(request: pytest.FixtureRequest, clock: Clock) -> Side:
    return Side(request.param, clock)


def test_constant_keys_charge_every_call_and_return_what_the_function_returns(
    side: Side,
) -> None:
    double = side.limit(
        lambda x: 2 * x, entity="tenant", resource="model", consume={"tpm": 10}, limits=LIMITS
    )
    assert [double(1), double(x=4)] == [2, 8]
    assert side.left("tenant") == {"rpm": 2, "tpm": 980}


def test_callable_keys_and_consume_are_computed_from_the_call_arguments(side: Side) -> None:
    seen: list[tuple[Any, ...]] = []

    def entity(user: dict[str, str], prompt: str, *, model: str) -> str:
        seen.append((user, prompt, model))
        return user["tenant"]

    ask = side.limit(
        lambda user, prompt, *, model: len(prompt),
        entity=entity,
        resource=lambda user, prompt, *, model: model,
        consume=lambda user, prompt, *, model: {"rpm": 1, "tpm": len(prompt)},
        limits=LIMITS,
    )
    assert ask({"tenant": "acme"}, "twelve chars", model="gpt-4o") == 12
    assert seen == [({"tenant": "acme"}, "twelve chars", "gpt-4o")]
    assert side.left("acme", "gpt-4o") == {"rpm": 1, "tpm": 988}
    assert side.left("acme", "model") == {"rpm": 2, "tpm": 1_000}


def test_two_entities_do_not_share_a_bucket(side: Side) -> None:
    call = side.limit(
        lambda tenant: tenant,
        entity=lambda tenant: tenant,
        resource="model",
        consume={"rpm": 1},
        limits=LIMITS,
    )
    assert [call("a"), call("a")] == ["a", "a"]
    with pytest.raises(RateLimitExceeded):
        call("a")
    assert [call("b"), call("b")] == ["b", "b"]  # b's bucket is full: a took nothing from it
    assert side.left("a")["rpm"] == side.left("b")["rpm"] == 0


def test_a_refused_call_raises_runs_nothing_and_consumes_nothing(side: Side) -> None:
    runs: list[int] = []
    call = side.limit(runs.append, entity="e", resource="model", consume={"rpm": 1}, limits=LIMITS)
    call(1)
    call(2)
    side.clock.advance(10)
    with pytest.raises(RateLimitExceeded) as refused:
        call(3)
    assert runs == [1, 2]
    assert refused.value.retry_after == pytest.approx(20, abs=0.001)  # a token each 30 s
    assert side.left("e")["rpm"] == pytest.approx(1 / 3, abs=0.001)  # only the refill
    assert side.clock.slept == 0


def test_with_a_horizon_a_call_waits_for_its_slot_on_the_limiter_clock(side: Side) -> None:
    started: list[float] = []
    options: dict[str, Any] = dict(entity="e", resource="model", consume={"rpm": 1}, limits=LIMITS)
    call = side.limit(lambda: started.append(side.clock()), horizon=45, **options)
    for _ in range(3):
        call()
    # The third had to wait for the first token to come back: 30 s, on the test's clock.
    assert side.clock.slept == pytest.approx(30)
    assert [s - T0 for s in started] == pytest.approx([0, 0, 30], abs=0.001)
    # The next slot is 30 s ahead again: beyond a 20 s horizon, refused without a wait.
    hasty = side.limit(lambda: started.append(side.clock()), horizon=20, **options)
    with pytest.raises(RateLimitExceeded) as refused:
        hasty()
    assert refused.value.retry_after == pytest.approx(30, abs=0.001)
    assert len(started) == 3 and side.clock.slept == pytest.approx(30)
    assert side.left("e")["rpm"] == pytest.approx(0, abs=0.001)  # nothing taken ahead


def test_a_paced_slot_counts_the_start_when_the_call_starts(side: Side) -> None:
    seen: list[tuple[bool, float | None]] = []

    def body() -> None:
        lease = side.lease()
        seen.append((lease.start_counted, lease.started_at))

    call = side.limit(
        body, entity="e", resource="model", consume={"rpm": 1}, limits=LIMITS, horizon=60
    )
    paced = side.limit(
        body,
        entity="e",
        resource="model",
        consume={"rpm": 1},
        limits=LIMITS,
        horizon=60,
        slot=Slot(pace=True),
    )
    call()
    call()  # the bucket is empty now: the next slot is 30 s ahead
    paced()
    assert side.clock.slept == pytest.approx(30)
    assert seen[:2] == [(False, None), (False, None)]
    # Reserved beyond start_within (0): its start was counted at the slot, by the call.
    counted, started_at = seen[2]
    assert counted and started_at == pytest.approx(T0 + 30, abs=0.001)


@pytest.mark.parametrize("rollback_on_error", [True, False])
def test_an_exception_in_the_function_propagates_and_refunds_unless_told_to_keep(
    side: Side, rollback_on_error: bool
) -> None:
    def body() -> None:
        raise KeyError("the provider failed")

    failing = side.limit(
        body,
        entity="e",
        resource="model",
        consume={"rpm": 1, "tpm": 300},
        limits=LIMITS,
        rollback_on_error=rollback_on_error,
    )
    with pytest.raises(KeyError, match="the provider failed"):
        failing()
    kept = {"rpm": 1, "tpm": 700} if not rollback_on_error else {"rpm": 2, "tpm": 1_000}
    assert side.left("e") == kept


def test_the_function_reports_its_usage_through_the_current_lease(side: Side) -> None:
    consumed: list[dict[str, int]] = []

    def body(billed: int) -> Any:
        lease = side.lease()
        consumed.append(dict(lease.consumed))
        return lease.adjust(tpm=billed - lease.consumed["tpm"])

    call = side.limit(
        body, entity="e", resource="model", consume={"rpm": 1, "tpm": 500}, limits=LIMITS
    )
    call(120)
    assert consumed == [{"rpm": 1, "tpm": 500}]
    assert side.left("e") == {"rpm": 1, "tpm": 880}  # the 120 billed, not the 500 estimated


def test_the_current_lease_is_a_lookup_error_outside_a_call_and_for_another_limiter(
    side: Side,
) -> None:
    with pytest.raises(LookupError, match="limit"):
        side.lease()
    other = RateLimiter.from_url("memory://")
    errors: list[str] = []

    def body() -> None:
        with pytest.raises(LookupError) as outside:
            other.current_lease()
        errors.append(str(outside.value))

    side.limit(body, entity="e", resource="model", limits=LIMITS)()
    assert errors and "RateLimiter" in errors[0]


def test_nested_calls_and_two_limiters_each_see_their_own_lease(clock: Clock) -> None:
    outer_limiter = RateLimiter.from_url("memory://", clock=clock)
    inner_limiter = RateLimiter.from_url("memory://", clock=clock)
    seen: list[tuple[str, str]] = []

    def entity_of(lease: Lease) -> str:
        return lease.buckets[0].entity_id

    @inner_limiter.limit("inner", "model", {"rpm": 1}, LIMITS)
    def inner() -> None:
        seen.append((entity_of(inner_limiter.current_lease()), "inner limiter"))
        seen.append((entity_of(outer_limiter.current_lease()), "outer limiter"))

    @outer_limiter.limit("outer", "model", {"rpm": 1}, LIMITS)
    def outer(depth: int) -> None:
        if depth:
            return nested(depth - 1)
        inner()
        seen.append((entity_of(outer_limiter.current_lease()), "after inner"))

    @outer_limiter.limit("nested", "model", {"rpm": 1}, LIMITS)
    def nested(depth: int) -> None:
        outer(depth)
        seen.append((entity_of(outer_limiter.current_lease()), "after outer"))

    outer(1)
    assert seen == [
        ("inner", "inner limiter"),
        ("outer", "outer limiter"),  # the innermost call of that limiter
        ("outer", "after inner"),
        ("nested", "after outer"),
    ]


def test_concurrent_async_calls_each_see_their_own_lease(clock: Clock) -> None:
    limiter = AsyncRateLimiter.from_url("memory://", clock=clock)
    both_in = asyncio.Event()
    running: list[str] = []

    @limiter.limit(lambda tenant: tenant, "model", {"rpm": 1}, LIMITS)
    async def call(tenant: str) -> str:
        running.append(tenant)
        if len(running) == 2:
            both_in.set()
        await both_in.wait()  # both calls are inside their lease at once
        return limiter.current_lease().buckets[0].entity_id

    async def main() -> list[str]:
        return list(await asyncio.gather(call("a"), call("b")))

    assert asyncio.run(main()) == ["a", "b"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_wrong_kind_of_function_is_a_type_error_naming_the_limiter_to_use(
    kind: str, clock: Clock
) -> None:
    def plain() -> None: ...

    async def coroutine() -> None: ...

    def generator() -> Iterator[int]:
        yield 1

    if kind == "sync":
        decorate: Any = RateLimiter.from_url("memory://", clock=clock).limit("e", "r")
        wrong: Callable[[], Any] = coroutine
        use = "use AsyncRateLimiter.limit"
    else:
        decorate = AsyncRateLimiter.from_url("memory://", clock=clock).limit("e", "r")
        wrong, use = plain, "use RateLimiter.limit"
    with pytest.raises(TypeError, match=f"{wrong.__qualname__}.*{use}"):
        decorate(wrong)
    with pytest.raises(TypeError, match=r"generator function .*outside the lease"):
        decorate(generator)


def test_the_decorated_function_keeps_its_name_doc_and_signature(clock: Clock) -> None:
    limiter = RateLimiter.from_url("memory://", clock=clock)
    async_limiter = AsyncRateLimiter.from_url("memory://", clock=clock)

    def ask(tenant: str, prompt: str = "") -> str:
        """Ask the model."""
        return prompt

    async def ask_async(tenant: str, prompt: str = "") -> str:
        """Ask the model."""
        return prompt

    sync_ask = limiter.limit("e", "r", limits=LIMITS)(ask)
    async_ask = async_limiter.limit("e", "r", limits=LIMITS)(ask_async)
    pairs: list[tuple[Callable[..., Any], Any]] = [(ask, sync_ask), (ask_async, async_ask)]
    for original, decorated in pairs:
        assert decorated.__name__ == original.__name__
        assert decorated.__qualname__ == original.__qualname__
        assert decorated.__doc__ == "Ask the model."
        assert decorated.__wrapped__ is original
        assert inspect.signature(decorated) == inspect.signature(original)
        assert inspect.iscoroutinefunction(decorated) is inspect.iscoroutinefunction(original)
    # The type checker sees the function's own parameters (ParamSpec): these calls are
    # errors to mypy (an ignore it found nothing to ignore on would fail `make typecheck`).
    with pytest.raises(TypeError):
        sync_ask("acme", "a prompt", "one too many")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        asyncio.run(async_ask(tenant="acme", model="gpt-4o"))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"entity": "a#b"}, "entity"),
        ({"resource": ""}, "resource"),
        ({"consume": {"rpm": -1}}, "consume.rpm"),
        ({"limits": Limit.per_minute("rpm", 2)}, "limits"),
        ({"horizon": -1}, "horizon"),
        ({"slot": {"pace": True}}, "slot"),
        ({"rollback_on_error": "yes"}, "rollback_on_error"),
    ],
)
def test_bad_constants_are_refused_when_decorating(
    side: Side, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        side.limit(lambda: None, **{"entity": "e", "resource": "r", **options})
    assert refused.value.field == field


def test_a_bad_or_failing_callable_stops_the_call_with_nothing_consumed(side: Side) -> None:
    runs: list[object] = []
    call = side.limit(
        runs.append,
        entity=lambda tenant: tenant,
        resource="model",
        consume=lambda tenant: {"rpm": {"acme-x": "x", "acme-3": 3}[tenant]},
        limits=LIMITS,
    )
    with pytest.raises(ValidationError) as refused:
        call(42)  # not an id
    assert refused.value.field == "entity"
    with pytest.raises(KeyError):  # the callable's own error, as it is
        call("acme")
    with pytest.raises(ValidationError) as refused:
        call("acme-x")
    assert refused.value.field == "consume.rpm"
    with pytest.raises(ValidationError, match="can never be granted"):
        call("acme-3")  # 3 requests of a bucket of 2
    assert runs == [] and side.left("acme") == {"rpm": 2, "tpm": 1_000}


def test_the_docs_example_runs_and_prints_what_the_docs_show() -> None:
    source = (REPO / "examples" / "decorator.py").read_text()
    docs = (REPO / "docs" / "engine.md").read_text()
    assert source in docs, "docs/engine.md misquotes examples/decorator.py"
    done = subprocess.run(
        [sys.executable, "-m", "examples.decorator"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"```text\n{done.stdout}```" in docs, done.stdout
    lines = done.stdout.splitlines()
    assert lines[2] == "acme: refused by rpm, retry in 30 s"  # before it ran: no tokens
    assert lines[-2:] == [
        "acme: 0 requests and 920 tokens left",  # two calls of 40 tokens billed
        "globex: 0 requests and 960 tokens left",  # one call, and the async one's request
    ]
