"""The official SDKs on real workers: ``examples/sdk_tasks.py`` (the code docs/celery.md
quotes) run by real ``celery worker`` processes against the local provider, which speaks
OpenAI's and Anthropic's wire formats and keeps its own books.

Brokers: a private redis-server and RabbitMQ (required when CI=true, skipped with the
reason elsewhere); the buckets are in DynamoDB Local. The tasks are the example's,
unchanged: the test sets only the environment the SDKs and the app read.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from harness.provider import LocalProvider
from harness.workers import log_text, worker_fleet
from tests.conftest import REPO, Broker
from tests.helpers import eventually
from zae_celery.core import Limit, RateLimiter
from zae_celery.testing import LocalServer

pytestmark = pytest.mark.integration

YEAR = 31_536_000


def counter(name: str, capacity: int) -> Limit:
    """A limit refilled once a year: what its bucket lacks is exactly what was charged."""
    return Limit.custom(name, capacity, refill_amount=1, refill_period_seconds=YEAR)


@dataclass
class Run:
    client: Celery
    queue: str
    limiter: RateLimiter
    openai: LocalProvider
    anthropic: LocalProvider
    logs: Path

    def send(self, task: str, **kwargs: Any) -> Any:
        return self.client.send_task(f"examples.sdk_tasks.{task}", kwargs=kwargs, queue=self.queue)


BROKERS = pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
"""The brokers users run the SDK tasks on (the ``broker`` fixture's, by name)."""


def start(
    broker: Broker,
    ddb: LocalServer,
    tmp_path: Path,
    openai: LocalProvider,
    anthropic: LocalProvider,
) -> Iterator[Run]:
    table = f"zae-sdk-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(table, endpoint_url=ddb.url)
    limiter.create_table()
    queue = f"sdk-{uuid.uuid4().hex[:6]}"
    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    env = {
        "BROKER_URL": broker.url,
        "RESULT_BACKEND": backend,
        "ZAE_STORE_URL": f"dynamodb://{table}?endpoint_url={ddb.url}",
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": f"{openai.base_url}/v1",
        "ANTHROPIC_API_KEY": "test",
        "ANTHROPIC_BASE_URL": anthropic.base_url,
    }
    client = Celery("client", broker=broker.url, backend=backend)
    logs = tmp_path / "logs"
    with (
        openai,
        anthropic,
        worker_fleet(
            "examples.sdk_tasks",
            count=2,
            queues=[queue],
            logs=logs,
            concurrency=2,
            env=env,
            cwd=REPO,
            stop_timeout=5.0,
        ),
    ):
        yield Run(client, queue, limiter, openai, anthropic, logs)
    if broker.name == "rabbitmq":
        with client.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    limiter.delete_table()


@pytest.fixture
def roomy(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[Run]:
    """Providers far roomier than any bucket: nothing refused, nothing pulled down."""
    yield from start(
        broker,
        ddb_local,
        tmp_path,
        LocalProvider(rpm=100_000, tpm=10_000_000, accounting="request"),
        LocalProvider(rpm=100_000, itpm=10_000_000, otpm=10_000_000),
    )


TEXTS = [
    "The committee met on Tuesday and approved the budget.",
    "Quarterly revenue rose by eleven percent, driven by subscriptions in Europe.",
    "A short note.",
]


@BROKERS
def test_the_sdk_tasks_charge_what_each_provider_counted_to_the_token(roomy: Run) -> None:
    # Stored limits override the example's: counters that show exactly what was charged.
    roomy.limiter.set_limits(
        "acme", [counter("rpm", 1000), counter("tpm", 1_000_000)], resource="gpt-4o-mini"
    )
    roomy.limiter.set_limits(
        "acme",
        [counter("rpm", 1000), counter("itpm", 1_000_000), counter("otpm", 1_000_000)],
        resource="claude-sonnet-4-5",
    )
    summaries = [
        roomy.send("summarize", tenant="acme", text=TEXTS[i % 3], max_tokens=50 + i)
        for i in range(12)
    ]
    translations = [
        roomy.send("translate", tenant="acme", text=TEXTS[i % 3], max_tokens=80 + i)
        for i in range(8)
    ]
    for result in summaries + translations:
        assert result.get(timeout=60).startswith("(simulated answer"), log_text(roomy.logs)

    openai_books = roomy.openai.records
    assert [r.status for r in openai_books] == [200] * 12  # the SDK never retried
    # The openai profile: tpm charged as OpenAI counts it, prompt + max_tokens (refunds
    # reach the buckets within zae_settle_delay).
    expected = {"rpm": 12, "tpm": sum(r.charged_tokens for r in openai_books)}
    used = eventually(lambda: spent(roomy.limiter, "gpt-4o-mini", ["rpm", "tpm"]), expected)
    assert used == expected
    assert sum(r.charged_tokens for r in openai_books) == sum(
        r.prompt_tokens + r.max_tokens for r in openai_books
    )

    anthropic_books = roomy.anthropic.records
    assert [(r.status, r.api) for r in anthropic_books] == [(200, "anthropic")] * 8
    # The anthropic profile: input and output apart, what was used.
    expected = {
        "rpm": 8,
        "itpm": sum(r.charged_input_tokens for r in anthropic_books),
        "otpm": sum(r.charged_output_tokens for r in anthropic_books),
    }
    used = eventually(
        lambda: spent(roomy.limiter, "claude-sonnet-4-5", ["rpm", "itpm", "otpm"]), expected
    )
    assert used == expected


def spent(limiter: RateLimiter, resource: str, names: list[str]) -> dict[str, int]:
    """What the tenant's counters were charged (their capacity less what is left)."""
    stored = {lim.name: lim for lim in limiter.get_limits("acme", resource)}
    left = limiter.available("acme", resource, list(stored.values()))
    return {name: round(stored[name].capacity - left[name]) for name in names}


@pytest.fixture
def tight(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[Run]:
    """An OpenAI provider allowing 2 requests at once and 1 a second (the example's
    limits say 500 a minute: another client shares the key)."""
    yield from start(
        broker,
        ddb_local,
        tmp_path,
        LocalProvider(rpm=60, tpm=10_000_000, window=1, accounting="request"),
        LocalProvider(rpm=100_000, itpm=10_000_000, otpm=10_000_000),
    )


DEFERRED = re.compile(r"deferred task \S+ \(examples\.sdk_tasks\.summarize\).*provider 429")


@BROKERS
def test_every_429_through_the_sdk_defers_its_task_once_and_nothing_is_lost(tight: Run) -> None:
    results = [tight.send("summarize", tenant="acme", text=TEXTS[i % 3]) for i in range(10)]
    for result in results:
        assert result.get(timeout=90).startswith("(simulated answer"), log_text(tight.logs)
    books = tight.openai.records
    refused = [r for r in books if r.status == 429]
    # Ten tasks admitted at once against a provider that takes 2: some are refused.
    assert refused, "the provider refused nothing: the 429 path was not exercised"
    assert sum(r.status == 200 for r in books) == 10
    # One request per 429 and one deferral for it: the SDK did not retry inside the task.
    assert len(DEFERRED.findall(log_text(tight.logs))) == len(refused)


def test_the_docs_quote_the_example_as_it_is() -> None:
    docs = (REPO / "docs" / "celery.md").read_text()
    assert (REPO / "examples" / "sdk_tasks.py").read_text() in docs, "docs/celery.md misquotes it"


@pytest.fixture
def overloaded(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[Run]:
    """An Anthropic provider that answers 529 (overloaded) for its first second."""
    anthropic = LocalProvider(rpm=100_000, itpm=10_000_000, otpm=10_000_000)
    runs = start(
        broker,
        ddb_local,
        tmp_path,
        LocalProvider(rpm=100_000, tpm=10_000_000),
        anthropic,
    )
    run = next(runs)
    anthropic.overload(1.0)
    yield run
    next(runs, None)


OVERLOADED = re.compile(r"deferred task \S+ \(examples\.sdk_tasks\.translate\).*overloaded")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_an_overloaded_provider_refunds_and_defers_each_refused_task(overloaded: Run) -> None:
    results = [overloaded.send("translate", tenant="acme", text=TEXTS[i % 3]) for i in range(4)]
    for result in results:
        assert result.get(timeout=60).startswith("(simulated answer"), log_text(overloaded.logs)
    books = overloaded.anthropic.records
    refused = [r for r in books if r.status == 529]
    assert refused, "the provider was not overloaded when the tasks called it"
    # One deferral per 529 (the refund before the block is tested in test_provider_sdks).
    assert len(OVERLOADED.findall(log_text(overloaded.logs))) == len(refused)
    assert sum(r.status == 200 for r in books) == 4


@pytest.fixture
def closing(broker: Broker, ddb_local: LocalServer, tmp_path: Path) -> Iterator[Run]:
    """An OpenAI provider taking 2 requests at once, 1 a second, that closes the key for
    5 s after a 429 ("try again in 5 s")."""
    yield from start(
        broker,
        ddb_local,
        tmp_path,
        LocalProvider(rpm=60, tpm=10_000_000, window=1, accounting="request", cooldown=5),
        LocalProvider(rpm=100_000, itpm=10_000_000, otpm=10_000_000),
    )


@BROKERS
def test_after_a_429_no_worker_sends_before_the_provider_reopens(closing: Run) -> None:
    results = [closing.send("summarize", tenant="acme", text=TEXTS[i % 3]) for i in range(12)]
    for result in results:
        assert result.get(timeout=120).startswith("(simulated answer"), log_text(closing.logs)
    books = sorted(closing.openai.records, key=lambda r: r.at)
    first = next((r for r in books if r.status == 429), None)
    assert first is not None and first.retry_after is not None, "no 429 was provoked"
    # Slots admitted before the block would land inside it (twelve tasks, slots ahead):
    # the 429's broadcast holds them. A request already handed to a pool process may
    # still arrive just after the 429; none after the first second of the 5.
    late = [r.at - first.at for r in books if first.at + 1.0 < r.at < first.at + 5.0]
    assert late == [], f"requests {late} s after the 429, inside its retry-after"
