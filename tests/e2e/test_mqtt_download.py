"""Firmware over MQTT end to end: a device that speaks Aliyun's block download exactly as LinkSDK C v4's
`mqtt_download` does (tests/support_linksdk.py: its request text, its reply parser and CRC check, its
resends and resume) upgrades through a real broker on 127.0.0.1:0 over real MQTT, with no HTTP at all."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Device, Env, Tls, broker_config, eventually, reporting, started
from tests.support_linksdk import LinkSdkDownload, Refused, Reply, Status, read_reply, request_payload

FIRMWARE = os.urandom(150_000)
MD5 = hashlib.md5(FIRMWARE).hexdigest()


async def mqtt_job(env: Env, name: str, data: bytes = FIRMWARE) -> tuple[Device, dict[str, Any]]:
    """Device pk/<name> on 1.0.0, a firmware 2.0.0 and a job for it over MQTT; the device and its notice."""
    device = await reporting(env, name)
    firmware = await env.upload(data)
    await env.job(firmware["id"], [f"pk/{name}"], download_protocol="mqtt")
    (notice,) = await device.notices()
    return device, notice["data"]


async def test_a_device_upgrades_over_mqtt_only(env: Env) -> None:
    """The notice offers the file as a stream (dProtocol mqtt, streamId, streamFileId, size, digests, no
    URL); the device fetches it block by block with its CRC check passing, reports progress, and succeeds
    when it reports the new version."""
    device, data = await mqtt_job(env, "m1")
    assert data["dProtocol"] == "mqtt" and "url" not in data
    assert (data["size"], data["md5"], data["sign"], data["signMethod"]) == (len(FIRMWARE), MD5, MD5, "Md5")
    download = LinkSdkDownload(device, data["streamId"], data["streamFileId"], data["size"], md5=data["md5"])
    result = await download.run(timeout_s=30)
    assert result.status is Status.SUCCESS, result
    assert result.data == FIRMWARE and result.refused == [] and result.ignored_offsets == []
    assert result.steps[-1] == 100

    async def reported_all() -> bool:
        task = (await env.tasks(1))["pk/m1"]
        return bool(task["state"] == "in_progress" and task["progress"] == 100)

    await eventually(reported_all, what="the device's progress 100 recorded")
    await device.inform("2.0.0")
    await env.task_state(1, "pk/m1", "succeeded")


async def test_a_reconnect_and_a_resume_in_the_middle(env: Env) -> None:
    """A device that loses its connection mid-download and reconnects with a clean session (without
    subscribing again, as LinkSDK does) still gets its blocks; one that restarts the download from the
    bytes it kept (range_start) gets exactly the rest."""
    device, data = await mqtt_job(env, "m2")
    download = LinkSdkDownload(
        device, data["streamId"], data["streamFileId"], data["size"], md5=data["md5"], recv_timeout_s=1.0
    )
    deadline = time.monotonic() + 20
    while download.result().data.__len__() < len(FIRMWARE) // 3 and time.monotonic() < deadline:
        download.process()
        await asyncio.sleep(0.01)
    await download.reconnect()
    result = await download.run(timeout_s=30)
    assert result.status is Status.SUCCESS, result
    assert result.data == FIRMWARE

    kept = 100_000
    resumed = LinkSdkDownload(device, data["streamId"], data["streamFileId"], data["size"], range_start=kept)
    result = await resumed.run(timeout_s=30)
    assert result.status is Status.SUCCESS, result
    assert result.data == FIRMWARE[kept:]


async def _ask(device: Device, payload: bytes) -> tuple[Reply | Refused, int]:
    """Send one raw block request: what LinkSDK's parser makes of the reply, and the reply's `code`."""
    topic = f"/sys/{device.pk}/{device.dn}/thing/file/download_reply"
    before = len(device.messages(topic))
    device.client.publish(f"/sys/{device.pk}/{device.dn}/thing/file/download", payload, qos=0)
    await eventually(lambda: len(device.messages(topic)) > before, what="a download reply")
    raw = device.messages(topic)[before]["raw"]
    header = json.loads(raw[2 : 2 + int.from_bytes(raw[:2], "big")])
    return read_reply(raw), header["code"]


async def test_bad_block_requests_get_error_replies_and_nothing_breaks(env: Env) -> None:
    """Unknown streams and files, an offset past the end, a block size out of bounds and malformed
    requests each get an error reply (a code other than 200, which LinkSDK refuses and resends after) and
    are counted; the broker still serves good requests afterwards."""
    device, data = await mqtt_job(env, "m3")
    device.client.subscribe("/sys/pk/m3/thing/file/download_reply", qos=0)
    await asyncio.sleep(0.2)
    sid, fid, size = data["streamId"], data["streamFileId"], data["size"]
    rejected = sum(env.service.rejected.values())
    for payload, code in (
        (request_payload(1, sid + 1000, fid, 5120, 0), 404),  # no such stream
        (request_payload(2, sid, fid + 1, 5120, 0), 404),  # no such file
        (request_payload(3, sid, fid, 5120, size), 416),  # past the end
        (request_payload(4, sid, fid, 10 * 1024 * 1024, 0), 400),  # block too large
        (request_payload(5, sid, fid, 0, 0), 400),  # empty block
        (b'{"id":"6","params":{"fileInfo":', 400),  # not JSON
        (b"\xff\xfe", 400),  # not UTF-8
    ):
        assert await _ask(device, payload) == (Refused.HEADER, code), payload
    assert sum(env.service.rejected.values()) == rejected + 7
    good, code = await _ask(device, request_payload(8, sid, fid, 5120, 5120))
    assert code == 200 and isinstance(good, Reply) and good.data == FIRMWARE[5120:10240]


async def test_another_devices_stream_is_refused(env: Env) -> None:
    """A device asking for blocks of another device's stream gets 403 and no byte of it."""
    _, data = await mqtt_job(env, "owner")
    other = await reporting(env, "other")
    other.client.subscribe("/sys/pk/other/thing/file/download_reply", qos=0)
    await asyncio.sleep(0.2)
    answer = await _ask(other, request_payload(1, data["streamId"], data["streamFileId"], 5120, 0))
    assert answer == (Refused.HEADER, 403)


async def test_an_https_job_offers_no_stream_and_a_too_large_file_no_mqtt_job(env: Env) -> None:
    """A task of an HTTPS job cannot be fetched over MQTT (its id is no stream), and a job over MQTT for a
    file over Aliyun's 16 MB limit is refused with a 422 naming download_protocol."""
    device = await reporting(env, "h1")
    firmware = await env.upload(FIRMWARE)
    job = await env.job(firmware["id"], ["pk/h1"])
    (notice,) = await device.notices()
    assert "url" in notice["data"] and "dProtocol" not in notice["data"]
    device.client.subscribe("/sys/pk/h1/thing/file/download_reply", qos=0)
    await asyncio.sleep(0.2)
    task_id = (await env.tasks(job["id"]))["pk/h1"]["id"]
    assert await _ask(device, request_payload(1, task_id, 1, 5120, 0)) == (Refused.HEADER, 404)
    big = await env.upload(b"\0" * (16 * 1024 * 1024 + 1), version="3.0.0")
    body = {"firmware_id": big["id"], "devices": ["pk/h1"], "download_protocol": "mqtt"}
    refused = await env.api("POST", "/jobs", expect=422, json=body)
    assert "download_protocol" in json.dumps(refused)


@pytest.fixture
async def slow(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A broker that serves firmware over MQTT at 100 KiB/s per device."""
    config = broker_config(tmp_path / "data", tls, mqtt_download_bytes_per_second=100 * 1024)
    async with started(config, tls) as e:
        yield e


async def test_blocks_are_paced_per_device(slow: Env) -> None:
    """A device asking for blocks as fast as it can gets mqtt_download_bytes_per_second: 150,000 bytes at
    100 KiB/s, after a burst of 128 KiB, take at least 0.2 s; the download still completes intact."""
    device, data = await mqtt_job(slow, "p1")
    download = LinkSdkDownload(
        device, data["streamId"], data["streamFileId"], data["size"], md5=data["md5"], request_size=16384
    )
    started = time.monotonic()
    result = await download.run(timeout_s=30)
    assert result.status is Status.SUCCESS and result.data == FIRMWARE
    assert time.monotonic() - started >= (len(FIRMWARE) - 128 * 1024) / (100 * 1024)
