"""One parser for the rate-limit headers of LLM providers.

Read, case-insensitively:

- ``retry-after-ms`` (milliseconds; preferred when present) and ``retry-after``
  (RFC 9110: whole seconds or an HTTP date; a decimal number of seconds is accepted too);
- OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, whose resets are
  Go durations (``1s``, ``6m0s``, ``12ms``, ``1h2m3.5s``);
- Anthropic's ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  {limit,remaining,reset}``, whose resets are RFC 3339 timestamps.

Every time comes back as seconds from ``now``. A header that is missing or malformed
reads as None: a provider's odd header never fails the task that called it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

__all__ = [
    "RateLimitHeaders",
    "Window",
    "parse_go_duration",
    "parse_retry_after",
    "parse_timestamp",
    "read_rate_limits",
]

KINDS = ("requests", "tokens", "input-tokens", "output-tokens")
"""The windows a provider may report (OpenAI: requests, tokens; Anthropic: all four)."""

_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Window:
    """One rate-limit window as the provider reported it (None: not reported)."""

    limit: int | None = None
    """The window's size (requests or tokens)."""
    remaining: int | None = None
    """What the provider says is left in it now."""
    reset_after: float | None = None
    """Seconds from now until it is full again (OpenAI) or replenished (Anthropic)."""


@dataclass(frozen=True)
class RateLimitHeaders:
    """What a response's headers say about rate limits."""

    retry_after: float | None = None
    """Seconds to wait before the next request (``retry-after-ms``, else ``retry-after``)."""
    windows: Mapping[str, Window] = field(default_factory=dict)
    """By kind (:data:`KINDS`): only the kinds the response reported."""

    @property
    def reset_after(self) -> float | None:
        """The latest reset among the windows with nothing remaining (None: none is
        exhausted, or none says when it resets)."""
        resets = [
            w.reset_after
            for w in self.windows.values()
            if w.remaining is not None and w.remaining <= 0 and w.reset_after is not None
        ]
        return max(resets, default=None)

    @property
    def wait(self) -> float | None:
        """How long to hold back: ``retry_after``, else the exhausted windows' reset."""
        return self.retry_after if self.retry_after is not None else self.reset_after


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration (``"6m0s"``, ``"12ms"``, ``"1h2m3.5s"``, ``"0"``), as
    OpenAI's ``x-ratelimit-reset-*`` send them; None when it is not one or negative."""
    text = text.strip()
    if text in ("0", "+0"):
        return 0.0
    if text.startswith("+"):
        text = text[1:]
    if not text or text.startswith("-"):
        return None
    total, pos = 0.0, 0
    for match in _GO_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 and math.isfinite(total) else None


def parse_timestamp(text: str, now: float) -> float | None:
    """Seconds from ``now`` (epoch seconds) until an RFC 3339 timestamp, as Anthropic's
    ``*-reset`` headers send them (0 when it has passed); None when malformed."""
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return None  # RFC 3339 always has an offset: a time without one is ambiguous
        return max(0.0, moment.timestamp() - now)
    except (ValueError, OverflowError, OSError):
        return None


def parse_retry_after(text: str, now: float) -> float | None:
    """Seconds from ``now`` that a ``Retry-After`` value asks to wait: a number of
    seconds (integer, or decimal as some APIs send), or an HTTP date; None when
    malformed. A date in the past is 0."""
    value = text.strip()
    if _NUMBER.fullmatch(value):
        return _seconds(value)
    try:
        moment = parsedate_to_datetime(value)
        if moment is None:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)  # HTTP dates are GMT
        return max(0.0, moment.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def _seconds(number: str) -> float | None:
    """A matched decimal number, or None when it is too large to be a wait."""
    value = float(number[:32]) if len(number) <= 32 else math.inf
    return value if math.isfinite(value) else None


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    value = text.strip()
    return int(value) if value.isdigit() and len(value) <= 30 else None


def read_rate_limits(
    headers: Mapping[str, str] | Iterable[tuple[str, str]], now: float | None = None
) -> RateLimitHeaders:
    """The rate-limit information in a response's ``headers`` (a mapping, e.g. an
    ``httpx.Headers``, or name/value pairs), with times as seconds from ``now`` (epoch
    seconds; default the wall clock)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    found = {str(name).lower(): str(value) for name, value in pairs}
    when = time.time() if now is None else now
    retry_after = None
    millis = found.get("retry-after-ms", "").strip()
    if _NUMBER.fullmatch(millis) and (seconds := _seconds(millis)) is not None:
        retry_after = seconds / 1000
    elif "retry-after" in found:
        retry_after = parse_retry_after(found["retry-after"], when)
    windows: dict[str, Window] = {}
    for kind in KINDS:
        openai = [
            found.get(f"x-ratelimit-{part}-{kind}") for part in ("limit", "remaining", "reset")
        ]
        anthropic = [
            found.get(f"anthropic-ratelimit-{kind}-{part}")
            for part in ("limit", "remaining", "reset")
        ]
        if any(v is not None for v in anthropic):
            limit, remaining, reset = anthropic
            reset_after = None if reset is None else parse_timestamp(reset, when)
        elif any(v is not None for v in openai):
            limit, remaining, reset = openai
            reset_after = None if reset is None else parse_go_duration(reset)
        else:
            continue
        windows[kind] = Window(_count(limit), _count(remaining), reset_after)
    return RateLimitHeaders(retry_after, windows)
