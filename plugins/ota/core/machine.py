"""The OTA core: the task state machine, the success rule and the re-notify rules.

Pure: no asyncio, no amqtt, no SQL, no clock calls. `apply(task, event, now)` takes one event and the
current time and returns a `Decision`: the task's new snapshot and the effects to carry out. An event
that the table does not allow in the task's state raises `IllegalTransition` and changes nothing.

The table `TRANSITIONS` is the single source of truth: `docs/design.md`'s diagram is generated from it
(`python -m plugins.ota.core.machine`).

Rules:
- success is decided only by the version the device informs for the task's module;
- a device that reported progress and then informs any other version has failed ("version mismatch");
  100 % progress alone is not success;
- a device that informs a non-target version before any progress gets the notice again;
- a device that connects (or pulls) while its task is queued or notified gets the notice; no notice is
  pushed again while the task is in progress, nor twice to the same MQTT session;
- progress steps 0..100 are percentages, -1..-4 failures; the timeout runs from the first progress report,
  and a notified task with no progress report times out `notify_timeout_s` after its latest notice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from plugins.ota.core.model import (
    UNFINISHED,
    Firmware,
    FirmwareStatus,
    JobState,
    Rollout,
    SkipReason,
    Task,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef

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
class RerunRequested:
    """The operator re-runs a failed or timed-out task."""


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
    | RerunRequested
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
    if first and task.not_before is not None and now < task.not_before:
        return Decision(task)  # waiting for its retry interval
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
        not_before=None,
        updated_at=now,
    )
    return Decision(new, (SendNotice(Delivery.PUSH),), "notified" if first else "notice sent again")


def _reply(task: Task, _event: Event, now: float) -> Decision:
    """A pull is answered with the notice: the device asked, so a retry interval does not hold it back."""
    if task.state is TaskState.QUEUED:
        new = replace(
            task,
            state=TaskState.NOTIFIED,
            attempts=task.attempts + 1,
            notified_at=now,
            noticed_at=now,
            not_before=None,
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
    return _fail(task, f"version mismatch: informed {event.version}, expected {task.target_version}", now)


def _progress(task: Task, event: Event, now: float) -> Decision:
    assert isinstance(event, ProgressReported)
    desc = event.desc[:DESC_MAX]
    if event.step < 0:
        reason = FAILURE_STEPS.get(event.step, f"step {event.step}")
        return _fail(task, f"{reason}: {desc}" if desc else reason, now)
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


def _fail(task: Task, desc: str, now: float) -> Decision:
    """Failed: queued again after the retry interval while retries are left, else failed for good."""
    retries_used = max(task.attempts - 1, 0)
    if retries_used >= task.retry_count:
        return _finish(task, TaskState.FAILED, desc, now)
    note = f"{desc}; retry {retries_used + 1} of {task.retry_count}"
    new = replace(
        task,
        state=TaskState.QUEUED,
        desc=note[:DESC_MAX],
        progress=0,
        started_at=None,
        noticed_at=None,
        not_before=now + task.retry_interval_s,
        updated_at=now,
    )
    return Decision(new, (), note)


def _rerun(task: Task, _event: Event, now: float) -> Decision:
    new = replace(
        task,
        state=TaskState.QUEUED,
        desc="re-run by operator",
        progress=0,
        started_at=None,
        noticed_at=None,
        not_before=None,
        updated_at=now,
    )
    return Decision(new, (), "re-run by operator")


def _cancel(task: Task, event: Event, now: float) -> Decision:
    assert isinstance(event, CancelRequested)
    return _finish(task, TaskState.CANCELLED, event.reason, now)


def _confirm(task: Task, _event: Event, now: float) -> Decision:
    return Decision(replace(task, state=TaskState.QUEUED, updated_at=now), (), "confirmed")


def _tick(task: Task, _event: Event, now: float) -> Decision:
    """Timeouts: in progress, counted from the first progress report; notified, from the latest notice
    (a device that never answers a notice does not stay notified forever)."""
    if task.state is TaskState.NOTIFIED:
        limit, since, what = (
            task.notify_timeout_s,
            task.noticed_at,
            "no progress report {:g} min after the notice",
        )
    else:
        limit, since, what = (
            task.timeout_s,
            task.started_at,
            "no success {:g} min after the first progress report",
        )
    if limit is None or since is None or now < since + limit:
        return Decision(task)
    return _finish(task, TaskState.TIMED_OUT, what.format(limit / 60), now)


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
    (_S.NOTIFIED, ProgressReported): Rule((_S.IN_PROGRESS, _S.FAILED, _S.QUEUED), _progress),
    (_S.NOTIFIED, CancelRequested): Rule((_S.CANCELLED,), _cancel),
    (_S.NOTIFIED, Ticked): Rule((_S.TIMED_OUT,), _tick),
    (_S.IN_PROGRESS, DeviceAvailable): Rule((), _ignore),
    (_S.IN_PROGRESS, FirmwareRequested): Rule((), _reply),
    (_S.IN_PROGRESS, VersionReported): Rule((_S.SUCCEEDED, _S.FAILED, _S.QUEUED), _version_in_progress),
    (_S.IN_PROGRESS, ProgressReported): Rule((_S.IN_PROGRESS, _S.FAILED, _S.QUEUED), _progress),
    (_S.IN_PROGRESS, CancelRequested): Rule((_S.CANCELLED,), _cancel),
    (_S.IN_PROGRESS, Ticked): Rule((_S.TIMED_OUT,), _tick),
    (_S.FAILED, RerunRequested): Rule((_S.QUEUED,), _rerun),
    (_S.TIMED_OUT, RerunRequested): Rule((_S.QUEUED,), _rerun),
}


def apply(task: Task, event: Event, now: float) -> Decision:
    """Decide what `event` does to `task` at time `now`; raises IllegalTransition when not allowed."""
    rule = TRANSITIONS.get((task.state, type(event)))
    if rule is None:
        raise IllegalTransition(task.state, event)
    return rule.decide(task, event, now)


# --------------------------------------------------------------------------------------------- jobs


def job_state(
    stored: JobState, counts: Mapping[TaskState, int], *, schedule_at: float | None = None, now: float = 0.0
) -> JobState:
    """A job's state, derived from its stored state, its start time and its tasks' counts per state."""
    if stored is not JobState.RUNNING:
        return stored
    if schedule_at is not None and now < schedule_at:
        return JobState.SCHEDULED
    return JobState.RUNNING if any(counts.get(s, 0) for s in UNFINISHED) else JobState.COMPLETED


def may_notify_queued(
    job: JobState, task_group: int, current_group: int, *, paced: bool, pulled: bool
) -> bool:
    """May a queued task be handed its notice outside its job's dispatcher (on connect, inform or pull)?
    Not while the job is scheduled, paused or cancelled, nor before the task's phase has started, nor
    for a push when the job is paced (paced jobs notify only in their dispatcher's order)."""
    if job not in (JobState.RUNNING, JobState.COMPLETED) or task_group > current_group:
        return False
    return pulled or not paced


def verify_outcome(counts: Mapping[TaskState, int]) -> FirmwareStatus:
    """A finished verify job verifies its firmware only when every task it ran succeeded."""
    ran = {s for s, n in counts.items() if n and s is not TaskState.SKIPPED}
    return FirmwareStatus.VERIFIED if ran == {TaskState.SUCCEEDED} else FirmwareStatus.VERIFY_FAILED


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
    group_no: int = 0
    replaces_busy: bool = False  # the device's older unfinished task is to be cancelled ("overwrite")


def in_gray_sample(seed: str, device: DeviceRef, percent: float) -> bool:
    """A deterministic sample: the same seed and device always give the same answer."""
    digest = hashlib.sha256(f"{seed}\n{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent


def plan_tasks(
    firmware: Firmware,
    candidates: Iterable[Candidate],
    *,
    src_versions: Sequence[str] = (),
    need_confirm: bool = False,
    overwrite: bool = False,
    gray_percent: float | None = None,
    seed: str = "",
    phases: Sequence[float] = (),
) -> list[PlannedTask]:
    """The tasks a new job creates: one per matched device, queued (or in confirm) or skipped with a reason.

    Devices matched by product (not listed) whose version the job does not take are left out; listed
    ones are recorded as skipped so the operator sees why. A gray percentage keeps a deterministic
    sample of what matched; phases split the tasks that will run, in device order, into groups.
    """
    wanted = set(src_versions)
    if firmware.src_version is not None:
        wanted = {firmware.src_version}
    start = TaskState.CONFIRM if need_confirm else TaskState.QUEUED
    planned: list[PlannedTask] = []
    for c in sorted(candidates, key=lambda c: c.device):
        if wanted and c.current_version not in wanted:
            if c.listed:
                planned.append(PlannedTask(c.device, TaskState.SKIPPED, SkipReason.SRC_VERSION_MISMATCH))
            continue
        if gray_percent is not None and not in_gray_sample(seed, c.device, gray_percent):
            continue
        if c.current_version == firmware.version:
            planned.append(PlannedTask(c.device, TaskState.SKIPPED, SkipReason.ALREADY_ON_TARGET))
        elif c.busy and not overwrite:
            planned.append(PlannedTask(c.device, TaskState.SKIPPED, SkipReason.BUSY))
        else:
            planned.append(PlannedTask(c.device, start, replaces_busy=c.busy))
    groups = iter(assign_phases(sum(1 for p in planned if p.state is start), phases))
    return [replace(p, group_no=next(groups)) if p.state is start else p for p in planned]


def assign_phases(count: int, phases: Sequence[float]) -> list[int]:
    """The phase of each of `count` tasks, in order: phase i takes its share of them (rounded, at least
    one while tasks remain), the last phase the rest."""
    if not phases:
        return [0] * count
    sizes: list[int] = []
    total, given = sum(phases), 0
    for i, percent in enumerate(phases):
        left = count - given
        size = (
            left if i == len(phases) - 1 else min(left, max(1, round(count * percent / total))) if left else 0
        )
        sizes.append(size)
        given += size
    return [i for i, size in enumerate(sizes) for _ in range(size)]


@dataclass(frozen=True, slots=True)
class RolloutDecision:
    current_group: int
    pause_reason: str | None = None


def rollout_step(
    rollout: Rollout,
    current_group: int,
    counts_by_group: Sequence[Mapping[TaskState, int]],
    acknowledged_failures: int = 0,
) -> RolloutDecision:
    """Where a phased job goes next: pause on the error threshold (failures beyond those the operator
    acknowledged by resuming), else advance past every phase that has reached its success threshold."""
    failed = sum(c.get(TaskState.FAILED, 0) + c.get(TaskState.TIMED_OUT, 0) for c in counts_by_group)
    failed = max(failed - acknowledged_failures, 0)
    finished = sum(
        n for c in counts_by_group for s, n in c.items() if s.terminal and s is not TaskState.SKIPPED
    )
    if rollout.error_threshold_count is not None and failed >= rollout.error_threshold_count:
        return RolloutDecision(
            current_group, f"{failed} task(s) failed (threshold {rollout.error_threshold_count})"
        )
    if rollout.error_threshold_percent is not None and finished:
        share = failed * 100 / finished
        if share >= rollout.error_threshold_percent:
            return RolloutDecision(
                current_group,
                f"{share:.0f}% of finished tasks failed (threshold {rollout.error_threshold_percent:g}%)",
            )
    group = current_group
    while group + 1 < len(counts_by_group):
        counts = counts_by_group[group]
        total = sum(n for s, n in counts.items() if s is not TaskState.SKIPPED)
        if total and counts.get(TaskState.SUCCEEDED, 0) * 100 / total < rollout.success_threshold:
            break
        group += 1
    return RolloutDecision(group)


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
