"""Snapshots of the console at 120x40. A snapshot must be byte-identical from run to run, so
the console is fed fixed data by a stand-in for the admin client (the HTTP edge); every
behaviour is tested against a real core in test_console.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from alienec2_tui.app import ConsoleApp
from alienec2_tui.client import AdminClient

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

    async def vms(self, state: str | None = None) -> dict[str, Any]:
        return {"now": NOW, "vms": [vm(n + 1, s) for n, s in enumerate(STATES)]}

    async def jobs(self, state: str | None = None, limit: int = 200) -> dict[str, Any]:
        jobs = []
        for n in range(12):
            done = n > 3
            jobs.append(
                {
                    "id": 330 - n,
                    "command": ["sh", "-c", f"run-analysis --chunk {n}"],
                    "state": "done" if done else "running",
                    "attempt": 1,
                    "max_attempts": 3,
                    "env": {},
                    "wall_time_s": None,
                    "vm_id": f"i-0{n % 3 + 2:016x}",
                    "submitted_at": NOW - 300 - n * 20,
                    "assigned_at": NOW - 290 - n * 20,
                    "started_at": NOW - 290 - n * 20,
                    "finished_at": NOW - 100 if done else None,
                    "exit_code": 0 if done else None,
                    "output_tail": None,
                    "reason": None,
                    "wait_s": 10.0 + n,
                }
            )
        return {"now": NOW, "jobs": jobs}

    async def events(self, after: int = 0, wait: float = 0, limit: int = 1000) -> dict[str, Any]:
        if self._events_sent:
            await asyncio.sleep(wait)
            return {"events": [], "last_seq": after}
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
        return {"events": events, "last_seq": events[-1]["seq"]}


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


async def settle(pilot: Any) -> None:
    app = pilot.app
    for _ in range(200):
        if app.query_one("VMTable").row_count == len(STATES) and app.last_seq:
            break
        await pilot.pause(0.02)
    await pilot.pause(0.1)


def test_main_screen_snapshot(snap_compare: Any) -> None:
    assert snap_compare(
        ConsoleApp(FixedCore(), refresh_s=60), terminal_size=(120, 40), run_before=settle
    )


def test_help_screen_snapshot(snap_compare: Any) -> None:
    async def open_help(pilot: Any) -> None:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.1)

    assert snap_compare(
        ConsoleApp(FixedCore(), refresh_s=60), terminal_size=(120, 40), run_before=open_help
    )
