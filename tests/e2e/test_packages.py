"""Multi-file packages end to end: uploaded as several files (API and CLI), shown with each file's size and
digests, offered to a device in the `files` list LinkSDK C v4 parses (read here the way its JSON reader and
`_ota_parse_list_array` read it), and downloaded file by file over HTTPS and over MQTT."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
from typer.testing import CliRunner

from broker.cli import cli
from tests.support import TOKEN, Env, reporting
from tests.support_linksdk import LinkSdkDownload, Status, json_value, str2uint

FILES = {"app.bin": os.urandom(40_000), "dsp.bin": os.urandom(25_000), "boot.img": os.urandom(9_000)}


async def upload_package(env: Env, files: dict[str, bytes], version: str = "2.0.0", **fields: str) -> Any:
    form = aiohttp.FormData()
    form.add_field("product_key", "pk")
    form.add_field("version", version)
    for name, value in fields.items():
        form.add_field(name, value)
    for name, data in files.items():
        form.add_field("file", data, filename=name, content_type="application/octet-stream")
    return await env.api("POST", "/firmware", expect=201, data=form)


def linksdk_files(notice: bytes) -> list[dict[str, bytes | None]]:
    """The files of a notice as LinkSDK v4's `_ota_mqtt_process` finds them: `data`, then `files`, split
    by `_ota_parse_list_array` (each element runs from `{` to the next `}`), each read with its JSON
    reader (first `"key"`, value right after the colon)."""
    data = json_value(notice, "data")
    assert data is not None
    listed = json_value(data, "files")
    assert listed is not None and listed.startswith(b"[")
    elements, at = [], 1
    while (start := listed.find(b"{", at)) != -1:
        end = listed.index(b"}", start)
        elements.append(listed[start : end + 1])
        at = end + 1
    keys = ("fileName", "fileSize", "fileSign", "fileUrl", "streamFileId")
    return [{key: json_value(element, key) for key in keys} for element in elements]


async def test_a_package_is_uploaded_and_shown_file_by_file(env: Env) -> None:
    """Several 'file' parts make one firmware whose `files` list each file's name, size and digests, in
    the order uploaded; a single file is a package of one."""
    fw = await upload_package(env, FILES)
    assert [f["name"] for f in fw["files"]] == list(FILES)
    for f, data in zip(fw["files"], FILES.values(), strict=True):
        assert (f["size"], f["md5"], f["sha256"]) == (
            len(data),
            hashlib.md5(data).hexdigest(),
            hashlib.sha256(data).hexdigest(),
        )
    assert (fw["size"], fw["md5"]) == (fw["files"][0]["size"], fw["files"][0]["md5"])
    assert (await env.api("GET", f"/firmware/{fw['id']}", expect=200))["files"] == fw["files"]
    single = await env.upload(b"x" * 100, version="3.0.0")
    assert [f["size"] for f in single["files"]] == [100]


async def test_bad_packages_are_refused_and_leave_nothing(env: Env) -> None:
    """Two files of one name, a name a device could not store safely, an empty file or more than 20 files
    are a 422 naming 'file', and no firmware or stored blob is left behind."""
    store = env.running.plugin.settings.data_dir / "firmware"
    before = sorted(p.name for p in store.rglob("*") if p.is_file())
    cases: list[dict[str, bytes]] = [
        {"ok.bin": b"1", "../evil": b"2"},
        {"ok.bin": b"1", "empty.bin": b""},
        {f"f{i}.bin": bytes([i]) for i in range(21)},
    ]
    for files in cases:
        form = aiohttp.FormData()
        form.add_field("product_key", "pk")
        form.add_field("version", "9.9.9")
        for name, data in files.items():
            form.add_field("file", data, filename=name)
        refused = await env.api("POST", "/firmware", expect=422, data=form)
        assert "file" in json.dumps(refused), refused
    twice = aiohttp.FormData()
    twice.add_field("product_key", "pk")
    twice.add_field("version", "9.9.9")
    twice.add_field("file", b"1", filename="same.bin")
    twice.add_field("file", b"2", filename="same.bin")
    assert "file" in json.dumps(await env.api("POST", "/firmware", expect=422, data=twice))
    assert await env.api("GET", "/firmware", expect=200) == []
    assert sorted(p.name for p in store.rglob("*") if p.is_file()) == before


async def test_a_linksdk_device_gets_the_files_list_and_downloads_every_file_over_https(env: Env) -> None:
    """The notice of a package carries `files`, each with fileName, fileSize, fileSign and its own signed
    fileUrl, readable by LinkSDK's parser; each URL serves exactly its file; the device then succeeds."""
    device = await reporting(env, "multi")
    fw = await upload_package(env, FILES)
    await env.job(fw["id"], ["pk/multi"])
    await device.notices()
    raw = json.dumps(device.messages(device.upgrade_topic)[0], separators=(",", ":")).encode()
    files = linksdk_files(raw)
    assert [f["fileName"] for f in files] == [name.encode() for name in FILES]
    for f, data in zip(files, FILES.values(), strict=True):
        assert str2uint(f["fileSize"]) == len(data)
        assert f["fileSign"] == hashlib.md5(data).hexdigest().encode()
        assert f["fileUrl"] is not None
        status, headers, body = await env.download(f["fileUrl"].decode(), {"Range": "bytes=0-"})
        assert status == 206 and body == data and headers["Content-Length"] == str(len(data))
    await device.progress("100")
    await device.inform("2.0.0")
    await env.task_state(1, "pk/multi", "succeeded")


async def test_a_package_over_mqtt_is_fetched_file_by_file(env: Env) -> None:
    """Over MQTT the package is one stream with a streamFileId per file; the LinkSDK-like device fetches
    each file with its CRC checks passing and gets exactly that file."""
    device = await reporting(env, "mq")
    fw = await upload_package(env, FILES, sign_method="SHA256")
    await env.job(fw["id"], ["pk/mq"], download_protocol="mqtt")
    (notice,) = await device.notices()
    data = notice["data"]
    assert data["dProtocol"] == "mqtt" and data["signMethod"] == "SHA256" and "url" not in data
    raw = json.dumps(notice, separators=(",", ":")).encode()
    for f, content in zip(linksdk_files(raw), FILES.values(), strict=True):
        assert f["fileSign"] == hashlib.sha256(content).hexdigest().encode()
        file_id = str2uint(f["streamFileId"])
        assert file_id is not None
        result = await LinkSdkDownload(device, data["streamId"], file_id, len(content)).run(timeout_s=20)
        assert result.status is Status.SUCCESS and result.data == content


async def test_the_cli_uploads_a_package(env: Env, tmp_path: Path) -> None:
    """`ota-broker firmware add a b c` uploads one package of those files, in that order."""
    paths = []
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    host, port = env.running.admin_address
    args = ["firmware", "add", *paths, "--product-key", "pk", "--version", "4.0.0", "--json"]
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, [*args, "--admin-url", f"http://{host}:{port}", "--token", TOKEN]
    )
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert [f["name"] for f in added["files"]] == list(FILES)
    # `firmware show` as a table, like the other `show`s: its fields, then one row per file of the package
    shown = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["firmware", "show", str(added["id"]), "--admin-url", f"http://{host}:{port}", "--token", TOKEN],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert any("version" in line and "4.0.0" in line for line in lines)
    assert any("sha256" in line and added["sha256"] in line for line in lines)
    assert [name for name in FILES if any(name in line for line in lines)] == list(FILES)
    assert not shown.stdout.lstrip().startswith("{")
