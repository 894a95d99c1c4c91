"""The broker's MQTT limits in config.yaml: the `plugins:` entry `broker.limits.MqttLimits`.

amqtt's own configuration is strict (unknown top-level keys are refused), so the limits travel as a plugin
entry. `HardenedBroker` reads them from its configuration (`limits_of`); each broker has its own, and the
plugin itself does nothing but carry and check them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from broker.protocol import Limits

PLUGIN_KEY = "broker.limits.MqttLimits"


@dataclass
class LimitsConfig:
    """Keys of `broker.limits.MqttLimits` in config.yaml, with their defaults."""

    max_packet_size_kb: int = 1024  # larger packets close the connection
    connect_timeout_s: float = 10.0  # a new connection must send CONNECT within this
    max_inflight_messages: int = 20  # outgoing QoS 1/2 messages awaiting acknowledgement, per client
    max_queued_messages: int = 1000  # outgoing QoS 1/2 messages queued behind those, or while offline
    max_incoming_qos2: int = 100  # received QoS 2 messages awaiting PUBREL, per client
    retry_interval_s: float = 20.0  # resend an unacknowledged QoS 1/2 message (DUP set) after this

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{PLUGIN_KEY}: {f.name} must be a positive number, not {value!r}")

    def limits(self) -> Limits:
        return Limits(
            max_packet_size=int(self.max_packet_size_kb) * 1024,
            max_inflight_messages=int(self.max_inflight_messages),
            max_queued_messages=int(self.max_queued_messages),
            max_incoming_qos2=int(self.max_incoming_qos2),
            retry_interval_s=float(self.retry_interval_s),
            connect_timeout_s=float(self.connect_timeout_s),
        )


def limits_of(config: Any) -> Limits:
    """The limits in an amqtt configuration (a mapping, or amqtt's `BrokerConfig`); defaults without an
    entry. Raises ValueError (or TypeError for an unknown key) for a bad entry."""
    plugins = config.get("plugins") if isinstance(config, Mapping) else getattr(config, "plugins", None)
    entry = (plugins or {}).get(PLUGIN_KEY) if isinstance(plugins, Mapping) else None
    if isinstance(entry, LimitsConfig):
        return entry.limits()
    return LimitsConfig(**(entry or {})).limits()


class MqttLimits(BasePlugin[BrokerContext]):  # type: ignore[misc]
    """The config.yaml entry of the limits: amqtt checks it against `LimitsConfig` when it loads the
    plugins; `HardenedBroker` applies it to itself."""

    Config = LimitsConfig
