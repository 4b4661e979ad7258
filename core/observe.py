"""Observing the pool: the snapshot of the whole fleet and the policy's decision on it.

At 10,000 VMs a snapshot takes 100-250 ms of CPU. On a thread of the core's own process it
held the GIL for that long (paced, over up to a second), and every agent request the event
loop served meanwhile waited for the GIL after each recv, send and poll: the slowest round
trips of the load benchmark clustered in those windows (benchmarks/README.md). So the core
observes in a process of its own (``ObserverProcess``), at a lower CPU priority, reading the
state file on a read-only connection (WAL: it sees committed transactions only, and never
blocks the writer). What it needs from the core's memory (heartbeats, backoffs, fingerprints)
travels in ``ObserveInputs``; everything here is a function of its arguments. A small fleet
is observed in the loop: it costs less than a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, NamedTuple

from core import policy
from core.model import ALIVE_STATES
from core.store import Store
from core.store.jobs import Submitted
from core.store.vms import FleetRow

log = logging.getLogger("alienec2.engine")

BASELINE_REFRESH_S = 60.0  # the day's average arrival rate is recounted this often
OBSERVER_NICE = 10  # the observer yields the CPU to the event loop that serves agents


@dataclass(frozen=True, slots=True)
class CloudInputs:
    """What a snapshot needs of one cloud from the core's memory and config."""

    name: str
    priority: int
    max_instances: int
    billing_period_s: float
    min_billed_s: float
    fingerprint: str  # what its VMs are launched with now (older ones are outdated)
    placements_reopen_at: float  # when its first placement leaves backoff; 0 while one is open
    launching: bool  # a launch task in flight


@dataclass(frozen=True, slots=True)
class ObserveInputs:
    """One cycle's question: everything but the state file, which the observer reads."""

    now: float
    waiting: int | None  # None: demand unknown; ignored when count_queue
    count_queue: bool  # the built-in queue: its count is read in the snapshot's transaction
    settings: policy.Settings
    arrival_window_s: float
    warm_history_s: float
    boot_time_guess_s: float
    clouds: tuple[CloudInputs, ...]
    heartbeats: dict[str, float]  # received since the core started (a copy of Liveness.seen)
    started_at: float  # the core's start: the origin of the start-up grace
    graced: frozenset[str]  # VMs fresh when the previous core last saved heartbeats
    baseline: tuple[float, float]  # (counted at, jobs per second over warm_history_s)


class PoolReads(NamedTuple):
    """What a snapshot reads from the store, in one read transaction."""

    fleet: list[FleetRow]
    launched_with: dict[str, str | None]  # launch id -> its settings' fingerprint
    pending: dict[str, int]  # cloud -> VMs of launches not yet recorded
    backoff_until: dict[str, float]  # cloud -> its launch backoff
    recent: Submitted  # in the arrival window
    last_minute: Submitted
    baseline: tuple[float, float]
    boot_times: list[float]
    finished: int  # jobs finished in the arrival window
    waiting: int | None


@dataclass(frozen=True, slots=True)
class Observed:
    """One cycle's answer."""

    actions: list[policy.Action]
    decision: policy.Decision
    seen: dict[str, policy.VMView]  # the views of the VMs the actions name, as decided on
    outdated: int  # VMs launched with settings since changed
    baseline: tuple[float, float]
    cpu_s: float  # CPU time the observation took (woken cycles are spaced by it)


def observe_and_decide(store: Store, inputs: ObserveInputs) -> Observed:
    """The snapshot (one read transaction: a launch completed halfway through must not be
    missed, or counted twice) and the policy's decision on it."""
    started = time.thread_time()
    reads = read_pool(store, inputs)
    snapshot = build_snapshot(reads, inputs)
    actions, decision = policy.explain(snapshot, reads.waiting, inputs.now, inputs.settings)
    named = {getattr(action, "vm_id", None) for action in actions}
    return Observed(
        actions=actions,
        decision=decision,
        seen={vm.id: vm for vm in snapshot.vms if vm.id in named},
        outdated=sum(1 for vm in snapshot.vms if vm.outdated),
        baseline=reads.baseline,
        cpu_s=time.thread_time() - started,
    )


def read_pool(store: Store, inputs: ObserveInputs) -> PoolReads:
    """Everything a snapshot needs from the store, in one read transaction."""
    now, window = inputs.now, inputs.arrival_window_s
    with store.one_read():
        return PoolReads(
            fleet=store.fleet(ALIVE_STATES),
            launched_with=store.launch_settings(),
            pending=store.pending_counts(),
            backoff_until={
                cloud.name: store.cloud_status(cloud.name).backoff_until for cloud in inputs.clouds
            },
            recent=store.submitted_since(now - window),
            last_minute=store.submitted_since(now - policy.BURST_WINDOW_S),
            baseline=_baseline(store, inputs),
            boot_times=store.recent_boot_times(),
            finished=store.finished_since(now - window),
            waiting=store.queued_count() if inputs.count_queue else inputs.waiting,
        )


def _baseline(store: Store, inputs: ObserveInputs) -> tuple[float, float]:
    """The ``warm_history_s`` average arrival rate. It moves slowly and counting a day of
    submissions takes milliseconds at 100,000 jobs a day, so it is recounted once a minute."""
    history_s = inputs.warm_history_s
    if not history_s:
        return (inputs.now, 0.0)
    if 0 <= inputs.now - inputs.baseline[0] < BASELINE_REFRESH_S:
        return inputs.baseline
    return (inputs.now, store.submitted_since(inputs.now - history_s).jobs / history_s)


def build_snapshot(reads: PoolReads, inputs: ObserveInputs) -> policy.Snapshot:
    """The snapshot from what was read. The start-up grace applies: no VM's heartbeat or boot
    clock counts from before this core started, so a core that was down (or whose wall clock
    stepped) loses no healthy VM."""
    started, heartbeats, graced = inputs.started_at, inputs.heartbeats, inputs.graced
    launched_with = reads.launched_with
    current = {cloud.name: cloud.fingerprint for cloud in inputs.clouds}
    vms = tuple(
        policy.VMView(
            id=vm_id,
            cloud=cloud,
            state=state,
            launched_at=max(launched_at, started) if vm_id in graced else launched_at,
            idle_since=idle_since,
            last_heartbeat=_with_grace(
                _latest(heartbeats.get(vm_id), last_heartbeat),
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
        ) in reads.fleet
    )
    now, pending = inputs.now, reads.pending
    clouds = tuple(
        policy.CloudView(
            name=cloud.name,
            priority=cloud.priority,
            max_instances=cloud.max_instances,
            backoff_until=max(reads.backoff_until[cloud.name], cloud.placements_reopen_at),
            launch_in_flight=cloud.launching or cloud.name in pending,
            pending=pending.get(cloud.name, 0),
            billing_period_s=cloud.billing_period_s,
            min_billed_s=cloud.min_billed_s,
        )
        for cloud in inputs.clouds
    )
    window = inputs.arrival_window_s
    recent, last_minute = reads.recent, reads.last_minute
    return policy.Snapshot(
        vms=vms,
        clouds=clouds,
        arrival_rate=policy.arrival_rate(
            recent.jobs,
            window,
            last_minute.jobs,
            now - last_minute.first_at if last_minute.first_at is not None else 0.0,
            now - recent.first_at if recent.first_at is not None else 0.0,
            recent_submissions=recent.submissions,
            last_minute_submissions=last_minute.submissions,
        ),
        baseline_rate=reads.baseline[1],
        boot_time_s=policy.boot_time(reads.boot_times, inputs.boot_time_guess_s),
        completion_rate=policy.completion_rate(reads.finished, window),
    )


def _latest(in_memory: float | None, stored: float | None) -> float | None:
    if in_memory is None:
        return stored
    return in_memory if stored is None else max(in_memory, stored)


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


# ---- the observer process ------------------------------------------------------------------


class ObserverLost(Exception):
    """The observer process ended or broke its protocol: this cycle observes in the core."""


class ObserverProcess:
    """A child process that observes one state file: ``python -m core.observe PATH``. It
    reads one pickled ``ObserveInputs`` at a time from its stdin and answers on its stdout.
    Only the core holds the other end of its stdin, so it ends when the core does, however the
    core ends; it ignores the terminal's Ctrl-C, which the core handles.

    One thread of the core talks to it, a question and its answer at a time: a cycle
    cancelled meanwhile leaves the pair whole, and the loop never waits on the pipe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._process: subprocess.Popen[bytes] | None = None  # started by the first question
        self._talker = ThreadPoolExecutor(1, thread_name_prefix="alienec2-observer")

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    async def observe(self, inputs: ObserveInputs) -> Observed:
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(self._talker, self._ask, inputs)
        if isinstance(answer, ObserverFailed):
            raise RuntimeError(f"the observer failed: {answer.error}")
        return answer

    def _ask(self, inputs: ObserveInputs) -> Observed | ObserverFailed:
        process = self._process
        if process is None:
            process = self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, self.path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        assert process.stdin is not None and process.stdout is not None
        try:
            _write_frame(process.stdin, inputs)
            process.stdin.flush()
            answer = _read_frame(process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._process = None
            _end(process)
            raise ObserverLost(f"the observer process ended ({exc!r})") from None
        if not isinstance(answer, (Observed, ObserverFailed)):
            self._process = None
            _end(process)
            raise ObserverLost(f"the observer answered a {type(answer).__name__}")
        return answer

    def close(self) -> None:
        """End the process. It holds nothing but a read-only connection: a kill loses
        nothing, and needs no event loop (engines are closed after theirs stops, in tests)."""
        process = self._process
        if process is not None:
            process.kill()  # ends a question in flight, so the talker is free
        self._talker.shutdown(wait=True)
        if self._process is not None:
            _end(self._process)
            self._process = None


def _end(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):  # a question's bytes still buffered: a broken pipe
                pipe.close()


FRAME_HEADER = 8  # bytes: the pickle's length, big-endian


@dataclass(frozen=True, slots=True)
class ObserverFailed:
    """An exception in the observer process, sent back for the core to log."""

    error: str


def _write_frame(stream: IO[bytes], value: object) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(payload).to_bytes(FRAME_HEADER, "big") + payload)


def _read_frame(stream: IO[bytes]) -> object:
    header = stream.read(FRAME_HEADER)
    if len(header) < FRAME_HEADER:
        raise EOFError("no answer")
    size = int.from_bytes(header, "big")
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("a partial answer")
    return pickle.loads(payload)


def serve(path: str, requests: IO[bytes], answers: IO[bytes]) -> None:
    """The observer process: answer each question until the core closes the pipe."""
    reader: Store | None = None
    try:
        while True:
            try:
                question = _read_frame(requests)
            except EOFError:
                return  # the core closed the pipe, or ended
            try:
                reader = reader or Store.open_reader(path)
                assert isinstance(question, ObserveInputs)
                answer: object = observe_and_decide(reader, question)
            except Exception as exc:
                answer = ObserverFailed(f"{type(exc).__name__}: {exc}")
            _write_frame(answers, answer)
            answers.flush()
    finally:
        if reader is not None:
            reader.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(OBSERVER_NICE)
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    # Through the module's own name, so that what it pickles names core.observe, not __main__.
    from core.observe import main as observe_main

    observe_main()
