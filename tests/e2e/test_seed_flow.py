"""The seed's upgrade flow end to end: a real broker on 127.0.0.1:0, real MQTT devices, real HTTPS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from typing import Any

from tests.support import Device, Env, eventually

FIRMWARE = os.urandom(300_000)


async def registered(env: Env, ref: str, module: str = "default", version: str | None = None) -> dict:
    async def check() -> dict | None:
        d = await env.find(f"/devices/{ref}")
        if d is None or (version is not None and d["modules"].get(module) != version):
            return None
        return d

    return await eventually(check, what=f"{ref} to be recorded")


async def reporting(env: Env, name: str, **kwargs: Any) -> Device:
    """A connected device `pk/<name>` whose version 1.0.0 the broker has recorded."""
    d = await env.device("pk", name, **kwargs).connect()
    await d.inform("1.0.0")
    await registered(env, d.ref, version="1.0.0")
    return d


async def gone(env: Env, d: Device) -> None:
    """Disconnect `d` and wait until the broker has it offline."""
    d.disconnect()
    await eventually(lambda: _offline(env, d.ref), what=f"{d.ref} to go offline")


async def test_five_seed_steps(env: Env) -> None:
    """Inform, upload, job, notice with exactly the protocol's fields, HTTPS download, progress, new version."""
    d = await env.device("pk", "dev1").connect()
    await d.inform("1.0.0")
    device = await registered(env, "pk/dev1", version="1.0.0")
    assert device["modules"] == {"default": "1.0.0"}

    fw = await env.upload(FIRMWARE, version="2.0.0")
    assert fw["size"] == len(FIRMWARE)
    assert fw["md5"] == hashlib.md5(FIRMWARE).hexdigest()
    assert fw["sha256"] == hashlib.sha256(FIRMWARE).hexdigest()
    job = await env.job(fw["id"], ["pk/dev1"])

    [notice] = await d.notices()
    assert set(notice) == {"code", "data", "id", "message"}
    assert notice["code"] == "1000" and notice["message"] == "success" and isinstance(notice["id"], int)
    data = notice["data"]
    assert set(data) == {"size", "version", "url", "md5", "sign", "signMethod", "extData"}
    assert data["size"] == len(FIRMWARE) and data["version"] == "2.0.0"
    assert data["md5"] == data["sign"] == fw["md5"] and data["signMethod"] == "Md5"
    assert data["url"].startswith("https://127.0.0.1:") and len(data["url"]) <= 256
    task = await env.task_state(job["id"], "pk/dev1", "notified")
    assert task["attempts"] == 1

    status, headers, body = await env.download(data["url"])
    assert status == 200 and body == FIRMWARE
    assert headers["Content-Length"] == str(len(FIRMWARE)) and "Transfer-Encoding" not in headers

    await d.progress("10", "downloading")
    await d.progress("100", "flashing")
    task = await env.task_state(job["id"], "pk/dev1", "in_progress")
    await eventually(lambda: _progress(env, job["id"], "pk/dev1", 100), what="progress 100")
    assert (await env.api("GET", f"/jobs/{job['id']}", expect=200))["state"] == "running"

    await d.inform("2.0.0")
    task = await env.task_state(job["id"], "pk/dev1", "succeeded")
    assert task["progress"] == 100
    finished = await env.api("GET", f"/jobs/{job['id']}", expect=200)
    assert finished["state"] == "completed" and finished["counts"]["succeeded"] == 1
    assert len(d.messages(d.upgrade_topic)) == 1


async def _progress(env: Env, job_id: int, ref: str, value: int) -> bool:
    return bool((await env.tasks(job_id))[ref]["progress"] == value)


async def test_subscribed_device_gets_exactly_one_copy(env: Env) -> None:
    """A device that subscribed to its upgrade topic gets the notice once; one that did not still gets it."""
    subscribed = await env.device("pk", "sub").connect()
    await subscribed.subscribe("/ota/device/upgrade/pk/sub")
    plain = await env.device("pk", "plain").connect()
    for d in (subscribed, plain):
        await d.inform("1.0.0")
        await registered(env, d.ref, version="1.0.0")
    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/sub", "pk/plain"])
    await subscribed.notices()
    await plain.notices()
    await asyncio.sleep(0.5)  # room for a duplicate to show up
    assert len(subscribed.messages(subscribed.upgrade_topic)) == 1
    assert len(plain.messages(plain.upgrade_topic)) == 1


async def test_wildcard_subscriber_sees_notice_once_and_device_once(env: Env) -> None:
    """An operator's `#` subscription sees the notice, and the target device still gets exactly one copy."""
    monitor = await env.device("ops", "monitor", client_id="monitor").connect()
    await monitor.subscribe("/ota/device/upgrade/#")
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/dev1"])
    await monitor.wait_messages("/ota/device/upgrade/pk/dev1")
    await d.notices()
    await asyncio.sleep(0.3)
    assert len(d.messages(d.upgrade_topic)) == 1


async def test_module_notice_and_progress(env: Env) -> None:
    """Firmware for a named module carries `module` in the notice, and the module's version decides success."""
    d = await env.device("pk", "dev1").connect()
    await d.inform("1.0.0")
    await d.inform("0.9", module="MCU")
    await registered(env, "pk/dev1", "MCU", "0.9")
    fw = await env.upload(FIRMWARE, version="1.0", module="MCU", sign_method="SHA256")
    job = await env.job(fw["id"], ["pk/dev1"])
    [notice] = await d.notices()
    assert notice["data"]["module"] == "MCU"
    assert notice["data"]["signMethod"] == "SHA256" and notice["data"]["sign"] == fw["sha256"]
    await d.progress("40", module="MCU")
    await env.task_state(job["id"], "pk/dev1", "in_progress")
    await d.inform("2.0.0")  # the default module changing does not touch the MCU task
    await asyncio.sleep(0.2)
    assert (await env.tasks(job["id"]))["pk/dev1"]["state"] == "in_progress"
    await d.inform("1.0", module="MCU")
    await env.task_state(job["id"], "pk/dev1", "succeeded")
    device = await env.api("GET", "/devices/pk/dev1", expect=200)
    assert device["modules"] == {"default": "2.0.0", "MCU": "1.0"}


async def test_pull_gets_the_pending_notice_or_empty_data(env: Env) -> None:
    """`thing/ota/firmware/get` answers with the push's data when a task is pending, else `data: {}`."""
    d = await env.device("pk", "dev1").connect()
    reply_topic = "/sys/pk/dev1/thing/ota/firmware/get_reply"
    await d.inform("1.0.0")
    await registered(env, "pk/dev1", version="1.0.0")
    await d.pull(request_id="req-1")
    [empty] = await d.wait_messages(reply_topic)
    assert empty == {"id": "req-1", "code": 200, "data": {}, "message": "success"}

    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/dev1"])
    [push] = await d.notices()
    await d.pull(request_id=42)
    replies = await d.wait_messages(reply_topic, 2)
    assert replies[1]["id"] == 42 and replies[1]["code"] == 200 and replies[1]["message"] == "success"
    reply_data = dict(replies[1]["data"])
    push_data = dict(push["data"])
    assert reply_data.pop("url").startswith("https://") and push_data.pop("url")
    assert reply_data == push_data


async def test_pull_before_any_push_notifies_the_task(env: Env) -> None:
    """A device that pulls while its task is queued (it was offline at job start) gets the data and is notified."""
    d = env.device("pk", "dev1")
    await d.connect()
    await d.inform("1.0.0")
    await registered(env, "pk/dev1", version="1.0.0")
    await gone(env, d)
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/dev1"])
    assert (await env.tasks(job["id"]))["pk/dev1"]["state"] == "queued"

    puller = await env.device("pk", "dev1", client_id="pk.dev1.pull").connect()
    await puller.pull(module=None, request_id=9)
    [reply] = await puller.wait_messages("/sys/pk/dev1/thing/ota/firmware/get_reply")
    assert reply["data"]["version"] == "2.0.0"
    await env.task_state(job["id"], "pk/dev1", "notified")


async def _offline(env: Env, ref: str) -> bool:
    d = await env.find(f"/devices/{ref}")
    return d is not None and not d["online"]


async def test_legacy_request_topic(env: Env) -> None:
    """The v3 `/ota/device/request` pull is answered on the same topic with the push payload (it has `url`)."""
    d = await env.device("pk", "v3dev").connect()
    await d.subscribe("/ota/device/request/pk/v3dev")
    await d.subscribe("/ota/device/upgrade/pk/v3dev")
    await d.inform("1.0.0")
    await registered(env, "pk/v3dev", version="1.0.0")
    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/v3dev"])
    await d.notices()
    await d.publish("/ota/device/request/pk/v3dev", {"id": 3, "params": {"version": "1.0.0"}})
    replies = await eventually(
        lambda: [m for m in d.messages("/ota/device/request/pk/v3dev") if "data" in m],
        what="the legacy reply",
    )
    assert replies[0]["code"] == "1000" and replies[0]["message"] == "success"
    assert replies[0]["data"]["url"].startswith("https://") and replies[0]["data"]["version"] == "2.0.0"


async def test_offline_device_notified_when_it_connects(env: Env) -> None:
    """A target device that is offline when the job starts gets the notice when it comes back, unsubscribed."""
    first = await reporting(env, "later", username="later&pk")
    await gone(env, first)
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/later"])
    await asyncio.sleep(0.2)
    assert (await env.tasks(job["id"]))["pk/later"]["state"] == "queued"

    back = await env.device("pk", "later", username="later&pk").connect()
    [notice] = await back.notices()
    assert notice["data"]["version"] == "2.0.0"
    await env.task_state(job["id"], "pk/later", "notified")
    await back.inform("1.0.0")  # the boot-time inform of the same session does not repeat the notice
    await asyncio.sleep(0.3)
    assert len(back.messages(back.upgrade_topic)) == 1


async def test_device_identified_by_first_publish_gets_notice_on_inform(env: Env) -> None:
    """In open mode a client with a non-Aliyun username becomes the device by informing; the notice follows."""
    first = await reporting(env, "anon", username="someone")
    await gone(env, first)
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/anon"])
    back = await env.device("pk", "anon", username="someone").connect()
    await back.inform("1.0.0")
    await back.notices()
    await env.task_state(job["id"], "pk/anon", "notified")


async def test_failure_steps(env: Env) -> None:
    """Progress steps -1..-4 fail the task with the documented reason and the device's desc."""
    reasons = {
        "-1": "upgrade failed",
        "-2": "download failed",
        "-3": "verification failed",
        "-4": "flash failed",
    }
    devices = {}
    for step in reasons:
        d = await env.device("pk", f"f{step[1]}").connect()
        await d.inform("1.0.0")
        devices[step] = d
    for d in devices.values():
        await registered(env, d.ref, version="1.0.0")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], [d.ref for d in devices.values()])
    for step, d in devices.items():
        await d.notices()
        await d.progress(step, "boom")
    for step, d in devices.items():
        task = await env.task_state(job["id"], d.ref, "failed")
        assert task["desc"] == f"{reasons[step]}: boom"
    assert (await env.api("GET", f"/jobs/{job['id']}", expect=200))["state"] == "completed"


async def test_version_mismatch_and_renotify(env: Env) -> None:
    """Old version before progress gets the notice again (new session); another version after progress fails."""
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/dev1"])
    await d.notices()
    d.disconnect()  # reboots without acting on the notice
    rebooted = await env.device("pk", "dev1").connect()
    await rebooted.inform("1.0.0")
    await rebooted.notices()
    await rebooted.progress("20")
    await env.task_state(job["id"], "pk/dev1", "in_progress")
    await rebooted.inform("1.5.0")
    task = await env.task_state(job["id"], "pk/dev1", "failed")
    assert task["desc"].startswith("version mismatch")


async def test_hundred_percent_without_new_version_is_not_success(env: Env) -> None:
    """100 % progress alone leaves the task in progress; only the new version succeeds it."""
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/dev1"])
    await d.notices()
    await d.progress("100")
    await asyncio.sleep(0.3)
    assert (await env.tasks(job["id"]))["pk/dev1"]["state"] == "in_progress"


async def test_timeout_from_first_progress(env: Env) -> None:
    """A task with no success `timeout_minutes` after its first progress report becomes timed_out."""
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/dev1"], timeout_minutes=0.01)  # 0.6 s
    await d.notices()
    await d.progress("5")
    task = await env.task_state(job["id"], "pk/dev1", "timed_out", timeout=5)
    assert "after the first progress report" in task["desc"]


async def test_cancel_job(env: Env) -> None:
    """Cancelling stops unfinished tasks, leaves finished ones, and invalidates the download link."""
    a = await env.device("pk", "a").connect()
    b = await env.device("pk", "b").connect()
    for d in (a, b):
        await d.inform("1.0.0")
        await registered(env, d.ref, version="1.0.0")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/a", "pk/b"])
    [notice_a] = await a.notices()
    status, _, _ = await env.download(notice_a["data"]["url"], {"Range": "bytes=0-99"})
    assert status == 206  # a began downloading: its "may download" answer is remembered for a moment
    await b.notices()
    await b.progress("50")
    await b.inform("2.0.0")
    await env.task_state(job["id"], "pk/b", "succeeded")

    cancelled = await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
    assert cancelled["state"] == "cancelled"
    tasks = await env.tasks(job["id"])
    assert tasks["pk/a"]["state"] == "cancelled" and tasks["pk/b"]["state"] == "succeeded"
    status, _, body = await env.download(notice_a["data"]["url"])
    assert status == 403 and FIRMWARE[:64] not in body
    await a.progress("10")  # a late report changes nothing
    await asyncio.sleep(0.2)
    assert (await env.tasks(job["id"]))["pk/a"]["state"] == "cancelled"


async def test_download_rules(env: Env) -> None:
    """Range answers 206 with Content-Range; a tampered or another device's URL gets 403 and no bytes."""
    a = await env.device("pk", "a").connect()
    b = await env.device("pk", "b").connect()
    for d in (a, b):
        await d.inform("1.0.0")
        await registered(env, d.ref, version="1.0.0")
    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/a"])
    [notice] = await a.notices()
    url = notice["data"]["url"]

    status, headers, body = await env.download(url, {"Range": "bytes=1000-1999"})
    assert status == 206 and body == FIRMWARE[1000:2000]
    assert (
        headers["Content-Range"] == f"bytes 1000-1999/{len(FIRMWARE)}" and headers["Content-Length"] == "1000"
    )
    status, headers, body = await env.download(url, {"Range": f"bytes={len(FIRMWARE) - 10}-"})
    assert status == 206 and body == FIRMWARE[-10:]
    status, _, _ = await env.download(url, {"Range": f"bytes={len(FIRMWARE) + 5}-"})
    assert status == 416
    assert (await env.download(url))[1]["ETag"].strip('"') == fw["sha256"]

    tampered = re.sub(r"t=[^&]+", "t=AAAAAAAAAAAAAAAAAAAAAA", url)
    foreign = url.replace("s=pk/a", "s=pk/b")
    for bad in (tampered, foreign, url.replace("/firmware/", "/firmware/9")):
        status, _, body = await env.download(bad)
        assert status == 403 and FIRMWARE[:64] not in body


async def test_device_with_two_clients_keeps_its_session(env: Env) -> None:
    """A lab's listener and a short-lived publisher with the same device credentials: when the publisher
    leaves, the listener is the device's session and gets the notice."""
    listener = await env.device("pk", "dev1", client_id="listener", username="dev1&pk").connect()
    publisher = env.device("pk", "dev1", client_id="publisher", username="dev1&pk")
    await publisher.connect()
    await publisher.inform("1.0.0")
    await registered(env, "pk/dev1", version="1.0.0")
    publisher.disconnect()
    await asyncio.sleep(0.2)
    assert (await env.api("GET", "/devices/pk/dev1", expect=200))["online"] is True
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/dev1"])
    [notice] = await listener.notices()
    assert notice["data"]["version"] == "2.0.0"
    await env.task_state(job["id"], "pk/dev1", "notified")
