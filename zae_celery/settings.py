"""zae-celery's settings, read from a Celery app's configuration (``zae_`` prefix).

Every setting is declared once, in :data:`SETTINGS`: its name, default, the check that
validates it (and says what is allowed) and what it means. :class:`Settings` reads an
app's configuration through those declarations, task options that override a setting
(``rate_horizon``, ``rate_max_deferrals``) are checked by the same check, and the
command line's global options (``--table``, ``--endpoint-url``, ``--region``) validate
with the declarations of ``zae_table_name``, ``zae_endpoint_url`` and ``zae_region``.
:func:`settings_table` renders the declarations (docs/celery.md shows that table).

Why the horizon is short: a deferred task is a countdown message that the worker holds in
memory until it is due (outside the prefetch window), and a Redis or SQS broker redelivers
a message left unacknowledged longer than its visibility timeout (Redis 3600 s, SQS 1800 s
by default), which would run it twice. 60 s keeps every deferral far below both and keeps
the number of messages held in worker memory to one minute of traffic. It may be set up
to 900 s.

When the store fails (no reply, throttling or 5xx beyond the engine's retries),
``zae_breaker_threshold`` calls in a row open each worker process's circuit breaker: its
tasks are then deferred (or, with "open", run unchecked) without any request, and after
``zae_breaker_cooldown`` seconds one probe request decides whether it closes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from zae_celery.core import Limit, ValidationError, check_id
from zae_celery.core.stores import StoreUrl
from zae_celery.infra.stack import check_table_name

__all__ = [
    "ADMISSION",
    "ADMISSION_HOLD",
    "ADMISSION_MAX_HOLD",
    "ADMISSION_WINDOW",
    "BREAKER_COOLDOWN",
    "BREAKER_THRESHOLD",
    "DEFAULT_ENTITY",
    "EAGER",
    "ENDPOINT_URL",
    "HORIZON",
    "JITTER",
    "MAX_DEFERRALS",
    "MAX_HORIZON",
    "ON_UNAVAILABLE",
    "QUEUE_LIMITS",
    "REGION",
    "REQUIRED",
    "SETTINGS",
    "SLOT_POLL",
    "START_WAIT",
    "TABLE_NAME",
    "UNAVAILABLE_RETRY",
    "Check",
    "Count",
    "EntityId",
    "Flag",
    "OneOf",
    "QueueLimits",
    "Seconds",
    "Setting",
    "Settings",
    "TableName",
    "Text",
    "Url",
    "check_limits",
    "settings_table",
]

MAX_HORIZON = 900.0
"""The longest ``zae_horizon``/``rate_horizon``, in seconds (see the module's docstring)."""

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Check(Protocol[T_co]):
    """Validates one value: returns it (normalised) or raises a ValidationError naming
    ``name`` that says what is ``allowed``. ``quote=False`` keeps the value out of the
    message (it may come from a task's arguments)."""

    @property
    def allowed(self) -> str:
        """What is accepted, for messages and docs."""

    def __call__(self, name: str, value: Any, quote: bool = True) -> T_co:
        """The value, or ValidationError."""


def _shown(value: Any, quote: bool) -> str:
    return repr(value) if quote else f"a {type(value).__name__} (the value is not shown)"


@dataclass(frozen=True)
class Seconds:
    """A number of seconds in ``low..high`` (no bool, NaN or infinity)."""

    low: float
    high: float

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return f"{self.low}..{self.high} seconds"

    def __call__(self, name: str, value: Any, quote: bool = True) -> float:
        """The value as a float, or ValidationError."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValidationError(
                name, f"{_shown(value, quote)} is not a number of seconds", self.allowed
            )
        if not self.low <= value <= self.high:
            raise ValidationError(name, f"{_shown(value, quote)} is out of range", self.allowed)
        return float(value)


@dataclass(frozen=True)
class Port:
    """A TCP port (1..65535), or None: off."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "None (off) or a port, 1..65535"

    def __call__(self, name: str, value: Any, quote: bool = True) -> int | None:
        """The value, or ValidationError."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValidationError(name, _shown(value, quote), self.allowed)
        return value


class Count:
    """A whole number >= 1 (no bool)."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "an integer >= 1"

    def __call__(self, name: str, value: Any, quote: bool = True) -> int:
        """The value, or ValidationError."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValidationError(name, _shown(value, quote), self.allowed)
        return value


@dataclass(frozen=True)
class OneOf:
    """One of a few strings."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return " or ".join(repr(c) for c in self.choices)

    def __call__(self, name: str, value: Any, quote: bool = True) -> str:
        """The value, or ValidationError."""
        if not isinstance(value, str) or value not in self.choices:
            raise ValidationError(name, _shown(value, quote), self.allowed)
        return value


@dataclass(frozen=True)
class Flag:
    """True or False (not a truthy value)."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "True or False"

    def __call__(self, name: str, value: Any, quote: bool = True) -> bool:
        """The value, or ValidationError."""
        if not isinstance(value, bool):
            raise ValidationError(name, _shown(value, quote), self.allowed)
        return value


@dataclass(frozen=True)
class EntityId:
    """An entity or resource id (the engine's rules)."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return (
            "1..256 letters, digits and _ . : @ / + = , - (not starting with punctuation); "
            "no # or *"
        )

    def __call__(self, name: str, value: Any, quote: bool = True) -> str:
        """The value, or ValidationError."""
        try:
            return check_id(name, value)
        except ValidationError as exc:
            problem = (
                exc.problem
                if quote
                else f"is not a valid id ({type(value).__name__}; the value is not shown)"
            )
            raise ValidationError(name, problem, self.allowed) from None


@dataclass(frozen=True)
class TableName:
    """A DynamoDB table name (required)."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "3-255 letters, digits, underscores, dots or dashes"

    def __call__(self, name: str, value: Any, quote: bool = True) -> str:
        """The value, or ValidationError."""
        if value is None or value == "":
            raise ValidationError(
                name, "is not set", f"{self.allowed}, e.g. app.conf.{name} = 'rate_limits'"
            )
        if not isinstance(value, str):
            raise ValidationError(
                name, f"must be a string, got {type(value).__name__}", self.allowed
            )
        try:
            return check_table_name(value)
        except ValueError:
            raise ValidationError(name, f"invalid table name {value!r}", self.allowed) from None


@dataclass(frozen=True)
class Url:
    """An http:// or https:// URL, or None (an empty string is None)."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "an http:// or https:// URL, e.g. http://127.0.0.1:8000"

    def __call__(self, name: str, value: Any, quote: bool = True) -> str | None:
        """The value, or ValidationError."""
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ValidationError(
                name, f"{_shown(value, quote)} is not an http:// or https:// URL", self.allowed
            )
        return value


@dataclass(frozen=True)
class StoreUrlCheck:
    """A store URL (``dynamodb://TABLE?...``, ``redis://HOST:PORT/DB?prefix=...``,
    ``rediss://...``, ``redis+cluster://HOST:PORT`` or ``memory://NAME``), or None."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return (
            "dynamodb://TABLE?region=...&endpoint_url=..., redis://HOST:PORT/DB?prefix=NAME "
            "(rediss:// for TLS, redis+cluster://HOST:PORT for a cluster) or memory://NAME, "
            "or None"
        )

    def __call__(self, name: str, value: Any, quote: bool = True) -> str | None:
        """The value, or ValidationError."""
        if value is None or value == "":
            return None
        try:
            StoreUrl.parse(value, name)
        except ValidationError as exc:
            raise ValidationError(name, exc.problem, self.allowed) from None
        return str(value)


@dataclass(frozen=True)
class Text:
    """A non-empty string, or None (an empty string is None)."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "a string, or None"

    def __call__(self, name: str, value: Any, quote: bool = True) -> str | None:
        """The value, or ValidationError."""
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValidationError(
                name, f"must be a string, got {type(value).__name__}", self.allowed
            )
        return value


def check_limits(name: str, value: Any, quote: bool = True) -> tuple[Limit, ...]:
    """A list (or tuple) of :class:`Limit` with distinct names, as a tuple; None is none.

    A single Limit, a string, a mapping or anything not iterable is refused with a
    ValidationError naming ``name`` (never a TypeError)."""
    allowed = "[Limit, ...]: a list of Limit objects with distinct names"
    if value is None:
        return ()
    if isinstance(value, (Limit, str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValidationError(name, f"must be a list of Limit, got {type(value).__name__}", allowed)
    limits = tuple(value)
    for item in limits:
        if not isinstance(item, Limit):
            raise ValidationError(
                name, f"must be a list of Limit, holds a {type(item).__name__}", allowed
            )
    names = [lim.name for lim in limits]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValidationError(name, f"limit {', '.join(twice)} given twice", allowed)
    return limits


@dataclass(frozen=True)
class QueueLimits:
    """``{"queue name": [Limit, ...]}``; None is none."""

    @property
    def allowed(self) -> str:
        """What is accepted."""
        return "{'queue name': [Limit, ...]}"

    def __call__(
        self, name: str, value: Any, quote: bool = True
    ) -> Mapping[str, tuple[Limit, ...]]:
        """The value with tuples of limits, or ValidationError."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValidationError(name, "must be a dict", self.allowed)
        checked: dict[str, tuple[Limit, ...]] = {}
        for queue, limits in value.items():
            check_id(f"{name}[{queue!r}]", queue)
            checked[queue] = check_limits(f"{name}[{queue!r}]", limits)
        return checked


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a setting that has none (it must be set)."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One ``zae_`` setting, declared once: its name in ``app.conf``, its default (or
    :data:`REQUIRED`), the check that validates it and what it means."""

    name: str
    default: Any
    check: Check[T]
    doc: str

    @property
    def attr(self) -> str:
        """Its field in :class:`Settings` (the name without ``zae_``)."""
        return self.name.removeprefix("zae_")

    def validate(self, value: Any) -> T:
        """``value`` checked as this setting (ValidationError names the setting)."""
        return self.check(self.name, value)

    def read(self, conf: Any) -> T:
        """This setting's value in a Celery configuration (or any mapping), checked."""
        value = conf.get(self.name, None)
        if value is None and self.default is not REQUIRED:
            value = self.default
        return self.validate(value)


STORE_URL: Setting[str | None] = Setting(
    "zae_store_url",
    None,
    StoreUrlCheck(),
    "where the buckets live, as one URL (instead of the next three settings): a DynamoDB "
    "table, or a Redis server or cluster (the prefix names the store; no table to create); "
    "memory://NAME keeps them in each worker process (tests, eager runs)",
)
TABLE_NAME: Setting[str] = Setting(
    "zae_table_name",
    REQUIRED,
    TableName(),
    "the DynamoDB table of the buckets (required unless zae_store_url is set)",
)
ENDPOINT_URL: Setting[str | None] = Setting(
    "zae_endpoint_url", None, Url(), "a local endpoint (moto server, DynamoDB Local)"
)
REGION: Setting[str | None] = Setting(
    "zae_region", None, Text(), "the AWS region (else the boto3 chain's)"
)
ON_UNAVAILABLE: Setting[str] = Setting(
    "zae_on_unavailable",
    "closed",
    OneOf(("closed", "open")),
    "'closed': defer tasks while the store is unreachable; 'open': run them unchecked "
    "and log a warning",
)
QUEUE_LIMITS: Setting[Mapping[str, tuple[Limit, ...]]] = Setting(
    "zae_queue_limits",
    {},
    QueueLimits(),
    "limits shared by every rate-aware task consumed from a queue",
)
DEFAULT_ENTITY: Setting[str] = Setting(
    "zae_default_entity", "default", EntityId(), "the entity of tasks without rate_entity"
)
HORIZON: Setting[float] = Setting(
    "zae_horizon",
    60.0,
    Seconds(0.0, MAX_HORIZON),
    "how far ahead a refused task may reserve a slot (bounded by brokers' visibility timeouts)",
)
MAX_DEFERRALS: Setting[int] = Setting(
    "zae_max_deferrals",
    100,
    Count(),
    "deferrals of one task caused by an unreachable store before it fails",
)
JITTER: Setting[float] = Setting(
    "zae_jitter", 0.5, Seconds(0.0, 60.0), "random spread added to blind deferrals"
)
START_WAIT: Setting[float] = Setting(
    "zae_start_wait",
    1.0,
    Seconds(0.0, 30.0),
    "how long a worker may wait in place for its slot rather than republish the task "
    "(0: always republish a task that cannot start now)",
)
SLOT_POLL: Setting[float] = Setting(
    "zae_slot_poll",
    0.25,
    Seconds(0.01, 1.0),
    "how often a task that finds an in-flight cap full asks again for a slot while it "
    "waits in place (one refused write each time; a freed slot stays idle about half of it)",
)
SETTLE_DELAY: Setting[float] = Setting(
    "zae_settle_delay",
    1.0,
    Seconds(0.0, 60.0),
    "how long a finished task's refund (usage under its estimate) may wait to ride in a "
    "later write to its bucket (the worker's next grant) instead of a write of its own "
    "(0: every settle writes at once; debt never waits)",
)
RUN_LOG: Setting[float] = Setting(
    "zae_run_log",
    5.0,
    Seconds(0.0, 3600.0),
    "how often each worker process writes what its tasks did, for 'zae-celery runs' "
    "(one write per run per interval; 0: no run log)",
)
RUN_RETENTION: Setting[int] = Setting(
    "zae_run_retention",
    90,
    Count(),
    "days the run log is kept (TTL)",
)
UNAVAILABLE_RETRY: Setting[float] = Setting(
    "zae_unavailable_retry",
    5.0,
    Seconds(0.1, MAX_HORIZON),
    "the wait before a task deferred by an outage retries",
)
BREAKER_THRESHOLD: Setting[int] = Setting(
    "zae_breaker_threshold",
    5,
    Count(),
    "failed store calls in a row that open a worker process's circuit breaker",
)
BREAKER_COOLDOWN: Setting[float] = Setting(
    "zae_breaker_cooldown",
    5.0,
    Seconds(0.1, MAX_HORIZON),
    "how long an open breaker waits before one probe request",
)
ADMISSION: Setting[bool] = Setting(
    "zae_admission",
    True,
    Flag(),
    "the worker's consumer admits rate-limited tasks at the buckets' pace; the rest "
    "wait in the broker",
)
ADMISSION_WINDOW: Setting[float] = Setting(
    "zae_admission_window",
    1.0,
    Seconds(0.0, 60.0),
    "how far ahead a held task's slot is asked for",
)
ADMISSION_HOLD: Setting[int] = Setting(
    "zae_admission_hold",
    16,
    Count(),
    "messages a queue may hold in a worker before it pauses until half are gone",
)
ADMISSION_MAX_HOLD: Setting[float] = Setting(
    "zae_admission_max_hold",
    600.0,
    Seconds(1.0, 86400.0),
    "how long a message may wait for a slot in a worker before the pool republishes it "
    "(keep it well below the broker's visibility timeout/consumer_timeout)",
)

EAGER: Setting[str] = Setting(
    "zae_eager",
    "wait",
    OneOf(("wait", "admit")),
    "eager runs (task_always_eager, apply()): 'wait' in place for the slot, up to the "
    "task's horizon, then fail with RateLimitExceeded; 'admit' a refused task at once, "
    "without a lease, and log a warning",
)
METRICS_PORT: Setting[int | None] = Setting(
    "zae_metrics_port",
    None,
    Port(),
    "where a worker with the zae_celery.metrics.MetricsStep bootstep serves Prometheus "
    "metrics (127.0.0.1 unless zae_metrics_host); None: no metrics are recorded",
)
METRICS_HOST: Setting[str | None] = Setting(
    "zae_metrics_host",
    "127.0.0.1",
    Text(),
    "the address the metrics endpoint listens on ('0.0.0.0': every interface)",
)

SETTINGS: tuple[Setting[Any], ...] = (
    STORE_URL,
    TABLE_NAME,
    ENDPOINT_URL,
    REGION,
    ON_UNAVAILABLE,
    QUEUE_LIMITS,
    DEFAULT_ENTITY,
    HORIZON,
    MAX_DEFERRALS,
    JITTER,
    START_WAIT,
    SLOT_POLL,
    SETTLE_DELAY,
    RUN_LOG,
    RUN_RETENTION,
    UNAVAILABLE_RETRY,
    BREAKER_THRESHOLD,
    BREAKER_COOLDOWN,
    ADMISSION,
    ADMISSION_WINDOW,
    ADMISSION_HOLD,
    ADMISSION_MAX_HOLD,
    EAGER,
    METRICS_PORT,
    METRICS_HOST,
)
"""Every ``zae_`` setting, in the order of :class:`Settings`' fields."""


@dataclass(frozen=True)
class Settings:
    """The ``zae_`` settings of one Celery app, validated (one field per :data:`SETTINGS`
    entry; build it with :meth:`from_app` or :meth:`from_conf`)."""

    store_url: str | None
    table_name: str | None
    endpoint_url: str | None
    region: str | None
    on_unavailable: str
    queue_limits: Mapping[str, tuple[Limit, ...]]
    default_entity: str
    horizon: float
    max_deferrals: int
    jitter: float
    start_wait: float
    slot_poll: float
    settle_delay: float
    run_log: float
    run_retention: int
    unavailable_retry: float
    breaker_threshold: int
    breaker_cooldown: float
    admission: bool
    admission_window: float
    admission_hold: int
    admission_max_hold: float
    eager: str
    metrics_port: int | None
    metrics_host: str | None

    @classmethod
    def from_conf(cls, conf: Any) -> Settings:
        """Read and validate the ``zae_*`` keys of a configuration (anything with
        ``get``); unset ones take their declared default. ValidationError names the
        setting."""
        store_url = STORE_URL.read(conf)
        if store_url is None:
            return cls(**{setting.attr: setting.read(conf) for setting in SETTINGS})
        clashing = [s.name for s in (TABLE_NAME, ENDPOINT_URL, REGION) if conf.get(s.name)]
        if clashing:
            raise ValidationError(
                STORE_URL.name,
                f"is set together with {', '.join(clashing)}",
                "one or the other: the URL names the table, region and endpoint",
            )
        rest = (s for s in SETTINGS if s not in (STORE_URL, TABLE_NAME, ENDPOINT_URL, REGION))
        return cls(
            store_url=store_url,
            table_name=None,
            endpoint_url=None,
            region=None,
            **{setting.attr: setting.read(conf) for setting in rest},
        )

    @classmethod
    def from_app(cls, app: Any) -> Settings:
        """Read and validate ``app.conf.zae_*``; ValidationError names the setting."""
        return cls.from_conf(app.conf)


def settings_table() -> str:
    """The declared settings as a Markdown table (setting, default, allowed, meaning)."""
    rows = [
        "| setting | default | allowed | meaning |",
        "|---------|---------|---------|---------|",
    ]
    for setting in SETTINGS:
        default = "(required)" if setting.default is REQUIRED else f"`{setting.default!r}`"
        allowed = setting.check.allowed.replace("|", "\\|")
        rows.append(f"| `{setting.name}` | {default} | {allowed} | {setting.doc} |")
    return "\n".join(rows) + "\n"
