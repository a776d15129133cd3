"""The run log: what each run of a rate-limited task did, written in batches for
``zae-celery runs`` (docs/accounting.md, "Runs").

Every run of a :class:`~zae_celery.RateLimitedTask` that reached its gate ends in
:data:`~zae_celery.signals.run_settled`, in the process that ran it. A receiver here
turns it into a :class:`~zae_celery.accounting.runs.TaskFact` and keeps it in this
process's :class:`RunLog`, which writes what it holds every ``zae_run_log`` seconds
(a daemon thread), at the process's exit and when the worker shuts down: one
UpdateItem per run per flush (its facts, as JSON), and once per run and process a marker
for ``runs list``. A prefork pool child hands its facts to the worker's main process
over the pipe of :mod:`zae_celery.handover`, so a worker writes for all its children at
once. None of these writes is on a task's path: a task only appends to a list (or writes
one line to a pipe).

What is lost at worst: a worker's main process killed (SIGKILL, OOM) loses the facts it
held, at most ``zae_run_log`` seconds of them (a child killed loses nothing it handed
over); a write that fails is tried again at the next flush (at
most :data:`MAX_HELD` facts are held, the oldest dropped first, with a warning). The
limits never depend on the log. On a Redis store the log is off: it lives in the
DynamoDB table.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery.signals import worker_process_shutdown

from .accounting.runs import TaskFact, chunks, flush_key, marker_key
from .core.stores import DynamoDBStore
from .handover import hand_over_fact
from .settings import Settings
from .signals import run_settled

__all__ = [
    "MAX_HELD",
    "STANDALONE",
    "RunLog",
    "close_run_log",
    "keep_fact",
    "run_log_for",
    "run_of",
]

log = logging.getLogger(__name__)
STANDALONE = "standalone:"
"""The prefix of the run of a task name's standalone tasks on a day (see :func:`run_of`)."""
MAX_HELD = 100_000
"""Most facts one process holds while its writes fail (the oldest go first)."""


class RunLog:
    """One process's facts, by run, and their writer.

    ``client`` is a boto3 DynamoDB client, ``interval`` the seconds between flushes (0:
    only :meth:`flush` writes), ``retention_days`` how long the items are kept (TTL).
    """

    def __init__(
        self,
        client: Any,
        table: str,
        interval: float,
        retention_days: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.table = table
        self.interval = interval
        self.retention_days = retention_days
        self.clock = clock
        self.writer = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._facts: dict[str, list[TaskFact]] = {}
        self._held = 0
        self._marked: set[str] = set()
        self._flushes = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, run: str, fact: TaskFact) -> None:
        """Keep ``fact`` of ``run`` until the next flush (starts the flusher)."""
        with self._lock:
            self._facts.setdefault(run, []).append(fact)
            self._held += 1
            if self._held > MAX_HELD:
                self._drop_oldest()
            if self._thread is None and self.interval > 0:
                self._thread = threading.Thread(target=self._run, daemon=True, name="zae-run-log")
                self._thread.start()

    def _drop_oldest(self) -> None:
        run = next(iter(self._facts))
        self._facts[run].pop(0)
        self._held -= 1
        if not self._facts[run]:
            del self._facts[run]
        log.warning("zae-celery's run log holds %d facts it could not write: dropped one", MAX_HELD)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.flush()
                failing = False
            except Exception as exc:  # kept for the next flush
                if not failing:  # once per outage, not every interval
                    log.warning("zae-celery could not write its run log (will retry): %s", exc)
                failing = True

    def flush(self) -> int:
        """Write every fact held now; returns how many. On an error the unwritten facts
        are kept (for the next flush) and the error raised."""
        with self._write_lock:
            with self._lock:
                pending, self._facts, self._held = self._facts, {}, 0
            written = 0
            try:
                for run in list(pending):
                    self._write(run, pending[run])
                    written += len(pending.pop(run))
            except self.client.exceptions.ResourceNotFoundException:
                log.warning(
                    "zae-celery's run log lost %d facts: table %s is gone",
                    sum(map(len, pending.values())),
                    self.table,
                )
                return written
            except Exception:
                with self._lock:
                    for run, facts in pending.items():
                        self._facts[run] = facts + self._facts.get(run, [])
                        self._held += len(facts)
                raise
            return written

    def _write(self, run: str, facts: list[TaskFact]) -> None:
        now = self.clock()
        ttl = str(int(now) + self.retention_days * 86_400)
        for text in chunks(facts):
            self._flushes += 1
            self.client.update_item(
                TableName=self.table,
                Key=flush_key(run, self.writer, self._flushes),
                UpdateExpression="SET #f = :f, #at = :at, #ttl = :ttl",
                ExpressionAttributeNames={"#f": "facts", "#at": "at", "#ttl": "ttl"},
                ExpressionAttributeValues={
                    ":f": {"S": text},
                    ":at": {"N": f"{now:.3f}"},
                    ":ttl": {"N": ttl},
                },
            )
        if run not in self._marked:
            first = min((f.started for f in facts if f.started is not None), default=now)
            self.client.update_item(
                TableName=self.table,
                Key=marker_key(run, first),
                UpdateExpression="SET #first = if_not_exists(#first, :first), #ttl = :ttl",
                ExpressionAttributeNames={"#first": "first", "#ttl": "ttl"},
                ExpressionAttributeValues={":first": {"N": f"{first:.3f}"}, ":ttl": {"N": ttl}},
            )
            self._marked.add(run)

    def close(self) -> None:
        """Stop the flusher and write what is held (errors are logged)."""
        self._stop.set()
        try:
            self.flush()
        except Exception as exc:
            log.warning("zae-celery could not write its run log at exit: %s", exc)


_logs: dict[tuple[int, int], RunLog | None] = {}
"""The run logs of this process, by (pid, app): a forked child makes its own."""
_logs_lock = threading.Lock()


def run_log_for(app: Any) -> RunLog | None:
    """This process's run log for ``app`` (None: off, or not a DynamoDB store)."""
    key = (os.getpid(), id(app))
    if key in _logs:
        return _logs[key]
    with _logs_lock:
        if key in _logs:
            return _logs[key]
        found = _log_store(app)
        runlog = None
        if found is not None:
            settings, store = found
            runlog = RunLog(
                store.client, store.table_name, settings.run_log, settings.run_retention
            )
            atexit.register(runlog.close)
        for other in [k for k in _logs if k[0] != key[0]]:
            del _logs[other]  # a parent's logs are not this process's
        _logs[key] = runlog
        return runlog


def _fact(task: Any, task_id: str, state: str, lease: Any, deferrals: int) -> TaskFact:
    request = task.request
    ticket = lease.ticket() if lease is not None else {}
    own = (ticket.get("targets") or [{}])[0]
    return TaskFact(
        task_id=task_id,
        name=str(task.name),
        outcome=state,
        started=getattr(request, "zae_started", None),
        waited=float(getattr(request, "zae_waited", 0.0) or 0.0)
        + float(getattr(request, "zae_admission_wait", 0.0) or 0.0),
        deferrals=deferrals,
        limited=bool(getattr(request, "zae_provider_limited", False)),
        bucket=f"{own['entity_id']}/{own['resource']}" if own else None,
        estimated={k: int(v) for k, v in (own.get("consume") or {}).items() if v},
        charged={k: int(v) for k, v in (lease.consumed if lease is not None else {}).items() if v},
        rates={lim["name"]: _rate(lim) for lim in own.get("limits") or () if "kind" not in lim},
    )


def _rate(limit: dict[str, Any]) -> float:
    """A ticket's limit's rate, tokens per second."""
    return float(limit["refill_amount"]) * 1000 / float(limit["refill_period_ms"])


@run_settled.connect(weak=False)  # type: ignore[untyped-decorator]
def _record(
    sender: Any = None,
    task_id: str = "",
    state: str = "",
    lease: Any = None,
    deferrals: int = 0,
    **_: Any,
) -> None:
    """Keep what this run did in the process's run log."""
    if sender is None or sender.request.is_eager or str(sender.name).startswith("celery."):
        return  # Celery's own tasks (chord_unlock polls, retrying) are not the pipeline's
    if _log_store(sender.app) is None:
        return
    fact = _fact(sender, task_id, state, lease, deferrals)
    run, stored = (
        run_of(sender.request, str(sender.name), fact.started or time.time()),
        fact.encode(),
    )
    if not hand_over_fact(run, stored):  # a pool child: its worker's log writes it
        keep_fact(sender.app, run, stored)


def _log_store(app: Any) -> tuple[Settings, DynamoDBStore] | None:
    """``app``'s settings and DynamoDB store when it keeps a run log (None: off, or not
    a DynamoDB store), found without making a client: a pool child that hands its facts
    over never needs one (making it, a moment before the task's result is sent, would
    delay that result and its late ack)."""
    from .task import limiter_for

    settings, limiter = limiter_for(app)
    store = getattr(limiter.store, "inner", limiter.store)  # under the metrics wrapper
    if settings.run_log > 0 and isinstance(store, DynamoDBStore):
        return settings, store
    return None


def keep_fact(app: Any, run: str, fact: dict[str, Any]) -> None:
    """Keep a fact (its stored form) in this process's run log (if it has one)."""
    runlog = run_log_for(app)
    if runlog is not None:
        runlog.add(run, TaskFact.decode(fact))


def run_of(request: Any, task_name: str, at: float) -> str:
    """The run a task's request belongs to: its ``rate_run``; else its ``root_id`` when
    another task started it (a canvas sent from a task, a task's subtasks: the whole
    pipeline under its entry task); else its group's id (Celery gives the members of a
    group or chord header sent from outside any task no common root_id); else its own
    id when it started tasks (a pipeline's entry task). A task sent on its own that
    started none (``delay()`` in a loop) is a run of one task, which nobody asks about one by
    one and which would cost a write each: those runs of a task name on a UTC day are
    one run, ``standalone:<task name>:<day>`` (at ``at``, epoch s)."""
    named = getattr(getattr(request, "zae_run", None), "run_id", None)
    if named:
        return str(named)
    root = getattr(request, "root_id", None)
    if root and root != request.id:
        return str(root)
    group = getattr(request, "group", None)
    if group:
        return str(group)
    if getattr(request, "children", None):  # it started tasks: a pipeline's entry task
        return str(request.id)
    day = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d")
    return f"{STANDALONE}{task_name}:{day}"


@worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def close_run_log(**_: Any) -> None:
    """This process stops (a pool child; a worker's main process, called by
    :mod:`zae_celery.handover` once the children's last lines are read): write what its
    run log holds."""
    pid = os.getpid()
    for key, runlog in list(_logs.items()):
        if key[0] == pid and runlog is not None:
            runlog.close()
