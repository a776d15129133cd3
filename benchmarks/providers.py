"""Provider benchmark: zae-celery against a provider that enforces its own limits, through
the official ``openai`` SDK, on real ``celery worker`` fleets.

    python -m benchmarks.providers [--scenario shared-key|openai|tenants|all] [--tasks N]
                                   [--workers 3] [--concurrency 3]
                                   [--broker redis|rabbitmq|filesystem] [--save FILE]

Every figure is counted from the local provider's own records (``harness.provider``):
arrival time, status, what its buckets were charged, and who each request was for (the
``user`` and ``metadata`` the tasks tag it with). The workers' app is
``benchmarks/provider_app.py`` (task ``chat``); the buckets are in DynamoDB Local, a
fresh table per run. Scenarios:

1. **shared-key**: the key is shared with a client zae-celery does not know of, so the
   provider allows 20 % less than the limits configured in zae-celery (600 rpm
   configured, 480 at the provider; tpm likewise, not binding). The batch runs three
   times: without header feedback (a 429 goes to ``provider_limited`` and the usage to
   ``report_usage``, the responses' rate-limit headers are never read); with it
   (``zae_celery.providers.openai.chat``), the headers stating the limit enforced; and
   with it while the headers state the configured 600 (the other client invisible but
   in ``remaining``). Printed: 429s per 1,000 requests, the time to converge
   (:data:`CONVERGED`), and the accepted rate against the provider's limit.
2. **openai**: RabbitMQ broker, ``task_acks_late``, ``worker_prefetch_multiplier=1``;
   long prompts and a large ``max_tokens`` so that tpm binds; the provider charges tpm
   at request time (``accounting="request"``), the task's ``rate_profile`` is
   ``"openai"``; the provider's limits equal the configured ones, with the demo's slack
   (one request, the largest request's tokens). Goals: 0 429s and a utilization of the
   tpm limit of at least 0.95 (:func:`steady_per_minute`). Exits non-zero when RabbitMQ
   does not answer at 127.0.0.1:5672.
3. **tenants**: three tenants (300 rpm each), each an entity under the provider key's
   entity with ``cascade=True`` (the key's 600 rpm stored for it), send through the SDK
   (``zae_celery.providers.openai.chat``) to a provider that allows half the key's
   configured limits (300 rpm) and closes the key for :data:`TENANTS_COOLDOWN` s after
   a 429 ("try again in 5 s"), so 429s happen and their retry-after is long.
   For each 429 (arrival t, retry-after r), the requests from any tenant that arrived
   in (t, t + r) are counted, and told apart by when their start was counted: before the
   block was written (admitted by a consumer, or started, before it), or after.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import celery as celery_pkg
import click
import openai
from rich.console import Console
from rich.table import Table

from benchmarks.celery import REPO, Setup, _client, _warm_endpoint, collect, endpoint_server
from benchmarks.provider_app import BLOCKED, RESOURCE
from examples.llm_pipeline.report import _peak_per_minute
from examples.llm_pipeline.workload import bucket_size, limits, load_prompts
from harness.provider import LocalProvider, ProviderRecord, billed_usage
from harness.workers import FleetError, log_text, signals_held, worker_fleet
from zae_celery.core import RateLimiter
from zae_celery.testing import ServerUnavailable, redis_server, use_local_credentials

APP = "benchmarks.provider_app"
TASK = f"{APP}.chat"
SCENARIOS = ("shared-key", "openai", "tenants")
SEED = 11
WINDOW = 2.0
"""Seconds of each limit a bucket holds, in zae-celery and at the provider alike."""
SHARE = 0.8
"""The part of the configured limits the provider allows when a key is shared."""
STEP = 10.0
"""Seconds of each window of the convergence measure."""
CONVERGED = 1
"""At most this many 429s in each 10 s window from then on: converged."""
LATENCY = {"latency_median": 0.1, "latency_sigma": 0.4, "seconds_per_token": 0.0004}
"""The provider's answer time: log-normal (median 0.1 s) plus 0.4 ms per completion token."""


# -- measures (pure) ------------------------------------------------------------------------------
def per_thousand(part: int, whole: int) -> float:
    """``part`` per 1,000 of ``whole`` (0 when there is none)."""
    return 1000 * part / whole if whole else 0.0


def convergence(
    sent: Sequence[float], refused: Sequence[float], step: float = STEP, allowed: int = CONVERGED
) -> float | None:
    """Seconds from the first request to the start of the first ``step``-second window
    (windows back to back from the first request) after which no window holds more than
    ``allowed`` 429s, up to the last request; 0 when none ever did, None when the last
    window still does (not converged)."""
    if not sent:
        return None
    first, last = min(sent), max(sent)
    count = max(1, math.ceil((last - first) / step + 1e-9))
    per_window = [0] * count
    for at in refused:
        per_window[min(count - 1, int((at - first) // step))] += 1
    bad = [k for k, n in enumerate(per_window) if n > allowed]
    if not bad:
        return 0.0
    if bad[-1] == count - 1:
        return None
    return (bad[-1] + 1) * step


def steady_per_minute(times: Sequence[float], amounts: Sequence[float]) -> float:
    """The amount per minute between the 10th and the 90th percentile of ``times`` (sorted
    accepted arrivals): the steady state, without the initial burst and the tail. The
    amount of the arrivals from the first of them up to, not including, the last."""
    first, last = len(times) // 10, len(times) - 1 - len(times) // 10
    if last <= first or times[last] <= times[first]:
        return math.nan
    return sum(amounts[first:last]) / (times[last] - times[first]) * 60


def in_block(records: Sequence[ProviderRecord], refused: ProviderRecord) -> list[ProviderRecord]:
    """The requests that arrived in (t, t + r) of a 429 at t with retry-after r."""
    assert refused.retry_after is not None
    end = refused.at + refused.retry_after
    return [r for r in records if refused.at < r.at < end]


# -- one run --------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every run of an invocation shares."""

    work: Path
    endpoint_url: str
    redis_port: int
    workers: int
    concurrency: int
    console: Console


@dataclass
class Run:
    """One batch: what the tasks returned, the provider's records, the blocks written."""

    label: str
    tasks: int
    submitted_at: float
    infos: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    records: list[ProviderRecord] = field(default_factory=list)
    blocks: dict[str, float] = field(default_factory=dict)
    """``<task id>/<deferrals>`` (one run of a task) -> when the block of its 429 had
    been written (the workers' log lines)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "tasks": self.tasks,
            "submitted_at": self.submitted_at,
            "infos": self.infos,
            "failures": self.failures,
            "records": [asdict(r) for r in self.records],
            "blocks": self.blocks,
        }


@dataclass(frozen=True)
class Plan:
    """A run's configuration: limits on both sides, the batch, the fleet's options."""

    label: str
    broker: str
    rpm: int
    """The task's own rpm (configured in zae-celery)."""
    tpm: int
    provider_rpm: int
    provider_tpm: int
    batch: list[dict[str, Any]]
    """The tasks' keyword arguments."""
    acks_late: bool = False
    prefetch: int | None = None
    prepare: Callable[[RateLimiter], None] | None = None
    """Entities and stored limits, written before the workers start."""
    cooldown: float = 0.0
    """Seconds a 429 closes the provider's key (LocalProvider's ``cooldown``)."""
    advertise: dict[str, int] | None = None
    """The limits the provider's headers state instead of those enforced."""


_BLOCK_LINE = re.compile(re.escape(BLOCKED) + r" (\S+/\d+) at (\d+\.\d+)")


def run_plan(bench: Bench, plan: Plan) -> Run:
    """One batch on fresh workers, provider, queue and table."""
    console = bench.console
    tag = uuid.uuid4().hex[:8]
    queue, table = f"pbench-{tag}", f"zae-pbench-{tag}"
    run_dir = bench.work / f"run-{tag}"
    limiter = RateLimiter(table, endpoint_url=bench.endpoint_url)
    _warm_endpoint(limiter)  # creates the table
    if plan.prepare is not None:
        plan.prepare(limiter)
    setup = Setup(
        len(plan.batch),
        bench.workers,
        bench.concurrency,
        max(1, plan.rpm // 60),
        max(1, plan.provider_rpm // 60),
        plan.broker,
        bench.endpoint_url,
        bench.redis_port,
        bench.work,
        prefetch=plan.prefetch,
        acks_late=plan.acks_late,
    )
    client, env = _client(setup, run_dir)
    largest = max(
        billed_usage(kw["prompt"], kw["max_tokens"], SEED).prompt_tokens + kw["max_tokens"]
        for kw in plan.batch
    )
    provider = LocalProvider(
        plan.provider_rpm,
        plan.provider_tpm,
        window=WINDOW,
        slack_requests=1,
        slack_tokens=largest,  # the demo's slack: the largest request's charge
        seed=SEED,
        accounting="request",
        cooldown=plan.cooldown,
        advertise=plan.advertise,
        **LATENCY,  # type: ignore[arg-type]
    )
    env.update(
        ZAE_BENCH_ENDPOINT=bench.endpoint_url,
        ZAE_BENCH_TABLE=table,
        ZAE_PB_PROVIDER=provider.base_url,
        ZAE_PB_RPM=str(plan.rpm),
        ZAE_PB_TPM=str(plan.tpm),
        ZAE_PB_WINDOW=str(WINDOW),
    )
    logs = run_dir / "logs"
    run = Run(plan.label, len(plan.batch), submitted_at=0.0)
    with contextlib.ExitStack() as stack:
        with console.status(f"{plan.label}: starting {bench.workers} workers"):
            stack.enter_context(
                worker_fleet(
                    APP,
                    count=bench.workers,
                    queues=[queue],
                    logs=logs,
                    concurrency=bench.concurrency,
                    env=env,
                    cwd=REPO,
                    name=f"pbench-{tag}-",
                )
            )
        stack.enter_context(provider)
        run.submitted_at = time.time()
        results = [client.send_task(TASK, kwargs=kw, queue=queue) for kw in plan.batch]
        expected = max(
            len(plan.batch) / plan.provider_rpm,
            sum(_charge(kw) for kw in plan.batch) / plan.provider_tpm,
        )
        deadline = time.monotonic() + 3 * expected * 60 + 60
        collect(console, plan.label, client, results, deadline, run.infos, run.failures)
        run.records = provider.records
    for line in _BLOCK_LINE.finditer(log_text(logs)):
        run.blocks.setdefault(line.group(1), float(line.group(2)))
    if run.failures:
        console.print(f"[red]{plan.label}: {len(run.failures)} tasks failed: {run.failures[0]}")
    with contextlib.suppress(Exception):
        limiter.delete_table()
    if plan.broker == "rabbitmq":  # leave no queue behind on the shared server
        with contextlib.suppress(Exception), client.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    with contextlib.suppress(Exception):
        client.close()
    return run


def _charge(kwargs: dict[str, Any]) -> int:
    """What the provider charges a task's request on its tpm bucket (request accounting)."""
    return billed_usage(kwargs["prompt"], kwargs["max_tokens"], SEED).prompt_tokens + int(
        kwargs["max_tokens"]
    )


# -- the scenarios --------------------------------------------------------------------------------
def short_batch(tasks: int, tenants: Sequence[str], feedback: bool) -> list[dict[str, Any]]:
    """The demo's prompts, in file order, the tenants taking turns."""
    prompts = load_prompts()
    return [
        {
            "tenant": tenants[i % len(tenants)],
            "prompt": prompts[i % len(prompts)].prompt,
            "max_tokens": prompts[i % len(prompts)].max_tokens,
            "feedback": feedback,
        }
        for i in range(tasks)
    ]


def long_batch(
    tasks: int, tenant: str, parts: int = 8, max_tokens: int = 1200
) -> list[dict[str, Any]]:
    """Long prompts (``parts`` of the demo's prompts each, as one document to summarise)
    and a large completion cap: requests of 1,500-2,000 tokens, so tpm binds."""
    prompts = load_prompts()
    batch = []
    for i in range(tasks):
        texts = [prompts[(i * parts + k) % len(prompts)].prompt for k in range(parts)]
        prompt = "Summarise these requests in one paragraph each:\n\n" + "\n\n".join(texts)
        batch.append(
            {"tenant": tenant, "prompt": prompt, "max_tokens": max_tokens, "feedback": True}
        )
    return batch


def shared_key_plans(tasks: int, broker: str) -> list[Plan]:
    rpm, tpm = 600, 1_000_000
    plans = []
    variants = (
        ("without header feedback", False, None),
        ("with header feedback", True, None),
        # The other client is invisible: the headers state the key's whole limit, and
        # only what is left shows the other client's use.
        ("with feedback, the key states 600 rpm", True, {"requests": rpm, "tokens": tpm}),
    )
    for label, feedback, advertise in variants:
        plans.append(
            Plan(
                label,
                broker,
                rpm,
                tpm,
                round(rpm * SHARE),
                round(tpm * SHARE),
                short_batch(tasks, ["shared-key"], feedback),
                advertise=advertise,
            )
        )
    return plans


def openai_plan(tasks: int) -> Plan:
    rpm, tpm = 600, 240_000
    return Plan(
        "openai SDK, RabbitMQ, acks_late, prefetch 1",
        "rabbitmq",
        rpm,
        tpm,
        rpm,
        tpm,
        long_batch(tasks, "openai-key"),
        acks_late=True,
        prefetch=1,
    )


TENANTS = ("tenant-a", "tenant-b", "tenant-c")
KEY = "provider-key"
TENANTS_SHARE = 0.5
"""The part of the key's configured limits the provider allows in the tenants scenario:
low enough that 429s happen even when a busy machine's fleet sends below the key's rate."""


TENANTS_COOLDOWN = 5.0
"""Seconds the tenants' provider closes the key after a 429 ("try again in 5 s"), so
that a 429's retry-after spans more than the next free slot."""


def tenants_plan(tasks: int, broker: str) -> Plan:
    key_rpm, key_tpm = 600, 1_000_000
    tenant_rpm, tenant_tpm = 300, 500_000  # three tenants: 900 rpm together, the key binds

    def prepare(limiter: RateLimiter) -> None:
        limiter.set_limits(KEY, limits(key_rpm, key_tpm, WINDOW), resource=RESOURCE)
        for tenant in TENANTS:
            limiter.create_entity(tenant, parent_id=KEY, cascade=True)

    return Plan(
        f"{len(TENANTS)} tenants under one key (cascade)",
        broker,
        tenant_rpm,
        tenant_tpm,
        round(key_rpm * TENANTS_SHARE),
        round(key_tpm * TENANTS_SHARE),
        short_batch(tasks, TENANTS, True),
        prepare=prepare,
        cooldown=TENANTS_COOLDOWN,
    )


# -- figures --------------------------------------------------------------------------------------
def _times(records: Sequence[ProviderRecord], status: int | None = None) -> list[float]:
    return sorted(r.at for r in records if status is None or r.status == status)


def shared_key_figures(run: Run, plan: Plan) -> dict[str, Any]:
    sent, refused = _times(run.records), _times(run.records, 429)
    accepted = _times(run.records, 200)
    first = sent[0] if sent else 0.0
    steady = steady_per_minute(accepted, [1.0] * len(accepted))
    peak = _peak_per_minute(accepted, [1.0] * len(accepted), bucket_size(plan.provider_rpm, WINDOW))
    return {
        "label": run.label,
        "completed": len(run.infos),
        "tasks": run.tasks,
        "requests": len(sent),
        "429s": len(refused),
        "429s_per_1000": per_thousand(len(refused), len(sent)),
        "converged_s": convergence(sent, refused),
        "last_429_s": (refused[-1] - first) if refused else None,
        "rpm_steady": steady,
        "rpm_peak": peak,
        "provider_rpm": plan.provider_rpm,
        "configured_rpm": plan.rpm,
        "span_s": (sent[-1] - first) if sent else 0.0,
        "deferrals_per_task": sum(i["deferrals"] for i in run.infos) / max(1, len(run.infos)),
    }


def openai_figures(run: Run, plan: Plan) -> dict[str, Any]:
    ok = sorted((r for r in run.records if r.status == 200), key=lambda r: r.at)
    times = [r.at for r in ok]
    charged = [float(r.charged_tokens) for r in ok]
    steady = steady_per_minute(times, charged)
    peak = _peak_per_minute(times, charged, bucket_size(plan.provider_tpm, WINDOW))
    return {
        "label": run.label,
        "completed": len(run.infos),
        "tasks": run.tasks,
        "requests": len(run.records),
        "429s": sum(1 for r in run.records if r.status == 429),
        "tpm_limit": plan.provider_tpm,
        "tpm_steady": steady,
        "utilization_steady": steady / plan.provider_tpm,
        "tpm_peak": peak,
        "utilization_peak": peak / plan.provider_tpm,
        "rpm_steady": steady_per_minute(times, [1.0] * len(times)),
        "rpm_limit": plan.provider_rpm,
        "mean_charge": sum(charged) / max(1, len(charged)),
        "deferrals_per_task": sum(i["deferrals"] for i in run.infos) / max(1, len(run.infos)),
        "wall_s": (max(i["end"] for i in run.infos) - run.submitted_at) if run.infos else 0.0,
    }


def tenants_figures(run: Run, plan: Plan) -> dict[str, Any]:
    records = sorted(run.records, key=lambda r: r.at)
    refusals = [r for r in records if r.status == 429]
    windows: list[dict[str, Any]] = []
    for refused in refusals:
        meta = dict(refused.metadata)
        blocked = run.blocks.get(f"{meta.get('task')}/{meta.get('deferrals')}")
        inside: list[dict[str, Any]] = []
        for r in in_block(records, refused):
            m = dict(r.metadata)
            start = float(m.get("start", "nan"))
            inside.append(
                {
                    "tenant": r.user,
                    "status": r.status,
                    "arrived_after_429_ms": round((r.at - refused.at) * 1000, 1),
                    "start_after_429_ms": round((start - refused.at) * 1000, 1),
                    "admitted": m.get("admitted") == "1",
                    "started_before_block": blocked is not None and start < blocked,
                }
            )
        windows.append(
            {
                "at_s": refused.at - records[0].at,
                "tenant": refused.user,
                "retry_after": refused.retry_after,
                "limited_by": refused.limited_by,
                "block_written_after_ms": (
                    None if blocked is None else round((blocked - refused.at) * 1000, 1)
                ),
                "inside": inside,
            }
        )
    by_tenant = {t: sum(1 for r in records if r.user == t and r.status == 200) for t in TENANTS}
    inside_all = [x for w in windows for x in w["inside"]]
    return {
        "label": run.label,
        "completed": len(run.infos),
        "tasks": run.tasks,
        "requests": len(records),
        "429s": len(refusals),
        "accepted_by_tenant": by_tenant,
        "windows": windows,
        "inside_total": len(inside_all),
        "inside_started_before_block": sum(1 for x in inside_all if x["started_before_block"]),
        "inside_admitted": sum(1 for x in inside_all if x["admitted"]),
    }


# -- tables ---------------------------------------------------------------------------------------
def _s(value: float | None, unit: str = " s") -> str:
    return "never" if value is None else f"{value:.1f}{unit}"


def shared_key_table(figures: Sequence[dict[str, Any]], plan: Plan, fleet: str) -> Table:
    table = Table(
        title=(
            f"shared key: {plan.rpm} rpm configured, provider {plan.provider_rpm} rpm "
            f"({SHARE:.0%}), buckets of {WINDOW:g} s, {len(plan.batch)} tasks, {fleet}"
        )
    )
    table.add_column("measure")
    for fig in figures:
        table.add_column(fig["label"], justify="right")
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("tasks completed", lambda f: f"{f['completed']}/{f['tasks']}"),
        ("provider requests / 429s", lambda f: f"{f['requests']} / {f['429s']}"),
        ("429s per 1,000 requests", lambda f: f"{f['429s_per_1000']:.1f}"),
        (
            f"converged after (≤ {CONVERGED} 429 per {STEP:g} s window from then on)",
            lambda f: _s(f["converged_s"]),
        ),
        ("last 429, s after the first request", lambda f: _s(f["last_429_s"])),
        (
            "accepted rpm, steady (10th-90th pct) / provider's",
            lambda f: (
                f"{f['rpm_steady']:.0f} / {f['provider_rpm']} "
                f"({f['rpm_steady'] / f['provider_rpm']:.3f})"
            ),
        ),
        (
            "accepted rpm, busiest 10 s less the bucket",
            lambda f: f"{f['rpm_peak']:.0f} ({f['rpm_peak'] / f['provider_rpm']:.3f})",
        ),
        ("deferrals per task", lambda f: f"{f['deferrals_per_task']:.2f}"),
        ("span of requests, s", lambda f: f"{f['span_s']:.1f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(fig) for fig in figures))
    return table


def openai_table(fig: dict[str, Any], plan: Plan, fleet: str) -> Table:
    table = Table(
        title=(
            f"openai SDK via zae_celery.providers.openai.chat: {plan.rpm} rpm / "
            f"{plan.tpm // 1000}k tpm configured = provider's (accounting 'request', slack: 1 "
            f"request, the largest request), {len(plan.batch)} long prompts, RabbitMQ, "
            f"acks_late, prefetch 1, {fleet}"
        )
    )
    table.add_column("measure")
    table.add_column("goal", justify="right")
    table.add_column("figure", justify="right")
    steady, peak = fig["utilization_steady"], fig["utilization_peak"]
    table.add_row("tasks completed", str(fig["tasks"]), f"{fig['completed']}/{fig['tasks']}")
    table.add_row(
        "provider requests / 429s", f"{fig['tasks']} / 0", f"{fig['requests']} / {fig['429s']}"
    )
    table.add_row(
        "tpm utilization, steady (charged tokens, 10th-90th pct of arrivals)",
        "≥ 0.95",
        f"{steady:.3f} ({fig['tpm_steady'] / 1000:.1f}k)",
    )
    table.add_row(
        "tpm utilization, busiest 10 s less the bucket (the demo's)",
        "≥ 0.95",
        f"{peak:.3f} ({fig['tpm_peak'] / 1000:.1f}k)",
    )
    table.add_row("rpm, steady / limit", "", f"{fig['rpm_steady']:.0f} / {fig['rpm_limit']}")
    table.add_row("mean charge per request, tokens", "", f"{fig['mean_charge']:.0f}")
    table.add_row("deferrals per task", "", f"{fig['deferrals_per_task']:.2f}")
    table.add_row("wall time from the first send, s", "", f"{fig['wall_s']:.1f}")
    return table


SHOWN = 3
"""The 429s the tenants table shows one by one (the first ones); the rest are summed."""


def tenants_table(fig: dict[str, Any], plan: Plan, fleet: str) -> Table:
    table = Table(
        title=(
            f"{len(TENANTS)} tenants ({plan.rpm} rpm each) under {KEY} (cascade, 600 rpm "
            f"stored), provider {plan.provider_rpm} rpm, {len(plan.batch)} tasks, {fleet}: "
            "requests that reached the provider during a 429's retry-after"
        )
    )
    for column in ("429 at, s", "tenant", "retry-after, s", "block written, ms after"):
        table.add_column(column, justify="right")
    table.add_column("requests in (t, t + r): tenant, arrival / counted start ms after t, how")
    for w in fig["windows"][:SHOWN]:
        inside = "; ".join(
            f"{x['tenant']} {x['status']} +{x['arrived_after_429_ms']:.0f}/"
            f"{x['start_after_429_ms']:+.0f} "
            + ("admitted" if x["admitted"] else "pool")
            + (
                ", counted start before the block was written"
                if x["started_before_block"]
                else ", counted start after the block was written"
            )
            for x in w["inside"]
        )
        table.add_row(
            f"{w['at_s']:.2f}",
            str(w["tenant"]),
            f"{w['retry_after']:.3f}",
            "?" if w["block_written_after_ms"] is None else f"{w['block_written_after_ms']:.0f}",
            inside or "none",
        )
    rest = fig["windows"][SHOWN:]
    if rest:
        inside_rest = [x for w in rest for x in w["inside"]]
        before = sum(1 for x in inside_rest if x["started_before_block"])
        table.add_row(
            f"{len(rest)} more",
            "",
            f"{min(w['retry_after'] for w in rest):.3f}-{max(w['retry_after'] for w in rest):.3f}",
            "",
            f"{len(inside_rest)} requests ({before} with their start counted before the block "
            f"was written, {len(inside_rest) - before} after it or unknown)",
        )
    return table


# -- the command ----------------------------------------------------------------------------------
def rabbitmq_answers(timeout: float = 2.0) -> bool:
    """Whether something listens at RabbitMQ's address (127.0.0.1:5672)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5672), timeout):
        return True
    return False


DEFAULT_TASKS = {"shared-key": 480, "openai": 150, "tenants": 240}


@click.command()
@click.option(
    "--scenario",
    type=click.Choice([*SCENARIOS, "all"]),
    default="all",
    show_default=True,
    help="Which figure to take.",
)
@click.option(
    "--tasks",
    type=int,
    default=None,
    help="Tasks per run [default: shared-key 480 (each of its two runs), openai 150, "
    "tenants 240: about a minute each].",
)
@click.option("--workers", default=3, show_default=True, help="celery worker processes.")
@click.option("--concurrency", default=3, show_default=True, help="Prefork pool size per worker.")
@click.option(
    "--broker",
    type=click.Choice(["redis", "rabbitmq", "filesystem"]),
    default="redis",
    show_default=True,
    help="The broker of shared-key and tenants (openai always uses RabbitMQ at 127.0.0.1:5672).",
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the figures and every provider record to this JSON file.",
)
@click.option("--keep", is_flag=True, help="Keep the work folder (worker and server logs).")
def main(
    scenario: str,
    tasks: int | None,
    workers: int,
    concurrency: int,
    broker: str,
    save: Path | None,
    keep: bool,
) -> None:
    """Run the provider scenarios on real worker fleets and print their figures."""
    chosen = SCENARIOS if scenario == "all" else (scenario,)
    if (tasks is not None and tasks < 10) or workers < 1 or concurrency < 1:
        raise click.BadParameter("need --tasks >= 10 and at least one worker")
    use_local_credentials()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    console = Console(width=150)
    work = Path(tempfile.mkdtemp(prefix="zae-bench-providers-"))
    fleet = f"{workers} workers x prefork -c {concurrency}"
    saved: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "celery": celery_pkg.__version__,
            "openai": openai.__version__,
        }
    }
    failed: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            with console.status("starting DynamoDB Local and redis"), signals_held():
                server = stack.enter_context(endpoint_server("dynamodb-local", work / "servers"))
                redis = stack.enter_context(redis_server(log_dir=work / "servers"))
            bench = Bench(work, server.url, redis.port, workers, concurrency, console)
            for name in chosen:
                count = tasks or DEFAULT_TASKS[name]
                if name == "shared-key":
                    plans = shared_key_plans(count, broker)
                    runs = [run_plan(bench, p) for p in plans]
                    figs = [shared_key_figures(r, p) for r, p in zip(runs, plans, strict=True)]
                    console.print(shared_key_table(figs, plans[0], fleet))
                    saved[name] = [
                        {**f, "records": [asdict(r) for r in run.records]}
                        for f, run in zip(figs, runs, strict=True)
                    ]
                elif name == "openai":
                    if not rabbitmq_answers():
                        console.print(
                            "[red]openai: RabbitMQ does not answer at 127.0.0.1:5672; "
                            "this scenario needs it (skipped, exit code 1)"
                        )
                        failed.append(name)
                        continue
                    plan = openai_plan(count)
                    run = run_plan(bench, plan)
                    fig = openai_figures(run, plan)
                    console.print(openai_table(fig, plan, fleet))
                    saved[name] = {**fig, "records": [asdict(r) for r in run.records]}
                    if fig["429s"] or fig["utilization_steady"] < 0.95:
                        failed.append(name)
                else:
                    plan = tenants_plan(count, broker)
                    run = run_plan(bench, plan)
                    fig = tenants_figures(run, plan)
                    console.print(tenants_table(fig, plan, fleet))
                    console.print(
                        f"accepted by tenant: {fig['accepted_by_tenant']}; 429s: {fig['429s']}; "
                        f"requests inside a 429's retry-after: {fig['inside_total']} "
                        f"({fig['inside_started_before_block']} started before the block was "
                        f"written, {fig['inside_admitted']} admitted by a consumer)"
                    )
                    saved[name] = {**fig, "records": [asdict(r) for r in run.records]}
    except (FleetError, ServerUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if keep:
            console.print(f"work folder (logs) kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    console.print(
        f"converged: the first {STEP:g} s window (back to back from the first request) after "
        f"which no window holds more than {CONVERGED} 429; steady: between the 10th and 90th "
        "percentile of accepted arrivals; all counted from the provider's records"
    )
    console.print(
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, Python "
        f"{platform.python_version()}, Celery {celery_pkg.__version__}, openai {openai.__version__}"
    )
    if save is not None:
        save.write_text(json.dumps(saved, default=str))
        console.print(f"raw data: {save}")
    if failed:
        console.print(f"[red]not met or not run: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
