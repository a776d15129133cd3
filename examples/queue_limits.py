"""Queue limits: two task types share one queue's limit, on real ``celery worker`` processes.

``app.conf.zae_queue_limits = {"llm": [Limit.per_second("starts", 4)]}`` gives the queue
"llm" one bucket, shared by every rate-aware task consumed from it, whatever its type and
on every worker. Here ``summarize`` and ``translate`` (neither has limits of its own) are
sent to that queue, 10 of each at once, and 2 worker processes with 2 pool processes each
run them. Each task returns the moment its start was counted; the report shows that both
task types together stay within 4 starts a second after the first 4: in any window of W
seconds at most 4 + 4·W tasks start. Tasks beyond the bucket are not failed or retried
in a loop: each reserves its own slot and is republished once, to that slot.

No servers are needed besides DynamoDB: the broker is ``zaefs://`` (kombu's filesystem
transport with atomic writes, ``harness.fsbroker``) and results go to ``file://``, both
in a temporary folder deleted at the end. Run from the repository root (about 15 s,
most of it starting the workers):

    python -m examples.queue_limits
    python -m examples.queue_limits --endpoint-url http://127.0.0.1:8000 --json

The workers run ``celery -A examples.queue_limits worker``: this same module, configured
from environment variables that ``main`` sets.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from celery import Celery

from examples._local import ENDPOINT_ENV, dynamodb, emit, folder_conf, parse_args, table_name
from harness.workers import worker_fleet
from zae_celery import Limit, RateLimitedTask, RateLimiter

QUEUE = "llm"
QUEUE_LIMIT = Limit.per_second("starts", 4)
TASKS_PER_TYPE = 10
WORKERS, PROCESSES = 2, 2
# Set by main() for the workers it starts.
ENV_TABLE, ENV_FOLDER = "ZAE_EXAMPLE_TABLE", "ZAE_EXAMPLE_FOLDER"

app = Celery("queue_limits")


def configure(endpoint_url: str, table: str, folder: Path) -> None:
    """Point the app at DynamoDB and at a broker and result store living in ``folder``."""
    app.conf.update(
        folder_conf(endpoint_url, table, folder, QUEUE), zae_queue_limits={QUEUE: [QUEUE_LIMIT]}
    )


if os.environ.get(ENV_FOLDER):  # imported by a worker that main() started
    configure(os.environ[ENDPOINT_ENV], os.environ[ENV_TABLE], Path(os.environ[ENV_FOLDER]))


def _started(task: RateLimitedTask) -> dict[str, Any]:
    """The task's type and the moment its start was counted (ms, the limiter's clock)."""
    started_at = task.lease.started_at
    assert started_at is not None  # a running rate-limited task has counted its start
    return {"task": task.name.rsplit(".", 1)[-1], "started_ms": round(started_at * 1000)}


# Explicit names: the producer runs this file as __main__, the workers import it.
@app.task(base=RateLimitedTask, bind=True, name="examples.queue_limits.summarize")
def summarize(self: RateLimitedTask, doc: int) -> dict[str, Any]:
    """Stands in for an LLM call; only the queue's limit applies."""
    return _started(self)


@app.task(base=RateLimitedTask, bind=True, name="examples.queue_limits.translate")
def translate(self: RateLimitedTask, doc: int) -> dict[str, Any]:
    """Another task type on the same queue, sharing its limit."""
    return _started(self)


def most_in_window(starts_ms: list[int], width_ms: int) -> int:
    """The largest number of starts within any ``width_ms`` window (both ends included)."""
    return max(sum(1 for s in starts_ms if first <= s <= first + width_ms) for first in starts_ms)


def run(endpoint_url: str, folder: Path) -> list[dict[str, Any]]:
    """Start the workers, send both task types to the queue at once, collect the starts."""
    table = table_name("queue-limits")
    limiter = RateLimiter(table, endpoint_url=endpoint_url)
    limiter.create_table()  # local endpoints; on AWS the table comes from the stack
    configure(endpoint_url, table, folder)
    env = {ENDPOINT_ENV: endpoint_url, ENV_TABLE: table, ENV_FOLDER: str(folder)}
    try:
        with worker_fleet(
            "examples.queue_limits",
            count=WORKERS,
            concurrency=PROCESSES,
            queues=[QUEUE],
            logs=folder / "logs",
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        ):
            sent = []
            for doc in range(TASKS_PER_TYPE):
                sent += [summarize.delay(doc), translate.delay(doc)]
            return sorted((r.get(timeout=120) for r in sent), key=lambda s: s["started_ms"])
    finally:
        limiter.delete_table()


def main() -> None:
    """Run the batch and print every start, per second and in the busiest window."""
    args = parse_args(__doc__)
    with (
        dynamodb(args.endpoint_url) as endpoint,
        tempfile.TemporaryDirectory(prefix="zae-queue-limits-") as tmp,
    ):
        starts = run(endpoint.url, Path(tmp))
    first = starts[0]["started_ms"]
    ms = [s["started_ms"] for s in starts]
    rate = QUEUE_LIMIT.rate
    text = [
        f'queue "{QUEUE}": {rate:g} task starts a second, bucket of {QUEUE_LIMIT.burst}, '
        f"shared by summarize and translate ({TASKS_PER_TYPE} of each, sent at once, "
        f"{WORKERS} workers x {PROCESSES} processes)",
        "starts (s after the first):",
    ]
    text += [f"  {(s['started_ms'] - first) / 1000:6.3f}  {s['task']}" for s in starts]
    text.append("per second:")
    for second in range((ms[-1] - first) // 1000 + 1):
        kinds = Counter(s["task"] for s in starts if (s["started_ms"] - first) // 1000 == second)
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        text.append(f"  {second}-{second + 1} s: {sum(kinds.values())} ({detail})")
    text.append(
        f"most starts in any 1 s window: {most_in_window(ms, 1000)} "
        f"(the limit allows {QUEUE_LIMIT.burst} + {rate:g} x 1 s = {QUEUE_LIMIT.burst + rate:g})"
    )
    result = {
        "queue": QUEUE,
        "limit": QUEUE_LIMIT.to_dict(),
        "starts": starts,
    }
    emit(args.json, endpoint, result, text)


if __name__ == "__main__":
    main()
