"""``version`` and ``check``: this zae-celery's version and schema, against the table's."""

from __future__ import annotations

import importlib.metadata
import json

import click

from zae_celery.cli.errors import translate_errors
from zae_celery.cli.options import CONTEXT, Target, pass_target
from zae_celery.cli.stack import schema_text
from zae_celery.core import SCHEMA_VERSION

__all__ = ["INCOMPATIBLE", "check", "version"]

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
    if as_json:
        data = {
            "client": _client_version(),
            "client_schema": SCHEMA_VERSION,
            "store": target.where(),
            "table_schema": found,
            "compatible": found in (None, SCHEMA_VERSION),
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"zae-celery {_client_version()} (schema version {SCHEMA_VERSION})")
    click.echo(f"{target.where()}: {schema_text(found)}")


@click.command("check", context_settings=CONTEXT)
@pass_target
def check(target: Target) -> None:
    """Check that this zae-celery can use the table (or Redis prefix).

    Exit codes: 0 compatible (the table speaks this schema version, or has none yet and
    the first request stamps it); 1 the check could not be made (unreachable, no
    credentials, no such table); 3 incompatible: the table speaks another schema
    version (install the zae-celery that speaks it, or use another table).

    \b
    Example:
      zae-celery --region eu-west-1 --table rate-limits check && deploy-workers
    """
    with translate_errors(target):
        found = target.limiter().schema_version()
    text = f"{target.where()}: {schema_text(found)}"
    if found not in (None, SCHEMA_VERSION):
        click.echo(text, err=True)
        raise SystemExit(INCOMPATIBLE)
    click.echo(f"{text}: compatible with zae-celery {_client_version()}.")
