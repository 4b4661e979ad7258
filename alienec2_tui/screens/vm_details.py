"""`enter` on a VM: its record, its events and its job's output tail, kept current."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from alienec2_tui.screens.live import Fetch, LiveScreen
from alienec2_tui.widgets.format import age, command_line, state_text


class VMDetails(LiveScreen):
    def __init__(self, vm_id: str, fetch: Fetch, refresh_s: float = 1.0) -> None:
        super().__init__(fetch, refresh_s)
        self.vm_id = vm_id

    def compose(self) -> ComposeResult:
        with Vertical(id="details"):
            yield Label(f"VM {self.vm_id}", id="details-title")
            yield Static("", id="live-problem", classes="problem")
            yield Static("loading…", id="vm-state")
            yield Static("", id="vm-facts")
            with VerticalScroll(id="details-body"):
                yield Label("", id="job-line")
                yield Static("", id="job-command", classes="dim")
                yield Static("", id="output-tail")
                yield Label("events", classes="section")
                yield Static("", id="vm-events")
            yield Label("esc/q close", classes="dim")

    def show(self, record: dict[str, Any]) -> None:
        vm, job, now = record["vm"], record["job"], record["now"]
        self.query_one("#vm-state", Static).update(state_text(vm["state"]))
        heartbeat = age(now - vm["last_heartbeat"]) + " ago" if vm["last_heartbeat"] else "-"
        self.query_one("#vm-facts", Static).update(
            f"cloud {vm['cloud']}   launch {vm['launch_id']}   address {vm['address'] or '-'}"
            f"\nup {age(now - vm['launched_at'])}   last heartbeat {heartbeat}"
        )
        if job:
            self.query_one("#job-line", Label).update(
                f"job {job['id']} (attempt {job['attempt']}): {job['state']}"
            )
            self.query_one("#job-command", Static).update(Text(command_line(job["command"])))
            self.query_one("#output-tail", Static).update(
                Text(job["output_tail"] or "(no output yet)")
            )
        else:
            self.query_one("#job-line", Label).update("no current job")
        self.query_one("#vm-events", Static).update(
            Text("\n".join(f"{e['kind']:<16} {e['message']}" for e in record["events"][-50:]))
        )

    def finished(self, record: dict[str, Any]) -> bool:
        return record["vm"]["state"] == "terminated"
