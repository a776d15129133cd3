"""``buckets``: the tokens available now in an entity's buckets (``limiter.buckets``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from zae_celery.cli.errors import translate_errors
from zae_celery.cli.options import (
    CONTEXT,
    Target,
    id_argument,
    limits_option,
    pass_target,
    resource_option,
    scope,
)
from zae_celery.core import Limit, RateLimiter
from zae_celery.core.limits import format_rate

__all__ = ["BucketRow", "bucket_rows", "buckets"]


@dataclass(frozen=True)
class BucketRow:
    """The state of one limit's bucket, as ``buckets`` shows it."""

    resource: str
    limit: str
    rate: str
    burst: int | None
    available: float | None
    in_use: float
    full_in: float | None

    @property
    def in_debt(self) -> bool:
        """True while more tokens are owed than the bucket holds (negative available)."""
        return self.available is not None and self.available < 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "resource": self.resource,
            "limit": self.limit,
            "rate": self.rate,
            "burst": self.burst,
            "available": self.available,
            "in_use": self.in_use,
            "in_debt": self.in_debt,
            "full_in_seconds": self.full_in,
        }


def bucket_rows(
    limiter: RateLimiter,
    entity_id: str,
    resource: str | None,
    code_limits: Sequence[Limit] = (),
) -> list[BucketRow]:
    """Current tokens per limit of every bucket of ``entity_id`` (or one resource).

    Limits are those the engine would apply: ``code_limits``, overridden by the entity's
    stored limits for every resource, overridden by those of the resource. A bucket
    attribute whose limit is not known shows the tokens in use only.
    """
    return [
        BucketRow(
            resource=status.resource,
            limit=status.limit_name,
            rate=format_rate(status.refill_amount, status.refill_period_ms),
            burst=status.burst,
            available=status.available,
            in_use=status.in_use,
            full_in=status.full_in,
        )
        for status in limiter.buckets(entity_id, resource, code_limits)
    ]


def _tokens(value: float) -> str:
    if abs(value - round(value)) < 0.05:
        return f"{round(value):,}"
    return f"{value:,.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 0.0005:
        return "full"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@click.command(context_settings=CONTEXT)
@click.argument("entity_id", metavar="ENTITY", callback=id_argument("entity"))
@resource_option
@click.option(
    "--limit",
    "limit_specs",
    multiple=True,
    callback=limits_option,
    metavar="SPEC",
    help="A limit your code passes (stored limits override it); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_target
def buckets(
    target: Target,
    entity_id: str,
    resource: str | None,
    limit_specs: list[Limit],
    as_json: bool,
) -> None:
    """Show the tokens available now in ENTITY's buckets (debt in red).

    Limits known from storage are shown with their burst; pass the limits your code
    uses with --limit to show those too.

    \b
    Example:
      zae-celery buckets tenant-42 --resource gpt-4o --limit rpm=500/m
    """
    with translate_errors(target):
        rows = bucket_rows(target.limiter(), entity_id, resource, limit_specs)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    if not rows:
        click.echo(
            f"No buckets and no stored limits for {scope(entity_id, resource)}: nothing has "
            "been acquired yet. Pass --limit to show the limits your code uses.",
            err=True,
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Buckets of {entity_id}", title_justify="left")
    for column, justify in (
        ("resource", "left"),
        ("limit", "left"),
        ("rate", "right"),
        ("burst", "right"),
        ("available", "right"),
        ("full in", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        if row.available is None:
            available = f"? ({_tokens(row.in_use)} in use)"
        elif row.in_debt:
            available = f"[red]{_tokens(row.available)} (debt)[/red]"
        else:
            available = _tokens(row.available)
        table.add_row(
            row.resource,
            row.limit,
            row.rate,
            "?" if row.burst is None else _tokens(row.burst),
            available,
            _duration(row.full_in),
        )
    Console(file=sys.stdout).print(table)
    if any(row.available is None for row in rows):
        click.echo("?: limit not stored here; pass it with --limit to see its burst.", err=True)
