"""What a launch asks EC2 for, and where it goes when EC2 refuses: instance-type and subnet
fallback, launch templates and the launch essentials, Spot, and the cost cap. Against moto's
EC2 server over HTTP, with the fault endpoint refusing what a test names."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from core.clouds.sandbox import SANDBOX_REGION, FaultyEndpoint, MotoEC2Server
from core.config import ConfigError, parse_config
from core.model import EventKind, VMState
from tests.conftest import ManualClock, StartEngine, cloud, ec2_client, step


def instances(url: str) -> list[dict[str, Any]]:
    pages = ec2_client(url).get_paginator("describe_instances").paginate()
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def subnets(url: str, count: int) -> list[str]:
    ec2 = ec2_client(url)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    return [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{n}.0/24")["Subnet"]["SubnetId"]
        for n in range(count)
    ]


# ---- type and subnet fallback -----------------------------------------------------------


async def test_a_type_without_capacity_falls_back_to_the_next_type_in_the_same_cycle(
    moto: MotoEC2Server, faulty: FaultyEndpoint, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    faulty.capacity_errors = {"c5.large"}
    engine = await start_engine_on(
        [cloud("c", faulty.url, instance_types=["c5.large", "m5.large"])], pool={"min_vms": 3}
    )

    await step(engine)

    assert faulty.calls["RunInstances"] == 2  # c5.large refused, m5.large launched
    assert sorted(i["InstanceType"] for i in instances(moto.url)) == ["m5.large"] * 3
    assert len(engine.store.vms()) == 3
    assert engine.store.cloud_status("c").backoff_until == 0  # the cloud itself is fine
    placements = engine.cloud_details()["c"]["placements"]
    assert placements[0]["instance_type"] == "c5.large" and placements[0]["backoff_s"] == 60
    assert "InsufficientInstanceCapacity" in placements[0]["last_error"]
    assert placements[1]["backoff_s"] == 0
    kinds = [e.kind for e in engine.store.events_after(0)]
    assert EventKind.PLACEMENT_BACKOFF in kinds and EventKind.CLOUD_BACKOFF not in kinds

    # While c5.large rests, launches go straight to m5.large: one call, no refusal.
    engine.store.set_setting("min_vms", 4, clock(), "test")
    clock.advance(1)
    await step(engine)
    assert faulty.calls["RunInstances"] == 3
    # After its backoff c5.large is tried first again.
    faulty.capacity_errors = set()
    engine.store.set_setting("min_vms", 5, clock(), "test")
    clock.advance(61)
    await step(engine)
    assert sorted(i["InstanceType"] for i in instances(moto.url)) == ["c5.large"] + ["m5.large"] * 4


async def test_a_subnet_without_capacity_falls_back_to_the_next_subnet(
    moto: MotoEC2Server, faulty: FaultyEndpoint, start_engine_on: StartEngine
) -> None:
    first, second = subnets(moto.url, 2)
    faulty.capacity_errors = {first}
    engine = await start_engine_on([cloud("c", faulty.url, subnet_ids=[first, second])])
    engine.store.submit_job(["true"], 0)

    await step(engine)

    assert [i["SubnetId"] for i in instances(moto.url)] == [second]
    placements = engine.cloud_details()["c"]["placements"]
    assert [(p["subnet_id"], p["backoff_s"] > 0) for p in placements] == [
        (first, True),
        (second, False),
    ]


async def test_when_every_type_and_subnet_refuses_the_cloud_backs_off_and_the_next_cloud_serves(
    moto: MotoEC2Server, faulty: FaultyEndpoint, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    faulty.capacity_errors = {"c5.large", "m5.large"}
    engine = await start_engine_on(
        [
            cloud("scarce", faulty.url, priority=1, instance_types=["c5.large", "m5.large"]),
            cloud("spare", moto.url, priority=2),
        ],
        pool={"min_vms": 2},
    )

    await step(engine)
    assert faulty.calls["RunInstances"] == 2
    assert engine.store.cloud_status("scarce").backoff_until == clock() + 60
    clock.advance(1)
    await step(engine)
    assert {vm.cloud for vm in engine.store.vms()} == {"spare"}
    assert faulty.calls["RunInstances"] == 2  # nothing more sent to the resting cloud


def test_check_config_names_conflicting_launch_settings() -> None:
    base = {"name": "a", "image_id": "ami-1"}
    cases = [
        ({**base, "instance_type": "t3.small", "instance_types": ["t3.large"]}, "instance_type"),
        ({**base, "subnet_id": "s-1", "subnet_ids": ["s-2"]}, "subnet_id and subnet_ids"),
        ({**base, "launch_template": {"name": "t"}}, "launch_template and image_id"),
        ({"name": "a"}, "image_id: required"),
        ({"name": "a", "launch_template": {"name": "t", "id": "lt-1"}}, "exactly one of name"),
        ({**base, "spot_max_price": 0.1}, "spot_max_price: only for market: spot"),
    ]
    for data, expected in cases:
        with pytest.raises(ConfigError) as caught:
            parse_config({"clouds": [data]})
        assert any(
            line.startswith("clouds[0]") and expected in line for line in caught.value.errors
        ), caught.value.errors


# ---- launch templates and the launch essentials -----------------------------------------


async def test_a_launch_template_supplies_image_and_type_and_cloud_keys_override(
    moto: MotoEC2Server, start_engine_on: StartEngine
) -> None:
    ec2 = ec2_client(moto.url)
    ec2.create_launch_template(
        LaunchTemplateName="worker",
        LaunchTemplateData={"ImageId": "ami-03cf127a", "InstanceType": "c5.xlarge"},
    )
    spec = cloud("c", moto.url, launch_template={"name": "worker", "version": "$Latest"})
    del spec["image_id"]
    engine = await start_engine_on([spec], pool={"min_vms": 1})

    await step(engine)

    (instance,) = instances(moto.url)
    assert (instance["ImageId"], instance["InstanceType"]) == ("ami-03cf127a", "c5.xlarge")
    assert instance["MetadataOptions"]["HttpTokens"] == "required"


async def test_iam_profile_root_volume_and_imds_settings_reach_the_instance(
    moto: MotoEC2Server, start_engine_on: StartEngine
) -> None:
    iam = boto3.client("iam", endpoint_url=moto.url, region_name=SANDBOX_REGION)
    iam.create_instance_profile(InstanceProfileName="worker")
    spec = cloud(
        "c",
        moto.url,
        iam_instance_profile="worker",
        root_volume_size_gb=42,
        root_volume_type="gp3",
        imds_tokens="optional",
    )
    engine = await start_engine_on([spec], pool={"min_vms": 1})

    await step(engine)

    (instance,) = instances(moto.url)
    assert instance["IamInstanceProfile"]["Arn"].endswith("instance-profile/worker")
    assert instance["MetadataOptions"]["HttpTokens"] == "optional"
    root = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    (volume,) = ec2_client(moto.url).describe_volumes(VolumeIds=[root])["Volumes"]
    assert (volume["Size"], volume["VolumeType"]) == (42, "gp3")


async def test_a_spot_cloud_launches_one_time_spot_instances(
    moto: MotoEC2Server, start_engine_on: StartEngine
) -> None:
    engine = await start_engine_on(
        [cloud("c", moto.url, market="spot", spot_max_price=0.05)], pool={"min_vms": 2}
    )

    await step(engine)

    found = instances(moto.url)
    assert len(found) == 2
    assert {i.get("InstanceLifecycle") for i in found} == {"spot"}
    assert engine.cloud_details()["c"]["market"] == "spot"


async def test_repeated_spot_interruptions_of_a_type_back_it_off_and_launches_use_the_next(
    moto: MotoEC2Server, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    engine = await start_engine_on(
        [
            cloud(
                "c",
                moto.url,
                market="spot",
                instance_types=["c5.large", "m5.large"],
                spot_interruptions_before_backoff=3,
                spot_interruption_window_s=600,
            )
        ],
        pool={"min_vms": 3, "heartbeat_timeout_s": 10_000},
    )
    store = engine.store
    await step(engine)
    for vm in store.vms():
        store.register_vm(vm.id, clock())

    for vm in store.vms([VMState.IDLE]):  # EC2 reclaims all three c5.large within minutes
        store.interrupt_vm(vm.id, clock(), "spot termination notice")
        clock.advance(60)
        await step(engine)
    await step(engine)

    placements = engine.cloud_details()["c"]["placements"]
    assert placements[0]["backoff_s"] > 0 and "3 spot interruptions" in placements[0]["last_error"]
    serving = [i for i in instances(moto.url) if i["State"]["Name"] in ("pending", "running")]
    assert len(serving) == 3
    assert sorted(i["InstanceType"] for i in serving).count("m5.large") >= 1


# ---- cost ---------------------------------------------------------------------------------


async def test_a_launch_that_would_pass_the_cost_cap_is_not_made_and_an_event_says_why(
    moto: MotoEC2Server, clock: ManualClock, start_engine_on: StartEngine
) -> None:
    prices = {"c5.large": {"on-demand": 0.10, "spot": 0.04}}
    engine = await start_engine_on(
        [cloud("c", moto.url, instance_types=["c5.large"], market="spot", price_per_hour=prices)],
        pool={"max_vms": 20, "max_cost_per_hour": 0.25},
    )
    for _ in range(10):
        engine.store.submit_job(["true"], clock())

    await step(engine)
    clock.advance(1)
    await step(engine)

    assert len(engine.store.vms()) == 6  # 6 x $0.04 = $0.24 <= $0.25 < 7 x $0.04
    assert engine.cost_per_hour() == {"c": pytest.approx(0.24)}
    skipped = [e for e in engine.store.events_after(0) if e.kind == EventKind.LAUNCH_SKIPPED]
    assert len(skipped) == 1  # said once, not every cycle
    assert "4 of 10 VMs not launched" in skipped[0].message
    assert "max_cost_per_hour=0.25" in skipped[0].message


def test_aws_endpoints_default_to_adaptive_retries_and_others_to_standard() -> None:
    from core.clouds.ec2 import EC2Provider

    aws = parse_config({"clouds": [{"name": "aws", "image_id": "ami-1"}]}).clouds[0]
    other = parse_config(
        {"clouds": [{"name": "os", "image_id": "ami-1", "endpoint_url": "http://127.0.0.1:1"}]}
    ).clouds[0]
    assert EC2Provider(aws, "p", "c")._ec2.meta.config.retries["mode"] == "adaptive"
    assert EC2Provider(other, "p", "c")._ec2.meta.config.retries["mode"] == "standard"


async def test_the_admin_status_reply_shows_placement_backoffs_and_the_cost(
    moto: MotoEC2Server, faulty: FaultyEndpoint, start_engine_on: StartEngine
) -> None:
    from core.service import PoolService

    faulty.capacity_errors = {"c5.large"}
    prices = {"c5.large": 0.1, "m5.large": 0.2}
    engine = await start_engine_on(
        [cloud("c", faulty.url, instance_types=["c5.large", "m5.large"], price_per_hour=prices)],
        pool={"min_vms": 2, "max_cost_per_hour": 5},
    )
    await step(engine)
    service = PoolService(
        engine.config,
        engine.store,
        engine.liveness,
        engine.clock,
        engine.wake.set,
        engine.launch_keys,
    )
    service.cloud_details = engine.cloud_details

    status = service.status()

    (entry,) = status["clouds"]
    assert entry["market"] == "on-demand" and entry["cost_per_hour"] == pytest.approx(0.4)
    assert [(p["instance_type"], p["backoff_s"] > 0) for p in entry["placements"]] == [
        ("c5.large", True),
        ("m5.large", False),
    ]
    assert status["cost_per_hour"] == {"total": pytest.approx(0.4), "max": 5}
