"""The alienec2 console: live pool operation over SSH, keyboard first.

The app composes widgets and turns keys into admin API calls; everything it shows comes from
the core through ``AdminClient``. It holds no state the core does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input

from alienec2_tui.client import AdminClient, AdminError, CoreUnreachable
from alienec2_tui.keys import APP_KEYS, MUTATING, ROW_ACTIONS, bindings
from alienec2_tui.screens.dialogs import ConfirmDialog, ResizeDialog, SubmitDialog
from alienec2_tui.screens.help import HelpScreen
from alienec2_tui.screens.job_details import JobDetails
from alienec2_tui.screens.vm_details import VMDetails
from alienec2_tui.widgets.job_flow import JobFlow
from alienec2_tui.widgets.job_table import JobTable
from alienec2_tui.widgets.keyed_table import KeyedTable
from alienec2_tui.widgets.log_panel import LogPanel
from alienec2_tui.widgets.pool_header import PoolHeader
from alienec2_tui.widgets.vm_table import VMTable

if TYPE_CHECKING:
    from core.demo import Demo

RECENT_JOBS = 50  # the job-flow panel's list, fetched on every refresh
JOBS_VIEW_LIMIT = 500  # the jobs view's, fetched instead while it is shown
BACKLOG_EVENTS = 500  # events shown in the log on attach
MUTATING_KEYS = frozenset(k for key in APP_KEYS if key.mutating for k in key.keys.split(","))
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class ConsoleApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "alienec2"
    BINDINGS: ClassVar[list[BindingType]] = bindings(APP_KEYS, priority=frozenset({"ctrl+c"}))
    # The job-flow panel gives way first: beside the tables when wide, below them when
    # narrow, gone when narrow and short (80x24).
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (150, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (34, "-tall")]

    def __init__(
        self,
        client: AdminClient,
        refresh_s: float = 1.0,
        readonly: bool = False,
        catch_signals: bool = True,
    ) -> None:
        super().__init__()
        self.client = client
        self.refresh_s = refresh_s
        self.readonly = readonly
        self.catch_signals = catch_signals
        self.status: dict[str, Any] | None = None
        self.now = 0.0
        self.last_seq = 0
        self.connected = False
        self.view = "vms"

    def compose(self) -> ComposeResult:
        yield PoolHeader(id="header")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield VMTable(id="vms")
                yield JobTable(id="jobs")
                yield Input(
                    placeholder="filter as you type · enter keeps · esc clears", id="filter"
                )
            yield JobFlow(id="flow")
        yield LogPanel(id="log")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one(JobTable).display = False
        self.query_one(PoolHeader).readonly = self.readonly
        self.query_one(VMTable).focus()
        if self.catch_signals:
            loop = asyncio.get_running_loop()
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self.exit)
        self.poll()
        self.follow_events()

    def on_unmount(self) -> None:
        if self.catch_signals:
            loop = asyncio.get_running_loop()
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)

    # ---- data from the core -----------------------------------------------------------

    def _set_connection(self, text: str) -> None:
        self.connected = text == "connected"
        self.query_one(PoolHeader).connection = text

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """Status, VMs and recent jobs every ``refresh_s``; shows and survives a dead core."""
        with contextlib.suppress(NoMatches):  # the app quit while a call was on its way
            await self._poll()

    async def _poll(self) -> None:
        backoff = self.refresh_s
        while True:
            jobs_view = self.view == "jobs"
            try:
                status = await self.client.status()
                vms = await self.client.vms()
                jobs = await self.client.jobs(limit=JOBS_VIEW_LIMIT if jobs_view else RECENT_JOBS)
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
            if status.get("access") == "readonly" and not self.readonly:
                self.set_readonly()
            self._set_connection("connected")
            self.query_one(PoolHeader).status = status
            table = self.query_one(VMTable)
            table.show(vms["vms"], vms["now"])
            if status.get("last_decision"):  # the latest scaling decision, with its numbers
                table.border_subtitle = f"why: {status['last_decision']}"
            if jobs_view:
                self.query_one(JobTable).show(jobs["jobs"], jobs["now"])
            flow = self.query_one(JobFlow)
            flow.query_one(JobTable).show(jobs["jobs"][:RECENT_JOBS], jobs["now"])
            flow.refresh_flow(status["now"])
            await asyncio.sleep(self.refresh_s)

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        """Tail the event stream, resuming after the last sequence seen (nothing is missed
        across a reconnect). The job-flow panel starts from the core's per-minute counts."""
        with contextlib.suppress(NoMatches):  # the app quit while a call was on its way
            await self._follow_events()

    async def _follow_events(self) -> None:
        try:
            flow = await self.client.flow(60)
            self.query_one(JobFlow).seed(flow)
            self.last_seq = max(flow["last_seq"] - BACKLOG_EVENTS, 0)
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
                panel = self.query_one(JobFlow)
                panel.add_events(reply["events"])
                if self.now:
                    panel.refresh_flow(self.now)

    # ---- which keys apply ---------------------------------------------------------------

    def set_readonly(self) -> None:
        """From now on no key, palette entry or footer item changes the pool."""
        self.readonly = True
        self.query_one(PoolHeader).readonly = True
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MUTATING and self.readonly:
            return False
        return self.view == "vms" or action not in ROW_ACTIONS

    def on_key(self, event: events.Key) -> None:
        if self.readonly and event.key in MUTATING_KEYS and not self._typing():
            event.stop()
            self.notify("this console is read-only", severity="warning")

    def _typing(self) -> bool:
        return isinstance(self.focused, Input)

    # ---- actions: each one API call, its outcome shown ---------------------------------

    async def _call(self, what: str, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except AdminError as exc:
            self.notify(exc.message, title=f"{what} refused", severity="error", markup=False)
            return None
        except CoreUnreachable as exc:
            self.notify(str(exc), title=f"{what} failed", severity="error", markup=False)
            return None
        self.poll()  # show the effect now, not at the next refresh
        return result

    def table(self) -> KeyedTable:
        """The table of the current view."""
        return self.query_one(VMTable) if self.view == "vms" else self.query_one(JobTable)

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

        async def apply(low: int, high: int) -> str | None:
            try:
                bounds = await self.client.resize(low, high)
            except AdminError as exc:
                return exc.message
            except CoreUnreachable as exc:
                return str(exc)
            self.notify(f"pool min {bounds['min_vms']} max {bounds['max_vms']}")
            self.poll()
            return None

        self.push_screen(ResizeDialog(pool["min_vms"], pool["max_vms"], apply))

    def action_drain(self) -> None:
        vm = self._selected()
        if vm is None:
            return

        async def confirmed(yes: bool | None) -> None:
            if yes and await self._call("drain", self.client.drain(vm["id"])):
                self.notify(f"draining {vm['id']}")

        question = f"Drain VM {vm['id']}? It finishes its job, takes no other, then ends."
        self.push_screen(ConfirmDialog(question, "Drain"), confirmed)

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

    # ---- views, filter, sort, details ---------------------------------------------------

    def _switch(self, view: str) -> None:
        if self.view != view:
            self.view = view
            self.query_one(VMTable).display = view == "vms"
            self.query_one(JobTable).display = view == "jobs"
            self.refresh_bindings()
            self.poll()  # the jobs view fetches more jobs: at once, not at the next refresh
        box = self.query_one("#filter", Input)
        box.display = bool(self.table().filter_text)
        box.value = self.table().filter_text
        self.table().focus()

    def action_show_vms(self) -> None:
        self._switch("vms")

    def action_show_jobs(self) -> None:
        self._switch("jobs")

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def filter_as_you_type(self, event: Input.Changed) -> None:
        if event.value.strip() != self.table().filter_text:
            self.table().set_filter(event.value)

    @on(Input.Submitted, "#filter")
    def keep_filter(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self.table().focus()

    async def action_back(self) -> None:
        """esc on the main screen: clear the filter and return to the table."""
        box = self.query_one("#filter", Input)
        if box.display or self.table().filter_text:
            box.value = ""
            box.display = False
            self.table().set_filter("")
            self.table().focus()

    def action_sort(self) -> None:
        column = self.table().cycle_sort()
        self.notify(f"sorted by {column}", timeout=1.5)

    @on(DataTable.RowSelected, "#vms")
    def vm_details(self, event: DataTable.RowSelected) -> None:
        vm_id = str(event.row_key.value)
        self.push_screen(VMDetails(vm_id, lambda: self.client.vm(vm_id), self.refresh_s))

    @on(DataTable.RowSelected, "#jobs, #recent-jobs")
    def job_details(self, event: DataTable.RowSelected) -> None:
        job_id = int(str(event.row_key.value))
        self.push_screen(
            JobDetails(job_id, lambda: self.client.job(job_id), self.refresh_s, lambda: self.now)
        )

    def action_logs(self) -> None:
        self.query_one(LogPanel).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(readonly=self.readonly))

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for key in APP_KEYS:
            if (
                key.palette
                and not key.action.startswith("app.")
                and self.check_action(key.action, ())
            ):
                yield SystemCommand(
                    key.description, key.description, lambda a=key.action: self.run_action(a)
                )


async def demo_console(demo: Demo) -> None:
    """The console of `alienec2 demo`; quitting it stops the whole demo. The demo owns the
    signals: it stops its agents and the core, then the console."""
    async with AdminClient(socket_path=str(demo.core.admin_socket)) as client:
        await ConsoleApp(client, catch_signals=False).run_async()
