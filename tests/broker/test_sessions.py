"""Persistent MQTT sessions survive a broker restart through the OTA service's SQLite database
(MQTT-3.1.2-4/-5: a clean-session-0 session keeps its subscriptions and its undelivered QoS 1/2 messages)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker import app as broker_app
from broker.sessions import SessionStore
from plugins.ota.core.topics import DeviceRef
from tests.broker.rawmqtt import PUBACK, PUBLISH, RawClient, puback
from tests.broker.rawmqtt import publish as raw_publish
from tests.support import Device, Env, Tls, broker_config, eventually

_DEV1 = DeviceRef("pk", "dev1")
_LOGIN: dict[str, Any] = {"clean": False, "username": "dev1&pk", "password": "x"}  # a persistent session


async def _subscribe_and_report(device: RawClient) -> None:
    """Device pk/dev1 connects with a persistent session, subscribes to its notices at QoS 1 and reports
    version 1.0.0."""
    assert (await device.connect("pk.dev1", **_LOGIN)).return_code == 0
    assert await device.subscribe(1, ("/ota/device/upgrade/pk/dev1", 1)) == [1]
    inform = json.dumps({"id": 1, "params": {"version": "1.0.0"}}).encode()
    await device.send(raw_publish("/ota/device/inform/pk/dev1", inform, qos=1, packet_id=1))
    await device.expect(PUBACK)


async def _start(data: Path, tls: Tls) -> broker_app.RunningBroker:
    return await broker_app.start(broker_config(data, tls))


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql))


async def _assert_not_restored(running: broker_app.RunningBroker, client_id: str) -> None:
    """`running`, just started on a data folder, holds no session for `client_id`; then it stops."""
    try:
        assert client_id not in running.broker._sessions
    finally:
        await running.stop()


async def _subscribe_and_leave(running: broker_app.RunningBroker) -> None:
    """The client "keeper" subscribes with clean session 0, then leaves: its session stays."""
    device = Device(running.mqtt_address[1], "pk", "d1", client_id="keeper", clean_session=False)
    await (await device.connect()).subscribe("/apps/keeper/inbox")
    device.disconnect()


async def test_subscriptions_and_queued_messages_survive_a_restart(tmp_path: Path, tls: Tls) -> None:
    data = tmp_path / "data"
    running = await _start(data, tls)
    try:
        await _subscribe_and_leave(running)
        sender = await Device(running.mqtt_address[1], "pk", "s1", client_id="sender").connect()
        await sender.publish("/apps/keeper/inbox", b"while-offline", qos=1)
        sender.disconnect()
        await eventually(
            lambda: _rows(data / "ota.db", "SELECT topic FROM mqtt_message WHERE client_id = 'keeper'"),
            what="the queued message to be saved",
        )
    finally:
        await running.stop()

    running = await _start(data, tls)
    try:
        device = Device(running.mqtt_address[1], "pk", "d1", client_id="keeper", clean_session=False)
        present: list[int] = []
        device.client.on_connect = lambda _c, _u, flags, _rc: (
            present.append(flags["session present"]),
            device._connected.set(),
        )
        await device.connect()
        assert present == [1]  # MQTT-3.2.2-2: the restored session is there
        await device.wait_messages("/apps/keeper/inbox")
        assert device.messages("/apps/keeper/inbox") == [{"raw": b"while-offline"}]
        # The subscription came back too, without subscribing again.
        sender = await Device(running.mqtt_address[1], "pk", "s1", client_id="sender").connect()
        await sender.publish("/apps/keeper/inbox", b"after-restart", qos=1)
        await eventually(lambda: len(device.messages("/apps/keeper/inbox")) == 2, what="the new message")
        await eventually(
            lambda: not _rows(data / "ota.db", "SELECT 1 FROM mqtt_message WHERE client_id = 'keeper'"),
            what="delivered messages to leave the database",
        )
        device.disconnect()
        sender.disconnect()
    finally:
        await running.stop()


async def test_a_clean_session_forgets_the_saved_one(tmp_path: Path, tls: Tls) -> None:
    """MQTT-3.1.2-6: connecting with clean session 1 discards the previous session, on disk too."""
    data = tmp_path / "data"
    running = await _start(data, tls)
    try:
        await _subscribe_and_leave(running)
        await eventually(
            lambda: _rows(data / "ota.db", "SELECT topic_filter FROM mqtt_subscription"), what="saved"
        )
        fresh = await Device(running.mqtt_address[1], "pk", "d1", client_id="keeper").connect()
        await eventually(lambda: not _rows(data / "ota.db", "SELECT 1 FROM mqtt_session"), what="forgotten")
        fresh.disconnect()
    finally:
        await running.stop()
    await _assert_not_restored(await _start(data, tls), "keeper")


@pytest.mark.parametrize("online_at_stop", [True, False])
async def test_an_unacknowledged_notice_is_resent_once_after_a_restart(
    tmp_path: Path, tls: Tls, online_at_stop: bool
) -> None:
    """A persistent session's QoS 1 message that was in flight at a graceful stop (its client still
    connected, or gone before the stop) is sent once after the restart, with DUP set and its original
    packet id (MQTT-4.4.0-1), and the OTA service does not push a second copy of the same notice."""
    data = tmp_path / "data"
    topic = "/ota/device/upgrade/pk/dev1"
    login = _LOGIN
    # The download address stays the same across the restart, as in a deployment.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        https = f"127.0.0.1:{probe.getsockname()[1]}"
    config = broker_config(data, tls, https_bind=https, public_url=f"https://{https}")
    running = await broker_app.start(config)
    try:
        async with RawClient.open(running.mqtt_address[1]) as device:
            await _subscribe_and_report(device)
            await eventually(
                lambda: _rows(data / "ota.db", "SELECT 1 FROM device_modules"), what="the version recorded"
            )
            async with aiohttp.ClientSession() as http:
                env = Env(running, tls, http)
                firmware = await env.upload(b"\x01" * 1000)
                await env.job(firmware["id"], ["pk/dev1"])
            first = await device.expect(PUBLISH)  # not acknowledged
            assert first.topic == topic and not first.dup
            if online_at_stop:
                await running.stop()
    finally:
        if not online_at_stop:
            await running.stop()

    running = await broker_app.start(config)
    try:
        async with RawClient.open(running.mqtt_address[1]) as device:
            assert (await device.connect("pk.dev1", **login)).session_present
            again = await device.expect(PUBLISH)
            assert (again.topic, again.packet_id, again.dup) == (topic, first.packet_id, True)
            assert again.payload == first.payload
            await device.send(puback(again.packet_id))
            extra = await device.silent(1.5)
            assert extra is None, f"sent again: {extra}"
    finally:
        await running.stop()


async def test_a_notice_queued_for_an_offline_session_is_delivered_once(tmp_path: Path, tls: Tls) -> None:
    """A persistent session that was offline when its upgrade started gets the notice once when it
    reconnects (whether the notice was queued for it or sent on reconnect), never twice."""
    data = tmp_path / "data"
    topic = "/ota/device/upgrade/pk/dev1"
    login = _LOGIN
    running = await _start(data, tls)
    try:
        async with RawClient.open(running.mqtt_address[1]) as device:
            await _subscribe_and_report(device)
        async with aiohttp.ClientSession() as http:
            env = Env(running, tls, http)
            await eventually(lambda: not running.plugin.is_online(_DEV1), what="the device to be offline")
            firmware = await env.upload(b"\x01" * 1000)
            await env.job(firmware["id"], ["pk/dev1"])
            await asyncio.sleep(0.5)  # the job's first step (a notice queued now, or none while offline)
        async with RawClient.open(running.mqtt_address[1]) as device:
            assert (await device.connect("pk.dev1", **login)).session_present
            notice = await device.expect(PUBLISH)
            assert notice.topic == topic
            await device.send(puback(notice.packet_id))
            extra = await device.silent(1.5)
            assert extra is None, f"sent again: {extra}"
    finally:
        await running.stop()


async def test_sessions_saved_by_an_older_version_are_restored(tmp_path: Path) -> None:
    """A database whose `mqtt_message` table predates in-flight messages gains the columns at open, and its
    queued messages come back as queued ones."""
    db = tmp_path / "ota.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE mqtt_session (client_id TEXT PRIMARY KEY, username TEXT, seen_at REAL NOT NULL);
            CREATE TABLE mqtt_message (id INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT NOT NULL,
                topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL);
            INSERT INTO mqtt_session VALUES ('keeper', 'u', 1.0);
            INSERT INTO mqtt_message (client_id, topic, payload, qos) VALUES ('keeper', 't', x'01', 1);
            """
        )
    store = SessionStore(db)
    try:
        found = await store.open()
    finally:
        await store.close()
    (saved,) = found.sessions
    assert found.retained == []
    assert (saved.client_id, saved.messages, saved.in_flight) == ("keeper", [("t", b"\x01", 1)], [])


# ---------------------------------------------------------------------------------------- expiry
#
# `session_expiry_interval` is long here (an hour), so the broker's own once-a-second check never expires
# anything during a test; each test asks the broker for what is due at a chosen wall-clock time instead.

_HOUR = 3600


async def _start_expiring(data: Path, tls: Tls) -> broker_app.RunningBroker:
    return await broker_app.start(broker_config(data, tls) | {"session_expiry_interval": _HOUR})


def _saved_sessions(db: Path) -> list[object]:
    return [row[0] for row in _rows(db, "SELECT client_id FROM mqtt_session")]


async def test_a_persistent_session_expires_its_interval_after_its_client_left(
    tmp_path: Path, tls: Tls
) -> None:
    """Dropped, in memory and on disk, once `session_expiry_interval` has passed since its client left, and
    not a second earlier; what is published to it afterwards is not queued for anyone."""
    data = tmp_path / "data"
    running = await _start_expiring(data, tls)
    broker = running.broker
    try:
        await _subscribe_and_leave(running)
        await eventually(
            lambda: "keeper" in broker._sessions and broker._sessions["keeper"][0].last_disconnect_time
        )
        await eventually(lambda: _saved_sessions(data / "ota.db") == ["keeper"], what="saved")
        left = float(broker._sessions["keeper"][0].last_disconnect_time)

        await broker._expire_sessions(left + _HOUR - 1)
        assert "keeper" in broker._sessions
        await broker._expire_sessions(left + _HOUR + 1)
        assert "keeper" not in broker._sessions
        assert not broker._subscriptions.get("/apps/keeper/inbox")
        await eventually(lambda: _saved_sessions(data / "ota.db") == [], what="deleted on disk")
    finally:
        await running.stop()
    await _assert_not_restored(await _start_expiring(data, tls), "keeper")


async def test_connected_sessions_never_expire_and_a_return_restarts_the_count(
    tmp_path: Path, tls: Tls
) -> None:
    """A client connected for longer than the interval keeps its session; one that comes back and leaves
    again is counted from its last departure, not its first."""
    data = tmp_path / "data"
    running = await _start_expiring(data, tls)
    broker = running.broker
    port = running.mqtt_address[1]
    try:
        online = await Device(port, "pk", "d2", client_id="online", clean_session=False).connect()
        await _subscribe_and_leave(running)
        await eventually(lambda: broker._sessions["keeper"][0].transitions.state == "disconnected")
        first = float(broker._sessions["keeper"][0].last_disconnect_time)
        back = await Device(port, "pk", "d1", client_id="keeper", clean_session=False).connect()
        await eventually(lambda: broker._sessions["keeper"][0].transitions.state == "connected")
        await asyncio.sleep(1.1)  # wall-clock seconds: its second departure is later than its first
        back.disconnect()
        await eventually(lambda: broker._sessions["keeper"][0].transitions.state == "disconnected")
        second = float(broker._sessions["keeper"][0].last_disconnect_time)
        assert second > first

        await broker._expire_sessions(first + _HOUR + 0.5)
        assert {"keeper", "online"} <= set(broker._sessions)
        await broker._expire_sessions(second + 10 * _HOUR)
        assert "keeper" not in broker._sessions
        assert "online" in broker._sessions  # connected all along
        await online.publish("/apps/online/ping", b"still here")
        online.disconnect()
    finally:
        await running.stop()


async def test_a_restored_session_expires_from_when_its_client_left(tmp_path: Path, tls: Tls) -> None:
    """After a restart the count goes on from the departure saved on disk: a session whose client left
    more than the interval ago is dropped at the first check, a recent one is kept, and one connected
    when the broker stopped counts from the stop."""
    data = tmp_path / "data"
    running = await _start_expiring(data, tls)
    port = running.mqtt_address[1]
    try:
        await _subscribe_and_leave(running)
        device = Device(port, "pk", "d2", client_id="connected", clean_session=False)
        await (await device.connect()).subscribe("/apps/connected/inbox")
        await eventually(lambda: sorted(_saved_sessions(data / "ota.db")) == ["connected", "keeper"])
        left = running.broker._sessions["keeper"][0].last_disconnect_time
        await eventually(
            lambda: (
                left
                and _rows(data / "ota.db", "SELECT seen_at FROM mqtt_session WHERE client_id = 'keeper'")[0][
                    0
                ]
                >= left
            ),
            what="the departure saved",
        )
        with sqlite3.connect(data / "ota.db") as conn:  # both came two intervals ago; "keeper" left then
            conn.execute("UPDATE mqtt_session SET seen_at = seen_at - 2 * ?", (_HOUR,))
        stopped = time.time()
    finally:
        await running.stop()
    device.disconnect()
    (connected_seen,) = _rows(
        data / "ota.db", "SELECT seen_at FROM mqtt_session WHERE client_id = 'connected'"
    )
    assert connected_seen[0] >= stopped  # saved at the stop, not at its CONNECT

    running = await _start_expiring(data, tls)
    try:
        broker = running.broker
        await eventually(lambda: "keeper" not in broker._sessions, what="the old session dropped")
        await eventually(lambda: _saved_sessions(data / "ota.db") == ["connected"], what="deleted on disk")
        assert "connected" in broker._sessions
        await broker._expire_sessions(time.time() + _HOUR + 5)
        assert "connected" not in broker._sessions
    finally:
        await running.stop()


async def test_a_clean_session_leaves_nothing_to_expire(tmp_path: Path, tls: Tls) -> None:
    """A clean session ends with its connection: nothing of it waits in the expiry heap (which would keep
    every clean session of a connect/disconnect churn alive until the next check)."""
    running = await _start_expiring(tmp_path / "data", tls)
    broker = running.broker
    try:
        device = await Device(running.mqtt_address[1], "pk", "d3", client_id="passing").connect()
        await device.subscribe("/apps/passing/inbox")
        device.disconnect()
        await eventually(lambda: "passing" not in broker._sessions, what="the clean session dropped")
        assert [entry for entry in broker._expiring if entry[2] == "passing"] == []
    finally:
        await running.stop()
