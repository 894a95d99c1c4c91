"""Job options: a typed value stored as JSON, read back from every shape stored so far."""

from __future__ import annotations

from plugins.ota.core.model import DownloadProtocol, JobOptions, JobSpec, JobType, Rollout, TaskPolicy
from plugins.ota.core.topics import DeviceRef


def test_options_round_trip_through_their_json() -> None:
    """Every option a spec sets survives `to_json` then `from_json` unchanged."""
    spec = JobSpec(
        7,
        JobType.DYNAMIC,
        devices=(DeviceRef("pk", "a"), DeviceRef("pk", "b")),
        src_versions=("1.0",),
        gray_percent=50.0,
        overwrite=True,
        force=True,
        need_confirm=True,
        rate_per_minute=600,
        timeout_minutes=5.0,
        retry_count=2,
        retry_interval_minutes=1.5,
        rollout=Rollout((10.0, 90.0), 95.0, 3, None),
        tags=(("ring", "canary"),),
        download_protocol=DownloadProtocol.MQTT,
        notify_timeout_minutes=30.0,
    )
    options = JobOptions.of(spec, "seed-1")
    assert JobOptions.from_json(options.to_json()) == options
    assert options.devices == ("pk/a", "pk/b")
    assert options.policy == TaskPolicy(300.0, 2, 90.0, 1800.0)
    assert "seed" not in options.public() and options.public()["tags"] == {"ring": "canary"}


def test_options_of_an_older_job_read_with_their_defaults() -> None:
    """A job stored before the newer options existed reads as https, never timing out when notified."""
    options = JobOptions.from_json({"src_versions": [], "seed": "s", "tags": {}})
    assert options.download_protocol is DownloadProtocol.HTTPS and options.rollout is None
    assert options.policy == TaskPolicy(None, 0, 0.0, None)
    assert options.to_json() == {
        "src_versions": [],
        "seed": "s",
        "tags": {},
        "download_protocol": "https",
        "notify_timeout_minutes": 0.0,
    }
