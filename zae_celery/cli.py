"""``zae-celery``: deploy the stack, inspect it, and manage limits, entities and buckets.

Exit codes: 0 success, 1 operational failure (AWS or the endpoint said no, a conflict,
nothing reachable), 2 usage error (bad or missing options and arguments). Every error
message says what to do next.

The same commands are reachable as ``celery -A proj zae ...`` (:data:`celery_command`,
registered in the ``celery.commands`` entry-point group); there the table, endpoint and
region default to the app's ``zae_table_name``, ``zae_endpoint_url`` and ``zae_region``
settings.

Limits on the command line (``--limit``, repeatable)::

    NAME=AMOUNT/PERIOD[:capacity=N][:burst=N]

    rpm=500/m                 500 requests a minute (bucket of 500)
    tpm=90k/m:burst=120k      90 000 tokens a minute, bursts up to 120 000
    rpm=600/m:capacity=10     600 a minute, never more than 10 at once
    tpd=2M/d                  2 000 000 a day

AMOUNT and N are whole numbers (``_`` separators, ``k`` = 1 000, ``M`` = 1 000 000);
PERIOD is ``[COUNT]UNIT`` with UNIT one of ms, s, m, h, d (``10s``, ``500ms``, ``m``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from zae_celery.core import (
    IncompatibleSchema,
    Limit,
    RateLimiter,
    RateLimiterUnavailable,
    ValidationError,
    ZaeError,
    bucket,
)
from zae_celery.core.limits import MAX_TOKENS, check_limit_name
from zae_celery.core.schema import check_id, entity_pk
from zae_celery.core.stores.dynamodb import DEFAULT_LOCAL_REGION, client_config
from zae_celery.infra import template_text
from zae_celery.infra.stack import (
    DEFAULT_TABLE_NAME,
    PARAMETERS,
    StackError,
    StackEvent,
    StackInfo,
    StackManager,
    check_stack_name,
    check_table_name,
    default_stack_name,
)

__all__ = [
    "OperationalError",
    "Settings",
    "celery_command",
    "format_limit",
    "main",
    "parse_limit",
]

F = TypeVar("F", bound=Callable[..., Any])


# -- errors ---------------------------------------------------------------------------------
class OperationalError(click.ClickException):
    """The command was fine but the operation failed (exit code 1)."""

    exit_code = 1


@contextlib.contextmanager
def _translate_errors(settings: Settings | None = None) -> Iterator[None]:
    """Turn engine, botocore and stack errors into exit codes 1 or 2 with a next step."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )
    from botocore.parsers import ResponseParserError

    where = settings.where() if settings is not None else "AWS"
    try:
        yield
    except click.ClickException:
        raise
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from exc
    except IncompatibleSchema as exc:
        raise OperationalError(str(exc)) from exc
    except RateLimiterUnavailable as exc:
        raise OperationalError(
            f"{exc}\nCheck that {where} is reachable and that the table exists "
            "('zae-celery status', or 'zae-celery create-table' on a local endpoint)."
        ) from exc
    except ZaeError as exc:
        raise OperationalError(str(exc)) from exc
    except StackError as exc:
        text = str(exc)
        if exc.events:
            text += "\nFailing stack events:\n" + "\n".join(f"  {e.line()}" for e in exc.events)
        raise OperationalError(text) from exc
    except ProfileNotFound as exc:
        raise click.UsageError(f"{exc}: pass an existing --profile or set AWS_PROFILE") from exc
    except NoRegionError as exc:
        raise click.UsageError(_NO_REGION) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise OperationalError(_NO_CREDENTIALS) from exc
    except EndpointConnectionError as exc:
        raise OperationalError(
            f"cannot reach {where}: {exc}. Check --endpoint-url (or AWS_ENDPOINT_URL) and "
            "that the endpoint is running."
        ) from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", ""))
        hint = _CLIENT_ERROR_HINTS.get(code, "Fix the cause above and run the command again.")
        raise OperationalError(f"{where} refused the request: {code}: {message}\n{hint}") from exc
    except BotoCoreError as exc:
        raise OperationalError(f"request to {where} failed: {exc}") from exc
    except ResponseParserError as exc:
        raise OperationalError(
            f"{where} sent a response that is not an AWS response ({str(exc)[:200]}); check "
            "that --endpoint-url points at DynamoDB/CloudFormation, and its logs."
        ) from exc


_NO_REGION = (
    "no AWS region configured: pass --region (e.g. --region eu-west-1), set AWS_REGION, "
    "or put a region in your AWS profile"
)
_NO_CREDENTIALS = (
    "no AWS credentials found: configure them the usual way (AWS_PROFILE, "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, 'aws configure', an instance role). A local "
    "endpoint accepts any values: export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local"
)
_CLIENT_ERROR_HINTS = {
    "AccessDenied": "Your AWS identity lacks a permission: ask for it, or use another --profile.",
    "AccessDeniedException": (
        "Your AWS identity lacks a permission: attach the stack's AdminPolicyArn "
        "('zae-celery status' prints it), or use another --profile."
    ),
    "UnrecognizedClientException": "The credentials are invalid: check your AWS profile or keys.",
    "InvalidClientTokenId": "The credentials are invalid: check your AWS profile or keys.",
    "ExpiredToken": "The credentials have expired: refresh them (e.g. 'aws sso login').",
    "ExpiredTokenException": "The credentials have expired: refresh them (e.g. 'aws sso login').",
    "InsufficientCapabilitiesException": "The stack needs CAPABILITY_IAM; report this as a bug.",
}


# -- settings -------------------------------------------------------------------------------
@dataclass
class Settings:
    """Where the commands act: table, region, endpoint and profile."""

    table: str = DEFAULT_TABLE_NAME
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    _session: Any = field(default=None, repr=False)

    def where(self) -> str:
        """The endpoint, for messages."""
        return self.endpoint_url or (f"AWS ({self.region})" if self.region else "AWS")

    def session(self) -> Any:
        """The boto3 session (profile applied)."""
        if self._session is None:
            import boto3
            from botocore.exceptions import ProfileNotFound

            try:
                self._session = boto3.session.Session(profile_name=self.profile)
            except ProfileNotFound as exc:
                raise click.UsageError(
                    f"AWS profile {self.profile!r} not found: pass an existing --profile "
                    "(see 'aws configure list-profiles') or unset AWS_PROFILE"
                ) from exc
        return self._session

    @property
    def local(self) -> bool:
        """True when DynamoDB is reached through an explicit endpoint (not AWS itself)."""
        return bool(self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB"))

    def resolved_region(self) -> str:
        """The region: --region, AWS_REGION, the profile's, or us-east-1 on local endpoints."""
        region = self.region or self.session().region_name
        if region:
            return str(region)
        if self.local:
            return DEFAULT_LOCAL_REGION
        raise click.UsageError(_NO_REGION)

    def check_ready(self) -> str:
        """Check region and credentials before any request; returns the region."""
        region = self.resolved_region()
        if self.session().get_credentials() is None:
            raise OperationalError(_NO_CREDENTIALS)
        self.region = region
        return region

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` at the configured endpoint and region."""
        region = self.check_ready()
        kwargs: dict[str, Any] = {"region_name": region, "config": client_config()}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        return self.session().client(service, **kwargs)

    def limiter(self) -> RateLimiter:
        """The engine on the configured table."""
        region = self.check_ready()
        return RateLimiter(
            self.table, endpoint_url=self.endpoint_url, region=region, session=self.session()
        )

    def stack_manager(self, **kwargs: Any) -> StackManager:
        """A :class:`StackManager` with CloudFormation and DynamoDB clients."""
        return StackManager(self.client("cloudformation"), self.client("dynamodb"), **kwargs)


pass_settings = click.make_pass_decorator(Settings)


# -- limits on the command line -----------------------------------------------------------
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_UNIT_ALIASES = {
    "sec": "s",
    "second": "s",
    "min": "m",
    "minute": "m",
    "hour": "h",
    "day": "d",
}
_SPEC = re.compile(r"^(?P<name>[^=]+)=(?P<amount>[^/]+)/(?P<period>[^:]+)(?P<options>(:.*)?)$")
_PERIOD = re.compile(r"^(?P<count>\d+)?(?P<unit>[a-z]+)$")
LIMIT_SYNTAX = "NAME=AMOUNT/PERIOD[:capacity=N][:burst=N], e.g. rpm=500/m or tpm=90k/m:burst=120k"


def _amount(text: str, what: str) -> int:
    match = re.fullmatch(r"(\d[\d_]*)([kM]?)", text.strip())
    if not match or "__" in match.group(1) or match.group(1).endswith("_"):
        raise ValueError(f"{what} {text!r} is not a whole number (e.g. 500, 90_000, 90k, 2M)")
    value = (
        int(match.group(1).replace("_", "")) * {"": 1, "k": 1000, "M": 1_000_000}[match.group(2)]
    )
    if not 1 <= value <= MAX_TOKENS:
        raise ValueError(f"{what} {text!r} is out of range (1..{MAX_TOKENS})")
    return value


def _period_ms(text: str) -> int:
    match = _PERIOD.fullmatch(text.strip())
    unit = _UNIT_ALIASES.get(match.group("unit"), match.group("unit")) if match else ""
    if not match or unit not in _UNITS_MS:
        raise ValueError(
            f"period {text!r} is not COUNT UNIT with UNIT one of ms, s, m, h, d "
            "(e.g. m, 10s, 500ms)"
        )
    count = int(match.group("count") or 1)
    if count < 1:
        raise ValueError(f"period {text!r} must be at least 1 {unit}")
    return count * _UNITS_MS[unit]


def parse_limit(text: str) -> Limit:
    """A :class:`Limit` from ``NAME=AMOUNT/PERIOD[:capacity=N][:burst=N]``.

    >>> parse_limit("tpm=90k/m:burst=120k")
    Limit(name='tpm', capacity=90000, burst=120000, refill_amount=90000, refill_period_ms=60000)

    Raises ValueError (naming the bad part and showing the syntax) on bad input.
    """
    match = _SPEC.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a limit: expected {LIMIT_SYNTAX}")
    name = match.group("name").strip()
    try:
        check_limit_name("name", name)
    except ValidationError as exc:
        raise ValueError(
            f"invalid limit name {name!r}: a letter, then letters, digits or _ (at most 64)"
        ) from exc
    amount = _amount(match.group("amount"), "amount")
    period = _period_ms(match.group("period"))
    options: dict[str, int] = {}
    for part in match.group("options").split(":")[1:]:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("capacity", "burst"):
            raise ValueError(f"unknown option {part!r} in {text!r}: use capacity=N or burst=N")
        if key in options:
            raise ValueError(f"option {key!r} appears twice in {text!r}")
        options[key] = _amount(value, key)
    capacity = options.get("capacity", amount)
    burst = options.get("burst", capacity)
    try:
        return Limit(name, capacity, burst, amount, period)
    except ValidationError as exc:
        raise ValueError(f"{text!r}: {exc}") from exc


def _period_text(period_ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if period_ms % size == 0:
            count = period_ms // size
            return unit if count == 1 else f"{count}{unit}"
    return f"{period_ms}ms"


def _rate_text(amount: int, period_ms: int) -> str:
    return f"{amount}/{_period_text(period_ms)}"


def format_limit(limit: Limit) -> str:
    """The command-line form of a limit (the inverse of :func:`parse_limit`).

    >>> format_limit(Limit.per_minute("tpm", 90_000, burst=120_000))
    'tpm=90000/m:burst=120000'
    """
    text = f"{limit.name}={_rate_text(limit.refill_amount, limit.refill_period_ms)}"
    if limit.capacity != limit.refill_amount:
        text += f":capacity={limit.capacity}"
    if limit.burst != limit.capacity:
        text += f":burst={limit.burst}"
    return text


def _limits_option(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> list[Limit]:
    limits: list[Limit] = []
    for value in values:
        try:
            limits.append(parse_limit(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    names = [lim.name for lim in limits]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise click.BadParameter(
            f"limit {', '.join(duplicates)} given twice; give each name once", ctx=ctx, param=param
        )
    return limits


def _id_argument(field_name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check_id(field_name, value)
        except ValidationError as exc:
            raise click.BadParameter(
                f"{value[:60]!r}: 1-256 letters, digits and _ . : @ / + = , - "
                "(not starting with punctuation; no # or *)",
                ctx=ctx,
                param=param,
            ) from exc

    return check


def _pairs(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", ctx=ctx, param=param)
        result[key.strip()] = val
    return result


# -- global options and the two entry points ------------------------------------------------
def _check_table(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is None:
        return None
    try:
        return check_table_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def _check_endpoint(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value and not str(value).startswith(("http://", "https://")):
        raise click.BadParameter(
            f"{value!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000)",
            ctx=ctx,
            param=param,
        )
    return value or None


def _global_options(default_table: str | None) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        options = [
            click.option(
                "--table",
                envvar="ZAE_TABLE_NAME",
                default=default_table,
                show_default=default_table is not None,
                callback=_check_table,
                help="DynamoDB table (env ZAE_TABLE_NAME).",
            ),
            click.option(
                "--region",
                envvar=["AWS_REGION", "AWS_DEFAULT_REGION"],
                help="AWS region (env AWS_REGION, AWS_DEFAULT_REGION, or the profile's).",
            ),
            click.option(
                "--endpoint-url",
                envvar="AWS_ENDPOINT_URL",
                callback=_check_endpoint,
                help="Endpoint of DynamoDB/CloudFormation, e.g. a local server "
                "(env AWS_ENDPOINT_URL).",
            ),
            click.option("--profile", envvar="AWS_PROFILE", help="AWS profile (env AWS_PROFILE)."),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=_CONTEXT)
@_global_options(DEFAULT_TABLE_NAME)
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
    ctx.obj = Settings(table=table, region=region, endpoint_url=endpoint_url, profile=profile)


@click.group("zae", context_settings=_CONTEXT)
@_global_options(None)
@click.pass_context
def celery_command(
    ctx: click.Context,
    table: str | None,
    region: str | None,
    endpoint_url: str | None,
    profile: str | None,
) -> None:
    """zae-celery commands with the app's zae_table_name, zae_endpoint_url, zae_region.

    Options given here win over the app's settings, which win over the environment.

    \b
    Example:
      celery -A proj zae limits get tenant-42
    """
    app = getattr(ctx.obj, "app", None)
    conf: Any = getattr(app, "conf", None) or {}

    def pick(name: str, setting: str, value: Any) -> Any:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            return value
        configured = conf.get(setting)
        return configured if configured not in (None, "") else value

    table = pick("table", "zae_table_name", table) or DEFAULT_TABLE_NAME
    try:
        check_table_name(str(table))
    except ValueError as exc:
        raise click.UsageError(f"zae_table_name: {exc}") from exc
    endpoint = pick("endpoint_url", "zae_endpoint_url", endpoint_url)
    _check_endpoint(ctx, next(p for p in ctx.command.params if p.name == "endpoint_url"), endpoint)
    ctx.obj = Settings(
        table=str(table),
        region=pick("region", "zae_region", region),
        endpoint_url=endpoint,
        profile=profile,
    )


# -- stack commands ------------------------------------------------------------------------
def _stack_option(f: F) -> F:
    return click.option(
        "--stack",
        envvar="ZAE_STACK_NAME",
        help="CloudFormation stack name (env ZAE_STACK_NAME; default: the table name, "
        "with _ and . as -).",
    )(f)


def _stack_name(settings: Settings, stack: str | None) -> str:
    name = stack or default_stack_name(settings.table)
    try:
        return check_stack_name(name)
    except ValueError as exc:
        raise click.UsageError(f"--stack: {exc}") from exc


def _print_event(event: StackEvent) -> None:
    stamp = event.timestamp.strftime("%H:%M:%S ") if event.timestamp else ""
    click.echo(f"  {stamp}{event.line()}", err=True)


def _print_outputs(info: StackInfo) -> None:
    width = max((len(k) for k in info.outputs), default=0)
    for key in sorted(info.outputs):
        click.echo(f"  {key.ljust(width)}  {info.outputs[key]}")


def _flag(value: bool | None) -> str | None:
    return None if value is None else ("true" if value else "false")


@main.command(context_settings=_CONTEXT)
@_stack_option
@click.option("--pitr/--no-pitr", default=None, help="Point-in-time recovery (default on).")
@click.option(
    "--stream",
    type=click.Choice(["NONE", "KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", "NEW_AND_OLD_IMAGES"]),
    help="DynamoDB stream view type (default NONE: no stream).",
)
@click.option(
    "--deletion-protection/--no-deletion-protection",
    default=None,
    help="Protect the table from deletion (default on).",
)
@click.option("--environment", help="Value of the table's zae-celery:environment tag.")
@click.option("--alarms/--no-alarms", default=None, help="CloudWatch alarms (default off).")
@click.option("--alarm-topic", help="SNS topic ARN the alarms notify (implies --alarms).")
@click.option(
    "--parameter",
    "parameters",
    multiple=True,
    callback=_pairs,
    metavar="KEY=VALUE",
    help=f"Any template parameter ({', '.join(PARAMETERS[5:])}...).",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=_pairs,
    metavar="KEY=VALUE",
    help="Stack tag, copied by CloudFormation onto the table and alarms (repeatable).",
)
@click.option(
    "--keep-failed",
    is_flag=True,
    help="Keep a stack whose creation failed (ROLLBACK_COMPLETE) for inspection.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=1800,
    show_default=True,
    help="Seconds to wait for CloudFormation.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0.1),
    default=5,
    show_default=True,
    help="Seconds between status checks while waiting.",
)
@pass_settings
def deploy(
    settings: Settings,
    stack: str | None,
    pitr: bool | None,
    stream: str | None,
    deletion_protection: bool | None,
    environment: str | None,
    alarms: bool | None,
    alarm_topic: str | None,
    parameters: dict[str, str],
    tags: dict[str, str],
    keep_failed: bool,
    timeout: float,
    poll: float,
) -> None:
    """Create or update the CloudFormation stack and wait for it.

    Options left out keep their current value on an update (template defaults on
    creation). Prints the failing stack events when CloudFormation fails; a creation
    that failed is rolled back and its empty stack deleted (unless --keep-failed).

    \b
    Example:
      zae-celery --region eu-west-1 --table rate-limits deploy --alarms \\
          --alarm-topic arn:aws:sns:eu-west-1:123456789012:ops --tag team=ml
    """
    name = _stack_name(settings, stack)
    values = dict(parameters)
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        raise click.UsageError(
            f"unknown template parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}"
        )
    if "TableName" in values and values["TableName"] != settings.table:
        raise click.UsageError("give the table name with --table, not --parameter TableName")
    if alarm_topic is not None and alarms is False:
        raise click.UsageError("--alarm-topic needs alarms: drop --no-alarms")
    explicit = {
        "TableName": settings.table,
        "PointInTimeRecovery": _flag(pitr),
        "StreamViewType": stream,
        "DeletionProtection": _flag(deletion_protection),
        "Environment": environment,
        "Alarms": _flag(True if alarm_topic else alarms),
        "AlarmTopicArn": alarm_topic,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    with _translate_errors(settings):
        manager = settings.stack_manager(timeout=timeout, poll_interval=poll, on_event=_print_event)
        click.echo(f"Deploying stack {name} (table {settings.table}) to {settings.where()}...")
        action, info = manager.deploy(name, values, tags, keep_failed=keep_failed)
    if action == "unchanged":
        click.echo(f"Stack {name} is up to date ({info.status}); nothing to change.")
    else:
        click.echo(f"Stack {name} {action} ({info.status}).")
    _print_outputs(info)
    click.echo(
        "Next: attach WorkerPolicyArn to your workers' IAM role and set "
        f"zae_table_name = {settings.table!r} in Celery's configuration."
    )


@main.command(context_settings=_CONTEXT)
@_stack_option
@pass_settings
def status(settings: Settings, stack: str | None) -> None:
    """Show the stack's status, parameters and outputs, and its table.

    Exits 1 when there is no such stack or it is in a failed state.

    \b
    Example:
      zae-celery --region eu-west-1 status --stack rate-limits
    """
    name = _stack_name(settings, stack)
    with _translate_errors(settings):
        manager = settings.stack_manager()
        info = manager.describe(name)
        if info is None:
            raise OperationalError(
                f"there is no stack {name!r} in {settings.where()}. Deploy it with "
                f"'zae-celery --table {settings.table} deploy', or pass --stack / --region."
            )
        click.echo(f"Stack:   {info.name}")
        click.echo(f"Status:  {info.status}" + (f" ({info.reason})" if info.reason else ""))
        if info.last_updated is not None:
            click.echo(f"Updated: {info.last_updated:%Y-%m-%d %H:%M:%S %Z}".rstrip())
        click.echo("Parameters:")
        width = max((len(k) for k in info.parameters), default=0)
        for key in PARAMETERS:
            if key in info.parameters:
                click.echo(f"  {key.ljust(width)}  {info.parameters[key]}")
        if info.outputs:
            click.echo("Outputs:")
            _print_outputs(info)
        table_name = info.table_name
        table = manager.table(table_name) if table_name and info.healthy else None
        if table is not None:
            ttl = manager.dynamodb.describe_time_to_live(TableName=table_name)
            spec = ttl.get("TimeToLiveDescription", {})
            click.echo(
                f"Table:   {table_name} {table.get('TableStatus', '?')}, "
                f"{table.get('ItemCount', 0)} items, TTL {spec.get('TimeToLiveStatus', '?')}"
                + (f" on {spec['AttributeName']}" if spec.get("AttributeName") else "")
                + (", deletion protection on" if table.get("DeletionProtectionEnabled") else "")
            )
            if spec.get("TimeToLiveStatus") == "DISABLED":
                click.echo(
                    "Warning: TTL is off, so idle buckets never expire; enable it on the "
                    "attribute 'ttl' (local servers ignore the template's TTL setting: "
                    "'zae-celery create-table --exist-ok' enables it).",
                    err=True,
                )
        if not info.healthy and not info.in_progress:
            failed = manager.failed_events(info.stack_id)
            lines = "".join(f"\n  {e.line()}" for e in failed)
            raise OperationalError(
                f"stack {name!r} is in {info.status}."
                + (f"\nFailing stack events:{lines}" if lines else "")
                + f"\nDelete it with 'zae-celery delete --stack {name}' and deploy again."
            )


@main.command(context_settings=_CONTEXT)
@_stack_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True)
@click.option("--poll", type=click.FloatRange(min=0.1), default=5, show_default=True)
@pass_settings
def delete(settings: Settings, stack: str | None, yes: bool, timeout: float, poll: float) -> None:
    """Delete the stack, its table (every limit and bucket) and its policies.

    Asks for confirmation unless --yes. A table with deletion protection is refused
    (nothing is deleted): deploy with --no-deletion-protection first.

    \b
    Example:
      zae-celery --region eu-west-1 delete --stack rate-limits --yes
    """
    name = _stack_name(settings, stack)
    with _translate_errors(settings):
        manager = settings.stack_manager(timeout=timeout, poll_interval=poll, on_event=_print_event)
        info = manager.describe(name)
        if info is None:
            raise OperationalError(
                f"there is no stack {name!r} in {settings.where()}; nothing to delete. "
                "Check --stack and --region."
            )
        if not yes and not click.confirm(
            f"Delete stack {name} and table {info.table_name} with every stored limit and bucket?",
            err=True,
        ):
            raise OperationalError("not confirmed; nothing was deleted (pass --yes to skip asking)")
        manager.delete(name)
    click.echo(f"Stack {name} deleted.")


@main.command(context_settings=_CONTEXT)
def template() -> None:
    """Print the CloudFormation template (to deploy it with your own tooling).

    \b
    Example:
      zae-celery template > zae-celery.yaml
    """
    click.echo(template_text(), nl=False)


@main.command("create-table", context_settings=_CONTEXT)
@click.option(
    "--exist-ok",
    is_flag=True,
    help="Accept an existing table (its schema is checked and TTL enabled if off).",
)
@pass_settings
def create_table(settings: Settings, exist_ok: bool) -> None:
    """Create the table directly on a local endpoint (moto, DynamoDB Local).

    Enables TTL on the 'ttl' attribute with an explicit call (local servers ignore
    CloudFormation's TTL setting) and stamps the schema version. On AWS, deploy the
    stack instead: it adds the IAM policies, backups and alarms.

    \b
    Example:
      zae-celery --endpoint-url http://127.0.0.1:8000 --table rate_limits create-table
    """
    if not settings.local:
        raise click.UsageError(
            "create-table is for local endpoints: pass --endpoint-url (or set "
            "AWS_ENDPOINT_URL). On AWS, deploy the stack: 'zae-celery deploy'."
        )
    from botocore.exceptions import ClientError

    with _translate_errors(settings):
        limiter = settings.limiter()
        client = limiter.client
        existed = _table_exists(client, settings.table)
        if existed and not exist_ok:
            raise OperationalError(
                f"table {settings.table!r} already exists at {settings.where()}; nothing was "
                "changed. Use it as it is, pick another --table, or pass --exist-ok."
            )
        try:
            limiter.create_table()
        except Exception:
            if not existed and _table_exists(client, settings.table):
                # Leave nothing half-made: a table without TTL or schema stamp goes.
                with contextlib.suppress(ClientError):
                    client.delete_table(TableName=settings.table)
            raise
        spec = client.describe_time_to_live(TableName=settings.table).get(
            "TimeToLiveDescription", {}
        )
        if spec.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            client.update_time_to_live(
                TableName=settings.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
            )
            spec = {"TimeToLiveStatus": "ENABLED", "AttributeName": "ttl"}
        elif spec.get("AttributeName") != "ttl":
            raise OperationalError(
                f"table {settings.table!r} expires items on {spec.get('AttributeName')!r}, "
                "but the engine writes 'ttl': idle buckets would never expire. Disable TTL "
                "on the table, then run create-table --exist-ok again."
            )
    verb = "already existed" if existed else "created"
    click.echo(
        f"Table {settings.table} {verb} at {settings.where()}; TTL "
        f"{spec.get('TimeToLiveStatus', '?').lower()} on 'ttl'."
    )


def _table_exists(client: Any, table: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.describe_table(TableName=table)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            return False
        raise
    return True


# -- limits --------------------------------------------------------------------------------
@main.group(context_settings=_CONTEXT)
def limits() -> None:
    """Store, show and delete the limits of an entity.

    Stored limits override the limits passed in code (same name), for one resource
    (--resource) or for every resource of the entity. Workers see a change within 60 s.

    \b
    Example:
      zae-celery limits set tenant-42 --resource gpt-4o --limit rpm=500/m --limit tpm=90k/m
    """


_resource_option = click.option(
    "--resource",
    callback=_id_argument("resource"),
    help="The resource (e.g. a model); default: every resource of the entity.",
)


def _scope(entity: str, resource: str | None) -> str:
    return f"{entity} / {resource if resource is not None else '* (every resource)'}"


@limits.command("set", context_settings=_CONTEXT)
@click.argument("entity", callback=_id_argument("entity"))
@_resource_option
@click.option(
    "--limit",
    "limit_specs",
    multiple=True,
    required=True,
    callback=_limits_option,
    metavar="SPEC",
    help=f"A limit: {LIMIT_SYNTAX} (repeatable).",
)
@pass_settings
def limits_set(
    settings: Settings, entity: str, resource: str | None, limit_specs: list[Limit]
) -> None:
    """Store limits for ENTITY, replacing those stored for the same resource.

    SPEC is NAME=AMOUNT/PERIOD[:capacity=N][:burst=N]: PERIOD is [COUNT]UNIT with UNIT
    ms, s, m, h or d; numbers take _ separators and the suffixes k (thousand) and M (million).

    \b
    Example:
      zae-celery limits set tenant-42 --resource gpt-4o \\
          --limit rpm=500/m --limit tpm=90k/m:burst=120k
    """
    with _translate_errors(settings):
        settings.limiter().set_limits(entity, limit_specs, resource)
    click.echo(f"Stored {len(limit_specs)} limit(s) for {_scope(entity, resource)}:")
    for lim in limit_specs:
        click.echo(f"  {format_limit(lim)}")


@limits.command("get", context_settings=_CONTEXT)
@click.argument("entity", callback=_id_argument("entity"))
@_resource_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def limits_get(settings: Settings, entity: str, resource: str | None, as_json: bool) -> None:
    """Show the limits stored for ENTITY (one per line, in --limit syntax).

    \b
    Example:
      zae-celery limits get tenant-42 --resource gpt-4o
    """
    with _translate_errors(settings):
        stored = settings.limiter().get_limits(entity, resource)
    if as_json:
        click.echo(json.dumps([lim.to_dict() for lim in stored], indent=2))
        return
    if not stored:
        click.echo(
            f"No limits stored for {_scope(entity, resource)}; the limits passed in code "
            "apply. Store some with 'zae-celery limits set'.",
            err=True,
        )
        return
    for lim in stored:
        click.echo(format_limit(lim))


@limits.command("delete", context_settings=_CONTEXT)
@click.argument("entity", callback=_id_argument("entity"))
@_resource_option
@pass_settings
def limits_delete(settings: Settings, entity: str, resource: str | None) -> None:
    """Delete the limits stored for ENTITY (the limits in code apply again).

    \b
    Example:
      zae-celery limits delete tenant-42 --resource gpt-4o
    """
    with _translate_errors(settings):
        limiter = settings.limiter()
        if not limiter.get_limits(entity, resource):
            click.echo(f"No limits stored for {_scope(entity, resource)}; nothing to delete.")
            return
        limiter.delete_limits(entity, resource)
    click.echo(f"Deleted the stored limits of {_scope(entity, resource)}.")


# -- entities ------------------------------------------------------------------------------
@main.group(context_settings=_CONTEXT)
def entity() -> None:
    """Create entities (API keys, projects, tenants) and link them to a parent.

    \b
    Example:
      zae-celery entity create key-1 --parent project-a --cascade
    """


@entity.command("create", context_settings=_CONTEXT)
@click.argument("entity_id", metavar="ENTITY", callback=_id_argument("entity"))
@click.option("--parent", callback=_id_argument("parent"), help="The parent entity.")
@click.option(
    "--cascade",
    is_flag=True,
    help="Every acquire of ENTITY also consumes the parent's buckets, atomically.",
)
@pass_settings
def entity_create(settings: Settings, entity_id: str, parent: str | None, cascade: bool) -> None:
    """Create (or replace) ENTITY, optionally under --parent with --cascade.

    \b
    Example:
      zae-celery entity create key-1 --parent project-a --cascade
    """
    if cascade and parent is None:
        raise click.UsageError("--cascade needs --parent: name the entity to cascade to")
    if parent is not None and parent == entity_id:
        raise click.UsageError("an entity cannot be its own --parent")
    with _translate_errors(settings):
        settings.limiter().create_entity(entity_id, parent_id=parent, cascade=cascade)
    text = f"Entity {entity_id} stored"
    if parent is not None:
        text += f" under {parent}" + (
            " (cascade: acquires also consume the parent)" if cascade else ""
        )
    click.echo(text + ".")


# -- buckets -------------------------------------------------------------------------------
_BUCKET_ATTRIBUTE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)@(?P<amount>\d+)/(?P<period>\d+)$")


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
    entity_wide = limiter.get_limits(entity_id)
    items = _bucket_items(limiter, entity_id, resource)
    resources = sorted(set(items) | ({resource} if resource is not None else set()))
    now_ms = limiter.engine.now_ms()
    rows: list[BucketRow] = []
    for res in resources:
        merged = {lim.name: lim for lim in code_limits}
        merged.update({lim.name: lim for lim in entity_wide})
        merged.update({lim.name: lim for lim in limiter.get_limits(entity_id, res)})
        item = items.get(res, {})
        known = set()
        for lim in merged.values():
            known.add(lim.key)
            tat = int(item[lim.key]["N"]) if lim.key in item else None
            available = bucket.available(lim, tat, now_ms)
            rows.append(
                BucketRow(
                    resource=res,
                    limit=lim.name,
                    rate=_rate_text(lim.refill_amount, lim.refill_period_ms),
                    burst=lim.burst,
                    available=available,
                    in_use=lim.burst - available,
                    full_in=max(0.0, lim.burst - available) / lim.rate,
                )
            )
        for key, value in sorted(item.items()):
            match = _BUCKET_ATTRIBUTE.match(key)
            if not match or key in known or "N" not in value:
                continue
            amount, period = int(match.group("amount")), int(match.group("period"))
            in_use = max(0.0, (int(value["N"]) - now_ms * amount) / period)
            rows.append(
                BucketRow(
                    resource=res,
                    limit=match.group("name"),
                    rate=_rate_text(amount, period),
                    burst=None,
                    available=None,
                    in_use=in_use,
                    full_in=in_use * period / amount / 1000,
                )
            )
    return rows


def _bucket_items(
    limiter: RateLimiter, entity_id: str, resource: str | None
) -> dict[str, dict[str, Any]]:
    if resource is None:
        condition = "PK = :pk AND begins_with(SK, :sk)"
        sk = "B#"
    else:
        condition = "PK = :pk AND SK = :sk"
        sk = f"B#{resource}"
    kwargs: dict[str, Any] = {
        "TableName": limiter.table_name,
        "KeyConditionExpression": condition,
        "ExpressionAttributeValues": {":pk": {"S": entity_pk(entity_id)}, ":sk": {"S": sk}},
        "ConsistentRead": True,
    }
    items: dict[str, dict[str, Any]] = {}
    while True:
        reply = limiter.client.query(**kwargs)
        for item in reply.get("Items", []):
            items[item["SK"]["S"][2:]] = item
        if not reply.get("LastEvaluatedKey"):
            return items
        kwargs["ExclusiveStartKey"] = reply["LastEvaluatedKey"]


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


@main.command(context_settings=_CONTEXT)
@click.argument("entity_id", metavar="ENTITY", callback=_id_argument("entity"))
@_resource_option
@click.option(
    "--limit",
    "limit_specs",
    multiple=True,
    callback=_limits_option,
    metavar="SPEC",
    help="A limit your code passes (stored limits override it); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def buckets(
    settings: Settings,
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
    with _translate_errors(settings):
        rows = bucket_rows(settings.limiter(), entity_id, resource, limit_specs)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    if not rows:
        click.echo(
            f"No buckets and no stored limits for {_scope(entity_id, resource)}: nothing has "
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


# -- the Celery sub-command shares every command ---------------------------------------------
for _name, _command in main.commands.items():
    celery_command.add_command(_command, _name)
