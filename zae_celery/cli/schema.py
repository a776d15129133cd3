"""``version``, ``check`` and ``upgrade``: this zae-celery's version and schema against
the table's, and the table's migrations (:mod:`zae_celery.infra.migrations`)."""

from __future__ import annotations

import importlib.metadata
import json

import click

from zae_celery.cli.errors import OperationalError, translate_errors
from zae_celery.cli.options import CONTEXT, Target, pass_target
from zae_celery.cli.stack import schema_text
from zae_celery.core import SCHEMA_VERSION
from zae_celery.infra import migrations

__all__ = ["INCOMPATIBLE", "check", "upgrade", "version"]

INCOMPATIBLE = 3
"""``check``'s exit code when the table speaks another schema version."""


def _client_version() -> str:
    try:
        return importlib.metadata.version("zae-celery")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


@click.command("version", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_target
def version(target: Target, as_json: bool) -> None:
    """Show this zae-celery's version and schema version, and the table's (or Redis
    prefix's) schema version.

    \b
    Example:
      zae-celery --region eu-west-1 --table rate-limits version
    """
    with translate_errors(target):
        found = target.limiter().schema_version()
        waiting = _pending(target)
    if as_json:
        data = {
            "client": _client_version(),
            "client_schema": SCHEMA_VERSION,
            "store": target.where(),
            "table_schema": found,
            "compatible": found in (None, SCHEMA_VERSION),
            "pending_migrations": waiting,
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"zae-celery {_client_version()} (schema version {SCHEMA_VERSION})")
    click.echo(f"{target.where()}: {schema_text(found)}")
    if waiting:
        click.echo(f"Migrations pending: {', '.join(waiting)} (run 'zae-celery upgrade').")


def _pending(target: Target) -> list[str]:
    """The ids of the table's pending migrations (none on a Redis store)."""
    if target.redis:
        return []
    return [m.id for m in migrations.pending(target.client("dynamodb"), target.table)]


@click.command("check", context_settings=CONTEXT)
@pass_target
def check(target: Target) -> None:
    """Check that this zae-celery can use the table (or Redis prefix).

    Exit codes: 0 compatible (the table speaks this schema version, or has none yet and
    the first request stamps it; pending migrations are named, and do not stop workers);
    1 the check could not be made (unreachable, no credentials, no such table); 3
    incompatible: the table speaks another schema version (install the zae-celery that
    speaks it, or use another table).

    \b
    Example:
      zae-celery --region eu-west-1 --table rate-limits check && deploy-workers
    """
    with translate_errors(target):
        found = target.limiter().schema_version()
        waiting = _pending(target) if found in (None, SCHEMA_VERSION) else []
    text = f"{target.where()}: {schema_text(found)}"
    if found not in (None, SCHEMA_VERSION):
        click.echo(text, err=True)
        raise SystemExit(INCOMPATIBLE)
    click.echo(f"{text}: compatible with zae-celery {_client_version()}.")
    if waiting:
        click.echo(f"Migrations pending: {', '.join(waiting)} (run 'zae-celery upgrade').")


@click.command("upgrade", context_settings=CONTEXT)
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@pass_target
def upgrade(target: Target, dry_run: bool) -> None:
    """Run the table's pending migrations, in order, and record them.

    Each migration is idempotent and resumable: run upgrade again after an interruption
    and it goes on from where the table is. Workers keep running meanwhile (a migration
    never changes how items are written). A table that belongs to a stack is changed by
    deploying the stack's new template ('zae-celery deploy'); upgrade then records it.

    \b
    Example:
      zae-celery --endpoint-url http://127.0.0.1:8000 --table rate_limits upgrade --dry-run
    """
    target.need_table("upgrade")
    with translate_errors(target):
        limiter = target.limiter()
        found = limiter.schema_version()
        if found not in (None, SCHEMA_VERSION):
            raise OperationalError(f"{target.where()}: {schema_text(found)}")
        client = target.client("dynamodb")
        done = migrations.applied(client, target.table)
        todo = [m for m in migrations.MIGRATIONS if m.id not in done]
        if not todo:
            click.echo(f"{target.table} is up to date: nothing to do.")
            return
        if dry_run:
            for m in todo:
                work = m.plan(client, target.table) if m.needed(client, target.table) else None
                click.echo(f"{m.id}: {m.description}: {work or 'already done, to be recorded'}")
            click.echo("Dry run: nothing was changed.")
            return
        limiter.warm_up()  # stamps the schema version of a table that has none yet
        for m in todo:
            try:
                m.apply(client, target.table, lambda line: click.echo(f"  {line}"))
            except migrations.MigrationError as exc:
                raise OperationalError(f"{m.id}: {exc}") from None
            migrations.record(client, target.table, m)
            click.echo(f"{m.id}: {m.description}: done.")
