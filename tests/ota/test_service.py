"""The OTA service over a real SQLite file, with a stateful fake device channel and a movable clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_store import FirmwareStore, LinkSigner
from plugins.ota.app.ota_app import OtaApp as OtaService
from plugins.ota.core.model import JobSpec, JobType, SignMethod, TaskState
from plugins.ota.core.topics import DeviceRef, OtaTopic
from plugins.ota.store.sqlite import MIGRATIONS, SqliteRepository
from tests.ota.fakes import Clock, FakeChannel
from tests.ota.fakes import chunks_of as _chunks

DEV = DeviceRef("pk", "dev1")


def _service(repo: SqliteRepository, tmp_path: Path) -> tuple[OtaService, FakeChannel, Clock]:
    clock = Clock()
    channel = FakeChannel(clock)
    store = FirmwareStore(tmp_path / "firmware", max_size=1 << 20)
    store.open()
    service = OtaService(
        repo,
        store,
        LinkSigner(b"k" * 32, "https://gw.example:8443", 3600),
        channel,
        clock,
        auto_register=True,
        max_payload_bytes=4096,
        progress_per_second=5,
        progress_burst=100,
    )
    return service, channel, clock


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[SqliteRepository]:
    """The service's repository, for checks the app layer does not offer (a stale write)."""
    repo = SqliteRepository(tmp_path / "ota.db")
    await repo.open()
    yield repo
    await repo.close()


@pytest.fixture
async def world(
    repo: SqliteRepository, tmp_path: Path
) -> AsyncIterator[tuple[OtaService, FakeChannel, Clock]]:
    service, channel, clock = _service(repo, tmp_path)
    yield service, channel, clock
    await service.drain()


async def publish(service: OtaService, topic: str, doc: dict) -> None:
    parsed = OtaTopic.parse(topic)
    assert parsed is not None
    await service.events.handle_publish(parsed, json.dumps(doc).encode())


async def inform(service: OtaService, device: DeviceRef, version: str) -> None:
    topic = f"/ota/device/inform/{device.product_key}/{device.device_name}"
    await publish(service, topic, {"id": 1, "params": {"version": version}})


async def progress(service: OtaService, device: DeviceRef, step: str) -> None:
    topic = f"/ota/device/progress/{device.product_key}/{device.device_name}"
    await publish(service, topic, {"id": 1, "params": {"step": step}})


async def start_job(service: OtaService, devices: list[DeviceRef], **kwargs: object) -> int:
    blob = await service.firmware.put_blob(_chunks(b"firmware" * 100))
    fw = await service.firmware.add(
        blob,
        product_key="pk",
        version="2.0.0",
        module="default",
        sign_method=SignMethod.MD5,
        src_version=None,
        description="",
    )
    job = await service.jobs.create(JobSpec(fw.id, JobType.STATIC, tuple(devices), **kwargs))  # type: ignore[arg-type]
    await service.drain()
    return job.id


async def task_of(service: OtaService, job_id: int, device: DeviceRef = DEV):
    [task] = [t for t in await service.jobs.tasks(job_id) if t.device == device]
    return task


async def test_dispatch_notifies_only_online_devices(world) -> None:
    """A new job notifies its online devices at once and leaves offline ones queued until they connect."""
    service, channel, _ = world
    offline = DeviceRef("pk", "off")
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    await inform(service, offline, "1.0.0")
    job_id = await start_job(service, [DEV, offline])
    assert (await task_of(service, job_id)).state is TaskState.NOTIFIED
    assert (await task_of(service, job_id, offline)).state is TaskState.QUEUED
    assert len(channel.notices(DEV)) == 1

    channel.connect(offline)
    await service.events.device_connected(offline)
    assert (await task_of(service, job_id, offline)).state is TaskState.NOTIFIED
    assert len(channel.notices(offline)) == 1


async def test_interleaved_reports_for_one_device_are_serialized(world) -> None:
    """Fifty progress reports racing for one device all apply in order; none is lost or raises."""
    service, channel, _ = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV])
    await asyncio.gather(*(progress(service, DEV, str(step)) for step in range(1, 51)))
    task = await task_of(service, job_id)
    assert task.state is TaskState.IN_PROGRESS and task.progress == 50
    _, history = await service.jobs.task_history(job_id, DEV)
    assert [h["progress"] for h in history if h["state"] == "in_progress"] == list(range(1, 51))
    assert service.rejected.total() == 0


async def test_cancel_racing_progress_ends_cancelled(world) -> None:
    """An operator's cancel racing a device's reports ends cancelled, and later reports change nothing."""
    service, channel, _ = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV])
    await asyncio.gather(
        *(progress(service, DEV, str(s)) for s in range(1, 20)),
        service.jobs.cancel(job_id),
        *(progress(service, DEV, str(s)) for s in range(20, 40)),
    )
    await progress(service, DEV, "90")
    await inform(service, DEV, "2.0.0")
    task = await task_of(service, job_id)
    assert task.state is TaskState.CANCELLED
    job = await service.jobs.get(job_id)
    assert job.counts == {TaskState.CANCELLED: 1}


async def test_stale_write_is_refused(world, repo: SqliteRepository) -> None:
    """A task write based on an old revision is refused (compare-and-set) and changes nothing."""
    service, channel, _ = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV])
    stale = await task_of(service, job_id)
    await progress(service, DEV, "10")
    from dataclasses import replace

    assert await repo.save_task(replace(stale, state=TaskState.FAILED), "stale") is None
    assert (await task_of(service, job_id)).state is TaskState.IN_PROGRESS


async def test_timeout_runs_from_first_progress(world) -> None:
    """With the clock moved, a task times out exactly `timeout_minutes` after its first progress report."""
    service, channel, clock = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV], timeout_minutes=2)
    clock.now += 500  # waiting before the first report does not count
    await service.tick()
    await progress(service, DEV, "10")
    clock.now += 119
    await progress(service, DEV, "20")
    await service.tick()
    assert (await task_of(service, job_id)).state is TaskState.IN_PROGRESS
    clock.now += 1
    await service.tick()
    task = await task_of(service, job_id)
    assert task.state is TaskState.TIMED_OUT and task.progress == 20


async def test_renotify_only_for_a_new_session(world) -> None:
    """Informing the old version re-sends the notice after a reconnect, not within the session that had it."""
    service, channel, clock = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV])
    await inform(service, DEV, "1.0.0")
    assert len(channel.notices(DEV)) == 1
    clock.now += 5
    channel.connect(DEV)
    await service.events.device_connected(DEV)
    await inform(service, DEV, "1.0.0")
    assert len(channel.notices(DEV)) == 2
    assert (await task_of(service, job_id)).attempts == 1


async def test_state_survives_reopening_the_database(world, repo: SqliteRepository, tmp_path: Path) -> None:
    """Closing and reopening the SQLite file keeps devices, firmware, jobs, tasks and progress; WAL is on."""
    service, channel, _ = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV])
    await progress(service, DEV, "30")
    await service.drain()
    await repo.close()
    repo = SqliteRepository(tmp_path / "ota.db")
    await repo.open()
    try:
        reopened, _, _ = _service(repo, tmp_path)
        task = await task_of(reopened, job_id)
        assert task.state is TaskState.IN_PROGRESS and task.progress == 30
        assert (await repo.get_device(DEV)).modules == {"default": "1.0.0"}
        async with repo.db.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone())[0] == "wal"
        async with repo.db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == len(MIGRATIONS)
    finally:
        await repo.close()


async def test_pull_without_task_answers_empty(world) -> None:
    """A pull with nothing pending answers `data: {}` with the request's id."""
    service, channel, _ = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    await publish(service, "/sys/pk/dev1/thing/ota/firmware/get", {"id": "abc", "params": {}})
    [(_, topic, reply)] = channel.sent
    assert topic == "/sys/pk/dev1/thing/ota/firmware/get_reply"
    assert reply == {"id": "abc", "code": 200, "data": {}, "message": "success"}


async def test_progress_flood_is_rate_limited(world, caplog: pytest.LogCaptureFixture) -> None:
    """Progress beyond the per-device budget is dropped and counted, with one warning, and the budget refills."""
    service, channel, clock = world
    channel.connect(DEV)
    await inform(service, DEV, "1.0.0")
    job_id = await start_job(service, [DEV])
    for step in range(1, 151):
        await progress(service, DEV, str(min(step, 100)))
    assert service.rejected["progress_rate_limited"] == 50
    assert [r for r in caplog.records if "progress_rate_limited" in r.getMessage()] != []
    assert (await task_of(service, job_id)).progress == 100
    clock.now += 1  # five more reports per second
    await progress(service, DEV, "-2")
    assert (await task_of(service, job_id)).state is TaskState.FAILED


async def test_database_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    """A database written by the previous release (schema 2, history rows inserted by hand) opens, is
    migrated to the current schema, keeps its rows, and task changes still write their history rows
    (since schema 3 by a trigger, in the same statement)."""
    import sqlite3

    from plugins.ota.store.sqlite import _statements

    path = tmp_path / "ota.db"
    with sqlite3.connect(path) as old:
        for number, script in enumerate(MIGRATIONS[:2], start=1):
            for statement in _statements(script):
                old.execute(statement)
            old.execute(f"PRAGMA user_version = {number}")
    repo = SqliteRepository(path)
    await repo.open()
    try:
        async with repo.db.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone())[0] == len(MIGRATIONS)
        service, channel, _ = _service(repo, tmp_path)
        channel.connect(DEV)
        await inform(service, DEV, "1.0.0")
        job_id = await start_job(service, [DEV])
        await progress(service, DEV, "30")
        task = await task_of(service, job_id)
        history = await repo.task_history(task.id)
        assert [h["state"] for h in history][-2:] == ["notified", "in_progress"]
        assert history[-1]["progress"] == 30
        await service.drain()
    finally:
        await repo.close()


async def test_the_audit_log_forgets_what_is_past_its_retention_once_an_hour(tmp_path: Path) -> None:
    from plugins.ota.app.accounts import AccountAdmin
    from plugins.ota.core.accounts import AuditEntry

    repo = SqliteRepository(tmp_path / "ota.db")
    await repo.open()
    try:
        now = [1_000_000.0]
        admin = AccountAdmin(repo, lambda: now[0], audit_retention_s=86400)
        for age in (3 * 86400, 2 * 86400, 3600):
            await admin.audit(AuditEntry(now[0] - age, "ann", "admin", "POST /x", "/x", 201, "::1"))
        assert await admin.prune() == 2  # older than a day
        await admin.audit(AuditEntry(now[0] - 5 * 86400, "ann", "admin", "POST /x", "/x", 201, "::1"))
        now[0] += 60
        assert await admin.prune() == 0  # not again within the hour
        now[0] += 3600
        assert await admin.prune() == 1
        assert (await admin.audit_page(10, 0))[1] == 1
        assert await AccountAdmin(repo, lambda: now[0], audit_retention_s=0).prune() == 0  # 0: for ever
    finally:
        await repo.close()
