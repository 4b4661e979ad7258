"""The admin CLI, as a real process, against a running core over its unix socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from alienec2_tui.client import _MAYBE_UNSAFE, AdminClient, shown
from core.cli import _connection_first, parser
from core.clouds.sandbox import MotoEC2Server
from core.daemon import Core
from core.lock import StateLock
from core.model import JobState, VMState
from tests.conftest import AgentProcess, core_config, eventually, running_core, wait_for_vms

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

        code, out, err = await cli(core, "resize", "--min", "0", "--max", "4")
        assert (code, out.strip(), err) == (0, "pool min 0 max 4", "")
        capacity = sum(c.max_instances for c in core.config.clouds)
        code, out, err = await cli(core, "resize", "--max", "1000000")
        assert (code, out.strip()) == (0, "pool min 0 max 1000000")  # kept: a reload may follow
        assert err.strip() == (
            "warning: max_vms 1000000 will not be reached: the clouds' max_instances allow "
            f"{capacity} VMs together"
        )
        code, out, _ = await cli(core, "resize", "--max", "4")
        code, out, _ = await cli(core, "pause")
        assert (code, out.strip()) == (0, "scaling paused")

        code, out, _ = await cli(core, "status")
        assert code == 0
        assert "pool default: min 0 max 4 (scaling PAUSED)" in out
        assert "cloud c: " in out
        code, out, _ = await cli(core, "status", "--json")
        assert code == 0
        status = json.loads(out)
        assert status["pool"]["max_vms"] == 4
        assert status["queue"]["jobs"]["cancelled"] == 1
        code, out, _ = await cli(core, "snapshot", "--jobs", "2")
        assert code == 0
        snapshot = json.loads(out)  # what the console starts from, with the seq it follows
        assert snapshot["seq"] == core.store.last_seq()
        assert snapshot["status"]["pool"]["max_vms"] == 4
        assert [job["id"] for job in snapshot["jobs"]] == [3, 2]


async def test_commands_that_change_the_pool_print_the_cores_answer_as_json_on_request(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    """Scripts read the new job's id or the bounds from the answer, not from a sentence."""
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as core:
        drained, killed = await wait_for_vms(core, 2)
        for vm_id in (drained, killed):
            core.store.register_vm(vm_id, core.clock())
        answers = {}
        for command in (
            ("submit", "--json", "--", "echo", "hi"),
            ("cancel", "1", "--json"),
            ("resize", "--max", "3", "--json"),
            ("pause", "--json"),
            ("drain", drained, "--json"),
            ("kill", killed, "--json"),
            ("resume", "--json"),
        ):
            code, out, err = await cli(core, *command)
            assert (code, err) == (0, ""), command
            answers[command[0]] = json.loads(out)
        assert (answers["submit"]["id"], answers["submit"]["command"]) == (1, ["echo", "hi"])
        assert (answers["cancel"]["id"], answers["cancel"]["state"]) == (1, "cancelled")
        assert (answers["resize"]["min_vms"], answers["resize"]["max_vms"]) == (2, 3)
        assert answers["resize"]["warnings"] == []
        assert answers["drain"]["id"] == drained
        assert (answers["kill"]["id"], answers["kill"]["kill_requested"]) == (killed, True)
        assert core.store.setting("paused", True) is False


async def test_drain_and_kill_from_the_command_line(tmp_path: Path, moto: MotoEC2Server) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as core:
        first, second = await wait_for_vms(core, 2)
        for vm_id in (first, second):
            core.store.register_vm(vm_id, core.clock())
        code, out, _ = await cli(core, "pause")
        assert (code, out.strip()) == (0, "scaling paused")
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
    assert (code, err.strip()) == (
        1,
        "error: no core listening at /nonexistent.sock; start one with: "
        "alienec2 core --config FILE",
    )

    async with running_core(core_config(tmp_path, moto.url)) as core:
        code, _, err = await cli(core, "resize", "--min", "5", "--max", "2")
        assert (code, err.strip()) == (1, "error: max must be >= min (got max 2 < min 5)")
        code, _, err = await cli(core, "kill", "i-0123")
        assert (code, err.strip()) == (1, "error: vm i-0123 not found")
        # The agent API's address given for the admin one: an alienec2 API, not this one.
        code, _, err = await cli(core, "status", "--url", core.agent_url)
        assert (code, err.strip()) == (
            1,
            "error: no such route: GET /admin/v1/status (is "
            f"{core.agent_url} the agent API? The admin API listens on admin.port)",
        )
        code, _, err = await cli(core, "submit")
        assert (code, err.strip()) == (2, "error: give either a command after -- or --file FILE")
        code, _, err = await cli(core, "drain")
        assert (code, err.strip()) == (2, "error: give a VM id or --all")
        code, _, err = await cli(core, "submit", "--env", "FOO", "--", "true")
        assert (code, err.strip()) == (2, "error: --env takes KEY=VALUE (got 'FOO')")
        code, _, err = await cli(core, "submit", "--env", "A=1", "--env", "A=2", "--", "true")
        assert (code, err.strip()) == (2, "error: --env A given twice")
        missing, unclosed = tmp_path / "missing.txt", tmp_path / "unclosed.txt"
        unclosed.write_text("echo 'open\n")
        for jobs_file, said in (
            (missing, f"error: {missing}: No such file or directory"),
            (unclosed, f"error: {unclosed}:1: No closing quotation"),
        ):
            code, _, err = await cli(core, "submit", "--file", str(jobs_file))
            assert (code, err.strip()) == (2, said)  # a file the command line names
        for args in (("why", "--last", "0"), ("job", "0"), ("resize", "--min", "-1")):
            code, _, err = await cli(core, *args)
            assert code == 2 and err.count("\n") == 1, (args, err)
            assert f"alienec2 {args[0]}: error: argument " in err and "must be" in err, err
        for wall in ("-3", "0", "nan", "ten"):
            code, _, err = await cli(core, "submit", "--wall-time", wall, "--", "true")
            assert code == 2 and err.count("\n") == 1, (wall, err)
            assert err.startswith("alienec2 submit: error: argument --wall-time: "), err
        code, _, err = await cli(core, "vm", "i-0123")
        assert (code, err.strip()) == (1, "error: vm i-0123 not found")
        code, _, err = await cli(core, "job", "999")
        assert (code, err.strip()) == (1, "error: job 999 not found")
        code, _, err = await cli(core, "job", "x")
        assert code == 2
        assert err.strip() == (
            "alienec2 job: error: argument JOB: not a whole number: 'x' (see alienec2 job --help)"
        )
        code, _, err = await cli(core, "vms", "--state", "sleeping")
        assert code == 2
        assert err.count("\n") == 1
        assert "invalid choice: 'sleeping'" in err
        assert core.store.job_counts()[JobState.QUEUED] == 0


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    [choices] = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(choices.choices)


def test_the_clis_bounds_are_the_admin_apis() -> None:
    """Kept apart so the CLI starts without FastAPI; a bound moved on one side only would
    let the CLI promise what the core refuses (it did: --limit 1-10000 against 1000)."""
    from core.api.admin import MAX_PAGE, MAX_POOL_VMS
    from core.cli import PAGE_MAX, POOL_VMS_MAX

    assert (PAGE_MAX, POOL_VMS_MAX) == (MAX_PAGE, MAX_POOL_VMS)


def test_every_subcommand_and_argument_has_a_help_text() -> None:
    commands = _subcommands()
    assert {"vms", "jobs", "vm", "job", "events", "status", "core", "demo"} <= set(commands)
    for name, command in commands.items():
        assert command.description, f"{name} --help has no description"
        for action in command._actions:
            assert action.help, f"{name}: {action.dest} has no help text"


async def test_version_prints_the_package_version() -> None:
    code, out, err = await cli(None, "--version")
    assert code == 0, err
    assert out.strip().startswith("alienec2 0.")


async def test_vms_jobs_vm_and_job_show_the_pool_and_a_finished_jobs_output(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agents(vm_id)
        code, out, _ = await cli(core, "submit", "--env", "SECRET=x", "--", "echo", "hi there")
        assert (code, out.strip()) == (0, "submitted job 1")
        await eventually(lambda: core.store.job(1).state == JobState.DONE, timeout=30)
        code, out, _ = await cli(core, "flow", "--json")  # the console's sparklines
        minutes = json.loads(out)["minutes"]
        assert (code, len(minutes)) == (0, 15)
        assert [sum(m[k] for m in minutes) for k in ("submitted", "started", "finished")] == [
            *(1, 1, 1)
        ]
        code, out, _ = await cli(core, "flow", "--minutes", "2")
        header, *rows = out.splitlines()
        assert header.split() == ["MINUTE", "SUBMITTED", "STARTED", "FINISHED", "FAILED"]
        assert len(rows) == 2
        await cli(core, "submit", "--", "sleep", "30")  # job 2 still runs while we look
        await eventually(lambda: core.store.job(2).vm_id == vm_id)

        code, out, _ = await cli(core, "vms")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split() == [
            "ID", "CLOUD", "STATE", "FOR", "JOB", "IDLE", "HEARTBEAT", "ADDRESS",
        ]  # fmt: skip
        assert [row.split()[:2] for row in rows] == [[vm_id, "c"]]
        # aligned under its header (searched after the id, which may itself end in "c")
        assert rows[0].index(" c ", len(vm_id)) + 1 == header.index("CLOUD")

        code, out, _ = await cli(core, "vms", "--json")
        assert code == 0
        reply = json.loads(out)
        assert [vm["id"] for vm in reply["vms"]] == [vm_id]
        assert set(reply) == {"now", "vms"}
        code, out, _ = await cli(core, "vms", "--state", "terminated", "--json")
        assert (code, json.loads(out)["vms"]) == (0, [])

        code, out, _ = await cli(core, "jobs", "--state", "done")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split()[:3] == ["ID", "STATE", "VM"]
        assert len(rows) == 1
        assert rows[0].split()[:3] == ["1", "done", vm_id]
        assert rows[0].endswith("echo 'hi there'")
        code, out, _ = await cli(core, "jobs", "--json")
        assert sorted(job["id"] for job in json.loads(out)["jobs"]) == [1, 2]

        code, out, _ = await cli(core, "job", "1")
        assert code == 0
        assert "command:      echo 'hi there'" in out
        assert "environment:  SECRET" in out
        assert "exit code:    0" in out
        assert "output (tail):\n  hi there" in out
        assert "x" not in out.split("environment:")[1].splitlines()[0]  # names, not values
        code, out, _ = await cli(core, "job", "1", "--json")
        assert json.loads(out)["output_tail"].strip() == "hi there"

        code, out, _ = await cli(core, "vm", vm_id)
        assert code == 0
        assert out.startswith(f"vm:              {vm_id}\n")
        assert "current job:\njob:          2\n" in out
        assert "command:      sleep 30" in out
        assert "output: none yet" in out
        assert "events:" in out and "vm_idle" in out
        code, out, _ = await cli(core, "vm", vm_id, "--json")
        assert set(json.loads(out)) == {"now", "vm", "job", "jobs", "events"}


# What a job, its submitter or a VM's root writes that a terminal would obey: set the window
# title, clear the screen, recolour, return to the line's start, a C1 CSI, a bidi override.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\rfake\x9b2J\u202eevil"
SEEN = r"\x1b]0;PWNED\x07\x1b[2J\x1b[31mred\rfake\x9b2J\u202eevil"  # how it is printed
UNSHOWN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")  # what must never be printed


async def test_text_from_jobs_and_vms_is_shown_never_obeyed_and_an_id_names_only_itself(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        [vm_id] = await wait_for_vms(core, 1)
        now = core.clock()
        core.store.register_vm(vm_id, now)
        job = core.store.submit_job(["echo", HOSTILE], now, env={f"{HOSTILE}NAME": "v"})
        core.store.assign_next_job(vm_id, now)
        output = f"line one\r\n\tindented\n{HOSTILE}\n"
        core.store.finish_job(job.id, 1, vm_id, 0, output, now)
        core.service.interruption(core.store.vm(vm_id), "rebalance", HOSTILE)

        for command in (["job", "1"], ["jobs"], ["events"], ["vm", vm_id], ["vms"]):
            code, out, err = await cli(core, *command)
            assert (code, UNSHOWN.findall(out), err) == (0, [], ""), command
        code, out, _ = await cli(core, "job", "1")
        assert "  line one\n  \tindented\n" in out  # output keeps its lines and tabs
        assert SEEN in out
        code, out, _ = await cli(core, "events")
        assert f"spot rebalance notice: {SEEN}" in out
        # --json is the core's answer as it is: its encoder escapes every control.
        code, out, _ = await cli(core, "job", "1", "--json")
        assert UNSHOWN.findall(out) == []
        assert (json.loads(out)["output_tail"], json.loads(out)["command"]) == (
            output,
            ["echo", HOSTILE],
        )
        async with AdminClient(socket_path=str(core.admin_socket)) as console:  # as the console
            shown = await console.job(1)
            assert (list(shown["env"]), shown["command"]) == ([f"{SEEN}NAME"], ["echo", SEEN])
            assert shown["output_tail"] == f"line one\n\tindented\n{SEEN}\n"

        # An id names a VM, never another route: one with "/" cannot be an instance id, and
        # the rest are one path segment ("?" and "#" included).
        code, _, err = await cli(core, "kill", "../jobs/1/cancel?")
        assert (code, err.count("\n")) == (2, 1)
        assert "argument VM: not an instance id: '../jobs/1/cancel?'" in err
        code, _, err = await cli(core, "drain", "..")
        assert (code, err.count("\n")) == (2, 1)
        code, _, err = await cli(core, "drain", "i-1?pause#")
        assert (code, err) == (1, "error: vm i-1?pause# not found\n")
        assert core.store.job(1).state == JobState.DONE
        assert not core.service.status()["pool"]["paused"]


def test_shown_escapes_whatever_the_encoder_wrote_and_never_merges_two_names() -> None:
    body = json.dumps({"a": "\u009b2J\u202e"})  # escaped to ASCII, as any encoder may
    assert shown(json.loads(body)) == {"a": "\\x9b2J\\u202e"}
    assert _MAYBE_UNSAFE.search(body)  # so the reply is walked, not passed as it came
    assert not _MAYBE_UNSAFE.search(json.dumps({"a": 'plain \\ " /'}))
    names = {"A\x1b": "1", "A\\x1b": "2"}  # a control, and the text that shows it
    assert shown({"env": names}) == {"env": {"A\\x1b": "1", "A\\\\x1b": "2"}}


async def test_events_lists_the_last_ones_and_follow_streams_json_lines(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    async with running_core(core_config(tmp_path, moto.url, pool={"max_vms": 0})) as core:
        await cli(core, "submit", "--", "true")
        code, out, _ = await cli(core, "events", "--last", "1")
        assert code == 0
        header, *rows = out.splitlines()
        assert header.split() == ["SEQ", "TIME", "KIND", "VM", "JOB", "MESSAGE"]
        assert len(rows) == 1
        assert rows[0].split()[3:5] == ["job_queued", "-"]
        code, out, _ = await cli(core, "events", "--json")
        document = json.loads(out)
        assert document["last_seq"] == core.store.last_seq()
        assert "job_queued" in [event["kind"] for event in document["events"]]

        # From a fixed point: the follower may start after the submission below.
        after = str(core.store.last_seq())
        follower = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "core.cli", "events", "--follow", "--json", "--after", after),
            *("--socket", str(core.admin_socket)),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert follower.stdout is not None
            code, out, _ = await cli(core, "submit", "--", "echo", "followed")
            assert (code, out.strip()) == (0, "submitted job 2")
            line = await asyncio.wait_for(follower.stdout.readline(), 30)
            event = json.loads(line)
            assert (event["kind"], event["job_id"]) == ("job_queued", 2)
        finally:
            follower.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(follower.communicate(), 30)
        assert follower.returncode == 130
        assert b"Traceback" not in err


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``alienec2 ARGS`` as its own process, for what it does before any core is reached."""
    command = [sys.executable, "-m", "core.cli", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_demo_workdir_it_cannot_use_is_one_line(tmp_path: Path) -> None:
    """A file where the directory should be: one line and exit 2, not a traceback."""
    taken = tmp_path / "afile"
    taken.write_text("")
    done = run_cli("demo", "--headless", "--workdir", str(taken))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --workdir {taken}: File exists"

    used = tmp_path / "used"  # an earlier demo's: kept as it is, not mixed into a new run
    used.mkdir()
    (used / "state.db").write_bytes(b"earlier")
    done = run_cli("demo", "--headless", "--workdir", str(used))
    assert (done.returncode, done.stderr.count("\n")) == (2, 1)
    assert done.stderr.startswith(f"error: --workdir {used}: holds an earlier demo's state")
    assert (used / "state.db").read_bytes() == b"earlier"
    mine = tmp_path / "mine"  # the demo removes what it made there: nothing else may be
    (mine / "instances").mkdir(parents=True)
    (mine / "instances" / "keep.txt").write_text("precious")
    done = run_cli("demo", "--headless", "--workdir", str(mine))
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"error: --workdir {mine}: not empty; give a new or empty directory",
    )
    assert (mine / "instances" / "keep.txt").read_text() == "precious"

    running = StateLock(used / "state.db")  # a demo still running there holds its lock
    running.acquire()
    try:
        done = run_cli("demo", "--headless", "--workdir", str(used))
    finally:
        running.release()
    assert (done.returncode, done.stderr.count("\n")) == (2, 1)
    assert done.stderr.strip() == (
        f"error: --workdir {used}: a demo is running there (pid {os.getpid()}); stop it, or "
        "give a new directory"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("demo", "--idle-timeout", "0"), "argument --idle-timeout: must be more than 0"),
        (("demo", "--idle-timeout", "nan"), "argument --idle-timeout: must be more than 0"),
        (("demo", "--boot-delay", "-1"), "argument --boot-delay: must be 0 or more"),
        (("demo", "--timeout", "nan"), "argument --timeout: must be more than 0"),
        (("demo", "--die-mid-job", "-1"), "argument --die-mid-job: must be 0 to"),
        (("jobs", "--limit", "1001"), "argument --limit: must be 1 to 1000 (got 1001)"),
        (("events", "--last", "5000"), "argument --last: must be 0 to 1000 (got 5000)"),
        (("vm", "i-\udcff"), "argument VM: not an instance id: not UTF-8 text"),
        (
            ("submit", "--", "printf", "\udcff"),
            "not UTF-8 text, which a job cannot carry: b'\\xff'",
        ),
    ],
)
def test_a_bad_argument_is_one_line_before_anything_runs(args: tuple[str, ...], line: str) -> None:
    done = run_cli(*args, "--headless") if args[0] == "demo" else run_cli(*args)
    assert (done.returncode, done.stderr.count("\n"), done.stdout) == (2, 1, "")
    assert line in done.stderr


def test_connection_options_may_come_before_the_command(tmp_path: Path) -> None:
    """``alienec2 --socket S status``, as git and kubectl users write it."""
    assert _connection_first(["--socket", "/s", "status", "--json"]) == [
        *("status", "--socket", "/s", "--json")
    ]
    # Only before the command, and ahead of the job's own "--" arguments.
    assert _connection_first(["--url=http://x", "submit", "--", "echo", "--socket"]) == [
        *("submit", "--url=http://x", "--", "echo", "--socket")
    ]
    assert _connection_first(["status", "--socket", "/s"]) == ["status", "--socket", "/s"]
    assert _connection_first(["--socket"]) == ["--socket"]

    nowhere = str(tmp_path / "no-core.sock")
    done = run_cli("--socket", nowhere, "status")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: no core listening at {nowhere}; start one with")
    done = run_cli("--socket", nowhere, "check-config", str(ROOT / "config.example.yaml"))
    assert (done.returncode, done.stderr.count("\n")) == (2, 1)
    assert "unrecognized arguments: --socket" in done.stderr
