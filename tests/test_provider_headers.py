"""The provider rate-limit header parser: Go durations, Retry-After (seconds, decimal,
HTTP date), RFC 3339 resets, OpenAI's and Anthropic's header families, precedence, case,
and malformed values (never an exception). Properties with Hypothesis, and the values
the providers document."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zae_celery.providers import (
    Window,
    parse_go_duration,
    parse_retry_after,
    parse_timestamp,
    read_rate_limits,
)

NOW = 1_800_000_000.0


def go_duration(hours: int, minutes: int, millis: int) -> str:
    """A duration the way Go's time.Duration.String() writes one."""
    if hours == minutes == millis == 0:
        return "0s"
    if hours == minutes == 0 and millis < 1000:
        return f"{millis}ms"
    seconds = f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


@given(st.integers(0, 48), st.integers(0, 59), st.integers(0, 59_999))
def test_a_go_duration_reads_back_as_its_seconds(hours: int, minutes: int, millis: int) -> None:
    text = go_duration(hours, minutes, millis)
    expected = hours * 3600 + minutes * 60 + millis / 1000
    assert parse_go_duration(text) == pytest.approx(expected, abs=1e-9), text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("1h2m3.5s", 3723.5), ("0", 0.0),
     ("20ms", 0.02), ("7.66s", 7.66), ("2m59.56s", 179.56), ("1.5h", 5400.0), ("300us", 3e-4)],
)  # fmt: skip
def test_go_durations_as_openai_sends_them(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1", "-1s", "1x", "1s2", "1 s", "abc", "1s-2m", ".s"])
def test_a_malformed_go_duration_reads_as_none(text: str) -> None:
    assert parse_go_duration(text) is None


@given(st.integers(0, 10**6))
def test_retry_after_in_whole_seconds(seconds: int) -> None:
    assert parse_retry_after(str(seconds), NOW) == seconds


@given(st.integers(0, 10**6), st.integers(0, 999))
def test_retry_after_in_decimal_seconds(seconds: int, millis: int) -> None:
    assert parse_retry_after(f"{seconds}.{millis:03d}", NOW) == pytest.approx(
        seconds + millis / 1000
    )


@given(st.integers(-3600, 86_400))
def test_retry_after_as_an_http_date_counts_from_now(offset: int) -> None:
    moment = datetime.fromtimestamp(NOW + offset, tz=timezone.utc)
    assert parse_retry_after(format_datetime(moment, usegmt=True), NOW) == max(0, offset)


@given(st.integers(-3600, 86_400), st.integers(-12, 12), st.booleans())
def test_an_rfc3339_reset_counts_from_now_in_any_offset(
    offset: int, zone_hours: int, zulu: bool
) -> None:
    zone = timezone(timedelta(hours=0 if zulu else zone_hours))
    text = datetime.fromtimestamp(NOW + offset, tz=zone).isoformat()
    if zulu:
        text = text.replace("+00:00", "Z")
    assert parse_timestamp(text, NOW) == pytest.approx(max(0, offset))


@pytest.mark.parametrize(
    "text",
    ["", "soon", "-5", "Thu, 99 Foo 2025", "1e3", "9" * 400, "Mon, 01 Jan 99999 00:00:00 GMT"],
)
def test_a_malformed_retry_after_reads_as_none(text: str) -> None:
    assert parse_retry_after(text, NOW) is None


def test_a_reset_without_an_offset_reads_as_none() -> None:
    assert parse_timestamp("2027-01-15T08:00:00", NOW) is None
    assert parse_timestamp("not a time", NOW) is None
    assert parse_timestamp("0001-01-01T00:00:00+14:00", NOW) == 0.0  # long past


def test_counts_too_long_to_be_counts_read_as_none() -> None:
    info = read_rate_limits({"x-ratelimit-remaining-tokens": "9" * 5000}, now=NOW)
    assert info.windows["tokens"] == Window(None, None, None)


def test_openai_headers_as_documented() -> None:
    info = read_rate_limits(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        now=NOW,
    )
    assert info.retry_after is None
    assert info.windows == {
        "requests": Window(60, 59, 1.0),
        "tokens": Window(150_000, 149_984, 360.0),
    }
    assert info.reset_after is None and info.wait is None  # nothing exhausted


def test_anthropic_headers_as_documented() -> None:
    reset = datetime.fromtimestamp(NOW + 42, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    headers = [("retry-after", "42")]
    for kind, limit, remaining in [
        ("requests", 50, 0),
        ("tokens", 80_000, 79_000),
        ("input-tokens", 40_000, 39_500),
        ("output-tokens", 8_000, 7_500),
    ]:
        headers += [
            (f"anthropic-ratelimit-{kind}-limit", str(limit)),
            (f"anthropic-ratelimit-{kind}-remaining", str(remaining)),
            (f"anthropic-ratelimit-{kind}-reset", reset),
        ]
    info = read_rate_limits(headers, now=NOW)
    assert info.retry_after == 42
    assert info.windows["requests"] == Window(50, 0, 42.0)
    assert info.windows["input-tokens"] == Window(40_000, 39_500, 42.0)
    assert set(info.windows) == {"requests", "tokens", "input-tokens", "output-tokens"}
    assert info.reset_after == 42.0  # the exhausted requests window


def test_retry_after_ms_wins_and_names_are_case_insensitive() -> None:
    info = read_rate_limits({"Retry-After": "30", "RETRY-AFTER-MS": "1250"}, now=NOW)
    assert info.retry_after == 1.25
    assert read_rate_limits({"Retry-After": "30"}, now=NOW).retry_after == 30


def test_an_exhausted_window_gives_the_wait_when_there_is_no_retry_after() -> None:
    info = read_rate_limits(
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "12ms",
         "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"},
        now=NOW,
    )  # fmt: skip
    assert info.wait == 2.0


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=40), max_size=8))
def test_any_headers_parse_without_an_exception(headers: dict[str, str]) -> None:
    read_rate_limits(headers, now=NOW)


@given(
    st.sampled_from(["requests", "tokens", "input-tokens", "output-tokens"]),
    st.sampled_from(["limit", "remaining", "reset"]),
    st.text(max_size=30),
)
def test_any_value_in_a_known_header_parses_without_an_exception(
    kind: str, part: str, value: str
) -> None:
    read_rate_limits(
        {f"x-ratelimit-{part}-{kind}": value, f"anthropic-ratelimit-{kind}-{part}": value,
         "retry-after": value, "retry-after-ms": value},
        now=NOW,
    )  # fmt: skip
