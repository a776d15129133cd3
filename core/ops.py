"""The store-neutral language of the engine's flows. Pure: no I/O, no store's format.

Every engine decision is a generator (a *flow*) that yields operations defined here and
receives a :class:`Reply` for each. A store interprets them: :mod:`.stores.dynamodb`
encodes each into one DynamoDB request (an UpdateItem, a TransactWriteItems...) and
decodes the answer, :mod:`.stores.memory` applies it to a dict under a lock. Both give
the same answers, failure shapes included, which the contract tests check.

Bucket items are plain mappings of a limit's attribute (:attr:`Limit.key`) to its
integer TAT (see :mod:`.bucket`); an empty mapping is a bucket nobody has written yet.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .bucket import Step
from .limits import Limit

__all__ = [
    "CLAIMED",
    "CONDITION",
    "ERROR",
    "EXISTS",
    "NO_TABLE",
    "THROTTLED",
    "UNAVAILABLE",
    "Bucket",
    "BucketKey",
    "CreateClaim",
    "CreateTable",
    "DeleteLimits",
    "DeleteTable",
    "Done",
    "EnableExpiry",
    "EntityRecord",
    "Flow",
    "ItemWrite",
    "ListBuckets",
    "Op",
    "PutEntity",
    "PutLimits",
    "ReadBucket",
    "ReadEntity",
    "ReadSchema",
    "Reply",
    "Sleep",
    "StampSchema",
    "TableStatus",
    "WriteBuckets",
    "resume",
    "tat",
]

T = TypeVar("T")

Bucket = Mapping[str, int]
"""A bucket item: limit attribute -> TAT (empty: never written)."""

# -- reply codes (None: success) --------------------------------------------------------
CONDITION = "condition"
"""A write's condition did not hold; :attr:`Reply.current` holds the current items."""
CLAIMED = "claimed"
"""The claim item a write was to create exists already (another delivery started)."""
THROTTLED = "throttled"
"""The store refused for load (worth a retry after a pause)."""
UNAVAILABLE = "unavailable"
"""The store answered with a server error (worth a retry after a pause)."""
NO_TABLE = "no_table"
"""The table does not exist."""
EXISTS = "exists"
"""The table (or the schema stamp) to create exists already."""
ERROR = "error"
"""Any other error the store answered with (a bug or a misconfiguration: not retried)."""

TRANSIENT = frozenset({THROTTLED, UNAVAILABLE})


@dataclass(frozen=True)
class BucketKey:
    """The bucket item of an (entity, resource): every limit of the pair."""

    entity_id: str
    resource: str


@dataclass(frozen=True)
class ItemWrite:
    """The conditional steps on one bucket item, one per limit (see :class:`.bucket.Step`)."""

    key: BucketKey
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class WriteBuckets:
    """Apply every step of every item if every condition holds, atomically; else nothing.

    ``ttl``: the epoch second after which the items may be dropped. ``claim``: an
    ``(entity_id, claim)`` item created in the same atomic write; the write fails with
    :data:`CLAIMED` when it exists. Success returns the items' new values when the store
    has them cheaply (always for a store that ``clamps``; one item and no claim for
    DynamoDB), else ``None`` per item. A failed condition
    returns :data:`CONDITION` with the current items of those whose condition failed
    (``None`` where the store did not return one: read it).
    """

    writes: tuple[ItemWrite, ...]
    ttl: int
    claim: tuple[str, str] | None = None

    @property
    def single(self) -> bool:
        """One item and no claim: a single conditional update, which returns the item's
        new values (several items, or a claim, make a transaction, which returns none)."""
        return len(self.writes) == 1 and self.claim is None


@dataclass(frozen=True)
class CreateClaim:
    """Create the claim item ``(entity_id, claim)``; :data:`CLAIMED` when it exists."""

    entity_id: str
    claim: str
    ttl: int


@dataclass(frozen=True)
class ReadBucket:
    """A strongly consistent read of one bucket item: ``value`` is a :data:`Bucket`."""

    key: BucketKey


@dataclass(frozen=True)
class ListBuckets:
    """One page of an entity's bucket items (or of its one resource): ``value`` is
    ``(items, after)``, items mapping resource -> :data:`Bucket`; ``after`` is where the
    next page starts (``None``: that was the last)."""

    entity_id: str
    resource: str | None = None
    after: Any = None


@dataclass(frozen=True)
class EntityRecord:
    """An entity's stored record and limits (``limits`` keyed by resource, ``*``: all)."""

    exists: bool = False
    parent_id: str | None = None
    cascade: bool = False
    limits: Mapping[str, tuple[Limit, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadEntity:
    """An entity's record and stored limits: ``value`` is an :class:`EntityRecord`."""

    entity_id: str


@dataclass(frozen=True)
class PutEntity:
    """Create or replace an entity's record."""

    entity_id: str
    parent_id: str | None
    cascade: bool


@dataclass(frozen=True)
class PutLimits:
    """Store an entity's limits for one resource (``None``: every resource)."""

    entity_id: str
    resource: str | None
    limits: tuple[Limit, ...]


@dataclass(frozen=True)
class DeleteLimits:
    """Delete an entity's stored limits for one resource (``None``: every resource)."""

    entity_id: str
    resource: str | None


@dataclass(frozen=True)
class ReadSchema:
    """The schema version stamped on the table: ``value`` is an int, or None."""


@dataclass(frozen=True)
class StampSchema:
    """Stamp the schema version; :data:`EXISTS` when a version is stamped already."""

    version: int


@dataclass(frozen=True)
class CreateTable:
    """Create the table; :data:`EXISTS` when it exists."""


@dataclass(frozen=True)
class TableStatus:
    """``value``: True once the table is ready to use."""


@dataclass(frozen=True)
class EnableExpiry:
    """Make the store drop items past their ``ttl`` (a new table)."""


@dataclass(frozen=True)
class DeleteTable:
    """Delete the table and everything in it."""


@dataclass(frozen=True)
class Sleep:
    """Pause the flow (the driver sleeps; no store is involved)."""

    seconds: float


Op = (
    WriteBuckets
    | CreateClaim
    | ReadBucket
    | ListBuckets
    | ReadEntity
    | PutEntity
    | PutLimits
    | DeleteLimits
    | ReadSchema
    | StampSchema
    | CreateTable
    | TableStatus
    | EnableExpiry
    | DeleteTable
    | Sleep
)


@dataclass(frozen=True)
class Reply:
    """What a store answered: ``value`` on success (``code is None``), else the error
    ``code`` (see the constants above) with a message and, for :data:`CONDITION`, the
    current items."""

    value: Any = None
    code: str | None = None
    message: str = ""
    current: tuple[Bucket | None, ...] = ()

    @property
    def ok(self) -> bool:
        """True for a success."""
        return self.code is None

    @property
    def transient(self) -> bool:
        """True for a failure worth another attempt (throttled, server error)."""
        return self.code in TRANSIENT


@dataclass(frozen=True)
class Done(Generic[T]):
    """A flow that has finished, and what it returned."""

    value: T


Flow = Generator[Op, Reply, T]


def resume(flow: Flow[T], reply: Reply | None, error: BaseException | None) -> Op | Done[T]:
    """Hand a flow the reply to its last operation (or throw ``error`` into it, where that
    operation was yielded): its next operation, or :class:`Done` with its result."""
    try:
        return flow.throw(error) if error is not None else flow.send(reply)  # type: ignore[arg-type]
    except StopIteration as stop:
        return Done(stop.value)


def tat(item: Bucket | None, limit: Limit) -> int | None:
    """The TAT of ``limit`` in a bucket item (None: never written)."""
    return None if item is None else item.get(limit.key)
