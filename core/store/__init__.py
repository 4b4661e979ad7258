"""The durable state of one core in SQLite (WAL, one writer).

Every method that changes state commits before it returns, together with the event that
explains the change, so a caller may acknowledge or act only after the change is durable. A
core killed at any point restarts from exactly this file. ``db`` holds the connection,
transactions and migrations; ``vms``, ``jobs``, ``launches``, ``events`` and ``settings`` one
kind of record each; the domain rules they apply live in ``core.model``.
"""

from __future__ import annotations

from core.store.db import SCHEMA_VERSION, StateError
from core.store.errors import Conflict, NotFound
from core.store.events import Events
from core.store.jobs import Jobs, JobSpec
from core.store.launches import Launches
from core.store.settings import Settings


class Store(Jobs, Launches, Events, Settings):
    """The durable state of one core. Not thread-safe: use it from one thread."""


__all__ = ["SCHEMA_VERSION", "Conflict", "JobSpec", "NotFound", "StateError", "Store"]
