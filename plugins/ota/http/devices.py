"""`/api/v1/devices`: add, list, show, enable or disable, delete, rotate a secret, import a CSV."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from plugins.ota.core.errors import InvalidInput
from plugins.ota.http.inputs import (
    MAX_GROUPS,
    device_ref,
    device_secret,
    group_name,
    json_object,
    ota_app,
    page_of,
    paged,
    path_device,
    read_body,
)
from plugins.ota.http.views import device_view, task_view

IMPORT_MAX = 64 * 1024 * 1024  # bytes of a CSV import


async def add_device(request: web.Request) -> web.Response:
    body = await json_object(request)
    ref = device_ref(body.get("product_key"), body.get("device_name"), "product_key/device_name")
    secret = device_secret(body.get("device_secret"))
    record = await ota_app(request).devices.add(ref, secret)
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
    name = q.get("name") or None
    if name is not None and len(name) > 64:
        raise InvalidInput("name", "must be at most 64 characters (a part of a device name)")
    filters: dict[str, Any] = {
        "product_key": q.get("product_key"),
        "module": q.get("module"),
        "version": q.get("version"),
        "online": online,
        "name": name,
        "group": None if q.get("group") is None else group_name(q["group"], "group"),
    }
    page = page_of(request)
    admin = ota_app(request).devices
    records, total = await admin.page(**filters, limit=page.limit, offset=page.offset)
    groups = await admin.groups_of([d.device for d in records])
    return paged(request, page, [device_view(d) | {"groups": groups[d.device]} for d in records], total)


# Every list is paged: `limit` (1-10,000, default 1,000) and `offset` in the query; the answer stays a
# JSON array, with `X-Total-Count` (how many the whole list holds) and, while more follow, a


async def show_device(request: web.Request) -> web.Response:
    ref = device_ref(request.match_info["pk"], request.match_info["dn"], "device")
    service = ota_app(request)
    record, tasks = await service.devices.get(ref)
    groups = (await service.devices.groups_of([ref]))[ref]
    return web.json_response(
        {**device_view(record), "groups": groups, "tasks": [task_view(t) for t in tasks]}
    )


async def update_device(request: web.Request) -> web.Response:
    """`{"enabled": bool}` and/or `{"groups": [name, ...]}` (its groups, replaced whole)."""
    body = await json_object(request)
    ref = path_device(request)
    admin = ota_app(request).devices
    if "enabled" not in body and "groups" not in body:
        raise InvalidInput("enabled", "give enabled (true or false) and/or groups (a list of group names)")
    enabled = body.get("enabled")
    if "enabled" in body and not isinstance(enabled, bool):
        raise InvalidInput("enabled", "must be true or false")
    groups = body.get("groups")
    if "groups" in body:
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise InvalidInput("groups", f"must be a list of at most {MAX_GROUPS} group names")
        groups = [group_name(g, f"groups[{i}]") for i, g in enumerate(groups)]
    kept = await admin.set_groups(ref, groups) if groups is not None else None
    record = await admin.set_enabled(ref, enabled) if isinstance(enabled, bool) else await admin.record(ref)
    if kept is None:
        kept = (await admin.groups_of([ref]))[ref]
    return web.json_response(device_view(record) | {"groups": kept})


async def delete_device(request: web.Request) -> web.Response:
    await ota_app(request).devices.delete(path_device(request))
    return web.Response(status=204)


async def show_secret(request: web.Request) -> web.Response:
    """`GET /devices/{pk}/{dn}/secret`: the device's secret (admins; recorded in the audit log)."""
    ref = path_device(request)
    secret = await ota_app(request).devices.secret(ref)
    return web.json_response(
        {"product_key": ref.product_key, "device_name": ref.device_name, "device_secret": secret}
    )


async def rotate_secret(request: web.Request) -> web.Response:
    secret = None
    if request.can_read_body:
        body = await json_object(request)
        secret = device_secret(body.get("device_secret"))
    ref = path_device(request)
    new = await ota_app(request).devices.rotate_secret(ref, secret)
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
    result = await ota_app(request).devices.import_csv(text)
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
