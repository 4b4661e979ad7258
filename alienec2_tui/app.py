"""The alienec2 console: live pool operation over SSH, keyboard first.

The app composes widgets and turns keys into admin API calls; everything it shows comes from
the core through ``AdminClient``: one snapshot, kept current from the event stream. It holds no
state the core does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from textual import events, on, work
from textual.actions import SkipAction
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Input

from alienec2_tui.client import AdminClient, AdminError, CoreUnreachable
from alienec2_tui.keys import APP_KEYS, MUTATING, ROW_ACTIONS, bindings
from alienec2_tui.screens.dialogs import ConfirmDialog, ResizeDialog, SubmitDialog
from alienec2_tui.screens.help import HelpScreen
from alienec2_tui.screens.job_details import JobDetails
from alienec2_tui.screens.vm_details import VMDetails
from alienec2_tui.widgets.footer import FittedFooter
from alienec2_tui.widgets.job_flow import JobFlow
from alienec2_tui.widgets.job_table import JobTable
from alienec2_tui.widgets.keyed_table import KeyedTable
from alienec2_tui.widgets.log_panel import LogPanel
from alienec2_tui.widgets.ordered_input import OrderedInput
from alienec2_tui.widgets.pool_header import PoolHeader
from alienec2_tui.widgets.vm_table import VMTable

if TYPE_CHECKING:
    from core.demo import Demo

RECENT_JOBS = 50  # the job-flow panel's list
JOBS_VIEW_LIMIT = 500  # the jobs view's: the newest jobs, kept current from events
BACKLOG_EVENTS = 500  # events shown in the log on attach
STATUS_EVERY_S = 5.0  # the status without an event: cloud backoffs count down, costs move
HEARTBEAT_EVERY_S = 5.0  # heartbeat times, which are not events
GONE_STATES = frozenset({"terminating", "terminated"})  # the core kills or drains none
MUTATING_KEYS = frozenset(k for key in APP_KEYS if key.mutating for k in key.keys.split(","))
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class ConsoleApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "alienec2"
    # Keys that move the focus act as soon as the app reads them (priority), not once the
    # focused widget has passed them back: keys typed in the same burst (a fast typist, a
    # paste, one terminal read) were already queued for the old widget, so `/abcp` paused
    # scaling and `Tab BSpace 2` in the resize dialog edited the field Tab had left.
    BINDINGS: ClassVar[list[BindingType]] = bindings(
        APP_KEYS, priority=frozenset({"ctrl+c", "slash", "tab", "shift+tab"})
    )
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
        self.heartbeat_every_s = max(refresh_s, HEARTBEAT_EVERY_S)
        self.status: dict[str, Any] | None = None
        self.now = 0.0  # the core's clock at its last answer, received at _now_at
        self._now_at = 0.0
        self.last_seq = 0  # the model holds every change up to this event
        self.started_at = 0.0  # the core process's start: another one means a new snapshot
        self.jobs: dict[int, dict[str, Any]] = {}
        self.status_due = False
        self._status_at = 0.0
        self._refreshing = False
        self._heartbeats_at = (0.0, 0.0)  # (core time asked from, monotonic time asked)
        self._resnapshot_pending = False
        self._logged_seq = 0
        self.snapshots = 0  # snapshots taken: one at attach, then one per gap or restart
        self.snapshots_for_gaps = 0
        self.connected = False
        self.view = "vms"

    def compose(self) -> ComposeResult:
        yield PoolHeader(id="header")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield VMTable(id="vms")
                yield JobTable(id="jobs")
                yield OrderedInput(
                    placeholder="filter as you type · enter keeps · esc clears", id="filter"
                )
            yield JobFlow(id="flow")
        yield LogPanel(id="log")
        yield FittedFooter()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.query_one("#jobs", JobTable).display = False
        self.query_one(PoolHeader).readonly = self.readonly
        self.query_one(VMTable).focus()
        if self.catch_signals:
            loop = asyncio.get_running_loop()
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self.exit)
        self.follow()
        self.set_interval(self.refresh_s, self.tick)

    def on_unmount(self) -> None:
        if self.catch_signals:
            loop = asyncio.get_running_loop()
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)

    # ---- data from the core -----------------------------------------------------------
    #
    # One snapshot (status, VMs, jobs) consistent with an event sequence number, then the
    # event stream from there: each event comes with the VMs and jobs it names as they are
    # now, which replace the console's copies. A gap (events pruned before they were read,
    # the core restarted or gone) means a fresh snapshot. Heartbeats are not events: their
    # times come as a small delta every HEARTBEAT_EVERY_S, and the ages are counted here.

    def _set_connection(self, text: str) -> None:
        self.connected = text == "connected"
        self.query_one(PoolHeader).connection = text

    def core_now(self) -> float:
        """The core's clock, as of its last answer plus the time since."""
        return self.now + (time.monotonic() - self._now_at) if self.now else 0.0

    def _at(self, now: float) -> None:
        self.now, self._now_at = now, time.monotonic()

    @work(exclusive=True, group="follow")
    async def follow(self) -> None:
        """Snapshot, then follow the event stream; shows and survives a dead core."""
        with contextlib.suppress(NoMatches):  # the app quit while a call was on its way
            await self._follow()

    async def _follow(self) -> None:
        backoff = self.refresh_s
        while True:
            try:
                await self._snapshot()
                backoff = self.refresh_s
                while await self._next_events():
                    pass
                self.snapshots_for_gaps += 1
            except CoreUnreachable:
                where = self.client.where  # a mistyped --socket or --url shows here
                self._set_connection(f"disconnected — retrying every {backoff:.0f}s: {where}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except AdminError as exc:
                self._set_connection(f"core error: {exc.message}")
                await asyncio.sleep(backoff)

    async def _snapshot(self) -> None:
        snap = await self.client.snapshot(jobs=JOBS_VIEW_LIMIT)
        flow = await self.client.flow(60)
        seq = snap["seq"]
        first = max(seq - BACKLOG_EVENTS, self.last_seq, 0)
        backlog = await self.client.events(after=first, limit=max(min(seq - first, 1000), 1))
        self.snapshots += 1
        self.started_at = snap["started_at"]
        self._at(snap["now"])
        self.last_seq = seq
        self._show_status(snap["status"])
        self._set_connection("connected")
        self.query_one(VMTable).show(snap["vms"], snap["now"])
        self.jobs = {job["id"]: job for job in snap["jobs"]}
        self.query_one("#jobs", JobTable).show(snap["jobs"], snap["now"])
        self._show_recent_jobs()
        panel = self.query_one(JobFlow)
        panel.seed(flow)
        self._log_events([e for e in backlog["events"] if e["seq"] <= seq])
        self._heartbeats_at = (snap["now"], time.monotonic())
        self._resnapshot_pending = False
        panel.refresh_flow(snap["now"])
        self._close_dialog_of_a_gone_vm()  # it may have ended while we were away

    async def _next_events(self) -> bool:
        """Apply the next events; False when they cannot be applied (a gap): snapshot again."""
        reply = await self.client.events(after=self.last_seq, wait=10, records=True)
        if reply.get("first_seq", 0) > self.last_seq + 1:
            return False  # events after our sequence were pruned before we read them
        events = reply["events"]
        if not events:
            return True
        self.last_seq = reply["last_seq"]
        self._at(reply["now"])
        vms = reply.get("vms", {})
        self.query_one(VMTable).update(
            [vm for vm in vms.values() if vm and vm["state"] != "terminated"],
            removed=[key for key, vm in vms.items() if not vm or vm["state"] == "terminated"],
        )
        self._apply_jobs(reply.get("jobs", {}))
        self._log_events(events)
        self._close_dialog_of_a_gone_vm()
        self.status_due = True
        return True

    def _close_dialog_of_a_gone_vm(self) -> None:
        """A kill or drain question about a VM that has since ended asks about nothing."""
        dialog = self.screen
        if not isinstance(dialog, ConfirmDialog) or dialog.vm_id is None:
            return
        vm = self.query_one(VMTable).records.get(dialog.vm_id)
        if vm is None or vm["state"] in GONE_STATES:
            dialog.dismiss(False)
            self.notify(f"{dialog.vm_id} is {vm['state'] if vm else 'gone'}: nothing to do")

    def _apply_jobs(self, changed: dict[str, dict[str, Any] | None]) -> None:
        """Keep the newest JOBS_VIEW_LIMIT jobs, as the snapshot listed them."""
        if not changed:
            return
        oldest = min(self.jobs) if len(self.jobs) >= JOBS_VIEW_LIMIT else 0
        updated, removed = [], []
        for key, job in changed.items():
            job_id = int(key)
            if job is None:
                if self.jobs.pop(job_id, None) is not None:
                    removed.append(key)
            elif job_id > oldest or job_id in self.jobs:
                self.jobs[job_id] = job
                updated.append(job)
        for job_id in sorted(self.jobs)[: max(len(self.jobs) - JOBS_VIEW_LIMIT, 0)]:
            del self.jobs[job_id]
            removed.append(str(job_id))
        self.query_one("#jobs", JobTable).update(updated, removed=removed)
        self._show_recent_jobs()

    def _show_recent_jobs(self) -> None:
        newest = sorted(self.jobs, reverse=True)[:RECENT_JOBS]
        recent = self.query_one(JobFlow).query_one(JobTable)
        recent.show([self.jobs[job_id] for job_id in newest], self.now)

    def _log_events(self, events: list[dict[str, Any]]) -> None:
        new = [e for e in events if e["seq"] > self._logged_seq]
        if not new:
            return
        self._logged_seq = new[-1]["seq"]
        self.query_one(LogPanel).add_events(new)
        panel = self.query_one(JobFlow)
        panel.add_events(new)
        if self.now:
            panel.refresh_flow(self.core_now())

    def _show_status(self, status: dict[str, Any]) -> None:
        unchanged = self.status is not None and {**self.status, "now": 0} == {**status, "now": 0}
        self.status = status
        if status.get("access") == "readonly" and not self.readonly:
            self.set_readonly()
        if not unchanged:  # the header is repainted only when it has something new to say
            self.query_one(PoolHeader).status = status
        if status.get("last_decision"):  # the latest scaling decision, with its numbers
            self.query_one(VMTable).set_note(f"why: {status['last_decision']}")

    def tick(self) -> None:
        """Every ``refresh_s``: ages move on here; the status and heartbeats are asked for
        when due."""
        if not self.now:
            return
        now = self.core_now()
        with contextlib.suppress(NoMatches):  # the app is closing
            for table in self.query(KeyedTable):
                table.set_now(now)
            self.query_one(JobFlow).refresh_flow(now)
        self.refresh_status()

    @work(group="status")
    async def refresh_status(self) -> None:
        """The status when an event may have changed it (or every STATUS_EVERY_S: backoffs
        and costs change without events), and the heartbeats received since last asked.
        One at a time: a slow answer is waited for, not cancelled by the next tick."""
        if self._refreshing:
            return
        self._refreshing = True
        try:
            with contextlib.suppress(NoMatches, CoreUnreachable, AdminError):
                await self._refresh_status()
        finally:
            self._refreshing = False

    async def _refresh_status(self) -> None:
        if self._resnapshot_pending:
            return  # what we hold is being replaced: comparing with it would start another
        since, asked = self._heartbeats_at
        if since and time.monotonic() - asked >= self.heartbeat_every_s:
            reply = await self.client.heartbeats(since)
            if reply["started_at"] != self.started_at:
                self._resnapshot()  # a restarted core: its heartbeats and ours do not compare
                return
            self._heartbeats_at = (reply["now"], time.monotonic())
            self._apply_heartbeats(reply["heartbeats"])
        if self.status_due or time.monotonic() - self._status_at >= STATUS_EVERY_S:
            self.status_due = False
            self._status_at = time.monotonic()
            status = await self.client.status()
            if status["last_seq"] < self.last_seq:
                self._resnapshot()  # the core's log went back (a restored state file)
                return
            self._show_status(status)

    def _resnapshot(self) -> None:
        """Start over from a snapshot, once: each tick that found the mismatch again would
        cancel the snapshot on its way (at 10,000 VMs it takes more than a tick)."""
        self._resnapshot_pending = True
        self.follow()

    def _apply_heartbeats(self, beats: dict[str, float]) -> None:
        table = self.query_one(VMTable)
        changed = []
        for vm_id, at in beats.items():
            vm = table.records.get(vm_id)
            if vm is not None and at > (vm["last_heartbeat"] or 0):
                changed.append({**vm, "last_heartbeat": at})
        table.update(changed)

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

    @staticmethod
    def _focus_now(widget: Widget) -> None:
        """Focus before the next key is handled. ``Widget.focus()`` waits its turn in the
        app's queue, behind keys typed in the same burst: `/abcp` sent `p` to the table
        (scaling paused) and `/hi from` opened the resize dialog."""
        widget.screen.set_focus(widget)

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
        self.status_due = True  # its event brings the rows; the header follows now
        self.refresh_status()
        return result

    def table(self) -> KeyedTable:
        """The table of the current view."""
        return self.query_one(VMTable) if self.view == "vms" else self.query_one("#jobs", JobTable)

    def _selected(self) -> dict[str, Any] | None:
        vm = self.query_one(VMTable).selected_vm()
        if vm is None:
            self.notify("no VM selected", severity="warning")
        return vm

    async def _resize(self, min_vms: int | None, max_vms: int | None) -> None:
        bounds = await self._call("resize", self.client.resize(min_vms, max_vms))
        if bounds:
            self._resized(bounds)

    def _resized(self, bounds: dict[str, Any]) -> None:
        self.notify(f"pool min {bounds['min_vms']} max {bounds['max_vms']}")
        for warning in bounds.get("warnings", []):
            self.notify(warning, severity="warning")

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
            self._resized(bounds)
            self.status_due = True
            self.refresh_status()
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
        self.push_screen(ConfirmDialog(question, "Drain", vm["id"]), confirmed)

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

        question = f"Kill VM {vm['id']} now?{job}"
        self.push_screen(ConfirmDialog(question, "Kill", vm["id"]), confirmed)

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
            self.query_one("#jobs", JobTable).display = view == "jobs"
            self.refresh_bindings()
        box = self.query_one("#filter", Input)
        box.display = bool(self.table().filter_text)
        box.value = self.table().filter_text
        self._focus_now(self.table())

    def action_show_vms(self) -> None:
        self._switch("vms")

    def action_show_jobs(self) -> None:
        self._switch("jobs")

    def action_filter(self) -> None:
        if self._typing() or self.screen is not self.screen_stack[0]:
            # `/` is a priority key: typed into a field or a dialog it is a character.
            # Skipped here, not refused in check_action, which would hide the filter from
            # the command palette (its own field has the focus while it lists commands).
            raise SkipAction()
        box = self.query_one("#filter", Input)
        box.display = True
        self._focus_now(box)

    @on(Input.Changed, "#filter")
    def filter_as_you_type(self, event: Input.Changed) -> None:
        if event.value.strip() != self.table().filter_text:
            self.table().set_filter(event.value)

    @on(Input.Submitted, "#filter")
    def keep_filter(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self._focus_now(self.table())

    async def action_back(self) -> None:
        """esc on the main screen: clear the filter and return to the table."""
        box = self.query_one("#filter", Input)
        if box.display or self.table().filter_text:
            box.value = ""
            box.display = False
            self.table().set_filter("")
            self._focus_now(self.table())

    def action_sort(self) -> None:
        column = self.table().cycle_sort()
        self.notify(f"sorted by {column}", timeout=1.5)

    @on(KeyedTable.RowSelected, "#vms")
    def vm_details(self, event: KeyedTable.RowSelected) -> None:
        vm_id = event.key
        self.push_screen(VMDetails(vm_id, lambda: self.client.vm(vm_id), self.refresh_s))

    @on(KeyedTable.RowSelected, "#jobs, #recent-jobs")
    def job_details(self, event: KeyedTable.RowSelected) -> None:
        job_id = int(event.key)
        self.push_screen(
            JobDetails(job_id, lambda: self.client.job(job_id), self.refresh_s, self.core_now)
        )

    def action_logs(self) -> None:
        self._focus_now(self.query_one(LogPanel))

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
                    key.description, f"key: {key.display}", lambda a=key.action: self.run_action(a)
                )


async def demo_console(demo: Demo) -> None:
    """The console of `alienec2 demo`; quitting it stops the whole demo. The demo owns the
    signals: it stops its agents and the core, then the console."""
    async with AdminClient(socket_path=str(demo.core.admin_socket)) as client:
        await ConsoleApp(client, catch_signals=False).run_async()
