"""Prometheus metrics of one broker, served at `GET /metrics` on the admin listener.

Each broker has its own `CollectorRegistry` (never prometheus-client's global one), so several brokers
in one process do not clash. Two kinds of values:

- counted as they happen, by the code that sees them: MQTT messages in by topic kind and out by kind
  (`OtaPlugin`), database call durations (a hook the repository calls), refused logins by reason (a hook
  the auth plugin calls);
- read when Prometheus scrapes, from counters their owners keep anyway (`OtaService.rejected`,
  `OtaService.notices_sent`, the download endpoint's `DownloadStats`, the broker's `delivered_count`),
  from the plugin's connection tracking, and from the database (`Repository.task_state_counts`, one
  `COUNT ... GROUP BY` per scrape). Their owners need not know Prometheus.

Metric names are part of the product's contract once dashboards use them (docs/deploy.md lists them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from firmware_store.server import DownloadStats
from plugins.ota.core.model import TaskState
from plugins.ota.core.topics import SERVER_TO_DEVICE, TopicKind

__all__ = ["CONTENT_TYPE", "MESSAGE_KINDS", "OtaMetrics", "Sources", "message_kind"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# No `*_created` series beside every counter and histogram: they double the output and no dashboard of
# ours reads them. (A process-wide switch of prometheus-client; this process exposes only these metrics.)
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

# Device→server messages by what they are; everything that is not an OTA request is "other".
MESSAGE_KINDS = ("inform", "progress", "firmware_get", "other")
_IN_KIND: Mapping[TopicKind, str] = {
    TopicKind.INFORM: "inform",
    TopicKind.PROGRESS: "progress",
    TopicKind.FIRMWARE_GET: "firmware_get",
    TopicKind.LEGACY_REQUEST: "firmware_get",  # the v3 SDKs' pull
}
# The event loop's lag, sampled every 100 ms: milliseconds when all is well; MQTT acknowledgements wait as long.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Repository calls take a few hundred microseconds when all is well; seconds mean a stalled disk.
_DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def message_kind(kind: TopicKind | None) -> str:
    """The `kind` label of a message a client published (None: not an OTA topic)."""
    return "other" if kind is None else _IN_KIND.get(kind, "other")


@dataclass
class Sources:
    """Where scrape-time values come from; the plugin fills these in once its parts are running."""

    devices_connected: Callable[[], int] = lambda: 0
    clients_connected: Callable[[], int] = lambda: 0
    broker_delivered: Callable[[], int | None] = lambda: None
    rejected: Callable[[], Mapping[str, int]] = dict
    notices_sent: Callable[[], Mapping[str, int]] = dict
    task_states: Callable[[], Awaitable[Mapping[TaskState, int]]] | None = None
    downloads: DownloadStats = field(default_factory=DownloadStats)
    download_slots: Callable[[], tuple[int, int]] | None = None  # (in use, capacity)
    transfer_window: Callable[[], tuple[int, int, int]] | None = None  # (window, in flight, waiting)
    # The broker's control-plane latencies by kind ("connack", "puback"): cumulative (bound, count), sum.
    control_latency: Callable[[], Mapping[str, tuple[list[tuple[float, int]], float]]] = dict


class OtaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sources = Sources()
        self._task_states: Mapping[TaskState, int] = {}
        self.messages_in = Counter(
            "ota_mqtt_messages_received",
            "MQTT messages clients published, by kind (OTA inform, progress, firmware get, other).",
            ["kind"],
            registry=self.registry,
        )
        self._in = {kind: self.messages_in.labels(kind) for kind in MESSAGE_KINDS}
        self.messages_out = Counter(
            "ota_mqtt_messages_sent",
            "MQTT messages the OTA service published to devices, by topic kind.",
            ["kind"],
            registry=self.registry,
        )
        self._out = {
            kind: self.messages_out.labels(kind) for kind in (*SERVER_TO_DEVICE, TopicKind.LEGACY_REQUEST)
        }
        self.db_seconds = Histogram(
            "ota_db_query_seconds",
            "Duration of the OTA database's queries (read) and transactions (write), waiting included.",
            ["op"],
            buckets=_DB_BUCKETS,
            registry=self.registry,
        )
        self._db = {op: self.db_seconds.labels(op) for op in ("read", "write")}
        self.loop_lag = Histogram(
            "ota_event_loop_lag_seconds",
            "How late the event loop ran a timer asked for every 100 ms: what MQTT acknowledgements, pings and "
            "logins wait on top of their own work.",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.logins_refused = Counter(
            "ota_mqtt_logins_refused",
            "MQTT CONNECTs refused by the auth plugin, by reason (bad_password, throttled: refused without a "
            "password check after repeated failures, bad_signature, unknown_device...).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("bad_password", "throttled"):
            self.logins_refused.labels(reason)  # present from the start, at 0
        self.registry.register(_ScrapeCollector(self))
        ProcessCollector(registry=self.registry)

    # ------------------------------------------------------------------------- counted as it happens

    def message_received(self, kind: TopicKind | None) -> None:
        self._in[message_kind(kind)].inc()

    def message_sent(self, kind: TopicKind) -> None:
        child = self._out.get(kind)
        if child is not None:
            child.inc()

    def login_refused(self, reason: str) -> None:
        """The auth plugin's hook (`plugins.device_auth.gate.LoginMetrics`): one CONNECT refused."""
        self.logins_refused.labels(reason).inc()

    def observe_db(self, op: str, seconds: float) -> None:
        """The repository's hook: one query (`read`) or transaction (`write`) took `seconds`."""
        self._db[op].observe(seconds)

    # ------------------------------------------------------------------------------------- scraping

    async def render(self) -> bytes:
        """The Prometheus text exposition; reads the database once (task counts)."""
        states = self.sources.task_states
        self._task_states = {} if states is None else await states()
        return generate_latest(self.registry)


class _ScrapeCollector:
    """Values read at scrape time from the counters and state their owners keep."""

    def __init__(self, metrics: OtaMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # names vary (broker deliveries appear only when the broker counts them)

    def collect(self) -> Iterable[Metric]:
        src = self._metrics.sources
        yield GaugeMetricFamily(
            "ota_devices_connected", "Devices with a live MQTT session.", value=src.devices_connected()
        )
        yield GaugeMetricFamily(
            "ota_mqtt_clients_connected",
            "MQTT connections that completed CONNECT (devices and applications).",
            value=src.clients_connected(),
        )
        delivered = src.broker_delivered()
        if delivered is not None:
            yield CounterMetricFamily(
                "ota_mqtt_broker_deliveries",
                "Application messages the broker delivered to subscribers' sessions.",
                value=delivered,
            )
        notices = CounterMetricFamily(
            "ota_notices_sent",
            "Upgrade notices handed to an online device's session: pushed, or answering a pull.",
            labels=["delivery"],
        )
        sent = src.notices_sent()
        for delivery in ("push", "pull"):
            notices.add_metric([delivery], sent.get(delivery, 0))
        yield notices
        rejected = CounterMetricFamily(
            "ota_rejected_inputs",
            "Device messages rejected (malformed, oversize, unknown device, rate limited...), by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(src.rejected().items()):
            rejected.add_metric([reason], count)
        yield rejected
        tasks = GaugeMetricFamily("ota_tasks", "Upgrade tasks by state (all jobs).", labels=["state"])
        counts = self._metrics._task_states
        for state in TaskState:
            tasks.add_metric([state.value], counts.get(state, 0))
        yield tasks
        dl = src.downloads
        yield CounterMetricFamily(
            "ota_download_bytes",
            "Firmware bytes sent by completed download responses (200 and 206).",
            value=dl.bytes_sent,
        )
        yield GaugeMetricFamily("ota_downloads_active", "Firmware downloads under way.", value=dl.active)
        outcomes = CounterMetricFamily(
            "ota_downloads",
            "Firmware download requests by outcome (ok, interrupted, refused, throttled, busy, corrupt).",
            labels=["outcome"],
        )
        for outcome in dl.OUTCOMES:
            outcomes.add_metric([outcome], dl.outcomes.get(outcome, 0))
        yield outcomes
        if src.download_slots is not None:
            used, capacity = src.download_slots()
            yield GaugeMetricFamily(
                "ota_download_slots_used", "Downloads holding a slot: HTTPS and MQTT streams.", value=used
            )
            yield GaugeMetricFamily(
                "ota_download_slots", "Downloads allowed at once (max_downloads; 503 beyond).", value=capacity
            )
        latencies = src.control_latency()
        if latencies:
            control = HistogramMetricFamily(
                "ota_mqtt_control_latency_seconds",
                "How long the broker took to answer: CONNECT read to CONNACK sent (authentication included), "
                "QoS 1 PUBLISH read to PUBACK sent (routing and the OTA service's handling included).",
                labels=["answer"],
            )
            for answer, (buckets, total) in sorted(latencies.items()):
                control.add_metric(
                    [answer], [("+Inf" if b == float("inf") else repr(b), c) for b, c in buckets], total
                )
            yield control
        if src.transfer_window is not None:
            window, in_flight, waiting = src.transfer_window()
            yield GaugeMetricFamily(
                "ota_admission_window", "Transfers the adaptive window admits at once now.", value=window
            )
            yield GaugeMetricFamily(
                "ota_transfers_in_flight",
                "Tasks holding a transfer: notified, or in progress below 100 %, of online devices.",
                value=in_flight,
            )
            yield GaugeMetricFamily(
                "ota_tasks_waiting_for_capacity",
                "Online devices' queued tasks whose notice waits for room in the transfer window.",
                value=waiting,
            )
