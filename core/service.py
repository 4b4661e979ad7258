"""The intents of agents and admins: one method each, one transaction each.

The agent and admin APIs are thin routers over this class; nothing else changes state on a
request's behalf. Each method that changes what the engine should do wakes it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from core.config import Config
from core.liveness import Liveness
from core.model import (
    ALIVE_STATES,
    HEARTBEATING_STATES,
    STOPPED_SERVING_STATES,
    TAKING_JOBS_STATES,
    VM,
    Event,
    Job,
    JobState,
    Launch,
    LaunchState,
    VMState,
)
from core.store import Conflict, JobSpec, NotFound, Store
from core.userdata import LaunchKeys, secret_matches

log = logging.getLogger("alienec2.service")

Action = Literal["run", "drain", "stop"]
STOP_STATES = STOPPED_SERVING_STATES
# The setting that says what the configuration's pool bounds were when ``resize`` last set
# them: the resize holds until the file says otherwise (``PoolService.settle_bounds``).
RESIZED_OVER = "resized_over"


class Unauthorized(Exception):
    """No valid credential: the caller learns nothing more."""


class Forbidden(Exception):
    """A valid caller asking for something it may not have."""


class NotYetKnown(Exception):
    """The answer depends on a launch result the core has not recorded yet: retry shortly."""


class AlreadyRegistered(Conflict):
    """The instance has its token already: a second registration is refused."""


class Invalid(ValueError):
    """A well-formed request whose values do not fit together; the message says why."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def action_for(vm: VM) -> Action:
    """What the agent must do next: the heartbeat's and the fetch's answer."""
    if vm.kill_requested or vm.state in STOP_STATES:
        return "stop"
    if vm.state == VMState.DRAINING:
        return "drain"
    return "run"


@dataclass(frozen=True, slots=True)
class Registration:
    vm: VM
    token: str


@dataclass(frozen=True, slots=True)
class Fetch:
    action: Action
    job: Job | None
    wait: bool  # nothing to hand out yet, but the VM may take a job: worth waiting


@dataclass(frozen=True, slots=True)
class Report:
    accepted: bool
    state: JobState


class PoolService:
    def __init__(
        self,
        config: Config,
        store: Store,
        liveness: Liveness,
        clock: Callable[[], float],
        wake: Callable[[], None],
        launch_keys: LaunchKeys,
    ) -> None:
        self.config = config
        self.store = store
        self.liveness = liveness
        self.clock = clock
        self._wake = wake
        self._keys = launch_keys
        # Per cloud: market, $/h and placement backoffs, which the engine keeps in memory.
        self.cloud_details: Callable[[], dict[str, dict[str, Any]]] = dict

    # ---- agents -------------------------------------------------------------------------

    def authenticate(self, token: str) -> VM:
        """The VM this token belongs to, while that VM has not left."""
        vm = self.store.vm_by_token(token_hash(token)) if token else None
        if vm is None:
            raise Unauthorized()
        return vm

    def register(self, instance_id: str, launch_id: str, launch_secret: str) -> Registration:
        """Trade the launch secret for a VM token, once per instance of that launch, within
        the launch's boot window."""
        try:
            launch: Launch | None = self.store.launch(launch_id)
        except NotFound:
            launch = None
        key = self._keys.for_launch(launch.created_at if launch else None)
        if not secret_matches(key, launch_id, launch_secret) or launch is None:
            raise Forbidden()  # the same answer, and the same work, for an unknown launch
        now = self.clock()
        try:
            vm = self.store.vm(instance_id)
        except NotFound:
            if launch.state == LaunchState.PENDING:
                raise NotYetKnown() from None
            raise Forbidden() from None
        if vm.launch_id != launch.id:
            raise Forbidden()
        # The boot window counts from when the instance was launched, and never from before
        # this process started (a core that was down must not shut its new VMs out).
        window_start = max(vm.launched_at, self.liveness.started_at)
        if now - window_start > self.config.pool.boot_timeout_s:
            raise Forbidden()  # a secret read from old user data registers nothing new
        if self.store.has_token(vm.id) or vm.registered_at is not None:
            raise AlreadyRegistered(f"instance {vm.id} is already registered")
        token = secrets.token_urlsafe(32)
        vm = self.store.register_vm(vm.id, now, token_hash=token_hash(token))
        self.liveness.heartbeat(vm.id, now)
        self._wake()
        return Registration(vm, token)

    def heartbeat(self, vm: VM, busy: bool = False) -> tuple[VM, list[int]]:
        """Liveness (in memory) and what the agent must do: the action, and the jobs it must
        stop because an admin cancelled them. ``busy`` is a pilot's (e.g. the AliEn
        JobAgent's) word that it runs a real job: the VM is busy while it says so."""
        if vm.state not in STOP_STATES:
            now = self.clock()
            self.liveness.heartbeat(vm.id, now)
            pilots = self.config.contextualisation.template == "alien"
            if pilots and busy != vm.pilot_busy and not vm.jobs:
                vm = self.store.set_pilot_busy(vm.id, busy, now)
                self._wake()
        return vm, self.store.cancelled_on(vm)

    def interruption(self, vm: VM, notice: Literal["termination", "rebalance"], detail: str) -> VM:
        """The cloud will reclaim the VM (termination: its job is requeued now, without
        spending an attempt, and the capacity replaced) or advises moving off it
        (rebalance: it is drained)."""
        now = self.clock()
        if vm.state in STOP_STATES or vm.state == VMState.INTERRUPTED:
            return vm
        why = f"spot {notice} notice" + (f": {detail}" if detail else "")
        if notice == "termination":
            vm = self.store.interrupt_vm(vm.id, now, why)
        elif vm.state in (VMState.IDLE, VMState.BUSY):
            vm = self.store.drain_vm(vm.id, now, why)
        self._wake()
        return vm

    def record_run(
        self,
        vm: VM,
        run: str,
        status: Literal["started", "finished"],
        exit_code: int | None,
        output_tail: str,
        alien_job_id: str | None,
        idle: bool | None,
    ) -> Job:
        """A pilot run (e.g. one AliEn JobAgent) as a job record of kind "pilot". Only VMs
        started with a pilot template run pilots; any other VM's run would be a made-up job
        record in the admin's list. A VM that already reported runs was started with one:
        after a reload to the built-in template it drains, its pilots' runs still recorded."""
        template = self.config.contextualisation.template
        if template != "alien" and not self.store.has_pilot_runs(vm.id):
            raise Conflict(
                f"contextualisation.template is {template}: this pool's VMs run jobs from "
                "the built-in queue, not pilot runs"
            )
        command = list(self.config.contextualisation.alien.pilot_command) or ["pilot"]
        job = self.store.record_run(
            vm,
            f"{vm.id}/{run}",
            command,
            self.clock(),
            finished=status == "finished",
            exit_code=exit_code,
            output_tail=output_tail,
            alien_job_id=alien_job_id,
            idle=idle,
        )
        return job

    def next_job(self, vm_id: str, slot: int = 0) -> Fetch:
        """The job of the VM's ``slot``: the one it already holds (the answer to an earlier
        fetch was lost; a draining VM runs it too), or the oldest queued one if the slot is
        free and the VM takes jobs. A slot beyond ``pool.slots_per_vm`` is Invalid."""
        vm = self.store.vm(vm_id)
        action = action_for(vm)
        if action == "stop":
            return Fetch(action, None, wait=False)
        held = vm.jobs.get(slot)
        if held is not None:
            job = self.store.job(held)
            if job.state != JobState.CANCELLED or job.started_at is not None:
                # A started job frees its slot only by its report: a cancelled one is handed
                # back, its state telling the agent not to run it. A fetch is no word that
                # its process stopped.
                return Fetch(action, job, wait=False)
            # Cancelled before the agent ever started it (it is fetching again): free the slot.
            self.store.release_cancelled(vm.id, job.id, self.clock())
            vm = self.store.vm(vm_id)
        if action != "run":
            return Fetch(action, None, wait=False)
        slots = self.config.pool.slots_per_vm
        if slot >= slots:
            raise Invalid(
                f"query.slot: must be < {slots} (pool.slots_per_vm; this VM's slots are "
                f"0 to {slots - 1})"
            )
        if vm.state in TAKING_JOBS_STATES:
            assigned = self.store.assign_next_job(vm.id, self.clock(), slot)
            if assigned is not None:
                self._wake()
                return Fetch(action, assigned, wait=False)
            return Fetch(action, None, wait=True)
        return Fetch(action, None, wait=False)

    def report(
        self,
        vm: VM,
        job_id: int,
        attempt: int,
        status: Literal["started", "finished", "cancelled"],
        exit_code: int | None,
        output_tail: str,
    ) -> Report:
        """Idempotent by (job, attempt): a retried report changes nothing and is accepted."""
        try:
            current = self.store.job(job_id)
        except NotFound:
            raise Forbidden() from None
        if not self.store.was_assigned(job_id, vm.id):
            raise Forbidden()
        # An agent stops a job only when told it was cancelled: any other stop is an end
        # with an exit code, which counts as the job's result.
        # (A stale attempt is answered as stale below.)
        told_to_stop = current.state == JobState.CANCELLED or current.attempt != attempt
        if status == "cancelled" and not told_to_stop:
            raise Conflict(f"job {job_id} was not cancelled: report it finished")
        now = self.clock()
        if status == "started":
            job = self.store.start_job(job_id, attempt, vm.id, now)
            if job is not None and job.state == JobState.CANCELLED:
                return Report(False, job.state)  # the agent stops it
        else:
            job = self.store.finish_job(job_id, attempt, vm.id, exit_code, output_tail, now)
            self._wake()
        if job is None:
            return Report(False, self.store.job(job_id).state)
        return Report(True, job.state)

    # ---- admins -------------------------------------------------------------------------

    def submit(self, specs: list[JobSpec]) -> list[int]:
        """Queue jobs on the built-in queue; with another demand source no agent would ever
        fetch them, so they are refused."""
        kind = self.config.queue.kind
        if kind != "builtin":
            raise Invalid(
                f"queue.kind is {kind}: jobs come from the site's own queue, not from submit "
                "(submit needs queue.kind: builtin)"
            )
        ids = self.store.submit_jobs(specs, self.clock())
        self._wake()
        return ids

    def cancel(self, job_id: int) -> Job:
        job = self.store.cancel_job(job_id, self.clock())
        self._wake()
        return job

    def drain(self, vm_id: str) -> VM:
        vm = self.store.drain_vm(vm_id, self.clock())
        self._wake()
        return vm

    def drain_all(self) -> list[str]:
        drained = []
        for vm in self.store.vms([VMState.IDLE, VMState.BUSY]):
            try:
                self.store.drain_vm(vm.id, self.clock(), "drain all requested")
                drained.append(vm.id)
            except Conflict:
                continue  # it changed state meanwhile
        self._wake()
        return drained

    def kill(self, vm_id: str) -> VM:
        vm = self.store.request_kill(vm_id, self.clock())
        self._wake()
        return vm

    def bounds(self) -> tuple[int, int]:
        pool = self.config.pool
        return (
            self.store.setting("min_vms", pool.min_vms),
            self.store.setting("max_vms", pool.max_vms),
        )

    def _file_bounds(self) -> list[int]:
        return [self.config.pool.min_vms, self.config.pool.max_vms]

    def settle_bounds(self) -> None:
        """At start and after a reload: bounds set by ``resize`` hold while the configuration
        says what the one in force at the resize said. Once either bound in it differs, the
        file is the newer word: the resize is forgotten, and an event says so. Bounds that
        agree with the file are forgotten too (there is nothing to keep, and a later edit
        of the file must count); a resize stored before this rule holds over the file as
        it is now."""
        if self.store.setting("min_vms") is None and self.store.setting("max_vms") is None:
            return
        (low, high), file = self.bounds(), self._file_bounds()
        over, now = self.store.setting(RESIZED_OVER), self.clock()
        forget = ["min_vms", "max_vms", RESIZED_OVER]
        if [low, high] == file:
            self.store.forget_settings(
                forget, now, f"pool bounds min {low} max {high} follow the configuration again"
            )
        elif over is None:
            self.store.set_settings(
                {RESIZED_OVER: file},
                now,
                f"pool bounds min {low} max {high} set by resize are kept over the "
                f"configuration's min {file[0]} max {file[1]} until the file changes them",
            )
        elif over != file:
            self.store.forget_settings(
                forget,
                now,
                f"pool bounds min {file[0]} max {file[1]} from the configuration replace "
                f"min {low} max {high} set by resize: the file changed them since",
            )
        else:
            log.info(
                "event=pool_bounds_from_resize min=%d max=%d file_min=%d file_max=%d",
                *(low, high, *file),
            )

    def paused(self) -> bool:
        return bool(self.store.setting("paused", False))

    def resize(self, min_vms: int | None = None, max_vms: int | None = None) -> tuple[int, int]:
        """Change the pool bounds, both in one transaction; Invalid says what is wrong."""
        old_min, old_max = self.bounds()
        low = old_min if min_vms is None else min_vms
        high = old_max if max_vms is None else max_vms
        if low < 0 or high < 0:
            raise Invalid(f"min and max must be >= 0 (got min {low}, max {high})")
        if high < low:
            raise Invalid(f"max must be >= min (got max {high} < min {low})")
        self.store.set_settings(
            {"min_vms": low, "max_vms": high, RESIZED_OVER: self._file_bounds()},
            self.clock(),
            f"pool min_vms {old_min} -> {low}, max_vms {old_max} -> {high}",
        )
        self._wake()
        return low, high

    def bound_warnings(self, low: int, high: int) -> list[str]:
        """What the clouds' own limits make of new bounds. Bounds past them are accepted (a
        reload may raise the limits), but the admin must learn that the pool stops there."""
        capacity = sum(cloud.max_instances for cloud in self.config.clouds)
        limits = f"the clouds' max_instances allow {capacity} VMs together"
        warnings = []
        if low > capacity:
            warnings.append(f"min_vms {low} cannot be kept: {limits}")
        if high > capacity:
            warnings.append(f"max_vms {high} will not be reached: {limits}")
        return warnings

    def pause(self, paused: bool) -> None:
        """Paused: no launches and no reaping; health rules (boot/heartbeat timeouts) still run."""
        self.store.set_setting(
            "paused", paused, self.clock(), "scaling paused" if paused else "scaling resumed"
        )
        self._wake()

    # ---- reads --------------------------------------------------------------------------

    def vm(self, vm_id: str) -> VM:
        """A VM as the core knows it now, liveness included."""
        return self._live(self.store.vm(vm_id))

    def vms(self, states: frozenset[VMState] | list[VMState] | None = None) -> list[VM]:
        return [self._live(vm) for vm in self.store.vms(states)]

    def _live(self, vm: VM) -> VM:
        vm.last_heartbeat = self.liveness.last_heartbeat(vm.id, vm.last_heartbeat)
        return vm

    def changed(self, events: list[Event]) -> tuple[dict[str, VM | None], dict[int, Job | None]]:
        """The VMs and jobs these events name, as they are now (None: gone): what an event
        follower applies. Read after the events, so they are never older than the events."""
        vms: dict[str, VM | None] = {}
        jobs: dict[int, Job | None] = {}
        for event in events:
            if event.vm_id is not None and event.vm_id not in vms:
                try:
                    vms[event.vm_id] = self.vm(event.vm_id)
                except NotFound:
                    vms[event.vm_id] = None
            if event.job_id is not None and event.job_id not in jobs:
                try:
                    jobs[event.job_id] = self.store.job(event.job_id)
                except NotFound:
                    jobs[event.job_id] = None
        return vms, jobs

    def heartbeats_since(self, at: float) -> dict[str, float]:
        """Last heartbeats received at or after ``at`` (they live in memory, not in events)."""
        return self.liveness.since(at)

    def slots(self) -> dict[str, int]:
        """Job slots: per VM, in use, and in all on registered VMs that are not leaving
        (counted in SQL: metrics scrapes must not read the fleet)."""
        per_vm = self.config.pool.slots_per_vm
        counts = self.store.vm_counts()
        serving = sum(counts[state] for state in HEARTBEATING_STATES)
        return {"per_vm": per_vm, "used": self.store.slots_used(), "total": serving * per_vm}

    def job_detail(self, job_id: int) -> dict[str, Any]:
        job = self.store.job(job_id)
        return {"job": job, "events": self.store.events_for_job(job_id)}

    def status(self) -> dict[str, Any]:
        """The pool at a glance: what the console's header and `alienec2 status` show."""
        store, now = self.store, self.clock()
        low, high = self.bounds()
        alive = {cloud: len(ids) for cloud, ids in store.ids_by_cloud(ALIVE_STATES).items()}
        clouds = []
        details = self.cloud_details()
        for cloud in self.config.clouds:
            cloud_status = store.cloud_status(cloud.name)
            clouds.append(
                {
                    "name": cloud.name,
                    "priority": cloud.priority,
                    "max_instances": cloud.max_instances,
                    "alive": alive.get(cloud.name, 0),
                    "backoff_s": max(cloud_status.backoff_until - now, 0.0),
                    "last_error": cloud_status.last_error,
                    "market": cloud.market,
                    "cost_per_hour": 0.0,
                    "placements": [],
                    **details.get(cloud.name, {}),
                }
            )
        cost = {
            "total": round(sum(c["cost_per_hour"] for c in clouds), 4),
            "max": self.config.pool.max_cost_per_hour,
        }
        return {
            "now": now,
            "core_id": self.config.core_id,
            "pool": {
                "name": self.config.pool.name,
                "min_vms": low,
                "max_vms": high,
                "paused": self.paused(),
                "vms": {str(state): n for state, n in store.vm_counts().items()},
                "slots": self.slots(),
            },
            "queue": {
                "kind": self.config.queue.kind,
                "jobs": {str(state): n for state, n in store.job_counts().items()},
                "pilot_runs": {str(s): n for s, n in store.job_counts("pilot").items()},
            },
            "clouds": clouds,
            "cost_per_hour": cost,
            "last_seq": store.last_seq(),
        }
