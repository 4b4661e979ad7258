"""The agent API that VMs reach: register, heartbeat, fetch the next job (long poll), report.

A thin router over ``PoolService``: it translates HTTP to intents and answers back. A VM proves
it belongs to a launch with the launch's secret (from its user data) and gets a token of its
own; that token acts only for that VM, and only while the VM has not left.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.api.access import client_address, forwarded_for, is_allowed, networks
from core.api.errors import install_error_handlers
from core.api.fields import INT64_MAX, Identifier, Int64, Secret, StoredText
from core.api.limits import send_json
from core.api.longpoll import Changes, poll_deadline
from core.config import WebConfig
from core.model import VM, Job
from core.service import PoolService, Unauthorized, action_for

MAX_WAIT_S = 60.0
MAX_OUTPUT_TAIL = 65_536
MAX_RUNNING = 1024  # job ids a heartbeat lists
MAX_SLOT = 1023
INT64 = 2**63 - 1
HEARTBEAT_PATH = "/agent/v1/heartbeat"
NEXT_JOB_PATH = "/agent/v1/jobs/next"


class _Body(BaseModel):
    """Strict: a value has the JSON type it claims ("yes" is no boolean, "1" no number)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class RegisterRequest(_Body):
    instance_id: Identifier
    launch_id: Identifier
    launch_secret: Secret


class HeartbeatRequest(_Body):
    busy: bool = False
    running: Annotated[
        list[Annotated[int, Field(ge=1, le=INT64)]], Field(max_length=MAX_RUNNING)
    ] = []


class ReportRequest(_Body):
    attempt: Annotated[int, Field(ge=1, le=INT64_MAX)]
    status: Literal["started", "finished", "cancelled"]
    exit_code: Int64 | None = None
    output_tail: Annotated[StoredText, Field(max_length=MAX_OUTPUT_TAIL)] = ""

    @model_validator(mode="after")
    def _finished_needs_exit_code(self) -> ReportRequest:
        if self.status == "finished" and self.exit_code is None:
            raise ValueError("exit_code is required when status is 'finished'")
        return self


class InterruptionRequest(_Body):
    notice: Literal["termination", "rebalance"]
    detail: Annotated[str, Field(max_length=1024)] = ""


class RunRequest(_Body):
    run: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    slot: Annotated[int, Field(ge=0, le=1023)] = 0
    status: Literal["started", "finished"]
    exit_code: Annotated[int, Field(ge=-INT64, le=INT64)] | None = None
    output_tail: Annotated[str, Field(max_length=MAX_OUTPUT_TAIL)] = ""
    alien_job_id: Annotated[str, Field(max_length=64)] | None = None
    idle: bool | None = None
    duration_s: Annotated[float, Field(ge=0, le=10**9)] | None = None


def job_body(job: Job) -> dict[str, Any]:
    """A job as an agent runs it. ``state``: "cancelled" for a started job handed back after
    an admin cancelled it (its agent restarted and lost track): the agent reports it
    cancelled and never runs it again."""
    return {
        "id": job.id,
        "attempt": job.attempt,
        "command": job.command,
        "env": job.env,
        "wall_time_s": job.wall_time_s,
        "state": job.state,
    }


async def current_vm(request: Request) -> VM:
    """The VM whose token the caller presents; 401 for anything else. Async on purpose: a
    plain function would run in a worker thread, off the thread that owns the store."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized()
    service: PoolService = request.app.state.service
    return service.authenticate(token)


CurrentVM = Annotated[VM, Depends(current_vm)]


VERDICTS_KEPT = 20_000  # a fleet of 10,000 VMs behind no proxy, twice over
VERDICT_KEY_CHARS = 200  # an X-Forwarded-For of a few hops


def network_guard(web: WebConfig) -> Callable[[Scope], bool]:
    """Whether a request comes from ``web.allowed_networks`` (judged behind trusted proxies):
    the listener's request gate answers 403 before anything else runs (limits.RequestGate)."""
    allowed, trusted = networks(web.allowed_networks), networks(web.trusted_proxies)
    # Verdicts by (peer, X-Forwarded-For): a fleet's few thousand addresses ask again and
    # again, and parsing an address costs more than the rest of the gate (py-spy: 4% of a
    # request). Bounded: cleared when full, and no long header is kept as a key.
    verdicts: dict[tuple[str | None, str | None], bool] = {}

    def admits(scope: Scope) -> bool:
        peer = scope["client"][0] if scope.get("client") else None
        forwarded = forwarded_for(scope["headers"])
        key = (peer, forwarded)
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = is_allowed(client_address(peer, forwarded, trusted), allowed)
            if forwarded is None or len(forwarded) <= VERDICT_KEY_CHARS:
                if len(verdicts) >= VERDICTS_KEPT:
                    verdicts.clear()
                verdicts[key] = verdict
        return verdict

    return admits


async def heartbeat_answer(service: PoolService, vm: VM, busy: bool) -> dict[str, Any]:
    vm, cancel = service.heartbeat(vm, busy=busy)
    return {"action": action_for(vm), "state": vm.state, "cancel": cancel}


async def next_job_answer(
    service: PoolService, changes: Changes, vm: VM, slot: int, wait: float
) -> dict[str, Any]:
    """The job of ``slot`` now, or the first one that a wake-up brings before the deadline
    (or before a newer poll of the same slot ends this one: ``SlotPolls``)."""
    loop = asyncio.get_running_loop()
    deadline = poll_deadline(loop.time(), wait)
    woken = False
    superseded = changes.polls.take(vm.id, slot)
    try:
        while True:
            fetch = service.next_job(vm.id, slot)
            if fetch.job is not None:
                return {"job": job_body(fetch.job), "action": fetch.action}
            remaining = deadline - loop.time()
            ended = superseded.done()
            if not fetch.wait or remaining <= 0 or changes.closing or ended:
                if woken and (not fetch.wait or ended):
                    # Woken for a job this poll will not take (its VM drained or killed
                    # while parked, or a newer poll of the slot): the next parked poll
                    # gets it, not the end of its wait.
                    changes.jobs.notify(1)
                return {"job": None, "action": fetch.action}
            woken = await changes.jobs.wait(remaining, superseded)
    finally:
        changes.polls.release(vm.id, slot, superseded)


class HotPaths:
    """Heartbeats and job polls, nearly every request a fleet sends, answered without
    FastAPI's routing, dependency solving and response model: at 10,000 agents they are ~800
    requests a second (benchmarks/README.md has the core CPU per request before and after).

    Only their plain form is taken here: one Bearer token of a VM that has not left, a JSON
    heartbeat of ``busy`` and ``running`` with a Content-Length, a poll's ``wait`` and
    ``slot`` in range. Anything else (a bad token, another body, another query) goes on to
    the routes, which answer it and describe it in the OpenAPI schema, so every refusal
    stays the routes' own. It sits in front of the FastAPI app, not in its middleware stack
    (whose four layers were 6% of a request, py-spy), so an error raised here is answered by
    the app's exception handlers through ``_fail``, as FastAPI would.
    """

    def __init__(
        self,
        app: ASGIApp,
        service: PoolService,
        changes: Changes,
        handlers: Mapping[Any, Callable[[Request, Any], Response | Awaitable[Response]]],
    ) -> None:
        self.app = app
        self.service = service
        self.changes = changes
        self.handlers = handlers  # the FastAPI app's, filled in by install_error_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"] == HEARTBEAT_PATH:
                await self._heartbeat(scope, receive, send)
                return
            if scope["path"] == NEXT_JOB_PATH:
                await self._next_job(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _heartbeat(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _single_headers(scope)
        if (
            headers.get(b"content-type") != b"application/json"
            or b"content-length" not in headers
            or b"transfer-encoding" in headers
        ):
            # A chunked body may pass its declared length: the gate's 413 is the routes' to give.
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)  # the gate's 413 past the body's limit
            if body is None:
                return  # the agent went away
            # The token is checked once the body is in, as the routes do: the VM may have
            # left while its body arrived.
            vm = self._vm(headers)
            busy = _plain_heartbeat(body)
        except Exception as exc:
            await self._fail(scope, receive, send, exc)
            return
        if vm is None or busy is None:
            await self.app(scope, _replay(body, receive), send)
            return
        await self._answer(scope, receive, send, heartbeat_answer(self.service, vm, busy))

    async def _next_job(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            vm = self._vm(_single_headers(scope))
            poll = _plain_poll(scope["query_string"], self.service.config.pool.slots_per_vm)
        except Exception as exc:
            await self._fail(scope, receive, send, exc)
            return
        if vm is None or poll is None:
            await self.app(scope, receive, send)
            return
        slot, wait = poll
        answer = next_job_answer(self.service, self.changes, vm, slot, wait)
        await self._answer(scope, receive, send, answer)

    def _vm(self, headers: Mapping[bytes, bytes]) -> VM | None:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return None
        try:
            return self.service.authenticate(token)
        except Unauthorized:
            return None

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        answer: Awaitable[dict[str, Any]],
    ) -> None:
        try:
            content = await answer
            body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except Exception as exc:
            await self._fail(scope, receive, send, exc)
            return
        await send_json(send, 200, body.encode())

    async def _fail(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """Answer ``exc`` with the app's handler for it (the most specific one; ``Exception``
        logs it and answers 500)."""
        handler = next(h for c in type(exc).__mro__ if (h := self.handlers.get(c)))
        response = handler(Request(scope, receive), exc)
        if inspect.isawaitable(response):
            response = await response
        await response(scope, receive, send)


# Numbers as agents write them (no sign, exponent or leading zero): anything else, the routes.
_POLL_WAIT = re.compile(rb"(?:0|[1-9]\d{0,2})(?:\.\d{1,9})?")
_POLL_SLOT = re.compile(rb"0|[1-9]\d{0,3}")
_HOT_HEADERS = (b"authorization", b"content-type", b"content-length", b"transfer-encoding")


def _single_headers(scope: Scope) -> dict[bytes, bytes]:
    """The headers the hot paths read; one that comes twice is left out (the routes judge)."""
    found: dict[bytes, bytes] = {}
    twice: set[bytes] = set()
    for name, value in scope["headers"]:
        if name in _HOT_HEADERS:
            if name in found:
                twice.add(name)
            found[name] = value
    for name in twice:
        del found[name]
    return found


def _plain_heartbeat(body: bytes) -> bool | None:
    """``busy`` of a heartbeat body the route would accept as it is; None: let it judge."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
        return None
    if type(data) is not dict or not data.keys() <= {"busy", "running"}:
        return None
    busy, running = data.get("busy", False), data.get("running", [])
    if type(busy) is not bool or type(running) is not list or len(running) > MAX_RUNNING:
        return None
    if not all(type(job) is int and 1 <= job <= INT64 for job in running):
        return None
    return busy


def _plain_poll(query: bytes, slots: int) -> tuple[int, float] | None:
    """(slot, wait) of a poll's query the route would accept as it is; None: let it judge."""
    slot, wait = 0, 0.0
    seen: set[bytes] = set()
    for part in query.split(b"&") if query else ():
        name, _, value = part.partition(b"=")
        if name in seen:
            return None
        seen.add(name)
        if name == b"wait" and _POLL_WAIT.fullmatch(value):
            wait = float(value)
        elif name == b"slot" and _POLL_SLOT.fullmatch(value):
            slot = int(value)
        else:
            return None
    if wait > MAX_WAIT_S or slot >= slots:
        return None
    return slot, wait


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app after the hot path read the body: the body, then the rest."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def create_agent_app(
    service: PoolService, changes: Changes, heartbeat_s: float, hot_paths: bool = True
) -> ASGIApp:
    """The agent API; serve it behind ``network_guard(web)`` (``server.make_server(admits=)``).
    ``hot_paths`` False: the FastAPI app alone, every request through the routes (to compare
    the two answers)."""
    app = FastAPI(title="alienec2 agent API", version="1", docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/agent/v1/register")
    async def register(body: RegisterRequest) -> dict[str, Any]:
        """Trade the launch secret for a VM token, once per instance of that launch."""
        done = service.register(body.instance_id, body.launch_id, body.launch_secret)
        return {
            "vm_id": done.vm.id,
            "token": done.token,
            "heartbeat_s": heartbeat_s,
            "slots": service.config.pool.slots_per_vm,  # the agent's fetch or pilot loops
        }

    @app.post(HEARTBEAT_PATH)
    async def heartbeat(vm: CurrentVM, body: HeartbeatRequest | None = None) -> dict[str, Any]:
        return await heartbeat_answer(service, vm, bool(body and body.busy))

    @app.post(NEXT_JOB_PATH)
    async def next_job(
        vm: CurrentVM,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, allow_inf_nan=False)] = 0,
        slot: Annotated[int, Query(ge=0, le=MAX_SLOT)] = 0,
    ) -> dict[str, Any]:
        """The job of the agent's fetch loop ``slot`` (0 to pool.slots_per_vm - 1): the one
        it holds, or the oldest queued job, waiting up to ``wait`` seconds for one (an empty
        poll ends within the wait's last quarter: ``longpoll.poll_deadline``)."""
        return await next_job_answer(service, changes, vm, slot, wait)

    @app.post("/agent/v1/interruption")
    async def interruption(body: InterruptionRequest, vm: CurrentVM) -> dict[str, Any]:
        """A Spot notice the agent read from the instance metadata."""
        vm = service.interruption(vm, body.notice, body.detail)
        return {"action": action_for(vm), "state": vm.state}

    @app.post("/agent/v1/runs")
    async def run(body: RunRequest, vm: CurrentVM) -> dict[str, Any]:
        """A pilot run (e.g. one AliEn JobAgent), started or finished; idempotent by run."""
        job = service.record_run(
            vm,
            body.run,
            body.status,
            body.exit_code,
            body.output_tail,
            body.alien_job_id,
            body.idle,
        )
        return {"accepted": True, "job_id": job.id, "state": job.state}

    @app.post("/agent/v1/jobs/{job_id}/report")
    async def report(
        job_id: Annotated[int, Path(ge=1, le=INT64)], body: ReportRequest, vm: CurrentVM
    ) -> dict[str, Any]:
        """Idempotent by (job, attempt): a retried report changes nothing and is accepted."""
        done = service.report(
            vm, job_id, body.attempt, body.status, body.exit_code, body.output_tail
        )
        if not done.accepted:
            reason = "cancelled" if done.state == "cancelled" else "stale attempt"
            return {"accepted": False, "reason": reason, "state": done.state}
        return {"accepted": True, "state": done.state}

    if not hot_paths:
        return app
    return HotPaths(app, service=service, changes=changes, handlers=app.exception_handlers)
