"""Domain types of the OTA service: plain frozen values, no I/O.

Status enums are `StrEnum`s persisted as their string values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from plugins.ota.topics import DeviceRef

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
# A download link works while its task is in one of these states (SPEC §5).
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
