"""The device-facing HTTPS download endpoint (SPEC §5), on aiohttp.

`GET`/`HEAD /firmware/<resource>?s=&e=&t=`: 403 with no bytes for a tampered, expired or foreign link;
otherwise aiohttp's `FileResponse` answers 200 with `Content-Length`, 206 for `Range`, 416 when
unsatisfiable, streaming from disk (never the whole file in memory, never chunked encoding).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY, ETag
from aiohttp.web_request import BaseRequest

from firmware_store.links import LinkSigner
from firmware_store.store import Blob, FirmwareStore

log = logging.getLogger("ota.download")

# Given a resource id: its blob, or None when there is no such firmware.
Resolve = Callable[[str], Awaitable[Blob | None]]
# Given (resource, subject): may this subject download this resource now?
Authorize = Callable[[str, str], Awaitable[bool]]

READ_CHUNK = 256 * 1024


class _HashedFileResponse(web.FileResponse):
    """A FileResponse whose ETag is the blob's sha256 rather than aiohttp's mtime-size tag."""

    def __init__(self, path: Path, sha256: str) -> None:
        super().__init__(path, chunk_size=READ_CHUNK)
        self._sha256 = sha256

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:  # aiohttp assigns its own tag in prepare()
        web.StreamResponse.etag.fset(self, self._sha256)  # type: ignore[attr-defined]

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """Answer `If-Match`/`If-None-Match` against the sha256 (aiohttp would compare its own tag)."""
        if_none_match, if_match = request.if_none_match, request.if_match
        if if_none_match is not None and any(t.value in (self._sha256, ETAG_ANY) for t in if_none_match):
            self.set_status(304)
            self.etag = self._sha256
            return await web.StreamResponse.prepare(self, request)
        if if_match is not None and not any(
            not t.is_weak and t.value in (self._sha256, ETAG_ANY) for t in if_match
        ):
            self.set_status(412)
            self.content_length = 0
            return await web.StreamResponse.prepare(self, request)
        if if_none_match is None and if_match is None:
            return await super().prepare(request)
        headers = request.headers.copy()
        headers.popall(hdrs.IF_MATCH, None)
        headers.popall(hdrs.IF_NONE_MATCH, None)
        return await super().prepare(request.clone(headers=headers))


def download_app(
    store: FirmwareStore,
    signer: LinkSigner,
    resolve: Resolve,
    authorize: Authorize,
    clock: Callable[[], float],
) -> web.Application:
    async def serve(request: web.Request) -> web.StreamResponse:
        resource = request.match_info["resource"]
        claims = signer.check(resource, dict(request.query), clock())
        if claims is None:
            log.warning("download refused from %s: bad or expired link for %s", request.remote, resource[:32])
            return web.Response(status=403, text="forbidden\n")
        blob = await resolve(resource)
        if blob is None or not await authorize(resource, claims.subject):
            log.warning(
                "download refused for %s: %s may not download %s", request.remote, claims.subject, resource
            )
            return web.Response(status=403, text="forbidden\n")
        if not await store.verify(blob):
            log.error("firmware %s is corrupt on disk (sha256 %s): not served", resource, blob.sha256)
            return web.Response(status=500, text="firmware file failed verification\n")
        return _HashedFileResponse(store.path(blob.sha256), blob.sha256)

    app = web.Application()
    app.router.add_get("/firmware/{resource}", serve)  # add_get also answers HEAD
    return app


async def start_site(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Start `app` on host:port (port 0 picks a free one); returns the runner and the bound address."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    host_bound, port_bound = runner.addresses[0][:2]
    return runner, (str(host_bound), int(port_bound))
