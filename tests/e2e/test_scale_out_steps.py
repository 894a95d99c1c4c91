"""The way docs/scale-out.md describes, from an embedded gateway to two replicas, in processes of their own:

1. an embedded `ota-broker run` with its devices and firmware; stopped;
2. `ota-broker copy-database --to <PostgreSQL>`;
3. two `ota-broker run` replicas on that database, attached to a Mosquitto 2, sharing the gateway's data
   folder;
4. the gateway's devices and firmware answered by both replicas' APIs; a job created through one replica
   upgrades a device on Mosquitto (the notice, the HTTPS download of the gateway's firmware file, the new
   version), and the other replica reports it succeeded.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.processes import Launched, attached_replica, clean_env
from tests.mosquitto import Mosquitto, running_mosquitto
from tests.postgres import Postgres
from tests.support import Device, eventually

FIRMWARE = os.urandom(100_000)
DEVICES = ["pk/gw1", "pk/gw2"]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "mosquitto") as m:
        yield m


async def _api(
    http: aiohttp.ClientSession, at: Launched, method: str, path: str, expect: int, **kw: Any
) -> Any:
    headers = {"Authorization": f"Bearer {at.token}"}
    async with http.request(method, at.admin_api + path, headers=headers, **kw) as r:
        body = await r.read()
        assert r.status == expect, f"{method} {path}: {r.status} {body[:300]!r}"
        return json.loads(body)


async def test_an_embedded_gateway_moves_to_two_replicas_on_mosquitto_and_postgresql(
    tmp_path: Path, mosquitto: Mosquitto, postgres_server: Postgres
) -> None:
    data = tmp_path / "data"
    command = [sys.executable, "-m", "broker", "run", "--log-level", "info"]
    dsn = await postgres_server.new_database()
    replicas: list[Launched] = []
    device: Device | None = None
    try:
        async with aiohttp.ClientSession() as http:
            # 1. The gateway, embedded, with its devices (and their secrets) and a firmware.
            gateway = Launched(command, tmp_path / "gateway", data, {"OTA_AUTH_MODE": "open"})
            (tmp_path / "gateway").mkdir()
            await asyncio.to_thread(gateway.start)
            try:
                for ref in DEVICES:
                    product_key, name = ref.split("/")
                    body = {"product_key": product_key, "device_name": name}
                    await _api(http, gateway, "POST", "/devices", 201, json=body)
                form = aiohttp.FormData()
                form.add_field("product_key", "pk")
                form.add_field("version", "2.0.0")
                form.add_field("file", io.BytesIO(FIRMWARE), filename="fw.bin")
                firmware = await _api(http, gateway, "POST", "/firmware", 201, data=form)
                assert gateway.stop() == 0  # stopped before its database is copied
            finally:
                gateway.close()

            # 2. Its database copied into PostgreSQL.
            copy = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker", "copy-database", "--to", dsn,
                cwd=tmp_path, env=clean_env(OTA_DATA_DIR=str(data)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            said, _ = await asyncio.wait_for(copy.communicate(), 60)
            assert copy.returncode == 0, said.decode()
            assert "devices" in said.decode() and "2 rows" in said.decode()

            # 3. Two replicas on it, attached to Mosquitto, on the gateway's data folder.
            replicas += [attached_replica(tmp_path, i, data, mosquitto.url, dsn) for i in range(2)]
            await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
            first, second = replicas

            # 4. What the gateway had, from both; an upgrade through one, seen by the other.
            for replica in replicas:
                listed = await _api(http, replica, "GET", "/devices?product_key=pk", 200)
                assert sorted(f"{d['product_key']}/{d['device_name']}" for d in listed) == DEVICES
                shown = await _api(http, replica, "GET", f"/firmware/{firmware['id']}", 200)
                assert shown["md5"] == firmware["md5"]

            device = await Device(mosquitto.port, "pk", "gw1").connect()
            await device.subscribe(device.upgrade_topic)
            await device.inform("1.0.0")
            job = await _api(
                http, first, "POST", "/jobs", 201, json={"firmware_id": firmware["id"], "devices": ["pk/gw1"]}
            )
            [notice] = await device.notices()
            url = notice["data"]["url"]
            tls = second.client_tls()  # the folder's CA, the same for every replica
            async with http.get(url, ssl=tls) as r:
                assert r.status == 200 and hashlib.md5(await r.read()).hexdigest() == firmware["md5"]
            await device.progress("100", "flashed")
            await device.inform("2.0.0")

            async def succeeded() -> bool:
                tasks = await _api(http, second, "GET", f"/jobs/{job['id']}/tasks", 200)
                return [t["state"] for t in tasks] == ["succeeded"]

            await eventually(succeeded, 20.0, "the upgrade to be recorded, as the other replica sees it")
            assert len(device.messages(device.upgrade_topic)) == 1
    finally:
        if device is not None:
            device.disconnect()
        for replica in replicas:
            replica.close()
        await postgres_server.drop_database(dsn)
