"""Launch intents and per-cloud backoff: written before any call reaches a cloud."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from core.model import VM, CloudStatus, EventKind, Launch, LaunchState, Reason, VMState
from core.store.db import Database
from core.store.errors import NotFound
from core.store.vms import VMs


def _launch(row: sqlite3.Row) -> Launch:
    return Launch(
        id=row["id"],
        cloud=row["cloud"],
        count=row["count"],
        client_token=row["client_token"],
        state=LaunchState(row["state"]),
        created_at=row["created_at"],
        instance_ids=json.loads(row["instance_ids"]),
        error=row["error"],
    )


class Launches(VMs):
    def add_launch(
        self,
        launch_id: str,
        cloud: str,
        count: int,
        client_token: str,
        now: float,
        *,
        why: str = "",
        settings_hash: str | None = None,
    ) -> Launch:
        """Write the launch intent; the caller may call RunInstances only after this returns.
        ``why`` (the policy's reason, with its numbers) goes into the event."""
        with self._tx():
            self._db.execute(
                "INSERT INTO launches(id, cloud, count, client_token, state, created_at, "
                "settings_hash) VALUES (?,?,?,?,?,?,?)",
                (launch_id, cloud, count, client_token, LaunchState.PENDING, now, settings_hash),
            )
            self._event(
                now,
                EventKind.LAUNCH_REQUESTED,
                f"launching {count} on {cloud} ({launch_id})" + (f": {why}" if why else ""),
                cloud=cloud,
                reason=Reason.SCALING,
            )
        return self.launch(launch_id)

    def launch(self, launch_id: str) -> Launch:
        row = self._db.execute("SELECT * FROM launches WHERE id = ?", (launch_id,)).fetchone()
        if row is None:
            raise NotFound(f"launch {launch_id} not found")
        return _launch(row)

    def pending_launches(self) -> list[Launch]:
        rows = self._db.execute(
            "SELECT * FROM launches WHERE state = ? ORDER BY created_at", (LaunchState.PENDING,)
        ).fetchall()
        return [_launch(r) for r in rows]

    def launch_settings(self) -> dict[str, str | None]:
        """Launch id -> the fingerprint of the settings it was sent with, for the launches
        of VMs still alive (a rollout replaces those whose fingerprint is not current)."""
        rows = self._db.execute(
            "SELECT id, settings_hash FROM launches WHERE id IN "
            "(SELECT DISTINCT launch_id FROM vms WHERE state != ?)",
            (VMState.TERMINATED,),
        ).fetchall()
        return {row[0]: row[1] for row in rows}

    def pending_counts(self) -> dict[str, int]:
        """Per cloud, the VMs still to come from pending launches: each launch's count less
        the instances of it already known (adopted by reconcile), so none is counted twice."""
        rows = self._db.execute(
            "SELECT l.cloud, l.count - (SELECT COUNT(*) FROM vms v WHERE v.launch_id = l.id) "
            "FROM launches l WHERE l.state = ?",
            (LaunchState.PENDING,),
        ).fetchall()
        counts: dict[str, int] = {}
        for cloud, missing in rows:
            counts[cloud] = counts.get(cloud, 0) + max(missing, 0)
        return counts

    def complete_launch(
        self, launch_id: str, instances: Iterable[tuple[str, str | None]], now: float
    ) -> list[str]:
        """Record the instances a launch returned (id, address); returns the ids newly added."""
        launch = self.launch(launch_id)
        instances = list(instances)
        added: list[str] = []
        with self._tx():
            for instance_id, address in instances:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO vms(id, cloud, launch_id, state, launched_at, "
                    "state_since, address) VALUES (?,?,?,?,?,?,?)",
                    (
                        instance_id,
                        launch.cloud,
                        launch_id,
                        VMState.REQUESTED,
                        now,
                        now,
                        address,
                    ),
                )
                if cur.rowcount:
                    added.append(instance_id)
                    # Every VM enters the log when it enters the pool: an event follower (the
                    # console) learns of it without re-reading the fleet.
                    self._event(
                        now,
                        EventKind.VM_REQUESTED,
                        f"launched by {launch_id}",
                        vm_id=instance_id,
                        cloud=launch.cloud,
                    )
            ids = [i for i, _ in instances]
            self._db.execute(
                "UPDATE launches SET state = ?, instance_ids = ? WHERE id = ?",
                (LaunchState.DONE, json.dumps(ids), launch_id),
            )
            self._event(
                now,
                EventKind.LAUNCH_DONE,
                f"{len(ids)} of {launch.count} instances from {launch_id}: {' '.join(ids)}",
                cloud=launch.cloud,
            )
        return added

    def fail_launch(self, launch_id: str, error: str, now: float) -> None:
        launch = self.launch(launch_id)
        with self._tx():
            self._db.execute(
                "UPDATE launches SET state = ?, error = ? WHERE id = ?",
                (LaunchState.FAILED, error, launch_id),
            )
            self._event(
                now,
                EventKind.LAUNCH_FAILED,
                f"{launch_id} on {launch.cloud}: {error}",
                cloud=launch.cloud,
            )

    def adopt_vm(
        self, vm_id: str, cloud: str, launch_id: str, address: str | None, now: float
    ) -> VM:
        """Take over an instance found in the cloud by our tags but unknown to this store.
        Its launch time is its launch's, when the launch is known."""
        with self._tx():
            row = self._db.execute(
                "SELECT created_at FROM launches WHERE id = ?", (launch_id,)
            ).fetchone()
            launched_at = row["created_at"] if row else now
            self._db.execute(
                "INSERT OR IGNORE INTO vms(id, cloud, launch_id, state, launched_at, "
                "state_since, address) VALUES (?,?,?,?,?,?,?)",
                (vm_id, cloud, launch_id, VMState.BOOTING, launched_at, now, address),
            )
            self._event(
                now, EventKind.VM_ADOPTED, f"found by tag in {cloud}", vm_id=vm_id, cloud=cloud
            )
        return self.vm(vm_id)

    # ---- clouds -------------------------------------------------------------------------

    def cloud_status(self, name: str) -> CloudStatus:
        row = self._db.execute("SELECT * FROM clouds WHERE name = ?", (name,)).fetchone()
        if row is None:
            return CloudStatus(name=name)
        return CloudStatus(
            name=name,
            backoff_until=row["backoff_until"],
            backoff_level=row["backoff_level"],
            boot_failures=row["boot_failures"],
            last_error=row["last_error"],
        )

    def save_cloud_status(
        self, status: CloudStatus, now: float, event: tuple[EventKind, str] | None = None
    ) -> None:
        with self._tx():
            self._db.execute(
                "INSERT INTO clouds(name, backoff_until, backoff_level, boot_failures, last_error) "
                "VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "backoff_until = excluded.backoff_until, backoff_level = excluded.backoff_level, "
                "boot_failures = excluded.boot_failures, last_error = excluded.last_error",
                (
                    status.name,
                    status.backoff_until,
                    status.backoff_level,
                    status.boot_failures,
                    status.last_error,
                ),
            )
            if event:
                self._event(now, event[0], event[1], cloud=status.name)


__all__ = ["Database", "Launches"]
