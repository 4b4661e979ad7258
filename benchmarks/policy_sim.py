"""Scheduling quality: job traces replayed through the real core/policy.py and baselines.

    .venv/bin/python benchmarks/policy_sim.py                 # steady, bursty, real-world-like
    .venv/bin/python benchmarks/policy_sim.py --swf FILE.swf  # your own trace (SWF)

A discrete-event simulation under a virtual clock: jobs arrive, VMs boot (log-normal boot
times), agents take jobs FIFO the moment they are idle (long poll), billing is per second with a
60 s minimum. Every cycle_s a policy looks at the pool and launches or terminates VMs. Side by
side: alienec2 (adaptive warm target), the same policy as a fixed pool (min/max, idle timer),
one VM per job (the original AliEC2), elastiq's rule, and the lower bounds (no wait; VM-hours
of the job runtimes alone).
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import policy
from core.model import VMState

MIN_BILLED_S = 60.0


@dataclass(frozen=True, slots=True)
class Job:
    submit: float
    runtime: float


@dataclass(slots=True)
class VM:
    id: str
    launched: float
    ready: float
    state: VMState = VMState.BOOTING
    idle_since: float | None = None
    job: Job | None = None
    view: policy.VMView | None = None  # cached; rebuilt when the VM changes


@dataclass(slots=True)
class Result:
    name: str
    waits: list[float] = field(default_factory=list)
    billed_s: float = 0.0
    busy_s: float = 0.0
    api_calls: int = 0
    elapsed_s: float = 0.0

    def row(self) -> dict[str, float]:
        waits = sorted(self.waits)
        return {
            "mean_wait": statistics.fmean(waits) if waits else 0.0,
            "p95_wait": waits[int(0.95 * (len(waits) - 1))] if waits else 0.0,
            "vm_hours": self.billed_s / 3600,
            "idle_fraction": 1 - self.busy_s / self.billed_s if self.billed_s else 0.0,
            "api_calls": self.api_calls,
        }


# ---- traces ------------------------------------------------------------------------------


def steady_trace(
    rng: random.Random, hours: float, rate_per_h: float, runtime_s: float
) -> list[Job]:
    jobs, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_h / 3600)
        if t > hours * 3600:
            return jobs
        jobs.append(Job(t, rng.lognormvariate(math.log(runtime_s), 0.6)))


def bursty_trace(rng: random.Random, hours: float, runtime_s: float) -> list[Job]:
    """Bursts of hundreds of jobs (arriving over tens of minutes) between quiet hours."""
    jobs: list[Job] = []
    start = 600.0
    while start < hours * 3600:
        size = rng.randint(300, 600)
        spread = rng.uniform(1200, 2700)
        jobs += [
            Job(start + rng.uniform(0, spread), rng.lognormvariate(math.log(runtime_s), 0.6))
            for _ in range(size)
        ]
        start += spread + rng.uniform(2, 5) * 3600
    return sorted(jobs, key=lambda j: j.submit)


def write_swf(path: Path, rng: random.Random, jobs: int, days: float) -> None:
    """A real-world-like SWF trace: daily cycle, weekday/weekend, bursts, heavy-tailed runtimes."""
    lines = ["; Version: 2.2", "; Computer: alienec2 synthetic grid site", f"; MaxJobs: {jobs}"]
    t, n = 0.0, 0
    mean_gap = days * 86400 / jobs
    while n < jobs:
        hour = (t / 3600) % 24
        day = int(t / 86400) % 7
        load = (0.5 + 0.5 * math.sin((hour - 8) / 24 * 2 * math.pi)) * (0.6 if day >= 5 else 1.0)
        if rng.random() < 0.002:  # a production burst
            for _ in range(rng.randint(100, 400)):
                n += 1
                run = min(int(rng.lognormvariate(math.log(1200), 1.0)) + 1, 48 * 3600)
                lines.append(f"{n} {int(t + rng.uniform(0, 900))} -1 {run} 1 -1 -1 1 -1 -1 1")
        gap = rng.expovariate(1 / (mean_gap / max(load, 0.05) * 0.55))
        t += gap
        n += 1
        run = min(int(rng.paretovariate(1.5) * 300), 48 * 3600)  # sites cap wall time
        lines.append(f"{n} {int(t)} -1 {run} 1 -1 -1 1 -1 -1 1")
    path.write_text("\n".join(lines[: jobs + 3]) + "\n")


def read_swf(path: Path) -> list[Job]:
    """Standard Workload Format: field 2 submit time, field 4 run time; ';' lines are comments."""
    jobs = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields or line.startswith(";"):
            continue
        submit, runtime = float(fields[1]), float(fields[3])
        if runtime > 0 and submit >= 0:
            jobs.append(Job(submit, runtime))
    jobs.sort(key=lambda j: j.submit)
    return jobs


# ---- the simulated pool ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pool:
    min_vms: int
    max_vms: int
    idle_timeout_s: float
    cycle_s: float = 15.0
    boot_median_s: float = 90.0
    boot_sigma: float = 0.3


class Simulation:
    """The cloud, the agents and the queue; a policy object decides each cycle."""

    def __init__(self, jobs: list[Job], pool: Pool, seed: int) -> None:
        self.jobs = jobs
        self.pool = pool
        self.rng = random.Random(seed)
        self.vms: dict[str, VM] = {}
        self.idle: set[str] = set()
        self.waiting: deque[Job] = deque()
        self.events: list[tuple[float, int, str, str]] = []  # (time, seq, kind, vm id)
        self.seq = 0
        self.result = Result("")
        self.arrivals: list[float] = []
        self.boot_times: deque[float] = deque(maxlen=50)
        self.changed = True

    def _push(self, at: float, kind: str, vm_id: str) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, vm_id))

    def launch(self, count: int, now: float) -> None:
        if count <= 0:
            return
        self.result.api_calls += 1  # one RunInstances for the batch
        for _ in range(count):
            boot = self.rng.lognormvariate(math.log(self.pool.boot_median_s), self.pool.boot_sigma)
            vm = VM(f"vm{self.seq}", now, now + boot)
            self.seq += 1
            self.vms[vm.id] = vm
            self._push(vm.ready, "ready", vm.id)
        self.changed = True

    def terminate(self, vm_ids: list[str], now: float) -> None:
        if not vm_ids:
            return
        self.result.api_calls += 1  # one TerminateInstances for the batch
        for vm_id in vm_ids:
            vm = self.vms.pop(vm_id)
            self.idle.discard(vm_id)
            self.result.billed_s += max(now - vm.launched, MIN_BILLED_S)
        self.changed = True

    def _start(self, vm: VM, job: Job, now: float) -> None:
        self.result.waits.append(now - job.submit)
        self.result.busy_s += job.runtime
        vm.state, vm.job, vm.idle_since, vm.view = VMState.BUSY, job, None, None
        self.idle.discard(vm.id)
        self._push(now + job.runtime, "done", vm.id)

    def _dispatch(self, now: float) -> None:
        while self.waiting and self.idle:
            vm = self.vms[min(self.idle)]
            self._start(vm, self.waiting.popleft(), now)

    def _idle(self, vm: VM, now: float) -> None:
        vm.state, vm.job, vm.idle_since, vm.view = VMState.IDLE, None, now, None
        self.idle.add(vm.id)

    def run(self, decider: Decider) -> Result:
        self.result = Result(decider.name)
        started = time.perf_counter()
        arrivals = iter(self.jobs)
        upcoming = next(arrivals, None)
        now = 0.0
        end = (self.jobs[-1].submit if self.jobs else 0) + 6 * 3600
        give_up = end + max((job.runtime for job in self.jobs), default=0) + 86400
        decider.setup(self, now)
        while now <= end or self.waiting or any(v.state == VMState.BUSY for v in self.vms.values()):
            next_cycle = now + self.pool.cycle_s
            while True:  # everything that happens before the next cycle, in time order
                t_event = self.events[0][0] if self.events else math.inf
                t_arrival = upcoming.submit if upcoming else math.inf
                t = min(t_event, t_arrival)
                if t >= next_cycle:
                    break
                if t_arrival <= t_event:
                    assert upcoming is not None
                    self.waiting.append(upcoming)
                    self.arrivals.append(upcoming.submit)
                    upcoming = next(arrivals, None)
                    decider.on_arrival(self, t)
                else:
                    _, _, kind, vm_id = heapq.heappop(self.events)
                    vm = self.vms.get(vm_id)
                    if vm is None:
                        continue
                    if kind == "ready":
                        self.boot_times.append(t - vm.launched)
                        self._idle(vm, t)
                    else:
                        self._idle(vm, t)
                        decider.on_job_end(self, vm, t)
                self._dispatch(t)
                self.changed = True
            now = next_cycle
            decider.cycle(self, now)
            self._dispatch(now)
            if now > give_up:
                raise RuntimeError(f"{decider.name}: the simulation does not drain")
        self.terminate(list(self.vms), now)
        self.result.elapsed_s = time.perf_counter() - started
        return self.result


class Decider:
    name = "?"

    def setup(self, sim: Simulation, now: float) -> None:
        pass

    def on_arrival(self, sim: Simulation, now: float) -> None:
        pass

    def on_job_end(self, sim: Simulation, vm: VM, now: float) -> None:
        pass

    def cycle(self, sim: Simulation, now: float) -> None:
        pass


class CorePolicy(Decider):
    """The real core/policy.py decide(), fed the snapshot the engine would build."""

    def __init__(
        self,
        name: str,
        settings: policy.Settings,
        window_s: float = 600.0,
        history_s: float = 86400.0,
    ) -> None:
        self.name = name
        self.settings = settings
        self.window_s = window_s
        self.history_s = history_s
        self._next_timer = 0.0
        self._last_decided = -math.inf

    def _view(self, vm: VM) -> policy.VMView:
        if vm.view is None:
            vm.view = policy.VMView(
                id=vm.id,
                cloud="sim",
                state=vm.state,
                launched_at=vm.launched,
                idle_since=vm.idle_since,
                last_heartbeat=None,
                jobs=1 if vm.job is not None else 0,
            )
        return vm.view

    def cycle(self, sim: Simulation, now: float) -> None:
        # Nothing changed and no timer can fire: decide() would return what it did last time.
        if not sim.changed and now < self._next_timer:
            return
        sim.changed = False
        arrivals = sim.arrivals
        first = {
            window: bisect.bisect_left(arrivals, now - window)
            for window in (self.window_s, policy.BURST_WINDOW_S, self.history_s)
            if window > 0
        }
        recent = len(arrivals) - first[self.window_s]
        last_minute = len(arrivals) - first[policy.BURST_WINDOW_S]
        history = len(arrivals) - first[self.history_s] if self.history_s else 0
        snapshot = policy.Snapshot(  # as the engine builds it, from the same helpers
            vms=tuple(self._view(vm) for vm in sim.vms.values()),
            clouds=(policy.CloudView("sim", 1, 10**9),),
            arrival_rate=policy.arrival_rate(
                recent,
                self.window_s,
                last_minute,
                now - arrivals[-last_minute] if last_minute else 0.0,
            ),
            baseline_rate=history / self.history_s if self.history_s else 0.0,
            boot_time_s=policy.boot_time(list(sim.boot_times), sim.pool.boot_median_s),
        )
        launch, terminate = 0, []
        for action in policy.decide(snapshot, len(sim.waiting), now, self.settings):
            if isinstance(action, policy.Launch):
                launch += action.count
            elif isinstance(action, policy.Terminate):
                terminate.append(action.vm_id)
        sim.launch(launch, now)
        sim.terminate(terminate, now)
        timers = [
            vm.idle_since + self.settings.idle_timeout_s
            for vm in sim.vms.values()
            if vm.idle_since is not None
        ]
        # The rate changes when an arrival leaves the window of the estimate that sets it.
        window = max(first, key=lambda w: (len(arrivals) - first[w]) / w)
        if first[window] < len(arrivals):
            timers.append(arrivals[first[window]] + window)
        self._next_timer = min(timers, default=math.inf)
        self._last_decided = now

    def on_arrival(self, sim: Simulation, now: float) -> None:
        """The engine wakes when a job is submitted (here at most every 5 s, to keep a week of
        100,000 jobs fast to simulate)."""
        if now - self._last_decided >= 5.0:
            self.cycle(sim, now)


class OneVMPerJob(Decider):
    """The original AliEC2: a VM for each waiting job, terminated when its job ends."""

    name = "one VM per job"

    def __init__(self, max_vms: int) -> None:
        self.max_vms = max_vms

    def cycle(self, sim: Simulation, now: float) -> None:
        booting = sum(vm.state == VMState.BOOTING for vm in sim.vms.values())
        room = self.max_vms - len(sim.vms)
        sim.launch(min(len(sim.waiting) - booting, room), now)

    def on_job_end(self, sim: Simulation, vm: VM, now: float) -> None:
        sim.terminate([vm.id], now)


class Elastiq(Decider):
    """elastiq's rule: launch for waiting jobs once they wait past a threshold time, kill VMs
    idle for idle_for_time_s (defaults of elastiq, one job slot per VM)."""

    name = "elastiq"

    def __init__(self, pool: Pool, waiting_time_s: float = 40, idle_for_s: float = 3600) -> None:
        self.pool = pool
        self.waiting_time_s = waiting_time_s
        self.idle_for_s = idle_for_s
        self.deploy_s = 600.0  # estimated_vm_deploy_time_s: VMs launched this recently count

    def cycle(self, sim: Simulation, now: float) -> None:
        sim.result.api_calls += 1  # it describes the whole fleet on every check
        old = sum(1 for job in sim.waiting if now - job.submit >= self.waiting_time_s)
        coming = sum(
            1
            for vm in sim.vms.values()
            if now - vm.launched < self.deploy_s and vm.state == VMState.BOOTING
        )
        room = self.pool.max_vms - len(sim.vms)
        sim.launch(min(old - coming, room), now)
        idle = sorted(
            (
                vm
                for vm in sim.vms.values()
                if vm.state == VMState.IDLE
                and vm.idle_since is not None
                and now - vm.idle_since > self.idle_for_s
            ),
            key=lambda vm: vm.idle_since or 0,
        )
        spare = len(sim.vms) - self.pool.min_vms
        sim.terminate([vm.id for vm in idle[: max(spare, 0)]], now)


def compare(name: str, jobs: list[Job], pool: Pool, seed: int) -> list[dict[str, object]]:
    base = policy.Settings(
        min_vms=pool.min_vms,
        max_vms=pool.max_vms,
        idle_timeout_s=pool.idle_timeout_s,
        boot_timeout_s=10**9,
        heartbeat_timeout_s=10**12,  # simulated agents never go silent
        max_launch_per_cycle=10**6,
        cycle_interval_s=pool.cycle_s,
    )
    deciders: list[Decider] = [
        CorePolicy("alienec2 (adaptive warm)", replace(base, adaptive_warm=True)),
        CorePolicy("fixed pool", replace(base, adaptive_warm=False)),
        OneVMPerJob(pool.max_vms),
        Elastiq(pool),
    ]
    rows: list[dict[str, object]] = []
    for decider in deciders:
        result = Simulation(jobs, pool, seed).run(decider)
        rows.append({"policy": decider.name, **result.row(), "sim_s": result.elapsed_s})
    work_s = sum(job.runtime for job in jobs)
    rows.append(
        {
            "policy": "lower bound",
            "mean_wait": 0.0,
            "p95_wait": 0.0,
            "vm_hours": work_s / 3600,
            "idle_fraction": 0.0,
            "api_calls": 0,
            "sim_s": 0.0,
        }
    )
    print(
        f"\n== {name}: {len(jobs)} jobs over {jobs[-1].submit / 86400:.1f} days; pool min "
        f"{pool.min_vms} max {pool.max_vms}, idle timer {pool.idle_timeout_s:g}s, boot median "
        f"{pool.boot_median_s:g}s, cycle {pool.cycle_s:g}s"
    )
    print(
        f"{'policy':<26} {'mean wait s':>11} {'p95 wait s':>10} {'VM-hours':>9} "
        f"{'idle frac':>9} {'EC2 calls':>9} {'sim s':>6}"
    )
    for row in rows:
        print(
            f"{row['policy']:<26} {row['mean_wait']:>11.1f} {row['p95_wait']:>10.1f} "
            f"{row['vm_hours']:>9.1f} {row['idle_fraction']:>9.2f} {row['api_calls']:>9} "
            f"{row['sim_s']:>6.1f}"
        )
    ours, bound = rows[0], rows[-1]
    for other in rows[1:-1]:
        p95 = ours["p95_wait"] / other["p95_wait"] if other["p95_wait"] else math.nan
        print(
            f"  alienec2 vs {other['policy']:<16}: p95 wait x{p95:.2f}, VM-hours "
            f"x{ours['vm_hours'] / other['vm_hours']:.2f}, EC2 calls "
            f"x{ours['api_calls'] / max(other['api_calls'], 1):.2f}"
        )
    print(f"  alienec2 vs lower bound      : VM-hours x{ours['vm_hours'] / bound['vm_hours']:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--swf", type=Path, help="replay this SWF trace instead of the synthetic one"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=100_000, help="size of the synthetic SWF trace")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    compare("steady", steady_trace(rng, 48, 120, 1200), Pool(2, 200, 300), args.seed)
    compare("bursty", bursty_trace(rng, 48, 1200), Pool(0, 400, 120), args.seed)
    if args.swf:
        compare(args.swf.name, read_swf(args.swf), Pool(0, 1000, 300), args.seed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.swf"
        write_swf(path, rng, args.jobs, 7)
        compare("real-world-like SWF, one week", read_swf(path), Pool(0, 1000, 300), args.seed)


if __name__ == "__main__":
    main()
