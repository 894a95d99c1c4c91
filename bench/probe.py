"""What a campaign does to the broker's control plane, measured beside it.

`ControlProbe` is one MQTT client of its own (not a device: its client ids and its topic are no device's) that
publishes a QoS 1 message every 100 ms and times each PUBACK, and every 2 s opens a fresh connection and times
CONNECT -> CONNACK: what a device's acknowledgements and logins wait while downloads load the machine.
`BrokerSampler` reads the broker's Prometheus endpoint, its RSS and CPU seconds (and the simulator's) once a
second: its gauges' peaks are therefore lower bounds (a 1 MB download on loopback can be over between two
readings), while its loop-lag histogram misses nothing. Both stop by themselves when told to: every wait is
bounded by `ANSWER_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import mqttlib

PUBLISH_EVERY_S = 0.1
CONNECT_EVERY_S = 2.0
ANSWER_TIMEOUT_S = 10.0  # an answer later than this counts as a timeout
PROBE_TOPIC = "probe/latency"
PROBE_USERNAME = "bench-probe"  # open auth mode: any username is let in, and it names no device

LAG = "ota_event_loop_lag_seconds"
GAUGES = (
    "ota_downloads_active",
    "ota_download_slots_used",
    "ota_transfers_in_flight",
    "ota_admission_window",
    "ota_tasks_waiting_for_capacity",
)
DOWNLOADS = "ota_downloads_total"  # by outcome
TASKS = "ota_tasks"  # by state


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile, `q` in 0..1; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# ------------------------------------------------------------------------------------ the MQTT probe


@dataclass
class Latencies:
    """Answer times of one kind: (seconds since the start, latency) per answer, and what went unanswered."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    timeouts: list[float] = field(default_factory=list)  # when each one's answer was given up on
    unanswered: int = 0  # in flight when their connection dropped
    failures: int = 0  # connections that could not be made, were refused, or dropped

    def summary(self, since: float = -math.inf, until: float = math.inf) -> dict[str, Any]:
        """The answers sent between `since` and `until` (seconds since the start)."""
        values = [latency for at, latency in self.samples if since <= at <= until]
        return {
            "count": len(values),
            "p50_ms": ms(quantile(values, 0.50)),
            "p99_ms": ms(quantile(values, 0.99)),
            "max_ms": ms(max(values) if values else None),
            "timeouts": sum(1 for at in self.timeouts if since <= at <= until),
            "unanswered": self.unanswered,
            "failures": self.failures,
        }


class _Lost(Exception):
    """The probe's connection closed."""


class ControlProbe:
    """PUBACK and CONNACK latencies from a client that is not a device, until `stop` is set."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        started: float,
        tag: str = "bench-probe",
        timeout: float = ANSWER_TIMEOUT_S,
    ) -> None:
        """`started`: the `time.monotonic()` that answer times are counted from; `timeout`: how long an answer
        is waited for before it counts as a timeout."""
        self.host, self.port, self.tag, self.started, self.timeout = host, port, tag, started, timeout
        self.puback = Latencies()
        self.connack = Latencies()

    def now(self) -> float:
        return time.monotonic() - self.started

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._publisher(stop))
            group.create_task(self._connector(stop))

    # QoS 1 publishes on one long connection

    async def _publisher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._publish_session(stop)
            except (OSError, TimeoutError, _Lost):
                self.puback.failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _publish_session(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
        pending: dict[int, float] = {}  # packet id -> monotonic time sent
        try:
            splitter = mqttlib.Splitter()
            writer.write(mqttlib.connect(f"{self.tag}-pub", keepalive=60, username=PROBE_USERNAME))
            rc = await asyncio.wait_for(_connack(reader, splitter), self.timeout)
            if rc != 0:
                raise _Lost(f"CONNACK {rc}")
            acks = asyncio.create_task(self._read_acks(reader, splitter, pending))
            try:
                await self._send_until(stop, writer, pending, acks)
            finally:
                acks.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, _Lost):
                    await acks
            if stop.is_set() and not pending:
                writer.write(mqttlib.DISCONNECT_PACKET)
        finally:
            self.puback.unanswered += len(pending)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _send_until(
        self,
        stop: asyncio.Event,
        writer: asyncio.StreamWriter,
        pending: dict[int, float],
        acks: asyncio.Task[None],
    ) -> None:
        """One publish every PUBLISH_EVERY_S until `stop`, then wait (bounded) for the last answers."""
        head, tail = mqttlib.publish_parts(PROBE_TOPIC, b"probe", qos=1)
        packet_id = 0
        due = time.monotonic()
        while not stop.is_set():
            self._expire(pending)
            if acks.done():
                raise _Lost("closed by the broker")
            packet_id = packet_id % 0xFFFF + 1
            pending[packet_id] = time.monotonic()
            writer.write(head + packet_id.to_bytes(2, "big") + tail)
            due = max(due + PUBLISH_EVERY_S, time.monotonic())  # a late tick is skipped, not caught up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - time.monotonic())
        while pending and not acks.done():
            self._expire(pending)
            await asyncio.sleep(0.05)

    def _expire(self, pending: dict[int, float]) -> None:
        limit = time.monotonic() - self.timeout
        for packet_id, sent in list(pending.items()):
            if sent < limit:
                del pending[packet_id]
                self.puback.timeouts.append(self.now())

    async def _read_acks(
        self, reader: asyncio.StreamReader, splitter: mqttlib.Splitter, pending: dict[int, float]
    ) -> None:
        while data := await reader.read(4096):
            received = time.monotonic()
            for kind, _flags, body in splitter.feed(data):
                if (
                    kind == mqttlib.PUBACK
                    and (sent := pending.pop(mqttlib.packet_id(body), None)) is not None
                ):
                    self.puback.samples.append((sent - self.started, received - sent))

    # fresh connections

    async def _connector(self, stop: asyncio.Event) -> None:
        """A new connection every CONNECT_EVERY_S; each is bounded, so at most a handful overlap."""
        attempts: set[asyncio.Task[None]] = set()
        n = 0
        due = time.monotonic()
        while not stop.is_set():
            n += 1
            task = asyncio.create_task(self._connect_once(n))
            attempts.add(task)
            task.add_done_callback(attempts.discard)
            due = max(due + CONNECT_EVERY_S, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - time.monotonic())
        if attempts:
            await asyncio.gather(*attempts)

    async def _connect_once(self, n: int) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except TimeoutError:
            self.connack.timeouts.append(self.now())
            return
        except OSError:
            self.connack.failures += 1
            return
        try:
            sent = time.monotonic()
            writer.write(mqttlib.connect(f"{self.tag}-c{n}", username=PROBE_USERNAME))
            rc = await asyncio.wait_for(_connack(reader, mqttlib.Splitter()), deadline - sent)
            if rc == 0:
                self.connack.samples.append((sent - self.started, time.monotonic() - sent))
                writer.write(mqttlib.DISCONNECT_PACKET)
            else:
                self.connack.failures += 1
        except TimeoutError:
            self.connack.timeouts.append(self.now())
        except (OSError, _Lost):
            self.connack.failures += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _connack(reader: asyncio.StreamReader, splitter: mqttlib.Splitter) -> int:
    """The return code of the CONNACK that opens the stream."""
    while data := await reader.read(4096):
        for kind, _flags, body in splitter.feed(data):
            if kind == mqttlib.CONNACK:
                return body[1]
            raise _Lost(f"packet type {kind} before CONNACK")
    raise _Lost("closed before CONNACK")


# ------------------------------------------------------------------------------- the broker, each second


@dataclass
class Sample:
    """One second's reading of the broker (and the simulator's processes)."""

    t: float  # seconds since the campaign's start
    rss_mb: float | None = None
    cpu_s: float | None = None  # broker CPU seconds since the sampler was made
    sim_rss_mb: float | None = None
    sim_cpu_s: float | None = None
    scrape_ms: float | None = None  # None: /metrics did not answer in time
    gauges: dict[str, float] = field(default_factory=dict)
    downloads: dict[str, float] = field(default_factory=dict)  # cumulative, by outcome
    tasks: dict[str, float] = field(default_factory=dict)
    lag_buckets: dict[float, float] = field(default_factory=dict)  # cumulative counts by upper bound
    lag_sum: float | None = None
    lag_count: float | None = None


def parse_metrics(text: str, into: Sample) -> None:
    """Take the figures this benchmark follows out of a Prometheus text exposition; absent ones stay absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in GAUGES:
                into.gauges[s.name] = s.value
            elif s.name == DOWNLOADS:
                into.downloads[s.labels.get("outcome", "")] = s.value
            elif s.name == TASKS:
                into.tasks[s.labels.get("state", "")] = s.value
            elif s.name == f"{LAG}_bucket":
                into.lag_buckets[float(s.labels["le"])] = s.value
            elif s.name == f"{LAG}_sum":
                into.lag_sum = s.value
            elif s.name == f"{LAG}_count":
                into.lag_count = s.value


class BrokerSampler:
    """Once a second until `stop`: GET /metrics (bounded), the broker's and the simulator's RSS and CPU."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        url: str,
        headers: Mapping[str, str],
        broker: psutil.Process,
        simulator: psutil.Process | None = None,
        *,
        started: float,
        every: float = 1.0,
    ) -> None:
        """`started`: the `time.monotonic()` that sample times are counted from."""
        self.http, self.url, self.headers, self.started = http, url, dict(headers), started
        self.broker, self.simulator, self.every = broker, simulator, every
        self.samples: list[Sample] = []
        self._cpu0 = _cpu(broker)
        self._sim_cpu0 = _tree_cpu(simulator) if simulator else None

    async def run(self, stop: asyncio.Event) -> None:
        due = time.monotonic()
        while not stop.is_set():
            sample = Sample(round(time.monotonic() - self.started, 2))
            self._processes(sample)
            await self._scrape(sample)
            self.samples.append(sample)
            due = max(due + self.every, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), due - time.monotonic())

    def _processes(self, sample: Sample) -> None:
        with contextlib.suppress(psutil.Error):
            sample.rss_mb = round(self.broker.memory_info().rss / 2**20, 1)
            sample.cpu_s = round(_cpu(self.broker) - self._cpu0, 2)
        if self.simulator is not None and self._sim_cpu0 is not None:
            with contextlib.suppress(psutil.Error):
                if self.simulator.status() == psutil.STATUS_ZOMBIE:
                    return  # it ended; its exit is not yet collected
                sample.sim_rss_mb = round(_tree_rss(self.simulator) / 2**20, 1)
                sample.sim_cpu_s = round(_tree_cpu(self.simulator) - self._sim_cpu0, 2)

    async def _scrape(self, sample: Sample) -> None:
        began = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)
        try:
            async with self.http.get(self.url, headers=self.headers, timeout=timeout) as r:
                if r.status != 200:
                    return
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        sample.scrape_ms = ms(time.monotonic() - began)
        parse_metrics(text, sample)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _tree(p: psutil.Process) -> list[psutil.Process]:
    return [p, *p.children(recursive=True)]


def _tree_cpu(p: psutil.Process) -> float:
    """CPU seconds of a process and its children now alive (a worker that ended takes its seconds along)."""
    total = 0.0
    for q in _tree(p):
        with contextlib.suppress(psutil.Error):
            total += _cpu(q)
    return total


def _tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in _tree(p):
        with contextlib.suppress(psutil.Error):
            total += q.memory_info().rss
    return total


# ------------------------------------------------------------------------------------ what it amounts to


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The `q` quantile of a cumulative histogram by linear interpolation in its bucket (as Prometheus'
    histogram_quantile); the highest finite bound when it falls beyond it; None when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def highest_bucket(buckets: Mapping[float, float]) -> float | None:
    """The upper bound of the highest bucket with an observation: what the largest value is at most."""
    bounds = sorted(buckets)
    previous = 0.0
    found: float | None = None
    for bound in bounds:
        if buckets[bound] > previous:
            found = bound
        previous = buckets[bound]
    return found


def delta(later: Mapping[float, float], earlier: Mapping[float, float]) -> dict[float, float]:
    return {bound: count - earlier.get(bound, 0.0) for bound, count in later.items()}


def lag_seconds(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Per second (between consecutive scrapes): the broker's loop lag mean, p99 and what its max is at most."""
    rows: list[dict[str, Any]] = []
    for earlier, later in itertools.pairwise(samples):
        if not earlier.lag_buckets or not later.lag_buckets:
            rows.append({"t": later.t})
            continue
        d = delta(later.lag_buckets, earlier.lag_buckets)
        n = (later.lag_count or 0) - (earlier.lag_count or 0)
        total = (later.lag_sum or 0) - (earlier.lag_sum or 0)
        rows.append(
            {
                "t": later.t,
                "lag_n": n,
                "lag_mean_ms": ms(total / n) if n else None,
                "lag_p99_ms": ms(histogram_quantile(0.99, d)),
                "lag_max_le_ms": _bound_ms(highest_bucket(d)),
            }
        )
    return rows


def _bound_ms(bound: float | None) -> float | str | None:
    if bound is None:
        return None
    return "inf" if math.isinf(bound) else ms(bound)


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """The campaign's figures from the broker's samples: loop lag over the whole run, peaks, outcomes."""
    scraped = [s for s in samples if s.scrape_ms is not None]
    with_lag = [s for s in scraped if s.lag_buckets]
    out: dict[str, Any] = {
        "samples": len(samples),
        "scrapes_failed": len(samples) - len(scraped),
        "scrape_ms_max": max((s.scrape_ms for s in scraped if s.scrape_ms is not None), default=None),
        "peak_rss_mb": _peak(s.rss_mb for s in samples),
        "cpu_s": next((s.cpu_s for s in reversed(samples) if s.cpu_s is not None), None),
        "simulator_peak_rss_mb": _peak(s.sim_rss_mb for s in samples),
        "simulator_cpu_s": next((s.sim_cpu_s for s in reversed(samples) if s.sim_cpu_s is not None), None),
    }
    for name in GAUGES:
        out[f"peak_{name.removeprefix('ota_')}"] = _peak(s.gauges.get(name) for s in scraped)
    if with_lag:
        whole = delta(with_lag[-1].lag_buckets, {} if len(with_lag) == 1 else with_lag[0].lag_buckets)
        seconds = lag_seconds(with_lag)
        means = [r["lag_mean_ms"] for r in seconds if r.get("lag_mean_ms") is not None]
        out["loop_lag_ms"] = {
            "observations": whole.get(math.inf, 0.0),
            "p50": ms(histogram_quantile(0.50, whole)),
            "p99": ms(histogram_quantile(0.99, whole)),
            "max_le": _bound_ms(highest_bucket(whole)),
            "worst_second_mean": max(means, default=None),
        }
    if scraped:
        first, last = scraped[0], scraped[-1]
        out["downloads"] = {k: v - first.downloads.get(k, 0.0) for k, v in last.downloads.items()} or None
        out["tasks"] = last.tasks or None
    return out


def _peak(values: Iterable[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def timeline(samples: Sequence[Sample], probe: ControlProbe | None = None) -> list[dict[str, Any]]:
    """One row per sample for a CSV: the broker's readings and the probe's answers in the second from it."""
    lag = {r["t"]: r for r in lag_seconds([s for s in samples if s.lag_buckets])}
    pubacks: dict[int, list[float]] = defaultdict(list)
    connacks: dict[int, list[float]] = defaultdict(list)
    timeouts: dict[int, int] = defaultdict(int)
    if probe is not None:
        for at, latency in probe.puback.samples:
            pubacks[int(at)].append(latency)
        for at, latency in probe.connack.samples:
            connacks[int(at)].append(latency)
        for at in probe.puback.timeouts + probe.connack.timeouts:
            timeouts[int(at)] += 1
    no_lag = dict.fromkeys(("lag_n", "lag_mean_ms", "lag_p99_ms", "lag_max_le_ms"))
    rows = []
    for s in samples:
        second = int(s.t)
        row: dict[str, Any] = {
            "t_s": s.t,
            "broker_rss_mb": s.rss_mb,
            "broker_cpu_s": s.cpu_s,
            "simulator_rss_mb": s.sim_rss_mb,
            "simulator_cpu_s": s.sim_cpu_s,
            "scrape_ms": s.scrape_ms,
            **{name.removeprefix("ota_"): s.gauges.get(name) for name in GAUGES},
            **no_lag,
            **{k: v for k, v in lag.get(s.t, {}).items() if k != "t"},
            "puback_max_ms": ms(max(pubacks[second], default=None)),
            "connack_max_ms": ms(max(connacks[second], default=None)),
            "probe_timeouts": timeouts.get(second, 0),
            **{f"downloads_{k}": v for k, v in sorted(s.downloads.items())},
            **{f"tasks_{k}": v for k, v in sorted(s.tasks.items())},
        }
        rows.append(row)
    return rows
