"""The sandbox cloud: moto's EC2 server on loopback, and a fault-injecting EC2 endpoint.

boto3 talks HTTP to these exactly as to AWS. ``FaultyEndpoint`` sits in front of an EC2
endpoint and can answer RunInstances with InsufficientInstanceCapacity (for every launch, or for
some instance types or subnets), or forward it and hold the answer back (to crash a core between
the cloud acting and the core hearing of it). It also behaves as EC2 does where moto does not:
request throttling by token buckets, eventually consistent listings, partial fulfilment. It
counts the EC2 actions it sees, which is the cloud-side view of our API economy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import functools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from core.clouds.alien_sandbox import script_path
from core.clouds.imds_stub import IMDSStub
from core.config import Config
from core.userdata import read_agent_settings

log = logging.getLogger("alienec2.sandbox")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _stop_with_the_sandbox(sandbox_pid: int) -> None:
    """Run in an instance's agent before it execs: SIGTERM when the thread that started it
    ends (``InstanceRunner``'s own, which lives as long as the runner), as when whoever runs
    the sandbox is SIGKILLed: its cloud is gone with it. The agent then stops its jobs and
    exits, as on a VM powered off; nothing is left running."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != sandbox_pid:  # it died before the request was made
            os.kill(os.getpid(), signal.SIGKILL)  # SIGTERM's handler is still the sandbox's


SANDBOX_REGION = "us-east-1"
SANDBOX_IMAGE = "ami-12c6146b"  # one of the AMIs moto knows
SANDBOX_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox"}


# moto builds each region's EC2 backend with thousands of default AMIs: 0.3 s unloaded, over
# a second on a busy machine, paid again after every reset. The sandbox needs two. Read when
# moto's EC2 models are first imported (on the server's first request).
SANDBOX_AMIS = Path(__file__).with_name("sandbox_amis.json")


class MotoEC2Server:
    """moto's server on a free loopback port; someone else's EC2 implementation."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        os.environ.setdefault("MOTO_AMIS_PATH", str(SANDBOX_AMIS))
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.url = ""

    def start(self) -> MotoEC2Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget every resource (between tests)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> MotoEC2Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_UNAVAILABLE = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
    "<Code>Unavailable</Code><Message>The service is unavailable.</Message>"
    "</Error></Errors><RequestID>fault</RequestID></Response>"
)
_CAPACITY_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
    "<Code>InsufficientInstanceCapacity</Code>"
    "<Message>We currently do not have sufficient capacity in the Availability Zone you "
    "requested.</Message></Error></Errors><RequestID>sandbox-fault</RequestID></Response>"
)


_THROTTLED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
    "<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
    "</Error></Errors><RequestID>sandbox-throttle</RequestID></Response>"
)
_NOT_FOUND = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
    "<Code>InvalidInstanceID.NotFound</Code><Message>The instance IDs '{ids}' do not exist"
    "</Message></Error></Errors><RequestID>sandbox-eventual</RequestID></Response>"
)

# AWS's documented request token buckets per account and region: (burst, refill per second).
EC2_BUCKETS = {"RunInstances": (5.0, 2.0), "mutating": (50.0, 5.0), "non-mutating": (100.0, 20.0)}


def bucket_of(action: str) -> str:
    if action == "RunInstances":
        return action
    return "non-mutating" if action.startswith(("Describe", "Get", "List")) else "mutating"


class TokenBuckets:
    """EC2's request throttling: each call takes a token of its bucket, refilled at a fixed
    rate up to the burst; an empty bucket means RequestLimitExceeded. Time comes from
    ``clock`` so tests can move it."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sizes: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.clock = clock
        self.sizes = dict(sizes or EC2_BUCKETS)
        now = clock()
        self._state = {name: (burst, now) for name, (burst, _) in self.sizes.items()}

    def take(self, action: str) -> bool:
        name = bucket_of(action)
        burst, rate = self.sizes[name]
        tokens, since = self._state[name]
        now = self.clock()
        tokens = min(burst, tokens + max(now - since, 0.0) * rate)
        if tokens < 1.0:
            self._state[name] = (tokens, now)
            return False
        self._state[name] = (tokens - 1.0, now)
        return True


def _tag(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


class FaultyEndpoint:
    """An EC2 endpoint that forwards to ``upstream`` and injects faults on demand."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.capacity_error = False
        # RunInstances naming one of these instance types or subnets has no capacity.
        self.capacity_errors: set[str] = set()
        self.throttle: TokenBuckets | None = None  # None: never throttled (moto's way)
        self.refused: Counter[str] = Counter()  # calls answered RequestLimitExceeded
        # Eventual consistency: instances are absent from Describe answers for this long after
        # RunInstances (asked for by id: InvalidInstanceID.NotFound), on ``clock``'s time.
        self.hide_new_instances_s = 0.0
        self.clock: Callable[[], float] = time.monotonic
        self._launched_at: dict[str, float] = {}
        # Partial fulfilment: RunInstances launches at most this many (None: all asked).
        self.fulfil_at_most: int | None = None
        self.hold_run_instances = False
        self.drop_run_instances_answer = False  # forward it, then close without answering
        self.failing_actions: set[str] = set()  # answered with a 503 and not forwarded
        self.run_instances_forwarded = threading.Event()
        self.release = threading.Event()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> FaultyEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = urllib.parse.parse_qs(body.decode()).get("Action", ["?"])[0]
                params = urllib.parse.parse_qs(body.decode())
                with endpoint._lock:
                    endpoint.calls[action] += 1
                    throttled = endpoint.throttle is not None and not endpoint.throttle.take(action)
                    if throttled:
                        endpoint.refused[action] += 1
                if throttled:
                    self._reply(503, _THROTTLED.encode(), "text/xml")
                    return
                if action == "RunInstances" and (
                    endpoint.capacity_error
                    or endpoint.capacity_errors
                    & {*params.get("InstanceType", []), *params.get("SubnetId", [])}
                ):
                    self._reply(500, _CAPACITY_ERROR.encode(), "text/xml")
                    return
                if action == "RunInstances" and endpoint.fulfil_at_most is not None:
                    body = endpoint._fewer(params)
                hidden = endpoint._hidden() if action == "DescribeInstances" else set()
                asked = {v for k, vs in params.items() if k.startswith("InstanceId.") for v in vs}
                if asked & hidden:
                    message = _NOT_FOUND.format(ids=", ".join(sorted(asked & hidden)))
                    self._reply(400, message.encode(), "text/xml")
                    return
                if action in endpoint.failing_actions:
                    self._reply(503, _UNAVAILABLE.encode(), "text/xml")
                    return
                status, payload, content_type = endpoint._forward(self.path, body, self.headers)
                if action == "RunInstances" and status == 200:
                    endpoint._note_launched(payload)
                if hidden and status == 200:
                    payload = endpoint._without(payload, hidden)
                if action == "RunInstances" and endpoint.drop_run_instances_answer:
                    self.close_connection = True
                    self.connection.shutdown(2)  # the cloud acted; its answer is lost
                    return
                if action == "RunInstances" and endpoint.hold_run_instances:
                    endpoint.run_instances_forwarded.set()
                    endpoint.release.wait(timeout=60)
                self._reply(status, payload, content_type)

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client died while we held its answer: that was the point

        return Handler

    def _fewer(self, params: dict[str, list[str]]) -> bytes:
        """The RunInstances request asking for at most ``fulfil_at_most`` instances."""
        most = str(self.fulfil_at_most)
        for key in ("MinCount", "MaxCount"):
            if key in params and int(params[key][0]) > int(most):
                params[key] = [most]
        return urllib.parse.urlencode(params, doseq=True).encode()

    def _note_launched(self, payload: bytes) -> None:
        if not self.hide_new_instances_s:
            return
        now = self.clock()
        root = ET.fromstring(payload)
        with self._lock:
            for element in root.iter():
                if _tag(element) == "instanceId" and element.text:
                    self._launched_at[element.text] = now

    def _hidden(self) -> set[str]:
        """Instances launched too recently to be listed yet."""
        now = self.clock()
        with self._lock:
            return {
                i for i, at in self._launched_at.items() if now - at < self.hide_new_instances_s
            }

    @staticmethod
    def _without(payload: bytes, hidden: set[str]) -> bytes:
        """A DescribeInstances answer without the hidden instances (and emptied reservations)."""
        root = ET.fromstring(payload)
        namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
        ET.register_namespace("", namespace)
        for reservations in [e for e in root.iter() if _tag(e) == "reservationSet"]:
            for reservation in list(reservations):
                for instances in [e for e in reservation if _tag(e) == "instancesSet"]:
                    for item in list(instances):
                        ids = [e.text for e in item if _tag(e) == "instanceId"]
                        if ids and ids[0] in hidden:
                            instances.remove(item)
                    if not len(instances):
                        reservations.remove(reservation)
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)

    def _forward(self, path: str, body: bytes, headers: Any) -> tuple[int, bytes, str]:
        keep = {
            k: v
            for k, v in headers.items()
            if k.lower() not in ("host", "content-length", "connection")
        }
        request = urllib.request.Request(self.upstream + path, data=body, headers=keep)
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return reply.status, reply.read(), reply.headers.get("Content-Type", "text/xml")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "text/xml")

    def __enter__(self) -> FaultyEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sandbox_refusal(config: Config) -> str | None:
    """Why a configuration cannot run against the sandbox, whose instances are local
    processes; None when it can. An ``alien`` pilot runs on this machine, so only the
    sandbox's own stand-in JobAgent is allowed (``alien_clients.py jobagent``)."""
    context = config.contextualisation
    if context.template == "alien" and not is_stand_in_jobagent(context.alien.pilot_command):
        return (
            "contextualisation.template: --sandbox boots instances as local processes; "
            f"the pilot_command {context.alien.pilot_command!r} would run the site's JobAgent "
            "on this machine (use the sandbox's stand-in JobAgent, as `alienec2 demo --alien` "
            "does, or template: builtin to try the pool)"
        )
    return None


def is_stand_in_jobagent(argv: list[str]) -> bool:
    """The sandbox AliEn's JobAgent (``<python> [-S] <alien_clients.py> jobagent ...``)."""
    args = [arg for arg in argv[1:] if arg != "-S"]
    return args[:2] == [str(script_path()), "jobagent"]


def sandbox_config(config: Config, endpoint_url: str) -> Config:
    """The same configuration with every cloud pointed at the sandbox endpoint, and the
    instances (local processes) told to reach the core where it listens.

    moto launches MinCount instances, so the sandbox asks for exact counts."""
    clouds = [
        cloud.model_copy(
            update={
                "endpoint_url": endpoint_url,
                "region": SANDBOX_REGION,
                "profile": None,
                "image_id": SANDBOX_IMAGE if cloud.launch_template is None else None,
                "exact_count": True,
            }
        )
        for cloud in config.clouds
    ]
    web = config.web.model_copy(update={"public_url": None})
    return config.model_copy(update={"clouds": clouds, "web": web})


def agent_path() -> Path:
    """The job agent script the user data installs, as shipped with this package."""
    return Path(str(resources.files("contextualisation").joinpath("agent.py")))


def prepare_agent(user_data: str, vm_id: str, workdir: Path, **overrides: Any) -> Path:
    """Write the agent settings an instance's user data carries, as cloud-init would on a VM,
    with the instance id (no IMDS here) and a private state directory; returns their path."""
    settings = read_agent_settings(user_data)
    settings.update({"instance_id": vm_id, "state_dir": str(workdir / "state")})
    # The sandbox boots agents on this host, as this user: jobs run as that user too (there is
    # no job user here), and there is no instance metadata service to watch for Spot notices.
    settings.update({"job_user": "", "spot_poll_s": 0})
    settings.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "agent.json"
    path.write_text(json.dumps(settings))
    path.chmod(0o600)
    return path


def agent_command(settings_path: Path) -> list[str]:
    return [sys.executable, str(agent_path()), "--settings", str(settings_path)]


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault injection for the sandbox runner."""

    never_boot_fraction: float = 0.0  # instances whose agent never starts
    die_mid_job: int = 0  # instances that die (agent and job killed) once they run a job
    seed: int = 1
    # Spot: this fraction of instances get a termination notice in their IMDS a few seconds
    # (spot_notice_after_s, plus up to as much again) after they boot, and EC2 reclaims them
    # spot_reclaim_after_s after the notice (two minutes on AWS).
    spot_interrupt_fraction: float = 0.0
    spot_notice_after_s: float = 3.0
    spot_reclaim_after_s: float = 10.0


def _by_parent() -> dict[int, list[int]]:
    """Every process on the machine under its parent's pid (whichever thread started it)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    return children


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (jobs run in their own sessions, so a group kill misses
    them): what must die with a VM."""
    children = _by_parent()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started and has not reaped."""
    return _by_parent().get(pid, [])


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive and not a zombie (exited, not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class InstanceRunner:
    """The sandbox's hypervisor: each instance EC2 reports running boots, after a boot delay,
    as a local agent process configured by that instance's own user data (either template:
    both write the agent settings; with ``alien`` the agent runs their ``pilot_command``).
    Terminated instances' processes, pilots and jobs included, are stopped. Everything lives
    in ``workdir`` (each agent's pid in ``<instance>/agent.pid``), removed by ``close``."""

    def __init__(
        self,
        ec2_url: str,
        workdir: Path,
        *,
        boot_delay_s: float = 3.0,
        jitter_s: float = 1.0,
        faults: Faults = Faults(),
        poll_s: float = 0.25,
        agent_overrides: dict[str, Any] | None = None,
    ) -> None:
        self._ec2 = boto3.client("ec2", endpoint_url=ec2_url, region_name=SANDBOX_REGION)
        self.workdir = workdir
        self._boot_delay_s = boot_delay_s
        self._jitter_s = jitter_s
        self._faults = faults
        self._random = random.Random(faults.seed)
        self._poll_s = poll_s
        self._overrides = agent_overrides or {}
        self._seen: set[str] = set()
        self._boot_at: dict[str, float] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # The one thread that polls and so starts every agent: an agent is told to stop when
        # the thread that started it ends (``_stop_with_the_sandbox``), so it must not end
        # before the runner closes.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sandbox-instances")
        self._doomed: set[str] = set()
        self._imds: dict[str, IMDSStub] = {}
        self._notice_at: dict[str, float] = {}  # Spot notices to announce, when
        self._reclaim_at: dict[str, float] = {}  # interrupted instances EC2 terminates, when
        self.booted: list[str] = []
        self.never_booted: list[str] = []
        self.died: list[str] = []
        self.interrupted: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await loop.run_in_executor(self._thread, self.poll)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._poll_s)

    def poll(self) -> None:
        now = time.monotonic()
        pages = self._ec2.get_paginator("describe_instances").paginate()
        for page in pages:
            for reservation in page["Reservations"]:
                for raw in reservation["Instances"]:
                    self._observe(raw["InstanceId"], raw["State"]["Name"], now)
        for instance_id, due in list(self._boot_at.items()):
            if due <= now:
                del self._boot_at[instance_id]
                self._boot(instance_id)
        for instance_id in list(self._doomed):
            if instance_id in self._procs and self._stopped_mid_job(instance_id):
                self._doomed.discard(instance_id)
                self._kill(instance_id)
                self.died.append(instance_id)
                log.info("event=sandbox_instance_died vm=%s", instance_id)
        for instance_id, due in list(self._notice_at.items()):
            if due <= now:
                del self._notice_at[instance_id]
                if instance_id in self._imds:
                    self._imds[instance_id].announce_termination(
                        in_s=self._faults.spot_reclaim_after_s
                    )
                    self.interrupted.append(instance_id)
                    self._reclaim_at[instance_id] = now + self._faults.spot_reclaim_after_s
                    log.info("event=sandbox_spot_notice vm=%s", instance_id)
        reclaim = [i for i, due in self._reclaim_at.items() if due <= now]
        for instance_id in reclaim:
            del self._reclaim_at[instance_id]
        if reclaim:  # EC2 takes the instance back, whatever the core did meanwhile
            self._ec2.terminate_instances(InstanceIds=reclaim)

    def _observe(self, instance_id: str, state: str, now: float) -> None:
        if state in ("shutting-down", "terminated"):
            self._boot_at.pop(instance_id, None)
            self._notice_at.pop(instance_id, None)
            self._reclaim_at.pop(instance_id, None)
            if instance_id in self._procs:
                self._kill(instance_id)
            return
        if state != "running" or instance_id in self._seen:
            return
        self._seen.add(instance_id)
        if self._random.random() < self._faults.never_boot_fraction:
            self.never_booted.append(instance_id)
            log.info("event=sandbox_never_boots vm=%s", instance_id)
            return
        if len(self._doomed) + len(self.died) < self._faults.die_mid_job:
            self._doomed.add(instance_id)
        delay = self._boot_delay_s + self._random.uniform(0, self._jitter_s)
        self._boot_at[instance_id] = now + delay

    def _dir(self, instance_id: str) -> Path:
        return self.workdir / instance_id

    def _boot(self, instance_id: str) -> None:
        reply = self._ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        user_data = base64.b64decode(reply["UserData"]["Value"]).decode()
        overrides = dict(self._overrides)
        faults = self._faults
        if faults.spot_interrupt_fraction > 0:
            # Every instance gets its own metadata service, as on EC2; some get a notice.
            imds = self._imds[instance_id] = IMDSStub(instance_id).start()
            overrides.update(imds_url=imds.url, spot_poll_s=0.5)
            if self._random.random() < faults.spot_interrupt_fraction:
                after = faults.spot_notice_after_s * (1 + self._random.random())
                self._notice_at[instance_id] = time.monotonic() + after
        settings = prepare_agent(user_data, instance_id, self._dir(instance_id), **overrides)
        with open(self._dir(instance_id) / "agent.log", "ab") as log_file:
            # Its own process group, as on a VM: a signal meant for whoever started the
            # sandbox (a terminal's SIGHUP or SIGINT) is not the instance's business. Its
            # end is: the sandbox killed outright powers its instances off too.
            proc = subprocess.Popen(
                agent_command(settings),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=functools.partial(_stop_with_the_sandbox, os.getpid()),
            )
        self._procs[instance_id] = proc
        (self._dir(instance_id) / "agent.pid").write_text(f"{proc.pid}\n")
        self.booted.append(instance_id)
        log.info("event=sandbox_instance_booted vm=%s", instance_id)

    def _stopped_mid_job(self, instance_id: str) -> bool:
        """Freeze the instance's agent (SIGSTOP, waited for) and say whether a job of it still
        runs; if not, let the agent go on. A job's workdir stays after it finished, and an
        agent killed after reporting its job leaves nothing to requeue: only a job process
        still running under a stopped agent is one the core will never hear finish."""
        if not any((self._dir(instance_id) / "state/jobs").glob("*")):
            return False  # no job started yet: nothing to freeze for
        proc = self._procs[instance_id]
        if proc.returncode is not None:
            return False  # the agent exited by itself (reaped by an earlier look)
        os.kill(proc.pid, signal.SIGSTOP)
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # until every thread of it is stopped
        if not os.WIFSTOPPED(status):  # it exited meanwhile (and is reaped now)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return False
        if any(_running(pid) for pid in _children(proc.pid)):
            return True  # stays stopped until killed: the job's report is never sent
        os.kill(proc.pid, signal.SIGCONT)
        return False

    def _kill(self, instance_id: str) -> None:
        """Power off: the agent and everything it started die at once."""
        imds = self._imds.pop(instance_id, None)
        if imds is not None:
            imds.stop()
        proc = self._procs.pop(instance_id, None)
        if proc is None:
            return  # killed already (by close, while a poll ended)
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its group: whatever forked off meanwhile
        proc.wait()

    def close(self, keep_logs_in: Path | None = None) -> None:
        """Power every instance off and remove their directories (their agents' tokens and
        spools); with ``keep_logs_in``, each agent's log is kept there as ``<instance>.log``."""
        for instance_id in list(self._procs):
            self._kill(instance_id)
        self._thread.shutdown(wait=False)
        if keep_logs_in is not None:
            for log_file in self.workdir.glob("*/agent.log"):
                keep_logs_in.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log_file, keep_logs_in / f"{log_file.parent.name}.log")
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def local_instances(
    ec2_url: str, workdir: Path, **options: Any
) -> AsyncIterator[InstanceRunner]:
    """An ``InstanceRunner`` booting the instances of ``ec2_url`` while the block runs; on
    leaving it every agent (and its jobs) is stopped and ``workdir`` removed."""
    runner = InstanceRunner(ec2_url, workdir, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        yield runner
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        runner.close()
