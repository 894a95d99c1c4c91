"""The `Repository` protocol: every read and write of the OTA service's state that the app layer makes.

`plugins.ota.store.sqlite.SqliteRepository` implements it on SQLite. Writes of a task are compare-and-set
(`save_task`); every task change leaves a history row. Lookups that find nothing raise `NotFound` (`get_*`)
or return None (`find_*`); a write that breaks a rule raises `Conflict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from plugins.ota.core.accounts import Account, ApiToken, AuditEntry, Principal, Role
from plugins.ota.core.machine import PlannedTask
from plugins.ota.core.model import (
    DeviceRecord,
    Firmware,
    FirmwareFile,
    FirmwareStatus,
    JobOptions,
    JobRecord,
    JobState,
    JobType,
    SignMethod,
    Task,
    TaskPolicy,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef


class Repository(Protocol):
    """The OTA service's state (devices, firmware, jobs, tasks and their history)."""

    # Told how long each query ("read") and transaction ("write") took, waiting included (metrics).
    observe: Callable[[str, float], None] | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_device(self, ref: DeviceRef, secret: str, now: float) -> DeviceRecord: ...

    async def ensure_device(self, ref: DeviceRef, now: float) -> bool:
        """Register the device if it is unknown (open mode); True when it was created."""
        ...

    async def find_device(self, ref: DeviceRef) -> DeviceRecord | None: ...

    async def existing_devices(self, refs: Sequence[DeviceRef]) -> set[DeviceRef]:
        """Those of `refs` that are registered, in one query."""
        ...

    async def get_device(self, ref: DeviceRef) -> DeviceRecord: ...

    async def list_devices(
        self,
        *,
        product_key: str | None = None,
        module: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        name: str | None = None,
        group: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[DeviceRecord]: ...

    async def count_devices(
        self,
        *,
        product_key: str | None = None,
        module: str | None = None,
        version: str | None = None,
        online: bool | None = None,
        name: str | None = None,
        group: str | None = None,
    ) -> int:
        """How many devices `list_devices` with the same filters would list in all."""
        ...

    async def device_login(self, ref: DeviceRef) -> tuple[str, bool] | None: ...

    async def set_enabled(self, ref: DeviceRef, enabled: bool) -> None: ...

    async def set_secret(self, ref: DeviceRef, secret: str) -> None: ...

    async def delete_device(self, ref: DeviceRef) -> None:
        """Delete the device and its module versions; Conflict while it has an unfinished task."""
        ...

    async def add_devices(self, rows: Sequence[tuple[DeviceRef, str]], now: float) -> list[DeviceRef]:
        """Insert the devices that do not exist yet, all in one transaction; returns those created."""
        ...

    async def set_online(self, ref: DeviceRef, online: bool, now: float) -> None: ...

    async def set_presence(self, changes: Sequence[tuple[DeviceRef, bool]], now: float) -> None:
        """Record each device online or offline (the last change of a device listed twice wins) in one
        transaction, as `set_online` would one by one; devices not registered are left out."""
        ...

    async def mark_all_offline(self) -> None: ...

    # Processes sharing the state (replicas of an attached service on one PostgreSQL database).

    async def lead(self) -> bool:
        """Whether this process is the one that runs the periodic work now (timeouts, retries, job steps,
        phases, pacing): one at a time among the processes sharing the state, another taking over when it
        stops or loses the database. Asked once per step; with SQLite (one process) always True."""
        ...

    async def watch_presence(self, changed: Callable[[DeviceRef, bool], None]) -> None:
        """Tell `changed` about every device recorded online now, then about each device another process
        records online or offline (`set_online` changing it), and about every online one again after the
        watch was interrupted. With SQLite (one process) only the first."""
        ...

    async def record_version(self, ref: DeviceRef, module: str, version: str, now: float) -> None: ...

    async def add_firmware(
        self,
        *,
        status: FirmwareStatus = FirmwareStatus.NO_VERIFY_NEEDED,
        product_key: str,
        module: str,
        version: str,
        src_version: str | None,
        size: int,
        md5: str,
        sha256: str,
        sign_method: SignMethod,
        description: str,
        now: float,
        files: Sequence[FirmwareFile] = (),
    ) -> Firmware:
        """A new firmware; `files` lists every file of a multi-file package (the first one is the file
        `size`, `md5` and `sha256` describe), and is empty for a single-file one."""
        ...

    async def find_firmware(self, firmware_id: int) -> Firmware | None: ...

    async def get_firmware(self, firmware_id: int) -> Firmware: ...

    async def list_firmware(
        self, product_key: str | None = None, *, limit: int = -1, offset: int = 0
    ) -> list[Firmware]:
        """Firmware oldest first (`limit` -1: all)."""
        ...

    async def count_firmware(self, product_key: str | None = None) -> int: ...

    async def delete_firmware(self, firmware_id: int) -> Firmware:
        """Delete the firmware's record (and its finished jobs); Conflict while an unfinished task uses it."""
        ...

    async def blob_in_use(self, sha256: str) -> bool:
        """Whether any firmware's file is this blob."""
        ...

    async def create_job(
        self,
        firmware: Firmware,
        job_type: JobType,
        options: JobOptions,
        planned: Sequence[PlannedTask],
        policy: TaskPolicy,
        now: float,
        *,
        schedule_at: float | None = None,
        end_at: float | None = None,
    ) -> int: ...

    async def add_tasks(
        self, job_id: int, firmware: Firmware, planned: Sequence[PlannedTask], policy: TaskPolicy, now: float
    ) -> None: ...

    async def running_jobs(self) -> list[JobRecord]:
        """Jobs stored as running (scheduled ones included: their start time is checked by the caller)."""
        ...

    async def jobs_in_states(self, *states: JobState) -> list[JobRecord]: ...

    async def update_job(
        self,
        job_id: int,
        now: float,
        *,
        state: JobState | None = None,
        current_group: int | None = None,
        pause_reason: str | None = None,
        options: JobOptions | None = None,
        only_from: Sequence[JobState] = (),
    ) -> bool:
        """Change the job; with `only_from`, only while it is in one of those states. Whether it changed."""
        ...

    async def group_counts(self, job_id: int) -> list[dict[TaskState, int]]: ...

    async def dispatchable_tasks(self, job_id: int, max_group: int, now: float, limit: int) -> list[Task]: ...

    async def job_task_of_device(self, job_id: int, ref: DeviceRef) -> Task | None: ...

    async def set_firmware_status(self, firmware_id: int, status: FirmwareStatus) -> None: ...

    async def find_job(self, job_id: int) -> JobRecord | None: ...

    async def get_job(self, job_id: int) -> JobRecord: ...

    async def list_jobs(self, limit: int = 200, offset: int = 0) -> list[JobRecord]:
        """Jobs newest first."""
        ...

    async def count_jobs(self) -> int: ...

    async def get_task(self, task_id: int) -> Task: ...

    async def unfinished_task(self, ref: DeviceRef, module: str) -> Task | None: ...

    async def unfinished_tasks_of_device(self, ref: DeviceRef) -> list[Task]: ...

    async def unfinished_tasks_of_devices(self, refs: Sequence[DeviceRef]) -> dict[DeviceRef, list[Task]]:
        """`unfinished_tasks_of_device` for many devices in one query: each device asked about, with its
        unfinished tasks oldest first (an empty list for none)."""
        ...

    async def busy_devices(self, refs: Sequence[DeviceRef], module: str) -> set[DeviceRef]: ...

    async def tasks_of_job(
        self,
        job_id: int,
        states: Iterable[TaskState] | None = None,
        *,
        limit: int = -1,
        offset: int = 0,
    ) -> list[Task]:
        """The job's tasks in the order they were planned (`limit` -1: all)."""
        ...

    async def count_tasks_of_job(self, job_id: int) -> int: ...

    async def tasks_of_device(self, ref: DeviceRef, limit: int = 100) -> list[Task]: ...

    async def overdue_tasks(self, now: float) -> list[Task]:
        """Tasks in progress whose timeout, counted from the first progress report, has passed, and notified
        tasks whose notify timeout, counted from the latest notice, has."""
        ...

    async def devices_in_transfer(self, noticed_since: float) -> list[DeviceRef]:
        """The devices of the tasks holding a transfer: notified at or after `noticed_since`, or in progress
        below 100 % (a device in several such tasks is listed once per task)."""
        ...

    async def save_task(self, task: Task, note: str) -> Task | None:
        """Compare-and-set: write `task` if the stored row still has `task.rev`; the saved task, or None
        when someone else changed the row first. The history row is written by a trigger in the same
        statement."""
        ...

    async def task_history(self, task_id: int) -> list[dict[str, Any]]: ...

    async def task_state_counts(self) -> dict[TaskState, int]:
        """How many tasks are in each state, over all jobs (for metrics; one scan of a covering index)."""
        ...

    async def may_download(self, firmware_id: int, ref: DeviceRef) -> bool: ...

    # ---------------------------------------------------------------- accounts, tokens, audit (AccountStore)

    async def add_account(self, name: str, role: Role, password_hash: str | None, now: float) -> Account: ...

    async def find_account(self, name: str) -> Account | None: ...

    async def get_account(self, name: str) -> Account: ...

    async def password_hash(self, name: str) -> str | None: ...

    async def list_accounts(self) -> list[Account]: ...

    async def update_account(
        self,
        name: str,
        *,
        role: Role | None = None,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> Account: ...

    async def delete_account(self, name: str) -> None: ...

    async def add_token(self, account: str, token_sha256: str, label: str, now: float) -> ApiToken: ...

    async def list_tokens(self, account: str) -> list[ApiToken]: ...

    async def revoke_token(self, account: str, token_id: int, now: float) -> ApiToken: ...

    async def principal_of_token(self, token_sha256: str) -> Principal | None: ...

    async def principal_of_account(self, name: str, epoch: int | None = None) -> Principal | None: ...

    async def session_epoch(self, name: str) -> int | None: ...

    async def end_sessions(self, name: str) -> None: ...

    async def record_audit(self, entry: AuditEntry) -> None: ...

    async def audit_page(self, limit: int, offset: int) -> tuple[list[AuditEntry], int]: ...

    async def prune_audit(self, before: float) -> int: ...

    async def set_device_groups(self, ref: DeviceRef, groups: Sequence[str]) -> list[str]: ...

    async def groups_of(self, refs: Sequence[DeviceRef]) -> dict[DeviceRef, list[str]]: ...

    async def version_counts(self) -> list[tuple[str, str, str, int]]:
        """How many devices run each version of each product's module now: (product, module, version, n)."""
        ...

    async def upgrades_since(self, since: float) -> list[tuple[float, str, str, str]]:
        """Every upgrade that succeeded since `since`: when, product, module, version, in order."""
        ...

    async def job_outcomes(self, job_id: int) -> list[tuple[float, str]]:
        """When each of the job's tasks ended an attempt, and how (succeeded, failed, timed_out), in order."""
        ...


@runtime_checkable
class ReplicaRegistry(Protocol):
    """The replicas of one service sharing a database (`PostgresRepository`), each with its persistent MQTT
    session on the external broker: who is alive, and whose session is left behind by one that died."""

    async def register_replica(self, client_id_prefix: str) -> tuple[int, str]:
        """Register this replica; its id and its session's client id."""
        ...

    async def replica_alive(self) -> bool:
        """The heartbeat; False once this replica was taken for gone (it registers again)."""
        ...

    async def orphaned_replicas(self, silent_s: float) -> list[tuple[int, str]]:
        """Replicas gone (lock free, silent for `silent_s`), each locked by this one until it forgets or
        releases it."""
        ...

    async def forget_replica(self, replica: int) -> None: ...

    async def release_replica(self, replica: int) -> None: ...
