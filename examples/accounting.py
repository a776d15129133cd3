"""Usage snapshots: what each tenant consumed, per hour and per day, from the table's
stream (docs/accounting.md).

Two tenants share a model's limits. Each call is granted on an estimate and reconciled
with its real usage afterwards (a refund when it used less, debt when it used more); one
call meets a provider 429 and blocks the tenant's bucket. The stream of the table
(``NEW_AND_OLD_IMAGES``) is then folded into usage snapshots, as the stack's aggregator
function does on AWS (here: ``StreamReader``, what ``zae-celery aggregate`` runs), and
read back with ``read_usage`` (``zae-celery usage``). Folding the same records again adds
nothing.

Run from the repository root; with no endpoint an embedded moto server is started and
stopped, so no AWS account is needed:

    python -m examples.accounting
    python -m examples.accounting --endpoint-url http://127.0.0.1:8000 --json
"""

from __future__ import annotations

from typing import Any

import boto3

from examples._local import dynamodb, emit, parse_args, table_name
from zae_celery import Limit, RateLimiter
from zae_celery.accounting import Aggregator, StreamReader, read_usage, stream_arn

LIMITS = [Limit.per_minute("rpm", 500), Limit.per_minute("tpm", 90_000)]
CALLS = {  # tenant: (estimated, billed) tokens of each call
    "acme": [(800, 650), (800, 910), (1200, 1200)],
    "globex": [(500, 120), (500, 480)],
}


def main() -> None:
    """Charge two tenants, fold the stream, read the snapshots."""
    args = parse_args(__doc__)
    with dynamodb(args.endpoint_url) as endpoint:
        table = table_name("accounting")
        limiter = RateLimiter(table, endpoint_url=endpoint.url, stored_config=False)
        limiter.create_table()  # local endpoints; on AWS the table comes from the stack
        client = boto3.client("dynamodb", endpoint_url=endpoint.url)
        client.update_table(  # on AWS: zae-celery deploy --aggregator
            TableName=table,
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )
        try:
            for tenant, calls in CALLS.items():
                for estimated, billed in calls:
                    consume = {"rpm": 1, "tpm": estimated}
                    with limiter.acquire(tenant, "gpt-4o", consume, LIMITS) as lease:
                        lease.adjust(tpm=billed - estimated)  # reconcile: refund or debt
            limiter.block("acme", "gpt-4o", LIMITS, 2.0)  # a provider's 429, Retry-After 2
            streams = boto3.client("dynamodbstreams", endpoint_url=endpoint.url)
            arn = stream_arn(client, table)
            first = StreamReader(streams, arn, Aggregator(client, table)).catch_up()
            again = StreamReader(streams, arn, Aggregator(client, table)).catch_up()
            snapshots = {
                tenant: [s.to_dict() for s in read_usage(client, table, tenant, window="daily")]
                for tenant in CALLS
            }
        finally:
            limiter.delete_table()
    result: dict[str, Any] = {
        "stream_records": first.records,
        "snapshot_writes": first.written,
        "written_again": again.written,
        "skipped_again": again.skipped,
        "billed": {t: sum(b for _, b in calls) for t, calls in CALLS.items()},
        "daily": snapshots,
    }
    text = [
        f"{first.records} stream records -> {first.written} snapshot writes; read again: "
        f"{again.written} writes, {again.skipped} skipped (already applied)",
    ]
    for tenant, rows in snapshots.items():
        for row in rows:
            tpm, rpm = row["limits"]["tpm"], row["limits"]["rpm"]
            text.append(
                f"  {tenant} {row['resource']} {row['start'][:10]}: {rpm['used']} requests, "
                f"{tpm['used']} tokens charged ({tpm['debt']} of them debt; billed "
                f"{result['billed'][tenant]}), {row['blocks']} provider block(s)"
            )
    emit(args.json, endpoint, result, text)


if __name__ == "__main__":
    main()
