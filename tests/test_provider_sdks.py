"""The official openai and anthropic SDKs inside rate-limited tasks
(:mod:`zae_celery.providers.openai` / ``.anthropic``), and the accounting profiles.

The SDKs are the real packages; their HTTP goes to an ``httpx.MockTransport`` answering
as each provider documents (headers, 429/529 bodies, ``usage`` shapes), so each test
decides exactly what the provider says. Runs are eager, on
:class:`~zae_celery.testing.TaskHarness` (an in-memory store and a manual clock). The
same integrations against the local provider on real workers are in
``tests/test_provider_workers.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from celery import Celery
from celery.exceptions import Retry

from tests.helpers import Counter
from zae_celery import Limit, RateLimitedTask, ValidationError
from zae_celery.providers import anthropic as zae_anthropic
from zae_celery.providers import openai as zae_openai
from zae_celery.providers.profiles import ANTHROPIC, COMPLETION, OPENAI, Profile, Usage
from zae_celery.testing import TaskHarness

try:  # the HTTP client the SDKs are built on (httpx2 since their 2026 releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older SDK releases
    import httpx  # type: ignore[no-redef,import-not-found,unused-ignore]

RPM = Limit.per_minute("rpm", 60)  # a bucket of 60, one more a second
TPM = Limit.per_minute("tpm", 6000)
ITPM = Limit.per_minute("itpm", 3000)
OTPM = Limit.per_minute("otpm", 1200)

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def app(eager_app: Celery) -> Celery:
    return eager_app


class Provider:
    """What the mock provider answers, and every request it saw."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        return self.answers.pop(0)

    def openai(self, cls: Any = openai.OpenAI, **options: Any) -> Any:
        transport = (httpx.AsyncClient if cls is openai.AsyncOpenAI else httpx.Client)(
            transport=httpx.MockTransport(self)
        )
        return cls(api_key="test", base_url="http://provider/v1", http_client=transport, **options)

    def anthropic(self, **options: Any) -> anthropic.Anthropic:
        transport = httpx.Client(transport=httpx.MockTransport(self))
        return anthropic.Anthropic(
            api_key="test", base_url="http://provider", http_client=transport, **options
        )


def completion(prompt: int, output: int, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        },
    }
    return httpx.Response(200, json=body, headers=headers or {})


def message(given: int, output: int, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": given,
            "output_tokens": output,
            "cache_creation_input_tokens": 10,
            "cache_read_input_tokens": 500,
        },
    }
    return httpx.Response(200, json=body, headers=headers or {})


def define(app: Celery, body: Any, **options: Any) -> Any:
    """A RateLimitedTask (bound) whose body is ``body(self)``."""

    def run(self: Any) -> Any:
        return body(self)

    task = app.task(
        base=RateLimitedTask,
        bind=True,
        shared=False,
        name=f"sdk.{uuid.uuid4().hex[:8]}",
        **{
            "rate_limits": [RPM, TPM],
            "rate_entity": "tenant",
            "rate_resource": "model",
            "rate_consume": {"rpm": 1, "tpm": 500},
            **options,
        },
    )(run)
    return app.tasks[task.name]


def used(zae: TaskHarness, *limits: Limit) -> dict[str, float]:
    """Tokens in use per limit of the test's bucket."""
    left = zae.limiter.available("tenant", "model", list(limits))
    return {lim.name: round(lim.capacity - left[lim.name], 3) for lim in limits}


PROMPT = [{"role": "user", "content": "Summarize the quarterly report."}]


# -- openai -------------------------------------------------------------------------------------
def test_openai_charges_tpm_at_request_time_in_the_settling_write(
    zae: TaskHarness, app: Celery
) -> None:
    provider = Provider(completion(prompt=120, output=80))
    client = provider.openai(max_retries=0)
    task = define(
        app,
        lambda self: (
            zae_openai.chat(self, client, model="m", messages=PROMPT, max_tokens=300)
            .choices[0]
            .message.content
        ),
    )
    counter = Counter(zae.limiter)
    with zae.use(app):
        assert task.delay().get() == "ok"
    # OpenAI counts prompt + max_tokens when the request arrives: 120 + 300, not 200.
    assert zae.ledger.runs[0].consumed == {"rpm": 1, "tpm": 420}
    assert used(zae, RPM, TPM) == {"rpm": 1, "tpm": 420}
    assert counter.take().count("UpdateItem") == 2  # the grant, the settle
    assert provider.requests[0]["max_tokens"] == 300


def test_openai_headers_pull_the_buckets_down_in_the_same_write(
    zae: TaskHarness, app: Celery
) -> None:
    # Another client of the key: OpenAI says 5 requests and 900 tokens are left.
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "55s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "51s",
    }
    provider = Provider(completion(120, 80, headers))
    client = provider.openai(max_retries=0)
    task = define(
        app, lambda self: zae_openai.chat(self, client, model="m", messages=PROMPT, max_tokens=300)
    )
    counter = Counter(zae.limiter)
    with zae.use(app):
        task.delay().get()
    assert zae.limiter.available("tenant", "model", [RPM, TPM]) == pytest.approx(
        {"rpm": 5, "tpm": 900}, abs=0.01
    )
    assert counter.take().count("UpdateItem") == 2  # the grant; the settle, pull-down and all
    # The report is never a refill: a later report of more than the bucket holds lowers nothing.
    headers["x-ratelimit-remaining-tokens"] = "5000"
    provider.answers.append(completion(120, 80, headers))
    with zae.use(app):
        task.delay().get()
    assert zae.limiter.available("tenant", "model", [TPM])["tpm"] == pytest.approx(480, abs=0.01)


def test_a_key_whose_limit_is_lower_charges_each_run_in_proportion(
    zae: TaskHarness, app: Celery
) -> None:
    # The key allows 4,800 tokens a minute (80 a second), not the 6,000 configured: each
    # run is charged 6,000 / 4,800 of what it used, so the fleet goes at the key's pace.
    headers = {
        "x-ratelimit-limit-tokens": "4800",
        "x-ratelimit-remaining-tokens": "4000",
        "x-ratelimit-reset-tokens": "10s",
    }
    provider = Provider(completion(120, 80, headers))
    client = provider.openai(max_retries=0)
    task = define(
        app, lambda self: zae_openai.chat(self, client, model="m", messages=PROMPT, max_tokens=300)
    )
    with zae.use(app):
        task.delay().get()
    # 120 + 300 as OpenAI counts, and a quarter more: 525; 4,000 left at the provider.
    assert zae.ledger.runs[0].consumed == {"rpm": 1, "tpm": 525}
    assert zae.limiter.available("tenant", "model", [TPM])["tpm"] == pytest.approx(4000, abs=0.01)


def test_an_openai_429_blocks_the_fleet_for_its_retry_after(zae: TaskHarness, app: Celery) -> None:
    refused = httpx.Response(
        429,
        json={
            "error": {
                "message": "Rate limit reached",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"retry-after-ms": "20000", "retry-after": "20"},
    )
    provider = Provider(refused)
    client = provider.openai()  # the SDK's default max_retries=2
    task = define(
        app, lambda self: zae_openai.chat(self, client, model="m", messages=PROMPT, max_tokens=300)
    )
    with zae.use(app), pytest.raises(Retry):
        task.delay()
    assert len(provider.requests) == 1  # the SDK did not retry on its own
    # No token before 20 s from now (the 500 estimate stays charged, as the 429 was counted).
    assert zae.limiter.available("tenant", "model", [RPM, TPM]) == pytest.approx(
        {"rpm": -20, "tpm": -2000}, abs=0.01
    )


def test_the_sdk_s_own_retries_are_turned_off_with_one_warning(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    provider = Provider(completion(10, 10), completion(10, 10))
    client = provider.openai(max_retries=3)
    task = define(
        app, lambda self: zae_openai.chat(self, client, model="m", messages=PROMPT, max_tokens=30)
    )
    with zae.use(app), caplog.at_level(logging.WARNING, "zae_celery"):
        task.delay().get()
        task.delay().get()
    warnings = [r.getMessage() for r in caplog.records if "max_retries=0" in r.getMessage()]
    assert len(warnings) == 1
    assert "this client has 3" in warnings[0]


def test_a_response_without_usage_leaves_the_estimate(
    zae: TaskHarness, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    answer = completion(10, 10)
    body = json.loads(answer.content)
    body["usage"] = None
    provider = Provider(httpx.Response(200, json=body))
    client = provider.openai(max_retries=0)
    task = define(
        app, lambda self: zae_openai.chat(self, client, model="m", messages=PROMPT, max_tokens=30)
    )
    with zae.use(app), caplog.at_level(logging.WARNING, "zae_celery"):
        task.delay().get()
    assert zae.ledger.runs[0].consumed == {"rpm": 1, "tpm": 500}
    assert "has no usage: its estimate stands" in caplog.text


def test_an_async_task_uses_the_async_client(zae: TaskHarness, app: Celery) -> None:
    provider = Provider(completion(50, 25))
    client = provider.openai(openai.AsyncOpenAI, max_retries=0)

    @app.task(
        base=RateLimitedTask,
        bind=True,
        shared=False,
        name=f"sdk.{uuid.uuid4().hex[:8]}",
        rate_limits=[RPM, TPM],
        rate_entity="tenant",
        rate_resource="model",
        rate_consume={"rpm": 1, "tpm": 500},
        rate_profile="completion",
    )
    async def ask(self: RateLimitedTask) -> str:
        reply = await zae_openai.achat(self, client, model="m", messages=PROMPT, max_tokens=30)
        return str(reply.choices[0].message.content)

    with zae.use(app):
        assert app.tasks[ask.name].delay().get() == "ok"
    assert zae.ledger.runs[0].consumed == {"rpm": 1, "tpm": 75}  # completion: what was used


# -- anthropic ----------------------------------------------------------------------------------
def test_anthropic_charges_input_and_output_limits_apart(zae: TaskHarness, app: Celery) -> None:
    headers = {
        "anthropic-ratelimit-input-tokens-limit": "3000",
        "anthropic-ratelimit-input-tokens-remaining": "700",
        "anthropic-ratelimit-input-tokens-reset": "2027-01-15T08:00:59Z",
        "anthropic-ratelimit-output-tokens-limit": "1200",
        "anthropic-ratelimit-output-tokens-remaining": "1150",
        "anthropic-ratelimit-output-tokens-reset": "2027-01-15T08:00:59Z",
    }
    provider = Provider(message(given=200, output=90, headers=headers))
    client = provider.anthropic(max_retries=0)
    task = define(
        app,
        lambda self: (
            zae_anthropic.messages(self, client, model="m", max_tokens=400, messages=PROMPT)
            .content[0]
            .text
        ),
        rate_limits=[RPM, ITPM, OTPM],
        rate_consume={"rpm": 1, "itpm": 250, "otpm": 400},
    )
    with zae.use(app):
        assert task.delay().get() == "ok"
    # Input: 200 + 10 cache writes (cache reads are not counted); output: what was used.
    assert zae.ledger.runs[0].consumed == {"rpm": 1, "itpm": 210, "otpm": 90}
    left = zae.limiter.available("tenant", "model", [ITPM, OTPM])
    # Input pulled down to the provider's 700; output left at 1110, below its 1150.
    assert left == pytest.approx({"itpm": 700, "otpm": 1110}, abs=0.01)


def test_an_anthropic_529_refunds_the_run_and_holds_the_fleet_back(
    zae: TaskHarness, app: Celery
) -> None:
    overloaded = httpx.Response(
        529, json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    provider = Provider(overloaded)
    client = provider.anthropic(max_retries=0)
    task = define(
        app,
        lambda self: zae_anthropic.messages(
            self, client, model="m", max_tokens=400, messages=PROMPT
        ),
    )
    with zae.use(app), pytest.raises(Retry):
        task.delay()
    (run,) = zae.ledger.runs
    assert run.state == "RETRY" and not any(run.consumed.values())  # refunded
    # Held back 5 s (no retry-after came), counting from a full bucket.
    assert zae.limiter.available("tenant", "model", [RPM, TPM]) == pytest.approx(
        {"rpm": -5, "tpm": -500}, abs=0.01
    )


def test_an_anthropic_429_reads_retry_after_in_seconds(zae: TaskHarness, app: Celery) -> None:
    refused = httpx.Response(
        429,
        json={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        headers={"retry-after": "12"},
    )
    provider = Provider(refused)
    client = provider.anthropic(max_retries=0)
    task = define(
        app,
        lambda self: zae_anthropic.messages(
            self, client, model="m", max_tokens=400, messages=PROMPT
        ),
    )
    with zae.use(app), pytest.raises(Retry) as retry:
        task.delay()
    assert zae.limiter.available("tenant", "model", [RPM])["rpm"] == pytest.approx(-12, abs=0.01)
    assert retry.value.when == pytest.approx(12, abs=0.01)


# -- without an SDK ------------------------------------------------------------------------------
def test_provider_reported_alone_settles_in_one_write_at_the_end(
    zae: TaskHarness, app: Celery
) -> None:
    task = define(
        app,
        lambda self: self.provider_reported({"x-ratelimit-remaining-requests": "3"}).windows[
            "requests"
        ],
    )
    counter = Counter(zae.limiter)
    with zae.use(app):
        window = task.delay().get()
    assert window.remaining == 3
    assert counter.take().count("UpdateItem") == 2  # the grant, the pull-down at the end
    assert zae.limiter.available("tenant", "model", [RPM])["rpm"] == pytest.approx(3, abs=0.01)


def test_rate_profile_is_checked(app: Celery) -> None:
    task = define(app, lambda self: None, rate_profile="gemini")
    with pytest.raises(ValidationError, match="rate_profile"):
        task.delay()


def test_a_plain_task_is_refused_with_a_clear_message(app: Celery) -> None:
    @app.task(bind=True, shared=False, name=f"sdk.{uuid.uuid4().hex[:8]}")
    def plain(self: Any) -> None:
        zae_openai.chat(self, object(), model="m", messages=PROMPT)

    with pytest.raises(TypeError, match="not a RateLimitedTask"):
        plain.apply(throw=True)


# -- profiles -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (OPENAI, {"tpm": 130 + 300}),
        (COMPLETION, {"tpm": 130 + 70}),
        (ANTHROPIC, {"tpm": 200, "itpm": 130, "otpm": 70}),
    ],
)
def test_each_profile_charges_as_its_provider_counts(
    profile: Profile, expected: dict[str, int]
) -> None:
    names = {"rpm", "tpm", "itpm", "otpm"}
    assert profile.charges(Usage(130, 70), max_tokens=300, names=names) == expected


def test_a_request_time_profile_without_max_tokens_charges_what_was_used() -> None:
    assert OPENAI.charges(Usage(130, 70), max_tokens=None, names={"tpm"}) == {"tpm": 200}


def test_a_profile_names_only_the_task_s_limits() -> None:
    assert ANTHROPIC.charges(Usage(1, 2), max_tokens=5, names={"rpm", "otpm"}) == {"otpm": 2}


def test_estimate_tokens_counts_strings_and_messages() -> None:
    assert zae_openai.estimate_tokens("x" * 9) == 3
    blocks = [{"role": "user", "content": [{"type": "text", "text": "y" * 8}]}]
    assert zae_anthropic.estimate_tokens(blocks + PROMPT) == 2 + 8


def test_asyncio_is_not_needed_for_the_sync_helpers() -> None:
    assert not asyncio.iscoroutinefunction(zae_openai.chat)
    assert asyncio.iscoroutinefunction(zae_openai.achat)
