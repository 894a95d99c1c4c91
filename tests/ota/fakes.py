"""Stateful fakes for service tests: a movable clock and a device channel that records what it sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from typing import Any

from plugins.ota.core.messages import Outgoing
from plugins.ota.core.topics import DeviceRef, topic_name


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeChannel:
    """Devices online or not, each with a session start time; records what was sent to whom."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sessions: dict[DeviceRef, float] = {}
        self.sent: list[tuple[DeviceRef, str, dict[str, Any]]] = []

    def connect(self, device: DeviceRef) -> None:
        self.sessions[device] = self.clock()

    def is_online(self, device: DeviceRef) -> bool:
        return device in self.sessions

    def session_started_at(self, device: DeviceRef) -> float | None:
        return self.sessions.get(device)

    async def send(self, device: DeviceRef, message: Outgoing) -> bool:
        if device not in self.sessions:
            return False
        self.sent.append((device, topic_name(message.kind, device), json.loads(message.payload)))
        return True

    async def disconnect(self, device: DeviceRef) -> None:
        self.sessions.pop(device, None)

    def notices(self, device: DeviceRef) -> list[dict[str, Any]]:
        return [p for d, t, p in self.sent if d == device and t.startswith("/ota/device/upgrade/")]

    def notified(self) -> list[DeviceRef]:
        """Every device that got at least one push notice, in the order of their first notice."""
        return list(dict.fromkeys(d for d, t, _ in self.sent if t.startswith("/ota/device/upgrade/")))

    def notice_count(self) -> int:
        return sum(1 for _, t, _ in self.sent if t.startswith("/ota/device/upgrade/"))


async def chunks_of(data: bytes) -> AsyncIterable[bytes]:
    """`data` as the async stream FirmwareStore.put takes."""
    yield data
