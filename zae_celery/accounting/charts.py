"""A run's chart: starts and tokens per minute against each limit (``runs show --chart``).

Needs matplotlib (``pip install 'zae-celery[charts]'``), imported only here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

from .runs import RunReport

__all__ = ["WINDOW_S", "run_chart", "trailing_sums"]

WINDOW_S = 60.0
"""The sliding window of the chart's rates (a per-minute limit's own window)."""


def trailing_sums(
    times: Sequence[float], amounts: Sequence[float], window: float = WINDOW_S
) -> list[float]:
    """For each instant of ``times`` (sorted), the sum of ``amounts`` at instants in the
    window ending there (``(t - window, t]``)."""
    prefix = [0.0]
    for amount in amounts:
        prefix.append(prefix[-1] + amount)
    out = []
    for i, t in enumerate(times):
        lo = bisect.bisect_right(times, t - window)
        hi = bisect.bisect_right(times, t, lo=i)
        out.append(prefix[hi] - prefix[lo])
    return out


def run_chart(report: RunReport, path: Path) -> Path:
    """Draw ``report``'s starts and tokens per trailing minute, one panel per limit with
    its rate, into ``path`` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the chart needs matplotlib: pip install 'zae-celery[charts]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = sorted((f for f in report.facts if f.started is not None), key=lambda f: f.started or 0)
    if not facts:
        raise RuntimeError(f"run {report.run} has no task that started: nothing to chart")
    origin = facts[0].started or 0.0
    times = [(f.started or 0.0) - origin for f in facts]
    names = sorted({n for f in facts for n in f.charged} | {n for f in facts for n in f.rates})
    panels: list[tuple[str, list[float], float | None]] = [("starts", [1.0] * len(facts), None)]
    for name in names:
        rates = [f.rates[name] for f in facts if name in f.rates]
        amounts = [float(f.charged.get(name, 0)) for f in facts]
        panels.append((name, amounts, max(rates) * WINDOW_S if rates else None))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), sharex=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, (name, amounts, limit) in zip(axes, panels, strict=True):
        ax.plot(times, trailing_sums(times, amounts), label=f"{name} in the last minute")
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", label=f"limit: {limit:,.0f}/min")
        ax.set_ylabel(name)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the run's first start")
    axes[0].set_title(f"run {report.run}: {report.started} tasks started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
