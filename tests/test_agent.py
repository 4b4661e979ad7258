"""Real agent processes, booted from the user data each instance carries, against a real core."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alienec2_tui.client import AdminClient
from core.clouds.sandbox import MotoEC2Server
from core.model import JobState, VMState
from tests.conftest import AgentProcess, core_config, eventually, running_core, wait_for_vms


def job_state(core: object, job_id: int) -> JobState:
    return core.store.job(job_id).state  # type: ignore[attr-defined]


async def test_agent_registers_fetches_runs_echo_and_reports(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agent = agents(vm_id)
        await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            job = await admin.submit(["sh", "-c", "echo hello from $WHO"], env={"WHO": "agent"})
        await eventually(lambda: job_state(core, job["id"]) == JobState.DONE)
        done = core.store.job(job["id"])
        assert done.output_tail == "hello from agent\n"
        assert done.exit_code == 0 and done.vm_id == vm_id
        assert core.store.vm(vm_id).state == VMState.IDLE
        kinds = [e.kind for e in core.store.events_after(0) if e.job_id == job["id"]]
        assert kinds == ["job_queued", "job_assigned", "job_running", "job_done"]
        assert "event=registered" in agent.log()


async def test_failing_and_overlong_jobs_are_reported_with_their_exit_codes(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            failing = await admin.submit(["sh", "-c", "echo oops >&2; exit 3"])
            overlong = await admin.submit(["sleep", "30"], wall_time_s=0.5)
            missing = await admin.submit(["/no/such/program"])
        for job in (failing, overlong, missing):
            await eventually(lambda j=job: job_state(core, j["id"]) == JobState.FAILED)
        assert core.store.job(failing["id"]).exit_code == 3
        assert core.store.job(failing["id"]).output_tail == "oops\n"
        assert core.store.job(overlong["id"]).exit_code == 124
        assert "wall time 0.5s" in (core.store.job(overlong["id"]).output_tail or "")
        assert core.store.job(missing["id"]).exit_code == 127


async def test_job_submitted_while_an_agent_waits_starts_within_100ms(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    """Submit → the agent's 'started' report, over the real service and a real agent."""
    config = core_config(tmp_path, moto.url, pool={"min_vms": 1})
    async with running_core(config) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id, fetch_wait_s=30)
        latencies = []
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            for _ in range(5):
                await eventually(lambda: core.changes.jobs.waiting == 1)
                submitted = time.time()
                job = await admin.submit(["true"])
                await eventually(
                    lambda j=job: job_state(core, j["id"]) in (JobState.RUNNING, JobState.DONE),
                    interval=0.001,
                )
                started = core.store.job(job["id"]).started_at
                assert started is not None
                latencies.append(started - submitted)
                await eventually(lambda j=job: job_state(core, j["id"]) == JobState.DONE)
        median = statistics.median(latencies)
        print(
            f"\nsubmit-to-start on a waiting agent: median {median * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms"
        )
        assert median < 0.1, f"median submit-to-start {median * 1000:.0f} ms"
        assert max(latencies) < 0.5, f"slowest submit-to-start {max(latencies) * 1000:.0f} ms"


async def test_agent_survives_a_core_restart_mid_job_and_its_report_arrives(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    go = tmp_path / "go"
    config = core_config(tmp_path, moto.url, pool={"min_vms": 1})
    async with running_core(config) as core:
        port = int(core.agent_url.rsplit(":", 1)[1])
        [vm_id] = await wait_for_vms(core, 1)
        agent = agents(vm_id)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            job = await admin.submit(
                ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done; echo survived"]
            )
        await eventually(lambda: job_state(core, job["id"]) == JobState.RUNNING)

    # The core is down. The job ends now; its report must wait on disk for the core.
    go.touch()
    spool = agent.state_dir / "spool"
    await eventually(lambda: any(spool.glob("*.json")))
    await eventually(lambda: "event=report_retry" in agent.log())

    restarted = config.model_copy(update={"web": config.web.model_copy(update={"port": port})})
    async with running_core(restarted) as core:
        await eventually(lambda: job_state(core, job["id"]) == JobState.DONE, timeout=20)
        assert core.store.job(job["id"]).output_tail == "survived\n"
        assert core.store.job(job["id"]).attempt == 1
        await eventually(lambda: not any(spool.glob("*.json")))
        assert agent.proc.poll() is None


async def test_drained_agent_finishes_its_job_then_exits_and_the_vm_is_terminated(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    go = tmp_path / "go"
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agent = agents(vm_id)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            await admin.pause(True)  # no replacement VM: only drain behaviour is watched
            job = await admin.submit(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done"])
            await eventually(lambda: job_state(core, job["id"]) == JobState.RUNNING)
            await admin.drain(vm_id)
        await eventually(lambda: "action=drain" in agent.log())
        assert job_state(core, job["id"]) == JobState.RUNNING
        go.touch()
        await eventually(lambda: agent.proc.poll() is not None)
        assert agent.proc.returncode == 0
        assert job_state(core, job["id"]) == JobState.DONE
        await eventually(lambda: core.store.vm(vm_id).state == VMState.TERMINATED)


async def test_killed_vms_agent_stops_its_job_and_the_job_runs_again_elsewhere(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as core:
        first, second = await wait_for_vms(core, 2)
        doomed = agents(first)
        await eventually(lambda: core.store.vm(first).state == VMState.IDLE)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            job = await admin.submit(["sh", "-c", "echo attempt; sleep 60"], wall_time_s=600)
            await eventually(lambda: job_state(core, job["id"]) == JobState.RUNNING)
            await admin.kill(first)
            await eventually(lambda: doomed.proc.poll() is not None)
            requeued = core.store.job(job["id"])
            assert (requeued.state, requeued.attempt) == (JobState.QUEUED, 2)
            agents(second)
            await eventually(lambda: core.store.job(job["id"]).vm_id == second)


class FakeIMDS:
    """A stand-in for the EC2 instance metadata service (IMDSv2), which only exists on a VM."""

    def __init__(self, instance_id: str) -> None:
        tokens: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self.send_error(400)
                    return
                tokens.append("imds-token")
                self._send(b"imds-token")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                    self.send_error(401)  # IMDSv2 only: no token, no answer
                    return
                if self.path == "/latest/meta-data/instance-id":
                    self._send(instance_id.encode())
                else:
                    self.send_error(404)

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds_for() -> Iterator[Callable[[str], FakeIMDS]]:
    servers: list[FakeIMDS] = []

    def start(instance_id: str) -> FakeIMDS:
        servers.append(FakeIMDS(instance_id))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


async def test_agent_learns_its_instance_id_from_imdsv2(
    tmp_path: Path,
    moto: MotoEC2Server,
    agents: Callable[..., AgentProcess],
    imds_for: Callable[[str], FakeIMDS],
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        imds = imds_for(vm_id)
        # As on a real VM: no instance id in the settings, only the metadata service knows it.
        agent = agents(vm_id, instance_id=None, imds_url=imds.url)
        await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE)
        # The core records the registration before the agent reads the answer and logs it.
        await eventually(lambda: f"event=registered vm={vm_id}" in agent.log())


def test_agent_with_unreadable_settings_exits_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess

    from core.clouds.sandbox import agent_command

    settings = tmp_path / "agent.json"
    settings.write_text(json.dumps({"core_url": "http://127.0.0.1:9"}))
    result = subprocess.run(agent_command(settings), capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert "lack launch_id, launch_secret" in result.stderr
    assert "Traceback" not in result.stderr


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (openssl CLI)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "core.key", directory / "core.csr", directory / "core.pem"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        f"openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca "
        f"-keyout {ca_key} -out {ca_cert}",
        f"openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout {key} -out {csr}",
        f"openssl x509 -req -in {csr} -CA {ca_cert} -CAkey {ca_key} -CAcreateserial -days 1 "
        f"-extfile {ext} -out {cert}",
    ):
        subprocess.run(command.split(), check=True, capture_output=True, timeout=60)
    return ca_cert, cert, key


async def test_agent_talks_tls_to_a_core_serving_its_own_certificate(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    config = core_config(
        tmp_path,
        moto.url,
        pool={"min_vms": 1},
        web={"ssl_certfile": str(cert), "ssl_keyfile": str(key)},
        contextualisation={"ca_file": str(ca)},
    )
    async with running_core(config) as core:
        assert core.agent_url.startswith("https://127.0.0.1:")
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id)
        await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            job = await admin.submit(["echo", "over tls"])
        await eventually(lambda: job_state(core, job["id"]) == JobState.DONE)
        assert core.store.job(job["id"]).output_tail == "over tls\n"
