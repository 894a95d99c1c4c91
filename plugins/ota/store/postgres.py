"""The PostgreSQL `Repository` (asyncpg, a pool of connections); its schema is the numbered scripts in
`migrations_pg/` (the same numbers and meaning as SQLite's `migrations/`), run in order and counted in the
table `schema_version` (a database newer than them is refused: `schema.SchemaTooNew`).

Every method keeps the SQLite repository's rules; rows become domain values in `rows`, shared with it.
Where they differ, and why:

- Migrations run in one transaction under `pg_advisory_xact_lock`: replicas starting at once on an empty
  database migrate it once, the others wait and find it done.
- SQLite runs one write transaction at a time; PostgreSQL runs them side by side (READ COMMITTED). A
  transaction that checks before it writes therefore locks what it checked, so that the outcome is one
  the SQLite order could give: deleting a firmware locks it and its tasks (a job created for it meanwhile
  waits on the foreign key, a task moved back to queued meanwhile is counted); deleting a device locks its
  row, and new tasks take a key-share lock on their devices' rows.
- `save_task` is the same compare-and-set (`UPDATE ... WHERE id=$ AND rev=$`): a concurrent writer of
  the row waits, then finds `rev` changed and updates nothing. The history row is written by the trigger
  of migration 3, a plpgsql function, in the same statement.
- Statements that SQLite sends once per row (a job's tasks, an import's devices) go as one statement over
  arrays (`unnest`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import asyncpg

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

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("ota.store")

MIGRATIONS: Sequence[str] = schema.scripts("migrations_pg")

# The advisory lock the migrations run under ("ota_migr" as a 64-bit number): one per database.
MIGRATION_LOCK = int.from_bytes(b"ota_migr", "big")
# The advisory lock of the replica that runs the periodic work ("ota_lead"), held by its own connection.
LEAD_LOCK = int.from_bytes(b"ota_lead", "big")
# The advisory locks of the replicas' MQTT sessions: ("otar", the replica's id), each held by its replica's own
# connection while it lives, and by the replica adopting its session once it died.
REPLICA_LOCKS = int.from_bytes(b"otar", "big")
# The database's clock, in seconds: replicas on several machines compare their heartbeats on one clock.
DB_NOW = "extract(epoch FROM clock_timestamp())"
# Where `set_online` announces a change of a device's presence: payload "1<product_key>/<device_name>" or "0...".
PRESENCE_CHANNEL = "ota_presence"
OWN_TIMEOUT_S = 5.0  # the replica's own connection: connecting, and its check that it is still alive


def _numbered(sql: str) -> str:
    """`?` marks as PostgreSQL's `$1`, `$2`, ... (the statements shared with SQLite hold no other `?`)."""
    parts = sql.split("?")
    return "".join(part + (f"${i}" if i < len(parts) else "") for i, part in enumerate(parts, start=1))


def _mark(n: int) -> str:
    return f"${n}"


def _limit(limit: int) -> int | None:
    """A negative limit lists everything (SQLite's `LIMIT -1`), which PostgreSQL spells `LIMIT NULL`."""
    return None if limit < 0 else limit


def _changed(status: str) -> int:
    """The rows a command changed, from its status (`UPDATE 3`, `INSERT 0 1`, `DELETE 0`)."""
    return int(status.rsplit(" ", 1)[-1])


def _keys(refs: Iterable[DeviceRef]) -> tuple[list[str], list[str]]:
    """Devices as the two arrays (product keys, device names) a statement `unnest`s into rows."""
    listed = list(refs)
    return [r.product_key for r in listed], [r.device_name for r in listed]


class PostgresRepository(AccountStore, DeviceGroups, FleetReports, JobReports, Lookups):
    """The `Repository` on one PostgreSQL database; several replicas may share it."""

    def __init__(self, dsn: str, *, pool_size: int = 10) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        # Told how long each query ("read") and transaction ("write") took, waiting included (metrics).
        self.observe: Callable[[str, float], None] | None = None
        # This replica's own connection, apart from the pool: it holds the lead lock (a session lock, let go
        # by the server when the connection ends, a replica killed included) and listens for presence.
        self._own: asyncpg.Connection[asyncpg.Record] | None = None
        self._leading = False
        self._presence: Callable[[DeviceRef, bool], None] | None = None
        self._replica: int | None = None  # this replica's id in `replicas` (`register_replica`)
        self._replica_lost = False  # its lock or its row was gone when its own connection came back
        self._own_use = (
            asyncio.Lock()
        )  # one statement at a time on the own connection (the tick, the replicas)

    # ------------------------------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            server_settings={"application_name": "ota-broker"},
        )
        try:
            await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        await self._drop_own()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # ------------------------------------------------------------------------------------- replicas

    async def lead(self) -> bool:
        """Hold the lead lock, or try to take it; False (and the lock given up) when the database cannot be
        reached: another replica takes over once the server notices this connection is gone."""
        async with self._own_use:
            try:
                own = await self._own_connection()
                if self._leading:
                    await own.fetchval("SELECT 1", timeout=OWN_TIMEOUT_S)  # still connected, still holding it
                else:
                    self._leading = bool(
                        await own.fetchval(
                            "SELECT pg_try_advisory_lock($1)", LEAD_LOCK, timeout=OWN_TIMEOUT_S
                        )
                    )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("lost the database connection of this replica: %s: %s", type(e).__name__, e)
                await self._drop_own()
            return self._leading

    async def register_replica(self, client_id_prefix: str) -> tuple[int, str]:
        """Register this replica: a row in `replicas` and its lock, held by its own connection for as long as it
        lives. Returns its id and the client id of its MQTT session (`<prefix>-<id>`)."""
        async with self._own_use:
            own = await self._own_connection()
            replica = int(await own.fetchval("SELECT nextval(pg_get_serial_sequence('replicas', 'id'))"))
            client_id = f"{client_id_prefix}-{replica}"
            await own.execute(
                f"INSERT INTO replicas (id, client_id, started_at, seen_at) VALUES ($1, $2, {DB_NOW}, {DB_NOW})",  # noqa: S608 - DB_NOW
                replica,
                client_id,
            )
            await own.fetchval("SELECT pg_advisory_lock($1, $2)", REPLICA_LOCKS, replica)
            self._replica, self._replica_lost = replica, False
            return replica, client_id

    async def replica_alive(self) -> bool:
        """This replica's heartbeat; False when it was taken for dead (its own connection was away long enough
        for another replica to adopt its session): it must register again."""
        async with self._own_use:
            own = await self._own_connection()
            if self._replica is None or self._replica_lost:
                return False
            status = await own.execute(
                f"UPDATE replicas SET seen_at = {DB_NOW} WHERE id = $1",  # noqa: S608 - DB_NOW
                self._replica,
                timeout=OWN_TIMEOUT_S,
            )
            return _changed(status) == 1

    async def orphaned_replicas(self, silent_s: float) -> list[tuple[int, str]]:
        """The other replicas that are gone: their lock free and no heartbeat for `silent_s`. Each one returned
        is locked by this replica's own connection until `forget_replica` or `release_replica`."""
        async with self._own_use:
            own = await self._own_connection()
            rows = await own.fetch(
                f"SELECT id, client_id FROM replicas WHERE id <> $1 AND seen_at < {DB_NOW} - $2 ORDER BY id",  # noqa: S608 - DB_NOW
                self._replica or 0,
                silent_s,
            )
            gone: list[tuple[int, str]] = []
            for row in rows:
                if await own.fetchval("SELECT pg_try_advisory_lock($1, $2)", REPLICA_LOCKS, row["id"]):
                    gone.append((int(row["id"]), str(row["client_id"])))
            return gone

    async def forget_replica(self, replica: int) -> None:
        """`replica`'s session is adopted and erased (or, this replica's own, retired): its row goes."""
        async with self._own_use:
            own = await self._own_connection()
            await own.execute("DELETE FROM replicas WHERE id = $1", replica)
            await own.fetchval("SELECT pg_advisory_unlock($1, $2)", REPLICA_LOCKS, replica)
            if replica == self._replica:
                self._replica = None

    async def release_replica(self, replica: int) -> None:
        """Give up adopting `replica` for now (its lock goes; it is found again next time)."""
        async with self._own_use:
            own = await self._own_connection()
            await own.fetchval("SELECT pg_advisory_unlock($1, $2)", REPLICA_LOCKS, replica)

    async def watch_presence(self, changed: Callable[[DeviceRef, bool], None]) -> None:
        async with self._own_use:
            self._presence = changed
            await self._drop_own()  # listen from a fresh connection: it tells every online device first
            await self._own_connection()

    async def _own_connection(self) -> asyncpg.Connection[asyncpg.Record]:
        own = self._own
        if own is not None and not own.is_closed():
            return own
        self._leading = False
        own = await asyncpg.connect(
            self.dsn, timeout=OWN_TIMEOUT_S, server_settings={"application_name": "ota-broker replica"}
        )
        try:
            if self._presence is not None:
                await own.add_listener(PRESENCE_CHANNEL, self._heard)
                for row in await own.fetch("SELECT product_key, device_name FROM devices WHERE online"):
                    self._presence(DeviceRef(row["product_key"], row["device_name"]), True)
            if self._replica is not None and not self._replica_lost:
                # back after losing its connection: this replica's lock again, unless another one took it
                # (and is adopting its session) or already deleted its row
                held = await own.fetchval("SELECT pg_try_advisory_lock($1, $2)", REPLICA_LOCKS, self._replica)
                listed = await own.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM replicas WHERE id = $1)", self._replica
                )
                if not (held and listed):
                    log.warning("this replica was taken for gone while away from the database")
                    self._replica_lost = True
        except BaseException:
            own.terminate()
            raise
        self._own = own
        return own

    async def _drop_own(self) -> None:
        own, self._own = self._own, None
        self._leading = False
        if own is not None and not own.is_closed():
            try:
                await asyncio.wait_for(own.close(), OWN_TIMEOUT_S)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                own.terminate()

    def _heard(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        product_key, _, device_name = text[1:].partition("/")
        if self._presence is not None and text[:1] in ("0", "1") and product_key and device_name:
            self._presence(DeviceRef(product_key, device_name), text[0] == "1")

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RuntimeError("repository is not open")
        return self._pool

    @staticmethod
    async def _migrate(pool: asyncpg.Pool[asyncpg.Record]) -> None:
        """Run the scripts the database has not run yet, all in one transaction, under a lock that makes
        replicas starting at once take turns (the first migrates, the others find it done)."""
        async with pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = int(await db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            name = await db.fetchval("SELECT current_database()")
            schema.check_version(f"PostgreSQL database {name!r}", current, len(MIGRATIONS))
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                await db.execute(script)  # no arguments: the simple protocol, several statements at once
                await db.execute("INSERT INTO schema_version (version) VALUES ($1)", number)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """One write transaction on a connection of its own (committed at the end, rolled back on error)."""
        started = time.perf_counter()
        async with self.pool.acquire() as db, db.transaction():
            yield db
        self._observe("write", started)

    def _observe(self, kind: str, started: float) -> None:
        if self.observe is not None:
            self.observe(kind, time.perf_counter() - started)

    async def _write1(self, sql: str, *args: Any) -> int:
        """One write statement, atomic on its own (triggers included). Returns the rows changed."""
        started = time.perf_counter()
        status = await self.pool.execute(sql, *args)
        self._observe("write", started)
        return _changed(status)

    async def _all(self, sql: str, *args: Any, write: bool = False) -> list[asyncpg.Record]:
        """One query (or, `write`, a statement that returns rows)."""
        started = time.perf_counter()
        rows = await self.pool.fetch(sql, *args)
        self._observe("write" if write else "read", started)
        return rows

    async def _one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        rows = await self._all(sql, *args)
        return rows[0] if rows else None

    async def _count(self, sql: str, *args: Any) -> int:
        row = await self._one(sql, *args)
        return int(row[0]) if row else 0

    async def _sql_rows(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        return [dict(r) for r in await self._all(_numbered(sql), *args)]

    async def _sql_change(self, sql: str, args: Sequence[Any] = (), conflict: str = "") -> int:
        try:
            return await self._write1(_numbered(sql), *args)
        except asyncpg.UniqueViolationError as e:
            raise Conflict(conflict or str(e)) from e

    # --------------------------------------------------------------------------------------- devices

    async def add_device(self, ref: DeviceRef, secret: str, now: float) -> DeviceRecord:
        try:
            [row] = await self._all(
                "INSERT INTO devices (product_key, device_name, device_secret, created_at)"
                " VALUES ($1,$2,$3,$4) RETURNING *",
                ref.product_key,
                ref.device_name,
                secret,
                now,
                write=True,
            )
        except asyncpg.UniqueViolationError as e:
            raise Conflict(f"device {ref} already exists") from e
        return device_from(row, {})

    async def ensure_device(self, ref: DeviceRef, now: float) -> bool:
        """Register the device if it is unknown (open mode); True when it was created."""
        created = await self._write1(
            "INSERT INTO devices (product_key, device_name, device_secret, created_at, last_seen)"
            " VALUES ($1,$2,$3,$4,$4) ON CONFLICT DO NOTHING",
            ref.product_key,
            ref.device_name,
            new_device_secret(),
            now,
        )
        return created > 0

    async def find_device(self, ref: DeviceRef) -> DeviceRecord | None:
        row = await self._one(
            "SELECT * FROM devices WHERE product_key=$1 AND device_name=$2", ref.product_key, ref.device_name
        )
        if row is None:
            return None
        modules = await self._all(
            "SELECT module, version FROM device_modules WHERE product_key=$1 AND device_name=$2 ORDER BY module",
            ref.product_key,
            ref.device_name,
        )
        return device_from(row, {m["module"]: m["version"] for m in modules})

    async def existing_devices(self, refs: Sequence[DeviceRef]) -> set[DeviceRef]:
        if not refs:
            return set()
        rows = await self._all(
            "SELECT d.product_key, d.device_name FROM devices AS d JOIN unnest($1::text[], $2::text[]) AS k(pk, dn)"
            " ON d.product_key=k.pk AND d.device_name=k.dn",
            *_keys(dict.fromkeys(refs)),
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
        where, args = device_filter(product_key, module, version, online, name, _mark, group)
        n = len(args)
        rows = await self._all(
            f"SELECT d.* FROM devices d WHERE {where}"  # noqa: S608 - only fixed fragments
            f" ORDER BY d.product_key, d.device_name LIMIT ${n + 1} OFFSET ${n + 2}",
            *args,
            _limit(limit),
            offset,
        )
        modules = modules_by_device(
            await self._all(
                "SELECT product_key, device_name, module, version FROM device_modules"
                " WHERE (product_key, device_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                *_keys(DeviceRef(r["product_key"], r["device_name"]) for r in rows),
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
        where, args = device_filter(product_key, module, version, online, name, _mark, group)
        return await self._count(f"SELECT COUNT(*) FROM devices d WHERE {where}", *args)  # noqa: S608

    async def device_login(self, ref: DeviceRef) -> tuple[str, bool] | None:
        row = await self._one(
            "SELECT device_secret, enabled FROM devices WHERE product_key=$1 AND device_name=$2",
            ref.product_key,
            ref.device_name,
        )
        return None if row is None else (str(row["device_secret"]), bool(row["enabled"]))

    async def set_enabled(self, ref: DeviceRef, enabled: bool) -> None:
        await self._set_device(ref, "enabled", enabled)

    async def set_secret(self, ref: DeviceRef, secret: str) -> None:
        await self._set_device(ref, "device_secret", secret)

    async def _set_device(self, ref: DeviceRef, column: str, value: object) -> None:
        """One column of one device row (`column` is one of this class's literals); NotFound if there is none."""
        changed = await self._write1(
            f"UPDATE devices SET {column}=$1 WHERE product_key=$2 AND device_name=$3",  # noqa: S608
            value,
            ref.product_key,
            ref.device_name,
        )
        if changed != 1:
            raise NotFound(f"device {ref} does not exist")

    async def delete_device(self, ref: DeviceRef) -> None:
        """Delete the device and its module versions; Conflict while it has an unfinished task."""
        key = (ref.product_key, ref.device_name)
        async with self._tx() as db:
            # Locked first: a job inserting tasks for it (key-share lock) finishes before the count below.
            await db.execute("SELECT 1 FROM devices WHERE product_key=$1 AND device_name=$2 FOR UPDATE", *key)
            unfinished = await db.fetchval(
                f"SELECT COUNT(*) FROM tasks WHERE product_key=$1 AND device_name=$2 AND state IN {UNFINISHED_SQL}",  # noqa: S608
                *key,
            )
            if unfinished:
                raise Conflict(f"device {ref} has {unfinished} unfinished task(s); cancel them first")
            status = await db.execute("DELETE FROM devices WHERE product_key=$1 AND device_name=$2", *key)
            if _changed(status) != 1:
                raise NotFound(f"device {ref} does not exist")

    async def add_devices(self, rows: Sequence[tuple[DeviceRef, str]], now: float) -> list[DeviceRef]:
        """Insert the devices that do not exist yet, all in one transaction; returns those created."""
        wanted = dict(rows)  # a device listed twice: its last secret
        created = await self._all(
            "INSERT INTO devices (product_key, device_name, device_secret, created_at)"
            " SELECT pk, dn, secret, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS n(pk, dn, secret)"
            " ON CONFLICT DO NOTHING RETURNING product_key, device_name",
            *_keys(wanted),
            list(wanted.values()),
            now,
            write=True,
        )
        new = {DeviceRef(r["product_key"], r["device_name"]) for r in created}
        return [ref for ref in wanted if ref in new]

    async def set_presence(self, changes: Sequence[tuple[DeviceRef, bool]], now: float) -> None:
        """Record them in one transaction, and announce to the other replicas each device whose state changed
        (delivered at commit). Rows are locked in one order, so two replicas' batches cannot deadlock."""
        latest = dict(changes)  # a device's last change wins
        if not latest:
            return
        products, names = _keys(latest)
        async with self._tx() as db:
            before = await db.fetch(
                "SELECT product_key, device_name, online FROM devices"
                " WHERE (product_key, device_name) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
                " ORDER BY product_key, device_name FOR UPDATE",
                products,
                names,
            )
            await db.execute(
                "UPDATE devices AS d SET online=k.online, last_seen=$4"
                " FROM unnest($1::text[], $2::text[], $3::bool[]) AS k(pk, dn, online)"
                " WHERE d.product_key=k.pk AND d.device_name=k.dn",
                products,
                names,
                list(latest.values()),
                now,
            )
            changed = []
            for row in before:
                ref = DeviceRef(row["product_key"], row["device_name"])
                if row["online"] != latest[ref]:
                    changed.append(f"{int(latest[ref])}{ref}")
            if changed:
                await db.execute(
                    "SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n", PRESENCE_CHANNEL, changed
                )

    async def mark_all_offline(self) -> None:
        await self._write1("UPDATE devices SET online=FALSE WHERE online")

    async def record_version(self, ref: DeviceRef, module: str, version: str, now: float) -> None:
        await self._write1(
            "WITH m AS (INSERT INTO device_modules (product_key, device_name, module, version, updated_at)"
            " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (product_key, device_name, module)"
            " DO UPDATE SET version=excluded.version, updated_at=excluded.updated_at)"
            " UPDATE devices SET last_seen=$5 WHERE product_key=$1 AND device_name=$2",
            ref.product_key,
            ref.device_name,
            module,
            version,
            now,
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
            [row] = await self._all(
                "INSERT INTO firmware (product_key, module, version, src_version, size, md5, sha256,"
                " sign_method, description, status, created_at, files)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) RETURNING *",
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
                write=True,
            )
        except asyncpg.UniqueViolationError as e:
            raise Conflict(f"firmware {product_key}/{module} {version} already exists") from e
        return firmware_from(row)

    async def find_firmware(self, firmware_id: int) -> Firmware | None:
        row = await self._one("SELECT * FROM firmware WHERE id=$1", firmware_id)
        return None if row is None else firmware_from(row)

    async def list_firmware(
        self, product_key: str | None = None, *, limit: int = -1, offset: int = 0
    ) -> list[Firmware]:
        """Firmware oldest first (`limit` -1: all)."""
        rows = await self._all(
            "SELECT * FROM firmware WHERE $1::text IS NULL OR product_key=$1 ORDER BY id LIMIT $2 OFFSET $3",
            product_key,
            _limit(limit),
            offset,
        )
        return [firmware_from(r) for r in rows]

    async def count_firmware(self, product_key: str | None = None) -> int:
        return await self._count(
            "SELECT COUNT(*) FROM firmware WHERE $1::text IS NULL OR product_key=$1", product_key
        )

    async def delete_firmware(self, firmware_id: int) -> Firmware:
        """Delete the firmware's record (and its finished jobs); Conflict while an unfinished task uses it."""
        async with self._tx() as db:
            # The firmware's row locked: a job or task created for it meanwhile waits on its foreign key.
            row = await db.fetchrow("SELECT * FROM firmware WHERE id=$1 FOR UPDATE", firmware_id)
            if row is None:
                raise NotFound(f"firmware {firmware_id} does not exist")
            # Its tasks locked: one moved back to an unfinished state meanwhile is counted, not deleted.
            unfinished = await db.fetchval(
                f"SELECT COUNT(*) FROM (SELECT state FROM tasks WHERE firmware_id=$1 FOR UPDATE) t WHERE state IN {UNFINISHED_SQL}",  # noqa: S608, E501
                firmware_id,
            )
            if unfinished:
                raise Conflict(
                    f"firmware {firmware_id} is used by {unfinished} unfinished task(s); cancel the job first"
                )
            await db.execute(
                "DELETE FROM task_history WHERE task_id IN (SELECT id FROM tasks WHERE firmware_id=$1)",
                firmware_id,
            )
            await db.execute("DELETE FROM tasks WHERE firmware_id=$1", firmware_id)
            await db.execute("DELETE FROM jobs WHERE firmware_id=$1", firmware_id)
            await db.execute("DELETE FROM firmware WHERE id=$1", firmware_id)
        return firmware_from(row)

    async def blob_in_use(self, sha256: str) -> bool:
        """Whether any firmware's file is this blob."""
        found = await self._one(
            "SELECT 1 FROM firmware WHERE sha256=$1 UNION ALL SELECT 1 FROM firmware,"
            " json_array_elements(firmware.files) f WHERE f->>'sha256'=$1 LIMIT 1",
            sha256,
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
            job_id = int(
                await db.fetchval(
                    "INSERT INTO jobs (firmware_id, type, state, options, created_at, updated_at,"
                    " schedule_at, end_at) VALUES ($1,$2,$3,$4,$5,$5,$6,$7) RETURNING id",
                    firmware.id,
                    job_type.value,
                    JobState.RUNNING.value,
                    options_json(options),
                    now,
                    schedule_at,
                    end_at,
                )
            )
            await self._insert_tasks(db, job_id, firmware, planned, policy, now)
        return job_id

    async def add_tasks(
        self, job_id: int, firmware: Firmware, planned: Sequence[PlannedTask], policy: TaskPolicy, now: float
    ) -> None:
        async with self._tx() as db:
            await self._insert_tasks(db, job_id, firmware, planned, policy, now)

    @staticmethod
    async def _insert_tasks(
        db: PoolConnectionProxy[asyncpg.Record],
        job_id: int,
        firmware: Firmware,
        planned: Sequence[PlannedTask],
        policy: TaskPolicy,
        now: float,
    ) -> None:
        """The tasks in plan order (their ids ascending), each with its first history row: one statement."""
        if not planned:
            return
        product_keys, device_names = _keys(p.device for p in planned)
        # A device being deleted meanwhile is deleted first or after, not between its check and its delete.
        await db.execute(
            "SELECT 1 FROM devices WHERE (product_key, device_name) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[])) FOR KEY SHARE",
            product_keys,
            device_names,
        )
        await db.execute(
            "WITH planned AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])"
            " WITH ORDINALITY AS p(product_key, device_name, state, note, group_no, n)),"
            " created AS (INSERT INTO tasks (job_id, firmware_id, product_key, device_name, module,"
            ' target_version, state, "desc", timeout_s, retry_count, retry_interval_s, group_no, created_at,'
            " updated_at, notify_timeout_s) SELECT $6::bigint, $7::bigint, product_key, device_name, $8::text,"
            " $9::text, state, note, $10::float8, $11::int, $12::float8, group_no, $13::float8, $13::float8,"
            ' $14::float8 FROM planned ORDER BY n RETURNING id, state, "desc")'
            ' INSERT INTO task_history (task_id, at, state, progress, "desc")'
            " SELECT id, $13::float8, state, 0, CASE \"desc\" WHEN '' THEN 'created' ELSE \"desc\" END"
            " FROM created ORDER BY id",
            product_keys,
            device_names,
            [p.state.value for p in planned],
            [p.desc for p in planned],
            [p.group_no for p in planned],
            job_id,
            firmware.id,
            firmware.module,
            firmware.version,
            policy.timeout_s,
            policy.retry_count,
            policy.retry_interval_s,
            now,
            policy.notify_timeout_s,
        )

    async def jobs_in_states(self, *states: JobState) -> list[JobRecord]:
        rows = await self._all(
            "SELECT * FROM jobs WHERE state = ANY($1::text[]) ORDER BY id", [s.value for s in states]
        )
        return await self._with_counts(rows)

    async def _with_counts(self, rows: Sequence[asyncpg.Record]) -> list[JobRecord]:
        """The jobs of `rows`, each with how many of its tasks are in each state."""
        if not rows:
            return []
        counts = counts_by_job(
            await self._all(
                "SELECT job_id, state, COUNT(*) AS n FROM tasks WHERE job_id = ANY($1::bigint[])"
                " GROUP BY job_id, state",
                [r["id"] for r in rows],
            )
        )
        return [job_from(r, counts.get(int(r["id"]), {})) for r in rows]

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
        args: list[Any] = [job_id, now]
        sets: list[str] = ["updated_at=$2"]
        for column, value in (
            ("options", None if options is None else options_json(options)),
            ("state", None if state is None else state.value),
            ("current_group", current_group),
            ("pause_reason", pause_reason),
        ):
            if value is not None:
                args.append(value)
                sets.append(f"{column}=${len(args)}")
        where = "id=$1"
        if only_from:
            args.append([s.value for s in only_from])
            where += f" AND state = ANY(${len(args)}::text[])"
        return await self._write1(f"UPDATE jobs SET {', '.join(sets)} WHERE {where}", *args) == 1  # noqa: S608

    async def group_counts(self, job_id: int) -> list[dict[TaskState, int]]:
        rows = await self._all(
            "SELECT group_no, state, COUNT(*) AS n FROM tasks WHERE job_id=$1 GROUP BY group_no, state",
            job_id,
        )
        return groups_of(rows)

    async def dispatchable_tasks(self, job_id: int, max_group: int, now: float, limit: int) -> list[Task]:
        rows = await self._all(
            "SELECT * FROM tasks WHERE job_id=$1 AND state='queued' AND group_no<=$2"
            " AND (not_before IS NULL OR not_before<=$3) ORDER BY group_no, id LIMIT $4",
            job_id,
            max_group,
            now,
            _limit(limit),
        )
        return [task_from(r) for r in rows]

    async def job_task_of_device(self, job_id: int, ref: DeviceRef) -> Task | None:
        row = await self._one(
            "SELECT * FROM tasks WHERE job_id=$1 AND product_key=$2 AND device_name=$3 ORDER BY id DESC LIMIT 1",
            job_id,
            ref.product_key,
            ref.device_name,
        )
        return None if row is None else task_from(row)

    async def set_firmware_status(self, firmware_id: int, status: FirmwareStatus) -> None:
        await self._write1("UPDATE firmware SET status=$1 WHERE id=$2", status.value, firmware_id)

    async def find_job(self, job_id: int) -> JobRecord | None:
        row = await self._one("SELECT * FROM jobs WHERE id=$1", job_id)
        return None if row is None else (await self._with_counts([row]))[0]

    async def list_jobs(self, limit: int = 200, offset: int = 0) -> list[JobRecord]:
        """Jobs newest first."""
        rows = await self._all(
            "SELECT * FROM jobs ORDER BY id DESC LIMIT $1 OFFSET $2", _limit(limit), offset
        )
        return await self._with_counts(rows)

    async def count_jobs(self) -> int:
        return await self._count("SELECT COUNT(*) FROM jobs")

    # ----------------------------------------------------------------------------------------- tasks

    async def get_task(self, task_id: int) -> Task:
        row = await self._one("SELECT * FROM tasks WHERE id=$1", task_id)
        if row is None:
            raise NotFound(f"task {task_id} does not exist")
        return task_from(row)

    async def unfinished_task(self, ref: DeviceRef, module: str) -> Task | None:
        row = await self._one(
            f"SELECT * FROM tasks WHERE product_key=$1 AND device_name=$2 AND module=$3 AND state IN {UNFINISHED_SQL}"  # noqa: S608
            " ORDER BY id DESC LIMIT 1",
            ref.product_key,
            ref.device_name,
            module,
        )
        return None if row is None else task_from(row)

    async def unfinished_tasks_of_devices(self, refs: Sequence[DeviceRef]) -> dict[DeviceRef, list[Task]]:
        found: dict[DeviceRef, list[Task]] = {ref: [] for ref in refs}
        if not found:
            return found
        rows = await self._all(
            "SELECT t.* FROM tasks AS t JOIN unnest($1::text[], $2::text[]) AS k(pk, dn)"  # noqa: S608
            f" ON t.product_key=k.pk AND t.device_name=k.dn WHERE t.state IN {UNFINISHED_SQL} ORDER BY t.id",
            *_keys(found),
        )
        for row in rows:
            task = task_from(row)
            found[task.device].append(task)
        return found

    async def busy_devices(self, refs: Sequence[DeviceRef], module: str) -> set[DeviceRef]:
        rows = await self._all(
            f"SELECT DISTINCT product_key, device_name FROM tasks WHERE module=$1 AND state IN {UNFINISHED_SQL}"  # noqa: S608
            " AND (product_key, device_name) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            module,
            *_keys(refs),
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
        rows = await self._all(
            "SELECT * FROM tasks WHERE job_id=$1 AND ($2::text[] IS NULL OR state = ANY($2::text[]))"
            " ORDER BY id LIMIT $3 OFFSET $4",
            job_id,
            None if states is None else [s.value for s in states],
            _limit(limit),
            offset,
        )
        return [task_from(r) for r in rows]

    async def count_tasks_of_job(self, job_id: int) -> int:
        return await self._count("SELECT COUNT(*) FROM tasks WHERE job_id=$1", job_id)

    async def tasks_of_device(self, ref: DeviceRef, limit: int = 100) -> list[Task]:
        rows = await self._all(
            "SELECT * FROM tasks WHERE product_key=$1 AND device_name=$2 ORDER BY id DESC LIMIT $3",
            ref.product_key,
            ref.device_name,
            _limit(limit),
        )
        return [task_from(r) for r in rows]

    async def overdue_tasks(self, now: float) -> list[Task]:
        """Tasks in progress whose timeout, counted from the first progress report, has passed, and notified
        tasks whose notify timeout, counted from the latest notice, has."""
        rows = await self._all(
            "SELECT * FROM tasks WHERE state='in_progress' AND timeout_s IS NOT NULL"
            " AND started_at IS NOT NULL AND started_at + timeout_s <= $1"
            " UNION ALL SELECT * FROM tasks WHERE state='notified' AND notify_timeout_s IS NOT NULL"
            " AND noticed_at IS NOT NULL AND noticed_at + notify_timeout_s <= $1 ORDER BY id",
            now,
        )
        return [task_from(r) for r in rows]

    async def devices_in_transfer(self, noticed_since: float) -> list[DeviceRef]:
        """The devices of the tasks holding a transfer: notified at or after `noticed_since`, or in progress
        below 100 %."""
        rows = await self._all(
            "SELECT product_key, device_name FROM tasks WHERE state='notified' AND noticed_at>=$1"
            " UNION ALL SELECT product_key, device_name FROM tasks WHERE state='in_progress' AND progress<100",
            noticed_since,
        )
        return [DeviceRef(r[0], r[1]) for r in rows]

    async def save_task(self, task: Task, note: str) -> Task | None:
        """Compare-and-set: write `task` if the stored row still has `task.rev`; the saved task, or None
        when someone else changed the row first. The history row is written by a trigger in the same
        statement."""
        changed = await self._write1(
            'UPDATE tasks SET state=$1, progress=$2, "desc"=$3, attempts=$4, notified_at=$5, noticed_at=$6,'
            " started_at=$7, not_before=$8, updated_at=$9, note=$10, rev=rev+1 WHERE id=$11 AND rev=$12",
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
        )
        if changed != 1:
            return None
        return replace(task, rev=task.rev + 1)

    async def task_history(self, task_id: int) -> list[dict[str, Any]]:
        rows = await self._all(
            'SELECT at, state, progress, "desc" FROM task_history WHERE task_id=$1 ORDER BY id', task_id
        )
        return [dict(r) for r in rows]

    async def task_state_counts(self) -> dict[TaskState, int]:
        """How many tasks are in each state, over all jobs (for metrics; one scan of an index)."""
        rows = await self._all("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
        return {TaskState(r["state"]): int(r["n"]) for r in rows}

    async def may_download(self, firmware_id: int, ref: DeviceRef) -> bool:
        row = await self._one(
            f"SELECT 1 FROM tasks WHERE firmware_id=$1 AND product_key=$2 AND device_name=$3 AND state IN {DOWNLOADABLE_SQL} LIMIT 1",  # noqa: S608, E501
            firmware_id,
            ref.product_key,
            ref.device_name,
        )
        return row is not None
