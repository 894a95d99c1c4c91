"""A start that fails ends the process: `python -m broker run` exits 1 within seconds with one line naming
the cause and no traceback, whatever failed (a listener's port taken, a damaged or unreadable database,
a bad certificate, an unusable data folder), so systemd's and Docker's restart policies see it.

Every process here is started by these tests and ends by itself or is killed by its own PID (by
`subprocess.run`'s timeout); every port is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker import app as broker_app
from broker.config import default_config_text
from tests.e2e.processes import LOOPBACK, clean_env
from tests.support import Tls, broker_config

EXIT_S = 15.0  # a failed start must have exited within this
_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another listener holds for the test's duration."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_failing(workdir: Path, **env: str) -> tuple[int, float, str]:
    """`python -m broker run` in `workdir` (data in ./data): (exit code, seconds, its log)."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "broker", "run"],
            cwd=workdir,
            env=clean_env(PYTHONUNBUFFERED="1", **LOOPBACK) | env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXIT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:  # run() has killed it (its PID) already
        log = e.stderr.decode() if isinstance(e.stderr, bytes) else str(e.stderr or "")
        raise AssertionError(f"still running {EXIT_S}s after a failed start:\n{log}") from None
    return done.returncode, time.monotonic() - started, done.stderr


def assert_one_line(code: int, took: float, log: str, *fragments: str) -> None:
    """Exit 1, in time, exactly one ERROR line, naming every fragment, and no traceback."""
    assert code == 1, f"exit {code}:\n{log}"
    assert took < EXIT_S, f"took {took:.1f}s"
    assert "Traceback" not in log, log
    errors = [
        line for line in log.splitlines() if (m := _LEVEL.match(line)) and m[1] in ("ERROR", "CRITICAL")
    ]
    assert len(errors) == 1, f"expected one error line, got {errors}:\n{log}"
    assert "could not start: " in errors[0], errors[0]
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    unexpected = [line for line in log.splitlines() if line.strip() and not _LEVEL.match(line)]
    assert not unexpected, f"lines that are not log lines:\n{log}"


@pytest.mark.parametrize(
    ("variable", "listener"),
    [
        ("OTA_MQTT_BIND", "the MQTT listener"),
        ("OTA_MQTTS_BIND", "the MQTT/TLS listener"),
        ("OTA_HTTPS_BIND", "the HTTPS download listener"),
        ("OTA_ADMIN_BIND", "the admin API listener"),
    ],
)
def test_a_taken_port_ends_the_process_naming_the_listener(
    tmp_path: Path, busy_port: int, variable: str, listener: str
) -> None:
    """Any listener's port held by another process: exit 1 within seconds, one line naming it, no traceback."""
    code, took, log = run_failing(tmp_path, **{variable: f"127.0.0.1:{busy_port}"})
    assert_one_line(code, took, log, listener, f"127.0.0.1:{busy_port}", "address already in use")


def _truncated(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE device (name TEXT, secret BLOB)")
        conn.executemany(
            "INSERT INTO device VALUES (?, ?)", [(f"d{i}", os.urandom(400)) for i in range(2000)]
        )
    conn.close()
    os.truncate(db, db.stat().st_size // 2)


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(16384))


def _overwritten_header(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with db.open("r+b") as f:
        f.write(b"this is not sqlite at all")


def _a_folder(db: Path) -> None:
    db.mkdir()


@pytest.mark.parametrize("damage", [_truncated, _garbage, _overwritten_header, _a_folder])
def test_a_damaged_or_unreadable_database_ends_the_process(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """A truncated, overwritten or unopenable ota.db: exit 1 within seconds, one line naming the file."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    damage(data / "ota.db")
    code, took, log = run_failing(tmp_path)
    assert_one_line(code, took, log, "ota.db")
    if damage is not _a_folder:
        assert "restore it from a backup" in log


def test_a_bad_configured_certificate_ends_the_process(tmp_path: Path) -> None:
    """tls_cert/tls_key that are not a PEM certificate and key: exit 1 within seconds, one line naming them."""
    cert, key = tmp_path / "bad.crt", tmp_path / "bad.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    key.write_text("garbage\n")
    config = default_config_text().replace('tls_cert: ""', f"tls_cert: {cert}")
    (tmp_path / "config.yaml").write_text(config.replace('tls_key: ""', f"tls_key: {key}"))
    code, took, log = run_failing(tmp_path)
    assert_one_line(code, took, log, str(cert), "cannot be used")


def test_a_mismatched_certificate_and_key_end_the_process(tmp_path: Path) -> None:
    """A certificate with another certificate's key: exit 1, one line naming the files."""
    (tmp_path / "one").mkdir()
    (tmp_path / "other").mkdir()
    one, other = Tls.make(tmp_path / "one"), Tls.make(tmp_path / "other")
    config = default_config_text().replace('tls_cert: ""', f"tls_cert: {one.cert_file}")
    (tmp_path / "config.yaml").write_text(config.replace('tls_key: ""', f"tls_key: {other.key_file}"))
    code, took, log = run_failing(tmp_path)
    assert_one_line(code, took, log, str(one.cert_file), "cannot be used")


def test_damaged_generated_tls_files_end_the_process(tmp_path: Path) -> None:
    """A generated server certificate overwritten with garbage: exit 1, one line naming the TLS folder."""
    tls = tmp_path / "data" / "tls"
    tls.mkdir(parents=True, mode=0o700)
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        (tls / name).write_text("garbage\n")
    code, took, log = run_failing(tmp_path)
    assert_one_line(code, took, log, "tls", "cannot be used")


def test_a_data_folder_that_cannot_be_created_ends_the_process(tmp_path: Path) -> None:
    """OTA_DATA_DIR under a regular file: exit 1 within seconds, one line naming the folder."""
    (tmp_path / "file").write_text("not a folder\n")
    code, took, log = run_failing(tmp_path, OTA_DATA_DIR=str(tmp_path / "file" / "data"))
    assert_one_line(code, took, log, str(tmp_path / "file" / "data"))


async def test_a_failed_start_in_process_closes_what_it_opened(tmp_path: Path, busy_port: int) -> None:
    """A listener that cannot bind: StartError, and no database thread or bound socket is left behind."""
    before = {t.ident for t in threading.enumerate()}
    listening = _listening()
    config = broker_config(tmp_path / "data", None)
    config["listeners"]["tls"] = {"type": "tcp", "bind": f"127.0.0.1:{busy_port}"}  # default binds first
    with pytest.raises(broker_app.StartError, match=f"127.0.0.1:{busy_port}: address already in use"):
        await broker_app.start(config)
    left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    deadline = time.monotonic() + 5
    while left and time.monotonic() < deadline:  # a closing connection's thread ends a moment later
        await asyncio.sleep(0.05)
        left = [t for t in left if t.is_alive()]
    assert not left, f"threads left running after a failed start: {left}"
    assert _listening() <= listening, "a listening socket was left open"


def _listening() -> set[str]:
    """Listening TCP sockets this process holds (from /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                listening.add(fields[9])
    return listening
