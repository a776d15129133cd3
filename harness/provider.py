"""A local LLM provider that enforces its own limits, for the demo, tests and benchmarks.

:class:`LocalProvider` is an HTTP server on 127.0.0.1 (a free port, served from a
background thread) that answers ``POST`` requests shaped like OpenAI's chat completions
and enforces a requests-per-minute limit and, optionally, a tokens-per-minute limit:

- Each limit is a token bucket refilling ``limit / 60`` a second and holding ``window``
  seconds of it (``window=60`` is a plain per-minute bucket; a smaller window is how
  providers that quantize their per-minute limits behave), full when serving starts.
- The buckets hold a *slack* on top: ``slack_requests`` (default 1) and ``slack_tokens``
  (default: the tokens of the largest request, which the caller names). A client that
  starts exactly at its limit reaches the server a few milliseconds later, and those
  milliseconds of scheduling jitter must not turn a conformant start into a 429. A
  client's own limits should equal the nominal limits, without the slack.
- A request is charged its *real* total tokens (prompt + completion, known here at
  arrival) on the tpm bucket and 1 on the rpm bucket, both or neither. A request that
  does not fit gets ``429`` with ``Retry-After`` in seconds (fractional, rounded up to the
  millisecond; also ``retry-after-ms``): the time until it would have fitted.
- An accepted request is answered after a latency drawn from a seeded log-normal
  distribution plus a time per completion token, with a JSON body like a chat completion
  whose ``usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``) is
  deterministic per prompt, ``max_tokens`` and seed, and differs from any estimate.

Every request is recorded (:attr:`LocalProvider.records`: arrival time, status, tokens),
so a report can count from the provider's own books.

>>> with LocalProvider(rpm=600, tpm=90_000, window=2) as provider:  # doctest: +SKIP
...     post(provider.url, {"messages": [{"role": "user", "content": "Hi"}]})
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from zae_celery.testing import free_port

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "LocalProvider",
    "ProviderRecord",
    "Usage",
    "billed_usage",
    "count_tokens",
]

DEFAULT_MAX_TOKENS = 256
"""The completion cap of a request that names no ``max_tokens``."""

_PIECE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """The provider's tokenizer: one token per word or punctuation mark, plus one for every
    six letters of a word beyond its first six (long words split into pieces)."""
    return sum(1 + max(0, len(piece) - 1) // 6 for piece in _PIECE.findall(text))


@dataclass(frozen=True)
class Usage:
    """What one request costs, as the provider bills it."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together (what the tpm limit is charged)."""
        return self.prompt_tokens + self.completion_tokens


def billed_usage(prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0) -> Usage:
    """What a provider seeded with ``seed`` bills for ``prompt``: the prompt's tokens
    (:func:`count_tokens`) and a completion of 20-95 % of ``max_tokens``, drawn from the
    prompt and the seed (the same request is always billed the same)."""
    rng = _rng(seed, prompt, max_tokens, "completion")
    completion = max(1, min(max_tokens, round(max_tokens * rng.uniform(0.2, 0.95))))
    return Usage(count_tokens(prompt), completion)


def _rng(seed: int, prompt: str, number: int, purpose: str) -> random.Random:
    key = f"{seed}\0{purpose}\0{number}\0{prompt}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


@dataclass(frozen=True)
class ProviderRecord:
    """One request as the provider saw it: ``at`` is its arrival (``time.time()``)."""

    at: float
    status: int
    prompt_tokens: int
    completion_tokens: int
    retry_after: float | None = None

    @property
    def total_tokens(self) -> int:
        """The tokens the request was (or would have been) charged."""
        return self.prompt_tokens + self.completion_tokens


class _Bucket:
    """A token bucket refilling ``rate`` a second, holding at most ``size``."""

    def __init__(self, rate: float, size: float) -> None:
        self.rate, self.size = rate, size
        self.level, self.updated = size, 0.0

    def refill(self, now: float) -> None:
        self.level = min(self.size, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0 when it fits now); call after :meth:`refill`."""
        if amount > self.size:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)


class LocalProvider:
    """An HTTP LLM provider on 127.0.0.1 that enforces rpm (and tpm) itself.

    Arguments:
        rpm: requests allowed per minute.
        tpm: tokens (prompt + completion) allowed per minute; None: no token limit.
        window: seconds of each limit the buckets hold (their burst), 60 by default.
        slack_requests: requests added to the rpm bucket (see the module's docs).
        slack_tokens: tokens added to the tpm bucket, normally the largest request's total.
        seed: seeds the completion lengths and latencies.
        latency_median: median of the log-normal part of the latency, seconds.
        latency_sigma: sigma of its logarithm.
        seconds_per_token: latency added per completion token.
    """

    def __init__(
        self,
        rpm: int,
        tpm: int | None = None,
        *,
        window: float = 60.0,
        slack_requests: int = 1,
        slack_tokens: int = 0,
        seed: int = 0,
        latency_median: float = 0.0,
        latency_sigma: float = 0.0,
        seconds_per_token: float = 0.0,
    ) -> None:
        if rpm < 1 or (tpm is not None and tpm < 1) or window <= 0:
            raise ValueError("rpm and tpm must be >= 1 and window > 0")
        if slack_requests < 0 or slack_tokens < 0:
            raise ValueError("slack must be >= 0")
        self.rpm, self.tpm, self.window, self.seed = rpm, tpm, window, seed
        self.latency_median, self.latency_sigma = latency_median, latency_sigma
        self.seconds_per_token = seconds_per_token
        self._requests = _Bucket(rpm / 60, rpm * window / 60 + slack_requests)
        self._tokens = None if tpm is None else _Bucket(tpm / 60, tpm * window / 60 + slack_tokens)
        self._records: list[ProviderRecord] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- what it bills -----------------------------------------------------------------------
    def usage(self, prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> Usage:
        """The usage this provider reports for ``prompt`` (:func:`billed_usage`)."""
        return billed_usage(prompt, max_tokens, self.seed)

    def latency(self, prompt: str, usage: Usage) -> float:
        """The seconds the provider takes to answer ``prompt`` (seeded, per prompt)."""
        rng = _rng(self.seed, prompt, usage.completion_tokens, "latency")
        base = self.latency_median * math.exp(rng.gauss(0.0, self.latency_sigma))
        return base + self.seconds_per_token * usage.completion_tokens

    # -- admission ---------------------------------------------------------------------------
    def admit(self, usage: Usage) -> ProviderRecord:
        """Charge one request of ``usage`` on both buckets, or neither; record it."""
        with self._lock:
            now = time.time()
            buckets = [(self._requests, 1.0)]
            if self._tokens is not None:
                buckets.append((self._tokens, float(usage.total_tokens)))
            for bucket, _ in buckets:
                bucket.refill(now)
            wait = max(bucket.wait_for(amount) for bucket, amount in buckets)
            if wait == 0:
                for bucket, amount in buckets:
                    bucket.level -= amount
                record = ProviderRecord(now, 200, usage.prompt_tokens, usage.completion_tokens)
            else:
                retry_after = math.ceil(min(wait, 3600.0) * 1000) / 1000
                record = ProviderRecord(
                    now, 429, usage.prompt_tokens, usage.completion_tokens, retry_after
                )
            self._records.append(record)
            return record

    @property
    def records(self) -> list[ProviderRecord]:
        """Every request so far, in order of arrival (a copy)."""
        with self._lock:
            return list(self._records)

    # -- serving -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The chat-completions address, e.g. ``http://127.0.0.1:40123/v1/chat/completions``
        (the server answers a POST on any path the same way)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1/chat/completions"

    def start(self) -> LocalProvider:
        """Serve from a background thread; the buckets are full from now on."""
        if self._thread is not None:
            raise RuntimeError("the provider is already serving")
        with self._lock:
            now = time.time()
            for bucket in (self._requests, self._tokens):
                if bucket is not None:
                    bucket.level, bucket.updated = bucket.size, now
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-provider", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _prompt_of(body: Any) -> tuple[str, int]:
    """The text and ``max_tokens`` of a chat-completion request (any JSON is accepted)."""
    if not isinstance(body, dict):
        return "", DEFAULT_MAX_TOKENS
    messages = body.get("messages")
    parts = []
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS
    return "\n".join(parts), max_tokens


def _handler(provider: LocalProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._reply(400, {"error": {"message": "the body is not JSON"}})
                return
            prompt, max_tokens = _prompt_of(body)
            usage = provider.usage(prompt, max_tokens)
            record = provider.admit(usage)
            if record.retry_after is not None:
                self._reply(
                    429,
                    {"error": {"type": "rate_limit_exceeded", "message": "rate limit reached"}},
                    {
                        "Retry-After": f"{record.retry_after:.3f}",
                        "retry-after-ms": str(round(record.retry_after * 1000)),
                    },
                )
                return
            time.sleep(provider.latency(prompt, usage))  # the simulated generation time
            model = body.get("model", "local") if isinstance(body, dict) else "local"
            self._reply(
                200,
                {
                    "id": f"chatcmpl-local-{int(record.at * 1e6)}",
                    "object": "chat.completion",
                    "created": int(record.at),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": f"(simulated answer, {usage.completion_tokens} tokens)",
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens,
                    },
                },
            )

        def _reply(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
