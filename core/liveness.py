"""Agent liveness kept in memory: last heartbeats and pilot activity.

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
        self.pilot_busy: dict[str, float] = {}  # vm id -> last heartbeat that said busy
        self._unsaved: dict[str, float] = {}
        self._unsaved_busy: dict[str, float] = {}

    def heartbeat(self, vm_id: str, now: float, pilot_busy: bool = False) -> None:
        self.seen[vm_id] = now
        self._unsaved[vm_id] = now
        if pilot_busy:
            self.pilot_busy[vm_id] = now
            self._unsaved_busy[vm_id] = now

    def last_heartbeat(self, vm_id: str, stored: float | None) -> float | None:
        at = self.seen.get(vm_id)
        if at is None:
            return stored
        return at if stored is None else max(at, stored)

    def idle_since(self, vm_id: str, stored: float | None) -> float | None:
        """An idle VM whose pilot said it was busy has been idle only since then."""
        if stored is None:
            return None
        busy = self.pilot_busy.get(vm_id)
        return stored if busy is None else max(stored, busy)

    def forget(self, vm_id: str) -> None:
        for table in (self.seen, self.pilot_busy, self._unsaved, self._unsaved_busy):
            table.pop(vm_id, None)

    def take_unsaved(self) -> tuple[dict[str, float], dict[str, float]]:
        """What changed since the last save: (heartbeats, pilot busy times)."""
        seen, busy = self._unsaved, self._unsaved_busy
        self._unsaved, self._unsaved_busy = {}, {}
        return seen, busy
