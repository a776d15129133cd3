"""`make demo`: a rate-limited batch of simulated LLM calls on an embedded DynamoDB endpoint.

Until the Celery pipeline demo lands, this runs the engine on its own: several threads
(standing in for workers) share one rpm and one tpm bucket in a moto server started on
127.0.0.1; each "call" reserves its slot, waits for it, reports the actual token usage
(which differs from the estimate) and the run ends with a report of configured versus
achieved rates.

    python -m examples.demo --calls 120 --workers 6 --rpm 600 --tpm 300000
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from zae_celery import Limit, RateLimiter, RateLimitExceeded
from zae_celery.local import moto_server, use_local_credentials


@dataclass
class Stats:
    """What the workers did (guarded by ``lock``)."""

    starts: list[float] = field(default_factory=list)
    tokens: int = 0
    refusals: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def estimate_tokens(prompt: str) -> int:
    """A crude estimate: about four characters a token, plus the expected answer."""
    return len(prompt) // 4 + 150


def fake_llm(prompt: str, rng: random.Random) -> int:
    """The tokens a provider would bill for ``prompt`` (never quite the estimate)."""
    return int(estimate_tokens(prompt) * rng.uniform(0.7, 1.4))


def worker(
    limiter: RateLimiter,
    limits: Sequence[Limit],
    prompts: list[str],
    stats: Stats,
    progress: Progress,
    task_id: object,
    seed: int,
) -> None:
    """Take prompts off the shared list until it is empty."""
    rng = random.Random(seed)
    while True:
        with stats.lock:
            if not prompts:
                return
            prompt = prompts.pop()
        estimate = estimate_tokens(prompt)
        while True:
            try:
                # A place in line (consumed now, into debt) ...
                lease = limiter.reserve(
                    "demo-tenant",
                    "llm",
                    {"rpm": 1, "tpm": estimate},
                    limits,
                    horizon=30,
                    pace=True,
                )
                time.sleep(lease.wait)
                # ... and the actual start counted where it happens: a thread that woke
                # late takes the next start slot instead of starting with the others.
                time.sleep(limiter.start(lease, horizon=30))
                break
            except RateLimitExceeded as exc:
                with stats.lock:
                    stats.refusals += 1
                time.sleep(exc.retry_after)  # waiting for the limit is the point here
        with stats.lock:  # the start as counted by the engine (its clock)
            stats.starts.append(lease.started_at or time.time())
        actual = fake_llm(prompt, rng)
        lease.adjust(tpm=actual - estimate)
        lease.commit()
        with stats.lock:
            stats.tokens += actual
        progress.advance(task_id)  # type: ignore[arg-type]


@click.command()
@click.option("--calls", default=120, show_default=True, help="How many simulated LLM calls.")
@click.option("--workers", default=6, show_default=True, help="Threads sharing the limits.")
@click.option("--rpm", default=600, show_default=True, help="Requests per minute allowed.")
@click.option("--tpm", default=300_000, show_default=True, help="Tokens per minute allowed.")
@click.option("--seed", default=7, show_default=True, help="Random seed of the fake provider.")
def main(calls: int, workers: int, rpm: int, tpm: int, seed: int) -> None:
    """Run the demo on an embedded moto server and print a report."""
    use_local_credentials()
    console = Console()
    rng = random.Random(seed)
    prompts = [" ".join(["word"] * rng.randint(50, 400)) for _ in range(calls)]
    # rpm/60 requests at once at most (one second's worth), refilled at rpm per minute.
    limits = [
        Limit.custom(
            name,
            capacity=max(1, per_minute // 60),
            refill_amount=per_minute,
            refill_period_seconds=60,
        )
        for name, per_minute in (("rpm", rpm), ("tpm", tpm))
    ]
    stats = Stats()
    with moto_server() as server:
        console.print(f"embedded DynamoDB endpoint (moto server) at {server.url}")
        limiter = RateLimiter("zae-demo", endpoint_url=server.url)
        limiter.create_table()

        def count(**_: object) -> None:
            with stats.lock:
                stats.requests += 1

        limiter.client.meta.events.register("before-send.dynamodb.*", count)
        begin = time.time()
        with Progress(
            TextColumn("[bold]calls"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task_id = progress.add_task("calls", total=calls)
            threads = [
                threading.Thread(
                    target=worker,
                    args=(limiter, limits, prompts, stats, progress, task_id, seed + i),
                )
                for i in range(workers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall = time.time() - begin
    span = max(stats.starts) - min(stats.starts) if len(stats.starts) > 1 else 0.0
    ms = sorted(round(t * 1000) for t in stats.starts)
    excess = max(
        j - i + 1 - (limits[0].burst + (ms[j] - ms[i]) * rpm // 60_000)
        for i in range(len(ms))
        for j in range(i, len(ms))
    )

    burst = limits[0].burst
    achieved_rpm = (len(stats.starts) - burst) / span * 60 if span else 0.0
    table = Table(title="zae-celery demo (engine only)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("calls completed", f"{len(stats.starts)}/{calls}")
    table.add_row("configured rpm / tpm", f"{rpm} / {tpm}")
    table.add_row("achieved rpm (after the burst)", f"{achieved_rpm:.0f}")
    table.add_row("worst window excess over the rpm bucket (goal <= 0)", f"{excess}")
    table.add_row("tokens used", f"{stats.tokens}")
    table.add_row("refusals (beyond the 30 s horizon)", f"{stats.refusals}")
    table.add_row("DynamoDB requests per call", f"{stats.requests / max(1, calls):.2f}")
    table.add_row("wall time", f"{wall:.1f} s")
    console.print(table)
    if len(stats.starts) != calls:
        raise SystemExit("some calls did not complete")


if __name__ == "__main__":
    main()
