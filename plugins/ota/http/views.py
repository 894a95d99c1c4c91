"""The JSON shapes the API answers with: a device, a firmware, a job, a task; times as ISO 8601 UTC."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core import machine
from plugins.ota.core.model import DeviceRecord, Firmware, JobRecord, JobState, Task, TaskState


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return (
        datetime.datetime.fromtimestamp(ts, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def device_view(d: DeviceRecord) -> dict[str, Any]:
    return {
        "product_key": d.device.product_key,
        "device_name": d.device.device_name,
        "enabled": d.enabled,
        "online": d.online,
        "last_seen": iso(d.last_seen),
        "modules": d.modules,
    }


def firmware_view(f: Firmware) -> dict[str, Any]:
    return {
        "id": f.id,
        "product_key": f.product_key,
        "module": f.module,
        "version": f.version,
        "src_version": f.src_version,
        "size": f.size,
        "md5": f.md5,
        "sha256": f.sha256,
        "sign_method": str(f.sign_method),
        "sign": f.sign,
        "status": str(f.status),
        "description": f.description,
        "created_at": iso(f.created_at),
        "files": [
            {"name": p.name or None, "size": p.size, "md5": p.md5, "sha256": p.sha256} for p in f.package
        ],
    }


def job_view(j: JobRecord, now: float, waiting: Mapping[int, int] | None = None) -> dict[str, Any]:
    """A job as the API shows it; `waiting` is the app's count, per job, of online devices' queued tasks
    whose notice waits for room in the transfer window (admission control)."""
    finished = sum(n for s, n in j.counts.items() if s.terminal and s is not TaskState.SKIPPED)
    succeeded = j.counts.get(TaskState.SUCCEEDED, 0)
    started = j.schedule_at if j.schedule_at is not None else j.created_at
    minutes = max(
        (min(now, j.updated_at if j.stored_state is not JobState.RUNNING else now) - started) / 60, 1 / 60
    )
    return {
        "id": j.id,
        "firmware_id": j.firmware_id,
        "type": str(j.type),
        "state": str(machine.job_state(j.stored_state, j.counts, schedule_at=j.schedule_at, now=now)),
        "pause_reason": j.pause_reason or None,
        "counts": {str(s): j.counts.get(s, 0) for s in TaskState},
        "total": sum(j.counts.values()),
        "waiting_for_capacity": (waiting or {}).get(j.id, 0),
        "success_rate": round(succeeded / finished, 4) if finished else None,
        "throughput_per_minute": round(succeeded / minutes, 2) if now >= started else 0.0,
        "eta": _eta(j, now, succeeded / minutes if now >= started else 0.0),
        "current_phase": j.current_group + 1,
        "options": j.options.public(),
        "schedule_at": iso(j.schedule_at),
        "end_at": iso(j.end_at),
        "created_at": iso(j.created_at),
        "updated_at": iso(j.updated_at),
    }


def _eta(j: JobRecord, now: float, per_minute: float) -> str | None:
    """When a running job's unfinished tasks would all be done at the pace of its successes so far."""
    unfinished = sum(n for s, n in j.counts.items() if not s.terminal)
    if j.stored_state is not JobState.RUNNING or not unfinished or per_minute <= 0:
        return None
    return iso(now + unfinished / per_minute * 60)


def task_view(t: Task) -> dict[str, Any]:
    return {
        "id": t.id,
        "job_id": t.job_id,
        "device": str(t.device),
        "module": t.module,
        "target_version": t.target_version,
        "state": str(t.state),
        "progress": t.progress,
        "desc": t.desc,
        "attempts": t.attempts,
        "updated_at": iso(t.updated_at),
    }


# ------------------------------------------------------------------------------------------ inputs


def transfers_view(service: OtaApp) -> dict[str, int]:
    """Admission control now: transfers the window admits at once, how many are in flight, how many online
    devices' notices wait for room."""
    admission = service.admission
    return {
        "window": admission.window.limit,
        "in_flight": admission.window.in_flight,
        "waiting": admission.waiting_total,
        "max": admission.window.maximum,
    }
