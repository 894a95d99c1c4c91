"""The OTA core: the task state machine, the success rule and the re-notify rules.

Pure: no asyncio, no amqtt, no SQL, no clock calls. `apply(task, event, now)` takes one event and the
current time and returns a `Decision`: the task's new snapshot and the effects to carry out. An event
that the table does not allow in the task's state raises `IllegalTransition` and changes nothing.

The table `TRANSITIONS` is the single source of truth: `docs/design.md`'s diagram is generated from it
(`python -m plugins.ota.machine`).

Rules (SPEC §3):
- success is decided only by the version the device informs for the task's module;
- a device that reported progress and then informs any other version has failed ("version mismatch");
  100 % progress alone is not success;
- a device that informs a non-target version before any progress gets the notice again;
- a device that connects (or pulls) while its task is queued or notified gets the notice; no notice is
  pushed again while the task is in progress, nor twice to the same MQTT session;
- progress steps 0..100 are percentages, -1..-4 failures; the timeout runs from the first progress report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from plugins.ota.model import (
    UNFINISHED,
    Firmware,
    JobState,
    SkipReason,
    Task,
    TaskState,
)
from plugins.ota.topics import DeviceRef

FAILURE_STEPS: Mapping[int, str] = {
    -1: "upgrade failed",
    -2: "download failed",
    -3: "verification failed",
    -4: "flash failed",
}
DESC_MAX = 128


# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class DeviceAvailable:
    """The device is connected: it just connected, or a job started while it was online.

    `session_started_at` is when its current MQTT session began: a session that already had the notice
    does not get it twice."""

    session_started_at: float


@dataclass(frozen=True, slots=True)
class FirmwareRequested:
    """The device pulled (`thing/ota/firmware/get` or the legacy request topic)."""


@dataclass(frozen=True, slots=True)
class VersionReported:
    version: str
    session_started_at: float | None = None


@dataclass(frozen=True, slots=True)
class ProgressReported:
    step: int
    desc: str = ""


@dataclass(frozen=True, slots=True)
class CancelRequested:
    reason: str = "cancelled by operator"


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The operator confirmed a task that waited in `confirm`."""


@dataclass(frozen=True, slots=True)
class Ticked:
    """Time passed; timeouts are checked against `now`."""


Event = (
    DeviceAvailable
    | FirmwareRequested
    | VersionReported
    | ProgressReported
    | CancelRequested
    | Confirmed
    | Ticked
)


class Delivery(StrEnum):
    PUSH = "push"
    REPLY = "reply"


@dataclass(frozen=True, slots=True)
class SendNotice:
    """Send the task's upgrade notice to its device: pushed, or as the reply to the device's pull."""

    delivery: Delivery


Effect = SendNotice


@dataclass(frozen=True, slots=True)
class Decision:
    task: Task
    effects: tuple[Effect, ...] = ()
    note: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.note)


class IllegalTransition(Exception):
    """The event is not allowed in the task's current state; nothing changed."""

    def __init__(self, state: TaskState, event: Event) -> None:
        super().__init__(f"{type(event).__name__} is not allowed in state {state}")
        self.state = state
        self.event = event


# ----------------------------------------------------------------------------------------- transitions

Decide = Callable[[Task, Event, float], Decision]


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: the states it may lead to (for the diagram) and the decision."""

    targets: tuple[TaskState, ...]
    decide: Decide


def _session_had_notice(task: Task, session_started_at: float | None) -> bool:
    return (
        session_started_at is not None
        and task.noticed_at is not None
        and task.noticed_at >= session_started_at
    )


def _notify(task: Task, event: Event, now: float) -> Decision:
    first = task.state is TaskState.QUEUED
    if (
        not first
        and isinstance(event, DeviceAvailable | VersionReported)
        and _session_had_notice(task, event.session_started_at)
    ):
        return Decision(task)
    new = replace(
        task,
        state=TaskState.NOTIFIED,
        attempts=task.attempts + 1 if first else task.attempts,
        notified_at=now if first else task.notified_at,
        noticed_at=now,
        updated_at=now,
    )
    return Decision(new, (SendNotice(Delivery.PUSH),), "notified" if first else "notice sent again")


def _reply(task: Task, _event: Event, now: float) -> Decision:
    if task.state is TaskState.QUEUED:
        new = replace(
            task,
            state=TaskState.NOTIFIED,
            attempts=task.attempts + 1,
            notified_at=now,
            noticed_at=now,
            updated_at=now,
        )
        return Decision(new, (SendNotice(Delivery.REPLY),), "notified (pulled)")
    return Decision(replace(task, noticed_at=now), (SendNotice(Delivery.REPLY),), "pulled: notice sent")


def _ignore(task: Task, _event: Event, _now: float) -> Decision:
    return Decision(task)


def _version_before_progress(task: Task, event: Event, now: float) -> Decision:
    assert isinstance(event, VersionReported)
    if event.version == task.target_version:
        return _finish(task, TaskState.SUCCEEDED, f"informed {event.version}", now)
    decision = _notify(task, event, now)
    if not decision.effects:
        return decision
    return replace(decision, note=f"informed {event.version} before any progress: notice sent")


def _version_in_progress(task: Task, event: Event, now: float) -> Decision:
    assert isinstance(event, VersionReported)
    if event.version == task.target_version:
        return _finish(task, TaskState.SUCCEEDED, f"informed {event.version}", now)
    return _finish(
        task,
        TaskState.FAILED,
        f"version mismatch: informed {event.version}, expected {task.target_version}",
        now,
    )


def _progress(task: Task, event: Event, now: float) -> Decision:
    assert isinstance(event, ProgressReported)
    desc = event.desc[:DESC_MAX]
    if event.step < 0:
        reason = FAILURE_STEPS.get(event.step, f"step {event.step}")
        return _finish(
            task, TaskState.FAILED, f"{reason}: {desc}" if desc else reason, now, progress=task.progress
        )
    if task.state is TaskState.IN_PROGRESS and event.step == task.progress and desc == task.desc:
        return Decision(task)  # the same report twice is a no-op
    new = replace(
        task,
        state=TaskState.IN_PROGRESS,
        progress=event.step,
        desc=desc,
        started_at=task.started_at if task.started_at is not None else now,
        updated_at=now,
    )
    return Decision(new, (), f"progress {event.step}%")


def _cancel(task: Task, event: Event, now: float) -> Decision:
    assert isinstance(event, CancelRequested)
    return _finish(task, TaskState.CANCELLED, event.reason, now)


def _confirm(task: Task, _event: Event, now: float) -> Decision:
    return Decision(replace(task, state=TaskState.QUEUED, updated_at=now), (), "confirmed")


def _tick(task: Task, _event: Event, now: float) -> Decision:
    if task.timeout_s is None or task.started_at is None or now < task.started_at + task.timeout_s:
        return Decision(task)
    minutes = task.timeout_s / 60
    return _finish(
        task, TaskState.TIMED_OUT, f"no success {minutes:g} min after the first progress report", now
    )


def _finish(task: Task, state: TaskState, desc: str, now: float, *, progress: int | None = None) -> Decision:
    new = replace(
        task,
        state=state,
        desc=desc[:DESC_MAX] if state is not TaskState.SUCCEEDED else desc,
        progress=100 if state is TaskState.SUCCEEDED else (task.progress if progress is None else progress),
        updated_at=now,
    )
    return Decision(new, (), desc)


_S = TaskState
TRANSITIONS: Mapping[tuple[TaskState, type], Rule] = {
    (_S.CONFIRM, Confirmed): Rule((_S.QUEUED,), _confirm),
    (_S.CONFIRM, CancelRequested): Rule((_S.CANCELLED,), _cancel),
    (_S.QUEUED, DeviceAvailable): Rule((_S.NOTIFIED,), _notify),
    (_S.QUEUED, FirmwareRequested): Rule((_S.NOTIFIED,), _reply),
    (_S.QUEUED, VersionReported): Rule((_S.SUCCEEDED, _S.NOTIFIED), _version_before_progress),
    (_S.QUEUED, CancelRequested): Rule((_S.CANCELLED,), _cancel),
    (_S.QUEUED, Ticked): Rule((), _ignore),
    (_S.NOTIFIED, DeviceAvailable): Rule((_S.NOTIFIED,), _notify),
    (_S.NOTIFIED, FirmwareRequested): Rule((), _reply),
    (_S.NOTIFIED, VersionReported): Rule((_S.SUCCEEDED, _S.NOTIFIED), _version_before_progress),
    (_S.NOTIFIED, ProgressReported): Rule((_S.IN_PROGRESS, _S.FAILED), _progress),
    (_S.NOTIFIED, CancelRequested): Rule((_S.CANCELLED,), _cancel),
    (_S.NOTIFIED, Ticked): Rule((), _ignore),
    (_S.IN_PROGRESS, DeviceAvailable): Rule((), _ignore),
    (_S.IN_PROGRESS, FirmwareRequested): Rule((), _reply),
    (_S.IN_PROGRESS, VersionReported): Rule((_S.SUCCEEDED, _S.FAILED), _version_in_progress),
    (_S.IN_PROGRESS, ProgressReported): Rule((_S.IN_PROGRESS, _S.FAILED), _progress),
    (_S.IN_PROGRESS, CancelRequested): Rule((_S.CANCELLED,), _cancel),
    (_S.IN_PROGRESS, Ticked): Rule((_S.TIMED_OUT,), _tick),
}


def apply(task: Task, event: Event, now: float) -> Decision:
    """Decide what `event` does to `task` at time `now`; raises IllegalTransition when not allowed."""
    rule = TRANSITIONS.get((task.state, type(event)))
    if rule is None:
        raise IllegalTransition(task.state, event)
    return rule.decide(task, event, now)


# --------------------------------------------------------------------------------------------- jobs


def job_state(stored: JobState, counts: Mapping[TaskState, int]) -> JobState:
    """A job's state, derived from its stored state and its tasks' counts per state."""
    if stored is not JobState.RUNNING:
        return stored
    return JobState.RUNNING if any(counts.get(s, 0) for s in UNFINISHED) else JobState.COMPLETED


@dataclass(frozen=True, slots=True)
class Candidate:
    """A device a new job may target, with what the planner needs to know about it."""

    device: DeviceRef
    current_version: str | None
    busy: bool
    listed: bool  # named explicitly by the operator (as opposed to matched by product)


@dataclass(frozen=True, slots=True)
class PlannedTask:
    device: DeviceRef
    state: TaskState
    desc: str = ""


def plan_tasks(
    firmware: Firmware,
    candidates: Iterable[Candidate],
    *,
    src_versions: Sequence[str] = (),
    need_confirm: bool = False,
) -> list[PlannedTask]:
    """The tasks a new job creates: one per matched device, queued or skipped with a reason.

    Devices matched by product (not listed) whose version the job does not take are left out; listed
    ones are recorded as skipped so the operator sees why.
    """
    wanted = set(src_versions)
    if firmware.src_version is not None:
        wanted = {firmware.src_version}
    start = TaskState.CONFIRM if need_confirm else TaskState.QUEUED
    planned: list[PlannedTask] = []
    for c in candidates:
        if wanted and c.current_version not in wanted:
            if c.listed:
                planned.append(PlannedTask(c.device, TaskState.SKIPPED, SkipReason.SRC_VERSION_MISMATCH))
            continue
        if c.current_version == firmware.version:
            planned.append(PlannedTask(c.device, TaskState.SKIPPED, SkipReason.ALREADY_ON_TARGET))
        elif c.busy:
            planned.append(PlannedTask(c.device, TaskState.SKIPPED, SkipReason.BUSY))
        else:
            planned.append(PlannedTask(c.device, start))
    return planned


# ------------------------------------------------------------------------------------------ diagram


def mermaid_diagram() -> str:
    """The state diagram of `TRANSITIONS`, as Mermaid text."""
    lines = ["stateDiagram-v2", "    [*] --> confirm", "    [*] --> queued", "    [*] --> skipped"]
    edges: dict[tuple[str, str], list[str]] = {}
    for (source, event_type), rule in TRANSITIONS.items():
        for target in rule.targets:
            edges.setdefault((source.value, target.value), []).append(event_type.__name__)
    for (src, dst), names in edges.items():
        lines.append(f"    {src} --> {dst}: {', '.join(names)}")
    lines.extend(f"    {s.value} --> [*]" for s in TaskState if s.terminal)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - documentation generator
    print(mermaid_diagram(), end="")
