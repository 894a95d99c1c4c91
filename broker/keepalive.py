"""Keep-alive and CONNECT deadlines for amqtt 0.12.1 (MQTT-3.1.2-24), written so it could go upstream.

amqtt's reader waits `keep_alive` seconds for the next packet and then does nothing
(`handle_read_timeout` is empty): a device that loses power stays connected, and "online", forever, and
its Will is never sent. Here the reader waits one and a half keep-alive periods, as the standard says,
and a timeout closes the connection, which ends the session as an abnormal disconnect (the Will is
published, the OTA service marks the device offline). A new connection that sends no CONNECT within
`CONNECT_DEADLINE_S` is closed too, so idle sockets cannot exhaust a listener.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.errors import MQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

log = logging.getLogger("ota.broker")

GRACE = 1.5
CONNECT_DEADLINE_S = 10.0  # a new connection must send its CONNECT within this
_closing: set[asyncio.Task[Any]] = set()


async def _init_from_connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        handler, session = await asyncio.wait_for(_ORIGINAL_INIT(cls, *args, **kwargs), CONNECT_DEADLINE_S)
    except TimeoutError as e:
        # amqtt closes the socket for an MQTTError here; without a deadline an idle socket is held forever
        raise MQTTError(f"no CONNECT within {CONNECT_DEADLINE_S:g}s") from e
    if session.keep_alive > 0:
        session.keep_alive = session.keep_alive * GRACE  # the reader's timeout for the next packet
    return handler, session


def _handle_read_timeout(self: Any) -> None:
    session = self.session
    log.info(
        "client %r sent nothing for %gs (1.5 x keep-alive): closing its connection",
        str(session.client_id)[:96] if session else "?",
        session.keep_alive if session else 0,
    )
    if self.writer is not None:
        task = asyncio.ensure_future(self.writer.close())  # EOF ends the reader loop and the session
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_ORIGINAL_INIT = BrokerProtocolHandler.init_from_connect.__func__


def install() -> None:
    """Enforce keep-alive in every broker of this process (idempotent)."""
    if getattr(BrokerProtocolHandler, "_ota_keepalive", False):
        return
    BrokerProtocolHandler.init_from_connect = classmethod(_init_from_connect)
    BrokerProtocolHandler.handle_read_timeout = _handle_read_timeout
    BrokerProtocolHandler._ota_keepalive = True
