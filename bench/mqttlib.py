"""Just enough MQTT 3.1.1 for load generation: pre-encoded packets and a minimal stream splitter.

Nothing here validates what a broker sends beyond the fixed header; the load generators only count
packets, read packet ids to acknowledge QoS 1 deliveries, and match SUBACKs and PUBACKs by id.
"""

from __future__ import annotations

from collections.abc import Iterator

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    1,
    2,
    3,
    4,
    8,
    9,
    12,
    13,
    14,
)

DISCONNECT_PACKET = b"\xe0\x00"
PINGREQ_PACKET = b"\xc0\x00"


def varlen(n: int) -> bytes:
    """MQTT's variable-length "remaining length" encoding."""
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def text(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def connect(client_id: str, *, keepalive: int = 0, clean: bool = True, username: str | None = None) -> bytes:
    flags = 0x02 if clean else 0
    payload = text(client_id)
    if username is not None:
        flags |= 0x80
        payload += text(username)
    body = text("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return bytes([CONNECT << 4]) + varlen(len(body)) + body


def subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = packet_id.to_bytes(2, "big") + text(topic_filter) + bytes([qos])
    return bytes([(SUBSCRIBE << 4) | 0x02]) + varlen(len(body)) + body


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0) -> bytes:
    head, tail = publish_parts(topic, payload, qos=qos)
    return head + (packet_id.to_bytes(2, "big") if qos else b"") + tail


def publish_parts(topic: str, payload: bytes, *, qos: int) -> tuple[bytes, bytes]:
    """A PUBLISH split around its packet id: `head + id.to_bytes(2, "big") + tail` (QoS 0: no id)."""
    topic_bytes = text(topic)
    size = len(topic_bytes) + (2 if qos else 0) + len(payload)
    return bytes([(PUBLISH << 4) | (qos << 1)]) + varlen(size) + topic_bytes, payload


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


class Splitter:
    """Cuts a byte stream into MQTT packets: `feed(data)` yields `(type, flags, body)` for each whole
    packet and keeps the rest for the next call."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> Iterator[tuple[int, int, memoryview]]:
        buf = self._buf + data if self._buf else data
        view = memoryview(buf)
        end = len(buf)
        pos = 0
        while pos + 2 <= end:
            first = buf[pos]
            size = 0
            shift = 0
            i = pos + 1
            while True:
                if i >= end:
                    self._buf = buf[pos:]
                    return
                byte = buf[i]
                size |= (byte & 0x7F) << shift
                i += 1
                if byte < 0x80:
                    break
                shift += 7
            if i + size > end:
                break
            yield first >> 4, first & 0x0F, view[i : i + size]
            pos = i + size
        self._buf = buf[pos:]


def publish_packet_id(flags: int, body: memoryview) -> int:
    """The packet id of a QoS 1/2 PUBLISH body, else 0."""
    if not flags & 0x06:
        return 0
    topic_len = (body[0] << 8) | body[1]
    return (body[2 + topic_len] << 8) | body[3 + topic_len]


def publish_topic(body: memoryview) -> bytes:
    topic_len = (body[0] << 8) | body[1]
    return bytes(body[2 : 2 + topic_len])


def packet_id(body: memoryview) -> int:
    """The leading packet id of a PUBACK or SUBACK body."""
    return (body[0] << 8) | body[1]
