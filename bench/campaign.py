"""Whole-campaign benchmark: N simulated devices, one firmware, notice -> success, against ota-broker.

    python -m bench.campaign --devices 1000 --firmware-mb 1 [--processes 2] [--out result.json]
        [--timeline seconds.csv] [--profile py-spy.txt] [--attached | --replicas N]

With `--replicas N` it runs N replicas of the attached service on one throwaway PostgreSQL (started as the
tests start theirs) and one data folder, and reports their CPU together, PostgreSQL's CPU and its
transactions; the job is launched through the first replica and each notice's link names the HTTPS port of
the replica that sent it (the one leading): no load balancer spreads the downloads.

It starts `python -m broker run` (open auth mode, a temporary data directory, free loopback ports), uploads
the firmware through the management API, starts `ota-broker simulate` with N devices (which connect and
inform 1.0.0), launches a static job for the product once every device has informed, and waits for the
simulator to end. It reports the simulator's "first notice -> last success" time, the per-device p50/p95,
the broker's CPU seconds during the campaign, and its resident memory.

From the job's launch to the end it also measures where the time goes (bench.probe): a client that is not a
device times PUBACKs (every 100 ms) and CONNACKs (a fresh connection every 2 s); the broker's Prometheus
endpoint, RSS and CPU are read every second (event-loop lag, downloads and transfers in flight, the admission
window, tasks waiting for it); and the simulator reports its own event-loop lag, so that a saturated simulator
is told apart from a saturated broker. The JSON goes to stdout (and `--out`), a markdown summary to stderr,
the per-second samples to `--timeline` as CSV. Every wait is bounded; every process it starts is stopped by
its PID in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.probe import BrokerSampler, ControlProbe, summarize, timeline
from bench.report import DASH, fmt
from bench.servers import MosquittoNoLimitServer, Server
from simulator.fleet import LoopLag
from simulator.model import lag_spread

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
    external: Server | None = None  # --attached: the Mosquitto the devices and the OTA service connect to
    if args.attached:
        external = MosquittoNoLimitServer(data / "mosquitto")
        await external.start()
        mqtt = external.port
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
    if external is not None:  # no broker of its own: the devices' messages come through Mosquitto
        env |= {"OTA_ATTACH_URL": f"mqtt://127.0.0.1:{mqtt}", "OTA_MQTT_BIND": f"127.0.0.1:{free_port()}"}
    database = contextlib.ExitStack()
    pg: Any = None
    if args.replicas:  # replicas of the attached service on one throwaway PostgreSQL (the tests' own)
        from tests.postgres import running_postgres  # noqa: PLC0415 - only for --replicas

        pg = database.enter_context(running_postgres())
        env["OTA_DATABASE_URL"] = await pg.new_database()
    log = (data / "broker.log").open("w")
    brokers = []
    for index in range(max(1, args.replicas)):
        own = {"OTA_ATTACH_CLIENT_ID": f"replica-{index}"} if args.replicas else {}
        if index:  # each replica its own HTTPS and API ports; the first one's are the bench's
            port = free_port()
            own |= {
                "OTA_HTTPS_BIND": f"127.0.0.1:{port}",
                "OTA_PUBLIC_URL": f"https://127.0.0.1:{port}",
                "OTA_ADMIN_BIND": f"127.0.0.1:{free_port()}",
            }
        brokers.append(
            subprocess.Popen(  # noqa: ASYNC220 - started once, stopped in finally
                [sys.executable, "-m", "broker", "run", "--log-level", "warning"],
                env=env | own,
                cwd=data,
                stderr=log,
            )
        )
    broker = brokers[0]
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
                # The total, not the page: a page holds at most 10,000 devices.
                async with http.get(f"{base}/devices?version=1.0.0&limit=1", headers=headers) as r:
                    return int(r.headers["X-Total-Count"]) >= args.devices

            t_connect = time.monotonic()
            await wait_for(informed, args.limit, f"{args.devices} devices to inform")
            connected_s = time.monotonic() - t_connect
            proc = psutil.Process(broker.pid)
            cpu0 = proc.cpu_times()
            replicas_cpu0 = sum(_cpu(p.pid) for p in brokers)
            external_cpu0 = external.cpu() if external is not None else 0.0
            pg_cpu0 = _cpu(pg.process.pid, tree=True) if pg is not None else 0.0
            pg_xact0 = await _transactions(env["OTA_DATABASE_URL"]) if pg is not None else 0
            if args.profile:
                profiler = subprocess.Popen(  # noqa: ASYNC220
                    ["py-spy", "record", "-p", str(broker.pid), "-d", "25", "-f", "raw", "-o", args.profile],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            spec: dict[str, Any] = {"firmware_id": firmware["id"], "type": "static"}
            if args.rate_per_minute:
                spec["rate_per_minute"] = args.rate_per_minute
            t_job = time.monotonic()
            stop = asyncio.Event()
            probe = ControlProbe("127.0.0.1", mqtt, started=t_job)
            sampler = BrokerSampler(
                http,
                f"http://127.0.0.1:{admin}/metrics",
                headers,
                proc,
                _process(simulator.pid),
                started=t_job,
            )
            own_lag = LoopLag()  # the probe's own loop: its latencies include this
            own_lag.start()
            watchers = [asyncio.create_task(probe.run(stop)), asyncio.create_task(sampler.run(stop))]
            t_done: float | None = None  # when the job had no unfinished task left (seconds since launch)
            try:
                async with http.post(f"{base}/jobs", json=spec, headers=headers) as r:
                    assert r.status == 201, await r.text()
                    job = await r.json()
                deadline = t_job + args.limit
                while simulator.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    if t_done is None and await _job_done(http, f"{base}/jobs/{job['id']}", headers):
                        t_done = time.monotonic() - t_job  # then the simulator disconnects the fleet
            finally:
                stop.set()
                await asyncio.gather(*watchers)  # each ends within its answer timeout
                own_lag.stop()
            cpu1 = proc.cpu_times()
            replicas_cpu = sum(_cpu(p.pid) for p in brokers) - replicas_cpu0
            external_cpu = round(external.cpu() - external_cpu0, 2) if external is not None else None
            pg_cpu = round(_cpu(pg.process.pid, tree=True) - pg_cpu0, 2) if pg is not None else None
            pg_xact = await _transactions(env["OTA_DATABASE_URL"]) - pg_xact0 if pg is not None else None
            async with http.get(f"{base}/jobs/{job['id']}", headers=headers) as r:
                final = await r.json()
        sim = json.loads(result_file.read_text()) if result_file.exists() else {}
        until = math.inf if t_done is None else t_done
        if args.timeline:
            write_csv(args.timeline, timeline(sampler.samples, probe))
        return {
            "devices": args.devices,
            "firmware_mb": args.firmware_mb,
            "processes": args.processes,
            "rate_per_minute": args.rate_per_minute,
            "connect_and_inform_s": round(connected_s, 2),
            "job_counts": final.get("counts"),
            "simulator": simulator_figures(sim),
            "mode": (
                f"{args.replicas} replica(s) on PostgreSQL, attached to Mosquitto"
                if args.replicas
                else "attached to Mosquitto"
                if external is not None
                else "embedded"
            ),
            "replicas": args.replicas,
            "broker_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
            "replicas_cpu_s": round(replicas_cpu, 2),
            "mosquitto_cpu_s": external_cpu,
            "postgres_cpu_s": pg_cpu,
            "postgres_transactions": pg_xact,
            "broker_rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "job_done_s": None if t_done is None else round(t_done, 2),
            "control_probe": {  # from the launch until the job finished
                "puback": probe.puback.summary(until=until),
                "connack": probe.connack.summary(until=until),
                "own_loop_lag_ms": lag_spread(own_lag.samples),
            },
            "broker_samples": summarize([s for s in sampler.samples if s.t <= until]),
            # After the job finished, the simulator ends and its devices disconnect at once.
            "teardown": {
                "puback": probe.puback.summary(since=until),
                "connack": probe.connack.summary(since=until),
                "loop_lag_ms": summarize([s for s in sampler.samples if s.t >= until]).get("loop_lag_ms"),
            },
        }
    finally:
        for p in (profiler, simulator, *brokers):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        if external is not None:
            external.stop()
        database.close()  # the throwaway PostgreSQL, stopped by its PID
        log.close()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)


async def _job_done(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> bool:
    """Whether the job has no queued, notified, in-progress or unconfirmed task left."""
    async with http.get(url, headers=headers) as r:
        counts = (await r.json()).get("counts") or {}
    return not any(counts.get(state, 0) for state in ("queued", "notified", "in_progress", "confirm"))


def _cpu(pid: int, *, tree: bool = False) -> float:
    """CPU seconds of a process (with `tree`, and of its children: PostgreSQL's backends)."""
    try:
        process = psutil.Process(pid)
        procs = [process, *process.children(recursive=True)] if tree else [process]
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


async def _transactions(dsn: str) -> int:
    """Transactions committed or rolled back in the database so far (a statement outside one counts as one)."""
    import asyncpg  # noqa: PLC0415 - only for --replicas

    db = await asyncpg.connect(dsn)
    try:
        return int(
            await db.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await db.close()


def _process(pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid)
    return None


def simulator_figures(sim: dict[str, Any]) -> dict[str, Any]:
    """What the simulator's result says, without its per-device list: counts, failures told apart (a reported
    failure step, or a device that gave up on its MQTT link), the commonest reasons, its loop lag."""
    devices = sim.get("devices") or []
    failed = [d for d in devices if d.get("state") == "failed"]
    reasons = Counter(d["reason"][:100] for d in devices if d.get("reason") and not d.get("failed_step"))
    figures = {
        k: sim.get(k)
        for k in ("counts", "notice_to_last_success_s", "upgrade_seconds", "end_reason", "loop_lag_ms")
    }
    return figures | {
        "failed_reported": sum(1 for d in failed if d.get("failed_step")),
        "failed_gave_up": sum(1 for d in failed if not d.get("failed_step")),
        "reasons": dict(reasons.most_common(3)),
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _triple(doc: dict[str, Any] | None, keys: tuple[str, str, str], digits: int = 1) -> str:
    doc = doc or {}
    return " / ".join(fmt(doc.get(k), digits) for k in keys)


def markdown(result: dict[str, Any]) -> str:
    """The figures that say where a campaign's time went, as a markdown table."""
    sim = result["simulator"]
    counts = sim.get("counts") or {}
    probe = result["control_probe"]
    broker = result["broker_samples"]
    lag = broker.get("loop_lag_ms") or {}
    teardown = result.get("teardown") or {"puback": {}}
    ms3 = ("p50_ms", "p99_ms", "max_ms")
    rows = [
        ("devices (simulator processes)", f"{result['devices']:,} ({result['processes']})"),
        ("mode", result.get("mode", "embedded")),
        ("connect + inform (s)", fmt(result["connect_and_inform_s"], 2)),
        ("first notice -> last success (s)", fmt(sim.get("notice_to_last_success_s"), 2)),
        (
            "upgraded / failed (reported, gave up) / offline / unfinished",
            f"{fmt(counts.get('upgraded'))} / {fmt(counts.get('failed'))} ({sim['failed_reported']}, "
            f"{sim['failed_gave_up']}) / {fmt(counts.get('offline'))} / {fmt(counts.get('unfinished'))}",
        ),
        (
            "PUBACK p50 / p99 / max (ms), timeouts",
            f"{_triple(probe['puback'], ms3)}, {probe['puback']['timeouts']}",
        ),
        (
            "CONNACK p50 / p99 / max (ms), timeouts",
            f"{_triple(probe['connack'], ms3)}, {probe['connack']['timeouts']}",
        ),
        (
            "broker loop lag p50 / p99 / max at most (ms)",
            f"{fmt(lag.get('p50'), 1)} / {fmt(lag.get('p99'), 1)} / {fmt(lag.get('max_le'), 1)}",
        ),
        ("broker loop lag, worst second's mean (ms)", fmt(lag.get("worst_second_mean"), 1)),
        ("peak downloads active", fmt(broker.get("peak_downloads_active"))),
        ("peak transfers in flight", fmt(broker.get("peak_transfers_in_flight"))),
        ("peak admission window", fmt(broker.get("peak_admission_window"))),
        ("peak tasks waiting for capacity", fmt(broker.get("peak_tasks_waiting_for_capacity"))),
        ("broker peak RSS (MiB)", fmt(broker.get("peak_rss_mb"))),
        ("broker CPU during the campaign (s)", fmt(result["broker_cpu_s"], 1)),
        ("Mosquitto CPU during the campaign (s), attached", fmt(result.get("mosquitto_cpu_s"), 1)),
        ("all replicas' CPU (s); PostgreSQL's CPU (s), transactions", (
            f"{fmt(result.get('replicas_cpu_s'), 1)}; {fmt(result.get('postgres_cpu_s'), 1)}, "
            f"{fmt(result.get('postgres_transactions'))}"
        )),
        ("simulator loop lag p50 / p99 / max (ms)", _triple(sim.get("loop_lag_ms"), ("p50", "p99", "max"))),
        ("simulator peak RSS (MiB), CPU (s)",
         f"{fmt(broker.get('simulator_peak_rss_mb'))}, {fmt(broker.get('simulator_cpu_s'), 1)}"),
        ("probe's own loop lag p50 / p99 / max (ms)", _triple(probe["own_loop_lag_ms"], ("p50", "p99", "max"))),
        ("job finished after (s); then, the fleet disconnecting: PUBACK max (ms), loop lag max at most (ms)",
         f"{fmt(result.get('job_done_s'), 1)}; {fmt(teardown['puback'].get('max_ms'), 1)}, "
         f"{fmt((teardown.get('loop_lag_ms') or {}).get('max_le'), 1)}"),
        ("/metrics scrapes failed, slowest (ms)",
         f"{broker.get('scrapes_failed', DASH)}, {fmt(broker.get('scrape_ms_max'))}"),
    ]  # fmt: skip
    lines = ["| figure | value |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]
    downloads = broker.get("downloads")
    if downloads:
        lines.append("")
        lines.append("downloads by outcome: " + ", ".join(f"{k} {fmt(v)}" for k, v in downloads.items()))
    if sim.get("reasons"):
        lines.append("devices' reasons: " + "; ".join(f"{n}x {r}" for r, n in sim["reasons"].items()))
    return "\n".join(lines)


def verdicts(result: dict[str, Any], max_rss_mb: float, max_puback_ms: float) -> dict[str, bool]:
    """The campaign's targets: every device upgraded (none failed, none offline), the broker's peak RSS and
    its slowest acknowledgement during the campaign within bounds, no acknowledgement timed out."""
    counts = result["simulator"].get("counts") or {}
    puback = result["control_probe"]["puback"]
    rss = result["broker_samples"].get("peak_rss_mb")
    return {
        "all_upgraded": counts.get("upgraded") == result["devices"],
        f"peak_rss_within_{max_rss_mb:g}_mb": rss is not None and rss <= max_rss_mb,
        f"puback_max_within_{max_puback_ms:g}_ms": puback.get("max_ms") is not None
        and puback["max_ms"] <= max_puback_ms
        and not puback["timeouts"],
    }


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
    parser.add_argument("--timeline", type=Path, help="CSV file for the per-second samples")
    parser.add_argument("--rate-per-minute", type=int, help="pace the job's notices (default: all at once)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory and logs")
    parser.add_argument(
        "--attached",
        action="store_true",
        help="the OTA service attached to a Mosquitto 2 (no limits) instead of its embedded broker",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="N replicas of the attached service on one throwaway PostgreSQL (implies --attached)",
    )
    parser.add_argument("--profile", help="py-spy raw output file for the broker during the campaign")
    parser.add_argument(
        "--max-rss-mb", type=float, default=512, help="target: the broker's peak RSS during the campaign"
    )
    parser.add_argument(
        "--max-puback-ms", type=float, default=1000, help="target: the slowest PUBACK during the campaign"
    )
    args = parser.parse_args()
    args.attached = args.attached or args.replicas > 0
    result = asyncio.run(campaign(args))
    result["targets"] = verdicts(result, args.max_rss_mb, args.max_puback_ms)
    text = json.dumps(result, indent=2)
    print(text)
    print(markdown(result), file=sys.stderr)
    met = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in result["targets"].items())
    print(f"targets: {met}", file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
