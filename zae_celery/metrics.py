"""Prometheus metrics from workers (``pip install 'zae-celery[metrics]'``): what the
limiter decided, what the provider said, and how the store answered.

Opt-in, two lines in the app:

    app.conf.zae_metrics_port = 9808
    app.steps["worker"].add(zae_celery.metrics.MetricsStep)

:class:`MetricsStep` (a worker bootstep) serves ``/metrics`` on that port from the
worker's main process, in prometheus-client's multiprocess mode: every pool process
writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh folder of the
worker's unless it is set), and the endpoint adds them up. Without a port nothing is
recorded and ``prometheus_client`` is never imported.

Labels stay bounded: ``resource`` (what the limits protect: models, APIs), ``limit``
(limit names), ``queue`` and ``op`` (store operations) are few by configuration; the
entity (a tenant, of which there may be millions) and the task id are never labels, and
no value of a task's arguments ever becomes one. The metrics are listed in
docs/observability.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery import bootsteps
from celery.signals import worker_process_shutdown

__all__ = ["MULTIPROC_ENV", "MetricsStep", "ObservedStore", "Recorder", "quietly", "recorder"]

log = logging.getLogger("zae_celery")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WAIT_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Recorder:
    """The metrics of one process (created on first use, only when enabled)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.grants = Counter(
            "zae_grants", "Slots granted, by how (admission, pool, eager)", ["resource", "path"]
        )
        self.throttled = Counter(
            "zae_throttled",
            "Requests for a slot refused beyond the horizon, by the limit that bound",
            ["resource", "limit"],
        )
        self.deferrals = Counter(
            "zae_deferrals", "Tasks republished for later, by cause", ["resource", "cause"]
        )
        self.wait = Histogram(
            "zae_wait_seconds",
            "Seconds a task waited for its slot (held by the consumer, or in its pool process)",
            ["resource", "path"],
            buckets=WAIT_BUCKETS,
        )
        self.estimated = Counter(
            "zae_tokens_estimated", "Tokens consumed when granted", ["resource", "limit"]
        )
        self.charged = Counter(
            "zae_tokens_charged", "Tokens charged after reconcile", ["resource", "limit"]
        )
        self.reconciled = Counter(
            "zae_reconcile_tokens",
            "Tokens moved by reconcile: refunded, or added as debt",
            ["resource", "limit", "direction"],
        )
        self.provider = Counter(
            "zae_provider_refusals", "A provider's 429s and overloads", ["resource", "kind"]
        )
        self.blocks = Counter(
            "zae_provider_blocks", "Buckets blocked after a provider's 429", ["resource"]
        )
        self.requests = Counter(
            "zae_store_requests", "Store requests, by operation and outcome", ["op", "outcome"]
        )
        self.latency = Histogram(
            "zae_store_request_seconds",
            "Store request latency",
            ["op"],
            buckets=LATENCY_BUCKETS,
        )
        self.unchecked = Counter(
            "zae_unchecked_grants", "Grants made without the store (open mode)", ["resource"]
        )
        self.breaker = Gauge(
            "zae_breaker_open",
            "1 while a process's circuit breaker to the store is open",
            multiprocess_mode="max",
        )

    # -- what the task layer reports ------------------------------------------------------------
    def granted(
        self, resource: str, path: str, unchecked: bool, consumed: Mapping[str, int]
    ) -> None:
        """A slot was granted (``consumed``: the estimate)."""
        self.grants.labels(resource, path).inc()
        if unchecked:
            self.unchecked.labels(resource).inc()
        for name, tokens in consumed.items():
            self.estimated.labels(resource, name).inc(max(0, tokens))

    def settled(
        self, resource: str, estimated: Mapping[str, int], charged: Mapping[str, int]
    ) -> None:
        """A run's usage was reconciled: ``estimated`` at grant, ``charged`` in the end."""
        for name, tokens in charged.items():
            self.charged.labels(resource, name).inc(max(0, tokens))
            delta = tokens - estimated.get(name, 0)
            if delta:
                direction = "debt" if delta > 0 else "refund"
                self.reconciled.labels(resource, name, direction).inc(abs(delta))


_lock = threading.Lock()
_recorder: Recorder | None = None


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Record metrics in the block; a failure there is logged, never raised into a task."""
    try:
        yield
    except Exception:
        log.exception("zae-celery could not record metrics")


def recorder(enabled: bool) -> Recorder | None:
    """This process's recorder, or None when metrics are off."""
    global _recorder
    if not enabled:
        return None
    if _recorder is None:
        with _lock:
            if _recorder is None:
                _recorder = Recorder()
    return _recorder


class ObservedStore:
    """A store whose every request is counted and timed (the limiter's store, wrapped
    when metrics are on); everything else is the store's own."""

    def __init__(
        self, store: Any, metrics: Recorder, breaker_open: Callable[[], bool] | None = None
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._breaker_open = breaker_open

    @property
    def inner(self) -> Any:
        """The store observed."""
        return self._store

    def send(self, op: Any) -> Any:
        """Answer ``op``, counted."""
        with self._observed(op) as seen:
            reply = self._store.send(op)
            seen.append(reply)
        return reply

    async def asend(self, op: Any) -> Any:
        """Answer ``op`` (asyncio), counted."""
        with self._observed(op) as seen:
            reply = await self._store.asend(op)
            seen.append(reply)
        return reply

    @contextlib.contextmanager
    def _observed(self, op: Any) -> Iterator[list[Any]]:
        seen: list[Any] = []
        started = time.perf_counter()
        try:
            yield seen
        except Exception:
            self._record(op, started, None)
            raise
        self._record(op, started, seen[0] if seen else None)

    def _record(self, op: Any, started: float, reply: Any) -> None:
        """Count one request (``reply`` None: it raised); a metric's failure is logged,
        never raised into the limiter."""
        try:
            name = type(op).__name__
            self._metrics.latency.labels(name).observe(time.perf_counter() - started)
            if reply is None:
                outcome = "error"
            else:
                outcome = "ok" if reply.ok else str(reply.code or "refused").lower()
            self._metrics.requests.labels(name, outcome).inc()
            if self._breaker_open is not None:
                self._metrics.breaker.set(1 if self._breaker_open() else 0)
        except Exception:
            log.exception("zae-celery could not record a store request's metrics")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _multiprocess_values() -> None:
    """Make prometheus-client keep its values in the multiprocess folder even when it was
    imported before the folder was set: it decides at import time, and any ``celery``
    command imports every ``celery.commands`` plugin first (Flower's imports
    prometheus-client), so the pool processes would keep their samples in memory, where
    the endpoint never sees them."""
    import sys

    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep serving ``/metrics`` on ``zae_metrics_port`` (see the module).

    Created in the worker's main process before its pool starts: it points
    ``PROMETHEUS_MULTIPROC_DIR`` at a folder of its own (unless set) so that the pool
    processes, forked later, write their samples there.
    """

    label = "zae-celery metrics"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        from zae_celery.settings import Settings

        settings = Settings.from_app(worker.app)
        self.port = settings.metrics_port
        self.host = settings.metrics_host or "127.0.0.1"
        self.server: Any = None
        self.folder: str | None = None
        if self.port is not None and not os.environ.get(MULTIPROC_ENV):
            self.folder = tempfile.mkdtemp(prefix="zae-metrics-")
            os.environ[MULTIPROC_ENV] = self.folder
        if self.port is not None:
            _multiprocess_values()

    def start(self, worker: Any) -> None:
        """Serve the endpoint from a thread of the main process."""
        if self.port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        try:
            self.server, _thread = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:  # the port is taken (another worker on this host?)
            log.error(
                "zae-celery could not serve metrics on %s:%d (%s): this worker runs without "
                "its endpoint; give each worker on a host its own zae_metrics_port",
                self.host,
                self.port,
                exc,
            )
            return
        log.info("zae-celery metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self, worker: Any) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _process_done(pid: int | None = None, **kwargs: Any) -> None:
    """A pool process ends: its live gauges leave the sum (multiprocess mode)."""
    if _recorder is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]
