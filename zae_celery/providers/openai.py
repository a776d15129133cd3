"""The official ``openai`` SDK inside a rate-limited task (``pip install 'zae-celery[openai]'``).

>>> from openai import OpenAI  # doctest: +SKIP
>>> from zae_celery.providers import openai as zae_openai
>>> client = OpenAI(max_retries=0)
>>> @app.task(base=RateLimitedTask, bind=True, rate_profile="openai", ...)
... def summarize(self, text):
...     reply = zae_openai.chat(self, client, model="gpt-4o-mini", max_tokens=300,
...                             messages=[{"role": "user", "content": text}])
...     return reply.choices[0].message.content

:func:`chat` is ``client.chat.completions.create(**params)`` with the lease's bookkeeping:

- the rate-limit headers of the response pull the shared buckets down to what OpenAI
  says is left (never up), in the write that settles the task;
- the usage is charged by the task's ``rate_profile``, :data:`PROFILE` by default
  (``tpm`` at request time: prompt + ``max_tokens``, unused completion not refunded);
  a response without ``usage`` leaves the estimate;
- a 429 (``RateLimitError``) blocks the buckets for its ``retry-after-ms`` /
  ``retry-after`` / ``x-ratelimit-reset-*`` and defers the task; a 503 (overloaded)
  refunds the run, holds the buckets for its ``retry-after`` (else 5 s) and defers it;
- the SDK's own retries are turned off for the call (a warning once per client whose
  ``max_retries`` is not 0): a retry inside the task would never be counted.

Nothing here imports ``openai``: any client shaped like it works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from zae_celery.providers.profiles import OPENAI, Usage
from zae_celery.providers.sdk import Provider, acall, call, estimate_tokens, int_or_none

if TYPE_CHECKING:
    from zae_celery.task import RateLimitedTask

__all__ = ["PROFILE", "PROVIDER", "achat", "chat", "estimate_tokens", "usage_of"]

PROFILE = OPENAI
"""The default accounting profile of OpenAI calls."""


def usage_of(completion: Any) -> Usage | None:
    """A chat completion's ``usage`` (None when it has none)."""
    usage = getattr(completion, "usage", None)
    prompt = int_or_none(getattr(usage, "prompt_tokens", None))
    output = int_or_none(getattr(usage, "completion_tokens", None))
    if prompt is None or output is None:
        return None
    return Usage(prompt, output)


def _max_tokens(params: Mapping[str, Any]) -> int | None:
    value = params.get("max_completion_tokens")
    return int_or_none(params.get("max_tokens") if value is None else value)


PROVIDER = Provider(
    "openai", ("chat", "completions"), PROFILE, frozenset({503}), usage_of, _max_tokens
)
"""How :func:`chat` reaches and reads the SDK."""


def chat(task: RateLimitedTask, client: Any, /, **params: Any) -> Any:
    """``client.chat.completions.create(**params)`` under ``task``'s lease (the bound
    ``self`` of a RateLimitedTask); returns the ``ChatCompletion``. See the module."""
    return call(task, PROVIDER, client, params)


async def achat(task: RateLimitedTask, client: Any, /, **params: Any) -> Any:
    """:func:`chat` with an ``AsyncOpenAI`` client, in an ``async def`` task."""
    return await acall(task, PROVIDER, client, params)
