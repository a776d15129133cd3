"""Tests of examples/testing/tasks.py with zae-celery's pytest plugin.

Run with the plugin enabled: ``pytest --zae-celery examples/testing`` (or
``zae_celery = true`` in the pytest configuration).
"""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import Retry

from examples.testing import tasks
from examples.testing.tasks import app, summarize
from zae_celery.testing import TaskHarness

TEXT = "the quick brown fox jumps over the lazy dog " * 10  # 90 words


def test_a_summary_keeps_the_tokens_the_model_billed(zae: TaskHarness) -> None:
    with zae.use(app):  # eager: .delay() runs here, on an in-memory store
        result = summarize.delay(text=TEXT, tenant="acme")
    assert result.get() == "the quick brown fox jumps"
    run = zae.ledger.last(result.id)
    assert (run.entity_id, run.resource) == ("acme", "summarizer")
    assert run.consumed == {"rpm": 1, "tpm": 90 + 40}  # estimated 290, refunded 160
    assert run.waited == 0.0


def test_the_third_call_in_a_minute_waits_for_its_slot(zae: TaskHarness) -> None:
    with zae.use(app):
        ids = [summarize.delay(text=TEXT, tenant="acme").id for _ in range(3)]
    # 2 requests a minute: the third waits 30 s, on the harness's clock (instantly).
    assert [zae.ledger.last(i).waited for i in ids] == pytest.approx([0, 0, 30], abs=0.01)


def test_tenants_have_buckets_of_their_own(zae: TaskHarness) -> None:
    with zae.use(app):
        for tenant in ("acme", "acme", "globex", "globex"):
            summarize.delay(text=TEXT, tenant=tenant)
    assert zae.ledger.waited() == 0.0
    assert zae.ledger.consumed("rpm", entity_id="globex") == 2


def test_a_429_empties_the_tenants_bucket(
    zae: TaskHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(text: str) -> dict[str, Any]:
        return {"status": 429, "retry_after": 20.0, "total_tokens": 0}

    monkeypatch.setattr(tasks, "call_model", refused)
    with zae.use(app), pytest.raises(Retry):
        summarize.delay(text=TEXT, tenant="acme")
    limits = [tasks.RPM, tasks.TPM]
    assert zae.limiter.available("acme", "summarizer", limits)["rpm"] < 0  # blocked


def test_an_estimate_too_large_for_the_bucket_fails_at_once(
    zae: TaskHarness, zae_clock: Any
) -> None:
    with zae.use(app), pytest.raises(Exception, match="can never be granted"):
        summarize.delay(text="word " * 20_000, tenant="acme")
    assert zae_clock.slept == 0
