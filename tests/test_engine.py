"""The engine against moto's EC2 server over HTTP (boto3 → loopback), with a virtual clock.

VMs "register", "take jobs" and "report" through the same store calls the agent API makes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from core import engine as engine_module
from core import policy
from core.clouds import TAG_CLOUD, TAG_CORE, TAG_LAUNCH, TAG_POOL, Instance, InstanceState
from core.clouds.sandbox import SANDBOX_IMAGE, SANDBOX_REGION, FaultyEndpoint, MotoEC2Server
from core.config import Config
from core.daemon import build_engine
from core.engine import Engine
from core.model import JobState, LaunchState, VMState
from core.service import PoolService
from core.store import JobSpec, Store
from tests.conftest import (
    ManualClock,
    cloud,
    ec2_client,
    instances_in_cloud,
    make_config,
    running_in_cloud,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent


async def step(engine: Engine) -> None:
    """One cycle, then wait for the cloud calls it started."""
    await engine.cycle()
    await engine.settle()


def submit(store: Store, n: int, now: float) -> list[int]:
    return [store.submit_job(["echo", str(i)], now).id for i in range(n)]


def register_all(store: Store, now: float) -> list[str]:
    ids = [vm.id for vm in store.vms([VMState.REQUESTED, VMState.BOOTING])]
    for vm_id in ids:
        store.register_vm(vm_id, now)
    return ids


def heartbeat_all(store: Store, now: float) -> None:
    store.save_heartbeats(
        {vm.id: now for vm in store.vms([VMState.IDLE, VMState.BUSY, VMState.DRAINING])}
    )


def service_of(engine: Engine) -> PoolService:
    """The service the web layer would use over this engine's state."""
    return PoolService(
        engine.config,
        engine.store,
        engine.liveness,
        engine.clock,
        engine.wake.set,
        engine.launch_keys,
    )


def run_all_jobs(store: Store, now: float) -> None:
    for vm in store.vms([VMState.IDLE]):
        job = store.assign_next_job(vm.id, now)
        if job is not None:
            store.finish_job(job.id, job.attempt, vm.id, 0, "ok", now)


@pytest.fixture
def open_store() -> Iterator[Callable[[Config], Store]]:
    """Open a config's store; every store opened is closed afterwards, also on failure."""
    stores: list[Store] = []

    def open_(config: Config) -> Store:
        stores.append(Store(config.state.path))
        return stores[-1]

    yield open_
    for store in stores:
        store.close()


@pytest.fixture
def start_engine(
    clock: ManualClock, open_store: Callable[[Config], Store]
) -> Iterator[Callable[[Config], Awaitable[Engine]]]:
    """Start an engine (store, providers, start-up reconcile) on the test's clock."""
    engines: list[Engine] = []

    async def start(config: Config) -> Engine:
        engines.append(build_engine(config, open_store(config), clock))
        await engines[-1].start()
        return engines[-1]

    yield start
    for engine in engines:
        engine.close()  # its observer thread and read-only connection


@pytest.fixture
def second_endpoint(moto: MotoEC2Server) -> Iterator[FaultyEndpoint]:
    with FaultyEndpoint(moto.url) as endpoint:
        yield endpoint


async def test_queue_of_50_jobs_scales_to_max_in_one_run_instances_call_per_cloud(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    faulty: FaultyEndpoint,
    second_endpoint: FaultyEndpoint,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    clouds = [
        cloud("first", faulty.url, priority=1, max_instances=12),
        cloud("second", second_endpoint.url, priority=2, max_instances=50),
    ]
    config = make_config(tmp_path, clouds, pool={"max_vms": 20})
    engine = await start_engine(config)
    store = engine.store
    submit(store, 50, clock())

    await step(engine)

    assert faulty.calls["RunInstances"] == 1
    assert second_endpoint.calls["RunInstances"] == 1
    by_cloud = {"first": 0, "second": 0}
    for vm in store.vms():
        by_cloud[vm.cloud] += 1
    assert by_cloud == {"first": 12, "second": 8}
    assert set(instances_in_cloud(moto.url)) == {vm.id for vm in store.vms()}

    clock.advance(1)
    await step(engine)  # at max: describes the new instances, launches nothing more
    assert faulty.calls["RunInstances"] + second_endpoint.calls["RunInstances"] == 2
    assert {vm.state for vm in store.vms()} == {VMState.BOOTING}
    assert len(store.vms()) == 20


async def test_idle_vms_are_reaped_down_to_min_after_the_idle_timer(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(
        tmp_path,
        [cloud("only", moto.url)],
        pool={"min_vms": 2, "max_vms": 10, "idle_timeout_s": 600},
    )
    engine = await start_engine(config)
    store = engine.store
    submit(store, 8, clock())
    await step(engine)
    assert len(running_in_cloud(moto.url)) == 8

    clock.advance(30)
    register_all(store, clock())
    run_all_jobs(store, clock())
    assert store.job_counts()[JobState.DONE] == 8

    clock.advance(599)
    heartbeat_all(store, clock())
    await step(engine)
    assert len(running_in_cloud(moto.url)) == 8, "nothing is reaped before the idle timer"

    clock.advance(2)
    heartbeat_all(store, clock())
    await step(engine)
    assert len(running_in_cloud(moto.url)) == 2
    live = store.vms([VMState.IDLE])
    assert {vm.id for vm in live} == running_in_cloud(moto.url)
    assert len(store.vms([VMState.TERMINATED])) == 6


async def test_a_vm_that_changes_while_the_decision_is_made_off_the_loop_is_left_to_the_next_cycle(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    """The fleet's snapshot is read on another thread: an idle VM that takes a job, or a lost
    VM that sends a heartbeat, in the meantime is not terminated on the stale view."""
    config = make_config(
        tmp_path,
        [cloud("only", moto.url)],
        pool={"min_vms": 0, "max_vms": 10, "idle_timeout_s": 600, "heartbeat_timeout_s": 300},
    )
    engine = await start_engine(config)
    store = engine.store
    submit(store, 3, clock())
    await step(engine)
    clock.advance(30)
    taker, returner, idle = register_all(store, clock())
    run_all_jobs(store, clock())
    heartbeat_all(store, clock())
    clock.advance(601)  # all three idle past the timer; nothing heard for 601 s
    for vm_id in (taker, idle):
        engine.liveness.heartbeat(vm_id, clock())
    decided = engine._still_as_seen
    job = 0

    def in_between(*args: Any) -> Any:
        # What agents do after the snapshot was read and before the engine acts on it.
        nonlocal job
        [job] = submit(store, 1, clock())
        assert store.assign_next_job(taker, clock()) is not None
        engine.liveness.heartbeat(returner, clock())
        return decided(*args)

    engine._still_as_seen = in_between  # type: ignore[method-assign]
    actions = await engine.cycle()
    await engine.settle()
    assert [(type(a).__name__, getattr(a, "vm_id", None)) for a in actions] == [("Terminate", idle)]
    assert store.vm(taker).state == VMState.BUSY
    assert store.job(job).vm_id == taker and store.job(job).attempt == 1
    assert store.vm(returner).state == VMState.IDLE  # was lost to the snapshot, not now
    assert store.vm(idle).state == VMState.TERMINATED


async def test_a_vm_the_cloud_reports_running_while_the_decision_is_made_still_fails_its_boot(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    """The cycle's describe of a requested VM may land while the snapshot is read: requested
    -> booting is no change to a boot timeout, which is carried out in that cycle."""
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1, "boot_timeout_s": 300}
    )
    engine = await start_engine(config)
    store = engine.store
    await step(engine)
    [first] = store.vms([VMState.REQUESTED])
    clock.advance(301)
    decided = engine._still_as_seen

    def described_meanwhile(*args: Any) -> Any:
        store.vm_running(first.id, None, clock())  # what the cycle's describe applies
        return decided(*args)

    engine._still_as_seen = described_meanwhile  # type: ignore[method-assign]
    await step(engine)
    assert store.vm(first.id).state == VMState.TERMINATED
    replacement = running_in_cloud(moto.url)
    assert len(replacement) == 1 and first.id not in replacement


async def one_vm(engine: Engine, clock: ManualClock, busy: bool) -> tuple[str, int]:
    """One registered VM, and the job it was launched for (held if ``busy``, else done)."""
    [job] = submit(engine.store, 1, clock())
    await step(engine)
    clock.advance(30)
    [vm_id] = register_all(engine.store, clock())
    assert engine.store.assign_next_job(vm_id, clock()) is not None
    if not busy:
        engine.store.finish_job(job, 1, vm_id, 0, "ok", clock())
    heartbeat_all(engine.store, clock())
    return vm_id, job


async def test_a_lost_vm_heard_from_while_the_decision_is_made_is_kept_and_not_replaced(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(
        tmp_path, [cloud("only", moto.url)], pool={"min_vms": 1, "heartbeat_timeout_s": 300}
    )
    engine = await start_engine(config)
    vm_id, _ = await one_vm(engine, clock, busy=False)
    clock.advance(301)  # silent past the timeout: lost, and min_vms wants a replacement
    decided = engine._still_as_seen

    def heard_meanwhile(*args: Any) -> Any:
        engine.liveness.heartbeat(vm_id, clock())
        return decided(*args)

    engine._still_as_seen = heard_meanwhile  # type: ignore[method-assign]
    assert await engine.cycle() == []  # neither lost nor replaced
    await engine.settle()
    assert engine.store.vm(vm_id).state == VMState.IDLE
    assert len(running_in_cloud(moto.url)) == 1


async def test_a_large_cloud_answer_is_applied_a_batch_at_a_time_between_agents_requests(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "APPLY_BATCH", 2)
    engine = await start_engine(make_config(tmp_path, [cloud("only", moto.url)]))
    submit(engine.store, 5, clock())
    await engine.cycle()  # five VMs requested; their launch is still in flight
    await engine.settle()
    ids = [vm.id for vm in engine.store.vms([VMState.REQUESTED])]
    assert len(ids) == 5
    order: list[str] = []
    engine.store.listeners.append(lambda kinds: order.extend(kinds))

    async def other_work() -> None:
        for _ in range(3):
            order.append("turn")
            await asyncio.sleep(0)

    running = [Instance(vm_id, InstanceState.RUNNING, "10.0.0.9") for vm_id in ids]
    await asyncio.gather(engine._apply_instance_states(running, clock()), other_work())
    booted = "vm_booting"
    assert order[:6] == [booted, booted, "turn", booted, booted, "turn"]  # two, then the loop
    assert {vm.state for vm in engine.store.vms([VMState.BOOTING])} == {VMState.BOOTING}
    assert len(engine.store.vms([VMState.BOOTING])) == 5
    before = engine.store.last_seq()
    await engine._apply_instance_states(running, clock())  # nothing changed: nothing written
    assert engine.store.last_seq() == before


async def test_the_queue_is_counted_in_the_snapshots_read_so_a_job_taken_meanwhile_launches_nothing(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    engine = await start_engine(make_config(tmp_path, [cloud("only", moto.url)]))
    vm_id, _ = await one_vm(engine, clock, busy=False)
    submit(engine.store, 1, clock())  # one job waiting, one idle VM for it
    read = engine._read_pool

    def taken_first(*args: Any) -> Any:
        # The VM's agent takes the job just as the engine starts to read.
        assert engine.store.assign_next_job(vm_id, clock()) is not None
        return read(*args)

    engine._read_pool = taken_first  # type: ignore[method-assign]
    actions = await engine.cycle()
    assert not [a for a in actions if isinstance(a, policy.Launch)]
    assert engine.decisions[-1].waiting == 0


async def test_woken_cycles_are_spaced_by_what_observing_the_fleet_costs(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    """Every submission wakes the engine and each cycle reads the whole fleet: at 10,000 VMs
    a cycle a second took a quarter of the core. The gap grows with the cost measured."""
    engine = await start_engine(make_config(tmp_path, [cloud("only", moto.url)]))
    build = engine._build_snapshot

    def costly(*args: Any) -> Any:
        started = time.thread_time()
        while time.thread_time() - started < 0.1:  # a large fleet's views, in CPU time
            pass
        return build(*args)

    engine._build_snapshot = costly  # type: ignore[method-assign]
    await engine.cycle()
    assert engine.observe_cpu_s >= 0.1
    assert engine_module.wake_gap(engine.observe_cpu_s) >= 2.0
    assert engine_module.wake_gap(0.001) == engine_module.WAKE_GAP_S  # a small fleet: 1 s


def test_a_pacer_keeps_its_thread_to_its_share_of_the_wall_time() -> None:
    """At duty 1/4 a chunk that ran 10 ms (10 ms of CPU) is followed by 30 ms asleep, the
    GIL free for the event loop; wall time already spent waiting counts toward the pause, and
    the sleep's own CPU time is not counted as work."""
    cpu, wall = [0.0], [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        wall[0] += seconds
        cpu[0] += 0.001  # waking up costs a little CPU, which is not the work's

    pacer = engine_module.Pacer(0.25, cpu=lambda: cpu[0], wall=lambda: wall[0], sleep=sleep)
    cpu[0] += 0.010
    wall[0] += 0.010
    pacer()
    cpu[0] += 0.002
    wall[0] += 0.020  # most of it waiting for the GIL: 8 ms would be the chunk's share
    pacer()
    pacer()  # nothing done since: no pause
    assert slept == pytest.approx([0.030])
    assert pacer.slept_s == pytest.approx(0.030)
    with pytest.raises(ValueError, match="duty"):
        engine_module.Pacer(0.0)


async def test_the_observer_thread_pauses_between_chunks_of_the_fleet_outside_its_read(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the observer thread holds the GIL the event loop serves no agent: it pauses
    after reading the store and after every PACE_ROWS VMs viewed. Its pacer is made on its
    own thread (CPU time is per thread), and no pause holds the read transaction open."""
    engine = await start_engine(make_config(tmp_path, [cloud("only", moto.url)]))
    store = engine.store
    with store.transaction():
        store.add_launch("L", "only", 25, "token", clock())
        store.complete_launch("L", [(f"i-{n:017x}", "10.0.0.1") for n in range(25)], clock())
    register_all(store, clock())
    heartbeat_all(store, clock())
    monkeypatch.setattr(engine_module, "PACE_ROWS", 10)
    made_on: list[str] = []
    paced: list[tuple[str, bool]] = []

    class RecordingPacer(engine_module.Pacer):
        def __init__(self, duty: float) -> None:
            assert duty == engine_module.OBSERVER_DUTY
            made_on.append(threading.current_thread().name)
            super().__init__(duty)

        def __call__(self) -> None:
            assert engine._reader is not None
            paced.append((threading.current_thread().name, engine._reader._db.in_transaction))
            super().__call__()

    monkeypatch.setattr(engine_module, "Pacer", RecordingPacer)
    await engine.cycle()
    # The store read, then three chunks of at most 10 VMs.
    assert len(paced) == 4
    assert len(made_on) == 1
    assert made_on[0] != threading.main_thread().name
    assert paced == [(made_on[0], False)] * 4
    assert engine.decisions[-1].idle == 25


async def test_the_snapshot_is_one_commit_so_a_job_ended_and_another_added_meanwhile_launch_nothing(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    engine = await start_engine(make_config(tmp_path, [cloud("only", moto.url)]))
    vm_id, job = await one_vm(engine, clock, busy=True)
    reader = engine.store.reader()
    assert reader is not None
    engine._reader = reader
    count = reader.queued_count

    def after_the_fleet_was_read() -> int:
        # Between the snapshot's reads: the busy VM's job ends and another arrives. Read as
        # one commit, the VM is busy and nothing waits (or idle with one waiting): no launch.
        engine.store.finish_job(job, 1, vm_id, 0, "ok", clock())
        submit(engine.store, 1, clock())
        return count()

    reader.queued_count = after_the_fleet_was_read  # type: ignore[method-assign]
    actions = await engine.cycle()
    assert not [a for a in actions if isinstance(a, policy.Launch)]


async def test_a_burst_onset_launches_warm_vms_for_the_arrivals_expected_during_a_boot(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    pool = {
        "max_vms": 100,
        "max_launch_per_cycle": 100,
        "adaptive_warm": True,
        "warm_margin": 0,
        "boot_time_guess_s": 100,
        "cycle_interval_s": 20,
        "warm_history_s": 3600,
    }
    config = make_config(tmp_path, [cloud("only", moto.url)], pool=pool)
    engine = await start_engine(config)
    store = engine.store
    for job_id in submit(store, 36, clock()):  # an hour ago: in the history, not the window
        store.cancel_job(job_id, clock())
    clock.advance(3600 - 20)
    for _ in range(11):  # a burst: 11 jobs over 20 s, one every 2 s
        submit(store, 1, clock())
        clock.advance(2)

    snapshot = engine.snapshot(clock())
    assert snapshot.arrival_rate == pytest.approx(10 / 22)
    assert snapshot.baseline_rate == pytest.approx(11 / 3600)
    assert snapshot.boot_time_s == 100

    await step(engine)
    # 11 waiting jobs + the arrivals expected in a boot and a cycle: 10/22 jobs/s x 120 s
    assert len(running_in_cloud(moto.url)) == 11 + 55

    submit(store, 36, clock())  # the day's average is recounted once a minute, not per cycle
    assert engine.snapshot(clock()).baseline_rate == pytest.approx(11 / 3600)
    clock.advance(60)
    assert engine.snapshot(clock()).baseline_rate == pytest.approx(47 / 3600)


async def test_one_batch_of_jobs_on_an_empty_pool_launches_one_vm_per_job_and_no_more(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    """``alienec2 submit`` of four jobs is one arrival: its jobs wait already, and one
    submission is no evidence of a rate (read as four arrivals in an instant it launched 33
    warm VMs more)."""
    pool = {"adaptive_warm": True, "max_vms": 50, "max_launch_per_cycle": 50}
    engine = await start_engine(make_config(tmp_path, [cloud("only", moto.url)], pool=pool))
    engine.store.submit_jobs([JobSpec(["echo", str(n)], {}, None, 3) for n in range(4)], clock())

    snapshot = engine.snapshot(clock())
    assert snapshot.arrival_rate == 0
    await step(engine)
    assert len(running_in_cloud(moto.url)) == 4


async def test_a_burst_that_began_within_the_arrival_window_is_measured_since_its_first_job(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(tmp_path, [cloud("only", moto.url)], pool={"arrival_window_s": 600})
    engine = await start_engine(config)
    for _ in range(60):  # five minutes at 0.2 jobs/s: the last minute is no surprise
        submit(engine.store, 1, clock())
        clock.advance(5)

    # Over its own 300 s, not diluted by the quiet half of the 600 s window (60 / 600).
    assert engine.snapshot(clock()).arrival_rate == pytest.approx(59 / 300)


async def test_second_cloud_is_used_when_the_first_has_no_capacity(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    faulty: FaultyEndpoint,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    faulty.capacity_error = True
    clouds = [
        cloud("scarce", faulty.url, priority=1, backoff_initial_s=60),
        cloud("spare", moto.url, priority=2),
    ]
    config = make_config(tmp_path, clouds)
    engine = await start_engine(config)
    store = engine.store
    submit(store, 3, clock())

    await step(engine)
    status = store.cloud_status("scarce")
    assert status.backoff_until == clock() + 60
    assert "InsufficientInstanceCapacity" in (status.last_error or "")
    backoff = [e for e in store.events_after(0) if e.kind == "cloud_backoff"]
    assert backoff and backoff[0].message.startswith("capacity: InsufficientInstanceCapacity")

    clock.advance(1)
    await step(engine)
    assert {vm.cloud for vm in store.vms()} == {"spare"}
    assert len(store.vms()) == 3

    # After the backoff the preferred cloud is tried again, and its success clears the backoff.
    faulty.capacity_error = False
    clock.advance(120)
    submit(store, 2, clock())
    await step(engine)
    assert sorted(vm.cloud for vm in store.vms()) == ["scarce", "scarce", "spare", "spare", "spare"]
    assert store.cloud_status("scarce").backoff_level == 0


def write_config(tmp_path: Path, config: Config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def start_core(config_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "core.cli", "core", "--config", str(config_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_core_killed_mid_launch_restarts_without_duplicates_and_adopts_every_instance(
    tmp_path: Path,
    moto: MotoEC2Server,
    faulty: FaultyEndpoint,
    open_store: Callable[[Config], Store],
) -> None:
    faulty.hold_run_instances = True
    config = make_config(tmp_path, [cloud("c", faulty.url)], pool={"min_vms": 3, "max_vms": 5})
    core = start_core(write_config(tmp_path, config))
    try:
        forwarded = await asyncio.to_thread(faulty.run_instances_forwarded.wait, 30)
        assert forwarded, "the core never called RunInstances"
        # The cloud has launched; the core has not heard back. Kill it now.
        os.kill(core.pid, signal.SIGKILL)
        core.wait(timeout=10)
    finally:
        if core.poll() is None:
            core.kill()
        faulty.release.set()
    launched = running_in_cloud(moto.url)
    assert len(launched) == 3

    store = open_store(config)
    [pending] = store.pending_launches()
    assert pending.count == 3
    engine = build_engine(config, store, ManualClock(time.time()))
    await engine.start()

    assert faulty.calls["RunInstances"] == 1, "the restarted core launched again"
    assert store.launch(pending.id).state == LaunchState.DONE
    assert {vm.id for vm in store.vms()} == launched
    assert running_in_cloud(moto.url) == launched

    await step(engine)  # min_vms is met by the adopted instances
    assert faulty.calls["RunInstances"] == 1
    assert running_in_cloud(moto.url) == launched


async def test_intent_written_before_a_crash_is_launched_exactly_once_with_its_token(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    faulty: FaultyEndpoint,
    open_store: Callable[[Config], Store],
) -> None:
    config = make_config(tmp_path, [cloud("c", faulty.url)])
    store = open_store(config)
    store.add_launch("deadbeef00000001", "c", 2, "alienec2-deadbeef00000001", clock())

    engine = build_engine(config, store, clock)
    await engine.start()
    again = build_engine(config, store, clock)
    await again.start()

    assert faulty.calls["RunInstances"] == 1
    assert len(running_in_cloud(moto.url)) == 2
    tags = ec2_client(moto.url).describe_tags(Filters=[{"Name": "key", "Values": [TAG_LAUNCH]}])[
        "Tags"
    ]
    assert {t["Value"] for t in tags} == {"deadbeef00000001"}
    assert store.launch("deadbeef00000001").state == LaunchState.DONE


async def test_reconcile_adopts_tagged_strays_and_retires_vanished_vms_requeueing_jobs(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"max_vms": 5})
    engine = await start_engine(config)
    store = engine.store
    [job] = submit(store, 1, clock())
    await step(engine)
    [vm] = store.vms()
    store.register_vm(vm.id, clock())
    store.assign_next_job(vm.id, clock())

    ec2 = ec2_client(moto.url)
    ec2.terminate_instances(InstanceIds=[vm.id])  # behind the core's back

    def tagged(cloud_name: str) -> str:
        tags = [
            {"Key": TAG_POOL, "Value": "default"},
            {"Key": TAG_CORE, "Value": "test-core"},
            {"Key": TAG_LAUNCH, "Value": "from-an-older-store"},
            {"Key": TAG_CLOUD, "Value": cloud_name},
        ]
        return ec2.run_instances(
            ImageId=SANDBOX_IMAGE,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]["InstanceId"]

    stray = tagged("c")
    tagged("another-cloud")  # the same endpoint, another configured cloud: not this one's
    ec2.run_instances(ImageId=SANDBOX_IMAGE, MinCount=1, MaxCount=1)  # not ours: ignored

    clock.advance(300)
    restarted = build_engine(config, store, clock)
    await restarted.start()

    assert store.vm(vm.id).state == VMState.TERMINATED
    assert store.job(job).state == JobState.QUEUED
    assert store.job(job).attempt == 2
    adopted = store.vm(stray)
    assert (adopted.state, adopted.launch_id) == (VMState.BOOTING, "from-an-older-store")
    assert len(store.vms()) == 2


async def test_an_instance_launched_before_the_cloud_tag_is_kept_by_its_launch_records_cloud(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1})
    engine = await start_engine(config)
    await step(engine)
    [vm] = engine.store.vms()
    ec2_client(moto.url).delete_tags(Resources=[vm.id], Tags=[{"Key": TAG_CLOUD}])
    clock.advance(600)
    await engine._reconcile("c")
    assert engine.store.vm(vm.id).state != VMState.TERMINATED
    assert vm.id in running_in_cloud(moto.url)


async def test_vm_that_never_registers_is_failed_terminated_and_replaced(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1, "boot_timeout_s": 300}
    )
    engine = await start_engine(config)
    store = engine.store
    await step(engine)
    [first] = store.vms()

    clock.advance(301)
    await step(engine)

    assert store.vm(first.id).state == VMState.TERMINATED
    assert instances_in_cloud(moto.url)[first.id] in ("shutting-down", "terminated")
    assert any(e.kind == "vm_failed" and e.vm_id == first.id for e in store.events_after(0))
    replacement = running_in_cloud(moto.url)
    assert len(replacement) == 1 and first.id not in replacement
    assert store.cloud_status("c").boot_failures == 1


async def test_repeated_boot_failures_put_the_cloud_in_backoff(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(
        tmp_path,
        [cloud("c", moto.url, boot_failures_before_backoff=2, backoff_initial_s=500)],
        pool={"min_vms": 2, "boot_timeout_s": 100},
    )
    engine = await start_engine(config)
    store = engine.store
    await step(engine)
    clock.advance(101)
    await step(engine)
    assert store.cloud_status("c").backoff_until == clock() + 500
    assert len(running_in_cloud(moto.url)) == 0, "no replacement while the cloud is backed off"


async def test_silent_vm_is_lost_its_job_requeued_and_the_vm_terminated(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"heartbeat_timeout_s": 120})
    engine = await start_engine(config)
    store = engine.store
    [job] = submit(store, 1, clock())
    await step(engine)
    [vm] = register_all(store, clock())
    store.assign_next_job(vm, clock())
    store.start_job(job, 1, vm, clock())

    clock.advance(60)
    store.save_heartbeats({vm: clock()})
    clock.advance(119)
    await step(engine)
    assert store.vm(vm).state == VMState.BUSY

    clock.advance(2)
    await engine.cycle()
    assert store.job(job).state == JobState.QUEUED  # requeued before any cloud call
    await engine.settle()
    assert store.vm(vm).state == VMState.TERMINATED
    assert instances_in_cloud(moto.url)[vm] in ("shutting-down", "terminated")
    assert store.job(job).attempt == 2


async def test_kill_terminates_now_and_requeues_while_drain_waits_for_the_job(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)])
    engine = await start_engine(config)
    store = engine.store
    jobs = submit(store, 2, clock())
    await step(engine)
    killed, drained = register_all(store, clock())
    kill_job = store.assign_next_job(killed, clock())
    drain_job = store.assign_next_job(drained, clock())
    assert kill_job and drain_job
    service_of(engine).pause(True)  # kill and drain are honoured while scaling is paused

    store.request_kill(killed, clock())
    store.drain_vm(drained, clock())
    await step(engine)
    assert store.vm(killed).state == VMState.TERMINATED
    assert store.job(kill_job.id).state == JobState.QUEUED
    assert store.vm(drained).state == VMState.DRAINING
    assert drained in running_in_cloud(moto.url)

    store.finish_job(drain_job.id, 1, drained, 0, "done", clock())
    await step(engine)
    assert store.vm(drained).state == VMState.TERMINATED
    assert running_in_cloud(moto.url) == set()
    assert store.job(jobs[1]).state == JobState.DONE


async def test_unreadable_demand_records_an_event_and_changes_no_scaling(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    start_engine: Callable[[Config], Awaitable[Engine]],
) -> None:
    queue = {"kind": "command", "command": ["sh", "-c", "echo not-a-number"]}
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 2}, queue=queue)
    engine = await start_engine(config)
    store = engine.store
    await step(engine)
    assert store.vms() == []
    [event] = [e for e in store.events_after(0) if e.kind == "demand_error"]
    assert "printed 'not-a-number'" in event.message
    assert "no scaling change" in event.message


async def test_resize_is_validated_durable_and_applied(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, open_store: Callable[[Config], Store]
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)])
    store = open_store(config)
    engine = build_engine(config, store, clock)
    with pytest.raises(ValueError, match="max must be >= min"):
        service_of(engine).resize(min_vms=4, max_vms=3)
    service_of(engine).resize(min_vms=3, max_vms=4)
    restarted = build_engine(config, store, clock)
    assert (restarted.settings().min_vms, restarted.settings().max_vms) == (3, 4)
    await restarted.start()
    await step(restarted)
    assert len(running_in_cloud(moto.url)) == 3


def test_sigterm_stops_the_core_with_exit_0_and_leaves_instances_running(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 2})
    core = start_core(write_config(tmp_path, config))
    try:

        def launched_min() -> bool:
            assert core.poll() is None, core.stdout.read() if core.stdout else ""
            return len(running_in_cloud(moto.url)) >= 2

        wait_until(launched_min, 30, "min_vms launched")
        core.send_signal(signal.SIGTERM)
        assert core.wait(timeout=10) == 0
    finally:
        if core.poll() is None:
            core.kill()
    assert len(running_in_cloud(moto.url)) == 2
    output = core.stdout.read() if core.stdout else ""
    assert "event=engine_stopped" in output


def test_credentials_never_reach_user_data_or_logs(
    tmp_path: Path, moto: MotoEC2Server, open_store: Callable[[Config], Store]
) -> None:
    secret = "s3cr3t-ACCESS-KEY-do-not-leak"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": secret,
        "AWS_SECRET_ACCESS_KEY": secret,
        "ALIENEC2_ADMIN_TOKEN": secret,  # the admin token's default variable
    }
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1})
    core = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "core", "--config", str(write_config(tmp_path, config))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: running_in_cloud(moto.url), 30, "a launched VM")
        core.send_signal(signal.SIGTERM)
        core.wait(timeout=10)
    finally:
        if core.poll() is None:
            core.kill()
    [vm_id] = running_in_cloud(moto.url)
    user_data = boto3.client(
        "ec2", endpoint_url=moto.url, region_name=SANDBOX_REGION
    ).describe_instance_attribute(InstanceId=vm_id, Attribute="userData")["UserData"]["Value"]
    decoded = base64.b64decode(user_data).decode()
    assert decoded.startswith("#cloud-config")
    assert secret not in decoded
    assert secret not in (core.stdout.read() if core.stdout else "")
    store = open_store(config)
    assert all(secret not in e.message for e in store.events_after(0))


async def test_bounds_past_what_the_clouds_allow_are_kept_with_a_warning_naming_the_limit(
    tmp_path: Path, moto: MotoEC2Server, start_engine: Callable[[Config], Awaitable[Engine]]
) -> None:
    """A reload may raise the clouds' limits, so the bounds are kept; the admin learns that
    the pool stops at the clouds' max_instances together."""
    clouds = [
        {**cloud("a", moto.url), "max_instances": 3},
        {**cloud("b", moto.url), "max_instances": 4},
    ]
    service = service_of(await start_engine(make_config(tmp_path, clouds)))
    assert service.resize(8, 9) == (8, 9)
    limits = "the clouds' max_instances allow 7 VMs together"
    assert service.bound_warnings(8, 9) == [
        f"min_vms 8 cannot be kept: {limits}",
        f"max_vms 9 will not be reached: {limits}",
    ]
    assert service.bound_warnings(0, 7) == []
