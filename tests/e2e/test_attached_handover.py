"""What an attached service received and did not handle is not lost when it dies: against a real Mosquitto 2
and a real PostgreSQL database, a QoS 1 message is acknowledged only once handled, and the session a dead
replica leaves behind is taken over, handled and erased by the leading one. (The same with a replica killed
by SIGKILL in the middle of a campaign: `tests/e2e/test_replicas.py`.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from amqtt.client import MQTTClient
from amqtt.mqtt.constants import QOS_1

from plugins.ota.attached import AttachedService
from plugins.ota.service_client import ServiceClient
from tests.e2e.test_attached import attached_env, attached_settings
from tests.mosquitto import Mosquitto, running_mosquitto
from tests.postgres import Postgres
from tests.support import Tls, eventually


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "mosquitto") as m:
        yield m


def _session(client_id: str) -> ServiceClient:
    return ServiceClient(client_id=client_id, config={"auto_reconnect": False, "cleansession": False})


def _cut(client: MQTTClient) -> None:
    """End `client`'s connection without a DISCONNECT, as the death of its process would."""
    client._handler.writer._writer.transport.abort()


async def test_a_message_is_acknowledged_once_handled_and_delivered_again_if_it_was_not(
    mosquitto: Mosquitto,
) -> None:
    url = mosquitto.url + "/"
    first = _session("acks")
    await first.connect(url, cleansession=False)
    await first.subscribe([("acks/#", QOS_1)])
    sender = MQTTClient(config={"auto_reconnect": False})
    await sender.connect(url)
    try:
        for i in range(3):
            await sender.publish(f"acks/{i}", b"m%d" % i, qos=QOS_1)
        got = [await first.deliver_message(timeout_duration=5) for _ in range(3)]
        assert [m.topic for m in got] == ["acks/0", "acks/1", "acks/2"]
        assert first.unacknowledged == 3  # received is not acknowledged
        await first.acknowledge(got[1])  # handled before the first: its PUBACK waits for the first's
        assert first.unacknowledged == 3
        await first.acknowledge(got[0])  # both leave, in the order they came
        assert first.unacknowledged == 1
        await asyncio.sleep(0.3)  # the PUBACKs reach the broker
        _cut(first)  # dies with the third unhandled

        second = _session("acks")
        await second.connect(url, cleansession=False)
        try:
            again = await second.deliver_message(timeout_duration=5)
            assert (again.topic, bytes(again.data)) == ("acks/2", b"m2")  # only the unacknowledged one
            with pytest.raises(TimeoutError):
                await second.deliver_message(timeout_duration=0.5)
            await second.acknowledge(again)
            assert second.unacknowledged == 0
            await first.acknowledge(got[2])  # of a connection gone: nothing to send, nothing raised
        finally:
            await second.disconnect()
        third = _session("acks")
        await third.connect(url, cleansession=False)
        try:
            with pytest.raises(TimeoutError):  # acknowledged: not delivered a third time
                await third.deliver_message(timeout_duration=0.5)
        finally:
            await third.disconnect()
    finally:
        await sender.disconnect()
        with contextlib.suppress(Exception):
            await first.disconnect()


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _die(service: AttachedService) -> None:
    """Stop `service` the way a killed process stops: nothing handled further, nothing acknowledged, its
    MQTT connection and its database connections cut (its locks go with them)."""
    await service.runtime.stop_serving()
    tasks = [t for t in (service._loop, service._watcher, *service._handling) if t is not None]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert service.client is not None
    _cut(service.client)
    repo: Any = service.runtime.repo
    if repo._own is not None:
        repo._own.terminate()
    repo.pool.terminate()


@pytest.mark.parametrize("qos", [1, 0])
async def test_the_session_of_a_replica_that_died_is_taken_over_and_nothing_is_lost(
    tmp_path: Path, tls: Tls, postgres_server: Postgres, qos: int
) -> None:
    """Two replicas on one database; the one not leading takes its share of 40 devices' informs and dies
    before handling any. The leading replica finds it gone, takes over its session, handles every inform
    it held, and erases the session and its record; stopped, it leaves the registry too. Informs sent at
    QoS 0 (as LinkSDK C v4 sends them) are covered the same way by a broker that delivers at the
    subscription's QoS (Mosquitto's `upgrade_outgoing_qos`)."""
    with running_mosquitto(
        tmp_path / "mosquitto", settings="upgrade_outgoing_qos true\n" if qos == 0 else ""
    ) as m:
        await _replica_dies(tmp_path, tls, m, postgres_server, qos)


async def _replica_dies(
    tmp_path: Path, tls: Tls, mosquitto: Mosquitto, postgres_server: Postgres, qos: int
) -> None:
    database = await postgres_server.new_database()
    try:
        common: dict[str, Any] = {"database_url": database, "attach_client_id": "ota"}
        leader_env = attached_env(attached_settings(tmp_path / "a", tls, mosquitto, **common), tls, mosquitto)

        async def replicas_left() -> list[str]:
            db = await asyncpg.connect(database)
            try:
                return [r["client_id"] for r in await db.fetch("SELECT client_id FROM replicas")]
            finally:
                await db.close()

        async with contextlib.aclosing(leader_env) as envs:
            env = await anext(envs)
            leader: AttachedService = env.running.service  # type: ignore[attr-defined]
            await eventually(lambda: leader.runtime.leading, what="the first replica to lead")
            doomed = AttachedService(attached_settings(tmp_path / "b", tls, mosquitto, **common))
            await doomed.start()
            stuck = asyncio.Event()

            async def never(topic: str, payload: bytes) -> None:
                await stuck.wait()

            doomed.handle = never  # type: ignore[method-assign]
            assert doomed.client_id != leader.client_id
            try:
                devices = [await env.device("pk", f"d{i}").connect() for i in range(40)]
                for d in devices:
                    await d.publish(
                        f"/ota/device/inform/pk/{d.dn}",
                        {"id": d.request_id(), "params": {"version": "1.0.0"}},
                        qos=qos,
                    )
                await eventually(
                    lambda: doomed.client is not None and doomed.client.unacknowledged > 0,
                    what="the doomed replica to hold messages",
                )
                held = doomed.client.unacknowledged if doomed.client is not None else 0
            finally:
                await _die(doomed)

            async def every_device_recorded() -> bool:
                listed = await env.api("GET", "/devices?limit=100", expect=200)
                return sorted(
                    x["device_name"] for x in listed if x["modules"] == {"default": "1.0.0"}
                ) == sorted(f"d{i}" for i in range(40))

            await eventually(
                every_device_recorded, timeout=30.0, what=f"the {held} informs the dead replica held"
            )

            # the dead replica's record goes once its session is erased; the leader's stays
            await eventually(
                lambda: _equal(replicas_left(), [leader.client_id]), what="the dead replica's record to go"
            )
        # the leader stopped for good: it handed what it held, erased its session and left the registry
        assert await replicas_left() == []
    finally:
        await postgres_server.drop_database(database)


async def test_a_replica_taken_for_gone_registers_again_and_loses_nothing(
    tmp_path: Path, tls: Tls, mosquitto: Mosquitto, postgres_server: Postgres
) -> None:
    """A replica whose record another one removed (it was away from the database long enough to be taken
    for gone) finds out at its next heartbeat: it registers again under a new client id, hands its old
    session over, and every device message after that is still handled."""
    database = await postgres_server.new_database()
    try:
        settings = attached_settings(
            tmp_path / "a", tls, mosquitto, database_url=database, attach_client_id="ota"
        )
        async with contextlib.aclosing(attached_env(settings, tls, mosquitto)) as envs:
            env = await anext(envs)
            service: AttachedService = env.running.service  # type: ignore[attr-defined]
            first = service.client_id
            db = await asyncpg.connect(database)
            try:
                await db.execute("DELETE FROM replicas")  # as a replica adopting its session would
                await eventually(lambda: service.client_id != first, what="the replica to register again")
                rows = [r["client_id"] for r in await db.fetch("SELECT client_id FROM replicas")]
                assert rows == [service.client_id]
            finally:
                await db.close()
            # once each, while it changes sessions: what reaches the old one is handed over with it
            for i in range(20):
                await (await env.device("pk", f"d{i}").connect()).inform("1.0.0")

            async def recorded() -> bool:
                return len(await env.api("GET", "/devices?limit=100", expect=200)) == 20

            await eventually(recorded, timeout=20.0, what="every device's inform handled")
    finally:
        await postgres_server.drop_database(database)
