"""The servers under test, each started by the benchmark in its own process group on 127.0.0.1 and a
free port, measured through psutil, and stopped by its own group id.

- `amqtt`: stock amqtt 0.12.1 (`bench/amqtt_broker.py`), anonymous, logging at WARNING;
- `ota`: ota-broker, `python -m broker run --log-level warning` with `OTA_AUTH_MODE=open` and a temporary
  data directory;
- `mosquitto`: Mosquitto 2.0 with its defaults (`max_queued_messages 1000`, `max_inflight_messages 20`),
  no persistence; `mosquitto_nolimit`: the same without those caps;
- `nginx`: nginx serving a directory over TLS with one worker (for the HTTPS row).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil

from bench import mqttlib

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
READY_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_packages(commands: dict[str, str]) -> None:
    """Install the Debian packages whose command is missing (`{command: package}`)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        if subprocess.run(["apt-get", "install", "-y", *missing], env=env, check=False).returncode != 0:
            fallback = ["nginx" if p == "nginx-light" else p for p in missing]
            subprocess.run(["apt-get", "install", "-y", *fallback], env=env, check=True)
    for cmd in commands:
        if shutil.which(cmd) is None:
            raise RuntimeError(f"{cmd} is still missing after apt-get install")


PACKAGES = ("broker", "plugins", "firmware_store")
CONFIG = "config.yaml"  # exported beside them: ota_nolimit derives its configuration from the run's own


def snapshot_worktree(dest: Path) -> str:
    """Copy the product's packages and config.yaml as they are now (uncommitted edits included) into
    `dest`, so that a long run measures one state of the code; returns a short hash of what was copied."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )
        for path in sorted((dest / package).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    shutil.copy2(REPO / CONFIG, dest / CONFIG)
    digest.update(CONFIG.encode() + b"\0" + (dest / CONFIG).read_bytes())
    return digest.hexdigest()[:12]


def export_ref(ref: str, dest: Path) -> str:
    """`git archive` the product's packages and config.yaml at `ref` into `dest`; returns the commit it
    names."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, *PACKAGES, CONFIG],
        capture_output=True, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the process and its children."""
    total = 0.0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_rss(pid: int) -> int:
    total = 0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class Process:
    """A child in a new session (so a process group of its own), killed by that group in `stop`."""

    def __init__(
        self, argv: list[str], *, log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.log_path = log
        self._log: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the group, then SIGKILL to the group after `grace_s`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def mqtt_ready(port: int, deadline: float) -> None:
    """Wait until the broker on `port` answers a CONNECT with a CONNACK."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
        except (OSError, TimeoutError) as e:
            last = e
            await asyncio.sleep(0.2)
            continue
        try:
            writer.write(mqttlib.connect(f"bench-probe-{os.getpid()}"))
            data = await asyncio.wait_for(reader.readexactly(4), 5.0)
            writer.write(mqttlib.DISCONNECT_PACKET)
            if data[0] >> 4 == mqttlib.CONNACK and data[3] == 0:
                return
            last = RuntimeError(f"CONNACK {data!r}")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            last = e
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await asyncio.sleep(0.2)
    raise RuntimeError(f"broker on port {port} not ready: {last}")


async def tcp_ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.2)
            continue
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return
    raise RuntimeError(f"nothing listens on port {port}")


class Server:
    """One server under test."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def rss(self) -> int:
        return tree_rss(self.pid)

    def launch(self) -> Process:
        raise NotImplementedError

    async def wait_ready(self, deadline: float) -> None:
        await mqtt_ready(self.port, deadline)

    async def start(self) -> None:
        self.process = self.launch()
        try:
            await self.wait_ready(time.monotonic() + READY_S)
        except RuntimeError as e:
            tail = self.process.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {e}\n{tail}") from e
        if not self.process.alive():
            raise RuntimeError(f"{self.name} exited at start:\n{self.process.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "pid": self.process.pid if self.process else None}


class AmqttServer(Server):
    name = "amqtt"

    def launch(self) -> Process:
        argv = [PYTHON, str(REPO / "bench" / "amqtt_broker.py"), str(self.port)]
        return Process(argv, log=self.workdir / "amqtt.log", cwd=self.workdir)


class AsyncioFloorServer(Server):
    """`bench/asyncio_floor.py`: asyncio's own cost of a connection, with no MQTT work behind it."""

    name = "asyncio_floor"

    def launch(self) -> Process:
        argv = [PYTHON, str(REPO / "bench" / "asyncio_floor.py"), str(self.port)]
        return Process(argv, log=self.workdir / "asyncio_floor.log", cwd=self.workdir)


class AsyncioTaskFloorServer(Server):
    """`bench/asyncio_floor.py --task`: the floor with a reader task per connection, as the broker has."""

    name = "asyncio_floor_task"

    def launch(self) -> Process:
        argv = [PYTHON, str(REPO / "bench" / "asyncio_floor.py"), str(self.port), "--task"]
        return Process(argv, log=self.workdir / "asyncio_floor_task.log", cwd=self.workdir)


class OtaServer(Server):
    """ota-broker in open auth mode, its state in a temporary data directory, every listener on a free
    loopback port (MQTT over TLS off)."""

    name = "ota"
    source: Path | None = None  # a `git archive` export to run instead of the working tree (--ota-ref)
    module = "broker"  # what `python -m` runs: the broker's CLI (or a wrapper of it)

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.https_port = free_port()
        self.admin_port = free_port()
        self.data_dir = workdir / "data"

    def launch(self) -> Process:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
        env |= {
            "OTA_AUTH_MODE": "open",
            "OTA_DATA_DIR": str(self.data_dir),
            "OTA_MQTT_BIND": f"127.0.0.1:{self.port}",
            "OTA_MQTTS_BIND": "",
            "OTA_HTTPS_BIND": f"127.0.0.1:{self.https_port}",
            "OTA_ADMIN_BIND": f"127.0.0.1:{self.admin_port}",
            "OTA_PUBLIC_URL": f"https://127.0.0.1:{self.https_port}",
        }
        # the exported broker (--ota-ref) found before the editable install of the working tree; `bench`
        # (for a wrapper module) from the working tree
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (self.source, REPO) if p is not None)
        # cwd is the work dir, which has no config.yaml (but ota_nolimit's): the built-in defaults plus the
        # overrides above.
        argv = [PYTHON, "-m", self.module, "run", "--log-level", "warning"]
        return Process(argv, log=self.workdir / "ota-broker.log", cwd=self.workdir, env=env)

    async def wait_ready(self, deadline: float) -> None:
        await mqtt_ready(self.port, deadline)
        await tcp_ready(self.admin_port, deadline)
        await tcp_ready(self.https_port, deadline)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/api/v1"

    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()


class OtaNoLimitServer(OtaServer):
    """ota-broker with its per-client MQTT limits out of the way, the lossless counterpart of
    `mosquitto_nolimit`: `max_inflight_messages` at the packet-id space, `max_queued_messages` beyond any
    run. Its config.yaml is the run's own (the exported one with --ota-ref) with those two values raised."""

    name = "ota_nolimit"
    RAISED = {
        "max_inflight_messages: 20": "max_inflight_messages: 65000",
        "max_queued_messages: 1000": "max_queued_messages: 100000000",
    }

    def launch(self) -> Process:
        text = ((self.source or REPO) / "config.yaml").read_text()
        for default, raised in self.RAISED.items():
            if default not in text:
                raise RuntimeError(f"config.yaml has no {default!r} to raise")
            text = text.replace(default, raised)
        (self.workdir / "config.yaml").write_text(text)  # the OTA_* overrides still apply over it
        return super().launch()


class OtaUvloopServer(OtaServer):
    """ota-broker on uvloop's event loop (`bench.uvloop_broker`) instead of asyncio's own."""

    name = "ota_uvloop"
    module = "bench.uvloop_broker"


class OtaNoLimitUvloopServer(OtaNoLimitServer):
    name = "ota_nolimit_uvloop"
    module = "bench.uvloop_broker"


class MosquittoServer(Server):
    name = "mosquitto"
    limits = True

    def launch(self) -> Process:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if not self.limits:
            lines += ["max_queued_messages 0", "max_inflight_messages 0"]
        conf = self.workdir / f"{self.name}.conf"
        conf.write_text("\n".join(lines) + "\n")
        return Process(
            ["mosquitto", "-c", str(conf)], log=self.workdir / f"{self.name}.log", cwd=self.workdir
        )


class MosquittoNoLimitServer(MosquittoServer):
    name = "mosquitto_nolimit"
    limits = False


class NginxServer(Server):
    """nginx, one worker, serving `root` over TLS (TLS 1.2 and 1.3) with the given certificate."""

    name = "nginx"

    def __init__(self, workdir: Path, root: Path, cert: Path, key: Path, workers: int = 1) -> None:
        super().__init__(workdir)
        self.root, self.cert, self.key, self.workers = root, cert, key, workers

    def launch(self) -> Process:
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            f"""daemon off;
master_process on;
worker_processes {self.workers};
user root;
pid {self.workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {self.workdir}/client_body;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {self.root};
        location / {{ }}
    }}
}}
"""
        )
        argv = ["nginx", "-p", str(self.workdir), "-c", str(conf), "-e", "stderr"]
        return Process(argv, log=self.workdir / "nginx.log", cwd=self.workdir)

    async def wait_ready(self, deadline: float) -> None:
        await tcp_ready(self.port, deadline)


MQTT_SERVERS: dict[str, type[Server]] = {
    "amqtt": AmqttServer,
    "asyncio_floor": AsyncioFloorServer,
    "asyncio_floor_task": AsyncioTaskFloorServer,
    "ota": OtaServer,
    "ota_nolimit": OtaNoLimitServer,
    "ota_uvloop": OtaUvloopServer,
    "ota_nolimit_uvloop": OtaNoLimitUvloopServer,
    "mosquitto": MosquittoServer,
    "mosquitto_nolimit": MosquittoNoLimitServer,
}
