"""What one attached console reads from the core, at fleet scale: before (a full refresh every
second) and after (one snapshot, then the event stream and small deltas).

    .venv/bin/python benchmarks/console_traffic.py [--vms 1000 10000] [--seconds 60]

Starts a core with N VMs in moto, registers every agent and keeps them heartbeating every
30 s (a child process; no jobs). *Before*: the bytes of the old console's per-second refresh
(status, every VM, the 50 most recent jobs). *After*: the real console (``ConsoleApp``,
headless) runs against the core; its snapshot is counted apart, then every byte its client
reads over ``--seconds`` (long polls of events, status, heartbeat deltas). Bytes are counted
on the wire: HTTP bodies and headers as received (the admin socket does not compress).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import CoreProcess
from load import HEARTBEAT_S, Source, register_all, request

from alienec2_tui.app import RECENT_JOBS, ConsoleApp
from alienec2_tui.client import AdminClient
from alienec2_tui.widgets.vm_table import VMTable


async def refresh_bytes(core: CoreProcess) -> dict[str, int]:
    """Bytes of each of the old console's per-second reads."""
    sizes: dict[str, int] = {}
    async with core.admin() as http:
        for name, path, params in (
            ("status", "/admin/v1/status", {}),
            ("vms", "/admin/v1/vms", {}),
            ("jobs", "/admin/v1/jobs", {"limit": RECENT_JOBS}),
        ):
            reply = await http.get(path, params=params)
            reply.raise_for_status()
            sizes[name] = len(reply.content) + sum(
                len(k) + len(v) + 4 for k, v in reply.headers.items()
            )
    return sizes


class CountingClient(AdminClient):
    """The console's own client, counting the bytes of every answer."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path=socket_path)
        self.received = 0
        self._http.event_hooks["response"].append(self._count)

    async def _count(self, response: httpx.Response) -> None:
        await response.aread()
        headers = sum(len(k) + len(v) + 4 for k, v in response.headers.items())
        self.received += len(response.content) + headers


async def follow_bytes(core: CoreProcess, vms: int, seconds: float) -> tuple[int, float]:
    """(snapshot bytes, steady bytes per second) of the real console."""
    client = CountingClient(core.socket)
    try:
        app = ConsoleApp(client, catch_signals=False)
        async with app.run_test(size=(120, 40)) as pilot:
            deadline = time.monotonic() + 300
            while app.query_one(VMTable).row_count < vms or not app.snapshots:
                if time.monotonic() > deadline:
                    raise RuntimeError("the console never showed the fleet")
                await pilot.pause(0.1)
            await pilot.pause(2.0)  # the attach's own reads (flow, log backlog) are done
            snapshot = client.received
            client.received = 0
            started = time.monotonic()
            await asyncio.sleep(seconds)
            steady = client.received / (time.monotonic() - started)
            if app.snapshots != 1:
                raise RuntimeError(f"the console took {app.snapshots} snapshots, not one")
    finally:
        await client.aclose()
    return snapshot, steady


async def heartbeat(port: int, tokens: list[str]) -> None:
    """Every agent heartbeats every HEARTBEAT_S, spread evenly; until stdin closes."""
    rng = random.Random(1)

    async def one(n: int, token: str) -> None:
        await asyncio.sleep(rng.uniform(0, HEARTBEAT_S))
        while True:
            await request(port, "/agent/v1/heartbeat", {"busy": False}, token, Source(n))
            await asyncio.sleep(HEARTBEAT_S)

    tasks = [asyncio.create_task(one(n, t)) for n, t in enumerate(tokens)]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def main_async(counts: list[int], seconds: float) -> None:
    print(
        f"{'VMs':>6} {'before: per second':>19} {'after: snapshot':>16} {'after: per second':>18}"
    )
    for count in counts:
        core = CoreProcess(
            vms=count, cycle_interval_s=15.0, tag_index=True, launch_timeout_s=300 + count / 10
        )
        beats = None
        try:
            before = sum((await refresh_bytes(core)).values())
            tokens = await register_all(core, core.registrations())
            beats = subprocess.Popen(
                [sys.executable, __file__, "--heartbeat"], stdin=subprocess.PIPE, text=True
            )
            assert beats.stdin is not None
            beats.stdin.write(json.dumps({"port": core.port, "tokens": tokens}) + "\n")
            beats.stdin.flush()
            snapshot, steady = await follow_bytes(core, count, seconds)
        finally:
            if beats is not None:
                beats.communicate("stop\n", timeout=60)
            core.stop()
        print(
            f"{count:>6} {before:>15,} B/s {snapshot:>14,} B {steady:>14,.0f} B/s",
            flush=True,
        )


def main() -> None:
    if sys.argv[1:2] == ["--heartbeat"]:
        payload = json.loads(sys.stdin.readline())
        asyncio.run(heartbeat(payload["port"], payload["tokens"]))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vms", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.vms, args.seconds))


if __name__ == "__main__":
    main()
