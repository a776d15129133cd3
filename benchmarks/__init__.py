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
