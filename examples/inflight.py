"""An in-flight cap: at most 3 calls at once to a model server, on real ``celery worker``
processes that could run 6.

``Limit.concurrent("calls", 3)`` among the task's limits caps the calls in flight across
the fleet (beside an rpm limit that does not bind here). The model server is the local
provider (``harness.provider``) with a latency of about half a second and a cap of its
own: like a self-hosted inference server, it refuses (429) a 4th request in flight. 24
calls are sent at once to 2 workers x 3 processes: each task takes a slot when it
starts, waits in place for one while the cap is full, and frees it when it ends. The
report shows what the server saw: the most requests it had in flight, and its 429s.

No servers are needed besides DynamoDB: the broker is ``zaefs://`` (kombu's filesystem
transport with atomic writes, ``harness.fsbroker``) and results go to ``file://``, both
in a temporary folder deleted at the end. Run from the repository root (about 15 s):

    python -m examples.inflight
    python -m examples.inflight --endpoint-url http://127.0.0.1:8000 --json

The workers run ``celery -A examples.inflight worker``: this same module, configured
from environment variables that ``main`` sets.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from celery import Celery

from examples._local import ENDPOINT_ENV, dynamodb, emit, folder_conf, parse_args, table_name
from harness.provider import LocalProvider
from harness.workers import worker_fleet
from zae_celery import Limit, RateLimitedTask, RateLimiter

CALLS = Limit.concurrent("calls", 3)
RPM = Limit.per_minute("rpm", 6000)
TASKS, WORKERS, PROCESSES = 24, 2, 3
LATENCY = 0.5
# Set by main() for the workers it starts.
ENV_TABLE, ENV_FOLDER, ENV_SERVER = "ZAE_EXAMPLE_TABLE", "ZAE_EXAMPLE_FOLDER", "ZAE_EXAMPLE_SERVER"

app = Celery("inflight")


def configure(endpoint_url: str, table: str, folder: Path) -> None:
    """Point the app at DynamoDB and at a broker and result store living in ``folder``."""
    app.conf.update(folder_conf(endpoint_url, table, folder, "models"))


if os.environ.get(ENV_FOLDER):  # imported by a worker that main() started
    configure(os.environ[ENDPOINT_ENV], os.environ[ENV_TABLE], Path(os.environ[ENV_FOLDER]))


# An explicit name: the producer runs this file as __main__, the workers import it.
@app.task(
    base=RateLimitedTask,
    bind=True,
    name="examples.inflight.generate",
    rate_limits=[RPM, CALLS],
    rate_resource="model-server",
)
def generate(self: RateLimitedTask, prompt: str) -> int:
    """One call to the model server (at most 3 of these at once, fleet-wide)."""
    body = json.dumps({"model": "local", "messages": [{"role": "user", "content": prompt}]})
    request = urllib.request.Request(
        os.environ[ENV_SERVER],
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code  # a 429 here would mean the cap let a 4th call through


def run(endpoint_url: str, folder: Path) -> dict[str, Any]:
    """Start the server and the workers, send every call at once, collect the server's view."""
    table = table_name("inflight")
    limiter = RateLimiter(table, endpoint_url=endpoint_url)
    limiter.create_table()  # local endpoints; on AWS the table comes from the stack
    configure(endpoint_url, table, folder)
    server = LocalProvider(
        rpm=100_000, latency_median=LATENCY, latency_sigma=0.2, max_in_flight=CALLS.capacity
    )
    try:
        with server:
            env = {
                ENDPOINT_ENV: endpoint_url,
                ENV_TABLE: table,
                ENV_FOLDER: str(folder),
                ENV_SERVER: server.url,
            }
            with worker_fleet(
                "examples.inflight",
                count=WORKERS,
                concurrency=PROCESSES,
                queues=["models"],
                logs=folder / "logs",
                env=env,
                cwd=Path(__file__).resolve().parent.parent,
            ):
                sent = [generate.delay(f"prompt {n}") for n in range(TASKS)]
                statuses = [r.get(timeout=120) for r in sent]
            records = server.records
            return {
                "statuses": statuses,
                "peak_in_flight": server.peak_in_flight,
                "refused": sum(1 for r in records if r.status == 429),
                "requests": len(records),
                "seconds": max(r.at for r in records) - min(r.at for r in records),
            }
    finally:
        limiter.delete_table()


def main() -> None:
    """Run the batch and print what the model server saw."""
    args = parse_args(__doc__)
    with (
        dynamodb(args.endpoint_url) as endpoint,
        tempfile.TemporaryDirectory(prefix="zae-inflight-") as tmp,
    ):
        seen = run(endpoint.url, Path(tmp))
    text = [
        f"{TASKS} calls sent at once to {WORKERS} workers x {PROCESSES} processes, "
        f"limit {CALLS.format()} (the server refuses a call beyond {CALLS.capacity} in flight)",
        f"the server answered {seen['requests']} requests: {seen['refused']} refused (429)",
        f"most requests in flight at the server at once: {seen['peak_in_flight']} "
        f"(cap {CALLS.capacity})",
        f"from the first request to the last: {seen['seconds']:.1f} s "
        f"(about {TASKS} x {LATENCY} s / {CALLS.capacity} = {TASKS * LATENCY / CALLS.capacity:.1f} "
        "s at the cap)",
    ]
    emit(args.json, endpoint, {"cap": CALLS.capacity, **seen}, text)


if __name__ == "__main__":
    main()
