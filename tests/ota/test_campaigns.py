"""Upgrade campaigns (issue 4) through the OTA service: schedule and end time, pacing, phased rollouts,
error thresholds, retries, re-runs, verify jobs, dynamic jobs, confirmation, overwrite, cancelling by
state, tags and timers across a restart.

The service runs over a real SQLite file with a stateful fake device channel and a movable clock;
`tick()` is called by hand after moving the clock, so nothing here sleeps.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from firmware_store import FirmwareStore, LinkSigner
from plugins.ota.app.ota_app import OtaApp as OtaService
from plugins.ota.core import machine
from plugins.ota.core.admission import TransferWindow
from plugins.ota.core.errors import Conflict, InvalidInput
from plugins.ota.core.model import (
    FirmwareStatus,
    JobRecord,
    JobSpec,
    JobState,
    JobType,
    Rollout,
    SignMethod,
    Task,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef, OtaTopic
from plugins.ota.store.sqlite import SqliteRepository
from tests.ota.fakes import Clock, FakeChannel
from tests.ota.fakes import chunks_of as _chunks

S = TaskState
OLD = "1.0.0"
TARGET = "2.0.0"


# ------------------------------------------------------------------------------------------- fakes


def dev(name: str) -> DeviceRef:
    return DeviceRef("pk", name)


def fleet(n: int, prefix: str = "d") -> list[DeviceRef]:
    return [dev(f"{prefix}{i:02d}") for i in range(n)]


class World:
    """The service over one SQLite file, its fake channel and clock; `restart()` reopens everything."""

    def __init__(self, tmp_path: Path, window: TransferWindow | None = None) -> None:
        self.path = tmp_path
        self.window = window
        self.clock = Clock()
        self.channel = FakeChannel(self.clock)
        self.service: OtaService
        self.repo: SqliteRepository  # the service's, for reading what the app layer does not show

    async def start(self) -> None:
        self.repo = repo = SqliteRepository(self.path / "ota.db")
        await repo.open()
        store = FirmwareStore(self.path / "firmware", max_size=1 << 20)
        store.open()
        self.service = OtaService(
            repo,
            store,
            LinkSigner(b"k" * 32, "https://gw.example:8443", 3600),
            self.channel,
            self.clock,
            auto_register=True,
            max_payload_bytes=4096,
            progress_per_second=5,
            progress_burst=100,
            window=self.window,
        )

    async def stop(self) -> None:
        await self.service.drain()
        await self.repo.close()

    async def restart(self) -> None:
        """A new repository on the same file and a new service (nothing held in memory survives)."""
        await self.stop()
        await self.start()

    # ---- operator

    async def firmware(self, version: str = TARGET, *, verify: bool = False) -> int:
        blob = await self.service.firmware.put_blob(_chunks(f"firmware {version}".encode() * 100))
        fw = await self.service.firmware.add(
            blob,
            product_key="pk",
            version=version,
            module="default",
            sign_method=SignMethod.MD5,
            src_version=None,
            description="",
            verify=verify,
        )
        return fw.id

    async def job(
        self, devices: Sequence[DeviceRef] | None, *, firmware_id: int | None = None, **kwargs: Any
    ) -> int:
        if firmware_id is None:
            firmware_id = await self.firmware()
        spec = JobSpec(firmware_id, devices=None if devices is None else tuple(devices), **kwargs)
        job = await self.service.jobs.create(spec)
        await self.service.drain()
        return job.id

    async def tick(self, seconds: float = 0.0) -> None:
        self.clock.now += seconds
        await self.service.tick()
        await self.service.drain()

    # ---- devices

    async def online(self, *devices: DeviceRef, version: str = OLD) -> None:
        """Connected devices that informed `version` (registered on their first inform)."""
        for d in devices:
            self.channel.connect(d)
            await self.inform(d, version)

    async def offline(self, *devices: DeviceRef, version: str = OLD) -> None:
        """Registered devices on `version` that are not connected."""
        for d in devices:
            await self.inform(d, version)

    async def connect(self, device: DeviceRef) -> None:
        self.channel.connect(device)
        await self.service.events.device_connected(device)

    async def publish(self, topic: str, doc: dict[str, Any]) -> None:
        parsed = OtaTopic.parse(topic)
        assert parsed is not None
        await self.service.events.handle_publish(parsed, json.dumps(doc).encode())

    async def inform(self, device: DeviceRef, version: str) -> None:
        topic = f"/ota/device/inform/{device.product_key}/{device.device_name}"
        await self.publish(topic, {"id": 1, "params": {"version": version}})

    async def progress(self, device: DeviceRef, step: str) -> None:
        topic = f"/ota/device/progress/{device.product_key}/{device.device_name}"
        await self.publish(topic, {"id": 1, "params": {"step": step}})

    async def pull(self, device: DeviceRef) -> dict[str, Any]:
        topic = f"/sys/{device.product_key}/{device.device_name}/thing/ota/firmware/get"
        before = len(self.channel.sent)
        await self.publish(topic, {"id": "q", "params": {}})
        [(_, reply_topic, reply)] = self.channel.sent[before:]
        assert reply_topic.endswith("/thing/ota/firmware/get_reply")
        return reply

    # ---- looking

    async def task(self, job_id: int, device: DeviceRef) -> Task:
        [task] = [t for t in await self.repo.tasks_of_job(job_id) if t.device == device]
        return task

    async def states(self, job_id: int) -> dict[DeviceRef, TaskState]:
        return {t.device: t.state for t in await self.repo.tasks_of_job(job_id)}

    async def get_job(self, job_id: int) -> JobRecord:
        return await self.repo.get_job(job_id)

    async def job_state(self, job_id: int) -> JobState:
        """The state the API answers for the job (derived from its stored state, start time and counts)."""
        job = await self.get_job(job_id)
        return machine.job_state(job.stored_state, job.counts, schedule_at=job.schedule_at, now=self.clock())

    async def firmware_status(self, firmware_id: int) -> FirmwareStatus:
        return (await self.repo.get_firmware(firmware_id)).status


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.start()
    yield w
    await w.stop()


# --------------------------------------------------------------------------------- schedule, end


async def test_scheduled_job_waits_for_schedule_at(world: World) -> None:
    """Before schedule_at the job is `scheduled` and nobody gets a notice; the first tick after it starts the job."""
    a, b = dev("a"), dev("b")
    await world.online(a)
    await world.offline(b)
    start = world.clock.now + 600
    job_id = await world.job([a, b], schedule_at=start)
    assert await world.job_state(job_id) is JobState.SCHEDULED
    assert world.channel.notified() == []

    await world.tick(300)
    await world.connect(b)
    await world.inform(a, OLD)
    assert (await world.pull(a))["data"] == {}
    await world.tick(299)
    assert world.channel.notified() == []
    assert await world.states(job_id) == {a: S.QUEUED, b: S.QUEUED}
    assert await world.job_state(job_id) is JobState.SCHEDULED

    await world.tick(1)
    assert await world.job_state(job_id) is JobState.RUNNING
    assert set(world.channel.notified()) == {a, b}
    assert await world.states(job_id) == {a: S.NOTIFIED, b: S.NOTIFIED}


async def test_end_at_cancels_unfinished_tasks_and_completes_the_job(world: World) -> None:
    """At end_at every unfinished task is cancelled saying the end time was reached, and the job completes."""
    done, busy, waiting, away = dev("done"), dev("busy"), dev("waiting"), dev("away")
    await world.online(done, busy, waiting)
    await world.offline(away)
    end = world.clock.now + 3600
    job_id = await world.job([done, busy, waiting, away], end_at=end)
    await world.inform(done, TARGET)
    await world.progress(busy, "40")

    await world.tick(3599)
    assert await world.states(job_id) == {
        done: S.SUCCEEDED,
        busy: S.IN_PROGRESS,
        waiting: S.NOTIFIED,
        away: S.QUEUED,
    }
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING

    await world.tick(1)
    for device in (busy, waiting, away):
        task = await world.task(job_id, device)
        assert task.state is S.CANCELLED
        assert "end time" in task.desc
    assert (await world.task(job_id, done)).state is S.SUCCEEDED
    assert (await world.get_job(job_id)).stored_state is JobState.COMPLETED
    assert await world.job_state(job_id) is JobState.COMPLETED

    await world.connect(away)
    assert world.channel.notices(away) == []


async def test_end_at_also_ends_a_paused_job(world: World) -> None:
    """A job paused when its end_at passes still has its unfinished tasks cancelled at the end time."""
    a, b = dev("a"), dev("b")
    await world.online(a)
    await world.offline(b)
    job_id = await world.job([a, b], end_at=world.clock.now + 600)
    await world.service.jobs.pause(job_id)

    await world.tick(600)
    await world.tick(60)
    states = await world.states(job_id)
    assert states == {a: S.CANCELLED, b: S.CANCELLED}, "a paused job's tasks outlive its end_at"
    assert "end time" in (await world.task(job_id, b)).desc


# ------------------------------------------------------------------------------------------- pacing


async def test_rate_per_minute_paces_notices_smoothly(world: World) -> None:
    """rate_per_minute=60 notifies about one device a second, never a burst; a connecting device waits its turn."""
    devices = fleet(10)
    late = dev("late")  # sorts after d00..d09: the last in the job's queue
    await world.online(*devices)
    await world.offline(late)
    job_id = await world.job([*devices, late], rate_per_minute=60)
    assert world.channel.notice_count() <= 1
    await world.tick()
    assert world.channel.notice_count() <= 1

    await world.connect(late)
    await world.inform(late, OLD)
    assert world.channel.notices(late) == []
    assert (await world.task(job_id, late)).state is S.QUEUED

    counts = [world.channel.notice_count()]
    for _ in range(9):
        await world.tick(1)
        counts.append(world.channel.notice_count())
    steps = [b - a for a, b in itertools.pairwise(counts)]
    assert max(steps) <= 2, f"notices per 1 s tick: {steps}"
    assert 9 <= counts[-1] <= 11, f"about one notice a second: {counts}"

    for _ in range(5):
        await world.tick(1)
    assert world.channel.notified() == [*devices, late]  # in queue order: the late device did not jump it
    assert world.channel.notice_count() == 11


async def test_unpaced_job_notifies_every_online_device_at_once(world: World) -> None:
    """Without rate_per_minute all ten online devices are notified as the job starts."""
    devices = fleet(10)
    await world.online(*devices)
    job_id = await world.job(devices)
    assert set(world.channel.notified()) == set(devices)
    assert set((await world.states(job_id)).values()) == {S.NOTIFIED}


# ------------------------------------------------------------------------------ phases, thresholds


async def test_phased_rollout_starts_the_next_phase_after_success(world: World) -> None:
    """Phases [20, 80] of ten devices: two are notified; once both succeed the next tick notifies the other eight."""
    devices = fleet(10)
    await world.online(*devices)
    job_id = await world.job(devices, rollout=Rollout((20, 80), success_threshold=100))
    assert world.channel.notified() == devices[:2]

    await world.connect(devices[5])  # a phase-2 device connecting does not start early
    await world.inform(devices[6], OLD)
    assert (await world.pull(devices[7]))["data"] == {}
    await world.tick(1)
    assert world.channel.notified() == devices[:2]

    await world.inform(devices[0], TARGET)
    await world.tick(1)
    assert world.channel.notified() == devices[:2]
    assert (await world.get_job(job_id)).current_group == 0

    await world.inform(devices[1], TARGET)
    await world.tick(1)
    assert set(world.channel.notified()) == set(devices)
    assert (await world.get_job(job_id)).current_group == 1
    states = await world.states(job_id)
    assert [states[d] for d in devices] == [S.SUCCEEDED] * 2 + [S.NOTIFIED] * 8


async def test_error_threshold_pauses_and_resume_acknowledges_failures(world: World) -> None:
    """Two failures pause the job (threshold 2) and stop notices; resume continues and only new failures count."""
    d = fleet(5)
    await world.online(d[0], d[1], d[2])
    await world.offline(d[3], d[4])
    job_id = await world.job(d, rollout=Rollout((100,), error_threshold_count=2))
    assert world.channel.notified() == d[:3]

    await world.progress(d[0], "-2")
    await world.tick(1)
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING
    await world.progress(d[1], "-2")
    await world.tick(1)
    job = await world.get_job(job_id)
    assert job.stored_state is JobState.PAUSED
    assert "threshold" in job.pause_reason and "2" in job.pause_reason
    assert await world.job_state(job_id) is JobState.PAUSED

    await world.connect(d[3])
    await world.inform(d[3], OLD)
    await world.tick(60)
    assert world.channel.notices(d[3]) == []
    assert (await world.task(job_id, d[3])).state is S.QUEUED

    await world.service.jobs.resume(job_id)
    await world.service.drain()
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING
    assert len(world.channel.notices(d[3])) == 1

    await world.progress(d[2], "-2")  # a third failure alone is below the threshold again
    await world.tick(1)
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING

    await world.progress(d[3], "-2")  # a second new failure reaches it
    await world.tick(1)
    assert (await world.get_job(job_id)).stored_state is JobState.PAUSED


async def test_failures_after_rerun_of_acknowledged_failures_pause_again(world: World) -> None:
    """Acknowledged failures that were re-run no longer offset new ones: two new failures pause again (threshold 2)."""
    d = fleet(4)
    await world.online(*d)
    job_id = await world.job(d, rollout=Rollout((100,), error_threshold_count=2))
    await world.progress(d[0], "-2")
    await world.progress(d[1], "-2")
    await world.tick(1)
    assert (await world.get_job(job_id)).stored_state is JobState.PAUSED
    await world.service.jobs.resume(job_id)
    await world.service.jobs.rerun_failed(job_id)
    await world.service.drain()
    assert (await world.states(job_id))[d[0]] is S.NOTIFIED

    await world.progress(d[2], "-2")
    await world.progress(d[3], "-2")
    await world.tick(1)
    job = await world.get_job(job_id)
    assert job.counts.get(S.FAILED) == 2
    assert job.stored_state is JobState.PAUSED, "two failures after the resume did not pause the job"


# ------------------------------------------------------------------------------------ retries, rerun


async def test_failed_task_is_retried_after_the_interval(world: World) -> None:
    """A failure requeues the task; nothing is sent for 5 min, then attempt 2; a second failure is final."""
    a = dev("a")
    await world.online(a)
    job_id = await world.job([a], retry_count=1, retry_interval_minutes=5)
    await world.progress(a, "10")
    failed_at = world.clock.now
    await world.progress(a, "-2")
    task = await world.task(job_id, a)
    assert task.state is S.QUEUED
    assert task.not_before == failed_at + 300
    assert task.attempts == 1
    assert "download failed" in task.desc and "retry 1 of 1" in task.desc

    await world.tick(299)
    await world.connect(a)
    await world.inform(a, OLD)
    await world.tick(0)
    assert len(world.channel.notices(a)) == 1
    assert (await world.task(job_id, a)).state is S.QUEUED

    await world.tick(1)
    task = await world.task(job_id, a)
    assert task.state is S.NOTIFIED and task.attempts == 2
    assert len(world.channel.notices(a)) == 2

    await world.progress(a, "-2")
    assert (await world.task(job_id, a)).state is S.FAILED
    await world.tick(600)
    assert len(world.channel.notices(a)) == 2
    assert (await world.get_job(job_id)).stored_state is JobState.COMPLETED


async def test_timeout_is_not_retried(world: World) -> None:
    """A timed-out task stays timed_out even with retries left."""
    a = dev("a")
    await world.online(a)
    job_id = await world.job([a], timeout_minutes=1, retry_count=1, retry_interval_minutes=5)
    await world.progress(a, "10")
    await world.tick(60)
    assert (await world.task(job_id, a)).state is S.TIMED_OUT
    await world.tick(600)
    await world.connect(a)
    task = await world.task(job_id, a)
    assert task.state is S.TIMED_OUT and task.attempts == 1
    assert len(world.channel.notices(a)) == 1


async def test_rerun_failed_requeues_failed_and_timed_out_tasks(world: World) -> None:
    """rerun_failed re-notifies failed and timed-out tasks; a device busy in another job is left alone."""
    failed, slow, moved = dev("failed"), dev("slow"), dev("moved")
    await world.online(failed, slow, moved)
    job_id = await world.job([failed, slow, moved], timeout_minutes=1)
    await world.progress(failed, "-1")
    await world.progress(moved, "-2")
    await world.progress(slow, "10")
    await world.tick(60)
    assert await world.states(job_id) == {failed: S.FAILED, slow: S.TIMED_OUT, moved: S.FAILED}
    assert (await world.get_job(job_id)).stored_state is JobState.COMPLETED

    other = await world.job([moved], firmware_id=await world.firmware("3.0.0"))
    assert (await world.task(other, moved)).state is S.NOTIFIED

    await world.service.jobs.rerun_failed(job_id)
    await world.service.drain()
    assert await world.states(job_id) == {failed: S.NOTIFIED, slow: S.NOTIFIED, moved: S.FAILED}
    assert (await world.task(job_id, failed)).attempts == 2
    assert (await world.task(job_id, slow)).attempts == 2
    assert len(world.channel.notices(failed)) == 2
    assert len(world.channel.notices(slow)) == 2
    assert len(world.channel.notices(moved)) == 2  # its first notice and the other job's
    assert (await world.task(other, moved)).state is S.NOTIFIED
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING


# ------------------------------------------------------------------------------------------- verify


async def test_verify_job_lifecycle(world: World) -> None:
    """Firmware uploaded with verify is refused by batch jobs until a verify job makes it verified."""
    a, b, c = dev("a"), dev("b"), dev("c")
    await world.online(a, b, c)
    fw = await world.firmware(verify=True)
    assert await world.firmware_status(fw) is FirmwareStatus.UNVERIFIED
    with pytest.raises(Conflict, match="unverified"):
        await world.service.jobs.create(JobSpec(fw, devices=(c,)))

    for devices in ((), tuple(fleet(11)), None):
        with pytest.raises(InvalidInput) as e:
            await world.service.jobs.create(JobSpec(fw, JobType.VERIFY, devices))
        assert e.value.field == "devices"
    assert await world.firmware_status(fw) is FirmwareStatus.UNVERIFIED

    verify_id = await world.job([a, b], firmware_id=fw, type=JobType.VERIFY)
    assert await world.firmware_status(fw) is FirmwareStatus.VERIFYING
    assert set(world.channel.notified()) == {a, b}
    with pytest.raises(Conflict, match="verifying"):
        await world.service.jobs.create(JobSpec(fw, devices=(c,)))

    await world.inform(a, TARGET)
    await world.tick(1)
    assert await world.firmware_status(fw) is FirmwareStatus.VERIFYING
    await world.inform(b, TARGET)
    await world.tick(1)
    assert await world.firmware_status(fw) is FirmwareStatus.VERIFIED
    assert (await world.get_job(verify_id)).stored_state is JobState.COMPLETED

    batch = await world.job([c], firmware_id=fw)
    assert (await world.task(batch, c)).state is S.NOTIFIED


async def test_verify_job_failure_and_cancel(world: World) -> None:
    """A verify failure makes the firmware verify_failed; a cancelled verify leaves it unverified; force skips it."""
    a, b, c = dev("a"), dev("b"), dev("c")
    await world.online(a, b, c)
    failing = await world.firmware("3.0.0", verify=True)
    job_id = await world.job([a, b], firmware_id=failing, type=JobType.VERIFY)
    await world.inform(a, "3.0.0")
    await world.progress(b, "-3")
    await world.tick(1)
    assert await world.firmware_status(failing) is FirmwareStatus.VERIFY_FAILED
    assert (await world.get_job(job_id)).stored_state is JobState.COMPLETED
    with pytest.raises(Conflict, match="verify_failed"):
        await world.service.jobs.create(JobSpec(failing, devices=(c,)))

    cancelled = await world.firmware("4.0.0", verify=True)
    job_id = await world.job([c], firmware_id=cancelled, type=JobType.VERIFY)
    assert await world.firmware_status(cancelled) is FirmwareStatus.VERIFYING
    await world.service.jobs.cancel(job_id)
    assert await world.firmware_status(cancelled) is FirmwareStatus.UNVERIFIED
    assert (await world.task(job_id, c)).state is S.CANCELLED

    forced = await world.job([c], firmware_id=cancelled, force=True)
    assert (await world.task(forced, c)).state is S.NOTIFIED
    assert await world.firmware_status(cancelled) is FirmwareStatus.UNVERIFIED


# ------------------------------------------------------------------------------------------ dynamic


async def test_dynamic_job_takes_devices_that_later_inform_a_source_version(world: World) -> None:
    """A dynamic job on 1.0.0 takes devices informing 1.0.0 later (once each), not others, and stops when cancelled."""
    early, late, older = dev("early"), dev("late"), dev("older")
    await world.online(early)
    fw = await world.firmware()
    job_id = await world.job(None, firmware_id=fw, type=JobType.DYNAMIC, src_versions=(OLD,))
    assert await world.states(job_id) == {early: S.NOTIFIED}

    await world.online(late)
    assert (await world.task(job_id, late)).state is S.NOTIFIED
    assert len(world.channel.notices(late)) == 1

    await world.online(older, version="0.9")
    assert older not in await world.states(job_id)
    assert world.channel.notices(older) == []
    await world.inform(older, OLD)  # it reached a source version later
    assert (await world.task(job_id, older)).state is S.NOTIFIED

    await world.progress(late, "-2")
    await world.inform(late, OLD)  # a device joins a dynamic job once
    late_tasks = [t for t in await world.repo.tasks_of_job(job_id) if t.device == late]
    assert [t.state for t in late_tasks] == [S.FAILED]
    assert len(world.channel.notices(late)) == 1

    await world.tick(60)
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING  # dynamic jobs do not complete
    with pytest.raises(Conflict, match="dynamic"):
        await world.service.jobs.create(JobSpec(fw, JobType.DYNAMIC, None, src_versions=(OLD,)))

    await world.service.jobs.cancel(job_id)
    assert (await world.get_job(job_id)).stored_state is JobState.CANCELLED
    newcomer = dev("newcomer")
    await world.online(newcomer)
    assert newcomer not in await world.states(job_id)
    assert world.channel.notices(newcomer) == []


# --------------------------------------------------------------------------- confirm, overwrite, cancel


async def test_need_confirm_holds_tasks_until_confirmed(world: World) -> None:
    """need_confirm tasks wait in `confirm` with nothing sent until confirmed, by device or all at once."""
    a, b = dev("a"), dev("b")
    await world.online(a, b)
    job_id = await world.job([a, b], need_confirm=True)
    assert await world.states(job_id) == {a: S.CONFIRM, b: S.CONFIRM}
    await world.tick(5)
    await world.connect(a)
    await world.inform(b, OLD)
    assert (await world.pull(b))["data"] == {}
    assert world.channel.notified() == []

    await world.service.jobs.confirm(job_id, [a])
    await world.service.drain()
    assert await world.states(job_id) == {a: S.NOTIFIED, b: S.CONFIRM}
    assert world.channel.notified() == [a]

    await world.service.jobs.confirm(job_id, None)
    await world.service.drain()
    assert await world.states(job_id) == {a: S.NOTIFIED, b: S.NOTIFIED}
    assert len(world.channel.notices(a)) == 1 and len(world.channel.notices(b)) == 1


async def test_overwrite_replaces_the_older_task(world: World) -> None:
    """With overwrite a busy device leaves its older job for the new one; without it, it is skipped `busy`."""
    a, b = dev("a"), dev("b")
    await world.online(a, b)
    job_a = await world.job([a, b])
    job_b = await world.job([a], firmware_id=await world.firmware("3.0.0"), overwrite=True)
    old = await world.task(job_a, a)
    assert old.state is S.CANCELLED and old.desc == f"overwritten by job {job_b}"
    assert (await world.task(job_b, a)).state is S.NOTIFIED
    assert [n["data"]["version"] for n in world.channel.notices(a)] == [TARGET, "3.0.0"]

    job_c = await world.job([b], firmware_id=await world.firmware("4.0.0"))
    skipped = await world.task(job_c, b)
    assert skipped.state is S.SKIPPED and skipped.desc == "busy"
    assert (await world.task(job_a, b)).state is S.NOTIFIED
    assert len(world.channel.notices(b)) == 1


async def test_cancel_by_state_and_single_task(world: World) -> None:
    """Cancelling by state touches only those tasks; cancel_task cancels one; a finished task is a Conflict."""
    waiting, told, working = dev("waiting"), dev("told"), dev("working")
    await world.online(told, working)
    await world.offline(waiting)
    job_id = await world.job([waiting, told, working])
    await world.progress(working, "30")

    job = await world.service.jobs.cancel(job_id, [S.QUEUED])
    assert job.stored_state is JobState.RUNNING
    assert await world.states(job_id) == {waiting: S.CANCELLED, told: S.NOTIFIED, working: S.IN_PROGRESS}
    await world.connect(waiting)
    assert world.channel.notices(waiting) == []

    task = await world.service.jobs.cancel_task(job_id, told)
    assert task.state is S.CANCELLED
    with pytest.raises(Conflict):
        await world.service.jobs.cancel_task(job_id, told)
    await world.tick(1)
    assert await world.states(job_id) == {waiting: S.CANCELLED, told: S.CANCELLED, working: S.IN_PROGRESS}
    assert (await world.get_job(job_id)).stored_state is JobState.RUNNING


async def test_tags_are_delivered_as_ext_data(world: World) -> None:
    """A job's tags arrive in the notice's data.extData."""
    a = dev("a")
    await world.online(a)
    await world.job([a], tags=(("k", "v"),))
    [notice] = world.channel.notices(a)
    assert notice["data"]["extData"] == {"k": "v"}


# ------------------------------------------------------------------------------------------ restart


async def test_retry_wait_survives_a_restart(world: World) -> None:
    """A task waiting out its retry interval is notified only after not_before, also after a restart."""
    a = dev("a")
    await world.online(a)
    job_id = await world.job([a], retry_count=1, retry_interval_minutes=5)
    await world.progress(a, "-2")
    await world.restart()

    await world.tick(200)
    await world.connect(a)
    await world.tick(99)
    assert len(world.channel.notices(a)) == 1
    assert (await world.task(job_id, a)).state is S.QUEUED

    await world.tick(1)
    task = await world.task(job_id, a)
    assert task.state is S.NOTIFIED and task.attempts == 2
    assert len(world.channel.notices(a)) == 2


async def test_schedule_and_phases_survive_a_restart(world: World) -> None:
    """A scheduled, phased job starts at schedule_at and moves to its next phase across restarts."""
    d = fleet(4)
    await world.online(*d)
    job_id = await world.job(d, schedule_at=world.clock.now + 600, rollout=Rollout((50, 50)))
    await world.restart()
    await world.tick(599)
    assert world.channel.notified() == []
    await world.tick(1)
    assert world.channel.notified() == d[:2]

    await world.inform(d[0], TARGET)
    await world.inform(d[1], TARGET)
    await world.restart()
    await world.tick(1)
    assert set(world.channel.notified()) == set(d)
    assert (await world.get_job(job_id)).current_group == 1


async def test_timeout_survives_a_restart(world: World) -> None:
    """A task's timeout runs from its stored first progress report, across a restart."""
    a = dev("a")
    await world.online(a)
    job_id = await world.job([a], timeout_minutes=2)
    await world.progress(a, "10")
    await world.restart()
    await world.tick(119)
    assert (await world.task(job_id, a)).state is S.IN_PROGRESS
    await world.tick(1)
    assert (await world.task(job_id, a)).state is S.TIMED_OUT
