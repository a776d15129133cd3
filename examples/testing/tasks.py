"""A rate-limited summarizer, as an application defines it (the code under test).

In production the app's configuration names the store (``zae_table_name``, or
``zae_store_url``); the tests never reach it: the plugin's harness replaces it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from zae_celery import Limit, RateLimitedTask

app = Celery("summaries", broker="memory://")
app.conf.zae_table_name = "rate_limits"

RPM = Limit.per_minute("rpm", 2)
TPM = Limit.per_minute("tpm", 10_000)


def call_model(text: str) -> dict[str, Any]:
    """Stands in for the provider's SDK: a summary and the tokens it billed."""
    words = text.split()
    return {"summary": " ".join(words[:5]), "total_tokens": len(words) + 40}


def estimate(args: Any, kwargs: Any) -> dict[str, int]:
    """An upper bound of the tokens a call bills, known before the call."""
    return {"rpm": 1, "tpm": len(kwargs["text"].split()) + 200}


@app.task(
    base=RateLimitedTask,
    bind=True,
    rate_limits=[RPM, TPM],
    rate_entity=lambda args, kwargs: kwargs["tenant"],
    rate_resource="summarizer",
    rate_consume=estimate,
)
def summarize(self: RateLimitedTask, *, text: str, tenant: str) -> str:
    reply = call_model(text)
    self.report_usage(tpm=reply["total_tokens"])  # the truth, after the call
    if reply.get("status") == 429:
        self.provider_limited(reply["retry_after"])
    return str(reply["summary"])
