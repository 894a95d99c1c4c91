"""A real PostgreSQL (Debian's package) started by a test: `initdb` into a temporary folder, the server on
a free loopback port with its unix socket in that folder, and a fresh database per test
(`new_database`); stopped by its own PID (a fast shutdown).

PostgreSQL refuses to run as root: as root, the cluster belongs to `nobody` and its programs run as
`nobody`. The cluster's default collation is ICU's English one, not byte order, so a query that sorts
names without saying how is caught by the tests.

In CI (`CI` set) a missing PostgreSQL fails the test that needs it; elsewhere it is skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

SUPERUSER = "postgres"
READY_S = 30.0
STOP_S = 30.0


@dataclass
class Postgres:
    folder: Path
    port: int
    process: subprocess.Popen[bytes]
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """A new empty database; its DSN."""
        name = f"test_{next(self._numbers)}"
        admin = await asyncpg.connect(self.dsn())
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return self.dsn(name)

    async def drop_database(self, dsn: str) -> None:
        """Drop a database `new_database` made, closing what is still connected to it."""
        admin = await asyncpg.connect(self.dsn())
        try:
            await admin.execute(f'DROP DATABASE "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
        finally:
            await admin.close()

    def stop(self) -> None:
        _shut_down(self.process)


def _shut_down(process: subprocess.Popen[bytes]) -> None:
    """A fast shutdown of the server (SIGINT to its own PID); an immediate one if it does not end in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGQUIT)
            process.wait(timeout=STOP_S)


def _bindir() -> Path:
    """The folder of `initdb` and `postgres`: on PATH, or Debian's newest under /usr/lib/postgresql."""
    on_path = shutil.which("initdb")
    if on_path is not None and Path(on_path).resolve().with_name("postgres").exists():
        return Path(on_path).resolve().parent
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not found:
        message = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _Owner:
    """Whom the cluster's programs run as: `nobody` when we are root (PostgreSQL refuses root), else us
    (None: no change of user)."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """The arguments of `subprocess.Popen` that run a program as this owner."""
        return {"user": self.user, "group": self.group, "extra_groups": self.extra_groups}

    @classmethod
    def of_cluster(cls) -> _Owner:
        if os.geteuid() != 0:
            return cls()
        nobody = pwd.getpwnam("nobody")
        return cls(nobody.pw_uid, nobody.pw_gid, [])


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    bindir = _bindir()
    owner = _Owner.of_cluster()
    # Not under pytest's tmp_path: its folders are private to root, and `nobody` must reach this one.
    folder = Path(tempfile.mkdtemp(prefix="ota-pg-"))
    if owner.user is not None and owner.group is not None:
        os.chown(folder, owner.user, owner.group)
    try:
        data = folder / "data"
        initdb = [str(bindir / "initdb"), f"--pgdata={data}", f"--username={SUPERUSER}", "--auth=trust"]
        icu = ["--encoding=UTF8", "--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"]
        done = subprocess.run(
            [*initdb, *icu], check=False, capture_output=True, timeout=60, cwd=folder, **owner.kwargs
        )
        if done.returncode != 0:  # PostgreSQL before 15, or built without ICU: the system's collation
            shutil.rmtree(data, ignore_errors=True)
            subprocess.run(initdb, check=True, capture_output=True, timeout=60, cwd=folder, **owner.kwargs)
        port = _free_port()
        server = Postgres(folder, port, _start(bindir, data, port, owner))
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start(bindir: Path, data: Path, port: int, owner: _Owner) -> subprocess.Popen[bytes]:
    log = data.parent / "postgres.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(data.parent),  # the unix socket, in our folder rather than /var/run/postgresql
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",  # a throwaway cluster: durability buys nothing here
                "-c",
                "full_page_writes=off",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data.parent,
            **owner.kwargs,
        )
    deadline = time.monotonic() + READY_S
    pid_file = data / "postmaster.pid"
    while True:
        with contextlib.suppress(OSError):
            # The server writes "ready" on the status line of its PID file when it accepts connections.
            if [line.strip() for line in pid_file.read_text().splitlines()[7:8]] == ["ready"]:
                return process
        if process.poll() is not None or time.monotonic() > deadline:
            _shut_down(process)
            said = log.read_text(errors="replace")
            raise RuntimeError(f"postgres did not start on port {port}: {said}")
        time.sleep(0.05)
