"""Read a table's stream directly (``zae-celery aggregate``): the Lambda function's work,
on a local endpoint (DynamoDB Local, moto) for development and tests, or by hand.

Each shard is read from its oldest record (``TRIM_HORIZON``), parents before children,
one ``GetRecords`` page at a time, and each page is applied as one batch. Reading the
stream again from the start is exact: the snapshots' guards skip what they already
hold. ``follow`` keeps polling the open shards (and looks for new ones) until stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .snapshots import Aggregator, Applied

__all__ = ["StreamReader", "Totals", "stream_arn"]


def stream_arn(client: Any, table: str) -> str:
    """The ARN of ``table``'s stream; a RuntimeError says how to switch it on."""
    description = client.describe_table(TableName=table)["Table"]
    arn = description.get("LatestStreamArn")
    spec = description.get("StreamSpecification") or {}
    if not arn or not spec.get("StreamEnabled", False):
        raise RuntimeError(
            f"table {table!r} has no stream: deploy with --stream NEW_AND_OLD_IMAGES (or "
            "create-table --stream on a local endpoint)"
        )
    if spec.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
        raise RuntimeError(
            f"table {table!r} streams {spec.get('StreamViewType')}: usage needs "
            "NEW_AND_OLD_IMAGES (each write's counters before and after)"
        )
    return str(arn)


@dataclass
class Totals:
    """What a reader applied so far."""

    batches: int = 0
    records: int = 0
    written: int = 0
    skipped: int = 0

    def add(self, applied: Applied) -> None:
        """Count one more batch."""
        self.batches += 1
        self.records += applied.records
        self.written += applied.written
        self.skipped += applied.skipped


@dataclass
class StreamReader:
    """Applies a stream's records to the snapshots, shard by shard.

    ``streams`` is a boto3 ``dynamodbstreams`` client on the table's endpoint.
    """

    streams: Any
    arn: str
    aggregator: Aggregator
    page_size: int = 1000
    on_batch: Callable[[Applied], None] | None = None
    totals: Totals = field(default_factory=Totals)
    _iterators: dict[str, str | None] = field(default_factory=dict)

    def _shards(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        request: dict[str, Any] = {"StreamArn": self.arn}
        while True:
            description = self.streams.describe_stream(**request)["StreamDescription"]
            shards.extend(description.get("Shards", []))
            last = description.get("LastEvaluatedShardId")
            if not last:
                break
            request["ExclusiveStartShardId"] = last
        return _parents_first(shards)

    def pages(self) -> Iterator[list[dict[str, Any]]]:
        """Every page of records the stream holds now, shard by shard (parents first),
        each shard until it is read to its end, or to the newest record of an open
        shard (where the next call goes on from)."""
        for shard in self._shards():
            shard_id = shard["ShardId"]
            if shard_id not in self._iterators:
                self._iterators[shard_id] = self.streams.get_shard_iterator(
                    StreamArn=self.arn, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
                )["ShardIterator"]
            while self._iterators[shard_id] is not None:
                page = self.streams.get_records(
                    ShardIterator=self._iterators[shard_id], Limit=self.page_size
                )
                self._iterators[shard_id] = page.get("NextShardIterator")
                records = page.get("Records", [])
                if not records:
                    break  # an open shard read to its newest record
                yield records

    def catch_up(self) -> Totals:
        """Apply every record the stream holds now, one page as one batch."""
        for records in self.pages():
            applied = self.aggregator.apply(records)
            self.totals.add(applied)
            if self.on_batch:
                self.on_batch(applied)
        return self.totals

    def follow(self, stop: threading.Event, interval: float = 1.0) -> Totals:
        """:meth:`catch_up` every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.catch_up()
            stop.wait(interval)
        return self.totals


def _parents_first(shards: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shards ordered so that a parent (whose records are older) comes before its
    children; shards whose parent is gone (trimmed) come first."""
    ids = {s["ShardId"] for s in shards}
    done: set[str] = set()
    out: list[dict[str, Any]] = []
    pending = list(shards)
    while pending:
        rest = []
        for shard in pending:
            parent = shard.get("ParentShardId")
            if parent is None or parent not in ids or parent in done:
                out.append(shard)
                done.add(shard["ShardId"])
            else:
                rest.append(shard)
        if len(rest) == len(pending):  # a cycle cannot happen; keep what is left in order
            out.extend(rest)
            break
        pending = rest
    return out
