"""What one attached console reads from the core each second, at fleet scale.

    .venv/bin/python benchmarks/console_traffic.py [--vms 1000 10000]

Starts a core with N VMs in moto and makes the console's own refresh with its own client
(``alienec2_tui/client.py``): status, every VM and the 50 most recent jobs, which the console
fetches every ``refresh_s`` (1 s). Bytes are counted on the wire (HTTP bodies as sent, before
any decompression: the admin socket does not compress).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import CoreProcess

from alienec2_tui.app import RECENT_JOBS


async def refresh_bytes(core: CoreProcess) -> dict[str, int]:
    """Bytes of each of the console's per-second reads."""
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


async def main_async(counts: list[int]) -> None:
    print(f"{'VMs':>6} {'status B':>9} {'vms B':>10} {'jobs B':>8} {'per second':>11}")
    for count in counts:
        core = CoreProcess(vms=count, cycle_interval_s=15.0, tag_index=True)
        try:
            sizes = await refresh_bytes(core)
        finally:
            core.stop()
        total = sum(sizes.values())
        print(
            f"{count:>6} {sizes['status']:>9,} {sizes['vms']:>10,} {sizes['jobs']:>8,}"
            f" {total:>10,} B/s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vms", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args()
    asyncio.run(main_async(args.vms))


if __name__ == "__main__":
    main()
