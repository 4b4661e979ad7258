"""The event log's read side and its pruning: an append-only history with a sequence number
that the console and the API resume from."""

from __future__ import annotations

import sqlite3

from core.model import Event
from core.store.db import Database


def _event(row: sqlite3.Row) -> Event:
    return Event(
        seq=row["seq"],
        ts=row["ts"],
        kind=row["kind"],
        message=row["message"],
        vm_id=row["vm_id"],
        job_id=row["job_id"],
        cloud=row["cloud"],
        reason=row["reason"],
    )


class Events(Database):
    def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        rows = self._db.execute(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [_event(r) for r in rows]

    def events_for_vm(self, vm_id: str, limit: int = 200) -> list[Event]:
        """The VM's most recent events, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM events WHERE vm_id = ? ORDER BY seq DESC LIMIT ?", (vm_id, limit)
        ).fetchall()
        return [_event(r) for r in reversed(rows)]

    def events_for_job(self, job_id: int, limit: int = 200) -> list[Event]:
        """The job's most recent events, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT ?", (job_id, limit)
        ).fetchall()
        return [_event(r) for r in reversed(rows)]

    def last_seq(self) -> int:
        """The latest sequence number given out, even if pruning has emptied the log since."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    def latest_time(self) -> float:
        """The latest time the state records (the clock never starts behind it)."""
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(ts) FROM events), 0), "
            "COALESCE((SELECT MAX(last_heartbeat) FROM vms), 0))"
        ).fetchone()
        return float(row[0])

    def first_seq(self) -> int:
        """The oldest event still kept (pruning removes from the start); with none kept, the
        next one's, so a follower behind a fully pruned log still sees its gap."""
        seq = self._db.execute("SELECT MIN(seq) FROM events").fetchone()[0]
        return int(seq) if seq is not None else self.last_seq() + 1

    def flow(
        self, since: float, kinds: tuple[str, ...], last_seq: int
    ) -> list[tuple[int, str, int]]:
        """(minute, kind, count) of the given event kinds since ``since`` up to ``last_seq``,
        oldest first."""
        marks = ",".join("?" * len(kinds))
        rows = self._db.execute(
            f"SELECT CAST(ts / 60 AS INTEGER) AS minute, kind, COUNT(*) FROM events "
            f"WHERE ts >= ? AND seq <= ? AND kind IN ({marks}) "
            "GROUP BY minute, kind ORDER BY minute",
            (since, last_seq, *kinds),
        ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def prune_events(self, before: float, batch: int) -> int:
        """Delete up to ``batch`` events older than ``before``; returns how many went. Small
        batches keep each write transaction short while agents are being served."""
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM events WHERE seq IN "
                "(SELECT seq FROM events WHERE ts < ? ORDER BY seq LIMIT ?)",
                (before, batch),
            )
        return cur.rowcount
