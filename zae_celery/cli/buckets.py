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

__all__ = ["EVERY_RESOURCE", "BucketReport", "BucketRow", "bucket_rows", "buckets", "read_buckets"]

EVERY_RESOURCE = "*"
"""The resource of the rows that show the limits stored for every resource of an entity
(no id can be ``*``)."""
SOURCES = {"resource": "stored", "entity": "stored *", "code": "--limit", None: "?"}
"""How the table names where a limit comes from (:attr:`BucketRow.source`)."""


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
    source: str | None = None
    """``"resource"`` (stored for the resource), ``"entity"`` (stored for every resource),
    ``"code"`` (``--limit``) or None (known to neither)."""
    used: bool = True
    """False when nothing was consumed from the bucket yet (it is full)."""

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
            "source": self.source,
            "used": self.used,
        }


@dataclass(frozen=True)
class BucketReport:
    """What ``buckets`` shows of an entity: its rows and every limit stored for it."""

    entity_id: str
    resource: str | None
    rows: list[BucketRow]
    stored: dict[str | None, list[Limit]]
    """The entity's stored limits by resource (None: every resource)."""

    @property
    def own_resources(self) -> list[str]:
        """The resources with limits stored for them alone."""
        return [res for res in self.stored if res is not None]


def read_buckets(
    limiter: RateLimiter,
    entity_id: str,
    resource: str | None,
    code_limits: Sequence[Limit] = (),
) -> BucketReport:
    """The rows of :func:`bucket_rows` and the entity's stored limits (two reads and one
    per page of buckets)."""
    stored = limiter.stored_limits(entity_id)
    rows = [
        BucketRow(
            resource=status.resource,
            limit=status.limit_name,
            rate=status.rate,
            burst=status.burst,
            available=status.available,
            in_use=status.in_use,
            full_in=status.full_in,
            source=status.source,
            used=status.used,
        )
        for status in limiter.buckets(entity_id, resource, code_limits)
    ]
    if resource is None and stored.get(None):
        rows[:0] = _every_resource(code_limits, stored[None])
    return BucketReport(entity_id, resource, rows, stored)


def _every_resource(code_limits: Sequence[Limit], stored: Sequence[Limit]) -> list[BucketRow]:
    """Rows of a resource nobody used yet (:data:`EVERY_RESOURCE`): the limits stored for
    every resource over the code's, each bucket full."""
    merged = {lim.name: (lim, "code") for lim in code_limits}
    merged.update({lim.name: (lim, "entity") for lim in stored})
    return [
        BucketRow(
            resource=EVERY_RESOURCE,
            limit=lim.name,
            rate=lim.format().split("=", 1)[1].split(":", 1)[0],
            burst=lim.burst,
            available=float(lim.burst),
            in_use=0.0,
            full_in=0.0,
            source=source,
            used=False,
        )
        for lim, source in merged.values()
    ]


def bucket_rows(
    limiter: RateLimiter,
    entity_id: str,
    resource: str | None,
    code_limits: Sequence[Limit] = (),
) -> list[BucketRow]:
    """Current tokens per limit of every bucket of ``entity_id`` (or one resource).

    Limits are those the engine would apply: ``code_limits``, overridden by the entity's
    stored limits for every resource, overridden by those of the resource. A bucket
    attribute whose limit is not known shows the tokens in use only. Without
    ``resource``: also every resource with limits stored for it that nobody used yet,
    and (resource :data:`EVERY_RESOURCE`) the limits stored for every resource, as a
    resource without a bucket sees them (full).
    """
    return read_buckets(limiter, entity_id, resource, code_limits).rows


def _tokens(value: float) -> str:
    if abs(value - round(value)) < 0.05:
        return f"{round(value):,}"
    return f"{value:,.1f}"


def _duration(row: BucketRow) -> str:
    seconds = row.full_in
    if not row.used:
        return "full (unused)"
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

    Every resource with a bucket or with limits stored for it is shown; a bucket nobody
    used yet is full. Without --resource, the rows of resource * are the limits stored
    for every resource. Limits known from storage are shown with their burst; pass the
    limits your code uses with --limit to show those too.

    \b
    Example:
      zae-celery buckets tenant-42 --resource gpt-4o --limit rpm=500/m
    """
    with translate_errors(target):
        report = read_buckets(target.limiter(), entity_id, resource, limit_specs)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in report.rows], indent=2))
        return
    if not report.rows:
        click.echo(_nothing(report), err=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Buckets of {entity_id}", title_justify="left")
    for column, justify in (
        ("resource", "left"),
        ("limit", "left"),
        ("from", "left"),
        ("rate", "right"),
        ("burst", "right"),
        ("available", "right"),
        ("full in", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report.rows:
        if row.available is None:
            available = f"? ({_tokens(row.in_use)} in use)"
        elif row.in_debt:
            available = f"[red]{_tokens(row.available)} (debt)[/red]"
        else:
            available = _tokens(row.available)
        table.add_row(
            row.resource,
            row.limit,
            SOURCES.get(row.source, "?"),
            row.rate,
            "?" if row.burst is None else _tokens(row.burst),
            available,
            _duration(row),
        )
    Console(file=sys.stdout).print(table)
    for note in _notes(report):
        click.echo(note, err=True)


def _for_one(entity_id: str, resources: Sequence[str]) -> str:
    return f"zae-celery buckets {entity_id} --resource {resources[0]}"


def _nothing(report: BucketReport) -> str:
    """What to say when there is no row: what is stored, and when buckets appear."""
    entity_id, others = report.entity_id, report.own_resources
    if report.resource is not None and others:
        return (
            f"No limits are stored for {scope(entity_id, report.resource)} and it has no "
            f"bucket yet. {entity_id} has limits stored for {', '.join(others)} only: "
            f"{_for_one(entity_id, others)}. Pass --limit to show the limits your code uses."
        )
    if report.resource is None:
        where, code = entity_id, "Pass --resource R with --limit"
    else:
        where, code = scope(entity_id, report.resource), "Pass --limit"
    return (
        f"No limits and no buckets are stored for {where}: nothing to show. A bucket "
        "appears with the first request for a resource; 'zae-celery limits set' stores "
        f"limits. {code} to show the limits your code uses."
    )


def _notes(report: BucketReport) -> list[str]:
    """The legend of what the table shows, and the hint at --resource."""
    rows, notes = report.rows, []
    if any(row.resource == EVERY_RESOURCE for row in rows):
        notes.append(
            f"*: the limits stored for every resource of {report.entity_id}; a resource's "
            "bucket starts full at its first request."
        )
    if any(not row.used for row in rows):
        notes.append("unused: nothing consumed from the bucket yet (or for a day): it is full.")
    if any(row.available is None for row in rows):
        notes.append("?: limit not stored here; pass it with --limit to see its burst.")
    others = report.own_resources
    if report.resource is None and others:
        notes.append(
            f"Limits are stored for resource{'s' if len(others) > 1 else ''} "
            f"{', '.join(others)}; for one resource: {_for_one(report.entity_id, others)}"
        )
    return notes
