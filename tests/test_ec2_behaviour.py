"""EC2's own behaviour, which moto does not have, from the fault endpoint: request throttling
by AWS's token buckets, eventually consistent listings, partial fulfilment. The engine must
lose and double no launch, mark no VM wrongly gone, and converge. Virtual time throughout:
the endpoint's buckets and listings run on the test's clock."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from core.clouds.sandbox import FaultyEndpoint, MotoEC2Server, TokenBuckets
from core.model import LaunchState, VMState
from core.store import Store
from tests.conftest import (
    ManualClock,
    StartEngine,
    cloud,
    ec2_client,
    instances_in_cloud,
    step,
)


def launch_states(store: Store) -> dict[str, int]:
    rows = store._db.execute("SELECT state, COUNT(*) FROM launches GROUP BY state").fetchall()
    return {state: n for state, n in rows}


async def test_throttled_run_instances_loses_and_doubles_nothing_and_the_pool_converges(
    moto: MotoEC2Server, faulty: FaultyEndpoint, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    # Twelve clouds on one account and region share its buckets: a cycle's twelve
    # RunInstances calls meet a burst of 5 refilled at 2/s.
    faulty.throttle = TokenBuckets(clock)
    clouds = [
        cloud(f"c{n}", faulty.url, max_instances=5, call_backoff_initial_s=1) for n in range(12)
    ]
    engine = await start_engine_on(clouds, pool={"min_vms": 60, "max_vms": 60})
    store = engine.store

    cycles = 0
    while len(store.vms()) < 60 and cycles < 30:
        await step(engine)
        clock.advance(1)
        cycles += 1

    in_cloud = instances_in_cloud(moto.url)
    assert len(in_cloud) == 60 and set(in_cloud) == {vm.id for vm in store.vms()}
    assert {vm.cloud for vm in store.vms()} == {f"c{n}" for n in range(12)}
    states = launch_states(store)
    assert LaunchState.PENDING not in states
    failed = store._db.execute("SELECT error FROM launches WHERE state = 'failed'").fetchall()
    assert failed and all("RequestLimitExceeded" in row[0] for row in failed)
    refused = faulty.refused["RunInstances"]
    assert refused == len(failed) and refused > 0
    print(
        f"\nthrottling: {faulty.calls['RunInstances']} RunInstances calls, {refused} refused "
        f"(RequestLimitExceeded), {states[LaunchState.DONE]} launches completed, 60 VMs in "
        f"{cycles} cycles ({cycles - 1} s of virtual time); other calls refused: "
        f"{sum(faulty.refused.values()) - refused}"
    )
    # Converged: more cycles send nothing more.
    sent = faulty.calls["RunInstances"]
    await step(engine)
    assert faulty.calls["RunInstances"] == sent


async def test_instances_not_yet_listed_are_neither_vanished_nor_launched_again(
    moto: MotoEC2Server, faulty: FaultyEndpoint, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    faulty.clock = clock
    faulty.hide_new_instances_s = 30  # AWS: up to 30 s
    engine = await start_engine_on(
        [cloud("c", faulty.url)], pool={"min_vms": 3, "reconcile_interval_s": 5}
    )
    store = engine.store

    await step(engine)
    launched = {vm.id for vm in store.vms()}
    for _ in range(5):  # 25 s of describes and full reconciles that do not see them
        clock.advance(5)
        await step(engine)
        assert {vm.state for vm in store.vms()} == {VMState.REQUESTED}
    assert faulty.calls["DescribeInstances"] >= 10  # 5 by id, 5 full listings
    clock.advance(6)
    await step(engine)

    assert {vm.id for vm in store.vms()} == launched == set(instances_in_cloud(moto.url))
    assert {vm.state for vm in store.vms()} == {VMState.BOOTING}
    assert faulty.calls["RunInstances"] == 1


async def test_asking_for_hidden_instances_by_id_answers_not_found(
    moto: MotoEC2Server, faulty: FaultyEndpoint, clock: ManualClock
) -> None:
    faulty.clock = clock
    faulty.hide_new_instances_s = 30
    ec2 = ec2_client(faulty.url)
    (instance,) = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"]
    with pytest.raises(ClientError, match=r"InvalidInstanceID\.NotFound"):
        ec2.describe_instances(InstanceIds=[instance["InstanceId"]])
    clock.advance(31)
    assert ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"]


async def test_a_partly_fulfilled_launch_has_its_shortfall_launched_next_cycle(
    moto: MotoEC2Server, faulty: FaultyEndpoint, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    faulty.fulfil_at_most = 2
    engine = await start_engine_on([cloud("c", faulty.url)], pool={"min_vms": 5})
    store = engine.store

    await step(engine)
    assert len(store.vms()) == 2
    for _ in range(3):
        clock.advance(1)
        await step(engine)

    assert len(store.vms()) == 5 == len(instances_in_cloud(moto.url))
    assert faulty.calls["RunInstances"] == 3  # 2 + 2 + 1
    assert launch_states(store) == {LaunchState.DONE: 3}
