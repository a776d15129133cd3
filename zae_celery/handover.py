"""Refunds a pool child hands to its worker's main process (settle coalescing).

With admission (the default), a worker's main process writes every grant of its tasks,
and its pool children write their settles. A refund (usage under the estimate) can ride
in a grant of the same bucket (``zae_settle_delay``; see docs/engine.md, "Settle
coalescing") only in the process that writes that grant: the main one. So a child whose
task reports usage that is refunds alone (``report_usage``: no debt, no in-flight slot
to free, no provider report to apply) hands them over instead of writing them, and
counts them in its lease (``Lease.settled_elsewhere``):

* ``worker_init`` (in the main process, before the pool forks) opens a pipe and starts
  a thread that reads it;
* a child writes one line per lease (its ticket and the refunds), in one ``write`` of at
  most ``PIPE_BUF`` bytes, so lines from several children never interleave; a longer
  line, or no pipe (solo and thread pools: the task ran in the main process already),
  and the child settles as before;
* the thread resumes the lease and commits the refunds in the main process's limiter,
  which holds them (or writes them at once when it cannot prove them) like its own;
* ``worker_shutdown`` (the pool has stopped) reads what is left in the pipe and writes
  every held refund.

What is lost at worst: a child killed after handing over loses nothing (the line is in
the pipe, the main process holds it); a main process killed (SIGKILL, OOM) loses the
refunds it held and the lines still in the pipe, at most ``zae_settle_delay`` seconds
of them: the buckets keep those estimates charged, and the fleet under-uses them once.
The same pipe carries the run log's facts (:mod:`zae_celery.runlog`): a child hands
each finished run's fact to the main process, whose run log writes them for all its
children at once (one write per run per ``zae_run_log`` interval and worker, not per
child).
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
from typing import Any

from celery.signals import worker_init, worker_shutdown

from .core import Lease
from .settings import Settings

log = logging.getLogger(__name__)
SHUTDOWN_WAIT = 10.0
"""Seconds the main process waits at shutdown for the reader to settle the last lines."""

_channel: dict[str, Any] = {}
"""The open pipe: ``read`` and ``write`` ends, the main process's ``pid`` and ``app``."""


def hand_over(lease: Lease, refunds: dict[str, int]) -> bool:
    """In a pool child: send ``lease``'s ``refunds`` (negative deltas) to the main
    process, which settles them; False (nothing sent) when there is no pipe, this is
    the main process, or the line is longer than one atomic write."""
    return _send({"lease": lease.ticket(), "refunds": refunds})


def hand_over_fact(run: str, fact: dict[str, Any]) -> bool:
    """In a pool child: send a run log fact (its stored form) to the main process's run
    log; False (nothing sent) as for :func:`hand_over`."""
    return _send({"run": run, "fact": fact})


def _send(message: dict[str, Any]) -> bool:
    channel = dict(_channel)
    if not channel or os.getpid() == channel["pid"]:
        return False
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > select.PIPE_BUF:
        return False
    try:
        os.write(channel["write"], line)
    except OSError as exc:  # the main process is gone: settle here
        log.warning("zae-celery could not hand a refund to the worker's main process: %s", exc)
        return False
    return True


@worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _open(sender: Any = None, **_: Any) -> None:
    """In the worker's main process, before the pool starts: the pipe and its reader."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    settings = Settings.from_app(app)
    if settings.settle_delay <= 0 and settings.run_log <= 0:
        return
    read, write = os.pipe()
    reader = threading.Thread(target=_receive, args=(app, read), daemon=True, name="zae-handover")
    _channel.update(read=read, write=write, pid=os.getpid(), app=app, reader=reader)
    reader.start()


def _receive(app: Any, fd: int) -> None:
    """The reader thread: settle each line as it comes, until every write end is
    closed (the children have exited and the main process closed its own)."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # closed at shutdown
            return
        if not chunk:
            return
        pending = _settle_lines(app, pending + chunk)


def _settle_lines(app: Any, data: bytes) -> bytes:
    """Settle every whole line of ``data``; returns the incomplete rest."""
    from .runlog import keep_fact
    from .task import limiter_for  # the task module imports this one

    *lines, rest = data.split(b"\n")
    _, limiter = limiter_for(app)
    for line in lines:
        try:
            message = json.loads(line)
            if "fact" in message:
                keep_fact(app, message["run"], message["fact"])
            else:
                limiter.resume(message["lease"]).commit(**message["refunds"])
        except Exception:  # one bad line must not stop the others; nothing is granted
            log.exception("zae-celery could not take a line handed over by a pool child")
    return rest


@worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _close(**_: Any) -> None:
    """The pool has stopped: the reader settles what is left in the pipe (it ends when
    the last write end closes), then the run log and every held refund are written."""
    from .runlog import close_run_log

    channel = dict(_channel)
    if not channel or os.getpid() != channel["pid"]:
        close_run_log()  # no pipe (solo, threads): what this process's tasks did
        return
    _channel.clear()
    os.close(channel["write"])
    channel["reader"].join(timeout=SHUTDOWN_WAIT)
    if channel["reader"].is_alive():  # a child outlived the pool: its lines are lost
        log.warning("zae-celery stopped reading refunds from pool children still running")
    close_run_log()  # the facts the children handed over, all read now
    from .task import limiter_for

    try:
        limiter_for(channel["app"])[1].flush()
    except Exception as exc:  # lost: under-use, never an early grant
        log.warning("zae-celery could not write the refunds it held at shutdown: %s", exc)
