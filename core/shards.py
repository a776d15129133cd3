"""One hot bucket spread over several items: the split and the choice of a shard.

A DynamoDB item lives in one partition, which takes at most 1,000 writes a second. A
bucket whose grants need more is spread over ``shards`` items (``Limit.shards``). Each
item is a bucket of its own with an exact share of the whole:

- the refill: the same amount over ``shards`` times the period, so the shards' rates
  add up to the limit's rate exactly;
- the capacity and the burst: divided with the remainder given one token at a time to
  the first shards, so they add up exactly too.

In any window W each shard grants at most its burst plus its rate times W, so all of them
together grant at most the limit's burst plus its rate times W: adherence is the same as
one item's. A request is granted by one shard, chosen by the client (see
:meth:`~.engine.Engine.acquire`); no shard belongs to a client, so a dead client leaves
nothing behind but the tokens it was granted, as with one item.

The shard items are ``<resource>#<index>``: identifiers may not contain ``#``, so no
caller's resource can name one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .limits import Limit

__all__ = ["SEPARATOR", "Shard", "count", "item_resource", "resource_of", "split"]

SEPARATOR = "#"


@dataclass(frozen=True)
class Shard:
    """Which shard a target is: of which resource and limits, and its place among them."""

    resource: str
    """The resource as callers name it."""
    limits: tuple[Limit, ...]
    """The whole limits (with their ``shards``)."""
    index: int
    count: int


def count(limits: Sequence[Limit]) -> int:
    """How many items a resource with these limits is spread over (the largest
    ``shards`` of its token buckets; in-flight caps are never spread)."""
    return max((lim.shards for lim in limits if not lim.inflight), default=1)


def split(limit: Limit, shards: int, index: int) -> Limit:
    """Shard ``index`` of ``shards``'s part of ``limit``: the same refill over ``shards``
    times the period, and an exact share of the capacity and the burst (the first
    ``capacity % shards`` shards hold a token more)."""

    def share(total: int) -> int:
        return total // shards + (1 if index < total % shards else 0)

    return Limit(
        limit.name,
        share(limit.capacity),
        share(limit.burst),
        limit.refill_amount,
        limit.refill_period_ms * shards,
        track=limit.track,
    )


def item_resource(resource: str, index: int) -> str:
    """The resource of shard ``index``'s item."""
    return f"{resource}{SEPARATOR}{index}"


def resource_of(item: str) -> str:
    """The resource a bucket item belongs to (itself, unless it is a shard's)."""
    return item.partition(SEPARATOR)[0]
