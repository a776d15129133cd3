"""The table's key schema and identifier rules (one table, one partition per entity).

===================  ==================  ==========================================
PK                   SK                  item
===================  ==================  ==========================================
``#META``            ``#SCHEMA``         schema version of the table
``E#<entity>``       ``#ENTITY``         parent and cascade flag
``E#<entity>``       ``#LIMITS#<res>``   stored limits (``*`` = every resource)
``E#<entity>``       ``B#<resource>``    one bucket item: every limit of the pair
``E#<entity>``       ``C#<hash>``        a started reservation's claim (TTL)
``E#<e>#<res>#<k>``  ``B#<res>#<k>``     shard ``k`` of a bucket spread over items
===================  ==================  ==========================================

One global secondary index, ``parents`` (hash ``parent``, range ``PK``, keys only), lists
an entity's children: only entity items carry ``parent``, so it holds nothing else (a
sparse index; a bucket write never touches it). Tables made before it get it from
``zae-celery upgrade`` (or, for the stack's table, ``zae-celery deploy``).

A shard (``Limit.shards``, :mod:`.shards`) is the bucket item of the resource
``<res>#<k>``, under a partition key of its own: DynamoDB keeps all the items of one
partition key together, so shards sharing their entity's would share its partition's
writes too.

Identifiers may not contain ``#`` (the separator) or ``*`` (the wildcard), so no id can
address another entity's items. A claim's sort key is a hash of its claim id (a task id
and a nonce), so whatever characters a task id holds, it names only a ``C#`` item.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .errors import ValidationError

__all__ = [
    "ANY_RESOURCE",
    "PARENTS_INDEX",
    "PARENTS_INDEX_SPEC",
    "PARENTS_KEY_ATTRIBUTES",
    "SCHEMA_VERSION",
    "TTL_ATTRIBUTE",
    "bucket_key",
    "bucket_sk",
    "check_id",
    "check_table_name",
    "claim_key",
    "entity_pk",
    "limits_sk",
]

SCHEMA_VERSION = 1
"""Bumped on incompatible changes of the stored form; a client refuses other versions."""
TTL_ATTRIBUTE = "ttl"
ANY_RESOURCE = "*"
META_KEY = {"PK": {"S": "#META"}, "SK": {"S": "#SCHEMA"}}
ENTITY_SK = "#ENTITY"
LIMITS_PREFIX = "#LIMITS#"
BUCKET_PREFIX = "B#"
PARENTS_INDEX = "parents"
"""The index of entities by parent (``zae-celery entity children``)."""
PARENTS_KEY_ATTRIBUTES = (
    {"AttributeName": "parent", "AttributeType": "S"},
    {"AttributeName": "PK", "AttributeType": "S"},
)
PARENTS_INDEX_SPEC: dict[str, Any] = {
    "IndexName": PARENTS_INDEX,
    "KeySchema": [
        {"AttributeName": "parent", "KeyType": "HASH"},
        {"AttributeName": "PK", "KeyType": "RANGE"},
    ],
    "Projection": {"ProjectionType": "KEYS_ONLY"},
}
"""The index as DynamoDB's CreateTable and UpdateTable take it (on-demand tables)."""
MAX_ID_LENGTH = 256
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@/+=,-]*$")


def check_id(field: str, value: Any) -> str:
    """An entity or resource id, or a ValidationError naming ``field``."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_LENGTH:
        raise ValidationError(field, f"length {len(value)}", f"1..{MAX_ID_LENGTH} characters")
    if not _ID.fullmatch(value):
        raise ValidationError(
            field,
            f"{value[:40]!r} contains a character that is not allowed",
            "letters, digits and _ . : @ / + = , - (not starting with punctuation); no # or *",
        )
    return value


def check_table_name(value: Any) -> str:
    """A DynamoDB table name, or a ValidationError."""
    if not isinstance(value, str) or not 3 <= len(value) <= 255:
        raise ValidationError("table_name", f"{value!r}", "a DynamoDB table name")
    return value


def entity_pk(entity_id: str) -> str:
    """The partition key of an entity."""
    return f"E#{entity_id}"


def bucket_sk(resource: str) -> str:
    """The sort key of the bucket item of a resource (in its entity's partition)."""
    return BUCKET_PREFIX + resource


def bucket_key(entity_id: str, resource: str) -> dict[str, dict[str, str]]:
    """The key of the bucket item of (entity, resource); a shard's (``<res>#<k>``, a
    resource no caller can name) is under a partition key of its own."""
    pk = entity_pk(entity_id)
    if "#" in resource:
        pk = f"{pk}#{resource}"
    return {"PK": {"S": pk}, "SK": {"S": bucket_sk(resource)}}


def claim_key(entity_id: str, claim: str) -> dict[str, dict[str, str]]:
    """The key of the claim item of a started reservation, in its entity's partition."""
    digest = hashlib.sha256(claim.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return {"PK": {"S": entity_pk(entity_id)}, "SK": {"S": f"C#{digest}"}}


def limits_sk(resource: str | None) -> str:
    """The sort key of the stored limits of an entity (for one resource or all)."""
    return LIMITS_PREFIX + (ANY_RESOURCE if resource is None else resource)


def number(attribute: dict[str, Any] | None) -> int | None:
    """An ``{"N": ...}`` attribute as int (None when absent)."""
    if attribute is None or "N" not in attribute:
        return None
    return int(attribute["N"])
