"""Keep-alive and CONNECT deadlines for amqtt 0.12.1 (MQTT-3.1.2-24), written so it could go upstream.

amqtt's reader waits `keep_alive` seconds for the next packet and then does nothing
(`handle_read_timeout` is empty): a device that loses power stays connected, and "online", forever, and
its Will is never sent. Here the reader waits one and a half keep-alive periods, as the standard says,
and a timeout closes the connection, which ends the session as an abnormal disconnect (the Will is
published, the OTA service marks the device offline). A new connection that sends no CONNECT within
`CONNECT_DEADLINE_S` is closed too (`broker.hardened` reads the CONNECT with this deadline).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

log = logging.getLogger("ota.broker")

GRACE = 1.5
CONNECT_DEADLINE_S = 10.0  # a new connection must send its CONNECT within this
_closing: set[asyncio.Task[Any]] = set()


def reader_timeout(keep_alive: int) -> float:
    """How long the reader waits for a client's next packet: 1.5 x its keep-alive (0: forever)."""
    return keep_alive * GRACE if keep_alive > 0 else 0


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


def install() -> None:
    """Enforce keep-alive in every broker of this process (idempotent)."""
    if getattr(BrokerProtocolHandler, "_ota_keepalive", False):
        return
    BrokerProtocolHandler.handle_read_timeout = _handle_read_timeout
    BrokerProtocolHandler._ota_keepalive = True
