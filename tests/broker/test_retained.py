"""Retained messages reach only the sessions that subscribed to them (amqtt 0.12.1 replays every client's
filters to each new connection), and survive the broker process being killed (amqtt keeps them in memory
only)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import sys
from pathlib import Path

from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.e2e.processes import Launched
from tests.support import Env, eventually


async def test_new_client_gets_no_retained_messages_of_other_clients_filters(env: Env) -> None:
    """A client that subscribed to nothing receives no retained message, even one matching another
    client's subscription; once it subscribes itself it gets the retained message exactly once."""
    holder = await env.device("ops", "holder", client_id="holder").connect()
    await holder.subscribe("/apps/x/#")
    publisher = await env.device("ops", "pub", client_id="publisher").connect()
    info = publisher.client.publish("/apps/x/1", b"retained-value", qos=1, retain=True)
    await asyncio.to_thread(info.wait_for_publish, 5)
    await holder.wait_messages("/apps/x/1")

    newcomer = await env.device("ops", "new", client_id="newcomer").connect()
    await asyncio.sleep(0.5)
    assert newcomer.received == []
    await newcomer.subscribe("/apps/x/#")
    [message] = await newcomer.wait_messages("/apps/x/1")
    assert message == {"raw": b"retained-value"}
    await asyncio.sleep(0.3)
    assert len(newcomer.messages("/apps/x/1")) == 1


async def test_retained_messages_survive_kill_9(tmp_path: Path) -> None:
    """Retained messages are kept in SQLite as they change (set, replaced, removed by an empty payload,
    MQTT-3.3.1-10), so a broker killed with SIGKILL serves them again after its restart, with RETAIN set
    (MQTT-3.3.1-6)."""
    data = tmp_path / "data"
    env = {"OTA_AUTH_MODE": "open", "OTA_MQTTS_BIND": ""}
    first = Launched([sys.executable, "-m", "broker", "run"], tmp_path, data, env)
    try:
        await asyncio.to_thread(first.start)
        async with RawClient.open(first.ports["mqtt"]) as pub:
            assert (await pub.connect("retainer")).return_code == 0
            for packet_id, (topic, payload) in enumerate(
                [
                    ("r/keep", b"v1"),
                    ("r/replaced", b"old"),
                    ("r/replaced", b"new"),
                    ("r/gone", b"x"),
                    ("r/gone", b""),
                ],
                start=1,
            ):
                await pub.send(mq.publish(topic, payload, qos=1, packet_id=packet_id, retain=True))
                assert (await pub.expect(mq.PUBACK)).packet_id == packet_id
        saved = {"r/keep": b"v1", "r/replaced": b"new"}
        await eventually(lambda: _retained_rows(data / "ota.db") == saved, 5, "the retained messages saved")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        first.close()
    second = Launched([sys.executable, "-m", "broker", "run"], tmp_path, data, env)
    try:
        await asyncio.to_thread(second.start)
        async with RawClient.open(second.ports["mqtt"]) as sub:
            assert (await sub.connect("reader")).return_code == 0
            assert await sub.subscribe(1, ("r/#", 1)) == [1]
            got = [await sub.expect(mq.PUBLISH) for _ in range(2)]
            assert {p.topic: p.payload for p in got} == saved
            assert all(p.retain for p in got)
            await sub.send(*(mq.puback(p.packet_id) for p in got))
            assert await sub.silent(0.3) is None  # nothing for r/gone
            await sub.send(mq.disconnect())
    finally:
        second.close()


def _retained_rows(db: Path) -> dict[str, bytes]:
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            return {
                topic: bytes(payload)
                for topic, payload in conn.execute("SELECT topic, payload FROM mqtt_retained")
            }
        except sqlite3.OperationalError:  # not created yet
            return {}
