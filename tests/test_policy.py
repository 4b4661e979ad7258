"""The scaling policy, rule by rule: pure inputs, a list of actions out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from core.model import Reason, VMState
from core.policy import (
    CloudView,
    Decision,
    Drain,
    Fail,
    Launch,
    Lose,
    Settings,
    Snapshot,
    Terminate,
    VMView,
    arrival_rate,
    backoff_delay,
    boot_time,
    decide,
    explain,
    paid_until,
    poisson_tail,
    vanished,
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
    pool = (vm(1), vm(2, VMState.BOOTING, launched_at=NOW - 5), vm(3, VMState.BUSY, jobs=1))
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
    pool = (vm(1), vm(2), vm(3, VMState.BUSY, jobs=1))
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
    silent = vm(1, VMState.BUSY, jobs=1, last_heartbeat=NOW - 301)
    alive = vm(2, VMState.BUSY, jobs=1, last_heartbeat=NOW - 299)
    actions = decide(snap(silent, alive), 0, NOW, SETTINGS)
    assert [type(a) for a in actions] == [Lose]
    assert actions[0].vm_id == "i-1"


def test_draining_vm_is_terminated_once_its_job_ends() -> None:
    running = vm(1, VMState.DRAINING, jobs=1)
    done = vm(2, VMState.DRAINING, jobs=0)
    assert terminated(decide(snap(running, done), 0, NOW, SETTINGS)) == ["i-2"]


def test_killed_vm_is_terminated_even_when_busy_and_paused() -> None:
    killed = vm(1, VMState.BUSY, jobs=1, kill_requested=True)
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
    assert warm_target(after_bursts, adaptive) == 5  # 0.025 jobs/s x 120 s + sqrt(3)
    assert warm_target(after_bursts, replace(adaptive, warm_margin=0)) == 3
    assert launches(decide(after_bursts, 0, NOW, adaptive)) == {"a": 5}
    quiet_day = snap(arrival_rate=0.0, baseline_rate=0.0, boot_time_s=100)
    assert warm_target(quiet_day, adaptive) == 0


def test_completions_free_slots_so_steady_load_keeps_only_the_margin_warm() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, max_vms=100)
    steady = snap(arrival_rate=0.08, completion_rate=0.08, boot_time_s=100)  # 8 in, 8 out
    assert warm_target(steady, adaptive) == 4  # ceil(sqrt(16))
    draining = snap(arrival_rate=0.02, completion_rate=0.08, boot_time_s=100)
    assert warm_target(draining, adaptive) == 4  # ceil(sqrt(10)): never below the margin
    assert warm_target(draining, replace(adaptive, warm_margin=0)) == 0


def test_arrival_rate_rises_within_seconds_of_a_burst_and_decays_over_the_window() -> None:
    assert arrival_rate(12, 600, last_minute=12, last_minute_span_s=22) == 11 / 22  # onset
    assert arrival_rate(600, 600, last_minute=0, last_minute_span_s=0) == 1.0  # burst ended
    assert arrival_rate(0, 600, last_minute=0, last_minute_span_s=0) == 0.0  # quiet hours


def test_arrival_rate_is_not_fooled_by_one_job_or_two_close_together() -> None:
    assert arrival_rate(1, 600, last_minute=1, last_minute_span_s=0.5) == 0.0
    assert arrival_rate(2, 600, last_minute=2, last_minute_span_s=1) == 0.0
    assert arrival_rate(3, 600, last_minute=3, last_minute_span_s=30) == 0.0  # 3 < MIN_EVIDENCE


def test_arrival_rate_follows_once_it_rests_on_enough_arrivals() -> None:
    assert arrival_rate(4, 600, last_minute=4, last_minute_span_s=8) == 3 / 15  # span >= 15 s
    assert arrival_rate(4, 600, last_minute=0, last_minute_span_s=0) == 4 / 600


def test_four_jobs_close_together_on_steady_load_are_chance_not_a_burst() -> None:
    # 20 jobs in ten minutes (one per 30 s), four of them within 15 s: chance does that often
    # enough on a day of such load, so the window's rate stands and no warm VMs are added.
    steady = 20 / 600
    assert arrival_rate(20, 600, last_minute=4, last_minute_span_s=10) == steady
    assert arrival_rate(20, 600, last_minute=4, last_minute_span_s=10, recent_span_s=590) == steady


def test_a_burst_after_quiet_or_steady_load_is_followed_within_its_first_minute() -> None:
    assert arrival_rate(4, 600, last_minute=4, last_minute_span_s=10) == 3 / 15  # after quiet
    # 12 in the last 20 s where the 540 s before held 16 (0.6 expected in 20 s).
    assert arrival_rate(28, 600, last_minute=12, last_minute_span_s=20) == 11 / 20


def test_a_burst_that_began_within_the_window_is_measured_over_its_own_length() -> None:
    # Five minutes into a burst of 0.2 jobs/s: the last minute is no surprise after the four
    # before it, and the window's 60 jobs came in 300 s, not 600.
    assert arrival_rate(60, 600, last_minute=12, last_minute_span_s=58, recent_span_s=300) == (
        59 / 300
    )
    assert arrival_rate(60, 600, last_minute=12, last_minute_span_s=58) == 60 / 600


def test_poisson_tail_is_how_often_chance_gives_that_many() -> None:
    assert abs(poisson_tail(3, 0.5) - 0.014388) < 1e-6  # 1 - e^-0.5 (1 + 0.5 + 0.125)
    assert poisson_tail(3, 0.0) == 0.0  # nothing expected: any arrival is a surprise
    assert poisson_tail(0, 0.0) == 1.0
    assert poisson_tail(2, 3.0) == 1.0  # at or below the mean: no surprise
    assert 0.0 <= poisson_tail(5000, 1.0) < 1e-300  # far tails neither overflow nor loop


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


# ---- slots -----------------------------------------------------------------------------

EIGHT = replace(SETTINGS, slots_per_vm=8)


def test_free_slots_on_busy_and_idle_vms_take_waiting_jobs_before_any_launch() -> None:
    pool = (vm(1, VMState.BUSY, jobs=3), vm(2))  # 5 + 8 free slots
    assert launches(decide(snap(*pool), 13, NOW, EIGHT)) == {}
    assert launches(decide(snap(*pool), 14, NOW, EIGHT)) == {"a": 1}
    assert launches(decide(snap(*pool), 30, NOW, EIGHT)) == {"a": 3}  # 17 short: 3 VMs


def test_booting_vms_bring_all_their_slots() -> None:
    booting = tuple(vm(n, VMState.BOOTING, launched_at=NOW - 5) for n in (1, 2))
    assert launches(decide(snap(*booting), 16, NOW, EIGHT)) == {}
    assert launches(decide(snap(*booting), 17, NOW, EIGHT)) == {"a": 1}


def test_vm_with_one_slot_in_use_is_not_idle_and_never_reaped() -> None:
    pool = (vm(1, VMState.BUSY, jobs=1, idle_since=None), vm(2, idle_since=NOW - 700))
    assert terminated(decide(snap(*pool), 0, NOW, EIGHT)) == ["i-2"]


def test_idle_vms_are_reaped_only_while_the_rest_keep_slots_for_the_waiting_jobs() -> None:
    pool = tuple(vm(n, idle_since=NOW - 700 - n) for n in range(3))  # 24 free slots
    assert terminated(decide(snap(*pool), 9, NOW, EIGHT)) == ["i-2"]  # 16 left cover 9
    assert terminated(decide(snap(*pool), 8, NOW, EIGHT)) == ["i-2", "i-1"]


# ---- rates from evidence ---------------------------------------------------------------

DEFAULTS = Settings(
    min_vms=0,
    max_vms=10,
    idle_timeout_s=600,
    boot_timeout_s=900,
    heartbeat_timeout_s=300,
    max_launch_per_cycle=50,
    cycle_interval_s=15,
)


def test_three_jobs_thirty_seconds_apart_on_an_empty_pool_launch_at_most_three_vms() -> None:
    """Cycles of the engine replayed with the pure function: a VM registers 90 s after its
    launch and takes the oldest waiting job; rates are built as the engine builds them."""
    arrivals = [0.0, 30.0, 60.0]
    vms: dict[str, VMView] = {}
    queue: list[float] = []
    launched = 0
    for step in range(0, 41):
        now = step * 15.0
        queue += [t for t in arrivals if now - 15 < t <= now]
        for view in list(vms.values()):
            if view.state == VMState.BOOTING and now - view.launched_at >= 90:
                has = bool(queue) and queue.pop(0) is not None
                vms[view.id] = view._replace(
                    state=VMState.BUSY if has else VMState.IDLE,
                    jobs=int(has),
                    idle_since=None if has else now,
                    last_heartbeat=now,
                )
        seen = [t for t in arrivals if t <= now]
        last_minute = [t for t in seen if t > now - 60]
        snapshot = snap(
            *vms.values(),
            clouds=(A,),
            arrival_rate=arrival_rate(
                len([t for t in seen if t > now - 600]),
                600,
                len(last_minute),
                now - last_minute[0] if last_minute else 0.0,
            ),
            baseline_rate=len(seen) / 86400,
            boot_time_s=120,
        )
        for action in decide(snapshot, len(queue), now, DEFAULTS):
            if isinstance(action, Launch):
                for _ in range(action.count):
                    vms[f"v{launched}"] = VMView(f"v{launched}", "a", VMState.BOOTING, now)
                    launched += 1
    assert launched <= 3
    assert queue == []


def test_one_batch_is_one_arrival_and_no_evidence_of_a_rate() -> None:
    one_batch = {"recent_submissions": 1, "last_minute_submissions": 1}
    assert arrival_rate(10, 600, 10, 0.0, 0.0, **one_batch) == 0.0
    assert arrival_rate(10, 600, 10, 0.0, 0.0) > 0  # ten arrivals in an instant: a burst


def test_batches_bring_their_mean_size_once_there_are_enough_submissions() -> None:
    # Four batches of three within 15 s on a quiet pool: (4 - 1) submissions x 3 jobs / 15 s.
    batches = {"recent_submissions": 4, "last_minute_submissions": 4}
    assert arrival_rate(12, 600, 12, 15.0, 15.0, **batches) == pytest.approx(3 * 3 / 15)
    # Over the window: 8 batches of 5 jobs, the last minute's 1 no surprise.
    spread = {"recent_submissions": 8, "last_minute_submissions": 1}
    assert arrival_rate(40, 600, 5, 0.0, 600.0, **spread) == pytest.approx(40 / 600)


def test_a_day_floor_of_a_fraction_of_a_vm_keeps_nothing_warm() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, cycle_interval_s=15)
    assert warm_target(snap(baseline_rate=3 / 86400, boot_time_s=120), adaptive) == 0
    assert warm_target(snap(baseline_rate=1 / 300, boot_time_s=120), adaptive) == 0  # 0.45
    assert warm_target(snap(baseline_rate=1 / 100, boot_time_s=120), adaptive) == 3  # 1.35 + 1.16


def test_on_a_day_of_rare_arrivals_a_short_term_rate_must_expect_two_jobs() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, cycle_interval_s=15, warm_margin=0)
    rare_day = {"baseline_rate": 1 / 300, "boot_time_s": 120}  # 0.45 per 135 s
    assert warm_target(snap(arrival_rate=5 / 600, **rare_day), adaptive) == 0  # 1.1 expected
    assert warm_target(snap(arrival_rate=1 / 60, **rare_day), adaptive) == 3  # 2.25 expected
    assert warm_target(snap(arrival_rate=5 / 600, boot_time_s=120), adaptive) == 2  # no history


def test_spare_idle_vm_goes_at_once_when_jobs_arrive_slower_than_a_boot() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, cycle_interval_s=15)
    pool = (vm(1, idle_since=NOW - 20),)
    rare = snap(*pool, baseline_rate=1 / 300, boot_time_s=120)
    actions = decide(rare, 0, NOW, adaptive)
    assert terminated(actions) == ["i-1"]
    assert "jobs arrive every 300s on average, slower than a VM boots (135s)" in actions[0].reason
    assert terminated(decide(snap(*pool, boot_time_s=120), 0, NOW, adaptive)) == []  # no evidence
    assert terminated(decide(rare, 1, NOW, adaptive)) == []  # needed by a waiting job


def test_spare_idle_vm_beyond_the_warm_target_goes_after_one_boot_and_cycle() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, cycle_interval_s=15, warm_margin=1)
    idle_for = (136, 134, 500, 10)
    pool = tuple(vm(n, idle_since=NOW - s) for n, s in enumerate(idle_for, start=1))
    busy = snap(*pool, arrival_rate=1 / 135, completion_rate=0, boot_time_s=120)  # warm 1 + 1
    assert terminated(decide(busy, 0, NOW, adaptive)) == ["i-3", "i-1"]
    assert terminated(decide(busy, 0, NOW, replace(adaptive, adaptive_warm=False))) == []


def test_a_warm_margin_below_one_holds_spare_idle_vms_for_that_share_of_a_boot_and_cycle() -> None:
    pool = (vm(1, idle_since=NOW - 70), vm(2, idle_since=NOW - 60), vm(3, idle_since=NOW - 1))
    busy = snap(*pool, arrival_rate=1 / 135, completion_rate=0, boot_time_s=120)  # warm 1
    adaptive = replace(SETTINGS, adaptive_warm=True, cycle_interval_s=15)
    assert terminated(decide(busy, 0, NOW, replace(adaptive, warm_margin=0.5))) == ["i-1"]
    assert terminated(decide(busy, 0, NOW, replace(adaptive, warm_margin=0))) == ["i-1", "i-2"]
    assert terminated(decide(busy, 0, NOW, replace(adaptive, warm_margin=2))) == []


# ---- explained decisions ---------------------------------------------------------------


def test_launch_carries_its_reason_with_the_numbers() -> None:
    adaptive = replace(SETTINGS, adaptive_warm=True, warm_margin=0, cycle_interval_s=15)
    pool = (vm(1), vm(2, VMState.BOOTING, launched_at=NOW - 5))
    busy = snap(*pool, arrival_rate=1.2 / 60, boot_time_s=120)
    actions, decision = explain(busy, 2, NOW, adaptive)
    assert actions == [
        Launch(
            "a",
            3,
            "launch 3: 2 waiting + 3 warm (rate 1.2/min x 135 s) - 1 idle - 1 booting (on a: 3)",
        )
    ]
    assert (decision.waiting, decision.idle, decision.booting, decision.free_slots) == (2, 1, 1, 1)
    assert (decision.warm, decision.lead_s, decision.launched) == (3, 135, 3)


def test_decision_names_the_clouds_skipped_and_why() -> None:
    clouds = (
        replace(A, backoff_until=NOW + 60),
        CloudView("b", 2, max_instances=1),
        CloudView("c", 3, 100, launch_in_flight=True),
        CloudView("d", 4, 100),
    )
    actions, decision = explain(
        snap(vm(1, VMState.BUSY, cloud="b", jobs=1), clouds=clouds), 2, NOW, SETTINGS
    )
    assert launches(actions) == {"d": 2}
    assert decision.skipped == (
        ("a", "backoff for 60s more"),
        ("b", "quota full (1/1)"),
        ("c", "a launch is in flight"),
    )
    assert "skipped a (backoff for 60s more)" in decision.reason
    assert decision.reason.startswith("launch 2: 2 waiting")


def test_decision_says_when_no_cloud_could_take_the_launch() -> None:
    clouds = (replace(A, backoff_until=NOW + 30),)
    actions, decision = explain(snap(clouds=clouds), 2, NOW, SETTINGS)
    assert actions == []
    assert decision.launched == 0
    assert decision.reason.startswith("launch 0 of 2: 2 waiting + 0 warm")
    assert decision.reason.endswith("skipped a (backoff for 30s more)")


def test_min_vms_launch_and_reaping_say_why() -> None:
    actions, decision = explain(snap(), 0, NOW, replace(SETTINGS, min_vms=2))
    assert actions[0].reason.startswith("launch 2: keep min_vms=2 (0 live)")
    stale = (vm(1, idle_since=NOW - 601),)
    actions, decision = explain(snap(*stale), 0, NOW, SETTINGS)
    assert actions == [Terminate("i-1", actions[0].reason, Reason.IDLE_TIMEOUT)]
    assert actions[0].reason.startswith("idle 601s > idle_timeout_s=600; 0 waiting + 0 warm")
    assert (decision.terminated, decision.reason[:11]) == (1, "terminate 1")


def test_blind_cycle_is_recorded_with_its_reason() -> None:
    actions, decision = explain(snap(vm(1)), None, NOW, SETTINGS)
    assert actions == []
    assert decision == Decision(
        at=NOW,
        waiting=None,
        idle=1,
        busy=0,
        booting=0,
        serving=1,
        free_slots=1,
        warm=0,
        rate_per_s=0.0,
        lead_s=0.0,
        reason="demand unknown: health rules only",
    )


# ---- billing-aware reaping -------------------------------------------------------------

HOURLY = CloudView("h", priority=1, max_instances=100, billing_period_s=3600)
CYCLE = replace(SETTINGS, cycle_interval_s=15)


def test_paid_period_is_whole_periods_with_a_minimum_charge() -> None:
    assert paid_until(0, 10, A) == 60  # per second, 60 s minimum
    assert paid_until(0, 100.5, A) == 101
    assert paid_until(0, 10, HOURLY) == 3600
    assert paid_until(0, 3600.5, HOURLY) == 7200


def test_idle_vm_on_an_hourly_cloud_stays_until_just_before_its_paid_hour_ends() -> None:
    # "Just before": within one cycle plus BILLING_MARGIN_S (30 s) of the period's end.
    def idle_on_hourly(age: float) -> VMView:
        return vm(1, cloud="h", launched_at=NOW - age, idle_since=NOW - 1000)

    assert terminated(decide(snap(idle_on_hourly(3000), clouds=(HOURLY,)), 0, NOW, CYCLE)) == []
    assert terminated(decide(snap(idle_on_hourly(3554), clouds=(HOURLY,)), 0, NOW, CYCLE)) == []
    assert terminated(decide(snap(idle_on_hourly(3556), clouds=(HOURLY,)), 0, NOW, CYCLE)) == [
        "i-1"
    ]
    assert terminated(decide(snap(idle_on_hourly(7190), clouds=(HOURLY,)), 0, NOW, CYCLE)) == [
        "i-1"
    ]


def test_idle_vm_on_an_hourly_cloud_goes_at_its_period_end_even_before_the_idle_timer() -> None:
    short_idle = vm(1, cloud="h", launched_at=NOW - 3580, idle_since=NOW - 30)
    actions = decide(snap(short_idle, clouds=(HOURLY,)), 0, NOW, CYCLE)
    assert terminated(actions) == ["i-1"]
    assert "paid period ends in 20s (billing_period_s=3600)" in actions[0].reason


def test_idle_vm_needed_by_the_queue_is_kept_past_its_period_end() -> None:
    needed = vm(1, cloud="h", launched_at=NOW - 3580, idle_since=NOW - 30)
    assert terminated(decide(snap(needed, clouds=(HOURLY,)), 1, NOW, CYCLE)) == []


def test_per_second_cloud_reaps_at_the_idle_timer() -> None:
    pool = (vm(1, launched_at=NOW - 3580, idle_since=NOW - 30), vm(2, idle_since=NOW - 601))
    assert terminated(decide(snap(*pool, clouds=(A,)), 0, NOW, CYCLE)) == ["i-2"]


# ---- backoff and vanish grace ----------------------------------------------------------


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    assert [backoff_delay(n, 60, 1800) for n in range(7)] == [60, 120, 240, 480, 960, 1800, 1800]
    assert backoff_delay(10_000, 60, 1800) == 1800  # no overflow however long the outage


def test_instance_missing_from_a_listing_vanished_only_if_older_than_the_grace() -> None:
    started = 1000.0
    assert vanished(launched_at=879, listed=False, listing_started=started, grace_s=120)
    assert not vanished(launched_at=881, listed=False, listing_started=started, grace_s=120)
    assert not vanished(launched_at=0, listed=True, listing_started=started, grace_s=120)


# ---- rollouts and lifetimes ----------------------------------------------------------------


def drained(actions: list) -> list[str]:
    return [a.vm_id for a in actions if isinstance(a, Drain)]


def test_outdated_vms_are_replaced_a_few_at_a_time_oldest_first() -> None:
    settings = replace(SETTINGS, min_vms=3, max_replace_per_cycle=1)
    fleet = [vm(n, outdated=True, launched_at=NOW - 1000 + n) for n in (1, 2, 3)]
    actions = decide(snap(*fleet), 0, NOW, settings)
    assert drained(actions) == ["i-1"]
    assert launches(actions) == {"a": 1}  # its replacement, for min_vms
    draining = [vm(1, VMState.DRAINING, outdated=True), *fleet[1:]]
    assert drained(decide(snap(*draining), 0, NOW, settings)) == []  # one at a time


def test_a_rollout_never_takes_the_slots_the_queue_needs() -> None:
    fleet = [vm(1, outdated=True), vm(2, outdated=True)]
    settings = replace(SETTINGS, max_replace_per_cycle=2)
    assert drained(decide(snap(*fleet), 2, NOW, settings)) == []
    assert drained(decide(snap(*fleet), 1, NOW, settings)) == ["i-1"]


def test_a_busy_outdated_vm_is_drained_to_finish_its_job_first() -> None:
    actions = decide(snap(vm(1, VMState.BUSY, jobs=1, outdated=True)), 0, NOW, SETTINGS)
    [drain] = [a for a in actions if isinstance(a, Drain)]
    assert drain.vm_id == "i-1" and "once its job ends" in drain.reason
    assert drain.code == Reason.OUTDATED


def test_vms_past_max_lifetime_are_replaced() -> None:
    settings = replace(SETTINGS, max_lifetime_s=3600)
    old, young = vm(1, launched_at=NOW - 3601), vm(2, launched_at=NOW - 100)
    [drain] = [a for a in decide(snap(old, young), 0, NOW, settings) if isinstance(a, Drain)]
    assert (drain.vm_id, drain.code) == ("i-1", Reason.LIFETIME)
    assert drained(decide(snap(old, young), 0, NOW, SETTINGS)) == []  # off by default
