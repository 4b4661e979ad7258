from __future__ import annotations

import itertools

import pytest

from core.model import (
    JOB_TRANSITIONS,
    VM_TRANSITIONS,
    IllegalTransition,
    Job,
    JobState,
    Reason,
    VMState,
    check_job,
    check_vm,
    requeue,
    state_for_slots,
)


def test_every_state_has_a_transition_row() -> None:
    assert set(VM_TRANSITIONS) == set(VMState)
    assert set(JOB_TRANSITIONS) == set(JobState)


def test_documented_vm_lifecycle_is_allowed() -> None:
    path = [VMState.REQUESTED, VMState.BOOTING, VMState.IDLE, VMState.BUSY, VMState.IDLE]
    path += [VMState.DRAINING, VMState.TERMINATING, VMState.TERMINATED]
    for old, new in itertools.pairwise(path):
        check_vm(old, new)
    check_vm(VMState.BOOTING, VMState.FAILED)
    check_vm(VMState.BUSY, VMState.LOST)
    check_vm(VMState.LOST, VMState.TERMINATING)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (VMState.TERMINATED, VMState.IDLE),
        (VMState.DRAINING, VMState.BUSY),
        (VMState.DRAINING, VMState.IDLE),
        (VMState.IDLE, VMState.BOOTING),
        (VMState.LOST, VMState.IDLE),
    ],
)
def test_illegal_vm_transitions_raise(old: VMState, new: VMState) -> None:
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        check_vm(old, new)


def test_finished_jobs_never_change_again() -> None:
    for final in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        with pytest.raises(IllegalTransition):
            check_job(final, JobState.QUEUED)


@pytest.mark.parametrize(
    ("state", "used", "expected"),
    [
        (VMState.IDLE, 0, VMState.IDLE),
        (VMState.IDLE, 1, VMState.BUSY),
        (VMState.BUSY, 3, VMState.BUSY),  # one of four slots freed: still busy
        (VMState.BUSY, 1, VMState.BUSY),
        (VMState.BUSY, 0, VMState.IDLE),  # the last slot freed
        (VMState.DRAINING, 0, VMState.DRAINING),  # the policy terminates it, not this rule
        (VMState.DRAINING, 2, VMState.DRAINING),
    ],
)
def test_a_vm_is_busy_while_any_slot_holds_a_job_and_idle_only_when_all_are_free(
    state: VMState, used: int, expected: VMState
) -> None:
    assert state_for_slots(state, used) == expected


def test_a_requeued_job_lets_go_of_its_vm_and_slot_with_or_without_spending_an_attempt() -> None:
    job = Job(1, ["x"], JobState.RUNNING, 0.0, attempt=1, max_attempts=3, vm_id="i-1", slot=2)
    for spend in (True, False):
        change = requeue(job, 5.0, "vm lost", Reason.VM_STOPPED_SERVING, spend_attempt=spend)
        assert change is not None and change.state == JobState.QUEUED
        assert (change.columns["vm_id"], change.columns["slot"]) == (None, None)
