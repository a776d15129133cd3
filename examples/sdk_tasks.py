"""Rate-limited tasks that call OpenAI and Anthropic through their official SDKs.

    celery -A examples.sdk_tasks worker --prefetch-multiplier 1

The clients read their keys (and base URLs) from the environment as usual:
OPENAI_API_KEY, ANTHROPIC_API_KEY (OPENAI_BASE_URL, ANTHROPIC_BASE_URL). BROKER_URL,
RESULT_BACKEND and ZAE_STORE_URL say where the broker, the results and the buckets are.
The test suite runs this module on real workers against the local provider
(tests/test_provider_workers.py).
"""

import os

from anthropic import Anthropic
from celery import Celery
from openai import OpenAI

from zae_celery import Limit, RateLimitedTask
from zae_celery.providers import anthropic as zae_anthropic
from zae_celery.providers import openai as zae_openai

app = Celery(
    "llm",
    broker=os.environ.get("BROKER_URL", "amqp://guest:guest@localhost:5672//"),
    backend=os.environ.get("RESULT_BACKEND"),
)
app.conf.zae_store_url = os.environ.get("ZAE_STORE_URL", "dynamodb://rate_limits")
app.conf.task_acks_late = True

# The SDKs must not retry on their own: a retried request would never be counted in the
# shared buckets. A 429 defers the task instead (and holds back every worker).
openai_client = OpenAI(max_retries=0)
anthropic_client = Anthropic(max_retries=0)

SUMMARY_TOKENS = 300  # max_tokens unless the caller says
TRANSLATION_TOKENS = 400


@app.task(
    base=RateLimitedTask,
    bind=True,
    rate_profile="openai",  # tpm is counted at request time: prompt + max_tokens
    rate_limits=[Limit.per_minute("rpm", 500), Limit.per_minute("tpm", 200_000)],
    rate_resource="gpt-4o-mini",
    rate_entity=lambda args, kwargs: kwargs["tenant"],
    rate_consume=lambda args, kwargs: {
        "rpm": 1,
        "tpm": zae_openai.estimate_tokens(kwargs["text"])
        + kwargs.get("max_tokens", SUMMARY_TOKENS),
    },
)
def summarize(
    self: RateLimitedTask, *, tenant: str, text: str, max_tokens: int = SUMMARY_TOKENS
) -> str:
    """One chat completion under the tenant's shared rpm and tpm buckets."""
    reply = zae_openai.chat(
        self,
        openai_client,
        model="gpt-4o-mini",
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": f"Summarize:\n{text}"}],
    )
    return reply.choices[0].message.content or ""


@app.task(
    base=RateLimitedTask,
    bind=True,
    rate_profile="anthropic",  # input and output tokens per minute, each its own limit
    rate_limits=[
        Limit.per_minute("rpm", 50),
        Limit.per_minute("itpm", 30_000),
        Limit.per_minute("otpm", 8_000),
    ],
    rate_resource="claude-sonnet-4-5",
    rate_entity=lambda args, kwargs: kwargs["tenant"],
    rate_consume=lambda args, kwargs: {
        "rpm": 1,
        "itpm": zae_anthropic.estimate_tokens(kwargs["text"]),
        "otpm": kwargs.get("max_tokens", TRANSLATION_TOKENS),  # counted until the end
    },
)
def translate(
    self: RateLimitedTask, *, tenant: str, text: str, max_tokens: int = TRANSLATION_TOKENS
) -> str:
    """One message under the tenant's shared rpm, itpm and otpm buckets."""
    message = zae_anthropic.messages(
        self,
        anthropic_client,
        model="claude-sonnet-4-5",
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": f"Translate to French:\n{text}"}],
    )
    return str(message.content[0].text)
