"""Builders of DynamoDB requests and readers of their replies. Pure: no I/O.

A :class:`Call` is a client method name and its keyword arguments, identical for boto3
and aiobotocore clients. A :class:`Reply` is what came back: the parsed response, or
an error code with the error response (which carries the old item of a failed
condition, or a transaction's cancellation reasons).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .bucket import Shape, Step
from .schema import TTL_ATTRIBUTE

__all__ = [
    "Call",
    "Done",
    "Reply",
    "Write",
    "build_claim",
    "build_write",
    "claim_refused",
    "failed_items",
    "resume",
]

T = TypeVar("T")

Item = dict[str, Any]

CONDITION_FAILED = "ConditionalCheckFailedException"
TRANSACTION_CANCELED = "TransactionCanceledException"


@dataclass(frozen=True)
class Call:
    """One request: ``getattr(client, op)(**kwargs)``; ``op == "sleep"`` waits instead."""

    op: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """A response (``code is None``) or an error (``code`` set, ``data`` = error response)."""

    data: dict[str, Any]
    code: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """True for a successful response."""
        return self.code is None


@dataclass(frozen=True)
class Done(Generic[T]):
    """A flow that has finished, and what it returned."""

    value: T


def resume(
    flow: Generator[Call, Reply, T], reply: Reply | None, error: BaseException | None
) -> Call | Done[T]:
    """Hand a flow the reply to its last call (or throw ``error`` into it, where that call
    was made): its next call, or :class:`Done` with its result."""
    try:
        return flow.throw(error) if error is not None else flow.send(reply)  # type: ignore[arg-type]
    except StopIteration as stop:
        return Done(stop.value)


@dataclass(frozen=True)
class Write:
    """The steps of one bucket item: its key and one step per limit."""

    key: dict[str, Any]
    steps: Sequence[Step]


def _update(table: str, write: Write, ttl: int) -> dict[str, Any]:
    names: dict[str, str] = {"#ttl": TTL_ATTRIBUTE}
    values: dict[str, Any] = {":ttl": {"N": str(ttl)}}
    sets = ["#ttl = :ttl"]
    adds: list[str] = []
    conditions: list[str] = []
    for i, step in enumerate(write.steps):
        a, n, b, v, e = f"#a{i}", f":n{i}", f":b{i}", f":v{i}", f":e{i}"
        names[a] = step.limit.key
        shape = step.shape
        if shape is Shape.CHECK:
            conditions.append(f"(attribute_not_exists({a}) OR {a} <= {b})")
            values[b] = {"N": str(step.bound)}
            continue
        values[v] = {"N": str(step.amount)}
        if shape is Shape.FRESH:
            conditions.append(f"(attribute_not_exists({a}) OR {a} <= {n})")
            values[n] = {"N": str(step.now)}
            sets.append(f"{a} = {v}")
        elif shape is Shape.QUEUE:
            values[n] = {"N": str(step.now)}
            if step.bound is None:
                conditions.append(f"{a} > {n}")
            else:
                conditions.append(f"({a} > {n} AND {a} <= {b})")
                values[b] = {"N": str(step.bound)}
            adds.append(f"{a} {v}")
        elif shape is Shape.RAISE:
            conditions.append(f"(attribute_not_exists({a}) OR {a} < {v})")
            sets.append(f"{a} = {v}")
        elif shape is Shape.EXACT:
            if step.expected is None:
                conditions.append(f"attribute_not_exists({a})")
            else:
                conditions.append(f"{a} = {e}")
                values[e] = {"N": str(step.expected)}
            sets.append(f"{a} = {v}")
        else:  # REFUND
            adds.append(f"{a} {v}")
    expression = "SET " + ", ".join(sets)
    if adds:
        expression += " ADD " + ", ".join(adds)
    request: dict[str, Any] = {
        "TableName": table,
        "Key": write.key,
        "UpdateExpression": expression,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    if conditions:
        request["ConditionExpression"] = " AND ".join(conditions)
    return request


def _claim(table: str, key: dict[str, Any], ttl: int) -> dict[str, Any]:
    # An UpdateItem that creates the item (workers may not PutItem outside "#META").
    return {
        "TableName": table,
        "Key": key,
        "UpdateExpression": "SET #ttl = :ttl",
        "ConditionExpression": "attribute_not_exists(PK)",
        "ExpressionAttributeNames": {"#ttl": TTL_ATTRIBUTE},
        "ExpressionAttributeValues": {":ttl": {"N": str(ttl)}},
    }


def build_claim(table: str, key: dict[str, Any], ttl: int) -> Call:
    """One UpdateItem creating a claim item alone; its condition fails if it exists."""
    return Call("update_item", _claim(table, key, ttl))


def build_write(
    table: str, writes: Sequence[Write], ttl: int, claim: dict[str, Any] | None = None
) -> Call:
    """One UpdateItem for one item, one TransactWriteItems for several (atomic).

    ``claim``: the key of a claim item created in the same transaction, last in it; the
    transaction fails if the item exists (see :func:`claim_refused`).
    """
    if len(writes) == 1 and claim is None:
        return Call("update_item", {**_update(table, writes[0], ttl), "ReturnValues": "ALL_NEW"})
    items = [{"Update": _update(table, w, ttl)} for w in writes]
    if claim is not None:
        items.append({"Update": _claim(table, claim, ttl)})
    return Call("transact_write_items", {"TransactItems": items})


def claim_refused(reply: Reply) -> bool:
    """True when a transaction built with a ``claim`` failed because the claim exists."""
    if reply.code != TRANSACTION_CANCELED:
        return False
    reasons = reply.data.get("CancellationReasons") or []
    return bool(reasons) and reasons[-1].get("Code") == "ConditionalCheckFailed"


def failed_items(reply: Reply, count: int) -> list[Item | None] | None:
    """The current items of a write that failed its condition, one per written item.

    ``None`` when the error was not a failed condition. An entry is ``{}`` when the item
    does not exist, and ``None`` when the endpoint did not return it.
    """
    if reply.code == CONDITION_FAILED:
        # DynamoDB omits Item when the item does not exist, and so does an endpoint that
        # ignores ReturnValuesOnConditionCheckFailure: None makes the caller read it.
        return [reply.data.get("Item")]
    if reply.code == TRANSACTION_CANCELED:
        reasons = reply.data.get("CancellationReasons") or []
        if len(reasons) != count or not any(
            r.get("Code") == "ConditionalCheckFailed" for r in reasons
        ):
            return None
        items: list[Item | None] = []
        for reason in reasons:
            if reason.get("Code") == "ConditionalCheckFailed":
                items.append(reason.get("Item"))
            else:
                items.append(None)  # condition held; its state was not returned
        return items
    return None
