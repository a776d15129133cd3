"""Engine benchmark: zae-celery's engine against zae-limiter 0.17.0, same endpoint, same run.

    python -m benchmarks.engine [--endpoint dynamodb-local|moto] [--cycles 300]

Workload per cycle (sync): acquire rpm(1) + tpm(100) (+ l3..l5 for 5 limits), adjust tpm
by +20 (the call used more than estimated), commit. "idle": limits so large nothing is
refused; "saturated": a bucket kept near empty, most acquires refused (a refusal is a
cycle too), each library with its default refusal cache (ours: refusals predicted from
the last state seen, exact; zae-limiter: rejections remembered for 1 s); "saturated, no
cache": both caches off, every refusal asks DynamoDB. "exact" (ours only): the
estimate was right, adjust by 0. Each case alternates the libraries in 3 rounds.

Prints median and p95 latency per cycle, DynamoDB requests per cycle, and ours/theirs.
Figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from benchmarks import endpoint_option
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded
from zae_celery.testing import LocalServer, dynamodb_local, moto_server, use_local_credentials

WARMUP = 50
ROUNDS = 3


@dataclass
class Timed:
    """Latencies of timed calls, summarised."""

    latencies_s: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    @property
    def p95_ms(self) -> float:
        return statistics.quantiles(self.latencies_s, n=20)[-1] * 1000


@dataclass
class Result(Timed):
    """One library on one case."""

    requests: int
    cycles: int

    @property
    def requests_per_cycle(self) -> float:
        return self.requests / self.cycles


def _merge(parts: list[Result]) -> Result:
    return Result(
        [x for p in parts for x in p.latencies_s],
        sum(p.requests for p in parts),
        sum(p.cycles for p in parts),
    )


def limits_for(n_limits: int, saturated: bool) -> tuple[list[Limit], dict[str, int]]:
    """The limits and the consume of one cycle (the same definitions as theirs)."""
    big = 10**9
    if n_limits == 1:
        tpm = 100 if saturated else big
        return [Limit.per_minute("tpm", tpm)], {"tpm": 100}
    limits = [
        Limit.per_minute("rpm", 1 if saturated else big),
        Limit.per_minute("tpm", 100 if saturated else big),
    ]
    consume = {"rpm": 1, "tpm": 100}
    for name in ("l3", "l4", "l5")[: n_limits - 2]:
        limits.append(Limit.per_minute(name, big))
        consume[name] = 1
    return limits, consume


def run_ours(
    url: str,
    n_limits: int,
    saturated: bool,
    cycles: int,
    delta: int = 20,
    local_refusals: bool = True,
) -> Result:
    """Run the workload on this engine; count requests with botocore's event hooks."""
    table = f"bench-ours-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(table, endpoint_url=url, local_refusals=local_refusals)
    limiter.create_table()
    limits, consume = limits_for(n_limits, saturated)
    seen = [0]

    def count(**_: Any) -> None:
        seen[0] += 1

    def cycle() -> None:
        try:
            with limiter.acquire("bench", "model", consume, limits) as lease:
                lease.adjust(tpm=delta)
        except RateLimitExceeded:
            pass

    try:
        for _ in range(WARMUP):
            cycle()
        limiter.client.meta.events.register("before-send.dynamodb.*", count)
        latencies = []
        for _ in range(cycles):
            start = time.perf_counter()
            cycle()
            latencies.append(time.perf_counter() - start)
        return Result(latencies, seen[0], cycles)
    finally:
        limiter.client.meta.events.unregister("before-send.dynamodb.*", count)
        limiter.delete_table()


def run_theirs(
    url: str, n_limits: int, saturated: bool, cycles: int, rejection_cache: bool = True
) -> Result | None:
    """zae-limiter 0.17.0 on the same workload, or None when it is not installed."""
    try:
        from benchmarks.theirs import run_zae_limiter
    except ImportError:
        return None
    try:
        out = run_zae_limiter(
            endpoint_url=url,
            n_limits=n_limits,
            saturated=saturated,
            cycles=cycles,
            table_name=f"bench-theirs-{uuid.uuid4().hex[:8]}",
            rejection_cache=rejection_cache,
        )
    except ImportError:
        return None
    return Result(list(out["latencies_s"]), int(out["requests"]), int(out["cycles"]))


@contextlib.contextmanager
def endpoint_server(kind: str) -> Iterator[LocalServer]:
    """The local endpoint both libraries use."""
    if kind == "moto":
        with moto_server() as server:
            yield server
    else:
        with dynamodb_local(cache_dir=Path(".cache")) as server:
            yield server


@click.command()
@endpoint_option("Which local DynamoDB both libraries run against.")
@click.option("--cycles", default=300, show_default=True, help="Timed cycles per case.")
@click.option("--ours-only", is_flag=True, help="Skip zae-limiter even if it is installed.")
def main(endpoint: str, cycles: int, ours_only: bool) -> None:
    """Benchmark the engine (and zae-limiter 0.17.0 when installed) and print a table."""
    use_local_credentials()
    console = Console(width=150)
    table = Table(title=f"acquire + adjust + commit, sync, {endpoint}, {cycles} cycles")
    for column in (
        "case",
        "limits",
        "ours median ms",
        "ours p95 ms",
        "ours req/cycle",
        "theirs median ms",
        "theirs p95 ms",
        "theirs req/cycle",
        "latency ours/theirs",
    ):
        table.add_column(column, justify="right")
    missing = False
    with endpoint_server(endpoint) as server:
        run_ours(server.url, 2, False, 300)  # warm the endpoint (DynamoDB Local's JIT) first
        for case in ("idle", "saturated", "saturated, no cache", "exact"):
            for n_limits in (1, 2, 5):
                saturated = case.startswith("saturated")
                cache = case != "saturated, no cache"
                ours_parts: list[Result] = []
                theirs_parts: list[Result] = []
                # Alternate the two libraries in rounds so drift affects both alike.
                for _ in range(ROUNDS):
                    ours_parts.append(
                        run_ours(
                            server.url,
                            n_limits,
                            saturated,
                            cycles // ROUNDS,
                            delta=0 if case == "exact" else 20,
                            local_refusals=cache,
                        )
                    )
                    if case != "exact" and not ours_only:
                        part = run_theirs(server.url, n_limits, saturated, cycles // ROUNDS, cache)
                        if part is None:
                            missing = True
                        else:
                            theirs_parts.append(part)
                ours = _merge(ours_parts)
                theirs = _merge(theirs_parts) if theirs_parts else None
                row = [
                    case,
                    str(n_limits),
                    f"{ours.median_ms:.2f}",
                    f"{ours.p95_ms:.2f}",
                    f"{ours.requests_per_cycle:.2f}",
                ]
                if theirs is None:
                    row += ["-", "-", "-", "-"]
                else:
                    row += [
                        f"{theirs.median_ms:.2f}",
                        f"{theirs.p95_ms:.2f}",
                        f"{theirs.requests_per_cycle:.2f}",
                        f"{ours.median_ms / theirs.median_ms:.2f}",
                    ]
                table.add_row(*row)
    console.print(table)
    if missing:
        console.print(
            "zae-limiter is not installed: 'make benchmark' installs zae-limiter==0.17.0 in a "
            "separate environment and runs both."
        )


if __name__ == "__main__":
    main()
