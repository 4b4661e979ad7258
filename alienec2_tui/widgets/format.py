"""How times and states look in the console."""

from __future__ import annotations

import shlex

from rich.text import Text

STATE_STYLES = {
    "requested": "grey62",
    "booting": "yellow",
    "idle": "green",
    "busy": "bold cyan",
    "draining": "magenta",
    "terminating": "grey50",
    "terminated": "grey35",
    "failed": "bold red",
    "lost": "bold red",
    "interrupted": "bold yellow",
}


TABLE_STEP_S = 5  # the tables' seconds: heartbeat times arrive every 5 s (HEARTBEAT_EVERY_S)


def age(seconds: float | None, step: int = 1) -> str:
    """Coarse ages (12s, 4m, 3h, 2d): coarse on purpose, so cells change rarely. ``step``:
    seconds shown in steps of this many (a table of ages ticking every second repaints every
    row every second, which an SSH session pays for)."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds // step * step:.0f}s" if step > 1 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def command_line(argv: list[str]) -> str:
    """A job's command as the shell line that runs it: an argument with spaces or quotes
    stays one argument on the screen, as the CLI prints it."""
    return shlex.join(argv)
