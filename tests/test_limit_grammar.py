"""The one text form of a limit (``Limit.parse``/``Limit.format``, ``parse_rate``): the
grammar the command line's ``--limit`` and Celery's ``rate_limit`` strings share."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from zae_celery.core import Limit, ValidationError
from zae_celery.core.limits import (
    MAX_PERIOD_MS,
    MAX_TOKENS,
    format_rate,
    parse_rate,
)

UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
ALIASES = {
    "ms": ["ms"],
    "s": ["s", "sec", "second", "seconds"],
    "m": ["m", "min", "minute", "minutes"],
    "h": ["h", "hour", "hours"],
    "d": ["d", "day", "days"],
}

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True)


@st.composite
def limits(draw: st.DrawFn) -> Limit:
    """Any valid limit (the internal start track aside)."""
    capacity = draw(st.integers(1, MAX_TOKENS))
    return Limit(
        draw(names),
        capacity,
        min(MAX_TOKENS, capacity + draw(st.integers(0, 10**6))),
        draw(st.integers(1, MAX_TOKENS)),
        draw(st.integers(1, MAX_PERIOD_MS)),
    )


@given(limits())
def test_any_limit_round_trips_through_its_text_form(limit: Limit) -> None:
    text = limit.format()
    assert str(limit) == text
    assert Limit.parse(text) == limit


@given(st.integers(1, MAX_TOKENS), st.integers(1, MAX_PERIOD_MS))
def test_any_rate_round_trips_through_its_text_form(amount: int, period_ms: int) -> None:
    assert parse_rate(format_rate(amount, period_ms)) == (amount, period_ms)


def _written(value: int, draw: st.DrawFn) -> str:
    """``value`` as a person may write it: plain, with _ separators, or with k or M."""
    forms = [str(value), f"{value:_}"]
    if value % 1000 == 0:
        forms.append(f"{value // 1000}k")
    if value % 1_000_000 == 0:
        forms.append(f"{value // 1_000_000}M")
    return draw(st.sampled_from(forms))


@st.composite
def written_limits(draw: st.DrawFn) -> tuple[str, Limit]:
    """A limit as a person may write it (spaces, separators, suffixes, unit aliases,
    decimal amounts), and the limit it means, computed independently of the parser."""
    name = draw(names)
    unit = draw(st.sampled_from(sorted(UNITS_MS)))
    count = draw(st.integers(1, 100))
    period_ms = count * UNITS_MS[unit]
    period = draw(st.sampled_from(ALIASES[unit]))
    if count > 1 or draw(st.booleans()):
        period = f"{count}{period}"
    if draw(st.booleans()):  # a decimal amount with up to three places
        thousandths = draw(st.integers(1, 10**9))
        amount_text = f"{thousandths // 1000}.{thousandths % 1000:03d}"
        exact = Fraction(thousandths, 1000)
    else:
        whole = draw(st.integers(1, 10**12))
        amount_text = _written(whole, draw)
        exact = Fraction(whole)
    refill, period_ms = exact.numerator, period_ms * exact.denominator
    assume(period_ms <= MAX_PERIOD_MS)
    capacity, burst = refill, refill
    options = ""
    if draw(st.booleans()):
        capacity = draw(st.integers(1, 10**12))
        options += f":capacity={_written(capacity, draw)}"
    burst = capacity
    if draw(st.booleans()):
        burst = capacity + draw(st.integers(0, 10**6))
        options += f":burst={_written(burst, draw)}"
    space = draw(st.sampled_from(["", " "]))
    text = f"{space}{name}{space}={space}{amount_text}{space}/{space}{period}{options}{space}"
    return text, Limit(name, capacity, burst, refill, period_ms)


@given(written_limits())
def test_what_a_person_writes_parses_to_what_it_means(case: tuple[str, Limit]) -> None:
    text, expected = case
    parsed = Limit.parse(text)
    assert parsed == expected
    assert Limit.parse(parsed.format()) == parsed  # and its canonical form means the same


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("500/m", (500, 60_000)),
        ("90k/m", (90_000, 60_000)),
        ("2M/d", (2_000_000, 86_400_000)),
        ("10/s", (10, 1000)),
        ("0.5/s", (1, 2000)),
        ("1.5/s", (3, 2000)),
        ("1.5k/m", (1500, 60_000)),
        ("0.0001/s", (1, 10_000_000)),
        ("10/10s", (10, 10_000)),  # never reduced: the bucket's key is amount/period
        ("7/500ms", (7, 500)),
        (" 3 / minute ", (3, 60_000)),
    ],
)
def test_rates(text: str, rate: tuple[int, int]) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "problem", "allowed"),
    [
        ("rpm", "is not a limit", "NAME=AMOUNT/PERIOD"),
        ("rpm=500", "is not a limit", "NAME=AMOUNT/PERIOD"),
        ("1rpm=5/m", "invalid limit name", "a letter"),
        ("rpm=abc/m", "amount 'abc' is not a whole number or a decimal", "90k"),
        ("rpm=1e3/m", "is not a whole number or a decimal", "90k"),
        ("rpm=0/m", "amount '0' is out of range", "1.."),
        ("rpm=0.0/m", "out of range", "decimal above 0"),
        (f"rpm={MAX_TOKENS + 1}/m", "out of range", f"..{MAX_TOKENS}"),
        ("rpm=5/week", "UNIT one of ms, s, m, h, d", "10s"),
        ("rpm=5/0s", "is zero", "at least 1"),
        ("rpm=5/3651d", "longer than 10 years", "ms"),
        ("rpm=0.000000001/d", "more than 10 years", "ms"),
        ("rpm=5/m:burst=2", "burst 2 is below capacity 5", ">= capacity"),
        ("rpm=5/m:capacity=0", "capacity '0' is out of range", "1.."),
        ("rpm=5/m:burst=1.5", "burst '1.5' is not a whole number", "90k"),
        ("rpm=5/m:brust=9", "unknown option", "capacity=N, burst=N or shards=N"),
        ("rpm=5/m:burst=9:burst=10", "appears twice", ""),
    ],
)
def test_bad_limits_say_which_part_is_wrong_and_what_is_allowed(
    text: str, problem: str, allowed: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Limit.parse(text, field="--limit")
    assert info.value.field == "--limit"
    assert problem in info.value.problem
    assert allowed in info.value.allowed


@pytest.mark.parametrize("text", ["", "100", "/m", "100/", "m/100", "1/2/3"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_rate(text, field="rate_limit")
    assert info.value.field == "rate_limit"
    assert info.value.allowed  # says what is allowed


@pytest.mark.parametrize("value", [5, None, b"rpm=5/m", Limit.per_minute("rpm", 5)])
def test_only_text_parses(value: object) -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        Limit.parse(value)  # type: ignore[arg-type]
