"""A redis broker that refuses publishes on demand (the broker side of a fault test).

While the key ``<prefix>fail-publish`` exists in the broker's redis, every publish of a
*deferred* task (a message with a ``zae_deferrals`` header) is refused the way a redis at
its ``maxmemory`` refuses a write, and each refusal is pushed to the list
``<prefix>publish-failures`` (the test waits on it).
Consuming, acknowledging and requeueing are untouched. Importing this module registers
the transport under :data:`SCHEME` (``zaeflaky://host:port/db``).
"""

from __future__ import annotations

import os
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, redis
from redis.exceptions import ResponseError

SCHEME = "zaeflaky"
PREFIX = os.environ.get("ZAE_TEST_PREFIX", "")
FAIL_KEY = f"{PREFIX}fail-publish"
FAILURES_KEY = f"{PREFIX}publish-failures"


class Channel(redis.Channel):
    """kombu's redis channel with a publish that can be made to fail."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if (message.get("headers") or {}).get("zae_deferrals"):
            with self.conn_or_acquire() as client:
                if client.exists(FAIL_KEY):
                    client.rpush(FAILURES_KEY, queue)
                    raise ResponseError(
                        "OOM command not allowed when used memory > 'maxmemory' "
                        "(refused by the test transport)"
                    )
        super()._put(queue, message, **kwargs)  # type: ignore[no-untyped-call]


class Transport(redis.Transport):
    """kombu's redis transport with :class:`Channel`."""

    Channel = Channel


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
