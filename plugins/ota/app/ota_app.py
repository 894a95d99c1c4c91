"""`OtaApp`: the app layer's parts built over one repository, firmware store, link signer and device
channel. The amqtt plugin and the HTTP API hold one and call its parts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from firmware_store import DownloadSlots, FirmwareStore, LinkSigner
from plugins.ota.app.accounts import AccountAdmin
from plugins.ota.app.admission import Admission
from plugins.ota.app.catalog import Catalog
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.devices import DeviceAdmin
from plugins.ota.app.downloads import BlockServer, DownloadGate
from plugins.ota.app.events import DeviceEvents
from plugins.ota.app.firmware import FirmwareAdmin
from plugins.ota.app.housekeeping import Background, DeviceLocks, Rejections
from plugins.ota.app.jobs import JobAdmin
from plugins.ota.app.rollout import Dispatcher
from plugins.ota.app.tasks import TaskDriver
from plugins.ota.core.admission import TransferWindow
from plugins.ota.core.model import TaskState
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.repository import Repository

DEFAULT_MAX_TRANSFERS = 256


class OtaApp:
    def __init__(
        self,
        repo: Repository,
        store: FirmwareStore,
        signer: LinkSigner,
        channel: DeviceChannel,
        clock: Callable[[], float],
        *,
        auto_register: bool,
        max_payload_bytes: int,
        progress_per_second: float = 5.0,
        progress_burst: float = 20.0,
        mqtt_download_bytes_per_second: float = 1_048_576,
        step_s: float = 1.0,
        window: TransferWindow | None = None,
        slots: DownloadSlots | None = None,
        audit_retention_s: float = 0.0,
    ) -> None:
        self.clock = clock
        self._repo = repo
        locks = DeviceLocks()
        self.background = Background()
        self.rejections = Rejections()
        catalog = Catalog(repo)
        self.downloads = DownloadGate(repo, catalog, clock)
        # Transfers in flight: by default as many as the download endpoint's own default capacity.
        window = window if window is not None else TransferWindow(maximum=DEFAULT_MAX_TRANSFERS)
        self.admission = Admission(repo, channel, window, clock)
        self.driver = TaskDriver(repo, catalog, self.downloads, signer, channel, locks, clock, self.admission)
        self.dispatcher = Dispatcher(repo, self.driver, channel, locks, clock, self.admission, step_s=step_s)
        blocks = BlockServer(
            self.downloads, store, channel, self.rejections, clock, mqtt_download_bytes_per_second, slots
        )
        self.events = DeviceEvents(
            repo,
            catalog,
            self.driver,
            self.dispatcher,
            blocks,
            channel,
            locks,
            self.rejections,
            clock,
            auto_register=auto_register,
            max_payload_bytes=max_payload_bytes,
            progress_per_second=progress_per_second,
            progress_burst=progress_burst,
        )
        self.devices = DeviceAdmin(repo, catalog, channel, clock)
        self.firmware = FirmwareAdmin(repo, store, catalog, clock)
        self.jobs = JobAdmin(repo, self.driver, self.dispatcher, self.background, clock)
        self.accounts = AccountAdmin(repo, clock, audit_retention_s)

    @property
    def rejected(self) -> Counter[str]:
        """Inputs refused, by kind."""
        return self.rejections.counts

    @property
    def notices_sent(self) -> Counter[str]:
        """Notices handed to an online session: push, pull."""
        return self.driver.notices_sent

    def reject(self, device: DeviceRef | str, kind: str, reason: str) -> None:
        self.rejections.reject(device, kind, reason)

    async def tick(self, *, lead: bool = True) -> None:
        """Apply time: forget idle per-device state; and, in the process that leads (`Repository.lead`: the
        only one, or one replica of several at a time), timeouts, then one step of every running job (and
        the end of paused ones)."""
        self.events.forget_idle()
        self.dispatcher.leading = lead
        if lead:
            await self.dispatcher.tick()
            await self.accounts.prune()

    async def drain(self) -> None:
        """Wait for background work (notices being dispatched, handlers in flight)."""
        await self.background.drain()

    async def task_state_counts(self) -> dict[TaskState, int]:
        """How many tasks are in each state, over all jobs (for metrics)."""
        return await self._repo.task_state_counts()

    async def device_login(self, device: DeviceRef) -> tuple[str, bool] | None:
        """The device's secret and whether it is enabled (None for no such device), for device auth."""
        return await self._repo.device_login(device)
