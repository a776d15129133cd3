"""The worker process's renewer of in-flight slots (zae_celery.renewal), on its own: a
task that ends while its renewal is in flight waits for it, so that its release sees the
expiry the renewal wrote. Renewal on real workers: tests/test_inflight_workers.py."""

from __future__ import annotations

import threading

from zae_celery.core import Limit
from zae_celery.core.lease import BucketRef
from zae_celery.renewal import Renewer


class SlowLease:
    """A lease holding one slot whose renewal takes until the test releases it."""

    caps = (BucketRef("e", "r", (Limit.concurrent("calls", 1, expires=0.03),)),)
    closed = False

    def __init__(self) -> None:
        self.renewing, self.release = threading.Event(), threading.Event()
        self.renewals = 0

    def renew(self) -> bool:
        self.renewals += 1
        self.renewing.set()
        assert self.release.wait(10), "the test never released the renewal"
        return True


def test_a_task_ending_waits_for_its_renewal_in_flight() -> None:
    renewer, lease = Renewer(), SlowLease()
    renewer.hold(lease)  # type: ignore[arg-type]
    assert lease.renewing.wait(10)  # a renewal is in flight (a write to the store)
    dropped = threading.Event()

    def end_task() -> None:
        renewer.drop(lease)  # type: ignore[arg-type]
        dropped.set()

    ender = threading.Thread(target=end_task)
    ender.start()
    # While the renewal's write is in flight, the ending task is held back...
    assert not dropped.wait(0.2)
    lease.release.set()
    ender.join(10)
    assert dropped.is_set()  # ...until the renewal is done
