"""A hot bucket spread over shards: ``Limit.shards`` (text form ``:shards=N``).

One DynamoDB item takes at most 1,000 writes a second (its partition's limit), so a
bucket granting more than that must live in several items. ``Limit.per_second("rps",
5000).with_shards(8)`` (or ``rps=5k/s:shards=8``) keeps 8 items, each with an exact
eighth of the capacity and the rate, under partition keys of their own; a request is
granted by one of them, and reads add them up.

Three clients (each with its own limiter, as separate workers would be) take 60 grants
on a bucket of 40 a minute spread over 4 shards. The output shows which shard granted
how many, what ``available()`` and ``buckets()`` read (the whole bucket), the refusal a
client sees when the shards are empty (its resource, not a shard's), and the DynamoDB
items, one per shard.

Run from the repository root; with no endpoint an embedded moto server is started and
stopped, so no AWS account is needed:

    python -m examples.shards
    python -m examples.shards --endpoint-url http://127.0.0.1:8000 --json
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from examples._local import dynamodb, emit, parse_args, table_name
from zae_celery import Limit, RateLimiter, RateLimitExceeded

HOT = Limit.parse("rpm=40/m:shards=4")  # 4 items of 10 tokens, 10 a minute each
# (refilling slowly: the 60 requests meet empty shards however slow the endpoint is)
CLIENTS, GRANTS = 3, 60


def main() -> None:
    """Take grants from a spread bucket and show where they landed."""
    args = parse_args(__doc__)
    with dynamodb(args.endpoint_url) as endpoint:
        table = table_name("shards")
        fleet = [
            RateLimiter(table, endpoint_url=endpoint.url, stored_config=False)
            for _ in range(CLIENTS)
        ]
        fleet[0].create_table()  # local endpoints; on AWS the table comes from the stack
        try:
            by_shard: Counter[str] = Counter()
            granted, refused = 0, None
            began = time.time()
            for i in range(GRANTS):
                try:
                    lease = fleet[i % CLIENTS].acquire("fleet", "model", {"rpm": 1}, [HOT])
                except RateLimitExceeded as exc:
                    if refused is None:
                        refused = {
                            "after_grants": granted,
                            "resource": exc.violations[0].resource,
                            "retry_after": round(exc.retry_after, 3),
                        }
                    continue
                granted += 1
                by_shard[lease.buckets[0].resource + f" shard {_shard(lease)}"] += 1
            elapsed = time.time() - began
            (row,) = fleet[0].buckets("fleet", "model", [HOT])
            scan = fleet[0].client.scan(TableName=table, ConsistentRead=True)
            items = sorted(f"{i['PK']['S']} {i['SK']['S']}" for i in scan["Items"])
            result: dict[str, Any] = {
                "limit": str(HOT),
                "granted": granted,
                "seconds": round(elapsed, 3),
                # The most the whole bucket allows in that time: its burst and refill.
                "allowed": HOT.burst + HOT.rate * elapsed,
                "by_shard": dict(sorted(by_shard.items())),
                "available": fleet[1].available("fleet", "model", [HOT]),
                "bucket": {"burst": row.burst, "charged": row.charged, "rate": row.rate},
                "first_refusal": refused,
                "items": [item for item in items if "B#" in item],
            }
        finally:
            fleet[0].delete_table()
    text = [
        f"{result['limit']}: {granted} of {GRANTS} requests granted by {CLIENTS} clients in "
        f"{elapsed:.2f} s (the whole bucket allows {result['allowed']:.1f} in that time)",
        *(f"  {name}: {count}" for name, count in result["by_shard"].items()),
        f"available() now: {result['available']['rpm']:.2f}; buckets(): burst {row.burst}, "
        f"charged {row.charged}, rate {row.rate}",
        f"first refusal: {refused}",
        "items:",
        *(f"  {item}" for item in result["items"]),
    ]
    emit(args.json, endpoint, result, text)


def _shard(lease: Any) -> int:
    """The index of the shard that granted ``lease`` (an internal detail, shown here)."""
    shard = lease._state.targets[0].shard
    return -1 if shard is None else int(shard.index)


if __name__ == "__main__":
    main()
