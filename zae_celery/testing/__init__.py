"""Helpers for testing code that uses zae-celery, without AWS.

- Local servers, each a child process on a free 127.0.0.1 port, stopped by its PID when
  its context manager exits (errors and Ctrl-C included): :func:`moto_server` (pip only,
  served one request at a time so conditional writes are atomic as on DynamoDB),
  :func:`dynamodb_local` (Amazon's DynamoDB Local, needs Java) and :func:`redis_server`
  (a throw-away broker). Each yields a :class:`LocalServer`; one that cannot start raises
  :class:`ServerUnavailable` saying what is missing.
- The in-memory store: :class:`MemoryStore` (``RateLimiter(store=MemoryStore())`` or
  ``RateLimiter.from_url("memory://")``) answers like DynamoDB, in this process, with
  injectable failures (:meth:`MemoryStore.fail_next`): fast unit tests need no server.
- Rate-limited Celery tasks in one process: :class:`TaskHarness` (a
  :class:`ManualClock`, an in-memory store, a limiter on both, and a :class:`TaskLedger`
  of what each run consumed and waited), :func:`use_limiter`; the pytest plugin
  (:mod:`zae_celery.testing.plugin`, off unless enabled) hands a harness out as ``zae``.
- Request counting: :class:`RequestCounter` counts the DynamoDB requests of a boto3
  client per operation, :func:`count_worker_requests` installs one in every worker pool
  process of a Celery app, and :class:`CountingProxy` counts at the endpoint, for every
  process pointed at it; on a Redis store, :func:`redis_script_calls` reads the server's
  count of script calls (one per operation).

>>> import pytest                                          # doctest: +SKIP
>>> from zae_celery import Limit, RateLimiter
>>> from zae_celery.testing import moto_server, use_local_credentials
>>> @pytest.fixture(scope="session")
... def dynamodb():
...     use_local_credentials()
...     with moto_server() as server:
...         yield server
>>> def test_limit(dynamodb):
...     limiter = RateLimiter("limits", endpoint_url=dynamodb.url)
...     limiter.create_table()

Nothing here is needed in production, and importing it starts nothing.
"""

from zae_celery.core.stores import MemoryStore
from zae_celery.testing.counting import (
    CountingProxy,
    RequestCounter,
    count_worker_requests,
    redis_script_calls,
)
from zae_celery.testing.servers import (
    DYNAMODB_LOCAL_NPM_PACKAGE,
    LocalServer,
    ServerUnavailable,
    dynamodb_local,
    dynamodb_local_dir,
    free_port,
    moto_server,
    redis_server,
    redis_server_path,
    reset_moto,
    use_local_credentials,
    valkey_server_path,
)
from zae_celery.testing.tasks import (
    T0,
    ManualClock,
    TaskHarness,
    TaskLedger,
    TaskRun,
    use_limiter,
)

__all__ = [
    "DYNAMODB_LOCAL_NPM_PACKAGE",
    "T0",
    "CountingProxy",
    "LocalServer",
    "ManualClock",
    "MemoryStore",
    "RequestCounter",
    "ServerUnavailable",
    "TaskHarness",
    "TaskLedger",
    "TaskRun",
    "count_worker_requests",
    "dynamodb_local",
    "dynamodb_local_dir",
    "free_port",
    "moto_server",
    "redis_script_calls",
    "redis_server",
    "redis_server_path",
    "reset_moto",
    "use_limiter",
    "use_local_credentials",
    "valkey_server_path",
]
