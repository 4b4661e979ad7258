"""Demand from HTCondor: the number of idle jobs ``condor_q`` lists (elastiq's signal)."""

from __future__ import annotations

from core.queues import DemandError
from core.queues.command import run_command

IDLE = "JobStatus == 1"


def count_idle(output: str) -> int:
    """Count the jobs in ``condor_q -af ClusterId ProcId`` output: one ``cluster proc`` a line."""
    count = 0
    for line in output.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise DemandError(f"condor_q printed an unexpected line: {line[:80]!r}")
        count += 1
    return count


class HTCondorQueue:
    def __init__(self, condor_q: list[str], constraint: str | None, timeout_s: float) -> None:
        where = IDLE if not constraint else f"({IDLE}) && ({constraint})"
        self._argv = [*condor_q, "-allusers", "-constraint", where, "-af", "ClusterId", "ProcId"]
        self._timeout_s = timeout_s

    async def waiting(self) -> int:
        return count_idle(await run_command(self._argv, self._timeout_s))
