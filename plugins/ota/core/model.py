"""Domain types of the OTA service: plain frozen values, no I/O.

Status enums are `StrEnum`s persisted as their string values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from plugins.ota.core.topics import DeviceRef

DEFAULT_MODULE = "default"


class TaskState(StrEnum):
    """One device's upgrade within one job."""

    CONFIRM = "confirm"
    QUEUED = "queued"
    NOTIFIED = "notified"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self not in UNFINISHED


UNFINISHED: frozenset[TaskState] = frozenset(
    {TaskState.CONFIRM, TaskState.QUEUED, TaskState.NOTIFIED, TaskState.IN_PROGRESS}
)
# States in which the device holds a notice it may act on (a pull gets the notice again).
PENDING: frozenset[TaskState] = frozenset({TaskState.QUEUED, TaskState.NOTIFIED, TaskState.IN_PROGRESS})
# A download link works while its task is in one of these states.
DOWNLOADABLE: frozenset[TaskState] = frozenset({TaskState.NOTIFIED, TaskState.IN_PROGRESS})


class JobState(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class JobType(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    VERIFY = "verify"


class SignMethod(StrEnum):
    """Exactly the spellings the device SDKs compare against."""

    MD5 = "Md5"
    SHA256 = "SHA256"


class DownloadProtocol(StrEnum):
    """How a job's devices fetch the firmware (Aliyun's per-job `DownloadProtocol`): a signed HTTPS link, or
    block by block over MQTT (`/sys/{pk}/{dn}/thing/file/download`) for devices with no HTTP stack."""

    HTTPS = "https"
    MQTT = "mqtt"


# A notified task that gets no progress report (nor its target version) this long after its latest notice
# times out: a day, as long as the notice's download link lives.
NOTIFY_TIMEOUT_MINUTES = 24 * 60.0
# Aliyun packages hold up to 20 files (LinkSDK v4 parses at most 20).
MAX_PACKAGE_FILES = 20
# A file name in a package: what a device writes to its flash, and text LinkSDK's JSON reader must survive.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_NAME_RULE = "must be 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


class FirmwareStatus(StrEnum):
    UNVERIFIED = "unverified"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    VERIFY_FAILED = "verify_failed"
    NO_VERIFY_NEEDED = "no_verify_needed"


class SkipReason(StrEnum):
    ALREADY_ON_TARGET = "already_on_target"
    BUSY = "busy"
    SRC_VERSION_MISMATCH = "src_version_mismatch"


@dataclass(frozen=True, slots=True)
class FirmwareFile:
    """One file of a firmware package, stored by its sha256."""

    name: str
    size: int
    md5: str
    sha256: str

    def sign(self, method: SignMethod) -> str:
        return self.md5 if method is SignMethod.MD5 else self.sha256


@dataclass(frozen=True, slots=True)
class Firmware:
    """A package: one file (its size and digests are the firmware's own) or several (`files`, in order;
    the first is the one the firmware's size and digests describe)."""

    id: int
    product_key: str
    module: str
    version: str
    src_version: str | None
    size: int
    md5: str
    sha256: str
    sign_method: SignMethod
    description: str
    status: FirmwareStatus
    created_at: float
    files: tuple[FirmwareFile, ...] = ()  # empty: a single-file package (the fields above describe it)

    @property
    def sign(self) -> str:
        """The digest named by `sign_method`, lowercase hex."""
        return self.md5 if self.sign_method is SignMethod.MD5 else self.sha256

    @property
    def package(self) -> tuple[FirmwareFile, ...]:
        """Every file of the package, in order (one for a single-file package)."""
        return self.files or (FirmwareFile("", self.size, self.md5, self.sha256),)

    @property
    def multi_file(self) -> bool:
        return len(self.files) > 1

    @property
    def is_diff(self) -> bool:
        return self.src_version is not None


@dataclass(frozen=True, slots=True)
class Task:
    """A snapshot of one task; `rev` guards compare-and-set writes."""

    id: int
    job_id: int
    firmware_id: int
    device: DeviceRef
    module: str
    target_version: str
    state: TaskState
    progress: int
    desc: str
    attempts: int  # notified cycles: 1 for the first notice, +1 per retry or re-run
    timeout_s: float | None
    notified_at: float | None  # first notice
    noticed_at: float | None  # latest notice (push or pull reply)
    started_at: float | None  # first progress report
    updated_at: float
    rev: int = 0
    group_no: int = 0  # rollout phase
    not_before: float | None = None  # a queued task waits until then (retry interval, schedule)
    retry_count: int = 0
    retry_interval_s: float = 0.0
    notify_timeout_s: float | None = None  # notified without progress this long after the latest notice


@dataclass(frozen=True, slots=True)
class Rollout:
    """A phased rollout: the job's devices split into ordered phases (percent of the devices each); the
    next phase starts when the current one has `success_threshold` percent succeeded; the job pauses
    when failures reach `error_threshold_count` or `error_threshold_percent` of the tasks finished."""

    phases: tuple[float, ...]
    success_threshold: float = 100.0
    error_threshold_count: int | None = None
    error_threshold_percent: float | None = None


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What an operator asks of a new job (validated at the API)."""

    firmware_id: int
    type: JobType = JobType.STATIC
    devices: tuple[DeviceRef, ...] | None = None  # None: every device of the firmware's product
    src_versions: tuple[str, ...] = ()
    gray_percent: float | None = None
    overwrite: bool = False
    force: bool = False
    need_confirm: bool = False
    schedule_at: float | None = None
    end_at: float | None = None
    rate_per_minute: int | None = None
    timeout_minutes: float | None = None
    retry_count: int = 0
    retry_interval_minutes: float = 0.0
    rollout: Rollout | None = None
    tags: tuple[tuple[str, str], ...] = ()
    download_protocol: DownloadProtocol = DownloadProtocol.HTTPS
    notify_timeout_minutes: float | None = NOTIFY_TIMEOUT_MINUTES  # None: a notified task never times out
    seed: str | None = None  # of the gray sample (a preview's, to start what was previewed); None: a new one
    group: str | None = None  # the devices of the product in this group (instead of a list, or all of them)


@dataclass(frozen=True, slots=True)
class TaskPolicy:
    """What every task of a job carries from the job's options."""

    timeout_s: float | None = None
    retry_count: int = 0
    retry_interval_s: float = 0.0
    notify_timeout_s: float | None = None


# Options kept in the stored JSON only when set (not None, False or 0), in this order.
_OPTIONAL = (
    "gray_percent",
    "overwrite",
    "force",
    "need_confirm",
    "rate_per_minute",
    "timeout_minutes",
    "retry_count",
    "retry_interval_minutes",
)


@dataclass(frozen=True, slots=True)
class JobOptions:
    """How a job runs, fixed when it is created (but `acknowledged_failures`, which resuming and re-running
    move). Stored as the JSON object `to_json` makes; `from_json` reads every earlier shape of it."""

    seed: str = ""  # the gray sample's and the phases' seed
    src_versions: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] | None = None  # a dynamic job's device list ("pk/dn"); None: any device
    gray_percent: float | None = None
    overwrite: bool = False
    force: bool = False
    need_confirm: bool = False
    rate_per_minute: float | None = None
    timeout_minutes: float | None = None
    retry_count: int = 0
    retry_interval_minutes: float = 0.0
    download_protocol: DownloadProtocol = DownloadProtocol.HTTPS
    notify_timeout_minutes: float = 0.0  # 0: a notified task never times out
    rollout: Rollout | None = None
    acknowledged_failures: int = 0  # failures the operator resumed past (the rollout's error thresholds)
    group: str | None = None  # the device group the job targeted

    @classmethod
    def of(cls, spec: JobSpec, seed: str) -> JobOptions:
        return cls(
            seed=seed,
            src_versions=spec.src_versions,
            tags=spec.tags,
            devices=(
                tuple(str(d) for d in spec.devices)
                if spec.type is JobType.DYNAMIC and spec.devices is not None
                else None
            ),
            gray_percent=spec.gray_percent,
            overwrite=spec.overwrite,
            force=spec.force,
            need_confirm=spec.need_confirm,
            rate_per_minute=spec.rate_per_minute,
            timeout_minutes=spec.timeout_minutes,
            retry_count=spec.retry_count,
            retry_interval_minutes=spec.retry_interval_minutes,
            download_protocol=spec.download_protocol,
            notify_timeout_minutes=spec.notify_timeout_minutes or 0.0,
            rollout=spec.rollout,
            group=spec.group,
        )

    @property
    def policy(self) -> TaskPolicy:
        return TaskPolicy(
            timeout_s=None if self.timeout_minutes is None else float(self.timeout_minutes) * 60,
            retry_count=self.retry_count,
            retry_interval_s=float(self.retry_interval_minutes) * 60,
            notify_timeout_s=self.notify_timeout_minutes * 60 if self.notify_timeout_minutes > 0 else None,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "src_versions": list(self.src_versions),
            "seed": self.seed,
            "tags": dict(self.tags),
        }
        if self.devices is not None:
            doc["devices"] = list(self.devices)
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value not in (None, False, 0, 0.0):
                doc[key] = value
        doc["download_protocol"] = self.download_protocol.value
        doc["notify_timeout_minutes"] = self.notify_timeout_minutes
        if self.rollout is not None:
            doc["rollout"] = {
                "phases": list(self.rollout.phases),
                "success_threshold": self.rollout.success_threshold,
                "error_threshold_count": self.rollout.error_threshold_count,
                "error_threshold_percent": self.rollout.error_threshold_percent,
            }
        if self.acknowledged_failures:
            doc["acknowledged_failures"] = self.acknowledged_failures
        if self.group is not None:
            doc["group"] = self.group
        return doc

    def public(self) -> dict[str, Any]:
        """The options as the API shows them (without the seed and the acknowledged failures)."""
        doc = self.to_json()
        doc.pop("seed")
        doc.pop("acknowledged_failures", None)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JobOptions:
        rollout = doc.get("rollout")
        devices = doc.get("devices")
        return cls(
            seed=str(doc.get("seed", "")),
            src_versions=tuple(doc.get("src_versions", ())),
            tags=tuple(dict(doc.get("tags", {})).items()),
            devices=None if devices is None else tuple(devices),
            gray_percent=doc.get("gray_percent"),
            overwrite=bool(doc.get("overwrite")),
            force=bool(doc.get("force")),
            need_confirm=bool(doc.get("need_confirm")),
            rate_per_minute=doc.get("rate_per_minute"),
            timeout_minutes=doc.get("timeout_minutes"),
            retry_count=int(doc.get("retry_count", 0)),
            retry_interval_minutes=float(doc.get("retry_interval_minutes", 0)),
            download_protocol=DownloadProtocol(doc.get("download_protocol", DownloadProtocol.HTTPS)),
            # Jobs created before notified tasks timed out have no such option: they keep never timing out.
            notify_timeout_minutes=float(doc.get("notify_timeout_minutes", 0)),
            rollout=(
                Rollout(
                    tuple(rollout["phases"]),
                    rollout.get("success_threshold", 100.0),
                    rollout.get("error_threshold_count"),
                    rollout.get("error_threshold_percent"),
                )
                if rollout
                else None
            ),
            acknowledged_failures=int(doc.get("acknowledged_failures", 0)),
            group=doc.get("group"),
        )


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device: DeviceRef
    device_secret: str
    enabled: bool
    online: bool
    created_at: float
    last_seen: float | None
    modules: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    firmware_id: int
    type: JobType
    stored_state: JobState
    options: JobOptions
    created_at: float
    updated_at: float
    counts: dict[TaskState, int]
    current_group: int = 0
    schedule_at: float | None = None
    end_at: float | None = None
    pause_reason: str = ""
