"""Upgrade campaigns end to end (issue 4): a real broker on 127.0.0.1:0, real MQTT devices, real HTTPS.

The big test drives one paced, phased job with retries and a timeout over 50 simulated devices and
restarts the broker in its middle; the others cover the threshold pause, device confirmation, tags,
cancelling by task and by state, the firmware verify flow and the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import hashlib
import io
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest

from broker import app as broker_app
from tests.support import TOKEN, Device, Env, Tls, broker_config, eventually

FIRMWARE = os.urandom(64 * 1024)
TAGS = {"campaign": "spring-2026", "ring": "beta"}

FLEET = [f"dev{i:02d}" for i in range(50)]
PHASE_1 = FLEET[:5]  # phases [10, 90] of 50 devices in name order: 5, then 45
FAIL_FIRST = {"dev01", "dev12", "dev27", "dev41"}  # step -2 on the first attempt, then fine
STUCK = "dev02"  # reports 50 % and never finishes: timed out 3 s later
RATE_PER_MINUTE = 600  # 10 notices a second
UNFINISHED = {"confirm", "queued", "notified", "in_progress"}
MAX_PER_SECOND = 11  # 10/s, plus one for where a one-second window happens to fall
FLEET_DEADLINE_S = 50.0  # the simulated devices stop acting after this long, whatever happens


# ------------------------------------------------------------------------------------ helpers


async def online(env: Env, names: list[str], version: str = "1.0.0") -> list[Device]:
    """Connected devices `pk/<name>` that informed `version`, once the broker has recorded them all."""
    devices = await asyncio.gather(*(env.device("pk", n).connect() for n in names))
    for d in devices:
        await d.inform(version)
    await recorded(env, len(names), version)
    return list(devices)


async def recorded(env: Env, count: int, version: str = "1.0.0") -> None:
    async def check() -> bool:
        found = await env.api("GET", f"/devices?product_key=pk&version={version}", expect=200)
        return len(found) >= count

    await eventually(check, what=f"{count} device(s) recorded on {version}")


async def upgrade(env: Env, d: Device, notice: dict[str, Any]) -> None:
    """What a healthy device does with a notice: download, report progress, inform the new version."""
    data = notice["data"]
    status, _, body = await env.download(data["url"])
    assert status == 200 and hashlib.md5(body).hexdigest() == data["md5"]
    await d.progress("50", "downloaded")
    await d.progress("100", "flashed")
    await d.inform(data["version"])


async def job_view(env: Env, job_id: int) -> dict[str, Any]:
    return await env.api("GET", f"/jobs/{job_id}", expect=200)  # type: ignore[no-any-return]


async def job_in(env: Env, job_id: int, state: str, timeout: float = 10.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = await job_view(env, job_id)
        return job if job["state"] == state else None

    return await eventually(check, timeout, f"job {job_id} to be {state}")  # type: ignore[no-any-return]


async def finished(env: Env, job_id: int, timeout: float) -> dict[str, Any]:
    """The job once completed; on time-out, fails naming the tasks still unfinished."""
    try:
        return await job_in(env, job_id, "completed", timeout)
    except AssertionError as e:
        tasks = await env.tasks(job_id)
        stuck = {ref: (t["state"], t["desc"]) for ref, t in tasks.items() if t["state"] in UNFINISHED}
        raise AssertionError(f"{e}; unfinished tasks: {stuck}") from e


async def history(env: Env, job_id: int, ref: str) -> list[dict[str, Any]]:
    answer = await env.api("GET", f"/jobs/{job_id}/tasks/{ref}/history", expect=200)
    return answer["history"]  # type: ignore[no-any-return]


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def busiest_second(times: list[float]) -> int:
    """The most of `times` inside any half-open window of one second."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def in_order(states: list[str], wanted: list[str]) -> bool:
    """Whether `wanted` appears in `states` as a subsequence (in this order, others in between)."""
    it = iter(states)
    return all(any(s == w for s in it) for w in wanted)


# ------------------------------------------------------------------ a broker that can restart


@dataclass
class Site:
    """One data directory and one set of certificates; the broker on them can stop and start again."""

    data_dir: Path
    tls: Tls
    http: aiohttp.ClientSession
    env: Env | None = None
    stopped: bool = True

    async def start(self) -> Env:
        running = await broker_app.start(broker_config(self.data_dir, self.tls))
        self.env, self.stopped = Env(running, self.tls, self.http), False
        return self.env

    async def stop(self) -> None:
        assert self.env is not None
        self.stopped = True
        await self.env.running.stop()


@pytest.fixture
async def site(tmp_path: Path, tls: Tls) -> AsyncIterator[Site]:
    """Like `env`, but the test may stop the broker and start a new one on the same data directory."""
    async with aiohttp.ClientSession() as http:
        s = Site(tmp_path / "data", tls, http)
        await s.start()
        try:
            yield s
        finally:
            if not s.stopped:
                assert s.env is not None
                for d in s.env.devices:
                    d.disconnect()
                await s.stop()


# ----------------------------------------------------------------------- simulated devices


class TimedDevice(Device):
    """A `Device` that also notes when each message arrived (in its network thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: list[float] = []

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        super()._on_message(c, u, msg)
        self.arrived.append(time.monotonic())

    def timed(self) -> list[tuple[float, str, dict[str, Any]]]:
        with self._lock:
            return [(t, topic, doc) for t, (topic, doc) in zip(self.arrived, self.received, strict=False)]

    def notice_times(self) -> list[float]:
        return [t for t, topic, _ in self.timed() if topic == self.upgrade_topic]


class Abandoned(Exception):
    """The attempt's notice went stale: the broker restarted before the device downloaded."""


@dataclass
class SimDevice:
    """A device that acts on its notices by itself: HTTPS download, progress 50 and 100, inform the new
    version; scripted to fail its first attempt (`fail_first`) or to hang after 50 % (`stuck`)."""

    name: str
    fleet: Fleet
    fail_first: bool = False
    stuck: bool = False
    version: str = "1.0.0"
    device: TimedDevice | None = None
    seen: int = 0
    notice: dict[str, Any] | None = None  # the notice of the attempt under way
    downloaded: bool = False
    in_step: bool = False
    stale: bool = False
    hung: bool = False
    failed_once: bool = False
    attempts: int = 0
    informed_target_at: float | None = None
    error: BaseException | None = None

    @property
    def dev(self) -> TimedDevice:
        assert self.device is not None
        return self.device

    def take_notice(self) -> dict[str, Any] | None:
        """The data of the next notice pushed to it or answered to its pull, if one arrived."""
        timed = self.dev.timed()
        while self.seen < len(timed):
            _, topic, doc = timed[self.seen]
            self.seen += 1
            if topic == self.dev.upgrade_topic or (topic.endswith("/firmware/get_reply") and doc.get("data")):
                return doc["data"]  # type: ignore[no-any-return]
        return None

    def unread_notice(self) -> bool:
        return any(topic == self.dev.upgrade_topic for _, topic, _ in self.dev.timed()[self.seen :])

    async def run(self) -> None:
        deadline = time.monotonic() + FLEET_DEADLINE_S
        try:
            while time.monotonic() < deadline:
                await self.fleet.released()
                notice = None if self.hung else self.take_notice()
                if notice is None:
                    await asyncio.sleep(0.02)
                    continue
                try:
                    await self.attempt(notice)
                except Abandoned:
                    self.notice = None
        except Exception as e:
            self.error = e
            raise

    async def step(self, action: Callable[[], Awaitable[Any]]) -> None:
        """One step of an attempt, never while the fleet holds still for a restart."""
        await self.fleet.released()
        if self.stale:
            self.stale = False
            raise Abandoned
        self.in_step = True
        try:
            await action()
        finally:
            self.in_step = False

    async def attempt(self, notice: dict[str, Any]) -> None:
        self.notice, self.downloaded = notice, False
        self.attempts += 1

        async def download() -> None:
            assert self.fleet.site.env is not None
            status, _, body = await self.fleet.site.env.download(notice["url"])
            assert status == 200, f"{self.name}: download answered {status}"
            assert hashlib.md5(body).hexdigest() == notice["md5"]

        await self.step(download)
        self.downloaded = True
        await self.step(lambda: self.dev.progress("50", "downloaded"))
        if self.stuck:
            self.hung = True
            return
        if self.fail_first and not self.failed_once:

            async def fail() -> None:
                self.failed_once = True
                await self.dev.progress("-2", "scripted download failure")

            await self.step(fail)
            self.notice = None
            return
        await self.step(lambda: self.dev.progress("100", "flashed"))

        async def inform() -> None:
            self.version = notice["version"]
            self.informed_target_at = time.monotonic()
            await self.dev.inform(self.version)

        await self.step(inform)
        self.notice = None

    async def resync(self, had_unread_notice: bool) -> None:
        """On its new connection after the restart: carry on where it was."""
        if self.hung:
            return  # a hung device stays connected and silent
        if (self.notice is not None and not self.downloaded) or (self.notice is None and had_unread_notice):
            self.stale = self.notice is not None
            await self.dev.pull()  # ask for the pending notice: its link names the new HTTPS port
        elif self.notice is None:
            await self.dev.inform(self.version)
        # else: downloaded already; its next step (a progress report) goes to the new broker


@dataclass
class Fleet:
    site: Site
    sims: list[SimDevice] = field(default_factory=list)
    holding: bool = False
    retired: list[TimedDevice] = field(default_factory=list)
    runs: list[asyncio.Task[None]] = field(default_factory=list)
    cleanup: asyncio.Future[list[None]] | None = None  # closing the connections of before the restart

    @property
    def env(self) -> Env:
        assert self.site.env is not None
        return self.site.env

    def sim(self, name: str) -> SimDevice:
        return next(s for s in self.sims if s.name == name)

    async def released(self) -> None:
        await eventually(lambda: not self.holding, 20.0, "the restart to finish")

    async def connect(self, suffix: str = "") -> None:
        devices = [
            TimedDevice(self.env.mqtt_port, "pk", s.name, client_id=f"pk.{s.name}{suffix}") for s in self.sims
        ]
        self.env.devices.extend(devices)
        await asyncio.gather(*(d.connect() for d in devices))
        for s, d in zip(self.sims, devices, strict=True):
            s.device, s.seen = d, 0

    def start(self) -> None:
        self.runs = [asyncio.create_task(s.run(), name=s.name) for s in self.sims]

    async def restart(self, pool: ThreadPoolExecutor) -> None:
        """Stop the broker under the connected devices and start a new one on the same data directory;
        the devices reconnect (new connections, new client ids) and carry on. The old connections are
        closed in the background (`cleanup`: paho may wait out a reconnect delay first)."""
        self.holding = True
        await eventually(lambda: not any(s.in_step for s in self.sims), what="every device between steps")
        await self.site.stop()
        old = {s.name: s.dev for s in self.sims}
        unread = {s.name: s.unread_notice() for s in self.sims}
        self.retired.extend(old.values())
        loop = asyncio.get_running_loop()
        self.cleanup = asyncio.gather(*(loop.run_in_executor(pool, d.disconnect) for d in old.values()))
        await self.site.start()
        await self.connect(suffix=".2")
        for s in self.sims:
            await s.resync(unread[s.name])
        self.holding = False

    async def stop(self) -> None:
        for t in self.runs:
            t.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)
        if self.cleanup is not None:
            await asyncio.wait_for(self.cleanup, 15.0)

    def all_devices(self, name: str) -> list[TimedDevice]:
        return [d for d in [*self.retired, *(s.dev for s in self.sims)] if d.dn == name]


# ------------------------------------------------------------------------------------ tests


async def test_fifty_devices_paced_phased_retried_timed_out_and_restarted(site: Site) -> None:
    """50 MQTT devices, one paced phased job with retries and a timeout, a broker restart midway: same outcome."""
    env = site.env
    assert env is not None
    fleet = Fleet(site)
    fleet.sims = [SimDevice(n, fleet, fail_first=n in FAIL_FIRST, stuck=n == STUCK) for n in FLEET]
    await fleet.connect()
    for s in fleet.sims:
        await s.dev.inform("1.0.0")
    await recorded(env, len(FLEET))
    fw = await env.upload(FIRMWARE, version="2.0.0")
    fleet.start()
    pool = ThreadPoolExecutor(max_workers=len(FLEET), thread_name_prefix="old-device")
    started = time.monotonic()
    try:
        job = await env.job(
            fw["id"],
            [f"pk/{n}" for n in FLEET],
            rate_per_minute=RATE_PER_MINUTE,
            rollout={"phases": [10, 90], "success_threshold": 80, "error_threshold_count": 10},
            retry_count=1,
            retry_interval_minutes=0.01,
            timeout_minutes=0.05,
        )
        job_id = job["id"]
        assert job["total"] == 50 and job["current_phase"] == 1

        # Midway: phase 2 has started and some of its notices are out; then the broker restarts.
        def phase_2_notices() -> int:
            return sum(len(fleet.sim(n).dev.notice_times()) for n in FLEET if n not in PHASE_1)

        await eventually(lambda: phase_2_notices() >= 5, 20.0, "phase 2 to be under way")
        before = await job_view(env, job_id)
        assert before["current_phase"] == 2 and before["state"] == "running"
        assert before["counts"]["succeeded"] < 45, "the restart must come in the middle of the job"
        pre_restart = {s.name: s.dev.notice_times() for s in fleet.sims}
        phase_1_done = sorted(t for n in PHASE_1 if (t := fleet.sim(n).informed_target_at) is not None)
        await fleet.restart(pool)
        env = site.env
        assert env is not None

        done = await finished(env, job_id, timeout=30.0)
        elapsed = time.monotonic() - started
    finally:
        await fleet.stop()
        pool.shutdown(wait=False)
    assert [s.name for s in fleet.sims if s.error is not None] == []

    # Phase 2's first notice came only after four of phase 1's five devices (80 %) had succeeded.
    assert len(phase_1_done) >= 4, phase_1_done
    first_phase_2 = min(t for n, times in pre_restart.items() if n not in PHASE_1 for t in times)
    assert first_phase_2 > phase_1_done[3]

    # The outcome: scripted failures retried once and then succeeded, the hung device timed out, the
    # rest succeeded at their first attempt.
    tasks = await env.tasks(job_id)
    assert len(tasks) == 50
    for name in FLEET:
        task = tasks[f"pk/{name}"]
        if name == STUCK:
            assert (task["state"], task["attempts"]) == ("timed_out", 1), task
        elif name in FAIL_FIRST:
            assert (task["state"], task["attempts"]) == ("succeeded", 2), task
        else:
            assert (task["state"], task["attempts"]) == ("succeeded", 1), task
    assert done["counts"]["succeeded"] == 49 and done["counts"]["timed_out"] == 1
    assert sum(done["counts"].values()) == done["total"] == 50
    assert done["success_rate"] == 0.98
    assert done["throughput_per_minute"] > 0

    # The report: a header and one row per task.
    async with env.http.get(
        f"{env.admin}/jobs/{job_id}/report.csv", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        assert r.status == 200 and r.content_type == "text/csv"
        rows = list(csv.reader(io.StringIO(await r.text())))
    header, body = rows[0], rows[1:]
    assert header[:4] == ["device", "module", "target_version", "state"] and "attempts" in header
    assert len(body) == 50
    report = {row[0]: dict(zip(header, row, strict=True)) for row in body}
    assert set(report) == {f"pk/{n}" for n in FLEET}
    assert report[f"pk/{STUCK}"]["state"] == "timed_out"
    assert report["pk/dev12"]["state"] == "succeeded" and report["pk/dev12"]["attempts"] == "2"

    # A retried device's history: notified, the failure, queued again, notified again, succeeded.
    # (The failure shows as the row that queues the task again, its desc naming the failure.)
    for name in sorted(FAIL_FIRST):
        steps = await history(env, job_id, f"pk/{name}")
        states = [h["state"] for h in steps]
        failures = [i for i, h in enumerate(steps) if "download failed" in h["desc"]]
        assert len(failures) == 1, (name, steps)
        failure = failures[0]
        assert in_order(states[:failure], ["queued", "notified", "in_progress"]), (
            f"{name}: its progress 50 (sent before its step -2) is missing before the failure: {steps}"
        )
        assert states[failure] in ("failed", "queued"), (name, steps)
        assert in_order(states[failure:], ["queued", "notified", "in_progress", "succeeded"]), (name, steps)
        assert states[-1] == "succeeded"
        stamps = [parse_time(h["at"]) for h in steps]
        assert stamps == sorted(stamps), (name, steps)
    stuck_history = await history(env, job_id, f"pk/{STUCK}")
    assert stuck_history[-1]["state"] == "timed_out" and "progress" in stuck_history[-1]["desc"]

    assert elapsed < 45.0, f"the job took {elapsed:.1f}s"

    # Pacing: notices spread out at 10 a second, not in bursts — on the devices' side before the
    # restart, and in the broker's own record of every notification (queued -> notified) over the job.
    arrivals = sorted(t for times in pre_restart.values() for t in times)
    first_second = [t for t in arrivals if t < arrivals[0] + 1.0]
    notified: list[float] = []
    for name in FLEET:
        steps = await history(env, job_id, f"pk/{name}")
        notified += [
            parse_time(b["at"])
            for a, b in itertools.pairwise(steps)
            if a["state"] == "queued" and b["state"] == "notified"
        ]
    assert len(notified) == 50 + len(FAIL_FIRST)
    assert max(notified) - min(notified) > 4.0, "54 notices at 10/s take more than 4 s"
    assert len(first_second) <= MAX_PER_SECOND + 1, (
        f"{len(first_second)} notices reached devices in the job's first second (10/s asked)"
    )
    assert busiest_second(notified) <= MAX_PER_SECOND, (
        f"{busiest_second(notified)} notifications within one second at rate_per_minute {RATE_PER_MINUTE}"
    )


async def test_error_threshold_pauses_the_job_until_resumed(env: Env) -> None:
    """A phased job reaching error_threshold_count 2 pauses by itself, sends nothing while paused, resumes."""
    names = [f"p{i}" for i in range(6)]
    devices = dict(zip(names, await online(env, names), strict=True))
    fw = await env.upload(FIRMWARE)
    job = await env.job(
        fw["id"],
        [f"pk/{n}" for n in names],
        rate_per_minute=60,  # one notice a second: the rest of phase 1 waits its turn
        rollout={"phases": [50, 50], "success_threshold": 30, "error_threshold_count": 2},
    )
    job_id = job["id"]
    for name in ("p0", "p1"):  # phase 1 is p0, p1, p2; the first two fail
        await devices[name].notices()
        await devices[name].progress("-2", "download failed on purpose")
        await env.task_state(job_id, f"pk/{name}", "failed")

    paused = await job_in(env, job_id, "paused", timeout=5.0)
    assert paused["pause_reason"] and "2" in paused["pause_reason"]
    assert paused["pause_reason"] != "paused by operator"
    assert paused["counts"]["failed"] == 2 and paused["counts"]["queued"] == 4

    # Paused: nothing goes out, not even to a device that informs its old version.
    await devices["p2"].inform("1.0.0")
    await asyncio.sleep(1.5)
    for name in names[2:]:
        assert devices[name].messages(devices[name].upgrade_topic) == [], name
    still = await job_view(env, job_id)
    assert still["state"] == "paused" and still["counts"]["queued"] == 4

    resumed = await env.api("POST", f"/jobs/{job_id}/resume", expect=200)
    assert resumed["state"] == "running" and resumed["pause_reason"] is None
    for name in names[2:]:  # p2 (phase 1), then phase 2 once a third of phase 1 succeeded
        [notice] = await devices[name].notices()
        await upgrade(env, devices[name], notice)
        await env.task_state(job_id, f"pk/{name}", "succeeded")
    done = await job_in(env, job_id, "completed")
    assert done["counts"]["failed"] == 2 and done["counts"]["succeeded"] == 4
    assert done["success_rate"] == round(4 / 6, 4)
    await env.api("POST", f"/jobs/{job_id}/resume", expect=409)


async def test_confirm_tags_and_cancelling_by_task_and_by_state(env: Env) -> None:
    """need_confirm holds tasks until confirmed; tags reach extData; one task and then queued ones cancel."""
    c0, c1, c3 = await online(env, ["c0", "c1", "c3"])
    await env.api("POST", "/devices", expect=201, json={"product_key": "pk", "device_name": "c2"})  # offline
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/c0", "pk/c1", "pk/c2", "pk/c3"], need_confirm=True, tags=TAGS)
    job_id = job["id"]
    assert job["counts"]["confirm"] == 4 and job["options"]["tags"] == TAGS
    await asyncio.sleep(0.6)  # a few dispatcher steps
    for d in (c0, c1, c3):
        assert d.messages(d.upgrade_topic) == [], d.ref
    assert {t["state"] for t in (await env.tasks(job_id)).values()} == {"confirm"}

    cancelled = await env.api("POST", f"/jobs/{job_id}/tasks/pk/c3/cancel", expect=200)
    assert cancelled["device"] == "pk/c3" and cancelled["state"] == "cancelled"
    await env.api("POST", f"/jobs/{job_id}/tasks/pk/c3/cancel", expect=409)
    await env.api("POST", f"/jobs/{job_id}/tasks/pk/nobody/cancel", expect=404)
    assert (await env.tasks(job_id))["pk/c0"]["state"] == "confirm"

    confirmed = await env.api("POST", f"/jobs/{job_id}/confirm", expect=200)
    assert confirmed["counts"]["confirm"] == 0
    [n0] = await c0.notices()
    [n1] = await c1.notices()
    assert n0["data"]["extData"] == TAGS and n1["data"]["extData"] == TAGS
    await env.task_state(job_id, "pk/c0", "notified")
    assert (await env.tasks(job_id))["pk/c2"]["state"] == "queued"  # offline: waits for its connect
    await c1.progress("50", "downloading")
    await env.task_state(job_id, "pk/c1", "in_progress")

    after = await env.api("POST", f"/jobs/{job_id}/cancel", expect=200, json={"states": ["queued"]})
    assert after["state"] == "running"
    tasks = await env.tasks(job_id)
    assert {n: t["state"] for n, t in tasks.items()} == {
        "pk/c0": "notified",
        "pk/c1": "in_progress",
        "pk/c2": "cancelled",
        "pk/c3": "cancelled",
    }
    c2 = await env.device("pk", "c2").connect()
    await c2.inform("1.0.0")
    await asyncio.sleep(0.6)
    assert c2.messages(c2.upgrade_topic) == [] and c3.messages(c3.upgrade_topic) == []

    await upgrade(env, c0, n0)
    await c1.inform("2.0.0")
    done = await job_in(env, job_id, "completed")
    assert done["counts"]["succeeded"] == 2 and done["counts"]["cancelled"] == 2
    c3_history = await history(env, job_id, "pk/c3")
    assert [h["state"] for h in c3_history] == ["confirm", "cancelled"]


async def test_verify_flow_over_the_api(env: Env) -> None:
    """verify=true firmware is unverified, refused (409) by static jobs unless forced, verified by a verify job."""
    v0, v1, v2, _ = await online(env, ["v0", "v1", "v2", "v3"])
    fw = await env.upload(FIRMWARE, verify="true")
    assert fw["status"] == "unverified"

    refused = await env.api(
        "POST", "/jobs", expect=409, json={"firmware_id": fw["id"], "type": "static", "devices": ["pk/v2"]}
    )
    assert "unverified" in refused["message"]
    forced = await env.job(fw["id"], ["pk/v2"], force=True)
    assert forced["total"] == 1
    [forced_notice] = await v2.notices()
    assert forced_notice["data"]["version"] == "2.0.0"

    verify = await env.job(fw["id"], ["pk/v0", "pk/v1"], type="verify")
    assert (await env.api("GET", f"/firmware/{fw['id']}", expect=200))["status"] == "verifying"
    during = await env.api(
        "POST", "/jobs", expect=409, json={"firmware_id": fw["id"], "type": "static", "devices": ["pk/v3"]}
    )
    assert "verifying" in during["message"]
    for d in (v0, v1):
        [notice] = await d.notices()
        await upgrade(env, d, notice)
    await job_in(env, verify["id"], "completed")

    async def verified() -> bool:
        return (await env.api("GET", f"/firmware/{fw['id']}", expect=200))["status"] == "verified"

    await eventually(verified, what="the firmware to be verified")
    unforced = await env.job(fw["id"], ["pk/v3"])
    assert unforced["total"] == 1


async def test_openapi_document_is_served(env: Env) -> None:
    """GET /api/v1/openapi.json answers the OpenAPI document naming the campaign routes."""
    doc = await env.api("GET", "/openapi.json", expect=200)
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path, method in [
        ("/jobs", "post"),
        ("/jobs/{id}/rerun", "post"),
        ("/jobs/{id}/pause", "post"),
        ("/jobs/{id}/resume", "post"),
        ("/jobs/{id}/confirm", "post"),
        ("/jobs/{id}/cancel", "post"),
        ("/jobs/{id}/report.csv", "get"),
        ("/jobs/{id}/tasks/{pk}/{dn}/cancel", "post"),
        ("/jobs/{id}/tasks/{pk}/{dn}/history", "get"),
    ]:
        assert method in paths[path], path
    async with env.http.get(env.admin + "/openapi.json") as r:
        assert r.status == 401
