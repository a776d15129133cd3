"""The stack commands: ``deploy``, ``status``, ``delete`` and ``template``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from zae_celery.cli.errors import OperationalError, translate_errors
from zae_celery.cli.options import CONTEXT, Target, pairs, pass_target
from zae_celery.infra import template_text
from zae_celery.infra.stack import (
    PARAMETERS,
    StackEvent,
    StackInfo,
    check_stack_name,
    default_stack_name,
)

__all__ = ["delete", "deploy", "status", "template"]

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
@click.option("--alarms/--no-alarms", default=None, help="CloudWatch alarms (default off).")
@click.option("--alarm-topic", help="SNS topic ARN the alarms notify (implies --alarms).")
@click.option(
    "--parameter",
    "parameters",
    multiple=True,
    callback=pairs,
    metavar="KEY=VALUE",
    help=f"Any template parameter ({', '.join(PARAMETERS[5:])}...).",
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
    explicit = {
        "TableName": target.table,
        "PointInTimeRecovery": _flag(pitr),
        "StreamViewType": stream,
        "DeletionProtection": _flag(deletion_protection),
        "Environment": environment,
        "Alarms": _flag(True if alarm_topic else alarms),
        "AlarmTopicArn": alarm_topic,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    with translate_errors(target):
        manager = target.stack_manager(timeout=timeout, poll_interval=poll, on_event=_print_event)
        click.echo(f"Deploying stack {name} (table {target.table}) to {target.where()}...")
        action, info = manager.deploy(name, values, tags, keep_failed=keep_failed)
    if action == "unchanged":
        click.echo(f"Stack {name} is up to date ({info.status}); nothing to change.")
    else:
        click.echo(f"Stack {name} {action} ({info.status}).")
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

    Exits 1 when there is no such stack or it is in a failed state.

    \b
    Example:
      zae-celery --region eu-west-1 status --stack rate-limits
    """
    target.need_table("status")
    name = _stack_name(target, stack)
    with translate_errors(target):
        manager = target.stack_manager()
        info = manager.describe(name)
        if info is None:
            raise OperationalError(
                f"there is no stack {name!r} in {target.where()}. Deploy it with "
                f"'zae-celery --table {target.table} deploy', or pass --stack / --region."
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
