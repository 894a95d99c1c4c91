"""The single binary (`scripts/build-binary` → dist/ota-broker) runs the product with no Python of ours:
the seed flow against it, its CLI, console, metrics and health check, and a clean SIGTERM.

The binary is built by CI before pytest, never here. Without one (dist/ota-broker, or the file `OTA_BINARY`
names) these tests are skipped; with `OTA_REQUIRE_BINARY=1` they fail instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.processes import Launched, clean_env, json_message
from tests.support import Device, eventually

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = bytes(range(256)) * 2000 + b"ota-broker binary e2e firmware"
CLI_S = 30.0


@pytest.fixture
def binary() -> Path:
    path = Path(os.environ.get("OTA_BINARY") or REPO / "dist" / "ota-broker")
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"no single binary at {path}: build it with scripts/build-binary"
    if os.environ.get("OTA_REQUIRE_BINARY") == "1":
        pytest.fail(message)
    pytest.skip(message)


def no_python_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment that offers no Python: an empty PATH directory, no virtualenv or PYTHON* variables."""
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in clean_env().items()
        if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "PATH")
    }
    return env | {"PATH": str(empty)} | extra


@pytest.fixture
def launched(binary: Path, tmp_path: Path) -> Iterator[Launched]:
    """The binary's `run` in open mode with JSON logs, on loopback port 0, data in a temp dir."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    broker = Launched(
        [str(binary), "run"],
        workdir,
        tmp_path / "data",
        {"OTA_AUTH_MODE": "open", "OTA_LOG_FORMAT": "json"},
    )
    broker.env = no_python_env(tmp_path) | {k: v for k, v in broker.env.items() if k.startswith("OTA_")}
    yield broker
    broker.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_binary_links_no_python_library(binary: Path) -> None:
    """The executable needs no libpython from the system: it carries its own."""
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd")
    out = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=CLI_S, check=False)
    assert "libpython" not in out.stdout, out.stdout


async def test_seed_flow_against_the_binary(
    launched: Launched, binary: Path, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Inform, upload, job, notice, HTTPS download (generated CA), progress, new version, CLI, SIGTERM → 0."""
    broker = await asyncio.to_thread(launched.start, json_message)
    api = broker.admin_api
    auth = {"Authorization": f"Bearer {broker.token}"}

    async def call(method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        async with http.request(method, api + path, headers=auth, **kwargs) as r:
            doc = await r.json()
            assert r.status == expect, f"{method} {path}: {r.status} {doc}"
            return doc

    d = Device(broker.ports["mqtt"], "pk", "dev1", username="dev1&pk")
    await d.connect()
    try:
        await d.inform("1.0.0")

        async def recorded() -> bool:
            async with http.get(f"{api}/devices/pk/dev1", headers=auth) as r:
                return r.status == 200 and (await r.json())["modules"].get("default") == "1.0.0"

        await eventually(recorded, what="pk/dev1 on 1.0.0")
        form = aiohttp.FormData()
        form.add_field("product_key", "pk")
        form.add_field("version", "2.0.0")
        form.add_field("file", FIRMWARE, filename="fw.bin", content_type="application/octet-stream")
        fw = await call("POST", "/firmware", 201, data=form)
        job = await call("POST", "/jobs", 201, json={"firmware_id": fw["id"], "devices": ["pk/dev1"]})

        [notice] = await d.notices()
        data = notice["data"]
        assert data["md5"] == hashlib.md5(FIRMWARE).hexdigest() and data["size"] == len(FIRMWARE)
        assert data["url"].startswith(broker.public_url + "/"), data["url"]
        async with http.get(data["url"], ssl=broker.client_tls()) as r:
            assert r.status == 200
            assert await r.read() == FIRMWARE
        await d.progress("60", "flashing")

        async def task(state: str) -> Any:
            [t] = await call("GET", f"/jobs/{job['id']}/tasks")
            return t if t["state"] == state else None

        await eventually(lambda: task("in_progress"), what="in_progress")
        await d.inform("2.0.0")
        await eventually(lambda: task("succeeded"), what="succeeded")
    finally:
        d.disconnect()

    # The bundled CLI (typer, rich) and health check, as an operator runs them beside the broker.
    cli_env = no_python_env(
        tmp_path, OTA_ADMIN_URL=api.removesuffix("/api/v1"), OTA_DATA_DIR=str(broker.data_dir), COLUMNS="200"
    )
    for args, expected in (
        (["job", "tasks", str(job["id"])], "succeeded"),
        (["health"], "ok: "),
        (["check-config"], "# configuration: built-in defaults: valid"),
    ):
        result = await asyncio.to_thread(
            subprocess.run,
            [str(binary), *args],
            cwd=broker.workdir,
            env=cli_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_S,
            check=False,
        )
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        assert expected in result.stdout, f"{args}: {result.stdout}"

    # The console's static files and the metrics endpoint are in the bundle too.
    async with http.get(api.removesuffix("/api/v1") + "/console/") as r:
        assert r.status == 200 and "<html" in (await r.text()).lower()
    metrics_token = (broker.data_dir / "metrics.token").read_text().strip()
    async with http.get(
        api.removesuffix("/api/v1") + "/metrics", headers={"Authorization": f"Bearer {metrics_token}"}
    ) as r:
        assert r.status == 200
        assert 'ota_tasks{state="succeeded"} 1.0' in await r.text()

    assert await asyncio.to_thread(broker.stop, signal.SIGTERM) == 0, broker.log
    messages = [json_message(line) for line in broker.lines]
    assert "stopped" in messages, broker.log
