"""MQTT 3.1.1 on the wire, as the broker reads and writes it: the limits, the checks a client's packets
must pass, the CONNECT decoder, the packets the broker encodes itself, and the in-flight window.

amqtt reads a fixed header, then lets each packet class read what it thinks it needs straight from the
socket: a bad length desynchronises the stream, invalid UTF-8 topics are turned into `"b'...'"` strings,
QoS 3, packet id 0 and wrong fixed-header flags are accepted, and nothing bounds the size of a packet (a
client can make the broker buffer 256 MiB). Here each packet is read whole, by its remaining length, up to
`max_packet_size`, then checked against the MQTT 3.1.1 rules below; a violation closes the connection with
one log line (MQTT-4.8.0-1), never a traceback. The reader that applies them is
`broker.handler.StrictHandler`; this module does no I/O of its own beyond reading a CONNECT.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from struct import unpack_from
from typing import Any

from amqtt.errors import NoDataError
from amqtt.mqtt.constants import QOS_2
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
)

log = logging.getLogger("ota.broker")


@dataclass(frozen=True, slots=True)
class Limits:
    """One broker's limits (each `HardenedBroker` has its own); `broker.limits` reads them from
    config.yaml."""

    max_packet_size: int = 1024 * 1024  # bytes after the fixed header
    max_inflight_messages: int = 20  # outgoing QoS 1/2 messages awaiting acknowledgement, per session
    max_queued_messages: int = 1000  # outgoing QoS 1/2 messages waiting behind those, and offline ones
    max_incoming_qos2: int = 100  # received QoS 2 messages awaiting PUBREL, per session
    retry_interval_s: float = 20.0  # resend an unacknowledged PUBLISH/PUBREL (DUP set) after this
    max_write_buffer: int = 4 * 1024 * 1024  # bytes waiting to be sent to a client before QoS 0 is dropped
    connect_timeout_s: float = 10.0  # a new connection must send its CONNECT within this


UNSUBSCRIBE_FLAGS = 0x2  # MQTT-3.10.1-1
_HEADER_FLAGS = {PUBREL: 0x2, SUBSCRIBE: 0x2, UNSUBSCRIBE: UNSUBSCRIBE_FLAGS}  # MQTT-3.6.1-1, 3.8.1-1
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}
_SERVER_ONLY = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}


class ProtocolViolation(Exception):
    """A packet that breaks MQTT 3.1.1: the connection is closed (MQTT-4.8.0-1)."""


# ------------------------------------------------------------------------------------ packet checks


def check_header(packet_type: int, flags: int, length: int, limits: Limits) -> None:
    """Raise `ProtocolViolation` for a fixed header the broker must not accept from a client."""
    if packet_type in (0, 15):
        raise ProtocolViolation(f"reserved packet type {packet_type} [MQTT-2.2.1]")
    if packet_type == CONNECT:
        raise ProtocolViolation("a second CONNECT [MQTT-3.1.0-2]")
    if packet_type in _SERVER_ONLY:
        raise ProtocolViolation(f"{_SERVER_ONLY[packet_type]} sent by a client")
    if packet_type == PUBLISH:
        qos = (flags >> 1) & 0x3
        if qos == 3:
            raise ProtocolViolation("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
        if qos == 0 and flags & 0x8:
            raise ProtocolViolation("QoS 0 PUBLISH with DUP set [MQTT-3.3.1-2]")
    elif flags != _HEADER_FLAGS.get(packet_type, 0):
        raise ProtocolViolation(f"packet type {packet_type} with reserved flags {flags:#x} [MQTT-2.2.2-2]")
    expected = _FIXED_LENGTH.get(packet_type)
    if expected is not None and length != expected:
        raise ProtocolViolation(f"packet type {packet_type} with remaining length {length}, not {expected}")
    if length > limits.max_packet_size:
        raise ProtocolViolation(f"packet of {length} bytes, over max_packet_size {limits.max_packet_size}")


def _string(body: bytes, at: int, what: str) -> tuple[str, int]:
    """A length-prefixed UTF-8 string at `at`: (text, offset after it)."""
    if at + 2 > len(body):
        raise ProtocolViolation(f"{what}: truncated length")
    (n,) = unpack_from("!H", body, at)
    end = at + 2 + n
    if end > len(body):
        raise ProtocolViolation(f"{what}: longer than the packet")
    try:
        text = body[at + 2 : end].decode("utf-8")  # rejects surrogates and overlong forms too
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what}: not valid UTF-8 [MQTT-1.5.3-1]") from None
    if "\x00" in text:
        raise ProtocolViolation(f"{what}: contains U+0000 [MQTT-1.5.3-2]")
    return text, end


def _packet_id(body: bytes, at: int, what: str) -> int:
    if at + 2 > len(body):
        raise ProtocolViolation(f"{what}: no packet identifier")
    (packet_id,) = unpack_from("!H", body, at)
    if packet_id == 0:
        raise ProtocolViolation(f"{what} with packet identifier 0 [MQTT-2.3.1-1]")
    return int(packet_id)


def check_publish(flags: int, body: bytes) -> tuple[str, int, int]:
    """The topic, packet id (0 for QoS 0) and payload offset of a PUBLISH body, or `ProtocolViolation`."""
    topic, at = _string(body, 0, "PUBLISH topic")
    if not topic:
        raise ProtocolViolation("PUBLISH with an empty topic [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(f"PUBLISH topic {topic[:64]!r} has a wildcard [MQTT-3.3.2-2]")
    if not (flags >> 1) & 0x3:
        return topic, 0, at
    return topic, _packet_id(body, at, "PUBLISH"), at + 2


def acknowledged_id(packet_type: int, body: bytes) -> int:
    """The packet id a PUBACK, PUBREC, PUBREL or PUBCOMP body carries, or `ProtocolViolation`."""
    return _packet_id(body, 0, f"packet type {packet_type}")


def parse_subscription(packet_type: int, body: bytes) -> tuple[int, list[tuple[str, int]]]:
    """The packet id and the (topic filter, requested QoS) pairs of a SUBSCRIBE body, or the topic filters
    of an UNSUBSCRIBE one (QoS 0 each), or `ProtocolViolation`."""
    name = "SUBSCRIBE" if packet_type == SUBSCRIBE else "UNSUBSCRIBE"
    packet_id = _packet_id(body, 0, name)
    at, filters = 2, []
    while at < len(body):
        topic_filter, at = _string(body, at, f"{name} topic filter")
        if not topic_filter:
            raise ProtocolViolation(f"{name} with an empty topic filter [MQTT-4.7.3-1]")
        qos = 0
        if packet_type == SUBSCRIBE:
            if at >= len(body):
                raise ProtocolViolation("SUBSCRIBE filter without its QoS byte")
            qos = body[at]
            if qos > QOS_2:  # reserved bits set, or QoS 3
                raise ProtocolViolation(f"SUBSCRIBE requested QoS byte {qos:#x} [MQTT-3.8.3-4]")
            at += 1
        filters.append((topic_filter, qos))
    if not filters:
        rule = "MQTT-3.8.3-3" if packet_type == SUBSCRIBE else "MQTT-3.10.3-2"
        raise ProtocolViolation(f"{name} without any topic filter [{rule}]")
    return packet_id, filters


# ------------------------------------------------------------------------------------ the reader


def fixed_header(received: bytes | bytearray) -> tuple[int, int, int, int] | None:
    """(type, flags, remaining length, size of the fixed header) of the packet at the start of `received`,
    or None while its fixed header is not all there."""
    available = len(received)
    length, multiplier = 0, 1
    for at in range(1, 5):
        if at >= available:
            return None
        byte = received[at]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            first = received[0]
            return first >> 4, first & 0x0F, length, at + 1
        multiplier *= 128
    raise ProtocolViolation("remaining length longer than 4 bytes [MQTT-2.2.3]")


# ------------------------------------------------------------------------------------ the CONNECT

_PACKET_NAMES = {
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
PROTOCOL_LEVEL = 4  # MQTT 3.1.1, the only one served (MQTT 3.1's "MQIsdp" and MQTT 5 get return code 1)
UNACCEPTABLE_PROTOCOL_LEVEL = 1
IDENTIFIER_REJECTED = 2


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    message: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    """A CONNECT that passed every check of MQTT 3.1.1 section 3.1."""

    client_id: str  # "" when the client sent none (clean session 1)
    clean_session: bool
    keep_alive: int
    will: Will | None
    username: str | None
    password: str | bytes | None  # binary data: text when it is valid UTF-8


class ConnectRefused(Exception):
    """A well-formed CONNECT the broker answers with CONNACK `return_code`, then closes."""

    def __init__(self, return_code: int, reason: str) -> None:
        super().__init__(reason)
        self.return_code = return_code


async def read_connect(reader: Any, limits: Limits) -> Connect:
    """The first packet of a connection, which must be a CONNECT (MQTT-3.1.0-1): its first byte is
    checked as soon as it arrives and its remaining length against `max_packet_size` before the body is
    waited for; then it is decoded from memory. `reader` is a connection's buffered reader (`peek`, `take`,
    `more`, `readexactly`). Raises `ProtocolViolation` (close without a CONNACK, MQTT-3.1.4-1),
    `ConnectRefused` (answer with that return code, then close) or `NoDataError` (EOF)."""
    while True:
        received = reader.peek()
        if received:
            first = received[0]
            if first >> 4 != CONNECT:
                name = _PACKET_NAMES.get(first >> 4, f"packet type {first >> 4}")
                raise ProtocolViolation(f"the first packet is {name}, not CONNECT [MQTT-3.1.0-1]")
            if first & 0x0F:
                raise ProtocolViolation(f"CONNECT with reserved flags {first & 0x0F:#x} [MQTT-2.2.2-2]")
            header = fixed_header(received)
            if header is not None:
                break
        if not await reader.more():
            raise NoDataError("the connection ended before its CONNECT")
    _, _, length, size = header
    if length > limits.max_packet_size:
        raise ProtocolViolation(f"CONNECT of {length} bytes, over max_packet_size {limits.max_packet_size}")
    reader.take(size)
    return parse_connect((reader.take(length) or await reader.readexactly(length)) if length else b"")


def parse_connect(body: bytes) -> Connect:
    """Decode and check the body of a CONNECT (after its fixed header)."""
    name, at = _string(body, 0, "CONNECT protocol name")
    if name not in ("MQTT", "MQIsdp"):
        raise ProtocolViolation(f"CONNECT with protocol name {name[:32]!r} [MQTT-3.1.2-1]")
    if at >= len(body):
        raise ProtocolViolation("CONNECT without a protocol level")
    level = body[at]
    if name != "MQTT" or level != PROTOCOL_LEVEL:  # whatever follows: MQTT 5's properties are not read
        raise ConnectRefused(
            UNACCEPTABLE_PROTOCOL_LEVEL, f"protocol {name!r} level {level} is not MQTT 3.1.1 [MQTT-3.1.2-2]"
        )
    if at + 4 > len(body):
        raise ProtocolViolation("CONNECT variable header cut short")
    flags = body[at + 1]
    (keep_alive,) = unpack_from("!H", body, at + 2)
    at += 4
    will_flag, will_qos = bool(flags & 0x04), (flags >> 3) & 0x3
    if flags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag set [MQTT-3.1.2-3]")
    if not will_flag and will_qos:
        raise ProtocolViolation("CONNECT Will QoS set without the Will flag [MQTT-3.1.2-13]")
    if not will_flag and flags & 0x20:
        raise ProtocolViolation("CONNECT Will retain set without the Will flag [MQTT-3.1.2-15]")
    if will_qos == 3:
        raise ProtocolViolation("CONNECT Will QoS 3 [MQTT-3.1.2-14]")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolViolation("CONNECT password flag set without the user name flag [MQTT-3.1.2-22]")
    client_id, at = _string(body, at, "CONNECT client id")
    will = None
    if will_flag:
        topic, at = _string(body, at, "Will topic")
        if not topic:
            raise ProtocolViolation("empty Will topic [MQTT-4.7.3-1]")
        if "+" in topic or "#" in topic:
            raise ProtocolViolation(f"Will topic {topic[:64]!r} has a wildcard [MQTT-3.1.2-9, MQTT-4.7.1-1]")
        message, at = _binary(body, at, "Will message")
        will = Will(topic, message, will_qos, bool(flags & 0x20))
    username: str | None = None
    password: str | bytes | None = None
    if flags & 0x80:
        username, at = _string(body, at, "CONNECT user name")
    if flags & 0x40:
        raw, at = _binary(body, at, "CONNECT password")
        try:
            password = raw.decode("utf-8")
        except UnicodeDecodeError:
            password = raw
    if at != len(body):
        raise ProtocolViolation(f"CONNECT with {len(body) - at} byte(s) after its payload")
    if not client_id and not flags & 0x02:
        raise ConnectRefused(IDENTIFIER_REJECTED, "empty client id with clean session 0 [MQTT-3.1.3-8]")
    return Connect(client_id, bool(flags & 0x02), keep_alive, will, username, password)


def _binary(body: bytes, at: int, what: str) -> tuple[bytes, int]:
    if at + 2 > len(body):
        raise ProtocolViolation(f"{what}: truncated length")
    (n,) = unpack_from("!H", body, at)
    if at + 2 + n > len(body):
        raise ProtocolViolation(f"{what}: longer than the packet")
    return bytes(body[at + 2 : at + 2 + n]), at + 2 + n


def connack(return_code: int, session_present: bool = False) -> bytes:
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


# ------------------------------------------------------------------------------------ writing


def encode_publish(
    topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, dup: bool = False, retain: bool = False
) -> bytes:
    """A PUBLISH packet; `retain` only for a retained message sent for a new subscription (MQTT-3.3.1-8),
    a routed message goes out with retain 0 (MQTT-3.3.1-9)."""
    name = topic.encode()
    size = 2 + len(name) + (2 if qos else 0) + len(payload)
    head = _fixed_header(0x30 | (qos << 1) | (0x8 if dup else 0) | (0x1 if retain else 0), size)
    head += len(name).to_bytes(2, "big") + name
    if qos:
        head += packet_id.to_bytes(2, "big")
    return bytes(head) + payload


def _fixed_header(first: int, remaining: int) -> bytearray:
    """A packet's first byte and its remaining length (MQTT's variable-length integer)."""
    head = bytearray((first,))
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        head.append(byte | 0x80 if remaining else byte)
        if not remaining:
            return head


def suback(packet_id: int, return_codes: list[int]) -> bytes:
    """A SUBACK: one return code per topic filter of the SUBSCRIBE, in its order (MQTT-3.8.4-5)."""
    head = _fixed_header(0x90, 2 + len(return_codes))
    head += packet_id.to_bytes(2, "big")
    head += bytes(return_codes)
    return bytes(head)


PINGRESP_PACKET = b"\xd0\x00"


def ack(kind: int, packet_id: int) -> bytes:
    return bytes((kind, 2, packet_id >> 8, packet_id & 0xFF))


def transport_of(writer: Any) -> asyncio.WriteTransport | None:
    """The socket's transport under a writer (`broker.stream.MqttStream`, or `broker.websocket`'s)."""
    return getattr(writer, "transport", None)


def write_buffer_size(writer: Any, transport: asyncio.WriteTransport) -> int:
    """Bytes written to `writer` and not sent yet."""
    return transport.get_write_buffer_size() + int(getattr(writer, "pending_bytes", 0))


def abort(writer: Any) -> None:
    """Drop a connection at once (no more reads or writes), whatever it is carried on."""
    transport = transport_of(writer)
    if transport is not None:
        transport.abort()
        return
    closing = asyncio.ensure_future(writer.close())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


class QueueFull(Exception):
    """The client has `max_inflight_messages` unacknowledged and `max_queued_messages` waiting."""


class Window:
    """A session's in-flight window: `take()` without waiting when a place is free, or queue for one."""

    __slots__ = ("free", "waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    def give(self) -> None:
        while self.waiters:  # hand the place to the first one still waiting
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1
