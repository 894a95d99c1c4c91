"""Moving an embedded service's state to PostgreSQL: every row of an SQLite database (devices and their
secrets, module versions, firmware, jobs, tasks and their history) copied into an empty PostgreSQL database,
with the same ids, in one transaction.

The SQLite file is read in one read transaction (a consistent snapshot even while a service writes it, WAL);
both databases are first brought to the newest schema this code knows, so their tables match column for
column. A destination that already holds any row is refused: nothing is merged or overwritten.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import asyncpg

from plugins.ota.store.postgres import PostgresRepository
from plugins.ota.store.sqlite import SqliteRepository

# In the order foreign keys allow.
TABLES = (
    "devices",
    "device_modules",
    "device_groups",
    "firmware",
    "jobs",
    "tasks",
    "task_history",
    "accounts",
    "api_tokens",
    "audit",
)
CHUNK_ROWS = 10_000


class CopyError(RuntimeError):
    """The copy cannot be made (nothing was written)."""


def _converter(pg_type: str) -> Callable[[Any], Any]:
    """A SQLite value as the PostgreSQL column's type wants it (SQLite keeps booleans as 0/1, times as REAL or
    INTEGER)."""
    if pg_type == "boolean":
        return bool
    if pg_type in ("double precision", "real"):
        return float
    if pg_type in ("bigint", "integer", "smallint"):
        return int
    return str


async def copy_sqlite_to_postgres(sqlite_path: Path, dsn: str) -> dict[str, int]:
    """Copy every row of the SQLite database at `sqlite_path` into the empty PostgreSQL database `dsn`; the
    rows copied, by table. Raises `CopyError` (having written nothing) when the source is missing or the
    destination is not empty."""
    if not sqlite_path.is_file():  # noqa: ASYNC240 - a one-off command, nothing else runs on its loop
        raise CopyError(f"{sqlite_path}: no such database")
    source = SqliteRepository(sqlite_path)
    await source.open()  # migrated forward to this code's schema
    await source.close()
    target = PostgresRepository(dsn, pool_size=1)
    await target.open()  # the schema made or migrated, under the migration lock
    await target.close()
    db = await asyncpg.connect(dsn)
    try:
        async with db.transaction():
            for table in TABLES:
                if await db.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):  # noqa: S608 - TABLES
                    raise CopyError(f"the destination database is not empty: table {table} has rows")
            copied: dict[str, int] = {}
            with closing(sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)) as lite:
                lite.execute("BEGIN")  # one snapshot of every table
                for table in TABLES:
                    copied[table] = await _copy_table(lite, db, table)
            for table in TABLES:
                if await db.fetchval(
                    "SELECT 1 FROM information_schema.columns"
                    " WHERE table_name=$1 AND column_name='id' AND is_identity='YES'",
                    table,
                ):
                    # New rows continue after the copied ones.
                    last = f"(SELECT MAX(id) FROM {table})"  # noqa: S608 - TABLES
                    await db.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST({last}, 1),"
                        f" {last} IS NOT NULL)"
                    )
    finally:
        await db.close()
    return copied


async def _copy_table(lite: sqlite3.Connection, db: asyncpg.Connection[asyncpg.Record], table: str) -> int:
    types = {
        row["column_name"]: row["data_type"]
        for row in await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name=$1", table
        )
    }
    cursor = lite.execute(f"SELECT * FROM {table}")  # noqa: S608 - TABLES
    columns = [d[0] for d in cursor.description]
    unknown = [c for c in columns if c not in types]
    if unknown:
        raise CopyError(f"table {table}: columns {unknown} have no place in PostgreSQL's schema")
    convert = [_converter(types[c]) for c in columns]
    copied = 0
    while rows := cursor.fetchmany(CHUNK_ROWS):  # a bounded part of the table in memory at a time
        records = [
            tuple(None if value is None else to(value) for to, value in zip(convert, row, strict=True))
            for row in rows
        ]
        await db.copy_records_to_table(table, records=records, columns=columns)
        copied += len(records)
    return copied
