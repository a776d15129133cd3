"""One DEBUG line per decision the Celery layer makes, with structured fields.

Each line reads ``zae-celery decision=<kind> task=<id> bucket=<entity>/<resource>
limit=<name> wait=<seconds>`` (fields that do not apply are left out) and carries the
same fields as ``record.zae`` (a dict, for structured log handlers). Kinds: ``granted``
(a slot, in the pool or an eager run), ``admitted`` (a slot taken by a worker's consumer),
``refused`` (no slot within the horizon), ``deferred`` (republished for later), ``blocked``
(a provider's 429 or overload), ``settled`` (usage reconciled, provider report applied).

Only ids, limit names and numbers appear: never a prompt, a task's argument or a
credential.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["log_decision"]

log = logging.getLogger("zae_celery")


def log_decision(kind: str, task_id: Any, **fields: Any) -> None:
    """Log decision ``kind`` about task ``task_id`` at DEBUG (see the module)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    shown = {"decision": kind, "task": str(task_id)}
    for name, value in fields.items():
        if value is None:
            continue
        shown[name] = f"{value:.3f}" if isinstance(value, float) else str(value)
    text = " ".join(f"{name}={value}" for name, value in shown.items())
    log.debug("zae-celery %s", text, extra={"zae": shown})
