#!/usr/bin/env python3
"""alienec2 job agent: runs on each VM, started by the cloud-init user data.

Python standard library only (stock VM images). It registers with the core using the launch
secret from its settings file, heartbeats in the background, and runs one fetch -> run -> report
loop per slot. Jobs run as ``job_user`` in their own session, with a clean environment: they
cannot read the VM token or the settings (root only) and so cannot act as their VM. A finished
job's report is spooled to disk before it is sent and kept until the core accepted it or
refused it for good, so a core restart, a 503 or a network cut never loses it. On ``drain`` it
finishes the running jobs and exits; on ``stop`` it kills them and exits; a heartbeat's
``cancel`` list kills those jobs' process groups.

With ``pilot_command`` in its settings (the AliEn variant) each slot runs that pilot again and
again instead of fetching jobs; a run shorter than ``idle_run_s`` (or ending with a "no job" exit
code) leaves the VM idle, and every run is reported to the core as a record.

With ``spot_poll_s`` > 0 it watches the instance metadata for a Spot termination notice (stop
taking jobs, tell the core, kill the jobs) or a rebalance recommendation (stop taking jobs).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
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
    "pilot_pause_s": 10.0,
    "max_backoff_s": 60.0,
    "job_user": "alienec2-job",
    "jobs_dir": None,
    "slots": 1,
    "idle_run_s": 150.0,
    "no_job_exit_codes": [],
    "alien_job_id_regex": None,
    "spot_poll_s": 5.0,
    "kill_grace_s": 5.0,
    "env": {},
}
# "Job 123", "job id: 123", "jobId=123", "JobID #123" as JobAgent logs name the job they ran.
DEFAULT_JOB_ID_REGEX = r"(?i)\bjob(?:\s*id)?[ =:#]+(\d+)"
SANE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A report refused with one of these will never be accepted: drop it. Anything else is retried.
FINAL_REFUSALS = frozenset({400, 401, 403, 404, 409, 410, 413, 422})
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
    if Path(path).stat().st_mode & 0o077:
        # It holds the launch secret: jobs must not read it, whatever wrote it.
        os.chmod(path, 0o600)
    return {**DEFAULTS, **data}


# A connection idle longer than this is closed rather than reused: the core keeps an idle
# connection open for ``web.keep_alive_s`` (75 s by default), and reusing one it is about to
# close races its close. Well above the 30 s heartbeat, so a heartbeat loop keeps its one.
REUSE_IDLE_S = 60.0
# The peer closed a kept-alive connection before it read the request: safe to send again once.
STALE_CONNECTION = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


@dataclasses.dataclass
class _Connection:
    http: http.client.HTTPConnection
    idle_since: float | None = None  # monotonic end of its last exchange; None: never used


class Core:
    """JSON over HTTP(S) to the core's agent API, one persistent connection per thread.

    Each loop (the heartbeat, each slot's fetch loop) is a thread and keeps its connection
    open between requests, so the core accepts and closes one connection per loop, not one
    per request. Proxies come from the environment (``https_proxy``, ``no_proxy``...) as
    urllib takes them."""

    def __init__(self, url: str, ca_file: str | None) -> None:
        self.url = url.rstrip("/")
        self.token: str | None = None
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        parts = urllib.parse.urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._netloc = parts.netloc
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._base_path = parts.path
        self._local = threading.local()

    def _proxy(self) -> tuple[str, int, dict[str, str]] | None:
        """(host, port, headers) of the proxy urllib would use for the core, or None."""
        proxy = urllib.request.getproxies().get("https" if self._https else "http")
        if not proxy or urllib.request.proxy_bypass(self._netloc):
            return None
        if "://" not in proxy:
            proxy = "http://" + proxy
        parts = urllib.parse.urlsplit(proxy)
        headers = {}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Proxy-Authorization"] = f"Basic {credentials}"
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)  # as urllib
        except ValueError:  # a port that is no number: say so, not the URL (it may hold a password)
            raise Unreachable("the proxy setting in the environment has an invalid port") from None
        return parts.hostname or "", port, headers

    def _connect(self, timeout: float) -> tuple[_Connection, str, dict[str, str]]:
        """This thread's connection (reused if fresh enough), the request target and any
        headers a plain HTTP proxy needs."""
        current: _Connection | None = getattr(self._local, "connection", None)
        if current is not None and (
            current.idle_since is None or time.monotonic() - current.idle_since < REUSE_IDLE_S
        ):
            return current, *self._target()
        if current is not None:
            current.http.close()
        proxy = self._proxy()
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(
                *(proxy[:2] if proxy else (self._host, self._port)),
                timeout=timeout,
                context=self._ssl,
            )
            if proxy:
                connection.set_tunnel(self._host, self._port, headers=proxy[2])
        else:
            connection = http.client.HTTPConnection(
                *(proxy[:2] if proxy else (self._host, self._port)), timeout=timeout
            )
        self._local.connection = _Connection(connection)
        self._local.proxied = bool(proxy and not self._https)
        self._local.proxy_headers = proxy[2] if proxy and not self._https else {}
        return self._local.connection, *self._target()

    def _target(self) -> tuple[str, dict[str, str]]:
        if getattr(self._local, "proxied", False):
            return self.url, self._local.proxy_headers  # absolute form, to a plain proxy
        return self._base_path, {}

    def _forget(self) -> None:
        current: _Connection | None = getattr(self._local, "connection", None)
        if current is not None:
            current.http.close()
            self._local.connection = None

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        self._forget()

    def call(
        self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body or {}).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for _ in range(2):
            connection, prefix, extra = self._connect(timeout)
            reused = connection.idle_since is not None
            try:
                if connection.http.sock is not None:
                    connection.http.sock.settimeout(timeout)
                connection.http.timeout = timeout
                connection.http.request(
                    "POST", prefix + path, body=data, headers={**headers, **extra}
                )
                reply = connection.http.getresponse()
                raw = reply.read()
            except STALE_CONNECTION as exc:
                self._forget()
                if reused:
                    continue  # closed by the core while idle: once more on a new connection
                raise Unreachable(str(exc) or type(exc).__name__) from None
            except (OSError, http.client.HTTPException) as exc:
                self._forget()
                raise Unreachable(str(exc) or type(exc).__name__) from None
            if reply.will_close:
                self._forget()
            else:
                connection.idle_since = time.monotonic()
            return self._answer(reply.status, raw)
        raise Unreachable("the core closed the connection twice")

    @staticmethod
    def _answer(status: int, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            payload = None
        if status >= 500:
            raise Unreachable(f"core answered {status}")
        if not isinstance(payload, dict):
            if status == 200:
                raise Unreachable("core answered 200 with a body that is not a JSON object")
            payload = {}
        return status, payload


class IMDS:
    """The EC2 instance metadata service, IMDSv2 (a session token first, as hardened images
    require). Network errors propagate as OSError; HTTP errors are answered as their status."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.base = url.rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _fetch_token(self) -> str:
        request = urllib.request.Request(
            f"{self.base}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:
            return reply.read().decode()

    def get(self, path: str) -> tuple[int, str]:
        for _ in range(2):
            if self._token is None:
                self._token = self._fetch_token()
            request = urllib.request.Request(
                self.base + path, headers={"X-aws-ec2-metadata-token": self._token}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return reply.status, reply.read().decode(errors="replace")
            except urllib.error.HTTPError as exc:
                if exc.code != 401:
                    return exc.code, ""
                self._token = None  # expired session token: take a new one once
        return 401, ""


def instance_id_from_imds(imds_url: str) -> str:
    """The instance id, retried while the metadata service comes up."""
    imds = IMDS(imds_url, timeout=5)
    for attempt in range(10):
        try:
            status, text = imds.get("/latest/meta-data/instance-id")
            if status == 200:
                return text.strip()
            log.warning("event=imds_retry attempt=%d status=%s", attempt + 1, status)
        except OSError as exc:
            log.warning("event=imds_retry attempt=%d error=%s", attempt + 1, exc)
        time.sleep(min(2**attempt, 10))
    raise Fatal("instance metadata service did not answer")


def parse_alien_job_id(text: str, pattern: str | None) -> str | None:
    """The last job id a pilot's output names (its first group, or the whole match)."""
    matches = list(re.finditer(pattern or DEFAULT_JOB_ID_REGEX, text))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.re.groups else last.group(0)


def run_is_idle(duration_s: float, exit_code: int | None, settings: dict[str, Any]) -> bool:
    """A pilot run that found nothing to do: short, or ended with a site's "no job" code."""
    return duration_s < float(settings["idle_run_s"]) or exit_code in set(
        settings["no_job_exit_codes"] or []
    )


class JobUserError(Exception):
    """Jobs cannot be run as the configured user on this machine."""


def job_identity(job_user: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Popen arguments that run a job as ``job_user``, and the base environment for it.

    "" means run as the agent's own user (tests, sandboxes): no switch, still a clean env."""
    if not job_user:
        home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
        return {}, {"PATH": SANE_PATH, "HOME": home}
    try:
        entry = pwd.getpwnam(job_user)
    except KeyError:
        raise JobUserError(
            f"job user {job_user!r} does not exist (contextualisation.job_user)"
        ) from None
    env = {"PATH": SANE_PATH, "HOME": entry.pw_dir, "USER": job_user, "LOGNAME": job_user}
    if os.geteuid() == entry.pw_uid:
        return {}, env
    if os.geteuid() != 0:
        raise JobUserError(f"cannot run jobs as {job_user!r}: the agent is not root")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}, env


@dataclasses.dataclass
class Outcome:
    exit_code: int | None  # None: cancelled before it started
    tail: str
    cancelled: bool = False


class Slot:
    """One fetch -> run -> report loop: what heartbeats list as running and what a cancel hits."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.job_id: int | None = None
        self.run_started: float | None = None  # monotonic start of the current pilot run
        self.named_job = False  # the current pilot run's output has named an AliEn job
        self.cancel = threading.Event()
        # Held while the job changes and while a cancel is matched to it: a cancel for the
        # job that just ended must not hit the one that starts next in this slot.
        self.lock = threading.Lock()
        self.runs = 0


class Agent:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.core = Core(settings["core_url"], settings["ca_file"])
        self.state_dir = Path(settings["state_dir"])
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir.chmod(0o700)  # the token lives here: root only, whatever made the dir
        self.spool = self.state_dir / "spool"
        self.spool.mkdir(exist_ok=True, mode=0o700)
        # A job user's work dirs lie outside the state dir, which it must never enter; without
        # a job user (sandboxes) they stay where they always were, under the state dir.
        default_jobs = (
            self.state_dir.parent / "alienec2-jobs"
            if settings["job_user"]
            else self.state_dir / "jobs"
        )
        self.jobs_dir = Path(settings["jobs_dir"] or default_jobs)
        self.action = "run"
        self.stopping = threading.Event()  # set on "stop", a signal or a Spot notice
        self.no_new_jobs = threading.Event()  # set on a Spot notice: take no new job
        self.wake = threading.Event()  # heartbeat now, not at the next period
        self.slots: list[Slot] = []
        self._spool_lock = threading.Lock()
        self._old_core = False

    def _stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    # ---- registration ------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(float(2**attempt), self.settings["max_backoff_s"])

    def _write_private(self, name: str, text: str) -> None:
        """A file only root can read, replaced atomically."""
        partial = self.state_dir / f".{name}.tmp"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(self.state_dir / name)

    def _apply_registration(self, reply: dict[str, Any]) -> None:
        self.settings["heartbeat_s"] = reply.get("heartbeat_s") or self.settings["heartbeat_s"]
        with contextlib.suppress(TypeError, ValueError):
            self.settings["slots"] = max(1, int(reply.get("slots") or self.settings["slots"]))

    def register(self) -> None:
        token_file = self.state_dir / "token"
        if token_file.exists():
            token_file.chmod(0o600)
            self.core.token = token_file.read_text().strip()
            with contextlib.suppress(OSError, ValueError):
                self._apply_registration(json.loads((self.state_dir / "registration").read_text()))
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
                self._write_private("token", reply["token"])
                self._write_private("registration", json.dumps({**reply, "token": None}))
                self._apply_registration(reply)
                log.info("event=registered vm=%s slots=%s", instance_id, self.settings["slots"])
                return
            if status in (401, 403) or reply.get("code") == "already_registered":
                raise Fatal(f"registration refused ({status}): {reply.get('error')}")
            log.warning("event=register_retry status=%s error=%s", status, reply.get("error"))
            self.stopping.wait(self._backoff(attempt))
            attempt += 1

    # ---- heartbeat ---------------------------------------------------------------------

    def pilot_mode(self) -> bool:
        return bool(self.settings["pilot_command"])

    def is_busy(self) -> bool:
        """Busy: a job runs, or (pilot mode) a pilot run has named the job it took or has
        outlasted ``idle_run_s``: a VM reaped as idle then would kill a grid job."""
        if not self.pilot_mode():
            return any(slot.job_id is not None for slot in self.slots)
        now, idle_run_s = time.monotonic(), float(self.settings["idle_run_s"])
        return any(
            slot.run_started is not None and (slot.named_job or now - slot.run_started > idle_run_s)
            for slot in self.slots
        )

    def running_jobs(self) -> list[int]:
        return [slot.job_id for slot in self.slots if slot.job_id is not None]

    def heartbeat_once(self) -> None:
        body: dict[str, Any] = {"busy": self.is_busy()}
        if not self._old_core:
            body["running"] = self.running_jobs()
        try:
            status, reply = self.core.call("/agent/v1/heartbeat", body, timeout=10)
            if status == 422 and not self._old_core:
                self._old_core = True  # a core from before ``running``: send what it knows
                log.warning("event=heartbeat_downgraded")
                status, reply = self.core.call("/agent/v1/heartbeat", {"busy": body["busy"]})
        except Unreachable as exc:
            log.warning("event=heartbeat_failed error=%s", exc)
            return
        if status not in (200, 401):
            log.warning("event=heartbeat_refused status=%s error=%s", status, reply.get("error"))
        if status == 401:
            self._set_action("stop")  # the core no longer knows this VM
        elif status == 200:
            self._set_action(reply.get("action", self.action))
            self.cancel_jobs(reply.get("cancel") or [])

    def cancel_jobs(self, job_ids: list[Any]) -> None:
        for slot in self.slots:
            with slot.lock:
                if slot.job_id is None or slot.job_id not in job_ids or slot.cancel.is_set():
                    continue
                log.info("event=job_cancel job=%s", slot.job_id)
                slot.cancel.set()

    def _set_action(self, action: str) -> None:
        if action != self.action:
            log.info("event=action action=%s", action)
        self.action = action
        if action == "stop":
            self._stop()

    def heartbeat_loop(self) -> None:
        while True:
            self.wake.wait(self.settings["heartbeat_s"])
            self.wake.clear()
            if self.stopping.is_set():
                return
            self.heartbeat_once()

    # ---- reports -----------------------------------------------------------------------

    def _spool(self, name: str, path: str, body: dict[str, Any]) -> Path:
        """Write a report durably before sending it: a crash or a dead core loses nothing."""
        target = self.spool / f"{name}.json"
        partial = target.with_suffix(".tmp")
        with open(partial, "w") as out:
            json.dump({"path": path, "body": body}, out)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(target)
        return target

    def spool_report(
        self, job: dict[str, Any], status: str, exit_code: int | None, tail: str
    ) -> Path:
        body = {
            "attempt": job["attempt"],
            "status": status,
            "exit_code": exit_code,
            "output_tail": tail,
        }
        name = f"{job['id']:012d}-{job['attempt']}"
        return self._spool(name, f"/agent/v1/jobs/{job['id']}/report", body)

    def flush_spool(self) -> None:
        """Send every spooled report; keep each until the core accepted it or refused it for
        good (a final 4xx). 5xx, 429 and timeouts are retried with backoff."""
        with self._spool_lock:
            for file in sorted(self.spool.glob("*.json")):
                try:
                    record = json.loads(file.read_text())
                except (OSError, ValueError) as exc:
                    log.error("event=report_unreadable file=%s error=%s", file.name, exc)
                    file.replace(file.with_suffix(".bad"))  # kept for a human, never resent
                    continue
                path = record.get("path") or f"/agent/v1/jobs/{record['job_id']}/report"
                attempt = 0
                while True:
                    try:
                        status, reply = self.core.call(path, record["body"])
                    except Unreachable as exc:
                        status, reply = 0, {"error": str(exc)}
                    if status == 200:
                        log.info(
                            "event=report_sent path=%s accepted=%s", path, reply.get("accepted")
                        )
                        break
                    if status in FINAL_REFUSALS:
                        log.error(
                            "event=report_refused path=%s status=%s error=%s",
                            path,
                            status,
                            reply.get("error"),
                        )
                        break
                    if self.stopping.is_set():
                        return  # the VM is going away; the report stays on disk
                    log.warning(
                        "event=report_retry path=%s status=%s error=%s",
                        path,
                        status,
                        reply.get("error"),
                    )
                    self.stopping.wait(self._backoff(attempt))
                    attempt += 1
                file.unlink()

    # ---- running -----------------------------------------------------------------------

    def _workdir(self, name: str, identity: dict[str, Any]) -> Path:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.chmod(0o711)  # job users reach their own dir, and list none
        workdir = self.jobs_dir / name
        workdir.mkdir(exist_ok=True, mode=0o700)
        if identity:
            os.chown(workdir, identity["user"], identity["group"])
        return workdir

    def execute(
        self,
        command: list[str],
        env: dict[str, str],
        wall_time_s: float | None,
        workdir_name: str,
        slot: Slot | None = None,
    ) -> Outcome:
        """Run a command as the job user, in its own session, with a clean environment."""
        try:
            identity, base_env = job_identity(self.settings["job_user"])
            workdir = self._workdir(workdir_name, identity)
        except (JobUserError, OSError) as exc:
            log.error("event=job_user_error error=%s", exc)
            return Outcome(EXIT_NOT_FOUND, f"[alienec2-agent: {exc}]")
        tail: collections.deque[bytes] = collections.deque()
        limit = int(self.settings["output_tail_bytes"])
        try:
            child = subprocess.Popen(
                command,
                cwd=workdir,
                env={**base_env, **(self.settings["env"] or {}), **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
                **identity,
            )
        except OSError as exc:
            return Outcome(EXIT_NOT_FOUND, f"cannot start {command[0]!r}: {exc.strerror or exc}")

        received = [0]  # bytes read so far: the run loop looks for a job id when it grows

        def read() -> None:
            size = 0
            assert child.stdout is not None
            for chunk in iter(lambda: child.stdout.read1(4096), b""):  # type: ignore[union-attr]
                tail.append(chunk)
                size += len(chunk)
                received[0] += len(chunk)
                while size - len(tail[0]) >= limit:
                    size -= len(tail.popleft())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started = time.monotonic()
        deadline = started + wall_time_s if wall_time_s else None
        long_at = started + float(self.settings["idle_run_s"]) if self.pilot_mode() else None
        watch_job_id = self.pilot_mode() and slot is not None
        seen = 0
        grace = float(self.settings["kill_grace_s"])
        note, ending = "", ""
        while child.poll() is None:
            if self.stopping.is_set():
                note, ending = "\n[alienec2-agent: killed, the VM is stopping]", "stop"
                self._kill(child, grace)
            elif slot is not None and slot.cancel.is_set():
                note, ending = "\n[alienec2-agent: cancelled]", "cancel"
                self._kill(child, grace)
            elif deadline is not None and time.monotonic() > deadline:
                note = f"\n[alienec2-agent: killed after wall time {wall_time_s:g}s]"
                ending = "wall"
                self._kill(child, grace)
            else:
                if long_at is not None and time.monotonic() > long_at:
                    long_at = None
                    self.wake.set()  # a long pilot run: the VM is busy from now on
                if watch_job_id and slot is not None and received[0] != seen:
                    seen = received[0]
                    output = b"".join(tail).decode(errors="replace")
                    if parse_alien_job_id(output, self.settings["alien_job_id_regex"]):
                        watch_job_id, slot.named_job = False, True
                        self.wake.set()  # the JobAgent took a grid job: busy, tell the core now
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # what the job left behind dies with it
        reader.join(timeout=5)
        code = child.returncode
        if code < 0:
            code = 128 - code  # killed by a signal, as a shell reports it
        if ending == "stop":
            code = EXIT_KILLED
        elif ending == "wall":
            code = EXIT_WALL_TIME
        text = b"".join(tail)[-limit:].decode(errors="replace") + note
        return Outcome(code, text, cancelled=ending == "cancel")

    @staticmethod
    def _kill(child: subprocess.Popen[bytes], grace: float) -> None:
        """SIGTERM to the job's whole process group, SIGKILL after the grace."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    def run_job(self, job: dict[str, Any], slot: Slot) -> None:
        if self.stopping.is_set():
            return  # the core requeues what a stopping VM held
        log.info(
            "event=job_started job=%s attempt=%s slot=%d", job["id"], job["attempt"], slot.index
        )
        with slot.lock:
            slot.cancel.clear()
            slot.job_id = job["id"]
        try:
            if job.get("state") == "cancelled":
                # Handed back after a cancel (this agent restarted while it ran): never again,
                # even if the started report below were lost.
                slot.cancel.set()
            else:
                with contextlib.suppress(Unreachable):  # only the last report matters: spooled
                    status, reply = self.core.call(
                        f"/agent/v1/jobs/{job['id']}/report",
                        {"attempt": job["attempt"], "status": "started"},
                        timeout=10,
                    )
                    if status == 200 and reply.get("state") == "cancelled":
                        slot.cancel.set()
            if slot.cancel.is_set():
                outcome = Outcome(None, "[alienec2-agent: cancelled before it started]", True)
            else:
                outcome = self.execute(
                    job["command"],
                    job.get("env") or {},
                    job.get("wall_time_s"),
                    f"{job['id']}-{job['attempt']}",
                    slot,
                )
            status_word = "cancelled" if outcome.cancelled else "finished"
            self.spool_report(job, status_word, outcome.exit_code, outcome.tail)
            log.info("event=job_%s job=%s exit_code=%s", status_word, job["id"], outcome.exit_code)
        finally:
            with slot.lock:
                slot.job_id = None
                slot.cancel.clear()

    def _may_take_work(self) -> bool:
        """False once the loop must end; waits while a Spot notice holds new work back."""
        while not self.stopping.is_set() and self.action == "run":
            if not self.no_new_jobs.is_set():
                return True
            self.stopping.wait(min(float(self.settings["heartbeat_s"]), 5.0))
        return False

    def fetch_loop(self, slot: Slot) -> None:
        attempt = 0
        handed_back: set[tuple[int, int]] = set()
        while True:
            self.flush_spool()
            if not self._may_take_work():
                job = self._held_job(slot)
                if job is None or (job["id"], job["attempt"]) in handed_back:
                    return
                handed_back.add((job["id"], job["attempt"]))  # run once, even if refused
                self.run_job(job, slot)
                continue
            wait = self.settings["fetch_wait_s"]
            try:
                status, reply = self.core.call(
                    f"/agent/v1/jobs/next?wait={wait:g}&slot={slot.index}", timeout=wait + 15
                )
            except Unreachable as exc:
                log.warning("event=fetch_failed slot=%d error=%s", slot.index, exc)
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
            self._set_action(reply.get("action", self.action))
            if reply.get("job"):
                self.run_job(reply["job"], slot)

    def _held_job(self, slot: Slot) -> dict[str, Any] | None:
        """On drain, the job the core still holds in this slot, if any: the agent restarted
        under it, or the answer to its fetch was lost. Unrun, it would keep the VM draining
        (and billed) for ever. Asked only once this slot's reports are all delivered, so a
        job handed back is one never reported, not one just finished."""
        attempt = 0
        while not self.stopping.is_set() and self.action == "drain":
            try:
                status, reply = self.core.call(
                    f"/agent/v1/jobs/next?wait=0&slot={slot.index}", timeout=15
                )
            except Unreachable as exc:
                log.warning("event=fetch_failed slot=%d error=%s", slot.index, exc)
                self.stopping.wait(self._backoff(attempt))
                attempt += 1
                continue
            if status != 200:
                return None
            self._set_action(reply.get("action", self.action))
            job: dict[str, Any] | None = reply.get("job")
            if job is not None:
                log.info("event=held_job_handed_back slot=%d job=%s", slot.index, job["id"])
            return job
        return None

    def run_record(self, run_id: str, slot: Slot, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "run": run_id,
            "slot": slot.index,
            "status": "started",
            "exit_code": None,
            "output_tail": "",
            "alien_job_id": None,
            "idle": None,
            "duration_s": None,
        }
        body.update(fields)
        return body

    def pilot_loop(self, slot: Slot) -> None:
        """Run the site's pilot (e.g. the AliEn JobAgent) again and again until drained."""
        command = self.settings["pilot_command"]
        while self._may_take_work():
            run_id = str(uuid.uuid4())
            slot.runs += 1
            with contextlib.suppress(Unreachable):  # best effort: the finish is spooled
                self.core.call("/agent/v1/runs", self.run_record(run_id, slot), timeout=10)
            slot.run_started = time.monotonic()
            workdir = f"pilot-{slot.index}-{slot.runs}"
            try:
                outcome = self.execute(command, {}, None, workdir, slot)
            finally:
                duration = time.monotonic() - slot.run_started
                slot.run_started, slot.named_job = None, False
            shutil.rmtree(self.jobs_dir / workdir, ignore_errors=True)
            idle = run_is_idle(duration, outcome.exit_code, self.settings)
            alien_job_id = parse_alien_job_id(outcome.tail, self.settings["alien_job_id_regex"])
            self._spool(
                f"run-{time.time_ns()}-{slot.index}",
                "/agent/v1/runs",
                self.run_record(
                    run_id,
                    slot,
                    status="finished",
                    exit_code=outcome.exit_code,
                    output_tail=outcome.tail,
                    alien_job_id=alien_job_id,
                    idle=idle,
                    duration_s=round(duration, 3),
                ),
            )
            log.info(
                "event=pilot_exited slot=%d code=%s idle=%s alien_job=%s duration_s=%.1f",
                slot.index,
                outcome.exit_code,
                idle,
                alien_job_id,
                duration,
            )
            self.wake.set()  # tell the core now whether the VM is idle again
            self.flush_spool()
            self.stopping.wait(self.settings["pilot_pause_s"])

    # ---- Spot interruptions ------------------------------------------------------------

    def spot_loop(self) -> None:
        """Watch IMDS for a Spot termination notice or a rebalance recommendation."""
        imds = IMDS(self.settings["imds_url"])
        failing = False
        while not self.stopping.wait(float(self.settings["spot_poll_s"])):
            try:
                status, text = imds.get("/latest/meta-data/spot/instance-action")
                if status == 200:
                    self.interrupted("termination", text)
                    return
                if not self.no_new_jobs.is_set():
                    path = "/latest/meta-data/events/recommendations/rebalance"
                    status, text = imds.get(path)
                    if status == 200:
                        self.interrupted("rebalance", text)
                failing = False
            except OSError as exc:
                if not failing:
                    log.warning("event=imds_unreachable error=%s", exc)
                failing = True

    def interrupted(self, notice: str, detail: str) -> None:
        """Take no new job, tell the core; on termination kill the jobs and leave."""
        log.warning("event=spot_notice notice=%s detail=%s", notice, json.dumps(detail[:200]))
        self.no_new_jobs.set()
        body = {"notice": notice, "detail": detail[:1000]}
        give_up = time.monotonic() + 30.0  # a termination notice gives two minutes in all
        attempt = 0
        while time.monotonic() < give_up:
            try:
                status, reply = self.core.call("/agent/v1/interruption", body, timeout=10)
            except Unreachable as exc:
                status, reply = 0, {"error": str(exc)}
            if status == 200:
                self._set_action(reply.get("action", self.action))
                break
            if status in FINAL_REFUSALS:
                log.error("event=interruption_refused status=%s", status)
                break
            if self.stopping.wait(min(self._backoff(attempt), 5.0)):
                break
            attempt += 1
        if notice == "termination":
            self._stop()

    # ---- main --------------------------------------------------------------------------

    def run(self) -> int:
        self.register()
        if self.stopping.is_set():
            return 0
        self.slots = [Slot(index) for index in range(int(self.settings["slots"]))]
        try:
            job_identity(self.settings["job_user"])
        except JobUserError as exc:
            log.error("event=job_user_error error=%s", exc)  # every job will fail with it
        self.heartbeat_once()
        self.core.close()  # this thread only waits from now on; each loop has its own
        threading.Thread(target=self.heartbeat_loop, daemon=True).start()
        if float(self.settings["spot_poll_s"]) > 0:
            threading.Thread(target=self.spot_loop, daemon=True).start()
        loop = self.pilot_loop if self.pilot_mode() else self.fetch_loop
        threads = [
            threading.Thread(target=loop, args=(slot,), name=f"slot-{slot.index}", daemon=True)
            for slot in self.slots
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log.info("event=agent_exit action=%s", self.action)
        self._stop()
        return 0

    def terminate(self, signum: int, frame: object) -> None:
        log.info("event=signal signum=%d", signum)
        self._stop()


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
