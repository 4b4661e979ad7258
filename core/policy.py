"""The scaling policy: a pure function from a snapshot of the pool to a list of actions.

No I/O, no clock reads, no randomness: everything the pool does can be tested here in
microseconds and replayed in the benchmark simulator. The engine carries the actions out.

Capacity is counted in job slots (``slots_per_vm`` per VM): waiting jobs and the warm target
are met by free slots on idle and busy VMs and by the slots of VMs still starting.

Rates are trusted only as far as their evidence: an estimate resting on fewer than
``MIN_EVIDENCE`` (4) arrivals counts as no rate at all, and the day's floor applies only once it
expects a whole job per lead time. A minimum count rather than a lower confidence bound on a
Poisson rate, because (1) it is exact and says itself in a reason ("rate 0/min"), (2) a 90%
bound still reads three jobs in a minute as ~0.5/min and keeps two VMs warm for them, while it
shrinks an established burst's rate by a third at a dozen arrivals (the bursty trace's p95 wait
is settled in those first seconds). Four is the fewest that keeps three submissions by hand
from reading as a burst (at three the Poisson relative error 1/sqrt(n) is 58%); five cost the
bursty trace's p95 a third more (x0.09-0.10 of one VM per job instead of x0.07-0.08).
A last minute busier than the window is a burst only if the window's rate before it would give
that many so fast less than once in 1,000 (``ONSET_SIGNIFICANCE``): at two jobs a minute, four
within a minute happen by chance dozens of times an hour (within 15 s, twice an hour: read as
six times the rate), and each lifted the warm target for VMs that were then reaped.

Idle VMs beyond the waiting jobs and the warm target are spare. They go at the idle timer; once
a rate is trusted, after one lead time (slow boot + cycle: holding longer costs more than a
relaunch), or ``warm_margin`` of it below 1: the margin is what a site pays against waits, and
a held spare is the same insurance (at 0, spares go at once: on steady load x1.06 of the
VM-hours bound instead of x1.09, the p95 wait 75 s instead of 55 s); when jobs come less often
than once per lead time, at once; and on clouds billed by long periods, just before the paid
period ends (within one cycle + ``BILLING_MARGIN_S``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from core.model import (
    ALIVE_STATES,
    HEARTBEATING_STATES,
    SERVING_STATES,
    STARTING_STATES,
    Reason,
    VMState,
)


class VMView(NamedTuple):
    """One VM as the policy sees it. A named tuple, not a frozen dataclass: the engine builds
    one per VM at every cycle, and a frozen dataclass's ``__init__`` (a ``__setattr__`` per
    field) took a third of a 10,000-VM snapshot."""

    id: str
    cloud: str
    state: VMState
    launched_at: float
    idle_since: float | None = None
    last_heartbeat: float | None = None
    jobs: int = 0  # slots in use
    kill_requested: bool = False
    outdated: bool = False  # launched with settings that have changed since


@dataclass(frozen=True, slots=True)
class CloudView:
    name: str
    priority: int
    max_instances: int
    backoff_until: float = 0.0
    launch_in_flight: bool = False
    pending: int = 0  # VMs asked for in launches whose result is not recorded yet
    billing_period_s: float = 1.0  # a started period is paid in full (3600: billed by the hour)
    min_billed_s: float = 60.0  # the minimum charge of a VM (AWS: 60 s)


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
    warm_margin: float = 1.0  # extra warm slots, in square roots of the expected arrivals
    slots_per_vm: int = 1  # jobs a VM runs at once
    max_lifetime_s: float = 0.0  # VMs older than this are drained and replaced (0: never)
    max_replace_per_cycle: int = 1  # outdated or old VMs draining at once, at most


@dataclass(frozen=True, slots=True)
class Snapshot:
    vms: tuple[VMView, ...]
    clouds: tuple[CloudView, ...]
    arrival_rate: float = 0.0  # jobs per second to prepare for (see arrival_rate())
    baseline_rate: float = 0.0  # jobs per second averaged over a long history (a day)
    boot_time_s: float = 0.0  # slow-case launch-to-registered time of a VM (see boot_time())
    completion_rate: float = 0.0  # jobs finished per second (see completion_rate())


@dataclass(frozen=True, slots=True)
class Launch:
    cloud: str
    count: int
    reason: str = ""


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


@dataclass(frozen=True, slots=True)
class Drain:
    """Give the VM no new job and terminate it once idle (a rollout, a lifetime)."""

    vm_id: str
    reason: str
    code: Reason


Action = Launch | Terminate | Fail | Lose | Drain


@dataclass(frozen=True, slots=True)
class Decision:
    """One cycle's inputs and outcome, kept so that anyone can see why the pool changed."""

    at: float
    waiting: int | None  # None: demand unknown, only health rules ran
    idle: int  # VMs with every slot free
    busy: int  # VMs with a slot in use
    booting: int  # VMs starting, including those of launches in flight
    serving: int  # VMs counted against max_vms
    free_slots: int  # on idle and busy VMs
    warm: int  # warm target, in slots
    rate_per_s: float  # the arrival rate the warm target follows
    lead_s: float  # slow boot + one cycle: how far ahead the warm target looks
    launched: int = 0
    terminated: int = 0
    skipped: tuple[tuple[str, str], ...] = ()  # (cloud, why) not launched into this cycle
    reason: str = ""  # the launch or shrink summary, or why nothing changed


BURST_WINDOW_S = 60.0
MIN_BURST_SPAN_S = 15.0
RARE_DAY_TRUST = 2.0  # on a day of rare arrivals, a short-term rate must expect this many
MIN_EVIDENCE = 4  # arrivals a rate must rest on before the warm target follows it
SLOW_BOOT_QUANTILE = 0.9
BILLING_MARGIN_S = 30.0  # the terminate call must land before the paid period ends
VANISH_GRACE_S = 120.0  # an instance younger than this may not be listed yet
ONSET_SIGNIFICANCE = 0.001  # a last minute chance explains this often is no burst


def arrival_rate(
    recent: int,
    window_s: float,
    last_minute: int,
    last_minute_span_s: float,
    recent_span_s: float | None = None,
    *,
    recent_submissions: int | None = None,
    last_minute_submissions: int | None = None,
) -> float:
    """Jobs per second the warm pool prepares for: the larger of two estimates, each only once
    it rests on ``MIN_EVIDENCE`` submissions (two jobs a few seconds apart are not a burst, nor
    is one batch of ten: its jobs are waiting already and say nothing of what comes next).

    - since the last minute's first submission: a burst's onset shows within seconds (the
      first one only marks the start, hence ``submissions - 1``; spans under 15 s count as
      15 s), but only when the rest of the window makes that many in so short a span a surprise
      (``ONSET_SIGNIFICANCE``): on steady load four jobs close together are chance. When it
      is no surprise, the window's submissions are measured since its first one
      (``recent_span_s``), so a burst that began within the window is not diluted;
    - the ``window_s`` average: the target decays over the window once a burst ends.

    Submissions count arrivals; each brings its mean batch size in jobs. Without submission
    counts every job is its own submission.
    """
    subs = recent if recent_submissions is None else recent_submissions
    minute_subs = last_minute if last_minute_submissions is None else last_minute_submissions
    window = recent / window_s if subs >= MIN_EVIDENCE else 0.0
    if minute_subs < MIN_EVIDENCE:
        return window
    span_s = max(last_minute_span_s, MIN_BURST_SPAN_S)
    before = (subs - minute_subs) / max(window_s - BURST_WINDOW_S, BURST_WINDOW_S)
    if poisson_tail(minute_subs - 1, before * span_s) >= ONSET_SIGNIFICANCE:
        if recent_span_s is None:
            return window
        ramp_s = max(min(recent_span_s, window_s), span_s)
        return max((subs - 1) * (recent / subs) / ramp_s, window)
    return max((minute_subs - 1) * (last_minute / minute_subs) / span_s, window)


def poisson_tail(k: int, mean: float) -> float:
    """P(N >= k) for N Poisson with this mean: how often chance alone gives k arrivals where
    ``mean`` are expected. At or below the mean it says 1.0 (the true value is about a half or
    more: never a surprise), which also keeps the sum short."""
    if k <= 0 or k <= mean:
        return 1.0
    if mean <= 0:
        return 0.0
    total = 0.0
    for i in itertools.count(k):  # terms fall from the first: k > mean
        term = math.exp(i * math.log(mean) - mean - math.lgamma(i + 1))
        total += term
        if term <= total * 1e-12:
            break
    return min(total, 1.0)


def completion_rate(finished: int, window_s: float) -> float:
    """Jobs finished per second over the arrival window (each frees a slot), once it rests on
    ``MIN_EVIDENCE`` completions."""
    return finished / window_s if finished >= MIN_EVIDENCE else 0.0


def boot_time(recent_boots: list[float], guess_s: float) -> float:
    """The slow-case boot time (90th percentile of recent boots): VMs launched for a burst
    must be ready before its jobs, not on average."""
    if not recent_boots:
        return guess_s
    ordered = sorted(recent_boots)
    return ordered[math.ceil(SLOW_BOOT_QUANTILE * len(ordered)) - 1]


def backoff_delay(level: int, initial_s: float, max_s: float) -> float:
    """Seconds without launches after the ``level``-th consecutive error (0 for the first):
    doubling from ``initial_s``, capped at ``max_s``."""
    return min(initial_s * 2.0 ** min(level, 64), max_s)


def vanished(launched_at: float, listed: bool, listing_started: float, grace_s: float) -> bool:
    """An instance missing from a listing is gone only if it was launched ``grace_s`` before
    the listing started: a younger one may not be listed yet (eventual consistency)."""
    return not listed and launched_at < listing_started - grace_s


def paid_until(launched_at: float, now: float, cloud: CloudView) -> float:
    """When the period paid for at ``now`` ends: a started period is paid in full, and no VM
    is billed less than the minimum charge."""
    age = max(now - launched_at, 0.0)
    periods = max(math.ceil(age / cloud.billing_period_s), 1)
    return launched_at + max(periods * cloud.billing_period_s, cloud.min_billed_s)


def _lead_s(snapshot: Snapshot, settings: Settings) -> float:
    return snapshot.boot_time_s + settings.cycle_interval_s


def warm_target(snapshot: Snapshot, settings: Settings) -> int:
    """Free slots to keep ready beyond the waiting jobs, for what arrives before a VM launched
    now could take a job (a slow boot plus one cycle): the arrivals expected in that time net
    of the slots completions free, plus ``warm_margin`` square roots of both for Poisson
    variation (square-root staffing). Steady load, where completions free slots as fast as
    jobs arrive, then keeps only the margin. Never below what the day's rate expects in that
    time, with its margin, once that is a whole job: bursts at unknown times meet warm slots.
    On a day of rarer arrivals a short-term rate counts only if it expects two or more: a few
    jobs close together on a quiet site are not worth a warm VM."""
    if not settings.adaptive_warm:
        return 0
    lead_s = _lead_s(snapshot, settings)
    arriving = snapshot.arrival_rate * lead_s
    freed = snapshot.completion_rate * lead_s
    usual = snapshot.baseline_rate * lead_s
    if 0 < usual < 1 and arriving < RARE_DAY_TRUST:
        arriving = freed = 0.0
    target = math.ceil(
        max(arriving - freed, 0.0) + settings.warm_margin * math.sqrt(arriving + freed)
    )
    if usual >= 1:
        floor = max(usual - freed, 0.0) + settings.warm_margin * math.sqrt(usual)
        target = max(target, math.ceil(floor))
    return min(target, settings.max_vms * settings.slots_per_vm)


def rare_arrivals(snapshot: Snapshot, settings: Settings) -> bool:
    """True when the evidence says jobs arrive less than once per lead time (slow boot plus a
    cycle): a spare idle VM would then wait longer for its next job than a new VM takes to
    boot, so it is cheaper to terminate it and launch when a job comes. Without evidence
    (no trusted rate, no day history) the idle timer decides."""
    rate = max(snapshot.arrival_rate, snapshot.baseline_rate)
    return settings.adaptive_warm and 0 < rate * _lead_s(snapshot, settings) < 1


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
        if state == VMState.DRAINING and vm.jobs == 0:
            return Terminate(vm.id, "drained", Reason.DRAINED)
        return None
    if state in STARTING_STATES:
        if now - vm.launched_at > settings.boot_timeout_s:
            return Fail(vm.id, f"not registered within boot_timeout_s={settings.boot_timeout_s:g}")
        return None
    if state in (VMState.FAILED, VMState.LOST, VMState.INTERRUPTED):
        code = {VMState.FAILED: Reason.BOOT_TIMEOUT, VMState.LOST: Reason.HEARTBEAT_TIMEOUT}
        return Terminate(vm.id, f"{state} VM still alive", code.get(state, Reason.SPOT_TERMINATION))
    return None


def _spread(
    count: int, snapshot: Snapshot, now: float, reason: str
) -> tuple[list[Launch], list[tuple[str, str]]]:
    """Fill clouds in priority order within their quota, skipping those in backoff; also says
    which clouds were skipped and why."""
    alive = {cloud.name: cloud.pending for cloud in snapshot.clouds}
    for vm in snapshot.vms:
        if vm.state in ALIVE_STATES:
            alive[vm.cloud] = alive.get(vm.cloud, 0) + 1
    launches: list[Launch] = []
    skipped: list[tuple[str, str]] = []
    for cloud in sorted(snapshot.clouds, key=lambda c: (c.priority, c.name)):
        if count <= 0:
            break
        if cloud.backoff_until > now:
            skipped.append((cloud.name, f"backoff for {cloud.backoff_until - now:.0f}s more"))
            continue
        if cloud.launch_in_flight:
            skipped.append((cloud.name, "a launch is in flight"))
            continue
        used = alive.get(cloud.name, 0)
        take = min(cloud.max_instances - used, count)
        if take <= 0:
            skipped.append((cloud.name, f"quota full ({used}/{cloud.max_instances})"))
            continue
        launches.append(Launch(cloud.name, take, f"{reason} (on {cloud.name}: {take})"))
        count -= take
    return launches, skipped


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def decide(snapshot: Snapshot, waiting: int | None, now: float, settings: Settings) -> list[Action]:
    """Actions for one cycle (see explain() for the record of why)."""
    return explain(snapshot, waiting, now, settings)[0]


def _replacements(
    snapshot: Snapshot,
    idle: list[VMView],
    free: int,
    waiting: int,
    now: float,
    settings: Settings,
) -> tuple[list[Drain], list[VMView], int]:
    """Rollouts and lifetimes: VMs launched with old settings, or older than
    ``max_lifetime_s``, are drained a few at a time (``max_replace_per_cycle`` draining at
    once) and the usual rules launch their replacements. An idle one goes only while the
    free slots left still cover the waiting jobs; a busy one finishes its job first.
    Returns the drains, and the idle VMs and free slots that remain."""
    lifetime = settings.max_lifetime_s
    draining = sum(1 for vm in snapshot.vms if vm.state == VMState.DRAINING)
    room = settings.max_replace_per_cycle - draining
    if room <= 0:
        return [], idle, free

    def why(vm: VMView) -> tuple[str, Reason] | None:
        if vm.outdated:
            return "launched with settings that have changed since", Reason.OUTDATED
        if lifetime and now - vm.launched_at > lifetime:
            age = now - vm.launched_at
            return f"{age:.0f}s old > max_lifetime_s={lifetime:g}", Reason.LIFETIME
        return None

    drains: list[Drain] = []
    kept: list[VMView] = []
    for vm in sorted(idle, key=lambda v: v.launched_at):
        cause = why(vm)
        if cause and len(drains) < room and free - settings.slots_per_vm >= waiting:
            drains.append(Drain(vm.id, f"replace: {cause[0]}", cause[1]))
            free -= settings.slots_per_vm
        else:
            kept.append(vm)
    for vm in sorted(snapshot.vms, key=lambda v: v.launched_at):
        if len(drains) >= room:
            break
        cause = why(vm) if vm.state == VMState.BUSY and not vm.kill_requested else None
        if cause:
            drains.append(Drain(vm.id, f"replace once its job ends: {cause[0]}", cause[1]))
    return drains, kept, free


def explain(
    snapshot: Snapshot, waiting: int | None, now: float, settings: Settings
) -> tuple[list[Action], Decision]:
    """Actions for one cycle and the Decision that explains them. ``waiting`` is the queue's
    demand; None means it could not be read, and then only per-VM health rules run (no
    scaling change on a blind cycle)."""
    actions: list[Action] = []
    idle: list[VMView] = []
    slots = settings.slots_per_vm
    serving = starting = busy = free = leaving = 0
    for vm in snapshot.vms:  # one pass: this runs over the whole fleet every cycle
        action = _health(vm, now, settings)
        if action is not None:
            actions.append(action)
        elif vm.state in SERVING_STATES:
            serving += 1
            if vm.state == VMState.IDLE:
                idle.append(vm)
                free += slots
            elif vm.state == VMState.BUSY:
                busy += 1
                free += max(slots - vm.jobs, 0)
            elif vm.state in STARTING_STATES:
                starting += 1
            else:
                leaving += 1  # draining: it counts against max_vms, not towards min_vms
    if waiting is not None and not settings.paused:
        drains, idle, free = _replacements(snapshot, idle, free, waiting, now, settings)
        actions.extend(drains)
        leaving += len(drains)
    # VMs of launches in flight are not in the snapshot yet but are coming: count them.
    pending = sum(cloud.pending for cloud in snapshot.clouds)
    starting += pending
    live = serving + pending
    lead_s = _lead_s(snapshot, settings)
    warm = warm_target(snapshot, settings)
    record: dict[str, Any] = dict(
        at=now,
        waiting=waiting,
        idle=len(idle),
        busy=busy,
        booting=starting,
        serving=live,
        free_slots=free,
        warm=warm,
        rate_per_s=snapshot.arrival_rate,
        lead_s=lead_s,
    )
    if waiting is None or settings.paused:
        why = "demand unknown: health rules only" if waiting is None else "scaling paused"
        return actions, Decision(**record, reason=why)

    # Slots short of the waiting jobs and the warm target, rounded up to whole VMs.
    short = waiting + warm - free - starting * slots
    wanted = max(-(-short // slots), settings.min_vms - (live - leaving))
    launch = min(wanted, settings.max_vms - live, settings.max_launch_per_cycle)
    if launch > 0:
        reason = _launch_reason(
            launch, wanted, waiting, warm, free, starting, live, snapshot, settings
        )
        spread, skipped = _spread(launch, snapshot, now, reason)
        actions.extend(spread)
        launched = sum(a.count for a in spread)
        if launched < launch:  # clouds in backoff or full: say what was wanted
            reason = f"launch {launched} of {reason.removeprefix('launch ')}"
        if skipped:
            reason += "; skipped " + ", ".join(f"{name} ({why})" for name, why in skipped)
        return actions, Decision(
            **record,
            launched=launched,
            skipped=tuple(skipped),
            reason=reason,
        )

    # Shrink: first anything above max_vms (an admin lowered it), then idle VMs nobody needs,
    # longest idle first, keeping min_vms alive and the free slots waiting jobs and the warm
    # target need. Spare VMs go on clouds billed by long periods just before their paid period
    # ends (the rest of it is paid already); elsewhere at the idle timer, at once when jobs
    # arrive slower than a boot, or once a rate is trusted after one boot and cycle (scaled down
    # by a warm_margin below 1).
    idle.sort(
        key=lambda vm: (vm.idle_since if vm.idle_since is not None else vm.launched_at, vm.id)
    )
    over_max = max(live - settings.max_vms, 0)
    spare = max((free - waiting - warm) // slots, 0)
    reapable = min(max(live - settings.min_vms, 0), spare, len(idle))
    need = f"{waiting} waiting + {warm} warm need {waiting + warm} of {free} free slots"
    clouds = {cloud.name: cloud for cloud in snapshot.clouds}
    window_s = settings.cycle_interval_s + BILLING_MARGIN_S
    rare = rare_arrivals(snapshot, settings)
    hold_s = lead_s * min(settings.warm_margin, 1.0)
    terminated = 0
    for vm in idle:
        if over_max <= 0 and reapable <= 0:
            break
        idle_for = now - (vm.idle_since if vm.idle_since is not None else vm.launched_at)
        if over_max > 0:
            actions.append(Terminate(vm.id, f"above max_vms={settings.max_vms}", Reason.ABOVE_MAX))
            over_max -= 1
            reapable -= 1
            terminated += 1
            continue
        cloud = clouds.get(vm.cloud)
        if cloud is not None and cloud.billing_period_s > window_s:
            left = paid_until(vm.launched_at, now, cloud) - now
            if left > window_s:
                continue
            why = (
                f"idle {idle_for:.0f}s and its paid period ends in {left:.0f}s "
                f"(billing_period_s={cloud.billing_period_s:g}); {need}"
            )
            code = Reason.BILLING_PERIOD
        elif idle_for > settings.idle_timeout_s:
            why = f"idle {idle_for:.0f}s > idle_timeout_s={settings.idle_timeout_s:g}; {need}"
            code = Reason.IDLE_TIMEOUT
        elif rare:
            rate = max(snapshot.arrival_rate, snapshot.baseline_rate)
            why = (
                f"idle {idle_for:.0f}s; jobs arrive every {1 / rate:.0f}s on average, slower "
                f"than a VM boots ({lead_s:.0f}s): a new VM is cheaper; {need}"
            )
            code = Reason.SPARE_CAPACITY
        elif settings.adaptive_warm and snapshot.arrival_rate > 0 and idle_for > hold_s:
            why = (
                f"idle {idle_for:.0f}s > {hold_s:.0f}s (min(warm_margin, 1) x one boot and "
                f"cycle, {lead_s:.0f}s) beyond the warm target; {need}"
            )
            code = Reason.SPARE_CAPACITY
        else:
            continue
        actions.append(Terminate(vm.id, why, code))
        reapable -= 1
        terminated += 1
    reason = f"terminate {terminated}: {need}" if terminated else f"no change: {need}"
    return actions, Decision(**record, terminated=terminated, reason=reason)


def _launch_reason(
    launch: int,
    wanted: int,
    waiting: int,
    warm: int,
    free: int,
    starting: int,
    live: int,
    snapshot: Snapshot,
    settings: Settings,
) -> str:
    """'launch 3: 2 waiting + 3 warm (rate 1.2/min x 135 s) - 1 idle - 1 booting'."""
    slots = settings.slots_per_vm
    rate = f"rate {snapshot.arrival_rate * 60:.2g}/min x {_lead_s(snapshot, settings):.0f} s"
    if slots == 1:
        text = f"{waiting} waiting + {warm} warm ({rate}) - {free} idle - {starting} booting"
    else:
        text = (
            f"{waiting} waiting + {warm} warm ({rate}) - {free} free slots - "
            f"{starting} booting x {slots} slots, in VMs of {slots} slots"
        )
    if settings.min_vms - live >= wanted and settings.min_vms > live:
        text = f"keep min_vms={settings.min_vms} ({live} live)"
    if launch < wanted:
        cap = "max_vms" if settings.max_vms - live == launch else "max_launch_per_cycle"
        limit = settings.max_vms if cap == "max_vms" else settings.max_launch_per_cycle
        text += f"; {wanted} wanted, capped by {cap}={limit}"
    return f"launch {launch}: {text}"
