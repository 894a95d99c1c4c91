"""A load-generator worker: one process holding many raw MQTT connections, driven by `bench.run`.

Started as `python -m bench.loadgen SPEC.json`. It talks JSON lines: it prints events on stdout and
reads commands on stdin (`go`, `reset`, `report`, `stop`). Roles:

- `idle`: connects `count` clients `<prefix><i>`, each subscribing to its own device topic, with at
  most `window` handshakes in flight; then stays connected, counting (and acknowledging) what arrives.
- `sub`: one client subscribed to a filter, counting deliveries (the fan-in subscriber).
- `pub`: connections that each publish `count` messages as fast as flow control allows, cycling over
  their topics (QoS 1: at most `window` unacknowledged per connection).
- `churn`: `concurrency` loops of connect/disconnect cycles over the clients `<prefix><first..first+count>`
  (`bench.soak`): each cycle connects, subscribes to the client's device topic, publishes one QoS 1 message
  (`inform_fmt`, `payload`), waits for its PUBACK and disconnects; `go` runs `cycles` of them.

Every wait is bounded; every connection goes to the host and port given (loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench import mqttlib

BATCH = 64  # publishes handed to the transport per write


class Stats:
    """Counters shared by all connections of one worker."""

    def __init__(self) -> None:
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.lost = 0

    def reset(self) -> None:
        self.received = 0
        self.first = 0.0
        self.last = 0.0


class Conn(asyncio.Protocol):
    """One MQTT connection: counts incoming PUBLISHes (acknowledging QoS 1), resolves CONNACK, SUBACK
    and PUBACK waits, and tracks write flow control."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.splitter = mqttlib.Splitter()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.subacks: dict[int, asyncio.Future[bytes]] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.inflight = 0
        self.acked = 0
        self.window = 0
        self.ack_event = asyncio.Event()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        stats = self.stats
        received = 0
        acks = []
        for ptype, flags, body in self.splitter.feed(data):
            if ptype == mqttlib.PUBLISH:
                received += 1
                if flags & 0x06:
                    acks.append(mqttlib.puback(mqttlib.publish_packet_id(flags, body)))
            elif ptype == mqttlib.PUBACK:
                self.inflight -= 1
                self.acked += 1
                if self.inflight <= self.window // 2:
                    self.ack_event.set()
            elif ptype == mqttlib.SUBACK:
                fut = self.subacks.pop(mqttlib.packet_id(body), None)
                if fut is not None and not fut.done():
                    fut.set_result(bytes(body[2:]))
            elif ptype == mqttlib.CONNACK and not self.connack.done():
                self.connack.set_result(body[1])
        if received:
            now = time.time()
            if not stats.received:
                stats.first = now
            stats.received += received
            stats.last = now
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stats.lost += 1
        self.writable.set()
        self.ack_event.set()
        error = ConnectionError(f"connection lost: {exc}")
        if not self.connack.done():
            self.connack.set_exception(error)
        for fut in self.subacks.values():
            if not fut.done():
                fut.set_exception(error)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise ConnectionError("not connected")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.write(mqttlib.DISCONNECT_PACKET)
            self.transport.close()


async def open_client(
    host: str,
    port: int,
    stats: Stats,
    client_id: str,
    *,
    topic_filter: str | None,
    qos: int,
    step_s: float,
    username: str | None = None,
) -> Conn:
    """Connect, CONNECT, and (when a filter is given) SUBSCRIBE; each step bounded by `step_s`."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(lambda: Conn(stats), host, port), step_s)
    try:
        conn.write(mqttlib.connect(client_id, username=username))
        code = await asyncio.wait_for(asyncio.shield(conn.connack), step_s)
        if code != 0:
            raise ConnectionError(f"CONNACK return code {code}")
        if topic_filter is not None:
            fut: asyncio.Future[bytes] = loop.create_future()
            conn.subacks[1] = fut
            conn.write(mqttlib.subscribe(1, topic_filter, qos))
            granted = await asyncio.wait_for(asyncio.shield(fut), step_s)
            if granted and granted[0] == 0x80:
                raise ConnectionError(f"SUBSCRIBE {topic_filter} refused")
    except BaseException:
        conn.close()
        raise
    return conn


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.stats = Stats()
        self.conns: list[Conn] = []
        self.host: str = spec["host"]
        self.port: int = int(spec["port"])
        self.timeout: float = float(spec.get("step_timeout", 60.0))

    # ----------------------------------------------------------------------------------- plumbing

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        if self.spec["role"] != "pub":  # a publisher announces itself with `ready` once connected
            self.emit("spawned", pid=os.getpid())
        while line := await reader.readline():
            cmd = json.loads(line)
            name = cmd["cmd"]
            if name == "stop":
                break
            if name == "go":
                await self.go(cmd)
            elif name == "reset":
                self.stats.reset()
                for conn in self.conns:
                    conn.acked = 0
                self.emit("reset")
            elif name == "report":
                self.emit(
                    "report",
                    received=self.stats.received,
                    first=self.stats.first,
                    last=self.stats.last,
                    lost=self.stats.lost,
                    open=sum(not c.closed for c in self.conns),
                )
        for conn in self.conns:
            conn.close()
        await asyncio.sleep(0.05)

    @staticmethod
    async def until(t0: float) -> None:
        delay = t0 - time.time()
        if delay > 0:
            await asyncio.sleep(min(delay, 5.0))

    async def go(self, cmd: dict[str, Any]) -> None:
        role = self.spec["role"]
        if role in ("idle", "sub"):
            await self.connect_all(float(cmd["t0"]), float(cmd.get("deadline_s", 600.0)))
        elif role == "pub":
            await self.publish(cmd)
        elif role == "churn":
            await self.churn(int(cmd["cycles"]), float(cmd.get("deadline_s", 600.0)))
        else:
            raise ValueError(f"unknown role {role!r}")

    # -------------------------------------------------------------------------------- idle / sub

    async def connect_all(self, t0: float, deadline_s: float) -> None:
        spec = self.spec
        qos = int(spec.get("qos", 1))
        if spec["role"] == "sub":
            clients = [(spec["client_id"], spec["filter"])]
        else:
            first, count = int(spec["first"]), int(spec["count"])
            clients = [
                (f"{spec['prefix']}{i}", spec["topic_fmt"].format(i=i)) for i in range(first, first + count)
            ]
        window = asyncio.Semaphore(int(spec.get("window", 25)))
        failures: list[str] = []
        done_at: list[float] = []

        async def one(client_id: str, topic_filter: str) -> None:
            async with window:
                try:
                    conn = await open_client(
                        self.host, self.port, self.stats, client_id, topic_filter=topic_filter, qos=qos,
                        step_s=self.timeout,
                    )  # fmt: skip
                except (OSError, TimeoutError, ConnectionError) as e:
                    failures.append(f"{client_id}: {type(e).__name__}: {e}")
                    return
                self.conns.append(conn)
                done_at.append(time.time())

        await self.until(t0)
        started = time.time()
        tasks = [asyncio.ensure_future(one(c, f)) for c, f in clients]
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.emit(
            "ready",
            ok=len(done_at),
            failed=len(failures) + len(pending),
            timed_out=len(pending),
            started=started,
            last=max(done_at, default=0.0),
            errors=failures[:5],
        )

    # ------------------------------------------------------------------------------------ churn

    async def churn(self, cycles: int, deadline_s: float) -> None:
        """`cycles` connect/subscribe/publish/disconnect cycles, `concurrency` at a time; loop k takes the
        clients k, k + concurrency, ... of the pool, so no client id is connected twice at once."""
        spec = self.spec
        first, count = int(spec["first"]), int(spec["count"])
        loops = min(int(spec.get("concurrency", 16)), count, max(cycles, 1))
        payload = spec["payload"].encode()
        end = time.time() + deadline_s
        done: list[int] = [0] * loops
        failures: list[str] = []
        cursor = self.spec.setdefault("cursor", [0] * loops)  # where each loop goes on in the next `go`

        async def loop_k(k: int, share: int) -> None:
            for _ in range(share):
                if time.time() >= end:
                    return
                i = first + (k + loops * cursor[k]) % count
                cursor[k] += 1
                client_id = f"{spec['prefix']}{i}"
                try:
                    conn = await open_client(
                        self.host, self.port, self.stats, client_id, topic_filter=spec["topic_fmt"].format(i=i),
                        qos=1, step_s=self.timeout,
                    )  # fmt: skip
                    try:
                        conn.window = 0  # wake on the PUBACK
                        conn.inflight = 1
                        conn.ack_event.clear()
                        conn.write(
                            mqttlib.publish(spec["inform_fmt"].format(i=i), payload, qos=1, packet_id=1)
                        )
                        await asyncio.wait_for(conn.ack_event.wait(), self.timeout)
                        if conn.acked != 1:
                            raise ConnectionError("no PUBACK")
                    finally:
                        conn.close()
                except (OSError, TimeoutError, ConnectionError) as e:
                    failures.append(f"{client_id}: {type(e).__name__}: {e}")
                    continue
                done[k] += 1

        shares = [cycles // loops + (k < cycles % loops) for k in range(loops)]
        await asyncio.gather(*(loop_k(k, share) for k, share in enumerate(shares)))
        await asyncio.sleep(0.05)  # the last closes reach the broker
        self.emit("done", ok=sum(done), failed=len(failures), errors=failures[:5], t_end=time.time())

    # -------------------------------------------------------------------------------------- pub

    async def open_publishers(self) -> None:
        spec = self.spec
        for client_id in spec["client_ids"]:
            self.conns.append(
                await open_client(
                    self.host,
                    self.port,
                    self.stats,
                    client_id,
                    topic_filter=None,
                    qos=0,
                    step_s=self.timeout,
                )
            )
        self.emit("ready", ok=len(self.conns), failed=0)

    async def publish(self, cmd: dict[str, Any]) -> None:
        spec = self.spec
        qos = int(spec["qos"])
        payload = spec["payload"].encode()
        count = int(cmd["count"])
        window = int(spec.get("window", 100))
        await self.until(float(cmd["t0"]))
        end = time.time() + float(cmd["time_limit"])
        topic_lists = spec["topics"]  # one list of topics per connection, cycled
        results = await asyncio.gather(
            *(
                self.publish_one(conn, topics, payload, qos, count, window, end)
                for conn, topics in zip(self.conns, topic_lists, strict=True)
            ),
            return_exceptions=True,
        )
        sent = [r[0] if isinstance(r, tuple) else 0 for r in results]
        acked = [r[1] if isinstance(r, tuple) else 0 for r in results]
        errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        self.emit("done", sent=sum(sent), acked=sum(acked), t_end=time.time(), errors=errors[:5])

    @staticmethod
    async def publish_one(
        conn: Conn, topics: list[str], payload: bytes, qos: int, count: int, window: int, end: float
    ) -> tuple[int, int]:
        """Publish `count` messages cycling over `topics` until done or `end`; (sent, acknowledged)."""
        parts = [mqttlib.publish_parts(t, payload, qos=qos) for t in topics]
        packets = [head + tail for head, tail in parts]
        n_topics = len(topics)
        conn.window = window
        conn.inflight = 0
        conn.acked = 0
        sent = 0
        pid = 0
        while sent < count and time.time() < end and not conn.closed:
            n = min(BATCH, count - sent)
            if qos == 0 and n_topics == 1:
                chunk = packets[0] * n
            elif qos == 0:
                chunk = b"".join(packets[(sent + k) % n_topics] for k in range(n))
            else:
                n = min(n, window - conn.inflight)
                if n <= 0:
                    conn.ack_event.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(conn.ack_event.wait(), max(0.01, min(1.0, end - time.time())))
                    continue
                pieces = []
                for k in range(n):
                    pid = pid % 65535 + 1
                    head, tail = parts[(sent + k) % n_topics]
                    pieces.append(head + pid.to_bytes(2, "big") + tail)
                chunk = b"".join(pieces)
                conn.inflight += n
            conn.write(chunk)
            sent += n
            if not conn.writable.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.writable.wait(), max(0.01, end - time.time()))
            else:
                await asyncio.sleep(0)
        if qos:
            while conn.inflight > 0 and time.time() < end and not conn.closed:
                conn.ack_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.ack_event.wait(), max(0.01, min(1.0, end - time.time())))
                if conn.inflight > 0:
                    conn.window = 0  # wake on every ack from now on
        return sent, conn.acked


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def set_nice(value: int) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, value)


async def amain(spec: dict[str, Any]) -> None:
    worker = Worker(spec)
    if spec["role"] == "pub":
        await worker.open_publishers()
    await worker.commands()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    raise_nofile()
    if "nice" in spec:
        set_nice(int(spec["nice"]))
    asyncio.run(amain(spec))


if __name__ == "__main__":
    main()
