"""What to simulate and what happened: options, the devices' plan, states, counters and the results."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef

FAILURE_STEPS = ("-2", "-3", "-4")


class SimulatorError(Exception):
    """The simulation could not be set up (bad options, unreadable secrets file)."""


class ClientMissing(ImportError):
    """paho-mqtt, the simulator's MQTT client, is not installed (it comes with the `simulator` extra)."""


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
        check_name(product_key, dn)
        specs.append(DeviceSpec(dn, secret))
    return specs


def check_name(product_key: str, device_name: str) -> DeviceRef:
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
        check_name(options.product_key, specs[-1].device_name)
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
    # A failed device is not final here: its job's retries may notify it again.
    if snapshot.count(DeviceState.UPGRADED, DeviceState.OFFLINE) == snapshot.total:
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


def spread(values: list[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "max": r(max(values) if values else None),
    }


def lag_spread(values: Sequence[float]) -> dict[str, Any]:
    """p50/p99/max of event-loop lateness samples (seconds), in milliseconds."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    listed = list(values)
    return {
        "samples": len(listed),
        "p50": ms(percentile(listed, 50)),
        "p99": ms(percentile(listed, 99)),
        "max": ms(max(listed) if listed else None),
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
    # Per process running devices: how late its event loop ran a timer asked for every 100 ms (seconds).
    # Acknowledgements and download pieces wait as long there, which the broker is not to be blamed for.
    loop_lag: tuple[tuple[float, ...], ...] = ()

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
            "upgrade_seconds": spread(self.upgrade_seconds),
            "informed_seconds": spread(informed),
            "all_informed_after_s": round(max(informed), 3) if informed else None,
            "notice_to_last_success_s": None if notice_to_last is None else round(notice_to_last, 3),
            "loop_lag_ms": lag_spread([v for p in self.loop_lag for v in p])
            | {"per_process": [lag_spread(p) for p in self.loop_lag]},
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
