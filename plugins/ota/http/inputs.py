"""What a handler reads from a request: the app layer it talks to, bodies read whole within a limit, JSON
fields checked one by one (a problem is an `InvalidInput` naming the field, answered 422), path ids and
devices, and the paging of lists."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.credentials import secret_problem
from plugins.ota.core.errors import InvalidInput, NotFound
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef

SERVICE = web.AppKey("service", OtaApp)


def ota_app(request: web.Request) -> OtaApp:
    """The app layer behind this API."""
    return request.app[SERVICE]


CHUNK = 256 * 1024
JSON_MAX = 1024 * 1024  # bytes of a JSON request body
ID_MAX = 2**63 - 1


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, read until its end (a single `read(n)` returns only what has arrived);
    413 as soon as it exceeds `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit, request.content_length)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(limit, size)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int, size: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=size, text=f"the body is larger than {limit} bytes"
    )


async def json_object(request: web.Request) -> dict[str, Any]:
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


def string(value: Any, field: str, *, max_len: int = 64, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(field, "must be a non-empty string")
    if len(value) > max_len or not value.isprintable():
        raise InvalidInput(field, f"must be at most {max_len} printable characters")
    return value


def device_secret(value: Any) -> str | None:
    """A device secret given in a body (None: generate one)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("device_secret", "must be a string")
    problem = secret_problem(value)
    if problem:
        raise InvalidInput("device_secret", problem)
    return value


def device_ref(pk: Any, dn: Any, field: str) -> DeviceRef:
    try:
        return DeviceRef(pk, dn)
    except InvalidDeviceRef as e:
        raise InvalidInput(field, str(e)) from e


def int_path(request: web.Request, name: str = "id") -> int:
    text = request.match_info[name]
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"{text!r} is not an id")
    return int(text)


# ---------------------------------------------------------------------------------------- handlers


PAGE_DEFAULT = 1000
PAGE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Page:
    limit: int
    offset: int


def page_of(request: web.Request) -> Page:
    q = request.query
    return Page(
        query_int(q.get("limit"), "limit", PAGE_DEFAULT, 1, PAGE_MAX),
        query_int(q.get("offset"), "offset", 0, 0, 10**12),
    )


def paged(request: web.Request, page: Page, items: list[Any], total: int) -> web.Response:
    headers = {"X-Total-Count": str(total)}
    if items and page.offset + len(items) < total:
        following = request.rel_url.update_query(limit=page.limit, offset=page.offset + len(items))
        headers["Link"] = f'<{following}>; rel="next"'
    return web.json_response(items, headers=headers)


def query_int(value: str | None, field: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise InvalidInput(field, f"must be a whole number from {low} to {high}")
    return int(value)


def path_device(request: web.Request) -> DeviceRef:
    return device_ref(request.match_info["pk"], request.match_info["dn"], "device")


def number(body: dict[str, Any], field: str, *, low: float, high: float, integer: bool = False) -> Any:
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


def or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def flag(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise InvalidInput(field, "must be true or false")
    return value


LAST_TIME = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()


def time_field(body: dict[str, Any], field: str) -> float | None:
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
        if not 0 <= stamp < LAST_TIME:  # 9999-12-31T23:59:50-23:00 is already year 10000 in UTC
            raise InvalidInput(field, "must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z")
        return stamp
    raise InvalidInput(field, "must be an ISO 8601 time such as 2026-12-01T02:00:00Z")


def device_list(raw: Any, field: str) -> tuple[DeviceRef, ...]:
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


async def optional_body(request: web.Request) -> dict[str, Any]:
    return await json_object(request) if request.can_read_body else {}


MAX_GROUPS = 20  # groups of one device
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def group_name(value: object, field: str) -> str:
    """A device group's name: 1-64 of A-Z, a-z, 0-9, `.`, `_`, `-`, starting with a letter or a digit."""
    if not isinstance(value, str) or not _GROUP.fullmatch(value):
        raise InvalidInput(field, "must be a group name: 1-64 of A-Z, a-z, 0-9, '.', '_', '-'")
    return value
