"""A scripted stand-in for the core's agent API, for the protocol fields the real core does not
serve yet (register ``slots``, heartbeat ``cancel``, ``/runs``, ``/interruption``) and for
answers the real core never gives on cue (a 503, a 429). Everything else is tested against the
real core. It records every request; tests wait on its condition, with a deadline."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from core.clouds.sandbox import agent_command


class StandInCore:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (path with query, body)
        self.jobs: list[dict[str, Any]] = []  # handed out FIFO by jobs/next
        self.slots: int | None = None  # None: the register reply has no ``slots`` (old core)
        self.action = "run"
        self.cancel: set[int] = set()
        self.cancelled_at_start: set[int] = set()
        self.report_answers: list[int] = []  # statuses for finish reports, then 200
        self.interruption_action = "drain"
        self.cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "stand-in core: condition not met"

    def bodies(self, prefix: str) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path.startswith(prefix)]

    def reports(self, status: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies("/agent/v1/jobs/") if b.get("status") == status]

    def add_job(self, job_id: int, command: list[str], **fields: Any) -> None:
        with self.cond:
            self.jobs.append({"id": job_id, "attempt": 1, "command": command, **fields})
            self.cond.notify_all()

    def set(self, **fields: Any) -> None:
        with self.cond:
            for name, value in fields.items():
                setattr(self, name, value)
            self.cond.notify_all()

    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        route = urlsplit(path).path
        if route == "/agent/v1/register":
            reply: dict[str, Any] = {
                "vm_id": body["instance_id"],
                "token": "t0k3n",
                "heartbeat_s": 0.2,
            }
            if self.slots is not None:
                reply["slots"] = self.slots
            return 200, reply
        if route == "/agent/v1/heartbeat":
            return 200, {"action": self.action, "state": "idle", "cancel": sorted(self.cancel)}
        if route == "/agent/v1/jobs/next":
            wait = float(parse_qs(urlsplit(path).query).get("wait", ["0"])[0])
            self.cond.wait_for(lambda: self.jobs or self.action != "run", timeout=min(wait, 1.0))
            job = self.jobs.pop(0) if self.jobs and self.action == "run" else None
            return 200, {"action": self.action, "job": job}
        report = re.fullmatch(r"/agent/v1/jobs/(\d+)/report", route)
        if report:
            if body.get("status") == "started":
                if int(report.group(1)) in self.cancelled_at_start:
                    return 200, {"accepted": False, "state": "cancelled"}
                return 200, {"accepted": True, "state": "running"}
            status = self.report_answers.pop(0) if self.report_answers else 200
            return status, {"accepted": status == 200, "error": f"answered {status}"}
        if route == "/agent/v1/runs":
            return 200, {"accepted": True}
        if route == "/agent/v1/interruption":
            return 200, {"action": self.interruption_action}
        return 404, {"error": "no such route"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        core = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with core.cond:
                    core.requests.append((self.path, body))
                    status, reply = core._answer(self.path, body)
                    core.cond.notify_all()
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


class StandInAgent:
    """The real agent script as a process, talking to a stand-in core."""

    def __init__(self, core_url: str, workdir: Path, **settings: Any) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "state"
        self.settings_path = workdir / "agent.json"
        self.settings_path.write_text(
            json.dumps(
                {
                    "core_url": core_url,
                    "launch_id": "launch-1",
                    "launch_secret": "s3cret",
                    "instance_id": "i-standin",
                    "state_dir": str(self.state_dir),
                    "job_user": "",
                    "spot_poll_s": 0,
                    "max_backoff_s": 0.2,
                    "fetch_wait_s": 1,
                    "kill_grace_s": 1,
                    **settings,
                }
            )
        )
        self.log_path = workdir / "agent.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            agent_command(self.settings_path), stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
