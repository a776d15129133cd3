"""zae-celery's settings, read from a Celery app's configuration (``zae_`` prefix).

=======================  ==========  ===================================================
setting                  default     meaning
=======================  ==========  ===================================================
``zae_table_name``       (required)  the DynamoDB table of the buckets
``zae_endpoint_url``     None        a local endpoint (moto server, DynamoDB Local)
``zae_region``           None        AWS region (else the boto3 chain)
``zae_on_unavailable``   "closed"    "closed": defer tasks while DynamoDB is unreachable;
                                     "open": run them unchecked and log a warning
``zae_queue_limits``     {}          ``{"queue": [Limit, ...]}``: limits shared by every
                                     rate-aware task consumed from that queue
``zae_default_entity``   "default"   the entity of tasks without ``rate_entity``
``zae_horizon``          60.0        seconds: how far ahead a refused task may reserve a
                                     slot (see below)
``zae_max_deferrals``    100         deferrals of one task before it fails
``zae_jitter``           0.5         seconds of random spread added to blind deferrals
``zae_start_wait``       1.0         seconds a worker may wait in place for its slot
                                     rather than republish the task (0: always
                                     republish a task that cannot start now)
``zae_unavailable_retry``  5.0       seconds before a task deferred by an outage retries
``zae_admission``        True        the worker's consumer admits rate-limited tasks at
                                     the buckets' pace; the rest wait in the broker
``zae_admission_window``  1.0        seconds ahead a held task's slot is asked for
``zae_admission_hold``   16          messages a queue may hold in a worker before it
                                     pauses (``basic.cancel``) until half are gone
``zae_admission_max_hold``  600.0    seconds a message may wait for a slot in a worker
                                     before the pool republishes it (keep it well below
                                     the broker's visibility timeout/consumer_timeout)
=======================  ==========  ===================================================

Why the horizon is short: a deferred task is a countdown message that the worker holds in
memory until it is due (outside the prefetch window), and a Redis or SQS broker redelivers
a message left unacknowledged longer than its visibility timeout (Redis 3600 s, SQS 1800 s
by default), which would run it twice. 60 s keeps every deferral far below both and keeps
the number of messages held in worker memory to one minute of traffic. It may be set up
to 900 s.

When DynamoDB fails (no reply, throttling or 5xx beyond the engine's retries),
``zae_breaker_threshold`` (5) calls in a row open each worker process's circuit breaker:
its tasks are then deferred (or, with "open", run unchecked) without any request, and
after ``zae_breaker_cooldown`` (5.0) seconds one probe request decides whether it closes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zae_celery.core import Limit, ValidationError
from zae_celery.core.schema import check_id

__all__ = ["MAX_HORIZON", "Settings"]

MAX_HORIZON = 900.0


def _seconds(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValidationError(
            name, f"{value!r} is not a number of seconds", f"{low}..{high} seconds"
        )
    if not low <= value <= high:
        raise ValidationError(name, f"{value!r} is out of range", f"{low}..{high} seconds")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(name, f"{value!r}", "an integer >= 1")
    return value


@dataclass(frozen=True)
class Settings:
    """The ``zae_`` settings of one Celery app, validated."""

    table_name: str
    endpoint_url: str | None = None
    region: str | None = None
    on_unavailable: str = "closed"
    queue_limits: Mapping[str, Sequence[Limit]] = field(default_factory=dict)
    default_entity: str = "default"
    horizon: float = 60.0
    max_deferrals: int = 100
    jitter: float = 0.5
    start_wait: float = 1.0
    unavailable_retry: float = 5.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 5.0
    admission: bool = True
    admission_window: float = 1.0
    admission_hold: int = 16
    admission_max_hold: float = 600.0

    @classmethod
    def from_app(cls, app: Any) -> Settings:
        """Read and validate ``app.conf.zae_*``; ValidationError names the setting."""
        conf = app.conf
        table = conf.get("zae_table_name")
        if not isinstance(table, str) or not table:
            raise ValidationError(
                "zae_table_name", "is not set", "app.conf.zae_table_name = 'rate_limits'"
            )
        on_unavailable = conf.get("zae_on_unavailable", "closed")
        if on_unavailable not in ("closed", "open"):
            raise ValidationError("zae_on_unavailable", f"{on_unavailable!r}", "'closed' or 'open'")
        queue_limits = conf.get("zae_queue_limits") or {}
        if not isinstance(queue_limits, Mapping):
            raise ValidationError(
                "zae_queue_limits", "must be a dict", "{'queue name': [Limit, ...]}"
            )
        checked: dict[str, tuple[Limit, ...]] = {}
        for queue, limits in queue_limits.items():
            check_id(f"zae_queue_limits[{queue!r}]", queue)
            if isinstance(limits, Limit) or not all(isinstance(lim, Limit) for lim in limits):
                raise ValidationError(
                    f"zae_queue_limits[{queue!r}]", "must be a list of Limit", "[Limit, ...]"
                )
            checked[queue] = tuple(limits)
        default_entity = check_id("zae_default_entity", conf.get("zae_default_entity", "default"))
        max_deferrals = _count("zae_max_deferrals", conf.get("zae_max_deferrals", 100))
        admission = conf.get("zae_admission", True)
        if not isinstance(admission, bool):
            raise ValidationError("zae_admission", f"{admission!r}", "True or False")
        return cls(
            table_name=table,
            endpoint_url=conf.get("zae_endpoint_url"),
            region=conf.get("zae_region"),
            on_unavailable=on_unavailable,
            queue_limits=checked,
            default_entity=default_entity,
            horizon=_seconds("zae_horizon", conf.get("zae_horizon", 60.0), 0.0, MAX_HORIZON),
            max_deferrals=max_deferrals,
            jitter=_seconds("zae_jitter", conf.get("zae_jitter", 0.5), 0.0, 60.0),
            start_wait=_seconds("zae_start_wait", conf.get("zae_start_wait", 1.0), 0.0, 30.0),
            unavailable_retry=_seconds(
                "zae_unavailable_retry", conf.get("zae_unavailable_retry", 5.0), 0.1, MAX_HORIZON
            ),
            breaker_threshold=_count("zae_breaker_threshold", conf.get("zae_breaker_threshold", 5)),
            breaker_cooldown=_seconds(
                "zae_breaker_cooldown", conf.get("zae_breaker_cooldown", 5.0), 0.1, MAX_HORIZON
            ),
            admission=admission,
            admission_window=_seconds(
                "zae_admission_window", conf.get("zae_admission_window", 1.0), 0.0, 60.0
            ),
            admission_hold=_count("zae_admission_hold", conf.get("zae_admission_hold", 16)),
            admission_max_hold=_seconds(
                "zae_admission_max_hold", conf.get("zae_admission_max_hold", 600.0), 1.0, 86400.0
            ),
        )
