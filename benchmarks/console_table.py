"""Console VM table: time to apply an update, cell-level diff versus rebuilding the table.

    .venv/bin/python benchmarks/console_table.py --rows 5000 --changed 500

Runs the real VMTable widget headless (Textual's test driver). For each round, ``changed`` VMs
change state and job; we time ``VMTable.show`` plus the next screen refresh, and the same
update done the naive way (clear the table and add every row) as the baseline.
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

from alienec2_tui.widgets.vm_table import COLUMNS, VMTable, cell, row_for

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


def change(vms: list[dict[str, Any]], count: int, round_: int) -> None:
    step = max(len(vms) // count, 1)
    for n in range(0, step * count, step):
        vm = vms[(n + round_) % len(vms)]
        busy = vm["state"] != "busy"
        vm["state"] = "busy" if busy else "idle"
        vm["job_id"] = 1000 + n + round_ if busy else None


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

        diffed = []
        for round_ in range(rounds):
            change(vms, changed, round_)
            started = time.perf_counter()
            table.show(vms, NOW)
            await pilot.pause()
            diffed.append(time.perf_counter() - started)

        rebuilt = []
        for round_ in range(rounds):
            change(vms, changed, round_ + rounds)
            started = time.perf_counter()
            table.clear()
            for vm in vms:
                row = row_for(vm, NOW)
                table.add_row(
                    *(cell(c, v) for c, v in zip(COLUMNS, row, strict=True)), key=vm["id"]
                )
            await pilot.pause()
            rebuilt.append(time.perf_counter() - started)
    return {
        "rows": rows,
        "changed": changed,
        "initial_ms": initial * 1000,
        "diff_ms": statistics.median(diffed) * 1000,
        "rebuild_ms": statistics.median(rebuilt) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[5000])
    parser.add_argument("--changed", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{'rows':>6} {'changed':>7} {'first fill ms':>13} {'update ms':>9} "
        f"{'rebuild ms':>10} {'rebuild/update':>14}"
    )
    for rows in args.rows:
        r = asyncio.run(measure(rows, args.changed, args.rounds))
        print(
            f"{r['rows']:>6} {r['changed']:>7} {r['initial_ms']:>13.0f} {r['diff_ms']:>9.1f}"
            f" {r['rebuild_ms']:>10.1f} {r['rebuild_ms'] / r['diff_ms']:>14.1f}x"
        )


if __name__ == "__main__":
    main()
