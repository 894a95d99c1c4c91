"""A broker started as a process by a test (`python -m broker run`, or the single binary), on free
loopback ports, with its log read line by line; stopped by its own PID only.

Every wait is bounded; everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

READY_S = 30.0  # the process must log `ready` within this (a one-file binary unpacks itself first)
STOP_S = 10.0

LOOPBACK = {
    "OTA_MQTT_BIND": "127.0.0.1:0",
    "OTA_MQTTS_BIND": "127.0.0.1:0",
    "OTA_HTTPS_BIND": "127.0.0.1:0",
    "OTA_ADMIN_BIND": "127.0.0.1:0",
    "OTA_PUBLIC_URL": "https://127.0.0.1:0",
}

_LISTENING = {
    "mqtt": re.compile(r"\bmqtt listening on 127\.0\.0\.1:(\d+)$"),
    "mqtts": re.compile(r"\bmqtts listening on 127\.0\.0\.1:(\d+)$"),
    "https": re.compile(r"\bhttps listening on 127\.0\.0\.1:(\d+) \(devices download from (https://\S+)\)$"),
    "admin": re.compile(r"\badmin api listening on http://127\.0\.0\.1:(\d+)/api/v1$"),
}


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any OTA_* variable, plus `overrides`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTA_")} | overrides


class Launched:
    """One broker process started in `workdir` with `command` (ending in `run ...`) and `env` added."""

    def __init__(
        self, command: Sequence[str], workdir: Path, data_dir: Path | None, env: dict[str, str]
    ) -> None:
        """`data_dir` None: the product's default, `./data` in `workdir`."""
        self.command = list(command)
        self.workdir = workdir
        self.data_dir = data_dir or workdir / "data"
        chosen = {} if data_dir is None else {"OTA_DATA_DIR": str(data_dir)}
        self.env = clean_env(PYTHONUNBUFFERED="1", **LOOPBACK, **chosen) | env
        self.proc: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}
        self.public_url = ""
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self, message: Callable[[str], str] = lambda line: line) -> Launched:
        """Start and wait for `ready`; `message` extracts the message text from one log line."""
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + READY_S
        while not any(message(line).endswith("ready") for line in self.lines):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode} before ready:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"did not log 'ready' within {READY_S}s:\n{self.log}")
            time.sleep(0.05)
        for name, pattern in _LISTENING.items():
            found = [m for line in self.lines if (m := pattern.search(message(line).rstrip()))]
            if name == "mqtts" and self.env.get("OTA_MQTTS_BIND") == "":
                continue  # MQTT over TLS turned off
            if name in ("mqtt", "mqtts") and self.env.get("OTA_ATTACH_URL"):
                continue  # attached to another broker: no MQTT listener of its own
            assert found, f"no '{name} listening' line in the log:\n{self.log}"
            self.ports[name] = int(found[0].group(1))
            if name == "https":
                self.public_url = found[0].group(2)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (to this PID) and wait for the exit code; SIGKILL and fail if it hangs."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_S)
            raise AssertionError(f"did not exit within {STOP_S}s of signal {sig}:\n{self.log}") from None

    def close(self) -> None:
        """Teardown: SIGTERM if still running, SIGKILL (this PID only) if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_S)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def admin_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}/api/v1"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def client_tls(self) -> ssl.SSLContext:
        """What a device's HTTPS client uses: trust exactly the generated CA."""
        return ssl.create_default_context(cafile=str(self.data_dir / "tls" / "ca.crt"))


def json_message(line: str) -> str:
    """The `message` of a JSON log line ('' when the line is not a JSON object)."""
    try:
        doc: Any = json.loads(line)
    except ValueError:
        return ""
    return str(doc.get("message", "")) if isinstance(doc, dict) else ""


def attached_replica(
    folder: Path, index: int, data_dir: Path, broker_url: str, database_url: str
) -> Launched:
    """Replica `index` of the attached service (`python -m broker run`, open auth mode, not started), in
    `folder/replica-<index>`: on the PostgreSQL `database_url`, attached to `broker_url` with the test
    Mosquitto's service account, on the shared `data_dir`."""
    from tests.mosquitto import OTA_PASSWORD, OTA_USER

    workdir = folder / f"replica-{index}"
    workdir.mkdir()
    env = {
        "OTA_AUTH_MODE": "open",
        "OTA_DATABASE_URL": database_url,
        "OTA_ATTACH_URL": broker_url,
        "OTA_ATTACH_USERNAME": OTA_USER,
        "OTA_ATTACH_PASSWORD": OTA_PASSWORD,
        "OTA_ATTACH_CLIENT_ID": f"replica-{index}",
    }
    command = [sys.executable, "-m", "broker", "run", "--log-level", "info"]
    return Launched(command, workdir, data_dir, env)
