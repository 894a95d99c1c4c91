"""Replicas: three `ota-broker run` processes attached to one real Mosquitto 2, sharing one real PostgreSQL
database and one data folder, run a paced, phased campaign with retries over simulated devices
(`ota-broker simulate`, which fails some attempts as scripted by its seed); the replica running the periodic
work is killed with SIGKILL in the middle, and the campaign finishes on the other two.

What must hold: every device upgraded, its task succeeded once; each device received one notice per
attempt of its task (no replica notified twice, the one killed included); no notice of the second phase
before the first phase reached its threshold; and never more notices in a second than the pace allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef
from simulator.fleet import AttemptPlan
from simulator.model import SimulationOptions
from tests.e2e.processes import Launched, attached_replica
from tests.mosquitto import Mosquitto, running_mosquitto
from tests.postgres import Postgres
from tests.support import eventually

DEVICES = 300
PHASES = [10, 90]  # 30 devices, then 270
SUCCESS_THRESHOLD = 80
RATE_PER_MINUTE = 1200  # 20 notices a second over all replicas
RETRIES = 3  # four attempts a device at most
FAIL_RATE = 0.05
SEED = 7
KILL_AFTER_SUCCEEDED = 90  # the leading replica dies once this many tasks have succeeded
CAMPAIGN_S = 150.0  # the whole campaign, kill included, within this
FIRMWARE = os.urandom(32 * 1024)
NAMES = [f"pk/dev{i:05d}" for i in range(DEVICES)]


SECRETS = {name: f"secret-{i}" for i, name in enumerate(NAMES)}


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """The devices' broker: it knows each device's Aliyun-signed login (the simulator signs with SECRETS)."""
    logins = [login_for(DeviceRef.parse(name), secret) for name, secret in SECRETS.items()]
    with running_mosquitto(tmp_path / "mosquitto", {x.username: x.password for x in logins}) as m:
        yield m


@pytest.fixture
async def database(postgres_server: Postgres) -> AsyncIterator[str]:
    dsn = await postgres_server.new_database()
    yield dsn
    await postgres_server.drop_database(dsn)


def _scripted_failures_leave_room_for_the_kill() -> None:
    """The seed's plan: every device succeeds in at least two of its four attempts by script, so that one more
    failed attempt (a download cut by the kill) still leaves it one to succeed in."""
    options = SimulationOptions(devices=DEVICES, fail_rate=FAIL_RATE, seed=SEED)
    for name in NAMES:
        planned = [AttemptPlan.draw(options, name, n).failure for n in range(1, RETRIES + 2)]
        assert sum(f is None for f in planned) >= 2, f"seed {SEED}: {name} fails {planned}"


class Api:
    """The management API of whichever replica is alive."""

    def __init__(self, http: aiohttp.ClientSession, replicas: list[Launched]) -> None:
        self.http = http
        self.replicas = replicas

    def alive(self) -> Launched:
        return next(r for r in self.replicas if r.proc is not None and r.proc.poll() is None)

    async def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        replica = self.alive()
        headers = {"Authorization": f"Bearer {replica.token}"}
        async with self.http.request(method, replica.admin_api + path, headers=headers, **kwargs) as r:
            body = await r.read()
            assert r.status == expect, f"{method} {path}: {r.status} {body[:300]!r}"
            return json.loads(body)


def _leader(replicas: list[Launched]) -> Launched | None:
    for replica in replicas:
        lines = [line for line in replica.lines if "the periodic work" in line]
        if lines and "now runs" in lines[-1] and replica.proc is not None and replica.proc.poll() is None:
            return replica
    return None


@pytest.mark.timeout(CAMPAIGN_S + 120)
async def test_three_replicas_finish_a_campaign_when_the_leading_one_is_killed(
    tmp_path: Path, mosquitto: Mosquitto, database: str
) -> None:
    _scripted_failures_leave_room_for_the_kill()
    data = tmp_path / "data"  # one folder for all: firmware, the link key, the certificates
    replicas = [attached_replica(tmp_path, i, data, mosquitto.url, database) for i in range(3)]
    simulator: asyncio.subprocess.Process | None = None
    try:
        # Started at once: they make the folder's keys and certificates, and the schema, once between them.
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
        leader = await eventually(lambda: _leader(replicas), 10.0, "one replica to lead")
        assert sum(_leader([r]) is not None for r in replicas) == 1
        results = tmp_path / "simulation.json"
        secrets = tmp_path / "devices.csv"
        secrets.write_text(
            "".join(f"{name.replace('/', ',')},{secret}\n" for name, secret in SECRETS.items())
        )
        simulator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "simulate", "--devices", str(DEVICES), "--secrets", str(secrets),
            "--port", str(mosquitto.port), "--ca-file", str(data / "tls" / "ca.crt"),
            "--fail-rate", str(FAIL_RATE), "--seed", str(SEED), "--connect-rate", "0",
            "--idle-exit", "15", "--duration-limit", str(CAMPAIGN_S), "--json", str(results),
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            api = Api(http, replicas)

            async def all_recorded() -> bool:
                return len(await api.call("GET", "/devices?product_key=pk&limit=1000")) == DEVICES

            try:
                await eventually(all_recorded, 30.0, f"the {DEVICES} devices to inform")
            except AssertionError as e:
                known = len(await api.call("GET", "/devices?product_key=pk&limit=1000"))
                with contextlib.suppress(ProcessLookupError):
                    simulator.kill()
                said = (await simulator.communicate())[0].decode(errors="replace")[-3000:]
                logs = "\n".join(r.log[-3000:] for r in replicas) + "\nthe simulator said:\n" + said
                raise AssertionError(f"{e}: {known} recorded; the replicas said:\n{logs}") from None
            form = aiohttp.FormData()
            form.add_field("product_key", "pk")
            form.add_field("version", "2.0.0")
            form.add_field("file", io.BytesIO(FIRMWARE), filename="fw.bin")
            firmware = await api.call("POST", "/firmware", expect=201, data=form)
            job = await api.call(
                "POST",
                "/jobs",
                expect=201,
                json={
                    "firmware_id": firmware["id"],
                    "type": "static",
                    "rate_per_minute": RATE_PER_MINUTE,
                    "rollout": {"phases": PHASES, "success_threshold": SUCCESS_THRESHOLD},
                    "retry_count": RETRIES,
                    "retry_interval_minutes": 0.01,
                    "timeout_minutes": 0.25,
                    "notify_timeout_minutes": 0.25,
                },
            )
            assert job["total"] == DEVICES

            async def succeeded() -> int:
                view = await api.call("GET", f"/jobs/{job['id']}")
                return int(view["counts"].get("succeeded", 0))

            await eventually(
                lambda: _at_least(succeeded, KILL_AFTER_SUCCEEDED), 60.0, "the campaign to be under way"
            )
            assert leader.proc is not None
            os.kill(leader.proc.pid, signal.SIGKILL)
            assert leader.proc.wait(10) == -signal.SIGKILL
            killed_at = time.time()
            await eventually(lambda: _leader(replicas), 30.0, "another replica to lead")

            async def completed() -> dict[str, Any] | None:
                view = await api.call("GET", f"/jobs/{job['id']}")
                return view if view["state"] == "completed" else None

            try:
                view = await eventually(
                    completed, CAMPAIGN_S, "the campaign to complete on the other replicas"
                )
            except AssertionError as e:
                view = await api.call("GET", f"/jobs/{job['id']}")
                raise AssertionError(f"{e}: {view['counts']}") from None
            tasks = {t["device"]: t for t in await api.call("GET", f"/jobs/{job['id']}/tasks?limit=1000")}
            histories = {
                name: (await api.call("GET", f"/jobs/{job['id']}/tasks/{name}/history"))["history"]
                for name in NAMES
            }
        said, _ = await asyncio.wait_for(simulator.communicate(), CAMPAIGN_S)
        assert results.exists(), said.decode(errors="replace")[-2000:]
        simulated = {d["device"]: d for d in json.loads(results.read_text())["devices"]}

        assert sorted(tasks) == NAMES
        lost = {name for name, t in tasks.items() if t["state"] != "succeeded"}
        for name in NAMES:
            task, device = tasks[name], simulated[name]
            assert device["version"] == "2.0.0", (name, task, device)  # every device upgraded
            # One notice per attempt: no replica sent a device a second notice for an attempt, and every
            # attempt the device made was one the service counted.
            assert device["notices"] == task["attempts"] == device["attempts"], (name, task, device)
        # What the killed replica had received and not handled was not acknowledged: the replica that took
        # over its session handled it, so no report was lost and every task succeeded.
        assert not lost, f"{len(lost)} tasks did not succeed: {sorted((n, tasks[n]['state']) for n in lost)}"
        assert any(t["attempts"] > 1 for t in tasks.values()), (
            "no retry happened: the scripted failures did not"
        )
        _phases_in_order(histories)
        notices = [_at(h) for entries in histories.values() for h in entries if h["state"] == "notified"]
        assert len(notices) == sum(t["attempts"] for t in tasks.values())
        _paced([t for t in notices if t < killed_at])  # each leader paces its own steps
        _paced([t for t in notices if t > killed_at])
    finally:
        if simulator is not None and simulator.returncode is None:
            simulator.kill()
            await simulator.wait()
        for replica in replicas:
            replica.close()
            (replica.workdir / "replica.log").write_text(replica.log)  # kept with the test's folder


async def _at_least(count: Any, wanted: int) -> bool:
    return bool(await count() >= wanted)


def _at(entry: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(str(entry["at"]).replace("Z", "+00:00")).timestamp()


def _phases_in_order(histories: dict[str, list[dict[str, Any]]]) -> None:
    """No task of the second phase (the devices after the first PHASES[0] percent, in name order) was notified
    before the first phase had reached its success threshold."""
    first = NAMES[: DEVICES * PHASES[0] // 100]
    successes = sorted(_at(h) for name in first for h in histories[name] if h["state"] == "succeeded")
    reached = successes[-(-len(first) * SUCCESS_THRESHOLD // 100) - 1]
    second = min(_at(h) for name in NAMES[len(first) :] for h in histories[name] if h["state"] == "notified")
    assert second >= reached - 0.001, "the second phase started before the first reached its threshold"


def _paced(stamps: list[float]) -> None:
    """The pace is a token bucket of one step's worth (a second's) refilled at RATE_PER_MINUTE: in any window
    of w seconds at most (w + 1) seconds' worth of notices (plus one, for where a window happens to fall).
    Without the pace, the second phase's 270 notices would leave in one step."""
    stamps = sorted(stamps)
    per_second = RATE_PER_MINUTE / 60
    for window in (1.0, 5.0):
        allowed = (window + 1) * per_second + 1
        for i, start in enumerate(stamps):
            inside = sum(1 for s in stamps[i:] if s < start + window)
            assert inside <= allowed, f"{inside} notices in the {window:g} s from {start}"
