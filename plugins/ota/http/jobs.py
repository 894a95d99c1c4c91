"""`/api/v1/jobs`: create (the body checked field by field into a `JobSpec`), list, show, tasks, the CSV
report, cancel, pause, resume, confirm, rerun the failed, and one task's cancel and history."""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any

from aiohttp import web

from plugins.ota.core.errors import InvalidInput
from plugins.ota.core.model import (
    NOTIFY_TIMEOUT_MINUTES,
    DownloadProtocol,
    JobRecord,
    JobSpec,
    JobState,
    JobType,
    Rollout,
    TaskState,
)
from plugins.ota.http.inputs import (
    ID_MAX,
    device_list,
    flag,
    group_name,
    int_path,
    json_object,
    number,
    optional_body,
    or_default,
    ota_app,
    page_of,
    paged,
    path_device,
    time_field,
)
from plugins.ota.http.views import iso, job_view, task_view


async def create_job(request: web.Request) -> web.Response:
    service = ota_app(request)
    spec = parse_job_spec(await json_object(request), service.clock())
    job = await service.jobs.create(spec)
    return web.json_response(job_view(job, service.clock(), service.admission.waiting), status=201)


PREVIEW_SAMPLE = 20  # devices a preview names


async def preview_job(request: web.Request) -> web.Response:
    """What POST /jobs would start with the same body, starting nothing: how many devices, in which state
    and phase, why others are skipped, a sample of them, and the seed that starts exactly this selection."""
    service = ota_app(request)
    spec = parse_job_spec(await json_object(request), service.clock())
    preview = await service.jobs.preview(spec)
    runs = [p for p in preview.planned if p.state is not TaskState.SKIPPED]
    skipped = [p for p in preview.planned if p.state is TaskState.SKIPPED]
    states = Counter(p.state.value for p in preview.planned)
    reasons = Counter(p.desc for p in skipped)
    phases = Counter(p.group_no for p in runs)
    sample = (runs + skipped)[:PREVIEW_SAMPLE]
    fw = preview.firmware
    return web.json_response(
        {
            "firmware": {
                "id": fw.id,
                "product_key": fw.product_key,
                "module": fw.module,
                "version": fw.version,
            },
            "whole_product": spec.devices is None and spec.group is None,
            "group": spec.group,
            "devices": len(preview.planned),
            "tasks": len(runs),
            "states": states,
            "skipped_reasons": reasons,
            "phases": [phases.get(i, 0) for i in range(max(phases, default=-1) + 1)],
            "sample": [
                {"device": str(p.device), "state": p.state.value, "phase": p.group_no, "desc": p.desc}
                for p in sample
            ],
            "seed": preview.seed,
        }
    )


def parse_job_spec(body: dict[str, Any], now: float) -> JobSpec:
    """POST /jobs body → JobSpec, naming the field of the first problem."""
    fw = body.get("firmware_id")
    if isinstance(fw, bool) or not isinstance(fw, int) or not 1 <= fw <= ID_MAX:
        raise InvalidInput("firmware_id", "must be a firmware id (a positive integer)")
    try:
        job_type = JobType(body.get("type", "static"))
    except ValueError as e:
        raise InvalidInput("type", "must be 'static', 'dynamic' or 'verify'") from e
    devices = None if body.get("devices") is None else device_list(body["devices"], "devices")
    src_versions = body.get("src_versions") or []
    if not isinstance(src_versions, list) or not all(isinstance(v, str) and v for v in src_versions):
        raise InvalidInput("src_versions", "must be a list of version strings")
    schedule_at, end_at = time_field(body, "schedule_at"), time_field(body, "end_at")
    if end_at is not None and end_at <= max(now, schedule_at or now):
        raise InvalidInput("end_at", "must be later than now and than schedule_at")
    timeout = number(body, "timeout_minutes", low=0.001, high=1440 * 30)
    tags = body.get("tags") or {}
    if not isinstance(tags, dict) or len(tags) > 10:
        raise InvalidInput("tags", "must be an object of at most 10 string values")
    for k, v in tags.items():
        if not isinstance(v, str) or not k or len(k) > 64 or len(v) > 1024:
            raise InvalidInput(f"tags.{k}", "keys are 1-64 characters, values strings of at most 1024")
    rollout = _rollout_spec(body.get("rollout"))
    try:
        protocol = DownloadProtocol(body.get("download_protocol", "https"))
    except ValueError as e:
        raise InvalidInput("download_protocol", "must be 'https' or 'mqtt'") from e
    notify_timeout = or_default(
        number(body, "notify_timeout_minutes", low=0, high=1440 * 30), NOTIFY_TIMEOUT_MINUTES
    )
    group = None if body.get("group") is None else group_name(body["group"], "group")
    if group is not None and (devices is not None or job_type is JobType.DYNAMIC):
        raise InvalidInput("group", "targets a static or verify job's devices instead of a device list")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, str) or not 1 <= len(seed) <= 128):
        raise InvalidInput("seed", "must be the seed of a preview (a string of at most 128 characters)")
    return JobSpec(
        firmware_id=fw,
        type=job_type,
        devices=devices,
        src_versions=tuple(src_versions),
        gray_percent=number(body, "gray_percent", low=0.01, high=100),
        overwrite=flag(body, "overwrite"),
        force=flag(body, "force"),
        need_confirm=flag(body, "need_confirm"),
        schedule_at=schedule_at,
        end_at=end_at,
        rate_per_minute=number(body, "rate_per_minute", low=1, high=100_000, integer=True),
        timeout_minutes=timeout,
        retry_count=or_default(number(body, "retry_count", low=0, high=10, integer=True), 0),
        retry_interval_minutes=or_default(number(body, "retry_interval_minutes", low=0, high=1440), 0.0),
        rollout=rollout,
        tags=tuple((str(k), str(v)) for k, v in tags.items()),
        download_protocol=protocol,
        notify_timeout_minutes=notify_timeout or None,  # 0: never
        seed=seed,
        group=group,
    )


def _rollout_spec(raw: Any) -> Rollout | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidInput("rollout", "must be an object with 'phases'")
    phases = raw.get("phases")
    if (
        not isinstance(phases, list)
        or not 1 <= len(phases) <= 20
        or not all(isinstance(p, int | float) and not isinstance(p, bool) and p > 0 for p in phases)
    ):
        raise InvalidInput("rollout.phases", "must be a list of 1-20 positive percentages")
    if abs(sum(phases) - 100) > 0.01:
        raise InvalidInput("rollout.phases", "must add up to 100")
    try:
        return Rollout(
            phases=tuple(float(p) for p in phases),
            success_threshold=or_default(number(raw, "success_threshold", low=0, high=100), 100.0),
            error_threshold_count=number(raw, "error_threshold_count", low=1, high=10**9, integer=True),
            error_threshold_percent=number(raw, "error_threshold_percent", low=0.01, high=100),
        )
    except InvalidInput as e:
        raise InvalidInput(f"rollout.{e.field}", e.message.removeprefix(f"{e.field}: ")) from e


TIMELINE_POINTS = 120  # at most this many points: a chart's worth, whatever the number of tasks


async def job_timeline(request: web.Request) -> web.Response:
    """The job's upgrades over time: how many tasks had succeeded, and how many had failed or timed out
    (for good: a failure retried is not one), at up to TIMELINE_POINTS instants from its start to now (or
    its last outcome)."""
    service = ota_app(request)
    job_id = int_path(request)
    job = await service.jobs.get(job_id)
    outcomes = await service.jobs.outcomes(job_id)
    start = job.schedule_at if job.schedule_at is not None else job.created_at
    end = max([start, *(at for at, _ in outcomes)])
    if job.stored_state is JobState.RUNNING:
        end = max(end, service.clock())
    return web.json_response(
        {
            "job_id": job_id,
            "started_at": iso(start),
            "points": _timeline(outcomes, start, end, TIMELINE_POINTS),
        }
    )


def _timeline(
    outcomes: list[tuple[float, str]], start: float, end: float, points: int
) -> list[dict[str, Any]]:
    """Cumulative counts at `points` evenly spaced instants from `start` to `end` (the last one: `end`)."""
    steps = max(1, min(points - 1, len(outcomes)))
    out: list[dict[str, Any]] = [{"at": iso(start), "succeeded": 0, "failed": 0}]
    succeeded = failed = i = 0
    for k in range(1, steps + 1):
        edge = start + (end - start) * k / steps
        while i < len(outcomes) and (outcomes[i][0] <= edge or k == steps):
            if outcomes[i][1] == TaskState.SUCCEEDED:
                succeeded += 1
            else:
                failed += 1
            i += 1
        out.append({"at": iso(edge), "succeeded": succeeded, "failed": failed})
    return out


async def list_jobs(request: web.Request) -> web.Response:
    """Jobs, newest first."""
    service = ota_app(request)
    page = page_of(request)
    jobs, total = await service.jobs.page(limit=page.limit, offset=page.offset)
    now = service.clock()
    return paged(request, page, [job_view(j, now, service.admission.waiting) for j in jobs], total)


async def _job_answer(request: web.Request, job: JobRecord) -> web.Response:
    return web.json_response(job_view(job, ota_app(request).clock(), ota_app(request).admission.waiting))


async def show_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await ota_app(request).jobs.get(int_path(request)))


async def job_tasks(request: web.Request) -> web.Response:
    service = ota_app(request)
    job_id = int_path(request)
    page = page_of(request)
    tasks = await service.jobs.tasks(job_id, limit=page.limit, offset=page.offset)
    return paged(request, page, [task_view(t) for t in tasks], await service.jobs.count_tasks(job_id))


async def job_report(request: web.Request) -> web.Response:
    """Every task of the job as CSV, for spreadsheets and audits."""
    service = ota_app(request)
    job_id = int_path(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["device", "module", "target_version", "state", "progress", "attempts", "desc", "updated_at"]
    )
    for t in await service.jobs.tasks(job_id):
        writer.writerow(
            [
                str(t.device),
                t.module,
                t.target_version,
                t.state,
                t.progress,
                t.attempts,
                t.desc,
                iso(t.updated_at),
            ]
        )
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}.csv"'},
    )


async def cancel_job(request: web.Request) -> web.Response:
    """Body (optional): {"states": ["queued", "notified", "in_progress", "confirm"]} (default: all)."""
    body = await optional_body(request)
    states = body.get("states")
    parsed: list[TaskState] | None = None
    if states is not None:
        if not isinstance(states, list) or not states:
            raise InvalidInput("states", "must be a non-empty list of task states")
        try:
            parsed = [TaskState(x) for x in states]
        except ValueError as e:
            raise InvalidInput(
                "states", "must name task states: confirm, queued, notified, in_progress"
            ) from e
    return await _job_answer(request, await ota_app(request).jobs.cancel(int_path(request), parsed))


async def pause_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await ota_app(request).jobs.pause(int_path(request)))


async def resume_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await ota_app(request).jobs.resume(int_path(request)))


async def confirm_job(request: web.Request) -> web.Response:
    """Body (optional): {"devices": ["pk/dn", ...]} (default: every task waiting in confirm)."""
    body = await optional_body(request)
    devices = None if body.get("devices") is None else device_list(body["devices"], "devices")
    return await _job_answer(request, await ota_app(request).jobs.confirm(int_path(request), devices))


async def rerun_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await ota_app(request).jobs.rerun_failed(int_path(request)))


async def cancel_task(request: web.Request) -> web.Response:
    task = await ota_app(request).jobs.cancel_task(int_path(request), path_device(request))
    return web.json_response(task_view(task))


async def task_history(request: web.Request) -> web.Response:
    service = ota_app(request)
    task, history = await service.jobs.task_history(int_path(request), path_device(request))
    return web.json_response(
        {
            "task": task_view(task),
            "history": [
                {"at": iso(h["at"]), "state": h["state"], "progress": h["progress"], "desc": h["desc"]}
                for h in history
            ],
        }
    )
