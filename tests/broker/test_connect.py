"""MQTT 3.1.1 CONNECT handling, driven with raw packets over a real socket: clean sessions end with their
connection, the CONNECT is decoded whole and checked field by field before anything else happens, the
first packet must be a CONNECT, other protocol levels are refused with return code 1, and sockets that
never send a CONNECT cannot starve a listener.

Each test names the statement of the standard it pins down (MQTT-x.y.z-n).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.broker.test_conformance import (
    CLOSE_S,
    QUIET_S,
    _fresh,
    assert_serves,
    publish_qos1,
    started,
)
from tests.support import Env, Tls, broker_config, eventually

# ------------------------------------------------------------------------------------- clean sessions


async def _no_delivery(port: int, client: RawClient, topic: str) -> None:
    """A QoS 1 message published to `topic` does not reach `client`."""
    async with RawClient.open(port) as pub:
        assert (await pub.connect(_fresh("clean-pub"))).return_code == 0
        await publish_qos1(pub, topic, b"for the old session", 5)
        assert await client.silent(QUIET_S) is None
        await pub.send(mq.disconnect())


@pytest.mark.parametrize("ending", ["disconnect", "reset"])
async def test_persistent_connect_after_a_clean_session_starts_empty(env: Env, ending: str) -> None:
    """MQTT-3.1.2-6 / MQTT-3.2.2-2: a clean session is discarded when its connection ends (DISCONNECT or
    not), so a clean-session-0 CONNECT of the same client id gets session-present 0 and none of its
    subscriptions."""
    client_id, topic = _fresh("was-clean"), _fresh("clean/t")
    async with RawClient.open(env.mqtt_port) as first:
        assert (await first.connect(client_id, clean=True)).return_code == 0
        assert await first.subscribe(1, (topic, 1)) == [1]
        if ending == "disconnect":
            await first.send(mq.disconnect())
            assert await first.closed(CLOSE_S)
        else:
            await first.abort()
    await asyncio.sleep(0.1)
    async with RawClient.open(env.mqtt_port) as second:
        ack = await second.connect(client_id, clean=False)
        assert (ack.return_code, ack.session_present) == (0, False)
        await _no_delivery(env.mqtt_port, second, topic)
        await second.send(mq.disconnect())
    async with RawClient.open(env.mqtt_port) as third:  # the persistent session now exists
        ack = await third.connect(client_id, clean=False)
        assert (ack.return_code, ack.session_present) == (0, True)
        await third.send(mq.disconnect())


async def test_persistent_connect_taking_over_a_clean_session_starts_empty(env: Env) -> None:
    """MQTT-3.1.2-6 / MQTT-3.2.2-2 / MQTT-3.1.4-2: a clean-session-0 CONNECT that takes over a live
    clean-session-1 connection closes it and starts an empty session: session-present 0, and the old
    session's subscription is not delivered to the new connection."""
    client_id, topic = _fresh("live-clean"), _fresh("clean/live")
    async with RawClient.open(env.mqtt_port) as first:
        assert (await first.connect(client_id, clean=True)).return_code == 0
        assert await first.subscribe(1, (topic, 1)) == [1]
        async with RawClient.open(env.mqtt_port) as second:
            ack = await second.connect(client_id, clean=False)
            assert (ack.return_code, ack.session_present) == (0, False)
            assert await first.closed(CLOSE_S)
            await _no_delivery(env.mqtt_port, second, topic)
            await second.send(mq.disconnect())


# ------------------------------------------------------------------------- the CONNECT, field by field

AT_ONCE_S = 1.0  # well under the 10 s CONNECT deadline: "closed at once"
S = mq.string
CLEAN, WILL, WILL_RETAIN, PASSWORD, USERNAME = 0x02, 0x04, 0x20, 0x40, 0x80


def _will_qos(qos: int) -> int:
    return qos << 3


async def assert_closed_without_connack(
    port: int, caplog: pytest.LogCaptureFixture, reason: str, *data: bytes
) -> None:
    """`data` as the first bytes of a connection makes the broker close it at once, without sending
    anything (no CONNACK), with one log line naming `reason` and no traceback; the listener still serves."""
    caplog.set_level(logging.INFO, logger="ota.broker")
    async with RawClient.open(port) as client:
        await client.send(*data)
        assert await client.closed(AT_ONCE_S), f"still open {AT_ONCE_S}s after {b''.join(data)[:48].hex()}"
        assert client.skipped == [], client.skipped
    lines = [r.getMessage() for r in caplog.records if r.name == "ota.broker"]
    assert any(reason in line for line in lines), f"no log line naming {reason!r} in {lines}"
    assert not [r for r in caplog.records if r.exc_info]
    await assert_serves(port)


MALFORMED = {
    "will topic not UTF-8 [MQTT-1.5.3-1]": (
        "MQTT-1.5.3-1",
        mq.raw_connect(CLEAN | WILL, S("w"), S(b"a/\xff\xfe"), S("bye")),
    ),
    "will QoS without the will flag [MQTT-3.1.2-13]": (
        "MQTT-3.1.2-13",
        mq.raw_connect(CLEAN | _will_qos(1), S("w")),
    ),
    "will QoS 3 [MQTT-3.1.2-14]": (
        "MQTT-3.1.2-14",
        mq.raw_connect(CLEAN | WILL | _will_qos(3), S("w"), S("a/b"), S("bye")),
    ),
    "will retain without the will flag [MQTT-3.1.2-15]": (
        "MQTT-3.1.2-15",
        mq.raw_connect(CLEAN | WILL_RETAIN, S("w")),
    ),
    "empty will topic [MQTT-4.7.3-1]": (
        "MQTT-4.7.3-1",
        mq.raw_connect(CLEAN | WILL, S("w"), S(""), S("bye")),
    ),
    "will topic with a wildcard [MQTT-4.7.1-1]": (
        "MQTT-4.7.1-1",
        mq.raw_connect(CLEAN | WILL | _will_qos(1), S("w"), S("a/+"), S("bye")),
    ),
    "will flag without a will message": (
        "Will message",
        mq.raw_connect(CLEAN | WILL, S("w"), S("a/b")),
    ),
    "reserved flag [MQTT-3.1.2-3]": ("MQTT-3.1.2-3", mq.raw_connect(CLEAN | 0x01, S("w"))),
    "password without user name [MQTT-3.1.2-22]": (
        "MQTT-3.1.2-22",
        mq.raw_connect(CLEAN | PASSWORD, S("w"), S("secret")),
    ),
    "client id not UTF-8 [MQTT-1.5.3-1]": ("MQTT-1.5.3-1", mq.raw_connect(CLEAN, S(b"\xc0\xaf"))),
    "client id with U+0000 [MQTT-1.5.3-2]": ("MQTT-1.5.3-2", mq.raw_connect(CLEAN, S(b"a\x00b"))),
    "user name not UTF-8 [MQTT-3.1.3-11]": (
        "MQTT-1.5.3-1",
        mq.raw_connect(CLEAN | USERNAME, S("w"), S(b"\xed\xa0\x80")),
    ),
    "fixed-header flags [MQTT-2.2.2-2]": ("MQTT-2.2.2-2", mq.raw_connect(CLEAN, S("w"), header_flags=1)),
    "a TLS ClientHello on the plain port": ("MQTT-2.2.2-2", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    "bytes after the payload": ("after its payload", mq.raw_connect(CLEAN, S("w"), b"\x00")),
    "client id longer than the packet": ("longer than the packet", mq.raw_connect(CLEAN, b"\x00\x20w")),
    "user name flag without a user name": ("truncated", mq.raw_connect(CLEAN | USERNAME, S("w"))),
    "variable header cut short": ("cut short", mq.packet(mq.CONNECT, 0, S("MQTT") + bytes([4, 2]))),
    "protocol name not MQTT [MQTT-3.1.2-1]": ("MQTT-3.1.2-1", mq.raw_connect(CLEAN, S("w"), name="MQTX")),
    "protocol name in lower case [MQTT-3.1.2-1]": (
        "MQTT-3.1.2-1",
        mq.raw_connect(CLEAN, S("w"), name="mqtt"),
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_connect_closes_at_once_without_connack(
    env: Env, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """MQTT-3.1.4-1: a CONNECT that breaks any rule of section 3.1 (flags, Will, strings, lengths, protocol
    name) closes the connection at once, without a CONNACK."""
    reason, data = MALFORMED[case]
    await assert_closed_without_connack(env.mqtt_port, caplog, reason, data)


@pytest.mark.parametrize(
    "first",
    [
        mq.publish("a/b", b"x", qos=1, packet_id=1),
        mq.publish("a/b", b"x"),
        mq.pingreq(),
        mq.subscribe(1, ("a/#", 0)),
        mq.disconnect(),
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
async def test_first_packet_other_than_connect_closes_at_once(
    env: Env, caplog: pytest.LogCaptureFixture, first: bytes
) -> None:
    """MQTT-3.1.0-1: the first packet from a client must be a CONNECT; anything else closes the connection
    at once (amqtt waited for the 10 s CONNECT deadline)."""
    await assert_closed_without_connack(env.mqtt_port, caplog, "MQTT-3.1.0-1", first)


async def test_connect_over_max_packet_size_closes_before_its_body(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A CONNECT whose remaining length is over max_packet_size is closed from its fixed header, before
    its body arrives."""
    await assert_closed_without_connack(
        env.mqtt_port,
        caplog,
        "max_packet_size",
        b"\x10" + mq.encode_length(4 * 1024 * 1024) + b"\x00\x04MQTT",
    )


async def test_connect_cut_short_by_eof_closes_at_once(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A connection that ends in the middle of its CONNECT is closed at once, without a CONNACK."""
    data = mq.connect("cut")
    async with RawClient.open(env.mqtt_port) as client:
        await client.send(data[: len(data) // 2])
        client._writer.write_eof()
        assert await client.closed(AT_ONCE_S)
        assert client.skipped == []
    await assert_serves(env.mqtt_port)


async def test_connect_split_across_writes_is_read_whole(env: Env) -> None:
    """A CONNECT that arrives a few bytes at a time is read whole by its remaining length."""
    data = mq.connect("trickle", username="u", password="p", will=("w/t", b"bye", 1, False))
    async with RawClient.open(env.mqtt_port) as client:
        for at in range(0, len(data), 3):
            await client.send(data[at : at + 3])
            await asyncio.sleep(0.01)
        assert (await client.expect(mq.CONNACK)).return_code == 0
        await client.send(mq.disconnect())


# ------------------------------------------------------------------------------------ refused CONNECTs


def _v5_properties(size: int) -> bytes:
    """MQTT 5 CONNECT properties of about `size` bytes: session expiry, receive maximum, user properties."""
    block = b"\x11\x00\x00\x0e\x10" + b"\x21\x00\x14"
    while len(block) < size:
        block += b"\x26" + S("key") + S("v" * 40)
    return block


PROTOCOL_LEVELS = {
    "MQTT 5 with properties": mq.raw_connect(CLEAN, S("v5"), level=5, properties=_v5_properties(10)),
    "MQTT 5 with a long property block": mq.raw_connect(
        CLEAN, S("v5"), level=5, properties=_v5_properties(600)
    ),
    "MQTT 5 without properties": mq.raw_connect(CLEAN, S("v5"), level=5, properties=b""),
    "level 6": mq.raw_connect(CLEAN, S("v6"), level=6),
    "level 0": mq.raw_connect(CLEAN, S("v0"), level=0),
    "level 255 and nothing after it": mq.packet(mq.CONNECT, 0, S("MQTT") + b"\xff"),
    "MQTT 3.1 (MQIsdp, level 3)": mq.raw_connect(CLEAN, S("v3"), name="MQIsdp", level=3),
    "level 3 named MQTT": mq.raw_connect(CLEAN, S("v3"), level=3),
}


@pytest.mark.parametrize("case", PROTOCOL_LEVELS)
async def test_other_protocol_levels_get_return_code_1_at_once(
    env: Env, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """MQTT-3.1.2-2: a CONNECT with any protocol level but 4 (MQTT 3.1.1), whatever follows the level
    byte, is answered at once with CONNACK return code 1, session-present 0, and closed."""
    caplog.set_level(logging.INFO, logger="ota.broker")
    async with RawClient.open(env.mqtt_port) as client:
        await client.send(PROTOCOL_LEVELS[case])
        ack = await client.expect(mq.CONNACK, AT_ONCE_S)
        assert (ack.return_code, ack.session_present) == (1, False)
        assert await client.closed(AT_ONCE_S)
    assert any("MQTT-3.1.2-2" in r.getMessage() for r in caplog.records)
    await assert_serves(env.mqtt_port)


async def test_empty_client_id_with_clean_session_0_is_refused(env: Env) -> None:
    """MQTT-3.1.3-8: an empty client id with clean session 0 gets CONNACK return code 2, then a close."""
    async with RawClient.open(env.mqtt_port) as client:
        await client.send(mq.raw_connect(0, S("")))
        ack = await client.expect(mq.CONNACK, AT_ONCE_S)
        assert (ack.return_code, ack.session_present) == (2, False)
        assert await client.closed(AT_ONCE_S)


async def test_empty_client_id_with_clean_session_1_is_accepted(env: Env) -> None:
    """MQTT-3.1.3-6: an empty client id with clean session 1 is accepted, and the client is served."""
    async with RawClient.open(env.mqtt_port) as client:
        await client.send(mq.raw_connect(CLEAN, S("")))
        assert (await client.expect(mq.CONNACK)).return_code == 0
        assert await client.subscribe(1, ("anon/t", 0)) == [0]
        await client.send(mq.disconnect())


async def test_binary_password_is_accepted(env: Env) -> None:
    """MQTT 3.1.3.5: the password is binary data; bytes that are not UTF-8 are not a malformed CONNECT."""
    async with RawClient.open(env.mqtt_port) as client:
        await client.send(mq.raw_connect(CLEAN | USERNAME | PASSWORD, S("bin"), S("u"), S(b"\xff\x00\xfe")))
        assert (await client.expect(mq.CONNACK)).return_code == 0
        await client.send(mq.disconnect())


# ------------------------------------------------------------------------- sockets without a CONNECT


async def test_idle_sockets_cannot_starve_a_listener(tmp_path: Path, tls: Tls) -> None:
    """Sockets that never send a CONNECT are counted apart from connected clients: with max_connections 4,
    four idle sockets do not keep a fifth client waiting (the oldest idle one is closed), and four
    connected clients are served alongside them."""
    config = broker_config(tmp_path / "data", tls)
    config["listeners"]["default"]["max_connections"] = 4
    async with started(config) as running:
        port = running.mqtt_address[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        try:
            await asyncio.sleep(0.1)
            began = time.monotonic()
            async with RawClient.open(port) as client:
                assert (await client.connect("legit", timeout=AT_ONCE_S)).return_code == 0
                assert time.monotonic() - began < AT_ONCE_S
                await client.send(mq.disconnect())
            assert await asyncio.wait_for(idle[0][0].read(1), AT_ONCE_S) == b""  # the oldest, closed
            clients = [RawClient.open(port) for _ in range(4)]
            opened = [await c.__aenter__() for c in clients]
            try:
                for i, c in enumerate(opened):
                    assert (await c.connect(f"full-{i}", timeout=AT_ONCE_S)).return_code == 0
            finally:
                for c in clients:
                    await c.__aexit__(None, None, None)
        finally:
            for _, writer in idle:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


@pytest.mark.parametrize("sent", [0, 1, 5], ids=["nothing", "one-byte", "part-of-connect"])
async def test_connect_deadline_still_closes_a_silent_socket(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sent: int
) -> None:
    """A socket that sends no CONNECT, or part of one, and then nothing is closed at connect_timeout_s,
    with a log line that says why; one that closes by itself is not reported as late."""
    broker = env.running.broker
    monkeypatch.setattr(broker, "limits", dataclasses.replace(broker.limits, connect_timeout_s=0.5))
    caplog.set_level(logging.DEBUG, logger="ota.broker")
    async with RawClient.open(env.mqtt_port) as client:
        if sent:
            await client.send(mq.connect("slow")[:sent])
        assert await client.closed(2)
        assert client.skipped == []
    await eventually(lambda: "no CONNECT within 0.5s" in caplog.text, what="the log line")
    caplog.clear()
    async with RawClient.open(env.mqtt_port) as client:
        await client.send(mq.connect("quick")[:sent])
    await eventually(lambda: "ended before its CONNECT" in caplog.text, what="the early close logged")
    assert "no CONNECT within" not in caplog.text


async def test_late_sockets_are_dropped_never_before_their_deadline_and_the_others_kept(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One broker-wide sweep drops the sockets late with their CONNECT: each no earlier than
    connect_timeout_s after it came, the older first, while a client that sent its CONNECT in time stays."""
    broker = env.running.broker
    monkeypatch.setattr(broker, "limits", dataclasses.replace(broker.limits, connect_timeout_s=1.0))
    loop = asyncio.get_running_loop()
    async with (
        RawClient.open(env.mqtt_port) as first,
        RawClient.open(env.mqtt_port) as in_time,
    ):
        first_at = loop.time()
        await asyncio.sleep(0.5)
        async with RawClient.open(env.mqtt_port) as second:
            second_at = loop.time()
            assert (await in_time.connect("in-time")).return_code == 0
            assert await first.closed(5)
            first_closed = loop.time()
            assert not second.eof
            assert await second.closed(5)
            second_closed = loop.time()
        assert first_closed >= first_at + 1.0 and second_closed >= second_at + 1.0
        assert not in_time.eof  # connected: no longer the sweep's
        await in_time.send(mq.pingreq())
        await in_time.expect(mq.PINGRESP)


# --------------------------------------------------------------------------- client ids and identities


def _two_accounts(data: Path, tls: Tls) -> dict[str, object]:
    config = broker_config(data, tls, auth_mode="device-secret")
    rights = {"publish": ["t/#"], "subscribe": ["t/#"]}
    config["plugins"]["plugins.device_auth.plugin.DeviceAuthPlugin"] = {
        "accounts": {
            "alpha": {"password_hash": PasswordHasher().hash("alpha-pw"), **rights},
            "beta": {"password_hash": PasswordHasher().hash("beta-pw"), **rights},
        }
    }
    return config


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("clean", [True, False])
async def test_an_account_cannot_take_over_another_accounts_client_id(
    tmp_path: Path, tls: Tls, online: bool, clean: bool
) -> None:
    """MQTT-3.1.4-2 applies within one identity: an account connecting with a client id another account
    holds (online or with an offline persistent session) gets a session of its own (session-present 0,
    no subscriptions, no queued messages); the holder keeps its connection, subscription and queue."""
    client_id, topic = "shared-app-id", "t/alpha"
    async with started(_two_accounts(tmp_path / "data", tls)) as running:
        port = running.mqtt_address[1]
        async with RawClient.open(port) as alpha, RawClient.open(port) as pub:
            ack = await alpha.connect(client_id, clean=False, username="alpha", password="alpha-pw")
            assert ack.return_code == 0
            assert await alpha.subscribe(1, (topic, 1)) == [1]
            assert (await pub.connect("pub", username="alpha", password="alpha-pw")).return_code == 0
            if not online:
                await alpha.send(mq.disconnect())
                assert await alpha.closed(CLOSE_S)
                await publish_qos1(pub, topic, b"queued for alpha", 1)
            async with RawClient.open(port) as beta:
                ack = await beta.connect(client_id, clean=clean, username="beta", password="beta-pw")
                assert (ack.return_code, ack.session_present) == (0, False)
                await publish_qos1(pub, topic, b"for alpha", 2)
                assert await beta.silent(QUIET_S) is None  # neither alpha's queue nor its subscription
                if online:
                    got = await alpha.expect(mq.PUBLISH)  # still connected, still subscribed
                    assert got.payload == b"for alpha"
                    await alpha.send(mq.puback(got.packet_id), mq.disconnect())
                await beta.send(mq.disconnect())
            if not online:
                async with RawClient.open(port) as again:
                    ack = await again.connect(client_id, clean=False, username="alpha", password="alpha-pw")
                    assert (ack.return_code, ack.session_present) == (0, True)
                    got = [await again.expect(mq.PUBLISH) for _ in range(2)]
                    assert [p.payload for p in got] == [b"queued for alpha", b"for alpha"]
                    await again.send(*(mq.puback(p.packet_id) for p in got), mq.disconnect())
            await pub.send(mq.disconnect())
