"""Job flow: jobs submitted, started, finished and failed per minute over the last hour, with
a time axis, and the most recent jobs. Seeded on attach from the core's per-minute counts, then
kept current from the event stream."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Sparkline, Static

from alienec2_tui.widgets.job_table import JobTable

FLOWS: dict[str, tuple[str, ...]] = {
    "submitted": ("job_queued",),
    "started": ("job_running",),
    "finished": ("job_done",),
    "failed": ("job_failed",),
}
KIND_TO_FLOW = {kind: name for name, kinds in FLOWS.items() for kind in kinds}
MINUTES = 60


def axis(cells: int) -> str:
    """`-60m` at the left, `-30m` in the middle, `now` at the right of ``cells`` columns."""
    middle = "-30m"
    left = "-60m".ljust(cells // 2 - len(middle) // 2)
    return (left + middle).ljust(cells - 3) + "now"


class JobFlow(Vertical):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.minutes: dict[float, dict[str, int]] = {}  # minute start -> counts
        self.seeded_seq = 0  # events up to here are in the seed; later ones are counted live
        self._now = 0.0

    def compose(self) -> ComposeResult:
        for name in FLOWS:
            with Horizontal(classes="flow"):
                yield Label(name, classes="flow-label")
                yield Sparkline([0] * MINUTES, id=f"spark-{name}", summary_function=max)
                yield Label("0/m", id=f"rate-{name}", classes="flow-rate")
        with Horizontal(classes="flow"):
            yield Label("", classes="flow-label")
            yield Static(axis(30), id="flow-axis")
        yield JobTable(id="recent-jobs")

    def on_resize(self) -> None:
        if self._now:
            self.call_after_refresh(self.refresh_flow, self._now)

    def seed(self, reply: dict[str, Any]) -> None:
        """Counts per minute from `GET /admin/v1/flow`."""
        self.minutes = {m["t"]: {name: m[name] for name in FLOWS} for m in reply["minutes"]}
        self.seeded_seq = reply["last_seq"]

    def add_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            name = KIND_TO_FLOW.get(event["kind"])
            if name is None or event["seq"] <= self.seeded_seq:
                continue
            minute = event["ts"] // 60 * 60
            counts = self.minutes.setdefault(minute, dict.fromkeys(FLOWS, 0))
            counts[name] += 1

    def refresh_flow(self, now: float) -> None:
        """Redraw at one cell per minute when the sparkline is 60 cells wide, else two."""
        self._now = now
        first = (now // 60 - MINUTES + 1) * 60
        for minute in [m for m in self.minutes if m < first]:
            del self.minutes[minute]
        width = self.query_one("#spark-submitted", Sparkline).size.width
        per_cell = 1 if width >= MINUTES else 2
        cells = MINUTES // per_cell
        for name in FLOWS:
            series = [self.minutes.get(first + 60 * i, {}).get(name, 0) for i in range(MINUTES)]
            data = [sum(series[i : i + per_cell]) for i in range(0, MINUTES, per_cell)]
            self.query_one(f"#spark-{name}", Sparkline).data = data
            self._update(self.query_one(f"#rate-{name}", Label), f"{series[-1]}/m")
        self._update(self.query_one("#flow-axis", Static), axis(cells))

    @staticmethod
    def _update(widget: Static, text: str) -> None:
        """Only a changed text is repainted: over SSH every repaint is paid for."""
        if str(widget.content) != text:
            widget.update(text)
