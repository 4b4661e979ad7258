"""N jobs per VM for the built-in queue (``pool.slots_per_vm``): each of the agent's fetch
loops holds at most one job, over real HTTP to a real core, and with real agent processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from alienec2_tui.client import AdminClient
from alienec2_tui.widgets.vm_table import job_cell
from core.cli import _vm_jobs
from core.clouds.sandbox import MotoEC2Server
from core.daemon import Core
from core.demo import DemoOptions, demo_config
from core.model import STOPPED_SERVING_STATES, JobState, VMState
from tests.conftest import AgentProcess, core_config, eventually, running_core, wait_for_vms
from tests.test_api import bearer, register

SLOTS = 2


@pytest.fixture
async def core(tmp_path: Path, moto: MotoEC2Server) -> Any:
    pool = {"min_vms": 1, "max_vms": 1, "slots_per_vm": SLOTS}
    async with running_core(core_config(tmp_path, moto.url, pool=pool)) as running:
        yield running


@pytest.fixture
async def http(core: Core) -> Any:
    async with httpx.AsyncClient(base_url=core.agent_url, timeout=20) as client:
        yield client


@pytest.fixture
async def admin(core: Core) -> Any:
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        yield client


@pytest.fixture
async def vm(core: Core, http: httpx.AsyncClient, moto: MotoEC2Server) -> tuple[str, str]:
    """The pool's one VM, registered: its id and token."""
    [vm_id] = await wait_for_vms(core, 1)
    return vm_id, await register(http, moto.url, vm_id)


async def fetch(http: httpx.AsyncClient, token: str, slot: int) -> dict[str, Any]:
    reply = await http.post("/agent/v1/jobs/next", params={"slot": slot}, headers=bearer(token))
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def report(
    http: httpx.AsyncClient, token: str, job: dict[str, Any], status: str = "finished"
) -> dict[str, Any]:
    body = {"attempt": job["attempt"], "status": status, "exit_code": 0}
    reply = await http.post(f"/agent/v1/jobs/{job['id']}/report", json=body, headers=bearer(token))
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


async def test_each_slot_holds_its_own_job_and_a_refetch_hands_back_the_same_one(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    vm_id, token = vm
    ids = [(await admin.submit(["true"]))["id"] for _ in range(3)]
    first = (await fetch(http, token, 0))["job"]
    second = (await fetch(http, token, 1))["job"]
    assert [first["id"], second["id"]] == ids[:2]
    # A lost reply: fetching again on a slot hands back the job it holds, never a new one.
    assert (await fetch(http, token, 0))["job"]["id"] == ids[0]
    assert (await fetch(http, token, 1))["job"]["id"] == ids[1]
    assert core.store.job(ids[2]).state == JobState.QUEUED
    held = core.store.vm(vm_id)
    assert (held.state, held.jobs) == (VMState.BUSY, {0: ids[0], 1: ids[1]})

    # Reporting one job frees exactly its slot: the VM stays busy, the slot takes the next.
    await report(http, token, first)
    assert core.store.vm(vm_id).state == VMState.BUSY
    assert core.store.vm(vm_id).jobs == {1: ids[1]}
    third = (await fetch(http, token, 0))["job"]
    assert third["id"] == ids[2]
    await report(http, token, second)
    assert core.store.vm(vm_id).state == VMState.BUSY
    await report(http, token, third)
    idle = core.store.vm(vm_id)
    assert (idle.state, idle.jobs, idle.idle_since is not None) == (VMState.IDLE, {}, True)


async def test_a_slot_beyond_slots_per_vm_gets_a_422_naming_slot(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    vm_id, token = vm
    job = await admin.submit(["true"])
    for slot in (SLOTS, 1023, 1024, -1):
        reply = await http.post("/agent/v1/jobs/next", params={"slot": slot}, headers=bearer(token))
        assert reply.status_code == 422, reply.text
        assert "slot" in reply.json()["error"]
    assert core.store.job(job["id"]).state == JobState.QUEUED
    assert core.store.vm(vm_id).state == VMState.IDLE


async def test_the_policy_and_admin_see_slots_in_use(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    vm_id, token = vm
    ids = [(await admin.submit(["true"]))["id"] for _ in range(2)]
    await fetch(http, token, 1)
    [view] = [v for v in core.engine.snapshot(core.clock()).vms if v.id == vm_id]
    assert view.jobs == 1
    await fetch(http, token, 0)
    [view] = [v for v in core.engine.snapshot(core.clock()).vms if v.id == vm_id]
    assert (view.state, view.jobs) == (VMState.BUSY, 2)

    [row] = [v for v in (await admin.vms())["vms"] if v["id"] == vm_id]
    assert (row["jobs"], row["slots_used"], row["slots"], row["job_id"]) == (
        [ids[1], ids[0]],
        2,
        SLOTS,
        ids[1],  # its lowest slot's, for clients that show one job
    )
    detail = await admin.vm(vm_id)
    assert [(j["id"], j["slot"]) for j in detail["jobs"]] == [(ids[1], 0), (ids[0], 1)]
    slots = (await admin.status())["pool"]["slots"]
    assert slots == {"per_vm": SLOTS, "used": 2, "total": SLOTS}
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(core.admin_socket)), base_url="http://core"
    ) as raw:
        metrics = (await raw.get("/metrics")).text.splitlines()
    assert "alienec2_slots_used 2.0" in metrics and f"alienec2_slots {SLOTS:.1f}" in metrics


async def test_cancelling_one_job_tells_the_agent_that_job_only_and_frees_its_slot(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    vm_id, token = vm
    a, b, c = [await admin.submit(["true"]) for _ in range(3)]
    job_a = (await fetch(http, token, 0))["job"]
    job_b = (await fetch(http, token, 1))["job"]
    await admin.cancel(b["id"])
    # Only a cancelled job may be reported cancelled: a VM cannot end one that way.
    reply = await http.post(
        f"/agent/v1/jobs/{job_a['id']}/report",
        json={"attempt": job_a["attempt"], "status": "cancelled"},
        headers=bearer(token),
    )
    assert reply.status_code == 409 and "was not cancelled" in reply.json()["error"]
    assert core.store.job(a["id"]).state == JobState.ASSIGNED
    beat = (await http.post("/agent/v1/heartbeat", headers=bearer(token))).json()
    assert beat["cancel"] == [b["id"]]
    assert core.store.vm(vm_id).jobs == {0: a["id"], 1: b["id"]}  # until the agent stops it
    assert (await report(http, token, job_b, "cancelled"))["state"] == "cancelled"
    assert core.store.vm(vm_id).jobs == {0: a["id"]}
    beat = (await http.post("/agent/v1/heartbeat", headers=bearer(token))).json()
    assert beat["cancel"] == []
    assert core.store.job(a["id"]).state == JobState.ASSIGNED

    # Cancelled before its agent ever got it: the slot's next fetch frees it and takes C.
    await admin.cancel(a["id"])
    assert (await fetch(http, token, 0))["job"]["id"] == c["id"]
    assert core.store.vm(vm_id).jobs == {0: c["id"]}
    assert job_a["id"] == a["id"]


async def test_a_started_job_that_was_cancelled_keeps_its_slot_until_its_report(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    """Fetching again is no word that the job's process stopped: the slot stays held (no new
    job beside an orphan still running), and an agent that lost track of the job gets it
    back and learns from its started report that it is cancelled."""
    vm_id, token = vm
    a, b = [await admin.submit(["true"]) for _ in range(2)]
    job_a = (await fetch(http, token, 0))["job"]
    assert (await report(http, token, job_a, "started"))["state"] == "running"
    await admin.cancel(a["id"])
    for _ in range(2):
        again = (await fetch(http, token, 0))["job"]
        assert (again["id"], again["state"]) == (a["id"], "cancelled")  # the agent skips it
        assert core.store.vm(vm_id).jobs == {0: a["id"]}
        assert core.store.job(b["id"]).state == JobState.QUEUED
    assert (await report(http, token, again, "started"))["state"] == "cancelled"
    assert core.store.vm(vm_id).jobs == {0: a["id"]}
    assert (await report(http, token, again, "cancelled"))["state"] == "cancelled"
    assert core.store.vm(vm_id).jobs == {}
    assert (await fetch(http, token, 0))["job"]["id"] == b["id"]


async def test_a_draining_vm_takes_no_job_on_any_slot_and_goes_when_all_are_free(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    vm_id, token = vm
    a, b = [await admin.submit(["true"]) for _ in range(2)]
    job_a = (await fetch(http, token, 0))["job"]
    await admin.drain(vm_id)
    empty = await fetch(http, token, 1)
    assert (empty["job"], empty["action"]) == (None, "drain")
    # The held job is handed back even now (its first answer may have been lost).
    assert (await fetch(http, token, 0))["job"]["id"] == a["id"]
    assert core.store.job(b["id"]).state == JobState.QUEUED
    assert core.store.vm(vm_id).state == VMState.DRAINING
    await report(http, token, job_a)
    await eventually(
        lambda: core.store.vm(vm_id).state in (VMState.TERMINATING, VMState.TERMINATED)
    )
    assert core.store.job(a["id"]).state == JobState.DONE


def runs_counted(runs: Path) -> int:
    """How many times the test's job began (each run appends a line)."""
    return runs.read_text().count("run") if runs.exists() else 0


async def test_an_agent_restarted_on_a_draining_vm_runs_the_job_its_slot_holds_and_the_vm_goes(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    """A draining agent takes no work, so one restarted on a draining VM never fetched the
    job its slot held: never run nor reported, it kept the VM draining (and billed) for
    ever. The agent now asks for it once its reports are delivered, runs it and drains."""
    go, runs = tmp_path / "go", tmp_path / "runs"
    wait_for_go = (
        f"echo run >> {runs}; i=0; while [ ! -e {go} ]; do i=$((i+1)); "
        "[ $i -gt 600 ] && exit 3; sleep 0.1; done; echo went"
    )
    pool = {"min_vms": 1, "max_vms": 1}
    async with running_core(core_config(tmp_path, moto.url, pool=pool)) as core:
        [vm_id] = await wait_for_vms(core, 1)
        first = agents(vm_id)
        await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE, timeout=20)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            job_id = (await admin.submit(["sh", "-c", wait_for_go]))["id"]
            # Running: reported started, and its process has begun (the report comes first).
            await eventually(lambda: runs_counted(runs) == 1, timeout=20)
            await eventually(lambda: core.store.job(job_id).state == JobState.RUNNING, timeout=20)
            first.proc.kill()  # the agent dies under its job (its process goes on, orphaned)
            first.proc.wait()
            await admin.drain(vm_id)
        assert core.store.vm(vm_id).state == VMState.DRAINING
        restarted = agents(vm_id)  # the same state directory: its token, an empty spool
        await eventually(lambda: runs_counted(runs) == 2, timeout=20)
        go.touch()
        await eventually(lambda: core.store.job(job_id).state == JobState.DONE, timeout=30)
        job = core.store.job(job_id)
        assert (job.attempt, job.output_tail.strip()) == (1, "went")
        await eventually(lambda: core.store.vm(vm_id).state in STOPPED_SERVING_STATES, timeout=30)
        assert restarted.proc.wait(timeout=30) == 0
        assert "event=held_job_handed_back" in restarted.log()


async def test_a_killed_vm_requeues_every_job_it_holds(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, vm: tuple[str, str]
) -> None:
    vm_id, token = vm
    a, b = [await admin.submit(["true"]) for _ in range(2)]
    await fetch(http, token, 0)
    await fetch(http, token, 1)
    killed = await admin.kill(vm_id)
    assert killed["jobs"] == [a["id"], b["id"]]
    await eventually(
        lambda: core.store.vm(vm_id).state in (VMState.TERMINATING, VMState.TERMINATED)
    )
    for job in (a, b):
        requeued = core.store.job(job["id"])
        assert (requeued.attempt, requeued.slot) == (2, None)
        assert requeued.state in (JobState.QUEUED, JobState.ASSIGNED)  # a new VM may take it
        assert requeued.vm_id != vm_id


async def test_a_vm_with_two_slots_runs_two_jobs_at_once_and_each_job_exactly_once(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    """Concurrency without timing: each of the first two jobs waits (up to a minute) for a
    file only the other creates, so both finish only if they ran side by side."""
    pool = {"min_vms": 1, "max_vms": 1, "slots_per_vm": SLOTS}
    shared = tmp_path / "shared"
    shared.mkdir()

    def meet(mine: str, theirs: str) -> list[str]:
        wait = (
            f"touch {shared / mine}; i=0; "
            f"while [ ! -e {shared / theirs} ]; do i=$((i+1)); "
            f'[ $i -gt 600 ] && echo "no {theirs}" && exit 3; sleep 0.1; done; echo met'
        )
        return ["sh", "-c", wait]

    async with running_core(core_config(tmp_path, moto.url, pool=pool)) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id)
        await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE, timeout=20)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            pair = [await admin.submit(meet("a", "b")), await admin.submit(meet("b", "a"))]
            runs = shared / "runs"
            rest = [
                await admin.submit(["sh", "-c", f"echo {n} >> {runs}; echo ran {n}"])
                for n in range(4)
            ]
            ids = [job["id"] for job in pair + rest]
            await eventually(
                lambda: all(core.store.job(i).state == JobState.DONE for i in ids), timeout=90
            )
        jobs = [core.store.job(i) for i in ids]
        assert [j.output_tail.strip() for j in jobs[:2]] == ["met", "met"]
        assert sorted(runs.read_text().split()) == ["0", "1", "2", "3"]  # each ran once
        assert all(j.attempt == 1 and j.vm_id == vm_id for j in jobs)
        assigned = [e for e in core.store.events_after(0) if e.kind == "job_assigned"]
        assert sorted(e.job_id for e in assigned) == sorted(ids)
        slots_used = {
            row["slot"]
            for row in core.store._db.execute(
                "SELECT slot FROM assignments WHERE vm_id = ?", (vm_id,)
            )
        }
        assert slots_used == {0, 1}
        assert core.store.vm(vm_id).state == VMState.IDLE
        assert core.store.vm(vm_id).jobs == {}


def test_the_console_and_cli_show_slots_in_use_only_when_a_vm_has_several() -> None:
    one = {"job_id": 7, "jobs": [7], "slots_used": 1, "slots": 1}
    four = {"job_id": 7, "jobs": [7, 9], "slots_used": 2, "slots": 4}
    before_slots = {"job_id": None}  # a core from before slots sends neither field
    assert [job_cell(vm) for vm in (one, four, before_slots)] == ["7", "2/4", "-"]
    assert [_vm_jobs(vm) for vm in (one, four, before_slots)] == ["7", "2/4", "-"]


def test_the_demo_gives_its_pool_the_slots_it_is_asked_for(tmp_path: Path) -> None:
    """``alienec2 demo --slots N``: the demo's core serves N jobs per VM (the end-to-end
    test above runs a real agent's two slots at once)."""
    config = demo_config(tmp_path, "http://a", "http://b", DemoOptions(jobs=1, slots_per_vm=2))
    assert config.pool.slots_per_vm == 2
    assert demo_config(tmp_path, "http://a", "http://b", DemoOptions(jobs=1)).pool.slots_per_vm == 1
