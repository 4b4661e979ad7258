"""The core's event stream, tailed."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.widgets import RichLog

KIND_STYLES = {
    "vm_failed": "bold red",
    "vm_lost": "bold red",
    "cloud_backoff": "bold red",
    "launch_failed": "red",
    "demand_error": "red",
    "job_failed": "red",
    "job_done": "green",
    "vm_idle": "green",
    "launch_done": "cyan",
}


class LogPanel(RichLog):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=2000, wrap=False, markup=False, **kwargs)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            line = Text(time.strftime("%H:%M:%S ", time.localtime(event["ts"])), style="dim")
            line.append(f"{event['kind']:<16}", style=KIND_STYLES.get(event["kind"], "bold"))
            subject = event["vm_id"] or (f"job {event['job_id']}" if event["job_id"] else "")
            subject = subject or event["cloud"] or ""
            line.append(f" {subject:<20} ")
            line.append(event["message"])
            self.write(line)
