"""`GET /api/v1/overview`: the fleet at a glance, for the console."""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.model import Task, TaskState
from plugins.ota.core.reports import versions_over_time
from plugins.ota.http.inputs import ota_app, query_int
from plugins.ota.http.views import iso, job_view, task_view, transfers_view

_OVERVIEW_PAGE = 10_000
_OVERVIEW_MAX_DEVICES = 200_000
_RECENT_JOBS = 20
_RECENT_FAILURES = 20


async def _fleet(service: OtaApp) -> tuple[int, int, Counter[tuple[str, str, str]], bool]:
    """Devices in all, online, per (product, module, version), and whether the count stopped short."""
    online = total = 0
    versions: Counter[tuple[str, str, str]] = Counter()
    offset = 0
    while True:
        page = await service.devices.some(limit=_OVERVIEW_PAGE, offset=offset)
        for d in page:
            total += 1
            online += d.online
            for module, version in d.modules.items():
                versions[d.device.product_key, module, version] += 1
        if len(page) < _OVERVIEW_PAGE:
            return total, online, versions, False
        offset += _OVERVIEW_PAGE
        if offset >= _OVERVIEW_MAX_DEVICES:
            return total, online, versions, True


async def versions_over_time_view(request: web.Request) -> web.Response:
    """`GET /overview/versions?days=30`: per product and module, the devices on each version an upgrade went
    to in the window, and on the others, at 60 instants from `days` ago to now."""
    service = ota_app(request)
    days = query_int(request.query.get("days"), "days", 30, 1, 366)
    now = service.clock()
    start = now - days * 86400
    now_counts: dict[tuple[str, str], dict[str, int]] = {}
    for pk, module, version, n in await service.devices.version_counts():  # one query, not a fleet walk
        now_counts.setdefault((pk, module), {})[version] = n
    upgrades: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for at, pk, module, version in await service.jobs.upgrades_since(start):
        upgrades.setdefault((pk, module), []).append((at, version))
    return web.json_response(
        {
            "days": days,
            "series": [
                {
                    "product_key": pk,
                    "module": module,
                    "points": [
                        {"at": iso(at), "versions": counts}
                        for at, counts in versions_over_time(
                            counts_now, upgrades.get((pk, module), []), start, now
                        )
                    ],
                }
                for (pk, module), counts_now in sorted(now_counts.items())
            ],
        }
    )


async def overview(request: web.Request) -> web.Response:
    """The fleet at a glance for the console: devices online/offline, devices per product, module and
    version, unfinished jobs and the newest failed tasks. Counts stop at 200,000 devices (`partial`)."""
    service = ota_app(request)
    now = service.clock()
    total, online, versions, partial = await _fleet(service)
    active = [job_view(j, now, service.admission.waiting) for j in await service.jobs.unfinished()]
    failed_states = (TaskState.FAILED, TaskState.TIMED_OUT)
    failures: list[Task] = []
    for j in (await service.jobs.page(limit=_RECENT_JOBS, offset=0))[0]:
        if any(j.counts.get(s, 0) for s in failed_states):
            failures.extend(await service.jobs.tasks_in_states(j.id, failed_states))
    failures.sort(key=lambda t: t.updated_at, reverse=True)
    return web.json_response(
        {
            "devices": {"total": total, "online": online, "offline": total - online},
            "versions": [
                {"product_key": pk, "module": module, "version": version, "devices": n}
                for (pk, module, version), n in sorted(versions.items())
            ],
            "jobs": {
                "by_state": dict(Counter(j["state"] for j in active)),
                "active": active,
            },
            "recent_failures": [task_view(t) for t in failures[:_RECENT_FAILURES]],
            "transfers": transfers_view(service),
            "partial": partial,
        }
    )
