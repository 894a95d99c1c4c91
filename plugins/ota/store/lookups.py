"""The `Repository` methods every implementation derives the same way from its own queries: a `get_*` is
its `find_*` raising `NotFound` instead of answering None, the running jobs are the jobs in one state, and
one device's presence or unfinished tasks are those of a list of one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from plugins.ota.core.errors import NotFound
from plugins.ota.core.model import DeviceRecord, Firmware, JobRecord, JobState, Task
from plugins.ota.core.topics import DeviceRef


class Lookups(ABC):
    """A base of the repositories: the derived methods, over the ones each implements."""

    @abstractmethod
    async def find_device(self, ref: DeviceRef) -> DeviceRecord | None: ...

    @abstractmethod
    async def find_firmware(self, firmware_id: int) -> Firmware | None: ...

    @abstractmethod
    async def find_job(self, job_id: int) -> JobRecord | None: ...

    @abstractmethod
    async def jobs_in_states(self, *states: JobState) -> list[JobRecord]: ...

    @abstractmethod
    async def set_presence(self, changes: Sequence[tuple[DeviceRef, bool]], now: float) -> None: ...

    @abstractmethod
    async def unfinished_tasks_of_devices(self, refs: Sequence[DeviceRef]) -> dict[DeviceRef, list[Task]]: ...

    async def set_online(self, ref: DeviceRef, online: bool, now: float) -> None:
        await self.set_presence([(ref, online)], now)

    async def unfinished_tasks_of_device(self, ref: DeviceRef) -> list[Task]:
        return (await self.unfinished_tasks_of_devices([ref]))[ref]

    async def get_device(self, ref: DeviceRef) -> DeviceRecord:
        found = await self.find_device(ref)
        if found is None:
            raise NotFound(f"device {ref} does not exist")
        return found

    async def get_firmware(self, firmware_id: int) -> Firmware:
        found = await self.find_firmware(firmware_id)
        if found is None:
            raise NotFound(f"firmware {firmware_id} does not exist")
        return found

    async def get_job(self, job_id: int) -> JobRecord:
        found = await self.find_job(job_id)
        if found is None:
            raise NotFound(f"job {job_id} does not exist")
        return found

    async def running_jobs(self) -> list[JobRecord]:
        """Jobs stored as running (scheduled ones included: their start time is checked by the caller)."""
        return await self.jobs_in_states(JobState.RUNNING)
