"""The table's migrations: ordered, idempotent and resumable (``zae-celery upgrade``).

The table's schema *version* (``#META``'s ``version``, :data:`SCHEMA_VERSION`) says how
items are written; a client refuses a table of another version. A *migration* changes
what the table has without changing how items are written (an index, a backfill), so a
table is usable before and after it. Each migration:

- says whether it has work left (:attr:`Migration.needed`), by looking at the table, not
  at a record: a table made with it already (``create-table``, a new stack) has none;
- describes that work (:attr:`Migration.plan`) for ``upgrade --dry-run``;
- does it (:attr:`Migration.apply`) idempotently: run again after an interruption, it
  picks up where the table is (an index being created is waited for, not created again);
- is recorded in ``#META``'s ``migrations`` (a string set) once done, so ``check`` and
  ``version`` tell which are pending without describing the table every time.

A table that belongs to a CloudFormation stack (tag ``zae-celery:stack``) is changed by
deploying the stack's new template (``zae-celery deploy``), never by a migration: a
change CloudFormation did not make is drift that its next update would fight. Its
migrations only record what the deploy did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zae_celery.core.schema import (
    META_KEY,
    PARENTS_INDEX,
    PARENTS_INDEX_SPEC,
    PARENTS_KEY_ATTRIBUTES,
)

__all__ = [
    "MIGRATIONS",
    "PARENTS_INDEX",
    "PARENTS_INDEX_SPEC",
    "PARENTS_KEY_ATTRIBUTES",
    "Migration",
    "MigrationError",
    "applied",
    "pending",
    "record",
]

STACK_TAG = "zae-celery:stack"
WAIT_SECONDS = 1800.0
"""How long a migration waits for DynamoDB (an index's backfill) before giving up; run
``upgrade`` again to go on waiting."""


class MigrationError(Exception):
    """A migration cannot run here; the message says what to do instead."""


@dataclass(frozen=True)
class Migration:
    """One change of the table (see the module's notes)."""

    id: str
    description: str
    needed: Callable[[Any, str], bool]
    plan: Callable[[Any, str], str]
    apply: Callable[[Any, str, Callable[[str], None]], None]


def _indexes(client: Any, table: str) -> dict[str, str]:
    description = client.describe_table(TableName=table)["Table"]
    return {
        g["IndexName"]: str(g.get("IndexStatus", "ACTIVE"))
        for g in description.get("GlobalSecondaryIndexes") or []
    }


def _stack_of(client: Any, table: str) -> str | None:
    """The stack a table belongs to (its ``zae-celery:stack`` tag), if any."""
    arn = client.describe_table(TableName=table)["Table"]["TableArn"]
    try:
        tags = client.list_tags_of_resource(ResourceArn=arn).get("Tags", [])
    except client.exceptions.ClientError:  # an endpoint without tags (DynamoDB Local)
        return None
    return next((t["Value"] for t in tags if t["Key"] == STACK_TAG), None)


def _parents_needed(client: Any, table: str) -> bool:
    return _indexes(client, table).get(PARENTS_INDEX) != "ACTIVE"


def _parents_plan(client: Any, table: str) -> str:
    status = _indexes(client, table).get(PARENTS_INDEX)
    if status is not None:
        return f"wait for index {PARENTS_INDEX!r} ({status}) to become ACTIVE"
    return (
        f"create index {PARENTS_INDEX!r} (hash 'parent', range 'PK', keys only): DynamoDB "
        "fills it from the entity items; bucket items carry no 'parent' and stay out of it"
    )


def _parents_apply(client: Any, table: str, say: Callable[[str], None]) -> None:
    if PARENTS_INDEX not in _indexes(client, table):
        stack = _stack_of(client, table)
        if stack is not None:
            raise MigrationError(
                f"table {table!r} belongs to stack {stack!r}: deploy its new template "
                f"('zae-celery deploy --stack {stack}'), which adds the index, then run "
                "'zae-celery upgrade' again to record it"
            )
        say(f"creating index {PARENTS_INDEX!r}")
        client.update_table(
            TableName=table,
            AttributeDefinitions=list(PARENTS_KEY_ATTRIBUTES),
            GlobalSecondaryIndexUpdates=[{"Create": PARENTS_INDEX_SPEC}],
        )
    deadline = time.monotonic() + WAIT_SECONDS
    while (status := _indexes(client, table).get(PARENTS_INDEX)) != "ACTIVE":
        if time.monotonic() > deadline:
            raise MigrationError(
                f"index {PARENTS_INDEX!r} is still {status} after {WAIT_SECONDS:.0f} s: run "
                "'zae-celery upgrade' again to go on waiting"
            )
        say(f"index {PARENTS_INDEX!r} is {status}: waiting")
        time.sleep(2.0)


MIGRATIONS: Sequence[Migration] = (
    Migration(
        "0001-parents-index",
        "an index of entities by parent, for 'zae-celery entity children'",
        _parents_needed,
        _parents_plan,
        _parents_apply,
    ),
)
"""Every migration, in the order they run."""


def applied(client: Any, table: str) -> set[str]:
    """The migrations recorded as done on ``table``."""
    item = client.get_item(TableName=table, Key=META_KEY, ConsistentRead=True).get("Item") or {}
    return set(item.get("migrations", {}).get("SS", []))


def pending(client: Any, table: str) -> list[Migration]:
    """The migrations not recorded on ``table`` that still have work to do there (one
    that has none, on a table made with it, is only to be recorded)."""
    done = applied(client, table)
    return [m for m in MIGRATIONS if m.id not in done and m.needed(client, table)]


def record(client: Any, table: str, migration: Migration) -> None:
    """Record ``migration`` as done on ``table`` (idempotent)."""
    client.update_item(
        TableName=table,
        Key=META_KEY,
        UpdateExpression="ADD migrations :id",
        ExpressionAttributeValues={":id": {"SS": [migration.id]}},
    )
