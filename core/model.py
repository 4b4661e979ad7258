"""States, their allowed transitions, and the records the store keeps.

The transition tables are the one place that says what may follow what; ``check_vm`` and
``check_job`` raise at once on anything else, so a bug cannot quietly corrupt the pool.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    INTERRUPTED = "interrupted"  # the cloud reclaims it (a Spot termination notice)


VM_TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.REQUESTED: frozenset(
        {VMState.BOOTING, VMState.IDLE, VMState.FAILED, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.BOOTING: frozenset(
        {VMState.IDLE, VMState.FAILED, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.IDLE: frozenset(
        {
            VMState.BUSY,
            VMState.DRAINING,
            VMState.LOST,
            VMState.INTERRUPTED,
            VMState.TERMINATING,
            VMState.TERMINATED,
        }
    ),
    VMState.BUSY: frozenset(
        {
            VMState.IDLE,
            VMState.DRAINING,
            VMState.LOST,
            VMState.INTERRUPTED,
            VMState.TERMINATING,
            VMState.TERMINATED,
        }
    ),
    VMState.DRAINING: frozenset(
        {VMState.LOST, VMState.INTERRUPTED, VMState.TERMINATING, VMState.TERMINATED}
    ),
    VMState.FAILED: frozenset({VMState.TERMINATING, VMState.TERMINATED}),
    VMState.LOST: frozenset({VMState.TERMINATING, VMState.TERMINATED}),
    VMState.INTERRUPTED: frozenset({VMState.TERMINATING, VMState.TERMINATED}),
    VMState.TERMINATING: frozenset({VMState.TERMINATED}),
    VMState.TERMINATED: frozenset(),
}

# VMs that no longer serve jobs: a job still on one goes back to the queue.
STOPPED_SERVING_STATES = frozenset(
    {VMState.TERMINATING, VMState.TERMINATED, VMState.LOST, VMState.FAILED, VMState.INTERRUPTED}
)
# VMs that have left: their token no longer authenticates (an interrupted or terminating VM
# still hears "stop" on its heartbeat).
TOKEN_REVOKED_STATES = frozenset({VMState.TERMINATED, VMState.LOST, VMState.FAILED})
# VMs that count against the pool's max_vms: they are (or will be) serving jobs.
SERVING_STATES = frozenset(
    {VMState.REQUESTED, VMState.BOOTING, VMState.IDLE, VMState.BUSY, VMState.DRAINING}
)
# VMs that still exist in the cloud and count against its quota.
ALIVE_STATES = frozenset(set(VMState) - {VMState.TERMINATED})
# VMs whose agent is expected to heartbeat.
HEARTBEATING_STATES = frozenset({VMState.IDLE, VMState.BUSY, VMState.DRAINING})
# VMs launched whose agent has not registered yet (the boot timeout runs).
STARTING_STATES = frozenset({VMState.REQUESTED, VMState.BOOTING})


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


class EventKind(enum.StrEnum):
    """Every kind of event the core records; the API, the console and the demo use these
    values, never the message text."""

    SETTING_CHANGED = "setting_changed"
    LAUNCH_REQUESTED = "launch_requested"
    LAUNCH_DONE = "launch_done"
    LAUNCH_FAILED = "launch_failed"
    LAUNCH_SKIPPED = "launch_skipped"  # not made: it would pass pool.max_cost_per_hour
    PLACEMENT_BACKOFF = "placement_backoff"  # one (instance type, subnet) of a cloud rests
    CLOUD_BACKOFF = "cloud_backoff"
    CLOUD_RECOVERED = "cloud_recovered"
    RECONCILE_FAILED = "reconcile_failed"
    DESCRIBE_FAILED = "describe_failed"
    TERMINATE_FAILED = "terminate_failed"
    DEMAND_ERROR = "demand_error"
    STATE_PRUNED = "state_pruned"
    VM_ADOPTED = "vm_adopted"
    VM_KILL_REQUESTED = "vm_kill_requested"
    VM_REQUESTED = "vm_requested"
    VM_BOOTING = "vm_booting"
    VM_IDLE = "vm_idle"
    VM_BUSY = "vm_busy"
    VM_DRAINING = "vm_draining"
    VM_TERMINATING = "vm_terminating"
    VM_TERMINATED = "vm_terminated"
    VM_FAILED = "vm_failed"
    VM_LOST = "vm_lost"
    VM_INTERRUPTED = "vm_interrupted"
    PILOT_RUN = "pilot_run"
    JOB_QUEUED = "job_queued"
    JOB_ASSIGNED = "job_assigned"
    JOB_RUNNING = "job_running"
    JOB_DONE = "job_done"
    JOB_FAILED = "job_failed"
    JOB_REQUEUED = "job_requeued"
    JOB_CANCELLED = "job_cancelled"

    @classmethod
    def for_vm(cls, state: VMState) -> EventKind:
        return cls(f"vm_{state}")

    @classmethod
    def for_job(cls, state: JobState) -> EventKind:
        return cls(f"job_{state}")


class Reason(enum.StrEnum):
    """Why a VM or job changed state, as a code (the event's message says it in words)."""

    IDLE_TIMEOUT = "idle_timeout"
    ABOVE_MAX = "above_max"
    KILLED = "killed"
    DRAINED = "drained"
    DRAIN_REQUESTED = "drain_requested"
    BOOT_TIMEOUT = "boot_timeout"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    CLOUD_GONE = "cloud_gone"
    VANISHED = "vanished"
    TERMINATE_ACCEPTED = "terminate_accepted"
    REGISTERED = "registered"
    RUNNING_IN_CLOUD = "running_in_cloud"
    JOB_ASSIGNED = "job_assigned"
    JOB_ENDED = "job_ended"
    CANCELLED = "cancelled"
    EXIT_CODE = "exit_code"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    VM_STOPPED_SERVING = "vm_stopped_serving"
    SCALING = "scaling"
    BILLING_PERIOD = "billing_period"  # idle, and its paid period is about to end
    SPARE_CAPACITY = "spare_capacity"  # idle beyond what the warm target needs
    OUTDATED = "outdated"  # launched with settings that have changed since (a rollout)
    LIFETIME = "lifetime"  # older than pool.max_lifetime_s
    SPOT_TERMINATION = "spot_termination"
    SPOT_REBALANCE = "spot_rebalance"
    PILOT_WORKING = "pilot_working"


# Why an idle VM was reaped (the demo and the console count these).
REAP_REASONS = frozenset({Reason.IDLE_TIMEOUT, Reason.BILLING_PERIOD, Reason.SPARE_CAPACITY})


def check_vm(old: VMState, new: VMState) -> None:
    if new not in VM_TRANSITIONS[old]:
        raise IllegalTransition(f"vm: {old} -> {new} is not allowed")


def check_job(old: JobState, new: JobState) -> None:
    if new not in JOB_TRANSITIONS[old]:
        raise IllegalTransition(f"job: {old} -> {new} is not allowed")


def job_outcome(exit_code: int) -> JobState:
    """What a reported exit code makes of a job."""
    return JobState.DONE if exit_code == 0 else JobState.FAILED


@dataclass(frozen=True, slots=True)
class JobChange:
    """A job's next state and the columns that go with it, decided without touching SQL."""

    state: JobState
    columns: dict[str, Any]
    kind: EventKind
    message: str
    reason: Reason


def requeue(
    job: Job, now: float, why: str, reason: Reason, spend_attempt: bool = True
) -> JobChange | None:
    """A job whose VM stopped serving goes back to the queue with one more attempt, or fails
    once its attempts are used up. None when the job is no longer active. An interruption the
    cloud announced is nobody's fault: the job goes back without spending an attempt (its
    attempt number still grows, so a late report of the old attempt stays stale)."""
    if job.state not in ACTIVE_JOB_STATES:
        return None
    if not spend_attempt:
        return JobChange(
            JobState.QUEUED,
            {
                "attempt": job.attempt + 1,
                "max_attempts": job.max_attempts + 1,
                "vm_id": None,
                "slot": None,
                "assigned_at": None,
                "started_at": None,
                "reason": why,
            },
            EventKind.JOB_REQUEUED,
            f"attempt {job.attempt + 1} (not counted): {why}",
            reason,
        )
    if job.attempt >= job.max_attempts:
        return JobChange(
            JobState.FAILED,
            {"finished_at": now, "slot": None, "reason": why},  # keeps its VM: where it failed
            EventKind.JOB_FAILED,
            f"gave up after {job.attempt} attempts: {why}",
            Reason.ATTEMPTS_EXHAUSTED,
        )
    return JobChange(
        JobState.QUEUED,
        {
            "attempt": job.attempt + 1,
            "vm_id": None,
            "slot": None,
            "assigned_at": None,
            "started_at": None,
            "reason": why,
        },
        EventKind.JOB_REQUEUED,
        f"attempt {job.attempt + 1}: {why}",
        reason,
    )


def finish(job: Job, exit_code: int, output_tail: str, now: float) -> JobChange:
    """The end of a job's current attempt as its agent reported it."""
    state = job_outcome(exit_code)
    return JobChange(
        state,
        {
            "finished_at": now,
            "exit_code": exit_code,
            "output_tail": output_tail,
            "reason": None if exit_code == 0 else f"exit code {exit_code}",
        },
        EventKind.for_job(state),
        f"exit code {exit_code} on {job.vm_id}",
        Reason.EXIT_CODE,
    )


def vm_columns(new: VMState, now: float) -> dict[str, Any]:
    """What entering ``new`` does to a VM's columns: a VM that stops serving lets go of its
    pilot's work (its jobs let go of it: ``requeue``), and only an idle VM has an idle clock."""
    columns: dict[str, Any] = {
        "state": new,
        "state_since": now,
        "idle_since": now if new == VMState.IDLE else None,
    }
    if new in STOPPED_SERVING_STATES:
        columns.update(pilot_busy=0)
    return columns


# VMs whose free slots may take a job from the queue (a draining VM takes none).
TAKING_JOBS_STATES = frozenset({VMState.IDLE, VMState.BUSY})


def state_for_slots(state: VMState, used: int) -> VMState:
    """A VM is busy while any of its slots holds a job and idle (its idle clock starts) only
    when the last one frees; a VM in any other state keeps it (a draining VM is terminated
    once all its slots are free)."""
    if state == VMState.IDLE and used > 0:
        return VMState.BUSY
    if state == VMState.BUSY and used == 0:
        return VMState.IDLE
    return state


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
    address: str | None = None
    kill_requested: bool = False
    pilot_busy: bool = False  # its pilot (e.g. an AliEn JobAgent) runs a real job
    jobs: Mapping[int, int] = field(default_factory=dict)  # slot -> the queue job it holds

    @property
    def job_id(self) -> int | None:
        """The job in its lowest held slot: the one-job view older callers show."""
        return self.jobs[min(self.jobs)] if self.jobs else None


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
    slot: int | None = None  # the slot of vm_id it holds (None once it let go)
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    output_tail: str | None = None
    reason: str | None = None
    kind: str = "job"  # "job": the built-in queue's; "pilot": a pilot run a VM reported
    alien_job_id: str | None = None  # for a pilot run, the job its output named


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
    kind: str  # an EventKind value
    message: str
    vm_id: str | None = None
    job_id: int | None = None
    cloud: str | None = None
    reason: str | None = None  # a Reason value, when the event is a decision


@dataclass(slots=True)
class CloudStatus:
    """What the core remembers about a cloud between cycles (and restarts)."""

    name: str
    backoff_until: float = 0.0
    backoff_level: int = 0
    boot_failures: int = 0
    last_error: str | None = None
