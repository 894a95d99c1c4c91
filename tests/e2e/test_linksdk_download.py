"""The LinkSDK-like MQTT download device (tests/support_linksdk.py) on a real broker without the OTA
service, answered by a scripted server client that uses plugins/ota/blocks.py and can damage or drop its
replies. It pins the emulator's own behaviour (retries, offsets, give-up, resume), which the end-to-end
tests against the OTA service (test_mqtt_download.py) rely on."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest

from broker import app as broker_app
from broker.hardened import HardenedBroker
from plugins.ota.core.blocks import (
    Block,
    Rejection,
    StreamFile,
    decide,
    error_frame,
    parse_request,
    reply_frame,
)
from plugins.ota.core.topics import DeviceRef
from tests.support import Device
from tests.support_linksdk import LinkSdkDownload, Refused, Status

FW = bytes((i * 7 + 3) & 0xFF for i in range(23_000))
Mangle = Callable[[int, bytes], bytes | None]


@dataclass
class Bare:
    """A broker on 127.0.0.1:0 with no plugin at all, and the clients on it."""

    mqtt_port: int
    devices: list[Device] = field(default_factory=list)

    def device(self, pk: str, dn: str) -> Device:
        d = Device(self.mqtt_port, pk, dn)
        self.devices.append(d)
        return d


@pytest.fixture
async def env() -> AsyncIterator[Bare]:
    """No OTA service answers `thing/file/download` here: only the scripted server does."""
    broker = HardenedBroker(
        {
            "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    bound = broker_app._bound(broker, "default")
    assert bound is not None
    bare = Bare(bound[1])
    try:
        yield bare
    finally:
        for d in bare.devices:
            d.disconnect()
        await broker.shutdown()


async def scripted_server(env: Bare, device: DeviceRef, mangle: Mangle | None = None) -> Device:
    """A client that answers block requests for `device` with blocks.py; `mangle(n, frame)` may alter or
    drop (None) the n-th reply."""
    server = env.device("app", "server")
    count = [0]
    file = StreamFile(7, 1, len(FW), device)

    def on_request(client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        req = parse_request(msg.payload)
        decided = req if isinstance(req, Rejection) else decide(req, device, file)
        frame = (
            error_frame(decided)
            if isinstance(decided, Rejection)
            else reply_frame(decided, FW[decided.offset : decided.end])
        )
        count[0] += 1
        if mangle is not None:
            frame = mangle(count[0], frame)
        if frame is not None:
            client.publish(
                f"/sys/{device.product_key}/{device.device_name}/thing/file/download_reply", frame, qos=0
            )

    server.client.message_callback_add("/sys/+/+/thing/file/download", on_request)
    await server.connect()
    await server.subscribe("/sys/+/+/thing/file/download")
    return server


async def test_emulator_downloads_a_file_and_reports_progress(env: Bare) -> None:
    """With correct frames the emulator fetches the whole file in 5 KiB requests and reports up to 100."""
    dev = DeviceRef("pk", "d1")
    await scripted_server(env, dev)
    device = await env.device("pk", "d1").connect()
    result = await LinkSdkDownload(device, 7, 1, len(FW), md5=hashlib.md5(FW).hexdigest()).run(timeout_s=20)
    assert result.status is Status.SUCCESS and result.data == FW
    assert len(result.requests) == 5 and b'"fileId":1,}' in result.requests[0]
    assert result.steps[-1] == 100


async def test_emulator_resends_after_a_bad_crc_and_ignores_a_foreign_offset(env: Bare) -> None:
    """A frame with a broken CRC is refused and requested again at once; a reply for another offset is
    ignored and the request is repeated only after the receive timeout."""

    def mangle(n: int, frame: bytes) -> bytes | None:
        if n == 2:
            return frame[:-1] + bytes([frame[-1] ^ 0xFF])
        if n == 4:  # the 4th reply claims another offset: the device must ignore it
            return reply_frame(Block("x", "default", len(FW), 0, 10), FW[:10])
        return frame

    await scripted_server(env, DeviceRef("pk", "d2"), mangle)
    device = await env.device("pk", "d2").connect()
    result = await LinkSdkDownload(device, 7, 1, len(FW), recv_timeout_s=0.5).run(timeout_s=20)
    assert result.status is Status.SUCCESS and result.data == FW
    assert result.refused == [Refused.CRC] and result.ignored_offsets == [0]
    assert len(result.requests) == 7


async def test_emulator_gives_up_after_four_failures_and_reports_minus_4(env: Bare) -> None:
    """Error replies (code != 200) are resent three times; the fourth failure ends the download with -4."""
    await scripted_server(env, DeviceRef("pk", "d3"))
    device = await env.device("pk", "d3").connect()
    result = await LinkSdkDownload(device, 99, 1, len(FW)).run(timeout_s=20)
    assert result.status is Status.FAILED_TIMEOUT and result.data == b""
    assert len(result.requests) == 4 and result.refused == [Refused.HEADER] * 4 and result.steps == [-4]


async def test_emulator_resumes_from_range_start_without_a_digest_check(env: Bare) -> None:
    """With range_start the first request asks from there and the rest of the file is fetched; the MD5
    (of the whole file) is not checked, as in LinkSDK."""
    await scripted_server(env, DeviceRef("pk", "d4"))
    device = await env.device("pk", "d4").connect()
    download = LinkSdkDownload(device, 7, 1, len(FW), md5="0" * 32, range_start=12_000)
    result = await download.run(timeout_s=20)
    assert result.status is Status.SUCCESS and result.data == FW[12_000:]
    assert b'"offset":12000}' in result.requests[0]


async def test_emulator_reports_a_digest_mismatch_as_minus_3(env: Bare) -> None:
    """A full download whose MD5 differs from the notice's ends in FAILED_MISMATCH and step -3."""
    await scripted_server(env, DeviceRef("pk", "d5"))
    device = await env.device("pk", "d5").connect()
    result = await LinkSdkDownload(device, 7, 1, len(FW), md5="0" * 32).run(timeout_s=20)
    assert result.status is Status.FAILED_MISMATCH and result.steps[-1] == -3
