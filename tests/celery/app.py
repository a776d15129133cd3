"""The Celery app the real-worker tests run (``celery -A tests.celery.app worker``).

Configured from the environment by the test that starts the workers:
ZAE_TEST_BROKER, ZAE_TEST_BACKEND, ZAE_TEST_DATA (filesystem broker folder),
ZAE_TEST_ENDPOINT, ZAE_TEST_TABLE (DynamoDB), or ZAE_TEST_STORE_URL (zae_store_url, e.g. a
redis:// URL, instead of those two), ZAE_TEST_RPS, ZAE_TEST_PROVIDER, ZAE_TEST_START_WAIT,
ZAE_TEST_HORIZON, ZAE_TEST_BODY_SECONDS, ZAE_TEST_ACKS_LATE, ZAE_TEST_PREFETCH,
ZAE_TEST_ADMISSION ("0": tasks are gated in the pool, as before admission),
ZAE_TEST_MAX_DEFERRALS, ZAE_TEST_VISIBILITY_TIMEOUT (redis), ZAE_TEST_TOPIC ("1": the
queues of :data:`TOPIC_QUEUES` are declared), ZAE_TEST_METRICS_PORT (the metrics
bootstep and its port), ZAE_TEST_DEBUG ("1": zae-celery logs its decisions at DEBUG),
ZAE_TEST_EVENTS ("1": task events on, as with ``celery worker -E``).
"""

# kombu ships no type information.
# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from celery import Celery, chord
from celery.signals import task_postrun
from kombu.entity import Exchange, Queue

from harness import fsbroker
from zae_celery import Limit, RateLimitedTask

BROKER = os.environ.get("ZAE_TEST_BROKER", "memory://")
DATA = os.environ.get("ZAE_TEST_DATA", "")
RPS = int(os.environ.get("ZAE_TEST_RPS", "10"))
PREFIX = os.environ.get("ZAE_TEST_PREFIX", "")  # queue names of this test run
BODY_SECONDS = float(os.environ.get("ZAE_TEST_BODY_SECONDS", "0"))

# Every task of this app is rate-aware, including those that name no base class.
app = Celery(
    "zae_test",
    broker=BROKER,
    backend=os.environ.get("ZAE_TEST_BACKEND"),
    task_cls="zae_celery:RateLimitedTask",
)
if os.environ.get("ZAE_TEST_STORE_URL"):
    app.conf.zae_store_url = os.environ["ZAE_TEST_STORE_URL"]
else:
    app.conf.zae_table_name = os.environ.get("ZAE_TEST_TABLE", "zae-celery-tests")
    app.conf.zae_endpoint_url = os.environ.get("ZAE_TEST_ENDPOINT")
if os.environ.get("ZAE_TEST_EVENTS") == "1":  # tests/test_events.py: as celery worker -E
    app.conf.worker_send_task_events = True
if os.environ.get("ZAE_TEST_DEBUG") == "1":  # zae-celery's decisions at DEBUG, nothing else
    logging.getLogger("zae_celery").setLevel(logging.DEBUG)
if os.environ.get("ZAE_TEST_METRICS_PORT"):  # tests/test_metrics.py: one worker, its endpoint
    from zae_celery.metrics import MetricsStep

    app.conf.zae_metrics_port = int(os.environ["ZAE_TEST_METRICS_PORT"])
    app.steps["worker"].add(MetricsStep)
# Refilled once a year: what a bucket shows is exactly what was consumed.
TOTAL = Limit.custom("total", 1000, refill_amount=1, refill_period_seconds=31_536_000)
app.conf.update(
    zae_queue_limits={
        f"{PREFIX}shared": [Limit.per_second("tasks", 5)],
        f"{PREFIX}llm": [TOTAL],
    },
    zae_jitter=0.2,
    zae_start_wait=float(os.environ.get("ZAE_TEST_START_WAIT", "1.0")),
    zae_unavailable_retry=float(os.environ.get("ZAE_TEST_UNAVAILABLE_RETRY", "5")),
    task_acks_late=os.environ.get("ZAE_TEST_ACKS_LATE", "1") == "1",
    worker_prefetch_multiplier=int(os.environ.get("ZAE_TEST_PREFETCH", "4")),
    zae_horizon=float(os.environ.get("ZAE_TEST_HORIZON", "60")),
    zae_admission=os.environ.get("ZAE_TEST_ADMISSION", "1") == "1",
    task_default_queue=f"{PREFIX}limited",
    result_extended=True,
    broker_connection_retry_on_startup=True,
)
if BROKER.startswith(f"{fsbroker.SCHEME}://"):
    fsbroker.register()  # in each worker too: they load this module before connecting
    app.conf.broker_transport_options = fsbroker.transport_options(Path(DATA))
elif os.environ.get("ZAE_TEST_VISIBILITY_TIMEOUT"):  # redis: redeliver unacked sooner
    # kombu sweeps unacked messages every interval x throttle seconds (10 x 10 by
    # default): a message past its visibility timeout waited up to 100 s for it.
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["ZAE_TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
# Queue limits keyed by the consumed queue (tests/test_queue_keys.py): "llm" is bound to
# a topic exchange by a pattern, so no routing key is its name; "audit" (declared, never
# consumed) is bound to the same keys, so the app's declared queues alone cannot tell
# which queue a message came from: only the worker's consumer can.
TOPIC = Exchange(f"{PREFIX}topic", type="topic")
TOPIC_QUEUES = [
    Queue(f"{PREFIX}llm", TOPIC, routing_key=f"{PREFIX}llm.#"),
    Queue(f"{PREFIX}audit", TOPIC, routing_key=f"{PREFIX}llm.*"),
]
if os.environ.get("ZAE_TEST_TOPIC") == "1":
    app.conf.task_queues = TOPIC_QUEUES
if os.environ.get("ZAE_TEST_MAX_DEFERRALS"):
    app.conf.zae_max_deferrals = int(os.environ["ZAE_TEST_MAX_DEFERRALS"])
# Outage tests: ZAE_TEST_ON_UNAVAILABLE (closed/open), ZAE_TEST_BREAKER_COOLDOWN (seconds).
app.conf.zae_on_unavailable = os.environ.get("ZAE_TEST_ON_UNAVAILABLE", "closed")
app.conf.zae_breaker_cooldown = float(os.environ.get("ZAE_TEST_BREAKER_COOLDOWN", "5"))


def _run_info(task: Any) -> dict[str, Any]:
    lease = getattr(task.request, "zae_active_lease", None)  # None: no limits applied
    return {
        "start": lease.started_at if lease else None,
        "slot": lease.start_at if lease else None,
        "unchecked": bool(lease and lease.unchecked),
        "body": time.time(),
        "deferrals": int((task.request.headers or {}).get("zae_deferrals") or 0),
        "retries": task.request.retries,
        "pid": os.getpid(),
    }


@app.task(
    base=RateLimitedTask,
    bind=True,
    max_retries=0,
    rate_limits=[Limit.per_second("rps", RPS)],
    rate_resource="adherence",
)
def limited(self: RateLimitedTask, i: int) -> dict[str, Any]:
    """A task limited to RPS/s with a bucket of RPS; its body then sleeps
    ZAE_TEST_BODY_SECONDS (an I/O-bound call)."""
    info = _run_info(self)
    time.sleep(BODY_SECONDS)
    return info


RECONCILED: dict[str, Any] = {
    "base": RateLimitedTask,
    "bind": True,
    "max_retries": 0,
    "rate_limits": [Limit.per_second("rpm", 100), Limit.per_second("tpm", 1000, burst=1000)],
    "rate_resource": "reconcile",
    "rate_consume": lambda args, kwargs: {"rpm": 1, "tpm": 100},
}
"""The options of the tasks that estimate 100 tokens and report what they were given."""


def _reconcile(task: RateLimitedTask, actual: int) -> dict[str, Any]:
    info = _run_info(task)
    task.report_usage(tpm=actual)
    info["root_id"] = task.request.root_id
    return info


@app.task(**RECONCILED)
def reconciled(self: RateLimitedTask, actual: int) -> dict[str, Any]:
    """Estimates 100 tokens, reports ``actual``."""
    return _reconcile(self, actual)


@app.task(**RECONCILED)
def reconciled_then_killed(self: RateLimitedTask, actual: int) -> dict[str, Any]:
    """``reconciled``; then its pool process is killed (SIGKILL, after the run has
    ended and settled: see ``_kill_after``)."""
    return _reconcile(self, actual)


@app.task(
    **{
        **RECONCILED,
        "rate_limits": [
            Limit.per_second("rpm", RPS).with_shards(2),
            Limit.per_second("tpm", 1000, burst=1000).with_shards(2),
        ],
        "rate_resource": "spread",
    }
)
def spread(self: RateLimitedTask, actual: int) -> dict[str, Any]:
    """``reconciled`` on a bucket of RPS a second spread over two shards."""
    return _reconcile(self, actual)


@app.task(**RECONCILED)
def chord_body(self: RateLimitedTask, results: list[dict[str, Any]]) -> dict[str, Any]:
    """A chord's body: estimates 100 tokens, reports one per result it received."""
    info = _reconcile(self, len(results))
    info["root_id"] = self.request.root_id
    return info


@app.task(bind=True)
def orchestrate(self: Any, n: int, actual: int) -> str:
    """A pipeline's entry task (a plain one): a chord of ``n`` reconciled tasks and
    chord_body, all under this task's id as their root; returns the body's task id."""
    return str(chord([reconciled.s(actual) for _ in range(n)])(chord_body.s()).id)


@app.task(**{**RECONCILED, "rate_run": lambda args, kwargs: kwargs["batch"]})
def in_named_run(self: RateLimitedTask, actual: int, batch: str, fail: bool = False) -> None:
    """``reconciled`` in the run its ``batch`` argument names (``rate_run``); fails when
    asked to (after reporting)."""
    _reconcile(self, actual)
    if fail:
        raise RuntimeError("provider call failed")


@task_postrun.connect(weak=False)
def _kill_after(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", "") == "tests.celery.app.reconciled_then_killed":
        os.kill(os.getpid(), signal.SIGKILL)


@app.task(base=RateLimitedTask, bind=True, max_retries=0)
def on_queue_a(self: RateLimitedTask) -> dict[str, Any]:
    """No limits of its own: only its queue's."""
    return _run_info(self)


@app.task(base=RateLimitedTask, bind=True, max_retries=0)
def on_queue_b(self: RateLimitedTask) -> dict[str, Any]:
    """Another task type sharing the same queue limit."""
    return _run_info(self)


@app.task(
    base=RateLimitedTask,
    bind=True,
    max_retries=0,
    rate_limits=[Limit.per_second("rps", 20)],
    rate_resource="provider",
)
def call_provider(self: RateLimitedTask, i: int) -> dict[str, Any]:
    """Calls the local provider; a 429 drains the shared bucket for Retry-After."""
    info = _run_info(self)
    request = urllib.request.Request(os.environ["ZAE_TEST_PROVIDER"], data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            json.load(reply)
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            self.provider_limited(float(exc.headers.get("Retry-After", "1")))
        raise
    info["end"] = time.time()
    return info


@app.task(bind=True, max_retries=0)
def plain(self: RateLimitedTask) -> dict[str, Any]:
    """Names no base: rate-aware through task_cls, so its queue's limits apply."""
    return _run_info(self)


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limit="5/s")
def celery_style(self: RateLimitedTask) -> dict[str, Any]:
    """Celery's own rate_limit string, made global (one at a time, 5 per second)."""
    return _run_info(self)


# -- bad input: each must fail with a clear error and charge nothing -----------------------
BAD_LIMITS = [Limit.per_second("rps", 10)]


def _boom(args: Any, kwargs: Any) -> Any:
    return {"rps": 1 // 0}


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=BAD_LIMITS,
          rate_resource="bad", rate_consume=_boom)  # fmt: skip
def consume_raises(self: RateLimitedTask) -> None:
    """rate_consume raises."""


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=BAD_LIMITS,
          rate_resource="bad", rate_consume=lambda args, kwargs: ["rps", 1])  # fmt: skip
def consume_not_a_dict(self: RateLimitedTask) -> None:
    """rate_consume returns the wrong type."""


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=BAD_LIMITS,
          rate_resource="bad", rate_consume={"rps": 11})  # fmt: skip
def consume_beyond_burst(self: RateLimitedTask) -> None:
    """Asks for more than the bucket can ever hold."""


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=BAD_LIMITS,
          rate_resource="bad", rate_entity=lambda args, kwargs: kwargs["tenant"])  # fmt: skip
def entity_raises(self: RateLimitedTask) -> None:
    """rate_entity raises KeyError (no 'tenant' kwarg)."""


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=BAD_LIMITS,
          rate_resource="bad", rate_on_error="refund")  # fmt: skip
def report_unknown(self: RateLimitedTask) -> None:
    """Reports a limit it does not have; its estimate is refunded (rate_on_error)."""
    self.report_usage(tokens=5)


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=BAD_LIMITS,
          rate_resource="bad", rate_max_deferrals=2)  # fmt: skip
def few_deferrals(self: RateLimitedTask) -> dict[str, Any]:
    """Gives up after two deferrals (used with an unreachable endpoint)."""
    return _run_info(self)


# -- rate_on_error: what a failed body leaves in the buckets --------------------------------
# Refilled once a year: what the buckets show is exactly what the policy left in them.
TWO_LIMITS = [
    Limit.custom("rpm", 100, refill_amount=1, refill_period_seconds=31_536_000),
    Limit.custom("tpm", 10_000, refill_amount=1, refill_period_seconds=31_536_000),
]
ESTIMATE = {"rpm": 1, "tpm": 400}


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=TWO_LIMITS,
          rate_resource="fails-keep", rate_consume=ESTIMATE)  # fmt: skip
def fails_keep(self: RateLimitedTask) -> None:
    """The default policy: keep everything."""
    raise RuntimeError("provider call failed")


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=TWO_LIMITS,
          rate_resource="fails-refund", rate_consume=ESTIMATE, rate_on_error="refund")  # fmt: skip
def fails_refund(self: RateLimitedTask) -> None:
    """Refund everything."""
    raise RuntimeError("provider call failed")


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=TWO_LIMITS,
          rate_resource="fails-keep-rpm", rate_consume=ESTIMATE,
          rate_on_error=("rpm",))  # fmt: skip
def fails_keep_rpm(self: RateLimitedTask) -> None:
    """Keep the request, refund the tokens."""
    raise RuntimeError("provider call failed")


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=TWO_LIMITS,
          rate_resource="async-body", rate_consume=ESTIMATE)  # fmt: skip
async def async_body(self: RateLimitedTask, actual: int) -> dict[str, Any]:
    """An ``async def`` task: awaits, then reports ``actual`` tokens from the coroutine."""
    info = _run_info(self)
    await asyncio.sleep(0.01)
    info["held_after_await"] = dict(self.lease.consumed)
    self.report_usage(tpm=actual)
    info["kept"] = dict(self.lease.consumed)
    return info


# -- faults and security (tests/test_task_faults.py) ----------------------------------------
# ZAE_TEST_RECORDS: a redis URL where these tasks record their runs. A killed pool process
# requeues its message (with acks_late), the setting a rate-limited app should use.
app.conf.task_reject_on_worker_lost = True
if BROKER.startswith("zaeflaky://"):
    from tests.celery import flaky_redis  # noqa: F401  (registers the transport)


def _record(task: Any, gate: str) -> Any:
    import redis

    client = redis.Redis.from_url(os.environ["ZAE_TEST_RECORDS"], socket_timeout=150)
    lease = task.lease
    started = None if lease.started_at is None else round(lease.started_at * 1000)
    run = {**_run_info(task), "claim": lease.ticket().get("claim"), "started_ms": started}
    client.rpush(f"{gate}:runs", json.dumps(run))
    return client


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=[TOTAL],
          rate_resource="faults")  # fmt: skip
def gated(self: RateLimitedTask, gate: str, hold: bool) -> dict[str, Any]:
    """Records its run in the list ``<gate>:runs``; with ``hold``, then waits for an item
    in ``<gate>:go`` (the test's signal) before it returns."""
    client = _record(self, gate)
    if hold and client.blpop([f"{gate}:go"], timeout=120) is None:
        raise TimeoutError("the test never released the gate")
    return _run_info(self)


@app.task(base=RateLimitedTask, bind=True, max_retries=0,
          rate_limits=[Limit.per_second("rps", 1), TOTAL],
          rate_resource="paced-faults")  # fmt: skip
def paced(self: RateLimitedTask, gate: str) -> dict[str, Any]:
    """One a second: the second of two at once is deferred (republished)."""
    _record(self, gate)
    return _run_info(self)


def _secret_entity(args: Any, kwargs: Any) -> str:
    if kwargs["mode"] == "entity":
        return f"tenant#{kwargs['prompt']}"  # a hostile id made of the argument
    return "tenant"


def _secret_consume(args: Any, kwargs: Any) -> dict[str, int]:
    if kwargs["mode"] == "consume":
        raise KeyError(kwargs["prompt"])  # an exception whose text is the argument
    return {"rps": 1, "total": 1}


@app.task(base=RateLimitedTask, bind=True, max_retries=0,
          rate_limits=[Limit.per_second("rps", 1), TOTAL], rate_resource="secrets",
          rate_entity=_secret_entity, rate_consume=_secret_consume)  # fmt: skip
def secret(self: RateLimitedTask, prompt: str, mode: str) -> dict[str, Any]:
    """Takes a secret prompt through every path that logs or raises (deferral, bad input,
    report_usage); never returns it."""
    if mode == "report":
        self.report_usage(total=-len(prompt))  # a bad amount: must not quote the prompt
    self.report_usage(total=1)
    return _run_info(self)


# -- admission: a worker killed while it holds an admitted task (tests/test_admission.py) ---
SLOW = Limit.custom("slow", 1, refill_amount=1, refill_period_seconds=3)  # one per 3 s


@app.task(base=RateLimitedTask, bind=True, max_retries=0, rate_limits=[SLOW, TOTAL],
          rate_resource="kill")  # fmt: skip
def slow(self: RateLimitedTask, gate: str) -> dict[str, Any]:
    """One every 3 s; records its run (task id, worker) in ``<gate>:runs``."""
    import redis

    info = {**_run_info(self), "id": self.request.id, "hostname": self.request.hostname}
    client = redis.Redis.from_url(os.environ["ZAE_TEST_RECORDS"], socket_timeout=150)
    client.rpush(f"{gate}:runs", json.dumps(info))
    return info


# -- in-flight caps (tests/test_inflight_workers.py) ---------------------------------------
# ZAE_TEST_SEATS: the cap (default 2); ZAE_TEST_SEAT_EXPIRES: its slots' expiry, seconds.
SEATS = Limit.concurrent(
    "seats",
    int(os.environ.get("ZAE_TEST_SEATS", "2")),
    expires=float(os.environ.get("ZAE_TEST_SEAT_EXPIRES", "300")),
)


@app.task(base=RateLimitedTask, bind=True, max_retries=0,
          rate_limits=[Limit.per_second("rps", 50), SEATS], rate_resource="seats")  # fmt: skip
def seated(self: RateLimitedTask, gate: str, hold: bool) -> dict[str, Any]:
    """Counts itself in ``<gate>:inside`` while its body runs (each count it saw goes to
    ``<gate>:peaks``), records its run in ``<gate>:runs`` and, with ``hold``, waits for
    an item in ``<gate>:go``."""
    import redis

    client = redis.Redis.from_url(os.environ["ZAE_TEST_RECORDS"], socket_timeout=150)
    client.rpush(f"{gate}:peaks", client.incr(f"{gate}:inside"))
    try:
        client.rpush(f"{gate}:runs", json.dumps(_run_info(self)))
        if hold and client.blpop([f"{gate}:go"], timeout=120) is None:
            raise TimeoutError("the test never released the gate")
    finally:
        client.decr(f"{gate}:inside")
    return _run_info(self)
