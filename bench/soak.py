"""A connect/disconnect soak: does the broker's memory or its CPU per cycle creep over a long run?

For each broker named, in turn: a fresh server, two load-generator processes (`bench.loadgen`, role
`churn`) that run connect/disconnect cycles over a pool of device ids, and a sample of the server's RSS
and CPU time after every window of cycles. A cycle is what a device does when it comes online to report
its version: CONNECT, SUBSCRIBE to its upgrade topic (QoS 1), one QoS 1 inform with its version, its
PUBACK, DISCONNECT. After the last window the clients are gone and the RSS is read once more.

    .venv/bin/python -m bench.soak --cycles 100000 --brokers ota,mosquitto [--ota-ref REF] [--out soak.json]

The first window is the warm-up (every device of the pool is seen for the first time: the OTA service
records it, caches fill, the allocator takes its arenas); drift is measured from the end of it: the
RSS at the end against the RSS after the warm-up, and the CPU per cycle of the last windows against the
first windows after the warm-up (medians of three windows each). Every wait is bounded; everything runs
on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import write_result
from bench.servers import MQTT_SERVERS, OtaServer, Server, export_ref, snapshot_worktree
from bench.workers import WorkerProc, kill_all

PROCS = 2
EDGE = 3  # windows whose median is compared at each end
INFORM = '{"id":"1","params":{"version":"1.0.0"}}'


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sample(server: Server, cycles: int, failed: int, t0: float) -> dict[str, Any]:
    return {
        "cycles": cycles,
        "cpu_s": server.cpu(),
        "rss": server.rss(),
        "t": time.monotonic() - t0,
        "failed": failed,
    }


def summary(series: list[dict[str, Any]], idle_rss: int, after_rss: int) -> dict[str, Any]:
    """CPU per cycle per window, and the drift of RSS and CPU per cycle after the warm-up window."""
    windows = []
    for a, b in itertools.pairwise(series):
        n = b["cycles"] - a["cycles"]
        if n > 0:
            windows.append(
                {
                    "cycles": b["cycles"],
                    "cpu_us_per_cycle": round((b["cpu_s"] - a["cpu_s"]) / n * 1e6, 1),
                    "cycles_per_s": round(n / (b["t"] - a["t"]), 1),
                    "rss_mib": round(b["rss"] / 2**20, 1),
                }
            )
    steady = windows[1:]  # after the warm-up window
    out: dict[str, Any] = {"windows": windows, "idle_rss_mib": round(idle_rss / 2**20, 1)}
    if len(steady) >= 2 * EDGE:
        first = statistics.median(w["cpu_us_per_cycle"] for w in steady[:EDGE])
        last = statistics.median(w["cpu_us_per_cycle"] for w in steady[-EDGE:])
        out["cpu_us_per_cycle_first"] = first
        out["cpu_us_per_cycle_last"] = last
        out["cpu_drift"] = round(last / first - 1, 3)
        cpus = [w["cpu_us_per_cycle"] for w in steady]
        out["cpu_us_per_cycle_median"] = statistics.median(cpus)
        out["cpu_us_per_cycle_range"] = [min(cpus), max(cpus)]
    if windows:
        warm = windows[0]["rss_mib"]
        end = windows[-1]["rss_mib"]
        out["rss_warm_mib"] = warm
        out["rss_end_mib"] = end
        out["rss_drift"] = round(end / warm - 1, 3)
        out["rss_after_clients_left_mib"] = round(after_rss / 2**20, 1)
    return out


async def soak(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = MQTT_SERVERS[name](workdir / name)
    logdir = workdir / name / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    workers: list[WorkerProc] = []
    try:
        await server.start()
        await asyncio.sleep(1.0)
        share = args.pool // PROCS
        for k in range(PROCS):
            spec = {
                "role": "churn",
                "host": "127.0.0.1",
                "port": server.port,
                "prefix": "dev",
                "first": k * share,
                "count": share,
                "concurrency": args.concurrency,
                "topic_fmt": "/ota/device/upgrade/pk/dev{i}",
                "inform_fmt": "/ota/device/inform/pk/dev{i}",
                "payload": INFORM,
                "step_timeout": 30.0,
            }
            workers.append(await WorkerProc.spawn(spec, f"{name}-churn{k}", logdir))
        idle_rss = server.rss()
        t0 = time.monotonic()
        deadline = t0 + args.limit
        cycles = failed = 0
        series = [sample(server, 0, 0, t0)]
        errors: list[str] = []
        while cycles < args.cycles and time.monotonic() < deadline:
            n = min(args.window, args.cycles - cycles)
            left = max(1.0, deadline - time.monotonic())
            for k, w in enumerate(workers):
                await w.send(cmd="go", cycles=n // PROCS + (k < n % PROCS), deadline_s=left)
            for w in workers:
                done = await w.expect("done", left + 30.0)
                cycles += int(done["ok"])
                failed += int(done["failed"])
                errors += done["errors"]
            series.append(sample(server, cycles, failed, t0))
            last = series[-1]
            log(
                f"{name}: {cycles} cycles, {failed} failed, RSS {last['rss'] / 2**20:.1f} MiB, "
                f"{(last['cpu_s'] - series[-2]['cpu_s']) / max(n, 1) * 1e6:.0f} us/cycle"
            )
            if server.process is None or not server.process.alive():
                raise RuntimeError(f"{name} exited:\n{server.process.log_tail() if server.process else ''}")
        await kill_all(workers)
        await asyncio.sleep(2.0)  # the last disconnects handled, the sessions dropped
        out = summary(series, idle_rss, server.rss())
        out |= {
            "cycles": cycles,
            "failed": failed,
            "errors": errors[:10],
            "wall_s": round(time.monotonic() - t0, 1),
        }
        return out
    finally:
        await kill_all(workers)
        server.stop()


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ota-soak-"))
    result: dict[str, Any] = {
        "argv": sys.argv[1:],
        "cycles": args.cycles,
        "pool": args.pool,
        "window": args.window,
        "concurrency_per_process": args.concurrency,
        "brokers": {},
    }
    if args.ota_ref == "snapshot":
        result["ota_source"] = snapshot_worktree(workdir / "ota-src")
        OtaServer.source = workdir / "ota-src"
    elif args.ota_ref:
        result["ota_source"] = export_ref(args.ota_ref, workdir / "ota-src")
        OtaServer.source = workdir / "ota-src"
    for name in args.brokers.split(","):
        log(f"{name}: {args.cycles} cycles over {args.pool} device ids")
        result["brokers"][name] = await soak(name, args, workdir)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="ota,mosquitto", help=f"of: {', '.join(MQTT_SERVERS)}")
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=5_000, help="cycles between two samples")
    parser.add_argument("--pool", type=int, default=2_000, help="device ids the cycles go over")
    parser.add_argument("--concurrency", type=int, default=16, help="cycles at once per load process")
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds allowed per broker")
    parser.add_argument("--ota-ref", default="", help="run ota-broker from `git archive REF` (or 'snapshot')")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for name in args.brokers.split(","):
        if name not in MQTT_SERVERS:
            parser.error(f"unknown broker {name!r}")
    write_result(asyncio.run(amain(args)), args.out)


if __name__ == "__main__":
    main()
