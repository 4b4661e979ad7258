"""Jobs of the built-in queue: submit, assign (FIFO), report, cancel, requeue."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.model import (
    ACTIVE_JOB_STATES,
    TAKING_JOBS_STATES,
    VM,
    EventKind,
    Job,
    JobChange,
    JobState,
    Reason,
    VMState,
    check_job,
    finish,
    requeue,
    state_for_slots,
)
from core.store.errors import Conflict, NotFound
from core.store.vms import VMs

FINISHED_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class JobSpec:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    max_attempts: int = 3


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        command=json.loads(row["command"]),
        env=json.loads(row["env"]),
        wall_time_s=row["wall_time_s"],
        state=JobState(row["state"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        vm_id=row["vm_id"],
        slot=row["slot"],
        submitted_at=row["submitted_at"],
        assigned_at=row["assigned_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        output_tail=row["output_tail"],
        reason=row["reason"],
        kind=row["kind"],
        alien_job_id=row["alien_job_id"],
    )


@dataclass(frozen=True, slots=True)
class Submitted:
    jobs: int
    submissions: int
    first_at: float | None


class Jobs(VMs):
    def submit_job(
        self,
        command: list[str],
        now: float,
        *,
        env: dict[str, str] | None = None,
        wall_time_s: float | None = None,
        max_attempts: int = 3,
    ) -> Job:
        [job_id] = self.submit_jobs([JobSpec(command, env or {}, wall_time_s, max_attempts)], now)
        return self.job(job_id)

    def submit_jobs(self, specs: Iterable[JobSpec], now: float) -> list[int]:
        """Queue jobs in one transaction (a batch is all or nothing); returns their ids."""
        ids = []
        with self._tx():
            for spec in specs:
                cur = self._db.execute(
                    "INSERT INTO jobs(command, env, wall_time_s, state, attempt, max_attempts, "
                    "submitted_at) VALUES (?,?,?,?,?,?,?)",
                    (
                        json.dumps(spec.command),
                        json.dumps(spec.env),
                        spec.wall_time_s,
                        JobState.QUEUED,
                        1,
                        spec.max_attempts,
                        now,
                    ),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
                self._event(now, EventKind.JOB_QUEUED, "submitted", job_id=cur.lastrowid)
        return ids

    def job(self, job_id: int) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return _job(row)

    def jobs(
        self,
        state: JobState | None = None,
        limit: int = 1000,
        before: int | None = None,
        kind: str | None = None,
    ) -> list[Job]:
        """Newest first without a state; oldest first (queue order) with one. ``before``
        pages backwards through the newest-first listing. ``kind``: only "job" (the queue's)
        or only "pilot" (pilot runs) records."""
        of_kind, kinds = ("AND kind = ? ", (kind,)) if kind is not None else ("", ())
        if state is None:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE id < ? {of_kind}ORDER BY id DESC LIMIT ?",
                (before if before is not None else 2**63 - 1, *kinds, limit),
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state = ? AND id > ? {of_kind}ORDER BY id LIMIT ?",
                (state, before if before is not None else 0, *kinds, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def job_counts(self, kind: str = "job") -> dict[JobState, int]:
        """Records by state: the queue's jobs, or (``kind="pilot"``) the pilot runs."""
        counts = dict.fromkeys(JobState, 0)
        for row in self._db.execute(
            "SELECT state, COUNT(*) AS n FROM jobs WHERE kind = ? GROUP BY state", (kind,)
        ):
            counts[JobState(row["state"])] = row["n"]
        return counts

    def slots_used(self) -> int:
        """Slots that hold a job, on every VM."""
        count: int = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE slot IS NOT NULL"
        ).fetchone()[0]
        return count

    def queued_count(self) -> int:
        count: int = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState.QUEUED,)
        ).fetchone()[0]
        return count

    def submitted_since(self, since: float) -> Submitted:
        """The jobs submitted at or after ``since``: how many, in how many submissions (a batch
        shares one time), and when the first was."""
        jobs, submissions, first = self._db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT submitted_at), MIN(submitted_at) FROM jobs "
            "WHERE submitted_at >= ? AND kind = 'job'",
            (since,),
        ).fetchone()
        return Submitted(jobs, submissions, first)

    def finished_since(self, since: float) -> int:
        """Queue jobs that ended (done or failed) at or after ``since``: each freed a slot."""
        count: int = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE finished_at >= ? AND state IN (?, ?) AND kind = 'job'",
            (since, JobState.DONE, JobState.FAILED),
        ).fetchone()[0]
        return count

    def cancel_job(self, job_id: int, now: float) -> Job:
        """Cancel a job. A job on a VM keeps its slot (the VM busy) until its agent reports
        that it stopped the job, or the VM goes; the agent learns from its next heartbeat."""
        with self._tx():
            job = self.job(job_id)
            if job.kind == "pilot":
                raise Conflict(
                    f"job {job_id} is a pilot run, which the core cannot stop: "
                    f"drain or kill its VM ({job.vm_id})"
                )
            if job.state not in (JobState.QUEUED, *ACTIVE_JOB_STATES):
                raise Conflict(f"job {job_id} is {job.state}, it cannot be cancelled")
            self._set_job(job, JobState.CANCELLED, finished_at=now, reason="cancelled by admin")
            self._event(
                now,
                EventKind.JOB_CANCELLED,
                "cancelled by admin",
                job_id=job_id,
                vm_id=job.vm_id,
                reason=Reason.CANCELLED,
            )
        return self.job(job_id)

    def cancelled_on(self, vm: VM) -> list[int]:
        """Jobs cancelled while on this VM (still holding their slots) that its agent has not
        yet stopped."""
        if not vm.jobs:
            return []
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE vm_id = ? AND slot IS NOT NULL AND state = ? ORDER BY slot",
            (vm.id, JobState.CANCELLED),
        ).fetchall()
        return [row["id"] for row in rows]

    def assign_next_job(self, vm_id: str, now: float, slot: int = 0) -> Job | None:
        """Give the oldest queued job (FIFO) to a free slot of an idle or busy VM, or None if
        the queue is empty. An empty queue is answered without a write transaction: most
        polls of a large fleet find nothing, and each asks twice (on arrival and at its end)."""
        queued = "SELECT 1 FROM jobs WHERE state = ? LIMIT 1"
        if self._db.execute(queued, (JobState.QUEUED,)).fetchone() is None:
            return None
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state not in TAKING_JOBS_STATES:
                raise Conflict(f"vm {vm_id} is {vm.state}, it cannot take a job")
            if slot in vm.jobs:
                raise Conflict(f"slot {slot} of vm {vm_id} holds job {vm.jobs[slot]}")
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY id LIMIT 1", (JobState.QUEUED,)
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            self._set_job(job, JobState.ASSIGNED, vm_id=vm_id, slot=slot, assigned_at=now)
            self._db.execute(
                "INSERT INTO assignments(job_id, attempt, vm_id, assigned_at, slot) "
                "VALUES (?,?,?,?,?)",
                (job.id, job.attempt, vm_id, now, slot),
            )
            self._vm_holds(vm, len(vm.jobs) + 1, now, f"assigned job {job.id}", Reason.JOB_ASSIGNED)
            self._event(
                now,
                EventKind.JOB_ASSIGNED,
                f"attempt {job.attempt} on {vm_id}" + (f" slot {slot}" if slot else ""),
                vm_id=vm_id,
                job_id=job.id,
            )
        return self.job(job.id)

    def last_job_of_vm(self, vm_id: str) -> Job | None:
        row = self._db.execute(
            "SELECT job_id FROM assignments WHERE vm_id = ? ORDER BY assigned_at DESC LIMIT 1",
            (vm_id,),
        ).fetchone()
        return self.job(row["job_id"]) if row else None

    def was_assigned(self, job_id: int, vm_id: str) -> bool:
        """Whether any attempt of the job was ever given to this VM (a report from a VM that
        never had the job is forbidden; one from an earlier attempt is merely stale)."""
        row = self._db.execute(
            "SELECT 1 FROM assignments WHERE job_id = ? AND vm_id = ? LIMIT 1", (job_id, vm_id)
        ).fetchone()
        return row is not None

    def _current_attempt(self, job_id: int, attempt: int, vm_id: str) -> Job | None:
        """The job if this (attempt, VM) still owns it; None for a stale report."""
        job = self.job(job_id)
        if job.attempt != attempt or job.vm_id != vm_id:
            return None
        return job

    def start_job(self, job_id: int, attempt: int, vm_id: str, now: float) -> Job | None:
        """The agent started the job. Repeats are no-ops; a stale attempt returns None."""
        with self._tx():
            job = self._current_attempt(job_id, attempt, vm_id)
            if job is None or job.state != JobState.ASSIGNED:
                return job
            self._set_job(job, JobState.RUNNING, started_at=now)
            self._event(
                now, EventKind.JOB_RUNNING, f"attempt {attempt}", vm_id=vm_id, job_id=job_id
            )
        return self.job(job_id)

    def finish_job(
        self,
        job_id: int,
        attempt: int,
        vm_id: str,
        exit_code: int | None,
        output_tail: str,
        now: float,
    ) -> Job | None:
        """Record a job's end, once per (job, attempt): a retried report changes nothing. A
        cancelled job keeps its state; its VM is released and its output kept."""
        with self._tx():
            job = self._current_attempt(job_id, attempt, vm_id)
            if job is None:
                return None
            if job.state == JobState.CANCELLED:
                if job.exit_code is None and exit_code is not None:
                    self._db.execute(
                        "UPDATE jobs SET exit_code = ?, output_tail = ? WHERE id = ?",
                        (exit_code, output_tail, job_id),
                    )
                self._release_cancelled(vm_id, job_id, now, "stopped")
                return self.job(job_id)
            if job.state not in ACTIVE_JOB_STATES:
                return job
            code = exit_code if exit_code is not None else -1
            self._apply(job, finish(job, code, output_tail, now), now, vm_id=vm_id)
            self._release_vm(vm_id, job_id, now)
        return self.job(job_id)

    def _release_vm(self, vm_id: str, job_id: int, now: float) -> bool:
        """The job lets go of its slot (False: it held none); the VM is idle once its last
        slot is free."""
        vm = self.vm(vm_id)
        if job_id not in vm.jobs.values():
            return False
        self._db.execute("UPDATE jobs SET slot = NULL WHERE id = ?", (job_id,))
        self._vm_holds(vm, len(vm.jobs) - 1, now, f"job {job_id} ended", Reason.JOB_ENDED)
        return True

    def _vm_holds(self, vm: VM, used: int, now: float, why: str, reason: Reason) -> None:
        """The VM's state once ``used`` of its slots hold jobs (``model.state_for_slots``)."""
        new = state_for_slots(vm.state, used)
        if new != vm.state:
            self.transition_vm(vm.id, new, now, why, reason)

    def _stopped_serving(self, vm: VM, now: float, why: str, spend_attempt: bool) -> None:
        """Every job it holds lets go of its slot, and each active one goes back to the queue;
        its pilot runs end (they cannot go on)."""
        reason = Reason.VM_STOPPED_SERVING if spend_attempt else Reason.SPOT_TERMINATION
        for slot in sorted(vm.jobs):
            job = self.job(vm.jobs[slot])
            change = requeue(job, now, why, reason, spend_attempt=spend_attempt)
            if change is not None:
                self._apply(job, change, now)
            else:
                self._db.execute("UPDATE jobs SET slot = NULL WHERE id = ?", (job.id,))
        for row in self._db.execute(
            "SELECT * FROM jobs WHERE vm_id = ? AND state = ? AND kind = 'pilot'",
            (vm.id, JobState.RUNNING),
        ).fetchall():
            self._apply(
                _job(row),
                JobChange(
                    JobState.FAILED,
                    {"finished_at": now, "reason": why},
                    EventKind.JOB_FAILED,
                    f"pilot run ended with its VM: {why}",
                    Reason.VM_STOPPED_SERVING,
                ),
                now,
                vm_id=vm.id,
            )

    def interrupt_vm(self, vm_id: str, now: float, why: str) -> VM:
        """The cloud announced it reclaims the VM: its jobs go back to the queue at once,
        without spending an attempt, and the VM is replaced."""
        return self.transition_vm(
            vm_id, VMState.INTERRUPTED, now, why, Reason.SPOT_TERMINATION, spend_attempt=False
        )

    def set_pilot_busy(self, vm_id: str, busy: bool, now: float) -> VM:
        """A VM without a queue job is busy while its pilot works on a real job (a run
        longer than ``alien.idle_run_s``): it is not reaped, and a drained one is terminated
        only once its pilot is done. An idle or busy VM shows it in its state too."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.jobs or vm.pilot_busy == busy:
                return vm
            if vm.state not in (VMState.IDLE, VMState.BUSY, VMState.DRAINING):
                return vm
            self._db.execute("UPDATE vms SET pilot_busy = ? WHERE id = ?", (int(busy), vm_id))
            if busy and vm.state == VMState.IDLE:
                self.transition_vm(
                    vm_id, VMState.BUSY, now, "its pilot is running a job", Reason.PILOT_WORKING
                )
            elif not busy and vm.state == VMState.BUSY:
                self.transition_vm(
                    vm_id, VMState.IDLE, now, "its pilot is idle", Reason.PILOT_WORKING
                )
        return self.vm(vm_id)

    def release_cancelled(self, vm_id: str, job_id: int, now: float) -> None:
        """A job cancelled before its VM's agent ever received it: its slot is free again."""
        with self._tx():
            self._release_cancelled(vm_id, job_id, now, "never started")

    def _release_cancelled(self, vm_id: str, job_id: int, now: float, how: str) -> None:
        """An event names the VM and job even when the VM's state stays (other slots busy):
        followers of the event stream (the console) learn of the freed slot from it."""
        if self._release_vm(vm_id, job_id, now):
            self._event(
                now,
                EventKind.JOB_CANCELLED,
                f"{how} on {vm_id}; its slot is free",
                vm_id=vm_id,
                job_id=job_id,
            )

    def has_pilot_runs(self, vm_id: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE vm_id = ? AND kind = 'pilot' LIMIT 1", (vm_id,)
        ).fetchone()
        return row is not None

    def record_run(
        self,
        vm: VM,
        run_key: str,
        command: list[str],
        now: float,
        *,
        finished: bool,
        exit_code: int | None,
        output_tail: str,
        alien_job_id: str | None,
        idle: bool | None,
    ) -> Job:
        """A pilot run a VM reported, kept as a job record of kind "pilot" (started, then
        finished); reports are idempotent by the run's key."""
        with self._tx():
            row = self._db.execute("SELECT * FROM jobs WHERE run_key = ?", (run_key,)).fetchone()
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO jobs(command, env, state, attempt, max_attempts, vm_id, "
                    "submitted_at, assigned_at, started_at, kind, run_key) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        json.dumps(command),
                        "{}",
                        JobState.RUNNING,
                        1,
                        1,
                        vm.id,
                        now,
                        now,
                        now,
                        "pilot",
                        run_key,
                    ),
                )
                assert cur.lastrowid is not None
                job = self.job(cur.lastrowid)
                self._event(
                    now, EventKind.JOB_RUNNING, "pilot run started", vm_id=vm.id, job_id=job.id
                )
            else:
                job = _job(row)
            if finished and job.state == JobState.RUNNING:
                code = exit_code if exit_code is not None else -1
                state = JobState.DONE if code == 0 or idle else JobState.FAILED
                self._set_job(
                    job,
                    state,
                    finished_at=now,
                    exit_code=exit_code,
                    output_tail=output_tail,
                    alien_job_id=alien_job_id,
                    reason="no job for the pilot" if idle else None,
                )
                named = f", AliEn job {alien_job_id}" if alien_job_id else ""
                self._event(
                    now,
                    EventKind.for_job(state),
                    f"pilot run ended: exit code {exit_code}{named}" + (" (idle)" if idle else ""),
                    vm_id=vm.id,
                    job_id=job.id,
                )
        return self.job(job.id)

    def _apply(self, job: Job, change: JobChange, now: float, vm_id: str | None = None) -> None:
        self._set_job(job, change.state, **change.columns)
        self._event(
            now, change.kind, change.message, job_id=job.id, vm_id=vm_id, reason=change.reason
        )

    def _set_job(self, job: Job, new: JobState, **columns: Any) -> None:
        check_job(job.state, new)
        columns["state"] = new
        sets = ", ".join(f"{name} = ?" for name in columns)
        self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*columns.values(), job.id))

    def prune_jobs(self, before: float, batch: int) -> int:
        """Delete up to ``batch`` jobs that finished before ``before`` (and their assignment
        records); returns how many went."""
        marks = ",".join("?" * len(FINISHED_STATES))
        with self._tx():
            ids = [
                row[0]
                for row in self._db.execute(
                    f"SELECT id FROM jobs WHERE finished_at < ? AND state IN ({marks}) "
                    "AND slot IS NULL "
                    "ORDER BY finished_at LIMIT ?",
                    (before, *FINISHED_STATES, batch),
                )
            ]
            if ids:
                id_marks = ",".join("?" * len(ids))
                self._db.execute(f"DELETE FROM assignments WHERE job_id IN ({id_marks})", ids)
                self._db.execute(f"DELETE FROM jobs WHERE id IN ({id_marks})", ids)
        return len(ids)

    def prune_vms(self, before: float, batch: int) -> int:
        """Delete up to ``batch`` VMs terminated before ``before``."""
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM vms WHERE id IN (SELECT id FROM vms WHERE state = ? "
                "AND state_since < ? LIMIT ?)",
                (VMState.TERMINATED, before, batch),
            )
        return cur.rowcount
