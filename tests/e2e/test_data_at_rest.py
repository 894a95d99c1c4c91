"""Secrets at rest: whatever umask `ota-broker run` is started with, its data folder is 0700 and every file
in it (database and its -wal/-shm, tokens, keys, firmware blobs) is readable by its user only; files an
older version left group- or world-readable are tightened at start; a data folder that group or others
may write is refused.

Every process here is started by these tests and stopped by its own PID; everything is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.processes import Launched
from tests.e2e.test_start_failures import assert_one_line, run_failing

FIRMWARE = b"ota-broker firmware at rest " * 1000


@pytest.fixture
def started() -> Iterator[list[Launched]]:
    """Brokers the test starts; each is stopped (by its PID) at teardown."""
    brokers: list[Launched] = []
    yield brokers
    for broker in brokers:
        broker.close()


def launch(workdir: Path, umask: int, started: list[Launched]) -> Launched:
    """`python -m broker run` in `workdir` (data in ./data), started by a shell with `umask`."""
    command = f"umask {umask:03o} && exec {shlex.quote(sys.executable)} -m broker run"
    broker = Launched(["/bin/sh", "-c", command], workdir, None, {"OTA_AUTH_MODE": "open"})
    started.append(broker)
    return broker.start()


def loose(root: Path) -> list[str]:
    """Everything under `root` (itself included) that group or others may read, write or enter."""
    found = []
    for path in [root, *root.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue  # a temporary file (an upload's, a journal) gone meanwhile
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISLNK(info.st_mode) and mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return found


async def use(broker: Launched) -> None:
    """Write to everything the broker keeps: a device, a firmware blob, a job (database and its WAL)."""
    headers = {"Authorization": f"Bearer {broker.token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(
            f"{broker.admin_api}/devices", json={"product_key": "pk", "device_name": "d1"}
        ) as r:
            assert r.status == 201, await r.text()
        form = aiohttp.FormData()
        form.add_field("product_key", "pk")
        form.add_field("version", "2.0.0")
        form.add_field("file", FIRMWARE, filename="fw.bin", content_type="application/octet-stream")
        async with http.post(f"{broker.admin_api}/firmware", data=form) as r:
            assert r.status == 201, await r.text()
            firmware = await r.json()
        job = {"firmware_id": firmware["id"], "devices": ["pk/d1"]}
        async with http.post(f"{broker.admin_api}/jobs", json=job) as r:
            assert r.status == 201, await r.text()


@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_everything_in_the_data_folder_is_private_whatever_the_umask(
    tmp_path: Path, umask: int, started: list[Launched]
) -> None:
    """Started with a permissive umask: data folder 0700, every file in it (db, -wal, -shm, keys, blobs) 0600."""
    broker = await asyncio.to_thread(launch, tmp_path, umask, started)
    await use(broker)
    data = tmp_path / "data"
    names = {p.name for p in data.rglob("*")}
    assert {"ota.db", "ota.db-wal", "ota.db-shm", "admin.token", "link.key", "server.key"} <= names, names
    assert any(p.stat().st_size == len(FIRMWARE) for p in (data / "firmware").rglob("*") if p.is_file())
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert not loose(data), loose(data)
    assert await asyncio.to_thread(broker.stop) == 0, broker.log


async def test_files_left_readable_by_an_older_version_are_tightened_at_start(
    tmp_path: Path, started: list[Launched]
) -> None:
    """A 0755 data folder with a 0644 ota.db and a 0755 sub-folder from before: all private after start."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    sqlite3.connect(data / "ota.db").close()
    (data / "firmware" / "ab").mkdir(parents=True)
    (data / "firmware" / "ab" / "blob").write_bytes(b"old blob")
    for path in (data / "ota.db", data / "firmware" / "ab" / "blob"):
        os.chmod(path, 0o644)
    for path in (data / "firmware", data / "firmware" / "ab"):
        os.chmod(path, 0o755)
    broker = await asyncio.to_thread(launch, tmp_path, 0o022, started)
    assert not loose(data), loose(data)
    assert await asyncio.to_thread(broker.stop) == 0, broker.log


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757, 0o1777])
def test_a_data_folder_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """A data folder group or others may write: exit 1 with one line naming it and its mode; nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, mode)
    code, took, log = run_failing(tmp_path)
    assert_one_line(code, took, log, "data", "writable by group or others", f"{mode & 0o7777:04o}")
    assert list(data.iterdir()) == []
    assert stat.S_IMODE(data.stat().st_mode) == mode
