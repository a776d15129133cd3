"""Tenants: per-tenant limits under a project-wide parent limit, stored in the table.

A project ("acme") may make 5 calls a minute on a model, shared by all of its tenants;
each tenant ("acme-alice", "acme-bob") may make 3. The tenants are created under the
project with ``cascade=True``, so every call of a tenant consumes the tenant's bucket and
the project's in one atomic write (a transaction: both or neither). The limits are stored
in the table with ``set_limits`` (what ``zae-celery limits set`` does): they override the
generous default the code passes, and every worker reads them.

Alice makes 4 calls: the 4th is refused by her own limit. Bob then makes 3: he still has
tokens of his own, but the project has only 2 left after Alice's 3, so his 3rd call is
refused by the project's limit — the parent binds across tenants.

Run from the repository root; with no endpoint an embedded moto server is started and
stopped, so no AWS account is needed:

    python -m examples.tenants
    python -m examples.tenants --endpoint-url http://127.0.0.1:8000 --json
"""

from __future__ import annotations

from typing import Any

from examples._local import dynamodb, emit, parse_args, table_name
from zae_celery import Limit, RateLimiter, RateLimitExceeded

PROJECT = "acme"
TENANTS = {"acme-alice": 4, "acme-bob": 3}  # tenant -> calls it makes, in this order
MODEL = "gpt-4o"
DEFAULT_LIMITS = [Limit.per_minute("rpm", 1_000)]  # in code; stored limits override it


def set_up(limiter: RateLimiter) -> dict[str, int]:
    """Create the project's tenants and store everyone's limits; returns them per entity."""
    limiter.set_limits(PROJECT, [Limit.per_minute("rpm", 5)], resource=MODEL)
    for tenant in TENANTS:
        limiter.create_entity(tenant, parent_id=PROJECT, cascade=True)
        limiter.set_limits(tenant, [Limit.per_minute("rpm", 3)], resource=MODEL)
    # Read back what is stored, as a worker would see it.
    return {entity: limiter.get_limits(entity, MODEL)[0].capacity for entity in [PROJECT, *TENANTS]}


def call(limiter: RateLimiter, tenant: str) -> dict[str, Any]:
    """One call of ``tenant``: granted, or which entity's limit refused it and for how long."""
    try:
        with limiter.acquire(tenant, MODEL, consume={"rpm": 1}, limits=DEFAULT_LIMITS):
            pass  # the provider call goes here
        return {"tenant": tenant, "granted": True}
    except RateLimitExceeded as exc:
        return {
            "tenant": tenant,
            "granted": False,
            "retry_after": exc.retry_after,
            "refused_by": [f"{v.entity_id}/{v.limit_name}" for v in exc.violations],
        }


def describe(outcome: dict[str, Any]) -> str:
    """One line of the text report."""
    if outcome["granted"]:
        return f"  {outcome['tenant']:<11} granted"
    return (
        f"  {outcome['tenant']:<11} REFUSED by {', '.join(outcome['refused_by'])}, "
        f"retry in {outcome['retry_after']:.1f} s"
    )


def main() -> None:
    """Store the limits, make every tenant's calls in turn, print who was refused by whom."""
    args = parse_args(__doc__)
    with dynamodb(args.endpoint_url) as endpoint:
        limiter = RateLimiter(table_name("tenants"), endpoint_url=endpoint.url)
        limiter.create_table()  # local endpoints; on AWS the table comes from the stack
        try:
            stored = set_up(limiter)
            outcomes = [
                call(limiter, tenant) for tenant, calls in TENANTS.items() for _ in range(calls)
            ]
            # What one more call of each could take now: the least of its own bucket and,
            # for a tenant, the project's (stored limits apply).
            left = {e: limiter.available(e, MODEL, DEFAULT_LIMITS)["rpm"] for e in stored}
        finally:
            limiter.delete_table()
    text = ["stored limits (calls per minute on " + MODEL + "):"]
    text += [f"  {entity:<11} {rpm}" for entity, rpm in stored.items()]
    text.append(f"calls, in order (tenants cascade to {PROJECT}):")
    text += [describe(outcome) for outcome in outcomes]
    text.append(
        "calls left now (a tenant's include the project's): "
        + ", ".join(f"{e} {n:.2f}" for e, n in left.items())
    )
    result = {
        "project": PROJECT,
        "stored_rpm": stored,
        "calls": outcomes,
        "available_rpm": left,
    }
    emit(args.json, endpoint, result, text)


if __name__ == "__main__":
    main()
