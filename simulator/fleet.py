"""The simulated devices and the fleet: each device informs, takes notices, downloads, reports and upgrades;
`run_simulation` runs them here or in worker processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import queue
import random
import signal
import ssl
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import TopicKind, topic_name
from simulator.model import (
    FAILURE_STEPS,
    FINAL,
    DeviceOutcome,
    DeviceSpec,
    DeviceState,
    EndReason,
    SimulationOptions,
    SimulationResult,
    Snapshot,
    Stats,
    check_name,
    end_reason,
    plan_devices,
)
from simulator.mqtt_link import REPLY_TIMEOUT_S, ConnectionLost, Hub, Link, Login, LoginRefused

CONNECT_TRIES = 3  # per (re)connect, for network errors; a refused login is not retried
CONNECTION_LOSSES = 3  # unexpected disconnects a device recovers from before giving up
DOWNLOAD_TRIES = 4  # consecutive HTTP errors per download before reporting -2
PIECE_BYTES = 16 * 1024
LAG_PROBE_S = 0.1  # how often a process's event loop lag is sampled

log = logging.getLogger("ota.simulator")


@dataclass(frozen=True, slots=True)
class Notice:
    """The `data` of an upgrade notice, parsed at the boundary."""

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


def _why(error: Exception) -> str:
    """A download error in a few words, the telling ones first (a desc is cut at 128 characters)."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        detail = getattr(error.certificate_error, "verify_message", "") or error.certificate_error
        return f"certificate verify failed ({detail}): trust the broker's CA"
    return f"{type(error).__name__}: {error}"


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
        self.ref = check_name(options.product_key, spec.device_name)
        self.secret = spec.secret
        self.upgrade_topic = topic_name(TopicKind.UPGRADE, self.ref)
        self.inform_topic = topic_name(TopicKind.INFORM, self.ref)
        self.progress_topic = topic_name(TopicKind.PROGRESS, self.ref)
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
                        "-2", f"download failed {errors} times at byte {transfer.offset}: {_why(e)}"
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


class LoopLag:
    """How late the running loop runs a timer asked for every `interval` seconds: how long any ready callback
    (a PUBACK read, a download piece) waits for the loop. A loop saturated here is the simulator's limit,
    not the broker's. One float per sample: bounded by the run's duration (10 a second)."""

    def __init__(self, interval: float = LAG_PROBE_S) -> None:
        self.interval = interval
        self.samples = array("d")
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        # a timer may fire early by up to the clock's resolution: that is no lag
        self.samples.append(max(0.0, loop.time() - self._due))
        self._schedule(loop)


class Fleet:
    """The devices of one process, started at the connect rate, stopped on request."""

    def __init__(self, specs: list[DeviceSpec], options: SimulationOptions) -> None:
        self.specs, self.options = specs, options
        self.stats = Stats(len(specs))
        self.devices: list[SimDevice] = []
        self.hub: Hub | None = None
        self.lag = LoopLag()

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
        self.lag.start()
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
            self.lag.stop()
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
    return SimulationResult(
        options, started, ended, reason, tuple(fleet.outcomes()), (tuple(fleet.lag.samples),)
    )


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
        out.put(("lag", index, fleet.lag.samples.tolist()))  # before the outcomes, which end the wait
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
        self.lags: dict[int, list[float]] = {}

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
            elif kind == "lag":
                self.lags[index] = value
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

    def merged_lags(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(self.lags.get(i, ())) for i in range(len(self.processes)))

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
        options,
        started,
        ended,
        reason or EndReason.ABORTED,
        tuple(workers.merged_outcomes()),
        workers.merged_lags(),
    )
