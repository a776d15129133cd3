"""The decorator: functions that run only within their tenant's limits.

Each call of ``ask`` takes a lease before it runs: the tenant and the tokens come from
the call's own arguments, and the function reports the tokens it was really billed
through ``limiter.current_lease()``. A call beyond the limit is refused before it runs,
and another tenant's calls never touch that tenant's buckets. ``translate`` is an
``async def`` under the async limiter; both limiters use one in-memory store, so they
share the buckets, as every process on the same table does.

    python -m examples.decorator
"""

from __future__ import annotations

import asyncio

from zae_celery import AsyncRateLimiter, Limit, RateLimiter, RateLimitExceeded

LIMITS = [Limit.per_minute("rpm", 2), Limit.per_minute("tpm", 1_000)]
limiter = RateLimiter.from_url("memory://example")
async_limiter = AsyncRateLimiter.from_url("memory://example")


def estimate(tenant: str, prompt: str) -> dict[str, int]:
    """What a call may use, known before it runs: one request, at most this many tokens."""
    return {"rpm": 1, "tpm": 100 + 2 * len(prompt)}


@limiter.limit(
    entity=lambda tenant, prompt: tenant,
    resource="gpt-4o",
    consume=estimate,
    limits=LIMITS,
)
def ask(tenant: str, prompt: str) -> str:
    used = 20 + len(prompt)  # stands in for the provider call and the tokens it billed
    lease = limiter.current_lease()
    lease.adjust(tpm=used - lease.consumed["tpm"])  # the estimate becomes the real figure
    return f"{tenant}: answered, {used} tokens"


@async_limiter.limit(lambda tenant, text: tenant, "gpt-4o", {"rpm": 1}, LIMITS)
async def translate(tenant: str, text: str) -> str:
    await asyncio.sleep(0)  # stands in for an async provider call
    return f"{tenant}: translated {text!r}"


def main() -> None:
    for tenant in ("acme", "acme", "acme", "globex"):
        try:
            print(ask(tenant, "summarize the report"))
        except RateLimitExceeded as exc:
            limit = exc.violations[0].limit_name
            print(f"{tenant}: refused by {limit}, retry in {exc.retry_after:.0f} s")
    print(asyncio.run(translate("globex", "bonjour")))
    for tenant in ("acme", "globex"):
        left = limiter.available(tenant, "gpt-4o", LIMITS)
        print(f"{tenant}: {left['rpm']:.0f} requests and {left['tpm']:.0f} tokens left")


if __name__ == "__main__":
    main()
