"""``zae-celery`` with click's runner: stack commands against moto server's CloudFormation
(and moto in-process where a stack must be put in a state moto cannot reach), table and
limit commands against moto server and DynamoDB Local, and bad input."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import click
import pytest
from celery import Celery
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

import zae_celery.core
from tests import oprecorder
from tests.conftest import Endpoint
from tests.helpers import keys_only_table
from zae_celery.cli import celery_command, format_limit, main, parse_limit
from zae_celery.cli.options import GLOBAL_OPTIONS
from zae_celery.core import SCHEMA_VERSION, Limit, RateLimiter, RateLimiterUnavailable
from zae_celery.core.limits import MAX_TOKENS
from zae_celery.infra import template_text
from zae_celery.testing import LocalServer, free_port

celery_app = Celery("zae-cli-test", set_as_current=False)
"""The app of ``celery -A tests.test_cli:celery_app zae ...`` (settings set per test)."""


def run(
    args: Sequence[str],
    *,
    input: str | None = None,
    env: dict[str, str | None] | None = None,
    group: click.Group = main,
) -> Result:
    """Invoke the CLI; an exception other than a clean exit fails the test."""
    result = CliRunner().invoke(group, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    return result


def unique(prefix: str = "zae-cli") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- help ------------------------------------------------------------------------------------
def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(_command_paths(main)), ids=lambda p: " ".join(p) or "main")
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = run([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    example = result.output.split("Example:", 1)[1].split("Options:", 1)[0]
    assert "zae-celery " in example
    assert all(f" {word} " in example.replace("\n", " ") for word in path), example


def test_celery_group_has_help_with_an_example() -> None:
    result = run(["--help"], group=celery_command)
    assert result.exit_code == 0
    assert "celery -A proj zae" in result.output


def test_console_script_runs() -> None:
    script = Path(sys.executable).parent / "zae-celery"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("zae-celery, version ")
    result = subprocess.run(
        [str(script), "limits", "get", "bad#id"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "no # or *" in result.stderr


def test_template_prints_the_shipped_template() -> None:
    result = run(["template"])
    assert result.exit_code == 0
    assert result.stdout == template_text()


# -- limits on the command line ----------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        ("rpm=500/m", Limit.per_minute("rpm", 500)),
        ("tpm=90k/m:burst=120k", Limit.per_minute("tpm", 90_000, burst=120_000)),
        ("tpm=90_000/minute", Limit.per_minute("tpm", 90_000)),
        ("rps=10/s", Limit.per_second("rps", 10)),
        ("tpd=2M/d", Limit.per_day("tpd", 2_000_000)),
        ("rph=100/h", Limit.per_hour("rph", 100)),
        (
            "rpm=600/m:capacity=10",
            Limit.custom("rpm", capacity=10, refill_amount=600, refill_period_seconds=60),
        ),
        (
            "x=5/500ms:capacity=2:burst=3",
            Limit.custom("x", capacity=2, refill_amount=5, refill_period_seconds=0.5, burst=3),
        ),
        ("w=7/10s", Limit.custom("w", capacity=7, refill_amount=7, refill_period_seconds=10)),
        ("rps=0.5/s", Limit.custom("rps", capacity=1, refill_amount=1, refill_period_seconds=2)),
    ],
)
def test_limit_syntax(spec: str, limit: Limit) -> None:
    assert parse_limit(spec) == limit == Limit.parse(spec)  # the one grammar
    assert parse_limit(format_limit(limit)) == limit
    assert format_limit(limit) == limit.format() == str(limit)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("rpm", "is not a limit"),
        ("rpm=500", "is not a limit"),
        ("1rpm=5/m", "invalid limit name"),
        ("rpm=abc/m", "not a whole number"),
        ("rpm=0/m", "out of range"),
        (f"rpm={MAX_TOKENS + 1}/m", "out of range"),
        ("rpm=5/week", "UNIT one of ms, s, m, h, d"),
        ("rpm=5/0s", "at least 1"),
        ("rpm=5/m:burst=2", "below capacity"),
        ("rpm=5/m:brust=9", "unknown option"),
        ("rpm=5/m:burst=9:burst=10", "appears twice"),
    ],
)
def test_bad_limit_specs_say_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_limit(spec)


@given(
    name=st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True),
    capacity=st.integers(1, MAX_TOKENS),
    extra=st.integers(0, 10**6),
    amount=st.integers(1, MAX_TOKENS),
    period=st.integers(1, 10 * 365 * 86_400_000),
)
def test_any_limit_round_trips_through_its_command_line_form(
    name: str, capacity: int, extra: int, amount: int, period: int
) -> None:
    limit = Limit(name, capacity, min(MAX_TOKENS, capacity + extra), amount, period)
    assert parse_limit(format_limit(limit)) == limit


# -- table commands on both endpoints --------------------------------------------------------
def local(endpoint: Endpoint, *args: str) -> list[str]:
    return ["--endpoint-url", endpoint.url, "--table", endpoint.table_name, *args]


@pytest.fixture
def table(endpoint: Endpoint) -> Iterator[Endpoint]:
    """A table made with ``create-table``, deleted afterwards."""
    result = run(local(endpoint, "create-table"))
    assert result.exit_code == 0, result.output
    yield endpoint
    with contextlib.suppress(Exception):
        RateLimiter(endpoint.table_name, endpoint_url=endpoint.url).delete_table()


def ddb(endpoint: Endpoint) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint.url, region_name="us-east-1")


def plain_table(endpoint: Endpoint, **billing: Any) -> None:
    """A table of the engine's key schema made by hand, not by zae-celery (no TTL, no
    schema stamp); ``billing``: its BillingMode or ProvisionedThroughput."""
    keys_only_table(ddb(endpoint), endpoint.table_name, **billing)


@pytest.mark.integration
def test_create_table_enables_ttl_and_the_engine_can_use_it(table: Endpoint) -> None:
    client = ddb(table)
    ttl = client.describe_time_to_live(TableName=table.table_name)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING")
    assert ttl["AttributeName"] == "ttl"
    described = client.describe_table(TableName=table.table_name)["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    limiter = RateLimiter(table.table_name, endpoint_url=table.url)
    with limiter.acquire("t", "m", {"rpm": 1}, [Limit.per_minute("rpm", 2)]):
        pass
    meta = client.get_item(
        TableName=table.table_name, Key={"PK": {"S": "#META"}, "SK": {"S": "#SCHEMA"}}
    )
    assert meta["Item"]["version"] == {"N": "1"}


@pytest.mark.integration
def test_create_table_refuses_an_existing_table_unless_exist_ok(table: Endpoint) -> None:
    client = ddb(table)
    client.put_item(TableName=table.table_name, Item={"PK": {"S": "x"}, "SK": {"S": "y"}})
    result = run(local(table, "create-table"))
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "--exist-ok" in result.stderr
    assert "nothing was changed" in result.stderr
    result = run(local(table, "create-table", "--exist-ok"))
    assert result.exit_code == 0, result.output
    assert "already existed" in result.stdout
    assert "Item" in client.get_item(
        TableName=table.table_name, Key={"PK": {"S": "x"}, "SK": {"S": "y"}}
    )


@pytest.mark.integration
def test_create_table_with_exist_ok_enables_ttl_on_a_plain_table(endpoint: Endpoint) -> None:
    client = ddb(endpoint)
    plain_table(endpoint, BillingMode="PAY_PER_REQUEST")
    try:
        result = run(local(endpoint, "create-table", "--exist-ok"))
        assert result.exit_code == 0, result.output
        ttl = client.describe_time_to_live(TableName=endpoint.table_name)
        assert ttl["TimeToLiveDescription"]["AttributeName"] == "ttl"
    finally:
        client.delete_table(TableName=endpoint.table_name)


@pytest.mark.integration
def test_create_table_leaves_nothing_half_made(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = RateLimiter.create_table

    def create_then_fail(self: RateLimiter) -> bool:
        original(self)
        raise RateLimiterUnavailable("simulated failure after the table was created")

    monkeypatch.setattr(RateLimiter, "create_table", create_then_fail)
    result = run(local(endpoint, "create-table"))
    assert result.exit_code == 1
    assert "simulated failure" in result.stderr
    assert endpoint.table_name not in ddb(endpoint).list_tables()["TableNames"]


@pytest.mark.integration
def test_status_shows_a_table_made_without_a_stack(table: Endpoint) -> None:
    base = local(table)
    assert run([*base, "limits", "set", "t", "--limit", "rpm=5/m"]).exit_code == 0
    result = run([*base, "status"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    if table.kind == "moto":  # CloudFormation, but no stack of the table's name
        assert f"No stack '{table.table_name}'" in text
        assert "exists without one" in text and "resource import" in text
    else:
        assert "serves no CloudFormation" in text and "exists without a stack" in text
    described = ddb(table).describe_table(TableName=table.table_name)["Table"]
    count = described["ItemCount"]
    assert f"Table: {table.table_name} ACTIVE, {count} item" in text
    assert "TTL ENABLED on ttl" in text and "Billing: PAY_PER_REQUEST" in text
    assert f"Schema: version {SCHEMA_VERSION}" in text
    assert result.stderr == ""  # no warning: TTL is on

    # A table stamped by a newer zae-celery: shown as it is, not refused.
    ddb(table).put_item(
        TableName=table.table_name,
        Item={"PK": {"S": "#META"}, "SK": {"S": "#SCHEMA"}, "version": {"N": "999"}},
    )
    result = run([*base, "status"])
    assert result.exit_code == 0, result.output
    assert f"version 999, but this zae-celery speaks version {SCHEMA_VERSION}" in result.stdout


@pytest.mark.integration
def test_status_of_a_provisioned_table_nobody_used(endpoint: Endpoint) -> None:
    client = ddb(endpoint)
    plain_table(endpoint, ProvisionedThroughput={"ReadCapacityUnits": 3, "WriteCapacityUnits": 4})
    try:
        result = run(local(endpoint, "status"))
        assert result.exit_code == 0, result.output
        text = " ".join(result.stdout.split())
        assert "Billing: PROVISIONED (3 read, 4 write capacity units)" in text
        assert "Schema: not stamped yet (the first request stamps it)" in text
        assert "TTL DISABLED" in text and "TTL is off" in result.stderr
        # Reading it stamped nothing.
        meta = client.get_item(
            TableName=endpoint.table_name, Key={"PK": {"S": "#META"}, "SK": {"S": "#SCHEMA"}}
        )
        assert "Item" not in meta
    finally:
        client.delete_table(TableName=endpoint.table_name)


@pytest.mark.integration
def test_status_without_stack_or_table_is_an_error(endpoint: Endpoint) -> None:
    result = run(local(endpoint, "status"))
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert f"no table '{endpoint.table_name}'" in text
    if endpoint.kind == "moto":
        assert "no stack" in text and "deploy" in text
    else:
        assert "serves no CloudFormation" in text and "create-table" in text


def test_create_table_needs_a_local_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    result = run(["--region", "eu-west-1", "create-table"])
    assert result.exit_code == 2
    assert "--endpoint-url" in result.stderr and "zae-celery deploy" in result.stderr


@dataclass
class Store:
    """Where the limit, entity and buckets commands act in a test: the global options
    that name it, and its store URL."""

    args: list[str]
    url: str

    def cli(self, *args: str) -> list[str]:
        return [*self.args, *args]

    def limiter(self) -> RateLimiter:
        return RateLimiter.from_url(self.url)


@pytest.fixture(params=["moto", "dynamodb-local", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh store, named as a user would: a table made with ``create-table`` on each
    DynamoDB endpoint (``--endpoint-url``, ``--table``), or a prefix of the private
    redis-server (``--store redis://...``: nothing to create). Deleted afterwards."""
    if request.param == "redis":
        server: LocalServer = request.getfixturevalue("redis")
        url = f"redis://127.0.0.1:{server.port}/3?prefix={unique()}"
        yield Store(["--store", url], url)
        RateLimiter.from_url(url).delete_table()
        return
    server = request.getfixturevalue("moto" if request.param == "moto" else "ddb_local")
    endpoint = Endpoint(request.param, server.url, unique())
    result = run(local(endpoint, "create-table"))
    assert result.exit_code == 0, result.output
    yield Store(local(endpoint), f"dynamodb://{endpoint.table_name}?endpoint_url={endpoint.url}")
    with contextlib.suppress(Exception):
        RateLimiter(endpoint.table_name, endpoint_url=endpoint.url).delete_table()


@pytest.mark.integration
def test_limits_set_get_delete(store: Store) -> None:
    specs = ["rpm=500/m", "tpm=90000/m:burst=120000"]
    args = ["limits", "set", "tenant-42", "--resource", "gpt-4o"]
    result = run(store.cli(*args, "--limit", specs[0], "--limit", "tpm=90k/m:burst=120k"))
    assert result.exit_code == 0, result.output
    limiter = store.limiter()
    assert limiter.get_limits("tenant-42", "gpt-4o") == [parse_limit(s) for s in specs]
    result = run(store.cli("limits", "get", "tenant-42", "--resource", "gpt-4o"))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == specs
    result = run(store.cli("limits", "get", "tenant-42", "--resource", "gpt-4o", "--json"))
    assert [Limit.from_dict(d) for d in json.loads(result.stdout)] == [
        parse_limit(s) for s in specs
    ]
    # Entity-wide limits are another item.
    result = run(store.cli("limits", "get", "tenant-42"))
    assert result.exit_code == 0 and result.stdout == ""
    assert "No limits stored" in result.stderr
    assert "stored for its resource(s) gpt-4o: see --resource gpt-4o" in result.stderr
    result = run(store.cli("limits", "set", "tenant-42", "--limit", "rpd=10k/d"))
    assert result.exit_code == 0
    assert limiter.get_limits("tenant-42") == [Limit.per_day("rpd", 10_000)]

    result = run(store.cli("limits", "delete", "tenant-42", "--resource", "gpt-4o"))
    assert result.exit_code == 0 and "Deleted" in result.stdout
    assert limiter.get_limits("tenant-42", "gpt-4o") == []
    assert limiter.get_limits("tenant-42") == [Limit.per_day("rpd", 10_000)]
    result = run(store.cli("limits", "delete", "tenant-42", "--resource", "gpt-4o"))
    assert result.exit_code == 0 and "nothing to delete" in result.stdout


@pytest.mark.integration
def test_stored_limits_govern_the_engine(store: Store) -> None:
    result = run(store.cli("limits", "set", "tenant-1", "--limit", "rpm=2/m"))
    assert result.exit_code == 0
    limiter = store.limiter()
    # Code says 100/min; the stored limit says 2/min and wins.
    code = [Limit.per_minute("rpm", 100)]
    limiter.acquire("tenant-1", "any-model", {"rpm": 2}, code).commit()
    with pytest.raises(Exception, match="rate limit exceeded"):
        limiter.acquire("tenant-1", "any-model", {"rpm": 1}, code)


@pytest.mark.integration
def test_entity_create_with_cascade_makes_the_child_consume_the_parent(store: Store) -> None:
    assert run(store.cli("limits", "set", "project", "--limit", "rpm=3/d")).exit_code == 0
    result = run(store.cli("entity", "create", "key-1", "--parent", "project", "--cascade"))
    assert result.exit_code == 0, result.output
    assert "cascade" in result.stdout
    limiter = store.limiter()
    limits = [Limit.per_day("rpm", 100)]
    limiter.acquire("key-1", "m", {"rpm": 2}, limits).commit()
    available = limiter.available("project", "m", limits)
    assert 0.9 < available["rpm"] < 1.1  # 3 - 2, the child's acquire reached the parent


@pytest.mark.integration
def test_buckets_shows_tokens_and_debt_in_red(store: Store) -> None:
    assert run(store.cli("limits", "set", "tenant", "--limit", "tpm=1000/d")).exit_code == 0
    limiter = store.limiter()
    code = [Limit.per_day("rpm", 50), Limit.per_day("tpm", 10)]  # tpm is overridden
    with limiter.acquire("tenant", "gpt", {"rpm": 1, "tpm": 500}, code) as lease:
        lease.adjust(tpm=1500)  # 2000 used of 1000: in debt
    limiter.acquire("tenant", "mini", {"rpm": 5}, code).commit()

    result = run(store.cli("buckets", "tenant", "--limit", "rpm=50/d", "--json"))
    assert result.exit_code == 0, result.output
    rows = {(r["resource"], r["limit"]): r for r in json.loads(result.stdout)}
    buckets = {("gpt", "rpm"), ("gpt", "tpm"), ("mini", "rpm"), ("mini", "tpm")}
    assert set(rows) == buckets | {("*", "rpm"), ("*", "tpm")}  # *: every resource
    for resource, limit in buckets:
        row = rows[(resource, limit)]
        expected = limiter.available("tenant", resource, code)[limit]
        assert row["available"] == pytest.approx(expected, abs=0.5)
    assert [rows[("*", name)]["available"] for name in ("rpm", "tpm")] == [50, 1000]
    assert rows[("gpt", "tpm")]["in_debt"] and rows[("gpt", "tpm")]["burst"] == 1000
    assert rows[("gpt", "tpm")]["available"] == pytest.approx(-1000, abs=0.5)
    assert not rows[("mini", "rpm")]["in_debt"]

    result = run(
        store.cli("buckets", "tenant", "--resource", "gpt", "--limit", "rpm=50/d"),
        env={"FORCE_COLOR": "1", "NO_COLOR": None, "COLUMNS": "120"},
    )
    assert result.exit_code == 0
    debt = re.search(r"\x1b\[31m(-1,000 \(debt\))", result.stdout)
    assert debt is not None, result.stdout
    assert "\x1b[31m49" not in result.stdout  # the healthy bucket is not red


@pytest.mark.integration
def test_buckets_of_limits_known_only_to_code(store: Store) -> None:
    limiter = store.limiter()
    limiter.acquire("tenant", "gpt", {"rpm": 3}, [Limit.per_day("rpm", 10)]).commit()
    result = run(store.cli("buckets", "tenant", "--json"))
    assert result.exit_code == 0
    (row,) = json.loads(result.stdout)
    assert (row["limit"], row["burst"], row["available"]) == ("rpm", None, None)
    assert row["in_use"] == pytest.approx(3, abs=0.01)
    result = run(store.cli("buckets", "tenant"), env={"COLUMNS": "120"})
    assert "pass it with --limit" in result.stderr
    result = run(store.cli("buckets", "nobody"))
    assert result.exit_code == 0 and "No limits and no buckets" in result.stderr


WIDE: dict[str, str | None] = {"COLUMNS": "150"}
"""A terminal wide enough for every column of the ``buckets`` table."""


def _table(result: Result) -> list[list[str]]:
    """The body rows of the table ``buckets`` printed, cell by cell."""
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in result.stdout.splitlines()
        if line.startswith("│")
    ]


@pytest.mark.integration
def test_buckets_tells_what_is_stored_before_and_after_the_first_request(store: Store) -> None:
    """The README's sequence: limits stored per resource, then ``buckets ENTITY``."""
    result = run(store.cli("buckets", "tenant-42"))
    assert (result.exit_code, result.stdout) == (0, "")
    assert "No limits and no buckets are stored for tenant-42" in result.stderr
    assert "first request" in result.stderr
    assert json.loads(run(store.cli("buckets", "tenant-42", "--json")).stdout) == []

    specs = ["rpm=500/m", "tpm=90k/m:burst=120k"]
    args = ["limits", "set", "tenant-42", "--resource", "gpt-4o"]
    assert run(store.cli(*args, "--limit", specs[0], "--limit", specs[1])).exit_code == 0
    stored = [parse_limit(spec) for spec in specs]
    # No bucket yet: the stored limits, each bucket full and unused.
    result = run(store.cli("buckets", "tenant-42", "--json"))
    assert result.exit_code == 0, result.output
    assert [
        (r["resource"], r["limit"], r["burst"], r["available"], r["source"], r["used"])
        for r in json.loads(result.stdout)
    ] == [("gpt-4o", lim.name, lim.burst, lim.burst, "resource", False) for lim in stored]
    result = run(store.cli("buckets", "tenant-42"), env=WIDE)
    assert [row[:3] + row[-1:] for row in _table(result)] == [
        ["gpt-4o", lim.name, "stored", "full (unused)"] for lim in stored
    ]
    assert "No limits" not in result.stderr
    assert "zae-celery buckets tenant-42 --resource gpt-4o" in result.stderr
    result = run(store.cli("buckets", "tenant-42", "--resource", "mini"))
    assert result.exit_code == 0 and result.stdout == ""
    text = " ".join(result.stderr.split())
    assert "No limits are stored for tenant-42 / mini" in text
    assert "limits stored for gpt-4o only" in text

    # Limits for every resource: rows of resource *, merged into gpt-4o's too. A slow
    # limit (1000 a day) keeps what a request consumed in use while the test reads it.
    assert run(store.cli("limits", "set", "tenant-42", "--limit", "rpd=1k/d")).exit_code == 0
    limiter = store.limiter()
    limiter.acquire("tenant-42", "gpt-4o", {"rpd": 3}).commit()
    result = run(store.cli("buckets", "tenant-42", "--json"))
    rows = {(r["resource"], r["limit"]): r for r in json.loads(result.stdout)}
    assert list(rows) == [("*", "rpd"), ("gpt-4o", "rpd"), ("gpt-4o", "rpm"), ("gpt-4o", "tpm")]
    assert {key: (r["source"], r["used"]) for key, r in rows.items()} == {
        ("*", "rpd"): ("entity", False),
        ("gpt-4o", "rpd"): ("entity", True),
        ("gpt-4o", "rpm"): ("resource", False),  # the request consumed none of these
        ("gpt-4o", "tpm"): ("resource", False),
    }
    used = rows[("gpt-4o", "rpd")]
    assert used["in_use"] == pytest.approx(3, abs=0.05)
    expected = limiter.available("tenant-42", "gpt-4o")["rpd"]
    assert used["available"] == pytest.approx(expected, abs=0.05)
    result = run(store.cli("buckets", "tenant-42"), env=WIDE)
    table = _table(result)
    assert [row[:3] for row in table] == [
        ["*", "rpd", "stored *"],
        ["gpt-4o", "rpd", "stored *"],
        ["gpt-4o", "rpm", "stored"],
        ["gpt-4o", "tpm", "stored"],
    ]
    assert [row[-1] == "full (unused)" for row in table] == [True, False, True, True]
    assert "*: the limits stored for every resource of tenant-42" in result.stderr
    # One resource: its rows only, the entity-wide limits merged in.
    result = run(store.cli("buckets", "tenant-42", "--resource", "gpt-4o", "--json"))
    assert [r["limit"] for r in json.loads(result.stdout)] == ["rpd", "rpm", "tpm"]


@pytest.mark.integration
def test_buckets_of_an_entity_with_limits_for_every_resource_only(store: Store) -> None:
    assert run(store.cli("limits", "set", "tenant-7", "--limit", "rpd=10k/d")).exit_code == 0
    result = run(store.cli("buckets", "tenant-7", "--json"))
    (row,) = json.loads(result.stdout)
    assert (row["resource"], row["limit"], row["available"], row["used"]) == (
        "*",
        "rpd",
        10_000,
        False,
    )
    result = run(store.cli("buckets", "tenant-7"), env=WIDE)
    assert [row[:3] for row in _table(result)] == [["*", "rpd", "stored *"]]
    assert "every resource of tenant-7" in result.stderr
    assert "--resource" not in result.stderr  # no limits of one resource to point at
    result = run(store.cli("buckets", "tenant-7", "--resource", "gpt"), env=WIDE)
    assert [row[:3] + row[-1:] for row in _table(result)] == [
        ["gpt", "rpd", "stored *", "full (unused)"]
    ]


@pytest.mark.integration
def test_missing_table_says_how_to_create_it(endpoint: Endpoint) -> None:
    result = run(local(endpoint, "limits", "get", "tenant"))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and "create-table" in result.stderr


# -- a Redis store -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command", [["create-table"], ["deploy"], ["delete", "--yes"]], ids=lambda c: c[0]
)
def test_table_and_stack_commands_refuse_a_redis_store(command: list[str]) -> None:
    # Nothing listens at the URL: a command that tried to reach it would exit 1.
    url = f"redis://127.0.0.1:{free_port()}/0?prefix=zae-cli"
    result = run(["--store", url, *command])
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert f"'{command[0]}' concerns a DynamoDB table and its stack" in text
    assert "(prefix zae-cli)" in text
    assert "'limits', 'entity', 'buckets' and 'status' work on it" in text


@pytest.mark.integration
def test_status_of_a_redis_store_shows_its_prefix_and_schema_stamp(redis: LocalServer) -> None:
    prefix = unique()
    url = f"redis://127.0.0.1:{redis.port}/3?prefix={prefix}"
    try:
        result = run(["--store", url, "status"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.stdout.split())
        assert f"Store: Redis at 127.0.0.1:{redis.port}/3 (prefix {prefix})" in text
        assert "Schema: not stamped yet (the first request stamps it)" in text
        assert "no table and no stack" in text
        assert RateLimiter.from_url(url).schema_version() is None  # status stamped nothing
        assert run(["--store", url, "limits", "set", "t", "--limit", "rpm=7/m"]).exit_code == 0
        result = run(["--store", url, "status"])
        assert result.exit_code == 0, result.output
        assert f"Schema:  version {SCHEMA_VERSION}" in result.stdout
        result = run(["--store", url, "status", "--stack", "rate-limits"])
        assert result.exit_code == 2 and "has no stack" in result.stderr
    finally:
        RateLimiter.from_url(url).delete_table()
    result = run(["--store", f"redis://127.0.0.1:{free_port()}/0", "status"])
    assert result.exit_code == 1 and "is reachable" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--table", "zae-other"], {}, "--store is given together with --table"),
        (["--region", "eu-west-1"], {}, "--store is given together with --region"),
        (["--endpoint-url", "http://127.0.0.1:1"], {}, "together with --endpoint-url"),
        ([], {"ZAE_TABLE_NAME": "zae-other"}, "with --table (from ZAE_TABLE_NAME)"),
    ],
)
def test_store_and_table_options_are_mutually_exclusive(
    args: list[str], env: dict[str, str | None], named: str
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run(["--store", url, *args, "limits", "get", "x"], env=env)
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "give one or the other" in result.stderr
    result = run([*args, "limits", "get", "x"], env={**env, "ZAE_STORE_URL": url})
    assert result.exit_code == 2, result.output
    assert "--store (from ZAE_STORE_URL) is given together with" in result.stderr


def test_a_store_url_of_this_process_memory_is_refused() -> None:
    result = run(["--store", "memory://x", "limits", "get", "x"])
    assert result.exit_code == 2
    assert "--store" in result.stderr and "holds nothing of the workers'" in result.stderr


@pytest.mark.integration
def test_the_store_url_may_come_from_the_environment(redis: LocalServer) -> None:
    url = f"redis://127.0.0.1:{redis.port}/3?prefix={unique()}"
    try:
        # AWS_REGION is an AWS-wide variable, not a table option: it does not conflict.
        env: dict[str, str | None] = {"ZAE_STORE_URL": url, "AWS_REGION": "eu-west-1"}
        result = run(["limits", "set", "t", "--limit", "rpm=7/m"], env=env)
        assert result.exit_code == 0, result.output
        assert RateLimiter.from_url(url).get_limits("t") == [Limit.per_minute("rpm", 7)]
    finally:
        RateLimiter.from_url(url).delete_table()


def test_an_unreachable_redis_store_is_an_operational_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?prefix=zae-cli"
    result = run(["--store", url, "limits", "get", "x"])
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "Redis at 127.0.0.1:" in text and "is reachable" in text
    assert "create-table" not in text  # there is no table to create


@pytest.mark.integration
def test_a_dynamodb_store_url_names_the_table(moto: LocalServer) -> None:
    table = unique()
    url = f"dynamodb://{table}?region=eu-west-1&endpoint_url={moto.url}"
    result = run(["--store", url, "create-table"])
    assert result.exit_code == 0, result.output
    assert f"Table {table} created at {moto.url}" in result.stdout
    result = run(["--store", url, "limits", "set", "t", "--limit", "rpm=7/m"])
    assert result.exit_code == 0, result.output
    limiter = RateLimiter(table, endpoint_url=moto.url, region="eu-west-1")
    assert limiter.get_limits("t") == [Limit.per_minute("rpm", 7)]
    limiter.delete_table()


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--table", "ab", "limits", "get", "x"], "invalid table name"),
        (["--table", "bad name!", "limits", "get", "x"], "invalid table name"),
        (["--endpoint-url", "ftp://host", "limits", "get", "x"], "http:// or https://"),
        (["--store", "ftp://host", "limits", "get", "x"], "unknown scheme"),
        (["--store", "redis://h/0?prefix={x}", "limits", "get", "x"], "prefix"),
        (["limits", "get", "bad#id"], "no # or *"),
        (["limits", "get", "x", "--resource", "*"], "no # or *"),
        (["limits", "set", "x"], "Missing option '--limit'"),
        (["limits", "set", "x", "--limit", "rpm=abc/m"], "not a whole number"),
        (["limits", "set", "x", "--limit", "rpm=1/m", "--limit", "rpm=2/m"], "given twice"),
        (["entity", "create", "x", "--cascade"], "--cascade needs --parent"),
        (["entity", "create", "x", "--parent", "x"], "own --parent"),
        (["entity", "create", "x", "--parent", "p*"], "no # or *"),
        (["deploy", "--stack", "9lives"], "invalid stack name"),
        (["deploy", "--parameter", "Nope=1"], "unknown template parameter"),
        (["deploy", "--parameter", "novalue"], "is not KEY=VALUE"),
        (["deploy", "--no-alarms", "--alarm-topic", "arn:x"], "drop --no-alarms"),
        (["deploy", "--parameter", "TableName=other"], "--table"),
        (["buckets", "x", "--limit", "tpm"], "is not a limit"),
        (["nonsense"], "No such command"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_allowed(args: list[str], message: str) -> None:
    result = run(["--region", "us-east-1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


@pytest.fixture
def no_aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No region, profile or credentials from files; no instance metadata."""
    for name in (
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_aws_config")
@pytest.mark.parametrize("args", [["limits", "get", "x"], ["deploy"], ["status"]])
def test_missing_region_is_a_usage_error(args: list[str]) -> None:
    result = run(args)
    assert result.exit_code == 2
    assert "no AWS region" in result.stderr and "--region" in result.stderr


@pytest.mark.usefixtures("no_aws_config")
def test_unknown_profile_is_a_usage_error() -> None:
    result = run(["--profile", "nobody-has-this", "--region", "eu-west-1", "status"])
    assert result.exit_code == 2
    assert "nobody-has-this" in result.stderr and "not found" in result.stderr


@pytest.mark.integration
@pytest.mark.usefixtures("no_aws_config")
def test_no_credentials_fails_before_creating_anything(
    clean_moto: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for args in (["deploy", "--no-deletion-protection"], ["create-table"], ["limits", "get", "x"]):
        result = run(["--endpoint-url", clean_moto.url, *args])
        assert result.exit_code == 1, result.output
        assert "no AWS credentials" in result.stderr
        assert "AWS_ACCESS_KEY_ID=local" in result.stderr
    keys = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}
    kwargs = {"endpoint_url": clean_moto.url, "region_name": "us-east-1", **keys}
    assert boto3.client("cloudformation", **kwargs).describe_stacks()["Stacks"] == []
    assert boto3.client("dynamodb", **kwargs).list_tables()["TableNames"] == []


@pytest.mark.integration
@pytest.mark.usefixtures("no_aws_config")
def test_environment_and_profile_supply_the_global_options(
    clean_moto: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config"
    config.write_text("[profile ops]\nregion = eu-central-1\n")
    credentials = tmp_path / "credentials"
    credentials.write_text("[ops]\naws_access_key_id = local\naws_secret_access_key = local\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    table = unique()
    env: dict[str, str | None] = {
        "AWS_ENDPOINT_URL": clean_moto.url,
        "AWS_PROFILE": "ops",
        "ZAE_TABLE_NAME": table,
    }
    result = run(["deploy", "--no-deletion-protection"], env=env)
    assert result.exit_code == 0, result.output
    kwargs = {
        "endpoint_url": clean_moto.url,
        "aws_access_key_id": "local",
        "aws_secret_access_key": "local",
    }
    # The stack landed in the profile's region.
    stacks = boto3.client("cloudformation", region_name="eu-central-1", **kwargs)
    assert stacks.describe_stacks(StackName=table)["Stacks"]
    other = boto3.client("cloudformation", region_name="us-east-1", **kwargs)
    assert other.describe_stacks()["Stacks"] == []
    # --region wins over the profile.
    result = run(["--region", "us-east-1", "status"], env=env)
    assert result.exit_code == 1 and "no stack" in result.stderr
    result = run(["status"], env=env)
    assert result.exit_code == 0, result.output


def test_unreachable_endpoint_is_an_operational_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run(["--endpoint-url", url, "limits", "get", "x"])
    assert result.exit_code == 1
    assert url in result.stderr and "reachable" in result.stderr
    result = run(["--endpoint-url", url, "status"])
    assert result.exit_code == 1
    assert "cannot reach" in result.stderr


# -- stack commands on moto server -----------------------------------------------------------
def cfn(server: LocalServer) -> Any:
    return boto3.client("cloudformation", endpoint_url=server.url, region_name="us-east-1")


@pytest.mark.integration
def test_deploy_status_update_delete_on_moto(clean_moto: LocalServer) -> None:
    table = unique()
    base = ["--endpoint-url", clean_moto.url, "--table", table]
    result = run([*base, "deploy", "--no-deletion-protection", "--tag", "team=ml"])
    assert result.exit_code == 0, result.output
    assert f"Stack {table} created (CREATE_COMPLETE)" in result.stdout
    assert "WorkerPolicyArn" in result.stdout and "AdminPolicyArn" in result.stdout
    assert "CREATE_COMPLETE" in result.stderr  # progress events
    (stack,) = cfn(clean_moto).describe_stacks(StackName=table)["Stacks"]
    params = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert params["TableName"] == table and params["DeletionProtection"] == "false"
    assert {t["Key"]: t["Value"] for t in stack["Tags"]} == {"team": "ml"}

    result = run([*base, "status"])
    assert result.exit_code == 0, result.output
    assert "CREATE_COMPLETE" in result.stdout
    assert f"Table:   {table} ACTIVE" in result.stdout

    result = run([*base, "deploy"])
    assert result.exit_code == 0
    assert "up to date" in result.stdout

    # An update changes what is given and keeps the rest (deletion protection stays off).
    result = run([*base, "deploy", "--alarms", "--no-pitr"])
    assert result.exit_code == 0, result.output
    assert f"Stack {table} updated (UPDATE_COMPLETE)" in result.stdout
    (stack,) = cfn(clean_moto).describe_stacks(StackName=table)["Stacks"]
    params = {p["ParameterKey"]: p["ParameterValue"] for p in stack["Parameters"]}
    assert params["Alarms"] == "true" and params["PointInTimeRecovery"] == "false"
    assert params["DeletionProtection"] == "false"

    result = run([*base, "delete"], input="n\n")
    assert result.exit_code == 1
    assert "nothing was deleted" in result.stderr
    assert cfn(clean_moto).describe_stacks(StackName=table)["Stacks"]

    result = run([*base, "delete"], input="y\n")
    assert result.exit_code == 0, result.output
    assert f"Stack {table} deleted" in result.stdout
    assert cfn(clean_moto).describe_stacks()["Stacks"] == []
    assert table not in ddb_client(clean_moto).list_tables()["TableNames"]

    result = run([*base, "status"])
    assert result.exit_code == 1
    assert "no stack" in result.stderr and "deploy" in result.stderr
    result = run([*base, "delete", "--yes"])
    assert result.exit_code == 1
    assert "nothing to delete" in result.stderr


def ddb_client(server: LocalServer) -> Any:
    return boto3.client("dynamodb", endpoint_url=server.url, region_name="us-east-1")


@contextlib.contextmanager
def iam_enforced(server: LocalServer) -> Iterator[None]:
    """moto server checks every request against the caller's IAM policies in the block."""

    def reset_auth(count: str) -> str:
        request = urllib.request.Request(
            f"{server.url}/moto-api/reset-auth",
            data=count.encode(),
            headers={"Content-Type": "text/plain"},  # a form body would not reach moto
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return str(json.load(reply)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])

    previous = reset_auth("0")
    try:
        yield
    finally:
        reset_auth(previous)


@pytest.mark.integration
def test_status_shows_the_table_to_whom_may_not_read_its_items(
    clean_moto: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = unique()
    base = ["--endpoint-url", clean_moto.url, "--table", table]
    assert run([*base, "create-table"]).exit_code == 0
    iam = boto3.client("iam", endpoint_url=clean_moto.url, region_name="us-east-1")
    iam.create_user(UserName="describer")
    allowed = ["cloudformation:DescribeStacks", "dynamodb:DescribeTable"]
    allowed.append("dynamodb:DescribeTimeToLive")
    document = {"Effect": "Allow", "Action": allowed, "Resource": "*"}
    iam.put_user_policy(
        UserName="describer",
        PolicyName="describe",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [document]}),
    )
    key = iam.create_access_key(UserName="describer")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with iam_enforced(clean_moto):
        result = run([*base, "status"])
    assert result.exit_code == 0, result.output
    assert f"Table:   {table} ACTIVE" in result.stdout
    # What the endpoint said (moto answers in XML where AWS answers in JSON).
    schema = result.stdout.split("Schema:", 1)[1].split("To manage", 1)[0]
    assert "not readable" in schema and "dynamodb:GetItem" in schema, result.stdout


@pytest.mark.integration
def test_deploy_refuses_a_table_that_already_exists(clean_moto: LocalServer) -> None:
    table = unique()
    assert run(["--endpoint-url", clean_moto.url, "--table", table, "create-table"]).exit_code == 0
    result = run(["--endpoint-url", clean_moto.url, "--table", table, "deploy"])
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "nothing was created" in result.stderr
    assert cfn(clean_moto).describe_stacks()["Stacks"] == []


@pytest.mark.integration
def test_deploy_refuses_to_rename_the_table_of_a_stack(clean_moto: LocalServer) -> None:
    first = unique()
    base = ["--endpoint-url", clean_moto.url]
    assert run([*base, "--table", first, "deploy", "--no-deletion-protection"]).exit_code == 0
    result = run([*base, "--table", unique(), "deploy", "--stack", first])
    assert result.exit_code == 1
    assert f"manages table {first!r}" in result.stderr
    (stack,) = cfn(clean_moto).describe_stacks(StackName=first)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE"


@pytest.mark.integration
def test_delete_refuses_a_protected_table(clean_moto: LocalServer) -> None:
    table = unique()
    base = ["--endpoint-url", clean_moto.url, "--table", table]
    assert run([*base, "deploy"]).exit_code == 0  # deletion protection is on by default
    result = run([*base, "delete", "--yes"])
    assert result.exit_code == 1
    assert "deletion protection" in result.stderr and "--no-deletion-protection" in result.stderr
    assert cfn(clean_moto).describe_stacks(StackName=table)["Stacks"]
    assert table in ddb_client(clean_moto).list_tables()["TableNames"]


@pytest.mark.integration
def test_admin_policy_grants_exactly_what_the_admin_commands_use(clean_moto: LocalServer) -> None:
    table = unique()
    base = ["--endpoint-url", clean_moto.url, "--table", table]
    assert run([*base, "deploy", "--no-deletion-protection"]).exit_code == 0
    limiter = RateLimiter(table, endpoint_url=clean_moto.url)
    limiter.acquire("t", "m", {"rpm": 1}, [Limit.per_minute("rpm", 5)]).commit()
    with oprecorder.recording() as recorded:
        for args in (
            ["limits", "set", "t", "--limit", "rpm=5/m"],
            ["limits", "get", "t"],
            ["entity", "create", "k", "--parent", "t", "--cascade"],
            ["buckets", "t"],
            ["limits", "delete", "t"],
            ["status"],
        ):
            result = run([*base, *args])
            assert result.exit_code == 0, (args, result.output)
    used = set().union(*recorded.actions.values())
    assert used == oprecorder.policy_actions("AdminPolicy")


# -- stack states moto server cannot reach: moto in-process ---------------------------------
@pytest.fixture
def moto_in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's backends in this process; yields the CloudFormation backend of us-east-1."""
    from moto import mock_aws
    from moto.cloudformation.models import cloudformation_backends
    from moto.core.models import DEFAULT_ACCOUNT_ID

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield cloudformation_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]


def _moto_stack(backend: Any, name: str) -> Any:
    return next(s for s in backend.stacks.values() if s.name == name)


def _fail(stack: Any, reason: str) -> None:
    """Put a moto stack where AWS leaves a failed creation: ROLLBACK_COMPLETE."""
    from moto.cloudformation.models import Event

    stack.events.append(
        Event(
            stack_id=stack.stack_id,
            stack_name=stack.name,
            logical_resource_id="WorkerPolicy",
            physical_resource_id="",
            resource_type="AWS::IAM::ManagedPolicy",
            resource_status="CREATE_FAILED",
            resource_status_reason=reason,
            resource_properties=None,
        )
    )
    stack._add_stack_event("ROLLBACK_IN_PROGRESS", resource_status_reason="creation failed")
    stack._add_stack_event("ROLLBACK_COMPLETE")
    stack.status = "ROLLBACK_COMPLETE"


def test_deploy_refuses_a_stack_stuck_in_rollback_complete(moto_in_process: Any) -> None:
    table = unique()
    base = ["--table", table]
    assert run([*base, "deploy", "--no-deletion-protection"]).exit_code == 0
    stack = _moto_stack(moto_in_process, table)
    _fail(stack, "API: iam:CreatePolicy User is not authorized")
    events_before = len(stack.events)

    result = run([*base, "deploy", "--alarms"])
    assert result.exit_code == 1
    assert "ROLLBACK_COMPLETE" in result.stderr and "nothing was changed" in result.stderr
    assert f"zae-celery delete --stack {table}" in result.stderr
    assert "WorkerPolicy (AWS::IAM::ManagedPolicy) CREATE_FAILED" in result.stderr
    assert "not authorized" in result.stderr
    assert stack.status == "ROLLBACK_COMPLETE" and len(stack.events) == events_before

    result = run([*base, "status"])
    assert result.exit_code == 1
    assert "ROLLBACK_COMPLETE" in result.stdout and "not authorized" in result.stderr

    assert run([*base, "delete", "--yes"]).exit_code == 0
    result = run([*base, "deploy", "--no-deletion-protection"])
    assert result.exit_code == 0, result.output
    assert "created" in result.stdout


@pytest.mark.parametrize("keep", [False, True])
def test_failed_creation_prints_the_failing_events_and_leaves_nothing(
    moto_in_process: Any, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    from moto.cloudformation.models import Stack

    def failing_create(self: Any) -> None:
        self.status = "CREATE_IN_PROGRESS"
        _fail(self, "Resource handler returned message: quota exceeded")

    monkeypatch.setattr(Stack, "create_resources", failing_create)
    table = unique()
    args = ["--table", table, "deploy", "--no-deletion-protection"]
    result = run([*args, "--keep-failed"] if keep else args)
    assert result.exit_code == 1
    assert "creating stack" in result.stderr and "ROLLBACK_COMPLETE" in result.stderr
    assert "WorkerPolicy (AWS::IAM::ManagedPolicy) CREATE_FAILED" in result.stderr
    assert "quota exceeded" in result.stderr
    names = [s.name for s in moto_in_process.stacks.values()]
    tables = boto3.client("dynamodb").list_tables()["TableNames"]
    if keep:
        assert names == [table] and "zae-celery delete" in result.stderr
    else:
        assert names == [] and tables == []
        assert "empty stack was deleted" in result.stderr


# -- celery -A app zae ... ---------------------------------------------------------------------
@pytest.fixture
def celery_group() -> Iterator[click.Group]:
    """Celery's command line, with ``zae`` added if the entry point is not installed."""
    from celery.bin.celery import celery

    added = "zae" not in celery.commands
    if added:
        celery.add_command(celery_command, "zae")
    yield celery
    if added:
        celery.commands.pop("zae")


@pytest.mark.integration
def test_celery_zae_reads_the_apps_settings(
    celery_group: click.Group, moto: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    table = unique()
    monkeypatch.setattr(
        celery_app,
        "conf",
        {"zae_table_name": table, "zae_endpoint_url": moto.url, "zae_region": "eu-west-1"},
    )
    app = ["-A", "tests.test_cli:celery_app", "zae"]
    result = run([*app, "create-table"], group=celery_group)
    assert result.exit_code == 0, result.output
    assert f"Table {table} created at {moto.url}" in result.stdout
    result = run([*app, "limits", "set", "t", "--limit", "rpm=7/m"], group=celery_group)
    assert result.exit_code == 0, result.output
    limiter = RateLimiter(table, endpoint_url=moto.url, region="eu-west-1")
    assert limiter.get_limits("t") == [Limit.per_minute("rpm", 7)]
    # An option on the command line wins over the app's setting.
    result = run([*app, "--table", unique(), "limits", "get", "t"], group=celery_group)
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = run([*app, "limits", "get", "t"], group=celery_group)
    assert result.stdout.splitlines() == ["rpm=7/m"]
    limiter.delete_table()


@pytest.mark.integration
def test_celery_zae_reads_a_dynamodb_store_url(
    celery_group: click.Group, moto: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    table = unique()
    url = f"dynamodb://{table}?region=eu-west-1&endpoint_url={moto.url}"
    monkeypatch.setattr(celery_app, "conf", {"zae_store_url": url})
    app = ["-A", "tests.test_cli:celery_app", "zae"]
    result = run([*app, "create-table"], group=celery_group)
    assert result.exit_code == 0, result.output
    assert f"Table {table} created at {moto.url}" in result.stdout
    assert RateLimiter.from_url(url).get_limits("t") == []
    RateLimiter.from_url(url).delete_table()
    monkeypatch.setattr(celery_app, "conf", {"zae_store_url": "memory://x"})
    result = run([*app, "limits", "get", "t"], group=celery_group)
    assert result.exit_code == 2 and "zae_store_url" in result.stderr


@pytest.mark.integration
def test_celery_zae_reads_a_redis_store_url(
    celery_group: click.Group,
    redis: LocalServer,
    moto: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"redis://127.0.0.1:{redis.port}/3?prefix={unique()}"
    monkeypatch.setattr(celery_app, "conf", {"zae_store_url": url})
    app = ["-A", "tests.test_cli:celery_app", "zae"]
    try:
        result = run([*app, "limits", "set", "t", "--limit", "rpm=7/m"], group=celery_group)
        assert result.exit_code == 0, result.output
        assert RateLimiter.from_url(url).get_limits("t") == [Limit.per_minute("rpm", 7)]
        result = run([*app, "buckets", "t", "--limit", "rpm=7/m", "--json"], group=celery_group)
        assert result.exit_code == 0, result.output
        result = run([*app, "create-table"], group=celery_group)
        assert result.exit_code == 2 and "concerns a DynamoDB table" in result.stderr
        # A table option on the command line would silently leave the app's store.
        result = run([*app, "--region", "eu-west-1", "limits", "get", "t"], group=celery_group)
        assert result.exit_code == 2
        assert "zae_store_url names a Redis store, and --region" in result.stderr
        # --store on the command line wins over the app's settings, like the others.
        table = unique()
        other = f"dynamodb://{table}?region=eu-west-1&endpoint_url={moto.url}"
        result = run([*app, "--store", other, "create-table"], group=celery_group)
        assert result.exit_code == 0, result.output
        RateLimiter.from_url(other).delete_table()
    finally:
        RateLimiter.from_url(url).delete_table()


def test_celery_zae_refuses_a_bad_table_setting(
    celery_group: click.Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(celery_app, "conf", {"zae_table_name": "no spaces allowed"})
    result = run(
        ["-A", "tests.test_cli:celery_app", "zae", "limits", "get", "t"], group=celery_group
    )
    assert result.exit_code == 2
    assert "zae_table_name" in result.stderr


def test_celery_entry_point_is_registered() -> None:
    found = [e for e in importlib.metadata.entry_points(group="celery.commands") if e.name == "zae"]
    if not found:
        pytest.skip(
            "the 'celery.commands' entry point 'zae' is not installed: add it to pyproject.toml "
            "and reinstall (make does so when pyproject.toml changes)"
        )
    assert found[0].load() is celery_command


# -- one declaration of the settings, public names of the core ------------------------------
def test_the_global_options_are_the_declared_settings() -> None:
    assert [(o.flag, o.setting.name) for o in GLOBAL_OPTIONS] == [
        ("--table", "zae_table_name"),
        ("--region", "zae_region"),
        ("--endpoint-url", "zae_endpoint_url"),
        ("--store", "zae_store_url"),
    ]
    text = " ".join(run(["--help"]).stdout.split())
    for option in GLOBAL_OPTIONS:  # the option's help names the setting it sets
        assert f"setting {option.setting.name})" in text


def test_bad_global_options_are_refused_by_the_settings_checks() -> None:
    result = run(["--table", "ab", "--region", "us-east-1", "limits", "get", "x"])
    assert result.exit_code == 2
    table_allowed = next(o for o in GLOBAL_OPTIONS if o.flag == "--table").setting.check.allowed
    assert table_allowed in " ".join(result.stderr.split())


def test_celery_zae_refuses_a_bad_endpoint_setting_naming_it(
    celery_group: click.Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        celery_app, "conf", {"zae_table_name": "zae-cli", "zae_endpoint_url": "ftp://host"}
    )
    result = run(
        ["-A", "tests.test_cli:celery_app", "zae", "limits", "get", "t"], group=celery_group
    )
    assert result.exit_code == 2
    assert "zae_endpoint_url: 'ftp://host' is not an http:// or https:// URL" in result.stderr


def test_the_celery_layer_and_the_cli_import_only_public_names_of_the_core() -> None:
    """zae_celery.core exports what the other layers may use; submodules (core.bucket,
    core.limits...) are imported by their own name."""
    package = Path(__file__).resolve().parent.parent / "zae_celery"
    sources = [package / "task.py", package / "admission.py", package / "settings.py"]
    sources += sorted((package / "cli").glob("*.py"))
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "zae_celery.core":
                names = {alias.name for alias in node.names}
                private = names - set(zae_celery.core.__all__)
                assert not private, f"{path.name} imports {sorted(private)} from zae_celery.core"


# -- version and check -------------------------------------------------------------------------
@pytest.mark.integration
def test_version_and_check_compare_the_table_with_this_client(table: Endpoint) -> None:
    shown = run(local(table, "version", "--json"))
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["client_schema"] == SCHEMA_VERSION == data["table_schema"]
    assert data["client"] == importlib.metadata.version("zae-celery") and data["compatible"]
    checked = run(local(table, "check"))
    assert checked.exit_code == 0 and "compatible" in checked.output
    # A table stamped by another zae-celery's schema: check exits 3 and says what to do.
    ddb(table).update_item(
        TableName=table.table_name,
        Key={"PK": {"S": "#META"}, "SK": {"S": "#SCHEMA"}},
        UpdateExpression="SET version = :v",
        ExpressionAttributeValues={":v": {"N": str(SCHEMA_VERSION + 1)}},
    )
    checked = run(local(table, "check"))
    assert checked.exit_code == 3, checked.output
    assert f"version {SCHEMA_VERSION + 1}" in checked.output and "upgrade" in checked.output
    text = run(local(table, "version"))
    assert text.exit_code == 0 and f"schema version {SCHEMA_VERSION})" in text.output


@pytest.mark.integration
def test_check_of_an_unstamped_table_and_of_none(endpoint: Endpoint) -> None:
    missing = run(local(endpoint, "check"))
    assert missing.exit_code == 1, missing.output
    plain_table(endpoint, BillingMode="PAY_PER_REQUEST")
    try:
        checked = run(local(endpoint, "check"))
        assert checked.exit_code == 0 and "not stamped yet" in checked.output
    finally:
        ddb(endpoint).delete_table(TableName=endpoint.table_name)
