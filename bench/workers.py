"""The coordinator's handle on load-generator processes (`bench.loadgen`): start one in its own process
group, exchange JSON lines with it, and kill its group when done."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from bench.servers import PYTHON, REPO

PUBLISHER_NICE = 5
SUBSCRIBER_NICE = -10
PAYLOAD_SIZE = 80


def progress_payload() -> str:
    """An 80-byte progress report, as a device sends (JSON, padded with spaces)."""
    doc = '{"id":1234567,"params":{"step":"42","desc":"downloading","module":"fw-main"}}'
    return doc.ljust(PAYLOAD_SIZE)


class WorkerError(RuntimeError):
    pass


class WorkerProc:
    def __init__(self, proc: asyncio.subprocess.Process, label: str, log: Path) -> None:
        self.proc = proc
        self.label = label
        self.log = log

    @classmethod
    async def spawn(cls, spec: dict[str, Any], label: str, logdir: Path, limit_s: float = 60.0) -> WorkerProc:
        """Start a worker and wait for its first event (`spawned`, or `ready` for publishers)."""
        log = logdir / f"worker-{label}.log"
        spec_path = logdir / f"worker-{label}.json"  # a file: a fan-out's topic list outgrows argv
        spec_path.write_text(json.dumps(spec))
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "bench.loadgen",
                str(spec_path),
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                limit=1 << 20,
            )
        worker = cls(proc, label, log)
        try:
            await worker.expect(("spawned", "ready"), limit_s)
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self, limit_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), limit_s)
        except TimeoutError as e:
            raise WorkerError(f"worker {self.label}: no answer within {limit_s:g}s") from e
        if not line:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise WorkerError(f"worker {self.label} exited:\n{tail}")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def expect(self, events: tuple[str, ...] | str, limit_s: float) -> dict[str, Any]:
        wanted = (events,) if isinstance(events, str) else events
        deadline = time.monotonic() + limit_s
        while True:
            doc = await self.recv(max(0.01, deadline - time.monotonic()))
            if doc.get("event") in wanted:
                return doc

    async def ask(self, cmd: str, event: str, limit_s: float = 30.0, **fields: Any) -> dict[str, Any]:
        await self.send(cmd=cmd, **fields)
        return await self.expect(event, limit_s)

    async def kill(self) -> None:
        """Ask it to stop; then SIGKILL its process group."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send(cmd="stop")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await asyncio.wait_for(self.proc.wait(), 5.0)


async def kill_all(workers: list[WorkerProc]) -> None:
    await asyncio.gather(*(w.kill() for w in workers), return_exceptions=True)
    workers.clear()


# ------------------------------------------------------------------------------------ fleets of clients


class Fleet:
    """`count` idle device clients `dev<i>` spread over `procs` worker processes, each subscribed to its
    own `/ota/device/upgrade/pk/dev<i>`."""

    TOPIC_FMT = "/ota/device/upgrade/pk/dev{i}"

    def __init__(self, workers: list[WorkerProc], count: int) -> None:
        self.workers = workers
        self.count = count

    @classmethod
    async def connect(
        cls,
        port: int,
        count: int,
        *,
        procs: int,
        window: int,
        qos: int,
        logdir: Path,
        label: str,
        deadline_s: float,
        prefix: str = "dev",
    ) -> tuple[Fleet, dict[str, Any]]:
        """Connect and subscribe them all, starting at one shared instant; also returns the timing:
        seconds from that instant until the last SUBACK, and how many failed."""
        procs = max(1, min(procs, count)) if count else 0
        workers: list[WorkerProc] = []
        try:
            per = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
            first = 0
            for i, n in enumerate(per):
                spec = {
                    "role": "idle",
                    "host": "127.0.0.1",
                    "port": port,
                    "first": first,
                    "count": n,
                    "prefix": prefix,
                    "topic_fmt": cls.TOPIC_FMT,
                    "qos": qos,
                    "window": window,
                }
                workers.append(await WorkerProc.spawn(spec, f"{label}-idle{i}", logdir))
                first += n
            t0 = time.time() + 0.2
            for w in workers:
                await w.send(cmd="go", t0=t0, deadline_s=deadline_s)
            readies = await asyncio.gather(*(w.expect("ready", deadline_s + 60) for w in workers))
        except BaseException:
            await kill_all(workers)
            raise
        ok = sum(r["ok"] for r in readies)
        failed = sum(r["failed"] for r in readies)
        last = max((r["last"] for r in readies), default=t0)
        timing = {
            "clients": count,
            "connected": ok,
            "failed": failed,
            "timed_out": sum(r["timed_out"] for r in readies),
            "seconds": round(last - t0, 4) if ok else None,
            "errors": [e for r in readies for e in r["errors"]][:5],
        }
        return cls(workers, count), timing

    async def reset(self) -> None:
        await asyncio.gather(*(w.ask("reset", "reset") for w in self.workers))

    async def report(self) -> dict[str, Any]:
        reports = await asyncio.gather(*(w.ask("report", "report") for w in self.workers))
        return {
            "received": sum(r["received"] for r in reports),
            "last": max((r["last"] for r in reports), default=0.0),
            "lost": sum(r["lost"] for r in reports),
            "open": sum(r["open"] for r in reports),
        }

    async def close(self) -> None:
        await kill_all(self.workers)
