"""The sandbox AliEn: its central queue, JobAgent and demand command, for real, and the whole
chain through a real core and a real agent running the JobAgent as its pilot."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from alienec2_tui.client import AdminClient
from alienec2_tui.widgets.job_table import row_for
from contextualisation.agent import parse_alien_job_id
from core.clouds.alien_clients import NO_JOB_EXIT
from core.clouds.alien_sandbox import CentralQueue, demand_command, jobagent_command
from core.clouds.sandbox import MotoEC2Server, sandbox_refusal
from core.config import parse_config
from core.daemon import Core
from core.model import JobState, VMState
from core.queues import DemandError
from core.queues.command import CommandQueue
from tests.conftest import AgentProcess, core_config, eventually, running_core, wait_for_vms
from tests.test_cli import cli


@pytest.fixture
def central() -> Iterator[CentralQueue]:
    with CentralQueue() as queue:
        yield queue


async def core_jobs(core: Core, kind: str) -> dict[str, Any]:
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        return await client.jobs(kind=kind, limit=500)


async def eventually_running_run(core: Core) -> int:
    """A pilot run in progress (the idle VM's JobAgents start again every pause)."""

    def running() -> list[int]:
        return [j.id for j in core.store.jobs(JobState.RUNNING, kind="pilot")]

    await eventually(lambda: bool(running()), timeout=30)
    return running()[0]


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def test_central_queue_gives_each_job_to_one_jobagent_in_order(central: CentralQueue) -> None:
    ids = [post(f"{central.url}/jobs", {"command": ["true", str(n)]})["id"] for n in range(3)]
    taken = [post(f"{central.url}/jobs/take", {"agent": "a"})["job"] for _ in range(4)]
    assert [job and job["id"] for job in taken] == [*ids, None]
    assert post(f"{central.url}/jobs/{ids[0]}/done", {"exit_code": 0}) == {"accepted": True}
    assert post(f"{central.url}/jobs/{ids[0]}/done", {"exit_code": 0}) == {"accepted": False}
    assert post(f"{central.url}/jobs/{ids[1]}/done", {"exit_code": 2}) == {"accepted": True}
    assert central.counts() == {"waiting": 0, "running": 1, "done": 1, "failed": 1}
    assert all(job["taken"] == 1 for job in central.jobs())


def test_demand_command_prints_the_waiting_jobs_as_one_integer(central: CentralQueue) -> None:
    for n in range(2):
        central.add(["true", str(n)])
    result = subprocess.run(demand_command(central.url), capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "2\n")
    down = subprocess.run(
        demand_command("http://127.0.0.1:9"), capture_output=True, text=True, timeout=30
    )
    assert down.returncode == 1 and down.stdout == ""
    assert "did not answer" in down.stderr


def test_jobagent_runs_one_job_names_it_and_exits_with_no_job_code_when_idle(
    central: CentralQueue, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    job_id = central.add(["touch", str(marker)])
    first = subprocess.run(
        jobagent_command(central.url), capture_output=True, text=True, timeout=30
    )
    assert first.returncode == 0 and marker.exists()
    assert parse_alien_job_id(first.stdout, None) == str(job_id)
    assert central.counts()["done"] == 1
    idle = subprocess.run(jobagent_command(central.url), capture_output=True, text=True, timeout=30)
    assert idle.returncode == NO_JOB_EXIT
    assert parse_alien_job_id(idle.stdout, None) is None


async def test_jobagents_under_a_real_agent_and_core_run_every_central_job_exactly_once(
    tmp_path: Path,
    moto: MotoEC2Server,
    central: CentralQueue,
    agents: Callable[..., AgentProcess],
) -> None:
    out = tmp_path / "ran.txt"
    ids = [central.add(["sh", "-c", f"echo {n} >> {out}"]) for n in range(8)]
    alien = {
        "pilot_command": jobagent_command(central.url),
        "no_job_exit_codes": [NO_JOB_EXIT],
        "pilot_pause_s": 0.05,
    }
    config = core_config(
        tmp_path,
        moto.url,
        pool={"min_vms": 1, "slots_per_vm": 2},  # two JobAgents side by side
        contextualisation={"template": "alien", "alien": alien},
    )
    async with running_core(config) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agent = agents(vm_id)  # the register reply sets its slots
        await eventually(lambda: central.counts()["done"] == len(ids), timeout=60)
        assert sorted(int(line) for line in out.read_text().split()) == list(range(8))
        assert all(job["taken"] == 1 for job in central.jobs())
        await eventually(lambda: "code=3 idle=True" in agent.log())
        # One slot may find the queue empty before the other has reported its last run.
        await eventually(
            lambda: (
                sum(j.alien_job_id is not None for j in core.store.jobs(kind="pilot")) == len(ids)
            )
        )
        assert core.store.vm(vm_id).state == VMState.IDLE  # short runs: the VM stays idle
        assert {"slot=0", "slot=1"} <= set(agent.log().replace(" ", "\n").split("\n"))

        # The runs are records: `alienec2 jobs` lists them with the AliEn job each one ran.
        code, out, _ = await cli(core, "jobs", "--kind", "pilot", "--state", "done")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split()[:9] == [
            "ID", "STATE", "VM", "KIND", "ATTEMPT", "WAIT", "RUN", "EXIT", "ALIEN",
        ]  # fmt: skip
        cells = [row.split() for row in rows]
        assert {row[3] for row in cells} == {"pilot"}
        named = sorted(int(row[8]) for row in cells if row[8] != "-")
        assert named == ids  # each central job named by exactly one recorded run
        assert any(row[8] == "-" and row[7] == str(NO_JOB_EXIT) for row in cells)
        code, out, _ = await cli(core, "jobs", "--kind", "job")
        assert (code, out.strip()) == (0, "no jobs of kind job")
        reply = (await core_jobs(core, "pilot"))["jobs"]
        assert reply and {job["kind"] for job in reply} == {"pilot"}
        assert (await core_jobs(core, "job"))["jobs"] == []

        # The console's jobs view shows what each run did, not the same JobAgent command line.
        shown = {row_for(job, 0.0)[-1] for job in reply}
        assert {f"pilot run: AliEn job {n}" for n in ids} <= shown
        assert "pilot run" in shown

        # A pilot run cannot be cancelled like a queue job: the core does not run it.
        running = await eventually_running_run(core)
        code, _, err = await cli(core, "cancel", str(running))
        assert code != 0 and "pilot run" in err
        assert core.store.job(running).state != JobState.CANCELLED


def test_sandbox_runs_the_alien_template_only_with_the_stand_in_jobagent() -> None:
    def config(pilot: list[str]) -> Any:
        return parse_config(
            {
                "clouds": [{"name": "c", "region": "r", "image_id": "ami-1"}],
                "contextualisation": {"template": "alien", "alien": {"pilot_command": pilot}},
            }
        )

    assert sandbox_refusal(config(jobagent_command("http://127.0.0.1:1"))) is None
    site = sandbox_refusal(config(["/cvmfs/alice.cern.ch/bin/alienv", "JobAgent"]))
    assert site is not None and "would run the site's JobAgent" in site
    assert (
        sandbox_refusal(
            parse_config({"clouds": [{"name": "c", "region": "r", "image_id": "ami-1"}]})
        )
        is None
    )


async def test_the_worked_example_demand_command_meets_the_command_source_contract(
    central: CentralQueue,
) -> None:
    """The README's worked example, through the core's own command source."""
    for n in range(3):
        central.add(["true", str(n)])
    assert await CommandQueue(demand_command(central.url), 10).waiting() == 3
    central.take("a")
    assert await CommandQueue(demand_command(central.url), 10).waiting() == 2
    with pytest.raises(DemandError, match=r"exited with 1: central queue .* did not answer"):
        await CommandQueue(demand_command("http://127.0.0.1:9"), 10).waiting()
