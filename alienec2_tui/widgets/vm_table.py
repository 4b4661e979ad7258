"""The VM table. Updates only the cells that changed (5,000 rows stay responsive)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from textual.widgets import DataTable

from alienec2_tui.widgets.format import age, state_text

COLUMNS = ("id", "cloud", "state", "job", "uptime", "idle", "address", "heartbeat")
SORTS = ("id", "cloud", "state", "uptime", "idle", "heartbeat")


def row_for(vm: dict[str, Any], now: float) -> tuple[str, ...]:
    """The row as plain strings: cheap to build and compare for every VM on every refresh."""
    idle = now - vm["idle_since"] if vm["state"] == "idle" and vm["idle_since"] else None
    heartbeat = now - vm["last_heartbeat"] if vm["last_heartbeat"] else None
    return (
        vm["id"],
        vm["cloud"],
        vm["state"],
        str(vm["job_id"]) if vm["job_id"] is not None else "-",
        age(now - vm["launched_at"]),
        age(idle),
        vm["address"] or "-",
        age(heartbeat),
    )


def cell(column: str, value: str) -> Any:
    """What the table shows for a value: states in their colour."""
    return state_text(value) if column == "state" else value


def sort_value(vm: dict[str, Any], column: str, now: float) -> Any:
    match column:
        case "uptime":
            return vm["launched_at"]
        case "idle":
            return vm["idle_since"] if vm["state"] == "idle" and vm["idle_since"] else now
        case "heartbeat":
            return -(vm["last_heartbeat"] or 0)
        case _:
            return str(vm[column])


def matches(vm: dict[str, Any], needle: str) -> bool:
    if not needle:
        return True
    fields = (vm["id"], vm["cloud"], vm["state"], str(vm["job_id"] or ""), vm["address"] or "")
    return any(needle.lower() in field.lower() for field in fields)


class VMTable(DataTable[Any]):
    """Rows keyed by instance id; ``show`` diffs against what is on screen."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.vms: dict[str, dict[str, Any]] = {}  # the last answer, for details and sorting
        self._shown: dict[str, tuple[Any, ...]] = {}
        self.filter_text = ""
        self.sort_column = "id"

    def on_mount(self) -> None:
        for column in COLUMNS:
            self.add_column(column, key=column)

    def show(self, vms: Iterable[dict[str, Any]], now: float) -> int:
        """Bring the table in line with ``vms``; returns how many cells or rows changed."""
        self.vms = {vm["id"]: vm for vm in vms}
        wanted = {
            vm_id: row_for(vm, now)
            for vm_id, vm in self.vms.items()
            if matches(vm, self.filter_text)
        }
        changes = 0
        for vm_id in [v for v in self._shown if v not in wanted]:
            self.remove_row(vm_id)
            del self._shown[vm_id]
            changes += 1
        added = False
        for vm_id, row in wanted.items():
            old = self._shown.get(vm_id)
            if old is None:
                self.add_row(*(cell(c, v) for c, v in zip(COLUMNS, row, strict=True)), key=vm_id)
                added = True
                changes += 1
            elif old != row:
                for column, before, after in zip(COLUMNS, old, row, strict=True):
                    if before != after:
                        self.update_cell(vm_id, column, cell(column, after))
                        changes += 1
            self._shown[vm_id] = row
        if added:
            self.apply_sort(now)
        return changes

    def apply_sort(self, now: float) -> None:
        column = self.sort_column
        self.sort("id", key=lambda vm_id: sort_value(self.vms[str(vm_id)], column, now))

    def cycle_sort(self, now: float) -> str:
        self.sort_column = SORTS[(SORTS.index(self.sort_column) + 1) % len(SORTS)]
        self.apply_sort(now)
        return self.sort_column

    def selected_vm(self) -> dict[str, Any] | None:
        if not self.row_count:
            return None
        row_key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        return self.vms.get(str(row_key.value))

    def set_filter(self, text: str, now: float) -> None:
        self.filter_text = text.strip()
        self.show(list(self.vms.values()), now)
        self.apply_sort(now)
