"""A RateLimitedTask's options: declared once, validated when the task class is bound (a
bad value is reported by every use of the task, naming the option), callables called
once per run before any lease is taken; and the limiter cache, kept per app.

Tasks run in-process through Celery's tracer as a worker's pool runs them
(``run_as_worker``: before_start, body, after_return; not eager) with the engine on moto
server; a republish is captured, not sent.
"""

from __future__ import annotations

import gc
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from tests.helpers import run_as_worker
from tests.test_bad_input import whole_table
from zae_celery import DeferralsExhausted, Limit, RateLimitedTask, RateLimiter, ValidationError
from zae_celery.core import RateLimiterUnavailable
from zae_celery.task import HEADER_OUTAGES, limiter_for
from zae_celery.testing import LocalServer

YEARLY = Limit.custom("total", 1000, refill_amount=1, refill_period_seconds=31_536_000)
RPM = Limit.per_minute("rpm", 1)


@pytest.fixture(scope="module")
def table(moto: LocalServer) -> Iterator[RateLimiter]:
    """One table on moto server for the module (each test uses resources of its own)."""
    limiter = RateLimiter(f"zae-options-{uuid.uuid4().hex[:8]}", endpoint_url=moto.url)
    limiter.create_table()
    yield limiter
    limiter.delete_table()


def make_app(table: RateLimiter | None = None, **conf: Any) -> Celery:
    app = Celery(f"options-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(
        zae_table_name=table.table_name if table else "zae-options-unused",
        zae_endpoint_url=table.client.meta.endpoint_url if table else None,
        zae_jitter=0,
        zae_start_wait=0,
    )
    app.conf.update(conf)
    return app


def define(app: Celery, body: Callable[..., Any] | None = None, **options: Any) -> Any:
    """A RateLimitedTask of ``app``, created and bound now (its options resolved)."""

    def run(self: Any, **kwargs: Any) -> None:
        if body is not None:
            body(self)

    task = app.task(
        base=RateLimitedTask,
        bind=True,
        max_retries=0,
        shared=False,  # a shared task would be added to every app created later
        name=f"options.{uuid.uuid4().hex[:8]}",
        **{"rate_resource": f"r-{uuid.uuid4().hex[:8]}", **options},
    )(run)
    return app.tasks[task.name]  # a lazy task is created (and bound) on first use


def fail(self: Any) -> None:
    raise RuntimeError("provider call failed")


class Republished(Exception):
    """Raised instead of publishing a deferred task."""


def capture_republish(task: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what ``task`` would republish (countdown, headers) instead of sending it."""
    sent: list[dict[str, Any]] = []

    class Signature:
        def __init__(self, options: dict[str, Any]) -> None:
            self.options = options

        def apply_async(self) -> None:
            sent.append(self.options)

    monkeypatch.setattr(
        task, "signature_from_request", lambda request, **options: Signature(options)
    )
    return sent


# -- bad values: found at bind, reported by every use ------------------------------------
BAD_OPTIONS = [
    ({"rate_limits": 5}, "rate_limits", "[Limit, ...]"),
    ({"rate_limits": RPM}, "rate_limits", "[Limit, ...]"),
    ({"rate_limits": [RPM, "tpm"]}, "rate_limits", "[Limit, ...]"),
    ({"rate_limits": [RPM, RPM]}, "rate_limits", "distinct names"),
    ({"rate_on_error": "refnud"}, "rate_on_error", "'refund'"),
    ({"rate_on_error": ("rpm", 5)}, "rate_on_error", "names to keep"),
    ({"rate_on_error": None}, "rate_on_error", "'keep'"),
    ({"rate_horizon": -5}, "rate_horizon", "0.0..900.0"),
    ({"rate_horizon": 1000}, "rate_horizon", "0.0..900.0"),
    ({"rate_horizon": "60"}, "rate_horizon", "seconds"),
    ({"rate_block": "parent"}, "rate_block", "'all'"),
    ({"rate_block": ()}, "rate_block", "'parents'"),
    ({"rate_max_deferrals": 0}, "rate_max_deferrals", ">= 1"),
    ({"rate_max_deferrals": 2.5}, "rate_max_deferrals", ">= 1"),
    ({"rate_entity": "a#b"}, "rate_entity", "letters, digits"),
    ({"rate_resource": "*"}, "rate_resource", "letters, digits"),
    ({"rate_consume": 3}, "rate_consume", "{'rpm': 1"),
    ({"rate_consume": lambda args: 1}, "rate_consume", "callable of (args, kwargs)"),
    ({"rate_entity": lambda self, a, k: "t"}, "rate_entity", "callable of (args, kwargs)"),
    ({"rate_limit": "5/fortnight"}, "rate_limit", "UNIT one of ms, s, m, h, d"),
]


@pytest.mark.parametrize(("options", "field", "allowed"), BAD_OPTIONS)
@pytest.mark.parametrize("finalized", [True, False], ids=["finalized", "lazy"])
def test_a_bad_option_is_found_at_bind_and_reported_by_every_use(
    table: RateLimiter,
    monkeypatch: pytest.MonkeyPatch,
    finalized: bool,
    options: dict[str, Any],
    field: str,
    allowed: str,
) -> None:
    app = make_app(table)
    if finalized:
        app.finalize()
    ran: list[bool] = []
    task = define(app, body=lambda self: ran.append(True), **{"rate_limits": [YEARLY], **options})
    stored = whole_table(table)
    published: list[Any] = []
    monkeypatch.setattr(Celery, "send_task", lambda *a, **k: published.append(a))
    for _ in range(2):  # delay: nothing is published
        with pytest.raises(ValidationError) as info:
            task.delay()
        assert info.value.field == field, info.value
        assert allowed in info.value.allowed, info.value
    assert published == []
    result = run_as_worker(task)  # a run: fails before acquiring anything
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValidationError), repr(result.result)
    assert result.result.field == field
    assert ran == []
    assert whole_table(table) == stored  # nothing acquired, nothing written


def test_an_option_from_task_annotations_is_checked_too() -> None:
    app = make_app(task_annotations={"options.annotated": {"rate_on_error": "refnud"}})

    @app.task(base=RateLimitedTask, name="options.annotated", rate_limits=[RPM], shared=False)
    def annotated() -> None: ...

    with pytest.raises(ValidationError) as info:
        annotated.delay()
    assert info.value.field == "rate_on_error"


@pytest.mark.parametrize(
    ("rate_limit", "limit"),
    [
        ("5/s", Limit("rate_limit", 1, 1, 5, 1000)),
        ("100/m", Limit("rate_limit", 1, 1, 100, 60_000)),
        ("0.5/s", Limit("rate_limit", 1, 1, 1, 2000)),
        ("10", Limit("rate_limit", 1, 1, 10, 1000)),  # Celery: a number is per second
        (2, Limit("rate_limit", 1, 1, 2, 1000)),
        (0.1, Limit("rate_limit", 1, 1, 1, 10_000)),
        ("7/10s", Limit("rate_limit", 1, 1, 7, 10_000)),
    ],
)
def test_a_celery_rate_limit_becomes_a_global_limit_that_survives_rebinding(
    rate_limit: Any, limit: Limit
) -> None:
    app = make_app()
    task = define(app, rate_limit=rate_limit)
    for _ in range(2):  # Celery binds every task again when the app is finalized
        assert task.rate_limit is None
        assert task._global_rate_limit == limit
        type(task).bind(app)


def test_a_bad_celery_rate_limit_stays_reported_after_rebinding() -> None:
    app = make_app()
    task = define(app, rate_limit="5/fortnight")
    type(task).bind(app)
    assert task.rate_limit is None  # Celery's worker must not parse it either
    with pytest.raises(ValidationError, match="rate_limit"):
        task.delay()


# -- callables: called once per run, their results validated before any lease ----------
def test_a_callable_returning_a_non_iterable_fails_the_task_with_a_validation_error(
    table: RateLimiter,
) -> None:
    task = define(make_app(table), rate_limits=lambda args, kwargs: 5)
    result = run_as_worker(task)
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValidationError), repr(result.result)
    assert result.result.field == "rate_limits"


def test_a_bad_rate_on_error_from_a_callable_fails_before_anything_is_consumed(
    table: RateLimiter,
) -> None:
    ran: list[bool] = []
    task = define(
        make_app(table),
        body=lambda self: ran.append(True),
        rate_limits=[YEARLY],
        rate_on_error=lambda args, kwargs: "refnud",
    )
    stored = whole_table(table)
    result = run_as_worker(task)
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValidationError), repr(result.result)
    assert result.result.field == "rate_on_error"
    assert "refnud" not in str(result.result)  # a callable's result is never quoted
    assert ran == []
    assert whole_table(table) == stored  # nothing acquired


@pytest.mark.parametrize(("refund", "left"), [(True, 1000.0), (False, 999.0)])
def test_rate_on_error_may_be_a_callable_of_the_tasks_arguments(
    table: RateLimiter, refund: bool, left: float
) -> None:
    task = define(
        make_app(table),
        body=fail,
        rate_limits=[YEARLY],
        rate_on_error=lambda args, kwargs: "refund" if kwargs["refund"] else ("total",),
    )
    result = run_as_worker(task, kwargs={"refund": refund})
    assert result.state == "FAILURE" and isinstance(result.result, RuntimeError)
    available = table.available("default", task.rate_resource, [YEARLY])
    assert available == {"total": pytest.approx(left, abs=1e-3)}  # refills 1 a year


@pytest.mark.parametrize("horizon", [0.0, 5.0, 30.0])
def test_rate_horizon_may_be_a_callable_of_the_tasks_arguments(
    table: RateLimiter, monkeypatch: pytest.MonkeyPatch, horizon: float
) -> None:
    task = define(
        make_app(table, zae_admission=False),
        rate_limits=[RPM],
        rate_horizon=lambda args, kwargs: kwargs["horizon"],
    )
    sent = capture_republish(task, monkeypatch)
    assert run_as_worker(task, kwargs={"horizon": horizon}).state == "SUCCESS"  # takes the token
    assert (
        run_as_worker(task, kwargs={"horizon": horizon}).state == "RETRY"
    )  # the next is ~60 s off
    (deferred,) = sent
    # Refused beyond its horizon: deferred by the horizon (jitter 0), without a lease.
    assert deferred["countdown"] == pytest.approx(horizon, abs=0.01)
    assert deferred["headers"]["zae_lease"] is None


@pytest.mark.parametrize(("outages", "state"), [(1, "RETRY"), (2, "FAILURE")])
def test_rate_max_deferrals_may_be_a_callable_of_the_tasks_arguments(
    table: RateLimiter, monkeypatch: pytest.MonkeyPatch, outages: int, state: str
) -> None:
    app = make_app(table)
    task = define(app, rate_limits=[YEARLY], rate_max_deferrals=lambda args, kwargs: kwargs["most"])
    sent = capture_republish(task, monkeypatch)

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RateLimiterUnavailable("DynamoDB is down (injected)")

    monkeypatch.setattr(limiter_for(app)[1], "acquire", unavailable)
    result = run_as_worker(task, kwargs={"most": 2}, headers={HEADER_OUTAGES: outages})
    assert result.state == state
    if state == "FAILURE":
        assert isinstance(result.result, DeferralsExhausted), repr(result.result)
        assert "rate_max_deferrals=2" in str(result.result)
        assert sent == []
    else:
        assert [s["headers"][HEADER_OUTAGES] for s in sent] == [outages + 1]


def test_each_callable_is_called_once_per_run(table: RateLimiter) -> None:
    calls: list[str] = []

    def counted(name: str, value: Any) -> Callable[[Any, Any], Any]:
        def option(args: Any, kwargs: Any) -> Any:
            calls.append(name)
            return value

        return option

    task = define(
        make_app(table),
        rate_limits=counted("limits", [YEARLY]),
        rate_entity=counted("entity", "tenant-1"),
        rate_consume=counted("consume", {"total": 2}),
        rate_on_error=counted("on_error", "refund"),
        rate_horizon=counted("horizon", 10),
        rate_max_deferrals=counted("max_deferrals", 3),
    )
    assert run_as_worker(task).state == "SUCCESS"
    assert sorted(calls) == sorted(
        ["limits", "entity", "consume", "on_error", "horizon", "max_deferrals"]
    )
    available = table.available("tenant-1", task.rate_resource, [YEARLY])
    assert available == {"total": pytest.approx(998, abs=1e-3)}


# -- the limiter cache ---------------------------------------------------------------------
def test_an_app_never_gets_the_limiter_of_another_app_with_the_same_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``id()`` of a collected app is reused by a later object: simulate that reuse."""
    import zae_celery.task

    monkeypatch.setattr(zae_celery.task, "id", lambda obj: 42, raising=False)
    first = limiter_for(make_app(zae_table_name="zae-first"))
    second = limiter_for(make_app(zae_table_name="zae-second"))
    assert (first[0].table_name, second[0].table_name) == ("zae-first", "zae-second")
    assert second[1] is not first[1]


def test_the_limiter_cache_does_not_keep_an_app_alive() -> None:
    app = make_app()
    limiter = limiter_for(app)[1]
    assert limiter_for(app)[1] is limiter  # one limiter per app and process
    gone = weakref.ref(app)
    del app
    gc.collect()
    assert gone() is None
