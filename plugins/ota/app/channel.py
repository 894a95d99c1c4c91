"""How the app layer reaches devices: the `DeviceChannel` protocol (the amqtt plugin implements it)."""

from __future__ import annotations

from typing import Protocol

from plugins.ota.core.messages import Outgoing
from plugins.ota.core.topics import DeviceRef


class DeviceChannel(Protocol):
    """How the service reaches devices (the amqtt plugin in the product, a fake in service tests)."""

    def is_online(self, device: DeviceRef) -> bool: ...

    def session_started_at(self, device: DeviceRef) -> float | None:
        """When the device's current session began (None when it has none)."""
        ...

    async def send(self, device: DeviceRef, message: Outgoing) -> bool:
        """Deliver to the device's own session (whether or not it subscribed; at `message.qos` then), and
        to other subscribers of its topic at the QoS they were granted; False when the device is offline."""
        ...

    async def disconnect(self, device: DeviceRef) -> None:
        """Close the device's connections (it was disabled, deleted or given a new secret)."""
        ...
