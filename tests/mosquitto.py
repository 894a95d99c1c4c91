"""A real Mosquitto 2 (Debian's package) started by a test: a generated configuration on a free loopback
port in a temporary folder, anonymous devices allowed, a password for the OTA service's account, shared
subscriptions (Mosquitto 2 has them built in); stopped by its own PID.

In CI (`CI` set) a missing `mosquitto` fails the test that needs it; elsewhere it is skipped.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

OTA_USER = "ota-service"
OTA_PASSWORD = "ota:p@ss/w%rd #1"  # a test broker account, not safe in a URL on purpose
READY_S = 10.0


@dataclass
class Mosquitto:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    config: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop this Mosquitto (its own PID), SIGKILL if it does not exit within 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def restart(self) -> None:
        """Stop it and start it again on the same port (it keeps no sessions: `persistence false`)."""
        self.stop()
        self.process = _start(_binary("mosquitto"), self.config, self.port)


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        message = f"{name} is not installed (Debian: apt-get install mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_mosquitto(
    folder: Path, accounts: dict[str, str] | None = None, settings: str = ""
) -> Iterator[Mosquitto]:
    """`accounts`: more usernames and their passwords it accepts (devices that log in with a username, as
    Aliyun's SDKs do: Mosquitto lets only clients without one in anonymously); `settings`: more lines of
    its configuration."""
    mosquitto, passwd = _binary("mosquitto"), _binary("mosquitto_passwd")
    folder.mkdir(parents=True, exist_ok=True)
    password_file = folder / "passwd"
    subprocess.run([passwd, "-c", "-b", str(password_file), OTA_USER, OTA_PASSWORD], check=True, timeout=10)
    if accounts:  # hashed in place all at once (`-U`); their passwords hold no colon, the service's does
        more = folder / "passwd-more"
        more.write_text("".join(f"{user}:{password}\n" for user, password in accounts.items()))
        more.chmod(0o600)
        subprocess.run([passwd, "-U", str(more)], check=True, timeout=60)
        with password_file.open("a") as out:
            out.write(more.read_text())
        more.unlink()
    password_file.chmod(0o600)
    port = _free_port()
    log = folder / "mosquitto.log"
    config = folder / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"  # the devices (their logins are checked by the broker's own auth, not here)
        f"password_file {password_file}\n"  # the OTA service's account
        f"user {getpass.getuser()}\n"  # as root it would switch to `mosquitto`, who cannot read this folder
        "persistence false\n"
        f"log_dest file {log}\n"
        "log_type error\nlog_type warning\nlog_type notice\n" + settings
    )
    mosquitto_broker = Mosquitto(port, _start(mosquitto, config, port), log, config)
    try:
        yield mosquitto_broker
    finally:
        mosquitto_broker.stop()


def _start(mosquitto: str, config: Path, port: int) -> subprocess.Popen[bytes]:
    errors = config.parent / "stderr.log"
    with errors.open("wb") as err:
        process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + READY_S
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return process
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            said = errors.read_text(errors="replace")
            raise RuntimeError(f"mosquitto did not start on port {port}: {said}")
        time.sleep(0.05)
