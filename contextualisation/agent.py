#!/usr/bin/env python3
"""alienec2 job agent: runs on each VM, started by the cloud-init user data.

Python standard library only (stock VM images). It registers with the core using the launch
secret from its settings file, heartbeats in the background, and loops fetch -> run -> report.
A finished job's report is spooled to disk before it is sent and deleted only once the core has
answered, so a core restart or a network cut never loses it. On ``drain`` it finishes the
running job and exits; on ``stop`` it kills the job and exits.

With ``pilot_command`` in its settings (the AliEn variant) it runs that pilot instead of fetching
jobs from the core, and reports itself busy while the pilot works.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("alienec2.agent")

DEFAULTS: dict[str, Any] = {
    "heartbeat_s": 30.0,
    "imds_url": "http://169.254.169.254",
    "state_dir": "/var/lib/alienec2-agent",
    "fetch_wait_s": 20.0,
    "output_tail_bytes": 8192,
    "ca_file": None,
    "instance_id": None,
    "pilot_command": None,
    "pilot_pause_s": 60.0,
    "max_backoff_s": 60.0,
}
EXIT_WALL_TIME = 124
EXIT_KILLED = 137
EXIT_NOT_FOUND = 127


class Unreachable(Exception):
    """The core did not answer (down, restarting, network)."""


class Fatal(Exception):
    """Nothing this agent can do will help: log it and exit non-zero."""


def load_settings(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise Fatal(f"cannot read settings {path}: {exc}") from None
    missing = [key for key in ("core_url", "launch_id", "launch_secret") if not data.get(key)]
    if missing:
        raise Fatal(f"settings {path} lack {', '.join(missing)}")
    return {**DEFAULTS, **data}


class Core:
    """JSON over HTTP(S) to the core's agent API."""

    def __init__(self, url: str, ca_file: str | None) -> None:
        self.url = url.rstrip("/")
        self.token: str | None = None
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def call(
        self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body or {}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self._ssl) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except ValueError:
                payload = {}
            if exc.code >= 500:
                raise Unreachable(f"core answered {exc.code}") from None
            return exc.code, payload
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise Unreachable(str(getattr(exc, "reason", exc))) from None


def instance_id_from_imds(imds_url: str) -> str:
    """The instance id via IMDSv2 (session token first, as required on hardened images)."""
    base = imds_url.rstrip("/")
    for attempt in range(10):
        try:
            token_request = urllib.request.Request(
                f"{base}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
            )
            with urllib.request.urlopen(token_request, timeout=5) as reply:
                token = reply.read().decode()
            id_request = urllib.request.Request(
                f"{base}/latest/meta-data/instance-id",
                headers={"X-aws-ec2-metadata-token": token},
            )
            with urllib.request.urlopen(id_request, timeout=5) as reply:
                return reply.read().decode().strip()
        except (urllib.error.URLError, OSError) as exc:
            log.warning("event=imds_retry attempt=%d error=%s", attempt + 1, exc)
            time.sleep(min(2**attempt, 10))
    raise Fatal("instance metadata service did not answer")


class Agent:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.core = Core(settings["core_url"], settings["ca_file"])
        self.state_dir = Path(settings["state_dir"])
        self.spool = self.state_dir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.action = "run"
        self.busy = False
        self.stopping = threading.Event()  # set on "stop" or a signal: kill the job, exit
        self._child: subprocess.Popen[bytes] | None = None

    # ---- registration ------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(float(2**attempt), self.settings["max_backoff_s"])

    def register(self) -> None:
        token_file = self.state_dir / "token"
        if token_file.exists():
            self.core.token = token_file.read_text().strip()
            log.info("event=token_reused")
            return
        instance_id = (
            self.settings["instance_id"]
            or os.environ.get("ALIENEC2_INSTANCE_ID")
            or instance_id_from_imds(self.settings["imds_url"])
        )
        body = {
            "instance_id": instance_id,
            "launch_id": self.settings["launch_id"],
            "launch_secret": self.settings["launch_secret"],
        }
        attempt = 0
        while not self.stopping.is_set():
            try:
                status, reply = self.core.call("/agent/v1/register", body)
            except Unreachable as exc:
                status, reply = 0, {"error": str(exc)}
            if status == 200:
                self.core.token = reply["token"]
                token_file.touch(mode=0o600)
                token_file.write_text(reply["token"])
                self.settings["heartbeat_s"] = reply.get(
                    "heartbeat_s", self.settings["heartbeat_s"]
                )
                log.info("event=registered vm=%s", instance_id)
                return
            if status in (401, 403) or reply.get("code") == "already_registered":
                raise Fatal(f"registration refused ({status}): {reply.get('error')}")
            log.warning("event=register_retry status=%s error=%s", status, reply.get("error"))
            self.stopping.wait(self._backoff(attempt))
            attempt += 1

    # ---- heartbeat ---------------------------------------------------------------------

    def heartbeat_once(self) -> None:
        try:
            status, reply = self.core.call("/agent/v1/heartbeat", {"busy": self.busy}, timeout=10)
        except Unreachable as exc:
            log.warning("event=heartbeat_failed error=%s", exc)
            return
        if status == 401:
            self._set_action("stop")  # the core no longer knows this VM
        elif status == 200:
            self._set_action(reply["action"])

    def _set_action(self, action: str) -> None:
        if action != self.action:
            log.info("event=action action=%s", action)
        self.action = action
        if action == "stop":
            self.stopping.set()

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.settings["heartbeat_s"]):
            self.heartbeat_once()

    # ---- reports -----------------------------------------------------------------------

    def spool_report(self, job: dict[str, Any], exit_code: int, tail: str) -> Path:
        """Write the report durably before sending it: a crash or a dead core loses nothing."""
        path = self.spool / f"{job['id']:012d}-{job['attempt']}.json"
        body = {"attempt": job["attempt"], "status": "finished", "exit_code": exit_code}
        record = {"job_id": job["id"], "body": {**body, "output_tail": tail}}
        partial = path.with_suffix(".tmp")
        with open(partial, "w") as out:
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
        return path

    def flush_spool(self) -> None:
        """Send every spooled report, retrying with backoff until the core has answered."""
        for path in sorted(self.spool.glob("*.json")):
            record = json.loads(path.read_text())
            attempt = 0
            while True:
                try:
                    status, reply = self.core.call(
                        f"/agent/v1/jobs/{record['job_id']}/report", record["body"]
                    )
                except Unreachable as exc:
                    if self.stopping.is_set():
                        return  # the VM is going away; the core has requeued the job
                    log.warning("event=report_retry job=%s error=%s", record["job_id"], exc)
                    self.stopping.wait(self._backoff(attempt))
                    attempt += 1
                    continue
                if status != 200:
                    log.error("event=report_refused job=%s status=%s", record["job_id"], status)
                else:
                    log.info(
                        "event=report_sent job=%s accepted=%s",
                        record["job_id"],
                        reply.get("accepted"),
                    )
                path.unlink()
                break

    # ---- running -----------------------------------------------------------------------

    def execute(
        self, command: list[str], env: dict[str, str], wall_time_s: float | None, workdir: Path
    ) -> tuple[int, str]:
        """Run a command in its own session; returns its exit code and output tail."""
        workdir.mkdir(parents=True, exist_ok=True)
        tail: collections.deque[bytes] = collections.deque()
        limit = int(self.settings["output_tail_bytes"])
        try:
            child = subprocess.Popen(
                command,
                cwd=workdir,
                env={**os.environ, **self.settings.get("env", {}), **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return EXIT_NOT_FOUND, f"cannot start {command[0]!r}: {exc.strerror or exc}"
        self._child = child

        def read() -> None:
            size = 0
            assert child.stdout is not None
            for chunk in iter(lambda: child.stdout.read1(4096), b""):  # type: ignore[union-attr]
                tail.append(chunk)
                size += len(chunk)
                while size - len(tail[0]) >= limit:
                    size -= len(tail.popleft())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + wall_time_s if wall_time_s else None
        note = ""
        while child.poll() is None:
            if self.stopping.is_set():
                note = "\n[alienec2-agent: killed, the VM is stopping]"
                self._kill(child)
            elif deadline is not None and time.monotonic() > deadline:
                note = f"\n[alienec2-agent: killed after wall time {wall_time_s:g}s]"
                self._kill(child)
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=0.2)
        reader.join(timeout=5)
        self._child = None
        code = child.returncode
        if note:
            code = EXIT_WALL_TIME if "wall time" in note else EXIT_KILLED
        elif code < 0:
            code = 128 - code  # killed by a signal, as a shell reports it
        text = b"".join(tail)[-limit:].decode(errors="replace") + note
        return code, text

    @staticmethod
    def _kill(child: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    def run_job(self, job: dict[str, Any]) -> None:
        log.info("event=job_started job=%s attempt=%s", job["id"], job["attempt"])
        with contextlib.suppress(Unreachable):  # only the finish report matters; it is spooled
            self.core.call(
                f"/agent/v1/jobs/{job['id']}/report",
                {"attempt": job["attempt"], "status": "started"},
                timeout=10,
            )
        workdir = self.state_dir / "jobs" / f"{job['id']}-{job['attempt']}"
        code, tail = self.execute(
            job["command"], job.get("env") or {}, job.get("wall_time_s"), workdir
        )
        self.spool_report(job, code, tail)
        log.info("event=job_finished job=%s exit_code=%s", job["id"], code)

    def fetch_loop(self) -> None:
        attempt = 0
        while True:
            self.flush_spool()
            if self.stopping.is_set() or self.action in ("stop", "drain"):
                return
            wait = self.settings["fetch_wait_s"]
            try:
                status, reply = self.core.call(
                    f"/agent/v1/jobs/next?wait={wait:g}", timeout=wait + 15
                )
            except Unreachable as exc:
                log.warning("event=fetch_failed error=%s", exc)
                self.stopping.wait(self._backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            if status == 401:
                self._set_action("stop")
                continue
            if status != 200:
                log.error("event=fetch_refused status=%s error=%s", status, reply.get("error"))
                self.stopping.wait(self._backoff(3))
                continue
            self._set_action(reply["action"])
            if reply.get("job"):
                self.busy = True
                try:
                    self.run_job(reply["job"])
                finally:
                    self.busy = False

    def pilot_loop(self) -> None:
        """Run the site's pilot (e.g. the AliEn JobAgent) again and again until drained."""
        command = self.settings["pilot_command"]
        runs = 0
        while not self.stopping.is_set() and self.action == "run":
            self.busy = True
            self.heartbeat_once()
            runs += 1
            code, tail = self.execute(command, {}, None, self.state_dir / "pilot" / str(runs))
            self.busy = False
            log.info("event=pilot_exited code=%s tail=%s", code, json.dumps(tail[-200:]))
            self.heartbeat_once()
            self.stopping.wait(self.settings["pilot_pause_s"])

    def run(self) -> int:
        self.register()
        if self.stopping.is_set():
            return 0
        self.heartbeat_once()
        threading.Thread(target=self.heartbeat_loop, daemon=True).start()
        if self.settings["pilot_command"]:
            self.pilot_loop()
        else:
            self.fetch_loop()
        log.info("event=agent_exit action=%s", self.action)
        self.stopping.set()
        return 0

    def terminate(self, signum: int, frame: object) -> None:
        log.info("event=signal signum=%d", signum)
        self.stopping.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="alienec2 job agent")
    parser.add_argument("--settings", default="/etc/alienec2/agent.json")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        agent = Agent(load_settings(args.settings))
        signal.signal(signal.SIGTERM, agent.terminate)
        return agent.run()
    except Fatal as exc:
        log.error("event=agent_fatal error=%s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
