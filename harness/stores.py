"""Redis store URLs for the demo and the benchmarks: a prefix of each run's own.

A run that puts its buckets on a Redis server the user names must neither read nor,
when it deletes its keys at the end (``limiter.delete_table()`` drops every key of the
prefix), remove anything else: each run gets ``<the URL's prefix>-<tag>``.

>>> with_run_prefix("redis://127.0.0.1:6379/0", "demo-1a2b")
'redis://127.0.0.1:6379/0?prefix=zae-demo-1a2b'
>>> with_run_prefix("redis://h:6379/2?prefix=team&socket_timeout=2", "bench-9")
'redis://h:6379/2?socket_timeout=2&prefix=team-bench-9'
>>> where("redis://user:secret@h:6380/1?prefix=team")
'Redis at h:6380/1'
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from zae_celery.core.stores import StoreUrl

__all__ = ["is_redis", "where", "with_run_prefix"]


def is_redis(url: str, field: str = "--store") -> bool:
    """Whether a store URL names a Redis store; a malformed one raises ValidationError
    naming ``field``."""
    return StoreUrl.parse(url, field).kind == "redis"


def with_run_prefix(url: str, tag: str, field: str = "--store") -> str:
    """``url`` (a redis store URL) with the prefix ``<its prefix>-<tag>`` (the URL's
    prefix, else the store's default); ValidationError naming ``field`` when the result
    is not a valid store URL (a prefix longer than 64 characters)."""
    base = StoreUrl.parse(url, field).name
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "prefix"]
    query.append(("prefix", f"{base}-{tag}"))
    run_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    StoreUrl.parse(run_url, field)
    return run_url


def where(url: str) -> str:
    """A redis store URL for people: its server and database, never a password."""
    parsed = StoreUrl.parse(url)
    parts = urlsplit(parsed.endpoint_url or "")
    kind = "Redis Cluster" if parsed.cluster else "Redis"
    return f"{kind} at {parts.hostname}:{parts.port or 6379}{parts.path}"
