"""The DynamoDB store: each operation of :mod:`..ops` becomes one DynamoDB request.

:class:`Codec` is pure (operation -> request, answer -> :class:`~..ops.Reply`);
:class:`DynamoDBStore` sends its requests with boto3 (sync) or aiobotocore (async, the
``zae-celery[async]`` extra), one client of each per process, created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Mapping
from typing import Any

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
)
from botocore.exceptions import ConnectionError as BotoCoreConnectionError

from ..bucket import Shape, Step
from ..errors import EndpointUnreachable, RateLimiterUnavailable, ValidationError, ZaeError
from ..limits import Limit
from ..ops import (
    CLAIMED,
    CONDITION,
    ERROR,
    EXISTS,
    NO_TABLE,
    THROTTLED,
    UNAVAILABLE,
    Bucket,
    BucketKey,
    CreateClaim,
    CreateTable,
    DeleteLimits,
    DeleteTable,
    EnableExpiry,
    EntityRecord,
    ListBuckets,
    Op,
    PutEntity,
    PutLimits,
    ReadBucket,
    ReadEntity,
    ReadSchema,
    Reply,
    StampSchema,
    TableStatus,
    WriteBuckets,
)
from ..schema import (
    BUCKET_PREFIX,
    ENTITY_SK,
    LIMITS_PREFIX,
    META_KEY,
    PARENTS_INDEX_SPEC,
    TTL_ATTRIBUTE,
    bucket_key,
    bucket_sk,
    check_table_name,
    claim_key,
    entity_pk,
    limits_sk,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "Codec",
    "DynamoDBStore",
    "client_config",
    "client_kwargs",
]

DEFAULT_LOCAL_REGION = "us-east-1"
CONNECT_TIMEOUT = 1.0
"""Seconds to open a connection (DynamoDB answers a connect in milliseconds)."""
READ_TIMEOUT = 5.0
"""Seconds to wait for a reply once the request is sent."""

THROTTLING_CODES = frozenset(
    {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
)
SERVER_ERROR_CODES = frozenset({"InternalServerError", "ServiceUnavailable"})

Request = tuple[str, dict[str, Any]]


def client_config() -> Config:
    """Short timeouts and no botocore retries: a limiter must fail fast, not hang a task.

    Retries happen one layer up, in :func:`~..resilience.guard` (bounded in count and
    time, pauses on the flow's clock, seen by the circuit breaker); botocore retrying as
    well would multiply the attempts and hide them from the breaker.
    """
    return Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"mode": "standard", "total_max_attempts": 1},
        tcp_keepalive=True,
    )


def client_kwargs(endpoint_url: str | None, region: str | None) -> dict[str, Any]:
    """Arguments of ``session.client("dynamodb", ...)``. A local endpoint without any
    configured region gets ``us-east-1`` (local endpoints ignore it)."""
    if endpoint_url is not None and not (
        isinstance(endpoint_url, str) and endpoint_url.startswith(("http://", "https://"))
    ):
        raise ValidationError("endpoint_url", f"{endpoint_url!r}", "an http(s):// URL")
    if region is not None and (not isinstance(region, str) or not region):
        raise ValidationError("region", f"{region!r}", "an AWS region name like eu-west-1")
    if (
        region is None
        and endpoint_url is not None
        and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    ):
        region = DEFAULT_LOCAL_REGION
    kwargs: dict[str, Any] = {"config": client_config()}
    if endpoint_url is not None:
        kwargs["endpoint_url"] = endpoint_url
    if region is not None:
        kwargs["region_name"] = region
    return kwargs


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _bucket_key(key: BucketKey) -> dict[str, Any]:
    return bucket_key(key.entity_id, key.resource)


def _bucket(item: Mapping[str, Any] | None) -> dict[str, int]:
    """A DynamoDB bucket item as a :data:`~..ops.Bucket` (its limit attributes only)."""
    return {
        name: int(value["N"])
        for name, value in (item or {}).items()
        if "@" in name and isinstance(value, dict) and "N" in value
    }


def _update(table: str, key: dict[str, Any], steps: tuple[Step, ...], ttl: int) -> dict[str, Any]:
    names: dict[str, str] = {"#ttl": TTL_ATTRIBUTE}
    values: dict[str, Any] = {":ttl": _n(ttl)}
    sets = ["#ttl = :ttl"]
    adds: list[str] = []
    removes: list[str] = []
    conditions: list[str] = []
    for i, step in enumerate(steps):
        a, n, b, v, e = f"#a{i}", f":n{i}", f":b{i}", f":v{i}", f":e{i}"
        names[a] = step.limit.key
        shape = step.shape
        if shape is Shape.CHECK:
            conditions.append(f"(attribute_not_exists({a}) OR {a} <= {b})")
            values[b] = _n(step.bound)  # type: ignore[arg-type]
            continue
        if shape is Shape.DROP:
            conditions.append(f"{a} = {e}")
            values[e] = _n(step.expected)  # type: ignore[arg-type]
            removes.append(a)
            continue
        values[v] = _n(step.amount)
        if shape is Shape.FRESH:
            conditions.append(f"(attribute_not_exists({a}) OR {a} <= {n})")
            values[n] = _n(step.now)
            sets.append(f"{a} = {v}")
        elif shape is Shape.QUEUE:
            values[n] = _n(step.now)
            if step.bound is None:
                conditions.append(f"{a} > {n}")
            else:
                conditions.append(f"({a} > {n} AND {a} <= {b})")
                values[b] = _n(step.bound)
            adds.append(f"{a} {v}")
        elif shape is Shape.RAISE:
            if step.bound is None:
                conditions.append(f"(attribute_not_exists({a}) OR {a} < {v})")
            else:
                conditions.append(f"(attribute_not_exists({a}) OR {a} < {b})")
                values[b] = _n(step.bound)
            sets.append(f"{a} = {v}")
        elif shape is Shape.EXACT:
            if step.expected is None:
                conditions.append(f"attribute_not_exists({a})")
            else:
                conditions.append(f"{a} = {e}")
                values[e] = _n(step.expected)
            sets.append(f"{a} = {v}")
        elif shape is Shape.REFUND:
            adds.append(f"{a} {v}")
        else:  # CLAMP: max() has no update expression; the engine never plans it here
            raise TypeError(f"DynamoDB cannot write a {shape.value} step")
    expression = "SET " + ", ".join(sets)
    if adds:
        expression += " ADD " + ", ".join(adds)
    if removes:
        expression += " REMOVE " + ", ".join(removes)
    request: dict[str, Any] = {
        "TableName": table,
        "Key": key,
        "UpdateExpression": expression,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    if conditions:
        request["ConditionExpression"] = " AND ".join(conditions)
    return request


def _claim(table: str, entity_id: str, claim: str, ttl: int) -> dict[str, Any]:
    # An UpdateItem that creates the item (workers may not PutItem outside "#META").
    return {
        "TableName": table,
        "Key": claim_key(entity_id, claim),
        "UpdateExpression": "SET #ttl = :ttl",
        "ConditionExpression": "attribute_not_exists(PK)",
        "ExpressionAttributeNames": {"#ttl": TTL_ATTRIBUTE},
        "ExpressionAttributeValues": {":ttl": _n(ttl)},
    }


def _plain(value: dict[str, Any]) -> Any:
    if "N" in value:
        return int(value["N"])
    return value.get("S")


def _limits_attribute(limits: tuple[Limit, ...]) -> dict[str, Any]:
    return {
        "L": [
            {"M": {k: ({"S": v} if isinstance(v, str) else _n(v)) for k, v in d.items()}}
            for d in (lim.to_dict() for lim in limits)
        ]
    }


class Codec:
    """Operations as DynamoDB requests of one table, and DynamoDB answers as replies."""

    def __init__(self, table_name: str) -> None:
        self.table_name = check_table_name(table_name)

    # -- operation -> request ---------------------------------------------------------------
    def encode(self, op: Op) -> Request:
        """The client method and its keyword arguments for ``op``."""
        table = self.table_name
        if isinstance(op, WriteBuckets):
            return self._write(op)
        if isinstance(op, CreateClaim):
            return "update_item", _claim(table, op.entity_id, op.claim, op.ttl)
        if isinstance(op, ReadBucket):
            key = _bucket_key(op.key)
            return "get_item", {"TableName": table, "Key": key, "ConsistentRead": True}
        if isinstance(op, ListBuckets):
            single = op.resource is not None
            query: dict[str, Any] = {
                "TableName": table,
                "KeyConditionExpression": "PK = :pk AND "
                + ("SK = :sk" if single else "begins_with(SK, :sk)"),
                "ExpressionAttributeValues": {
                    ":pk": {"S": entity_pk(op.entity_id)},
                    ":sk": {"S": BUCKET_PREFIX if op.resource is None else bucket_sk(op.resource)},
                },
                "ConsistentRead": True,
            }
            if op.after is not None:
                query["ExclusiveStartKey"] = op.after
            return "query", query
        if isinstance(op, ReadEntity):
            return "query", {
                "TableName": table,
                "KeyConditionExpression": "PK = :pk AND begins_with(SK, :meta)",
                "ExpressionAttributeValues": {
                    ":pk": {"S": entity_pk(op.entity_id)},
                    ":meta": {"S": "#"},
                },
                "ConsistentRead": True,
            }
        if isinstance(op, PutEntity):
            item: dict[str, Any] = {
                "PK": {"S": entity_pk(op.entity_id)},
                "SK": {"S": ENTITY_SK},
                "cascade": {"BOOL": op.cascade},
            }
            if op.parent_id is not None:
                item["parent"] = {"S": op.parent_id}
            return "put_item", {"TableName": table, "Item": item}
        if isinstance(op, PutLimits):
            return "put_item", {
                "TableName": table,
                "Item": {
                    "PK": {"S": entity_pk(op.entity_id)},
                    "SK": {"S": limits_sk(op.resource)},
                    "limits": _limits_attribute(op.limits),
                },
            }
        if isinstance(op, DeleteLimits):
            key = {"PK": {"S": entity_pk(op.entity_id)}, "SK": {"S": limits_sk(op.resource)}}
            return "delete_item", {"TableName": table, "Key": key}
        if isinstance(op, ReadSchema):
            return "get_item", {"TableName": table, "Key": META_KEY, "ConsistentRead": True}
        if isinstance(op, StampSchema):
            return "put_item", {
                "TableName": table,
                "Item": {**META_KEY, "version": _n(op.version)},
                "ConditionExpression": "attribute_not_exists(PK)",
            }
        if isinstance(op, CreateTable):
            return "create_table", {
                "TableName": table,
                "AttributeDefinitions": [
                    {"AttributeName": "PK", "AttributeType": "S"},
                    {"AttributeName": "SK", "AttributeType": "S"},
                    {"AttributeName": "parent", "AttributeType": "S"},
                ],
                "KeySchema": [
                    {"AttributeName": "PK", "KeyType": "HASH"},
                    {"AttributeName": "SK", "KeyType": "RANGE"},
                ],
                "GlobalSecondaryIndexes": [PARENTS_INDEX_SPEC],
                "BillingMode": "PAY_PER_REQUEST",
            }
        if isinstance(op, TableStatus):
            return "describe_table", {"TableName": table}
        if isinstance(op, EnableExpiry):
            return "update_time_to_live", {
                "TableName": table,
                "TimeToLiveSpecification": {"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            }
        if isinstance(op, DeleteTable):
            return "delete_table", {"TableName": table}
        raise TypeError(f"not a store operation: {op!r}")

    def _write(self, op: WriteBuckets) -> Request:
        table = self.table_name
        if op.single:
            w = op.writes[0]
            update = _update(table, _bucket_key(w.key), w.steps, op.ttl)
            return "update_item", {**update, "ReturnValues": "ALL_NEW"}
        items = [{"Update": _update(table, _bucket_key(w.key), w.steps, op.ttl)} for w in op.writes]
        if op.claim is not None:
            items.append({"Update": _claim(table, op.claim[0], op.claim[1], op.ttl)})
        return "transact_write_items", {"TransactItems": items}

    # -- answer -> reply --------------------------------------------------------------------
    def decode(self, op: Op, response: Mapping[str, Any]) -> Reply:
        """The reply to ``op`` that succeeded with ``response``."""
        if isinstance(op, WriteBuckets):
            if op.single:
                return Reply((_bucket(response.get("Attributes")),))
            return Reply((None,) * len(op.writes))
        if isinstance(op, ReadBucket):
            return Reply(_bucket(response.get("Item")))
        if isinstance(op, ListBuckets):
            found = {
                item["SK"]["S"].removeprefix(BUCKET_PREFIX): _bucket(item)
                for item in response.get("Items", [])
                if item["SK"]["S"].startswith(BUCKET_PREFIX)
            }
            return Reply((found, response.get("LastEvaluatedKey") or None))
        if isinstance(op, ReadEntity):
            return Reply(self._entity(response.get("Items", [])))
        if isinstance(op, ReadSchema):
            version = (response.get("Item") or {}).get("version")
            return Reply(None if version is None or "N" not in version else int(version["N"]))
        if isinstance(op, CreateTable):
            return Reply(True)
        if isinstance(op, TableStatus):  # the table and its index, both ready
            described = response["Table"]
            indexes = described.get("GlobalSecondaryIndexes") or []
            ready = all(g.get("IndexStatus", "ACTIVE") == "ACTIVE" for g in indexes)
            return Reply(described["TableStatus"] == "ACTIVE" and ready)
        return Reply()

    @staticmethod
    def _entity(items: list[dict[str, Any]]) -> EntityRecord:
        exists, parent, cascade = False, None, False
        limits: dict[str, tuple[Limit, ...]] = {}
        for item in items:
            sk = item["SK"]["S"]
            if sk == ENTITY_SK:
                exists = True
                parent = item.get("parent", {}).get("S")
                cascade = bool(item.get("cascade", {}).get("BOOL", False))
            elif sk.startswith(LIMITS_PREFIX):
                limits[sk[len(LIMITS_PREFIX) :]] = tuple(
                    Limit.from_dict({k: _plain(v) for k, v in entry["M"].items()})
                    for entry in item["limits"]["L"]
                )
        return EntityRecord(exists, parent, cascade, limits)

    def decode_error(self, op: Op, response: Mapping[str, Any]) -> Reply:
        """The reply to ``op`` that DynamoDB refused with the error ``response``."""
        error = response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        text = f"DynamoDB error {code}: {error.get('Message', '')}".rstrip(": ")
        if code == "ConditionalCheckFailedException":
            if isinstance(op, WriteBuckets):
                # DynamoDB omits Item when the item does not exist, and so does an endpoint
                # that ignores ReturnValuesOnConditionCheckFailure: None makes it read.
                item = response.get("Item")
                return Reply(code=CONDITION, message=text, current=(_current(item),))
            if isinstance(op, (CreateClaim,)):
                return Reply(code=CLAIMED, message=text)
            if isinstance(op, StampSchema):
                return Reply(code=EXISTS, message=text)
        if code == "TransactionCanceledException" and isinstance(op, WriteBuckets):
            reasons = response.get("CancellationReasons") or []
            failed = [r.get("Code") == "ConditionalCheckFailed" for r in reasons]
            count = len(op.writes) + (op.claim is not None)
            if op.claim is not None and len(reasons) == count and failed[-1]:
                return Reply(code=CLAIMED, message=text)
            if len(reasons) == count and any(failed[: len(op.writes)]):
                current = tuple(
                    _current(r.get("Item")) if f else None
                    for r, f in zip(reasons[: len(op.writes)], failed, strict=False)
                )
                return Reply(code=CONDITION, message=text, current=current)
            codes = ", ".join(str(r.get("Code")) for r in reasons)
            return Reply(code=ERROR, message=f"{text} ({codes})")
        if code == "ResourceNotFoundException":
            return Reply(
                code=NO_TABLE,
                message=f"table {self.table_name!r} does not exist: create it with "
                "'zae-celery create-table' (local) or deploy the stack",
            )
        if code == "ResourceInUseException" and isinstance(op, CreateTable):
            return Reply(code=EXISTS, message=text)
        if code in THROTTLING_CODES:
            return Reply(code=THROTTLED, message=text)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in SERVER_ERROR_CODES or (isinstance(status, int) and status >= 500):
            return Reply(code=UNAVAILABLE, message=text)
        return Reply(code=ERROR, message=text)

    def failure(self, op: Op, exc: BaseException) -> Reply:
        """The reply for a client exception: a DynamoDB error; raises the engine's error
        for the rest (no reply at all, no credentials, a bad configuration)."""
        if isinstance(exc, ClientError):
            return self.decode_error(op, exc.response)
        if isinstance(exc, NoRegionError):
            raise ValidationError("region", "no AWS region configured", "region=... or AWS_REGION")
        if isinstance(exc, NoCredentialsError):
            raise RateLimiterUnavailable(
                "no AWS credentials found: configure them the usual boto3 way (environment, "
                "profile, instance role); a local endpoint accepts any values"
            ) from exc
        if isinstance(exc, (BotoCoreConnectionError, HTTPClientError, OSError, TimeoutError)):
            raise EndpointUnreachable(f"DynamoDB endpoint unavailable: {exc}") from exc
        if isinstance(exc, BotoCoreError):
            raise RateLimiterUnavailable(f"DynamoDB client error: {exc}") from exc
        raise exc


def _current(item: Mapping[str, Any] | None) -> Bucket | None:
    return None if item is None else _bucket(item)


class DynamoDBStore:
    """A DynamoDB table as the limiter's store (boto3 for sync, aiobotocore for asyncio).

    Args:
        table_name: the table.
        endpoint_url: a local endpoint (moto server, DynamoDB Local); None for AWS.
        region: AWS region; None for the boto3 chain (``us-east-1`` for a local endpoint).
        session: a boto3 session (sync) or an aiobotocore (or aioboto3) session (asyncio) to
            create the client from.
    """

    name = "dynamodb"

    def __init__(
        self,
        table_name: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        session: Any = None,
    ) -> None:
        self.codec = Codec(table_name)
        self.endpoint_url = endpoint_url
        self._client_kwargs = client_kwargs(endpoint_url, region)
        self._session = session
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()
        self._aclient: Any = None
        self._astack: contextlib.AsyncExitStack | None = None
        self._alock: asyncio.Lock | None = None

    @property
    def table_name(self) -> str:
        """The DynamoDB table."""
        return self.codec.table_name

    def __repr__(self) -> str:
        where = self.endpoint_url or "AWS"
        return f"<DynamoDBStore table={self.table_name!r} at {where}>"

    # -- sync (boto3) -----------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 DynamoDB client of this process (created on first use; safe across
        ``fork``: a child process makes its own)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    import boto3

                    session = self._session or boto3.session.Session()
                    try:
                        self._client = session.client("dynamodb", **self._client_kwargs)
                    except Exception as exc:
                        self.codec.failure(ReadSchema(), exc)
                        raise
                    self._pid = os.getpid()
        return self._client

    def send(self, op: Op) -> Reply:
        """Send ``op`` as one request and return the reply (sync)."""
        name, kwargs = self.codec.encode(op)
        try:
            return self.codec.decode(op, getattr(self.client, name)(**kwargs))
        except ZaeError:
            raise
        except Exception as exc:
            return self.codec.failure(op, exc)

    # -- asyncio (aiobotocore) --------------------------------------------------------------
    async def aclient(self) -> Any:
        """The aiobotocore DynamoDB client (created on first use, closed by :meth:`aclose`)."""
        if self._alock is None:
            self._alock = asyncio.Lock()
        if self._aclient is None:
            async with self._alock:
                if self._aclient is None:
                    self._astack = contextlib.AsyncExitStack()
                    try:
                        self._aclient = await self._astack.enter_async_context(
                            _async_client(self._session, self._client_kwargs)
                        )
                    except ZaeError:
                        raise
                    except Exception as exc:
                        self.codec.failure(ReadSchema(), exc)
                        raise
        return self._aclient

    async def asend(self, op: Op) -> Reply:
        """Send ``op`` as one request and return the reply (asyncio)."""
        name, kwargs = self.codec.encode(op)
        client = await self.aclient()
        try:
            return self.codec.decode(op, await getattr(client, name)(**kwargs))
        except ZaeError:
            raise
        except Exception as exc:
            return self.codec.failure(op, exc)

    async def aclose(self) -> None:
        """Close the async client's connections (the sync client needs no closing)."""
        stack, self._astack, self._aclient = self._astack, None, None
        if stack is not None:
            await stack.aclose()


def _async_client(session: Any, kwargs: dict[str, Any]) -> Any:
    """``session.create_client("dynamodb", ...)`` (aiobotocore) or ``session.client(...)``
    (aioboto3), as an async context manager."""
    if session is None:
        try:
            from aiobotocore.session import get_session
        except ImportError as exc:
            raise ZaeError(
                "AsyncRateLimiter on DynamoDB needs aiobotocore: pip install 'zae-celery[async]'"
            ) from exc
        session = get_session()
    if hasattr(session, "create_client"):
        return session.create_client("dynamodb", **kwargs)
    return session.client("dynamodb", **kwargs)
