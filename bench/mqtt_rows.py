"""The MQTT rows: fan-in with idle subscriptions, and the fleet rows (connect + subscribe, memory per
client, one distinct message to each device).

Each repetition runs the brokers in turn with the same workload; the caller takes medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.servers import Server
from bench.workers import (
    PUBLISHER_NICE,
    SUBSCRIBER_NICE,
    Fleet,
    WorkerProc,
    kill_all,
    progress_payload,
)

FANIN_FILTER = "/ota/device/progress/#"
PUBLISHERS = 10
PUBLISHER_PROCS = 2
IDLE_S = 2.0  # a run whose publishers are done ends after this long without a delivery
POLL_S = 0.1


@dataclass
class Limits:
    """How big and how long: every loop in the MQTT rows is bounded by these."""

    reps: int
    target_s: float  # a measured fan-in run should last about this long
    run_s: float  # and never longer than this
    max_messages: int  # per fan-in run
    connect_s: float  # connecting one fleet
    fanout_s: float  # one fan-out round
    fleet_procs: int = 4
    fleet_window: int = 25  # handshakes in flight per fleet process
    fanout_rounds: int = 1  # fan-out rounds on each fleet (the first is the one in the main table)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------- fan-in


class FaninRig:
    """One counting subscriber (nice -10) and 10 publishers in 2 processes (nice +5) on one broker."""

    def __init__(self, server: Server, sub: WorkerProc, pubs: list[WorkerProc]) -> None:
        self.server = server
        self.sub = sub
        self.pubs = pubs

    @classmethod
    async def open(cls, server: Server, qos: int, logdir: Path) -> FaninRig:
        workers: list[WorkerProc] = []
        try:
            sub = await WorkerProc.spawn(
                {
                    "role": "sub",
                    "host": "127.0.0.1",
                    "port": server.port,
                    "client_id": "bench-counter",
                    "filter": FANIN_FILTER,
                    "qos": qos,
                    "nice": SUBSCRIBER_NICE,
                },
                f"{server.name}-sub-q{qos}",
                logdir,
            )
            workers.append(sub)
            ready = await sub.ask("go", "ready", 60.0, t0=0)
            if ready["ok"] != 1:
                raise RuntimeError(f"the counting subscriber could not subscribe: {ready['errors']}")
            per_proc = PUBLISHERS // PUBLISHER_PROCS
            for p in range(PUBLISHER_PROCS):
                ids = [f"pub{p * per_proc + k}" for k in range(per_proc)]
                spec = {
                    "role": "pub",
                    "host": "127.0.0.1",
                    "port": server.port,
                    "client_ids": ids,
                    "topics": [[f"/ota/device/progress/pk/{cid}"] for cid in ids],
                    "qos": qos,
                    "payload": progress_payload(),
                    "window": 100,
                    "nice": PUBLISHER_NICE,
                }
                workers.append(await WorkerProc.spawn(spec, f"{server.name}-pub{p}-q{qos}", logdir))
        except BaseException:
            await kill_all(workers)
            raise
        return cls(server, workers[0], workers[1:])

    async def close(self) -> None:
        await kill_all([self.sub, *self.pubs])

    async def run(self, total: int, limits: Limits) -> dict[str, Any]:
        """Publish `total` messages (10 publishers) as fast as possible; count what the subscriber gets."""
        per_conn = max(1, math.ceil(total / PUBLISHERS))
        expected = per_conn * PUBLISHERS
        await self.sub.ask("reset", "reset")
        cpu0 = self.server.cpu()
        t0 = time.time() + 0.05
        for pub in self.pubs:
            await pub.send(cmd="go", t0=t0, count=per_conn, time_limit=limits.run_s)
        done_tasks = [asyncio.ensure_future(p.expect("done", limits.run_s + 60)) for p in self.pubs]
        timed_out = False
        report: dict[str, Any] = {}
        try:
            while True:
                await asyncio.sleep(POLL_S)
                report = await self.sub.ask("report", "report")
                now = time.time()
                if report["received"] >= expected:
                    break
                if all(t.done() for t in done_tasks):
                    sent = sum(t.result()["sent"] for t in done_tasks)
                    t_end = max(t.result()["t_end"] for t in done_tasks)
                    if report["received"] >= sent or now - max(report["last"], t_end) > IDLE_S:
                        break
                if now > t0 + limits.run_s:
                    timed_out = True
                    break
            cpu1 = self.server.cpu()
            dones = await asyncio.gather(*done_tasks)
        finally:
            for t in done_tasks:
                t.cancel()
        sent = sum(d["sent"] for d in dones)
        received = report["received"]
        elapsed = (report["last"] - t0) if received else 0.0
        cpu = cpu1 - cpu0
        wall = time.time() - t0
        if timed_out:
            await self.drain()
        return {
            "sent": sent,
            "received": received,
            "lost": max(0, sent - received) if not timed_out else None,
            "timed_out": timed_out,
            "seconds": round(elapsed, 4),
            "rate": round(received / elapsed, 1) if elapsed > 0 else 0.0,
            "cpu_s": round(cpu, 3),
            "cpu_us_per_msg": round(cpu / received * 1e6, 2) if received else None,
            "cpu_util": round(cpu / elapsed, 3) if elapsed > 0 else None,
            "wall_s": round(wall, 3),
            "errors": [e for d in dones for e in d["errors"]][:3],
        }

    async def drain(self, max_s: float = 120.0) -> None:
        """After a run cut short: wait (bounded) until the broker has stopped delivering its backlog."""
        deadline = time.time() + max_s
        last = -1
        while time.time() < deadline:
            report = await self.sub.ask("report", "report")
            if report["received"] == last:
                return
            last = report["received"]
            await asyncio.sleep(IDLE_S)


async def calibrate(rig: FaninRig, limits: Limits) -> dict[str, Any]:
    """Probe runs (not counted): how many messages make a run of about `target_s` on this broker."""
    m = 500
    probe: dict[str, Any] = {}
    for _ in range(4):
        probe = await rig.run(m, limits)
        if probe["seconds"] >= 0.3 or m >= limits.max_messages or probe["timed_out"] or not probe["received"]:
            break
        m = min(limits.max_messages, max(m * 10, int(probe["rate"] * 0.5)))
    rate = probe["rate"] or 100.0
    count = int(min(limits.max_messages, max(200, rate * limits.target_s)))
    return {"probe_messages": m, "probe_rate": probe["rate"], "messages": count}


async def fanin(
    make: dict[str, Callable[[], Server]],
    levels: list[int],
    qos_levels: list[int],
    limits: Limits,
    logdir: Path,
) -> list[dict[str, Any]]:
    """Rows of fan-in rate and CPU per message, per (idle subscriptions, QoS, broker)."""
    rows: list[dict[str, Any]] = []
    servers: dict[str, Server] = {}
    try:
        for name, factory in make.items():
            servers[name] = factory()
            await servers[name].start()
        for subs in levels:
            fleets: dict[str, Fleet] = {}
            setup: dict[str, Any] = {}
            try:
                for name, server in servers.items():
                    if subs:
                        log(f"fanin: {name}: connecting {subs} idle subscribed clients")
                        fleet, timing = await Fleet.connect(
                            server.port,
                            subs,
                            procs=limits.fleet_procs,
                            window=limits.fleet_window,
                            qos=1,
                            logdir=logdir,
                            label=f"fanin-{name}-S{subs}",
                            deadline_s=limits.connect_s,
                        )
                        fleets[name] = fleet
                        setup[name] = timing
                        log(f"fanin: {name}: {timing['connected']} connected in {timing['seconds']} s")
                for qos in qos_levels:
                    rows.append(await _fanin_level(servers, subs, qos, limits, logdir, setup))
            finally:
                await asyncio.gather(*(f.close() for f in fleets.values()), return_exceptions=True)
                await asyncio.sleep(1.0)  # let the brokers tear the sessions down before the next level
    finally:
        for server in servers.values():
            server.stop()
    return rows


async def _fanin_level(
    servers: dict[str, Server],
    subs: int,
    qos: int,
    limits: Limits,
    logdir: Path,
    setup: dict[str, Any],
) -> dict[str, Any]:
    rigs: dict[str, FaninRig] = {}
    row: dict[str, Any] = {"subs": subs, "qos": qos, "loadavg_start": loadavg(), "brokers": {}}
    try:
        for name, server in servers.items():
            rigs[name] = await FaninRig.open(server, qos, logdir)
        calib = {}
        for name, rig in rigs.items():
            calib[name] = await calibrate(rig, limits)
            log(f"fanin S={subs} QoS{qos} {name}: calibrated {calib[name]}")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in rigs}
        for rep in range(limits.reps):
            for name, rig in rigs.items():
                result = await rig.run(calib[name]["messages"], limits)
                runs[name].append(result)
                log(
                    f"fanin S={subs} QoS{qos} {name} rep {rep + 1}: {result['rate']:,.0f} msg/s, "
                    f"{result['cpu_us_per_msg']} us/msg, {result['received']}/{result['sent']} "
                    f"util {result['cpu_util']}{' TIMED OUT' if result['timed_out'] else ''}"
                )
        for name in rigs:
            row["brokers"][name] = {
                "setup": setup.get(name),
                "calibration": calib[name],
                "runs": runs[name],
                "median": medians(runs[name], ("rate", "cpu_us_per_msg", "cpu_util", "received", "sent")),
            }
    finally:
        await asyncio.gather(*(r.close() for r in rigs.values()), return_exceptions=True)
    row["loadavg_end"] = loadavg()
    return row


def medians(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


# ---------------------------------------------------------------------------------------------- fleet


async def fleet(
    make: dict[str, Callable[[], Server]],
    sizes: list[int],
    limits: Limits,
    logdir: Path,
    *,
    fanout: bool,
    qos: int = 1,
) -> list[dict[str, Any]]:
    """Per N and broker (fresh each repetition): time to connect + subscribe N devices, broker RSS per
    device, and (when `fanout`) the time for one distinct message to reach each of them."""
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"devices": n, "qos": qos, "loadavg_start": loadavg(), "brokers": {}}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in make}
        for rep in range(limits.reps):
            for name, factory in make.items():
                result = await _fleet_once(factory, n, limits, logdir, fanout=fanout, qos=qos, rep=rep)
                runs[name].append(result)
                log(f"fleet N={n} {name} rep {rep + 1}: {summary(result)}")
        for name, rs in runs.items():
            row["brokers"][name] = {
                "runs": rs,
                "median": medians(
                    rs,
                    (
                        "connect_s",
                        "connect_cpu_s",
                        "rss_per_client_kib",
                        "rss_idle_mib",
                        "rss_mib",
                        "fanout_s",
                        "fanout_cpu_s",
                        "fanout_rate",
                    ),
                ),
            }
        row["loadavg_end"] = loadavg()
        rows.append(row)
    return rows


def summary(r: dict[str, Any]) -> str:
    parts = [f"connect {r['connect_s']} s ({r['connected']}/{r['devices']})"]
    parts.append(f"{r['rss_per_client_kib']} KiB/client")
    if "fanout_s" in r:
        parts.append(f"fanout {r['fanout_s']} s ({r['fanout_received']}/{r['devices']})")
    return ", ".join(parts)


async def _fleet_once(
    factory: Callable[[], Server], n: int, limits: Limits, logdir: Path, *, fanout: bool, qos: int, rep: int
) -> dict[str, Any]:
    server = factory()
    devices: Fleet | None = None
    try:
        await server.start()
        await asyncio.sleep(1.0)
        rss0 = server.rss()
        cpu0 = server.cpu()
        devices, timing = await Fleet.connect(
            server.port,
            n,
            procs=limits.fleet_procs,
            window=limits.fleet_window,
            qos=qos,
            logdir=logdir,
            label=f"fleet-{server.name}-N{n}-r{rep}",
            deadline_s=limits.connect_s,
        )
        cpu1 = server.cpu()
        await asyncio.sleep(1.0)
        rss1 = server.rss()
        connected = timing["connected"]
        result: dict[str, Any] = {
            "devices": n,
            "connected": connected,
            "failed": timing["failed"],
            "connect_s": timing["seconds"] if connected == n else None,
            "connect_partial_s": timing["seconds"],
            "connect_cpu_s": round(cpu1 - cpu0, 3),
            "rss_idle_mib": round(rss0 / 2**20, 1),
            "rss_mib": round(rss1 / 2**20, 1),
            "rss_per_client_kib": round((rss1 - rss0) / connected / 1024, 2) if connected else None,
            "errors": timing["errors"],
        }
        if fanout and connected:
            rounds = []
            for k in range(limits.fanout_rounds):
                rounds.append(await _fanout_round(server, devices, n, qos, limits, logdir, rep, k))
                if limits.fanout_rounds > 1:
                    log(
                        f"fleet N={n} {server.name} rep {rep + 1} round {k + 1}: {summary({**result, **rounds[-1]})}"
                    )
            result |= rounds[0]
            if limits.fanout_rounds > 1:
                result["fanout_rounds"] = [{k: r[k] for k in ("fanout_s", "fanout_cpu_s")} for r in rounds]
                result["rss_after_rounds_mib"] = round(server.rss() / 2**20, 1)
        return result
    finally:
        if devices is not None:
            await devices.close()
        server.stop()


async def _fanout_round(
    server: Server, devices: Fleet, n: int, qos: int, limits: Limits, logdir: Path, rep: int, k: int = 0
) -> dict[str, Any]:
    """One publisher sends one message to each device's own topic; time until the last one arrived."""
    topics = [Fleet.TOPIC_FMT.format(i=i) for i in range(n)]
    notice = (
        '{"code":"1000","data":{"size":1048576,"version":"2.0.0","url":"https://127.0.0.1/firmware/1",'
        '"md5":"00000000000000000000000000000000","signMethod":"Md5"},"id":1,"message":"success"}'
    )
    spec = {
        "role": "pub",
        "host": "127.0.0.1",
        "port": server.port,
        "client_ids": ["bench-operator"],
        "topics": [topics],
        "qos": qos,
        "payload": notice,
        "window": 100,
    }
    pub = await WorkerProc.spawn(spec, f"fanout-{server.name}-N{n}-r{rep}-{k}", logdir)
    try:
        await devices.reset()
        cpu0 = server.cpu()
        t0 = time.time() + 0.05
        await pub.send(cmd="go", t0=t0, count=n, time_limit=limits.fanout_s)
        done = asyncio.ensure_future(pub.expect("done", limits.fanout_s + 60))
        report: dict[str, Any] = {"received": 0, "last": 0.0}
        try:
            while time.time() < t0 + limits.fanout_s:
                await asyncio.sleep(POLL_S)
                report = await devices.report()
                if report["received"] >= n:
                    break
            cpu1 = server.cpu()
            sent = await done
        finally:
            done.cancel()
        received = report["received"]
        complete = received >= n
        elapsed = report["last"] - t0 if received else None
        return {
            "fanout_sent": sent["sent"],
            "fanout_received": received,
            "fanout_complete": complete,
            "fanout_s": round(elapsed, 4) if complete and elapsed is not None else None,
            "fanout_partial_s": round(elapsed, 4) if elapsed is not None else None,
            "fanout_rate": round(received / elapsed, 1) if elapsed else None,
            "fanout_cpu_s": round(cpu1 - cpu0, 3),
        }
    finally:
        with contextlib.suppress(Exception):
            await pub.kill()
