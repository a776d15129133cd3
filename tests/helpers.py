"""Test helpers shared by the engine tests: an injected clock and a request counter."""

from __future__ import annotations

from typing import Any

T0 = 1_800_000_000.0


class Clock:
    """A settable clock counting whole milliseconds (no float drift across advances)."""

    def __init__(self, t: float = T0) -> None:
        self.ms = round(t * 1000)

    def __call__(self) -> float:
        return (self.ms + 0.5) / 1000  # mid-millisecond: the engine floors to self.ms

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


class Counter:
    """Counts the DynamoDB operations a client sends."""

    def __init__(self, client: Any) -> None:
        self.ops: list[str] = []
        client.meta.events.register("before-send.dynamodb.*", self._seen)

    def _seen(self, event_name: str, **_: Any) -> None:
        self.ops.append(event_name.rsplit(".", 1)[-1])

    def take(self) -> list[str]:
        ops, self.ops = self.ops, []
        return ops
