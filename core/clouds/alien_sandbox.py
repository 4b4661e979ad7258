"""A sandbox AliEn: a stand-in central task queue, and the argv of its clients.

    python -m core.clouds.alien_sandbox [--port N]     the central task queue on loopback

Its clients are in ``alien_clients.py`` (standard library only, quick to start, as they run
every cycle and every pilot run): the stand-in JobAgent asks the central queue for one job, runs
it, reports it done and exits 0, having printed ``JobAgent: running job <id>`` (the agent's
default ``alien.job_id_regex`` finds the id); with nothing to do it exits at once with
``NO_JOB_EXIT`` (list it in ``alien.no_job_exit_codes``), as the real JobAgent does after its
idle TTL. The demand query keeps the ``command`` contract: one integer on stdout and exit 0, or
a message on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class AlienJob:
    id: int
    command: list[str]
    state: str = "waiting"  # waiting -> running -> done | failed
    taken: int = 0  # how many times a JobAgent was given it: exactly once, or a bug
    exit_code: int | None = None
    agent: str | None = None
    submitted_at: float = 0.0
    taken_at: float | None = None
    finished_at: float | None = None
    output: str = field(default="", repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "command": self.command,
            "state": self.state,
            "taken": self.taken,
            "exit_code": self.exit_code,
            "agent": self.agent,
            "submitted_at": self.submitted_at,
            "taken_at": self.taken_at,
            "finished_at": self.finished_at,
        }


class CentralQueue:
    """AliEn's central task queue, as far as a JobAgent sees it: FIFO, each job given once.

    Its times come from ``clock`` (the demo passes the core's, so they compare with events)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self._jobs: dict[int, AlienJob] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> CentralQueue:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> CentralQueue:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the queue itself (also called in-process by the sandbox and tests) ----------------

    def add(self, command: list[str]) -> int:
        with self._lock:
            job = AlienJob(len(self._jobs) + 1, list(command), submitted_at=self.clock())
            self._jobs[job.id] = job
            return job.id

    def take(self, agent: str) -> AlienJob | None:
        with self._lock:
            for job in self._jobs.values():
                if job.state == "waiting":
                    job.state, job.agent = "running", agent
                    job.taken += 1
                    job.taken_at = self.clock()
                    return job
        return None

    def done(self, job_id: int, exit_code: int) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state != "running":
                return False
            job.state = "done" if exit_code == 0 else "failed"
            job.exit_code = exit_code
            job.finished_at = self.clock()
            return True

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = {"waiting": 0, "running": 0, "done": 0, "failed": 0}
            for job in self._jobs.values():
                counts[job.state] += 1
            return counts

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [job.public() for job in self._jobs.values()]

    def emptied_at(self) -> float | None:
        """When the last job finished, once none waits or runs; None before that."""
        with self._lock:
            jobs = list(self._jobs.values())
            if not jobs or any(job.finished_at is None for job in jobs):
                return None
            return max(job.finished_at for job in jobs if job.finished_at is not None)

    # ---- HTTP --------------------------------------------------------------------------------

    def _route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if method == "GET" and path == "/counts":
            return 200, self.counts()
        if method == "GET" and path == "/jobs":
            return 200, self.jobs()
        if method == "POST" and path == "/jobs":
            command = body.get("command")
            if not (
                isinstance(command, list) and command and all(isinstance(a, str) for a in command)
            ):
                return 400, {"error": "command: a non-empty list of strings"}
            return 200, {"id": self.add(command)}
        if method == "POST" and path == "/jobs/take":
            job = self.take(str(body.get("agent") or "?"))
            return 200, {"job": {"id": job.id, "command": job.command} if job else None}
        done = re.fullmatch(r"/jobs/(\d+)/done", path)
        if method == "POST" and done:
            code = body.get("exit_code")
            if not isinstance(code, int):
                return 400, {"error": "exit_code: an integer"}
            return 200, {"accepted": self.done(int(done.group(1)), code)}
        return 404, {"error": f"no route {method} {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                    if not isinstance(body, dict):
                        raise ValueError("not an object")
                except ValueError:
                    status, reply = 400, {"error": "body: a JSON object"}
                else:
                    status, reply = queue._route(method, self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


# ---- the clients: what the agent's pilot_command and the demand source run ------------------


def script_path() -> Path:
    """The clients' script (a separate, quick-to-start file: it runs every cycle and run)."""
    return Path(__file__).resolve().with_name("alien_clients.py")


def jobagent_command(queue_url: str, python: str = sys.executable) -> list[str]:
    """The stand-in JobAgent as an agent ``pilot_command``."""
    return [python, "-S", str(script_path()), "jobagent", "--queue", queue_url]


def demand_command(queue_url: str, python: str = sys.executable) -> list[str]:
    """The waiting-jobs query as a ``queue.kind: command`` argv."""
    return [python, "-S", str(script_path()), "demand", "--queue", queue_url]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the sandbox AliEn's central task queue")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    queue = CentralQueue(args.host, args.port)
    print(queue.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        queue._server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
