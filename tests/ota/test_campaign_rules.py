"""Campaign rules of the pure OTA core (issue 4): retries, operator re-runs, phased rollouts (phase sizes
and the advance/pause step), the gray sample, job planning options and the scheduled job state.

Time is injected as `now`; nothing here sleeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugins.ota.core import machine
from plugins.ota.core.machine import (
    FAILURE_STEPS,
    Delivery,
    DeviceAvailable,
    IllegalTransition,
    PlannedTask,
    ProgressReported,
    RerunRequested,
    SendNotice,
    Ticked,
    VersionReported,
    apply,
    assign_phases,
    in_gray_sample,
    job_state,
    plan_tasks,
    rollout_step,
)
from plugins.ota.core.model import UNFINISHED, FirmwareStatus, JobState, Rollout, SkipReason, Task, TaskState
from plugins.ota.core.topics import DeviceRef
from tests.ota.test_machine import NOW, OLD, STARTED, TARGET, candidate, make_firmware, make_task

S = TaskState
RETRY_INTERVAL = 300.0


def retrying_task(state: TaskState = S.IN_PROGRESS, **overrides: Any) -> Task:
    """A task of a job with two retries every RETRY_INTERVAL seconds, on its first attempt."""
    fields: dict[str, Any] = {"retry_count": 2, "retry_interval_s": RETRY_INTERVAL, "attempts": 1}
    fields.update(overrides)
    return make_task(state, **fields)


def phase_sizes(groups: Sequence[int], phases: int) -> list[int]:
    """How many tasks each of `phases` phases got."""
    return [groups.count(i) for i in range(phases)]


def devices(n: int, product_key: str = "pk1") -> list[DeviceRef]:
    """n distinct devices of one product."""
    return [DeviceRef(product_key, f"dev{i:05d}") for i in range(n)]


# ------------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize(("step", "reason"), sorted(FAILURE_STEPS.items()))
@pytest.mark.parametrize("state", [S.NOTIFIED, S.IN_PROGRESS])
def test_failure_step_with_retries_left_queues_again(state: TaskState, step: int, reason: str) -> None:
    """A failure step with retries left queues the task again after the interval, reset, saying why and which retry."""
    decision = apply(retrying_task(state), ProgressReported(step, "oops"), NOW)
    task = decision.task
    assert task.state is S.QUEUED
    assert task.not_before == NOW + RETRY_INTERVAL
    assert task.progress == 0
    assert task.started_at is None
    assert task.noticed_at is None
    assert task.updated_at == NOW
    assert task.attempts == 1
    assert reason in task.desc
    assert "retry 1 of 2" in task.desc
    assert decision.effects == ()
    assert decision.changed


def test_version_mismatch_with_retries_left_queues_again() -> None:
    """A version mismatch after progress is a failure that is retried like a failure step."""
    task = retrying_task(S.IN_PROGRESS, progress=100)
    decision = apply(task, VersionReported(OLD), NOW)
    assert decision.task.state is S.QUEUED
    assert decision.task.not_before == NOW + RETRY_INTERVAL
    assert decision.task.progress == 0
    assert decision.task.started_at is None
    assert decision.task.noticed_at is None
    assert decision.task.desc.startswith("version mismatch")
    assert "retry 1 of 2" in decision.task.desc
    assert decision.effects == ()


@pytest.mark.parametrize(("retry_count", "attempts"), [(1, 1), (2, 1), (2, 2), (3, 3), (5, 2)])
def test_retry_desc_counts_the_retry(retry_count: int, attempts: int) -> None:
    """The n-th failure (attempt n) with retries left is "retry n of retry_count"."""
    task = retrying_task(retry_count=retry_count, attempts=attempts)
    decision = apply(task, ProgressReported(-2), NOW)
    assert decision.task.state is S.QUEUED
    assert decision.task.desc == f"download failed; retry {attempts} of {retry_count}"


@pytest.mark.parametrize(("retry_count", "attempts"), [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (1, 5)])
def test_failure_without_retries_left_is_final(retry_count: int, attempts: int) -> None:
    """Once attempts - 1 >= retry_count a failure is final: failed, progress kept, no retry wait."""
    task = retrying_task(retry_count=retry_count, attempts=attempts, progress=40)
    decision = apply(task, ProgressReported(-4, "bad block"), NOW)
    assert decision.task.state is S.FAILED
    assert decision.task.desc == "flash failed: bad block"
    assert decision.task.progress == 40
    assert decision.task.not_before is None
    assert decision.effects == ()


def test_version_mismatch_without_retries_left_is_final() -> None:
    """A version mismatch on the last allowed attempt fails the task for good."""
    task = retrying_task(retry_count=2, attempts=3)
    decision = apply(task, VersionReported(OLD), NOW)
    assert decision.task.state is S.FAILED
    assert decision.task.desc.startswith("version mismatch")
    assert "retry" not in decision.task.desc


def test_retry_interval_zero_makes_the_task_eligible_at_once() -> None:
    """With a zero retry interval the re-queued task may be notified at the same instant."""
    failed = apply(retrying_task(retry_interval_s=0.0), ProgressReported(-1), NOW).task
    assert failed.not_before == NOW
    again = apply(failed, DeviceAvailable(session_started_at=NOW - 50), NOW)
    assert again.effects == (SendNotice(Delivery.PUSH),)


def test_timeout_is_never_retried() -> None:
    """A timeout ends the task as timed_out even when retries are left."""
    task = retrying_task(S.IN_PROGRESS, timeout_s=60.0, retry_count=5)
    decision = apply(task, Ticked(), STARTED + 60.0)
    assert decision.task.state is S.TIMED_OUT
    assert decision.task.not_before is None
    assert decision.effects == ()


@pytest.mark.parametrize("early", [0.0, 1.0, RETRY_INTERVAL - 0.001])
def test_retry_wait_ignores_device_available(early: float) -> None:
    """Before not_before a queued task ignores DeviceAvailable: no notice, task unchanged, nothing noted."""
    waiting = apply(retrying_task(), ProgressReported(-2), NOW).task
    decision = apply(waiting, DeviceAvailable(session_started_at=NOW + early), NOW + early)
    assert decision.task == waiting
    assert decision.effects == ()
    assert not decision.changed


def test_retry_wait_ignores_old_version_inform() -> None:
    """Before not_before an old-version inform (which would normally resend) sends nothing either."""
    waiting = apply(retrying_task(), ProgressReported(-2), NOW).task
    decision = apply(waiting, VersionReported(OLD, session_started_at=NOW + 1), NOW + 10)
    assert decision.task == waiting
    assert decision.effects == ()


def test_target_version_during_retry_wait_succeeds() -> None:
    """A device that informs the target version while waiting to be retried has succeeded."""
    waiting = apply(retrying_task(), ProgressReported(-2), NOW).task
    decision = apply(waiting, VersionReported(TARGET), NOW + 10)
    assert decision.task.state is S.SUCCEEDED


@pytest.mark.parametrize("late", [RETRY_INTERVAL, RETRY_INTERVAL + 1, 10 * RETRY_INTERVAL])
def test_retry_notified_once_not_before_reached(late: float) -> None:
    """At or after not_before DeviceAvailable pushes the notice again, counting another attempt."""
    waiting = apply(retrying_task(), ProgressReported(-2), NOW).task
    decision = apply(waiting, DeviceAvailable(session_started_at=NOW - 1000), NOW + late)
    task = decision.task
    assert task.state is S.NOTIFIED
    assert decision.effects == (SendNotice(Delivery.PUSH),)
    assert task.attempts == 2
    assert task.noticed_at == NOW + late
    assert task.not_before is None


def test_retry_cycle_until_retries_are_used_up() -> None:
    """With retry_count 2 a task is notified three times; the third failure is final."""
    task = make_task(S.QUEUED, retry_count=2, retry_interval_s=60.0)
    now = NOW
    for attempt in (1, 2, 3):
        task = apply(task, DeviceAvailable(session_started_at=now - 1), now).task
        assert task.state is S.NOTIFIED and task.attempts == attempt
        task = apply(task, ProgressReported(30, "downloading"), now + 1).task
        assert task.state is S.IN_PROGRESS
        task = apply(task, ProgressReported(-2, "http 404"), now + 2).task
        if attempt < 3:
            assert task.state is S.QUEUED
            assert f"retry {attempt} of 2" in task.desc
            assert task.not_before == now + 62
            assert apply(task, DeviceAvailable(session_started_at=now + 3), now + 3).effects == ()
            now = task.not_before
    assert task.state is S.FAILED
    assert task.attempts == 3
    assert task.desc == "download failed: http 404"


def test_retry_then_success() -> None:
    """A task that failed once and is retried succeeds when the device informs the target version."""
    task = apply(retrying_task(), ProgressReported(-3), NOW).task
    task = apply(task, DeviceAvailable(session_started_at=NOW), NOW + RETRY_INTERVAL).task
    task = apply(task, ProgressReported(50), NOW + RETRY_INTERVAL + 5).task
    decision = apply(task, VersionReported(TARGET), NOW + RETRY_INTERVAL + 10)
    assert decision.task.state is S.SUCCEEDED
    assert decision.task.attempts == 2
    assert decision.task.progress == 100


# -------------------------------------------------------------------------------------------- re-run


@pytest.mark.parametrize("state", [S.FAILED, S.TIMED_OUT])
def test_rerun_queues_failed_and_timed_out_tasks(state: TaskState) -> None:
    """An operator re-run puts a failed or timed-out task back to queued, reset, "re-run by operator"."""
    task = make_task(
        state,
        attempts=2,
        progress=70,
        desc="flash failed",
        notified_at=NOW - 50,
        noticed_at=NOW - 40,
        started_at=NOW - 30,
        not_before=NOW - 60,
    )
    decision = apply(task, RerunRequested(), NOW)
    new = decision.task
    assert new.state is S.QUEUED
    assert new.progress == 0
    assert new.desc == "re-run by operator"
    assert new.started_at is None
    assert new.noticed_at is None
    assert new.not_before is None
    assert new.updated_at == NOW
    assert decision.effects == ()
    assert decision.changed


@pytest.mark.parametrize("state", [S.FAILED, S.TIMED_OUT])
def test_rerun_task_is_notified_on_the_next_connect(state: TaskState) -> None:
    """A re-run task is notified as soon as its device is available, counting another attempt."""
    task = make_task(state, attempts=1, progress=70, started_at=STARTED, noticed_at=STARTED)
    queued = apply(task, RerunRequested(), NOW).task
    decision = apply(queued, DeviceAvailable(session_started_at=STARTED - 100), NOW + 1)
    assert decision.task.state is S.NOTIFIED
    assert decision.effects == (SendNotice(Delivery.PUSH),)
    assert decision.task.attempts == 2


@pytest.mark.parametrize("state", [s for s in TaskState if s not in (S.FAILED, S.TIMED_OUT)])
def test_rerun_is_illegal_in_every_other_state(state: TaskState) -> None:
    """RerunRequested raises IllegalTransition from every state but failed and timed_out."""
    task = make_task(state)
    with pytest.raises(IllegalTransition) as info:
        apply(task, RerunRequested(), NOW)
    assert info.value.state is state


# ------------------------------------------------------------------------------------- assign_phases


@pytest.mark.parametrize(
    ("count", "phases", "sizes"),
    [
        (100, [10, 20, 70], [10, 20, 70]),
        (10, [50, 50], [5, 5]),
        (10, [33, 33, 34], [3, 3, 4]),
        (1000, [1, 9, 90], [10, 90, 900]),
        (9, [10, 10, 80], [1, 1, 7]),
        (20, [10, 90], [2, 18]),
    ],
)
def test_phase_sizes_follow_the_percentages(count: int, phases: list[float], sizes: list[int]) -> None:
    """Each phase takes its rounded share of the tasks, the last one the rest."""
    groups = assign_phases(count, phases)
    assert phase_sizes(groups, len(phases)) == sizes
    assert groups == sorted(groups)


def test_small_phase_gets_at_least_one_task() -> None:
    """A phase whose share rounds to zero still gets one task while tasks remain."""
    assert phase_sizes(assign_phases(50, [0.5, 0.5, 99]), 3) == [1, 1, 48]


def test_last_phase_takes_the_rest() -> None:
    """Whatever earlier phases did not take goes to the last phase, so the total is the count."""
    groups = assign_phases(11, [20, 20, 60])
    assert len(groups) == 11
    sizes = phase_sizes(groups, 3)
    assert sizes[:2] == [2, 2]
    assert sizes[2] == 11 - 4


@pytest.mark.parametrize("phases", [[], [100], [10, 90], [25, 25, 25, 25]])
def test_no_tasks_no_phases(phases: list[float]) -> None:
    """Zero tasks give an empty assignment, whatever the phases."""
    assert assign_phases(0, phases) == []


@pytest.mark.parametrize("phases", [[100], [10, 90], [90, 10], [25, 25, 25, 25]])
def test_a_single_task_goes_to_the_first_phase(phases: list[float]) -> None:
    """One task lands in the first phase."""
    assert assign_phases(1, phases) == [0]


@pytest.mark.parametrize(
    ("count", "phases"), [(2, [25, 25, 25, 25]), (3, [20] * 5), (4, [10, 10, 10, 10, 60])]
)
def test_fewer_tasks_than_phases_fill_the_first_phases_one_each(count: int, phases: list[float]) -> None:
    """With fewer tasks than phases each early phase gets one task and the later ones none."""
    assert assign_phases(count, phases) == list(range(count))


@pytest.mark.parametrize(
    ("count", "phases", "sizes"),
    [(10, [1, 1], [5, 5]), (10, [20, 20], [5, 5]), (9, [50, 50, 50], [3, 3, 3]), (12, [1, 2, 3], [2, 4, 6])],
)
def test_phases_not_summing_to_100_are_relative(count: int, phases: list[float], sizes: list[int]) -> None:
    """Phase percentages are taken relative to their sum when they do not add up to 100."""
    assert phase_sizes(assign_phases(count, phases), len(phases)) == sizes


def test_without_phases_every_task_is_in_group_zero() -> None:
    """No phases: a single group 0 holds every task."""
    assert assign_phases(5, []) == [0] * 5


@given(
    count=st.integers(min_value=0, max_value=2000),
    phases=st.lists(st.floats(min_value=0.1, max_value=100, allow_nan=False), min_size=1, max_size=8),
)
def test_assign_phases_properties(count: int, phases: list[float]) -> None:
    """For any count and phases: total preserved, indexes in range, non-decreasing, one per phase while tasks remain."""
    groups = assign_phases(count, phases)
    assert len(groups) == count
    assert all(0 <= g < len(phases) for g in groups)
    assert groups == sorted(groups)
    sizes = phase_sizes(groups, len(phases))
    for i in range(len(phases)):
        if count - sum(sizes[:i]) > 0:
            assert sizes[i] >= 1


# -------------------------------------------------------------------------------------- rollout_step


def counts(**by_state: int) -> Mapping[TaskState, int]:
    """Task counts of one group, keyed by state name: counts(succeeded=3, failed=1)."""
    return {TaskState(name): n for name, n in by_state.items()}


ROLLOUT = Rollout(phases=(20, 30, 50), success_threshold=80.0)


def test_rollout_advances_when_the_phase_reaches_its_success_threshold() -> None:
    """A phase with success_threshold percent succeeded lets the next phase start."""
    groups = [counts(succeeded=8, in_progress=2), counts(queued=10), counts(queued=10)]
    decision = rollout_step(ROLLOUT, 0, groups)
    assert decision.current_group == 1
    assert decision.pause_reason is None


def test_rollout_waits_below_the_success_threshold() -> None:
    """A phase short of its success threshold keeps the rollout where it is."""
    groups = [counts(succeeded=7, in_progress=3), counts(queued=10), counts(queued=10)]
    decision = rollout_step(ROLLOUT, 0, groups)
    assert decision.current_group == 0
    assert decision.pause_reason is None


def test_rollout_success_share_ignores_skipped_tasks() -> None:
    """Skipped tasks count neither for nor against a phase's success share."""
    groups = [counts(succeeded=8, in_progress=2, skipped=50), counts(queued=10), counts(queued=10)]
    assert rollout_step(ROLLOUT, 0, groups).current_group == 1


def test_rollout_phase_of_only_skipped_tasks_does_not_block() -> None:
    """A phase with nothing but skipped tasks is passed over."""
    groups = [counts(skipped=3), counts(succeeded=1, queued=9), counts(queued=10)]
    assert rollout_step(ROLLOUT, 0, groups).current_group == 1


def test_rollout_advances_several_phases_at_once() -> None:
    """Every consecutive phase that already reached the threshold is passed in one step."""
    groups = [counts(succeeded=10), counts(succeeded=9, failed=1), counts(queued=10)]
    assert rollout_step(ROLLOUT, 0, groups).current_group == 2


def test_rollout_never_goes_past_the_last_phase() -> None:
    """Even with every phase succeeded the rollout stops at the last phase."""
    groups = [counts(succeeded=2), counts(succeeded=3), counts(succeeded=5)]
    assert rollout_step(ROLLOUT, 0, groups).current_group == 2
    assert rollout_step(ROLLOUT, 2, groups).current_group == 2


def test_rollout_starts_from_current_group() -> None:
    """Only phases from the current one on are checked; earlier phases do not hold it back."""
    groups = [counts(succeeded=1, in_progress=9), counts(succeeded=10), counts(queued=10)]
    assert rollout_step(ROLLOUT, 1, groups).current_group == 2


def test_rollout_pauses_on_error_count() -> None:
    """failed + timed_out reaching error_threshold_count pauses the job with a reason, without advancing."""
    rollout = Rollout(phases=(50, 50), success_threshold=50.0, error_threshold_count=3)
    groups = [counts(succeeded=7, failed=2, timed_out=1), counts(queued=10)]
    decision = rollout_step(rollout, 0, groups)
    assert decision.pause_reason
    assert "3" in decision.pause_reason
    assert decision.current_group == 0


def test_rollout_below_error_count_does_not_pause() -> None:
    """Failures below error_threshold_count do not pause the job."""
    rollout = Rollout(phases=(50, 50), success_threshold=50.0, error_threshold_count=3)
    groups = [counts(succeeded=8, failed=1, timed_out=1), counts(queued=10)]
    decision = rollout_step(rollout, 0, groups)
    assert decision.pause_reason is None
    assert decision.current_group == 1


def test_rollout_error_count_sums_every_group() -> None:
    """Failures in all phases together count toward the error threshold."""
    rollout = Rollout(phases=(30, 30, 40), success_threshold=50.0, error_threshold_count=3)
    groups = [counts(succeeded=9, failed=1), counts(succeeded=5, timed_out=1), counts(failed=1, queued=9)]
    decision = rollout_step(rollout, 2, groups)
    assert decision.pause_reason
    assert decision.current_group == 2


@pytest.mark.parametrize(
    "group",
    [
        counts(succeeded=8, failed=2, in_progress=5),
        counts(succeeded=8, timed_out=2, skipped=100),
        counts(succeeded=7, cancelled=1, failed=1, timed_out=1),
        counts(failed=1, timed_out=1, succeeded=3, queued=100),
    ],
)
def test_rollout_pauses_on_error_percent_of_finished(group: Mapping[TaskState, int]) -> None:
    """failed + timed_out reaching error_threshold_percent of the finished, non-skipped tasks pauses the job."""
    rollout = Rollout(phases=(50, 50), success_threshold=0.0, error_threshold_percent=20.0)
    decision = rollout_step(rollout, 0, [group, counts(queued=10)])
    assert decision.pause_reason
    assert "%" in decision.pause_reason
    assert decision.current_group == 0


def test_rollout_below_error_percent_does_not_pause() -> None:
    """A failure share below error_threshold_percent of finished tasks does not pause."""
    rollout = Rollout(phases=(50, 50), success_threshold=80.0, error_threshold_percent=20.0)
    groups = [counts(succeeded=9, failed=1, in_progress=90), counts(queued=10)]
    assert rollout_step(rollout, 0, groups).pause_reason is None


def test_rollout_error_percent_with_nothing_finished_does_not_pause() -> None:
    """With no finished task there is no failure share, so no pause (and no division by zero)."""
    rollout = Rollout(phases=(50, 50), error_threshold_percent=1.0)
    groups = [counts(queued=5, in_progress=5, skipped=3), counts(queued=10)]
    assert rollout_step(rollout, 0, groups) == rollout_step(Rollout(phases=(50, 50)), 0, groups)
    assert rollout_step(rollout, 0, groups).pause_reason is None


def test_rollout_acknowledged_failures_do_not_pause_again() -> None:
    """Failures the operator acknowledged by resuming are subtracted before the thresholds are checked."""
    rollout = Rollout(phases=(50, 50), success_threshold=50.0, error_threshold_count=3)
    groups = [counts(succeeded=7, failed=3), counts(queued=10)]
    assert rollout_step(rollout, 0, groups).pause_reason
    resumed = rollout_step(rollout, 0, groups, acknowledged_failures=3)
    assert resumed.pause_reason is None
    assert resumed.current_group == 1


def test_rollout_new_failures_after_acknowledgement_pause_again() -> None:
    """Failures beyond those acknowledged count toward the threshold again."""
    rollout = Rollout(phases=(50, 50), success_threshold=50.0, error_threshold_count=3)
    before = [counts(succeeded=10, failed=3), counts(succeeded=5, failed=2, in_progress=3)]
    assert rollout_step(rollout, 1, before, acknowledged_failures=3).pause_reason is None
    after = [counts(succeeded=10, failed=3), counts(succeeded=5, failed=2, timed_out=1, in_progress=2)]
    assert rollout_step(rollout, 1, after, acknowledged_failures=3).pause_reason


def test_rollout_acknowledged_failures_apply_to_the_percent_threshold() -> None:
    """Acknowledged failures are also subtracted before the percent threshold is checked."""
    rollout = Rollout(phases=(50, 50), success_threshold=50.0, error_threshold_percent=20.0)
    groups = [counts(succeeded=8, failed=2), counts(queued=10)]
    assert rollout_step(rollout, 0, groups).pause_reason
    assert rollout_step(rollout, 0, groups, acknowledged_failures=1).pause_reason is None


def test_rollout_more_acknowledged_than_failed_does_not_pause() -> None:
    """Acknowledging more failures than there are never makes the count negative or pauses."""
    rollout = Rollout(phases=(50, 50), error_threshold_count=1, error_threshold_percent=1.0)
    groups = [counts(succeeded=5, failed=1), counts(queued=1)]
    assert rollout_step(rollout, 0, groups, acknowledged_failures=10).pause_reason is None


def test_rollout_without_thresholds_never_pauses() -> None:
    """With neither error threshold set, no number of failures pauses the job."""
    rollout = Rollout(phases=(50, 50))
    groups = [counts(failed=500, timed_out=500), counts(failed=10)]
    decision = rollout_step(rollout, 0, groups)
    assert decision.pause_reason is None
    assert decision.current_group == 0


# ------------------------------------------------------------------------------------- gray sample


def test_gray_sample_is_deterministic() -> None:
    """The same seed and device always give the same answer."""
    for device in devices(200):
        assert in_gray_sample("job-7", device, 30) == in_gray_sample("job-7", device, 30)


def test_gray_sample_depends_on_the_seed() -> None:
    """Two seeds pick different samples of the same devices."""
    fleet = devices(200)
    one = {d for d in fleet if in_gray_sample("job-1", d, 30)}
    two = {d for d in fleet if in_gray_sample("job-2", d, 30)}
    assert one != two


def test_gray_sample_share_is_close_to_the_percentage() -> None:
    """Over 2000 devices a 30 % sample keeps within a few percent of 30 % of them."""
    kept = sum(in_gray_sample("campaign", d, 30) for d in devices(2000))
    assert 0.27 * 2000 <= kept <= 0.33 * 2000


def test_gray_sample_grows_with_the_percentage() -> None:
    """A device in a smaller sample is also in every larger sample with the same seed."""
    fleet = devices(500)
    small = {d for d in fleet if in_gray_sample("s", d, 10)}
    large = {d for d in fleet if in_gray_sample("s", d, 50)}
    assert small <= large


def test_gray_sample_of_100_percent_keeps_all() -> None:
    """A 100 % sample keeps every device."""
    assert all(in_gray_sample("any", d, 100) for d in devices(2000))


def test_gray_sample_of_0_percent_keeps_none() -> None:
    """A 0 % sample keeps no device."""
    assert not any(in_gray_sample("any", d, 0) for d in devices(2000))


def test_gray_sample_of_a_tiny_percentage_keeps_few() -> None:
    """A 0.1 % sample of 2000 devices keeps only a handful."""
    assert sum(in_gray_sample("tiny", d, 0.1) for d in devices(2000)) <= 10


# ------------------------------------------------------------------------------------------ plan_tasks


def test_plan_need_confirm_with_phases_groups_the_confirm_tasks() -> None:
    """need_confirm starts eligible tasks in confirm, and those are the tasks phases split into groups."""
    planned = plan_tasks(
        make_firmware(),
        [candidate(f"d{i}", OLD) for i in range(4)] + [candidate("z", TARGET)],
        need_confirm=True,
        phases=[50, 50],
    )
    assert [(p.state, p.group_no) for p in planned] == [
        (S.CONFIRM, 0),
        (S.CONFIRM, 0),
        (S.CONFIRM, 1),
        (S.CONFIRM, 1),
        (S.SKIPPED, 0),
    ]


def test_plan_overwrite_takes_busy_devices() -> None:
    """With overwrite a busy device gets a queued task marked replaces_busy instead of a busy skip."""
    planned = plan_tasks(
        make_firmware(), [candidate("busy", OLD, busy=True), candidate("free", OLD)], overwrite=True
    )
    assert planned == [
        PlannedTask(DeviceRef("pk1", "busy"), S.QUEUED, replaces_busy=True),
        PlannedTask(DeviceRef("pk1", "free"), S.QUEUED, replaces_busy=False),
    ]


def test_plan_without_overwrite_skips_busy_devices() -> None:
    """Without overwrite a busy device is skipped as busy and nothing replaces its task."""
    [task] = plan_tasks(make_firmware(), [candidate("busy", OLD, busy=True)])
    assert task == PlannedTask(DeviceRef("pk1", "busy"), S.SKIPPED, SkipReason.BUSY)
    assert not task.replaces_busy


def test_plan_overwrite_still_skips_devices_on_target() -> None:
    """Overwrite does not upgrade a busy device that already runs the target version."""
    [task] = plan_tasks(make_firmware(), [candidate("busy", TARGET, busy=True)], overwrite=True)
    assert task.state is S.SKIPPED
    assert task.desc == SkipReason.ALREADY_ON_TARGET
    assert not task.replaces_busy


def test_plan_overwrite_with_need_confirm_starts_in_confirm() -> None:
    """A busy device taken over by overwrite starts in confirm when the job needs confirmation."""
    [task] = plan_tasks(make_firmware(), [candidate("b", OLD, busy=True)], overwrite=True, need_confirm=True)
    assert task.state is S.CONFIRM
    assert task.replaces_busy


def test_plan_gray_percent_leaves_unsampled_devices_out() -> None:
    """Unsampled devices (listed or not, even busy or on target) get no task at all, not even a skip."""
    cands = (
        [candidate(f"a{i:03d}", OLD) for i in range(100)]
        + [candidate(f"b{i:03d}", OLD, listed=False) for i in range(100)]
        + [candidate(f"c{i:03d}", TARGET) for i in range(50)]
        + [candidate(f"d{i:03d}", OLD, busy=True) for i in range(50)]
    )
    planned = plan_tasks(make_firmware(), cands, gray_percent=30, seed="job-42")
    sampled = {c.device for c in cands if in_gray_sample("job-42", c.device, 30)}
    assert {p.device for p in planned} == sampled
    assert 0 < len(sampled) < len(cands)
    by_device = {p.device: p for p in planned}
    for c in cands:
        if c.device not in sampled:
            continue
        p = by_device[c.device]
        if c.current_version == TARGET:
            assert p.desc == SkipReason.ALREADY_ON_TARGET
        elif c.busy:
            assert p.desc == SkipReason.BUSY
        else:
            assert p.state is S.QUEUED


def test_plan_gray_sample_depends_on_the_seed() -> None:
    """Two jobs with different seeds sample different devices."""
    cands = [candidate(f"d{i:03d}", OLD) for i in range(100)]
    one = plan_tasks(make_firmware(), cands, gray_percent=50, seed="a")
    two = plan_tasks(make_firmware(), cands, gray_percent=50, seed="b")
    assert {p.device for p in one} != {p.device for p in two}


@pytest.mark.parametrize(("percent", "kept"), [(0, 0), (100, 20)])
def test_plan_gray_percent_bounds(percent: float, kept: int) -> None:
    """A 0 % gray job plans nothing and a 100 % one plans every device."""
    cands = [candidate(f"d{i:02d}", OLD) for i in range(20)]
    assert len(plan_tasks(make_firmware(), cands, gray_percent=percent, seed="x")) == kept


def test_plan_phases_assign_groups_in_device_order() -> None:
    """Phases number the tasks that will run in device order; skipped tasks stay in group 0 and are not counted."""
    names = [f"d{i:02d}" for i in range(12)]
    cands = [
        candidate(n, TARGET if n == "d03" else OLD, busy=n == "d07")
        for n in reversed(names)  # given out of order: the plan is in device order
    ]
    planned = plan_tasks(make_firmware(), cands, phases=[20, 30, 50])
    assert [p.device.device_name for p in planned] == names
    skipped = {p.device.device_name: p.group_no for p in planned if p.state is S.SKIPPED}
    assert skipped == {"d03": 0, "d07": 0}
    running = [p.group_no for p in planned if p.state is S.QUEUED]
    assert running == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_plan_without_phases_keeps_group_zero() -> None:
    """Without phases every planned task is in group 0."""
    planned = plan_tasks(make_firmware(), [candidate(f"d{i}", OLD) for i in range(5)])
    assert {p.group_no for p in planned} == {0}


def test_plan_differential_firmware_keeps_only_its_source_version() -> None:
    """A differential package runs only on devices on its src_version; product matches on others are left out."""
    firmware = make_firmware(src_version=OLD)
    cands = [
        candidate("a-listed-on-src", OLD),
        candidate("b-matched-on-src", OLD, listed=False),
        candidate("c-matched-other", "1.5.0", listed=False),
        candidate("d-matched-unknown", None, listed=False),
        candidate("e-listed-other", "1.5.0"),
        candidate("f-matched-on-target", TARGET, listed=False),
    ]
    planned = plan_tasks(firmware, cands, src_versions=["1.5.0", TARGET])
    assert planned == [
        PlannedTask(DeviceRef("pk1", "a-listed-on-src"), S.QUEUED),
        PlannedTask(DeviceRef("pk1", "b-matched-on-src"), S.QUEUED),
        PlannedTask(DeviceRef("pk1", "e-listed-other"), S.SKIPPED, SkipReason.SRC_VERSION_MISMATCH),
    ]


def test_plan_differential_firmware_with_phases_groups_only_runnable_tasks() -> None:
    """With a differential package, phases split only the devices on its source version."""
    firmware = make_firmware(src_version=OLD)
    cands = [candidate(f"d{i}", OLD if i % 2 == 0 else "1.5.0") for i in range(8)]
    planned = plan_tasks(firmware, cands, phases=[50, 50])
    assert [p.group_no for p in planned if p.state is S.QUEUED] == [0, 0, 1, 1]
    assert all(p.group_no == 0 for p in planned if p.state is S.SKIPPED)


# ----------------------------------------------------------------------------------------- job_state


@pytest.mark.parametrize("task_counts", [{}, {S.QUEUED: 5}, {S.SUCCEEDED: 3}, {S.CONFIRM: 1, S.SKIPPED: 2}])
def test_running_job_before_schedule_at_is_scheduled(task_counts: dict[TaskState, int]) -> None:
    """A stored running job whose schedule_at lies ahead is reported as scheduled, whatever its counts."""
    assert job_state(JobState.RUNNING, task_counts, schedule_at=NOW + 60, now=NOW) is JobState.SCHEDULED
    assert job_state(JobState.RUNNING, task_counts, schedule_at=NOW + 0.001, now=NOW) is JobState.SCHEDULED


@pytest.mark.parametrize("late", [0.0, 1.0, 86_400.0])
@pytest.mark.parametrize("state", sorted(UNFINISHED))
def test_job_at_or_after_schedule_at_with_unfinished_tasks_is_running(state: TaskState, late: float) -> None:
    """From schedule_at on, a job with an unfinished task is running."""
    task_counts = {S.SUCCEEDED: 2, state: 1}
    assert job_state(JobState.RUNNING, task_counts, schedule_at=NOW, now=NOW + late) is JobState.RUNNING


@pytest.mark.parametrize("late", [0.0, 1.0])
def test_job_at_or_after_schedule_at_with_only_finished_tasks_is_completed(late: float) -> None:
    """From schedule_at on, a job whose tasks are all terminal is completed."""
    task_counts = {S.SUCCEEDED: 2, S.FAILED: 1, S.SKIPPED: 4, S.QUEUED: 0}
    assert job_state(JobState.RUNNING, task_counts, schedule_at=NOW, now=NOW + late) is JobState.COMPLETED


@pytest.mark.parametrize("stored", [JobState.PAUSED, JobState.CANCELLED])
@pytest.mark.parametrize("schedule_at", [None, NOW - 60, NOW + 60])
def test_paused_and_cancelled_jobs_stay_as_stored(stored: JobState, schedule_at: float | None) -> None:
    """Paused and cancelled jobs keep their stored state, before or after schedule_at, whatever the counts."""
    for task_counts in ({S.QUEUED: 3}, {S.SUCCEEDED: 3}, {}):
        assert job_state(stored, task_counts, schedule_at=schedule_at, now=NOW) is stored


# -------------------------------------------------------------------- gating and verify outcome


@pytest.mark.parametrize(
    ("job", "group", "paced", "pulled", "allowed"),
    [
        (JobState.RUNNING, 0, False, False, True),
        (JobState.RUNNING, 0, True, False, False),
        (JobState.RUNNING, 0, True, True, True),
        (JobState.RUNNING, 1, False, True, False),
        (JobState.SCHEDULED, 0, False, True, False),
        (JobState.PAUSED, 0, False, False, False),
        (JobState.CANCELLED, 0, False, True, False),
    ],
)
def test_may_notify_queued(job: JobState, group: int, paced: bool, pulled: bool, allowed: bool) -> None:
    """A queued task is handed out on connect only in a running job, in a started phase, and (for a push)
    only when the job is not paced; a pull is answered even in a paced job."""
    assert machine.may_notify_queued(job, group, 0, paced=paced, pulled=pulled) is allowed


def test_verify_outcome() -> None:
    """A verify job verifies its firmware only when every task it ran succeeded (skipped ones do not count)."""
    ok = {TaskState.SUCCEEDED: 3, TaskState.SKIPPED: 1}
    assert machine.verify_outcome(ok) is FirmwareStatus.VERIFIED
    assert (
        machine.verify_outcome({TaskState.SUCCEEDED: 2, TaskState.FAILED: 1}) is FirmwareStatus.VERIFY_FAILED
    )
    assert machine.verify_outcome({TaskState.TIMED_OUT: 1}) is FirmwareStatus.VERIFY_FAILED
    assert machine.verify_outcome({TaskState.SKIPPED: 2}) is FirmwareStatus.VERIFY_FAILED
