"""A fleet of real ``celery worker`` processes, for tests, the demo and the benchmarks.

Each worker runs in its own process group with its log in a file, and the fleet is
handed over only once every worker has logged that it is ready. On exit (errors and
Ctrl-C included) every worker is stopped by its PID:

>>> with worker_fleet("app", count=3, queues=["llm"], logs=Path("logs")):  # doctest: +SKIP
...     ...  # publish and collect
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["FleetError", "log_text", "signals_held", "stop_workers", "worker_fleet"]

_READY = re.compile(rb"@\S+ ready\.")


class FleetError(RuntimeError):
    """A worker exited or did not become ready; the message ends with its log's tail."""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them.

    Starting a process and taking its handle must not be split by an interruption, or the
    process would run on with nobody to stop it. Only the main thread can do this; in
    another thread the block runs unprotected.
    """
    held: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {sig: signal.signal(sig, lambda sig, _: held.append(sig)) for sig in watched}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """Stop workers by PID, all in parallel.

    SIGTERM goes to each worker's main process: a warm shutdown, in which the worker stops
    its own pool (signalling the whole group would kill the pool processes under it and
    the worker would start new ones). After ``timeout`` seconds, SIGKILL goes to each
    process group, which also takes any pool process left behind.
    """
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=timeout)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def log_text(logs: Path) -> str:
    """Every worker log of ``logs``, for failure messages and log checks."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.log")))


@contextlib.contextmanager
def worker_fleet(
    app: str,
    *,
    count: int,
    queues: Sequence[str],
    logs: Path,
    concurrency: int = 2,
    pool: str = "prefork",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    name: str = "w",
    loglevel: str = "INFO",
    ready_timeout: float = 120.0,
    stop_timeout: float = 15.0,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` ``celery -A app worker`` processes consuming ``queues``, once all are ready.

    ``env`` is added to this process's environment; ``cwd`` is where ``app`` is imported
    from. Worker ``i`` logs to ``logs/worker-<i>.log`` and is named ``<name><i>-<pid>@host``.
    Raises :class:`FleetError` when a worker exits or is not ready in ``ready_timeout``.
    """
    if count < 1 or concurrency < 1:
        raise ValueError("count and concurrency must be >= 1")
    if not queues:
        raise ValueError("queues must name at least one queue")
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            argv = [
                sys.executable, "-m", "celery", "-A", app, "worker",
                "-P", pool, "-c", str(concurrency), "-Q", ",".join(queues),
                "-n", f"{name}{i}-{os.getpid()}@%h", "-l", loglevel,
                "--without-heartbeat", "--without-mingle", "--without-gossip",
            ]  # fmt: skip
            with (logs / f"worker-{i}.log").open("wb") as log, signals_held():
                procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=cwd,
                        env={**os.environ, **(env or {})},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + ready_timeout
        waiting = set(range(count))
        while waiting:
            for i in sorted(waiting):
                if _READY.search((logs / f"worker-{i}.log").read_bytes()):
                    waiting.discard(i)
                elif procs[i].poll() is not None:
                    raise FleetError(
                        f"worker {i} exited with code {procs[i].returncode}:\n"
                        + _tail(logs / f"worker-{i}.log")
                    )
            if waiting and time.monotonic() > deadline:
                first = min(waiting)
                raise FleetError(
                    f"workers {sorted(waiting)} not ready after {ready_timeout:.0f} s; "
                    f"worker {first}:\n" + _tail(logs / f"worker-{first}.log")
                )
            time.sleep(0.1)  # polling other processes' logs: there is no readiness event
        yield procs
    finally:
        with signals_held():  # a second Ctrl-C must not leave workers running
            stop_workers(procs, stop_timeout)
