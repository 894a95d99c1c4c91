"""The packets the broker encodes itself agree byte for byte with amqtt's packet classes."""

from __future__ import annotations

from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket
from hypothesis import given
from hypothesis import strategies as st

from broker.protocol import ack, connack, encode_publish, suback

packet_ids = st.integers(min_value=1, max_value=0xFFFF)


@given(packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=300))
def test_suback_is_amqtt_s(packet_id: int, codes: list[int]) -> None:
    """One code per filter, whatever their number (past 125 the remaining length takes two bytes)."""
    assert suback(packet_id, codes) == SubackPacket.build(packet_id, codes).to_bytes()


@given(packet_ids)
def test_unsuback_is_amqtt_s(packet_id: int) -> None:
    assert ack(0xB0, packet_id) == UnsubackPacket.build(packet_id).to_bytes()


@given(st.booleans(), st.sampled_from([0, 1, 2, 3, 4, 5]))
def test_connack_is_amqtt_s(session_present: bool, code: int) -> None:
    assert connack(code, session_present) == ConnackPacket.build(int(session_present), code).to_bytes()


@given(
    st.text(min_size=1, max_size=300).filter(lambda t: not set(t) & {"\x00", "#", "+"}),
    st.binary(max_size=20_000),
    st.sampled_from([0, 1, 2]),
    packet_ids,
    st.booleans(),
)
def test_publish_is_amqtt_s(topic: str, payload: bytes, qos: int, packet_id: int, retain: bool) -> None:
    """Every remaining length (one to three bytes of it here) is encoded as amqtt encodes it."""
    theirs = PublishPacket.build(topic, payload, packet_id if qos else None, False, qos, retain)
    assert encode_publish(topic, payload, qos, packet_id if qos else 0, retain=retain) == theirs.to_bytes()
