"""Fault injection in front of a real DynamoDB endpoint, for the reliability tests.

- :class:`TcpProxy`: forwards a 127.0.0.1 port to the endpoint. ``stop()`` is an outage:
  the listener closes (new connections are refused) and every open connection is reset;
  ``start()`` listens again on the same port. The endpoint behind it keeps its tables.
- :class:`FaultyHttpProxy`: an HTTP proxy that answers the next ``count`` requests with
  a DynamoDB error reply of its own (throttling, 5xx) and forwards all the others;
- :class:`FaultyRedisProxy`: a TCP proxy in front of a redis-server that answers the next
  ``count`` script calls with a Redis error reply of its own (OOM, LOADING...);
- :class:`DeadEndpoint`: an address whose connections time out, or hang unanswered.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from typing import TypeVar
from urllib.parse import urlsplit

from zae_celery.testing import CountingProxy, free_port

P = TypeVar("P", bound="TcpProxy")

__all__ = ["DeadEndpoint", "FaultyHttpProxy", "FaultyRedisProxy", "TcpProxy"]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """A stoppable TCP forwarder from ``127.0.0.1:<port>`` to ``target`` (an http URL)."""

    def __init__(self, target: str) -> None:
        self.target = _host_port(target)
        self.port = free_port()
        self.accepted = 0
        """Connections accepted so far (all runs)."""
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        """The proxy's address, to give to clients instead of the endpoint's."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """The outage: refuse new connections and reset every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        with self._lock:
            conns, self._open = self._open, set()
        for sock in conns:
            _reset(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _reset(client)
                    _reset(upstream)
                    return
                self.accepted += 1
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        """Forget and reset the sockets of a connection that ended."""
        for sock in socks:
            with self._lock:
                self._open.discard(sock)
            _reset(sock)

    def __enter__(self: P) -> P:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultyHttpProxy(CountingProxy):
    """Forwards DynamoDB requests to ``target``; :meth:`inject` makes the next ``count``
    requests fail with an error reply of the proxy's own."""

    def __init__(self, target: str) -> None:
        self.requests: list[tuple[str, bool]] = []
        """(operation, forwarded) for every request received."""
        self._left = 0
        self._error: tuple[int, str] = (400, "ThrottlingException")
        self._faults = threading.Lock()
        super().__init__(target)

    def inject(self, count: int, code: str = "ThrottlingException", status: int = 400) -> None:
        """Answer the next ``count`` requests with ``status`` and DynamoDB error ``code``."""
        with self._faults:
            self._left, self._error = count, (status, code)

    def _intercept(self, operation: str) -> tuple[int, list[tuple[str, str]], bytes] | None:
        with self._faults:
            failing = self._left > 0
            if failing:
                self._left -= 1
            self.requests.append((operation, not failing))
            status, code = self._error
        if not failing:
            return None
        payload = json.dumps(
            {
                "__type": f"com.amazonaws.dynamodb.v20120810#{code}",
                "message": f"injected by the test proxy: {code}",
            }
        ).encode()
        return status, [("Content-Type", "application/x-amz-json-1.0")], payload


class FaultyRedisProxy(TcpProxy):
    """Forwards a redis-server's connections; :meth:`inject` makes the next ``count``
    script calls (EVALSHA/EVAL) fail with ``error`` as the server's reply, e.g.
    ``"OOM command not allowed"`` or ``"LOADING Redis is loading"``. Clients must send
    one command at a time (no pipelining), as the store does."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self._left = 0
        self._error = "ERR injected"
        self._faults = threading.Lock()

    @property
    def url(self) -> str:
        """The proxy's address as a redis URL."""
        return f"redis://127.0.0.1:{self.port}"

    def inject(self, count: int, error: str) -> None:
        """Answer the next ``count`` script calls with the error reply ``error``."""
        with self._faults:
            self._left, self._error = count, error

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        if src.getpeername()[1] == self.target[1] and src.getpeername()[0] == self.target[0]:
            super()._pump(src, dst)  # replies flow back untouched
            return
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while (end := _command_end(buffer)) is not None:
                    command, buffer = buffer[:end], buffer[end:]
                    failing = self._take(command)
                    if failing is None:
                        dst.sendall(command)
                    else:
                        src.sendall(b"-" + failing.encode() + b"\r\n")
        except OSError:
            pass
        self._drop(src, dst)

    def _take(self, command: bytes) -> str | None:
        name = command.split(b"\r\n", 3)[2].upper() if command.startswith(b"*") else b""
        with self._faults:
            if self._left > 0 and name in (b"EVALSHA", b"EVAL"):
                self._left -= 1
                return self._error
        return None


def _command_end(buffer: bytes) -> int | None:
    """Where the first complete RESP command (an array of bulk strings) in ``buffer``
    ends, or None while it is incomplete."""
    line = buffer.find(b"\r\n")
    if line < 0:
        return None
    if not buffer.startswith(b"*"):
        return line + 2  # an inline command
    pos = line + 2
    for _ in range(int(buffer[1:line])):
        head = buffer.find(b"\r\n", pos)
        if head < 0:
            return None
        pos = head + 2 + int(buffer[pos + 1 : head]) + 2
        if pos > len(buffer):
            return None
    return pos


class DeadEndpoint:
    """An endpoint that never answers: ``accept=False`` drops connection attempts (the
    client's connect times out), ``accept=True`` accepts and then stays silent (the
    client's read times out)."""

    def __init__(self, accept: bool) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        if accept:
            self._listener.listen(128)
            threading.Thread(target=self._hold, daemon=True).start()
        else:
            # A backlog of 0 filled by one connection: the kernel drops further SYNs.
            self._listener.listen(0)
            self._held.append(socket.create_connection(self._listener.getsockname()))

    def _hold(self) -> None:
        while True:
            try:
                self._held.append(self._listener.accept()[0])
            except OSError:
                return

    @property
    def url(self) -> str:
        """The endpoint's address."""
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        """Close the listener and every connection held."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._held:
            _reset(sock)
