"""The ``rate_*`` options of a :class:`~zae_celery.RateLimitedTask`, declared once and
resolved when the task class is bound to its app.

Every option is a value or a callable of the task's ``(args, kwargs)``. A value is
validated once, at bind (``Task.bind(app)``, when the task is registered or first used);
a bad one is a :class:`~zae_celery.ValidationError` naming the option, which
:class:`~zae_celery.RateLimitedTask` raises on every use of the task (``delay``,
``apply_async``, each run) so that it never runs. A callable is checked at bind to accept
``(args, kwargs)``; it is called when a run needs its value, before the run takes or
starts a lease (the consumer that admits a task and the pool process that runs it may
each call it: keep it cheap and deterministic), and its result is validated the same way
(the message never quotes it: it may come from the task's arguments).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from zae_celery.core import Limit, ValidationError
from zae_celery.core.limits import check_limit_name
from zae_celery.providers.profiles import Profile, check_profile
from zae_celery.settings import HORIZON, MAX_DEFERRALS, EntityId, Settings, check_limits

__all__ = [
    "BLOCK_KINDS",
    "TASK_OPTIONS",
    "OnError",
    "TaskOption",
    "TaskOptions",
    "check_block",
    "check_on_error",
]

OnError: TypeAlias = Literal["keep", "refund"] | frozenset[str]
"""What a failed run does with what it consumed: keep it, refund it, or keep the named
limits and refund the rest."""

_CALLABLE = "a value, or a callable of (args, kwargs) that returns one"


def check_on_error(name: str, value: Any, quote: bool = True) -> OnError:
    """``"keep"``, ``"refund"`` or a collection of limit names to keep (a frozenset)."""
    allowed = "'keep', 'refund' or a tuple of limit names to keep, e.g. ('rpm',)"
    if value in ("keep", "refund") and isinstance(value, str):
        return "keep" if value == "keep" else "refund"
    if isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            try:
                check_limit_name(name, item)
            except ValidationError:
                shown = repr(item) if quote else f"a {type(item).__name__}"
                raise ValidationError(name, f"{shown} is not a limit name", allowed) from None
        return frozenset(value)
    shown = repr(value) if quote else f"a {type(value).__name__} (the value is not shown)"
    raise ValidationError(name, f"{shown} is not a policy", allowed)


BLOCK_KINDS = ("own", "parents", "queue")
"""The buckets of a lease, by kind, that ``rate_block`` chooses from."""


def check_block(name: str, value: Any, quote: bool = True) -> frozenset[str]:
    """``"all"`` or a collection of :data:`BLOCK_KINDS` (a frozenset of them)."""
    allowed = "'all', or some of ('own', 'parents', 'queue')"
    if isinstance(value, str):
        if value == "all":
            return frozenset(BLOCK_KINDS)
        if value in BLOCK_KINDS:
            return frozenset((value,))
    elif (
        isinstance(value, (tuple, list, set, frozenset))
        and value
        and all(isinstance(v, str) and v in BLOCK_KINDS for v in value)
    ):
        return frozenset(value)
    shown = repr(value) if quote else f"a {type(value).__name__} (the value is not shown)"
    raise ValidationError(name, f"{shown} names no buckets to block", allowed)


def _check_consume(name: str, value: Any, quote: bool = True) -> dict[str, int] | None:
    """A mapping of limit name to tokens (its contents are the engine's to check)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError(  # quote=False: what a callable returned
            name,
            f"must {'be' if quote else 'return'} a dict, got {type(value).__name__}",
            "{'rpm': 1, ...}: limit name to tokens",
        )
    return dict(value)


def _check_resource(name: str, value: Any, quote: bool = True) -> str | None:
    """An id, or None (an empty value is None: the task's name)."""
    if value is None or value == "":
        return None
    return EntityId()(name, value, quote=False)  # ids may come from task arguments


def _check_entity(name: str, value: Any, quote: bool = True) -> str | None:
    """An id, or None (zae_default_entity)."""
    if value is None:
        return None
    return EntityId()(name, value, quote=False)


def _or_setting(check: Callable[..., Any]) -> Callable[..., Any]:
    def checked(name: str, value: Any, quote: bool = True) -> Any:
        return None if value is None else check(name, value, quote)

    return checked


@dataclass(frozen=True)
class TaskOption:
    """One ``rate_*`` option, declared once: its name, default, check and meaning."""

    name: str
    default: Any
    check: Callable[..., Any]
    doc: str
    setting: str | None = None
    """The ``zae_`` setting it overrides (its value when the option is None)."""


TASK_OPTIONS: tuple[TaskOption, ...] = (
    TaskOption("rate_limits", (), check_limits, "the task's limits ([Limit, ...])"),
    TaskOption(
        "rate_resource", None, _check_resource, "what the limits protect (default: task name)"
    ),
    TaskOption(
        "rate_entity", None, _check_entity, "who is limited, e.g. a tenant", "zae_default_entity"
    ),
    TaskOption(
        "rate_consume", None, _check_consume, "what one run costs (default: 1 of every limit)"
    ),
    TaskOption(
        "rate_on_error", "keep", check_on_error, "what a failed run does with its consumption"
    ),
    TaskOption(
        "rate_block",
        "all",
        check_block,
        "which buckets a provider's 429 blocks: its own, its cascade parents', its queue's",
    ),
    TaskOption(
        "rate_profile",
        None,
        check_profile,
        "how the provider charges, and which limit is which of its windows",
    ),
    TaskOption(
        "rate_max_deferrals",
        None,
        _or_setting(MAX_DEFERRALS.check),
        "outage deferrals before the task fails",
        MAX_DEFERRALS.name,
    ),
    TaskOption(
        "rate_run",
        None,
        _check_entity,
        "the pipeline run a task belongs to, for 'zae-celery runs' (default: Celery's "
        "root_id, else the group id, else ...: see zae_celery.runlog.run_of)",
    ),
    TaskOption(
        "rate_horizon",
        None,
        _or_setting(HORIZON.check),
        "seconds a slot may be reserved ahead",
        HORIZON.name,
    ),
)
"""Every ``rate_*`` option of :class:`~zae_celery.RateLimitedTask`."""


@dataclass(frozen=True)
class _Call:
    """An option given as a callable of (args, kwargs)."""

    fn: Callable[[tuple[Any, ...], dict[str, Any]], Any]


def _unwrap(name: str, value: Any) -> Any:
    """A staticmethod's function; a callable that cannot take (args, kwargs) is refused."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if not callable(value) or isinstance(value, type):
        return value
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # no signature to read (some builtins): call it
        return _Call(value)
    try:
        signature.bind(None, None)
    except TypeError:
        raise ValidationError(
            name, f"is a callable{signature} that cannot be called with (args, kwargs)", _CALLABLE
        ) from None
    return _Call(value)


@dataclass(frozen=True)
class TaskOptions:
    """The ``rate_*`` options of one task class, validated (see the module's docstring).

    ``values`` holds each option's value, or a callable to call for each run.
    Build it with :meth:`of`; read it with :meth:`get` and the typed accessors.
    """

    task_name: str
    values: Mapping[str, Any]

    @classmethod
    def of(cls, task: Any) -> TaskOptions:
        """Read and validate the options of a task class (class attributes, which is
        where Celery's ``@app.task(**options)`` and ``task_annotations`` put them)."""
        values: dict[str, Any] = {}
        for option in TASK_OPTIONS:
            raw = getattr(task, option.name, option.default)
            value = _unwrap(option.name, raw)
            values[option.name] = (
                value if isinstance(value, _Call) else option.check(option.name, value, True)
            )
        return cls(str(getattr(task, "name", None) or task.__name__), values)

    def get(self, name: str, args: Any, kwargs: Any) -> Any:
        """Option ``name`` for one run: its value, or what its callable returns for
        ``(args, kwargs)``, validated."""
        value = self.values[name]
        if not isinstance(value, _Call):
            return value
        try:
            result = value.fn(tuple(args or ()), dict(kwargs or {}))
        except Exception as exc:
            # The exception's text may quote task arguments: only its type is reported.
            raise ValidationError(
                name,
                f"the callable raised {type(exc).__name__} for task {self.task_name}",
                _CALLABLE,
            ) from None
        check = next(o.check for o in TASK_OPTIONS if o.name == name)
        return check(name, result, False)

    def is_dynamic(self, name: str) -> bool:
        """True when option ``name`` is a callable (called for each run)."""
        return isinstance(self.values[name], _Call)

    # -- typed accessors ---------------------------------------------------------------------
    def limits(self, args: Any, kwargs: Any) -> tuple[Limit, ...]:
        """``rate_limits`` for one run."""
        limits: tuple[Limit, ...] = self.get("rate_limits", args, kwargs)
        return limits

    def horizon(self, settings: Settings, args: Any, kwargs: Any) -> float:
        """``rate_horizon`` for one run, else ``zae_horizon``."""
        value: float | None = self.get("rate_horizon", args, kwargs)
        return settings.horizon if value is None else value

    def max_deferrals(self, settings: Settings, args: Any, kwargs: Any) -> int:
        """``rate_max_deferrals`` for one run, else ``zae_max_deferrals``."""
        value: int | None = self.get("rate_max_deferrals", args, kwargs)
        return settings.max_deferrals if value is None else value

    def profile(self, args: Any, kwargs: Any, default: Profile) -> Profile:
        """``rate_profile`` for one run, else ``default``."""
        value: Profile | None = self.get("rate_profile", args, kwargs)
        return default if value is None else value

    def on_error(self, args: Any, kwargs: Any) -> OnError:
        """``rate_on_error`` for one run."""
        value: OnError = self.get("rate_on_error", args, kwargs)
        return value
