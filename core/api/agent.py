"""The agent API that VMs reach: register, heartbeat, fetch the next job (long poll), report.

A thin router over ``PoolService``: it translates HTTP to intents and answers back. A VM proves
it belongs to a launch with the launch's secret (from its user data) and gets a token of its
own; that token acts only for that VM, and only while the VM has not left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.types import Scope

from core.api.access import client_address, forwarded_for, is_allowed, networks
from core.api.errors import install_error_handlers
from core.api.fields import INT64_MAX, Identifier, Int64, Secret, StoredText
from core.api.longpoll import Changes, poll_deadline
from core.config import WebConfig
from core.model import VM, Job
from core.service import PoolService, Unauthorized, action_for

MAX_WAIT_S = 60.0
MAX_OUTPUT_TAIL = 65_536
INT64 = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RegisterRequest(_Body):
    instance_id: Identifier
    launch_id: Identifier
    launch_secret: Secret


class HeartbeatRequest(_Body):
    busy: bool = False
    running: Annotated[list[Annotated[int, Field(ge=1, le=INT64)]], Field(max_length=1024)] = []


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
    if scheme.lower() != "bearer":
        raise Unauthorized()
    service: PoolService = request.app.state.service
    return service.authenticate(token)


CurrentVM = Annotated[VM, Depends(current_vm)]


def network_guard(web: WebConfig) -> Callable[[Scope], bool]:
    """Whether a request comes from ``web.allowed_networks`` (judged behind trusted proxies):
    the listener's request gate answers 403 before anything else runs (limits.RequestGate)."""
    allowed, trusted = networks(web.allowed_networks), networks(web.trusted_proxies)

    def admits(scope: Scope) -> bool:
        peer = scope["client"][0] if scope.get("client") else None
        forwarded = forwarded_for(scope["headers"])
        return is_allowed(client_address(peer, forwarded, trusted), allowed)

    return admits


def create_agent_app(service: PoolService, changes: Changes, heartbeat_s: float) -> FastAPI:
    """The agent API; serve it behind ``network_guard(web)`` (``server.make_server(admits=)``)."""
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

    @app.post("/agent/v1/heartbeat")
    async def heartbeat(vm: CurrentVM, body: HeartbeatRequest | None = None) -> dict[str, Any]:
        vm, cancel = service.heartbeat(vm, busy=bool(body and body.busy))
        return {"action": action_for(vm), "state": vm.state, "cancel": cancel}

    @app.post("/agent/v1/jobs/next")
    async def next_job(
        vm: CurrentVM,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
        slot: Annotated[int, Query(ge=0, le=1023)] = 0,
    ) -> dict[str, Any]:
        """The job of the agent's fetch loop ``slot`` (0 to pool.slots_per_vm - 1): the one
        it holds, or the oldest queued job, waiting up to ``wait`` seconds for one (an empty
        poll ends within the wait's last quarter: ``longpoll.poll_deadline``)."""
        loop = asyncio.get_running_loop()
        deadline = poll_deadline(loop.time(), wait)
        woken = False
        while True:
            fetch = service.next_job(vm.id, slot)
            if fetch.job is not None:
                return {"job": job_body(fetch.job), "action": fetch.action}
            remaining = deadline - loop.time()
            if not fetch.wait or remaining <= 0 or changes.closing:
                if woken and not fetch.wait:
                    # Woken for a job this VM may no longer take (drained, killed while
                    # parked): the next parked poll gets it, not the end of its wait.
                    changes.jobs.notify(1)
                return {"job": None, "action": fetch.action}
            woken = await changes.jobs.wait(remaining)

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

    return app
