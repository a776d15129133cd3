"""Usage snapshot items: written from folded stream records, read back as typed records.

==================  ==================================  ===============================
PK                  SK                                  item
==================  ==================================  ===============================
``U#<entity>``      ``<window>#<resource>#<start>``     one (entity, resource) window
==================  ==================================  ===============================

``<start>`` is the window's start in UTC (``2026-12-04T23:00:00Z``), so one entity's
snapshots of a window and resource sort by time. Attributes: ``entity``, ``resource``,
``window``, ``start`` and ``end`` (epoch s), ``used~<limit>`` and ``debt~<limit>``
(tokens), ``blocks``, ``records`` (stream records folded in), ``seq~<source>`` (the last
stream sequence number applied from each bucket item: the guard that makes a redelivered
batch add nothing) and ``ttl`` (the window's end plus the retention).

Snapshots live under partition keys of their own (``U#``), not in the entity's, so the
aggregator's writes never share a hot bucket's partition. Only boto3 is needed here
(this module runs in the aggregator's Lambda function).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import stream
from .stream import DEFAULT_WINDOWS, Delta, SnapshotKey, number

__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "Aggregator",
    "Applied",
    "LimitUsage",
    "UsageSnapshot",
    "read_usage",
    "snapshot_key",
]

DEFAULT_RETENTION_DAYS = 90
"""How long a snapshot is kept after its window ends, unless configured."""
USAGE_PREFIX = "U#"


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot_key(key: SnapshotKey) -> dict[str, dict[str, str]]:
    """The table key of a snapshot."""
    return {
        "PK": {"S": USAGE_PREFIX + key.entity},
        "SK": {"S": f"{key.window}#{key.resource}#{_iso(key.start)}"},
    }


@dataclass(frozen=True)
class Applied:
    """What one batch did to the snapshots."""

    records: int
    """Stream records in the batch."""
    written: int
    """Snapshot writes that added their sums."""
    skipped: int
    """Snapshot writes refused because the snapshot had already seen those records (a
    redelivered batch)."""


class Aggregator:
    """Applies stream batches to a table's usage snapshots (the Lambda handler's work,
    and ``zae-celery aggregate``'s).

    ``client`` is a boto3 DynamoDB client; ``windows`` names the snapshot windows
    (:data:`stream.WINDOWS`); ``retention_days`` how long a snapshot is kept after its
    window ends (DynamoDB's TTL removes it, usually within a few days of that).
    """

    def __init__(
        self,
        client: Any,
        table: str,
        windows: Sequence[str] = DEFAULT_WINDOWS,
        retention_days: int = DEFAULT_RETENTION_DAYS,
    ) -> None:
        if not isinstance(retention_days, int) or retention_days < 1:
            raise ValueError(
                f"retention_days must be a whole number of days >= 1, got {retention_days!r}"
            )
        self.client = client
        self.table = table
        self.windows = stream.check_windows(windows)
        self.retention_days = retention_days

    def apply(self, records: Sequence[Mapping[str, Any]]) -> Applied:
        """Fold ``records`` (one batch, in stream order) and write one update per
        snapshot and source. Raises on any error but a refused guard: the caller delivers
        the batch again, and what was written is not added twice."""
        written = skipped = 0
        for key, deltas in stream.fold(records, self.windows).items():
            for source, delta in deltas.items():
                if self._write(key, source, delta):
                    written += 1
                else:
                    skipped += 1
        return Applied(len(records), written, skipped)

    def _write(self, key: SnapshotKey, source: str, delta: Delta) -> bool:
        names = {
            "#e": "entity",
            "#r": "resource",
            "#w": "window",
            "#s": "start",
            "#end": "end",
            "#ttl": "ttl",
            "#q": f"seq~{source}",
            "#n": "records",
        }
        values: dict[str, Any] = {
            ":e": {"S": key.entity},
            ":r": {"S": key.resource},
            ":w": {"S": key.window},
            ":s": {"N": str(key.start)},
            ":end": {"N": str(key.end)},
            ":ttl": {"N": str(key.end + self.retention_days * 86_400)},
            ":q": {"S": delta.sequence},
            ":n": {"N": str(delta.records)},
        }
        adds = ["#n :n"]
        counters = [("used", delta.used), ("debt", delta.debt), ("", {"blocks": delta.blocks})]
        for kind, sums in counters:
            for name, n in sorted(sums.items()):
                if not n:
                    continue
                i = len(adds)
                names[f"#a{i}"] = f"{kind}~{name}" if kind else name
                values[f":a{i}"] = {"N": str(n)}
                adds.append(f"#a{i} :a{i}")
        try:
            self.client.update_item(
                TableName=self.table,
                Key=snapshot_key(key),
                UpdateExpression=(
                    "SET #e = :e, #r = :r, #w = :w, #s = :s, #end = :end, #ttl = :ttl, "
                    "#q = :q ADD " + ", ".join(adds)
                ),
                ConditionExpression="attribute_not_exists(#q) OR #q < :q",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True


@dataclass(frozen=True)
class LimitUsage:
    """One limit's consumption over a window."""

    used: int
    """Tokens charged after reconcile (grants and debt, less refunds)."""
    debt: int
    """Of ``used``, the tokens charged after the grant (more used than estimated)."""


@dataclass(frozen=True)
class UsageSnapshot:
    """What one (entity, resource) consumed over one window."""

    entity: str
    resource: str
    window: str
    start: datetime
    end: datetime
    limits: Mapping[str, LimitUsage]
    blocks: int
    """Provider blocks (429s with a retry-after) written on the bucket."""
    records: int
    """Stream records (bucket writes that charged something) folded in."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (the CLI's ``--json``)."""
        return {
            "entity": self.entity,
            "resource": self.resource,
            "window": self.window,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "limits": {
                name: {"used": u.used, "debt": u.debt} for name, u in sorted(self.limits.items())
            },
            "blocks": self.blocks,
            "records": self.records,
        }


def _snapshot(item: Mapping[str, Any]) -> UsageSnapshot:
    limits: dict[str, LimitUsage] = {}
    names = {a.split("~", 1)[1] for a in item if a.startswith(("used~", "debt~"))}
    for name in sorted(names):
        limits[name] = LimitUsage(number(item, f"used~{name}"), number(item, f"debt~{name}"))
    return UsageSnapshot(
        entity=item["entity"]["S"],
        resource=item["resource"]["S"],
        window=item["window"]["S"],
        start=datetime.fromtimestamp(number(item, "start"), timezone.utc),
        end=datetime.fromtimestamp(number(item, "end"), timezone.utc),
        limits=limits,
        blocks=number(item, "blocks"),
        records=number(item, "records"),
    )


def read_usage(
    client: Any,
    table: str,
    entity: str,
    resource: str | None = None,
    window: str = "hourly",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[UsageSnapshot]:
    """An entity's usage snapshots of ``window`` (one resource, or all), oldest first per
    resource, those whose window ends after ``since`` and starts before ``until``."""
    stream.check_windows([window])
    prefix = f"{window}#" + (f"{resource}#" if resource is not None else "")
    low = since.timestamp() if since else float("-inf")
    high = until.timestamp() if until else float("inf")
    out = []
    request = {
        "TableName": table,
        "KeyConditionExpression": "PK = :pk AND begins_with(SK, :prefix)",
        "ExpressionAttributeValues": {
            ":pk": {"S": USAGE_PREFIX + entity},
            ":prefix": {"S": prefix},
        },
    }
    for item in query_pages(client, request):
        snap = _snapshot(item)
        if snap.end.timestamp() > low and snap.start.timestamp() < high:
            out.append(snap)
    return out


def query_pages(client: Any, request: dict[str, Any]) -> Iterable[Mapping[str, Any]]:
    """Every item a Query ``request`` returns, page after page."""
    while True:
        page = client.query(**request)
        yield from page.get("Items", [])
        if "LastEvaluatedKey" not in page:
            return
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
