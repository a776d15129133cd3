"""The provider benchmark's pure measures (``benchmarks/providers.py``); the benchmark
itself runs real worker fleets and is not part of the suite."""

from __future__ import annotations

import math

from benchmarks.providers import convergence, in_block, per_thousand, steady_per_minute
from harness.provider import ProviderRecord


def test_per_thousand() -> None:
    assert per_thousand(3, 600) == 5.0
    assert per_thousand(0, 0) == 0.0


def test_convergence_is_the_start_of_the_first_window_after_the_last_bad_one() -> None:
    sent = [float(t) for t in range(60)]  # 0..59 s: windows [0,10), ..., [50,60)
    assert convergence(sent, []) == 0.0
    assert convergence(sent, [1.0, 2.0, 3.0]) == 10.0  # window 0 has 3 > 1
    assert convergence(sent, [1.0, 2.0, 25.0]) == 10.0  # one 429 in a window is allowed
    assert convergence(sent, [31.0, 32.0]) == 40.0
    assert convergence(sent, [55.0, 58.0]) is None  # the last window still has two
    assert convergence([], []) is None


def test_steady_rate_between_the_10th_and_90th_percentile() -> None:
    times = [i * 0.5 for i in range(21)]  # two a second
    assert steady_per_minute(times, [1.0] * 21) == 120.0
    assert math.isnan(steady_per_minute([1.0], [1.0]))


def test_in_block_counts_arrivals_strictly_inside_the_retry_after() -> None:
    refused = ProviderRecord(10.0, 429, 1, 1, retry_after=0.5)
    records = [ProviderRecord(at, 200, 1, 1) for at in (9.9, 10.0, 10.2, 10.5, 10.6)]
    assert [r.at for r in in_block([*records, refused], refused)] == [10.2]
