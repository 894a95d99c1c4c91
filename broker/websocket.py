"""MQTT over WebSockets (MQTT 3.1.1 section 6) for `HardenedBroker`: listeners of amqtt's `type: ws`, plain
or with TLS (`ssl: true`), served at the path `/mqtt` with the subprotocol `mqtt`, as Mosquitto and EMQX
do. Past the handshake a WebSocket connection is an MQTT connection like a TCP one: the same CONNECT checks,
limits, authentication, keep-alive and routing.

amqtt's WebSocket writer only buffers what `write` is given until someone awaits `drain`, which the
broker's fast path never does (it writes acknowledgements and deliveries without waiting), so a QoS 1
PUBLISH over WebSockets was never acknowledged nor delivered. `WebSocketWriter.write` sends: bytes written
are queued and one task per connection sends them in order, as binary frames. `WebSocketReader` reads
binary frames only (MQTT-6.0.0-1) and never returns part of what was asked for.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import websockets
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from broker.protocol import ProtocolViolation
from broker.stream import BufferedReading

log = logging.getLogger("ota.broker")

PATH = "/mqtt"
SUBPROTOCOL = "mqtt"
_FIXED_HEADER_MAX = 5


class WebSocketReader(BufferedReading):
    """amqtt's reader adapter over a websockets connection: `read(n)` answers n bytes, or b"" when the
    connection ended first; a text frame is a protocol violation (MQTT-6.0.0-1)."""

    def __init__(self, connection: ServerConnection) -> None:
        self._connection = connection
        self._buffer = bytearray()

    def take(self, n: int) -> bytes | None:
        if len(self._buffer) < n:
            return None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def more(self) -> bool:
        """Wait for the next binary frame; False once the connection has ended."""
        try:
            message = await self._connection.recv()
        except ConnectionClosed:
            return False
        if isinstance(message, str):
            raise ProtocolViolation("MQTT in a WebSocket text frame [MQTT-6.0.0-1]")
        self._buffer += message
        return True

    def feed_eof(self) -> None:
        pass


class WebSocketWriter:
    """amqtt's writer adapter over a websockets connection: `write` queues, and one task per connection
    sends what is queued in order (several packets may share a frame, MQTT 6.0)."""

    def __init__(self, connection: ServerConnection) -> None:
        self._connection = connection
        self._pending = bytearray()
        self._sending: asyncio.Task[None] | None = None

    @property
    def transport(self) -> asyncio.WriteTransport:
        """The TCP (or TLS) transport under the WebSocket: aborting it drops the connection at once."""
        return self._connection.transport

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def write(self, data: bytes) -> None:
        self._pending += data
        if self._sending is None or self._sending.done():
            self._sending = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            try:
                await self._connection.send(data)
            except ConnectionClosed:
                self._pending.clear()  # the reader sees the end too
                return

    async def drain(self) -> None:
        while self._sending is not None and not self._sending.done():
            await asyncio.shield(self._sending)

    def get_peer_info(self) -> tuple[str, int] | None:
        address = self._connection.remote_address
        return None if address is None else (str(address[0]), int(address[1]))

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self._connection.transport.get_extra_info("ssl_object")  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Close gracefully (what was written is sent first); a connection that fails meanwhile (reset by the
        peer) is dropped all the same."""
        try:
            await self.drain()
            await self._connection.close()
        finally:
            if not self.transport.is_closing():
                self.transport.abort()


class _HandshakeLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets logs a failed opening handshake (a port scanner, a plain HTTP request) at ERROR with a
    traceback: here it is one INFO line with the reason."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if kwargs.pop("exc_info", None) and level >= logging.ERROR:
            error = sys.exc_info()[1]
            reason = f"{type(error).__name__}: {error}" if error is not None else ""
            self.logger.info("websocket: %s: %s", msg, reason)
            return
        if level >= logging.INFO:  # "server listening", "server closing": the broker logs its own
            level = logging.DEBUG
        self.logger.log(level, msg, *args, **kwargs)


def _only_mqtt(connection: ServerConnection, request: Request) -> Response | None:
    if request.path.split("?", 1)[0] != PATH:
        return connection.respond(HTTPStatus.NOT_FOUND, f"MQTT over WebSockets is served at {PATH}\n")
    return None


async def serve(
    connected: Callable[[WebSocketReader, WebSocketWriter], Awaitable[None]],
    address: str | None,
    port: int,
    ssl_context: ssl.SSLContext | None,
    max_packet_size: int,
) -> Server:
    """A WebSocket listener handing each MQTT connection to `connected` (frames up to `max_packet_size`
    and a fixed header, and at least 1 MiB)."""

    async def handler(connection: ServerConnection) -> None:
        # websockets refuses (400) a handshake that does not offer the "mqtt" subprotocol
        await connected(WebSocketReader(connection), WebSocketWriter(connection))

    return await websockets.serve(
        handler,
        address,
        port,
        ssl=ssl_context,
        subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
        process_request=_only_mqtt,
        max_size=max(max_packet_size + _FIXED_HEADER_MAX, 1024 * 1024),
        logger=_HandshakeLog(logging.getLogger("ota.broker.websocket"), {}),
    )
