"""States, their allowed transitions, and the records the store keeps.

The transition tables are the one place that says what may follow what; ``check_vm`` and
``check_job`` raise at once on anything else, so a bug cannot quietly corrupt the pool.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class IllegalTransition(Exception):
    """A state change the state machine does not allow."""


class VMState(enum.StrEnum):
    REQUESTED = "requested"  # RunInstances returned it; the cloud has not reported it running
    BOOTING = "booting"  # running in the cloud, its agent has not registered yet
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # gets no new job; terminated once idle
    TERMINATING = "terminating"  # TerminateInstances asked for or about to be
    TERMINATED = "terminated"
    FAILED = "failed"  # never registered within boot_timeout_s
    LOST = "lost"  # stopped heartbeating


VM_TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.REQUESTED: frozenset(
        {VMState.BOOTING, VMState.IDLE, VMState.FAILED, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.BOOTING: frozenset(
        {VMState.IDLE, VMState.FAILED, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.IDLE: frozenset(
        {VMState.BUSY, VMState.DRAINING, VMState.LOST, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.BUSY: frozenset(
        {VMState.IDLE, VMState.DRAINING, VMState.LOST, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.DRAINING: frozenset({VMState.LOST, VMState.TERMINATING, VMState.TERMINATED}),
    VMState.FAILED: frozenset({VMState.TERMINATING, VMState.TERMINATED}),
    VMState.LOST: frozenset({VMState.TERMINATING, VMState.TERMINATED}),
    VMState.TERMINATING: frozenset({VMState.TERMINATED}),
    VMState.TERMINATED: frozenset(),
}

# VMs that count against the pool's max_vms: they are (or will be) serving jobs.
SERVING_STATES = frozenset(
    {VMState.REQUESTED, VMState.BOOTING, VMState.IDLE, VMState.BUSY, VMState.DRAINING}
)
# VMs that still exist in the cloud and count against its quota.
ALIVE_STATES = frozenset(set(VMState) - {VMState.TERMINATED})
# VMs whose agent is expected to heartbeat.
HEARTBEATING_STATES = frozenset({VMState.IDLE, VMState.BUSY, VMState.DRAINING})


class JobState(enum.StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.ASSIGNED, JobState.CANCELLED, JobState.FAILED}),
    JobState.ASSIGNED: frozenset(
        {JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.DONE, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
ACTIVE_JOB_STATES = frozenset({JobState.ASSIGNED, JobState.RUNNING})


class LaunchState(enum.StrEnum):
    PENDING = "pending"  # intent written, RunInstances result not yet recorded
    DONE = "done"
    FAILED = "failed"


def check_vm(old: VMState, new: VMState) -> None:
    if new not in VM_TRANSITIONS[old]:
        raise IllegalTransition(f"vm: {old} -> {new} is not allowed")


def check_job(old: JobState, new: JobState) -> None:
    if new not in JOB_TRANSITIONS[old]:
        raise IllegalTransition(f"job: {old} -> {new} is not allowed")


@dataclass(slots=True)
class VM:
    id: str  # the cloud's instance id
    cloud: str
    launch_id: str
    state: VMState
    launched_at: float
    state_since: float
    registered_at: float | None = None
    last_heartbeat: float | None = None
    idle_since: float | None = None
    job_id: int | None = None
    address: str | None = None
    kill_requested: bool = False


@dataclass(slots=True)
class Job:
    id: int
    command: list[str]
    state: JobState
    submitted_at: float
    attempt: int = 1
    max_attempts: int = 3
    env: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    vm_id: str | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    output_tail: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class Launch:
    id: str
    cloud: str
    count: int
    client_token: str
    state: LaunchState
    created_at: float
    instance_ids: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    kind: str
    message: str
    vm_id: str | None = None
    job_id: int | None = None
    cloud: str | None = None


@dataclass(slots=True)
class CloudStatus:
    """What the core remembers about a cloud between cycles (and restarts)."""

    name: str
    backoff_until: float = 0.0
    backoff_level: int = 0
    boot_failures: int = 0
    last_error: str | None = None
