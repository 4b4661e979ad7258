"""The agent API that VMs reach: register, heartbeat, fetch the next job (long poll), report.

A VM proves it belongs to a launch with the launch's secret (from its user data) and gets a
token of its own; that token acts only for that VM.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from core.api.access import Network, client_address, forwarded_for, is_allowed, networks
from core.api.errors import ApiError, error_body, forbidden, install_error_handlers, unauthorized
from core.api.fields import INT64_MAX, Identifier, Int64, Secret, StoredText
from core.api.longpoll import Changes
from core.engine import Engine
from core.model import VM, Job, LaunchState, VMState
from core.store import NotFound
from core.userdata import secret_matches

MAX_WAIT_S = 60.0
MAX_OUTPUT_TAIL = 65_536
STOP_STATES = frozenset({VMState.TERMINATING, VMState.TERMINATED, VMState.LOST, VMState.FAILED})


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RegisterRequest(_Body):
    instance_id: Identifier
    launch_id: Identifier
    launch_secret: Secret


class HeartbeatRequest(_Body):
    busy: bool = False


class ReportRequest(_Body):
    attempt: Annotated[int, Field(ge=1, le=INT64_MAX)]
    status: Literal["started", "finished"]
    exit_code: Int64 | None = None
    output_tail: Annotated[StoredText, Field(max_length=MAX_OUTPUT_TAIL)] = ""

    @model_validator(mode="after")
    def _finished_needs_exit_code(self) -> ReportRequest:
        if self.status == "finished" and self.exit_code is None:
            raise ValueError("exit_code is required when status is 'finished'")
        return self


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def action_for(vm: VM) -> Literal["run", "drain", "stop"]:
    """What the agent must do next: the heartbeat's and the fetch's answer."""
    if vm.kill_requested or vm.state in STOP_STATES:
        return "stop"
    if vm.state == VMState.DRAINING:
        return "drain"
    return "run"


def job_body(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "attempt": job.attempt,
        "command": job.command,
        "env": job.env,
        "wall_time_s": job.wall_time_s,
    }


async def current_vm(request: Request) -> VM:
    """The VM whose token the caller presents; 401 for anything else. Async on purpose: a
    plain function would run in a worker thread, off the thread that owns the store."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized()
    vm = request.app.state.engine.store.vm_by_token(token_hash(token))
    if vm is None:
        raise unauthorized()
    return vm


CurrentVM = Annotated[VM, Depends(current_vm)]


class NetworkGuard:
    """403 for callers outside ``web.allowed_networks``, before anything else runs (a plain
    ASGI middleware: no task per request)."""

    def __init__(self, app: ASGIApp, allowed: list[Network], trusted: list[Network]) -> None:
        self.app = app
        self.allowed = allowed
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            peer = scope["client"][0] if scope.get("client") else None
            forwarded = forwarded_for(scope["headers"])
            if not is_allowed(client_address(peer, forwarded, self.trusted), self.allowed):
                response = JSONResponse(error_body("forbidden", "forbidden"), 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_agent_app(engine: Engine, changes: Changes) -> FastAPI:
    store = engine.store
    web = engine.config.web
    allowed = networks(web.allowed_networks)
    trusted = networks(web.trusted_proxies)
    app = FastAPI(title="alienec2 agent API", version="1", docs_url=None, redoc_url=None)
    app.state.engine = engine
    install_error_handlers(app)

    app.add_middleware(NetworkGuard, allowed=allowed, trusted=trusted)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/agent/v1/register")
    async def register(body: RegisterRequest) -> dict[str, Any]:
        """Trade the launch secret for a VM token, once per instance of that launch."""
        if not secret_matches(engine.launch_key, body.launch_id, body.launch_secret):
            raise forbidden()
        try:
            launch = store.launch(body.launch_id)
        except NotFound:
            raise forbidden() from None
        try:
            vm = store.vm(body.instance_id)
        except NotFound:
            if launch.state == LaunchState.PENDING:
                raise ApiError(
                    409, "the launch result is not recorded yet; retry shortly", "not_yet_known"
                ) from None
            raise forbidden() from None
        if vm.launch_id != launch.id:
            raise forbidden()
        if store.has_token(vm.id) or vm.registered_at is not None:
            raise ApiError(409, f"instance {vm.id} is already registered", "already_registered")
        token = secrets.token_urlsafe(32)
        vm = store.register_vm(vm.id, engine.clock())
        store.set_vm_token(vm.id, token_hash(token))
        return {
            "vm_id": vm.id,
            "token": token,
            "heartbeat_s": engine.config.contextualisation.agent_heartbeat_s,
        }

    @app.post("/agent/v1/heartbeat")
    async def heartbeat(vm: CurrentVM, body: HeartbeatRequest | None = None) -> dict[str, Any]:
        if vm.state not in STOP_STATES:
            vm = store.heartbeat(vm.id, engine.clock(), busy=bool(body and body.busy))
        return {"action": action_for(vm), "state": vm.state}

    @app.post("/agent/v1/jobs/next")
    async def next_job(
        vm: CurrentVM, wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0
    ) -> dict[str, Any]:
        """The oldest queued job, waiting up to ``wait`` seconds for one to be submitted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            vm = store.vm(vm.id)
            action = action_for(vm)
            if action != "run":
                return {"job": None, "action": action}
            if vm.job_id is not None:  # the answer to an earlier fetch was lost: same job again
                return {"job": job_body(store.job(vm.job_id)), "action": action}
            if vm.state == VMState.IDLE:
                job = store.assign_next_job(vm.id, engine.clock())
                if job is not None:
                    return {"job": job_body(job), "action": action}
            remaining = deadline - loop.time()
            if remaining <= 0 or changes.closing:
                return {"job": None, "action": action}
            await changes.jobs.wait(remaining)

    @app.post("/agent/v1/jobs/{job_id}/report")
    async def report(job_id: int, body: ReportRequest, vm: CurrentVM) -> dict[str, Any]:
        """Idempotent by (job, attempt): a retried report changes nothing and is accepted."""
        try:
            store.job(job_id)
        except NotFound:
            raise forbidden() from None
        if not store.was_assigned(job_id, vm.id):
            raise forbidden()
        now = engine.clock()
        if body.status == "started":
            job = store.start_job(job_id, body.attempt, vm.id, now)
        else:
            assert body.exit_code is not None
            job = store.finish_job(
                job_id, body.attempt, vm.id, body.exit_code, body.output_tail, now
            )
        if job is None:
            current = store.job(job_id)
            return {"accepted": False, "reason": "stale attempt", "state": current.state}
        return {"accepted": True, "state": job.state}

    return app
