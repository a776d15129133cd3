"""The partition limit, modelled: a fleet configured for 5,000 grants a second on one
bucket, and the writes that puts on each item.

    python -m benchmarks.partition [--rate 5000] [--burst N] [--shards 1,4,8,16] [--load 0.9,1.2]
        [--clients 20] [--seconds 20] [--horizon 2] [--seed 1] [--json FILE]

No local DynamoDB takes 5,000 writes a second on this kind of machine, so this program
runs the engine itself (every decision, each client with its own view) on the in-memory
store under a manual clock, and counts what DynamoDB would bill: a write unit for every
UpdateItem, granted or refused (a failed condition consumes one too), two per item of a
transaction. One item is served by one partition: at most 1,000 write units a second.
The model has no network: each request lands before the next is sent, so races between
clients cost nothing here (benchmarks.hot measures those on DynamoDB Local).

Requests arrive as a Poisson stream at ``--load`` times the rate, spread unevenly over
``--clients`` (client i sends i+1 parts), each asking for a slot within ``--horizon``
seconds (``reserve``) and starting at it; a request with no slot that close is refused
(counted). Per (shards, load) it prints: grants/s, write units per grant, the most write
units one item took in any second of the clock, excess (the worst window of the
counted starts, in requests, against the bucket's burst plus rate times the window;
at most 0: never more than the limit), utilization (the starts within the run over the
most the limit allows in it: its burst plus its rate times the run; "-" below a load
of 1, where the limit is not what holds the fleet back) and the wait from arrival to
slot at p50/p99.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from zae_celery.core import Limit, RateLimiter, RateLimitExceeded
from zae_celery.core.ops import Op, Reply, WriteBuckets
from zae_celery.core.stores import MemoryStore
from zae_celery.testing import ManualClock

PARTITION_WRITES = 1000
"""Write units a second one partition (so one item) serves."""
ENTITY, RESOURCE = "fleet", "model"


class PartitionModel:
    """A store that counts the write units each item takes per second of the clock."""

    def __init__(self, store: MemoryStore, clock: ManualClock) -> None:
        self.store = store
        self.clock = clock
        self.name = store.name
        self.units: Counter[tuple[str, int]] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def send(self, op: Op) -> Reply:
        if isinstance(op, WriteBuckets):
            per_item = 1 if op.single else 2  # a transaction: prepare and commit
            second = self.clock.ms // 1000
            for write in op.writes:
                self.units[(write.key.resource, second)] += per_item
        return self.store.send(op)

    def hottest(self) -> tuple[str, int]:
        """The item and the most write units it took in one second."""
        (item, _), units = max(self.units.items(), key=lambda kv: kv[1], default=(("", 0), 0))
        return item, units


def excess(times_ms: list[int], burst: int, rate: int) -> float:
    """The worst window [t_i, t_j] of ``times_ms``: its events less burst + rate x width
    (in events; at most 0: no window held more than the limit allows). Linear: the
    allowance is not floored to whole events."""
    worst, least = -float("inf"), float("inf")
    for count, t in enumerate(sorted(times_ms)):
        least = min(least, 1000 * count - rate * t)  # the window opening at this event
        worst = max(worst, 1000 * (count + 1) - rate * t - least)
    return (worst - 1000 * burst) / 1000


def run_case(
    rate: int,
    burst: int,
    shards: int,
    load: float,
    clients: int,
    seconds: float,
    horizon: float,
    seed: int,
) -> dict[str, Any]:
    """One fleet for ``seconds`` of the clock; its figures."""
    clock = ManualClock()
    model = PartitionModel(MemoryStore(clock=clock), clock)
    limit = Limit.custom("rps", burst, rate, 1).with_shards(shards)
    fleet = [RateLimiter(store=model, clock=clock, stored_config=False) for _ in range(clients)]
    rng = random.Random(seed)
    for i, limiter in enumerate(fleet):
        limiter.engine.random.seed(seed * 1000 + i)
    weights = [i + 1 for i in range(clients)]
    start_ms = clock.ms
    end_ms = start_ms + round(seconds * 1000)
    at = float(start_ms)
    starts: list[int] = []
    waits: list[float] = []
    refused = 0
    while True:
        at += rng.expovariate(rate * load / 1000)
        if at >= end_ms:
            break
        clock.ms = int(at)
        limiter = rng.choices(fleet, weights)[0]
        try:
            lease = limiter.acquire(ENTITY, RESOURCE, {"rps": 1}, [limit], horizon=horizon)
        except RateLimitExceeded:
            refused += 1
            continue
        lease.commit()
        start = round(lease.start_at * 1000)
        starts.append(start)
        waits.append(lease.wait)
    item, units = model.hottest()
    started = sum(start_ms <= t < end_ms for t in starts)
    wait_q = statistics.quantiles(waits, n=100, method="inclusive") if len(waits) > 1 else [0.0]
    return {
        "rate": rate,
        "shards": shards,
        "load": load,
        "grants": len(starts),
        "grants_per_s": len(starts) / seconds,
        "refused": refused,
        "write_units_per_grant": sum(model.units.values()) / max(1, len(starts)),
        "hottest_item": item,
        "item_units_per_s": units,
        "within_partition": units <= PARTITION_WRITES,
        "excess": excess(starts, limit.burst, rate),
        "utilization": started / (limit.burst + rate * seconds) if load > 1 else None,
        "wait_p50_ms": wait_q[49] * 1000 if len(wait_q) > 1 else 0.0,
        "wait_p99_ms": wait_q[98] * 1000 if len(wait_q) > 1 else 0.0,
    }


def _counts(kind: type, _: Any, __: Any, value: str) -> list[Any]:
    try:
        values = [kind(part) for part in value.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise click.BadParameter("a comma-separated list of positive numbers")
    return values


COLUMNS = (  # header, figure, decimals
    ("shards", "shards", 0), ("load", "load", 2), ("grants/s", "grants_per_s", 0),
    ("refused", "refused", 0), ("WCU/grant", "write_units_per_grant", 3),
    ("max WCU/item/s", "item_units_per_s", 0), ("excess", "excess", 2),
    ("utilization", "utilization", 3), ("wait p50 ms", "wait_p50_ms", 1),
    ("wait p99 ms", "wait_p99_ms", 1),
)  # fmt: skip


@click.command()
@click.option("--rate", type=click.IntRange(min=1), default=5000, show_default=True,
              help="The bucket's rate (grants a second).")  # fmt: skip
@click.option("--burst", type=click.IntRange(min=1), help="The bucket's size [default: --rate].")
@click.option("--shards", "shard_counts", default="1,4,8,16", show_default=True,
              callback=lambda c, p, v: _counts(int, c, p, v),
              help="Shard counts, comma-separated.")  # fmt: skip
@click.option("--load", "loads", default="0.9,1.2", show_default=True,
              callback=lambda c, p, v: _counts(float, c, p, v),
              help="Offered load over the rate, comma-separated.")  # fmt: skip
@click.option("--clients", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seconds", type=click.FloatRange(min=1), default=20.0, show_default=True)
@click.option("--horizon", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write figures here.")
def main(
    rate: int,
    burst: int | None,
    shard_counts: list[int],
    loads: list[float],
    clients: int,
    seconds: float,
    horizon: float,
    seed: int,
    json_path: str | None,
) -> None:
    """Model the write units per item of one bucket at ``--rate`` grants a second."""
    console = Console(width=160)
    results = []
    for shards in shard_counts:
        for load in loads:
            results.append(
                run_case(rate, burst or rate, shards, load, clients, seconds, horizon, seed)
            )
            console.print(f"shards={shards} load={load}: done", style="dim")
    table = Table(
        title=f"{rate} grants/s configured (burst {burst or rate}), {clients} clients, "
        f"{seconds:g} s of the clock, horizon {horizon:g} s; "
        f"one partition serves {PARTITION_WRITES} WCU/s"
    )
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(
            *("-" if r[key] is None else f"{r[key]:.{digits}f}" for _, key, digits in COLUMNS)
        )
    console.print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
        console.print(f"figures written to {json_path}")


if __name__ == "__main__":
    main()
