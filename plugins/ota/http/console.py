"""The operator's console: static files (console/ beside this module) served with a strict CSP."""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("ota.api")

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


def assets() -> dict[str, Asset]:
    folder = importlib.resources.files("plugins.ota.http").joinpath("console")
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
