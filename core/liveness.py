"""Agent liveness kept in memory: the last heartbeat of each VM.

A heartbeat is not a state change, so it is not a write: agents' heartbeats update this table
and the engine writes it in one transaction every few seconds. A crash loses at most those
seconds, which the start-up grace (no VM is lost before a full heartbeat timeout after a
start) covers.
"""

from __future__ import annotations


class Liveness:
    def __init__(self, started_at: float) -> None:
        self.started_at = started_at  # the start of this process: the start-up grace's origin
        self.seen: dict[str, float] = {}  # vm id -> last heartbeat
        self._unsaved: dict[str, float] = {}

    def heartbeat(self, vm_id: str, now: float) -> None:
        self.seen[vm_id] = now
        self._unsaved[vm_id] = now

    def last_heartbeat(self, vm_id: str, stored: float | None) -> float | None:
        at = self.seen.get(vm_id)
        if at is None:
            return stored
        return at if stored is None else max(at, stored)

    def since(self, at: float) -> dict[str, float]:
        """The heartbeats received at or after ``at``: a console's small delta of a fleet
        whose heartbeats are never events."""
        return {vm_id: t for vm_id, t in self.seen.items() if t >= at}

    def forget(self, vm_id: str) -> None:
        self.seen.pop(vm_id, None)
        self._unsaved.pop(vm_id, None)

    def take_unsaved(self) -> dict[str, float]:
        """The heartbeats received since the last save."""
        unsaved, self._unsaved = self._unsaved, {}
        return unsaved
