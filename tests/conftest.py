"""Shared fixtures: a real moto EC2 server on loopback, a manual clock, config builders."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest

from core.clouds import TAG_CORE
from core.clouds.sandbox import (
    SANDBOX_CREDENTIALS,
    SANDBOX_IMAGE,
    SANDBOX_REGION,
    FaultyEndpoint,
    MotoEC2Server,
    agent_command,
    prepare_agent,
)
from core.config import Config, parse_config
from core.daemon import Core, build_engine
from core.engine import Engine
from core.model import VMState
from core.store import Store

os.environ.update(SANDBOX_CREDENTIALS)
os.environ.pop("AWS_PROFILE", None)
os.environ["AWS_DEFAULT_REGION"] = SANDBOX_REGION


class ManualClock:
    """Virtual time: tests move it forward instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def moto_session() -> Iterator[MotoEC2Server]:
    with MotoEC2Server() as server:
        yield server


@pytest.fixture
def moto(moto_session: MotoEC2Server) -> MotoEC2Server:
    """moto's EC2 server, emptied for each test."""
    moto_session.reset()
    return moto_session


@pytest.fixture
def faulty(moto: MotoEC2Server) -> Iterator[FaultyEndpoint]:
    with FaultyEndpoint(moto.url) as endpoint:
        yield endpoint


def ec2_client(url: str) -> Any:
    return boto3.client("ec2", endpoint_url=url, region_name=SANDBOX_REGION)


def instances_in_cloud(url: str, core_id: str = "test-core") -> dict[str, str]:
    """instance id -> EC2 state for every instance carrying our core tag."""
    pages = (
        ec2_client(url)
        .get_paginator("describe_instances")
        .paginate(Filters=[{"Name": f"tag:{TAG_CORE}", "Values": [core_id]}])
    )
    return {
        i["InstanceId"]: i["State"]["Name"]
        for page in pages
        for r in page["Reservations"]
        for i in r["Instances"]
    }


def running_in_cloud(url: str, core_id: str = "test-core") -> set[str]:
    return {
        i
        for i, state in instances_in_cloud(url, core_id).items()
        if state in ("pending", "running")
    }


def cloud(name: str, url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint_url": url,
        "region": SANDBOX_REGION,
        "image_id": SANDBOX_IMAGE,
        "exact_count": True,
        "max_attempts": 1,
        **overrides,
    }


def make_config(tmp_path: Path, clouds: list[dict[str, Any]], **sections: Any) -> Config:
    data: dict[str, Any] = {
        "core_id": "test-core",
        "clouds": clouds,
        "state": {"path": str(tmp_path / "state.db"), "synchronous": "normal"},
        "admin": {"socket": str(tmp_path / "admin.sock")},
        # Port 0: tests never collide with a core (or another test) on the default port.
        "web": {"host": "127.0.0.1", "port": 0},
    }
    pool = {"cycle_interval_s": 0.05, "adaptive_warm": False}
    pool.update(sections.pop("pool", {}))
    data["pool"] = pool
    data.update(sections)
    return parse_config(data)


StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine_on(tmp_path: Path, clock: ManualClock) -> AsyncIterator[StartEngine]:
    """Start engines on the test's clock from a list of clouds (and config sections); each
    store opened is closed afterwards."""
    stores: list[Store] = []
    engines: list[Engine] = []

    async def start(clouds: list[dict[str, Any]], **sections: Any) -> Engine:
        config = make_config(tmp_path, clouds, **sections)
        stores.append(Store(config.state.path))
        engines.append(build_engine(config, stores[-1], clock))
        await engines[-1].start()
        return engines[-1]

    yield start
    for engine in engines:
        engine.close()  # its observer thread and read-only connection
    for store in stores:
        store.close()


async def step(engine: Engine) -> None:
    """One cycle, then wait for the cloud calls it started."""
    await engine.cycle()
    await engine.settle()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", "normal")
    yield s
    s.close()


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` (which may assert, e.g. that a process still runs) until it returns
    something truthy, and return that; fail after ``timeout`` seconds of real time. For
    processes and files outside the test's event loop, where there is nothing to await."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)
    return value


async def eventually(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll until ``predicate()`` holds, failing after ``timeout`` seconds of real time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# ---- a real core (engine + uvicorn on loopback) and real agent processes ------------------


def core_config(tmp_path: Path, moto_url: str, **sections: Any) -> Config:
    """A config for a core on loopback: agent API on a free port, admin on a tmp socket."""
    web = {"host": "127.0.0.1", "port": 0}
    web.update(sections.pop("web", {}))
    contextualisation = {"agent_heartbeat_s": 0.5, **sections.pop("contextualisation", {})}
    return make_config(
        tmp_path,
        [cloud("c", moto_url)],
        web=web,
        contextualisation=contextualisation,
        **sections,
    )


@contextlib.asynccontextmanager
async def running_core(config: Config) -> AsyncIterator[Core]:
    core = Core(config)
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


async def wait_for_vms(core: Core, count: int, timeout: float = 15.0) -> list[str]:
    """Ids of the first ``count`` instances the core has launched."""
    await eventually(lambda: len(core.store.vms()) >= count, timeout)
    return [vm.id for vm in core.store.vms()][:count]


class AgentProcess:
    """The real agent script, booted from the instance's user data as read back from EC2."""

    def __init__(self, moto_url: str, vm_id: str, workdir: Path, **overrides: Any) -> None:
        user_data = ec2_client(moto_url).describe_instance_attribute(
            InstanceId=vm_id, Attribute="userData"
        )["UserData"]["Value"]
        # Jobs run as the test's own user (no alienec2-job account here) and no IMDS is polled
        # for Spot notices unless a test asks for it.
        settings = {
            "fetch_wait_s": 5,
            "max_backoff_s": 0.5,
            "job_user": "",
            "spot_poll_s": 0,
            **overrides,
        }
        self.settings_path = prepare_agent(
            base64.b64decode(user_data).decode(), vm_id, workdir / vm_id, **settings
        )
        self.state_dir = workdir / vm_id / "state"
        self.log_path = workdir / vm_id / "agent.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            agent_command(self.settings_path), stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def agents(moto: MotoEC2Server, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(vm_id: str, **overrides: Any) -> AgentProcess:
        agent = AgentProcess(moto.url, vm_id, tmp_path / "agents", **overrides)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


# ---- a core with two idle VMs, each with its real agent (the console's tests) -----------


@pytest.fixture
async def console_core(
    tmp_path: Path, moto: MotoEC2Server, agents: Callable[..., AgentProcess]
) -> Any:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 2})) as core:
        vm_ids = await wait_for_vms(core, 2)
        for vm_id in vm_ids:
            agents(vm_id)
        await eventually(lambda: all(core.store.vm(v).state == VMState.IDLE for v in vm_ids))
        yield core
