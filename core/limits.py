"""Limit definitions: a token bucket's size and refill rate, validated on construction."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ValidationError

__all__ = ["MAX_TOKENS", "Limit"]

MAX_TOKENS = 10**18
"""Largest capacity, burst, refill amount or single consume/adjust, in tokens.

It keeps every number the engine stores well inside DynamoDB's 38 significant digits.
"""
MAX_PERIOD_MS = 10 * 365 * 86_400_000
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def check_tokens(field: str, value: Any, *, minimum: int = 1) -> int:
    """An integer token count in [minimum, MAX_TOKENS] or a ValidationError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(
            field,
            f"must be an integer, got {type(value).__name__}",
            f"an integer {minimum}..{MAX_TOKENS}",
        )
    if value < minimum or value > MAX_TOKENS:
        raise ValidationError(field, f"{value} is out of range", f"{minimum}..{MAX_TOKENS}")
    return value


def check_limit_name(field: str, name: Any) -> str:
    """A limit name usable as a keyword argument (``rpm``, ``tpm``, ``tokens_in``...)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(
            field, f"invalid limit name {name!r}", "a letter then letters, digits or _, <= 64"
        )
    return name


@dataclass(frozen=True)
class Limit:
    """A token bucket: ``refill_amount`` tokens every ``refill_period_ms`` milliseconds,
    holding at most ``burst`` tokens (``capacity`` unless raised).

    Use the constructors: ``Limit.per_minute("rpm", 500)``, ``Limit.per_second("rps", 10,
    burst=20)``, ``Limit.custom("tpd", capacity=1_000_000, refill_amount=1_000_000,
    refill_period_seconds=86_400)``.
    """

    name: str
    capacity: int
    burst: int
    refill_amount: int
    refill_period_ms: int
    track: str = field(default="", repr=False)
    """Internal: ``"start"`` is the copy of the bucket that counts actual starts."""

    def __post_init__(self) -> None:
        check_limit_name("name", self.name)
        if self.track not in ("", "start"):
            raise ValidationError("track", f"{self.track!r}", "'' or 'start'")
        check_tokens("capacity", self.capacity)
        check_tokens("burst", self.burst)
        check_tokens("refill_amount", self.refill_amount)
        if self.burst < self.capacity:
            raise ValidationError(
                "burst", f"{self.burst} is below capacity {self.capacity}", ">= capacity"
            )
        period = self.refill_period_ms
        if isinstance(period, bool) or not isinstance(period, int):
            raise ValidationError("refill_period_ms", "must be an integer number of ms")
        if not 1 <= period <= MAX_PERIOD_MS:
            raise ValidationError(
                "refill_period_ms", f"{period} ms is out of range", f"1..{MAX_PERIOD_MS} ms"
            )

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def custom(
        cls,
        name: str,
        capacity: int,
        refill_amount: int,
        refill_period_seconds: float,
        burst: int | None = None,
    ) -> Limit:
        """``refill_amount`` tokens every ``refill_period_seconds`` (a whole number of ms),
        a bucket of ``burst`` tokens (default ``capacity``)."""
        return cls(
            name=name,
            capacity=capacity,
            burst=capacity if burst is None else burst,
            refill_amount=refill_amount,
            refill_period_ms=_period_ms(refill_period_seconds),
        )

    @classmethod
    def per_second(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per second."""
        return cls.custom(name, capacity, capacity, 1, burst)

    @classmethod
    def per_minute(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per minute (e.g. a provider's requests/min or tokens/min)."""
        return cls.custom(name, capacity, capacity, 60, burst)

    @classmethod
    def per_hour(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per hour."""
        return cls.custom(name, capacity, capacity, 3600, burst)

    @classmethod
    def per_day(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per day."""
        return cls.custom(name, capacity, capacity, 86_400, burst)

    # -- derived values ---------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.refill_amount * 1000 / self.refill_period_ms

    @property
    def key(self) -> str:
        """The stored attribute of this bucket. It includes the refill rate, so a limit
        whose rate changes starts a new bucket instead of misreading the old state."""
        key = f"{self.name}@{self.refill_amount}/{self.refill_period_ms}"
        return f"{key}~{self.track}" if self.track else key

    def start_track(self) -> Limit:
        """The same bucket shape, counting when requests actually start (see docs/engine.md)."""
        return replace(self, track="start")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (stored limits, CLI output)."""
        return {
            "name": self.name,
            "capacity": self.capacity,
            "burst": self.burst,
            "refill_amount": self.refill_amount,
            "refill_period_ms": self.refill_period_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limit:
        """The inverse of :meth:`to_dict` (numbers may come back as Decimal or str)."""
        try:
            return cls(
                name=str(data["name"]),
                capacity=int(data["capacity"]),
                burst=int(data["burst"]),
                refill_amount=int(data["refill_amount"]),
                refill_period_ms=int(data["refill_period_ms"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError("limits", f"malformed stored limit {data!r}") from exc


def _period_ms(seconds: Any) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValidationError(
            "refill_period_seconds", "must be a number of seconds", "> 0, at most 315360000"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError(
            "refill_period_seconds",
            f"{seconds!r} is not a positive finite number",
            "> 0, at most 315360000",
        )
    ms = seconds * 1000
    if ms > MAX_PERIOD_MS:
        raise ValidationError(
            "refill_period_seconds", f"{seconds!r} is longer than 10 years", "<= 315360000"
        )
    if abs(ms - round(ms)) > 1e-6 or round(ms) < 1:
        raise ValidationError(
            "refill_period_seconds",
            f"{seconds!r} is not a whole number of milliseconds",
            "a whole number of milliseconds, at least 1 ms",
        )
    return round(ms)
