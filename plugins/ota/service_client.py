"""The attached service's MQTT client: amqtt's, acknowledging what a device sent only once it is handled.

amqtt's client answers a QoS 1 PUBLISH with PUBACK as soon as it is read: a service that then dies (a replica
killed in the middle of a campaign) loses what it had acknowledged and not handled yet, because the broker
counts it delivered. Here the PUBACK waits until the service says the message is handled (`acknowledge`);
what is unacknowledged when the connection ends stays in the service's persistent session, and the broker
delivers it again when that session is resumed (by the same service, or by a replica adopting the session of
one that died). PUBACKs still leave in the order their PUBLISHes came, as MQTT 3.1.1 requires (4.6): one
handled early waits for those before it.

A message may so be handled twice (handled, then the service died before its PUBACK left): the OTA service's
handling of an inform, a progress report or a pull is idempotent.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

from amqtt.client import MQTTClient
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.client_handler import ClientProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import INCOMING, IncomingApplicationMessage, OutgoingApplicationMessage


class _AckWhenHandled(ClientProtocolHandler):
    """amqtt's client handler with the PUBACK of an incoming QoS 1 message left to `acknowledge`. Never
    constructed: `ServiceClient` gives amqtt's handler this class as it is made (below), so it has no
    `__init__` of its own and keeps its state in `_unacked`, made on first use."""

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != INCOMING or app_message.packet_id is None or self.session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        self._waiting().append([app_message, False])
        await self.session.delivered_message_queue.put(app_message)

    def _waiting(self) -> deque[list[Any]]:
        waiting: deque[list[Any]] | None = self.__dict__.get("_unacked")
        if waiting is None:
            waiting = self.__dict__["_unacked"] = deque()
        return waiting

    async def acknowledge(self, message: IncomingApplicationMessage) -> None:
        """`message` is handled: send its PUBACK, and those of the handled messages that came after it and
        waited for it. A connection that is gone sends nothing (the broker delivers them again)."""
        waiting = self._waiting()
        for entry in waiting:
            if entry[0] is message:
                entry[1] = True
                break
        else:
            return
        while waiting and waiting[0][1]:
            done: IncomingApplicationMessage = waiting.popleft()[0]
            packet_id = done.packet_id
            assert packet_id is not None
            with contextlib.suppress(Exception):  # the connection closed: nothing to answer on
                await self._send_packet(PubackPacket.build(packet_id))

    @property
    def unacknowledged(self) -> int:
        return len(self._waiting())


class ServiceClient(MQTTClient):
    """amqtt's `MQTTClient` whose incoming QoS 1 messages are acknowledged by `acknowledge`, after handling.

    amqtt makes a new protocol handler inside `connect` and offers no way to choose its class; this client
    gives the handler its class as amqtt stores it, before the connection reads anything (a resumed session's
    messages come right behind the CONNACK). The subclass adds methods only, no state of amqtt's."""

    @property
    def _handler(self) -> ClientProtocolHandler | None:
        handler: ClientProtocolHandler | None = self.__dict__.get("_service_handler")
        return handler

    @_handler.setter
    def _handler(self, handler: ClientProtocolHandler | None) -> None:
        if handler is not None and type(handler) is ClientProtocolHandler:
            handler.__class__ = _AckWhenHandled
        self.__dict__["_service_handler"] = handler

    async def acknowledge(self, message: Any) -> None:
        """`message`, delivered by `deliver_message`, is handled: acknowledge it (a QoS 0 message has nothing
        to acknowledge; one from an earlier connection is the broker's to deliver again)."""
        handler = self._handler
        if (
            isinstance(handler, _AckWhenHandled)
            and isinstance(message, IncomingApplicationMessage)
            and message.qos == QOS_1
        ):
            await handler.acknowledge(message)

    @property
    def unacknowledged(self) -> int:
        """Messages delivered on this connection and not acknowledged yet."""
        handler = self._handler
        return handler.unacknowledged if isinstance(handler, _AckWhenHandled) else 0
