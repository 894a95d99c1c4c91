"""The unmodified Aliyun Python device SDK (`aliyun-iot-linkkit`, class `LinkKit`) against our broker.

LinkKit is synchronous and runs two threads of its own (the MQTT loop and a callback dispatcher). The broker
runs on this test's event loop, so every SDK call that waits on the network runs in a worker thread, and
every wait is a bounded `eventually`. The first tests run the broker in `open` mode over plain MQTT; the
last ones in `device-secret` mode over MQTT-over-TLS, where LinkKit signs its CONNECT itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from linkkit.linkkit import LinkKit

from broker import app as broker_app
from tests.support import Env, Tls, eventually, secure_config

PK = "a1pk"
STOP_S = 10.0
# LinkKit 1.2.13's ota_report_version() and query_ota_firmware() compare paho's publish() result, an
# MQTTMessageInfo, with 0; with paho-mqtt 1.6.1 that is never equal, so both report OTA_PUB_FAILED even
# when the message went out. Their return value says nothing: the test checks what the broker received.
PUBLISHED = (LinkKit.ErrorCode.SUCCESS, LinkKit.ErrorCode.OTA_PUB_FAILED, 0)
PUSH, PULL_REPLY = 1, 2  # LinkKit's `ota_notice_type`: /ota/device/upgrade, .../thing/ota/firmware/get_reply
OPEN_MODE_SECRET = "not-checked-in-open-mode"


@dataclass(frozen=True)
class Notice:
    """The arguments LinkKit passes to `on_ota_message_arrived`."""

    type: int
    version: str
    size: Any
    url: str
    sign_method: str
    sign: str
    module: str
    extra: str


class LinkKitDevice:
    """A LinkKit device pointed at the in-process broker: plain MQTT (or TLS), HTTPS downloads trusting the
    test CA."""

    def __init__(
        self,
        env: Env,
        device_name: str,
        *,
        device_secret: str = OPEN_MODE_SECRET,
        port: int | None = None,
        secure: str = "",
        reconnect_s: tuple[int, int] = (1, 2),
    ) -> None:
        self.device_name = device_name
        self._lock = threading.Lock()
        self._notices: list[Notice] = []
        self._connects: list[int] = []
        self._acked: set[int] = set()
        self.connected = threading.Event()
        before = set(threading.enumerate())
        self.lk = LinkKit(
            host_name="127.0.0.1",
            product_key=PK,
            device_name=device_name,
            device_secret=device_secret,
        )
        # secure="" is plain TCP for MQTT, "TLS" MQTT over TLS; cadata is the CA LinkKit trusts for both TLS
        # MQTT and its HTTPS firmware download.
        self.lk.config_mqtt(
            port=port or env.mqtt_port,
            secure=secure,
            cadata=env.tls.ca_pem,
            auto_reconnect_min_sec=reconnect_s[0],
            auto_reconnect_max_sec=reconnect_s[1],
        )
        self.lk.on_connect = self._on_connect
        self.lk.on_ota_message_arrived = self._on_ota_message_arrived
        self.lk.on_publish_topic = self._on_publish_topic
        self.lk.connect_async()
        # Nothing else can start a thread between these two lines: they run on the event loop's thread.
        self.threads = set(threading.enumerate()) - before

    # LinkKit callbacks: they run on LinkKit's dispatcher thread.

    def connect_codes(self) -> list[int]:
        with self._lock:
            return list(self._connects)

    def _on_connect(self, _session_present: Any, rc: int, _user_data: Any) -> None:
        with self._lock:
            self._connects.append(rc)
        if rc == 0:
            self.connected.set()

    def _on_ota_message_arrived(self, *args: Any) -> None:
        with self._lock:
            self._notices.append(Notice(*args))

    def _on_publish_topic(self, mid: int, _user_data: Any) -> None:
        with self._lock:
            self._acked.add(mid)

    # Test side.

    def notices(self, notice_type: int) -> list[Notice]:
        with self._lock:
            return [n for n in self._notices if n.type == notice_type]

    async def wait_notice(self, notice_type: int) -> Notice:
        await eventually(lambda: self.notices(notice_type), what=f"LinkKit notice of type {notice_type}")
        return self.notices(notice_type)[0]

    def acked(self, mid: int) -> bool:
        with self._lock:
            return mid in self._acked

    async def wait_connected(self) -> None:
        try:
            await eventually(self.connected.is_set, what=f"LinkKit {self.device_name} to connect")
        except AssertionError as e:
            with self._lock:
                raise AssertionError(f"{e}; on_connect return codes so far: {self._connects}") from None

    async def close(self) -> None:
        """Disconnect and destruct LinkKit in a thread of its own; fail if its threads outlive STOP_S."""

        def stop() -> None:
            self.lk.disconnect()
            self.lk.destruct()

        closer = threading.Thread(target=stop, name=f"linkkit-close-{self.device_name}", daemon=True)
        closer.start()
        threads = self.threads | {closer}
        await eventually(
            lambda: not any(t.is_alive() for t in threads),
            STOP_S,
            f"LinkKit {self.device_name} threads to stop ({[t.name for t in threads if t.is_alive()]})",
        )
        # paho 1.x opens a loopback socket pair for its wake-ups in loop() and closes it only in __del__;
        # LinkKit never releases it, and when the garbage collector finalises that client in a cycle the
        # sockets may go first (ResourceWarning, an error here). Release it now that no thread uses it.
        client = getattr(self.lk, "_LinkKit__mqtt_client", None)
        if client is not None:
            client._reset_sockets()


@asynccontextmanager
async def linkkit_device(env: Env, device_name: str, **how: Any) -> AsyncIterator[LinkKitDevice]:
    device = LinkKitDevice(env, device_name, **how)
    try:
        yield device
    finally:
        await device.close()


async def _online_on_1_0_0(env: Env, device: LinkKitDevice) -> None:
    """Connect, report version 1.0.0 through the SDK, and wait until the broker has recorded it."""
    await device.wait_connected()
    rc = await asyncio.to_thread(device.lk.ota_report_version, None, "1.0.0")
    assert rc in PUBLISHED  # see PUBLISHED; the broker's record is the check

    async def recorded() -> bool:
        doc = await env.find(f"/devices/{PK}/{device.device_name}")
        return doc is not None and doc["modules"].get("default") == "1.0.0"

    await eventually(recorded, what=f"the broker to record {PK}/{device.device_name} on 1.0.0")


def _digest(sign_method: str, data: bytes) -> str:
    return hashlib.md5(data).hexdigest() if sign_method == "Md5" else hashlib.sha256(data).hexdigest()


def _assert_notice(notice: Notice, fw: dict[str, Any], data: bytes, sign_method: str) -> None:
    assert notice.version == "2.0.0"
    assert notice.size == len(data)
    assert notice.sign_method == sign_method
    assert notice.sign == _digest(sign_method, data) == fw["sign"]
    assert notice.module == "default"  # LinkKit's value when the notice has no `module`
    assert notice.url.startswith("https://127.0.0.1:")
    assert len(notice.url) <= 256


async def _download(device: LinkKitDevice, notice: Notice, path: Path) -> Any:
    return await asyncio.to_thread(
        device.lk.download_ota_firmware, notice.url, str(path), notice.sign_method, notice.sign
    )


@pytest.mark.parametrize("sign_method", ["Md5", "SHA256"])
async def test_linkkit_device_completes_the_seed_flow(env: Env, tmp_path: Path, sign_method: str) -> None:
    """A LinkKit device gets an unsubscribed push, downloads and verifies it, reports progress and 2.0.0."""
    data = os.urandom(300 * 1024 + 17)
    async with linkkit_device(env, "lk1") as device:
        await _online_on_1_0_0(env, device)

        fw = await env.upload(data, product_key=PK, version="2.0.0", sign_method=sign_method)
        assert fw["sign_method"] == sign_method
        job = await env.job(fw["id"], [f"{PK}/lk1"])

        # LinkKit never sends SUBSCRIBE for the OTA topics: the notice must reach its session anyway.
        notice = await device.wait_notice(PUSH)
        _assert_notice(notice, fw, data, sign_method)
        await env.task_state(job["id"], f"{PK}/lk1", "notified")

        local = tmp_path / "lk1-firmware.bin"
        assert await _download(device, notice, local) == LinkKit.ErrorCode.SUCCESS
        assert local.read_bytes() == data

        # LinkKit has no progress helper; publish_topic only checks the topic's length, so it allows this one.
        progress = {"id": "2", "params": {"step": "100", "desc": "download complete"}}
        rc, mid = await asyncio.to_thread(
            device.lk.publish_topic, f"/ota/device/progress/{PK}/lk1", json.dumps(progress), 1
        )
        assert rc == LinkKit.ErrorCode.SUCCESS.value
        await eventually(lambda: device.acked(mid), what="the broker to acknowledge the progress publish")
        task = await env.task_state(job["id"], f"{PK}/lk1", "in_progress")
        assert task["progress"] == 100

        rc = await asyncio.to_thread(device.lk.ota_report_version, None, "2.0.0")
        assert rc in PUBLISHED  # see PUBLISHED; the broker's record is the check
        await env.task_state(job["id"], f"{PK}/lk1", "succeeded")

        async def completed() -> bool:
            return (await env.api("GET", f"/jobs/{job['id']}", expect=200))["state"] == "completed"

        await eventually(completed, what=f"job {job['id']} to be completed")
        assert len(device.notices(PUSH)) == 1, "the notice was sent more than once"
        doc = await env.find(f"/devices/{PK}/lk1")
        assert doc["modules"]["default"] == "2.0.0"


async def test_linkkit_query_ota_firmware_gets_the_pending_job(env: Env, tmp_path: Path) -> None:
    """With a job pending, LinkKit's query_ota_firmware() yields a pull reply (type 2) for that firmware."""
    data = os.urandom(200 * 1024 + 3)
    async with linkkit_device(env, "lk2") as device:
        await _online_on_1_0_0(env, device)
        fw = await env.upload(data, product_key=PK, version="2.0.0")
        job = await env.job(fw["id"], [f"{PK}/lk2"])
        push = await device.wait_notice(PUSH)
        await env.task_state(job["id"], f"{PK}/lk2", "notified")

        rc = await asyncio.to_thread(device.lk.query_ota_firmware)
        assert rc in PUBLISHED  # see PUBLISHED; the pull reply below is the check
        reply = await device.wait_notice(PULL_REPLY)
        _assert_notice(reply, fw, data, "Md5")
        assert (reply.version, reply.size, reply.sign_method, reply.sign) == (
            push.version,
            push.size,
            push.sign_method,
            push.sign,
        )

        local = tmp_path / "lk2-firmware.bin"
        assert await _download(device, reply, local) == LinkKit.ErrorCode.SUCCESS
        assert local.read_bytes() == data


# ------------------------------------------------------------- device-secret mode over MQTT-over-TLS

TLS_SECRET = "Lk7sQ2vZ9xW4bN1mR8tY3uE6pA0cD5fG"  # the secret registered for the device (any ASCII string)


@pytest.fixture
async def tls_env(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A real broker in `device-secret` mode with a plain and an MQTT-over-TLS listener on 127.0.0.1:0."""
    running = await broker_app.start(secure_config(tmp_path / "data", tls))
    async with aiohttp.ClientSession() as http:
        e = Env(running, tls, http)
        try:
            assert running.mqtts_address is not None, "the TLS listener did not start"
            yield e
        finally:
            for d in e.devices:
                d.disconnect()
            await running.stop()


def tls_port(env: Env) -> int:
    assert env.running.mqtts_address is not None
    return env.running.mqtts_address[1]


async def register(env: Env, device_name: str, secret: str) -> None:
    body = {"product_key": PK, "device_name": device_name, "device_secret": secret}
    created = await env.api("POST", "/devices", expect=201, json=body)
    assert (created["product_key"], created["device_name"], created["device_secret"]) == (
        PK,
        device_name,
        secret,
    )


async def test_linkkit_over_tls_with_its_device_secret_completes_the_flow(
    tls_env: Env, tmp_path: Path
) -> None:
    """In device-secret mode LinkKit logs in over TLS with its registered secret and completes the OTA flow."""
    env = tls_env
    assert tls_port(env) != env.mqtt_port
    await register(env, "lks1", TLS_SECRET)
    data = os.urandom(256 * 1024 + 5)
    async with linkkit_device(
        env, "lks1", device_secret=TLS_SECRET, port=tls_port(env), secure="TLS"
    ) as device:
        await _online_on_1_0_0(env, device)
        assert device.connect_codes() == [0]

        fw = await env.upload(data, product_key=PK, version="2.0.0", sign_method="SHA256")
        job = await env.job(fw["id"], [f"{PK}/lks1"])

        # The signed-in session gets the notice although LinkKit never subscribes to the upgrade topic.
        notice = await device.wait_notice(PUSH)
        _assert_notice(notice, fw, data, "SHA256")
        await env.task_state(job["id"], f"{PK}/lks1", "notified")

        local = tmp_path / "lks1-firmware.bin"
        assert await _download(device, notice, local) == LinkKit.ErrorCode.SUCCESS
        assert local.read_bytes() == data

        progress = {"id": "3", "params": {"step": "60", "desc": "flashing"}}
        rc, mid = await asyncio.to_thread(
            device.lk.publish_topic, f"/ota/device/progress/{PK}/lks1", json.dumps(progress), 1
        )
        assert rc == LinkKit.ErrorCode.SUCCESS.value
        await eventually(lambda: device.acked(mid), what="the broker to acknowledge the progress publish")
        task = await env.task_state(job["id"], f"{PK}/lks1", "in_progress")
        assert task["progress"] == 60

        rc = await asyncio.to_thread(device.lk.ota_report_version, None, "2.0.0")
        assert rc in PUBLISHED  # see PUBLISHED; the broker's record is the check
        await env.task_state(job["id"], f"{PK}/lks1", "succeeded")
        assert len(device.notices(PUSH)) == 1, "the notice was sent more than once"
        doc = await env.find(f"/devices/{PK}/lks1")
        assert doc["modules"]["default"] == "2.0.0"
        assert device.connect_codes() == [0], "LinkKit had to reconnect"


def _linkkit_password(device_name: str, secret: str, timestamp: int) -> str:
    """The password LinkKit 1.2.13 sends at unix second `timestamp`: hex HMAC-SHA1 over its signed content."""
    content = f"clientId{PK}&{device_name}deviceName{device_name}productKey{PK}timestamp{timestamp}"
    return hmac.new(secret.encode(), content.encode(), hashlib.sha1).hexdigest()


async def test_linkkit_with_a_wrong_secret_is_refused_and_logged_once(
    tls_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A LinkKit with a wrong secret never connects; one "bad signature" line, no secret nor password."""
    env = tls_env
    caplog.set_level(logging.WARNING, logger="ota.auth")
    await register(env, "lkbad", TLS_SECRET)
    wrong = "Wr0ngSecretWr0ngSecretWr0ngSecre"

    def refused() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "ota.auth"
            and r.getMessage().startswith("refused CONNECT")
            and "lkbad" in r.getMessage()
        ]

    started = int(time.time())
    # LinkKit retries after min_sec: 5 s leaves room to see exactly one refused attempt.
    async with linkkit_device(
        env, "lkbad", device_secret=wrong, port=tls_port(env), secure="TLS", reconnect_s=(5, 5)
    ) as device:
        await eventually(refused, what="the broker to refuse LinkKit's CONNECT")
        await asyncio.sleep(2.0)  # bounded: LinkKit must stay unconnected meanwhile
        assert not device.connected.is_set()
        assert all(rc != 0 for rc in device.connect_codes())
        [record] = refused()
    ended = int(time.time())

    line = record.getMessage()
    assert "bad signature" in line
    assert f"{PK}/lkbad" in line
    assert f"{PK}&lkbad|" in line  # the clientId, so an operator can tell which client it was
    # LinkKit signs with the unix second it connects at: none of the passwords it could have sent is logged.
    passwords = [_linkkit_password("lkbad", wrong, ts) for ts in range(started - 1, ended + 2)]
    for r in caplog.records:
        if r.name.startswith("ota"):
            text = r.getMessage()
            assert wrong not in text and TLS_SECRET not in text, text
            assert not any(p in text.lower() for p in passwords), text
