"""A fleet of simulated Aliyun-SDK devices for rehearsing a campaign and for driving load.

Each simulated device does what a device built on Aliyun's SDKs does, over real MQTT and real HTTPS:

1. connects (open mode: username `<dn>&<pk>`; with a secrets file: the signed Aliyun login), subscribes
   to `/ota/device/upgrade/{pk}/{dn}` and informs its version on `/ota/device/inform/{pk}/{dn}`;
2. on an upgrade notice, downloads `data.url` with HTTP Range requests (resuming after an interruption),
   throttled to `download_speed` bytes/s if asked, verifies the size and the `sign` by `signMethod`
   (`Md5` or `SHA256`), and reports progress every 10 % on `/ota/device/progress/{pk}/{dn}`;
3. "flashes", reboots (a new MQTT connection) and informs the notice's version: upgraded. A simulated
   failure (probability `fail_rate`, from a seeded RNG per device and attempt) reports step `-2`
   (download failed), `-3` (verification failed: a byte really is corrupted) or `-4` (flash failed).

When a run ends (first match wins):

- `all_final`: every device is final: `upgraded`, `failed`, or `offline` (it could not log in);
- `idle`: at least one notice arrived, no device is busy (booting, downloading, installing, rebooting),
  and `idle_exit` seconds passed since the last notice, boot or finished upgrade; devices that never got
  a notice stay `idle`. So `simulate` may start before the operator launches the job (it waits up to
  `duration_limit` for the first notice) or after (devices inform at boot, which brings pending notices);
- `duration_limit`: that long after the start; busy devices are reported as they are (`unfinished`).

Each device is a task on one asyncio loop; its MQTT connection is a paho-mqtt 1.x client without a
thread of its own: the loop calls `loop_read`/`loop_write` when `client.socket()` is readable/writable
(`add_reader`/`add_writer`, the pattern of asyncio-mqtt/aiomqtt) and `loop_misc` once a second for
keep-alive. Only paho's blocking `connect()` (TCP connect and TLS handshake) runs on a small shared
thread pool. `processes > 1` spawns worker processes that each run a slice of the fleet; the parent
merges their counters live and their results at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import hashlib
import io
import json
import logging
import math
import multiprocessing
import queue
import random
import signal
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt  # type: ignore[import-untyped]  # paho-mqtt 1.x ships no type information
from rich.live import Live
from rich.table import Table

from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef

log = logging.getLogger("ota.simulator")

REPLY_TIMEOUT_S = 10.0  # CONNACK, SUBACK, PUBACK
CONNECT_TRIES = 3  # per (re)connect, for network errors; a refused login is not retried
CONNECTION_LOSSES = 3  # unexpected disconnects a device recovers from before giving up
DOWNLOAD_TRIES = 4  # consecutive HTTP errors per download before reporting -2
PIECE_BYTES = 16 * 1024
KEEPALIVE_S = 60
CONNECT_THREADS = 4
FAILURE_STEPS = ("-2", "-3", "-4")


class SimulatorError(Exception):
    """The simulation could not be set up (bad options, unreadable secrets file)."""


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """What to simulate and against which broker; the CLI's `simulate` options, one for one."""

    devices: int | None = 10  # None with `secrets`: every device of the file
    product_key: str = "pk"
    version: str = "1.0.0"
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False  # MQTT over TLS
    ca_file: Path | None = None  # trusted for MQTT/TLS and for the HTTPS downloads
    secrets: Path | None = None  # CSV or JSON of device names and secrets: signed logins
    name_prefix: str = "dev"
    fail_rate: float = 0.0
    fail_step: str | None = None  # "-2", "-3" or "-4"; None: drawn per failure
    interrupt_rate: float = 0.0  # probability that a download is cut once and resumed with Range
    download_speed: int | None = None  # bytes/s per device
    range_bytes: int = 64 * 1024 * 1024  # bytes per Range request: one request per download, as SDKs do
    flash_seconds: float = 0.0
    reboot: bool = True  # reconnect after flashing before informing the new version
    connect_rate: float = 200.0  # new connections per second for the whole run; 0: unpaced
    idle_exit: float = 30.0
    duration_limit: float = 600.0
    processes: int = 1
    seed: int = 0

    def check(self) -> None:
        """Raise SimulatorError naming the first unacceptable option."""
        problems = [
            (self.devices is not None and self.devices < 0, "devices must be >= 0"),
            (self.devices is None and self.secrets is None, "devices is required without a secrets file"),
            (not 0.0 <= self.fail_rate <= 1.0, "fail_rate must be within 0..1"),
            (not 0.0 <= self.interrupt_rate <= 1.0, "interrupt_rate must be within 0..1"),
            (self.fail_step not in (None, *FAILURE_STEPS), "fail_step must be -2, -3 or -4"),
            (self.download_speed is not None and self.download_speed <= 0, "download_speed must be > 0"),
            (self.range_bytes <= 0, "range_bytes must be > 0"),
            (self.connect_rate < 0, "connect_rate must be >= 0"),
            (self.idle_exit < 0, "idle_exit must be >= 0"),
            (self.duration_limit <= 0, "duration_limit must be > 0"),
            (self.processes < 1, "processes must be >= 1"),
            (not 0 < self.port < 65536, "port must be within 1..65535"),
            (self.flash_seconds < 0, "flash_seconds must be >= 0"),
        ]
        for bad, message in problems:
            if bad:
                raise SimulatorError(message)
        if self.ca_file is not None and not self.ca_file.is_file():
            raise SimulatorError(f"ca_file {self.ca_file} is not a file")

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context: the CA file if given, else the system's trust store."""
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device: its name and, for signed logins, its secret."""

    device_name: str
    secret: str | None = None


def read_secrets(path: Path, product_key: str) -> list[DeviceSpec]:
    """Devices of `product_key` from a secrets file, in file order.

    CSV: `product_key,device_name,device_secret` (what `ota-broker device import` prints) or
    `device_name,device_secret`, an optional header line. JSON: the answer of `POST /devices/import`
    (`{"created": [...]}`), a list of `POST /devices` answers (`device_name`, `device_secret`,
    optional `product_key`), or an object `{device_name: secret}`.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SimulatorError(f"cannot read the secrets file {path}: {e.strerror}") from e
    rows: list[tuple[str | None, str, str]] = []
    if text.lstrip().startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise SimulatorError(f"{path}: invalid JSON: {e}") from e
        if isinstance(doc, dict) and isinstance(doc.get("created"), list):
            doc = doc["created"]
        if isinstance(doc, dict):
            rows = [(None, str(dn), str(secret)) for dn, secret in doc.items()]
        elif isinstance(doc, list):
            for i, item in enumerate(doc):
                if not isinstance(item, dict) or "device_name" not in item or "device_secret" not in item:
                    raise SimulatorError(f"{path}: item {i} has no device_name and device_secret")
                pk = item.get("product_key")
                rows.append(
                    (
                        str(pk) if pk is not None else None,
                        str(item["device_name"]),
                        str(item["device_secret"]),
                    )
                )
        else:
            raise SimulatorError(f"{path}: expected a list or an object")
    else:
        for line_no, raw in enumerate(csv.reader(io.StringIO(text)), start=1):
            cells = [c.strip() for c in raw]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if line_no == 1 and cells[0] in ("product_key", "device_name", "dn", "deviceName"):
                continue  # a header line
            if len(cells) == 3:
                rows.append((cells[0], cells[1], cells[2]))
            elif len(cells) == 2:
                rows.append((None, cells[0], cells[1]))
            else:
                raise SimulatorError(f"{path}:{line_no}: expected [product_key,]device_name,device_secret")
    specs: list[DeviceSpec] = []
    for pk, dn, secret in rows:
        if pk is not None and pk != product_key:
            continue
        _check_name(product_key, dn)
        specs.append(DeviceSpec(dn, secret))
    return specs


def _check_name(product_key: str, device_name: str) -> DeviceRef:
    try:
        return DeviceRef(product_key, device_name)
    except InvalidDeviceRef as e:
        raise SimulatorError(str(e)) from e


def plan_devices(options: SimulationOptions) -> list[DeviceSpec]:
    """The fleet: the secrets file's devices (the first `devices` of them), else `devices` devices named
    `<name_prefix>00000`, `<name_prefix>00001`, ..."""
    if options.secrets is not None:
        specs = read_secrets(options.secrets, options.product_key)
        if not specs:
            raise SimulatorError(f"{options.secrets} lists no device of product {options.product_key}")
        return specs if options.devices is None else specs[: options.devices]
    count = options.devices or 0
    specs = [DeviceSpec(f"{options.name_prefix}{i:05d}") for i in range(count)]
    if specs:
        _check_name(options.product_key, specs[-1].device_name)
    return specs


# ------------------------------------------------------------------------------------ states, counters


class DeviceState(StrEnum):
    PENDING = "pending"  # waiting for its turn to connect
    BOOTING = "booting"  # connecting, subscribing, informing
    IDLE = "idle"  # informed, waiting for a notice
    DOWNLOADING = "downloading"
    INSTALLING = "installing"  # verifying and flashing
    REBOOTING = "rebooting"  # reconnecting to inform the new version
    UPGRADED = "upgraded"
    FAILED = "failed"
    OFFLINE = "offline"  # could not log in (refused, unreachable)


FINAL = frozenset({DeviceState.UPGRADED, DeviceState.FAILED, DeviceState.OFFLINE})
BUSY = frozenset(
    {
        DeviceState.PENDING,
        DeviceState.BOOTING,
        DeviceState.DOWNLOADING,
        DeviceState.INSTALLING,
        DeviceState.REBOOTING,
    }
)


class EndReason(StrEnum):
    ALL_FINAL = "all_final"
    IDLE = "idle"
    DURATION_LIMIT = "duration_limit"
    ABORTED = "aborted"  # a worker process died
    INTERRUPTED = "interrupted"  # the caller asked to stop (Ctrl-C in the CLI)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The fleet's counters at one moment; snapshots of worker processes add up."""

    total: int = 0
    states: dict[str, int] = field(default_factory=dict)
    connected: int = 0
    informed: int = 0
    notified: int = 0
    bytes: int = 0
    last_activity: float = 0.0  # time.time() of the last notice, boot or finished upgrade

    def count(self, *states: DeviceState) -> int:
        return sum(self.states.get(s, 0) for s in states)

    @property
    def busy(self) -> int:
        return self.count(*BUSY)

    @property
    def final(self) -> int:
        return self.count(*FINAL)

    @classmethod
    def merge(cls, parts: list[Snapshot]) -> Snapshot:
        states: Counter[str] = Counter()
        for p in parts:
            states.update(p.states)
        return cls(
            total=sum(p.total for p in parts),
            states=dict(states),
            connected=sum(p.connected for p in parts),
            informed=sum(p.informed for p in parts),
            notified=sum(p.notified for p in parts),
            bytes=sum(p.bytes for p in parts),
            last_activity=max((p.last_activity for p in parts), default=0.0),
        )


def end_reason(
    snapshot: Snapshot, elapsed: float, now: float, options: SimulationOptions
) -> EndReason | None:
    """Whether the run is over (see the module docstring), from counters and times only."""
    if snapshot.final == snapshot.total:
        return EndReason.ALL_FINAL
    if snapshot.notified and not snapshot.busy and now - snapshot.last_activity >= options.idle_exit:
        return EndReason.IDLE
    if elapsed >= options.duration_limit:
        return EndReason.DURATION_LIMIT
    return None


class Stats:
    """The live counters of the devices in this process."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.states: Counter[str] = Counter({DeviceState.PENDING.value: total})
        self.connected = 0
        self.informed = 0
        self.notified = 0
        self.bytes = 0
        self.last_activity = time.time()

    def move(self, old: DeviceState, new: DeviceState) -> None:
        self.states[old.value] -= 1
        self.states[new.value] += 1

    def touch(self) -> None:
        self.last_activity = time.time()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.total,
            {k: v for k, v in self.states.items() if v},
            self.connected,
            self.informed,
            self.notified,
            self.bytes,
            self.last_activity,
        )


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class DeviceOutcome:
    """What one device did; times are `time.time()` values (None: never happened)."""

    device: str
    state: str
    version: str
    reason: str = ""  # the desc of the failure it reported, or why it gave up
    failed_step: str | None = None
    connected_at: float | None = None
    informed_at: float | None = None
    first_notice_at: float | None = None
    succeeded_at: float | None = None
    bytes: int = 0
    notices: int = 0
    attempts: int = 0
    resumes: int = 0
    reconnects: int = 0

    @property
    def upgrade_seconds(self) -> float | None:
        """First notice to the acknowledged inform of the new version."""
        if self.first_notice_at is None or self.succeeded_at is None:
            return None
        return self.succeeded_at - self.first_notice_at


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _spread(values: list[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "max": r(max(values) if values else None),
    }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class SimulationResult:
    options: SimulationOptions
    started_at: float
    ended_at: float
    end_reason: EndReason
    devices: tuple[DeviceOutcome, ...]

    def count(self, state: DeviceState) -> int:
        return sum(1 for d in self.devices if d.state == state)

    @property
    def counts(self) -> dict[str, int]:
        """Devices per end state; busy states at the end add up as `unfinished`."""
        states = Counter(d.state for d in self.devices)
        shown = (DeviceState.UPGRADED, DeviceState.FAILED, DeviceState.OFFLINE, DeviceState.IDLE)
        counts = {s.value: states.get(s.value, 0) for s in shown}
        counts["unfinished"] = sum(states.get(s.value, 0) for s in BUSY)
        return counts

    @property
    def total_bytes(self) -> int:
        return sum(d.bytes for d in self.devices)

    @property
    def upgrade_seconds(self) -> list[float]:
        return [s for d in self.devices if (s := d.upgrade_seconds) is not None]

    @property
    def notice_to_last_success(self) -> float | None:
        """From the first notice any device got to the last success."""
        notices = [d.first_notice_at for d in self.devices if d.first_notice_at is not None]
        successes = [d.succeeded_at for d in self.devices if d.succeeded_at is not None]
        if not notices or not successes:
            return None
        return max(successes) - min(notices)

    @property
    def informed_seconds(self) -> list[float]:
        """Start to each device's first acknowledged inform."""
        return [d.informed_at - self.started_at for d in self.devices if d.informed_at is not None]

    def to_json(self) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.started_at, 3)

        informed = self.informed_seconds
        notice_to_last = self.notice_to_last_success
        return {
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "elapsed_s": round(self.ended_at - self.started_at, 3),
            "end_reason": self.end_reason.value,
            "devices_total": len(self.devices),
            "counts": self.counts,
            "failed_steps": dict(Counter(d.failed_step for d in self.devices if d.failed_step)),
            "bytes_total": self.total_bytes,
            "upgrade_seconds": _spread(self.upgrade_seconds),
            "informed_seconds": _spread(informed),
            "all_informed_after_s": round(max(informed), 3) if informed else None,
            "notice_to_last_success_s": None if notice_to_last is None else round(notice_to_last, 3),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()},
            "devices": [
                {
                    "device": d.device,
                    "state": d.state,
                    "version": d.version,
                    "reason": d.reason,
                    "failed_step": d.failed_step,
                    "connected_s": rel(d.connected_at),
                    "informed_s": rel(d.informed_at),
                    "first_notice_s": rel(d.first_notice_at),
                    "succeeded_s": rel(d.succeeded_at),
                    "upgrade_s": None if d.upgrade_seconds is None else round(d.upgrade_seconds, 3),
                    "bytes": d.bytes,
                    "notices": d.notices,
                    "attempts": d.attempts,
                    "resumes": d.resumes,
                    "reconnects": d.reconnects,
                }
                for d in self.devices
            ],
        }


# ------------------------------------------------------------------------------ MQTT on the asyncio loop


class ConnectionLost(Exception):
    """The MQTT connection closed while waiting for an answer."""


class LoginRefused(Exception):
    """The broker answered CONNACK with a non-zero return code."""

    def __init__(self, rc: int) -> None:
        super().__init__(f"login refused (CONNACK {rc}: {mqtt.connack_string(rc)})")
        self.rc = rc


@dataclass(frozen=True, slots=True)
class Login:
    client_id: str
    username: str | None
    password: str | None


_CLOSED_BEFORE_CONNACK = -1


class Hub:
    """What the MQTT links of one process share: the loop, the connect thread pool, the TLS context, and
    the once-a-second keep-alive pass over every open link."""

    def __init__(self, options: SimulationOptions) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.options = options
        self.https = options.ssl_context()
        self.tls = self.https if options.tls else None
        self.connected = 0  # links with an accepted CONNACK
        self.executor = ThreadPoolExecutor(CONNECT_THREADS, thread_name_prefix="simulator-connect")
        self.links: set[Link] = set()
        self._misc = asyncio.create_task(self._keepalive())

    def in_loop(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn` on the loop's thread: now if called there, else as soon as the loop can."""
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for link in list(self.links):
                link.misc()

    async def aclose(self) -> None:
        self._misc.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._misc
        await asyncio.gather(*(link.close() for link in list(self.links)))
        self.executor.shutdown(wait=True)


class Link:
    """One MQTT connection of one device: a paho client driven by the hub's loop."""

    def __init__(
        self,
        hub: Hub,
        login: Login,
        on_message: Callable[[str, bytes], None],
        on_lost: Callable[[Link], None],
    ) -> None:
        self.hub = hub
        self._on_message = on_message
        self._on_lost = on_lost
        client = mqtt.Client(
            client_id=login.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if login.username is not None:
            client.username_pw_set(login.username, login.password)
        if hub.tls is not None:
            client.tls_set_context(hub.tls)
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._connack
        client.on_disconnect = self._disconnected
        client.on_publish = self._puback
        client.on_subscribe = self._suback
        client.on_message = self._message
        self.client = client
        self._sock: Any = None  # the socket registered with the loop
        self._writing = False
        self._connack_future: asyncio.Future[int] = hub.loop.create_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self.connected = False
        self.closed = asyncio.Event()
        self._closing = False

    # paho's socket callbacks: register the socket with the loop (from the connect thread: via the loop)

    def _socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        self._sock = sock
        self.hub.links.add(self)
        self.hub.loop.add_reader(sock, self._readable)

    def _socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._forget, sock)

    def _forget(self, sock: Any) -> None:
        if self._sock is sock:
            self.hub.loop.remove_reader(sock)
            if self._writing:
                self.hub.loop.remove_writer(sock)
                self._writing = False
            self._sock = None
        self.hub.links.discard(self)
        self._gone()

    def _register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if self._sock is sock and not self._writing:
            self._writing = True
            self.hub.loop.add_writer(sock, self.client.loop_write)

    def _unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if self._sock is sock and self._writing:
            self._writing = False
            self.hub.loop.remove_writer(sock)

    def _readable(self) -> None:
        sock = self._sock
        rc = self.client.loop_read()
        # Records TLS already decrypted wake no reader: drain them while the socket stays the same.
        while rc == mqtt.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and self._sock is sock:
            if not sock.pending():
                break
            rc = self.client.loop_read()

    def misc(self) -> None:
        if self._sock is not None:
            self.client.loop_misc()

    # paho's protocol callbacks (always on the loop's thread: they run inside loop_read/loop_write)

    def _connack(self, _client: Any, _userdata: Any, _flags: Any, rc: int) -> None:
        if rc == 0 and not self.connected:
            self.connected = True
            self.hub.connected += 1
        if not self._connack_future.done():
            self._connack_future.set_result(rc)

    def _disconnected(self, _client: Any, _userdata: Any, _rc: int) -> None:
        self._down()

    def _down(self) -> None:
        """The connection is over (paho reports it, or its socket closed): fail what waits on it, once."""
        for future in self._acks.values():
            if not future.done():
                future.set_exception(ConnectionLost("the connection closed"))
        self._acks.clear()
        if not self._connack_future.done():
            self._connack_future.set_result(_CLOSED_BEFORE_CONNACK)
        if self.connected:
            self.connected = False
            self.hub.connected -= 1
            if not self._closing:
                self._on_lost(self)

    def _gone(self) -> None:
        self._down()
        self.closed.set()

    def _puback(self, _client: Any, _userdata: Any, mid: int) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _suback(self, _client: Any, _userdata: Any, mid: int, granted: Any) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(tuple(granted))

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._on_message(str(message.topic), bytes(message.payload))

    # what a device does with it

    async def connect(self) -> None:
        """TCP (and TLS) connect on the hub's thread pool, then wait for CONNACK; raises LoginRefused,
        OSError, ssl.SSLError or TimeoutError."""
        options = self.hub.options
        pending = self.hub.loop.run_in_executor(
            self.hub.executor, self.client.connect, options.host, options.port, KEEPALIVE_S
        )
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await pending  # the thread finishes its connect (bounded by paho's 5 s); then close
            await self.close()
            raise
        try:
            rc = await asyncio.wait_for(asyncio.shield(self._connack_future), REPLY_TIMEOUT_S)
        except BaseException:
            await self.close()
            raise
        if rc == _CLOSED_BEFORE_CONNACK:
            await self.close()
            raise ConnectionLost("the connection closed before CONNACK")
        if rc != 0:
            await self.close()
            raise LoginRefused(rc)

    async def subscribe(self, topic: str) -> int:
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"subscribe: {mqtt.error_string(rc)}")
        granted: tuple[int, ...] = await self._answer(mid)
        return granted[0] if granted else 0x80

    async def publish(self, topic: str, doc: dict[str, Any]) -> None:
        """Publish with QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, json.dumps(doc), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish: {mqtt.error_string(info.rc)}")
        await self._answer(info.mid)

    async def _answer(self, mid: int) -> Any:
        if not self.connected:
            raise ConnectionLost("not connected")
        future: asyncio.Future[Any] = self.hub.loop.create_future()
        self._acks[mid] = future
        try:
            return await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        finally:
            self._acks.pop(mid, None)

    async def close(self, grace: float = 2.0) -> None:
        """DISCONNECT and wait for the socket to close; after `grace` seconds, close it without ceremony."""
        self._closing = True
        if self._sock is None:
            self._gone()
            return
        if self.connected:
            self.client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), grace)
        sock = self._sock
        if sock is not None:
            self._forget(sock)
            sock.close()


# ------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class Notice:
    """The `data` of an upgrade notice (SPEC §3), parsed at the boundary."""

    url: str
    size: int
    version: str
    md5: str
    sign: str
    sign_method: str
    module: str | None

    @classmethod
    def parse(cls, payload: bytes) -> Notice:
        doc = json.loads(payload)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, dict):
            raise ValueError("no data object")
        url, size, version = data.get("url"), data.get("size"), data.get("version")
        md5 = data.get("md5")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ValueError("url is missing or not http(s)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("size is not a non-negative integer")
        if not isinstance(version, str) or not version:
            raise ValueError("version is missing")
        if not isinstance(md5, str):
            raise ValueError("md5 is missing")
        method = data.get("signMethod", "Md5")
        sign = data.get("sign", md5)
        if method not in ("Md5", "SHA256") or not isinstance(sign, str):
            raise ValueError(f"signMethod {method!r} is not Md5 or SHA256")
        module = data.get("module")
        return cls(
            url, size, version, md5.lower(), sign.lower(), method, module if isinstance(module, str) else None
        )


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """What goes wrong in one upgrade attempt, drawn from the seed, the device and the attempt number."""

    failure: str | None  # "-2", "-3", "-4" or None
    at: float  # where in the download the failure (or corruption) strikes, 0..1
    interrupt_at: float | None  # where the download is cut once and resumed

    @classmethod
    def draw(cls, options: SimulationOptions, device: str, attempt: int) -> AttemptPlan:
        rng = random.Random(f"{options.seed}/{device}/{attempt}")  # noqa: S311 - simulation, not crypto
        fails = rng.random() < options.fail_rate
        step = options.fail_step or rng.choice(FAILURE_STEPS)
        at = rng.uniform(0.1, 0.9)
        interrupted = rng.random() < options.interrupt_rate
        interrupt_at = rng.uniform(0.05, 0.95)
        return cls(step if fails else None, at, interrupt_at if interrupted else None)


class UpgradeFailed(Exception):
    """The device reports a negative step with this desc."""

    def __init__(self, step: str, desc: str) -> None:
        super().__init__(desc)
        self.step, self.desc = step, desc[:128]


class GaveUp(Exception):
    """The device lost its MQTT connection too often, or could not log in."""


class _Interrupted(Exception):
    pass


class _Lost:
    """Put in a device's inbox when its connection closed unexpectedly."""

    def __init__(self, link: Link) -> None:
        self.link = link


class SimDevice:
    """One simulated device: the Aliyun SDK's OTA behaviour as an asyncio task."""

    def __init__(
        self,
        spec: DeviceSpec,
        options: SimulationOptions,
        hub: Hub,
        http: aiohttp.ClientSession,
        stats: Stats,
    ) -> None:
        self.options, self.hub, self.http, self.stats = options, hub, http, stats
        self.ref = _check_name(options.product_key, spec.device_name)
        self.secret = spec.secret
        pk, dn = self.ref.product_key, self.ref.device_name
        self.upgrade_topic = f"/ota/device/upgrade/{pk}/{dn}"
        self.inform_topic = f"/ota/device/inform/{pk}/{dn}"
        self.progress_topic = f"/ota/device/progress/{pk}/{dn}"
        self.state = DeviceState.PENDING
        self.version = options.version
        self.inbox: asyncio.Queue[Notice | _Lost] = asyncio.Queue()
        self.link: Link | None = None
        self._next_id = 0
        self._losses = 0
        self.reason = ""
        self.failed_step: str | None = None
        self.connected_at: float | None = None
        self.informed_at: float | None = None
        self.first_notice_at: float | None = None
        self.succeeded_at: float | None = None
        self.bytes = 0
        self.notices = 0
        self.attempts = 0
        self.resumes = 0
        self.reconnects = 0

    def outcome(self) -> DeviceOutcome:
        return DeviceOutcome(
            str(self.ref),
            self.state.value,
            self.version,
            self.reason,
            self.failed_step,
            self.connected_at,
            self.informed_at,
            self.first_notice_at,
            self.succeeded_at,
            self.bytes,
            self.notices,
            self.attempts,
            self.resumes,
            self.reconnects,
        )

    def _enter(self, state: DeviceState) -> None:
        if state != self.state:
            self.stats.move(self.state, state)
            self.state = state
            if state in FINAL or state == DeviceState.IDLE:
                self.stats.touch()

    # the device's life

    async def run(self) -> None:
        try:
            await self._boot(self.version)
            self._enter(DeviceState.IDLE)
            while True:
                event = await self.inbox.get()
                if isinstance(event, _Lost):
                    if event.link is self.link:
                        await self._recover()
                    continue
                await self._upgrade(event)
        except GaveUp as e:
            self.reason = str(e)
            upgrading = self.state in (DeviceState.DOWNLOADING, DeviceState.INSTALLING, DeviceState.REBOOTING)
            self._enter(DeviceState.FAILED if upgrading else DeviceState.OFFLINE)
            log.debug("%s gave up: %s", self.ref, e)
        except Exception as e:  # a device must never take the fleet down; it records why it stopped
            log.warning("%s stopped: %r", self.ref, e)
            self.reason = f"simulator error: {e!r}"[:200]
            self._enter(DeviceState.FAILED)

    async def _boot(self, version: str, module: str | None = None) -> None:
        """Connect, subscribe to the upgrade topic and inform `version` (what an SDK app does at start)."""
        if self.state != DeviceState.REBOOTING:
            self._enter(DeviceState.BOOTING)
        await self._ensure_link()
        await self._send(self.inform_topic, {"version": version} | ({"module": module} if module else {}))
        if self.informed_at is None:
            self.informed_at = time.time()
            self.stats.informed += 1
        if module is None:
            self.version = version

    async def _recover(self) -> None:
        """The connection dropped while idle: reconnect and inform again, like a rebooted device. A device
        that had finished keeps its end state even if it cannot come back."""
        state = self.state
        try:
            await self._boot(self.version)
        except GaveUp as e:
            if state not in FINAL:
                raise
            self._enter(state)
            log.debug("%s could not reconnect after finishing: %s", self.ref, e)
            return
        self._enter(state if state in FINAL else DeviceState.IDLE)

    def _login(self) -> Login:
        pk, dn = self.ref.product_key, self.ref.device_name
        if self.secret is None:
            return Login(f"{pk}.{dn}", f"{dn}&{pk}", None)
        signed = login_for(self.ref, self.secret)
        return Login(signed.client_id, signed.username, signed.password)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != self.upgrade_topic:
            return
        try:
            notice = Notice.parse(payload)
        except ValueError as e:
            log.warning("%s ignores a malformed notice: %s", self.ref, e)
            return
        self.notices += 1
        if self.first_notice_at is None:
            self.first_notice_at = time.time()
            self.stats.notified += 1
        self.stats.touch()
        if self.state in (DeviceState.DOWNLOADING, DeviceState.INSTALLING, DeviceState.REBOOTING):
            log.debug("%s ignores a notice while upgrading", self.ref)
            return
        self.inbox.put_nowait(notice)

    def _on_lost(self, link: Link) -> None:
        self.inbox.put_nowait(_Lost(link))

    async def _ensure_link(self) -> Link:
        """The open connection, else a new one (bounded tries; a refused login is final)."""
        if self.link is not None and self.link.connected:
            return self.link
        if self.link is not None:
            await self.link.close()
            self.reconnects += 1
        error: Exception | None = None
        for attempt in range(CONNECT_TRIES):
            if attempt:
                await asyncio.sleep(attempt)
            link = Link(self.hub, self._login(), self._on_message, self._on_lost)
            self.link = link
            try:
                await link.connect()
                granted = await link.subscribe(self.upgrade_topic)
            except LoginRefused as e:
                raise GaveUp(str(e)) from e
            except ssl.SSLCertVerificationError as e:  # retrying cannot help
                raise GaveUp(f"TLS: {e.verify_message}") from e
            except (OSError, TimeoutError, ConnectionLost) as e:
                error = e
                await link.close()
                continue
            if granted == 0x80:
                await link.close()
                raise GaveUp(f"subscription to {self.upgrade_topic} refused")
            if self.connected_at is None:
                self.connected_at = time.time()
            return link
        raise GaveUp(f"could not connect after {CONNECT_TRIES} tries: {error!r}")

    async def _send(self, topic: str, params: dict[str, Any]) -> None:
        """Publish `{"id", "params"}` with QoS 1 until acknowledged, reconnecting after a lost connection."""
        self._next_id += 1
        doc = {"id": str(self._next_id), "params": params}
        while True:
            link = await self._ensure_link()
            try:
                await link.publish(topic, doc)
                return
            except (ConnectionLost, TimeoutError) as e:
                self._losses += 1
                if self._losses > CONNECTION_LOSSES:
                    raise GaveUp(f"MQTT connection lost {self._losses} times: {e}") from e
                await link.close()

    async def _upgrade(self, notice: Notice) -> None:
        self.attempts += 1
        plan = AttemptPlan.draw(self.options, str(self.ref), self.attempts)
        self.failed_step = None
        self.reason = ""
        module = {"module": notice.module} if notice.module else {}
        self._enter(DeviceState.DOWNLOADING)
        try:
            await self._download(notice, plan)
            self._enter(DeviceState.INSTALLING)
            if self.options.flash_seconds:
                await asyncio.sleep(self.options.flash_seconds)
            if plan.failure == "-4":
                raise UpgradeFailed("-4", "simulated flash write error")
        except UpgradeFailed as e:
            await self._send(self.progress_topic, {"step": e.step, "desc": e.desc} | module)
            self.failed_step, self.reason = e.step, e.desc
            self._enter(DeviceState.FAILED)
            return
        if self.options.reboot:
            self._enter(DeviceState.REBOOTING)
            if self.link is not None:
                await self.link.close()
                self.link = None  # a reboot, not a lost connection
            await self._boot(notice.version, notice.module)
        else:
            await self._send(self.inform_topic, {"version": notice.version} | module)
            if notice.module is None:
                self.version = notice.version
        self.succeeded_at = time.time()
        self._enter(DeviceState.UPGRADED)

    async def _download(self, notice: Notice, plan: AttemptPlan) -> None:
        """Fetch `notice.url` in Range requests, reporting every 10 %, and verify it; raises UpgradeFailed."""
        transfer = Transfer(self, notice, plan)
        if notice.size == 0:
            await transfer.take(b"")
        errors = 0
        while transfer.offset < notice.size:
            try:
                await transfer.fetch_range()
                errors = 0
            except _Interrupted:
                self.resumes += 1
                await asyncio.sleep(0.1)
            except (aiohttp.ClientError, TimeoutError) as e:
                errors += 1
                if errors >= DOWNLOAD_TRIES:
                    raise UpgradeFailed(
                        "-2", f"download failed {errors} times at byte {transfer.offset}: {e!r}"
                    ) from e
                self.resumes += 1
                await asyncio.sleep(0.5 * 2 ** (errors - 1))
        self._enter(DeviceState.INSTALLING)
        digest = transfer.hasher.hexdigest()
        if digest != notice.sign:
            raise UpgradeFailed(
                "-3", f"{notice.sign_method} mismatch: got {digest[:16]}, want {notice.sign[:16]}"
            )

    async def report_progress(self, step: int, module: str | None) -> None:
        await self._send(
            self.progress_topic,
            {"step": str(step), "desc": "downloading"} | ({"module": module} if module else {}),
        )


class Transfer:
    """One download attempt of one device: where it is, its hash, its throttle and its planned mishaps."""

    def __init__(self, device: SimDevice, notice: Notice, plan: AttemptPlan) -> None:
        self.device, self.notice = device, notice
        size = notice.size
        self.hasher = hashlib.md5(usedforsecurity=False) if notice.sign_method == "Md5" else hashlib.sha256()
        self.fail_at = int(size * plan.at) if plan.failure == "-2" else None
        self.corrupt_at = int(size * plan.at) if plan.failure == "-3" and size else None
        self.interrupt_at = int(size * plan.interrupt_at) if plan.interrupt_at is not None else None
        self.speed = device.options.download_speed
        self.piece_bytes = (
            PIECE_BYTES if self.speed is None else max(1024, min(PIECE_BYTES, self.speed // 10))
        )
        self.tls: ssl.SSLContext | bool = device.hub.https if notice.url.startswith("https://") else False
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=REPLY_TIMEOUT_S, sock_read=30)
        self.offset = 0
        self.next_step = 10
        self.loop = device.hub.loop
        self.started = self.loop.time()

    async def fetch_range(self) -> None:
        """GET the next range; raises UpgradeFailed, _Interrupted, or a retryable aiohttp/timeout error."""
        offset, size = self.offset, self.notice.size
        end = min(offset + self.device.options.range_bytes, size) - 1
        headers = {"Range": f"bytes={offset}-{end}"}
        device = self.device
        async with device.http.get(
            self.notice.url, headers=headers, ssl=self.tls, timeout=self.timeout
        ) as response:
            if response.status != 206:
                if response.status == 429 or response.status >= 500:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status, message=response.reason or ""
                    )
                raise UpgradeFailed("-2", f"HTTP {response.status} for bytes {offset}-{end}")
            async for piece in response.content.iter_chunked(self.piece_bytes):
                if len(piece) > end + 1 - self.offset:
                    raise UpgradeFailed("-2", f"the server sent more than bytes {offset}-{end}")
                if self.fail_at is not None and self.offset + len(piece) > self.fail_at:
                    response.close()
                    raise UpgradeFailed("-2", f"simulated network failure at byte {self.fail_at} of {size}")
                if self.interrupt_at is not None and self.offset + len(piece) > self.interrupt_at:
                    await self.take(piece[: self.interrupt_at - self.offset])
                    self.interrupt_at = None
                    response.close()  # the connection drops mid-transfer; the next range resumes
                    raise _Interrupted
                await self.take(piece)
            if self.offset != end + 1:
                raise aiohttp.ClientPayloadError(
                    f"short body: got {self.offset - offset} of bytes {offset}-{end}"
                )

    async def take(self, piece: bytes) -> None:
        """Hash and count `piece`, report each 10 % reached, and keep to the download speed."""
        if self.corrupt_at is not None and self.offset <= self.corrupt_at < self.offset + len(piece):
            flipped = bytearray(piece)
            flipped[self.corrupt_at - self.offset] ^= 0xFF  # a bit flip in transit: verification catches it
            piece = bytes(flipped)
        self.hasher.update(piece)
        self.offset += len(piece)
        self.device.bytes += len(piece)
        self.device.stats.bytes += len(piece)
        size = self.notice.size
        while self.next_step <= 100 and self.offset * 100 >= self.next_step * size:
            await self.device.report_progress(self.next_step, self.notice.module)
            self.next_step += 10
        if self.speed is not None:
            delay = self.started + self.offset / self.speed - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)


# --------------------------------------------------------------------------------------------- fleets


class Fleet:
    """The devices of one process, started at the connect rate, stopped on request."""

    def __init__(self, specs: list[DeviceSpec], options: SimulationOptions) -> None:
        self.specs, self.options = specs, options
        self.stats = Stats(len(specs))
        self.devices: list[SimDevice] = []
        self.hub: Hub | None = None

    def snapshot(self) -> Snapshot:
        return replace(self.stats.snapshot(), connected=self.hub.connected if self.hub else 0)

    def outcomes(self) -> list[DeviceOutcome]:
        started = {d.ref.device_name for d in self.devices}
        pending = [
            DeviceOutcome(
                f"{self.options.product_key}/{s.device_name}", DeviceState.PENDING.value, self.options.version
            )
            for s in self.specs
            if s.device_name not in started
        ]
        return [d.outcome() for d in self.devices] + pending

    async def run(self, stop: asyncio.Event) -> None:
        """Run the devices until `stop` is set; then close every connection."""
        hub = self.hub = Hub(self.options)
        connector = aiohttp.TCPConnector(limit=0)
        tasks: list[asyncio.Task[None]] = []
        try:
            async with aiohttp.ClientSession(connector=connector) as http:
                launcher = asyncio.create_task(self._launch(hub, http, tasks))
                try:
                    await stop.wait()
                finally:
                    launcher.cancel()
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(launcher, *tasks, return_exceptions=True)
        finally:
            await hub.aclose()

    async def _launch(self, hub: Hub, http: aiohttp.ClientSession, tasks: list[asyncio.Task[None]]) -> None:
        rate = self.options.connect_rate
        began = hub.loop.time()
        for i, spec in enumerate(self.specs):
            if rate:
                delay = began + i / rate - hub.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            device = SimDevice(spec, self.options, hub, http, self.stats)
            self.devices.append(device)
            tasks.append(asyncio.create_task(device.run(), name=f"device {device.ref}"))


Reporter = Callable[[Snapshot, float], None]  # counters and seconds since the start


async def run_simulation(
    options: SimulationOptions, reporter: Reporter | None = None, interrupt: asyncio.Event | None = None
) -> SimulationResult:
    """Run the simulation to its end (see the module docstring) and answer what every device did.

    `reporter` gets the counters about ten times a second; setting `interrupt` ends the run early (its
    outcomes are reported as they stand)."""
    options.check()
    specs = plan_devices(options)
    interrupt = interrupt or asyncio.Event()
    if options.processes > 1 and len(specs) > 1:
        return await _run_processes(specs, options, reporter, interrupt)
    return await _run_here(specs, options, reporter, interrupt)


def _decide(
    snapshot: Snapshot, started: float, options: SimulationOptions, interrupt: asyncio.Event
) -> EndReason | None:
    if interrupt.is_set():
        return EndReason.INTERRUPTED
    now = time.time()
    return end_reason(snapshot, now - started, now, options)


async def _run_here(
    specs: list[DeviceSpec], options: SimulationOptions, reporter: Reporter | None, interrupt: asyncio.Event
) -> SimulationResult:
    started = time.time()
    fleet = Fleet(specs, options)
    stop = asyncio.Event()
    runner = asyncio.create_task(fleet.run(stop))
    reason: EndReason | None = None
    try:
        while reason is None:
            await asyncio.wait({runner}, timeout=0.1)
            if runner.done():
                runner.result()  # a crash of the fleet itself surfaces here
                reason = EndReason.ABORTED
                break
            now = time.time()
            snapshot = fleet.snapshot()
            if reporter is not None:
                reporter(snapshot, now - started)
            reason = _decide(snapshot, started, options, interrupt)
    finally:
        stop.set()
        await runner
    ended = time.time()
    return SimulationResult(options, started, ended, reason, tuple(fleet.outcomes()))


# ------------------------------------------------------------------------------------ worker processes


def _worker(index: int, specs: list[DeviceSpec], options: SimulationOptions, out: Any, stop: Any) -> None:
    """A worker process: run a slice of the fleet, report counters until told to stop, then the outcomes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    logging.basicConfig(level=logging.WARNING, format=f"worker {index}: %(levelname)s %(name)s: %(message)s")
    asyncio.run(_worker_main(index, specs, options, out, stop))


async def _worker_main(
    index: int, specs: list[DeviceSpec], options: SimulationOptions, out: Any, stop: Any
) -> None:
    fleet = Fleet(specs, options)
    done = asyncio.Event()
    runner = asyncio.create_task(fleet.run(done))
    try:
        while not stop.is_set() and not runner.done():
            out.put(("snapshot", index, fleet.snapshot()))
            await asyncio.sleep(0.2)
    finally:
        done.set()
        await runner
        out.put(("snapshot", index, fleet.snapshot()))
        out.put(("outcomes", index, fleet.outcomes()))


class Workers:
    """Worker processes (spawned), each running a slice of the fleet; their counters and outcomes."""

    def __init__(self, specs: list[DeviceSpec], options: SimulationOptions) -> None:
        count = min(options.processes, len(specs))
        self.options = options
        self.slices = [specs[i::count] for i in range(count)]
        worker_options = replace(options, processes=1, connect_rate=options.connect_rate / count)
        context = multiprocessing.get_context("spawn")  # no fork of a process with a running loop
        self.out = context.Queue()
        self.stop = context.Event()
        self.processes = [
            context.Process(
                target=_worker,
                args=(i, piece, worker_options, self.out, self.stop),
                name=f"simulator-{i}",
                daemon=True,
            )
            for i, piece in enumerate(self.slices)
        ]
        self.snapshots = [Snapshot(len(s), {DeviceState.PENDING.value: len(s)}) for s in self.slices]
        self.outcomes: dict[int, list[DeviceOutcome]] = {}

    def start(self) -> None:
        for p in self.processes:
            p.start()

    def drain(self) -> None:
        """Take in what the workers reported so far."""
        while True:
            try:
                kind, index, value = self.out.get_nowait()
            except queue.Empty:
                return
            if kind == "snapshot":
                self.snapshots[index] = value
            else:
                self.outcomes[index] = value

    def snapshot(self) -> Snapshot:
        return Snapshot.merge(self.snapshots)

    async def died(self) -> bool:
        """Whether a worker exited without its outcomes (after giving its last words time to arrive)."""
        for _ in range(2):
            if not any(
                p.exitcode is not None and i not in self.outcomes for i, p in enumerate(self.processes)
            ):
                return False
            await asyncio.sleep(0.5)
            self.drain()
        return True

    async def finish(self) -> None:
        """Tell the workers to stop, collect their outcomes (bounded), and reap them."""
        self.stop.set()
        deadline = time.monotonic() + 30.0  # each worker's shutdown is bounded (connection close grace)
        while len(self.outcomes) < len(self.processes) and time.monotonic() < deadline:
            if all(p.exitcode is not None for p in self.processes):
                await asyncio.sleep(0.2)
                self.drain()
                break
            await asyncio.sleep(0.05)
            self.drain()
        for p in self.processes:
            await asyncio.to_thread(p.join, 5.0)
            if p.exitcode is None:
                p.terminate()
                await asyncio.to_thread(p.join, 5.0)
            p.close()
        self.out.close()
        self.out.join_thread()

    def merged_outcomes(self) -> list[DeviceOutcome]:
        merged: list[DeviceOutcome] = []
        for i, piece in enumerate(self.slices):
            merged += self.outcomes.get(i) or [
                DeviceOutcome(
                    f"{self.options.product_key}/{d.device_name}",
                    DeviceState.PENDING.value,
                    self.options.version,
                    reason=f"worker process {i} ended without a result",
                )
                for d in piece
            ]
        return merged


async def _run_processes(
    specs: list[DeviceSpec], options: SimulationOptions, reporter: Reporter | None, interrupt: asyncio.Event
) -> SimulationResult:
    workers = Workers(specs, options)
    started = time.time()
    workers.start()
    reason: EndReason | None = None
    try:
        while reason is None:
            await asyncio.sleep(0.1)
            workers.drain()
            now = time.time()
            merged = workers.snapshot()
            if reporter is not None:
                reporter(merged, now - started)
            if await workers.died():
                reason = EndReason.ABORTED
                break
            reason = _decide(merged, started, options, interrupt)
    finally:
        await workers.finish()
    ended = time.time()
    return SimulationResult(
        options, started, ended, reason or EndReason.ABORTED, tuple(workers.merged_outcomes())
    )


# ----------------------------------------------------------------------------------------- presentation


COLUMNS = (
    "connected",
    "informed",
    "notified",
    "downloading",
    "upgraded",
    "failed",
    "offline",
    "bytes",
    "elapsed",
)


def snapshot_row(snapshot: Snapshot, elapsed: float) -> dict[str, str]:
    return {
        "connected": str(snapshot.connected),
        "informed": str(snapshot.informed),
        "notified": str(snapshot.notified),
        "downloading": str(snapshot.count(DeviceState.DOWNLOADING)),
        "upgraded": str(snapshot.count(DeviceState.UPGRADED)),
        "failed": str(snapshot.count(DeviceState.FAILED)),
        "offline": str(snapshot.count(DeviceState.OFFLINE)),
        "bytes": _human_bytes(snapshot.bytes),
        "elapsed": f"{elapsed:.1f}s",
    }


def live_table(snapshot: Snapshot, elapsed: float, title: str) -> Table:
    """The live view: one row per counter (fits a narrow terminal)."""
    table = Table(title=title, show_header=False, min_width=40)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name, value in snapshot_row(snapshot, elapsed).items():
        table.add_row(name, value)
    return table


def status_line(snapshot: Snapshot, elapsed: float) -> str:
    return " ".join(f"{k}={v}" for k, v in snapshot_row(snapshot, elapsed).items())


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def summary_lines(result: SimulationResult) -> Iterator[str]:
    """The end-of-run summary, for people."""
    elapsed = result.ended_at - result.started_at
    yield f"simulation ended ({result.end_reason.value}) after {elapsed:.1f}s: {len(result.devices)} devices"
    yield "  " + ", ".join(f"{state} {n}" for state, n in result.counts.items())
    informed = result.informed_seconds
    if informed:
        yield f"  informed: {len(informed)} devices, the last {max(informed):.2f}s after the start"
    spread = _spread(result.upgrade_seconds)
    if spread["count"]:
        yield (
            f"  first notice -> upgraded: p50 {spread['p50']:.2f}s, p95 {spread['p95']:.2f}s, "
            f"max {spread['max']:.2f}s"
        )
    last = result.notice_to_last_success
    if last is not None:
        yield f"  first notice -> last success: {last:.2f}s"
    yield f"  downloaded {_human_bytes(result.total_bytes)}"
    steps = Counter(d.failed_step for d in result.devices if d.failed_step)
    if steps:
        yield "  reported failures: " + ", ".join(f"step {s}: {n}" for s, n in sorted(steps.items()))
    others = Counter(d.reason for d in result.devices if d.reason and not d.failed_step)
    for reason, n in others.most_common(3):
        yield f"  {n} device(s): {reason}"


async def run_with_display(options: SimulationOptions, *, live: bool, every: float = 5.0) -> SimulationResult:
    """`run_simulation` with a live table (`live`, for a terminal) or a status line every `every` seconds."""
    title = f"simulating {options.devices if options.devices is not None else 'all'} devices of {options.product_key}"
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loop
        loop.add_signal_handler(signal.SIGINT, interrupt.set)
    try:
        if live:
            with Live(live_table(Snapshot(), 0.0, title), refresh_per_second=4) as screen:

                def show(snapshot: Snapshot, elapsed: float) -> None:
                    screen.update(live_table(snapshot, elapsed, title))

                return await run_simulation(options, show, interrupt)
        last = -math.inf

        def line(snapshot: Snapshot, elapsed: float) -> None:
            nonlocal last
            if elapsed - last >= every:
                last = elapsed
                print(status_line(snapshot, elapsed), flush=True)

        return await run_simulation(options, line, interrupt)
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
