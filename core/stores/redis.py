"""The Redis store: each operation of :mod:`..ops` is one Lua script, one round trip.

Works with Redis >= 6.2 and Valkey, standalone or as a cluster (``redis+cluster://``).
:class:`Scripts` is pure (operation -> script call, script answer -> :class:`~..ops.Reply`);
:class:`RedisStore` runs the calls with redis-py (sync) or ``redis.asyncio``, one client of
each per process, created on first use. redis-py loads each script once and calls it by
its SHA (EVALSHA), loading it again after a NoScriptError (a restarted or flushed server).

Key layout (``{P}`` is the store's prefix as a cluster hash tag, so that every key of a
store lives in one slot: a write across entities, a cascade parent or a queue bucket, is
one atomic script on one node):

=============================  =====================================================
``{P}#META``                   schema version (string)
``{P}E#<entity>##ENTITY``      hash: ``parent``, ``cascade``
``{P}E#<entity>##LIMITS``      hash: resource (``*``: every resource) -> limits (JSON)
``{P}E#<entity>#B#<resource>`` hash: limit attribute -> TAT (decimal), ``#`` -> ttl
``{P}E#<entity>#R``            sorted set of the entity's bucket resources (listing)
``{P}E#<entity>#C#<hash>``     a started reservation's claim
=============================  =====================================================

Buckets, listings and claims always expire (PEXPIRE, from the engine's ``ttl`` relative
to the store's clock); the schema stamp, entity records and stored limits are
configuration and stay until deleted, as in DynamoDB.

TATs are integers on a scaled clock that outgrow a Lua number (a double: exact only to
2**53) and even a 64-bit integer for fine limits, so the scripts compare and add them as
decimal strings, exactly, as DynamoDB does with its 38-digit numbers.

Time: the engine's clock (the worker's) decides, as with DynamoDB; the scripts never read
the server's TIME. See docs/engine.md ("Redis") for why and for the skew bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EndpointUnreachable, RateLimiterUnavailable, ValidationError, ZaeError
from ..limits import Limit
from ..ops import (
    CLAIMED,
    CONDITION,
    ERROR,
    EXISTS,
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
from ..schema import ANY_RESOURCE, ENTITY_SK, LIMITS_PREFIX, bucket_sk, claim_key, entity_pk

__all__ = ["CONNECT_TIMEOUT", "DEFAULT_PREFIX", "READ_TIMEOUT", "RedisStore", "Scripts"]

DEFAULT_PREFIX = "zae"
CONNECT_TIMEOUT = 1.0
"""Seconds to open a connection (as for DynamoDB: fail fast, the breaker decides)."""
READ_TIMEOUT = 5.0
"""Seconds to wait for a reply once the command is sent."""
PAGE = 100
"""Bucket items per :class:`~..ops.ListBuckets` page."""
MIN_EXPIRY_MS = 1000
"""A key never gets less time to live than this (an expiry in the past would drop it)."""
MAX_EXPIRY_MS = 100 * 365 * 86_400_000
"""Nor more than a century (Redis refuses expiry times beyond its 64-bit clock)."""
_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MARKER = "#"  # the field every bucket hash holds, so a check-only write creates the item

# -- Lua ----------------------------------------------------------------------------------
# Signed decimal integers as strings, compared and added exactly (no Lua numbers).
_DECIMAL = """
local function neg(s) return s:byte(1) == 45 end
local function mag(s) if neg(s) then return s:sub(2) end return s end
local function ucmp(a, b)
  if #a ~= #b then if #a < #b then return -1 end return 1 end
  for i = 1, #a do
    local x, y = a:byte(i), b:byte(i)
    if x ~= y then if x < y then return -1 end return 1 end
  end
  return 0
end
local function cmp(a, b)
  local na, nb = neg(a), neg(b)
  if na ~= nb then if na then return -1 end return 1 end
  local c = ucmp(mag(a), mag(b))
  if na then return -c end
  return c
end
local function uadd(a, b)
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local d = carry
    if i > 0 then d = d + a:byte(i) - 48 end
    if j > 0 then d = d + b:byte(j) - 48 end
    if d >= 10 then d = d - 10; carry = 1 else carry = 0 end
    out[#out + 1] = string.char(48 + d)
    i = i - 1; j = j - 1
  end
  return string.reverse(table.concat(out))
end
local function usub(a, b)
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local d = a:byte(i) - 48 - borrow
    if j > 0 then d = d - (b:byte(j) - 48) end
    if d < 0 then d = d + 10; borrow = 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + d)
    i = i - 1; j = j - 1
  end
  local s = (string.reverse(table.concat(out)):gsub('^0+', ''))
  if s == '' then return '0' end
  return s
end
local function add(a, b)
  local na, nb, x, y = neg(a), neg(b), mag(a), mag(b)
  if na == nb then
    local s = uadd(x, y)
    if na and s ~= '0' then return '-' .. s end
    return s
  end
  local c = ucmp(x, y)
  if c == 0 then return '0' end
  if c > 0 then
    if na then return '-' .. usub(x, y) end
    return usub(x, y)
  end
  if nb then return '-' .. usub(y, x) end
  return usub(y, x)
end
"""

# KEYS: the n bucket keys, their n listing keys, [the claim key]
# ARGV: expiry ms, n, claim (0/1), marker value (the ttl), then per item: resource,
#       step count, and per step: field, shape, now, amount, bound, expected ('' = none)
_WRITE = (
    _DECIMAL
    + """
local function holds(shape, v, now, amount, bound, expected)
  if shape == 'check' then return v == false or cmp(v, bound) <= 0 end
  if shape == 'fresh' then return v == false or cmp(v, now) <= 0 end
  if shape == 'queue' then
    return v ~= false and cmp(v, now) > 0 and (bound == '' or cmp(v, bound) <= 0)
  end
  if shape == 'raise' then return v == false or cmp(v, bound == '' and amount or bound) < 0 end
  if shape == 'clamp' then return v == false or bound == '' or cmp(v, bound) <= 0 end
  if shape == 'exact' then
    if expected == '' then return v == false end
    return v ~= false and cmp(v, expected) == 0
  end
  if shape == 'drop' then return v ~= false and cmp(v, expected) == 0 end
  return true
end
local ttl, n = ARGV[1], tonumber(ARGV[2])
local claim = ARGV[3] == '1'
local items, failed, pos, seen = {}, false, 5, {}
for i = 1, n do
  local cur = seen[KEYS[i]]  -- an item written twice: one view, changed in turn
  if cur == nil then
    cur = {}
    local flat = redis.call('HGETALL', KEYS[i])
    for j = 1, #flat, 2 do cur[flat[j]] = flat[j + 1] end
    seen[KEYS[i]] = cur
  end
  local it = {resource = ARGV[pos], steps = {}, ok = true, cur = cur, exists = next(cur) ~= nil}
  local count = tonumber(ARGV[pos + 1])
  pos = pos + 2
  for s = 1, count do
    local field, shape = ARGV[pos], ARGV[pos + 1]
    local v = cur[field] or false
    if not holds(shape, v, ARGV[pos + 2], ARGV[pos + 3], ARGV[pos + 4], ARGV[pos + 5]) then
      it.ok = false
    end
    it.steps[s] = {field, shape, ARGV[pos + 3], ARGV[pos + 2]}
    pos = pos + 6
  end
  if not it.ok then failed = true end
  items[i] = it
end
if claim and redis.call('EXISTS', KEYS[2 * n + 1]) == 1 then return {'claimed'} end
local function flatten(cur)
  local all = {1}
  for field, value in pairs(cur) do all[#all + 1] = field; all[#all + 1] = value end
  return all
end
local out = {}
if failed then
  out[1] = 'condition'
  for i = 1, n do
    if items[i].ok or not items[i].exists then out[i + 1] = {0}
    else out[i + 1] = flatten(items[i].cur) end
  end
  return out
end
out[1] = 'ok'
for i = 1, n do
  local cur, set, gone = items[i].cur, {'HSET', KEYS[i], '#', ARGV[4]}, {}
  for _, st in ipairs(items[i].steps) do
    local field, shape, amount = st[1], st[2], st[3]
    local new = nil
    if shape == 'drop' then
      cur[field] = nil
      gone[#gone + 1] = field
    elseif shape == 'queue' or shape == 'refund' then
      new = add(cur[field] or '0', amount)
    elseif shape == 'clamp' then
      local v = cur[field]
      if v == nil or cmp(v, st[4]) < 0 then v = st[4] end
      new = add(v, amount)
    elseif shape ~= 'check' then
      new = amount
    end
    if new ~= nil then
      cur[field] = new
      set[#set + 1] = field
      set[#set + 1] = new
    end
  end
  cur['#'] = ARGV[4]
  redis.call(unpack(set))
  if #gone > 0 then redis.call('HDEL', KEYS[i], unpack(gone)) end
  redis.call('PEXPIRE', KEYS[i], ttl)
  redis.call('ZADD', KEYS[n + i], 0, items[i].resource)
  if redis.call('PTTL', KEYS[n + i]) < tonumber(ttl) then
    redis.call('PEXPIRE', KEYS[n + i], ttl)
  end
  out[i + 1] = flatten(cur)
end
if claim then redis.call('SET', KEYS[2 * n + 1], '1', 'PX', ttl) end
return out
"""
)

# KEYS: the claim key; ARGV: expiry ms
_CLAIM = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 'ok' end
return 'claimed'
"""

# KEYS: the entity's listing key; ARGV: bucket key prefix, after ('' = start), page size
_LIST = """
local page, out, count, last, more = tonumber(ARGV[3]), {}, 0, '', false
local from = '-'
if ARGV[2] ~= '' then from = '(' .. ARGV[2] end
while not more do
  local names = redis.call('ZRANGEBYLEX', KEYS[1], from, '+', 'LIMIT', 0, page)
  if #names == 0 then break end
  for _, r in ipairs(names) do
    local all = redis.call('HGETALL', ARGV[1] .. r)
    if #all == 0 then
      redis.call('ZREM', KEYS[1], r)
    elseif count == page then
      more = true
      break
    else
      out[#out + 1] = r
      out[#out + 1] = all
      count = count + 1
      last = r
    end
  end
  from = '(' .. names[#names]
end
if more then return {last, out} end
return {'', out}
"""

# KEYS: one hash; the flat HGETALL of it
_READ = "return redis.call('HGETALL', KEYS[1])"

# KEYS: entity record, stored limits
_READ_ENTITY = "return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}"

# KEYS: entity record; ARGV: cascade (0/1), parent ('' = none)
_PUT_ENTITY = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'cascade', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'parent', ARGV[2]) end
return 'ok'
"""

# KEYS: stored limits; ARGV: resource, limits (JSON; '' = delete)
_PUT_LIMITS = """
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 'ok'
"""

# KEYS: the schema key; ARGV: mode ('read', 'stamp' VERSION, 'create')
_SCHEMA = """
if ARGV[1] == 'read' then return redis.call('GET', KEYS[1]) end
if ARGV[1] == 'create' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
  return 'ok'
end
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then return 'ok' end
return 'exists'
"""

# KEYS: the schema key (routes the script to the store's node); ARGV: key pattern.
# Every key of the store shares its hash tag, so one node's SCAN sees them all.
_DROP = """
local cursor, dropped = '0', 0
repeat
  local found = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = found[1]
  for _, key in ipairs(found[2]) do dropped = dropped + redis.call('DEL', key) end
until cursor == '0'
return dropped
"""

SCRIPTS: Mapping[str, str] = {
    "write": _WRITE,
    "claim": _CLAIM,
    "list": _LIST,
    "read": _READ,
    "read_entity": _READ_ENTITY,
    "put_entity": _PUT_ENTITY,
    "put_limits": _PUT_LIMITS,
    "schema": _SCHEMA,
    "drop": _DROP,
}
"""Every script the store runs, by name (loaded once per client)."""


@dataclass(frozen=True)
class Call:
    """One script run: its name, keys and arguments."""

    script: str
    keys: tuple[str, ...]
    args: tuple[str | int, ...] = ()


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _bucket(flat: Sequence[Any]) -> dict[str, int]:
    return {k: int(v) for k, v in _pairs(flat).items() if not k.startswith(_MARKER)}


def _item(answer: Sequence[Any]) -> Bucket | None:
    """A script's ``{0}`` (no item) or ``{1, field, value, ...}``."""
    return None if int(answer[0]) == 0 else _bucket(answer[1:])


class Scripts:
    """Operations as script calls on one prefix, and the scripts' answers as replies.

    Pure: ``clock`` only turns the engine's absolute ``ttl`` into an expiry in ms.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, clock: Callable[[], float] = time.time):
        self.prefix = check_prefix(prefix)
        self.clock = clock
        self.tag = "{" + prefix + "}"

    # -- keys -------------------------------------------------------------------------------
    def key(self, entity_id: str, sk: str) -> str:
        """The key of an entity's item (``sk`` as in the DynamoDB layout)."""
        return f"{self.tag}{entity_pk(entity_id)}#{sk}"

    def bucket(self, key: BucketKey) -> str:
        """The key of a bucket item."""
        return self.key(key.entity_id, bucket_sk(key.resource))

    def listing(self, entity_id: str) -> str:
        """The key of an entity's sorted set of bucket resources."""
        return self.key(entity_id, "R")

    def claim(self, entity_id: str, claim: str) -> str:
        """The key of a claim."""
        return self.key(entity_id, claim_key(entity_id, claim)["SK"]["S"])

    @property
    def schema(self) -> str:
        """The key of the schema stamp."""
        return f"{self.tag}#META"

    def expiry_ms(self, ttl: int) -> int:
        """The engine's ``ttl`` (epoch seconds) as milliseconds from now, at least
        :data:`MIN_EXPIRY_MS` and at most :data:`MAX_EXPIRY_MS`."""
        return min(MAX_EXPIRY_MS, max(MIN_EXPIRY_MS, int((ttl - self.clock()) * 1000)))

    # -- operation -> call (None: answered without a round trip) -----------------------------
    def encode(self, op: Op) -> Call | Reply:
        """The script call for ``op`` (or, when no round trip is needed, the reply)."""
        if isinstance(op, WriteBuckets):
            return self._write(op)
        if isinstance(op, CreateClaim):
            return Call("claim", (self.claim(op.entity_id, op.claim),), (self.expiry_ms(op.ttl),))
        if isinstance(op, ReadBucket):
            return Call("read", (self.bucket(op.key),))
        if isinstance(op, ListBuckets):
            if op.resource is not None:
                return Call("read", (self.bucket(BucketKey(op.entity_id, op.resource)),))
            prefix = self.key(op.entity_id, bucket_sk(""))
            return Call("list", (self.listing(op.entity_id),), (prefix, op.after or "", PAGE))
        if isinstance(op, ReadEntity):
            keys = (self.key(op.entity_id, ENTITY_SK), self.key(op.entity_id, LIMITS_PREFIX))
            return Call("read_entity", keys)
        if isinstance(op, PutEntity):
            args = ("1" if op.cascade else "0", op.parent_id or "")
            return Call("put_entity", (self.key(op.entity_id, ENTITY_SK),), args)
        if isinstance(op, PutLimits | DeleteLimits):
            resource = ANY_RESOURCE if op.resource is None else op.resource
            data = (
                json.dumps([lim.to_dict() for lim in op.limits])
                if isinstance(op, PutLimits)
                else ""
            )
            return Call("put_limits", (self.key(op.entity_id, LIMITS_PREFIX),), (resource, data))
        if isinstance(op, ReadSchema):
            return Call("schema", (self.schema,), ("read",))
        if isinstance(op, StampSchema):
            return Call("schema", (self.schema,), ("stamp", op.version))
        if isinstance(op, CreateTable):
            return Call("schema", (self.schema,), ("create",))
        if isinstance(op, TableStatus):
            return Reply(True)
        if isinstance(op, EnableExpiry):
            return Reply()  # every bucket, listing and claim key expires anyway
        if isinstance(op, DeleteTable):
            # A prefix holds no glob character (check_prefix): the tag matches itself.
            return Call("drop", (self.schema,), (self.tag + "*",))
        raise TypeError(f"not a store operation: {op!r}")

    def _write(self, op: WriteBuckets) -> Call:
        expiry = self.expiry_ms(op.ttl)
        keys = [self.bucket(w.key) for w in op.writes]
        keys += [self.listing(w.key.entity_id) for w in op.writes]
        if op.claim is not None:
            keys.append(self.claim(*op.claim))
        args: list[str | int] = [
            expiry,
            len(op.writes),
            int(op.claim is not None),
            op.ttl,
        ]
        for w in op.writes:
            args += [w.key.resource, len(w.steps)]
            for s in w.steps:
                args += [
                    s.limit.key,
                    s.shape.value,
                    str(s.now),
                    str(s.amount),
                    "" if s.bound is None else str(s.bound),
                    "" if s.expected is None else str(s.expected),
                ]
        return Call("write", tuple(keys), tuple(args))

    # -- answer -> reply --------------------------------------------------------------------
    def decode(self, op: Op, answer: Any) -> Reply:
        """The reply to ``op`` whose script answered ``answer``."""
        if isinstance(op, WriteBuckets):
            status = str(answer[0])
            if status == "claimed":
                return Reply(code=CLAIMED, message="redis: the claim exists")
            items = tuple(_item(a) for a in answer[1:])
            if status == "condition":
                return Reply(code=CONDITION, message="redis: condition failed", current=items)
            return Reply(items)
        if isinstance(op, CreateClaim):
            if answer == "claimed":
                return Reply(code=CLAIMED, message="redis: the claim exists")
            return Reply()
        if isinstance(op, ReadBucket):
            return Reply(_bucket(answer))
        if isinstance(op, ListBuckets):
            if op.resource is not None:
                return Reply(({op.resource: _bucket(answer)} if answer else {}, None))
            after, flat = answer
            page = {str(flat[i]): _bucket(flat[i + 1]) for i in range(0, len(flat), 2)}
            return Reply((page, str(after) or None))
        if isinstance(op, ReadEntity):
            record, stored = _pairs(answer[0]), _pairs(answer[1])
            limits = {
                res: tuple(Limit.from_dict(d) for d in json.loads(text))
                for res, text in stored.items()
            }
            return Reply(
                EntityRecord(
                    bool(record), record.get("parent"), record.get("cascade") == "1", limits
                )
            )
        if isinstance(op, ReadSchema):
            return Reply(None if answer is None else int(answer))
        if isinstance(op, StampSchema | CreateTable):
            if answer == "exists":
                return Reply(code=EXISTS, message="redis: the schema is stamped already")
            return Reply(True) if isinstance(op, CreateTable) else Reply()
        return Reply()

    def failure(self, op: Op, exc: BaseException) -> Reply:
        """The reply for a client exception; raises the engine's error when no reply came
        (connection refused, reset or timed out) or the configuration is wrong."""
        from redis import exceptions as rx

        text = f"redis: {type(exc).__name__}: {exc}"
        if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
            raise RateLimiterUnavailable(f"redis refused the credentials: {exc}") from exc
        if isinstance(exc, rx.OutOfMemoryError):  # maxmemory reached: load, not a bug
            return Reply(code=THROTTLED, message=text)
        if isinstance(
            exc, rx.BusyLoadingError | rx.ReadOnlyError | rx.TryAgainError | rx.ClusterError
        ) or str(exc).startswith("BUSY"):
            # Loading, a replica being promoted, a slot moving, a long script: retry.
            return Reply(code=UNAVAILABLE, message=text)
        if isinstance(exc, rx.ConnectionError | rx.TimeoutError | OSError):
            raise EndpointUnreachable(f"redis unavailable: {exc}") from exc
        if isinstance(exc, rx.RedisError):
            return Reply(code=ERROR, message=text)
        raise exc


def check_prefix(prefix: Any) -> str:
    """A store prefix (the keys' hash tag), or a ValidationError."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValidationError(
            "prefix", f"{prefix!r}", "1..64 letters, digits and _ . : - (no braces or #)"
        )
    return prefix


def _redis_module() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise ZaeError("the Redis store needs redis-py: pip install 'zae-celery[redis]'") from exc
    return redis


def _client_options() -> dict[str, Any]:
    """Short timeouts and no client retries: a limiter fails fast and the engine's retry
    policy and breaker decide (the URL's own ``socket_timeout``... take precedence)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "decode_responses": True,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": READ_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }


class RedisStore:
    """A Redis (or Valkey) server or cluster as the limiter's store.

    Args:
        url: a redis-py URL: ``redis://[[user]:password@]host:port/db``, ``rediss://``
            for TLS (with redis-py's URL options, e.g. ``?ssl_cert_reqs=required``).
        prefix: the keys' prefix and cluster hash tag; stores of different prefixes
            share nothing.
        cluster: the URL names a node of a Redis Cluster (``redis+cluster://`` in
            :func:`~.from_url`).
        clock: seconds since the epoch, to turn the engine's expiry times into durations
            (the limiter's clock when it creates the store from a URL).
    """

    name = "redis"
    clamps = True
    """The scripts compute the refill clamp (``max(TAT, now)``): the engine writes CLAMP
    steps, one write per grant whatever the bucket's state, and every write returns the
    new values of its items."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        cluster: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://")):
            raise ValidationError("url", f"{url!r}", "a redis:// or rediss:// URL")
        self.scripts = Scripts(prefix, clock)
        self.url = url
        self.cluster = bool(cluster)
        self._client: Any = None
        self._sync: dict[str, Any] = {}
        self._pid = 0
        self._lock = threading.Lock()
        self._aclient: Any = None
        self._async: dict[str, Any] = {}
        self._alock: asyncio.Lock | None = None

    @property
    def prefix(self) -> str:
        """The keys' prefix (the cluster hash tag)."""
        return self.scripts.prefix

    @property
    def table_name(self) -> str:
        """What the CLI and the logs show for the store (the prefix)."""
        return self.prefix

    def __repr__(self) -> str:
        where = self.url.rsplit("@", 1)[-1]  # never show a password
        kind = "cluster " if self.cluster else ""
        return f"<RedisStore {kind}prefix={self.prefix!r} at {where}>"

    # -- sync (redis-py) --------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The redis-py client of this process (created on first use; a child process
        after ``fork`` makes its own)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    redis = _redis_module()
                    factory = redis.cluster.RedisCluster if self.cluster else redis.Redis
                    client = factory.from_url(self.url, **_client_options())
                    self._sync = {n: client.register_script(s) for n, s in SCRIPTS.items()}
                    self._client, self._pid = client, os.getpid()
        return self._client

    def send(self, op: Op) -> Reply:
        """Run ``op``'s script and return the reply (sync)."""
        call = self.scripts.encode(op)
        if isinstance(call, Reply):
            return call
        try:
            client = self.client
            answer = self._sync[call.script](keys=call.keys, args=call.args, client=client)
            return self.scripts.decode(op, answer)
        except ZaeError:
            raise
        except Exception as exc:
            return self.scripts.failure(op, exc)

    def dump(self) -> dict[str, Any]:
        """Everything stored under the prefix, as plain data by key; for tests and
        debugging (it scans: not for the hot path)."""
        client = self.client
        found: dict[str, Any] = {}
        for key in client.scan_iter(match=self.scripts.tag + "*", count=1000):
            kind = client.type(key)
            value: Any = {
                "hash": client.hgetall,
                "zset": lambda k: client.zrange(k, 0, -1),
                "string": client.get,
            }[kind](key)
            found[key] = value
        return dict(sorted(found.items()))

    # -- asyncio (redis.asyncio) ------------------------------------------------------------
    async def aclient(self) -> Any:
        """The ``redis.asyncio`` client (created on first use, closed by :meth:`aclose`)."""
        if self._alock is None:
            self._alock = asyncio.Lock()
        if self._aclient is None:
            async with self._alock:
                if self._aclient is None:
                    _redis_module()  # a clear error when redis-py is missing
                    import redis.asyncio as aredis
                    import redis.asyncio.cluster as acluster

                    factory = acluster.RedisCluster if self.cluster else aredis.Redis
                    client = factory.from_url(self.url, **_client_options())
                    self._async = {n: client.register_script(s) for n, s in SCRIPTS.items()}
                    self._aclient = client
        return self._aclient

    async def asend(self, op: Op) -> Reply:
        """Run ``op``'s script and return the reply (asyncio)."""
        call = self.scripts.encode(op)
        if isinstance(call, Reply):
            return call
        try:
            client = await self.aclient()
            answer = await self._async[call.script](keys=call.keys, args=call.args, client=client)
            return self.scripts.decode(op, answer)
        except ZaeError:
            raise
        except Exception as exc:
            return self.scripts.failure(op, exc)

    async def aclose(self) -> None:
        """Close the async client's connections (the sync client needs no closing)."""
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.aclose()
