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
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

from ..errors import ValidationError
from ..ops import Op, Reply
from .dynamodb import DEFAULT_LOCAL_REGION, DynamoDBStore, client_config
from .memory import MemoryStore

__all__ = [
    "DEFAULT_LOCAL_REGION",
    "DynamoDBStore",
    "MemoryStore",
    "Store",
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


def from_url(url: str, *, clock: Callable[[], float] = time.time) -> Store:
    """The store a URL names.

    - ``dynamodb://TABLE`` with optional ``?region=eu-west-1`` and
      ``&endpoint_url=http://127.0.0.1:8000`` (a local endpoint);
    - ``memory://`` (a new, empty in-memory store) or ``memory://NAME`` (the one of that
      name in this process, created on first use).

    ``clock`` drives a new memory store's item expiry. A malformed URL raises
    ValidationError saying what is allowed.
    """
    if not isinstance(url, str):
        raise ValidationError("store_url", f"{url!r}", "a URL like dynamodb://TABLE or memory://")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValidationError(
            "store_url",
            f"unknown scheme in {url!r}",
            "dynamodb://TABLE?region=...&endpoint_url=... or memory://[NAME]",
        )
    try:
        query = parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValidationError("store_url", f"malformed query in {url!r}") from exc
    if parts.scheme == "memory":
        if query or parts.path not in ("", "/"):
            raise ValidationError("store_url", f"{url!r}", "memory:// or memory://NAME")
        if not parts.netloc:
            return MemoryStore(clock=clock)
        with _named_lock:
            return _named.setdefault(parts.netloc, MemoryStore(clock=clock))
    unknown = set(query) - {"region", "endpoint_url"}
    if unknown:
        raise ValidationError(
            "store_url", f"unknown option {sorted(unknown)[0]!r} in {url!r}", "region, endpoint_url"
        )
    if any(len(v) > 1 for v in query.values()):
        raise ValidationError("store_url", f"an option is given twice in {url!r}")
    if not parts.netloc or parts.path not in ("", "/"):
        raise ValidationError("store_url", f"{url!r}", "dynamodb://TABLE (the table's name)")
    return DynamoDBStore(
        parts.netloc,
        region=query.get("region", [None])[0],
        endpoint_url=query.get("endpoint_url", [None])[0],
    )
