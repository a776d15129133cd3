"""The same workload on the third-party zae-limiter library (PyPI ``zae-limiter==0.17.0``).

Our benchmark program calls :func:`run_zae_limiter` next to its own runs, in the same
process and against the same DynamoDB endpoint, so the two sets of figures compare like
with like. zae-limiter is imported inside the function (through :mod:`importlib`, so
neither ruff nor mypy needs it installed): this module imports fine without it.

What one call does, all through zae-limiter's public sync API:

* creates the library's own table under ``table_name`` with
  ``SyncRepository(...).create_table()`` (its direct CreateTable path; the library's
  usual ``open()`` / ``builder().build()`` would deploy a CloudFormation stack, which a
  local DynamoDB endpoint does not have), then opens it with
  ``SyncRepository.builder().stack(...).region(...).endpoint_url(...).build()`` and wraps
  it in ``SyncRateLimiter``;
* stores the limits for one entity/resource with ``limiter.set_limits`` (acquire then
  resolves them from stored config, the library's recommended mode);
* per cycle: ``with limiter.acquire(entity, resource, consume={...}) as lease:``
  ``lease.adjust(tpm=20)``, the commit being the exit of the ``with`` block. A refused
  acquire (``RateLimitExceeded``) is a cycle too, timed, without the adjust;
* counts every HTTP request the repository's DynamoDB client sends during the timed
  cycles, retries included, with a botocore ``before-send`` hook on that client;
* deletes the table at the end.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from typing import Any

IDLE_CAPACITY = 10**9
"""Per-minute rate and capacity of every limit of the idle bucket: nothing is refused."""

SATURATED_TPM = 100
"""Per-minute rate and burst of ``tpm`` in the saturated bucket: one acquire empties it."""

TPM_ESTIMATE = 100
"""Tokens consumed from ``tpm`` at acquire."""

TPM_EXTRA = 20
"""Tokens added to ``tpm`` by ``lease.adjust`` (actual usage above the estimate)."""

_REGION = "us-east-1"


def _limit_names(n_limits: int) -> list[str]:
    if n_limits == 1:
        return ["tpm"]
    if n_limits == 2:
        return ["rpm", "tpm"]
    if n_limits == 5:
        return ["rpm", "tpm", "l3", "l4", "l5"]
    raise ValueError(f"n_limits must be 1, 2 or 5, not {n_limits}")


def _no_lambda_probe(*_args: Any, **_kwargs: Any) -> bool | None:
    return None


def run_zae_limiter(
    endpoint_url: str,
    n_limits: int,
    saturated: bool,
    cycles: int,
    table_name: str,
    *,
    warmup_cycles: int = 20,
    rejection_cache: bool = True,
) -> dict[str, Any]:
    """Time ``cycles`` acquire/adjust/commit cycles of zae-limiter's sync API.

    Args:
        endpoint_url: DynamoDB endpoint, e.g. ``http://127.0.0.1:8000``.
        n_limits: 1 (``tpm``), 2 (``rpm`` + ``tpm``) or 5 (``rpm``, ``tpm``, ``l3``,
            ``l4``, ``l5``). ``tpm`` consumes 100 then is adjusted by +20; every other
            limit consumes 1.
        saturated: False for an idle bucket (every limit 10**9 per minute: nothing is
            refused); True for ``tpm`` at 100 per minute with a burst of 100, which the
            warm-up empties, so nearly every timed acquire is refused.
        cycles: Timed cycles.
        table_name: A table (zae-limiter "stack") name not used before on this endpoint;
            zae-limiter allows letters, digits and hyphens only (no ``_`` or ``.``).
        warmup_cycles: Untimed cycles run first (connections, caches, the first write
            that creates the bucket item).
        rejection_cache: Keep zae-limiter's default rejection cache (a repeat rejection
            within 1 s is answered from memory with no DynamoDB call). False builds
            the repository with ``rejection_cache_ttl(0)``, so every refused acquire
            goes to DynamoDB.

    Returns:
        ``{"latencies_s": [...], "requests": int, "cycles": int, "admitted": int,
        "refused": int}``; ``latencies_s`` has one entry per timed cycle, ``requests``
        is the number of DynamoDB HTTP requests sent during the timed cycles.
    """
    names = _limit_names(n_limits)
    if cycles < 1:
        raise ValueError("cycles must be at least 1")

    zl: Any = importlib.import_module("zae_limiter")
    _create(table_name, endpoint_url)
    repo, limiter = _open(table_name, endpoint_url, rejection_cache)
    try:
        entity = "bench-entity"
        resource = "bench-resource"
        limits: list[Any] = []
        for name in names:
            if saturated and name == "tpm":
                limits.append(zl.Limit.per_minute(name, SATURATED_TPM, burst=SATURATED_TPM))
            else:
                limits.append(zl.Limit.per_minute(name, IDLE_CAPACITY))
        limiter.set_limits(entity, limits, resource=resource)
        consume = {name: (TPM_ESTIMATE if name == "tpm" else 1) for name in names}

        # Every DynamoDB call of the repository goes through this one client (created
        # lazily and kept; close() drops it). before-send fires once per HTTP attempt.
        client: Any = repo._get_client()
        sent = [0]

        def count_request(**_kwargs: Any) -> None:
            sent[0] += 1

        client.meta.events.register("before-send.dynamodb", count_request)

        rate_limit_exceeded: type[BaseException] = zl.RateLimitExceeded
        latencies: list[float] = []
        admitted = 0
        for index in range(warmup_cycles + cycles):
            if index == warmup_cycles:
                sent[0] = 0
                admitted = 0
            start = time.perf_counter()
            try:
                with limiter.acquire(entity, resource, consume=consume) as lease:
                    lease.adjust(tpm=TPM_EXTRA)
                admitted += 1
            except rate_limit_exceeded:
                pass
            elapsed = time.perf_counter() - start
            if index >= warmup_cycles:
                latencies.append(elapsed)
        requests = sent[0]
        if repo._get_client() is not client:
            raise RuntimeError("zae-limiter replaced its DynamoDB client: requests miscounted")
        client.meta.events.unregister("before-send.dynamodb", count_request)
    finally:
        try:
            repo.delete_table()
        finally:
            limiter.close()
    return {
        "latencies_s": latencies,
        "requests": requests,
        "cycles": cycles,
        "admitted": admitted,
        "refused": cycles - admitted,
    }


# -- one hot bucket (benchmarks.hot --library zae-limiter) ------------------------------
HOT_ENTITY, HOT_RESOURCE = "bench-entity", "bench-resource"


def _create(table_name: str, endpoint_url: str) -> None:
    """Create zae-limiter's table: its only direct CreateTable path is
    ``SyncRepository.create_table()``, on a repository built with the (deprecated,
    warning) constructor. boto3's default credential chain is all zae-limiter uses; a
    local endpoint accepts any key, so dummy ones fill in when none are configured."""
    zl: Any = importlib.import_module("zae_limiter")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        creator: Any = zl.SyncRepository(name=table_name, region=_REGION, endpoint_url=endpoint_url)
    if creator.table_name != table_name:
        raise ValueError(f"zae-limiter maps {table_name!r} to table {creator.table_name!r}")
    creator.create_table()
    creator.close()


def _open(table_name: str, endpoint_url: str, rejection_cache: bool = True) -> tuple[Any, Any]:
    """zae-limiter's repository and sync limiter on an existing table. ``rejection_cache``
    False builds the repository with ``rejection_cache_ttl(0)``.

    build() writes the stack's version record and, before that, probes the Lambda API at
    the same endpoint for the stack's aggregator functions. DynamoDB Local answers that
    probe with HTTP 500, which botocore retries with back-off for ~8 s before the probe
    gives up with "cannot tell" (None). Answer None at once: the record then says
    "Lambda version unknown", which only gates ``reset_after`` limits (none here), and no
    timed cycle touches Lambda; only set-up time changes."""
    zl: Any = importlib.import_module("zae_limiter")
    builder: Any = (
        zl.SyncRepository.builder().stack(table_name).region(_REGION).endpoint_url(endpoint_url)
    )
    if not rejection_cache:
        builder = builder.rejection_cache_ttl(0)
    stack_manager: Any = importlib.import_module("zae_limiter.infra.sync_stack_manager")
    lambda_probe: Any = stack_manager.lambda_function_exists
    stack_manager.lambda_function_exists = _no_lambda_probe
    try:
        repo: Any = builder.build()
    finally:
        stack_manager.lambda_function_exists = lambda_probe
    return repo, zl.SyncRateLimiter(repository=repo)


def hot_setup(endpoint_url: str, table_name: str, shards: int, consume: dict[str, int]) -> None:
    """Create the table and store rpm and tpm limits so large that nothing is refused;
    with ``shards`` > 1, double the bucket's shard count up to it before the clients
    start (``bump_shard_count``: zae-limiter doubles by itself only past 1,000 writes a
    second on one item, which a local endpoint does not reach)."""
    zl: Any = importlib.import_module("zae_limiter")
    _create(table_name, endpoint_url)
    repo, limiter = _open(table_name, endpoint_url)
    try:
        big = [zl.Limit.per_minute("rpm", IDLE_CAPACITY), zl.Limit.per_minute("tpm", IDLE_CAPACITY)]
        limiter.set_limits(HOT_ENTITY, big, resource=HOT_RESOURCE)
        with limiter.acquire(HOT_ENTITY, HOT_RESOURCE, consume=consume):
            pass  # creates shard 0, which holds the shard count
        count = 1
        while count < shards:
            count = repo.bump_shard_count(HOT_ENTITY, HOT_RESOURCE, count)
    finally:
        limiter.close()


def hot_delete(endpoint_url: str, table_name: str) -> None:
    """Delete the table of :func:`hot_setup`."""
    repo, limiter = _open(table_name, endpoint_url)
    try:
        repo.delete_table()
    finally:
        limiter.close()


class HotClient:
    """One client process's zae-limiter limiter on the hot bucket: ``grant()`` acquires
    rpm(1) + tpm(100) and commits (the ``with`` block's exit)."""

    def __init__(self, endpoint_url: str, table_name: str, consume: dict[str, int]) -> None:
        self.repo, self.limiter = _open(table_name, endpoint_url)
        self.consume = consume
        self.client: Any = self.repo._get_client()

    def grant(self) -> None:
        """One grant, committed at once."""
        with self.limiter.acquire(HOT_ENTITY, HOT_RESOURCE, consume=self.consume):
            pass

    def close(self) -> None:
        """Close the limiter (and its client)."""
        self.limiter.close()
