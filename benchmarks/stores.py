"""Round trips and latency per decision: the engine on Redis and on DynamoDB Local, and on
Redis against throttled-py's GCRA and token bucket, all in one run.

    python -m benchmarks.stores [--store redis|dynamodb-local|both] [--cycles 300]
                                [--keys 1] [--no-peer]

Table 1, stores (``--store``): the workload of :mod:`benchmarks.engine` (rpm(1) + tpm(100),
+ l3..l5 for 5 limits; 1 limit = tpm only) on each store, for 1, 2 and 5 limits, in two
phases per run: *decision*, an acquire left at once (the lease commits, nothing written:
a pure grant or refusal), and *cycle*, acquire + adjust tpm +20 + commit. Cases: *idle*
(nothing refused), *saturated* (tpm kept empty: every acquire refused, with the default
refusal cache: refusals predicted from the last state seen), *saturated, no cache*
(``local_refusals=False``: every refusal asks the store).

Table 2, peer (Redis; skipped with ``--no-peer`` or when throttled-py is not installed):
one decision per call on the same private redis-server: our acquire (the decision phase
above) with 1 limit (tpm) and 2 limits (rpm + tpm, one atomic script), against
throttled-py's ``limit()`` with the same per-minute rates, bursts and costs, for its GCRA
and its token bucket (two limits: two ``limit()`` calls). Same cases, same subjects
(``--keys``: decisions go round-robin over that many entities/keys on every side).

Every run of a library starts a new client, warms it up (untimed) and times ``--cycles /
3`` decisions or cycles; each case runs 3 rounds, the order of the stores (table 1) or
libraries (table 2) rotating from round to round, so drift affects all alike.

Round trips: DynamoDB requests counted with a botocore before-send hook on the limiter's
client (retries included); on Redis, ``INFO commandstats`` deltas on the server around
each timed phase: a round trip is a command a Lua script cannot run (EVALSHA, EVAL,
SCRIPT LOAD, HELLO...: flagged ``noscript`` by ``COMMAND INFO``), and "cmds" counts every
command the server ran, those inside the scripts included. Figures for docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import click
import redis
from rich.console import Console
from rich.table import Table

from benchmarks import throttled_peer
from benchmarks.engine import ROUNDS, WARMUP, Timed, endpoint_server, limits_for
from zae_celery.core import Limit, RateLimiter, RateLimitExceeded
from zae_celery.testing import redis_server, use_local_credentials

RESOURCE = "model"
TPM_EXTRA = 20
"""Tokens added to tpm by the cycle's adjust (the call used more than estimated)."""
STORES = ("redis", "dynamodb-local")
CASES = ("idle", "saturated", "saturated, no cache")
SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})


@dataclass
class Count:
    """What the store saw during one timed phase."""

    round_trips: int
    commands: int | None = None  # Redis: every command run, inside scripts too
    scripts: int | None = None  # Redis: EVALSHA/EVAL/FCALL calls
    server_us: int | None = None  # Redis: server time of the round trips' commands


@dataclass
class Sample(Timed):
    """One library (or store) on one case: latencies of the timed calls and the counts."""

    count: Count
    calls: int
    granted: int

    def per_call(self, value: int | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value / self.calls:.{digits}f}"


def merge(parts: Sequence[Sample]) -> Sample:
    """The samples of the rounds of one case as one."""

    def total(values: list[int | None]) -> int | None:
        return None if any(v is None for v in values) else sum(v or 0 for v in values)

    return Sample(
        [x for p in parts for x in p.latencies_s],
        Count(
            sum(p.count.round_trips for p in parts),
            total([p.count.commands for p in parts]),
            total([p.count.scripts for p in parts]),
            total([p.count.server_us for p in parts]),
        ),
        sum(p.calls for p in parts),
        sum(p.granted for p in parts),
    )


class Counter(Protocol):
    """Counts what a store sees between :meth:`begin` and :meth:`end`."""

    def begin(self) -> None: ...

    def end(self) -> Count: ...


class RedisCommands:
    """``INFO commandstats`` deltas on one redis-server, from a client of its own.

    An INFO is counted by the server after it answered, so each delta holds exactly one
    INFO of this observer (the one at :meth:`begin`), which is taken off.
    """

    def __init__(self, url: str) -> None:
        self.client: Any = redis.Redis.from_url(url, decode_responses=True)
        self._noscript: dict[str, bool] = {}
        self._before: dict[str, tuple[int, int]] = {}

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Calls and microseconds per command (``cmd`` or ``cmd|sub``)."""
        stats: dict[str, Any] = self.client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in stats.items()
        }

    def begin(self) -> None:
        self._before = self.snapshot()

    def end(self) -> Count:
        after = self.snapshot()
        calls = {name: c - self._before.get(name, (0, 0))[0] for name, (c, _) in after.items()}
        usec = {name: u - self._before.get(name, (0, 0))[1] for name, (_, u) in after.items()}
        calls["info"] = calls.get("info", 0) - 1
        sent = [name for name, c in calls.items() if c and self.noscript(name)]
        return Count(
            round_trips=sum(calls[name] for name in sent),
            commands=sum(calls.values()),
            scripts=sum(calls.get(name, 0) for name in SCRIPT_COMMANDS),
            # A script's time includes the commands it ran.
            server_us=sum(usec[name] for name in sent),
        )

    def noscript(self, name: str) -> bool:
        """Whether a Lua script cannot run ``name`` (``cmd`` or ``cmd|sub``): then the
        client sent it, one command per round trip."""
        if name not in self._noscript:
            base = name.partition("|")[0]
            info: Any = self.client.execute_command("COMMAND", "INFO", base)
            entry: Any = info.get(base) if isinstance(info, dict) else None
            flags: list[Any] = []
            if entry is not None:
                flags = list(entry.get("flags") or [])
                for sub in entry.get("subcommands") or []:
                    if str(sub[0]).lower() == name:
                        flags = list(sub[2])
            self._noscript[name] = "noscript" in {str(f).lower() for f in flags}
        return self._noscript[name]

    def server_version(self) -> str:
        server: dict[str, Any] = self.client.info("server")
        return str(server.get("redis_version", "?"))


class BotocoreRequests:
    """Every HTTP request a limiter's DynamoDB client sends (before-send hook)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._events: Any = limiter.client.meta.events
        self._sent = 0
        self._on = False
        self._events.register("before-send.dynamodb.*", self._count)

    def _count(self, **_: Any) -> None:
        if self._on:
            self._sent += 1

    def begin(self) -> None:
        self._sent, self._on = 0, True

    def end(self) -> Count:
        self._on = False
        return Count(self._sent)

    def close(self) -> None:
        self._events.unregister("before-send.dynamodb.*", self._count)


def timed(step: Callable[[int], bool], calls: int, keys: int, counter: Counter) -> Sample:
    """Warm up (untimed), then time ``calls`` steps, counted by ``counter``."""
    for i in range(max(WARMUP, 2 * keys)):
        step(i)
    latencies: list[float] = []
    granted = 0
    counter.begin()
    for i in range(calls):
        start = time.perf_counter()
        ok = step(i)
        latencies.append(time.perf_counter() - start)
        granted += ok
    return Sample(latencies, counter.end(), calls, granted)


@contextlib.contextmanager
def our_limiter(
    store: str, url: str, observer: RedisCommands | None, local_refusals: bool
) -> Iterator[tuple[RateLimiter, Counter]]:
    """A new limiter with a new table (DynamoDB) or prefix (Redis), and its counter."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    if store == "redis":
        assert observer is not None
        limiter = RateLimiter.from_url(f"{url}/0?prefix={name}", local_refusals=local_refusals)
        limiter.create_table()
        try:
            yield limiter, observer
        finally:
            limiter.delete_table()
        return
    limiter = RateLimiter(name, endpoint_url=url, local_refusals=local_refusals)
    limiter.create_table()
    requests = BotocoreRequests(limiter)
    try:
        yield limiter, requests
    finally:
        requests.close()
        limiter.delete_table()


def entity(i: int, keys: int) -> str:
    return f"bench-{i % keys}"


def grant_step(
    limiter: RateLimiter, limits: list[Limit], consume: dict[str, int], keys: int
) -> Callable[[int], bool]:
    """One decision: acquire and leave the block (commit: nothing is written)."""

    def step(i: int) -> bool:
        try:
            with limiter.acquire(entity(i, keys), RESOURCE, consume, limits):
                return True
        except RateLimitExceeded:
            return False

    return step


def cycle_step(
    limiter: RateLimiter, limits: list[Limit], consume: dict[str, int], keys: int
) -> Callable[[int], bool]:
    """One cycle: acquire, adjust tpm +20, commit."""

    def step(i: int) -> bool:
        try:
            with limiter.acquire(entity(i, keys), RESOURCE, consume, limits) as lease:
                lease.adjust(tpm=TPM_EXTRA)
                return True
        except RateLimitExceeded:
            return False

    return step


def run_ours(
    store: str,
    url: str,
    observer: RedisCommands | None,
    n_limits: int,
    case: str,
    calls: int,
    keys: int,
    phases: Sequence[str] = ("decision", "cycle"),
) -> dict[str, Sample]:
    """The engine on one store: each phase on the same new limiter, warmed up first."""
    limits, consume = limits_for(n_limits, case != "idle")
    steps = {"decision": grant_step, "cycle": cycle_step}
    out: dict[str, Sample] = {}
    with our_limiter(store, url, observer, case != "saturated, no cache") as (limiter, counter):
        for phase in phases:
            out[phase] = timed(steps[phase](limiter, limits, consume, keys), calls, keys, counter)
    return out


def run_peer(
    url: str,
    observer: RedisCommands,
    algorithm: str,
    n_limits: int,
    case: str,
    calls: int,
    keys: int,
) -> Sample:
    """throttled-py on the same limits (rates, bursts, costs) as :func:`limits_for`."""
    limits, consume = limits_for(n_limits, case != "idle")
    specs = [(lim.name, lim.capacity, consume[lim.name]) for lim in limits]
    for lim in limits:  # per-minute limits whose burst is their rate, as the peer's quota
        assert lim.refill_period_ms == 60_000 and lim.burst == lim.capacity == lim.refill_amount
    decider = throttled_peer.ThrottledDecider(
        f"{url}/0", algorithm, specs, f"bench-{uuid.uuid4().hex[:8]}"
    )
    return timed(lambda i: decider(entity(i, keys)), calls, keys, observer)


def rotated(items: Sequence[str], by: int) -> list[str]:
    return [items[(i + by) % len(items)] for i in range(len(items))]


def stores_table(
    urls: dict[str, str], observer: RedisCommands | None, cycles: int, keys: int
) -> Table:
    """Table 1: every store on the engine's workload."""
    stores = [s for s in STORES if s in urls]
    table = Table(title=f"Table 1: stores, sync, {cycles} decisions and {cycles} cycles per row")
    for column in (
        "case",
        "limits",
        "store",
        "decision median ms",
        "decision p95 ms",
        "round trips/decision",
        "cmds/decision",
        "server µs/decision",
        "cycle median ms",
        "cycle p95 ms",
        "round trips/cycle",
        "cmds/cycle",
        "granted",
        "decision vs dynamodb-local",
    ):
        table.add_column(column, justify="right", no_wrap=column in ("case", "store"))
    for store in stores:  # warm each store first (DynamoDB Local's JIT, the redis-server)
        run_ours(store, urls[store], observer, 2, "idle", 300, 1, phases=("cycle",))
    for case in CASES:
        for n_limits in (1, 2, 5):
            parts: dict[str, dict[str, list[Sample]]] = {
                s: {"decision": [], "cycle": []} for s in stores
            }
            for r in range(ROUNDS):
                for store in rotated(stores, r):
                    got = run_ours(
                        store, urls[store], observer, n_limits, case, cycles // ROUNDS, keys
                    )
                    for phase, sample in got.items():
                        parts[store][phase].append(sample)
            merged = {s: {p: merge(v) for p, v in parts[s].items()} for s in stores}
            for store in stores:
                d, c = merged[store]["decision"], merged[store]["cycle"]
                ratio = "-"
                if store != "dynamodb-local" and "dynamodb-local" in merged:
                    ratio = f"{d.median_ms / merged['dynamodb-local']['decision'].median_ms:.3f}"
                table.add_row(
                    case,
                    str(n_limits),
                    store,
                    f"{d.median_ms:.3f}",
                    f"{d.p95_ms:.3f}",
                    d.per_call(d.count.round_trips),
                    d.per_call(d.count.commands),
                    d.per_call(d.count.server_us, 1),
                    f"{c.median_ms:.3f}",
                    f"{c.p95_ms:.3f}",
                    c.per_call(c.count.round_trips),
                    c.per_call(c.count.commands),
                    f"{d.granted / d.calls:.0%}",
                    ratio,
                )
    return table


def peer_table(url: str, observer: RedisCommands, cycles: int, keys: int) -> Table:
    """Table 2: one decision, ours against throttled-py, on one redis-server."""
    libraries = ["ours", *(f"throttled {a}" for a in throttled_peer.ALGORITHMS)]
    table = Table(title=f"Table 2: one decision on Redis, sync, {cycles} decisions per row")
    for column in (
        "case",
        "limits",
        "library",
        "median ms",
        "p95 ms",
        "round trips/decision",
        "EVALSHA/decision",
        "cmds/decision",
        "server µs/decision",
        "granted",
        "median ours/this",
        "p95 ours/this",
    ):
        table.add_column(column, justify="right", no_wrap=column in ("case", "library"))
    for case in CASES:
        for n_limits in (1, 2):
            parts: dict[str, list[Sample]] = {lib: [] for lib in libraries}
            for r in range(ROUNDS):
                for lib in rotated(libraries, r):
                    if lib == "ours":
                        got = run_ours(
                            "redis",
                            url,
                            observer,
                            n_limits,
                            case,
                            cycles // ROUNDS,
                            keys,
                            phases=("decision",),
                        )["decision"]
                    else:
                        algorithm = lib.removeprefix("throttled ")
                        got = run_peer(
                            url, observer, algorithm, n_limits, case, cycles // ROUNDS, keys
                        )
                    parts[lib].append(got)
            merged = {lib: merge(v) for lib, v in parts.items()}
            ours = merged["ours"]
            for lib in libraries:
                s = merged[lib]
                table.add_row(
                    case,
                    str(n_limits),
                    lib,
                    f"{s.median_ms:.3f}",
                    f"{s.p95_ms:.3f}",
                    s.per_call(s.count.round_trips),
                    s.per_call(s.count.scripts),
                    s.per_call(s.count.commands),
                    s.per_call(s.count.server_us, 1),
                    f"{s.granted / s.calls:.0%}",
                    "-" if lib == "ours" else f"{ours.median_ms / s.median_ms:.2f}",
                    "-" if lib == "ours" else f"{ours.p95_ms / s.p95_ms:.2f}",
                )
    return table


STORES_NOTES = """\
A Redis decision is one script call: the script computes the refill clamp, max(TAT, now),
so the engine guesses no write shape (DynamoDB's update expressions cannot, so a DynamoDB
write is shaped from the state last seen, and a wrong guess costs a second write: see
docs/engine.md). "cmds" counts the commands run inside the scripts too; "server us" is
the server's time in the round trips' commands. A saturated bucket costs no round trip:
the refusal is predicted from the state last seen (both stores)."""

PEER_NOTES = """\
What throttled-py's limit() does not do, and this engine does in the same single script:
- several limits in one atomic decision: with throttled-py two limits are two calls (two
  round trips when the first allows); a token taken by the first stays taken when the
  second refuses, and two processes can interleave between the calls;
- a lease: no adjust after the call (a cost known only afterwards, e.g. tokens used, can't
  be charged as debt against the bucket: a second limit() may itself be refused), no
  refund or rollback when the call failed, no reservation ahead in line (horizon);
- cascade to a parent entity's limits, or limits stored per entity in the store;
- refusals predicted locally ("saturated": ours answers from the last state seen, no
  round trip; "saturated, no cache" asks the server every time, like throttled-py).
Also: its token bucket refills in whole seconds of the server's TIME (its GCRA in
microseconds); ours keeps exact integer TATs (decimal strings in Lua) on the caller's
clock. Limits are per minute with burst = rate on both sides; costs: tpm 100, rpm 1."""


@click.command()
@click.option(
    "--store",
    type=click.Choice(["redis", "dynamodb-local", "both"]),
    default="both",
    show_default=True,
    help="Table 1's stores.",
)
@click.option("--cycles", default=300, show_default=True, help="Timed calls per row.")
@click.option(
    "--keys",
    default=1,
    show_default=True,
    help="Subjects (entities, peer keys) the calls go round-robin over.",
)
@click.option("--no-peer", is_flag=True, help="Skip table 2 (throttled-py).")
def main(store: str, cycles: int, keys: int, no_peer: bool) -> None:
    """Benchmark the engine on Redis and DynamoDB Local, and against throttled-py."""
    if cycles < 3 * ROUNDS:
        raise click.BadParameter(f"at least {3 * ROUNDS}", param_hint="--cycles")
    if keys < 1:
        raise click.BadParameter("at least 1", param_hint="--keys")
    use_local_credentials()
    console = Console(width=230)
    stores = list(STORES) if store == "both" else [store]
    peer = None if no_peer else throttled_peer.installed_version()
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        observer: RedisCommands | None = None
        redis_url = ""
        if "redis" in stores or peer is not None:
            redis_url = stack.enter_context(redis_server()).url
            observer = RedisCommands(redis_url)
            if "redis" in stores:
                urls["redis"] = redis_url
        if "dynamodb-local" in stores:
            urls["dynamodb-local"] = stack.enter_context(endpoint_server("dynamodb-local")).url
        versions = [f"Python {platform.python_version()}"]
        versions.append(f"redis-py {importlib.metadata.version('redis')}")
        if observer is not None:
            versions.append(f"redis-server {observer.server_version()}")
        if peer is not None:
            versions.append(f"throttled-py {peer}")
        console.print(", ".join(versions) + f"; --keys {keys}")
        console.print(stores_table(urls, observer, cycles, keys))
        if "redis" in urls:
            console.print(STORES_NOTES)
        if peer is not None and observer is not None:
            console.print(peer_table(redis_url, observer, cycles, keys))
            console.print(PEER_NOTES)
        elif not no_peer:
            console.print(
                "throttled-py is not installed: 'make benchmark-redis' installs it (constrained "
                "to the environment's redis-py) and runs this program with it."
            )


if __name__ == "__main__":
    main()
