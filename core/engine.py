"""The engine: reconcile, observe, decide, act.

Observations (queue demand, cloud state) go into the store; the policy reads a snapshot and
returns actions with the decision that explains them; the engine carries them out through
providers and records the outcome. Cloud calls run in worker threads as per-cloud tasks, so
one slow cloud never stalls the loop, the other clouds or the web service. The snapshot of the
whole fleet and the decision on it are made on a thread of the engine's own, on a read-only
connection: at 10,000 VMs they take tens of milliseconds, which would stall every agent's
request on the loop; an action on a VM is carried out only if the VM is still as the
decision saw it. Time comes from an injected clock (the core's monotonic ``CoreClock`` unless
a test passes its own).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from core import policy, userdata
from core.clock import CoreClock
from core.clouds import (
    CapacityError,
    CloudError,
    CloudProvider,
    Instance,
    InstanceState,
    LaunchRequest,
    Placement,
    PlacementError,
    ThrottledError,
)
from core.config import CloudConfig, Config
from core.liveness import Liveness
from core.model import (
    ALIVE_STATES,
    HEARTBEATING_STATES,
    STARTING_STATES,
    EventKind,
    Launch,
    Reason,
    VMState,
)
from core.queues import DemandError, DemandSource
from core.queues.builtin import BuiltinQueue
from core.store import NotFound, Store
from core.store.jobs import Submitted
from core.store.vms import FleetRow
from core.userdata import launch_secret

log = logging.getLogger("alienec2.engine")

Clock = Callable[[], float]

BASELINE_REFRESH_S = 60.0  # the day's average arrival rate is recounted this often
HEARTBEAT_SAVE_S = 5.0  # in-memory heartbeats are written this often
WAKE_GAP_S = 1.0  # the least time between two cycles, however often the engine is woken
# A cycle reads the whole fleet: woken cycles are spaced at least this many times its cost,
# so observing takes at most 1/20 of the core (see wake_gap).
OBSERVE_SPACING = 20.0
# The observer thread's CPU time is at most this share of its cycle's wall time. While it
# holds the GIL the event loop serves no agent: a 10,000-VM cycle taken at once (150-240 ms
# of CPU on a busy core, over 0.25-0.5 s) left requests queued behind it, and seven of the
# ten slowest probe round trips fell in those windows (benchmarks/README.md).
OBSERVER_DUTY = 0.25
PACE_ROWS = 1000  # VMs viewed between two of the observer's pauses
LIVENESS_SAVED_SETTING = "liveness_saved_at"
# What a VM is launched with: a change of any of these makes running VMs outdated (a rollout).
# Prices, quotas, priorities, timers and backoffs change nothing on a VM.
LAUNCH_SETTINGS = frozenset(
    {
        "endpoint_url",
        "region",
        "image_id",
        "instance_type",
        "instance_types",
        "launch_template",
        "market",
        "iam_instance_profile",
        "root_volume_size_gb",
        "root_volume_type",
        "root_device_name",
        "imds_tokens",
        "key_name",
        "security_group_ids",
        "subnet_id",
        "subnet_ids",
        "tags",
    }
)
START_RECONCILE_S = 30.0  # the start-up reconcile waits this long for a cloud; slow ones go on
PRUNE_EVERY_S = 60.0  # history older than state.retention_days is pruned this often
PRUNE_BATCH = 500  # rows per pruning transaction: short writes between agents' requests
# Instances of a cloud's answer applied between two turns of the event loop: describing a
# launch of 5,000 instances applied them in one 0.7 s callback, every agent's request waiting.
APPLY_BATCH = 200


class PoolReads(NamedTuple):
    """What a snapshot reads from the store, in one read transaction."""

    fleet: list[FleetRow]
    launched_with: dict[str, str | None]  # launch id -> its settings' fingerprint
    pending: dict[str, int]  # cloud -> VMs of launches not yet recorded
    backoff_until: dict[str, float]  # cloud -> its launch backoff
    recent: Submitted  # in the arrival window
    last_minute: Submitted
    baseline_rate: float
    boot_times: list[float]
    finished: int  # jobs finished in the arrival window


class Pacer:
    """Called between chunks of a long computation on a thread beside the event loop: sleeps
    (the GIL released) so that the thread's CPU time is at most ``duty`` of the wall time
    since the last call. The work takes up to 1/duty times longer and the loop keeps the
    rest; time already spent waiting for the GIL counts toward the pause. Make it on the
    thread it paces: CPU time is per thread."""

    def __init__(
        self,
        duty: float,
        cpu: Callable[[], float] = time.thread_time,
        wall: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"duty must be in (0, 1], not {duty}")
        self.duty = duty
        self.cpu = cpu
        self.wall = wall
        self.sleep = sleep
        self.slept_s = 0.0
        self._cpu_mark = cpu()
        self._wall_mark = wall()

    def __call__(self) -> None:
        spent = self.cpu() - self._cpu_mark
        pause = spent / self.duty - (self.wall() - self._wall_mark)
        if pause > 0:
            self.sleep(pause)
            self.slept_s += pause
        self._cpu_mark = self.cpu()
        self._wall_mark = self.wall()


def _no_pause() -> None:
    """The pacer of work on the event loop's own thread, which must never sleep."""


def wake_gap(observe_cpu_s: float) -> float:
    """The least time between two woken cycles: a second, or OBSERVE_SPACING times what the
    last observation cost. Every submission and report wakes the engine and each cycle reads
    the whole fleet, so at 20 jobs/s a fixed second let a 10,000-VM snapshot take a quarter
    of the core (benchmarks/README.md). A launch waits a few seconds more at that scale; a
    VM takes minutes to boot."""
    return max(WAKE_GAP_S, observe_cpu_s * OBSERVE_SPACING)


class Engine:
    def __init__(
        self,
        config: Config,
        store: Store,
        providers: Mapping[str, CloudProvider],
        demand: DemandSource,
        *,
        clock: Clock | None = None,
        core_url: str | None = None,
        liveness: Liveness | None = None,
    ) -> None:
        clock = clock or CoreClock(not_before=store.latest_time())
        self.config = config
        self.store = store
        self.providers = dict(providers)
        self.demand = demand
        self.clock = clock
        self.liveness = liveness or Liveness(clock())
        self.core_url = core_url or config.web.public_url or f"http://127.0.0.1:{config.web.port}"
        self.launch_keys = userdata.LaunchKeys(store, clock())
        self._launching: dict[str, asyncio.Task[None]] = {}
        self._terminating: dict[str, asyncio.Task[None]] = {}
        self._describing: dict[str, asyncio.Task[None]] = {}
        self._reconciling: dict[str, asyncio.Task[None]] = {}
        # Per (cloud, call): when describe, list and terminate calls may be made again after
        # failures, and how many failed in a row.
        self._call_backoff: dict[tuple[str, str], tuple[int, float]] = {}
        # The last 1,000 decisions with their inputs: `alienec2 why`, the console.
        self.decisions: collections.deque[policy.Decision] = collections.deque(maxlen=1000)
        # VMs whose last heartbeat was fresh when the previous process last saved: only they
        # get the start-up grace (a core restarting in a loop must not keep dead VMs alive).
        self._graced = self._fresh_at_last_save(store)
        self._last_reconcile = float("-inf")
        self._last_prune = float("-inf")
        self._cloud_configs = {cloud.name: cloud for cloud in config.clouds}
        self._stopping = False
        self.cycles = 0
        self.observe_cpu_s = 0.0  # CPU time the last cycle's snapshot and decision took
        self.outdated = 0  # VMs launched with settings since changed (the last snapshot's)
        self.on_ready: Callable[[], None] = lambda: None  # after the start-up reconcile
        self.on_cycle: Callable[[], None] = lambda: None  # after each cycle (watchdog)
        self.max_sleep_s = math.inf  # the longest wait between cycles (watchdog)
        self.wake = asyncio.Event()  # set to run the next cycle now (e.g. a job was submitted)
        self._baseline = (-math.inf, 0.0)  # (counted at, jobs per second over warm_history_s)
        # Per cloud and placement (type, subnet): (backoff level, until, last error). In
        # memory: after a restart every placement is tried again, which costs one refusal each.
        self._placement_backoff: dict[str, dict[Placement, tuple[int, float, str]]] = {}
        # Spot interruptions per (cloud, instance type): when they were seen, in the window.
        self._interruptions: dict[tuple[str, str | None], deque[float]] = {}
        self._interrupted_seen: set[str] = set()
        self._vm_types: dict[str, str | None] = {}  # instance type per VM, for prices
        self._skipped: dict[str, str] = {}  # per cloud: why launches are being skipped
        # Snapshots and decisions off the event loop: the store on a connection of its own,
        # read on one thread of its own (not the cloud calls' pool, which a hung cloud fills).
        self._reader: Store | None = None  # opened at the first cycle (close() closes it)
        self._observer = ThreadPoolExecutor(1, thread_name_prefix="alienec2-observe")

    # ---- runtime settings (admin overrides, durable) -----------------------------------

    def _fresh_at_last_save(self, store: Store) -> frozenset[str]:
        saved_at = store.setting(LIVENESS_SAVED_SETTING)
        timeout = self.config.pool.heartbeat_timeout_s
        fresh = set()
        for vm in store.vms(ALIVE_STATES):
            seen = vm.last_heartbeat if vm.last_heartbeat is not None else vm.launched_at
            if saved_at is None or seen >= saved_at - timeout:
                fresh.add(vm.id)
        return frozenset(fresh)

    def settings(self) -> policy.Settings:
        pool = self.config.pool
        return policy.Settings(
            min_vms=self.store.setting("min_vms", pool.min_vms),
            max_vms=self.store.setting("max_vms", pool.max_vms),
            idle_timeout_s=pool.idle_timeout_s,
            boot_timeout_s=pool.boot_timeout_s,
            heartbeat_timeout_s=pool.heartbeat_timeout_s,
            max_launch_per_cycle=pool.max_launch_per_cycle,
            adaptive_warm=pool.adaptive_warm,
            paused=self.store.setting("paused", False),
            cycle_interval_s=pool.cycle_interval_s,
            warm_margin=pool.warm_margin,
            slots_per_vm=pool.slots_per_vm,
            max_lifetime_s=pool.max_lifetime_s,
            max_replace_per_cycle=pool.max_replace_per_cycle,
        )

    # ---- the loop -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, grace_s: float = 5.0) -> None:
        """Cycle until ``stop`` is set; then stop launching and wait briefly for cloud calls.

        Instances keep running: the next start re-adopts them."""
        await self.start()
        self.on_ready()
        saver = asyncio.create_task(self._save_liveness_until(stop))
        while not stop.is_set():
            sleep_s = min(self.config.pool.cycle_interval_s, self.max_sleep_s)  # reloadable
            gap_s = min(wake_gap(self.observe_cpu_s), sleep_s)
            self.wake.clear()  # a wake during the cycle or the gap runs the next one
            try:
                await self.cycle()
            except Exception:
                log.exception("event=cycle_error")
            self.on_cycle()
            # Every submission and report wakes the engine, and a cycle reads the whole fleet:
            # at most one cycle per gap, or at 20 jobs/s the fleet is re-read continuously.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), gap_s)
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            await asyncio.wait(waiters, timeout=sleep_s - gap_s, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()
        await saver
        await self.shutdown(grace_s)

    async def _save_liveness_until(self, stop: asyncio.Event) -> None:
        """Write the in-memory heartbeats every few seconds, and once more at the end."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_SAVE_S)
            try:
                self.save_liveness()
            except Exception:
                log.exception("event=heartbeat_save_failed")

    def save_liveness(self) -> None:
        self.store.save_heartbeats(
            self.liveness.take_unsaved(), self.clock(), LIVENESS_SAVED_SETTING
        )

    async def shutdown(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        tasks = self._tasks()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()  # the intent stays pending in the store; the next start finishes it
        self.close()
        log.info("event=engine_stopped")

    def close(self) -> None:
        """Release the observer thread and its connection (an engine that never ran too)."""
        self._observer.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def start(self) -> None:
        """Reconcile before the first decision: finish interrupted launches, adopt our tagged
        instances, and mark those that vanished."""
        for launch in self._pending():
            self._spawn(self._launching, launch.cloud, self._resume_launch(launch))
        for name in self.providers:
            self._spawn(self._reconciling, name, self._reconcile(name))
        # A cloud that does not answer must not keep the core from serving its agents (nor
        # from telling systemd it is ready): its reconcile goes on in the background.
        tasks = [*self._launching.values(), *self._reconciling.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=START_RECONCILE_S)
        self._last_reconcile = self.clock()

    async def cycle(self) -> list[policy.Action]:
        """One observe → decide → act pass. Cloud calls are started, not awaited."""
        now = self.clock()
        self.cycles += 1
        if now - self._last_reconcile >= self.config.pool.reconcile_interval_s:
            self._last_reconcile = now
            for name in self.providers:
                self._spawn(self._reconciling, name, self._reconcile(name))
        self._prune(now)
        self.launch_keys.rotate_if_due(
            now, self.config.contextualisation.launch_key_rotation_days * 86400
        )
        self._observe_requested()
        for launch in self._pending():
            self._spawn(self._launching, launch.cloud, self._resume_launch(launch))
        try:
            # The built-in queue's count is read with the snapshot, in the same transaction:
            # a job taken between the two would be counted waiting beside its busy VM.
            waiting: int | None = (
                None if self._counts_with_snapshot() else await self.demand.waiting()
            )
        except DemandError as exc:
            self.store.record_event(
                now, EventKind.DEMAND_ERROR, f"{exc}; no scaling change this cycle"
            )
            waiting = None
        self._count_interruptions(now)
        settings = self.settings()
        if self._reader is None:
            self._reader = self.store.reader()
        if self._reader is None:
            actions, decision, _ = self._observe_and_decide(self.store, now, waiting, settings)
        else:
            actions, decision, seen = await asyncio.get_running_loop().run_in_executor(
                self._observer,
                self._observe_and_decide,
                self._reader,
                now,
                waiting,
                settings,
                True,
            )
            actions = self._still_as_seen(actions, seen)
        self.decisions.append(decision)
        self._act(actions, now)
        self._send_terminations()
        return actions

    def _counts_with_snapshot(self) -> bool:
        return isinstance(self.demand, BuiltinQueue)

    def _observe_and_decide(
        self,
        store: Store,
        now: float,
        waiting: int | None,
        settings: policy.Settings,
        paced: bool = False,
    ) -> tuple[list[policy.Action], policy.Decision, dict[str, policy.VMView]]:
        """The snapshot (one read transaction: a launch completed halfway through must not
        be missed, or counted twice) and the policy's decision on it. ``paced``: on the
        observer thread, which pauses between chunks of the work to leave the event loop the
        GIL (``Pacer``); the read transaction ends before the first pause."""
        pace = Pacer(OBSERVER_DUTY) if paced else _no_pause
        started = time.thread_time()
        with store.one_read():
            reads = self._read_pool(now, store)
            if self._counts_with_snapshot():
                waiting = store.queued_count()
        pace()
        snapshot = self._build_snapshot(now, reads, pace)
        actions, decision = policy.explain(snapshot, waiting, now, settings)
        self.observe_cpu_s = time.thread_time() - started
        return actions, decision, {vm.id: vm for vm in snapshot.vms}

    def _still_as_seen(
        self, actions: list[policy.Action], seen: Mapping[str, policy.VMView]
    ) -> list[policy.Action]:
        """The actions still valid now. Between the snapshot and now an agent may have taken a
        job (its idle VM must not be terminated under it), registered or sent a heartbeat (a
        lost VM is not lost): such a VM waits for the next cycle. A deferred Fail or Lose
        holds back the cycle's launches too, which may have counted its replacement."""
        kept: list[policy.Action] = []
        health_deferred = False
        for action in actions:
            view = seen.get(getattr(action, "vm_id", ""))
            if view is not None and self._changed_since(action, view):
                log.info("event=action_deferred vm=%s action=%s", view.id, type(action).__name__)
                health_deferred |= isinstance(action, (policy.Fail, policy.Lose))
                continue
            kept.append(action)
        if health_deferred:
            kept = [action for action in kept if not isinstance(action, policy.Launch)]
        return kept

    def _changed_since(self, action: policy.Action, view: policy.VMView) -> bool:
        """Whether what ``action`` was decided on has changed since ``view`` was read: the
        VM's state, always; for a Lose, a heartbeat since; for terminating a VM that serves
        and nobody asked to kill (idle, above max, outdated, too old), its jobs or idle time.
        A VM the cloud reported running meanwhile (requested -> booting: the describe started
        this cycle landed while the snapshot was read) has not changed: it is still
        unregistered, and its boot timeout runs from its launch either way."""
        try:
            vm = self.store.vm(view.id)
        except NotFound:
            return True
        if vm.state != view.state and {vm.state, view.state} != STARTING_STATES:
            return True
        if isinstance(action, policy.Lose):
            heard = self.liveness.last_heartbeat(vm.id, vm.last_heartbeat)
            return heard is not None and (
                view.last_heartbeat is None or heard > view.last_heartbeat
            )
        if (
            isinstance(action, policy.Terminate)
            and vm.state in HEARTBEATING_STATES
            and not view.kill_requested
        ):
            jobs = len(vm.jobs) or int(vm.pilot_busy)
            return (vm.idle_since, jobs) != (view.idle_since, view.jobs)
        return False

    async def settle(self) -> None:
        """Wait until no cloud call is in flight (tests and shutdown)."""
        while tasks := self._tasks():
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- observe ------------------------------------------------------------------------

    def snapshot(self, now: float, store: Store | None = None) -> policy.Snapshot:
        """The pool as the policy sees it, read from ``store`` (the engine's own by default)
        in one read transaction."""
        store = store or self.store
        with store.one_read():
            reads = self._read_pool(now, store)
        return self._build_snapshot(now, reads)

    def _read_pool(self, now: float, store: Store) -> PoolReads:
        """Everything a snapshot needs from the store (call it in one read transaction)."""
        pool = self.config.pool
        return PoolReads(
            fleet=store.fleet(ALIVE_STATES),
            launched_with=store.launch_settings(),
            pending=store.pending_counts(),
            backoff_until={
                cloud.name: store.cloud_status(cloud.name).backoff_until
                for cloud in self.config.clouds
                if cloud.name in self.providers
            },
            recent=store.submitted_since(now - pool.arrival_window_s),
            last_minute=store.submitted_since(now - policy.BURST_WINDOW_S),
            baseline_rate=self._baseline_rate(now, store),
            boot_times=store.recent_boot_times(),
            finished=store.finished_since(now - pool.arrival_window_s),
        )

    def _build_snapshot(
        self, now: float, reads: PoolReads, pace: Callable[[], None] = _no_pause
    ) -> policy.Snapshot:
        """The snapshot from what was read: no store access, so the observer may pause
        (``pace``, every PACE_ROWS VMs) without holding a read transaction open. Liveness
        comes from memory, and the start-up grace applies: no VM's heartbeat or boot clock
        counts from before this process started, so a core that was down (or whose wall
        clock stepped) loses no healthy VM."""
        started = self.liveness.started_at
        liveness = self.liveness
        graced = self._graced
        launched_with = reads.launched_with
        current = {c.name: self.launch_fingerprint(c.name) for c in self.config.clouds}
        fleet, rows = reads.fleet, PACE_ROWS
        views: list[policy.VMView] = []
        for first in range(0, len(fleet), rows):
            views.extend(
                policy.VMView(
                    id=vm_id,
                    cloud=cloud,
                    state=state,
                    launched_at=max(launched_at, started) if vm_id in graced else launched_at,
                    idle_since=idle_since,
                    last_heartbeat=_with_grace(
                        liveness.last_heartbeat(vm_id, last_heartbeat),
                        launched_at,
                        started if vm_id in graced else None,
                    ),
                    jobs=jobs or int(pilot_busy),
                    outdated=_outdated(launched_with.get(launch_id), current.get(cloud)),
                    kill_requested=kill_requested,
                )
                for (
                    vm_id,
                    cloud,
                    state,
                    launched_at,
                    idle_since,
                    last_heartbeat,
                    launch_id,
                    kill_requested,
                    pilot_busy,
                    jobs,
                ) in fleet[first : first + rows]
            )
            pace()
        vms = tuple(views)
        pending = reads.pending
        clouds = tuple(
            policy.CloudView(
                name=cloud.name,
                priority=cloud.priority,
                max_instances=cloud.max_instances,
                backoff_until=max(
                    reads.backoff_until[cloud.name], self._placements_reopen_at(cloud, now)
                ),
                launch_in_flight=cloud.name in self._launching or cloud.name in pending,
                pending=pending.get(cloud.name, 0),
                billing_period_s=cloud.billing_period_s,
                min_billed_s=cloud.min_billed_s,
            )
            for cloud in self.config.clouds
            if cloud.name in self.providers
        )
        pool = self.config.pool
        recent, last_minute = reads.recent, reads.last_minute
        self.outdated = sum(1 for vm in vms if vm.outdated)
        return policy.Snapshot(
            vms=vms,
            clouds=clouds,
            arrival_rate=policy.arrival_rate(
                recent.jobs,
                pool.arrival_window_s,
                last_minute.jobs,
                now - last_minute.first_at if last_minute.first_at is not None else 0.0,
                now - recent.first_at if recent.first_at is not None else 0.0,
                recent_submissions=recent.submissions,
                last_minute_submissions=last_minute.submissions,
            ),
            baseline_rate=reads.baseline_rate,
            boot_time_s=policy.boot_time(reads.boot_times, pool.boot_time_guess_s),
            completion_rate=policy.completion_rate(reads.finished, pool.arrival_window_s),
        )

    def _baseline_rate(self, now: float, store: Store) -> float:
        """The ``warm_history_s`` average arrival rate. It moves slowly and counting a day of
        submissions takes milliseconds at 100,000 jobs a day, so it is recounted once a minute."""
        history_s = self.config.pool.warm_history_s
        if not history_s:
            return 0.0
        counted_at, rate = self._baseline
        if not 0 <= now - counted_at < BASELINE_REFRESH_S:
            rate = store.submitted_since(now - history_s).jobs / history_s
            self._baseline = (now, rate)
        return rate

    def _observe_requested(self) -> None:
        """Describe only instances the cloud has not yet reported running: cost per cycle
        follows what is changing, not the fleet size."""
        by_cloud: dict[str, list[str]] = {}
        for vm in self.store.vms([VMState.REQUESTED]):
            by_cloud.setdefault(vm.cloud, []).append(vm.id)
        now = self.clock()
        for cloud, ids in by_cloud.items():
            if cloud in self.providers and self._may_call(cloud, "describe", now):
                self._spawn(self._describing, cloud, self._describe(cloud, ids))

    async def _describe(self, cloud: str, ids: list[str]) -> None:
        try:
            found = await self._call(self.providers[cloud].describe, ids)
        except CloudError as exc:
            self._call_failed(
                cloud, "describe", EventKind.DESCRIBE_FAILED, f"describe failed: {exc}"
            )
            return
        self._call_succeeded(cloud, "describe")
        await self._apply_instance_states(found, self.clock())

    async def _apply_instance_states(self, instances: list[Instance], now: float) -> None:
        async for instance in _a_batch_at_a_time(instances):
            self._apply_instance_state(instance, now)

    def _apply_instance_state(self, instance: Instance, now: float) -> None:
        vm = self.store.vm(instance.id)
        if instance.instance_type is not None:
            self._vm_types[vm.id] = instance.instance_type
        if instance.state == InstanceState.GONE and vm.state in ALIVE_STATES:
            self.store.transition_vm(
                vm.id, VMState.TERMINATED, now, "the cloud reports it gone", Reason.CLOUD_GONE
            )
            self.liveness.forget(vm.id)
        elif instance.state == InstanceState.RUNNING and (
            vm.state == VMState.REQUESTED or (instance.address and instance.address != vm.address)
        ):
            self.store.vm_running(vm.id, instance.address, now)  # a write only for a change

    async def _reconcile(self, cloud: str) -> None:
        """Full tag-filtered listing of one cloud: adopt strays, terminate again what the
        store thinks is gone but still runs, retire VMs the cloud no longer knows."""
        started = self.clock()
        if not self._may_call(cloud, "list", started):
            return
        try:
            listed = await self._call(self.providers[cloud].list_pool)
        except CloudError as exc:
            self._call_failed(cloud, "list", EventKind.RECONCILE_FAILED, f"listing failed: {exc}")
            return
        self._call_succeeded(cloud, "list")
        now = self.clock()
        alive = {vm.id: vm for vm in self.store.vms(ALIVE_STATES) if vm.cloud == cloud}
        seen: set[str] = set()
        zombies: list[str] = []
        async for instance in _a_batch_at_a_time(listed):
            seen.add(instance.id)
            if instance.id in alive:
                self._apply_instance_state(instance, now)
            elif instance.state != InstanceState.GONE:
                try:
                    self.store.vm(instance.id)
                except NotFound:
                    self.store.adopt_vm(
                        instance.id, cloud, instance.launch_id or "unknown", instance.address, now
                    )
                    self._vm_types[instance.id] = instance.instance_type
                else:  # terminated in our books, running in the cloud: it bills
                    zombies.append(instance.id)
        if zombies:
            self.store.record_event(
                now,
                EventKind.TERMINATE_FAILED,
                f"{len(zombies)} VMs recorded as terminated still run: terminating them again",
                cloud=cloud,
            )
            self._spawn(self._terminating, cloud, self._terminate(cloud, zombies))
        unseen = [
            vm.id
            for vm in alive.values()
            if policy.vanished(vm.launched_at, vm.id in seen, started, policy.VANISH_GRACE_S)
        ]
        if not unseen:
            return
        # Not listed is not yet gone: an instance launched before the cloud tag existed is
        # not in a cloud-filtered listing, and listings may lag. Ask for those by id.
        try:
            found = await self._call(self.providers[cloud].describe, unseen)
        except CloudError as exc:
            message = f"describe failed: {exc}"
            self._call_failed(cloud, "list", EventKind.RECONCILE_FAILED, message)
            return
        now = self.clock()
        await self._apply_instance_states(found, now)
        for vm_id in set(unseen) - {instance.id for instance in found}:
            self.store.transition_vm(
                vm_id, VMState.TERMINATED, now, "vanished from the cloud", Reason.VANISHED
            )
            self.liveness.forget(vm_id)

    # ---- act ----------------------------------------------------------------------------

    def _act(self, actions: list[policy.Action], now: float) -> None:
        for action in actions:
            try:
                self._act_on(action, now)
            except Exception:
                # One VM in an unexpected state must not keep the others from being handled.
                log.exception("event=action_failed action=%r", action)

    def _act_on(self, action: policy.Action, now: float) -> None:
        store = self.store
        match action:
            case policy.Launch(cloud=cloud, count=count, reason=reason):
                # Health actions come first and may just have put this cloud in backoff.
                if not self._stopping and store.cloud_status(cloud).backoff_until <= now:
                    count = self._affordable(cloud, count, now)
                    if count > 0:
                        launch = self._new_launch(cloud, count, now, reason)
                        self._spawn(self._launching, cloud, self._run_launch(launch))
            case policy.Fail(vm_id=vm_id, reason=reason):
                with store.transaction():
                    vm = store.transition_vm(
                        vm_id, VMState.FAILED, now, reason, Reason.BOOT_TIMEOUT
                    )
                    store.transition_vm(
                        vm_id, VMState.TERMINATING, now, "boot failed", Reason.BOOT_TIMEOUT
                    )
                self._count_boot_failure(vm.cloud, now)
            case policy.Lose(vm_id=vm_id, reason=reason):
                with store.transaction():
                    store.transition_vm(vm_id, VMState.LOST, now, reason, Reason.HEARTBEAT_TIMEOUT)
                    store.transition_vm(
                        vm_id, VMState.TERMINATING, now, "lost", Reason.HEARTBEAT_TIMEOUT
                    )
            case policy.Terminate(vm_id=vm_id, reason=reason, code=code):
                store.transition_vm(vm_id, VMState.TERMINATING, now, reason, code)
            case policy.Drain(vm_id=vm_id, reason=reason, code=code):
                store.drain_vm(vm_id, now, reason, code)

    def _new_launch(self, cloud: str, count: int, now: float, why: str = "") -> Launch:
        """Persist the intent (with its ClientToken and why) before any call reaches the
        cloud."""
        launch_id = uuid.uuid4().hex[:16]
        return self.store.add_launch(
            launch_id,
            cloud,
            count,
            f"alienec2-{launch_id}",
            now,
            why=why,
            settings_hash=self.launch_fingerprint(cloud),
        )

    def launch_fingerprint(self, cloud: str) -> str:
        """What a VM of this cloud is launched with: its cloud entry (image, types, template,
        ...), the contextualisation and its slots. A VM whose launch was sent with another is
        outdated: its agent runs as many loops as the register reply said when it started."""
        config = self._cloud_config(cloud)
        parts: dict[str, object] = {
            "cloud": config.model_dump(mode="json", include=set(LAUNCH_SETTINGS)),
            "contextualisation": self.config.contextualisation.model_dump(mode="json"),
        }
        if self.config.pool.slots_per_vm != 1:  # 1 leaves the fingerprints of earlier VMs
            parts["slots_per_vm"] = self.config.pool.slots_per_vm
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _request(self, launch: Launch) -> LaunchRequest:
        contextualisation = self.config.contextualisation
        settings = userdata.agent_settings(
            self.core_url,
            launch.id,
            launch_secret(self.launch_keys.for_launch(launch.created_at), launch.id),
            contextualisation,
            slots=self.config.pool.slots_per_vm,
        )
        return LaunchRequest(
            launch_id=launch.id,
            count=launch.count,
            client_token=launch.client_token,
            user_data=userdata.render(settings, contextualisation),
        )

    async def _run_launch(self, launch: Launch) -> None:
        """Send the launch to the cloud's first (type, subnet) not in backoff; a capacity or
        unsupported-type refusal backs that placement off and tries the next one at once.
        Only when every placement refused does the cloud itself back off."""
        provider = self.providers[launch.cloud]
        try:
            request = self._request(launch)
        except Exception as exc:
            # Nothing was sent: the launch fails where an admin sees it, the cloud stays usable.
            self.store.fail_launch(launch.id, f"cannot prepare the launch: {exc}", self.clock())
            return
        config = self._cloud_config(launch.cloud)
        refused: CloudError = CapacityError("every instance type and subnet is in backoff")
        placements = self.placements(config)
        for index, placement in enumerate(placements):
            if self._placement_until(launch.cloud, placement) > self.clock():
                continue
            # Each placement is its own request to EC2, so its own idempotency token.
            token = launch.client_token + (f"-{index}" if index else "")
            attempt = dataclasses.replace(request, placement=placement, client_token=token)
            try:
                instances = await asyncio.to_thread(provider.launch, attempt)
            except PlacementError as exc:
                if len(placements) == 1:
                    refused = exc
                    break
                self._back_off_placement(launch.cloud, placement, exc, self.clock())
                refused = exc
                continue
            except CloudError as exc:
                now = self.clock()
                if exc.refused:
                    # The cloud refused the request (a 4xx answer): nothing was launched.
                    self.store.fail_launch(launch.id, str(exc), now)
                # Otherwise (a timeout, a lost connection, a server error) the cloud may have
                # acted: the intent stays pending and is resolved by its tag after the backoff.
                self._back_off(launch.cloud, exc, now)
                return
            self._launched(launch, placement, instances)
            return
        now = self.clock()
        self.store.fail_launch(launch.id, str(refused), now)
        self._back_off(launch.cloud, refused, now)

    def _launched(self, launch: Launch, placement: Placement, instances: list[Instance]) -> None:
        now = self.clock()
        for instance in instances:
            self._vm_types[instance.id] = instance.instance_type or placement.instance_type
        # Fewer instances than asked (EC2 fulfils partially) is not an error: the policy sees
        # the shortfall next cycle and launches it.
        self.store.complete_launch(launch.id, [(i.id, i.address) for i in instances], now)
        self._placement_backoff.get(launch.cloud, {}).pop(placement, None)
        status = self.store.cloud_status(launch.cloud)
        if status.backoff_level:
            status.backoff_level, status.backoff_until, status.last_error = 0, 0.0, None
            self.store.save_cloud_status(
                status, now, (EventKind.CLOUD_RECOVERED, "launch succeeded")
            )

    async def _resume_launch(self, launch: Launch) -> None:
        """Finish a launch whose result was never recorded: adopt its tagged instances if the
        cloud acted, else send it again with the same ClientToken."""
        provider = self.providers.get(launch.cloud)
        now = self.clock()
        if provider is None:
            self.store.fail_launch(launch.id, "cloud no longer configured", now)
            return
        if self.store.cloud_status(launch.cloud).backoff_until > now or self._stopping:
            return
        try:
            found = await self._call(provider.find_launch, launch.id)
        except CloudError as exc:
            self._back_off(launch.cloud, exc, self.clock())
            return
        if found:
            for instance in found:
                self._vm_types[instance.id] = instance.instance_type
            self.store.complete_launch(launch.id, [(i.id, i.address) for i in found], self.clock())
            return
        await self._run_launch(launch)

    def _pending(self) -> list[Launch]:
        return [launch for launch in self.store.pending_launches() if not self._stopping]

    def _send_terminations(self) -> None:
        """Terminate every VM the store says is terminating, one batch per cloud. Retried each
        cycle until the cloud accepts, so a crash between decision and call loses nothing."""
        by_cloud: dict[str, list[str]] = {}
        for vm in self.store.vms([VMState.TERMINATING]):
            by_cloud.setdefault(vm.cloud, []).append(vm.id)
        now = self.clock()
        for cloud, ids in by_cloud.items():
            if cloud in self.providers and self._may_call(cloud, "terminate", now):
                self._spawn(self._terminating, cloud, self._terminate(cloud, ids))

    async def _terminate(self, cloud: str, ids: list[str]) -> None:
        try:
            missing = await self._call(self.providers[cloud].terminate, ids)
        except CloudError as exc:
            self._call_failed(
                cloud, "terminate", EventKind.TERMINATE_FAILED, f"{len(ids)} VMs: {exc}"
            )
            return
        self._call_succeeded(cloud, "terminate")
        now = self.clock()
        for vm_id in ids:
            if self.store.vm(vm_id).state != VMState.TERMINATING:
                continue  # terminated again after the store recorded it gone (a reconcile)
            why = "unknown to the cloud" if vm_id in missing else "terminate accepted"
            self.store.transition_vm(vm_id, VMState.TERMINATED, now, why, Reason.TERMINATE_ACCEPTED)
            self.liveness.forget(vm_id)

    # ---- housekeeping -------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        """Drop events and finished jobs older than the retention, a few small batches at a
        time, so the state file stays bounded without one long write."""
        retention_s = self.config.state.retention_days * 86400
        if not retention_s or now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        before = now - retention_s
        for _ in range(10):
            jobs = self.store.prune_jobs(before, PRUNE_BATCH)
            events = self.store.prune_events(before, PRUNE_BATCH)
            vms = self.store.prune_vms(before, PRUNE_BATCH)
            if max(jobs, events, vms) < PRUNE_BATCH:
                break

    # ---- calls other than launches: bounded, backed off per cloud ----------------------

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A provider call in a worker thread. It gives up waiting after
        ``clouds[].call_timeout_s`` so a hung endpoint cannot hold the cloud's slot; the
        thread's late answer is dropped (describe, list and terminate are safe to repeat)."""
        cloud = getattr(fn, "__self__", None)
        name = getattr(cloud, "name", "")
        timeout = self._cloud_config(name).call_timeout_s if name else None
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout)
        except TimeoutError:
            raise CloudError(f"no answer within call_timeout_s={timeout:g}") from None

    def _may_call(self, cloud: str, call: str, now: float) -> bool:
        return self._call_backoff.get((cloud, call), (0, 0.0))[1] <= now

    def _call_failed(self, cloud: str, call: str, kind: EventKind, message: str) -> None:
        now = self.clock()
        config = self._cloud_config(cloud)
        level, _ = self._call_backoff.get((cloud, call), (0, 0.0))
        delay = policy.backoff_delay(level, config.call_backoff_initial_s, config.backoff_max_s)
        self._call_backoff[(cloud, call)] = (level + 1, now + delay)
        self.store.record_event(now, kind, f"{message}; retrying in {delay:g}s", cloud=cloud)

    def _call_succeeded(self, cloud: str, call: str) -> None:
        self._call_backoff.pop((cloud, call), None)

    def _cloud_config(self, cloud: str) -> CloudConfig:
        """A cloud's configuration; one removed by a reload keeps its last one (its VMs are
        still terminated through it)."""
        for config in self.config.clouds:
            self._cloud_configs[config.name] = config
        return self._cloud_configs[cloud]

    # ---- backoff ------------------------------------------------------------------------

    def _back_off(self, cloud: str, error: CloudError, now: float) -> None:
        config = self._cloud_config(cloud)
        status = self.store.cloud_status(cloud)
        # A throttled call did nothing and may be sent again soon: the short backoff.
        initial = (
            config.call_backoff_initial_s
            if isinstance(error, ThrottledError)
            else config.backoff_initial_s
        )
        delay = policy.backoff_delay(status.backoff_level, initial, config.backoff_max_s)
        status.backoff_level += 1
        status.backoff_until = now + delay
        status.last_error = str(error)
        kind = (
            "throttled"
            if isinstance(error, ThrottledError)
            else "capacity"
            if isinstance(error, CapacityError)
            else "error"
        )
        self.store.save_cloud_status(
            status, now, (EventKind.CLOUD_BACKOFF, f"{kind}: {error}; no launches for {delay:g}s")
        )

    def _count_boot_failure(self, cloud: str, now: float) -> None:
        config = next((c for c in self.config.clouds if c.name == cloud), None)
        if config is None:
            return
        status = self.store.cloud_status(cloud)
        status.boot_failures += 1
        if status.boot_failures < config.boot_failures_before_backoff:
            self.store.save_cloud_status(status, now)
            return
        status.boot_failures = 0
        self.store.save_cloud_status(status, now)
        self._back_off(
            cloud, CloudError(f"{config.boot_failures_before_backoff} VMs failed to boot"), now
        )

    # ---- placements (instance type x subnet) and Spot interruptions ---------------------

    @staticmethod
    def placements(config: CloudConfig) -> list[Placement]:
        """Every (type, subnet) of a cloud, in the order tried: types first, then subnets."""
        return [Placement(t, n) for t in config.types for n in config.subnets]

    def _placement_until(self, cloud: str, placement: Placement) -> float:
        return self._placement_backoff.get(cloud, {}).get(placement, (0, 0.0, ""))[1]

    def _placements_reopen_at(self, config: CloudConfig, now: float) -> float:
        """When the first of a cloud's placements leaves backoff; 0 while one is open."""
        untils = [self._placement_until(config.name, p) for p in self.placements(config)]
        return 0.0 if min(untils) <= now else min(untils)

    def _back_off_placement(
        self, cloud: str, placement: Placement, error: CloudError, now: float
    ) -> None:
        config = self._cloud_config(cloud)
        backoffs = self._placement_backoff.setdefault(cloud, {})
        level = backoffs.get(placement, (0, 0.0, ""))[0]
        delay = policy.backoff_delay(level, config.backoff_initial_s, config.backoff_max_s)
        backoffs[placement] = (level + 1, now + delay, str(error))
        self.store.record_event(
            now,
            EventKind.PLACEMENT_BACKOFF,
            f"{placement}: {error}; not tried for {delay:g}s",
            cloud=cloud,
        )

    def _count_interruptions(self, now: float) -> None:
        """Spot interruptions per (cloud, type): too many within the window back that type off
        in that cloud, so launches go to its other types or to other clouds."""
        interrupted = self.store.vms([VMState.INTERRUPTED])
        for vm in interrupted:
            if vm.id in self._interrupted_seen or vm.cloud not in self.providers:
                continue
            config = self._cloud_config(vm.cloud)
            kind = self._vm_types.get(vm.id)
            times = self._interruptions.setdefault((vm.cloud, kind), deque())
            times.append(now)
            while times and times[0] < now - config.spot_interruption_window_s:
                times.popleft()
            if len(times) >= config.spot_interruptions_before_backoff:
                times.clear()
                error = CapacityError(
                    f"{config.spot_interruptions_before_backoff} spot interruptions within "
                    f"{config.spot_interruption_window_s:g}s"
                )
                for placement in self.placements(config):
                    if placement.instance_type == kind or kind is None:
                        self._back_off_placement(vm.cloud, placement, error, now)
        self._interrupted_seen = {vm.id for vm in interrupted}

    # ---- cost ---------------------------------------------------------------------------

    def cost_per_hour(self) -> dict[str, float]:
        """$/h per cloud of the VMs alive and the launches pending, from price_per_hour."""
        costs = {cloud.name: 0.0 for cloud in self.config.clouds}
        configs = {cloud.name: cloud for cloud in self.config.clouds}
        types: dict[str, str | None] = {}
        for cloud, ids in self.store.ids_by_cloud(ALIVE_STATES).items():
            config = configs.get(cloud)
            if config is None:
                continue
            for vm_id in ids:
                kind = self._vm_types.get(vm_id, config.types[0])
                types[vm_id] = kind
                costs[cloud] += config.price(kind)
        self._vm_types = types  # forget VMs no longer alive
        for cloud, pending in self.store.pending_counts().items():
            if cloud in configs:
                costs[cloud] += pending * configs[cloud].price(configs[cloud].types[0])
        return costs

    def _affordable(self, cloud: str, count: int, now: float) -> int:
        """How many of ``count`` VMs fit under pool.max_cost_per_hour; the rest are not
        launched, and an event says why (once, until the reason changes)."""
        cap = self.config.pool.max_cost_per_hour
        config = self._cloud_config(cloud)
        open_types = [
            p.instance_type
            for p in self.placements(config)
            if self._placement_until(cloud, p) <= now
        ]
        price = config.price(open_types[0] if open_types else config.types[0])
        if cap is None or price <= 0:
            return count
        current = sum(self.cost_per_hour().values())
        affordable = max(min(count, math.floor((cap - current) / price + 1e-9)), 0)
        if affordable < count:
            message = (
                f"{count - affordable} of {count} VMs not launched: ${current:.2f}/h now, "
                f"${price:g}/h each would pass pool.max_cost_per_hour={cap:g}"
            )
            reason = f"{price:g}/{cap:g}"  # told again only when the reason changes
            if self._skipped.get(cloud) != reason:
                self._skipped[cloud] = reason
                self.store.record_event(now, EventKind.LAUNCH_SKIPPED, message, cloud=cloud)
        else:
            self._skipped.pop(cloud, None)
        return affordable

    def cloud_details(self) -> dict[str, dict[str, Any]]:
        """Per cloud, for the admin status: market, $/h and each placement's backoff."""
        now = self.clock()
        costs = self.cost_per_hour()
        details: dict[str, dict[str, Any]] = {}
        for config in self.config.clouds:
            backoffs = self._placement_backoff.get(config.name, {})
            details[config.name] = {
                "market": config.market,
                "cost_per_hour": round(costs.get(config.name, 0.0), 4),
                "placements": [
                    {
                        "instance_type": p.instance_type,
                        "subnet_id": p.subnet_id,
                        "backoff_s": max(backoffs.get(p, (0, 0.0, ""))[1] - now, 0.0),
                        "last_error": backoffs[p][2] if p in backoffs else None,
                    }
                    for p in self.placements(config)
                ],
            }
        return details

    # ---- tasks --------------------------------------------------------------------------

    def _spawn(
        self, slot: dict[str, asyncio.Task[None]], cloud: str, work: Coroutine[Any, Any, None]
    ) -> None:
        """Run ``work`` unless the same kind of call to that cloud is still in flight."""
        if cloud in slot:
            work.close()
            return
        task = asyncio.create_task(work)
        slot[cloud] = task

        def done(finished: asyncio.Task[None]) -> None:
            if slot.get(cloud) is finished:
                del slot[cloud]
            if not finished.cancelled() and finished.exception() is not None:
                log.error("event=cloud_task_failed cloud=%s", cloud, exc_info=finished.exception())

        task.add_done_callback(done)

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [
            task
            for slot in (self._launching, self._terminating, self._describing, self._reconciling)
            for task in slot.values()
        ]


async def _a_batch_at_a_time(instances: list[Instance]) -> AsyncIterator[Instance]:
    """A cloud's answer one instance at a time, with a turn of the event loop after every
    APPLY_BATCH of them: each is its own write, and agents' requests must not wait for all."""
    for done, instance in enumerate(instances, 1):
        yield instance
        if done % APPLY_BATCH == 0:
            await asyncio.sleep(0)


def _with_grace(seen: float | None, launched_at: float, started: float | None) -> float:
    """The heartbeat time the policy judges: never before this process started for a VM that
    was alive when the previous process last looked (the start-up grace)."""
    at = seen if seen is not None else launched_at
    return at if started is None else max(at, started)


def _outdated(launched_with: str | None, current: str | None) -> bool:
    """A VM is outdated when its launch's settings are known and differ from its cloud's
    current ones (VMs from before fingerprints, or of a cloud no longer configured, are not:
    an upgrade must not replace the whole fleet)."""
    return launched_with is not None and current is not None and launched_with != current
