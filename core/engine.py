"""Every decision of the limiter, written once, as generators that yield operations.

Each decision is a generator (a *flow*) that yields the store-neutral operations of
:mod:`.ops` and receives a :class:`~.ops.Reply` for each. The sync and async limiters
only run these flows against a store (DynamoDB, memory): they send each operation and
hand back the reply
(the sans-I/O style), so both make identical decisions for identical inputs.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from . import bucket, inflight, settle, shards
from .bucket import Step
from .errors import (
    LeaseClaimed,
    LimitStatus,
    RateLimiterUnavailable,
    RateLimitExceeded,
    RequestExceedsBurst,
    ValidationError,
)
from .lease import (
    LeaseState,
    Reported,
    Slot,
    Target,
    start_tracks,
    started_at_slot,
    tracked,
    with_start_track,
)
from .limits import INFLIGHT, Limit, check_tokens, format_rate
from .ops import (
    CLAIMED,
    CONDITION,
    Bucket,
    BucketKey,
    CreateClaim,
    Flow,
    ItemWrite,
    ListBuckets,
    ReadBucket,
    Reply,
    Sleep,
    WriteBuckets,
)
from .ops import tat as _tat
from .records import Clock, EntityConfig, Records, merge, remember
from .schema import ANY_RESOURCE, check_id
from .validation import check_amounts, check_horizon, check_limits

__all__ = [
    "BucketStatus",
    "Clock",
    "Engine",
    "EntityConfig",
    "Flow",
    "LeaseState",
    "OnUnavailable",
    "Step",
    "Target",
]

log = logging.getLogger("zae_celery.core")

_ATTRIBUTE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*)@(?P<amount>\d+)/(?P<period>\d+)$")
"""A limit's attribute in a bucket item (see ``Limit.key``); start tracks end in ``~start``."""


@dataclass(frozen=True)
class BucketStatus:
    """One limit's state in one bucket, as :meth:`RateLimiter.buckets` reads it.

    ``burst`` and ``available`` are None for an attribute whose limit is not known (not
    passed, not stored): only the tokens in use can be told from its state then.
    """

    entity_id: str
    resource: str
    limit_name: str
    refill_amount: int
    refill_period_ms: int
    burst: int | None
    available: float | None
    in_use: float
    full_in: float
    """Seconds until the bucket is full again (0: full)."""
    source: str | None = None
    """Where the limit comes from: ``"resource"`` (stored for this resource), ``"entity"``
    (stored for every resource of the entity), ``"code"`` (passed by the caller), or None
    (known to neither: only the bucket's state names it)."""
    used: bool = True
    """False when the store holds no state for this limit: nothing consumed from it yet
    (or not since its item expired, a day after it was last full): the bucket is full."""
    charged: int | None = None
    """The tokens charged to the bucket since its item was created (grants, debt and
    surcharges, less refunds; not provider blocks): two reads' difference is what was
    charged in between. None before the first charge (or from an older client only)."""
    blocks: int = 0
    """Provider blocks (a 429's retry-after) written on the bucket's item so far."""
    inflight: bool = False
    """An in-flight cap (``Limit.concurrent``): ``burst`` is its ``n``, ``in_use`` the
    slots held, ``available`` those free; ``refill_period_ms`` is a slot's expiry."""

    @property
    def in_debt(self) -> bool:
        """True while more tokens are owed than the bucket holds (negative available)."""
        return self.available is not None and self.available < 0

    @property
    def rate(self) -> str:
        """The limit's rate as its text form shows it (``480/m``; a cap: ``8/inflight``)."""
        if self.inflight:
            return f"{self.burst}/{INFLIGHT}"
        return format_rate(self.refill_amount, self.refill_period_ms)


T = TypeVar("T")
CONTENDED_MS = 10_000
"""How long a bucket counts as contended after this process lost an idle-shape race."""
HERD_MAX_MS = 2_000
"""The widest random spread added to a refusal's exact wait (see ``Engine._refusal``):
8 clients in a naive retry loop on one bucket need about a second of it."""
HERD_HALF_LIFE_MS = 3_000
"""A bucket's spread halves every this many ms without a lost race (see ``_refusal``)."""
SHARD_TRIES = 2
"""Most writes one request of a spread bucket makes to find a shard that grants it."""
OnUnavailable = Literal["closed", "open"]
Item = Bucket


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
"""Every engine of this process: a forked child forgets their held refunds."""


def _after_fork() -> None:
    for engine in list(_ENGINES):
        engine._forget_held()


os.register_at_fork(after_in_child=_after_fork)


class Engine(Records):
    """Limiter state shared by the sync and async front ends, and their decisions."""

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        on_unavailable: OnUnavailable = "closed",
        stored_config: bool = True,
        config_ttl: float = 60.0,
        max_attempts: int = 12,
        local_refusals: bool = True,
        clamp: bool = False,
    ) -> None:
        if on_unavailable not in ("closed", "open"):
            raise ValidationError("on_unavailable", f"{on_unavailable!r}", "'closed' or 'open'")
        super().__init__(clock=clock, stored_config=stored_config, config_ttl=config_ttl)
        self.on_unavailable: OnUnavailable = on_unavailable
        self.max_attempts = max_attempts
        self.local_refusals = local_refusals
        self.clamp = clamp
        """The store computes the refill clamp (CLAMP writes, new values of every item)."""
        self.unavailable_grants = 0
        self._tats: dict[tuple[str, str, str], int | None] = {}
        self._busy: set[tuple[str, str, str]] = set()
        self._contended: dict[tuple[str, str, str], int] = {}
        """Buckets whose idle-shape write this process lost to another client's, until
        when (ms): their idle grants are counted a margin later (see ``_plan``)."""
        self._owed: dict[tuple[str, str, str], float] = {}
        """Fractions of surcharged tokens not charged yet (see ``_surcharged``)."""
        self._spread: dict[tuple[str, str], tuple[float, int]] = {}
        """Per bucket item: how widely this process spreads its refusals' retry_after
        (ms) and when that was set (ms): grown by every request another client's grant
        beat, halved every ``HERD_HALF_LIFE_MS`` since."""
        self.random = random.Random()
        """The source of the spread (seed it in a test to fix the draws)."""
        self.settle_delay_ms = 0
        """How long a refund may wait for a later write of this process to the same item
        (0: every settle writes at once); see :mod:`.settle`."""
        self.on_hold: Callable[[int], None] | None = None
        """Called (with the due time, ms) when a refund starts waiting: a limiter's
        flusher schedules itself by it."""
        self._waiting: dict[tuple[str, str], settle.Held] = {}
        self._unsure: set[tuple[str, str]] = set()
        """Items this process wrote without learning their new values (a transaction):
        its view of them may lag its own writes, so a refusal it did not foresee there
        is no sign of other clients (see ``_refusal``)."""
        self._tats_lock = threading.Lock()
        _ENGINES.add(self)

    # -- time and caches ----------------------------------------------------------------
    def now_ms(self) -> int:
        """The injected clock, in integer milliseconds."""
        return math.floor(self.clock() * 1000)

    def _guess(self, target: Target, limit: Limit) -> int | None:
        return self._tats.get((target.entity_id, target.resource, limit.key))

    def _shape_guess(self, target: Target, limit: Limit, now_ms: int) -> int | None:
        """The TAT to choose a write's shape by (never a refusal: see ``_guess``).

        A bucket this process last saw queued (its TAT ahead of the clock) is guessed
        queued still while that view is younger than the bucket's burst: other clients
        keep a busy bucket busy, and a fresh-bucket guess would fail its condition on
        every write that follows a pause (a worker that waited for a free process)."""
        key = (target.entity_id, target.resource, limit.key)
        tat = self._tats.get(key)
        now = bucket.now_units(limit, now_ms)
        if key in self._busy and tat is not None and now - bucket.tau(limit) < tat <= now:
            return now + 1
        known_idle = tat is not None and tat <= now
        if target.shard is not None and known_idle and self._siblings_busy(target, limit, now):
            return now + 1
        return tat

    def _siblings_busy(self, target: Target, limit: Limit, now: int) -> bool:
        """Whether another shard of the same bucket was last seen queued ahead of
        ``now`` (the shards of a bucket share its load). Asked only of a shard this
        process saw before: one it never saw may not exist yet, and a queue add on a
        missing item fails and costs a read."""
        assert target.shard is not None
        for index in range(target.shard.count):
            if index == target.shard.index:
                continue
            resource = shards.item_resource(target.shard.resource, index)
            key = (target.entity_id, resource, limit.key)
            tat = self._tats.get(key)
            if key in self._busy and tat is not None and tat > now:
                return True
        return False

    def _note_shapes(self, target: Target, steps: Sequence[Step], now_ms: int) -> None:
        """After a granted write: a QUEUE write found the bucket busy, a FRESH one idle
        (unless it was written at a later start, which leaves the bucket busy)."""
        for step in steps:
            key = (target.entity_id, target.resource, step.limit.key)
            later = step.now > bucket.now_units(step.limit, now_ms)
            if step.shape is bucket.Shape.QUEUE or (step.shape is bucket.Shape.FRESH and later):
                self._busy.add(key)
            elif step.shape is bucket.Shape.FRESH:
                self._busy.discard(key)

    def _note_lost(
        self, target: Target, steps: Sequence[Step], item: Item | None, now_ms: int
    ) -> None:
        """After a refused write: a FRESH step that found the bucket already beyond its
        clock lost a race to another client (its later ``now`` landed first). Such a
        bucket is contended for ``CONTENDED_MS``."""
        for step in steps:
            tat = _tat(item, step.limit)
            if step.shape is bucket.Shape.FRESH and tat is not None and tat > step.now:
                key = (target.entity_id, target.resource, step.limit.key)
                with self._tats_lock:
                    remember(self._contended, key, now_ms + CONTENDED_MS, self.cache_size)

    def _pushed_ms(
        self, target: Target, item: Item, now_ms: int, steps: Sequence[Step] = ()
    ) -> int:
        """How far other clients pushed ``item``'s limits past this process's view of
        them (ms of refill, the most of any limit): the tokens they took that neither the
        view nor ``steps`` (this process's own write to the item, when it was granted)
        account for. A TAT at or below the clock is a full bucket. A limit that this
        write padded or refunded tells nothing (its own amount is not a grant's cost)."""
        mine: dict[str, list[Step]] = {}
        for step in steps:
            mine.setdefault(step.limit.key, []).append(step)
        worst = 0
        for lim in target.limits:
            new = _tat(item, lim)
            if new is None:
                continue
            base, cost = bucket.now_units(lim, now_ms), 0
            for step in mine.get(lim.key, ()):
                own = bucket.cost(lim, step.tokens)
                if step.shape is bucket.Shape.REFUND or (
                    step.shape is bucket.Shape.QUEUE and step.amount != own
                ):
                    break
                base, cost = max(base, step.now), cost + own
            else:
                seen = self._guess(target, lim)
                base = base if seen is None else max(base, seen)
                worst = max(worst, (new - cost - base) // lim.refill_amount)
        return worst

    def _note_others(
        self, targets: tuple[Target, ...], writes: list[ItemWrite], reply: Reply, now_ms: int
    ) -> None:
        """A grant whose reply shows other clients' grants since this process's view:
        the item's spread (see :meth:`_refusal`) is at least how far they pushed it, so
        that this process's first refusal there is already spread."""
        for t, w, item in zip(targets, writes, reply.value, strict=False):
            pushed = 0 if item is None else self._pushed_ms(t, item, now_ms, w.steps)
            if pushed <= 0:
                continue
            key = (t.entity_id, t.whole_resource)
            with self._tats_lock:
                if pushed > self._spread_at(key, now_ms):
                    floor = float(min(HERD_MAX_MS, pushed))
                    remember(self._spread, key, (floor, now_ms), self.cache_size)

    def _refusal(
        self,
        violations: list[LimitStatus],
        passed: list[LimitStatus],
        lost: bool,
        pushed_ms: int = 0,
    ) -> RateLimitExceeded:
        """The refusal to raise, its ``retry_after`` spread against a herd.

        ``lost``: this process sent the write because its view predicted a grant, and
        another client's grant got there first. Each such loss on an item doubles the
        item's spread and adds the exact wait, or sets it to ``pushed_ms`` (how far other
        clients pushed the bucket past this process's view: :meth:`_pushed_ms`) when that
        is more, at most ``HERD_MAX_MS``; a grant whose reply shows such pushes raises it
        to them as well (:meth:`_note_others`). The spread halves every
        ``HERD_HALF_LIFE_MS`` after. The refusal's ``jitter`` is drawn uniformly
        below the spread, so the clients a grant beat come back over a window that widens
        until few of them lose again, instead of all at the one instant the bucket named.
        The spread decays with time, not with this process's grants, so a client that
        keeps winning gets no shorter waits than the ones it beat (binary backoff's
        capture effect). A lone client never loses a race: its waits stay exact. A
        refusal by in-flight caps alone keeps its polling interval as it is."""
        rated = [v for v in violations if not v.inflight]
        if not rated:
            return RateLimitExceeded(violations, passed)
        keys = {(v.entity_id, v.resource) for v in rated}
        now_ms = self.now_ms()
        wait_ms = math.ceil(max(v.retry_after for v in rated) * 1000)
        with self._tats_lock:
            spreads = {key: self._spread_at(key, now_ms) for key in keys}
            if lost:
                for key, spread in spreads.items():
                    grown = max(2 * spread + wait_ms, pushed_ms)
                    spreads[key] = min(HERD_MAX_MS, grown)
                    remember(self._spread, key, (spreads[key], now_ms), self.cache_size)
        spread = max(spreads.values(), default=0.0)
        jitter = self.random.uniform(0, spread) / 1000 if spread else 0.0
        return RateLimitExceeded(violations, passed, jitter)

    def _spread_at(self, key: tuple[str, str], now_ms: int) -> float:
        """An item's spread (ms) at ``now_ms``: as last set, halved per half-life since."""
        spread, at_ms = self._spread.get(key, (0.0, now_ms))
        return float(spread * 0.5 ** (max(0, now_ms - at_ms) / HERD_HALF_LIFE_MS))

    def _contended_now(self, target: Target, limit: Limit, now_ms: int) -> bool:
        key = (target.entity_id, target.resource, limit.key)
        return self._contended.get(key, 0) > now_ms

    def _note_seen(self, target: Target, item: Item | None, now_ms: int) -> None:
        """After a refused write or a read: busy when its TAT is ahead of the clock."""
        for lim in target.limits:
            key = (target.entity_id, target.resource, lim.key)
            tat = _tat(item, lim)
            if tat is not None and tat > bucket.now_units(lim, now_ms):
                self._busy.add(key)
            else:
                self._busy.discard(key)

    def _remember(self, target: Target, item: Item | None) -> None:
        self._unsure.discard((target.entity_id, target.resource))
        for lim in target.limits:
            self._set_tat((target.entity_id, target.resource, lim.key), _tat(item, lim))

    def _set_tat(self, key: tuple[str, str, str], tat: int | None) -> None:
        """Remember a bucket's TAT; past ``cache_size`` buckets, the least recently
        written quarter is forgotten (a worker seeing millions of tenants stays bounded;
        a forgotten bucket only costs a wrong first guess)."""
        with self._tats_lock:
            for old in remember(self._tats, key, tat, self.cache_size):
                self._busy.discard(old)

    # -- targets --------------------------------------------------------------------------
    def _targets(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit],
        extra: Sequence[tuple[str, str, Sequence[Limit]]] = (),
    ) -> Flow[tuple[Target, ...]]:
        """Validate a request and resolve the buckets it touches (stored limits, cascade).

        ``extra`` adds further (entity, resource, limits) consumed in the same atomic write
        (e.g. a queue's limits): each of their limits takes the amount of the same name in
        ``consume``, or 1 when ``consume`` does not name it (one request).
        """
        check_id("entity_id", entity_id)
        check_id("resource", resource)
        code_limits = check_limits(limits)
        amounts = check_amounts("consume", consume, negative=False)
        yield from self.ensure_schema()
        own = code_limits
        chain: list[tuple[str, tuple[Limit, ...]]] = []
        if self.stored_config:
            config = yield from self._entity_config(entity_id)
            own = merge(code_limits, config.limits_for(resource))
            chain.append((entity_id, own))
            if config.cascade and config.parent_id:
                parent = yield from self._entity_config(config.parent_id)
                chain.append((config.parent_id, merge(code_limits, parent.limits_for(resource))))
        else:
            chain.append((entity_id, own))
        if not own:
            raise ValidationError(
                "limits", f"no limits for {entity_id}/{resource}", "pass limits or store them"
            )
        names = {lim.name for lim in own}
        for name in amounts:
            if name not in names:
                raise ValidationError(
                    f"consume.{name}", "is not a limit of this request", ", ".join(sorted(names))
                )
        result = []
        for ent, lims in chain:
            result.append(_target(ent, resource, lims, amounts, 0))
        for ent, res, extra_limits in extra:
            check_id("entity_id", ent)
            check_id("resource", res)
            checked = check_limits(extra_limits)
            if checked:
                result.append(_target(ent, res, checked, amounts, 1))
        return tuple(result)

    # -- acquire --------------------------------------------------------------------------
    def acquire(
        self,
        entity_id: str,
        resource: str,
        consume: Mapping[str, int],
        limits: Sequence[Limit],
        horizon: float = 0.0,
        slot: Slot | None = None,
    ) -> Flow[LeaseState]:
        """Grant ``consume`` now, or at a slot up to ``horizon`` seconds ahead, or refuse.

        ``slot`` (see :class:`~.transport.Slot`): further buckets consumed in the same
        write, and with ``pace`` a grant whose slot is at most ``start_within`` seconds
        ahead also counts its start on the start track at that slot, in the same write:
        the caller waits in place and starts exactly then. A later reservation does not
        (the caller calls :meth:`start` at its slot).
        In ``open`` mode an unavailable store grants an unchecked lease and logs a warning.
        """
        slot = slot or Slot()
        extra, pace, start_within = slot.extra, slot.pace, slot.start_within
        horizon_ms = check_horizon(horizon)
        within_ms = min(check_horizon(start_within), horizon_ms)
        targets: tuple[Target, ...] = ()
        try:
            targets = yield from self._targets(entity_id, resource, consume, limits, extra)
            lease = yield from self._grant_sharded(targets, horizon_ms, within_ms, pace, slot)
            if slot.caps_at_start and any(t.caps for t in targets):
                lease.targets, lease.caps_pending = targets, True  # taken by start()
            return lease
        except RateLimiterUnavailable as exc:
            now = self._unchecked(exc, "granting unchecked")
            # Nothing is consumed; the targets (when they could be resolved) stay with
            # the lease, so that usage reported later is charged if the store answers.
            return LeaseState(targets, {}, now, now, unchecked=True, started_ms=now)

    def _grant_sharded(
        self,
        whole: tuple[Target, ...],
        horizon_ms: int,
        within_ms: int,
        pace: bool,
        slot: Slot,
    ) -> Flow[LeaseState]:
        """:meth:`_grant` on one shard of each spread bucket (:mod:`.shards`).

        Each spread target takes the shard this process's view says grants soonest
        (ties drawn at random, so fresh clients spread out). A refused request for now
        (no horizon) tries the best shard it has not tried yet if the view says that
        one may grant, at most ``SHARD_TRIES`` writes in all; then the refusal stands.
        The view's waits are lower bounds (other clients only push a bucket further),
        so a shard it rules out surely cannot grant. A refused reservation does not try
        another: the shard it took was the soonest this process knew of, and when one
        shard's line reaches the horizon under overload the others' do too (in
        ``benchmarks.partition`` a second write there granted nothing more and cost
        0.10 write units per grant).
        """
        if all(t.shards == 1 for t in whole):
            return (yield from self._grant(whole, horizon_ms, within_ms, pace, slot))
        tried: set[tuple[str, str]] = set()
        chosen = self._shards_for(whole, tried)
        for attempt in range(SHARD_TRIES):
            assert chosen is not None
            tried.update((t.entity_id, t.resource) for t in chosen if t.shard)
            try:
                return (yield from self._grant(chosen, horizon_ms, within_ms, pace, slot))
            except RateLimitExceeded:
                if horizon_ms > 0 or attempt + 1 == SHARD_TRIES:
                    raise
                chosen = self._shards_for(whole, tried)
                if chosen is None or not self._may_grant_within(chosen, horizon_ms):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _shards_for(
        self, whole: Sequence[Target], tried: set[tuple[str, str]]
    ) -> tuple[Target, ...] | None:
        """Each target, a spread one as the untried shard predicted to grant soonest
        (None: every shard of some target was tried)."""
        now_ms = self.now_ms()
        chosen = []
        for target in whole:
            if target.shards == 1:
                chosen.append(target)
                continue
            options = [o for o in target.items() if (o.entity_id, o.resource) not in tried]
            if not options:
                return None
            waits = [self._predicted_wait(o, now_ms) for o in options]
            best = min(waits)
            best_options = [o for o, w in zip(options, waits, strict=True) if w == best]
            chosen.append(self.random.choice(best_options))
        return tuple(chosen)

    def _predicted_wait(self, target: Target, now_ms: int) -> int:
        """The least wait (ms) this process's view allows the target's request."""
        return max(
            bucket.retry_after_ms(lim, self._guess(target, lim), target.consume[lim.name], now_ms)
            for lim in target.limits
        )

    def _grant(
        self,
        targets: tuple[Target, ...],
        horizon_ms: int,
        within_ms: int,
        pace: bool,
        slot: Slot,
    ) -> Flow[LeaseState]:
        """The grant of :meth:`acquire` (without the caps when ``slot`` defers them)."""
        if slot.caps_at_start:
            targets = tuple(replace(t, caps=()) for t in targets)
        if not pace:
            return (yield from self._consume(targets, horizon_ms, align=True))
        paced = with_start_track(targets)
        if horizon_ms == 0 or self._may_grant_within(paced, within_ms):
            try:
                lease = yield from self._consume(paced, within_ms, align=True)
            except RateLimitExceeded as exc:
                if horizon_ms == 0 or exc.retry_after * 1000 > horizon_ms:
                    raise
            else:
                return started_at_slot(lease, targets)
        return (yield from self._consume(targets, horizon_ms))

    def _unchecked(self, exc: RateLimiterUnavailable, what: str) -> int:
        """``on_unavailable``: re-raise ``exc`` ("closed"), or count and log going on
        unchecked ("open") and return the time of it (ms)."""
        if self.on_unavailable == "closed":
            raise exc
        self.unavailable_grants += 1
        log.warning(
            "rate limiter unavailable, %s (on_unavailable=open, unchecked grants so far: %d): %s",
            what,
            self.unavailable_grants,
            exc,
        )
        return self.now_ms()

    def _may_grant_within(self, targets: Sequence[Target], within_ms: int) -> bool:
        # The cached TATs are lower bounds (other clients only push them further), so a
        # refusal they predict is certain: skip the attempt and reserve directly.
        now_ms = self.now_ms()
        return all(
            bucket.retry_after_ms(lim, self._guess(t, lim), t.consume[lim.name], now_ms)
            <= within_ms
            for t in targets
            for lim in t.limits
        )

    def start(self, lease: LeaseState, horizon: float = 0.0) -> Flow[float]:
        """Count a reserved lease's actual start on the start track (one write).

        Returns how many seconds to wait before starting: 0, or up to ``horizon`` when the
        start track has no token now (deferred messages arrived late and together) and a
        start slot was reserved on it instead; the waits of successive callers are spaced
        exactly by their cost, so starts stay within the burst. Beyond the horizon:
        RateLimitExceeded, nothing consumed.

        A lease with a ``claim`` also creates its claim item in the same transaction (one
        request still): a second start of the same reservation — another delivery of the
        same message — raises :class:`LeaseClaimed` and counts nothing. A lease whose start
        was already counted (it carries its start slot) only creates its claim item.
        In ``open`` mode an unavailable store starts the lease now, uncounted (its quota
        was consumed when it was reserved), and logs a warning with the running count.
        """
        try:
            claim = None
            if lease.claim is not None and lease.targets:
                claim = (lease.targets[0].entity_id, lease.claim)
            if lease.paced:
                if lease.caps_pending:
                    yield from self._take_caps(lease, claim)
                elif claim is not None:
                    yield from self._claim_alone(lease)
                if lease.started_ms is None:
                    lease.started_ms = self.now_ms()
                return 0.0
            tracks = start_tracks(lease.targets, caps=lease.caps_pending)
            counted = yield from self._consume(
                tracks, check_horizon(horizon), align=True, claim=claim
            )
        except RateLimiterUnavailable as exc:
            lease.started_ms = self._unchecked(exc, "the lease starts its reserved slot unchecked")
            return 0.0
        lease.start_tracked = True
        lease.started_ms = counted.start_ms
        _holding(lease, counted)
        return counted.wait

    def _take_caps(self, lease: LeaseState, claim: tuple[str, str] | None) -> Flow[None]:
        """Take the slots a lease deferred to its start (with its claim: one write)."""
        caps_only = tuple(
            Target(t.entity_id, t.resource, (), {}, t.caps) for t in lease.targets if t.caps
        )
        taken = yield from self._consume(caps_only, 0, claim=claim)
        _holding(lease, taken)

    def free_slots(self, lease: LeaseState) -> Flow[None]:
        """Free the in-flight slots a lease holds, keeping the lease (one write; none
        without slots): it takes them again at its next :meth:`start` (a task deferred
        after its start must not hold them while it waits in the broker)."""
        if lease.closed or not lease.holds_slots:
            return
        yield from self._charge(lease, {}, free=True)
        lease.slot, lease.caps_pending = None, True

    def _claim_alone(self, lease: LeaseState) -> Flow[None]:
        """Create the claim item of a lease whose start was counted before (one write)."""
        now_ms = self.now_ms()
        ttl = self._ttl(now_ms, max(0, (lease.started_ms or now_ms) - now_ms), None, lease.targets)
        reply = yield CreateClaim(lease.targets[0].entity_id, str(lease.claim), ttl)
        if reply.code == CLAIMED:
            raise LeaseClaimed("this reservation was already started by another delivery")
        self._raise_for(reply)

    def block(
        self, entity_id: str, resource: str, limits: Sequence[Limit], seconds: float
    ) -> Flow[None]:
        """Empty the buckets until ``seconds`` from now (a provider said 429 Retry-After).

        Every limit is pushed to "no tokens before now + seconds" unless it is already
        further in debt; never refused, at most two writes (per shard of a spread bucket).
        """
        check_id("entity_id", entity_id)
        check_id("resource", resource)
        # The start track too: tasks already holding reservations must not start
        # during the block either.
        checked = tuple(lim for lim in check_limits(limits) if not lim.inflight)
        if not checked:
            return  # in-flight caps only: a slot is held by a call, not by time
        wait_ms = check_horizon(seconds)
        for item in Target(entity_id, resource, checked, {}).items():  # every shard
            yield from self._block_item(item, wait_ms)

    def _block_item(self, target: Target, wait_ms: int) -> Flow[None]:
        """:meth:`block` on one item (its limits and their start tracks)."""
        checked = target.limits + tuple(lim.start_track() for lim in target.limits)
        target = replace(target, limits=checked, consume={lim.name: 0 for lim in checked})
        pending = list(checked)
        for _ in range(self.max_attempts):
            if not pending:
                return
            now_ms = self.now_ms()
            steps = [
                Step(
                    lim,
                    0,
                    bucket.Shape.RAISE,
                    bucket.now_units(lim, now_ms),
                    bucket.now_units(lim, now_ms + wait_ms) + bucket.tau(lim),
                )
                for lim in pending
            ]
            blocks = Step(checked[0].counter("blocks"), 1, bucket.Shape.REFUND, 0, 1)
            reply = yield WriteBuckets(
                (ItemWrite(target.key, (*steps, blocks)),),
                self._ttl(now_ms, wait_ms, None, [target]),
            )
            if reply.ok:
                self._remember(target, reply.value[0])
                return
            current: Sequence[Item | None] = _refused(self, reply)
            if current[0] is None:
                current = yield from self._read([target])
            self._remember(target, current[0])
            pending = [
                step.limit for step in steps if (_tat(current[0], step.limit) or 0) < step.amount
            ]
        raise RateLimiterUnavailable(
            f"gave up after {self.max_attempts} conditional writes lost to contention"
        )

    def _consume(
        self,
        targets: tuple[Target, ...],
        horizon_ms: int,
        align: bool = False,
        claim: tuple[str, str] | None = None,
    ) -> Flow[LeaseState]:
        # TATs only grow (but for refunds), so the last values this process saw are
        # lower bounds: a refusal they predict is certain, and costs no request.
        now_ms = self.now_ms()
        violations, passed = self._statuses(targets, self._seen(targets), now_ms, horizon_ms)
        foreseen = bool(violations)  # then a refusal by the store lost no race
        # Nor did one on an item whose view lags this process's own writes.
        lagging = any((t.entity_id, t.resource) in self._unsure for t in targets)
        lost = not (foreseen or lagging)  # what a refusal by the store below means
        if foreseen and self.local_refusals:
            raise self._refusal(violations, passed, lost=False)
        known: Sequence[Item | None] | None = None
        atomic_many = len(targets) > 1 or claim is not None
        slot = uuid.uuid4().hex[:16] if any(t.caps for t in targets) else None
        for attempt in range(self.max_attempts):
            if attempt >= 2:
                yield _backoff(attempt)
            now_ms = self.now_ms()
            clamp = self.clamp
            exact = not clamp and known is not None and atomic_many and horizon_ms > 0
            # A DynamoDB transaction returns no new values: only EXACT writes tell where a
            # reservation landed, so a first blind attempt asks for an immediate grant. A
            # clamping store returns every item's values: its writes are never blind.
            h = horizon_ms if (clamp or not atomic_many or exact) else 0
            fold = align and len(targets) == 1  # the alignment rides in the grant
            writes, carried = [], []
            for i, t in enumerate(targets):
                seen = None if known is None else (known[i],)
                steps, taken, due = self._carry(
                    t, self._plan(t, seen, now_ms, h, exact, fold), seen, now_ms
                )
                caps = _caps_taken(t, None if known is None else known[i], slot, now_ms)
                writes.append(ItemWrite(t.key, caps + settle.counted(steps, taken)))
                carried.append((t, taken, due))
            ttl = self._ttl(now_ms, horizon_ms, None, targets)
            reply = yield WriteBuckets(tuple(writes), ttl, claim)
            if reply.ok:
                self._note_others(targets, writes, reply, now_ms)
                for t, w in zip(targets, writes, strict=False):
                    self._note_shapes(t, w.steps, now_ms)
                lease = self._granted(targets, writes, reply, now_ms)
                if slot is not None:
                    lease.slot, lease.slot_ms = slot, now_ms
                if align and len(targets) == 1 and lease.start_ms > lease.granted_ms:
                    yield from self._align(targets[0], lease)
                return lease
            for t, taken, due in carried:
                self._hold(t, taken, due)  # refused: they wait for the next write again
            if reply.code == CLAIMED:
                raise LeaseClaimed("this reservation was already started by another delivery")
            current: Sequence[Item | None] = _refused(self, reply)
            # Items whose condition held are not returned by a cancelled transaction: a
            # refusal is decided on the returned ones alone; only a lost race reads more.
            returned = [
                (t, item) for t, item in zip(targets, current, strict=False) if item is not None
            ]
            for t, w, item in zip(targets, writes, current, strict=False):
                if item is not None:
                    self._note_lost(t, w.steps, item, now_ms)
            # How far others pushed the items past the view (read before it takes them in).
            pushed_ms = (
                max((self._pushed_ms(t, item, now_ms) for t, item in returned), default=0)
                if lost
                else 0
            )
            for t, item in returned:
                self._remember(t, item)
                self._note_seen(t, item, now_ms)
            violations, passed = self._statuses(
                [t for t, _ in returned], [item for _, item in returned], now_ms, horizon_ms
            )
            if violations:
                held = [t for t, item in zip(targets, current, strict=False) if item is None]
                passed += self._held(held, now_ms)
                raise self._refusal(violations, passed, lost, pushed_ms)
            if len(returned) < len(targets):
                current = yield from self._read(targets)
                violations, passed = self._statuses(targets, current, now_ms, horizon_ms)
                if violations:
                    raise self._refusal(violations, passed, lost)
            known = current
        raise RateLimiterUnavailable(
            f"gave up after {self.max_attempts} conditional writes lost to contention"
        )

    def _plan(
        self,
        target: Target,
        known: tuple[Item | None] | None,
        now_ms: int,
        horizon_ms: int,
        exact: bool,
        fold: bool,
    ) -> tuple[Step, ...]:
        """The grant's step for each limit of ``target``, its shape chosen from ``known``
        (``(item,)``: the item just returned or read) or this process's last view.

        With ``fold``, the alignment of :meth:`_align` rides in the grant: the common
        start the view predicts (the latest of the limits' own slots) is computed first,
        and every limit whose own slot comes earlier and which was last seen idle is
        written as consumed a margin after that start (a FRESH write on that clock; see
        :func:`~.bucket.fold_ms`). A start later than predicted by at most the margin
        leaves nothing to align; a limit last seen busy keeps its queue add (no other
        client's write can make it fail) and is aligned only if the reply shows it
        short of the start. Counting a limit at or after the start is what the
        alignment writes anyway."""
        guesses = [
            _tat(known[0], lim) if known is not None else self._shape_guess(target, lim, now_ms)
            for lim in target.limits
        ]
        at = [now_ms] * len(guesses)
        until: list[int | None] = [None] * len(guesses)
        if fold:
            own = [
                now_ms + bucket.retry_after_ms(lim, tat, target.consume[lim.name], now_ms)
                if target.consume[lim.name]
                else now_ms
                for lim, tat in zip(target.limits, guesses, strict=True)
            ]
            start = min(max(own, default=now_ms), now_ms + horizon_ms)
            at = [
                bucket.fold_ms(lim, target.consume[lim.name], tat, slot, start, now_ms)
                for lim, tat, slot in zip(target.limits, guesses, own, strict=True)
            ]
            # A limit last seen busy but short of the start gets its queue add padded up
            # to the start and its margin: counted there in the grant, no alignment.
            # (Only from a TAT seen, not from a guess that a bucket seen busy lately
            # still is: padding from that guess could count the limit far too late.)
            until = [
                start + bucket.fold_margin_ms(lim, target.consume[lim.name])
                if ms == now_ms
                and slot < start
                and tat is not None
                and (known is not None or tat == self._guess(target, lim))
                and bucket.now_units(lim, now_ms) < tat < bucket.now_units(lim, start)
                else None
                for lim, tat, slot, ms in zip(target.limits, guesses, own, at, strict=True)
            ]
        if not exact:  # an idle bucket this process lost races on: count a margin later
            at = [
                now_ms + bucket.fold_margin_ms(lim, target.consume[lim.name])
                if ms == now_ms
                and (tat is None or tat <= bucket.now_units(lim, now_ms))
                and self._contended_now(target, lim, now_ms)
                else ms
                for lim, tat, ms in zip(target.limits, guesses, at, strict=True)
            ]
        steps = []
        for lim, tat, ms, pad_to in zip(target.limits, guesses, at, until, strict=True):
            tokens = target.consume[lim.name]
            if pad_to is not None and tat is not None and not exact:
                if self.clamp:  # the store takes the later of the TAT and the start
                    ms = pad_to
                else:
                    steps.append(bucket.plan_until(lim, tokens, now_ms, horizon_ms, tat, pad_to))
                    continue
            left = horizon_ms - (ms - now_ms)
            steps.append(bucket.plan(lim, tokens, ms, left, tat, known=exact, clamp=self.clamp))
        return tuple(steps)

    def _seen(self, targets: Sequence[Target]) -> list[Item]:
        """The buckets as this process last saw them (lower bounds of their TATs)."""
        return [
            {lim.key: tat for lim in t.limits if (tat := self._guess(t, lim)) is not None}
            for t in targets
        ]

    def _held(self, targets: Sequence[Target], now_ms: int) -> list[LimitStatus]:
        """The statuses of the items of a refused transaction whose condition held (the
        store returns none of them): as this process last saw them, none refused."""
        violations, passed = self._statuses(targets, self._seen(targets), now_ms)
        return passed + [
            replace(v, available=max(v.available, float(v.requested)), retry_after=0.0)
            for v in violations
        ]

    def _granted(
        self,
        targets: tuple[Target, ...],
        writes: list[ItemWrite],
        reply: Reply,
        now_ms: int,
    ) -> LeaseState:
        start = now_ms
        tats: dict[str, int] = {}
        if all(item is not None for item in reply.value):
            # The store returned every item's new values (one item; or a clamping store).
            for i, (t, item) in enumerate(zip(targets, reply.value, strict=True)):
                self._remember(t, item)
                for lim in t.limits:
                    tat = item.get(lim.key)
                    if tat is not None:
                        if i == 0:
                            tats[lim.key] = tat
                        start = max(start, bucket.start_ms(lim, tat, now_ms))
        else:
            self._unsure.update((t.entity_id, t.resource) for t in targets)
            for t, w in zip(targets, writes, strict=False):
                for step in w.steps:
                    if step.limit.inflight:
                        continue
                    if step.shape in (bucket.Shape.FRESH, bucket.Shape.EXACT):
                        self._set_tat((t.entity_id, t.resource, step.limit.key), step.amount)
                        start = max(start, bucket.start_ms(step.limit, step.amount, now_ms))
        consumed = {name: n for name, n in targets[0].consume.items()}
        return LeaseState(targets, consumed, now_ms, start, tats=tats)

    def _align(self, target: Target, lease: LeaseState) -> Flow[None]:
        """Count every limit's consumption at the lease's common start.

        A request waits for its slowest limit; a limit that counted it earlier (at its
        own, earlier slot) would let other requests use the tokens again by the time this
        one really starts, and the starts would bunch. Each limit's TAT becomes at least
        ``start + cost``: what consuming at the start leaves (GCRA). The grant already
        wrote each limit at the start its view predicted (see :meth:`_plan`); this one
        unconditional write remains only when a limit still falls short of that (the
        real start came later than predicted, or the limit was queued behind it). Such a
        limit is padded to :func:`~.bucket.fold_margin_ms` after the start, so that the
        next grants find it ahead of their start and need no pad of their own.
        """
        start = lease.start_ms
        pads = []
        for lim in target.limits:
            tat = lease.tats.get(lim.key)  # this grant's own values, not the shared cache
            tokens = target.consume.get(lim.name)
            if tat is None or not tokens:
                continue
            if tat >= bucket.now_units(lim, start) + bucket.cost(lim, tokens):
                continue  # counted at the start or later already
            later = start + bucket.fold_margin_ms(lim, tokens)
            pad = bucket.now_units(lim, later) + bucket.cost(lim, tokens) - tat
            pads.append(bucket.Step(lim, 0, bucket.Shape.REFUND, 0, pad))
        if not pads:
            return
        reply = yield WriteBuckets(
            (ItemWrite(target.key, tuple(pads)),),
            self._ttl(lease.granted_ms, start - lease.granted_ms, None, [target]),
        )
        self._raise_for(reply)
        self._remember(target, reply.value[0])

    def _read(self, targets: Sequence[Target]) -> Flow[Sequence[Item | None]]:
        items: list[Item | None] = []
        for t in targets:
            reply = yield ReadBucket(t.key)
            self._raise_for(reply)
            items.append(reply.value)
        return items

    def _statuses(
        self,
        targets: Sequence[Target],
        items: Sequence[Item | None],
        now_ms: int,
        horizon_ms: int = 0,
    ) -> tuple[list[LimitStatus], list[LimitStatus]]:
        """Every limit's status against the given items: (violations, passed)."""
        violations, passed = [], []
        for t, item in zip(targets, items, strict=False):
            for lim in t.limits:
                tat = _tat(item, lim)
                tokens = t.consume.get(lim.name, 0)
                wait = bucket.retry_after_ms(lim, tat, tokens, now_ms)
                status = LimitStatus(
                    t.entity_id,
                    t.whole_resource,
                    f"{lim.name}~{lim.track}" if lim.track else lim.name,
                    tokens,
                    bucket.available(lim, tat, now_ms),
                    lim.burst,
                    wait / 1000,
                )
                if wait > horizon_ms:
                    violations.append(status)
                else:
                    passed.append(replace(status, retry_after=0.0) if wait == 0 else status)
            for cap in t.caps:  # a slot is free now or not: no horizon reserves one
                held = inflight.live(item, cap, now_ms)
                status = LimitStatus(
                    t.entity_id,
                    t.resource,
                    cap.name,
                    1,
                    cap.capacity - held,
                    cap.capacity,
                    0.0,
                    inflight=True,
                )
                if held < cap.capacity:
                    passed.append(status)
                else:
                    retry = inflight.retry_after(item, cap, now_ms)
                    violations.append(replace(status, retry_after=retry))
        return violations, passed

    # -- adjust ---------------------------------------------------------------------------
    def adjust(
        self,
        lease: LeaseState,
        deltas: Mapping[str, int],
        reported: Reported | None = None,
        end: bool = False,
    ) -> Flow[None]:
        """Add (or refund) tokens to a granted lease. Debt is allowed; never refused.

        With ``reported`` (what the provider said is left), each reported bucket that
        holds more than that is pulled down to it, never up, in the same write (see
        :meth:`_floors`); one write in all, none when nothing changes. With ``end``, the
        lease also ends (committed): its in-flight slots are freed in that same write.

        An unchecked lease (granted in ``open`` mode during an outage) consumed nothing:
        what is added to it is charged now if the store answers (usage reported after
        the outage still reaches the buckets), and dropped with a warning if it does
        not; it never raises for the outage. Without targets (its limits could not be
        resolved during the outage) nothing can be charged.
        """
        if lease.closed:
            if end and not deltas:
                return  # committing twice keeps what the first did
            raise ValidationError("lease", "is already committed or rolled back")
        if not lease.targets:
            lease.closed = lease.closed or end
            return
        amounts = check_amounts("adjust", deltas, negative=True)
        own = lease.targets[0]
        for name, delta in amounts.items():
            if own.limit(name) is None:
                raise ValidationError(
                    f"adjust.{name}",
                    "is not a limit of this lease",
                    ", ".join(lim.name for lim in own.limits),
                )
            if lease.consumed.get(name, 0) + delta < 0:
                raise ValidationError(
                    f"adjust.{name}",
                    f"would refund more than the {lease.consumed.get(name, 0)} consumed",
                    f"a refund of at most {lease.consumed.get(name, 0)}",
                )
        if reported is not None and reported.rates:
            amounts = self._surcharged(lease, amounts, reported)
        changes = {n: d for n, d in amounts.items() if d}
        floors = self._floors(lease, changes, reported) if reported is not None else {}
        frees = end and lease.holds_slots
        if self.settle_delay_ms and not floors and not frees and not lease.unchecked:
            held = self._hold_refunds(lease, {n: d for n, d in changes.items() if d < 0})
            for name in held:  # they wait for a later write (see .settle); debt never does
                lease.consumed[name] = lease.consumed.get(name, 0) + changes.pop(name)
        if changes or floors or frees:
            yield from self._charge(lease, changes, floors, free=end)
        if end:
            lease.closed = True

    # -- held refunds (settle coalescing; see .settle) ------------------------------------
    def _hold_refunds(self, lease: LeaseState, refunds: Mapping[str, int]) -> list[str]:
        """Hold the ``refunds`` (by limit name) that every bucket of the lease surely
        still holds (:func:`.settle.room` of this process's view, or of the lease's own
        grant); returns their names. The others are written at once."""
        now_ms = self.now_ms()
        targets = tracked(lease)

        def proof(t: Target, lim: Limit) -> int | None:
            seen = self._guess(t, lim)
            own = lease.tats.get(lim.key) if t.key == lease.targets[0].key else None
            return max((v for v in (seen, own) if v is not None), default=None)

        names = [
            name
            for name, tokens in refunds.items()
            if all(
                settle.room(lim, proof(t, lim), now_ms) >= -tokens
                for t in targets
                for lim in t.limits
                if lim.name == name
            )
        ]
        for t in targets:
            held = {
                lim.key: [settle.Refund(lim, refunds[lim.name], proof(t, lim) or 0)]
                for lim in t.limits
                if lim.name in names
            }
            self._hold(t, held, now_ms + self.settle_delay_ms)
        return names

    def _hold(self, target: Target, refunds: settle.Refunds, due_ms: int) -> None:
        """Hold ``refunds`` for ``target``'s item, due at ``due_ms``."""
        if not any(refunds.values()):
            return
        key = (target.entity_id, target.resource)
        fresh = settle.Held(*key, due_ms)
        fresh.add(refunds)
        with self._tats_lock:
            if (held := self._waiting.get(key)) is not None:
                held.merge(fresh)
            else:
                # Past cache_size items the oldest refunds are given up: the fleet
                # under-uses them, nothing is granted early.
                remember(self._waiting, key, fresh, self.cache_size)
                held = fresh
            due = held.due_ms
        if self.on_hold is not None:
            self.on_hold(due)

    def _take_held(self, target: Target) -> settle.Held | None:
        with self._tats_lock:
            return self._waiting.pop((target.entity_id, target.resource), None)

    def _carry(
        self, target: Target, steps: tuple[Step, ...], known: tuple[Item | None] | None, now_ms: int
    ) -> tuple[tuple[Step, ...], dict[str, Sequence[settle.Refund]], int]:
        """A write's ``steps`` with the refunds held for its item that they can carry
        (:func:`.settle.carry`), and when those were due; the others stay held."""
        held = self._take_held(target)
        if held is None:
            return steps, {}, 0
        seen = {
            lim.key: _tat(known[0], lim) if known is not None else self._guess(target, lim)
            for lim in target.limits
        }
        steps, taken = settle.carry(steps, held.refunds, seen, now_ms)
        self._hold(target, {k: v for k, v in held.refunds.items() if k not in taken}, held.due_ms)
        return steps, taken, held.due_ms

    def _forget_held(self) -> None:
        """In a forked child: the parent's held refunds are the parent's to write."""
        self._waiting = {}

    def held_refunds(self) -> int:
        """How many bucket items have refunds waiting (see :meth:`flush`)."""
        return len(self._waiting)

    def flush_wait(self) -> float | None:
        """Seconds until the earliest held refund is due (0 or less: due now; None when
        none is held): what a limiter's flusher sleeps before ``flush(due_only=True)``."""
        with self._tats_lock:
            due = min((held.due_ms for held in self._waiting.values()), default=None)
        return None if due is None else (due - self.now_ms()) / 1000

    def flush(self, due_only: bool = False) -> Flow[int]:
        """Write the held refunds (only those due with ``due_only``): one write per
        item. Returns the number of items written. A write that fails holds its refunds
        again and raises."""
        now_ms = self.now_ms()
        with self._tats_lock:
            keys = [k for k, h in self._waiting.items() if not due_only or h.due_ms <= now_ms]
            batch = [self._waiting.pop(k) for k in keys]
        for i, held in enumerate(batch):
            try:
                yield from self._write_held(held)
            except BaseException:
                for rest in batch[i:]:
                    self._hold(rest.target(), rest.refunds, rest.due_ms)
                raise
        return len(batch)

    def _write_held(self, held: settle.Held) -> Flow[None]:
        """Write one item's held refunds on their own (:func:`.settle.floored`)."""
        target = held.target()
        known: Item | None = None
        for attempt in range(self.max_attempts):
            if attempt >= 2:
                yield _backoff(attempt)
            now_ms = self.now_ms()
            steps = tuple(
                step
                for refunds in held.refunds.values()
                if refunds
                for step in settle.floored(
                    refunds, None if attempt == 0 else _tat(known, refunds[0].limit), now_ms
                )
            )
            if not steps:
                return
            reply = yield WriteBuckets((ItemWrite(target.key, steps),), self._ttl(now_ms, 0))
            if reply.ok:
                self._remember(target, reply.value[0])
                return
            current = _refused(self, reply)
            known = current[0] if current[0] is not None else (yield from self._read([target]))[0]
            self._remember(target, known)
        raise RateLimiterUnavailable(
            f"gave up after {self.max_attempts} conditional writes lost to contention"
        )

    def renew(self, lease: LeaseState) -> Flow[bool]:
        """Move the expiry of the lease's in-flight slots to a full ``expires`` from now
        (one write). False when a slot had been taken back already (the lease was
        presumed dead, its holder silent beyond the expiry): the lease then holds no
        slot; the caller's call is already running, past the cap."""
        if lease.closed or not lease.holds_slots:
            return lease.holds_slots
        now_ms = self.now_ms()
        slot = str(lease.slot)
        writes = [
            ItemWrite(
                t.key,
                tuple(
                    inflight.renew(cap, slot, lease.slot_expiry(cap), now_ms + cap.refill_period_ms)
                    for cap in t.caps
                ),
            )
            for t in lease.targets
            if t.caps
        ]
        reply = yield WriteBuckets(tuple(writes), self._ttl(now_ms, 0, None, lease.targets))
        if reply.ok:
            lease.slot_ms = now_ms
            return True
        _refused(self, reply)
        log.warning(
            "an in-flight slot of %s was taken back before its holder renewed it (expired "
            "more than %d ms ago): the call it guarded runs beyond the cap",
            "/".join((lease.targets[0].entity_id, lease.targets[0].resource)),
            inflight.GRACE_MS,
        )
        yield from self._charge(lease, {}, free=True)  # any slot still held goes too
        lease.slot = None
        return False

    def _surcharged(
        self, lease: LeaseState, deltas: Mapping[str, int], reported: Reported
    ) -> dict[str, int]:
        """``deltas`` plus what a provider slower than the buckets adds to this run.

        Where the provider refills a limit at ``r`` tokens a second and the fastest of
        the reported buckets at ``R > r``, a run that consumed ``c`` is charged
        ``c * (R / r - 1)`` more: the fleet's grants then go at the provider's pace,
        whatever was reserved ahead (a level, which is all ``remaining`` says, cannot
        slow a bucket whose slots are taken ahead). Fractions carry over to this
        process's next run of the bucket (never lost, never more than one token early).
        """
        result = dict(deltas)
        for name, rate in reported.rates.items():
            if not (isinstance(rate, (int, float)) and 0 < rate < math.inf):
                raise ValidationError(f"rates.{name}", f"{rate!r}", "tokens a second, > 0")
            ours = max(
                (
                    bucket.per_second(lim)
                    for t in lease.targets
                    if reported.applies_to(t)
                    for lim in t.limits
                    if lim.name == name
                ),
                default=0.0,
            )
            if ours <= rate:
                continue
            used = lease.consumed.get(name, 0) + result.get(name, 0)
            own = lease.targets[0]
            key = (own.entity_id, own.resource, name)
            with self._tats_lock:
                owed = used * (ours / rate - 1) + self._owed.get(key, 0.0)
                whole = math.floor(owed)
                remember(self._owed, key, owed - whole, self.cache_size)
            result[name] = result.get(name, 0) + whole
        return result

    def _floors(
        self, lease: LeaseState, changes: Mapping[str, int], reported: Reported
    ) -> dict[tuple[str, str, str], int]:
        """The TATs to pull the reported buckets up to (their tokens down to what the
        provider said is left), by (entity, resource, attribute), on the start track too
        when the lease counted its start there (as admitted tasks do); a bucket
        this process last saw at or beyond its floor (after ``changes``) is left out: its
        tokens are at most the provider's already (TATs only fall by refunds)."""
        names = {lim.name for t in lease.targets for lim in t.limits}
        for name, value in reported.remaining.items():
            check_tokens(f"remaining.{name}", value, minimum=0)
            if lease.targets and name not in names:
                raise ValidationError(
                    f"remaining.{name}", "is not a limit of this lease", ", ".join(sorted(names))
                )
        floors: dict[tuple[str, str, str], int] = {}
        for target in lease.targets:
            if not reported.applies_to(target):
                continue
            for lim in target.limits:
                if lim.name not in reported.remaining:
                    continue
                floor = bucket.floor_tat(lim, reported.remaining[lim.name], reported.at_ms)
                if floor is None:
                    continue
                change = bucket.cost(lim, changes.get(lim.name, 0))
                tracks = (lim, lim.start_track()) if lease.start_tracked else (lim,)
                for track in tracks:
                    seen = self._guess(target, track)
                    if seen is None or seen + change < floor:
                        floors[(target.entity_id, target.resource, track.key)] = floor
        return floors

    def _charge(
        self,
        lease: LeaseState,
        changes: Mapping[str, int],
        floors: Mapping[tuple[str, str, str], int] | None = None,
        free: bool = False,
    ) -> Flow[None]:
        """Write ``changes`` to the lease's buckets and its running totals (an unchecked
        lease's outage is logged, not raised: it holds only what was charged), with the
        ``floors`` of :meth:`_floors`, and (``free``) the freeing of its in-flight slots,
        in the same write."""
        try:
            yield from self._change(
                tracked(lease), changes, floors, lease if free else None, carry=True
            )
        except RateLimiterUnavailable as exc:
            if not lease.unchecked:
                raise
            log.warning("rate limiter unavailable, an unchecked lease's usage not charged: %s", exc)
            return
        for name, delta in changes.items():
            lease.consumed[name] = lease.consumed.get(name, 0) + delta

    def _change(
        self,
        targets: Sequence[Target],
        changes: Mapping[str, int],
        floors: Mapping[tuple[str, str, str], int] | None = None,
        free: LeaseState | None = None,
        carry: bool = False,
    ) -> Flow[None]:
        """Write ``changes`` to ``targets`` (with ``carry``, the refunds held for their
        items ride in the same write: see :mod:`.settle`), and raise each attribute
        named in ``floors``
        to its floor when the change leaves it below: a RAISE guarded by "TAT + change
        < floor", else the plain change; a refused condition returns the item and the
        next attempt chooses exactly (nothing, when the floors were all beaten). With
        ``free``, that lease's in-flight slots are freed in the same write (a slot taken
        back meanwhile is left out of the next attempt: its count was given back then)."""
        floors = floors or {}
        carry = carry and not floors
        known: Sequence[Item | None] | None = None
        for attempt in range(self.max_attempts):
            if attempt >= 2:
                yield _backoff(attempt)
            now_ms = self.now_ms()
            writes, carried = [], []
            for i, t in enumerate(targets):
                steps = []
                for lim in t.limits:
                    tokens = changes.get(lim.name, 0)
                    floor = floors.get((t.entity_id, t.resource, lim.key))
                    seen = _tat(known[i], lim) if known is not None else None
                    change = bucket.cost(lim, tokens)
                    if floor is not None and (known is None or (seen or 0) + change < floor):
                        steps.append(
                            Step(
                                lim,
                                tokens,
                                bucket.Shape.RAISE,
                                bucket.now_units(lim, now_ms),
                                floor,
                                bound=floor - change,
                            )
                        )
                    elif tokens:
                        guess = seen if known is not None else self._shape_guess(t, lim, now_ms)
                        steps.append(
                            bucket.plan_adjust(lim, tokens, now_ms, guess, clamp=self.clamp)
                        )
                freed = _caps_freed(t, free, None if known is None else known[i])
                taken: dict[str, Sequence[settle.Refund]] = {}
                due = 0
                if carry:  # debt's steps carry the refunds held for the item
                    view = None if known is None else (known[i],)
                    planned, taken, due = self._carry(t, tuple(steps), view, now_ms)
                    counted = settle.counted(planned, taken)
                else:
                    counted = bucket.counted(tuple(steps))
                counted += _debts(t, changes)
                carried.append((t, taken, due))
                if steps or freed:
                    writes.append((t, ItemWrite(t.key, counted + freed)))
            if not writes:  # a refused floor found the buckets lower already: done
                return
            reply = yield WriteBuckets(
                tuple(w for _, w in writes), self._ttl(now_ms, 0, changes, targets)
            )
            if reply.ok:
                for t, w in writes:
                    self._note_shapes(t, w.steps, now_ms)
                if len(writes) == 1:
                    self._remember(writes[0][0], reply.value[0])
                else:
                    self._unsure.update((t.entity_id, t.resource) for t, _ in writes)
                return
            for t, taken, due in carried:
                self._hold(t, taken, due)  # refused: they wait for the next write again
            current: Sequence[Item | None] = _refused(self, reply)
            if any(item is None for item in current):
                current = yield from self._read([t for t, _ in writes])
            for (t, _), item in zip(writes, current, strict=False):
                self._remember(t, item)
                self._note_seen(t, item, now_ms)
            known = current
            targets = [t for t, _ in writes]
        raise RateLimiterUnavailable(
            f"gave up after {self.max_attempts} conditional writes lost to contention"
        )

    def release(self, lease: LeaseState) -> Flow[None]:
        """Refund everything the lease consumed (rollback)."""
        if lease.closed:
            return
        refund = {name: -n for name, n in lease.consumed.items() if n}
        if (refund or lease.holds_slots) and lease.targets:  # unchecked: what was charged since
            yield from self._charge(lease, refund, free=True)
        lease.closed = True

    # -- reading --------------------------------------------------------------------------
    def available(
        self, entity_id: str, resource: str, limits: Sequence[Limit]
    ) -> Flow[dict[str, float]]:
        """Tokens available now per limit name (negative: debt), without consuming: the
        least of the entity's bucket and, with a cascade, its parent's (one read each; a
        bucket spread over shards holds what they hold together, one read per shard)."""
        targets = yield from self._targets(entity_id, resource, {}, limits)
        parts = [t.items() for t in targets]
        items = yield from self._read([part for spread in parts for part in spread])
        now_ms = self.now_ms()
        result: dict[str, float] = {}
        found = iter(items)
        for spread in parts:  # a spread bucket holds what its shards hold together
            tokens: dict[str, float] = {}
            for target, item in zip(spread, found, strict=False):
                for lim in target.limits:
                    tokens[lim.name] = tokens.get(lim.name, 0) + bucket.available(
                        lim, _tat(item, lim), now_ms
                    )
            for name, amount in tokens.items():
                result[name] = min(result.get(name, amount), amount)
        return {lim.name: result[lim.name] for lim in targets[0].limits}

    def buckets(
        self, entity_id: str, resource: str | None = None, limits: Sequence[Limit] = ()
    ) -> Flow[list[BucketStatus]]:
        """Every limit's state in the buckets of ``entity_id`` (or of one resource).

        The resources are those with a bucket and those with limits stored for them (a
        resource nobody used yet has a full bucket: ``used`` False); with ``resource``,
        that one only. Limits are those a request would apply: ``limits`` (a caller's
        code limits), overridden by the entity's stored limits (``source`` says which).
        A bucket attribute of no known limit shows its tokens in use only. One read of
        the entity, one per page of buckets, and one per shard of a bucket spread over
        shards (:mod:`.shards`; shards of limits it does not know are not shown).
        """
        check_id("entity_id", entity_id)
        if resource is not None:
            check_id("resource", resource)
        code_limits = check_limits(limits)
        yield from self.ensure_schema()
        config = yield from self._entity_config(entity_id, fresh=True)
        items: dict[str, Item] = {}
        after = None
        while True:
            reply = yield ListBuckets(entity_id, resource, after)
            self._raise_for(reply)
            page, after = reply.value
            items.update((res, item) for res, item in page.items() if shards.SEPARATOR not in res)
            if after is None:
                break
        if resource is None:
            resources = set(items) | (set(config.limits) - {ANY_RESOURCE})
        else:
            resources = {resource}
        limits_of = {res: merge(code_limits, config.limits_for(res)) for res in resources}
        for res, merged in sorted(limits_of.items()):
            count = shards.count(merged)
            for index in range(count if count > 1 else 0):  # shards are not in the
                part = shards.item_resource(res, index)  # entity's partition: read each
                reply = yield ReadBucket(BucketKey(entity_id, part))
                self._raise_for(reply)
                if reply.value is not None:
                    items[part] = reply.value
        now_ms = self.now_ms()
        rows: list[BucketStatus] = []
        for res, merged in sorted(limits_of.items()):
            if shards.count(merged) > 1:
                rows.extend(_spread_status(entity_id, res, merged, config, items, now_ms))
                continue
            item = items.get(res, {})
            blocks = sum(n for key, n in item.items() if key.endswith("~blocks"))
            for lim in merged:
                amount, period = lim.refill_amount, lim.refill_period_ms
                source = _source(config, res, lim.name)
                if lim.inflight:
                    rows.append(_cap_status(entity_id, res, lim, item, now_ms, source))
                    continue
                tat = _tat(item, lim)
                status = _status(entity_id, res, lim.name, amount, period, tat, now_ms, lim, source)
                rows.append(_counts(status, item, lim.key, blocks))
            known = {lim.key for lim in merged}
            for key, tat in sorted(item.items()):
                match = _ATTRIBUTE.match(key)
                if key in known or match is None:
                    continue  # a known limit, a start track or a counter
                amount, period = int(match["amount"]), int(match["period"])
                status = _status(entity_id, res, match["name"], amount, period, tat, now_ms)
                rows.append(_counts(status, item, key, blocks))
        return rows

    def _ttl(
        self,
        now_ms: int,
        horizon_ms: int,
        extra: Mapping[str, int] | None = None,
        targets: Sequence[Target] = (),
    ) -> int:
        # Items expire a day after they could last matter: the longest refill of a full
        # bucket plus the horizon (and any debt being added) has passed by then.
        longest = 0
        for t in targets:
            for lim in t.limits:
                debt = max(0, (extra or {}).get(lim.name, 0))
                refill_ms = -(-(lim.burst + debt) * lim.refill_period_ms // lim.refill_amount)
                longest = max(longest, refill_ms)
            for cap in t.caps:  # a held slot (and the count) outlive its expiry
                longest = max(longest, cap.refill_period_ms + inflight.GRACE_MS)
        return (now_ms + horizon_ms + longest) // 1000 + 86_400


def _holding(lease: LeaseState, granted: LeaseState) -> None:
    """``lease`` holds the slots ``granted`` took (its caps deferred to the start)."""
    if granted.slot is not None:
        lease.slot, lease.slot_ms, lease.caps_pending = granted.slot, granted.slot_ms, False


def _caps_freed(target: Target, lease: LeaseState | None, item: Item | None) -> tuple[Step, ...]:
    """The steps that free ``lease``'s slot in each of the target's caps; a slot that
    ``item`` (a view after a refused write; None: unknown) shows gone, or holding another
    expiry than the lease last wrote, is left out: it was taken back, and its count with
    it."""
    if lease is None or lease.slot is None:
        return ()
    steps: list[Step] = []
    for cap in target.caps:
        expiry = lease.slot_expiry(cap)
        if item is not None and inflight.slots(item, cap).get(lease.slot) != expiry:
            continue
        steps += inflight.free(cap, lease.slot, expiry)
    return tuple(steps)


def _caps_taken(
    target: Target, item: Item | None, slot: str | None, now_ms: int
) -> tuple[Step, ...]:
    """The steps that take ``slot`` in each of the target's caps (taking back what
    ``item``, the last view of its bucket item, shows expired)."""
    if slot is None:
        return ()
    return tuple(
        step
        for cap in target.caps
        for step in inflight.take(cap, slot, now_ms + cap.refill_period_ms, item, now_ms)
    )


def _target(
    entity_id: str,
    resource: str,
    limits: Sequence[Limit],
    amounts: Mapping[str, int],
    default: int,
) -> Target:
    """The target of one (entity, resource): its token buckets, each taking the amount
    of its name (else ``default``), and the in-flight caps the request takes a slot of
    (one, unless ``amounts`` names the cap with 0)."""
    rates = tuple(lim for lim in limits if not lim.inflight)
    consume = {lim.name: amounts.get(lim.name, default) for lim in rates}
    for lim in rates:
        if consume[lim.name] > lim.burst:
            raise RequestExceedsBurst(f"consume.{lim.name}", consume[lim.name], lim.burst)
    caps = []
    for cap in limits:
        if cap.inflight:
            taken = amounts.get(cap.name, 1)
            if taken not in (0, 1):
                raise ValidationError(
                    f"consume.{cap.name}", f"{taken} slots", "0 or 1: a request holds one slot"
                )
            if taken:
                caps.append(cap)
    return Target(entity_id, resource, rates, consume, tuple(caps))


def _status(
    entity_id: str,
    resource: str,
    name: str,
    amount: int,
    period_ms: int,
    tat: int | None,
    now_ms: int,
    limit: Limit | None = None,
    source: str | None = None,
) -> BucketStatus:
    """One limit's state from its TAT; without its ``limit`` (burst unknown) only the
    tokens in use can be told."""
    in_use = 0.0 if tat is None else max(0.0, (tat - now_ms * amount) / period_ms)
    return BucketStatus(
        entity_id,
        resource,
        name,
        amount,
        period_ms,
        None if limit is None else limit.burst,
        None if limit is None else bucket.available(limit, tat, now_ms),
        in_use,
        in_use * period_ms / amount / 1000,
        source,
        tat is not None,
    )


def _spread_status(
    entity_id: str,
    resource: str,
    limits: Sequence[Limit],
    config: EntityConfig,
    items: Mapping[str, Item],
    now_ms: int,
) -> list[BucketStatus]:
    """The rows of a bucket spread over shards: each limit's state summed over them
    (full when the last shard is)."""
    count = shards.count(limits)
    parts = [items.get(shards.item_resource(resource, i), {}) for i in range(count)]
    blocks = sum(n for item in parts for key, n in item.items() if key.endswith("~blocks"))
    rows = []
    for lim in limits:
        source = _source(config, resource, lim.name)
        states = []
        for index, item in enumerate(parts):
            part = shards.split(lim, count, index)
            tat = _tat(item, part)
            amount, period = part.refill_amount, part.refill_period_ms
            status = _status(entity_id, resource, lim.name, amount, period, tat, now_ms, part)
            states.append(_counts(status, item, part.key, 0))
        charged = [s.charged for s in states if s.charged is not None]
        rows.append(
            BucketStatus(
                entity_id,
                resource,
                lim.name,
                lim.refill_amount,
                lim.refill_period_ms,
                lim.burst,
                sum(s.available or 0.0 for s in states),
                sum(s.in_use for s in states),
                max(s.full_in for s in states),
                source,
                any(s.used for s in states),
                sum(charged) if charged else None,
                blocks,
            )
        )
    return rows


def _cap_status(
    entity_id: str, resource: str, cap: Limit, item: Item, now_ms: int, source: str | None
) -> BucketStatus:
    """An in-flight cap's state: slots free (``available``) and held (``in_use``)."""
    held = inflight.live(item, cap, now_ms)
    return BucketStatus(
        entity_id,
        resource,
        cap.name,
        cap.refill_amount,
        cap.refill_period_ms,
        cap.capacity,
        float(cap.capacity - held),
        float(held),
        0.0,
        source,
        cap.key in item,
        inflight=True,
    )


def _counts(status: BucketStatus, item: Item, key: str, blocks: int) -> BucketStatus:
    """``status`` with its bucket's counters from ``item`` (see :func:`.bucket.counted`)."""
    return replace(status, charged=item.get(f"{key}~used"), blocks=blocks)


def _source(config: EntityConfig, resource: str, name: str) -> str:
    """Where the limit ``name`` of a request for ``resource`` comes from (see
    :attr:`BucketStatus.source`): stored for the resource, for the entity, or code."""
    if any(lim.name == name for lim in config.limits.get(resource, ())):
        return "resource"
    if any(lim.name == name for lim in config.limits.get(ANY_RESOURCE, ())):
        return "entity"
    return "code"


def _backoff(attempt: int) -> Sleep:
    """A short random pause after losing the same item twice to other writers."""
    return Sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))


def _debts(target: Target, changes: Mapping[str, int]) -> tuple[Step, ...]:
    """The ``debt`` counters of a change's charges: tokens added after the grant (a
    reconcile that found more used than estimated, a surcharge), counted beside ``used``
    in the same write so that a reader of the table's stream tells them apart."""
    return tuple(
        Step(lim.counter("debt"), changes[lim.name], bucket.Shape.REFUND, 0, changes[lim.name])
        for lim in target.limits
        if changes.get(lim.name, 0) > 0 and not lim.track and not lim.inflight
    )


def _refused(engine: Engine, reply: Reply) -> tuple[Item | None, ...]:
    """The current items of a write refused for its condition; the engine's error for
    any other failure."""
    if reply.code != CONDITION:
        engine._raise_for(reply)
        raise RateLimiterUnavailable(f"unexpected reply {reply.code}")
    return reply.current
