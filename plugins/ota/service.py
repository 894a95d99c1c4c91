"""The OTA service: carries out the core's decisions against the repository, the firmware store and
the device channel.

Everything a device sends arrives through `handle_publish`; everything an operator does arrives through
the methods the management API calls. Handlers for one device run one at a time (amqtt runs plugin
events as tasks nobody awaits, so they would otherwise interleave); every failure is caught and logged
with the device and the reason. The database holds the truth: every connect, inform and pull reconciles
against the stored task, and task writes are compare-and-set.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from firmware_store import Blob, FirmwareStore, LinkSigner
from plugins.ota.core import blocks, machine, messages
from plugins.ota.core.credentials import new_device_secret
from plugins.ota.core.device_csv import parse_devices
from plugins.ota.core.errors import Conflict, InvalidInput, NotFound
from plugins.ota.core.machine import (
    CancelRequested,
    Confirmed,
    Delivery,
    DeviceAvailable,
    Event,
    FirmwareRequested,
    ProgressReported,
    RerunRequested,
    SendNotice,
    Ticked,
    VersionReported,
)
from plugins.ota.core.model import (
    DEFAULT_MODULE,
    DOWNLOADABLE,
    FILE_NAME,
    FILE_NAME_RULE,
    MAX_PACKAGE_FILES,
    PENDING,
    UNFINISHED,
    DeviceRecord,
    DownloadProtocol,
    Firmware,
    FirmwareFile,
    FirmwareStatus,
    JobOptions,
    JobRecord,
    JobSpec,
    JobState,
    JobType,
    SignMethod,
    Task,
    TaskState,
)
from plugins.ota.core.rate_limits import RateLimiter
from plugins.ota.core.topics import DeviceRef, OtaTopic, TopicKind, topic_name
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")

_CAS_RETRIES = 5
_DISPATCH_BATCH = 64  # notices a job step sends concurrently
# A "may download" yes is reused this long; a task's own state change (cancel, end) forgets it at once.
DOWNLOAD_GRANT_S = 5.0


class DeviceChannel(Protocol):
    """How the service reaches devices (the amqtt plugin in the product, a fake in service tests)."""

    def is_online(self, device: DeviceRef) -> bool: ...

    def session_started_at(self, device: DeviceRef) -> float | None:
        """When the device's current session began (None when it has none)."""
        ...

    async def send(self, device: DeviceRef, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Deliver to the device's own session (whether or not it subscribed; at `qos` then), and to other
        subscribers of `topic` at the QoS they were granted; False when the device is offline."""
        ...

    async def disconnect(self, device: DeviceRef) -> None:
        """Close the device's connections (it was disabled, deleted or given a new secret)."""
        ...


@dataclass(frozen=True, slots=True)
class ImportResult:
    created: list[tuple[DeviceRef, str]]
    existing: int
    errors: list[tuple[int, str]]


@dataclass(frozen=True, slots=True)
class PullReply:
    """Where the answer to a pull goes: the get_reply topic with the request id, or the legacy topic."""

    kind: TopicKind
    request_id: messages.RequestId


class OtaService:
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
    ) -> None:
        self.repo = repo
        self.store = store
        self.signer = signer
        self.channel = channel
        self.clock = clock
        self.auto_register = auto_register
        self.max_payload_bytes = max_payload_bytes
        self.rejected: Counter[str] = Counter()
        self.notices_sent: Counter[str] = Counter()  # notices handed to an online session: push, pull
        self.progress_limit = RateLimiter(progress_per_second, progress_burst)
        # Firmware over MQTT: each device's blocks are paced to this many bytes a second (a burst of a
        # second's worth, at least one largest block).
        self.block_pacer = RateLimiter(
            mqtt_download_bytes_per_second, max(mqtt_download_bytes_per_second, blocks.MAX_BLOCK_SIZE)
        )
        self._job_pacers: dict[int, RateLimiter] = {}
        self.step_s = step_s  # how often tick() runs
        self._locks: dict[DeviceRef, asyncio.Lock] = {}
        self._lock_users: Counter[DeviceRef] = Counter()
        self._background: set[asyncio.Task[None]] = set()
        # Read-mostly facts kept in memory so a message costs fewer database round trips: devices known
        # to exist (forgotten when deleted), firmware rows and job tags (immutable once created).
        self._existing: set[DeviceRef] = set()
        self._absent: set[DeviceRef] = set()  # looked up and not registered (until registered here)
        self._firmware_cache: dict[int, Firmware] = {}
        self._job_cache: dict[int, _JobFacts] = {}
        self._download_grants: dict[tuple[int, DeviceRef], float] = {}  # (firmware id, device) -> until
        self._streams: dict[int, tuple[Task, float]] = {}  # stream id (a task id) -> (task, until)

    # --------------------------------------------------------------------------------- housekeeping

    @asynccontextmanager
    async def _device_lock(self, device: DeviceRef) -> AsyncIterator[None]:
        lock = self._locks.setdefault(device, asyncio.Lock())
        self._lock_users[device] += 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[device] -= 1
            if not self._lock_users[device]:
                del self._lock_users[device]
                self._locks.pop(device, None)

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run `coro` in the background; its failure is logged, and `drain()` waits for it."""

        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background work (notices being dispatched, handlers in flight)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def reject(self, device: DeviceRef | str, kind: str, reason: str) -> None:
        """Count and log one rejected input; `device` is a client id when no device could be named."""
        self.rejected[kind] += 1
        log.warning("rejected from %s: %s: %s", device, kind, reason, extra=_about(device))

    # ------------------------------------------------------------------------------- device events

    async def handle_publish(self, topic: OtaTopic, payload: bytes, *, now_online: bool = False) -> None:
        """One device publish on an OTA topic. Never raises: failures are logged with the device."""
        device = topic.device
        if topic.kind is TopicKind.PROGRESS and not self._progress_allowed(device):
            return
        if topic.kind is TopicKind.FILE_DOWNLOAD:
            await self._on_block_request(device, payload)  # reads only: no lock, paced per device
            return
        try:
            async with self._device_lock(device):
                if now_online and await self._exists(device):
                    # Marked under the same lock as the message: the device's messages keep their order.
                    await self.repo.set_online(device, True, self.clock())
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
            self.reject(device, f"bad_{topic.kind}", str(e))
        except Exception:
            self.rejected["internal_error"] += 1
            log.exception("failed to handle %s from %s", topic.kind, device, extra=_about(device))

    def _progress_allowed(self, device: DeviceRef) -> bool:
        now = self.clock()
        if self.progress_limit.allow(device, now):
            return True
        self.rejected["progress_rate_limited"] += 1
        if dropped := self.progress_limit.should_warn(device, now):
            log.warning(
                "rejected from %s: progress_rate_limited: %d report(s) over %g/s dropped",
                device,
                dropped,
                self.progress_limit.rate,
                extra=_about(device),
            )
        return False

    async def device_connected(self, device: DeviceRef) -> None:
        """The device's session is up: record it online and hand it any pending notice."""
        try:
            async with self._device_lock(device):
                if not await self._exists(device):
                    return
                await self.repo.set_online(device, True, self.clock())
                for task in await self.repo.unfinished_tasks_of_device(device):
                    if task.state is TaskState.QUEUED and not await self._dispatch_now(task):
                        continue  # its job's dispatcher notifies it when its turn comes
                    await self._drive(task, DeviceAvailable(self._session_start(device)))
        except Exception:
            log.exception("failed to handle the connection of %s", device, extra=_about(device))

    async def device_disconnected(self, device: DeviceRef) -> None:
        try:
            async with self._device_lock(device):
                if await self._exists(device):
                    await self.repo.set_online(device, False, self.clock())
        except Exception:
            log.exception("failed to handle the disconnection of %s", device, extra=_about(device))

    def _session_start(self, device: DeviceRef) -> float:
        started = self.channel.session_started_at(device)
        return self.clock() if started is None else started

    async def _exists(self, device: DeviceRef) -> bool:
        if device in self._existing:
            return True
        if device in self._absent:
            return False
        if await self.repo.find_device(device) is None:
            if len(self._absent) >= 100_000:
                self._absent.clear()
            self._absent.add(device)
            return False
        self._existing.add(device)
        return True

    def _registered(self, device: DeviceRef) -> None:
        self._absent.discard(device)
        self._existing.add(device)

    async def _known(self, device: DeviceRef, kind: str) -> bool:
        if await self._exists(device):
            return True
        if self.auto_register and kind == "inform":
            if await self.repo.ensure_device(device, self.clock()):
                log.info("registered %s on its first inform", device, extra=_about(device))
            self._registered(device)
            await self.repo.set_online(device, self.channel.is_online(device), self.clock())
            return True
        self.reject(device, "unknown_device", f"{kind} from a device that is not registered")
        return False

    async def _on_inform(self, device: DeviceRef, msg: messages.Inform) -> None:
        if not await self._known(device, "inform"):
            return
        await self.repo.record_version(device, msg.module, msg.version, self.clock())
        log.info("%s informed %s version %s", device, msg.module, msg.version, extra=_about(device))
        task = await self.repo.unfinished_task(device, msg.module)
        if task is None:
            await self._match_dynamic_jobs(device, msg.module, msg.version)
            task = await self.repo.unfinished_task(device, msg.module)
        if task is None:
            return
        if (
            task.state is TaskState.QUEUED
            and msg.version != task.target_version
            and not await self._dispatch_now(task)
        ):
            return
        await self._drive(task, VersionReported(msg.version, self.channel.session_started_at(device)))

    async def _on_progress(self, device: DeviceRef, msg: messages.Progress) -> None:
        if not await self._known(device, "progress"):
            return
        task = await self.repo.unfinished_task(device, msg.module)
        if task is None:
            self.reject(
                device, "progress_without_task", f"progress {msg.step} for module {msg.module}, no task"
            )
            return
        await self._drive(task, ProgressReported(msg.step, msg.desc))

    async def _on_pull(self, device: DeviceRef, module: str, reply: PullReply) -> None:
        if not await self._known(device, "pull"):
            return
        task = await self.repo.unfinished_task(device, module)
        if (
            task is not None
            and task.state in PENDING
            and (task.state is not TaskState.QUEUED or await self._dispatch_now(task, pulled=True))
        ):
            await self._drive(task, FirmwareRequested(), reply=reply)
        elif reply.kind is TopicKind.FIRMWARE_GET_REPLY:
            await self.channel.send(
                device, topic_name(reply.kind, device), messages.get_reply(reply.request_id, {})
            )

    # --------------------------------------------------------------------------- driving the core

    async def _drive(self, task: Task, event: Event, *, reply: PullReply | None = None) -> Task:
        """Apply `event` to `task` through the core, store the result (compare-and-set, reloading on a
        conflict) and carry out its effects. Notices are built before the state is stored, so a task is
        never recorded as notified for a notice that could not be made."""
        for _ in range(_CAS_RETRIES):
            now = self.clock()
            try:
                decision = machine.apply(task, event, now)
            except machine.IllegalTransition as e:
                log.info("%s: task %d ignored %s", task.device, task.id, e, extra=_about(task.device))
                return task
            outgoing = [await self._notice(decision.task, effect, reply, now) for effect in decision.effects]
            saved = task
            if decision.task != task:
                stored = await self.repo.save_task(decision.task, decision.note or decision.task.state)
                if stored is None:
                    task = await self.repo.get_task(task.id)
                    continue
                saved = stored
                if saved.state not in DOWNLOADABLE:
                    self._download_grants.pop((saved.firmware_id, saved.device), None)
                    self._streams.pop(saved.id, None)
                if decision.note:
                    log.info(
                        "%s: task %d %s -> %s (%s)",
                        task.device,
                        task.id,
                        task.state,
                        saved.state,
                        decision.note,
                        extra=_about(task.device),
                    )
            for topic, payload in outgoing:
                delivered = await self.channel.send(saved.device, topic, payload)
                pushed = topic.startswith("/ota/device/upgrade/")
                if delivered:
                    self.notices_sent["push" if pushed else "pull"] += 1
                elif pushed:
                    log.info(
                        "%s: offline; the notice waits for its next connect",
                        saved.device,
                        extra=_about(saved.device),
                    )
            return saved
        log.error(
            "%s: task %d kept changing under %s; gave up",
            task.device,
            task.id,
            type(event).__name__,
            extra=_about(task.device),
        )
        return task

    async def _notice(
        self, task: Task, effect: SendNotice, reply: PullReply | None, now: float
    ) -> tuple[str, bytes]:
        """The topic and payload that carry out `effect`: a push notice, or the answer to a pull."""
        firmware = await self._firmware(task.firmware_id)
        job = await self._job_facts(task.job_id)
        device = task.device
        if job.protocol is DownloadProtocol.MQTT:
            data = messages.mqtt_notice_data(firmware, task.id, job.tags)  # the stream is the task
        else:
            links = [
                self.signer.mint(resource_of(firmware.id, i), str(device), now, blob=f.sha256)
                for i, f in enumerate(firmware.package)
            ]
            data = messages.notice_data(firmware, links, job.tags)
        if effect.delivery is Delivery.REPLY and reply is not None:
            if reply.kind is TopicKind.FIRMWARE_GET_REPLY:
                return topic_name(reply.kind, device), messages.get_reply(reply.request_id, data)
            return topic_name(reply.kind, device), messages.push_notice(int(now * 1000), data)
        return topic_name(TopicKind.UPGRADE, device), messages.push_notice(int(now * 1000), data)

    async def _firmware(self, firmware_id: int) -> Firmware:
        firmware = self._firmware_cache.get(firmware_id)
        if firmware is None:
            firmware = self._firmware_cache[firmware_id] = await self.repo.get_firmware(firmware_id)
        return firmware

    async def _job_facts(self, job_id: int) -> _JobFacts:
        """What a notice needs of its job (fixed once the job exists)."""
        facts = self._job_cache.get(job_id)
        if facts is None:
            options = (await self.repo.get_job(job_id)).options
            facts = self._job_cache[job_id] = _JobFacts(dict(options.tags), options.download_protocol)
        return facts

    # ------------------------------------------------------------------------- firmware over MQTT

    async def _on_block_request(self, device: DeviceRef, payload: bytes) -> None:
        """A block of a firmware file over MQTT (`thing/file/download`): read from the stored blob and
        sent on `download_reply`, paced to `mqtt_download_bytes_per_second` per device (the device's
        connection waits meanwhile); a request that cannot be served gets an error reply (code != 200)
        and is counted. Never raises."""
        try:
            answer, blob = await self._block(device, payload)
            cost = answer.size if isinstance(answer, blocks.Block) else _REFUSED_BLOCK_COST
            wait = self.block_pacer.reserve(device, self.clock(), cost)
            if wait > 0:
                await asyncio.sleep(wait)
            if isinstance(answer, blocks.Block):
                assert blob is not None
                data = await self.store.read(blob, answer.offset, answer.size)
                if data is not None and len(data) == answer.size:
                    await self._send_block(device, blocks.reply_frame(answer, data))
                    return
                log.error(
                    "%s: firmware file %s cannot be served over MQTT: the stored blob is damaged",
                    device,
                    blob.sha256[:12],
                    extra=_about(device),
                )
                answer = blocks.Rejection(
                    blocks.ReplyCode.UNAVAILABLE, "the file is not available", answer.request_id
                )
            self.reject(device, f"file_download_{answer.code.name.lower()}", answer.msg)
            await self._send_block(device, blocks.error_frame(answer))
        except Exception:
            self.rejected["internal_error"] += 1
            log.exception("failed to serve a firmware block to %s", device, extra=_about(device))

    async def _block(
        self, device: DeviceRef, payload: bytes
    ) -> tuple[blocks.Block | blocks.Rejection, Blob | None]:
        request = blocks.parse_request(payload)
        if isinstance(request, blocks.Rejection):
            return request, None
        found = await self._stream(request.stream_id)
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

    async def _stream(self, stream_id: int) -> tuple[Task, Firmware] | None:
        """The task whose package stream `stream_id` is (its id), while it may be downloaded over MQTT. A
        yes is remembered for `DOWNLOAD_GRANT_S`, so a download's thousands of blocks cost few reads; the
        task's own state change forgets it at once."""
        now = self.clock()
        cached = self._streams.get(stream_id)
        if cached is None or cached[1] <= now:
            try:
                task = await self.repo.get_task(stream_id)
            except NotFound:
                return None
            if task.state not in DOWNLOADABLE:
                return None
            if len(self._streams) > 100_000:
                self._streams = {k: v for k, v in self._streams.items() if v[1] > now}
            cached = self._streams[stream_id] = (task, now + DOWNLOAD_GRANT_S)
        task = cached[0]
        if (await self._job_facts(task.job_id)).protocol is not DownloadProtocol.MQTT:
            return None
        return task, await self._firmware(task.firmware_id)

    async def _send_block(self, device: DeviceRef, frame: bytes) -> None:
        await self.channel.send(device, topic_name(TopicKind.FILE_DOWNLOAD_REPLY, device), frame, qos=0)

    async def _drive_by_id(self, task_id: int, event: Event) -> None:
        task = await self.repo.get_task(task_id)
        async with self._device_lock(task.device):
            await self._drive(task, event)  # changed meanwhile: the compare-and-set reloads it

    async def tick(self) -> None:
        """Apply time: timeouts, then one step of every running job (and the end of paused ones)."""
        now = self.clock()
        for task in await self.repo.overdue_tasks(now):
            await self._drive_by_id(task.id, Ticked())  # the core decides; the query only narrows
        self.progress_limit.forget_idle(now)
        for job in await self.repo.jobs_in_states(JobState.RUNNING, JobState.PAUSED):
            try:
                if job.stored_state is JobState.RUNNING:
                    await self._advance_job(job, now)
                elif job.end_at is not None and now >= job.end_at:
                    await self._end_job(job, now)  # a paused job still ends on time
            except Exception:
                log.exception("job %d: periodic step failed", job.id)

    # ------------------------------------------------------------------------------ operator calls

    async def add_device(self, device: DeviceRef, secret: str | None) -> DeviceRecord:
        record = await self.repo.add_device(device, secret or new_device_secret(), self.clock())
        self._registered(device)
        log.info("device %s registered", device, extra=_about(device))
        return record

    async def set_device_enabled(self, device: DeviceRef, enabled: bool) -> DeviceRecord:
        await self.repo.set_enabled(device, enabled)
        log.info("device %s %s", device, "enabled" if enabled else "disabled", extra=_about(device))
        if not enabled:
            await self.channel.disconnect(device)
        return await self.repo.get_device(device)

    async def rotate_secret(self, device: DeviceRef, secret: str | None) -> str:
        new = secret or new_device_secret()
        await self.repo.set_secret(device, new)
        log.info("device %s has a new secret; its connections are closed", device, extra=_about(device))
        await self.channel.disconnect(device)
        return new

    async def delete_device(self, device: DeviceRef) -> None:
        await self.repo.delete_device(device)
        self._existing.discard(device)
        log.info("device %s deleted", device, extra=_about(device))
        await self.channel.disconnect(device)

    async def import_devices(self, text: str) -> ImportResult:
        """Register devices from CSV rows `product_key,device_name[,device_secret]` (plugins.ota.core.device_csv)."""
        parsed = parse_devices(text)
        errors = parsed.errors
        rows = [(r.device, r.secret or new_device_secret()) for r in parsed.devices]
        created = set(await self.repo.add_devices(rows, self.clock()))
        for ref, _ in rows:
            self._registered(ref)
        log.info(
            "imported %d device(s); %d existed; %d line(s) refused",
            len(created),
            len(rows) - len(created),
            len(errors),
        )
        return ImportResult([(r, s) for r, s in rows if r in created], len(rows) - len(created), errors)

    async def add_firmware(
        self,
        package: Blob | Sequence[tuple[str, Blob]],
        *,
        product_key: str,
        version: str,
        module: str,
        sign_method: SignMethod,
        src_version: str | None,
        description: str,
        verify: bool = False,
    ) -> Firmware:
        """Record uploaded blobs as firmware: one file, or a package of (file name, blob) in order; the caller
        discards the blobs if this raises. Firmware uploaded with `verify` must pass a verify job before batch
        jobs take it (as Aliyun's NeedToVerify)."""
        files = [("", package)] if isinstance(package, Blob) else list(package)
        if not 1 <= len(files) <= MAX_PACKAGE_FILES:
            raise InvalidInput("file", f"give 1 to {MAX_PACKAGE_FILES} files")
        for name, blob in files:
            if blob.size == 0:
                raise InvalidInput("file", f"{name or 'the firmware file'} is empty")
        if len(files) > 1:
            for name, _ in files:
                if not FILE_NAME.fullmatch(name):
                    raise InvalidInput("file", f"file name {name[:80]!r}: {FILE_NAME_RULE}")
            if len({name for name, _ in files}) != len(files):
                raise InvalidInput("file", "the files of a package need different names")
        main = files[0][1]
        firmware = await self.repo.add_firmware(
            product_key=product_key,
            module=module,
            version=version,
            src_version=src_version,
            size=main.size,
            md5=main.md5,
            sha256=main.sha256,
            sign_method=sign_method,
            description=description,
            now=self.clock(),
            status=FirmwareStatus.UNVERIFIED if verify else FirmwareStatus.NO_VERIFY_NEEDED,
            files=[FirmwareFile(n, b.size, b.md5, b.sha256) for n, b in files] if len(files) > 1 else (),
        )
        log.info(
            "firmware %d added: %s/%s %s, %d file(s), %d bytes",
            firmware.id,
            product_key,
            module,
            version,
            len(files),
            sum(b.size for _, b in files),
        )
        return firmware

    async def discard_upload(self, blob: Blob) -> None:
        """Drop an uploaded blob that did not become firmware (unless other firmware shares it)."""
        await self._drop_blob_if_unused(blob)

    async def _drop_blob_if_unused(self, blob: Blob) -> None:
        if not await self.repo.blob_in_use(blob.sha256):
            await self.store.delete(blob.sha256)

    async def delete_firmware(self, firmware_id: int) -> None:
        firmware = await self.repo.delete_firmware(firmware_id)
        self._firmware_cache.pop(firmware_id, None)
        for file in firmware.package:
            await self._drop_blob_if_unused(Blob(file.sha256, file.md5, file.size))
        log.info("firmware %d deleted", firmware_id)

    async def create_job(self, spec: JobSpec) -> JobRecord:
        firmware = await self.repo.find_firmware(spec.firmware_id)
        if firmware is None:
            raise InvalidInput("firmware_id", f"firmware {spec.firmware_id} does not exist")
        await self._check_firmware_for(firmware, spec)
        candidates = await self._candidates(firmware, spec.devices)
        seed = f"{firmware.id}:{self.clock()}"
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
        self.spawn(self._advance_job_by_id(job_id), f"starting job {job_id}")
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
                await self._drive_by_id(task.id, CancelRequested(f"overwritten by job {job_id}"))

    async def _candidates(
        self, firmware: Firmware, devices: Sequence[DeviceRef] | None
    ) -> list[machine.Candidate]:
        if devices is None:
            records = await self.repo.list_devices(product_key=firmware.product_key, limit=1_000_000)
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

    # ------------------------------------------------------------------------------ running jobs

    async def _dispatch_now(self, task: Task, *, pulled: bool = False) -> bool:
        """May this queued task be notified now, outside its job's dispatcher (see the core's rule)?"""
        job = await self.repo.get_job(task.job_id)
        state = machine.job_state(job.stored_state, job.counts, schedule_at=job.schedule_at, now=self.clock())
        paced = bool(job.options.rate_per_minute)
        return machine.may_notify_queued(state, task.group_no, job.current_group, paced=paced, pulled=pulled)

    async def _advance_job_by_id(self, job_id: int) -> None:
        job = await self.repo.get_job(job_id)
        if job.stored_state is JobState.RUNNING:
            await self._advance_job(job, self.clock())

    async def _advance_job(self, job: JobRecord, now: float) -> None:
        """One step of a running job: start, end, phase and pause decisions, then notices for the tasks
        whose turn it is (paced by `rate_per_minute`), then completion."""
        if job.schedule_at is not None and now < job.schedule_at:
            return
        if job.end_at is not None and now >= job.end_at:
            await self._end_job(job, now)
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
            await self._finish_job(job, now)

    async def _end_job(self, job: JobRecord, now: float) -> None:
        for task in await self.repo.tasks_of_job(job.id, UNFINISHED):
            await self._drive_by_id(task.id, CancelRequested("the job reached its end time"))
        await self._finish_job(await self.repo.get_job(job.id), now)

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
        if pacer is not None:
            for task in due:
                if not pacer.allow(job.id, self.clock()):
                    return  # the rest by a later step
                await self._notify(task)
            return
        # Unpaced: many devices at once, so one notice's database round trips overlap the others'.
        for start in range(0, len(due), _DISPATCH_BATCH):
            await asyncio.gather(*(self._notify(task) for task in due[start : start + _DISPATCH_BATCH]))

    async def _notify(self, task: Task) -> None:
        async with self._device_lock(task.device):  # changed meanwhile: the compare-and-set reloads it
            await self._drive(task, DeviceAvailable(self._session_start(task.device)))

    async def _finish_job(self, job: JobRecord, now: float) -> None:
        self._job_pacers.pop(job.id, None)
        # Only a running job completes: an operator's cancel may have come in while this step ran.
        unfinished = (JobState.RUNNING, JobState.PAUSED)
        if not await self.repo.update_job(job.id, now, state=JobState.COMPLETED, only_from=unfinished):
            return
        if job.type is JobType.VERIFY:
            status = machine.verify_outcome(job.counts)
            await self.repo.set_firmware_status(job.firmware_id, status)
            log.info("firmware %d: %s by job %d", job.firmware_id, status, job.id)
        log.info("job %d completed", job.id)

    async def _match_dynamic_jobs(self, device: DeviceRef, module: str, version: str) -> None:
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
                log.info("%s joined dynamic job %d", device, job.id, extra=_about(device))
                return

    # ------------------------------------------------------------------------------ job controls

    async def cancel_job(self, job_id: int, states: Sequence[TaskState] | None = None) -> JobRecord:
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
            await self._drive_by_id(task.id, CancelRequested())
        log.info("job %d: cancelled tasks in %s", job_id, ", ".join(sorted(wanted)))
        return await self.repo.get_job(job_id)

    async def cancel_task(self, job_id: int, device: DeviceRef) -> Task:
        task = await self.repo.job_task_of_device(job_id, device)
        if task is None:
            raise NotFound(f"job {job_id} has no task for {device}")
        if task.state.terminal:
            raise Conflict(f"the task of {device} is {task.state}; there is nothing to cancel")
        await self._drive_by_id(task.id, CancelRequested())
        return await self.repo.get_task(task.id)

    async def pause_job(self, job_id: int) -> JobRecord:
        job = await self.repo.get_job(job_id)
        if job.stored_state is not JobState.RUNNING:
            raise Conflict(f"job {job_id} is {job.stored_state}; only a running job can be paused")
        await self.repo.update_job(
            job_id, self.clock(), state=JobState.PAUSED, pause_reason="paused by operator"
        )
        return await self.repo.get_job(job_id)

    async def resume_job(self, job_id: int) -> JobRecord:
        job = await self.repo.get_job(job_id)
        if job.stored_state is not JobState.PAUSED:
            raise Conflict(f"job {job_id} is {job.stored_state}; only a paused job can be resumed")
        failed = sum(job.counts.get(s, 0) for s in (TaskState.FAILED, TaskState.TIMED_OUT))
        options = replace(job.options, acknowledged_failures=failed)
        await self.repo.update_job(
            job_id, self.clock(), state=JobState.RUNNING, pause_reason="", options=options
        )
        self.spawn(self._advance_job_by_id(job_id), f"resuming job {job_id}")
        return await self.repo.get_job(job_id)

    async def confirm_tasks(self, job_id: int, devices: Sequence[DeviceRef] | None) -> JobRecord:
        await self.repo.get_job(job_id)
        for task in await self.repo.tasks_of_job(job_id, [TaskState.CONFIRM]):
            if devices is None or task.device in devices:
                await self._drive_by_id(task.id, Confirmed())
        self.spawn(self._advance_job_by_id(job_id), f"dispatching job {job_id}")
        return await self.repo.get_job(job_id)

    async def rerun_failed(self, job_id: int) -> JobRecord:
        """Queue the job's failed and timed-out tasks again (devices busy elsewhere stay as they are)."""
        job = await self.repo.get_job(job_id)
        if job.stored_state is JobState.CANCELLED:
            raise Conflict(f"job {job_id} is cancelled")
        rerun = 0
        for task in await self.repo.tasks_of_job(job_id, [TaskState.FAILED, TaskState.TIMED_OUT]):
            if await self.repo.unfinished_task(task.device, task.module) is None:
                await self._drive_by_id(task.id, RerunRequested())
                rerun += 1
        if rerun:
            # Failures re-run are no longer failures the operator acknowledged by resuming.
            acknowledged = max(job.options.acknowledged_failures - rerun, 0)
            options = replace(job.options, acknowledged_failures=acknowledged)
            await self.repo.update_job(
                job_id, self.clock(), state=JobState.RUNNING, pause_reason="", options=options
            )
            self.spawn(self._advance_job_by_id(job_id), f"re-running job {job_id}")
        log.info("job %d: %d task(s) re-run", job_id, rerun)
        return await self.repo.get_job(job_id)

    # ------------------------------------------------------------------------- download questions

    async def resolve_blob(self, resource: str) -> Blob | None:
        """The blob a download link's resource names: a firmware's file (`resource_of`)."""
        parsed = parse_resource(resource)
        if parsed is None:
            return None
        firmware_id, index = parsed
        firmware = self._firmware_cache.get(firmware_id)
        if firmware is None:
            firmware = await self.repo.find_firmware(firmware_id)
            if firmware is None:
                return None
            self._firmware_cache[firmware.id] = firmware
        if index >= len(firmware.package):
            return None
        file = firmware.package[index]
        return Blob(file.sha256, file.md5, file.size)

    async def may_download(self, resource: str, subject: str) -> bool:
        """Whether `subject` has a task for the firmware of `resource` it may download now. A yes is
        remembered for `DOWNLOAD_GRANT_S`, so the Range requests of one download cost one database read."""
        now = self.clock()
        parsed = parse_resource(resource)
        try:
            device = DeviceRef.parse(subject)
        except ValueError:
            return False
        if parsed is None:
            return False
        key = (parsed[0], device)
        if self._download_grants.get(key, 0.0) > now:
            return True
        if not await self.repo.may_download(parsed[0], device):
            return False
        if len(self._download_grants) > 100_000:
            self._download_grants = {k: t for k, t in self._download_grants.items() if t > now}
        self._download_grants[key] = now + DOWNLOAD_GRANT_S
        return True


@dataclass(frozen=True, slots=True)
class _JobFacts:
    tags: dict[str, str]
    protocol: DownloadProtocol


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


def _about(device: DeviceRef | str) -> dict[str, str]:
    """The `extra` of a log record about a device: structured logs carry it as the `device` field."""
    return {"device": str(device)} if isinstance(device, DeviceRef) else {}
