"""Real ``celery worker`` processes for tests: started in their own process groups,
stopped by PID (SIGTERM, then SIGKILL) when the context exits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _stop(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM to the worker's main process (a warm shutdown that stops its pool), then
    SIGKILL to the whole group if it lingers. Signalling the pool children directly
    makes the worker replace them and delays the shutdown."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


@contextlib.contextmanager
def workers(
    env: dict[str, str],
    logs: Path,
    count: int = 3,
    concurrency: int = 2,
    queues: str = "limited,shared,other,provider",
    pool: str = "prefork",
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` workers (``pool``: prefork, solo, threads) of ``tests.celery.app``."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            log = (logs / f"worker-{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "celery", "-A", "tests.celery.app", "worker",
                        "-P", pool, "-c", str(concurrency), "-Q", queues,
                        "-n", f"w{i}-{os.getpid()}@%h", "-l", "INFO",
                        "--without-heartbeat", "--without-mingle", "--without-gossip",
                    ],
                    cwd=REPO,
                    env={**os.environ, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )  # fmt: skip
            log.close()
        yield procs
    finally:
        for p in procs:  # signal all first, so they shut down in parallel
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            _stop(p)


def log_text(logs: Path) -> str:
    """Every worker log, for failure messages and log checks."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.log")))
