"""Whole-campaign benchmark: N simulated devices, one firmware, notice -> success, against ota-broker.

    python -m bench.campaign --devices 1000 --firmware-mb 1 [--processes 2] [--out result.json] [--profile]

It starts `python -m broker run` (open auth mode, a temporary data directory, free loopback ports), uploads
the firmware through the management API, starts `ota-broker simulate` with N devices (which connect and
inform 1.0.0), launches a static job for the product once every device has informed, and waits for the
simulator to end. It reports the simulator's "first notice -> last success" time, the per-device p50/p95,
the broker's CPU seconds during the campaign, and its resident memory. Every wait is bounded; every process
it starts is stopped by its PID in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


async def campaign(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="ota-campaign-"))
    mqtt, https, admin = free_port(), free_port(), free_port()
    env = dict(
        os.environ,
        OTA_AUTH_MODE="open",
        OTA_DATA_DIR=str(data / "data"),
        OTA_MQTT_BIND=f"127.0.0.1:{mqtt}",
        OTA_HTTPS_BIND=f"127.0.0.1:{https}",
        OTA_PUBLIC_URL=f"https://127.0.0.1:{https}",
        OTA_ADMIN_BIND=f"127.0.0.1:{admin}",
        OTA_MQTTS_BIND="",
    )
    log = (data / "broker.log").open("w")
    broker = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped in finally
        [sys.executable, "-m", "broker", "run", "--log-level", "warning"], env=env, cwd=data, stderr=log
    )
    simulator: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    base = f"http://127.0.0.1:{admin}/api/v1"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(f"{base}/health") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(up, 30, "the broker")
            headers = {"Authorization": f"Bearer {(data / 'data' / 'admin.token').read_text().strip()}"}
            form = aiohttp.FormData()
            form.add_field("product_key", "pk")
            form.add_field("version", "2.0.0")
            form.add_field("file", os.urandom(int(args.firmware_mb * 1024 * 1024)), filename="fw.bin")
            async with http.post(f"{base}/firmware", data=form, headers=headers) as r:
                assert r.status == 201, await r.text()
                firmware = await r.json()
            result_file = data / "simulation.json"
            simulator = subprocess.Popen(  # noqa: ASYNC220
                [
                    sys.executable, "-m", "broker", "simulate",
                    "--devices", str(args.devices), "--product-key", "pk", "--version", "1.0.0",
                    "--port", str(mqtt), "--ca-file", str(data / "data" / "tls" / "ca.crt"),
                    "--processes", str(args.processes), "--connect-rate", str(args.connect_rate),
                    "--idle-exit", "20", "--duration-limit", str(args.limit), "--json", str(result_file),
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip

            async def informed() -> bool:
                async with http.get(f"{base}/devices?version=1.0.0&limit=10000", headers=headers) as r:
                    return len(await r.json()) >= args.devices

            t_connect = time.monotonic()
            await wait_for(informed, args.limit, f"{args.devices} devices to inform")
            connected_s = time.monotonic() - t_connect
            proc = psutil.Process(broker.pid)
            cpu0 = proc.cpu_times()
            if args.profile:
                profiler = subprocess.Popen(  # noqa: ASYNC220
                    ["py-spy", "record", "-p", str(broker.pid), "-d", "25", "-f", "raw", "-o", args.profile],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            spec: dict[str, Any] = {"firmware_id": firmware["id"], "type": "static"}
            if args.rate_per_minute:
                spec["rate_per_minute"] = args.rate_per_minute
            async with http.post(f"{base}/jobs", json=spec, headers=headers) as r:
                assert r.status == 201, await r.text()
                job = await r.json()
            t_job = time.monotonic()
            deadline = t_job + args.limit
            while simulator.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            cpu1 = proc.cpu_times()
            async with http.get(f"{base}/jobs/{job['id']}", headers=headers) as r:
                final = await r.json()
        sim = json.loads(result_file.read_text()) if result_file.exists() else {}
        return {
            "devices": args.devices,
            "firmware_mb": args.firmware_mb,
            "processes": args.processes,
            "rate_per_minute": args.rate_per_minute,
            "connect_and_inform_s": round(connected_s, 2),
            "job_counts": final.get("counts"),
            "simulator": {
                k: sim.get(k) for k in ("counts", "notice_to_last_success_s", "upgrade_seconds", "end_reason")
            },
            "broker_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
            "broker_rss_mb": round(proc.memory_info().rss / 2**20, 1),
        }
    finally:
        for p in (profiler, simulator, broker):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        log.close()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--firmware-mb", type=float, default=1.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connect-rate", type=float, default=500)
    parser.add_argument("--limit", type=float, default=600, help="seconds for each phase at most")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rate-per-minute", type=int, help="pace the job's notices (default: all at once)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory and logs")
    parser.add_argument("--profile", help="py-spy raw output file for the broker during the campaign")
    args = parser.parse_args()
    result = asyncio.run(campaign(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
