"""Keeping a running task's in-flight slots (``Limit.concurrent``) while its body runs.

A slot expires ``expires`` seconds after it was taken or renewed, so that a killed
worker's slots come back (docs/engine.md, "In-flight caps"). A task that runs longer must
renew: :class:`Renewer`, one thread per worker process started on first use, renews each
running lease's slots a third of its shortest cap's ``expires`` after it last wrote
them, and forgets the lease when the task ends. A renewal holds the renewer's lock: a
task ending meanwhile waits for it (one write) before it frees its slots. A renewal that
finds a slot taken back (this process was silent beyond the expiry: a frozen or
overloaded host) is logged by the engine; the task goes on, since its call is already
running.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from zae_celery.core import Lease

__all__ = ["Renewer", "renewer"]

log = logging.getLogger("zae_celery")

SHARE = 1 / 3
"""Renew after this share of the shortest cap's expiry has passed since the last write."""


class Renewer:
    """Renews the in-flight slots of the leases registered with :meth:`hold`."""

    def __init__(self) -> None:
        self._due: dict[int, tuple[float, Lease]] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, lease: Lease) -> None:
        """Renew ``lease``'s slots until :meth:`drop` (nothing when it holds none)."""
        period = _period(lease)
        if period is None:
            return
        with self._changed:
            self._due[id(lease)] = (time.monotonic() + period, lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="zae-celery slot renewal", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def drop(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (its task ended). Returns once no renewal of it is in
        flight: the release that follows must see the expiry the lease last wrote."""
        with self._changed:
            self._due.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [(key, lease) for key, (at, lease) in self._due.items() if at <= now]
                if not due:
                    soonest = min((at for at, _ in self._due.values()), default=None)
                    self._changed.wait(None if soonest is None else soonest - now)
                    continue
                # Renewed under the lock, so that drop() never returns in the middle of
                # a renewal (a release racing it would miss the new expiry).
                for key, lease in due:
                    period = _period(lease) if self._renewed(lease) else None
                    if period is None:
                        self._due.pop(key, None)
                    else:
                        self._due[key] = (time.monotonic() + period, lease)

    @staticmethod
    def _renewed(lease: Lease) -> bool:
        """Renew ``lease``'s slots; False when it holds them no more."""
        try:
            return lease.renew()
        except Exception as exc:  # an outage: the next round tries again, before expiry
            log.warning("zae-celery could not renew an in-flight slot: %s", exc)
            return True


def _period(lease: Lease) -> float | None:
    """Seconds between renewals of ``lease``'s slots (None: it holds none)."""
    caps = [cap for ref in lease.caps for cap in ref.limits]
    if not caps or lease.closed:
        return None
    return min(cap.refill_period_ms for cap in caps) / 1000 * SHARE


_renewer: tuple[int, Renewer] | None = None
_lock = threading.Lock()


def renewer() -> Renewer:
    """This process's renewer (a pool process forked from a worker gets its own)."""
    global _renewer
    with _lock:
        if _renewer is None or _renewer[0] != os.getpid():
            _renewer = (os.getpid(), Renewer())
        return _renewer[1]
