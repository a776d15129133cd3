"""The table's records around the buckets: its schema version, entities and stored
limits (with a per-process cache), and the table itself. Flows, like the engine's."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import (
    IncompatibleSchema,
    RateLimiterUnavailable,
    TableNotFound,
    ValidationError,
)
from .limits import Limit
from .ops import (
    EXISTS,
    NO_TABLE,
    THROTTLED,
    CreateTable,
    DeleteLimits,
    DeleteTable,
    EnableExpiry,
    EntityRecord,
    Flow,
    PutEntity,
    PutLimits,
    ReadEntity,
    ReadSchema,
    Reply,
    Sleep,
    StampSchema,
    TableStatus,
)
from .schema import ANY_RESOURCE, SCHEMA_VERSION
from .validation import check_id, check_limits

__all__ = ["CACHE_SIZE", "Clock", "EntityConfig", "Records", "merge", "remember"]

CACHE_SIZE = 100_000

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def remember(cache: dict[K, V], key: K, value: V, size: int) -> list[K]:
    """Put ``key`` in ``cache`` as its most recent entry; past ``size`` entries, forget the
    least recently written quarter. Returns the keys forgotten (the caller holds the lock)."""
    cache.pop(key, None)
    cache[key] = value
    excess = len(cache) - size
    if excess <= 0:
        return []
    forgotten = list(itertools.islice(cache, excess + size // 4))
    for old in forgotten:
        del cache[old]
    return forgotten


@dataclass
class _Cached:
    value: Any
    expires: float


@dataclass
class EntityConfig:
    """An entity's stored record: parent, cascade flag and stored limits per resource."""

    entity_id: str
    exists: bool = False
    parent_id: str | None = None
    cascade: bool = False
    limits: dict[str, tuple[Limit, ...]] = field(default_factory=dict)

    def limits_for(self, resource: str) -> tuple[Limit, ...]:
        """Stored limits that apply to ``resource`` (its own over the entity-wide ones)."""
        merged = {lim.name: lim for lim in self.limits.get(ANY_RESOURCE, ())}
        merged.update({lim.name: lim for lim in self.limits.get(resource, ())})
        return tuple(merged.values())


def merge(code: Sequence[Limit], stored: Sequence[Limit]) -> tuple[Limit, ...]:
    merged = {lim.name: lim for lim in code}
    merged.update({lim.name: lim for lim in stored})
    return tuple(merged.values())


class Records:
    """Schema, table and stored-configuration flows, and the entity cache."""

    def __init__(
        self, *, clock: Clock = time.time, stored_config: bool = True, config_ttl: float = 60.0
    ) -> None:
        if not isinstance(config_ttl, (int, float)) or not 0 <= config_ttl < math.inf:
            raise ValidationError("config_ttl", f"{config_ttl!r}", "seconds >= 0")
        self.clock = clock
        self.stored_config = stored_config
        self.config_ttl = float(config_ttl)
        self._schema_ok = False
        self._lock = threading.Lock()
        self._configs: dict[str, _Cached] = {}
        self.cache_size = CACHE_SIZE
        """Entities (and, in the engine, buckets) whose last seen state is kept at most."""

    def forget_config(self, entity_id: str | None = None) -> None:
        """Drop cached stored limits and entity records (all, or one entity's)."""
        with self._lock:
            if entity_id is None:
                self._configs.clear()
            else:
                self._configs.pop(entity_id, None)

    # -- errors ---------------------------------------------------------------------------
    def _raise_for(self, reply: Reply) -> None:
        """Turn an unexpected error reply into the engine's error."""
        if reply.ok:
            return
        if reply.code == NO_TABLE:
            raise TableNotFound(reply.message)
        if reply.code == THROTTLED:
            raise RateLimiterUnavailable(f"the store throttled the request: {reply.message}")
        raise RateLimiterUnavailable(reply.message or f"store error {reply.code}")

    # -- schema ---------------------------------------------------------------------------
    def ensure_schema(self) -> Flow[None]:
        """Check (once per limiter) that the table speaks this engine's schema version."""
        if self._schema_ok:
            return
        reply = yield ReadSchema()
        self._raise_for(reply)
        found = reply.value
        if found is None:
            # A table made by the CloudFormation stack: stamp it.
            yield from self._stamp_schema()
        elif found != SCHEMA_VERSION:
            raise IncompatibleSchema(
                f"the table has schema version {found}; this zae-celery speaks version "
                f"{SCHEMA_VERSION}. Upgrade zae-celery or use another table."
            )
        self._schema_ok = True

    def schema_version(self) -> Flow[int | None]:
        """The schema version stamped on the table (None: none yet, the first request
        stamps it). One read; it stamps nothing and checks nothing."""
        reply = yield ReadSchema()
        self._raise_for(reply)
        version: int | None = reply.value
        return version

    def _stamp_schema(self) -> Flow[None]:
        reply = yield StampSchema(SCHEMA_VERSION)
        if reply.code != EXISTS:
            self._raise_for(reply)

    def create_table(self) -> Flow[bool]:
        """Create the table (on-demand, TTL on ``ttl``) and stamp its schema version.

        Returns False when it already existed (its schema version is then checked).
        """
        reply = yield CreateTable()
        created = reply.ok
        if not created and reply.code != EXISTS:
            self._raise_for(reply)
        for _ in range(600):
            status = yield TableStatus()
            self._raise_for(status)
            if status.value:
                break
            yield Sleep(0.1)
        else:
            raise RateLimiterUnavailable(
                "the table (and its index) did not become ACTIVE within a minute"
            )
        if created:
            self._raise_for((yield EnableExpiry()))
            yield from self._stamp_schema()
        yield from self.ensure_schema()
        return created

    def delete_table(self) -> Flow[None]:
        """Delete the table (local endpoints, tests)."""
        self._raise_for((yield DeleteTable()))
        self._schema_ok = False

    # -- stored configuration ---------------------------------------------------------------
    def _entity_config(self, entity_id: str, *, fresh: bool = False) -> Flow[EntityConfig]:
        """An entity's record and stored limits (one read, cached for ``config_ttl``)."""
        now = self.clock()
        cached = self._configs.get(entity_id)
        if cached is not None and cached.expires > now and not fresh:
            config: EntityConfig = cached.value
            return config
        reply = yield ReadEntity(entity_id)
        self._raise_for(reply)
        record: EntityRecord = reply.value
        config = EntityConfig(
            entity_id, record.exists, record.parent_id, record.cascade, dict(record.limits)
        )
        with self._lock:
            remember(
                self._configs, entity_id, _Cached(config, now + self.config_ttl), self.cache_size
            )
        return config

    def create_entity(
        self, entity_id: str, parent_id: str | None = None, cascade: bool = False
    ) -> Flow[None]:
        """Create or replace an entity record (``parent_id``; ``cascade`` to the parent)."""
        check_id("entity_id", entity_id)
        if parent_id is not None:
            check_id("parent_id", parent_id)
            if parent_id == entity_id:
                raise ValidationError("parent_id", "an entity cannot be its own parent")
        if not isinstance(cascade, bool):
            raise ValidationError("cascade", "must be True or False")
        if cascade and parent_id is None:
            raise ValidationError("cascade", "cascade needs a parent_id")
        yield from self.ensure_schema()
        self._raise_for((yield PutEntity(entity_id, parent_id, cascade)))
        self.forget_config(entity_id)

    def set_limits(
        self, entity_id: str, limits: Sequence[Limit], resource: str | None = None
    ) -> Flow[None]:
        """Store limits for an entity (one resource, or every resource when None)."""
        check_id("entity_id", entity_id)
        if resource is not None:
            check_id("resource", resource)
        checked = check_limits(limits)
        if not checked:
            raise ValidationError("limits", "is empty", "at least one Limit (or delete_limits)")
        yield from self.ensure_schema()
        self._raise_for((yield PutLimits(entity_id, resource, checked)))
        self.forget_config(entity_id)

    def get_limits(self, entity_id: str, resource: str | None = None) -> Flow[list[Limit]]:
        """The limits stored for an entity and resource (``None``: entity-wide), or []."""
        check_id("entity_id", entity_id)
        if resource is not None:
            check_id("resource", resource)
        yield from self.ensure_schema()
        config = yield from self._entity_config(entity_id, fresh=True)
        return list(config.limits.get(ANY_RESOURCE if resource is None else resource, ()))

    def stored_limits(self, entity_id: str) -> Flow[dict[str | None, list[Limit]]]:
        """Every limit stored for an entity, by resource: ``None`` (every resource) first,
        then each resource with limits of its own, by name; ``{}`` when none. One read
        (the entity's record holds them all)."""
        check_id("entity_id", entity_id)
        yield from self.ensure_schema()
        config = yield from self._entity_config(entity_id, fresh=True)
        ordered = sorted(config.limits.items(), key=lambda kv: (kv[0] != ANY_RESOURCE, kv[0]))
        return {(None if res == ANY_RESOURCE else res): list(lims) for res, lims in ordered}

    def delete_limits(self, entity_id: str, resource: str | None = None) -> Flow[None]:
        """Delete the limits stored for an entity and resource."""
        check_id("entity_id", entity_id)
        if resource is not None:
            check_id("resource", resource)
        yield from self.ensure_schema()
        self._raise_for((yield DeleteLimits(entity_id, resource)))
        self.forget_config(entity_id)
