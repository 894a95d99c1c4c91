"""Running jobs: the periodic step (timeouts, start and end times, phases and pauses, notices paced by
`rate_per_minute`, completion), dynamic jobs taking devices, and whether a queued task may be notified
outside its job's step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from plugins.ota.app.admission import Admission
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.housekeeping import DeviceLocks, about
from plugins.ota.app.tasks import TaskDriver
from plugins.ota.core import machine
from plugins.ota.core.machine import CancelRequested, DeviceAvailable, Ticked
from plugins.ota.core.model import UNFINISHED, JobRecord, JobState, JobType, Task, TaskState
from plugins.ota.core.rate_limits import RateLimiter
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")

_DISPATCH_BATCH = 64  # notices a job step sends concurrently


class Dispatcher:
    def __init__(
        self,
        repo: Repository,
        driver: TaskDriver,
        channel: DeviceChannel,
        locks: DeviceLocks,
        clock: Callable[[], float],
        admission: Admission,
        *,
        step_s: float,
    ) -> None:
        self.repo = repo
        self.admission = admission
        self.driver = driver
        self.channel = channel
        self.locks = locks
        self.clock = clock
        self.step_s = step_s  # how often tick() runs
        self._job_pacers: dict[int, RateLimiter] = {}
        # This process runs the job steps (`Repository.lead`; set by each tick): a replica that does not
        # leaves a job it started or resumed to the leader's next step, so that one pacer paces each job.
        self.leading = True

    async def tick(self) -> None:
        """Apply time: timeouts, then one step of every running job (and the end of paused ones)."""
        now = self.clock()
        for task in await self.repo.overdue_tasks(now):
            await self.driver.drive_by_id(task.id, Ticked())  # the core decides; the query only narrows
        await self.admission.step()
        jobs = await self.repo.jobs_in_states(JobState.RUNNING, JobState.PAUSED)
        for gone in set(self.admission.waiting) - {job.id for job in jobs}:
            self.admission.set_waiting(gone, 0)
        for job in jobs:
            try:
                if job.stored_state is JobState.RUNNING:
                    await self._advance(job, now)
                elif job.end_at is not None and now >= job.end_at:
                    await self._end(job, now)  # a paused job still ends on time
            except Exception:
                log.exception("job %d: periodic step failed", job.id)

    async def dispatch_now(self, task: Task, *, pulled: bool = False) -> bool:
        """May this queued task be notified now, outside its job's dispatcher (see the core's rule)? If so,
        room for its transfer is taken (`Admission.reserve`): the caller notifies it, then `release`s it."""
        if self.admission.room() <= 0:
            return False  # its job's dispatcher notifies it once transfers end
        job = await self.repo.get_job(task.job_id)
        state = machine.job_state(job.stored_state, job.counts, schedule_at=job.schedule_at, now=self.clock())
        paced = bool(job.options.rate_per_minute)
        return machine.may_notify_queued(
            state, task.group_no, job.current_group, paced=paced, pulled=pulled
        ) and self.admission.reserve(task)

    def release(self, task: Task) -> None:
        """The notice `dispatch_now` allowed is decided: give back the room if the task did not take it."""
        self.admission.release(task.id)

    async def advance_by_id(self, job_id: int) -> None:
        """A job's step now (it was started, resumed or changed), in the process that leads."""
        if not self.leading:
            return
        job = await self.repo.get_job(job_id)
        if job.stored_state is JobState.RUNNING:
            await self._advance(job, self.clock())

    async def _advance(self, job: JobRecord, now: float) -> None:
        """One step of a running job: start, end, phase and pause decisions, then notices for the tasks
        whose turn it is (paced by `rate_per_minute`), then completion."""
        if job.schedule_at is not None and now < job.schedule_at:
            return
        if job.end_at is not None and now >= job.end_at:
            await self._end(job, now)
            return
        rollout = job.options.rollout
        if rollout is not None:
            decision = machine.rollout_step(
                rollout,
                job.current_group,
                await self.repo.group_counts(job.id),
                job.options.acknowledged_failures,
            )
            if decision.pause_reason is not None:
                await self.repo.update_job(
                    job.id, now, state=JobState.PAUSED, pause_reason=decision.pause_reason
                )
                log.warning("job %d paused: %s", job.id, decision.pause_reason)
                return
            if decision.current_group != job.current_group:
                log.info("job %d: phase %d starts", job.id, decision.current_group + 1)
                await self.repo.update_job(job.id, now, current_group=decision.current_group)
                job = await self.repo.get_job(job.id)
        await self._dispatch(job, now)
        job = await self.repo.get_job(job.id)
        if job.type is not JobType.DYNAMIC and not any(job.counts.get(s, 0) for s in UNFINISHED):
            await self._finish(job, now)

    async def _end(self, job: JobRecord, now: float) -> None:
        for task in await self.repo.tasks_of_job(job.id, UNFINISHED):
            await self.driver.drive_by_id(task.id, CancelRequested("the job reached its end time"))
        await self._finish(await self.repo.get_job(job.id), now)

    async def _dispatch(self, job: JobRecord, now: float) -> None:
        rate = job.options.rate_per_minute
        pacer = None
        if rate:
            # At most one step's worth at a time: smooth, and no burst when a job, a phase or the process starts.
            pacer = self._job_pacers.setdefault(
                job.id, RateLimiter(rate / 60, max(1.0, rate / 60 * self.step_s))
            )
        due = [
            task
            for task in await self.repo.dispatchable_tasks(job.id, job.current_group, now, limit=1_000_000)
            if self.channel.is_online(task.device)  # the others are notified when they connect
        ]
        sent = 0
        for_room = 0  # due tasks left queued for want of room in the transfer window
        try:
            if pacer is not None:
                for task in due:
                    if self.admission.room() <= 0:
                        for_room = len(due) - sent
                        return
                    if not pacer.allow(job.id, self.clock()):
                        return  # the rest by a later step
                    if self.admission.reserve(task):
                        await self._notify(task)
                    sent += 1
                return
            # Unpaced: many devices at once, so one notice's database round trips overlap the others'; as
            # many as the transfer window has room for (each notice taken enters it).
            while sent < len(due):
                batch = []
                for task in due[sent : sent + _DISPATCH_BATCH]:
                    if not self.admission.reserve(task):
                        break
                    batch.append(task)
                if not batch:
                    for_room = len(due) - sent
                    return
                await asyncio.gather(*(self._notify(task) for task in batch))
                sent += len(batch)
        finally:
            self.admission.set_waiting(job.id, for_room)

    async def _notify(self, task: Task) -> None:
        """Notify a task whose room `Admission.reserve` took; the room is given back if it stays queued."""
        try:
            async with self.locks.hold(task.device):  # changed meanwhile: the compare-and-set reloads it
                await self.driver.drive(task, DeviceAvailable(self.driver.session_start(task)))
        finally:
            self.admission.release(task.id)

    async def _finish(self, job: JobRecord, now: float) -> None:
        self._job_pacers.pop(job.id, None)
        self.admission.set_waiting(job.id, 0)
        # Only a running job completes: an operator's cancel may have come in while this step ran.
        unfinished = (JobState.RUNNING, JobState.PAUSED)
        if not await self.repo.update_job(job.id, now, state=JobState.COMPLETED, only_from=unfinished):
            return
        if job.type is JobType.VERIFY:
            status = machine.verify_outcome(job.counts)
            await self.repo.set_firmware_status(job.firmware_id, status)
            log.info("firmware %d: %s by job %d", job.firmware_id, status, job.id)
        log.info("job %d completed", job.id)

    async def match_dynamic_jobs(self, device: DeviceRef, module: str, version: str) -> None:
        """A device that informs a version a running dynamic job takes joins that job."""
        for job in await self.repo.running_jobs():
            if job.type is not JobType.DYNAMIC:
                continue
            firmware = await self.repo.get_firmware(job.firmware_id)
            if firmware.product_key != device.product_key or firmware.module != module:
                continue
            listed = job.options.devices
            if listed is not None and str(device) not in listed:
                continue  # a dynamic job with a device list takes only those devices
            if await self.repo.job_task_of_device(job.id, device) is not None:
                continue  # a device joins a dynamic job once
            candidate = machine.Candidate(device, version, busy=False, listed=False)
            planned = machine.plan_tasks(
                firmware,
                [candidate],
                src_versions=job.options.src_versions,
                need_confirm=job.options.need_confirm,
                gray_percent=job.options.gray_percent,
                seed=job.options.seed,
            )
            planned = [p for p in planned if p.state is not TaskState.SKIPPED]
            if planned:
                await self.repo.add_tasks(job.id, firmware, planned, job.options.policy, self.clock())
                log.info("%s joined dynamic job %d", device, job.id, extra=about(device))
                return
