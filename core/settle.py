"""Refunds held back to ride in a later write of the same process (settle coalescing).

Pure decisions, no I/O. A settle that gives tokens back (the usage came in under the
estimate) does not need its own request: the refund can wait, up to a bound, for the
next write this process sends to the same bucket item (a grant, or a settle that adds
debt) and ride in it. A refund still waiting at the bound is written on its own (a
flush). Debt is never held: it is written at once, so the buckets never show less
consumed than they must.

A refund written at once leaves ``max(TAT - r, now)``: what was no longer in the bucket
(it refilled) is not given back. A held refund must never give back more than that, so:

* it is held only when this process can prove the tokens are still in the bucket: its
  last view of the TAT (a lower bound), or the lease's own grant, less now, covers it.
  That TAT is kept with the refund (``since``). Otherwise the settle writes at once, as
  without coalescing;
* wherever it is written later, it gives back at most what is left of that proof then
  (``since - now``: the consumption it proved drains at the refill rate), guarded by a
  condition that the TAT is still that high. Consumption after the refund was held
  never pays for it. What cannot be proven is given up: the fleet under-uses it once.

How a refund rides in a write (``carry``), by the shape the write takes for that limit:

* QUEUE (``TAT > now``): the condition's floor rises by the amount given back, its
  ceiling too (the refund lets a grant in earlier), and the add shrinks by it;
* FRESH (``TAT <= now``): the bucket refilled; nothing is given back;
* EXACT (the TAT is known): the add shrinks by it;
* CHECK (nothing consumed) and CLAMP (a store that computes the refill itself writes
  no floor in a grant): not carried; the refund waits for another write or its flush.

The ``used`` counter gets the whole refund, as a refund written at once does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from . import bucket
from .bucket import Shape, Step
from .lease import Target
from .limits import Limit

__all__ = ["Held", "Refund", "carry", "counted", "floored", "returnable", "room"]


@dataclass(frozen=True)
class Refund:
    """One held refund of one limit."""

    limit: Limit
    tokens: int
    """Negative: the tokens to give back."""
    since: int
    """A TAT the bucket surely had when the refund was held (scaled units)."""


Refunds = Mapping[str, Sequence[Refund]]
"""Held refunds of one item by attribute (``limit.key``)."""


@dataclass
class Held:
    """The refunds this process holds for one bucket item, and when they are due."""

    entity_id: str
    resource: str
    due_ms: int
    refunds: dict[str, list[Refund]] = field(default_factory=dict)

    def add(self, refunds: Refunds) -> None:
        """Hold ``refunds`` too."""
        for key, more in refunds.items():
            self.refunds.setdefault(key, []).extend(more)

    def merge(self, other: Held) -> None:
        """Hold ``other``'s refunds too (the earlier due time stands)."""
        self.due_ms = min(self.due_ms, other.due_ms)
        self.add(other.refunds)

    def target(self) -> Target:
        """The item as a target of its held limits (for a write of the refunds alone)."""
        limits = tuple(refunds[0].limit for refunds in self.refunds.values() if refunds)
        return Target(self.entity_id, self.resource, limits, {})


def room(limit: Limit, tat: int | None, now_ms: int) -> int:
    """Whole tokens a bucket whose TAT is at least ``tat`` surely still holds of earlier
    consumption at ``now_ms`` (what a refund can give back)."""
    if tat is None:
        return 0
    return max(0, tat - bucket.now_units(limit, now_ms)) // limit.refill_period_ms


def returnable(refunds: Sequence[Refund], now_ms: int) -> int:
    """Tokens ``refunds`` may give back at ``now_ms``: each at most what its proof
    still covers."""
    return sum(min(-r.tokens, room(r.limit, r.since, now_ms)) for r in refunds)


def carry(
    steps: tuple[Step, ...], held: Refunds, seen: Mapping[str, int | None], now_ms: int
) -> tuple[tuple[Step, ...], dict[str, Sequence[Refund]]]:
    """``steps`` (a write's, one per limit, at ``now_ms``) with the ``held`` refunds
    they can carry.

    ``seen``: each attribute's last-seen TAT (a lower bound). Returns the steps and the
    refunds they took (all of each carried limit's: what they could not give back was
    no longer in the bucket); the rest stays held."""
    out, taken = [], {}
    for step in steps:
        refunds = held.get(step.limit.key)
        if not refunds or step.tokens <= 0:
            out.append(step)
            continue
        limit = step.limit
        back = returnable(refunds, now_ms)
        if step.shape is Shape.FRESH:
            back = 0
        elif step.shape is Shape.QUEUE:
            back = min(back, room(limit, seen.get(limit.key), now_ms))
        elif step.shape is Shape.EXACT:
            back = min(back, room(limit, step.expected, now_ms))
        else:  # CHECK, CLAMP: nothing here can prove where the TAT is
            out.append(step)
            continue
        units = bucket.cost(limit, back)
        if units and step.shape is Shape.QUEUE:
            bound = None if step.bound is None else step.bound + units
            # TAT >= now + units: the refund leaves it at now or later (no refill given)
            floor = step.now + units - 1
            step = replace(step, now=floor, amount=step.amount - units, bound=bound)
        elif units:
            step = replace(step, amount=step.amount - units)
        out.append(step)
        taken[limit.key] = refunds
    return tuple(out), taken


def counted(steps: tuple[Step, ...], taken: Refunds) -> tuple[Step, ...]:
    """:func:`bucket.counted` of a write's steps, each ``used`` counter also taking the
    whole refund carried on its limit (as a refund's own write would count it)."""
    extra = {
        refunds[0].limit.counter().key: sum(r.tokens for r in refunds)
        for refunds in taken.values()
        if refunds and not refunds[0].limit.track and not refunds[0].limit.inflight
    }
    return tuple(
        replace(s, tokens=s.tokens + extra[s.limit.key], amount=s.amount + extra[s.limit.key])
        if s.limit.key in extra and s.shape is Shape.REFUND
        else s
        for s in bucket.counted(steps)
    )


def floored(refunds: Sequence[Refund], tat: int | None, now_ms: int) -> tuple[Step, ...]:
    """One limit's held ``refunds`` written on their own at ``now_ms``: what they may
    give back (and ``tat``, the TAT a refused write returned, still covers), guarded by that proof
    (``TAT >= now + returned``), and the whole refund to the ``used`` counter. Only
    the counter when nothing can be given back (the bucket refilled)."""
    limit = refunds[0].limit
    tokens = sum(r.tokens for r in refunds)
    back = returnable(refunds, now_ms)
    back = bucket.cost(limit, back if tat is None else min(back, room(limit, tat, now_ms)))
    steps: tuple[Step, ...] = ()
    if back:
        now = bucket.now_units(limit, now_ms)
        steps = (Step(limit, 0, Shape.QUEUE, now + back - 1, -back),)
    if not limit.track and not limit.inflight:
        steps += (Step(limit.counter(), tokens, Shape.REFUND, 0, tokens),)
    return steps
