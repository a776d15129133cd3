"""Faults around a task's message: a killed worker, a redelivered message, a broker that
refuses the republish of a deferred task; and what reaches logs and results.

The engine tests run on both endpoints with an injected clock. The worker tests start
real ``celery worker`` processes on a private redis-server, with the engine on moto
server, and synchronise on records the tasks push to redis lists (never on sleeps).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
from celery import Celery

from harness.workers import log_text, worker_fleet
from tests.helpers import Clock, Counter
from tests.test_bad_input import whole_table
from zae_celery.core import LeaseClaimed, Limit, RateLimiter, RateLimitExceeded, Slot
from zae_celery.core.lease import LeaseState
from zae_celery.core.stores import MemoryStore, RedisStore
from zae_celery.testing import LocalServer, free_port

pytestmark = pytest.mark.integration

TOTAL = Limit.custom("total", 1000, refill_amount=1, refill_period_seconds=31_536_000)
RPS = Limit.per_second("rps", 2)


# -- the engine: a carried reservation starts once ---------------------------------------


def _carried(limiter: RateLimiter, claim: str | None) -> dict[str, Any]:
    """A reservation as a deferred message carries it (granted, start not yet counted)."""
    lease = limiter.reserve("tenant", "model", {"rps": 1, "total": 1}, [RPS, TOTAL], horizon=60)
    ticket = lease.ticket()
    ticket.pop("claim", None)
    return ticket if claim is None else {**ticket, "claim": claim}


def _claims(limiter: RateLimiter) -> list[Any]:
    """The claim items stored: (entity, ttl) pairs, whatever the store."""
    store = getattr(limiter.store, "_store", limiter.store)  # under a Counter
    if isinstance(store, MemoryStore):
        return [(entity, "ttl") for (entity, _), ttl in store.dump()["claims"].items() if ttl]
    if isinstance(store, RedisStore):
        claims = [key for key in store.dump() if "#C#" in key]
        return [
            (key.split("E#", 1)[1].split("#", 1)[0], "ttl" if store.client.pttl(key) > 0 else None)
            for key in claims
        ]
    return [
        (item["PK"]["S"][2:], "ttl" if "ttl" in item else None)
        for item in whole_table(limiter)
        if item["SK"]["S"].startswith("C#")
    ]


@pytest.mark.contract
def test_a_claimed_reservation_starts_once(limiter: RateLimiter) -> None:
    data = _carried(limiter, "task-1:nonce")
    assert limiter.resume(data).claimed_by("task-1")
    counter = Counter(limiter)
    first = limiter.resume(data)
    assert limiter.start(first) == 0.0
    assert counter.take() == ["TransactWriteItems"]  # claim and start count: one request
    before = whole_table(limiter)
    counter.take()
    assert _claims(limiter) == [("tenant", "ttl")]  # in the entity's partition, expiring
    with pytest.raises(LeaseClaimed):
        limiter.start(limiter.resume(data))  # the same message, delivered again
    assert counter.take() == ["TransactWriteItems"]
    assert whole_table(limiter) == before  # the refused start counted nothing
    # Another reservation (another claim) starts as usual.
    limiter.start(limiter.resume(_carried(limiter, "task-1:other")))


def test_an_unclaimed_reservation_costs_one_update(limiter: RateLimiter) -> None:
    counter = Counter(limiter)
    lease = limiter.resume(_carried(limiter, None))
    counter.take()
    limiter.start(lease)
    assert counter.take() == ["UpdateItem"]


def test_a_refused_claimed_start_leaves_the_claim_free(limiter: RateLimiter, clock: Clock) -> None:
    """A start refused beyond its horizon writes no claim: the deferred message that
    follows can still start on the reservation."""
    data = [_carried(limiter, f"task-{i}:n") for i in range(3)]  # rps 2: slot of #3 is ahead
    limiter.start(limiter.resume(data[0]))
    limiter.start(limiter.resume(data[1]))
    before = whole_table(limiter)
    with pytest.raises(RateLimitExceeded):
        limiter.start(limiter.resume(data[2]), horizon=0)
    assert whole_table(limiter) == before
    clock.advance(1)
    assert limiter.start(limiter.resume(data[2]), horizon=0) == 0.0


def test_the_claim_travels_and_is_checked() -> None:
    from zae_celery.core import ValidationError

    state = LeaseState((), {}, 0, 0, claim="t:n")
    assert LeaseState.from_dict(state.to_dict()).claim == "t:n"
    assert "claim" not in LeaseState((), {}, 0, 0).to_dict()
    for bad in (5, "", "x" * 513):
        with pytest.raises(ValidationError) as info:
            LeaseState.from_dict({**state.to_dict(), "claim": bad})
        assert info.value.field == "ticket.claim"


# -- real workers ---------------------------------------------------------------------------


@dataclass
class Fleet:
    client: Celery
    records: redis_client.Redis
    prefix: str
    logs: Path
    limiter: RateLimiter
    procs: list[Any]

    def send(self, task: str, *args: Any, **options: Any) -> Any:
        return self.client.send_task(
            f"tests.celery.app.{task}", args=list(args), queue=f"{self.prefix}limited", **options
        )

    def send_kwargs(self, task: str, **kwargs: Any) -> Any:
        return self.send(task, kwargs=kwargs)

    def next_run(self, gate: str, timeout: int = 90) -> dict[str, Any]:
        """The next run a task recorded under ``gate`` (waits for it)."""
        found = self.records.blpop([f"{gate}:runs"], timeout=timeout)
        assert found is not None, f"no run recorded for {gate}\n{log_text(self.logs)[-4000:]}"
        run: dict[str, Any] = json.loads(found[1])
        return run

    def left(self, resource: str) -> int:
        return round(self.limiter.available("default", resource, [TOTAL])["total"])


@contextlib.contextmanager
def fleet(
    redis: LocalServer,
    moto: LocalServer,
    tmp_path: Path,
    *,
    scheme: str = "redis",
    count: int = 2,
    env: dict[str, str] | None = None,
) -> Iterator[Fleet]:
    prefix = f"f{uuid.uuid4().hex[:6]}-"
    table = f"zae-faults-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(table, endpoint_url=moto.url)
    limiter.create_table()
    url = f"redis://127.0.0.1:{redis.port}/0"
    backend = f"file://{tmp_path / 'results'}"
    (tmp_path / "results").mkdir()
    logs = tmp_path / "logs"
    worker_env = {
        "ZAE_TEST_BROKER": url.replace("redis", scheme, 1),
        "ZAE_TEST_BACKEND": backend,
        "ZAE_TEST_ENDPOINT": moto.url,
        "ZAE_TEST_TABLE": table,
        "ZAE_TEST_PREFIX": prefix,
        "ZAE_TEST_RECORDS": url,
        **(env or {}),
    }
    records = redis_client.Redis.from_url(url, socket_timeout=150)  # blpop waits up to 90 s
    client = Celery("client", broker=url, backend=backend)
    try:
        with worker_fleet(
            "tests.celery.app",
            count=count,
            concurrency=1,
            queues=[f"{prefix}limited"],
            logs=logs,
            env=worker_env,
            cwd=Path(__file__).resolve().parent.parent,
        ) as procs:
            yield Fleet(client, records, prefix, logs, limiter, procs)
    finally:
        records.delete(*(records.keys(f"{prefix}*") or [f"{prefix}none"]))
        limiter.delete_table()


def test_killed_worker_runs_again_and_charges_one_lease_more(
    redis: LocalServer, moto: LocalServer, tmp_path: Path
) -> None:
    gate = f"kill-{uuid.uuid4().hex[:6]}"
    with fleet(redis, moto, tmp_path) as f:
        result = f.send("gated", gate, True)
        killed = f.next_run(gate)  # the body runs and holds
        os.kill(killed["pid"], signal.SIGKILL)  # its pool process dies mid-task
        again = f.next_run(gate)  # acks_late + reject_on_worker_lost: delivered again
        f.records.rpush(f"{gate}:go", "1")
        info = result.get(timeout=90)
        assert result.state == "SUCCESS"
        assert again["pid"] != killed["pid"]
        assert info["retries"] == 0
        # The killed attempt's lease was never settled (its process is gone): it stays
        # consumed, once; the second run paid its own. Exactly two, no refund.
        assert f.left("faults") == 1000 - 2
        assert f.records.llen(f"{gate}:runs") == 0  # no third run
        assert "WorkerLostError" in log_text(f.logs) or "exited prematurely" in log_text(f.logs)


def test_a_redelivered_deferred_message_does_not_start_twice(
    redis: LocalServer, moto: LocalServer, tmp_path: Path
) -> None:
    gate = f"dup-{uuid.uuid4().hex[:6]}"
    with fleet(redis, moto, tmp_path) as f:
        # A deferred message as _defer() publishes it: its reservation is paid.
        lease = f.limiter.reserve("default", "faults", {"total": 1}, [TOTAL], horizon=60)
        task_id = str(uuid.uuid4())
        lease.claim_for(task_id)
        headers = {"zae_deferrals": 1, "zae_lease": lease.ticket()}
        assert f.left("faults") == 1000 - 1
        # The same message twice: same id, same headers (a visibility timeout, a
        # duplicate publish, a requeue after a lost worker).
        results = [f.send("gated", gate, False, task_id=task_id, headers=headers) for _ in "ab"]
        runs = [f.next_run(gate), f.next_run(gate)]
        for r in results:
            r.get(timeout=90)
        claims = sorted((run["claim"] or "") for run in runs)
        assert claims == ["", lease.ticket()["claim"]], claims  # one started on it, one fresh
        assert all(run["deferrals"] == 1 for run in runs)
        # The reservation was consumed once; the second delivery paid for itself.
        assert f.left("faults") == 1000 - 2
        assert "was delivered again after its reservation was started" in log_text(f.logs)
        items = whole_table(f.limiter)
        assert len([i for i in items if i["SK"]["S"].startswith("C#")]) == 1


def test_a_refused_republish_requeues_the_task(
    redis: LocalServer, moto: LocalServer, tmp_path: Path
) -> None:
    gate = f"pub-{uuid.uuid4().hex[:6]}"
    # zae_start_wait 0: a refused task is always republished, never waited for in place.
    # The pool path (zae_admission=False): admission would hold the second task instead.
    env = {"ZAE_TEST_START_WAIT": "0", "ZAE_TEST_ADMISSION": "0"}
    with fleet(redis, moto, tmp_path, scheme="zaeflaky", env=env) as f:
        f.records.set(f"{f.prefix}fail-publish", "1")
        results = [f.send("paced", gate) for _ in range(2)]  # 1/s: the second is deferred
        for _ in range(3):  # the broker refused the deferred republish three times
            assert f.records.blpop([f"{f.prefix}publish-failures"], timeout=90) is not None
        f.records.delete(f"{f.prefix}fail-publish")  # the broker recovers
        infos = [r.get(timeout=90) for r in results]
        assert [r.state for r in results] == ["SUCCESS", "SUCCESS"]
        assert sorted(i["deferrals"] for i in infos) == [0, 1]
        logs = log_text(f.logs)
        assert "could not republish task" in logs and "its message is requeued" in logs
        # Every reservation made by a run whose republish failed was refunded: two
        # tasks, two tokens.
        assert f.left("paced-faults") == 1000 - 2


SECRET_PROMPT = "SECRET-PROMPT-123"
SECRET_KEY_ID = "AKIASECRETKEYID12345"
SECRET_ACCESS_KEY = "secret-access-key-SECRET-456"


@pytest.mark.parametrize("admission", ["1", "0"], ids=["admission", "pool-gate"])
def test_no_secret_reaches_logs_or_results(
    redis: LocalServer, moto: LocalServer, tmp_path: Path, admission: str
) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": SECRET_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "ZAE_TEST_START_WAIT": "0",  # deferrals: their log lines are checked too
        "ZAE_TEST_ADMISSION": admission,
        "ZAE_TEST_DEBUG": "1",  # and every decision's DEBUG line
    }
    with fleet(redis, moto, tmp_path, env=env) as f:
        modes = ["ok", "ok", "ok", "consume", "entity", "report"]
        sent = [(mode, f.send_kwargs("secret", prompt=SECRET_PROMPT, mode=mode)) for mode in modes]
        texts = []
        for mode, result in sent:
            if mode == "ok":
                texts.append(json.dumps(result.get(timeout=90)))
            else:
                with pytest.raises(Exception) as failed:
                    result.get(timeout=90)
                texts += [repr(failed.value), str(failed.value), str(result.traceback)]
                assert result.state == "FAILURE"
        logs = log_text(f.logs)
    # The path that holds a paced task ran: the consumer's, or the pool's deferral.
    assert ("zae-celery admitted task" if admission == "1" else "zae-celery deferred task") in logs
    decided = "decision=admitted" if admission == "1" else "decision=deferred"
    assert decided in logs and "zae-celery decision=settled" in logs
    assert "rate_consume: the callable raised KeyError" in "\n".join(texts)
    assert "rate_entity: is not a valid id" in "\n".join(texts)
    assert "report_usage.total" in "\n".join(texts)
    for text in [logs, *texts]:
        for secret in (SECRET_PROMPT, SECRET_KEY_ID, SECRET_ACCESS_KEY):
            assert secret not in text


def test_open_mode_starts_a_carried_reservation_unchecked_in_an_outage(
    redis: LocalServer, moto: LocalServer, tmp_path: Path
) -> None:
    """A task deferred to its slot before the outage: with on_unavailable="open" its
    quota is already paid, so it starts unchecked instead of being deferred again."""
    gate = f"open-{uuid.uuid4().hex[:6]}"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every request is refused
    env = {"ZAE_TEST_ENDPOINT": dead, "ZAE_TEST_ON_UNAVAILABLE": "open"}
    with fleet(redis, moto, tmp_path, env=env) as f:
        lease = f.limiter.reserve("default", "faults", {"total": 1}, [TOTAL], horizon=60)
        task_id = str(uuid.uuid4())
        lease.claim_for(task_id)
        headers = {"zae_deferrals": 1, "zae_lease": lease.ticket()}
        result = f.send("gated", gate, False, task_id=task_id, headers=headers)
        run = f.next_run(gate)
        result.get(timeout=90)
        assert result.state == "SUCCESS"
        assert run["deferrals"] == 1  # started on its reservation, not deferred again
        assert run["claim"] == lease.ticket()["claim"]
        assert "starts its reserved slot unchecked" in log_text(f.logs)
        assert f.left("faults") == 1000 - 1  # the reservation, charged before the outage


def test_a_late_task_reserves_its_start_slot_and_is_never_pushed_back_again(
    redis: LocalServer, moto: LocalServer, tmp_path: Path
) -> None:
    """Tasks waiting in place hold the start track's next slots, seconds ahead; a deferred
    task arriving at its slot must not be republished again and again behind them: it
    reserves the next start slot and is republished once more, to that slot."""
    gate = f"late-{uuid.uuid4().hex[:6]}"
    limits = [Limit.per_second("rps", 1), TOTAL]  # the `paced` task's limits
    with fleet(redis, moto, tmp_path) as f:
        lease = f.limiter.reserve("default", "paced-faults", {"rps": 1, "total": 1}, limits)
        ahead = [
            f.limiter.acquire(
                "default", "paced-faults", {"rps": 1, "total": 1}, limits,
                horizon=60, slot=Slot(pace=True, start_within=60),
            )
            for _ in range(3)
        ]  # fmt: skip
        last = max(round((a.started_at or 0) * 1000) for a in ahead)
        task_id = str(uuid.uuid4())
        lease.claim_for(task_id)
        headers = {"zae_deferrals": 1, "zae_lease": lease.ticket()}
        result = f.send("paced", gate, task_id=task_id, headers=headers)
        run = f.next_run(gate)
        result.get(timeout=90)
        assert result.state == "SUCCESS"
        assert run["deferrals"] == 2  # once to its slot (the header), once to its start
        assert run["started_ms"] >= last + 1000  # after the starts already counted
        assert run["claim"] != lease.ticket()["claim"]  # the second delivery claimed anew
        logs = log_text(f.logs)
        assert logs.count("start slot reserved (deferral") == 1
