"""``zae-celery``: deploy the stack, inspect it, and manage limits, entities and buckets.

Exit codes: 0 success, 1 operational failure (AWS or the endpoint said no, a conflict,
nothing reachable), 2 usage error (bad or missing options and arguments). Every error
message says what to do next.

The same commands are reachable as ``celery -A proj zae ...`` (:data:`celery_command`,
registered in the ``celery.commands`` entry-point group); there the table, endpoint and
region default to the app's ``zae_table_name``, ``zae_endpoint_url`` and ``zae_region``
settings. The global options are those settings: both entry points check them with the
settings' declarations (:mod:`zae_celery.settings`).

Limits on the command line (``--limit``, repeatable) are in the grammar of
:meth:`Limit.parse <zae_celery.core.Limit.parse>`, which Celery's ``rate_limit`` strings
share::

    NAME=AMOUNT/PERIOD[:capacity=N][:burst=N]

    rpm=500/m                 500 requests a minute (bucket of 500)
    tpm=90k/m:burst=120k      90 000 tokens a minute, bursts up to 120 000
    rpm=600/m:capacity=10     600 a minute, never more than 10 at once
    tpd=2M/d                  2 000 000 a day
    rps=0.5/s                 one every 2 seconds (a decimal AMOUNT is made whole: 1/2s)

AMOUNT is a whole number (``_`` separators, ``k`` = 1 000, ``M`` = 1 000 000) or a
decimal; N is a whole number; PERIOD is ``[COUNT]UNIT`` with UNIT one of ms, s, m, h, d
(``10s``, ``500ms``, ``m``).

The package, by responsibility: :mod:`~zae_celery.cli.options` (where the commands act,
global options, shared callbacks), :mod:`~zae_celery.cli.errors` (exit codes and
messages), :mod:`~zae_celery.cli.stack` (deploy, status, delete, template),
:mod:`~zae_celery.cli.table` (create-table), :mod:`~zae_celery.cli.limits` (limits,
entity) and :mod:`~zae_celery.cli.buckets` (buckets).
"""

from __future__ import annotations

from typing import Any

import click

from zae_celery.cli.buckets import buckets
from zae_celery.cli.errors import OperationalError
from zae_celery.cli.limits import entity, limits
from zae_celery.cli.options import (
    CONTEXT,
    GLOBAL_OPTIONS,
    Target,
    format_limit,
    global_options,
    parse_limit,
    problem,
)
from zae_celery.cli.stack import delete, deploy, status, template
from zae_celery.cli.table import create_table
from zae_celery.core import ValidationError
from zae_celery.core.stores import StoreUrl
from zae_celery.infra.stack import DEFAULT_TABLE_NAME
from zae_celery.settings import STORE_URL

__all__ = [
    "OperationalError",
    "Target",
    "celery_command",
    "format_limit",
    "main",
    "parse_limit",
]


@click.group(context_settings=CONTEXT)
@global_options(DEFAULT_TABLE_NAME)
@click.version_option(package_name="zae-celery", prog_name="zae-celery")
@click.pass_context
def main(
    ctx: click.Context,
    table: str,
    region: str | None,
    endpoint_url: str | None,
    profile: str | None,
) -> None:
    """Deploy the zae-celery table and manage global rate limits.

    \b
    Example:
      zae-celery --region eu-west-1 deploy
      zae-celery --table rate_limits limits set tenant-42 --limit rpm=500/m
    """
    ctx.obj = Target.checked(table, region, endpoint_url, profile)


@click.group("zae", context_settings=CONTEXT)
@global_options(None)
@click.pass_context
def celery_command(
    ctx: click.Context,
    table: str | None,
    region: str | None,
    endpoint_url: str | None,
    profile: str | None,
) -> None:
    """zae-celery commands with the app's zae_store_url (a dynamodb:// one), or its
    zae_table_name, zae_endpoint_url and zae_region.

    Options given here win over the app's settings, which win over the environment.

    \b
    Example:
      celery -A proj zae limits get tenant-42
    """
    app = getattr(ctx.obj, "app", None)
    conf: Any = getattr(app, "conf", None) or {}
    given = {"table": table, "region": region, "endpoint_url": endpoint_url}
    if conf.get(STORE_URL.name):
        try:
            url = StoreUrl.parse(conf.get(STORE_URL.name), STORE_URL.name)
        except ValidationError as exc:
            raise click.UsageError(f"{exc.field}: {problem(exc)}") from None
        if url.kind != "dynamodb":
            raise click.UsageError(
                f"{STORE_URL.name}: the commands work on a DynamoDB table, not {url.kind}://"
            )
        from_url = {"table": url.name, "region": url.region, "endpoint_url": url.endpoint_url}
        for param, value in from_url.items():  # over the environment, under the command line
            source = ctx.get_parameter_source(param)
            if value is not None and source != click.core.ParameterSource.COMMANDLINE:
                given[param] = value
    for option in GLOBAL_OPTIONS:
        if ctx.get_parameter_source(option.param) == click.core.ParameterSource.COMMANDLINE:
            continue
        configured = conf.get(option.setting.name)
        if configured not in (None, ""):
            given[option.param] = configured
    try:  # the app's values are checked here, naming the setting
        ctx.obj = Target.checked(
            given["table"] or DEFAULT_TABLE_NAME,
            given["region"],
            given["endpoint_url"],
            profile,
        )
    except ValidationError as exc:
        raise click.UsageError(f"{exc.field}: {problem(exc)}") from None


for _command in (deploy, status, delete, template, create_table, limits, entity, buckets):
    main.add_command(_command)
# The Celery sub-command shares every command.
for _name, _command in main.commands.items():
    celery_command.add_command(_command, _name)
