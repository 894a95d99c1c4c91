"""Read-mostly facts kept in memory so a device's message costs fewer database round trips: the devices
known to exist (forgotten when deleted), firmware rows and what a notice needs of its job (both fixed
once created).

A device looked up and not found is remembered as absent for `ABSENT_TTL_S` only: another replica on the
same database may register it meanwhile (its messages are then handled from that long after, at most)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from plugins.ota.app.batching import Batcher
from plugins.ota.core.model import DownloadProtocol, Firmware
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.repository import Repository

_ABSENT_MAX = 100_000
ABSENT_TTL_S = 10.0


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What a notice needs of its job."""

    tags: dict[str, str]
    protocol: DownloadProtocol


class Catalog:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._existing: set[DeviceRef] = set()
        # looked up and not registered: until when (monotonic) that answer stands, unless registered here
        self._absent: dict[DeviceRef, float] = {}
        self._firmware: dict[int, Firmware] = {}
        self._jobs: dict[int, JobFacts] = {}
        self._lookups = Batcher(self._registered_among)  # a burst of connections: a few queries

    # ---------------------------------------------------------------------------------------- devices

    async def exists(self, device: DeviceRef) -> bool:
        if device in self._existing:
            return True
        until = self._absent.get(device)
        if until is not None and time.monotonic() < until:
            return False
        if not await self._lookups.submit(device):
            if len(self._absent) >= _ABSENT_MAX:
                self._absent.clear()
            self._absent[device] = time.monotonic() + ABSENT_TTL_S
            return False
        self._absent.pop(device, None)
        self._existing.add(device)
        return True

    async def _registered_among(self, devices: list[DeviceRef]) -> list[bool]:
        found = await self.repo.existing_devices(devices)
        return [device in found for device in devices]

    def registered(self, device: DeviceRef) -> None:
        self._absent.pop(device, None)
        self._existing.add(device)

    def deleted(self, device: DeviceRef) -> None:
        self._existing.discard(device)

    # ------------------------------------------------------------------------------- firmware, jobs

    async def firmware(self, firmware_id: int) -> Firmware:
        found = self._firmware.get(firmware_id)
        if found is None:
            found = self._firmware[firmware_id] = await self.repo.get_firmware(firmware_id)
        return found

    async def find_firmware(self, firmware_id: int) -> Firmware | None:
        found = self._firmware.get(firmware_id)
        if found is None:
            found = await self.repo.find_firmware(firmware_id)
            if found is not None:
                self._firmware[firmware_id] = found
        return found

    def firmware_deleted(self, firmware_id: int) -> None:
        self._firmware.pop(firmware_id, None)

    async def job_facts(self, job_id: int) -> JobFacts:
        facts = self._jobs.get(job_id)
        if facts is None:
            options = (await self.repo.get_job(job_id)).options
            facts = self._jobs[job_id] = JobFacts(dict(options.tags), options.download_protocol)
        return facts
