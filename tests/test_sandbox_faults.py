"""The sandbox's die-mid-job fault kills an instance only while a job of it still runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.clouds.sandbox import InstanceRunner

# Stand-ins for an agent: each starts a child ("the job") and says "ready" on stdout once the
# child is in the state the test wants; the test reads that line (no sleeping), then looks.
RUNNING = "import subprocess, sys, time\np = subprocess.Popen(['sleep', '60'])\n"
# Exited, not yet reaped (waitid with WNOWAIT): the agent is about to report the job finished.
EXITED = (
    "import os, subprocess\np = subprocess.Popen(['true'])\n"
    "os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)\n"
)
NO_JOB = ""
READY = "print('ready', flush=True)\nimport time\ntime.sleep(60)\n"


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[InstanceRunner]:
    runner = InstanceRunner("http://127.0.0.1:9", tmp_path / "instances")
    yield runner
    runner.close()


def boot_stand_in(runner: InstanceRunner, instance_id: str, script: str) -> subprocess.Popen[str]:
    (runner.workdir / instance_id / "state/jobs/1-1").mkdir(parents=True)  # a job was taken
    proc = subprocess.Popen(
        [sys.executable, "-c", script + READY], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    runner._procs[instance_id] = proc  # type: ignore[assignment]
    return proc


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_an_agent_whose_job_still_runs_is_caught_frozen_mid_job(runner: InstanceRunner) -> None:
    proc = boot_stand_in(runner, "i-1", RUNNING)
    assert runner._stopped_mid_job("i-1")
    assert state_of(proc.pid) == "T"  # it can send nothing more before it is killed


@pytest.mark.parametrize("script", [EXITED, NO_JOB], ids=["job-exited", "between-jobs"])
def test_an_agent_whose_job_ended_is_let_go_on(runner: InstanceRunner, script: str) -> None:
    proc = boot_stand_in(runner, "i-1", script)
    assert not runner._stopped_mid_job("i-1")
    assert state_of(proc.pid) != "T"
    assert proc.poll() is None
