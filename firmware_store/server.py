"""The device-facing HTTPS download endpoint, on aiohttp.

`GET`/`HEAD /firmware/<resource>?s=&e=&t=`: 403 with no bytes for a tampered, expired or foreign link;
503 for a blob whose file no longer matches its digests; otherwise aiohttp's `FileResponse` answers 200
with `Content-Length`, 206 for one satisfiable byte range, streaming from disk (never the whole file in
memory, never chunked encoding). A range that selects nothing is 416 with `Content-Range: bytes */<size>`;
a Range header with another unit, several ranges or bad syntax is ignored (RFC 9110 §14.2): 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import ssl
import struct
import termios
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from aiohttp import StreamReader, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY, ETag
from aiohttp.web_request import BaseRequest

from firmware_store.links import LinkSigner
from firmware_store.slots import RETRY_AFTER_S, DownloadSlots
from firmware_store.store import Blob, FirmwareStore
from firmware_store.tls import LISTEN_BACKLOG, HandshakeLog, tls_acceptor

log = logging.getLogger("ota.download")

# Given a resource id: its blob, or None when there is no such firmware.
Resolve = Callable[[str], Awaitable[Blob | None]]
# Given (resource, subject): may this subject download this resource now?
Authorize = Callable[[str, str], Awaitable[bool]]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

READ_CHUNK = 256 * 1024


@dataclass
class DownloadStats:
    """What the endpoint has served, for whoever reports metrics (this package imports no metrics library).

    `bytes_sent` counts the bodies of completed 200/206 responses to GET; a download cut off mid-way
    counts as `interrupted` with no bytes (its resumed Range request counts when it completes); `busy`
    counts the downloads refused because the endpoint served its `DownloadSlots` capacity already.
    """

    OUTCOMES = ("ok", "interrupted", "refused", "throttled", "busy", "corrupt")

    active: int = 0
    bytes_sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


TLS_CHUNK = 128 * 1024  # bytes read and encrypted at a time over TLS (and buffered per download at most)


class _HashedFileResponse(web.FileResponse):
    """A FileResponse whose ETag is the blob's sha256 rather than aiohttp's mtime-size tag, and whose
    body goes out over TLS in large reads on the event loop.

    Over TLS there is no sendfile: asyncio's fallback hands every block to a worker thread and back, and
    each hand-off waits for the GIL behind the event loop (the broker's MQTT and database work), so
    downloads crawl and steal CPU. Firmware blobs are read in `TLS_CHUNK` pieces straight from the page
    cache (the kernel is asked to read ahead first), each encrypted in one call; aiohttp still does the
    headers, ranges and conditional requests. Plain HTTP keeps the kernel's sendfile.
    """

    def __init__(self, path: Path, sha256: str) -> None:
        super().__init__(path, chunk_size=READ_CHUNK)
        self._sha256 = sha256

    async def _sendfile(
        self, request: BaseRequest, fobj: Any, offset: int, count: int
    ) -> AbstractStreamWriter:
        transport = request.transport
        if transport is None or transport.get_extra_info("ssl_object") is None:
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fobj.fileno(), offset, count, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fobj.fileno(), offset, count, os.POSIX_FADV_WILLNEED)
        fobj.seek(offset)
        while count > 0:
            chunk = fobj.read(min(TLS_CHUNK, count))
            if not chunk:
                break
            await writer.write(chunk)  # waits while the client's socket buffer is full
            count -= len(chunk)
        await writer.drain()
        return writer

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:  # aiohttp assigns its own tag in prepare()
        web.StreamResponse.etag.fset(self, self._sha256)  # type: ignore[attr-defined]

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        """Answer `If-Match`/`If-None-Match` against the sha256 (aiohttp would compare its own tag)."""
        if self.prepared:  # FileResponse.prepare is not idempotent; the handler already streamed it
            return self._payload_writer
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


class _Unsatisfiable:
    """A Range that selects no byte of the file: 416."""


UNSATISFIABLE = _Unsatisfiable()


def byte_range(request: BaseRequest, size: int) -> slice | _Unsatisfiable | None:
    """What the request's `Range` asks of a file of `size` bytes (RFC 9110 §14.2): None for the whole file
    (no Range, or one to ignore: another unit, several ranges, bad syntax), UNSATISFIABLE for a single
    byte range that selects nothing (a start at or past the end, a zero-length suffix), else the range
    as aiohttp parses it (`request.http_range`), which FileResponse then serves as 206."""
    header = request.headers.get(hdrs.RANGE)
    if header is None:
        return None
    try:
        wanted = request.http_range  # one `bytes=` range or ValueError (which RFC 9110 says to ignore)
    except ValueError:
        return None
    spec = header.partition("=")[2]
    if spec.startswith("-"):  # a suffix: the last N bytes (`bytes=-0` parses as slice(0, None))
        if int(spec[1:]) == 0:
            return UNSATISFIABLE
        return wanted if size else None
    if wanted.start is None or wanted.start >= size:
        return UNSATISFIABLE
    return wanted


def download_app(
    store: FirmwareStore,
    signer: LinkSigner,
    resolve: Resolve,
    authorize: Authorize,
    clock: Callable[[], float],
    *,
    max_per_subject: int = 2,
    stats: DownloadStats | None = None,
    slots: DownloadSlots | None = None,
) -> web.Application:
    """The download endpoint: links checked by `signer`, blobs found by `resolve`, each download allowed by
    `authorize`, at most `max_per_subject` at once per device (429) and, with `slots`, at most its capacity
    at once in all (503 with `Retry-After`: the client comes back, nothing stalls)."""
    active: Counter[str] = Counter()
    stats = DownloadStats() if stats is None else stats
    busy = _Busy()

    async def serve(request: web.Request) -> web.StreamResponse:
        resource = request.match_info["resource"]
        claims = signer.check(resource, dict(request.query), clock())
        if claims is None:
            stats.outcomes["refused"] += 1
            log.warning("download refused from %s: bad or expired link for %s", request.remote, resource[:32])
            return web.Response(status=403, text="forbidden\n")
        # The subject is whom the link was signed for (the OTA service signs links for a device, `pk/dn`).
        about = {"device": claims.subject}
        blob = await resolve(resource)
        if blob is None or not await authorize(resource, claims.subject):
            stats.outcomes["refused"] += 1
            log.warning(
                "download refused for %s: %s may not download %s",
                request.remote,
                claims.subject,
                resource,
                extra=about,
            )
            return web.Response(status=403, text="forbidden\n")
        check = await store.check(blob)
        if not check.ok:
            return _corrupt(stats, resource, blob, fresh=check.fresh, about=about)
        if active[claims.subject] >= max_per_subject:
            return _throttled(stats, claims.subject, max_per_subject, about)
        if slots is not None and not slots.acquire(clock()):
            return busy.refuse(stats, slots, clock())
        active[claims.subject] += 1
        stats.active += 1
        outcome = "interrupted"
        try:
            wanted = byte_range(request, blob.size)
            response: web.StreamResponse
            if wanted is UNSATISFIABLE:
                response = web.Response(
                    status=416,
                    text="range not satisfiable\n",
                    headers={hdrs.CONTENT_RANGE: f"bytes */{blob.size}"},
                )
                await response.prepare(request)
            else:
                if wanted is None and hdrs.RANGE in request.headers:  # ignored: the whole file, 200
                    headers = request.headers.copy()
                    headers.popall(hdrs.RANGE)
                    request = request.clone(headers=headers)
                response = _HashedFileResponse(store.path(blob.sha256), blob.sha256)
                await response.prepare(request)  # streams the file; counted as under way until done
            outcome = "ok"
            if request.method == hdrs.METH_GET and response.status in (200, 206):
                stats.bytes_sent += response.content_length or 0
            return response
        finally:
            if slots is not None:
                slots.release()
            stats.active -= 1
            stats.outcomes[outcome] += 1
            active[claims.subject] -= 1
            if not active[claims.subject]:
                del active[claims.subject]

    app = web.Application()
    app.router.add_get("/firmware/{resource}", serve)  # add_get also answers HEAD
    return app


def _throttled(stats: DownloadStats, subject: str, most: int, about: dict[str, str]) -> web.Response:
    """The answer to a device that already runs its `max_per_subject` downloads: 429."""
    stats.outcomes["throttled"] += 1
    log.warning("download refused for %s: already %d download(s) under way", subject, most, extra=about)
    return web.Response(status=429, text="too many concurrent downloads\n", headers={"Retry-After": "5"})


def _corrupt(
    stats: DownloadStats, resource: str, blob: Blob, *, fresh: bool, about: dict[str, str]
) -> web.Response:
    """The answer to a download of a blob whose file no longer matches its digests: 503, logged once per
    change of the file (`fresh`); later refusals of the same file are quiet."""
    stats.outcomes["corrupt"] += 1
    if fresh:
        log.error(
            "firmware %s is corrupt on disk (sha256 %s): not served until the file is restored",
            resource,
            blob.sha256,
            extra=about,
        )
    return web.Response(status=503, text="firmware file failed verification\n", headers={"Retry-After": "60"})


class _Busy:
    """The answer to a download that finds every slot taken: 503 with `Retry-After`, counted, and logged
    at most once per `LOG_EVERY_S` (a campaign can be refused thousands of times a minute)."""

    LOG_EVERY_S = 10.0

    def __init__(self) -> None:
        self._next_log = float("-inf")

    def refuse(self, stats: DownloadStats, slots: DownloadSlots, now: float) -> web.Response:
        stats.outcomes["busy"] += 1
        if now >= self._next_log:
            self._next_log = now + self.LOG_EVERY_S
            log.warning(
                "downloads refused for capacity: %d at once at most (max_downloads); %d refused so far",
                slots.capacity,
                slots.refused,
            )
        return web.Response(
            status=503,
            text="too many downloads at once; retry later\n",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


class BodyStalled(ConnectionResetError):
    """The client sent no part of its request body within the deadline; the connection was closed (and
    logged once, by the deadline)."""


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to `transport` that the peer has not yet taken: the transport's buffer plus, on Linux,
    the socket's send queue (a slow reader leaves megabytes in the kernel after the handler is done)."""
    pending = int(transport.get_write_buffer_size())  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    outq = getattr(termios, "TIOCOUTQ", None)
    if sock is not None and outq is not None:
        with contextlib.suppress(OSError, ValueError):
            pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), outq, b"\0\0\0\0"))[0]
    return pending


class _HeadDeadline(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: the client must send a complete request head within
    `timeout` of connecting or of having read its previous response, else the connection is closed
    (slow-loris); a client that reads its response slowly is not cut off while it makes progress, one that
    stops reading for `timeout` is (as nginx's `send_timeout`).
    While a request body is being received, each piece must come within `timeout` of the one before: a
    stalled body is failed with `BodyStalled` and its connection closed. Time the client spends waiting
    on us (reading paused because the handler has not taken the data yet) does not count."""

    def __init__(
        self, inner: asyncio.Protocol, timeout: float, registry: dict[object, _HeadDeadline]
    ) -> None:
        self._inner = inner
        self._timeout = timeout
        self._registry = registry
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._body: StreamReader | None = None
        self._unsent = -1  # bytes of our response the client had not read at the last deadline
        self._served = 0  # requests whose head arrived on this connection
        self._waiting = False  # bytes of the next request head have arrived (it is not idle)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._registry[transport] = self
        self.arm()
        self._inner.connection_made(transport)

    def arm(self) -> None:
        """Wait for the next request head (once the client has read the response before it)."""
        self._body = None
        self._unsent = -1
        self._waiting = False
        self._start_timer()

    def disarm(self) -> None:
        self._body = None
        self._stop_timer()

    def await_body(self, body: StreamReader) -> None:
        """The head arrived; wait for the rest of its body, if any."""
        self._served += 1
        self.disarm()
        if not body.is_eof():
            self._body = body
            self._start_timer()

    def _start_timer(self) -> None:
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        body = self._body
        if body is None:
            unsent = _unsent(transport)
            if unsent != self._unsent and (unsent or self._unsent > 0):
                # The client is still reading our last response (or finished it since the last look): its
                # next request head is due a full `timeout` after that, not before.
                self._unsent = unsent
                self._start_timer()
                return
            if unsent:
                log.warning(
                    "closed a connection from %s: it stopped reading its response (%d bytes unsent for %gs)",
                    peer,
                    unsent,
                    self._timeout,
                )
            elif self._served and not self._waiting:  # an idle keep-alive connection: ordinary
                log.debug(
                    "closed an idle connection from %s after %d request(s): none more within %gs",
                    peer,
                    self._served,
                    self._timeout,
                )
            else:
                log.warning(
                    "closed a connection from %s: no complete request within %gs", peer, self._timeout
                )
        elif body.is_eof():
            self._body = None
            return
        elif not cast(asyncio.ReadTransport, transport).is_reading():
            self._start_timer()  # the handler is behind, not the client
            return
        else:
            log.warning(
                "closed a connection from %s: its request body stalled (nothing for %gs)", peer, self._timeout
            )
            body.set_exception(BodyStalled(f"no part of the request body within {self._timeout:g}s"))
        transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self._registry.pop(self._transport, None)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._body is None and self._timer is not None:
            self._waiting = True  # part of a request head: no longer idle
        self._inner.data_received(data)
        if self._body is not None:
            if self._body.is_eof():
                self.disarm()
            else:
                self._start_timer()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


_DEADLINES = web.AppKey("deadlines", dict)


@web.middleware
async def _request_head_arrived(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app[_DEADLINES].get(request.transport)
    if guard is not None:
        guard.await_body(request.content)
    try:
        response = await handler(request)
        if not response.prepared:
            await response.prepare(request)
        return response
    finally:
        if guard is not None:
            guard.arm()


class Site:
    """A running aiohttp app on one listening socket."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self._runner = runner
        self._server = server
        host, port = server.sockets[0].getsockname()[:2]
        self.address = (str(host), int(port))

    async def close(self) -> None:
        self._server.close()
        await self._runner.cleanup()
        await self._server.wait_closed()


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    header_timeout_s: float = 10.0,
) -> Site:
    """Serve `app` on host:port (port 0 picks a free one). A client gets `header_timeout_s` for the TLS
    handshake, for each request head and between pieces of a request body, so slow, idle or stalled
    clients cannot hold connections open."""
    deadlines: dict[object, _HeadDeadline] = {}
    app[_DEADLINES] = deadlines
    app.middlewares.insert(0, _request_head_arrived)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    aiohttp_server = runner.server
    assert aiohttp_server is not None
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.Protocol:
        return _HeadDeadline(aiohttp_server(), header_timeout_s, deadlines)

    if ssl_context is not None:  # a failed handshake is logged, not dropped silently as with ssl=
        failures = HandshakeLog(f"https listener {host}:{port}")
        factory = tls_acceptor(factory, ssl_context, failures, handshake_timeout_s=header_timeout_s)
    server = await loop.create_server(factory, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
    return Site(runner, server)
