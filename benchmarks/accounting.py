"""Usage accounting: stream records and aggregator writes per task (docs/benchmarks.md).

On DynamoDB Local (its real stream): ``--tasks`` grants over ``--tenants`` entities of
one resource (rpm 1 + an estimate of tpm), each reconciled with a usage that differs from
its estimate (refunds and debt), through one limiter with settle coalescing on (as a
worker's). Then the table's stream is read and folded as the aggregator's Lambda
function would, in batches of ``--batch`` records (its BatchSize), for the hourly and
daily windows. Prints the stream records per task, the aggregator's writes per task and
per batch, and checks that the snapshots hold exactly what the buckets' counters say.

    python -m benchmarks.accounting --tasks 2000 --tenants 10 --batch 100 --batch 1000
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import boto3
import click

from zae_celery.accounting import Aggregator, StreamReader, read_usage, stream_arn
from zae_celery.core import Limit, RateLimiter
from zae_celery.testing import dynamodb_local, use_local_credentials

LIMITS = [Limit.per_minute("rpm", 1_000_000), Limit.per_minute("tpm", 100_000_000)]


@click.command()
@click.option("--tasks", default=2000, show_default=True)
@click.option("--tenants", default=10, show_default=True)
@click.option("--batch", "batches", type=int, multiple=True, default=(100, 1000))
@click.option("--seed", default=7, show_default=True)
def main(tasks: int, tenants: int, batches: tuple[int, ...], seed: int) -> None:
    """Stream records and aggregator writes per task, on DynamoDB Local."""
    use_local_credentials()
    rng = random.Random(seed)
    cache = Path(".cache")
    with dynamodb_local(cache_dir=cache) as server:
        table = f"zae-bench-{uuid.uuid4().hex[:8]}"
        limiter = RateLimiter(table, endpoint_url=server.url, region="us-east-1", settle_delay=1)
        limiter.create_table()
        client = boto3.client("dynamodb", endpoint_url=server.url, region_name="us-east-1")
        client.update_table(
            TableName=table,
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )
        names = [f"tenant-{i}" for i in range(tenants)]
        started = time.monotonic()
        for _ in range(tasks):
            entity = rng.choice(names)
            estimate = rng.randint(200, 2000)
            with limiter.acquire(entity, "llm", {"rpm": 1, "tpm": estimate}, LIMITS) as lease:
                lease.adjust(tpm=rng.randint(-estimate // 2, estimate // 4))
        limiter.flush()
        spent = time.monotonic() - started
        streams = boto3.client("dynamodbstreams", endpoint_url=server.url, region_name="us-east-1")
        reader = StreamReader(streams, stream_arn(client, table), Aggregator(client, table))
        records = [record for page in reader.pages() for record in page]
        charged = {
            e: next(b.charged for b in limiter.buckets(e, "llm", LIMITS) if b.limit_name == "tpm")
            for e in names
        }
        click.echo(
            f"{tasks} tasks over {tenants} tenants in {spent:.1f} s: {len(records)} stream "
            f"records ({len(records) / tasks:.2f} per task)"
        )
        for size in batches:
            kept = f"zae-bench-{uuid.uuid4().hex[:8]}"  # snapshots of this batch size apart
            RateLimiter(kept, endpoint_url=server.url, region="us-east-1").create_table()
            aggregator = Aggregator(client, kept)
            writes = count = 0
            for lo in range(0, len(records), size):
                applied = aggregator.apply(records[lo : lo + size])
                writes += applied.written
                count += 1
            exact = all(
                sum(s.limits["tpm"].used for s in read_usage(client, kept, e, "llm", "daily"))
                == charged[e]
                for e in names
            )
            click.echo(
                f"batch {size:>5}: {count} batches, {writes} snapshot writes "
                f"({writes / tasks:.3f} per task, {writes / count:.1f} per batch); "
                f"snapshots equal the buckets' counters: {'yes' if exact else 'NO'}"
            )


if __name__ == "__main__":
    main()
