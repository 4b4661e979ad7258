"""`alienec2 demo`: the whole system on one machine, without a cloud account.

moto's EC2 server is the cloud (two "clouds" in front of it, the first one optionally out of
capacity), the real core runs with its web service, each instance boots as a local agent
process from its own user data, and a stream of demo jobs keeps the pool busy.

With ``alien`` the jobs go to a stand-in AliEn central task queue instead of the core's own:
the core reads demand through ``queue.kind: command`` (the sandbox's demand command), boots VMs
with the ``alien`` template, and each agent runs the stand-in JobAgent as its pilot, which takes
the jobs from the central queue. The core sees only pilot runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alienec2_tui.client import AdminClient
from core.clouds.alien_clients import NO_JOB_EXIT
from core.clouds.alien_sandbox import CentralQueue, demand_command, jobagent_command
from core.clouds.sandbox import (
    SANDBOX_CREDENTIALS,
    SANDBOX_IMAGE,
    SANDBOX_REGION,
    Faults,
    FaultyEndpoint,
    InstanceRunner,
    MotoEC2Server,
)
from core.config import Config, parse_config, socket_path_problem
from core.daemon import Core
from core.model import (
    REAP_REASONS,
    SERVING_STATES,
    VM,
    Event,
    EventKind,
    Job,
    JobState,
    Reason,
    VMState,
)

log = logging.getLogger("alienec2.demo")

TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
SETTLED_STATES = (VMState.IDLE, VMState.BUSY, VMState.TERMINATED)  # a demo's end: nothing moving


@dataclass(frozen=True, slots=True)
class DemoOptions:
    jobs: int | None = None  # None: an endless stream of bursts (the interactive demo)
    min_vms: int = 1
    max_vms: int = 8
    idle_timeout_s: float = 15.0
    boot_delay_s: float = 3.0
    jitter_s: float = 1.5
    never_boot_fraction: float = 0.0
    die_mid_job: int = 0
    capacity_error: bool = False
    spot_interrupt: float = 0.0  # fraction of VMs that get a Spot termination notice
    failure_rate: float = 0.1
    seed: int = 7
    timeout_s: float = 300.0
    alien: bool = False  # jobs in a stand-in AliEn central queue, run by JobAgent pilots
    slots_per_vm: int = 1  # jobs a VM runs at once


@dataclass(slots=True)
class DemoSummary:
    """What a headless run did, counted from the core's own store and event log."""

    jobs_submitted: int
    jobs_done: int
    jobs_failed: int
    jobs_failed_on_purpose: int  # demo jobs written to exit 3
    jobs_finished_twice: int
    vms_launched: int
    vms_reaped: int
    vms_failed: int
    vms_lost: int
    peak_vms: int
    final_vms: int
    mean_wait_s: float
    runtime_s: float
    all_finished: bool
    timeout_s: float = 0.0
    timed_out: bool = False
    stopped_by: str | None = None  # the signal that stopped the demo early
    # AliEn mode: the jobs above are the central queue's; these come from its own record of
    # how often each job was given to a JobAgent, and from the pilot runs the core recorded.
    alien: bool = False
    jobs_taken_once: int | None = None
    jobs_taken_more_than_once: int | None = None
    pilot_runs: int | None = None
    pilot_runs_with_job: int | None = None  # runs whose output named an AliEn job
    queue_emptied_at: float | None = None  # the central queue's time its last job finished
    vms_interrupted: int = 0  # VMs the core marked interrupted (a Spot termination notice)
    jobs_requeued_by_interruption: int = 0

    def text(self) -> str:
        unplanned = self.jobs_failed - self.jobs_failed_on_purpose
        lines = [
            f"jobs: {self.jobs_submitted} submitted, {self.jobs_done} done, "
            f"{self.jobs_failed_on_purpose} failed on purpose (demo jobs that exit 3), "
            f"{unplanned} failed otherwise, {self.jobs_finished_twice} finished twice",
            f"vms: {self.vms_launched} launched, at most {self.peak_vms} at once, "
            f"{self.vms_reaped} reaped when idle, {self.vms_failed} failed to boot, "
            f"{self.vms_lost} lost, {self.vms_interrupted} interrupted (Spot; "
            f"{self.jobs_requeued_by_interruption} jobs requeued); {self.final_vms} left",
            f"jobs waited {self.mean_wait_s:.2f} s for a VM on average; "
            f"the demo ran {self.runtime_s:.1f} s",
        ]
        if self.alien:
            lines[0] = "AliEn central queue " + lines[0]
            lines.insert(
                1,
                f"JobAgents took {self.jobs_taken_once} jobs exactly once and "
                f"{self.jobs_taken_more_than_once} more than once, in {self.pilot_runs} pilot "
                f"runs ({self.pilot_runs_with_job} ran a job, the rest found none)",
            )
        if self.timed_out:
            lines.append(
                f"timed out after {self.timeout_s:g} s: "
                f"{self.jobs_submitted - self.jobs_done - self.jobs_failed} jobs unfinished, "
                f"{self.final_vms} VMs (min is the goal)"
            )
        if self.stopped_by:
            lines.append(f"stopped by {self.stopped_by} before the jobs finished")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_serving(vms: list[VM], events: list[Event]) -> int:
    """The most VMs serving at once, from the core's record: each VM counts from its launch
    intent (when the policy counted it) until its first event leaving the serving states."""
    left: dict[str, float] = {}
    for event in events:
        if event.kind in LEAVING_EVENTS and event.vm_id is not None:
            left.setdefault(event.vm_id, event.ts)
    changes = [(vm.launched_at, 1) for vm in vms]
    changes += [(ts, -1) for vm_id, ts in left.items()]
    peak = serving = 0
    for _, step in sorted(changes):  # at equal times a VM leaves (-1) before one arrives
        serving += step
        peak = max(peak, serving)
    return peak


LEAVING_EVENTS = frozenset(
    EventKind.for_vm(state) for state in VMState if state not in SERVING_STATES
)


ALIEN_IDLE_RUN_S = 1.0  # a JobAgent run shorter than this found no job (demo jobs run longer)
ALIEN_PILOT_PAUSE_S = 1.0
ALIEN_CYCLE_S = 1.0  # each cycle runs the demand command, a Python process: not every 0.5 s


def alien_settings(central_url: str) -> dict[str, Any]:
    """``queue`` and ``contextualisation`` for the stand-in AliEn: what a site writes, with
    its own JobAgent command and waiting-jobs query in place of the sandbox's."""
    return {
        "queue": {"kind": "command", "command": demand_command(central_url), "timeout_s": 10},
        "contextualisation": {
            "template": "alien",
            "alien": {
                "pilot_command": jobagent_command(central_url),
                "no_job_exit_codes": [NO_JOB_EXIT],
                "idle_run_s": ALIEN_IDLE_RUN_S,
                "pilot_pause_s": ALIEN_PILOT_PAUSE_S,
            },
        },
    }


def demo_config(
    workdir: Path,
    first_cloud: str,
    second_cloud: str,
    opts: DemoOptions,
    central_url: str | None = None,
    admin_socket: Path | None = None,
) -> Config:
    """Two sandbox clouds (the first preferred, with a small quota) and short timers; with
    ``central_url`` the AliEn mode's demand command and JobAgent pilots. The admin socket is
    ``workdir/admin.sock`` unless given."""
    cloud = {
        "region": SANDBOX_REGION,
        "image_id": SANDBOX_IMAGE,
        "exact_count": True,
        "max_attempts": 1,
        "backoff_initial_s": 5,
        "backoff_max_s": 20,
        "boot_failures_before_backoff": 5,
        "market": "spot" if opts.spot_interrupt > 0 else "on-demand",
    }
    clouds = [
        {
            **cloud,
            "name": "sandbox-a",
            "endpoint_url": first_cloud,
            "priority": 1,
            "max_instances": max(opts.max_vms // 2, 1),
        },
        {
            **cloud,
            "name": "sandbox-b",
            "endpoint_url": second_cloud,
            "priority": 2,
            "max_instances": opts.max_vms,
        },
    ]
    pool = {
        "name": "demo",
        "min_vms": opts.min_vms,
        "max_vms": opts.max_vms,
        "idle_timeout_s": opts.idle_timeout_s,
        "boot_timeout_s": opts.boot_delay_s + opts.jitter_s + 8,
        "heartbeat_timeout_s": 5,
        "cycle_interval_s": ALIEN_CYCLE_S if central_url else 0.5,
        "reconcile_interval_s": 60,
        "adaptive_warm": False,
        "slots_per_vm": opts.slots_per_vm,
    }
    alien = alien_settings(central_url) if central_url else None
    return parse_config(
        {
            "core_id": "demo",
            "clouds": clouds,
            "pool": pool,
            "queue": alien["queue"] if alien else {"kind": "builtin", "max_attempts": 3},
            "state": {"path": str(workdir / "state.db"), "synchronous": "normal"},
            "web": {"host": "127.0.0.1", "port": 0},
            "admin": {"socket": str(admin_socket or workdir / "admin.sock")},
            "contextualisation": {
                "agent_heartbeat_s": 1,
                "fetch_wait_s": 20,
                **(alien["contextualisation"] if alien else {}),
            },
        }
    )


def demo_job(rng: random.Random, number: int, failure_rate: float) -> dict[str, Any]:
    """A short shell job of varied length; some fail on purpose."""
    seconds = round(rng.uniform(0.2, 2.5), 1)
    env = {"DEMO_JOB": str(number)}
    if rng.random() < failure_rate:
        script = f"sleep {seconds}; echo 'demo job {number}: simulated failure' >&2; exit 3"
        env[FAILS_ON_PURPOSE] = "1"
    else:
        script = f"sleep {seconds}; echo 'demo job {number} done after {seconds}s'"
    return {"command": ["sh", "-c", script], "env": env}


FAILS_ON_PURPOSE = "DEMO_FAILS_ON_PURPOSE"  # in the environment of the jobs written to fail


def alien_job(rng: random.Random, number: int, failure_rate: float) -> tuple[list[str], bool]:
    """An AliEn-like job for the central queue (its argv, and whether it fails on purpose):
    longer than ``ALIEN_IDLE_RUN_S``, so the JobAgent running it makes its VM busy."""
    seconds = round(rng.uniform(1.5, 4.0), 1)
    fails = rng.random() < failure_rate
    script = f"echo 'ALICE job {number}: simulation, {seconds}s'; sleep {seconds}"
    if fails:
        script += f"; echo 'ALICE job {number}: simulated failure' >&2; exit 3"
    return ["sh", "-c", script], fails


Submit = Callable[[random.Random, range], Awaitable[None]]


async def job_stream(submit: Submit, opts: DemoOptions, stop: asyncio.Event) -> int:
    """Submit the demo jobs (numbered from 1): a burst, then a trickle; endless waves when no
    count is given."""
    rng = random.Random(opts.seed)
    submitted = 0

    async def more(count: int) -> None:
        nonlocal submitted
        await submit(rng, range(submitted + 1, submitted + count + 1))
        submitted += count

    async def pause(seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    if opts.jobs is not None:
        burst = max((opts.jobs * 3) // 5, 1)
        await more(burst)
        while submitted < opts.jobs and not await pause(0.25):
            await more(min(2, opts.jobs - submitted))
        return submitted
    while True:  # waves: a burst, a trickle, a quiet spell for the pool to shrink
        await more(rng.randint(15, 30))
        for _ in range(rng.randint(10, 20)):
            if await pause(1.0):
                return submitted
            await more(1)
        if await pause(opts.idle_timeout_s * 2.5):
            return submitted


class Demo:
    """Everything the demo starts, and the one place that stops it all."""

    def __init__(self, opts: DemoOptions, workdir: Path | None = None) -> None:
        self.opts = opts
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="alienec2-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stop_requested = asyncio.Event()
        self.stopped_by: signal.Signals | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.central: CentralQueue | None = None  # the AliEn mode's stand-in task queue
        self.alien_fails_on_purpose: set[int] = set()  # its job ids written to fail
        self._cleanup: list[Callable[[], Any]] = []  # undo what start() did, newest first
        self.temporary = workdir is None
        if workdir is None:
            self._cleanup.append(lambda: shutil.rmtree(self.workdir, ignore_errors=True))
        self.log_path = self.workdir / "demo.log"
        self._log_to(self.log_path)

    def _admin_socket(self) -> Path:
        """``workdir/admin.sock``, or when that path is too long for a Unix socket (a deep
        TMPDIR or --workdir) the same name in a private directory under /tmp, removed at the
        end."""
        socket = self.workdir / "admin.sock"
        if socket_path_problem(str(socket)) is None:
            return socket
        short = Path(tempfile.mkdtemp(prefix="alienec2-demo-", dir="/tmp"))
        self._cleanup.append(lambda: shutil.rmtree(short, ignore_errors=True))
        log.info("event=demo_admin_socket path=%s reason=workdir_path_too_long", short)
        return short / "admin.sock"

    def _log_to(self, path: Path) -> None:
        """Every user's demo logs into its own working directory (never a shared file)."""
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)

        def close() -> None:
            root.removeHandler(handler)
            handler.close()

        self._cleanup.append(close)

    def interrupt(self, signum: signal.Signals) -> None:
        """A signal asked the demo to stop: everything winds down through ``stop``."""
        if self.stopped_by is None:
            self.stopped_by = signum
            log.warning("event=demo_signal signal=%s", signum.name)
        self.stop_requested.set()

    async def start(self) -> None:
        os.environ.update(SANDBOX_CREDENTIALS)
        self.cloud = MotoEC2Server().start()
        self._cleanup.append(self.cloud.stop)
        self.scarce = FaultyEndpoint(self.cloud.url).start()
        self._cleanup.append(self.scarce.stop)
        self.scarce.capacity_error = self.opts.capacity_error
        if self.opts.alien:
            self.central = CentralQueue().start()
            self._cleanup.append(self.central.stop)
        self.config = demo_config(
            self.workdir,
            self.scarce.url,
            self.cloud.url,
            self.opts,
            self.central.url if self.central else None,
            self._admin_socket(),
        )
        self.core = Core(self.config)
        await self.core.start()
        self._cleanup.append(self.core.stop)
        if self.central is not None:
            self.central.clock = self.core.clock  # its times compare with the core's events
        self.runner = InstanceRunner(
            self.cloud.url,
            self.workdir / "instances",
            boot_delay_s=self.opts.boot_delay_s,
            jitter_s=self.opts.jitter_s,
            faults=Faults(
                self.opts.never_boot_fraction,
                self.opts.die_mid_job,
                self.opts.seed,
                spot_interrupt_fraction=self.opts.spot_interrupt,
            ),
            # Sandbox agents run jobs as the demo's own user: no alienec2-job account here.
            agent_overrides={"max_backoff_s": 2},
        )
        runner = self.runner
        kept = None if self.temporary else self.workdir / "agent-logs"
        self._cleanup.append(lambda: runner.close(keep_logs_in=kept))
        self._tasks.append(asyncio.create_task(self.runner.run(self.stop_requested)))
        self.client = AdminClient(socket_path=str(self.core.admin_socket))
        self._cleanup.append(self.client.aclose)
        submit = self._submit_alien if self.central else self._submit_builtin
        self.jobs_task = asyncio.create_task(job_stream(submit, self.opts, self.stop_requested))
        self._tasks.append(self.jobs_task)

    async def _submit_builtin(self, rng: random.Random, numbers: range) -> None:
        batch = [demo_job(rng, number, self.opts.failure_rate) for number in numbers]
        await self.client.submit_batch(batch)

    async def _submit_alien(self, rng: random.Random, numbers: range) -> None:
        assert self.central is not None
        for number in numbers:
            command, fails = alien_job(rng, number, self.opts.failure_rate)
            job_id = self.central.add(command)
            if fails:
                self.alien_fails_on_purpose.add(job_id)

    async def stop(self) -> None:
        """Stop the job stream, the core, every instance process and the sandbox cloud."""
        self.stop_requested.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._cleanup:
            result = self._cleanup.pop()()
            if asyncio.iscoroutine(result):
                await result

    def serving_vms(self) -> int:
        counts = self.core.store.vm_counts()
        return sum(counts[state] for state in SERVING_STATES)

    async def run_headless(self) -> DemoSummary:
        """Wait for every job to finish and the pool to shrink back to min, then summarise."""
        started = time.monotonic()
        deadline = started + self.opts.timeout_s
        store = self.core.store

        def finished() -> bool:
            if not self.jobs_task.done() or self.jobs_task.cancelled():
                return False
            if self.central is not None:
                central = self.central.counts()
                return central["done"] + central["failed"] >= self.jobs_task.result()
            counts = store.job_counts()
            return sum(counts[state] for state in TERMINAL) >= self.jobs_task.result()

        def settled() -> bool:
            """Back at min_vms, and every other VM terminated: one interrupted, failed or
            lost late in the run may still be on its way out."""
            return self.serving_vms() == self.opts.min_vms and not store.vms(
                [state for state in VMState if state not in SETTLED_STATES]
            )

        timed_out = False
        while not (finished() and settled()):
            if time.monotonic() >= deadline:
                timed_out = True
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), 0.1)
            if self.stop_requested.is_set():
                break
        return self.summary(time.monotonic() - started, finished(), timed_out)

    def summary(self, runtime_s: float, all_finished: bool, timed_out: bool = False) -> DemoSummary:
        store = self.core.store
        events = store.events_after(0, limit=1_000_000)
        records = store.jobs(limit=1_000_000)
        vms = store.vms()
        jobs = self._alien_jobs(records) if self.central else self._queue_jobs(records, events)
        return DemoSummary(
            **jobs,
            vms_launched=len(vms),
            vms_reaped=sum(
                1 for e in events if e.kind == EventKind.VM_TERMINATING and e.reason in REAP_REASONS
            ),
            vms_failed=sum(1 for e in events if e.kind == EventKind.VM_FAILED),
            vms_lost=sum(1 for e in events if e.kind == EventKind.VM_LOST),
            vms_interrupted=sum(1 for e in events if e.kind == EventKind.VM_INTERRUPTED),
            jobs_requeued_by_interruption=sum(
                1
                for e in events
                if e.kind == EventKind.JOB_REQUEUED and e.reason == Reason.SPOT_TERMINATION
            ),
            peak_vms=peak_serving(vms, events),
            final_vms=self.serving_vms(),
            runtime_s=runtime_s,
            all_finished=all_finished,
            timeout_s=self.opts.timeout_s,
            timed_out=timed_out,
            stopped_by=self.stopped_by.name if self.stopped_by else None,
        )

    def _queue_jobs(self, records: list[Job], events: list[Event]) -> dict[str, Any]:
        """The built-in queue's jobs, from the core's store and event log."""
        terminal_events: dict[int, int] = {}
        for event in events:
            if (
                event.kind in (EventKind.JOB_DONE, EventKind.JOB_FAILED)
                and event.job_id is not None
            ):
                terminal_events[event.job_id] = terminal_events.get(event.job_id, 0) + 1
        jobs = [j for j in records if j.kind == "job"]
        waits = [j.started_at - j.submitted_at for j in jobs if j.started_at is not None]
        return {
            "jobs_submitted": len(jobs),
            "jobs_done": sum(1 for j in jobs if j.state == JobState.DONE),
            "jobs_failed": sum(1 for j in jobs if j.state == JobState.FAILED),
            "jobs_failed_on_purpose": sum(
                1 for j in jobs if j.state == JobState.FAILED and FAILS_ON_PURPOSE in j.env
            ),
            "jobs_finished_twice": sum(1 for n in terminal_events.values() if n > 1),
            "mean_wait_s": statistics.fmean(waits) if waits else 0.0,
        }

    def _alien_jobs(self, records: list[Job]) -> dict[str, Any]:
        """The central queue's jobs, from its own record; the pilot runs from the core's."""
        assert self.central is not None
        jobs = self.central.jobs()
        waits = [j["taken_at"] - j["submitted_at"] for j in jobs if j["taken_at"] is not None]
        runs = [j for j in records if j.kind == "pilot"]
        return {
            "jobs_submitted": len(jobs),
            "jobs_done": sum(1 for j in jobs if j["state"] == "done"),
            "jobs_failed": sum(1 for j in jobs if j["state"] == "failed"),
            "jobs_failed_on_purpose": sum(
                1 for j in jobs if j["state"] == "failed" and j["id"] in self.alien_fails_on_purpose
            ),
            "jobs_finished_twice": sum(1 for j in jobs if j["taken"] > 1),
            "mean_wait_s": statistics.fmean(waits) if waits else 0.0,
            "alien": True,
            "jobs_taken_once": sum(1 for j in jobs if j["taken"] == 1),
            "jobs_taken_more_than_once": sum(1 for j in jobs if j["taken"] > 1),
            "pilot_runs": len(runs),
            "pilot_runs_with_job": sum(1 for r in runs if r.alien_job_id is not None),
            "queue_emptied_at": self.central.emptied_at(),
        }


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
CONSOLE_EXIT_S = 5.0  # how long a console gets to restore the terminal after a signal


async def run_demo(
    opts: DemoOptions,
    workdir: Path | None = None,
    console: Callable[[Demo], Awaitable[None]] | None = None,
) -> DemoSummary:
    """Headless without ``console``; else run until the console returns. Always cleans up,
    also on SIGTERM, SIGHUP (a dropped SSH session) and SIGINT."""
    demo = Demo(opts, workdir)
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, demo.interrupt, signum)
    try:
        await demo.start()
        if demo.stop_requested.is_set():
            return demo.summary(0.0, False)
        if console is None:
            return await demo.run_headless()
        await _run_console(demo, console)
        return demo.summary(0.0, True)
    finally:
        try:
            await demo.stop()
        finally:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)


async def _run_console(demo: Demo, console: Callable[[Demo], Awaitable[None]]) -> None:
    """The console until it quits or a signal stops the demo; then it is cancelled, which
    lets Textual leave the alternate screen and give the terminal back."""
    shown = asyncio.ensure_future(console(demo))
    stopped = asyncio.ensure_future(demo.stop_requested.wait())
    try:
        await asyncio.wait({shown, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not shown.done():
            shown.cancel()
            await asyncio.wait({shown}, timeout=CONSOLE_EXIT_S)
    if shown.done() and not shown.cancelled():
        shown.result()  # the console's own error, if it had one
