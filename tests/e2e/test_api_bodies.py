"""Request bodies of the management API over real HTTP: read whole up to their limit (then 413), bad JSON
of any shape a 4xx, a stalled body closed by its deadline, a client that leaves mid-body one INFO line;
device imports read every row, never take a header for a device, and refuse short secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker import app as broker_app
from plugins.ota.core.topics import DeviceRef
from plugins.ota.http import devices
from tests.support import TOKEN, Env, Tls, broker_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CSV = {**AUTH, "Content-Type": "text/csv"}


async def _post(env: Env, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with env.http.post(env.admin + path, data=io.BytesIO(body), headers=headers) as r:
        return r.status, await r.json()


async def _device_count(env: Env) -> int:
    _, total = await env.service.devices.page(limit=1)
    return total


async def _secret_of(env: Env, pk: str, dn: str) -> str | None:
    found = await env.service.device_login(DeviceRef(pk, dn))
    return None if found is None else str(found[0])


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# ------------------------------------------------------------------------------------------- import


async def test_import_reads_every_row_of_a_large_body(env: Env) -> None:
    """An import of 100,000 rows with secrets (several MB, arriving in many pieces) creates every device
    with exactly the secret sent, and answers the number of rows read."""
    n = 100_000
    body = "".join(f"pk,dev{i:06d},secret-of-dev{i:06d}-xyz\n" for i in range(n)).encode()
    status, doc = await _post(env, "/devices/import", body, CSV)
    assert status == 200, doc
    assert doc["rows"] == n and len(doc["created"]) == n and doc["errors"] == [] and doc["existing"] == 0
    assert await _device_count(env) == n
    for i in (0, 1, n // 2, n - 2, n - 1):
        assert await _secret_of(env, "pk", f"dev{i:06d}") == f"secret-of-dev{i:06d}-xyz"


@pytest.mark.parametrize(
    ("header", "row"),
    [
        ("product_key,device_name", "pk,d1"),
        ("product_key,device_name,device_secret", "pk,d1,0123456789abcdef"),
        ("device_name,product_key", "d1,pk"),
        ("ProductKey,DeviceName,DeviceSecret", "pk,d1,0123456789abcdef"),
        ("device_secret,device_name,product_key", "0123456789abcdef,d1,pk"),
        ("Product Key , Device Name", "pk,d1"),
    ],
)
async def test_a_header_row_names_columns_and_is_never_a_device(env: Env, header: str, row: str) -> None:
    """A first row naming the columns (any order, any spelling of product_key/device_name/device_secret)
    maps the columns and does not become a device."""
    status, doc = await _post(env, "/devices/import", f"{header}\n{row}\n".encode(), CSV)
    assert status == 200, doc
    assert doc["rows"] == 1 and doc["errors"] == []
    assert [(c["product_key"], c["device_name"]) for c in doc["created"]] == [("pk", "d1")]
    assert await _device_count(env) == 1
    if "secret" in header.lower():
        assert await _secret_of(env, "pk", "d1") == "0123456789abcdef"


async def test_a_header_naming_unknown_columns_imports_nothing(env: Env) -> None:
    """A header naming a column that is not product_key, device_name or device_secret refuses the whole
    file at line 1: no row's meaning is known."""
    status, doc = await _post(env, "/devices/import", b"product_key,device_name,colour\npk,d1,red\n", CSV)
    assert status == 200 and doc["created"] == [] and [e["line"] for e in doc["errors"]] == [1]
    assert await _device_count(env) == 0


@pytest.mark.parametrize("secret", ["short", "x" * 15, " " + "x" * 20, "x" * 129, "tab\tinside-the-secret"])
async def test_unacceptable_secrets_are_refused_on_import_and_on_add(env: Env, secret: str) -> None:
    """A device secret under 16 characters (or over 128, or not printable, or padded) is refused on import,
    on registration and on rotation; nothing is stored."""
    text = f'pk,d1,"{secret}"\npk,d2,{"y" * 16}\n'
    status, doc = await _post(env, "/devices/import", text.encode(), CSV)
    assert status == 200
    assert [e["line"] for e in doc["errors"]] == [1] and "device_secret" in doc["errors"][0]["message"]
    assert [c["device_name"] for c in doc["created"]] == ["d2"] and doc["rows"] == 2
    assert await _secret_of(env, "pk", "d1") is None
    body = {"product_key": "pk", "device_name": "d3", "device_secret": secret}
    status, doc = await _post(env, "/devices", json.dumps(body).encode(), {**AUTH})
    assert status == 422 and doc["message"].startswith("device_secret"), doc
    assert await _secret_of(env, "pk", "d3") is None
    status, doc = await _post(
        env, "/devices/pk/d2/secret", json.dumps({"device_secret": secret}).encode(), AUTH
    )
    assert status == 422 and doc["message"].startswith("device_secret"), doc
    assert await _secret_of(env, "pk", "d2") == "y" * 16


async def test_generated_secrets_are_32_random_hex_characters(env: Env) -> None:
    """A device registered or imported without a secret gets 32 hex characters (16 random bytes)."""
    added = await env.api("POST", "/devices", expect=201, json={"product_key": "pk", "device_name": "a"})
    _, doc = await _post(env, "/devices/import", b"pk,b\npk,c\n", CSV)
    secrets = [added["device_secret"], *(c["device_secret"] for c in doc["created"])]
    assert len(set(secrets)) == 3
    assert all(len(s) == 32 and int(s, 16) >= 0 for s in secrets)


async def test_an_import_over_the_limit_is_413_and_creates_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import body larger than the limit answers 413, streamed or with a Content-Length, and creates
    no device."""
    monkeypatch.setattr(devices, "IMPORT_MAX", 100_000)
    body = "".join(f"pk,dev{i:06d}\n" for i in range(20_000)).encode()  # 260 KB

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    status, doc = await _post(env, "/devices/import", body, CSV)
    assert status == 413, doc
    async with env.http.post(env.admin + "/devices/import", data=chunks(), headers=CSV) as r:
        assert r.status == 413
    assert await _device_count(env) == 0


# --------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b"[" * 100_000,
        b"{" * 50_000,
        b"\xff\xfe{}",
        b'{"product_key": "\xff"}',
        b"",
        b"null",
        b"1e999999",
    ],
)
async def test_bad_json_of_any_shape_is_a_4xx(
    env: Env, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Deeply nested, truncated, non-UTF-8 or non-object JSON bodies answer 422 naming the body, with no
    traceback in the log."""
    # An empty body to the secret rotation is no body: rotate to a generated secret (404 here).
    for path in ("/devices", "/jobs", *(["/devices/pk/d/secret"] if body else [])):
        status, doc = await _post(env, path, body, {**AUTH, "Content-Type": "application/json"})
        assert status == 422 and doc["message"].startswith("body"), (path, doc)
    _no_errors(caplog)


async def test_a_json_body_over_the_limit_is_413(env: Env) -> None:
    """A JSON body over 1 MiB answers 413 (the whole body is read, never just what has arrived)."""
    body = b'{"product_key": "pk", "device_name": "d", "pad": "' + b"x" * (2 << 20) + b'"}'
    status, doc = await _post(env, "/devices", body, {**AUTH, "Content-Type": "application/json"})
    assert status == 413, doc
    assert await _device_count(env) == 0


# ------------------------------------------------------------------------------ stalled and cut off


@pytest.fixture
async def quick(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A broker whose HTTP deadlines (request head, and each piece of a body) are 0.5 s."""
    running = await broker_app.start(broker_config(tmp_path / "data", tls, http_header_timeout_s=0.5))
    async with aiohttp.ClientSession() as http:
        try:
            yield Env(running, tls, http)
        finally:
            await running.stop()


async def _open(env: Env) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = env.running.admin_address
    return await asyncio.open_connection(host, port)


def _head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST /api/v1{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_stalled_body_is_closed_and_logged_once(quick: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A client that stops sending mid-body is disconnected after the deadline, with one WARNING line and
    no traceback; nothing is imported; a slow but steady body still gets through."""
    caplog.set_level(logging.INFO)
    reader, writer = await _open(quick)
    writer.write(_head("/devices/import", "text/csv", 10_000) + b"pk,stalled-1\npk,stall")
    await writer.drain()
    closed = await asyncio.wait_for(reader.read(), 5)  # EOF once the server gives up
    writer.close()
    assert b"200" not in closed.split(b"\r\n", 1)[0]
    await asyncio.sleep(0.1)
    lines = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if "went away" in r.getMessage()]
    _no_errors(caplog)
    assert await _device_count(quick) == 0

    body = b"".join(f"pk,slow{i}\n".encode() for i in range(8))
    reader, writer = await _open(quick)
    writer.write(_head("/devices/import", "text/csv", len(body)))
    for i in range(0, len(body), len(body) // 4):
        writer.write(body[i : i + len(body) // 4])
        await writer.drain()
        await asyncio.sleep(0.3)  # under the deadline each time; 1.2 s in all
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert await _device_count(quick) == 8


@pytest.mark.parametrize("what", ["upload", "import", "json"])
async def test_a_client_leaving_mid_body_is_one_info_line(
    quick: Env, caplog: pytest.LogCaptureFixture, what: str
) -> None:
    """A client that disconnects mid-body (firmware upload, import, JSON) is logged in one INFO line with
    no traceback; nothing is recorded and the upload's temporary file is gone."""
    caplog.set_level(logging.INFO)
    if what == "upload":
        boundary = "b0undary"
        start = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="product_key"\r\n\r\npk\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="version"\r\n\r\n2.0.0\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'
        ).encode() + b"\x7fELF" * 100_000
        head = _head("/firmware", f"multipart/form-data; boundary={boundary}", len(start) + 1_000_000)
    elif what == "import":
        start = b"pk,left-1\npk,left-2\n"
        head = _head("/devices/import", "text/csv", 100_000)
    else:
        start = b'{"product_key": "pk", "device_name": "left"'
        head = _head("/devices", "application/json", 1000)
    _, writer = await _open(quick)
    writer.write(head + start)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    for _ in range(50):
        if any("went away" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    lines = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [r.getMessage() for r in caplog.records]
    _no_errors(caplog)
    assert await _device_count(quick) == 0
    assert await quick.api("GET", "/firmware", expect=200) == []
    assert list((Path(quick.service.firmware.store.root) / "tmp").iterdir()) == []
