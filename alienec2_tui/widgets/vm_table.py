"""The VM table: the columns an operator reads first come first, so 80 columns show id,
state, job and idle."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from alienec2_tui.widgets.format import TABLE_STEP_S, age
from alienec2_tui.widgets.keyed_table import KeyedTable

COLUMNS = ("id", "state", "job", "idle", "cloud", "uptime", "heartbeat", "address")
SORTS = ("id", "cloud", "state", "uptime", "idle", "heartbeat")


def job_cell(vm: dict[str, Any]) -> str:
    """Its job, or with several slots per VM its slots in use ("2/4"); a core from before
    slots sends neither ``slots`` nor ``slots_used``."""
    slots = vm.get("slots", 1)
    if slots > 1:
        return f"{vm.get('slots_used', 0)}/{slots}"
    return str(vm["job_id"]) if vm["job_id"] is not None else "-"


def row_for(vm: dict[str, Any], now: float) -> tuple[str, ...]:
    """The row as plain strings: cheap to build and compare for every VM on every refresh."""
    idle = now - vm["idle_since"] if vm["state"] == "idle" and vm["idle_since"] else None
    heartbeat = now - vm["last_heartbeat"] if vm["last_heartbeat"] else None
    return (
        vm["id"],
        vm["state"],
        job_cell(vm),
        age(idle, TABLE_STEP_S),
        vm["cloud"],
        age(now - vm["launched_at"], TABLE_STEP_S),
        age(heartbeat, TABLE_STEP_S),
        vm["address"] or "-",
    )


class VMTable(KeyedTable):
    COLUMNS: ClassVar[tuple[str, ...]] = COLUMNS
    SORTS: ClassVar[tuple[str, ...]] = SORTS
    NOUN: ClassVar[str] = "VMs"

    def row_for(self, record: dict[str, Any], now: float) -> tuple[str, ...]:
        return row_for(record, now)

    def sort_value(self, record: dict[str, Any], column: str, now: float) -> Any:
        match column:
            case "uptime":
                return record["launched_at"]
            case "idle":
                idle = record["state"] == "idle" and record["idle_since"]
                return record["idle_since"] if idle else now
            case "heartbeat":
                return -(record["last_heartbeat"] or 0)
            case _:
                return str(record[column])

    def searched(self, record: dict[str, Any]) -> Iterable[str]:
        return (
            record["id"],
            record["cloud"],
            record["state"],
            *(str(job_id) for job_id in record.get("jobs") or [record["job_id"] or ""]),
            record["address"] or "",
        )

    def selected_vm(self) -> dict[str, Any] | None:
        return self.selected()
