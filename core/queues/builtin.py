"""The core's own FIFO task queue; the jobs live in the store, agents fetch them over the API."""

from __future__ import annotations

from core.store import Store


class BuiltinQueue:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def waiting(self) -> int:
        return self._store.queued_count()
