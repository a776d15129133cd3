"""``top``: a live view of buckets as a fleet uses them.

Every ``--interval`` seconds it reads the watched entities' buckets (one read of the
entity and one per page of buckets, as ``buckets`` does) and, with ``--broker``, how
many messages wait in each watched queue. Nothing is added to the workers' hot path:
what it shows comes from what they write anyway.

* **fill**: the tokens available now against the burst; **ahead**: tokens owed beyond an
  empty bucket, i.e. the slots waiting tasks hold (a request-count limit: one per task)
  and debt.
* **last min**: the tokens charged over the last ``--window`` seconds, from the
  bucket's ``used`` counter (exact: the difference of two readings, see
  :attr:`~zae_celery.core.BucketStatus.charged`), in the limit's own period, and as a
  share of the limit.
* **429s**: the provider blocks written on the bucket's item in that window.

:class:`TopView` keeps the readings and makes the rows, :func:`render` the table; the
command only loops over them (rich's Live on a terminal, a frame per refresh otherwise).
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import click

from zae_celery.cli.errors import translate_errors
from zae_celery.cli.options import (
    CONTEXT,
    Target,
    id_argument,
    limits_option,
    pass_target,
    resource_option,
)
from zae_celery.core import BucketStatus, Limit, RateLimiter, ValidationError
from zae_celery.queues import QUEUE_ENTITY_PREFIX, QUEUE_RESOURCE

__all__ = ["QueueDepths", "TopRow", "TopView", "Watch", "render", "top"]


@dataclass(frozen=True)
class Watch:
    """An entity (every resource, or one) or a queue that ``top`` shows."""

    entity_id: str
    resource: str | None = None
    queue: str | None = None
    """The queue's name, when the entity holds a queue's limits."""

    @classmethod
    def of_queue(cls, name: str) -> Watch:
        """The buckets of the queue limits of ``name``."""
        return cls(QUEUE_ENTITY_PREFIX + name, QUEUE_RESOURCE, name)

    @property
    def label(self) -> str:
        """How the table names it."""
        return f"queue {self.queue}" if self.queue is not None else self.entity_id


@dataclass(frozen=True)
class TopRow:
    """One limit of one bucket, as ``top`` shows it."""

    label: str
    entity_id: str
    resource: str
    limit: str
    rate: str
    """The configured rate (``480/m``)."""
    burst: int | None
    available: float | None
    ahead: float
    """Tokens owed beyond an empty bucket: waiting tasks' slots and debt (0 when none)."""
    charged: float | None
    """Tokens charged over :attr:`span` seconds (None: a single reading so far)."""
    span: float
    """Seconds between the readings that :attr:`charged` and :attr:`blocks` compare."""
    per_period: float | None
    """:attr:`charged` as a rate in the limit's period (``412`` of ``480/m``)."""
    share: float | None
    """:attr:`per_period` over the limit's refill amount (1.0: exactly the limit)."""
    blocks: int | None
    """Provider blocks (429s) written on the bucket in :attr:`span` seconds."""
    used: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``top --json``)."""
        return {
            "entity": self.entity_id,
            "resource": self.resource,
            "limit": self.limit,
            "rate": self.rate,
            "burst": self.burst,
            "available": self.available,
            "ahead": self.ahead,
            "charged": self.charged,
            "span_seconds": round(self.span, 3),
            "per_period": self.per_period,
            "share": self.share,
            "blocks": self.blocks,
            "used": self.used,
        }


@dataclass
class _History:
    """One limit's readings: (time, tokens charged, blocks) within the window."""

    readings: deque[tuple[float, int, int]] = field(default_factory=deque)


class TopView:
    """The readings of the watched buckets over a window, and the rows they make.

    ``code_limits`` are those the code passes for the entities (stored limits override
    them), not for queues: a queue's limits are shown as stored, or as its bucket holds
    them. ``clock`` gives the reading times (the limiter's clock by default), so a test
    drives the window without waiting.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        watches: Sequence[Watch],
        code_limits: Sequence[Limit] = (),
        window: float = 60.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not watches:
            raise ValidationError("watches", "none", "at least one entity or queue")
        self.limiter = limiter
        self.watches = tuple(watches)
        self.code_limits = tuple(code_limits)
        self.window = window
        self.clock = clock or limiter.clock
        self._history: dict[tuple[str, str, str], _History] = {}
        self._read_at: dict[Watch, float] = {}

    def read(self) -> list[TopRow]:
        """Read every watched bucket once; the rows, with the charges over the window."""
        rows = []
        for watch in self.watches:
            code = () if watch.queue is not None else self.code_limits
            statuses = self.limiter.buckets(watch.entity_id, watch.resource, code)
            now = self.clock()
            before = self._read_at.get(watch)
            rows += [self._row(watch, status, now, before) for status in statuses]
            self._read_at[watch] = now
        return rows

    def _row(self, watch: Watch, status: BucketStatus, now: float, before: float | None) -> TopRow:
        key = (status.entity_id, status.resource, status.limit_name)
        if key not in self._history and before is not None:
            # A bucket the last reading did not see: its counters were 0 then.
            self._history[key] = _History(deque([(before, 0, 0)]))
        history = self._history.setdefault(key, _History()).readings
        charged = status.charged or 0  # no counter yet: nothing charged
        if history and (charged < history[-1][1] or status.blocks < history[-1][2]):
            history.clear()  # the item expired and began again: older readings mean nothing
        history.append((now, charged, status.blocks))
        while len(history) > 2 and history[1][0] <= now - self.window:
            history.popleft()  # keep one reading at or before the window's start
        first_at, first_charged, first_blocks = history[0]
        span = now - first_at
        delta: float | None = None
        per_period = share = None
        blocks: int | None = None
        if len(history) > 1 and span > 0:
            delta = float(charged - first_charged)
            blocks = status.blocks - first_blocks
            per_period = delta / span * status.refill_period_ms / 1000
            share = per_period / status.refill_amount
        return TopRow(
            label=watch.label,
            entity_id=status.entity_id,
            resource=status.resource,
            limit=status.limit_name,
            rate=status.rate,
            burst=status.burst,
            available=status.available,
            ahead=max(0.0, -status.available) if status.available is not None else 0.0,
            charged=delta,
            span=span,
            per_period=per_period,
            share=share,
            blocks=blocks,
            used=status.used,
        )


class QueueDepths:
    """How many messages wait in each queue, asked of the broker (a passive declare)."""

    def __init__(self, broker_url: str) -> None:
        from kombu.connection import Connection

        self.connection: Any = Connection(broker_url, connect_timeout=5)  # type: ignore[no-untyped-call]

    def read(self, queues: Sequence[str]) -> dict[str, int | None]:
        """Messages ready in each queue (None: the broker does not know the queue)."""
        depths: dict[str, int | None] = {}
        for name in queues:
            channel = self.connection.channel()
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except self.connection.channel_errors:
                depths[name] = None
            finally:
                channel.close()
        return depths

    def close(self) -> None:
        """Close the broker connection."""
        self.connection.release()


def _number(value: float) -> str:
    if abs(value - round(value)) < 0.05:
        return f"{round(value):,}"
    return f"{value:,.1f}"


def _fill(row: TopRow, width: int = 12) -> str:
    if row.available is None or not row.burst:
        return "?"
    share = min(1.0, max(0.0, row.available / row.burst))
    full = round(share * width)
    color = "red" if row.available < 0 else "yellow" if share < 0.2 else "green"
    bar = f"[{color}]{'█' * full}[/{color}][dim]{'░' * (width - full)}[/dim]"
    return f"{bar} {_number(row.available)}/{_number(row.burst)}"


def _last_minute(row: TopRow) -> str:
    if row.per_period is None or row.share is None:
        return "…"
    unit = row.rate.split("/", 1)[1]
    color = "red" if row.share > 1.005 else "green" if row.share >= 0.9 else "default"
    rate = _number(row.per_period) if row.per_period < 100 else f"{row.per_period:,.0f}"
    return f"[{color}]{rate}/{unit} ({row.share:.0%})[/{color}]"


def render(
    rows: Sequence[TopRow],
    title: str,
    depths: dict[str, int | None] | None = None,
) -> Any:
    """The table of one refresh (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", caption_justify="left")
    for column, justify in (
        ("entity", "left"),
        ("resource", "left"),
        ("limit", "left"),
        ("rate", "right"),
        ("fill", "left"),
        ("ahead", "right"),
        ("last min", "right"),
        ("429s", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        ahead = "" if not row.ahead else f"[red]{_number(row.ahead)}[/red]"
        table.add_row(
            row.label,
            row.resource,
            row.limit,
            row.rate,
            _fill(row) if row.used else "[dim]full (unused)[/dim]",
            ahead,
            _last_minute(row),
            "…" if row.blocks is None else (f"[red]{row.blocks}[/red]" if row.blocks else "0"),
        )
    parts: list[Any] = [table]
    if not rows:
        parts.append(Text("No buckets yet: they appear with the first request.", style="dim"))
    if depths:
        waiting = ", ".join(
            f"{name}: {'?' if n is None else f'{n:,}'}" for name, n in depths.items()
        )
        parts.append(Text(f"messages waiting in the broker: {waiting}"))
    return Group(*parts)


def _ids(field_name: str) -> Callable[[click.Context, click.Parameter, Any], list[str]]:
    """Callback of repeated ids: :func:`id_argument` on each."""
    one = id_argument(field_name)

    def check(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[str]:
        return [one(ctx, param, value) for value in values]

    return check


def _frames(count: int | None, interval: float) -> Iterator[int]:
    """Frame numbers, ``interval`` seconds apart (the refresh cadence of the view)."""
    frame = 0
    while count is None or frame < count:
        if frame:
            time.sleep(interval)
        yield frame
        frame += 1


@click.command(context_settings=CONTEXT)
@click.argument("entities", metavar="[ENTITY]...", nargs=-1, callback=_ids("entity"))
@resource_option
@click.option(
    "--queue",
    "queues",
    multiple=True,
    callback=_ids("queue"),
    metavar="NAME",
    help="A queue's limits (zae_queue_limits); repeatable.",
)
@click.option(
    "--limit",
    "limit_specs",
    multiple=True,
    callback=limits_option,
    metavar="SPEC",
    help="A limit your code passes for the ENTITY buckets (stored limits override it); repeatable.",
)
@click.option(
    "--broker",
    metavar="URL",
    help="The Celery broker: also show the messages waiting in each --queue.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes (each is one read per entity).",
)
@click.option(
    "--window",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    help="Seconds over which 'last min' and '429s' are counted.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Stop after this many refreshes (default: until Ctrl-C).",
)
@click.option("--json", "as_json", is_flag=True, help="Print each refresh as a line of JSON.")
@click.option(
    "--svg",
    "svg_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also save the last refresh as an SVG picture of the terminal.",
)
@pass_target
def top(
    target: Target,
    entities: list[str],
    resource: str | None,
    queues: list[str],
    limit_specs: list[Limit],
    broker: str | None,
    interval: float,
    window: float,
    count: int | None,
    as_json: bool,
    svg_file: str | None,
) -> None:
    """Watch buckets live: fill and debt, the rate over the last minute against the
    limit, the slots waiting tasks hold, and recent 429s.

    Reads the buckets of each ENTITY (every resource, or --resource) and of each
    --queue every --interval seconds; the workers do nothing more for it. The rate is
    exact: it is the difference of the bucket's counter of charged tokens between two
    readings. With --broker, also the messages waiting in each --queue.

    \b
    Example:
      zae-celery top tenant-42 tenant-7 --resource gpt-4o --limit rpm=500/m
      zae-celery top --queue emails --broker redis://localhost:6379/0
    """
    watches = [Watch(entity, resource) for entity in entities]
    watches += [Watch.of_queue(name) for name in queues]
    if not watches:
        raise click.UsageError("name at least one ENTITY or --queue to watch")
    if broker is not None and not queues:
        raise click.UsageError("--broker shows queue lengths: name the queues with --queue")
    from rich.console import Console

    console = Console(file=sys.stdout)
    with translate_errors(target):
        view = TopView(target.limiter(), watches, limit_specs, window)
        depths_reader = QueueDepths(broker) if broker is not None else None
        where = target.where()
        live = _live(console) if console.is_terminal and not as_json else nullcontext(None)
        frame: Any = None
        try:
            with live as display:
                for _ in _frames(count, interval):
                    rows = view.read()
                    depths = depths_reader.read(queues) if depths_reader is not None else None
                    if as_json:
                        line = {"rows": [row.to_dict() for row in rows], "queues": depths}
                        click.echo(json.dumps(line))
                        continue
                    stamp = time.strftime("%H:%M:%S")
                    frame = render(rows, f"zae-celery top · {where} · {stamp}", depths)
                    if display is not None:
                        display.update(frame, refresh=True)
                    else:
                        console.print(frame)
        except KeyboardInterrupt:
            pass
        finally:
            if depths_reader is not None:
                depths_reader.close()
    if svg_file is not None and frame is not None:
        picture = Console(file=io.StringIO(), record=True, width=console.width)
        picture.print(frame)
        picture.save_svg(svg_file, title="zae-celery top")


def _live(console: Any) -> AbstractContextManager[Any]:
    from rich.live import Live

    return Live(console=console, auto_refresh=False, screen=False)
