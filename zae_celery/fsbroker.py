"""A broker without a server: kombu's filesystem transport with atomic publishes.

kombu's filesystem transport opens the message file under its final name and then
writes it, so a worker in another process may pick the file up while it is still empty
and die on the JSON decode ("Unrecoverable error: JSONDecodeError", kombu#1551). Several
``celery worker`` processes that defer tasks publish constantly, so here each message is
written to a hidden temporary file in the same folder (a name kombu's ``_get`` never
matches: it wants ``<stamp>_<id>.<queue>.msg``) and renamed into place, which is atomic
on POSIX. Used by the real-worker tests, the benchmarks and the demo.

Importing this module registers the transport under :data:`SCHEME`: use the broker URL
``zaefs://`` with ``broker_transport_options = transport_options(folder)``.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps

SCHEME = "zaefs"


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


class AtomicTransport(filesystem.Transport):
    """The filesystem transport with :class:`AtomicChannel`."""

    Channel = AtomicChannel


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:AtomicTransport"
