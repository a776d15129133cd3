"""Real ``celery worker`` processes of ``tests.celery.app`` for tests (see
:func:`harness.workers.worker_fleet`: own process groups, ready before use, stopped by
PID)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from harness.workers import log_text, worker_fleet

__all__ = ["log_text", "workers"]

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def workers(
    env: dict[str, str],
    logs: Path,
    count: int = 3,
    concurrency: int = 2,
    queues: str = "limited,shared,other,provider",
    pool: str = "prefork",
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` workers (``pool``: prefork, solo, threads) of ``tests.celery.app``,
    consuming the comma-separated ``queues``, once every one of them is ready."""
    with worker_fleet(
        "tests.celery.app",
        count=count,
        queues=queues.split(","),
        logs=logs,
        concurrency=concurrency,
        pool=pool,
        env=env,
        cwd=REPO,
        stop_timeout=5.0,
    ) as procs:
        yield procs
