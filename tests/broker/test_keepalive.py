"""MQTT-3.1.2-24 keep-alive enforcement over a real socket."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time

import pytest

from tests.support import Env, eventually


def connect_packet(
    client_id: str, keep_alive: int, username: str | None = None, will: tuple[str, bytes] | None = None
) -> bytes:
    flags = 0x02  # clean session
    payload = struct.pack("!H", len(client_id)) + client_id.encode()
    if will is not None:
        flags |= 0x04 | (1 << 3)  # will flag, will QoS 1
        topic, message = will
        payload += struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", len(message)) + message
    if username is not None:
        flags |= 0x80 | 0x40
        payload += struct.pack("!H", len(username)) + username.encode() + struct.pack("!H", 1) + b"x"
    variable = struct.pack("!H", 4) + b"MQTT" + bytes([4, flags]) + struct.pack("!H", keep_alive)
    body = variable + payload
    return bytes([0x10, len(body)]) + body


async def test_silent_client_is_closed_after_one_and_a_half_keep_alives(env: Env) -> None:
    """MQTT-3.1.2-24: a client that sends nothing for 1.5 x keep-alive is disconnected, not before."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.mqtt_port)
    try:
        writer.write(connect_packet("silent", keep_alive=2))
        await writer.drain()
        assert (await asyncio.wait_for(reader.readexactly(4), 5))[:2] == b"\x20\x02"
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(1), 10)
        elapsed = time.monotonic() - started
        assert data == b""
        assert 2.9 <= elapsed <= 4.5, elapsed
    finally:
        writer.close()
        await writer.wait_closed()


async def test_pinging_client_stays_connected(env: Env) -> None:
    """A client that sends PINGREQ within its keep-alive is never disconnected."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.mqtt_port)
    try:
        writer.write(connect_packet("pinger", keep_alive=1))
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(4), 5)
        for _ in range(4):
            await asyncio.sleep(0.8)
            writer.write(b"\xc0\x00")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\xd0\x00"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_dead_device_goes_offline_and_its_will_is_published(env: Env) -> None:
    """A device that loses power is marked offline once its keep-alive lapses, and its Will is delivered."""
    watcher = await env.device("ops", "watch", client_id="watcher").connect()
    await watcher.subscribe("/pk/dead/user/will")
    reader, writer = await asyncio.open_connection("127.0.0.1", env.mqtt_port)
    try:
        writer.write(connect_packet("pk.dead", 1, username="dead&pk", will=("/pk/dead/user/will", b"gone")))
        inform = b'{"id":1,"params":{"version":"1.0.0"}}'
        topic = b"/ota/device/inform/pk/dead"
        body = struct.pack("!H", len(topic)) + topic + inform
        writer.write(bytes([0x30, len(body)]) + body)
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(4), 5)

        async def online() -> bool:
            d = await env.find("/devices/pk/dead")
            return d is not None and d["online"]

        await eventually(online, what="the device to be online")

        async def offline() -> bool:
            d = await env.find("/devices/pk/dead")
            return d is not None and not d["online"]

        await eventually(offline, timeout=6, what="the silent device to go offline")
        [will] = await watcher.wait_messages("/pk/dead/user/will")
        assert will == {"raw": b"gone"}
    finally:
        writer.close()
        await writer.wait_closed()


async def test_connection_without_connect_is_closed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle socket that never sends CONNECT is closed after the deadline; the listener still serves."""
    broker = env.running.broker
    monkeypatch.setattr(broker, "limits", dataclasses.replace(broker.limits, connect_timeout_s=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", env.mqtt_port)
    try:
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        assert time.monotonic() - started < 3
    finally:
        writer.close()
        await writer.wait_closed()
    d = await env.device("pk", "after").connect()
    await d.inform("1.0.0")
