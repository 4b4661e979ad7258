"""SQLite store: VMs, jobs, launches, cloud backoff, runtime settings and the event log.

One writer (the core's event loop thread). Every method that changes state commits before it
returns, together with the event that explains the change, so a caller may acknowledge or act
only after the change is durable. A core killed at any point restarts from exactly this file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.model import (
    ACTIVE_JOB_STATES,
    VM,
    CloudStatus,
    Event,
    Job,
    JobState,
    Launch,
    LaunchState,
    VMState,
    check_job,
    check_vm,
)

log = logging.getLogger("alienec2.events")

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY, cloud TEXT NOT NULL, launch_id TEXT NOT NULL, state TEXT NOT NULL,
    launched_at REAL NOT NULL, state_since REAL NOT NULL, registered_at REAL,
    last_heartbeat REAL, idle_since REAL, job_id INTEGER, address TEXT,
    kill_requested INTEGER NOT NULL DEFAULT 0, token_hash TEXT
);
CREATE INDEX IF NOT EXISTS vms_state ON vms(state);
CREATE UNIQUE INDEX IF NOT EXISTS vms_token ON vms(token_hash);
CREATE TABLE IF NOT EXISTS assignments (
    job_id INTEGER NOT NULL, attempt INTEGER NOT NULL, vm_id TEXT NOT NULL,
    assigned_at REAL NOT NULL, PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, env TEXT NOT NULL,
    wall_time_s REAL, state TEXT NOT NULL, attempt INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
    vm_id TEXT, submitted_at REAL NOT NULL, assigned_at REAL, started_at REAL,
    finished_at REAL, exit_code INTEGER, output_tail TEXT, reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs(submitted_at);
CREATE TABLE IF NOT EXISTS launches (
    id TEXT PRIMARY KEY, cloud TEXT NOT NULL, count INTEGER NOT NULL, client_token TEXT NOT NULL,
    state TEXT NOT NULL, created_at REAL NOT NULL,
    instance_ids TEXT NOT NULL DEFAULT '[]', error TEXT
);
CREATE INDEX IF NOT EXISTS launches_state ON launches(state);
CREATE TABLE IF NOT EXISTS clouds (
    name TEXT PRIMARY KEY, backoff_until REAL NOT NULL, backoff_level INTEGER NOT NULL,
    boot_failures INTEGER NOT NULL, last_error TEXT
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL, vm_id TEXT, job_id INTEGER, cloud TEXT
);
CREATE INDEX IF NOT EXISTS events_vm ON events(vm_id, seq);
"""


@dataclass(frozen=True, slots=True)
class JobSpec:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    max_attempts: int = 3


class NotFound(LookupError):
    """The VM or job named does not exist."""


class Conflict(Exception):
    """The request does not fit the current state (e.g. cancelling a finished job)."""


# VMs are read as plain tuples in VM's field order, states mapped through a dict: the engine
# reads the whole fleet every cycle, and named rows plus Enum lookups took three times as long.
_VM_FIELDS = ", ".join(field.name for field in dataclasses.fields(VM))
_VM_STATES = {state.value: state for state in VMState}


def _vm(row: tuple[Any, ...]) -> VM:
    """A VM from a row of ``SELECT {_VM_FIELDS}``."""
    return VM(*row[:3], _VM_STATES[row[3]], *row[4:11], bool(row[11]))


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
        submitted_at=row["submitted_at"],
        assigned_at=row["assigned_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        output_tail=row["output_tail"],
        reason=row["reason"],
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        seq=row["seq"],
        ts=row["ts"],
        kind=row["kind"],
        message=row["message"],
        vm_id=row["vm_id"],
        job_id=row["job_id"],
        cloud=row["cloud"],
    )


def _launch(row: sqlite3.Row) -> Launch:
    return Launch(
        id=row["id"],
        cloud=row["cloud"],
        count=row["count"],
        client_token=row["client_token"],
        state=LaunchState(row["state"]),
        created_at=row["created_at"],
        instance_ids=json.loads(row["instance_ids"]),
        error=row["error"],
    )


class Store:
    """The durable state of one core. Not thread-safe: use it from one thread."""

    def __init__(self, path: str | Path, synchronous: str = "full") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._in_tx = False
        self._kinds: Counter[str] = Counter()
        # Called after each commit with the event kinds it made durable and how many of each
        # (long polls wake on it).
        self.listeners: list[Callable[[Counter[str]], None]] = []

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable unit; nested use joins the outer transaction."""
        if self._in_tx:
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
            kinds, self._kinds = self._kinds, Counter()
            if kinds:
                for listener in self.listeners:
                    listener(kinds)
        finally:
            self._in_tx = False
            self._kinds = Counter()

    def _event(
        self,
        now: float,
        kind: str,
        message: str,
        *,
        vm_id: str | None = None,
        job_id: int | None = None,
        cloud: str | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO events(ts, kind, message, vm_id, job_id, cloud) VALUES (?,?,?,?,?,?)",
            (now, kind, message, vm_id, job_id, cloud),
        )
        self._kinds[kind] += 1
        fields = [f"event={kind}"]
        if vm_id:
            fields.append(f"vm={vm_id}")
        if job_id is not None:
            fields.append(f"job={job_id}")
        if cloud:
            fields.append(f"cloud={cloud}")
        fields.append(f"msg={json.dumps(message)}")
        log.info(" ".join(fields))

    def record_event(
        self,
        now: float,
        kind: str,
        message: str,
        *,
        vm_id: str | None = None,
        job_id: int | None = None,
        cloud: str | None = None,
    ) -> None:
        """An observation worth telling the admin that changes no state (e.g. a demand error)."""
        with self._tx():
            self._event(now, kind, message, vm_id=vm_id, job_id=job_id, cloud=cloud)

    # ---- events -------------------------------------------------------------------------

    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        rows = self._db.execute(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [_event(r) for r in rows]

    def events_for_vm(self, vm_id: str, limit: int = 200) -> list[Event]:
        """The VM's most recent events, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM events WHERE vm_id = ? ORDER BY seq DESC LIMIT ?", (vm_id, limit)
        ).fetchall()
        return [_event(r) for r in reversed(rows)]

    def last_seq(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    # ---- runtime settings (admin overrides that must survive a restart) --------------------

    def setting(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_setting(self, key: str, value: Any, now: float, message: str) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO settings(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )
            self._event(now, "setting_changed", message)

    # ---- launches -----------------------------------------------------------------------

    def add_launch(
        self,
        launch_id: str,
        cloud: str,
        count: int,
        client_token: str,
        now: float,
    ) -> Launch:
        """Write the launch intent; the caller may call RunInstances only after this returns."""
        with self._tx():
            self._db.execute(
                "INSERT INTO launches(id, cloud, count, client_token, state, created_at) "
                "VALUES (?,?,?,?,?,?)",
                (launch_id, cloud, count, client_token, LaunchState.PENDING, now),
            )
            self._event(
                now, "launch_requested", f"launching {count} on {cloud} ({launch_id})", cloud=cloud
            )
        return self.launch(launch_id)

    def launch(self, launch_id: str) -> Launch:
        row = self._db.execute("SELECT * FROM launches WHERE id = ?", (launch_id,)).fetchone()
        if row is None:
            raise NotFound(f"launch {launch_id} not found")
        return _launch(row)

    def pending_launches(self) -> list[Launch]:
        rows = self._db.execute(
            "SELECT * FROM launches WHERE state = ? ORDER BY created_at", (LaunchState.PENDING,)
        ).fetchall()
        return [_launch(r) for r in rows]

    def complete_launch(
        self, launch_id: str, instances: Iterable[tuple[str, str | None]], now: float
    ) -> list[str]:
        """Record the instances a launch returned (id, address); returns the ids newly added."""
        launch = self.launch(launch_id)
        instances = list(instances)
        added: list[str] = []
        with self._tx():
            for instance_id, address in instances:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO vms(id, cloud, launch_id, state, launched_at, "
                    "state_since, address) VALUES (?,?,?,?,?,?,?)",
                    (
                        instance_id,
                        launch.cloud,
                        launch_id,
                        VMState.REQUESTED,
                        launch.created_at,
                        now,
                        address,
                    ),
                )
                if cur.rowcount:
                    added.append(instance_id)
            ids = [i for i, _ in instances]
            self._db.execute(
                "UPDATE launches SET state = ?, instance_ids = ? WHERE id = ?",
                (LaunchState.DONE, json.dumps(ids), launch_id),
            )
            self._event(
                now,
                "launch_done",
                f"{len(ids)} of {launch.count} instances from {launch_id}: {' '.join(ids)}",
                cloud=launch.cloud,
            )
        return added

    def fail_launch(self, launch_id: str, error: str, now: float) -> None:
        launch = self.launch(launch_id)
        with self._tx():
            self._db.execute(
                "UPDATE launches SET state = ?, error = ? WHERE id = ?",
                (LaunchState.FAILED, error, launch_id),
            )
            self._event(
                now, "launch_failed", f"{launch_id} on {launch.cloud}: {error}", cloud=launch.cloud
            )

    # ---- clouds -------------------------------------------------------------------------

    def cloud_status(self, name: str) -> CloudStatus:
        row = self._db.execute("SELECT * FROM clouds WHERE name = ?", (name,)).fetchone()
        if row is None:
            return CloudStatus(name=name)
        return CloudStatus(
            name=name,
            backoff_until=row["backoff_until"],
            backoff_level=row["backoff_level"],
            boot_failures=row["boot_failures"],
            last_error=row["last_error"],
        )

    def save_cloud_status(
        self, status: CloudStatus, now: float, event: tuple[str, str] | None = None
    ) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO clouds(name, backoff_until, backoff_level, boot_failures, last_error) "
                "VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "backoff_until = excluded.backoff_until, backoff_level = excluded.backoff_level, "
                "boot_failures = excluded.boot_failures, last_error = excluded.last_error",
                (
                    status.name,
                    status.backoff_until,
                    status.backoff_level,
                    status.boot_failures,
                    status.last_error,
                ),
            )
            if event:
                self._event(now, event[0], event[1], cloud=status.name)

    # ---- VMs ----------------------------------------------------------------------------

    def _select_vms(self, where: str, params: Iterable[Any]) -> list[VM]:
        cursor = self._db.cursor()
        cursor.row_factory = None
        cursor.execute(f"SELECT {_VM_FIELDS} FROM vms {where}", tuple(params))
        return [_vm(row) for row in cursor]

    def vm(self, vm_id: str) -> VM:
        found = self._select_vms("WHERE id = ?", (vm_id,))
        if not found:
            raise NotFound(f"vm {vm_id} not found")
        return found[0]

    def vms(self, states: Iterable[VMState] | None = None) -> list[VM]:
        """VMs (in ``states``) by launch time."""
        wanted = list(VMState if states is None else states)
        marks = ",".join("?" * len(wanted))
        return self._select_vms(f"WHERE state IN ({marks}) ORDER BY launched_at, id", wanted)

    def vm_counts(self) -> dict[VMState, int]:
        counts = {state: 0 for state in VMState}
        for row in self._db.execute("SELECT state, COUNT(*) AS n FROM vms GROUP BY state"):
            counts[VMState(row["state"])] = row["n"]
        return counts

    def adopt_vm(
        self, vm_id: str, cloud: str, launch_id: str, address: str | None, now: float
    ) -> None:
        """Take over an instance found in the cloud by our tags but unknown to this store."""
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO vms(id, cloud, launch_id, state, launched_at, state_since,"
                " address) VALUES (?,?,?,?,?,?,?)",
                (vm_id, cloud, launch_id, VMState.BOOTING, now, now, address),
            )
            self._event(now, "vm_adopted", f"found by tag in {cloud}", vm_id=vm_id, cloud=cloud)

    def transition_vm(self, vm_id: str, new: VMState, now: float, reason: str) -> VM:
        """Move a VM to ``new`` (checked against the state machine), requeueing its job if the
        VM stops serving."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state == new:
                return vm
            check_vm(vm.state, new)
            stops_serving = new in (
                VMState.TERMINATING,
                VMState.TERMINATED,
                VMState.LOST,
                VMState.FAILED,
            )
            job_id = vm.job_id
            if stops_serving and job_id is not None:
                self._requeue(job_id, now, f"vm {vm_id} {new}: {reason}")
                job_id = None
            idle_since = now if new == VMState.IDLE else None
            self._db.execute(
                "UPDATE vms SET state = ?, state_since = ?, job_id = ?, idle_since = ? "
                "WHERE id = ?",
                (new, now, job_id, idle_since, vm_id),
            )
            self._event(now, f"vm_{new}", reason, vm_id=vm_id, cloud=vm.cloud)
        return self.vm(vm_id)

    def vm_running(self, vm_id: str, address: str | None, now: float) -> None:
        """The cloud reports the instance running: it is booting until its agent registers."""
        with self._tx():
            vm = self.vm(vm_id)
            if address and address != vm.address:
                self._db.execute("UPDATE vms SET address = ? WHERE id = ?", (address, vm_id))
            if vm.state == VMState.REQUESTED:
                self.transition_vm(vm_id, VMState.BOOTING, now, "running in the cloud")

    def register_vm(self, vm_id: str, now: float, address: str | None = None) -> VM:
        """The VM's agent registered: the VM is idle and ready for a job."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state not in (VMState.REQUESTED, VMState.BOOTING):
                raise Conflict(f"vm {vm_id} is {vm.state}, it cannot register")
            self._db.execute(
                "UPDATE vms SET registered_at = ?, last_heartbeat = ?, address = COALESCE(?, "
                "address) WHERE id = ?",
                (now, now, address, vm_id),
            )
            self._db.execute("UPDATE clouds SET boot_failures = 0 WHERE name = ?", (vm.cloud,))
            self.transition_vm(vm_id, VMState.IDLE, now, "agent registered")
        return self.vm(vm_id)

    def set_vm_token(self, vm_id: str, token_hash: str) -> None:
        with self._tx():
            self._db.execute("UPDATE vms SET token_hash = ? WHERE id = ?", (token_hash, vm_id))

    def vm_by_token(self, token_hash: str) -> VM | None:
        found = self._select_vms("WHERE token_hash = ?", (token_hash,))
        return found[0] if found else None

    def has_token(self, vm_id: str) -> bool:
        row = self._db.execute("SELECT token_hash FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return bool(row and row["token_hash"])

    def heartbeat(self, vm_id: str, now: float, busy: bool = False) -> VM:
        """Record liveness. ``busy`` (a pilot such as the AliEn JobAgent is working) keeps an
        idle VM from counting as idle, since such work is invisible to the built-in queue."""
        with self._tx():
            self._db.execute(
                "UPDATE vms SET last_heartbeat = ?, idle_since = CASE WHEN ? AND state = ? "
                "THEN ? ELSE idle_since END WHERE id = ?",
                (now, busy, VMState.IDLE, now, vm_id),
            )
        return self.vm(vm_id)

    def request_kill(self, vm_id: str, now: float) -> VM:
        """Ask the engine to terminate the VM at its next cycle; its job is requeued then."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state in (VMState.TERMINATING, VMState.TERMINATED):
                raise Conflict(f"vm {vm_id} is already {vm.state}")
            self._db.execute("UPDATE vms SET kill_requested = 1 WHERE id = ?", (vm_id,))
            self._event(now, "vm_kill_requested", "kill requested", vm_id=vm_id, cloud=vm.cloud)
        return self.vm(vm_id)

    def drain_vm(self, vm_id: str, now: float, reason: str = "drain requested") -> VM:
        vm = self.vm(vm_id)
        if vm.state == VMState.DRAINING:
            return vm
        if vm.state not in (VMState.IDLE, VMState.BUSY):
            raise Conflict(f"vm {vm_id} is {vm.state}, only idle or busy VMs can be drained")
        return self.transition_vm(vm_id, VMState.DRAINING, now, reason)

    # ---- jobs ---------------------------------------------------------------------------

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
                self._event(now, "job_queued", "submitted", job_id=cur.lastrowid)
        return ids

    def job(self, job_id: int) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return _job(row)

    def jobs(self, state: JobState | None = None, limit: int = 1000) -> list[Job]:
        if state is None:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY id LIMIT ?", (state, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def job_counts(self) -> dict[JobState, int]:
        counts = {state: 0 for state in JobState}
        for row in self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[JobState(row["state"])] = row["n"]
        return counts

    def queued_count(self) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = ?", (JobState.QUEUED,)
        ).fetchone()[0]

    def submitted_since(self, since: float) -> tuple[int, float | None]:
        """How many jobs were submitted at or after ``since``, and when the first of them was."""
        count, first = self._db.execute(
            "SELECT COUNT(*), MIN(submitted_at) FROM jobs WHERE submitted_at >= ?", (since,)
        ).fetchone()
        return count, first

    def recent_boot_times(self, limit: int = 50) -> list[float]:
        rows = self._db.execute(
            "SELECT registered_at - launched_at AS t FROM vms WHERE registered_at IS NOT NULL "
            "ORDER BY registered_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [r["t"] for r in rows]

    def cancel_job(self, job_id: int, now: float) -> Job:
        """Cancel a job; a job already on a VM is detached (its agent learns on report)."""
        with self._tx():
            job = self.job(job_id)
            if job.state not in (JobState.QUEUED, *ACTIVE_JOB_STATES):
                raise Conflict(f"job {job_id} is {job.state}, it cannot be cancelled")
            self._set_job(job, JobState.CANCELLED, now, reason="cancelled by admin")
            if job.vm_id is not None:
                self._release_vm(job.vm_id, job_id, now)
            self._event(now, "job_cancelled", "cancelled by admin", job_id=job_id)
        return self.job(job_id)

    def assign_next_job(self, vm_id: str, now: float) -> Job | None:
        """Give the oldest queued job to an idle VM (FIFO), or None if the queue is empty."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state != VMState.IDLE:
                raise Conflict(f"vm {vm_id} is {vm.state}, it cannot take a job")
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY id LIMIT 1", (JobState.QUEUED,)
            ).fetchone()
            if row is None:
                return None
            job = _job(row)
            self._set_job(job, JobState.ASSIGNED, now, vm_id=vm_id, assigned_at=now)
            self._db.execute(
                "INSERT INTO assignments(job_id, attempt, vm_id, assigned_at) VALUES (?,?,?,?)",
                (job.id, job.attempt, vm_id, now),
            )
            self._db.execute("UPDATE vms SET job_id = ? WHERE id = ?", (job.id, vm_id))
            self.transition_vm(vm_id, VMState.BUSY, now, f"assigned job {job.id}")
            self._event(
                now, "job_assigned", f"attempt {job.attempt} on {vm_id}", vm_id=vm_id, job_id=job.id
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
            self._set_job(job, JobState.RUNNING, now, started_at=now)
            self._event(now, "job_running", f"attempt {attempt}", vm_id=vm_id, job_id=job_id)
        return self.job(job_id)

    def finish_job(
        self,
        job_id: int,
        attempt: int,
        vm_id: str,
        exit_code: int,
        output_tail: str,
        now: float,
    ) -> Job | None:
        """Record a job's end, once per (job, attempt): a retried report changes nothing."""
        with self._tx():
            job = self._current_attempt(job_id, attempt, vm_id)
            if job is None or job.state not in ACTIVE_JOB_STATES:
                return job
            new = JobState.DONE if exit_code == 0 else JobState.FAILED
            self._set_job(
                job,
                new,
                now,
                finished_at=now,
                exit_code=exit_code,
                output_tail=output_tail,
                reason=None if exit_code == 0 else f"exit code {exit_code}",
            )
            self._release_vm(vm_id, job_id, now)
            self._event(
                now, f"job_{new}", f"exit code {exit_code} on {vm_id}", vm_id=vm_id, job_id=job_id
            )
        return self.job(job_id)

    def _release_vm(self, vm_id: str, job_id: int, now: float) -> None:
        vm = self.vm(vm_id)
        if vm.job_id != job_id:
            return
        self._db.execute("UPDATE vms SET job_id = NULL WHERE id = ?", (vm_id,))
        if vm.state == VMState.BUSY:
            self.transition_vm(vm_id, VMState.IDLE, now, f"job {job_id} ended")

    def _requeue(self, job_id: int, now: float, reason: str) -> None:
        job = self.job(job_id)
        if job.state not in ACTIVE_JOB_STATES:
            return
        if job.attempt >= job.max_attempts:
            self._set_job(job, JobState.FAILED, now, finished_at=now, reason=reason)
            self._event(
                now, "job_failed", f"gave up after {job.attempt} attempts: {reason}", job_id=job_id
            )
            return
        self._set_job(
            job,
            JobState.QUEUED,
            now,
            attempt=job.attempt + 1,
            vm_id=None,
            assigned_at=None,
            started_at=None,
            reason=reason,
        )
        self._event(now, "job_requeued", f"attempt {job.attempt + 1}: {reason}", job_id=job_id)

    def _set_job(self, job: Job, new: JobState, now: float, **columns: Any) -> None:
        check_job(job.state, new)
        columns["state"] = new
        sets = ", ".join(f"{name} = ?" for name in columns)
        self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*columns.values(), job.id))

    # ---- job flow (the console's sparklines) ----------------------------------------------

    FLOW_KINDS = {
        "job_queued": "submitted",
        "job_running": "started",
        "job_done": "finished",
        "job_failed": "failed",
    }

    def job_flow(self, since: float, last_seq: int) -> dict[float, dict[str, int]]:
        """Per-minute counts of job events with ``since <= ts`` and ``seq <= last_seq``, keyed
        by minute start. The first seq in the window is found by bisecting on seq (the primary
        key; events are written in time order), so the query reads only the window's rows."""
        low, high = 1, last_seq + 1
        while low < high:
            middle = (low + high) // 2
            row = self._db.execute(
                "SELECT ts FROM events WHERE seq >= ? ORDER BY seq LIMIT 1", (middle,)
            ).fetchone()
            if row is None or row[0] >= since:
                high = middle
            else:
                low = middle + 1
        kinds = tuple(self.FLOW_KINDS)
        rows = self._db.execute(
            "SELECT CAST(ts / 60 AS INTEGER) * 60 AS minute, kind, COUNT(*) FROM events"
            f" WHERE seq >= ? AND seq <= ? AND ts >= ? AND kind IN ({','.join('?' * len(kinds))})"
            " GROUP BY minute, kind",
            (low, last_seq, since, *kinds),
        )
        counts: dict[float, dict[str, int]] = {}
        for minute, kind, n in rows:
            bucket = counts.setdefault(float(minute), dict.fromkeys(self.FLOW_KINDS.values(), 0))
            bucket[self.FLOW_KINDS[kind]] += n
        return counts
