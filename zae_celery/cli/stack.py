"""The stack commands: ``deploy``, ``status``, ``delete`` and ``template``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from zae_celery.cli.errors import OperationalError, translate_errors
from zae_celery.cli.options import CONTEXT, Target, pairs, pass_target, windows_option
from zae_celery.core import SCHEMA_VERSION, RateLimiterUnavailable
from zae_celery.infra import template_text
from zae_celery.infra.lambda_package import (
    HANDLER,
    build_aggregator_zip,
    code_sha256,
    upload_aggregator,
)
from zae_celery.infra.stack import (
    PARAMETERS,
    StackEvent,
    StackInfo,
    StackManager,
    check_stack_name,
    default_stack_name,
)

__all__ = ["delete", "deploy", "lambda_export", "schema_text", "status", "template"]

F = TypeVar("F", bound=Callable[..., Any])


def _stack_option(f: F) -> F:
    return click.option(
        "--stack",
        envvar="ZAE_STACK_NAME",
        help="CloudFormation stack name (env ZAE_STACK_NAME; default: the table name, "
        "with _ and . as -).",
    )(f)


def _stack_name(target: Target, stack: str | None) -> str:
    name = stack or default_stack_name(target.table)
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


def _text(value: int | None) -> str | None:
    return None if value is None else str(value)


BOTH_IMAGES = "NEW_AND_OLD_IMAGES"
LOG_RETENTION_DAYS = (
    "1",
    "3",
    "5",
    "7",
    "14",
    "30",
    "60",
    "90",
    "120",
    "150",
    "180",
    "365",
    "400",
    "545",
    "731",
    "1096",
    "1827",
    "2192",
    "2557",
    "2922",
    "3288",
    "3653",
)
"""The retention periods CloudWatch Logs accepts (the template's allowed values)."""


@click.command(context_settings=CONTEXT)
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
@click.option(
    "--aggregator/--no-aggregator",
    default=None,
    help="The usage aggregator function on the table's stream (default off; implies "
    "--stream NEW_AND_OLD_IMAGES; uploads its code).",
)
@click.option(
    "--snapshot-windows",
    callback=windows_option,
    help="Usage snapshot windows, comma-separated (minutely, hourly, daily; default hourly,daily).",
)
@click.option(
    "--snapshot-retention-days",
    type=click.IntRange(1, 3650),
    help="Days a usage snapshot is kept after its window ends (default 90).",
)
@click.option(
    "--log-retention-days",
    type=click.Choice(LOG_RETENTION_DAYS),
    help="Days the aggregator's logs are kept (default 30).",
)
@click.option("--alarms/--no-alarms", default=None, help="CloudWatch alarms (default off).")
@click.option("--alarm-topic", help="SNS topic ARN the alarms notify (implies --alarms).")
@click.option(
    "--parameter",
    "parameters",
    multiple=True,
    callback=pairs,
    metavar="KEY=VALUE",
    help=f"Any template parameter ({', '.join(PARAMETERS[9:])}...).",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    callback=pairs,
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
@pass_target
def deploy(
    target: Target,
    stack: str | None,
    pitr: bool | None,
    stream: str | None,
    deletion_protection: bool | None,
    environment: str | None,
    aggregator: bool | None,
    snapshot_windows: tuple[str, ...] | None,
    snapshot_retention_days: int | None,
    log_retention_days: str | None,
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
    target.need_table("deploy")
    name = _stack_name(target, stack)
    values = dict(parameters)
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        raise click.UsageError(
            f"unknown template parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}"
        )
    if "TableName" in values and values["TableName"] != target.table:
        raise click.UsageError("give the table name with --table, not --parameter TableName")
    if alarm_topic is not None and alarms is False:
        raise click.UsageError("--alarm-topic needs alarms: drop --no-alarms")
    if aggregator and stream not in (None, BOTH_IMAGES):
        raise click.UsageError(
            f"--aggregator reads each write's counters before and after it: it needs "
            f"--stream {BOTH_IMAGES}, not {stream}"
        )
    explicit = {
        "TableName": target.table,
        "PointInTimeRecovery": _flag(pitr),
        "StreamViewType": BOTH_IMAGES if aggregator else stream,
        "DeletionProtection": _flag(deletion_protection),
        "Environment": environment,
        "Aggregator": _flag(aggregator),
        "SnapshotWindows": ",".join(snapshot_windows) if snapshot_windows else None,
        "SnapshotRetentionDays": _text(snapshot_retention_days),
        "AggregatorLogRetentionDays": log_retention_days,
        "Alarms": _flag(True if alarm_topic else alarms),
        "AlarmTopicArn": alarm_topic,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    with translate_errors(target):
        manager = target.stack_manager(timeout=timeout, poll_interval=poll, on_event=_print_event)
        click.echo(f"Deploying stack {name} (table {target.table}) to {target.where()}...")
        action, info = manager.deploy(name, values, tags, keep_failed=keep_failed)
        function = info.outputs.get("AggregatorFunctionName")
        uploaded = function and upload_aggregator(target.client("lambda"), function)
    if action == "unchanged":
        click.echo(f"Stack {name} is up to date ({info.status}); nothing to change.")
    else:
        click.echo(f"Stack {name} {action} ({info.status}).")
    if function:
        state = "uploaded" if uploaded else "already current"
        click.echo(f"Aggregator {function}: code {state} ({HANDLER}).")
    _print_outputs(info)
    click.echo(
        "Next: attach WorkerPolicyArn to your workers' IAM role and set "
        f"zae_table_name = {target.table!r} in Celery's configuration."
    )


@click.command(context_settings=CONTEXT)
@_stack_option
@pass_target
def status(target: Target, stack: str | None) -> None:
    """Show the stack's status, parameters and outputs, and its table.

    A table made without a stack (e.g. by create-table) is shown on its own; a Redis
    store (--store redis://...) shows its prefix and schema stamp. Exits 1 when there is
    neither such a stack nor the table, or the stack is in a failed state.

    \b
    Example:
      zae-celery --region eu-west-1 status --stack rate-limits
    """
    if target.redis:
        _redis_status(target)
        return
    name = _stack_name(target, stack)
    with translate_errors(target):
        manager = target.stack_manager()
        info, cloudformation = _describe(target, manager, name)
        if info is None:
            _status_without_stack(target, manager, name, cloudformation)
            return
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
        if table_name and table is not None:
            _print_table(target, manager, table_name, table)
        if not info.healthy and not info.in_progress:
            failed = manager.failed_events(info.stack_id)
            lines = "".join(f"\n  {e.line()}" for e in failed)
            raise OperationalError(
                f"stack {name!r} is in {info.status}."
                + (f"\nFailing stack events:{lines}" if lines else "")
                + f"\nDelete it with 'zae-celery delete --stack {name}' and deploy again."
            )


def _redis_status(target: Target) -> None:
    """``status`` on a Redis store: where it is and its schema stamp (no table, no stack)."""
    source = click.get_current_context().get_parameter_source("stack")
    if source == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--stack: the store is {target.where()}, which has no stack")
    with translate_errors(target):
        version = target.limiter().schema_version()
    click.echo(f"Store:   {target.where()}")
    click.echo(f"Schema:  {schema_text(version, 'prefix')}")
    click.echo(
        "A Redis store has no table and no stack: 'create-table', 'deploy' and 'delete' do "
        "not apply; the prefix is its namespace."
    )


def _describe(target: Target, manager: StackManager, name: str) -> tuple[StackInfo | None, bool]:
    """The stack (None: there is none), and whether the endpoint serves CloudFormation
    at all: a local DynamoDB endpoint (DynamoDB Local) answers it with no AWS response."""
    from botocore.parsers import ResponseParserError

    try:
        return manager.describe(name), True
    except ResponseParserError:
        if not target.local:
            raise
        return None, False


def _status_without_stack(
    target: Target, manager: StackManager, name: str, cloudformation: bool
) -> None:
    """``status`` when no stack ``name`` exists: the table on its own, if it exists."""
    where, table_name = target.where(), target.table
    table = manager.table(table_name)
    if table is None:
        if not cloudformation:
            raise OperationalError(
                f"there is no table {table_name!r} at {where}, which serves no CloudFormation "
                f"(so no stack either). Create the table with 'zae-celery --endpoint-url "
                f"{where} --table {table_name} create-table', or pass --table."
            )
        raise OperationalError(
            f"there is no stack {name!r} in {where}, and no table {table_name!r}. Deploy it "
            f"with 'zae-celery --table {table_name} deploy' (on a local endpoint, "
            "'create-table' makes the table alone), or pass --stack / --table / --region."
        )
    if cloudformation:
        click.echo(
            f"No stack {name!r} in {where}: table {table_name} exists without one (made by "
            "'zae-celery create-table' or another tool)."
        )
    else:
        click.echo(
            f"{where} serves no CloudFormation (DynamoDB Local has none): table "
            f"{table_name} exists without a stack (made by 'zae-celery create-table' or "
            "another tool)."
        )
    _print_table(target, manager, table_name, table)
    if cloudformation:
        click.echo(
            "To manage it with a stack (IAM policies, backups, alarms): 'zae-celery deploy' "
            "does not adopt an existing table; import it into a stack with CloudFormation's "
            "resource import, or deploy a stack with another --table. If a stack of another "
            "name manages it, pass --stack NAME."
        )


def _print_table(target: Target, manager: StackManager, name: str, table: dict[str, Any]) -> None:
    """The table's status, item count, TTL, billing mode and schema version (and a warning
    when TTL is off)."""
    ttl = manager.dynamodb.describe_time_to_live(TableName=name)
    spec = ttl.get("TimeToLiveDescription", {})
    click.echo(
        f"Table:   {name} {table.get('TableStatus', '?')}, "
        f"{_items(table.get('ItemCount', 0))}, TTL {spec.get('TimeToLiveStatus', '?')}"
        + (f" on {spec['AttributeName']}" if spec.get("AttributeName") else "")
        + (", deletion protection on" if table.get("DeletionProtectionEnabled") else "")
    )
    click.echo(f"Billing: {_billing(table)}")
    if table.get("TableStatus") == "ACTIVE":
        try:
            schema = schema_text(target.limiter().schema_version())
        except RateLimiterUnavailable as exc:  # e.g. no dynamodb:GetItem: show the rest
            schema = f"not readable: {exc}"
        click.echo(f"Schema:  {schema}")
    if spec.get("TimeToLiveStatus") == "DISABLED":
        click.echo(
            "Warning: TTL is off, so idle buckets never expire; enable it on the "
            "attribute 'ttl' (local servers ignore the template's TTL setting: "
            "'zae-celery create-table --exist-ok' enables it).",
            err=True,
        )


def _items(count: int) -> str:
    return f"{count} item" + ("" if count == 1 else "s")


def _billing(table: dict[str, Any]) -> str:
    """The billing mode (a table that was never on demand has no summary: provisioned)."""
    mode = str(table.get("BillingModeSummary", {}).get("BillingMode") or "PROVISIONED")
    if mode != "PROVISIONED":
        return mode
    units = table.get("ProvisionedThroughput", {})
    return (
        f"{mode} ({units.get('ReadCapacityUnits', '?')} read, "
        f"{units.get('WriteCapacityUnits', '?')} write capacity units)"
    )


def schema_text(version: int | None, where: str = "table") -> str:
    """The stamped schema version, against the one this zae-celery speaks (``where``:
    what to use another of, a table or a Redis prefix)."""
    if version is None:
        return "not stamped yet (the first request stamps it)"
    if version == SCHEMA_VERSION:
        return f"version {version}"
    return (
        f"version {version}, but this zae-celery speaks version {SCHEMA_VERSION}: upgrade "
        f"zae-celery or use another {where}"
    )


@click.command(context_settings=CONTEXT)
@_stack_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True)
@click.option("--poll", type=click.FloatRange(min=0.1), default=5, show_default=True)
@pass_target
def delete(target: Target, stack: str | None, yes: bool, timeout: float, poll: float) -> None:
    """Delete the stack, its table (every limit and bucket) and its policies.

    Asks for confirmation unless --yes. A table with deletion protection is refused
    (nothing is deleted): deploy with --no-deletion-protection first.

    \b
    Example:
      zae-celery --region eu-west-1 delete --stack rate-limits --yes
    """
    target.need_table("delete")
    name = _stack_name(target, stack)
    with translate_errors(target):
        manager = target.stack_manager(timeout=timeout, poll_interval=poll, on_event=_print_event)
        info = manager.describe(name)
        if info is None:
            raise OperationalError(
                f"there is no stack {name!r} in {target.where()}; nothing to delete. "
                "Check --stack and --region."
            )
        if not yes and not click.confirm(
            f"Delete stack {name} and table {info.table_name} with every stored limit and bucket?",
            err=True,
        ):
            raise OperationalError("not confirmed; nothing was deleted (pass --yes to skip asking)")
        manager.delete(name)
    click.echo(f"Stack {name} deleted.")


@click.command(context_settings=CONTEXT)
def template() -> None:
    """Print the CloudFormation template (to deploy it with your own tooling).

    \b
    Example:
      zae-celery template > zae-celery.yaml
    """
    click.echo(template_text(), nl=False)


@click.command("lambda-export", context_settings=CONTEXT)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default="zae-celery-aggregator.zip",
    show_default=True,
    help="Where to write the zip.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def lambda_export(output: str, force: bool) -> None:
    """Write the usage aggregator's Lambda package (a zip) from the installed zae-celery.

    It holds zae_celery.accounting alone, which needs nothing beyond boto3 (the Lambda
    runtime's). 'deploy --aggregator' uploads the same package itself; this is for your
    own tooling (aws lambda update-function-code --zip-file fileb://FILE).

    \b
    Example:
      zae-celery lambda-export --output aggregator.zip
    """
    path = Path(output)
    if path.exists() and not force:
        raise OperationalError(f"{output} exists; nothing was written (pass --force to replace it)")
    package = build_aggregator_zip()
    try:
        path.write_bytes(package)
    except OSError as exc:
        raise OperationalError(f"cannot write {output}: {exc.strerror}") from None
    click.echo(
        f"Wrote {output}: {len(package):,} bytes, handler {HANDLER}, "
        f"SHA-256 {code_sha256(package)} (base64, as Lambda's CodeSha256)."
    )
