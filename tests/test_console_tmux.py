"""`alienec2 tui` in a real terminal (tmux) against a real core: what an admin over SSH sees at
80x24 and 120x40, its keys, and a clean exit on SIGTERM, SIGHUP and SIGINT with the terminal
given back (alternate screen off, cursor on, mouse off)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.clouds.sandbox import MotoEC2Server
from core.daemon import Core
from tests.conftest import core_config, running_core, wait_for_vms

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


class Terminal:
    """One tmux session on a private server of its own, running one command."""

    started = 0

    def __init__(self) -> None:
        Terminal.started += 1
        self.server = f"alienec2-test-{os.getpid()}-{Terminal.started}"
        self.screen = ""

    async def tmux(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "tmux",
            "-L",
            self.server,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        return out.decode()

    async def start(self, command: str, width: int, height: int) -> None:
        # The pane's shell outlives the console, so the terminal's modes can be read after it
        # exits (tmux hides the cursor of a dead pane). The console is sized by the pane, not
        # by a COLUMNS/LINES this test process may carry (env execs: same pid).
        shell = f"env -u COLUMNS -u LINES {command}; echo console-exited=$?; exec sleep 600"
        await self.tmux(
            *("new-session", "-d", "-s", "console", "-x", str(width), "-y", str(height)),
            f"sh -c '{shell}'",
        )
        assert await self.show("window_width") == str(width)
        assert await self.show("window_height") == str(height)

    async def console_pid(self) -> int:
        shell = int(await self.show("pane_pid"))
        deadline = time.monotonic() + 20
        while not (children := Path(f"/proc/{shell}/task/{shell}/children").read_text().split()):
            if time.monotonic() > deadline:
                raise AssertionError("the console never started")
            await asyncio.sleep(0.05)
        [pid] = children
        return int(pid)

    async def show(self, name: str) -> str:
        return (await self.tmux("display", "-p", "-t", "console", f"#{{{name}}}")).strip()

    async def capture(self) -> str:
        self.screen = await self.tmux("capture-pane", "-t", "console", "-p")
        return self.screen

    async def wait_for(self, *texts: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = await self.capture()
            if all(text in screen for text in texts):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{texts!r} never all appeared; screen:\n{screen}")
            await asyncio.sleep(0.05)

    async def wait_gone(self, *texts: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while (screen := await self.capture()) and any(text in screen for text in texts):
            if time.monotonic() > deadline:
                raise AssertionError(f"{texts!r} never went; screen:\n{self.screen}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float = 20) -> str:
        """The console's exit status, once it has exited."""
        screen = await self.wait_for("console-exited=", timeout=timeout)
        return screen.split("console-exited=")[1].split()[0]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(child) for child in children]
        frontier += [int(child) for child in children]
    return found


@pytest.fixture
async def terminal() -> AsyncIterator[Terminal]:
    term = Terminal()
    try:
        yield term
    finally:
        shell = await term.show("pane_pid")
        left = descendants(int(shell)) if shell.isdigit() else []
        await term.tmux("kill-server")
        for pid in left:  # a console that outlived its terminal must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def core(tmp_path: Path, moto: MotoEC2Server) -> AsyncIterator[Core]:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as core:
        await wait_for_vms(core, 1)
        yield core


def tui(core: Core, *extra: str) -> str:
    return f"{sys.executable} -m core.cli tui --socket {core.admin_socket} {' '.join(extra)}"


def footer_line(screen: str) -> str:
    return [line for line in screen.splitlines() if line.strip()][-1]


def lines_with(screen: str, text: str) -> list[str]:
    return [line for line in screen.splitlines() if text in line]


async def test_at_80x24_header_footer_and_vm_columns_fit(core: Core, terminal: Terminal) -> None:
    [vm] = core.store.vms()
    await terminal.start(tui(core), 80, 24)
    screen = await terminal.wait_for(vm.id, "min 1 max 10", "jobs  queued", "q quit")
    lines = screen.splitlines()
    assert "min 1 max 10" in lines[0] and lines[1].lstrip().startswith("jobs")
    footer = footer_line(screen)
    assert "? help" in footer and "q quit" in footer
    [columns] = lines_with(screen, " state ")
    assert all(f" {name} " in f"{columns} " for name in ("id", "state", "job", "idle"))
    assert "submitted" not in screen  # the job-flow panel gave way first
    await terminal.tmux("send-keys", "-t", "console", "q")
    assert await terminal.wait_exit() == "0"


async def test_at_120x40_every_vm_column_is_whole_and_the_flow_has_a_time_axis(
    core: Core, terminal: Terminal
) -> None:
    [vm] = core.store.vms()
    await terminal.start(tui(core), 120, 40)
    screen = await terminal.wait_for(vm.id, "pool default min 1 max 10", "-60m", "q quit")
    [columns] = lines_with(screen, " heartbeat ")
    names = ("id", "state", "job", "idle", "cloud", "uptime", "heartbeat", "address")
    assert all(f" {name} " in columns for name in names)
    address = core.store.vm(vm.id).address
    if address:  # set once the cloud reports the instance running
        screen = await terminal.wait_for(address)
    [row] = [line for line in lines_with(screen, vm.id) if line.startswith(f"│ {vm.id}")]
    assert f" {vm.cloud} " in row and (address is None or f" {address} " in row)
    sparklines = lines_with(screen, "/m")
    for flow in ("submitted", "started", "finished", "failed"):
        assert len([line for line in sparklines if f"│{flow} " in line]) == 1
    [axis] = lines_with(screen, "-60m")
    assert "-30m" in axis and axis.index("-60m") < axis.index("-30m") < axis.index("now")
    footer = footer_line(screen)
    assert "? help" in footer and "q quit" in footer
    # Whole keys only: "p pause" does not fit, and no stray "p" stands before the palette key.
    before_palette = footer.split("^p palette")[0].rstrip(" ▏│|")
    assert before_palette.endswith("r resize"), footer


async def test_keys_in_a_real_terminal_help_escape_jobs_view_and_q(
    core: Core, terminal: Terminal
) -> None:
    [vm] = core.store.vms()
    await terminal.start(tui(core), 120, 40)
    await terminal.wait_for(vm.id, "pool default min 1 max 10")
    await terminal.tmux("send-keys", "-t", "console", "d")  # the question is whole, wrapped
    screen = await terminal.wait_for(f"Drain VM {vm.id}?", "Cancel (n, esc)")
    assert lines_with(screen, " ends. "), screen  # its last word, wrapped onto a line of its own
    await terminal.tmux("send-keys", "-t", "console", "Escape")
    await terminal.wait_gone("Cancel (n, esc)")
    assert core.store.vm(vm.id).state != "draining"
    await terminal.tmux("send-keys", "-t", "console", "?")
    await terminal.wait_for("alienec2 console — keys", "^k", "esc", "tab")
    await terminal.tmux("send-keys", "-t", "console", "Escape")
    await terminal.wait_gone("alienec2 console — keys")  # a key right after Escape reads as Alt
    await terminal.tmux("send-keys", "-t", "console", "2")
    await terminal.wait_for("jobs (0)", "attempts")
    await terminal.tmux("send-keys", "-t", "console", "q")
    assert await terminal.wait_exit() == "0"
    assert await terminal.show("alternate_on") == "0"


async def test_readonly_flag_hides_mutating_keys_from_the_footer(
    core: Core, terminal: Terminal
) -> None:
    [vm] = core.store.vms()
    await terminal.start(tui(core, "--readonly"), 160, 40)
    screen = await terminal.wait_for(vm.id, "READ-ONLY", "q quit")
    footer = footer_line(screen)
    assert "? help" in footer and "kill" not in footer and "drain" not in footer


async def test_keys_typed_in_one_burst_after_slash_all_go_to_the_filter(
    core: Core, terminal: Terminal
) -> None:
    """One write, as a fast typist or a paste: focus moved only after the keys already
    queued, so `/abcp` paused scaling and `/hi from` opened the resize dialog."""
    [vm] = core.store.vms()
    await terminal.start(tui(core), 120, 40)
    await terminal.wait_for(vm.id, "pool default min 1 max 10")
    await terminal.tmux("send-keys", "-t", "console", "-l", "/abcpr")
    screen = await terminal.wait_for("abcpr", "VMs (0 of 1)")
    assert "PAUSED" not in screen and "Resize the pool" not in screen
    await terminal.tmux("send-keys", "-t", "console", "Escape")
    await terminal.wait_for("VMs (1)")
    assert core.store.setting("paused", False) is False
    # The resize dialog: Tab moves to max (its text selected), BSpace clears it, 2 types.
    await terminal.tmux("send-keys", "-t", "console", "r")
    await terminal.wait_for("Resize the pool")
    await terminal.tmux("send-keys", "-t", "console", "Tab", "BSpace", "2", "Enter")
    await terminal.wait_for("min 1 max 2")
    assert (core.engine.settings().min_vms, core.engine.settings().max_vms) == (1, 2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=str)
async def test_a_signal_ends_the_console_and_gives_the_terminal_back(
    core: Core, terminal: Terminal, signum: signal.Signals
) -> None:
    [vm] = core.store.vms()
    await terminal.start(tui(core), 120, 40)
    await terminal.wait_for(vm.id)
    pid = await terminal.console_pid()
    assert "core.cli" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert await terminal.show("alternate_on") == "1"
    os.kill(pid, signum)
    assert await terminal.wait_exit() == "0"
    assert not Path(f"/proc/{pid}").exists()
    assert await terminal.show("alternate_on") == "0"
    assert await terminal.show("cursor_flag") == "1"
    assert await terminal.show("mouse_any_flag") == "0"
