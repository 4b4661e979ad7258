"""What an SSH session pays for a console: bytes the console writes to its terminal.

    .venv/bin/python benchmarks/console_pty.py [--vms 1000] [--seconds 60]

Starts a core with N VMs whose agents heartbeat every 30 s (load.py's generators, no jobs),
runs ``alienec2 tui`` on a pseudo-terminal of 120x40 and counts the bytes it writes there,
read from the pty's master side, over ``--seconds`` after it has painted.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, CoreProcess
from load import child, finish, register_all


def read_pty(fd: int, seconds: float) -> int:
    total = 0
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                total += len(os.read(fd, 65536))
            except OSError:
                break
    return total


async def measure(vms: int, seconds: float, settle: float) -> tuple[int, int]:
    core = CoreProcess(vms=vms, cycle_interval_s=15.0, tag_index=True)
    procs = []
    tui = None
    try:
        tokens = await register_all(core, core.registrations())
        procs.append(
            child(
                ["--generator"],
                {"port": core.port, "tokens": tokens, "first": 0, "spread_s": 5.0},
                False,
            )
        )
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40")
        tui = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "tui", "--socket", core.socket],
            cwd=ROOT,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, read_pty, master, settle)
        steady = await loop.run_in_executor(None, read_pty, master, seconds)
        return first, steady
    finally:
        if tui is not None:
            tui.terminate()
            tui.wait(timeout=10)
        for proc in procs:
            finish(proc)
        core.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    first, steady = asyncio.run(measure(args.vms, args.seconds, args.settle))
    print(f"{args.vms} VMs heartbeating, 120x40: first {args.settle:.0f} s (paint) {first:,} B")
    print(f"steady: {steady:,} B in {args.seconds:.0f} s = {steady * 60 / args.seconds:,.0f} B/min")


if __name__ == "__main__":
    main()
