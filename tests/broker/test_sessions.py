"""Persistent MQTT sessions survive a broker restart through the OTA service's SQLite database
(MQTT-3.1.2-4/-5: a clean-session-0 session keeps its subscriptions and its undelivered QoS 1/2 messages)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker import app as broker_app
from tests.support import Device, Tls, broker_config, eventually


async def _start(data: Path, tls: Tls) -> broker_app.RunningBroker:
    return await broker_app.start(broker_config(data, tls))


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql))


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
    running = await _start(data, tls)
    try:
        assert "keeper" not in running.broker._sessions
    finally:
        await running.stop()
