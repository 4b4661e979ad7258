"""The console takes one snapshot and then follows the event stream (Textual Pilot against a
real core); the admin API it follows with: a snapshot consistent with an event sequence,
events with the records they name, and the heartbeat delta."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from alienec2_tui.app import ConsoleApp
from alienec2_tui.client import AdminClient
from alienec2_tui.widgets.job_table import JobTable
from alienec2_tui.widgets.vm_table import VMTable
from core.model import VMState
from tests.conftest import eventually

SIZE = (120, 40)


class RecordingClient(AdminClient):
    """The console's client, noting every request it makes; ``hold`` parks the event
    follower's next long poll until released (a console that fell behind)."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path=socket_path)
        self.paths: list[str] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self._http.event_hooks["request"].append(self._note)

    async def _note(self, request: httpx.Request) -> None:
        self.paths.append(f"{request.method} {request.url.path}")

    async def events(
        self, after: int = 0, wait: float = 0, limit: int = 1000, records: bool = False
    ) -> dict[str, Any]:
        if records:
            await self.hold.wait()
        return await super().events(after, wait, limit, records)


def shown(app: ConsoleApp) -> dict[str, dict[str, Any]]:
    table = app.query_one(VMTable)
    return {key: table.records[key] for key in table.shown_keys()}


# ---- the admin API a follower uses --------------------------------------------------------


async def test_snapshot_carries_the_seq_it_is_consistent_with(console_core: Any) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        await client.pause(True)
        job = await client.submit(["true"])
        snap = await client.snapshot(jobs=10)
        assert snap["seq"] <= snap["status"]["last_seq"] <= core.store.last_seq()
        assert {vm["id"] for vm in snap["vms"]} == {vm.id for vm in core.store.vms()}
        assert [j["id"] for j in snap["jobs"]] == [job["id"]]
        assert snap["started_at"] == core.service.liveness.started_at
        # The job's submission is in the snapshot, so not among the events to follow.
        later = (await client.events(after=snap["seq"]))["events"]
        assert not [e for e in later if e["kind"] == "job_queued"]


async def test_events_with_records_carry_the_vms_and_jobs_they_name_as_they_are_now(
    console_core: Any,
) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        await client.pause(True)
        seq = core.store.last_seq()
        job = await client.submit(["sleep", "30"])
        reply = await client.events(after=seq, wait=5, records=True)
        assert reply["jobs"][str(job["id"])]["state"] in ("queued", "assigned", "running")
        await eventually(lambda: core.store.job(job["id"]).vm_id is not None)
        vm_id = core.store.job(job["id"]).vm_id
        reply = await client.events(after=seq, records=True)
        assert reply["vms"][vm_id]["state"] == "busy"
        assert reply["vms"][vm_id]["job_id"] == job["id"]
        assert reply["jobs"][str(job["id"])]["vm_id"] == vm_id
        plain = await client.events(after=seq)
        assert "vms" not in plain and "jobs" not in plain


async def test_heartbeat_delta_lists_only_vms_heard_from_since(console_core: Any) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        first = await client.heartbeats(0)
        assert len(first["heartbeats"]) == 2
        assert all(at <= first["now"] for at in first["heartbeats"].values())
        future = await client.heartbeats(first["now"] + 3600)
        assert future["heartbeats"] == {}
        since = first["now"]
        await eventually(lambda: len(core_heartbeats(console_core, since)) == 2)
        later = await client.heartbeats(since)
        assert later["heartbeats"].keys() == first["heartbeats"].keys()
        assert all(at >= since for at in later["heartbeats"].values())


def core_heartbeats(core: Any, since: float) -> dict[str, float]:
    return core.service.heartbeats_since(since)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/admin/v1/heartbeats?since=-1", "since"),
        ("/admin/v1/heartbeats?since=nan", "since"),
        ("/admin/v1/heartbeats?since=soon", "since"),
        ("/admin/v1/snapshot?jobs=100000", "jobs"),
        ("/admin/v1/events?records=perhaps", "records"),
    ],
)
async def test_follower_endpoints_refuse_bad_input_naming_the_field(
    console_core: Any, path: str, field: str
) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(console_core.admin_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
        reply = await http.get(path)
    assert reply.status_code == 422
    assert field in reply.json()["error"]


# ---- the console follows --------------------------------------------------------------------


async def test_console_follows_events_without_reading_the_fleet_again(console_core: Any) -> None:
    core = console_core
    client = RecordingClient(str(core.admin_socket))
    try:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=SIZE) as pilot:
            await eventually(lambda: len(shown(app)) == 2)
            await client.pause(True)
            job = await client.submit(["sleep", "30"])
            await eventually(lambda: any(vm["job_id"] == job["id"] for vm in shown(app).values()))
            [busy] = [vm for vm in shown(app).values() if vm["job_id"] == job["id"]]
            assert busy["state"] == "busy"
            await pilot.press("2")
            jobs = app.query_one(JobTable)
            await eventually(lambda: str(job["id"]) in jobs.shown_keys())
            await eventually(lambda: jobs.records[str(job["id"])]["state"] == "running")
            await client.kill(busy["id"])
            await eventually(lambda: busy["id"] not in shown(app), timeout=15)
            # Requeued (and maybe on the other VM already): its second attempt, as the core has it.
            await eventually(lambda: jobs.records[str(job["id"])]["attempt"] == 2)
            assert jobs.records[str(job["id"])]["vm_id"] != busy["id"]
            assert app.snapshots == 1
            assert client.paths.count("GET /admin/v1/snapshot") == 1
            assert "GET /admin/v1/vms" not in client.paths
            assert "GET /admin/v1/jobs" not in client.paths
    finally:
        await client.aclose()


async def test_console_takes_a_new_snapshot_after_a_gap_and_shows_no_stale_state(
    console_core: Any,
) -> None:
    core = console_core
    client = RecordingClient(str(core.admin_socket))
    try:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=SIZE):
            await eventually(lambda: len(shown(app)) == 2)
            client.hold.clear()  # the follower's next long poll waits: it falls behind ...
            await client.pause(True)  # ... once the one already parked has brought this
            await eventually(lambda: app.last_seq == core.store.last_seq())
            seq = app.last_seq
            victim = sorted(shown(app))[0]
            await client.drain(victim)
            await eventually(lambda: core.store.vm(victim).state != VMState.IDLE)
            core.store.prune_events(core.service.clock() + 1, batch=100_000)  # ... too far
            assert core.store.first_seq() > seq + 1
            client.hold.set()
            await eventually(lambda: app.snapshots == 2)
            await eventually(lambda: app.last_seq >= core.store.last_seq() - 1)
            state = shown(app)[victim]["state"] if victim in shown(app) else "terminated"
            assert state in ("draining", "terminating", "terminated")
            assert app.snapshots_for_gaps == 1
    finally:
        await client.aclose()


async def test_console_takes_heartbeat_times_from_the_delta(console_core: Any) -> None:
    client = RecordingClient(str(console_core.admin_socket))
    try:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        app.heartbeat_every_s = 0.2
        async with app.run_test(size=SIZE):
            await eventually(lambda: len(shown(app)) == 2)
            before = {key: vm["last_heartbeat"] for key, vm in shown(app).items()}
            await eventually(
                lambda: all(vm["last_heartbeat"] > before[k] for k, vm in shown(app).items())
            )
            assert "GET /admin/v1/heartbeats" in client.paths
            assert app.snapshots == 1
    finally:
        await client.aclose()


class RestartingClient(RecordingClient):
    """After ``restart()`` the core answers as a new process (another ``started_at``), and
    its snapshots wait for ``snapshot_gate``: a fleet too large to snapshot within a tick."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path)
        self.started_offset = 0.0
        self.snapshot_gate = asyncio.Event()
        self.snapshot_gate.set()
        self.snapshot_calls = 0

    def restart(self) -> None:
        self.started_offset = 1.0
        self.snapshot_gate.clear()

    async def snapshot(self, jobs: int = 50) -> dict[str, Any]:
        self.snapshot_calls += 1
        await self.snapshot_gate.wait()
        reply = await super().snapshot(jobs)
        return {**reply, "started_at": reply["started_at"] + self.started_offset}

    async def heartbeats(self, since: float) -> dict[str, Any]:
        reply = await super().heartbeats(since)
        return {**reply, "started_at": reply["started_at"] + self.started_offset}


async def test_a_restarted_core_gets_one_new_snapshot_however_long_it_takes(
    console_core: Any,
) -> None:
    """Each tick that sees the new ``started_at`` again must not cancel the snapshot on its
    way and start another: at 10,000 VMs one takes longer than a tick."""
    client = RestartingClient(str(console_core.admin_socket))
    try:
        app = ConsoleApp(client, refresh_s=0.1, catch_signals=False)
        app.heartbeat_every_s = 0.1
        async with app.run_test(size=SIZE):
            await eventually(lambda: len(shown(app)) == 2 and app.snapshots == 1)
            ticks = [0]
            refresh_status = app._refresh_status

            async def counted() -> None:
                ticks[0] += 1
                await refresh_status()

            app._refresh_status = counted  # type: ignore[method-assign]
            client.restart()
            await eventually(lambda: client.snapshot_calls == 2)
            seen = ticks[0]
            await eventually(lambda: ticks[0] >= seen + 5)  # ticks pass while it is on its way
            assert client.snapshot_calls == 2
            client.snapshot_gate.set()
            await eventually(lambda: app.snapshots == 2)
            await eventually(lambda: ticks[0] >= seen + 10)
            assert client.snapshot_calls == 2 and app.snapshots == 2
    finally:
        await client.aclose()
