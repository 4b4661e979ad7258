"""Job flow: submitted / started / finished per minute over the last hour, and recent jobs."""

from __future__ import annotations

from collections import deque
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Sparkline

from alienec2_tui.widgets.format import age

FLOWS: dict[str, tuple[str, ...]] = {"submitted": ("job_queued",), "started": ("job_running",)}
FLOWS["finished"] = ("job_done", "job_failed")
WINDOW_S = 3600


class JobFlow(Vertical):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._events: deque[tuple[float, str]] = deque()

    def compose(self) -> ComposeResult:
        for name in FLOWS:
            with Horizontal(classes="flow"):
                yield Label(f"{name:>9}", classes="flow-label")
                yield Sparkline([0] * 60, id=f"spark-{name}", summary_function=max)
                yield Label("0/min", id=f"rate-{name}", classes="flow-rate")
        table: DataTable[Any] = DataTable(id="recent-jobs", cursor_type="row")
        yield table

    def on_mount(self) -> None:
        table = self.query_one("#recent-jobs", DataTable)
        for column in ("job", "state", "vm", "wait", "run", "command"):
            table.add_column(column, key=column)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        kinds = {kind for kinds in FLOWS.values() for kind in kinds}
        for event in events:
            if event["kind"] in kinds:
                self._events.append((event["ts"], event["kind"]))

    def refresh_flow(self, now: float) -> None:
        while self._events and self._events[0][0] < now - WINDOW_S:
            self._events.popleft()
        for name, kinds in FLOWS.items():
            buckets = [0] * 60
            for ts, kind in self._events:
                if kind in kinds:
                    index = 59 - int((now - ts) // 60)
                    if 0 <= index < 60:
                        buckets[index] += 1
            self.query_one(f"#spark-{name}", Sparkline).data = buckets
            self.query_one(f"#rate-{name}", Label).update(f"{buckets[-1]}/min")

    def show_jobs(self, jobs: list[dict[str, Any]], now: float) -> None:
        table = self.query_one("#recent-jobs", DataTable)
        table.clear()
        for job in jobs[:50]:
            run = None
            if job["started_at"]:
                run = (job["finished_at"] or now) - job["started_at"]
            table.add_row(
                str(job["id"]),
                job["state"],
                job["vm_id"] or "-",
                age(job["wait_s"]) if job["wait_s"] is not None else "-",
                age(run),
                " ".join(job["command"])[:60],
                key=str(job["id"]),
            )
