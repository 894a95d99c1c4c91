"""What devices do: their messages on OTA topics and their sessions coming and going. Handlers for one
device run one at a time; every failure is caught and logged with the device and the reason. The
database holds the truth: every connect, inform and pull reconciles against the stored task."""

from __future__ import annotations

import logging
from collections.abc import Callable

from plugins.ota.app.batching import Batcher
from plugins.ota.app.catalog import Catalog
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.downloads import BlockServer
from plugins.ota.app.housekeeping import DeviceLocks, Rejections, about
from plugins.ota.app.rollout import Dispatcher
from plugins.ota.app.tasks import PullReply, TaskDriver
from plugins.ota.core import messages
from plugins.ota.core.machine import DeviceAvailable, FirmwareRequested, ProgressReported, VersionReported
from plugins.ota.core.model import DEFAULT_MODULE, PENDING, Task, TaskState
from plugins.ota.core.rate_limits import RateLimiter
from plugins.ota.core.topics import DeviceRef, OtaTopic, TopicKind
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")


class DeviceEvents:
    def __init__(
        self,
        repo: Repository,
        catalog: Catalog,
        driver: TaskDriver,
        dispatcher: Dispatcher,
        blocks: BlockServer,
        channel: DeviceChannel,
        locks: DeviceLocks,
        rejections: Rejections,
        clock: Callable[[], float],
        *,
        auto_register: bool,
        max_payload_bytes: int,
        progress_per_second: float,
        progress_burst: float,
    ) -> None:
        self.repo = repo
        self.catalog = catalog
        self.driver = driver
        self.dispatcher = dispatcher
        self.blocks = blocks
        self.channel = channel
        self.locks = locks
        self.rejections = rejections
        self.clock = clock
        self.auto_register = auto_register
        self.max_payload_bytes = max_payload_bytes
        self.progress_limit = RateLimiter(progress_per_second, progress_burst)
        # Sessions coming and going in bursts (a fleet reconnecting) share their writes and reads.
        self._presence = Batcher(self._record_presence)
        self._unfinished = Batcher(self._unfinished_of)

    async def handle_publish(self, topic: OtaTopic, payload: bytes, *, now_online: bool = False) -> None:
        """One device publish on an OTA topic. Never raises: failures are logged with the device."""
        device = topic.device
        if topic.kind is TopicKind.PROGRESS and not self._progress_allowed(device):
            return
        if topic.kind is TopicKind.FILE_DOWNLOAD:
            await self.blocks.on_request(device, payload)  # reads only: no lock, paced per device
            return
        try:
            async with self.locks.hold(device):
                if now_online and await self.catalog.exists(device):
                    # Marked under the same lock as the message: the device's messages keep their order.
                    await self._presence.submit((device, True))
                match topic.kind:
                    case TopicKind.INFORM:
                        await self._on_inform(device, messages.parse_inform(payload, self.max_payload_bytes))
                    case TopicKind.PROGRESS:
                        await self._on_progress(
                            device, messages.parse_progress(payload, self.max_payload_bytes)
                        )
                    case TopicKind.FIRMWARE_GET:
                        msg = messages.parse_firmware_get(payload, self.max_payload_bytes)
                        await self._on_pull(
                            device, msg.module, PullReply(TopicKind.FIRMWARE_GET_REPLY, msg.id)
                        )
                    case TopicKind.LEGACY_REQUEST:
                        req = messages.parse_legacy_request(payload, self.max_payload_bytes)
                        await self._on_pull(
                            device, DEFAULT_MODULE, PullReply(TopicKind.LEGACY_REQUEST, req.id)
                        )
                    case _:
                        return  # server→device topics published by a client are not ours to act on
        except messages.BadMessage as e:
            self.rejections.reject(device, f"bad_{topic.kind}", str(e))
        except Exception:
            self.rejections.counts["internal_error"] += 1
            log.exception("failed to handle %s from %s", topic.kind, device, extra=about(device))

    def forget_idle(self) -> None:
        """Drop the progress budgets of devices idle for a while."""
        self.progress_limit.forget_idle(self.clock())

    def _progress_allowed(self, device: DeviceRef) -> bool:
        now = self.clock()
        if self.progress_limit.allow(device, now):
            return True
        self.rejections.counts["progress_rate_limited"] += 1
        if dropped := self.progress_limit.should_warn(device, now):
            log.warning(
                "rejected from %s: progress_rate_limited: %d report(s) over %g/s dropped",
                device,
                dropped,
                self.progress_limit.rate,
                extra=about(device),
            )
        return False

    async def device_connected(self, device: DeviceRef) -> None:
        """The device's session is up: record it online and hand it any pending notice."""
        try:
            async with self.locks.hold(device):
                if not await self.catalog.exists(device):
                    return
                await self._presence.submit((device, True))
                for task in await self._unfinished.submit(device):
                    if task.state is TaskState.QUEUED and not await self.dispatcher.dispatch_now(task):
                        continue  # its job's dispatcher notifies it when its turn comes
                    try:
                        await self.driver.drive(task, DeviceAvailable(self.driver.session_start(task)))
                    finally:
                        self.dispatcher.release(task)
        except Exception:
            log.exception("failed to handle the connection of %s", device, extra=about(device))

    async def device_disconnected(self, device: DeviceRef) -> None:
        try:
            async with self.locks.hold(device):
                if await self.catalog.exists(device):
                    await self._presence.submit((device, False))
        except Exception:
            log.exception("failed to handle the disconnection of %s", device, extra=about(device))

    async def _record_presence(self, changes: list[tuple[DeviceRef, bool]]) -> list[None]:
        await self.repo.set_presence(changes, self.clock())
        return [None] * len(changes)

    async def _unfinished_of(self, devices: list[DeviceRef]) -> list[list[Task]]:
        found = await self.repo.unfinished_tasks_of_devices(devices)
        return [found[device] for device in devices]

    async def _known(self, device: DeviceRef, kind: str) -> bool:
        if await self.catalog.exists(device):
            return True
        if self.auto_register and kind == "inform":
            if await self.repo.ensure_device(device, self.clock()):
                log.info("registered %s on its first inform", device, extra=about(device))
            self.catalog.registered(device)
            await self._presence.submit((device, self.channel.is_online(device)))
            return True
        self.rejections.reject(device, "unknown_device", f"{kind} from a device that is not registered")
        return False

    async def _on_inform(self, device: DeviceRef, msg: messages.Inform) -> None:
        if not await self._known(device, "inform"):
            return
        await self.repo.record_version(device, msg.module, msg.version, self.clock())
        log.info("%s informed %s version %s", device, msg.module, msg.version, extra=about(device))
        task = await self.repo.unfinished_task(device, msg.module)
        if task is None:
            await self.dispatcher.match_dynamic_jobs(device, msg.module, msg.version)
            task = await self.repo.unfinished_task(device, msg.module)
        if task is None:
            return
        if (
            task.state is TaskState.QUEUED
            and msg.version != task.target_version
            and not await self.dispatcher.dispatch_now(task)
        ):
            return
        try:
            await self.driver.drive(
                task, VersionReported(msg.version, self.channel.session_started_at(device))
            )
        finally:
            self.dispatcher.release(task)

    async def _on_progress(self, device: DeviceRef, msg: messages.Progress) -> None:
        if not await self._known(device, "progress"):
            return
        task = await self.repo.unfinished_task(device, msg.module)
        if task is None:
            self.rejections.reject(
                device, "progress_without_task", f"progress {msg.step} for module {msg.module}, no task"
            )
            return
        await self.driver.drive(task, ProgressReported(msg.step, msg.desc))

    async def _on_pull(self, device: DeviceRef, module: str, reply: PullReply) -> None:
        if not await self._known(device, "pull"):
            return
        task = await self.repo.unfinished_task(device, module)
        if (
            task is not None
            and task.state in PENDING
            and (task.state is not TaskState.QUEUED or await self.dispatcher.dispatch_now(task, pulled=True))
        ):
            try:
                await self.driver.drive(task, FirmwareRequested(), reply=reply)
            finally:
                self.dispatcher.release(task)
        elif reply.kind is TopicKind.FIRMWARE_GET_REPLY:
            await self.channel.send(
                device, messages.pull_answer(reply.kind, reply.request_id, int(self.clock() * 1000), {})
            )
