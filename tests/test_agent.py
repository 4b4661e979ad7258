"""Real agent processes, booted from the user data each instance carries, against a real core."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import http.server
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alienec2_tui.client import AdminClient
from core.clouds.imds_stub import IMDSStub
from core.clouds.sandbox import MotoEC2Server
from core.model import JobState, VMState
from tests.agent_stand_in import StandInAgent, StandInCore
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


async def test_jobs_submitted_while_an_agent_waits_reach_it_through_its_parked_long_poll(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    """Submit → the waiting agent runs it, over the real service and a real agent. How fast
    is benchmarks/dispatch.py's business; here: each job wakes the parked poll."""
    config = core_config(tmp_path, moto.url, pool={"min_vms": 1})
    async with running_core(config) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id, fetch_wait_s=60)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            for _ in range(3):
                await eventually(lambda: core.changes.jobs.waiting == 1)
                job = await admin.submit(["true"])
                # Well inside the 60 s wait, so the submission woke the poll.
                await eventually(lambda j=job: job_state(core, j["id"]) == JobState.DONE, 30)
                assert core.store.job(job["id"]).vm_id == vm_id


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


@pytest.fixture
def imds_for() -> Iterator[Callable[[str], IMDSStub]]:
    servers: list[IMDSStub] = []

    def start(instance_id: str) -> IMDSStub:
        servers.append(IMDSStub(instance_id).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


async def test_agent_learns_its_instance_id_from_imdsv2(
    tmp_path: Path,
    moto: MotoEC2Server,
    agents: Callable[..., AgentProcess],
    imds_for: Callable[[str], IMDSStub],
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


# ---- the protocol's newer fields, against a scripted stand-in core (tests/agent_stand_in.py) --


@pytest.fixture
def stand_in() -> Iterator[StandInCore]:
    core = StandInCore()
    yield core
    core.stop()


@pytest.fixture
def stand_in_agent(tmp_path: Path) -> Iterator[Callable[..., StandInAgent]]:
    started: list[StandInAgent] = []

    def start(core: StandInCore, **settings: Any) -> StandInAgent:
        started.append(StandInAgent(core.url, tmp_path / f"agent{len(started)}", **settings))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()


def process_gone(pid: int) -> bool:
    """Dead or a zombie: either way it runs no more."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_cancelled_job_is_killed_with_its_whole_process_group_and_reported_cancelled(
    tmp_path: Path, stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    # The real core does not send heartbeat ``cancel`` yet: the stand-in does.
    child_pid = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {child_pid}; echo started; wait"
    stand_in.add_job(7, ["sh", "-c", script])
    stand_in_agent(stand_in)
    stand_in.wait_for(
        lambda: any(7 in b.get("running", []) for b in stand_in.bodies("/agent/v1/heartbeat"))
    )
    stand_in.wait_for(lambda: child_pid.exists() and child_pid.read_text().strip() != "")
    grandchild = int(child_pid.read_text())
    stand_in.set(cancel={7})
    stand_in.wait_for(lambda: bool(stand_in.reports("cancelled")))
    [report] = stand_in.reports("cancelled")
    assert report["attempt"] == 1
    assert report["exit_code"] == 143  # sh ended by the SIGTERM sent to its group
    assert report["output_tail"].startswith("started\n")
    assert "[alienec2-agent: cancelled]" in report["output_tail"]
    assert process_gone(grandchild), "the job's background child outlived the cancel"
    assert not stand_in.reports("finished")


def test_a_job_cancelled_before_it_started_never_runs(
    tmp_path: Path, stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    marker = tmp_path / "ran"
    stand_in.set(cancelled_at_start={8})
    stand_in.add_job(8, ["touch", str(marker)])
    stand_in_agent(stand_in)
    stand_in.wait_for(lambda: bool(stand_in.reports("cancelled")))
    [report] = stand_in.reports("cancelled")
    assert report["exit_code"] is None
    assert "cancelled before it started" in report["output_tail"]
    assert not marker.exists()


def test_a_cancelled_job_handed_back_after_a_restart_is_reported_and_never_run(
    tmp_path: Path, stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    """The core hands a started job back to a slot that fetches again; cancelled meanwhile,
    it says so in the job itself: no started report (which could be lost) decides."""
    marker = tmp_path / "ran"
    stand_in.add_job(8, ["touch", str(marker)], state="cancelled")
    stand_in_agent(stand_in)
    stand_in.wait_for(lambda: bool(stand_in.reports("cancelled")))
    assert not stand_in.reports("started")
    [report] = stand_in.reports("cancelled")
    assert report["exit_code"] is None
    assert not marker.exists()


def test_a_report_answered_503_and_429_is_kept_and_sent_until_accepted(
    stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    stand_in.set(report_answers=[503, 429, 503])
    stand_in.add_job(9, ["echo", "kept"])
    agent = stand_in_agent(stand_in)
    stand_in.wait_for(lambda: len(stand_in.reports("finished")) == 4)
    first, *retries = stand_in.reports("finished")
    assert first == {"attempt": 1, "status": "finished", "exit_code": 0, "output_tail": "kept\n"}
    assert retries == [first] * 3
    assert agent.log().count("event=report_retry") == 3
    spool = agent.state_dir / "spool"
    stand_in.wait_for(lambda: "event=report_sent" in agent.log())
    assert not any(spool.glob("*.json"))


def test_a_report_refused_for_good_is_dropped_and_the_next_one_sent(
    tmp_path: Path, stand_in: StandInCore
) -> None:
    from contextualisation.agent import DEFAULTS, Agent

    settings = {
        **DEFAULTS,
        "core_url": stand_in.url,
        "launch_id": "l",
        "launch_secret": "s",
        "state_dir": str(tmp_path / "state"),
        "max_backoff_s": 0.1,
    }
    agent = Agent(settings)
    agent.spool_report({"id": 1, "attempt": 1}, "finished", 0, "a")
    agent.spool_report({"id": 2, "attempt": 1}, "finished", 0, "b")
    stand_in.set(report_answers=[409, 500])
    agent.flush_spool()
    assert [b["output_tail"] for b in stand_in.reports("finished")] == ["a", "b", "b"]
    assert not any((tmp_path / "state" / "spool").glob("*"))


def test_slots_run_jobs_side_by_side_and_heartbeats_list_them_all(
    tmp_path: Path, stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    go = tmp_path / "go"
    stand_in.set(slots=2)  # the register reply's slots
    for job_id in (1, 2):
        stand_in.add_job(job_id, ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done"])
    stand_in_agent(stand_in)
    heartbeats = lambda: stand_in.bodies("/agent/v1/heartbeat")  # noqa: E731
    stand_in.wait_for(lambda: any(sorted(b.get("running", [])) == [1, 2] for b in heartbeats()))
    fetched = [path for path, _ in stand_in.requests if path.startswith("/agent/v1/jobs/next")]
    assert {p.rsplit("slot=", 1)[1] for p in fetched} == {"0", "1"}
    assert all(b["busy"] for b in heartbeats() if b.get("running"))
    go.touch()
    stand_in.wait_for(lambda: len(stand_in.reports("finished")) == 2)
    stand_in.wait_for(lambda: heartbeats()[-1] == {"busy": False, "running": []})


def test_short_pilot_runs_keep_the_vm_idle_and_a_long_run_is_busy_throughout(
    tmp_path: Path, stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    long, go = tmp_path / "long", tmp_path / "go"
    pilot = (
        f'if [ -e {long} ]; then echo "JobAgent: running job 77"; '
        f"while [ ! -e {go} ]; do sleep 0.02; done; sleep 1.1; exit 0; fi; echo no job; exit 3"
    )
    stand_in_agent(
        stand_in,
        pilot_command=["sh", "-c", pilot],
        pilot_pause_s=0.05,
        idle_run_s=1.0,
        no_job_exit_codes=[3],
    )
    finished = lambda: [b for b in stand_in.bodies("/agent/v1/runs") if b["status"] == "finished"]  # noqa: E731
    stand_in.wait_for(lambda: len(finished()) >= 3)
    short = finished()[0]
    assert (short["exit_code"], short["idle"], short["alien_job_id"]) == (3, True, None)
    assert short["output_tail"] == "no job\n"
    starts = [b for b in stand_in.bodies("/agent/v1/runs") if b["status"] == "started"]
    assert short["run"] in {b["run"] for b in starts} and short["slot"] == 0
    assert not any(b["busy"] for b in stand_in.bodies("/agent/v1/heartbeat"))

    long.touch()  # from the next run on, the pilot finds a job and works until ``go`` and 1.1 s
    stand_in.wait_for(lambda: any(b["busy"] for b in stand_in.bodies("/agent/v1/heartbeat")))
    go.touch()
    stand_in.wait_for(lambda: any(b["alien_job_id"] == "77" for b in finished()))
    [busy_run] = [b for b in finished() if b["alien_job_id"] == "77"]
    assert (busy_run["exit_code"], busy_run["idle"]) == (0, False)
    assert busy_run["duration_s"] > 1.0


def test_a_pilot_run_that_names_its_grid_job_is_busy_at_once_not_after_idle_run_s(
    tmp_path: Path, stand_in: StandInCore, stand_in_agent: Callable[..., StandInAgent]
) -> None:
    """A JobAgent that took a job must not look idle for its first ``idle_run_s``: the core
    would reap the VM and kill the grid job."""
    go = tmp_path / "go"
    pilot = f'echo "JobAgent: running job 12"; while [ ! -e {go} ]; do sleep 0.02; done'
    stand_in_agent(stand_in, pilot_command=["sh", "-c", pilot], pilot_pause_s=60, idle_run_s=3600)
    heartbeats = lambda: stand_in.bodies("/agent/v1/heartbeat")  # noqa: E731
    stand_in.wait_for(lambda: any(b["busy"] for b in heartbeats()))
    assert not [b for b in stand_in.bodies("/agent/v1/runs") if b["status"] == "finished"]
    go.touch()
    stand_in.wait_for(
        lambda: any(b["status"] == "finished" for b in stand_in.bodies("/agent/v1/runs"))
    )
    stand_in.wait_for(lambda: heartbeats()[-1]["busy"] is False)


def test_spot_rebalance_holds_new_jobs_and_termination_kills_the_job_and_ends_the_agent(
    tmp_path: Path,
    stand_in: StandInCore,
    stand_in_agent: Callable[..., StandInAgent],
    imds_for: Callable[[str], IMDSStub],
) -> None:
    # The real core does not serve /agent/v1/interruption yet: the stand-in does.
    imds = imds_for("i-standin")
    stand_in.set(interruption_action="run")  # the core lets the running job finish
    pid_file = tmp_path / "job.pid"
    stand_in.add_job(1, ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 300"])
    agent = stand_in_agent(stand_in, imds_url=imds.url, spot_poll_s=0.1)
    stand_in.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "")

    imds.recommend_rebalance()
    stand_in.wait_for(lambda: bool(stand_in.bodies("/agent/v1/interruption")))
    [rebalance] = stand_in.bodies("/agent/v1/interruption")
    assert rebalance["notice"] == "rebalance" and "noticeTime" in rebalance["detail"]
    stand_in.add_job(2, ["true"])  # offered, but a rebalancing agent asks for no new job
    stand_in.wait_for(lambda: "event=spot_notice notice=rebalance" in agent.log())
    assert agent.proc.poll() is None

    imds.announce_termination()
    stand_in.wait_for(lambda: len(stand_in.bodies("/agent/v1/interruption")) == 2)
    assert stand_in.bodies("/agent/v1/interruption")[1]["notice"] == "termination"
    assert agent.proc.wait(timeout=20) == 0
    assert process_gone(int(pid_file.read_text()))
    started = [b for b in stand_in.bodies("/agent/v1/jobs/") if b.get("status") == "started"]
    assert len(started) == 1  # job 2 was never taken
    assert [j["id"] for j in stand_in.jobs] == [2]


# ---- jobs run unprivileged (against the real core) ----------------------------------------


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A user made by the template's own job-user script, removed afterwards (root only)."""
    import os
    import secrets
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("creating a job user needs root (the suite runs as root in CI)")
    from core.config import ContextualisationConfig
    from core.userdata import agent_settings, render

    name = f"aec2t{secrets.token_hex(4)}"
    config = ContextualisationConfig(job_user=name)
    text = render(agent_settings("http://x", "l", "s", config), config)
    [script] = [f for f in yaml.safe_load(text)["write_files"] if f["path"].endswith("job-user.sh")]
    subprocess.run(["sh", "-c", script["content"]], check=True, timeout=60)
    yield name
    subprocess.run(["userdel", "-r", name], capture_output=True, timeout=60)
    for tool, ip in (("iptables", "169.254.169.254"), ("ip6tables", "fd00:ec2::254")):
        rule = f"OUTPUT -d {ip} -m owner --uid-owner {name} -j REJECT".split()
        with contextlib.suppress(OSError):
            subprocess.run([tool, "-D", *rule], capture_output=True, timeout=30)


async def test_jobs_run_as_the_job_user_and_cannot_read_the_token_or_act_as_their_vm(
    tmp_path: Path, moto: MotoEC2Server, throwaway_user: str
) -> None:
    import base64
    import os
    import subprocess
    import tempfile

    from core.clouds.sandbox import agent_command, prepare_agent
    from tests.conftest import ec2_client

    # Everything under a directory anyone may traverse: only the agent's own modes protect it.
    open_dir = Path(tempfile.mkdtemp(prefix="alienec2-priv-"))
    open_dir.chmod(0o755)
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        raw = ec2_client(moto.url).describe_instance_attribute(
            InstanceId=vm_id, Attribute="userData"
        )
        settings = prepare_agent(
            base64.b64decode(raw["UserData"]["Value"]).decode(),
            vm_id,
            open_dir,
            job_user=throwaway_user,
            jobs_dir=str(open_dir / "jobs"),
            spot_poll_s=0,
            max_backoff_s=0.5,
            fetch_wait_s=2,
        )
        settings.chmod(0o644)  # as if written carelessly: the agent must close it
        state = open_dir / "state"
        probe = f"""
import json, os, urllib.request, urllib.error
print("user", os.getuid(), os.environ.get("USER"))
for name, path in (("settings", {str(settings)!r}), ("token", {str(state / "token")!r}),
                   ("agent-env", "/proc/%d/environ" % os.getppid())):
    try:
        open(path).read(); print(name, "readable")
    except OSError as exc:
        print(name, "denied", exc.errno)
print("agent-vars", sorted(k for k in os.environ if k.startswith("ALIENEC2")))
for token in (None, "guess"):
    headers = {{"Content-Type": "application/json"}}
    if token:
        headers["Authorization"] = "Bearer " + token
    url = {core.agent_url!r} + "/agent/v1/jobs/next"
    req = urllib.request.Request(url, data=b"{{}}", headers=headers)
    try:
        urllib.request.urlopen(req, timeout=10); print("api", 200)
    except urllib.error.HTTPError as exc:
        print("api", exc.code)
"""
        log = open(open_dir / "agent.log", "w")  # noqa: SIM115
        env = {**os.environ, "ALIENEC2_INSTANCE_ID": vm_id, "ALIENEC2_PROBE": "leak"}
        proc = subprocess.Popen(
            agent_command(settings), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE)
            async with AdminClient(socket_path=str(core.admin_socket)) as admin:
                job = await admin.submit(["python3", "-c", probe])
            await eventually(lambda: job_state(core, job["id"]) in (JobState.DONE, JobState.FAILED))
            out = core.store.job(job["id"]).output_tail or ""
        finally:
            proc.terminate()  # the core keeps serving meanwhile: the agent's long poll ends
            await eventually(lambda: proc.poll() is not None, timeout=30)
            log.close()
    import pwd
    import shutil

    shutil.rmtree(open_dir, ignore_errors=True)
    uid = pwd.getpwnam(throwaway_user).pw_uid
    lines = out.splitlines()
    assert f"user {uid} {throwaway_user}" in lines, out
    assert "settings denied 13" in lines, out
    assert "token denied 13" in lines, out
    assert "agent-env denied 13" in lines, out
    assert "agent-vars []" in lines, out
    assert lines.count("api 401") == 2, out


def test_the_agent_keeps_its_state_and_settings_root_only(tmp_path: Path) -> None:
    from contextualisation.agent import DEFAULTS, Agent, load_settings

    settings_path = tmp_path / "agent.json"
    settings_path.write_text(
        json.dumps({"core_url": "http://x", "launch_id": "l", "launch_secret": "s"})
    )
    settings_path.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    agent = Agent({**load_settings(str(settings_path)), "state_dir": str(state)})
    agent._write_private("token", "t0k3n")
    assert settings_path.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "token").stat().st_mode & 0o777 == 0o600
    assert DEFAULTS["job_user"] == "alienec2-job"


def test_a_job_user_that_does_not_exist_fails_the_job_with_a_clear_message(tmp_path: Path) -> None:
    from contextualisation.agent import DEFAULTS, Agent

    agent = Agent(
        {
            **DEFAULTS,
            "core_url": "http://x",
            "state_dir": str(tmp_path / "s"),
            "job_user": "no-such-user-x",
        }
    )
    outcome = agent.execute(["true"], {}, None, "job")
    assert outcome.exit_code == 127
    assert "job user 'no-such-user-x' does not exist" in outcome.tail


# ---- pilot-run accounting, as pure functions ----------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("JobAgent: running job 77\nJobAgent: job 77 ended with exit code 0\n", "77"),
        ("jobId=123456 matched", "123456"),
        ("Started JobID #42 then Job id: 43", "43"),
        ("no matching job, exiting", None),
        ("", None),
    ],
)
def test_alien_job_ids_are_parsed_from_pilot_output(output: str, expected: str | None) -> None:
    from contextualisation.agent import parse_alien_job_id

    assert parse_alien_job_id(output, None) == expected


def test_a_custom_job_id_regex_without_a_group_reports_the_whole_match() -> None:
    from contextualisation.agent import parse_alien_job_id

    assert parse_alien_job_id("task A-17 done", r"A-\d+") == "A-17"


def test_a_run_is_idle_when_short_or_ending_with_a_no_job_code() -> None:
    from contextualisation.agent import run_is_idle

    settings = {"idle_run_s": 150, "no_job_exit_codes": [3]}
    assert run_is_idle(20, 0, settings)
    assert run_is_idle(600, 3, settings)  # the site says "no job", however long it took
    assert not run_is_idle(600, 0, settings)
    assert not run_is_idle(150, 1, settings)


# ---- the agent's HTTP client: one kept-alive connection per loop --------------------------


def calls_in_one_thread(client: Any, count: int) -> list[int]:
    """``count`` calls from one thread, as one agent loop makes them: their statuses."""
    return [client.call("/agent/v1/heartbeat", {"busy": False})[0] for _ in range(count)]


async def test_agent_client_keeps_one_connection_per_loop(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    from contextualisation.agent import Core as AgentClient

    async with running_core(core_config(tmp_path, moto.url)) as core:
        limits = core._servers[0].limits
        client = AgentClient(core.agent_url, None)
        assert await asyncio.to_thread(calls_in_one_thread, client, 3) == [401, 401, 401]
        assert len(limits.open) == 1  # three requests, one connection, still open


async def test_agent_client_reconnects_once_the_core_closed_its_idle_connection(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    from contextualisation.agent import Core as AgentClient

    config = core_config(tmp_path, moto.url, web={"keep_alive_s": 0.2})
    async with running_core(config) as core:
        limits = core._servers[0].limits
        client = AgentClient(core.agent_url, None)
        pool = concurrent.futures.ThreadPoolExecutor(1)  # one thread: one agent loop
        loop = asyncio.get_running_loop()
        try:
            assert await loop.run_in_executor(pool, calls_in_one_thread, client, 1) == [401]
            await eventually(lambda: not limits.open)  # closed by the core while idle
            assert await loop.run_in_executor(pool, calls_in_one_thread, client, 1) == [401]
        finally:
            pool.shutdown()


class ForwardProxy:
    """A plain HTTP proxy (absolute-form requests forwarded as they are): what it relayed."""

    def __init__(self) -> None:
        self.relayed: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy.relayed.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                upstream = http.client.HTTPConnection(parts.netloc, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request("POST", parts.path, body=body, headers=headers)
                reply = upstream.getresponse()
                payload = reply.read()
                upstream.close()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_agent_client_goes_through_the_proxy_the_environment_names(
    tmp_path: Path, moto: MotoEC2Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As urllib did: ``http_proxy`` is used, unless ``no_proxy`` names the core."""
    from contextualisation.agent import Core as AgentClient

    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    proxy = ForwardProxy()
    try:
        async with running_core(core_config(tmp_path, moto.url)) as core:
            monkeypatch.setenv("http_proxy", proxy.url)
            through = AgentClient(core.agent_url, None)
            assert await asyncio.to_thread(calls_in_one_thread, through, 2) == [401, 401]
            assert proxy.relayed == [f"{core.agent_url}/agent/v1/heartbeat"] * 2
            monkeypatch.setenv("no_proxy", "127.0.0.1")
            direct = AgentClient(core.agent_url, None)
            assert await asyncio.to_thread(calls_in_one_thread, direct, 1) == [401]
            assert len(proxy.relayed) == 2
    finally:
        proxy.stop()


def test_a_proxy_without_a_port_is_reached_on_80_and_a_bad_port_is_a_clear_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As urllib: a proxy URL without a port means 80. A port that is no number must not end
    the loop's thread with a traceback, nor put the proxy's password in the log."""
    from contextualisation.agent import Core as AgentClient
    from contextualisation.agent import Unreachable

    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://proxy.example")
    assert AgentClient("http://core.example:8470", None)._proxy() == ("proxy.example", 80, {})
    monkeypatch.setenv("http_proxy", "http://user:s3cret@proxy.example:abc")
    with pytest.raises(Unreachable) as refused:
        AgentClient("http://core.example:8470", None).call("/agent/v1/heartbeat")
    assert "invalid port" in str(refused.value) and "s3cret" not in str(refused.value)
