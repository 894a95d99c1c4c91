"""The pure task core (`plugins.ota.core.machine`): the transition table, the success rule, re-notify rules,
progress, timeouts, job planning and job state, the generated diagram. Time is passed in as `now`."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from plugins.ota.core.machine import (
    DESC_MAX,
    FAILURE_STEPS,
    TRANSITIONS,
    CancelRequested,
    Candidate,
    Confirmed,
    Decision,
    Delivery,
    DeviceAvailable,
    Event,
    FirmwareRequested,
    IllegalTransition,
    PlannedTask,
    ProgressReported,
    RerunRequested,
    SendNotice,
    Ticked,
    VersionReported,
    apply,
    job_state,
    mermaid_diagram,
    plan_tasks,
)
from plugins.ota.core.model import (
    UNFINISHED,
    Firmware,
    FirmwareStatus,
    JobState,
    SignMethod,
    SkipReason,
    Task,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef

T0 = 1_700_000_000.0  # when the task was created
NOTICED = T0 + 10.0  # when the (notified) task's latest notice went out
STARTED = T0 + 20.0  # when the (in_progress) task's first progress report arrived
NOW = T0 + 100.0
TARGET = "2.0.0"
OLD = "1.0.0"
DEVICE = DeviceRef("pk1", "dev1")

TERMINAL = [s for s in TaskState if s.terminal]


def make_task(state: TaskState = TaskState.QUEUED, **overrides: Any) -> Task:
    """A task in `state` with the fields that state implies; `overrides` replace any of them."""
    fields: dict[str, Any] = {
        "id": 1,
        "job_id": 1,
        "firmware_id": 1,
        "device": DEVICE,
        "module": "default",
        "target_version": TARGET,
        "state": state,
        "progress": 0,
        "desc": "",
        "attempts": 0,
        "timeout_s": None,
        "notified_at": None,
        "noticed_at": None,
        "started_at": None,
        "updated_at": T0,
    }
    if state in (TaskState.NOTIFIED, TaskState.IN_PROGRESS):
        fields.update(attempts=1, notified_at=NOTICED, noticed_at=NOTICED, updated_at=NOTICED)
    if state is TaskState.IN_PROGRESS:
        fields.update(progress=30, desc="downloading", started_at=STARTED, updated_at=STARTED)
    fields.update(overrides)
    return Task(**fields)


def make_firmware(**overrides: Any) -> Firmware:
    """A verified firmware for product pk1, default module, version TARGET."""
    fields: dict[str, Any] = {
        "id": 1,
        "product_key": "pk1",
        "module": "default",
        "version": TARGET,
        "src_version": None,
        "size": 1234,
        "md5": "0" * 32,
        "sha256": "1" * 64,
        "sign_method": SignMethod.MD5,
        "description": "",
        "status": FirmwareStatus.VERIFIED,
        "created_at": T0,
    }
    fields.update(overrides)
    return Firmware(**fields)


# Representative events of every type; between them they reach every target the table declares.
SAMPLE_EVENTS: dict[type, list[Event]] = {
    DeviceAvailable: [DeviceAvailable(session_started_at=NOW - 1)],
    FirmwareRequested: [FirmwareRequested()],
    VersionReported: [VersionReported(TARGET), VersionReported(OLD), VersionReported("9.9.9", NOW - 1)],
    ProgressReported: [ProgressReported(50, "downloading"), ProgressReported(-2, "http 404")],
    CancelRequested: [CancelRequested()],
    Confirmed: [Confirmed()],
    RerunRequested: [RerunRequested()],
    Ticked: [Ticked()],
}
ALL_EVENTS: list[Event] = [e for events in SAMPLE_EVENTS.values() for e in events]


def table_tasks(state: TaskState) -> list[Task]:
    """Tasks in `state` whose timeout has long expired at NOW (so Ticked can reach timed_out), one with no
    retries left and one with a retry left (so a failure can reach both failed and queued)."""
    return [
        make_task(state, timeout_s=30.0, notify_timeout_s=30.0),
        make_task(state, timeout_s=30.0, notify_timeout_s=30.0, retry_count=1, retry_interval_s=60.0),
    ]


# ---------------------------------------------------------------------------------------- the table


def test_sample_events_cover_every_event_type() -> None:
    """Every event type the table mentions has sample events here, so every row gets exercised."""
    assert {etype for _, etype in TRANSITIONS} <= set(SAMPLE_EVENTS)


@pytest.mark.parametrize(
    ("state", "etype"),
    list(TRANSITIONS),
    ids=[f"{s}-{e.__name__}" for s, e in TRANSITIONS],
)
def test_table_row_reaches_exactly_its_declared_targets(state: TaskState, etype: type) -> None:
    """Each row leads only to its declared targets (or stays put), and each declared target is reachable."""
    rule = TRANSITIONS[(state, etype)]
    reached = set()
    for task in table_tasks(state):
        for event in SAMPLE_EVENTS[etype]:
            decision = apply(task, event, NOW)
            assert isinstance(decision, Decision)
            assert decision.task.id == task.id and decision.task.device == task.device
            reached.add(decision.task.state)
    assert reached <= {*rule.targets, state}
    assert set(rule.targets) <= reached


def test_only_an_operator_rerun_leaves_a_terminal_state() -> None:
    """The only rows from a terminal state are the operator's re-run of failed and timed-out tasks."""
    assert {(s, e) for s, e in TRANSITIONS if s.terminal} == {
        (TaskState.FAILED, RerunRequested),
        (TaskState.TIMED_OUT, RerunRequested),
    }


ILLEGAL = [(s, e) for s, e in itertools.product(TaskState, SAMPLE_EVENTS) if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "etype"), ILLEGAL, ids=[f"{s}-{e.__name__}" for s, e in ILLEGAL])
def test_illegal_pair_raises_and_changes_nothing(state: TaskState, etype: type) -> None:
    """A (state, event) pair missing from the table raises IllegalTransition naming both; the task is intact."""
    task = table_tasks(state)[0]
    before = replace(task)
    for event in SAMPLE_EVENTS[etype]:
        with pytest.raises(IllegalTransition) as info:
            apply(task, event, NOW)
        assert info.value.state is state
        assert info.value.event is event
        assert etype.__name__ in str(info.value)
    assert task == before


@pytest.mark.parametrize("state", TERMINAL)
def test_terminal_state_refuses_every_event(state: TaskState) -> None:
    """succeeded, failed, timed_out, cancelled and skipped accept no device or time event at all."""
    task = make_task(state, progress=100, started_at=STARTED)
    for event in ALL_EVENTS:
        if isinstance(event, RerunRequested) and state in (TaskState.FAILED, TaskState.TIMED_OUT):
            continue
        with pytest.raises(IllegalTransition):
            apply(task, event, NOW)


def test_progress_while_queued_is_illegal() -> None:
    """A task that was never notified refuses progress reports."""
    with pytest.raises(IllegalTransition):
        apply(make_task(TaskState.QUEUED), ProgressReported(10), NOW)


# ---------------------------------------------------------------------------------- confirm, cancel


def test_confirmed_moves_confirm_to_queued() -> None:
    """An operator's confirmation queues the task without sending anything yet."""
    decision = apply(make_task(TaskState.CONFIRM), Confirmed(), NOW)
    assert decision.task.state is TaskState.QUEUED
    assert decision.task.updated_at == NOW
    assert decision.effects == ()
    assert decision.changed


@pytest.mark.parametrize("state", sorted(UNFINISHED))
def test_cancel_from_every_unfinished_state(state: TaskState) -> None:
    """CancelRequested ends any unfinished task as cancelled with the given reason and no effect."""
    decision = apply(make_task(state), CancelRequested("job cancelled"), NOW)
    assert decision.task.state is TaskState.CANCELLED
    assert decision.task.desc == "job cancelled"
    assert decision.task.updated_at == NOW
    assert decision.effects == ()


def test_cancel_keeps_progress() -> None:
    """Cancelling an in-progress task keeps the last recorded progress."""
    decision = apply(make_task(TaskState.IN_PROGRESS, progress=70), CancelRequested(), NOW)
    assert decision.task.progress == 70
    assert decision.task.desc == "cancelled by operator"


# ------------------------------------------------------------------------------------- success rule


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.NOTIFIED, TaskState.IN_PROGRESS])
def test_informing_the_target_version_succeeds(state: TaskState) -> None:
    """Informing the target version succeeds from queued, notified and in_progress, with progress 100."""
    decision = apply(make_task(state), VersionReported(TARGET), NOW)
    assert decision.task.state is TaskState.SUCCEEDED
    assert decision.task.progress == 100
    assert decision.task.updated_at == NOW
    assert TARGET in decision.task.desc
    assert decision.effects == ()


@pytest.mark.parametrize("version", [OLD, "3.0.0", "2.0.0-rc1", "2.0", " 2.0.0"])
def test_other_version_after_progress_fails_with_version_mismatch(version: str) -> None:
    """After progress, informing any version but the target fails the task: "version mismatch"."""
    decision = apply(make_task(TaskState.IN_PROGRESS, progress=100), VersionReported(version), NOW)
    assert decision.task.state is TaskState.FAILED
    assert decision.task.desc.startswith("version mismatch")
    assert version in decision.task.desc and TARGET in decision.task.desc
    assert decision.effects == ()


def test_full_progress_alone_is_not_success() -> None:
    """A 100 % progress report leaves the task in_progress: only the informed version decides success."""
    decision = apply(make_task(TaskState.IN_PROGRESS, progress=90), ProgressReported(100, "done"), NOW)
    assert decision.task.state is TaskState.IN_PROGRESS
    assert decision.task.progress == 100


def test_success_needs_exact_version_string() -> None:
    """The version comparison is exact: a differently spelled version is not the target."""
    decision = apply(make_task(TaskState.NOTIFIED), VersionReported("2.0.0 "), NOW)
    assert decision.task.state is not TaskState.SUCCEEDED


# ------------------------------------------------------------------------------------ re-notify rules


def test_queued_device_available_pushes_and_counts_an_attempt() -> None:
    """queued → notified on DeviceAvailable: one push, attempts + 1, notified_at and noticed_at set to now."""
    decision = apply(make_task(TaskState.QUEUED), DeviceAvailable(session_started_at=T0), NOW)
    task = decision.task
    assert task.state is TaskState.NOTIFIED
    assert decision.effects == (SendNotice(Delivery.PUSH),)
    assert task.attempts == 1
    assert task.notified_at == NOW
    assert task.noticed_at == NOW
    assert task.updated_at == NOW


def test_queued_device_available_pushes_even_for_an_old_session() -> None:
    """A queued task has never been noticed, so any session gets the first notice."""
    decision = apply(make_task(TaskState.QUEUED), DeviceAvailable(session_started_at=NOW - 1000), NOW)
    assert decision.effects == (SendNotice(Delivery.PUSH),)


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.NOTIFIED])
def test_non_target_version_before_progress_gets_the_notice_again(state: TaskState) -> None:
    """Informing a non-target version before any progress pushes the notice (again)."""
    decision = apply(make_task(state), VersionReported(OLD), NOW)
    assert decision.task.state is TaskState.NOTIFIED
    assert decision.effects == (SendNotice(Delivery.PUSH),)
    assert decision.task.noticed_at == NOW


def test_resend_in_notified_keeps_first_notice_and_attempts() -> None:
    """A repeated notice refreshes noticed_at but keeps notified_at and the attempt count."""
    task = make_task(TaskState.NOTIFIED, attempts=1)
    decision = apply(task, VersionReported(OLD, session_started_at=NOTICED + 5), NOW)
    assert decision.effects == (SendNotice(Delivery.PUSH),)
    assert decision.task.attempts == 1
    assert decision.task.notified_at == NOTICED
    assert decision.task.noticed_at == NOW


@pytest.mark.parametrize("session_started_at", [NOTICED, NOTICED - 1, T0])
def test_no_resend_on_version_to_a_session_that_had_the_notice(session_started_at: float) -> None:
    """A non-target inform from a session that began at or before the latest notice resends nothing."""
    task = make_task(TaskState.NOTIFIED)
    decision = apply(task, VersionReported(OLD, session_started_at=session_started_at), NOW)
    assert decision.effects == ()
    assert decision.task == task
    assert not decision.changed


def test_resend_on_version_to_a_newer_session() -> None:
    """A non-target inform from a session newer than the latest notice gets the notice."""
    decision = apply(
        make_task(TaskState.NOTIFIED), VersionReported(OLD, session_started_at=NOTICED + 0.001), NOW
    )
    assert decision.effects == (SendNotice(Delivery.PUSH),)


def test_device_available_in_notified_resends_to_a_new_session() -> None:
    """A device that reconnected after its notice (new session) gets the notice pushed again."""
    decision = apply(make_task(TaskState.NOTIFIED), DeviceAvailable(session_started_at=NOTICED + 1), NOW)
    assert decision.task.state is TaskState.NOTIFIED
    assert decision.effects == (SendNotice(Delivery.PUSH),)
    assert decision.task.noticed_at == NOW
    assert decision.task.attempts == 1


@pytest.mark.parametrize("session_started_at", [NOTICED, NOTICED - 1])
def test_device_available_in_notified_skips_the_same_session(session_started_at: float) -> None:
    """The session that already had the notice does not get it twice."""
    task = make_task(TaskState.NOTIFIED)
    decision = apply(task, DeviceAvailable(session_started_at=session_started_at), NOW)
    assert decision.effects == ()
    assert decision.task == task


def test_no_resend_while_in_progress() -> None:
    """An in-progress task pushes nothing on reconnect, even to a brand new session."""
    task = make_task(TaskState.IN_PROGRESS)
    decision = apply(task, DeviceAvailable(session_started_at=NOW), NOW)
    assert decision.effects == ()
    assert decision.task == task


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.NOTIFIED, TaskState.IN_PROGRESS])
def test_pull_always_replies(state: TaskState) -> None:
    """FirmwareRequested answers with the notice as a reply in queued, notified and in_progress."""
    task = make_task(state)
    decision = apply(task, FirmwareRequested(), NOW)
    assert decision.effects == (SendNotice(Delivery.REPLY),)
    assert decision.task.noticed_at == NOW
    expected = TaskState.NOTIFIED if state is TaskState.QUEUED else state
    assert decision.task.state is expected


def test_pull_in_queued_counts_an_attempt() -> None:
    """A pull on a queued task notifies it: attempts + 1, notified_at and noticed_at set to now."""
    decision = apply(make_task(TaskState.QUEUED), FirmwareRequested(), NOW)
    assert decision.task.attempts == 1
    assert decision.task.notified_at == NOW
    assert decision.task.noticed_at == NOW


def test_pull_in_progress_keeps_progress_and_attempts() -> None:
    """A pull during an upgrade changes neither progress, state nor attempts."""
    task = make_task(TaskState.IN_PROGRESS, progress=40)
    decision = apply(task, FirmwareRequested(), NOW)
    assert decision.task.progress == 40
    assert decision.task.attempts == task.attempts
    assert decision.task.notified_at == task.notified_at


# ------------------------------------------------------------------------------------------ progress


@pytest.mark.parametrize("step", [0, 1, 42, 99, 100])
def test_progress_from_notified_moves_to_in_progress(step: int) -> None:
    """Steps 0..100 move a notified task to in_progress and record step, desc and started_at."""
    decision = apply(make_task(TaskState.NOTIFIED), ProgressReported(step, "downloading"), NOW)
    task = decision.task
    assert task.state is TaskState.IN_PROGRESS
    assert task.progress == step
    assert task.desc == "downloading"
    assert task.started_at == NOW
    assert task.updated_at == NOW
    assert decision.effects == ()


def test_later_progress_keeps_started_at() -> None:
    """The timeout clock starts at the first progress report; later reports do not move it."""
    decision = apply(make_task(TaskState.IN_PROGRESS, progress=30), ProgressReported(60, "flashing"), NOW)
    assert decision.task.progress == 60
    assert decision.task.desc == "flashing"
    assert decision.task.started_at == STARTED


def test_same_progress_twice_is_a_no_op() -> None:
    """The same step and desc reported twice returns the input task unchanged and no note."""
    first = apply(make_task(TaskState.NOTIFIED), ProgressReported(42, "downloading"), NOW).task
    again = apply(first, ProgressReported(42, "downloading"), NOW + 5)
    assert again.task == first
    assert again.effects == ()
    assert not again.changed


def test_same_step_with_new_desc_is_recorded() -> None:
    """A new desc at the same step is a change, not a duplicate."""
    task = make_task(TaskState.IN_PROGRESS, progress=42, desc="downloading")
    decision = apply(task, ProgressReported(42, "verifying"), NOW)
    assert decision.task.desc == "verifying"
    assert decision.changed


@pytest.mark.parametrize(("step", "reason"), sorted(FAILURE_STEPS.items()))
@pytest.mark.parametrize("state", [TaskState.NOTIFIED, TaskState.IN_PROGRESS])
def test_negative_step_fails_with_documented_reason(state: TaskState, step: int, reason: str) -> None:
    """Steps -1..-4 fail the task with Aliyun's documented reason followed by the device's desc."""
    task = make_task(state)
    decision = apply(task, ProgressReported(step, "oops"), NOW)
    assert decision.task.state is TaskState.FAILED
    assert decision.task.desc == f"{reason}: oops"
    assert decision.task.progress == task.progress
    assert decision.effects == ()


def test_failure_reasons_match_spec() -> None:
    """The four failure steps carry exactly the reasons the protocol documents."""
    assert dict(FAILURE_STEPS) == {
        -1: "upgrade failed",
        -2: "download failed",
        -3: "verification failed",
        -4: "flash failed",
    }


def test_negative_step_without_desc_is_the_bare_reason() -> None:
    """A failure step with an empty desc records just the reason."""
    decision = apply(make_task(TaskState.IN_PROGRESS), ProgressReported(-3), NOW)
    assert decision.task.desc == "verification failed"


def test_progress_desc_truncated_to_128() -> None:
    """A long progress desc is stored truncated to 128 characters, not rejected."""
    decision = apply(make_task(TaskState.NOTIFIED), ProgressReported(10, "x" * 500), NOW)
    assert DESC_MAX == 128
    assert decision.task.desc == "x" * 128


def test_failure_desc_truncated_to_128() -> None:
    """A failure's reason plus a long device desc is stored as at most 128 characters."""
    decision = apply(make_task(TaskState.IN_PROGRESS), ProgressReported(-2, "y" * 500), NOW)
    assert decision.task.state is TaskState.FAILED
    assert len(decision.task.desc) == 128
    assert decision.task.desc.startswith("download failed: yyy")


def test_version_mismatch_desc_truncated_to_128() -> None:
    """A version-mismatch desc with a long version is at most 128 characters."""
    decision = apply(make_task(TaskState.IN_PROGRESS), VersionReported("v" * 200), NOW)
    assert decision.task.state is TaskState.FAILED
    assert len(decision.task.desc) <= 128
    assert decision.task.desc.startswith("version mismatch")


# --------------------------------------------------------------------------------------------- time


def test_timeout_fires_exactly_at_deadline() -> None:
    """Ticked times an in-progress task out at started_at + timeout_s, not a moment before."""
    task = make_task(TaskState.IN_PROGRESS, timeout_s=600.0)
    deadline = STARTED + 600.0
    before = apply(task, Ticked(), deadline - 0.001)
    assert before.task == task
    assert not before.changed
    at = apply(task, Ticked(), deadline)
    assert at.task.state is TaskState.TIMED_OUT
    assert at.task.updated_at == deadline
    assert at.task.progress == task.progress
    assert "10 min" in at.task.desc
    assert at.effects == ()


def test_timeout_after_deadline() -> None:
    """Ticked long after the deadline times the task out too."""
    task = make_task(TaskState.IN_PROGRESS, timeout_s=60.0)
    assert apply(task, Ticked(), STARTED + 10_000).task.state is TaskState.TIMED_OUT


def test_no_timeout_without_timeout_s() -> None:
    """With timeout_s None an in-progress task never times out."""
    task = make_task(TaskState.IN_PROGRESS, timeout_s=None)
    decision = apply(task, Ticked(), STARTED + 10**9)
    assert decision.task == task
    assert decision.effects == ()


@pytest.mark.parametrize("state", [TaskState.QUEUED, TaskState.NOTIFIED])
def test_timeout_does_not_run_before_progress(state: TaskState) -> None:
    """The timeout runs from the first progress report: queued and notified tasks ignore it."""
    task = make_task(state, timeout_s=1.0)
    decision = apply(task, Ticked(), NOW + 10**6)
    assert decision.task == task
    assert decision.effects == ()


def test_notified_task_times_out_after_its_latest_notice() -> None:
    """A notified task with no progress report times out notify_timeout_s after its latest notice (not its
    first), exactly then; a queued one never does, and None means never."""
    task = make_task(TaskState.NOTIFIED, notify_timeout_s=600.0, notified_at=NOTICED - 5000)
    deadline = NOTICED + 600.0
    assert apply(task, Ticked(), deadline - 0.001).task == task
    at = apply(task, Ticked(), deadline)
    assert at.task.state is TaskState.TIMED_OUT
    assert at.task.desc == "no progress report 10 min after the notice"
    assert at.effects == ()
    queued = make_task(TaskState.QUEUED, notify_timeout_s=1.0, noticed_at=NOTICED)
    assert apply(queued, Ticked(), NOW + 10**6).task == queued
    never = make_task(TaskState.NOTIFIED, notify_timeout_s=None)
    assert apply(never, Ticked(), NOW + 10**9).task == never


def test_a_notice_again_restarts_the_notify_timeout() -> None:
    """A notice sent again (the device reconnected with a new session) counts from the new notice."""
    task = make_task(TaskState.NOTIFIED, notify_timeout_s=600.0)
    again = apply(task, DeviceAvailable(session_started_at=NOTICED + 500), NOTICED + 500).task
    assert again.noticed_at == NOTICED + 500
    assert apply(again, Ticked(), NOTICED + 700).task.state is TaskState.NOTIFIED
    assert apply(again, Ticked(), NOTICED + 1100).task.state is TaskState.TIMED_OUT


# --------------------------------------------------------------------------------------------- plan


def candidate(name: str, version: str | None, *, busy: bool = False, listed: bool = True) -> Candidate:
    """A candidate device pk1/<name> currently on `version`."""
    return Candidate(DeviceRef("pk1", name), version, busy, listed)


def test_plan_queues_eligible_devices_in_order() -> None:
    """Eligible devices (including ones with no known version) get queued tasks, in candidate order."""
    planned = plan_tasks(make_firmware(), [candidate("a", OLD), candidate("b", None, listed=False)])
    assert planned == [
        PlannedTask(DeviceRef("pk1", "a"), TaskState.QUEUED),
        PlannedTask(DeviceRef("pk1", "b"), TaskState.QUEUED),
    ]


def test_plan_skips_device_already_on_target() -> None:
    """A device already running the firmware's version is skipped with already_on_target."""
    [task] = plan_tasks(make_firmware(), [candidate("a", TARGET)])
    assert task.state is TaskState.SKIPPED
    assert task.desc == SkipReason.ALREADY_ON_TARGET == "already_on_target"


def test_plan_skips_busy_device() -> None:
    """A device with another unfinished task is skipped with busy."""
    [task] = plan_tasks(make_firmware(), [candidate("a", OLD, busy=True)])
    assert task.state is TaskState.SKIPPED
    assert task.desc == "busy"


def test_plan_src_versions_filter() -> None:
    """With src_versions, listed devices on other versions are skipped; product-matched ones left out."""
    planned = plan_tasks(
        make_firmware(),
        [
            candidate("in", "1.0.0"),
            candidate("listed-out", "0.9.0"),
            candidate("matched-out", "0.9.0", listed=False),
            candidate("matched-in", "1.1.0", listed=False),
            candidate("unknown", None),
        ],
        src_versions=["1.0.0", "1.1.0"],
    )
    assert planned == [
        PlannedTask(DeviceRef("pk1", "in"), TaskState.QUEUED),
        PlannedTask(DeviceRef("pk1", "listed-out"), TaskState.SKIPPED, SkipReason.SRC_VERSION_MISMATCH),
        PlannedTask(DeviceRef("pk1", "matched-in"), TaskState.QUEUED),
        PlannedTask(DeviceRef("pk1", "unknown"), TaskState.SKIPPED, SkipReason.SRC_VERSION_MISMATCH),
    ]


def test_plan_differential_firmware_restricts_to_its_src_version() -> None:
    """A differential package only targets devices on its src_version, whatever src_versions says."""
    firmware = make_firmware(src_version="1.0.0")
    planned = plan_tasks(
        firmware,
        [candidate("ok", "1.0.0"), candidate("other", "1.1.0"), candidate("other2", "1.1.0", listed=False)],
        src_versions=["1.1.0"],
    )
    assert planned == [
        PlannedTask(DeviceRef("pk1", "ok"), TaskState.QUEUED),
        PlannedTask(DeviceRef("pk1", "other"), TaskState.SKIPPED, SkipReason.SRC_VERSION_MISMATCH),
    ]


def test_plan_need_confirm_starts_in_confirm() -> None:
    """A job that asks devices to confirm starts eligible tasks in confirm; skips stay skipped."""
    planned = plan_tasks(make_firmware(), [candidate("a", OLD), candidate("b", TARGET)], need_confirm=True)
    assert [p.state for p in planned] == [TaskState.CONFIRM, TaskState.SKIPPED]


def test_plan_of_no_candidates_is_empty() -> None:
    """No candidates, no tasks."""
    assert plan_tasks(make_firmware(), []) == []


# ---------------------------------------------------------------------------------------- job state


@pytest.mark.parametrize(
    "stored", [JobState.SCHEDULED, JobState.PAUSED, JobState.COMPLETED, JobState.CANCELLED]
)
def test_job_state_other_than_running_is_kept(stored: JobState) -> None:
    """Only a running job's state is derived; scheduled, paused, completed and cancelled stay as stored."""
    assert job_state(stored, {TaskState.QUEUED: 3}) is stored
    assert job_state(stored, {}) is stored


@pytest.mark.parametrize("state", sorted(UNFINISHED))
def test_running_job_with_an_unfinished_task_is_running(state: TaskState) -> None:
    """A running job with any task in confirm, queued, notified or in_progress is still running."""
    counts = {TaskState.SUCCEEDED: 5, TaskState.FAILED: 1, state: 1}
    assert job_state(JobState.RUNNING, counts) is JobState.RUNNING


def test_running_job_with_only_finished_tasks_is_completed() -> None:
    """A running job whose tasks are all terminal (or counted zero) is completed."""
    counts = {s: 2 for s in TERMINAL} | {s: 0 for s in UNFINISHED}
    assert job_state(JobState.RUNNING, counts) is JobState.COMPLETED


def test_running_job_without_tasks_is_completed() -> None:
    """A running job with no tasks at all is completed."""
    assert job_state(JobState.RUNNING, {}) is JobState.COMPLETED


# ------------------------------------------------------------------------------------------ diagram


def test_diagram_mentions_every_state() -> None:
    """The Mermaid diagram names every task state."""
    diagram = mermaid_diagram()
    assert diagram.startswith("stateDiagram-v2\n")
    for state in TaskState:
        assert state.value in diagram


@pytest.mark.parametrize(
    ("source", "target", "etype"),
    [(s, t, e) for (s, e), rule in TRANSITIONS.items() for t in rule.targets],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_diagram_draws_every_table_edge(source: TaskState, target: TaskState, etype: type) -> None:
    """Every (source, target) a table row declares is an edge labelled with its event type."""
    lines = mermaid_diagram().splitlines()
    [edge] = [line for line in lines if line.strip().startswith(f"{source} --> {target}:")]
    assert etype.__name__ in edge


def test_diagram_ends_every_terminal_state() -> None:
    """Every terminal state has an edge to the end marker."""
    lines = [line.strip() for line in mermaid_diagram().splitlines()]
    for state in TERMINAL:
        assert f"{state} --> [*]" in lines
