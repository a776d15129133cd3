"""Refunds that ride in the next grant: ``settle_delay``.

An LLM call reserves its estimate (the prompt plus ``max_tokens``) and is usually billed
less: settling it gives tokens back. Written on its own, that refund is a second
DynamoDB request per call. With ``RateLimiter(..., settle_delay=1.0)`` the refund waits
(up to a second) for the next write this process sends to the same bucket, the next
call's grant, and rides in it; ``flush()`` writes what is still held. Debt (a bill above
the estimate) is never held.

The same 40 calls run twice, on one table, for two tenants: with every refund written at
once, and with refunds held. The output shows the DynamoDB requests per call of each,
and what each tenant's buckets were charged: the bills, in both.

Run from the repository root; with no endpoint an embedded moto server is started and
stopped, so no AWS account is needed:

    python -m examples.settle
    python -m examples.settle --endpoint-url http://127.0.0.1:8000 --json
"""

from __future__ import annotations

from typing import Any

from examples._local import dynamodb, emit, parse_args, table_name
from zae_celery import Limit, RateLimiter
from zae_celery.testing.counting import RequestCounter

LIMITS = [Limit.per_minute("rpm", 600), Limit.per_minute("tpm", 60_000)]
ESTIMATE = 500  # the prompt and max_tokens: what a call may use
CALLS = 40


def bill(i: int) -> int:
    """Stands in for the provider's bill of call ``i``: below the estimate, but for one."""
    return 650 if i == 7 else 200 + (i * 37) % 250


def run(limiter: RateLimiter, tenant: str) -> dict[str, Any]:
    """The calls of one tenant; the requests they sent and what the buckets charged."""
    counter = RequestCounter()
    counter.install(limiter.client)
    for i in range(CALLS):
        lease = limiter.acquire(tenant, "gpt-4o", {"rpm": 1, "tpm": ESTIMATE}, LIMITS)
        lease.commit(tpm=bill(i) - ESTIMATE)  # a refund (held), or debt (written now)
    limiter.flush()  # what is still held, before the figures are read
    charged = {b.limit_name: b.charged for b in limiter.buckets(tenant, "gpt-4o", LIMITS)}
    return {"requests": counter.sent, "per_call": counter.sent / CALLS, "charged": charged}


def main() -> None:
    """Run the calls with and without held refunds and print what each cost."""
    args = parse_args(__doc__)
    with dynamodb(args.endpoint_url) as endpoint:
        table = table_name("settle")
        at_once = RateLimiter(table, endpoint_url=endpoint.url, stored_config=False)
        held = RateLimiter(table, endpoint_url=endpoint.url, stored_config=False, settle_delay=1.0)
        at_once.create_table()  # local endpoints; on AWS the table comes from the stack
        try:
            at_once.warm_up()
            held.warm_up()
            runs = {"at_once": run(at_once, "tenant-a"), "held": run(held, "tenant-b")}
        finally:
            at_once.delete_table()
    result = {"calls": CALLS, "billed": sum(bill(i) for i in range(CALLS)), "runs": runs}
    text = [f"{CALLS} calls estimating {ESTIMATE} tokens, billed {result['billed']} in all"]
    for name, figures in runs.items():
        text.append(
            f"{name:8}: {figures['per_call']:.2f} DynamoDB requests per call, "
            f"charged {figures['charged']['tpm']} tokens"
        )
    emit(args.json, endpoint, result, text)


if __name__ == "__main__":
    main()
