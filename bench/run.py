"""Side-by-side MQTT and HTTPS benchmarks: stock amqtt, ota-broker and Mosquitto; ota-broker's firmware
endpoint and nginx. Everything runs on 127.0.0.1 with ports chosen free, every process is started here
in a process group of its own and stopped by that group, and every loop is bounded in count and time.

    .venv/bin/python bench/run.py all --quick                 # smoke test, about 75 s
    .venv/bin/python bench/run.py all                         # the full run, about 25 min
    .venv/bin/python bench/run.py fanin --brokers amqtt,ota,mosquitto,mosquitto_nolimit
    .venv/bin/python bench/run.py report /tmp/ota-bench/<run>/results.json   # tables and chart again

Subcommands: fanin, fanout, connect, memory, https, all, report. Results: a JSON file (`--out`, default
/tmp/ota-bench/<time>/results.json), a markdown report printed to stdout (and saved beside the JSON),
and a PNG chart of fan-in rate against subscribed devices (`--chart`, default beside the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import https_row, mqtt_rows, report
from bench.mqtt_rows import Limits, log
from bench.servers import (
    MQTT_SERVERS,
    REPO,
    OtaServer,
    ensure_packages,
    export_ref,
    snapshot_worktree,
    tool_version,
)

COMMANDS = ("fanin", "fanout", "connect", "memory", "https", "all", "report")


def ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("results", nargs="*", help="for `report`: results JSON files to render (merged in order)")
    p.add_argument("--brokers", default="amqtt,ota,mosquitto", help=f"of: {', '.join(MQTT_SERVERS)}")
    p.add_argument("--quick", action="store_true", help="1 repetition, small sizes: a smoke test")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 3; --quick: 1)")
    p.add_argument("--subs", help="fan-in idle subscriptions (default 0,1000,10000; --quick: 0,200)")
    p.add_argument("--qos", default="0,1", help="fan-in QoS levels (default 0,1)")
    p.add_argument("--devices", help="fleet sizes N (default 5000,10000; --quick: 500)")
    p.add_argument("--target-seconds", type=float, help="aim of one fan-in run (default 3; --quick: 1)")
    p.add_argument("--run-seconds", type=float, help="hard limit of one fan-in run (default 10; --quick: 5)")
    p.add_argument("--max-messages", type=int, default=1_000_000, help="cap of one fan-in run")
    p.add_argument("--connect-seconds", type=float, help="limit to connect one fleet (default 300)")
    p.add_argument("--fanout-seconds", type=float, help="limit of one fan-out round (default 60)")
    p.add_argument(
        "--fanout-rounds",
        type=int,
        default=1,
        help="fan-out rounds on each fleet (a table of each round's cost)",
    )
    p.add_argument("--https-mb", type=int, help="firmware file size in MB (default 100; --quick: 10)")
    p.add_argument("--https-clients", type=int, default=10)
    p.add_argument("--https-seconds", type=float, default=300.0, help="limit of one download round")
    p.add_argument(
        "--ota-ref",
        help="run ota-broker from this git ref (exported with git archive), or from `snapshot`: a copy of "
        "the working tree taken at start (default: the live working tree)",
    )
    p.add_argument("--out", type=Path, help="results JSON (default /tmp/ota-bench/<time>/results.json)")
    p.add_argument("--chart", type=Path, help="fan-in chart PNG (default beside the results)")
    p.add_argument(
        "--compare",
        type=Path,
        action="append",
        help="for `report`: an earlier results JSON whose ota-broker fan-in curve to add (repeatable)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.reps = args.reps or (1 if q else 3)
    args.subs = ints(args.subs) if args.subs else ([0, 200] if q else [0, 1000, 10000])
    args.qos = ints(args.qos)
    args.devices = ints(args.devices) if args.devices else ([500] if q else [5000, 10000])
    args.target_seconds = args.target_seconds or (1.0 if q else 3.0)
    args.run_seconds = args.run_seconds or (5.0 if q else 10.0)
    args.connect_seconds = args.connect_seconds or (60.0 if q else 300.0)
    args.fanout_seconds = args.fanout_seconds or (20.0 if q else 60.0)
    args.https_mb = args.https_mb or (10 if q else 100)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    for b in args.brokers:
        if b not in MQTT_SERVERS:
            p.error(f"unknown broker {b!r} (known: {', '.join(MQTT_SERVERS)})")
    if args.command != "report" and args.results:
        p.error(f"{args.command} takes no results file")
    if args.command == "report" and not args.results:
        p.error("report needs the results JSON")
    return args


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        la = os.getloadavg()
        return f"load average: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_gib = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gib = 0.0
    return f"{os.cpu_count()} vCPU {model}, {mem_gib:.0f} GiB RAM, Linux {platform.release()}"


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, check=False)
        return out.stdout.rstrip()

    dirty = [
        line[3:] for line in git("status", "--porcelain").splitlines() if line[3:].split("/")[0] != "bench"
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty}


def versions() -> dict[str, str]:
    import aiohttp  # noqa: PLC0415
    import amqtt  # noqa: PLC0415

    return {
        "Python": platform.python_version(),
        "amqtt": getattr(amqtt, "__version__", "?"),
        "aiohttp": aiohttp.__version__,
        "mosquitto": tool_version(["mosquitto", "-h"]).replace("mosquitto version ", ""),
        "nginx": tool_version(["nginx", "-v"]).rsplit("/", 1)[-1],
        "curl": tool_version(["curl", "--version"]).split(" (")[0].removeprefix("curl "),
        "OpenSSL": tool_version(["openssl", "version"]).split(" (")[0].removeprefix("OpenSSL "),
    }


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace, results: dict[str, Any], save: Any) -> None:
    workdir = args.out.parent / "work"
    logdir = args.out.parent / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    limits = Limits(
        reps=args.reps,
        target_s=args.target_seconds,
        run_s=args.run_seconds,
        max_messages=args.max_messages,
        connect_s=args.connect_seconds,
        fanout_s=args.fanout_seconds,
        fanout_rounds=args.fanout_rounds,
    )
    results["meta"]["limits"] = vars(limits)

    def factories(stage: str) -> dict[str, Any]:
        return {
            name: (lambda name=name, stage=stage: MQTT_SERVERS[name](workdir / stage / name))
            for name in args.brokers
        }

    cmd = args.command
    if cmd in ("fanin", "all"):
        log(f"fan-in: brokers {args.brokers}, subscriptions {args.subs}, QoS {args.qos}")
        results["fanin"] = await mqtt_rows.fanin(factories("fanin"), args.subs, args.qos, limits, logdir)
        save()
    if cmd in ("fanout", "connect", "memory", "all"):
        fanout = cmd in ("fanout", "all")
        log(f"fleet: brokers {args.brokers}, devices {args.devices}, fan-out {fanout}")
        results["fleet"] = await mqtt_rows.fleet(
            factories("fleet"), args.devices, limits, logdir, fanout=fanout
        )
        save()
    if cmd in ("https", "all"):
        log(f"https: {args.https_mb} MB x {args.https_clients} clients")
        results["https"] = await https_row.https(
            workdir / "https", args.https_mb, args.https_clients, args.reps, args.https_seconds,
            tuple(b for b in args.brokers if b in ("ota", "ota_uvloop")) or ("ota",),
        )  # fmt: skip
        save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "report":
        paths = [Path(p) for p in args.results]
        results = report.merge([json.loads(p.read_text()) for p in paths])
        compare = [json.loads(c.read_text()) for c in args.compare or []]
        chart = report.chart(results, args.chart or paths[-1].parent / "bench-fanin.png", compare)
        print(report.markdown(results, chart))
        return 0
    raise_nofile()
    needs = {}
    if any(b.startswith("mosquitto") for b in args.brokers) and args.command != "https":
        needs["mosquitto"] = "mosquitto"
    if args.command in ("https", "all"):
        needs |= {"nginx": "nginx-light", "curl": "curl"}
    ensure_packages(needs)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out = (args.out or Path("/tmp/ota-bench") / stamp / "results.json").resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    chart_path = (args.chart or args.out.parent / "bench-fanin.png").resolve()
    if args.ota_ref == "snapshot":
        digest = snapshot_worktree(args.out.parent / "ota-src")
        OtaServer.source = args.out.parent / "ota-src"
        ota_source = f"snapshot = {digest} (a copy of the working tree at start, uncommitted edits included)"
    elif args.ota_ref:
        commit = export_ref(args.ota_ref, args.out.parent / "ota-src")
        OtaServer.source = args.out.parent / "ota-src"
        ota_source = f"git {args.ota_ref} = {commit} (exported; the working tree is not used)"
    else:
        ota_source = "the working tree of " + str(REPO)
    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "command": "bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "machine": machine(),
            "uptime_start": uptime(),
            "versions": versions(),
            "git": git_state(),
            "brokers": args.brokers,
            "ota_source": ota_source,
        }
    }

    def save() -> None:
        results["meta"]["uptime_end"] = uptime()
        results["meta"]["duration_s"] = round(time.time() - started, 1)
        args.out.write_text(json.dumps(results, indent=1))

    status = 0
    try:
        asyncio.run(run(args, results, save))
    except KeyboardInterrupt:
        status = 130
        results["meta"]["error"] = "interrupted"
    except Exception as e:
        status = 1
        results["meta"]["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {type(e).__name__}: {e}")
    finally:
        save()
    chart = report.chart(results, chart_path)
    text = report.markdown(results, chart)
    (args.out.parent / "report.md").write_text(text)
    print()
    print(text)
    log(f"results: {args.out}; report: {args.out.parent / 'report.md'}; chart: {chart}")
    return status


if __name__ == "__main__":
    sys.exit(main())
