"""The console (Textual Pilot) against a real core: moto's EC2, uvicorn on a unix socket,
real agent processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alienec2_tui.app import ConsoleApp
from alienec2_tui.client import AdminClient
from alienec2_tui.screens.dialogs import ConfirmDialog, ResizeDialog
from alienec2_tui.screens.help import HelpScreen
from alienec2_tui.widgets.pool_header import PoolHeader
from alienec2_tui.widgets.vm_table import VMTable
from core.clouds.sandbox import MotoEC2Server
from core.model import VMState
from tests.conftest import AgentProcess, core_config, eventually, running_core, wait_for_vms

ROOT = Path(__file__).resolve().parent.parent


def header_text(app: ConsoleApp) -> str:
    return app.query_one(PoolHeader).render().plain


def shown_ids(app: ConsoleApp) -> set[str]:
    table = app.query_one(VMTable)
    return {str(key.value) for key in table.rows}


async def select(app: ConsoleApp, vm_id: str) -> None:
    table = app.query_one(VMTable)
    table.move_cursor(row=table.get_row_index(vm_id))
    table.focus()


@pytest.fixture
async def console_core(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> Any:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as core:
        vm_ids = await wait_for_vms(core, 2)
        for vm_id in vm_ids:
            agents(vm_id)
        await eventually(lambda: all(core.store.vm(v).state == VMState.IDLE for v in vm_ids))
        yield core


async def test_table_shows_the_vms_the_api_reports(console_core: Any) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)):
            api_ids = {vm["id"] for vm in (await client.vms())["vms"]}
            await eventually(lambda: shown_ids(app) == api_ids)
            assert len(api_ids) == 2
            await eventually(lambda: "idle 2" in header_text(app))
            assert "pool default min 2 max 10" in header_text(app)


async def test_k_and_confirm_terminates_the_selected_vm(console_core: Any) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await eventually(lambda: len(shown_ids(app)) == 2)
            victim = sorted(shown_ids(app))[0]
            await select(app, victim)
            await pilot.press("k")
            await eventually(lambda: isinstance(app.screen, ConfirmDialog))
            assert victim in str(app.screen.query_one("#question").render())
            await pilot.press("y")
            await eventually(lambda: core.store.vm(victim).state == VMState.TERMINATED, timeout=15)
            states = {vm["id"]: vm["state"] for vm in (await client.vms("terminated"))["vms"]}
            assert states.get(victim) == "terminated"


async def test_d_drains_the_selected_vm(console_core: Any) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        await client.pause(True)  # keep the drained VM's replacement out of the picture
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await eventually(lambda: len(shown_ids(app)) == 2)
            target = sorted(shown_ids(app))[1]
            await select(app, target)
            await pilot.press("d")
            await eventually(
                lambda: core.store.vm(target).state in (VMState.DRAINING, VMState.TERMINATED)
            )
            drained = [e for e in core.store.events_for_vm(target) if e.kind == "vm_draining"]
            assert drained and drained[0].message == "drain requested"


async def test_r_changes_min_and_max_and_plus_minus_step_max(console_core: Any) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await eventually(lambda: app.status is not None)
            await pilot.press("r")
            await eventually(lambda: isinstance(app.screen, ResizeDialog))
            app.screen.query_one("#min").value = "1"
            app.screen.query_one("#max").value = "6"
            await pilot.click("#ok")
            await eventually(lambda: core.engine.settings().max_vms == 6)
            assert core.engine.settings().min_vms == 1
            await eventually(lambda: "min 1 max 6" in header_text(app))
            await pilot.press("plus")
            await eventually(lambda: core.engine.settings().max_vms == 7)
            await eventually(lambda: "min 1 max 7" in header_text(app))
            await pilot.press("minus", "minus")
            await eventually(lambda: core.engine.settings().max_vms == 5)


async def test_a_refused_action_shows_the_cores_message(console_core: Any) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        await client.resize(min_vms=2, max_vms=2)
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await eventually(lambda: app.status is not None and app.status["pool"]["max_vms"] == 2)
            await pilot.press("minus")
            await eventually(
                lambda: any(
                    "max must be >= min (got max 1 < min 2)" in n.message
                    for n in app._notifications
                )
            )
            assert console_core.engine.settings().max_vms == 2


async def test_slash_filters_the_table(console_core: Any) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await eventually(lambda: len(shown_ids(app)) == 2)
            keep = sorted(shown_ids(app))[0]
            await pilot.press("slash")
            await pilot.press(*keep[-6:], "enter")
            await eventually(lambda: shown_ids(app) == {keep})
            await pilot.pause(0.5)  # two refreshes later the filter still holds
            assert shown_ids(app) == {keep}
            await pilot.press("slash", "escape")
            await eventually(lambda: len(shown_ids(app)) == 2)


async def test_disconnected_state_appears_when_the_core_stops_and_clears_when_it_returns(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url)
    async with AdminClient(socket_path=config.admin.socket) as client:
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)):
            async with running_core(config) as core:
                await eventually(lambda: app.connected)
                seq_before = core.store.last_seq()
            await eventually(lambda: "disconnected — retrying" in header_text(app))
            assert not app.connected
            async with running_core(config) as core:
                await client.submit(["echo", "after the restart"])
                await eventually(lambda: app.connected, timeout=20)
                assert "disconnected" not in header_text(app)
                await eventually(lambda: app.last_seq > seq_before, timeout=20)


async def test_help_lists_every_key(console_core: Any) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("question_mark")
            await eventually(lambda: isinstance(app.screen, HelpScreen))
            table = app.screen.query_one("DataTable")
            keys = {str(table.get_row_at(i)[0]) for i in range(table.row_count)}
            assert keys >= {"+", "-", "r", "d", "D", "k", "p", "s", "/", "o", "l", "?", "q"}
            await pilot.press("escape")
            await eventually(lambda: not isinstance(app.screen, HelpScreen))


# ---- the console in a real terminal -------------------------------------------------------


async def tmux(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "tmux",
        "-L",
        f"alienec2-test-{os.getpid()}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return out.decode()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
async def test_console_in_tmux_shows_the_pool_and_answers_keys(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, pool={"min_vms": 1})
    async with running_core(config) as core:
        [vm_id] = await wait_for_vms(core, 1)
        command = f"{sys.executable} -m core.cli tui --socket {config.admin.socket}"
        await tmux("new-session", "-d", "-s", "console", "-x", "120", "-y", "40", command)
        try:
            screen = ""

            async def shows(text: str) -> bool:
                nonlocal screen
                screen = await tmux("capture-pane", "-t", "console", "-p")
                return text in screen

            async def wait_screen(text: str) -> None:
                for _ in range(300):
                    if await shows(text):
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"{text!r} never appeared; screen:\n{screen}")

            await wait_screen(vm_id)
            # The table and the header are refreshed by separate calls: either may paint first.
            await wait_screen("pool default min 1 max 10")
            await tmux("send-keys", "-t", "console", "?")
            await wait_screen("alienec2 console — keys")
            await tmux("send-keys", "-t", "console", "Escape")
            for _ in range(300):  # a key right after Escape would read as Alt+key
                if not await shows("alienec2 console — keys"):
                    break
                await asyncio.sleep(0.05)
            await tmux("send-keys", "-t", "console", "q")
            for _ in range(200):
                if "console" not in await tmux("list-sessions"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("q did not quit the console")
        finally:
            await tmux("kill-server")
