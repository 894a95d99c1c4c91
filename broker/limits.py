"""`broker.limits.MqttLimits`: the broker's MQTT limits, set in config.yaml's `plugins:` section.

amqtt's own configuration is strict (unknown top-level keys are refused), so the limits travel as a plugin
entry; `amqtt -c config.yaml` loads it too, and it installs the strict packet reader there as well.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from broker import keepalive, protocol, session_state


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
                raise ValueError(
                    f"broker.limits.MqttLimits: {f.name} must be a positive number, not {value!r}"
                )

    def limits(self) -> protocol.Limits:
        return protocol.Limits(
            max_packet_size=int(self.max_packet_size_kb) * 1024,
            max_inflight_messages=int(self.max_inflight_messages),
            max_queued_messages=int(self.max_queued_messages),
            max_incoming_qos2=int(self.max_incoming_qos2),
            retry_interval_s=float(self.retry_interval_s),
        )


def apply(config: LimitsConfig | dict[str, Any] | None) -> protocol.Limits:
    """Install the keep-alive rules and the strict reader with these limits (for every broker in the process)."""
    if not isinstance(config, LimitsConfig):
        config = LimitsConfig(**(config or {}))
    limits = config.limits()
    keepalive.install()
    keepalive.CONNECT_DEADLINE_S = float(config.connect_timeout_s)
    protocol.install(limits)
    session_state.install()
    return limits


class MqttLimits(BasePlugin[BrokerContext]):  # type: ignore[misc]
    Config = LimitsConfig

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        apply(self.config)
