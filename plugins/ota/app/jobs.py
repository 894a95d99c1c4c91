"""What operators do with jobs: create one (planned by the core), cancel, pause, resume, confirm, re-run;
and what they read of jobs and tasks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from plugins.ota.app.housekeeping import Background
from plugins.ota.app.rollout import Dispatcher
from plugins.ota.app.tasks import TaskDriver
from plugins.ota.core import blocks, machine
from plugins.ota.core.errors import Conflict, InvalidInput, NotFound
from plugins.ota.core.machine import CancelRequested, Confirmed, RerunRequested
from plugins.ota.core.model import (
    UNFINISHED,
    DownloadProtocol,
    Firmware,
    FirmwareStatus,
    JobOptions,
    JobRecord,
    JobSpec,
    JobState,
    JobType,
    Task,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")


@dataclass(frozen=True, slots=True)
class JobPreview:
    """The tasks a job would have (`JobAdmin.preview`), and the seed of its gray sample."""

    firmware: Firmware
    planned: list[machine.PlannedTask]
    seed: str


class JobAdmin:
    def __init__(
        self,
        repo: Repository,
        driver: TaskDriver,
        dispatcher: Dispatcher,
        background: Background,
        clock: Callable[[], float],
    ) -> None:
        self.repo = repo
        self.driver = driver
        self.dispatcher = dispatcher
        self.background = background
        self.clock = clock

    # ----------------------------------------------------------------------------------------- reads

    async def get(self, job_id: int) -> JobRecord:
        return await self.repo.get_job(job_id)

    async def find(self, job_id: int) -> JobRecord | None:
        return await self.repo.find_job(job_id)

    async def page(self, limit: int, offset: int) -> tuple[list[JobRecord], int]:
        """Jobs newest first, and how many there are in all."""
        return await self.repo.list_jobs(limit=limit, offset=offset), await self.repo.count_jobs()

    async def upgrades_since(self, since: float) -> list[tuple[float, str, str, str]]:
        """Every upgrade that succeeded since `since` (when, product, module, version), over all jobs."""
        return await self.repo.upgrades_since(since)

    async def outcomes(self, job_id: int) -> list[tuple[float, str]]:
        """When each of the job's tasks ended an attempt, and how, in order (its timeline)."""
        await self.get(job_id)
        return await self.repo.job_outcomes(job_id)

    async def tasks(self, job_id: int, *, limit: int = -1, offset: int = 0) -> list[Task]:
        """The job's tasks in the order they were planned (NotFound for no such job)."""
        await self.repo.get_job(job_id)
        return await self.repo.tasks_of_job(job_id, limit=limit, offset=offset)

    async def tasks_in_states(self, job_id: int, states: Iterable[TaskState] | None) -> list[Task]:
        """The job's tasks in `states` (None: all), none when there is no such job."""
        return await self.repo.tasks_of_job(job_id, states)

    async def unfinished(self) -> list[JobRecord]:
        """Jobs running or paused."""
        return await self.repo.jobs_in_states(JobState.RUNNING, JobState.PAUSED)

    async def count_tasks(self, job_id: int) -> int:
        return await self.repo.count_tasks_of_job(job_id)

    async def task_history(self, job_id: int, device: DeviceRef) -> tuple[Task, list[dict[str, Any]]]:
        task = await self.repo.job_task_of_device(job_id, device)
        if task is None:
            raise NotFound(f"job {job_id} has no task for {device}")
        return task, await self.repo.task_history(task.id)

    # -------------------------------------------------------------------------------------- changes

    async def preview(self, spec: JobSpec) -> JobPreview:
        """What `create` would do with `spec`, creating nothing: the tasks it would plan (which devices, in
        which state and phase). `create` with the preview's seed plans exactly these (a gray release's
        sample included), as long as the devices have not changed meanwhile."""
        firmware, planned, seed = await self._plan(spec)
        return JobPreview(firmware, planned, seed)

    async def _plan(self, spec: JobSpec) -> tuple[Firmware, list[machine.PlannedTask], str]:
        firmware = await self.repo.find_firmware(spec.firmware_id)
        if firmware is None:
            raise InvalidInput("firmware_id", f"firmware {spec.firmware_id} does not exist")
        await self._check_firmware_for(firmware, spec)
        candidates = await self._candidates(firmware, spec.devices, spec.group)
        seed = spec.seed or f"{firmware.id}:{self.clock()}"
        planned = machine.plan_tasks(
            firmware,
            candidates,
            src_versions=spec.src_versions,
            need_confirm=spec.need_confirm,
            overwrite=spec.overwrite,
            gray_percent=spec.gray_percent,
            seed=seed,
            phases=spec.rollout.phases if spec.rollout else (),
        )
        if not planned and spec.type is not JobType.DYNAMIC:
            raise InvalidInput("devices", "no device matches the job")
        return firmware, planned, seed

    async def create(self, spec: JobSpec) -> JobRecord:
        firmware, planned, seed = await self._plan(spec)
        now = self.clock()
        options = JobOptions.of(spec, seed)
        job_id = await self.repo.create_job(
            firmware,
            spec.type,
            options,
            planned,
            options.policy,
            now,
            schedule_at=spec.schedule_at,
            end_at=spec.end_at,
        )
        if spec.type is JobType.VERIFY:
            await self.repo.set_firmware_status(firmware.id, FirmwareStatus.VERIFYING)
        for p in planned:
            if p.replaces_busy:
                await self._cancel_older(p.device, firmware.module, job_id)
        log.info(
            "job %d (%s) created for firmware %d: %d task(s)", job_id, spec.type, firmware.id, len(planned)
        )
        self.background.spawn(self.dispatcher.advance_by_id(job_id), f"starting job {job_id}")
        return await self.repo.get_job(job_id)

    async def cancel(self, job_id: int, states: Sequence[TaskState] | None = None) -> JobRecord:
        """Cancel the job's unfinished tasks in `states` (all unfinished by default); cancelling them all
        cancels the job (a dynamic job stops taking devices)."""
        job = await self.repo.get_job(job_id)
        wanted = set(states) if states else set(UNFINISHED)
        if not wanted <= UNFINISHED:
            raise InvalidInput(
                "states", "only unfinished states (confirm, queued, notified, in_progress) can be cancelled"
            )
        if job.stored_state in (JobState.CANCELLED, JobState.COMPLETED) and wanted == set(UNFINISHED):
            if job.stored_state is JobState.CANCELLED:
                return job
            raise Conflict(f"job {job_id} has completed; there is nothing to cancel")
        if wanted == set(UNFINISHED):
            await self.repo.update_job(job_id, self.clock(), state=JobState.CANCELLED)
            if job.type is JobType.VERIFY:
                await self.repo.set_firmware_status(job.firmware_id, FirmwareStatus.UNVERIFIED)
        for task in await self.repo.tasks_of_job(job_id, sorted(wanted)):
            await self.driver.drive_by_id(task.id, CancelRequested())
        log.info("job %d: cancelled tasks in %s", job_id, ", ".join(sorted(wanted)))
        return await self.repo.get_job(job_id)

    async def cancel_task(self, job_id: int, device: DeviceRef) -> Task:
        task = await self.repo.job_task_of_device(job_id, device)
        if task is None:
            raise NotFound(f"job {job_id} has no task for {device}")
        if task.state.terminal:
            raise Conflict(f"the task of {device} is {task.state}; there is nothing to cancel")
        await self.driver.drive_by_id(task.id, CancelRequested())
        return await self.repo.get_task(task.id)

    async def pause(self, job_id: int) -> JobRecord:
        job = await self.repo.get_job(job_id)
        if job.stored_state is not JobState.RUNNING:
            raise Conflict(f"job {job_id} is {job.stored_state}; only a running job can be paused")
        await self.repo.update_job(
            job_id, self.clock(), state=JobState.PAUSED, pause_reason="paused by operator"
        )
        return await self.repo.get_job(job_id)

    async def resume(self, job_id: int) -> JobRecord:
        job = await self.repo.get_job(job_id)
        if job.stored_state is not JobState.PAUSED:
            raise Conflict(f"job {job_id} is {job.stored_state}; only a paused job can be resumed")
        failed = sum(job.counts.get(s, 0) for s in (TaskState.FAILED, TaskState.TIMED_OUT))
        options = replace(job.options, acknowledged_failures=failed)
        await self.repo.update_job(
            job_id, self.clock(), state=JobState.RUNNING, pause_reason="", options=options
        )
        self.background.spawn(self.dispatcher.advance_by_id(job_id), f"resuming job {job_id}")
        return await self.repo.get_job(job_id)

    async def confirm(self, job_id: int, devices: Sequence[DeviceRef] | None) -> JobRecord:
        await self.repo.get_job(job_id)
        for task in await self.repo.tasks_of_job(job_id, [TaskState.CONFIRM]):
            if devices is None or task.device in devices:
                await self.driver.drive_by_id(task.id, Confirmed())
        self.background.spawn(self.dispatcher.advance_by_id(job_id), f"dispatching job {job_id}")
        return await self.repo.get_job(job_id)

    async def rerun_failed(self, job_id: int) -> JobRecord:
        """Queue the job's failed and timed-out tasks again (devices busy elsewhere stay as they are)."""
        job = await self.repo.get_job(job_id)
        if job.stored_state is JobState.CANCELLED:
            raise Conflict(f"job {job_id} is cancelled")
        rerun = 0
        for task in await self.repo.tasks_of_job(job_id, [TaskState.FAILED, TaskState.TIMED_OUT]):
            if await self.repo.unfinished_task(task.device, task.module) is None:
                await self.driver.drive_by_id(task.id, RerunRequested())
                rerun += 1
        if rerun:
            # Failures re-run are no longer failures the operator acknowledged by resuming.
            acknowledged = max(job.options.acknowledged_failures - rerun, 0)
            options = replace(job.options, acknowledged_failures=acknowledged)
            await self.repo.update_job(
                job_id, self.clock(), state=JobState.RUNNING, pause_reason="", options=options
            )
            self.background.spawn(self.dispatcher.advance_by_id(job_id), f"re-running job {job_id}")
        log.info("job %d: %d task(s) re-run", job_id, rerun)
        return await self.repo.get_job(job_id)

    async def _check_firmware_for(self, firmware: Firmware, spec: JobSpec) -> None:
        if spec.download_protocol is DownloadProtocol.MQTT:
            too_large = [f for f in firmware.package if f.size > blocks.MAX_FILE_SIZE]
            if too_large:
                raise InvalidInput(
                    "download_protocol",
                    f"a file of {too_large[0].size} bytes is over the {blocks.MAX_FILE_SIZE}-byte limit of"
                    " a download over MQTT: use https",
                )
        if spec.type is JobType.VERIFY:
            if spec.devices is None or not 1 <= len(spec.devices) <= 10:
                raise InvalidInput("devices", "a verify job names 1 to 10 devices")
            if firmware.status is FirmwareStatus.VERIFYING:
                raise Conflict(f"firmware {firmware.id} is already being verified")
            return
        if spec.type is JobType.DYNAMIC:
            for job in await self.repo.running_jobs():
                if job.type is JobType.DYNAMIC and job.firmware_id == firmware.id:
                    raise Conflict(
                        f"firmware {firmware.id} already has dynamic job {job.id}; cancel it first"
                    )
        if not spec.force and firmware.status not in (
            FirmwareStatus.VERIFIED,
            FirmwareStatus.NO_VERIFY_NEEDED,
        ):
            raise Conflict(
                f"firmware {firmware.id} is {firmware.status}: run a verify job first, or pass force to skip it"
            )

    async def _cancel_older(self, device: DeviceRef, module: str, job_id: int) -> None:
        for task in await self.repo.unfinished_tasks_of_device(device):
            if task.module == module and task.job_id != job_id:
                await self.driver.drive_by_id(task.id, CancelRequested(f"overwritten by job {job_id}"))

    async def _candidates(
        self, firmware: Firmware, devices: Sequence[DeviceRef] | None, group: str | None = None
    ) -> list[machine.Candidate]:
        if devices is None:
            records = await self.repo.list_devices(
                product_key=firmware.product_key, group=group, limit=1_000_000
            )
            listed = False
        else:
            records = []
            for i, ref in enumerate(dict.fromkeys(devices)):
                if ref.product_key != firmware.product_key:
                    raise InvalidInput(
                        f"devices[{i}]", f"{ref} is not a device of product {firmware.product_key}"
                    )
                record = await self.repo.find_device(ref)
                if record is None:
                    raise InvalidInput(f"devices[{i}]", f"device {ref} does not exist")
                records.append(record)
            listed = True
        busy = await self.repo.busy_devices([r.device for r in records], firmware.module)
        return [
            machine.Candidate(r.device, r.modules.get(firmware.module), r.device in busy, listed)
            for r in records
        ]
