"""Job options end to end: a notified device that never answers times out, the default keeps notified
tasks for a day, and the options are validated at the API (a real broker on 127.0.0.1:0, real MQTT)."""

from __future__ import annotations

import os

from tests.support import Env, reporting

FIRMWARE = os.urandom(10_000)


async def test_a_notified_device_that_never_answers_times_out(env: Env) -> None:
    """A device that gets its notice and never reports progress is timed out notify_timeout_minutes after
    the notice, with the reason; the job then completes."""
    device = await reporting(env, "quiet")
    firmware = await env.upload(FIRMWARE)
    job = await env.job(firmware["id"], ["pk/quiet"], notify_timeout_minutes=0.01)  # 0.6 s
    await device.notices()
    task = await env.task_state(job["id"], "pk/quiet", "timed_out")
    assert task["desc"] == "no progress report 0.01 min after the notice"
    assert (await env.api("GET", f"/jobs/{job['id']}", expect=200))["state"] == "completed"


async def test_a_notified_task_waits_a_day_by_default_and_never_when_told(env: Env) -> None:
    """Without the option a notified task times out after 1440 minutes (stored with the job); with 0 it
    never does; the device that answers in time is not touched."""
    await reporting(env, "d1")
    firmware = await env.upload(FIRMWARE)
    default = await env.job(firmware["id"], ["pk/d1"])
    assert default["options"]["notify_timeout_minutes"] == 1440
    await env.api("POST", f"/jobs/{default['id']}/cancel", expect=200)
    never = await env.job(firmware["id"], ["pk/d1"], notify_timeout_minutes=0)
    assert never["options"]["notify_timeout_minutes"] == 0
    await env.task_state(never["id"], "pk/d1", "notified")
    tasks = await env.service.jobs.tasks(never["id"])
    assert [t.notify_timeout_s for t in tasks] == [None]


async def test_job_options_are_validated(env: Env) -> None:
    """A download protocol other than https or mqtt, or a negative notify timeout, is a 422 naming the
    field, and no job is created."""
    await reporting(env, "d1")
    firmware = await env.upload(FIRMWARE)
    body = {"firmware_id": firmware["id"], "devices": ["pk/d1"]}
    for bad, field in (
        ({"download_protocol": "ftp"}, "download_protocol"),
        ({"notify_timeout_minutes": -1}, "notify_timeout_minutes"),
        ({"notify_timeout_minutes": "soon"}, "notify_timeout_minutes"),
    ):
        refused = await env.api("POST", "/jobs", expect=422, json=body | bad)
        assert field in str(refused), refused
    assert await env.api("GET", "/jobs", expect=200) == []
