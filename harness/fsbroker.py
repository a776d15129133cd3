"""A broker without a server: kombu's filesystem transport with atomic publishes.

kombu's filesystem transport opens the message file under its final name and then
writes it, so a worker in another process may pick the file up while it is still empty
and die on the JSON decode ("Unrecoverable error: JSONDecodeError", kombu#1551). Several
``celery worker`` processes that defer tasks publish constantly, so here each message is
written to a hidden temporary file in the same folder (a name kombu's ``_get`` never
matches: it wants ``<stamp>_<id>.<queue>.msg``) and renamed into place, which is atomic
on POSIX. The exchange tables (which queues an exchange routes to) have the same race:
kombu creates a table file empty and then writes it, so a worker starting at the same
moment as another may read it empty and die; here a table is created, read and rewritten
under one exclusive lock, and an empty table reads as no bindings. Used by the
real-worker tests, the benchmarks and the demo.

Importing this module changes nothing. Call :func:`register` to register the transport
with kombu under :data:`SCHEME`, in every process that uses it, before the broker URL is
used: a Celery app module that ``celery worker`` loads calls it where it sets the broker.
Then use the broker URL ``zaefs://`` with ``broker_transport_options =
transport_options(folder)``.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps, loads

SCHEME = "zaefs"
"""The broker URL scheme of this transport (``zaefs://``), once :func:`register` ran."""


def register() -> None:
    """Register :class:`AtomicTransport` with kombu under :data:`SCHEME` (idempotent)."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:AtomicTransport"


def transport_options(folder: Path) -> dict[str, Any]:
    """``broker_transport_options`` for a broker living in ``folder`` (created here)."""
    for sub in ("messages", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "messages"),
        "data_folder_out": str(folder / "messages"),
        # Consumed files are moved here (a rename on the same filesystem: two workers
        # racing for one file cannot both win), and removed with the folder at the end.
        "store_processed": True,
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.05,
    }


def _bindings(data: bytes) -> list[Any]:
    """An exchange table's rows; a file just created (still empty) has none."""
    rows = loads(data) if data.strip() else []  # type: ignore[no-untyped-call]
    return [filesystem.exchange_queue_t(*q) for q in rows]


class AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel, publishing by write-then-rename."""

    # kombu's own bases disagree on the name of the second argument (message/payload).
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        folder = self.data_folder_out
        # The final name follows kombu's scheme: consumers sort by the millisecond
        # stamp (FIFO across processes) and match the ".<queue>.msg" suffix.
        final = os.path.join(folder, f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg")
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".", suffix=".staging")
        try:
            with os.fdopen(fd, "wb") as out:
                # kombu's own encoder, as its reader expects
                out.write(dumps(payload).encode())  # type: ignore[no-untyped-call]
            os.replace(staging, final)
        except BaseException:
            if os.path.exists(staging):
                os.unlink(staging)
            raise

    def get_table(self, exchange: Any) -> list[Any]:
        """The exchange's bindings; a table file another process just created (still
        empty) has none yet."""
        file = self._exchange_file(exchange)  # type: ignore[no-untyped-call]
        try:
            with file.open("rb") as table:
                filesystem.lock(table, filesystem.LOCK_SH)  # type: ignore[no-untyped-call]
                try:
                    data = table.read()
                finally:
                    filesystem.unlock(table)  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            return []
        return _bindings(data)

    def _queue_bind(self, exchange: Any, routing_key: Any, pattern: Any, queue: Any) -> None:
        """Add a binding: create (never truncate), read and rewrite the table under one
        exclusive lock, so concurrent workers cannot see it half-written."""
        file = self._exchange_file(exchange)  # type: ignore[no-untyped-call]
        self.control_folder.mkdir(exist_ok=True)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b", buffering=0) as table:
            filesystem.lock(table, filesystem.LOCK_EX)  # type: ignore[no-untyped-call]
            try:
                bindings = _bindings(table.read())
                if binding not in bindings:
                    bindings.insert(0, binding)
                    table.seek(0)
                    table.truncate()
                    table.write(dumps(bindings).encode())  # type: ignore[no-untyped-call]
            finally:
                filesystem.unlock(table)  # type: ignore[no-untyped-call]


class AtomicTransport(filesystem.Transport):
    """The filesystem transport with :class:`AtomicChannel`."""

    Channel = AtomicChannel
