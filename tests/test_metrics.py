"""Prometheus metrics from real workers (zae_celery.metrics): one ``celery worker``
(prefork, ``-c 2``) with the metrics bootstep, scraped over HTTP as Prometheus would,
in multiprocess mode (the pool processes' samples summed by the main process)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, Broker
from tests.test_celery_workers import Fleet, _start_fleet
from zae_celery.testing import LocalServer, free_port

pytestmark = pytest.mark.integration

SECRET = "sk-live-PROMPT-7f3a"


@pytest.fixture
def metered(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    port = free_port()
    env = {"ZAE_TEST_METRICS_PORT": str(port)}
    for fleet in _start_fleet(broker, ddb_local, tmp_path, extra_env=env, count=1):
        yield fleet, f"http://127.0.0.1:{port}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_worker_serves_what_its_pool_processes_decided(metered: tuple[Fleet, str]) -> None:
    fleet, url = metered
    results = [fleet.send("reconciled", "limited", 60) for _ in range(12)]
    for mode in ("entity", "consume", "report", "plain"):
        results.append(fleet.send("secret", "limited", SECRET, mode))
    for result in results:
        result.get(timeout=60, propagate=False)
    # The pool process records a run as it settles (after_return), which may follow the
    # stored result by a moment: read until the last grant is in.
    deadline = time.monotonic() + 30
    samples = scrape(url)
    while total(samples, "zae_grants_total", resource="reconcile") < 12:
        assert time.monotonic() < deadline, f"only {samples} after 30 s"
        samples = scrape(url)
    assert total(samples, "zae_grants_total", resource="reconcile", path="admission") == 12
    # Estimated 100 tokens each, charged 60: 480 refunded by reconcile.
    assert total(samples, "zae_tokens_estimated_total", resource="reconcile", limit="tpm") == 1200
    assert total(samples, "zae_tokens_charged_total", resource="reconcile", limit="tpm") == 720
    refunded = total(
        samples, "zae_reconcile_tokens_total", resource="reconcile", limit="tpm", direction="refund"
    )
    assert refunded == 480
    assert total(samples, "zae_wait_seconds_count", resource="reconcile", path="admission") == 12
    writes = total(samples, "zae_store_requests_total", op="WriteBuckets", outcome="ok")
    # A grant each, at least; the refunds ride in later grants or a flush of the worker's
    # main process (zae_settle_delay), not a write each.
    assert writes >= 12
    assert total(samples, "zae_store_request_seconds_count", op="WriteBuckets") >= writes
    # Labels are bounded and never carry an argument, an entity or a task id.
    keys = {k for (_, labels) in samples for k, _ in labels}
    assert keys <= {
        "resource",
        "limit",
        "path",
        "op",
        "outcome",
        "direction",
        "kind",
        "cause",
        "le",
    }
    values = {v for (_, labels) in samples for _, v in labels}
    assert not any(SECRET in v or "tenant" in v for v in values), values
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert SECRET not in answer.read().decode()


def test_the_dashboard_and_the_docs_query_only_metrics_that_exist() -> None:
    source = (REPO / "zae_celery" / "metrics.py").read_text()
    declared = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(zae_[a-z_]+)"', source))
    assert len(declared) == 13, declared
    dashboard = json.loads((REPO / "docs" / "grafana" / "zae-celery.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    docs = (REPO / "docs" / "observability.md").read_text()
    used = set(re.findall(r"\b(zae_[a-z_]+)", " ".join(queries) + docs))
    suffixes = ("_total", "_bucket", "_count", "_sum")
    bases = {next((u.removesuffix(x) for x in suffixes if u.endswith(x)), u) for u in used}
    settings = {"zae_metrics_port", "zae_metrics_host", "zae_on_unavailable", "zae_celery"}
    assert bases - settings <= declared, bases - settings - declared
    assert declared <= bases, f"not in the docs or the dashboard: {declared - bases}"
