"""Driving one task through the core: apply an event, store the result compare-and-set, send the notices
it calls for. Notices are built before the state is stored, so a task is never recorded as notified for a
notice that could not be made."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from firmware_store import LinkSigner
from plugins.ota.app.admission import Admission
from plugins.ota.app.catalog import Catalog
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.downloads import DownloadGate, resource_of
from plugins.ota.app.housekeeping import DeviceLocks, about
from plugins.ota.core import machine, messages
from plugins.ota.core.machine import Delivery, Event, SendNotice
from plugins.ota.core.model import DownloadProtocol, Task
from plugins.ota.core.topics import TopicKind
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")

_CAS_RETRIES = 16  # replicas handling one device's reports side by side conflict more often


@dataclass(frozen=True, slots=True)
class PullReply:
    """Where the answer to a pull goes: the get_reply topic with the request id, or the legacy topic."""

    kind: TopicKind
    request_id: messages.RequestId


class TaskDriver:
    def __init__(
        self,
        repo: Repository,
        catalog: Catalog,
        gate: DownloadGate,
        signer: LinkSigner,
        channel: DeviceChannel,
        locks: DeviceLocks,
        clock: Callable[[], float],
        admission: Admission,
    ) -> None:
        self.repo = repo
        self.admission = admission
        self.catalog = catalog
        self.gate = gate
        self.signer = signer
        self.channel = channel
        self.locks = locks
        self.clock = clock
        self.notices_sent: Counter[str] = Counter()  # notices handed to an online session: push, pull

    def session_start(self, task: Task) -> float:
        started = self.channel.session_started_at(task.device)
        return self.clock() if started is None else started

    async def drive_by_id(self, task_id: int, event: Event) -> None:
        task = await self.repo.get_task(task_id)
        async with self.locks.hold(task.device):
            await self.drive(task, event)  # changed meanwhile: the compare-and-set reloads it

    async def drive(self, task: Task, event: Event, *, reply: PullReply | None = None) -> Task:
        """Apply `event` to `task` through the core, store the result (compare-and-set, reloading on a
        conflict) and carry out its effects. The caller holds the device's lock."""
        for _ in range(_CAS_RETRIES):
            now = self.clock()
            try:
                decision = machine.apply(task, event, now)
            except machine.IllegalTransition as e:
                log.info("%s: task %d ignored %s", task.device, task.id, e, extra=about(task.device))
                return task
            outgoing = [await self._notice(decision.task, effect, reply, now) for effect in decision.effects]
            saved = task
            if decision.task != task:
                stored = await self.repo.save_task(decision.task, decision.note or decision.task.state)
                if stored is None:
                    task = await self.repo.get_task(task.id)
                    continue
                saved = stored
                self.gate.task_changed(saved)
                self.admission.task_changed(task, saved)
                if decision.note:
                    log.info(
                        "%s: task %d %s -> %s (%s)",
                        task.device,
                        task.id,
                        task.state,
                        saved.state,
                        decision.note,
                        extra=about(task.device),
                    )
            for message in outgoing:
                delivered = await self.channel.send(saved.device, message)
                if delivered:
                    self.notices_sent["push" if message.is_push else "pull"] += 1
                elif message.is_push:
                    log.info(
                        "%s: offline; the notice waits for its next connect",
                        saved.device,
                        extra=about(saved.device),
                    )
            return saved
        log.error(
            "%s: task %d kept changing under %s; gave up",
            task.device,
            task.id,
            type(event).__name__,
            extra=about(task.device),
        )
        return task

    async def _notice(
        self, task: Task, effect: SendNotice, reply: PullReply | None, now: float
    ) -> messages.Outgoing:
        """The message that carries out `effect`: a push notice, or the answer to a pull."""
        firmware = await self.catalog.firmware(task.firmware_id)
        job = await self.catalog.job_facts(task.job_id)
        if job.protocol is DownloadProtocol.MQTT:
            data = messages.mqtt_notice_data(firmware, task.id, job.tags)  # the stream is the task
        else:
            links = [
                self.signer.mint(resource_of(firmware.id, i), str(task.device), now, blob=f.sha256)
                for i, f in enumerate(firmware.package)
            ]
            data = messages.notice_data(firmware, links, job.tags)
        if effect.delivery is Delivery.REPLY and reply is not None:
            return messages.pull_answer(reply.kind, reply.request_id, int(now * 1000), data)
        return messages.upgrade_notice(int(now * 1000), data)
