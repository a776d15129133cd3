"""Caps on requests in flight (``Limit.concurrent``): pure decisions, no I/O.

A cap of ``n`` lives in the bucket item of its (entity, resource) beside the token
buckets, so one write checks rpm, tpm and in-flight together:

* ``NAME@inflight``: how many slots are held (an integer);
* ``NAME@inflight~<slot>``: one held slot, its expiry (epoch ms).

Taking a slot is four steps of one write: CHECK ``count <= n - 1 (+ reclaimed)``, ADD 1 to
the count, create the slot's attribute (it must not exist), and DROP each slot the
writer saw expired (each guarded by the expiry it saw, so a slot renewed meanwhile is
left alone), its count subtracted in the same ADD. Freeing a slot DROPs it, guarded by
the expiry its holder last wrote, and subtracts 1: when the slot was taken back
already (its holder was presumed dead), the guard fails and nothing is subtracted twice.
The count is always the number of slot attributes.

A slot expires ``refill_period_ms`` after it was taken or renewed; it may be taken back
:data:`GRACE_MS` later (clock skew between hosts), by the first writer that finds the cap
full: a dead holder's slot comes back at most ``expires + GRACE_MS`` after its last
renewal, at the cost of one refused write.
"""

from __future__ import annotations

from collections.abc import Mapping

from .bucket import Shape, Step
from .limits import Limit

__all__ = ["GRACE_MS", "POLL_SECONDS", "expired", "free", "live", "renew", "retry_after", "take"]

GRACE_MS = 5_000
"""How long after its expiry a slot may be taken back (covers clock skew between hosts)."""
POLL_SECONDS = 1.0
"""What a caller refused by a full cap is told to wait at most (``retry_after``): a slot
comes back when a holder ends, which no store can foresee; this is a polling interval,
shortened when a held slot expires sooner."""


def slots(item: Mapping[str, int] | None, cap: Limit) -> dict[str, int]:
    """The held slots of ``cap`` in ``item``: slot id -> expiry (epoch ms)."""
    prefix = f"{cap.key}~"
    return {
        key[len(prefix) :]: value for key, value in (item or {}).items() if key.startswith(prefix)
    }


def expired(item: Mapping[str, int] | None, cap: Limit, now_ms: int) -> dict[str, int]:
    """The slots that may be taken back at ``now_ms`` (expired more than GRACE_MS ago)."""
    return {slot: expiry for slot, expiry in slots(item, cap).items() if expiry + GRACE_MS < now_ms}


def live(item: Mapping[str, int] | None, cap: Limit, now_ms: int) -> int:
    """Slots held at ``now_ms``, those that may be taken back not counted."""
    count = (item or {}).get(cap.key, 0)
    return max(0, count - len(expired(item, cap, now_ms)))


def retry_after(item: Mapping[str, int] | None, cap: Limit, now_ms: int) -> float:
    """Seconds a caller refused by a full cap should wait before asking again."""
    soonest = min(
        (expiry + GRACE_MS - now_ms for expiry in slots(item, cap).values()),
        default=POLL_SECONDS * 1000,
    )
    return max(0.001, min(POLL_SECONDS, soonest / 1000))


def take(
    cap: Limit, slot: str, expiry_ms: int, item: Mapping[str, int] | None, now_ms: int
) -> tuple[Step, ...]:
    """The steps that take one slot of ``cap``, taking back the slots ``item`` (the last
    view of the bucket item, None: unknown) shows expired."""
    back = expired(item, cap, now_ms)
    steps = [Step(cap.slot(old), 0, Shape.DROP, 0, 0, expected=at) for old, at in back.items()]
    steps.append(Step(cap, 0, Shape.CHECK, 0, 0, bound=cap.capacity - 1 + len(back)))
    if len(back) != 1:
        steps.append(Step(cap, 1 - len(back), Shape.REFUND, 0, 1 - len(back)))
    steps.append(Step(cap.slot(slot), 1, Shape.EXACT, 0, expiry_ms, expected=None))
    return tuple(steps)


def free(cap: Limit, slot: str, expiry_ms: int) -> tuple[Step, ...]:
    """The steps that free a held slot (its expiry as its holder last wrote it)."""
    return (
        Step(cap.slot(slot), 0, Shape.DROP, 0, 0, expected=expiry_ms),
        Step(cap, -1, Shape.REFUND, 0, -1),
    )


def renew(cap: Limit, slot: str, expiry_ms: int, new_expiry_ms: int) -> Step:
    """The step that moves a held slot's expiry (guarded by the one its holder wrote)."""
    return Step(cap.slot(slot), 1, Shape.EXACT, 0, new_expiry_ms, expected=expiry_ms)
