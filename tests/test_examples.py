"""The examples a user copies from, run as real programs (``python -m examples.<name>``).

Each runs from the repository root against the session's moto server (passed in with
``--endpoint-url``, so no second server starts) and prints JSON (``--json``); the checks
recompute what the example claims from the raw figures it printed. One run without an
endpoint proves the self-starting path: its embedded server is gone once it exits.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO
from zae_celery.testing import LocalServer

pytestmark = pytest.mark.integration


def run_example(name: str, endpoint: str | None, timeout: float = 60) -> dict[str, Any]:
    """Run ``python -m examples.<name> --json`` from the repository root; its JSON output."""
    env = {k: v for k, v in os.environ.items() if k != "ZAE_ENDPOINT_URL"}
    argv = [sys.executable, "-m", f"examples.{name}", "--json"]
    if endpoint is not None:
        argv += ["--endpoint-url", endpoint]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    if endpoint is not None:
        assert result["endpoint"] == endpoint
    assert result["embedded_endpoint"] is (endpoint is None)
    return result


def check_quickstart(out: dict[str, Any]) -> None:
    """Granted up to the rpm bucket, then refused by rpm with a wait of at most one refill."""
    rpm = next(lim for lim in out["limits"] if lim["name"] == "rpm")
    calls = out["calls"]
    assert len(calls) > rpm["burst"]
    for granted in calls[: rpm["burst"]]:
        assert granted["granted"] is True
        # The bucket was charged the tokens reported, not the estimate.
        assert granted["charged"] == {"rpm": 1, "tpm": granted["tokens"]}
    one_token = rpm["refill_period_ms"] / rpm["refill_amount"] / 1000
    for refused in calls[rpm["burst"] :]:
        assert refused["granted"] is False
        assert refused["refused_by"] == ["rpm"]
        assert 0 < refused["retry_after"] <= one_token


def test_quickstart_grants_up_to_the_limit_then_refuses_with_a_wait(moto: LocalServer) -> None:
    check_quickstart(run_example("quickstart", moto.url))


def test_quickstart_starts_and_stops_its_own_server() -> None:
    out = run_example("quickstart", None)
    check_quickstart(out)
    url = urlsplit(out["endpoint"])
    assert url.hostname is not None and url.port is not None
    with pytest.raises(OSError):  # stopped by its PID before the program exited
        socket.create_connection((url.hostname, url.port), timeout=2).close()


def test_tenants_own_limit_and_parent_limit(moto: LocalServer) -> None:
    out = run_example("tenants", moto.url)
    parent, stored, calls = out["project"], out["stored_rpm"], out["calls"]
    tenants = list(dict.fromkeys(c["tenant"] for c in calls))
    assert len(tenants) >= 2 and parent not in tenants
    first, second = tenants[0], tenants[1]
    mine = [c for c in calls if c["tenant"] == first]
    # The first tenant gets exactly its own stored limit, then its own limit refuses.
    assert [c["granted"] for c in mine] == [True] * stored[first] + [False] * (
        len(mine) - stored[first]
    )
    assert mine[-1]["refused_by"] == [f"{first}/rpm"]
    # The second tenant is refused by the parent before its own limit runs out.
    theirs = [c for c in calls if c["tenant"] == second]
    left_in_parent = stored[parent] - stored[first]
    assert left_in_parent < stored[second]
    assert [c["granted"] for c in theirs] == [True] * left_in_parent + [False] * (
        len(theirs) - left_in_parent
    )
    refusal = theirs[left_in_parent]
    assert refusal["refused_by"] == [f"{parent}/rpm"]
    assert refusal["retry_after"] > 0
    # Its own bucket still had room, but what it can take is bounded by the project's.
    assert out["available_rpm"][second] < 1 <= stored[second] - left_in_parent


def test_async_producer_enqueues_what_available_allowed(moto: LocalServer) -> None:
    out = run_example("async_producer", moto.url)
    estimate = out["estimate_tpm"]
    for tenant in out["tenants"]:
        left = tenant["available"]
        fits = min(math.floor(left["rpm"]), math.floor(left["tpm"] / estimate))
        assert tenant["enqueued"] == min(tenant["backlog"], max(0, fits))
    assert any(t["enqueued"] < t["backlog"] for t in out["tenants"])  # the limit held some back
    assert out["messages_in_broker"] == sum(t["enqueued"] for t in out["tenants"])


def test_queue_limits_bind_both_task_types_together(moto: LocalServer) -> None:
    out = run_example("queue_limits", moto.url, timeout=240)
    limit, starts = out["limit"], out["starts"]
    assert {s["task"] for s in starts} == {"summarize", "translate"}
    # Replay the counted starts through a bucket of the queue's limit, in exact integer
    # units (a token is refill_period_ms units; each millisecond refills refill_amount):
    # every start must find a whole token, whichever task type it was.
    token, per_ms = limit["refill_period_ms"], limit["refill_amount"]
    full = limit["burst"] * token
    tokens, previous = full, None
    for s in sorted(starts, key=lambda s: s["started_ms"]):
        if previous is not None:
            tokens = min(full, tokens + (s["started_ms"] - previous) * per_ms)
        previous = s["started_ms"]
        tokens -= token
        assert tokens >= 0, f"start at {s['started_ms']} ms exceeded the queue's limit"
    assert len(starts) > limit["burst"]  # more tasks than the bucket: the limit had to bind


def test_inflight_never_lets_a_call_beyond_the_cap_reach_the_server(moto: LocalServer) -> None:
    out = run_example("inflight", moto.url, timeout=240)
    assert out["statuses"] == [200] * len(out["statuses"])  # no task met a 429
    assert out["refused"] == 0 and out["requests"] == len(out["statuses"])
    assert out["peak_in_flight"] == out["cap"]  # the cap was reached, never passed


def test_the_celery_docs_quote_the_inflight_example() -> None:
    source = (REPO / "examples" / "inflight.py").read_text()
    docs = (REPO / "docs" / "celery.md").read_text()
    start = docs.index("## In-flight caps")
    task = docs[docs.index("@app.task(", start) : docs.index("    ...", start)]
    assert task in source, "docs/celery.md misquotes examples/inflight.py"


def test_settle_holds_refunds_for_the_next_grant(moto: LocalServer) -> None:
    out = run_example("settle", moto.url)
    at_once, held = out["runs"]["at_once"], out["runs"]["held"]
    for run in (at_once, held):  # the bills, and one request a call, both ways
        assert run["charged"] == {"rpm": out["calls"], "tpm": out["billed"]}
    assert at_once["requests"] >= 2 * out["calls"]  # a grant and a settle each
    # The refunds rode in the next grants (a flusher may write a few if the calls take
    # longer than settle_delay): far fewer requests.
    assert held["requests"] <= at_once["requests"] - out["calls"] // 2


def test_shards_spread_a_hot_bucket_over_items(moto: LocalServer) -> None:
    out = run_example("shards", moto.url)
    assert out["limit"] == "rpm=40/m:shards=4"
    shards = out["by_shard"]
    assert sorted(shards) == [f"model shard {i}" for i in range(4)]
    assert all(n >= 1 for n in shards.values())  # every shard granted
    assert out["granted"] == sum(shards.values()) == out["bucket"]["charged"]
    assert out["granted"] <= out["allowed"]  # together, never beyond the whole bucket
    assert out["bucket"]["burst"] == 40 and out["bucket"]["rate"] == "40/m"
    assert out["first_refusal"]["resource"] == "model"
    assert out["items"] == [f"E#fleet#model#{i} B#model#{i}" for i in range(4)]


def test_accounting_folds_the_stream_into_exact_snapshots(moto: LocalServer) -> None:
    out = run_example("accounting", moto.url)
    assert out["snapshot_writes"] > 0
    assert (out["written_again"], out["skipped_again"]) == (0, out["snapshot_writes"])
    for tenant, rows in out["daily"].items():
        (row,) = rows
        assert row["limits"]["tpm"]["used"] == out["billed"][tenant]
    assert out["daily"]["acme"][0]["limits"]["tpm"]["debt"] == 110  # 910 billed of 800
    assert out["daily"]["acme"][0]["blocks"] == 1 and out["daily"]["globex"][0]["blocks"] == 0
