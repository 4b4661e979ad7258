"""The scaling policy: a pure function from a snapshot of the pool to a list of actions.

No I/O, no clock reads, no randomness: everything the pool does can be tested here in
microseconds and replayed in the benchmark simulator. The engine carries the actions out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.model import ALIVE_STATES, HEARTBEATING_STATES, SERVING_STATES, Reason, VMState


@dataclass(frozen=True, slots=True)
class VMView:
    id: str
    cloud: str
    state: VMState
    launched_at: float
    idle_since: float | None = None
    last_heartbeat: float | None = None
    has_job: bool = False
    kill_requested: bool = False


@dataclass(frozen=True, slots=True)
class CloudView:
    name: str
    priority: int
    max_instances: int
    backoff_until: float = 0.0
    launch_in_flight: bool = False
    pending: int = 0  # VMs asked for in launches whose result is not recorded yet


@dataclass(frozen=True, slots=True)
class Settings:
    min_vms: int
    max_vms: int
    idle_timeout_s: float
    boot_timeout_s: float
    heartbeat_timeout_s: float
    max_launch_per_cycle: int
    adaptive_warm: bool = True
    paused: bool = False
    cycle_interval_s: float = 0.0  # a launch decided now may wait this long for its cycle
    warm_margin: float = 1.0  # extra warm VMs, in square roots of the expected arrivals


@dataclass(frozen=True, slots=True)
class Snapshot:
    vms: tuple[VMView, ...]
    clouds: tuple[CloudView, ...]
    arrival_rate: float = 0.0  # jobs per second to prepare for (see arrival_rate())
    baseline_rate: float = 0.0  # jobs per second averaged over a long history (a day)
    boot_time_s: float = 0.0  # slow-case launch-to-registered time of a VM (see boot_time())


@dataclass(frozen=True, slots=True)
class Launch:
    cloud: str
    count: int


@dataclass(frozen=True, slots=True)
class Terminate:
    vm_id: str
    reason: str
    code: Reason = Reason.SCALING


@dataclass(frozen=True, slots=True)
class Fail:
    """Mark a VM failed (never registered) and terminate it."""

    vm_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Lose:
    """Mark a VM lost (stopped heartbeating), requeue its job and terminate it."""

    vm_id: str
    reason: str


Action = Launch | Terminate | Fail | Lose


BURST_WINDOW_S = 60.0
MIN_BURST_SPAN_S = 15.0
SLOW_BOOT_QUANTILE = 0.9


def arrival_rate(
    recent: int, window_s: float, last_minute: int, last_minute_span_s: float
) -> float:
    """Jobs per second the warm pool prepares for: the larger of two estimates.

    - since the last minute's first arrival: a burst's onset shows within seconds (the first
      arrival only marks the start, hence ``last_minute - 1``; spans under 15 s count as 15 s);
    - the ``window_s`` average: the target decays over the window once a burst ends.
    """
    onset = (last_minute - 1) / max(last_minute_span_s, MIN_BURST_SPAN_S) if last_minute > 1 else 0
    return max(onset, recent / window_s)


def boot_time(recent_boots: list[float], guess_s: float) -> float:
    """The slow-case boot time (90th percentile of recent boots): VMs launched for a burst
    must be ready before its jobs, not on average."""
    if not recent_boots:
        return guess_s
    ordered = sorted(recent_boots)
    return ordered[math.ceil(SLOW_BOOT_QUANTILE * len(ordered)) - 1]


def warm_target(snapshot: Snapshot, settings: Settings) -> int:
    """Idle VMs to keep ready beyond the waiting jobs: the arrivals expected before a VM
    launched now could take one (a slow boot plus one cycle), plus ``warm_margin`` square roots
    of that for Poisson variation, as in square-root staffing. Never below what the long-run
    baseline rate expects in that time: bursts at unknown times then meet a few warm VMs,
    while a site quiet for the whole history keeps none."""
    if not settings.adaptive_warm:
        return 0
    lead_s = snapshot.boot_time_s + settings.cycle_interval_s
    expected = snapshot.arrival_rate * lead_s
    target = max(
        math.ceil(expected + settings.warm_margin * math.sqrt(expected)),
        math.ceil(snapshot.baseline_rate * lead_s),
    )
    return min(target, settings.max_vms)


_STARTING_STATES = frozenset({VMState.REQUESTED, VMState.BOOTING})


def _health(vm: VMView, now: float, settings: Settings) -> Action | None:
    """Per-VM rules that apply even when scaling is paused or demand is unknown."""
    state = vm.state
    if vm.kill_requested and state in ALIVE_STATES and state != VMState.TERMINATING:
        return Terminate(vm.id, "killed by admin", Reason.KILLED)
    if state in HEARTBEATING_STATES:  # the common case first: decide() runs over every VM
        seen = vm.last_heartbeat if vm.last_heartbeat is not None else vm.launched_at
        if now - seen > settings.heartbeat_timeout_s:
            return Lose(
                vm.id, f"no heartbeat for {now - seen:.0f}s > {settings.heartbeat_timeout_s:g}s"
            )
        if state == VMState.DRAINING and not vm.has_job:
            return Terminate(vm.id, "drained", Reason.DRAINED)
        return None
    if state in _STARTING_STATES:
        if now - vm.launched_at > settings.boot_timeout_s:
            return Fail(vm.id, f"not registered within boot_timeout_s={settings.boot_timeout_s:g}")
        return None
    if state in (VMState.FAILED, VMState.LOST, VMState.INTERRUPTED):
        return Terminate(vm.id, f"{state} VM still alive")
    return None


def _spread(count: int, snapshot: Snapshot, now: float) -> list[Launch]:
    """Fill clouds in priority order within their quota, skipping those in backoff."""
    alive = {cloud.name: cloud.pending for cloud in snapshot.clouds}
    for vm in snapshot.vms:
        if vm.state in ALIVE_STATES:
            alive[vm.cloud] = alive.get(vm.cloud, 0) + 1
    launches = []
    for cloud in sorted(snapshot.clouds, key=lambda c: (c.priority, c.name)):
        if count <= 0:
            break
        if cloud.backoff_until > now or cloud.launch_in_flight:
            continue
        room = cloud.max_instances - alive.get(cloud.name, 0)
        take = min(room, count)
        if take > 0:
            launches.append(Launch(cloud.name, take))
            count -= take
    return launches


def decide(snapshot: Snapshot, waiting: int | None, now: float, settings: Settings) -> list[Action]:
    """Actions for one cycle. ``waiting`` is the queue's demand; None means it could not be
    read, and then only per-VM health rules run (no scaling change on a blind cycle)."""
    actions: list[Action] = []
    idle: list[VMView] = []
    serving = starting = 0
    for vm in snapshot.vms:  # one pass: this runs over the whole fleet every cycle
        action = _health(vm, now, settings)
        if action is not None:
            actions.append(action)
        elif vm.state in SERVING_STATES:
            serving += 1
            if vm.state == VMState.IDLE:
                idle.append(vm)
            elif vm.state in _STARTING_STATES:
                starting += 1
    if waiting is None or settings.paused:
        return actions

    idle.sort(
        key=lambda vm: (vm.idle_since if vm.idle_since is not None else vm.launched_at, vm.id)
    )
    # VMs of launches in flight are not in the snapshot yet but are coming: count them.
    pending = sum(cloud.pending for cloud in snapshot.clouds)
    starting += pending
    live = serving + pending
    warm = warm_target(snapshot, settings)

    wanted = max(waiting + warm - len(idle) - starting, settings.min_vms - live)
    launch = min(wanted, settings.max_vms - live, settings.max_launch_per_cycle)
    if launch > 0:
        actions.extend(_spread(launch, snapshot, now))
        return actions

    # Shrink: first anything above max_vms (an admin lowered it), then idle VMs past the idle
    # timer, longest idle first, keeping min_vms alive and the idle VMs waiting jobs will need.
    over_max = max(live - settings.max_vms, 0)
    spare = max(len(idle) - waiting - warm, 0)
    reapable = min(max(live - settings.min_vms, 0), spare)
    for vm in idle:
        idle_for = now - (vm.idle_since if vm.idle_since is not None else vm.launched_at)
        if over_max > 0:
            actions.append(Terminate(vm.id, f"above max_vms={settings.max_vms}", Reason.ABOVE_MAX))
            over_max -= 1
            reapable -= 1
        elif reapable > 0 and idle_for > settings.idle_timeout_s:
            actions.append(
                Terminate(
                    vm.id,
                    f"idle {idle_for:.0f}s > idle_timeout_s={settings.idle_timeout_s:g}",
                    Reason.IDLE_TIMEOUT,
                )
            )
            reapable -= 1
    return actions
