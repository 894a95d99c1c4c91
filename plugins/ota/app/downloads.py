"""Who may download what, asked on every download: `DownloadGate` for HTTPS links and firmware streams
over MQTT, `BlockServer` for the blocks of a firmware file sent over MQTT (`thing/file/download`)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from firmware_store import Blob, DownloadSlots, FirmwareStore
from plugins.ota.app.catalog import Catalog
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.housekeeping import Rejections, about
from plugins.ota.core import blocks
from plugins.ota.core.errors import NotFound
from plugins.ota.core.messages import block_reply
from plugins.ota.core.model import DOWNLOADABLE, DownloadProtocol, Firmware, Task
from plugins.ota.core.rate_limits import RateLimiter
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")

# A "may download" yes is reused this long; a task's own state change (cancel, end) forgets it at once.
DOWNLOAD_GRANT_S = 5.0
_GRANTS_MAX = 100_000
# A refused block request is paced as if it had cost this many bytes (a flood of bad requests waits too).
_REFUSED_BLOCK_COST = 1024
_RESOURCE = re.compile(r"([0-9]{1,18})(?:\.([0-9]{1,2}))?")


def resource_of(firmware_id: int, index: int) -> str:
    """The download links' resource for file `index` of a firmware: `<id>` for the first (the only one of
    a single-file package), `<id>.<index>` for the others."""
    return str(firmware_id) if index == 0 else f"{firmware_id}.{index}"


def parse_resource(resource: str) -> tuple[int, int] | None:
    """(firmware id, file index) of a resource made by `resource_of`, None for anything else."""
    match = _RESOURCE.fullmatch(resource)
    if match is None:
        return None
    index = match.group(2)
    if index is not None and index.startswith("0"):  # `<id>` names file 0; no second spelling of any file
        return None
    return int(match.group(1)), int(index or 0)


class DownloadGate:
    """ "May this device download this file now", for the HTTPS download endpoint and the MQTT streams. A
    yes is remembered for `DOWNLOAD_GRANT_S`, so a download's Range requests or thousands of blocks cost
    few reads; the task's own state change forgets it at once (`task_changed`)."""

    def __init__(self, repo: Repository, catalog: Catalog, clock: Callable[[], float]) -> None:
        self.repo = repo
        self.catalog = catalog
        self.clock = clock
        self._grants: dict[tuple[int, DeviceRef], float] = {}  # (firmware id, device) -> until
        self._streams: dict[int, tuple[Task, float]] = {}  # stream id (a task id) -> (task, until)

    def task_changed(self, task: Task) -> None:
        if task.state not in DOWNLOADABLE:
            self._grants.pop((task.firmware_id, task.device), None)
            self._streams.pop(task.id, None)

    async def resolve_blob(self, resource: str) -> Blob | None:
        """The blob a download link's resource names: a firmware's file (`resource_of`)."""
        parsed = parse_resource(resource)
        if parsed is None:
            return None
        firmware_id, index = parsed
        firmware = await self.catalog.find_firmware(firmware_id)
        if firmware is None or index >= len(firmware.package):
            return None
        file = firmware.package[index]
        return Blob(file.sha256, file.md5, file.size)

    async def may_download(self, resource: str, subject: str) -> bool:
        """Whether `subject` has a task for the firmware of `resource` it may download now."""
        now = self.clock()
        parsed = parse_resource(resource)
        try:
            device = DeviceRef.parse(subject)
        except ValueError:
            return False
        if parsed is None:
            return False
        key = (parsed[0], device)
        if self._grants.get(key, 0.0) > now:
            return True
        if not await self.repo.may_download(parsed[0], device):
            return False
        if len(self._grants) > _GRANTS_MAX:
            self._grants = {k: t for k, t in self._grants.items() if t > now}
        self._grants[key] = now + DOWNLOAD_GRANT_S
        return True

    async def stream(self, stream_id: int) -> tuple[Task, Firmware] | None:
        """The task whose package stream `stream_id` is (its id), while it may be downloaded over MQTT."""
        now = self.clock()
        cached = self._streams.get(stream_id)
        if cached is None or cached[1] <= now:
            try:
                task = await self.repo.get_task(stream_id)
            except NotFound:
                return None
            if task.state not in DOWNLOADABLE:
                return None
            if len(self._streams) > _GRANTS_MAX:
                self._streams = {k: v for k, v in self._streams.items() if v[1] > now}
            cached = self._streams[stream_id] = (task, now + DOWNLOAD_GRANT_S)
        task = cached[0]
        if (await self.catalog.job_facts(task.job_id)).protocol is not DownloadProtocol.MQTT:
            return None
        return task, await self.catalog.firmware(task.firmware_id)


class BlockServer:
    """Blocks of a firmware file over MQTT, read from the stored blob and sent on `download_reply`, paced
    to `bytes_per_second` per device (a burst of a second's worth, at least one largest block). A stream
    holds a download slot (`slots`, shared with HTTPS) while its blocks keep coming; a stream that finds
    none gets code 503 and asks again later."""

    def __init__(
        self,
        gate: DownloadGate,
        store: FirmwareStore,
        channel: DeviceChannel,
        rejections: Rejections,
        clock: Callable[[], float],
        bytes_per_second: float,
        slots: DownloadSlots | None = None,
    ) -> None:
        self.slots = slots
        self.gate = gate
        self.store = store
        self.channel = channel
        self.rejections = rejections
        self.clock = clock
        self.pacer = RateLimiter(bytes_per_second, max(bytes_per_second, blocks.MAX_BLOCK_SIZE))

    async def on_request(self, device: DeviceRef, payload: bytes) -> None:
        """One block request: the block, or an error reply (code != 200) that is counted. Never raises."""
        try:
            answer, blob = await self._block(device, payload)
            if isinstance(answer, blocks.Block) and self.slots is not None:
                answer = self._admit(device, answer)
            cost = answer.size if isinstance(answer, blocks.Block) else _REFUSED_BLOCK_COST
            wait = self.pacer.reserve(device, self.clock(), cost)
            if wait > 0:
                await asyncio.sleep(wait)  # the device's connection waits meanwhile
            if isinstance(answer, blocks.Block):
                assert blob is not None
                data = await self.store.read(blob, answer.offset, answer.size)
                if data is not None and len(data) == answer.size:
                    await self.channel.send(device, block_reply(blocks.reply_frame(answer, data)))
                    return
                log.error(
                    "%s: firmware file %s cannot be served over MQTT: the stored blob is damaged",
                    device,
                    blob.sha256[:12],
                    extra=about(device),
                )
                answer = blocks.Rejection(
                    blocks.ReplyCode.UNAVAILABLE, "the file is not available", answer.request_id
                )
            self.rejections.reject(device, f"file_download_{answer.code.name.lower()}", answer.msg)
            await self.channel.send(device, block_reply(blocks.error_frame(answer)))
        except Exception:
            self.rejections.counts["internal_error"] += 1
            log.exception("failed to serve a firmware block to %s", device, extra=about(device))

    def _admit(self, device: DeviceRef, block: blocks.Block) -> blocks.Block | blocks.Rejection:
        """The block, if its stream holds a download slot (taken at its first block, given back after its
        last); else a 503 rejection."""
        assert self.slots is not None
        key = ("mqtt", device)  # a device downloads the files of its package one after the other
        if not self.slots.lease(key, self.clock()):
            return blocks.Rejection(
                blocks.ReplyCode.UNAVAILABLE, "too many downloads at once; retry later", block.request_id
            )
        if block.end >= block.file_length:
            self.slots.end_lease(key)
        return block

    async def _block(
        self, device: DeviceRef, payload: bytes
    ) -> tuple[blocks.Block | blocks.Rejection, Blob | None]:
        request = blocks.parse_request(payload)
        if isinstance(request, blocks.Rejection):
            return request, None
        found = await self.gate.stream(request.stream_id)
        if found is None:
            return blocks.decide(request, device, None), None
        task, firmware = found
        index = request.file_id - blocks.FIRST_FILE_ID
        package = firmware.package
        if not 0 <= index < len(package):
            index = -1  # no such file: decide() says so
        file = package[index] if index >= 0 else None
        stream = blocks.StreamFile(
            request.stream_id, request.file_id if file else -1, file.size if file else 0, task.device
        )
        answer = blocks.decide(request, device, stream)
        return answer, None if file is None else Blob(file.sha256, file.md5, file.size)
