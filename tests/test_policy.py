"""The scaling policy, rule by rule: pure inputs, a list of actions out."""

from __future__ import annotations

from dataclasses import replace

from core.model import VMState
from core.policy import (
    CloudView,
    Fail,
    Launch,
    Lose,
    Settings,
    Snapshot,
    Terminate,
    VMView,
    arrival_rate,
    boot_time,
    decide,
    warm_target,
)

NOW = 10_000.0
SETTINGS = Settings(
    min_vms=0,
    max_vms=10,
    idle_timeout_s=600,
    boot_timeout_s=900,
    heartbeat_timeout_s=300,
    max_launch_per_cycle=50,
    adaptive_warm=False,
)
A = CloudView("a", priority=1, max_instances=100)
B = CloudView("b", priority=2, max_instances=100)


def vm(n: int, state: VMState = VMState.IDLE, cloud: str = "a", **kw: object) -> VMView:
    defaults: dict[str, object] = {"launched_at": NOW - 1000, "last_heartbeat": NOW - 1}
    if state == VMState.IDLE:
        defaults["idle_since"] = NOW - 10
    defaults.update(kw)
    return VMView(id=f"i-{n}", cloud=cloud, state=state, **defaults)  # type: ignore[arg-type]


def snap(*vms: VMView, clouds: tuple[CloudView, ...] = (A, B), **kw: object) -> Snapshot:
    return Snapshot(vms=vms, clouds=clouds, **kw)  # type: ignore[arg-type]


def launches(actions: list) -> dict[str, int]:
    return {a.cloud: a.count for a in actions if isinstance(a, Launch)}


def terminated(actions: list) -> list[str]:
    return [a.vm_id for a in actions if isinstance(a, Terminate)]


def test_launches_for_waiting_jobs_not_covered_by_idle_or_booting_vms() -> None:
    pool = (vm(1), vm(2, VMState.BOOTING, launched_at=NOW - 5), vm(3, VMState.BUSY, has_job=True))
    assert launches(decide(snap(*pool), 5, NOW, SETTINGS)) == {"a": 3}


def test_no_launch_when_idle_vms_cover_the_queue() -> None:
    assert decide(snap(vm(1), vm(2)), 2, NOW, SETTINGS) == []


def test_launch_is_capped_by_max_vms_and_max_launch_per_cycle() -> None:
    assert launches(decide(snap(vm(1, VMState.BUSY)), 50, NOW, SETTINGS)) == {"a": 9}
    capped = replace(SETTINGS, max_launch_per_cycle=4)
    assert launches(decide(snap(), 50, NOW, capped)) == {"a": 4}


def test_quota_smaller_than_demand_spills_to_next_cloud_by_priority() -> None:
    clouds = (CloudView("b", 2, 100), CloudView("a", 1, 3))
    pool = (vm(1, VMState.BUSY), vm(2, VMState.BUSY))
    assert launches(decide(snap(*pool, clouds=clouds), 20, NOW, SETTINGS)) == {"a": 1, "b": 7}


def test_quota_counts_vms_still_terminating_in_that_cloud() -> None:
    clouds = (CloudView("a", 1, 2),)
    pool = (vm(1, VMState.TERMINATING), vm(2, VMState.BUSY))
    assert launches(decide(snap(*pool, clouds=clouds), 5, NOW, SETTINGS)) == {}


def test_cloud_in_backoff_is_skipped_until_backoff_ends() -> None:
    clouds = (replace(A, backoff_until=NOW + 60), B)
    assert launches(decide(snap(clouds=clouds), 4, NOW, SETTINGS)) == {"b": 4}
    assert launches(decide(snap(clouds=clouds), 4, NOW + 61, SETTINGS)) == {"a": 4}


def test_all_clouds_in_backoff_launches_nothing() -> None:
    clouds = (replace(A, backoff_until=NOW + 1), replace(B, backoff_until=NOW + 1))
    assert decide(snap(clouds=clouds), 10, NOW, SETTINGS) == []


def test_cloud_with_launch_in_flight_gets_no_second_launch() -> None:
    clouds = (replace(A, launch_in_flight=True), B)
    assert launches(decide(snap(clouds=clouds), 3, NOW, SETTINGS)) == {"b": 3}


def test_vms_of_a_launch_in_flight_count_against_demand_max_and_quota() -> None:
    clouds = (replace(A, launch_in_flight=True, pending=6, max_instances=8), B)
    assert launches(decide(snap(clouds=clouds), 8, NOW, SETTINGS)) == {"b": 2}
    assert launches(decide(snap(clouds=clouds), 20, NOW, SETTINGS)) == {"b": 4}  # max_vms 10
    assert launches(decide(snap(clouds=clouds), 6, NOW, SETTINGS)) == {}


def test_min_vms_is_kept_alive_without_any_demand() -> None:
    warm = replace(SETTINGS, min_vms=3)
    assert launches(decide(snap(vm(1)), 0, NOW, warm)) == {"a": 2}


def test_min_equals_max_holds_the_pool_fixed() -> None:
    fixed = replace(SETTINGS, min_vms=2, max_vms=2)
    assert launches(decide(snap(), 10, NOW, fixed)) == {"a": 2}
    old = (vm(1, idle_since=NOW - 5000), vm(2, idle_since=NOW - 5000))
    assert decide(snap(*old), 10, NOW, fixed) == []
    assert decide(snap(*old), 0, NOW, fixed) == []


def test_max_zero_launches_nothing_and_reaps_idle_vms_at_once() -> None:
    empty = replace(SETTINGS, max_vms=0)
    assert decide(snap(), 100, NOW, empty) == []
    assert terminated(decide(snap(vm(1)), 0, NOW, empty)) == ["i-1"]


def test_idle_vm_is_reaped_after_idle_timeout_when_above_min() -> None:
    pool = (vm(1, idle_since=NOW - 601), vm(2, idle_since=NOW - 599))
    assert terminated(decide(snap(*pool), 0, NOW, SETTINGS)) == ["i-1"]


def test_reaping_stops_at_min_vms_longest_idle_first() -> None:
    pool = (
        vm(1, idle_since=NOW - 700),
        vm(2, idle_since=NOW - 900),
        vm(3, idle_since=NOW - 800),
    )
    assert terminated(decide(snap(*pool), 0, NOW, replace(SETTINGS, min_vms=1))) == ["i-2", "i-3"]


def test_idle_vms_needed_by_waiting_jobs_are_not_reaped() -> None:
    pool = (vm(1, idle_since=NOW - 700), vm(2, idle_since=NOW - 700))
    assert terminated(decide(snap(*pool), 1, NOW, SETTINGS)) == ["i-1"]


def test_lowering_max_terminates_idle_vms_above_it_without_waiting_for_the_timer() -> None:
    pool = (vm(1), vm(2), vm(3, VMState.BUSY, has_job=True))
    assert terminated(decide(snap(*pool), 0, NOW, replace(SETTINGS, max_vms=1))) == ["i-1", "i-2"]


def test_vm_never_registering_within_boot_timeout_fails() -> None:
    late = vm(1, VMState.BOOTING, launched_at=NOW - 901, last_heartbeat=None)
    fresh = vm(2, VMState.REQUESTED, launched_at=NOW - 899, last_heartbeat=None)
    actions = decide(snap(late, fresh), 0, NOW, SETTINGS)
    assert [a for a in actions if isinstance(a, Fail)] == [Fail("i-1", actions[0].reason)]
    assert "boot_timeout_s=900" in actions[0].reason


def test_failed_vm_is_replaced_in_the_same_cycle() -> None:
    late = vm(1, VMState.BOOTING, launched_at=NOW - 901)
    actions = decide(snap(late), 1, NOW, SETTINGS)
    assert isinstance(actions[0], Fail)
    assert launches(actions) == {"a": 1}


def test_silent_vm_is_lost_after_heartbeat_timeout() -> None:
    silent = vm(1, VMState.BUSY, has_job=True, last_heartbeat=NOW - 301)
    alive = vm(2, VMState.BUSY, has_job=True, last_heartbeat=NOW - 299)
    actions = decide(snap(silent, alive), 0, NOW, SETTINGS)
    assert [type(a) for a in actions] == [Lose]
    assert actions[0].vm_id == "i-1"


def test_draining_vm_is_terminated_once_its_job_ends() -> None:
    running = vm(1, VMState.DRAINING, has_job=True)
    done = vm(2, VMState.DRAINING, has_job=False)
    assert terminated(decide(snap(running, done), 0, NOW, SETTINGS)) == ["i-2"]


def test_killed_vm_is_terminated_even_when_busy_and_paused() -> None:
    killed = vm(1, VMState.BUSY, has_job=True, kill_requested=True)
    actions = decide(snap(killed), 0, NOW, replace(SETTINGS, paused=True))
    assert terminated(actions) == ["i-1"]


def test_paused_scaling_neither_launches_nor_reaps_but_still_fails_dead_vms() -> None:
    paused = replace(SETTINGS, paused=True, min_vms=5)
    stale = vm(1, idle_since=NOW - 9999)
    late = vm(2, VMState.BOOTING, launched_at=NOW - 901)
    actions = decide(snap(stale, late), 100, NOW, paused)
    assert [type(a) for a in actions] == [Fail]


def test_unknown_demand_changes_no_scaling() -> None:
    stale = vm(1, idle_since=NOW - 9999)
    assert decide(snap(stale), None, NOW, replace(SETTINGS, min_vms=0)) == []
    assert decide(snap(), None, NOW, replace(SETTINGS, min_vms=3)) == []


def test_adaptive_warm_target_is_expected_arrivals_during_a_boot_plus_a_square_root_margin() -> (
    None
):
    adaptive = replace(SETTINGS, adaptive_warm=True, max_vms=100)
    busy = snap(arrival_rate=0.09, boot_time_s=100)  # 9 jobs expected during one boot
    assert warm_target(busy, adaptive) == 12  # 9 + sqrt(9)
    assert warm_target(busy, replace(adaptive, warm_margin=0)) == 9
    assert warm_target(busy, replace(adaptive, warm_margin=0, cycle_interval_s=20)) == 11
    assert launches(decide(busy, 2, NOW, adaptive)) == {"a": 14}
    assert warm_target(snap(arrival_rate=1.0, boot_time_s=100), adaptive) == 100  # max_vms
    assert warm_target(busy, SETTINGS) == 0


def test_quiet_hours_keep_what_the_day_average_expects_during_a_boot_and_nothing_after() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, cycle_interval_s=20)
    after_bursts = snap(arrival_rate=0.0, baseline_rate=0.025, boot_time_s=100)
    assert warm_target(after_bursts, adaptive) == 3  # 0.025 jobs/s x 120 s, no margin
    assert launches(decide(after_bursts, 0, NOW, adaptive)) == {"a": 3}
    quiet_day = snap(arrival_rate=0.0, baseline_rate=0.0, boot_time_s=100)
    assert warm_target(quiet_day, adaptive) == 0


def test_arrival_rate_rises_within_seconds_of_a_burst_and_decays_over_the_window() -> None:
    assert arrival_rate(12, 600, last_minute=12, last_minute_span_s=22) == 11 / 22  # onset
    assert arrival_rate(600, 600, last_minute=0, last_minute_span_s=0) == 1.0  # burst ended
    assert arrival_rate(0, 600, last_minute=0, last_minute_span_s=0) == 0.0  # quiet hours


def test_arrival_rate_is_not_fooled_by_one_job_or_two_close_together() -> None:
    assert arrival_rate(1, 600, last_minute=1, last_minute_span_s=0.5) == 1 / 600
    assert arrival_rate(2, 600, last_minute=2, last_minute_span_s=1) == 1 / 15  # span >= 15 s


def test_boot_time_is_the_slow_case_of_recent_boots_or_the_guess_before_any() -> None:
    assert boot_time([], guess_s=120) == 120
    boots = [float(t) for t in range(61, 161)]  # 61 s .. 160 s
    assert boot_time(boots, guess_s=120) == 150  # the 90th percentile


def test_warm_idle_vms_are_kept_while_arrivals_continue_and_reaped_when_they_stop() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, warm_margin=0)
    pool = tuple(vm(n, idle_since=NOW - 700) for n in range(4))
    busy = snap(*pool, arrival_rate=0.03, boot_time_s=100)
    assert terminated(decide(busy, 0, NOW, adaptive)) == ["i-0"]
    quiet = snap(*pool, arrival_rate=0.0, boot_time_s=100)
    assert len(terminated(decide(quiet, 0, NOW, adaptive))) == 4


def test_terminating_and_terminated_vms_are_left_alone() -> None:
    pool = (
        vm(1, VMState.TERMINATING, kill_requested=True),
        vm(2, VMState.TERMINATED, launched_at=0),
    )
    assert decide(snap(*pool), 0, NOW, SETTINGS) == []
