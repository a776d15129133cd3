"""Hot-bucket benchmark: one bucket item under N concurrent client processes.

    python -m benchmarks.hot [--endpoint dynamodb-local|moto] [--mode grant|reserve|retry]...
        [--processes 1,2,4,8] [--seconds 10] [--rate 50] [--tpm-pace 2] [--horizon 30]
        [--refund 0] [--settle-delay 0] [--shards 1] [--library ours|zae-limiter]
        [--json FILE]

N client processes (spawned, each with its own RateLimiter on the same endpoint and a
fresh table per mode and N) start together and, for ``--seconds``, take grants of
rpm(1) + tpm(100) on one (entity "hot", resource "model"), committing each at once:

- grant: limits so large nothing is refused; acquire and commit as fast as possible.
- reserve: the fleet bound to ``--rate`` grants/s on rpm (a bucket of 1 s worth; tpm at
  ``--tpm-pace`` times that pace, so that rpm binds and tpm must be counted at rpm's
  slot: in the grant when this client's view predicted that slot, else a second
  write; 1 makes both slots one), each acquire
  with ``horizon=--horizon``; the client sleeps until ``lease.start_at``, then starts
  (commits).
- retry: the same limits, horizon 0; on RateLimitExceeded the client sleeps
  ``retry_after`` and tries again (the naive loop), refused attempts counted apart.

With ``--refund R`` each commit gives R tpm tokens back (the usage came in under the
estimate): a settle write of its own, or with ``--settle-delay D`` a refund that rides
in the client's next grant (held refunds left at the end are flushed and counted).

Per mode and N it prints: grants, grants/s, DynamoDB requests (every operation),
refused conditions and UpdateItems per grant, refused attempts per grant, latency per
grant (grant, retry: first attempt to success, retries and sleeps included; reserve:
the acquire call, and apart the wait until the slot), for the bound modes the excess
(the worst window [t_i, t_j]: grants in it less burst + rate x width; above 0 the
limit was exceeded, as benchmarks.celery measures it), of the starts the engine counted
(``lease.start_at``) and of the clients' actual starts (after their sleeps), and
utilization (grants started over what the rate allows, from when a client first found
the bucket empty, a refusal or a wait, to the end), and writes per item per second:
the most UpdateItems sent to one item (key) in any 1 s, summed over every client
(DynamoDB serves an item from one partition, at most 1000 writes/s).

With ``--shards S`` both limits are spread over S items (``Limit.shards``), each with
a share of the capacity and rate; writes per item per second then shows the hottest shard.

With ``--library zae-limiter`` (grant mode only; ``make benchmark`` installs it) the
clients run zae-limiter 0.17.0 instead (benchmarks/theirs.py): the same grant and commit
through its sync API, its bucket pre-sharded to ``--shards`` with its own doubling
(``bump_shard_count``; alone it doubles only past 1,000 writes a second on an item).

The endpoint is warmed up first, and each client warms up on an entity of its own.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from benchmarks import endpoint_option, max_window_excess
from benchmarks.engine import endpoint_server
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded
from zae_celery.testing import use_local_credentials
from zae_celery.testing.counting import RequestCounter

MODES = ("grant", "reserve", "retry")
OURS, THEIRS = "ours", "zae-limiter"
HOT, RESOURCE = "hot", "model"
CONSUME = {"rpm": 1, "tpm": 100}
BIG = 10**9
WARMUP = 5  # grants per client, on its own entity, before the start
ENDPOINT_WARMUP = 1000  # grants on a throwaway table before the first case


@dataclass(frozen=True)
class Spec:
    """What one client process runs."""

    url: str
    table: str
    mode: str
    seconds: float
    rate: int
    tpm_pace: float
    horizon: float
    refund: int
    settle_delay: float
    shards: int
    library: str
    index: int


def burst_for(rate: int) -> int:
    """The rpm bucket of a bound fleet: one second's worth of grants."""
    return rate


def limits_for(mode: str, rate: int = 0, tpm_pace: float = 1, shards: int = 1) -> list[Limit]:
    """rpm and tpm: unbounded for ``grant``; otherwise rpm bound to ``rate`` grants/s
    and tpm to ``tpm_pace`` times that (buckets of 1 s worth); spread over ``shards``."""
    if mode == "grant":
        limits = [Limit.per_minute("rpm", BIG), Limit.per_minute("tpm", BIG)]
    else:
        burst, per_minute = burst_for(rate), rate * 60
        tpm = CONSUME["tpm"] * tpm_pace
        limits = [
            Limit.custom("rpm", burst, per_minute, 60),
            Limit.custom("tpm", round(burst * tpm), round(per_minute * tpm), 60),
        ]
    return [lim.with_shards(shards) for lim in limits]


def _item(body: Any) -> str:
    """The item an UpdateItem request targets, from its JSON body ("PK|SK")."""
    key = json.loads(body).get("Key", {})
    return "|".join(str(next(iter(v.values()))) for _, v in sorted(key.items()))


def _client(spec: Spec, barrier: Any, out: Any) -> None:
    """A client process: warm up, wait at the barrier, run, put its samples on ``out``."""
    try:
        out.put(_run_client(spec, barrier))
    except BaseException as exc:
        barrier.abort()
        out.put({"error": f"client {spec.index}: {exc!r}"})


def _counted(client: Any) -> tuple[RequestCounter, list[tuple[float, str]]]:
    """Count every request a botocore DynamoDB client sends from now on, and record
    (time, item) of each UpdateItem (the writes per item per second)."""
    counter = RequestCounter()
    counter.install(client)
    writes: list[tuple[float, str]] = []

    def on_update(request: Any = None, **_: Any) -> None:
        writes.append((time.time(), _item(request.body)))

    client.meta.events.register("before-send.dynamodb.UpdateItem", on_update)
    return counter, writes


def _run_theirs(spec: Spec, barrier: Any) -> dict[str, Any]:
    """A grant-mode client on zae-limiter: the same loop, its requests counted alike."""
    from benchmarks import theirs

    client = theirs.HotClient(spec.url, spec.table, CONSUME)
    for _ in range(WARMUP):
        client.grant()
    counter, writes = _counted(client.client)
    grants: list[tuple[float, float, float, float]] = []
    barrier.wait(timeout=120)
    t0 = time.time()
    deadline = t0 + spec.seconds
    while time.time() < deadline:
        first = time.time()
        client.grant()
        done = time.time()
        grants.append((done, done - first, 0.0, first))
    client.close()
    return {"t0": t0, "grants": grants, "refused": 0, "bound_at": None,
            "requests": counter.snapshot(), "writes": writes}  # fmt: skip


def _run_client(spec: Spec, barrier: Any) -> dict[str, Any]:
    if spec.library == THEIRS:
        return _run_theirs(spec, barrier)
    limiter = RateLimiter(spec.table, endpoint_url=spec.url, settle_delay=spec.settle_delay)
    limits = limits_for(spec.mode, spec.rate, spec.tpm_pace, spec.shards)
    limiter.warm_up()
    for _ in range(WARMUP):
        with limiter.acquire(f"warm-{spec.index}", RESOURCE, CONSUME, limits_for("grant")):
            pass
    limiter.available(HOT, RESOURCE, limits)  # the entity's stored limits, looked up once
    counter, writes = _counted(limiter.client)
    horizon = spec.horizon if spec.mode == "reserve" else 0.0
    # (started, latency, wait, the start the engine counted: lease.start_at)
    grants: list[tuple[float, float, float, float]] = []
    refused = 0
    bound_at: float | None = None  # when this client first found the bucket empty
    barrier.wait(timeout=120)
    t0 = time.time()
    deadline = t0 + spec.seconds
    first: float | None = None  # the first attempt of the grant under way
    while time.time() < deadline:
        first = first or time.time()
        try:
            lease = limiter.acquire(HOT, RESOURCE, CONSUME, limits, horizon=horizon)
        except RateLimitExceeded as exc:
            refused, bound_at = refused + 1, bound_at or time.time()
            time.sleep(max(0.0, min(exc.retry_after, deadline - time.time())))
            continue
        granted = time.time()
        if (wait := lease.start_at - granted) > 0:
            bound_at = bound_at or granted
            time.sleep(wait)
        started = time.time()
        # The usage came in under the estimate by --refund tokens (0: nothing to write).
        lease.commit(tpm=-spec.refund) if spec.refund else lease.commit()
        if spec.mode == "reserve":
            grants.append((started, granted - first, started - granted, lease.start_at))
        else:
            grants.append((started, started - first, 0.0, lease.start_at))
        first = None
    limiter.flush()  # refunds still held (--settle-delay) are part of the cost
    snapshot = counter.snapshot()
    return {"t0": t0, "grants": grants, "refused": refused, "bound_at": bound_at,
            "requests": snapshot, "writes": writes}  # fmt: skip


def max_in_window(times: list[float], width: float) -> int:
    """The most of ``times`` in any half-open window of ``width`` seconds."""
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _pct(values: list[float], q: int) -> float | None:
    """The q-th percentile in ms (None without samples)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def summarise(mode: str, n: int, samples: list[dict[str, Any]], spec: Spec) -> dict[str, Any]:
    """The figures of one (mode, N) from every client's samples."""
    t0 = min(s["t0"] for s in samples)
    end = t0 + spec.seconds
    grants = sorted(g for s in samples for g in s["grants"])
    count = max(1, len(grants))
    ops: dict[str, int] = {}
    by_item: dict[str, list[float]] = {}
    for s in samples:
        for op, k in s["requests"]["by_operation"].items():
            ops[op] = ops.get(op, 0) + k
        for t, item in s["writes"]:
            by_item.setdefault(item, []).append(t)
    per_item = {item: max_in_window(ts, 1.0) for item, ts in by_item.items()}
    hottest = max(per_item, key=lambda k: per_item[k], default="")
    refused = sum(s["refused"] for s in samples)
    reserve = mode == "reserve"
    figures: dict[str, Any] = {
        "mode": mode,
        "processes": n,
        "grants": len(grants),
        "grants_per_s": len(grants) / spec.seconds,
        "requests_by_operation": ops,
        "requests_per_grant": sum(ops.values()) / count,
        "condition_failed_per_grant": sum(s["requests"]["condition_failed"] for s in samples)
        / count,
        "update_item_per_grant": ops.get("UpdateItem", 0) / count,
        "refused": refused,
        "refused_per_grant": refused / count,
        "latency_p50_ms": _pct([g[1] for g in grants], 50),
        "latency_p99_ms": _pct([g[1] for g in grants], 99),
        "wait_p50_ms": _pct([g[2] for g in grants], 50) if reserve else None,
        "wait_p99_ms": _pct([g[2] for g in grants], 99) if reserve else None,
        "writes_per_item_per_s": per_item.get(hottest, 0),
        "hottest_item": hottest,
        "excess_counted": None,
        "excess_actual": None,
        "utilization": None,
        "bound_after_s": None,
    }
    if mode != "grant":
        burst = burst_for(spec.rate)
        starts = [g[0] for g in grants]
        for key, times in (("counted", [g[3] for g in grants]), ("actual", starts)):
            ms = [round(t * 1000) for t in times]
            figures[f"excess_{key}"] = max_window_excess(ms, burst, spec.rate)
        # The steady part: from when a client first found the bucket empty to the end.
        bound = min((s["bound_at"] for s in samples if s["bound_at"] is not None), default=t0)
        steady = sum(bound <= t < end for t in starts)
        figures["bound_after_s"] = bound - t0
        figures["utilization"] = steady / (spec.rate * (end - bound))
    return figures


def run_case(url: str, mode: str, n: int, options: dict[str, Any]) -> dict[str, Any]:
    """N clients on a fresh table; their samples, summarised."""
    table = f"bench-hot-{mode}-{n}-{uuid.uuid4().hex[:8]}"
    seconds = options["seconds"]
    if options["library"] == THEIRS:
        from benchmarks import theirs

        theirs.hot_setup(url, table, options["shards"], CONSUME)
        delete_table: Callable[[], None] = functools.partial(theirs.hot_delete, url, table)
    else:
        admin = RateLimiter(table, endpoint_url=url)
        admin.create_table()
        delete_table = admin.delete_table
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    specs = [Spec(url, table, mode, index=i, **options) for i in range(n)]
    procs = [ctx.Process(target=_client, args=(spec, barrier, out)) for spec in specs]
    try:
        for proc in procs:
            proc.start()
        samples = [out.get(timeout=seconds + 300) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        delete_table()
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        raise click.ClickException("; ".join(errors))
    return summarise(mode, n, samples, specs[0])


def warm_endpoint(url: str) -> None:
    """Warm the endpoint (DynamoDB Local's JIT) on a throwaway table."""
    limiter = RateLimiter(f"bench-hot-warm-{uuid.uuid4().hex[:8]}", endpoint_url=url)
    limiter.create_table()
    try:
        for _ in range(ENDPOINT_WARMUP):
            with limiter.acquire(HOT, RESOURCE, CONSUME, limits_for("grant")):
                pass
    finally:
        limiter.delete_table()


COLUMNS = (  # header, figure, decimals
    ("grants", "grants", 0), ("grants/s", "grants_per_s", 1),
    ("req/grant", "requests_per_grant", 2),
    ("cond fail/grant", "condition_failed_per_grant", 2),
    ("UpdateItem/grant", "update_item_per_grant", 2), ("refused/grant", "refused_per_grant", 2),
    ("p50 ms", "latency_p50_ms", 2), ("p99 ms", "latency_p99_ms", 2),
    ("wait p50 ms", "wait_p50_ms", 1), ("wait p99 ms", "wait_p99_ms", 1),
    ("excess counted", "excess_counted", 0), ("excess actual", "excess_actual", 0),
    ("utilization", "utilization", 2),
    ("writes/item/s", "writes_per_item_per_s", 0),
)  # fmt: skip


def render(results: list[dict[str, Any]], title: str) -> Table:
    """One row per (mode, N); "-" where a figure does not apply."""
    table = Table(title=title)
    for header in ("mode", "N", *(c[0] for c in COLUMNS)):
        table.add_column(header, justify="right")
    for r in results:
        cells = ["-" if r[key] is None else f"{r[key]:.{digits}f}" for _, key, digits in COLUMNS]
        table.add_row(r["mode"], str(r["processes"]), *cells)
    return table


def _processes(_: Any, __: Any, value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter("a comma-separated list of positive integers, e.g. 1,2,4,8")
    return counts


@click.command()
@endpoint_option("Which local DynamoDB the clients run against.")
@click.option(
    "--mode",
    "modes",
    type=click.Choice(MODES),
    multiple=True,
    help="grant, reserve or retry; repeat for several (default: all).",
)
@click.option(
    "--processes",
    default="1,2,4,8",
    show_default=True,
    callback=_processes,
    help="Client process counts to run, comma-separated.",
)
@click.option("--seconds", default=10.0, show_default=True, help="Run time per case.")
@click.option(
    "--rate",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Fleet grants/s (bound modes).",
)
@click.option(
    "--tpm-pace", default=2.0, show_default=True, help="tpm's pace over rpm's (bound modes)."
)
@click.option("--horizon", default=30.0, show_default=True, help="Reserve mode's horizon (s).")
@click.option(
    "--refund",
    type=click.IntRange(min=0, max=CONSUME["tpm"]),
    default=0,
    show_default=True,
    help="tpm tokens each grant gives back at its commit (usage under the estimate).",
)
@click.option(
    "--settle-delay",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="The clients' settle_delay: how long a refund may wait to ride in a later write.",
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Items the bucket is spread over (Limit.shards).",
)
@click.option(
    "--library",
    type=click.Choice((OURS, THEIRS)),
    default=OURS,
    show_default=True,
    help="Whose clients run: ours, or zae-limiter 0.17.0 (grant mode only).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write figures here.")
def main(
    endpoint: str,
    modes: tuple[str, ...],
    processes: list[int],
    seconds: float,
    rate: int,
    tpm_pace: float,
    horizon: float,
    refund: int,
    settle_delay: float,
    shards: int,
    library: str,
    json_path: str | None,
) -> None:
    """Benchmark one hot bucket under N concurrent client processes and print a table."""
    if seconds <= burst_for(rate) / rate:
        raise click.BadParameter("--seconds must exceed the bucket's length (burst / rate)")
    if library == THEIRS and set(modes) != {"grant"}:
        raise click.BadParameter("--library zae-limiter runs grant mode only (--mode grant)")
    if tpm_pace < 1:
        raise click.BadParameter("--tpm-pace below 1 would make tpm bind instead of rpm")
    options = {"seconds": seconds, "rate": rate, "tpm_pace": tpm_pace, "horizon": horizon,
               "refund": refund, "settle_delay": settle_delay, "shards": shards,
               "library": library}  # fmt: skip
    use_local_credentials()
    console = Console(width=200)
    results: list[dict[str, Any]] = []
    with endpoint_server(endpoint) as server:
        warm_endpoint(server.url)
        for mode in modes or MODES:
            for n in processes:
                results.append(run_case(server.url, mode, n, options))
                console.print(f"{mode} N={n}: {results[-1]['grants']} grants", style="dim")
    title = (
        f"one hot bucket, {endpoint}, {seconds:g} s per case; bound modes: {rate:g} grants/s, "
        f"burst {burst_for(rate)}, tpm pace x{tpm_pace:g}, reserve horizon {horizon:g} s; "
        f"refund {refund} of {CONSUME['tpm']} tpm per grant, settle_delay {settle_delay:g} s, "
        f"{shards} shard{'s' if shards > 1 else ''}; {library}"
    )
    console.print(render(results, title))
    if json_path:
        dump = {"options": {"endpoint": endpoint, **options}, "results": results}
        Path(json_path).write_text(json.dumps(dump, indent=2))
        console.print(f"figures written to {json_path}")


if __name__ == "__main__":
    main()
