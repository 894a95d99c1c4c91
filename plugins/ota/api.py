"""The management REST API (SPEC §6) on aiohttp: `/api/v1`, JSON, bearer token.

Input is validated here and answered with a 4xx naming the field; the service's exceptions map to
statuses in exactly one table, `STATUS_OF`; a 5xx never carries a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import hashlib
import hmac
import importlib.resources
import io
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, ClientPayloadError, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from firmware_store import Blob, BlobTooLarge
from firmware_store.server import BodyStalled
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core import machine
from plugins.ota.core.credentials import secret_problem
from plugins.ota.core.errors import Conflict, InvalidInput, NotFound, OtaError
from plugins.ota.core.messages import MAX_VERSION_LEN
from plugins.ota.core.messages import MODULE_PATTERN as _MODULE
from plugins.ota.core.model import (
    DEFAULT_MODULE,
    MAX_PACKAGE_FILES,
    NOTIFY_TIMEOUT_MINUTES,
    DeviceRecord,
    DownloadProtocol,
    Firmware,
    JobRecord,
    JobSpec,
    JobState,
    JobType,
    Rollout,
    SignMethod,
    Task,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef
from plugins.ota.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from plugins.ota.metrics import OtaMetrics
from plugins.ota.openapi import OPENAPI

log = logging.getLogger("ota.api")

STATUS_OF: dict[type[OtaError], int] = {NotFound: 404, Conflict: 409, InvalidInput: 422}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", OtaApp)
_CHUNK = 256 * 1024
JSON_MAX = 1024 * 1024  # bytes of a JSON request body
IMPORT_MAX = 64 * 1024 * 1024  # bytes of a CSV import
FIELD_MAX = 4096  # bytes of one multipart form field
_ID_MAX = 2**63 - 1


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def admin_app(
    service: OtaApp,
    token: str,
    *,
    metrics: OtaMetrics | None = None,
    metrics_token: str | None = None,
) -> web.Application:
    """The API under /api/v1, the console, and (given `metrics`) Prometheus' `GET /metrics`, which takes
    the admin token or the read-only `metrics_token`."""
    expected = f"Bearer {token}".encode()
    metrics_expected = f"Bearer {metrics_token}".encode() if metrics_token else None

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except OtaError as e:
            return _error(STATUS_OF.get(type(e), 400), e.code, e.message)
        except web.HTTPException as e:
            if e.status >= 400:
                return _error(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
            raise
        except ConnectionError as e:  # the client left (or stalled, BodyStalled) before its body was in
            if not isinstance(e, BodyStalled):  # the deadline logged that one
                log.info(
                    "%s %s from %s: the client went away before the whole body arrived",
                    request.method,
                    request.path,
                    request.remote,
                )
            return _error(400, "incomplete_body", "the connection ended before the whole body arrived")
        except ClientPayloadError as e:
            return _error(400, "bad_body", f"the body is malformed: {str(e)[:120]}")
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal", "internal error; see the broker's log")

    tickets = Tickets(token)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the route matched, not by the path text: only these handlers are public.
        matched = request.match_info.handler
        if matched in _PUBLIC:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return await handler(request)
        if (
            matched is prometheus_metrics
            and metrics_expected is not None
            and hmac.compare_digest(given, metrics_expected)
        ):
            return await handler(request)
        if matched is job_events and tickets.valid(request.query.get("ticket", ""), _clock(request)):
            return await handler(request)
        return _error(401, "unauthorized", "missing or wrong bearer token")

    app = web.Application(middlewares=[errors, auth])
    app[SERVICE] = service
    app[TICKETS] = tickets
    app[STREAMS] = Streams()
    app[CONSOLE] = _console_assets()
    app.on_shutdown.append(_end_streams)
    _add_routes(app.router)
    if metrics is not None:
        app[METRICS] = metrics
        app.router.add_get("/metrics", prometheus_metrics)  # outside /api/v1: not in the OpenAPI document
    return app


def _add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/", console_root)
    r.add_get("/console/{asset:[^/]*}", console_asset)
    r.add_get("/api/v1/health", health)
    r.add_post("/api/v1/devices", add_device)
    r.add_get("/api/v1/devices", list_devices)
    r.add_post("/api/v1/devices/import", import_devices)
    r.add_get("/api/v1/devices/{pk}/{dn}", show_device)
    r.add_patch("/api/v1/devices/{pk}/{dn}", update_device)
    r.add_delete("/api/v1/devices/{pk}/{dn}", delete_device)
    r.add_post("/api/v1/devices/{pk}/{dn}/secret", rotate_secret)
    r.add_post("/api/v1/firmware", add_firmware)
    r.add_get("/api/v1/firmware", list_firmware)
    r.add_get("/api/v1/firmware/{id}", show_firmware)
    r.add_delete("/api/v1/firmware/{id}", delete_firmware)
    r.add_post("/api/v1/jobs", create_job)
    r.add_get("/api/v1/jobs", list_jobs)
    r.add_get("/api/v1/jobs/{id}", show_job)
    r.add_get("/api/v1/jobs/{id}/tasks", job_tasks)
    r.add_get("/api/v1/jobs/{id}/report.csv", job_report)
    r.add_post("/api/v1/jobs/{id}/cancel", cancel_job)
    r.add_post("/api/v1/jobs/{id}/pause", pause_job)
    r.add_post("/api/v1/jobs/{id}/resume", resume_job)
    r.add_post("/api/v1/jobs/{id}/confirm", confirm_job)
    r.add_post("/api/v1/jobs/{id}/rerun", rerun_job)
    r.add_post("/api/v1/jobs/{id}/tasks/{pk}/{dn}/cancel", cancel_task)
    r.add_get("/api/v1/jobs/{id}/tasks/{pk}/{dn}/history", task_history)
    r.add_get("/api/v1/openapi.json", openapi)
    r.add_get("/api/v1/overview", overview)
    r.add_post("/api/v1/tickets", issue_ticket)
    r.add_get("/api/v1/jobs/{id}/events", job_events)


# ------------------------------------------------------------------------------------------- views


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


def job_view(j: JobRecord, now: float) -> dict[str, Any]:
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
        "success_rate": round(succeeded / finished, 4) if finished else None,
        "throughput_per_minute": round(succeeded / minutes, 2) if now >= started else 0.0,
        "current_phase": j.current_group + 1,
        "options": j.options.public(),
        "schedule_at": iso(j.schedule_at),
        "end_at": iso(j.end_at),
        "created_at": iso(j.created_at),
        "updated_at": iso(j.updated_at),
    }


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


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, read until its end (a single `read(n)` returns only what has arrived);
    413 as soon as it exceeds `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit, request.content_length)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, size)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, size: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=size, text=f"the body is larger than {limit} bytes"
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request, JSON_MAX)
    try:
        body = json.loads(raw)
    except RecursionError as e:  # json's decoder recurses once per nested array or object
        raise InvalidInput("body", "is nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise InvalidInput("body", f"is not valid JSON ({str(e)[:80]})") from e
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    return body


def _string(value: Any, field: str, *, max_len: int = 64, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "must be a non-empty string")
    if len(value) > max_len or not value.isprintable():
        raise InvalidInput(field, f"must be at most {max_len} printable characters")
    return value


def _secret(value: Any) -> str | None:
    """A device secret given in a body (None: generate one)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("device_secret", "must be a string")
    problem = secret_problem(value)
    if problem:
        raise InvalidInput("device_secret", problem)
    return value


def _device_ref(pk: Any, dn: Any, field: str) -> DeviceRef:
    try:
        return DeviceRef(pk, dn)
    except InvalidDeviceRef as e:
        raise InvalidInput(field, str(e)) from e


def _int_path(request: web.Request, name: str = "id") -> int:
    text = request.match_info[name]
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"{text!r} is not an id")
    return int(text)


def _service(request: web.Request) -> OtaApp:
    return request.app[SERVICE]


# ---------------------------------------------------------------------------------------- handlers


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def add_device(request: web.Request) -> web.Response:
    body = await _json_object(request)
    ref = _device_ref(body.get("product_key"), body.get("device_name"), "product_key/device_name")
    secret = _secret(body.get("device_secret"))
    record = await _service(request).devices.add(ref, secret)
    return web.json_response(
        {
            "product_key": ref.product_key,
            "device_name": ref.device_name,
            "device_secret": record.device_secret,
        },
        status=201,
    )


async def list_devices(request: web.Request) -> web.Response:
    q = request.query
    online: bool | None = None
    if "online" in q:
        if q["online"] not in ("true", "false", "1", "0"):
            raise InvalidInput("online", "must be true or false")
        online = q["online"] in ("true", "1")
    filters: dict[str, Any] = {
        "product_key": q.get("product_key"),
        "module": q.get("module"),
        "version": q.get("version"),
        "online": online,
    }
    page = _page(request)
    records, total = await _service(request).devices.page(**filters, limit=page.limit, offset=page.offset)
    return _paged(request, page, [device_view(d) for d in records], total)


# Every list is paged: `limit` (1-10,000, default 1,000) and `offset` in the query; the answer stays a
# JSON array, with `X-Total-Count` (how many the whole list holds) and, while more follow, a
# `Link: <...>; rel="next"` header carrying the query of the next page.
PAGE_DEFAULT = 1000
PAGE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    offset: int


def _page(request: web.Request) -> Page:
    q = request.query
    return Page(
        _query_int(q.get("limit"), "limit", PAGE_DEFAULT, 1, PAGE_MAX),
        _query_int(q.get("offset"), "offset", 0, 0, 10**12),
    )


def _paged(request: web.Request, page: Page, items: list[Any], total: int) -> web.Response:
    headers = {"X-Total-Count": str(total)}
    if items and page.offset + len(items) < total:
        following = request.rel_url.update_query(limit=page.limit, offset=page.offset + len(items))
        headers["Link"] = f'<{following}>; rel="next"'
    return web.json_response(items, headers=headers)


def _query_int(value: str | None, field: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise InvalidInput(field, f"must be a whole number from {low} to {high}")
    return int(value)


async def show_device(request: web.Request) -> web.Response:
    ref = _device_ref(request.match_info["pk"], request.match_info["dn"], "device")
    service = _service(request)
    record, tasks = await service.devices.get(ref)
    return web.json_response({**device_view(record), "tasks": [task_view(t) for t in tasks]})


def _path_device(request: web.Request) -> DeviceRef:
    return _device_ref(request.match_info["pk"], request.match_info["dn"], "device")


async def update_device(request: web.Request) -> web.Response:
    body = await _json_object(request)
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise InvalidInput("enabled", "must be true or false")
    record = await _service(request).devices.set_enabled(_path_device(request), enabled)
    return web.json_response(device_view(record))


async def delete_device(request: web.Request) -> web.Response:
    await _service(request).devices.delete(_path_device(request))
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    secret = None
    if request.can_read_body:
        body = await _json_object(request)
        secret = _secret(body.get("device_secret"))
    ref = _path_device(request)
    new = await _service(request).devices.rotate_secret(ref, secret)
    return web.json_response(
        {"product_key": ref.product_key, "device_name": ref.device_name, "device_secret": new}
    )


async def import_devices(request: web.Request) -> web.Response:
    """CSV body `product_key,device_name[,device_secret]` (plugins.ota.core.device_csv), read whole; answers the
    rows read, the created devices with their secrets, how many existed, and every refused line. The
    devices are created in one transaction."""
    if request.content_type not in ("text/csv", "text/plain"):
        raise InvalidInput("body", "must be text/csv: product_key,device_name[,device_secret] per line")
    raw = await read_body(request, IMPORT_MAX)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput("body", "is not UTF-8") from e
    result = await _service(request).devices.import_csv(text)
    return web.json_response(
        {
            "created": [
                {"product_key": r.product_key, "device_name": r.device_name, "device_secret": secret}
                for r, secret in result.created
            ],
            "existing": result.existing,
            "rows": len(result.created) + result.existing + len(result.errors),
            "errors": [{"line": line, "message": message} for line, message in result.errors],
        },
        status=200,
    )


async def add_firmware(request: web.Request) -> web.Response:
    """Multipart upload; each file streams to the store as it arrives, fields may come in any order. One
    'file' part is a firmware; several (up to 20, each named by its filename) are a multi-file package."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("body", "must be multipart/form-data with a 'file' part")
    service = _service(request)
    try:
        reader = await request.multipart()
    except ValueError as e:
        raise InvalidInput("body", f"malformed multipart/form-data: {e}") from e
    fields: dict[str, str] = {}
    blobs: list[tuple[str, Blob]] = []  # a package of several files: each 'file' part, in order
    try:
        while (part := await _next_part(reader)) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("body", "nested multipart is not accepted")
            name = part.name or ""
            if name == "file":
                if len(blobs) == MAX_PACKAGE_FILES:
                    raise InvalidInput("file", f"give at most {MAX_PACKAGE_FILES} files")
                blobs.append((part.filename or "", await _store_stream(service, part)))
                continue
            if name in fields:
                raise InvalidInput(name, "given twice")
            value = await _read_field(part, name)
            try:
                fields[name] = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(name, "is not UTF-8") from e
        if not blobs:
            raise InvalidInput("file", "is required")
        package = blobs[0][1] if len(blobs) == 1 else blobs
        firmware = await service.firmware.add(package, **_firmware_fields(fields))
    except BaseException:
        for _, blob in blobs:
            await service.firmware.discard_upload(blob)
        raise
    return web.json_response(firmware_view(firmware), status=201)


async def _next_part(reader: MultipartReader) -> Any:
    """The next part, with aiohttp's framing errors answered as a 422 naming the body."""
    try:
        return await reader.next()
    except (ValueError, HttpProcessingError) as e:
        raise InvalidInput("body", f"malformed multipart/form-data: {str(e)[:120]}") from e


async def _read_field(part: BodyPartReader, name: str) -> bytes:
    """A form field whole (a single `read_chunk` returns only what has arrived), at most FIELD_MAX bytes."""
    value = b""
    while chunk := await part.read_chunk(FIELD_MAX + 1):
        value += chunk
        if len(value) > FIELD_MAX:
            raise InvalidInput(name, f"is longer than {FIELD_MAX} bytes")
    return value


async def _store_stream(service: OtaApp, part: BodyPartReader) -> Blob:
    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await part.read_chunk(_CHUNK):
            yield chunk

    try:
        return await service.firmware.put_blob(chunks())
    except BlobTooLarge as e:
        raise web.HTTPRequestEntityTooLarge(
            max_size=service.firmware.max_size, actual_size=service.firmware.max_size + 1, text=str(e)
        ) from e


def _firmware_fields(fields: dict[str, str]) -> dict[str, Any]:
    product_key = _string(fields.get("product_key"), "product_key")
    try:
        DeviceRef(product_key or "", "x")
    except InvalidDeviceRef as e:
        raise InvalidInput("product_key", "must be 1-64 characters of A-Z a-z 0-9 _ . : @ -") from e
    method_text = fields.get("sign_method") or SignMethod.MD5.value
    try:
        sign_method = SignMethod(method_text)
    except ValueError as e:
        raise InvalidInput("sign_method", "must be 'Md5' or 'SHA256'") from e
    module = fields.get("module") or DEFAULT_MODULE
    if not _MODULE.fullmatch(module):
        raise InvalidInput("module", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return {
        "product_key": product_key,
        "version": _string(fields.get("version"), "version", max_len=MAX_VERSION_LEN),
        "module": module,
        "sign_method": sign_method,
        "src_version": _string(
            fields.get("src_version") or None, "src_version", max_len=MAX_VERSION_LEN, required=False
        ),
        "description": fields.get("description", ""),
        "verify": _form_flag(fields, "verify"),
    }


def _form_flag(fields: dict[str, str], name: str) -> bool:
    value = fields.get(name, "false").strip().lower()
    if value not in ("true", "false", "1", "0", ""):
        raise InvalidInput(name, "must be true or false")
    return value in ("true", "1")


async def list_firmware(request: web.Request) -> web.Response:
    product_key = request.query.get("product_key")
    page = _page(request)
    items, total = await _service(request).firmware.page(product_key, limit=page.limit, offset=page.offset)
    return _paged(request, page, [firmware_view(f) for f in items], total)


async def show_firmware(request: web.Request) -> web.Response:
    return web.json_response(firmware_view(await _service(request).firmware.get(_int_path(request))))


async def delete_firmware(request: web.Request) -> web.Response:
    await _service(request).firmware.delete(_int_path(request))
    return web.Response(status=204)


async def create_job(request: web.Request) -> web.Response:
    service = _service(request)
    spec = parse_job_spec(await _json_object(request), service.clock())
    job = await service.jobs.create(spec)
    return web.json_response(job_view(job, service.clock()), status=201)


def _number(body: dict[str, Any], field: str, *, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise InvalidInput(field, "must be a whole number" if integer else "must be a number")
    if not low <= value <= high:
        raise InvalidInput(field, f"must be from {low:g} to {high:g}")
    return value


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise InvalidInput(field, "must be true or false")
    return value


_LAST_TIME = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()


def _time(body: dict[str, Any], field: str) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as e:
            raise InvalidInput(field, "must be an ISO 8601 time such as 2026-12-01T02:00:00Z") from e
        if parsed.tzinfo is None:
            raise InvalidInput(field, "must carry a time zone (Z or +hh:mm)")
        stamp = parsed.timestamp()
        if not 0 <= stamp < _LAST_TIME:  # 9999-12-31T23:59:50-23:00 is already year 10000 in UTC
            raise InvalidInput(field, "must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
        return stamp
    raise InvalidInput(field, "must be an ISO 8601 time such as 2026-12-01T02:00:00Z")


def _device_list(raw: Any, field: str) -> tuple[DeviceRef, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(field, "must be a non-empty list of 'product_key/device_name'")
    devices = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise InvalidInput(f"{field}[{i}]", "must be a 'product_key/device_name' string")
        try:
            devices.append(DeviceRef.parse(item))
        except InvalidDeviceRef as e:
            raise InvalidInput(f"{field}[{i}]", str(e)) from e
    return tuple(devices)


def parse_job_spec(body: dict[str, Any], now: float) -> JobSpec:
    """POST /jobs body → JobSpec, naming the field of the first problem."""
    fw = body.get("firmware_id")
    if isinstance(fw, bool) or not isinstance(fw, int) or not 1 <= fw <= _ID_MAX:
        raise InvalidInput("firmware_id", "must be a firmware id (a positive integer)")
    try:
        job_type = JobType(body.get("type", "static"))
    except ValueError as e:
        raise InvalidInput("type", "must be 'static', 'dynamic' or 'verify'") from e
    devices = None if body.get("devices") is None else _device_list(body["devices"], "devices")
    src_versions = body.get("src_versions") or []
    if not isinstance(src_versions, list) or not all(isinstance(v, str) and v for v in src_versions):
        raise InvalidInput("src_versions", "must be a list of version strings")
    schedule_at, end_at = _time(body, "schedule_at"), _time(body, "end_at")
    if end_at is not None and end_at <= max(now, schedule_at or now):
        raise InvalidInput("end_at", "must be later than now and than schedule_at")
    timeout = _number(body, "timeout_minutes", low=0.001, high=1440 * 30)
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
    notify_timeout = _or(
        _number(body, "notify_timeout_minutes", low=0, high=1440 * 30), NOTIFY_TIMEOUT_MINUTES
    )
    return JobSpec(
        firmware_id=fw,
        type=job_type,
        devices=devices,
        src_versions=tuple(src_versions),
        gray_percent=_number(body, "gray_percent", low=0.01, high=100),
        overwrite=_flag(body, "overwrite"),
        force=_flag(body, "force"),
        need_confirm=_flag(body, "need_confirm"),
        schedule_at=schedule_at,
        end_at=end_at,
        rate_per_minute=_number(body, "rate_per_minute", low=1, high=100_000, integer=True),
        timeout_minutes=timeout,
        retry_count=_or(_number(body, "retry_count", low=0, high=10, integer=True), 0),
        retry_interval_minutes=_or(_number(body, "retry_interval_minutes", low=0, high=1440), 0.0),
        rollout=rollout,
        tags=tuple((str(k), str(v)) for k, v in tags.items()),
        download_protocol=protocol,
        notify_timeout_minutes=notify_timeout or None,  # 0: never
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
            success_threshold=_or(_number(raw, "success_threshold", low=0, high=100), 100.0),
            error_threshold_count=_number(raw, "error_threshold_count", low=1, high=10**9, integer=True),
            error_threshold_percent=_number(raw, "error_threshold_percent", low=0.01, high=100),
        )
    except InvalidInput as e:
        raise InvalidInput(f"rollout.{e.field}", e.message.removeprefix(f"{e.field}: ")) from e


async def list_jobs(request: web.Request) -> web.Response:
    """Jobs, newest first."""
    service = _service(request)
    page = _page(request)
    jobs, total = await service.jobs.page(limit=page.limit, offset=page.offset)
    now = service.clock()
    return _paged(request, page, [job_view(j, now) for j in jobs], total)


async def _job_answer(request: web.Request, job: JobRecord) -> web.Response:
    return web.json_response(job_view(job, _service(request).clock()))


async def show_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await _service(request).jobs.get(_int_path(request)))


async def job_tasks(request: web.Request) -> web.Response:
    service = _service(request)
    job_id = _int_path(request)
    page = _page(request)
    tasks = await service.jobs.tasks(job_id, limit=page.limit, offset=page.offset)
    return _paged(request, page, [task_view(t) for t in tasks], await service.jobs.count_tasks(job_id))


async def job_report(request: web.Request) -> web.Response:
    """Every task of the job as CSV, for spreadsheets and audits."""
    service = _service(request)
    job_id = _int_path(request)
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


async def _optional_body(request: web.Request) -> dict[str, Any]:
    return await _json_object(request) if request.can_read_body else {}


async def cancel_job(request: web.Request) -> web.Response:
    """Body (optional): {"states": ["queued", "notified", "in_progress", "confirm"]} (default: all)."""
    body = await _optional_body(request)
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
    return await _job_answer(request, await _service(request).jobs.cancel(_int_path(request), parsed))


async def pause_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await _service(request).jobs.pause(_int_path(request)))


async def resume_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await _service(request).jobs.resume(_int_path(request)))


async def confirm_job(request: web.Request) -> web.Response:
    """Body (optional): {"devices": ["pk/dn", ...]} (default: every task waiting in confirm)."""
    body = await _optional_body(request)
    devices = None if body.get("devices") is None else _device_list(body["devices"], "devices")
    return await _job_answer(request, await _service(request).jobs.confirm(_int_path(request), devices))


async def rerun_job(request: web.Request) -> web.Response:
    return await _job_answer(request, await _service(request).jobs.rerun_failed(_int_path(request)))


async def cancel_task(request: web.Request) -> web.Response:
    task = await _service(request).jobs.cancel_task(_int_path(request), _path_device(request))
    return web.json_response(task_view(task))


async def task_history(request: web.Request) -> web.Response:
    service = _service(request)
    task, history = await service.jobs.task_history(_int_path(request), _path_device(request))
    return web.json_response(
        {
            "task": task_view(task),
            "history": [
                {"at": iso(h["at"]), "state": h["state"], "progress": h["progress"], "desc": h["desc"]}
                for h in history
            ],
        }
    )


METRICS = web.AppKey("metrics", OtaMetrics)


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this broker's metrics (plugins.ota.metrics)."""
    body = await request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


# ----------------------------------------------------------------------------------------- overview

_OVERVIEW_PAGE = 10_000
_OVERVIEW_MAX_DEVICES = 200_000
_RECENT_JOBS = 20
_RECENT_FAILURES = 20


async def overview(request: web.Request) -> web.Response:
    """The fleet at a glance for the console: devices online/offline, devices per product, module and
    version, unfinished jobs and the newest failed tasks. Counts stop at 200,000 devices (`partial`)."""
    service = _service(request)
    now = service.clock()
    online = total = 0
    versions: Counter[tuple[str, str, str]] = Counter()
    partial = False
    offset = 0
    while True:
        page = await service.devices.some(limit=_OVERVIEW_PAGE, offset=offset)
        for d in page:
            total += 1
            online += d.online
            for module, version in d.modules.items():
                versions[d.device.product_key, module, version] += 1
        if len(page) < _OVERVIEW_PAGE:
            break
        offset += _OVERVIEW_PAGE
        if offset >= _OVERVIEW_MAX_DEVICES:
            partial = True
            break
    active = [job_view(j, now) for j in await service.jobs.unfinished()]
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
            "partial": partial,
        }
    )


# ------------------------------------------------------------------------------ live job (events)

TICKET_TTL_S = 60.0
_STREAM_INTERVAL_S = 0.5
_STREAM_KEEPALIVE_S = 15.0
_STREAM_MAX_S = 30 * 60.0
_STREAM_MAX = 64
_STREAM_TASKS_MAX = 1000


class Tickets:
    """Short-lived tickets for the event stream: EventSource cannot send an Authorization header, and
    the admin token must not travel in URLs (they end up in logs and history). A ticket is
    `<expiry>.<HMAC(key, "events:<expiry>")>` with a key derived from the admin token, so it needs no
    storage, dies with a token change, opens nothing but `GET /jobs/{id}/events`, and only within
    `TICKET_TTL_S` seconds of its issue (an open stream outlives it; a reconnect needs a fresh one)."""

    def __init__(self, token: str) -> None:
        self._key = hmac.new(token.encode(), b"ota-broker events ticket", hashlib.sha256).digest()

    def _mac(self, expiry: int) -> str:
        return hmac.new(self._key, f"events:{expiry}".encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float) -> tuple[str, int]:
        expiry = int(now + TICKET_TTL_S)
        return f"{expiry}.{self._mac(expiry)}", expiry

    def valid(self, ticket: str, now: float) -> bool:
        expiry_text, _, mac = ticket.partition(".")
        if not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        return now <= expiry <= now + TICKET_TTL_S + 1 and hmac.compare_digest(
            mac.encode(), self._mac(expiry).encode()
        )


@dataclass
class Streams:
    """The open event streams; `closing` is set when the listener shuts down so they end at once."""

    open: int = 0
    closing: asyncio.Event | None = None

    def closing_event(self) -> asyncio.Event:
        if self.closing is None:
            self.closing = asyncio.Event()
        return self.closing


TICKETS = web.AppKey("tickets", Tickets)
STREAMS = web.AppKey("streams", Streams)


async def _end_streams(app: web.Application) -> None:
    app[STREAMS].closing_event().set()


def _clock(request: web.Request) -> float:
    service: OtaApp | None = request.app[SERVICE]
    return service.clock() if service is not None else time.time()


async def issue_ticket(request: web.Request) -> web.Response:
    ticket, expiry = request.app[TICKETS].issue(_clock(request))
    return web.json_response(
        {"ticket": ticket, "expires_at": iso(expiry), "scope": "GET /api/v1/jobs/{id}/events"}, status=201
    )


def _job_final(job: JobRecord, now: float) -> bool:
    state = machine.job_state(job.stored_state, job.counts, schedule_at=job.schedule_at, now=now)
    return state is JobState.CANCELLED or (state is JobState.COMPLETED and job.type is not JobType.DYNAMIC)


async def job_events(request: web.Request) -> web.StreamResponse:
    """`text/event-stream` of one job: an `event: snapshot` (the job and its tasks) whenever something
    changed, checked every 0.5 s; a comment every 15 s keeps proxies from closing an idle stream. It
    ends (`event: end`) when the job is final (a static or verify job completed, any job cancelled),
    after 30 minutes (the client reconnects), when the client leaves or the listener shuts down."""
    service = _service(request)
    job_id = _int_path(request)
    await service.jobs.get(job_id)  # 404 before the stream starts
    streams = request.app[STREAMS]
    if streams.open >= _STREAM_MAX:
        return _error(503, "too_many_streams", f"at most {_STREAM_MAX} event streams at a time; retry later")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",
        }
    )
    streams.open += 1
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        await _stream_job(request, response, service, job_id, streams.closing_event())
    except ConnectionError:
        pass  # the client left
    except Exception:
        log.exception("event stream of job %s failed", job_id)
    finally:
        streams.open -= 1
    return response


async def _stream_job(
    request: web.Request,
    response: web.StreamResponse,
    service: OtaApp,
    job_id: int,
    closing: asyncio.Event,
) -> None:
    """Write snapshots until the job is final (then `event: end`, and the client stops), or until the
    client leaves, the listener shuts down or the stream is 30 minutes old (no `end`: the client
    reconnects)."""
    started = last_write = time.monotonic()
    last_seen: object = None
    while not closing.is_set() and time.monotonic() - started < _STREAM_MAX_S:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        now = service.clock()
        job = await service.jobs.find(job_id)
        if job is None:
            break
        tasks = await service.jobs.tasks_in_states(job_id, None)
        view = job_view(job, now)
        seen = (
            (view["state"], view["pause_reason"], view["counts"], view["current_phase"], job.updated_at),
            [(t.id, t.rev) for t in tasks],
        )
        if seen != last_seen:
            last_seen = seen
            snapshot = {
                "job": view,
                "tasks": [task_view(t) for t in tasks[:_STREAM_TASKS_MAX]],
                "tasks_total": len(tasks),
                "at": iso(now),
            }
            await response.write(f"event: snapshot\ndata: {json.dumps(snapshot)}\n\n".encode())
            last_write = time.monotonic()
        elif time.monotonic() - last_write >= _STREAM_KEEPALIVE_S:
            await response.write(b": keep-alive\n\n")
            last_write = time.monotonic()
        if _job_final(job, now):
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), _STREAM_INTERVAL_S)
    else:
        return
    await response.write(b"event: end\ndata: {}\n\n")


# ------------------------------------------------------------------------------------------ console

# The operator's console is static files (plugins/ota/console/) that talk only to this API. They are
# public: everything they show comes from API calls that need the token.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_CONSOLE_HEADERS = {
    "Content-Security-Policy": CONSOLE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
_CONSOLE_TYPES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


CONSOLE = web.AppKey("console", dict)


def _console_assets() -> dict[str, Asset]:
    folder = importlib.resources.files("plugins.ota").joinpath("console")
    assets: dict[str, Asset] = {}
    for name, content_type in _CONSOLE_TYPES.items():
        try:
            body = folder.joinpath(name).read_bytes()
        except OSError:
            log.warning("console file %s is missing; the console is not served", name)
            continue
        assets[name] = Asset(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return assets


async def console_root(_request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/", headers=_CONSOLE_HEADERS)


async def console_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"] or "index.html"
    asset: Asset | None = request.app[CONSOLE].get(name)
    if asset is None:
        return web.Response(status=404, text="not found", headers=_CONSOLE_HEADERS)
    headers = {**_CONSOLE_HEADERS, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers)


_PUBLIC: frozenset[Callable[..., Any]] = frozenset({health, console_root, console_asset})
