"""Engine cycle time, EC2 calls and memory with large fleets in moto's EC2 server; the
console's VM table with as many rows.

    .venv/bin/python benchmarks/scale.py                       # 1,000 / 5,000 / 10,000
    .venv/bin/python benchmarks/scale.py --sizes 1000 --stock-moto

For each size N: N tagged instances are launched in moto and known to the store as idle,
heartbeating VMs. It then times (a) the start-up reconcile, split into moto's listing and our
own work, (b) a steady cycle (nothing changing), and (c) a cycle that reaps 10% of the fleet,
and counts the EC2 calls each makes as seen by the endpoint. moto runs in its own process with
its tag lookup indexed (moto_tag_index.py: same answers, O(N) instead of O(N²) listing) unless
--stock-moto. Last, the console's VM table is filled with the largest N rows and updated.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from console_table import measure as measure_table
from harness import MotoProcess

from core.clouds.sandbox import (
    SANDBOX_CREDENTIALS,
    SANDBOX_IMAGE,
    SANDBOX_REGION,
    FaultyEndpoint,
)
from core.config import parse_config
from core.daemon import build_engine
from core.model import VMState
from core.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def timed(obj: object, method: str) -> list[float]:
    """Wrap ``obj.method`` to record how long each call takes; returns the list it fills."""
    durations: list[float] = []
    original = getattr(obj, method)

    def wrapper(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args)
        finally:
            durations.append(time.perf_counter() - started)

    setattr(obj, method, wrapper)
    return durations


async def measure(size: int, moto: MotoProcess, workdir: Path) -> dict[str, float]:
    moto.reset()
    endpoint = FaultyEndpoint(moto.url).start()
    config = parse_config(
        {
            "core_id": "bench",
            "clouds": [
                {
                    "name": "c",
                    "endpoint_url": endpoint.url,
                    "region": SANDBOX_REGION,
                    "image_id": SANDBOX_IMAGE,
                    "exact_count": True,
                    "max_instances": size * 2,
                    "read_timeout_s": 600,
                }
            ],
            "pool": {
                "min_vms": int(size * 0.9),
                "max_vms": size,
                "adaptive_warm": False,
                "idle_timeout_s": 600,
                "heartbeat_timeout_s": 10_000,
                "reconcile_interval_s": 10_000,
            },
            "state": {"path": str(workdir / f"state-{size}.db"), "synchronous": "normal"},
        }
    )
    clock = Clock()
    store = Store(config.state.path, "normal")
    engine = build_engine(config, store, clock)
    provider = engine.providers["c"]

    # A fleet the engine launched earlier: one launch, every VM registered and idle.
    launch = engine._new_launch("c", size, clock())
    instances = provider.launch(engine._request(launch))
    store.complete_launch(launch.id, [(i.id, i.address) for i in instances], clock())
    for instance in instances:
        store.register_vm(instance.id, clock())

    # moto's share of the time: the provider calls the engine makes, timed where they are made.
    listing = timed(provider, "list_pool")
    terminating = timed(provider, "terminate")
    endpoint.calls.clear()
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    start_calls = sum(endpoint.calls.values())
    listing_s = sum(listing)
    assert len(store.vms([VMState.IDLE])) == size, "the reconcile must keep every VM"
    gc.freeze()  # as `alienec2 core` does once started

    steady = []
    endpoint.calls.clear()
    for _ in range(10):
        clock.now += 1
        started = time.perf_counter()
        actions = await engine.cycle()
        await engine.settle()
        steady.append(time.perf_counter() - started)
        assert actions == []
    steady_calls = sum(endpoint.calls.values()) / 10

    clock.now += 601  # everyone is idle past the timer: reap down to min_vms
    for vm in store.vms([VMState.IDLE]):
        store.heartbeat(vm.id, clock.now)
    endpoint.calls.clear()
    started = time.perf_counter()
    actions = await engine.cycle()
    await engine.settle()
    reap_s = time.perf_counter() - started
    reap_calls = sum(endpoint.calls.values())
    reaped = len(store.vms([VMState.TERMINATED]))
    store.close()
    gc.unfreeze()
    endpoint.stop()
    os.remove(config.state.path)
    return {
        "size": size,
        "listing_s": listing_s,
        "start_s": start_s,
        "start_ours_s": max(start_s - listing_s, 0.0),
        "start_calls": start_calls,
        "steady_ms": statistics.median(steady) * 1000,
        "steady_calls": steady_calls,
        "reap_ms": reap_s * 1000,
        "reap_ours_ms": (reap_s - sum(terminating)) * 1000,
        "reaped": reaped,
        "reap_calls": reap_calls,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument(
        "--stock-moto", action="store_true", help="moto as shipped (listing is O(N²))"
    )
    args = parser.parse_args()
    os.environ.update(SANDBOX_CREDENTIALS)
    rows = []
    moto = MotoProcess(tag_index=not args.stock_moto)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                rows.append(asyncio.run(measure(size, moto, Path(tmp))))
                print(f"  {size} VMs measured", file=sys.stderr, flush=True)
    finally:
        moto.stop()
    header = (
        f"{'VMs':>6} {'list call s':>11} {'start s':>8} {'start ours s':>12} {'calls':>5} "
        f"{'steady ms':>9} {'calls':>5} {'reap ms':>8} {'ours ms':>8} {'reaped':>6} {'calls':>5} "
        f"{'max RSS MB':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:>6} {r['listing_s']:>11.2f} {r['start_s']:>8.2f}"
            f" {r['start_ours_s']:>12.2f}"
            f" {r['start_calls']:>5.0f} {r['steady_ms']:>9.1f} {r['steady_calls']:>5.1f}"
            f" {r['reap_ms']:>8.1f} {r['reap_ours_ms']:>8.1f} {r['reaped']:>6}"
            f" {r['reap_calls']:>5.0f} {r['rss_mb']:>10.0f}"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"steady cycle time x{last['steady_ms'] / first['steady_ms']:.1f} for "
            f"x{last['size'] / first['size']:.0f} VMs; EC2 calls per steady cycle "
            f"{first['steady_calls']:.0f} -> {last['steady_calls']:.0f}"
        )
    table = asyncio.run(measure_table(max(args.sizes), changed=500, rounds=5))
    print(
        f"console VM table, {table['rows']} rows: first paint {table['initial_ms']:.0f} ms; "
        f"{table['changed']} VMs changed: update {table['update_ms']:.0f} ms "
        f"({table['sorted_ms']:.0f} ms sorted by state), re-snapshot "
        f"{table['snapshot_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()
