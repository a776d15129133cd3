"""``create-table``: the table on a local endpoint (moto server, DynamoDB Local)."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from zae_celery.cli.errors import OperationalError, translate_errors
from zae_celery.cli.options import CONTEXT, Target, pass_target

__all__ = ["create_table"]


@click.command("create-table", context_settings=CONTEXT)
@click.option(
    "--exist-ok",
    is_flag=True,
    help="Accept an existing table (its schema is checked and TTL enabled if off).",
)
@click.option(
    "--stream",
    is_flag=True,
    help="Switch on the table's stream (NEW_AND_OLD_IMAGES), which 'aggregate' reads.",
)
@pass_target
def create_table(target: Target, exist_ok: bool, stream: bool) -> None:
    """Create the table directly on a local endpoint (moto, DynamoDB Local).

    Enables TTL on the 'ttl' attribute with an explicit call (local servers ignore
    CloudFormation's TTL setting) and stamps the schema version. On AWS, deploy the
    stack instead: it adds the IAM policies, backups and alarms.

    \b
    Example:
      zae-celery --endpoint-url http://127.0.0.1:8000 --table rate_limits create-table
      zae-celery --endpoint-url http://127.0.0.1:8000 create-table --stream
    """
    target.need_table("create-table")
    if not target.local:
        raise click.UsageError(
            "create-table is for local endpoints: pass --endpoint-url (or set "
            "AWS_ENDPOINT_URL). On AWS, deploy the stack: 'zae-celery deploy'."
        )
    from botocore.exceptions import ClientError

    with translate_errors(target):
        limiter = target.limiter()
        client = limiter.client
        existed = _table_exists(client, target.table)
        if existed and not exist_ok:
            raise OperationalError(
                f"table {target.table!r} already exists at {target.where()}; nothing was "
                "changed. Use it as it is, pick another --table, or pass --exist-ok."
            )
        try:
            limiter.create_table()
        except Exception:
            if not existed and _table_exists(client, target.table):
                # Leave nothing half-made: a table without TTL or schema stamp goes.
                with contextlib.suppress(ClientError):
                    client.delete_table(TableName=target.table)
            raise
        spec = client.describe_time_to_live(TableName=target.table).get("TimeToLiveDescription", {})
        if spec.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            client.update_time_to_live(
                TableName=target.table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"},
            )
            spec = {"TimeToLiveStatus": "ENABLED", "AttributeName": "ttl"}
        elif spec.get("AttributeName") != "ttl":
            raise OperationalError(
                f"table {target.table!r} expires items on {spec.get('AttributeName')!r}, "
                "but the engine writes 'ttl': idle buckets would never expire. Disable TTL "
                "on the table, then run create-table --exist-ok again."
            )
        if stream:
            _stream_on(client, target.table)
    verb = "already existed" if existed else "created"
    click.echo(
        f"Table {target.table} {verb} at {target.where()}; TTL "
        f"{spec.get('TimeToLiveStatus', '?').lower()} on 'ttl'"
        + ("; stream NEW_AND_OLD_IMAGES." if stream else ".")
    )


def _stream_on(client: Any, table: str) -> None:
    """Switch the table's stream on with both images (already on with them: nothing)."""
    spec = client.describe_table(TableName=table)["Table"].get("StreamSpecification") or {}
    if spec.get("StreamEnabled"):
        if spec.get("StreamViewType") != "NEW_AND_OLD_IMAGES":
            raise OperationalError(
                f"table {table!r} streams {spec.get('StreamViewType')}, but usage accounting "
                "needs NEW_AND_OLD_IMAGES: switch its stream off, then run create-table "
                "--exist-ok --stream again."
            )
        return
    client.update_table(
        TableName=table,
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
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
