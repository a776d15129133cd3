"""``make demo`` at a small size, run as the user runs it, checked from its own report.

The demo (``python -m examples.llm_pipeline``) starts a moto server (or, with ``--store``,
puts the buckets on a Redis server), real ``celery worker`` processes and a local
provider that enforces the same limits as the client; every figure asserted here comes
from the report it writes (``--report-json``), which counts from the provider's own
records.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client

from harness.provider import LocalProvider, billed_usage, count_tokens
from harness.stores import with_run_prefix
from zae_celery.testing import LocalServer

REPO = Path(__file__).resolve().parents[1]
FLEET = ["--workers", "2", "--concurrency", "2"]
SMALL = ["--tasks", "40", *FLEET, "--rpm", "240", "--tpm", "30000", "--window", "2"]


def _demo(run_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "examples.llm_pipeline", "--run-dir", str(run_dir), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C is sent by this test only, to the demo only
    )


def _small_run(run_dir: Path, report_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """The small demo run to its end: its report (checked as below) and its output."""
    demo = _demo(run_dir, *SMALL, "--report-json", str(report_path), *args)
    output, _ = demo.communicate(timeout=240)
    text = output.decode(errors="replace")
    assert demo.returncode == 0, text
    report: dict[str, Any] = json.loads(report_path.read_text())
    _check_small_report(report, text)
    return report, text


@pytest.mark.integration
@pytest.mark.parametrize("options", [[], ["--exact-estimates"]], ids=["estimates", "exact"])
def test_small_demo_completes_without_provider_429s(tmp_path: Path, options: list[str]) -> None:
    report, _ = _small_run(tmp_path / "run", tmp_path / "report.json", *options)
    [run] = report["runs"]
    assert report["config"]["store"] == "dynamodb"
    assert run["dynamodb_requests"] > 0
    assert run["redis_scripts"] is None
    # zae-celery's own books of the batch (its run log, read as 'runs show' reads it)
    # agree with the provider's, to the request and the token.
    books = run["books"]
    assert (books["tasks"], books["succeeded"]) == (run["completed"], run["completed"])
    assert books["limits"]["rpm"]["charged"] == run["provider_requests"] - run["provider_429s"]
    assert books["limits"]["tpm"]["charged"] == run["tokens_billed"]
    assert 0 < books["run_log_writes"] < run["dynamodb_requests"]


@pytest.mark.integration
def test_small_demo_on_a_redis_store(tmp_path: Path, redis: LocalServer) -> None:
    """``--store redis://...``: no moto server, the buckets under a prefix of the run's
    own on the given server, the requests counted as its script calls, and the run's
    keys deleted at the end."""
    prefix = f"zae-test-{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{redis.port}/4?prefix={prefix}"
    report, text = _small_run(tmp_path / "run", tmp_path / "report.json", "--store", url)
    [run] = report["runs"]
    assert report["config"]["store"] == f"Redis at 127.0.0.1:{redis.port}/4"
    assert f"buckets on Redis at 127.0.0.1:{redis.port}/4" in " ".join(text.split())
    assert run["dynamodb_requests"] == 0
    assert run["redis_scripts"] >= run["completed"]  # a write per task at least
    assert json.loads((tmp_path / "run" / "pids.json").read_text())["moto"] is None
    client = redis_client.Redis.from_url(f"redis://127.0.0.1:{redis.port}/4")
    assert client.keys("{" + prefix + "*") == []  # every key of the run's prefix


def test_a_run_prefix_keeps_the_url_and_its_options() -> None:
    url = "redis://127.0.0.1:6379/2?socket_timeout=2&prefix=team"
    assert with_run_prefix(url, "demo-1") == (
        "redis://127.0.0.1:6379/2?socket_timeout=2&prefix=team-demo-1"
    )
    assert with_run_prefix("redis://h:1/0", "demo-1") == "redis://h:1/0?prefix=zae-demo-1"
    with pytest.raises(ValueError, match="prefix"):
        with_run_prefix(f"redis://h:1/0?prefix={'p' * 60}", "demo-12345678")


def _check_small_report(report: dict[str, Any], text: str) -> None:
    config = report["config"]
    [run] = report["runs"]
    assert run["mode"] == "zae"
    assert run["completed"] == config["tasks"] == 40, run["failures"]
    assert run["failed"] == 0
    assert run["provider_429s"] == 0
    assert run["provider_requests"] == 40
    # Nothing beyond the client's buckets but the provider's documented slack:
    # one request, and the largest request's tokens.
    assert run["rpm_excess"] <= 1
    assert run["tpm_excess"] <= config["slack_tokens"]
    assert run["republishes_max"] <= 1 + run["provider_429s"]
    if config["exact_estimates"]:  # each task estimated its bill: nothing to reconcile
        assert run["tokens_billed"] == config["estimated_tokens"]
    else:
        assert run["tokens_billed"] < config["estimated_tokens"]
    chart = Path(report["chart"])
    assert chart.read_bytes().startswith(b"\x89PNG"), chart
    assert str(chart) in text  # the path is printed


def _alive(pgid: int) -> bool:
    """Whether any process remains in the process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    demo = _demo(run_dir, "--tasks", "300", *FLEET)  # interrupted long before its end
    pids_file = run_dir / "pids.json"
    deadline = time.monotonic() + 180
    pids: dict[str, Any] = {}
    try:
        # pids.json names the workers once every one of them is ready.
        while not pids.get("workers"):
            assert demo.poll() is None, demo.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "the workers never became ready"
            with contextlib.suppress(FileNotFoundError, ValueError):
                pids = json.loads(pids_file.read_text())
            time.sleep(0.1)  # polling another process's file: there is no event to wait on
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, output.decode(errors="replace")
    started = [pids["moto"], *pids["workers"]]
    assert len(started) == 1 + 2 and all(started)
    # Each worker and the moto server led a process group of its own (pool processes
    # included): none of them may outlive the demo.
    assert [pgid for pgid in started if _alive(pgid)] == []
    assert json.loads(pids_file.read_text())["workers"] == []


# -- the provider on its own ------------------------------------------------------------------
def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _chat(text: str, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def test_provider_bills_real_usage_and_refuses_beyond_its_rpm() -> None:
    # One request a minute, no slack: the second request comes back long before a refill.
    with LocalProvider(rpm=1, slack_requests=0, seed=3) as provider:
        status, body, _ = _post(provider.url, _chat("Name three rivers.", 50))
        assert status == 200
        assert body["usage"] == {
            "prompt_tokens": count_tokens("Name three rivers."),
            "completion_tokens": body["usage"]["completion_tokens"],
            "total_tokens": billed_usage("Name three rivers.", 50, seed=3).total_tokens,
        }
        assert 10 <= body["usage"]["completion_tokens"] <= 50  # 20-95 % of max_tokens
        status, body, headers = _post(provider.url, _chat("Name three rivers.", 50))
        assert status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"  # OpenAI's shape: the code,
        assert body["error"]["type"] == "requests"  # and the limit that refused it
        retry_after = float(headers["Retry-After"])
        assert 0 < retry_after <= 60
        assert int(headers["retry-after-ms"]) == round(retry_after * 1000)
        records = provider.records
    assert [r.status for r in records] == [200, 429]
    assert records[1].retry_after == retry_after


def test_provider_charges_total_tokens_on_its_tpm_bucket() -> None:
    large = _chat("Summarize: " + "tokens " * 200, 300)
    cost = billed_usage("Summarize: " + "tokens " * 200, 300, seed=0).total_tokens
    # A per-minute bucket holding exactly one large request (plus 1 token of slack).
    with LocalProvider(rpm=100, tpm=cost, slack_tokens=1) as provider:
        assert _post(provider.url, large)[0] == 200
        assert _post(provider.url, large)[0] == 429  # the bucket holds ~1 token now
        records = provider.records
    assert [r.total_tokens for r in records] == [cost, cost]
