"""The pipeline's Celery app, run by the demo's workers:

    celery -A examples.llm_pipeline.app worker -P prefork -c 3 -Q <queue>

Two tasks send one prompt to the provider's chat-completions endpoint:

* ``complete``: ``base=RateLimitedTask`` with global rpm and tpm limits in DynamoDB (or,
  with ``--store``, on a Redis store);
  ``rate_consume`` estimates the tokens from the prompt, the body reports the provider's
  ``usage.total_tokens`` (``self.report_usage``) and hands a 429 to
  ``self.provider_limited`` (the whole fleet waits out the Retry-After).
* ``complete_builtin`` (``--compare``): a plain task with Celery's own per-worker
  ``rate_limit`` at the same nominal rpm (Celery has no token limit); on a 429 it retries
  with ``countdown`` = Retry-After.

Both return what the report needs. Configured by the runner through the environment:

========================  ==========================================================
``ZAE_DEMO_BROKER``       broker URL (``zaefs://`` or ``redis://...``)
``ZAE_DEMO_BROKER_DIR``   the folder of the ``zaefs://`` broker
``ZAE_DEMO_BACKEND``      result backend URL
``ZAE_DEMO_ENDPOINT``     DynamoDB endpoint
``ZAE_DEMO_TABLE``        the run's table
``ZAE_DEMO_STORE_URL``    the run's Redis store (``zae_store_url``), instead of both
``ZAE_DEMO_PROVIDER``     the provider's chat-completions URL
``ZAE_DEMO_RPM``          requests per minute
``ZAE_DEMO_TPM``          tokens per minute
``ZAE_DEMO_WINDOW``       seconds of each limit a bucket holds
========================  ==========================================================
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task

from examples.llm_pipeline.workload import Prompt, call_provider, estimate_tokens, limits
from harness import fsbroker as fs_broker
from zae_celery import RateLimitedTask
from zae_celery.task import HEADER_DEFERRALS

BROKER = os.environ.get("ZAE_DEMO_BROKER", "memory://")
PROVIDER = os.environ.get("ZAE_DEMO_PROVIDER", "http://127.0.0.1:9/")
RPM = int(os.environ.get("ZAE_DEMO_RPM", "480"))
TPM = int(os.environ.get("ZAE_DEMO_TPM", "150000"))
WINDOW = float(os.environ.get("ZAE_DEMO_WINDOW", "2"))
BUILTIN_MAX_RETRIES = 10_000
"""Retries are the built-in task's only way to wait out a 429: never run out of them."""

app = Celery("llm_pipeline", broker=BROKER, backend=os.environ.get("ZAE_DEMO_BACKEND"))
if os.environ.get("ZAE_DEMO_STORE_URL"):
    app.conf.zae_store_url = os.environ["ZAE_DEMO_STORE_URL"]
else:
    app.conf.zae_table_name = os.environ.get("ZAE_DEMO_TABLE", "zae-demo")
    app.conf.zae_endpoint_url = os.environ.get("ZAE_DEMO_ENDPOINT")
app.conf.update(
    # A late task may wait in place up to this long for its start slot instead of being
    # republished again: large requests space their tpm start slots by up to a second.
    zae_start_wait=float(os.environ.get("ZAE_DEMO_START_WAIT", "3")),
    broker_connection_retry_on_startup=True,
)
if BROKER.startswith(f"{fs_broker.SCHEME}://"):
    fs_broker.register()  # in each worker too: they load this module before connecting
    app.conf.broker_transport_options = fs_broker.transport_options(
        Path(os.environ["ZAE_DEMO_BROKER_DIR"])
    )


def _result(prompt_id: str, started: float, republishes: int, tokens: int) -> dict[str, Any]:
    return {
        "id": prompt_id,
        "start": started,
        "end": time.time(),
        "republishes": republishes,
        "tokens": tokens,
    }


@app.task(
    base=RateLimitedTask,
    bind=True,
    max_retries=0,  # waiting on a limit never uses retries
    rate_limits=limits(RPM, TPM, WINDOW),
    rate_resource="local-llm",
    rate_entity="demo-tenant",
    rate_consume=lambda args, kwargs: {
        "rpm": 1,
        # The runner's --exact-estimates passes the bill itself (known in advance from the
        # local provider's seed): nothing is left to reconcile.
        "tpm": kwargs.get("estimate") or estimate_tokens(kwargs["prompt"], kwargs["max_tokens"]),
    },
)
def complete(
    self: RateLimitedTask,
    prompt_id: str,
    kind: str,
    prompt: str,
    max_tokens: int,
    estimate: int | None = None,
) -> dict[str, Any]:
    """One chat completion under the fleet's shared rpm and tpm buckets."""
    started = self.lease.started_at or time.time()  # the engine's clock: when the start was counted
    republished = int((self.request.headers or {}).get(HEADER_DEFERRALS) or 0)
    reply = call_provider(PROVIDER, Prompt(prompt_id, kind, prompt, max_tokens))
    if reply.retry_after is not None:
        self.provider_limited(reply.retry_after)  # every worker backs off; this task defers
    self.report_usage(tpm=reply.total_tokens)  # the bill, not the estimate
    return _result(prompt_id, started, republished, reply.total_tokens)


@app.task(bind=True, rate_limit=f"{RPM}/m", max_retries=BUILTIN_MAX_RETRIES)
def complete_builtin(
    self: Task,
    prompt_id: str,
    kind: str,
    prompt: str,
    max_tokens: int,
    estimate: int | None = None,
) -> dict[str, Any]:
    """The same call with Celery's per-worker rate_limit; a 429 is retried after Retry-After."""
    started = time.time()
    reply = call_provider(PROVIDER, Prompt(prompt_id, kind, prompt, max_tokens))
    if reply.retry_after is not None:
        raise self.retry(countdown=reply.retry_after)
    return _result(prompt_id, started, self.request.retries, reply.total_tokens)
