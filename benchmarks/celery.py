"""Celery benchmark: zae-celery's RateLimitedTask against Celery's own ``rate_limit``.

    python -m benchmarks.celery [--tasks 300] [--workers 3] [--pool prefork|threads]
                                [--concurrency 2] [--rate 10] [--horizon 60] [--body 0]
                                [--prefetch N] [--acks-late] [--no-admission]
                                [--broker redis|rabbitmq|filesystem]
                                [--endpoint dynamodb-local|moto] [--store redis|URL]
                                [--provider-rate N]
                                [--only zae|builtin] [--save FILE]

The same saturated batch runs twice on ``--workers`` real ``celery worker`` processes
(``--pool``, ``--concurrency`` each; app: ``benchmarks/celery_app.py``):

1. zae-celery: ``base=RateLimitedTask``, ``rate_limits=[Limit.per_second("rps", RATE)]``
   (one bucket of RATE shared by every worker, in DynamoDB, or with ``--store`` on a
   Redis store); admitted by each worker's consumer unless ``--no-admission`` (then
   gated in the pool, as before admission);
2. Celery's built-in ``rate_limit=f"{RATE}/s"`` on a plain task (a bucket per worker).

Every task calls a local HTTP provider (``harness.provider.LocalProvider``) that itself
allows RATE requests a second (a token bucket holding RATE, no slack; ``--provider-rate``
changes it) and answers 429 with Retry-After beyond that, then waits ``--body`` seconds
(an I/O-bound call). The batch is published in one loop once every worker is ready; each
run has fresh workers, provider, queue (and, for zae-celery, table, or on Redis a key
prefix of its own, deleted at the end). ``--store redis`` puts the buckets on a private
redis-server of their own (not the broker's), ``--store redis://HOST:PORT/DB`` on that
server. The servers (DynamoDB Local or moto server, redis-server; RabbitMQ is the one at
127.0.0.1:5672),
the provider and the workers listen on 127.0.0.1 and are stopped by PID (process group)
at the end, also on Ctrl-C.

A backlog longer than the horizon: ``--horizon 1 --tasks 1000`` is 100 s of work at
10/s, 100x the horizon. Printed side by side, with the goals of issue 11 (printed, not
asserted):

* achieved / configured rate after the initial burst: (n - burst) / (span * rate), span
  from the first start to the last, and in the steady state: between the 10th and the
  90th percentile of the starts (goal >= 0.97);
* worst window excess: max over windows [s_i, s_j] of starts - (burst + rate * width),
  integer milliseconds (goal <= 0), over the counted starts (zae: the engine's clock;
  built-in: the body's first line), over the actual starts (the body's first line) and
  over every request the provider received;
* republishes per task (zae: the ``zae_deferrals`` header; built-in: retries) (goal
  <= 0.05, at most 1 for any task);
* DynamoDB requests per task, counted at the endpoint by a proxy (every process,
  worker main processes included) (goal <= 1.1), and per operation below the table; on
  a Redis store, script calls per task instead (one per store operation, reads included),
  counted by the server (``INFO commandstats``: other clients' scripts on a server given
  by URL count too);
* the workers' peak resident memory (main processes and pool processes, summed);
* the provider's requests and 429s, how late zae-celery's tasks started after their slot,
  the longest pause between starts, and the wall time from the first send to the last
  task's end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery as celery_pkg
import click
from celery import Celery
from rich.console import Console
from rich.table import Table

from benchmarks import endpoint_option, max_window_excess
from harness import fsbroker as fs_broker
from harness.provider import LocalProvider
from harness.stores import is_redis, where, with_run_prefix
from harness.workers import FleetError, signals_held, stop_workers, worker_fleet
from zae_celery.core import Limit, RateLimiter, ValidationError
from zae_celery.testing import (
    CountingProxy,
    LocalServer,
    dynamodb_local,
    free_port,
    moto_server,
    redis_script_calls,
    redis_server,
    use_local_credentials,
)

REPO = Path(__file__).resolve().parents[1]
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
APP = "benchmarks.celery_app"
MODES = {
    "zae": ("zae-celery", f"{APP}.zae_call"),
    "builtin": ("Celery rate_limit", f"{APP}.builtin_call"),
}


# -- measures -------------------------------------------------------------------------------------
@dataclass
class Run:
    """One mode's batch: what the tasks returned and what the provider saw."""

    mode: str
    tasks: int
    rate: int
    submitted_at: float
    infos: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    dynamodb: dict[str, Any] = field(default_factory=dict)
    """The endpoint's counts for this run: by_operation, condition_failed."""
    redis_scripts: int | None = None
    """On a Redis store: the script calls the server answered during the run."""
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0
    """CPU seconds (user + system) of every worker process, main and pool, summed."""
    peak_in_flight: int = 0
    """The most requests the provider had in flight at once."""

    @property
    def mean_in_flight(self) -> float:
        """Task bodies running at once on average, from the first body's start to the
        last one's end (what a cap on requests in flight lets through)."""
        if not self.infos:
            return math.nan
        busy = sum(info["end"] - info["body"] for info in self.infos)
        span = max(info["end"] for info in self.infos) - min(info["body"] for info in self.infos)
        return busy / span if span > 0 else math.nan

    @property
    def starts_ms(self) -> list[int]:
        return sorted(round(info["start"] * 1000) for info in self.infos)

    @property
    def span_s(self) -> float:
        starts = self.starts_ms
        return (starts[-1] - starts[0]) / 1000 if len(starts) > 1 else 0.0

    @property
    def achieved(self) -> float:
        """Achieved / configured rate after the initial burst."""
        n = len(self.infos)
        return (n - self.rate) / (self.span_s * self.rate) if self.span_s > 0 else math.nan

    @property
    def steady(self) -> float:
        """Achieved / configured rate between the 10th and the 90th percentile of the
        starts: the steady state, without start-up and the tail."""
        starts = self.starts_ms
        first, last = len(starts) // 10, len(starts) - 1 - len(starts) // 10
        if last <= first or starts[last] == starts[first]:
            return math.nan
        return (last - first) / ((starts[last] - starts[first]) / 1000) / self.rate

    @property
    def start_excess(self) -> int:
        return max_window_excess(self.starts_ms, self.rate, self.rate)

    @property
    def provider_excess(self) -> int:
        sent = [round(t * 1000) for t in self.accepted + self.rejected]
        return max_window_excess(sent, self.rate, self.rate)

    @property
    def republishes(self) -> tuple[float, int]:
        counts = [int(info["republishes"]) for info in self.infos] or [0]
        return sum(counts) / max(1, len(self.infos)), max(counts)

    @property
    def body_excess(self) -> int:
        """Window excess over the actual starts (the body's first line)."""
        bodies = [round(info["body"] * 1000) for info in self.infos]
        return max_window_excess(bodies, self.rate, self.rate)

    @property
    def dynamodb_by_operation(self) -> dict[str, int]:
        """Requests per DynamoDB operation over the run (all processes)."""
        return dict(sorted(self.dynamodb.get("by_operation", {}).items()))

    @property
    def dynamodb_condition_failed(self) -> int:
        """Replies that were a refused condition (included in the requests)."""
        return int(self.dynamodb.get("condition_failed", 0))

    @property
    def requests_per_task(self) -> float:
        """The store's requests per task: DynamoDB requests, or Redis script calls."""
        if self.redis_scripts is not None:
            return self.redis_scripts / max(1, len(self.infos))
        return sum(self.dynamodb_by_operation.values()) / max(1, len(self.infos))

    @property
    def largest_gap_s(self) -> tuple[float, float]:
        """The longest pause between consecutive starts, and when it began (from the first)."""
        starts = self.starts_ms
        if len(starts) < 2:
            return 0.0, 0.0
        gap, at = max((b - a, a) for a, b in itertools.pairwise(starts))
        return gap / 1000, (at - starts[0]) / 1000

    @property
    def late_s(self) -> tuple[float, float] | None:
        """How long after their slot (zae: granted or reserved) tasks started: median, max."""
        late = sorted(info["start"] - info["slot"] for info in self.infos if info["slot"])
        return (late[len(late) // 2], late[-1]) if late else None

    @property
    def wall_s(self) -> float:
        return max(info["end"] for info in self.infos) - self.submitted_at if self.infos else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tasks": self.tasks,
            "rate": self.rate,
            "submitted_at": self.submitted_at,
            "infos": self.infos,
            "failures": self.failures,
            "provider_accepted": self.accepted,
            "provider_rejected": self.rejected,
            "dynamodb": self.dynamodb,
            "redis_scripts": self.redis_scripts,
            "peak_rss_mb": self.peak_rss_mb,
            "cpu_ms_per_task": 1000 * self.cpu_s / self.tasks,
        }


# -- one run --------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What both runs share."""

    tasks: int
    workers: int
    concurrency: int
    rate: int
    provider_rate: int
    broker: str
    endpoint_url: str | None
    """The DynamoDB endpoint (None with a Redis store)."""
    redis_port: int | None
    work: Path
    store_url: str | None = None
    """A Redis store for the buckets (each run takes a prefix of its own), or None."""
    pool: str = "prefork"
    horizon: float = 60.0
    body: float = 0.0
    prefetch: int | None = None
    acks_late: bool = False
    admission: bool = True
    metrics: bool = False
    """zae-celery's Prometheus metrics on (the bootstep, a port per run)."""
    events: bool = False
    """Task events on, as ``celery worker -E`` (Celery's own and zae-celery's)."""
    inflight: int | None = None
    """An in-flight cap on zae-celery's task, and the provider's own at the same n."""
    latency: float = 0.0
    """The provider's median latency, seconds (log-normal, sigma 0.3 when not 0)."""
    slot_poll: float | None = None
    """``zae_slot_poll`` in the workers (None: its default)."""


def _client(setup: Setup, run_dir: Path) -> tuple[Celery, dict[str, str]]:
    """The publishing app of a run and the environment of its workers."""
    if setup.broker == "rabbitmq" and setup.redis_port is not None:
        broker = RABBITMQ
        backend = f"redis://127.0.0.1:{setup.redis_port}/1"
    elif setup.redis_port is not None:
        broker = f"redis://127.0.0.1:{setup.redis_port}/0"
        backend = f"redis://127.0.0.1:{setup.redis_port}/1"
    else:
        fs_broker.register()
        broker = f"{fs_broker.SCHEME}://"
        backend = f"file://{run_dir / 'results'}"
        (run_dir / "results").mkdir(parents=True, exist_ok=True)
    client = Celery("zae-bench-client", broker=broker, backend=backend)
    client.conf.broker_connection_retry_on_startup = True
    if setup.redis_port is None:
        client.conf.broker_transport_options = fs_broker.transport_options(setup.work / "broker")
    env = {
        "ZAE_BENCH_BROKER": broker,
        "ZAE_BENCH_BROKER_DIR": str(setup.work / "broker"),
        "ZAE_BENCH_BACKEND": backend,
        "ZAE_BENCH_RATE": str(setup.rate),
        "ZAE_BENCH_HORIZON": str(setup.horizon),
        "ZAE_BENCH_BODY": str(setup.body),
        "ZAE_BENCH_ACKS_LATE": "1" if setup.acks_late else "0",
        "ZAE_BENCH_ADMISSION": "1" if setup.admission else "0",
        **({"ZAE_BENCH_METRICS_PORT": str(free_port())} if setup.metrics else {}),
        **({"ZAE_BENCH_EVENTS": "1"} if setup.events else {}),
        **({"ZAE_BENCH_INFLIGHT": str(setup.inflight)} if setup.inflight else {}),
        **({"ZAE_BENCH_SLOT_POLL": str(setup.slot_poll)} if setup.slot_poll else {}),
    }
    if setup.prefetch is not None:
        env["ZAE_BENCH_PREFETCH"] = str(setup.prefetch)
    return client, env


def collect(
    console: Console,
    label: str,
    client: Celery,
    results: list[Any],
    deadline: float,
    infos: list[Any],
    failures: list[str],
) -> None:
    """Wait for every result until ``deadline`` (monotonic), in order, with a status
    line: what each task returned goes to ``infos``, each failure (its id and error) to
    ``failures``."""
    try:
        with console.status(f"{label}: 0/{len(results)} done") as status:
            for done, result in enumerate(results, 1):
                try:
                    timeout = max(1.0, deadline - time.monotonic())
                    infos.append(result.get(timeout=timeout, interval=0.1))
                except Exception as exc:
                    failures.append(f"{result.id}: {exc!r}")
                status.update(f"{label}: {done}/{len(results)} done")
    finally:
        # Unsubscribe now, while redis still runs: a result left pending (Ctrl-C) would
        # otherwise try from its finalizer, after redis-server is stopped.
        if hasattr(client.backend, "remove_pending_result"):
            for result in results:
                with contextlib.suppress(Exception):
                    client.backend.remove_pending_result(result)


def _warm_endpoint(limiter: RateLimiter, requests: int = 300) -> None:
    """Create the run's table and send ``requests`` grants to a scratch bucket: a
    fresh DynamoDB Local compiles its code paths (JIT) over its first few hundred
    requests, which a real DynamoDB endpoint does not."""
    limiter.create_table()
    scratch = [Limit.per_second("warm", 1_000_000)]
    for _ in range(requests):
        limiter.acquire("bench-warm-up", "warm", {"warm": 1}, scratch).commit()


def _family(pids: list[int]) -> set[int]:
    """These processes and their children (pool processes)."""
    family = set(pids)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) in family:  # field 4 of stat: the parent's pid
                family.add(int(stat.parent.name))
    return family


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) these processes and their children have used so far."""
    ticks = 0
    for pid in _family(pids):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pids: list[int]) -> float:
    """Peak resident memory (VmHWM) of these processes and their children, summed."""
    procs = Path("/proc")
    family = _family(pids)
    total_kb = 0
    for pid in family:
        with contextlib.suppress(OSError, ValueError):
            for line in (procs / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def run_mode(setup: Setup, mode: str, console: Console) -> Run:
    """One saturated batch on fresh workers, provider, queue (and table, or Redis
    prefix, for zae)."""
    label, task_name = MODES[mode]
    tag = uuid.uuid4().hex[:8]
    queue = f"bench-{mode}-{tag}"
    table = f"zae-bench-{tag}"
    store_url = None
    if setup.store_url is not None:
        store_url = with_run_prefix(setup.store_url, f"bench-{tag}")
        limiter = RateLimiter.from_url(store_url)
    else:
        limiter = RateLimiter(table, endpoint_url=setup.endpoint_url)
    if mode == "zae":
        _warm_endpoint(limiter)
    run_dir = setup.work / f"{mode}-{tag}"
    client, env = _client(setup, run_dir)
    proxy = None
    if store_url is not None:  # counted by the server: INFO commandstats
        env["ZAE_BENCH_STORE_URL"] = store_url
    else:
        assert setup.endpoint_url is not None
        proxy = CountingProxy(setup.endpoint_url)  # counts every process's requests
        env.update(ZAE_BENCH_ENDPOINT=proxy.url, ZAE_BENCH_TABLE=table)
    # The provider enforces the limit under test exactly: a bucket of one second of it,
    # with no slack for jitter (harness.provider).
    provider = LocalProvider(
        rpm=setup.provider_rate * 60,
        window=1.0,
        slack_requests=0,
        latency_median=setup.latency,
        latency_sigma=0.3 if setup.latency else 0.0,
        max_in_flight=setup.inflight,
    )
    env["ZAE_BENCH_PROVIDER"] = provider.url
    logs = run_dir / "logs"
    with contextlib.ExitStack() as stack:
        if proxy is not None:
            stack.callback(proxy.close)
        with console.status(f"{label}: starting {setup.workers} workers"):
            procs = stack.enter_context(
                worker_fleet(
                    APP,
                    count=setup.workers,
                    queues=[queue],
                    logs=logs,
                    concurrency=setup.concurrency,
                    pool=setup.pool,
                    env=env,
                    cwd=REPO,
                    name=f"bench-{mode}-",
                )
            )
        before = proxy.snapshot() if proxy is not None else {}
        scripts_before = redis_script_calls(store_url) if store_url is not None else 0
        stack.enter_context(provider)
        run = Run(mode, setup.tasks, setup.rate, submitted_at=time.time())
        results = [client.send_task(task_name, args=[i], queue=queue) for i in range(setup.tasks)]
        deadline = time.monotonic() + (setup.tasks - setup.rate) / setup.rate * 3 + 120
        collect(console, label, client, results, deadline, run.infos, run.failures)
        records = provider.records
        run.peak_in_flight = provider.peak_in_flight
        run.accepted = [r.at for r in records if r.status == 200]
        run.rejected = [r.at for r in records if r.status == 429]
        run.peak_rss_mb = _peak_rss_mb([p.pid for p in procs])
        run.cpu_s = _cpu_seconds([p.pid for p in procs])
        stop_workers(procs)  # their last requests (refunds at shutdown) count too
        if store_url is not None:
            run.redis_scripts = redis_script_calls(store_url) - scripts_before
        else:
            assert proxy is not None
            after = proxy.snapshot()
            run.dynamodb = {
                "by_operation": {
                    op: n - before["by_operation"].get(op, 0)
                    for op, n in after["by_operation"].items()
                    if n > before["by_operation"].get(op, 0)
                },
                "condition_failed": after["condition_failed"] - before["condition_failed"],
            }
    if run.failures:
        console.print(f"[red]{label}: {len(run.failures)} tasks failed, e.g. {run.failures[0]}")
        tail = (logs / "worker-0.log").read_text(errors="replace").splitlines()[-25:]
        console.print("\n".join(tail))
    if mode == "zae" or store_url is not None:  # a worker stamps a Redis store's schema
        with contextlib.suppress(Exception):
            limiter.delete_table()  # the table, or every key of the run's prefix
    if setup.broker == "rabbitmq":  # leave no queue behind on the shared server
        with contextlib.suppress(Exception), client.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    with contextlib.suppress(Exception):
        client.close()
    return run


# -- the table ------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return " [green]✓[/]" if ok else " [red]✗[/]"


def _rows(run: Run) -> list[str]:
    mean, most = run.republishes
    gap, at = run.largest_gap_s
    is_zae = run.mode == "zae"
    sent = len(run.accepted) + len(run.rejected)
    per_task = run.requests_per_task
    return [
        f"{len(run.infos)}/{run.tasks}",
        f"{run.achieved:.3f}",
        f"{run.steady:.3f}{_mark(run.steady >= 0.97)}",
        f"{run.start_excess:+d}{_mark(run.start_excess <= 0)}",
        f"{run.body_excess:+d}{_mark(run.body_excess <= 0)}",
        f"{run.provider_excess:+d}{_mark(run.provider_excess <= 0)}",
        f"{mean:.3f} (max {most}){_mark(mean <= 0.05 and most <= 1)}",
        f"{per_task:.3f}{_mark(per_task <= 1.1)}" if is_zae else "0 (none)",
        f"{run.peak_rss_mb:.0f}",
        f"{1000 * run.cpu_s / run.tasks:.1f}",
        f"{sent} / {len(run.rejected)}",
        "-" if run.late_s is None else "{:.2f} / {:.2f}".format(*run.late_s),
        f"{run.span_s:.2f}",
        f"{gap:.2f} at +{at:.1f} s",
        f"{run.wall_s:.1f}",
    ]


def render(runs: list[Run], setup: Setup, endpoint: str, console: Console) -> None:
    """The table of figures; ``endpoint`` says where the buckets were."""
    n, rate = setup.tasks, setup.rate
    options = [
        f"horizon {setup.horizon:g} s",
        f"body {setup.body:g} s",
        f"prefetch {setup.prefetch or 4}",
        "acks_late" if setup.acks_late else "early ack",
        "admission" if setup.admission else "no admission (pool gate)",
    ]
    table = Table(
        title=(
            f"{n} tasks sent at once ({(n - rate) / rate / setup.horizon:.0f}x the horizon), "
            f"{setup.workers} workers x {setup.pool} -c {setup.concurrency}, "
            f"{rate}/s (bucket {rate}), provider {setup.provider_rate}/s, broker {setup.broker}, "
            f"{endpoint}; " + ", ".join(options)
        )
    )
    table.add_column("measure")
    table.add_column("goal")
    for run in runs:
        table.add_column(MODES[run.mode][0], justify="right")
    labels = [
        ("tasks completed", ""),
        ("achieved / configured rate, after the burst", ""),
        ("steady state (10th to 90th percentile of starts)", ">= 0.97"),
        ("worst window excess, counted starts", "<= 0"),
        ("worst window excess, actual starts", "<= 0"),
        ("worst window excess, requests at the provider", "<= 0"),
        ("republishes per task", "<= 0.05 (max 1)"),
        (
            "Redis script calls per task (all processes)"
            if setup.store_url is not None
            else "DynamoDB requests per task (all processes)",
            "<= 1.1",
        ),
        ("workers' peak RSS, MB (all processes)", ""),
        ("workers' CPU per task, ms (all processes)", ""),
        ("provider requests / 429s", f"{n} / 0" if setup.provider_rate == rate else ""),
        ("start after its slot, median / max s", ""),
        ("span of starts, s", f"{(n - rate) / rate:.1f}"),
        ("largest gap between starts, s", f"{1 / rate:.2f}"),
        ("wall time from first send, s", ""),
    ]
    columns = [_rows(run) for run in runs]
    for k, (label, goal) in enumerate(labels):
        table.add_row(label, goal, *(column[k] for column in columns))
    console.print(table)
    for run in runs:
        if run.redis_scripts is not None and run.mode == "zae":
            console.print(
                f"{MODES[run.mode][0]} Redis script calls: {run.redis_scripts} (EVALSHA, "
                "counted by the server; any other client's scripts on it count too)"
            )
        if run.dynamodb_by_operation:
            ops = ", ".join(f"{op} {count}" for op, count in run.dynamodb_by_operation.items())
            console.print(
                f"{MODES[run.mode][0]} DynamoDB requests: {ops} "
                f"({run.dynamodb_condition_failed} of them answered 'condition failed')"
            )
    if setup.inflight:
        for run in runs:
            console.print(
                f"{MODES[run.mode][0]}: in flight at the provider, peak {run.peak_in_flight} "
                f"(cap {setup.inflight}), mean {run.mean_in_flight:.2f} while the batch ran; "
                f"provider latency median {setup.latency:g} s: at most "
                f"{setup.inflight / setup.latency if setup.latency else math.inf:.1f} tasks/s"
            )
    console.print(
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, Celery {celery_pkg.__version__}"
    )


# -- servers and the command ----------------------------------------------------------------------
@contextlib.contextmanager
def endpoint_server(kind: str, logs: Path) -> Iterator[LocalServer]:
    if kind == "moto":
        with moto_server(log_dir=logs) as server:
            yield server
    else:
        cache = Path(os.environ.get("ZAE_CACHE_DIR", REPO / ".cache"))
        with dynamodb_local(cache_dir=cache, log_dir=logs) as server:
            yield server


@click.command()
@click.option("--tasks", default=300, show_default=True, help="Tasks in the batch.")
@click.option("--workers", default=3, show_default=True, help="celery worker processes.")
@click.option("--concurrency", default=2, show_default=True, help="Prefork pool size per worker.")
@click.option("--rate", default=10, show_default=True, help="Requests per second (and bucket).")
@click.option(
    "--provider-rate",
    type=int,
    default=None,
    help="What the provider allows a second (default: --rate). A large value shows what "
    "each mode sends when nothing pushes back.",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "threads"]),
    default="prefork",
    show_default=True,
    help="The workers' pool.",
)
@click.option("--horizon", default=60.0, show_default=True, help="zae_horizon, seconds.")
@click.option("--body", default=0.0, show_default=True, help="Seconds each body waits (I/O).")
@click.option("--prefetch", type=int, default=None, help="worker_prefetch_multiplier (4).")
@click.option("--acks-late", is_flag=True, help="task_acks_late (and reject on worker lost).")
@click.option(
    "--admission/--no-admission",
    default=True,
    show_default=True,
    help="zae_admission: the consumer admits tasks (default), or the pool gates them.",
)
@click.option(
    "--broker",
    type=click.Choice(["redis", "rabbitmq", "filesystem"]),
    default="redis",
    show_default=True,
    help="A private redis-server, RabbitMQ at 127.0.0.1:5672 (guest/guest; results in a "
    "private redis), or filesystem:// with atomic writes (harness/fsbroker.py).",
)
@endpoint_option("The local DynamoDB of zae-celery (without --store).")
@click.option(
    "--store",
    metavar="redis|URL",
    default=None,
    help="Put zae-celery's buckets on a Redis store instead of DynamoDB: 'redis' starts a "
    "private redis-server for them (not the broker's), or redis://HOST:PORT/DB names one. "
    "Each run takes a key prefix of its own, deleted at the end. Requests per task are "
    "then the server's count of script calls.",
)
@click.option(
    "--only",
    type=click.Choice(["zae", "builtin"]),
    default=None,
    help="Run one of the two modes only.",
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write every start time and provider request to this JSON file.",
)
@click.option(
    "--metrics", is_flag=True, help="zae-celery's Prometheus metrics on (docs/observability.md)."
)
@click.option(
    "--events",
    is_flag=True,
    help="Task events on, as celery worker -E: Celery's and zae-celery's (docs/observability.md).",
)
@click.option(
    "--inflight",
    type=click.IntRange(min=1),
    default=None,
    help="Cap zae-celery's task at N requests in flight (Limit.concurrent), and the "
    "provider at the same N (429 beyond it).",
)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="The provider's median latency, seconds.",
)
@click.option(
    "--slot-poll",
    type=click.FloatRange(min=0.01, max=1.0),
    default=None,
    help="zae_slot_poll in the workers: how often a task waiting for an in-flight slot asks.",
)
@click.option("--keep", is_flag=True, help="Keep the work folder (worker and server logs).")
def main(
    tasks: int,
    workers: int,
    concurrency: int,
    rate: int,
    provider_rate: int | None,
    pool: str,
    horizon: float,
    body: float,
    prefetch: int | None,
    acks_late: bool,
    admission: bool,
    broker: str,
    endpoint: str,
    store: str | None,
    only: str | None,
    save: Path | None,
    metrics: bool,
    events: bool,
    inflight: int | None,
    latency: float,
    slot_poll: float | None,
    keep: bool,
) -> None:
    """Run the same saturated batch with zae-celery and with Celery's rate_limit."""
    if tasks <= rate or rate < 1 or workers < 1 or concurrency < 1:
        raise click.BadParameter("need --tasks > --rate >= 1 and at least one worker")
    if store not in (None, "redis"):
        try:
            redis_url = is_redis(store)
        except ValidationError as exc:
            raise click.BadParameter(exc.problem, param_hint="--store") from None
        if not redis_url:
            raise click.BadParameter(
                "'redis', or a redis://HOST:PORT/DB URL (without it: --endpoint)",
                param_hint="--store",
            )
    use_local_credentials()
    # SIGTERM unwinds like Ctrl-C does: every worker and server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    console = Console(width=140)
    work = Path(tempfile.mkdtemp(prefix="zae-bench-celery-"))
    runs: list[Run] = []
    try:
        with contextlib.ExitStack() as stack:
            # zae_celery.testing stops a server only once it serves: an interruption
            # while one starts is held until then (a few seconds at most).
            store_name = endpoint if store is None else "redis for the buckets"
            starting = f"starting {store_name}" + (" and redis" * (broker != "filesystem"))
            with console.status(starting), signals_held():
                endpoint_url, store_url = None, None
                if store is None:
                    server = stack.enter_context(endpoint_server(endpoint, work / "servers"))
                    endpoint_url = server.url
                elif store == "redis":  # a server of its own: the broker's scripts stay apart
                    server = stack.enter_context(redis_server(log_dir=work / "servers"))
                    store_url = f"{server.url}/0"
                else:
                    store_url = store
                redis_port = None
                if broker != "filesystem":
                    redis_port = stack.enter_context(redis_server(log_dir=work / "servers")).port
            setup = Setup(
                tasks,
                workers,
                concurrency,
                rate,
                provider_rate or rate,
                broker,
                endpoint_url,
                redis_port,
                work,
                store_url=store_url,
                pool=pool,
                horizon=horizon,
                body=body,
                prefetch=prefetch,
                acks_late=acks_late,
                admission=admission,
                metrics=metrics,
                events=events,
                inflight=inflight,
                latency=latency,
                slot_poll=slot_poll,
            )
            for mode in MODES:
                if only in (None, mode):
                    try:
                        runs.append(run_mode(setup, mode, console))
                    except FleetError as exc:
                        raise click.ClickException(str(exc)) from exc
        if store_url is None:
            where_label = endpoint
        else:
            where_label = f"buckets on {where(store_url)}" + (" (private)" * (store == "redis"))
        render(runs, setup, where_label, console)
        if save is not None:
            save.write_text(json.dumps([run.to_json() for run in runs]))
            console.print(f"raw data: {save}")
    finally:
        if keep:
            console.print(f"work folder (logs) kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
