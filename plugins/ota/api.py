"""The management REST API (SPEC §6) on aiohttp: `/api/v1`, JSON, bearer token.

Input is validated here and answered with a 4xx naming the field; the service's exceptions map to
statuses in exactly one table, `STATUS_OF`; a 5xx never carries a traceback.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web

from firmware_store import Blob, BlobTooLarge
from plugins.ota import machine
from plugins.ota.errors import Conflict, InvalidInput, NotFound, OtaError
from plugins.ota.messages import MAX_VERSION_LEN
from plugins.ota.messages import MODULE_PATTERN as _MODULE
from plugins.ota.model import DEFAULT_MODULE, Firmware, JobType, SignMethod, Task, TaskState
from plugins.ota.repository import DeviceRecord, JobRecord
from plugins.ota.service import OtaService
from plugins.ota.topics import DeviceRef, InvalidDeviceRef

log = logging.getLogger("ota.api")

STATUS_OF: dict[type[OtaError], int] = {NotFound: 404, Conflict: 409, InvalidInput: 422}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", OtaService)
_CHUNK = 256 * 1024
_IMPORT_MAX = 64 * 1024 * 1024


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def admin_app(service: OtaService, token: str) -> web.Application:
    expected = f"Bearer {token}".encode()

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
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal", "internal error; see the broker's log")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/api/v1/health":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    app = web.Application(middlewares=[errors, auth])
    app[SERVICE] = service
    r = app.router
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
    r.add_post("/api/v1/jobs/{id}/cancel", cancel_job)
    return app


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
    }


def job_view(j: JobRecord) -> dict[str, Any]:
    return {
        "id": j.id,
        "firmware_id": j.firmware_id,
        "type": str(j.type),
        "state": str(machine.job_state(j.stored_state, j.counts)),
        "counts": {str(s): j.counts.get(s, 0) for s in TaskState},
        "total": sum(j.counts.values()),
        "options": j.options,
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


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput("body", "is not valid JSON") from e
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


def _service(request: web.Request) -> OtaService:
    return request.app[SERVICE]


# ---------------------------------------------------------------------------------------- handlers


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def add_device(request: web.Request) -> web.Response:
    body = await _json_object(request)
    ref = _device_ref(body.get("product_key"), body.get("device_name"), "product_key/device_name")
    secret = _string(body.get("device_secret"), "device_secret", max_len=128, required=False)
    record = await _service(request).add_device(ref, secret)
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
    limit = _query_int(q.get("limit"), "limit", 1000, 1, 10_000)
    offset = _query_int(q.get("offset"), "offset", 0, 0, 10**9)
    records = await _service(request).repo.list_devices(
        product_key=q.get("product_key"),
        module=q.get("module"),
        version=q.get("version"),
        online=online,
        limit=limit,
        offset=offset,
    )
    return web.json_response([device_view(d) for d in records])


def _query_int(value: str | None, field: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise InvalidInput(field, f"must be a whole number from {low} to {high}")
    return int(value)


async def show_device(request: web.Request) -> web.Response:
    ref = _device_ref(request.match_info["pk"], request.match_info["dn"], "device")
    service = _service(request)
    record = await service.repo.get_device(ref)
    tasks = await service.repo.tasks_of_device(ref)
    return web.json_response({**device_view(record), "tasks": [task_view(t) for t in tasks]})


def _path_device(request: web.Request) -> DeviceRef:
    return _device_ref(request.match_info["pk"], request.match_info["dn"], "device")


async def update_device(request: web.Request) -> web.Response:
    body = await _json_object(request)
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise InvalidInput("enabled", "must be true or false")
    record = await _service(request).set_device_enabled(_path_device(request), enabled)
    return web.json_response(device_view(record))


async def delete_device(request: web.Request) -> web.Response:
    await _service(request).delete_device(_path_device(request))
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    secret = None
    if request.can_read_body:
        body = await _json_object(request)
        secret = _string(body.get("device_secret"), "device_secret", max_len=128, required=False)
    ref = _path_device(request)
    new = await _service(request).rotate_secret(ref, secret)
    return web.json_response(
        {"product_key": ref.product_key, "device_name": ref.device_name, "device_secret": new}
    )


async def import_devices(request: web.Request) -> web.Response:
    """CSV body `product_key,device_name[,device_secret]`; answers the created devices with their secrets."""
    if request.content_type not in ("text/csv", "text/plain"):
        raise InvalidInput("body", "must be text/csv: product_key,device_name[,device_secret] per line")
    raw = await request.content.read(_IMPORT_MAX + 1)
    if len(raw) > _IMPORT_MAX:
        raise InvalidInput("body", f"is larger than {_IMPORT_MAX} bytes; split the file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput("body", "is not UTF-8") from e
    result = await _service(request).import_devices(text)
    return web.json_response(
        {
            "created": [
                {"product_key": r.product_key, "device_name": r.device_name, "device_secret": secret}
                for r, secret in result.created
            ],
            "existing": result.existing,
            "errors": [{"line": line, "message": message} for line, message in result.errors],
        },
        status=200,
    )


async def add_firmware(request: web.Request) -> web.Response:
    """Multipart upload; the file streams to the store as it arrives, fields may come in any order."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("body", "must be multipart/form-data with a 'file' part")
    service = _service(request)
    reader = await request.multipart()
    fields: dict[str, str] = {}
    blob: Blob | None = None
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("body", "nested multipart is not accepted")
            name = part.name or ""
            if name == "file":
                if blob is not None:
                    raise InvalidInput("file", "give exactly one file")
                blob = await _store_stream(service, part)
                continue
            if name in fields:
                raise InvalidInput(name, "given twice")
            value = await part.read_chunk(4097)
            if len(value) > 4096 or await part.read_chunk(1):
                raise InvalidInput(name, "is longer than 4096 bytes")
            try:
                fields[name] = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInput(name, "is not UTF-8") from e
        if blob is None:
            raise InvalidInput("file", "is required")
        firmware = await service.add_firmware(blob, **_firmware_fields(fields))
    except BaseException:
        if blob is not None:
            await service.discard_upload(blob)
        raise
    return web.json_response(firmware_view(firmware), status=201)


async def _store_stream(service: OtaService, part: BodyPartReader) -> Blob:
    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await part.read_chunk(_CHUNK):
            yield chunk

    try:
        return await service.store.put(chunks())
    except BlobTooLarge as e:
        raise web.HTTPRequestEntityTooLarge(
            max_size=service.store.max_size, actual_size=service.store.max_size + 1, text=str(e)
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
    }


async def list_firmware(request: web.Request) -> web.Response:
    items = await _service(request).repo.list_firmware(request.query.get("product_key"))
    return web.json_response([firmware_view(f) for f in items])


async def show_firmware(request: web.Request) -> web.Response:
    return web.json_response(firmware_view(await _service(request).repo.get_firmware(_int_path(request))))


async def delete_firmware(request: web.Request) -> web.Response:
    await _service(request).delete_firmware(_int_path(request))
    return web.Response(status=204)


async def create_job(request: web.Request) -> web.Response:
    body = await _json_object(request)
    fw = body.get("firmware_id")
    if isinstance(fw, bool) or not isinstance(fw, int):
        raise InvalidInput("firmware_id", "must be an integer")
    try:
        job_type = JobType(body.get("type", "static"))
    except ValueError as e:
        raise InvalidInput("type", "must be 'static', 'dynamic' or 'verify'") from e
    devices: list[DeviceRef] | None = None
    if body.get("devices") is not None:
        raw = body["devices"]
        if not isinstance(raw, list) or not raw:
            raise InvalidInput("devices", "must be a non-empty list of 'product_key/device_name'")
        devices = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                raise InvalidInput(f"devices[{i}]", "must be a 'product_key/device_name' string")
            try:
                devices.append(DeviceRef.parse(item))
            except InvalidDeviceRef as e:
                raise InvalidInput(f"devices[{i}]", str(e)) from e
    src_versions = body.get("src_versions") or []
    if not isinstance(src_versions, list) or not all(isinstance(v, str) and v for v in src_versions):
        raise InvalidInput("src_versions", "must be a list of version strings")
    timeout = body.get("timeout_minutes")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise InvalidInput("timeout_minutes", "must be a positive number")
    job = await _service(request).create_job(fw, job_type, devices, src_versions, timeout)
    return web.json_response(job_view(job), status=201)


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response([job_view(j) for j in await _service(request).repo.list_jobs()])


async def show_job(request: web.Request) -> web.Response:
    return web.json_response(job_view(await _service(request).repo.get_job(_int_path(request))))


async def job_tasks(request: web.Request) -> web.Response:
    service = _service(request)
    job_id = _int_path(request)
    await service.repo.get_job(job_id)
    return web.json_response([task_view(t) for t in await service.repo.tasks_of_job(job_id)])


async def cancel_job(request: web.Request) -> web.Response:
    return web.json_response(job_view(await _service(request).cancel_job(_int_path(request))))
