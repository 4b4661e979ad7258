"""EC2 through boto3: AWS or any EC2-compatible endpoint (OpenStack, OpenNebula, moto)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from core.clouds import (
    TAG_CLOUD,
    TAG_CORE,
    TAG_LAUNCH,
    TAG_POOL,
    CapacityError,
    CloudError,
    Instance,
    InstanceState,
    LaunchRequest,
    PlacementError,
    ThrottledError,
)
from core.config import CloudConfig

# Codes meaning "not now": capacity, account limits and quotas. They put the cloud in backoff.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "ResourceLimitExceeded",
        "LimitExceeded",
        "SpotMaxPriceTooLow",
    }
)
# Capacity codes that concern one instance type in one subnet (zone), not the whole cloud.
PLACEMENT_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "Unsupported",
        "InsufficientFreeAddressesInSubnet",
        "SpotMaxPriceTooLow",
    }
)
THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException"})
_NOT_FOUND_ID = re.compile(r"i-[0-9a-f]+")
DESCRIBE_CHUNK = 200  # ids per instance-id filter; keeps requests small on every endpoint


def _translate(exc: Exception) -> CloudError:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown")).removeprefix("Server.").removeprefix("Client.")
        message = f"{code}: {error.get('Message', '')}".rstrip(": ")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
        if code in PLACEMENT_CODES:
            return PlacementError(message, code)
        if code in THROTTLE_CODES:
            return ThrottledError(message, code)
        if code in CAPACITY_CODES:
            # EC2 answers these as server errors (5xx), but they say it did not act.
            return CapacityError(message, code)
        return CloudError(message, code, refused=400 <= int(status) < 500)
    return CloudError(f"{type(exc).__name__}: {exc}")


# EC2's instance state names, as the engine sees them.
_STATES = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "shutting-down": InstanceState.GONE,
    "terminated": InstanceState.GONE,
    "stopping": InstanceState.GONE,
    "stopped": InstanceState.GONE,
}


def _instance(raw: dict[str, Any]) -> Instance:
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return Instance(
        id=raw["InstanceId"],
        state=_STATES.get(raw.get("State", {}).get("Name", "pending"), InstanceState.PENDING),
        address=raw.get("PrivateIpAddress") or raw.get("PublicIpAddress"),
        launch_id=tags.get(TAG_LAUNCH),
        instance_type=raw.get("InstanceType"),
    )


# One loader for the process: each new boto3 session otherwise parses EC2's service model
# again (0.3 to 0.7 s, at every start, reload and cloud).
_MODELS = botocore.loaders.create_loader()


def _session(cloud: CloudConfig) -> boto3.session.Session:
    shared = botocore.session.Session(profile=cloud.profile)
    shared.register_component("data_loader", _MODELS)
    return boto3.session.Session(botocore_session=shared, region_name=cloud.region)


class EC2Provider:
    """One configured cloud. Credentials come from the boto3 chain or a named profile; they
    are never logged or put into user data."""

    def __init__(self, cloud: CloudConfig, pool: str, core_id: str) -> None:
        self.name = cloud.name
        self._cloud = cloud
        self._pool = pool
        self._core_id = core_id
        session = _session(cloud)

        def client(attempts: int) -> Any:
            # total_max_attempts counts the first call too (botocore's max_attempts counts
            # retries only): 1 means the SDK never resends.
            return session.client(
                "ec2",
                endpoint_url=cloud.endpoint_url,
                config=BotoConfig(
                    retries={"mode": cloud.effective_retry_mode, "total_max_attempts": attempts},
                    connect_timeout=10,
                    read_timeout=cloud.read_timeout_s,
                    max_pool_connections=10,
                ),
            )

        self._ec2 = client(cloud.max_attempts)
        # RunInstances is sent once: a lost answer is resolved by finding the launch by its
        # tag before anything is sent again (endpoints that ignore ClientToken launch twice).
        self._launcher = client(1)

    def _ours(self) -> list[dict[str, Any]]:
        """This pool's, this core's instances in this configured cloud."""
        return [
            {"Name": f"tag:{TAG_POOL}", "Values": [self._pool]},
            {"Name": f"tag:{TAG_CORE}", "Values": [self._core_id]},
            {"Name": f"tag:{TAG_CLOUD}", "Values": [self.name]},
        ]

    def _describe(self, filters: list[dict[str, Any]]) -> Iterator[Instance]:
        try:
            paginator = self._ec2.get_paginator("describe_instances")
            for page in paginator.paginate(Filters=filters, PaginationConfig={"PageSize": 1000}):
                for reservation in page.get("Reservations", []):
                    for raw in reservation.get("Instances", []):
                        yield _instance(raw)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc) from None

    def launch(self, request: LaunchRequest) -> list[Instance]:
        cloud = self._cloud
        tags = [
            {"Key": TAG_POOL, "Value": self._pool},
            {"Key": TAG_CORE, "Value": self._core_id},
            {"Key": TAG_LAUNCH, "Value": request.launch_id},
            {"Key": TAG_CLOUD, "Value": self.name},
            {"Key": "Name", "Value": f"alienec2-{self._pool}"},
            *({"Key": k, "Value": v} for k, v in cloud.tags.items()),
        ]
        placement = request.placement
        params: dict[str, Any] = {
            # Real EC2 gives what it can (>= 1); moto launches MinCount, so exact_count asks N.
            "MinCount": request.count if cloud.exact_count else 1,
            "MaxCount": request.count,
            "ClientToken": request.client_token,
            "UserData": request.user_data,
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": cloud.imds_tokens, "HttpEndpoint": "enabled"},
        }
        if cloud.launch_template is not None:
            template = cloud.launch_template
            spec = {"LaunchTemplateName": template.name} if template.name else {}
            if template.id:
                spec = {"LaunchTemplateId": template.id}
            params["LaunchTemplate"] = {**spec, "Version": template.version}
        if cloud.image_id:
            params["ImageId"] = cloud.image_id
        if placement.instance_type:
            params["InstanceType"] = placement.instance_type
        if placement.subnet_id:
            params["SubnetId"] = placement.subnet_id
        if cloud.key_name:
            params["KeyName"] = cloud.key_name
        if cloud.security_group_ids:
            params["SecurityGroupIds"] = cloud.security_group_ids
        if cloud.iam_instance_profile:
            profile = cloud.iam_instance_profile
            params["IamInstanceProfile"] = (
                {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
            )
        if cloud.root_volume_size_gb or cloud.root_volume_type:
            ebs: dict[str, Any] = {"DeleteOnTermination": True}
            if cloud.root_volume_size_gb:
                ebs["VolumeSize"] = cloud.root_volume_size_gb
            if cloud.root_volume_type:
                ebs["VolumeType"] = cloud.root_volume_type
            params["BlockDeviceMappings"] = [{"DeviceName": cloud.root_device_name, "Ebs": ebs}]
        if cloud.market == "spot":
            # One-time requests that terminate on interruption: the pool replaces capacity.
            options: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if cloud.spot_max_price is not None:
                options["MaxPrice"] = f"{cloud.spot_max_price:.4f}"
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
        try:
            reply = self._launcher.run_instances(**params)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc) from None
        return [_instance(raw) for raw in reply.get("Instances", [])]

    def find_launch(self, launch_id: str) -> list[Instance]:
        # By launch tag alone (with pool and core): a launch sent before the cloud tag
        # existed is found too; the launch record says which cloud it belongs to.
        pool, core, _ = self._ours()
        return list(
            self._describe([pool, core, {"Name": f"tag:{TAG_LAUNCH}", "Values": [launch_id]}])
        )

    def describe(self, instance_ids: list[str]) -> list[Instance]:
        # A filter, not InstanceIds=: one unknown id must not fail the whole call.
        found: list[Instance] = []
        for start in range(0, len(instance_ids), DESCRIBE_CHUNK):
            chunk = instance_ids[start : start + DESCRIBE_CHUNK]
            found.extend(self._describe([{"Name": "instance-id", "Values": chunk}]))
        return found

    def list_pool(self) -> list[Instance]:
        return list(self._describe(self._ours()))

    def terminate(self, instance_ids: list[str]) -> set[str]:
        missing: set[str] = set()
        remaining = list(instance_ids)
        while remaining:
            batch, remaining = remaining[:1000], remaining[1000:]
            while batch:
                try:
                    self._ec2.terminate_instances(InstanceIds=batch)
                    break
                except ClientError as exc:
                    error = _translate(exc)
                    if error.code != "InvalidInstanceID.NotFound":
                        raise error from None
                    # The whole batch fails for one unknown id: drop those named and retry.
                    unknown = set(_NOT_FOUND_ID.findall(str(exc))) & set(batch)
                    if not unknown:
                        raise error from None
                    missing |= unknown
                    batch = [i for i in batch if i not in unknown]
                except BotoCoreError as exc:
                    raise _translate(exc) from None
        return missing
