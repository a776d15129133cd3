"""The Celery app run by the workers of the Celery benchmark (``benchmarks/celery.py``).

    celery -A benchmarks.celery_app worker -P prefork -c 2 -Q <queue>

Two tasks call the same local HTTP provider, which allows ``ZAE_BENCH_RATE`` requests a
second and answers 429 with ``Retry-After`` beyond that:

* ``zae_call``: ``base=RateLimitedTask`` with one global limit of ``RATE``/s (bucket
  ``RATE``); on a 429 it calls ``self.provider_limited(retry_after)``.
* ``builtin_call``: a plain task with Celery's own ``rate_limit="<RATE>/s"`` (a bucket
  in each worker instance); on a 429 it retries with ``countdown=retry_after``.

Both return what the benchmark measures: when the body started, how often the task was
republished.

Configured by the benchmark through the environment:

==========================  =============================================================
``ZAE_BENCH_BROKER``        broker URL (``redis://...`` or ``benchfs://``)
``ZAE_BENCH_BROKER_DIR``    the folder of the ``benchfs://`` broker
``ZAE_BENCH_BACKEND``       result backend URL
``ZAE_BENCH_ENDPOINT``      DynamoDB endpoint (DynamoDB Local or moto server)
``ZAE_BENCH_TABLE``         the run's table
``ZAE_BENCH_STORE_URL``     the run's Redis store (``zae_store_url``), instead of both
``ZAE_BENCH_RATE``          requests per second (the limit and the provider's)
``ZAE_BENCH_PROVIDER``      URL of the provider
``ZAE_BENCH_HORIZON``       ``zae_horizon`` (default 60)
``ZAE_BENCH_BODY``          seconds the body waits after the provider call (an I/O call)
``ZAE_BENCH_PREFETCH``      ``worker_prefetch_multiplier`` (default Celery's, 4)
``ZAE_BENCH_ACKS_LATE``     ``1``: ``task_acks_late`` (and reject on a lost worker)
``ZAE_BENCH_ADMISSION``     ``0``: ``zae_admission=False`` (tasks gated in the pool)
``ZAE_BENCH_EVENTS``        ``1``: task events on (as ``celery worker -E``)
``ZAE_BENCH_INFLIGHT``      N: zae-celery's task also has ``Limit.concurrent("calls", N)``
``ZAE_BENCH_SLOT_POLL``     ``zae_slot_poll`` (seconds)
``ZAE_BENCH_METRICS_PORT``  zae-celery's metrics on, served on this port (one worker
                            serves it; the others log that it is taken and record all
                            the same)
==========================  =============================================================

DynamoDB requests are counted by the benchmark at the endpoint (a counting proxy), and a
Redis store's script calls by the server (``INFO commandstats``), so the workers' main
processes, where admission runs, are counted too.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from celery import Celery, Task

from harness import fsbroker as fs_broker
from zae_celery import Limit, RateLimitedTask
from zae_celery.task import HEADER_DEFERRALS

RATE = int(os.environ.get("ZAE_BENCH_RATE", "10"))
INFLIGHT = int(os.environ.get("ZAE_BENCH_INFLIGHT", "0"))
CAP = [Limit.concurrent("calls", INFLIGHT)] if INFLIGHT else []
BROKER = os.environ.get("ZAE_BENCH_BROKER", "memory://")
PROVIDER = os.environ.get("ZAE_BENCH_PROVIDER", "http://127.0.0.1:9/")
BUILTIN_MAX_RETRIES = 10_000
"""Retries are the built-in task's only way to wait out a 429: never run out of them."""

app = Celery("zae_bench", broker=BROKER, backend=os.environ.get("ZAE_BENCH_BACKEND"))
# Otherwise Celery's defaults and zae-celery's defaults: what a user starts with.
if os.environ.get("ZAE_BENCH_STORE_URL"):
    app.conf.zae_store_url = os.environ["ZAE_BENCH_STORE_URL"]
else:
    app.conf.zae_table_name = os.environ.get("ZAE_BENCH_TABLE", "zae-celery-bench")
    app.conf.zae_endpoint_url = os.environ.get("ZAE_BENCH_ENDPOINT")
app.conf.update(
    zae_horizon=float(os.environ.get("ZAE_BENCH_HORIZON", "60")),
    zae_admission=os.environ.get("ZAE_BENCH_ADMISSION", "1") == "1",
    broker_connection_retry_on_startup=True,
)
if os.environ.get("ZAE_BENCH_METRICS_PORT"):  # --metrics: recorded in every process
    from zae_celery.metrics import MetricsStep

    app.conf.zae_metrics_port = int(os.environ["ZAE_BENCH_METRICS_PORT"])
    app.steps["worker"].add(MetricsStep)
if os.environ.get("ZAE_BENCH_SLOT_POLL"):  # --slot-poll
    app.conf.zae_slot_poll = float(os.environ["ZAE_BENCH_SLOT_POLL"])
if os.environ.get("ZAE_BENCH_EVENTS") == "1":  # --events: as celery worker -E
    app.conf.worker_send_task_events = True
if os.environ.get("ZAE_BENCH_PREFETCH"):
    app.conf.worker_prefetch_multiplier = int(os.environ["ZAE_BENCH_PREFETCH"])
if os.environ.get("ZAE_BENCH_ACKS_LATE") == "1":
    app.conf.task_acks_late = True
    app.conf.task_reject_on_worker_lost = True
BODY = float(os.environ.get("ZAE_BENCH_BODY", "0"))
if BROKER.startswith(f"{fs_broker.SCHEME}://"):
    fs_broker.register()  # in each worker too: they load this module before connecting
    app.conf.broker_transport_options = fs_broker.transport_options(
        Path(os.environ["ZAE_BENCH_BROKER_DIR"])
    )


# -- the provider -----------------------------------------------------------------------------
def _call_provider(task: Task, attempt: int) -> float | None:
    """POST to the provider: None when it accepted the request, else its Retry-After."""
    request = urllib.request.Request(
        PROVIDER,
        data=f'{{"task": "{task.request.id}", "attempt": {attempt}}}'.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()
    except urllib.error.HTTPError as exc:
        if exc.code != 429:
            raise
        return float(exc.headers.get("Retry-After") or 1.0)
    return None


# -- the two tasks ------------------------------------------------------------------------------
@app.task(
    base=RateLimitedTask,
    bind=True,
    max_retries=0,  # waiting on the limit never uses retries
    rate_limits=[Limit.per_second("rps", RATE), *CAP],
    rate_resource="bench-provider",
)
def zae_call(self: RateLimitedTask, i: int) -> dict[str, Any]:
    """Gated by the shared bucket (DynamoDB or Redis); a 429 empties it for every worker."""
    body = time.time()  # the actual start
    started = self.lease.started_at  # the engine's clock: when the start was counted
    slot = self.lease.start_at  # when it could have started (its reserved slot, if deferred)
    republished = int((self.request.headers or {}).get(HEADER_DEFERRALS) or 0)
    retry_after = _call_provider(self, republished)
    if retry_after is not None:
        self.provider_limited(retry_after)
    time.sleep(BODY)
    return {
        "i": i,
        "start": started,
        "body": body,
        "slot": slot,
        "end": time.time(),
        "republishes": republished,
        "pid": os.getpid(),
    }


@app.task(bind=True, rate_limit=f"{RATE}/s", max_retries=BUILTIN_MAX_RETRIES)
def builtin_call(self: Task, i: int) -> dict[str, Any]:
    """Celery's own rate_limit (per worker instance); a 429 is retried after Retry-After."""
    started = time.time()
    retry_after = _call_provider(self, self.request.retries)
    if retry_after is not None:
        raise self.retry(countdown=retry_after)
    time.sleep(BODY)
    return {
        "i": i,
        "start": started,
        "body": started,
        "slot": None,
        "end": time.time(),
        "republishes": self.request.retries,
        "pid": os.getpid(),
    }
