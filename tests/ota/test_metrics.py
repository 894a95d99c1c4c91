"""The metrics registry on its own: per-instance registries, scrape-time sources, label sets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from plugins.ota.core.model import TaskState
from plugins.ota.core.topics import TopicKind
from plugins.ota.metrics import OtaMetrics, message_kind


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


async def test_scrape_reads_sources_at_scrape_time() -> None:
    """Task counts, rejects, notices, downloads and connections are read when scraped; zeros are shown."""
    metrics = OtaMetrics()
    rejected = {"bad_inform": 2}

    async def task_states() -> dict[TaskState, int]:
        return {TaskState.QUEUED: 3, TaskState.SUCCEEDED: 1}

    metrics.sources.task_states = task_states
    metrics.sources.rejected = lambda: rejected
    metrics.sources.notices_sent = lambda: {"push": 4}
    metrics.sources.devices_connected = lambda: 5
    metrics.sources.downloads.bytes_sent = 1000
    metrics.sources.downloads.outcomes["ok"] += 1
    first = samples(await metrics.render())
    assert first[("ota_tasks", (("state", "queued"),))] == 3
    assert first[("ota_tasks", (("state", "failed"),))] == 0
    assert first[("ota_rejected_inputs_total", (("reason", "bad_inform"),))] == 2
    assert first[("ota_notices_sent_total", (("delivery", "push"),))] == 4
    assert first[("ota_notices_sent_total", (("delivery", "pull"),))] == 0
    assert first[("ota_devices_connected", ())] == 5
    assert first[("ota_download_bytes_total", ())] == 1000
    assert first[("ota_downloads_total", (("outcome", "ok"),))] == 1
    assert first[("ota_downloads_total", (("outcome", "throttled"),))] == 0
    assert not any(name.endswith("_created") for name, _ in first)

    rejected["progress_rate_limited"] = 7
    second = samples(await metrics.render())
    assert second[("ota_rejected_inputs_total", (("reason", "progress_rate_limited"),))] == 7


async def test_broker_deliveries_appear_only_when_the_broker_counts_them() -> None:
    """`ota_mqtt_broker_deliveries_total` is the broker's `delivered_count`, absent when it has none."""
    metrics = OtaMetrics()
    assert not any(
        name.startswith("ota_mqtt_broker_deliveries") for name, _ in samples(await metrics.render())
    )
    metrics.sources.broker_delivered = lambda: 42
    assert samples(await metrics.render())[("ota_mqtt_broker_deliveries_total", ())] == 42


async def test_registries_are_per_instance() -> None:
    """Two instances count independently (no global registry: several brokers in one process)."""
    one, two = OtaMetrics(), OtaMetrics()
    one.message_received(TopicKind.INFORM)
    one.message_sent(TopicKind.UPGRADE)
    one.observe_db("read", 0.002)
    a, b = samples(await one.render()), samples(await two.render())
    assert a[("ota_mqtt_messages_received_total", (("kind", "inform"),))] == 1
    assert b[("ota_mqtt_messages_received_total", (("kind", "inform"),))] == 0
    assert a[("ota_mqtt_messages_sent_total", (("kind", "upgrade"),))] == 1
    assert a[("ota_db_query_seconds_count", (("op", "read"),))] == 1
    assert a[("ota_db_query_seconds_bucket", (("le", "0.0025"), ("op", "read")))] == 1
    assert a[("ota_db_query_seconds_bucket", (("le", "0.001"), ("op", "read")))] == 0


def test_message_kinds() -> None:
    """Inform, progress and both pulls are OTA kinds; server-to-device topics and non-OTA topics are other."""
    assert message_kind(TopicKind.INFORM) == "inform"
    assert message_kind(TopicKind.PROGRESS) == "progress"
    assert message_kind(TopicKind.FIRMWARE_GET) == "firmware_get"
    assert message_kind(TopicKind.LEGACY_REQUEST) == "firmware_get"
    assert message_kind(TopicKind.UPGRADE) == "other"
    assert message_kind(None) == "other"
