"""Count a store's requests, for reports: DynamoDB requests per operation, or the script
calls a redis-server answered.

>>> counter = RequestCounter()                       # doctest: +SKIP
>>> counter.install(limiter.client)
>>> counter.sent, counter.by_operation, counter.condition_failed

In a Celery app run by prefork workers, ``counter = count_worker_requests(app)`` hooks
the app's limiter client in each pool process before its first task.

:class:`CountingProxy` counts at the endpoint instead: every request of every process
(worker main processes included, where admission runs) that is pointed at the proxy.

On a Redis store each operation is one Lua script call, and the server counts them:
:func:`redis_script_calls` before and after a run gives the calls of every process.
"""

from __future__ import annotations

import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CountingProxy", "RequestCounter", "count_worker_requests", "redis_script_calls"]

_REFUSED = ("ConditionalCheckFailedException", "TransactionCanceledException")


class _Tally:
    """Requests per operation and refused conditions, thread-safe."""

    def __init__(self) -> None:
        self.by_operation: dict[str, int] = {}
        self.condition_failed = 0
        self._lock = threading.Lock()

    @property
    def sent(self) -> int:
        """Requests counted so far."""
        with self._lock:
            return sum(self.by_operation.values())

    def snapshot(self) -> dict[str, Any]:
        """The counts so far, JSON-friendly."""
        with self._lock:
            return {
                "by_operation": dict(self.by_operation),
                "condition_failed": self.condition_failed,
            }

    def _add(self, operation: str, refused: bool = False) -> None:
        with self._lock:
            self.by_operation[operation] = self.by_operation.get(operation, 0) + 1
            self.condition_failed += refused


class RequestCounter(_Tally):
    """Every HTTP request a client sends to DynamoDB (retries too), per operation, and the
    replies that were a refused condition (a write that lost its guess or its race).

    Counts are per process: :meth:`install` in a forked child starts from zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pid = 0

    def snapshot(self) -> dict[str, Any]:
        """The counts and this process's id, JSON-friendly."""
        return {"pid": os.getpid(), **super().snapshot()}

    def install(self, client: Any) -> None:
        """Hook ``client`` (a boto3 DynamoDB client), once per process, before it sends."""
        if self.pid == os.getpid():
            return
        with self._lock:
            self.pid, self.by_operation, self.condition_failed = os.getpid(), {}, 0
        client.meta.events.register("before-send.dynamodb.*", self._sent_one)
        client.meta.events.register("after-call.dynamodb.*", self._replied)

    def _sent_one(self, event_name: str = "", **_: Any) -> None:
        self._add(event_name.rpartition(".")[2])  # before-send.dynamodb.UpdateItem

    def _replied(self, parsed: Any = None, **_: Any) -> None:
        error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
        if isinstance(error, dict) and error.get("Code") in _REFUSED:
            with self._lock:
                self.condition_failed += 1


def count_worker_requests(app: Any) -> RequestCounter:
    """A counter of the DynamoDB requests of ``app``'s zae-celery limiter, installed in
    each worker pool process (``worker_process_init``) before it runs a task. Read it
    from a task (``counter.snapshot()``) to report the process's requests so far."""
    from celery.signals import worker_process_init

    from zae_celery.task import limiter_for

    counter = RequestCounter()

    def install(**_: Any) -> None:
        counter.install(limiter_for(app)[1].client)

    worker_process_init.connect(install, weak=False)
    return counter


class CountingProxy(_Tally):
    """An HTTP forwarder on 127.0.0.1 in front of a DynamoDB endpoint that counts every
    request it forwards, per operation, and the replies that refused a condition.

    Give :attr:`url` to every client (``zae_endpoint_url``): the counts then cover all
    processes of a fleet. Use it as a context manager; it stops serving on exit.
    Subclasses may answer a request themselves (:meth:`_intercept`), e.g. with an error.
    """

    def __init__(self, target: str) -> None:
        super().__init__()
        parts = urlsplit(target)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
                skip = {"host", "content-length", "connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                answer = proxy._intercept(operation)
                if answer is None:
                    answer = proxy._forward(self.path, body, headers)
                    proxy._add(
                        operation, any(code.encode() in answer[2][:300] for code in _REFUSED)
                    )
                status, reply_headers, payload = answer
                self.send_response(status)
                for name, value in reply_headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The proxy's address, to give to clients instead of the endpoint's."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _intercept(self, operation: str) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """A reply of the proxy's own for this request, or None to forward it."""
        return None

    def _forward(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        for attempt in range(2):
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self._target, timeout=30)
            try:
                conn.request("POST", path, body=body, headers=headers)
                reply = conn.getresponse()
                payload = reply.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = self._local.conn = None
                if attempt:
                    raise
                continue
            drop = {"content-length", "connection", "transfer-encoding"}
            keep = [(k, v) for k, v in reply.getheaders() if k.lower() not in drop]
            return reply.status, keep, payload
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


def redis_script_calls(url: str) -> int:
    """The Lua script calls (EVALSHA, EVAL) a redis-server has answered since it started
    (or since ``CONFIG RESETSTAT``), from ``INFO commandstats``, less those that failed:
    a NOSCRIPT answer, when a client first calls a script the server has not loaded yet
    (redis-py then loads it and calls again), is not a store operation.

    The Redis store sends one script call per operation, so the difference over a run
    counts the store's requests of every process pointed at the server, worker main
    processes included. It counts every other client's scripts on that server too (kombu
    runs scripts for expiring queues, e.g. Celery's remote-control replies): give the
    store a server of its own for an exact count. ``url`` is a store URL
    (``redis://HOST:PORT/DB?prefix=...``; for ``redis+cluster://`` the count is that
    node's) or a plain redis URL.
    """
    import redis

    from zae_celery.core.stores import StoreUrl

    parsed = StoreUrl.parse(url, "url")
    if parsed.kind != "redis" or parsed.endpoint_url is None:
        raise ValueError(f"not a redis URL: {url!r}")
    client = redis.Redis.from_url(parsed.endpoint_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    total = 0
    for name in _SCRIPT_COMMANDS:
        entry = stats.get(name) or {}
        total += int(entry.get("calls", 0)) - int(entry.get("failed_calls", 0))
    return total
