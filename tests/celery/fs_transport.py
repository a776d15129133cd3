"""kombu's filesystem transport with atomic writes, for the real-worker tests.

kombu's filesystem ``_put`` creates the message file and then writes it; a consumer in
another process can move and read it in between and crash on an empty message
(kombu#1551: "Unrecoverable error: JSONDecodeError"). Here the message is written to a
``.part`` file (which no consumer matches) and renamed into place.
"""

from __future__ import annotations

import json
import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem

ALIAS = "zaefs"


class Channel(filesystem.Channel):
    """Writes each message under a temporary name, then renames it into the queue."""

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"
        with open(partial, "wb") as f:
            f.write(json.dumps(payload).encode())
        os.replace(partial, final)


class Transport(filesystem.Transport):
    """The filesystem transport with :class:`Channel`."""

    Channel = Channel


TRANSPORT_ALIASES[ALIAS] = f"{__name__}:Transport"
