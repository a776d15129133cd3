"""The in-memory store: the engine's operations applied to dicts, under one lock.

It answers exactly as the DynamoDB store does (the contract tests run the same cases
against both): every step's condition is checked against the item as it was, a write
of several items (and a claim) is all or nothing, a refused write returns the current
items of the failed conditions, items past their ``ttl`` are gone. Failures a real
store shows can be injected with :meth:`MemoryStore.fail_next`.

It lives in one process: workers of a prefork pool each see their own. Use it for
unit tests, for a single process, and for trying things out.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..bucket import Shape, Step
from ..errors import EndpointUnreachable, ValidationError
from ..limits import Limit
from ..ops import (
    CLAIMED,
    CONDITION,
    EXISTS,
    NO_TABLE,
    THROTTLED,
    UNAVAILABLE,
    BucketKey,
    CreateClaim,
    CreateTable,
    DeleteLimits,
    DeleteTable,
    EnableExpiry,
    EntityRecord,
    ListBuckets,
    Op,
    PutEntity,
    PutLimits,
    ReadBucket,
    ReadEntity,
    ReadSchema,
    Reply,
    Sleep,
    StampSchema,
    TableStatus,
    WriteBuckets,
)
from ..schema import ANY_RESOURCE

__all__ = ["FAULTS", "MemoryStore"]

UNREACHABLE = "unreachable"
FAULTS = (THROTTLED, UNAVAILABLE, UNREACHABLE)
"""What :meth:`MemoryStore.fail_next` can inject: a throttled reply, a server error, or
no reply at all (:class:`~..errors.EndpointUnreachable`)."""

PAGE = 100
"""Bucket items per :class:`~..ops.ListBuckets` page (small, so paging is exercised)."""


@dataclass
class _Item:
    attrs: dict[str, int] = field(default_factory=dict)
    ttl: int = 0


@dataclass
class _Table:
    buckets: dict[BucketKey, _Item] = field(default_factory=dict)
    claims: dict[tuple[str, str], int] = field(default_factory=dict)
    entities: dict[str, tuple[str | None, bool]] = field(default_factory=dict)
    limits: dict[tuple[str, str], tuple[Limit, ...]] = field(default_factory=dict)
    version: int | None = None
    expiry: bool = False


def _holds(step: Step, value: int | None) -> bool:
    """Does ``step``'s condition hold for the attribute's current ``value``?"""
    shape = step.shape
    if shape is Shape.CHECK:
        return value is None or value <= step.bound  # type: ignore[operator]
    if shape is Shape.FRESH:
        return value is None or value <= step.now
    if shape is Shape.QUEUE:
        return (
            value is not None and value > step.now and (step.bound is None or value <= step.bound)
        )
    if shape is Shape.CLAMP:
        return value is None or step.bound is None or value <= step.bound
    if shape is Shape.RAISE:
        return value is None or value < (step.amount if step.bound is None else step.bound)
    if shape in (Shape.EXACT, Shape.DROP):
        return value == step.expected and (shape is Shape.EXACT or value is not None)
    return True  # REFUND


def _apply(step: Step, attrs: dict[str, int]) -> None:
    key = step.limit.key
    if step.shape in (Shape.QUEUE, Shape.REFUND):
        attrs[key] = attrs.get(key, 0) + step.amount
    elif step.shape is Shape.CLAMP:
        attrs[key] = max(attrs.get(key, step.now), step.now) + step.amount
    elif step.shape is Shape.DROP:
        attrs.pop(key, None)
    elif step.shape is not Shape.CHECK:
        attrs[key] = step.amount


class MemoryStore:
    """Buckets, claims and stored limits in this process's memory.

    Args:
        clock: seconds since the epoch, for item expiry (the limiter's clock when it
            creates the store from ``memory://``).
        create: start with the table created (``False``: like an empty DynamoDB
            endpoint, ``create_table()`` first).
        clamps: answer as a store that computes the refill clamp does (Redis): the engine
            then writes CLAMP steps, and a write of several items returns their new
            values. Off by default: the engine writes as it does for DynamoDB.

    ``sent`` counts the operations answered, by name (``WriteBuckets``, ``ReadBucket``...),
    for tests that assert how many round trips a decision costs.
    """

    name = "memory"

    def __init__(
        self, *, clock: Callable[[], float] = time.time, create: bool = True, clamps: bool = False
    ) -> None:
        self.clock = clock
        self.clamps = clamps
        self._lock = threading.Lock()
        self._table: _Table | None = _Table() if create else None
        self._faults: collections.deque[str] = collections.deque()
        self.sent: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"<MemoryStore {id(self):#x}>"

    # -- faults -----------------------------------------------------------------------------
    def fail_next(self, fault: str, times: int = 1) -> None:
        """Answer the next ``times`` operations with ``fault`` instead of applying them:
        ``"throttled"``, ``"unavailable"`` (a server error) or ``"unreachable"`` (no
        reply). A limiter retries them within its retry policy, as for DynamoDB."""
        if fault not in FAULTS:
            raise ValidationError("fault", f"{fault!r}", ", ".join(FAULTS))
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ValidationError("times", f"{times!r}", "an integer >= 0")
        with self._lock:
            self._faults.extend([fault] * times)

    # -- the store protocol -----------------------------------------------------------------
    def send(self, op: Op) -> Reply:
        """Apply ``op`` and return the reply."""
        if isinstance(op, Sleep):
            raise TypeError("Sleep is the driver's, not a store's")
        with self._lock:
            self.sent[type(op).__name__] += 1
            if self._faults:
                fault = self._faults.popleft()
                if fault == UNREACHABLE:
                    raise EndpointUnreachable("memory store: injected fault (no reply)")
                return Reply(code=fault, message=f"memory store: injected fault ({fault})")
            if isinstance(op, CreateTable):
                if self._table is not None:
                    return Reply(code=EXISTS, message="memory store: the table exists")
                self._table = _Table()
                return Reply(True)
            table = self._table
            if table is None:
                return Reply(code=NO_TABLE, message="memory store: the table does not exist")
            return self._apply(table, op)

    async def asend(self, op: Op) -> Reply:
        """:meth:`send`, for the asyncio limiter (nothing here blocks)."""
        return self.send(op)

    async def aclose(self) -> None:
        """Nothing to close."""

    # -- operations -------------------------------------------------------------------------
    def _expired(self, table: _Table, ttl: int) -> bool:
        """Is an item of this ``ttl`` gone (the table drops items past their ttl)?"""
        return table.expiry and ttl < self.clock()

    def _live(self, table: _Table, key: BucketKey) -> _Item | None:
        item = table.buckets.get(key)
        if item is not None and self._expired(table, item.ttl):
            del table.buckets[key]
            return None
        return item

    def _claimed(self, table: _Table, claim: tuple[str, str]) -> bool:
        ttl = table.claims.get(claim)
        if ttl is not None and self._expired(table, ttl):
            del table.claims[claim]
            return False
        return ttl is not None

    def _apply(self, table: _Table, op: Op) -> Reply:
        if isinstance(op, WriteBuckets):
            return self._write(table, op)
        if isinstance(op, CreateClaim):
            claim = (op.entity_id, op.claim)
            if self._claimed(table, claim):
                return Reply(code=CLAIMED, message="memory store: the claim exists")
            table.claims[claim] = op.ttl
            return Reply()
        if isinstance(op, ReadBucket):
            item = self._live(table, op.key)
            return Reply({} if item is None else dict(item.attrs))
        if isinstance(op, ListBuckets):
            found = {
                key.resource: dict(item.attrs)
                for key in sorted(table.buckets, key=lambda k: k.resource)
                if key.entity_id == op.entity_id
                and (op.resource is None or key.resource == op.resource)
                and (item := self._live(table, key)) is not None
                and (op.after is None or key.resource > op.after)
            }
            page = dict(list(found.items())[:PAGE])
            after = list(page)[-1] if len(found) > PAGE else None
            return Reply((page, after))
        if isinstance(op, ReadEntity):
            parent = table.entities.get(op.entity_id)
            limits = {res: lims for (ent, res), lims in table.limits.items() if ent == op.entity_id}
            if parent is None:
                return Reply(EntityRecord(False, None, False, limits))
            return Reply(EntityRecord(True, parent[0], parent[1], limits))
        if isinstance(op, PutEntity):
            table.entities[op.entity_id] = (op.parent_id, op.cascade)
            return Reply()
        if isinstance(op, PutLimits):
            table.limits[(op.entity_id, _resource(op.resource))] = tuple(op.limits)
            return Reply()
        if isinstance(op, DeleteLimits):
            table.limits.pop((op.entity_id, _resource(op.resource)), None)
            return Reply()
        if isinstance(op, ReadSchema):
            return Reply(table.version)
        if isinstance(op, StampSchema):
            if table.version is not None:
                return Reply(code=EXISTS, message="memory store: a version is stamped")
            table.version = op.version
            return Reply()
        if isinstance(op, TableStatus):
            return Reply(True)
        if isinstance(op, EnableExpiry):
            table.expiry = True
            return Reply()
        if isinstance(op, DeleteTable):
            self._table = None
            return Reply()
        raise TypeError(f"not a store operation: {op!r}")

    def _write(self, table: _Table, op: WriteBuckets) -> Reply:
        items = [self._live(table, w.key) for w in op.writes]
        failed = [
            not all(
                _holds(s, None if item is None else item.attrs.get(s.limit.key)) for s in w.steps
            )
            for w, item in zip(op.writes, items, strict=True)
        ]
        if op.claim is not None and self._claimed(table, op.claim):
            return Reply(code=CLAIMED, message="memory store: the claim exists")
        if any(failed):
            # As DynamoDB: a failed item's current value when it exists (None: absent, the
            # engine reads it), none for an item whose condition held.
            current = tuple(
                (dict(item.attrs) if item is not None else None) if f else None
                for item, f in zip(items, failed, strict=True)
            )
            return Reply(code=CONDITION, message="memory store: condition failed", current=current)
        new: list[Mapping[str, int] | None] = []
        for w, item in zip(op.writes, items, strict=True):
            if item is None:
                item = table.buckets[w.key] = _Item()
            for step in w.steps:
                _apply(step, item.attrs)
            item.ttl = op.ttl
            new.append(dict(item.attrs) if op.single or self.clamps else None)
        if op.claim is not None:
            table.claims[op.claim] = op.ttl
        return Reply(tuple(new))

    # -- inspection (tests) -----------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        """Everything stored, as plain data (for tests and debugging)."""
        with self._lock:
            table = self._table
            if table is None:
                return {}
            return {
                "buckets": {
                    (k.entity_id, k.resource): dict(v.attrs) for k, v in table.buckets.items()
                },
                "claims": dict(table.claims),
                "entities": dict(table.entities),
                "limits": dict(table.limits),
                "version": table.version,
            }


def _resource(resource: str | None) -> str:
    return ANY_RESOURCE if resource is None else resource
