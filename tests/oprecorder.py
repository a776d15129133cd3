"""Record the DynamoDB permissions the engine uses, per engine flow, across a test session.

Loaded as a pytest plugin (``pytest_plugins = ["tests.oprecorder"]`` in conftest.py) it
wraps botocore's and aiobotocore's ``_make_api_call`` for the whole session. Every
DynamoDB request sent while a ``RateLimiter`` or ``AsyncRateLimiter`` runs an engine
flow is recorded under the flow's name (``acquire``, ``adjust``, ``release``,
``available``, ``set_limits``...) as the IAM actions it needs: a TransactWriteItems
needs the action of each item in it (``Update`` -> ``dynamodb:UpdateItem``; a
``ConditionCheck`` -> ``dynamodb:ConditionCheckItem``), since IAM has no action of its own
for it. Requests made outside an engine flow are recorded under :data:`OUTSIDE`.

At the end of the session the plugin fails the run if a worker flow used an action that
the template's worker policy does not grant (tests/test_infra.py checks the converse on
a scripted run). :func:`recording` installs the same hooks for one block when the
plugin is not loaded (a test file run on its own).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from types import CodeType, FrameType
from typing import Any

import pytest

WORKER_FLOWS = frozenset({"acquire", "adjust", "release", "available", "start", "block"})
"""Engine flows a worker runs: ``acquire``/``reserve``, ``lease.adjust``, rollback,
``available``, ``start`` (a reservation's start) and ``block`` (a provider's 429)."""
ADMIN_FLOWS = frozenset(
    {
        "create_entity",
        "set_limits",
        "get_limits",
        "stored_limits",
        "delete_limits",
        "buckets",
        "schema_version",
        "ensure_schema",
    }
)
"""Engine flows of limit and entity management and reading (the CLI's ``limits``,
``entity``, ``buckets``, the schema version ``status`` shows, and ``upgrade``'s stamp)."""
TABLE_FLOWS = frozenset({"create_table", "delete_table"})
"""Engine flows that create or delete the table (local endpoints and tests only)."""
OUTSIDE = ""
"""Where requests made outside any engine flow (the CLI's own, tests') are recorded."""

_TRANSACT_ACTIONS = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
    "Get": "GetItem",
}


def iam_actions(operation: str, params: Mapping[str, Any]) -> set[str]:
    """The IAM actions one DynamoDB request needs."""
    if operation in ("TransactWriteItems", "TransactGetItems"):
        actions = set()
        for entry in params.get("TransactItems", []):
            for kind in entry:
                actions.add(f"dynamodb:{_TRANSACT_ACTIONS[kind]}")
        return actions
    return {f"dynamodb:{operation}"}


class _Store:
    """Session-wide: flow name -> IAM actions, and the raw operation names."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.actions: dict[str, set[str]] = defaultdict(set)
        self.operations: dict[str, set[str]] = defaultdict(set)
        self.clients: set[str] = set()
        self.sinks: list[_Store] = []

    def add(self, flow: str, operation: str, actions: set[str], client: str) -> None:
        with self.lock:
            self.actions[flow] |= actions
            self.operations[flow].add(operation)
            if flow != OUTSIDE:
                self.clients.add(client)
            sinks = list(self.sinks)
        for sink in sinks:
            sink.add(flow, operation, actions, client)

    def worker_actions(self) -> set[str]:
        with self.lock:
            return set().union(*(self.actions[f] for f in WORKER_FLOWS if f in self.actions))

    def flows(self) -> set[str]:
        with self.lock:
            return set(self.actions)


SESSION = _Store()
_state = {"installs": 0, "plugin": False}
_originals: dict[str, Any] = {}


def _drive_codes() -> tuple[CodeType, ...]:
    from zae_celery.core import aio, limiter

    return (limiter.drive.__code__, aio.drive.__code__)


def _engine_flow(frame: FrameType | None) -> str | None:
    """The name of the engine flow being driven on this stack (outermost), if any."""
    codes = _drive_codes()
    found = None
    while frame is not None:
        if frame.f_code in codes:
            flow = frame.f_locals.get("flow")
            code = getattr(flow, "gi_code", None)
            # The drivers run each flow inside resilience.guard(flow, ...): name the flow
            # it wraps, not the wrapper.
            while code is not None and code.co_name == "guard":
                inner = getattr(flow, "gi_frame", None)
                flow = inner.f_locals.get("flow") if inner is not None else None
                code = getattr(flow, "gi_code", None)
            if code is not None:
                found = code.co_name
        frame = frame.f_back
    return found


def _record(client: Any, operation: str, params: Mapping[str, Any], kind: str) -> None:
    try:
        service = client.meta.service_model.service_name
    except AttributeError:  # pragma: no cover - not a botocore client
        return
    if service != "dynamodb":
        return
    flow = _engine_flow(sys._getframe(2))
    actions = iam_actions(operation, params)
    SESSION.add(OUTSIDE if flow is None else flow, operation, actions, kind)


def install() -> None:
    """Wrap botocore's (and aiobotocore's) ``_make_api_call`` (reference counted)."""
    _state["installs"] += 1
    if _state["installs"] > 1:
        return
    from botocore.client import BaseClient

    original = BaseClient._make_api_call
    _originals["botocore"] = original

    def make_api_call(self: Any, operation_name: str, api_params: Any) -> Any:
        _record(self, operation_name, api_params, "boto3")
        return original(self, operation_name, api_params)

    BaseClient._make_api_call = make_api_call
    try:
        from aiobotocore.client import AioBaseClient
    except ImportError:  # pragma: no cover - aiobotocore is a dev dependency
        return
    aio_original = AioBaseClient._make_api_call
    _originals["aiobotocore"] = aio_original

    async def aio_make_api_call(self: Any, operation_name: str, api_params: Any) -> Any:
        _record(self, operation_name, api_params, "aiobotocore")
        return await aio_original(self, operation_name, api_params)

    AioBaseClient._make_api_call = aio_make_api_call


def uninstall() -> None:
    """Undo :func:`install` once its last user is done."""
    _state["installs"] -= 1
    if _state["installs"] > 0:
        return
    from botocore.client import BaseClient

    BaseClient._make_api_call = _originals.pop("botocore")
    if "aiobotocore" in _originals:
        from aiobotocore.client import AioBaseClient

        AioBaseClient._make_api_call = _originals.pop("aiobotocore")


def plugin_active() -> bool:
    """True when the plugin records the whole session (loaded from conftest.py)."""
    return bool(_state["plugin"])


@contextlib.contextmanager
def recording() -> Iterator[_Store]:
    """Record the engine's requests made inside the block into a store of its own
    (and into the session's)."""
    local = _Store()
    install()
    with SESSION.lock:
        SESSION.sinks.append(local)
    try:
        yield local
    finally:
        with SESSION.lock:
            SESSION.sinks.remove(local)
        uninstall()


# -- the pytest plugin -------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    """Start recording for the whole session."""
    _state["plugin"] = True
    install()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop recording."""
    if _state["plugin"]:
        _state["plugin"] = False
        uninstall()


def template_document() -> dict[str, Any]:
    """The CloudFormation template as plain data (short-form tags become ``Fn::``)."""
    from cfnlint.decode import decode_str  # type: ignore[import-untyped]

    from zae_celery.infra import template_text

    template, problems = decode_str(template_text())
    assert not problems, problems
    return dict(template)


def policy_actions(resource: str) -> set[str]:
    """Every action a managed policy of the template (``WorkerPolicy``...) grants."""
    document = template_document()["Resources"][resource]["Properties"]["PolicyDocument"]
    actions: set[str] = set()
    for statement in document["Statement"]:
        granted = statement["Action"]
        actions.update([granted] if isinstance(granted, str) else granted)
    return actions


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a worker flow used an action the worker policy lacks."""
    if not _state["plugin"]:
        return
    used = SESSION.worker_actions()
    if not used:
        return
    missing = used - policy_actions("WorkerPolicy")
    if missing:
        session.config.stash[_MISSING] = missing
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_MISSING = pytest.StashKey[set[str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Report what the worker policy is missing."""
    missing = config.stash.get(_MISSING, None)
    if missing:
        terminalreporter.section("worker IAM policy", sep="=", red=True)
        terminalreporter.line(
            "The engine's worker flows used DynamoDB actions that the worker policy in "
            f"infra/templates/table.yaml does not grant: {', '.join(sorted(missing))}",
            red=True,
        )
