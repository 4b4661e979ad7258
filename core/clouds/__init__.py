"""Cloud providers: one small adapter per kind of cloud behind one interface.

Providers are synchronous (boto3 is); the engine calls them from worker threads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

# Tags that mark an instance as ours; the launch tag makes crash recovery idempotent even
# where an endpoint ignores ClientToken (moto, some OpenStack versions).
TAG_POOL = "alienec2:pool"
TAG_CORE = "alienec2:core"
TAG_LAUNCH = "alienec2:launch"
# Which configured cloud launched it: two clouds on one account and region never list (and
# adopt) each other's instances.
TAG_CLOUD = "alienec2:cloud"


class CloudError(Exception):
    """A cloud call failed. ``code`` is the EC2 error code when the cloud gave one;
    ``refused`` says the cloud answered that it did not act (a 4xx), as opposed to a server
    error, a timeout or a lost connection, after which it may have acted."""

    def __init__(self, message: str, code: str | None = None, refused: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.refused = refused


class CapacityError(CloudError):
    """The cloud cannot give us instances now (capacity, quota or limit): back off. EC2
    answers some of these as server errors, but all say it did not act."""

    def __init__(self, message: str, code: str | None = None, refused: bool = True) -> None:
        super().__init__(message, code, refused)


class PlacementError(CapacityError):
    """This instance type in this subnet cannot be had now (no capacity there, or the type is
    not offered there): another (type, subnet) of the same cloud may still work."""


class ThrottledError(CapacityError):
    """The cloud refused the call for its request rate (RequestLimitExceeded): nothing was
    done, and the same call may be sent again after a pause."""


class InstanceState(enum.StrEnum):
    """What the engine needs to know of an instance, whatever the cloud calls its states."""

    PENDING = "pending"  # asked for, not running yet
    RUNNING = "running"
    GONE = "gone"  # stopping, stopped, shutting down or terminated: it will not serve


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    state: InstanceState
    address: str | None = None
    launch_id: str | None = None
    instance_type: str | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a launch goes within one cloud; None: the template's or endpoint's default."""

    instance_type: str | None = None
    subnet_id: str | None = None

    def __str__(self) -> str:
        return f"{self.instance_type or 'template'}/{self.subnet_id or 'default'}"


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    launch_id: str
    count: int
    client_token: str
    user_data: str
    placement: Placement = Placement()


class CloudProvider(Protocol):
    name: str

    def launch(self, request: LaunchRequest) -> list[Instance]:
        """Start up to ``count`` instances in one call, tagged with the launch id."""
        ...

    def find_launch(self, launch_id: str) -> list[Instance]:
        """Instances carrying this launch's tag (to finish a launch interrupted by a crash)."""
        ...

    def describe(self, instance_ids: list[str]) -> list[Instance]:
        """Current state of the given instances; unknown ids are simply absent."""
        ...

    def list_pool(self) -> list[Instance]:
        """Every instance of this pool and core, all pages."""
        ...

    def terminate(self, instance_ids: list[str]) -> set[str]:
        """Terminate the instances; returns the ids the cloud no longer knows."""
        ...
