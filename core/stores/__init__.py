"""Where the buckets live: a store interprets the engine's operations (:mod:`..ops`).

- :class:`~.dynamodb.DynamoDBStore`: a DynamoDB table (boto3; aiobotocore for asyncio),
  shared by every worker on every host: ``dynamodb://TABLE``.
- :class:`~.memory.MemoryStore`: this process's memory, same semantics, for tests and
  single processes: ``memory://`` (a new store) or ``memory://NAME`` (one per name and
  process, shared by the limiters that name it).

:func:`from_url` picks one by URL, as ``RateLimiter.from_url`` and the Celery setting
``zae_store_url`` do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from ..errors import ValidationError
from ..ops import Op, Reply
from ..schema import check_table_name
from .dynamodb import DEFAULT_LOCAL_REGION, DynamoDBStore, client_config, client_kwargs
from .memory import MemoryStore

__all__ = [
    "DEFAULT_LOCAL_REGION",
    "DynamoDBStore",
    "MemoryStore",
    "Store",
    "StoreUrl",
    "client_config",
    "from_url",
]

SCHEMES = ("dynamodb", "memory")


@runtime_checkable
class Store(Protocol):
    """What a limiter needs of a store: answer an operation, sync or async."""

    name: str

    def send(self, op: Op) -> Reply:
        """Answer ``op`` (sync)."""

    async def asend(self, op: Op) -> Reply:
        """Answer ``op`` (asyncio)."""

    async def aclose(self) -> None:
        """Release connections (asyncio)."""


_named: dict[str, MemoryStore] = {}
_named_lock = threading.Lock()


@dataclass(frozen=True)
class StoreUrl:
    """A store URL, checked: its kind (``dynamodb`` or ``memory``), the table (or the
    memory store's name; empty for a new one), the region and the endpoint."""

    kind: str
    name: str
    region: str | None = None
    endpoint_url: str | None = None

    @classmethod
    def parse(cls, url: Any, field: str = "store_url") -> StoreUrl:
        """``url`` checked; a ValidationError naming ``field`` says what is allowed."""
        allowed = "dynamodb://TABLE?region=...&endpoint_url=... or memory://[NAME]"
        if not isinstance(url, str):
            raise ValidationError(field, f"must be a string, got {type(url).__name__}", allowed)
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValidationError(field, f"unknown scheme in {url!r}", allowed)
        try:
            query = parse_qs(parts.query, strict_parsing=bool(parts.query))
        except ValueError:
            raise ValidationError(field, f"malformed query in {url!r}", allowed) from None
        if parts.path not in ("", "/"):
            raise ValidationError(field, f"a path in {url!r}", allowed)
        if parts.scheme == "memory":
            if query:
                raise ValidationError(field, f"options in {url!r}", "memory:// or memory://NAME")
            return cls("memory", parts.netloc)
        unknown = sorted(set(query) - {"region", "endpoint_url"})
        if unknown:
            raise ValidationError(field, f"unknown option {unknown[0]!r} in {url!r}", allowed)
        if any(len(v) > 1 for v in query.values()):
            raise ValidationError(field, f"an option is given twice in {url!r}", allowed)
        if not parts.netloc:
            raise ValidationError(field, f"no table in {url!r}", allowed)
        region = query.get("region", [None])[0]
        endpoint = query.get("endpoint_url", [None])[0]
        try:
            check_table_name(parts.netloc)
            client_kwargs(endpoint, region)  # the endpoint and the region, checked
        except ValidationError as exc:
            raise ValidationError(field, f"{exc.field} {exc.problem}", exc.allowed) from None
        return cls("dynamodb", parts.netloc, region, endpoint)


def from_url(url: str, *, clock: Callable[[], float] = time.time) -> Store:
    """The store a URL names (see :class:`StoreUrl`).

    - ``dynamodb://TABLE`` with optional ``?region=eu-west-1`` and
      ``&endpoint_url=http://127.0.0.1:8000`` (a local endpoint);
    - ``memory://`` (a new, empty in-memory store) or ``memory://NAME`` (the one of that
      name in this process, created on first use).

    ``clock`` drives a new memory store's item expiry. A malformed URL raises
    ValidationError saying what is allowed.
    """
    parsed = StoreUrl.parse(url)
    if parsed.kind == "memory":
        if not parsed.name:
            return MemoryStore(clock=clock)
        with _named_lock:
            found = _named.get(parsed.name)
            if found is None:
                found = _named[parsed.name] = MemoryStore(clock=clock)
            return found
    return DynamoDBStore(parsed.name, region=parsed.region, endpoint_url=parsed.endpoint_url)
