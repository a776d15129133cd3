"""The same rate-limit decisions through throttled-py (PyPI ``throttled-py``, import
``throttled``), on a Redis server, for :mod:`benchmarks.stores`.

throttled-py is used as an installed package through its public sync API only, imported
inside the functions (through :mod:`importlib`, so neither ruff nor mypy needs it): this
module imports fine without it. ``make benchmark-redis`` installs it.

One :class:`ThrottledDecider` is one subject's set of limits:

* a ``throttled.store.RedisStore(server=URL, options={})`` (the library's own redis-py
  client and connection pool, with its default options);
* one ``Throttled(using=ALGORITHM, quota=rate_limiter.per_min(RATE, burst=RATE), ...)``
  per limit, each under its own ``key_prefix``; the library's algorithms are ``gcra``,
  ``token_bucket`` (and fixed/sliding window and leaking bucket, unused here);
* a decision calls ``limit(key, cost=COST)`` on each limit in turn and stops at the first
  one that answers ``limited``: one limit is one call (one EVALSHA), two limits are two
  calls, not atomic (a token taken from the first stays taken when the second refuses).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

ALGORITHMS = ("gcra", "token_bucket")
"""The Redis algorithms compared: both keep one key per limit and subject."""


def installed_version() -> str | None:
    """throttled-py's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("throttled-py")
    except importlib.metadata.PackageNotFoundError:
        return None


class ThrottledDecider:
    """``decider(key)``: True when every limit allowed ``key`` its cost, False at the first
    refusal.

    Args:
        server_url: ``redis://HOST:PORT/DB``.
        algorithm: one of :data:`ALGORITHMS`.
        limits: ``(name, per-minute rate, cost)`` per limit; the burst is the rate (a
            bucket holds one minute of tokens), as :class:`zae_celery.core.Limit.per_minute`.
        key_prefix: the library's key namespace for this decider (letters, digits, ``-``).
    """

    def __init__(
        self,
        server_url: str,
        algorithm: str,
        limits: list[tuple[str, int, int]],
        key_prefix: str,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {algorithm!r}")
        throttled: Any = importlib.import_module("throttled")
        rate_limiter: Any = importlib.import_module("throttled.rate_limiter")
        self.store: Any = throttled.store.RedisStore(server=server_url, options={})
        self._throttles: list[tuple[Any, int]] = [
            (
                throttled.Throttled(
                    using=algorithm,
                    quota=rate_limiter.per_min(rate, burst=rate),
                    store=self.store,
                    key_prefix=f"{key_prefix}-{name}",
                ),
                cost,
            )
            for name, rate, cost in limits
        ]

    def __call__(self, key: str) -> bool:
        # all() stops at the first refusal: later limits are not asked.
        return all(not t.limit(key, cost=cost).limited for t, cost in self._throttles)
