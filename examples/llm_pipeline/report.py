"""The demo's figures, its report table and its chart, all counted from what the tasks
returned and from the provider's own records of every request it received."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from examples.llm_pipeline.workload import bucket_size
from harness.provider import ProviderRecord

MODES = {"zae": "zae-celery", "builtin": "Celery rate_limit"}
PEAK_WINDOW = 10.0
"""Seconds of the busiest window reported as the peak rate."""
CHART_WINDOW = 5.0
"""The chart's rates are taken over a trailing window of this many seconds."""


@dataclass(frozen=True)
class Config:
    """What every mode of a demo run shares."""

    tasks: int
    workers: int
    concurrency: int
    rpm: int
    tpm: int
    window: float
    broker: str
    """``filesystem`` or the redis URL given."""
    estimated_tokens: int
    slack_tokens: int
    store: str = "dynamodb"
    """Where the buckets are: ``dynamodb`` (a moto server), or the Redis server given
    (``Redis at HOST:PORT/DB``, no password)."""
    exact_estimates: bool = False
    """Each task estimated exactly what it was billed (``--exact-estimates``)."""

    @property
    def on_redis(self) -> bool:
        """The buckets are on a Redis store (requests are then script calls)."""
        return self.store != "dynamodb"

    @property
    def rpm_bucket(self) -> int:
        """Requests the client's rpm bucket holds (the provider's holds one more)."""
        return bucket_size(self.rpm, self.window)

    @property
    def tpm_bucket(self) -> int:
        """Tokens the client's tpm bucket holds (the provider's holds ``slack_tokens`` more)."""
        return bucket_size(self.tpm, self.window)


@dataclass
class ModeRun:
    """One mode's batch: what its tasks returned and what the provider recorded."""

    mode: str
    submitted_at: float
    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    records: list[ProviderRecord] = field(default_factory=list)
    interrupted: bool = False
    dynamodb: dict[str, Any] = field(default_factory=dict)
    """Requests the run's processes sent, counted at the endpoint: by_operation,
    condition_failed (worker main processes, where admission runs, included)."""
    redis_scripts: int | None = None
    """On a Redis store: the script calls its server answered during the run (one per
    store operation, every process; other clients' scripts on that server too)."""
    books: dict[str, Any] | None = None
    """zae-celery's own books of the batch (``zae-celery runs show RUN --json``), and
    ``run_log_writes``: the requests its run log made (among ``dynamodb``'s)."""


def _worst_excess(
    times: Sequence[float], amounts: Sequence[float], burst: float, rate: float
) -> float:
    """max over windows [t_i, t_j] of (amount sent in it) - (burst + rate * width)."""
    worst = -burst
    for i, first in enumerate(times):
        total = 0.0
        for j in range(i, len(times)):
            total += amounts[j]
            worst = max(worst, total - (burst + rate * (times[j] - first)))
    return worst


def _peak_per_minute(times: Sequence[float], amounts: Sequence[float], burst: float) -> float:
    """The busiest PEAK_WINDOW seconds, less one bucket, per minute."""
    prefix = [0.0, *itertools.accumulate(amounts)]
    best = 0.0
    for i, first in enumerate(times):
        j = bisect.bisect_left(times, first + PEAK_WINDOW)
        best = max(best, prefix[j] - prefix[i])
    return max(0.0, best - burst) * 60 / PEAK_WINDOW


def measure(run: ModeRun, config: Config) -> dict[str, Any]:
    """The figures of one mode, JSON-friendly (the report table shows them)."""
    sent = sorted(run.records, key=lambda r: r.at)
    accepted = [r for r in sent if r.status == 200]
    times = [r.at for r in accepted]
    tokens = [float(r.total_tokens) for r in accepted]
    republishes = [int(info["republishes"]) for info in run.results] or [0]
    by_operation: dict[str, int] = dict(run.dynamodb.get("by_operation", {}))
    ends = [float(info["end"]) for info in run.results]
    span = (times[-1] - run.submitted_at) if times else 0.0
    completed = len(run.results)
    return {
        "mode": run.mode,
        "label": MODES[run.mode],
        "tasks": config.tasks,
        "completed": completed,
        "failed": len(run.failures),
        "failures": run.failures[:10],
        "interrupted": run.interrupted,
        "provider_requests": len(sent),
        "provider_429s": len(sent) - len(accepted),
        "rpm_mean": len(accepted) / span * 60 if span > 0 else 0.0,
        "rpm_peak": _peak_per_minute(times, [1.0] * len(times), config.rpm_bucket),
        "tpm_mean": sum(tokens) / span * 60 if span > 0 else 0.0,
        "tpm_peak": _peak_per_minute(times, tokens, config.tpm_bucket),
        "rpm_excess": _worst_excess(
            [r.at for r in sent], [1.0] * len(sent), config.rpm_bucket, config.rpm / 60
        ),
        "tpm_excess": _worst_excess(
            [r.at for r in sent],
            [float(r.total_tokens) for r in sent],
            config.tpm_bucket,
            config.tpm / 60,
        ),
        "republishes_mean": sum(republishes) / max(1, completed),
        "republishes_max": max(republishes),
        "ran_at_once": sum(1 for n in republishes if n == 0) if run.results else 0,
        "dynamodb_requests": sum(by_operation.values()),
        "dynamodb_per_task": sum(by_operation.values()) / max(1, completed),
        "dynamodb_by_operation": dict(sorted(by_operation.items())),
        "dynamodb_condition_failed": int(run.dynamodb.get("condition_failed", 0)),
        "redis_scripts": run.redis_scripts,
        "redis_scripts_per_task": (run.redis_scripts or 0) / max(1, completed),
        "tokens_billed": int(sum(tokens)),
        "books": run.books,
        "wall_s": (max(ends) - run.submitted_at) if ends else 0.0,
        "series": {
            "accepted": [[r.at - run.submitted_at, r.total_tokens] for r in accepted],
            "rejected": [r.at - run.submitted_at for r in sent if r.status != 200],
        },
    }


def _k(value: float) -> str:
    return f"{value / 1000:.1f}k" if abs(value) >= 10_000 else f"{value:.0f}"


def table(figures: Sequence[dict[str, Any]], config: Config) -> Table:
    """The report: configured against achieved, one column per mode."""
    grid = Table(
        title=(
            f"{config.tasks} prompts, {config.workers} workers x prefork -c {config.concurrency}, "
            f"broker {config.broker.partition(':')[0]}"
            + (f", buckets on {config.store}; " if config.on_redis else "; ")
            + f"limits {config.rpm} rpm and {_k(config.tpm)} tpm, buckets "
            f"of {config.window:g} s ({config.rpm_bucket} requests, {_k(config.tpm_bucket)} "
            "tokens)"
        )
    )
    grid.add_column("measure")
    grid.add_column("configured / goal", justify="right")
    for fig in figures:
        grid.add_column(fig["label"], justify="right")
    rows: list[tuple[str, str, str]] = [
        ("tasks completed", str(config.tasks), "{completed}/{tasks}"),
        ("rpm achieved: mean from the first send", str(config.rpm), "{rpm_mean:.0f}"),
        ("rpm achieved: busiest 10 s, less the bucket", str(config.rpm), "{rpm_peak:.0f}"),
        ("tpm achieved: mean from the first send", _k(config.tpm), "{tpm_mean_k}"),
        ("tpm achieved: busiest 10 s, less the bucket", _k(config.tpm), "{tpm_peak_k}"),
        # Starts are conformant on the engine's clock; the provider counts arrivals, a few
        # ms of scheduling later, and holds that much slack (harness.provider).
        (
            "requests sent beyond the rpm bucket (worst window)",
            "<= 1 (slack)",
            "{rpm_excess:+.0f}",
        ),
        (
            "tokens sent beyond the tpm bucket (worst window)",
            f"<= {config.slack_tokens} (slack)",
            "{tpm_excess_k}",
        ),
        (
            "provider requests / 429s",
            f"{config.tasks} / 0",
            "{provider_requests} / {provider_429s}",
        ),
        ("republishes per task (max)", "", "{republishes_mean:.2f} ({republishes_max})"),
        ("tasks run without a republish", "", "{ran_at_once}"),
        (
            "Redis script calls per task" if config.on_redis else "DynamoDB requests per task",
            "",
            "{requests_text}",
        ),
        ("tokens: estimated / billed", "", "{tokens_text}"),
        (
            "zae-celery's books (runs show): requests / tokens charged",
            "= the provider's",
            "{books_text}",
        ),
        ("wall time from the first send, s", "", "{wall_s:.1f}"),
    ]
    cells = []
    for fig in figures:
        extra = {
            "tpm_mean_k": _k(fig["tpm_mean"]),
            "tpm_peak_k": _k(fig["tpm_peak"]),
            "tpm_excess_k": f"{fig['tpm_excess']:+.0f}",
            "requests_text": (
                "0 (none)"
                if fig["mode"] != "zae"
                else f"{fig['redis_scripts_per_task']:.2f}"
                if config.on_redis
                else _dynamodb_text(fig)
            ),
            "books_text": _books(fig),
            "tokens_text": (
                f"{_k(config.estimated_tokens)} / {_k(fig['tokens_billed'])}"
                if fig["mode"] == "zae"
                else f"- / {_k(fig['tokens_billed'])}"
            ),
        }
        cells.append([template.format(**fig, **extra) for _, _, template in rows])
    for k, (label, goal, _) in enumerate(rows):
        grid.add_row(label, goal, *(column[k] for column in cells))
    return grid


def _dynamodb_text(fig: dict[str, Any]) -> str:
    """Requests per task, and the run log's share of them."""
    writes = (fig.get("books") or {}).get("run_log_writes")
    share = "" if writes is None else f" (run log {writes / max(1, fig['completed']):.2f})"
    return f"{fig['dynamodb_per_task']:.2f}{share}"


def _books(fig: dict[str, Any]) -> str:
    """zae-celery's run report beside the provider's books ("-": no run log here)."""
    books = fig.get("books")
    if not books:
        return "-"
    limits = books["limits"]
    requests = limits.get("rpm", {}).get("charged", 0)
    tokens = limits.get("tpm", {}).get("charged", 0)
    same = requests == fig["provider_requests"] - fig["provider_429s"]
    same = same and tokens == fig["tokens_billed"]
    return f"{requests} / {_k(tokens)} ({'the same' if same else 'DIFFERENT'})"


def chart(figures: Sequence[dict[str, Any]], config: Config, path: Path) -> Path:
    """Requests/s and tokens/s over time (trailing CHART_WINDOW s) with the limit lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_req, ax_tok) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5), dpi=110)
    colours = {"zae": "tab:blue", "builtin": "tab:orange"}
    for figure in figures:
        accepted = figure["series"]["accepted"]
        rejected = figure["series"]["rejected"]
        end = max([a[0] for a in accepted] + rejected + [1.0])
        grid = [k * 0.25 for k in range(int(end / 0.25) + 2)]
        starts = [a[0] for a in accepted]
        prefix = [0.0, *itertools.accumulate(float(a[1]) for a in accepted)]
        req, tok, err = [], [], []
        for t in grid:
            lo = bisect.bisect_right(starts, t - CHART_WINDOW)
            hi = bisect.bisect_right(starts, t)
            width = min(CHART_WINDOW, max(t, 0.25))
            req.append((hi - lo) / width)
            tok.append((prefix[hi] - prefix[lo]) / width)
            err.append(
                (bisect.bisect_right(rejected, t) - bisect.bisect_right(rejected, t - CHART_WINDOW))
                / width
            )
        colour, label = colours[figure["mode"]], figure["label"]
        ax_req.plot(grid, req, color=colour, label=f"{label}: accepted requests/s")
        ax_tok.plot(grid, tok, color=colour, label=f"{label}: billed tokens/s")
        if rejected:
            ax_req.plot(grid, err, color=colour, linestyle=":", label=f"{label}: 429s/s")
    ax_req.axhline(
        config.rpm / 60, color="tab:red", linestyle="--", label=f"limit {config.rpm} rpm"
    )
    ax_tok.axhline(
        config.tpm / 60, color="tab:red", linestyle="--", label=f"limit {_k(config.tpm)} tpm"
    )
    ax_req.set_ylabel("requests / s")
    ax_tok.set_ylabel("tokens / s")
    ax_tok.set_xlabel("seconds from the first send")
    ax_req.set_title(
        f"{config.tasks} prompts on {config.workers} workers; rates over a trailing "
        f"{CHART_WINDOW:g} s window, counted by the provider"
    )
    for ax in (ax_req, ax_tok):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
