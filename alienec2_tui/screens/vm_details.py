"""`enter` on a VM: its record, its events, and its job's output tail."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from alienec2_tui.widgets.format import age, state_text


class VMDetails(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close")]

    def __init__(self, details: dict[str, Any]) -> None:
        super().__init__()
        self._details = details

    def compose(self) -> ComposeResult:
        vm, job, now = self._details["vm"], self._details["job"], self._details["now"]
        with Vertical(id="details"):
            yield Label(f"VM {vm['id']}", id="details-title")
            yield Static(state_text(vm["state"]))
            yield Static(
                f"cloud {vm['cloud']}   launch {vm['launch_id']}   address {vm['address'] or '-'}"
                f"\nup {age(now - vm['launched_at'])}   last heartbeat "
                f"{age(now - vm['last_heartbeat']) if vm['last_heartbeat'] else '-'} ago"
            )
            with VerticalScroll(id="details-body"):
                if job:
                    yield Label(f"job {job['id']} (attempt {job['attempt']}): {job['state']}")
                    yield Static(" ".join(job["command"]), classes="dim")
                    yield Static(job["output_tail"] or "(no output yet)", id="output-tail")
                else:
                    yield Label("no current job")
                yield Label("events", classes="section")
                for event in self._details["events"][-50:]:
                    yield Static(f"{event['kind']:<16} {event['message']}")
