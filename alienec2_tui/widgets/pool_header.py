"""The pool at a glance: VM and job counts, bounds, pause, clouds in backoff, connection.
Two lines that never wrap: below 100 columns, states with no VM are left out."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from alienec2_tui.widgets.format import STATE_STYLES

VM_STATES = ("idle", "busy", "booting", "requested", "draining", "failed", "lost")
SHORT = {"booting": "boot", "requested": "req", "draining": "drain", "failed": "fail"}


class PoolHeader(Static):
    status: reactive[dict[str, Any] | None] = reactive(None)
    connection: reactive[str] = reactive("connecting…")
    readonly: reactive[bool] = reactive(False)

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        narrow = self.size.width < 100
        if self.readonly:
            text.append(" READ-ONLY ", style="bold black on cyan")
            text.append(" ")
        if self.connection != "connected":
            text.append(f" ● {self.connection} ", style="bold white on red")
            text.append("  ")
        status = self.status
        if status is None:
            text.append("waiting for the core…", style="dim")
            return text
        pool, jobs = status["pool"], status["queue"]["jobs"]
        text.append(f"pool {pool['name']} " if not narrow else f"{pool['name']} ", style="bold")
        text.append(f"min {pool['min_vms']} max {pool['max_vms']}  ")
        if pool["paused"]:
            text.append(" SCALING PAUSED ", style="bold black on yellow")
            text.append("  ")
        for state in VM_STATES:
            count = pool["vms"].get(state, 0)
            if narrow and not count and state not in ("idle", "busy"):
                continue
            style = STATE_STYLES.get(state, "") if count else "dim"
            label = SHORT.get(state, state) if narrow else state
            text.append(f"{label} {count}{' ' if narrow else '  '}", style=style)
        # Shown only when there are some: rollouts, Spot reclaims, the cost.
        interrupted = pool["vms"].get("interrupted", 0)
        if interrupted:
            label = "intr" if narrow else "interrupted"
            text.append(f"{label} {interrupted}  ", style=STATE_STYLES["interrupted"])
        if pool.get("outdated"):
            text.append(f"outdated {pool['outdated']}  ", style="magenta")
        cost = status.get("cost_per_hour") or {}
        if cost.get("total"):
            cap = f"/{cost['max']:g}" if cost.get("max") is not None else ""
            text.append(f"${cost['total']:.2f}{cap}/h  ", style="bold")
        text.append("\n")
        text.append("jobs  ", style="bold")
        running = jobs.get("running", 0) + jobs.get("assigned", 0)
        for state, count in (
            ("queued", jobs.get("queued", 0)),
            ("running", running),
            ("done", jobs.get("done", 0)),
            ("failed", jobs.get("failed", 0)),
        ):
            text.append(
                f"{state} {count}  ", style="bold red" if state == "failed" and count else ""
            )
        backoff = [c for c in status["clouds"] if c["backoff_s"] > 0]
        for cloud in status["clouds"]:
            style = "bold red" if cloud in backoff else "dim"
            note = f" backoff {cloud['backoff_s']:.0f}s" if cloud in backoff else ""
            resting = [p for p in cloud.get("placements", []) if p.get("backoff_s", 0) > 0]
            if resting and cloud not in backoff:
                note = f" {len(resting)} type/subnet resting"
                style = "yellow"
            text.append(
                f"  {cloud['name']} {cloud['alive']}/{cloud['max_instances']}{note}", style=style
            )
        return text
