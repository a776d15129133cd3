"""``zae-celery``: deploy the stack, inspect it, and manage limits, entities and buckets.

Exit codes: 0 success, 1 operational failure (AWS or the endpoint said no, a conflict,
nothing reachable), 2 usage error (bad or missing options and arguments); ``check``
exits 3 when the table speaks another schema version. Every error
message says what to do next.

The same commands are reachable as ``celery -A proj zae ...`` (:data:`celery_command`,
registered in the ``celery.commands`` entry-point group); there the store defaults to the
app's ``zae_store_url``, or its ``zae_table_name``, ``zae_endpoint_url`` and ``zae_region``
settings. The global options are those settings: both entry points check them with the
settings' declarations (:mod:`zae_celery.settings`). On a Redis store (``--store
redis://...``) the limits, entity and buckets commands work, and status shows the prefix
and its schema stamp; the table and stack commands refuse it (exit code 2).

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
messages), :mod:`~zae_celery.cli.stack` (deploy, status, delete, template,
lambda-export),
:mod:`~zae_celery.cli.table` (create-table), :mod:`~zae_celery.cli.limits` (limits,
entity), :mod:`~zae_celery.cli.buckets` (buckets), :mod:`~zae_celery.cli.top` (top) and
:mod:`~zae_celery.cli.usage` (aggregate, usage, runs) and
:mod:`~zae_celery.cli.schema` (version, check, upgrade).
"""

from __future__ import annotations

from typing import Any

import click

from zae_celery.cli.buckets import buckets
from zae_celery.cli.errors import OperationalError
from zae_celery.cli.limits import entity, limits
from zae_celery.cli.options import (
    CONTEXT,
    TABLE_OPTIONS,
    Target,
    format_limit,
    global_options,
    parse_limit,
    problem,
)
from zae_celery.cli.schema import check, upgrade, version
from zae_celery.cli.stack import delete, deploy, lambda_export, status, template
from zae_celery.cli.table import create_table
from zae_celery.cli.top import top
from zae_celery.cli.usage import aggregate, runs, usage
from zae_celery.core import ValidationError
from zae_celery.infra.stack import DEFAULT_TABLE_NAME
from zae_celery.settings import STORE_URL, TABLE_NAME

__all__ = [
    "OperationalError",
    "Target",
    "celery_command",
    "format_limit",
    "main",
    "parse_limit",
]


COMMANDLINE = click.core.ParameterSource.COMMANDLINE
ENVIRONMENT = click.core.ParameterSource.ENVIRONMENT


def _usage(exc: ValidationError) -> click.UsageError:
    return click.UsageError(f"{exc.field}: {problem(exc)}")


def _given_with_store(ctx: click.Context, from_environment: bool) -> list[str]:
    """The table options given beside a store URL: on the command line, and (for
    ``from_environment``) ``--table`` from ZAE_TABLE_NAME."""
    given = []
    for option in TABLE_OPTIONS:
        source = ctx.get_parameter_source(option.param)
        if source == COMMANDLINE:
            given.append(option.flag)
        elif from_environment and option.setting is TABLE_NAME and source == ENVIRONMENT:
            given.append(f"{option.flag} (from {option.envvars[0]})")
    return given


def _refuse_mixing(store: str, given: list[str]) -> None:
    if given:
        raise click.UsageError(
            f"{store} is given together with {', '.join(given)}: give one or the other "
            "(the URL names the store: dynamodb://TABLE?region=...&endpoint_url=..., or "
            "redis://HOST:PORT/DB?prefix=NAME)"
        )


def _store_flag(ctx: click.Context) -> str:
    source = ctx.get_parameter_source("store")
    return "--store (from ZAE_STORE_URL)" if source == ENVIRONMENT else "--store"


@click.group(context_settings=CONTEXT)
@global_options(DEFAULT_TABLE_NAME)
@click.version_option(package_name="zae-celery", prog_name="zae-celery")
@click.pass_context
def main(
    ctx: click.Context,
    table: str,
    region: str | None,
    endpoint_url: str | None,
    store: str | None,
    profile: str | None,
) -> None:
    """Deploy the zae-celery table and manage global rate limits.

    The buckets are in a DynamoDB table (--table, --region, --endpoint-url), or wherever
    --store says: a redis:// URL for a Redis store.

    \b
    Example:
      zae-celery --region eu-west-1 deploy
      zae-celery --table rate_limits limits set tenant-42 --limit rpm=500/m
      zae-celery --store redis://127.0.0.1:6379/0 limits get tenant-42
    """
    if store is None:
        ctx.obj = Target.checked(table, region, endpoint_url, profile)
        return
    _refuse_mixing(_store_flag(ctx), _given_with_store(ctx, from_environment=True))
    try:  # region and endpoint_url come from AWS_* variables here: they fill a dynamodb URL
        ctx.obj = Target.from_store_url(store, region, endpoint_url, profile, "--store")
    except ValidationError as exc:
        raise _usage(exc) from None


@click.group("zae", context_settings=CONTEXT)
@global_options(None)
@click.pass_context
def celery_command(
    ctx: click.Context,
    table: str | None,
    region: str | None,
    endpoint_url: str | None,
    store: str | None,
    profile: str | None,
) -> None:
    """zae-celery commands with the app's zae_store_url (a dynamodb:// or a redis one),
    or its zae_table_name, zae_endpoint_url and zae_region.

    Options given here win over the app's settings, which win over the environment.

    \b
    Example:
      celery -A proj zae limits get tenant-42
    """
    app = getattr(ctx.obj, "app", None)
    conf: Any = getattr(app, "conf", None) or {}
    on_line = _given_with_store(ctx, from_environment=False)
    if ctx.get_parameter_source("store") == COMMANDLINE:
        _refuse_mixing("--store", on_line)
        try:  # region and endpoint_url come from AWS_* variables: they fill a dynamodb URL
            ctx.obj = Target.from_store_url(store, region, endpoint_url, profile, "--store")
        except ValidationError as exc:
            raise _usage(exc) from None
        return
    given = {"table": table, "region": region, "endpoint_url": endpoint_url}
    app_url = conf.get(STORE_URL.name)
    app_table = any(conf.get(o.setting.name) not in (None, "") for o in TABLE_OPTIONS)
    if app_url or (store is not None and not app_table):  # the app's URL, or ZAE_STORE_URL
        name = STORE_URL.name if app_url else _store_flag(ctx)
        url = app_url or store
        if not app_url:
            _refuse_mixing(name, _given_with_store(ctx, from_environment=True))
        try:
            target = Target.from_store_url(url, None, None, profile, name)
        except ValidationError as exc:
            raise _usage(exc) from None
        if target.redis:
            if on_line:
                raise click.UsageError(
                    f"{name} names a Redis store, and {', '.join(on_line)} a DynamoDB "
                    "table: pass --store URL to act on another store"
                )
            ctx.obj = target
            return
        from_url = {
            "table": target.table,
            "region": target.region,
            "endpoint_url": target.endpoint_url,
        }
        for param, value in from_url.items():  # over the environment, under the command line
            source = ctx.get_parameter_source(param)
            if value is not None and source != COMMANDLINE:
                given[param] = value
    for option in TABLE_OPTIONS:
        if ctx.get_parameter_source(option.param) == COMMANDLINE:
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
        raise _usage(exc) from None


for _command in (
    deploy,
    status,
    delete,
    template,
    lambda_export,
    create_table,
    limits,
    entity,
    buckets,
    top,
    aggregate,
    usage,
    runs,
    version,
    check,
    upgrade,
):
    main.add_command(_command)
# The Celery sub-command shares every command.
for _name, _command in main.commands.items():
    celery_command.add_command(_command, _name)
