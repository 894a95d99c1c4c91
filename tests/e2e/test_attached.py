"""Attached mode end to end: the OTA service as a client of a real Mosquitto 2 (no broker of its own), with
real MQTT devices on that Mosquitto, real HTTPS downloads, and a real SQLite file or a real PostgreSQL database
(each test on `env` runs on both): the seed flow, a pull, the legacy request, two replicas sharing the work,
and a broker that refuses the service's account."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest

from plugins.device_auth.signing import login_for
from plugins.ota.attached import AttachedChannel, AttachedService, AttachError
from plugins.ota.core.messages import Outgoing
from plugins.ota.core.topics import DeviceRef, TopicKind
from plugins.ota.metrics import OtaMetrics
from plugins.ota.settings import OtaConfig, Settings, validate
from tests.e2e.processes import clean_env
from tests.e2e.test_security import recorded
from tests.mosquitto import OTA_PASSWORD, OTA_USER, Mosquitto, running_mosquitto
from tests.postgres import Postgres
from tests.support import TOKEN, Device, Env, Tls, eventually

FIRMWARE = os.urandom(200_000)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "mosquitto") as m:
        yield m


def attached_settings(data_dir: Path, tls: Tls, broker: Mosquitto, **overrides: Any) -> Settings:
    entry: dict[str, Any] = {
        "data_dir": str(data_dir),
        "auth_mode": "open",
        "https_bind": "127.0.0.1:0",
        "public_url": "https://127.0.0.1:0",
        "admin_bind": "127.0.0.1:0",
        "admin_token": TOKEN,
        "mqtts_bind": "",
        "tls_cert": str(tls.cert_file),
        "tls_key": str(tls.key_file),
        "tick_seconds": 0.2,
        "attach_url": broker.url,
        "attach_username": OTA_USER,
        "attach_password": OTA_PASSWORD,
    }
    return validate(OtaConfig(**(entry | overrides)))


@dataclass
class _Running:
    """What `tests.support.Env` reads of a running broker, for an attached service."""

    service: AttachedService
    mqtt_address: tuple[str, int]

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self.service.runtime.admin_address is not None
        return self.service.runtime.admin_address

    @property
    def plugin(self) -> Any:
        return SimpleNamespace(service=self.service.app, settings=self.service.settings)


async def attached_env(settings: Settings, tls: Tls, broker: Mosquitto) -> AsyncGenerator[Env, None]:
    service = AttachedService(settings)
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            env = Env(cast(Any, _Running(service, ("127.0.0.1", broker.port))), tls, http)
            try:
                yield env
            finally:
                for d in env.devices:
                    d.disconnect()
    finally:
        await service.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, tls: Tls, mosquitto: Mosquitto
) -> AsyncIterator[Env]:
    """One attached service, its state in SQLite (one replica alone) or in a PostgreSQL database of its own
    (what replicas share)."""
    overrides: dict[str, Any] = {}
    server: Postgres | None = None
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        overrides["database_url"] = await server.new_database()
    try:
        settings = attached_settings(tmp_path / "data", tls, mosquitto, **overrides)
        async for e in attached_env(settings, tls, mosquitto):
            yield e
    finally:
        if server is not None:
            await server.drop_database(overrides["database_url"])


async def queued_job_for(env: Env, name: str) -> tuple[Device, dict[str, Any]]:
    """A connected, subscribed, registered device `pk/<name>` the service has not heard from, and a job for
    it whose task waits queued."""
    d = await env.device("pk", name).connect()
    await d.subscribe(d.upgrade_topic)
    await env.api("POST", "/devices", expect=201, json={"product_key": "pk", "device_name": name})
    fw = await env.upload(FIRMWARE, version="2.0.0")
    job = await env.job(fw["id"], [f"pk/{name}"])
    await asyncio.sleep(0.3)
    assert d.messages(d.upgrade_topic) == []
    assert (await env.tasks(job["id"]))[f"pk/{name}"]["state"] == "queued"
    return d, job


async def test_the_seed_flow_through_an_external_broker(env: Env) -> None:
    """Inform, upload, job, the notice through Mosquitto, the HTTPS download, progress, the new version."""
    d = await env.device("pk", "dev1").connect()
    await d.subscribe(d.upgrade_topic)
    await d.inform("1.0.0")
    await recorded(env, "pk/dev1", "1.0.0")

    fw = await env.upload(FIRMWARE, version="2.0.0")
    job = await env.job(fw["id"], ["pk/dev1"])
    [notice] = await d.notices()
    data = notice["data"]
    assert notice["code"] == "1000" and data["version"] == "2.0.0" and data["md5"] == fw["md5"]
    assert data["size"] == len(FIRMWARE)
    await env.task_state(job["id"], "pk/dev1", "notified")

    status, _, body = await env.download(data["url"])
    assert status == 200 and hashlib.md5(body).hexdigest() == fw["md5"]

    await d.progress("50", "downloading")
    await env.task_state(job["id"], "pk/dev1", "in_progress")
    await d.inform("2.0.0")
    task = await env.task_state(job["id"], "pk/dev1", "succeeded")
    assert task["attempts"] == 1
    assert len(d.messages(d.upgrade_topic)) == 1


async def test_a_device_that_was_not_heard_from_gets_its_notice_with_its_first_message(env: Env) -> None:
    """A job for a device the service has not heard from since it started waits; the device's inform at
    its next connect brings the notice."""
    d, _ = await queued_job_for(env, "late")
    await d.inform("1.0.0")
    [notice] = await d.notices()
    assert notice["data"]["version"] == "2.0.0"


async def test_pull_and_legacy_request_are_answered_through_the_broker(env: Env) -> None:
    d = await env.device("pk", "puller").connect()
    await d.subscribe("/sys/pk/puller/thing/ota/firmware/get_reply")
    await d.subscribe(d.upgrade_topic)
    await d.inform("1.0.0")
    await recorded(env, "pk/puller", "1.0.0")
    fw = await env.upload(FIRMWARE, version="2.0.0")
    await env.job(fw["id"], ["pk/puller"])
    await d.notices()

    await d.pull(request_id=41)
    [reply] = await d.wait_messages("/sys/pk/puller/thing/ota/firmware/get_reply")
    assert reply["id"] == 41 and reply["code"] == 200
    assert reply["data"]["version"] == "2.0.0"

    await d.subscribe("/ota/device/request/pk/puller")
    await d.publish("/ota/device/request/pk/puller", {"id": 42, "params": {"version": "1.0.0"}})
    replies = await eventually(
        lambda: [m for m in d.messages("/ota/device/request/pk/puller") if "data" in m],
        what="the legacy reply",
    )
    assert replies[0]["code"] == "1000" and replies[0]["data"]["version"] == "2.0.0"
    await asyncio.sleep(0.3)
    assert len([m for m in d.messages("/ota/device/request/pk/puller") if "data" in m]) == 1


async def test_two_replicas_share_the_devices_messages_and_each_is_handled_once(
    tmp_path: Path, tls: Tls, mosquitto: Mosquitto
) -> None:
    """Two services in one shared-subscription group on one broker (each with its own database here, so
    that what each handled can be counted): every inform reaches exactly one of them."""
    first = attached_settings(tmp_path / "a", tls, mosquitto, attach_client_id="replica-a")
    second = attached_settings(tmp_path / "b", tls, mosquitto, attach_client_id="replica-b")
    async with contextlib.aclosing(attached_env(first, tls, mosquitto)) as envs_a:
        env_a = await anext(envs_a)
        async with contextlib.aclosing(attached_env(second, tls, mosquitto)) as envs_b:
            env_b = await anext(envs_b)
            devices = [await env_a.device("pk", f"r{i}").connect() for i in range(20)]
            for d in devices:
                await d.inform("1.0.0")

            async def counted() -> bool:
                a = await env_a.api("GET", "/devices?limit=100", expect=200)
                b = await env_b.api("GET", "/devices?limit=100", expect=200)
                return len(a) + len(b) == 20

            await eventually(counted, what="every device recorded by one replica")
            a = {
                f"{x['product_key']}/{x['device_name']}" for x in await env_a.api("GET", "/devices?limit=100")
            }
            b = {
                f"{x['product_key']}/{x['device_name']}" for x in await env_b.api("GET", "/devices?limit=100")
            }
            assert not a & b, "a message handled twice"
            assert a and b, "one replica got everything: the subscriptions are not shared"


async def test_a_broker_that_refuses_the_account_fails_the_start_with_the_reason(
    tmp_path: Path, tls: Tls, mosquitto: Mosquitto
) -> None:
    settings = attached_settings(tmp_path / "data", tls, mosquitto, attach_password="wrong")
    service = AttachedService(settings)
    with pytest.raises(
        AttachError, match=r"cannot attach to mqtt://127\.0\.0\.1:\d+/ as .ota-service.: not authorized"
    ):
        await service.start()
    # nothing was left open: a start on the same data folder works
    again = AttachedService(attached_settings(tmp_path / "data", tls, mosquitto))
    await again.start()
    await again.stop()


def test_ota_broker_run_attaches_when_attach_url_is_set(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`ota-broker run` with OTA_ATTACH_URL starts no MQTT listener, attaches to the broker, serves its API,
    and stops on SIGTERM with 0; with a wrong password it exits 1 naming the refusal."""
    env = clean_env(
        PYTHONUNBUFFERED="1",
        OTA_DATA_DIR=str(tmp_path / "data"),
        OTA_HTTPS_BIND="127.0.0.1:0",
        OTA_ADMIN_BIND="127.0.0.1:0",
        OTA_PUBLIC_URL="https://127.0.0.1:0",
        OTA_ATTACH_URL=mosquitto.url,
        OTA_ATTACH_USERNAME=OTA_USER,
        OTA_ATTACH_PASSWORD=OTA_PASSWORD,
    )
    command = [sys.executable, "-m", "broker", "run", "--log-level", "info"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while not any(line.rstrip().endswith("ready") for line in lines):
            assert time.monotonic() < deadline, "\n".join(lines)
            line = proc.stderr.readline()
            assert line, f"exited before ready:\n{''.join(lines)}"
            lines.append(line)
        log = "".join(lines)
        assert f"attached to {mosquitto.url}/ as 'ota-service'" in log
        assert "mqtt listening" not in log and "mqtts listening" not in log
        assert OTA_PASSWORD not in log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    refused = subprocess.run(
        command,
        check=False,
        cwd=tmp_path,
        env=env | {"OTA_ATTACH_PASSWORD": "wrong"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "could not start: cannot attach to" in refused.stderr and "not authorized" in refused.stderr


async def test_a_brokers_client_events_set_online_state_and_bring_the_notice(env: Env) -> None:
    """EMQX announces connections on `$SYS/brokers/<node>/clients/<clientid>/connected|disconnected` with the
    client's username; Mosquitto has no such topics, so the events are handed to the service as the broker
    would deliver them. A device's connection brings its pending notice before it sends anything."""
    service = cast(_Running, env.running).service
    d, _ = await queued_job_for(env, "ev1")

    event = {"clientid": "pk.ev1|securemode=3|", "username": "ev1&pk", "ipaddress": "10.0.0.9", "ts": 1}
    await service.handle("$SYS/brokers/emqx@n1/clients/pk.ev1/connected", json.dumps(event).encode())
    [notice] = await d.notices()
    assert notice["data"]["version"] == "2.0.0"
    assert (await env.find("/devices/pk/ev1"))["online"] is True

    await service.handle("$SYS/brokers/emqx@n1/clients/pk.ev1/disconnected", json.dumps(event).encode())
    assert (await env.find("/devices/pk/ev1"))["online"] is False
    for topic, payload in [
        ("$SYS/brokers/emqx@n1/clients/dash/connected", b'{"username": "dash"}'),  # not a device
        ("$SYS/brokers/emqx@n1/clients/pk.ev1/connected", b"not json"),
        ("$SYS/brokers/emqx@n1/uptime", b"12"),
    ]:
        await service.handle(topic, payload)
    assert (await env.find("/devices/pk/ev1"))["online"] is False
    assert len(d.messages(d.upgrade_topic)) == 1


async def test_messages_are_handled_in_order_per_device_and_side_by_side_across_devices(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device's messages are handled one after the other in the order they came (a progress report
    before the new version's inform); different devices' at the same time; each is acknowledged once it
    is handled, not before."""
    service = cast(_Running, env.running).service
    handled: list[tuple[str, int]] = []
    running = peak = 0

    async def slow_handle(topic: str, payload: bytes) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (hash(payload) % 7))
        handled.append((topic, int(payload)))
        running -= 1

    acknowledged: list[tuple[str, int]] = []

    class Client:  # where the messages came from: told when each is handled
        async def acknowledge(self, message: Any) -> None:
            assert (message.topic, int(message.data)) in handled, "acknowledged before it was handled"
            acknowledged.append((message.topic, int(message.data)))

    monkeypatch.setattr(service, "handle", slow_handle)
    sent = [(f"/ota/device/progress/pk/o{d}", i) for i in range(20) for d in range(5)]
    for topic, i in sent:
        await service._room.acquire()
        service._dispatch(cast(Any, Client()), SimpleNamespace(topic=topic, data=str(i).encode()))
    await eventually(lambda: len(acknowledged) == len(sent), what="every message handled and acknowledged")
    for d in range(5):
        topic = f"/ota/device/progress/pk/o{d}"
        assert [i for t, i in handled if t == topic] == list(range(20))
    assert peak > 1, "devices' messages were handled one at a time"
    # each task's bookkeeping goes in its done-callback, just after its acknowledgement
    await eventually(
        lambda: not service._tails and not service._handling, what="the handling tasks to be forgotten"
    )


async def test_the_auth_hooks_answer_for_an_attached_service(
    tmp_path: Path, tls: Tls, mosquitto: Mosquitto
) -> None:
    """Attached, the service serves the HTTP hooks the external broker asks (here as EMQX would), from its
    own device registry: a registered device's signed login is allowed, a wrong secret denied, and the
    device is kept inside its topics."""
    settings = attached_settings(tmp_path / "data", tls, mosquitto, auth_mode="device-secret")
    async with contextlib.aclosing(attached_env(settings, tls, mosquitto)) as envs:
        env = await anext(envs)
        created = await env.api(
            "POST", "/devices", expect=201, json={"product_key": "pk", "device_name": "sig1"}
        )
        token = (tmp_path / "data" / "broker-auth.token").read_text().strip()
        host, port = env.running.admin_address
        hooks = f"http://{host}:{port}/broker-auth/{token}/emqx"

        async def ask(path: str, body: dict[str, str]) -> str:
            async with env.http.post(f"{hooks}/{path}", json=body) as r:
                assert r.status == 200
                return str((await r.json())["result"])

        good = login_for(DeviceRef("pk", "sig1"), created["device_secret"])
        fields = {"clientid": good.client_id, "username": good.username, "password": good.password}
        assert await ask("authn", fields) == "allow"
        assert await ask("authn", fields | {"password": "0" * 64}) == "deny"
        mine = {"username": "sig1&pk", "action": "publish", "topic": "/ota/device/inform/pk/sig1"}
        assert await ask("authz", mine) == "allow"
        assert await ask("authz", mine | {"topic": "/ota/device/inform/pk/other"}) == "deny"


async def test_the_service_attaches_again_after_the_broker_restarts(env: Env, mosquitto: Mosquitto) -> None:
    """A broker restarted without its sessions has forgotten the service's subscriptions: the service
    connects and subscribes again by itself, and what devices send afterwards is handled."""
    await asyncio.to_thread(mosquitto.restart)
    d = await env.device("pk", "after").connect()
    await d.subscribe(d.upgrade_topic)

    async def handled() -> bool:
        await d.inform("1.0.0")  # until the service is back (a device informs at every connect)
        found = await env.find("/devices/pk/after")
        return found is not None

    await eventually(handled, timeout=30.0, what="the inform after the restart to be handled")
    fw = await env.upload(FIRMWARE, version="2.0.0")
    await env.job(fw["id"], ["pk/after"])
    [notice] = await d.notices()
    assert notice["data"]["version"] == "2.0.0"


async def test_a_notice_is_sent_without_waiting_for_its_puback_but_a_block_waits() -> None:
    """The channel hands a notice to the connection and goes on (its PUBACK is awaited apart, and a lost
    one is logged); a block of a firmware over MQTT waits for its PUBACK (its flow control)."""
    release = asyncio.Event()
    published: list[str] = []

    class SlowClient:  # a broker that acknowledges only when told to
        async def publish(self, topic: str, payload: bytes, qos: int) -> None:
            published.append(topic)
            await release.wait()

    channel = AttachedChannel(lambda: 0.0, OtaMetrics())
    channel.client = cast(Any, SlowClient())
    device = DeviceRef("pk", "d1")
    assert not await channel.send(device, Outgoing(TopicKind.UPGRADE, b"{}", 1)), "not heard from yet"
    channel.saw(device)
    assert await asyncio.wait_for(channel.send(device, Outgoing(TopicKind.UPGRADE, b"{}", 1)), 1.0)
    assert published == ["/ota/device/upgrade/pk/d1"]
    block = asyncio.ensure_future(channel.send(device, Outgoing(TopicKind.FILE_DOWNLOAD_REPLY, b"x", 0)))
    await asyncio.sleep(0.05)
    assert not block.done()
    settling = asyncio.ensure_future(channel.settle(5.0))
    await asyncio.sleep(0.05)
    assert not settling.done()
    release.set()
    assert await block
    await settling
