"""Async producer: enqueue only as many tasks as the shared buckets allow right now.

An asyncio service holds a backlog of LLM jobs per tenant. Rather than flooding the
queue (and leaving the workers to defer most of it), it asks ``AsyncRateLimiter.available``
how much of each tenant's requests/min and tokens/min is left, and publishes only the
jobs that fit — the rest wait in its backlog for the next round. The checks of all
tenants run concurrently (``asyncio.gather``); each is one read of DynamoDB.

What it shows, and what it does not: the workers have already used part of each
tenant's minute (simulated here with ``acquire``). ``available()`` is a snapshot, not a
reservation: it consumes nothing, so the workers still take the tokens when each task
runs (``RateLimitedTask`` with the same limits), and a task sent beyond what is left is
deferred to its own slot there, not lost. No worker runs in this example: the messages
are published to a ``zaefs://`` broker (a folder, no server) and counted there, and the
folder is deleted at the end.

Run from the repository root; with no endpoint an embedded moto server is started and
stopped, so no AWS account is needed:

    python -m examples.async_producer
    python -m examples.async_producer --endpoint-url http://127.0.0.1:8000 --json
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery

from examples._local import dynamodb, emit, parse_args, table_name
from harness import fsbroker
from zae_celery import AsyncRateLimiter, Limit, RateLimitedTask

QUEUE = "llm"
MODEL = "gpt-4o"
LIMITS = [Limit.per_minute("rpm", 20), Limit.per_minute("tpm", 8_000)]
ESTIMATE = 400  # tokens a job is expected to use
BACKLOG = {"tenant-a": 12, "tenant-b": 12}  # jobs waiting per tenant
# What the workers have already used this minute, per tenant (simulated below).
USED = {"tenant-a": {"rpm": 15, "tpm": 3_000}, "tenant-b": {"rpm": 2, "tpm": 5_000}}

app = Celery("async_producer")


@app.task(
    base=RateLimitedTask,
    bind=True,
    name="examples.async_producer.summarize",
    rate_limits=LIMITS,
    rate_resource=MODEL,
    rate_entity=lambda args, kwargs: kwargs["tenant"],
    rate_consume={"rpm": 1, "tpm": ESTIMATE},
)
def summarize(self: RateLimitedTask, tenant: str, job: int) -> None:
    """What a worker would run; the limits are checked again there, for real."""


def fits(available: dict[str, float]) -> int:
    """How many jobs the tokens left now would pay for (each: 1 request, ESTIMATE tokens)."""
    return max(0, min(math.floor(available["rpm"]), math.floor(available["tpm"] / ESTIMATE)))


def publish(tenant: str, jobs: range) -> None:
    """Send jobs to the queue (kombu publishes synchronously: run it in a thread)."""
    for job in jobs:
        summarize.apply_async(kwargs={"tenant": tenant, "job": job}, queue=QUEUE)


async def produce(limiter: AsyncRateLimiter, tenant: str) -> dict[str, Any]:
    """Check what the tenant has left and enqueue that many of its waiting jobs."""
    available = await limiter.available(tenant, MODEL, LIMITS)
    allowed = min(BACKLOG[tenant], fits(available))
    await asyncio.to_thread(publish, tenant, range(allowed))
    return {
        "tenant": tenant,
        "backlog": BACKLOG[tenant],
        "available": available,
        "enqueued": allowed,
    }


async def run(endpoint_url: str, folder: Path) -> list[dict[str, Any]]:
    """Set the scene (a table, earlier usage), then one round of the producer."""
    fsbroker.register()
    app.conf.update(
        broker_url=f"{fsbroker.SCHEME}://",
        broker_transport_options=fsbroker.transport_options(folder),
    )
    async with AsyncRateLimiter(table_name("async-producer"), endpoint_url=endpoint_url) as lim:
        await lim.create_table()  # local endpoints; on AWS the table comes from the stack
        try:
            for tenant, used in USED.items():  # the workers' earlier calls
                async with lim.acquire(tenant, MODEL, consume=used, limits=LIMITS):
                    pass
            return list(await asyncio.gather(*(produce(lim, t) for t in BACKLOG)))
        finally:
            await lim.delete_table()


def main() -> None:
    """Run one producer round and print, per tenant, what was left and what was sent."""
    args = parse_args(__doc__)
    with (
        dynamodb(args.endpoint_url) as endpoint,
        tempfile.TemporaryDirectory(prefix="zae-async-producer-") as tmp,
    ):
        rounds = asyncio.run(run(endpoint.url, Path(tmp)))
        in_broker = len(list((Path(tmp) / "messages").glob(f"*.{QUEUE}.msg")))
    rpm, tpm = LIMITS
    text = [
        f"limits per tenant: {rpm.capacity} requests/min, {tpm.capacity} tokens/min; "
        f"a job needs 1 request and ~{ESTIMATE} tokens"
    ]
    for r in rounds:
        left = r["available"]
        text.append(
            f"  {r['tenant']}: {left['rpm']:.2f} requests and {left['tpm']:.0f} tokens left "
            f"-> enqueued {r['enqueued']} of {r['backlog']}, "
            f"{r['backlog'] - r['enqueued']} wait for the next round"
        )
    text.append(f'messages in the broker\'s "{QUEUE}" queue: {in_broker} (no worker consumed them)')
    result = {
        "limits": [lim.to_dict() for lim in LIMITS],
        "estimate_tpm": ESTIMATE,
        "tenants": rounds,
        "messages_in_broker": in_broker,
    }
    emit(args.json, endpoint, result, text)


if __name__ == "__main__":
    main()
