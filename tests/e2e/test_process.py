"""End-to-end: `python -m broker run` as a real subprocess on built-in defaults, driven through its
listeners, its management API, its CLI (as subprocesses too) and real paho-mqtt devices. The defaults
and CLI tests run in the default auth mode (device-secret: devices log in with Aliyun signatures); the
restart tests run in open mode.

Every process here is started by these tests and stopped by them, by its own PID; every wait is bounded;
everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest

from plugins.device_auth.signing import LoginExample, login_for
from plugins.ota.core.topics import DeviceRef
from tests.e2e.processes import Launched, clean_env
from tests.support import Device, eventually

STOP_S = 10.0  # a stopping process must have exited within this
CLI_S = 30.0  # one CLI call
OPEN = {"OTA_AUTH_MODE": "open"}  # lab mode, for tests whose devices do not sign their logins
FIRMWARE = bytes(range(256)) * 400 + b"ota-broker e2e firmware"

LISTENER_LINES = {
    "mqtt": re.compile(r"\bmqtt listening on 127\.0\.0\.1:(\d+)\s*$"),
    "mqtts": re.compile(r"\bmqtts listening on 127\.0\.0\.1:(\d+)\s*$"),
    "https": re.compile(
        r"\bhttps listening on 127\.0\.0\.1:(\d+) \(devices download from (https://\S+)\)\s*$"
    ),
    "admin": re.compile(r"\badmin api listening on http://127\.0\.0\.1:(\d+)/api/v1\s*$"),
}


class BrokerProcess(Launched):
    """One `python -m broker run` started by this test in `workdir` (so ./data is `workdir/data`), with
    `env` added to its environment (by default none: the product's own auth mode, device-secret)."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        super().__init__([sys.executable, "-m", "broker", "run"], workdir, None, dict(env or {}))

    def start(self) -> BrokerProcess:  # type: ignore[override]
        assert not (self.workdir / "config.yaml").exists(), "the built-in defaults must be used"
        super().start()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_S) -> tuple[int, float]:
        """Send `sig` to this process (by its PID) and wait for it: (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_S)
            raise AssertionError(
                f"the broker did not exit within {timeout}s of signal {sig}:\n{self.log}"
            ) from None
        return code, time.monotonic() - started

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    def client_tls(self) -> ssl.SSLContext:
        """What a device's HTTPS client uses: trust exactly the generated CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@dataclass
class Admin:
    """The management API of one running process."""

    http: aiohttp.ClientSession
    broker: BrokerProcess

    async def call(self, method: str, path: str, expect: int | None = 200, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.broker.token}", **kwargs.pop("headers", {})}
        url = f"{self.broker.admin_url}/api/v1{path}"
        async with self.http.request(method, url, headers=headers, **kwargs) as r:
            body = await r.read()
            doc = json.loads(body) if body else None
            if expect is not None:
                assert r.status == expect, f"{method} {path}: {r.status} {doc}"
            return doc

    async def upload(self, data: bytes, product_key: str, version: str) -> Any:
        form = aiohttp.FormData()
        form.add_field("product_key", product_key)
        form.add_field("version", version)
        form.add_field("file", data, filename="fw.bin", content_type="application/octet-stream")
        return await self.call("POST", "/firmware", expect=201, data=form)

    async def tasks(self, job_id: int) -> dict[str, Any]:
        return {t["device"]: t for t in await self.call("GET", f"/jobs/{job_id}/tasks")}

    async def task_reaches(self, job_id: int, device: str, state: str, progress: int | None = None) -> Any:
        async def check() -> Any:
            task = (await self.tasks(job_id)).get(device)
            if task is None or task["state"] != state:
                return None
            return task if progress is None or task["progress"] == progress else None

        return await eventually(check, what=f"{device} in job {job_id} to be {state} ({progress})")

    async def device_on(self, device: str, version: str) -> Any:
        async def check() -> Any:
            async with self.http.get(
                f"{self.broker.admin_url}/api/v1/devices/{device}",
                headers={"Authorization": f"Bearer {self.broker.token}"},
            ) as r:
                if r.status != 200:
                    return None
                doc = await r.json()
                return doc if doc["modules"].get("default") == version else None

        return await eventually(check, what=f"{device} to be on {version}")


async def download(http: aiohttp.ClientSession, broker: BrokerProcess, url: str) -> tuple[int, bytes]:
    async with http.get(url, ssl=broker.client_tls()) as r:
        return r.status, await r.read()


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker", *args]


def cli_env(broker: BrokerProcess) -> dict[str, str]:
    # A wide terminal so rich does not wrap or truncate table cells and lines.
    return clean_env(OTA_ADMIN_URL=broker.admin_url, OTA_DATA_DIR=str(broker.data_dir), COLUMNS="200")


async def cli(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m broker ARGS` against `broker`, as an operator would run it; bounded in time."""
    return await asyncio.to_thread(
        subprocess.run,
        cli_command(*args),
        cwd=broker.workdir,
        env=cli_env(broker),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_S,
        check=False,
    )


def start_cli(broker: BrokerProcess, *args: str) -> subprocess.Popen[str]:
    """`python -m broker ARGS` in the background; the caller waits for it (bounded) or kills it."""
    return subprocess.Popen(
        cli_command(*args),
        cwd=broker.workdir,
        env=cli_env(broker),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args[3:]}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


REFUSED = 5  # CONNACK "not authorized"


def printed_login(out: str, command: str) -> LoginExample:
    """The clientId, username and password of the `command` example line `device add` printed."""
    found = re.search(rf"{command} .*-i '([^']+)' -u '([^']+)' -P '([^']+)'", out)
    assert found, f"no {command} line with -i/-u/-P in:\n{out}"
    return LoginExample(*found.groups())


async def login_code(broker: BrokerProcess, login: LoginExample) -> int:
    """CONNECT once with `login` (no reconnecting) and answer the CONNACK return code (0: accepted)."""
    codes: list[int] = []
    client = mqtt.Client(
        client_id=login.client_id, clean_session=True, protocol=mqtt.MQTTv311, reconnect_on_failure=False
    )
    client.username_pw_set(login.username, login.password)
    client.on_connect = lambda _c, _u, _f, rc: codes.append(rc)
    client.connect("127.0.0.1", broker.ports["mqtt"], keepalive=30)
    client.loop_start()
    try:
        await eventually(lambda: codes, what=f"CONNACK for {login.client_id}")
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


# ------------------------------------------------------------------------------------------ fixtures


Launch = Callable[..., BrokerProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start `python -m broker run` in tmp_path (same data dir each time), with optional extra environment
    variables; all are stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(env: dict[str, str] | None = None) -> BrokerProcess:
        broker = BrokerProcess(tmp_path, env)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


Devices = Callable[..., Device]


@pytest.fixture
def devices() -> Iterator[Devices]:
    """Make paho devices for a broker: `make(broker, pk, dn)` logs in with the Aliyun username `dn&pk`
    only (open mode), `make(broker, pk, dn, login)` with a signed clientId, username and password. All
    are disconnected at teardown."""
    made: list[Device] = []

    def make(broker: BrokerProcess, pk: str, dn: str, login: LoginExample | None = None) -> Device:
        if login is None:
            device = Device(broker.ports["mqtt"], pk, dn, username=f"{dn}&{pk}")
        else:
            device = Device(broker.ports["mqtt"], pk, dn, client_id=login.client_id)
            device.client.username_pw_set(login.username, login.password)
        made.append(device)
        return device

    yield make
    for device in made:
        device.disconnect()


# --------------------------------------------------------------------------------------------- tests


async def test_defaults_start_listen_protect_and_stop_cleanly(
    launch: Launch, http: aiohttp.ClientSession
) -> None:
    """Defaults: one line per listener, device-secret auth, CA and 0600 token, API needs the token, SIGTERM exits 0."""
    broker = await asyncio.to_thread(launch)

    for name, pattern in LISTENER_LINES.items():
        matching = [line for line in broker.lines if pattern.search(line)]
        assert len(matching) == 1, f"expected one '{name} listening' line, got {matching}"
    assert any("auth mode: device-secret" in line for line in broker.lines), broker.log
    assert not any("AUTH MODE IS 'open'" in line for line in broker.lines), broker.log
    assert broker.public_url == f"https://127.0.0.1:{broker.ports['https']}"
    for name in ("mqtt", "mqtts"):
        with socket.create_connection(("127.0.0.1", broker.ports[name]), timeout=5):
            pass

    assert broker.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    token_file = broker.data_dir / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(broker.token) >= 16

    api = f"{broker.admin_url}/api/v1"
    async with http.get(f"{api}/health") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": broker.token}):
        async with http.get(f"{api}/devices", headers=headers) as r:
            assert r.status == 401, headers
            assert r.content_type == "application/json"
            body = await r.json()
            assert body["error"], body
            assert body["message"], body
    assert await Admin(http, broker).call("GET", "/devices") == []

    # The firmware endpoint speaks TLS with a certificate devices can verify against data/tls/ca.crt.
    status, data = await download(http, broker, f"{broker.public_url}/firmware/not-a-signed-link")
    assert 400 <= status < 500
    assert b"ota-broker e2e firmware" not in data

    code, took = await asyncio.to_thread(broker.stop, signal.SIGTERM)
    assert code == 0, broker.log
    assert took < 5, f"SIGTERM took {took:.1f}s"


async def test_cli_drives_a_device_upgrade_end_to_end(
    launch: Launch,
    http: aiohttp.ClientSession,
    devices: Devices,
    tmp_path: Path,
) -> None:
    """The CLI adds a device whose printed login works, drives its upgrade, disables/enables it, refuses a bad token."""
    broker = await asyncio.to_thread(launch)
    admin = Admin(http, broker)

    out = ok(await cli(broker, "device", "add", "pk", "dev1"))
    secret = re.search(r"device_secret: (\S+)", out)
    assert secret, out
    assert len(secret.group(1)) >= 16, out
    sub, pub = printed_login(out, "mosquitto_sub"), printed_login(out, "mosquitto_pub")
    ref = DeviceRef("pk", "dev1")
    assert sub == login_for(ref, secret.group(1), client_id_part=sub.client_id.split("|")[0]), out
    assert pub == login_for(ref, secret.group(1), client_id_part=pub.client_id.split("|")[0]), out
    assert sub.client_id != pub.client_id, out
    assert await login_code(broker, LoginExample(sub.client_id, sub.username, "0" * 64)) == REFUSED

    device = await devices(broker, "pk", "dev1", sub).connect()
    assert device.client.is_connected(), "the login printed by `device add` was refused"
    await device.inform("1.0.0")
    await admin.device_on("pk/dev1", "1.0.0")
    out = ok(await cli(broker, "device", "list"))
    assert re.search(r"pk/dev1 .*default=1\.0\.0", out), out
    out = ok(await cli(broker, "device", "groups", "pk/dev1", "canary", "eu"))
    assert "device pk/dev1 groups: canary, eu" in out, out
    out = ok(await cli(broker, "device", "list", "--group", "canary"))
    assert re.search(r"pk/dev1 .*canary, eu", out), out

    fw_file = tmp_path / "fw-2.0.0.bin"
    fw_file.write_bytes(FIRMWARE)
    out = ok(await cli(broker, "firmware", "add", str(fw_file), "--product-key", "pk", "--version", "2.0.0"))
    found = re.search(r"firmware (\d+): pk/default 2\.0\.0", out)
    assert found, out
    fw_id = found.group(1)
    assert hashlib.md5(FIRMWARE).hexdigest() in out

    # A dry run says whom the job would notify, and starts nothing; its seed starts exactly that.
    out = ok(await cli(broker, "job", "create", "--firmware", fw_id, "--dry-run"))
    assert "Would notify 1 device(s) of 1 matched (every device of product pk)" in out, out
    out = ok(await cli(broker, "job", "create", "--firmware", fw_id, "--group", "canary", "--dry-run"))
    assert "Would notify 1 device(s) of 1 matched (the devices of product pk in group canary)" in out, out
    assert "pk/dev1" in out and "nothing was started" in out, out
    seed = re.search(r"--seed (\S+)", out)
    assert seed, out
    assert (await admin.call("GET", "/jobs")) == []
    out = ok(
        await cli(
            broker, "job", "create", "--firmware", fw_id, "--device", "pk/dev1", "--seed", seed.group(1)
        )
    )
    found = re.search(rf"job (\d+) \(static, firmware {fw_id}\)", out)
    assert found, out
    job_id = found.group(1)

    [notice] = await device.notices()
    data = notice["data"]
    assert notice["code"] == "1000", notice
    assert data["version"] == "2.0.0", notice
    assert data["size"] == len(FIRMWARE)
    assert data["md5"] == hashlib.md5(FIRMWARE).hexdigest()
    assert data["url"].startswith(f"https://127.0.0.1:{broker.ports['https']}/"), data["url"]
    status, body = await download(http, broker, data["url"])
    assert status == 200
    assert body == FIRMWARE

    await device.progress("50", "downloading")
    await admin.task_reaches(int(job_id), "pk/dev1", "in_progress", 50)

    refused = await cli(broker, "firmware", "delete", fw_id)
    assert refused.returncode != 0
    assert "409" in refused.stderr, refused.stderr

    follow = await asyncio.to_thread(
        start_cli, broker, "job", "show", job_id, "--follow", "--interval", "0.2"
    )
    try:
        await asyncio.sleep(2)  # time to start and see the running job
        assert follow.poll() is None, "job show --follow ended while the job was still running"
        await device.inform("2.0.0")
        follow_out, follow_err = await asyncio.to_thread(follow.communicate, timeout=CLI_S)
    finally:
        if follow.poll() is None:
            os.kill(follow.pid, signal.SIGKILL)
            follow.communicate(timeout=STOP_S)
    assert follow.returncode == 0, follow_err
    assert "pk/dev1" in follow_out, follow_out
    assert "completed" in follow_out, follow_out
    await admin.task_reaches(int(job_id), "pk/dev1", "succeeded")

    out = ok(await cli(broker, "job", "tasks", job_id))
    assert re.search(r"pk/dev1 .*succeeded", out), out

    out = ok(await cli(broker, "firmware", "delete", fw_id))
    assert f"firmware {fw_id} deleted" in out
    await admin.call("GET", f"/firmware/{fw_id}", expect=404)

    # Disabled, the device is cut off and its next login refused; enabled, it logs in again.
    cut_off = threading.Event()
    device.client.on_disconnect = lambda *_a: cut_off.set()
    out = ok(await cli(broker, "device", "disable", "pk/dev1"))
    assert "device pk/dev1 disabled" in out, out
    await eventually(cut_off.is_set, what="the disabled device's connection to be closed")
    assert await login_code(broker, pub) == REFUSED
    out = ok(await cli(broker, "device", "enable", "pk/dev1"))
    assert "device pk/dev1 enabled" in out, out
    assert await login_code(broker, pub) == 0

    wrong = await cli(broker, "device", "list", "--token", "nope")
    assert wrong.returncode != 0
    assert "error" in wrong.stderr, wrong.stderr
    assert "401" in wrong.stderr, wrong.stderr
    assert "pk/dev1" not in wrong.stdout


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restart_mid_job_keeps_state_and_finishes_the_job(
    how: str,
    launch: Launch,
    http: aiohttp.ClientSession,
    devices: Devices,
) -> None:
    """A job survives SIGTERM or kill -9 mid-way: progress kept, notified device renotified, job completes."""
    first = await asyncio.to_thread(launch, OPEN)
    admin = Admin(http, first)
    a = await devices(first, "pk", "devA").connect()
    b = await devices(first, "pk", "devB").connect()
    await a.inform("1.0.0")
    await b.inform("1.0.0")
    await admin.device_on("pk/devA", "1.0.0")
    await admin.device_on("pk/devB", "1.0.0")
    fw = await admin.upload(FIRMWARE, "pk", "2.0.0")
    job = await admin.call(
        "POST",
        "/jobs",
        expect=201,
        json={"firmware_id": fw["id"], "type": "static", "devices": ["pk/devA", "pk/devB"]},
    )
    job_id = job["id"]
    await a.notices()
    await b.notices()
    await a.progress("30", "downloading")
    await admin.task_reaches(job_id, "pk/devA", "in_progress", 30)
    await admin.task_reaches(job_id, "pk/devB", "notified")
    token = first.token

    if how == "sigterm":
        code, _ = await asyncio.to_thread(first.stop, signal.SIGTERM)
        assert code == 0, first.log
    else:
        code, _ = await asyncio.to_thread(first.stop, signal.SIGKILL)
        assert code == -signal.SIGKILL
    a.disconnect()
    b.disconnect()

    second = await asyncio.to_thread(launch, OPEN)
    assert second.token == token
    admin = Admin(http, second)
    listed = {f"{d['product_key']}/{d['device_name']}": d for d in await admin.call("GET", "/devices")}
    assert set(listed) == {"pk/devA", "pk/devB"}
    assert all(d["modules"] == {"default": "1.0.0"} for d in listed.values()), listed
    kept = await admin.call("GET", f"/firmware/{fw['id']}")
    assert (kept["version"], kept["sha256"], kept["size"]) == (fw["version"], fw["sha256"], len(FIRMWARE))
    assert (await admin.call("GET", f"/jobs/{job_id}"))["state"] == "running"
    tasks = await admin.tasks(job_id)
    assert (tasks["pk/devA"]["state"], tasks["pk/devA"]["progress"]) == ("in_progress", 30), tasks
    assert tasks["pk/devB"]["state"] == "notified", tasks

    a2 = await devices(second, "pk", "devA").connect()
    await a2.progress("80", "flashing")
    await admin.task_reaches(job_id, "pk/devA", "in_progress", 80)
    await a2.inform("2.0.0")
    await admin.task_reaches(job_id, "pk/devA", "succeeded")
    assert a2.messages(a2.upgrade_topic) == [], "a notice was re-sent while the task was in progress"

    b2 = await devices(second, "pk", "devB").connect()
    [notice] = await b2.notices()  # never subscribed: delivered to its session on connect
    url = notice["data"]["url"]
    assert url.startswith(f"https://127.0.0.1:{second.ports['https']}/"), url
    status, body = await download(http, second, url)
    assert status == 200
    assert body == FIRMWARE
    await b2.inform("2.0.0")
    await admin.task_reaches(job_id, "pk/devB", "succeeded")

    async def completed() -> Any:
        doc = await admin.call("GET", f"/jobs/{job_id}")
        return doc if doc["state"] == "completed" else None

    done = await eventually(completed, what=f"job {job_id} to complete")
    assert done["counts"]["succeeded"] == 2, done


async def test_hash_password_prints_an_argon2_hash(tmp_path: Path) -> None:
    """`hash-password --password x` prints an argon2 hash of x (for an application account's config)."""
    from argon2 import PasswordHasher

    result = await asyncio.to_thread(
        subprocess.run,
        cli_command("hash-password", "--password", "x"),
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2"), result.stdout
    assert PasswordHasher().verify(hashed, "x")


def _free_port() -> int:
    with socket.socket() as s:  # a loopback port nothing listens on now
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_every_cli_command_finds_the_admin_api_from_ota_admin_bind(tmp_path: Path) -> None:
    """A broker whose admin listener is on a random port named only by OTA_ADMIN_BIND: with that and
    OTA_DATA_DIR alone (no --admin-url, no token), `health`, `device`, `firmware` and `job` reach it and
    read the admin token the broker generated."""
    port = _free_port()
    broker = BrokerProcess(tmp_path, {"OTA_ADMIN_BIND": f"127.0.0.1:{port}"})
    try:
        broker.start()
        assert broker.ports["admin"] == port
        env = clean_env(OTA_ADMIN_BIND=f"127.0.0.1:{port}", OTA_DATA_DIR=str(broker.data_dir), COLUMNS="200")
        (tmp_path / "fw.bin").write_bytes(FIRMWARE)
        commands = [
            ["health"],
            ["device", "add", "pk", "dev1", "--json"],
            ["device", "list", "--json"],
            ["firmware", "add", str(tmp_path / "fw.bin"), "--product-key", "pk", "--version", "2.0.0"],
            ["firmware", "list", "--json"],
            ["job", "create", "--firmware", "1", "--device", "pk/dev1"],
            ["job", "list", "--json"],
        ]
        answers = []
        for args in commands:
            ran = await asyncio.to_thread(
                subprocess.run,
                cli_command(*args),
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CLI_S,
                check=False,
            )
            assert ran.returncode == 0, (args, ran.stdout, ran.stderr)
            answers.append(ran.stdout)
        assert f"127.0.0.1:{port}" in answers[0]
        assert [d["device_name"] for d in json.loads(answers[2])] == ["dev1"]
        assert [j["firmware_id"] for j in json.loads(answers[6])] == [1]
    finally:
        broker.close()
