"""A run's chart: what it charged per minute against each limit (``runs show --chart``).

Needs matplotlib (``pip install 'zae-celery[charts]'``), imported only here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

from .runs import RunReport

__all__ = ["WINDOW_S", "run_chart", "trailing_sums", "window_for"]

WINDOW_S = 60.0
"""The longest sliding window of the chart's rates (a per-minute limit's own window)."""


def window_for(span: float) -> float:
    """The sliding window a run of ``span`` seconds is charted with: a fifth of it,
    between 1 s and :data:`WINDOW_S` (a short run's rate is not a minute's sum)."""
    return max(1.0, min(WINDOW_S, span / 5))


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
    """Draw ``report``'s charges per minute over a sliding window (:func:`window_for`),
    one panel per limit with its rate, into ``path`` (PNG)."""
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
    window = window_for(times[-1])
    scale = 60.0 / window
    names = sorted({n for f in facts for n in f.charged} | {n for f in facts for n in f.rates})
    panels: list[tuple[str, list[float], float | None]] = []
    for name in names:
        rates = [f.rates[name] for f in facts if name in f.rates]
        amounts = [float(f.charged.get(name, 0)) for f in facts]
        panels.append((name, amounts, max(rates) * 60 if rates else None))
    if not panels:
        panels.append(("starts", [1.0] * len(facts), None))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, (name, amounts, limit) in zip(axes, panels, strict=True):
        rate = [total * scale for total in trailing_sums(times, amounts, window)]
        ax.plot(times, rate, label=f"{name} charged, per minute (over {window:.3g} s)")
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", label=f"limit: {limit:,.0f}/min")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the run's first start")
    axes[0].set_title(f"run {report.run}: {report.started} tasks started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
