"""Queue limits are keyed by the queue a message was consumed from, not its routing key.

In memory: topic matching, which declared queue a route reaches, and the worker
consumer's answer (RabbitMQ's consumer tags, kombu's virtual transports by the consumed
queues' bindings) reaching the pool as the request field ``zae_queue`` through Celery's
own strategy (admission off); an eager run's fallback. With real ``celery worker``
processes on each broker, admission on and off: a queue bound to a topic exchange by a
pattern gets its limit, counted in its bucket through the store.
"""

# kombu ships no type information.
# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.app.task import Context
from celery.app.trace import trace_task_ret
from celery.worker import state as worker_state
from kombu.entity import Exchange, Queue, binding

from tests.celery.app import TOTAL
from tests.conftest import Broker
from tests.helpers import run_as_worker
from tests.test_celery_workers import _start_fleet, redis_store_url
from tests.test_task_options import capture_republish
from zae_celery import Limit, RateLimitedTask, RateLimiter
from zae_celery.admission import ADMITTED, admission_strategy
from zae_celery.queues import (
    QUEUE,
    ConsumedQueues,
    limit_key,
    queue_of_run,
    route_target,
    topic_matches,
)
from zae_celery.testing import LocalServer

TOPIC = Exchange("work", type="topic")
DIRECT = Exchange("jobs", type="direct")


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("llm.#", "llm.gpt4", True),
        ("llm.#", "llm", True),  # '#' may stand for no word at all
        ("llm.#", "llm.gpt4.mini", True),
        ("llm.#", "llmx.gpt4", False),
        ("llm.#", "other.llm", False),
        ("llm.*", "llm.gpt4", True),
        ("llm.*", "llm", False),  # '*' is exactly one word
        ("llm.*", "llm.gpt4.mini", False),
        ("*.gpt4", "llm.gpt4", True),
        ("#.gpt4", "a.b.gpt4", True),
        ("#.gpt4", "gpt4", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("#", "anything.at.all", True),
        ("llm", "llm", True),
        ("llm", "llm.gpt4", False),
    ],
)
def test_topic_patterns_match_as_amqp_says(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_a_route_reaches_the_one_queue_whose_bindings_take_it() -> None:
    llm = Queue("llm", TOPIC, routing_key="llm.#")
    batch = Queue("batch", DIRECT, routing_key="nightly")
    extra = Queue("extra", bindings=[binding(DIRECT, "cron"), binding(TOPIC, "ops.*")])
    everyone = Queue("everyone", Exchange("news", type="fanout"))
    queues = [llm, batch, extra, everyone]
    assert route_target(queues, "work", "llm.gpt4") == "llm"
    assert route_target(queues, "jobs", "nightly") == "batch"  # not a queue's name
    assert route_target(queues, "jobs", "cron") == "extra"
    assert route_target(queues, "work", "ops.restart") == "extra"
    assert route_target(queues, "news", "whatever") == "everyone"
    assert route_target(queues, "jobs", "llm.gpt4") is None  # another exchange's key
    assert route_target(queues, "", "batch") == "batch"  # the default exchange: by name
    assert route_target(queues, None, "nightly") == "batch"  # exchange unknown: any
    # Two queues take the key: which one a message came from cannot be told this way.
    assert route_target([*queues, Queue("audit", TOPIC, routing_key="#")], "work", "llm.x") is None
    assert route_target([Queue("h", Exchange("hdr", type="headers"))], "hdr", "k") is None


def _app(store: str = "", **conf: Any) -> Celery:
    app = Celery(f"queue-keys-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(
        zae_store_url=store or f"memory://queue-keys-{uuid.uuid4().hex[:8]}",
        task_queues=[
            Queue("llm", TOPIC, routing_key="llm.#"),
            Queue("audit", TOPIC, routing_key="llm.*"),  # declared, not consumed below
            Queue("batch", DIRECT, routing_key="nightly"),
        ],
        zae_queue_limits={"llm": [TOTAL], "batch": [TOTAL]},
        zae_admission=False,
        **conf,
    )
    return app


def test_the_fallback_maps_a_routing_key_to_a_declared_queue_else_keeps_it() -> None:
    app = _app()
    assert limit_key(app, "llm", {"routing_key": "anything"}) == "llm"  # the consumer knew
    assert limit_key(app, None, {"exchange": "jobs", "routing_key": "nightly"}) == "batch"
    # llm.gpt4 reaches llm and audit alike: the routing key stays the key.
    assert limit_key(app, None, {"exchange": "work", "routing_key": "llm.gpt4"}) == "llm.gpt4"
    assert limit_key(app, None, {"exchange": "work", "routing_key": "llm.a.b"}) == "llm"
    assert limit_key(app, None, {"exchange": "", "routing_key": "unknown"}) == "unknown"
    assert limit_key(app, None, {"routing_key": None}) == ""
    assert limit_key(app, None, None) == ""


def test_a_run_believes_the_consumer_but_an_eager_run_does_not() -> None:
    app = _app()
    info = {"exchange": "work", "routing_key": "llm.a.b"}
    assert queue_of_run(app, Context({QUEUE: "batch", "delivery_info": info})) == "batch"
    assert queue_of_run(app, Context({"delivery_info": info})) == "llm"
    eager = Context({QUEUE: "batch", "is_eager": True, "delivery_info": info})
    assert queue_of_run(app, eager) == "llm"  # a stale field in its headers is ignored


def test_an_eager_run_applies_the_limits_of_the_queue_its_route_reaches() -> None:
    store = f"memory://queue-keys-{uuid.uuid4().hex[:8]}"
    app = _app(store)

    @app.task(base=RateLimitedTask, shared=False, name="queue-keys.eager")
    def eager() -> None: ...

    eager.apply(exchange="jobs", routing_key="nightly")
    eager.apply(exchange="work", routing_key="llm.gpt4")  # llm or audit: not "llm"
    assert _consumed(RateLimiter.from_url(store), "batch") == 1
    assert _consumed(RateLimiter.from_url(store), "llm") == 0


def test_a_deferred_task_is_republished_without_the_consumers_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = _app(zae_start_wait=0, zae_jitter=0)

    @app.task(base=RateLimitedTask, shared=False, name="queue-keys.deferred",
              rate_limits=[Limit.per_minute("rpm", 1)])  # fmt: skip
    def deferred() -> None: ...

    sent = capture_republish(deferred, monkeypatch)
    headers = {QUEUE: "llm", "tenant_note": "kept"}
    assert run_as_worker(deferred, headers=headers).state == "SUCCESS"
    assert run_as_worker(deferred, headers=headers).state == "RETRY"  # next token ~60 s off
    (republished,) = sent
    assert QUEUE not in republished["headers"]  # the next consumer tells its own
    assert republished["headers"]["tenant_note"] == "kept"


def _consumed(limiter: RateLimiter, queue: str) -> int:
    """What the bucket of ``queue``'s TOTAL limit has counted (it refills once a year)."""
    found = [b for b in limiter.buckets(f"queue:{queue}") if b.limit_name == TOTAL.name]
    return round(found[0].in_use) if found else 0


class _Worker:
    """What Celery's default strategy needs of a worker's consumer, on a memory broker:
    a real kombu task consumer (its consumer tags). A request handed on is run at once
    by Celery's tracer on what a pool process would be given (its request dict); timer
    entries (ETA messages) are kept for the test to fire."""

    def __init__(self, app: Celery, queues: list[str]) -> None:
        app.amqp.queues.select(queues)
        self.app = app
        self.connection = app.connection_for_read()
        self.messages: list[Any] = []
        self.task_consumer = app.amqp.TaskConsumer(
            self.connection.default_channel, on_message=self.messages.append
        )
        self.task_consumer.consume()
        self.handed: list[Any] = []
        self.due: list[tuple[Any, tuple[Any, ...]]] = []
        self.hostname = "queue-keys@test"
        self.connection_errors = ()
        self.event_dispatcher = None
        self.timer = SimpleNamespace(
            call_at=lambda eta, fn, args, priority=0: self.due.append((fn, args))
        )
        self.qos = SimpleNamespace(increment_eventually=lambda: None)
        self.disable_rate_limits = False
        self.task_buckets: dict[str, None] = defaultdict(lambda: None)
        self.controller = SimpleNamespace(state=SimpleNamespace(revoked=set()))
        self.pool = SimpleNamespace(is_green=False, apply_async=self._in_pool_process)
        self.in_pool: list[dict[str, Any]] = []
        self._limit_task = self._limit_post_eta = self._no_bucket

    def _no_bucket(self, *args: Any) -> None:
        raise AssertionError("a RateLimitedTask never gets Celery's per-worker bucket")

    def on_task_request(self, request: Any) -> None:
        self.handed.append(request)
        request.execute_using_pool(self.pool)

    def apply_eta_task(self, request: Any) -> None:
        self.on_task_request(request)

    def _in_pool_process(self, fn: Any, args: tuple[Any, ...], **callbacks: Any) -> None:
        self.in_pool.append(args[2])
        trace_task_ret(*args, app=self.app)

    def receive(self, task: Any, sent: list[Any]) -> list[str | None]:
        """Run the ``sent`` messages through ``task``'s strategy, as the worker's consumer
        does; the queue each request handed on was told."""
        handler = admission_strategy(task, self.app, self)
        while len(self.messages) < len(sent):
            self.connection.drain_events(timeout=5)
        for message in self.messages:
            handler(message, None, message.ack, message.reject, [])
        return [request.get(QUEUE) for request in self.in_pool]


@pytest.fixture
def worker() -> Iterator[_Worker]:
    """A consumer of llm and batch (not audit) of :func:`_app`, admission off."""
    made = _Worker(_app(), ["llm", "batch"])
    yield made
    for request in made.handed:
        worker_state.task_ready(request)
    made.connection.release()


def _task(app: Celery) -> Any:
    @app.task(base=RateLimitedTask, shared=False, name=f"queue-keys.{uuid.uuid4().hex[:6]}")
    def task() -> None: ...

    return task


def test_the_consumer_tells_the_pool_the_queue_of_each_message(worker: _Worker) -> None:
    task = _task(worker.app)
    send = worker.app.send_task
    sent = [
        # Only llm of the consumed queues takes llm.gpt4 (audit is not consumed here).
        send(task.name, exchange="work", routing_key="llm.gpt4"),
        send(task.name, exchange="jobs", routing_key="nightly"),
        # A republish may carry a stale field in its headers: the consumer's answer wins,
        send(task.name, exchange="jobs", routing_key="nightly", headers={QUEUE: "llm"}),
    ]
    # and when it has none the field is removed (the pool's fallback decides): "cron"
    # reaches batch by a binding made by hand, and kombu's memory transport gives no tag.
    worker.connection.default_channel.queue_bind("batch", "jobs", "cron")
    sent.append(send(task.name, exchange="jobs", routing_key="cron", headers={QUEUE: "llm"}))
    assert worker.receive(task, sent) == ["llm", "batch", "batch", None]
    assert [r.id for r in worker.handed] == [r.id for r in sent]
    # Each ran in the "pool process" against its queue's bucket ("cron": no queue limits).
    limiter = RateLimiter.from_url(worker.app.conf.zae_store_url)
    assert (_consumed(limiter, "llm"), _consumed(limiter, "batch")) == (1, 2)


def test_a_lease_in_a_messages_headers_never_reaches_the_pool(worker: _Worker) -> None:
    # Celery's own retry() republishes the fields of its request as headers, the
    # consumer's lease among them: with admission off nothing grants one, so none may
    # reach the pool process (it would start on a slot granted to an earlier run).
    task = _task(worker.app)
    stale = {ADMITTED: {"v": 2, "targets": [], "consumed": {}, "granted_ms": 0, "start_ms": 0}}
    sent = [worker.app.send_task(task.name, exchange="work", routing_key="llm.x", headers=stale)]
    assert worker.receive(task, sent) == ["llm"]
    assert [ADMITTED in request for request in worker.in_pool] == [False]


def test_a_countdown_message_is_told_its_queue_when_it_is_due(worker: _Worker) -> None:
    task = _task(worker.app)
    sent = [worker.app.send_task(task.name, exchange="work", routing_key="llm.x", countdown=60)]
    assert worker.receive(task, sent) == []  # waits for its ETA on the timer
    (fire, args), *_ = worker.due
    fire(*args)  # the timer calls the strategy's consumer when the ETA comes
    assert [r.get(QUEUE) for r in worker.in_pool] == ["llm"]


def test_consumer_tags_name_the_queue_whatever_its_bindings(worker: _Worker) -> None:
    """py-amqp (RabbitMQ) delivers each message with its consumer's tag: a key bound
    outside the app's queues, and a queue paused since (its consumer cancelled), are
    still told apart. Without a tag (kombu's virtual transports), bindings decide."""
    queues = ConsumedQueues.of(worker)
    assert ConsumedQueues.of(worker) is queues
    tags = dict(worker.task_consumer._active_tags)
    assert set(tags) == {"llm", "batch"}
    external = {"exchange": "work", "routing_key": "bound.by.hand"}
    assert queues.name_of({**external, "consumer_tag": tags["batch"]}) == "batch"
    assert queues.name_of(external) is None  # no tag, no declared binding
    worker.task_consumer.cancel_by_queue("llm")  # admission pauses a queue this way
    assert queues.name_of({**external, "consumer_tag": tags["llm"]}) == "llm"
    unknown = {"consumer_tag": "gone", "exchange": "jobs", "routing_key": "nightly"}
    assert queues.name_of(unknown) == "batch"  # an unknown tag: bindings decide


# -- real workers -------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("admission", ["1", "0"], ids=["admission", "pool"])
def test_a_queue_bound_by_a_topic_pattern_gets_its_limit_on_real_workers(
    broker: Broker, redis: LocalServer, tmp_path: Path, admission: str
) -> None:
    """One worker consumes "llm", bound to a topic exchange by "llm.#"; tasks are sent
    with the routing key "llm.gpt4" (tests.celery.app, ZAE_TEST_TOPIC). The queue's
    limit (a bucket refilled once a year) counts every one of them, and each run holds a
    lease: the task has no limits of its own, so only the queue's can have applied.
    "audit", declared by the app but not consumed, takes the same keys, so the app's
    declared queues alone would not name "llm": the worker's consumer does. On RabbitMQ
    a binding made by hand (no declared queue knows it) is told by its consumer tag."""
    env = {"ZAE_TEST_TOPIC": "1", "ZAE_TEST_ADMISSION": admission}
    gen = _start_fleet(
        broker, None, tmp_path, env, store_url=redis_store_url(redis), queues=("llm",), count=1
    )
    fleet = next(gen)
    topic = Exchange(fleet.queue("topic"), type="topic")
    try:
        keys = [fleet.queue("llm.gpt4")] * 6
        if broker.name == "rabbitmq":
            with fleet.client.connection_for_write() as conn:
                conn.default_channel.queue_bind(
                    fleet.queue("llm"), topic.name, fleet.queue("external.#")
                )
            keys += [fleet.queue("external.batch")] * 6
        results = [
            fleet.client.send_task(
                "tests.celery.app.on_queue_a", exchange=topic, routing_key=key, declare=[topic]
            )
            for key in keys
        ]
        infos = fleet.collect(results, timeout=60)
        assert [info["start"] is not None for info in infos] == [True] * len(keys)
        assert _consumed(fleet.limiter(), fleet.queue("llm")) == len(keys)
        assert _consumed(fleet.limiter(), fleet.queue("llm.gpt4")) == 0  # the old key
    finally:
        gen.close()
        if broker.name == "rabbitmq":
            with fleet.client.connection_for_write() as conn:
                conn.default_channel.exchange_delete(topic.name)
