"""The console (Textual Pilot) against a real core: moto's EC2, uvicorn on a unix socket,
real agent processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input
from textual.widgets._footer import FooterKey

from alienec2_tui.app import ConsoleApp
from alienec2_tui.client import AdminClient
from alienec2_tui.screens.dialogs import ConfirmDialog, ResizeDialog, SubmitDialog
from alienec2_tui.screens.help import HelpScreen
from alienec2_tui.screens.job_details import JobDetails
from alienec2_tui.screens.vm_details import VMDetails
from alienec2_tui.widgets.footer import PALETTE, FittedFooter, key_width
from alienec2_tui.widgets.job_flow import JobFlow
from alienec2_tui.widgets.job_table import JobTable
from alienec2_tui.widgets.log_panel import LogPanel
from alienec2_tui.widgets.pool_header import PoolHeader
from alienec2_tui.widgets.vm_table import VMTable
from core.clouds.sandbox import MotoEC2Server
from core.model import VMState
from core.store import Store
from tests.conftest import core_config, eventually, running_core

ROOT = Path(__file__).resolve().parent.parent
SIZE = (120, 40)


def header_text(app: ConsoleApp) -> str:
    return app.query_one(PoolHeader).render().plain


def shown_ids(app: ConsoleApp) -> set[str]:
    return set(app.query_one(VMTable).shown_keys())


async def select(app: ConsoleApp, vm_id: str) -> None:
    table = app.query_one(VMTable)
    table.move_cursor(row=table.get_row_index(vm_id))
    table.focus()


def untouched(core: Any, *vm_ids: str) -> bool:
    """No kill or drain reached the core for these VMs."""
    for vm_id in vm_ids:
        vm = core.store.vm(vm_id)
        if vm.kill_requested or vm.state != VMState.IDLE:
            return False
        if any(e.kind == "vm_draining" for e in core.store.events_for_vm(vm_id)):
            return False
    return True


def notified(app: ConsoleApp, text: str) -> bool:
    return any(text in str(n.message) for n in app._notifications)


def footer_actions(app: ConsoleApp) -> set[str]:
    return {b.binding.action for b in app.screen.active_bindings.values() if b.binding.show}


def help_rows(app: ConsoleApp) -> list[tuple[str, str, str]]:
    table = app.screen.query_one("DataTable")
    return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


@pytest.fixture
async def console(console_core: Any) -> Any:
    """A console on the two-VM core, its table showing both VMs."""
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=SIZE) as pilot:
            await eventually(lambda: len(shown_ids(app)) == 2)
            yield app, pilot, console_core, client


async def test_table_shows_the_vms_the_api_reports(console_core: Any) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=(120, 40)):
            api_ids = {vm["id"] for vm in (await client.vms())["vms"]}
            await eventually(lambda: shown_ids(app) == api_ids)
            assert len(api_ids) == 2
            await eventually(lambda: "idle 2" in header_text(app))
            assert "pool default min 2 max 10" in header_text(app)


async def test_r_changes_min_and_max_and_plus_minus_step_max(console_core: Any) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
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
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
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


async def test_disconnected_state_appears_when_the_core_stops_and_clears_when_it_returns(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url)
    async with AdminClient(socket_path=config.admin.socket) as client:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=(120, 40)):
            async with running_core(config) as core:
                await eventually(lambda: app.connected)
                seq_before = core.store.last_seq()
            await eventually(lambda: "disconnected — retrying" in header_text(app))
            assert app.query_one(PoolHeader).connection.endswith(f": unix:{config.admin.socket}")
            assert not app.connected
            async with running_core(config) as core:
                await client.submit(["echo", "after the restart"])
                await eventually(lambda: app.connected, timeout=20)
                assert "disconnected" not in header_text(app)
                await eventually(lambda: app.last_seq > seq_before, timeout=20)


# ---- keys: move like vim, act only after asking -------------------------------------------


async def test_k_then_enter_moves_up_and_opens_details_killing_nothing(console: Any) -> None:
    app, pilot, core, _ = console
    first, second = sorted(shown_ids(app))
    await select(app, second)
    await pilot.press("k", "enter")
    await eventually(lambda: isinstance(app.screen, VMDetails))
    assert app.screen.vm_id == first
    assert untouched(core, first, second)


async def test_ctrl_k_then_enter_cancels_because_cancel_has_the_focus(console: Any) -> None:
    app, pilot, core, _ = console
    victim = sorted(shown_ids(app))[0]
    await select(app, victim)
    await pilot.press("ctrl+k")
    await eventually(lambda: isinstance(app.screen, ConfirmDialog))
    assert app.screen.focused is not None and app.screen.focused.id == "cancel"
    await pilot.press("enter")
    await eventually(lambda: not isinstance(app.screen, ConfirmDialog))
    assert untouched(core, victim)


async def test_ctrl_k_then_n_or_escape_cancels(console: Any) -> None:
    app, pilot, core, _ = console
    victim = sorted(shown_ids(app))[0]
    await select(app, victim)
    for key in ("n", "escape"):
        await pilot.press("ctrl+k")
        await eventually(lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.press(key)
        await eventually(lambda: not isinstance(app.screen, ConfirmDialog))
    assert untouched(core, victim)


async def test_ctrl_k_then_y_kills_the_selected_vm(console: Any) -> None:
    app, pilot, core, client = console
    victim = sorted(shown_ids(app))[0]
    await select(app, victim)
    await pilot.press("ctrl+k")
    await eventually(lambda: isinstance(app.screen, ConfirmDialog))
    assert victim in str(app.screen.query_one("#question").render())
    await pilot.press("y")
    await eventually(lambda: core.store.vm(victim).state == VMState.TERMINATED, timeout=15)
    states = {vm["id"]: vm["state"] for vm in (await client.vms("terminated"))["vms"]}
    assert states.get(victim) == "terminated"


async def test_a_kill_question_closes_itself_when_its_vm_ends_meanwhile(console: Any) -> None:
    app, pilot, core, client = console
    victim, other = sorted(shown_ids(app))
    await select(app, victim)
    await pilot.press("ctrl+k")
    await eventually(lambda: isinstance(app.screen, ConfirmDialog))
    await client.kill(victim)  # another admin was quicker
    await eventually(lambda: not isinstance(app.screen, ConfirmDialog), timeout=15)
    await eventually(lambda: notified(app, f"{victim} is terminat"))
    assert untouched(core, other)


async def test_d_asks_then_y_drains_the_selected_vm(console: Any) -> None:
    app, pilot, core, client = console
    await client.pause(True)  # keep the drained VM's replacement out of the picture
    keep, target = sorted(shown_ids(app))
    await select(app, target)
    await pilot.press("d")
    await eventually(lambda: isinstance(app.screen, ConfirmDialog))
    assert app.screen.focused is not None and app.screen.focused.id == "cancel"
    await pilot.press("y")
    await eventually(lambda: core.store.vm(target).state in (VMState.DRAINING, VMState.TERMINATED))
    drained = [e for e in core.store.events_for_vm(target) if e.kind == "vm_draining"]
    assert drained and drained[0].message == "drain requested"
    assert untouched(core, keep)


async def test_shift_d_asks_with_cancel_focused_and_y_drains_every_vm(console: Any) -> None:
    app, pilot, core, client = console
    await client.pause(True)
    vm_ids = sorted(shown_ids(app))
    await pilot.press("D")
    await eventually(lambda: isinstance(app.screen, ConfirmDialog))
    await pilot.press("enter")  # the default is Cancel
    await eventually(lambda: not isinstance(app.screen, ConfirmDialog))
    assert untouched(core, *vm_ids)
    await pilot.press("D")
    await eventually(lambda: isinstance(app.screen, ConfirmDialog))
    await pilot.press("y")
    await eventually(
        lambda: all(
            core.store.vm(v).state in (VMState.DRAINING, VMState.TERMINATING, VMState.TERMINATED)
            for v in vm_ids
        )
    )


async def test_j_k_g_and_shift_g_move_the_cursor(console: Any) -> None:
    app, pilot, _, _ = console
    table = app.query_one(VMTable)
    first, second = sorted(shown_ids(app))
    await select(app, first)
    await pilot.press("j")
    assert table.selected_key() == second
    await pilot.press("k")
    assert table.selected_key() == first
    await pilot.press("G")
    assert table.selected_key() == second
    await pilot.press("g")
    assert table.selected_key() == first
    await pilot.press("down")
    assert table.selected_key() == second
    await pilot.press("up")
    assert table.selected_key() == first


@pytest.mark.parametrize("key", ["q", "ctrl+c"])
async def test_q_and_ctrl_c_quit(console: Any, key: str) -> None:
    app, pilot, _, _ = console
    await pilot.press(key)
    await eventually(lambda: app.return_code == 0)


async def test_slash_filters_as_you_type_enter_keeps_it_escape_clears(console: Any) -> None:
    app, pilot, _, _ = console
    keep = sorted(shown_ids(app))[0]
    await pilot.press("slash", *keep[-6:])
    await eventually(lambda: shown_ids(app) == {keep})  # no enter needed
    await pilot.press("enter")
    assert app.focused is app.query_one(VMTable)
    refreshes = app.query_one(VMTable).now
    await eventually(lambda: app.query_one(VMTable).now > refreshes)
    assert shown_ids(app) == {keep}  # a refresh later the filter still holds
    await pilot.press("escape")  # from the table: clears the applied filter
    await eventually(lambda: len(shown_ids(app)) == 2)
    await pilot.press("slash", "x", "escape")  # from the box: clears and closes it
    assert len(shown_ids(app)) == 2 and not app.query_one("#filter").display


async def test_a_slash_typed_into_a_field_is_a_character_not_the_filter(console: Any) -> None:
    """`/` moves to the filter at once (a priority key, for keys typed in one burst), but not
    from a field: a job's command has paths in it."""
    app, pilot, core, _ = console
    await pilot.press("s")
    await eventually(lambda: isinstance(app.screen, SubmitDialog))
    await pilot.press(*"ls /tmp", "enter")
    await eventually(lambda: len(core.store.jobs()) == 1)
    [job] = core.store.jobs()
    assert job.command == ["ls", "/tmp"]
    assert not app.query_one("#filter", Input).display
    await pilot.press("slash", *"i-")
    assert app.query_one("#filter", Input).value == "i-"
    await pilot.press("escape", "ctrl+p")  # the palette lists the filter while its field types
    await eventually(lambda: app.screen is not app.screen_stack[0])
    titles = {c.title for c in app.get_system_commands(app.screen)}
    assert "Filter the table as you type (esc clears)" in titles


async def test_o_cycles_the_sort_and_the_cursor_stays_on_its_vm(console: Any) -> None:
    app, pilot, _, _ = console
    table = app.query_one(VMTable)
    chosen = sorted(shown_ids(app))[1]
    await select(app, chosen)
    for _ in range(len(table.SORTS)):
        await pilot.press("o")
        assert table.selected_key() == chosen
    assert table.sort_column == "id"


async def test_help_lists_every_key_and_marks_the_ones_acting_on_the_row(console: Any) -> None:
    app, pilot, _, _ = console
    await pilot.press("question_mark")
    await eventually(lambda: isinstance(app.screen, HelpScreen))
    rows = {keys: row for keys, _, row in help_rows(app)}
    for keys in ("?", "q", "^c", "/", "1", "2", "o", "^k", "d", "D", "+", "-", "r", "p", "s"):
        assert keys in rows
    for keys in ("⏎", "esc", "tab", "j ↓", "k ↑", "g home", "G end", "end"):
        assert keys in rows
    assert rows["^k"] == rows["d"] == rows["⏎"] == "row"
    assert rows["D"] == rows["q"] == ""
    await pilot.press("escape")
    await eventually(lambda: not isinstance(app.screen, HelpScreen))


def footer_fits(app: ConsoleApp) -> bool:
    """The footer shows its keys in order, each whole and left of the palette key, and the
    first key it leaves out would not have fitted."""
    footer = app.query_one(FittedFooter)
    keys = list(footer.query(FooterKey))
    palette = [k for k in keys if k.has_class(PALETTE)]
    shown = [k for k in keys if k not in palette]
    if len(palette) != 1 or not shown or footer.size.width != app.size.width:
        return False
    edge = palette[0].region.x
    if any(k.region.right > edge or k.region.width + 1 != key_width(k) for k in shown):
        return False
    wanted: dict[str, int] = {}  # action -> its footer width, in the footer's order
    for _, binding, _, _ in app.screen.active_bindings.values():
        if binding.show and binding.action != "command_palette":
            display = app.get_key_display(binding)
            wanted.setdefault(binding.action, len(display) + len(binding.description) + 2)
    if [k.action for k in shown] != list(wanted)[: len(shown)]:
        return False
    left_out = list(wanted.values())[len(shown) :]
    return not left_out or left_out[0] > edge - shown[-1].region.right


async def test_the_footer_shows_whole_keys_only_at_any_width(tmp_path: Path) -> None:
    """Textual's footer drew the palette key over the keys past the edge: a stray letter."""
    async with AdminClient(socket_path=str(tmp_path / "no-core.sock")) as client:
        app = ConsoleApp(client, refresh_s=5, catch_signals=False)
        async with app.run_test(size=(120, 40)) as pilot:
            counts = {}
            for width in (120, 80, 97, 160, 120):
                await pilot.resize_terminal(width, 40)
                await eventually(lambda: footer_fits(app))
                counts[width] = len(app.query_one(FittedFooter).query(FooterKey))
            assert counts[80] < counts[120] < counts[160]
            # The palette names each command once, and its key beneath.
            commands = list(app.get_system_commands(app.screen))
            assert len({c.title for c in commands}) == len(commands)
            assert not [c for c in commands if c.help == c.title]
            [kill] = [c for c in commands if c.title.startswith("Kill the selected VM")]
            assert kill.help == "key: ^k"


async def test_resize_dialog_keeps_its_input_and_shows_the_cores_refusal(console: Any) -> None:
    app, pilot, core, _ = console
    await eventually(lambda: app.status is not None)
    await pilot.press("r")
    await eventually(lambda: isinstance(app.screen, ResizeDialog))
    dialog = app.screen
    dialog.query_one("#min").value = "5"
    dialog.query_one("#max").value = "3"
    await pilot.click("#ok")
    problem = dialog.query_one("#problem")
    await eventually(lambda: "max must be >= min (got max 3 < min 5)" in str(problem.render()))
    assert app.screen is dialog
    assert (dialog.query_one("#min").value, dialog.query_one("#max").value) == ("5", "3")
    assert core.engine.settings().max_vms == 10
    dialog.query_one("#max").value = "7"
    dialog.query_one("#max").focus()
    await pilot.press("enter")  # from the keyboard this time
    await eventually(lambda: core.engine.settings().max_vms == 7)
    await eventually(lambda: not isinstance(app.screen, ResizeDialog))
    # Past what the clouds allow together: kept, and the console says where the pool stops.
    capacity = sum(c.max_instances for c in core.config.clouds)
    await pilot.press("r")
    await eventually(lambda: isinstance(app.screen, ResizeDialog))
    app.screen.query_one("#max").value = str(capacity + 1)
    await pilot.click("#ok")
    await eventually(lambda: core.engine.settings().max_vms == capacity + 1)
    await eventually(
        lambda: notified(app, f"max_vms {capacity + 1} will not be reached: the clouds'")
    )


# ---- read-only ----------------------------------------------------------------------------

MUTATING_ACTIONS = {"kill", "drain", "drain_all", "grow", "shrink", "resize", "pause", "submit"}


async def test_readonly_console_hides_and_refuses_every_mutating_key(console_core: Any) -> None:
    core = console_core
    async with AdminClient(socket_path=str(core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2, readonly=True, catch_signals=False)
        async with app.run_test(size=SIZE) as pilot:
            await eventually(lambda: len(shown_ids(app)) == 2)
            assert "READ-ONLY" in header_text(app)
            assert not footer_actions(app) & MUTATING_ACTIONS
            assert {"help", "quit", "filter"} <= footer_actions(app)
            palette = {c.title for c in app.get_system_commands(app.screen)}
            assert not any("Kill" in t or "Drain" in t or "Resize" in t for t in palette)
            victim = sorted(shown_ids(app))[0]
            await select(app, victim)
            await pilot.press("ctrl+k", "d", "D", "plus", "minus", "r", "p", "s")
            await eventually(lambda: notified(app, "read-only"))
            assert app.screen is app.screen_stack[0]  # no dialog opened
            assert untouched(core, *shown_ids(app))
            assert core.engine.settings().max_vms == 10 and not core.engine.settings().paused
            await pilot.press("question_mark")
            await eventually(lambda: isinstance(app.screen, HelpScreen))
            keys = {row[0] for row in help_rows(app)}
            assert "^k" not in keys and "D" not in keys and "+" not in keys
            assert "?" in keys and "⏎" in keys


class ReadOnlyToken(AdminClient):
    """The core's answer for the read-only admin token, until the core serves ``access``."""

    async def status(self) -> dict[str, Any]:
        return {**await super().status(), "access": "readonly"}


async def test_console_turns_readonly_when_the_core_says_access_is_readonly(
    console_core: Any,
) -> None:
    async with ReadOnlyToken(socket_path=str(console_core.admin_socket)) as client:
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=SIZE):
            await eventually(lambda: app.readonly)
            await eventually(lambda: not footer_actions(app) & MUTATING_ACTIONS)


# ---- jobs view, live details, stable cursors, the following log ---------------------------


async def test_jobs_view_lists_jobs_and_enter_opens_a_job_that_updates_live(
    console: Any,
) -> None:
    app, pilot, _, client = console
    job = await client.submit(["sh", "-c", "sleep 1; echo hello-from-job"], env={"SECRET": "x"})
    await pilot.press("2")
    jobs = app.query_one(JobTable)
    await eventually(lambda: str(job["id"]) in set(jobs.shown_keys()))
    assert app.focused is jobs and not app.query_one(VMTable).display
    jobs.move_cursor(row=jobs.get_row_index(str(job["id"])))
    await pilot.press("enter")
    await eventually(lambda: isinstance(app.screen, JobDetails))
    screen = app.screen
    output = screen.query_one("#output-tail")
    await eventually(lambda: "hello-from-job" in str(output.render()), timeout=20)
    # One argument with spaces stays one on the screen, as the shell line that runs it.
    command = str(screen.query_one("#job-command").render())
    assert command == "$ sh -c 'sleep 1; echo hello-from-job'"
    await eventually(lambda: bool(jobs.records[str(job["id"])]["finished_at"]))
    shown = jobs.row_for(jobs.records[str(job["id"])], jobs.now)
    assert shown[-1] == "sh -c 'sleep 1; echo hello-from-job'"
    # It slept a second: a finished job's run time is exact, not in 5 s steps ("0s").
    assert shown[jobs.COLUMNS.index("run")] not in ("0s", "-")
    facts = str(screen.query_one("#job-facts").render())
    assert "env names: SECRET" in facts and "x" not in facts.split("env names:")[1]
    assert "attempt 1 of 3" in facts and "exit code 0" in facts
    assert "done" in str(screen.query_one("#job-state").render())
    await pilot.press("escape", "1")
    assert app.query_one(VMTable).display and app.focused is app.query_one(VMTable)


async def test_vm_details_follow_the_vm_as_it_takes_a_job(console: Any) -> None:
    app, pilot, _, client = console
    await client.pause(True)
    await pilot.press("enter")
    await eventually(lambda: isinstance(app.screen, VMDetails))
    screen = app.screen
    await eventually(lambda: screen.updates > 0)
    assert "no current job" in str(screen.query_one("#job-line").render())
    await client.submit(["sh", "-c", "echo one; echo two"])
    await client.submit(["sh", "-c", "echo one; echo two"])  # one for each VM
    await eventually(lambda: "job " in str(screen.query_one("#job-line").render()), timeout=20)


async def test_jobs_cursor_stays_on_its_job_when_newer_jobs_arrive(console: Any) -> None:
    app, pilot, _, client = console
    await client.pause(True)
    first = await client.submit(["true"])
    second = await client.submit(["true"])
    await pilot.press("2")
    jobs = app.query_one(JobTable)
    await eventually(lambda: jobs.row_count >= 2)
    jobs.move_cursor(row=jobs.get_row_index(str(first["id"])))
    assert jobs.get_row_index(str(first["id"])) == 1  # newest first
    third = await client.submit(["true"])
    await eventually(lambda: str(third["id"]) in set(jobs.shown_keys()))
    assert jobs.selected_key() == str(first["id"])
    assert jobs.get_row_index(str(second["id"])) == 1


async def test_log_follows_only_while_at_the_bottom_and_end_resumes(console: Any) -> None:
    app, pilot, _, client = console
    log = app.query_one(LogPanel)
    await client.pause(True)
    await client.submit_batch([{"command": ["true"]}] * 12)  # more lines than the log shows
    await eventually(lambda: log.max_scroll_y > 0)
    await pilot.press("l", "home")
    await eventually(lambda: log.scroll_y == 0 and not log.following)
    seq = app.last_seq
    await client.submit(["true"])
    await eventually(lambda: app.last_seq > seq)
    await pilot.pause()
    assert log.scroll_y == 0
    await pilot.press("end")
    await eventually(lambda: log.following)
    lines, seq = len(log.lines), app.last_seq
    await client.submit(["true"])
    await eventually(lambda: app.last_seq > seq and len(log.lines) > lines)
    await eventually(lambda: log.scroll_y == log.max_scroll_y > 0)


# ---- the job-flow panel -------------------------------------------------------------------


async def test_flow_endpoint_counts_job_events_per_minute_and_seeds_the_sparklines(
    console_core: Any,
) -> None:
    async with AdminClient(socket_path=str(console_core.admin_socket)) as client:
        await client.pause(True)
        for _ in range(3):
            await client.submit(["true"])
        flow = await client.flow(60)
        assert len(flow["minutes"]) == 60
        starts = [m["t"] for m in flow["minutes"]]
        assert starts == sorted(starts) and starts[-1] <= flow["now"] < starts[-1] + 60
        assert sum(m["submitted"] for m in flow["minutes"]) == 3
        assert 0 < flow["last_seq"] <= console_core.store.last_seq()
        app = ConsoleApp(client, refresh_s=0.2, catch_signals=False)
        async with app.run_test(size=SIZE):
            panel = app.query_one(JobFlow)
            await eventually(lambda: panel.seeded_seq >= flow["last_seq"])
            await eventually(lambda: sum(c["submitted"] for c in panel.minutes.values()) == 3)


FLOW = {"job_queued": "submitted", "job_running": "started", "job_done": "finished"}
FLOW["job_failed"] = "failed"


def job_flow(store: Store, since: float, last_seq: int) -> dict[float, dict[str, int]]:
    counts: dict[float, dict[str, int]] = {}
    for minute, kind, n in store.flow(since, tuple(FLOW), last_seq):
        counts.setdefault(minute * 60.0, dict.fromkeys(FLOW.values(), 0))[FLOW[kind]] += n
    return counts


def test_job_flow_counts_only_the_window_and_only_up_to_the_seq_given(store: Store) -> None:
    start = 1_800_000_000.0
    kinds = ["job_queued", "job_running", "job_done", "job_failed", "vm_idle"]
    for minute in range(180):  # three hours, one of each kind a minute
        for kind in kinds:
            store.record_event(start + minute * 60 + 5, kind, "x")
    last = store.last_seq()
    since = start + 150 * 60
    counts = job_flow(store, since, last)
    assert sorted(counts) == [start + m * 60 for m in range(150, 180)]
    assert all(
        c == {"submitted": 1, "started": 1, "finished": 1, "failed": 1} for c in counts.values()
    )
    store.record_event(start + 179 * 60 + 30, "job_queued", "after the cut")
    assert job_flow(store, since, last)[start + 179 * 60]["submitted"] == 1
    assert job_flow(store, since, store.last_seq())[start + 179 * 60]["submitted"] == 2
    assert job_flow(store, start + 10_000 * 60, store.last_seq()) == {}


async def test_header_shows_outdated_vms_spot_reclaims_resting_placements_and_the_cost() -> None:
    from textual.app import App, ComposeResult

    class HeaderOnly(App[None]):
        def compose(self) -> ComposeResult:
            yield PoolHeader()

    status = {
        "pool": {
            "name": "p",
            "min_vms": 0,
            "max_vms": 9,
            "paused": False,
            "vms": {"idle": 2, "interrupted": 1},
            "outdated": 3,
        },
        "queue": {"jobs": {"queued": 1}},
        "clouds": [
            {
                "name": "aws",
                "alive": 3,
                "max_instances": 9,
                "backoff_s": 0,
                "placements": [{"instance_type": "c5.xlarge", "backoff_s": 30}],
            }
        ],
        "cost_per_hour": {"total": 1.25, "max": 5.0},
    }
    app = HeaderOnly()
    async with app.run_test(size=(160, 10)):
        header = app.query_one(PoolHeader)
        header.connection = "connected"
        header.status = status
        text = header.render().plain
    assert "interrupted 1" in text and "outdated 3" in text
    assert "$1.25/5/h" in text
    assert "aws 3/9 1 type/subnet resting" in text
