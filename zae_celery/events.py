"""Celery events that say why a task waits, for ``celery events`` and Flower.

Sent only when the worker sends task events (``celery worker -E``, or
``worker_send_task_events = True``), like Celery's own:

- ``task-throttled``: the task waits for a slot of its buckets. Fields: ``wait``
  (seconds), ``resource``, ``limit`` (the limit that refused, when one did), ``path``
  (``admission``: held by the worker's consumer; ``pool``: republished for later) and
  ``cause`` (``slot``, ``outage``).
- ``task-provider-limited``: the provider answered 429 (or was overloaded) and the
  task's buckets are blocked. Fields: ``wait`` (the retry-after), ``resource``, ``kind``
  (``429`` or ``overloaded``).

Celery's event state (and so Flower) shows an unknown task event as the task's state:
``THROTTLED`` or ``PROVIDER-LIMITED``, ranked above ``STARTED``, so until the task
succeeds, fails or is retried. No field is ever a task's argument or an entity id.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_after_setup

__all__ = ["PROVIDER_LIMITED", "THROTTLED", "from_consumer", "from_task"]

log = logging.getLogger("zae_celery")

THROTTLED = "task-throttled"
PROVIDER_LIMITED = "task-provider-limited"
_ENABLED = "zae_worker_events"
"""Set in the worker's configuration before its pool starts: whether it sends task events
(the pool processes cannot see ``-E`` otherwise)."""


@celeryd_after_setup.connect(weak=False)  # type: ignore[untyped-decorator]
def _remember_events(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    if instance is not None and conf is not None:
        conf[_ENABLED] = bool(getattr(instance, "task_events", False))


def _fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (round(v, 3) if isinstance(v, float) else v) for k, v in fields.items() if v is not None
    }


def from_consumer(consumer: Any, type_: str, task_id: str, **fields: Any) -> None:
    """Send ``type_`` about ``task_id`` with the consumer's dispatcher (on its thread)."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return
    try:
        dispatcher.send(type_, uuid=task_id, **_fields(fields))
    except Exception as exc:  # monitoring never fails a task
        log.warning("zae-celery could not send a %s event: %s", type_, exc)


def from_task(task: Any, type_: str, **fields: Any) -> None:
    """Send ``type_`` about the running task from its pool process."""
    request = task.request
    if request.is_eager or request.called_directly or not task.app.conf.get(_ENABLED):
        return
    try:
        task.send_event(type_, retry=False, **_fields(fields))
    except Exception as exc:  # monitoring never fails a task
        log.warning("zae-celery could not send a %s event: %s", type_, exc)
