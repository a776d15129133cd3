"""The ``limits`` commands (store, show and delete an entity's limits) and the ``entity``
commands (create an entity under a parent)."""

from __future__ import annotations

import json
from typing import Any

import click

from zae_celery.accounting.snapshots import query_pages
from zae_celery.cli.errors import OperationalError, translate_errors
from zae_celery.cli.options import (
    CONTEXT,
    Target,
    format_limit,
    id_argument,
    limits_option,
    pass_target,
    resource_option,
    scope,
)
from zae_celery.core import Limit
from zae_celery.core.limits import LIMIT_SYNTAX
from zae_celery.infra.migrations import PARENTS_INDEX

__all__ = ["entity", "limits"]


@click.group(context_settings=CONTEXT)
def limits() -> None:
    """Store, show and delete the limits of an entity.

    Stored limits override the limits passed in code (same name), for one resource
    (--resource) or for every resource of the entity. Workers see a change within 60 s.

    \b
    Example:
      zae-celery limits set tenant-42 --resource gpt-4o --limit rpm=500/m --limit tpm=90k/m
    """


@limits.command("set", context_settings=CONTEXT)
@click.argument("entity", callback=id_argument("entity"))
@resource_option
@click.option(
    "--limit",
    "limit_specs",
    multiple=True,
    required=True,
    callback=limits_option,
    metavar="SPEC",
    help=f"A limit: {LIMIT_SYNTAX} (repeatable).",
)
@pass_target
def limits_set(target: Target, entity: str, resource: str | None, limit_specs: list[Limit]) -> None:
    """Store limits for ENTITY, replacing those stored for the same resource.

    SPEC is NAME=AMOUNT/PERIOD[:capacity=N][:burst=N][:shards=N]: PERIOD is [COUNT]UNIT
    with UNIT ms, s, m, h or d; numbers take _ separators and the suffixes k (thousand) and
    M (million); AMOUNT may be a decimal (0.5/s is 1/2s); shards spreads a bucket over N
    items (one DynamoDB item takes at most 1,000 writes a second).

    \b
    Example:
      zae-celery limits set tenant-42 --resource gpt-4o \\
          --limit rpm=500/m --limit tpm=90k/m:burst=120k
    """
    with translate_errors(target):
        target.limiter().set_limits(entity, limit_specs, resource)
    click.echo(f"Stored {len(limit_specs)} limit(s) for {scope(entity, resource)}:")
    for lim in limit_specs:
        click.echo(f"  {format_limit(lim)}")


@limits.command("get", context_settings=CONTEXT)
@click.argument("entity", callback=id_argument("entity"))
@resource_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_target
def limits_get(target: Target, entity: str, resource: str | None, as_json: bool) -> None:
    """Show the limits stored for ENTITY (one per line, in --limit syntax).

    \b
    Example:
      zae-celery limits get tenant-42 --resource gpt-4o
    """
    with translate_errors(target):
        limiter = target.limiter()
        stored = limiter.get_limits(entity, resource)
        # Limits stored per resource are not the entity's own: say where they are.
        elsewhere = [] if stored or resource else [r for r in limiter.stored_limits(entity) if r]
    if as_json:
        click.echo(json.dumps([lim.to_dict() for lim in stored], indent=2))
        return
    if not stored:
        hint = "Store some with 'zae-celery limits set'."
        if elsewhere:
            hint = (
                f"Limits are stored for its resource(s) {', '.join(sorted(elsewhere))}: "
                f"see --resource {sorted(elsewhere)[0]}."
            )
        click.echo(
            f"No limits stored for {scope(entity, resource)}; the limits passed in code "
            f"apply. {hint}",
            err=True,
        )
        return
    for lim in stored:
        click.echo(format_limit(lim))


@limits.command("delete", context_settings=CONTEXT)
@click.argument("entity", callback=id_argument("entity"))
@resource_option
@pass_target
def limits_delete(target: Target, entity: str, resource: str | None) -> None:
    """Delete the limits stored for ENTITY (the limits in code apply again).

    \b
    Example:
      zae-celery limits delete tenant-42 --resource gpt-4o
    """
    with translate_errors(target):
        limiter = target.limiter()
        if not limiter.get_limits(entity, resource):
            click.echo(f"No limits stored for {scope(entity, resource)}; nothing to delete.")
            return
        limiter.delete_limits(entity, resource)
    click.echo(f"Deleted the stored limits of {scope(entity, resource)}.")


# -- entities ------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
def entity() -> None:
    """Create entities (API keys, projects, tenants) and link them to a parent.

    \b
    Example:
      zae-celery entity create key-1 --parent project-a --cascade
    """


@entity.command("create", context_settings=CONTEXT)
@click.argument("entity_id", metavar="ENTITY", callback=id_argument("entity"))
@click.option("--parent", callback=id_argument("parent"), help="The parent entity.")
@click.option(
    "--cascade",
    is_flag=True,
    help="Every acquire of ENTITY also consumes the parent's buckets, atomically.",
)
@pass_target
def entity_create(target: Target, entity_id: str, parent: str | None, cascade: bool) -> None:
    """Create (or replace) ENTITY, optionally under --parent with --cascade.

    \b
    Example:
      zae-celery entity create key-1 --parent project-a --cascade
    """
    if cascade and parent is None:
        raise click.UsageError("--cascade needs --parent: name the entity to cascade to")
    if parent is not None and parent == entity_id:
        raise click.UsageError("an entity cannot be its own --parent")
    with translate_errors(target):
        target.limiter().create_entity(entity_id, parent_id=parent, cascade=cascade)
    text = f"Entity {entity_id} stored"
    if parent is not None:
        text += f" under {parent}" + (
            " (cascade: acquires also consume the parent)" if cascade else ""
        )
    click.echo(text + ".")


@entity.command("children", context_settings=CONTEXT)
@click.argument("entity_id", metavar="ENTITY", callback=id_argument("entity"))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_target
def entity_children(target: Target, entity_id: str, as_json: bool) -> None:
    """List the entities whose parent is ENTITY (from the table's 'parents' index).

    \b
    Example:
      zae-celery entity children project-a
    """
    if target.redis:
        raise click.UsageError(
            f"'entity children' reads the DynamoDB table's index of parents; the store is "
            f"{target.where()}, which has none"
        )
    children = []
    with translate_errors(target):
        client = target.client("dynamodb")
        request: dict[str, Any] = {
            "TableName": target.table,
            "IndexName": PARENTS_INDEX,
            "KeyConditionExpression": "#parent = :parent",
            "ExpressionAttributeNames": {"#parent": "parent"},
            "ExpressionAttributeValues": {":parent": {"S": entity_id}},
        }
        try:
            for item in query_pages(client, request):
                children.append(item["PK"]["S"].removeprefix("E#"))
        except client.exceptions.ClientError as exc:
            if "index" not in str(exc).lower():
                raise
            raise OperationalError(
                f"table {target.table!r} has no index of parents yet: run 'zae-celery "
                "upgrade' (or, for the stack's table, 'zae-celery deploy')"
            ) from None
    if as_json:
        click.echo(json.dumps(sorted(children)))
    elif children:
        click.echo("\n".join(sorted(children)))
    else:
        click.echo(f"No entity has {entity_id} as its parent.")
