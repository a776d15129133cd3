"""Quick start: a global limit grants calls until it runs out, then refuses with a wait.

One tenant may make 3 calls and use 1 000 tokens a minute on one model. Each call takes
a lease before it runs (one conditional write to DynamoDB) and, afterwards, reports the
tokens it really used (``lease.adjust``: the estimate becomes the real figure). The fourth
call is refused: ``RateLimitExceeded`` names the limit that refused and says how many
seconds until it would be granted. Every process using the same table shares these
buckets; here one process is enough to see the behaviour.

Run from the repository root; with no endpoint an embedded moto server is started and
stopped, so no AWS account is needed:

    python -m examples.quickstart
    python -m examples.quickstart --endpoint-url http://127.0.0.1:8000   # DynamoDB Local
    python -m examples.quickstart --json                                  # for programs
"""

from __future__ import annotations

from typing import Any

from examples._local import dynamodb, emit, parse_args, table_name
from zae_celery import Limit, RateLimiter, RateLimitExceeded

LIMITS = [Limit.per_minute("rpm", 3), Limit.per_minute("tpm", 1_000)]
ESTIMATE = 200  # tokens a call is expected to use; the real figure is reported afterwards


def call_model(prompt: str) -> int:
    """Stands in for the provider call; returns the tokens it was billed."""
    return 60 + 8 * len(prompt)


def attempt(limiter: RateLimiter, prompt: str) -> dict[str, Any]:
    """One call under the limits: what happened, as a dict."""
    try:
        with limiter.acquire(
            "tenant-42", "gpt-4o", consume={"rpm": 1, "tpm": ESTIMATE}, limits=LIMITS
        ) as lease:
            used = call_model(prompt)
            lease.adjust(tpm=used - ESTIMATE)  # reconcile the estimate (may go into debt)
        # What the bucket was charged in the end: the estimate plus the adjustment.
        return {"granted": True, "tokens": used, "charged": dict(lease.consumed)}
    except RateLimitExceeded as exc:
        return {
            "granted": False,
            "retry_after": exc.retry_after,
            "refused_by": [v.limit_name for v in exc.violations],
        }


def main() -> None:
    """Make four calls against a limit of three a minute and print what happened."""
    args = parse_args(__doc__)
    prompts = ["summarize the report", "translate the summary", "list the risks", "one more"]
    with dynamodb(args.endpoint_url) as endpoint:
        limiter = RateLimiter(table_name("quickstart"), endpoint_url=endpoint.url)
        limiter.create_table()  # local endpoints; on AWS the table comes from the stack
        try:
            calls = [attempt(limiter, prompt) for prompt in prompts]
            left = limiter.available("tenant-42", "gpt-4o", LIMITS)
        finally:
            limiter.delete_table()
    rpm, tpm = LIMITS
    text = [f"limits: {rpm.capacity} calls/min, {tpm.capacity} tokens/min (tenant-42, gpt-4o)"]
    for n, call in enumerate(calls, 1):
        if call["granted"]:
            text.append(f"call {n}: granted, used {call['tokens']} tokens")
        else:
            refused_by = ", ".join(call["refused_by"])
            text.append(f"call {n}: refused by {refused_by}, retry in {call['retry_after']:.1f} s")
    text.append(f"left now: {left['rpm']:.2f} calls, {left['tpm']:.0f} tokens")
    result = {
        "limits": [lim.to_dict() for lim in LIMITS],
        "calls": calls,
        "available": left,
    }
    emit(args.json, endpoint, result, text)


if __name__ == "__main__":
    main()
