"""Pure token-bucket math (GCRA in integer virtual time). No I/O.

A limit refilling ``A`` tokens every ``P`` ms is stored as one integer, its *theoretical
arrival time* (TAT) on a scaled clock where 1 ms is ``A`` units and 1 token costs ``P``
units. Every operation is then exact integer arithmetic, without drift:

* ``now``  = now_ms · A
* ``tau``  = burst · P             (how far the TAT may run ahead of now)
* a request of n tokens moves TAT to ``max(TAT, now) + n·P`` and is allowed
  when that is at most ``now + tau`` (or ``now + tau + horizon`` for a reservation)
* tokens available = ``(now + tau - TAT) / P``, at most ``burst``; negative is debt.

The refill clamp (``max``) cannot be written in a DynamoDB update expression, so the
engine writes one of two shapes, each guarded by a condition that says which applies:
FRESH (``TAT <= now``: set it to ``now + cost``) or QUEUE (``TAT > now``: add ``cost``).
A wrong guess fails the condition and DynamoDB returns the current item, so the next
attempt is exact; in steady state the guess from the last response is right and a
grant costs one write. A store that can compute the clamp itself (Redis, in a script)
takes a third shape, CLAMP (``TAT <= bound``: set ``max(TAT, now) + cost``), which needs
no guess: a grant is one write whatever the bucket's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .limits import Limit

__all__ = [
    "Shape",
    "available",
    "cost",
    "counted",
    "floor_tat",
    "now_units",
    "per_second",
    "retry_after_ms",
    "start_ms",
    "tau",
]


class Shape(Enum):
    """How one limit's attribute is written."""

    CHECK = "check"  # cost 0: only a condition, no write
    FRESH = "fresh"  # TAT <= now: SET TAT = now + cost
    QUEUE = "queue"  # now < TAT <= bound: ADD cost
    EXACT = "exact"  # TAT == known value: SET known' + cost
    REFUND = "refund"  # ADD an amount (a refund: negative; a counter), unconditionally
    RAISE = "raise"  # TAT < bound (None: value): SET value (push a bucket down to a level)
    CLAMP = "clamp"  # TAT <= bound (None: always): SET max(TAT, now) + cost
    DROP = "drop"  # value == expected: REMOVE the attribute (an in-flight slot)


def now_units(limit: Limit, now_ms: int) -> int:
    """``now`` on the limit's scaled clock."""
    return now_ms * limit.refill_amount


def tau(limit: Limit) -> int:
    """How far the TAT may run ahead of now: the burst, in scaled units."""
    return limit.burst * limit.refill_period_ms


def cost(limit: Limit, tokens: int) -> int:
    """``tokens`` in scaled units."""
    return tokens * limit.refill_period_ms


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def available(limit: Limit, tat: int | None, now_ms: int) -> float:
    """Tokens available now (at most ``burst``; negative while in debt)."""
    if tat is None:
        return float(limit.burst)
    free = now_units(limit, now_ms) + tau(limit) - tat
    return min(float(limit.burst), free / limit.refill_period_ms)


def floor_tat(limit: Limit, remaining: int, at_ms: int) -> int | None:
    """The TAT at which the bucket held exactly ``remaining`` tokens at ``at_ms`` (a
    provider's report; negative: that much debt); None when ``remaining`` is the full
    burst or more, which lowers nothing. A bucket whose TAT is below it holds more than
    the provider says is left."""
    if remaining >= limit.burst:
        return None
    return now_units(limit, at_ms) + tau(limit) - cost(limit, remaining)


def per_second(limit: Limit) -> float:
    """The limit's refill, in tokens a second."""
    return limit.refill_amount * 1000 / limit.refill_period_ms


def earliest_ms(limit: Limit, tat: int | None, tokens: int) -> int:
    """The first millisecond at which ``tokens`` fit, given the stored TAT."""
    if tat is None:
        return 0
    return _ceil_div(tat + cost(limit, tokens) - tau(limit), limit.refill_amount)


def retry_after_ms(limit: Limit, tat: int | None, tokens: int, now_ms: int) -> int:
    """Milliseconds until ``tokens`` would be granted (0: now), if nothing else consumes."""
    return max(0, earliest_ms(limit, tat, tokens) - now_ms)


def start_ms(limit: Limit, new_tat: int | None, now_ms: int) -> int:
    """When a request that left the TAT at ``new_tat`` may start (0 tokens more)."""
    return max(now_ms, earliest_ms(limit, new_tat, 0))


def next_tat(limit: Limit, tat: int | None, tokens: int, now_ms: int) -> int:
    """The TAT after granting ``tokens`` at ``now_ms``."""
    base = now_units(limit, now_ms)
    if tat is not None and tat > base:
        base = tat
    return base + cost(limit, tokens)


FOLD_SHARE = 4
"""A limit folded into a later start is counted at most 1/FOLD_SHARE of its free room
(the burst less the request) after that start..."""
FOLD_MAX_MS = 500
"""...and at most this many milliseconds after it."""


def fold_margin_ms(limit: Limit, tokens: int) -> int:
    """How much later than a common start a non-binding limit may be counted (ms).

    Counting a request later than it starts only charges the limit sooner (its TAT is a
    little higher than GCRA's), never lets anything through early, as long as the
    request's start still fits: ``margin + cost <= tau``. The margin absorbs other
    clients' grants that this process has not seen yet (a start later than predicted
    by at most the margin needs no second write)."""
    room = (tau(limit) - cost(limit, tokens)) // limit.refill_amount
    return max(0, min(FOLD_MAX_MS, room // FOLD_SHARE))


def fold_ms(
    limit: Limit, tokens: int, guess: int | None, own_ms: int, start_ms: int, now_ms: int
) -> int:
    """When to count ``tokens`` of ``limit`` in a grant whose requests start at
    ``start_ms`` (the latest of the limits' own slots; this limit's is ``own_ms``).

    Now for the binding limit, and for a limit last seen busy (its TAT ahead of now: a
    queue add, which no other client's write can make fail, counts it there, and the
    grant's reply tells whether it still needs aligning). A limit last seen idle is
    counted a little after the start (see :func:`fold_margin_ms`) in the grant itself:
    its FRESH write fails only if other clients pushed it beyond that meanwhile."""
    if not tokens or own_ms >= start_ms:
        return now_ms
    if guess is not None and guess > now_units(limit, now_ms):
        return now_ms
    return start_ms + fold_margin_ms(limit, tokens)


@dataclass(frozen=True)
class Step:
    """What to write for one limit: the shape and the values its condition uses."""

    limit: Limit
    tokens: int
    shape: Shape
    now: int  # scaled now
    amount: int  # scaled amount added (QUEUE/REFUND) or the new value (FRESH/EXACT)
    bound: int | None = None  # QUEUE/CHECK: TAT may be at most this; RAISE: must be below
    expected: int | None = None  # EXACT: the TAT it must still have


def counted(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """``steps`` and, for each that charges a bucket (not its start track), an
    unconditional ADD of the tokens to the limit's ``used`` counter in the same write: a
    reader subtracts two values of it to tell the tokens charged in between (the rate
    over the last minute), which the TAT alone cannot once the bucket refills. Costs no
    request and never fails a condition; a refused write counts nothing."""
    counts = tuple(
        Step(step.limit.counter(), step.tokens, Shape.REFUND, 0, step.tokens)
        for step in steps
        if step.tokens and not step.limit.track and not step.limit.inflight
    )
    return steps + counts


def plan(
    limit: Limit,
    tokens: int,
    now_ms: int,
    horizon_ms: int,
    guess: int | None,
    known: bool = False,
    clamp: bool = False,
) -> Step:
    """Choose the write for ``tokens`` of ``limit``.

    ``guess`` is the last TAT seen for this attribute (None: never seen or absent);
    ``known`` says it is exact (just read), so an EXACT write can be used; ``clamp``
    says the store computes the refill clamp (CLAMP: no guess needed).
    """
    now = now_units(limit, now_ms)
    bound = now + tau(limit) + now_units(limit, horizon_ms) - cost(limit, tokens)
    if tokens == 0:
        return Step(limit, 0, Shape.CHECK, now, 0, bound=bound)
    if clamp:
        return Step(limit, tokens, Shape.CLAMP, now, cost(limit, tokens), bound=bound)
    if known:
        return Step(
            limit,
            tokens,
            Shape.EXACT,
            now,
            next_tat(limit, guess, tokens, now_ms),
            expected=guess,
        )
    if guess is not None and guess > now:
        return Step(limit, tokens, Shape.QUEUE, now, cost(limit, tokens), bound=bound)
    return Step(limit, tokens, Shape.FRESH, now, now + cost(limit, tokens))


def plan_until(
    limit: Limit, tokens: int, now_ms: int, horizon_ms: int, guess: int, until_ms: int
) -> Step:
    """A queue add for a limit last seen busy but short of ``until_ms`` (a common start
    plus its margin: see :func:`fold_ms`): the cost plus what the view says is missing to
    reach ``until_ms``, so that it is counted there or later in the same write.

    Other clients' writes only push the TAT further, which counts it later still (never
    early); the bound, lowered by the pad, keeps the request's own slot on this limit
    within the horizon. No other client's write can make the add fail but by that bound.
    """
    step = plan(limit, tokens, now_ms, horizon_ms, guess)
    pad = now_units(limit, until_ms) - guess
    if step.shape is not Shape.QUEUE or pad <= 0 or step.bound is None:
        return step
    return Step(limit, tokens, Shape.QUEUE, step.now, step.amount + pad, bound=step.bound - pad)


def plan_adjust(
    limit: Limit, tokens: int, now_ms: int, guess: int | None, clamp: bool = False
) -> Step:
    """Write for an adjustment: debt is allowed, so no upper bound; refunds need no case."""
    if tokens < 0:
        return Step(limit, tokens, Shape.REFUND, now_units(limit, now_ms), cost(limit, tokens))
    step = plan(limit, tokens, now_ms, 0, guess, clamp=clamp)
    if step.shape in (Shape.QUEUE, Shape.CLAMP):
        return Step(limit, tokens, step.shape, step.now, step.amount, bound=None)
    return step
