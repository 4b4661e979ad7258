"""Production happens: downtime, clock steps, lost cloud answers, broken state, upgrades.

The engine runs against moto over HTTP (through the fault-injecting endpoint where a fault is
needed) on a virtual clock; the state tests open real files.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core import userdata
from core.clock import CoreClock
from core.clouds.sandbox import FaultyEndpoint, MotoEC2Server
from core.config import Config
from core.daemon import Core, build_engine
from core.engine import Engine
from core.liveness import Liveness
from core.lock import StateLock
from core.model import EventKind, JobState, VMState
from core.service import PoolService
from core.store import SCHEMA_VERSION, JobSpec, StateError, Store
from core.systemd import Notifier
from tests.conftest import (
    ManualClock,
    cloud,
    core_config,
    instances_in_cloud,
    make_config,
    running_in_cloud,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


async def step(engine: Engine) -> None:
    await engine.cycle()
    await engine.settle()


def register_all(store: Store, now: float) -> list[str]:
    ids = [vm.id for vm in store.vms([VMState.REQUESTED, VMState.BOOTING])]
    for vm_id in ids:
        store.register_vm(vm_id, now)
    return ids


@pytest.fixture
def stores() -> Iterator[Callable[[Config], Store]]:
    opened: list[Store] = []

    def open_(config: Config) -> Store:
        opened.append(Store(config.state.path))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


# ---- start-up grace and time ------------------------------------------------------------


async def test_a_core_down_for_twice_the_heartbeat_timeout_loses_no_vm_and_finishes_the_job_once(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 2, "heartbeat_timeout_s": 300}
    )
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    await step(engine)
    first, second = register_all(store, clock())
    job = store.submit_job(["sleep", "1000"], clock())
    store.assign_next_job(first, clock())
    store.start_job(job.id, 1, first, clock())

    clock.advance(2 * 300)  # the core is down; the agents keep working
    restarted = build_engine(config, store, clock)
    await restarted.start()
    await step(restarted)
    assert {store.vm(v).state for v in (first, second)} == {VMState.BUSY, VMState.IDLE}
    assert store.job(job.id).state == JobState.RUNNING
    assert running_in_cloud(moto.url) == {first, second}

    clock.advance(301)
    restarted.liveness.heartbeat(first, clock())  # only the busy VM's agent came back
    await step(restarted)
    done = store.finish_job(job.id, 1, first, 0, "ok", clock())
    assert done is not None and (done.state, done.attempt) == (JobState.DONE, 1)
    assert [e.kind for e in store.events_after(0) if e.job_id == job.id].count("job_done") == 1
    # A dead VM is still found: one full timeout after the start, without a heartbeat.
    assert store.vm(second).state in (VMState.TERMINATING, VMState.TERMINATED)
    assert store.vm(first).state == VMState.IDLE


class SteppingWall:
    """A wall clock an operator (or NTP) can step; the monotonic clock is separate."""

    def __init__(self, start: float) -> None:
        self.wall = start
        self.mono = 1000.0

    def step(self, seconds: float) -> None:
        self.wall += seconds

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.mark.parametrize("step_s", [600.0, -600.0])
async def test_a_wall_clock_step_neither_loses_a_healthy_vm_nor_hides_a_dead_one(
    tmp_path: Path, moto: MotoEC2Server, stores: Callable[[Config], Store], step_s: float
) -> None:
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 2, "heartbeat_timeout_s": 120}
    )
    time_source = SteppingWall(1_800_000_000.0)
    clock = CoreClock(wall=lambda: time_source.wall, monotonic=lambda: time_source.mono)
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    await step(engine)
    healthy, dead = register_all(store, clock())

    for _ in range(4):  # 4 times 40 s: the healthy agent beats, the dead one never does
        time_source.advance(40)
        if _ == 1:
            time_source.step(step_s)
        engine.liveness.heartbeat(healthy, clock())
        await step(engine)
        if store.vm(dead).state == VMState.IDLE:
            assert clock() - (store.vm(dead).last_heartbeat or 0) <= 120
    assert store.vm(healthy).state == VMState.IDLE
    assert store.vm(dead).state in (VMState.TERMINATING, VMState.TERMINATED)
    [lost] = [e for e in store.events_after(0) if e.kind == EventKind.VM_LOST]
    assert lost.vm_id == dead
    assert "no heartbeat for 160s" in lost.message  # counted on the monotonic clock


# ---- the cloud's answers ------------------------------------------------------------------


async def test_a_lost_run_instances_answer_is_resolved_by_tag_and_nothing_is_sent_twice(
    tmp_path: Path,
    moto: MotoEC2Server,
    faulty: FaultyEndpoint,
    clock: ManualClock,
    stores: Callable[[Config], Store],
) -> None:
    config = make_config(
        tmp_path,
        [cloud("c", faulty.url, max_attempts=5, backoff_initial_s=30)],
        pool={"min_vms": 3, "max_vms": 3},
    )
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    faulty.drop_run_instances_answer = True
    await step(engine)
    assert faulty.calls["RunInstances"] == 1  # the SDK did not resend it
    [pending] = store.pending_launches()
    faulty.drop_run_instances_answer = False

    await engine._reconcile("c")  # the slow reconcile runs meanwhile and adopts them
    await step(engine)  # pending and adopted instances are counted once: nothing to do
    assert faulty.calls["RunInstances"] == 1
    assert [vm.state for vm in store.vms()].count(VMState.TERMINATING) == 0

    clock.advance(31)  # the backoff ends: the launch is resolved by its tag
    await step(engine)
    assert faulty.calls["RunInstances"] == 1
    assert store.launch(pending.id).state.value == "done"
    states = instances_in_cloud(moto.url)
    assert len(states) == 3 and set(states.values()) == {"running"}
    assert {vm.id for vm in store.vms()} == set(states)


async def test_describe_and_terminate_failures_back_off_per_cloud(
    tmp_path: Path,
    moto: MotoEC2Server,
    faulty: FaultyEndpoint,
    clock: ManualClock,
    stores: Callable[[Config], Store],
) -> None:
    config = make_config(
        tmp_path,
        [cloud("c", faulty.url, call_backoff_initial_s=20, backoff_max_s=60)],
        pool={"min_vms": 1},
    )
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    faulty.failing_actions = {"DescribeInstances", "TerminateInstances"}
    await step(engine)  # launches; the next cycle describes the requested VM and fails
    await step(engine)
    calls = faulty.calls["DescribeInstances"]
    for _ in range(5):
        clock.advance(1)
        await step(engine)
    assert faulty.calls["DescribeInstances"] == calls  # backed off, not retried every cycle
    [failed] = [e for e in store.events_after(0) if e.kind == EventKind.DESCRIBE_FAILED]
    assert "retrying in 20s" in failed.message
    faulty.failing_actions = set()
    clock.advance(20)
    await step(engine)
    assert faulty.calls["DescribeInstances"] == calls + 1
    [vm] = store.vms()
    assert vm.state == VMState.BOOTING


async def test_a_launch_whose_user_data_cannot_be_rendered_fails_visibly_and_the_next_proceeds(
    tmp_path: Path,
    moto: MotoEC2Server,
    clock: ManualClock,
    stores: Callable[[Config], Store],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1})
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    render = userdata.render

    def broken(*args: object) -> str:
        raise ValueError("user data is 17000 bytes, EC2 allows 16384")

    monkeypatch.setattr(userdata, "render", broken)  # fault injection: a template gone wrong
    await step(engine)
    [failed] = [e for e in store.events_after(0) if e.kind == EventKind.LAUNCH_FAILED]
    assert "user data is 17000 bytes" in failed.message
    assert store.pending_launches() == []
    monkeypatch.setattr(userdata, "render", render)
    await step(engine)
    assert len(running_in_cloud(moto.url)) == 1


# ---- the state file ------------------------------------------------------------------------


async def test_a_second_core_on_the_same_state_exits_naming_the_holder_and_keeps_its_socket(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    first = Core(core_config(tmp_path, moto.url))
    await first.start()
    try:
        other = core_config(tmp_path, moto.url, admin={"socket": str(tmp_path / "other.sock")})
        second = Core(other)
        with pytest.raises(StateError, match=f"another core \\(pid {os.getpid()}\\)"):
            await second.start()
        assert first.admin_socket.exists()
    finally:
        await first.stop()
    assert not first.admin_socket.exists()


def test_state_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "s.db"
    store = Store(path)
    store.submit_job(["x"], 1.0)
    lock = StateLock(path)
    lock.acquire()
    try:
        assert path.parent.stat().st_mode & 0o777 == 0o700
        for file in (path, Path(f"{path}-wal"), lock.path):
            assert file.stat().st_mode & 0o777 == 0o600, file
    finally:
        lock.release()
        store.close()


def _schema_of(commit_file: str) -> str:
    return (DATA / commit_file).read_text()


@pytest.mark.parametrize("schema", ["schema_v1.sql", "schema_v2.sql", "schema_v4.sql"])
def test_a_state_file_of_every_earlier_schema_is_migrated_and_used(
    tmp_path: Path, schema: str
) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(_schema_of(schema))
    old.execute(
        "INSERT INTO jobs(command, env, state, attempt, max_attempts, submitted_at) "
        "VALUES ('[\"echo\"]', '{}', 'queued', 1, 3, 1.0)"
    )
    old.execute(
        "INSERT INTO vms(id, cloud, launch_id, state, launched_at, state_since) "
        "VALUES ('i-1', 'c', 'L', 'booting', 1.0, 1.0)"
    )
    old.commit()
    old.close()
    store = Store(path)
    try:
        store.register_vm("i-1", 2.0, token_hash="h")
        job = store.assign_next_job("i-1", 3.0)
        assert job is not None and job.command == ["echo"]
        assert store.vm_by_token("h") is not None
        version = store._db.execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION
    finally:
        store.close()


def test_a_v4_state_file_keeps_each_vm_s_one_job_in_its_slot_0(tmp_path: Path) -> None:
    """Before slots a VM named its one job (vms.job_id); after the upgrade that job holds
    slot 0 of the VM, so a lost fetch reply still hands it back and its report frees the VM."""
    path = tmp_path / "v4.db"
    old = sqlite3.connect(path)
    old.executescript(_schema_of("schema_v4.sql"))
    job = "INSERT INTO jobs(id, command, env, state, attempt, max_attempts, vm_id, submitted_at) "
    old.execute(job + "VALUES (1, '[\"a\"]', '{}', 'running', 1, 3, 'i-1', 1.0)")
    old.execute(job + "VALUES (2, '[\"b\"]', '{}', 'cancelled', 1, 3, 'i-2', 1.0)")
    old.execute(job + "VALUES (3, '[\"c\"]', '{}', 'done', 1, 3, 'i-1', 1.0)")
    old.executemany(
        "INSERT INTO assignments(job_id, attempt, vm_id, assigned_at) VALUES (?, 1, ?, 1.0)",
        [(1, "i-1"), (2, "i-2"), (3, "i-1")],
    )
    vm = (
        "INSERT INTO vms(id, cloud, launch_id, state, launched_at, state_since, job_id, "
        "token_hash) VALUES (?, 'c', 'L', 'busy', 1.0, 1.0, ?, ?)"
    )
    old.execute(vm, ("i-1", 1, "h1"))
    old.execute(vm, ("i-2", 2, "h2"))
    old.commit()
    old.close()
    store = Store(path)
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.vm("i-1").jobs == {0: 1} and store.job(1).slot == 0
        assert store.job(3).slot is None  # finished: it holds nothing
        assert store.cancelled_on(store.vm("i-2")) == [2]  # the agent still hears the cancel
        assert store.finish_job(1, 1, "i-1", 0, "ok", 5.0) is not None
        assert store.vm("i-1").state == VMState.IDLE and store.vm("i-1").jobs == {}
        store.release_cancelled("i-2", 2, 6.0)
        assert store.vm("i-2").state == VMState.IDLE
    finally:
        store.close()


def test_a_newer_schema_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this release knows") as raised:
        Store(path)
    assert "\n" not in str(raised.value)


def _corrupt(path: Path) -> None:
    store = Store(path)
    store.submit_jobs([], 1.0)
    for n in range(200):
        store.submit_job(["x" * 200, str(n)], 1.0)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    data[4096 : 4096 * 3] = bytes(4096 * 2)  # zeroed pages
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    _corrupt(path)
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("damage", [_corrupt, _truncate], ids=["zeroed pages", "truncated"])
def test_corrupt_state_exits_2_with_one_line_naming_the_file(
    tmp_path: Path, moto: MotoEC2Server, damage: Callable[[Path], None]
) -> None:
    config = core_config(tmp_path, moto.url)
    damage(Path(config.state.path))
    config_path = tmp_path / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    done = subprocess.run(
        [sys.executable, "-m", "core.cli", "core", "--config", str(config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and config.state.path in errors[0]
    assert "Traceback" not in done.stderr


def test_a_state_path_that_is_a_directory_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.mkdir()
    with pytest.raises(StateError, match=str(path)):
        Store(path)


# ---- history, heartbeats, systemd ------------------------------------------------------------


async def test_a_month_at_a_steady_rate_keeps_the_state_bounded(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    per_day = 240  # 10 jobs an hour: what matters is the month, not the rate
    state = {"path": str(tmp_path / "state.db"), "retention_days": 7}
    config = make_config(tmp_path, [cloud("c", moto.url)], state=state)
    store = Store(config.state.path, "normal")
    engine = build_engine(config, store, clock)
    for _ in range(30):
        for _hour in range(24):
            with store._tx():  # an hour's jobs, each submitted and finished
                ids = store.submit_jobs([JobSpec(["true"])] * (per_day // 24), clock())
                for job_id in ids:
                    store.cancel_job(job_id, clock())
            clock.advance(3600)
            engine._prune(clock())
    total = store.job_counts()
    kept = sum(total.values())
    assert kept <= 8 * per_day  # the retention window plus at most a day not yet pruned
    assert store.first_seq() > 0
    store.close()


async def test_heartbeats_live_in_memory_and_are_written_together(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1})
    store = stores(config)
    engine = build_engine(config, store, clock, liveness=Liveness(clock()))
    await engine.start()
    await step(engine)
    [vm_id] = register_all(store, clock())
    registered = store.vm(vm_id).last_heartbeat
    clock.advance(10)
    engine.liveness.heartbeat(vm_id, clock())
    assert store.vm(vm_id).last_heartbeat == registered  # no write per heartbeat
    assert engine.snapshot(clock()).vms[0].last_heartbeat == clock()
    engine.save_liveness()
    assert store.vm(vm_id).last_heartbeat == clock()


async def test_systemd_hears_ready_after_the_start_up_reconcile_then_watchdog_pings(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    core = Core(core_config(tmp_path, moto.url, pool={"min_vms": 1}), notifier=notifier)
    loop = asyncio.get_running_loop()
    await core.start()
    try:
        messages: list[str] = []
        while not any("WATCHDOG=1" in m for m in messages):
            data = await asyncio.wait_for(loop.sock_recv(listener, 4096), 20)
            messages.append(data.decode())
        assert messages[0].startswith("READY=1\nSTATUS=")
        assert core.engine.cycles >= 0
        ready_status = messages[0].split("STATUS=", 1)[1]
        assert "idle" in ready_status and "jobs waiting" in ready_status
        reconciled = [e for e in core.store.events_after(0) if e.kind == EventKind.VM_ADOPTED]
        assert reconciled == []
    finally:
        await core.stop()
        listener.close()
    assert core.notifier.enabled


# ---- found on a second reading -------------------------------------------------------------


async def test_a_launch_event_carries_its_reason_with_the_numbers(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"max_vms": 5})
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    store.submit_jobs([JobSpec(["true"])] * 2, clock())
    await step(engine)
    [event] = [e for e in store.events_after(0) if e.kind == EventKind.LAUNCH_REQUESTED]
    assert "launch 2: 2 waiting" in event.message
    assert engine.decisions[-1].launched == 2
    assert engine.decisions[-1].waiting == 2


async def test_a_drained_vm_whose_pilot_works_is_terminated_only_once_the_pilot_is_done(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1})
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    await step(engine)
    [vm_id] = register_all(store, clock())
    store.set_pilot_busy(vm_id, True, clock())
    store.drain_vm(vm_id, clock())
    engine.liveness.heartbeat(vm_id, clock())
    await step(engine)
    assert store.vm(vm_id).state == VMState.DRAINING  # its JobAgent's job goes on
    store.set_pilot_busy(vm_id, False, clock())
    await step(engine)
    assert store.vm(vm_id).state in (VMState.TERMINATING, VMState.TERMINATED)


async def test_an_instance_recorded_terminated_but_still_running_is_terminated_again(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1, "max_vms": 1})
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    await step(engine)
    [vm_id] = running_in_cloud(moto.url)
    store.transition_vm(vm_id, VMState.TERMINATED, clock(), "a wrong answer from the cloud")
    await engine._reconcile("c")
    await engine.settle()
    assert vm_id not in running_in_cloud(moto.url)


async def test_a_server_error_on_run_instances_leaves_the_launch_to_be_resolved_by_tag(
    tmp_path: Path,
    moto: MotoEC2Server,
    faulty: FaultyEndpoint,
    clock: ManualClock,
    stores: Callable[[Config], Store],
) -> None:
    config = make_config(
        tmp_path, [cloud("c", faulty.url, backoff_initial_s=10)], pool={"min_vms": 1}
    )
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    faulty.failing_actions = {"RunInstances"}  # a 503: the cloud may have acted
    await step(engine)
    [pending] = store.pending_launches()
    faulty.failing_actions = set()
    clock.advance(11)
    await step(engine)
    assert store.launch(pending.id).state.value == "done"
    assert faulty.calls["RunInstances"] == 2  # looked up by tag first, then sent again
    assert len(running_in_cloud(moto.url)) == 1


async def test_a_vm_already_silent_before_a_crash_gets_no_start_up_grace(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 2, "heartbeat_timeout_s": 300}
    )
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    await step(engine)
    alive, silent = register_all(store, clock())
    clock.advance(400)  # the silent agent stopped long ago; the core saves liveness
    engine.liveness.heartbeat(alive, clock())
    engine.save_liveness()
    clock.advance(10)  # a crash, then a restart (say, in a loop)
    restarted = build_engine(config, store, clock)
    await restarted.start()
    await step(restarted)
    assert store.vm(silent).state in (VMState.TERMINATING, VMState.TERMINATED)
    assert store.vm(alive).state == VMState.IDLE


async def test_a_job_cancelled_before_its_agent_got_it_frees_the_vm(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock, stores: Callable[[Config], Store]
) -> None:
    config = make_config(tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1})
    store = stores(config)
    engine = build_engine(config, store, clock)
    await engine.start()
    await step(engine)
    [vm_id] = register_all(store, clock())
    job = store.submit_job(["true"], clock())
    store.assign_next_job(vm_id, clock())  # the answer to this fetch never reached the agent
    store.cancel_job(job.id, clock())
    service = PoolService(
        config, store, engine.liveness, clock, engine.wake.set, engine.launch_keys
    )
    fetch = service.next_job(vm_id)  # the agent fetches again
    assert fetch.job is None and fetch.wait
    assert store.vm(vm_id).state == VMState.IDLE
