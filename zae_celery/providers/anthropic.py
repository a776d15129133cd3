"""The official ``anthropic`` SDK inside a rate-limited task
(``pip install 'zae-celery[anthropic]'``).

>>> from anthropic import Anthropic  # doctest: +SKIP
>>> from zae_celery.providers import anthropic as zae_anthropic
>>> client = Anthropic(max_retries=0)
>>> @app.task(base=RateLimitedTask, bind=True, rate_profile="anthropic", ...)
... def summarize(self, text):
...     message = zae_anthropic.messages(self, client, model="claude-sonnet-4-5",
...                                      max_tokens=300,
...                                      messages=[{"role": "user", "content": text}])
...     return message.content[0].text

:func:`messages` is ``client.messages.create(**params)`` with the lease's bookkeeping:

- the ``anthropic-ratelimit-*`` headers of the response pull the shared buckets down to
  what Anthropic says is left (never up), in the write that settles the task;
- the usage is charged by the task's ``rate_profile``, :data:`PROFILE` by default:
  input and output tokens per minute separately (``itpm``: input tokens and cache
  writes; ``otpm``: output tokens, best estimated as ``max_tokens``) and ``tpm`` (both)
  if the task has it; a response without ``usage`` leaves the estimate;
- a 429 (``RateLimitError``) blocks the buckets for its ``retry-after`` and defers the
  task; a 529 (``OverloadedError``: the provider is overloaded, not the key limited)
  refunds the run, holds the buckets for its ``retry-after`` (else 5 s) and defers it;
- the SDK's own retries are turned off for the call (a warning once per client whose
  ``max_retries`` is not 0).

Nothing here imports ``anthropic``: any client shaped like it works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from zae_celery.providers.profiles import ANTHROPIC, Usage
from zae_celery.providers.sdk import Provider, acall, call, estimate_tokens, int_or_none

if TYPE_CHECKING:
    from zae_celery.task import RateLimitedTask

__all__ = ["PROFILE", "PROVIDER", "amessages", "estimate_tokens", "messages", "usage_of"]

PROFILE = ANTHROPIC
"""The default accounting profile of Anthropic calls."""


def usage_of(message: Any) -> Usage | None:
    """A message's ``usage`` (None when it has none); cache writes count as input."""
    usage = getattr(message, "usage", None)
    given = int_or_none(getattr(usage, "input_tokens", None))
    output = int_or_none(getattr(usage, "output_tokens", None))
    if given is None or output is None:
        return None
    cache_writes = int_or_none(getattr(usage, "cache_creation_input_tokens", None)) or 0
    return Usage(given + cache_writes, output)


def _max_tokens(params: Mapping[str, Any]) -> int | None:
    return int_or_none(params.get("max_tokens"))


PROVIDER = Provider("anthropic", ("messages",), PROFILE, frozenset({529}), usage_of, _max_tokens)
"""How :func:`messages` reaches and reads the SDK."""


def messages(task: RateLimitedTask, client: Any, /, **params: Any) -> Any:
    """``client.messages.create(**params)`` under ``task``'s lease (the bound ``self``
    of a RateLimitedTask); returns the ``Message``. See the module."""
    return call(task, PROVIDER, client, params)


async def amessages(task: RateLimitedTask, client: Any, /, **params: Any) -> Any:
    """:func:`messages` with an ``AsyncAnthropic`` client, in an ``async def`` task."""
    return await acall(task, PROVIDER, client, params)
