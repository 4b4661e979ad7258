"""The jobs table: the newest jobs the core reports (queue jobs and pilot runs), with how long
they waited and ran."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from alienec2_tui.widgets.format import TABLE_STEP_S, age, command_line
from alienec2_tui.widgets.keyed_table import KeyedTable

COLUMNS = ("id", "state", "vm", "attempts", "wait", "run", "exit", "command")
SORTS = ("id", "state", "vm", "wait", "run", "exit")


def run_time(job: dict[str, Any], now: float) -> float | None:
    if not job["started_at"]:
        return None
    return (job["finished_at"] or now) - job["started_at"]


def what_ran(job: dict[str, Any]) -> str:
    """The command; for a pilot run (an AliEn JobAgent, whose command line is the same every
    time) what it ran: the AliEn job its output named, if any."""
    if job.get("kind") != "pilot":
        return command_line(job["command"])
    named = job.get("alien_job_id")
    return f"pilot run: AliEn job {named}" if named else "pilot run"


def row_for(job: dict[str, Any], now: float) -> tuple[str, ...]:
    return (
        str(job["id"]),
        job["state"],
        job["vm_id"] or "-",
        f"{job['attempt']}/{job['max_attempts']}",
        age(job["wait_s"]) if job["wait_s"] is not None else "-",
        # A finished job's run time no longer ticks: exact (a 2 s job showed "0s").
        age(run_time(job, now), 1 if job["finished_at"] else TABLE_STEP_S),
        str(job["exit_code"]) if job["exit_code"] is not None else "-",
        what_ran(job)[:48],
    )


class JobTable(KeyedTable):
    COLUMNS: ClassVar[tuple[str, ...]] = COLUMNS
    SORTS: ClassVar[tuple[str, ...]] = SORTS
    NOUN: ClassVar[str] = "jobs"

    def row_for(self, record: dict[str, Any], now: float) -> tuple[str, ...]:
        return row_for(record, now)

    def sort_value(self, record: dict[str, Any], column: str, now: float) -> Any:
        match column:
            case "id":
                return -record["id"]  # newest first
            case "wait":
                return -(record["wait_s"] or 0)
            case "run":
                return -(run_time(record, now) or 0)
            case "exit":
                code = record["exit_code"]
                return (code is None, code or 0)
            case "vm":
                return record["vm_id"] or ""
            case _:
                return str(record[column])

    def searched(self, record: dict[str, Any]) -> Iterable[str]:
        return (
            str(record["id"]),
            record["state"],
            record["vm_id"] or "",
            what_ran(record),
            command_line(record["command"]),
            " ".join(record["command"]),  # typed without the shell's quotes
        )

    def selected_job(self) -> dict[str, Any] | None:
        return self.selected()
