"""MQTT 3.1.1 conformance of the product broker, driven with raw packets over a real socket.

Each test names the statement of the standard it pins down (MQTT-x.y.z-n) and, in brackets, its row in
the table of docs/conformance.md. A packet that breaks the standard closes the connection with one
warning that names the reason and no traceback, and the broker goes on serving everyone else.
Keep-alive (MQTT-3.1.2-24) is covered in test_keepalive.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from broker import app as broker_app
from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.support import Env, Tls, broker_config, eventually

CLOSE_S = 2.0  # a violation must close the connection within this
QUIET_S = 0.4  # "nothing (more) arrives" is checked over this long
_ids = itertools.count(1)


def _fresh(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


# ------------------------------------------------------------------------------------------ helpers


def assert_logged_cleanly(caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """A warning names `reason`, and no record carries a traceback."""
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(reason in m for m in warnings), f"no warning naming {reason!r} in {warnings}"
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks


async def assert_serves(port: int) -> None:
    """A fresh client connects, subscribes, and receives what another fresh client publishes."""
    topic = _fresh("still/serving")
    async with RawClient.open(port) as sub, RawClient.open(port) as pub:
        assert (await sub.connect(_fresh("after-sub"))).return_code == 0
        assert await sub.subscribe(1, (topic, 1)) == [1]
        assert (await pub.connect(_fresh("after-pub"))).return_code == 0
        await pub.send(mq.publish(topic, b"ok", qos=1, packet_id=7))
        assert (await pub.expect(mq.PUBACK)).packet_id == 7
        got = await sub.expect(mq.PUBLISH)
        assert (got.topic, got.payload) == (topic, b"ok")
        await sub.send(mq.puback(got.packet_id), mq.disconnect())
        await pub.send(mq.disconnect())


async def assert_closes(
    env: Env, caplog: pytest.LogCaptureFixture, reason: str, *data: bytes, forbidden: int | None = None
) -> None:
    """After a valid CONNECT, `data` makes the broker close the connection within CLOSE_S, logging
    `reason` without a traceback, never answering with a `forbidden` packet; other clients still work."""
    async with RawClient.open(env.mqtt_port) as client:
        assert (await client.connect(_fresh("offender"))).return_code == 0
        await client.send(*data)
        assert await client.closed(CLOSE_S), f"still connected {CLOSE_S}s after {b''.join(data)[:64].hex()}"
        if forbidden is not None:
            assert all(p.type != forbidden for p in client.skipped), client.skipped
    assert_logged_cleanly(caplog, reason)
    await assert_serves(env.mqtt_port)


@contextlib.asynccontextmanager
async def started(config: dict[str, Any]) -> AsyncIterator[broker_app.RunningBroker]:
    running = await broker_app.start(config)
    try:
        yield running
    finally:
        await running.stop()


def use_limits(env: Env, **changes: Any) -> None:
    """Change the limits of this test's broker, for the connections it accepts from now on."""
    broker = env.running.broker
    broker.limits = dataclasses.replace(broker.limits, **changes)


async def publish_qos1(client: RawClient, topic: str, payload: bytes, packet_id: int) -> None:
    await client.send(mq.publish(topic, payload, qos=1, packet_id=packet_id))
    assert (await client.expect(mq.PUBACK)).packet_id == packet_id


# ------------------------------------------------------------------------ violations close the connection


async def test_publish_qos_3_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.3.1-4: a PUBLISH with both QoS bits set (QoS 3) closes the connection [item 10]."""
    await assert_closes(
        env, caplog, "QoS 3", mq.publish("a/b", b"x", qos=3, packet_id=1), forbidden=mq.PUBACK
    )


async def test_qos0_publish_with_dup_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.3.1-2: a QoS 0 PUBLISH with DUP set closes the connection [item 10]."""
    await assert_closes(env, caplog, "DUP", mq.publish("a/b", b"x", qos=0, dup=True))


async def test_publish_topic_invalid_utf8_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-1.5.3-1: a PUBLISH topic that is not valid UTF-8 closes the connection [item 10]."""
    await assert_closes(env, caplog, "MQTT-1.5.3-1", mq.publish(b"a/\xff\xfe", b"x", qos=1, packet_id=1))


async def test_publish_topic_with_null_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-1.5.3-2: a PUBLISH topic containing U+0000 closes the connection [item 10]."""
    await assert_closes(env, caplog, "U+0000", mq.publish(b"a/\x00b", b"x", qos=1, packet_id=1))


@pytest.mark.parametrize("topic", ["a/+", "a/#", "+", "#", "a+b"])
async def test_publish_topic_with_wildcard_closes(
    env: Env, caplog: pytest.LogCaptureFixture, topic: str
) -> None:
    """MQTT-3.3.2-2: a PUBLISH topic containing + or # closes the connection [item 10]."""
    await assert_closes(env, caplog, "MQTT-3.3.2-2", mq.publish(topic, b"x", qos=1, packet_id=1))


async def test_publish_empty_topic_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-4.7.3-1: a PUBLISH with a zero-length topic closes the connection [item 10]."""
    await assert_closes(env, caplog, "empty topic", mq.publish("", b"x", qos=1, packet_id=1))


async def test_qos1_publish_with_packet_id_0_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-2.3.1-1: a QoS 1 PUBLISH with packet identifier 0 closes the connection [item 10]."""
    await assert_closes(
        env, caplog, "identifier 0", mq.publish("a/b", b"x", qos=1, packet_id=0), forbidden=mq.PUBACK
    )


async def test_subscribe_with_wrong_header_flags_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.8.1-1: a SUBSCRIBE whose fixed-header flags are not 0b0010 closes the connection [item 10]."""
    await assert_closes(
        env, caplog, "reserved flags", mq.subscribe(1, ("a/b", 0), flags=0x0), forbidden=mq.SUBACK
    )


async def test_unsubscribe_with_wrong_header_flags_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.10.1-1: an UNSUBSCRIBE whose fixed-header flags are not 0b0010 closes the connection [item 10]."""
    await assert_closes(
        env, caplog, "reserved flags", mq.unsubscribe(1, "a/b", flags=0x0), forbidden=mq.UNSUBACK
    )


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x3, 0xF])
async def test_aliyun_sdk_clients_may_unsubscribe_with_flags_0_only(env: Env, flags: int) -> None:
    """A deliberate deviation from MQTT-3.10.1-1: Aliyun's Link SDK C 4.0/4.1 send UNSUBSCRIBE with
    flags 0 (after every MQTT download), so a client logged in the Aliyun way (`<id>|securemode=..|`) gets
    its UNSUBACK for flags 0; any other wrong flags still close its connection."""
    async with mq.RawClient.open(env.mqtt_port) as client:
        await client.connect("pk.d1|securemode=3,signmethod=hmacsha256,_v=sdk-c-4.1.0|", username="d1&pk")
        assert await client.subscribe(1, ("/sys/pk/d1/thing/file/download_reply", 0)) == [0]
        await client.send(mq.unsubscribe(2, "/sys/pk/d1/thing/file/download_reply", flags=flags))
        if flags == 0x0:
            assert (await client.expect(mq.UNSUBACK)).packet_id == 2
            await client.send(mq.pingreq())
            await client.expect(mq.PINGRESP)
        else:
            assert await client.closed()


async def test_pubrel_with_wrong_header_flags_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.6.1-1: a PUBREL whose fixed-header flags are not 0b0010 closes the connection [item 10]."""
    await assert_closes(env, caplog, "reserved flags", mq.pubrel(1, flags=0x0), forbidden=mq.PUBCOMP)


async def test_subscribe_without_filter_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.8.3-3: a SUBSCRIBE with no topic filter closes the connection [item 10]."""
    await assert_closes(env, caplog, "MQTT-3.8.3-3", mq.subscribe(1), forbidden=mq.SUBACK)


@pytest.mark.parametrize("qos_byte", [3, 0x04, 0x81], ids=["qos3", "reserved-bit-2", "reserved-bit-7"])
async def test_subscribe_with_invalid_requested_qos_closes(
    env: Env, caplog: pytest.LogCaptureFixture, qos_byte: int
) -> None:
    """MQTT-3-8.3-4: a SUBSCRIBE requested-QoS byte with reserved bits set or QoS 3 closes the connection
    [item 10]."""
    await assert_closes(env, caplog, "MQTT-3.8.3-4", mq.subscribe(1, ("a/b", qos_byte)), forbidden=mq.SUBACK)


async def test_unsubscribe_without_filter_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.10.3-2: an UNSUBSCRIBE with no topic filter closes the connection [item 10]."""
    await assert_closes(env, caplog, "MQTT-3.10.3-2", mq.unsubscribe(1), forbidden=mq.UNSUBACK)


async def test_second_connect_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.1.0-2: a second CONNECT on the same connection closes it (no second CONNACK) [item 10]."""
    await assert_closes(env, caplog, "second CONNECT", mq.connect("again"), forbidden=mq.CONNACK)


@pytest.mark.parametrize("packet_type", [0, 15])
async def test_reserved_packet_type_closes(
    env: Env, caplog: pytest.LogCaptureFixture, packet_type: int
) -> None:
    """MQTT-2.2.1 (Table 2.1): the reserved control packet types 0 and 15 close the connection [item 10]."""
    await assert_closes(env, caplog, f"reserved packet type {packet_type}", mq.packet(packet_type, 0))


async def test_pingreq_with_a_body_closes_without_desynchronising(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT-3.12.1 / MQTT-4.8.0-1: a PINGREQ with remaining length 1 is malformed and closes the connection;
    the valid PINGREQ after it is not answered (the stream is never read out of step) [item 10]."""
    await assert_closes(
        env,
        caplog,
        "remaining length 1",
        mq.packet(mq.PINGREQ, 0, b"\x00"),
        mq.pingreq(),
        forbidden=mq.PINGRESP,
    )


async def test_puback_with_length_3_closes_without_desynchronising(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT-3.4.1 / MQTT-4.8.0-1: a PUBACK with remaining length 3 is malformed and closes the connection;
    the valid QoS 1 PUBLISH after it is not processed (no PUBACK) [item 10]."""
    await assert_closes(
        env,
        caplog,
        "remaining length 3",
        mq.packet(mq.PUBACK, 0, b"\x00\x01\x00"),
        mq.publish("a/b", b"x", qos=1, packet_id=9),
        forbidden=mq.PUBACK,
    )


async def test_remaining_length_in_five_bytes_closes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-2.2.3: a remaining length encoded in more than four bytes closes the connection [item 10]."""
    await assert_closes(env, caplog, "longer than 4 bytes", b"\x30\xff\xff\xff\xff\x01")


async def test_packet_over_max_packet_size_closes_before_its_body(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT-4.8.0-1: a header announcing a 2 MiB packet (max_packet_size 1024 KiB) closes the connection at
    once, without the broker waiting for (or buffering) the body [item 8]."""
    header = bytes([mq.PUBLISH << 4]) + mq.encode_length(2 * 1024 * 1024)
    await assert_closes(env, caplog, "max_packet_size", header)


async def test_too_many_unreleased_qos2_publishes_close(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-4.3.3 / MQTT-4.8.0-1: more than max_incoming_qos2 (100) QoS 2 PUBLISHes awaiting PUBREL close
    the connection, so a client cannot make the broker hold unbounded state [item 8]."""
    flood = [mq.publish("flood/t", b"x", qos=2, packet_id=i) for i in range(1, 102)]
    await assert_closes(env, caplog, "max_incoming_qos2", *flood)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("CONNACK", mq.packet(mq.CONNACK, 0, b"\x00\x00")),
        ("SUBACK", mq.packet(mq.SUBACK, 0, b"\x00\x01\x00")),
    ],
    ids=["CONNACK", "SUBACK"],
)
async def test_server_only_packet_from_client_closes(
    env: Env, caplog: pytest.LogCaptureFixture, name: str, data: bytes
) -> None:
    """MQTT-4.8.0-1: a CONNACK or SUBACK sent by a client (only a server sends them) closes the connection
    [item 10]."""
    await assert_closes(env, caplog, f"{name} sent by a client", data)


# --------------------------------------------------------------------------------- QoS of deliveries


async def _deliveries(
    env: Env, subscriptions: list[tuple[str, int]], topic: str, qos: int
) -> list[mq.Packet]:
    """Subscribe a fresh client with `subscriptions`, publish one message to `topic` at `qos` from another,
    and answer every PUBLISH the subscriber gets (each acknowledged)."""
    async with RawClient.open(env.mqtt_port) as sub, RawClient.open(env.mqtt_port) as pub:
        await sub.connect(_fresh("sub"))
        for i, (topic_filter, sub_qos) in enumerate(subscriptions, start=1):
            assert await sub.subscribe(i, (topic_filter, sub_qos)) == [sub_qos]
        await pub.connect(_fresh("pub"))
        await pub.send(mq.publish(topic, b"m", qos=qos, packet_id=3 if qos else None))
        if qos == 1:
            await pub.expect(mq.PUBACK)
        elif qos == 2:
            await pub.expect(mq.PUBREC)
            await pub.send(mq.pubrel(3))
            await pub.expect(mq.PUBCOMP)
        got = [await sub.expect(mq.PUBLISH)]
        while (extra := await sub.silent(QUIET_S)) is not None:
            got.append(extra)
        for p in got:
            if p.type == mq.PUBLISH and p.qos == 1:
                await sub.send(mq.puback(p.packet_id))
            elif p.type == mq.PUBLISH and p.qos == 2:
                await sub.send(mq.pubrec(p.packet_id))
        await sub.send(mq.disconnect())
        await pub.send(mq.disconnect())
        return got


async def test_qos0_publish_to_qos1_subscription_arrives_at_qos0(env: Env) -> None:
    """MQTT-3.3.5-1 / MQTT-3.8.4-6: subscribed at QoS 1, a QoS 0 PUBLISH is delivered at QoS 0 [item 11]."""
    [got] = await _deliveries(env, [("q/a", 1)], "q/a", 0)
    assert (got.topic, got.qos, got.payload) == ("q/a", 0, b"m")


async def test_qos1_publish_to_qos0_subscription_arrives_at_qos0(env: Env) -> None:
    """MQTT-3.3.5-1 / MQTT-3.8.4-6: subscribed at QoS 0, a QoS 1 PUBLISH is delivered at QoS 0 [item 11]."""
    [got] = await _deliveries(env, [("q/b", 0)], "q/b", 1)
    assert (got.topic, got.qos, got.payload) == ("q/b", 0, b"m")


@pytest.mark.parametrize(("publish_qos", "delivered_qos"), [(0, 0), (1, 1), (2, 1)])
async def test_overlapping_subscriptions_deliver_one_copy(
    env: Env, publish_qos: int, delivered_qos: int
) -> None:
    """MQTT-3.3.5-1: `a/+` at QoS 0 and `a/#` at QoS 1 both match: one copy, at min(publish QoS, the
    highest granted QoS) [item 11]."""
    got = await _deliveries(env, [("a/+", 0), ("a/#", 1)], "a/b", publish_qos)
    assert [(p.topic, p.qos) for p in got] == [("a/b", delivered_qos)], got


async def test_resubscribe_replaces_the_qos(env: Env) -> None:
    """MQTT-3.8.4-3: a SUBSCRIBE to a filter already held replaces its QoS (one subscription, new QoS)
    [item 11]."""
    got = await _deliveries(env, [("r/t", 1), ("r/t", 0)], "r/t", 1)
    assert [(p.topic, p.qos) for p in got] == [("r/t", 0)], got


async def test_dollar_topics_are_not_matched_by_wildcards(env: Env) -> None:
    """MQTT-4.7.2-1: `$SYS/x` from the broker reaches `$SYS/#` but not `#`; a client's PUBLISH to a `$`
    topic is acknowledged and not routed [item 11]."""
    async with (
        RawClient.open(env.mqtt_port) as everything,
        RawClient.open(env.mqtt_port) as system,
        RawClient.open(env.mqtt_port) as pub,
    ):
        await everything.connect("hash")
        assert await everything.subscribe(1, ("#", 0)) == [0]
        await system.connect("sys")
        assert await system.subscribe(1, ("$SYS/#", 0)) == [0]
        await env.running.broker.internal_message_broadcast("$SYS/x", b"up", qos=0)
        got = await system.expect(mq.PUBLISH)
        assert (got.topic, got.payload) == ("$SYS/x", b"up")
        await pub.connect("pub")
        await publish_qos1(pub, "$SYS/forged", b"fake", 5)
        assert await system.silent(QUIET_S) is None
        assert await everything.silent(QUIET_S) is None


# -------------------------------------------------------------------------------- persistent sessions


async def _offline_session(port: int, client_id: str, topic: str) -> None:
    """A clean=0 session for `client_id` subscribed at QoS 1 to `topic`, then disconnected."""
    async with RawClient.open(port) as client:
        await client.connect(client_id, clean=False)
        assert await client.subscribe(1, (topic, 1)) == [1]
        await client.send(mq.disconnect())
        assert await client.closed(CLOSE_S)


def _offline_queue(env: Env, client_id: str) -> int:
    session = env.running.broker.sessions[client_id][0]
    return int(session.retained_messages.qsize())


async def test_unacknowledged_publish_is_resent_with_dup_on_reconnect(env: Env) -> None:
    """MQTT-3.2.2-2 / MQTT-4.4.0-1 / MQTT-3.3.1-1: a persistent session resumes with session-present 1 and
    its unacknowledged QoS 1 PUBLISH is sent again with the same packet id and DUP set [item 7]."""
    async with RawClient.open(env.mqtt_port) as pub:
        await pub.connect("p1-pub")
        async with RawClient.open(env.mqtt_port) as first:
            ack = await first.connect("p1", clean=False)
            assert (ack.return_code, ack.session_present) == (0, False)
            assert await first.subscribe(1, ("t/1", 1)) == [1]
            await publish_qos1(pub, "t/1", b"notice", 11)
            original = await first.expect(mq.PUBLISH)
            assert (original.qos, original.dup, original.payload) == (1, False, b"notice")
        async with RawClient.open(env.mqtt_port) as again:
            ack = await again.connect("p1", clean=False)
            assert (ack.return_code, ack.session_present) == (0, True)
            resent = await again.expect(mq.PUBLISH)
            assert (resent.topic, resent.payload, resent.qos) == ("t/1", b"notice", 1)
            assert resent.packet_id == original.packet_id
            assert resent.dup
            await again.send(mq.puback(resent.packet_id), mq.disconnect())


async def test_messages_published_while_offline_are_delivered_on_reconnect(env: Env) -> None:
    """MQTT-3.1.2-4 / MQTT-3.1.2-5: QoS 1 messages for an offline persistent session are kept and delivered,
    in order, when it reconnects [item 7]."""
    await _offline_session(env.mqtt_port, "p2", "t/2")
    async with RawClient.open(env.mqtt_port) as pub:
        await pub.connect("p2-pub")
        for i in range(3):
            await publish_qos1(pub, "t/2", b"m%d" % i, 20 + i)
    await eventually(lambda: _offline_queue(env, "p2") == 3, 2, "three messages queued for p2")
    async with RawClient.open(env.mqtt_port) as client:
        ack = await client.connect("p2", clean=False)
        assert ack.session_present
        got = [await client.expect(mq.PUBLISH) for _ in range(3)]
        assert [(p.topic, p.payload, p.qos) for p in got] == [("t/2", b"m%d" % i, 1) for i in range(3)]
        await client.send(*(mq.puback(p.packet_id) for p in got), mq.disconnect())


async def test_clean_reconnect_discards_the_session(env: Env) -> None:
    """MQTT-3.1.2-6: a clean-session reconnect gets session-present 0, none of the queued messages and none
    of the old subscriptions [item 7]."""
    await _offline_session(env.mqtt_port, "p3", "t/3")
    async with RawClient.open(env.mqtt_port) as pub:
        await pub.connect("p3-pub")
        await publish_qos1(pub, "t/3", b"old", 30)
        await eventually(lambda: _offline_queue(env, "p3") == 1, 2, "a message queued for p3")
        async with RawClient.open(env.mqtt_port) as client:
            ack = await client.connect("p3", clean=True)
            assert (ack.return_code, ack.session_present) == (0, False)
            assert await client.silent(QUIET_S) is None
            await publish_qos1(pub, "t/3", b"new", 31)
            assert await client.silent(QUIET_S) is None


async def test_unacknowledged_publish_is_resent_while_connected(env: Env) -> None:
    """MQTT-4.4.0-1: a QoS 1 PUBLISH not acknowledged within retry_interval_s is sent again with DUP and
    the same packet id, and no more once acknowledged [item 7]."""
    use_limits(env, retry_interval_s=0.3)
    async with RawClient.open(env.mqtt_port) as client, RawClient.open(env.mqtt_port) as pub:
        await client.connect("retry")
        assert await client.subscribe(1, ("t/r", 1)) == [1]
        await pub.connect("retry-pub")
        await publish_qos1(pub, "t/r", b"again", 40)
        first = await client.expect(mq.PUBLISH)
        assert not first.dup
        resent = await client.expect(mq.PUBLISH, timeout=1.5)
        assert (resent.dup, resent.packet_id, resent.payload) == (True, first.packet_id, b"again")
        await client.send(mq.puback(first.packet_id))
        late = await client.silent(0.7)
        if late is not None:  # one more copy may have crossed our PUBACK; none may follow it
            assert (late.type, late.packet_id) == (mq.PUBLISH, first.packet_id), late
            assert await client.silent(0.7) is None


async def test_at_most_max_inflight_messages_in_flight(env: Env) -> None:
    """MQTT-4.6.0-2 / MQTT-4.6.0-3: with max_inflight_messages 2, at most two QoS 1 messages await a PUBACK;
    the rest follow as they are acknowledged, all in publish order [item 7]."""
    use_limits(env, max_inflight_messages=2)
    async with RawClient.open(env.mqtt_port) as client, RawClient.open(env.mqtt_port) as pub:
        await client.connect("window")
        assert await client.subscribe(1, ("t/w", 1)) == [1]
        await pub.connect("window-pub")
        for i in range(5):
            await publish_qos1(pub, "t/w", b"m%d" % i, 50 + i)
        received: list[mq.Packet] = []
        while len(received) < 5:
            batch = [await client.expect(mq.PUBLISH) for _ in range(min(2, 5 - len(received)))]
            assert await client.silent(QUIET_S) is None, "a third unacknowledged message was sent"
            received += batch
            await client.send(*(mq.puback(p.packet_id) for p in batch))
        assert [p.payload for p in received] == [b"m%d" % i for i in range(5)]
        assert not any(p.dup for p in received)


async def test_offline_queue_is_bounded(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """MQTT-3.1.2-5: an offline persistent session keeps at most max_queued_messages (3) messages; later
    ones are dropped with a log line [item 8]."""
    use_limits(env, max_queued_messages=3)
    await _offline_session(env.mqtt_port, "q1", "t/q")
    async with RawClient.open(env.mqtt_port) as pub:
        await pub.connect("q1-pub")
        for i in range(5):
            await publish_qos1(pub, "t/q", b"m%d" % i, 60 + i)
    await eventually(
        lambda: any("dropped" in r.getMessage() and "'q1'" in r.getMessage() for r in caplog.records),
        2,
        "the drop to be logged",
    )
    async with RawClient.open(env.mqtt_port) as client:
        assert (await client.connect("q1", clean=False)).session_present
        got = [await client.expect(mq.PUBLISH) for _ in range(3)]
        assert [p.payload for p in got] == [b"m0", b"m1", b"m2"]
        await client.send(*(mq.puback(p.packet_id) for p in got))
        assert await client.silent(QUIET_S) is None
    assert_logged_cleanly(caplog, "offline")


async def test_outgoing_qos2_flow_and_pubrel_resent_on_reconnect(env: Env) -> None:
    """MQTT-4.3.3 / MQTT-4.4.0-1: an outgoing QoS 2 message completes PUBLISH, PUBREC, PUBREL, PUBCOMP;
    after a reconnect that follows PUBREC, the PUBREL (not the PUBLISH) is sent again [item 7]."""
    async with RawClient.open(env.mqtt_port) as pub:
        await pub.connect("q2-pub")

        async def publish_qos2(payload: bytes, packet_id: int) -> None:
            await pub.send(mq.publish("t/q2", payload, qos=2, packet_id=packet_id))
            assert (await pub.expect(mq.PUBREC)).packet_id == packet_id
            await pub.send(mq.pubrel(packet_id))
            assert (await pub.expect(mq.PUBCOMP)).packet_id == packet_id

        async with RawClient.open(env.mqtt_port) as client:
            await client.connect("q2", clean=False)
            assert await client.subscribe(1, ("t/q2", 2)) == [2]
            await publish_qos2(b"one", 70)
            one = await client.expect(mq.PUBLISH)
            assert (one.qos, one.payload) == (2, b"one")
            await client.send(mq.pubrec(one.packet_id))
            rel = await client.expect(mq.PUBREL)
            assert (rel.packet_id, rel.flags) == (one.packet_id, 0x2)
            await client.send(mq.pubcomp(one.packet_id))

            await publish_qos2(b"two", 71)
            two = await client.expect(mq.PUBLISH)
            await client.send(mq.pubrec(two.packet_id))
            assert (await client.expect(mq.PUBREL)).packet_id == two.packet_id
        async with RawClient.open(env.mqtt_port) as client:
            assert (await client.connect("q2", clean=False)).session_present
            resent = await client.next()
            assert resent is not None, "closed instead of resending the PUBREL"
            assert (resent.type, resent.packet_id, resent.flags) == (mq.PUBREL, two.packet_id, 0x2), resent
            await client.send(mq.pubcomp(two.packet_id))
            assert await client.silent(QUIET_S) is None
            await client.send(mq.disconnect())


# ------------------------------------------------------------------------------------------ connections

ACCOUNT, PASSWORD = "app", "app-pw"


async def test_refused_connect_with_a_live_client_id_changes_nothing(tmp_path: Path, tls: Tls) -> None:
    """MQTT-3.2.2-4: a CONNECT reusing a live client id with a wrong password (clean 1, then clean 0) gets
    return code 5 with session-present 0; the victim keeps its connection and its subscription (the
    MQTT-3.1.4-2 takeover applies only to an authenticated CONNECT) [item 2]."""
    config = broker_config(tmp_path / "data", tls, auth_mode="device-secret")
    config["plugins"]["plugins.device_auth.plugin.DeviceAuthPlugin"] = {
        "accounts": {
            ACCOUNT: {
                "password_hash": PasswordHasher().hash(PASSWORD),
                "publish": ["t/#"],
                "subscribe": ["t/#"],
            }
        }
    }
    async with started(config) as running:
        port = running.mqtt_address[1]
        async with RawClient.open(port) as victim, RawClient.open(port) as pub:
            ack = await victim.connect("v1", clean=False, username=ACCOUNT, password=PASSWORD)
            assert ack.return_code == 0
            assert await victim.subscribe(1, ("t/v", 1)) == [1]
            for clean in (True, False):
                async with RawClient.open(port) as attacker:
                    ack = await attacker.connect("v1", clean=clean, username=ACCOUNT, password="wrong")
                    assert (ack.return_code, ack.session_present) == (5, False), (clean, ack)
                    assert await attacker.closed(CLOSE_S)
            assert await victim.silent(QUIET_S) is None  # and still connected
            assert (await pub.connect("v1-pub", username=ACCOUNT, password=PASSWORD)).return_code == 0
            await publish_qos1(pub, "t/v", b"still yours", 80)
            got = await victim.expect(mq.PUBLISH)
            assert (got.topic, got.payload) == ("t/v", b"still yours")
            await victim.send(mq.puback(got.packet_id), mq.disconnect())
            await pub.send(mq.disconnect())


async def test_new_connection_with_same_client_id_closes_the_old(env: Env) -> None:
    """MQTT-3.1.4-2: a second connection with the client id of a live one closes the first; the second
    receives what is published to its subscriptions [item 3]."""
    async with RawClient.open(env.mqtt_port) as first, RawClient.open(env.mqtt_port) as pub:
        assert (await first.connect("twin")).return_code == 0
        assert await first.subscribe(1, ("t/twin", 1)) == [1]
        async with RawClient.open(env.mqtt_port) as second:
            ack = await second.connect("twin")
            assert (ack.return_code, ack.session_present) == (0, False)
            assert await first.closed(CLOSE_S), "the first connection was left open"
            assert await second.subscribe(1, ("t/twin", 1)) == [1]
            await pub.connect("twin-pub")
            await publish_qos1(pub, "t/twin", b"hello", 90)
            got = await second.expect(mq.PUBLISH)
            assert (got.topic, got.payload) == ("t/twin", b"hello")
            await second.send(mq.puback(got.packet_id))
            assert await second.silent(QUIET_S) is None
            await second.send(mq.disconnect())


async def test_max_connections_slots_come_back(tmp_path: Path, tls: Tls) -> None:
    """A listener's max_connections slot is given back however a connection ends (reset, FIN, bad CONNECT),
    so ten broken connections do not lock out the next clients [item 6]."""
    config = broker_config(tmp_path / "data", tls)
    config["listeners"]["default"]["max_connections"] = 2
    bad_connect = mq.packet(mq.CONNECT, 0, mq.string("MQTX") + bytes([4, 2, 0, 60]) + mq.string("bad"))
    async with started(config) as running:
        port = running.mqtt_address[1]
        for i in range(10):
            async with RawClient.open(port) as client:
                if i % 2:
                    await client.send(bad_connect if i % 4 == 1 else b"\x10\xff")
                if i % 3 == 0:
                    await client.abort()
        async with RawClient.open(port) as one, RawClient.open(port) as two:
            assert (await one.connect("slot-1", timeout=5)).return_code == 0
            assert (await two.connect("slot-2", timeout=5)).return_code == 0
            await one.send(mq.disconnect())
            await two.send(mq.disconnect())


async def test_packet_split_across_writes_is_read_whole(env: Env) -> None:
    """MQTT-4.8.0-1: a packet split across many TCP writes is read whole (the reader waits for the
    remaining length, it does not guess) [item 10]."""
    async with RawClient.open(env.mqtt_port) as sub, RawClient.open(env.mqtt_port) as pub:
        await sub.connect("split-sub")
        assert await sub.subscribe(1, ("t/split", 0)) == [0]
        await pub.connect("split-pub")
        data = mq.publish("t/split", b"x" * 300, qos=1, packet_id=3)
        for at in range(0, len(data), 7):
            await pub.send(data[at : at + 7])
            await asyncio.sleep(0)
        assert (await pub.expect(mq.PUBACK)).packet_id == 3
        got = await sub.expect(mq.PUBLISH)
        assert got.payload == b"x" * 300


async def test_bad_clients_leave_no_unobserved_exceptions(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """[item 13] A crowd of misbehaving clients (bad packets, half packets, hang-ups before and after
    CONNECT, a subscriber that vanishes with messages in flight) leaves no task exception unobserved and no
    traceback in the log: each costs at most a line."""
    import gc

    caplog.set_level(logging.DEBUG, logger="asyncio")
    bad: list[bytes] = [
        mq.publish("a/+", b"x"),
        b"\x30\xff\xff\xff\xff\x01",
        b"\x82\x05\x00\x01\x00\x01",  # SUBSCRIBE cut short inside its filter
        b"\x30\x0a\x00",  # a PUBLISH that ends early
        b"\xf0\x00",
    ]
    for index, data in enumerate(bad * 4):
        async with RawClient.open(env.mqtt_port) as client:
            if index % 3:
                assert (await client.connect(_fresh("crowd"))).return_code == 0
            await client.send(data)
    # a subscriber that leaves with unacknowledged QoS 1 messages in flight
    topic = _fresh("crowd/inflight")
    async with RawClient.open(env.mqtt_port) as sub, RawClient.open(env.mqtt_port) as pub:
        await sub.connect(_fresh("vanishing"))
        assert await sub.subscribe(1, (topic, 1)) == [1]
        await pub.connect(_fresh("crowd-pub"))
        for packet_id in range(1, 6):
            await publish_qos1(pub, topic, b"m", packet_id)
        await sub.expect(mq.PUBLISH)
    await asyncio.sleep(0.3)
    gc.collect()
    await asyncio.sleep(0.05)
    never = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not never, never
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks
    await assert_serves(env.mqtt_port)


async def test_messages_read_before_a_disconnect_are_all_routed(env: Env) -> None:
    """[item 7] Every PUBLISH that arrived before the DISCONNECT is routed, in order (MQTT-4.6.0-6): amqtt
    queued received messages and dropped that queue when the connection ended, so a burst followed by a
    DISCONNECT lost most of it."""
    topic = _fresh("burst")
    async with RawClient.open(env.mqtt_port) as sub:
        await sub.connect(_fresh("burst-sub"))
        assert await sub.subscribe(1, (topic, 0)) == [0]
        async with RawClient.open(env.mqtt_port) as pub:
            await pub.connect(_fresh("burst-pub"))
            await pub.send(*[mq.publish(topic, b"%d" % i) for i in range(200)], mq.disconnect())
            assert await pub.closed(CLOSE_S)
        got = [int((await sub.expect(mq.PUBLISH, 5)).payload) for _ in range(200)]
        assert got == list(range(200))
