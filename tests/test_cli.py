"""The admin CLI, as a real process, against a running core over its unix socket."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from core.clouds.sandbox import MotoEC2Server
from core.daemon import Core
from core.model import JobState, VMState
from tests.conftest import core_config, eventually, running_core, wait_for_vms

ROOT = Path(__file__).resolve().parent.parent


async def cli(core: Core | None, *args: str, socket: str | None = None) -> tuple[int, str, str]:
    where = socket or str(core.admin_socket if core else "/nonexistent.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "core.cli",
        args[0],
        "--socket",
        where,
        *args[1:],
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_submit_cancel_resize_pause_from_the_command_line(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    async with running_core(core_config(tmp_path, moto.url)) as core:
        code, out, _ = await cli(core, "submit", "--env", "A=1", "--", "echo", "hi there")
        assert (code, out.strip()) == (0, "submitted job 1")
        job = core.store.job(1)
        assert (job.command, job.env) == (["echo", "hi there"], {"A": "1"})

        jobs = tmp_path / "jobs.txt"
        jobs.write_text("# a comment\nsleep 1\n\necho 'two words'\n")
        code, out, _ = await cli(core, "submit", "--file", str(jobs))
        assert (code, out.strip()) == (0, "submitted 2 jobs (2..3)")
        assert core.store.job(3).command == ["echo", "two words"]

        code, out, _ = await cli(core, "cancel", "2")
        assert (code, out.strip()) == (0, "job 2 cancelled")

        code, out, _ = await cli(core, "resize", "--min", "0", "--max", "4")
        assert (code, out.strip()) == (0, "pool min 0 max 4")
        code, out, _ = await cli(core, "pause")
        assert (code, out.strip()) == (0, "scaling paused")

        code, out, _ = await cli(core, "status")
        assert code == 0
        assert "pool default: min 0 max 4 (scaling PAUSED)" in out
        assert "cloud c: " in out
        code, out, _ = await cli(core, "status", "--json")
        status = json.loads(out)
        assert status["pool"]["max_vms"] == 4
        assert status["queue"]["jobs"]["cancelled"] == 1


async def test_drain_and_kill_from_the_command_line(tmp_path: Path, moto: MotoEC2Server) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as core:
        first, second = await wait_for_vms(core, 2)
        for vm_id in (first, second):
            core.store.register_vm(vm_id, core.clock())
        code, out, _ = await cli(core, "pause")
        code, out, _ = await cli(core, "kill", first)
        assert (code, out.strip()) == (0, f"vm {first} will be terminated")
        code, out, _ = await cli(core, "drain", "--all")
        assert (code, out.strip()) == (0, "draining 1 VMs")
        await eventually(lambda: core.store.vm(second).state == VMState.TERMINATED)
        await eventually(lambda: core.store.vm(first).state == VMState.TERMINATED)


async def test_refusals_and_unreachable_cores_are_one_clear_line(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    code, _, err = await cli(None, "status")
    assert code == 1
    assert err.startswith("error: cannot reach the core at unix:/nonexistent.sock")
    assert "Traceback" not in err

    async with running_core(core_config(tmp_path, moto.url)) as core:
        code, _, err = await cli(core, "resize", "--min", "5", "--max", "2")
        assert (code, err.strip()) == (1, "error: max must be >= min (got max 2 < min 5)")
        code, _, err = await cli(core, "kill", "i-0123")
        assert (code, err.strip()) == (1, "error: vm i-0123 not found")
        code, _, err = await cli(core, "submit")
        assert (code, err.strip()) == (2, "error: give either a command after -- or --file FILE")
        code, _, err = await cli(core, "drain")
        assert (code, err.strip()) == (2, "error: give a VM id or --all")
        assert core.store.job_counts()[JobState.QUEUED] == 0
