"""Validation of what callers pass the engine: limits, token amounts, horizons.

Each check returns the value it accepts or raises a ValidationError that names the field
and says what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ValidationError
from .limits import MAX_TOKENS, Limit, check_limit_name, check_tokens
from .schema import check_id

__all__ = ["check_amounts", "check_horizon", "check_id", "check_limits"]


def check_limits(limits: Any) -> tuple[Limit, ...]:
    """A list of distinct-named Limit objects."""
    if isinstance(limits, Limit) or not isinstance(limits, Iterable):
        raise ValidationError("limits", "must be a list of Limit", "[Limit.per_minute(...), ...]")
    result = tuple(limits)
    names = set()
    for lim in result:
        if not isinstance(lim, Limit):
            raise ValidationError("limits", f"{lim!r} is not a Limit", "Limit objects")
        if lim.name in names:
            raise ValidationError("limits", f"limit name {lim.name!r} appears twice", "unique")
        names.add(lim.name)
    return result


def check_amounts(field: str, amounts: Any, *, negative: bool) -> dict[str, int]:
    """A mapping of limit name to whole tokens (``negative``: refunds allowed)."""
    if not isinstance(amounts, Mapping):
        raise ValidationError(field, "must be a mapping of limit name to tokens", "{'rpm': 1}")
    result: dict[str, int] = {}
    for name, value in amounts.items():
        check_limit_name(f"{field}[{name!r}]", name)
        if negative:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(
                    f"{field}.{name}",
                    "must be an integer number of tokens",
                    f"an integer -{MAX_TOKENS}..{MAX_TOKENS}",
                )
            if abs(value) > MAX_TOKENS:
                raise ValidationError(
                    f"{field}.{name}", f"{value} is out of range", f"-{MAX_TOKENS}..{MAX_TOKENS}"
                )
        else:
            check_tokens(f"{field}.{name}", value, minimum=0)
        result[name] = value
    return result


def check_horizon(horizon: Any) -> int:
    """Seconds ahead (0..86400) as integer milliseconds."""
    if isinstance(horizon, bool) or not isinstance(horizon, (int, float)):
        raise ValidationError("horizon", "must be a number of seconds")
    if not math.isfinite(horizon) or horizon < 0 or horizon > 86_400:
        raise ValidationError("horizon", f"{horizon!r}", "0..86400 seconds")
    return math.floor(horizon * 1000)
