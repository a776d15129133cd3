"""The Celery app run by the workers of the provider benchmark (``benchmarks/providers.py``).

    celery -A benchmarks.provider_app worker -P prefork -c 3 -Q <queue>

It is the Celery benchmark's app (``benchmarks/celery_app.py``: broker, result backend,
DynamoDB table or Redis store, prefetch, ``task_acks_late``, horizon, all read from the
same ``ZAE_BENCH_*`` variables) with one more task, ``chat``: a chat completion through
the official ``openai`` SDK (retries off) to the local provider, under shared ``rpm`` and
``tpm`` buckets, accounted by the ``openai`` profile (tpm charged at request time: the
prompt plus ``max_tokens``).

Its ``feedback`` argument chooses how the provider's answers reach the buckets:

* ``True``: :func:`zae_celery.providers.openai.chat`, which feeds every response's
  rate-limit headers back (``provider_reported``), charges the usage and turns a 429
  into a fleet block and a deferral;
* ``False``: the SDK called directly; a 429 goes to ``self.provider_limited`` (with the
  wait its headers give) and a success's usage to ``self.report_usage``, but the
  rate-limit headers of the responses are never read.

Each request is tagged for the provider's records: ``user`` is the tenant, and
``metadata`` carries the task id, when its start was counted (the engine's clock),
whether a worker's consumer admitted it, and its deferrals so far. A task whose call was
answered 429 logs a line ``provider-bench blocked <task id>/<deferrals> at <epoch>`` once
the block is written (the benchmark reads the workers' logs for it).

Configured through the environment (besides the ``ZAE_BENCH_*`` variables):

==========================  ==========================================================
``ZAE_PB_PROVIDER``         the provider's root URL (the SDK's ``base_url`` less ``/v1``)
``ZAE_PB_RPM``              the configured requests per minute
``ZAE_PB_TPM``              the configured tokens per minute
``ZAE_PB_WINDOW``           seconds of each limit a bucket holds
``ZAE_PB_START_WAIT``       ``zae_start_wait`` (default 3 s: a large request's slot)
==========================  ==========================================================

A tenant's limits are these (its own bucket); with a cascade parent (the provider's key)
the parent's buckets are the stored limits of the key, which the benchmark writes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import openai
from celery.exceptions import Retry

from benchmarks.celery_app import app
from examples.llm_pipeline.workload import limits
from zae_celery import RateLimitedTask
from zae_celery.admission import ADMITTED
from zae_celery.providers import openai as zae_openai
from zae_celery.providers.headers import read_rate_limits
from zae_celery.providers.profiles import OPENAI
from zae_celery.task import HEADER_DEFERRALS

__all__ = ["BLOCKED", "MODEL", "RESOURCE", "app", "chat"]

PROVIDER = os.environ.get("ZAE_PB_PROVIDER", "http://127.0.0.1:9")
RPM = int(os.environ.get("ZAE_PB_RPM", "600"))
TPM = int(os.environ.get("ZAE_PB_TPM", "600000"))
WINDOW = float(os.environ.get("ZAE_PB_WINDOW", "2"))
RESOURCE = "chat-completions"
MODEL = "local-chat"
BLOCKED = "provider-bench blocked"
"""The start of the log line a task writes once its 429's block is written."""

app.conf.zae_start_wait = float(os.environ.get("ZAE_PB_START_WAIT", "3"))
log = logging.getLogger("benchmarks.provider_app")
_clients: dict[int, openai.OpenAI] = {}


def _client() -> openai.OpenAI:
    """This process's SDK client (created after the fork), its own retries off."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = openai.OpenAI(
            api_key="local", base_url=PROVIDER + "/v1", max_retries=0, timeout=60
        )
    return _clients[pid]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _consume(args: Any, kwargs: Any) -> dict[str, int]:
    """The estimate before the call: the prompt (four characters a token) plus the
    completion cap, which the provider charges at request time."""
    prompt = zae_openai.estimate_tokens(_messages(kwargs["prompt"]))
    return {"rpm": 1, "tpm": prompt + int(kwargs["max_tokens"])}


def _plain(task: RateLimitedTask, client: openai.OpenAI, params: dict[str, Any]) -> Any:
    """The SDK call without header feedback: a 429 blocks the fleet and defers the task;
    a success charges its usage; the rate-limit headers are not read otherwise."""
    try:
        completion = client.chat.completions.create(**params)
    except openai.RateLimitError as exc:
        task.provider_limited(read_rate_limits(exc.response.headers).wait or 1.0)
    usage = zae_openai.usage_of(completion)
    if usage is not None:
        names = {lim.name for lim in task.lease.buckets[0].limits}
        task.report_usage(**OPENAI.charges(usage, params["max_tokens"], names))
    return completion


@app.task(
    base=RateLimitedTask,
    bind=True,
    max_retries=0,  # waiting on a limit never uses retries
    rate_limits=limits(RPM, TPM, WINDOW),
    rate_resource=RESOURCE,
    rate_entity=lambda args, kwargs: kwargs["tenant"],
    rate_consume=_consume,
    rate_profile="openai",
)
def chat(
    self: RateLimitedTask, tenant: str, prompt: str, max_tokens: int, feedback: bool = True
) -> dict[str, Any]:
    """One chat completion under the shared buckets of ``tenant`` (and its parent's)."""
    request = self.request
    started = self.lease.started_at or time.time()
    deferrals = int((request.headers or {}).get(HEADER_DEFERRALS) or 0)
    admitted = bool(getattr(request, ADMITTED, None))
    params: dict[str, Any] = {
        "model": MODEL,
        "messages": _messages(prompt),
        "max_tokens": max_tokens,
        "user": tenant,
        "metadata": {
            "task": str(request.id),
            "start": f"{started:.6f}",
            "admitted": "1" if admitted else "0",
            "deferrals": str(deferrals),
        },
    }
    client = _client()
    try:
        if feedback:
            completion = zae_openai.chat(self, client, **params)
        else:
            completion = _plain(self, client, params)
    except Retry:  # only a 429 defers here: the provider is never overloaded in these runs
        log.warning("%s %s/%d at %.6f", BLOCKED, request.id, deferrals, time.time())
        raise
    usage = completion.usage
    return {
        "task": request.id,
        "tenant": tenant,
        "start": started,
        "admitted": admitted,
        "deferrals": deferrals,
        "end": time.time(),
        "tokens": usage.total_tokens if usage is not None else 0,
    }
