"""What a granted request holds (:class:`LeaseState`) and how it travels (its ticket).

Private to the core: callers hold a :class:`~.limiter.Lease` (or ``AsyncLease``), whose
:meth:`~.transport.LeaseView.ticket` is the documented, versioned serialised form.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import bucket, shards
from .errors import RequestExceedsBurst, ValidationError
from .limits import Limit
from .ops import BucketKey
from .shards import Shard
from .validation import check_amounts, check_id

__all__ = [
    "TICKET_VERSION",
    "BucketRef",
    "LeaseState",
    "Reported",
    "Slot",
    "Target",
    "start_tracks",
    "started_at_slot",
    "tracked",
    "with_start_track",
]

TICKET_VERSION = 1
"""The version of a lease's ticket; a ticket of another version is refused."""


@dataclass(frozen=True)
class Target:
    """One bucket item to consume from: an (entity, resource) with its limits."""

    entity_id: str
    resource: str
    limits: tuple[Limit, ...]
    consume: Mapping[str, int]
    caps: tuple[Limit, ...] = ()
    """The in-flight limits the request takes a slot of (``Limit.concurrent``)."""
    shard: Shard | None = None
    """Set on one shard of a spread bucket (:mod:`.shards`): ``resource`` and ``limits``
    are then the shard item's, and this says whose part they are."""

    @property
    def key(self) -> BucketKey:
        """The bucket item's key."""
        return BucketKey(self.entity_id, self.resource)

    @property
    def whole_resource(self) -> str:
        """The resource as callers name it (a shard's is its item's without the index)."""
        return self.shard.resource if self.shard else self.resource

    @property
    def whole_limits(self) -> tuple[Limit, ...]:
        """The limits as callers gave them (a shard's are its parts of them)."""
        return self.shard.limits if self.shard else self.limits

    @property
    def shards(self) -> int:
        """How many items this target's bucket is spread over (see :mod:`.shards`)."""
        return shards.count(self.whole_limits)

    def items(self) -> list[Target]:
        """The bucket items this (whole) target stands for: its shards, or itself."""
        count = self.shards
        return [self.shard_at(i) for i in range(count)] if count > 1 else [self]

    def shard_at(self, index: int) -> Target:
        """Shard ``index`` of this (whole) target: its item and its parts of the limits.

        Raises RequestExceedsBurst when a request is larger than that shard's burst, and
        ValidationError when the target also takes an in-flight slot (a cap is one item).
        """
        count = self.shards
        if self.shard is not None or count == 1:
            raise ValueError("shard_at() takes a whole target of a spread bucket")
        if self.caps:
            raise ValidationError(
                "limits",
                f"{self.resource} is spread over {count} shards and has an in-flight cap",
                "in-flight caps on a resource of its own",
            )
        for lim in self.limits:  # every shard must be able to take it: the least one
            if self.consume.get(lim.name, 0) > lim.burst // count:
                raise RequestExceedsBurst(
                    f"consume.{lim.name}", self.consume[lim.name], lim.burst // count, count
                )
        parts = tuple(shards.split(lim, count, index) for lim in self.limits)
        return Target(
            self.entity_id,
            shards.item_resource(self.resource, index),
            parts,
            self.consume,
            shard=Shard(self.resource, self.limits, index, count),
        )

    def limit(self, name: str) -> Limit | None:
        """The limit called ``name``, if this target has one."""
        return next((lim for lim in self.limits if lim.name == name), None)


@dataclass
class LeaseState:
    """What a granted request holds: the targets it consumed from and the running totals."""

    targets: tuple[Target, ...]
    consumed: dict[str, int]
    granted_ms: int
    start_ms: int
    unchecked: bool = False
    closed: bool = False
    started_ms: int | None = None
    start_tracked: bool = False
    tats: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    """The TATs the granting write left (by attribute), when it returned them."""
    claim: str | None = None
    """Set on a reservation that travels (e.g. in a deferred message): its start also
    creates a claim item named by it, so a second delivery cannot start on it again."""
    slot: str | None = None
    """The id of the in-flight slot the lease holds in its targets' caps (None: none)."""
    caps_pending: bool = False
    """The in-flight slots are taken by the lease's start, not yet (``Slot.caps_at_start``)."""
    slot_ms: int = 0
    """When the slot was taken or last renewed (epoch ms): in each cap it expires that
    cap's ``expires`` later (:meth:`slot_expiry`)."""

    def slot_expiry(self, cap: Limit) -> int:
        """The expiry the lease last wrote for its slot in ``cap`` (epoch ms)."""
        return self.slot_ms + cap.refill_period_ms

    @property
    def holds_slots(self) -> bool:
        """True while the lease holds an in-flight slot to free."""
        return self.slot is not None and any(t.caps for t in self.targets)

    @property
    def wait(self) -> float:
        """Seconds from the grant until the caller may start (0 unless reserved ahead)."""
        return max(0, self.start_ms - self.granted_ms) / 1000

    @property
    def start_at(self) -> float:
        """The clock time (seconds) at which the caller may start."""
        return self.start_ms / 1000

    @property
    def paced(self) -> bool:
        """True when no start remains to be counted (see :meth:`Engine.start`)."""
        return self.start_tracked or self.unchecked or not self.targets

    def spacing(self) -> float:
        """Seconds between two starts like this one on its tightest limit (its cost over
        the limit's rate); 0 when it consumed nothing."""
        return min(
            (
                bucket.cost(lim, tokens) / lim.refill_amount / 1000
                for t in self.targets
                for lim in t.whole_limits
                if (tokens := t.consume.get(lim.name, 0)) > 0
            ),
            default=0.0,
        )

    def claim_for(self, owner: str) -> None:
        """Make the lease travel with a claim of ``owner`` (e.g. a task id): the first
        start of its ticket creates the claim, a second one raises LeaseClaimed. A lease
        resumed from a claimed ticket keeps its claim until its start is counted."""
        if not isinstance(owner, str) or not 0 < len(owner) <= 256:
            raise ValidationError("owner", f"{owner!r}", "a string of 1..256 characters")
        if self.claim is None or self.start_tracked:
            self.claim = f"{owner}:{uuid.uuid4().hex}"

    def claimed_by(self, owner: str) -> bool:
        """True when the lease carries a claim made for ``owner``."""
        return self.claim is not None and self.claim.startswith(f"{owner}:")

    def to_dict(self) -> dict[str, Any]:
        """The ticket: a JSON-friendly, versioned form (e.g. in a deferred message)."""
        return {
            "v": TICKET_VERSION,
            "targets": [
                {
                    "entity_id": t.entity_id,
                    "resource": t.whole_resource,
                    "limits": [lim.to_dict() for lim in t.whole_limits],
                    "consume": dict(t.consume),
                    **({"caps": [lim.to_dict() for lim in t.caps]} if t.caps else {}),
                    **({"shard": t.shard.index} if t.shard else {}),
                }
                for t in self.targets
            ],
            "consumed": dict(self.consumed),
            "granted_ms": self.granted_ms,
            "start_ms": self.start_ms,
            **({"claim": self.claim} if self.claim is not None else {}),
            **({"caps_pending": True} if self.caps_pending else {}),
            # An in-flight slot held: whoever ends the lease frees it.
            **({"slot": self.slot, "slot_ms": self.slot_ms} if self.holds_slots else {}),
            # Granted unchecked (open mode, store unreachable): nothing to start or refund.
            **({"unchecked": True} if self.unchecked else {}),
            # A start already counted (at a slot that may lie ahead): it travels too.
            **(
                {"started_ms": self.started_ms}
                if self.start_tracked and self.started_ms is not None
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LeaseState:
        """The inverse of :meth:`to_dict`; ValidationError when it is malformed or of
        another version (a ticket without one is of version 1, as older releases wrote)."""
        if not isinstance(data, Mapping):
            raise ValidationError("ticket", f"{type(data).__name__}", "a lease's ticket (a dict)")
        version = data.get("v", TICKET_VERSION)
        if version != TICKET_VERSION:
            raise ValidationError(
                "ticket.v", f"version {version!r}", f"{TICKET_VERSION}: upgrade zae-celery"
            )
        try:
            targets = tuple(_ticket_target(t) for t in data["targets"])
            slot = data.get("slot")
            if slot is not None and (not isinstance(slot, str) or not 0 < len(slot) <= 64):
                raise ValidationError("ticket.slot", "malformed slot", "a string of 1..64")
            claim = data.get("claim")
            if claim is not None and (not isinstance(claim, str) or not 0 < len(claim) <= 512):
                raise ValidationError("ticket.claim", "malformed claim", "a string of 1..512")
            started = data.get("started_ms")
            if started is not None and (isinstance(started, bool) or not isinstance(started, int)):
                raise ValidationError("ticket.started_ms", "malformed start", "an integer of ms")
            return cls(
                targets,
                check_amounts("consumed", data["consumed"], negative=False),
                int(data["granted_ms"]),
                int(data["start_ms"]),
                claim=claim,
                started_ms=started,
                start_tracked=started is not None,
                unchecked=data.get("unchecked") is True,
                slot=slot,
                slot_ms=int(data.get("slot_ms", 0)),
                caps_pending=data.get("caps_pending") is True,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ValidationError):
                raise
            raise ValidationError("ticket", f"malformed ticket: {exc}") from exc


def _ticket_target(data: Mapping[str, Any]) -> Target:
    """A target from its form in a ticket (a shard's: its whole and its index)."""
    target = Target(
        check_id("entity_id", data["entity_id"]),
        check_id("resource", data["resource"]),
        tuple(Limit.from_dict(d) for d in data["limits"]),
        check_amounts("consume", data["consume"], negative=False),
        tuple(Limit.from_dict(d) for d in data.get("caps", ())),
    )
    index = data.get("shard")
    if index is None:
        return target
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < target.shards:
        raise ValidationError("ticket.shard", f"{index!r}", f"0..{target.shards - 1}")
    return target.shard_at(index)


def start_tracks(targets: tuple[Target, ...], caps: bool = False) -> tuple[Target, ...]:
    """The start-track copies of the targets' limits (same buckets, counting starts),
    with their in-flight caps when ``caps`` (a start that takes its slots)."""
    return tuple(
        replace(t, limits=tuple(lim.start_track() for lim in t.limits), caps=t.caps if caps else ())
        for t in targets
    )


def with_start_track(targets: tuple[Target, ...]) -> tuple[Target, ...]:
    """Each target with its limits and their start-track copies, for one write."""
    return tuple(
        replace(t, limits=t.limits + s.limits)
        for t, s in zip(targets, start_tracks(targets), strict=True)
    )


def started_at_slot(lease: LeaseState, targets: tuple[Target, ...]) -> LeaseState:
    """A lease whose start was counted at its slot, holding only the quota targets."""
    lease.targets = targets
    lease.start_tracked = True
    lease.started_ms = lease.start_ms
    return lease


def tracked(lease: LeaseState) -> tuple[Target, ...]:
    """The targets an adjustment applies to: with the start track when it was counted,
    so reported usage also delays the *starts* of tasks already holding reservations."""
    return with_start_track(lease.targets) if lease.start_tracked else lease.targets


@dataclass(frozen=True)
class BucketRef:
    """A bucket a lease consumed from: its entity, resource and limits."""

    entity_id: str
    resource: str
    limits: tuple[Limit, ...]


@dataclass(frozen=True)
class Reported:
    """What a provider reported left of its limits, to pull a lease's buckets down to.

    Args:
        remaining: tokens left per limit name (e.g. ``{"rpm": 12, "tpm": 3400}``).
        at_ms: when the provider said so, on the limiter's clock (ms).
        buckets: the ``(entity_id, resource)`` of the lease's buckets that stand for
            the provider's key (None: all of them).
        rates: per limit name, how fast the provider refills (tokens a second), where it
            said so: where a bucket refills faster, the run is charged more in
            proportion (see ``Engine.adjust``).
    """

    remaining: Mapping[str, int]
    at_ms: int
    buckets: frozenset[tuple[str, str]] | None = None
    rates: Mapping[str, float] = field(default_factory=dict)

    def applies_to(self, target: Target) -> bool:
        """True when ``target`` is one of the buckets reported on."""
        return self.buckets is None or (target.entity_id, target.whole_resource) in self.buckets


@dataclass(frozen=True)
class Slot:
    """How a scheduler takes its slot (the Celery integration's options of ``acquire``).

    Args:
        extra: further ``(entity_id, resource, limits)`` consumed in the same atomic write
            (a queue's limits); each limit takes the amount of the same name in
            ``consume``, or 1.
        pace: count the start on the start track as well, in the same write, when the
            slot is at most ``start_within`` seconds ahead (the caller waits in place and
            starts exactly then); a later reservation is started with ``start()``.
        start_within: see ``pace``.
        caps_at_start: see the attribute.
    """

    extra: Sequence[tuple[str, str, Sequence[Limit]]] = ()
    pace: bool = False
    start_within: float = 0.0
    caps_at_start: bool = False
    """Take the in-flight slots (``Limit.concurrent``) when the lease's start is counted
    (``start()``), not with its grant: a task waiting for its rate slot does not hold a
    slot meanwhile. A full cap then refuses the start."""
