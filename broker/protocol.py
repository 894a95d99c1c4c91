"""The packet reader and the outgoing QoS 1/2 flows of amqtt 0.12.1's protocol handler, made strict and
bounded, written so each part could go upstream.

amqtt reads a fixed header, then lets each packet class read what it thinks it needs straight from the
socket: a bad length desynchronises the stream, invalid UTF-8 topics are turned into `"b'...'"` strings,
QoS 3, packet id 0 and wrong fixed-header flags are accepted, and nothing bounds the size of a packet (a
client can make the broker buffer 256 MiB). Here each packet is read whole, by its remaining length, up to
`max_packet_size`, then checked against the MQTT 3.1.1 rules below before amqtt decodes it; a violation
closes the connection with one log line (MQTT-4.8.0-1), never a traceback.

Outgoing QoS 1/2 messages stay in the session's in-flight table until they are acknowledged: amqtt
dropped them after a hard-coded 5 s, and on a disconnect, so an OTA notice in flight was lost. Here an
unacknowledged PUBLISH is sent again with DUP set every `retry_interval_s` while the client stays connected,
and on the reconnect of a persistent session (MQTT-4.4.0-1); at most `max_inflight_messages` are in flight
per session, and a client that stops acknowledging cannot make the broker queue more than
`max_queued_messages` behind them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from struct import unpack_from
from typing import Any, Protocol

from amqtt.adapters import BufferReader
from amqtt.codecs_amqtt import read_or_raise
from amqtt.errors import NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
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
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import OUTGOING, IncomingApplicationMessage, OutgoingApplicationMessage

log = logging.getLogger("ota.broker")


@dataclass(frozen=True)
class Limits:
    """Per-connection limits; see `broker.limits.MqttLimits` for how config.yaml sets them."""

    max_packet_size: int = 1024 * 1024  # bytes after the fixed header
    max_inflight_messages: int = 20  # outgoing QoS 1/2 messages awaiting acknowledgement, per session
    max_queued_messages: int = 1000  # outgoing QoS 1/2 messages waiting behind those, and offline ones
    max_incoming_qos2: int = 100  # received QoS 2 messages awaiting PUBREL, per session
    retry_interval_s: float = 20.0  # resend an unacknowledged PUBLISH/PUBREL (DUP set) after this
    max_write_buffer: int = 4 * 1024 * 1024  # bytes waiting to be sent to a client before QoS 0 is dropped


LIMITS = Limits()

_HEADER_FLAGS = {PUBREL: 0x2, SUBSCRIBE: 0x2, UNSUBSCRIBE: 0x2}  # MQTT-3.6.1-1, 3.8.1-1, 3.10.1-1
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}
_SERVER_ONLY = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}


class ProtocolViolation(Exception):
    """A packet that breaks MQTT 3.1.1: the connection is closed (MQTT-4.8.0-1)."""


# ------------------------------------------------------------------------------------ packet checks


def check_header(packet_type: int, flags: int, length: int, limits: Limits = LIMITS) -> None:
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


def check_body(packet_type: int, flags: int, body: bytes) -> None:
    """Raise `ProtocolViolation` for a packet body amqtt would mis-decode or accept against the standard."""
    if packet_type == PUBLISH:
        check_publish(flags, body)
    elif packet_type in (SUBSCRIBE, UNSUBSCRIBE):
        name = "SUBSCRIBE" if packet_type == SUBSCRIBE else "UNSUBSCRIBE"
        _packet_id(body, 0, name)
        at, count = 2, 0
        while at < len(body):
            topic_filter, at = _string(body, at, f"{name} topic filter")
            if not topic_filter:
                raise ProtocolViolation(f"{name} with an empty topic filter [MQTT-4.7.3-1]")
            if packet_type == SUBSCRIBE:
                if at >= len(body):
                    raise ProtocolViolation("SUBSCRIBE filter without its QoS byte")
                if body[at] > QOS_2:  # reserved bits set, or QoS 3
                    raise ProtocolViolation(f"SUBSCRIBE requested QoS byte {body[at]:#x} [MQTT-3.8.3-4]")
                at += 1
            count += 1
        if count == 0:
            rule = "MQTT-3.8.3-3" if packet_type == SUBSCRIBE else "MQTT-3.10.3-2"
            raise ProtocolViolation(f"{name} without any topic filter [{rule}]")
    elif packet_type in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        _packet_id(body, 0, f"packet type {packet_type}")


# ------------------------------------------------------------------------------------ the reader


async def _read_fixed_header(reader: Any) -> tuple[int, int, int] | None:
    """(type, flags, remaining length), or None at EOF before a new packet."""
    try:
        first = (await read_or_raise(reader, 1))[0]
    except NoDataError:
        return None
    return first >> 4, first & 0x0F, await _read_length(reader)


async def _read_length(reader: Any) -> int:
    length, multiplier = 0, 1
    byte: int
    for _ in range(4):
        byte = (await read_or_raise(reader, 1))[0]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return length
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


async def read_connect(reader: Any, limits: Limits | None = None) -> Connect:
    """The first packet of a connection, which must be a CONNECT (MQTT-3.1.0-1): its fixed header is
    checked before anything else is read, its remaining length against `max_packet_size`, then it is read
    whole and decoded from memory. Raises `ProtocolViolation` (close without a CONNACK, MQTT-3.1.4-1),
    `ConnectRefused` (answer with that return code, then close) or `NoDataError` (EOF)."""
    limits = limits or LIMITS
    first = (await read_or_raise(reader, 1))[0]
    if first >> 4 != CONNECT:
        name = _PACKET_NAMES.get(first >> 4, f"packet type {first >> 4}")
        raise ProtocolViolation(f"the first packet is {name}, not CONNECT [MQTT-3.1.0-1]")
    if first & 0x0F:
        raise ProtocolViolation(f"CONNECT with reserved flags {first & 0x0F:#x} [MQTT-2.2.2-2]")
    length = await _read_length(reader)
    if length > limits.max_packet_size:
        raise ProtocolViolation(f"CONNECT of {length} bytes, over max_packet_size {limits.max_packet_size}")
    return parse_connect(await read_or_raise(reader, length))


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


async def _read_packet(reader: Any, packet_type: int, flags: int, length: int, limits: Limits) -> Any:
    """The rest of a packet whose fixed header was read: checked, then decoded by amqtt from memory."""
    check_header(packet_type, flags, length, limits)
    body = await read_or_raise(reader, length) if length else b""
    check_body(packet_type, flags, body)
    fixed = MQTTFixedHeader(packet_type, flags, length)
    stream = BufferReader(body)
    packet = await packet_class(fixed).from_stream(stream, fixed_header=fixed)
    if stream._stream.tell() != length:  # what amqtt decoded is not what the length said
        raise ProtocolViolation(f"packet type {packet_type}: length {length} does not match its content")
    return packet


async def _handle_slow(
    self: Any, packet_type: int, flags: int, length: int, limits: Limits, qos2_flows: set[asyncio.Task[None]]
) -> None:
    """amqtt's own packet objects, events and handlers (when a plugin listens to every packet)."""
    session = self.session
    packet = await _read_packet(self.reader, packet_type, flags, length, limits)
    await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
    if packet_type != PUBLISH:
        await _DISPATCH[packet_type](self, packet)
    elif packet.qos != QOS_2:
        await self.handle_publish(packet)
    else:
        packet_id = packet.variable_header.packet_id
        if packet_id not in session.inflight_in and len(session.inflight_in) >= limits.max_incoming_qos2:
            raise ProtocolViolation(
                f"more than max_incoming_qos2 ({limits.max_incoming_qos2}) QoS 2 messages unreleased"
            )
        flow = asyncio.create_task(self.handle_publish(packet))  # waits for the PUBREL
        qos2_flows.add(flow)
        flow.add_done_callback(qos2_flows.discard)


async def _reader_loop(self: Any) -> None:
    """Replaces `ProtocolHandler._reader_loop` (installed by `install`)."""
    session = self.session
    assert session is not None
    assert self._reader_ready is not None
    who = str(session.client_id)[:96]
    limits = LIMITS
    timeout = session.keep_alive if session.keep_alive > 0 else None
    qos2_flows: set[asyncio.Task[None]] = set()
    router = self.__dict__.get("_ota_router")
    if router is not None and self.plugins_manager._event_plugin_callbacks.get(MQTTEvents.PACKET_RECEIVED):
        router = None  # a plugin wants every packet object: amqtt's decoders and events
    self._reader_ready.set()
    try:
        while self.reader is not None and "_ota_ending" not in self.__dict__:
            try:
                header = await asyncio.wait_for(_read_fixed_header(self.reader), timeout)
            except TimeoutError:
                self.handle_read_timeout()
                continue
            if header is None or "_ota_ending" in self.__dict__:
                break  # EOF, or `end` was called: what the client sent after that is not handled
            if router is not None:
                await _handle_fast(self, router, *header, limits)
                continue
            await _handle_slow(self, *header, limits, qos2_flows)
    except asyncio.CancelledError:
        pass
    except ProtocolViolation as e:
        log.warning("closing the connection of %r: %s", who, e)
    except NoDataError:
        log.debug("client %r: connection closed in the middle of a packet", who)
    except (OSError, asyncio.IncompleteReadError) as e:
        log.debug("client %r: connection lost: %s", who, e)
    except Exception as e:  # amqtt's decoders raise many kinds; none may leave a traceback per client
        log.warning("closing the connection of %r: undecodable packet (%s: %s)", who, type(e).__name__, e)
    finally:
        for flow in qos2_flows:
            flow.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()


def end(handler: Any) -> None:
    """Close `handler`'s connection now, at any point after its CONNECT was read (before the CONNACK, before
    the reader started, or while it runs): packets the client sent and the reader has not handled yet are
    not handled, and the connection then ends as on EOF (the Will, if any, is published)."""
    handler._ota_ending = True
    if handler.writer is not None:
        abort(handler.writer)


def transport_of(writer: Any) -> asyncio.WriteTransport | None:
    """The socket's transport under a writer adapter (plain or TLS stream, or `broker.websocket`'s)."""
    inner = getattr(writer, "_writer", None)  # StreamWriterAdapter's asyncio StreamWriter
    if inner is not None:
        return inner.transport  # type: ignore[no-any-return]
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


# -------------------------------------------------------------------------------------- the fast path


def encode_publish(
    topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, dup: bool = False, retain: bool = False
) -> bytes:
    """A PUBLISH packet; `retain` only for a retained message sent for a new subscription (MQTT-3.3.1-8),
    a routed message goes out with retain 0 (MQTT-3.3.1-9)."""
    name = topic.encode()
    size = 2 + len(name) + (2 if qos else 0) + len(payload)
    head = bytearray(((0x30 | (qos << 1) | (0x8 if dup else 0) | (0x1 if retain else 0)),))
    while True:
        byte, size = size & 0x7F, size >> 7
        head.append(byte | 0x80 if size else byte)
        if not size:
            break
    head += len(name).to_bytes(2, "big") + name
    if qos:
        head += packet_id.to_bytes(2, "big")
    return bytes(head) + payload


class Router(Protocol):
    """What the reader hands packets to when the broker attaches itself as `handler._ota_router`: a
    message is routed before its PUBACK/PUBCOMP is sent, in the reader's own task (no queue, no task per
    packet), so a client that disconnects right after publishing loses nothing it was told was received."""

    async def on_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    async def on_subscribe(self, handler: Any, packet: Any) -> None: ...

    async def on_unsubscribe(self, handler: Any, packet: Any) -> None: ...


_PINGRESP = b"\xd0\x00"


def _ack(kind: int, packet_id: int) -> bytes:
    return bytes((kind, 2, packet_id >> 8, packet_id & 0xFF))


class CoalescingWriter:
    """Wraps amqtt's writer adapter: packets written in one turn of the event loop leave in one send (a
    burst of deliveries or acknowledgements costs one system call, not one per packet), in order."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            self._inner.write(data)

    async def drain(self) -> None:
        self.flush()
        await self._inner.drain()

    async def close(self) -> None:
        self.flush()
        await self._inner.close()

    def __getattr__(self, name: str) -> Any:  # get_peer_info, get_ssl_info, is_closed, _writer, ...
        return getattr(self._inner, name)


def write(handler: Any, data: bytes) -> None:
    """Queue bytes on the connection without waiting (each write is whole, so writes never interleave)."""
    writer = handler.writer
    if writer is not None:
        writer.write(data)


async def _handle_fast(
    self: Any, router: Router, packet_type: int, flags: int, length: int, limits: Limits
) -> None:
    check_header(packet_type, flags, length, limits)
    body = await read_or_raise(self.reader, length) if length else b""
    session = self.session
    if packet_type == PUBLISH:
        topic, packet_id, at = check_publish(flags, body)
        qos, retain = (flags >> 1) & 0x3, bool(flags & 0x1)
        if qos < QOS_2:
            await router.on_publish(session, topic, body[at:], qos, retain)
            if qos:
                write(self, _ack(0x40, packet_id))  # PUBACK once routed
            return
        if packet_id not in session.inflight_in:  # else a DUP: PUBREC again, route once (MQTT-4.3.3)
            if len(session.inflight_in) >= limits.max_incoming_qos2:
                raise ProtocolViolation(
                    f"more than max_incoming_qos2 ({limits.max_incoming_qos2}) QoS 2 messages unreleased"
                )
            session.inflight_in[packet_id] = IncomingApplicationMessage(
                packet_id, topic, QOS_2, body[at:], retain
            )
        write(self, _ack(0x50, packet_id))
        return
    check_body(packet_type, flags, body)
    if packet_type in (PUBACK, PUBREC, PUBCOMP):
        packet_id = (body[0] << 8) | body[1]
        waiters = (
            self._puback_waiters
            if packet_type == PUBACK
            else self._pubrec_waiters
            if packet_type == PUBREC
            else self._pubcomp_waiters
        )
        waiter = waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(packet_id)
    elif packet_type == PUBREL:
        packet_id = (body[0] << 8) | body[1]
        message = session.inflight_in.pop(packet_id, None)
        if message is not None:
            await router.on_publish(session, message.topic, message.data, QOS_2, message.retain)
        write(self, _ack(0x70, packet_id))  # PUBCOMP, also for an id already released
    elif packet_type == PINGREQ:
        write(self, _PINGRESP)
    elif packet_type in (SUBSCRIBE, UNSUBSCRIBE):
        fixed = MQTTFixedHeader(packet_type, flags, length)
        packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
        if packet_type == SUBSCRIBE:
            await router.on_subscribe(self, packet)
        else:
            await router.on_unsubscribe(self, packet)
    elif packet_type == DISCONNECT:
        self._ota_clean_disconnect = True
        await self.handle_disconnect(DisconnectPacket())


_DISPATCH: dict[int, Callable[[Any, Any], Awaitable[None]]] = {
    PUBACK: lambda h, p: h.handle_puback(p),
    PUBREC: lambda h, p: h.handle_pubrec(p),
    PUBREL: lambda h, p: h.handle_pubrel(p),
    PUBCOMP: lambda h, p: h.handle_pubcomp(p),
    SUBSCRIBE: lambda h, p: h.handle_subscribe(p),
    UNSUBSCRIBE: lambda h, p: h.handle_unsubscribe(p),
    PINGREQ: lambda h, p: h.handle_pingreq(p),
    DISCONNECT: lambda h, p: h.handle_disconnect(p),
}


# ------------------------------------------------------------------------ outgoing QoS 1 and 2 flows


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


def _window(session: Any) -> Window:
    window: Window | None = getattr(session, "_ota_window", None)
    if window is None:
        window = session._ota_window = Window(LIMITS.max_inflight_messages)
        session._ota_waiting = 0
    return window


def _who(handler: Any) -> str:
    return str(getattr(handler.session, "client_id", "?"))[:96]


class ConnectionEnded(Exception):
    """The connection of a flow ended; its message stays in the session's in-flight table."""


def _closed(handler: Any) -> asyncio.Future[None]:
    closed: asyncio.Future[None] | None = handler.__dict__.get("_ota_closed")
    if closed is None:
        closed = handler._ota_closed = asyncio.get_running_loop().create_future()
    return closed


_RETRY = object()


def _time_to_retry(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_RETRY)


async def _await_ack(
    self: Any, waiters: dict[int, asyncio.Future[Any]], packet_id: int, resend: bytes
) -> Any:
    """Wait for the acknowledgement of `packet_id`, sending `resend` again every retry interval."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            if _closed(self).done():
                raise ConnectionEnded
            waiter: asyncio.Future[Any] = loop.create_future()
            waiters[packet_id] = waiter  # amqtt's stop() cancels every waiter of the connection
            timer = loop.call_later(LIMITS.retry_interval_s, _time_to_retry, waiter)
            try:
                result = await waiter
            except asyncio.CancelledError:
                if waiter.cancelled():
                    raise ConnectionEnded from None
                raise
            finally:
                timer.cancel()
            if result is not _RETRY:
                return result
            log.info("client %r: packet %d not acknowledged, sending it again", _who(self), packet_id)
            write(self, resend)
    finally:
        waiters.pop(packet_id, None)


async def _acquire(self: Any, window: Window) -> None:
    """A place in the session's in-flight window, or `ConnectionEnded` if the connection goes first."""
    session = self.session
    if window.take():
        return
    if session._ota_waiting >= LIMITS.max_queued_messages:
        raise QueueFull(f"client {str(session.client_id)[:96]!r}: outgoing queue full")
    session._ota_waiting += 1
    place: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    window.waiters.append(place)
    closed: asyncio.Future[Any] = _closed(self)
    try:
        await asyncio.wait({place, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        session._ota_waiting -= 1
        if not place.done():
            place.cancel()  # give() skips it
    if place.cancelled():
        raise ConnectionEnded
    if closed.done():
        window.give()
        raise ConnectionEnded


async def _outgoing_flow(self: Any, message: Any) -> None:
    """QoS 1/2 PUBLISH to a client: the message leaves the session's in-flight table only when it is
    acknowledged; a disconnect leaves it there for redelivery with DUP (MQTT-4.4.0-1)."""
    session = self.session
    window = _window(session)
    try:
        await _acquire(self, window)
    except ConnectionEnded:
        session.inflight_out.setdefault(message.packet_id, message)  # redelivered on reconnect
        return
    if message.qos == QOS_1:
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _send_in_window(self, session, window, message, finished)  # gives the place back itself
        await finished
        return
    session.inflight_out[message.packet_id] = message
    packet_id = message.packet_id
    try:
        if message.pubrec_packet is None:
            again = encode_publish(
                message.topic, message.data, message.qos, packet_id, dup=True, retain=bool(message.retain)
            )
            write(self, again if message.publish_packet is not None else _first_send(message, again))
            message.pubrec_packet = await _await_ack(self, self._pubrec_waiters, packet_id, again)
        pubrel = _ack(0x62, packet_id)
        message.pubrel_packet = pubrel
        write(self, pubrel)
        message.pubcomp_packet = await _await_ack(self, self._pubcomp_waiters, packet_id, pubrel)
        session.inflight_out.pop(message.packet_id, None)
    except ConnectionEnded:
        pass  # stays in flight: sent again when the session reconnects
    finally:
        window.give()


def _first_send(message: Any, again: bytes) -> bytes:
    """The first PUBLISH of `message`; marks it sent, so later sends carry DUP (MQTT-3.3.1-1)."""
    message.publish_packet = again
    return encode_publish(
        message.topic, message.data, message.qos, message.packet_id, retain=bool(message.retain)
    )


def send_qos1(handler: Any, topic: str, data: bytes) -> bool:
    """Send a QoS 1 PUBLISH at once when the session's window has room, without a task per message;
    False (nothing done) when the caller must queue it through `mqtt_publish` instead."""
    session = handler.session
    if session is None or _closed(handler).done():
        return False
    window = _window(session)
    if not window.take():
        return False
    try:
        packet_id = session.next_packet_id
    except Exception:
        window.give()
        return False
    _send_in_window(
        handler, session, window, OutgoingApplicationMessage(packet_id, topic, QOS_1, data, False)
    )
    return True


def _send_in_window(
    handler: Any, session: Any, window: Window, message: Any, finished: asyncio.Future[None] | None = None
) -> None:
    """Send a QoS 1 message holding a place in the window, and follow its PUBACK with callbacks: it stays
    in flight until acknowledged, is sent again with DUP every retry interval, and is left in flight for
    redelivery when the connection ends; then the place is given back and `finished` is set."""
    packet_id = message.packet_id
    again = encode_publish(
        message.topic, message.data, QOS_1, packet_id, dup=True, retain=bool(message.retain)
    )
    session.inflight_out[packet_id] = message
    write(handler, again if message.publish_packet is not None else _first_send(message, again))
    loop = asyncio.get_running_loop()

    def wait() -> None:
        waiter: asyncio.Future[Any] = loop.create_future()
        handler._puback_waiters[packet_id] = waiter  # amqtt's stop() cancels it when the connection ends
        timer = loop.call_later(LIMITS.retry_interval_s, _time_to_retry, waiter)

        def done(answer: asyncio.Future[Any]) -> None:
            timer.cancel()
            if handler._puback_waiters.get(packet_id) is answer:
                del handler._puback_waiters[packet_id]
            retry = not answer.cancelled() and answer.result() is _RETRY
            if retry and not _closed(handler).done():
                log.info("client %r: packet %d not acknowledged, sending it again", _who(handler), packet_id)
                write(handler, again)
                wait()  # keeps its place in the window
                return
            if not answer.cancelled() and not retry:
                session.inflight_out.pop(packet_id, None)  # acknowledged
            window.give()  # else it stays in flight: sent again when the session reconnects
            if finished is not None and not finished.done():
                finished.set_result(None)

        waiter.add_done_callback(done)

    wait()


def _flow(original: Callable[[Any, Any], Awaitable[None]]) -> Callable[[Any, Any], Awaitable[None]]:
    async def flow(self: Any, message: Any) -> None:
        if message.direction == OUTGOING:
            await _outgoing_flow(self, message)
        else:
            await original(self, message)

    return flow


async def _retry_deliveries(self: Any) -> None:
    """On (re)connect, send unacknowledged messages again in their order, without holding up the
    connection: each flow runs on its own until acknowledged or the connection ends (MQTT-4.4.0-1)."""
    session = self.session
    pending = self.__dict__.get("_ota_resend")  # what the broker saw in flight before this connection
    if pending is None:
        pending = list(session.inflight_out.values())  # in the order they were first sent
    if not pending:
        return
    log.info("client %r: resending %d unacknowledged message(s)", str(session.client_id)[:96], len(pending))
    flows = self.__dict__.setdefault("_ota_flows", set())
    for message in pending:
        task = asyncio.create_task(_outgoing_flow(self, message))
        flows.add(task)
        task.add_done_callback(_flow_done(flows))


def _flow_done(flows: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        flows.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("redelivery ended: %s", task.exception())

    return done


_original_stop = BrokerProtocolHandler.stop


async def _stop(self: Any) -> None:
    closed = _closed(self)
    if not closed.done():
        closed.set_result(None)
    for task in list(self.__dict__.get("_ota_flows", ())):
        task.cancel()
    await _original_stop(self)


def install(limits: Limits | None = None) -> None:
    """Use the strict reader and the bounded, lossless QoS flows in every broker of this process."""
    global LIMITS  # noqa: PLW0603 - one set of limits per process, like amqtt's own class-level handlers
    if limits is not None:
        LIMITS = limits
    cls = BrokerProtocolHandler  # the broker's side only: amqtt's client keeps its own behaviour
    if cls.__dict__.get("_ota_protocol", False):
        return
    cls._reader_loop = _reader_loop
    cls._handle_qos1_message_flow = _flow(ProtocolHandler._handle_qos1_message_flow)
    cls._handle_qos2_message_flow = _flow(ProtocolHandler._handle_qos2_message_flow)
    cls._retry_deliveries = _retry_deliveries
    cls.stop = _stop
    cls._ota_protocol = True
