from __future__ import annotations

import itertools

import pytest

from core.model import (
    JOB_TRANSITIONS,
    VM_TRANSITIONS,
    IllegalTransition,
    JobState,
    VMState,
    check_job,
    check_vm,
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
