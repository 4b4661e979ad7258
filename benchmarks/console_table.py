"""Console VM table: the first paint of a fleet, and applying 500 changed VMs.

    .venv/bin/python benchmarks/console_table.py --rows 5000 10000 --changed 500

Runs the real VMTable widget headless (Textual's test driver). First paint: ``show`` of the
snapshot's VMs plus the screen refresh that draws them. Update: ``changed`` VMs change state
and job, applied as the console applies an event batch's records (``update``), plus the next
screen refresh; then the same with the table's sort on state (every change moves rows). The
snapshot path (``show`` of the whole fleet again, as after a gap) is timed too.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textual.app import App, ComposeResult

from alienec2_tui.widgets.vm_table import VMTable

NOW = 1_800_000_000.0


def fleet(rows: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"i-{n:017x}",
            "cloud": f"cloud-{n % 3}",
            "state": "idle",
            "launched_at": NOW - 3600 - n,
            "idle_since": NOW - 600,
            "last_heartbeat": NOW - 5,
            "job_id": None,
            "address": f"10.{n // 65536}.{n // 256 % 256}.{n % 256}",
        }
        for n in range(rows)
    ]


def change(vms: list[dict[str, Any]], count: int, round_: int) -> list[dict[str, Any]]:
    """Flip ``count`` VMs spread over the fleet between idle and busy; the new records."""
    step = max(len(vms) // count, 1)
    changed = []
    for n in range(0, step * count, step):
        index = (n + round_) % len(vms)
        vm = dict(vms[index])
        busy = vm["state"] != "busy"
        vm["state"] = "busy" if busy else "idle"
        vm["job_id"] = 1000 + n + round_ if busy else None
        vms[index] = vm
        changed.append(vm)
    return changed


class Bench(App[None]):
    def compose(self) -> ComposeResult:
        yield VMTable()


async def measure(rows: int, changed: int, rounds: int) -> dict[str, float]:
    vms = fleet(rows)
    app = Bench()
    async with app.run_test(size=(160, 50)) as pilot:
        table = app.query_one(VMTable)
        started = time.perf_counter()
        table.show(vms, NOW)
        await pilot.pause()
        initial = time.perf_counter() - started

        async def timed(apply: Any, round_: int) -> float:
            records = change(vms, changed, round_)
            started = time.perf_counter()
            apply(records)
            await pilot.pause()
            return time.perf_counter() - started

        updates = [await timed(table.update, r) for r in range(rounds)]
        table.cycle_sort()
        table.cycle_sort()  # id -> cloud -> state: every change moves its row
        assert table.sort_column == "state"
        sorted_updates = [await timed(table.update, r + rounds) for r in range(rounds)]
        snapshots = [
            await timed(lambda _: table.show(vms, NOW), r + 2 * rounds) for r in range(rounds)
        ]
    return {
        "rows": rows,
        "changed": changed,
        "initial_ms": initial * 1000,
        "update_ms": statistics.median(updates) * 1000,
        "sorted_ms": statistics.median(sorted_updates) * 1000,
        "snapshot_ms": statistics.median(snapshots) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000])
    parser.add_argument("--changed", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{'rows':>6} {'changed':>7} {'first paint ms':>14} {'update ms':>9} "
        f"{'update, sorted by state ms':>26} {'re-snapshot ms':>14}"
    )
    for rows in args.rows:
        r = asyncio.run(measure(rows, args.changed, args.rounds))
        print(
            f"{r['rows']:>6} {r['changed']:>7} {r['initial_ms']:>14.0f} {r['update_ms']:>9.1f}"
            f" {r['sorted_ms']:>26.1f} {r['snapshot_ms']:>14.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
