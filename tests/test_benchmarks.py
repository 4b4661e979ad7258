"""The benchmarks' own parts: they must measure what they claim to."""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from core import policy
from core.clouds.sandbox import SANDBOX_CREDENTIALS, SANDBOX_IMAGE, SANDBOX_REGION

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import moto_tag_index
import policy_sim


@pytest.fixture
def ec2(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    for key, value in SANDBOX_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("ec2", region_name=SANDBOX_REGION)


def listing(ec2: object, values: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    reply = ec2.describe_instances(Filters=[{"Name": "tag:pool", "Values": values}])  # type: ignore[attr-defined]
    return sorted(
        (i["InstanceId"], [(t["Key"], t["Value"]) for t in i["Tags"]])
        for r in reply["Reservations"]
        for i in r["Instances"]
    )


def test_moto_tag_index_gives_the_answers_moto_gives(ec2: object) -> None:
    for pool in ("a", "b", "c"):
        ec2.run_instances(  # type: ignore[attr-defined]
            ImageId=SANDBOX_IMAGE,
            MinCount=5,
            MaxCount=5,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": "pool", "Value": pool}, {"Key": "Name", "Value": "x"}],
                }
            ],
        )
    stock = listing(ec2, ["a", "c"])
    undo = moto_tag_index.install()
    try:
        indexed = listing(ec2, ["a", "c"])
    finally:
        undo()
    assert len(stock) == 10
    assert indexed == stock


def test_policy_simulation_runs_every_job_of_a_burst_under_every_policy() -> None:
    jobs = [policy_sim.Job(600 + n, 300) for n in range(100)]
    pool = policy_sim.Pool(min_vms=0, max_vms=50, idle_timeout_s=120)
    settings = policy.Settings(0, 50, 120, 1e9, 1e12, 10**6, cycle_interval_s=pool.cycle_s)
    deciders = [
        policy_sim.CorePolicy("alienec2", settings),
        policy_sim.CorePolicy("fixed", replace(settings, adaptive_warm=False)),
        policy_sim.OneVMPerJob(50),
        policy_sim.Elastiq(pool),
    ]
    for decider in deciders:
        result = policy_sim.Simulation(jobs, pool, seed=1).run(decider)
        assert len(result.waits) == 100, decider.name
        assert result.billed_s >= sum(job.runtime for job in jobs)
        assert max(result.waits) > 0  # nothing is warm when the burst starts at minute ten


def test_swf_reader_takes_submit_and_run_time_and_skips_comments(tmp_path: Path) -> None:
    trace = tmp_path / "t.swf"
    trace.write_text("; comment\n1 0 -1 60 1 -1 -1 1 -1 -1 1\n2 30 -1 -1 1\n3 10 -1 5 1\n")
    assert policy_sim.read_swf(trace) == [policy_sim.Job(0, 60), policy_sim.Job(10, 5)]


def test_swf_jobs_sharing_a_second_are_spread_over_it_not_read_as_one_batch(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "t.swf"
    trace.write_text("".join(f"{n} 7 -1 60 1\n" for n in range(4)))
    assert [job.submit for job in policy_sim.read_swf(trace)] == [7, 7.25, 7.5, 7.75]


def test_bursty_trace_has_bursts_of_hundreds_between_quiet_hours() -> None:
    jobs = policy_sim.bursty_trace(random.Random(1), hours=12, runtime_s=600)
    gaps = [b.submit - a.submit for a, b in itertools.pairwise(jobs)]
    assert len(jobs) >= 300
    assert max(gaps) >= 2 * 3600


def test_policy_simulation_runs_up_to_slots_jobs_on_one_vm_at_once() -> None:
    jobs = [policy_sim.Job(0, 1000) for _ in range(8)]
    pool = policy_sim.Pool(min_vms=0, max_vms=5, idle_timeout_s=60, slots=8)
    result = policy_sim.Simulation(jobs, pool, seed=1).run(policy_sim.ClusterAutoscaler(pool))
    assert result.launched == 1
    assert len(result.waits) == 8


def test_every_baseline_and_setting_drains_the_first_hour_and_alienec2_launches_per_job() -> None:
    jobs = policy_sim.first_hour_trace()
    pool = policy_sim.Pool(0, 10, 600)
    for decider in policy_sim.deciders(pool):
        result = policy_sim.Simulation(jobs, pool, seed=1).run(decider)
        assert len(result.waits) == len(jobs), decider.name
        if decider.name.startswith("alienec2"):
            assert result.launched <= len(jobs), decider.name


def test_dominance_needs_both_p95_and_vm_hours_no_worse() -> None:
    row = {"p95_wait": 10.0, "vm_hours": 100.0}
    trace = policy_sim.TraceResult(
        "t",
        {
            "alienec2 m1 hist": row,
            "cheap": {"p95_wait": 50.0, "vm_hours": 90.0},
            "slow": {"p95_wait": 20.0, "vm_hours": 100.0},
        },
        bound_vm_hours=80.0,
        jobs=1,
        pool=policy_sim.Pool(0, 1, 1),
    )
    assert policy_sim.dominance(trace) == {"cheap": None, "slow": "alienec2 m1 hist"}


@pytest.mark.slow
def test_load_benchmark_runs_a_tiny_fleet_and_loses_no_job() -> None:
    """A smoke test of the load benchmark's plumbing (generators, probe, checks); no latency
    is asserted."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "load.py"
    args = ["--steps", "5", "--seconds", "2", "--warmup", "2", "--generators", "2"]
    args += ["--jobs-per-s", "2"]  # few jobs: the drain at the end waits for every one
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    row = lines[-2].split()
    assert row[0] == "5"
    assert (row[10], row[11]) == ("0", "0")  # jobs lost, jobs assigned twice
    assert lines[-1].startswith("largest N with probe p99 < 50 ms: ")
