"""What operators do with devices: register (one, or a CSV import), enable or disable, give a new secret,
delete; and what they read of devices."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plugins.ota.app.catalog import Catalog
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.housekeeping import about
from plugins.ota.core.credentials import new_device_secret
from plugins.ota.core.device_csv import parse_devices
from plugins.ota.core.model import DeviceRecord, Task
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")


@dataclass(frozen=True, slots=True)
class ImportResult:
    created: list[tuple[DeviceRef, str]]
    existing: int
    errors: list[tuple[int, str]]


class DeviceAdmin:
    def __init__(
        self, repo: Repository, catalog: Catalog, channel: DeviceChannel, clock: Callable[[], float]
    ) -> None:
        self.repo = repo
        self.catalog = catalog
        self.channel = channel
        self.clock = clock

    # ----------------------------------------------------------------------------------------- reads

    async def get(self, device: DeviceRef) -> tuple[DeviceRecord, list[Task]]:
        """The device and its latest tasks (NotFound for no such device)."""
        return await self.repo.get_device(device), await self.repo.tasks_of_device(device)

    async def some(self, *, limit: int, offset: int) -> list[DeviceRecord]:
        return await self.repo.list_devices(limit=limit, offset=offset)

    async def page(
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
    ) -> tuple[list[DeviceRecord], int]:
        """The devices the filters select, a page of them, and how many there are in all."""
        filters = {"product_key": product_key, "module": module, "version": version, "group": group}
        records = await self.repo.list_devices(
            **filters, online=online, name=name, limit=limit, offset=offset
        )
        total = await self.repo.count_devices(**filters, online=online, name=name)
        return records, total

    async def version_counts(self) -> list[tuple[str, str, str, int]]:
        """Devices per product, module and version now, counted by the database."""
        return await self.repo.version_counts()

    async def groups_of(self, devices: Sequence[DeviceRef]) -> dict[DeviceRef, list[str]]:
        return await self.repo.groups_of(devices)

    # -------------------------------------------------------------------------------------- changes

    async def set_groups(self, device: DeviceRef, groups: Sequence[str]) -> list[str]:
        """`device`'s groups become `groups` (the ones a job may target)."""
        kept = await self.repo.set_device_groups(device, groups)
        log.info("device %s groups: %s", device, ", ".join(kept) or "none", extra=about(device))
        return kept

    async def add(self, device: DeviceRef, secret: str | None) -> DeviceRecord:
        record = await self.repo.add_device(device, secret or new_device_secret(), self.clock())
        self.catalog.registered(device)
        log.info("device %s registered", device, extra=about(device))
        return record

    async def set_enabled(self, device: DeviceRef, enabled: bool) -> DeviceRecord:
        await self.repo.set_enabled(device, enabled)
        log.info("device %s %s", device, "enabled" if enabled else "disabled", extra=about(device))
        if not enabled:
            await self.channel.disconnect(device)
        return await self.repo.get_device(device)

    async def record(self, device: DeviceRef) -> DeviceRecord:
        """The device alone (NotFound for no such device)."""
        return await self.repo.get_device(device)

    async def secret(self, device: DeviceRef) -> str:
        """The device's secret as it is now (an admin reading it is recorded in the audit log)."""
        return (await self.record(device)).device_secret

    async def rotate_secret(self, device: DeviceRef, secret: str | None) -> str:
        new = secret or new_device_secret()
        await self.repo.set_secret(device, new)
        log.info("device %s has a new secret; its connections are closed", device, extra=about(device))
        await self.channel.disconnect(device)
        return new

    async def delete(self, device: DeviceRef) -> None:
        await self.repo.delete_device(device)
        self.catalog.deleted(device)
        log.info("device %s deleted", device, extra=about(device))
        await self.channel.disconnect(device)

    async def import_csv(self, text: str) -> ImportResult:
        """Register devices from CSV rows `product_key,device_name[,device_secret]` (plugins.ota.core.device_csv)."""
        parsed = parse_devices(text)
        errors = parsed.errors
        rows = [(r.device, r.secret or new_device_secret()) for r in parsed.devices]
        created = set(await self.repo.add_devices(rows, self.clock()))
        for ref, _ in rows:
            self.catalog.registered(ref)
        log.info(
            "imported %d device(s); %d existed; %d line(s) refused",
            len(created),
            len(rows) - len(created),
            len(errors),
        )
        return ImportResult([(r, s) for r, s in rows if r in created], len(rows) - len(created), errors)
