"""The store: FIFO assignment, idempotent reports, requeue on VM loss, durability."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.model import EventKind, JobState, LaunchState, VMState
from core.store import Conflict, NotFound, Store

T0 = 1000.0


def idle_vm(store: Store, vm_id: str = "i-1", cloud: str = "a") -> str:
    store.add_launch(f"L-{vm_id}", cloud, 1, f"tok-{vm_id}", T0)
    store.complete_launch(f"L-{vm_id}", [(vm_id, "10.0.0.1")], T0)
    store.register_vm(vm_id, T0 + 1, token_hash=f"h-{vm_id}")
    return vm_id


def test_jobs_are_assigned_first_in_first_out(store: Store) -> None:
    ids = [store.submit_job(["echo", str(n)], T0).id for n in range(3)]
    idle_vm(store, "i-1")
    idle_vm(store, "i-2")
    assert store.assign_next_job("i-1", T0 + 2).id == ids[0]
    assert store.assign_next_job("i-2", T0 + 2).id == ids[1]
    assert store.vm("i-1").state == VMState.BUSY
    assert store.vm("i-1").job_id == ids[0]


def test_empty_queue_assigns_nothing_and_a_held_slot_cannot_take_a_second_job(
    store: Store,
) -> None:
    idle_vm(store)
    assert store.assign_next_job("i-1", T0) is None
    store.submit_job(["true"], T0)
    store.submit_job(["true"], T0)
    store.assign_next_job("i-1", T0)
    with pytest.raises(Conflict, match="slot 0 of vm i-1 holds job 1"):
        store.assign_next_job("i-1", T0)


def test_a_busy_vm_takes_a_job_on_each_free_slot_and_is_idle_only_when_all_are_free(
    store: Store,
) -> None:
    idle_vm(store)
    a, b, c = (store.submit_job(["true"], T0).id for _ in range(3))
    assert store.assign_next_job("i-1", T0 + 1, slot=1).id == a
    assert store.assign_next_job("i-1", T0 + 2, slot=0).id == b
    vm = store.vm("i-1")
    assert (vm.state, vm.jobs, vm.job_id) == (VMState.BUSY, {1: a, 0: b}, b)
    # Every way of reading a VM sees the same held jobs (one VM is read in one statement).
    assert store.vms() == [vm] and store.vm_by_token("h-i-1") == vm
    assert (store.job(a).slot, store.job(b).slot, store.job(c).slot) == (1, 0, None)
    store.finish_job(a, 1, "i-1", 0, "", T0 + 3)
    vm = store.vm("i-1")
    assert (vm.state, vm.jobs, vm.idle_since) == (VMState.BUSY, {0: b}, None)
    assert store.assign_next_job("i-1", T0 + 4, slot=1).id == c  # the freed slot
    store.finish_job(b, 1, "i-1", 0, "", T0 + 5)
    store.finish_job(c, 1, "i-1", 1, "", T0 + 6)
    vm = store.vm("i-1")
    assert (vm.state, vm.jobs, vm.idle_since) == (VMState.IDLE, {}, T0 + 6)
    assert [e.kind for e in store.events_for_vm("i-1")].count("vm_idle") == 2  # register, end


def test_the_fleet_as_the_policy_reads_it_counts_the_slots_holding_a_job(store: Store) -> None:
    idle_vm(store, "i-1")
    idle_vm(store, "i-2")
    a, b, _ = (store.submit_job(["true"], T0).id for _ in range(3))
    store.assign_next_job("i-1", T0 + 2, slot=0)
    store.assign_next_job("i-1", T0 + 3, slot=1)
    store.finish_job(a, 1, "i-1", 0, "", T0 + 4)  # a finished job holds no slot
    store.set_pilot_busy("i-2", True, T0 + 4)
    rows = {row[0]: row for row in store.fleet([VMState.IDLE, VMState.BUSY])}
    busy, pilot = rows["i-1"], rows["i-2"]
    assert (busy[1], busy[2], busy[3], busy[6], busy[9]) == ("a", VMState.BUSY, T0, "L-i-1", 1)
    assert store.job(b).slot == 1
    assert (pilot[2], pilot[4], pilot[8], pilot[9]) == (VMState.BUSY, None, True, 0)
    assert store.fleet([VMState.BOOTING]) == []


def test_a_vm_that_stops_serving_requeues_every_job_its_slots_hold(store: Store) -> None:
    idle_vm(store)
    jobs = [store.submit_job(["x"], T0, max_attempts=3).id for _ in range(3)]
    for slot in range(3):
        store.assign_next_job("i-1", T0, slot=slot)
    store.start_job(jobs[0], 1, "i-1", T0)
    store.cancel_job(jobs[2], T0)  # held cancelled: it lets go, and stays cancelled
    store.transition_vm("i-1", VMState.LOST, T0 + 5, "no heartbeat")
    after = [store.job(j) for j in jobs]
    assert [(j.state, j.attempt, j.vm_id, j.slot) for j in after[:2]] == [
        (JobState.QUEUED, 2, None, None)
    ] * 2
    assert (after[2].state, after[2].slot) == (JobState.CANCELLED, None)
    assert store.vm("i-1").jobs == {}


def test_a_spot_interruption_requeues_every_job_without_spending_an_attempt(
    store: Store,
) -> None:
    idle_vm(store)
    jobs = [store.submit_job(["x"], T0, max_attempts=1).id for _ in range(2)]
    store.assign_next_job("i-1", T0, slot=0)
    store.assign_next_job("i-1", T0, slot=1)
    store.interrupt_vm("i-1", T0 + 1, "spot termination notice")
    after = [store.job(j) for j in jobs]
    assert [(j.state, j.attempt, j.max_attempts) for j in after] == [(JobState.QUEUED, 2, 2)] * 2
    assert store.vm("i-1").jobs == {}


def test_cancelling_one_job_of_a_vm_names_only_it_and_frees_only_its_slot(store: Store) -> None:
    idle_vm(store)
    a, b = (store.submit_job(["x"], T0).id for _ in range(2))
    store.assign_next_job("i-1", T0, slot=0)
    store.assign_next_job("i-1", T0, slot=1)
    store.cancel_job(b, T0 + 1)
    assert store.cancelled_on(store.vm("i-1")) == [b]
    seq = store.last_seq()
    store.finish_job(b, 1, "i-1", -15, "killed", T0 + 2)
    vm = store.vm("i-1")
    assert (vm.state, vm.jobs, store.cancelled_on(vm)) == (VMState.BUSY, {0: a}, [])
    # The VM stays busy, so no VM event: this one tells followers the slot is free.
    [freed] = store.events_after(seq)
    assert (freed.kind, freed.vm_id, freed.job_id) == (EventKind.JOB_CANCELLED, "i-1", b)


def test_a_draining_vm_takes_no_job_on_any_slot(store: Store) -> None:
    idle_vm(store)
    store.submit_job(["x"], T0)
    store.submit_job(["x"], T0)
    store.assign_next_job("i-1", T0, slot=0)
    store.drain_vm("i-1", T0 + 1)
    with pytest.raises(Conflict, match="i-1 is draining"):
        store.assign_next_job("i-1", T0 + 2, slot=1)


def test_finish_report_is_idempotent_and_frees_the_vm(store: Store) -> None:
    idle_vm(store)
    job = store.submit_job(["true"], T0)
    store.assign_next_job("i-1", T0 + 1)
    store.start_job(job.id, 1, "i-1", T0 + 2)
    first = store.finish_job(job.id, 1, "i-1", 0, "ok\n", T0 + 3)
    again = store.finish_job(job.id, 1, "i-1", 0, "ok\n", T0 + 9)
    assert first is not None and again is not None
    assert first.state == again.state == JobState.DONE
    assert again.finished_at == T0 + 3
    assert store.vm("i-1").state == VMState.IDLE
    assert store.vm("i-1").idle_since == T0 + 3
    finished_events = [e for e in store.events_after(0) if e.kind == "job_done"]
    assert len(finished_events) == 1


def test_nonzero_exit_marks_the_job_failed_with_reason(store: Store) -> None:
    idle_vm(store)
    job = store.submit_job(["false"], T0)
    store.assign_next_job("i-1", T0)
    done = store.finish_job(job.id, 1, "i-1", 3, "boom", T0 + 1)
    assert done is not None and done.state == JobState.FAILED
    assert done.reason == "exit code 3"


def test_lost_vm_requeues_its_job_with_next_attempt_and_stale_report_is_ignored(
    store: Store,
) -> None:
    idle_vm(store)
    job = store.submit_job(["sleep", "9"], T0, max_attempts=3)
    store.assign_next_job("i-1", T0)
    store.start_job(job.id, 1, "i-1", T0)
    store.transition_vm("i-1", VMState.LOST, T0 + 5, "no heartbeat")
    requeued = store.job(job.id)
    assert (requeued.state, requeued.attempt, requeued.vm_id) == (JobState.QUEUED, 2, None)
    assert store.vm("i-1").job_id is None
    stale = store.finish_job(job.id, 1, "i-1", 0, "late", T0 + 6)
    assert stale is None
    assert store.job(job.id).state == JobState.QUEUED


def test_job_fails_after_max_attempts_of_vm_loss(store: Store) -> None:
    job = store.submit_job(["x"], T0, max_attempts=2)
    for n in (1, 2):
        vm = idle_vm(store, f"i-{n}")
        assert store.assign_next_job(vm, T0).id == job.id
        store.transition_vm(vm, VMState.LOST, T0, "gone")
    final = store.job(job.id)
    assert final.state == JobState.FAILED
    failed = [e for e in store.events_after(0) if e.kind == "job_failed"]
    assert [e.job_id for e in failed] == [job.id]
    assert "gave up after 2 attempts" in failed[0].message
    assert (final.vm_id, final.slot) == ("i-2", None)  # where it failed; its slot let go
    assert store.vm("i-2").jobs == {} and store.slots_used() == 0


def test_cancelled_running_job_keeps_its_vm_busy_until_the_agent_reports_it_stopped(
    store: Store,
) -> None:
    idle_vm(store)
    job = store.submit_job(["x"], T0)
    store.assign_next_job("i-1", T0)
    assert store.cancel_job(job.id, T0 + 1).state == JobState.CANCELLED
    assert store.vm("i-1").state == VMState.BUSY
    assert store.cancelled_on(store.vm("i-1")) == [job.id]
    stopped = store.finish_job(job.id, 1, "i-1", -15, "killed", T0 + 2)
    assert stopped is not None and stopped.state == JobState.CANCELLED
    assert stopped.output_tail == "killed"
    assert store.vm("i-1").state == VMState.IDLE
    assert store.cancelled_on(store.vm("i-1")) == []
    with pytest.raises(Conflict, match="cancelled"):
        store.cancel_job(job.id, T0 + 2)
    with pytest.raises(NotFound):
        store.cancel_job(999, T0)


def test_illegal_vm_transition_leaves_nothing_half_written(store: Store) -> None:
    idle_vm(store)
    job = store.submit_job(["x"], T0)
    store.assign_next_job("i-1", T0)
    store.transition_vm("i-1", VMState.DRAINING, T0, "drain")
    seq = store.last_seq()
    # Inside one transaction: the drained VM's job is requeued and its events written, then
    # the illegal step raises; all of it must roll back.
    with pytest.raises(Exception, match="lost -> idle"), store._tx():
        store.transition_vm("i-1", VMState.LOST, T0, "lost")
        assert store.job(job.id).state == JobState.QUEUED
        store.transition_vm("i-1", VMState.IDLE, T0, "back?")
    assert store.vm("i-1").state == VMState.DRAINING
    assert store.job(job.id).state == JobState.ASSIGNED
    assert store.last_seq() == seq


def test_events_are_logged_only_after_their_transaction_commits(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="alienec2.events")
    with pytest.raises(RuntimeError), store._tx():
        store.submit_job(["x"], T0)
        assert "job_queued" not in caplog.text
        raise RuntimeError("crash before commit")
    assert "job_queued" not in caplog.text
    store.submit_job(["y"], T0)
    assert "event=job_queued" in caplog.text


def test_pending_launch_counts_only_instances_not_yet_known(store: Store) -> None:
    store.add_launch("L1", "a", 3, "t", T0)
    assert store.pending_counts() == {"a": 3}
    store.adopt_vm("i-1", "a", "L1", None, T0)
    store.adopt_vm("i-2", "a", "L1", None, T0)
    assert store.pending_counts() == {"a": 1}
    assert store.vm("i-1").launched_at == T0  # the launch's time, not the adoption's


def test_a_terminated_vms_token_no_longer_authenticates(store: Store) -> None:
    store.add_launch("L", "a", 1, "t", T0)
    store.complete_launch("L", [("i-1", None)], T0)
    store.register_vm("i-1", T0, token_hash="h1")
    assert store.vm_by_token("h1") is not None
    store.transition_vm("i-1", VMState.TERMINATED, T0, "gone")
    assert store.vm_by_token("h1") is None


def test_old_history_is_pruned_in_batches_and_live_jobs_are_kept(store: Store) -> None:
    idle_vm(store)
    old = [store.submit_job(["x"], T0).id for _ in range(5)]
    for job_id in old:
        store.cancel_job(job_id, T0)
    live = store.submit_job(["y"], T0).id
    assert store.prune_jobs(T0 + 1, batch=2) == 2
    assert store.prune_jobs(T0 + 1, batch=10) == 3
    assert store.job(live).state == JobState.QUEUED
    events = len(store.events_after(0))
    assert store.prune_events(T0 + 2, batch=events) == events
    assert store.events_after(0) == []
    # An emptied log still says where it stands: a follower behind it sees its gap.
    assert store.last_seq() == events
    assert store.first_seq() == events + 1


def test_state_and_event_sequence_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = Store(path)
    first.add_launch("L1", "a", 2, "tok", T0)
    job = first.submit_job(["echo"], T0)
    seq = first.last_seq()
    first.close()
    second = Store(path)
    assert [launch.id for launch in second.pending_launches()] == ["L1"]
    assert second.pending_launches()[0].state == LaunchState.PENDING
    assert second.job(job.id).command == ["echo"]
    second.record_event(T0, "note", "after restart")
    assert second.last_seq() == seq + 1
    assert [e.seq for e in second.events_after(seq)] == [seq + 1]
    second.close()


def test_drain_only_from_idle_or_busy(store: Store) -> None:
    store.add_launch("L", "a", 1, "t", T0)
    store.complete_launch("L", [("i-9", None)], T0)
    with pytest.raises(Conflict, match="requested"):
        store.drain_vm("i-9", T0)
    store.register_vm("i-9", T0)
    assert store.drain_vm("i-9", T0).state == VMState.DRAINING


def test_pilot_runs_go_on_while_their_vm_turns_busy_and_end_when_it_stops_serving(
    store: Store,
) -> None:
    idle_vm(store)
    vm = store.vm("i-1")
    run = store.record_run(
        vm,
        "i-1/r1",
        ["jobagent"],
        T0,
        finished=False,
        exit_code=None,
        output_tail="",
        alien_job_id=None,
        idle=None,
    )
    store.set_pilot_busy("i-1", True, T0 + 1)
    assert store.vm("i-1").state == VMState.BUSY
    assert store.job(run.id).state == JobState.RUNNING
    store.transition_vm("i-1", VMState.LOST, T0 + 2, "no heartbeat")
    ended = store.job(run.id)
    assert ended.state == JobState.FAILED and "lost" in (ended.reason or "")


def test_a_reader_sees_one_commit_for_the_whole_of_a_read_and_cannot_write(
    tmp_path: Path,
) -> None:
    """The engine reads the fleet on another thread: every read of one snapshot must see the
    same commit (a launch completed halfway through would be missed or counted twice)."""
    store = Store(tmp_path / "state.db")
    reader = store.reader()
    assert reader is not None
    store.submit_job(["echo", "1"], 1.0)
    with reader.one_read():
        assert reader.job_counts()[JobState.QUEUED] == 1
        store.submit_job(["echo", "2"], 2.0)  # committed by the writer meanwhile
        assert reader.job_counts()[JobState.QUEUED] == 1
        assert reader.submitted_since(0).jobs == 1
    assert reader.job_counts()[JobState.QUEUED] == 2
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.submit_job(["echo", "3"], 3.0)
    assert store.job_counts()[JobState.QUEUED] == 2
    reader.close()
    store.close()
    assert Store(":memory:").reader() is None  # no second connection to an in-memory file
