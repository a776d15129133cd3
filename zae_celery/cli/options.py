"""What the commands share: where they act (:class:`Target`), the global options
(``--table``, ``--region``, ``--endpoint-url`` and ``--store``: the settings
``zae_table_name``, ``zae_region``, ``zae_endpoint_url`` and ``zae_store_url``, checked by
their declarations in :mod:`zae_celery.settings`), and the callbacks of options and
arguments (limits in the grammar of :meth:`Limit.parse <zae_celery.core.Limit.parse>`,
ids, KEY=VALUE pairs)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from zae_celery.cli.errors import NO_CREDENTIALS, NO_REGION, OperationalError
from zae_celery.core import Limit, RateLimiter, ValidationError, check_id
from zae_celery.core.stores import DEFAULT_LOCAL_REGION, StoreUrl, client_config
from zae_celery.infra.stack import StackManager
from zae_celery.settings import ENDPOINT_URL, REGION, STORE_URL, TABLE_NAME, Setting

__all__ = [
    "CONTEXT",
    "GLOBAL_OPTIONS",
    "TABLE_OPTIONS",
    "GlobalOption",
    "Target",
    "format_limit",
    "global_options",
    "id_argument",
    "limits_option",
    "pairs",
    "parse_limit",
    "pass_target",
    "problem",
    "resource_option",
    "scope",
    "windows_option",
]

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
"""The context settings of every command."""


def problem(exc: ValidationError) -> str:
    """A ValidationError for a command line: what is wrong and what is allowed (the
    option or argument is named by click)."""
    return f"{exc.problem} (allowed: {exc.allowed})" if exc.allowed else exc.problem


# -- where the commands act ---------------------------------------------------------------
@dataclass
class Target:
    """Where the commands act: the table, region and endpoint (values of the settings
    ``zae_table_name``, ``zae_region`` and ``zae_endpoint_url``, checked by their
    declarations; see :data:`GLOBAL_OPTIONS`) and the AWS profile; or a Redis store
    (``store_url``; ``table`` is then its prefix), on which the commands that concern a
    DynamoDB table refuse to run (:meth:`need_table`)."""

    table: str
    region: str | None
    endpoint_url: str | None
    profile: str | None = None
    store_url: str | None = None
    """A Redis store's URL (a ``dynamodb://`` URL becomes table, region and endpoint)."""
    _session: Any = field(default=None, repr=False)

    @classmethod
    def checked(
        cls, table: Any, region: Any, endpoint_url: Any, profile: str | None = None
    ) -> Target:
        """A target whose table, region and endpoint pass their settings' checks
        (ValidationError naming the setting)."""
        return cls(
            table=TABLE_NAME.validate(table),
            region=REGION.validate(region),
            endpoint_url=ENDPOINT_URL.validate(endpoint_url),
            profile=profile,
        )

    @classmethod
    def from_store_url(
        cls,
        url: Any,
        region: Any = None,
        endpoint_url: Any = None,
        profile: str | None = None,
        name: str = STORE_URL.name,
    ) -> Target:
        """The target a store URL names: a ``dynamodb://`` URL is the table, region and
        endpoint (``region`` and ``endpoint_url`` fill in what it leaves out), a redis
        URL a Redis store. A bad URL, or a ``memory://`` one (this process's memory holds
        nothing of the workers'), is a ValidationError naming ``name``."""
        parsed = StoreUrl.parse(url, name)
        if parsed.kind == "memory":
            raise ValidationError(
                name,
                f"{url!r} is this process's memory, which holds nothing of the workers'",
                "a dynamodb:// or a redis URL",
            )
        if parsed.kind == "dynamodb":
            return cls.checked(
                parsed.name, parsed.region or region, parsed.endpoint_url or endpoint_url, profile
            )
        return cls(parsed.name, None, None, profile, store_url=str(url))

    @property
    def redis(self) -> bool:
        """True when the buckets are on a Redis store, not in a DynamoDB table."""
        return self.store_url is not None

    def where(self) -> str:
        """The endpoint, for messages (never a password)."""
        if self.store_url is not None:
            parsed = StoreUrl.parse(self.store_url)
            parts = urlsplit(parsed.endpoint_url or "")
            kind = "Redis Cluster" if parsed.cluster else "Redis"
            server = f"{parts.hostname}:{parts.port or 6379}{parts.path}"
            return f"{kind} at {server} (prefix {self.table})"
        return self.endpoint_url or (f"AWS ({self.region})" if self.region else "AWS")

    def need_table(self, command: str) -> None:
        """Refuse ``command`` (exit code 2) on a Redis store: it concerns a DynamoDB table
        or its stack, and a Redis store has neither."""
        if self.store_url is not None:
            raise click.UsageError(
                f"'{command}' concerns a DynamoDB table and its stack; the store is "
                f"{self.where()}, which needs neither: the engine stamps its schema under "
                "the prefix on first use. 'limits', 'entity', 'buckets' and 'status' work "
                "on it."
            )

    def session(self) -> Any:
        """The boto3 session (profile applied)."""
        if self._session is None:
            import boto3
            from botocore.exceptions import ProfileNotFound

            try:
                self._session = boto3.session.Session(profile_name=self.profile)
            except ProfileNotFound as exc:
                raise click.UsageError(
                    f"AWS profile {self.profile!r} not found: pass an existing --profile "
                    "(see 'aws configure list-profiles') or unset AWS_PROFILE"
                ) from exc
        return self._session

    @property
    def local(self) -> bool:
        """True when DynamoDB is reached through an explicit endpoint (not AWS itself)."""
        return bool(self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB"))

    def resolved_region(self) -> str:
        """The region: --region, AWS_REGION, the profile's, or us-east-1 on local endpoints."""
        region = self.region or self.session().region_name
        if region:
            return str(region)
        if self.local:
            return DEFAULT_LOCAL_REGION
        raise click.UsageError(NO_REGION)

    def check_ready(self) -> str:
        """Check region and credentials before any request; returns the region."""
        region = self.resolved_region()
        if self.session().get_credentials() is None:
            raise OperationalError(NO_CREDENTIALS)
        self.region = region
        return region

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` at the configured endpoint and region."""
        region = self.check_ready()
        kwargs: dict[str, Any] = {"region_name": region, "config": client_config()}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        return self.session().client(service, **kwargs)

    def limiter(self) -> RateLimiter:
        """The engine on the configured table or Redis store."""
        if self.store_url is not None:
            return RateLimiter.from_url(self.store_url)
        region = self.check_ready()
        return RateLimiter(
            self.table, endpoint_url=self.endpoint_url, region=region, session=self.session()
        )

    def stack_manager(self, **kwargs: Any) -> StackManager:
        """A :class:`StackManager` with CloudFormation and DynamoDB clients."""
        return StackManager(self.client("cloudformation"), self.client("dynamodb"), **kwargs)


pass_target = click.make_pass_decorator(Target)
"""Passes the command's :class:`Target` (set up by the group's global options)."""


# -- global options ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GlobalOption:
    """A global option of the command line that sets a ``zae_`` setting."""

    setting: Setting[Any]
    flag: str
    envvars: tuple[str, ...]
    help: str
    fallback: str = ""
    """Where the value comes from when neither the option nor the environment gives it."""

    @property
    def param(self) -> str:
        """The option's parameter name (``--endpoint-url``: ``endpoint_url``)."""
        return self.flag.removeprefix("--").replace("-", "_")

    def option(self, default: str | None) -> Callable[[F], F]:
        """The click option, checked by the setting's declaration."""
        setting = self.setting

        def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
            if value is None:
                return None
            try:
                return setting.validate(value)
            except ValidationError as exc:
                raise click.BadParameter(problem(exc), ctx=ctx, param=param) from None

        envs = ", ".join(self.envvars) + (f", or {self.fallback}" if self.fallback else "")
        return click.option(
            self.flag,
            envvar=list(self.envvars),
            default=default,
            show_default=default is not None,
            callback=check,
            help=f"{self.help} (env {envs}; setting {setting.name}).",
        )


GLOBAL_OPTIONS: tuple[GlobalOption, ...] = (
    GlobalOption(TABLE_NAME, "--table", ("ZAE_TABLE_NAME",), "DynamoDB table"),
    GlobalOption(
        REGION, "--region", ("AWS_REGION", "AWS_DEFAULT_REGION"), "AWS region", "the profile's"
    ),
    GlobalOption(
        ENDPOINT_URL,
        "--endpoint-url",
        ("AWS_ENDPOINT_URL",),
        "Endpoint of DynamoDB/CloudFormation, e.g. a local server",
    ),
    GlobalOption(
        STORE_URL,
        "--store",
        ("ZAE_STORE_URL",),
        "The store as one URL, instead of --table, --region and --endpoint-url: "
        "dynamodb://TABLE?region=...&endpoint_url=..., or a Redis store, "
        "redis://HOST:PORT/DB?prefix=NAME",
    ),
)
"""The global options that set ``zae_`` settings, checked by the settings' declarations."""
TABLE_OPTIONS = GLOBAL_OPTIONS[:3]
"""The options that name a DynamoDB table: ``--store`` is given instead of them."""


def global_options(default_table: str | None) -> Callable[[F], F]:
    """``--table``, ``--region``, ``--endpoint-url``, ``--store`` (:data:`GLOBAL_OPTIONS`)
    and ``--profile``; ``default_table`` is the default of ``--table``."""

    def decorate(f: F) -> F:
        options = [
            o.option(default_table if o.setting is TABLE_NAME else None) for o in GLOBAL_OPTIONS
        ]
        options.append(
            click.option("--profile", envvar="AWS_PROFILE", help="AWS profile (env AWS_PROFILE).")
        )
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


# -- limits, ids and pairs --------------------------------------------------------------------
def parse_limit(text: str) -> Limit:
    """A limit from its command-line form ``NAME=AMOUNT/PERIOD[:capacity=N][:burst=N]``:
    :meth:`Limit.parse <zae_celery.core.Limit.parse>`, the grammar Celery's ``rate_limit``
    strings share (ValidationError, a ValueError, on bad input)."""
    return Limit.parse(text)


def format_limit(limit: Limit) -> str:
    """The command-line form of a limit: :meth:`Limit.format <zae_celery.core.Limit.format>`."""
    return limit.format()


def limits_option(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[Limit]:
    """Callback of a repeatable ``--limit SPEC``: the limits, each name once."""
    limits: list[Limit] = []
    for value in values:
        try:
            limits.append(Limit.parse(value, field="--limit"))
        except ValidationError as exc:
            raise click.BadParameter(problem(exc), ctx=ctx, param=param) from None
    names = [lim.name for lim in limits]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise click.BadParameter(
            f"limit {', '.join(duplicates)} given twice; give each name once", ctx=ctx, param=param
        )
    return limits


def id_argument(field_name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Callback of an entity or resource id (the engine's rules)."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check_id(field_name, value)
        except ValidationError as exc:
            raise click.BadParameter(
                f"{value[:60]!r}: 1-256 letters, digits and _ . : @ / + = , - "
                "(not starting with punctuation; no # or *)",
                ctx=ctx,
                param=param,
            ) from exc

    return check


def pairs(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    """Callback of a repeatable ``KEY=VALUE`` option."""
    result: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", ctx=ctx, param=param)
        result[key.strip()] = val
    return result


resource_option = click.option(
    "--resource",
    callback=id_argument("resource"),
    help="The resource (e.g. a model); default: every resource of the entity.",
)
"""``--resource``: one resource of the entity (default: every resource)."""


def scope(entity: str, resource: str | None) -> str:
    """An entity and resource, for messages."""
    return f"{entity} / {resource if resource is not None else '* (every resource)'}"


def windows_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, ...] | None:
    """A comma-separated list of usage snapshot windows, checked (None: not given)."""
    if value is None:
        return None
    from zae_celery.accounting.stream import check_windows

    try:
        return check_windows(value.split(","))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
