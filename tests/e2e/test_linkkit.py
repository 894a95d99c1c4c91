"""The unmodified Aliyun Python device SDK (`aliyun-iot-linkkit`, class `LinkKit`) against our broker.

LinkKit is synchronous and runs two threads of its own (the MQTT loop and a callback dispatcher). The broker
runs on this test's event loop, so every SDK call that waits on the network runs in a worker thread, and
every wait is a bounded `eventually`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from linkkit.linkkit import LinkKit

from tests.support import Env, eventually

PK = "a1pk"
STOP_S = 10.0
# LinkKit 1.2.13's ota_report_version() and query_ota_firmware() compare paho's publish() result, an
# MQTTMessageInfo, with 0; with paho-mqtt 1.6.1 that is never equal, so both report OTA_PUB_FAILED even
# when the message went out. Their return value says nothing: the test checks what the broker received.
PUBLISHED = (LinkKit.ErrorCode.SUCCESS, LinkKit.ErrorCode.OTA_PUB_FAILED, 0)
PUSH, PULL_REPLY = 1, 2  # LinkKit's `ota_notice_type`: /ota/device/upgrade, .../thing/ota/firmware/get_reply


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
    """A LinkKit device pointed at the in-process broker: plain MQTT, HTTPS downloads trusting the test CA."""

    def __init__(self, env: Env, device_name: str) -> None:
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
            device_secret="not-checked-in-open-mode",
        )
        # secure="" is plain TCP for MQTT; cadata is the CA LinkKit's HTTPS firmware download trusts.
        self.lk.config_mqtt(
            port=env.mqtt_port,
            secure="",
            cadata=env.tls.ca_pem,
            auto_reconnect_min_sec=1,
            auto_reconnect_max_sec=2,
        )
        self.lk.on_connect = self._on_connect
        self.lk.on_ota_message_arrived = self._on_ota_message_arrived
        self.lk.on_publish_topic = self._on_publish_topic
        self.lk.connect_async()
        # Nothing else can start a thread between these two lines: they run on the event loop's thread.
        self.threads = set(threading.enumerate()) - before

    # LinkKit callbacks: they run on LinkKit's dispatcher thread.

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


@asynccontextmanager
async def linkkit_device(env: Env, device_name: str) -> AsyncIterator[LinkKitDevice]:
    device = LinkKitDevice(env, device_name)
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
