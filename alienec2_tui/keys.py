"""Every key of the console in one table: the app's bindings, the footer, `?` help and the
command palette are all written from it, so they cannot disagree.

Conventions of k9s, htop and lazydocker: `j`/`k` move, `g`/`G` jump, `q` and ctrl+c quit, `/`
filters, esc backs out, ctrl+k kills. No plain letter a vim user moves with acts on a VM, and
every action that terminates or drains asks first.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding, BindingType


@dataclass(frozen=True, slots=True)
class Key:
    keys: str  # Textual key names, comma-separated
    action: str
    short: str  # the footer's word
    description: str  # help and palette
    display: str
    row: bool = False  # acts on the selected row
    mutating: bool = False  # changes the pool: hidden and refused when read-only
    footer: bool = True
    palette: bool = True


# In footer order: at 80 columns the footer shows only the first few.
APP_KEYS: tuple[Key, ...] = (
    Key("question_mark", "help", "help", "Show all keys", "?"),
    Key("q", "quit", "quit", "Quit the console", "q", palette=False),
    Key("ctrl+c", "quit", "quit", "Quit the console", "^c", footer=False, palette=False),
    Key("slash", "filter", "filter", "Filter the table as you type (esc clears)", "/"),
    Key("1", "show_vms", "VMs", "Show the VM table", "1"),
    Key("2", "show_jobs", "jobs", "Show the jobs table", "2"),
    Key("o", "sort", "sort", "Cycle the table's sort column", "o"),
    Key(
        "ctrl+k", "kill", "kill", "Kill the selected VM now (its job is requeued)", "^k", True, True
    ),
    Key("d", "drain", "drain", "Drain the selected VM (finish its job, then end)", "d", True, True),
    Key("D", "drain_all", "drain all", "Drain every VM", "D", mutating=True),
    Key("plus", "grow", "max+1", "Grow the pool's max by one", "+", mutating=True),
    Key("minus", "shrink", "max-1", "Shrink the pool's max by one", "-", mutating=True),
    Key("r", "resize", "resize", "Resize the pool: set min and max", "r", mutating=True),
    Key("p", "pause", "pause", "Pause or resume scaling", "p", mutating=True),
    Key("s", "submit", "submit", "Submit a job", "s", mutating=True),
    Key("l", "logs", "log", "Focus the event log", "l"),
    Key("escape", "back", "back", "Close a dialog; clear the filter", "esc", footer=False),
    Key("tab", "app.focus_next", "next", "Focus the next panel", "tab", footer=False),
    Key(
        "shift+tab", "app.focus_previous", "prev", "Focus the previous panel", "⇧tab", footer=False
    ),
)

# The tables' own keys (VMs, jobs): listed in help; they never change the pool.
TABLE_KEYS: tuple[Key, ...] = (
    Key("enter", "select_cursor", "details", "Open the selected row (live details)", "⏎", True),
    Key("j,down", "cursor_down", "down", "Move down", "j ↓", footer=False),
    Key("k,up", "cursor_up", "up", "Move up", "k ↑", footer=False),
    Key("g,home", "scroll_top", "top", "Jump to the first row", "g home", footer=False),
    Key("G,end", "scroll_bottom", "bottom", "Jump to the last row", "G end", footer=False),
    Key("pageup", "page_up", "page up", "Page up", "pgup", footer=False),
    Key("pagedown", "page_down", "page down", "Page down", "pgdn", footer=False),
)

# The event log's keys.
LOG_KEYS: tuple[Key, ...] = (
    Key(
        "end",
        "scroll_end",
        "follow",
        "Log: jump to the newest event and follow",
        "end",
        footer=False,
    ),
)

MUTATING = frozenset(key.action for key in APP_KEYS if key.mutating)
ROW_ACTIONS = frozenset(key.action for key in APP_KEYS if key.row)


def bindings(keys: tuple[Key, ...], priority: frozenset[str] = frozenset()) -> list[BindingType]:
    return [
        Binding(
            key.keys,
            key.action,
            key.short,
            show=key.footer,
            key_display=key.display,
            priority=key.keys in priority,
            tooltip=key.description,
        )
        for key in keys
    ]


def help_rows(readonly: bool) -> list[tuple[str, str, str]]:
    """(keys, what it does, "row" if it acts on the selected row), read-only keys only when
    ``readonly``."""
    rows = []
    for key in (*APP_KEYS, *TABLE_KEYS, *LOG_KEYS):
        if readonly and key.mutating:
            continue
        rows.append((key.display, key.description, "row" if key.row else ""))
    return rows
