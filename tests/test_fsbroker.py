"""The atomic filesystem broker (``zaefs://``) at the moments kombu's own transport races.

A worker that starts while another creates an exchange table sees the file existing but
still empty; a consumer may list a message file before its writer has finished it. The
real-worker tests exercise the broker as a whole; these pin the race points.
"""

# kombu ships no type information.
# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from harness import fsbroker
from tests.conftest import REPO


@pytest.fixture
def connection(tmp_path: Path) -> Iterator[Any]:
    fsbroker.register()
    conn = Connection(
        f"{fsbroker.SCHEME}://", transport_options=fsbroker.transport_options(tmp_path)
    )
    yield conn
    conn.release()


def test_an_exchange_table_created_but_not_yet_written_has_no_bindings(
    connection: Any, tmp_path: Path
) -> None:
    (tmp_path / "control" / "jobs.exchange").write_bytes(b"")  # created, not written yet
    channel = connection.default_channel
    assert channel.get_table("jobs") == []
    # Binding a queue on it neither crashes nor loses the binding.
    Queue("q1", Exchange("jobs", type="direct"), routing_key="q1")(channel).declare()
    Queue("q2", Exchange("jobs", type="direct"), routing_key="q2")(channel).declare()
    assert sorted(b.queue for b in channel.get_table("jobs")) == ["q1", "q2"]


def test_a_publish_never_shows_a_partial_message_file(connection: Any, tmp_path: Path) -> None:
    queue = Queue("work", Exchange("work", type="direct"), routing_key="work")
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="work", declare=[queue])
    messages = tmp_path / "messages"
    visible = [p for p in messages.iterdir() if p.name.endswith(".work.msg")]
    assert len(visible) == 1 and visible[0].stat().st_size > 0
    assert not [p for p in messages.iterdir() if p.name.endswith(".staging")]
    got = queue(connection.default_channel).get()
    assert got is not None and got.payload == {"n": 1}


def test_importing_registers_nothing_until_register_is_called() -> None:
    # A fresh interpreter: this session's fixtures have already registered the scheme.
    code = (
        "from kombu.transport import TRANSPORT_ALIASES as t\n"
        "from harness import fsbroker\n"
        "assert fsbroker.SCHEME not in t, t.get(fsbroker.SCHEME)\n"
        "fsbroker.register()\n"
        "print(t[fsbroker.SCHEME])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "harness.fsbroker:AtomicTransport"
