"""A tiny raw MQTT 3.1.1 client for conformance tests: byte-level encoders that can build any packet,
valid or not, and a connection whose reader parses what the broker sends.

Every wait is bounded by a timeout; `RawClient.open` is an async context manager that always closes its
socket, so no transport is left for the garbage collector to warn about.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}

WAIT_S = 2.0


# ------------------------------------------------------------------------------------------ encoders


def encode_length(length: int) -> bytes:
    """The variable-length "remaining length" of a fixed header (MQTT 2.2.3)."""
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def string(text: str | bytes) -> bytes:
    """A length-prefixed string; bytes are sent as they are (to send invalid UTF-8)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def packet(packet_type: int, flags: int, body: bytes = b"") -> bytes:
    """Any packet: the fixed header (type, raw flags, remaining length of `body`) and `body`."""
    return bytes([(packet_type << 4) | (flags & 0x0F)]) + encode_length(len(body)) + body


def connect(
    client_id: str,
    *,
    clean: bool = True,
    keep_alive: int = 60,
    username: str | None = None,
    password: str | bytes | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """CONNECT; `will` is (topic, message, QoS, retain)."""
    flags = 0x02 if clean else 0
    payload = string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += string(topic) + string(message)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    variable = string("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive)
    return packet(CONNECT, 0, variable + payload)


def raw_connect(
    flags: int,
    *fields: bytes,
    name: str | bytes = "MQTT",
    level: int = 4,
    keep_alive: int = 60,
    properties: bytes | None = None,
    header_flags: int = 0,
) -> bytes:
    """A CONNECT with any connect flags and payload `fields` (already encoded: `string(...)`), any protocol
    name and level; `properties`: an MQTT 5 property block (its length is prefixed here)."""
    variable = string(name) + bytes([level, flags]) + struct.pack("!H", keep_alive)
    if properties is not None:
        variable += encode_length(len(properties)) + properties
    return packet(CONNECT, header_flags, variable + b"".join(fields))


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    *,
    qos: int = 0,
    packet_id: int | None = None,
    dup: bool = False,
    retain: bool = False,
    flags: int | None = None,
) -> bytes:
    """PUBLISH; `qos` may be 3, `packet_id` may be 0 (a packet id is sent when `qos` > 0 or it is given);
    `flags` overrides the four flag bits."""
    if flags is None:
        flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    variable = string(topic)
    if packet_id is not None:
        variable += struct.pack("!H", packet_id)
    elif qos:
        variable += struct.pack("!H", 1)
    return packet(PUBLISH, flags, variable + payload)


def puback(packet_id: int) -> bytes:
    return packet(PUBACK, 0, struct.pack("!H", packet_id))


def pubrec(packet_id: int) -> bytes:
    return packet(PUBREC, 0, struct.pack("!H", packet_id))


def pubrel(packet_id: int, flags: int = 0x2) -> bytes:
    return packet(PUBREL, flags, struct.pack("!H", packet_id))


def pubcomp(packet_id: int) -> bytes:
    return packet(PUBCOMP, 0, struct.pack("!H", packet_id))


def subscribe(packet_id: int, *filters: tuple[str | bytes, int], flags: int = 0x2) -> bytes:
    """SUBSCRIBE with (filter, raw requested-QoS byte) pairs; none makes an invalid empty SUBSCRIBE."""
    body = struct.pack("!H", packet_id) + b"".join(string(f) + bytes([q]) for f, q in filters)
    return packet(SUBSCRIBE, flags, body)


def unsubscribe(packet_id: int, *filters: str | bytes, flags: int = 0x2) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(string(f) for f in filters)
    return packet(UNSUBSCRIBE, flags, body)


def pingreq() -> bytes:
    return packet(PINGREQ, 0)


def disconnect() -> bytes:
    return packet(DISCONNECT, 0)


# ------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class Packet:
    """A packet from the broker. For PUBLISH the topic, QoS, flags, packet id and payload are decoded."""

    type: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type {self.type}")

    # PUBLISH
    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def topic(self) -> str:
        (n,) = struct.unpack_from("!H", self.body, 0)
        return self.body[2 : 2 + n].decode()

    @property
    def packet_id(self) -> int:
        """The packet id of a PUBLISH at QoS > 0, or of an acknowledgement or SUBACK/UNSUBACK."""
        if self.type == PUBLISH:
            (n,) = struct.unpack_from("!H", self.body, 0)
            return int(struct.unpack_from("!H", self.body, 2 + n)[0])
        return int(struct.unpack_from("!H", self.body, 0)[0])

    @property
    def payload(self) -> bytes:
        (n,) = struct.unpack_from("!H", self.body, 0)
        return self.body[2 + n + (2 if self.qos else 0) :]

    # CONNACK
    @property
    def session_present(self) -> bool:
        return bool(self.body[0] & 0x01)

    @property
    def return_code(self) -> int:
        return self.body[1]

    # SUBACK
    @property
    def granted(self) -> list[int]:
        return list(self.body[2:])

    def __repr__(self) -> str:
        if self.type == PUBLISH:
            pid = f" id={self.packet_id}" if self.qos else ""
            return (
                f"<PUBLISH {self.topic!r} qos={self.qos} dup={int(self.dup)} retain={int(self.retain)}{pid}"
                f" payload={self.payload!r}>"
            )
        return f"<{self.name} flags={self.flags:#x} body={self.body.hex()}>"


_EOF = None


async def _read_packet(reader: asyncio.StreamReader) -> Packet | None:
    try:
        first = (await reader.readexactly(1))[0]
        length, multiplier = 0, 1
        for _ in range(4):
            byte = (await reader.readexactly(1))[0]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return _EOF
    return Packet(first >> 4, first & 0x0F, body)


# ------------------------------------------------------------------------------------------ client


class RawClient:
    """One TCP connection to the broker. A background task parses incoming packets into a queue, so a
    timed-out wait never loses half a packet; EOF (or a reset) is recorded once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._queue: asyncio.Queue[Packet | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())
        self.eof = False
        self.skipped: list[Packet] = []  # packets `expect` and `closed` passed over, in order

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, port: int, host: str = "127.0.0.1") -> AsyncIterator[RawClient]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), WAIT_S)
        client = cls(reader, writer)
        try:
            yield client
        finally:
            await client.close()

    async def _pump(self) -> None:
        while True:
            received = await _read_packet(self._reader)
            await self._queue.put(received)
            if received is _EOF:
                return

    # ---------------------------------------------------------------------------------- sending

    async def send(self, *data: bytes) -> None:
        """Write raw bytes; a connection the broker has already closed is not an error here."""
        for chunk in data:
            self._writer.write(chunk)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self._writer.drain(), WAIT_S)

    async def connect(self, client_id: str, *, timeout: float = WAIT_S, **options: Any) -> Packet:
        """Send CONNECT (see `connect` for the options) and answer the CONNACK."""
        await self.send(connect(client_id, **options))
        return await self.expect(CONNACK, timeout)

    async def subscribe(
        self, packet_id: int, *filters: tuple[str, int], timeout: float = WAIT_S
    ) -> list[int]:
        """SUBSCRIBE and answer the SUBACK's return codes."""
        await self.send(subscribe(packet_id, *filters))
        suback = await self.expect(SUBACK, timeout)
        assert suback.packet_id == packet_id
        return suback.granted

    # ---------------------------------------------------------------------------------- receiving

    async def next(self, timeout: float = WAIT_S) -> Packet | None:
        """The next packet, None at EOF; raises TimeoutError when nothing arrives within `timeout`."""
        if self.eof:
            return None
        received = await asyncio.wait_for(self._queue.get(), timeout)
        if received is _EOF:
            self.eof = True
        return received

    async def expect(self, packet_type: int, timeout: float = WAIT_S) -> Packet:
        """The next packet of `packet_type`, passing over others (kept in `skipped`) for up to `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                received = await self.next(max(deadline - loop.time(), 0))
            except TimeoutError:
                raise AssertionError(
                    f"no {NAMES.get(packet_type)} within {timeout}s (passed over: {self.skipped})"
                ) from None
            if received is None:
                raise AssertionError(
                    f"connection closed while waiting for {NAMES.get(packet_type)} (passed over: {self.skipped})"
                )
            if received.type == packet_type:
                return received
            self.skipped.append(received)

    async def silent(self, timeout: float) -> Packet | None:
        """The packet that arrives within `timeout`, or None when nothing does; an EOF instead fails."""
        try:
            received = await self.next(timeout)
        except TimeoutError:
            return None
        if received is None:
            raise AssertionError(f"connection closed (passed over: {self.skipped})")
        return received

    async def closed(self, timeout: float = WAIT_S) -> bool:
        """True when the broker closes the connection within `timeout`; packets before EOF go to `skipped`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.eof:
            try:
                received = await self.next(max(deadline - loop.time(), 0))
            except TimeoutError:
                return False
            if received is not None:
                self.skipped.append(received)
        return True

    # ---------------------------------------------------------------------------------- closing

    async def close(self) -> None:
        """FIN: close the socket gracefully (no DISCONNECT is sent: send one first for a clean end)."""
        await self._end(abort=False)

    async def abort(self) -> None:
        """RST: drop the connection as a device losing power would, without a FIN."""
        await self._end(abort=True)

    async def _end(self, *, abort: bool) -> None:
        if abort:
            self._writer.transport.abort()
        else:
            self._writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), WAIT_S)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
