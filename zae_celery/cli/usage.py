"""``aggregate`` (fold the table's stream into usage snapshots, as the Lambda function
does), ``usage`` (read the snapshots) and ``runs`` (what a pipeline run's tasks did):
see docs/accounting.md."""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from zae_celery.accounting import (
    DEFAULT_RETENTION_DAYS,
    DEFAULT_WINDOWS,
    WINDOWS,
    Aggregator,
    Applied,
    StreamReader,
    read_usage,
    stream_arn,
)
from zae_celery.accounting.charts import run_chart
from zae_celery.accounting.runs import RunReport, list_runs, read_run
from zae_celery.cli.errors import OperationalError, translate_errors
from zae_celery.cli.options import CONTEXT, Target, id_argument, pass_target, windows_option

__all__ = ["aggregate", "runs", "usage"]


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date or time: give ISO 8601, e.g. 2026-12-04 or "
            "2026-12-04T09:00 (UTC unless an offset is given)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@click.command("aggregate", context_settings=CONTEXT)
@click.option(
    "--windows",
    default=",".join(DEFAULT_WINDOWS),
    show_default=True,
    callback=windows_option,
    help=f"Snapshot windows, comma-separated ({', '.join(WINDOWS)}).",
)
@click.option(
    "--retention-days",
    type=click.IntRange(min=1),
    default=DEFAULT_RETENTION_DAYS,
    show_default=True,
    help="Days a snapshot is kept after its window ends (its TTL).",
)
@click.option("--follow", is_flag=True, help="Keep reading new records until interrupted.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between polls with --follow.",
)
@pass_target
def aggregate(
    target: Target, windows: tuple[str, ...], retention_days: int, follow: bool, interval: float
) -> None:
    """Fold the table's stream into usage snapshots, as the stack's aggregator function does.

    Reads every shard of the table's stream (NEW_AND_OLD_IMAGES) from its oldest record.
    Reading the same records again adds nothing: each snapshot remembers the last record it
    took from each bucket item. For local endpoints (DynamoDB Local, moto) and checks; on
    AWS the stack's function does this (deploy --aggregator).

    \b
    Example:
      zae-celery --endpoint-url http://127.0.0.1:8000 aggregate --follow
    """
    target.need_table("aggregate")
    with translate_errors(target):
        client = target.client("dynamodb")
        try:
            arn = stream_arn(client, target.table)
        except RuntimeError as exc:
            raise OperationalError(str(exc)) from None
        aggregator = Aggregator(client, target.table, windows, retention_days)

        def report(applied: Applied) -> None:
            if follow:
                click.echo(
                    f"{applied.records} records: {applied.written} snapshot writes, "
                    f"{applied.skipped} already applied"
                )

        reader = StreamReader(target.client("dynamodbstreams"), arn, aggregator, on_batch=report)
        if follow:
            stop = threading.Event()
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                reader.follow(stop, interval)
            except KeyboardInterrupt:
                pass
            finally:
                signal.signal(signal.SIGTERM, previous)
        else:
            reader.catch_up()
    t = reader.totals
    click.echo(
        f"{t.records} stream records in {t.batches} batch{'' if t.batches == 1 else 'es'}: "
        f"{t.written} snapshot writes, "
        f"{t.skipped} already applied ({', '.join(windows)} windows of {target.table})."
    )


@click.command("usage", context_settings=CONTEXT)
@click.argument("entity", callback=id_argument("entity"))
@click.option("--resource", default=None, help="One resource (default: every resource).")
@click.option(
    "--window",
    type=click.Choice(list(WINDOWS)),
    default="hourly",
    show_default=True,
    help="Which snapshots to read.",
)
@click.option("--since", callback=_moment, help="Only windows ending after this (ISO 8601, UTC).")
@click.option("--until", callback=_moment, help="Only windows starting before this.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_target
def usage(
    target: Target,
    entity: str,
    resource: str | None,
    window: str,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
) -> None:
    """What ENTITY consumed per window: tokens charged after reconcile per limit, of which
    debt (charged beyond the estimates), and provider blocks.

    Snapshots are written by the aggregator from the table's stream (the stack's function,
    or 'zae-celery aggregate').

    \b
    Example:
      zae-celery usage tenant-42 --resource gpt-4o --window daily --since 2026-12-01
    """
    target.need_table("usage")
    with translate_errors(target):
        client = target.client("dynamodb")
        snaps = read_usage(client, target.table, entity, resource, window, since, until)
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in snaps], indent=2))
        return
    if not snaps:
        click.echo(
            f"No {window} usage snapshots for {entity}"
            + (f" / {resource}" if resource else "")
            + ": is the aggregator running (deploy --aggregator, or 'zae-celery aggregate')?"
        )
        return
    _table(snaps)


def _table(snaps: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{snaps[0].entity}: {snaps[0].window} usage")
    for header in ("resource", "window start (UTC)", "limit", "used", "debt", "blocks", "writes"):
        table.add_column(header, justify="left" if header in ("resource", "limit") else "right")
    for snap in snaps:
        names = sorted(snap.limits) or ["-"]
        for i, name in enumerate(names):
            use = snap.limits.get(name)
            table.add_row(
                snap.resource if i == 0 else "",
                snap.start.strftime("%Y-%m-%d %H:%M") if i == 0 else "",
                name,
                f"{use.used:,}" if use else "-",
                f"{use.debt:,}" if use else "-",
                str(snap.blocks) if i == 0 else "",
                str(snap.records) if i == 0 else "",
            )
    Console(width=120).print(table)


@click.group("runs", context_settings=CONTEXT)
def runs() -> None:
    """Pipeline runs: what every task under one Celery root_id (a group, a chord, a
    chain; or a task's rate_run) started, consumed and waited for.

    Workers write what their tasks did every zae_run_log seconds (default 5).

    \b
    Example:
      zae-celery runs list --since 2026-12-01
      zae-celery runs show 7d3c... --chart run.png
    """


@runs.command("list", context_settings=CONTEXT)
@click.option(
    "--since",
    callback=_moment,
    help="First UTC day to list (ISO 8601; default: today).",
)
@click.option("--until", callback=_moment, help="Last UTC day to list (default: today).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_target
def runs_list(
    target: Target, since: datetime | None, until: datetime | None, as_json: bool
) -> None:
    """List the runs workers wrote for, by the UTC day they were first seen.

    \b
    Example:
      zae-celery runs list --since 2026-12-01 --json
    """
    target.need_table("runs list")
    today = datetime.now(timezone.utc).date()
    first = since.astimezone(timezone.utc).date() if since else today
    last = until.astimezone(timezone.utc).date() if until else today
    if (last - first).days > 366:
        raise click.UsageError("--since and --until span more than a year: narrow them")
    with translate_errors(target):
        entries = list_runs(target.client("dynamodb"), target.table, first, last)
    if as_json:
        rows = [{"run": e.run, "first_seen": e.first_seen.isoformat()} for e in entries]
        click.echo(json.dumps(rows, indent=2))
        return
    if not entries:
        click.echo(f"No runs seen from {first} to {last} (UTC).")
        return
    for entry in entries:
        click.echo(f"{entry.first_seen:%Y-%m-%d %H:%M:%S}  {entry.run}")


@runs.command("show", context_settings=CONTEXT)
@click.argument("run", callback=id_argument("run"))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--chart",
    type=click.Path(dir_okay=False, writable=True),
    help="Save a PNG of the run's tokens per minute against each limit (needs matplotlib: "
    "pip install 'zae-celery[charts]').",
)
@pass_target
def runs_show(target: Target, run: str, as_json: bool, chart: str | None) -> None:
    """What RUN's tasks did: how many started, succeeded and failed; tokens estimated and
    charged per limit; the time they waited for slots (total, p50, p99); deferrals and
    provider 429s; first and last start.

    \b
    Example:
      zae-celery runs show 7d3c0f4e-... --json
    """
    target.need_table("runs show")
    with translate_errors(target):
        report = read_run(target.client("dynamodb"), target.table, run)
    if report is None:
        raise OperationalError(
            f"no run {run!r} in {target.table}: workers write a run's tasks every zae_run_log "
            "seconds (is it on, and is the run newer than zae_run_retention days?)"
        )
    if chart:
        try:
            run_chart(report, Path(chart))
        except RuntimeError as exc:
            raise OperationalError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _run_table(report)
    if chart:
        click.echo(f"Chart: {chart}")


def _run_table(report: RunReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    starts = "-"
    if report.first_start and report.last_start:
        starts = f"{report.first_start:%Y-%m-%d %H:%M:%S} .. {report.last_start:%H:%M:%S} UTC"
    summary = Table(title=f"run {report.run}", show_header=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    for label, value in (
        (
            "tasks (started / succeeded / failed)",
            f"{report.tasks} ({report.started} / {report.succeeded} / {report.failed})",
        ),
        ("deferrals / provider 429s", f"{report.deferrals} / {report.provider_429s}"),
        (
            "waited for slots: total / p50 / p99",
            f"{report.wait_total:.1f} s / {report.wait_p50:.3f} s / {report.wait_p99:.3f} s",
        ),
        ("starts", starts),
        ("buckets", ", ".join(report.buckets) or "-"),
    ):
        summary.add_row(label, value)
    console.print(summary)
    limits = Table()
    for header in ("limit", "estimated", "charged", "charged - estimated"):
        limits.add_column(header, justify="left" if header == "limit" else "right")
    for name, totals in sorted(report.limits.items()):
        limits.add_row(
            name,
            f"{totals.estimated:,}",
            f"{totals.charged:,}",
            f"{totals.charged - totals.estimated:+,}",
        )
    console.print(limits)
