"""``zae-celery top``: the view's readings on the in-memory store with an injected clock
(the rates and windows exactly), its table through rich's console capture, and the
command itself against real stores, on a pseudo-terminal (rich's Live) and as JSON."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from tests.helpers import Clock
from tests.test_cli import Store, run, store  # noqa: F401  (the store fixture)
from zae_celery.cli import main
from zae_celery.cli.top import TopView, Watch, render
from zae_celery.core import Limit, RateLimiter
from zae_celery.core.stores import MemoryStore
from zae_celery.testing import LocalServer

RPM = Limit.per_minute("rpm", 60)
TPM = Limit.per_minute("tpm", 6000)
LIMITS = [RPM, TPM]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> RateLimiter:
    return RateLimiter(store=MemoryStore(clock=clock), clock=clock)


def call(limiter: RateLimiter, tokens: int, billed: int, entity: str = "tenant") -> None:
    """One request: ``tokens`` estimated, ``billed`` reported afterwards."""
    with limiter.acquire(entity, "gpt", {"rpm": 1, "tpm": tokens}, LIMITS) as lease:
        lease.adjust(tpm=billed - tokens)


def rows_by_limit(view: TopView) -> dict[str, object]:
    return {row.limit: row for row in view.read()}


def test_the_rate_over_the_window_is_what_was_charged_in_it(
    limiter: RateLimiter, clock: Clock
) -> None:
    view = TopView(limiter, [Watch("tenant")], LIMITS, window=60)
    call(limiter, 500, 300)  # before the first reading: not in any window
    first = view.read()
    assert [(r.limit, r.charged, r.per_period, r.blocks) for r in first] == [
        ("rpm", None, None, None),  # one reading: nothing to compare yet
        ("tpm", None, None, None),
    ]
    for _ in range(30):  # one request every 2 s for a minute: 30 rpm, 30 x 150 tokens
        clock.advance(2)
        call(limiter, 400, 150)
    rows = rows_by_limit(view)
    rpm, tpm = rows["rpm"], rows["tpm"]
    assert (rpm.charged, rpm.span, rpm.per_period, rpm.share) == (30, 60, 30, 0.5)  # type: ignore[attr-defined]
    assert (tpm.charged, tpm.per_period) == (4500, 4500)  # type: ignore[attr-defined]
    assert tpm.share == pytest.approx(0.75)  # type: ignore[attr-defined]
    # The bucket refilled between requests: its TAT alone could not have told this.
    assert rpm.available == pytest.approx(RPM.burst - 1, abs=0.01)  # type: ignore[attr-defined]


def test_the_window_slides_and_keeps_one_reading_before_it(
    limiter: RateLimiter, clock: Clock
) -> None:
    view = TopView(limiter, [Watch("tenant", "gpt")], LIMITS, window=10)
    call(limiter, 100, 100)
    view.read()
    for _ in range(4):  # readings every 5 s; one request before each
        clock.advance(5)
        call(limiter, 100, 100)
        rows = rows_by_limit(view)
    rpm = rows["rpm"]
    # Readings at 0, 5, 10, 15, 20 s: the window of 10 s compares 20 s with 10 s.
    assert (rpm.span, rpm.charged) == (10, 2)  # type: ignore[attr-defined]
    clock.advance(3)  # at 23 s: no reading 10 s back; the last one before (10 s) counts
    rpm = rows_by_limit(view)["rpm"]
    assert (rpm.span, rpm.charged) == (13, 2)  # type: ignore[attr-defined]


def test_blocks_debt_and_waiting_slots(limiter: RateLimiter, clock: Clock) -> None:
    view = TopView(limiter, [Watch("tenant")], LIMITS, window=60)
    view.read()
    call(limiter, 1000, 9000)  # 3000 tokens of debt beyond the burst of 6000
    limiter.block("tenant", "gpt", LIMITS, 5.0)
    clock.advance(1)
    rows = rows_by_limit(view)
    tpm, rpm = rows["tpm"], rows["rpm"]
    assert tpm.blocks == 1 and rpm.blocks == 1  # type: ignore[attr-defined]
    assert tpm.charged == 9000  # type: ignore[attr-defined]
    # tpm: 3000 of debt (30 s of refill, beyond the block's 5 s), less 1 s of refill;
    # rpm: the block (5 s of 1 a second) less 1 s.
    assert tpm.ahead == pytest.approx(2900)  # type: ignore[attr-defined]
    assert rpm.ahead == pytest.approx(4)  # type: ignore[attr-defined]


def test_an_expired_item_starts_the_history_again(clock: Clock) -> None:
    limiter = RateLimiter(store=MemoryStore(clock=clock), clock=clock)
    view = TopView(limiter, [Watch("tenant")], LIMITS, window=60)
    for _ in range(3):
        call(limiter, 100, 100)
    view.read()
    limiter.delete_table()  # every item gone, as after a day idle (TTL)
    limiter.create_table()
    clock.advance(5)
    call(limiter, 100, 100)
    assert rows_by_limit(view)["tpm"].charged is None  # type: ignore[attr-defined]
    clock.advance(5)
    call(limiter, 100, 100)
    assert rows_by_limit(view)["tpm"].charged == 100  # type: ignore[attr-defined]


def test_the_table_shows_rate_share_debt_and_blocks(limiter: RateLimiter, clock: Clock) -> None:
    view = TopView(limiter, [Watch("tenant"), Watch.of_queue("emails")], LIMITS, window=60)
    view.read()
    for _ in range(12):
        clock.advance(5)
        call(limiter, 500, 500)
    call(limiter, 500, 9000)
    limiter.block("tenant", "gpt", LIMITS, 2.0)
    rows = view.read()
    console = Console(record=True, width=140, force_terminal=True, color_system="standard")
    console.print(render(rows, "zae-celery top · test", {"emails": 7}))
    text = console.export_text(styles=False, clear=False)
    lines = {line.split("│")[3].strip(): line for line in text.splitlines() if "│ tenant" in line}
    assert set(lines) == {"rpm", "tpm"}
    assert "13/m (22%)" in lines["rpm"]  # 13 requests over the last 60 s of a 60/m limit
    assert "15,000/m (250%)" in lines["tpm"] and lines["tpm"].rstrip(" │").endswith("1")
    assert "messages waiting in the broker: emails: 7" in text
    styled = console.export_text(styles=True)
    assert "\x1b[31m15,000/m (250%)" in styled  # beyond the limit: red
    assert "queue emails" not in text  # no queue limits: --limit is for the entities


def test_a_view_needs_something_to_watch(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="at least one entity or queue"):
        TopView(limiter, [])


# -- the command against real stores --------------------------------------------------------
@pytest.mark.integration
def test_top_prints_a_json_line_per_refresh(store: Store, tmp_path: Path) -> None:  # noqa: F811
    limiter = store.limiter()
    call(limiter, 200, 100)
    svg = tmp_path / "top.svg"
    args = ["top", "tenant", "--limit", "rpm=60/m", "--limit", "tpm=6000/m"]
    result = run(store.cli(*args, "--count", "2", "--interval", "0.2", "--json"))
    assert result.exit_code == 0, result.output
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(frames) == 2
    first, second = ({r["limit"]: r for r in f["rows"]} for f in frames)
    assert first["tpm"]["charged"] is None and 5900 <= first["tpm"]["available"] <= 6000
    assert second["tpm"]["charged"] == 0 and second["rpm"]["blocks"] == 0  # nothing since
    assert second["tpm"]["span_seconds"] >= 0.2
    result = run(store.cli(*args, "--count", "1", "--svg", str(svg)), env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "tenant" in result.stdout and svg.read_text().startswith("<svg")


def test_top_refuses_what_it_cannot_show() -> None:
    assert run(["top"]).exit_code == 2
    result = run(["top", "tenant", "--broker", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and "--queue" in result.output
    result = run(["top", "bad#id"])
    assert result.exit_code == 2 and "no # or *" in result.output


@pytest.mark.integration
def test_top_counts_the_messages_waiting_in_a_queue(redis: LocalServer) -> None:
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue

    url = f"redis://127.0.0.1:{redis.port}/4"
    name = f"emails-{uuid.uuid4().hex[:8]}"
    with Connection(url) as conn:  # type: ignore[no-untyped-call]
        queue = Queue(name, Exchange(name), name)  # type: ignore[no-untyped-call]
        producer = conn.Producer()
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
    store_url = f"redis://127.0.0.1:{redis.port}/5?prefix=top-{uuid.uuid4().hex[:8]}"
    args = ["--store", store_url, "top", "--queue", name, "--queue", "nobody-declared-this"]
    result = CliRunner().invoke(main, [*args, "--broker", url, "--count", "1", "--json"])
    assert result.exit_code == 0, result.output
    (frame,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert frame == {"rows": [], "queues": {name: 3, "nobody-declared-this": None}}


@pytest.mark.integration
def test_top_draws_live_on_a_terminal(redis: LocalServer) -> None:
    store_url = f"redis://127.0.0.1:{redis.port}/5?prefix=top-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter.from_url(store_url)
    call(limiter, 300, 300, entity="tenant-7")
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "30", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    env.pop("CI", None)  # some consoles treat CI as "not a terminal"
    script = str(Path(sys.executable).parent / "zae-celery")
    command = [script, "--store", store_url, "top", "tenant-7"]
    process = subprocess.Popen(
        [*command, "--limit", "rpm=60/m", "--count", "2", "--interval", "0.2"],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env=env,
        close_fds=True,
    )
    os.close(child_fd)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=30) == 0, output.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main_fd)
    text = output.decode(errors="replace")
    assert text.startswith("\x1b[?25l")  # rich's Live: the cursor hidden while it draws
    # Two refreshes (and Live's last draw when it stops), each over the one before.
    assert text.count("zae-celery top") >= 2 and "\x1b[2K" in text
    rows = [line for line in text.splitlines() if "│ tenant-7" in line]
    rpm = [row for row in rows if "│ rpm" in row][-1]
    tpm = [row for row in rows if "│ tpm" in row][-1]
    assert "/60 " in rpm and "0/m (0%)" in rpm
    assert "│ ?" in tpm  # a limit that was not passed: its fill is unknown
