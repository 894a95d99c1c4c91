"""`ota-broker simulate` end to end: simulated Aliyun-SDK devices (paho on the asyncio loop, aiohttp Range
downloads) against a real broker on 127.0.0.1:0 with trustme TLS, checked through the management API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import trustme

from broker import app as broker_app
from simulator.display import summary_lines
from simulator.fleet import run_simulation
from simulator.model import DeviceState, EndReason, SimulationOptions, SimulationResult, read_secrets
from tests.support import Env, Tls, eventually, secure_config

FIRMWARE = os.urandom(200_000)
REASONS = {"-2": "download failed", "-3": "verification failed", "-4": "flash failed"}
RUN_S = 30.0
REPO = Path(__file__).resolve().parents[2]  # any one simulation here must be over within this


def options_for(env: Env, tmp_path: Path, **overrides: object) -> SimulationOptions:
    """Options aimed at the env broker's plain MQTT listener, trusting its trustme CA for HTTPS."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(env.tls.ca_pem)
    base = SimulationOptions(
        devices=20,
        port=env.mqtt_port,
        ca_file=ca_file,
        connect_rate=0,
        idle_exit=5,
        duration_limit=RUN_S,
        range_bytes=64 * 1024,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


async def all_informed(env: Env, refs: list[str], version: str = "1.0.0") -> None:
    async def check() -> bool:
        listed = await env.api("GET", f"/devices?version={version}", expect=200)
        return {f"{d['product_key']}/{d['device_name']}" for d in listed} >= set(refs)

    await eventually(check, timeout=RUN_S, what=f"{len(refs)} devices to inform {version}")


async def all_tasks(env: Env, job_id: int, state: str) -> dict[str, dict[str, object]]:
    """The job's tasks once all are in `state` (a device's PUBACK precedes the broker's record)."""

    async def check() -> dict[str, dict[str, object]] | None:
        tasks = await env.tasks(job_id)
        return tasks if {t["state"] for t in tasks.values()} == {state} else None

    return await eventually(check, timeout=RUN_S, what=f"every task of job {job_id} to be {state}")  # type: ignore[no-any-return]


async def launch(env: Env, refs: list[str], **job: object) -> int:
    """Upload the firmware (2.0.0) and start a static job for `refs`; answers the job id."""
    fw = await env.upload(FIRMWARE, version="2.0.0", **{k: str(v) for k, v in job.items()})
    return int((await env.job(fw["id"], refs))["id"])


async def simulate_campaign(
    env: Env, options: SimulationOptions, refs: list[str] | None = None, **job: object
) -> tuple[SimulationResult, int]:
    """Start the fleet, wait until the broker knows `refs` (default: every device) at 1.0.0, launch the
    job for them, run to the end."""
    refs = refs or [f"pk/dev{i:05d}" for i in range(options.devices or 0)]
    runner = asyncio.create_task(run_simulation(options))
    try:
        await all_informed(env, refs)
        job_id = await launch(env, refs, **job)
        result = await asyncio.wait_for(runner, RUN_S)
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    return result, job_id


async def test_fleet_upgrades_and_the_api_agrees(env: Env, tmp_path: Path) -> None:
    """20 devices inform 1.0.0, download over HTTPS with Range and a resumed interruption, and upgrade;
    the tasks succeed and the broker records 2.0.0 for every device."""
    options = options_for(env, tmp_path, interrupt_rate=0.5, seed=3)
    result, job_id = await simulate_campaign(env, options, sign_method="SHA256")

    assert result.end_reason == EndReason.ALL_FINAL
    assert result.counts["upgraded"] == 20 and result.counts["unfinished"] == 0
    assert all(d.bytes == len(FIRMWARE) and d.version == "2.0.0" for d in result.devices)
    assert sum(d.resumes for d in result.devices) > 0, "interrupted downloads resume"
    assert result.total_bytes == 20 * len(FIRMWARE)
    assert len(result.upgrade_seconds) == 20 and result.notice_to_last_success is not None
    tasks = await all_tasks(env, job_id, "succeeded")
    assert len(tasks) == 20
    assert all(t["progress"] == 100 for t in tasks.values())
    devices = await env.api("GET", "/devices?product_key=pk", expect=200)
    assert sorted(d["modules"]["default"] for d in devices) == ["2.0.0"] * 20
    doc = result.to_json()
    assert doc["counts"]["upgraded"] == 20 and doc["upgrade_seconds"]["count"] == 20
    assert doc["upgrade_seconds"]["p50"] <= doc["upgrade_seconds"]["p95"] <= doc["upgrade_seconds"]["max"]
    json.dumps(doc)  # serialisable as is


async def test_an_untrusted_download_certificate_is_named_in_the_reason_and_the_summary(
    env: Env, tmp_path: Path
) -> None:
    """Devices trusting another CA fail their download with a reason that says so up front (a desc is cut at
    128 characters), and the summary says which CA to trust."""
    other = tmp_path / "other-ca.pem"
    other.write_text(trustme.CA().cert_pem.bytes().decode())
    options = replace(options_for(env, tmp_path, devices=2), ca_file=other)
    result, _ = await simulate_campaign(env, options)

    assert result.counts["failed"] == 2
    for d in result.devices:
        assert d.failed_step == "-2" and "certificate verify failed" in d.reason[:80], d.reason
    lines = list(summary_lines(result))
    assert any("step -2: certificate" in line or "certificate verify failed" in line for line in lines)
    assert any("--ca-file the broker's data/tls/ca.crt" in line for line in lines), lines


async def test_every_device_fails_with_its_reported_reason(env: Env, tmp_path: Path) -> None:
    """fail-rate 1.0: each device reports -2, -3 or -4 (a flipped byte really fails the hash), and its task
    ends failed with the matching reason and the device's desc."""
    options = options_for(env, tmp_path, devices=9, fail_rate=1.0, seed=7)
    result, job_id = await simulate_campaign(env, options)

    assert result.end_reason == EndReason.IDLE  # failed devices wait for a retry's notice: none comes
    assert result.counts["failed"] == 9
    steps = {d.failed_step for d in result.devices}
    assert steps <= set(REASONS) and len(steps) > 1, "failure kinds are drawn per device"
    for d in result.devices:  # a PUBACK precedes the broker's record of the report: wait for it
        assert d.state == DeviceState.FAILED and d.failed_step is not None
        task = await env.task_state(job_id, d.device, "failed")
        assert task["desc"] == f"{REASONS[d.failed_step]}: {d.reason}"
    verify = [d for d in result.devices if d.failed_step == "-3"]
    assert all("mismatch" in d.reason for d in verify)


async def test_worker_processes_merge_their_results(env: Env, tmp_path: Path) -> None:
    """--processes 2: two spawned workers each run half the fleet; the parent merges counters and outcomes."""
    options = options_for(env, tmp_path, devices=6, processes=2)
    result, job_id = await simulate_campaign(env, options)

    assert result.counts["upgraded"] == 6
    assert sorted(d.device for d in result.devices) == [f"pk/dev{i:05d}" for i in range(6)]
    await all_tasks(env, job_id, "succeeded")


async def test_cli_runs_and_writes_json(env: Env, tmp_path: Path) -> None:
    """`python -m broker simulate --help` works; a small run through the CLI upgrades and writes the JSON."""
    cwd = REPO
    helped = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "simulate", "--help", cwd=cwd, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(helped.communicate(), RUN_S)
    assert helped.returncode == 0 and b"--fail-rate" in out and b"--idle-exit" in out

    # No --ca-file: the CA of the data folder (OTA_DATA_DIR, as `run` finds it) is trusted by default.
    data = tmp_path / "data"
    (data / "tls").mkdir(parents=True)
    (data / "tls" / "ca.crt").write_text(env.tls.ca_pem)
    report = tmp_path / "run.json"
    args = ["--devices", "3", "--port", str(env.mqtt_port)]
    args += ["--json", str(report), "--connect-rate", "0", "--duration-limit", str(RUN_S)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "simulate",
        *args,
        cwd=cwd,
        env={**os.environ, "OTA_DATA_DIR": str(data)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        refs = [f"pk/dev{i:05d}" for i in range(3)]
        await all_informed(env, refs)
        await launch(env, refs)
        out, err = await asyncio.wait_for(proc.communicate(), RUN_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert f"trusting {data / 'tls' / 'ca.crt'}".encode() in out
    assert b"simulation ended (all_final)" in out
    doc = json.loads(report.read_text())
    assert doc["counts"]["upgraded"] == 3 and doc["end_reason"] == "all_final"
    assert doc["bytes_total"] == 3 * len(FIRMWARE) and doc["notice_to_last_success_s"] is not None
    assert {d["device"] for d in doc["devices"]} == set(refs)


@pytest.fixture
async def secure_tls(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A broker in device-secret mode with an MQTT-over-TLS listener (trustme certificate)."""
    running = await broker_app.start(secure_config(tmp_path / "data", tls))
    try:
        async with aiohttp.ClientSession() as http:
            yield Env(running, tls, http)
    finally:
        await running.stop()


async def test_signed_logins_over_tls(secure_tls: Env, tmp_path: Path) -> None:
    """Devices registered by `POST /devices/import` log in with their signed Aliyun login over MQTT/TLS
    (secrets from the import's JSON answer) and upgrade; a wrong secret is refused and ends `offline`."""
    env = secure_tls
    assert env.running.mqtts_address is not None
    csv_body = "".join(f"pk,dev{i:05d}\n" for i in range(4)) + "pk,impostor\nother,x1\n"
    imported = await env.api(
        "POST", "/devices/import", expect=200, data=csv_body, headers={"Content-Type": "text/csv"}
    )
    for d in imported["created"]:
        if d["device_name"] == "impostor":
            d["device_secret"] = "not-its-secret"
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps(imported))
    assert [s.device_name for s in read_secrets(secrets, "pk")] == [f"dev{i:05d}" for i in range(4)] + [
        "impostor"
    ]
    port = env.running.mqtts_address[1]
    options = options_for(env, tmp_path, devices=None, secrets=secrets, tls=True, port=port)
    refs = [f"pk/dev{i:05d}" for i in range(4)]
    result, job_id = await simulate_campaign(env, options, refs)

    assert result.end_reason == EndReason.ALL_FINAL
    assert result.counts["upgraded"] == 4 and result.counts["offline"] == 1
    impostor = next(d for d in result.devices if d.device == "pk/impostor")
    assert "CONNACK 5" in impostor.reason and impostor.informed_at is None
    await all_tasks(env, job_id, "succeeded")


def test_secrets_files(tmp_path: Path) -> None:
    """Secrets come as `device import` CSV (pk,dn,secret), two-column CSV with a header, or a JSON object."""
    three = tmp_path / "three.csv"
    three.write_text("pk,a,s1\nother,b,s2\npk,c,s3\n")
    assert [(s.device_name, s.secret) for s in read_secrets(three, "pk")] == [("a", "s1"), ("c", "s3")]
    two = tmp_path / "two.csv"
    two.write_text("device_name,device_secret\nd1,x\n\nd2,y\n")
    assert [(s.device_name, s.secret) for s in read_secrets(two, "pk")] == [("d1", "x"), ("d2", "y")]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"m1": "k1"}))
    assert [(s.device_name, s.secret) for s in read_secrets(mapping, "pk")] == [("m1", "k1")]


async def test_devices_without_notices_end_idle_after_idle_exit(env: Env, tmp_path: Path) -> None:
    """A job for half the fleet: the run ends `idle_exit` after the last activity, the rest stays idle."""
    options = options_for(env, tmp_path, devices=4, idle_exit=0.5)
    result, job_id = await simulate_campaign(env, options, ["pk/dev00000", "pk/dev00001"])

    assert result.end_reason == EndReason.IDLE
    assert result.counts["upgraded"] == 2 and result.counts["idle"] == 2 and result.counts["unfinished"] == 0
    idle = [d for d in result.devices if d.state == DeviceState.IDLE]
    assert {d.device for d in idle} == {"pk/dev00002", "pk/dev00003"}
    assert all(d.first_notice_at is None and d.informed_at is not None for d in idle)
    await all_tasks(env, job_id, "succeeded")


async def test_fleet_started_after_the_job_gets_its_notices(env: Env, tmp_path: Path) -> None:
    """Devices known to the broker but offline when the job starts are notified when the simulated fleet
    boots and informs; an interrupted run reports its devices as they stand."""
    options = options_for(env, tmp_path, devices=3)
    interrupt = asyncio.Event()
    first = asyncio.create_task(run_simulation(options, interrupt=interrupt))
    refs = [f"pk/dev{i:05d}" for i in range(3)]
    await all_informed(env, refs)
    interrupt.set()
    stopped = await asyncio.wait_for(first, RUN_S)
    assert stopped.end_reason == EndReason.INTERRUPTED and stopped.counts["idle"] == 3

    async def offline() -> bool:
        listed = await env.api("GET", "/devices?product_key=pk", expect=200)
        return len(listed) == 3 and not any(d["online"] for d in listed)

    await eventually(offline, what="the fleet to be offline")
    job_id = await launch(env, refs)
    result = await asyncio.wait_for(run_simulation(options), RUN_S)
    assert result.end_reason == EndReason.ALL_FINAL and result.counts["upgraded"] == 3
    await all_tasks(env, job_id, "succeeded")


async def test_download_speed_and_no_reboot(env: Env, tmp_path: Path) -> None:
    """--download-speed holds each device to that many bytes/s; --no-reboot informs on the same connection."""
    speed = 400_000  # FIRMWARE takes 0.5 s at this speed
    options = options_for(env, tmp_path, devices=2, download_speed=speed, reboot=False)
    result, job_id = await simulate_campaign(env, options)

    assert result.counts["upgraded"] == 2
    assert min(result.upgrade_seconds) >= len(FIRMWARE) / speed * 0.9
    assert all(d.reconnects == 0 for d in result.devices)
    await all_tasks(env, job_id, "succeeded")


WITHOUT_PAHO = """
import sys
sys.modules["paho"] = None  # as if paho-mqtt were not installed: `import paho...` raises ImportError
import broker.app, broker.cli, plugins.ota.plugin, plugins.device_auth.plugin  # the broker needs no paho
sys.argv = ["ota-broker", *sys.argv[1:]]
broker.cli.main()
"""


def test_the_broker_runs_without_paho_and_simulate_names_the_extra(tmp_path: Path) -> None:
    """paho-mqtt is the simulator's alone: the broker imports without it, and `ota-broker simulate` says
    which extra to install (exit 2, one line, no traceback)."""
    import subprocess

    ran = subprocess.run(
        [sys.executable, "-c", WITHOUT_PAHO, "simulate", "--devices", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 2, ran.stderr
    assert "pip install 'ota-broker[simulator]'" in ran.stderr and "Traceback" not in ran.stderr
    helped = subprocess.run(
        [sys.executable, "-c", WITHOUT_PAHO, "--help"], cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert helped.returncode == 0 and b"simulate" in helped.stdout


def test_paho_is_an_extra_not_a_dependency() -> None:
    """An installation of the broker pins no paho-mqtt major version; the `simulator` extra brings it."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("paho")]
    assert any(d.lower().startswith("paho-mqtt") for d in project["optional-dependencies"]["simulator"])
