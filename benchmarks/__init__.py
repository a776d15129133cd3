"""Programs that print figures (see docs/benchmarks.md), and what they share."""

from __future__ import annotations

from typing import Any

import click

ENDPOINTS = ("dynamodb-local", "moto")


def endpoint_option(help: str) -> Any:
    """The ``--endpoint`` option of the programs that start a local DynamoDB."""
    return click.option(
        "--endpoint",
        type=click.Choice(ENDPOINTS),
        default="dynamodb-local",
        show_default=True,
        help=help,
    )


def max_window_excess(times_ms: list[int], burst: int, rate: int) -> int:
    """The worst window of ``times_ms`` against a limit of ``burst`` and ``rate`` a
    second: max over windows [t_i, t_j] of (events in it) - (burst + rate * width), the
    allowance floored to whole events (integer milliseconds throughout). At most 0: no
    window held more than the limit allows."""
    times = sorted(times_ms)
    worst = -burst
    for i, first in enumerate(times):
        for j in range(i, len(times)):
            allowed = burst + (times[j] - first) * rate // 1000
            worst = max(worst, j - i + 1 - allowed)
    return worst
