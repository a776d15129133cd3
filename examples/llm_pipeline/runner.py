"""``make demo``: start everything on 127.0.0.1, run the batch, report, stop everything."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import click
from celery import Celery, group
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from examples.llm_pipeline import report
from examples.llm_pipeline.workload import Prompt, batch, bucket_size, estimate_tokens
from harness import fsbroker as fs_broker
from harness.provider import LocalProvider, billed_usage
from harness.stores import is_redis, where, with_run_prefix
from harness.workers import FleetError, signals_held, worker_fleet
from zae_celery import RateLimiter, ValidationError
from zae_celery.accounting.runs import read_run
from zae_celery.testing import (
    CountingProxy,
    LocalServer,
    ServerUnavailable,
    moto_server,
    redis_script_calls,
    use_local_credentials,
)

REPO = Path(__file__).resolve().parents[2]
APP = "examples.llm_pipeline.app"
TASKS = {"zae": f"{APP}.complete", "builtin": f"{APP}.complete_builtin"}
SEED = 7


class _Latency(TypedDict):
    """LocalProvider's latency arguments (typed, so they can be passed as ``**LATENCY``)."""

    latency_median: float
    latency_sigma: float
    seconds_per_token: float


# The provider's latency: log-normal (median 0.25 s, sigma 0.5) plus 1.5 ms per completion
# token, roughly a real model's shape, compressed so the demo fits in two minutes.
LATENCY: _Latency = {"latency_median": 0.25, "latency_sigma": 0.5, "seconds_per_token": 0.0015}
LIVE_WINDOW = 10.0
"""Seconds of the provider's records behind the live rates."""


class Run:
    """The run folder: logs, broker, results, the PID file, the report and the chart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.pids: dict[str, Any] = {"runner": os.getpid(), "moto": None, "workers": []}

    def record_pids(self, **pids: Any) -> None:
        """Write ``pids.json`` (atomically): every process this run started and still runs."""
        self.pids.update(pids)
        staging = self.folder / ".pids.json.tmp"
        staging.write_text(json.dumps(self.pids))
        os.replace(staging, self.folder / "pids.json")


def _broker(broker: str, folder: Path) -> tuple[str, str, dict[str, Any] | None, dict[str, str]]:
    """Broker URL, backend URL, transport options and worker environment of one mode."""
    if broker == "filesystem":
        fs_broker.register()
        (folder / "results").mkdir(parents=True, exist_ok=True)
        options = fs_broker.transport_options(folder / "broker")
        url, backend = f"{fs_broker.SCHEME}://", f"file://{folder / 'results'}"
        return url, backend, options, {"ZAE_DEMO_BROKER_DIR": str(folder / "broker")}
    return broker, broker, None, {}


def _live_rates(provider: LocalProvider, since: float, rpm: int, tpm: int) -> str:
    now = time.time()
    recent = [r for r in provider.records if r.at > now - LIVE_WINDOW]
    span = max(0.5, min(LIVE_WINDOW, now - since))
    ok = [r for r in recent if r.status == 200]
    rejected = sum(1 for r in provider.records if r.status != 200)
    rate = len(ok) / span * 60
    tokens = sum(r.total_tokens for r in ok) / span * 60
    colour = "red" if rejected else "green"
    return (
        f"rpm {rate:4.0f}/{rpm}  tpm {tokens / 1000:5.1f}k/{tpm / 1000:.1f}k  "
        f"[{colour}]429s {rejected}[/]"
    )


def _exact(prompt: Prompt) -> int:
    """The tokens the local provider will bill for ``prompt`` (its bill is seeded)."""
    return billed_usage(prompt.prompt, prompt.max_tokens, SEED).total_tokens


def run_mode(
    mode: str,
    prompts: list[Prompt],
    config: report.Config,
    endpoint: str | None,
    run: Run,
    console: Console,
    store: str | None = None,
) -> report.ModeRun:
    """One batch on fresh workers, provider, queue (and, for zae-celery, table): in the
    DynamoDB ``endpoint``, or with ``store`` (a redis URL) under a key prefix of the
    run's own, deleted at the end."""
    label = report.MODES[mode]
    tag = uuid.uuid4().hex[:8]
    folder = run.folder / mode
    queue, table = f"llm-{mode}-{tag}", f"zae-demo-{tag}"
    broker, backend, options, env = _broker(config.broker, folder)
    client = Celery("llm-pipeline-runner", broker=broker, backend=backend)
    client.conf.broker_connection_retry_on_startup = True
    if options is not None:
        client.conf.broker_transport_options = options
    if store is not None:  # nothing to create: the engine stamps the schema on first use
        store_url = with_run_prefix(store, f"demo-{tag}")
        limiter = RateLimiter.from_url(store_url)
    else:
        assert endpoint is not None
        limiter = RateLimiter(table, endpoint_url=endpoint)
        if mode == "zae":
            limiter.create_table()
    provider = LocalProvider(
        config.rpm,
        config.tpm,
        window=config.window,
        slack_requests=1,
        slack_tokens=config.slack_tokens,
        seed=SEED,
        **LATENCY,
    )
    result = report.ModeRun(mode, submitted_at=0.0)
    closing: list[Any] = []
    if store is not None:  # the server counts the script calls of every worker process
        scripts_before = redis_script_calls(store_url)

        def count_requests() -> None:
            result.redis_scripts = redis_script_calls(store_url) - scripts_before

        env["ZAE_DEMO_STORE_URL"] = store_url
    else:
        assert endpoint is not None
        proxy = CountingProxy(endpoint)  # counts the requests of every worker process
        closing.append(proxy.close)

        def count_requests() -> None:
            result.dynamodb.update(proxy.snapshot())

        env.update(ZAE_DEMO_ENDPOINT=proxy.url, ZAE_DEMO_TABLE=table)
    env.update(
        ZAE_DEMO_BROKER=broker,
        ZAE_DEMO_BACKEND=backend,
        ZAE_DEMO_PROVIDER=provider.url,
        ZAE_DEMO_RPM=str(config.rpm),
        ZAE_DEMO_TPM=str(config.tpm),
        ZAE_DEMO_WINDOW=str(config.window),
    )
    with contextlib.ExitStack() as stack:
        for close in closing:
            stack.callback(close)
        stack.callback(count_requests)  # once the workers below are stopped
        stack.callback(provider.stop)
        stack.callback(run.record_pids, workers=[])  # once the workers below are stopped
        with console.status(f"{label}: starting {config.workers} celery workers"):
            workers = stack.enter_context(
                worker_fleet(
                    APP,
                    count=config.workers,
                    queues=[queue],
                    logs=folder / "logs",
                    concurrency=config.concurrency,
                    env=env,
                    cwd=REPO,
                    name=f"{mode}-",
                )
            )
        run.record_pids(workers=[w.pid for w in workers])
        provider.start()
        result.submitted_at = time.time()
        signatures = [
            client.signature(
                TASKS[mode],
                kwargs={
                    "prompt_id": p.id,
                    "kind": p.kind,
                    "prompt": p.prompt,
                    "max_tokens": p.max_tokens,
                    **({"estimate": _exact(p)} if config.exact_estimates else {}),
                },
                queue=queue,
            )
            for p in prompts
        ]
        batch_result = group(signatures, app=client).apply_async()
        pending = list(batch_result.results)
        try:
            _collect(pending, result, provider, config, label, console)
        except KeyboardInterrupt:
            result.interrupted = True
            raise
        finally:
            # Unsubscribe while the broker still runs (redis: a result left pending
            # would try from its finalizer, after the server is gone).
            if hasattr(client.backend, "remove_pending_result"):
                for item in pending:
                    with contextlib.suppress(Exception):
                        client.backend.remove_pending_result(item)
            result.records = provider.records
            with contextlib.suppress(Exception):
                client.close()
    if mode == "zae" and store is None:  # the workers have stopped: their run logs are in
        # The batch is a group sent from here: its tasks' run is the group's id.
        books = read_run(limiter.client, table, batch_result.id)
        if books is not None:
            result.books = books.to_dict()
            result.books["run_log_writes"] = _run_log_writes(limiter, table, batch_result.id)
    if mode == "zae" or store is not None:  # a worker stamps a Redis store's schema
        with contextlib.suppress(Exception):
            limiter.delete_table()  # the table, or every key of the run's prefix
    return result


def _run_log_writes(limiter: RateLimiter, table: str, run: str) -> int:
    """The writes the workers' run logs made for ``run``: one per flush item, and one
    marker per writing process (the writer is in each flush's sort key)."""
    keys = limiter.client.query(
        TableName=table,
        KeyConditionExpression="PK = :pk",
        ExpressionAttributeValues={":pk": {"S": f"R#{run}"}},
        ProjectionExpression="SK",
    )["Items"]
    writers = {item["SK"]["S"].split("#")[1] for item in keys}
    return len(keys) + len(writers)


def _collect(
    pending: list[Any],
    result: report.ModeRun,
    provider: LocalProvider,
    config: report.Config,
    label: str,
    console: Console,
) -> None:
    """Poll the results until every task is done (or the deadline), with a live view."""
    expected = max(config.tasks / config.rpm, config.estimated_tokens / config.tpm) * 60
    deadline = time.monotonic() + 3 * expected + 120
    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rates]}"),
    )
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        bar = progress.add_task(label, total=len(pending), rates="")
        while pending:
            still = []
            for item in pending:
                if not item.ready():
                    still.append(item)
                elif item.successful():
                    result.results.append(item.result)
                else:
                    result.failures.append(f"{item.id}: {item.result!r}")
            pending[:] = still
            rates = _live_rates(provider, result.submitted_at, config.rpm, config.tpm)
            progress.update(bar, completed=config.tasks - len(pending), rates=rates)
            if pending and time.monotonic() > deadline:
                result.failures.extend(f"{item.id}: not done by the deadline" for item in pending)
                break
            if pending:
                time.sleep(0.25)  # the live view's refresh: results are polled


@contextlib.contextmanager
def _endpoint(run: Run, console: Console) -> Iterator[LocalServer]:
    # zae_celery.testing stops a server once it serves: Ctrl-C while it starts is held.
    with console.status("starting the DynamoDB endpoint (moto server)"), signals_held():
        stack = contextlib.ExitStack()
        server = stack.enter_context(moto_server(log_dir=run.folder / "servers"))
    with stack:
        run.record_pids(moto=server.pid)
        try:
            yield server
        finally:
            run.record_pids(moto=None)


def _default_run_dir() -> Path:
    root = Path(os.environ.get("ZAE_CACHE_DIR") or ".cache")
    return root / "demo" / time.strftime("run-%Y%m%d-%H%M%S")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tasks", default=300, show_default=True, help="Prompts in the batch (a group).")
@click.option("--workers", default=3, show_default=True, help="celery worker processes.")
@click.option("--concurrency", default=3, show_default=True, help="Prefork pool size per worker.")
@click.option(
    "--rpm", default=480, show_default=True, help="Requests per minute (client limit = provider's)."
)
@click.option(
    "--tpm",
    default=150_000,
    show_default=True,
    help="Tokens per minute (client limit = provider's).",
)
@click.option(
    "--window",
    default=2.0,
    show_default=True,
    help="Seconds of each limit a bucket holds (the burst), on both sides.",
)
@click.option(
    "--compare",
    is_flag=True,
    help="Run the batch again with Celery's per-worker rate_limit at the same rpm.",
)
@click.option(
    "--exact-estimates",
    is_flag=True,
    help="Each task estimates exactly the tokens it will be billed (the local provider's "
    "bill is known from its seed): no usage to reconcile, the engine's floor of requests.",
)
@click.option(
    "--broker",
    default="filesystem",
    show_default=True,
    help="'filesystem' (no server; atomic filesystem transport) or a redis:// URL.",
)
@click.option(
    "--store",
    metavar="URL",
    default=None,
    help="Put the buckets on this Redis (redis://HOST:PORT/DB, rediss://, "
    "redis+cluster://HOST:PORT) instead of DynamoDB in a moto server. Nothing to create: "
    "each run takes a key prefix of its own (<the URL's prefix or zae>-demo-<tag>) and "
    "deletes its keys at the end.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of this run: logs, pids.json, report and chart "
    "[default: $ZAE_CACHE_DIR or .cache, then demo/run-<time>].",
)
@click.option(
    "--report-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report's figures here [default: <run-dir>/report.json].",
)
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save the chart (PNG) here [default: <run-dir>/demo.png].",
)
def main(
    tasks: int,
    workers: int,
    concurrency: int,
    rpm: int,
    tpm: int,
    window: float,
    compare: bool,
    exact_estimates: bool,
    broker: str,
    store: str | None,
    run_dir: Path | None,
    report_json: Path | None,
    chart: Path | None,
) -> None:
    """A rate-limited batch LLM pipeline, end to end, on 127.0.0.1.

    Starts a moto server (the DynamoDB table; with --store, the buckets are on that
    Redis instead), a broker (a folder, or the redis given),
    WORKERS real `celery worker` processes and a local LLM provider that enforces RPM and
    TPM itself (429 + Retry-After beyond them). Submits TASKS prompts from
    examples/llm_pipeline/prompts.jsonl as one Celery group: each task estimates its
    tokens, is gated by zae-celery's shared buckets, calls the provider and reports the
    tokens it was billed. Shows live progress, then a report and a chart of requests/s
    and tokens/s against the limits. Everything is stopped at the end, Ctrl-C included.
    Exit code 0 when every task completed (1 otherwise, 130 on Ctrl-C).
    """
    if min(tasks, workers, concurrency, rpm, tpm) < 1 or window <= 0:
        raise click.BadParameter("sizes and limits must be >= 1, --window > 0")
    if broker != "filesystem" and not broker.startswith(("redis://", "rediss://")):
        raise click.BadParameter("--broker is 'filesystem' or a redis:// URL")
    if store is not None:
        try:
            if not is_redis(store):
                raise click.BadParameter(
                    "a redis://HOST:PORT/DB URL (without --store: DynamoDB in a moto server)",
                    param_hint="--store",
                )
            with_run_prefix(store, "demo-00000000")  # a run's prefix fits in 64 characters
        except ValidationError as exc:
            raise click.BadParameter(exc.problem, param_hint="--store") from None
    prompts = batch(tasks)
    if exact_estimates:
        estimates = [_exact(p) for p in prompts]
    else:
        estimates = [estimate_tokens(p.prompt, p.max_tokens) for p in prompts]
    if max(estimates) > bucket_size(tpm, window):
        raise click.BadParameter(
            f"the tpm bucket ({bucket_size(tpm, window)} tokens = --tpm x --window / 60) must "
            f"hold the largest request's estimate ({max(estimates)} tokens)"
        )
    config = report.Config(
        tasks=tasks,
        workers=workers,
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        window=window,
        broker=broker,
        estimated_tokens=sum(estimates),
        slack_tokens=max(billed_usage(p.prompt, p.max_tokens, SEED).total_tokens for p in prompts),
        store="dynamodb" if store is None else where(store),
        exact_estimates=exact_estimates,
    )
    use_local_credentials()
    # SIGTERM unwinds like Ctrl-C: every worker and server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    console = Console() if sys.stdout.isatty() else Console(width=110)  # a log: room for the table
    run = Run(run_dir or _default_run_dir())
    runs: list[report.ModeRun] = []
    try:
        with contextlib.ExitStack() as servers:
            endpoint = None
            if store is None:
                endpoint = servers.enter_context(_endpoint(run, console)).url
            for mode in ("zae", "builtin") if compare else ("zae",):
                runs.append(run_mode(mode, prompts, config, endpoint, run, console, store))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: every process was stopped; logs in {run.folder}")
        sys.exit(130)
    except (FleetError, ServerUnavailable) as exc:
        raise click.ClickException(f"{exc}\n(logs in {run.folder})") from exc
    figures = [report.measure(r, config) for r in runs]
    console.print(report.table(figures, config))
    chart_path = report.chart(figures, config, chart or run.folder / "demo.png")
    json_path = report_json or run.folder / "report.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            {
                "config": {
                    **config.__dict__,
                    "rpm_bucket": config.rpm_bucket,
                    "tpm_bucket": config.tpm_bucket,
                },
                "runs": figures,
                "chart": str(chart_path),
                "run_dir": str(run.folder),
            },
            indent=1,
        )
    )
    for fig in figures:
        if fig["redis_scripts"] and fig["mode"] == "zae":
            console.print(
                f"{fig['label']} Redis script calls: {fig['redis_scripts']} (EVALSHA, counted "
                "by the server: any other client's scripts on it count too)"
            )
        if fig["dynamodb_by_operation"]:
            ops = ", ".join(f"{op} {n}" for op, n in fig["dynamodb_by_operation"].items())
            console.print(
                f"{fig['label']} DynamoDB requests: {ops} "
                f"({fig['dynamodb_condition_failed']} answered 'condition failed')"
            )
    console.print(f"chart: {chart_path}\nreport: {json_path}\nlogs: {run.folder}")
    if any(fig["completed"] < tasks for fig in figures):
        sys.exit(1)
