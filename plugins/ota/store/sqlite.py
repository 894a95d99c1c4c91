"""The SQLite `Repository` (aiosqlite, WAL); its schema is the numbered scripts in `migrations/`, run in
order and counted in `PRAGMA user_version` (a database newer than them is refused: `schema.SchemaTooNew`).

Rows become domain values in `rows`, shared with the PostgreSQL repository. Task writes are compare-and-set
on `rev`, and every task change appends a history row in the same transaction.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite

from plugins.ota.core.credentials import new_device_secret
from plugins.ota.core.errors import Conflict, NotFound
from plugins.ota.core.machine import PlannedTask
from plugins.ota.core.model import (
    DeviceRecord,
    Firmware,
    FirmwareFile,
    FirmwareStatus,
    JobOptions,
    JobRecord,
    JobState,
    JobType,
    SignMethod,
    Task,
    TaskPolicy,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store import schema
from plugins.ota.store.accounts import AccountStore, DeviceGroups, FleetReports, JobReports
from plugins.ota.store.gate import Gate
from plugins.ota.store.lookups import Lookups
from plugins.ota.store.rows import (
    DOWNLOADABLE_SQL,
    UNFINISHED_SQL,
    counts_by_job,
    device_filter,
    device_from,
    files_json,
    firmware_from,
    groups_of,
    job_from,
    modules_by_device,
    options_json,
    task_from,
)

MIGRATIONS: Sequence[str] = schema.scripts("migrations")


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a migration script (a trigger's body holds semicolons of its own)."""
    script = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \n;"):
        yield pending.strip()


def _pairs(refs: Iterable[DeviceRef]) -> str:
    """Devices as a JSON list of [product key, device name] that a statement joins through `json_each`."""
    return json.dumps([[r.product_key, r.device_name] for r in refs])


WAL_TRIES = 100  # every 50 ms: 5 s, as the busy timeout


async def _wal(db: aiosqlite.Connection) -> None:
    """Switch the file to WAL. Two processes opening a new file at once (replicas, the CLI beside the broker)
    can have SQLite answer "locked" at once, without waiting the busy timeout (it would deadlock): try again."""
    for attempt in range(WAL_TRIES):
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == WAL_TRIES - 1:
                raise
            await asyncio.sleep(0.05)


class SqliteRepository(AccountStore, DeviceGroups, FleetReports, JobReports, Lookups):
    """The `Repository` on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._gate = Gate()  # single statements share the connection; a transaction has it alone
        # Told how long each query ("read") and transaction ("write") took, waiting included (metrics).
        self.observe: Callable[[str, float], None] | None = None

    # ------------------------------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            await db.execute("PRAGMA busy_timeout=5000")
            await _wal(db)
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            self._db = db
            await self._migrate()
        except BaseException:
            self._db = None  # a refused database (newer schema, failed migration) leaves nothing open
            await db.close()
            raise

    async def close(self) -> None:
        if self._db is not None:
            async with self._gate.exclusive():
                await self._db.close()
                self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("repository is not open")
        return self._db

    async def _migrate(self) -> None:
        """Run the next script the database has not run, one transaction each, until none is left. The
        version is read inside the write transaction: two connections opening the file at once take turns,
        and the second finds the first's work done."""
        while True:
            async with self._tx() as db:
                async with db.execute("PRAGMA user_version") as cur:
                    row = await cur.fetchone()
                current = int(row[0]) if row else 0
                schema.check_version(str(self.path), current, len(MIGRATIONS))
                if current == len(MIGRATIONS):
                    return
                for statement in _statements(MIGRATIONS[current]):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {current + 1}")

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, with the connection alone (no other statement lands inside it)."""
        started = time.perf_counter()
        async with self._gate.exclusive():
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")
        if self.observe is not None:
            self.observe("write", time.perf_counter() - started)

    async def _write1(self, sql: str, args: Iterable[Any] = ()) -> int:
        """One write statement, atomic on its own (autocommit, triggers included): one round trip to the
        database thread instead of four for BEGIN, statement, COMMIT. Returns the rows changed."""
        started = time.perf_counter()
        async with self._gate.shared():
            cur = await self.db.execute(sql, tuple(args))
            changed = cur.rowcount
            await cur.close()
        if self.observe is not None:
            self.observe("write", time.perf_counter() - started)
        return int(changed)

    async def _one(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._all(sql, args)
        return rows[0] if rows else None

    async def _all(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """One query, run and fetched as a whole: a read never interleaves with a write transaction on
        the shared connection (a cursor fetched across awaits can see its statement reset under it)."""
        started = time.perf_counter()
        async with self._gate.shared():
            rows = await self.db.execute_fetchall(sql, tuple(args))
        if self.observe is not None:
            self.observe("read", time.perf_counter() - started)
        return list(rows)

    async def _sql_rows(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return [{k: r[k] for k in r.keys()} for r in await self._all(sql, args)]  # noqa: SIM118 - a Row

    async def _sql_change(self, sql: str, args: Sequence[Any] = (), conflict: str = "") -> int:
        try:
            return await self._write1(sql, args)
        except sqlite3.IntegrityError as e:
            raise Conflict(conflict or str(e)) from e

    # --------------------------------------------------------------------------------------- devices

    async def add_device(self, ref: DeviceRef, secret: str, now: float) -> DeviceRecord:
        try:
            async with self._tx() as db:
                await db.execute(
                    "INSERT INTO devices (product_key, device_name, device_secret, created_at) VALUES (?,?,?,?)",
                    (ref.product_key, ref.device_name, secret, now),
                )
        except sqlite3.IntegrityError as e:
            raise Conflict(f"device {ref} already exists") from e
        return await self.get_device(ref)

    async def ensure_device(self, ref: DeviceRef, now: float) -> bool:
        """Register the device if it is unknown (open mode); True when it was created."""
        return (
            await self._write1(
                "INSERT OR IGNORE INTO devices (product_key, device_name, device_secret, created_at, last_seen)"
                " VALUES (?,?,?,?,?)",
                (ref.product_key, ref.device_name, new_device_secret(), now, now),
            )
            > 0
        )

    async def find_device(self, ref: DeviceRef) -> DeviceRecord | None:
        row = await self._one(
            "SELECT * FROM devices WHERE product_key=? AND device_name=?", (ref.product_key, ref.device_name)
        )
        if row is None:
            return None
        modules = await self._all(
            "SELECT module, version FROM device_modules WHERE product_key=? AND device_name=? ORDER BY module",
            (ref.product_key, ref.device_name),
        )
        return device_from(row, {m["module"]: m["version"] for m in modules})

    async def existing_devices(self, refs: Sequence[DeviceRef]) -> set[DeviceRef]:
        if not refs:
            return set()
        rows = await self._all(
            "SELECT d.product_key, d.device_name FROM json_each(?) AS j JOIN devices AS d"
            " ON d.product_key = json_extract(j.value, '$[0]') AND d.device_name = json_extract(j.value, '$[1]')",
            (_pairs(dict.fromkeys(refs)),),
        )
        return {DeviceRef(r["product_key"], r["device_name"]) for r in rows}

    async def list_devices(
        self,
        *,
        product_key: str | None = None,
        module: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        name: str | None = None,
        group: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        where, args = device_filter(product_key, module, version, online, name, lambda _: "?", group)
        rows = await self._all(
            f"SELECT d.* FROM devices d WHERE {where}"  # noqa: S608 - only fixed fragments
            " ORDER BY d.product_key, d.device_name LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        modules = modules_by_device(
            await self._all(
                "SELECT product_key, device_name, module, version FROM device_modules"
                " WHERE product_key || '/' || device_name IN (SELECT value FROM json_each(?))",
                (json.dumps([f"{r['product_key']}/{r['device_name']}" for r in rows]),),
            )
            if rows
            else ()
        )
        return [device_from(r, modules.get(DeviceRef(r["product_key"], r["device_name"]), {})) for r in rows]

    async def count_devices(
        self,
        *,
        product_key: str | None = None,
        module: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        name: str | None = None,
        group: str | None = None,
    ) -> int:
        """How many devices `list_devices` with the same filters would list in all."""
        where, args = device_filter(product_key, module, version, online, name, lambda _: "?", group)
        row = await self._one(f"SELECT COUNT(*) FROM devices d WHERE {where}", args)  # noqa: S608
        return int(row[0]) if row else 0

    async def device_login(self, ref: DeviceRef) -> tuple[str, bool] | None:
        row = await self._one(
            "SELECT device_secret, enabled FROM devices WHERE product_key=? AND device_name=?",
            (ref.product_key, ref.device_name),
        )
        return None if row is None else (str(row["device_secret"]), bool(row["enabled"]))

    async def set_enabled(self, ref: DeviceRef, enabled: bool) -> None:
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE devices SET enabled=? WHERE product_key=? AND device_name=?",
                (int(enabled), ref.product_key, ref.device_name),
            )
            if cur.rowcount != 1:
                raise NotFound(f"device {ref} does not exist")

    async def set_secret(self, ref: DeviceRef, secret: str) -> None:
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE devices SET device_secret=? WHERE product_key=? AND device_name=?",
                (secret, ref.product_key, ref.device_name),
            )
            if cur.rowcount != 1:
                raise NotFound(f"device {ref} does not exist")

    async def delete_device(self, ref: DeviceRef) -> None:
        """Delete the device and its module versions; Conflict while it has an unfinished task."""
        async with self._tx() as db:
            cur = await db.execute(
                f"SELECT COUNT(*) FROM tasks WHERE product_key=? AND device_name=? AND state IN {UNFINISHED_SQL}",  # noqa: S608
                (ref.product_key, ref.device_name),
            )
            row = await cur.fetchone()
            if row and row[0]:
                raise Conflict(f"device {ref} has {row[0]} unfinished task(s); cancel them first")
            cur = await db.execute(
                "DELETE FROM devices WHERE product_key=? AND device_name=?",
                (ref.product_key, ref.device_name),
            )
            if cur.rowcount != 1:
                raise NotFound(f"device {ref} does not exist")

    async def add_devices(self, rows: Sequence[tuple[DeviceRef, str]], now: float) -> list[DeviceRef]:
        """Insert the devices that do not exist yet, all in one transaction; returns those created."""
        wanted = {f"{ref.product_key}/{ref.device_name}": (ref, secret) for ref, secret in rows}
        async with self._tx() as db:
            existing = {
                f"{r[0]}/{r[1]}"
                for r in await db.execute_fetchall(
                    "SELECT product_key, device_name FROM devices"
                    " WHERE product_key || '/' || device_name IN (SELECT value FROM json_each(?))",
                    (json.dumps(list(wanted)),),
                )
            }
            new = [pair for key, pair in wanted.items() if key not in existing]
            await db.executemany(
                "INSERT INTO devices (product_key, device_name, device_secret, created_at) VALUES (?,?,?,?)",
                [(ref.product_key, ref.device_name, secret, now) for ref, secret in new],
            )
        return [ref for ref, _ in new]

    async def set_presence(self, changes: Sequence[tuple[DeviceRef, bool]], now: float) -> None:
        latest = dict(changes)  # a device's last change wins
        if not latest:
            return
        async with self._tx() as db:
            await db.executemany(
                "UPDATE devices SET online=?, last_seen=? WHERE product_key=? AND device_name=?",
                [(int(online), now, ref.product_key, ref.device_name) for ref, online in latest.items()],
            )

    async def mark_all_offline(self) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE devices SET online=0 WHERE online=1")

    async def lead(self) -> bool:
        return True  # one process owns the file

    async def watch_presence(self, changed: Callable[[DeviceRef, bool], None]) -> None:
        for row in await self._all("SELECT product_key, device_name FROM devices WHERE online=1"):
            changed(DeviceRef(row["product_key"], row["device_name"]), True)

    async def record_version(self, ref: DeviceRef, module: str, version: str, now: float) -> None:
        await self._write1(
            "INSERT INTO device_modules (product_key, device_name, module, version, updated_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (product_key, device_name, module)"
            " DO UPDATE SET version=excluded.version, updated_at=excluded.updated_at",
            (ref.product_key, ref.device_name, module, version, now),
        )
        await self._write1(
            "UPDATE devices SET last_seen=? WHERE product_key=? AND device_name=?",
            (now, ref.product_key, ref.device_name),
        )

    # -------------------------------------------------------------------------------------- firmware

    async def add_firmware(
        self,
        *,
        status: FirmwareStatus = FirmwareStatus.NO_VERIFY_NEEDED,
        product_key: str,
        module: str,
        version: str,
        src_version: str | None,
        size: int,
        md5: str,
        sha256: str,
        sign_method: SignMethod,
        description: str,
        now: float,
        files: Sequence[FirmwareFile] = (),
    ) -> Firmware:
        """A new firmware; `files` lists every file of a multi-file package (the first one is the file
        `size`, `md5` and `sha256` describe), and is empty for a single-file one."""
        try:
            async with self._tx() as db:
                cur = await db.execute(
                    "INSERT INTO firmware (product_key, module, version, src_version, size, md5, sha256,"
                    " sign_method, description, status, created_at, files) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        product_key,
                        module,
                        version,
                        src_version,
                        size,
                        md5,
                        sha256,
                        sign_method.value,
                        description,
                        status.value,
                        now,
                        files_json(files),
                    ),
                )
                fw_id = cur.lastrowid
        except sqlite3.IntegrityError as e:
            raise Conflict(f"firmware {product_key}/{module} {version} already exists") from e
        assert fw_id is not None
        return await self.get_firmware(fw_id)

    async def find_firmware(self, firmware_id: int) -> Firmware | None:
        row = await self._one("SELECT * FROM firmware WHERE id=?", (firmware_id,))
        return None if row is None else firmware_from(row)

    async def list_firmware(
        self, product_key: str | None = None, *, limit: int = -1, offset: int = 0
    ) -> list[Firmware]:
        """Firmware oldest first (`limit` -1: all)."""
        rows = await self._all(
            "SELECT * FROM firmware WHERE ?1 IS NULL OR product_key=?1 ORDER BY id LIMIT ?2 OFFSET ?3",
            (product_key, limit, offset),
        )
        return [firmware_from(r) for r in rows]

    async def count_firmware(self, product_key: str | None = None) -> int:
        row = await self._one(
            "SELECT COUNT(*) FROM firmware WHERE ?1 IS NULL OR product_key=?1", (product_key,)
        )
        return int(row[0]) if row else 0

    async def delete_firmware(self, firmware_id: int) -> Firmware:
        """Delete the firmware's record (and its finished jobs); Conflict while an unfinished task uses it."""
        firmware = await self.get_firmware(firmware_id)
        async with self._tx() as db:
            cur = await db.execute(
                f"SELECT COUNT(*) FROM tasks WHERE firmware_id=? AND state IN {UNFINISHED_SQL}",  # noqa: S608
                (firmware_id,),
            )
            row = await cur.fetchone()
            if row and row[0]:
                raise Conflict(
                    f"firmware {firmware_id} is used by {row[0]} unfinished task(s); cancel the job first"
                )
            sub = "SELECT id FROM tasks WHERE firmware_id=?"
            await db.execute(f"DELETE FROM task_history WHERE task_id IN ({sub})", (firmware_id,))  # noqa: S608
            await db.execute("DELETE FROM tasks WHERE firmware_id=?", (firmware_id,))
            await db.execute("DELETE FROM jobs WHERE firmware_id=?", (firmware_id,))
            await db.execute("DELETE FROM firmware WHERE id=?", (firmware_id,))
        return firmware

    async def blob_in_use(self, sha256: str) -> bool:
        """Whether any firmware's file is this blob."""
        found = await self._one(
            "SELECT 1 FROM firmware WHERE sha256=?1 UNION ALL SELECT 1 FROM firmware, json_each(firmware.files)"
            " WHERE json_extract(json_each.value, '$.sha256')=?1 LIMIT 1",
            (sha256,),
        )
        return found is not None

    # ------------------------------------------------------------------------------------------ jobs

    async def create_job(
        self,
        firmware: Firmware,
        job_type: JobType,
        options: JobOptions,
        planned: Sequence[PlannedTask],
        policy: TaskPolicy,
        now: float,
        *,
        schedule_at: float | None = None,
        end_at: float | None = None,
    ) -> int:
        async with self._tx() as db:
            cur = await db.execute(
                "INSERT INTO jobs (firmware_id, type, state, options, created_at, updated_at, schedule_at, end_at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (
                    firmware.id,
                    job_type.value,
                    JobState.RUNNING.value,
                    options_json(options),
                    now,
                    now,
                    schedule_at,
                    end_at,
                ),
            )
            job_id = cur.lastrowid
            assert job_id is not None
            await self._insert_tasks(db, job_id, firmware, planned, policy, now)
        return job_id

    async def add_tasks(
        self, job_id: int, firmware: Firmware, planned: Sequence[PlannedTask], policy: TaskPolicy, now: float
    ) -> None:
        async with self._tx() as db:
            await self._insert_tasks(db, job_id, firmware, planned, policy, now)

    @staticmethod
    async def _insert_tasks(
        db: aiosqlite.Connection,
        job_id: int,
        firmware: Firmware,
        planned: Sequence[PlannedTask],
        policy: TaskPolicy,
        now: float,
    ) -> None:
        for p in planned:
            cur = await db.execute(
                "INSERT INTO tasks (job_id, firmware_id, product_key, device_name, module, target_version,"
                " state, desc, timeout_s, retry_count, retry_interval_s, group_no, created_at, updated_at,"
                " notify_timeout_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    firmware.id,
                    p.device.product_key,
                    p.device.device_name,
                    firmware.module,
                    firmware.version,
                    p.state.value,
                    p.desc,
                    policy.timeout_s,
                    policy.retry_count,
                    policy.retry_interval_s,
                    p.group_no,
                    now,
                    now,
                    policy.notify_timeout_s,
                ),
            )
            await db.execute(
                "INSERT INTO task_history (task_id, at, state, progress, desc) VALUES (?,?,?,?,?)",
                (cur.lastrowid, now, p.state.value, 0, p.desc or "created"),
            )

    async def jobs_in_states(self, *states: JobState) -> list[JobRecord]:
        rows = await self._all(
            "SELECT id FROM jobs WHERE state IN (SELECT value FROM json_each(?)) ORDER BY id",
            (json.dumps([s.value for s in states]),),
        )
        return [await self.get_job(int(r["id"])) for r in rows]

    async def update_job(
        self,
        job_id: int,
        now: float,
        *,
        state: JobState | None = None,
        current_group: int | None = None,
        pause_reason: str | None = None,
        options: JobOptions | None = None,
        only_from: Sequence[JobState] = (),
    ) -> bool:
        """Change the job; with `only_from`, only while it is in one of those states. Whether it changed."""
        sets: list[str] = ["updated_at=?"]
        args: list[float | int | str] = [now]
        if options is not None:
            sets.append("options=?")
            args.append(options_json(options))
        for column, value in (
            ("state", state),
            ("current_group", current_group),
            ("pause_reason", pause_reason),
        ):
            if value is not None:
                sets.append(f"{column}=?")
                args.append(value.value if isinstance(value, JobState) else value)
        where = "id=?"
        where_args: list[int | str] = [job_id]
        if only_from:
            where += f" AND state IN ({','.join('?' * len(only_from))})"
            where_args += [state.value for state in only_from]
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE {where}"  # noqa: S608
        return await self._write1(sql, (*args, *where_args)) == 1

    async def group_counts(self, job_id: int) -> list[dict[TaskState, int]]:
        rows = await self._all(
            "SELECT group_no, state, COUNT(*) AS n FROM tasks WHERE job_id=? GROUP BY group_no, state",
            (job_id,),
        )
        return groups_of(rows)

    async def dispatchable_tasks(self, job_id: int, max_group: int, now: float, limit: int) -> list[Task]:
        rows = await self._all(
            "SELECT * FROM tasks WHERE job_id=? AND state='queued' AND group_no<=?"
            " AND (not_before IS NULL OR not_before<=?) ORDER BY group_no, id LIMIT ?",
            (job_id, max_group, now, limit),
        )
        return [task_from(r) for r in rows]

    async def job_task_of_device(self, job_id: int, ref: DeviceRef) -> Task | None:
        row = await self._one(
            "SELECT * FROM tasks WHERE job_id=? AND product_key=? AND device_name=? ORDER BY id DESC LIMIT 1",
            (job_id, ref.product_key, ref.device_name),
        )
        return None if row is None else task_from(row)

    async def set_firmware_status(self, firmware_id: int, status: FirmwareStatus) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE firmware SET status=? WHERE id=?", (status.value, firmware_id))

    async def find_job(self, job_id: int) -> JobRecord | None:
        row = await self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        if row is None:
            return None
        counts = await self._all(
            "SELECT job_id, state, COUNT(*) AS n FROM tasks WHERE job_id=? GROUP BY job_id, state", (job_id,)
        )
        return job_from(row, counts_by_job(counts).get(job_id, {}))

    async def list_jobs(self, limit: int = 200, offset: int = 0) -> list[JobRecord]:
        """Jobs newest first."""
        rows = await self._all("SELECT * FROM jobs ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset))
        counts = counts_by_job(
            await self._all(
                "SELECT job_id, state, COUNT(*) AS n FROM tasks WHERE job_id IN (SELECT value FROM json_each(?))"
                " GROUP BY job_id, state",
                (json.dumps([r["id"] for r in rows]),),
            )
        )
        return [job_from(r, counts.get(int(r["id"]), {})) for r in rows]

    async def count_jobs(self) -> int:
        row = await self._one("SELECT COUNT(*) FROM jobs")
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------------------------------- tasks

    async def get_task(self, task_id: int) -> Task:
        row = await self._one("SELECT * FROM tasks WHERE id=?", (task_id,))
        if row is None:
            raise NotFound(f"task {task_id} does not exist")
        return task_from(row)

    async def unfinished_task(self, ref: DeviceRef, module: str) -> Task | None:
        row = await self._one(
            f"SELECT * FROM tasks WHERE product_key=? AND device_name=? AND module=? AND state IN {UNFINISHED_SQL}"  # noqa: S608
            " ORDER BY id DESC LIMIT 1",
            (ref.product_key, ref.device_name, module),
        )
        return None if row is None else task_from(row)

    async def unfinished_tasks_of_devices(self, refs: Sequence[DeviceRef]) -> dict[DeviceRef, list[Task]]:
        found: dict[DeviceRef, list[Task]] = {ref: [] for ref in refs}
        if not found:
            return found
        rows = await self._all(
            "SELECT t.* FROM json_each(?) AS j JOIN tasks AS t"  # noqa: S608
            " ON t.product_key = json_extract(j.value, '$[0]') AND t.device_name = json_extract(j.value, '$[1]')"
            f" WHERE t.state IN {UNFINISHED_SQL} ORDER BY t.id",
            (_pairs(found),),
        )
        for row in rows:
            task = task_from(row)
            found[task.device].append(task)
        return found

    async def busy_devices(self, refs: Sequence[DeviceRef], module: str) -> set[DeviceRef]:
        rows = await self._all(
            f"SELECT DISTINCT product_key, device_name FROM tasks WHERE module=? AND state IN {UNFINISHED_SQL}"  # noqa: S608
            " AND product_key || '/' || device_name IN (SELECT value FROM json_each(?))",
            (module, json.dumps([str(r) for r in refs])),
        )
        return {DeviceRef(r["product_key"], r["device_name"]) for r in rows}

    async def tasks_of_job(
        self,
        job_id: int,
        states: Iterable[TaskState] | None = None,
        *,
        limit: int = -1,
        offset: int = 0,
    ) -> list[Task]:
        """The job's tasks in the order they were planned (`limit` -1: all)."""
        if states is None:
            rows = await self._all(
                "SELECT * FROM tasks WHERE job_id=? ORDER BY id LIMIT ? OFFSET ?", (job_id, limit, offset)
            )
        else:
            rows = await self._all(
                "SELECT * FROM tasks WHERE job_id=? AND state IN (SELECT value FROM json_each(?))"
                " ORDER BY id LIMIT ? OFFSET ?",
                (job_id, json.dumps([s.value for s in states]), limit, offset),
            )
        return [task_from(r) for r in rows]

    async def count_tasks_of_job(self, job_id: int) -> int:
        row = await self._one("SELECT COUNT(*) FROM tasks WHERE job_id=?", (job_id,))
        return int(row[0]) if row else 0

    async def tasks_of_device(self, ref: DeviceRef, limit: int = 100) -> list[Task]:
        rows = await self._all(
            "SELECT * FROM tasks WHERE product_key=? AND device_name=? ORDER BY id DESC LIMIT ?",
            (ref.product_key, ref.device_name, limit),
        )
        return [task_from(r) for r in rows]

    async def overdue_tasks(self, now: float) -> list[Task]:
        """Tasks in progress whose timeout, counted from the first progress report, has passed, and notified
        tasks whose notify timeout, counted from the latest notice, has."""
        rows = await self._all(
            "SELECT * FROM tasks WHERE state='in_progress' AND timeout_s IS NOT NULL"
            " AND started_at IS NOT NULL AND started_at + timeout_s <= ?1"
            " UNION ALL SELECT * FROM tasks WHERE state='notified' AND notify_timeout_s IS NOT NULL"
            " AND noticed_at IS NOT NULL AND noticed_at + notify_timeout_s <= ?1 ORDER BY id",
            (now,),
        )
        return [task_from(r) for r in rows]

    async def devices_in_transfer(self, noticed_since: float) -> list[DeviceRef]:
        """The devices of the tasks holding a transfer: notified at or after `noticed_since`, or in progress
        below 100 %."""
        rows = await self._all(
            "SELECT product_key, device_name FROM tasks WHERE state='notified' AND noticed_at>=?"
            " UNION ALL SELECT product_key, device_name FROM tasks WHERE state='in_progress' AND progress<100",
            (noticed_since,),
        )
        return [DeviceRef(r[0], r[1]) for r in rows]

    async def save_task(self, task: Task, note: str) -> Task | None:
        """Compare-and-set: write `task` if the stored row still has `task.rev`; the saved task, or None
        when someone else changed the row first. The history row is written by a trigger in the same
        statement."""
        changed = await self._write1(
            "UPDATE tasks SET state=?, progress=?, desc=?, attempts=?, notified_at=?, noticed_at=?,"
            " started_at=?, not_before=?, updated_at=?, note=?, rev=rev+1 WHERE id=? AND rev=?",
            (
                task.state.value,
                task.progress,
                task.desc,
                task.attempts,
                task.notified_at,
                task.noticed_at,
                task.started_at,
                task.not_before,
                task.updated_at,
                note,
                task.id,
                task.rev,
            ),
        )
        if changed != 1:
            return None
        return replace(task, rev=task.rev + 1)

    async def task_history(self, task_id: int) -> list[dict[str, Any]]:
        rows = await self._all(
            "SELECT at, state, progress, desc FROM task_history WHERE task_id=? ORDER BY id", (task_id,)
        )
        return [dict(r) for r in rows]

    async def task_state_counts(self) -> dict[TaskState, int]:
        """How many tasks are in each state, over all jobs (for metrics; one scan of a covering index)."""
        rows = await self._all("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
        return {TaskState(r["state"]): int(r["n"]) for r in rows}

    async def may_download(self, firmware_id: int, ref: DeviceRef) -> bool:
        row = await self._one(
            f"SELECT 1 FROM tasks WHERE firmware_id=? AND product_key=? AND device_name=? AND state IN {DOWNLOADABLE_SQL} LIMIT 1",  # noqa: S608, E501
            (firmware_id, ref.product_key, ref.device_name),
        )
        return row is not None
