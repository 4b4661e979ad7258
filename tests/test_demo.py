"""`alienec2 demo --headless` end to end: sandbox cloud, real core, real agent processes."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(f"{cmdline.parent.name}: {args}")
    return found


def run_demo(workdir: Path, *extra: str) -> tuple[dict[str, object], float]:
    started = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "core.cli", "demo", "--headless", "--jobs", "40"),
            *("--idle-timeout", "3", "--json", "--timeout", "150", "--workdir", str(workdir)),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout), elapsed


@pytest.mark.slow
def test_headless_demo_runs_every_job_once_grows_to_max_and_shrinks_to_min(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    summary, elapsed = run_demo(workdir)
    assert summary["jobs_submitted"] == 40
    assert summary["jobs_done"] + summary["jobs_failed"] == 40
    assert summary["jobs_failed"] >= 1  # some demo jobs fail on purpose
    assert summary["jobs_finished_twice"] == 0
    assert summary["peak_vms"] == 8
    assert summary["final_vms"] == 1
    assert summary["vms_reaped"] >= 7
    assert summary["all_finished"] is True
    assert elapsed < 60, f"the demo took {elapsed:.0f}s"
    assert processes_mentioning(str(workdir)) == []
    assert not (workdir / "instances").exists()


@pytest.mark.slow
def test_demo_with_faults_still_finishes_every_job_and_replaces_failed_vms(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    summary, elapsed = run_demo(workdir, "--never-boot", "0.2", "--die-mid-job", "1")
    assert elapsed < 90, f"the demo with faults took {elapsed:.0f}s"
    assert summary["jobs_done"] + summary["jobs_failed"] == 40
    assert summary["jobs_finished_twice"] == 0
    assert summary["vms_failed"] >= 1
    assert summary["vms_lost"] == 1
    assert summary["vms_launched"] > summary["peak_vms"]  # replacements were launched
    assert summary["final_vms"] == 1
    assert processes_mentioning(str(workdir)) == []
    with sqlite3.connect(workdir / "state.db") as db:
        dead = db.execute(
            "SELECT DISTINCT vm_id FROM events WHERE kind IN ('vm_failed', 'vm_lost')"
        ).fetchall()
        states = {
            vm_id: db.execute("SELECT state FROM vms WHERE id = ?", (vm_id,)).fetchone()[0]
            for (vm_id,) in dead
        }
        requeued = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'job_requeued'").fetchone()
    assert set(states.values()) == {"terminated"}
    assert requeued[0] >= 1  # the job on the VM that died ran again elsewhere


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_interactive_demo_opens_the_console_and_quitting_stops_everything(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    server = f"alienec2-demo-test-{os.getpid()}"

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", server, *args], capture_output=True, text=True, timeout=30
        ).stdout

    command = f"{sys.executable} -m core.cli demo --workdir {workdir}; sleep 60"
    tmux("new-session", "-d", "-s", "demo", "-x", "120", "-y", "40", "-c", str(ROOT), command)
    try:

        def screen_shows(text: str, timeout: float = 60) -> str:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                screen = tmux("capture-pane", "-t", "demo", "-p")
                if text in screen:
                    return screen
                time.sleep(0.1)
            raise AssertionError(f"{text!r} never appeared:\n{screen}")

        screen = screen_shows("sandbox-b")
        assert "pool demo min 1 max 8" in screen
        screen_shows("busy     ")  # agents booted from their user data are running jobs
        assert processes_mentioning(str(workdir / "instances"))
        tmux("send-keys", "-t", "demo", "q")
        screen_shows("demo stopped")
        assert processes_mentioning(str(workdir / "instances")) == []
        deadline = time.monotonic() + 15
        while left := [p for p in processes_mentioning(str(workdir)) if "sleep 60" not in p]:
            assert time.monotonic() < deadline, f"left behind: {left}"
            time.sleep(0.1)
    finally:
        tmux("kill-server")
