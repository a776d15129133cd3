"""Usage accounting: the stream fold (pure, crafted records), and the aggregator on the
real streams of moto server and DynamoDB Local, fed by the engine's own writes."""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import oprecorder
from tests.conftest import Endpoint
from zae_celery import runlog as runlog_module
from zae_celery.accounting import Aggregator, StreamReader, read_usage, stream_arn
from zae_celery.accounting import handler as lambda_handler
from zae_celery.accounting import runs as runs_module
from zae_celery.accounting.charts import trailing_sums, window_for
from zae_celery.accounting.runs import (
    LimitTotals,
    TaskFact,
    list_runs,
    marker_key,
    read_run,
    summarize,
)
from zae_celery.accounting.snapshots import snapshot_key
from zae_celery.accounting.stream import SnapshotKey, check_windows, fold, window_start
from zae_celery.cli import main
from zae_celery.cli.stack import LOG_RETENTION_DAYS
from zae_celery.core import Limit, RateLimiter
from zae_celery.infra.lambda_package import HANDLER, build_aggregator_zip, code_sha256
from zae_celery.runlog import RunLog, run_of

TPM = "tpm@90000/60000"
RPM = "rpm@500/60000"
LIMITS = [Limit.per_minute("rpm", 500), Limit.per_minute("tpm", 90_000)]


def record(
    at: int,
    seq: int,
    new: Mapping[str, int],
    old: Mapping[str, int] | None = None,
    pk: str = "E#t1",
    sk: str = "B#gpt",
    event: str = "MODIFY",
) -> dict[str, Any]:
    """A stream record in Lambda's form (numbers as DynamoDB JSON)."""
    data: dict[str, Any] = {
        "ApproximateCreationDateTime": at,
        "SequenceNumber": str(seq),
        "Keys": {"PK": {"S": pk}, "SK": {"S": sk}},
        "NewImage": {k: {"N": str(v)} for k, v in new.items()},
    }
    if old is not None:
        data["OldImage"] = {k: {"N": str(v)} for k, v in old.items()}
    return {"eventName": event, "dynamodb": data}


# -- the fold: pure ------------------------------------------------------------------------
HOUR = 1_764_885_600  # 2025-12-04T22:00:00Z, an hour's (and a minute's) start
"""A fixed instant (no wall clock). Snapshots of its windows written to a real endpoint
must be kept long enough that their TTL has not passed: DynamoDB Local deletes expired
items, a few seconds after they expire."""


def test_a_write_charges_the_difference_of_its_counters() -> None:
    rec = record(
        HOUR + 5,
        7,
        {f"{TPM}~used": 150, f"{RPM}~used": 3, f"{TPM}~debt": 20, TPM: 999},
        {f"{TPM}~used": 100, f"{RPM}~used": 2, TPM: 500},
    )
    folded = fold([rec], ["hourly"])
    ((key, deltas),) = folded.items()
    assert key == SnapshotKey("t1", "gpt", "hourly", HOUR)
    assert deltas["0"].used == {"tpm": 50, "rpm": 1}
    assert deltas["0"].debt == {"tpm": 20}
    assert deltas["0"].sequence == "7".zfill(40)


def test_window_boundaries_are_utc_aligned_and_exclusive_at_the_end() -> None:
    last, first = HOUR + 3_599, HOUR + 3_600
    recs = [
        record(last, 1, {f"{TPM}~used": 10}, {}),
        record(first, 2, {f"{TPM}~used": 25}, {f"{TPM}~used": 10}),
    ]
    folded = fold(recs, ["minutely", "hourly", "daily"])
    starts = {(k.window, k.start): d["0"].used["tpm"] for k, d in folded.items()}
    assert starts == {
        ("minutely", last - 59): 10,
        ("minutely", first): 15,
        ("hourly", HOUR): 10,
        ("hourly", first): 15,
        ("daily", window_start("daily", HOUR)): 25,
    }
    day = window_start("daily", HOUR)
    assert datetime.fromtimestamp(day, timezone.utc).strftime("%H:%M:%S") == "00:00:00"


def test_what_is_not_consumption_is_left_out() -> None:
    used = {f"{TPM}~used": 5}
    recs = [
        record(HOUR, 1, {}, used, event="REMOVE"),  # an idle bucket's TTL
        record(HOUR, 2, used, {}, sk="#LIMITS#gpt"),  # stored limits
        record(HOUR, 3, used, {}, pk="U#t1", sk="hourly#gpt#x"),  # a snapshot itself
        record(HOUR, 4, {TPM: 10}, {TPM: 5}),  # a write that counted nothing
        record(HOUR, 5, used, {}, event="INSERT"),  # a new bucket: counted from 0
    ]
    folded = fold(recs, ["hourly"])
    ((_, deltas),) = folded.items()
    assert deltas["0"].used == {"tpm": 5} and deltas["0"].records == 1


def test_shards_add_up_to_their_resource_and_a_block_counts_once() -> None:
    recs = [
        record(HOUR, 1, {f"{TPM}~used": 4, f"{TPM}~blocks": 1}, {}, "E#t1#gpt#0", "B#gpt#0"),
        record(HOUR, 2, {f"{TPM}~used": 6, f"{TPM}~blocks": 1}, {}, "E#t1#gpt#1", "B#gpt#1"),
    ]
    ((key, deltas),) = fold(recs, ["hourly"]).items()
    assert key.resource == "gpt"
    assert {s: d.used["tpm"] for s, d in deltas.items()} == {"0": 4, "1": 6}
    assert sum(d.blocks for d in deltas.values()) == 1


def test_a_limit_whose_rate_changed_adds_both_attributes_under_its_name() -> None:
    other = "tpm@120000/60000"
    rec = record(HOUR, 1, {f"{TPM}~used": 10, f"{other}~used": 7}, {f"{TPM}~used": 10})
    ((_, deltas),) = fold([rec], ["hourly"]).items()
    assert deltas["0"].used == {"tpm": 7}


def test_a_stream_without_both_images_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="NEW_AND_OLD_IMAGES"):
        fold([record(HOUR, 1, {f"{TPM}~used": 1})], ["hourly"])  # MODIFY without OldImage
    keys = {"PK": {"S": "E#a"}, "SK": {"S": "B#b"}}
    keys_only = {"eventName": "MODIFY", "dynamodb": {"Keys": keys}}
    with pytest.raises(ValueError, match="NEW_AND_OLD_IMAGES"):
        fold([keys_only], ["hourly"])


def test_unknown_windows_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'weekly'"):
        check_windows(["hourly", "weekly"])
    with pytest.raises(ValueError, match="none given"):
        check_windows([" "])
    assert check_windows(["daily", "hourly", "daily"]) == ("daily", "hourly")


# -- the aggregator on a real endpoint ---------------------------------------------------
def client_for(endpoint: Endpoint) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint.url, region_name="us-east-1")


@pytest.fixture
def streamed(endpoint: Endpoint) -> Iterator[Endpoint]:
    """A table with its stream on (``create-table --stream``), deleted afterwards."""
    result = cli(endpoint, "create-table", "--stream")
    assert result.exit_code == 0, result.output
    assert "stream NEW_AND_OLD_IMAGES" in result.output
    yield endpoint
    client_for(endpoint).delete_table(TableName=endpoint.table_name)


def limiter_on(endpoint: Endpoint) -> RateLimiter:
    return RateLimiter(endpoint.table_name, endpoint_url=endpoint.url, region="us-east-1")


def reader_for(endpoint: Endpoint, aggregator: Aggregator) -> StreamReader:
    client = client_for(endpoint)
    streams = boto3.client("dynamodbstreams", endpoint_url=endpoint.url, region_name="us-east-1")
    return StreamReader(streams, stream_arn(client, endpoint.table_name), aggregator)


def raw_records(endpoint: Endpoint) -> list[dict[str, Any]]:
    """Every record of the table's stream, in order (parents first; one shard here)."""
    reader = reader_for(endpoint, Aggregator(client_for(endpoint), endpoint.table_name))
    return [record for page in reader.pages() for record in page]


def charge(limiter: RateLimiter, entity: str) -> int:
    """Two grants of 100 tpm, one reconciled up (+30: debt), one down (-40: a refund),
    and a provider block: 190 tokens charged, 30 of them debt, 2 requests, 1 block."""
    with limiter.acquire(entity, "gpt", {"rpm": 1, "tpm": 100}, LIMITS) as lease:
        lease.adjust(tpm=30)
    with limiter.acquire(entity, "gpt", {"rpm": 1, "tpm": 100}, LIMITS) as lease:
        lease.adjust(tpm=-40)
    limiter.block(entity, "gpt", LIMITS, 1.0)
    return 190


def test_snapshots_hold_what_the_engine_charged_and_reading_again_adds_nothing(
    streamed: Endpoint,
) -> None:
    limiter = limiter_on(streamed)
    entity = f"tenant-{uuid.uuid4().hex[:6]}"
    expected = charge(limiter, entity)
    client = client_for(streamed)
    first = reader_for(streamed, Aggregator(client, streamed.table_name)).catch_up()
    assert first.written > 0 and first.skipped == 0
    for window in ("hourly", "daily"):
        (snap,) = read_usage(client, streamed.table_name, entity, "gpt", window)
        assert snap.limits["tpm"].used == expected
        assert snap.limits["tpm"].debt == 30
        assert snap.limits["rpm"].used == 2 and snap.limits["rpm"].debt == 0
        assert snap.blocks == 1
    (status,) = [b for b in limiter.buckets(entity, "gpt", LIMITS) if b.limit_name == "tpm"]
    assert status.charged == expected  # the bucket's own counter agrees

    again = reader_for(streamed, Aggregator(client, streamed.table_name)).catch_up()
    assert again.records == first.records and again.written == 0
    assert again.skipped == first.written
    (snap,) = read_usage(client, streamed.table_name, entity, "gpt", "hourly")
    assert snap.limits["tpm"].used == expected


def test_a_redelivered_or_bisected_lambda_batch_adds_nothing_twice(
    streamed: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    entity = f"tenant-{uuid.uuid4().hex[:6]}"
    expected = charge(limiter_on(streamed), entity)
    records = raw_records(streamed)
    assert len(records) >= 4
    monkeypatch.setenv("ZAE_TABLE_NAME", streamed.table_name)
    monkeypatch.setenv("ZAE_SNAPSHOT_WINDOWS", "hourly")
    monkeypatch.setenv("ZAE_RETENTION_DAYS", "7")
    monkeypatch.setattr(lambda_handler, "_aggregator", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", streamed.url)  # as boto3 reads it
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Lambda's event is JSON: the creation time is a number there, not a datetime.
    records = json.loads(json.dumps(records, default=lambda moment: moment.timestamp()))
    event = {"Records": records}
    first = lambda_handler.handler(event)
    assert first["written"] >= 1 and first["skipped"] == 0
    assert lambda_handler.handler(event) == {**first, "written": 0, "skipped": first["written"]}
    half = len(records) // 2  # bisection: the halves, then the whole again
    lambda_handler.handler({"Records": records[:half]})
    lambda_handler.handler({"Records": records[half:]})
    client = client_for(streamed)
    (snap,) = read_usage(client, streamed.table_name, entity, "gpt", "hourly")
    assert snap.limits["tpm"].used == expected and snap.blocks == 1
    item = client.get_item(TableName=streamed.table_name, Key=snapshot_key(_key(snap)))["Item"]
    assert int(item["ttl"]["N"]) == int(snap.end.timestamp()) + 7 * 86_400  # retention
    ttl = client.describe_time_to_live(TableName=streamed.table_name)["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "ttl"


def _key(snap: Any) -> SnapshotKey:
    return SnapshotKey(snap.entity, snap.resource, snap.window, int(snap.start.timestamp()))


class Crashing:
    """A real client that fails after ``budget`` snapshot writes (a Lambda that dies
    halfway through a batch); ``budget`` None: never."""

    def __init__(self, client: Any, budget: int | None) -> None:
        self.client, self.budget = client, budget
        self.exceptions = client.exceptions

    def update_item(self, **request: Any) -> Any:
        if self.budget is not None:
            if self.budget == 0:
                raise ConnectionError("the function timed out")
            self.budget -= 1
        return self.client.update_item(**request)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    charges=st.lists(
        st.tuples(st.integers(0, 2), st.integers(-50, 200), st.integers(0, 7_199)),
        min_size=1,
        max_size=12,
    ),
    cuts=st.lists(st.integers(1, 11), max_size=4),
    crashes=st.lists(st.integers(0, 3), max_size=3),
)
def test_any_redelivery_and_any_crash_leave_exact_totals(
    streamed: Endpoint,
    charges: list[tuple[int, int, int]],
    cuts: list[int],
    crashes: list[int],
) -> None:
    """Random charges on three items (a bucket spread over shards 0-2) over two hours,
    cut into batches; each batch may crash after a few writes and is then delivered
    again (as Lambda does) until it goes through: every hourly total is exact."""
    entity = f"p{uuid.uuid4().hex[:8]}"
    counters = [0, 0, 0]
    recs: list[dict[str, Any]] = []
    truth: dict[int, int] = {}
    for seq, (shard, tokens, offset) in enumerate(charges, start=1):
        old = {f"{TPM}~used": counters[shard]}
        counters[shard] += tokens
        at = HOUR + offset
        pk, sk = f"E#{entity}#gpt#{shard}", f"B#gpt#{shard}"
        recs.append(record(at, seq, {f"{TPM}~used": counters[shard]}, old, pk, sk))
        start = window_start("hourly", at)
        truth[start] = truth.get(start, 0) + tokens
    bounds = sorted({0, len(recs), *(c for c in cuts if c < len(recs))})
    client = client_for(streamed)
    pending = list(crashes)
    for lo, hi in itertools.pairwise(bounds):
        batch = recs[lo:hi]
        while True:
            budget = pending.pop(0) if pending else None
            try:
                # The windows are of 2025: kept 10 years, or DynamoDB Local's TTL
                # would remove them while the test reads.
                crashing = Crashing(client, budget)
                Aggregator(crashing, streamed.table_name, ["hourly"], 3650).apply(batch)
                break
            except ConnectionError:
                continue
    got = {
        int(s.start.timestamp()): s.limits["tpm"].used if "tpm" in s.limits else 0
        for s in read_usage(client, streamed.table_name, entity, "gpt", "hourly")
    }
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in truth.items() if v}


# -- the commands ----------------------------------------------------------------------------
def cli(endpoint: Endpoint, *args: str) -> Any:
    result = CliRunner().invoke(
        main, ["--endpoint-url", endpoint.url, "--table", endpoint.table_name, *args]
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    return result


def test_aggregate_and_usage_commands(streamed: Endpoint) -> None:
    entity = f"tenant-{uuid.uuid4().hex[:6]}"
    expected = charge(limiter_on(streamed), entity)
    result = cli(streamed, "aggregate", "--windows", "hourly,minutely", "--retention-days", "3")
    assert result.exit_code == 0, result.output
    assert "0 already applied" in result.output
    again = cli(streamed, "aggregate", "--windows", "hourly,minutely")
    assert " 0 snapshot writes" in again.output
    shown = cli(streamed, "usage", entity, "--json")
    assert shown.exit_code == 0, shown.output
    (row,) = json.loads(shown.output)
    assert row["limits"]["tpm"] == {"used": expected, "debt": 30} and row["blocks"] == 1
    table = cli(streamed, "usage", entity, "--resource", "gpt", "--window", "minutely")
    assert table.exit_code == 0 and f"{expected:,}" in table.output
    later = cli(streamed, "usage", entity, "--since", "2999-01-01")
    assert later.exit_code == 0 and "No hourly usage snapshots" in later.output


def test_usage_commands_say_what_is_wrong(endpoint: Endpoint) -> None:
    result = cli(endpoint, "usage", "t1", "--window", "weekly")
    assert result.exit_code == 2 and "weekly" in result.output
    result = cli(endpoint, "usage", "t1", "--since", "yesterday")
    assert result.exit_code == 2 and "ISO 8601" in result.output
    result = cli(endpoint, "aggregate", "--windows", "hourly,weekly")
    assert result.exit_code == 2 and "minutely, hourly, daily" in result.output
    made = cli(endpoint, "create-table")
    assert made.exit_code == 0, made.output
    try:
        result = cli(endpoint, "aggregate")
        assert result.exit_code == 1 and "--stream" in result.output
    finally:
        client_for(endpoint).delete_table(TableName=endpoint.table_name)


# -- deployment: the Lambda package and the stack's function ---------------------------------
ZIP_ONLY = r"""
import importlib.abc, json, sys
zip_path = sys.argv[1]
OUT = {"celery", "kombu", "redis", "click", "rich", "prometheus_client", "aiobotocore"}

class Outside(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OUT or name.startswith("zae_celery.core"):
            raise ImportError(f"the Lambda package imported {name}")
        return None

sys.meta_path.insert(0, Outside())
sys.path.insert(0, zip_path)
import boto3
import zae_celery
assert zae_celery.__file__.startswith(zip_path), zae_celery.__file__
from zae_celery.accounting.handler import handler
calls = []
boto3.setup_default_session()
def note(params, model, **_):
    calls.append([model.name, params.get("Key", {}).get("PK", {}).get("S")])
boto3.DEFAULT_SESSION.events.register("provide-client-params.dynamodb", note)
result = handler(json.load(sys.stdin))
print(json.dumps({"result": result, "calls": calls}))
"""


def test_lambda_export_writes_a_package_that_runs_with_boto3_alone(
    streamed: Endpoint, tmp_path: Path
) -> None:
    entity = f"tenant-{uuid.uuid4().hex[:6]}"
    expected = charge(limiter_on(streamed), entity)
    path = tmp_path / "aggregator.zip"
    result = CliRunner().invoke(main, ["lambda-export", "--output", str(path)])
    assert result.exit_code == 0, result.output
    assert HANDLER in result.output and code_sha256(path.read_bytes()) in result.output
    assert path.read_bytes() == build_aggregator_zip()  # the same bytes every time
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert "zae_celery/__init__.py" in names and "zae_celery/accounting/handler.py" in names
    assert all(n.startswith("zae_celery/accounting/") for n in names[1:]), names
    again = CliRunner().invoke(main, ["lambda-export", "--output", str(path)])
    assert again.exit_code == 1 and "--force" in again.output

    records = json.loads(json.dumps(raw_records(streamed), default=lambda m: m.timestamp()))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_DYNAMODB": streamed.url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "ZAE_TABLE_NAME": streamed.table_name,
    }
    run = subprocess.run(
        [sys.executable, "-I", "-c", ZIP_ONLY, str(path)],
        input=json.dumps({"Records": records}),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["result"]["written"] >= 2
    # What the function calls is what its role grants: UpdateItem, on U# items only.
    assert {op for op, _ in out["calls"]} == {"UpdateItem"}
    assert all(pk.startswith("U#") for _, pk in out["calls"])
    (snap,) = read_usage(client_for(streamed), streamed.table_name, entity, "gpt", "daily")
    assert snap.limits["tpm"].used == expected


def _role_statements(iam: Any, role_arn: str) -> dict[str, Any]:
    role = role_arn.rsplit("/", 1)[1]
    (name,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
    document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
    if isinstance(document, str):  # moto's CloudFormation stores the Python form
        document = ast.literal_eval(document)
    return {s["Sid"]: s for s in document["Statement"]}


@pytest.mark.integration
def test_deploy_with_the_aggregator_creates_and_uploads_it(moto: Any) -> None:
    table = f"zae-agg-{uuid.uuid4().hex[:8]}"
    base = ["--endpoint-url", moto.url, "--region", "us-east-1", "--table", table]
    refused = CliRunner().invoke(main, [*base, "deploy", "--aggregator", "--stream", "NEW_IMAGE"])
    assert refused.exit_code == 2 and "NEW_AND_OLD_IMAGES" in refused.output
    args = [
        *base,
        "deploy",
        "--aggregator",
        "--no-deletion-protection",
        "--snapshot-windows",
        "hourly,minutely",
        "--snapshot-retention-days",
        "7",
        "--log-retention-days",
        "14",
        "--poll",
        "0.1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "code uploaded" in result.output
    kwargs = {"endpoint_url": moto.url, "region_name": "us-east-1"}
    lam, iam = boto3.client("lambda", **kwargs), boto3.client("iam", **kwargs)
    ddb = boto3.client("dynamodb", **kwargs)
    name = f"{table}-aggregator"
    config = lam.get_function_configuration(FunctionName=name)
    assert config["Handler"] == HANDLER
    assert config["CodeSha256"] == code_sha256(build_aggregator_zip())
    variables = config["Environment"]["Variables"]  # moto keeps a Number parameter's int
    assert {k: str(v) for k, v in variables.items()} == {
        "ZAE_TABLE_NAME": table,
        "ZAE_SNAPSHOT_WINDOWS": "hourly,minutely",
        "ZAE_RETENTION_DAYS": "7",
    }
    described = ddb.describe_table(TableName=table)["Table"]
    assert described["StreamSpecification"]["StreamViewType"] == "NEW_AND_OLD_IMAGES"
    (mapping,) = lam.list_event_source_mappings(FunctionName=name)["EventSourceMappings"]
    assert mapping["EventSourceArn"] == described["LatestStreamArn"]
    assert mapping["StartingPosition"] == "TRIM_HORIZON"
    assert mapping["BisectBatchOnFunctionError"] is True
    statements = _role_statements(iam, config["Role"])
    assert statements["Snapshots"]["Action"] == ["dynamodb:UpdateItem"]
    leading = statements["Snapshots"]["Condition"]["ForAllValues:StringLike"]
    assert leading["dynamodb:LeadingKeys"] == ["U#*"]
    assert statements["Snapshots"]["Resource"] == described["TableArn"]
    assert statements["Stream"]["Resource"] == described["LatestStreamArn"]
    logs = boto3.client("logs", **kwargs).describe_log_groups(
        logGroupNamePrefix=f"/aws/lambda/{name}"
    )["logGroups"]
    assert [g["retentionInDays"] for g in logs] == [14]

    again = CliRunner().invoke(main, [*base, "deploy", "--poll", "0.1"])
    assert again.exit_code == 0, again.output
    assert "already current" in again.output
    deleted = CliRunner().invoke(main, [*base, "delete", "--yes", "--poll", "0.1"])
    assert deleted.exit_code == 0, deleted.output


def test_the_cli_offers_the_log_retentions_the_template_allows() -> None:
    allowed = oprecorder.template_document()["Parameters"]["AggregatorLogRetentionDays"]
    assert [str(d) for d in allowed["AllowedValues"]] == list(LOG_RETENTION_DAYS)
    rule = oprecorder.template_document()["Rules"]["AggregatorNeedsBothImages"]
    assert "NEW_AND_OLD_IMAGES" in json.dumps(rule)


# -- runs: the facts, their figures, the run log's writes ---------------------------------
def fact(task: str, outcome: str = "SUCCESS", started: float | None = 100.0, **kw: Any) -> TaskFact:
    values: dict[str, Any] = {
        "waited": 0.0,
        "deferrals": 0,
        "limited": False,
        "bucket": "t1/gpt",
        "estimated": {"tpm": 100},
        "charged": {"tpm": 40},
    }
    values.update(kw)
    return TaskFact(task_id=task, name="pipeline.call", outcome=outcome, started=started, **values)


def test_a_runs_figures_come_from_every_fact() -> None:
    facts = [
        fact("a", "RETRY", None, waited=2.0, limited=True, charged={}),  # a 429, deferred
        fact("a", "SUCCESS", 105.0, waited=1.0, deferrals=1),
        fact("b", "FAILURE", 101.0, waited=0.5),
        fact("c", "SUCCESS", 103.0, waited=3.0, charged={"tpm": 130}),
        *(fact(f"d{i}", started=102.0 + i / 100, waited=i / 100) for i in range(97)),
    ]
    report = summarize("run-1", reversed(facts))
    assert (report.tasks, report.started, report.succeeded, report.failed) == (100, 100, 99, 1)
    assert (report.deferrals, report.provider_429s) == (1, 1)
    assert report.limits["tpm"] == LimitTotals(100 * 101, 40 * 99 + 130)
    waits = sorted([1.0, 0.5, 3.0, *(i / 100 for i in range(97))])
    assert report.wait_p50 == waits[49] and report.wait_p99 == waits[98]
    assert report.wait_total == round(2.0 + sum(waits), 3)
    assert report.first_start == datetime.fromtimestamp(101.0, timezone.utc)
    assert report.last_start == datetime.fromtimestamp(105.0, timezone.utc)
    assert report.to_dict()["limits"] == {"tpm": {"estimated": 10_100, "charged": 4_090}}


def test_a_fact_round_trips_through_its_stored_form() -> None:
    original = fact("x", "RETRY", 1.5, waited=0.25, deferrals=2, limited=True, rates={"tpm": 1.5})
    assert TaskFact.decode(json.loads(json.dumps(original.encode()))) == original
    bare = TaskFact("y", "n", "SUCCESS", None, 0.0, 0, False, None)
    assert TaskFact.decode(bare.encode()) == bare


class Flaky:
    """A real client whose next ``failures`` writes fail (the table unreachable)."""

    def __init__(self, client: Any, failures: int) -> None:
        self.client, self.failures, self.calls = client, failures, 0
        self.exceptions = client.exceptions

    def update_item(self, **request: Any) -> Any:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("endpoint unreachable")
        return self.client.update_item(**request)


def test_the_run_log_writes_once_per_run_and_keeps_what_it_could_not_write(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    RateLimiter(endpoint.table_name, endpoint_url=endpoint.url, region="us-east-1").create_table()
    client = Flaky(client_for(endpoint), failures=1)
    at = 4_000_000_000.0  # the clock of the writes: their TTL must lie ahead (DynamoDB Local)
    runlog = RunLog(client, endpoint.table_name, interval=0, retention_days=3, clock=lambda: at)
    try:
        runlog.add("run-a", fact("a1", started=400.0))
        runlog.add("run-a", fact("a2", started=401.0))
        runlog.add("run-b", fact("b1", started=86_400.0 * 2))
        with pytest.raises(ConnectionError):
            runlog.flush()
        assert runlog.flush() == 3  # kept, then written: one item and one marker per run
        assert client.calls == 1 + 4
        runlog.add("run-a", fact("a3", "FAILURE", started=402.0))
        monkeypatch.setattr(runs_module, "MAX_FACTS_BYTES", 50)  # one fact an item
        runlog.add("run-a", fact("a4", started=403.0))
        assert runlog.flush() == 2 and client.calls == 5 + 2  # two items, no second marker
        raw = client_for(endpoint)
        report = read_run(raw, endpoint.table_name, "run-a")
        assert report is not None and (report.tasks, report.failed) == (4, 1)
        item = raw.get_item(TableName=endpoint.table_name, Key=marker_key("run-a", 400.0))["Item"]
        assert float(item["first"]["N"]) == 400.0 and int(item["ttl"]["N"]) == at + 3 * 86_400
        day0 = datetime.fromtimestamp(0, timezone.utc).date()
        listed = list_runs(raw, endpoint.table_name, day0, day0 + timedelta(days=2))
        assert [e.run for e in listed] == ["run-a", "run-b"]
        assert read_run(raw, endpoint.table_name, "nothing") is None
    finally:
        client_for(endpoint).delete_table(TableName=endpoint.table_name)


def test_a_run_log_past_its_bound_drops_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlog_module, "MAX_HELD", 3)
    runlog = RunLog(None, "t", interval=0, retention_days=1)
    for i in range(5):
        runlog.add("r", fact(f"t{i}"))
    assert [f.task_id for f in runlog._facts["r"]] == ["t2", "t3", "t4"]


def test_the_run_is_the_named_one_the_root_or_the_group() -> None:
    class Request:
        def __init__(self, **kw: Any) -> None:
            self.id, self.root_id, self.group, self.zae_run = "me", None, None, None
            self.children: list[Any] = []
            self.__dict__.update(kw)

    named = Request(zae_run=type("R", (), {"run_id": "batch"})(), root_id="root")
    at = 86_400.0 * 3 + 5  # 1970-01-04
    assert run_of(named, "t", at) == "batch"
    assert run_of(Request(root_id="root", group="g"), "t", at) == "root"  # a task's subtasks
    assert run_of(Request(root_id="me", group="g"), "t", at) == "g"  # a group sent from outside
    assert run_of(Request(root_id="me", children=["a child"]), "t", at) == "me"  # an entry
    # Tasks sent on their own: one run per task name and UTC day, not one write each.
    assert run_of(Request(root_id="me"), "app.call", at) == "standalone:app.call:1970-01-04"


def test_runs_commands(endpoint: Endpoint, tmp_path: Path) -> None:
    RateLimiter(endpoint.table_name, endpoint_url=endpoint.url, region="us-east-1").create_table()
    now = datetime.now(timezone.utc).timestamp()
    try:
        runlog = RunLog(client_for(endpoint), endpoint.table_name, 0, 1)
        for i in range(30):
            rates = {"tpm": 10.0, "rpm": 1.0}
            charged = {"tpm": 40, "rpm": 1}
            runlog.add("r1", fact(f"t{i}", started=now + i, rates=rates, charged=charged))
        runlog.flush()
        shown = cli(endpoint, "runs", "show", "r1", "--json")
        assert shown.exit_code == 0, shown.output
        data = json.loads(shown.output)
        assert data["tasks"] == 30 and data["limits"]["tpm"] == {"estimated": 3000, "charged": 1200}
        png = tmp_path / "run.png"
        table = cli(endpoint, "runs", "show", "r1", "--chart", str(png))
        assert table.exit_code == 0 and "1,200" in table.output and "-1,800" in table.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        listed = cli(endpoint, "runs", "list", "--json")
        assert [r["run"] for r in json.loads(listed.output)] == ["r1"]
        missing = cli(endpoint, "runs", "show", "r2")
        assert missing.exit_code == 1 and "zae_run_log" in missing.output
        empty = cli(endpoint, "runs", "list", "--since", "2001-01-01", "--until", "2001-01-02")
        assert "No runs seen" in empty.output
    finally:
        client_for(endpoint).delete_table(TableName=endpoint.table_name)


def test_trailing_sums_are_per_window() -> None:
    times = [0.0, 10.0, 59.0, 60.0, 61.0, 130.0]
    assert trailing_sums(times, [1, 2, 3, 4, 5, 6]) == [1, 3, 6, 9, 14, 6]


def test_a_short_run_is_charted_over_a_fifth_of_it() -> None:
    assert window_for(15.0) == 3.0 and window_for(2.0) == 1.0 and window_for(3600) == 60.0


def test_a_run_log_whose_table_is_gone_drops_its_facts(endpoint: Endpoint) -> None:
    runlog = RunLog(client_for(endpoint), endpoint.table_name, interval=0, retention_days=1)
    runlog.add("r", fact("t1"))
    assert runlog.flush() == 0 and runlog._held == 0  # not kept to be retried forever
