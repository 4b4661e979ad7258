"""The newer parts of the agent protocol end to end: a real core, real agent processes, the
IMDS stand-in as the Spot notice source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alienec2_tui.client import AdminClient
from core.clouds.imds_stub import IMDSStub
from core.clouds.sandbox import MotoEC2Server
from core.model import EventKind, JobState, VMState
from tests.conftest import AgentProcess, core_config, eventually, running_core, wait_for_vms


async def test_cancel_stops_the_running_job_and_the_vm_is_busy_until_the_agent_reports(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    marker = tmp_path / "still-running"
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id)
        await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE)
        async with AdminClient(socket_path=str(core.admin_socket)) as admin:
            job = await admin.submit(
                ["sh", "-c", f"sleep 300 & wait; touch {marker}"], wall_time_s=600
            )
            await eventually(lambda: core.store.job(job["id"]).state == JobState.RUNNING)
            await admin.cancel(job["id"])
            assert core.store.vm(vm_id).state == VMState.BUSY  # until the agent says it stopped
            await eventually(lambda: core.store.vm(vm_id).state == VMState.IDLE, timeout=20)
        cancelled = core.store.job(job["id"])
        assert cancelled.state == JobState.CANCELLED
        assert cancelled.exit_code is not None and cancelled.exit_code != 0
        assert not marker.exists()


async def test_a_spot_termination_requeues_the_job_without_spending_an_attempt(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    config = core_config(tmp_path, moto.url, pool={"min_vms": 2})
    async with running_core(config) as core:
        first, second = await wait_for_vms(core, 2)
        with IMDSStub(first) as imds:
            agents(first, imds_url=imds.url, spot_poll_s=0.2)
            await eventually(lambda: core.store.vm(first).state == VMState.IDLE)
            async with AdminClient(socket_path=str(core.admin_socket)) as admin:
                job = await admin.submit(["sh", "-c", "sleep 300"], wall_time_s=600)
                await eventually(lambda: core.store.job(job["id"]).state == JobState.RUNNING)
                imds.announce_termination()
                await eventually(
                    lambda: (
                        core.store.vm(first).state
                        in (VMState.INTERRUPTED, VMState.TERMINATING, VMState.TERMINATED)
                    )
                )
                requeued = core.store.job(job["id"])
                assert requeued.state in (JobState.QUEUED, JobState.ASSIGNED)
                assert requeued.max_attempts - requeued.attempt == 2  # nothing spent
                agents(second, spot_poll_s=0)
                await eventually(lambda: core.store.job(job["id"]).vm_id == second)
        kinds = [e.kind for e in core.store.events_for_vm(first)]
        assert EventKind.VM_INTERRUPTED in kinds
