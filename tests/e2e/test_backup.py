"""`ota-broker backup` and `restore`: a backup taken while a broker runs and writes (devices registering,
informs, a job's progress) is one consistent instant of its state; restored on another data folder, a new
broker serves it whole: the same devices, firmware, jobs and tasks, firmware files that download, links
signed with the same key. A damaged backup, or a destination that is not empty, is refused with nothing
written (a real broker on 127.0.0.1:0, real MQTT devices, real SQLite files)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

from broker import backup as backups
from broker.cli import cli
from plugins.ota.store.sqlite import MIGRATIONS
from tests.support import Env, Tls, broker_config, eventually, reporting, started

FIRMWARE = os.urandom(300_000)
PACKAGE = {"app.bin": os.urandom(50_000), "dsp.bin": os.urandom(20_000)}
KNOWN = len(MIGRATIONS)


async def _devices(env: Env) -> list[str]:
    listed = await env.api("GET", "/devices?limit=10000", expect=200)
    return sorted(f"{d['product_key']}/{d['device_name']}" for d in listed)


async def test_a_backup_under_load_restores_whole_on_another_data_folder(tmp_path: Path, tls: Tls) -> None:
    source = tmp_path / "data"
    async with started(broker_config(source, tls), tls) as env:
        devices = [await reporting(env, f"d{i}") for i in range(5)]
        for d in devices:
            await d.subscribe(d.upgrade_topic)
        fw = await env.upload(FIRMWARE, version="2.0.0")
        job = await env.job(fw["id"], [f"pk/d{i}" for i in range(5)])
        for d in devices:
            [notice] = await d.notices()
            status, _, body = await env.download(notice["data"]["url"])
            assert status == 200 and body == FIRMWARE
            await d.progress("40", "downloading")

        # Load while the backup runs: devices registering and reporting, one after the other.
        stop = asyncio.Event()

        async def load() -> int:
            n = 0
            while not stop.is_set() and n < 2000:
                await env.api(
                    "POST", "/devices", expect=201, json={"product_key": "pk", "device_name": f"load{n}"}
                )
                await devices[n % 5].progress(str(41 + n % 50), "downloading")
                n += 1
            return n

        writer = asyncio.create_task(load())
        await eventually(lambda: env.find("/devices/pk/load10"), what="the load to run")
        before = await _devices(env)
        made = await asyncio.to_thread(backups.backup, source, tmp_path / "backup", KNOWN)
        after = await _devices(env)
        stop.set()
        assert await writer > 0
        tasks_then = await env.api("GET", f"/jobs/{job['id']}/tasks", expect=200)

    # One instant: every device registered before the backup began is in it, and nothing that came after.
    copy = sqlite3.connect(tmp_path / "backup" / "ota.db")
    try:
        in_backup = sorted(
            f"{pk}/{dn}" for pk, dn in copy.execute("SELECT product_key, device_name FROM devices")
        )
    finally:
        copy.close()
    assert set(before) <= set(in_backup) <= set(after)
    assert made.rows["devices"] == len(in_backup) and made.rows["jobs"] == 1 and made.rows["tasks"] == 5
    assert made.blobs == 1 and made.blob_bytes == len(FIRMWARE)
    assert (tmp_path / "backup").stat().st_mode & 0o077 == 0, "a backup holds device secrets: private"

    restored = tmp_path / "elsewhere" / "data"
    summary = await asyncio.to_thread(backups.restore, tmp_path / "backup", restored, KNOWN)
    assert summary.rows == made.rows
    assert (restored / "link.key").read_bytes() == (source / "link.key").read_bytes()
    async with started(broker_config(restored, tls), tls) as env:
        assert await _devices(env) == in_backup
        [again] = await env.api("GET", "/firmware", expect=200)
        assert (again["id"], again["sha256"]) == (fw["id"], hashlib.sha256(FIRMWARE).hexdigest())
        tasks = await env.api("GET", f"/jobs/{job['id']}/tasks", expect=200)
        assert [t["device"] for t in tasks] == [t["device"] for t in tasks_then]
        assert all(t["state"] == "in_progress" for t in tasks)
        # the restored broker finishes the job: its devices report the new version
        d0 = await env.device("pk", "d0").connect()
        await d0.inform("2.0.0")
        await env.task_state(job["id"], "pk/d0", "succeeded")
        # and its links are signed with the restored key and serve the restored file
        await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
        d1 = await env.device("pk", "d1").connect()
        await d1.subscribe(d1.upgrade_topic)
        await env.job(fw["id"], ["pk/d1"])
        [notice] = await d1.notices()
        status, _, body = await env.download(notice["data"]["url"])
        assert status == 200 and body == FIRMWARE


async def test_a_package_backs_up_every_file_and_a_damaged_backup_is_refused(
    env: Env, tmp_path: Path
) -> None:
    form = aiohttp.FormData()
    for name, data in PACKAGE.items():
        form.add_field("file", data, filename=name, content_type="application/octet-stream")
    form.add_field("product_key", "pk")
    form.add_field("version", "3.0.0")
    await env.api("POST", "/firmware", expect=201, data=form)
    data_dir = tmp_path / "data"  # the `env` fixture's
    made = await asyncio.to_thread(backups.backup, data_dir, tmp_path / "b", KNOWN)
    assert made.blobs == 2 and made.blob_bytes == sum(len(b) for b in PACKAGE.values())

    # a backup inside the data folder is not backed up into the next one
    inner = await asyncio.to_thread(backups.backup, data_dir, data_dir / "backups" / "one", KNOWN)
    second = await asyncio.to_thread(backups.backup, data_dir, data_dir / "backups" / "two", KNOWN)
    assert inner.blobs == second.blobs == 2
    assert not (data_dir / "backups" / "two" / "backups").exists()
    # a backup into a folder that holds something is refused
    with pytest.raises(backups.BackupError, match="not an empty folder"):
        backups.backup(data_dir, tmp_path / "b", KNOWN)
    # restoring into a data folder that is not empty is refused, and it is left as it was
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep").write_text("mine")
    with pytest.raises(backups.BackupError, match="not empty"):
        backups.restore(tmp_path / "b", occupied, KNOWN)
    assert [p.name for p in occupied.iterdir()] == ["keep"]
    # a damaged firmware file: refused, nothing written
    sha = hashlib.sha256(PACKAGE["dsp.bin"]).hexdigest()
    damaged = tmp_path / "b" / "firmware" / sha[:2] / sha
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(backups.BackupError, match="does not match its sha256"):
        backups.restore(tmp_path / "b", tmp_path / "new", KNOWN)
    assert not (tmp_path / "new").exists()
    assert not await asyncio.to_thread(lambda: [p for p in tmp_path.iterdir() if "restoring" in p.name])
    # a database from a newer release: refused, naming both versions
    db = sqlite3.connect(tmp_path / "b" / "ota.db")
    try:
        db.execute(f"PRAGMA user_version = {KNOWN + 1}")
        db.commit()
    finally:
        db.close()
    with pytest.raises(
        backups.BackupError, match=f"schema version {KNOWN + 1}, newer than this release's {KNOWN}"
    ):
        backups.restore(tmp_path / "b", tmp_path / "new", KNOWN)
    # not a backup at all
    with pytest.raises(backups.BackupError, match="is not a backup"):
        backups.restore(tmp_path / "occupied", tmp_path / "new", KNOWN)


def test_the_cli_backs_up_and_restores_and_says_why_it_refuses(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    db = sqlite3.connect(data_dir / "ota.db")
    try:
        for script in MIGRATIONS:
            db.executescript(script)
        db.execute(f"PRAGMA user_version = {KNOWN}")
        db.execute(
            "INSERT INTO devices (product_key, device_name, device_secret, created_at) VALUES ('pk', 'a', 's', 0)"
        )
        db.commit()
    finally:
        db.close()
    (data_dir / "link.key").write_text("k" * 64)
    env: dict[str, Any] = {"OTA_DATA_DIR": str(data_dir), "OTA_DATABASE_URL": None}
    made = CliRunner().invoke(cli, ["backup", str(tmp_path / "b")], env=env)
    assert made.exit_code == 0, made.output
    assert re.search(r"devices +1 rows", made.output) and "ota-broker restore" in made.output, made.output
    back = CliRunner().invoke(
        cli, ["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r")], env=env
    )
    assert back.exit_code == 0, back.output
    assert (tmp_path / "r" / "link.key").read_text() == "k" * 64
    again = CliRunner().invoke(
        cli, ["restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r")], env=env
    )
    assert again.exit_code == 1 and "is not empty" in again.output
    attached = CliRunner().invoke(
        cli, ["backup", str(tmp_path / "b2")], env=env | {"OTA_DATABASE_URL": "postgresql://db/ota"}
    )
    assert attached.exit_code == 1 and "pg_dump" in attached.output
