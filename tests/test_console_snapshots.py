"""Snapshots of the console at 80x24, 120x40 and 160x50. A snapshot must be byte-identical
from run to run, so the console is fed fixed data by a stand-in for the admin client (the HTTP
edge); every behaviour is tested against a real core in test_console.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from alienec2_tui.app import ConsoleApp
from alienec2_tui.client import AdminClient
from alienec2_tui.screens.job_details import JobDetails
from alienec2_tui.widgets.job_flow import JobFlow
from alienec2_tui.widgets.log_panel import LogPanel

NOW = 1_800_000_000.0
STATES = ["idle", "busy", "busy", "booting", "draining", "failed", "requested", "lost"]


def vm(n: int, state: str) -> dict[str, Any]:
    registered = state not in ("booting", "requested", "failed")
    return {
        "id": f"i-0{n:016x}",
        "cloud": "aws-eu" if n % 3 else "openstack",
        "launch_id": f"launch{n // 4}",
        "state": state,
        "launched_at": NOW - 600 * n - 30,
        "state_since": NOW - 20,
        "registered_at": NOW - 500 * n if registered else None,
        "last_heartbeat": NOW - n if registered else None,
        "idle_since": NOW - 45 if state == "idle" else None,
        "job_id": 100 + n if state in ("busy", "draining") else None,
        "address": f"10.0.{n}.{n + 10}",
        "kill_requested": False,
    }


def job(n: int) -> dict[str, Any]:
    done, failed = n > 3, n == 5
    return {
        "id": 330 - n,
        "command": ["sh", "-c", f"run-analysis --chunk {n}"],
        "state": "failed" if failed else "done" if done else "running",
        "attempt": 2 if failed else 1,
        "max_attempts": 3,
        "env": {"ALIEN_TOKEN": "secret", "CHUNK": str(n)},
        "wall_time_s": None,
        "vm_id": f"i-0{n % 3 + 2:016x}",
        "submitted_at": NOW - 300 - n * 20,
        "assigned_at": NOW - 290 - n * 20,
        "started_at": NOW - 290 - n * 20,
        "finished_at": NOW - 100 if done else None,
        "exit_code": (3 if failed else 0) if done else None,
        "output_tail": "\n".join(f"chunk {n}: step {i} ok [{i * 10}%]" for i in range(12))
        if done
        else None,
        "reason": "exit code 3" if failed else None,
        "wait_s": 10.0 + n,
    }


class FixedCore(AdminClient):
    """Answers like a core with a fixed pool; events arrive once, then the stream is quiet."""

    def __init__(self) -> None:
        super().__init__(socket_path="/nonexistent")
        self._events_sent = False

    async def status(self) -> dict[str, Any]:
        return {
            "now": NOW,
            "core_id": "site-core",
            "pool": {
                "name": "alice",
                "min_vms": 2,
                "max_vms": 40,
                "paused": False,
                "vms": {
                    "idle": 1,
                    "busy": 2,
                    "booting": 1,
                    "requested": 1,
                    "draining": 1,
                    "failed": 1,
                    "lost": 1,
                },
            },
            "queue": {
                "kind": "builtin",
                "jobs": {"queued": 17, "assigned": 0, "running": 2, "done": 310, "failed": 4},
            },
            "clouds": [
                {
                    "name": "openstack",
                    "priority": 10,
                    "max_instances": 20,
                    "alive": 3,
                    "backoff_s": 0.0,
                    "last_error": None,
                },
                {
                    "name": "aws-eu",
                    "priority": 20,
                    "max_instances": 50,
                    "alive": 5,
                    "backoff_s": 120.0,
                    "last_error": "InsufficientInstanceCapacity",
                },
            ],
            "agents_waiting": 1,
            "last_seq": 2000,
        }

    async def snapshot(self, jobs: int = 50) -> dict[str, Any]:
        return {
            "seq": 1119,
            "started_at": NOW - 3600,
            "now": NOW,
            "status": await self.status(),
            "vms": (await self.vms())["vms"],
            "jobs": (await self.jobs())["jobs"],
        }

    async def heartbeats(self, since: float) -> dict[str, Any]:
        return {"now": NOW, "started_at": NOW - 3600, "heartbeats": {}}

    async def vms(self, state: str | None = None) -> dict[str, Any]:
        return {"now": NOW, "vms": [vm(n + 1, s) for n, s in enumerate(STATES)]}

    async def jobs(self, state: str | None = None, limit: int = 200) -> dict[str, Any]:
        return {"now": NOW, "jobs": [job(n) for n in range(12)]}

    async def job(self, job_id: int) -> dict[str, Any]:
        return job(330 - job_id)

    async def flow(self, minutes: int = 60) -> dict[str, Any]:
        first = (NOW // 60 - minutes + 1) * 60
        return {
            "now": NOW,
            "last_seq": 2000,
            "minutes": [
                {
                    "t": first + 60 * i,
                    "submitted": (i * 7) % 11,
                    "started": (i * 5) % 9,
                    "finished": (i * 3) % 8,
                    "failed": 1 if i % 13 == 0 else 0,
                }
                for i in range(minutes)
            ],
        }

    async def events(
        self, after: int = 0, wait: float = 0, limit: int = 1000, records: bool = False
    ) -> dict[str, Any]:
        if self._events_sent:
            await asyncio.sleep(wait)
            return {"events": [], "last_seq": after, "first_seq": 1000}
        self._events_sent = True
        kinds = ["job_queued", "job_running", "job_done", "vm_idle", "launch_done"]
        events = [
            {
                "seq": 1000 + i,
                "ts": NOW - 3500 + i * 29,
                "kind": kinds[i % 5],
                "message": f"event {i}",
                "vm_id": f"i-0{i % 8 + 1:016x}" if i % 5 > 2 else None,
                "job_id": 200 + i if i % 5 < 3 else None,
                "cloud": None,
            }
            for i in range(120)
        ]
        return {"events": events, "last_seq": events[-1]["seq"], "first_seq": 1000}


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


SIZES = [(80, 24), (120, 40), (160, 50)]


async def settle(pilot: Any) -> None:
    """Wait for the fixed data, then draw the flow once more: the poll and the event stream
    race, and a snapshot must not depend on which won."""
    app = pilot.app
    for _ in range(300):
        if app.query_one("VMTable").row_count == len(STATES) and app.last_seq == 1119 and app.now:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.1)
    app.query_one(JobFlow).refresh_flow(NOW)
    app.query_one(LogPanel).scroll_end(animate=False)
    await pilot.pause(0.1)


async def jobs_view(pilot: Any) -> None:
    await settle(pilot)
    await pilot.press("2")
    for _ in range(300):
        if pilot.app.query_one("#jobs").row_count == 12:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.1)


async def job_details(pilot: Any) -> None:
    await jobs_view(pilot)
    await pilot.press("j", "j", "j", "j", "j", "enter")  # job 325: failed on its second attempt
    for _ in range(300):
        if isinstance(pilot.app.screen, JobDetails) and pilot.app.screen.updates:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.1)


def console() -> ConsoleApp:
    return ConsoleApp(FixedCore(), refresh_s=60, catch_signals=False)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_vm_view_snapshot(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(console(), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_jobs_view_snapshot(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(console(), terminal_size=size, run_before=jobs_view)


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_job_details_snapshot(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(console(), terminal_size=size, run_before=job_details)


def test_help_screen_snapshot(snap_compare: Any) -> None:
    async def open_help(pilot: Any) -> None:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.1)

    assert snap_compare(console(), terminal_size=(120, 40), run_before=open_help)
