"""The HTTPS download endpoint over real TLS on 127.0.0.1.

The store, the link signer, aiohttp and TLS are real; only `resolve` and `authorize` (the questions the
endpoint asks its caller) and the clock are the test's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict

from firmware_store import Blob, FirmwareStore, LinkSigner
from firmware_store.server import Site, download_app, start_site

KEY = b"download-link-key, 32 bytes long"
TTL_S = 3600
T0 = 1_732_851_000.0
FIRMWARE = random.Random(5).randbytes(1000)
OTHER_FIRMWARE = random.Random(6).randbytes(700)
SUBJECT = "pk/dev1"
BIG_CHUNK = 64 * 1024
BIG_CHUNKS = 128  # 8 MiB


@dataclass
class Clock:
    """The endpoint's clock; tests move it instead of sleeping."""

    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Catalog:
    """The caller's side: which blob a resource id names, and who may download it."""

    blobs: dict[str, Blob] = field(default_factory=dict)
    grants: set[tuple[str, str]] = field(default_factory=set)

    async def resolve(self, resource: str) -> Blob | None:
        return self.blobs.get(resource)

    async def authorize(self, resource: str, subject: str) -> bool:
        return (resource, subject) in self.grants

    def add(self, resource: str, blob: Blob, *subjects: str) -> None:
        self.blobs[resource] = blob
        self.grants |= {(resource, s) for s in subjects}


@dataclass
class Endpoint:
    """A running download endpoint and a signer (same key) that mints links pointing at it."""

    base: str
    minter: LinkSigner
    clock: Clock

    def link(self, resource: str, subject: str = SUBJECT) -> str:
        return self.minter.mint(resource, subject, self.clock.now)


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]  # case-insensitive, like HTTP
    body: bytes


Start = Callable[[FirmwareStore], Awaitable[Endpoint]]


async def stream(data: bytes, size: int = 300) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def with_query(url: str, **changes: str) -> str:
    """`url` with some query parameters replaced."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query)) | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_resource(url: str, resource: str) -> str:
    """`url` with the same query but pointing at another resource."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/firmware/{resource}"))


def assert_refused(reply: Reply, status: int, *secrets: bytes) -> None:
    """The reply has `status` and carries none of the firmware bytes."""
    assert reply.status == status, reply
    assert "Content-Range" not in reply.headers
    for secret in secrets:
        assert secret[:16] not in reply.body
        assert secret[-16:] not in reply.body
        assert len(reply.body) < len(secret)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ssl(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
async def http(ca: trustme.CA) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that trusts the test CA (and nothing else)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        yield session


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def catalog() -> Catalog:
    return Catalog()


@pytest.fixture
def store(tmp_path: Path) -> FirmwareStore:
    s = FirmwareStore(tmp_path / "firmware", max_size=64 << 20)
    s.open()
    return s


@pytest.fixture
async def start(server_ssl: ssl.SSLContext, catalog: Catalog, clock: Clock) -> AsyncIterator[Start]:
    """Starts download endpoints over a given store on 127.0.0.1:0; all are cleaned up afterwards."""
    sites: list[Site] = []

    async def _start(store: FirmwareStore) -> Endpoint:
        signer = LinkSigner(KEY, "https://unused.invalid", TTL_S)
        app = download_app(store, signer, catalog.resolve, catalog.authorize, clock)
        site = await start_site(app, "127.0.0.1", 0, server_ssl)
        sites.append(site)
        host, port = site.address
        base = f"https://{host}:{port}"
        return Endpoint(base, LinkSigner(KEY, base, TTL_S), clock)

    try:
        yield _start
    finally:
        for site in sites:
            await site.close()


@pytest.fixture
async def endpoint(start: Start, store: FirmwareStore) -> Endpoint:
    return await start(store)


@pytest.fixture
async def firmware(store: FirmwareStore, catalog: Catalog) -> Blob:
    """FIRMWARE stored as resource "fw-1" for SUBJECT, and OTHER_FIRMWARE as "fw-2" for SUBJECT too."""
    blob = await store.put(stream(FIRMWARE))
    catalog.add("fw-1", blob, SUBJECT)
    catalog.add("fw-2", await store.put(stream(OTHER_FIRMWARE)), SUBJECT)
    return blob


async def fetch(http: aiohttp.ClientSession, url: str, method: str = "GET", **headers: str) -> Reply:
    async with http.request(method, url, headers=headers) as r:
        return Reply(r.status, CIMultiDict(r.headers), await r.read())


async def test_get_serves_the_exact_bytes_with_content_length(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """GET answers 200 with the stored bytes, a Content-Length of the size and no chunked encoding."""
    reply = await fetch(http, endpoint.link("fw-1"))
    assert reply.status == 200
    assert reply.body == FIRMWARE
    assert reply.headers["Content-Length"] == str(firmware.size)
    assert "Transfer-Encoding" not in reply.headers
    assert "Content-Encoding" not in reply.headers


async def test_etag_is_the_sha256(http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob) -> None:
    """The ETag of a download is the firmware's sha256 (as a quoted strong tag)."""
    reply = await fetch(http, endpoint.link("fw-1"))
    assert reply.headers["ETag"] == f'"{firmware.sha256}"'


async def test_if_none_match_with_the_etag_is_not_modified(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A conditional GET with the ETag the endpoint advertised answers 304 without a body."""
    reply = await fetch(http, endpoint.link("fw-1"), **{"If-None-Match": f'"{firmware.sha256}"'})
    assert reply.status == 304
    assert reply.body == b""


async def test_if_match_with_the_etag_is_served(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A GET with If-Match on the advertised ETag is served (the precondition holds)."""
    reply = await fetch(http, endpoint.link("fw-1"), **{"If-Match": f'"{firmware.sha256}"'})
    assert reply.status == 200
    assert reply.body == FIRMWARE


async def test_head_answers_headers_without_a_body(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """HEAD answers 200 with the Content-Length and ETag of the firmware and an empty body."""
    reply = await fetch(http, endpoint.link("fw-1"), method="HEAD")
    assert reply.status == 200
    assert reply.headers["Content-Length"] == str(firmware.size)
    assert firmware.sha256 in reply.headers["ETag"]
    assert reply.body == b""


async def test_closed_range_is_partial_content(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """`Range: bytes=10-19` answers 206 with those ten bytes, Content-Range and Content-Length 10."""
    reply = await fetch(http, endpoint.link("fw-1"), Range="bytes=10-19")
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes 10-19/{firmware.size}"
    assert reply.headers["Content-Length"] == "10"
    assert reply.body == FIRMWARE[10:20]


async def test_open_range_is_the_tail(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """`Range: bytes=100-` answers 206 with everything from byte 100 on (how SDKs resume downloads)."""
    reply = await fetch(http, endpoint.link("fw-1"), Range="bytes=100-")
    assert reply.status == 206
    assert reply.headers["Content-Range"] == f"bytes 100-{firmware.size - 1}/{firmware.size}"
    assert reply.headers["Content-Length"] == str(firmware.size - 100)
    assert reply.body == FIRMWARE[100:]
    assert "Transfer-Encoding" not in reply.headers


@pytest.mark.parametrize("start_at", [len(FIRMWARE), len(FIRMWARE) + 1000])
async def test_range_past_the_end_is_unsatisfiable(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob, start_at: int
) -> None:
    """A range that starts at or past the end answers 416 with `Content-Range: bytes */<size>`."""
    reply = await fetch(http, endpoint.link("fw-1"), Range=f"bytes={start_at}-")
    assert reply.status == 416
    assert reply.headers.get("Content-Range") == f"bytes */{firmware.size}"
    assert FIRMWARE[:16] not in reply.body


async def test_tampered_signature_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A link with an altered tag answers 403 and no firmware bytes."""
    url = endpoint.link("fw-1")
    tag = dict(parse_qsl(urlsplit(url).query))["t"]
    bad = with_query(url, t=("B" if tag[0] == "A" else "A") + tag[1:])
    assert_refused(await fetch(http, bad), 403, FIRMWARE)


async def test_non_ascii_signature_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A link whose tag is not ASCII is a tampered link like any other: 403, not a server error."""
    bad = with_query(endpoint.link("fw-1"), t="ü" * 22)
    assert_refused(await fetch(http, bad), 403, FIRMWARE)


async def test_tampered_subject_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, catalog: Catalog, firmware: Blob
) -> None:
    """Re-addressing a link to another (even authorized) subject answers 403."""
    catalog.add("fw-1", firmware, "pk/dev2")
    bad = with_query(endpoint.link("fw-1"), s="pk/dev2")
    assert_refused(await fetch(http, bad), 403, FIRMWARE)


async def test_expired_link_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, clock: Clock, firmware: Blob
) -> None:
    """A link works until its expiry and answers 403 with no bytes from the expiry time on."""
    url = endpoint.link("fw-1")
    clock.now = T0 + TTL_S - 1
    assert (await fetch(http, url)).status == 200
    clock.now = T0 + TTL_S
    assert_refused(await fetch(http, url), 403, FIRMWARE)
    assert_refused(await fetch(http, url, Range="bytes=0-"), 403, FIRMWARE)


async def test_link_for_an_unauthorized_subject_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A correctly signed link for a subject that authorize() refuses answers 403."""
    url = endpoint.link("fw-1", subject="pk/intruder")
    assert_refused(await fetch(http, url), 403, FIRMWARE)


async def test_link_for_another_resource_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """The query of a link for fw-2 presented on fw-1 answers 403, though the subject may have both."""
    url = with_resource(endpoint.link("fw-2"), "fw-1")
    assert_refused(await fetch(http, url), 403, FIRMWARE, OTHER_FIRMWARE)


async def test_unknown_resource_is_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A well-signed link for a resource resolve() does not know answers 403."""
    reply = await fetch(http, endpoint.link("fw-deleted"))
    assert_refused(reply, 403, FIRMWARE, OTHER_FIRMWARE)


async def test_missing_link_parameters_are_forbidden(
    http: aiohttp.ClientSession, endpoint: Endpoint, firmware: Blob
) -> None:
    """A bare `/firmware/<resource>` without signature answers 403."""
    assert_refused(await fetch(http, f"{endpoint.base}/firmware/fw-1"), 403, FIRMWARE)


async def test_corrupted_blob_is_not_served(
    http: aiohttp.ClientSession, start: Start, store: FirmwareStore, firmware: Blob
) -> None:
    """After a restart, a blob whose file changed on disk answers 503 and none of the file's bytes."""
    path = store.path(firmware.sha256)
    corrupted = bytearray(FIRMWARE)
    corrupted[500] ^= 0x01
    path.write_bytes(bytes(corrupted))
    restarted = FirmwareStore(store.root, max_size=store.max_size)
    restarted.open()
    endpoint = await start(restarted)
    url = endpoint.link("fw-1")
    for headers in ({}, {"Range": "bytes=0-"}):
        reply = await fetch(http, url, **headers)
        assert_refused(reply, 503, bytes(corrupted))


async def test_truncated_blob_is_not_served(
    http: aiohttp.ClientSession, start: Start, store: FirmwareStore, firmware: Blob
) -> None:
    """After a restart, a blob cut short on disk answers 503 rather than a short download."""
    path = store.path(firmware.sha256)
    path.write_bytes(FIRMWARE[:-1])
    restarted = FirmwareStore(store.root, max_size=store.max_size)
    restarted.open()
    endpoint = await start(restarted)
    assert_refused(await fetch(http, endpoint.link("fw-1")), 503, FIRMWARE)


def _alter_in_place(path: Path, offset: int) -> bytes:
    """Flip one byte of the file in place, keeping its size; returns the new contents."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["flip one byte in place", "truncate", "append", "delete"])
async def test_a_blob_damaged_while_running_is_refused_and_logged_once(
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    store: FirmwareStore,
    firmware: Blob,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """A blob served once and then altered on disk (same size, cut short, grown, removed) is refused
    with 503 and none of its bytes from the next request on, without a restart; the ERROR is logged
    once however often it is asked for; the other blob is still served."""
    url = endpoint.link("fw-1")
    assert (await fetch(http, url)).body == FIRMWARE
    path = store.path(firmware.sha256)
    if damage == "flip one byte in place":
        _alter_in_place(path, 500)
    elif damage == "truncate":
        with path.open("r+b") as f:
            f.truncate(600)
    elif damage == "append":
        with path.open("ab") as f:
            f.write(b"\x00")
    else:
        path.unlink()
    for headers in ({}, {"Range": "bytes=0-"}, {"Range": "bytes=400-599"}, {}):
        assert_refused(await fetch(http, url, **headers), 503, FIRMWARE)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and firmware.sha256 in errors[0].getMessage()
    assert (await fetch(http, endpoint.link("fw-2"))).body == OTHER_FIRMWARE


async def test_a_restored_blob_is_served_again(
    http: aiohttp.ClientSession, endpoint: Endpoint, store: FirmwareStore, firmware: Blob
) -> None:
    """A blob refused for damage is served again once its file has its original bytes."""
    url = endpoint.link("fw-1")
    path = store.path(firmware.sha256)
    _alter_in_place(path, 10)
    assert (await fetch(http, url)).status == 503
    _alter_in_place(path, 10)
    reply = await fetch(http, url)
    assert reply.status == 200 and reply.body == FIRMWARE


async def test_a_blob_altered_after_its_check_is_hashed_again(
    endpoint: Endpoint, store: FirmwareStore, firmware: Blob, http: aiohttp.ClientSession
) -> None:
    """A verdict holds only for the state of the file it was made on: an old, verified file that is then
    altered in place (size kept) is hashed again on its next serve."""
    path = store.path(firmware.sha256)
    old = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(old, old))
    assert await store.verify(firmware)  # verified and remembered
    _alter_in_place(path, 999)
    assert (await fetch(http, endpoint.link("fw-1"))).status == 503


# The Range rules (RFC 9110 §14): one `bytes` range is served as 206 (its end clamped to the file, a suffix
# longer than the file is the whole file); a range that selects nothing is 416 with `bytes */<size>`; a
# header with another unit, several ranges or bad syntax is ignored: 200 with the whole file.
N = len(FIRMWARE)
RANGES: list[tuple[str, int, tuple[int, int] | None]] = [
    ("bytes=0-", 206, (0, N - 1)),
    ("bytes=0-0", 206, (0, 0)),
    ("bytes=10-19", 206, (10, 19)),
    ("BYTES=10-19", 206, (10, 19)),
    (f"bytes={N - 1}-", 206, (N - 1, N - 1)),
    ("bytes=100-", 206, (100, N - 1)),
    (f"bytes=900-{N + 5000}", 206, (900, N - 1)),
    ("bytes=0-99999999999999999999", 206, (0, N - 1)),
    ("bytes=-1", 206, (N - 1, N - 1)),
    ("bytes=-100", 206, (N - 100, N - 1)),
    (f"bytes=-{N}", 206, (0, N - 1)),
    (f"bytes=-{N + 1000}", 206, (0, N - 1)),
    (f"bytes={N}-", 416, None),
    (f"bytes={N}-{N + 10}", 416, None),
    (f"bytes={N + 1000}-", 416, None),
    ("bytes=-0", 416, None),
    ("bytes=-000", 416, None),
    ("bytes=0-5,10-15", 200, None),
    ("bytes=0-5, 10-15", 200, None),
    ("bytes=-5,-10", 200, None),
    (f"bytes={N}-,0-5", 200, None),
    ("items=0-5", 200, None),
    ("none", 200, None),
    ("bytes 0-5", 200, None),
    ("bytes=", 200, None),
    ("bytes=-", 200, None),
    ("bytes=5-3", 200, None),
    ("bytes=a-b", 200, None),
    ("bytes=0x10-", 200, None),
    ("bytes=1.5-", 200, None),
    ("bytes==0-5", 200, None),
    ("bytes=0-5;", 200, None),
    ("", 200, None),
]


@pytest.mark.parametrize(("header", "status", "span"), RANGES)
async def test_range_rules(
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    firmware: Blob,
    header: str,
    status: int,
    span: tuple[int, int] | None,
) -> None:
    """Each Range header gets the RFC 9110 answer; every 200/206/416 carries Content-Length, never
    chunked encoding; a 206 carries `bytes first-last/size`, a 416 `bytes */size` and no firmware bytes."""
    for method in ("GET", "HEAD"):
        reply = await fetch(http, endpoint.link("fw-1"), method, Range=header)
        assert reply.status == status, (method, header, reply.status, reply.headers)
        assert "Transfer-Encoding" not in reply.headers
        if status == 206:
            assert span is not None
            first, last = span
            assert reply.headers["Content-Range"] == f"bytes {first}-{last}/{N}"
            assert reply.headers["Content-Length"] == str(last - first + 1)
            assert reply.body == (FIRMWARE[first : last + 1] if method == "GET" else b"")
        elif status == 200:
            assert "Content-Range" not in reply.headers
            assert reply.headers["Content-Length"] == str(N)
            assert reply.body == (FIRMWARE if method == "GET" else b"")
        else:
            assert reply.headers["Content-Range"] == f"bytes */{N}"
            assert reply.headers["Content-Length"] == str(len(reply.body)) if method == "GET" else True
            assert "Content-Length" in reply.headers
            assert FIRMWARE[:16] not in reply.body


async def test_intact_blob_is_served_after_a_restart(
    http: aiohttp.ClientSession, start: Start, store: FirmwareStore, firmware: Blob
) -> None:
    """After a restart an untouched blob passes verification and downloads normally."""
    restarted = FirmwareStore(store.root, max_size=store.max_size)
    restarted.open()
    endpoint = await start(restarted)
    reply = await fetch(http, endpoint.link("fw-1"))
    assert (reply.status, reply.body) == (200, FIRMWARE)


async def big_upload(digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """8 MiB of pseudo-random bytes in 64 KiB chunks, hashed into `digest` as they are produced."""
    rng = random.Random(8)
    for _ in range(BIG_CHUNKS):
        chunk = rng.randbytes(BIG_CHUNK)
        digest.update(chunk)
        yield chunk


async def test_large_firmware_streams_intact(
    http: aiohttp.ClientSession, start: Start, store: FirmwareStore, catalog: Catalog
) -> None:
    """An 8 MiB firmware uploads and downloads intact, neither side holding the whole file in memory."""
    expected = hashlib.sha256()
    blob = await store.put(big_upload(expected))
    assert (blob.size, blob.sha256) == (BIG_CHUNK * BIG_CHUNKS, expected.hexdigest())
    catalog.add("big", blob, SUBJECT)
    restarted = FirmwareStore(store.root, max_size=store.max_size)  # so serving verifies too
    restarted.open()
    endpoint = await start(restarted)

    got, size = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        async with http.get(endpoint.link("big")) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(blob.size)
            assert "Transfer-Encoding" not in r.headers
            async for chunk in r.content.iter_chunked(BIG_CHUNK):
                got.update(chunk)
                size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (size, got.hexdigest()) == (blob.size, blob.sha256)
    assert peak < blob.size // 2, f"peak traced memory {peak} bytes for a {blob.size}-byte download"


async def test_an_idle_keep_alive_connection_is_closed_quietly_a_slow_request_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the head deadline every waiting connection is closed; only one that never completed a request, or
    stopped in the middle of one, is a warning. One that was served and sent nothing more is an ordinary
    idle keep-alive connection (devices and load balancers keep them)."""
    app = web.Application()
    app.router.add_get("/", _ok)
    site = await start_site(app, "127.0.0.1", 0, None, header_timeout_s=0.3)
    host, port = site.address
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    async def closed_after(*sends: bytes) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for data in sends:
                writer.write(data)
                await asyncio.sleep(0.05)
            await asyncio.wait_for(reader.read(), 5)  # until the server closes it
        finally:
            writer.close()

    try:
        with caplog.at_level(logging.DEBUG, logger="ota.download"):
            await closed_after(request)  # served, then idle
            idle = [r for r in caplog.records if "idle connection" in r.getMessage()]
            assert idle and all(r.levelno == logging.DEBUG for r in idle)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            for sends in ((), (b"GET / HT",), (request, b"GET / HTTP/1.1\r\n")):
                caplog.clear()
                await closed_after(*sends)  # nothing, half a head, a request then half another
                warned = [r for r in caplog.records if "no complete request" in r.getMessage()]
                assert [r.levelno for r in warned] == [logging.WARNING], sends
    finally:
        await site.close()


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")
