"""Demand from any command that prints one integer: the escape hatch for AliEn/jAliEn CLIs."""

from __future__ import annotations

import asyncio

from core.queues import DemandError


async def run_command(argv: list[str], timeout_s: float) -> str:
    """Run argv without a shell; its stdout, or DemandError naming what went wrong."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise DemandError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DemandError(f"{argv[0]!r} did not finish within {timeout_s:g}s") from None
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise DemandError(f"{argv[0]!r} exited with {proc.returncode}: {detail[0][:200]}")
    return out.decode(errors="replace")


class CommandQueue:
    def __init__(self, argv: list[str], timeout_s: float) -> None:
        self._argv = argv
        self._timeout_s = timeout_s

    async def waiting(self) -> int:
        out = (await run_command(self._argv, self._timeout_s)).strip()
        try:
            value = int(out)
        except ValueError:
            raise DemandError(f"{self._argv[0]!r} printed {out[:80]!r}, not an integer") from None
        if value < 0:
            raise DemandError(f"{self._argv[0]!r} printed a negative count ({value})")
        return value
