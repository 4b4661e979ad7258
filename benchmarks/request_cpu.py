"""The core's CPU time per agent request: a figure a shared machine disturbs less than latency.

    .venv/bin/python benchmarks/request_cpu.py [--agents 50] [--requests 20000] [--close]

A core with ``--agents`` VMs in moto; each registered agent sends heartbeats and fetches
(``wait=0``, no job queued) back to back on its kept-alive connection (``--close``: a new
connection per request, as the agent did with urllib) until ``--requests`` are answered. The
core's CPU seconds (user + system, from /proc) over those requests, divided by their number,
is printed in ms; latency is not measured. Run it against two trees to compare a change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CoreProcess
from load import Connection, Source, Usage, register_all


async def hammer(port: int, tokens: list[str], total: int, close: bool) -> float:
    """Send ``total`` requests from every agent at once; the seconds they took."""
    left = total

    async def agent(n: int, token: str) -> None:
        nonlocal left
        connection = Connection(port, Source(n), close)
        while left > 0:
            left -= 2
            status, _ = await connection.request("/agent/v1/heartbeat", {"busy": False}, token)
            assert status == 200, status
            status, _ = await connection.request("/agent/v1/jobs/next?wait=0", {}, token)
            assert status == 200, status

    started = time.perf_counter()
    await asyncio.gather(*(agent(n, t) for n, t in enumerate(tokens)))
    return time.perf_counter() - started


async def measure(args: argparse.Namespace) -> None:
    core = CoreProcess(vms=args.agents, cycle_interval_s=15.0, tag_index=True)
    try:
        tokens = await register_all(core, core.registrations())
        await hammer(core.port, tokens, 2000, args.close)  # warm-up: imports, caches, GC
        assert core.proc is not None
        usage = Usage(core.proc.pid)
        before = usage.cpu_s()
        elapsed = await hammer(core.port, tokens, args.requests, args.close)
        cpu_s = usage.cpu_s() - before
    finally:
        core.stop()
    print(
        f"load average {os.getloadavg()[0]:.2f}; {args.agents} agents, "
        f"{'a connection per request' if args.close else 'kept-alive connections'}: "
        f"{args.requests} requests in {elapsed:.1f} s, core CPU {cpu_s:.2f} s, "
        f"{cpu_s * 1000 / args.requests:.3f} ms per request"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--close", action="store_true")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
