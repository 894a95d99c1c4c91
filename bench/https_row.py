"""The HTTPS row: one firmware file downloaded by C concurrent `curl --http1.1` processes from
ota-broker's own download endpoint (signed per-device URLs) and from nginx (TLS, one worker) serving
the same bytes. Reports MB/s (MB = 10^6 bytes) and server CPU seconds per GB served.

ota-broker serves a URL only to the device it was signed for, while that device's task is notified or
in progress, and at most 2 downloads per device at once. So the benchmark plays C devices: each logs in
(open auth mode), reports version 1.0.0, and gets its own notice with its own URL from one job created
through the management API, exactly as a fleet would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import time
from pathlib import Path
from typing import Any, cast

import aiohttp

from bench import mqttlib
from bench.mqtt_rows import loadavg, log, medians
from bench.servers import MQTT_SERVERS, NginxServer, OtaServer
from firmware_store.tls import ensure_tls

PK = "pk"


def make_file(path: Path, size: int) -> None:
    chunk = 1 << 20
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(os.urandom(min(chunk, left)))
            left -= chunk


def prepare_files(workdir: Path, firmware: Path, size: int) -> tuple[Path, Path]:
    firmware.parent.mkdir(parents=True, exist_ok=True)
    make_file(firmware, size)
    # the same kind of certificate (EC P-256, from the same code) as ota-broker's own, for a fair handshake
    files = ensure_tls(workdir / "nginx-tls", "localhost")
    return files.cert, files.key


async def tls_session(port: int) -> str:
    """The protocol and cipher a default client negotiates with the server on `port`."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
    try:
        obj = writer.get_extra_info("ssl_object")
        return f"{obj.version()} {obj.cipher()[0]}"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Device:
    """A device on a raw MQTT connection that waits for its upgrade notice."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.name = name
        self.reader, self.writer = reader, writer
        self.splitter = mqttlib.Splitter()
        self.backlog: list[tuple[int, int, bytes]] = []

    @classmethod
    async def connect(cls, port: int, name: str) -> Device:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        device = cls(name, reader, writer)
        writer.write(mqttlib.connect(f"{PK}.{name}", username=f"{name}&{PK}"))
        await device.wait_for(mqttlib.CONNACK, 10)
        writer.write(mqttlib.subscribe(1, f"/ota/device/upgrade/{PK}/{name}", 1))
        await device.wait_for(mqttlib.SUBACK, 10)
        inform = json.dumps({"id": 1, "params": {"version": "1.0.0"}}).encode()
        writer.write(mqttlib.publish(f"/ota/device/inform/{PK}/{name}", inform, qos=1, packet_id=2))
        await device.wait_for(mqttlib.PUBACK, 10)
        return device

    async def wait_for(self, ptype: int, limit_s: float) -> tuple[int, bytes]:
        """The next packet of type `ptype` (acknowledging QoS 1 PUBLISHes; other packets are dropped)."""
        deadline = time.monotonic() + limit_s
        while True:
            while self.backlog:
                t, f, body = self.backlog.pop(0)
                if t == mqttlib.PUBLISH and f & 0x06:
                    self.writer.write(mqttlib.puback(mqttlib.publish_packet_id(f, memoryview(body))))
                if t == ptype:
                    return f, body
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no packet of type {ptype} within {limit_s:g}s")
            data = await asyncio.wait_for(self.reader.read(65536), left)
            if not data:
                raise ConnectionError(f"{self.name}: connection closed")
            self.backlog += [(t, f, bytes(b)) for t, f, b in self.splitter.feed(data)]

    async def notice_url(self, limit_s: float) -> str:
        flags, body = await self.wait_for(mqttlib.PUBLISH, limit_s)
        view = memoryview(body)
        topic_len = (body[0] << 8) | body[1]
        start = 2 + topic_len + (2 if flags & 0x06 else 0)
        doc = json.loads(bytes(view[start:]))
        return str(doc["data"]["url"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(mqttlib.DISCONNECT_PACKET)
        self.writer.close()


async def ota_urls(server: OtaServer, firmware: Path, clients: int) -> tuple[list[str], list[Device]]:
    """Upload the firmware, bring `clients` devices online, start one job for them, return their URLs."""
    headers = {"Authorization": f"Bearer {server.admin_token()}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        with firmware.open("rb") as f:
            form = aiohttp.FormData()
            form.add_field("product_key", PK)
            form.add_field("version", "2.0.0")
            form.add_field("file", f, filename="fw.bin", content_type="application/octet-stream")
            async with http.post(f"{server.admin_url}/firmware", data=form) as r:
                doc = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"firmware upload: {r.status} {doc}")
                firmware_id = doc["id"]
        devices: list[Device] = []
        try:
            for k in range(clients):
                devices.append(await Device.connect(server.port, f"bench{k}"))
            for d in devices:  # open mode registers a device at its first report; wait until it has
                for _ in range(100):
                    async with http.get(f"{server.admin_url}/devices/{PK}/{d.name}") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.1)
            body = {
                "firmware_id": firmware_id,
                "type": "static",
                "devices": [f"{PK}/{d.name}" for d in devices],
            }
            async with http.post(f"{server.admin_url}/jobs", json=body) as r:
                doc = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"job: {r.status} {doc}")
            urls = [await d.notice_url(30) for d in devices]
        except BaseException:
            for d in devices:
                d.close()
            raise
    return urls, devices


def curl_argv(url: str, limit_s: float) -> list[str]:
    fields = "%{http_code} %{size_download}"
    return [
        "curl",
        "-k",
        "-s",
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        fields,
        "--max-time",
        str(int(limit_s)),
        url,
    ]


async def download_round(urls: list[str], size: int, pid_cpu: Any, limit_s: float) -> dict[str, Any]:
    """All URLs at once, one curl each; MB/s over the whole round and server CPU s per GB."""
    cpu0 = pid_cpu()
    t0 = time.monotonic()
    procs = []
    try:
        for url in urls:
            procs.append(
                await asyncio.create_subprocess_exec(
                    *curl_argv(url, limit_s), stdout=asyncio.subprocess.PIPE, start_new_session=True
                )
            )
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), limit_s + 10)
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(Exception):
                    await p.wait()
    wall = time.monotonic() - t0
    cpu = pid_cpu() - cpu0
    codes, sizes = [], []
    for out, _ in outs:
        code, got = out.decode().split()
        codes.append(int(code))
        sizes.append(int(got))
    total = sum(sizes)
    ok = all(c == 200 for c in codes) and all(s == size for s in sizes)
    return {
        "ok": ok,
        "codes": sorted(set(codes)),
        "bytes": total,
        "seconds": round(wall, 3),
        "mb_per_s": round(total / 1e6 / wall, 1),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_gb": round(cpu / (total / 1e9), 3) if total else None,
    }


async def https(
    workdir: Path,
    size_mb: int,
    clients: int,
    reps: int,
    limit_s: float,
    ota_names: tuple[str, ...] = ("ota",),
) -> dict[str, Any]:
    """nginx and ota-broker (`ota_names`: `ota`, and `ota_uvloop` for the broker on uvloop)
    serving the same file to `clients` curl processes at once, `reps` rounds each, in turn."""
    size = size_mb * 1_000_000
    www, firmware = workdir / "www", workdir / "www" / "fw.bin"
    log(f"https: making a {size_mb} MB file and a certificate")
    cert, key = await asyncio.to_thread(prepare_files, workdir, firmware, size)
    otas = {name: cast(OtaServer, MQTT_SERVERS[name](workdir / name)) for name in ota_names}
    nginx = NginxServer(workdir / "nginx", www, cert, key)
    devices: list[Device] = []
    row: dict[str, Any] = {"size_mb": size_mb, "clients": clients, "loadavg_start": loadavg(), "servers": {}}
    try:
        targets: dict[str, tuple[list[str], Any]] = {}
        row["tls"] = {}
        for name, ota in otas.items():
            await ota.start()
            urls, more = await ota_urls(ota, firmware, clients)
            devices += more
            targets[name] = (urls, ota.cpu)
            row["tls"][name] = await tls_session(ota.https_port)
        await nginx.start()
        targets["nginx"] = ([f"https://127.0.0.1:{nginx.port}/fw.bin"] * clients, nginx.cpu)
        row["tls"]["nginx"] = await tls_session(nginx.port)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for rep in range(reps):
            for name, (urls, cpu) in targets.items():
                result = await download_round(urls, size, cpu, limit_s)
                runs[name].append(result)
                log(
                    f"https {name} rep {rep + 1}: {result['mb_per_s']} MB/s, {result['cpu_s_per_gb']} CPU s/GB, "
                    f"ok={result['ok']} codes={result['codes']}"
                )
        for name, rs in runs.items():
            good = [r for r in rs if r["ok"]]
            row["servers"][name] = {
                "runs": rs,
                "failed_runs": len(rs) - len(good),
                "median": medians(good, ("mb_per_s", "cpu_s_per_gb", "seconds")),
            }
    finally:
        for d in devices:
            d.close()
        for ota in otas.values():
            ota.stop()
            shutil.rmtree(ota.data_dir / "firmware", ignore_errors=True)
        nginx.stop()
        with contextlib.suppress(OSError):
            firmware.unlink()
    row["loadavg_end"] = loadavg()
    return row
