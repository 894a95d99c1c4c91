"""`ota-broker copy-database`: an embedded SQLite database copied into an empty PostgreSQL database, every
row with its id, read back through the PostgreSQL repository exactly as the SQLite one reads it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from plugins.ota.core.accounts import AuditEntry, Role
from plugins.ota.core.machine import PlannedTask
from plugins.ota.core.model import (
    FirmwareFile,
    JobOptions,
    JobType,
    Rollout,
    SignMethod,
    TaskPolicy,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.copy import CopyError, copy_sqlite_to_postgres
from plugins.ota.store.postgres import PostgresRepository
from plugins.ota.store.repository import Repository
from plugins.ota.store.sqlite import SqliteRepository
from tests.postgres import Postgres

NOW = 1_700_000_000.25
DEVICES = [DeviceRef("pk", f"d{i}") for i in range(5)] + [DeviceRef("pk2", "other")]


async def _fill(repo: Repository) -> None:
    """A little of everything: devices (one disabled, one online, versions of two modules), two firmware
    (one a package of two files), a phased job whose tasks moved (history rows), and a second job."""
    await repo.add_devices([(d, f"secret-{d.device_name}") for d in DEVICES], NOW)
    await repo.set_enabled(DEVICES[1], False)
    await repo.set_online(DEVICES[2], True, NOW + 1)
    await repo.record_version(DEVICES[0], "default", "1.0.0", NOW + 2)
    await repo.record_version(DEVICES[0], "wifi", "0.9", NOW + 3)
    plain = await repo.add_firmware(
        product_key="pk", module="default", version="2.0.0", src_version="1.0.0", size=10, md5="m" * 32,
        sha256="a" * 64, sign_method=SignMethod.SHA256, description="é and 中文", now=NOW,
    )  # fmt: skip
    package = await repo.add_firmware(
        product_key="pk", module="wifi", version="1.0", src_version=None, size=30, md5="n" * 32,
        sha256="b" * 64, sign_method=SignMethod.MD5, description="", now=NOW + 5,
        files=[FirmwareFile("a.bin", 10, "c" * 32, "c" * 64), FirmwareFile("b.bin", 20, "d" * 32, "d" * 64)],
    )  # fmt: skip
    rollout = Rollout(phases=(50.0, 50.0), error_threshold_count=3)
    options = JobOptions(seed="s", tags={"z": "1", "a": "2"}, rollout=rollout)
    job = await repo.create_job(
        plain, JobType.STATIC, options, [PlannedTask(d, TaskState.QUEUED, group_no=i % 2) for i, d in
        enumerate(DEVICES[:4])], TaskPolicy(retry_count=2, timeout_s=60.0), NOW + 10, end_at=NOW + 999,
    )  # fmt: skip
    for task in await repo.tasks_of_job(job):
        moved = replace(task, state=TaskState.NOTIFIED, notified_at=NOW + 11)
        saved = await repo.save_task(moved, "notified")
        assert saved is not None
        await repo.save_task(replace(saved, state=TaskState.IN_PROGRESS, progress=40), "step 40")
    await repo.create_job(
        package, JobType.DYNAMIC, JobOptions(seed="t"), [PlannedTask(DEVICES[4], TaskState.QUEUED)],
        TaskPolicy(), NOW + 20,
    )  # fmt: skip
    await repo.add_account("ann", Role.OPERATOR, "argon2-hash", NOW)
    await repo.add_token("ann", "a" * 64, "ci", NOW)
    await repo.record_audit(
        AuditEntry(NOW, "ann", "operator", "POST /api/v1/jobs", "/api/v1/jobs -> id 1", 201, "::1")
    )


async def _everything(repo: Repository) -> dict[str, object]:
    """What the repository reads back, through its own methods."""
    jobs = await repo.list_jobs()
    tasks = [t for job in jobs for t in await repo.tasks_of_job(job.id)]
    return {
        "devices": await repo.list_devices(limit=100),
        "logins": [await repo.device_login(d) for d in DEVICES],
        "firmware": await repo.list_firmware(),
        "jobs": jobs,
        "tasks": tasks,
        "history": [await repo.task_history(t.id) for t in tasks],
        "counts": await repo.task_state_counts(),
        "accounts": await repo.list_accounts(),
        "tokens": await repo.list_tokens("ann"),
        "token": await repo.principal_of_token("a" * 64),
        "audit": await repo.audit_page(10, 0),
    }


async def test_a_copy_reads_back_as_the_original_and_continues_its_ids(
    tmp_path: Path, postgres_server: Postgres
) -> None:
    lite = SqliteRepository(tmp_path / "ota.db")
    await lite.open()
    await _fill(lite)
    before = await _everything(lite)
    await lite.close()
    dsn = await postgres_server.new_database()
    try:
        copied = await copy_sqlite_to_postgres(tmp_path / "ota.db", dsn)
        assert copied["devices"] == len(DEVICES) and copied["tasks"] == 5 and copied["task_history"] >= 13
        pg = PostgresRepository(dsn, pool_size=2)
        await pg.open()
        try:
            assert await _everything(pg) == before
            # New rows take ids after the copied ones.
            firmware = await pg.add_firmware(
                product_key="pk", module="default", version="3.0.0", src_version=None, size=1, md5="e" * 32,
                sha256="e" * 64, sign_method=SignMethod.SHA256, description="", now=NOW + 30,
            )  # fmt: skip
            assert firmware.id > max(f.id for f in before["firmware"])  # type: ignore[attr-defined]
        finally:
            await pg.close()
        with pytest.raises(CopyError, match="not empty"):  # a second copy is refused, nothing written
            await copy_sqlite_to_postgres(tmp_path / "ota.db", dsn)
        db = await asyncpg.connect(dsn)
        try:
            assert await db.fetchval("SELECT COUNT(*) FROM devices") == len(DEVICES)
        finally:
            await db.close()
    finally:
        await postgres_server.drop_database(dsn)


async def test_the_command_copies_the_data_folder_s_database_and_refuses_a_missing_one(
    tmp_path: Path, postgres_server: Postgres
) -> None:
    data = tmp_path / "data"
    dsn = await postgres_server.new_database()
    env = {**os.environ, "OTA_DATA_DIR": str(data)}
    env.pop("OTA_DATABASE_URL", None)
    command = [sys.executable, "-m", "broker", "copy-database", "--to", dsn]

    async def run() -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            command,
            check=False,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        missing = await run()
        assert missing.returncode == 1 and "no such database" in missing.stderr
        lite = SqliteRepository(data / "ota.db")
        await lite.open()
        await _fill(lite)
        await lite.close()
        done = await run()
        assert done.returncode == 0, done.stderr
        assert "devices" in done.stdout and "6 rows" in done.stdout and "copied" in done.stdout
    finally:
        await postgres_server.drop_database(dsn)
