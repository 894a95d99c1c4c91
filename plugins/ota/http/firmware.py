"""`/api/v1/firmware`: upload (streamed to the store, one file or a multi-file package), list, show, delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from firmware_store import Blob, BlobTooLarge
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.errors import InvalidInput
from plugins.ota.core.messages import MAX_VERSION_LEN
from plugins.ota.core.messages import MODULE_PATTERN as _MODULE
from plugins.ota.core.model import DEFAULT_MODULE, MAX_PACKAGE_FILES, SignMethod
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef
from plugins.ota.http.inputs import CHUNK, int_path, ota_app, page_of, paged, string
from plugins.ota.http.views import firmware_view

FIELD_MAX = 4096  # bytes of one multipart form field


async def add_firmware(request: web.Request) -> web.Response:
    """Multipart upload; each file streams to the store as it arrives, fields may come in any order. One
    'file' part is a firmware; several (up to 20, each named by its filename) are a multi-file package."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("body", "must be multipart/form-data with a 'file' part")
    service = ota_app(request)
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
            if part.name is None:  # no Content-Disposition, or one aiohttp could not parse (it warned)
                raise InvalidInput("body", "every part needs a Content-Disposition: form-data; name=...")
            name = part.name
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
    """The next part, with aiohttp's framing errors answered as a 422 naming the body. (A malformed
    Content-Disposition is only a warning to aiohttp, which then leaves the part nameless; where warnings
    are errors, the warning is that 422 too.)"""
    try:
        return await reader.next()
    except (ValueError, HttpProcessingError, BadContentDispositionHeader, BadContentDispositionParam) as e:
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
        while chunk := await part.read_chunk(CHUNK):
            yield chunk

    try:
        return await service.firmware.put_blob(chunks())
    except BlobTooLarge as e:
        raise web.HTTPRequestEntityTooLarge(
            max_size=service.firmware.max_size, actual_size=service.firmware.max_size + 1, text=str(e)
        ) from e


def _firmware_fields(fields: dict[str, str]) -> dict[str, Any]:
    product_key = string(fields.get("product_key"), "product_key")
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
        "version": string(fields.get("version"), "version", max_len=MAX_VERSION_LEN),
        "module": module,
        "sign_method": sign_method,
        "src_version": string(
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
    page = page_of(request)
    items, total = await ota_app(request).firmware.page(product_key, limit=page.limit, offset=page.offset)
    return paged(request, page, [firmware_view(f) for f in items], total)


async def show_firmware(request: web.Request) -> web.Response:
    return web.json_response(firmware_view(await ota_app(request).firmware.get(int_path(request))))


async def delete_firmware(request: web.Request) -> web.Response:
    await ota_app(request).firmware.delete(int_path(request))
    return web.Response(status=204)
