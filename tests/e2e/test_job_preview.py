"""Knowing whom a job touches before it starts: `POST /jobs/preview` (and `job create --dry-run`) plans a job
from the same body as `POST /jobs` and starts nothing; its seed starts exactly what it showed (a real broker
on 127.0.0.1:0, real MQTT devices)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from tests.support import Env, eventually, reporting

FIRMWARE = os.urandom(10_000)


async def _fleet(env: Env) -> list[Any]:
    """pk/d1 … pk/d6 on 1.0.0, pk/d7 already on 2.0.0."""
    devices = [await reporting(env, f"d{i}") for i in range(1, 7)]
    d7 = await env.device("pk", "d7").connect()
    await d7.inform("2.0.0")

    async def recorded() -> bool:
        found = await env.find("/devices/pk/d7")
        return found is not None and found["modules"].get("default") == "2.0.0"

    await eventually(recorded, what="pk/d7 on 2.0.0")
    for d in [*devices, d7]:
        await d.subscribe(d.upgrade_topic)
    return [*devices, d7]


async def test_a_preview_shows_whom_a_job_would_notify_and_starts_nothing(env: Env) -> None:
    devices = await _fleet(env)
    fw = await env.upload(FIRMWARE, version="2.0.0")
    p = await env.api("POST", "/jobs/preview", expect=200, json={"firmware_id": fw["id"]})
    assert p["whole_product"] is True  # no device list: the whole product, said so
    assert p["firmware"] == {"id": fw["id"], "product_key": "pk", "module": "default", "version": "2.0.0"}
    assert (p["devices"], p["tasks"]) == (7, 6)
    assert p["states"] == {"queued": 6, "skipped": 1}
    assert p["skipped_reasons"] == {"already_on_target": 1}
    assert [s["device"] for s in p["sample"]] == [f"pk/d{i}" for i in range(1, 8)]  # to notify first
    assert p["sample"][-1] == {"device": "pk/d7", "state": "skipped", "phase": 0, "desc": "already_on_target"}
    await asyncio.sleep(0.3)
    assert await env.api("GET", "/jobs", expect=200) == []
    assert all(d.messages(d.upgrade_topic) == [] for d in devices), "a preview notified a device"

    # phases, source versions and a list: the same planning as the job's
    phased = await env.api(
        "POST", "/jobs/preview", expect=200, json={"firmware_id": fw["id"], "rollout": {"phases": [50, 50]}}
    )
    assert phased["phases"] == [3, 3]
    listed = await env.api(
        "POST",
        "/jobs/preview",
        expect=200,
        json={"firmware_id": fw["id"], "devices": ["pk/d1", "pk/d7"], "src_versions": ["1.0.0"]},
    )
    assert listed["whole_product"] is False
    assert (listed["tasks"], listed["skipped_reasons"]) == (1, {"src_version_mismatch": 1})


async def test_a_previewed_seed_starts_exactly_the_previewed_gray_sample(env: Env) -> None:
    await _fleet(env)
    fw = await env.upload(FIRMWARE, version="2.0.0")
    body = {"firmware_id": fw["id"], "gray_percent": 50}
    previews = [await env.api("POST", "/jobs/preview", expect=200, json=body) for _ in range(6)]
    chosen = [sorted(s["device"] for s in p["sample"] if s["state"] == "queued") for p in previews]
    assert len({tuple(c) for c in chosen}) > 1, "every preview drew the same sample: the seed is not used"
    for p, devices in zip(previews[:3], chosen[:3], strict=True):
        job = await env.api("POST", "/jobs", expect=201, json=body | {"seed": p["seed"]})
        tasks = await env.api("GET", f"/jobs/{job['id']}/tasks?limit=100", expect=200)
        assert sorted(t["device"] for t in tasks if t["state"] != "skipped") == devices
        await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)


async def test_a_preview_refuses_what_the_job_would_refuse(env: Env) -> None:
    await reporting(env, "d1")
    fw = await env.upload(FIRMWARE, version="2.0.0")
    for body, field in (
        ({"firmware_id": 999}, "firmware_id"),
        ({"firmware_id": fw["id"], "devices": ["pk/nobody"]}, "devices[0]"),
        ({"firmware_id": fw["id"], "seed": 5}, "seed"),
        ({"firmware_id": fw["id"], "seed": "x" * 129}, "seed"),
        ({"firmware_id": fw["id"], "gray_percent": 0}, "gray_percent"),
    ):
        answer = await env.api("POST", "/jobs/preview", expect=422, json=body)
        assert answer["message"].startswith(f"{field}: "), (body, answer)
        assert (await env.api("POST", "/jobs", expect=422, json=body)) == answer
    assert await env.api("GET", "/jobs", expect=200) == []


async def test_a_jobs_timeline_and_its_eta(env: Env) -> None:
    """`GET /jobs/{id}/timeline`: succeeded and failed (or timed-out) tasks, cumulative, from the job's start to its
    last outcome; a running job with successes has an ETA at that pace, a finished one none."""
    devices = await _fleet(env)
    fw = await env.upload(FIRMWARE, version="2.0.0")
    job = await env.job(fw["id"], [f"pk/d{i}" for i in range(1, 7)])
    for d in devices[:6]:
        await d.notices()
    await devices[0].inform("2.0.0")
    await devices[1].inform("2.0.0")
    await devices[2].progress("-1", "upgrade failed")
    await env.task_state(job["id"], "pk/d2", "succeeded")
    await env.task_state(job["id"], "pk/d3", "failed")
    running = await env.api("GET", f"/jobs/{job['id']}", expect=200)
    assert running["state"] == "running" and running["eta"] is not None
    timeline = await env.api("GET", f"/jobs/{job['id']}/timeline", expect=200)
    assert timeline["points"][0] | {"at": None} == {"at": None, "succeeded": 0, "failed": 0}
    last = timeline["points"][-1]
    assert (last["succeeded"], last["failed"]) == (2, 1)
    succeeded = [p["succeeded"] for p in timeline["points"]]
    assert succeeded == sorted(succeeded) and len(timeline["points"]) <= 120
    await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
    assert (await env.api("GET", f"/jobs/{job['id']}", expect=200))["eta"] is None
    assert (await env.api("GET", "/jobs/999/timeline", expect=404))["error"] == "not_found"


async def test_devices_in_a_group_are_listed_and_targeted_by_a_job(env: Env) -> None:
    """Groups given to devices (PATCH, replaced whole) filter the device list, and a job for a group
    notifies the product's devices in it only; bad names and a group beside a device list are refused."""
    devices = await _fleet(env)
    for name in ("d1", "d3"):
        answer = await env.api("PATCH", f"/devices/pk/{name}", expect=200, json={"groups": ["canary", "eu"]})
        assert answer["groups"] == ["canary", "eu"]
    await env.api("PATCH", "/devices/pk/d3", expect=200, json={"groups": ["eu"]})
    listed = await env.api("GET", "/devices?group=canary", expect=200)
    assert [d["device_name"] for d in listed] == ["d1"] and listed[0]["groups"] == ["canary", "eu"]
    assert (await env.api("GET", "/devices/pk/d3", expect=200))["groups"] == ["eu"]
    fw = await env.upload(FIRMWARE, version="2.0.0")
    preview = await env.api(
        "POST", "/jobs/preview", expect=200, json={"firmware_id": fw["id"], "group": "eu"}
    )
    assert [s["device"] for s in preview["sample"]] == ["pk/d1", "pk/d3"]
    assert (preview["whole_product"], preview["group"]) == (False, "eu")
    job = await env.api("POST", "/jobs", expect=201, json={"firmware_id": fw["id"], "group": "eu"})
    assert job["options"]["group"] == "eu"
    tasks = await env.api("GET", f"/jobs/{job['id']}/tasks", expect=200)
    assert sorted(t["device"] for t in tasks) == ["pk/d1", "pk/d3"]
    await devices[0].notices()
    assert devices[1].messages(devices[1].upgrade_topic) == []  # d2 is in no group: not notified
    for body, field in (
        ({"groups": ["bad name"]}, "groups[0]"),
        ({"groups": "eu"}, "groups"),
        ({"enabled": "yes"}, "enabled"),
    ):
        answer = await env.api("PATCH", "/devices/pk/d1", expect=422, json=body)
        assert answer["message"].startswith(f"{field}: "), answer
    bad = await env.api(
        "POST",
        "/jobs/preview",
        expect=422,
        json={"firmware_id": fw["id"], "group": "eu", "devices": ["pk/d1"]},
    )
    assert bad["message"].startswith("group: ")
    assert (
        await env.api("POST", "/jobs/preview", expect=422, json={"firmware_id": fw["id"], "group": "none"})
    )["message"].startswith("devices: no device matches")


async def test_versions_over_time_are_worked_back_from_the_upgrades(env: Env) -> None:
    devices = await _fleet(env)  # d1..d6 on 1.0.0, d7 on 2.0.0
    fw = await env.upload(FIRMWARE, version="2.0.0")
    job = await env.job(fw["id"], ["pk/d1", "pk/d2"])
    for d in devices[:2]:
        await d.notices()
        await d.inform("2.0.0")
    for name in ("pk/d1", "pk/d2"):
        await env.task_state(job["id"], name, "succeeded")
    doc = await env.api("GET", "/overview/versions?days=7", expect=200)
    [series] = doc["series"]
    assert (series["product_key"], series["module"], doc["days"]) == ("pk", "default", 7)
    first, last = series["points"][0]["versions"], series["points"][-1]["versions"]
    assert first == {"2.0.0": 1, "others": 6}  # a week ago: d7 only (the two upgrades came since)
    assert last == {"2.0.0": 3, "others": 4}
    assert len(series["points"]) == 60
    assert (await env.api("GET", "/overview/versions?days=0", expect=422))["message"].startswith("days: ")
