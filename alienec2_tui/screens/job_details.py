"""`enter` on a job: its command, environment names (never values: they may hold secrets),
attempts and output tail, kept current until the job ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from alienec2_tui.screens.live import Fetch, LiveScreen
from alienec2_tui.widgets.format import age, command_line, state_text
from alienec2_tui.widgets.job_table import run_time

ENDED = ("done", "failed", "cancelled")


class JobDetails(LiveScreen):
    def __init__(
        self,
        job_id: int,
        fetch: Fetch,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(fetch, refresh_s)
        self.job_id = job_id
        self._clock = clock

    def compose(self) -> ComposeResult:
        with Vertical(id="details"):
            yield Label(f"job {self.job_id}", id="details-title")
            yield Static("", id="live-problem", classes="problem")
            yield Static("loading…", id="job-state")
            yield Static("", id="job-command")
            yield Static("", id="job-facts")
            yield Label("output (tail)", classes="section")
            with VerticalScroll(id="details-body"):
                yield Static("", id="output-tail")
            yield Label("esc/q close", classes="dim")

    def show(self, record: dict[str, Any]) -> None:
        job, now = record, self._clock()
        self.query_one("#job-state", Static).update(state_text(job["state"]))
        self.query_one("#job-command", Static).update(Text("$ " + command_line(job["command"])))
        env = ", ".join(sorted(job["env"])) or "-"
        wait = age(job["wait_s"]) if job["wait_s"] is not None else "-"
        lines = [
            f"attempt {job['attempt']} of {job['max_attempts']}   vm {job['vm_id'] or '-'}",
            f"waited {wait}   ran {age(run_time(job, now))}   "
            f"exit code {job['exit_code'] if job['exit_code'] is not None else '-'}",
            f"env names: {env}",
        ]
        if job.get("kind") == "pilot":
            named = job.get("alien_job_id")
            lines.append(f"pilot run; AliEn job: {named or 'none named in its output'}")
        if job["reason"]:
            lines.append(f"reason: {job['reason']}")
        self.query_one("#job-facts", Static).update(Text("\n".join(lines)))
        tail = job["output_tail"]
        if not tail:
            tail = "(no output yet: the agent reports it when the job ends)"
            if job["state"] in ENDED:
                tail = "(no output)"
        self.query_one("#output-tail", Static).update(Text(tail))
        self.query_one("#details-body", VerticalScroll).scroll_end(animate=False)

    def finished(self, record: dict[str, Any]) -> bool:
        return record["state"] in ENDED
