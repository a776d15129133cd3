"""From the table's stream to usage snapshot updates: pure functions, no I/O.

Every write the engine makes to a bucket item also adds to that item's counters, in the
same write: ``<limit>~used`` (tokens charged: grants, debt and surcharges, less
refunds), ``<limit>~debt`` (tokens charged after the grant: a reconcile that found more
used than estimated) and ``~blocks`` (provider blocks written on the item). A stream
record with both images (``NEW_AND_OLD_IMAGES``) holds each counter before and after
the write, so its difference is what that write charged, without reading anything.

:func:`fold` sums those differences per snapshot (entity, resource, window, window
start) and per *source* (the bucket item, or one shard of it), and remembers the
highest stream sequence number it folded for each. The writer applies each sum only if
the snapshot has not yet seen that sequence number for that source, so a batch that
Lambda delivers again (whole, or split in two by bisection) adds nothing twice: the
records of one item reach the stream in order, within one shard, and every sum covers
all of a source's records up to its sequence number.

What is not consumption: records of other items (entities, limits, claims, the
snapshots themselves), a bucket item's removal (its TTL after it went idle: its counters
start again from 0 when it is written next) and writes that change no counter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "DEFAULT_WINDOWS",
    "WINDOWS",
    "Change",
    "Delta",
    "SnapshotKey",
    "change_of",
    "check_windows",
    "fold",
    "number",
    "window_start",
]

WINDOWS: Mapping[str, int] = {"minutely": 60, "hourly": 3_600, "daily": 86_400}
"""The snapshot windows a table may keep, and their lengths in seconds (UTC-aligned)."""
DEFAULT_WINDOWS = ("hourly", "daily")
SEQUENCE_DIGITS = 40
"""Stream sequence numbers are decimal strings of up to 40 digits; stored zero-padded to
this width, they compare as strings in the order they compare as numbers."""
_USED, _DEBT, _BLOCKS = "~used", "~debt", "~blocks"


def check_windows(windows: Iterable[str]) -> tuple[str, ...]:
    """The window names, checked (a ValueError names the unknown ones)."""
    names = tuple(dict.fromkeys(w.strip() for w in windows if w.strip()))
    unknown = [w for w in names if w not in WINDOWS]
    if unknown or not names:
        raise ValueError(
            f"unknown snapshot window(s) {', '.join(map(repr, unknown)) or '(none given)'}: "
            f"choose among {', '.join(WINDOWS)}"
        )
    return names


def window_start(window: str, at: int) -> int:
    """The start (epoch seconds, UTC) of the ``window`` holding the instant ``at``."""
    length = WINDOWS[window]
    return at - at % length


@dataclass(frozen=True)
class Change:
    """What one stream record says a write charged one bucket item."""

    entity: str
    resource: str
    shard: int | None
    """The shard index of a spread bucket's item (None: the bucket's only item)."""
    at: int
    """When the write was made (the record's approximate creation time, epoch s)."""
    sequence: str
    """The record's sequence number, zero-padded to :data:`SEQUENCE_DIGITS`."""
    used: Mapping[str, int]
    """Per limit name: tokens charged (negative: more refunded than charged)."""
    debt: Mapping[str, int]
    """Per limit name: tokens charged after the grant (reconciled debt)."""
    blocks: int
    """Provider blocks written (counted on a spread bucket's shard 0 only: a block
    writes every shard)."""

    @property
    def source(self) -> str:
        """The item the change was read from, as a snapshot's guard names it."""
        return "0" if self.shard is None else str(self.shard)


@dataclass(frozen=True)
class SnapshotKey:
    """One usage snapshot: an (entity, resource) over one window."""

    entity: str
    resource: str
    window: str
    start: int
    """The window's start, epoch seconds (UTC)."""

    @property
    def end(self) -> int:
        """The window's end (exclusive), epoch seconds."""
        return self.start + WINDOWS[self.window]


@dataclass
class Delta:
    """The sum of one source's changes in one snapshot within a batch."""

    sequence: str
    used: dict[str, int] = field(default_factory=dict)
    debt: dict[str, int] = field(default_factory=dict)
    blocks: int = 0
    records: int = 0

    def add(self, change: Change) -> None:
        """Fold one more (later) change in."""
        self.sequence = max(self.sequence, change.sequence)
        for name, n in change.used.items():
            self.used[name] = self.used.get(name, 0) + n
        for name, n in change.debt.items():
            self.debt[name] = self.debt.get(name, 0) + n
        self.blocks += change.blocks
        self.records += 1


def number(image: Mapping[str, Any], name: str) -> int:
    """A number attribute of an item's DynamoDB JSON (0 when absent)."""
    value = image.get(name)
    if not isinstance(value, Mapping) or "N" not in value:
        return 0
    return int(value["N"])


def _text(image: Mapping[str, Any], name: str) -> str | None:
    value = image.get(name)
    if isinstance(value, Mapping) and isinstance(value.get("S"), str):
        return str(value["S"])
    return None


def _where(keys: Mapping[str, Any]) -> tuple[str, str, int | None] | None:
    """(entity, resource, shard) of a bucket item's key; None for any other item."""
    pk, sk = _text(keys, "PK"), _text(keys, "SK")
    if pk is None or sk is None or not pk.startswith("E#") or not sk.startswith("B#"):
        return None
    entity = pk[2:].split("#", 1)[0]
    resource, _, shard = sk[2:].partition("#")
    if not entity or not resource:
        return None
    if not shard:
        return entity, resource, None
    try:
        return entity, resource, int(shard)
    except ValueError:
        return None


def _counters(new: Mapping[str, Any], old: Mapping[str, Any], suffix: str) -> dict[str, int]:
    """Per limit name: the change of the counters ending in ``suffix`` (a limit whose rate
    changed has two attributes under one name: they add up)."""
    out: dict[str, int] = {}
    for attribute in set(new) | set(old):
        if not attribute.endswith(suffix):
            continue
        delta = number(new, attribute) - number(old, attribute)
        if delta:
            name = attribute[: -len(suffix)].split("@", 1)[0]
            out[name] = out.get(name, 0) + delta
    return {name: n for name, n in out.items() if n}


def change_of(record: Mapping[str, Any]) -> Change | None:
    """The change one stream record (Lambda's or GetRecords' form) made to a bucket item;
    None for a record that charged nothing (see the module's notes)."""
    if record.get("eventName") not in ("INSERT", "MODIFY"):
        return None
    data = record.get("dynamodb")
    if not isinstance(data, Mapping):
        return None
    where = _where(data.get("Keys") or {})
    if where is None:
        return None
    if "NewImage" not in data:
        raise ValueError(
            "the table's stream carries no item images: it must be NEW_AND_OLD_IMAGES "
            "(zae-celery deploy --stream NEW_AND_OLD_IMAGES)"
        )
    new, old = data.get("NewImage") or {}, data.get("OldImage") or {}
    if record.get("eventName") == "MODIFY" and "OldImage" not in data:
        raise ValueError(
            "the table's stream carries no old images: it must be NEW_AND_OLD_IMAGES "
            "(zae-celery deploy --stream NEW_AND_OLD_IMAGES)"
        )
    entity, resource, shard = where
    blocks = sum(_counters(new, old, _BLOCKS).values()) if not shard else 0
    used, debt = _counters(new, old, _USED), _counters(new, old, _DEBT)
    if not used and not debt and not blocks:
        return None
    return Change(
        entity,
        resource,
        shard,
        _epoch(data.get("ApproximateCreationDateTime")),
        str(data.get("SequenceNumber", "")).zfill(SEQUENCE_DIGITS),
        used,
        debt,
        blocks,
    )


def _epoch(value: Any) -> int:
    """A record's creation time as epoch seconds: Lambda gives a number, boto3 a datetime."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return int(moment.timestamp())
    if isinstance(value, int | float):
        return int(value)
    raise ValueError(f"a stream record without ApproximateCreationDateTime: {value!r}")


def fold(
    records: Iterable[Mapping[str, Any]], windows: Sequence[str] = DEFAULT_WINDOWS
) -> dict[SnapshotKey, dict[str, Delta]]:
    """Sum a batch of stream records (in stream order) into one delta per snapshot and
    source, each with the highest sequence number it holds."""
    out: dict[SnapshotKey, dict[str, Delta]] = {}
    for record in records:
        change = change_of(record)
        if change is None:
            continue
        for window in windows:
            start = window_start(window, change.at)
            key = SnapshotKey(change.entity, change.resource, window, start)
            deltas = out.setdefault(key, {})
            delta = deltas.get(change.source)
            if delta is None:
                delta = deltas[change.source] = Delta(change.sequence)
            delta.add(change)
    return out
