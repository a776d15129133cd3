"""Accounting profiles: how a provider charges its limits, and which of a task's limits
stand for which of the provider's windows.

A provider reports requests, tokens, and (Anthropic) input and output tokens; a task
names its limits as it likes (``rpm``, ``tpm``, ...). A :class:`Profile` joins the two:

- ``requests``/``tokens``/``input_tokens``/``output_tokens``: the task's limit name for
  each of the provider's windows (None: the task has none);
- ``tokens_at``: when the ``tokens`` limit is charged. ``"completion"`` charges the
  call's actual usage (prompt + completion): the estimate is reconciled after the call.
  ``"request"`` charges what the provider counted when the request arrived: the prompt
  plus the request's ``max_tokens``, however short the completion (OpenAI documents its
  tpm this way), so the unused part of ``max_tokens`` is never refunded (a refund would
  let the fleet send more than the provider admits);
- input and output limits are charged the input and output tokens at completion.

Named profiles: :data:`OPENAI` (``rpm``, ``tpm`` charged at request), :data:`ANTHROPIC`
(``rpm``, ``itpm`` and ``otpm`` split, and a combined ``tpm`` if the task has one, all at
completion) and :data:`COMPLETION` (``rpm`` and ``tpm`` at completion: any provider that
bills what was used). A task chooses one with ``rate_profile``; the SDK integrations
default to their provider's. Use :func:`dataclasses.replace` for other limit names:
``replace(OPENAI, tokens="tokens_per_minute")``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from zae_celery.core import ValidationError
from zae_celery.providers.headers import RateLimitHeaders, Window

__all__ = [
    "ANTHROPIC",
    "COMPLETION",
    "OPENAI",
    "PROFILES",
    "Charge",
    "Profile",
    "Usage",
    "check_profile",
]

Charge = Literal["request", "completion"]


@dataclass(frozen=True)
class Usage:
    """What one call used, as the provider billed it (SDK-neutral)."""

    input_tokens: int
    """Prompt tokens (Anthropic: input tokens, cache writes included)."""
    output_tokens: int
    """Completion tokens."""

    @property
    def total_tokens(self) -> int:
        """Input and output together."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Profile:
    """How a provider charges, and the task's limit name for each of its windows."""

    name: str
    requests: str | None = "rpm"
    tokens: str | None = "tpm"
    input_tokens: str | None = None
    output_tokens: str | None = None
    tokens_at: Charge = "completion"

    def __post_init__(self) -> None:
        if self.tokens_at not in ("request", "completion"):
            raise ValidationError(
                "Profile.tokens_at", f"{self.tokens_at!r}", "'request' or 'completion'"
            )

    @property
    def windows(self) -> dict[str, str]:
        """The provider's window (a kind of :mod:`~zae_celery.providers.headers`) for
        each limit name the profile maps."""
        pairs = (
            ("requests", self.requests),
            ("tokens", self.tokens),
            ("input-tokens", self.input_tokens),
            ("output-tokens", self.output_tokens),
        )
        return {name: kind for kind, name in pairs if name is not None}

    def charges(
        self, usage: Usage, max_tokens: int | None, names: Collection[str]
    ) -> dict[str, int]:
        """What each of ``names`` (the task's limits) is charged for a call that used
        ``usage`` and asked for ``max_tokens`` (None: not given): totals, as
        ``report_usage`` takes them. ``requests`` is left as estimated."""
        total = usage.total_tokens
        if self.tokens_at == "request" and max_tokens is not None:
            total = usage.input_tokens + max(max_tokens, usage.output_tokens)
        values = {
            self.tokens: total,
            self.input_tokens: usage.input_tokens,
            self.output_tokens: usage.output_tokens,
        }
        return {name: value for name, value in values.items() if name is not None and name in names}

    def _reported(
        self, report: RateLimitHeaders, names: Collection[str]
    ) -> Iterator[tuple[str, Window]]:
        """(limit name, the provider's window) for each of ``names`` it reported."""
        for name, kind in self.windows.items():
            window = report.windows.get(kind)
            if name in names and window is not None:
                yield name, window

    def rates(self, report: RateLimitHeaders, names: Collection[str]) -> dict[str, float]:
        """How fast the provider refills (tokens a second: its per-minute ``limit`` / 60,
        as both providers state their limits), by the limit names among ``names`` whose
        window reported a limit."""
        return {name: w.limit / 60 for name, w in self._reported(report, names) if w.limit}

    def remaining(self, report: RateLimitHeaders, names: Collection[str]) -> dict[str, int]:
        """What the provider says is left, by the limit names among ``names``."""
        return {
            name: max(0, w.remaining)
            for name, w in self._reported(report, names)
            if w.remaining is not None
        }


OPENAI = Profile("openai", tokens_at="request")
"""OpenAI: ``rpm``; ``tpm`` charged at request time (prompt + ``max_tokens``)."""
ANTHROPIC = Profile("anthropic", input_tokens="itpm", output_tokens="otpm")
"""Anthropic: ``rpm``; ``itpm`` and ``otpm`` (input and output tokens per minute, each
charged what was used; estimate ``otpm`` as ``max_tokens``, as Anthropic does) and a
combined ``tpm`` if the task has one."""
COMPLETION = Profile("completion")
"""Any provider that bills what was used: ``rpm``; ``tpm`` = prompt + completion."""

PROFILES = {p.name: p for p in (OPENAI, ANTHROPIC, COMPLETION)}
"""The named profiles, for ``rate_profile="openai"`` and the like."""


def check_profile(name: str, value: Any, quote: bool = True) -> Profile | None:
    """A :class:`Profile`, a name of :data:`PROFILES`, or None."""
    if value is None or isinstance(value, Profile):
        return value
    if isinstance(value, str) and value in PROFILES:
        return PROFILES[value]
    shown = repr(value) if quote else f"a {type(value).__name__} (the value is not shown)"
    raise ValidationError(
        name, f"{shown} is not a profile", f"a Profile or one of {', '.join(PROFILES)}"
    )
