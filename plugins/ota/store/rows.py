"""What the SQLite and the PostgreSQL repositories share: rows into domain values (and the JSON columns
out of them), and the SQL fragments both dialects read alike.

A row is anything that gives a column's value by name: `sqlite3.Row` and `asyncpg.Record` both do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from plugins.ota.core.model import (
    DOWNLOADABLE,
    UNFINISHED,
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
    TaskState,
)
from plugins.ota.core.topics import DeviceRef


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


UNFINISHED_SQL = "(" + ",".join(f"'{s.value}'" for s in sorted(UNFINISHED)) + ")"
DOWNLOADABLE_SQL = "(" + ",".join(f"'{s.value}'" for s in sorted(DOWNLOADABLE)) + ")"


def device_filter(
    product_key: str | None,
    module: str | None,
    version: str | None,
    online: bool | None,
    name: str | None,
    mark: Callable[[int], str],
    group: str | None = None,
) -> tuple[str, list[str | bool]]:
    """The WHERE clause (over `devices d`) and its arguments for the device list's filters; `mark(n)` spells
    the placeholder of the n-th argument in the dialect at hand. `name`: the device name contains it, in any
    case (names are ASCII; `%`, `_` and `\\` in it are themselves)."""
    where: list[str] = ["1=1"]
    args: list[str | bool] = []

    def arg(value: str | bool) -> str:
        args.append(value)
        return mark(len(args))

    if product_key is not None:
        where.append(f"d.product_key={arg(product_key)}")
    if group is not None:
        member = (
            "SELECT 1 FROM device_groups g WHERE g.product_key=d.product_key AND g.device_name=d.device_name"
        )
        where.append(f"EXISTS ({member} AND g.grp={arg(group)})")
    if online is not None:
        where.append(f"d.online={arg(online)}")
    if name:
        needle = name.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(f"LOWER(d.device_name) LIKE {arg(f'%{needle}%')} ESCAPE '\\'")
    if module is not None or version is not None:
        sub = (
            "SELECT 1 FROM device_modules m WHERE m.product_key=d.product_key AND m.device_name=d.device_name"
        )
        if module is not None:
            sub += f" AND m.module={arg(module)}"
        if version is not None:
            sub += f" AND m.version={arg(version)}"
        where.append(f"EXISTS ({sub})")
    return " AND ".join(where), args


def files_json(files: Sequence[FirmwareFile]) -> str:
    return json.dumps([asdict(f) for f in files])


def options_json(options: JobOptions) -> str:
    return json.dumps(options.to_json())


def modules_by_device(rows: Iterable[Row]) -> dict[DeviceRef, dict[str, str]]:
    """Rows of (product_key, device_name, module, version): each device's module versions."""
    modules: dict[DeviceRef, dict[str, str]] = {}
    for m in rows:
        modules.setdefault(DeviceRef(m["product_key"], m["device_name"]), {})[m["module"]] = m["version"]
    return modules


def counts_by_job(rows: Iterable[Row]) -> dict[int, dict[TaskState, int]]:
    """Rows of (job_id, state, n): how many tasks of each job are in each state."""
    counts: dict[int, dict[TaskState, int]] = {}
    for c in rows:
        counts.setdefault(int(c["job_id"]), {})[TaskState(c["state"])] = int(c["n"])
    return counts


def groups_of(rows: Iterable[Row]) -> list[dict[TaskState, int]]:
    """Rows of (group_no, state, n): the counts of each rollout group, by group number (a group with no
    task has none)."""
    groups: list[dict[TaskState, int]] = []
    for r in rows:
        while len(groups) <= int(r["group_no"]):
            groups.append({})
        groups[int(r["group_no"])][TaskState(r["state"])] = int(r["n"])
    return groups


def device_from(row: Row, modules: dict[str, str]) -> DeviceRecord:
    return DeviceRecord(
        device=DeviceRef(row["product_key"], row["device_name"]),
        device_secret=row["device_secret"],
        enabled=bool(row["enabled"]),
        online=bool(row["online"]),
        created_at=row["created_at"],
        last_seen=row["last_seen"],
        modules=modules,
    )


def firmware_from(row: Row) -> Firmware:
    return Firmware(
        id=row["id"],
        product_key=row["product_key"],
        module=row["module"],
        version=row["version"],
        src_version=row["src_version"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        sign_method=SignMethod(row["sign_method"]),
        description=row["description"],
        status=FirmwareStatus(row["status"]),
        created_at=row["created_at"],
        files=tuple(FirmwareFile(**f) for f in json.loads(row["files"])),
    )


def job_from(row: Row, counts: dict[TaskState, int]) -> JobRecord:
    return JobRecord(
        id=row["id"],
        firmware_id=row["firmware_id"],
        type=JobType(row["type"]),
        stored_state=JobState(row["state"]),
        options=JobOptions.from_json(json.loads(row["options"])),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        counts=counts,
        current_group=row["current_group"],
        schedule_at=row["schedule_at"],
        end_at=row["end_at"],
        pause_reason=row["pause_reason"],
    )


def task_from(row: Row) -> Task:
    return Task(
        id=row["id"],
        job_id=row["job_id"],
        firmware_id=row["firmware_id"],
        device=DeviceRef(row["product_key"], row["device_name"]),
        module=row["module"],
        target_version=row["target_version"],
        state=TaskState(row["state"]),
        progress=row["progress"],
        desc=row["desc"],
        attempts=row["attempts"],
        timeout_s=row["timeout_s"],
        notified_at=row["notified_at"],
        noticed_at=row["noticed_at"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        rev=row["rev"],
        group_no=row["group_no"],
        not_before=row["not_before"],
        retry_count=row["retry_count"],
        retry_interval_s=row["retry_interval_s"],
        notify_timeout_s=row["notify_timeout_s"],
    )
