"""`alienec2 demo --headless` end to end: sandbox cloud, real core, real agent processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from core.demo import ALIEN_CYCLE_S, DemoOptions, job_stream, peak_serving
from core.model import REAP_REASONS, VM, Event, VMState
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
JOBS = 20  # enough for a burst over max_vms (8), a trickle and a few failures on purpose


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


def run_demo(workdir: Path, *extra: str, jobs: int = JOBS) -> dict[str, object]:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "core.cli", "demo", "--headless", "--jobs", str(jobs)),
            *("--idle-timeout", "3", "--boot-delay", "1", "--json", "--timeout", "150"),
            *("--workdir", str(workdir)),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_headless_demo_runs_every_job_once_grows_to_max_and_shrinks_to_min(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    summary = run_demo(workdir)
    assert summary["jobs_submitted"] == JOBS
    assert summary["jobs_done"] + summary["jobs_failed"] == JOBS
    assert summary["jobs_failed"] == summary["jobs_failed_on_purpose"] >= 1
    assert summary["jobs_finished_twice"] == 0
    assert summary["peak_vms"] == 8  # counted from the core's record of VMs and events
    assert summary["final_vms"] == 1
    assert summary["vms_reaped"] >= 7
    assert summary["all_finished"] is True
    assert (summary["timed_out"], summary["stopped_by"]) == (False, None)
    assert (workdir / "demo.log").stat().st_size > 0
    assert processes_mentioning(str(workdir)) == []
    assert not (workdir / "instances").exists()  # the agents' tokens and spools go
    logs = sorted((workdir / "agent-logs").glob("i-*.log"))  # their logs are kept
    assert sum("event=registered" in log.read_text() for log in logs) >= 8


@pytest.mark.slow
def test_alien_demo_runs_every_central_job_once_then_shrinks_to_min_within_idle_timeout(
    tmp_path: Path,
) -> None:
    """The whole AliEn chain: central queue → demand command → launch → alien user data →
    agent → stand-in JobAgent → job. Counts come from the central queue's own record and the
    core's store; the shrink is timed from the core's events."""
    workdir = tmp_path / "demo"
    idle_timeout_s = 10.0
    summary = run_demo(workdir, "--alien", "--idle-timeout", str(idle_timeout_s))
    assert summary["alien"] is True
    assert summary["jobs_submitted"] == JOBS
    assert summary["jobs_taken_once"] == JOBS  # the central queue counted each hand-out
    assert summary["jobs_taken_more_than_once"] == 0
    assert summary["jobs_done"] + summary["jobs_failed"] == JOBS
    assert summary["jobs_failed"] == summary["jobs_failed_on_purpose"]
    assert summary["pilot_runs_with_job"] == JOBS
    assert summary["pilot_runs"] > JOBS  # the JobAgents that found nothing are recorded too
    assert (summary["vms_lost"], summary["vms_failed"]) == (0, 0)
    assert summary["peak_vms"] > 1
    assert summary["final_vms"] == 1
    assert summary["all_finished"] is True and summary["timed_out"] is False

    with contextlib.closing(sqlite3.connect(workdir / "state.db")) as db:
        named = [
            int(row[0])
            for row in db.execute(
                "SELECT alien_job_id FROM jobs WHERE kind = 'pilot' AND alien_job_id IS NOT NULL"
            )
        ]
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE kind != 'pilot'").fetchone() == (0,)
        reaps = ",".join(f"'{reason}'" for reason in REAP_REASONS)
        reaped = [
            ts
            for (ts,) in db.execute(
                f"SELECT ts FROM events WHERE kind = 'vm_terminating' AND reason IN ({reaps})"
            )
        ]
        other_ends = db.execute(
            f"SELECT COUNT(*) FROM events WHERE kind = 'vm_terminating' AND reason NOT IN ({reaps})"
        ).fetchone()
    assert sorted(named) == list(range(1, JOBS + 1))  # each AliEn job named by exactly one run
    assert len(reaped) == summary["vms_launched"] - 1 and other_ends == (0,)
    emptied = summary["queue_emptied_at"]
    assert isinstance(emptied, float)
    # The last no-job JobAgent (a Python process), its report and the cycle's demand command
    # (another) come after the queue empties: a few cycles of slack on a busy machine.
    assert max(reaped) - emptied <= idle_timeout_s + 5 * ALIEN_CYCLE_S
    assert processes_mentioning(str(workdir)) == []


@pytest.mark.slow
def test_demo_with_faults_still_finishes_every_job_and_replaces_failed_vms(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    # Enough jobs that the pool still needs VMs after the failed ones: they are replaced.
    summary = run_demo(workdir, "--never-boot", "0.2", "--die-mid-job", "1", jobs=40)
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
            def shown() -> str:
                screen = tmux("capture-pane", "-t", "demo", "-p")
                return screen if text in screen else ""

            return wait_until(shown, timeout, f"{text!r} on screen")

        screen = screen_shows("sandbox-b")
        assert "demo min 1 max 8" in screen
        screen_shows("busy     ")  # agents booted from their user data are running jobs
        assert processes_mentioning(str(workdir / "instances"))
        tmux("send-keys", "-t", "demo", "q")
        screen_shows("demo stopped")
        assert processes_mentioning(str(workdir / "instances")) == []
        wait_until(
            lambda: not [p for p in processes_mentioning(str(workdir)) if "sleep 60" not in p],
            15,
            "no process of the demo left",
        )
    finally:
        tmux("kill-server")


def test_peak_counts_vms_from_launch_until_they_stop_serving() -> None:
    def vm(vm_id: str, launched: float) -> VM:
        return VM(vm_id, "c", "l", VMState.TERMINATED, launched, launched)

    def left(seq: int, vm_id: str, ts: float, kind: str = "vm_terminating") -> Event:
        return Event(seq, ts, kind, "idle", vm_id=vm_id)

    vms = [vm("a", 0), vm("b", 1), vm("c", 5), vm("d", 5)]
    events = [
        Event(1, 2, "vm_idle", "registered", vm_id="a"),
        left(2, "a", 3),
        left(3, "a", 4, "vm_terminated"),  # only the first leaving event counts
        left(4, "b", 5),  # b leaves as c and d arrive at the same time
    ]
    assert peak_serving(vms, events) == 2
    assert peak_serving(vms, []) == 4


def test_headless_timeout_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "core.cli", "demo", "--headless", "--jobs", "4"),
            *("--boot-delay", "30", "--timeout", "1", "--workdir", str(tmp_path / "demo")),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    # Every job it submitted is unfinished (a loaded machine may not have submitted all four
    # within the second: the demo paces its trickle).
    submitted = int(re.search(r"jobs: (\d+) submitted", result.stdout)[1])  # type: ignore[index]
    assert submitted >= 2  # the first burst, at once
    assert f"timed out after 1 s: {submitted} jobs unfinished" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "error: timed out after 1 s"
    assert "Traceback" not in result.stderr


# ---- signals: nothing the demo started outlives it -----------------------------------------


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def processes_under(path: Path) -> list[str]:
    """Live processes whose command line or working directory is inside ``path``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if alive(int(proc.name)) and (str(path) in args or cwd.startswith(str(path))):
            found.append(f"{proc.name}: {args}")
    return found


def agent_pids(scratch: Path, count: int, timeout: float = 60) -> list[int]:
    """The pids of the first ``count`` agents the demo booted, as recorded in its workdir."""
    files = wait_until(
        lambda: len(found := list(scratch.glob("**/instances/*/agent.pid"))) >= count and found,
        timeout,
        f"{count} agents booted",
    )
    return [int(f.read_text()) for f in files]


def headless_demo(scratch: Path) -> subprocess.Popen[str]:
    """A headless demo whose temporary directory is ``scratch`` (made here), VMs booting in
    a second; its output piped, as text."""
    scratch.mkdir()
    return subprocess.Popen(
        [sys.executable, "-m", "core.cli", "demo", "--headless", "--boot-delay", "1"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# One handler serves SIGTERM, SIGHUP and SIGINT (core/demo.py STOP_SIGNALS): each signal is
# sent in the mode where it matters most; SIGINT in the kept-workdir test below.
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM])  # systemd, kill
def test_headless_demo_stopped_by_a_signal_leaves_nothing_behind(
    tmp_path: Path, signum: signal.Signals
) -> None:
    scratch = tmp_path / "tmp"
    demo = headless_demo(scratch)
    try:
        pids = agent_pids(scratch, 2)
        assert all(alive(pid) for pid in pids)
        demo.send_signal(signum)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 128 + signum, err
    assert f"stopped by {signum.name}" in out
    assert err.strip().splitlines()[-1] == f"demo stopped by {signum.name}"
    assert "Traceback" not in err
    assert [pid for pid in pids if alive(pid)] == []
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []  # its temporary directory is gone


def exited(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (not ours to wait for) ends within ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_demo_killed_outright_takes_its_agents_and_their_jobs_with_it(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    demo = headless_demo(scratch)
    pids: list[int] = []
    try:
        pids = agent_pids(scratch, 2)
        demo.kill()  # SIGKILL: no handler of the demo runs
        demo.communicate(timeout=30)
        assert [pid for pid in pids if not exited(pid, 60)] == []
        wait_until(lambda: processes_under(scratch) == [], 30, "every job of theirs stopped")
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in pids:  # what a failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_signalled_demo_keeps_its_workdir_and_log_when_given_one(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "demo", "--headless", "--workdir", str(workdir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = agent_pids(workdir, 1)
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, err
    assert [pid for pid in pids if alive(pid)] == []
    assert processes_under(workdir) == []
    assert "event=demo_signal signal=SIGINT" in (workdir / "demo.log").read_text()
    assert (workdir / "state.db").exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
@pytest.mark.parametrize("signum", [signal.SIGHUP])  # a dropped SSH session
def test_console_demo_stopped_by_a_signal_restores_the_terminal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = f"alienec2-demo-signal-{os.getpid()}"

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", server, *args], capture_output=True, text=True, timeout=30
        ).stdout

    def pane(fmt: str) -> str:
        return tmux("display-message", "-p", "-t", "demo", fmt).strip()

    command = (
        f"TMPDIR={scratch} {sys.executable} -m core.cli demo --boot-delay 1; "
        "echo demo-exit=$?; sleep 60"
    )
    tmux("new-session", "-d", "-s", "demo", "-x", "120", "-y", "40", "-c", str(ROOT), command)
    try:
        shell = pane("#{pane_pid}")
        pids = agent_pids(scratch, 2)
        [demo] = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        assert pane("#{alternate_on} #{cursor_flag}") == "1 0"  # the console is up
        os.kill(int(demo), signum)

        def exited() -> str:
            screen = tmux("capture-pane", "-p", "-t", "demo")
            return screen if "demo-exit=" in screen else ""

        screen = wait_until(exited, 60, "the demo's exit")
        assert f"demo-exit={128 + signum}" in screen
        assert pane("#{alternate_on} #{cursor_flag} #{mouse_any_flag}") == "0 1 0"
        assert [p for p in pids if alive(p)] == []
        left = [
            p  # the tmux server and the pane's shell name the directory in their command lines
            for p in processes_under(scratch)
            if not p.startswith((f"{shell}: ", f"{pane('#{pid}')}: "))
        ]
        assert left == []
        assert list(scratch.iterdir()) == []
    finally:
        tmux("kill-server")


@pytest.mark.slow
def test_demo_with_spot_interruptions_finishes_every_job_exactly_once(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    summary = run_demo(workdir, "--spot-interrupt", "0.5")
    assert summary["jobs_done"] + summary["jobs_failed"] == JOBS
    assert summary["jobs_failed"] == summary["jobs_failed_on_purpose"]
    assert summary["jobs_finished_twice"] == 0
    assert summary["vms_interrupted"] >= 1
    assert summary["final_vms"] == 1
    assert processes_mentioning(str(workdir)) == []
    with sqlite3.connect(workdir / "state.db") as db:
        # From the core's records: one terminal event per job, and no attempt spent on a
        # Spot interruption (demo jobs that fail on purpose are the only failures).
        per_job = db.execute(
            "SELECT job_id, COUNT(*) FROM events WHERE kind IN ('job_done', 'job_failed') "
            "GROUP BY job_id"
        ).fetchall()
        assert len(per_job) == JOBS and {n for _, n in per_job} == {1}
        # Every VM interrupted while jobs ran was terminated. A notice can also reach the
        # last VM while the demo stops: the stopping core leaves it as it is (instances
        # outlive a core by design).
        (last_job_end,) = db.execute(
            "SELECT MAX(ts) FROM events WHERE kind IN ('job_done', 'job_failed')"
        ).fetchone()
        interrupted = db.execute(
            "SELECT vm_id, MIN(ts) FROM events WHERE kind = 'vm_interrupted' GROUP BY vm_id"
        ).fetchall()
        for vm_id, at in interrupted:
            (state,) = db.execute("SELECT state FROM vms WHERE id = ?", (vm_id,)).fetchone()
            assert state == "terminated" or at > last_job_end, (vm_id, state)


async def test_a_demo_of_one_job_submits_it_in_its_first_burst() -> None:
    """`demo --jobs 1` sent an empty first burst (3/5 of 1), which the core refuses."""
    batches: list[list[int]] = []

    async def submit(rng: random.Random, numbers: range) -> None:
        batches.append(list(numbers))

    stop = asyncio.Event()
    assert await job_stream(submit, DemoOptions(jobs=1), stop) == 1
    assert batches == [[1]]
