"""The alienec2 console: live pool operation over SSH, keyboard first.

The app composes widgets and turns keys into admin API calls; everything it shows comes from
the core through ``AdminClient``. It holds no state the core does not have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input

from alienec2_tui.client import AdminClient, AdminError, CoreUnreachable
from alienec2_tui.screens.dialogs import ConfirmDialog, ResizeDialog, SubmitDialog
from alienec2_tui.screens.help import HelpScreen
from alienec2_tui.screens.vm_details import VMDetails
from alienec2_tui.widgets.job_flow import JobFlow
from alienec2_tui.widgets.log_panel import LogPanel
from alienec2_tui.widgets.pool_header import PoolHeader
from alienec2_tui.widgets.vm_table import VMTable

if TYPE_CHECKING:
    from core.demo import Demo

ACTIONS: list[tuple[str, str, str, str]] = [
    # key, action, short description (footer), long description (help, palette)
    ("plus", "grow", "max+1", "Grow the pool's max by one"),
    ("minus", "shrink", "max-1", "Shrink the pool's max by one"),
    ("r", "resize", "resize", "Resize the pool: set min and max"),
    ("d", "drain", "drain", "Drain the selected VM (finish its job, then terminate)"),
    ("D", "drain_all", "drain all", "Drain every VM"),
    ("k", "kill", "kill", "Kill the selected VM now (its job is requeued)"),
    ("p", "pause", "pause", "Pause or resume scaling"),
    ("s", "submit", "submit", "Submit a job"),
    ("slash", "filter", "filter", "Filter the VM table"),
    ("o", "sort", "sort", "Cycle the VM table's sort column"),
    ("enter", "details", "details", "Details of the selected VM: events and job output"),
    ("l", "logs", "logs", "Focus the event log"),
    ("question_mark", "help", "help", "Show all keys"),
    ("q", "quit", "quit", "Quit the console"),
]


class ConsoleApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "alienec2"
    BINDINGS = [
        Binding(key, action, short, key_display=display)
        for (key, action, short, _), display in zip(
            ACTIONS,
            ["+", "-", "r", "d", "D", "k", "p", "s", "/", "o", "⏎", "l", "?", "q"],
            strict=True,
        )
        if action != "details"  # enter belongs to the table (RowSelected)
    ]

    def __init__(self, client: AdminClient, refresh_s: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.refresh_s = refresh_s
        self.status: dict[str, Any] | None = None
        self.now = 0.0
        self.last_seq = 0
        self.connected = False

    def compose(self) -> ComposeResult:
        yield PoolHeader(id="header")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield VMTable(id="vms")
                yield Input(placeholder="filter VMs (enter to apply, esc to clear)", id="filter")
            yield JobFlow(id="flow")
        yield LogPanel(id="log")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one(VMTable).focus()
        self.poll()
        self.follow_events()

    # ---- data from the core -----------------------------------------------------------

    def _set_connection(self, text: str) -> None:
        self.connected = text == "connected"
        self.query_one(PoolHeader).connection = text

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """Status, VMs and recent jobs every ``refresh_s``; shows and survives a dead core."""
        backoff = self.refresh_s
        while True:
            try:
                status = await self.client.status()
                vms = await self.client.vms()
                jobs = await self.client.jobs(limit=50)
            except CoreUnreachable:
                self._set_connection(f"disconnected — retrying every {backoff:.0f}s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            except AdminError as exc:
                self._set_connection(f"core error: {exc.message}")
                await asyncio.sleep(backoff)
                continue
            backoff = self.refresh_s
            self.status, self.now = status, status["now"]
            self._set_connection("connected")
            self.query_one(PoolHeader).status = status
            self.query_one(VMTable).show(vms["vms"], vms["now"])
            flow = self.query_one(JobFlow)
            flow.show_jobs(jobs["jobs"], jobs["now"])
            flow.refresh_flow(status["now"])
            await asyncio.sleep(self.refresh_s)

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        """Tail the event stream, resuming after the last sequence seen (nothing is missed
        across a reconnect)."""
        try:
            status = await self.client.status()
            self.last_seq = max(status["last_seq"] - 500, 0)
        except (CoreUnreachable, AdminError):
            self.last_seq = 0
        while True:
            try:
                reply = await self.client.events(after=self.last_seq, wait=10)
            except (CoreUnreachable, AdminError):
                await asyncio.sleep(self.refresh_s)
                continue
            if reply["events"]:
                self.last_seq = reply["last_seq"]
                self.query_one(LogPanel).add_events(reply["events"])
                self.query_one(JobFlow).add_events(reply["events"])

    # ---- actions: each one API call, its outcome shown ---------------------------------

    async def _call(self, what: str, call: Any) -> Any:
        try:
            result = await call
        except AdminError as exc:
            self.notify(exc.message, title=f"{what} refused", severity="error")
            return None
        except CoreUnreachable as exc:
            self.notify(str(exc), title=f"{what} failed", severity="error")
            return None
        self.poll()  # show the effect now, not at the next refresh
        return result

    def _selected(self) -> dict[str, Any] | None:
        vm = self.query_one(VMTable).selected_vm()
        if vm is None:
            self.notify("no VM selected", severity="warning")
        return vm

    async def _resize(self, min_vms: int | None, max_vms: int | None) -> None:
        bounds = await self._call("resize", self.client.resize(min_vms, max_vms))
        if bounds:
            self.notify(f"pool min {bounds['min_vms']} max {bounds['max_vms']}")

    async def action_grow(self) -> None:
        if self.status:
            await self._resize(None, self.status["pool"]["max_vms"] + 1)

    async def action_shrink(self) -> None:
        if self.status:
            await self._resize(None, self.status["pool"]["max_vms"] - 1)

    def action_resize(self) -> None:
        if not self.status:
            return
        pool = self.status["pool"]

        async def chosen(bounds: tuple[int, int] | None) -> None:
            if bounds is not None:
                await self._resize(*bounds)

        self.push_screen(ResizeDialog(pool["min_vms"], pool["max_vms"]), chosen)

    async def action_drain(self) -> None:
        vm = self._selected()
        if vm and await self._call("drain", self.client.drain(vm["id"])):
            self.notify(f"draining {vm['id']}")

    def action_drain_all(self) -> None:
        async def confirmed(yes: bool | None) -> None:
            if yes:
                reply = await self._call("drain all", self.client.drain_all())
                if reply is not None:
                    self.notify(f"draining {len(reply['drained'])} VMs")

        self.push_screen(ConfirmDialog("Drain every VM?", "Drain all"), confirmed)

    def action_kill(self) -> None:
        vm = self._selected()
        if vm is None:
            return
        job = f" Its job {vm['job_id']} goes back to the queue." if vm["job_id"] else ""

        async def confirmed(yes: bool | None) -> None:
            if yes and await self._call("kill", self.client.kill(vm["id"])):
                self.notify(f"terminating {vm['id']}")

        self.push_screen(ConfirmDialog(f"Kill VM {vm['id']} now?{job}", "Kill"), confirmed)

    async def action_pause(self) -> None:
        if self.status:
            paused = not self.status["pool"]["paused"]
            if await self._call("pause", self.client.pause(paused)):
                self.notify("scaling paused" if paused else "scaling resumed")

    def action_submit(self) -> None:
        async def chosen(argv: list[str] | None) -> None:
            if argv:
                job = await self._call("submit", self.client.submit(argv))
                if job:
                    self.notify(f"submitted job {job['id']}")

        self.push_screen(SubmitDialog(), chosen)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Submitted, "#filter")
    def apply_filter(self, event: Input.Submitted) -> None:
        table = self.query_one(VMTable)
        table.set_filter(event.value, self.now)
        if not event.value.strip():
            event.input.display = False
        table.focus()

    def on_key(self, event: Any) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            box.value = ""
            box.display = False
            table = self.query_one(VMTable)
            table.set_filter("", self.now)
            table.focus()

    def action_sort(self) -> None:
        column = self.query_one(VMTable).cycle_sort(self.now)
        self.notify(f"sorted by {column}", timeout=1.5)

    @on(DataTable.RowSelected, "#vms")
    async def action_details(self) -> None:
        vm = self._selected()
        if vm:
            details = await self._call("details", self.client.vm(vm["id"]))
            if details:
                self.push_screen(VMDetails(details))

    def action_logs(self) -> None:
        self.query_one(LogPanel).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen([b for b in self.BINDINGS if isinstance(b, Binding)]))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for _, action, _, description in ACTIONS:
            if action != "quit":
                yield SystemCommand(description, description, lambda a=action: self.run_action(a))


async def demo_console(demo: Demo) -> None:
    """The console of `alienec2 demo`; quitting it stops the whole demo."""
    async with AdminClient(socket_path=str(demo.core.admin_socket)) as client:
        await ConsoleApp(client).run_async()
