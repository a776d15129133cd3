"""Runs: what one pipeline run (a group, a chord, a chain: every task under one Celery
``root_id``, unless a task names its run) started, consumed and waited for.

Each worker process keeps what its tasks did (one :class:`TaskFact` per run of a task)
and writes it in batches (:mod:`zae_celery.runlog`): one item per run per flush.

===================  ==============================  ===================================
PK                   SK                              item
===================  ==============================  ===================================
``R#<run>``          ``L#<writer>#<n>``              one flush: ``facts`` (JSON), ``at``
``RUNS#<day>``       ``<run>``                       a run seen on that UTC day (``first``)
===================  ==============================  ===================================

``<writer>`` names the process (host, pid and a random part), ``<n>`` counts its flushes.
A run's marker is written once per process, on the day of its first flush there, so
``runs list`` reads one partition per day. Both kinds expire (``ttl``) after the run
retention. :func:`read_run` reads a run's flushes back and :func:`summarize` computes its
figures exactly from the facts (no sampling: the percentiles are of every run).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from .snapshots import query_pages

__all__ = [
    "LimitTotals",
    "RunEntry",
    "RunReport",
    "TaskFact",
    "day_key",
    "flush_key",
    "list_runs",
    "marker_key",
    "read_run",
    "summarize",
]

RUN_PREFIX = "R#"
DAY_PREFIX = "RUNS#"
MAX_FACTS_BYTES = 300_000
"""Most bytes of facts one flush item holds (DynamoDB's items stop at 400 KB)."""


@dataclass(frozen=True)
class TaskFact:
    """One run of one task, as the process that ran it saw it."""

    task_id: str
    name: str
    outcome: str
    """How the run ended: SUCCESS, FAILURE, RETRY (a deferral or a retry), ..."""
    started: float | None
    """When its body started (epoch s); None: it never did (deferred at its gate)."""
    waited: float
    """Seconds it waited for its slots (held by its worker's consumer, then in place)."""
    deferrals: int
    """Deferrals of the task before this run."""
    limited: bool
    """The provider answered 429 (or was overloaded) during this run."""
    bucket: str | None
    """``entity/resource`` of its own bucket (None: no limits applied)."""
    estimated: Mapping[str, int] = field(default_factory=dict)
    """Per limit: tokens granted before the body ran (the estimate)."""
    charged: Mapping[str, int] = field(default_factory=dict)
    """Per limit: tokens kept after the run settled (reported usage, rate_on_error)."""
    rates: Mapping[str, float] = field(default_factory=dict)
    """Per limit of its own bucket: the limit's rate, tokens per second (for charts)."""

    def encode(self) -> dict[str, Any]:
        """The compact JSON form stored in a flush item."""
        out: dict[str, Any] = {"i": self.task_id, "n": self.name, "s": self.outcome}
        if self.started is not None:
            out["t"] = round(self.started, 3)
        if self.waited:
            out["w"] = round(self.waited, 3)
        if self.deferrals:
            out["d"] = self.deferrals
        if self.limited:
            out["p"] = 1
        if self.bucket is not None:
            out["b"] = self.bucket
        if self.estimated:
            out["e"] = dict(self.estimated)
        if self.charged:
            out["c"] = dict(self.charged)
        if self.rates:
            out["r"] = {k: round(v, 6) for k, v in self.rates.items()}
        return out

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> TaskFact:
        """The inverse of :meth:`encode`."""
        return cls(
            task_id=str(data["i"]),
            name=str(data.get("n", "")),
            outcome=str(data.get("s", "")),
            started=float(data["t"]) if "t" in data else None,
            waited=float(data.get("w", 0.0)),
            deferrals=int(data.get("d", 0)),
            limited=bool(data.get("p", 0)),
            bucket=data.get("b"),
            estimated={k: int(v) for k, v in (data.get("e") or {}).items()},
            charged={k: int(v) for k, v in (data.get("c") or {}).items()},
            rates={k: float(v) for k, v in (data.get("r") or {}).items()},
        )


def _day(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d")


def flush_key(run: str, writer: str, n: int) -> dict[str, dict[str, str]]:
    """The key of a process's ``n``-th flush of ``run``."""
    return {"PK": {"S": RUN_PREFIX + run}, "SK": {"S": f"L#{writer}#{n:08d}"}}


def marker_key(run: str, at: float) -> dict[str, dict[str, str]]:
    """The key of ``run``'s marker for the UTC day of ``at``."""
    return {"PK": {"S": day_key(_day(at))}, "SK": {"S": run}}


def day_key(day: str) -> str:
    """The partition of the runs seen on a UTC day (``2026-12-04``)."""
    return DAY_PREFIX + day


def chunks(facts: Sequence[TaskFact]) -> list[str]:
    """``facts`` as JSON arrays of at most :data:`MAX_FACTS_BYTES` each (one per item)."""
    out: list[str] = []
    part: list[str] = []
    size = 2
    for fact in facts:
        text = json.dumps(fact.encode(), separators=(",", ":"))
        if part and size + len(text) + 1 > MAX_FACTS_BYTES:
            out.append("[" + ",".join(part) + "]")
            part, size = [], 2
        part.append(text)
        size += len(text) + 1
    if part:
        out.append("[" + ",".join(part) + "]")
    return out


@dataclass(frozen=True)
class LimitTotals:
    """One limit's tokens over a run."""

    estimated: int
    charged: int


@dataclass(frozen=True)
class RunReport:
    """A run's figures, computed from every fact its workers wrote."""

    run: str
    tasks: int
    """Distinct tasks seen."""
    started: int
    """Tasks whose body started at least once."""
    succeeded: int
    failed: int
    """Tasks whose last run failed."""
    deferrals: int
    """Runs that ended deferred or retried (state RETRY)."""
    provider_429s: int
    limits: Mapping[str, LimitTotals]
    wait_total: float
    wait_p50: float
    wait_p99: float
    first_start: datetime | None
    last_start: datetime | None
    buckets: Sequence[str]
    facts: Sequence[TaskFact] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (``runs show --json``), without the facts."""
        out = asdict(self)
        out.pop("facts")
        for key in ("first_start", "last_start"):
            value = getattr(self, key)
            out[key] = value.isoformat() if value else None
        out["limits"] = {n: asdict(t) for n, t in sorted(self.limits.items())}
        out["buckets"] = list(self.buckets)
        return out


def _percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (an observed value; 0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(run: str, facts: Iterable[TaskFact]) -> RunReport:
    """A run's figures from its facts (in any order)."""
    facts = sorted(facts, key=lambda f: (f.started or 0.0, f.task_id))
    last_state: dict[str, str] = {}
    started_ids: set[str] = set()
    estimated: dict[str, int] = {}
    charged: dict[str, int] = {}
    waits: list[float] = []
    starts: list[float] = []
    for fact in facts:
        last_state[fact.task_id] = fact.outcome
        if fact.started is not None:
            started_ids.add(fact.task_id)
            starts.append(fact.started)
            waits.append(fact.waited)
        for name, n in fact.estimated.items():
            estimated[name] = estimated.get(name, 0) + n
        for name, n in fact.charged.items():
            charged[name] = charged.get(name, 0) + n
    states = list(last_state.values())
    names = sorted(set(estimated) | set(charged))

    def moment(value: float | None) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, timezone.utc)

    return RunReport(
        run=run,
        tasks=len(last_state),
        started=len(started_ids),
        succeeded=states.count("SUCCESS"),
        failed=states.count("FAILURE"),
        deferrals=sum(1 for f in facts if f.outcome == "RETRY"),
        provider_429s=sum(1 for f in facts if f.limited),
        limits={n: LimitTotals(estimated.get(n, 0), charged.get(n, 0)) for n in names},
        wait_total=round(sum(f.waited for f in facts), 3),
        wait_p50=_percentile(waits, 50),
        wait_p99=_percentile(waits, 99),
        first_start=moment(min(starts, default=None)),
        last_start=moment(max(starts, default=None)),
        buckets=sorted({f.bucket for f in facts if f.bucket}),
        facts=tuple(facts),
    )


def read_run(client: Any, table: str, run: str) -> RunReport | None:
    """A run's report (None: no worker wrote anything for it)."""
    request = {
        "TableName": table,
        "KeyConditionExpression": "PK = :pk AND begins_with(SK, :l)",
        "ExpressionAttributeValues": {":pk": {"S": RUN_PREFIX + run}, ":l": {"S": "L#"}},
        "ConsistentRead": True,
    }
    facts = [
        TaskFact.decode(entry)
        for item in query_pages(client, request)
        for entry in json.loads(item["facts"]["S"])
    ]
    return summarize(run, facts) if facts else None


@dataclass(frozen=True)
class RunEntry:
    """A run as ``runs list`` shows it: when a worker first wrote for it."""

    run: str
    first_seen: datetime


def list_runs(client: Any, table: str, since: date, until: date) -> list[RunEntry]:
    """The runs seen from ``since`` to ``until`` (UTC days, both included), earliest first."""
    if until < since:
        return []
    first: dict[str, float] = {}
    day = since
    while day <= until:
        request = {
            "TableName": table,
            "KeyConditionExpression": "PK = :pk",
            "ExpressionAttributeValues": {":pk": {"S": day_key(day.isoformat())}},
        }
        for item in query_pages(client, request):
            seen = float(item["first"]["N"])
            run = item["SK"]["S"]
            first[run] = min(seen, first.get(run, seen))
        day += timedelta(days=1)
    return [
        RunEntry(run, datetime.fromtimestamp(at, timezone.utc))
        for run, at in sorted(first.items(), key=lambda kv: (kv[1], kv[0]))
    ]
