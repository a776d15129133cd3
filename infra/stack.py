"""Deploy, inspect and delete the zae-celery CloudFormation stack.

:class:`StackManager` wraps a CloudFormation client and a DynamoDB client (boto3, or
anything with the same methods). It refuses what would half-create or destroy something
(an existing table that the stack does not own, a renamed table, a stack stuck in
``ROLLBACK_COMPLETE``, a protected table) before it calls CloudFormation, and reports
the stack's failing events when CloudFormation fails.

>>> manager = StackManager(session.client("cloudformation"), session.client("dynamodb"))
... # doctest: +SKIP
>>> manager.deploy("limits-prod", {"TableName": "limits-prod"})  # doctest: +SKIP
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import template_text

__all__ = [
    "CAPABILITIES",
    "DEFAULTS",
    "DEFAULT_TABLE_NAME",
    "PARAMETERS",
    "StackConflict",
    "StackError",
    "StackEvent",
    "StackInfo",
    "StackManager",
    "StackNotFound",
    "check_stack_name",
    "check_table_name",
    "default_stack_name",
]

DEFAULT_TABLE_NAME = "zae-celery-limits"
"""The template's default table name (and the CLI's)."""

PARAMETERS = (
    "TableName",
    "PointInTimeRecovery",
    "StreamViewType",
    "DeletionProtection",
    "Environment",
    "Aggregator",
    "SnapshotWindows",
    "SnapshotRetentionDays",
    "AggregatorLogRetentionDays",
    "Alarms",
    "AlarmTopicArn",
    "ThrottledRequestsThreshold",
    "SystemErrorsThreshold",
    "UserErrorsThreshold",
)
"""The template's parameters, in the template's order (a test keeps them in sync)."""

DEFAULTS = {
    "TableName": DEFAULT_TABLE_NAME,
    "PointInTimeRecovery": "true",
    "StreamViewType": "NONE",
    "DeletionProtection": "true",
    "Environment": "",
    "Aggregator": "false",
    "SnapshotWindows": "hourly,daily",
    "SnapshotRetentionDays": "90",
    "AggregatorLogRetentionDays": "30",
    "Alarms": "false",
    "AlarmTopicArn": "",
    "ThrottledRequestsThreshold": "1",
    "SystemErrorsThreshold": "1",
    "UserErrorsThreshold": "10",
}
"""The template's parameter defaults, as strings (a test keeps them in sync)."""

CAPABILITIES = ["CAPABILITY_IAM"]
"""The stack creates IAM managed policies (with generated names)."""

_STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")

# Statuses a stack can be updated from; every other settled status needs a person.
UPDATABLE = {
    "CREATE_COMPLETE",
    "UPDATE_COMPLETE",
    "UPDATE_ROLLBACK_COMPLETE",
    "IMPORT_COMPLETE",
    "IMPORT_ROLLBACK_COMPLETE",
}
HEALTHY = UPDATABLE


class StackError(Exception):
    """CloudFormation could not do what was asked; ``events`` are the failing events."""

    def __init__(self, message: str, events: Iterable[StackEvent] = ()) -> None:
        super().__init__(message)
        self.events = list(events)


class StackNotFound(StackError):
    """There is no stack of that name in the region."""


class StackConflict(StackError):
    """The request conflicts with what exists; nothing was changed."""


@dataclass(frozen=True)
class StackEvent:
    """One stack event: a resource (or the stack itself) changing status."""

    event_id: str
    logical_id: str
    resource_type: str
    status: str
    reason: str
    timestamp: datetime | None = None
    physical_id: str = ""
    stack_name: str = ""

    def is_stack_event(self, stack_id: str) -> bool:
        """True for an event of the stack itself (not of one of its resources)."""
        return self.resource_type == "AWS::CloudFormation::Stack" and self.physical_id == stack_id

    @property
    def failed(self) -> bool:
        """True for a ``*_FAILED`` event."""
        return self.status.endswith("_FAILED")

    def line(self) -> str:
        """A one-line description, e.g. ``LimitsTable (AWS::DynamoDB::Table) CREATE_FAILED:
        reason``."""
        text = f"{self.logical_id} ({self.resource_type}) {self.status}"
        return f"{text}: {self.reason}" if self.reason else text


@dataclass(frozen=True)
class StackInfo:
    """What ``describe_stacks`` says about a stack."""

    stack_id: str
    name: str
    status: str
    reason: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    last_updated: datetime | None = None

    @property
    def in_progress(self) -> bool:
        """True while CloudFormation is still working on the stack."""
        return self.status.endswith("_IN_PROGRESS")

    @property
    def healthy(self) -> bool:
        """True when the stack is settled and usable (its last operation may have been
        rolled back, which leaves the previous, working state)."""
        return self.status in HEALTHY

    @property
    def table_name(self) -> str | None:
        """The table the stack manages."""
        return self.outputs.get("TableName") or self.parameters.get("TableName")


def default_stack_name(table_name: str) -> str:
    """The stack name used when none is given: the table name, made a valid stack name
    (``_`` and ``.`` become ``-``; a name not starting with a letter gets ``zae-``)."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", table_name)
    if not name[:1].isalpha():
        name = f"zae-{name}"
    return name[:128]


def check_stack_name(name: str) -> str:
    """A valid CloudFormation stack name, or ValueError saying what is allowed."""
    if not _STACK_NAME.match(name):
        raise ValueError(
            f"invalid stack name {name!r}: a letter, then letters, digits and dashes "
            "(at most 128 characters)"
        )
    return name


def check_table_name(name: str) -> str:
    """A valid DynamoDB table name, or ValueError saying what is allowed."""
    if not _TABLE_NAME.match(name):
        raise ValueError(
            f"invalid table name {name!r}: 3-255 letters, digits, underscores, dots or dashes"
        )
    return name


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _error_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message", ""))
    return str(exc)


class StackManager:
    """Create, update, inspect and delete the stack with a CloudFormation client.

    ``on_event`` is called with every new stack event while waiting (progress output).
    Waiting polls ``describe_stacks`` every ``poll_interval`` seconds, at most
    ``timeout`` seconds; ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(
        self,
        cloudformation: Any,
        dynamodb: Any,
        *,
        template: str | None = None,
        poll_interval: float = 5.0,
        timeout: float = 1800.0,
        on_event: Callable[[StackEvent], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cloudformation = cloudformation
        self.dynamodb = dynamodb
        self.template = template if template is not None else template_text()
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.on_event = on_event
        self._sleep = sleep
        self._clock = clock

    # -- reading --------------------------------------------------------------------------
    def describe(self, name_or_id: str) -> StackInfo | None:
        """The stack, or None when there is none of that name."""
        try:
            reply = self.cloudformation.describe_stacks(StackName=name_or_id)
        except Exception as exc:
            if _error_code(exc) == "ValidationError" and "does not exist" in _error_message(exc):
                return None
            raise
        stacks = reply.get("Stacks") or []
        if not stacks:
            return None
        s = stacks[0]
        return StackInfo(
            stack_id=s["StackId"],
            name=s["StackName"],
            status=s["StackStatus"],
            reason=s.get("StackStatusReason") or "",
            parameters={
                p["ParameterKey"]: p.get("ParameterValue", "") for p in s.get("Parameters", [])
            },
            outputs={o["OutputKey"]: o.get("OutputValue", "") for o in s.get("Outputs", [])},
            tags={t["Key"]: t["Value"] for t in s.get("Tags", [])},
            last_updated=s.get("LastUpdatedTime") or s.get("CreationTime"),
        )

    def events(self, stack_id: str) -> list[StackEvent]:
        """Every event of the stack, oldest first."""
        found: list[StackEvent] = []
        kwargs: dict[str, Any] = {"StackName": stack_id}
        while True:
            reply = self.cloudformation.describe_stack_events(**kwargs)
            for e in reply.get("StackEvents", []):
                found.append(
                    StackEvent(
                        event_id=str(e["EventId"]),
                        logical_id=e.get("LogicalResourceId", ""),
                        resource_type=e.get("ResourceType", ""),
                        status=e.get("ResourceStatus", ""),
                        reason=e.get("ResourceStatusReason") or "",
                        timestamp=e.get("Timestamp"),
                        physical_id=e.get("PhysicalResourceId") or "",
                        stack_name=e.get("StackName") or "",
                    )
                )
            token = reply.get("NextToken")
            if not token:
                break
            kwargs["NextToken"] = token
        found.reverse()  # CloudFormation lists the newest first
        return found

    def failed_events(self, stack_id: str, since: set[str] | None = None) -> list[StackEvent]:
        """The ``*_FAILED`` events of the stack (only those not in ``since``)."""
        return [
            e
            for e in self.events(stack_id)
            if e.failed and (since is None or e.event_id not in since)
        ]

    def table(self, table_name: str) -> dict[str, Any] | None:
        """``describe_table``'s description of the table, or None when it does not exist."""
        try:
            reply = self.dynamodb.describe_table(TableName=table_name)
        except Exception as exc:
            if _error_code(exc) == "ResourceNotFoundException":
                return None
            raise
        table: dict[str, Any] = reply["Table"]
        return table

    # -- changing -------------------------------------------------------------------------
    def deploy(
        self,
        name: str,
        parameters: Mapping[str, str],
        tags: Mapping[str, str] | None = None,
        *,
        keep_failed: bool = False,
    ) -> tuple[str, StackInfo]:
        """Create the stack, or update it, and wait until CloudFormation is done.

        ``parameters`` are the values given explicitly; on an update every other
        parameter keeps its previous value. Returns ``(action, info)`` where action is
        ``"created"``, ``"updated"`` or ``"unchanged"``. Raises :class:`StackConflict`
        (nothing changed) or :class:`StackError` (CloudFormation failed; a failed
        creation is rolled back and its empty stack deleted unless ``keep_failed``).
        """
        check_stack_name(name)
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"unknown template parameter(s): {', '.join(unknown)}")
        table_name = parameters.get("TableName", DEFAULT_TABLE_NAME)
        check_table_name(table_name)
        current = self.describe(name)
        if current is None:
            return self._create(name, table_name, parameters, tags, keep_failed)
        return self._update(current, table_name, parameters, tags)

    def _create(
        self,
        name: str,
        table_name: str,
        parameters: Mapping[str, str],
        tags: Mapping[str, str] | None,
        keep_failed: bool,
    ) -> tuple[str, StackInfo]:
        if self.table(table_name) is not None:
            raise StackConflict(
                f"table {table_name!r} already exists and no stack {name!r} manages it; "
                "nothing was created. Choose another table name (--table), delete that "
                "table, or import it into a stack with the CloudFormation console."
            )
        reply = self.cloudformation.create_stack(
            StackName=name,
            TemplateBody=self.template,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=CAPABILITIES,
            Tags=[{"Key": k, "Value": v} for k, v in (tags or {}).items()],
            OnFailure="ROLLBACK",
        )
        stack_id = reply["StackId"]
        final = self.wait(stack_id, set())
        if final.status == "CREATE_COMPLETE":
            return "created", final
        failed = self.failed_events(stack_id)
        message = f"creating stack {name!r} failed ({final.status})"
        if final.status == "ROLLBACK_COMPLETE" and not keep_failed:
            # A rolled-back creation leaves an empty stack that can only be deleted:
            # delete it so that the next deploy starts clean.
            seen = {e.event_id for e in self.events(stack_id)}
            self.cloudformation.delete_stack(StackName=stack_id)
            after = self.wait(stack_id, seen)
            if after.status == "DELETE_COMPLETE":
                message += "; CloudFormation rolled it back and the empty stack was deleted"
            else:
                message += (
                    f"; deleting the rolled-back stack ended in {after.status}: run "
                    f"'zae-celery delete --stack {name}'"
                )
        elif final.status == "ROLLBACK_COMPLETE":
            message += (
                f"; CloudFormation rolled it back. Inspect it, then run "
                f"'zae-celery delete --stack {name}' before deploying again"
            )
        raise StackError(message + ". Fix the cause shown by the events and deploy again.", failed)

    def _update(
        self,
        current: StackInfo,
        table_name: str,
        parameters: Mapping[str, str],
        tags: Mapping[str, str] | None,
    ) -> tuple[str, StackInfo]:
        name = current.name
        if current.status == "ROLLBACK_COMPLETE":
            raise StackConflict(
                f"stack {name!r} is in ROLLBACK_COMPLETE: its creation failed and "
                "CloudFormation cannot update it; nothing was changed. Run "
                f"'zae-celery delete --stack {name}', fix the cause shown by the events, "
                "and deploy again.",
                self.failed_events(current.stack_id),
            )
        if current.in_progress:
            raise StackConflict(
                f"stack {name!r} is busy ({current.status}); nothing was changed. Wait for "
                f"it to settle ('zae-celery status --stack {name}') and deploy again."
            )
        if current.status not in UPDATABLE:
            raise StackConflict(
                f"stack {name!r} is in {current.status} and cannot be updated; nothing was "
                "changed. Resolve it in the CloudFormation console (or delete it with "
                f"'zae-celery delete --stack {name}') and deploy again.",
                self.failed_events(current.stack_id),
            )
        managed = current.parameters.get("TableName")
        if managed is not None and managed != table_name:
            raise StackConflict(
                f"stack {name!r} manages table {managed!r}, not {table_name!r}; renaming "
                "would replace the table and lose its limits, so nothing was changed. Use "
                f"--table {managed}, or another --stack for a second table."
            )
        effective = {
            key: str(parameters[key]) if key in parameters else current.parameters[key]
            for key in PARAMETERS
            if key in parameters or key in current.parameters
        }
        effective["TableName"] = table_name
        if self._is_current(current, effective, tags):
            return "unchanged", current
        # A value equal to the template's default is left out (CloudFormation applies the
        # default, which is that value); the others are passed as values, which keeps
        # what was set before. (UsePreviousValue would do the same on AWS, but moto
        # resolves it only for values that were once passed explicitly.)
        values = [
            {"ParameterKey": key, "ParameterValue": value}
            for key, value in effective.items()
            if key == "TableName" or value != DEFAULTS.get(key)
        ]
        seen = {e.event_id for e in self.events(current.stack_id)}
        kwargs: dict[str, Any] = {
            "StackName": current.stack_id,
            "TemplateBody": self.template,
            "Parameters": values,
            "Capabilities": CAPABILITIES,
        }
        if tags:
            kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
        try:
            self.cloudformation.update_stack(**kwargs)
        except Exception as exc:
            if _error_code(exc) == "ValidationError" and "No updates" in _error_message(exc):
                return "unchanged", current
            raise
        final = self.wait(current.stack_id, seen)
        if final.status == "UPDATE_COMPLETE":
            return "updated", final
        raise StackError(
            f"updating stack {name!r} failed ({final.status})"
            + (
                "; CloudFormation restored the previous state"
                if final.status == "UPDATE_ROLLBACK_COMPLETE"
                else ""
            )
            + ". Fix the cause shown by the events and deploy again.",
            self.failed_events(current.stack_id, seen),
        )

    def _is_current(
        self, current: StackInfo, effective: Mapping[str, str], tags: Mapping[str, str] | None
    ) -> bool:
        """True when the stack already runs this template with these values and tags."""
        if any(current.parameters.get(k, DEFAULTS.get(k)) != v for k, v in effective.items()):
            return False
        if tags and dict(tags) != current.tags:
            return False
        body = self.cloudformation.get_template(StackName=current.stack_id).get("TemplateBody")
        return isinstance(body, str) and body == self.template

    def delete(self, name: str) -> StackInfo:
        """Delete the stack and its table, and wait. Refuses (nothing deleted) when the
        stack does not exist or its table has deletion protection."""
        check_stack_name(name)
        current = self.describe(name)
        if current is None:
            raise StackNotFound(f"there is no stack {name!r} in this region; nothing to delete.")
        if current.in_progress:
            raise StackConflict(
                f"stack {name!r} is busy ({current.status}); nothing was deleted. Wait for it "
                f"to settle ('zae-celery status --stack {name}') and try again."
            )
        table_name = current.table_name
        table = self.table(table_name) if table_name else None
        if table is not None and table.get("DeletionProtectionEnabled"):
            raise StackConflict(
                f"table {table_name!r} has deletion protection; nothing was deleted. Turn it "
                f"off first with 'zae-celery --table {table_name} deploy --stack {name} "
                "--no-deletion-protection', then delete again."
            )
        seen = {e.event_id for e in self.events(current.stack_id)}
        self.cloudformation.delete_stack(StackName=current.stack_id)
        final = self.wait(current.stack_id, seen)
        if final.status != "DELETE_COMPLETE":
            raise StackError(
                f"deleting stack {name!r} failed ({final.status}). Fix the cause shown by the "
                "events and delete again.",
                self.failed_events(current.stack_id, seen),
            )
        return final

    def wait(self, stack_id: str, seen: set[str]) -> StackInfo:
        """Poll until the stack settles; report new events to ``on_event``.

        ``seen`` holds the ids of the events from before the operation. The status is
        read from the newest stack event of this operation (a deleted stack is never
        described again: moto would re-create its resources to render the outputs).
        """
        before = set(seen)
        deadline = self._clock() + self.timeout
        while True:
            status, name = "", stack_id
            for event in self.events(stack_id):
                if event.event_id not in seen:
                    seen.add(event.event_id)
                    if self.on_event is not None:
                        self.on_event(event)
                if event.event_id not in before and event.is_stack_event(stack_id):
                    status, name = event.status, event.stack_name or name
            if status == "DELETE_COMPLETE":
                return StackInfo(stack_id=stack_id, name=name, status=status)
            if status and not status.endswith("_IN_PROGRESS"):
                info = self.describe(stack_id)
                if info is not None and not info.in_progress:
                    return info
            if self._clock() >= deadline:
                raise StackError(
                    f"stack {name!r} is still {status or 'starting'} after {self.timeout:.0f} "
                    f"s; CloudFormation keeps working: follow it with 'zae-celery status "
                    f"--stack {name}'."
                )
            # Polling a remote state machine at an interval; not a synchronisation stand-in.
            self._sleep(self.poll_interval)
