"""RateLimitedTask with real ``celery worker`` processes (3 workers, prefork, -c 2).

Brokers: filesystem:// (no server), a private redis-server, and RabbitMQ at
127.0.0.1:5672 (required when CI=true, skipped with the reason elsewhere). The engine
runs on DynamoDB Local, and for the adherence test on the private redis-server as well
(``zae_store_url``). Start times come from the engine's clock (the moment the start was
counted), which is what a provider sees.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, group

from benchmarks import max_window_excess
from harness import fsbroker
from tests.celery.fleet import log_text, workers
from tests.conftest import Broker
from tests.helpers import eventually
from zae_celery.accounting.runs import LimitTotals, list_runs, read_run
from zae_celery.admission import LOOKAHEAD
from zae_celery.core import Limit, RateLimiter
from zae_celery.core.schema import bucket_key
from zae_celery.testing import LocalServer, free_port

pytestmark = pytest.mark.integration

RPS = 10


@dataclass
class Fleet:
    client: Celery
    prefix: str
    logs: Path
    table: str
    endpoint: str
    store_url: str | None = None
    """The workers' ``zae_store_url`` (instead of the table and endpoint), if any."""
    env: dict[str, str] = field(default_factory=dict)
    """What the workers' environment adds (``tests.celery.app`` reads its settings there):
    another process that loads the app, such as Flower, needs the same."""

    def limiter(self) -> RateLimiter:
        """A limiter on the fleet's buckets: its DynamoDB table, or its store URL."""
        if self.store_url is not None:
            return RateLimiter.from_url(self.store_url)
        return RateLimiter(self.table, endpoint_url=self.endpoint)

    def queue(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def send(self, task: str, queue: str, *args: Any) -> Any:
        return self.client.send_task(
            f"tests.celery.app.{task}", args=list(args), queue=self.queue(queue)
        )

    def collect(self, results: list[Any], timeout: float = 180) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for r in results:
            try:
                out.append(r.get(timeout=max(1.0, deadline - time.monotonic())))
            except Exception as exc:
                tail = log_text(self.logs)[-4000:]
                raise AssertionError(f"task {r.id} failed: {exc!r}\n{tail}") from exc
        return out


def redis_store_url(server: LocalServer, db: int = 1) -> str:
    """A Redis store on ``server`` (database ``db``) under a prefix of its own."""
    return f"redis://127.0.0.1:{server.port}/{db}?prefix=zae-test-{uuid.uuid4().hex[:10]}"


def _start_fleet(
    broker: Broker,
    ddb: LocalServer | None,
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,
    pool: str = "prefork",
    endpoint: str | None = None,
    concurrency: int = 2,
    store_url: str | None = None,
    queues: tuple[str, ...] = ("limited", "shared", "other", "provider"),
    count: int = 3,
) -> Generator[Fleet, None, None]:
    """``count`` workers consuming ``queues`` (names without the fleet's prefix), with
    their buckets in a fresh table of ``ddb`` (through ``endpoint`` if given), or at
    ``store_url`` (``zae_store_url``; nothing to create, its keys are deleted when the
    workers have stopped)."""
    prefix = f"t{uuid.uuid4().hex[:6]}-"
    table = f"zae-celery-{uuid.uuid4().hex[:8]}"
    if store_url is not None:
        where = {"ZAE_TEST_STORE_URL": store_url}
        table_endpoint = ""
    else:
        assert ddb is not None
        RateLimiter(table, endpoint_url=ddb.url).create_table()
        table_endpoint = ddb.url
        where = {"ZAE_TEST_ENDPOINT": endpoint or ddb.url, "ZAE_TEST_TABLE": table}
    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    env = {
        "ZAE_TEST_BROKER": broker.url,
        "ZAE_TEST_BACKEND": backend,
        "ZAE_TEST_DATA": str(broker.data),
        **where,
        "ZAE_TEST_PREFIX": prefix,
        "ZAE_TEST_RPS": str(RPS),
        **(extra_env or {}),
    }
    client = Celery("client", broker=broker.url, backend=backend)
    if broker.name == "filesystem":
        fsbroker.register()  # before the client's first connection
        client.conf.broker_transport_options = fsbroker.transport_options(broker.data)
    names = ",".join(f"{prefix}{q}" for q in queues)
    logs = tmp_path / "logs"
    try:
        with workers(env, logs, count=count, concurrency=concurrency, queues=names, pool=pool):
            yield Fleet(client, prefix, logs, table, table_endpoint, store_url, env)
    finally:  # also when the test closes the generator
        if store_url is not None:
            RateLimiter.from_url(store_url).delete_table()  # every key of the prefix
    if broker.name == "rabbitmq":
        with client.connection_for_write() as conn:
            for q in names.split(","):
                conn.default_channel.queue_delete(q)


@pytest.fixture
def fleet(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[Fleet]:
    yield from _start_fleet(broker, ddb_local, tmp_path)


@pytest.mark.parametrize(
    "mode",
    [
        # The default: the consumer admits each task at its slot; nothing is republished.
        pytest.param({}, id="admission"),
        # Gated in the pool (zae_admission=False): close slots are waited for in place.
        pytest.param({"ZAE_TEST_ADMISSION": "0"}, id="pool-wait-in-place"),
        # Gated in the pool, most refused tasks republished to their slot; some that
        # arrive late together are republished once more rather than wait beyond 0.2 s.
        pytest.param(
            {"ZAE_TEST_ADMISSION": "0", "ZAE_TEST_START_WAIT": "0.2"}, id="pool-republish"
        ),
    ],
)
def test_adherence_without_retry_storm(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path, mode: dict[str, str]
) -> None:
    gen = _start_fleet(broker, ddb_local, tmp_path, mode)
    fleet = next(gen)
    try:
        infos = fleet.collect([fleet.send("limited", "limited", i) for i in range(100)])
    finally:
        gen.close()
    _check_adherence(infos, mode)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_adherence_on_the_redis_store(broker: Broker, redis: LocalServer, tmp_path: Path) -> None:
    """The batch and bounds of test_adherence_without_retry_storm (admission) with the
    buckets on the private redis-server (``zae_store_url``, database 1, a prefix of the
    test's own) instead of DynamoDB Local. On the redis broker the same server is the
    broker (database 0): everything on one Redis."""
    gen = _start_fleet(broker, None, tmp_path, store_url=redis_store_url(redis))
    fleet = next(gen)
    try:
        infos = fleet.collect([fleet.send("limited", "limited", i) for i in range(100)])
        # The buckets the workers used are under the prefix (there is no table at all).
        used = {(b.resource, b.limit_name) for b in fleet.limiter().buckets("default")}
        assert ("adherence", "rps") in used, used
    finally:
        gen.close()
    _check_adherence(infos, {})


def _check_adherence(infos: list[dict[str, Any]], mode: dict[str, str]) -> None:
    """What a batch of ``limited`` tasks must show in ``mode`` (extra worker env)."""
    n = len(infos)
    starts = sorted(round(info["start"] * 1000) for info in infos)
    excess = max_window_excess(starts, RPS, RPS)
    assert excess <= 0, f"starts exceeded capacity + rate*W by {excess}"
    republishes = sum(info["deferrals"] for info in infos) / n
    if "ZAE_TEST_ADMISSION" not in mode:
        assert republishes <= 0.05, republishes
    elif "ZAE_TEST_START_WAIT" not in mode:
        assert republishes <= 1.0, republishes
    else:  # the deferral path really ran, without a storm (a republished start that
        # arrives late takes a fresh start slot, and may be republished to it once more)
        assert 0.5 <= republishes <= 3.0, republishes
    assert all(info["retries"] == 0 for info in infos)  # max_retries=0 was never used
    assert len({info["pid"] for info in infos}) >= 3  # several worker processes took part
    span = (starts[-1] - starts[0]) / 1000
    utilization = (n - RPS) / (span * RPS)
    # Republished messages queue behind the rest of the initial batch and arrive late
    # (about 1-2 s here); the benchmark measures utilization on a longer batch. Alone,
    # every mode gets 0.97-1.00 here; one fresh-clone run of the whole suite got 0.73
    # (a stall of about 5 s of wall time), so the bound catches a fleet running at half
    # its rate, not a machine's pause.
    assert utilization >= 0.6, f"achieved {utilization:.2f} of the configured rate"


def test_reconciliation_debt_delays_later_tasks(fleet: Fleet) -> None:
    # tpm: 1000 tokens/s, bucket 1000. Each task estimates 100 tokens and reports 300.
    # Granted but not yet reported: the 6 pool processes' tasks, and (admission) the
    # slots their consumers hold ahead, up to LOOKAHEAD per process in all.
    n, estimate, actual, rate, burst, in_flight = 20, 100, 300, 1000, 1000, LOOKAHEAD * 6
    infos = fleet.collect([fleet.send("reconciled", "limited", actual) for _ in range(n)])
    starts = sorted(info["start"] for info in infos)
    span = starts[-1] - starts[0]
    # On estimates alone the bucket would let all 20 start within 1 s. With the debt of
    # each reported task (+200), the last start waits until the bucket has refilled
    # everything reported before it: at most `in_flight` tasks were still running then.
    at_least = (estimate * n + (actual - estimate) * (n - 1 - in_flight) - burst) / rate
    exactly = (estimate * n + (actual - estimate) * (n - 1) - burst) / rate
    assert span >= at_least, (span, at_least)
    assert span <= exactly + 1.5, (span, exactly)  # late messages may add a little


def test_refunds_reach_the_buckets_through_the_workers_main_processes(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path
) -> None:
    # Each task estimates 100 tokens and reports 40: refunds alone, which each pool child
    # hands to its worker's main process (zae_settle_delay, on by default), which holds
    # them for its next grants or writes them. One task's pool process is killed right
    # after its run: what it handed over is not lost. Once the workers have stopped
    # (warm shutdown: the rest is written), the counter shows exactly the usage.
    n, actual = 12, 40
    fleet_run = _start_fleet(broker, ddb_local, tmp_path)
    fleet = next(fleet_run)
    limiter = fleet.limiter()
    try:
        killed = fleet.send("reconciled_then_killed", "limited", actual)
        fleet.collect([killed])  # its result was stored before the kill
        fleet.collect([fleet.send("reconciled", "limited", actual) for _ in range(n)])
    finally:
        fleet_run.close()  # stops the workers
    assert "SIGKILL" in log_text(fleet.logs)  # the worker saw its pool process killed
    tpm = {b.limit_name: b for b in limiter.buckets("default", "reconcile")}["tpm"]
    assert tpm.charged == actual * (n + 1)
    assert "hand a refund" not in log_text(fleet.logs)  # none was settled in a child


def test_a_chord_is_one_run_in_the_run_log(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path
) -> None:
    # A pipeline's entry task (a plain task: the test app's task_cls is RateLimitedTask)
    # starts a chord of n reconciled tasks (each estimates 100
    # tpm, reports 40) and its body (reports one token per result): all of them carry
    # the entry task's id as root_id, and once the workers have stopped (each process
    # writes what it holds) the run's report says exactly what the buckets were
    # charged. A group sent from outside any task (Celery gives its members no common
    # root_id) is one run under its group id; a task that names its run (rate_run) and
    # fails lands in that run.
    n, actual = 6, 40
    fleet_run = _start_fleet(broker, ddb_local, tmp_path)
    fleet = next(fleet_run)
    limiter = fleet.limiter()
    queue = fleet.queue("limited")
    try:
        entry = fleet.send("orchestrate", "limited", n, actual)
        (body_id,) = fleet.collect([entry])
        (info,) = fleet.collect([fleet.client.AsyncResult(body_id)])
        members = [
            fleet.client.signature("tests.celery.app.reconciled", args=(actual,), queue=queue)
            for _ in range(3)
        ]
        grouped = group(members).apply_async()
        fleet.collect(list(grouped.results))
        named = fleet.client.send_task(
            "tests.celery.app.in_named_run",
            args=(actual,),
            kwargs={"batch": "batch-7", "fail": True},
            queue=queue,
        )
        with pytest.raises(RuntimeError):
            named.get(timeout=60, propagate=True)
    finally:
        fleet_run.close()  # stops the workers: each process writes its run log
    assert info["root_id"] == entry.id
    report = read_run(limiter.client, fleet.table, entry.id)
    assert report is not None, log_text(fleet.logs)[-3000:]
    # The entry task (no limits of its own), the header and the body; not chord_unlock.
    assert (report.tasks, report.started, report.succeeded, report.failed) == (n + 2,) * 3 + (0,)
    assert report.limits["rpm"] == LimitTotals(n + 1, n + 1)
    assert report.limits["tpm"] == LimitTotals(100 * (n + 1), actual * n + n)
    assert report.buckets == ["default/reconcile"]
    assert report.first_start and report.last_start and report.first_start <= report.last_start
    assert report.wait_p50 <= report.wait_p99 <= report.wait_total
    in_group = read_run(limiter.client, fleet.table, grouped.id)
    assert in_group is not None and (in_group.tasks, in_group.succeeded) == (3, 3)
    other = read_run(limiter.client, fleet.table, "batch-7")
    assert other is not None
    assert (other.tasks, other.failed, other.limits["tpm"].charged) == (1, 1, actual)
    # The buckets agree with the three runs' books.
    tpm = {b.limit_name: b for b in limiter.buckets("default", "reconcile")}["tpm"]
    books = (report, in_group, other)
    assert tpm.charged == sum(r.limits["tpm"].charged for r in books)
    day = report.first_start.date()
    listed = {e.run for e in list_runs(limiter.client, fleet.table, day, day)}
    assert {entry.id, grouped.id, "batch-7"} <= listed


def test_a_bucket_spread_over_shards_holds_the_fleet_to_the_whole(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path
) -> None:
    # rpm: RPS a second over 2 shards; each task estimates 100 tpm and reports 40 (its
    # refund travels to its worker's main process with the lease's shard). The starts
    # keep to the whole bucket, and once the workers stopped every shard's counters
    # add up to exactly the usage.
    n, actual = 30, 40
    fleet_run = _start_fleet(broker, ddb_local, tmp_path)
    fleet = next(fleet_run)
    limiter = fleet.limiter()
    try:
        infos = fleet.collect([fleet.send("spread", "limited", actual) for _ in range(n)])
    finally:
        fleet_run.close()
    starts = sorted(round(info["start"] * 1000) for info in infos)
    assert max_window_excess(starts, RPS, RPS) <= 0
    assert starts[-1] - starts[0] >= (n - RPS) * 1000 // RPS - 50  # the whole rate held
    from tests.celery import app as test_app

    limits = test_app.app.tasks["tests.celery.app.spread"].rate_limits
    rows = {b.limit_name: b for b in limiter.buckets("default", "spread", limits)}
    assert (rows["rpm"].charged, rows["tpm"].charged) == (n, actual * n)
    for index in range(2):  # both shards granted, each under its own partition key
        key = bucket_key("default", f"spread#{index}")
        item = limiter.client.get_item(TableName=fleet.table, Key=key, ConsistentRead=True)
        assert key["PK"]["S"] == f"E#default#spread#{index}" and "Item" in item


def test_queue_limits_are_shared_by_task_types(fleet: Fleet) -> None:
    # Queue "shared" allows 5/s with a bucket of 5, whatever the task type.
    results = [fleet.send("on_queue_a", "shared") for _ in range(15)]
    results += [fleet.send("on_queue_b", "shared") for _ in range(15)]
    other = [fleet.send("on_queue_a", "other") for _ in range(15)]
    shared_starts = sorted(round(i["start"] * 1000) for i in fleet.collect(results))
    assert max_window_excess(shared_starts, 5, 5) <= 0
    other_infos = fleet.collect(other)
    assert all(i["deferrals"] == 0 for i in other_infos)  # another queue is not limited
    span = (shared_starts[-1] - shared_starts[0]) / 1000
    assert span >= (30 - 5) / 5 - 0.05  # 25 tasks beyond the bucket at 5/s


class _Provider:
    """An HTTP provider with fixed windows: ``allowed`` requests per ``window`` seconds,
    then 429 with ``Retry-After`` = the time left in the window (as real providers do)."""

    def __init__(self, allowed: int, window: float) -> None:
        self.allowed = allowed
        self.window = window
        self.window_start: float | None = None
        self.count = 0
        self.accepted: list[float] = []
        self.rejections: list[float] = []
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                retry_after = provider.admit(time.time())
                if retry_after is None:
                    body = json.dumps({"usage": {"total_tokens": 42}}).encode()
                    self.send_response(200)
                else:
                    body = b'{"error": "rate limited"}'
                    self.send_response(429)
                    self.send_header("Retry-After", f"{retry_after:.3f}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def admit(self, now: float) -> float | None:
        """None when the request is accepted, else the seconds left in the window."""
        with self.lock:
            if self.window_start is None or now >= self.window_start + self.window:
                self.window_start, self.count = now, 0
            if self.count < self.allowed:
                self.count += 1
                self.accepted.append(now)
                return None
            self.rejections.append(now)
            return self.window_start + self.window - now

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1/chat"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider() -> Iterator[_Provider]:
    # The task is configured for 20/s; the provider takes 25 per 3 s (about 8/s).
    p = _Provider(allowed=25, window=3.0)
    yield p
    p.close()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_provider_429_makes_the_fleet_back_off(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path, provider: _Provider
) -> None:
    gen = _start_fleet(broker, ddb_local, tmp_path, {"ZAE_TEST_PROVIDER": provider.url})
    fleet = next(gen)
    try:
        infos = fleet.collect([fleet.send("call_provider", "provider", i) for i in range(40)])
    finally:
        gen.close()
    print(f"provider: {len(provider.accepted)} accepted, {len(provider.rejections)} 429s")
    assert len(infos) == 40  # every task completed, the refused ones after deferral
    assert provider.rejections, "the provider was never exceeded: the test proves nothing"
    first = provider.rejections[0]
    # Bound: the requests already in flight when the first 429 came back (at most the
    # fleet's 6 pool processes), the slots consumers had admitted before the block (with
    # those, up to LOOKAHEAD per process: their starts were counted and are not checked
    # again), plus 2 granted before the block was written.
    assert len(provider.rejections) <= LOOKAHEAD * 6 + 2, len(provider.rejections)
    # The fleet waits for the provider's window: no request between the 429 burst and it.
    window_end = first + (provider.window - (first - provider.accepted[0]) % provider.window)
    quiet = [t for t in provider.accepted if first + 0.5 < t < window_end - 0.05]
    assert quiet == []
    assert "provider 429" in log_text(fleet.logs)


def test_task_cls_makes_plain_tasks_share_their_queue_limit(fleet: Fleet) -> None:
    infos = fleet.collect([fleet.send("plain", "shared") for _ in range(15)])
    starts = sorted(round(i["start"] * 1000) for i in infos)
    assert max_window_excess(starts, 5, 5) <= 0
    assert starts[-1] - starts[0] >= (15 - 5) * 1000 // 5 - 50  # the queue's 5/s held it


def test_celery_rate_limit_string_becomes_global(fleet: Fleet) -> None:
    from tests.celery import app as test_app

    task = test_app.app.tasks["tests.celery.app.celery_style"]
    assert task.rate_limit is None  # no per-worker bucket: the limit is global instead
    assert task._global_rate_limit == Limit.custom("rate_limit", 1, 5, 1)
    infos = fleet.collect([fleet.send("celery_style", "limited") for _ in range(15)])
    starts = sorted(round(i["start"] * 1000) for i in infos)
    # Six pool processes, one global bucket of one token refilled 5 times a second.
    assert max_window_excess(starts, 1, 5) <= 0


@pytest.mark.parametrize("pool", ["solo", "threads"])
@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_other_pools_share_the_limit(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path, pool: str
) -> None:
    gen = _start_fleet(broker, ddb_local, tmp_path, pool=pool)
    fleet = next(gen)
    try:
        infos = fleet.collect([fleet.send("limited", "limited", i) for i in range(40)])
    finally:
        gen.close()
    starts = sorted(round(i["start"] * 1000) for i in infos)
    assert max_window_excess(starts, RPS, RPS) <= 0
    assert sum(i["deferrals"] for i in infos) / len(infos) <= 1.0


BAD_INPUT = [
    ("consume_raises", "rate_consume: the callable raised ZeroDivisionError"),
    ("consume_not_a_dict", "rate_consume: must return a dict"),
    ("consume_beyond_burst", "requests 11 tokens but the bucket holds at most 10"),
    ("entity_raises", "rate_entity: the callable raised KeyError"),
    ("report_unknown", "report_usage.tokens: is not a limit of this task"),
]


@pytest.mark.parametrize("broker", ["filesystem"], indirect=True)
def test_bad_input_fails_clearly_and_charges_nothing(fleet: Fleet) -> None:
    results = [(fleet.send(name, "limited"), message) for name, message in BAD_INPUT]
    for result, message in results:
        with pytest.raises(Exception) as failed:
            result.get(timeout=60, propagate=True)
        assert message in str(failed.value), (message, failed.value)
        assert result.state == "FAILURE"
    limiter = RateLimiter(fleet.table, endpoint_url=fleet.endpoint)
    tokens = limiter.available("default", "bad", [Limit.per_second("rps", 10)])
    assert tokens == {"rps": 10.0}  # nothing was charged (report_unknown was refunded)
    assert "zae-celery deferred" not in log_text(fleet.logs)  # no deferral loop


@pytest.mark.parametrize("broker", ["filesystem"], indirect=True)
def test_unreachable_endpoint_defers_then_fails_after_max_deferrals(
    broker: Broker, ddb_local: LocalServer, tmp_path: Path
) -> None:
    gen = _start_fleet(
        broker,
        ddb_local,
        tmp_path,
        {"ZAE_TEST_UNAVAILABLE_RETRY": "0.2"},
        endpoint=f"http://127.0.0.1:{free_port()}",
    )
    fleet = next(gen)
    try:
        result = fleet.send("few_deferrals", "limited")
        with pytest.raises(Exception) as failed:
            result.get(timeout=120, propagate=True)
    finally:
        gen.close()
    assert "deferred 2 times" in str(failed.value)
    assert log_text(fleet.logs).count("rate limiter unavailable (deferral") == 2


@pytest.mark.parametrize("broker", ["filesystem"], indirect=True)
def test_rate_on_error_policies(fleet: Fleet) -> None:
    from tests.celery.app import TWO_LIMITS

    expected = {
        "fails_keep": ("fails-keep", {"rpm": 100 - 1, "tpm": 10_000 - 400}),
        "fails_refund": ("fails-refund", {"rpm": 100, "tpm": 10_000}),
        "fails_keep_rpm": ("fails-keep-rpm", {"rpm": 100 - 1, "tpm": 10_000}),
    }
    results = {name: fleet.send(name, "limited") for name in expected}
    for result in results.values():
        with pytest.raises(Exception, match="provider call failed"):
            result.get(timeout=60, propagate=True)
    limiter = RateLimiter(fleet.table, endpoint_url=fleet.endpoint)
    for resource, tokens in expected.values():
        # The result is stored before after_return settles the lease: wait for the
        # bucket to show the policy's outcome (its refill takes a year: it cannot drift).
        deadline = time.monotonic() + 30
        while True:
            left = limiter.available("default", resource, TWO_LIMITS)
            if {k: round(v) for k, v in left.items()} == tokens or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # polling the table: the worker sends no event for it
        assert {k: round(v) for k, v in left.items()} == tokens, resource


@pytest.mark.parametrize("broker", ["filesystem"], indirect=True)
def test_an_async_task_function_runs_with_its_lease_in_the_worker(fleet: Fleet) -> None:
    from tests.celery.app import ESTIMATE, TWO_LIMITS

    infos = fleet.collect([fleet.send("async_body", "limited", 250) for _ in range(3)])
    for info in infos:
        assert info["start"] is not None  # gated like any rate-limited task
        assert info["held_after_await"] == ESTIMATE  # the lease held across the await
        assert info["kept"] == {"rpm": 1, "tpm": 250}  # reported from the coroutine
    limiter = RateLimiter(fleet.table, endpoint_url=fleet.endpoint)

    def left() -> dict[str, int]:  # refilled once a year; refunds land within 1 s
        available = limiter.available("default", "async-body", TWO_LIMITS)
        return {k: round(v) for k, v in available.items()}

    expected = {"rpm": 100 - 3, "tpm": 10_000 - 750}
    assert eventually(left, expected) == expected
