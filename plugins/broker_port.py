"""What a plugin may use of the broker it runs in: ota-broker's broker (`broker.hardened.HardenedBroker`)
implements this and hands itself to every plugin that defines `bind_broker(broker)`, once the plugin's
constructor has run. Plugins touch nothing else of amqtt's broker, handlers or plugin manager.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

_P = TypeVar("_P")


class LatencyCounts(Protocol):
    """A latency histogram the broker keeps: cumulative (upper bound in seconds, count), and the sum."""

    total_s: float

    def cumulative(self) -> list[tuple[float, int]]: ...


class MqttBroker(Protocol):
    delivered_count: int  # messages handed to subscribers' connections
    connack_latency: LatencyCounts  # CONNECT read -> CONNACK sent
    puback_latency: LatencyCounts  # QoS 1 PUBLISH read -> PUBACK sent

    def connection(self, client_id: str) -> tuple[Any, Any] | None:
        """The session of `client_id` and the handler of its latest connection, or None."""
        ...

    def is_connected(self, session: Any) -> bool: ...

    def is_subscribed(self, session: Any, topic: str) -> bool:
        """Whether `session` holds a subscription matching `topic`."""
        ...

    def deliver(self, session: Any, topic: str, payload: bytes, qos: int) -> bool:
        """Send to `session`'s connection at `qos` whether or not it subscribed; False when not connected."""
        ...

    def pending(self, session: Any) -> list[tuple[str, bytes]]:
        """(topic, payload) of what `session` holds unacknowledged or queued, oldest first."""
        ...

    def end_connection(self, handler: Any) -> None:
        """Close a client's connection at any point after it authenticated."""
        ...

    def find_plugin(self, kind: type[_P]) -> _P | None:
        """The first loaded plugin that is a `kind` (a class or a runtime-checkable protocol)."""
        ...
