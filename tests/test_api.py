"""The web service over real HTTP: uvicorn on loopback, httpx as the caller."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from alienec2_tui.client import AdminClient, AdminError
from core.api.access import client_address, is_allowed, networks
from core.api.agent import network_guard
from core.api.longpoll import POLL_END_SPREAD
from core.clouds.sandbox import SANDBOX_IMAGE, MotoEC2Server
from core.config import ConfigError, WebConfig
from core.daemon import Core
from core.model import JobState, VMState
from core.userdata import read_agent_settings
from tests.conftest import core_config, ec2_client, eventually, running_core, wait_for_vms

FORBIDDEN = {"error": "forbidden", "code": "forbidden"}


def launch_settings(moto_url: str, vm_id: str) -> dict[str, Any]:
    """What the instance's user data tells its agent (read back from EC2, as a VM would)."""
    raw = ec2_client(moto_url).describe_instance_attribute(InstanceId=vm_id, Attribute="userData")
    return read_agent_settings(base64.b64decode(raw["UserData"]["Value"]).decode())


def registration(moto_url: str, vm_id: str) -> dict[str, Any]:
    """The body an agent on that instance sends to register."""
    settings = launch_settings(moto_url, vm_id)
    return {
        "instance_id": vm_id,
        "launch_id": settings["launch_id"],
        "launch_secret": settings["launch_secret"],
    }


async def register(http: httpx.AsyncClient, moto_url: str, vm_id: str) -> str:
    reply = await http.post("/agent/v1/register", json=registration(moto_url, vm_id))
    assert reply.status_code == 200, reply.text
    return reply.json()["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def core(tmp_path: Path, moto: MotoEC2Server) -> Any:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as running:
        yield running


@pytest.fixture
async def http(core: Core) -> Any:
    async with httpx.AsyncClient(base_url=core.agent_url, timeout=20) as client:
        yield client


@pytest.fixture
async def admin(core: Core) -> Any:
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        yield client


async def test_instance_registers_once_and_a_second_registration_is_refused(
    core: Core, http: httpx.AsyncClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    reply = await http.post("/agent/v1/register", json=registration(moto.url, vm_id))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["token"]) >= 32
    assert reply.json()["slots"] == 1  # pool.slots_per_vm: the agent's loops
    assert core.store.vm(vm_id).state == VMState.IDLE

    again = await http.post("/agent/v1/register", json=registration(moto.url, vm_id))
    assert again.status_code == 409
    assert again.json()["code"] == "already_registered"


async def test_wrong_secret_unknown_launch_or_foreign_instance_get_403_and_learn_nothing(
    core: Core, http: httpx.AsyncClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    settings = launch_settings(moto.url, vm_id)
    foreign = ec2_client(moto.url).run_instances(ImageId=SANDBOX_IMAGE, MinCount=1, MaxCount=1)
    foreign_id = foreign["Instances"][0]["InstanceId"]
    attempts = [
        {"instance_id": vm_id, "launch_id": settings["launch_id"], "launch_secret": "guess"},
        {"instance_id": vm_id, "launch_id": "nope", "launch_secret": settings["launch_secret"]},
        {
            "instance_id": foreign_id,
            "launch_id": settings["launch_id"],
            "launch_secret": settings["launch_secret"],
        },
    ]
    for body in attempts:
        reply = await http.post("/agent/v1/register", json=body)
        assert (reply.status_code, reply.json()) == (403, FORBIDDEN)
    assert core.store.vm(vm_id).state != VMState.IDLE


async def test_agent_calls_without_a_valid_token_get_401(
    core: Core, http: httpx.AsyncClient
) -> None:
    for headers in ({}, bearer("not-a-token"), {"Authorization": "Basic abc"}):
        reply = await http.post("/agent/v1/heartbeat", headers=headers)
        assert reply.status_code == 401
        assert reply.json() == {"error": "unauthorized", "code": "unauthorized"}
    reply = await http.post("/agent/v1/jobs/1/report", json={"attempt": 1, "status": "started"})
    assert reply.status_code == 401


async def test_one_vms_token_cannot_report_another_vms_job_and_reports_are_idempotent(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, moto: MotoEC2Server
) -> None:
    first, second = await wait_for_vms(core, 2)
    token1 = await register(http, moto.url, first)
    token2 = await register(http, moto.url, second)
    job = await admin.submit(["echo", "hi"])
    fetched = (await http.post("/agent/v1/jobs/next", headers=bearer(token1))).json()
    assert fetched["job"]["id"] == job["id"]

    finished = {"attempt": 1, "status": "finished", "exit_code": 0, "output_tail": "hi\n"}
    path = f"/agent/v1/jobs/{job['id']}/report"
    stolen = await http.post(path, json=finished, headers=bearer(token2))
    assert (stolen.status_code, stolen.json()) == (403, FORBIDDEN)
    assert core.store.job(job["id"]).state == JobState.ASSIGNED

    for _ in range(2):
        reply = await http.post(path, json=finished, headers=bearer(token1))
        assert reply.status_code == 200
        assert reply.json()["state"] == "done"
    done_events = [e for e in core.store.events_after(0) if e.kind == "job_done"]
    assert len(done_events) == 1
    assert core.store.job(job["id"]).output_tail == "hi\n"


async def test_fetch_returns_the_same_job_again_if_the_first_answer_was_lost(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    token = await register(http, moto.url, vm_id)
    job = await admin.submit(["true"])
    await admin.submit(["false"])
    first = (await http.post("/agent/v1/jobs/next", headers=bearer(token))).json()
    second = (await http.post("/agent/v1/jobs/next", headers=bearer(token))).json()
    assert first["job"]["id"] == second["job"]["id"] == job["id"]


async def test_long_poll_hands_a_job_submitted_during_the_wait_to_the_waiting_agent(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    token = await register(http, moto.url, vm_id)
    waiting = asyncio.create_task(
        http.post("/agent/v1/jobs/next", params={"wait": 30}, headers=bearer(token))
    )
    await eventually(lambda: core.changes.jobs.waiting == 1)
    job = await admin.submit(["echo", "now"])
    # Far inside the 30 s wait: the submission woke the parked poll, it did not expire.
    reply = await asyncio.wait_for(waiting, 15)
    assert reply.json()["job"]["id"] == job["id"]
    assert core.store.job(job["id"]).vm_id == vm_id


async def test_empty_long_poll_returns_no_job_after_the_wait(
    core: Core, http: httpx.AsyncClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    token = await register(http, moto.url, vm_id)
    started = time.perf_counter()
    reply = await http.post("/agent/v1/jobs/next", params={"wait": 0.4}, headers=bearer(token))
    assert reply.json() == {"job": None, "action": "run"}
    assert time.perf_counter() - started >= 0.4 * (1 - POLL_END_SPREAD)  # it did wait


async def test_a_wake_up_for_a_job_a_drained_vm_cannot_take_goes_to_the_next_parked_poll(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, moto: MotoEC2Server
) -> None:
    """A job wakes the poll parked longest; if that VM was drained while parked, the wake-up
    passes on at once instead of the job waiting for another poll's wait to end."""
    drained, other = await wait_for_vms(core, 2)
    tokens = {vm_id: await register(http, moto.url, vm_id) for vm_id in (drained, other)}

    def park(vm_id: str) -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(
            http.post(
                "/agent/v1/jobs/next",
                params={"wait": 50},
                headers=bearer(tokens[vm_id]),
                timeout=60,
            )
        )

    oldest = park(drained)
    await eventually(lambda: core.changes.jobs.waiting == 1)
    newer = park(other)
    await eventually(lambda: core.changes.jobs.waiting == 2)
    await admin.drain(drained)
    [job_id] = (await admin.submit_batch([{"command": ["true"]}]))["ids"]

    done, _ = await asyncio.wait({oldest, newer}, timeout=25, return_when="ALL_COMPLETED")
    assert done == {oldest, newer}, "the wake-up stayed with the drained VM's poll"
    assert oldest.result().json()["job"] is None
    assert newer.result().json()["job"]["id"] == job_id


async def test_heartbeat_answers_run_then_drain_and_a_gone_vms_token_is_refused(
    core: Core, http: httpx.AsyncClient, admin: AdminClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    token = await register(http, moto.url, vm_id)
    beat = await http.post("/agent/v1/heartbeat", headers=bearer(token))
    assert beat.json()["action"] == "run"
    await admin.drain(vm_id)
    drained = await http.post("/agent/v1/heartbeat", headers=bearer(token))
    # The engine may already have terminated the idle, drained VM: its token is then dead.
    assert drained.status_code == 401 or drained.json()["action"] in ("drain", "stop")
    await eventually(lambda: core.store.vm(vm_id).state == VMState.TERMINATED)
    beat = await http.post("/agent/v1/heartbeat", headers=bearer(token))
    assert beat.status_code == 401


async def test_malformed_requests_get_422_with_a_message(
    core: Core, http: httpx.AsyncClient, moto: MotoEC2Server
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    token = await register(http, moto.url, vm_id)
    reply = await http.post("/agent/v1/register", json={"instance_id": vm_id})
    assert reply.status_code == 422
    assert "launch_id: Field required" in reply.json()["error"]
    reply = await http.post(
        "/agent/v1/register", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 422 and reply.json()["code"] == "invalid_request"
    reply = await http.post(
        "/agent/v1/jobs/1/report", json={"attempt": 1, "status": "finished"}, headers=bearer(token)
    )
    assert reply.status_code == 422
    assert "exit_code is required" in reply.json()["error"]
    reply = await http.post("/agent/v1/jobs/next", params={"wait": 999}, headers=bearer(token))
    assert reply.status_code == 422 and "wait" in reply.json()["error"]
    reply = await http.post("/agent/v1/jobs/next", params={"wait": "nan"}, headers=bearer(token))
    assert reply.status_code == 422
    assert reply.json()["error"] == "query.wait: Input should be a finite number"
    for body, field in (({"busy": "yes"}, "busy"), ({"running": ["7"]}, "running.0")):
        reply = await http.post("/agent/v1/heartbeat", json=body, headers=bearer(token))
        assert reply.status_code == 422  # a string is no boolean or job id: never coerced
        assert reply.json()["error"].startswith(f"{field}: Input should be a valid")
    assert core.store.vm(vm_id).pilot_busy is False
    run = {"run": "r1", "status": "started"}
    reply = await http.post("/agent/v1/runs", json=run, headers=bearer(token))
    assert reply.status_code == 409  # a VM of the built-in template runs no pilots
    assert "contextualisation.template is builtin" in reply.json()["error"]
    assert core.store.jobs(kind="pilot") == []
    # A VM that reported runs before a reload to the built-in template drains with its
    # pilots still running: their runs are still recorded.
    core.store.record_run(
        core.store.vm(vm_id),
        f"{vm_id}/r0",
        ["pilot"],
        core.clock(),
        finished=False,
        exit_code=None,
        output_tail="",
        alien_job_id=None,
        idle=None,
    )
    reply = await http.post("/agent/v1/runs", json=run, headers=bearer(token))
    assert reply.status_code == 200, reply.text
    assert [j.state for j in core.store.jobs(kind="pilot")] == ["running", "running"]

    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(core.admin_socket)), base_url="http://core"
    ) as raw:
        reply = await raw.post("/admin/v1/jobs", json={"command": []})
        assert reply.status_code == 422 and "command" in reply.json()["error"]
        reply = await raw.post("/admin/v1/pool/resize", json={"min_vms": 5, "max_vms": 1})
        assert reply.status_code == 422
        assert reply.json()["error"] == "max must be >= min (got max 1 < min 5)"
        reply = await raw.post("/admin/v1/vms/i-nope/kill")
        assert reply.status_code == 404 and reply.json()["error"] == "vm i-nope not found"
        reply = await raw.get("/admin/v1/no/such/path")
        assert reply.status_code == 404 and "error" in reply.json()


async def test_requests_from_outside_allowed_networks_get_403(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, web={"allowed_networks": ["10.0.0.0/8"]})
    async with running_core(config) as core, httpx.AsyncClient(base_url=core.agent_url) as http:
        for reply in (
            await http.get("/healthz"),
            await http.post("/agent/v1/register", json={}),
            await http.post("/agent/v1/heartbeat", headers={"X-Forwarded-For": "10.1.2.3"}),
        ):
            assert (reply.status_code, reply.json()) == (403, FORBIDDEN)


async def test_only_a_trusted_proxys_forwarded_for_is_honoured(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    web = {"allowed_networks": ["192.0.2.0/24"], "trusted_proxies": ["127.0.0.1/32"]}
    config = core_config(tmp_path, moto.url, web=web)
    async with running_core(config) as core, httpx.AsyncClient(base_url=core.agent_url) as http:
        inside = await http.get("/healthz", headers={"X-Forwarded-For": "192.0.2.7"})
        assert inside.status_code == 200
        outside = await http.get("/healthz", headers={"X-Forwarded-For": "198.51.100.9"})
        assert outside.status_code == 403
        spoofed = await http.get("/healthz", headers={"X-Forwarded-For": "192.0.2.7, 198.51.100.9"})
        assert spoofed.status_code == 403  # the proxy saw 198.51.100.9; the rest is the caller's


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    trusted = networks(["10.0.0.1/32"])
    assert client_address("203.0.113.5", "192.0.2.7", trusted) == "203.0.113.5"
    assert client_address("10.0.0.1", "192.0.2.7", trusted) == "192.0.2.7"
    assert client_address("10.0.0.1", None, trusted) == "10.0.0.1"
    assert is_allowed("::ffff:192.0.2.7", networks(["192.0.2.0/24"]))
    assert not is_allowed("garbage", networks(["0.0.0.0/0"]))


def test_the_network_guard_keeps_each_verdict_to_its_own_peer_and_forwarded_header() -> None:
    """The guard remembers verdicts (a fleet asks from the same addresses all day): one
    must never answer for another peer or another X-Forwarded-For, however long."""
    web = WebConfig(allowed_networks=["192.0.2.0/24"], trusted_proxies=["10.0.0.1/32"])
    admits = network_guard(web)

    def scope(peer: str, forwarded: str | None = None) -> dict[str, Any]:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return {"client": (peer, 40000), "headers": headers}

    hops = ", ".join(["192.0.2.7"] * 60)  # long: judged, not kept
    for _ in range(2):  # the second time, from what the first kept
        assert admits(scope("192.0.2.5"))
        assert not admits(scope("198.51.100.1"))
        assert admits(scope("10.0.0.1", "192.0.2.7"))
        assert not admits(scope("10.0.0.1", "198.51.100.9"))
        assert not admits(scope("10.0.0.1", hops + ", 198.51.100.9"))
        assert admits(scope("10.0.0.1", "198.51.100.9, " + hops))


async def test_admin_socket_is_private_and_answers_status(core: Core, admin: AdminClient) -> None:
    mode = stat.S_IMODE(os.stat(core.admin_socket).st_mode)
    assert mode == 0o600
    status = await admin.status()
    assert status["pool"]["min_vms"] == 2
    assert set(status["queue"]["jobs"]) >= {"queued", "running", "done", "failed"}
    assert status["clouds"][0]["name"] == "c"


async def test_admin_over_tcp_needs_the_bearer_token(tmp_path: Path, moto: MotoEC2Server) -> None:
    token = "tcp-admin-token-0123456789"
    admin_section = {"socket": str(tmp_path / "a.sock"), "tcp_host": "127.0.0.1", "tcp_port": 0}
    config = core_config(tmp_path, moto.url, admin={**admin_section, "token": token})
    async with running_core(config) as core:
        assert core.admin_url
        async with httpx.AsyncClient(base_url=core.admin_url) as http:
            for headers in ({}, bearer("wrong"), {"Authorization": token}):
                reply = await http.get("/admin/v1/status", headers=headers)
                assert reply.status_code == 401
                assert reply.json() == {"error": "unauthorized", "code": "unauthorized"}
                assert reply.headers["www-authenticate"] == "Bearer"
            assert (await http.get("/metrics")).status_code == 401
        async with AdminClient(url=core.admin_url, token=token) as admin:
            assert (await admin.status())["core_id"] == "test-core"
        assert token not in (tmp_path / "state.db").read_bytes().decode(errors="replace")


async def test_admin_tcp_without_a_token_refuses_to_start(
    tmp_path: Path, moto: MotoEC2Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALIENEC2_ADMIN_TOKEN", raising=False)
    admin_section = {"socket": str(tmp_path / "a.sock"), "tcp_host": "127.0.0.1", "tcp_port": 0}
    core = Core(core_config(tmp_path, moto.url, admin=admin_section))
    with pytest.raises(ConfigError, match=r"admin.tcp_host: needs a token"):
        await core.start()


async def test_events_resume_after_a_sequence_number_and_long_poll_for_new_ones(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    async with (
        # No VMs: a launch answered late would add its events after `after` below.
        running_core(core_config(tmp_path, moto.url, pool={"max_vms": 0})) as core,
        AdminClient(socket_path=str(core.admin_socket)) as admin,
    ):
        await admin.submit(["echo", "one"])
        first = await admin.events(after=0)
        seqs = [e["seq"] for e in first["events"]]
        assert seqs == sorted(seqs) and first["last_seq"] == seqs[-1]
        resumed = await admin.events(after=seqs[0])
        assert [e["seq"] for e in resumed["events"]][:1] == [seqs[0] + 1]

        await admin.pause(True)  # a quiet pool: the next event is the one we cause
        after = core.store.last_seq()
        later = asyncio.create_task(admin.events(after=after, wait=20))
        await eventually(lambda: core.changes.events.waiting >= 1)
        job = await admin.submit(["echo", "two"])
        reply = await asyncio.wait_for(later, 5)
        assert reply["events"][0]["kind"] == "job_queued"
        assert reply["events"][0]["job_id"] == job["id"]
        assert all(e["seq"] > after for e in reply["events"])


async def test_admin_steers_the_pool_and_shows_the_core_message_on_refusal(
    core: Core, admin: AdminClient
) -> None:
    vm_id, _ = await wait_for_vms(core, 2)
    bounds = await admin.resize(min_vms=1, max_vms=3)
    assert bounds == {"min_vms": 1, "max_vms": 3, "warnings": []}
    await admin.pause(True)
    assert (await admin.status())["pool"]["paused"] is True
    await admin.pause(False)
    killed = await admin.kill(vm_id)
    assert killed["kill_requested"] is True
    await eventually(lambda: core.store.vm(vm_id).state == VMState.TERMINATED)
    with pytest.raises(AdminError, match=f"vm {vm_id} is already terminated"):
        await admin.kill(vm_id)
    job = await admin.submit(["sleep", "1"])
    cancelled = await admin.cancel(job["id"])
    assert cancelled["state"] == "cancelled"
    with pytest.raises(AdminError, match="cannot be cancelled"):
        await admin.cancel(job["id"])


async def test_metrics_and_healthz(core: Core, admin: AdminClient) -> None:
    await wait_for_vms(core, 2)
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(core.admin_socket)), base_url="http://core"
    ) as raw:
        text = (await raw.get("/metrics")).text
        vms = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("alienec2_vms{")
        }
        assert set(vms) == {state.value for state in VMState}
        assert sum(vms.values()) == 2  # the two VMs the fixture's min_vms launched
        assert "alienec2_pool_max_vms 10.0" in text
        assert (await raw.get("/healthz")).json()["status"] == "ok"
    async with httpx.AsyncClient(base_url=core.agent_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_agent_connections_have_nodelay_so_responses_are_not_held_for_acks() -> None:
    """Without TCP_NODELAY a two-part response waited ~40 ms for a delayed ACK (measured by
    benchmarks/dispatch.py before the fix)."""
    import socket

    from core.api.server import tcp_socket

    listener = tcp_socket("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
    _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
    assert await asyncio.wait_for(accepted, 5) != 0
    writer.close()
    server.close()
    await server.wait_closed()


async def test_submit_is_refused_when_jobs_come_from_another_queue(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    queue = {"kind": "command", "command": ["sh", "-c", "echo 0"]}
    async with running_core(core_config(tmp_path, moto.url, queue=queue)) as running:
        async with AdminClient(socket_path=str(running.admin_socket)) as client:
            with pytest.raises(AdminError, match=r"queue\.kind is command"):
                await client.submit(["true"])
            status = await client.status()
        assert running.store.job_counts()[JobState.QUEUED] == 0
        assert set(status["queue"]["pilot_runs"]) == {state.value for state in JobState}
