"""Will messages: malformed Will topics close the connection at CONNECT, a Will on a `$` topic is refused,
and a Will the client may not publish is never sent (amqtt 0.12.1 accepts all three)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from argon2 import PasswordHasher

from broker import app as broker_app
from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef
from tests.support import Env, Tls, broker_config


def connect_packet(client_id: str, username: str, password: str, will: tuple[str, bytes]) -> bytes:
    def s(text: str | bytes) -> bytes:
        raw = text.encode() if isinstance(text, str) else text
        return struct.pack("!H", len(raw)) + raw

    flags = 0x02 | 0x04 | 0x80 | 0x40
    variable = s("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body = variable + s(client_id) + s(will[0]) + s(will[1]) + s(username) + s(password)
    length = len(body)
    encoded = b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x10" + encoded + body


async def connack(port: int, packet: bytes) -> tuple[int, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(packet)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readexactly(4), 5)
    return answer[3], writer


@pytest.mark.parametrize("topic", ["/a/#", "/a/+/b", "#", ""])
async def test_malformed_will_topic_closes_without_connack(env: Env, topic: str) -> None:
    """MQTT-3.1.4-1 / MQTT-4.7.1-1 / MQTT-4.7.3-1: a Will topic with wildcards, or empty, makes the CONNECT
    malformed: the connection is closed at once, without a CONNACK."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.mqtt_port)
    try:
        writer.write(connect_packet("w1", "dev&pk", "x", (topic, b"bye")))
        assert await asyncio.wait_for(reader.read(4), 2) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_will_on_a_dollar_topic_is_refused(env: Env) -> None:
    """MQTT-4.7.2-1: `$` topics are the broker's, so a Will there is refused with return code 5."""
    rc, writer = await connack(env.mqtt_port, connect_packet("w1", "dev&pk", "x", ("$SYS/x", b"bye")))
    writer.close()
    await writer.wait_closed()
    assert rc == 5


@pytest.fixture
async def secure(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    config = broker_config(tmp_path / "data", tls, auth_mode="device-secret")
    config["plugins"]["plugins.device_auth.plugin.DeviceAuthPlugin"] = {
        "accounts": {"watch": {"password_hash": PasswordHasher().hash("w"), "subscribe": ["#"]}}
    }
    running = await broker_app.start(config)
    async with aiohttp.ClientSession() as http:
        e = Env(running, tls, http)
        yield e
        for d in e.devices:
            d.disconnect()
    await running.stop()


async def test_will_outside_the_clients_topics_is_never_sent(secure: Env) -> None:
    """A device's Will on another device's topic is dropped at CONNECT; a Will on its own topic is sent."""
    env = secure
    watcher = env.device("ops", "watch", client_id="watcher", username="watch")
    watcher.client.username_pw_set("watch", "w")
    await watcher.connect()
    await watcher.subscribe("/pk/#")
    created = await env.api("POST", "/devices", expect=201, json={"product_key": "pk", "device_name": "a"})
    login = login_for(DeviceRef("pk", "a"), created["device_secret"])

    for topic, should_arrive in (("/pk/b/user/will", False), ("/pk/a/user/will", True)):
        rc, writer = await connack(
            env.mqtt_port, connect_packet(login.client_id, login.username, login.password, (topic, b"gone"))
        )
        assert rc == 0
        writer.transport.abort()  # power loss: no DISCONNECT, so the Will is due
        await asyncio.sleep(0.5)
        assert bool(watcher.messages(topic)) is should_arrive, topic
