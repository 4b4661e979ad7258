"""Shared set-up for the service benchmarks: a real core (subprocess) on loopback, moto as its
cloud, and agents that register with the launch secret their instance's user data carries."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.clouds import TAG_LAUNCH
from core.clouds.sandbox import (
    SANDBOX_CREDENTIALS,
    SANDBOX_IMAGE,
    SANDBOX_REGION,
)
from core.userdata import read_agent_settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoProcess:
    """moto's server in its own process, so its CPU time is not charged to the engine."""

    def __init__(self, tag_index: bool = False) -> None:
        """``tag_index``: moto with an O(1) tag lookup (see moto_tag_index.py)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        server = (
            [str(ROOT / "benchmarks" / "moto_tag_index.py")] if tag_index else ["-m", "moto.server"]
        )
        self._proc = subprocess.Popen(
            [sys.executable, *server, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(
            urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=30
        ).close()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)


class CoreProcess:
    """`alienec2 core` in its own process (its own GIL), with ``vms`` instances launched."""

    def __init__(
        self,
        vms: int,
        heartbeat_s: float = 30.0,
        *,
        cycle_interval_s: float = 1.0,
        tag_index: bool = False,
        cpus: set[int] | None = None,
        launch_timeout_s: float | None = None,
    ) -> None:
        """``cpus``: pin the core's process to these CPUs (its share of the machine);
        ``tag_index``: moto with an O(1) tag lookup, for fleets of thousands."""
        os.environ.update(SANDBOX_CREDENTIALS)
        self.tmp = tempfile.TemporaryDirectory()
        # moto in its own process: its large object graph must not pause the load generator.
        self.cloud = MotoProcess(tag_index=tag_index)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cycle_interval_s = cycle_interval_s
        self.cpus = cpus
        # Listing 10,000 instances in moto takes minutes on a loaded machine.
        self.launch_timeout_s = launch_timeout_s
        try:
            self._start(vms, heartbeat_s)
        except BaseException:
            self.stop()  # nothing may outlive a failed start: not moto, not the core
            raise

    def _start(self, vms: int, heartbeat_s: float) -> None:
        self.port = free_port()
        self.agent_url = f"http://127.0.0.1:{self.port}"
        self.socket = str(Path(self.tmp.name) / "admin.sock")
        config = {
            "core_id": "bench",
            "clouds": [
                {
                    "name": "c",
                    "endpoint_url": self.cloud.url,
                    "region": SANDBOX_REGION,
                    "image_id": SANDBOX_IMAGE,
                    "exact_count": True,
                    "max_instances": vms,
                    "read_timeout_s": 600,
                }
            ],
            "pool": {
                "min_vms": vms,
                "max_vms": vms,
                "max_launch_per_cycle": vms,
                "cycle_interval_s": self.cycle_interval_s,
                "heartbeat_timeout_s": 3600,
                "boot_timeout_s": 3600,
                "reconcile_interval_s": 3600,
                "adaptive_warm": False,
            },
            "state": {"path": str(Path(self.tmp.name) / "state.db"), "synchronous": "normal"},
            "web": {"host": "127.0.0.1", "port": self.port},
            "admin": {"socket": self.socket},
            "contextualisation": {"agent_heartbeat_s": heartbeat_s},
        }
        path = Path(self.tmp.name) / "config.json"  # JSON is YAML
        path.write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "core.cli",
                "core",
                "--config",
                str(path),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            # ALIENEC2_BENCH_CORE_LOG=FILE keeps the core's log (with PYTHONASYNCIODEBUG=1,
            # every callback that blocks the event loop for more than 100 ms is named there).
            stderr=open(os.environ["ALIENEC2_BENCH_CORE_LOG"], "w")  # noqa: SIM115
            if os.environ.get("ALIENEC2_BENCH_CORE_LOG")
            else subprocess.DEVNULL,
        )
        if self.cpus is not None:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        self.ec2 = boto3.client("ec2", endpoint_url=self.cloud.url, region_name=SANDBOX_REGION)
        # moto creates instances one at a time: ~20 ms each on a busy machine (10,001 took over
        # 220 s twice while the machine was still busy with other work).
        deadline = time.monotonic() + (self.launch_timeout_s or 120 + vms / 40)
        while len(self.instances()) < vms:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the core did not launch its instances")
            time.sleep(0.2)

    def instances(self) -> list[str]:
        pages = self.ec2.get_paginator("describe_instances").paginate()
        return [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]

    def registrations(self) -> list[dict[str, str]]:
        """A register body for every instance: user data read once per launch (by its tag),
        not once per instance, which takes minutes with 10,000 instances."""
        pages = self.ec2.get_paginator("describe_instances").paginate()
        by_launch: dict[str, list[str]] = {}
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    launch = tags.get(TAG_LAUNCH, "")
                    by_launch.setdefault(launch, []).append(instance["InstanceId"])
        bodies = []
        for ids in by_launch.values():
            settings = self.launch_settings(ids[0])
            bodies += [
                {
                    "instance_id": instance_id,
                    "launch_id": settings["launch_id"],
                    "launch_secret": settings["launch_secret"],
                }
                for instance_id in ids
            ]
        return bodies

    def launch_settings(self, instance_id: str) -> dict[str, Any]:
        raw = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        return read_agent_settings(base64.b64decode(raw["UserData"]["Value"]).decode())

    async def register(self, http: httpx.AsyncClient, instance_id: str) -> str:
        settings = self.launch_settings(instance_id)
        body = {
            "instance_id": instance_id,
            "launch_id": settings["launch_id"],
            "launch_secret": settings["launch_secret"],
        }
        for _ in range(100):
            reply = await http.post("/agent/v1/register", json=body)
            if reply.status_code == 200:
                return reply.json()["token"]
            await asyncio.sleep(0.1)  # the launch result is not recorded yet
        raise RuntimeError(f"cannot register {instance_id}: {reply.text}")

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket), base_url="http://core", timeout=60
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.cloud.stop()
        self.tmp.cleanup()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]
