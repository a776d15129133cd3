"""Local stand-ins for development, tests, the demo and the benchmarks.

- :mod:`~zae_celery.local.servers`: moto server, DynamoDB Local and redis-server on free
  127.0.0.1 ports, stopped by PID;
- :mod:`~zae_celery.local.workers`: a fleet of real ``celery worker`` processes, each in
  its own process group, waited for until ready and stopped by PID;
- :mod:`~zae_celery.local.provider`: an HTTP LLM provider on 127.0.0.1 that enforces its
  own rpm and tpm limits (429 with ``Retry-After``) and records every request;
- :mod:`~zae_celery.local.counting`: a counter of a boto3 client's DynamoDB requests.

Nothing here is needed in production.
"""

from zae_celery.local.counting import CountingProxy, RequestCounter, count_worker_requests
from zae_celery.local.provider import (
    DEFAULT_MAX_TOKENS,
    LocalProvider,
    ProviderRecord,
    Usage,
    billed_usage,
    count_tokens,
)
from zae_celery.local.servers import (
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
)
from zae_celery.local.workers import FleetError, log_text, signals_held, stop_workers, worker_fleet

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DYNAMODB_LOCAL_NPM_PACKAGE",
    "CountingProxy",
    "FleetError",
    "LocalProvider",
    "LocalServer",
    "ProviderRecord",
    "RequestCounter",
    "ServerUnavailable",
    "Usage",
    "billed_usage",
    "count_tokens",
    "count_worker_requests",
    "dynamodb_local",
    "dynamodb_local_dir",
    "free_port",
    "log_text",
    "moto_server",
    "redis_server",
    "redis_server_path",
    "reset_moto",
    "signals_held",
    "stop_workers",
    "use_local_credentials",
    "worker_fleet",
]
