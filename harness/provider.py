"""A local LLM provider that enforces its own limits, for the demo, tests and benchmarks.

:class:`LocalProvider` is an HTTP server on 127.0.0.1 (a free port, served from a
background thread) that speaks both official wire formats:

- **OpenAI** chat completions: ``POST /v1/chat/completions`` (:attr:`LocalProvider.url`;
  any path other than the Anthropic one is answered the same way);
- **Anthropic** messages: ``POST /v1/messages`` (:attr:`LocalProvider.messages_url`).

The official SDKs work against it: ``openai.OpenAI(base_url=provider.base_url + "/v1")``
and ``anthropic.Anthropic(base_url=provider.base_url)``, with any API key (request
headers are ignored).

Limits
------
It enforces a requests-per-minute limit (``rpm``) and, optionally, tokens per minute
(``tpm``), input tokens per minute (``itpm``) and output tokens per minute (``otpm``):

- Each limit is a token bucket refilling ``limit / 60`` a second and holding ``window``
  seconds of it (``window=60`` is a plain per-minute bucket; a smaller window is how
  providers that quantize their per-minute limits behave), full when serving starts.
  Time comes from ``clock`` (``time.time`` by default; tests inject a manual clock),
  counted in whole microseconds.
- The buckets hold a *slack* on top: ``slack_requests`` (default 1), ``slack_tokens``
  (default 0; the demo passes the tokens of its largest request), and
  ``slack_input_tokens`` / ``slack_output_tokens`` (default: ``slack_tokens``, which is
  at least the prompt or completion of any request when it is the largest total). A
  client that starts exactly at its limit reaches the server a few milliseconds later,
  and those milliseconds of scheduling jitter must not turn a conformant start into a
  429. A client's own limits should equal the nominal limits, without the slack.
- A request is charged 1 on the rpm bucket and, at arrival, on each token bucket:

  - tpm, by ``accounting``: ``"completion"`` (default) its *real* total (prompt +
    completion, known here at arrival); ``"request"`` (OpenAI's documented rule) its
    prompt plus the completion cap it asks for (``max_completion_tokens``, else
    ``max_tokens``, else :data:`DEFAULT_MAX_TOKENS`), never refunded;
  - itpm, its prompt tokens; otpm, its completion tokens (whatever the accounting).

  All buckets are charged together or not at all. A request that does not fit is
  refused with 429: the time until it would have fitted is its retry-after.

Responses
---------
Every response carries the buckets' state after the request was charged (or not).
*Remaining* is what the nominal bucket holds (its level minus the slack, rounded down, at
least 0); *reset* is the time until the bucket is full again.

- OpenAI route: ``x-ratelimit-{limit,remaining,reset}-requests`` and, with a tpm limit,
  ``-tokens`` (the limit is the per-minute figure; the reset a Go duration such as
  ``12ms``, ``1.5s`` or ``6m0s``, rounded up to the millisecond), and ``x-request-id``.
  A 429 has ``Retry-After`` (seconds, fractional, rounded up to the millisecond) and
  ``retry-after-ms``, and the body ``{"error": {"message", "type": "requests" or
  "tokens", "param": null, "code": "rate_limit_exceeded"}}``. A success is a chat
  completion whose ``usage`` has ``prompt_tokens``, ``completion_tokens`` and
  ``total_tokens``. The itpm and otpm buckets, which OpenAI has no headers for, are
  enforced on this route too (their 429s are of type ``tokens``).
- Anthropic route: ``anthropic-ratelimit-{kind}-{limit,remaining,reset}`` for each
  configured kind: ``requests`` (rpm), ``input-tokens`` (itpm), ``output-tokens``
  (otpm), and ``tokens``: the most restrictive of the token buckets in effect (tpm,
  itpm, otpm: the one with the fewest tokens remaining, then the latest reset). A reset
  is the RFC 3339 UTC time, in whole seconds rounded up, when the bucket is full again.
  Also ``request-id``. A 429 has ``retry-after`` in whole seconds, rounded up, and the
  body ``{"type": "error", "error": {"type": "rate_limit_error", "message"}}``. A
  success is a message (``content`` of one text block, ``stop_reason`` ``end_turn``)
  whose ``usage`` has ``input_tokens``, ``output_tokens`` and zero cache tokens. The
  prompt is the ``system`` text and the messages' text (a string or text blocks).
- :meth:`LocalProvider.overload` makes the provider overloaded for some seconds of its
  clock: every request is then refused without being charged, with 529
  ``overloaded_error`` (Anthropic) or 503 ``server_error`` (OpenAI).
- Any JSON body is accepted (what is missing takes a default); a body that is not JSON
  gets 400 in the route's error shape.

Requests in flight
------------------
A request is *in flight* from the moment it is accepted (charged, status 200) until its
reply has been sent, its latency included; refused requests never are.
:attr:`LocalProvider.in_flight` is how many are now, :attr:`LocalProvider.peak_in_flight`
the most there have been since serving started or :meth:`LocalProvider.reset_peak`, and
each record keeps the count when it arrived (:attr:`ProviderRecord.in_flight`).

- ``max_in_flight`` caps them, as a self-hosted inference server caps its concurrent
  requests: a request that arrives while that many are in flight is refused at once with
  429 and a retry-after of 1 s, in the route's rate-limit shape (OpenAI: type
  ``requests``; Anthropic: ``rate_limit_error``), charged nothing, and recorded with
  ``limited_by`` :data:`IN_FLIGHT`. It does not close the key (``cooldown``).
- :meth:`LocalProvider.hold` holds the replies of the requests accepted from then on
  until :meth:`Hold.release`, so a test can keep exactly N requests in flight while it
  checks them (:meth:`LocalProvider.wait_in_flight` waits for the count); refusals are
  not held. Unused, it changes nothing.

An accepted request is answered after a latency drawn from a seeded log-normal
distribution plus a time per completion token (wall time, not the injected clock).
Its usage is deterministic per prompt, completion cap and seed, and differs from any
estimate; both routes bill the same request the same.

Every request is recorded (:attr:`LocalProvider.records`: arrival time on the provider's
clock, route, status, tokens, what each bucket was charged, the retry-after sent, and who
the request says it is for: OpenAI's ``user``, Anthropic's ``metadata.user_id``, and
the string values of its ``metadata``), so a report can count from the provider's own
books, by tenant or by task.

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from zae_celery.testing import free_port

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "IN_FLIGHT",
    "KINDS",
    "Accounting",
    "Api",
    "Hold",
    "LocalProvider",
    "ProviderRecord",
    "Usage",
    "billed_usage",
    "count_tokens",
]

Accounting = Literal["completion", "request"]
"""How the tpm bucket is charged: the real total, or the prompt plus the completion cap."""

Api = Literal["openai", "anthropic"]
"""The wire format a request came in with."""

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
        """Prompt and completion tokens together (what the tpm limit is charged by default)."""
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


KINDS = ("requests", "tokens", "input-tokens", "output-tokens")
"""The provider's buckets, named as the rate-limit headers name them."""

IN_FLIGHT = "in-flight"
"""The ``limited_by`` of a request refused by the provider's ``max_in_flight``."""

_LABELS = {
    "requests": "requests per minute (RPM)",
    "tokens": "tokens per minute (TPM)",
    "input-tokens": "input tokens per minute (ITPM)",
    "output-tokens": "output tokens per minute (OTPM)",
    IN_FLIGHT: "requests in flight",
}
_TOKEN_KINDS = ("tokens", "input-tokens", "output-tokens")
_MAX_WAIT = 3600.0
"""The longest retry-after sent (a request larger than a bucket never fits)."""
_EPSILON = 1e-6
"""Float noise tolerated when a wait or a reset is rounded up."""
_IN_FLIGHT_RETRY_AFTER = 1.0
"""The retry-after of a request refused by ``max_in_flight``, in seconds."""


@dataclass(frozen=True)
class ProviderRecord:
    """One request as the provider saw it: ``at`` is its arrival on the provider's clock.

    ``prompt_tokens`` and ``completion_tokens`` are its bill (what it was or would have
    been billed); the ``charged_*`` fields are what the tpm, itpm and otpm buckets were
    actually charged (0 for a refused request, or where that limit is not set).
    """

    at: float
    status: int
    prompt_tokens: int
    completion_tokens: int
    retry_after: float | None = None
    """The retry-after the response sent (429 only), in seconds."""
    api: Api = "openai"
    """The wire format of the request."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    """The completion cap the request asked for (or the default)."""
    charged_tokens: int = 0
    """What the tpm bucket was charged (by the provider's ``accounting``)."""
    charged_input_tokens: int = 0
    """What the itpm bucket was charged (the prompt's tokens)."""
    charged_output_tokens: int = 0
    """What the otpm bucket was charged (the completion's tokens)."""
    limited_by: str | None = None
    """What refused a 429: the bucket with the longest wait (one of :data:`KINDS`), or
    :data:`IN_FLIGHT` for the provider's ``max_in_flight``."""
    request_id: str = ""
    """The id sent in the ``x-request-id`` or ``request-id`` header."""
    user: str | None = None
    """Who the request says it is for: OpenAI's ``user`` field, Anthropic's
    ``metadata.user_id`` (None when it names nobody)."""
    metadata: tuple[tuple[str, str], ...] = ()
    """The request's ``metadata`` object: its string values, as sorted pairs (a client
    may tag its requests there; ``dict(record.metadata)`` reads them)."""
    in_flight: int = 0
    """The requests in flight just after this one arrived: itself included when it was
    accepted, not when it was refused (or charged through :meth:`LocalProvider.admit`,
    which serves nothing). The largest over the records is the peak since serving
    started."""

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together: the bill of the request."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class _State:
    """One bucket (or the in-flight cap, whose reset is 0) as a response reports it."""

    limit: int
    remaining: int
    reset: float
    """Seconds until the bucket is full again."""


class _Bucket:
    """A token bucket refilling ``limit / 60`` a second, holding ``window`` seconds of it
    plus ``slack``."""

    def __init__(self, limit: int, window: float, slack: float) -> None:
        self.limit, self.slack = limit, slack
        self.stated = limit  # what the headers say the limit is
        self.rate, self.size = limit / 60, limit * window / 60 + slack
        self.level, self.updated = self.size, 0.0

    def refill(self, now: float) -> None:
        # Whole microseconds: epoch times differ by float noise that would otherwise make
        # a bucket refilled to a whole number read a hair below it.
        elapsed = max(0.0, round(now - self.updated, 6))
        self.level = min(self.size, self.level + elapsed * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0 when it fits now); call after :meth:`refill`."""
        if amount > self.size:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def state(self) -> _State:
        """What the nominal bucket (without the slack) holds, and when it is full."""
        remaining = max(0, math.floor(self.level - self.slack + 1e-9))
        return _State(self.stated, remaining, max(0.0, (self.size - self.level) / self.rate))


class Hold:
    """Replies held until :meth:`release`: those of the requests the provider accepts while
    this hold is its current one (:meth:`LocalProvider.hold`). As a context manager, it
    releases them when the block exits."""

    def __init__(self, provider: LocalProvider) -> None:
        self._provider = provider
        self._released = threading.Event()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called (or the provider stopped)."""
        return self._released.is_set()

    def release(self) -> None:
        """Send the held replies (each after its latency, if that has not passed yet); the
        provider holds nothing from now on. Calling it again does nothing."""
        self._provider._unhold(self)
        self._released.set()

    def _wait(self) -> None:
        self._released.wait()

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LocalProvider:
    """An HTTP LLM provider on 127.0.0.1 that enforces its rate limits itself and answers
    in OpenAI's and Anthropic's wire formats (see the module's docs).

    Arguments:
        rpm: requests allowed per minute.
        tpm: tokens allowed per minute (charged by ``accounting``); None: no such limit.
        window: seconds of each limit the buckets hold (their burst), 60 by default.
        slack_requests: requests added to the rpm bucket (see the module's docs).
        slack_tokens: tokens added to the tpm bucket, normally the largest request's total.
        seed: seeds the completion lengths and latencies.
        latency_median: median of the log-normal part of the latency, seconds.
        latency_sigma: sigma of its logarithm.
        seconds_per_token: latency added per completion token.
        clock: the time in epoch seconds, for every bucket and record (``time.time``).
        accounting: ``"completion"`` (the tpm bucket is charged the real prompt +
            completion) or ``"request"`` (the prompt + the request's completion cap).
        itpm: input (prompt) tokens allowed per minute; None: no such limit.
        otpm: output (completion) tokens allowed per minute; None: no such limit.
        slack_input_tokens: tokens added to the itpm bucket; None: ``slack_tokens``.
        slack_output_tokens: tokens added to the otpm bucket; None: ``slack_tokens``.
        cooldown: seconds a 429 closes the key (0: none): every request until then is
            refused too, told the time left, as providers that answer "try again in 20 s"
            do; requests inside it do not extend it.
        advertise: per kind (``requests``, ``tokens``, ...), the limit the headers state
            instead of the one enforced: a key shared with a client the caller does not
            know of states the key's whole limit, and only its ``remaining`` shows the
            other client's use.
        max_in_flight: the most requests in flight at once (None: no cap); one more is
            refused at once with 429 and a retry-after of 1 s (see the module's docs).
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
        clock: Callable[[], float] = time.time,
        accounting: Accounting = "completion",
        itpm: int | None = None,
        otpm: int | None = None,
        slack_input_tokens: int | None = None,
        slack_output_tokens: int | None = None,
        cooldown: float = 0.0,
        advertise: dict[str, int] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if rpm < 1 or any(x is not None and x < 1 for x in (tpm, itpm, otpm)) or window <= 0:
            raise ValueError("rpm, tpm, itpm and otpm must be >= 1 and window > 0")
        slack_input = slack_tokens if slack_input_tokens is None else slack_input_tokens
        slack_output = slack_tokens if slack_output_tokens is None else slack_output_tokens
        if min(slack_requests, slack_tokens, slack_input, slack_output) < 0:
            raise ValueError("slack must be >= 0")
        if accounting not in ("completion", "request"):
            raise ValueError(f"accounting must be 'completion' or 'request', not {accounting!r}")
        self.rpm, self.tpm, self.itpm, self.otpm = rpm, tpm, itpm, otpm
        self.window, self.seed, self.accounting = window, seed, accounting
        self.latency_median, self.latency_sigma = latency_median, latency_sigma
        self.seconds_per_token = seconds_per_token
        self.clock = clock
        limits = {
            "requests": (rpm, slack_requests),
            "tokens": (tpm, slack_tokens),
            "input-tokens": (itpm, slack_input),
            "output-tokens": (otpm, slack_output),
        }
        self._buckets = {
            kind: _Bucket(limit, window, slack)
            for kind, (limit, slack) in limits.items()
            if limit is not None
        }
        for kind, stated in (advertise or {}).items():
            if kind not in self._buckets or stated < 1:
                raise ValueError(f"advertise names a limit that is not set: {kind}")
            self._buckets[kind].stated = stated
        self._records: list[ProviderRecord] = []
        self._overloaded_until = -math.inf
        if cooldown < 0:
            raise ValueError("cooldown must be >= 0")
        self.cooldown = cooldown
        self._closed_until = -math.inf
        self._closed_by = "requests"
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self._in_flight = self._peak_in_flight = 0
        self._hold: Hold | None = None
        self._lock = threading.Lock()
        self._in_flight_changed = threading.Condition(self._lock)
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

    def charges(self, usage: Usage, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, int]:
        """What a request billed ``usage``, asking for at most ``max_tokens`` of
        completion, costs on each configured bucket (by kind, :data:`KINDS`)."""
        costs = {
            "requests": 1,
            "tokens": (
                usage.total_tokens
                if self.accounting == "completion"
                else usage.prompt_tokens + max_tokens
            ),
            "input-tokens": usage.prompt_tokens,
            "output-tokens": usage.completion_tokens,
        }
        return {kind: costs[kind] for kind in self._buckets}

    # -- admission ---------------------------------------------------------------------------
    def overload(self, seconds: float) -> None:
        """Be overloaded for the next ``seconds`` of the provider's clock: every request is
        refused (529 or 503) and charged nothing. ``overload(0)`` ends it."""
        if seconds < 0 or math.isnan(seconds):
            raise ValueError("seconds must be >= 0")
        with self._lock:
            self._overloaded_until = self.clock() + seconds

    def admit(
        self,
        usage: Usage,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        *,
        api: Api = "openai",
        user: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> ProviderRecord:
        """Charge one request of ``usage`` on every bucket, or none; record it (with the
        ``user`` and ``metadata`` it was tagged with). Nothing is served, so the request is
        never in flight and ``max_in_flight`` does not apply."""
        return self._admit(usage, max_tokens, api, user, metadata)[0]

    def _admit(
        self,
        usage: Usage,
        max_tokens: int,
        api: Api,
        user: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        *,
        serve: bool = False,
    ) -> tuple[ProviderRecord, dict[str, _State], Hold | None]:
        """Admit and record one request; with ``serve``, an accepted one is in flight until
        :meth:`_reply_sent`, after the hold returned (if any) is released."""
        with self._lock:
            now = self.clock()
            request_id = f"req_local{len(self._records) + 1:08d}"
            for bucket in self._buckets.values():
                bucket.refill(now)
            charges = self.charges(usage, max_tokens)
            status, retry_after, limited_by = 200, None, None
            charged: dict[str, int] = {}
            if now < self._overloaded_until:
                status = 529 if api == "anthropic" else 503
            elif now < self._closed_until:
                status, limited_by = 429, self._closed_by
                retry_after = _retry_after(self._closed_until - now, api)
            elif serve and self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
                status, limited_by = 429, IN_FLIGHT
                retry_after = _retry_after(_IN_FLIGHT_RETRY_AFTER, api)
            else:
                waits = {k: self._buckets[k].wait_for(amount) for k, amount in charges.items()}
                if max(waits.values()) == 0:
                    for kind, amount in charges.items():
                        self._buckets[kind].level -= amount
                    charged = charges
                else:
                    status = 429
                    limited_by = max(waits, key=lambda kind: waits[kind])
                    wait = max(waits[limited_by], self.cooldown)
                    if self.cooldown:
                        self._closed_until, self._closed_by = now + wait, limited_by
                    retry_after = _retry_after(wait, api)
            hold = None
            if serve and status == 200:
                self._in_flight += 1
                self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
                self._in_flight_changed.notify_all()
                hold = self._hold
            record = ProviderRecord(
                now,
                status,
                usage.prompt_tokens,
                usage.completion_tokens,
                retry_after,
                api=api,
                max_tokens=max_tokens,
                charged_tokens=charged.get("tokens", 0),
                charged_input_tokens=charged.get("input-tokens", 0),
                charged_output_tokens=charged.get("output-tokens", 0),
                limited_by=limited_by,
                request_id=request_id,
                user=user,
                metadata=metadata,
                in_flight=self._in_flight,
            )
            self._records.append(record)
            states = {kind: bucket.state() for kind, bucket in self._buckets.items()}
            if self.max_in_flight is not None:
                room = max(0, self.max_in_flight - self._in_flight)
                states[IN_FLIGHT] = _State(self.max_in_flight, room, 0.0)
            return record, states, hold

    def _reply_sent(self) -> None:
        """An accepted request's reply was sent (or failed to be): it is no longer in flight."""
        with self._lock:
            self._in_flight -= 1
            self._in_flight_changed.notify_all()

    # -- requests in flight --------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """The requests accepted whose replies are not sent yet (latency and holds included)."""
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most requests there have been in flight at once since serving started or
        since :meth:`reset_peak`."""
        with self._lock:
            return self._peak_in_flight

    def reset_peak(self) -> None:
        """Start :attr:`peak_in_flight` again from the requests in flight now."""
        with self._lock:
            self._peak_in_flight = self._in_flight

    def wait_in_flight(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until exactly ``count`` requests are in flight: True, or False after
        ``timeout`` seconds (wall time) without it."""
        with self._in_flight_changed:
            return self._in_flight_changed.wait_for(lambda: self._in_flight == count, timeout)

    def hold(self) -> Hold:
        """Hold the replies of the requests accepted from now on until the returned hold is
        released (:meth:`Hold.release`, the end of its ``with`` block, or :meth:`stop`).
        Refusals are answered at once. One hold at a time: holding again before the
        release is a RuntimeError."""
        with self._lock:
            if self._hold is not None:
                raise RuntimeError("the provider is already holding replies")
            self._hold = Hold(self)
            return self._hold

    def _unhold(self, hold: Hold) -> None:
        with self._lock:
            if self._hold is hold:
                self._hold = None

    @property
    def records(self) -> list[ProviderRecord]:
        """Every request so far, in order of arrival (a copy)."""
        with self._lock:
            return list(self._records)

    # -- serving -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:40123``: the Anthropic SDK's
        ``base_url``; the OpenAI SDK's is this plus ``/v1``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def url(self) -> str:
        """The chat-completions address, e.g. ``http://127.0.0.1:40123/v1/chat/completions``
        (the server answers a POST on any path but :attr:`messages_url` the same way)."""
        return f"{self.base_url}/v1/chat/completions"

    @property
    def messages_url(self) -> str:
        """The Anthropic messages address, e.g. ``http://127.0.0.1:40123/v1/messages``."""
        return f"{self.base_url}/v1/messages"

    def start(self) -> LocalProvider:
        """Serve from a background thread; the buckets are full from now on."""
        if self._thread is not None:
            raise RuntimeError("the provider is already serving")
        with self._lock:
            now = self.clock()
            for bucket in self._buckets.values():
                bucket.level, bucket.updated = bucket.size, now
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-provider", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket, releasing any held replies (idempotent)."""
        with self._lock:
            hold = self._hold
        if hold is not None:
            hold.release()
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


def _retry_after(wait: float, api: Api) -> float:
    """The retry-after sent for a positive ``wait``, rounded up: to the millisecond for
    OpenAI, to whole seconds as Anthropic sends it."""
    wait = min(wait, _MAX_WAIT)
    if api == "anthropic":
        return float(max(1, math.ceil(wait - _EPSILON)))
    return max(1, math.ceil(wait * 1000 - _EPSILON)) / 1000


def _go_duration(seconds: float) -> str:
    """``seconds`` the way Go prints a duration (``0s``, ``12ms``, ``1.5s``, ``6m0s``,
    ``1h0m0s``), rounded up to the millisecond, as OpenAI's reset headers send it."""
    ms = max(0, math.ceil(seconds * 1000 - _EPSILON))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    text = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def _timestamp(at: float) -> str:
    """The RFC 3339 UTC time of epoch second ``at``, rounded up to a whole second, as
    Anthropic's reset headers send it."""
    second = math.ceil(at - _EPSILON)
    return datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _texts(content: Any) -> list[str]:
    """The text of a message's (or a system prompt's) content: a string, or a list of
    text blocks (``{"type": "text", "text": ...}``); anything else has none."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            block["text"]
            for block in content
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        ]
    return []


def _request_of(body: Any, api: Api) -> tuple[str, int]:
    """The prompt (Anthropic's ``system`` first, then the messages' text) and completion
    cap of a request; any JSON is accepted, what is missing takes a default."""
    if not isinstance(body, dict):
        return "", DEFAULT_MAX_TOKENS
    parts = _texts(body.get("system")) if api == "anthropic" else []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                parts.extend(_texts(message.get("content")))
    caps = ("max_tokens",) if api == "anthropic" else ("max_completion_tokens", "max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS
    for key in caps:
        cap = body.get(key)
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
            max_tokens = cap
            break
    return "\n".join(parts), max_tokens


def _tags_of(body: Any, api: Api) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """Who a request is for (OpenAI's ``user``, Anthropic's ``metadata.user_id``) and the
    string values of its ``metadata``, as sorted pairs; what is not a string is left out."""
    if not isinstance(body, dict):
        return None, ()
    metadata = body.get("metadata")
    pairs = tuple(
        sorted(
            (key, value)
            for key, value in (metadata.items() if isinstance(metadata, dict) else ())
            if isinstance(key, str) and isinstance(value, str)
        )
    )
    user = dict(pairs).get("user_id") if api == "anthropic" else body.get("user")
    return (user if isinstance(user, str) else None), pairs


_Reply = tuple[int, dict[str, Any], dict[str, str]]


def _openai_reply(record: ProviderRecord, states: dict[str, _State], model: str) -> _Reply:
    """Status, body and headers of a chat-completions answer to ``record``."""
    headers = {"x-request-id": record.request_id}
    for kind in ("requests", "tokens"):
        if (state := states.get(kind)) is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _go_duration(state.reset)
    if record.status == 429:
        assert record.retry_after is not None and record.limited_by is not None
        headers["Retry-After"] = f"{record.retry_after:.3f}"
        headers["retry-after-ms"] = str(round(record.retry_after * 1000))
        message = (
            f"Rate limit reached for {model} on {_LABELS[record.limited_by]}: Limit "
            f"{states[record.limited_by].limit}. Please try again in "
            f"{_go_duration(record.retry_after)}."
        )
        error_type = "tokens" if record.limited_by in _TOKEN_KINDS else "requests"
        error = {"message": message, "type": error_type, "param": None}
        return 429, {"error": {**error, "code": "rate_limit_exceeded"}}, headers
    if record.status != 200:
        error = {"message": "The server is overloaded", "type": "server_error", "param": None}
        return record.status, {"error": {**error, "code": None}}, headers
    serial = record.request_id.removeprefix("req_")
    answer = f"(simulated answer, {record.completion_tokens} tokens)"
    body = {
        "id": f"chatcmpl-{serial}",
        "object": "chat.completion",
        "created": int(record.at),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.total_tokens,
        },
    }
    return 200, body, headers


def _anthropic_reply(record: ProviderRecord, states: dict[str, _State], model: str) -> _Reply:
    """Status, body and headers of a messages answer to ``record``."""
    reported = {kind: states[kind] for kind in KINDS if kind in states and kind != "tokens"}
    token_states = [states[kind] for kind in _TOKEN_KINDS if kind in states]
    if token_states:  # the most restrictive token bucket: fewest left, then latest reset
        reported["tokens"] = min(token_states, key=lambda s: (s.remaining, -s.reset))
    headers = {"request-id": record.request_id}
    for kind, state in reported.items():
        headers[f"anthropic-ratelimit-{kind}-limit"] = str(state.limit)
        headers[f"anthropic-ratelimit-{kind}-remaining"] = str(state.remaining)
        headers[f"anthropic-ratelimit-{kind}-reset"] = _timestamp(record.at + state.reset)
    if record.status == 429:
        assert record.retry_after is not None and record.limited_by is not None
        headers["retry-after"] = str(int(record.retry_after))
        message = (
            f"This request would exceed the rate limit of {states[record.limited_by].limit} "
            f"{_LABELS[record.limited_by]}. Retry after {int(record.retry_after)} s."
        )
        return 429, _anthropic_error("rate_limit_error", message), headers
    if record.status != 200:
        return record.status, _anthropic_error("overloaded_error", "Overloaded"), headers
    body = {
        "id": f"msg_{record.request_id.removeprefix('req_')}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [
            {"type": "text", "text": f"(simulated answer, {record.completion_tokens} tokens)"}
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": record.prompt_tokens,
            "output_tokens": record.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    return 200, body, headers


def _anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _handler(provider: LocalProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            path = urlsplit(self.path).path.rstrip("/")
            api: Api = "anthropic" if path == "/v1/messages" else "openai"
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                message = "the body is not JSON"
                if api == "anthropic":
                    self._send(400, _anthropic_error("invalid_request_error", message))
                else:
                    error = {"message": message, "type": "invalid_request_error"}
                    self._send(400, {"error": {**error, "param": None, "code": None}})
                return
            prompt, max_tokens = _request_of(body, api)
            usage = provider.usage(prompt, max_tokens)
            user, metadata = _tags_of(body, api)
            record, states, hold = provider._admit(
                usage, max_tokens, api, user, metadata, serve=True
            )
            try:
                if record.status == 200 and (delay := provider.latency(prompt, usage)) > 0:
                    time.sleep(delay)  # the simulated generation time
                if hold is not None:
                    hold._wait()
                model = body.get("model") if isinstance(body, dict) else None
                reply = _anthropic_reply if api == "anthropic" else _openai_reply
                self._send(*reply(record, states, model if isinstance(model, str) else "local"))
            finally:
                if record.status == 200:  # accepted: in flight until now
                    provider._reply_sent()

        def _send(
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
