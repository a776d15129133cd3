"""The CloudFormation template: cfn-lint, the engine's key schema, least-privilege policies
derived from a recorded run of the engine, and a real deploy/delete on moto server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import boto3
import pytest

from tests import oprecorder
from tests.conftest import Endpoint
from tests.helpers import eventually
from zae_celery.core import AsyncRateLimiter, Limit, RateLimiter, RateLimitExceeded, Slot
from zae_celery.core.engine import Engine
from zae_celery.core.schema import TTL_ATTRIBUTE
from zae_celery.core.stores.dynamodb import Codec
from zae_celery.infra import template_text
from zae_celery.infra.stack import (
    DEFAULTS,
    PARAMETERS,
    StackError,
    StackManager,
    check_stack_name,
    default_stack_name,
)
from zae_celery.testing import LocalServer

ITEM_LEVEL = {
    "dynamodb:GetItem",
    "dynamodb:BatchGetItem",
    "dynamodb:Query",
    "dynamodb:Scan",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:ConditionCheckItem",
}
TABLE_ARN = {"Fn::GetAtt": ["LimitsTable", "Arn"]}
INDEX_ARN = {"Fn::Sub": "${LimitsTable.Arn}/index/*"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return oprecorder.template_document()


def test_template_passes_cfn_lint(tmp_path: Path) -> None:
    path = tmp_path / "table.yaml"
    path.write_text(template_text())
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    """The lint test can fail: a typo in a property is reported."""
    path = tmp_path / "broken.yaml"
    path.write_text(template_text().replace("BillingMode: PAY_PER_REQUEST", "BilingMode: X"))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "BilingMode" in result.stdout


def test_parameters_are_the_ones_the_cli_knows(template: dict[str, Any]) -> None:
    assert tuple(template["Parameters"]) == PARAMETERS
    defaults = {k: str(p.get("Default")) for k, p in template["Parameters"].items()}
    assert defaults == DEFAULTS


def test_table_has_the_engines_key_schema_and_ttl(template: dict[str, Any]) -> None:
    # The engine's own create_table request is the reference: its first operation, as the
    # DynamoDB store sends it.
    flow = Engine().create_table()
    op, kwargs = Codec("reference-table").encode(next(flow))
    flow.close()
    assert op == "create_table"
    table = template["Resources"]["LimitsTable"]["Properties"]
    assert table["KeySchema"] == kwargs["KeySchema"]
    assert table["AttributeDefinitions"] == kwargs["AttributeDefinitions"]
    assert table["BillingMode"] == kwargs["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
    # One index, the engine's own (entity children): the same as create-table's.
    assert table["GlobalSecondaryIndexes"] == kwargs["GlobalSecondaryIndexes"]
    conditions = {
        "PointInTimeRecoverySpecification": "PitrEnabled",
        "DeletionProtectionEnabled": "ProtectionEnabled",
        "StreamSpecification": "StreamEnabled",
    }
    for prop, condition in conditions.items():
        value = table[prop]
        if prop == "PointInTimeRecoverySpecification":
            value = value["PointInTimeRecoveryEnabled"]
        assert value["Fn::If"][0] == condition, prop


def _statements(template: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    document = template["Resources"][policy]["Properties"]["PolicyDocument"]
    return list(document["Statement"])


@pytest.mark.parametrize("policy", ["WorkerPolicy", "AdminPolicy"])
def test_policies_reach_only_this_table_and_its_indexes(
    template: dict[str, Any], policy: str
) -> None:
    for statement in _statements(template, policy):
        assert statement["Effect"] == "Allow"
        resources = statement["Resource"]
        resources = resources if isinstance(resources, list) else [resources]
        assert resources, statement
        for resource in resources:
            assert resource in (TABLE_ARN, INDEX_ARN), (policy, resource)
        actions = statement["Action"]
        for action in actions if isinstance(actions, list) else [actions]:
            assert action.startswith("dynamodb:") and "*" not in action, action


def test_workers_get_item_level_actions_and_put_only_the_schema_stamp(
    template: dict[str, Any],
) -> None:
    assert oprecorder.policy_actions("WorkerPolicy") <= ITEM_LEVEL
    for statement in _statements(template, "WorkerPolicy"):
        if "dynamodb:PutItem" in statement["Action"]:
            assert statement["Action"] == ["dynamodb:PutItem"]
            assert statement["Condition"] == {
                "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["#META"]}
            }


def test_exports(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    for key in ("TableName", "TableArn", "WorkerPolicyArn", "AdminPolicyArn"):
        assert outputs[key]["Export"]["Name"] == {"Fn::Sub": f"${{AWS::StackName}}-{key}"}


def test_alarms_are_optional_and_notify_the_optional_topic(template: dict[str, Any]) -> None:
    alarms = {
        name: r
        for name, r in template["Resources"].items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert set(alarms) == {
        "ThrottledRequestsAlarm",
        "SystemErrorsAlarm",
        "UserErrorsAlarm",
        "AggregatorFailuresAlarm",
    }
    metrics = set()
    for name, alarm in alarms.items():
        aggregator = name.startswith("Aggregator")
        assert alarm["Condition"] == ("AggregatorAlarmsEnabled" if aggregator else "AlarmsEnabled")
        props = alarm["Properties"]
        for key in ("AlarmActions", "OKActions"):
            assert props[key] == {
                "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]
            }
        if "Metrics" in props:
            names = {
                m["MetricStat"]["Metric"]["MetricName"]
                for m in props["Metrics"]
                if "MetricStat" in m
            }
            assert len(names) == 1
            metrics |= names
        else:
            metrics.add(props["MetricName"])
    assert metrics == {"ThrottledRequests", "SystemErrors", "UserErrors", "Errors"}
    both = template["Conditions"]["AggregatorAlarmsEnabled"]["Fn::And"]
    assert both == [{"Condition": "AggregatorEnabled"}, {"Condition": "AlarmsEnabled"}]


# -- the worker policy grants exactly what the engine uses ---------------------------------------
class Clock:
    """A settable clock (seconds)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _stack_like_table(endpoint: Endpoint) -> Any:
    """Create the table as the stack does (keys from the template, no schema stamp)."""
    client = boto3.client("dynamodb", endpoint_url=endpoint.url)
    props = oprecorder.template_document()["Resources"]["LimitsTable"]["Properties"]
    client.create_table(
        TableName=endpoint.table_name,
        KeySchema=props["KeySchema"],
        AttributeDefinitions=props["AttributeDefinitions"],
        GlobalSecondaryIndexes=props["GlobalSecondaryIndexes"],
        BillingMode=props["BillingMode"],
    )
    client.get_waiter("table_exists").wait(
        TableName=endpoint.table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    # Its index too: a table deleted while DynamoDB Local still builds an index can
    # leave that server's index builder stuck for the rest of the session.
    assert eventually(lambda: _indexes_active(client, endpoint.table_name), True, 60)
    return client


def _indexes_active(client: Any, table: str) -> bool:
    indexes = client.describe_table(TableName=table)["Table"].get("GlobalSecondaryIndexes")
    return all(g.get("IndexStatus") == "ACTIVE" for g in indexes or [])


class Boom(Exception):
    pass


def _worker_script(endpoint: Endpoint) -> None:
    """What a worker does: every public request of the engine, sync and async."""
    clock = Clock()
    limiter = RateLimiter(endpoint.table_name, endpoint_url=endpoint.url, clock=clock)
    limits = [Limit.per_second("rps", 2), Limit.per_minute("tpm", 6000)]
    # The first request on a table made by the stack stamps its schema version.
    with limiter.acquire("tenant", "model", {"rps": 1, "tpm": 100}, limits) as lease:
        lease.adjust(tpm=250)
    with pytest.raises(Boom), limiter.acquire("tenant", "model", {"rps": 1}, limits):
        raise Boom  # rollback
    limiter.reserve("tenant", "model", {"rps": 2}, limits, horizon=5).commit()
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("tenant", "model", {"rps": 2}, limits)  # refused
    assert limiter.available("tenant", "model", limits)["tpm"] < 6000
    # Cascade: the child's acquire also consumes the parent, in one transaction.
    limiter.set_limits("parent", [Limit.per_second("rps", 3)])
    limiter.create_entity("child", parent_id="parent", cascade=True)
    clock.now += 60
    with limiter.acquire("child", "model", {"rps": 1}, limits) as lease:
        lease.adjust(tpm=10)
    reserved = limiter.reserve("child", "model", {"rps": 2}, limits, horizon=5)
    reserved.rollback()
    with pytest.raises(RateLimitExceeded):
        limiter.acquire("child", "model", {"rps": 3}, [Limit.per_second("rps", 3)])
    # A queue's limits in the same write, a paced grant, a reservation started at its
    # slot, and a provider's 429.
    clock.now += 60
    queue = [("queue-a", "model", [Limit.per_second("qps", 5)])]
    limiter.acquire(
        "tenant", "model", {"rps": 1}, limits, slot=Slot(extra=queue, pace=True)
    ).commit()
    clock.now += 60
    reserved = limiter.reserve("tenant", "model", {"rps": 1}, limits, horizon=5)
    clock.now += reserved.wait
    limiter.start(reserved)
    limiter.block("tenant", "model", limits, 2.0)

    async def async_worker() -> None:
        async with AsyncRateLimiter(
            endpoint.table_name, endpoint_url=endpoint.url, clock=clock
        ) as alimiter:
            clock.now += 60
            async with alimiter.acquire("tenant", "model", {"rps": 1}, limits) as alease:
                await alease.adjust(tpm=5)
            await alimiter.available("tenant", "model", limits)

    asyncio.run(async_worker())


@pytest.mark.integration
def test_worker_policy_grants_exactly_what_the_engine_uses(endpoint: Endpoint) -> None:
    client = _stack_like_table(endpoint)
    try:
        with oprecorder.recording() as recorded:
            _worker_script(endpoint)
    finally:
        client.delete_table(TableName=endpoint.table_name)
    # The script reached every kind of request it means to (so the comparison means
    # something): the schema stamp, a cascade transaction, reads.
    assert "PutItem" in recorded.operations["acquire"]
    assert "TransactWriteItems" in recorded.operations["acquire"]
    assert {"start", "block"} <= recorded.flows()
    assert {"UpdateItem", "Query", "GetItem"} <= set().union(*recorded.operations.values())
    assert recorded.clients == {"boto3", "aiobotocore"}  # both limiters were recorded
    # Every flow is classified as worker, administration or table management.
    known = oprecorder.WORKER_FLOWS | oprecorder.ADMIN_FLOWS | oprecorder.TABLE_FLOWS
    assert recorded.flows() - {oprecorder.OUTSIDE} <= known
    assert oprecorder.SESSION.flows() - {oprecorder.OUTSIDE} <= known
    used = recorded.worker_actions()
    if oprecorder.plugin_active():
        used |= oprecorder.SESSION.worker_actions()  # everything the suite did so far
    assert oprecorder.policy_actions("WorkerPolicy") == used
    admin_used = set().union(*(recorded.actions[f] for f in oprecorder.ADMIN_FLOWS))
    assert admin_used <= oprecorder.policy_actions("AdminPolicy")


def test_transaction_actions_map_to_their_items() -> None:
    params: dict[str, Any] = {
        "TransactItems": [{"Update": {}}, {"ConditionCheck": {}}, {"Put": {}}]
    }
    assert oprecorder.iam_actions("TransactWriteItems", params) == {
        "dynamodb:UpdateItem",
        "dynamodb:ConditionCheckItem",
        "dynamodb:PutItem",
    }
    assert oprecorder.iam_actions("UpdateItem", {}) == {"dynamodb:UpdateItem"}


def test_the_session_check_fails_the_run_when_the_worker_policy_lacks_an_action(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = oprecorder._Store()
    store.add("acquire", "UpdateItem", {"dynamodb:UpdateItem"}, "boto3")
    store.add("release", "DeleteItem", {"dynamodb:DeleteItem"}, "boto3")
    store.add("set_limits", "PutItem", {"dynamodb:BatchWriteItem"}, "boto3")  # admin: ignored
    monkeypatch.setattr(oprecorder, "SESSION", store)
    monkeypatch.setitem(oprecorder._state, "plugin", True)
    session = SimpleNamespace(config=SimpleNamespace(stash=pytest.Stash()), exitstatus=0)
    oprecorder.pytest_sessionfinish(cast(pytest.Session, session), 0)
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED
    assert session.config.stash[oprecorder._MISSING] == {"dynamodb:DeleteItem"}


# -- deploy and delete on moto server's CloudFormation --------------------------------------------
@pytest.fixture
def moto_clients(clean_moto: LocalServer) -> Iterator[tuple[Any, Any, Any]]:
    kwargs = {"endpoint_url": clean_moto.url, "region_name": "us-east-1"}
    yield (
        boto3.client("cloudformation", **kwargs),
        boto3.client("dynamodb", **kwargs),
        boto3.client("iam", **kwargs),
    )


@pytest.mark.integration
def test_stack_deploys_and_deletes_on_moto(moto_clients: tuple[Any, Any, Any]) -> None:
    cloudformation, dynamodb, iam = moto_clients
    table = f"zae-infra-{uuid.uuid4().hex[:8]}"
    name = default_stack_name(table)
    events: list[str] = []
    manager = StackManager(cloudformation, dynamodb, on_event=lambda e: events.append(e.status))
    action, info = manager.deploy(
        name,
        {"TableName": table, "DeletionProtection": "false", "StreamViewType": "NEW_IMAGE"},
        {"team": "ml"},
    )
    assert (action, info.status) == ("created", "CREATE_COMPLETE")
    assert "CREATE_COMPLETE" in events
    assert info.tags == {"team": "ml"}
    # The table has the engine's keys; the stream is on; the outputs are exported.
    described = dynamodb.describe_table(TableName=table)["Table"]
    assert {k["AttributeName"]: k["KeyType"] for k in described["KeySchema"]} == {
        "PK": "HASH",
        "SK": "RANGE",
    }
    assert described["StreamSpecification"]["StreamViewType"] == "NEW_IMAGE"
    assert info.outputs["TableName"] == table
    assert info.outputs["StreamArn"] == described["LatestStreamArn"]
    exports = {e["Name"]: e["Value"] for e in cloudformation.list_exports()["Exports"]}
    assert exports[f"{name}-TableArn"] == described["TableArn"]
    # The deployed worker policy names this table and grants what the template says.
    policy_arn = exports[f"{name}-WorkerPolicyArn"]
    version = iam.get_policy(PolicyArn=policy_arn)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=policy_arn, VersionId=version)["PolicyVersion"][
        "Document"
    ]
    document = json.loads(document) if isinstance(document, str) else document
    granted = set()
    for statement in document["Statement"]:
        granted.update(statement["Action"])
        resources = statement["Resource"]
        for resource in resources if isinstance(resources, list) else [resources]:
            assert resource in (described["TableArn"], f"{described['TableArn']}/index/*")
    assert granted == oprecorder.policy_actions("WorkerPolicy")
    # Deploying the same thing again changes nothing.
    action, _ = manager.deploy(name, {"TableName": table})
    assert action == "unchanged"

    manager.delete(name)
    assert manager.describe(name) is None
    assert manager.table(table) is None
    assert cloudformation.list_exports()["Exports"] == []


# -- waiting ---------------------------------------------------------------------------------------
class _StuckCloudFormation:
    """A CloudFormation client whose stack never leaves CREATE_IN_PROGRESS."""

    def __init__(self) -> None:
        self.polls = 0

    def describe_stack_events(self, StackName: str) -> dict[str, Any]:
        self.polls += 1
        event = {
            "EventId": "e1",
            "StackName": "stuck",
            "LogicalResourceId": "stuck",
            "PhysicalResourceId": StackName,
            "ResourceType": "AWS::CloudFormation::Stack",
            "ResourceStatus": "CREATE_IN_PROGRESS",
        }
        return {"StackEvents": [event]}


def test_waiting_gives_up_after_the_timeout_without_sleeping_for_real() -> None:
    now = [0.0]
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    cloudformation = _StuckCloudFormation()
    manager = StackManager(
        cloudformation, None, poll_interval=5, timeout=20, sleep=sleep, clock=lambda: now[0]
    )
    with pytest.raises(StackError, match="'stuck' is still CREATE_IN_PROGRESS after 20 s"):
        manager.wait("id-1", set())
    assert naps == [5, 5, 5, 5]
    assert cloudformation.polls == 5


@pytest.mark.parametrize(
    ("table", "stack"),
    [
        ("zae-celery-limits", "zae-celery-limits"),
        ("rate_limits.prod", "rate-limits-prod"),
        ("_limits", "zae--limits"),
        ("123", "zae-123"),
    ],
)
def test_default_stack_name_is_a_valid_stack_name(table: str, stack: str) -> None:
    assert default_stack_name(table) == stack
    assert check_stack_name(stack) == stack


@pytest.mark.parametrize("bad", ["", "9lives", "has_underscore", "a" * 129, "dot.ted"])
def test_invalid_stack_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid stack name"):
        check_stack_name(bad)
