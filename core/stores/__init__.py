"""Where the buckets live: a store interprets the engine's operations (:mod:`..ops`).

- :class:`~.dynamodb.DynamoDBStore`: a DynamoDB table (boto3; aiobotocore for asyncio),
  shared by every worker on every host: ``dynamodb://TABLE``.
- :class:`~.redis.RedisStore`: a Redis or Valkey server, or a Redis Cluster, shared by
  every worker that reaches it (redis-py; the ``zae-celery[redis]`` extra):
  ``redis://HOST:PORT/DB``, ``rediss://`` (TLS), ``redis+cluster://HOST:PORT``.
- :class:`~.memory.MemoryStore`: this process's memory, same semantics, for tests and
  single processes: ``memory://`` (a new store) or ``memory://NAME`` (one per name and
  process, shared by the limiters that name it).

:func:`from_url` picks one by URL, as ``RateLimiter.from_url`` and the Celery setting
``zae_store_url`` do.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from ..errors import ValidationError
from ..ops import Op, Reply
from ..schema import check_table_name
from .dynamodb import DEFAULT_LOCAL_REGION, DynamoDBStore, client_config, client_kwargs
from .memory import MemoryStore
from .redis import DEFAULT_PREFIX, RedisStore, check_prefix

__all__ = [
    "DEFAULT_LOCAL_REGION",
    "DynamoDBStore",
    "MemoryStore",
    "RedisStore",
    "Store",
    "StoreUrl",
    "client_config",
    "from_url",
]

REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
SCHEMES = ("dynamodb", "memory", *REDIS_SCHEMES)
REDIS_OPTIONS = frozenset(
    {
        "prefix",
        "socket_timeout",
        "socket_connect_timeout",
        "health_check_interval",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_check_hostname",
    }
)
"""The options a redis URL may carry: ``prefix`` (the store's), and redis-py's own."""
_DB = re.compile(r"^/?[0-9]*$")
_PASSWORD = re.compile(r"(://[^/@]*?:)[^/@]*@")


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
    """A store URL, checked: its kind (``dynamodb``, ``redis`` or ``memory``), the table
    (the redis prefix, or the memory store's name; empty for a new one), the region, the
    endpoint (for redis: the URL redis-py connects to) and, for redis, whether it names
    a cluster."""

    kind: str
    name: str
    region: str | None = None
    endpoint_url: str | None = None
    cluster: bool = False

    @classmethod
    def parse(cls, url: Any, field: str = "store_url") -> StoreUrl:
        """``url`` checked; a ValidationError naming ``field`` says what is allowed."""
        allowed = (
            "dynamodb://TABLE?region=...&endpoint_url=..., redis://HOST:PORT/DB?prefix=..., "
            "rediss://..., redis+cluster://HOST:PORT or memory://[NAME]"
        )
        if not isinstance(url, str):
            raise ValidationError(field, f"must be a string, got {type(url).__name__}", allowed)
        parts = urlsplit(url)
        shown = _hide_password(url)
        if parts.scheme not in SCHEMES:
            raise ValidationError(field, f"unknown scheme in {shown!r}", allowed)
        if "#" in url:  # urlsplit would drop what follows it (a fragment) without a word
            raise ValidationError(
                field,
                f"a '#' in {shown!r}",
                "no '#': a prefix never holds one, and a password writes it as %23",
            )
        try:
            # Blank values kept, so that ?prefix= is refused rather than ignored.
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ValidationError(field, f"malformed query in {shown!r}", allowed) from None
        if parts.scheme in REDIS_SCHEMES:
            return cls._redis(shown, parts, query, field, allowed)
        if parts.path not in ("", "/"):
            raise ValidationError(field, f"a path in {shown!r}", allowed)
        if parts.scheme == "memory":
            if query:
                raise ValidationError(field, f"options in {shown!r}", "memory:// or memory://NAME")
            return cls("memory", parts.netloc)
        unknown = sorted(set(query) - {"region", "endpoint_url"})
        if unknown:
            raise ValidationError(field, f"unknown option {unknown[0]!r} in {shown!r}", allowed)
        if any(len(v) > 1 for v in query.values()):
            raise ValidationError(field, f"an option is given twice in {shown!r}", allowed)
        if not parts.netloc:
            raise ValidationError(field, f"no table in {shown!r}", allowed)
        region = query.get("region", [None])[0]
        endpoint = query.get("endpoint_url", [None])[0]
        try:
            check_table_name(parts.netloc)
            client_kwargs(endpoint, region)  # the endpoint and the region, checked
        except ValidationError as exc:
            raise ValidationError(field, f"{exc.field} {exc.problem}", exc.allowed) from None
        return cls("dynamodb", parts.netloc, region, endpoint)

    @classmethod
    def _redis(
        cls, shown: str, parts: Any, query: dict[str, list[str]], field: str, allowed: str
    ) -> StoreUrl:
        cluster = parts.scheme.endswith("+cluster")
        unknown = sorted(set(query) - REDIS_OPTIONS)
        if unknown:
            raise ValidationError(
                field,
                f"unknown option {unknown[0]!r} in {shown!r}",
                "the options " + ", ".join(sorted(REDIS_OPTIONS)),
            )
        if any(len(v) > 1 for v in query.values()):
            raise ValidationError(field, f"an option is given twice in {shown!r}", "each once")
        if not parts.hostname:
            raise ValidationError(field, f"no host in {shown!r}", allowed)
        try:
            port = parts.port  # raises for a malformed port or one above 65535
        except ValueError:
            port = 0
        if port == 0:
            raise ValidationError(
                field, f"a malformed port in {shown!r}", "a port 1..65535 (default 6379)"
            )
        if not _DB.fullmatch(parts.path):
            raise ValidationError(
                field,
                f"the database must be a number in {shown!r}",
                "a database number after the port, e.g. redis://HOST:PORT/0",
            )
        if cluster and parts.path.strip("/") not in ("", "0"):
            raise ValidationError(
                field,
                f"a cluster has only database 0: {shown!r}",
                "redis+cluster://HOST:PORT or redis+cluster://HOST:PORT/0",
            )
        prefix = query.pop("prefix", [DEFAULT_PREFIX])[0]
        try:
            check_prefix(prefix)
        except ValidationError as exc:
            raise ValidationError(field, f"prefix {exc.problem}", exc.allowed) from None
        scheme = parts.scheme.removesuffix("+cluster")
        options = urlencode({k: v[0] for k, v in sorted(query.items())})
        target = urlunsplit((scheme, parts.netloc, parts.path, options, ""))
        return cls("redis", prefix, None, target, cluster)


def _hide_password(url: str) -> str:
    """``url`` as it may be shown in an error or a log: any password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", url)


def from_url(url: str, *, clock: Callable[[], float] = time.time) -> Store:
    """The store a URL names (see :class:`StoreUrl`).

    - ``dynamodb://TABLE`` with optional ``?region=eu-west-1`` and
      ``&endpoint_url=http://127.0.0.1:8000`` (a local endpoint);
    - ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, ``redis+cluster://HOST:PORT`` for
      a Redis Cluster) with optional ``?prefix=NAME`` (default ``zae``: the keys' prefix
      and hash tag) and redis-py's connection options (``socket_timeout``...);
    - ``memory://`` (a new, empty in-memory store) or ``memory://NAME`` (the one of that
      name in this process, created on first use).

    ``clock`` drives a new memory store's item expiry and a redis store's key expiry. A
    malformed URL raises ValidationError saying what is allowed.
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
    if parsed.kind == "redis":
        assert parsed.endpoint_url is not None
        return RedisStore(
            parsed.endpoint_url, prefix=parsed.name, cluster=parsed.cluster, clock=clock
        )
    return DynamoDBStore(parsed.name, region=parsed.region, endpoint_url=parsed.endpoint_url)
