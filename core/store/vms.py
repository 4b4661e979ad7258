"""VMs: what the cloud gave us, what their agents say, and their state machine."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from core.model import (
    STOPPED_SERVING_STATES,
    TOKEN_REVOKED_STATES,
    VM,
    EventKind,
    Reason,
    VMState,
    check_vm,
    vm_columns,
)
from core.store.db import Database
from core.store.errors import Conflict, NotFound

# VMs are read as plain tuples in VM's field order, states mapped through a dict: the engine
# reads the whole fleet every cycle, and named rows plus Enum lookups took three times as long.
# ``jobs`` is no column: the jobs that hold a slot of the VM say it.
_VM_FIELDS = ", ".join(field.name for field in dataclasses.fields(VM) if field.name != "jobs")
_VM_STATES = {state.value: state for state in VMState}
# A VM as the policy reads it (``VMs.fleet``): id, cloud, state, launched_at, idle_since,
# last_heartbeat, launch_id, kill_requested, pilot_busy and how many slots hold a job.
FleetRow = tuple[str, str, VMState, float, float | None, float | None, str, bool, bool, int]


# What a VM that holds no job is read with: one shared empty dict, not one per VM (most of a
# large fleet holds nothing, and the engine reads it every cycle). VM.jobs is a Mapping, so
# the type checker refuses writes to it; MappingProxyType would also refuse dataclasses.asdict.
_NO_JOBS: Mapping[int, int] = {}


# One VM by its id or its token's hash and, last, the jobs its slots hold as
# "slot:job,slot:job" (NULL: none).
_ONE_VM = {
    column: f"SELECT {_VM_FIELDS}, (SELECT group_concat(jobs.slot || ':' || jobs.id) FROM jobs "
    f"WHERE jobs.vm_id = vms.id AND jobs.slot IS NOT NULL) FROM vms WHERE {column} = ?"
    for column in ("id", "token_hash")
}


def _vm(row: tuple[Any, ...], jobs: Mapping[int, int]) -> VM:
    """A VM from a row of ``SELECT {_VM_FIELDS}``, with the jobs its slots hold."""
    # mypy cannot count a sliced tuple's items; the row holds VM's fields in order.
    return VM(*row[:3], _VM_STATES[row[3]], *row[4:10], bool(row[10]), bool(row[11]), jobs)  # type: ignore[call-arg]


class VMs(Database):
    def _select_vms(
        self, where: str, params: Iterable[Any], held: tuple[str, tuple[Any, ...]] = ("", ())
    ) -> list[VM]:
        """VMs with the jobs their slots hold; ``held``: a condition on ``vms`` and its
        parameters that narrows which held jobs are read (those of one VM, of some states)
        to the VMs ``where`` selects."""
        cursor = self._db.cursor()
        cursor.row_factory = None
        cursor.execute(
            "SELECT jobs.vm_id, jobs.slot, jobs.id FROM jobs JOIN vms ON vms.id = jobs.vm_id "
            f"WHERE jobs.slot IS NOT NULL {held[0]}",
            held[1],
        )
        holding: dict[str, dict[int, int]] = {}
        for owner, slot, job_id in cursor:
            holding.setdefault(owner, {})[slot] = job_id
        cursor.execute(f"SELECT {_VM_FIELDS} FROM vms {where}", tuple(params))
        return [_vm(row, holding.get(row[0], _NO_JOBS)) for row in cursor]

    def _one_vm(self, column: Literal["id", "token_hash"], value: str) -> VM | None:
        """The VM whose ``column`` (its id or its token's hash) is ``value``, in one statement
        with the jobs its slots hold: every agent request reads its VM (two statements were
        a third more of a request's store time)."""
        cursor = self._db.cursor()
        cursor.row_factory = None
        row = cursor.execute(_ONE_VM[column], (value,)).fetchone()
        if row is None:
            return None
        held: str | None = row[-1]
        if held is None:
            return _vm(row, _NO_JOBS)
        pairs = (pair.split(":") for pair in held.split(","))
        return _vm(row, {int(slot): int(job_id) for slot, job_id in pairs})

    def vm(self, vm_id: str) -> VM:
        found = self._one_vm("id", vm_id)
        if found is None:
            raise NotFound(f"vm {vm_id} not found")
        return found

    def vms(self, states: Iterable[VMState] | None = None) -> list[VM]:
        """VMs (in ``states``) by launch time."""
        wanted = tuple(VMState if states is None else states)
        marks = ",".join("?" * len(wanted))
        return self._select_vms(
            f"WHERE state IN ({marks}) ORDER BY launched_at, id",
            wanted,
            (
                "" if states is None else f"AND vms.state IN ({marks})",
                () if states is None else wanted,
            ),
        )

    def fleet(self, states: Iterable[VMState]) -> list[FleetRow]:
        """What the policy reads of each VM in ``states``, by launch time: a few columns and
        how many slots hold a job, without building whole VMs (the engine reads the fleet at
        every cycle: 10,000 VMs take about half the time read this way)."""
        wanted = tuple(states)
        cursor = self._db.cursor()
        cursor.row_factory = None
        cursor.execute(
            "SELECT id, cloud, state, launched_at, idle_since, last_heartbeat, launch_id, "
            "kill_requested, pilot_busy, (SELECT COUNT(*) FROM jobs WHERE jobs.vm_id = vms.id "
            f"AND jobs.slot IS NOT NULL) FROM vms WHERE state IN ({','.join('?' * len(wanted))}) "
            "ORDER BY launched_at, id",
            wanted,
        )
        state_of = _VM_STATES
        return [
            (r[0], r[1], state_of[r[2]], r[3], r[4], r[5], r[6], bool(r[7]), bool(r[8]), r[9])
            for r in cursor
        ]

    def ids_by_cloud(self, states: Iterable[VMState]) -> dict[str, list[str]]:
        """The ids of the VMs in ``states``, per cloud: counts and prices of a large fleet
        without reading whole VMs (the admin status is read every few seconds)."""
        wanted = tuple(states)
        cursor = self._db.cursor()
        cursor.row_factory = None
        found: dict[str, list[str]] = {}
        marks = ",".join("?" * len(wanted))
        for vm_id, cloud in cursor.execute(
            f"SELECT id, cloud FROM vms WHERE state IN ({marks})", wanted
        ):
            found.setdefault(cloud, []).append(vm_id)
        return found

    def vm_counts(self) -> dict[VMState, int]:
        counts = dict.fromkeys(VMState, 0)
        for row in self._db.execute("SELECT state, COUNT(*) AS n FROM vms GROUP BY state"):
            counts[VMState(row["state"])] = row["n"]
        return counts

    def _stopped_serving(self, vm: VM, now: float, why: str, spend_attempt: bool) -> None:
        """A VM stopped serving: the jobs side decides what becomes of its work."""
        raise NotImplementedError

    def transition_vm(
        self,
        vm_id: str,
        new: VMState,
        now: float,
        why: str,
        reason: Reason | None = None,
        *,
        spend_attempt: bool = True,
    ) -> VM:
        """Move a VM to ``new`` (checked against the state machine); the columns that go with
        the new state come from ``model.vm_columns``. A job on a VM that stops serving is
        requeued (``spend_attempt`` False: a cloud's interruption, nobody's fault)."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state == new:
                return vm
            check_vm(vm.state, new)
            columns = vm_columns(new, now)
            if new in STOPPED_SERVING_STATES and vm.state not in STOPPED_SERVING_STATES:
                self._stopped_serving(vm, now, f"vm {vm_id} {new}: {why}", spend_attempt)
            if new in TOKEN_REVOKED_STATES:
                columns["token_hash"] = None
            sets = ", ".join(f"{name} = ?" for name in columns)
            self._db.execute(f"UPDATE vms SET {sets} WHERE id = ?", (*columns.values(), vm_id))
            self._event(now, EventKind.for_vm(new), why, vm_id=vm_id, cloud=vm.cloud, reason=reason)
        return self.vm(vm_id)

    def vm_running(self, vm_id: str, address: str | None, now: float) -> None:
        """The cloud reports the instance running: it is booting until its agent registers."""
        with self._tx():
            vm = self.vm(vm_id)
            if address and address != vm.address:
                self._db.execute("UPDATE vms SET address = ? WHERE id = ?", (address, vm_id))
            if vm.state == VMState.REQUESTED:
                self.transition_vm(
                    vm_id, VMState.BOOTING, now, "running in the cloud", Reason.RUNNING_IN_CLOUD
                )

    def register_vm(
        self,
        vm_id: str,
        now: float,
        *,
        token_hash: str | None = None,
        address: str | None = None,
    ) -> VM:
        """The VM's agent registered: it gets its token and is idle, in one transaction."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state not in (VMState.REQUESTED, VMState.BOOTING) or self.has_token(vm_id):
                raise Conflict(f"vm {vm_id} is {vm.state}, it cannot register")
            self._db.execute(
                "UPDATE vms SET registered_at = ?, last_heartbeat = ?, token_hash = ?, "
                "address = COALESCE(?, address) WHERE id = ?",
                (now, now, token_hash, address, vm_id),
            )
            self._db.execute("UPDATE clouds SET boot_failures = 0 WHERE name = ?", (vm.cloud,))
            self.transition_vm(vm_id, VMState.IDLE, now, "agent registered", Reason.REGISTERED)
        return self.vm(vm_id)

    def vm_by_token(self, token_hash: str) -> VM | None:
        """The VM that holds this token, while it has not left."""
        found = self._one_vm("token_hash", token_hash)
        return found if found is not None and found.state not in TOKEN_REVOKED_STATES else None

    def has_token(self, vm_id: str) -> bool:
        row = self._db.execute("SELECT token_hash FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return bool(row and row["token_hash"])

    def save_heartbeats(
        self, seen: Mapping[str, float], now: float | None = None, saved_key: str | None = None
    ) -> None:
        """Last heartbeats kept in memory (``core.liveness``), written together; with
        ``saved_key``, also when this was done (the next start grants its grace only to VMs
        fresh then)."""
        with self._tx():
            self._db.executemany(
                "UPDATE vms SET last_heartbeat = MAX(COALESCE(last_heartbeat, 0), ?) WHERE id = ?",
                [(at, vm_id) for vm_id, at in seen.items()],
            )
            if saved_key is not None:
                self._db.execute(
                    "INSERT INTO settings(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (saved_key, json.dumps(now)),
                )

    def request_kill(self, vm_id: str, now: float) -> VM:
        """Ask the engine to terminate the VM at its next cycle; its job is requeued then."""
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state in (VMState.TERMINATING, VMState.TERMINATED):
                raise Conflict(f"vm {vm_id} is already {vm.state}")
            self._db.execute("UPDATE vms SET kill_requested = 1 WHERE id = ?", (vm_id,))
            self._event(
                now,
                EventKind.VM_KILL_REQUESTED,
                "kill requested",
                vm_id=vm_id,
                cloud=vm.cloud,
                reason=Reason.KILLED,
            )
        return self.vm(vm_id)

    def drain_vm(
        self,
        vm_id: str,
        now: float,
        why: str = "drain requested",
        reason: Reason = Reason.DRAIN_REQUESTED,
    ) -> VM:
        with self._tx():
            vm = self.vm(vm_id)
            if vm.state == VMState.DRAINING:
                return vm
            if vm.state not in (VMState.IDLE, VMState.BUSY):
                raise Conflict(f"vm {vm_id} is {vm.state}, only idle or busy VMs can be drained")
            return self.transition_vm(vm_id, VMState.DRAINING, now, why, reason)

    def recent_boot_times(self, limit: int = 50) -> list[float]:
        rows = self._db.execute(
            "SELECT registered_at - launched_at AS t FROM vms WHERE registered_at IS NOT NULL "
            "ORDER BY registered_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [r["t"] for r in rows]
