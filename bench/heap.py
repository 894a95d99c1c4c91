"""Where a connected client's memory goes: the broker runs in this process with `tracemalloc` on, a fleet of
idle clients (each subscribed to its own device topic, as `bench.run memory` connects them) connects from
worker processes, and the Python heap they added is reported per client, by allocation site and by object
type; the process's RSS per client is measured in a second pass without tracemalloc (which adds its own
bookkeeping to every block).

    .venv/bin/python -m bench.heap --devices 5000 [--out heap.json]

Everything listens on free loopback ports; the fleet's waits are bounded by `--limit` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.report import write_result
from bench.servers import free_port
from bench.workers import Fleet
from broker import app, datadir
from broker.config import load, prepare

TOP = 40


def _env(work: Path, port: int) -> dict[str, str]:
    return {
        "OTA_AUTH_MODE": "open",
        "OTA_DATA_DIR": str(work / "data"),
        "OTA_MQTT_BIND": f"127.0.0.1:{port}",
        "OTA_MQTTS_BIND": "",
        "OTA_HTTPS_BIND": f"127.0.0.1:{free_port()}",
        "OTA_ADMIN_BIND": f"127.0.0.1:{free_port()}",
        "OTA_PUBLIC_URL": "https://127.0.0.1:8443",
    }


def _types() -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        counts[type(obj).__qualname__] += 1
    return counts


def _site(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{frame.lineno}"


async def _pass(devices: int, limit_s: float, trace: bool, logdir: Path) -> dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ota-heap-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")} | _env(work, port)
        settings = prepare(load(None, cwd=work), env)[1]
        datadir.prepare(settings.ota.data_dir)
        cfg = settings.amqtt_config()
        running = await app.start(cfg)
        fleet: Fleet | None = None
        me = psutil.Process()
        try:
            await asyncio.sleep(1.0)
            gc.collect()
            if trace:
                tracemalloc.start(1)
                types0 = _types()
                before = tracemalloc.take_snapshot()
            rss0 = me.memory_info().rss
            fleet, timing = await Fleet.connect(
                port, devices, procs=2, window=32, qos=1, logdir=logdir, label="heap", deadline_s=limit_s
            )
            await asyncio.sleep(1.0)
            gc.collect()
            rss1 = me.memory_info().rss
            n = timing["connected"]
            out: dict[str, Any] = {"connected": n, "rss_per_client_kib": round((rss1 - rss0) / n / 1024, 2)}
            if trace:
                after = tracemalloc.take_snapshot()
                types1 = _types()
                tracemalloc.stop()
                diff = after.compare_to(before, "lineno")
                total = sum(d.size_diff for d in diff)
                out["heap_per_client_bytes"] = round(total / n)
                out["sites"] = [
                    {
                        "site": _site(d.traceback[0]),
                        "bytes_per_client": round(d.size_diff / n),
                        "blocks": d.count_diff,
                    }
                    for d in diff[:TOP]
                ]
                grown = (types1 - types0).most_common(TOP)
                out["objects_per_client"] = {name: round(count / n, 2) for name, count in grown}
            return out
        finally:
            if fleet is not None:
                await fleet.close()
            await running.stop()


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    logdir = Path(tempfile.mkdtemp(prefix="ota-heap-log-"))
    plain = await _pass(args.devices, args.limit, False, logdir)  # first: the heap has not grown yet
    traced = await _pass(args.devices, args.limit, True, logdir)
    return {"devices": args.devices, "python": sys.version.split()[0], "traced": traced, "rss": plain}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--limit", type=float, default=120.0, help="seconds allowed to connect the fleet")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    write_result(asyncio.run(amain(args)), args.out)


if __name__ == "__main__":
    main()
