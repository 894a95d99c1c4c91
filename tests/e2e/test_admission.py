"""Admission control end to end: a real broker with `max_downloads` set small, real MQTT devices, real HTTPS
downloads. Notices go out only while transfers fit in the window; the rest wait `queued` (the API says how
many), whatever way they would otherwise be notified (the job's step, a reconnect, a pull); a download
beyond the endpoint's capacity gets 503 with Retry-After at once, never a stalled transfer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.test_ops import scrape, value
from tests.support import Device, Env, Tls, broker_config, eventually, reporting, started

FIRMWARE = os.urandom(8 << 20)  # large enough that a client that does not read holds its download open


@pytest.fixture
async def narrow(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A broker that serves one download at a time (`max_downloads: 1`)."""
    async with started(broker_config(tmp_path / "data", tls, max_downloads=1), tls) as e:
        yield e


async def _job_of_two(env: Env) -> tuple[Device, Device, int]:
    a = await reporting(env, "a")
    b = await reporting(env, "b")
    firmware = await env.upload(FIRMWARE)
    job = await env.job(firmware["id"], ["pk/a", "pk/b"])
    return a, b, job["id"]


async def _waiting(env: Env, job_id: int, count: int) -> None:
    async def check() -> bool:
        return bool((await env.api("GET", f"/jobs/{job_id}", expect=200))["waiting_for_capacity"] == count)

    await eventually(check, what=f"job {job_id} to show {count} waiting for capacity")


async def test_notices_wait_for_room_in_the_window_whatever_would_send_them(narrow: Env) -> None:
    """With room for one transfer, a job for two online devices notifies one; the other stays queued, shown as
    waiting for capacity, and gets no notice by reconnecting or pulling either (a pull is answered with no
    upgrade). Once the first device has its firmware (progress 100), the second is notified."""
    env = narrow
    a, b, job_id = await _job_of_two(env)
    [first] = await a.notices(1)
    assert first["data"]["size"] == len(FIRMWARE)
    await _waiting(env, job_id, 1)
    assert (await env.tasks(job_id))["pk/b"]["state"] == "queued"
    overview = await env.api("GET", "/overview", expect=200)
    assert overview["transfers"] == {"window": 1, "in_flight": 1, "waiting": 1, "max": 1}

    b.disconnect()  # a reconnect would notify a queued task of an unpaced job: not without room
    b = await reporting(env, "b")
    await b.pull(request_id="p1")
    [answer] = await b.wait_messages("/sys/pk/b/thing/ota/firmware/get_reply")
    assert answer["id"] == "p1" and answer["data"] == {}
    await asyncio.sleep(3 * 0.2)  # three dispatcher steps
    assert b.messages(b.upgrade_topic) == []
    assert (await env.tasks(job_id))["pk/b"]["state"] == "queued"

    await a.progress("50")
    await asyncio.sleep(3 * 0.2)
    assert b.messages(b.upgrade_topic) == [], "a transfer at 50 % still holds its room"
    await a.progress("100")
    [notice] = await b.notices(1)
    assert notice["data"]["version"] == "2.0.0"
    await _waiting(env, job_id, 0)


async def test_a_download_beyond_capacity_is_refused_at_once_with_retry_after(narrow: Env) -> None:
    """While one download holds the endpoint's only slot (its client reads nothing), another download gets 503
    with Retry-After at once; once the first ends, the same link downloads whole."""
    env = narrow
    a, _b, _job = await _job_of_two(env)
    [notice] = await a.notices(1)
    url = notice["data"]["url"]
    parts = urlsplit(url)
    target = f"{parts.path}?{parts.query}"
    ctx = env.tls.client_context()
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, ssl=ctx, server_hostname=parts.hostname
    )
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head  # then read nothing more: the slot stays taken
        status, headers, body = await asyncio.wait_for(env.download(url), 10)
        assert status == 503 and headers["Retry-After"].isdigit(), (status, body)
        assert len(body) < 100
        samples = await scrape(env)
        assert value(samples, "ota_downloads_total", outcome="busy") == 1
        assert value(samples, "ota_download_slots") == 1
        assert value(samples, "ota_download_slots_used") == 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):  # the server was still writing
            await writer.wait_closed()

    async def whole() -> bool:
        status, _headers, body = await env.download(url)
        return status == 200 and body == FIRMWARE

    await eventually(whole, what="the download to succeed once the slot is free")


async def test_admission_metrics_are_exposed(env: Env) -> None:
    """/metrics carries the event loop's lag histogram, the download slots, the transfer window, the transfers
    in flight and the devices waiting for capacity."""

    async def sampled() -> bool:
        return value(await scrape(env), "ota_event_loop_lag_seconds_count") > 0

    await eventually(sampled, what="the loop lag to be sampled")
    samples = await scrape(env)
    assert value(samples, "ota_download_slots") >= 64
    assert value(samples, "ota_admission_window") >= 1
    assert value(samples, "ota_transfers_in_flight") == 0
    assert value(samples, "ota_tasks_waiting_for_capacity") == 0


async def test_control_plane_latency_is_exposed(env: Env) -> None:
    """/metrics carries how long the broker took to answer a CONNECT (CONNACK) and a QoS 1 PUBLISH (PUBACK,
    the OTA service's handling of an inform included): each answer is counted once, in a bucket."""
    before = await scrape(env)
    d = await env.device("pk", "latency").connect()  # the env disconnects it
    await d.inform("1.0.0")

    async def counted() -> bool:
        samples = await scrape(env)
        return all(
            value(samples, "ota_mqtt_control_latency_seconds_count", answer=answer)
            >= before.get(("ota_mqtt_control_latency_seconds_count", (("answer", answer),)), 0) + 1
            for answer in ("connack", "puback")
        )

    await eventually(counted, what="the CONNACK and the PUBACK to be counted")
    samples = await scrape(env)
    for answer in ("connack", "puback"):
        count = value(samples, "ota_mqtt_control_latency_seconds_count", answer=answer)
        assert value(samples, "ota_mqtt_control_latency_seconds_bucket", answer=answer, le="+Inf") == count
        assert value(samples, "ota_mqtt_control_latency_seconds_bucket", answer=answer, le="10.0") == count
        assert value(samples, "ota_mqtt_control_latency_seconds_sum", answer=answer) > 0
