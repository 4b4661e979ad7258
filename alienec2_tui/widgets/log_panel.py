"""The core's event stream, tailed. It follows new events only while scrolled to the bottom,
so an operator reading back on a busy pool is not yanked away; End resumes following."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from rich.text import Text
from textual.binding import BindingType
from textual.events import Resize
from textual.widgets import RichLog

from alienec2_tui.keys import LOG_KEYS, bindings

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
    "vm_interrupted": "bold yellow",
    "job_requeued": "yellow",
    "job_cancelled": "magenta",
    "reconcile_failed": "red",
    "describe_failed": "red",
    "terminate_failed": "red",
}


class LogPanel(RichLog):
    BINDINGS: ClassVar[list[BindingType]] = bindings(LOG_KEYS)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=2000, wrap=False, markup=False, auto_scroll=False, **kwargs)
        self._follow = True  # kept across a resize, which moves the bottom

    @property
    def following(self) -> bool:
        return self.scroll_y >= self.max_scroll_y

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self._follow = new_value >= self.max_scroll_y

    def on_resize(self, event: Resize) -> None:
        super().on_resize(event)
        if self._follow:
            self.call_after_refresh(self.scroll_end, animate=False)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        follow = self._follow
        for event in events:
            line = Text(time.strftime("%H:%M:%S ", time.localtime(event["ts"])), style="dim")
            line.append(f"{event['kind']:<16}", style=KIND_STYLES.get(event["kind"], "bold"))
            subject = event["vm_id"] or (f"job {event['job_id']}" if event["job_id"] else "")
            subject = subject or event["cloud"] or ""
            line.append(f" {subject:<20} ")
            line.append(event["message"])
            self.write(line, scroll_end=follow)
        self.border_subtitle = "" if follow else "paused: end follows"

    def action_scroll_end(self) -> None:
        super().action_scroll_end()
        self.border_subtitle = ""
