"""Which queue a message was consumed from: the key of its queue limits.

``zae_queue_limits`` names queues. A message's routing key names a queue only when the
two happen to be equal (Celery's default direct exchanges); with a topic exchange, or a
direct one whose routing keys differ from its queues' names, it does not. So the queue
is found where it is known:

* **On the worker's consumer** (its main process), when the message arrives.
  RabbitMQ (py-amqp) delivers each message with the consumer tag of the queue's
  consumer, which kombu's ``Consumer`` maps back to the queue. kombu's virtual
  transports (redis, filesystem, memory, SQS...) deliver no tag: there the queue is the
  one consumed queue whose declared bindings would route the message's exchange and
  routing key to it (as the virtual exchange itself routed it). The name found travels
  to the pool process as the request field :data:`QUEUE`.
* **Without a consumer's answer** (an eager run, a message the consumer could not place:
  bindings made outside the app's ``task_queues``, or two consumed queues bound to the
  same key), the key is the one queue of the app's declared queues that the routing would
  reach, else the routing key itself (earlier releases' key), else none (``""``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "QUEUE",
    "QUEUE_ENTITY_PREFIX",
    "QUEUE_RESOURCE",
    "ConsumedQueues",
    "limit_key",
    "queue_of_run",
    "route_target",
    "topic_matches",
]

QUEUE = "zae_queue"
"""Request field (not a message header): the queue the worker's consumer took the
message from. Set or removed by the consumer on every arrival, so a stale value that a
republish carried in its headers is never believed."""

QUEUE_ENTITY_PREFIX = "queue:"
QUEUE_RESOURCE = "queue"
"""A queue's limits live in the bucket of entity ``queue:NAME``, resource ``queue``."""

MAX_TAGS = 1024
"""Consumer tags remembered per consumer (paused and resumed queues get new tags)."""


def topic_matches(pattern: str, key: str) -> bool:
    """Does a topic binding ``pattern`` route ``key``? Words are separated by dots;
    ``*`` stands for exactly one word and ``#`` for zero or more (AMQP 0-9-1)."""
    return _words_match(tuple(pattern.split(".")), tuple(key.split(".")))


@functools.lru_cache(maxsize=4096)
def _words_match(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_words_match(rest, key[skip:]) for skip in range(len(key) + 1))
    return bool(key) and head in ("*", key[0]) and _words_match(rest, key[1:])


def _bindings(queue: Any) -> Iterator[tuple[Any, str]]:
    """A kombu ``Queue``'s (exchange, routing key) bindings: its own and ``bindings``."""
    exchange = getattr(queue, "exchange", None)
    if exchange is not None and exchange.name:
        yield exchange, queue.routing_key or ""
    for binding in getattr(queue, "bindings", None) or ():
        if binding.exchange is not None:
            yield binding.exchange, binding.routing_key or ""


def _routes_to(queue: Any, exchange: str | None, routing_key: str) -> bool:
    """Would ``queue``'s declared bindings receive a message published to ``exchange``
    (None: unknown, any exchange that routes by key) with ``routing_key``?"""
    if exchange == "":  # the default exchange routes a key to the queue of that name
        return bool(queue.name == routing_key)
    for bound, key in _bindings(queue):
        if exchange is not None and bound.name != exchange:
            continue
        kind = getattr(bound, "type", "direct")
        if kind == "fanout" and exchange is not None:
            return True
        if kind == "topic" and topic_matches(key, routing_key):
            return True
        if kind == "direct" and key == routing_key:
            return True
        # a headers exchange routes on the message's headers: not decided here
    return False


def route_target(queues: Iterable[Any], exchange: str | None, routing_key: str) -> str | None:
    """The name of the one queue among ``queues`` (kombu ``Queue`` objects) whose
    declared bindings route a message published to ``exchange`` with ``routing_key``;
    None when no queue or several would receive it."""
    names = {str(q.name) for q in queues if _routes_to(q, exchange, routing_key)}
    return names.pop() if len(names) == 1 else None


def limit_key(app: Any, consumed: str | None, delivery_info: Mapping[str, Any] | None) -> str:
    """The key of a run's queue limits: the queue it was ``consumed`` from when known;
    else the one queue of the app's declared queues its exchange and routing key reach;
    else the routing key; else ``""`` (no queue: no queue limits)."""
    if consumed:
        return consumed
    info = delivery_info or {}
    routing_key = str(info.get("routing_key") or "")
    if not routing_key:
        return ""
    exchange = info.get("exchange")
    found = route_target(app.amqp.queues.values(), exchange, routing_key)
    return found or routing_key


def queue_of_run(app: Any, request: Any) -> str:
    """The key of the queue limits of the run ``request`` (a task's ``self.request``) in
    the pool: the queue the consumer found (:data:`QUEUE`), else :func:`limit_key`'s
    fallback. An eager run has no consumer: a :data:`QUEUE` it carries is ignored."""
    consumed = None if request.get("is_eager") else request.get(QUEUE)
    return limit_key(app, consumed if isinstance(consumed, str) else None, request.delivery_info)


class ConsumedQueues:
    """The queues one worker's consumer takes messages from, and which one a message
    came from (see the module's docstring). Used on the consumer's thread, and on the
    timer's when an ETA message falls due (pools without an event loop): the tag map is
    only ever replaced or added to, so a reader at worst misses and asks the bindings."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self._tags: dict[str, str] = {}

    @classmethod
    def of(cls, consumer: Any) -> ConsumedQueues:
        """The consumer's instance, created on first use (strategies are made again when
        the consumer restarts; consumer tags stay unique in a process)."""
        found: ConsumedQueues | None = getattr(consumer, "_zae_queues", None)
        if found is None:
            found = consumer._zae_queues = cls(consumer)
        return found

    def annotate(self, request: Any) -> str | None:
        """Set the request's :data:`QUEUE` to the queue its message came from (removed
        when unknown); returns it."""
        queue = self.name_of(getattr(request.message, "delivery_info", None))
        if queue is None:
            request.request_dict.pop(QUEUE, None)
        else:
            request.request_dict[QUEUE] = queue
        return queue

    def name_of(self, delivery_info: Mapping[str, Any] | None) -> str | None:
        """The consumed queue a message with this (transport's, unfiltered)
        ``delivery_info`` came from: by its consumer tag, else by the bindings of the
        consumed queues; None when neither tells."""
        info = delivery_info or {}
        tag = info.get("consumer_tag")
        if tag is not None:
            name = self._tags.get(str(tag))
            if name is None:
                self._learn_tags()
                name = self._tags.get(str(tag))
            if name is not None:
                return name
        routing_key = info.get("routing_key")
        if not routing_key:
            return None
        consumed = self.consumer.app.amqp.queues.consume_from or {}
        return route_target(consumed.values(), info.get("exchange"), str(routing_key))

    def _learn_tags(self) -> None:
        """Read the task consumer's queue name -> consumer tag map (kombu's
        ``Consumer._active_tags``). Tags of cancelled consumers (a paused queue) are kept:
        messages delivered before the cancel still arrive with them."""
        task_consumer = getattr(self.consumer, "task_consumer", None)
        active = dict(getattr(task_consumer, "_active_tags", None) or {})  # one copy
        known = {} if len(self._tags) + len(active) > MAX_TAGS else dict(self._tags)
        known.update((str(tag), str(name)) for name, tag in active.items())
        self._tags = known
