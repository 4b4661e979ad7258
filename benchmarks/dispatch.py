"""Dispatch latency: job submit to job start on an already idle agent, via the real service.

    .venv/bin/python benchmarks/dispatch.py [--samples 100] [--poll-samples 10]

One idle agent (a registered VM of a real core process) either long-polls
(`POST /agent/v1/jobs/next?wait=20`, as alienec2's agent does) or polls every 30 s with no
wait (the baseline). A job is submitted at a random moment through the admin API; the latency
is from just before the submit call to the moment the agent holds the job (one clock).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CoreProcess, percentile


async def trial(
    core: CoreProcess, http: httpx.AsyncClient, token: str, poll_s: float | None, rng: random.Random
) -> float:
    """One job through one agent; returns submit-to-start seconds."""
    headers = {"Authorization": f"Bearer {token}"}
    got: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def agent() -> None:
        if poll_s is not None:  # a poller's phase is arbitrary relative to the submit
            await asyncio.sleep(rng.uniform(0, poll_s))
        while True:
            wait = 20 if poll_s is None else 0
            reply = (
                await http.post("/agent/v1/jobs/next", params={"wait": wait}, headers=headers)
            ).json()
            if reply["job"]:
                got.set_result(time.perf_counter())
                job = reply["job"]
                await http.post(
                    f"/agent/v1/jobs/{job['id']}/report",
                    json={"attempt": job["attempt"], "status": "finished", "exit_code": 0},
                    headers=headers,
                )
                return
            if poll_s is not None:
                await asyncio.sleep(poll_s)

    running = asyncio.create_task(agent())
    await asyncio.sleep(rng.uniform(0.05, 0.3) if poll_s is None else 0)
    async with core.admin() as admin:
        submitted = time.perf_counter()
        reply = await admin.post("/admin/v1/jobs", json={"command": ["true"]})
        reply.raise_for_status()
    started = await got
    await running
    return started - submitted


async def measure(samples: int, poll_samples: int, poll_s: float) -> None:
    core = CoreProcess(vms=1)
    try:
        rng = random.Random(1)
        async with httpx.AsyncClient(base_url=core.agent_url, timeout=60) as http:
            token = await core.register(http, core.instances()[0])
            long_poll = [await trial(core, http, token, None, rng) for _ in range(samples)]
            polled = [await trial(core, http, token, poll_s, rng) for _ in range(poll_samples)]
    finally:
        core.stop()
    print(f"{'agent':<28} {'samples':>7} {'median ms':>10} {'p99 ms':>10} {'max ms':>10}")
    for name, values in (
        ("long poll (wait=20s)", long_poll),
        (f"polling every {poll_s:g}s", polled),
    ):
        print(
            f"{name:<28} {len(values):>7} {statistics.median(values) * 1000:>10.1f} "
            f"{percentile(values, 0.99) * 1000:>10.1f} {max(values) * 1000:>10.1f}"
        )
    median_ratio = statistics.median(polled) / statistics.median(long_poll)
    p99_ratio = percentile(polled, 0.99) / percentile(long_poll, 0.99)
    print(f"polling / long poll: median x{median_ratio:.0f}, p99 x{p99_ratio:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="long-poll trials")
    parser.add_argument("--poll-samples", type=int, default=10, help="polling-agent trials")
    parser.add_argument("--poll-interval", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(measure(args.samples, args.poll_samples, args.poll_interval))


if __name__ == "__main__":
    main()
