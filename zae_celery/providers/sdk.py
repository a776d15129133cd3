"""What the openai and anthropic integrations share.

Both official SDKs are generated alike: ``client.with_options(max_retries=0)``,
``resource.with_raw_response.create(...)`` (the response's headers, then ``.parse()``),
and an ``APIStatusError`` carrying ``status_code`` and the httpx ``response``. Nothing
here imports either SDK: a :class:`Provider` says where the call lives and how to read
its usage.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zae_celery.providers.headers import read_rate_limits
from zae_celery.providers.profiles import Profile, Usage

if TYPE_CHECKING:
    from zae_celery.task import RateLimitedTask

__all__ = [
    "LIMITED_WAIT",
    "OVERLOADED_WAIT",
    "Provider",
    "acall",
    "call",
    "estimate_tokens",
    "int_or_none",
    "without_retries",
]

log = logging.getLogger("zae_celery")

LIMITED_WAIT = 1.0
"""Seconds a 429 holds the buckets when no header says how long."""
OVERLOADED_WAIT = 5.0
"""Seconds an overloaded answer (529, 503) holds the buckets when no header says how long."""


@dataclass(frozen=True)
class Provider:
    """One SDK's shape: the path of its create call, its profile, its usage."""

    name: str
    path: tuple[str, ...]
    """Attributes from the client to the resource, e.g. ``("chat", "completions")``."""
    profile: Profile
    overloaded: frozenset[int]
    """Statuses that mean the provider is overloaded (not a limit of the key)."""
    usage: Callable[[Any], Usage | None]
    max_tokens: Callable[[Mapping[str, Any]], int | None]


_quiet: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def without_retries(client: Any, provider: Provider) -> Any:
    """``client``, or once per client its copy with ``max_retries=0`` (with a warning):
    an SDK's own retries would send requests that the shared buckets never count."""
    retries = getattr(client, "max_retries", 0)
    if not retries:
        return client
    try:
        quiet = _quiet.get(client)
    except TypeError:  # not weakly referenceable: copy each time
        quiet = None
    if quiet is None:
        log.warning(
            "zae-celery calls the %s SDK with max_retries=0 (this client has %s): its own "
            "retries would send requests the shared buckets never count; a 429 defers the "
            "task instead. Create the client with max_retries=0 to silence this.",
            provider.name,
            retries,
        )
        quiet = client.with_options(max_retries=0)
        with contextlib.suppress(TypeError):  # not weakly referenceable
            _quiet[client] = quiet
    return quiet


def _create(task: RateLimitedTask, provider: Provider, client: Any) -> Callable[..., Any]:
    if not hasattr(task, "provider_reported"):
        raise TypeError(
            f"{type(task).__name__} is not a RateLimitedTask: pass the bound task (self) of "
            "a task with base=RateLimitedTask, bind=True"
        )
    resource = functools.reduce(getattr, provider.path, without_retries(client, provider))
    create: Callable[..., Any] = resource.with_raw_response.create
    return create


def _refused(task: RateLimitedTask, provider: Provider, exc: BaseException) -> None:
    """A 429 or an overloaded answer defers the task (raises Retry); else returns."""
    status = getattr(exc, "status_code", None)
    if status != 429 and status not in provider.overloaded:
        return
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    report = read_rate_limits(headers)
    if status == 429:
        task.provider_limited(report.wait or LIMITED_WAIT)
    task.provider_limited(report.retry_after or OVERLOADED_WAIT, charged=False)


def _settle(task: RateLimitedTask, provider: Provider, raw: Any, params: Mapping[str, Any]) -> Any:
    """Feed the response's headers and usage to the run's lease; the parsed response."""
    profile = task._profile(provider.profile)
    task.provider_reported(raw.headers, profile)
    parsed = raw.parse()
    lease = getattr(task.request, "zae_active_lease", None)
    if lease is None or not lease.buckets:
        return parsed
    usage = provider.usage(parsed)
    if usage is None:
        log.warning(
            "zae-celery: the %s response of task %s has no usage: its estimate stands",
            provider.name,
            task.request.id,
        )
        return parsed
    names = {lim.name for lim in lease.buckets[0].limits}
    charges = profile.charges(usage, provider.max_tokens(params), names)
    if charges:
        task.report_usage(**charges)
    return parsed


def call(task: RateLimitedTask, provider: Provider, client: Any, params: Mapping[str, Any]) -> Any:
    """The SDK's create call with ``params``, inside the task's lease (sync client)."""
    create = _create(task, provider, client)
    try:
        raw = create(**params)
    except Exception as exc:
        _refused(task, provider, exc)
        raise
    return _settle(task, provider, raw, params)


async def acall(
    task: RateLimitedTask, provider: Provider, client: Any, params: Mapping[str, Any]
) -> Any:
    """The same with an async client (``AsyncOpenAI``, ``AsyncAnthropic``)."""
    create = _create(task, provider, client)
    try:
        raw = await create(**params)
    except Exception as exc:
        _refused(task, provider, exc)
        raise
    return _settle(task, provider, raw, params)


def estimate_tokens(content: Any) -> int:
    """A cheap upper-leaning estimate of a prompt's tokens before the call (four
    characters a token): a string, or chat messages (``content`` strings or text
    blocks). What the provider really counted replaces it after the call."""
    return math.ceil(_characters(content) / 4)


def _characters(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, Mapping):
        return sum(_characters(content.get(key)) for key in ("content", "text"))
    if isinstance(content, (list, tuple)):
        return sum(_characters(part) for part in content)
    return 0


def int_or_none(value: Any) -> int | None:
    """``value`` when it is a non-negative int (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
