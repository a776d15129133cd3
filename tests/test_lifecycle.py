"""The table's lifecycle: ``upgrade`` (its migrations), ``check`` and ``version`` naming
pending migrations, and ``entity children`` on the index a migration adds; on moto
server and DynamoDB Local, from a table of today's schema full of today's items.

DynamoDB Local is a server of this module's own: in the first fresh-clone run, the
session's shared one (hundreds of tables made and deleted by then) left an index
CREATING for more than 300 s, while a fresh one builds it in about 2 s."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result

from tests.conftest import REPO, Endpoint, unavailable
from tests.helpers import keys_only_table
from zae_celery.cli import main
from zae_celery.core import Limit, RateLimiter
from zae_celery.infra import migrations
from zae_celery.testing import LocalServer, ServerUnavailable, dynamodb_local

pytestmark = pytest.mark.integration

LIMITS = [Limit.per_minute("rpm", 100), Limit.per_minute("tpm", 10_000)]
MIGRATION = migrations.MIGRATIONS[0].id


@pytest.fixture(scope="module")
def own_ddb_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A DynamoDB Local of this module's own (see the module's notes)."""
    cache = Path(os.environ.get("ZAE_CACHE_DIR", REPO / ".cache"))
    try:
        with dynamodb_local(cache_dir=cache, log_dir=tmp_path_factory.mktemp("ddb")) as server:
            yield server
    except ServerUnavailable as exc:
        unavailable(f"dynamodb-local: {exc}")


@pytest.fixture(params=["moto", "dynamodb-local"])
def endpoint(request: pytest.FixtureRequest) -> Endpoint:
    """This module's endpoints: the session's moto server, its own DynamoDB Local."""
    fixture = "moto" if request.param == "moto" else "own_ddb_local"
    server: LocalServer = request.getfixturevalue(fixture)
    return Endpoint(request.param, server.url, f"zae-test-{uuid.uuid4().hex[:12]}")


def cli(endpoint: Endpoint, *args: str) -> Result:
    result = CliRunner().invoke(
        main, ["--endpoint-url", endpoint.url, "--table", endpoint.table_name, *args]
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    return result


def client_for(endpoint: Endpoint) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint.url, region_name="us-east-1")


@pytest.fixture
def old_table(endpoint: Endpoint) -> Iterator[Endpoint]:
    """A table as zae-celery made it before the parents index (keys and TTL only),
    stamped and full of items: entities under parents, stored limits, buckets."""
    client = client_for(endpoint)
    keys_only_table(client, endpoint.table_name, BillingMode="PAY_PER_REQUEST")
    limiter = RateLimiter(endpoint.table_name, endpoint_url=endpoint.url, region="us-east-1")
    limiter.create_entity("project-a")
    for key in ("key-1", "key-2", "key-3"):
        limiter.create_entity(key, parent_id="project-a", cascade=True)
    limiter.create_entity("key-9", parent_id="project-b")
    limiter.set_limits("project-a", LIMITS, resource="gpt")
    for i in range(60):  # buckets of every entity, cascading to the parent
        with limiter.acquire(f"key-{1 + i % 3}", "gpt", {"rpm": 1, "tpm": 10}, LIMITS):
            pass
    yield endpoint
    client.delete_table(TableName=endpoint.table_name)


def _charged(limiter: RateLimiter) -> dict[str, int | None]:
    rows = limiter.buckets("project-a", "gpt", LIMITS)
    return {row.limit_name: row.charged for row in rows}


def test_upgrade_adds_the_index_to_a_table_of_today_and_records_it(old_table: Endpoint) -> None:
    client = client_for(old_table)
    limiter = RateLimiter(old_table.table_name, endpoint_url=old_table.url, region="us-east-1")
    before = _charged(limiter)
    assert before == {"rpm": 60, "tpm": 600}

    checked = cli(old_table, "check")
    assert checked.exit_code == 0 and f"Migrations pending: {MIGRATION}" in checked.output
    no_index = cli(old_table, "entity", "children", "project-a")
    assert no_index.exit_code == 1 and "zae-celery upgrade" in no_index.output

    dry = cli(old_table, "upgrade", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "create index 'parents'" in dry.output and "nothing was changed" in dry.output
    table = client.describe_table(TableName=old_table.table_name)["Table"]
    assert not table.get("GlobalSecondaryIndexes")
    assert migrations.applied(client, old_table.table_name) == set()

    done = cli(old_table, "upgrade")
    assert done.exit_code == 0, done.output
    assert f"{MIGRATION}: " in done.output and "done." in done.output
    assert migrations.applied(client, old_table.table_name) == {MIGRATION}
    assert migrations.pending(client, old_table.table_name) == []
    again = cli(old_table, "upgrade")
    assert again.exit_code == 0 and "nothing to do" in again.output

    children = cli(old_table, "entity", "children", "project-a", "--json")
    assert children.exit_code == 0, children.output
    assert json.loads(children.output) == ["key-1", "key-2", "key-3"]
    lone = cli(old_table, "entity", "children", "key-1")
    assert "No entity has key-1 as its parent" in lone.output
    shown = json.loads(cli(old_table, "version", "--json").output)
    assert shown["pending_migrations"] == [] and shown["compatible"]
    # The items are as they were: the buckets go on from where they were.
    assert _charged(limiter) == before
    with limiter.acquire("key-1", "gpt", {"rpm": 1, "tpm": 10}, LIMITS):
        pass
    assert _charged(limiter) == {"rpm": 61, "tpm": 610}


def test_an_interrupted_upgrade_goes_on_from_where_the_table_is(old_table: Endpoint) -> None:
    # The index was asked for (the upgrade died before recording it): upgrade waits for
    # it, records it, and asks for nothing twice.
    client = client_for(old_table)
    spec = migrations.PARENTS_INDEX_SPEC
    client.update_table(
        TableName=old_table.table_name,
        AttributeDefinitions=list(migrations.PARENTS_KEY_ATTRIBUTES),
        GlobalSecondaryIndexUpdates=[{"Create": spec}],
    )
    done = cli(old_table, "upgrade")
    assert done.exit_code == 0, done.output
    assert "creating index" not in done.output
    assert migrations.applied(client, old_table.table_name) == {MIGRATION}


def test_a_table_made_today_needs_no_migration(endpoint: Endpoint) -> None:
    made = cli(endpoint, "create-table")
    assert made.exit_code == 0, made.output
    try:
        checked = cli(endpoint, "check")
        assert checked.exit_code == 0 and "pending" not in checked.output
        done = cli(endpoint, "upgrade")  # only records what create-table did
        assert done.exit_code == 0 and "creating index" not in done.output
        limiter = RateLimiter(endpoint.table_name, endpoint_url=endpoint.url, region="us-east-1")
        limiter.create_entity("child", parent_id="parent")
        listed = cli(endpoint, "entity", "children", "parent")
        assert listed.output.split() == ["child"]
    finally:
        client_for(endpoint).delete_table(TableName=endpoint.table_name)


def test_a_stack_table_is_changed_by_its_template_not_by_upgrade(moto: Any) -> None:
    # moto keeps tags (DynamoDB Local has none): a table of a stack is refused, with the
    # command that adds the index the stack's way.
    table = f"zae-stack-{uuid.uuid4().hex[:8]}"
    endpoint = Endpoint("moto", moto.url, table)
    client = client_for(endpoint)
    tags = [{"Key": "zae-celery:stack", "Value": "limits-prod"}]
    keys_only_table(client, table, BillingMode="PAY_PER_REQUEST", Tags=tags)
    try:
        refused = cli(endpoint, "upgrade")
        assert refused.exit_code == 1, refused.output
        assert "zae-celery deploy --stack limits-prod" in refused.output
        assert not client.describe_table(TableName=table)["Table"].get("GlobalSecondaryIndexes")
        assert migrations.applied(client, table) == set()
    finally:
        client.delete_table(TableName=table)
