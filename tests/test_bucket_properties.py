"""Properties of the pure GCRA math in ``core/bucket.py`` and of Limit validation. No I/O.

A tiny simulator applies ``bucket`` to one integer TAT exactly as the engine does for a
single bucket item (grant when ``retry_after_ms`` is within the horizon, then
``tat = next_tat(...)``); the properties are checked with exact integer arithmetic, and
against a naive token bucket kept in exact fractions.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zae_celery.core import ValidationError, bucket
from zae_celery.core.bucket import Shape, Step
from zae_celery.core.limits import MAX_PERIOD_MS, MAX_TOKENS, Limit

# -- strategies ---------------------------------------------------------------------------


@st.composite
def limits(draw: st.DrawFn, big: bool = True) -> Limit:
    """A valid Limit: mostly small numbers, sometimes extreme ones."""
    if big and draw(st.booleans()):
        amount = draw(st.sampled_from([1, 7, 10**9, MAX_TOKENS]))
        period = draw(st.sampled_from([1, 3, 60_000, MAX_PERIOD_MS]))
        capacity = draw(st.sampled_from([1, 2, 1000, MAX_TOKENS]))
    else:
        amount = draw(st.integers(1, 1000))
        period = draw(st.integers(1, 100_000))
        capacity = draw(st.integers(1, 100))
    burst = min(MAX_TOKENS, capacity + draw(st.integers(0, 100)))
    return Limit(
        "lim", capacity=capacity, burst=burst, refill_amount=amount, refill_period_ms=period
    )


def now_ms_values() -> st.SearchStrategy[int]:
    return st.integers(0, 4 * 10**12)


@dataclass(frozen=True)
class Scenario:
    limit: Limit
    t0: int
    requests: list[tuple[int, int]]  # (time in ms, tokens), times non-decreasing


@st.composite
def scenarios(draw: st.DrawFn, max_requests: int = 60) -> Scenario:
    """A limit and a schedule of requests whose gaps span 'bucket drained' to 'refilled'."""
    limit = draw(limits())
    # ms to refill the whole burst (at least 1); gaps go up to twice that.
    refill = max(1, -(-limit.burst * limit.refill_period_ms // limit.refill_amount))
    gap = st.one_of(st.just(0), st.integers(0, min(refill, 10**6)), st.integers(0, 2 * refill))
    tokens = st.integers(1, min(limit.burst, 10**6)) | st.just(limit.burst)
    pairs = draw(st.lists(st.tuples(gap, tokens), min_size=1, max_size=max_requests))
    t = t0 = draw(now_ms_values())
    requests = []
    for g, n in pairs:
        t += g
        requests.append((t, n))
    return Scenario(limit, t0, requests)


# -- the simulator ------------------------------------------------------------------------


@dataclass
class Sim:
    """One limit's stored TAT, driven the way the engine drives a single bucket item."""

    limit: Limit
    tat: int | None = None

    def take(self, tokens: int, now_ms: int, horizon_ms: int = 0) -> bool:
        """Grant ``tokens`` at ``now_ms`` (or at a slot within ``horizon_ms``) or refuse."""
        if bucket.retry_after_ms(self.limit, self.tat, tokens, now_ms) > horizon_ms:
            return False
        self.tat = bucket.next_tat(self.limit, self.tat, tokens, now_ms)
        return True

    def copy(self) -> Sim:
        return Sim(self.limit, self.tat)


def run(scenario: Scenario) -> tuple[Sim, list[tuple[int, int, bool]]]:
    """Play a schedule; returns the simulator and (time, tokens, granted) per request."""
    sim = Sim(scenario.limit)
    log = [(t, n, sim.take(n, t)) for t, n in scenario.requests]
    return sim, log


def free_units(limit: Limit, tat: int | None, now_ms: int) -> int | None:
    """``now + tau - tat`` on the scaled clock (None for an absent TAT: a full bucket)."""
    if tat is None:
        return None
    return bucket.now_units(limit, now_ms) + bucket.tau(limit) - tat


def exact_available(limit: Limit, tat: int | None, now_ms: int) -> Fraction:
    free = free_units(limit, tat, now_ms)
    if free is None:
        return Fraction(limit.burst)
    return min(Fraction(limit.burst), Fraction(free, limit.refill_period_ms))


# -- 1. never more than burst + rate * window -----------------------------------------


@settings(deadline=None, max_examples=300)
@given(scenarios())
def test_grants_in_any_window_stay_within_burst_plus_refill(scenario: Scenario) -> None:
    _, log = run(scenario)
    limit = scenario.limit
    a, p = limit.refill_amount, limit.refill_period_ms
    times = [t for t, _, _ in log]  # non-decreasing
    prefix = [0]
    for _, n, ok in log:
        prefix.append(prefix[-1] + (n if ok else 0))
    distinct = sorted(set(times))
    for i, t1 in enumerate(distinct):
        lo = bisect.bisect_left(times, t1)
        for t2 in distinct[i:]:
            total = prefix[bisect.bisect_right(times, t2)] - prefix[lo]
            assert total * p <= limit.burst * p + (t2 - t1) * a, (t1, t2, total)


@settings(deadline=None, max_examples=300)
@given(scenarios())
def test_gcra_matches_a_naive_token_bucket_exactly(scenario: Scenario) -> None:
    """Same decisions, same level, as a bucket refilled continuously in exact fractions."""
    limit = scenario.limit
    rate = Fraction(limit.refill_amount, limit.refill_period_ms)  # tokens per ms
    sim = Sim(limit)
    level, last = Fraction(limit.burst), scenario.requests[0][0]
    for t, n in scenario.requests:
        level = min(Fraction(limit.burst), level + (t - last) * rate)
        last = t
        assert bucket.available(limit, sim.tat, t) == float(level)
        expected = level >= n
        assert sim.take(n, t) is expected
        if expected:
            level -= n
        assert exact_available(limit, sim.tat, t) == level


# -- 2. retry_after is exact ------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(scenarios(max_requests=20), st.integers(0, 10**6), st.data())
def test_retry_after_is_exact(scenario: Scenario, later: int, data: st.DataObject) -> None:
    sim, _ = run(scenario)
    limit = scenario.limit
    now = scenario.requests[-1][0] + later
    n = data.draw(st.integers(1, min(limit.burst, 10**6)), label="tokens")
    # Drain at `now` to just below n tokens, so that n is refused.
    level = exact_available(limit, sim.tat, now)
    if level >= n:
        assert sim.take(math.floor(level) - n + 1, now)
    assert not sim.copy().take(n, now)
    wait = bucket.retry_after_ms(limit, sim.tat, n, now)
    assert wait > 0
    # Exact in the naive model too: n tokens are there at now + wait, not a ms earlier.
    assert exact_available(limit, sim.tat, now + wait) >= n
    assert exact_available(limit, sim.tat, now + wait - 1) < n
    before = sim.copy()
    assert before.take(n, now + wait - 1) is False
    assert before.tat == sim.tat  # a refusal changes nothing
    assert bucket.retry_after_ms(limit, sim.tat, n, now + wait - 1) == 1
    assert sim.take(n, now + wait) is True
    # Waiting longer never hurts.
    again = Sim(limit, before.tat)
    assert again.take(n, now + wait + later) is True


def test_retry_after_on_an_absent_bucket_is_zero() -> None:
    limit = Limit.per_minute("rpm", 5)
    for n in (0, 1, 5):
        assert bucket.retry_after_ms(limit, None, n, 123) == 0
    assert bucket.available(limit, None, 123) == 5.0


@pytest.mark.parametrize(
    ("limit", "tokens", "expected_ms"),
    [
        (Limit.per_second("rps", 10), 1, 100),
        (Limit.per_minute("rpm", 7), 1, 8572),  # 60000/7 = 8571.43 -> 8572
        (Limit.per_minute("rpm", 7), 7, 60_000),
        (Limit.per_second("rps", 3, burst=6), 4, 1334),  # 4 tokens at 3/s: 1333.3 -> 1334
        (Limit.custom("tpd", 1000, 1000, 86_400), 1000, 86_400_000),
    ],
)
def test_retry_after_examples(limit: Limit, tokens: int, expected_ms: int) -> None:
    """After draining the burst at t, ``tokens`` are back after exactly ``expected_ms``."""
    sim = Sim(limit)
    t = 1_700_000_000_000
    assert sim.take(limit.burst, t)
    assert bucket.retry_after_ms(limit, sim.tat, tokens, t) == expected_ms
    assert not sim.copy().take(tokens, t + expected_ms - 1)
    assert sim.take(tokens, t + expected_ms)


# -- 3. debt is repaid at the refill rate -------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(scenarios(max_requests=10), st.integers(1, 10**9), st.integers(0, 10**6), st.data())
def test_debt_is_repaid_at_the_refill_rate(
    scenario: Scenario, debt: int, later: int, data: st.DataObject
) -> None:
    sim, _ = run(scenario)
    limit = scenario.limit
    a, p, b = limit.refill_amount, limit.refill_period_ms, limit.burst
    t0 = scenario.requests[-1][0] + later
    before = exact_available(limit, sim.tat, t0)
    # An adjustment of (what is there) + debt tokens: available drops to exactly -debt.
    adjustment = math.ceil(before) + debt
    extra = math.ceil(before) - before  # the fraction of a token ceil() added
    tat = bucket.next_tat(limit, sim.tat, adjustment, t0)
    start = -debt - extra
    assert exact_available(limit, tat, t0) == start
    assert bucket.available(limit, tat, t0) == float(start)

    # In whole refill periods the level rises by exactly A tokens per period, up to burst.
    periods = (b - start) // a  # the last whole period still at or below burst
    k1 = data.draw(st.integers(0, min(periods, 10**6)), label="k1")
    k2 = data.draw(st.integers(k1, min(periods, 10**6)), label="k2")
    at1, at2 = bucket.available(limit, tat, t0 + k1 * p), bucket.available(limit, tat, t0 + k2 * p)
    assert at1 == float(start + k1 * a)
    assert at2 == float(start + k2 * a)

    # At any ms: exactly start + ms * A / P (correctly rounded), capped at burst.
    ms1 = data.draw(st.integers(0, 10**7), label="ms1")
    ms2 = data.draw(st.integers(ms1, 10**7 + 10), label="ms2")
    for ms in (ms1, ms2):
        expected = min(Fraction(b), start + Fraction(ms * a, p))
        assert bucket.available(limit, tat, t0 + ms) == float(expected)

    # The debt is gone (0 tokens fit again) exactly ceil(debt' * P / A) ms later.
    owed = -start * p  # scaled units of debt, an integer
    assert owed == debt * p + extra * p and owed.denominator == 1
    repaid = -(-int(owed) // a)
    assert bucket.retry_after_ms(limit, tat, 0, t0) == repaid
    assert bucket.available(limit, tat, t0 + repaid) >= 0
    assert bucket.available(limit, tat, t0 + repaid - 1) < 0


def test_debt_example() -> None:
    """500 tokens/min, 700 into debt: -700, then +500 per minute, back to 0 after 84 s."""
    limit = Limit.per_minute("tpm", 500)
    t0 = 1_700_000_000_000
    tat = bucket.next_tat(limit, None, 500 + 700, t0)
    assert bucket.available(limit, tat, t0) == -700.0
    assert bucket.available(limit, tat, t0 + 60_000) == -200.0
    assert bucket.available(limit, tat, t0 + 120) == -699.0
    assert bucket.available(limit, tat, t0 + 84_000) == 0.0
    assert bucket.retry_after_ms(limit, tat, 0, t0) == 84_000
    assert bucket.retry_after_ms(limit, tat, 1, t0) == 84_120
    assert bucket.available(limit, tat, t0 + 10**9) == 500.0


# -- 4. reservations --------------------------------------------------------------------


@settings(deadline=None, max_examples=300)
@given(limits(big=False), st.integers(1, 100), now_ms_values(), st.integers(0, 10**6))
def test_reservations_at_one_instant_are_spaced_by_n_tokens(
    limit: Limit, n_raw: int, now: int, horizon: int
) -> None:
    n = min(n_raw, limit.burst)
    a, p, b = limit.refill_amount, limit.refill_period_ms, limit.burst
    sim = Sim(limit)
    tats: list[int] = []
    starts: list[int] = []
    while len(tats) < 300 and sim.take(n, now, horizon):
        assert sim.tat is not None
        tats.append(sim.tat)
        starts.append(bucket.start_ms(limit, sim.tat, now))
    k = len(tats)
    assert k >= 1
    for i, (tat, start) in enumerate(zip(tats, starts, strict=True)):
        assert tat == now * a + (i + 1) * n * p
        assert now <= start <= now + horizon
        # Exactly when i+1 reservations of n tokens have been refilled beyond the burst.
        assert start == now + max(0, -(-((i + 1) * n - b) * p // a))
    assert all(y - x == n * p for x, y in itertools.pairwise(tats))
    assert starts == sorted(starts)
    step_lo, step_hi = (n * p) // a, -(-(n * p) // a)
    for s1, s2 in itertools.pairwise(starts):
        if s1 > now:  # the burst is used up: slots are n tokens apart
            assert s2 - s1 in (step_lo, step_hi)
            if (n * p) % a == 0:
                assert s2 - s1 == n * p // a
    if k < 300:
        # Refused exactly when one more would exceed burst + horizon's refill.
        assert k * n * p <= b * p + horizon * a < (k + 1) * n * p
        assert bucket.retry_after_ms(limit, sim.tat, n, now) > horizon


@settings(deadline=None, max_examples=300)
@given(scenarios(max_requests=40), st.integers(0, 10**6))
def test_reservations_over_time_start_in_order(scenario: Scenario, horizon: int) -> None:
    limit = scenario.limit
    a = limit.refill_amount
    sim = Sim(limit)
    last_start = -1
    for now, n in scenario.requests:
        old = sim.tat
        wait = bucket.retry_after_ms(limit, old, n, now)
        if not sim.take(n, now, horizon):
            assert wait > horizon and sim.tat == old
            continue
        assert sim.tat is not None
        start = bucket.start_ms(limit, sim.tat, now)
        assert start == now + wait  # the slot is exactly the retry_after of the request
        assert now <= start <= now + horizon
        assert start >= last_start
        last_start = start
        if old is not None and old > now * a:  # queued behind earlier grants
            assert sim.tat - old == bucket.cost(limit, n)
        else:
            assert sim.tat == now * a + bucket.cost(limit, n)


# -- 5. plan() chooses the right write ------------------------------------------------


def apply(step: Step, tat: int | None) -> tuple[bool, int | None]:
    """What DynamoDB does with ``step``'s condition and update on a stored ``tat``
    (None: the attribute does not exist). Returns (condition held, TAT afterwards)."""
    shape = step.shape
    if shape is Shape.REFUND:  # unconditional ADD (an absent number counts as 0)
        return True, (tat or 0) + step.amount
    if shape is Shape.EXACT:
        ok = tat == step.expected
        return ok, step.amount if ok else tat
    if tat is None:  # CHECK and FRESH accept attribute_not_exists; QUEUE needs it
        if shape is Shape.QUEUE:
            return False, None
        return True, (step.amount if shape is Shape.FRESH else None)
    if shape is Shape.CHECK:
        assert step.bound is not None
        return tat <= step.bound, tat
    if shape is Shape.FRESH:
        ok = tat <= step.now
        return ok, step.amount if ok else tat
    ok = tat > step.now and (step.bound is None or tat <= step.bound)
    return ok, tat + step.amount if ok else tat


LIM = Limit.per_second("rps", 10, burst=20)  # A = 10, P = 1000, tau = 20_000
NOW = 5_000  # ms; scaled now = 50_000


@pytest.mark.parametrize(
    ("tokens", "guess", "known", "shape"),
    [
        (0, None, False, Shape.CHECK),
        (0, 10**9, False, Shape.CHECK),
        (0, 10**9, True, Shape.CHECK),
        (3, None, False, Shape.FRESH),
        (3, 0, False, Shape.FRESH),
        (3, 49_999, False, Shape.FRESH),
        (3, 50_000, False, Shape.FRESH),  # guess == now: still FRESH
        (3, 50_001, False, Shape.QUEUE),
        (3, 10**9, False, Shape.QUEUE),
        (3, None, True, Shape.EXACT),
        (3, 0, True, Shape.EXACT),
        (3, 60_000, True, Shape.EXACT),
    ],
)
def test_plan_shape(tokens: int, guess: int | None, known: bool, shape: Shape) -> None:
    step = bucket.plan(LIM, tokens, NOW, 2_000, guess, known=known)
    assert step.shape is shape
    assert step.tokens == tokens
    assert step.now == 50_000
    bound = 50_000 + 20_000 + 2_000 * 10 - tokens * 1000
    if shape is Shape.CHECK:
        assert step.bound == bound
    elif shape is Shape.FRESH:
        assert step.amount == 50_000 + tokens * 1000
    elif shape is Shape.QUEUE:
        assert step.amount == tokens * 1000
        assert step.bound == bound
    else:
        assert step.expected == guess
        assert step.amount == bucket.next_tat(LIM, guess, tokens, NOW)


@pytest.mark.parametrize(
    ("tokens", "guess", "shape", "amount", "bound"),
    [
        (-1, None, Shape.REFUND, -1000, None),
        (-7, 10**9, Shape.REFUND, -7000, None),
        (-7, 0, Shape.REFUND, -7000, None),
        (4, None, Shape.FRESH, 54_000, None),
        (4, 50_000, Shape.FRESH, 54_000, None),
        (4, 10**9, Shape.QUEUE, 4000, None),  # debt allowed: no upper bound
        (10**6, 10**9, Shape.QUEUE, 10**9, None),
    ],
)
def test_plan_adjust_shape(
    tokens: int, guess: int | None, shape: Shape, amount: int, bound: int | None
) -> None:
    step = bucket.plan_adjust(LIM, tokens, NOW, guess)
    assert step.shape is shape
    assert step.amount == amount
    assert step.bound == bound


stored_tats = st.none() | st.integers(-(10**6), 10**7) | st.just(50_000) | st.just(70_000)


@settings(max_examples=500)
@given(
    limits(big=False),
    st.integers(0, 100),
    now_ms_values(),
    st.integers(0, 10**5),
    st.data(),
    st.booleans(),
)
def test_plan_write_is_sound_for_any_stored_tat(
    limit: Limit, n_raw: int, now: int, horizon: int, data: st.DataObject, known: bool
) -> None:
    """Whatever the guess, the write either fails its condition or does exactly what the
    simulator does; with a right guess it fails only when the request must be refused.

    EXACT carries no bound: the engine sends it only for a TAT it has just read and
    checked, so for EXACT only the update itself is checked here."""
    tokens = min(n_raw, limit.burst)
    a, p = limit.refill_amount, limit.refill_period_ms
    span = (limit.burst + horizon * a // p + 10) * p
    near = st.integers(now * a - span, now * a + span)
    actual = data.draw(st.none() | near, label="actual")
    guess = data.draw(st.none() | near | st.just(actual), label="guess")
    step = bucket.plan(limit, tokens, now, horizon, guess, known=known)
    if tokens == 0:
        assert step.shape is Shape.CHECK
    elif known:
        assert step.shape is Shape.EXACT
    elif guess is None or guess <= now * a:
        assert step.shape is Shape.FRESH
    else:
        assert step.shape is Shape.QUEUE
    allowed = bucket.retry_after_ms(limit, actual, tokens, now) <= horizon
    ok, new = apply(step, actual)
    if ok:
        assert new == (actual if tokens == 0 else bucket.next_tat(limit, actual, tokens, now))
        if step.shape is not Shape.EXACT:
            assert allowed
    if guess == actual:
        assert ok is (True if step.shape is Shape.EXACT else allowed)


@settings(max_examples=500)
@given(limits(), st.integers(1, 100), now_ms_values(), st.integers(0, 10**6), st.data())
def test_a_limit_counted_after_a_common_start_is_charged_never_early(
    limit: Limit, n_raw: int, now: int, ahead: int, data: st.DataObject
) -> None:
    """A non-binding limit of a grant that starts at ``start`` is written at
    ``fold_ms`` (a margin after the start). Whenever that write succeeds, its TAT is at
    least GCRA's for consuming at the start (never early: the dominance that keeps every
    window within the limit), and the request may still start at ``start``. A limit
    last seen busy is counted now instead (its alignment, if needed, follows)."""
    tokens = min(n_raw, limit.burst)
    a = limit.refill_amount
    start = now + ahead
    margin = bucket.fold_margin_ms(limit, tokens)
    assert 0 <= margin <= bucket.FOLD_MAX_MS
    assert margin * a + bucket.cost(limit, tokens) <= bucket.tau(limit)
    guess = data.draw(st.none() | st.integers(0, start * a), label="guess")
    at = bucket.fold_ms(limit, tokens, guess, start - 1, start, now)
    assert at == (now if guess is not None and guess > now * a else start + margin)
    horizon = ahead + bucket.tau(limit) // a + 1
    step = bucket.plan(limit, tokens, at, horizon - (at - now), guess)
    actual = data.draw(st.none() | st.integers(0, (start + margin) * a + 10), label="actual")
    ok, new = apply(step, actual)
    if ok and at != now:
        assert new is not None
        assert new >= bucket.next_tat(limit, actual, tokens, start)
        assert bucket.start_ms(limit, new, now) <= start
    # Counted now (a busy view), the grant's reply decides whether an alignment follows.


@settings(max_examples=500)
@given(limits(), st.integers(1, 100), now_ms_values(), st.integers(2, 10**6), st.data())
def test_a_busy_limit_padded_to_a_common_start_is_charged_never_early(
    limit: Limit, n_raw: int, now: int, ahead: int, data: st.DataObject
) -> None:
    """A non-binding limit last seen busy but short of the common start gets a queue
    add padded up to the start and its margin (``plan_until``). Whatever other clients
    wrote since (they only push the TAT further), a write that succeeds leaves the TAT
    at least GCRA's for consuming at the start (never early), and the request's own slot
    on this limit within the horizon; with the view exact, it succeeds exactly when that
    slot is within the horizon."""
    tokens = min(n_raw, limit.burst)
    a = limit.refill_amount
    start = now + ahead
    until = start + bucket.fold_margin_ms(limit, tokens)
    guess = data.draw(st.integers(now * a + 1, start * a - 1), label="guess")
    horizon = data.draw(st.integers(0, ahead + 2 * bucket.tau(limit) // a), label="horizon")
    step = bucket.plan_until(limit, tokens, now, horizon, guess, until)
    assert step.shape is Shape.QUEUE
    actual = data.draw(st.integers(guess, guess + 2 * bucket.tau(limit) + ahead * a))
    ok, new = apply(step, actual)
    if ok:
        assert new is not None
        assert new >= bucket.next_tat(limit, actual, tokens, start)
        assert bucket.start_ms(limit, new, now) <= now + horizon
    if actual == guess:
        padded = bucket.now_units(limit, until) + bucket.cost(limit, tokens)
        assert ok is (bucket.start_ms(limit, padded, now) <= now + horizon)


@settings(max_examples=300)
@given(limits(big=False), st.integers(-1000, 1000), now_ms_values(), st.data())
def test_plan_adjust_is_never_refused_with_a_right_guess(
    limit: Limit, tokens: int, now: int, data: st.DataObject
) -> None:
    assume(tokens != 0)
    a, p = limit.refill_amount, limit.refill_period_ms
    actual = data.draw(st.none() | st.integers(now * a - 10**6 * p, now * a + 10**6 * p))
    step = bucket.plan_adjust(limit, tokens, now, actual)
    ok, new = apply(step, actual)
    assert ok
    if tokens < 0:
        assert step.shape is Shape.REFUND
        assert new == (actual or 0) + tokens * p
    else:
        assert step.shape in (Shape.FRESH, Shape.QUEUE)
        assert step.bound is None
        assert new == bucket.next_tat(limit, actual, tokens, now)


# -- 6. Limit validation ----------------------------------------------------------------

LimitAny: Any = Limit  # for deliberately ill-typed calls


def _limit(**overrides: Any) -> Callable[[], object]:
    kwargs: dict[str, Any] = {
        "name": "rpm",
        "capacity": 10,
        "burst": 10,
        "refill_amount": 10,
        "refill_period_ms": 60_000,
    }
    kwargs.update(overrides)
    return lambda: Limit(**kwargs)


def _custom(seconds: Any) -> Callable[[], object]:
    return lambda: LimitAny.custom("tpd", 100, 100, seconds)


BAD_LIMITS: list[Any] = [
    # capacity
    pytest.param(lambda: LimitAny.per_minute("rpm", 0), "capacity", id="capacity-0"),
    pytest.param(lambda: LimitAny.per_minute("rpm", -5), "capacity", id="capacity-negative"),
    pytest.param(
        lambda: LimitAny.per_minute("rpm", MAX_TOKENS + 1), "capacity", id="capacity-huge"
    ),
    pytest.param(lambda: LimitAny.per_minute("rpm", True), "capacity", id="capacity-bool"),
    pytest.param(lambda: LimitAny.per_minute("rpm", 10.0), "capacity", id="capacity-float"),
    pytest.param(lambda: LimitAny.per_minute("rpm", 2.5), "capacity", id="capacity-fraction"),
    pytest.param(lambda: LimitAny.per_minute("rpm", "10"), "capacity", id="capacity-str"),
    pytest.param(lambda: LimitAny.per_minute("rpm", None), "capacity", id="capacity-none"),
    pytest.param(_limit(capacity=False), "capacity", id="direct-capacity-bool"),
    # burst
    pytest.param(lambda: LimitAny.per_minute("rpm", 10, burst=9), "burst", id="burst-below"),
    pytest.param(lambda: LimitAny.per_minute("rpm", 10, burst=0), "burst", id="burst-0"),
    pytest.param(lambda: LimitAny.per_minute("rpm", 10, burst=20.0), "burst", id="burst-float"),
    pytest.param(lambda: LimitAny.per_minute("rpm", 1, burst=True), "burst", id="burst-bool"),
    pytest.param(
        lambda: LimitAny.per_minute("rpm", 10, burst=MAX_TOKENS + 1), "burst", id="burst-huge"
    ),
    # refill amount
    pytest.param(lambda: LimitAny.custom("x", 10, 0, 1), "refill_amount", id="amount-0"),
    pytest.param(lambda: LimitAny.custom("x", 10, -1, 1), "refill_amount", id="amount-negative"),
    pytest.param(lambda: LimitAny.custom("x", 10, 1.0, 1), "refill_amount", id="amount-float"),
    pytest.param(lambda: LimitAny.custom("x", 10, True, 1), "refill_amount", id="amount-bool"),
    pytest.param(
        lambda: LimitAny.custom("x", 10, MAX_TOKENS + 1, 1), "refill_amount", id="amount-huge"
    ),
    # refill period, in seconds (custom)
    pytest.param(_custom(0), "refill_period_seconds", id="seconds-0"),
    pytest.param(_custom(0.0), "refill_period_seconds", id="seconds-0.0"),
    pytest.param(_custom(-1), "refill_period_seconds", id="seconds-negative"),
    pytest.param(_custom(-0.5), "refill_period_seconds", id="seconds-negative-float"),
    pytest.param(_custom(math.nan), "refill_period_seconds", id="seconds-nan"),
    pytest.param(_custom(math.inf), "refill_period_seconds", id="seconds-inf"),
    pytest.param(_custom(-math.inf), "refill_period_seconds", id="seconds-minus-inf"),
    pytest.param(_custom(0.0005), "refill_period_seconds", id="seconds-half-ms"),
    pytest.param(_custom(1.0005), "refill_period_seconds", id="seconds-not-whole-ms"),
    pytest.param(_custom(1e-9), "refill_period_seconds", id="seconds-below-1ms"),
    pytest.param(_custom(True), "refill_period_seconds", id="seconds-bool"),
    pytest.param(_custom("60"), "refill_period_seconds", id="seconds-str"),
    pytest.param(_custom(None), "refill_period_seconds", id="seconds-none"),
    pytest.param(
        _custom(MAX_PERIOD_MS // 1000 + 1),
        "refill_period_seconds",
        id="seconds-over-10y",
    ),
    pytest.param(
        _custom(1e300),
        "refill_period_seconds",
        id="seconds-1e300",
    ),
    # refill period, in ms (direct construction)
    pytest.param(
        _limit(refill_period_ms=0),
        "refill_period_ms",
        id="ms-0",
    ),
    pytest.param(
        _limit(refill_period_ms=-1),
        "refill_period_ms",
        id="ms-negative",
    ),
    pytest.param(
        _limit(refill_period_ms=MAX_PERIOD_MS + 1),
        "refill_period_ms",
        id="ms-over-10y",
    ),
    pytest.param(_limit(refill_period_ms=1.5), "refill_period_ms", id="ms-float"),
    pytest.param(_limit(refill_period_ms=1000.0), "refill_period_ms", id="ms-whole-float"),
    pytest.param(_limit(refill_period_ms=True), "refill_period_ms", id="ms-bool"),
    pytest.param(_limit(refill_period_ms=math.nan), "refill_period_ms", id="ms-nan"),
    pytest.param(_limit(refill_period_ms=math.inf), "refill_period_ms", id="ms-inf"),
    # names
    pytest.param(lambda: LimitAny.per_minute("", 10), "name", id="name-empty"),
    pytest.param(lambda: LimitAny.per_minute("1rpm", 10), "name", id="name-digit-first"),
    pytest.param(lambda: LimitAny.per_minute("_rpm", 10), "name", id="name-underscore-first"),
    pytest.param(lambda: LimitAny.per_minute("r pm", 10), "name", id="name-space"),
    pytest.param(lambda: LimitAny.per_minute("rpm-1", 10), "name", id="name-dash"),
    pytest.param(lambda: LimitAny.per_minute("rpm@x", 10), "name", id="name-at"),
    pytest.param(lambda: LimitAny.per_minute("rpm#x", 10), "name", id="name-hash"),
    pytest.param(lambda: LimitAny.per_minute("r\u00e9q", 10), "name", id="name-non-ascii"),
    pytest.param(lambda: LimitAny.per_minute("a" * 65, 10), "name", id="name-65-chars"),
    pytest.param(lambda: LimitAny.per_minute(None, 10), "name", id="name-none"),
    pytest.param(lambda: LimitAny.per_minute(5, 10), "name", id="name-int"),
    pytest.param(lambda: LimitAny.per_minute(b"rpm", 10), "name", id="name-bytes"),
    pytest.param(
        lambda: LimitAny.per_minute("rpm\n", 10),
        "name",
        id="name-trailing-newline",
    ),
]


@pytest.mark.parametrize(("make", "field"), BAD_LIMITS)
def test_invalid_limit_is_rejected_naming_the_argument(
    make: Callable[[], object], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        make()
    assert info.value.field == field
    assert str(info.value).startswith(f"{info.value.field}: ")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Limit.per_minute("a" * 64, 1), id="name-64-chars"),
        pytest.param(lambda: Limit.per_minute("R2_d2", MAX_TOKENS), id="max-tokens"),
        pytest.param(lambda: Limit.custom("x", 1, 1, 0.001), id="one-ms"),
        pytest.param(lambda: Limit.custom("x", 1, 1, MAX_PERIOD_MS // 1000), id="ten-years"),
        pytest.param(lambda: Limit.custom("x", 1, 1, 1.5), id="1.5-seconds"),
        pytest.param(lambda: Limit.per_second("x", 5, burst=MAX_TOKENS), id="max-burst"),
    ],
)
def test_boundary_limits_are_accepted(make: Callable[[], Limit]) -> None:
    limit = make()
    assert Limit.from_dict(limit.to_dict()) == limit


@given(limits())
def test_limit_round_trips_through_its_dict(limit: Limit) -> None:
    as_strings = {k: str(v) for k, v in limit.to_dict().items()}
    assert Limit.from_dict(limit.to_dict()) == limit
    assert Limit.from_dict(as_strings) == limit
