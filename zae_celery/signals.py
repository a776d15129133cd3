"""Signals of rate-limited task runs (Celery's dispatch: ``signal.connect(receiver)``)."""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["run_settled"]

run_settled = Signal(name="zae_run_settled")
"""Sent once per run of a :class:`~zae_celery.RateLimitedTask` that reached its gate
(not for a direct call), after its lease was settled, in the process that ran it.

The sender is the task. Keyword arguments:

- ``task_id``: the task's id;
- ``state``: how the run ended (``SUCCESS``, ``FAILURE``, ``RETRY``: a deferral or a
  retry, ``IGNORED``, ``REJECTED``);
- ``lease``: the run's :class:`~zae_celery.core.Lease` (``lease.consumed``: what it
  kept, after ``report_usage`` and ``rate_on_error``), or None when it held none (no
  limits applied, or an eager run admitted with ``zae_eager="admit"``);
- ``waited``: seconds the run waited in place for its slot (an eager run's whole wait);
- ``deferrals``: deferrals of the task before this run.

A receiver that raises is logged, never fails the task. ``zae_celery.testing``'s
``TaskLedger`` records these for tests.
"""
